//! The embedded store on redb: a copy-on-write B-tree with MVCC snapshots, so readers never
//! wait for the flusher, and one fsync-ed commit per flush.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use tally_core::bucket::DAY_MINUTES;
use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Counter, CounterRow, Cutoffs, Granularity, Span, TOP_SKETCH_ITEMS, TierRows};

use crate::file::StoreFile;
use crate::key::{self, bucket_key, bucket_prefix, decode_counter, encode_counter, ordered_i64};
use crate::tables::{self, Kind};
use crate::{Checkpoint, CounterStore, PartitionFlush, Snapshot, StoreError, TableUsage};

const CHECKPOINTS: TableDefinition<u32, &[u8]> = TableDefinition::new("checkpoints");
const DEDUP: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dedup");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TYPES: TableDefinition<&str, &[u8]> = TableDefinition::new("types");
const META_PARTITIONS: &str = "partitions";
const META_FORMAT: &str = "format";
/// Version of the data directory's layout (`tables`, `key`, and the log's segments).
/// Format 1 kept every bucket in one table; format 2 had log segments without trailers
/// and roll markers, and no per-video type index.
const FORMAT: u32 = 3;
/// Compaction at open runs when at least this share of the file is free pages.
const COMPACT_FREE_SHARE: f64 = 0.5;

pub struct RedbStore {
    /// `None` from a failed write until `recover` has opened the file again: redb refuses
    /// every operation after an I/O error until it is closed.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    cache_bytes: usize,
    /// See `StoreFile::sync_failed`.
    sync_failed: Arc<AtomicBool>,
}

/// redb's errors, with the ones that mean "closed, or refusing everything since an I/O
/// error, until reopened" as `Reopening`.
fn redb_error<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| match e.into() {
        redb::Error::PreviousIo | redb::Error::DatabaseClosed => StoreError::Reopening,
        source => StoreError::Redb { context, source },
    }
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, with a page cache of at most `cache_bytes`.
    /// When retention has freed at least half of the file and `may_compact`, it is
    /// compacted first, which returns the space to the file system (compaction needs free
    /// disk about the size of the file).
    pub fn open(path: &Path, cache_bytes: usize, may_compact: bool) -> Result<RedbStore, StoreError> {
        let sync_failed = Arc::new(AtomicBool::new(false));
        let mut db = open_database(path, cache_bytes, &sync_failed)?;
        let txn = db.begin_write().map_err(redb_error("open"))?;
        {
            txn.open_table(CHECKPOINTS).map_err(redb_error("create tables"))?;
            txn.open_table(DEDUP).map_err(redb_error("create tables"))?;
            txn.open_table(TYPES).map_err(redb_error("create tables"))?;
            let mut meta = txn.open_table(META).map_err(redb_error("create tables"))?;
            let format = meta.get(META_FORMAT).map_err(redb_error("read format"))?.map(|v| v.value().to_vec());
            let partitions = meta.get(META_PARTITIONS).map_err(redb_error("read format"))?.is_some();
            match format {
                Some(bytes) if bytes == FORMAT.to_le_bytes() => {}
                Some(bytes) => return Err(StoreError::Format { found: format!("{bytes:?}"), expected: FORMAT }),
                None if partitions => return Err(StoreError::Format { found: "1".into(), expected: FORMAT }),
                None => {
                    meta.insert(META_FORMAT, &FORMAT.to_le_bytes()[..]).map_err(redb_error("write format"))?;
                }
            }
        }
        let stats = txn.stats().map_err(redb_error("read stats"))?;
        txn.commit().map_err(redb_error("create tables"))?;
        let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if may_compact && file_bytes > 0 && stats.fragmented_bytes() as f64 >= COMPACT_FREE_SHARE * file_bytes as f64 {
            tracing::info!(file_bytes, free_bytes = stats.fragmented_bytes(), "compacting the store");
            db.compact().map_err(redb_error("compact"))?;
        }
        Ok(RedbStore { db: RwLock::new(Some(db)), path: path.to_path_buf(), cache_bytes, sync_failed })
    }

    fn db(&self) -> Result<MappedRwLockReadGuard<'_, Database>, StoreError> {
        RwLockReadGuard::try_map(self.db.read(), Option::as_ref).map_err(|_| StoreError::Reopening)
    }

    /// A write's error, as `SyncFailed` once a sync of the file failed.
    fn written<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match result {
            Err(error) if self.sync_failed.load(Ordering::Acquire) => {
                Err(StoreError::SyncFailed { detail: error.to_string() })
            }
            result => result,
        }
    }
}

