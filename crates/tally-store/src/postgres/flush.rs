//! The writes of one flush, inside its transaction: the fenced checkpoint move with the
//! dedup journal, then each tier's rows. Rows go in as arrays, a chunk per statement
//! (`INSERT … SELECT FROM unnest(…) ON CONFLICT …`): counters add up in SQL, sketches are
//! read, merged in Rust and written back (a video belongs to one partition, and a
//! partition to one writer, so nobody else changes them meanwhile).

use std::collections::{HashMap, HashSet};

use tally_core::hll::Hll;
use tally_core::{CounterRow, Granularity, TOP_SKETCH_ITEMS, TierRows, TopRow, UniquesRow};

use super::pool::{Connection, wait};
use super::{encode_generations, pg_error, schema};
use crate::tables::{Kind, period_of};
use crate::{PartitionFlush, StoreError};

/// Rows per statement: big enough to amortise a round trip, small enough to bound the
/// arrays a statement holds.
const CHUNK_ROWS: usize = 20_000;

pub(super) struct Writer<'t> {
    pub(super) connection: &'t mut Connection,
    /// Period tables that existed before this transaction.
    pub(super) known: &'t HashSet<String>,
    /// Period tables this transaction created.
    pub(super) created: &'t mut Vec<String>,
}

impl Writer<'_> {
    /// Moves a partition's checkpoint if this engine still owns it (`epoch`) and the
    /// stored checkpoint is where the flush starts; writes its dedup journal and forgets
    /// the generations no longer alive.
    pub(super) fn move_checkpoint(&mut self, flush: &PartitionFlush<'_>, epoch: i64) -> Result<(), StoreError> {
        let checkpoint = &flush.checkpoint;
        let partition = checkpoint.partition as i32;
        let fenced = self.connection.statement(
            "UPDATE tally_checkpoints SET log_offset = $4, generations = $5 \
             WHERE partition = $1 AND owner_epoch = $2 AND COALESCE(log_offset, 0) = $3",
        )?;
        let generations = encode_generations(&checkpoint.dedup_generation_starts);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&partition, &epoch, &(flush.start as i64), &(checkpoint.offset as i64), &generations];
        let moved = wait(self.connection.client.execute(&fenced, &params)).map_err(pg_error("move checkpoint"))?;
        if moved != 1 {
            return Err(self.why_fenced(flush, epoch));
        }
        let journal = self.connection.statement(
            "INSERT INTO tally_dedup (partition, generation_start, log_offset, entries) \
             SELECT $1, g, $2, e FROM unnest($3::INT8[], $4::BYTEA[]) AS j(g, e)",
        )?;
        let starts: Vec<i64> = flush.journal.iter().map(|(start, _)| *start).collect();
        let entries: Vec<&[u8]> = flush.journal.iter().map(|(_, entries)| entries.as_slice()).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&partition, &(checkpoint.offset as i64), &starts, &entries];
        wait(self.connection.client.execute(&journal, &params)).map_err(pg_error("write dedup journal"))?;
        let forget =
            self.connection.statement("DELETE FROM tally_dedup WHERE partition = $1 AND generation_start < $2")?;
        let keep_from = checkpoint.dedup_generation_starts.first().copied().unwrap_or(i64::MAX);
        wait(self.connection.client.execute(&forget, &[&partition, &keep_from]))
            .map_err(pg_error("purge dedup journal"))?;
        Ok(())
    }

    /// What the refused checkpoint row holds, as the refusal.
    fn why_fenced(&mut self, flush: &PartitionFlush<'_>, epoch: i64) -> StoreError {
        let partition = flush.checkpoint.partition;
        let read = wait(self.connection.client.query_opt(
            "SELECT owner_epoch, COALESCE(log_offset, 0) FROM tally_checkpoints WHERE partition = $1",
            &[&(partition as i32)],
        ));
        let detail = match read {
            Ok(Some(row)) if row.get::<_, i64>(0) != epoch => {
                format!("another engine owns it now (owner epoch {}, this engine holds {epoch})", row.get::<_, i64>(0))
            }
            Ok(Some(row)) => format!(
                "the stored checkpoint is at offset {}, this flush starts at {}",
                row.get::<_, i64>(1),
                flush.start
            ),
            Ok(None) => "it has no checkpoint row (never claimed)".into(),
            Err(error) => return pg_error("move checkpoint")(error),
        };
        StoreError::Fenced { partition, detail }
    }

    /// Adds one tier's rows to its tables.
    pub(super) fn write_tier(&mut self, mut rows: TierRows<'_>) -> Result<(), StoreError> {
        let granularity = rows.granularity;
        let period = |bucket: i64| period_of(granularity, bucket);
        rows.counters.sort_unstable_by_key(|row| period(row.bucket));
        for chunk in rows.counters.chunk_by(|a, b| period(a.bucket) == period(b.bucket)) {
            let table = self.table(Kind::Counters, granularity, period(chunk[0].bucket))?;
            for part in chunk.chunks(CHUNK_ROWS) {
                self.add_counters(&table, part)?;
            }
        }
        if granularity == Granularity::Day {
            self.write_indexes(&rows)?;
        }
        rows.uniques.sort_unstable_by_key(|row| period(row.bucket));
        for chunk in rows.uniques.chunk_by_mut(|a, b| period(a.bucket) == period(b.bucket)) {
            let table = self.table(Kind::Uniques, granularity, period(chunk[0].bucket))?;
            for part in chunk.chunks_mut(CHUNK_ROWS) {
                self.merge_uniques(&table, part)?;
            }
        }
        rows.top.sort_unstable_by_key(|row| period(row.bucket));
        for chunk in rows.top.chunk_by_mut(|a, b| period(a.bucket) == period(b.bucket)) {
            let table = self.table(Kind::Top, granularity, period(chunk[0].bucket))?;
            for part in chunk.chunks_mut(CHUNK_ROWS) {
                self.merge_top(&table, part, TOP_SKETCH_ITEMS[granularity as usize])?;
            }
        }
        Ok(())
    }

    /// The name of a period table, created in this transaction if it is new.
    fn table(&mut self, kind: Kind, granularity: Granularity, period: i64) -> Result<String, StoreError> {
        let name = schema::table(kind, granularity, period);
        if self.known.contains(&name) || self.created.contains(&name) {
            return Ok(name);
        }
        wait(self.connection.client.batch_execute(&schema::create(kind, &name))).map_err(pg_error("create table"))?;
        let register = self.connection.statement(
            "INSERT INTO tally_tables (name, kind, granularity, period) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING",
        )?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&name, &kind.name(), &granularity.name(), &period];
        wait(self.connection.client.execute(&register, &params)).map_err(pg_error("create table"))?;
        self.created.push(name.clone());
        Ok(name)
    }

    fn add_counters(&mut self, table: &str, rows: &[CounterRow<'_>]) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO {table} (event_type, video_id, bucket, count, sum) \
             SELECT e, v, b, c, s::NUMERIC FROM unnest($1::TEXT[], $2::TEXT[], $3::INT8[], $4::INT8[], $5::TEXT[]) \
             AS r(e, v, b, c, s) \
             ON CONFLICT (event_type, video_id, bucket) \
             DO UPDATE SET count = {table}.count + EXCLUDED.count, sum = {table}.sum + EXCLUDED.sum"
        );
        let statement = self.connection.statement(&sql)?;
        let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let videos: Vec<&str> = rows.iter().map(|r| r.video_id).collect();
        let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
        let counts: Vec<i64> = rows.iter().map(|r| r.counter.count as i64).collect();
        let sums: Vec<String> = rows.iter().map(|r| r.counter.sum.to_string()).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&types, &videos, &buckets, &counts, &sums];
        wait(self.connection.client.execute(&statement, &params)).map_err(pg_error("flush counters"))?;
        Ok(())
    }

    /// Merges the stored distinct-viewer sketches into `rows`, then writes them back.
    fn merge_uniques(&mut self, table: &str, rows: &mut [UniquesRow<'_>]) -> Result<(), StoreError> {
        let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let videos: Vec<&str> = rows.iter().map(|r| r.video_id).collect();
        let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
        let read = self.connection.statement(&format!(
            "SELECT r.i, t.sketch FROM unnest($1::TEXT[], $2::TEXT[], $3::INT8[]) WITH ORDINALITY AS r(e, v, b, i) \
             JOIN {table} t ON t.event_type = r.e AND t.video_id = r.v AND t.bucket = r.b"
        ))?;
        let stored = wait(self.connection.client.query(&read, &[&types, &videos, &buckets]))
            .map_err(pg_error("read uniques"))?;
        for row in stored {
            let sketch = Hll::decode(row.get(1)).map_err(|detail| corrupt(table, detail))?;
            rows[row.get::<_, i64>(0) as usize - 1].sketch.merge(&sketch);
        }
        let sketches: Vec<Vec<u8>> = rows.iter_mut().map(|r| r.sketch.encode()).collect();
        let write = self.connection.statement(&format!(
            "INSERT INTO {table} (event_type, video_id, bucket, sketch) \
             SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::INT8[], $4::BYTEA[]) \
             ON CONFLICT (event_type, video_id, bucket) DO UPDATE SET sketch = EXCLUDED.sketch"
        ))?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&types, &videos, &buckets, &sketches];
        wait(self.connection.client.execute(&write, &params)).map_err(pg_error("flush uniques"))?;
        Ok(())
    }

    /// Merges the stored top-items sketches into `rows`, prunes, and writes them back.
    fn merge_top(&mut self, table: &str, rows: &mut [TopRow<'_>], items: usize) -> Result<(), StoreError> {
        let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
        let read = self.connection.statement(&format!(
            "SELECT r.i, t.sketch FROM unnest($1::TEXT[], $2::INT8[]) WITH ORDINALITY AS r(e, b, i) \
             JOIN {table} t ON t.event_type = r.e AND t.bucket = r.b"
        ))?;
        let stored =
            wait(self.connection.client.query(&read, &[&types, &buckets])).map_err(pg_error("read top items"))?;
        for row in stored {
            let index = row.get::<_, i64>(0) as usize - 1;
            rows[index].sketch.merge_encoded(row.get(1)).map_err(|detail| corrupt(table, detail))?;
        }
        let sketches: Vec<Vec<u8>> = rows
            .iter_mut()
            .map(|r| {
                r.sketch.prune(items);
                r.sketch.encode()
            })
            .collect();
        let write = self.connection.statement(&format!(
            "INSERT INTO {table} (event_type, bucket, sketch) SELECT * FROM unnest($1::TEXT[], $2::INT8[], $3::BYTEA[]) \
             ON CONFLICT (event_type, bucket) DO UPDATE SET sketch = EXCLUDED.sketch"
        ))?;
        wait(self.connection.client.execute(&write, &[&types, &buckets, &sketches]))
            .map_err(pg_error("flush top items"))?;
        Ok(())
    }

    /// The day tier's video index, per-video type index and each type's last day.
    fn write_indexes(&mut self, rows: &TierRows<'_>) -> Result<(), StoreError> {
        let mut videos: HashMap<i64, Vec<(&str, i64, &str)>> = HashMap::new();
        let mut video_types: HashMap<i64, HashSet<(&str, &str)>> = HashMap::new();
        for (event_type, day, video_id) in rows.videos() {
            let period = period_of(Granularity::Day, day);
            videos.entry(period).or_default().push((event_type, day, video_id));
            video_types.entry(period).or_default().insert((video_id, event_type));
        }
        for (period, rows) in videos {
            let table = self.table(Kind::Videos, Granularity::Day, period)?;
            for part in rows.chunks(CHUNK_ROWS) {
                let types: Vec<&str> = part.iter().map(|r| r.0).collect();
                let days: Vec<i64> = part.iter().map(|r| r.1).collect();
                let ids: Vec<&str> = part.iter().map(|r| r.2).collect();
                let sql = format!(
                    "INSERT INTO {table} (event_type, day, video_id) \
                     SELECT * FROM unnest($1::TEXT[], $2::INT8[], $3::TEXT[]) ON CONFLICT DO NOTHING"
                );
                let statement = self.connection.statement(&sql)?;
                wait(self.connection.client.execute(&statement, &[&types, &days, &ids]))
                    .map_err(pg_error("flush video index"))?;
            }
        }
        for (period, pairs) in video_types {
            let table = self.table(Kind::VideoTypes, Granularity::Day, period)?;
            let pairs: Vec<_> = pairs.into_iter().collect();
            for part in pairs.chunks(CHUNK_ROWS) {
                let ids: Vec<&str> = part.iter().map(|r| r.0).collect();
                let types: Vec<&str> = part.iter().map(|r| r.1).collect();
                let sql = format!(
                    "INSERT INTO {table} (video_id, event_type) \
                     SELECT * FROM unnest($1::TEXT[], $2::TEXT[]) ON CONFLICT DO NOTHING"
                );
                let statement = self.connection.statement(&sql)?;
                wait(self.connection.client.execute(&statement, &[&ids, &types]))
                    .map_err(pg_error("flush video index"))?;
            }
        }
        let last_days = rows.last_days();
        let types: Vec<&str> = last_days.iter().map(|(t, _)| *t).collect();
        let days: Vec<i64> = last_days.iter().map(|(_, d)| *d).collect();
        let statement = self.connection.statement(
            "INSERT INTO tally_types (event_type, last_day) SELECT * FROM unnest($1::TEXT[], $2::INT8[]) \
             ON CONFLICT (event_type) DO UPDATE SET last_day = GREATEST(tally_types.last_day, EXCLUDED.last_day)",
        )?;
        wait(self.connection.client.execute(&statement, &[&types, &days])).map_err(pg_error("flush types"))?;
        Ok(())
    }
}

fn corrupt(table: &str, detail: String) -> StoreError {
    StoreError::Corrupt { detail: format!("table {table}: {detail}") }
}
