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
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::Mutex;
use tally_aggregate::{Dedup, PartitionState};
use tally_core::RecordReader;
use tally_store::{CounterStore, RedbStore};
use tally_wal::{Wal, WalOptions};

use crate::budget::QueueBudget;
use crate::checkpoint::{FlushSignal, FlusherHandle};
use crate::partition::{Memory, Partition, run_writer};
use crate::{Engine, EngineConfig, EngineError, RecoveryReport, Shared};

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
    let store: Arc<dyn CounterStore> =
        Arc::new(RedbStore::open(&data_dir.join(crate::STORE_FILE), config.store_cache_bytes)?);
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
        let wal_dir = data_dir.join("wal").join(format!("p{index:03}"));
        let wal_options = WalOptions { segment_bytes_max: config.segment_bytes_max };
        let wal = Wal::open(&wal_dir, wal_options, offset, |end, records| {
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

    let shared = Arc::new(Shared {
        budget: QueueBudget::new(config.queue_bytes_max),
        config,
        store,
        partitions,
        failure: Mutex::new(None),
        flush_signal: FlushSignal::default(),
        flush_lock: Mutex::new(()),
        admission: parking_lot::RwLock::new(true),
        keyed_order: Mutex::new(()),
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