fn open_database(path: &Path, cache_bytes: usize, sync_failed: &Arc<AtomicBool>) -> Result<Database, StoreError> {
    let file = StoreFile::open(path, Arc::clone(sync_failed)).map_err(redb_error("open"))?;
    redb::Builder::new().set_cache_size(cache_bytes).create_with_backend(file).map_err(redb_error("open"))
}

/// redb's page size.
const PAGE_BYTES: u64 = 4096;

impl RedbStore {
    /// Bytes the store file takes on disk.
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        Ok(std::fs::metadata(&self.path)
            .map_err(|e| StoreError::Redb { context: "stat store file", source: redb::Error::Io(e) })?
            .len())
    }

    /// Space per table group, for capacity planning (`tally store-stats`).
    pub fn usage(&self) -> Result<Vec<TableUsage>, StoreError> {
        let txn = self.db()?.begin_read().map_err(redb_error("begin read"))?;
        let mut groups: BTreeMap<String, TableUsage> = BTreeMap::new();
        for handle in txn.list_tables().map_err(redb_error("list tables"))? {
            let name = handle.name().to_string();
            let group = match tables::parse(&name) {
                Some(_) => name.rsplit_once('.').map_or(name.clone(), |(group, _)| group.to_string()),
                None => name.clone(),
            };
            let table = txn.open_untyped_table(handle).map_err(redb_error("open table"))?;
            let stats = table.stats().map_err(redb_error("table stats"))?;
            let usage = groups.entry(group.clone()).or_insert_with(|| TableUsage { group, ..TableUsage::default() });
            usage.tables += 1;
            usage.rows += table.len().map_err(redb_error("table length"))?;
            usage.stored_bytes += stats.stored_bytes();
            usage.page_bytes += (stats.leaf_pages() + stats.branch_pages()) * PAGE_BYTES;
        }
        Ok(groups.into_values().collect())
    }
}

/// Bounds the generation list a checkpoint may hold; dedup keeps about six alive.
const CHECKPOINT_GENERATIONS_MAX: usize = 64;

fn decode_checkpoint(partition: u32, bytes: &[u8]) -> Result<Checkpoint, StoreError> {
    let corrupt = || StoreError::Corrupt {
        detail: format!("checkpoint of partition {partition} is malformed ({} bytes)", bytes.len()),
    };
    let (offset, rest) = bytes.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (count, rest) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let count = u32::from_le_bytes(*count) as usize;
    if count > CHECKPOINT_GENERATIONS_MAX || rest.len() != count * 8 {
        return Err(corrupt());
    }
    Ok(Checkpoint {
        partition,
        offset: u64::from_le_bytes(*offset),
        dedup_generation_starts: rest
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    })
}

fn encode_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    let starts = &checkpoint.dedup_generation_starts;
    assert!(starts.len() <= CHECKPOINT_GENERATIONS_MAX, "{} dedup generations alive", starts.len());
    let mut out = Vec::with_capacity(12 + 8 * starts.len());
    out.extend_from_slice(&checkpoint.offset.to_le_bytes());
    out.extend_from_slice(&(starts.len() as u32).to_le_bytes());
    for start in starts {
        out.extend_from_slice(&start.to_le_bytes());
    }
    out
}

