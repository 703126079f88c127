//! `tally send`: stream events from a file (JSON lines or CSV) or stdin to the server in
//! batches, several in flight, with a progress bar.
//!
//! Never double counts: every batch carries an Idempotency-Key derived from the source, the
//! batch's byte offset and its content, so a batch retried after a timeout or a crash of
//! either side is recognised by the server. Resumable: after each acknowledged batch (in
//! order) the byte offset reached is written to `<FILE>.tally-progress`; a later run on the
//! same file starts from there. (Within the server's dedup window a resumed run would not
//! double count even without the progress file.)

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::client::Client;

#[derive(clap::Args)]
pub struct SendArgs {
    /// File of events (JSON lines, or CSV with header video_id,type,ts,value,event_id,viewer_id); `-` or absent: stdin
    file: Option<PathBuf>,
    /// Input format; by default .csv files are CSV and everything else JSON lines
    #[arg(long, value_enum)]
    format: Option<Format>,
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
    /// Server URL
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
    /// Hash of the file's first 64 KiB: a different file under the same name restarts.
    head_hash: u64,
    /// Bytes of the file whose events are acknowledged.
    offset: u64,
    events: u64,
    duplicates: u64,
}

const HEAD_BYTES: usize = 64 << 10;
/// Bytes read from the input at a time.
const READ_BUFFER_BYTES: usize = 1 << 20;
const CSV_HEADER: [&str; 6] = ["video_id", "type", "ts", "value", "event_id", "viewer_id"];

struct Batch {
    /// Byte offset just past the batch's last line.
    end_offset: u64,
    events: usize,
    body: Bytes,
    key: String,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=100_000).contains(&args.batch_size), "--batch-size must be 1 to 100000");
    anyhow::ensure!((1..=256).contains(&args.concurrency), "--concurrency must be 1 to 256");
    let client = Client::new(&args.server)?;
    let path = args.file.as_ref().filter(|p| p.as_os_str() != "-");
    let format = args.format.unwrap_or(match path {
        Some(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) => Format::Csv,
        _ => Format::Jsonl,
    });
    let (reader, total_bytes, head_hash, source_id): (Box<dyn Read + Send>, Option<u64>, u64, String) = match path {
        Some(p) => {
            let mut file = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let len = file.metadata()?.len();
            let mut head = vec![0; HEAD_BYTES];
            let n = read_full(&mut file, &mut head)?;
            head.truncate(n);
            let file = std::fs::File::open(p)?;
            (Box::new(file), Some(len), xxh3_64(&head), std::path::absolute(p)?.display().to_string())
        }
        None => (Box::new(std::io::stdin()), None, 0, format!("stdin-{}", std::process::id())),
    };
    let progress_path = path.map(|p| {
        let mut name = p.as_os_str().to_owned();
        name.push(".tally-progress");
        PathBuf::from(name)
    });
    let mut progress = Progress { head_hash, offset: 0, events: 0, duplicates: 0 };
    if let Some(pp) = &progress_path
        && !args.restart
        && let Ok(text) = std::fs::read_to_string(pp)
    {
        let saved: Progress = serde_json::from_str(&text).with_context(|| format!("reading {}", pp.display()))?;
        if saved.head_hash == head_hash {
            eprintln!(
                "resuming at byte {} ({} events already sent); --restart to start over",
                saved.offset, saved.events
            );
            progress = saved;
        } else {
            eprintln!("{} belongs to a different file; starting from the beginning", pp.display());
        }
    }

    let bar = match total_bytes {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta} left)").expect("valid template"),
        ),
        None => ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template")),
    };
    bar.set_position(progress.offset);
    bar.set_message(format!("{} events", progress.events));

    let (batch_tx, mut batch_rx) = tokio::sync::mpsc::channel::<anyhow::Result<Batch>>(args.concurrency);
    let start_offset = progress.offset;
    let batch_size = args.batch_size;
    let reader_task = tokio::task::spawn_blocking(move || {
        let result = read_batches(reader, format, start_offset, batch_size, &source_id, |batch| {
            batch_tx.blocking_send(Ok(batch)).is_ok()
        });
        if let Err(error) = result {
            let _ = batch_tx.blocking_send(Err(error));
        }
    });

    let mut in_flight: VecDeque<(Batch, tokio::task::JoinHandle<anyhow::Result<crate::client::Answer>>)> =
        VecDeque::new();
    let mut input_done = false;
    let mut events_sent = 0u64;
    loop {
        while !input_done && in_flight.len() < args.concurrency {
            match batch_rx.recv().await {
                Some(batch) => {
                    let batch = batch?;
                    let (client, body, key, attempts) =
                        (client.clone(), batch.body.clone(), batch.key.clone(), args.attempts);
                    let task = tokio::spawn(async move {
                        let headers = [("content-type", "application/x-ndjson"), ("idempotency-key", key.as_str())];
                        client.request_retrying(Method::POST, "/v1/events", &headers, body, attempts).await
                    });
                    in_flight.push_back((batch, task));
                }
                None => input_done = true,
            }
        }
        let Some((batch, task)) = in_flight.pop_front() else { break };
        let answer = task.await??;
        if !answer.status.is_success() {
            bar.abandon();
            bail!(
                "batch ending at byte {} was refused: {}\nnothing of it was counted; fix the input and run again to resume",
                batch.end_offset,
                answer.error_text()
            );
        }
        let outcome = answer.json()?;
        progress.offset = batch.end_offset;
        progress.events += outcome["accepted"].as_u64().unwrap_or(0);
        progress.duplicates += outcome["duplicates"].as_u64().unwrap_or(0);
        if let Some(pp) = &progress_path {
            save_progress(pp, &progress)?;
        }
        events_sent += batch.events as u64;
        bar.set_position(progress.offset);
        bar.set_message(format!("{} events", progress.events));
    }
    reader_task.await?;
    bar.finish();
    eprintln!(
        "sent {events_sent} events in this run; in all, {} events accepted, {} duplicates",
        progress.events, progress.duplicates
    );
    Ok(())
}

fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn save_progress(path: &Path, progress: &Progress) -> anyhow::Result<()> {
    let temporary = path.with_extension("tally-progress.tmp");
    std::fs::write(&temporary, serde_json::to_vec(progress)?)?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// Reads lines from `start_offset` on and cuts them into NDJSON batches.
fn read_batches(
    reader: Box<dyn Read + Send>,
    format: Format,
    start_offset: u64,
    batch_size: usize,
    source_id: &str,
    mut emit: impl FnMut(Batch) -> bool,
) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut offset = 0u64;
    let mut line = String::new();
    let mut line_number = 0u64;
    if format == Format::Csv {
        offset += reader.read_line(&mut line)? as u64;
        line_number += 1;
        let header: Vec<&str> = line.trim_end().split(',').map(str::trim).collect();
        anyhow::ensure!(header == CSV_HEADER, "CSV header must be {}, found {}", CSV_HEADER.join(","), line.trim_end());
    }
    let mut body = Vec::new();
    let mut events = 0;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        line_number += 1;
        if n > 0 && offset < start_offset {
            offset += n as u64;
            continue;
        }
        offset += n as u64;
        let text = line.trim_end_matches(['\n', '\r']);
        if n > 0 && !text.trim().is_empty() {
            match format {
                Format::Jsonl => body.extend_from_slice(text.as_bytes()),
                Format::Csv => csv_to_json(text, line_number, &mut body)?,
            }
            body.push(b'\n');
            events += 1;
        }
        if events > 0 && (events == batch_size || n == 0) {
            let content = std::mem::take(&mut body);
            let key =
                format!("send-{:032x}", xxh3_128(&[source_id.as_bytes(), &offset.to_le_bytes(), &content].concat()));
            if !emit(Batch { end_offset: offset, events, body: Bytes::from(content), key }) {
                return Ok(());
            }
            events = 0;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

fn csv_to_json(line: &str, line_number: u64, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(line.as_bytes());
    let record = reader
        .records()
        .next()
        .transpose()
        .with_context(|| format!("CSV line {line_number}"))?
        .with_context(|| format!("CSV line {line_number} is empty"))?;
    anyhow::ensure!(record.len() == 6, "CSV line {line_number} has {} fields, expected 6", record.len());
    let mut object = serde_json::Map::new();
    object.insert("video_id".into(), record[0].into());
    for (index, name) in [(1, "type"), (4, "event_id"), (5, "viewer_id")] {
        if !record[index].is_empty() {
            object.insert(name.into(), record[index].into());
        }
    }
    if !record[2].is_empty() {
        let ts = &record[2];
        object.insert("ts".into(), ts.parse::<i64>().map_or_else(|_| ts.into(), Into::into));
    }
    if !record[3].is_empty() {
        let value: i64 =
            record[3].parse().with_context(|| format!("CSV line {line_number}: value must be an integer"))?;
        object.insert("value".into(), value.into());
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
        let input = "video_id,type,ts,value,event_id,viewer_id\nv1,,1700000000000,5,e1,\n\"v,2\",like,2026-01-01T00:00:00Z,,,u\n";
        let all = batches(input, Format::Csv, 0, 10);
        let lines: Vec<serde_json::Value> = all[0].2.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"video_id": "v1", "ts": 1700000000000i64, "value": 5, "event_id": "e1"})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"video_id": "v,2", "type": "like", "ts": "2026-01-01T00:00:00Z", "viewer_id": "u"})
        );
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
