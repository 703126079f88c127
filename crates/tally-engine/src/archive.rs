//! Feeding the raw-event archive (`tally-archive`): every counted event, once.
//!
//! The flusher notes, before each checkpoint moves, which events of the flushed frames were
//! not counted (`note`: duplicates and repeated requests, rare, appended to a small file per
//! partition and fsync-ed). The archiver thread then reads the log's frames behind the
//! store's checkpoint (`tally_wal::read_frames`), leaves the noted events out, and writes
//! one Parquet file per round: `[archived, end)` of one partition, never across a receive
//! hour. The archive's own checkpoint is the largest end offset among its files, so a file
//! written just before a crash is found at the next start instead of written twice, and log
//! segments are deleted only behind both checkpoints (`Shared::forget_limit`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tally_archive::{Archive, FileBuilder, FileKey};
use tally_core::RecordReader;
use tally_wal::WalError;

use crate::partition::{Partition, Uncounted};
use crate::{Clock, EngineConfig};

/// Rows one round writes at most: one file's memory (a few bytes per row, encoded).
const ROUND_ROWS_MAX: usize = 4 * tally_archive::ROW_GROUP_ROWS;
/// Bytes of one note: frame end offset, record index, event index.
const NOTE_BYTES: usize = 16;
/// A notes file larger than this is rewritten without the notes already archived.
const NOTES_COMPACT_BYTES: u64 = 4 << 20;
/// How often the archiver looks for files past their retention.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// How often the archiver looks for frames behind the checkpoints.
pub(crate) const ARCHIVE_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Archiver {
    archive: Archive,
    /// Raw events are purged, in whole files, once their receive hour is this old; never
    /// when `None`.
    retention_ms: Option<i64>,
    clock: Clock,
    wal_root: PathBuf,
    notes_dir: PathBuf,
    /// Per partition: every counted event before this log offset is archived.
    archived: Vec<AtomicU64>,
    /// Per partition: the flusher's appends and the archiver's compaction, one at a time.
    notes: Vec<Mutex<()>>,
    /// Per partition: one round at a time (the archiver thread's, or a recompute's
    /// catching up), so that two never write overlapping ranges.
    rounds: Vec<Mutex<()>>,
    /// Why the last pass over the partitions failed, until one succeeds (`/readyz`).
    trouble: Mutex<Option<String>>,
}

/// How the archive is doing, for `/readyz` and the metrics.
#[derive(Debug, Clone)]
pub struct ArchiveStatus {
    /// Why archiving fails, while it does (the log keeps what is not archived).
    pub error: Option<String>,
    /// Log bytes checkpointed in the store but not archived yet, all partitions together.
    pub lag_bytes: u64,
}

impl Archiver {
    /// Opens the archive at `location` for the log under `config.data_dir`, whose
    /// partitions' store checkpoints are `checkpoints`.
    pub(crate) fn open(location: &str, config: &EngineConfig, checkpoints: &[u64]) -> Result<Archiver, String> {
        let (data_dir, now_ms) = (&config.data_dir, config.clock.now_ms());
        let archive = Archive::open(location).map_err(|e| e.to_string())?;
        let mut archived: Vec<u64> = checkpoints.to_vec();
        let mut seen = vec![false; checkpoints.len()];
        for file in archive.files().map_err(|e| e.to_string())? {
            let Some(slot) = archived.get_mut(file.partition as usize) else { continue };
            *slot = if seen[file.partition as usize] { (*slot).max(file.end_offset) } else { file.end_offset };
            seen[file.partition as usize] = true;
        }
        // A partition archived for the first time starts at its checkpoint (what came
        // before has no notes to go by); an empty file records where, so that a crash
        // before its first round does not move the start.
        for (partition, offset) in archived.iter().enumerate().filter(|(p, _)| !seen[*p]) {
            let path = FileKey::of(partition as u32, now_ms).path(*offset, *offset);
            let empty = FileBuilder::default().encode().map_err(|e| e.to_string())?;
            archive.put(&path, empty).map_err(|e| format!("writing {path}: {e}"))?;
        }
        let notes_dir = data_dir.join("archive-notes");
        std::fs::create_dir_all(&notes_dir).map_err(|e| format!("{}: {e}", notes_dir.display()))?;
        Ok(Archiver {
            archive,
            retention_ms: config.archive_retention_days.map(|days| i64::from(days) * DAY_MS),
            clock: config.clock.clone(),
            wal_root: data_dir.join("wal"),
            notes_dir,
            archived: archived.into_iter().map(AtomicU64::new).collect(),
            notes: checkpoints.iter().map(|_| Mutex::new(())).collect(),
            rounds: checkpoints.iter().map(|_| Mutex::new(())).collect(),
            trouble: Mutex::new(None),
        })
    }