impl CounterStore for RedbStore {
    fn claim_partitions(&self, partitions: u32) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write().map_err(redb_error("claim partitions"))?;
        {
            let mut meta = txn.open_table(META).map_err(redb_error("claim partitions"))?;
            let stored = meta.get(META_PARTITIONS).map_err(redb_error("claim partitions"))?.map(|v| v.value().to_vec());
            match stored {
                Some(bytes) => {
                    let stored = u32::from_le_bytes(
                        bytes
                            .as_slice()
                            .try_into()
                            .map_err(|_| StoreError::Corrupt { detail: "partition count is not 4 bytes".into() })?,
                    );
                    if stored != partitions {
                        return Err(StoreError::PartitionCount { stored, configured: partitions });
                    }
                }
                None => {
                    meta.insert(META_PARTITIONS, &partitions.to_le_bytes()[..])
                        .map_err(redb_error("claim partitions"))?;
                }
            }
        }
        txn.commit().map_err(redb_error("claim partitions"))
    }

    fn checkpoint(&self, partition: u32) -> Result<Option<Checkpoint>, StoreError> {
        let txn = self.db()?.begin_read().map_err(redb_error("read checkpoint"))?;
        let table = txn.open_table(CHECKPOINTS).map_err(redb_error("read checkpoint"))?;
        let value = table.get(partition).map_err(redb_error("read checkpoint"))?;
        value.map(|v| decode_checkpoint(partition, v.value())).transpose()
    }

    fn dedup_blobs(&self, partition: u32, generation_start_ms: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db()?.begin_read().map_err(redb_error("read dedup journal"))?;
        let table = txn.open_table(DEDUP).map_err(redb_error("read dedup journal"))?;
        let start = key::dedup_key(partition, generation_start_ms, 0);
        let end = key::dedup_key(partition, generation_start_ms, u64::MAX);
        let mut blobs = Vec::new();
        for entry in table.range(&start[..]..=&end[..]).map_err(redb_error("read dedup journal"))? {
            let (_, value) = entry.map_err(redb_error("read dedup journal"))?;
            blobs.push(value.value().to_vec());
        }
        Ok(blobs)
    }

    fn commit<'a>(
        &self,
        flushes: &[PartitionFlush<'_>],
        tiers: &mut dyn FnMut(Granularity) -> TierRows<'a>,
    ) -> Result<(), StoreError> {
        // A single node's archiver keeps its notes beside the log.
        debug_assert!(flushes.iter().all(|flush| flush.notes.is_empty()), "archive notes given to the embedded store");
        self.written(self.commit_flush(flushes, tiers))
    }

    fn purge(&self, cutoffs: &Cutoffs) -> Result<usize, StoreError> {
        self.written(self.purge_expired(cutoffs))
    }

    fn rewrite<'a>(&self, tiers: &mut dyn FnMut(Granularity) -> TierRows<'a>) -> Result<(), StoreError> {
        self.written(self.rewrite_buckets(tiers))
    }

    /// Closes the file and opens it again; redb repairs what the failed write left. Refused
    /// after a failed sync (see `StoreFile::sync_failed`).
    fn recover(&self) -> Result<(), StoreError> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::SyncFailed { detail: "an earlier sync failed".into() });
        }
        // Not held while opening, which may repair the file: queries meanwhile get
        // `Reopening` instead of waiting.
        let closed = self.db.write().take();
        drop(closed);
        let db = open_database(&self.path, self.cache_bytes, &self.sync_failed)?;
        *self.db.write() = Some(db);
        tracing::info!("store reopened after a failed write");
        Ok(())
    }

    fn needs_recovery(&self) -> bool {
        matches!(self.db().and_then(|db| db.begin_read().map_err(redb_error("probe"))), Err(StoreError::Reopening))
    }

    fn snapshot(&self) -> Result<Box<dyn Snapshot + '_>, StoreError> {
        let txn = self.db()?.begin_read().map_err(redb_error("begin read"))?;
        let checkpoints = txn.open_table(CHECKPOINTS).map_err(redb_error("begin read"))?;
        Ok(Box::new(RedbSnapshot { txn, checkpoints, tables: RefCell::new(HashMap::new()) }))
    }
}

