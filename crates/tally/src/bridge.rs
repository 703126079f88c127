//! `tally bridge`: events a platform already has in a Kafka topic of its own (any
//! partitioning), re-partitioned into tally's topic, exactly once.
//!
//! Each source message is a JSON event or array of events, decoded and checked as
//! `POST /v1/events` does. An event without `event_id` gets one derived from where it was
//! read (`<topic>/<partition>/<offset>/<index>`), so a replay after a crash is
//! deduplicated by the partition owners like any retry. The source offsets are committed
//! only after every record made from the messages before them is acknowledged in tally's
//! topic (`acks=all`). A message that does not decode goes to `<topic>-dlq` with the
//! reason and its source topic, partition and offset, and is committed past.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tally_core::event::EVENT_ID_BYTES_MAX;
use tally_core::log::{LogError, PartitionLog};
use tally_core::{Limits, RecordWriter, partition_of};
use tally_kafka::{Producer, Source, SourceMessage};

use crate::config::TOPIC_DEFAULT;

/// Events one source message may hold.
const EVENTS_PER_MESSAGE_MAX: usize = 100_000;
/// A batch is appended once it holds this many record bytes, or is this old.
const BATCH_BYTES_MAX: usize = 4 << 20;
const BATCH_AGE_MAX: Duration = Duration::from_millis(200);
/// Wait before appending a batch again after the broker failed it.
const APPEND_RETRY: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct BridgeArgs {
    /// Kafka brokers, host:port[,host:port…]
    #[arg(long)]
    kafka: String,
    /// The platform's topic to read
    #[arg(long)]
    from_topic: String,
    /// tally's topic (made by `tally cluster init`)
    #[arg(long, default_value = TOPIC_DEFAULT)]
    topic: String,
    /// How source messages are encoded: `json` (one event object, or an array of them)
    #[arg(long, default_value = "json", value_parser = ["json"])]
    format: String,
    /// The consumer group the bridge reads in [default: tally-bridge-<from-topic>]
    #[arg(long)]
    group: Option<String>,
}

pub fn run(args: BridgeArgs) -> anyhow::Result<()> {
    crate::serve::init_logging(crate::config::LogFormat::Text);
    let partitions = tally_kafka::topic_partitions(&args.kafka, &args.topic)?;
    anyhow::ensure!(partitions > 0, "topic {} does not exist: run `tally cluster init` first", args.topic);
    let group = args.group.unwrap_or_else(|| format!("tally-bridge-{}", args.from_topic));
    let source = Source::new(&args.kafka, &args.from_topic, &group)?;
    let producer = Producer::new(&args.kafka, &args.topic)?;
    let logs = producer.partition_logs(partitions as u32);
    let stop = stop_flag()?;
    tracing::info!(from = %args.from_topic, to = %args.topic, %group, "bridge running");
    let mut bridge = Bridge {
        source,
        producer,
        logs,
        limits: Limits::default(),
        batch: Batch::default(),
        totals: Totals::default(),
    };
    let mut last_report = Instant::now();
    while !stop.load(Ordering::Acquire) {
        match bridge.source.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => bridge.add(&message)?,
            Some(Err(error)) => tracing::warn!(%error, "reading the source topic"),
            None => {}
        }
        if bridge.batch.is_due() {
            bridge.flush()?;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            bridge.totals.report();
        }
    }
    bridge.flush()?;
    bridge.totals.report();
    Ok(())
}

/// SIGTERM or SIGINT sets the flag: the bridge appends what it holds, commits and exits.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            flag.store(true, Ordering::Release);
        });
    });
    Ok(stop)
}

#[derive(Default)]
struct Totals {
    messages: u64,
    events: u64,
    dead_letters: u64,
}

impl Totals {
    fn report(&self) {
        tracing::info!(messages = self.messages, events = self.events, dead_letters = self.dead_letters, "bridged");
    }
}

/// Records read and not yet appended, and the source offsets they reach.
#[derive(Default)]
struct Batch {
    records: BTreeMap<u32, Vec<Vec<u8>>>,
    bytes: usize,
    /// Per source partition, the offset after the last message taken.
    next: BTreeMap<i32, i64>,
    since: Option<Instant>,
}

