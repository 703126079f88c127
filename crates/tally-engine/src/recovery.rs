//! Opening a data directory: read each partition's checkpoint from the store, restore its
//! dedup memory from the journal, replay its log from the checkpoint, then start the
//! threads.
//!
//! ```text
//! <data_dir>/store.redb          aggregate store (buckets, checkpoints, dedup journal)
//! <data_dir>/wal/p000/…          log segments of partition 0
//! <data_dir>/LOCK                held while a process uses the directory
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::Mutex;
use tally_aggregate::{Dedup, PartitionState};
use tally_core::RecordReader;
use tally_store::{CounterStore, PoolOptions, PostgresStore, RedbStore};
use tally_wal::{Wal, WalOptions};

use crate::budget::QueueBudget;
use crate::checkpoint::{FlushSignal, FlushState, FlusherHandle};
use crate::partition::{Memory, Partition, run_writer};
use crate::{Engine, EngineConfig, EngineError, RecoveryReport, Shared, StoreLocation, types};

pub(crate) fn open(config: EngineConfig) -> Result<Engine, EngineError> {
    let started = Instant::now();
    assert!(config.partitions > 0, "at least one partition");
    let data_dir = &config.data_dir;
    let data_dir_error = |source| EngineError::DataDir { path: data_dir.clone(), source };
    fs::create_dir_all(data_dir).map_err(data_dir_error)?;
    let lock_path = data_dir.join("LOCK");
    let lock = fs::File::create(&lock_path).map_err(data_dir_error)?;
    lock.try_lock().map_err(|_| EngineError::DataDir {
        path: lock_path.clone(),
        source: std::io::Error::other("another tally process is using this data directory"),
    })?;
    let wal_options = WalOptions {
        segment_bytes_max: config.segment_bytes_max,
        free_bytes_min: config.disk_free_bytes_min,
        accept_damage: config.accept_log_loss,
    };
    let store = open_store(&config, wal_options)?;
    store.claim_partitions(config.partitions)?;

    let mut partitions = Vec::with_capacity(config.partitions as usize);
    let mut wals = Vec::with_capacity(config.partitions as usize);
    let mut replayed_bytes = 0;
    let mut replayed_records = 0;
    for index in 0..config.partitions {
        let checkpoint = store.checkpoint(index)?;
        let (offset, starts) = checkpoint.map_or((0, Vec::new()), |c| (c.offset, c.dedup_generation_starts));
        let mut blobs = Vec::with_capacity(starts.len());
        for start in starts {
            blobs.push((start, store.dedup_blobs(index, start)?));
        }
        let generations: Vec<(i64, Vec<&[u8]>)> =
            blobs.iter().map(|(start, blobs)| (*start, blobs.iter().map(Vec::as_slice).collect())).collect();
        let dedup = Dedup::restore(config.dedup_window_ms, &generations);
        let mut state = PartitionState::new(dedup);
        let mut applied_offset = offset;
        let wal = Wal::open(&wal_dir(data_dir, index), wal_options, offset, |end, records| {
            for record in records {
                let recovery_error =
                    |detail: String| EngineError::Recovery { partition: index, offset: applied_offset, detail };
                let record = record.map_err(recovery_error)?;
                let reader = RecordReader::new(record).map_err(|e| recovery_error(e.to_string()))?;
                state.apply(&reader).map_err(|e| recovery_error(e.to_string()))?;
                replayed_records += 1;
            }
            applied_offset = end;
            Ok::<(), EngineError>(())
        })??;
        replayed_bytes += applied_offset - offset;
        let memory = Memory { state, applied_offset, pending_start: offset, flushing: None };
        let (sender, receiver) = mpsc::channel();
        partitions.push(Arc::new(Partition::new(index, memory, sender)));
        wals.push((wal, receiver));
    }

    let event_types = types::EventTypes::new(known_types(&*store, &partitions)?, config.event_types_max);
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
        event_types,
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
    let recovery = RecoveryReport { duration: started.elapsed(), replayed_bytes, replayed_records };
    tracing::info!(seconds = recovery.duration.as_secs_f64(), replayed_bytes, replayed_records, "recovery complete");
    Ok(Engine { _lock: lock, shared, writers: Mutex::new(writers), flusher: Mutex::new(Some(flusher)), recovery })
}

fn wal_dir(data_dir: &Path, partition: u32) -> PathBuf {
    data_dir.join("wal").join(format!("p{partition:03}"))
}

