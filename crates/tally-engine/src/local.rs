//! The data directory: where a node keeps its log and, by default, its store. This opens
//! what the engine is then given (`Engine::start`); the engine itself opens neither.
//!
//! ```text
//! <data_dir>/store.redb          embedded store (buckets, checkpoints, dedup journal)
//! <data_dir>/wal/p000/…          log segments of partition 0
//! <data_dir>/LOCK                held while a process uses the directory
//! ```

use std::fs;
use std::path::Path;
use std::sync::Arc;

use tally_store::{CounterStore, RedbStore};
use tally_wal::{LocalLog, WalOptions};

use crate::{EngineConfig, EngineError};

/// The embedded store's file inside the data directory.
pub const STORE_FILE: &str = "store.redb";
/// Where a new data directory's store is made; renamed to `STORE_FILE` once the whole
/// directory is (see `initialize`).
const STORE_STAGING_FILE: &str = "store.redb.new";

/// Opens (or makes) the data directory with its embedded store: the default node.
pub fn open(config: &EngineConfig) -> Result<(Arc<dyn CounterStore>, LocalLog), EngineError> {
    let log = lock(config)?;
    let data_dir = &config.data_dir;
    let data_dir_error = |source| EngineError::DataDir { path: data_dir.clone(), source };
    let store_path = data_dir.join(STORE_FILE);
    if !store_path.exists() {
        initialize(config, &log)?;
    }
    // Compaction rewrites the store and needs room: on a (nearly) full disk the server
    // still starts, serves reads, and lets flushes free log segments.
    let store_bytes = fs::metadata(&store_path).map_err(data_dir_error)?.len();
    let free = tally_wal::free_bytes(data_dir).map_err(data_dir_error)?;
    let may_compact = free >= store_bytes.saturating_add(config.disk_free_bytes_min);
    if !may_compact {
        tracing::warn!(free_bytes = free, store_bytes, "little free disk: the store is not compacted at start");
    }
    Ok((Arc::new(RedbStore::open(&store_path, config.store_cache_bytes, may_compact)?), log))
}

/// Opens (or makes) the data directory's log for a store kept elsewhere (a database).
/// The log of a partition the store has never seen starts empty; one the store has a
/// checkpoint for must be here (opening it says if not).
pub fn open_log(config: &EngineConfig, store: &dyn CounterStore) -> Result<LocalLog, EngineError> {
    let log = lock(config)?;
    for partition in 0..config.partitions {
        if !log.exists(partition) && store.checkpoint(partition)?.is_none() {
            log.create(partition)?;
        }
    }
    Ok(log)
}

/// Makes the data directory if need be and takes its lock, which the log keeps: two
/// processes on one directory would interleave their logs.
fn lock(config: &EngineConfig) -> Result<LocalLog, EngineError> {
    let data_dir = &config.data_dir;
    let data_dir_error = |source| EngineError::DataDir { path: data_dir.clone(), source };
    fs::create_dir_all(data_dir).map_err(data_dir_error)?;
    let lock_path = data_dir.join("LOCK");
    let lock = fs::File::create(&lock_path).map_err(data_dir_error)?;
    lock.try_lock().map_err(|_| EngineError::DataDir {
        path: lock_path.clone(),
        source: std::io::Error::other("another tally process is using this data directory"),
    })?;
    let options = WalOptions {
        segment_bytes_max: config.segment_bytes_max,
        free_bytes_min: config.disk_free_bytes_min,
        accept_damage: config.accept_log_loss,
    };
    Ok(LocalLog::new(&data_dir.join("wal"), options).holding(lock))
}

/// Makes a new data directory: the store (with its partition count) under a staging name,
/// then every partition's log, then the store under its own name, last. So a directory
/// whose first start failed part-way (a full disk, an I/O error) has no store file and is
/// simply made again, and a directory with a store file is whole.
fn initialize(config: &EngineConfig, log: &LocalLog) -> Result<(), EngineError> {
    let data_dir = &config.data_dir;
    let data_dir_error = |source| EngineError::DataDir { path: data_dir.clone(), source };
    let wal_root = data_dir.join("wal");
    if wal_root.exists() {
        refuse_logged_frames(&wal_root)?;
        fs::remove_dir_all(&wal_root).map_err(data_dir_error)?;
    }
    let staging = data_dir.join(STORE_STAGING_FILE);
    if staging.exists() {
        fs::remove_file(&staging).map_err(data_dir_error)?;
    }
    let store = RedbStore::open(&staging, config.store_cache_bytes, false)?;
    store.claim_partitions(config.partitions)?;
    drop(store);
    for index in 0..config.partitions {
        log.create(index)?;
    }
    fs::rename(&staging, data_dir.join(STORE_FILE)).map_err(data_dir_error)?;
    fs::File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(data_dir_error)?;
    tracing::info!(data_dir = %data_dir.display(), partitions = config.partitions, "data directory created");
    Ok(())
}

/// Logs without a store: left by a failed first start they hold no frame (every segment
/// starts with zeros); holding one, they mean the store file was removed, and starting
/// afresh would silently drop acknowledged events.
fn refuse_logged_frames(wal_root: &Path) -> Result<(), EngineError> {
    let missing = |detail: String| EngineError::DataDir {
        path: wal_root.parent().unwrap_or(wal_root).join(STORE_FILE),
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
