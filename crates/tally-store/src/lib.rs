//! The aggregate store: where flushed counters live, per (type, video, granularity,
//! bucket), with distinct-viewer sketches per bucket, top-items sketches per (type,
//! bucket), each partition's checkpoint and dedup journal, and the retention tiers.
//!
//! Architecture invariant: one `commit` writes a flush's counters, the checkpoint offsets
//! they cover and the dedup entries they added in a single atomic, durable transaction.
//! After a crash the store therefore holds either all of a flush or none of it, and the
//! checkpoint says exactly where log replay must resume.
//!
//! `CounterStore` is the seam a backend implements: `RedbStore` is the embedded default,
//! `PostgresStore` keeps the aggregates in a PostgreSQL-protocol database.

mod file;
mod key;
mod postgres;
mod redb_store;
mod tables;

pub use postgres::{PoolOptions, PostgresStore};
pub use redb_store::RedbStore;

use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Counter, Cutoffs, Granularity, Span, TierRows};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {context}: {source}")]
    Redb { context: &'static str, source: redb::Error },
    #[error(
        "store holds data for {stored} partitions but {configured} are configured; the partition count of a data directory cannot change"
    )]
    PartitionCount { stored: u32, configured: u32 },
    #[error("the store is being reopened after a failed write; retry shortly")]
    Reopening,
    #[error("a sync of the store file failed ({detail}); the store cannot be trusted until a restart")]
    SyncFailed { detail: String },
    #[error("database {context}: {source}")]
    Postgres { context: &'static str, source: tokio_postgres::Error },
    #[error("the database is unavailable: {detail}")]
    Unavailable { detail: String },
    #[error("{detail}")]
    Config { detail: String },
    #[error(
        "the database holds tally schema version {found}; this tally uses version {expected} and cannot use a newer one"
    )]
    SchemaVersion { found: i64, expected: i64 },
    #[error("refused to move the checkpoint of partition {partition}: {detail}")]
    Fenced { partition: u32, detail: String },
    #[error("store is corrupt: {detail}")]
    Corrupt { detail: String },
    #[error("store was written in format {found}; this tally reads format {expected} and cannot convert it")]
    Format { found: String, expected: u32 },
}

impl StoreError {
    /// Whether the error is the disk being full (as opposed to failing or the data being
    /// wrong): it goes away once space is freed.
    pub fn is_disk_full(&self) -> bool {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        match self {
            StoreError::Redb { source: redb::Error::Io(error), .. } => {
                matches!(error.kind(), StorageFull | QuotaExceeded)
            }
            StoreError::Postgres { source, .. } => source.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL),
            _ => false,
        }
    }

    /// Whether the store could not be reached (a networked store's connection, not its
    /// data): writes wait for it rather than fail.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Postgres { source, .. } => postgres_unreachable(source),
            _ => false,
        }
    }

    /// Whether a write that failed this way may succeed later, after `recover`: an I/O
    /// error on a write (a full disk, a failing device), not a failed sync (see
    /// `SyncFailed`), nor data the store refuses.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Reopening | StoreError::Redb { source: redb::Error::Io(_), .. } => true,
            StoreError::Postgres { source, .. } => postgres_transient(source),
            StoreError::Unavailable { .. } => true,
            _ => false,
        }
    }
}

/// A connection that broke or could not be made (closed, or an I/O error underneath), the
/// server refusing connections or shutting down, or a server that cannot take writes
/// (a primary demoted in a failover: 25006). Other errors without a SQLSTATE (a value
/// that does not convert, a protocol error) are bugs, never retried.
fn postgres_unreachable(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        let io = std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>());
        return error.is_closed() || io;
    };
    let code = code.code();
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "25006")
}

/// Worth retrying the transaction: unreachable, out of resources (class 53: disk full,
/// out of memory, too many connections), a serialization failure or deadlock, or an
/// I/O error on the server.
fn postgres_transient(error: &tokio_postgres::Error) -> bool {
    postgres_unreachable(error)
        || error.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("53") || matches!(code, "40001" | "40P01" | "55P03" | "58030" | "57014")
        })
}

/// What one group of store tables takes, for capacity planning (`tally store-stats`):
/// rows, bytes of rows, and bytes on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableUsage {
    /// `kind.granularity` (e.g. `counters.minute`) or a single table's name.
    pub group: String,
    pub tables: u64,
    pub rows: u64,
    pub stored_bytes: u64,
    /// What the disk holds for them: redb's pages; PostgreSQL's heap, indexes and TOAST.
    pub page_bytes: u64,
}

/// Where a partition's flushed state ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub partition: u32,
    /// Log offset up to which every frame is reflected in the store.
    pub offset: u64,
    /// Starts (receive time, ms) of the live dedup generations at that offset, oldest first.
    pub dedup_generation_starts: Vec<i64>,
}

