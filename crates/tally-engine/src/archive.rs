//! Feeding the raw-event archive (`tally-archive`): every counted event, once.
//!
//! The flusher notes, before each checkpoint moves, which events of the flushed frames were
//! not counted (`note`: duplicates and repeated requests, rare, appended to a small file per
//! partition and fsync-ed). The archiver thread then reads the log's frames behind the
//! store's checkpoint (a `LogReader`), leaves the noted events out, and writes one Parquet
//! file per round: `[archived, end)` of one partition, never across a receive hour. The
//! archive's own checkpoint is the largest end offset among its files, so a file written
//! just before a crash is found at the next start instead of written twice, and log
//! segments are deleted only behind both checkpoints (`Shared::forget_limit`).
//!
//! In cluster mode each node archives the partitions it owns, reading them back from
//! Kafka. The notes travel in the flush's own transaction (`PartitionFlush::notes`), and
//! each partition's progress sits beside its checkpoint in the store, fenced by the owner
//! epoch: before a file is written the store records its range as pending, so whoever
//! archives the partition next (this node after a crash, or the next owner) writes exactly
//! that range again, under the same name, before going on (`claim`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tally_archive::{Archive, ArchiveError, FileBuilder, FileKey};
use tally_core::RecordReader;
use tally_core::bucket::{DAY_MS, HOUR_MS};
use tally_core::log::{FrameRecords, LogError, LogReader, Stop};
use tally_store::{ArchiveProgress, CounterStore, StoreError};

use crate::partition::{Partition, Uncounted};
use crate::{Clock, EngineConfig};

/// Rows one round writes at most (unless a single frame holds more): one row group, the
/// memory of one file being built (tens of MiB), sized up front.
const ROUND_ROWS_MAX: usize = tally_archive::ROW_GROUP_ROWS;
/// The archiver thread writes a partition's file once this much log waits, or once the
/// file interval (`archive_file_interval`) passed since its last: few, large files under
/// load, one an interval when quiet. A clean stop and a recompute write whatever waits.
const ROUND_BYTES_MIN: u64 = 64 << 20;
/// `ROUND_BYTES_MIN` in cluster mode, whose log offsets count Kafka messages (each up to
/// 900 KiB of records, one writer's append).
const ROUND_MESSAGES_MIN: u64 = 1024;
/// Bytes of one note: frame end offset, record index, event index.
const NOTE_BYTES: usize = 16;
/// A notes file larger than this is rewritten without the notes already archived.
const NOTES_COMPACT_BYTES: u64 = 4 << 20;
/// How often the archiver looks for files past their retention.
const PURGE_INTERVAL: Duration = Duration::from_secs(600);
/// How long a node leaving archives a partition it gives up (`hand_over`).
const HAND_OVER_MAX: Duration = Duration::from_secs(10);
/// How often the archiver looks for frames behind the checkpoints.
pub(crate) const ARCHIVE_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Archiver {
    archive: Archive,
    /// Raw events are purged, in whole files, once their receive hour is this old; never
    /// when `None`.
    retention_ms: Option<i64>,
    file_interval: Duration,
    clock: Clock,
    /// Where the frames behind the checkpoints are read back from.
    reader: Box<dyn LogReader>,
    /// Cluster mode: the store that keeps the notes and each partition's progress.
    cluster: Option<Arc<dyn CounterStore>>,
    notes_dir: PathBuf,
    /// Per partition: every counted event before this log offset is archived.
    archived: Vec<AtomicU64>,
    /// Per partition: the flusher's appends and the archiver's compaction, one at a time.
    notes: Vec<Mutex<()>>,
    /// Per partition: one round at a time (the archiver thread's, or a recompute's
    /// catching up), so that two never write overlapping ranges.
    rounds: Vec<Mutex<()>>,
    /// Per partition: the end of a file whose write failed. It may have landed all the
    /// same (an answer lost after S3 stored the object): the next round writes exactly
    /// that range again, under the same name, instead of a longer one beside it.
    attempted: Vec<Mutex<Option<u64>>>,
    /// Per partition: how many times it was claimed here (cluster mode). A round that
    /// began before the latest claim leaves the in-memory progress to that claim.
    claims: Vec<AtomicU64>,
    /// Per partition: its last round failed, so the next pass tries again at once.
    failing: Vec<AtomicBool>,
    /// Per partition: when its last file was written (`None` before the first).
    written_at: Vec<Mutex<Option<std::time::Instant>>>,
    /// Why the last pass over the partitions failed, until one succeeds (`/readyz`).
    trouble: Mutex<Option<String>>,
    /// What finding where the archive ends needs, until it was found (`begin`).
    opening: Mutex<Option<Opening>>,
    /// `begin` succeeded: `archived` holds where each partition's archive ends (0 before,
    /// which keeps every log segment).
    ready: AtomicBool,
}

