//! `tally send`: stream events from a file (JSON lines or CSV) or stdin to the server in
//! batches, several in flight, with a progress bar, through `tally-client`'s `Api`
//! (timeouts, retries with backoff and full jitter after `Retry-After`, circuit breaker).
//!
//! Never double counts: every batch carries an Idempotency-Key derived from the source
//! (the file's absolute path, or `--source-id`), the batch's byte offset and its content,
//! so a batch retried after a timeout or a crash of either side, or sent again by a rerun
//! within the server's dedup window, is recognised by the server. Resumable and
//! append-aware: after each acknowledged batch (in order) the byte offset reached is written
//! to `<FILE>.tally-progress` with a hash of the bytes before it; a later run on the same
//! file (or the same file with lines appended) starts from there and sends only what is
//! new. A file whose sent part changed is a different file: it is sent from the start.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::client::{Api, api};

#[derive(clap::Args)]
pub struct SendArgs {
    /// File of events (JSON lines, or CSV with a header naming any of the columns video_id,
    /// type, ts, value, event_id, viewer_id in any order); `-` or absent: stdin
    file: Option<PathBuf>,
    /// Input format; by default .csv files are CSV and everything else JSON lines
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The source's name in its batches' Idempotency-Keys [default: the file's absolute
    /// path]. Name a stdin source to have a rerun of the same input recognised
    #[arg(long)]
    source_id: Option<String>,
    /// Events per request
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Requests in flight at once
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Attempts per batch before giving up (429, 503 and connection errors are retried)
    #[arg(long, default_value_t = 20)]
    attempts: u32,
    /// Ignore and overwrite an existing progress file: start from the beginning
    #[arg(long)]
    restart: bool,
    /// Server URL (http:// or https://)
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Jsonl,
    Csv,
}

/// What `<FILE>.tally-progress` holds.
#[derive(Serialize, Deserialize)]
struct Progress {
    /// Hash of the file's bytes before `offset` (at most `PREFIX_HASH_BYTES` of them at
    /// its start and as many just before `offset`): the same file, or the same file with
    /// lines appended, hashes the same; any other file does not.
    prefix_hash: u64,
    /// Bytes of the file whose events are acknowledged.
    offset: u64,
    events: u64,
    duplicates: u64,
}

/// Bytes hashed at the start of the file and before the offset reached.
const PREFIX_HASH_BYTES: u64 = 64 << 10;
/// Bytes read from the input at a time.
const READ_BUFFER_BYTES: usize = 1 << 20;
/// The columns a CSV header may name.
const CSV_COLUMNS: [&str; 6] = ["video_id", "type", "ts", "value", "event_id", "viewer_id"];

struct Batch {
    /// Byte offset just past the batch's last line.
    end_offset: u64,
    events: usize,
    body: Bytes,
    key: String,
}

/// The input: a file (with its progress file) or stdin.
struct Source {
    reader: Box<dyn Read + Send>,
    /// The file, for its size and the hashes of its sent part.
    file: Option<(std::fs::File, PathBuf)>,
    id: String,
    format: Format,
}

impl Source {
    fn open(args: &SendArgs) -> anyhow::Result<Source> {
        let path = args.file.as_ref().filter(|p| p.as_os_str() != "-");
        let format = args.format.unwrap_or(match path {
            Some(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) => Format::Csv,
            _ => Format::Jsonl,
        });
        let Some(path) = path else {
            let id = args.source_id.clone().unwrap_or_else(|| format!("stdin-{}", std::process::id()));
            return Ok(Source { reader: Box::new(std::io::stdin()), file: None, id, format });
        };
        let open = || std::fs::File::open(path).with_context(|| format!("opening {}", path.display()));
        let mut name = path.as_os_str().to_owned();
        name.push(".tally-progress");
        let id = match &args.source_id {
            Some(id) => id.clone(),
            None => std::path::absolute(path)?.display().to_string(),
        };
        Ok(Source { reader: Box::new(open()?), file: Some((open()?, PathBuf::from(name))), id, format })
    }

    /// Hash of the bytes before `offset`: the first and the last `PREFIX_HASH_BYTES` of them.
    fn prefix_hash(file: &mut std::fs::File, offset: u64) -> anyhow::Result<u64> {
        let mut bytes = offset.to_le_bytes().to_vec();
        for start in [0, offset.saturating_sub(PREFIX_HASH_BYTES)] {
            file.seek(std::io::SeekFrom::Start(start))?;
            let length = (offset - start).min(PREFIX_HASH_BYTES);
            let read = file.by_ref().take(length).read_to_end(&mut bytes)?;
            anyhow::ensure!(read as u64 == length, "the file is shorter than {offset} bytes");
        }
        Ok(xxh3_64(&bytes))
    }