impl RedbStore {
    fn commit_flush<'a>(
        &self,
        flushes: &[PartitionFlush<'_>],
        tiers: &mut dyn FnMut(Granularity) -> TierRows<'a>,
    ) -> Result<(), StoreError> {
        fail::fail_point!("store::commit", |_| Err(redb_error("commit flush")(redb::Error::Io(
            std::io::ErrorKind::StorageFull.into()
        ))));
        let txn = self.db()?.begin_write().map_err(redb_error("begin flush"))?;
        {
            // One granularity at a time: the sorted rows of a flush are held for one tier,
            // not all three at once.
            for granularity in Granularity::ALL {
                FlushWork::build(tiers(granularity), false).write(&txn)?;
            }
            let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(redb_error("flush checkpoints"))?;
            let mut dedup = txn.open_table(DEDUP).map_err(redb_error("flush dedup journal"))?;
            for flush in flushes {
                let checkpoint = &flush.checkpoint;
                let stored = checkpoints.get(checkpoint.partition).map_err(redb_error("flush checkpoints"))?;
                let stored = stored.map(|v| decode_checkpoint(checkpoint.partition, v.value())).transpose()?;
                let stored_offset = stored.map_or(0, |c| c.offset);
                if stored_offset != flush.start {
                    return Err(StoreError::Fenced {
                        partition: checkpoint.partition,
                        detail: format!(
                            "the stored checkpoint is at offset {stored_offset}, this flush starts at {}",
                            flush.start
                        ),
                    });
                }
                checkpoints
                    .insert(checkpoint.partition, encode_checkpoint(checkpoint).as_slice())
                    .map_err(redb_error("flush checkpoints"))?;
                for (generation_start, blob) in flush.journal {
                    let key = key::dedup_key(checkpoint.partition, *generation_start, checkpoint.offset);
                    dedup.insert(&key[..], blob.as_slice()).map_err(redb_error("flush dedup journal"))?;
                }
                // Forget generations older than the oldest still alive (all, if none is).
                let keep_from = checkpoint.dedup_generation_starts.first().copied().unwrap_or(i64::MAX);
                let start = key::dedup_key(checkpoint.partition, i64::MIN, 0);
                let end = key::dedup_key(checkpoint.partition, keep_from, 0);
                dedup.retain_in(&start[..]..&end[..], |_, _| false).map_err(redb_error("purge dedup journal"))?;
            }
        }
        txn.commit().map_err(redb_error("commit flush"))
    }

    fn rewrite_buckets<'a>(&self, tiers: &mut dyn FnMut(Granularity) -> TierRows<'a>) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write().map_err(redb_error("begin rewrite"))?;
        for granularity in Granularity::ALL {
            FlushWork::build(tiers(granularity), true).write(&txn)?;
        }
        txn.commit().map_err(redb_error("commit rewrite"))
    }

    fn purge_expired(&self, cutoffs: &Cutoffs) -> Result<usize, StoreError> {
        let txn = self.db()?.begin_write().map_err(redb_error("begin purge"))?;
        let expired: Vec<String> = txn
            .list_tables()
            .map_err(redb_error("list tables"))?
            .map(|handle| handle.name().to_string())
            .filter(|name| {
                tables::parse(name).is_some_and(|(_, granularity, period)| {
                    tables::entirely_before(granularity, period, cutoffs.of(granularity))
                })
            })
            .collect();
        for name in &expired {
            txn.delete_table(blob_table(name)).map_err(redb_error("drop expired table"))?;
        }
        // A type whose last day is past day retention has no stored events left.
        let day_cutoff = cutoffs.of(Granularity::Day);
        let mut types = txn.open_table(TYPES).map_err(redb_error("purge types"))?;
        let mut malformed = None;
        types
            .retain(|event_type, last_day| match decode_last_day(last_day) {
                Ok(day) => day.saturating_add(DAY_MINUTES) > day_cutoff,
                Err(detail) => {
                    malformed.get_or_insert_with(|| corrupt("types", format!("type {event_type}: {detail}")));
                    true
                }
            })
            .map_err(redb_error("purge types"))?;
        drop(types);
        if let Some(error) = malformed {
            return Err(error);
        }
        txn.commit().map_err(redb_error("commit purge"))?;
        Ok(expired.len())
    }
}

type BlobTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;
/// A table a snapshot opened, or `None` when it does not exist.
type OpenedTable = Option<Rc<BlobTable>>;

fn blob_table(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// See `crate::fuzz_values`.
pub(crate) fn fuzz_values(bytes: &[u8]) {
    if let Ok(counter) = decode_counter(bytes) {
        assert_eq!(decode_counter(&encode_counter(counter)), Ok(counter));
    }
    if let Ok(checkpoint) = decode_checkpoint(7, bytes) {
        assert_eq!(decode_checkpoint(7, &encode_checkpoint(&checkpoint)).ok(), Some(checkpoint));
    }
    let _ = decode_last_day(bytes);
    if let Ok(name) = std::str::from_utf8(bytes)
        && let Some((kind, granularity, period)) = tables::parse(name)
    {
        assert_eq!(tables::parse(&tables::name(kind, granularity, period)), Some((kind, granularity, period)));
    }
}

/// The value of a `types` row: the last day bucket with events.
fn decode_last_day(value: &[u8]) -> Result<i64, String> {
    value.try_into().map(i64::from_le_bytes).map_err(|_| format!("last day is {} bytes, not 8", value.len()))
}

fn corrupt(table: &str, detail: String) -> StoreError {
    StoreError::Corrupt { detail: format!("table {table}: {detail}") }
}

/// (granularity, period): with a kind, it names a table.
type TableOf = (Granularity, i64);

/// A flush's writes to the tables of one granularity, grouped by table and sorted by key
/// within each: neighbouring keys share B-tree pages.
#[derive(Default)]
struct FlushWork<'a> {
    /// Sorted by (table, key): keyed only as they are written, so a flush holds its rows
    /// once, not rows and keys.
    counters: Vec<CounterRow<'a>>,
    granularity: Option<Granularity>,
    uniques: BTreeMap<TableOf, BTreeMap<Vec<u8>, Hll>>,
    top: BTreeMap<TableOf, BTreeMap<Vec<u8>, TopSketch>>,
    videos: BTreeMap<TableOf, KeyedRows<()>>,
    video_types: BTreeMap<TableOf, KeyedRows<()>>,
    /// The last day bucket each type has events in (day tier only).
    last_days: HashMap<String, i64>,
    /// Rows replace what is stored instead of adding to it (recompute); a zero counter
    /// removes its row.
    replace: bool,
}

