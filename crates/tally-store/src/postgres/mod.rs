//! The aggregate store in a PostgreSQL-protocol database (PostgreSQL, CockroachDB,
//! YugabyteDB): the same rows, checkpoints and dedup journal as the embedded store, in
//! the tables `schema` describes, one transaction per flush.
//!
//! Ownership is fenced. `claim_partitions` raises each partition's owner epoch and keeps
//! the new value; a commit moves a partition's checkpoint only where the stored epoch is
//! still the one it claimed and the stored offset is where the flush starts. Otherwise
//! the whole transaction is refused (`StoreError::Fenced`): a stale owner never writes
//! half a flush, and no flush is applied twice.

mod flush;
mod numeric;
mod pool;
mod schema;
mod snapshot;

pub use pool::PoolOptions;

use std::collections::{BTreeMap, HashMap, HashSet};

use parking_lot::Mutex;
use tally_core::Granularity;
use tally_core::bucket::DAY_MINUTES;

use crate::tables::{self, Kind};
use crate::{ArchiveProgress, Checkpoint, CounterStore, PartitionFlush, Snapshot, StoreError, TableUsage};
use pool::{Connection, Pool, wait};

/// How long a purge waits for a table lock (a reader holding the table) before giving
/// up until the next retention interval: it holds the flusher meanwhile.
const PURGE_LOCK_WAIT: &str = "SET LOCAL lock_timeout = '5s'";

/// The database's clock, epoch milliseconds: liveness marks use it, so nodes' clocks do
/// not matter.
const NOW_MS: &str = "(extract(epoch FROM now()) * 1000)::BIGINT";

/// Bounds the generation list a checkpoint may hold; dedup keeps about six alive.
const CHECKPOINT_GENERATIONS_MAX: usize = 64;

pub struct PostgresStore {
    pool: Pool,
    /// The period tables that exist, as committed by this store.
    tables: Mutex<HashSet<String>>,
    /// The owner epoch this store holds, by partition: every partition after
    /// `claim_partitions`, the claimed ones in cluster mode (`claim_partition`).
    epochs: Mutex<HashMap<u32, i64>>,
}