    /// Where to start: the saved progress if it belongs to this file (appended to or not).
    fn progress(&mut self, restart: bool) -> anyhow::Result<Progress> {
        let fresh = Progress { prefix_hash: 0, offset: 0, events: 0, duplicates: 0 };
        let Some((file, progress_path)) = &mut self.file else { return Ok(fresh) };
        let Ok(text) = std::fs::read_to_string(&*progress_path) else { return Ok(fresh) };
        if restart {
            return Ok(fresh);
        }
        let saved: Progress =
            serde_json::from_str(&text).with_context(|| format!("reading {}", progress_path.display()))?;
        let same = file.metadata()?.len() >= saved.offset
            && Source::prefix_hash(file, saved.offset).is_ok_and(|hash| hash == saved.prefix_hash);
        if !same {
            eprintln!("{} belongs to a different file; starting from the beginning", progress_path.display());
            return Ok(fresh);
        }
        eprintln!("resuming at byte {} ({} events already sent); --restart to start over", saved.offset, saved.events);
        Ok(saved)
    }

    /// Records that everything before `progress.offset` is acknowledged.
    fn save(&mut self, progress: &mut Progress) -> anyhow::Result<()> {
        let Some((file, path)) = &mut self.file else { return Ok(()) };
        progress.prefix_hash = Source::prefix_hash(file, progress.offset)?;
        let temporary = path.with_extension("tally-progress.tmp");
        std::fs::write(&temporary, serde_json::to_vec(progress)?)?;
        std::fs::rename(&temporary, &*path).with_context(|| format!("writing {}", path.display()))
    }
}

fn progress_bar(total_bytes: Option<u64>, progress: &Progress) -> ProgressBar {
    let bar = match total_bytes {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta} left)").expect("valid template"),
        ),
        None => ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template")),
    };
    bar.set_position(progress.offset);
    bar.set_message(format!("{} events", progress.events));
    bar
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=100_000).contains(&args.batch_size), "--batch-size must be 1 to 100000");
    anyhow::ensure!((1..=256).contains(&args.concurrency), "--concurrency must be 1 to 256");
    anyhow::ensure!(args.attempts >= 1, "--attempts must be at least 1");
    let client = api(&args.server, None, args.attempts)?;
    let mut source = Source::open(&args)?;
    let mut progress = source.progress(args.restart)?;
    let total_bytes = match &source.file {
        Some((file, _)) => Some(file.metadata()?.len()),
        None => None,
    };
    let bar = progress_bar(total_bytes, &progress);
    let (batch_tx, batch_rx) = tokio::sync::mpsc::channel::<anyhow::Result<Batch>>(args.concurrency);
    let (start_offset, batch_size, format, id) = (progress.offset, args.batch_size, source.format, source.id.clone());
    let reader = std::mem::replace(&mut source.reader, Box::new(std::io::empty()));
    let reader_task = tokio::task::spawn_blocking(move || {
        let result = read_batches(reader, format, start_offset, batch_size, &id, |batch| {
            batch_tx.blocking_send(Ok(batch)).is_ok()
        });
        if let Err(error) = result {
            let _ = batch_tx.blocking_send(Err(error));
        }
    });
    let events_sent = pipeline(&client, args.concurrency, batch_rx, &mut source, &mut progress, &bar).await?;
    reader_task.await?;
    bar.finish();
    eprintln!(
        "sent {events_sent} events in this run; in all, {} events accepted, {} duplicates",
        progress.events, progress.duplicates
    );
    Ok(())
}

/// Posts batches, `concurrency` at a time, and records each acknowledgement in order.
async fn pipeline(
    client: &Api,
    concurrency: usize,
    mut batches: tokio::sync::mpsc::Receiver<anyhow::Result<Batch>>,
    source: &mut Source,
    progress: &mut Progress,
    bar: &ProgressBar,
) -> anyhow::Result<u64> {
    type Sent = tokio::task::JoinHandle<Result<tally_client::Ack, tally_client::Error>>;
    let mut in_flight: VecDeque<(Batch, Sent)> = VecDeque::new();
    let mut input_done = false;
    let mut events_sent = 0u64;
    loop {
        while !input_done && in_flight.len() < concurrency {
            match batches.recv().await {
                Some(batch) => {
                    let batch = batch?;
                    let (client, body, key) = (client.clone(), batch.body.clone(), batch.key.clone());
                    in_flight.push_back((batch, tokio::spawn(async move { client.post_events(body, &key).await })));
                }
                None => input_done = true,
            }
        }
        let Some((batch, task)) = in_flight.pop_front() else { return Ok(events_sent) };
        let ack = match task.await? {
            Ok(ack) => ack,
            Err(error) => {
                bar.abandon();
                bail!(
                    "batch ending at byte {} was not acknowledged: {error}\nnothing after the last acknowledged batch is recorded as sent; run again to resume",
                    batch.end_offset
                );
            }
        };
        progress.offset = batch.end_offset;
        progress.events += ack.accepted;
        progress.duplicates += ack.duplicates;
        source.save(progress)?;
        events_sent += batch.events as u64;
        bar.set_position(progress.offset);
        bar.set_message(format!("{} events", progress.events));
    }
}

