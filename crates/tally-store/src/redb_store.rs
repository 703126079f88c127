//! The embedded store on redb: a copy-on-write B-tree with MVCC snapshots, so readers never
//! wait for the flusher, and one fsync-ed commit per flush.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tally_aggregate::Counter;
use tally_core::{Granularity, Span};

use crate::key::{self, bucket_key, bucket_prefix, decode_counter, encode_counter, ordered_i64};
use crate::{Checkpoint, CounterStore, PartitionFlush, Snapshot, StoreError};

const BUCKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("buckets");
const CHECKPOINTS: TableDefinition<u32, &[u8]> = TableDefinition::new("checkpoints");
const DEDUP: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dedup");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_PARTITIONS: &str = "partitions";

pub struct RedbStore {
    db: Database,
}

fn redb_error<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Redb { context, source: e.into() }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path).map_err(redb_error("open"))?;
        let txn = db.begin_write().map_err(redb_error("open"))?;
        txn.open_table(BUCKETS).map_err(redb_error("create tables"))?;
        txn.open_table(CHECKPOINTS).map_err(redb_error("create tables"))?;
        txn.open_table(DEDUP).map_err(redb_error("create tables"))?;
        txn.open_table(META).map_err(redb_error("create tables"))?;
        txn.commit().map_err(redb_error("create tables"))?;
        Ok(RedbStore { db })
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
        let txn = self.db.begin_write().map_err(redb_error("claim partitions"))?;
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
        let txn = self.db.begin_read().map_err(redb_error("read checkpoint"))?;
        let table = txn.open_table(CHECKPOINTS).map_err(redb_error("read checkpoint"))?;
        let value = table.get(partition).map_err(redb_error("read checkpoint"))?;
        value.map(|v| decode_checkpoint(partition, v.value())).transpose()
    }

    fn dedup_blobs(&self, partition: u32, generation_start_ms: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(redb_error("read dedup journal"))?;
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

    fn commit(&self, flushes: &[PartitionFlush<'_>]) -> Result<(), StoreError> {
        // Merge each flush's minute cells into minute, hour and day buckets, then apply the
        // upserts in key order: neighbouring keys share B-tree pages.
        let mut upserts: Vec<(Vec<u8>, Counter)> = Vec::new();
        for flush in flushes {
            for (event_type, video_id, cells) in flush.deltas.iter() {
                for granularity in Granularity::ALL {
                    let mut merged: Vec<(i64, Counter)> = Vec::with_capacity(cells.len());
                    for cell in cells {
                        let bucket = granularity.bucket_of(cell.minute);
                        match merged.iter_mut().find(|(b, _)| *b == bucket) {
                            Some((_, counter)) => counter.add(cell.counter),
                            None => merged.push((bucket, cell.counter)),
                        }
                    }
                    for (bucket, counter) in merged {
                        let mut key = Vec::with_capacity(event_type.len() + video_id.len() + 12);
                        bucket_key(&mut key, event_type, video_id, granularity, bucket);
                        upserts.push((key, counter));
                    }
                }
            }
        }
        upserts.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let txn = self.db.begin_write().map_err(redb_error("begin flush"))?;
        {
            let mut buckets = txn.open_table(BUCKETS).map_err(redb_error("flush buckets"))?;
            for (key, delta) in &upserts {
                let mut counter = buckets
                    .get(key.as_slice())
                    .map_err(redb_error("flush buckets"))?
                    .map_or(Counter::default(), |v| decode_counter(v.value()));
                counter.add(*delta);
                buckets.insert(key.as_slice(), &encode_counter(counter)[..]).map_err(redb_error("flush buckets"))?;
            }
            let mut checkpoints = txn.open_table(CHECKPOINTS).map_err(redb_error("flush checkpoints"))?;
            let mut dedup = txn.open_table(DEDUP).map_err(redb_error("flush dedup journal"))?;
            for flush in flushes {
                let checkpoint = &flush.checkpoint;
                checkpoints
                    .insert(checkpoint.partition, encode_checkpoint(checkpoint).as_slice())
                    .map_err(redb_error("flush checkpoints"))?;
                for (generation_start, blob) in &flush.journal.blobs {
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

    fn snapshot(&self) -> Result<Box<dyn Snapshot + '_>, StoreError> {
        let txn = self.db.begin_read().map_err(redb_error("begin read"))?;
        let buckets = txn.open_table(BUCKETS).map_err(redb_error("begin read"))?;
        let checkpoints = txn.open_table(CHECKPOINTS).map_err(redb_error("begin read"))?;
        Ok(Box::new(RedbSnapshot { buckets, checkpoints }))
    }
}

struct RedbSnapshot {
    buckets: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    checkpoints: redb::ReadOnlyTable<u32, &'static [u8]>,
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
        if start >= end {
            return Ok(());
        }
        let mut low = Vec::with_capacity(event_type.len() + video_id.len() + 12);
        bucket_prefix(&mut low, event_type, video_id, granularity);
        let prefix_len = low.len();
        let mut high = low.clone();
        low.extend_from_slice(&ordered_i64(start));
        high.extend_from_slice(&ordered_i64(end));
        for entry in self.buckets.range(low.as_slice()..high.as_slice()).map_err(redb_error("scan buckets"))? {
            let (key, value) = entry.map_err(redb_error("scan buckets"))?;
            visit(key::from_ordered_i64(&key.value()[prefix_len..]), decode_counter(value.value()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_aggregate::{DedupJournal, Deltas};

    #[test]
    fn flush_rolls_minutes_into_hours_and_days_and_moves_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        store.claim_partitions(2).unwrap();
        let mut deltas = Deltas::default();
        deltas.add("view", "v", 59, 1);
        deltas.add("view", "v", 60, 2);
        deltas.add("view", "v", 60, 3);
        deltas.add("view", "w", 60, 9);
        let checkpoint = Checkpoint { partition: 1, offset: 77, dedup_generation_starts: vec![5] };
        let journal = DedupJournal { blobs: vec![(5, vec![1; 17])] };
        store.commit(&[PartitionFlush { deltas: &deltas, checkpoint: checkpoint.clone(), journal }]).unwrap();
        assert_eq!(store.checkpoint(1).unwrap(), Some(checkpoint));
        assert_eq!(store.checkpoint(0).unwrap(), None);
        assert_eq!(store.dedup_blobs(1, 5).unwrap(), vec![vec![1; 17]]);

        let snapshot = store.snapshot().unwrap();
        let sum = |g, start, end| snapshot.sum("view", "v", Span { granularity: g, start, end }).unwrap();
        assert_eq!(sum(Granularity::Minute, 0, 60), Counter { count: 1, sum: 1 });
        assert_eq!(sum(Granularity::Minute, 60, 61), Counter { count: 2, sum: 5 });
        assert_eq!(sum(Granularity::Hour, 0, 120), Counter { count: 3, sum: 6 });
        assert_eq!(sum(Granularity::Day, 0, 1440), Counter { count: 3, sum: 6 });
        assert_eq!(snapshot.checkpoint_offset(1).unwrap(), 77);
        assert!(matches!(store.claim_partitions(3), Err(StoreError::PartitionCount { stored: 2, configured: 3 })));
    }
}