/// Rows of one table with distinct keys, the keys back to back in one buffer: one
/// allocation for all of them instead of one per key.
struct KeyedRows<V> {
    bytes: Vec<u8>,
    rows: Vec<(usize, usize, V)>,
}

impl<V> Default for KeyedRows<V> {
    fn default() -> Self {
        KeyedRows { bytes: Vec::new(), rows: Vec::new() }
    }
}

impl<V> KeyedRows<V> {
    fn push(&mut self, key: &[u8], value: V) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.rows.push((start, self.bytes.len(), value));
    }

    /// Into key order, so that neighbouring writes share B-tree pages.
    fn sort(&mut self) {
        let bytes = &self.bytes;
        self.rows.sort_unstable_by(|a, b| bytes[a.0..a.1].cmp(&bytes[b.0..b.1]));
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.rows.iter().map(|(start, end, value)| (&self.bytes[*start..*end], value))
    }

    fn last(&self) -> Option<&[u8]> {
        self.rows.last().map(|(start, end, _)| &self.bytes[*start..*end])
    }
}

impl<'a> FlushWork<'a> {
    /// One tier's rows, keyed and grouped by the table they go to: counter rows also
    /// become the video index and the per-video type index (day tier).
    fn build(mut rows: TierRows<'a>, replace: bool) -> FlushWork<'a> {
        let granularity = rows.granularity;
        let mut work = FlushWork { granularity: Some(granularity), replace, ..FlushWork::default() };
        let table = |bucket: i64| (granularity, tables::period_of(granularity, bucket));
        let mut key = Vec::new();
        // The order of `bucket_key`'s bytes: length-prefixed type, length-prefixed video,
        // bucket.
        fn order<'r>(granularity: Granularity, row: &CounterRow<'r>) -> (i64, usize, &'r str, usize, &'r str, i64) {
            let period = tables::period_of(granularity, row.bucket);
            (period, row.event_type.len(), row.event_type, row.video_id.len(), row.video_id, row.bucket)
        }
        rows.counters.sort_unstable_by(|a, b| order(granularity, a).cmp(&order(granularity, b)));
        // Replacing, a zero counter removes its row: it adds nothing to the indexes.
        let kept;
        let indexed = if replace {
            let counters = rows.counters.iter().filter(|r| r.counter != Counter::default()).copied().collect();
            kept = TierRows { counters, ..TierRows::new(granularity) };
            &kept
        } else {
            &rows
        };
        for (event_type, day, video_id) in indexed.videos() {
            key::videos_key(&mut key, event_type, day, video_id);
            work.videos.entry(table(day)).or_default().push(&key, ());
            // One row per (type, video, day table): sorted by table, then type and video,
            // a repeat is always the previous row of its table.
            key::video_types_key(&mut key, video_id, event_type);
            let rows = work.video_types.entry(table(day)).or_default();
            if rows.last() != Some(key.as_slice()) {
                rows.push(&key, ());
            }
        }
        for (event_type, last) in indexed.last_days() {
            work.last_days.insert(event_type.to_owned(), last);
        }
        for row in rows.uniques {
            bucket_key(&mut key, row.event_type, row.video_id, row.bucket);
            work.uniques.entry(table(row.bucket)).or_default().insert(key.clone(), row.sketch);
        }
        for row in rows.top {
            key::top_key(&mut key, row.event_type, row.bucket);
            work.top.entry(table(row.bucket)).or_default().insert(key.clone(), row.sketch);
        }
        work.counters = std::mem::take(&mut rows.counters);
        work.videos.values_mut().for_each(KeyedRows::sort);
        work.video_types.values_mut().for_each(KeyedRows::sort);
        work
    }