impl Batch {
    fn is_due(&self) -> bool {
        self.bytes >= BATCH_BYTES_MAX || self.since.is_some_and(|since| since.elapsed() >= BATCH_AGE_MAX)
    }

    fn took(&mut self, message: &SourceMessage) {
        self.next.insert(message.partition, message.offset + 1);
        self.since.get_or_insert_with(Instant::now);
    }
}

struct Bridge {
    source: Source,
    producer: Producer,
    logs: Vec<Box<dyn PartitionLog>>,
    limits: Limits,
    batch: Batch,
    totals: Totals,
}

impl Bridge {
    /// Takes one source message into the batch: its events as one record per tally
    /// partition, or the message to the dead-letter topic.
    fn add(&mut self, message: &SourceMessage) -> anyhow::Result<()> {
        self.totals.messages += 1;
        let receive_ms = crate::now_ms();
        let decoded = std::str::from_utf8(&message.payload)
            .map_err(|e| format!("invalid_utf8: not UTF-8 at byte {}", e.valid_up_to()))
            .and_then(|text| tally_server::decode_events(text, &self.limits, receive_ms, EVENTS_PER_MESSAGE_MAX));
        let events = match decoded {
            Ok(events) => events,
            Err(reason) => {
                self.dead_letter(message, &reason)?;
                self.batch.took(message);
                return Ok(());
            }
        };
        let partitions = self.logs.len() as u32;
        let mut records: BTreeMap<u32, RecordWriter> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            let derived;
            let mut event = event.as_ref();
            if event.event_id.is_none() {
                derived = source_event_id(self.source.topic(), message, index);
                event.event_id = Some(&derived);
            }
            let partition = partition_of(event.video_id, partitions);
            records.entry(partition).or_insert_with(|| RecordWriter::new(receive_ms, None, 256)).push(&event);
        }
        for (partition, record) in records {
            let record = record.finish();
            self.batch.bytes += record.len();
            self.batch.records.entry(partition).or_default().push(record);
        }
        self.totals.events += events.len() as u64;
        self.batch.took(message);
        Ok(())
    }

    fn dead_letter(&mut self, message: &SourceMessage, reason: &str) -> anyhow::Result<()> {
        tracing::warn!(partition = message.partition, offset = message.offset, reason, "dead-lettered");
        let (partition, offset) = (message.partition as u32, message.offset as u64);
        self.producer
            .dead_letter_from(self.source.topic(), partition, offset, &message.payload, reason)
            .context("writing to the dead-letter topic")?;
        self.totals.dead_letters += 1;
        Ok(())
    }

    /// Appends the batch (retrying until the broker takes it: every event carries an id,
    /// so a repeat counts nothing), then commits the source offsets it reaches.
    fn flush(&mut self) -> anyhow::Result<()> {
        for (partition, records) in std::mem::take(&mut self.batch.records) {
            let records: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
            while let Err(error) = self.logs[partition as usize].append(&records) {
                if let LogError::Failed { .. } = error {
                    return Err(error).context("appending to tally's topic");
                }
                tracing::warn!(partition, %error, "appending to tally's topic failed; retrying");
                std::thread::sleep(APPEND_RETRY);
            }
        }
        let next: Vec<(i32, i64)> = std::mem::take(&mut self.batch.next).into_iter().collect();
        if !next.is_empty() {
            self.source.commit(&next).context("committing the source offsets")?;
        }
        self.batch = Batch::default();
        Ok(())
    }
}

/// `<topic>/<partition>/<offset>/<index>`, or with the topic hashed when that is too long
/// for an event id.
fn source_event_id(topic: &str, message: &SourceMessage, index: usize) -> String {
    let id = format!("{topic}/{}/{}/{index}", message.partition, message.offset);
    if id.len() <= EVENT_ID_BYTES_MAX {
        return id;
    }
    let hash = xxhash_rust::xxh3::xxh3_64(topic.as_bytes());
    format!("{hash:016x}/{}/{}/{index}", message.partition, message.offset)
}
