//! The SQL schema, created and migrated by tally itself.
//!
//! ```text
//! tally_meta         (key, value)                       schema_version, partitions, archive
//! tally_checkpoints  (partition, log_offset, generations, owner_epoch, owner_seen_ms,
//!                     archived_offset, archive_pending)
//! tally_dedup        (partition, generation_start, log_offset, entries)
//! tally_archive_notes (partition, log_offset, notes)    uncounted events of a flush, until archived
//! tally_types        (event_type, last_day)
//! tally_tables       (name, kind, granularity, period)  the period tables that exist
//! tally_request_keys (request_key, fingerprint, claimed_ms)  idempotency keys claimed in cluster mode
//! tally_<kind>_<granularity>_<period>                   one per period, like redb's
//!     counters   (event_type, video_id, bucket, count, sum NUMERIC)
//!     uniques    (event_type, video_id, bucket, sketch BYTEA)
//!     top        (event_type, bucket, sketch BYTEA)
//!     videos     (event_type, day, video_id)            day tier only
//! ```
//!
//! There is no per-video type index (redb's `videotypes`): the types of a video are read
//! from the day counters, whose key leads with the type, one probe per known type.
//!
//! Buckets live in one table per period (see `crate::tables`), so retention drops whole
//! tables and PostgreSQL gives their space back at once, with no vacuum.
//!
//! Only statements PostgreSQL ≥ 13, CockroachDB and YugabyteDB all accept: `CREATE TABLE
//! IF NOT EXISTS` with a primary key, `INSERT … SELECT FROM unnest(…) ON CONFLICT … DO
//! UPDATE / DO NOTHING`, `SELECT … FROM unnest(…) WITH ORDINALITY JOIN …`, `SELECT … FOR
//! UPDATE`, `UPDATE … WHERE`, `DELETE`, `DROP TABLE IF EXISTS`, `GREATEST`, `COALESCE`,
//! `SUM`, casts between `NUMERIC` and `TEXT`, `SET LOCAL client_min_messages`, `= ANY($1)`, `UPDATE … FROM unnest(…)`,
//! `ALTER TABLE … ADD COLUMN IF NOT EXISTS`, `extract(epoch FROM now())`, `COPY … FROM STDIN BINARY`, and
//! transactions at `READ COMMITTED` (writes) and `REPEATABLE READ READ ONLY` (reads). No
//! extensions. PostgreSQL-only, and outside the data path: `pg_database_size` and
//! `pg_relation_size` / `pg_total_relation_size` for `store-stats`. Tested against
//! PostgreSQL only.

use tally_core::Granularity;

use crate::tables::Kind;

/// The schema this tally writes. `MIGRATIONS[v]` takes a database from version `v` to
/// `v + 1`.
pub(crate) const VERSION: i64 = 3;

pub(crate) const MIGRATIONS: [&str; VERSION as usize] = [
    // 0 → 1: the fixed tables.
    "CREATE TABLE IF NOT EXISTS tally_checkpoints (
        partition INTEGER PRIMARY KEY,
        log_offset BIGINT,
        generations BYTEA NOT NULL,
        owner_epoch BIGINT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS tally_dedup (
        partition INTEGER NOT NULL,
        generation_start BIGINT NOT NULL,
        log_offset BIGINT NOT NULL,
        entries BYTEA NOT NULL,
        PRIMARY KEY (partition, generation_start, log_offset)
    );
    CREATE TABLE IF NOT EXISTS tally_types (event_type TEXT PRIMARY KEY, last_day BIGINT NOT NULL);
    CREATE TABLE IF NOT EXISTS tally_tables (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        granularity TEXT NOT NULL,
        period BIGINT NOT NULL
    );",
    // 1 → 2: cluster mode: idempotency keys claimed across nodes, and when each
    // partition's owner last showed it holds it (the database's clock).
    "CREATE TABLE IF NOT EXISTS tally_request_keys (
        request_key BYTEA PRIMARY KEY,
        fingerprint BIGINT NOT NULL,
        claimed_ms BIGINT NOT NULL
    );
    ALTER TABLE tally_checkpoints ADD COLUMN IF NOT EXISTS owner_seen_ms BIGINT NOT NULL DEFAULT 0;",
    // 2 → 3: cluster mode's raw-event archive: where each partition's archive stands (and
    // the end of a file being written), and the notes of what flushes did not count.
    "ALTER TABLE tally_checkpoints ADD COLUMN IF NOT EXISTS archived_offset BIGINT;
    ALTER TABLE tally_checkpoints ADD COLUMN IF NOT EXISTS archive_pending BIGINT;
    CREATE TABLE IF NOT EXISTS tally_archive_notes (
        partition INTEGER NOT NULL,
        log_offset BIGINT NOT NULL,
        notes BYTEA NOT NULL,
        PRIMARY KEY (partition, log_offset)
    );",
];

pub(crate) const META: &str = "CREATE TABLE IF NOT EXISTS tally_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)";

/// The name of the table of one (kind, granularity, period).
pub(crate) fn table(kind: Kind, granularity: Granularity, period: i64) -> String {
    let sign = if period < 0 { "n" } else { "" };
    format!("tally_{}_{}_{sign}{}", kind.name(), granularity.name(), period.unsigned_abs())
}

/// The statement creating the table of `kind` named `name`.
pub(crate) fn create(kind: Kind, name: &str) -> String {
    let columns = match kind {
        Kind::Counters => {
            "event_type TEXT NOT NULL, video_id TEXT NOT NULL, bucket BIGINT NOT NULL, \
             count BIGINT NOT NULL, sum NUMERIC NOT NULL, PRIMARY KEY (event_type, video_id, bucket)"
        }
        Kind::Uniques => {
            "event_type TEXT NOT NULL, video_id TEXT NOT NULL, bucket BIGINT NOT NULL, \
             sketch BYTEA NOT NULL, PRIMARY KEY (event_type, video_id, bucket)"
        }
        Kind::Top => {
            "event_type TEXT NOT NULL, bucket BIGINT NOT NULL, sketch BYTEA NOT NULL, PRIMARY KEY (event_type, bucket)"
        }
        Kind::Videos => {
            "event_type TEXT NOT NULL, day BIGINT NOT NULL, video_id TEXT NOT NULL, PRIMARY KEY (event_type, day, video_id)"
        }
        Kind::VideoTypes => {
            unreachable!("no per-video type tables here: a video's types are read from the day counters")
        }
    };
    format!("CREATE TABLE IF NOT EXISTS {name} ({columns})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers_for_every_period() {
        assert_eq!(table(Kind::Counters, Granularity::Minute, 20_000), "tally_counters_minute_20000");
        assert_eq!(table(Kind::VideoTypes, Granularity::Day, -3), "tally_videotypes_day_n3");
    }
}