    /// Adds the counter rows into their tables, one table after the other.
    fn write_counters(&self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let Some(granularity) = self.granularity else { return Ok(()) };
        let mut key = Vec::new();
        for rows in self
            .counters
            .chunk_by(|a, b| tables::period_of(granularity, a.bucket) == tables::period_of(granularity, b.bucket))
        {
            let name = tables::name(Kind::Counters, granularity, tables::period_of(granularity, rows[0].bucket));
            let mut table = txn.open_table(blob_table(&name)).map_err(redb_error("flush counters"))?;
            for row in rows {
                bucket_key(&mut key, row.event_type, row.video_id, row.bucket);
                if self.replace && row.counter == Counter::default() {
                    table.remove(key.as_slice()).map_err(redb_error("rewrite counters"))?;
                    continue;
                }
                let mut counter = match table.get(key.as_slice()).map_err(redb_error("flush counters"))? {
                    Some(stored) if !self.replace => {
                        decode_counter(stored.value()).map_err(|detail| corrupt(&name, detail))?
                    }
                    _ => Counter::default(),
                };
                counter.add(row.counter);
                table.insert(key.as_slice(), &encode_counter(counter)[..]).map_err(redb_error("flush counters"))?;
            }
        }
        Ok(())
    }

    /// Writes these rows into their tables: counters and sketches merged with what is
    /// stored, the video index inserted.
    fn write(self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        self.write_counters(txn)?;
        for (&(granularity, period), sketches) in &self.uniques {
            let name = tables::name(Kind::Uniques, granularity, period);
            let mut table = txn.open_table(blob_table(&name)).map_err(redb_error("flush uniques"))?;
            for (key, sketch) in sketches {
                if self.replace && sketch.is_empty() {
                    table.remove(key.as_slice()).map_err(redb_error("rewrite uniques"))?;
                    continue;
                }
                let mut merged = match table.get(key.as_slice()).map_err(redb_error("flush uniques"))? {
                    Some(stored) if !self.replace => {
                        Hll::decode(stored.value()).map_err(|detail| corrupt(&name, detail))?
                    }
                    _ => Hll::default(),
                };
                merged.merge(sketch);
                table.insert(key.as_slice(), merged.encode().as_slice()).map_err(redb_error("flush uniques"))?;
            }
        }
        for ((granularity, period), sketches) in self.top {
            let name = tables::name(Kind::Top, granularity, period);
            let mut table = txn.open_table(blob_table(&name)).map_err(redb_error("flush top items"))?;
            for (key, mut merged) in sketches {
                if self.replace && merged.is_empty() {
                    table.remove(key.as_slice()).map_err(redb_error("rewrite top items"))?;
                    continue;
                }
                if let Some(stored) = table.get(key.as_slice()).map_err(redb_error("flush top items"))?
                    && !self.replace
                {
                    merged.merge_encoded(stored.value()).map_err(|detail| corrupt(&name, detail))?;
                }
                merged.prune(TOP_SKETCH_ITEMS[granularity as usize]);
                table.insert(key.as_slice(), merged.encode().as_slice()).map_err(redb_error("flush top items"))?;
            }
        }
        for (kind, index) in [(Kind::Videos, &self.videos), (Kind::VideoTypes, &self.video_types)] {
            for (&(granularity, period), keys) in index {
                let name = tables::name(kind, granularity, period);
                let mut table = txn.open_table(blob_table(&name)).map_err(redb_error("flush video index"))?;
                let mut previous: Option<&[u8]> = None;
                for (key, ()) in keys.iter() {
                    if previous != Some(key) {
                        table.insert(key, &[][..]).map_err(redb_error("flush video index"))?;
                    }
                    previous = Some(key);
                }
            }
        }
        let mut types = txn.open_table(TYPES).map_err(redb_error("flush types"))?;
        for (event_type, day) in &self.last_days {
            let stored = match types.get(event_type.as_str()).map_err(redb_error("flush types"))? {
                Some(stored) => Some(decode_last_day(stored.value()).map_err(|d| corrupt("types", d))?),
                None => None,
            };
            if stored.is_none_or(|stored| stored < *day) {
                types.insert(event_type.as_str(), &day.to_le_bytes()[..]).map_err(redb_error("flush types"))?;
            }
        }
        Ok(())
    }
}

