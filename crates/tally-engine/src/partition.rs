//! One partition: its writer thread (group commit), and the memory it shares with the
//! flusher and with queries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use tally_aggregate::{Applied, Deltas, Outcome, PartitionState};
use tally_core::log::{LogError, PartitionLog};
use tally_core::{RecordError, RecordReader};
use tokio::sync::oneshot;

use crate::budget::Permit;
use crate::checkpoint::StoreTrouble;
use crate::{EngineError, PartitionStats, Shared};

/// How long an idle writer sleeps before checking for segments to delete; also how often
/// a writer waiting for the flusher checks again.
const WRITER_IDLE_MS: u64 = 100;
/// After a write found the disk full, how long requests are refused at admission before a
/// write tries again, milliseconds.
const DISK_FULL_REFUSE_MS: i64 = 1_000;

/// A request's part made durable (and, in single-node mode, applied): what it did, and
/// the log offset just past its frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Acked {
    pub(crate) outcome: Outcome,
    pub(crate) end_offset: u64,
}

pub(crate) struct Append {
    pub(crate) record: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Result<Acked, EngineError>>,
    /// Returned to the queue budget when the last part of the request is answered.
    pub(crate) _permit: Arc<Permit>,
}

/// What the writer, the flusher and queries share, behind one lock.
pub(crate) struct Memory {
    pub(crate) state: PartitionState,
    /// Log offset up to which `state` reflects the log.
    pub(crate) applied_offset: u64,
    /// Log offset where `state.deltas` begin: the checkpoint the flusher last took.
    pub(crate) pending_start: u64,
    /// Deltas being written to the store, with the offset they begin at.
    pub(crate) flushing: Option<(u64, Arc<Deltas>)>,
    /// The events applied since the last flush took them that were not counted: what the
    /// raw-event archive leaves out.
    pub(crate) uncounted: Vec<Uncounted>,
}

/// One event a frame holds that was not counted (a duplicate, or part of a repeated
/// request), named by its place: the frame's end offset (how the log names a frame), the
/// record's index in the frame, the event's index in the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uncounted {
    pub frame: u64,
    pub record: u32,
    pub event: u32,
}

/// Applies one record of the frame ending at `frame`, noting what it did not count.
pub(crate) fn apply_noting(
    state: &mut PartitionState,
    record: &RecordReader<'_>,
    frame: u64,
    index: u32,
    uncounted: &mut Vec<Uncounted>,
) -> Result<Applied, RecordError> {
    state.apply_noting(record, &mut |event| uncounted.push(Uncounted { frame, record: index, event }))
}

pub(crate) struct Partition {
    pub(crate) index: u32,
    sender: RwLock<Option<mpsc::Sender<Append>>>,
    pub(crate) memory: Mutex<Memory>,
    /// Signalled by the flusher after it took the deltas.
    pub(crate) drained: Condvar,
    queued: AtomicU64,
    pub(crate) dedup_entries: AtomicUsize,
    /// Whether this engine applies the partition's log: always in single-node mode; in
    /// cluster mode while the consumer group gives it to this node.
    pub(crate) owned: AtomicBool,
    /// The writer waits for the flusher (its deltas are at `pending_cells_max`): new
    /// requests for this partition are refused rather than queued behind a long flush.
    stalled: AtomicBool,
    /// When the last write found the disk full (ms since the epoch; 0: it did not):
    /// requests for this partition are refused at admission for `DISK_FULL_REFUSE_MS`
    /// after it, then one write tries again. An atomic, so admission pays one load.
    disk_full_since_ms: AtomicI64,
    /// Why, for the answers.
    disk_full_reason: Mutex<String>,
    pub(crate) checkpoint_offset: AtomicU64,
    wal_segments: AtomicU64,
    wal_bytes: AtomicU64,
}

