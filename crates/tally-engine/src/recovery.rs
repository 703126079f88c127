//! Starting the engine on the store and log it is given: claim the partitions, read each
//! one's checkpoint from the store, restore its dedup memory from the journal, replay its
//! log from the checkpoint, then start the threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::Mutex;
use tally_aggregate::{Dedup, PartitionState};
use tally_core::RecordReader;
use tally_core::log::{Log, LogReader, PartitionLog, Stop};
use tally_store::CounterStore;

use crate::archive::Archiver;
use crate::budget::QueueBudget;
use crate::checkpoint::{FlushSignal, FlushState, FlusherHandle};
use crate::partition::{Append, Memory, Partition, apply_noting, run_writer};
use crate::{Engine, EngineConfig, EngineError, RecoveryReport, Shared, types};

pub(crate) fn start(
    config: EngineConfig,
    store: Arc<dyn CounterStore>,
    log: Box<dyn Log>,
) -> Result<Engine, EngineError> {
    let started = Instant::now();
    assert!(config.partitions > 0, "at least one partition");
    store.claim_partitions(config.partitions)?;

    let mut partitions = Vec::with_capacity(config.partitions as usize);
    let mut wals = Vec::with_capacity(config.partitions as usize);
    let mut replayed_bytes = 0;
    let mut replayed_records = 0;
    for index in 0..config.partitions {
        let (offset, mut state) = restore(&*store, &config, index, store.checkpoint(index)?)?;
        let mut applied_offset = offset;
        let mut stopped = None;
        let mut uncounted = Vec::new();
        let replay = log.open(index, offset, &mut |end, records| {
            let recovery_error =
                |detail: String| EngineError::Recovery { partition: index, offset: applied_offset, detail };
            for (position, record) in records.enumerate() {
                let frame = end;
                let applied =
                    record.and_then(|record| RecordReader::new(record).map_err(|e| e.to_string())).and_then(|reader| {
                        apply_noting(&mut state, &reader, frame, position as u32, &mut uncounted)
                            .map_err(|e| e.to_string())
                    });
                if let Err(detail) = applied {
                    stopped = Some(recovery_error(detail));
                    return Err(Stop);
                }
                replayed_records += 1;
            }
            applied_offset = end;
            Ok(())
        })?;
        let Ok(wal) = replay else { return Err(stopped.expect("a replay stops with a reason")) };
        replayed_bytes += applied_offset - offset;
        let memory = Memory { state, applied_offset, pending_start: offset, flushing: None, uncounted };
        let (sender, receiver) = mpsc::channel();
        partitions.push(Arc::new(Partition::new(index, memory, sender)));
        wals.push((wal, receiver));
    }

    let recovery = RecoveryReport { duration: started.elapsed(), replayed_bytes, replayed_records };
    let engine = launch(config, store, Mode::Single(log), partitions, wals, recovery)?;
    tracing::info!(seconds = recovery.duration.as_secs_f64(), replayed_bytes, replayed_records, "recovery complete");
    Ok(engine)
}

/// The partitions' writers and receivers, in partition order.
pub(crate) type Writers = Vec<(Box<dyn PartitionLog>, mpsc::Receiver<Append>)>;

/// How the engine holds its log.
pub(crate) enum Mode {
    /// A single node: its own log, which its archive reads back.
    Single(Box<dyn Log>),
    /// A cluster node: writers append to the shared log; with an archive, this reads the
    /// owned partitions back.
    Cluster(Option<Box<dyn LogReader>>),
}