pub(crate) fn pg_error(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { context, source }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host:port/db`),
    /// creating or migrating tally's schema; refuses a database of a newer schema.
    pub fn open(url: &str, options: PoolOptions) -> Result<PostgresStore, StoreError> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Config { detail: format!("database URL {url:?}: {e}") })?;
        let pool = Pool::new(config, options)?;
        let store = PostgresStore { pool, tables: Mutex::new(HashSet::new()), epochs: Mutex::new(HashMap::new()) };
        store.migrate()?;
        store.reload_tables()?;
        Ok(store)
    }

    fn reload_tables(&self) -> Result<(), StoreError> {
        let rows = {
            let connection = self.pool.get()?;
            wait(connection.client.query("SELECT name FROM tally_tables", &[])).map_err(pg_error("read tables"))?
        };
        *self.tables.lock() = rows.iter().map(|row| row.get::<_, String>(0)).collect();
        Ok(())
    }

    /// Refuses (`Fenced`) unless every partition this engine holds is still its own,
    /// locking the checkpoint rows for the transaction: a fenced engine drops nothing.
    /// (In cluster mode, partitions other nodes own do not stop a purge: every node
    /// purges by the same rule.)
    fn still_owner(&self, connection: &mut Connection) -> Result<(), StoreError> {
        let epochs = self.epochs.lock().clone();
        let read = connection.statement("SELECT partition, owner_epoch FROM tally_checkpoints FOR UPDATE")?;
        let rows = wait(connection.client.query(&read, &[])).map_err(pg_error("read owners"))?;
        for row in rows {
            let (partition, stored) = (row.get::<_, i32>(0) as u32, row.get::<_, i64>(1));
            if epochs.get(&partition).is_some_and(|&mine| mine != stored) {
                let detail = format!("another engine owns it now (owner epoch {stored}); not purging");
                return Err(StoreError::Fenced { partition, detail });
            }
        }
        Ok(())
    }

    /// Brings the schema to `schema::VERSION`, one migration at a time, in one transaction.
    fn migrate(&self) -> Result<(), StoreError> {
        self.pool.get()?.transaction("BEGIN", |connection| {
            // "already exists, skipping" notices on every start are noise.
            let quiet = "SET LOCAL client_min_messages TO warning";
            wait(connection.client.batch_execute(quiet)).map_err(pg_error("set client_min_messages"))?;
            wait(connection.client.batch_execute(schema::META)).map_err(pg_error("create tally_meta"))?;
            let version = meta(connection, "schema_version")?.unwrap_or(0);
            if version > schema::VERSION {
                return Err(StoreError::SchemaVersion { found: version, expected: schema::VERSION });
            }
            for migration in &schema::MIGRATIONS[version as usize..] {
                wait(connection.client.batch_execute(migration)).map_err(pg_error("migrate schema"))?;
            }
            if version < schema::VERSION {
                tracing::info!(from = version, to = schema::VERSION, "database schema migrated");
                set_meta(connection, "schema_version", schema::VERSION)?;
            }
            Ok(())
        })
    }

    /// Bytes the database takes on disk (PostgreSQL only: `pg_database_size`).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        let connection = self.pool.get()?;
        let row = wait(connection.client.query_one("SELECT pg_database_size(current_database())", &[]))
            .map_err(pg_error("database size"))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Space per table group (`kind.granularity`, or a fixed table's name), for capacity
    /// planning (`tally store-stats`). Counts every row; sizes are PostgreSQL's
    /// (`pg_relation_size`, `pg_total_relation_size`).
    pub fn usage(&self) -> Result<Vec<TableUsage>, StoreError> {
        let connection = self.pool.get()?;
        let registered = wait(connection.client.query("SELECT name, kind, granularity FROM tally_tables", &[]))
            .map_err(pg_error("read tables"))?;
        let fixed = [
            "tally_meta",
            "tally_checkpoints",
            "tally_dedup",
            "tally_archive_notes",
            "tally_types",
            "tally_tables",
            "tally_request_keys",
        ];
        let tables =
            fixed.iter().map(|name| (name.to_string(), name.to_string())).chain(registered.iter().map(|row| {
                (row.get::<_, String>(0), format!("{}.{}", row.get::<_, String>(1), row.get::<_, String>(2)))
            }));
        let mut groups: BTreeMap<String, TableUsage> = BTreeMap::new();
        for (name, group) in tables {
            // Names come from tally's own registry, built by `schema::table`.
            let sql =
                format!("SELECT count(*), pg_relation_size('{name}'), pg_total_relation_size('{name}') FROM {name}");
            let row = wait(connection.client.query_one(sql.as_str(), &[])).map_err(pg_error("table usage"))?;
            let usage = groups.entry(group.clone()).or_insert_with(|| TableUsage { group, ..TableUsage::default() });
            usage.tables += 1;
            usage.rows += row.get::<_, i64>(0) as u64;
            usage.stored_bytes += row.get::<_, i64>(1) as u64;
            usage.page_bytes += row.get::<_, i64>(2) as u64;
        }
        Ok(groups.into_values().collect())
    }

    /// Records the partition count and makes the partitions' rows, claiming none
    /// (`tally cluster init`); false when the database had them already.
    pub fn prepare_partitions(&self, partitions: u32) -> Result<bool, StoreError> {
        self.pool.get()?.transaction("BEGIN", |connection| prepare_partitions(connection, partitions))
    }

    /// The partition count recorded, if any.
    pub fn partitions(&self) -> Result<Option<u32>, StoreError> {
        self.pool.get()?.transaction("BEGIN", |connection| Ok(meta(connection, "partitions")?.map(|n| n as u32)))
    }

    fn epoch(&self, partition: u32) -> Result<i64, StoreError> {
        self.epochs
            .lock()
            .get(&partition)
            .copied()
            .ok_or_else(|| StoreError::Fenced { partition, detail: "this engine does not hold it".into() })
    }
}

/// A row of `tally_meta`, locked for the transaction.
fn meta_text(connection: &mut Connection, key: &str) -> Result<Option<String>, StoreError> {
    let statement = connection.statement("SELECT value FROM tally_meta WHERE key = $1 FOR UPDATE")?;
    let row = wait(connection.client.query_opt(&statement, &[&key])).map_err(pg_error("read tally_meta"))?;
    Ok(row.map(|row| row.get(0)))
}

/// An integer row of `tally_meta`, locked for the transaction.
fn meta(connection: &mut Connection, key: &str) -> Result<Option<i64>, StoreError> {
    meta_text(connection, key)?
        .map(|value| {
            value.parse().map_err(|_| StoreError::Corrupt { detail: format!("tally_meta {key} is {value:?}") })
        })
        .transpose()
}

fn set_meta_text(connection: &mut Connection, key: &str, value: &str) -> Result<(), StoreError> {
    let statement = connection.statement(
        "INSERT INTO tally_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
    )?;
    wait(connection.client.execute(&statement, &[&key, &value])).map_err(pg_error("write tally_meta"))?;
    Ok(())
}

fn set_meta(connection: &mut Connection, key: &str, value: i64) -> Result<(), StoreError> {
    set_meta_text(connection, key, &value.to_string())
}

/// `check_archive`, with its row of `tally_meta` there to lock (empty: no archive).
fn check_archive_locked(connection: &mut Connection, location: Option<&str>) -> Result<(), StoreError> {
    match (meta_text(connection, "archive")?.filter(|stored| !stored.is_empty()), location) {
        (None, None) => Ok(()),
        (Some(stored), Some(location)) if stored == location => Ok(()),
        // Archiving (again): progress and notes from an earlier archiving would skip
        // what was flushed meanwhile without notes.
        (None, Some(location)) => {
            let reset =
                connection.statement("UPDATE tally_checkpoints SET archived_offset = NULL, archive_pending = NULL")?;
            wait(connection.client.execute(&reset, &[])).map_err(pg_error("reset archive progress"))?;
            let notes = connection.statement("DELETE FROM tally_archive_notes")?;
            wait(connection.client.execute(&notes, &[])).map_err(pg_error("drop archive notes"))?;
            set_meta_text(connection, "archive", location)
        }
        (Some(stored), None) => Err(StoreError::Config {
            detail: format!("this cluster archives raw events to {stored}: start every node with --archive {stored}"),
        }),
        (Some(stored), Some(location)) => {
            Err(StoreError::Config { detail: format!("this cluster archives raw events to {stored}, not {location}") })
        }
    }
}

/// An `ArchiveProgress` from its two columns.
fn progress(archived: i64, pending: Option<i64>) -> ArchiveProgress {
    ArchiveProgress { archived: archived as u64, pending: pending.map(|end| end as u64) }
}

/// Records the partition count (refusing another) and makes each partition's
/// checkpoint row; true when it made them now.
fn prepare_partitions(connection: &mut Connection, partitions: u32) -> Result<bool, StoreError> {
    match meta(connection, "partitions")? {
        Some(stored) if stored != i64::from(partitions) => {
            return Err(StoreError::PartitionCount { stored: stored as u32, configured: partitions });
        }
        Some(_) => return Ok(false),
        None => set_meta(connection, "partitions", i64::from(partitions))?,
    }
    let all: Vec<i32> = (0..partitions as i32).collect();
    let create = connection.statement(
        "INSERT INTO tally_checkpoints (partition, log_offset, generations, owner_epoch) \
         SELECT p, NULL, $2, 0 FROM unnest($1::INT4[]) AS p ON CONFLICT (partition) DO NOTHING",
    )?;
    wait(connection.client.execute(&create, &[&all, &Vec::<u8>::new()])).map_err(pg_error("claim"))?;
    Ok(true)
}

fn decode_generations(partition: u32, bytes: &[u8]) -> Result<Vec<i64>, StoreError> {
    if !bytes.len().is_multiple_of(8) || bytes.len() / 8 > CHECKPOINT_GENERATIONS_MAX {
        return Err(StoreError::Corrupt {
            detail: format!("checkpoint of partition {partition} has {} bytes of generations", bytes.len()),
        });
    }
    Ok(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn encode_generations(starts: &[i64]) -> Vec<u8> {
    assert!(starts.len() <= CHECKPOINT_GENERATIONS_MAX, "{} dedup generations alive", starts.len());
    starts.iter().flat_map(|start| start.to_le_bytes()).collect()
}

impl CounterStore for PostgresStore {
    /// Records the partition count, and claims every partition: its owner epoch goes up
    /// by one, which fences off any engine that claimed it before.
    fn claim_partitions(&self, partitions: u32) -> Result<(), StoreError> {
        let epochs = self.pool.get()?.transaction("BEGIN", |connection| {
            prepare_partitions(connection, partitions)?;
            let raise = connection.statement(
                "UPDATE tally_checkpoints SET owner_epoch = owner_epoch + 1 RETURNING partition, owner_epoch",
            )?;
            let rows = wait(connection.client.query(&raise, &[])).map_err(pg_error("claim"))?;
            Ok(rows.iter().map(|row| (row.get::<_, i32>(0) as u32, row.get::<_, i64>(1))).collect())
        })?;
        *self.epochs.lock() = epochs;
        Ok(())
    }

    fn checkpoint(&self, partition: u32) -> Result<Option<Checkpoint>, StoreError> {
        let mut connection = self.pool.get()?;
        let statement =
            connection.statement("SELECT log_offset, generations FROM tally_checkpoints WHERE partition = $1")?;
        let row = wait(connection.client.query_opt(&statement, &[&(partition as i32)]))
            .map_err(pg_error("read checkpoint"))?;
        let Some(row) = row else { return Ok(None) };
        let Some(offset) = row.get::<_, Option<i64>>(0) else { return Ok(None) };
        let dedup_generation_starts = decode_generations(partition, row.get(1))?;
        Ok(Some(Checkpoint { partition, offset: offset as u64, dedup_generation_starts }))
    }

    fn dedup_blobs(&self, partition: u32, generation_start_ms: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut connection = self.pool.get()?;
        let statement = connection.statement(
            "SELECT entries FROM tally_dedup WHERE partition = $1 AND generation_start = $2 ORDER BY log_offset",
        )?;
        let rows = wait(connection.client.query(&statement, &[&(partition as i32), &generation_start_ms]))
            .map_err(pg_error("read dedup journal"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn commit<'a>(
        &self,
        flushes: &[PartitionFlush<'_>],
        tiers: &mut dyn FnMut(Granularity) -> tally_core::TierRows<'a>,
    ) -> Result<(), StoreError> {
        let mut found = Vec::new();
        let known = self.tables.lock().clone();
        let mut connection = self.pool.get()?;
        connection.transaction("BEGIN", |connection| {
            let mut writer =
                flush::Writer { connection, known: &known, found: &mut found, fresh: Vec::new(), replace: false };
            for flush in flushes {
                writer.move_checkpoint(flush, self.epoch(flush.checkpoint.partition)?)?;
            }
            for granularity in Granularity::ALL {
                let started = std::time::Instant::now();
                let rows = tiers(granularity);
                let rolled_up = started.elapsed();
                let counters = rows.counters.len();
                writer.write_tier(rows)?;
                let (rollup_ms, write_ms) = (rolled_up.as_millis(), (started.elapsed() - rolled_up).as_millis());
                tracing::debug!(tier = granularity.name(), counters, rollup_ms, write_ms, "flush tier written");
            }
            Ok(())
        })?;
        self.tables.lock().extend(found);
        Ok(())
    }

    /// One transaction, fenced like a purge (every partition still this store's): rows
    /// replace the stored ones, empty ones delete them.
    fn rewrite<'a>(&self, tiers: &mut dyn FnMut(Granularity) -> tally_core::TierRows<'a>) -> Result<(), StoreError> {
        let mut found = Vec::new();
        let known = self.tables.lock().clone();
        let mut connection = self.pool.get()?;
        connection.transaction("BEGIN", |connection| {
            self.still_owner(connection)?;
            let mut writer =
                flush::Writer { connection, known: &known, found: &mut found, fresh: Vec::new(), replace: true };
            for granularity in Granularity::ALL {
                writer.write_tier(tiers(granularity))?;
            }
            Ok(())
        })?;
        self.tables.lock().extend(found);
        Ok(())
    }

    /// Nothing to reopen: a broken connection is dropped and the next one is new.
    /// A commit or purge whose outcome is unknown may have changed the tables: read
    /// them again.
    fn recover(&self) -> Result<(), StoreError> {
        self.pool.clear();
        self.reload_tables()
    }

    fn needs_recovery(&self) -> bool {
        false
    }

    /// Drops the period tables wholly before the cutoffs, which gives their space back at
    /// once, and the types with no day left.
    fn purge(&self, cutoffs: &tally_core::Cutoffs) -> Result<usize, StoreError> {
        let mut connection = self.pool.get()?;
        let dropped = connection.transaction("BEGIN", |connection| {
            // Giving up is 55P03, transient: retried at the next interval.
            wait(connection.client.batch_execute(PURGE_LOCK_WAIT)).map_err(pg_error("purge"))?;
            self.still_owner(connection)?;
            let list = connection.statement("SELECT name, kind, granularity, period FROM tally_tables")?;
            let rows = wait(connection.client.query(&list, &[])).map_err(pg_error("list tables"))?;
            let mut expired = Vec::new();
            for row in rows {
                let (name, kind, granularity): (String, String, String) = (row.get(0), row.get(1), row.get(2));
                let known = Kind::from_name(&kind).zip(Granularity::from_name(&granularity));
                let Some((_, granularity)) = known else {
                    return Err(StoreError::Corrupt { detail: format!("tally_tables row {name}: kind {kind}") });
                };
                if tables::entirely_before(granularity, row.get(3), cutoffs.of(granularity)) {
                    expired.push(name);
                }
            }
            for name in &expired {
                wait(connection.client.batch_execute(&format!("DROP TABLE IF EXISTS {name}")))
                    .map_err(pg_error("drop expired table"))?;
            }
            let forget = connection.statement("DELETE FROM tally_tables WHERE name = ANY($1)")?;
            wait(connection.client.execute(&forget, &[&expired])).map_err(pg_error("drop expired table"))?;
            let types = connection.statement("DELETE FROM tally_types WHERE last_day <= $1")?;
            let last_expired_day = cutoffs.of(Granularity::Day).saturating_sub(DAY_MINUTES);
            wait(connection.client.execute(&types, &[&last_expired_day])).map_err(pg_error("purge types"))?;
            Ok(expired)
        })?;
        let mut tables = self.tables.lock();
        for name in &dropped {
            tables.remove(name);
        }
        Ok(dropped.len())
    }

    fn snapshot(&self) -> Result<Box<dyn Snapshot + '_>, StoreError> {
        Ok(Box::new(snapshot::PgSnapshot::open(self.pool.get()?)?))
    }

    fn claim_partition(&self, partition: u32) -> Result<Option<Checkpoint>, StoreError> {
        let row = self.pool.get()?.transaction("BEGIN", |connection| {
            let raise = connection.statement(&format!(
                "UPDATE tally_checkpoints SET owner_epoch = owner_epoch + 1, owner_seen_ms = {NOW_MS} \
                 WHERE partition = $1 RETURNING owner_epoch, log_offset, generations"
            ))?;
            wait(connection.client.query_opt(&raise, &[&(partition as i32)])).map_err(pg_error("claim partition"))
        })?;
        let Some(row) = row else {
            let detail = format!("partition {partition} does not exist in the database (run `tally cluster init`)");
            return Err(StoreError::Config { detail });
        };
        self.epochs.lock().insert(partition, row.get(0));
        let Some(offset) = row.get::<_, Option<i64>>(1) else { return Ok(None) };
        let dedup_generation_starts = decode_generations(partition, row.get(2))?;
        Ok(Some(Checkpoint { partition, offset: offset as u64, dedup_generation_starts }))
    }

    fn release_partition(&self, partition: u32) {
        self.epochs.lock().remove(&partition);
    }

    /// One statement: the key's row is made, or (`DO UPDATE` without a change) locked and
    /// read, waiting for a racing claim to commit first.
    fn claim_request(&self, key: u128, fingerprint: u64, now_ms: i64) -> Result<bool, StoreError> {
        let mut connection = self.pool.get()?;
        let claim = connection.statement(
            "INSERT INTO tally_request_keys (request_key, fingerprint, claimed_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (request_key) DO UPDATE SET claimed_ms = tally_request_keys.claimed_ms RETURNING fingerprint",
        )?;
        let key = key.to_le_bytes().to_vec();
        let row = wait(connection.client.query_one(&claim, &[&key, &(fingerprint as i64), &now_ms]))
            .map_err(pg_error("claim idempotency key"))?;
        Ok(row.get::<_, i64>(0) == fingerprint as i64)
    }

    fn touch_partitions(&self) -> Result<(), StoreError> {
        let (partitions, epochs): (Vec<i32>, Vec<i64>) =
            self.epochs.lock().iter().map(|(&partition, &epoch)| (partition as i32, epoch)).unzip();
        if partitions.is_empty() {
            return Ok(());
        }
        let mut connection = self.pool.get()?;
        let touch = connection.statement(&format!(
            "UPDATE tally_checkpoints AS t SET owner_seen_ms = {NOW_MS} FROM unnest($1::INT4[], $2::INT8[]) AS o(p, e) \
             WHERE t.partition = o.p AND t.owner_epoch = o.e"
        ))?;
        wait(connection.client.execute(&touch, &[&partitions, &epochs])).map_err(pg_error("mark partitions alive"))?;
        Ok(())
    }

    fn silent_partitions(&self, silent_ms: i64) -> Result<Vec<u32>, StoreError> {
        let mut connection = self.pool.get()?;
        let read = connection.statement(&format!(
            "SELECT partition FROM tally_checkpoints WHERE owner_seen_ms < {NOW_MS} - $1 ORDER BY partition"
        ))?;
        let rows = wait(connection.client.query(&read, &[&silent_ms])).map_err(pg_error("read partitions' owners"))?;
        Ok(rows.iter().map(|row| row.get::<_, i32>(0) as u32).collect())
    }

    fn forget_requests_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut connection = self.pool.get()?;
        let forget = connection.statement("DELETE FROM tally_request_keys WHERE claimed_ms < $1")?;
        wait(connection.client.execute(&forget, &[&before_ms])).map_err(pg_error("forget idempotency keys"))
    }

    /// Recorded in `tally_meta` under `archive`, compared under its row lock.
    fn check_archive(&self, location: Option<&str>) -> Result<(), StoreError> {
        // `s3://bucket/prefix/` names the same place as `s3://bucket/prefix`.
        let location = location.map(|l| l.trim_end_matches('/'));
        self.pool.get()?.transaction("BEGIN", |connection| {
            // Two nodes archiving for the first time at once: one at a time. A missing row
            // cannot be locked, so an empty one (no archive) is made first.
            let row = connection
                .statement("INSERT INTO tally_meta (key, value) VALUES ('archive', '') ON CONFLICT (key) DO NOTHING")?;
            wait(connection.client.execute(&row, &[])).map_err(pg_error("write tally_meta"))?;
            check_archive_locked(connection, location)
        })
    }

    /// One statement, fenced: the first time, the archive starts at the checkpoint.
    fn begin_archive(&self, partition: u32) -> Result<ArchiveProgress, StoreError> {
        let epoch = self.epoch(partition)?;
        let mut connection = self.pool.get()?;
        let begin = connection.statement(
            "UPDATE tally_checkpoints SET archived_offset = COALESCE(archived_offset, log_offset, 0) \
             WHERE partition = $1 AND owner_epoch = $2 RETURNING archived_offset, archive_pending",
        )?;
        let row = wait(connection.client.query_opt(&begin, &[&(partition as i32), &epoch]))
            .map_err(pg_error("begin archive"))?
            .ok_or_else(|| StoreError::Fenced { partition, detail: "another engine owns it now".into() })?;
        Ok(progress(row.get(0), row.get(1)))
    }

    /// One transaction, fenced by the owner epoch and by the progress expected: the new
    /// progress, and the notes it passed dropped.
    fn set_archive_progress(
        &self,
        partition: u32,
        expected: ArchiveProgress,
        progress: ArchiveProgress,
    ) -> Result<(), StoreError> {
        let epoch = self.epoch(partition)?;
        let columns = |p: ArchiveProgress| (p.archived as i64, p.pending.map(|end| end as i64));
        let ((archived, pending), (was_archived, was_pending)) = (columns(progress), columns(expected));
        self.pool.get()?.transaction("BEGIN", |connection| {
            let set = connection.statement(
                "UPDATE tally_checkpoints SET archived_offset = $3, archive_pending = $4 \
                 WHERE partition = $1 AND owner_epoch = $2 \
                 AND archived_offset = $5 AND archive_pending IS NOT DISTINCT FROM $6",
            )?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
                [&(partition as i32), &epoch, &archived, &pending, &was_archived, &was_pending];
            if wait(connection.client.execute(&set, &params)).map_err(pg_error("record archive progress"))? != 1 {
                let detail = "another engine owns it now, or its archive moved on".into();
                return Err(StoreError::Fenced { partition, detail });
            }
            let passed =
                connection.statement("DELETE FROM tally_archive_notes WHERE partition = $1 AND log_offset <= $2")?;
            wait(connection.client.execute(&passed, &[&(partition as i32), &archived]))
                .map_err(pg_error("drop archived notes"))?;
            Ok(())
        })
    }

    fn archive_notes(&self, partition: u32, after: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut connection = self.pool.get()?;
        let read = connection.statement(
            "SELECT notes FROM tally_archive_notes WHERE partition = $1 AND log_offset > $2 ORDER BY log_offset",
        )?;
        let rows = wait(connection.client.query(&read, &[&(partition as i32), &(after as i64)]))
            .map_err(pg_error("read archive notes"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn is_remote(&self) -> bool {
        true
    }
}