/// Sees one (key, value) row of a scan; refuses a malformed one with a detail.
type RowVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), String> + 'a;

struct RedbSnapshot {
    txn: redb::ReadTransaction,
    checkpoints: redb::ReadOnlyTable<u32, &'static [u8]>,
    /// Tables opened so far; `None` when the table does not exist.
    tables: RefCell<HashMap<(Kind, TableOf), OpenedTable>>,
}

impl RedbSnapshot {
    fn table(&self, kind: Kind, granularity: Granularity, period: i64) -> Result<OpenedTable, StoreError> {
        if let Some(table) = self.tables.borrow().get(&(kind, (granularity, period))) {
            return Ok(table.clone());
        }
        let name = tables::name(kind, granularity, period);
        let table = match self.txn.open_table(blob_table(&name)) {
            Ok(table) => Some(Rc::new(table)),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(redb_error("open table")(e)),
        };
        self.tables.borrow_mut().insert((kind, (granularity, period)), table.clone());
        Ok(table)
    }

    /// Visits every (key, value) of `kind` whose bucket lies in `[start, end)`, where the
    /// key is `prefix | bucket | …`. A visitor refuses a malformed row with a detail; the
    /// error then names the table.
    fn scan(
        &self,
        kind: Kind,
        granularity: Granularity,
        prefix: &[u8],
        start: i64,
        end: i64,
        visit: &mut RowVisitor<'_>,
    ) -> Result<(), StoreError> {
        let (mut low, mut high) = (prefix.to_vec(), prefix.to_vec());
        for (period, from, to) in tables::periods(granularity, start, end) {
            let Some(table) = self.table(kind, granularity, period)? else { continue };
            low.truncate(prefix.len());
            high.truncate(prefix.len());
            low.extend_from_slice(&ordered_i64(from));
            high.extend_from_slice(&ordered_i64(to));
            for entry in table.range(low.as_slice()..high.as_slice()).map_err(redb_error("scan"))? {
                let (key, value) = entry.map_err(redb_error("scan"))?;
                visit(key.value(), value.value())
                    .map_err(|detail| corrupt(&tables::name(kind, granularity, period), detail))?;
            }
        }
        Ok(())
    }
}

impl Snapshot for RedbSnapshot {
    fn checkpoint_offset(&self, partition: u32) -> Result<u64, StoreError> {
        let value = self.checkpoints.get(partition).map_err(redb_error("read checkpoint"))?;
        Ok(value.map(|v| decode_checkpoint(partition, v.value())).transpose()?.map_or(0, |c| c.offset))
    }

    fn sum(&self, event_type: &str, video_id: &str, span: Span) -> Result<Counter, StoreError> {
        let mut total = Counter::default();
        self.buckets(event_type, video_id, span.granularity, span.start, span.end, &mut |_, c| total.add(c))?;
        Ok(total)
    }

    fn buckets(
        &self,
        event_type: &str,
        video_id: &str,
        granularity: Granularity,
        start: i64,
        end: i64,
        visit: &mut dyn FnMut(i64, Counter),
    ) -> Result<(), StoreError> {
        let mut prefix = Vec::with_capacity(event_type.len() + video_id.len() + 11);
        bucket_prefix(&mut prefix, event_type, video_id);
        let prefix_len = prefix.len();
        self.scan(Kind::Counters, granularity, &prefix, start, end, &mut |key, value| {
            visit(key::from_ordered_i64(&key[prefix_len..]), decode_counter(value)?);
            Ok(())
        })
    }

    fn uniques(&self, event_type: &str, video_id: &str, span: Span, into: &mut Hll) -> Result<(), StoreError> {
        let mut prefix = Vec::with_capacity(event_type.len() + video_id.len() + 11);
        bucket_prefix(&mut prefix, event_type, video_id);
        self.scan(Kind::Uniques, span.granularity, &prefix, span.start, span.end, &mut |_, value| {
            into.merge(&Hll::decode(value)?);
            Ok(())
        })
    }

    fn top(&self, event_type: &str, span: Span, into: &mut TopSketch) -> Result<(), StoreError> {
        let mut prefix = Vec::with_capacity(event_type.len() + 9);
        key::type_prefix(&mut prefix, event_type);
        self.scan(Kind::Top, span.granularity, &prefix, span.start, span.end, &mut |_, value| into.merge_encoded(value))
    }