/// Where a partition's archive stood as a round began, and under which claim.
#[derive(Clone, Copy)]
struct Start {
    progress: ArchiveProgress,
    claim: u64,
}

struct Opening {
    checkpoints: Vec<u64>,
    notes_from: Vec<u64>,
}

/// Why `begin` did not succeed.
enum Begin {
    /// The archive cannot be used with this log: the server must not start.
    Refused(String),
    /// The archive could not be reached: tried again later.
    Unreachable(String),
}

/// How the archive is doing, for `/readyz` and the metrics.
#[derive(Debug, Clone)]
pub struct ArchiveStatus {
    /// Why archiving fails, while it does (the log keeps what is not archived).
    pub error: Option<String>,
    /// Log bytes checkpointed in the store but not archived yet, all partitions together;
    /// `None` until the archiver found where the archive ends.
    pub lag_bytes: Option<u64>,
}

impl Archiver {
    /// Opens the archive at `location` for the log under `config.data_dir`, read back by
    /// `reader`, whose partitions' store checkpoints are `checkpoints`, and finds where each
    /// partition's archive ends. If the archive cannot be reached now (object storage
    /// down), the server starts all the same: the archiver thread tries again, `/readyz`
    /// says why, and no log segment is deleted meanwhile.
    pub(crate) fn open(
        location: &str,
        config: &EngineConfig,
        checkpoints: &[u64],
        reader: Box<dyn LogReader>,
    ) -> Result<Archiver, String> {
        let archive = Archive::open(location).map_err(|e| e.to_string())?;
        let notes_dir = config.data_dir.join("archive-notes");
        let notes_from = prepare_notes(&notes_dir, checkpoints).map_err(|e| format!("{}: {e}", notes_dir.display()))?;
        let opening = Opening { checkpoints: checkpoints.to_vec(), notes_from };
        let count = checkpoints.len() as u32;
        let archiver = Archiver::new(archive, config, count, reader, None, notes_dir, Some(opening));
        match archiver.begin() {
            Err(Begin::Refused(reason)) => Err(reason),
            Err(Begin::Unreachable(reason)) => {
                tracing::warn!(%reason, "the archive cannot be reached; archiving starts once it can");
                archiver.set_trouble(Some(reason));
                Ok(archiver)
            }
            Ok(()) => Ok(archiver),
        }
    }

    /// Cluster mode: opens the archive at `location` for the partitions of the shared log,
    /// read back by `reader`; each is archived from where `store` says, once claimed here.
    pub(crate) fn open_cluster(
        location: &str,
        config: &EngineConfig,
        store: Arc<dyn CounterStore>,
        reader: Box<dyn LogReader>,
    ) -> Result<Archiver, String> {
        let archive = Archive::open(location).map_err(|e| e.to_string())?;
        Ok(Archiver::new(archive, config, config.partitions, reader, Some(store), PathBuf::new(), None))
    }

    fn new(
        archive: Archive,
        config: &EngineConfig,
        count: u32,
        reader: Box<dyn LogReader>,
        cluster: Option<Arc<dyn CounterStore>>,
        notes_dir: PathBuf,
        opening: Option<Opening>,
    ) -> Archiver {
        let partitions = 0..count;
        Archiver {
            archive,
            retention_ms: config.archive_retention_days.map(|days| i64::from(days) * DAY_MS),
            file_interval: Duration::from_millis(config.archive_file_interval_ms),
            clock: config.clock.clone(),
            reader,
            cluster,
            notes_dir,
            // Nothing to find first (cluster mode: the store keeps where each partition is).
            ready: AtomicBool::new(opening.is_none()),
            opening: Mutex::new(opening),
            archived: partitions.clone().map(|_| AtomicU64::new(0)).collect(),
            notes: partitions.clone().map(|_| Mutex::new(())).collect(),
            rounds: partitions.clone().map(|_| Mutex::new(())).collect(),
            attempted: partitions.clone().map(|_| Mutex::new(None)).collect(),
            claims: partitions.clone().map(|_| AtomicU64::new(0)).collect(),
            failing: partitions.clone().map(|_| AtomicBool::new(false)).collect(),
            written_at: partitions.map(|_| Mutex::new(None)).collect(),
            trouble: Mutex::new(None),
        }
    }