    pub(crate) fn archive(&self) -> &Archive {
        &self.archive
    }

    pub(crate) fn archived(&self, partition: u32) -> u64 {
        self.archived[partition as usize].load(Ordering::Acquire)
    }

    pub(crate) fn status(&self, partitions: &[Arc<Partition>]) -> ArchiveStatus {
        let lag_bytes = partitions
            .iter()
            .map(|p| p.checkpoint_offset.load(Ordering::Acquire).saturating_sub(self.archived(p.index)))
            .sum();
        ArchiveStatus { error: self.trouble.lock().clone(), lag_bytes }
    }

    /// Records why archiving stopped or fails; `None` once it works again.
    pub(crate) fn set_trouble(&self, trouble: Option<String>) {
        metrics::gauge!("tally_archive_failing").set(if trouble.is_some() { 1.0 } else { 0.0 });
        *self.trouble.lock() = trouble;
    }

    fn notes_path(&self, partition: u32) -> PathBuf {
        self.notes_dir.join(format!("p{partition:03}"))
    }

    /// Records `uncounted` durably, before the checkpoint passes their frames.
    pub(crate) fn note(&self, partition: u32, uncounted: &[Uncounted]) -> std::io::Result<()> {
        if uncounted.is_empty() {
            return Ok(());
        }
        let _held = self.notes[partition as usize].lock();
        let bytes: Vec<u8> = uncounted.iter().flat_map(encode).collect();
        let mut file = OpenOptions::new().create(true).append(true).open(self.notes_path(partition))?;
        file.write_all(&bytes)?;
        file.sync_data()
    }

    /// The notes of frames ending in `(from, to]`.
    fn noted(&self, partition: u32, from: u64, to: u64) -> std::io::Result<HashSet<Uncounted>> {
        let _held = self.notes[partition as usize].lock();
        self.read_notes(partition, from, to)
    }

    /// `noted`, with the partition's notes lock held by the caller.
    fn read_notes(&self, partition: u32, from: u64, to: u64) -> std::io::Result<HashSet<Uncounted>> {
        let mut bytes = Vec::new();
        match File::open(self.notes_path(partition)) {
            Ok(mut file) => file.read_to_end(&mut bytes)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => return Err(error),
        };
        Ok(bytes.chunks_exact(NOTE_BYTES).map(decode).filter(|n| n.frame > from && n.frame <= to).collect())
    }

    /// Rewrites a large notes file without the notes of archived frames, holding the notes
    /// lock throughout so that no note the flusher appends meanwhile is lost.
    fn compact_notes(&self, partition: u32) -> std::io::Result<()> {
        let path = self.notes_path(partition);
        if std::fs::metadata(&path).map_or(0, |m| m.len()) < NOTES_COMPACT_BYTES {
            return Ok(());
        }
        let _held = self.notes[partition as usize].lock();
        let keep = self.read_notes(partition, self.archived(partition), u64::MAX)?;
        let temporary = path.with_extension("new");
        let bytes: Vec<u8> = keep.iter().flat_map(encode).collect();
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        std::fs::rename(&temporary, &path)?;
        File::open(&self.notes_dir)?.sync_all()
    }

