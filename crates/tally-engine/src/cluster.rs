//! Cluster mode: many engines share one partitioned log (Kafka) and one store
//! (PostgreSQL). Every engine appends: its writers only make records durable in the
//! shared log and answer. The log's consumer group gives each partition to one engine,
//! its owner, which claims it in the store (raising its owner epoch, which fences the
//! previous owner), restores its dedup memory, and applies the log from the stored
//! checkpoint through the same `PartitionState::apply` as recovery does. The flusher
//! commits the owned partitions as in single-node mode; a commit the store refuses
//! because another engine claimed a partition since drops that partition here, and
//! commits the others.
//!
//! Queries read the store, plus the deltas of the partitions this engine owns that the
//! store does not hold yet (the rule of `query.rs` holds for them unchanged).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tally_aggregate::{Applied, Dedup, Outcome, PartitionState};
use tally_core::log::{LogReader, Owner, PartitionLog, message_end};
use tally_core::record::ListRecords;
use tally_core::{RecordReader, partition_of};
use tally_store::CounterStore;

use crate::partition::{Memory, Partition, apply_noting, wait_for_room};
use crate::{Engine, EngineConfig, EngineError, Position, RecoveryReport, Shared, recovery};

/// How long `apply` sleeps while its partition has no room and the store cannot take a
/// flush, before it looks again.
const ROOM_WAIT: Duration = Duration::from_millis(100);

impl Engine {
    /// Starts a cluster node: `logs` append to the shared log (one per partition); no
    /// partition is owned until the log's group assigns it (`Engine::owner`).
    /// With an archive (`config.archive`), `reader` reads the shared log back for it.
    pub fn start_cluster(
        config: EngineConfig,
        store: Arc<dyn CounterStore>,
        logs: Vec<Box<dyn PartitionLog>>,
        reader: Option<Box<dyn LogReader>>,
    ) -> Result<Engine, EngineError> {
        assert_eq!(logs.len(), config.partitions as usize, "one log per partition");
        let mut partitions = Vec::with_capacity(logs.len());
        let mut writers = Vec::with_capacity(logs.len());
        for (index, log) in (0..config.partitions).zip(logs) {
            let (sender, receiver) = mpsc::channel();
            let partition = Partition::new(index, empty_memory(&config, 0), sender);
            partition.owned.store(false, Ordering::Relaxed);
            partitions.push(Arc::new(partition));
            writers.push((log, receiver));
        }
        let started = RecoveryReport { duration: Duration::ZERO, replayed_bytes: 0, replayed_records: 0 };
        recovery::launch(config, store, recovery::Mode::Cluster(reader), partitions, writers, started)
    }

    /// What the shared log's consumer calls as partitions come and go, and with each
    /// record list of an owned partition.
    pub fn owner(&self) -> Arc<dyn Owner> {
        Arc::new(ClusterOwner { shared: Arc::clone(&self.shared), interrupted: AtomicBool::new(false) })
    }

