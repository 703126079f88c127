//! The writes of one flush, inside its transaction: the fenced checkpoint move with the
//! dedup journal, then each tier's rows, in key order. Into a table the transaction
//! created, rows go by `COPY … BINARY` (nothing to merge with); into others as arrays, a
//! chunk per statement, pipelined (`INSERT … SELECT FROM unnest(…) ON CONFLICT …`):
//! counters add up in SQL, sketches are read, merged in Rust and written back (a video
//! belongs to one partition, and a partition to one writer, so nobody else changes its
//! distinct-viewer sketches meanwhile; a bucket's top-items row, which every partition
//! adds to, is locked while it is merged).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use tally_core::hll::Hll;
use tally_core::{Counter, CounterRow, Granularity, TOP_SKETCH_ITEMS, TierRows, TopRow, UniquesRow};

use super::numeric::Numeric;
use super::pool::{Connection, wait};
use super::{encode_generations, pg_error, schema};
use crate::tables::{Kind, period_of};
use crate::{PartitionFlush, StoreError};

/// The keys of the rows a rewrite deletes from one table: types, video ids (empty for
/// top-items rows), buckets.
type DeletedKeys<'r> = (Vec<&'r str>, Vec<&'r str>, Vec<i64>);

/// Rows per statement: big enough to amortise a round trip, small enough to bound the
/// arrays a statement holds.
const CHUNK_ROWS: usize = 20_000;

/// Statements of a flush sent ahead of their answers.
const IN_FLIGHT: usize = 4;