/// Cuts event lines into NDJSON batches and hands each to `emit` (false: stop reading).
struct Cutter<'a, F> {
    body: Vec<u8>,
    events: usize,
    /// Byte offset just past the last event taken.
    end: u64,
    batch_size: usize,
    source_id: &'a str,
    emit: F,
}

impl<F: FnMut(Batch) -> bool> Cutter<'_, F> {
    fn push(&mut self, end: u64, event: &[u8]) -> bool {
        self.body.extend_from_slice(event);
        self.body.push(b'\n');
        self.events += 1;
        self.end = end;
        self.events < self.batch_size || self.cut()
    }

    fn cut(&mut self) -> bool {
        if self.events == 0 {
            return true;
        }
        let content = std::mem::take(&mut self.body);
        let key =
            format!("send-{:032x}", xxh3_128(&[self.source_id.as_bytes(), &self.end.to_le_bytes(), &content].concat()));
        let batch =
            Batch { end_offset: self.end, events: std::mem::take(&mut self.events), body: Bytes::from(content), key };
        (self.emit)(batch)
    }
}

/// Reads events from `start_offset` on and cuts them into NDJSON batches.
fn read_batches(
    reader: Box<dyn Read + Send>,
    format: Format,
    start_offset: u64,
    batch_size: usize,
    source_id: &str,
    emit: impl FnMut(Batch) -> bool,
) -> anyhow::Result<()> {
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut cutter = Cutter { body: Vec::new(), events: 0, end: 0, batch_size, source_id, emit };
    let more = match format {
        Format::Jsonl => read_jsonl(reader, start_offset, &mut cutter)?,
        Format::Csv => read_csv(reader, start_offset, &mut cutter)?,
    };
    if more {
        cutter.cut();
    }
    Ok(())
}

/// Each non-blank line is an event, sent as it is (the server validates it).
fn read_jsonl<F: FnMut(Batch) -> bool>(
    mut reader: impl BufRead,
    start_offset: u64,
    cutter: &mut Cutter<'_, F>,
) -> anyhow::Result<bool> {
    let mut line = Vec::new();
    let mut offset = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(true);
        }
        let start = offset;
        offset += n as u64;
        let text = line.trim_ascii();
        // A line is sent once: by where it starts, so a last line without a newline that
        // was sent is not sent again once the file grows past it.
        if start >= start_offset && !text.is_empty() && !cutter.push(offset, text) {
            return Ok(false);
        }
    }
}

/// A CSV file whose header names any of `CSV_COLUMNS`, in any order.
fn read_csv<F: FnMut(Batch) -> bool>(
    reader: impl Read,
    start_offset: u64,
    cutter: &mut Cutter<'_, F>,
) -> anyhow::Result<bool> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(reader);
    let columns = csv_columns(reader.headers().context("reading the CSV header")?)?;
    let mut record = csv::StringRecord::new();
    let mut event = Vec::new();
    while reader.read_record(&mut record).context("reading CSV")? {
        let end = reader.position().byte();
        // By where the record starts, as for JSON lines.
        if record.position().map_or(0, csv::Position::byte) < start_offset {
            continue;
        }
        let line = record.position().map_or(0, csv::Position::line);
        event.clear();
        csv_to_json(&record, &columns, &mut event).with_context(|| format!("CSV line {line}"))?;
        if !cutter.push(end, &event) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The event field of each column of `header`.
fn csv_columns(header: &csv::StringRecord) -> anyhow::Result<Vec<&'static str>> {
    let mut columns = Vec::new();
    for name in header {
        let name = name.trim();
        let Some(field) = CSV_COLUMNS.iter().find(|c| **c == name) else {
            bail!("CSV column {name:?} is not an event field; a header names any of {}", CSV_COLUMNS.join(","))
        };
        anyhow::ensure!(!columns.contains(field), "CSV column {name:?} appears twice in the header");
        columns.push(*field);
    }
    anyhow::ensure!(columns.contains(&"video_id"), "the CSV header has no video_id column");
    Ok(columns)
}