/// Opens the store the configuration names; a data directory new to it is made first.
fn open_store(config: &EngineConfig, wal_options: WalOptions) -> Result<Arc<dyn CounterStore>, EngineError> {
    let data_dir = &config.data_dir;
    let data_dir_error = |source| EngineError::DataDir { path: data_dir.clone(), source };
    match &config.store {
        StoreLocation::Embedded => {
            let store_path = data_dir.join(crate::STORE_FILE);
            if !store_path.exists() {
                initialize(config, wal_options)?;
            }
            // Compaction rewrites the store and needs room: on a (nearly) full disk the
            // server still starts, serves reads, and lets flushes free log segments.
            let store_bytes = fs::metadata(&store_path).map_err(data_dir_error)?.len();
            let free = tally_wal::free_bytes(data_dir).map_err(data_dir_error)?;
            let may_compact = free >= store_bytes.saturating_add(config.disk_free_bytes_min);
            if !may_compact {
                tracing::warn!(free_bytes = free, store_bytes, "little free disk: the store is not compacted at start");
            }
            Ok(Arc::new(RedbStore::open(&store_path, config.store_cache_bytes, may_compact)?))
        }
        StoreLocation::Postgres { url, connections_max } => {
            let options = PoolOptions { connections_max: *connections_max, ..PoolOptions::default() };
            let store = PostgresStore::open(url, options)?;
            // The log of a partition the database has never seen starts empty; one the
            // database has a checkpoint for must be here (`Wal::open` says if not).
            for index in 0..config.partitions {
                let dir = wal_dir(data_dir, index);
                if !dir.exists() && store.checkpoint(index)?.is_none() {
                    Wal::create(&dir, wal_options)?;
                }
            }
            Ok(Arc::new(store))
        }
    }
}

/// Makes a new data directory: the store (with its partition count) under a staging name,
/// then every partition's log, then the store under its own name, last. So a directory
/// whose first start failed part-way (a full disk, an I/O error) has no store file and is
/// simply made again, and a directory with a store file is whole.
fn initialize(config: &EngineConfig, wal_options: WalOptions) -> Result<(), EngineError> {
    let data_dir = &config.data_dir;
    let data_dir_error = |source| EngineError::DataDir { path: data_dir.clone(), source };
    let wal_root = data_dir.join("wal");
    if wal_root.exists() {
        refuse_logged_frames(&wal_root)?;
        fs::remove_dir_all(&wal_root).map_err(data_dir_error)?;
    }
    let staging = data_dir.join(crate::STORE_STAGING_FILE);
    if staging.exists() {
        fs::remove_file(&staging).map_err(data_dir_error)?;
    }
    let store = RedbStore::open(&staging, config.store_cache_bytes, false)?;
    store.claim_partitions(config.partitions)?;
    drop(store);
    for index in 0..config.partitions {
        Wal::create(&wal_dir(data_dir, index), wal_options)?;
    }
    fs::rename(&staging, data_dir.join(crate::STORE_FILE)).map_err(data_dir_error)?;
    fs::File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(data_dir_error)?;
    tracing::info!(data_dir = %data_dir.display(), partitions = config.partitions, "data directory created");
    Ok(())
}

/// Logs without a store: left by a failed first start they hold no frame (every segment
/// starts with zeros); holding one, they mean the store file was removed, and starting
/// afresh would silently drop acknowledged events.
fn refuse_logged_frames(wal_root: &Path) -> Result<(), EngineError> {
    let missing = |detail: String| EngineError::DataDir {
        path: wal_root.parent().unwrap_or(wal_root).join(crate::STORE_FILE),
        source: std::io::Error::other(detail),
    };
    for partition in fs::read_dir(wal_root).map_err(|e| missing(e.to_string()))? {
        let partition = partition.map_err(|e| missing(e.to_string()))?.path();
        for segment in fs::read_dir(&partition).map_err(|e| missing(e.to_string()))? {
            let segment = segment.map_err(|e| missing(e.to_string()))?.path();
            let mut head = [0u8; tally_wal::FRAME_HEADER_BYTES];
            let read = fs::File::open(&segment).and_then(|mut f| std::io::Read::read(&mut f, &mut head));
            if read.is_ok_and(|n| n > 0) && head.iter().any(|&b| b != 0) {
                return Err(missing(format!(
                    "the store file is missing but the log holds events ({}); restore the store file",
                    segment.display()
                )));
            }
        }
    }
    Ok(())
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
