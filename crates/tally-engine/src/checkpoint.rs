//! The flusher: every flush interval (or sooner, when a writer runs out of room) it takes
//! each partition's deltas and dedup journal, commits them to the store with the log offset
//! they cover, and so moves the checkpoint. Writers then delete the segments behind it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tally_store::{Checkpoint, PartitionFlush};

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
        if shared.flush_signal.wait(interval) {
            return;
        }
        if shared.failure.lock().is_some() {
            continue;
        }
        // A failed flush has already marked the engine failed.
        let _ = flush_once(shared);
        if last_purge.is_none_or(|at| at.elapsed() >= retention_interval) {
            last_purge = Some(Instant::now());
            purge(shared);
        }
    }
}

/// Drops the store tables wholly past retention. A failure is logged and retried at the
/// next interval: nothing acknowledged depends on it.
fn purge(shared: &Shared) {
    let _one_at_a_time = shared.flush_lock.lock();
    let started = Instant::now();
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
        Err(error) => tracing::warn!(%error, "retention purge failed; retrying at the next interval"),
    }
}

/// Moves every partition's deltas into the store in one atomic commit. One flush at a
/// time: two interleaved flushes could commit their checkpoints out of order. A failed
/// commit marks the engine failed; the deltas it held stay visible to queries (as
/// "flushing") and are recovered from the log at the next start.
pub(crate) fn flush_once(shared: &Shared) -> Result<(), EngineError> {
    let _one_at_a_time = shared.flush_lock.lock();
    if let Some(reason) = shared.failure.lock().clone() {
        return Err(EngineError::Unavailable { reason });
    }
    let started = Instant::now();
    let mut taken = Vec::with_capacity(shared.partitions.len());
    for partition in &shared.partitions {
        let mut memory = partition.memory.lock();
        let checkpoint_offset = partition.checkpoint_offset.load(Ordering::Acquire);
        if memory.applied_offset == checkpoint_offset {
            continue;
        }
        let deltas = Arc::new(std::mem::take(&mut memory.state.deltas));
        let journal = memory.state.dedup.take_journal();
        let checkpoint = Checkpoint {
            partition: partition.index,
            offset: memory.applied_offset,
            dedup_generation_starts: memory.state.dedup.generation_starts(),
        };
        memory.flushing = Some((memory.pending_start, Arc::clone(&deltas)));
        memory.pending_start = memory.applied_offset;
        drop(memory);
        partition.drained.notify_all();
        taken.push((partition, deltas, checkpoint, journal));
    }
    if taken.is_empty() {
        return Ok(());
    }
    let cells: usize = taken.iter().map(|(_, deltas, ..)| deltas.cells()).sum();
    let flushes: Vec<PartitionFlush<'_>> = taken
        .iter_mut()
        .map(|(_, deltas, checkpoint, journal)| PartitionFlush {
            deltas,
            checkpoint: checkpoint.clone(),
            journal: std::mem::take(journal),
        })
        .collect();
    if let Err(error) = shared.store.commit(&flushes, &shared.write_cutoffs()) {
        shared.fail(format!("flush: {error}"));
        return Err(error.into());
    }
    drop(flushes);
    for (partition, _, checkpoint, _) in &taken {
        partition.memory.lock().flushing = None;
        partition.checkpoint_offset.store(checkpoint.offset, Ordering::Release);
    }
    metrics::histogram!("tally_flush_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("tally_flush_cells").record(cells as f64);
    Ok(())
}