    fn videos(&self, event_type: &str, start: i64, end: i64, visit: &mut dyn FnMut(&str)) -> Result<(), StoreError> {
        let mut prefix = Vec::with_capacity(event_type.len() + 9);
        key::type_prefix(&mut prefix, event_type);
        let video_at = prefix.len() + 8;
        self.scan(Kind::Videos, Granularity::Day, &prefix, start, end, &mut |key, _| {
            let video = std::str::from_utf8(&key[video_at..]).map_err(|_| "video id is not UTF-8".to_string())?;
            visit(video);
            Ok(())
        })
    }

    fn video_types(&self, video_id: &str, start: i64, end: i64, visit: &mut dyn FnMut(&str)) -> Result<(), StoreError> {
        let mut prefix = Vec::with_capacity(video_id.len() + 2);
        key::video_prefix(&mut prefix, video_id);
        for (period, _, _) in tables::periods(Granularity::Day, start, end) {
            let Some(table) = self.table(Kind::VideoTypes, Granularity::Day, period)? else { continue };
            for entry in table.range(prefix.as_slice()..).map_err(redb_error("scan video types"))? {
                let (key, _) = entry.map_err(redb_error("scan video types"))?;
                let Some(event_type) = key.value().strip_prefix(prefix.as_slice()) else { break };
                let event_type = std::str::from_utf8(event_type).map_err(|_| {
                    corrupt(&tables::name(Kind::VideoTypes, Granularity::Day, period), "type is not UTF-8".into())
                })?;
                visit(event_type);
            }
        }
        Ok(())
    }

    fn types(&self) -> Result<Vec<String>, StoreError> {
        let table = self.txn.open_table(TYPES).map_err(redb_error("read types"))?;
        let mut types = Vec::new();
        for entry in table.iter().map_err(redb_error("read types"))? {
            types.push(entry.map_err(redb_error("read types"))?.0.value().to_string());
        }
        Ok(types)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_aggregate::{Deltas, rollup};

    const TEST_CACHE_BYTES: usize = 64 << 20;

    fn flush(store: &RedbStore, deltas: &Deltas, offset: u64, cutoffs: &Cutoffs) {
        let start = store.checkpoint(0).unwrap().map_or(0, |c| c.offset);
        let checkpoint = Checkpoint { partition: 0, offset, dedup_generation_starts: vec![] };
        let flushes = [PartitionFlush { start, checkpoint, journal: &[], notes: &[] }];
        store.commit(&flushes, &mut |granularity| rollup(&[deltas], cutoffs, granularity)).unwrap();
    }

    /// Retention must give disk space back: pages of dropped tables are reused by new
    /// writes, and a store mostly free is compacted when it is opened.
    #[test]
    fn purged_space_is_reused_and_returned_to_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = RedbStore::open(&path, TEST_CACHE_BYTES, true).unwrap();
        let write_day = |store: &RedbStore, day: i64, offset: u64| {
            let mut deltas = Deltas::default();
            for video in 0..20_000 {
                deltas.add("view", &format!("video-{video:06}"), day * DAY_MINUTES + video % 1440, 1, None);
            }
            flush(store, &deltas, offset, &Cutoffs::NONE);
        };
        write_day(&store, 10, 1);
        let one_day = store.disk_bytes().unwrap();
        // Keep one day of every tier; periods are a day for minutes and longer for the
        // others, so write days a full period apart.
        for step in 1..5 {
            let day = 10 + step * 360;
            let cutoff = day * DAY_MINUTES;
            store.purge(&Cutoffs { minute: cutoff, hour: cutoff, day: cutoff }).unwrap();
            write_day(&store, day, step as u64 + 1);
        }
        let after = store.disk_bytes().unwrap();
        assert!(after < one_day * 5 / 2, "five days written, one kept at a time: {one_day} then {after} bytes");
        // Drop everything, reopen: the file shrinks.
        let all = Cutoffs { minute: i64::MAX, hour: i64::MAX, day: i64::MAX };
        store.purge(&all).unwrap();
        drop(store);
        let reopened = RedbStore::open(&path, TEST_CACHE_BYTES, true).unwrap();
        let compacted = reopened.disk_bytes().unwrap();
        assert!(compacted < after / 4, "{after} bytes before compaction, {compacted} after");
    }
}
