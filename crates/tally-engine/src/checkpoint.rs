//! The flusher: every flush interval (or sooner, when a writer runs out of room) it takes
//! each partition's deltas and dedup journal, commits them to the store with the log offset
//! they cover, and so moves the checkpoint. Writers then delete the segments behind it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tally_aggregate::{DedupJournal, Deltas, rollup};
use tally_store::{Checkpoint, PartitionFlush, StoreError};

use crate::partition::{Partition, Uncounted};
use crate::{EngineError, Shared};

/// Wakes the flusher early.
#[derive(Default)]
pub(crate) struct FlushSignal {
    state: Mutex<SignalState>,
    condvar: Condvar,
}

#[derive(Default)]
struct SignalState {
    requested: bool,
    stop: bool,
}

impl FlushSignal {
    pub(crate) fn request(&self) {
        self.state.lock().requested = true;
        self.condvar.notify_all();
    }

    /// Waits up to `timeout` for a request; returns true when asked to stop.
    fn wait(&self, timeout: Duration) -> bool {
        let mut state = self.state.lock();
        if !state.requested && !state.stop {
            self.condvar.wait_for(&mut state, timeout);
        }
        state.requested = false;
        state.stop
    }

    fn stop(&self) {
        self.state.lock().stop = true;
        self.condvar.notify_all();
    }
}

pub(crate) struct FlusherHandle {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

impl FlusherHandle {
    pub(crate) fn start(shared: Arc<Shared>) -> FlusherHandle {
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tally-flusher".into())
            .spawn(move || run_flusher(&thread_shared))
            .expect("spawn flusher thread");
        FlusherHandle { shared, thread }
    }

    /// Stops the periodic flushing and runs one last flush of everything applied.
    pub(crate) fn stop_and_flush(self) -> Result<(), EngineError> {
        let shared = Arc::clone(&self.shared);
        self.stop();
        flush_once(&shared)
    }

    /// Stops the periodic flushing; waits for a flush under way to finish.
    pub(crate) fn stop(self) {
        self.shared.flush_signal.stop();
        let _ = self.thread.join();
    }
}

fn run_flusher(shared: &Shared) {
    let interval = Duration::from_millis(shared.config.flush_interval_ms);
    let retention_interval = Duration::from_millis(shared.config.retention_interval_ms);
    let mut last_purge: Option<Instant> = None;
    loop {
        // Wake for a retry that is due before the next interval.
        let wait = shared.flush_lock.lock().retry_wait().map_or(interval, |left| interval.min(left));
        if shared.flush_signal.wait(wait) {
            return;
        }
        if shared.failure.lock().is_some() || shared.flush_lock.lock().retry_wait().is_some() {
            continue;
        }
        // A failed flush has been logged, and is retried here.
        let _ = flush_once(shared);
        if shared.cluster
            && let Err(error) = shared.store.touch_partitions()
        {
            tracing::debug!(%error, "marking owned partitions alive failed");
        }
        if shared.store_trouble.lock().is_none() && last_purge.is_none_or(|at| at.elapsed() >= retention_interval) {
            last_purge = Some(Instant::now());
            purge(shared);
        }
    }
}

/// How long after a failed store write the flusher first tries again; each further
/// failure doubles it, up to `STORE_RETRY_MAX`. Every try reopens the store, which redb
/// repairs (a scan of the file): the backoff keeps a long outage from spending its time
/// repairing, with queries refused meanwhile.
const STORE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the flush lock guards besides "one store write at a time".
#[derive(Default)]
pub(crate) struct FlushState {
    /// A flush whose commit failed, committed before anything newer. Its deltas stay
    /// visible to queries as "flushing" meanwhile, and its dedup journal waits with it.
    unsettled: Vec<Taken>,
    /// The flusher tries the store again no sooner than this.
    retry_at: Option<Instant>,
    /// The wait before the try after the next failure.
    retry_delay: Option<Duration>,
    /// A failure left the store to be reopened (`CounterStore::recover`).
    reopen: bool,
}

impl FlushState {
    /// Whether every flush taken was committed and the store needs no reopening: the
    /// store then holds exactly what the checkpoints say.
    pub(crate) fn is_settled(&self) -> bool {
        self.unsettled.is_empty() && !self.reopen
    }