/// One partition's part of a flush, besides its rows: where its checkpoint moves, and
/// the dedup entries it added since the last one, as (generation start, encoded entries).
pub struct PartitionFlush<'a> {
    /// The offset the stored checkpoint holds (0 if none): where this flush's frames
    /// begin. A commit whose start does not match is refused (`StoreError::Fenced`), so a
    /// flush is never applied twice nor over a gap.
    pub start: u64,
    pub checkpoint: Checkpoint,
    pub journal: &'a [(i64, Vec<u8>)],
    /// Cluster mode: the raw-event archive's notes of the flushed frames (which events
    /// were not counted), kept until the archive passes them (`archive_notes`). Empty on
    /// a single node, whose archiver keeps its notes beside the log.
    pub notes: &'a [u8],
}

/// Cluster mode: where a partition's raw-event archive stands, kept beside its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveProgress {
    /// Every counted event before this log offset is archived.
    pub archived: u64,
    /// The end of a file being written from `archived`, which may have landed: whoever
    /// archives the partition next writes exactly that range again (the same object,
    /// replaced) before going on.
    pub pending: Option<u64>,
}

/// What a store without cluster mode answers when asked for what only a cluster keeps.
fn cluster_only(what: &str) -> StoreError {
    StoreError::Config { detail: format!("only a cluster keeps {what} in the store") }
}

pub trait CounterStore: Send + Sync + 'static {
    /// Records the partition count on first use; fails if it differs from a stored one.
    /// Claims every partition for this store: a store that shares its data with others (a
    /// database) fences off whoever claimed them before, whose commits are then refused.
    fn claim_partitions(&self, partitions: u32) -> Result<(), StoreError>;
    /// The checkpoint of `partition`, or `None` if it never flushed.
    fn checkpoint(&self, partition: u32) -> Result<Option<Checkpoint>, StoreError>;
    /// The dedup journal blobs stored for one generation of one partition.
    fn dedup_blobs(&self, partition: u32, generation_start_ms: i64) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Adds a flush's rows (`tiers` builds each tier's, called once per granularity in
    /// `Granularity::ALL` order, so only one tier's rows are held at a time) into the
    /// stored buckets, sketches and indexes, and moves the partitions' checkpoints with
    /// their dedup journals: atomically and durably. Refused whole (`StoreError::Fenced`)
    /// if a partition's stored checkpoint is not at its flush's `start`, or another store
    /// claimed the partition since.
    fn commit<'a>(
        &self,
        flushes: &[PartitionFlush<'_>],
        tiers: &mut dyn FnMut(Granularity) -> TierRows<'a>,
    ) -> Result<(), StoreError>;
    /// Makes the store usable again after a transient failure (`StoreError::is_transient`)
    /// of `commit` or `purge`, or of a read, which may leave it refusing every operation.
    /// A failed transaction took effect whole or not at all; callers read the checkpoints
    /// to know which.
    fn recover(&self) -> Result<(), StoreError>;
    /// Whether the store refuses every operation until `recover` (after an I/O error).
    fn needs_recovery(&self) -> bool;
    /// Recompute: sets each row's stored counter, distinct-viewer sketch and top items to
    /// the row's value instead of adding to them (a zero counter removes its row), in one
    /// atomic, durable transaction that moves no checkpoint. The caller holds off flushes
    /// meanwhile.
    fn rewrite<'a>(&self, tiers: &mut dyn FnMut(Granularity) -> TierRows<'a>) -> Result<(), StoreError>;
    /// Drops what lies wholly before the cutoffs; returns the tables dropped.
    fn purge(&self, cutoffs: &Cutoffs) -> Result<usize, StoreError>;
    /// A consistent read view.
    fn snapshot(&self) -> Result<Box<dyn Snapshot + '_>, StoreError>;

    /// Cluster mode: takes ownership of one partition, raising its owner epoch (which
    /// fences whoever held it: their commits are refused from then on), and reads its
    /// checkpoint in the same transaction, after any commit of the previous owner. The
    /// partition count must have been recorded (`tally cluster init`).
    fn claim_partition(&self, partition: u32) -> Result<Option<Checkpoint>, StoreError> {
        let _ = partition;
        Err(StoreError::Config {
            detail: "this store cannot be shared by several nodes (cluster mode needs PostgreSQL)".into(),
        })
    }

    /// Cluster mode: gives a partition up; commits naming it are refused from now on.
    fn release_partition(&self, partition: u32) {
        let _ = partition;
    }

    /// Cluster mode: claims an idempotency key for the body `fingerprint`, across every
    /// node. True when the key is this body's (claimed now, or before with the same
    /// fingerprint); false when another body holds it.
    fn claim_request(&self, key: u128, fingerprint: u64, now_ms: i64) -> Result<bool, StoreError> {
        let _ = (key, fingerprint, now_ms);
        Ok(true)
    }

    /// Cluster mode: marks the partitions this store holds (claimed, not fenced since) as
    /// alive now, by the database's clock.
    fn touch_partitions(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Cluster mode: the partitions no owner marked alive for `silent_ms` (by the
    /// database's clock): the log's group left them unassigned.
    fn silent_partitions(&self, silent_ms: i64) -> Result<Vec<u32>, StoreError> {
        let _ = silent_ms;
        Ok(Vec::new())
    }

    /// Cluster mode: forgets request claims made before `before_ms`; returns how many.
    fn forget_requests_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        let _ = before_ms;
        Ok(0)
    }

    /// Cluster mode: every node archives raw events to the same place or none does. The
    /// first node with an archive records `location`; a node naming another location, or
    /// none while one is recorded, is refused (its flushes would leave archive notes out).
    fn check_archive(&self, location: Option<&str>) -> Result<(), StoreError> {
        let _ = location;
        Ok(())
    }

    /// Cluster mode: where the archive of a partition this store claimed stands. Archived
    /// for the first time, it starts at the checkpoint (what came before has no notes);
    /// the caller holds off flushes so that the checkpoint stays where it was claimed.
    fn begin_archive(&self, partition: u32) -> Result<ArchiveProgress, StoreError> {
        let _ = partition;
        Err(cluster_only("archive progress"))
    }

    /// Cluster mode: moves a claimed partition's archive from `expected` to `progress`, and
    /// drops the notes it passed. Refused (`Fenced`) once another store claimed the
    /// partition, or when the stored progress is not `expected` (it moved on meanwhile: the
    /// caller reads it again with `begin_archive` before it writes anything).
    fn set_archive_progress(
        &self,
        partition: u32,
        expected: ArchiveProgress,
        progress: ArchiveProgress,
    ) -> Result<(), StoreError> {
        let _ = (partition, expected, progress);
        Err(cluster_only("archive progress"))
    }

    /// Cluster mode: the archive notes committed with a partition's flushes whose
    /// checkpoint is past `after`, oldest first.
    fn archive_notes(&self, partition: u32, after: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let _ = (partition, after);
        Err(cluster_only("archive notes"))
    }

    /// Whether reads cross a network (and so may take long): the server then runs them
    /// as blocking work, apart from its other requests.
    fn is_remote(&self) -> bool {
        false
    }
}