    /// Whether a query now sees every write `position` names: each partition's applied
    /// offset here (where this engine applies it), or else its checkpoint in the store.
    pub fn reached(&self, position: &Position) -> Result<bool, EngineError> {
        let shared = &self.shared;
        let mut snapshot = None;
        for &(index, offset) in position.parts() {
            let Some(partition) = shared.partitions.get(index as usize) else {
                let reason = format!("the position names partition {index}; there are {}", shared.partitions.len());
                return Err(EngineError::InvalidPosition { reason });
            };
            if partition.owned.load(Ordering::Acquire) && partition.memory.lock().applied_offset >= offset {
                continue;
            }
            if !shared.cluster {
                return Ok(false);
            }
            let snapshot = match &mut snapshot {
                Some(snapshot) => snapshot,
                None => snapshot.insert(shared.store.snapshot()?),
            };
            if snapshot.checkpoint_offset(index)? < offset {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn empty_memory(config: &EngineConfig, offset: u64) -> Memory {
    let state = PartitionState::new(Dedup::restore(config.dedup_window_ms, &[]));
    Memory { state, applied_offset: offset, pending_start: offset, flushing: None, uncounted: Vec::new() }
}

/// Forgets what this engine held of a partition it no longer owns: its deltas, flushed
/// or not, and its dedup memory. The next owner replays them from the log. The caller
/// holds the flush lock (no flush of it is under way).
pub(crate) fn drop_partition(shared: &Shared, partition: &Partition) {
    partition.owned.store(false, Ordering::Release);
    shared.store.release_partition(partition.index);
    let offset = partition.checkpoint_offset.load(Ordering::Acquire);
    *partition.memory.lock() = empty_memory(&shared.config, offset);
    partition.dedup_entries.store(0, Ordering::Relaxed);
    partition.drained.notify_all();
    let label = partition.index.to_string();
    metrics::gauge!("tally_partition_owned", "partition" => label.clone()).set(0.0);
    if shared.archiver.is_some() {
        // The next owner reports where the partition's archive stands.
        metrics::gauge!("tally_archive_lag_bytes", "partition" => label).set(0.0);
    }
}

struct ClusterOwner {
    shared: Arc<Shared>,
    /// Set by `Owner::interrupt`: nothing more is applied.
    interrupted: AtomicBool,
}

impl ClusterOwner {
    fn partition(&self, index: u32) -> Result<&Arc<Partition>, String> {
        let count = self.shared.partitions.len();
        self.shared.partitions.get(index as usize).ok_or_else(|| format!("partition {index} of {count}"))
    }

    /// Waits until the partition may take more deltas (its writer in single-node mode
    /// would wait likewise): the log holds what is not read yet. False when the engine
    /// stops or the log stops feeding it meanwhile.
    fn wait_for_room(&self, partition: &Partition) -> bool {
        loop {
            if !*self.shared.admission.read()
                || self.shared.failure.lock().is_some()
                || self.interrupted.load(Ordering::Acquire)
            {
                return false;
            }
            match wait_for_room(&self.shared, partition) {
                Ok(()) => return true,
                Err(_) => std::thread::sleep(ROOM_WAIT),
            }
        }
    }
}

impl Owner for ClusterOwner {
    fn claim(&self, index: u32) -> Result<u64, String> {
        let partition = self.partition(index)?;
        let started = Instant::now();
        let shared = &self.shared;
        // A node started before archiving was turned on must not own a partition the
        // archive needs notes of.
        shared.store.check_archive(shared.config.archive.as_deref()).map_err(|e| e.to_string())?;
        let mut flush_state = shared.flush_lock.lock();
        let claimed = shared.store.claim_partition(index).map_err(|e| e.to_string())?;
        let restored = recovery::restore(&*shared.store, &shared.config, index, claimed).map_err(|e| e.to_string());
        let archived = |restored| shared.archiver.as_ref().map_or(Ok(()), |a| a.claim(index)).map(|()| restored);
        let (offset, state) = match restored.and_then(archived) {
            Ok(restored) => restored,
            Err(error) => {
                // Not owned here after all: the store must not go on marking it alive.
                shared.store.release_partition(index);
                return Err(error);
            }
        };
        flush_state.forget(index);
        let entries = state.dedup.entries();
        *partition.memory.lock() =
            Memory { state, applied_offset: offset, pending_start: offset, flushing: None, uncounted: Vec::new() };
        partition.checkpoint_offset.store(offset, Ordering::Release);
        partition.dedup_entries.store(entries, Ordering::Relaxed);
        partition.owned.store(true, Ordering::Release);
        metrics::gauge!("tally_partition_owned", "partition" => index.to_string()).set(1.0);
        metrics::counter!("tally_partition_claims_total").increment(1);
        tracing::info!(partition = index, offset, seconds = started.elapsed().as_secs_f64(), "partition claimed");
        Ok(offset)
    }

    fn release(&self, index: u32) {
        let Ok(partition) = self.partition(index) else { return };
        if !partition.owned.load(Ordering::Acquire) {
            return;
        }
        // What is applied goes to the store first, so the next owner replays little.
        if let Err(error) = crate::checkpoint::flush_once(&self.shared) {
            tracing::warn!(partition = index, %error, "flush before giving a partition up failed");
        }
        // A node leaving archives what it checkpointed (a clean stop leaves the archive
        // complete); otherwise the next owner goes on from the store's archive progress.
        if let Some(archiver) = &self.shared.archiver
            && self.interrupted.load(Ordering::Acquire)
            && let Err(error) = archiver.hand_over(partition)
        {
            tracing::warn!(partition = index, %error, "the archive is behind at release; the next owner goes on");
        }
        let mut flush_state = self.shared.flush_lock.lock();
        flush_state.forget(index);
        drop_partition(&self.shared, partition);
        tracing::info!(partition = index, "partition released");
    }

    fn apply(&self, index: u32, offset: u64, list: &[u8]) -> Result<(), String> {
        let partition = self.partition(index)?;
        if !partition.owned.load(Ordering::Acquire) || !self.wait_for_room(partition) {
            return Ok(());
        }
        let records = decode(ListRecords::new(list), index, self.shared.config.partitions);
        let mut memory = partition.memory.lock();
        if !partition.owned.load(Ordering::Acquire) {
            return Ok(());
        }
        check_sequence(index, memory.applied_offset, offset);
        if offset < memory.applied_offset {
            return Ok(());
        }
        let end = message_end(offset);
        memory.applied_offset = end;
        let records = records?;
        let mut counted = Outcome::default();
        let Memory { state, uncounted, .. } = &mut *memory;
        for (position, record) in records.iter().enumerate() {
            // Notes name a frame by its end offset, as the log reader does.
            match apply_noting(state, record, end, position as u32, uncounted).expect("a record that decoded applies") {
                Applied::Done(outcome) => counted.add(outcome),
                Applied::Repeated(_) | Applied::KeyReused => {}
            }
        }
        partition.dedup_entries.store(memory.state.dedup.entries(), Ordering::Relaxed);
        drop(memory);
        metrics::counter!("tally_events_accepted_total").increment(u64::from(counted.accepted));
        metrics::counter!("tally_events_duplicate_total").increment(u64::from(counted.duplicates));
        Ok(())
    }

    fn next_offset(&self, index: u32) -> Option<u64> {
        let partition = self.partition(index).ok()?;
        let memory = partition.memory.lock();
        partition.owned.load(Ordering::Acquire).then_some(memory.applied_offset)
    }

    fn interrupt(&self) {
        self.interrupted.store(true, Ordering::Release);
    }

    fn failed(&self) -> bool {
        self.shared.failure.lock().is_some()
    }

    fn unowned(&self, silent: Duration) -> Result<Vec<u32>, String> {
        let silent_ms = i64::try_from(silent.as_millis()).unwrap_or(i64::MAX);
        self.shared.store.silent_partitions(silent_ms).map_err(|e| e.to_string())
    }

    fn checkpoints(&self) -> Vec<(u32, u64)> {
        let owned = self.shared.partitions.iter().filter(|p| p.owned.load(Ordering::Acquire));
        owned.map(|p| (p.index, p.checkpoint_offset.load(Ordering::Acquire))).collect()
    }
}

/// Reports what a Kafka log never does: an offset skipped (a gap: records deleted by
/// retention before they were applied; the feed has read the partition again before it
/// hands one over, see `Owner::next_offset`), which leaves counts short of what was
/// acknowledged, or the offset just applied delivered again (not applied twice).
fn check_sequence(partition: u32, expected: u64, got: u64) {
    let kind = if got > expected {
        "gap"
    } else if got + 1 == expected {
        "repeated_offset"
    } else {
        return;
    };
    metrics::counter!("tally_log_anomalies_total", "kind" => kind).increment(1);
    tracing::error!(
        partition,
        expected,
        got,
        kind,
        "the log broke its order: records are missing from the counts (check the broker and the topic's retention)"
    );
}

/// Decodes every record of a list read from the shared log, whole, before any is applied:
/// a list with a malformed record, or an event of another partition's video (which would
/// give that video a second writer), is refused whole (and not archived either).
pub(crate) fn decode<'a>(
    list: impl Iterator<Item = Result<&'a [u8], String>>,
    partition: u32,
    partitions: u32,
) -> Result<Vec<RecordReader<'a>>, String> {
    let mut records = Vec::new();
    for record in list {
        let reader = RecordReader::new(record?).map_err(|e| e.to_string())?;
        let mut foreign = None;
        reader
            .for_each_event(|event| {
                if foreign.is_none() && partition_of(event.video_id, partitions) != partition {
                    foreign = Some(event.video_id.to_string());
                }
            })
            .map_err(|e| e.to_string())?;
        if let Some(video) = foreign {
            return Err(format!("video {video:?} belongs to another partition than {partition}"));
        }
        records.push(reader);
    }
    Ok(records)
}