impl Partition {
    pub(crate) fn new(index: u32, memory: Memory, sender: mpsc::Sender<Append>) -> Partition {
        let dedup_entries = memory.state.dedup.entries();
        let checkpoint = memory.pending_start;
        Partition {
            index,
            sender: RwLock::new(Some(sender)),
            memory: Mutex::new(memory),
            drained: Condvar::new(),
            queued: AtomicU64::new(0),
            dedup_entries: AtomicUsize::new(dedup_entries),
            owned: AtomicBool::new(true),
            stalled: AtomicBool::new(false),
            disk_full_since_ms: AtomicI64::new(0),
            disk_full_reason: Mutex::new(String::new()),
            checkpoint_offset: AtomicU64::new(checkpoint),
            wal_segments: AtomicU64::new(0),
            wal_bytes: AtomicU64::new(0),
        }
    }

    pub(crate) fn send(&self, append: Append) -> Result<(), EngineError> {
        let sender = self.sender.read();
        let sender = sender.as_ref().ok_or_else(|| EngineError::Unavailable { reason: "shutting down".into() })?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        sender.send(append).map_err(|_| EngineError::Unavailable { reason: "partition writer stopped".into() })
    }

    /// No more appends: the writer drains its queue and exits.
    pub(crate) fn close(&self) {
        self.sender.write().take();
    }

    pub(crate) fn dedup_entries(&self) -> usize {
        self.dedup_entries.load(Ordering::Relaxed)
    }

    pub(crate) fn stats(&self) -> PartitionStats {
        let memory = self.memory.lock();
        PartitionStats {
            queued_appends: self.queued.load(Ordering::Relaxed),
            pending_cells: memory.state.deltas.cells() as u64,
            dedup_entries: self.dedup_entries() as u64,
            wal_segments: self.wal_segments.load(Ordering::Relaxed),
            wal_bytes: self.wal_bytes.load(Ordering::Relaxed),
            applied_offset: memory.applied_offset,
            checkpoint_offset: self.checkpoint_offset.load(Ordering::Relaxed),
            owned: self.owned.load(Ordering::Relaxed),
        }
    }

    /// Whether a request's part may be sent here now: refused while dedup memory is full
    /// (for a part that needs an entry), while the writer waits for the flusher, and for a
    /// moment after the disk was found full.
    pub(crate) fn admit(&self, needs_dedup_entry: bool, dedup_entries_max: usize) -> Result<(), EngineError> {
        if needs_dedup_entry && self.dedup_entries() >= dedup_entries_max {
            return Err(EngineError::Overloaded { reason: "dedup memory is full; retry once the window has passed" });
        }
        if self.stalled() {
            return Err(EngineError::Overloaded {
                reason: "a partition is writing its backlog of pending cells to the store",
            });
        }
        match self.disk_full() {
            Some(reason) => Err(EngineError::DiskFull { reason }),
            None => Ok(()),
        }
    }

    /// Why writes to this partition are refused now, if its disk was found full a moment ago.
    fn disk_full(&self) -> Option<String> {
        let since = self.disk_full_since_ms.load(Ordering::Acquire);
        (since != 0 && crate::monotonic_ms() - since < DISK_FULL_REFUSE_MS)
            .then(|| self.disk_full_reason.lock().clone())
    }

    pub(crate) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    fn record_wal_stats(&self, wal: &dyn PartitionLog) {
        let stats = wal.held();
        self.wal_segments.store(stats.segments, Ordering::Relaxed);
        self.wal_bytes.store(stats.bytes, Ordering::Relaxed);
    }
}