    /// Cluster mode: `partition` was just claimed here (the caller holds off flushes, so
    /// its checkpoint stays where it was claimed): its archive goes on where the store
    /// says, first writing again the range a crashed or fenced owner may have left half
    /// written. A round still under way from an earlier ownership cannot record anything
    /// the store does not expect (`record`), so it cannot write past what this reads.
    pub(crate) fn claim(&self, partition: u32) -> Result<(), String> {
        self.claims[partition as usize].fetch_add(1, Ordering::AcqRel);
        self.reload(partition)?;
        *self.written_at[partition as usize].lock() = None;
        self.failing[partition as usize].store(false, Ordering::Release);
        Ok(())
    }

    /// Cluster mode: where `partition`'s archive stands, as the store says.
    fn reload(&self, partition: u32) -> Result<(), String> {
        let Some(store) = &self.cluster else { return Ok(()) };
        let progress = store.begin_archive(partition).map_err(|e| format!("reading the archive's progress: {e}"))?;
        self.archived[partition as usize].store(progress.archived, Ordering::Release);
        *self.attempted[partition as usize].lock() = progress.pending;
        Ok(())
    }

    /// Cluster mode: moves `partition`'s archive in the store from `expected` to
    /// `progress`. Refused when another node claimed the partition, or when the store's
    /// progress is not what this node expected (a round from an earlier ownership, or a
    /// record whose answer was lost): this node then reads the store's progress again, and
    /// its next round goes on from there.
    fn record(&self, partition: u32, expected: ArchiveProgress, progress: ArchiveProgress) -> Result<(), String> {
        let Some(store) = &self.cluster else { return Ok(()) };
        match store.set_archive_progress(partition, expected, progress) {
            Ok(()) => Ok(()),
            Err(StoreError::Fenced { .. }) => match self.reload(partition) {
                Ok(()) => Err("its archive moved on meanwhile; going on from the store's".to_string()),
                Err(error) => Err(format!("archived by another node now ({error})")),
            },
            Err(error) => Err(format!("recording the archive's progress: {error}")),
        }
    }

    /// Where `partition`'s archive stands as a round begins.
    fn start(&self, partition: u32) -> Start {
        let claim = self.claims[partition as usize].load(Ordering::Acquire);
        let archived = self.archived(partition);
        // A pending end at or behind what is archived is stale (left by a round of an
        // earlier ownership): the store says what is pending (`record` reloads it).
        let pending = self.attempted[partition as usize].lock().filter(|&end| end > archived);
        Start { progress: ArchiveProgress { archived, pending }, claim }
    }