    /// How long until the next try of the store is due, if one is scheduled and not due.
    fn retry_wait(&self) -> Option<Duration> {
        let left = self.retry_at?.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Drops a partition's share of a failed flush: it changed owner (cluster mode), and
    /// its next owner replays it from the log.
    pub(crate) fn forget(&mut self, partition: u32) {
        self.unsettled.retain(|taken| taken.partition.index != partition);
    }

    fn schedule_retry(&mut self) {
        let delay = self.retry_delay.unwrap_or(STORE_RETRY_FIRST);
        self.retry_at = Some(Instant::now() + delay);
        self.retry_delay = Some((delay * 2).min(STORE_RETRY_MAX));
    }
}

/// One partition's share of a flush.
struct Taken {
    partition: Arc<Partition>,
    /// Where the stored checkpoint is: the flush applies on top of it.
    start: u64,
    deltas: Arc<Deltas>,
    checkpoint: Checkpoint,
    journal: DedupJournal,
    /// The events of the flushed frames that were not counted, for the archive.
    uncounted: Vec<Uncounted>,
}

/// Why the store cannot be written now: what writers that wait for it are answered.
#[derive(Clone, Copy)]
pub(crate) enum StoreTrouble {
    DiskFull,
    /// The database cannot be reached: writers hold back (429) until it is back.
    Unreachable,
    Failing,
}

impl StoreTrouble {
    pub(crate) fn error(self) -> EngineError {
        match self {
            StoreTrouble::DiskFull => EngineError::DiskFull {
                reason: "the store's disk is full; flushes are retried and writes resume once one succeeds".into(),
            },
            StoreTrouble::Unreachable => EngineError::Overloaded {
                reason: "the database is unreachable; flushes are retried and writes resume when it is back",
            },
            StoreTrouble::Failing => EngineError::Unavailable {
                reason: "a store write failed (see the server log); flushes are retried".into(),
            },
        }
    }
}

/// Drops the store tables wholly past retention. A failure is logged and retried at the
/// next interval: nothing acknowledged depends on it.
fn purge(shared: &Shared) {
    let mut state = shared.flush_lock.lock();
    let started = Instant::now();
    if shared.cluster {
        // Idempotency keys claimed across nodes are kept twice as long as any owner
        // remembers them.
        let before = shared.config.clock.now_ms().saturating_sub(2 * shared.config.dedup_window_ms);
        if let Err(error) = shared.store.forget_requests_before(before) {
            tracing::warn!(%error, "forgetting old idempotency key claims failed; retrying at the next interval");
        }
    }
    match shared.store.purge(&shared.write_cutoffs()) {
        Ok(dropped) => {
            metrics::counter!("tally_retention_tables_dropped_total").increment(dropped as u64);
            metrics::histogram!("tally_retention_purge_seconds").record(started.elapsed().as_secs_f64());
            // Types whose events all expired no longer count against the limit.
            match crate::recovery::known_types(&*shared.store, &shared.partitions) {
                Ok(known) => shared.event_types.reset(known),
                Err(error) => tracing::warn!(%error, "reading the event types after a purge failed"),
            }
        }
        Err(error) => {
            tracing::warn!(%error, "retention purge failed; retrying at the next interval");
            // The next flush reopens the store (or stops the engine, after a failed sync).
            state.reopen = true;
        }
    }
}

/// Moves every partition's deltas into the store in one atomic commit, after the flush
/// that failed before, if any. One flush at a time: two interleaved flushes could commit
/// their checkpoints out of order. A failed commit is kept and retried (see `FlushState`);
/// the deltas stay visible to queries meanwhile, and a stop replays them from the log.
pub(crate) fn flush_once(shared: &Shared) -> Result<(), EngineError> {
    let mut state = shared.flush_lock.lock();
    if let Some(reason) = shared.failure.lock().clone() {
        return Err(EngineError::Unavailable { reason });
    }
    if state.reopen || shared.store.needs_recovery() {
        reopen(shared, &mut state)?;
    }
    if !state.unsettled.is_empty() {
        retry(shared, &mut state)?;
    }
    let batch = take_deltas(shared);
    if batch.is_empty() {
        return Ok(());
    }
    commit(shared, &mut state, batch)
}

/// Takes the deltas of every partition with frames applied since its checkpoint; they
/// move to "flushing", where queries still see them.
fn take_deltas(shared: &Shared) -> Vec<Taken> {
    let mut batch = Vec::with_capacity(shared.partitions.len());
    for partition in &shared.partitions {
        let mut memory = partition.memory.lock();
        if memory.applied_offset == partition.checkpoint_offset.load(Ordering::Acquire) {
            continue;
        }
        let deltas = Arc::new(std::mem::take(&mut memory.state.deltas));
        let journal = memory.state.dedup.take_journal();
        let uncounted = std::mem::take(&mut memory.uncounted);
        let checkpoint = Checkpoint {
            partition: partition.index,
            offset: memory.applied_offset,
            dedup_generation_starts: memory.state.dedup.generation_starts(),
        };
        let start = memory.pending_start;
        memory.flushing = Some((start, Arc::clone(&deltas)));
        memory.pending_start = memory.applied_offset;
        drop(memory);
        partition.drained.notify_all();
        batch.push(Taken { partition: Arc::clone(partition), start, deltas, checkpoint, journal, uncounted });
    }
    batch
}

fn commit(shared: &Shared, state: &mut FlushState, batch: Vec<Taken>) -> Result<(), EngineError> {
    let started = Instant::now();
    // The archive's notes are durable before the checkpoints pass their frames
    // (`Archiver::note`: written now, or carried by the flush).
    let mut notes = Vec::with_capacity(batch.len());
    for taken in &batch {
        match shared.archiver.as_ref().map_or(Ok(Vec::new()), |a| a.note(taken.partition.index, &taken.uncounted)) {
            Ok(noted) => notes.push(noted),
            Err(error) => return Err(shared.failed(format!("writing the archive notes failed: {error}"))),
        }
    }
    let cells: usize = batch.iter().map(|taken| taken.deltas.cells()).sum();
    let flushes: Vec<PartitionFlush<'_>> = batch
        .iter()
        .zip(&notes)
        .map(|(taken, notes)| PartitionFlush {
            start: taken.start,
            checkpoint: taken.checkpoint.clone(),
            journal: &taken.journal.blobs,
            notes,
        })
        .collect();
    let deltas: Vec<&Deltas> = batch.iter().map(|taken| &*taken.deltas).collect();
    let cutoffs = shared.write_cutoffs();
    let committed = shared.store.commit(&flushes, &mut |granularity| rollup(&deltas, &cutoffs, granularity));
    drop(flushes);
    if let Err(error) = committed {
        if shared.cluster
            && let StoreError::Fenced { partition, detail } = &error
        {
            return commit_unfenced(shared, state, batch, *partition, detail);
        }
        return Err(store_failed(shared, state, batch, error));
    }
    settle(shared, state, &batch);
    metrics::histogram!("tally_flush_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("tally_flush_cells").record(cells as f64);
    Ok(())
}

/// Cluster mode: another engine claimed `fenced` since this one did (it was paused, or
/// the group moved the partition before this engine heard). Nothing of the flush was
/// written; the partition is dropped here and the rest committed again.
fn commit_unfenced(
    shared: &Shared,
    state: &mut FlushState,
    batch: Vec<Taken>,
    fenced: u32,
    detail: &str,
) -> Result<(), EngineError> {
    tracing::warn!(partition = fenced, detail, "another node owns this partition now; dropping it");
    metrics::counter!("tally_partition_fenced_total").increment(1);
    let (dropped, rest): (Vec<Taken>, Vec<Taken>) = batch.into_iter().partition(|t| t.partition.index == fenced);
    if dropped.is_empty() {
        // The store named a partition this flush does not hold: nothing can be retried
        // safely (the rest would stay "flushing" for ever); the log keeps it all.
        return Err(
            shared.failed(format!("the store fenced partition {fenced}, which the flush does not hold: {detail}"))
        );
    }
    for taken in &dropped {
        crate::cluster::drop_partition(shared, &taken.partition);
    }
    if rest.is_empty() {
        return Ok(());
    }
    commit(shared, state, rest)
}

/// The flush is in the store: its deltas leave memory and the checkpoints move.
fn settle(shared: &Shared, state: &mut FlushState, batch: &[Taken]) {
    for taken in batch {
        taken.partition.memory.lock().flushing = None;
        taken.partition.checkpoint_offset.store(taken.checkpoint.offset, Ordering::Release);
    }
    state.retry_at = None;
    state.retry_delay = None;
    if shared.store_trouble.lock().take().is_some() {
        tracing::info!("store writes succeed again");
    }
}

/// After a failed commit: a transient failure keeps the flush for `retry` and has the
/// store reopened; any other stops acknowledgement, as a failed log fsync does (the log
/// still holds every acknowledged event for the restart).
fn store_failed(shared: &Shared, state: &mut FlushState, batch: Vec<Taken>, error: StoreError) -> EngineError {
    metrics::counter!("tally_store_commit_failures_total").increment(1);
    if !error.is_transient() {
        return shared.failed(format!("flush: {error}"));
    }
    let trouble = if error.is_disk_full() {
        StoreTrouble::DiskFull
    } else if error.is_unreachable() {
        StoreTrouble::Unreachable
    } else {
        StoreTrouble::Failing
    };
    tracing::error!(%error, "store commit failed; nothing acknowledged is lost, retrying");
    *shared.store_trouble.lock() = Some(trouble);
    state.unsettled = batch;
    state.reopen = true;
    state.schedule_retry();
    trouble.error()
}

/// Reopens the store. A failure schedules the next try; a store that refuses to be
/// reopened for good (a failed sync) stops acknowledgement.
fn reopen(shared: &Shared, state: &mut FlushState) -> Result<(), EngineError> {
    match shared.store.recover() {
        Ok(()) => {
            state.reopen = false;
            Ok(())
        }
        Err(error) if error.is_transient() => {
            tracing::warn!(%error, "reopening the store failed; retrying");
            state.schedule_retry();
            Err(shared.store_trouble.lock().unwrap_or(StoreTrouble::Failing).error())
        }
        Err(error) => Err(shared.failed(format!("reopening the store: {error}"))),
    }
}

/// Commits the failed flush again, unless it took effect after all (its checkpoints,
/// which move atomically with it, say which). The store was reopened since the failure,
/// and reads what the file holds.
fn retry(shared: &Shared, state: &mut FlushState) -> Result<(), EngineError> {
    let mut landed = 0;
    for taken in &state.unsettled {
        match shared.store.checkpoint(taken.partition.index) {
            Ok(stored) => landed += usize::from(stored.map(|c| c.offset) == Some(taken.checkpoint.offset)),
            Err(error) => {
                tracing::warn!(%error, "reading the checkpoints before retrying a flush failed");
                state.reopen = true;
                state.schedule_retry();
                return Err(error.into());
            }
        }
    }
    let batch = std::mem::take(&mut state.unsettled);
    if landed == batch.len() {
        tracing::info!("the failed flush had reached the store");
        settle(shared, state, &batch);
        return Ok(());
    }
    if landed > 0 {
        let detail = format!("after a failed flush, {landed} of {} partitions' checkpoints moved", batch.len());
        return Err(shared.failed(detail));
    }
    commit(shared, state, batch)
}