/// The writer loop: gather what is queued (up to the group limit), write it as one frame
/// with one fdatasync, apply it, answer every request in it.
pub(crate) fn run_writer(
    shared: Arc<Shared>,
    partition: Arc<Partition>,
    mut wal: Box<dyn PartitionLog>,
    appends: mpsc::Receiver<Append>,
) {
    let _fail_on_panic = FailOnPanic { shared: &shared, partition: partition.index };
    let partition_label = partition.index.to_string();
    let fsync_seconds = metrics::histogram!("tally_wal_fsync_seconds", "partition" => partition_label.clone());
    let group_records = metrics::histogram!("tally_wal_group_records", "partition" => partition_label);
    // Events counted now: a request answered again from dedup memory adds nothing.
    let accepted_total = metrics::counter!("tally_events_accepted_total");
    let duplicate_total = metrics::counter!("tally_events_duplicate_total");
    let mut removed_before = partition.checkpoint_offset.load(Ordering::Relaxed);
    partition.record_wal_stats(&*wal);
    let mut group: Vec<Append> = Vec::new();
    loop {
        let first = match appends.recv_timeout(Duration::from_millis(WRITER_IDLE_MS)) {
            Ok(append) => append,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                remove_checkpointed_segments(&shared, &partition, &mut *wal, &mut removed_before);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut group_bytes = first.record.len();
        group.push(first);
        while group_bytes < shared.config.group_bytes_max {
            match appends.try_recv() {
                Ok(append) => {
                    group_bytes += append.record.len();
                    group.push(append);
                }
                Err(_) => break,
            }
        }
        if !shared.cluster
            && let Err(trouble) = wait_for_room(&shared, &partition)
        {
            // Nothing was written: every request learns that its part counted nothing.
            answer_all(&partition, &mut group, || Err(trouble.error()));
            continue;
        }
        if let Some(reason) = shared.failure.lock().clone() {
            answer_all(&partition, &mut group, || Err(EngineError::Unavailable { reason: reason.clone() }));
            continue;
        }
        let Some(appended) = append_group(&shared, &partition, &mut *wal, &mut group) else { continue };
        let end_offset = appended.end_offset;
        fsync_seconds.record(appended.sync.as_secs_f64());
        group_records.record(group.len() as f64);

        let outcomes = if shared.cluster {
            // The partition's owner (maybe another node) applies it from the log.
            group.iter().map(|append| Ok(logged(&append.record))).collect()
        } else {
            let (outcomes, counted) = apply_group(&partition, &group, end_offset);
            accepted_total.increment(u64::from(counted.accepted));
            duplicate_total.increment(u64::from(counted.duplicates));
            outcomes
        };
        for (append, outcome) in group.drain(..).zip(outcomes) {
            partition.queued.fetch_sub(1, Ordering::Relaxed);
            let _ = append.reply.send(outcome.map(|outcome| Acked { outcome, end_offset }));
        }
        partition.record_wal_stats(&*wal);
        remove_checkpointed_segments(&shared, &partition, &mut *wal, &mut removed_before);
    }
    remove_checkpointed_segments(&shared, &partition, &mut *wal, &mut removed_before);
}

/// Applies a group's records, just made durable at `end_offset`: each one's outcome, and
/// what they counted now.
fn apply_group(
    partition: &Partition,
    group: &[Append],
    end_offset: u64,
) -> (Vec<Result<Outcome, EngineError>>, Outcome) {
    let mut outcomes = Vec::with_capacity(group.len());
    let mut counted = Outcome::default();
    let mut memory = partition.memory.lock();
    let frame = end_offset;
    let Memory { state, uncounted, .. } = &mut *memory;
    for (index, append) in group.iter().enumerate() {
        let record = RecordReader::new(&append.record).expect("a record this process encoded must decode");
        let applied = apply_noting(state, &record, frame, index as u32, uncounted);
        outcomes.push(match applied.expect("a record this process encoded must apply") {
            Applied::Done(outcome) => {
                counted.add(outcome);
                Ok(outcome)
            }
            Applied::Repeated(outcome) => Ok(outcome),
            Applied::KeyReused => Err(EngineError::IdempotencyConflict),
        });
    }
    memory.applied_offset = end_offset;
    partition.dedup_entries.store(memory.state.dedup.entries(), Ordering::Relaxed);
    (outcomes, counted)
}

/// What a record logged for another node to apply is answered: its events, all accepted
/// (the owner drops duplicates when it applies them; they never count).
fn logged(record: &[u8]) -> Outcome {
    let events = RecordReader::new(record).expect("a record this process encoded must decode").event_count;
    Outcome { accepted: events, duplicates: 0 }
}

/// A writer that panics takes its queue with it: the engine must stop acknowledging.
struct FailOnPanic<'a> {
    shared: &'a Shared,
    partition: u32,
}

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.fail(format!("partition {} writer panicked", self.partition));
        }
    }
}

fn answer_all(partition: &Partition, group: &mut Vec<Append>, answer: impl Fn() -> Result<Acked, EngineError>) {
    for append in group.drain(..) {
        partition.queued.fetch_sub(1, Ordering::Relaxed);
        let _ = append.reply.send(answer());
    }
}