    /// Moves `partition`'s archive from where the round found it (`start`) past `end`:
    /// `put` writes what holds (or marks) `[start, end)`. The range is recorded as pending
    /// first (cluster mode), so a failed `put`, or one whose answer was lost, is done again
    /// over exactly that range, under the same name, by whoever archives the partition
    /// next. The store moves only from the progress the round began with, so a round that
    /// began before another node moved it writes nothing.
    fn advance(
        &self,
        partition: u32,
        start: Start,
        end: u64,
        put: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let from = start.progress.archived;
        let current = || self.claims[partition as usize].load(Ordering::Acquire) == start.claim;
        let attempted = &self.attempted[partition as usize];
        let pending = ArchiveProgress { archived: from, pending: Some(end) };
        self.record(partition, start.progress, pending)?;
        if current() {
            *attempted.lock() = Some(end);
        }
        put()?;
        self.record(partition, pending, ArchiveProgress { archived: end, pending: None })?;
        if current() {
            *attempted.lock() = None;
            self.archived[partition as usize].store(end, Ordering::Release);
            *self.written_at[partition as usize].lock() = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Finds where each partition's archive ends and records where archiving goes on
    /// (an empty file, so that a crash before the first round does not move it): once.
    fn begin(&self) -> Result<(), Begin> {
        let mut opening = self.opening.lock();
        let Some(Opening { checkpoints, notes_from }) = opening.as_ref() else { return Ok(()) };
        let unreachable = |e: ArchiveError| Begin::Unreachable(format!("reading the archive: {e}"));
        let mut ends: Vec<Option<u64>> = vec![None; checkpoints.len()];
        for file in self.archive.files().map_err(unreachable)? {
            if let Some(end) = ends.get_mut(file.partition as usize) {
                *end = Some(end.map_or(file.end_offset, |e| e.max(file.end_offset)));
            }
        }
        let mut starts = Vec::with_capacity(checkpoints.len());
        for (partition, (&checkpoint, end)) in checkpoints.iter().zip(ends).enumerate() {
            let start = match end {
                Some(end) if end > checkpoint => {
                    return Err(Begin::Refused(format!(
                        "the archive of partition {partition} ends at log offset {end}, past the store's checkpoint \
                         {checkpoint}: it holds another log (a data directory made anew?); archive this one elsewhere"
                    )));
                }
                Some(end) if end >= notes_from[partition] => {
                    starts.push((end, false));
                    continue;
                }
                // Frames flushed while archiving was off have no notes: their duplicates
                // cannot be told, so the archive leaves them out, and says so.
                Some(end) => {
                    metrics::counter!("tally_archive_gaps_total").increment(1);
                    tracing::warn!(
                        partition,
                        from = end,
                        to = notes_from[partition],
                        "archiving was off: the archive lacks these offsets"
                    );
                    notes_from[partition]
                }
                // Archived for the first time: from where the notes begin, the checkpoint
                // when archiving was enabled (what came before has no notes to go by; the
                // log kept everything since, even across restarts before the archive could
                // first be reached).
                None => notes_from[partition],
            };
            starts.push((start, true));
        }
        let now_ms = self.clock.now_ms();
        for (partition, &(start, _)) in starts.iter().enumerate().filter(|(_, (_, mark))| *mark) {
            let path = FileKey::of(partition as u32, now_ms).path(start, start);
            let empty = FileBuilder::default().encode().map_err(|e| Begin::Refused(e.to_string()))?;
            self.archive.put(&path, empty).map_err(|e| Begin::Unreachable(format!("writing {path}: {e}")))?;
        }
        for (slot, (start, _)) in self.archived.iter().zip(starts) {
            slot.store(start, Ordering::Release);
        }
        *opening = None;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn archive(&self) -> &Archive {
        &self.archive
    }

    pub(crate) fn archived(&self, partition: u32) -> u64 {
        self.archived[partition as usize].load(Ordering::Acquire)
    }

    pub(crate) fn status(&self, partitions: &[Arc<Partition>]) -> ArchiveStatus {
        let lag_bytes = self.ready.load(Ordering::Acquire).then(|| {
            owned(partitions)
                .map(|p| p.checkpoint_offset.load(Ordering::Acquire).saturating_sub(self.archived(p.index)))
                .sum()
        });
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

    /// Records `uncounted` durably, before the checkpoint passes their frames: on a single
    /// node appended to the partition's notes file now; in cluster mode returned, for the
    /// flush's own transaction to carry (`PartitionFlush::notes`).
    pub(crate) fn note(&self, partition: u32, uncounted: &[Uncounted]) -> std::io::Result<Vec<u8>> {
        let bytes: Vec<u8> = uncounted.iter().flat_map(encode).collect();
        if self.cluster.is_some() || bytes.is_empty() {
            return Ok(bytes);
        }
        let _held = self.notes[partition as usize].lock();
        let mut file = OpenOptions::new().create(true).append(true).open(self.notes_path(partition))?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        Ok(Vec::new())
    }

    /// The notes of frames ending in `(from, to]`.
    fn noted(&self, partition: u32, from: u64, to: u64) -> Result<HashSet<Uncounted>, String> {
        let Some(store) = &self.cluster else {
            let _held = self.notes[partition as usize].lock();
            return self.read_notes(partition, from, to).map_err(|e| format!("reading the archive notes: {e}"));
        };
        let flushes = store.archive_notes(partition, from).map_err(|e| format!("reading the archive notes: {e}"))?;
        let notes = flushes.iter().flat_map(|notes| notes.chunks_exact(NOTE_BYTES).map(decode));
        Ok(notes.filter(|n| n.frame > from && n.frame <= to).collect())
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
        if self.cluster.is_some() || std::fs::metadata(&path).map_or(0, |m| m.len()) < NOTES_COMPACT_BYTES {
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
        if !self.ready.load(Ordering::Acquire) {
            self.begin().map_err(|(Begin::Refused(reason) | Begin::Unreachable(reason))| reason)?;
        }
        let _round = self.rounds[partition as usize].lock();
        let start = self.start(partition);
        let from = start.progress.archived;
        let checkpoint = start.progress.pending.unwrap_or(checkpoint);
        if from >= checkpoint {
            return Ok(false);
        }
        let noted = self.noted(partition, from, checkpoint)?;
        let noted_frames = noted.iter().map(|note| note.frame).collect();
        // A record list the owners refused is not archived either.
        let cluster_partitions = self.cluster.is_some().then_some(self.archived.len() as u32);
        let mut round = Round {
            partition,
            cluster_partitions,
            noted: &noted,
            noted_frames,
            builder: FileBuilder::with_capacity(ROUND_ROWS_MAX),
            // A pending range is written again exactly as recorded, whatever its size.
            rows_max: if start.progress.pending.is_some() { usize::MAX } else { ROUND_ROWS_MAX },
            hour: None,
            end: from,
        };
        let mut failed = None;
        let read = self.reader.read(partition, from, checkpoint, &mut |end, records| match round.take(end, records) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Stop),
            Err(error) => {
                failed = Some(format!("the log frame ending at {end}: {error}"));
                Err(Stop)
            }
        });
        match read {
            Err(LogError::Gone { detail, resumes }) => {
                let resume = resumes.unwrap_or(checkpoint).clamp(from, checkpoint);
                return self.skip_lost(partition, start, resume, &detail);
            }
            Err(error) => return Err(error.to_string()),
            Ok(()) => {}
        }
        if let Some(error) = failed {
            return Err(error);
        }
        let Round { builder, hour, end, .. } = round;
        if end == from {
            return Ok(false);
        }
        if start.progress.pending.is_some_and(|pending| pending != end) {
            // The log ended the read early (a hole): a range written before, which may
            // have landed, is written again whole or not at all.
            return Err(format!("offsets {from} to {checkpoint} could not be read whole; retried"));
        }
        // A round of nothing but record lists the owners refused (cluster mode) still
        // moves the archive past them: an empty file, named at a fixed hour so that
        // writing it again replaces it.
        let hour = hour.unwrap_or(0);
        let (events, path) = (builder.rows(), FileKey { partition, hour_ms: hour }.path(from, end));
        self.write(partition, &path, builder, start, end)?;
        metrics::counter!("tally_archive_files_total").increment(1);
        metrics::counter!("tally_archive_events_total").increment(events as u64);
        if let Err(error) = self.compact_notes(partition) {
            tracing::warn!(partition, %error, "compacting the archive notes failed; retried after the next round");
        }
        Ok(true)
    }

    /// Writes the file of `partition`'s offsets from `start` to `end` at `path`, and moves
    /// the archive's checkpoint past it.
    fn write(&self, partition: u32, path: &str, file: FileBuilder, start: Start, end: u64) -> Result<(), String> {
        let bytes = file.encode().map_err(|e| format!("encoding {path}: {e}"))?;
        self.advance(partition, start, end, || {
            self.archive.put(path, bytes).map_err(|e| format!("writing {path}: {e}"))
        })
    }

    /// The log no longer holds what follows `start`, up to `resume` (segments deleted while
    /// archiving was off, or by Kafka's retention): the archive goes on from `resume`, and
    /// says what it lacks. An empty file `[resume, resume)` marks where archiving goes on
    /// after a gap, so that the gap shows in the archive's offset ranges (a recompute then
    /// refuses those days), and the archive's end is found there after a restart. A range
    /// written before (pending), whose write may have landed or may still land, is never
    /// overlapped: archiving goes on after it, and if its file is there nothing was lost.
    fn skip_lost(&self, partition: u32, start: Start, resume: u64, detail: &str) -> Result<bool, String> {
        let from = start.progress.archived;
        if let Some(pending) = start.progress.pending {
            let files = self.archive.files().map_err(|e| format!("listing the archive: {e}"))?;
            if files.iter().any(|f| f.partition == partition && f.first_offset == from && f.end_offset == pending) {
                self.advance(partition, start, pending, || Ok(()))?;
                return Ok(true);
            }
        }
        let resume = start.progress.pending.map_or(resume, |pending| pending.max(resume));
        let path = FileKey::of(partition, self.clock.now_ms()).path(resume, resume);
        let marked = self.advance(partition, start, resume, || {
            let empty = FileBuilder::default().encode().map_err(|e| e.to_string())?;
            self.archive.put(&path, empty).map_err(|e| e.to_string())
        });
        if let Err(error) = marked {
            return Err(format!("marking the gap {from} to {resume} at {path}: {error}; retried"));
        }
        metrics::counter!("tally_archive_gaps_total").increment(1);
        Err(format!("the log no longer holds offsets {from} to {resume} ({detail}); the archive lacks them"))
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
        while partition.owned.load(Ordering::Acquire) && self.due(partition.index, checkpoint) {
            let round = self.round(partition.index, checkpoint);
            self.failing[partition.index as usize].store(round.is_err(), Ordering::Release);
            match round {
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

    /// Whether the archiver thread writes `partition`'s next file now: 64 MiB of its log
    /// wait, or the file interval passed since its last file (a tail under 64 MiB waits
    /// for the next interval instead of making a small file).
    fn due(&self, partition: u32, checkpoint: u64) -> bool {
        let waiting = checkpoint.saturating_sub(self.archived(partition));
        let last = *self.written_at[partition as usize].lock();
        let retry = self.failing[partition as usize].load(Ordering::Acquire);
        let enough = if self.cluster.is_some() { ROUND_MESSAGES_MIN } else { ROUND_BYTES_MIN };
        waiting > 0 && (retry || waiting >= enough || last.is_none_or(|at| at.elapsed() >= self.file_interval))
    }

    /// Archives everything behind the checkpoints of the partitions owned here (a clean
    /// stop), or fails with why not.
    pub(crate) fn catch_up(&self, partitions: &[Arc<Partition>]) -> Result<(), String> {
        owned(partitions).try_for_each(|partition| {
            self.catch_up_one(partition, None).map_err(|error| format!("partition {}: {error}", partition.index))
        })
    }

    /// Cluster mode: a node leaving archives what it checkpointed of `partition`, for up to
    /// `HAND_OVER_MAX`, unless its last round failed (the archive or the log unreachable):
    /// the next owner goes on from there, and the group's rebalance is not held up long.
    pub(crate) fn hand_over(&self, partition: &Partition) -> Result<(), String> {
        if self.failing[partition.index as usize].load(Ordering::Acquire) {
            return Err("its last round failed".into());
        }
        self.catch_up_one(partition, Some(HAND_OVER_MAX))
    }

    /// Archives everything behind `partition`'s checkpoint, or as much as `within` allows.
    fn catch_up_one(&self, partition: &Partition, within: Option<Duration>) -> Result<(), String> {
        let (started, checkpoint) = (std::time::Instant::now(), partition.checkpoint_offset.load(Ordering::Acquire));
        while self.round(partition.index, checkpoint)? {
            if let Some(within) = within.filter(|&within| started.elapsed() >= within) {
                return Err(format!("not caught up within {} s", within.as_secs()));
            }
        }
        Ok(())
    }

    /// The archiver thread's loop, until `stop` says to: `STOP` archives everything behind
    /// the checkpoints first (a clean stop), `HALT` does not (a stop like a crash).
    pub(crate) fn run(&self, partitions: &[Arc<Partition>], stop: &AtomicU8) {
        let mut purged_at: Option<std::time::Instant> = None;
        while stop.load(Ordering::Acquire) == RUN {
            if let Err(Begin::Refused(reason) | Begin::Unreachable(reason)) = self.begin() {
                metrics::counter!("tally_archive_errors_total").increment(1);
                self.set_trouble(Some(reason));
                wait(stop, ARCHIVE_INTERVAL);
                continue;
            }
            if purged_at.is_none_or(|at| at.elapsed() >= PURGE_INTERVAL) {
                purged_at = Some(std::time::Instant::now());
                match self.purge() {
                    Ok(0) => {}
                    Ok(files) => tracing::info!(files, "purged archive files past their retention"),
                    Err(error) => tracing::warn!(%error, "purging the archive failed; retried later"),
                }
            }
            let mut trouble = None;
            for partition in owned(partitions) {
                // A partition given up meanwhile is the next owner's to archive.
                if let Err(error) = self.pass(partition, stop)
                    && partition.owned.load(Ordering::Acquire)
                {
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

/// The partitions this engine applies (all of them on a single node): a cluster node
/// archives only those.
fn owned(partitions: &[Arc<Partition>]) -> impl Iterator<Item = &Arc<Partition>> {
    partitions.iter().filter(|p| p.owned.load(Ordering::Acquire))
}

/// The archiver thread's nice value: when the cores are all busy, the writers and the
/// HTTP threads go first (acknowledging is what clients wait for) and the archive takes
/// what is left; under a load the machine cannot archive as fast, the log holds the
/// difference until it can (up to the disk limit). With cores to spare it changes nothing.
const ARCHIVER_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to `ARCHIVER_NICE` (Linux: nice is per
/// thread). A refusal is logged, not fatal.
#[cfg(target_os = "linux")]
pub(crate) fn lower_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let result = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, ARCHIVER_NICE)
    };
    if result != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "the archiver thread keeps its priority");
    }
}

/// Elsewhere a thread's nice value is the process's: left alone.
#[cfg(not(target_os = "linux"))]
pub(crate) fn lower_priority() {}

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

/// Makes each partition's notes file durable before the first note goes in (file, then
/// directory entries), and cuts a torn last note: its append was never fsync-ed, so its
/// checkpoint did not move, and the replay notes it again. Returns, per partition, the log
/// offset from which the notes are complete (`pNNN.from`, the checkpoint when archiving
/// began; a start without an archive removes the notes, see `forget_notes`).
fn prepare_notes(notes_dir: &std::path::Path, checkpoints: &[u64]) -> std::io::Result<Vec<u64>> {
    std::fs::create_dir_all(notes_dir)?;
    let mut complete_from = Vec::with_capacity(checkpoints.len());
    for (partition, &checkpoint) in checkpoints.iter().enumerate() {
        let path = notes_dir.join(format!("p{partition:03}"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let length = file.metadata()?.len();
        let torn = length % NOTE_BYTES as u64;
        if torn != 0 {
            tracing::warn!(path = %path.display(), bytes = torn, "cutting a torn archive note (never acknowledged)");
            file.set_len(length - torn)?;
        }
        file.sync_all()?;
        drop_notes_after(&path, checkpoint)?;
        let marker = path.with_extension("from");
        let from = match std::fs::read(&marker) {
            Ok(bytes) if bytes.len() == 8 => u64::from_le_bytes(bytes.try_into().expect("8 bytes")),
            Ok(_) => return Err(std::io::Error::other(format!("{} is not 8 bytes", marker.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let temporary = marker.with_extension("from.new");
                let mut file = File::create(&temporary)?;
                file.write_all(&checkpoint.to_le_bytes())?;
                file.sync_all()?;
                std::fs::rename(&temporary, &marker)?;
                checkpoint
            }
            Err(error) => return Err(error),
        };
        complete_from.push(from);
    }
    File::open(notes_dir)?.sync_all()?;
    if let Some(parent) = notes_dir.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(complete_from)
}

/// Rewrites the notes file at `path` without the notes of frames past `checkpoint`: their
/// flush never committed, and the replay notes those frames again, as it counts them now
/// (a note half written before a crash would otherwise leave a counted event out).
fn drop_notes_after(path: &std::path::Path, checkpoint: u64) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    let notes: Vec<Uncounted> = bytes.chunks_exact(NOTE_BYTES).map(decode).collect();
    if notes.iter().all(|note| note.frame <= checkpoint) {
        return Ok(());
    }
    let kept: Vec<u8> = notes.iter().filter(|note| note.frame <= checkpoint).flat_map(encode).collect();
    let temporary = path.with_extension("new");
    let mut file = File::create(&temporary)?;
    file.write_all(&kept)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// A start without an archive: flushes will not note what they leave out, so the notes
/// kept so far must not vouch for the log any more.
pub(crate) fn forget_notes(data_dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(data_dir.join("archive-notes")) {
        Ok(()) => File::open(data_dir)?.sync_all(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
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
    /// Cluster mode: the partition count; a record list the owners refused (malformed, or
    /// an event of another partition's video, see `cluster::decode`) counted nothing and
    /// is left out.
    cluster_partitions: Option<u32>,
    noted: &'a HashSet<Uncounted>,
    /// The frames `noted` names.
    noted_frames: HashSet<u64>,
    builder: FileBuilder,
    /// Rows past which the round takes no further frame.
    rows_max: usize,
    /// The receive hour of the round's frames (a frame's is its first record's).
    hour: Option<i64>,
    end: u64,
}

impl Round<'_> {
    /// Takes the frame ending at `end` if it belongs to the round: false, leaving it to
    /// the next round, if it belongs to the next hour or would take the file past
    /// `rows_max` rows.
    fn take(&mut self, end: u64, records: &mut FrameRecords<'_>) -> Result<bool, String> {
        let readers: Vec<RecordReader<'_>> = match self.cluster_partitions {
            Some(partitions) => match crate::cluster::decode(records, self.partition, partitions) {
                Ok(readers) => readers,
                Err(_) => {
                    self.end = end;
                    return Ok(true);
                }
            },
            None => {
                records.map(|record| RecordReader::new(record?).map_err(|e| e.to_string())).collect::<Result<_, _>>()?
            }
        };
        let hour =
            readers.first().map_or(self.hour.unwrap_or(0), |r| FileKey::of(self.partition, r.receive_ms).hour_ms);
        if self.hour.is_some_and(|current| current != hour) {
            return Ok(false);
        }
        let events: usize = readers.iter().map(|reader| reader.event_count as usize).sum();
        if self.builder.rows() > 0 && self.builder.rows().saturating_add(events) > self.rows_max {
            return Ok(false);
        }
        self.hour = Some(hour);
        // Most frames have no uncounted event: no lookup per event for them.
        let noted_frame = self.noted_frames.contains(&end);
        for (index, reader) in readers.iter().enumerate() {
            let mut event_index = 0;
            reader
                .for_each_event_bytes(|event| {
                    let note = Uncounted { frame: end, record: index as u32, event: event_index };
                    event_index += 1;
                    if !noted_frame || !self.noted.contains(&note) {
                        self.builder.push(event, reader.receive_ms, self.partition, end);
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        self.end = end;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archiver(dir: &std::path::Path, retention_days: Option<u32>, now_ms: i64) -> Archiver {
        let config = EngineConfig {
            data_dir: dir.join("data"),
            archive_retention_days: retention_days,
            clock: Clock::fixed(now_ms),
            ..EngineConfig::default()
        };
        let reader = Box::new(tally_wal::LocalReader::new(&config.data_dir.join("wal")));
        Archiver::open(&dir.join("archive").display().to_string(), &config, &[100, 100], reader).unwrap()
    }

    fn put(archiver: &Archiver, partition: u32, hour_ms: i64, first: u64, end: u64) {
        let path = FileKey { partition, hour_ms }.path(first, end);
        archiver.archive.put(&path, FileBuilder::default().encode().unwrap()).unwrap();
    }

    fn ranges(archiver: &Archiver) -> Vec<(u32, u64, u64)> {
        archiver.archive.files().unwrap().iter().map(|f| (f.partition, f.first_offset, f.end_offset)).collect()
    }

    #[test]
    fn retention_purges_whole_files_past_it_but_never_a_partitions_newest() {
        let dir = tempfile::tempdir().unwrap();
        let now = 20_000 * DAY_MS;
        let archiver = archiver(dir.path(), Some(2), now);
        // Opening wrote each partition's empty start file [100, 100) at the current hour.
        put(&archiver, 0, now - 3 * DAY_MS, 0, 10);
        put(&archiver, 0, now - 3 * DAY_MS + HOUR_MS, 10, 20);
        put(&archiver, 0, now - DAY_MS, 20, 30);
        put(&archiver, 1, now - 5 * DAY_MS, 0, 40);
        assert_eq!(archiver.purge().unwrap(), 3, "the files received more than 2 days ago");
        assert_eq!(ranges(&archiver), [(0, 20, 30), (0, 100, 100), (1, 100, 100)]);

        let forever = self::archiver(dir.path(), None, now + 100 * DAY_MS);
        assert_eq!(forever.purge().unwrap(), 0, "no retention: nothing purged");
        let later = self::archiver(dir.path(), Some(2), now + 100 * DAY_MS);
        assert_eq!(later.purge().unwrap(), 1);
        assert_eq!(ranges(&later), [(0, 100, 100), (1, 100, 100)], "each partition's newest stays, however old");
    }

    #[test]
    fn a_gap_after_a_pending_range_never_overlaps_it_and_loses_nothing_if_its_file_landed() {
        let dir = tempfile::tempdir().unwrap();
        let now = 20_000 * DAY_MS;
        let archiver = archiver(dir.path(), None, now);
        // A write of [100, 150) whose answer was lost: its file is there.
        *archiver.attempted[0].lock() = Some(150);
        put(&archiver, 0, now, 100, 150);
        let landed = archiver.skip_lost(0, archiver.start(0), 120, "gone");
        assert_eq!(landed, Ok(true), "nothing is lost: the pending file holds it");
        assert_eq!(archiver.archived(0), 150);
        assert_eq!(ranges(&archiver), [(0, 100, 100), (0, 100, 150), (1, 100, 100)], "no gap marked");

        // A write of [150, 200) that may still land: the gap is marked after it, not at 180.
        *archiver.attempted[0].lock() = Some(200);
        let lost = archiver.skip_lost(0, archiver.start(0), 180, "gone").unwrap_err();
        assert!(lost.contains("no longer holds offsets 150 to 200"), "{lost}");
        assert_eq!(archiver.archived(0), 200);
        assert_eq!(ranges(&archiver).last(), Some(&(1, 100, 100)));
        assert!(ranges(&archiver).contains(&(0, 200, 200)), "the gap's marker: {:?}", ranges(&archiver));
    }

    #[test]
    fn a_torn_note_is_cut_at_open_and_notes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let archiver = archiver(dir.path(), None, 0);
        let note = Uncounted { frame: 7, record: 1, event: 2 };
        archiver.note(0, &[note]).unwrap();
        let path = archiver.notes_path(0);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[1, 2, 3]).unwrap();
        drop((file, archiver));
        let archiver = self::archiver(dir.path(), None, 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), NOTE_BYTES as u64);
        let second = Uncounted { frame: 9, record: 0, event: 0 };
        archiver.note(0, &[second]).unwrap();
        assert_eq!(archiver.noted(0, 0, 10).unwrap(), HashSet::from([note, second]));
    }
}