/// Starts the writer threads and the flusher over partitions made ready.
pub(crate) fn launch(
    config: EngineConfig,
    store: Arc<dyn CounterStore>,
    mode: Mode,
    partitions: Vec<Arc<Partition>>,
    wals: Writers,
    recovery: RecoveryReport,
) -> Result<Engine, EngineError> {
    let event_types = types::EventTypes::new(known_types(&*store, &partitions)?, config.event_types_max);
    let (log, cluster, archiver) = match mode {
        Mode::Single(log) => (Some(log), false, open_archiver(&config, &partitions)?),
        Mode::Cluster(reader) => (None, true, open_cluster_archiver(&config, &store, reader)?),
    };
    let record_bytes_max = wals.iter().map(|(wal, _)| wal.record_bytes_max()).min().unwrap_or(usize::MAX);
    let shared = Arc::new(Shared {
        budget: QueueBudget::new(config.queue_bytes_max),
        config,
        store,
        partitions,
        failure: Mutex::new(None),
        flush_signal: FlushSignal::default(),
        flush_lock: Mutex::new(FlushState::default()),
        store_trouble: Mutex::new(None),
        admission: parking_lot::RwLock::new(true),
        keyed_order: Mutex::new(()),
        recomputing: Mutex::new(()),
        event_types,
        record_bytes_max,
        cluster,
        archiver,
    });
    let mut writers = Vec::new();
    for (partition, (wal, receiver)) in shared.partitions.iter().zip(wals) {
        let (shared, partition) = (Arc::clone(&shared), Arc::clone(partition));
        let name = format!("tally-writer-{}", partition.index);
        writers.push(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || run_writer(shared, partition, wal, receiver))
                .expect("spawn writer thread"),
        );
    }
    let flusher = FlusherHandle::start(Arc::clone(&shared));
    let archiving = shared.archiver.as_ref().map(|archiver| {
        let (archiver, shared, stop) = (Arc::clone(archiver), Arc::clone(&shared), Arc::new(AtomicU8::new(0)));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tally-archiver".into())
            .spawn(move || {
                crate::archive::lower_priority();
                let run = std::panic::AssertUnwindSafe(|| archiver.run(&shared.partitions, &flag));
                if std::panic::catch_unwind(run).is_err() {
                    archiver
                        .set_trouble(Some("the archiver thread stopped (a panic, logged); restart to resume".into()));
                }
            })
            .expect("spawn archiver thread");
        (stop, thread)
    });
    Ok(Engine {
        _log: log,
        shared,
        writers: Mutex::new(writers),
        flusher: Mutex::new(Some(flusher)),
        archiving: Mutex::new(archiving),
        recovery,
    })
}

/// The archiver, when an archive is configured; otherwise the notes of an earlier
/// archiving are dropped (flushes will not keep them up).
fn open_archiver(config: &EngineConfig, partitions: &[Arc<Partition>]) -> Result<Option<Arc<Archiver>>, EngineError> {
    match &config.archive {
        Some(location) => {
            let checkpoints: Vec<u64> =
                partitions.iter().map(|p| p.checkpoint_offset.load(Ordering::Acquire)).collect();
            let reader = Box::new(tally_wal::LocalReader::new(&config.data_dir.join("wal")));
            let archiver = Archiver::open(location, config, &checkpoints, reader)
                .map_err(|reason| EngineError::Unavailable { reason: format!("archive {location}: {reason}") })?;
            Ok(Some(Arc::new(archiver)))
        }
        None => {
            crate::archive::forget_notes(&config.data_dir)
                .map_err(|source| EngineError::DataDir { path: config.data_dir.join("archive-notes"), source })?;
            Ok(None)
        }
    }
}

/// Cluster mode: the archiver, when an archive is configured (`reader` then reads the
/// shared log back). Every node archives to the same place or none does
/// (`CounterStore::check_archive`).
fn open_cluster_archiver(
    config: &EngineConfig,
    store: &Arc<dyn CounterStore>,
    reader: Option<Box<dyn LogReader>>,
) -> Result<Option<Arc<Archiver>>, EngineError> {
    store.check_archive(config.archive.as_deref())?;
    let Some(location) = &config.archive else { return Ok(None) };
    let unavailable = |reason: String| EngineError::Unavailable { reason: format!("archive {location}: {reason}") };
    let reader = reader.ok_or_else(|| unavailable("no reader of the shared log was given".into()))?;
    let archiver = Archiver::open_cluster(location, config, Arc::clone(store), reader).map_err(unavailable)?;
    Ok(Some(Arc::new(archiver)))
}

/// A partition's state as its checkpoint left it: the offset to replay from, and the
/// dedup memory restored from the journal (no deltas: the store holds them).
pub(crate) fn restore(
    store: &dyn CounterStore,
    config: &EngineConfig,
    index: u32,
    checkpoint: Option<tally_store::Checkpoint>,
) -> Result<(u64, PartitionState), EngineError> {
    let (offset, starts) = checkpoint.map_or((0, Vec::new()), |c| (c.offset, c.dedup_generation_starts));
    let mut blobs = Vec::with_capacity(starts.len());
    for start in starts {
        blobs.push((start, store.dedup_blobs(index, start)?));
    }
    let generations: Vec<(i64, Vec<&[u8]>)> =
        blobs.iter().map(|(start, blobs)| (*start, blobs.iter().map(Vec::as_slice).collect())).collect();
    Ok((offset, PartitionState::new(Dedup::restore(config.dedup_window_ms, &generations))))
}

/// The event types with events: stored, or in a partition's memory.
pub(crate) fn known_types(store: &dyn CounterStore, partitions: &[Arc<Partition>]) -> Result<Vec<String>, EngineError> {
    let mut known = store.snapshot()?.types()?;
    for partition in partitions {
        let memory = partition.memory.lock();
        let flushing = memory.flushing.iter().flat_map(|(_, deltas)| deltas.types());
        known.extend(memory.state.deltas.types().iter().chain(flushing).map(|t| t.to_string()));
    }
    known.sort_unstable();
    known.dedup();
    Ok(known)
}