    /// Archives the next stretch of `partition`'s log behind `checkpoint`: true if it wrote
    /// a file, false if there was nothing to archive.
    pub(crate) fn round(&self, partition: u32, checkpoint: u64) -> Result<bool, String> {
        let _round = self.rounds[partition as usize].lock();
        let from = self.archived(partition);
        if from >= checkpoint {
            return Ok(false);
        }
        let noted = self.noted(partition, from, checkpoint).map_err(|e| format!("reading the archive notes: {e}"))?;
        let wal_dir = self.wal_root.join(format!("p{partition:03}"));
        let mut round = Round { partition, noted: &noted, builder: FileBuilder::default(), hour: None, end: from };
        let mut failed = None;
        let read = tally_wal::read_frames(&wal_dir, from, checkpoint, |end, records| match round.take(end, records) {
            Ok(more) => more,
            Err(error) => {
                failed = Some(error);
                false
            }
        });
        match read {
            Err(WalError::Missing { detail, .. }) => return Err(self.skip_lost(partition, from, checkpoint, &detail)),
            Err(error) => return Err(error.to_string()),
            Ok(()) => {}
        }
        if let Some(error) = failed {
            return Err(error);
        }
        let Round { builder, hour, end, .. } = round;
        let Some(hour) = hour else { return Ok(false) };
        let (events, path) = (builder.rows(), FileKey { partition, hour_ms: hour }.path(from, end));
        let bytes = builder.encode().map_err(|e| e.to_string())?;
        self.archive.put(&path, bytes).map_err(|e| format!("writing {path}: {e}"))?;
        self.archived[partition as usize].store(end, Ordering::Release);
        metrics::counter!("tally_archive_files_total").increment(1);
        metrics::counter!("tally_archive_events_total").increment(events as u64);
        if let Err(error) = self.compact_notes(partition) {
            tracing::warn!(partition, %error, "compacting the archive notes failed; retried after the next round");
        }
        Ok(true)
    }

    /// The log no longer holds `from` (segments deleted while archiving was off): the
    /// archive goes on from the checkpoint, and says what it lacks.
    fn skip_lost(&self, partition: u32, from: u64, checkpoint: u64, detail: &str) -> String {
        self.archived[partition as usize].store(checkpoint, Ordering::Release);
        metrics::counter!("tally_archive_gaps_total").increment(1);
        format!(
            "partition {partition}: the log no longer holds offsets {from} to {checkpoint} ({detail}); the archive lacks them"
        )
    }

    /// Deletes the files whose receive hour ended more than the retention ago, but never a
    /// partition's newest file (its end offset is where archiving resumes); how many.
    fn purge(&self) -> Result<usize, String> {
        let Some(retention_ms) = self.retention_ms else { return Ok(0) };
        let cutoff = self.clock.now_ms() - retention_ms;
        let files = self.archive.files().map_err(|e| e.to_string())?;
        let mut newest: HashMap<u32, u64> = HashMap::new();
        for file in &files {
            let end = newest.entry(file.partition).or_default();
            *end = (*end).max(file.end_offset);
        }
        let mut purged = 0;
        for file in files.iter().filter(|f| f.hour_ms.is_some_and(|hour| hour + HOUR_MS <= cutoff)) {
            if newest.get(&file.partition) == Some(&file.end_offset) {
                continue;
            }
            self.archive.delete(&file.path).map_err(|e| format!("deleting {}: {e}", file.path))?;
            purged += 1;
        }
        metrics::counter!("tally_archive_purged_files_total").increment(purged as u64);
        Ok(purged)
    }