pub(super) struct Writer<'t> {
    pub(super) connection: &'t mut Connection,
    /// Period tables that existed before this transaction.
    pub(super) known: &'t HashSet<String>,
    /// Period tables this transaction found or created, known once it commits.
    pub(super) found: &'t mut Vec<String>,
    /// Period tables this transaction created: empty before it.
    pub(super) fresh: Vec<String>,
    /// Rows replace the stored ones instead of adding to them (recompute); an empty
    /// counter, sketch or top-items row deletes the stored one.
    pub(super) replace: bool,
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
        let params: [&(dyn ToSql + Sync); 5] =
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
        let params: [&(dyn ToSql + Sync); 4] = [&partition, &(checkpoint.offset as i64), &starts, &entries];
        wait(self.connection.client.execute(&journal, &params)).map_err(pg_error("write dedup journal"))?;
        let forget =
            self.connection.statement("DELETE FROM tally_dedup WHERE partition = $1 AND generation_start < $2")?;
        let keep_from = checkpoint.dedup_generation_starts.first().copied().unwrap_or(i64::MAX);
        wait(self.connection.client.execute(&forget, &[&partition, &keep_from]))
            .map_err(pg_error("purge dedup journal"))?;
        if !flush.notes.is_empty() {
            let notes = self.connection.statement(
                "INSERT INTO tally_archive_notes (partition, log_offset, notes) VALUES ($1, $2, $3) \
                 ON CONFLICT (partition, log_offset) DO UPDATE SET notes = EXCLUDED.notes",
            )?;
            let params: [&(dyn ToSql + Sync); 3] = [&partition, &(checkpoint.offset as i64), &flush.notes];
            wait(self.connection.client.execute(&notes, &params)).map_err(pg_error("write archive notes"))?;
        }
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

    /// Adds one tier's rows to its tables (or, replacing, sets them).
    pub(super) fn write_tier(&mut self, mut rows: TierRows<'_>) -> Result<(), StoreError> {
        let granularity = rows.granularity;
        let period = |bucket: i64| period_of(granularity, bucket);
        if self.replace {
            self.delete_emptied(&mut rows)?;
        }
        // In key order: PostgreSQL's B-tree then takes them about twice as fast.
        rows.counters.sort_unstable_by_key(|row| (period(row.bucket), row.event_type, row.video_id, row.bucket));
        self.add_counters(granularity, &rows.counters)?;
        if granularity == Granularity::Day {
            self.write_indexes(&rows)?;
        }
        rows.uniques.sort_unstable_by(|a, b| {
            (period(a.bucket), a.event_type, a.video_id, a.bucket).cmp(&(
                period(b.bucket),
                b.event_type,
                b.video_id,
                b.bucket,
            ))
        });
        for chunk in rows.uniques.chunk_by_mut(|a, b| period(a.bucket) == period(b.bucket)) {
            let table = self.table(Kind::Uniques, granularity, period(chunk[0].bucket))?;
            for part in chunk.chunks_mut(CHUNK_ROWS) {
                self.merge_uniques(&table, part)?;
            }
        }
        rows.top.sort_unstable_by_key(|row| (period(row.bucket), row.event_type, row.bucket));
        for chunk in rows.top.chunk_by_mut(|a, b| period(a.bucket) == period(b.bucket)) {
            let table = self.table(Kind::Top, granularity, period(chunk[0].bucket))?;
            for part in chunk.chunks_mut(CHUNK_ROWS) {
                self.merge_top(&table, part, TOP_SKETCH_ITEMS[granularity as usize])?;
            }
        }
        Ok(())
    }

    /// Replacing: deletes the stored rows that `rows` empties (zero counters, empty
    /// sketches) and leaves the rest to be written.
    fn delete_emptied(&mut self, rows: &mut TierRows<'_>) -> Result<(), StoreError> {
        let granularity = rows.granularity;
        // Per table: the (type, video, bucket) keys to delete; top-items rows have no video.
        let mut deletes: BTreeMap<(String, bool), DeletedKeys<'_>> = BTreeMap::new();
        let mut gone = |kind: Kind, event_type, video_id, bucket| {
            let table = schema::table(kind, granularity, period_of(granularity, bucket));
            let keys = deletes.entry((table, kind != Kind::Top)).or_default();
            keys.0.push(event_type);
            keys.1.push(video_id);
            keys.2.push(bucket);
        };
        for row in rows.counters.iter().filter(|r| r.counter == Counter::default()) {
            gone(Kind::Counters, row.event_type, row.video_id, row.bucket);
        }
        for row in rows.uniques.iter().filter(|r| r.sketch.is_empty()) {
            gone(Kind::Uniques, row.event_type, row.video_id, row.bucket);
        }
        for row in rows.top.iter().filter(|r| r.sketch.is_empty()) {
            gone(Kind::Top, row.event_type, "", row.bucket);
        }
        rows.counters.retain(|r| r.counter != Counter::default());
        rows.uniques.retain(|r| !r.sketch.is_empty());
        rows.top.retain(|r| !r.sketch.is_empty());
        for ((table, by_video), (types, videos, buckets)) in deletes {
            if !self.known.contains(&table) && !self.found.contains(&table) {
                continue;
            }
            let (sql, params): (String, Vec<&(dyn ToSql + Sync)>) = if by_video {
                let sql = format!(
                    "DELETE FROM {table} t USING unnest($1::TEXT[], $2::TEXT[], $3::INT8[]) AS r(e, v, b) \
                     WHERE t.event_type = r.e AND t.video_id = r.v AND t.bucket = r.b"
                );
                (sql, vec![&types, &videos, &buckets])
            } else {
                let sql = format!(
                    "DELETE FROM {table} t USING unnest($1::TEXT[], $2::INT8[]) AS r(e, b) \
                     WHERE t.event_type = r.e AND t.bucket = r.b"
                );
                (sql, vec![&types, &buckets])
            };
            let statement = self.connection.statement(&sql)?;
            wait(self.connection.client.execute(&statement, &params))
                .map_err(pg_error("rewrite: delete emptied rows"))?;
        }
        Ok(())
    }

    /// Whether this transaction created `table`: it held nothing before, so rows go in
    /// without looking for a row to merge with.
    fn is_new(&self, table: &str) -> bool {
        self.fresh.iter().any(|fresh| fresh == table)
    }

    /// The name of a period table, created in this transaction if it is new. Registering
    /// it comes first: the registry's key serialises two engines creating the same table,
    /// and the one whose row went in is the one that creates it (and may then insert
    /// without merging).
    fn table(&mut self, kind: Kind, granularity: Granularity, period: i64) -> Result<String, StoreError> {
        let name = schema::table(kind, granularity, period);
        if self.known.contains(&name) || self.found.contains(&name) {
            return Ok(name);
        }
        let register = self.connection.statement(
            "INSERT INTO tally_tables (name, kind, granularity, period) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING",
        )?;
        let params: [&(dyn ToSql + Sync); 4] = [&name, &kind.name(), &granularity.name(), &period];
        let registered = wait(self.connection.client.execute(&register, &params)).map_err(pg_error("create table"))?;
        if registered == 1 {
            wait(self.connection.client.batch_execute(&schema::create(kind, &name)))
                .map_err(pg_error("create table"))?;
            self.fresh.push(name.clone());
        }
        self.found.push(name.clone());
        Ok(name)
    }

    /// Adds a tier's counters (sorted by period) to their tables: copied into a table this
    /// transaction created, else merged a chunk per statement, the statements pipelined.
    fn add_counters(&mut self, granularity: Granularity, rows: &[CounterRow<'_>]) -> Result<(), StoreError> {
        let period = |bucket: i64| period_of(granularity, bucket);
        let mut chunks = Vec::new();
        for same_period in rows.chunk_by(|a, b| period(a.bucket) == period(b.bucket)) {
            let table = self.table(Kind::Counters, granularity, period(same_period[0].bucket))?;
            if self.is_new(&table) {
                let client = &self.connection.client;
                wait(copy_counters(client, &table, same_period)).map_err(pg_error("copy counters"))?;
                continue;
            }
            let set = if self.replace {
                "count = EXCLUDED.count, sum = EXCLUDED.sum".to_string()
            } else {
                format!("count = {table}.count + EXCLUDED.count, sum = {table}.sum + EXCLUDED.sum")
            };
            let statement = self.connection.statement(&format!(
                "INSERT INTO {table} (event_type, video_id, bucket, count, sum) \
                 SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::INT8[], $4::INT8[], $5::NUMERIC[]) \
                 ON CONFLICT (event_type, video_id, bucket) DO UPDATE SET {set}"
            ))?;
            chunks.extend(same_period.chunks(CHUNK_ROWS).map(|chunk| (statement.clone(), chunk)));
        }
        let client = &self.connection.client;
        pipelined(chunks.into_iter().map(|(statement, rows)| async move {
            let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
            let videos: Vec<&str> = rows.iter().map(|r| r.video_id).collect();
            let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
            let counts: Vec<i64> = rows.iter().map(|r| r.counter.count as i64).collect();
            let sums: Vec<Numeric> = rows.iter().map(|r| Numeric(r.counter.sum)).collect();
            let params: [&(dyn ToSql + Sync); 5] = [&types, &videos, &buckets, &counts, &sums];
            client.execute(&statement, &params).await
        }))
        .map_err(pg_error("flush counters"))
    }

    /// Merges the stored distinct-viewer sketches into `rows`, then writes them back.
    fn merge_uniques(&mut self, table: &str, rows: &mut [UniquesRow<'_>]) -> Result<(), StoreError> {
        let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let videos: Vec<&str> = rows.iter().map(|r| r.video_id).collect();
        let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
        let is_new = self.is_new(table);
        if !is_new && !self.replace {
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
        }
        let sketches: Vec<Vec<u8>> = rows.iter_mut().map(|r| r.sketch.encode()).collect();
        let merge = if is_new {
            ""
        } else {
            " ON CONFLICT (event_type, video_id, bucket) DO UPDATE SET sketch = EXCLUDED.sketch"
        };
        let write = self.connection.statement(&format!(
            "INSERT INTO {table} (event_type, video_id, bucket, sketch) \
             SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::INT8[], $4::BYTEA[]){merge}"
        ))?;
        let params: [&(dyn ToSql + Sync); 4] = [&types, &videos, &buckets, &sketches];
        wait(self.connection.client.execute(&write, &params)).map_err(pg_error("flush uniques"))?;
        Ok(())
    }

    /// Merges the stored top-items sketches into `rows`, prunes, and writes them back.
    /// Unlike a video's rows, a bucket's top row gathers every partition, which other
    /// nodes flush at the same time in cluster mode: the rows are made first (empty),
    /// then read `FOR UPDATE`, so a racing flush waits for this one and merges into its
    /// result. Rows are locked in key order, so two flushes cannot deadlock on them.
    fn merge_top(&mut self, table: &str, rows: &mut [TopRow<'_>], items: usize) -> Result<(), StoreError> {
        let types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let buckets: Vec<i64> = rows.iter().map(|r| r.bucket).collect();
        if !self.replace {
            self.merge_stored_top(table, rows, &types, &buckets)?;
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

    /// Merges the stored top-items rows into `rows`, locking them (see `merge_top`).
    fn merge_stored_top(
        &mut self,
        table: &str,
        rows: &mut [TopRow<'_>],
        types: &[&str],
        buckets: &[i64],
    ) -> Result<(), StoreError> {
        let make = self.connection.statement(&format!(
            "INSERT INTO {table} (event_type, bucket, sketch) SELECT e, b, $3 FROM unnest($1::TEXT[], $2::INT8[]) AS r(e, b) \
             ON CONFLICT (event_type, bucket) DO NOTHING"
        ))?;
        let empty = tally_core::topk::TopSketch::default().encode();
        wait(self.connection.client.execute(&make, &[&types, &buckets, &empty]))
            .map_err(pg_error("flush top items"))?;
        let read = self.connection.statement(&format!(
            "SELECT r.i, t.sketch FROM unnest($1::TEXT[], $2::INT8[]) WITH ORDINALITY AS r(e, b, i) \
             JOIN {table} t ON t.event_type = r.e AND t.bucket = r.b ORDER BY r.i FOR UPDATE OF t"
        ))?;
        let stored =
            wait(self.connection.client.query(&read, &[&types, &buckets])).map_err(pg_error("read top items"))?;
        for row in stored {
            let index = row.get::<_, i64>(0) as usize - 1;
            rows[index].sketch.merge_encoded(row.get(1)).map_err(|detail| corrupt(table, detail))?;
        }
        Ok(())
    }

    /// The day tier's video index and each type's last day. (The types of a video are
    /// read from the day counters: no index of their own.)
    fn write_indexes(&mut self, rows: &TierRows<'_>) -> Result<(), StoreError> {
        let mut videos: HashMap<i64, Vec<(&str, i64, &str)>> = HashMap::new();
        for (event_type, day, video_id) in rows.videos() {
            videos.entry(period_of(Granularity::Day, day)).or_default().push((event_type, day, video_id));
        }
        for (period, mut rows) in videos {
            rows.sort_unstable();
            let table = self.table(Kind::Videos, Granularity::Day, period)?;
            self.write_videos(&table, &rows)?;
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

    /// (type, day, video) rows of one period's video index, sorted.
    fn write_videos(&mut self, table: &str, rows: &[(&str, i64, &str)]) -> Result<(), StoreError> {
        let client = &self.connection.client;
        if self.is_new(table) {
            let copied = wait(async {
                let types = [Type::TEXT, Type::INT8, Type::TEXT];
                let writer = copy_in(client, table, "event_type, day, video_id", &types).await?;
                futures_util::pin_mut!(writer);
                for (event_type, day, video_id) in rows {
                    writer.as_mut().write(&[event_type, day, video_id]).await?;
                }
                writer.finish().await
            });
            return copied.map(|_| ()).map_err(pg_error("copy video index"));
        }
        let statement = self.connection.statement(&format!(
            "INSERT INTO {table} (event_type, day, video_id) \
             SELECT * FROM unnest($1::TEXT[], $2::INT8[], $3::TEXT[]) ON CONFLICT DO NOTHING"
        ))?;
        let client = &self.connection.client;
        pipelined(rows.chunks(CHUNK_ROWS).map(|part| {
            let statement = &statement;
            async move {
                let types: Vec<&str> = part.iter().map(|r| r.0).collect();
                let days: Vec<i64> = part.iter().map(|r| r.1).collect();
                let ids: Vec<&str> = part.iter().map(|r| r.2).collect();
                client.execute(statement, &[&types, &days, &ids]).await
            }
        }))
        .map_err(pg_error("flush video index"))
    }
}

/// A `COPY … FROM STDIN BINARY` into `table`'s `columns` (of `types`): for tables this
/// transaction created, with nothing to merge with, the fastest way in.
async fn copy_in(
    client: &tokio_postgres::Client,
    table: &str,
    columns: &str,
    types: &[Type],
) -> Result<BinaryCopyInWriter, tokio_postgres::Error> {
    let sink = client.copy_in(&format!("COPY {table} ({columns}) FROM STDIN BINARY")).await?;
    Ok(BinaryCopyInWriter::new(sink, types))
}

async fn copy_counters(
    client: &tokio_postgres::Client,
    table: &str,
    rows: &[CounterRow<'_>],
) -> Result<u64, tokio_postgres::Error> {
    let types = [Type::TEXT, Type::TEXT, Type::INT8, Type::INT8, Type::NUMERIC];
    let writer = copy_in(client, table, "event_type, video_id, bucket, count, sum", &types).await?;
    futures_util::pin_mut!(writer);
    for r in rows {
        let (count, sum) = (r.counter.count as i64, Numeric(r.counter.sum));
        writer.as_mut().write(&[&r.event_type, &r.video_id, &r.bucket, &count, &sum]).await?;
    }
    writer.finish().await
}

/// Runs statement executions with up to `IN_FLIGHT` sent ahead of their answers: the
/// database works on one while the next is encoded and on its way. Each execution
/// builds its arrays when its turn comes, so that many chunks are in memory at most.
fn pipelined<F>(executions: impl Iterator<Item = F>) -> Result<(), tokio_postgres::Error>
where
    F: Future<Output = Result<u64, tokio_postgres::Error>>,
{
    wait(futures_util::stream::iter(executions).buffered(IN_FLIGHT).try_for_each(|_| async { Ok(()) }))
}

fn corrupt(table: &str, detail: String) -> StoreError {
    StoreError::Corrupt { detail: format!("table {table}: {detail}") }
}