/// Blocks the writer while its deltas are over the limit, asking the flusher to run: the
/// queue then fills and new requests are refused, instead of memory growing. Gives up
/// when store writes fail: the flusher cannot make room until they succeed again.
pub(crate) fn wait_for_room(shared: &Shared, partition: &Partition) -> Result<(), StoreTrouble> {
    let mut memory = partition.memory.lock();
    let mut stalled = false;
    let mut waited = Ok(());
    while memory.state.deltas.cells() >= shared.config.pending_cells_max && shared.failure.lock().is_none() {
        if let Some(trouble) = *shared.store_trouble.lock() {
            waited = Err(trouble);
            break;
        }
        if !stalled {
            partition.stalled.store(true, Ordering::Relaxed);
            stalled = true;
        }
        shared.flush_signal.request();
        partition.drained.wait_for(&mut memory, Duration::from_millis(WRITER_IDLE_MS));
    }
    if stalled {
        partition.stalled.store(false, Ordering::Relaxed);
        metrics::counter!("tally_writer_stalls_total").increment(1);
    }
    waited
}

/// Writes a group's records as one frame. `None` when that failed; the group is answered.
fn append_group(
    shared: &Shared,
    partition: &Partition,
    wal: &mut dyn PartitionLog,
    group: &mut Vec<Append>,
) -> Option<tally_core::log::Appended> {
    let records: Vec<&[u8]> = group.iter().map(|a| a.record.as_slice()).collect();
    match wal.append(&records) {
        Ok(appended) => {
            partition.disk_full_since_ms.store(0, Ordering::Release);
            Some(appended)
        }
        Err(error) if error.is_transient() => {
            refuse_unwritten(partition, group, &error);
            None
        }
        Err(LogError::Uncertain { detail }) => {
            tracing::warn!(partition = partition.index, %detail, "append outcome unknown");
            metrics::counter!("tally_log_appends_uncertain_total").increment(1);
            let reason = "the log did not confirm the write in time";
            answer_all(partition, group, || Err(EngineError::OutcomeUnknown { reason: reason.into() }));
            None
        }
        Err(error) => {
            // Never retried: after a failed fsync the kernel may have dropped the dirty
            // pages, and only recovery from what is on disk is trustworthy.
            shared.fail(format!("partition {}: {error}", partition.index));
            answer_all(partition, group, || Err(EngineError::OutcomeUnknown { reason: "log fsync failed".into() }));
            None
        }
    }
}

/// Answers a group whose frame was not written (the log is as it was): a full disk is
/// remembered for admission, and every request learns that its part counted nothing.
fn refuse_unwritten(partition: &Partition, group: &mut Vec<Append>, error: &LogError) {
    tracing::warn!(partition = partition.index, %error, "log write refused; nothing was written");
    metrics::counter!("tally_wal_writes_refused_total").increment(1);
    let LogError::Full { reason, .. } = error else {
        let reason = "writing the log failed and was undone (see the server log); retry";
        answer_all(partition, group, || Err(EngineError::Unavailable { reason: reason.into() }));
        return;
    };
    *partition.disk_full_reason.lock() = reason.clone();
    partition.disk_full_since_ms.store(crate::monotonic_ms(), Ordering::Release);
    answer_all(partition, group, || Err(EngineError::DiskFull { reason: reason.clone() }));
}

/// Lets the log forget what lies behind the checkpoint (and behind the archive, if any).
fn remove_checkpointed_segments(
    shared: &Shared,
    partition: &Partition,
    wal: &mut dyn PartitionLog,
    removed_before: &mut u64,
) {
    let checkpoint = shared.forget_limit(partition);
    if checkpoint <= *removed_before {
        return;
    }
    // A failure is retried when the checkpoint next moves. Nothing acknowledged depends
    // on it: the log only keeps more than it needs.
    if let Err(error) = wal.forget_before(checkpoint) {
        tracing::warn!(partition = partition.index, %error, "removing checkpointed log segments failed");
        metrics::counter!("tally_wal_remove_failures_total").increment(1);
    }
    *removed_before = checkpoint;
    partition.record_wal_stats(wal);
}
