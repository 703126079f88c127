//! The archiver's work per event, without the log or the object store: decoding log
//! records, gathering their events into a file's columns, and encoding the Parquet file.
//! `cargo bench -p tally-archive --bench encode`.
//!
//! As the archiver does it: the file sized up front, the text checked as UTF-8 per column.
//!
//! One file of 1,000 records of 1,000 events each (as the load generator sends them):
//! 100,000 videos under a Zipf law (exponent 1), events without ids, then the same with an
//! event id and a viewer id on each. Prints the best of five runs, in ns per event, and
//! the file's bytes per event.

use std::time::{Duration, Instant};

use tally_archive::FileBuilder;
use tally_core::EventRef;
use tally_core::record::{RecordReader, RecordWriter};

const RECORDS: usize = 1000;
const EVENTS_PER_RECORD: usize = 1000;
const VIDEOS: usize = 100_000;
const RUNS: usize = 5;

/// A small, seeded generator: the same events every run and every build.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Ranks 0..n with probability proportional to 1/(rank+1).
fn zipf_ranks(n: usize, count: usize, rng: &mut XorShift) -> Vec<usize> {
    let mut total = 0.0;
    let cumulative: Vec<f64> = (1..=n)
        .map(|k| {
            total += 1.0 / k as f64;
            total
        })
        .collect();
    (0..count).map(|_| cumulative.partition_point(|&c| c < rng.unit() * total).min(n - 1)).collect()
}

fn records(with_ids: bool) -> Vec<Vec<u8>> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let videos = zipf_ranks(VIDEOS, RECORDS * EVENTS_PER_RECORD, &mut rng);
    let start_ms = 1_764_547_200_000;
    videos
        .chunks(EVENTS_PER_RECORD)
        .enumerate()
        .map(|(index, videos)| {
            let receive_ms = start_ms + index as i64;
            let mut writer = RecordWriter::new(receive_ms, None, EVENTS_PER_RECORD * 40);
            for &video in videos {
                let video_id = format!("v{video}");
                let event_id = with_ids.then(|| format!("{:016x}", rng.next()));
                let viewer_id = with_ids.then(|| format!("u{}", rng.next() % 1_000_000));
                writer.push(&EventRef {
                    video_id: &video_id,
                    event_type: "view",
                    ts_ms: receive_ms,
                    value: 1,
                    event_id: event_id.as_deref(),
                    viewer_id: viewer_id.as_deref(),
                });
            }
            writer.finish()
        })
        .collect()
}

/// Gathers every event of `records` into one file and encodes it: the time each took and
/// the file's size.
fn archive(records: &[Vec<u8>]) -> (Duration, Duration, usize) {
    let started = Instant::now();
    let mut file = FileBuilder::with_capacity(RECORDS * EVENTS_PER_RECORD);
    for (index, record) in records.iter().enumerate() {
        let reader = RecordReader::new(record).expect("a record just written");
        reader
            .for_each_event_bytes(|event| file.push(event, reader.receive_ms, 0, index as u64))
            .expect("a record just written");
    }
    let gathered = started.elapsed();
    let bytes = file.encode().expect("encoding the file").len();
    (gathered, started.elapsed() - gathered, bytes)
}

fn main() {
    let events = (RECORDS * EVENTS_PER_RECORD) as f64;
    let ns = |d: Duration| d.as_nanos() as f64 / events;
    // `cargo bench … -- viewer` runs only the cases whose name holds "viewer".
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with('-')).unwrap_or_default();
    for (name, with_ids) in [("no ids", false), ("event and viewer ids", true)] {
        if !name.contains(&filter) {
            continue;
        }
        let records = records(with_ids);
        let runs: Vec<_> = (0..RUNS).map(|_| archive(&records)).collect();
        let best = runs.iter().min_by_key(|(gather, encode, _)| *gather + *encode).expect("runs");
        let (gather, encode, bytes) = *best;
        println!(
            "{name}: {:.1} ns/event (decode and gather {:.1}, encode {:.1}), {:.2} bytes/event",
            ns(gather + encode),
            ns(gather),
            ns(encode),
            bytes as f64 / events
        );
    }
}