/// One CSV record as a JSON event; empty cells are absent fields.
fn csv_to_json(record: &csv::StringRecord, columns: &[&str], out: &mut Vec<u8>) -> anyhow::Result<()> {
    anyhow::ensure!(record.len() == columns.len(), "{} fields, the header has {}", record.len(), columns.len());
    let mut object = serde_json::Map::new();
    for (field, cell) in columns.iter().zip(record) {
        if cell.is_empty() {
            continue;
        }
        let value = match *field {
            "ts" => cell.parse::<i64>().map_or_else(|_| cell.into(), Into::into),
            "value" => cell.parse::<i64>().with_context(|| format!("value must be an integer, found {cell:?}"))?.into(),
            _ => cell.into(),
        };
        object.insert((*field).into(), value);
    }
    serde_json::to_writer(&mut *out, &object)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(input: &str, format: Format, start: u64, size: usize) -> Vec<(u64, usize, String)> {
        let mut out = Vec::new();
        read_batches(Box::new(std::io::Cursor::new(input.as_bytes().to_vec())), format, start, size, "t", |b| {
            out.push((b.end_offset, b.events, String::from_utf8(b.body.to_vec()).unwrap()));
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn batches_cut_at_size_and_resume_at_offset() {
        let input = "{\"video_id\":\"a\"}\n{\"video_id\":\"b\"}\n\n{\"video_id\":\"c\"}\n";
        let all = batches(input, Format::Jsonl, 0, 2);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].1, 2);
        assert_eq!(all[1], (input.len() as u64, 1, "{\"video_id\":\"c\"}\n".into()));
        let resumed = batches(input, Format::Jsonl, all[0].0, 2);
        assert_eq!(resumed, all[1..]);
    }

    #[test]
    fn csv_rows_become_events() {
        let input = "video_id,type,ts,value,event_id,viewer_id\nv1,,1700000000000,5,e1,\n\"v,\n2\",like,2026-01-01T00:00:00Z,,,u\n";
        let all = batches(input, Format::Csv, 0, 10);
        let lines: Vec<serde_json::Value> = all[0].2.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"video_id": "v1", "ts": 1700000000000i64, "value": 5, "event_id": "e1"})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"video_id": "v,\n2", "type": "like", "ts": "2026-01-01T00:00:00Z", "viewer_id": "u"})
        );
    }

    #[test]
    fn a_last_line_without_a_newline_is_not_sent_again_once_the_file_grows() {
        for (format, before, after) in [
            (Format::Jsonl, "{\"video_id\":\"a\"}", "{\"video_id\":\"a\"}\n{\"video_id\":\"b\"}\n"),
            (Format::Csv, "video_id\na", "video_id\na\nb\n"),
        ] {
            let first = batches(before, format, 0, 10);
            assert_eq!(first.len(), 1);
            let resumed = batches(after, format, first[0].0, 10);
            assert_eq!(resumed.len(), 1, "{resumed:?}");
            assert_eq!(resumed[0].1, 1, "only the new line: {resumed:?}");
            assert!(resumed[0].2.contains("\"b\""), "{resumed:?}");
        }
    }

    #[test]
    fn csv_header_names_any_subset_in_any_order_and_resumes_by_record() {
        let input = "ts,video_id\n1700000000000,a\n,b\n";
        let all = batches(input, Format::Csv, 0, 1);
        let events: Vec<serde_json::Value> = all.iter().map(|b| serde_json::from_str(b.2.trim()).unwrap()).collect();
        assert_eq!(
            events,
            [serde_json::json!({"video_id": "a", "ts": 1700000000000i64}), serde_json::json!({"video_id": "b"})]
        );
        assert_eq!(batches(input, Format::Csv, all[0].0, 1), all[1..]);
    }

    #[test]
    fn a_csv_header_with_an_unknown_or_repeated_column_or_no_video_id_is_refused() {
        let read = |input: &str| {
            read_batches(Box::new(std::io::Cursor::new(input.as_bytes().to_vec())), Format::Csv, 0, 10, "t", |_| true)
                .unwrap_err()
                .to_string()
        };
        assert!(read("video_id,kind\na,b\n").contains("\"kind\" is not an event field"));
        assert!(read("video_id,ts,ts\na,1,2\n").contains("appears twice"));
        assert!(read("type,ts\nview,1\n").contains("no video_id"));
    }

    #[test]
    fn keys_differ_per_batch_and_repeat_per_content() {
        let input = "{\"video_id\":\"a\"}\n{\"video_id\":\"a\"}\n";
        let mut keys = Vec::new();
        for _ in 0..2 {
            read_batches(Box::new(std::io::Cursor::new(input.as_bytes().to_vec())), Format::Jsonl, 0, 1, "t", |b| {
                keys.push(b.key);
                true
            })
            .unwrap();
        }
        assert_ne!(keys[0], keys[1], "identical lines at different offsets are different batches");
        assert_eq!(keys[0..2], keys[2..4], "the same batch gets the same key again");
    }
}