    /// Archives `partition` up to its checkpoint, round after round while `stop` says to
    /// run, and reports where it stands in the metrics.
    fn pass(&self, partition: &Partition, stop: &AtomicU8) -> Result<(), String> {
        let checkpoint = partition.checkpoint_offset.load(Ordering::Acquire);
        let mut result = Ok(());
        loop {
            match self.round(partition.index, checkpoint) {
                Ok(true) if stop.load(Ordering::Acquire) == RUN => {}
                Ok(_) => break,
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        let label = partition.index.to_string();
        let archived = self.archived(partition.index);
        metrics::gauge!("tally_archive_offset", "partition" => label.clone()).set(archived as f64);
        metrics::gauge!("tally_archive_lag_bytes", "partition" => label)
            .set(checkpoint.saturating_sub(archived) as f64);
        result
    }

    /// Archives everything behind the checkpoints (a clean stop), or fails with why not.
    pub(crate) fn catch_up(&self, partitions: &[Arc<Partition>]) -> Result<(), String> {
        for partition in partitions {
            let checkpoint = partition.checkpoint_offset.load(Ordering::Acquire);
            while self.round(partition.index, checkpoint)? {}
        }
        Ok(())
    }

    /// The archiver thread's loop, until `stop` says to: `STOP` archives everything behind
    /// the checkpoints first (a clean stop), `HALT` does not (a stop like a crash).
    pub(crate) fn run(&self, partitions: &[Arc<Partition>], stop: &AtomicU8) {
        let mut purged_at: Option<std::time::Instant> = None;
        while stop.load(Ordering::Acquire) == RUN {
            if purged_at.is_none_or(|at| at.elapsed() >= PURGE_INTERVAL) {
                purged_at = Some(std::time::Instant::now());
                match self.purge() {
                    Ok(0) => {}
                    Ok(files) => tracing::info!(files, "purged archive files past their retention"),
                    Err(error) => tracing::warn!(%error, "purging the archive failed; retried later"),
                }
            }
            let mut trouble = None;
            for partition in partitions {
                if let Err(error) = self.pass(partition, stop) {
                    metrics::counter!("tally_archive_errors_total").increment(1);
                    tracing::warn!(partition = partition.index, %error, "archiving failed; retrying");
                    trouble = Some(format!("partition {}: {error}", partition.index));
                }
            }
            self.set_trouble(trouble);
            wait(stop, ARCHIVE_INTERVAL);
        }
        if stop.load(Ordering::Acquire) == STOP
            && let Err(error) = self.catch_up(partitions)
        {
            tracing::warn!(%error, "the archive is behind the log at stop; the next start archives the rest");
        }
    }
}

/// The archiver thread's orders (`run`'s `stop`).
pub(crate) const RUN: u8 = 0;
pub(crate) const STOP: u8 = 1;
pub(crate) const HALT: u8 = 2;

/// How soon the archiver notices a stop while it waits.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Sleeps `duration`, or less once `stop` leaves `RUN`.
fn wait(stop: &AtomicU8, duration: Duration) {
    let step = STOP_POLL;
    let mut waited = Duration::ZERO;
    while waited < duration && stop.load(Ordering::Acquire) == RUN {
        std::thread::sleep(step);
        waited += step;
    }
}

/// A note's bytes: frame end offset, record index, event index, little-endian.
fn encode(note: &Uncounted) -> [u8; NOTE_BYTES] {
    let mut bytes = [0; NOTE_BYTES];
    bytes[..8].copy_from_slice(&note.frame.to_le_bytes());
    bytes[8..12].copy_from_slice(&note.record.to_le_bytes());
    bytes[12..].copy_from_slice(&note.event.to_le_bytes());
    bytes
}

fn decode(bytes: &[u8]) -> Uncounted {
    Uncounted {
        frame: u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        record: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
        event: u32::from_le_bytes(bytes[12..NOTE_BYTES].try_into().expect("4 bytes")),
    }
}

/// One round's file being gathered.
struct Round<'a> {
    partition: u32,
    noted: &'a HashSet<Uncounted>,
    builder: FileBuilder,
    /// The receive hour of the round's frames (a frame's is its first record's).
    hour: Option<i64>,
    end: u64,
}

impl Round<'_> {
    /// Takes the frame ending at `end` if it belongs to the round: false once the round is
    /// full or the frame belongs to the next hour.
    fn take<'r>(&mut self, end: u64, records: impl Iterator<Item = Result<&'r [u8], String>>) -> Result<bool, String> {
        let records: Vec<&[u8]> = records.collect::<Result<_, _>>()?;
        let readers: Vec<RecordReader<'_>> =
            records.iter().map(|r| RecordReader::new(r)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let hour =
            readers.first().map_or(self.hour.unwrap_or(0), |r| FileKey::of(self.partition, r.receive_ms).hour_ms);
        if self.hour.is_some_and(|current| current != hour) {
            return Ok(false);
        }
        self.hour = Some(hour);
        for (index, reader) in readers.iter().enumerate() {
            let mut event_index = 0;
            reader
                .for_each_event(|event| {
                    let note = Uncounted { frame: end, record: index as u32, event: event_index };
                    event_index += 1;
                    if !self.noted.contains(&note) {
                        self.builder.push(&event, reader.receive_ms, self.partition, end);
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        self.end = end;
        Ok(self.builder.rows() < ROUND_ROWS_MAX)
    }
}