/// A consistent, read-only view of the store.
pub trait Snapshot {
    fn checkpoint_offset(&self, partition: u32) -> Result<u64, StoreError>;
    /// Sum of the buckets of one span.
    fn sum(&self, event_type: &str, video_id: &str, span: Span) -> Result<Counter, StoreError>;
    /// Each stored, non-empty bucket of `granularity` starting in `[start, end)`, ascending.
    fn buckets(
        &self,
        event_type: &str,
        video_id: &str,
        granularity: Granularity,
        start: i64,
        end: i64,
        visit: &mut dyn FnMut(i64, Counter),
    ) -> Result<(), StoreError>;
    /// Merges the distinct-viewer sketches of one span into `into`.
    fn uniques(&self, event_type: &str, video_id: &str, span: Span, into: &mut Hll) -> Result<(), StoreError>;
    /// Merges the top-items sketches of one span into `into`.
    fn top(&self, event_type: &str, span: Span, into: &mut TopSketch) -> Result<(), StoreError>;
    /// Each video with an event of `event_type` in the days `[start, end)` (epoch minutes,
    /// day-aligned), at least once, in no particular order.
    fn videos(&self, event_type: &str, start: i64, end: i64, visit: &mut dyn FnMut(&str)) -> Result<(), StoreError>;
    /// Each event type `video_id` has in the days `[start, end)` (epoch minutes,
    /// day-aligned; a retention period of days, 360 of them, is the unit), at least once.
    fn video_types(&self, video_id: &str, start: i64, end: i64, visit: &mut dyn FnMut(&str)) -> Result<(), StoreError>;
    /// Every event type with stored events: flushed, and not wholly past day retention.
    fn types(&self) -> Result<Vec<String>, StoreError>;
}

/// Fuzzing entry point: decodes `bytes` as every stored value and table name the store
/// reads back (counter, checkpoint, a type's last day, a table name). Must never panic,
/// whatever the bytes.
#[doc(hidden)]
pub fn fuzz_values(bytes: &[u8]) {
    redb_store::fuzz_values(bytes);
}
