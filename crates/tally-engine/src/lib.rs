//! The single-node pipeline. Events enter through `Engine::submit`, are split by partition,
//! written to each partition's log by that partition's writer thread (one fdatasync per
//! group of requests), applied to the partition's in-memory state, and only then
//! acknowledged. A flusher thread periodically moves the in-memory deltas into the store
//! together with the log offset they cover (the checkpoint), after which the log segments
//! behind it are deleted. Queries add the store's buckets to the deltas not yet flushed.
//!
//! See ARCHITECTURE.md, "Life of an acknowledged event".
//!
//! Architecture invariant: an outcome is sent to a caller only after the frame holding its
//! record was fdatasync-ed *and* applied to the in-memory state, so anything acknowledged is
//! both durable and visible to the next query.

mod archive;
mod budget;
mod checkpoint;
mod cluster;
pub mod local;
mod partition;
mod plan;
mod position;
mod query;
mod recompute;
mod recovery;
mod types;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tally_aggregate::dedup::request_key;
use tally_core::log::{Log, LogError};
use tally_core::{EventRef, RecordWriter, RequestKey, partition_of};
use tally_store::{CounterStore, StoreError};
use tally_wal::WalError;

pub use archive::ArchiveStatus;
pub use plan::Boundaries;
pub use position::Position;
pub use query::{TopAnswer, TopItem};
pub use recompute::{RecomputeRange, RecomputeReport};
pub use tally_aggregate::{Counter, Outcome};
pub use tally_core::{Cutoffs, Granularity, MinuteRange, Retention};

use budget::QueueBudget;
use partition::{Acked, Append, Partition};

/// Bytes a typical event takes in a record (short ids, no viewer id): sizes the first
/// allocation of each record, so most batches are encoded without regrowing.
const RECORD_BYTES_PER_EVENT_ESTIMATE: usize = 48;

pub use local::STORE_FILE;

/// What clients are told once a log or store write failed.
const FAILED_REASON: &str = "a log or store write failed (see the server log); restart the server to recover";

/// How far writes and purges trail the retention cutoffs queries use, minutes.
const RETENTION_LAG_MINUTES: i64 = 60;

/// Every knob of the engine. Defaults are documented where they are set, in `Default`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Log partitions, each with its own writer thread and fsync stream. Fixed for the life
    /// of a data directory: it decides which log a video's events live in.
    pub partitions: u32,
    pub segment_bytes_max: u64,
    /// How often deltas move to the store and a checkpoint is taken, milliseconds. Bounds
    /// the log to replay after a crash (about this much traffic) and the deltas in memory.
    pub flush_interval_ms: u64,
    /// How long an event id or idempotency key is remembered at least, milliseconds.
    pub dedup_window_ms: i64,
    /// Dedup entries (event ids plus idempotency keys) per partition beyond which requests
    /// that need a new entry are refused with "overloaded" instead of growing memory.
    pub dedup_entries_max: usize,
    /// Bytes of records a writer gathers into one frame (one fdatasync).
    pub group_bytes_max: usize,
    /// Bytes of records accepted but not yet acknowledged, over all partitions; past it new
    /// requests are refused with "overloaded".
    pub queue_bytes_max: usize,
    /// In-memory (type, video, minute) cells per partition past which its writer waits for
    /// a flush before writing more, so memory stays bounded when the store falls behind.
    pub pending_cells_max: usize,
    /// The store's page cache, bytes (a ceiling, filled as pages are read and written).
    pub store_cache_bytes: usize,
    /// How long each granularity of buckets is kept.
    pub retention: Retention,
    /// How often expired buckets are dropped, milliseconds.
    pub retention_interval_ms: u64,
    /// Free disk space a new log segment must leave, bytes: once the log would eat into
    /// it, writes are refused (`DiskFull`) while the store can still flush and checkpointed
    /// segments are deleted; they resume by themselves once space is free again.
    pub disk_free_bytes_min: u64,
    /// Distinct event types counted at most; a request bringing one more is refused.
    pub event_types_max: usize,
    /// Where counted events are archived as Parquet (`file:///dir` or a directory), if
    /// anywhere. Log segments are then kept until archived.
    pub archive: Option<String>,
    /// Days raw events are kept in the archive (by receive hour, whole files); `None`
    /// keeps them forever.
    pub archive_retention_days: Option<u32>,
    /// How often the archiver writes a partition's file while less than 64 MiB of its log
    /// waits, milliseconds (with more, at once).
    pub archive_file_interval_ms: u64,
    /// Start even if the newest log segment of a partition was deleted or cut short,
    /// dropping what was lost (the log says what), instead of refusing to.
    pub accept_log_loss: bool,
    /// The wall clock retention and query defaults are measured against.
    pub clock: Clock,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            data_dir: PathBuf::from("./tally-data"),
            partitions: 4,
            segment_bytes_max: 64 << 20,
            flush_interval_ms: 1_000,
            dedup_window_ms: 10 * 60_000,
            dedup_entries_max: 4_000_000,
            group_bytes_max: 8 << 20,
            queue_bytes_max: 256 << 20,
            pending_cells_max: 2_000_000,
            store_cache_bytes: 1 << 30,
            retention: Retention::default(),
            retention_interval_ms: 60_000,
            disk_free_bytes_min: 256 << 20,
            event_types_max: 1_000,
            archive: None,
            archive_retention_days: None,
            archive_file_interval_ms: 60_000,
            accept_log_loss: false,
            clock: Clock::system(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("overloaded: {reason}")]
    Overloaded { reason: &'static str },
    #[error("not accepting writes: {reason}")]
    Unavailable { reason: String },
    /// The disk holding the log is full (down to the reserve); nothing was written, and
    /// writes resume by themselves once space is freed.
    #[error("disk full: {reason}")]
    DiskFull { reason: String },
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("idempotency key was already used for a different request body")]
    IdempotencyConflict,
    #[error("outcome unknown: {reason}; retry with the same idempotency key")]
    OutcomeUnknown { reason: String },
    #[error("recovery of partition {partition} failed at log offset {offset}: {detail}")]
    Recovery { partition: u32, offset: u64, detail: String },
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("invalid position: {reason}")]
    InvalidPosition { reason: String },
    #[error("recompute refused: {reason}")]
    Recompute { reason: String },
    #[error("query too expensive: {reason}")]
    TooExpensive { reason: String },
    /// One partition's part of a request is larger than its log takes in one record.
    #[error(
        "the request's events for partition {partition} take {bytes} bytes in the log, which takes at most {max} per partition and request; send fewer events per request"
    )]
    RecordTooLarge { partition: u32, bytes: usize, max: usize },
    #[error("event type {event_type:?} would be new, and this server counts at most {max} event types")]
    TooManyTypes { event_type: String, max: usize },
}

impl From<WalError> for EngineError {
    fn from(error: WalError) -> EngineError {
        EngineError::Log(error.into())
    }
}

impl From<StoreError> for EngineError {
    fn from(error: StoreError) -> EngineError {
        match error {
            // Over in a moment: the store is opened again after a failed write.
            StoreError::Reopening => EngineError::Unavailable { reason: error.to_string() },
            // A database out of reach: reads answer 503 until it is back.
            error if error.is_unreachable() => EngineError::Unavailable { reason: error.to_string() },
            error => EngineError::Store(error),
        }
    }
}

/// State shared by the engine handle, the writers and the flusher.
pub(crate) struct Shared {
    config: EngineConfig,
    store: Arc<dyn CounterStore>,
    partitions: Vec<Arc<Partition>>,
    budget: QueueBudget,
    /// Set when a log or store write failed: nothing is acknowledged any more, and a
    /// restart recovers from disk. Never cleared.
    failure: Mutex<Option<String>>,
    flush_signal: checkpoint::FlushSignal,
    /// Held by `checkpoint::flush_once` and the retention purge: one store write at a
    /// time. Holds a flush whose commit failed, until it is committed.
    flush_lock: Mutex<checkpoint::FlushState>,
    /// Set while store writes fail (a full disk, an I/O error); cleared by the first
    /// commit that succeeds. Writers that wait for the flusher are refused with it.
    store_trouble: Mutex<Option<checkpoint::StoreTrouble>>,
    /// Read-held while a request is sent to its partitions, write-held to close them: a
    /// request is sent to all of its partitions or to none.
    admission: parking_lot::RwLock<bool>,
    /// Held while a request with an idempotency key is sent, so that every partition
    /// receives keyed requests in the same order, and two requests reusing one key are
    /// seen in the same order everywhere.
    keyed_order: Mutex<()>,
    /// One recompute at a time (each holds a day's cells in memory).
    recomputing: Mutex<()>,
    event_types: types::EventTypes,
    /// The largest record every partition's log takes (`PartitionLog::record_bytes_max`).
    record_bytes_max: usize,
    /// Cluster mode: the log is shared with other nodes; writers only append, and the
    /// partitions this node owns are applied from the log (`cluster::ClusterOwner`).
    cluster: bool,
    /// Feeds the raw-event archive, when one is configured.
    archiver: Option<Arc<archive::Archiver>>,
}

impl Shared {
    /// Where a partition's log may be forgotten: behind the store's checkpoint and, with an
    /// archive, behind what is archived.
    pub(crate) fn forget_limit(&self, partition: &Partition) -> u64 {
        let checkpoint = partition.checkpoint_offset.load(std::sync::atomic::Ordering::Acquire);
        self.archiver.as_ref().map_or(checkpoint, |archiver| checkpoint.min(archiver.archived(partition.index)))
    }

    /// The engine clock's epoch minute.
    fn now_minute(&self) -> i64 {
        self.config.clock.now_ms().div_euclid(tally_core::bucket::MINUTE_MS)
    }

    /// The retention cutoffs now: what queries may read.
    pub(crate) fn cutoffs(&self) -> Cutoffs {
        self.config.retention.cutoffs(self.now_minute())
    }

    /// The cutoffs flushes and purges apply: `RETENTION_LAG_MINUTES` behind the query
    /// cutoffs, so a query that chose its buckets just before a cutoff moved still finds
    /// them all when it reads.
    pub(crate) fn write_cutoffs(&self) -> Cutoffs {
        self.config.retention.cutoffs(self.now_minute() - RETENTION_LAG_MINUTES)
    }

    /// Stops acknowledging writes for good (until a restart). `detail` goes to the log
    /// only: clients are told the kind of failure, never file names.
    pub(crate) fn fail(&self, detail: String) {
        tracing::error!(%detail, "engine stops acknowledging writes");
        self.failure.lock().get_or_insert_with(|| FAILED_REASON.into());
    }

    /// `fail`, and the error the caller at hand is answered.
    pub(crate) fn failed(&self, detail: String) -> EngineError {
        self.fail(detail);
        EngineError::Unavailable { reason: FAILED_REASON.into() }
    }
}

pub struct Engine {
    /// The partitions' logs (each writer holds its own partition's): kept for the life
    /// of the engine, with whatever the log holds (the data directory's lock).
    _log: Option<Box<dyn Log>>,
    shared: Arc<Shared>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    flusher: Mutex<Option<checkpoint::FlusherHandle>>,
    /// The archiver thread and its stop flag, when an archive is configured.
    archiving: Mutex<Option<(Arc<std::sync::atomic::AtomicU8>, JoinHandle<()>)>>,
    recovery: RecoveryReport,
}

/// A request's `Idempotency-Key` and a fingerprint of its body (any stable hash of the
/// bytes the client sent; the server uses xxh3).
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyKey<'a> {
    pub key: &'a str,
    pub fingerprint: u64,
}

/// What opening the data directory did.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryReport {
    pub duration: Duration,
    /// Log bytes replayed past the checkpoints.
    pub replayed_bytes: u64,
    pub replayed_records: u64,
}

/// A submitted request waiting for its partitions to acknowledge it.
pub struct Submitted {
    /// Already known parts of the outcome (a retry answered from dedup memory).
    ready: Outcome,
    replies: Vec<(u32, tokio::sync::oneshot::Receiver<Result<Acked, EngineError>>)>,
}

/// A request made durable: what it did, and where it reached in each partition's log.
#[derive(Debug, Clone, Default)]
pub struct Acknowledged {
    pub outcome: Outcome,
    pub position: Position,
}

impl Submitted {
    /// Resolves once every partition holding part of the request has made it durable and
    /// (in single-node mode) visible. Past admission, a failure means the outcome is
    /// unknown: parts may have reached the log. Only a retry with the same idempotency key
    /// is then safe.
    pub async fn acknowledged(self) -> Result<Acknowledged, EngineError> {
        let mut parts = Vec::with_capacity(self.replies.len());
        for (partition, reply) in self.replies {
            parts.push((partition, reply.await));
        }
        sum_parts(self.ready, parts)
    }

    /// `acknowledged`, without the position.
    pub async fn outcome(self) -> Result<Outcome, EngineError> {
        self.acknowledged().await.map(|acknowledged| acknowledged.outcome)
    }

    /// `outcome` for callers outside an async runtime (tests, tools).
    pub fn outcome_blocking(self) -> Result<Outcome, EngineError> {
        let ready = self.ready;
        let parts = self.replies.into_iter().map(|(partition, reply)| (partition, reply.blocking_recv())).collect();
        sum_parts(ready, parts).map(|acknowledged| acknowledged.outcome)
    }
}

type Reply = Result<Result<Acked, EngineError>, tokio::sync::oneshot::error::RecvError>;

/// The wall clock, epoch milliseconds: what retention and query defaults are measured
/// against. Injected (`EngineConfig::clock`), so tests fix time instead of switching
/// retention off; the server reads the same one for receive times.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    /// The system's clock.
    pub fn system() -> Clock {
        Clock::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
    }

    pub fn new(now_ms: impl Fn() -> i64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now_ms))
    }

    /// Always `ms`.
    pub fn fixed(ms: i64) -> Clock {
        Clock::new(move || ms)
    }

    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now = {} ms)", self.now_ms())
    }
}

/// Milliseconds since this process first asked: for durations, which the wall clock
/// must not measure (it may jump).
pub(crate) fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // Offset by one so that 0 can mean "never".
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as i64 + 1
}

fn sum_parts(ready: Outcome, parts: Vec<(u32, Reply)>) -> Result<Acknowledged, EngineError> {
    let mut total = ready;
    let mut reached = Vec::with_capacity(parts.len());
    let mut reused = false;
    let mut written = false;
    let mut refused = None;
    for (partition, part) in parts {
        match part {
            Ok(Ok(acked)) => {
                written = true;
                total.add(acked.outcome);
                reached.push((partition, acked.end_offset));
            }
            Ok(Err(EngineError::IdempotencyConflict)) => reused = true,
            // Nothing of this part was written: the request counted nothing only if no
            // other part was.
            Ok(Err(error @ (EngineError::DiskFull { .. } | EngineError::Unavailable { .. }))) => refused = Some(error),
            Ok(Err(error @ EngineError::OutcomeUnknown { .. })) => return Err(error),
            Ok(Err(error)) => return Err(EngineError::OutcomeUnknown { reason: error.to_string() }),
            Err(_) => return Err(EngineError::OutcomeUnknown { reason: "partition writer stopped".into() }),
        }
    }
    match refused {
        Some(error) if !written && !reused => return Err(error),
        Some(error) => return Err(EngineError::OutcomeUnknown { reason: error.to_string() }),
        None => {}
    }
    // Keyed requests reach every partition in one order, so a reused key is refused by
    // all of them alike.
    if reused {
        Err(EngineError::IdempotencyConflict)
    } else {
        Ok(Acknowledged { outcome: total, position: Position::new(reached) })
    }
}

/// Per-partition figures for monitoring.
#[derive(Debug, Clone, Default)]
pub struct PartitionStats {
    pub queued_appends: u64,
    pub pending_cells: u64,
    pub dedup_entries: u64,
    pub wal_segments: u64,
    pub wal_bytes: u64,
    pub applied_offset: u64,
    pub checkpoint_offset: u64,
    /// Whether this engine applies the partition (always, but in cluster mode).
    pub owned: bool,
}

#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub partitions: Vec<PartitionStats>,
    pub queue_bytes: u64,
    pub failed: bool,
    /// Store writes fail now (flushes are retried); nothing acknowledged is lost.
    pub store_failing: bool,
    /// Distinct event types known (stored, in memory, or just admitted).
    pub event_types: u64,
}

impl Engine {
    /// Opens (or creates) the data directory with its embedded store (`local::open`) and
    /// starts on it.
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        let (store, log) = local::open(&config)?;
        Engine::start(config, store, Box::new(log))
    }

    /// Starts on the store and log given: claims every partition in the store, replays
    /// each partition's log from its checkpoint, and starts the writer and flusher
    /// threads. Returns once recovery is complete: the engine is then ready.
    pub fn start(config: EngineConfig, store: Arc<dyn CounterStore>, log: Box<dyn Log>) -> Result<Engine, EngineError> {
        recovery::start(config, store, log)
    }

    pub fn recovery(&self) -> RecoveryReport {
        self.recovery
    }

    /// Validated events in, one record per touched partition out to the writers. Admission
    /// is all or nothing: a refused request has sent nothing to any partition.
    ///
    /// A request with an idempotency key is logged to every partition, so that each one
    /// remembers the key: a retry is then answered from memory without touching the log,
    /// and a key reused for a different body is refused wherever its parts would land.
    pub fn submit(
        &self,
        events: &[EventRef<'_>],
        idempotency_key: Option<IdempotencyKey<'_>>,
        receive_ms: i64,
    ) -> Result<Submitted, EngineError> {
        let shared = &self.shared;
        if let Some(reason) = shared.failure.lock().clone() {
            return Err(EngineError::Unavailable { reason });
        }
        if !*shared.admission.read() {
            return Err(EngineError::Unavailable { reason: "shutting down".into() });
        }
        let partitions = shared.config.partitions;
        let key = idempotency_key.map(|k| RequestKey { key: request_key(k.key), fingerprint: k.fingerprint });
        if let Some(request) = key
            && let Some(first) = self.settle_key(request, receive_ms)?
        {
            return Ok(Submitted { ready: first, replies: Vec::new() });
        }
        let capacity = events.len() / partitions as usize * RECORD_BYTES_PER_EVENT_ESTIMATE;
        let mut records: Vec<Option<RecordWriter>> =
            (0..partitions).map(|_| key.is_some().then(|| RecordWriter::new(receive_ms, key, capacity))).collect();
        let mut needs_dedup_entry = vec![key.is_some(); partitions as usize];
        for event in events {
            let partition = partition_of(event.video_id, partitions) as usize;
            needs_dedup_entry[partition] |= event.event_id.is_some();
            records[partition].get_or_insert_with(|| RecordWriter::new(receive_ms, key, capacity)).push(event);
        }
        let mut total_bytes = 0;
        let mut appends = Vec::new();
        for (index, record) in records.into_iter().enumerate() {
            let Some(record) = record else { continue };
            let partition = &shared.partitions[index];
            // In cluster mode the partition's memory may be another node's: only the
            // shared log's own limits apply.
            if !shared.cluster {
                partition.admit(needs_dedup_entry[index], shared.config.dedup_entries_max)?;
            }
            let record = record.finish();
            if record.len() > shared.record_bytes_max {
                let (bytes, max) = (record.len(), shared.record_bytes_max);
                return Err(EngineError::RecordTooLarge { partition: index as u32, bytes, max });
            }
            total_bytes += record.len();
            appends.push((partition, record));
        }
        let permit =
            shared.budget.try_take(total_bytes).ok_or(EngineError::Overloaded { reason: "write queue is full" })?;
        let permit = Arc::new(permit);
        // Last of the checks, so a request refused for another reason adds no type.
        shared.event_types.admit(events)?;
        let _keyed_order = key.map(|_| shared.keyed_order.lock());
        let open = shared.admission.read();
        if !*open {
            return Err(EngineError::Unavailable { reason: "shutting down".into() });
        }
        let mut replies = Vec::with_capacity(appends.len());
        for (sent, (partition, record)) in appends.into_iter().enumerate() {
            let (reply, receiver) = tokio::sync::oneshot::channel();
            if let Err(error) = partition.send(Append { record, reply, _permit: Arc::clone(&permit) }) {
                // Only a dead writer refuses here; parts already sent may be counted.
                return Err(if sent == 0 { error } else { EngineError::OutcomeUnknown { reason: error.to_string() } });
            }
            replies.push((partition.index, receiver));
        }
        Ok(Submitted { ready: Outcome::default(), replies })
    }

    /// What a keyed request's key already decided: its first outcome when every
    /// partition answered it already (a retry), `IdempotencyConflict` when another body
    /// holds it, nothing when it must be written. In cluster mode owners on other nodes
    /// apply the parts, each in its own log order, so the key is claimed across nodes in
    /// the store first: one body wins it everywhere.
    fn settle_key(&self, request: RequestKey, receive_ms: i64) -> Result<Option<Outcome>, EngineError> {
        let shared = &self.shared;
        if shared.cluster {
            return match shared.store.claim_request(request.key, request.fingerprint, receive_ms)? {
                true => Ok(None),
                false => Err(EngineError::IdempotencyConflict),
            };
        }
        let mut first = Outcome::default();
        let mut known_everywhere = true;
        for partition in &shared.partitions {
            match partition.memory.lock().state.dedup.request_outcome(request.key) {
                Some((_, fingerprint)) if fingerprint != request.fingerprint => {
                    return Err(EngineError::IdempotencyConflict);
                }
                Some((outcome, _)) => first.add(outcome),
                None => known_everywhere = false,
            }
        }
        Ok(known_everywhere.then_some(first))
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            partitions: self.shared.partitions.iter().map(|p| p.stats()).collect(),
            queue_bytes: self.shared.budget.used() as u64,
            failed: self.shared.failure.lock().is_some(),
            store_failing: self.shared.store_trouble.lock().is_some(),
            event_types: self.shared.event_types.count() as u64,
        }
    }

    /// Rewrites the stored aggregates of the days of `range` from the archive, while the
    /// engine runs (see `recompute`). Blocking: seconds to minutes, flushes held back only
    /// for the last part.
    pub fn recompute(&self, range: RecomputeRange) -> Result<RecomputeReport, EngineError> {
        recompute::recompute(&self.shared, range)
    }

    /// How the raw-event archive is doing, when one is configured.
    pub fn archive_status(&self) -> Option<ArchiveStatus> {
        self.shared.archiver.as_ref().map(|archiver| archiver.status(&self.shared.partitions))
    }

    /// Flushes every partition's deltas to the store now and moves the checkpoints.
    pub fn flush(&self) -> Result<(), EngineError> {
        checkpoint::flush_once(&self.shared)
    }

    /// True while the engine acknowledges writes.
    pub fn is_healthy(&self) -> bool {
        self.shared.failure.lock().is_none()
    }

    /// Stops accepting, lets the writers finish what they hold, flushes everything and takes
    /// a final checkpoint. Idempotent.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        self.stop_writers();
        if let Some(flusher) = self.flusher.lock().take() {
            flusher.stop_and_flush()?;
        }
        // The archiver archives what the final flush checkpointed, then exits.
        self.stop_archiver(archive::STOP);
        Ok(())
    }

    /// Stops like a crash right after the last acknowledgement: writers finish what they
    /// hold, but nothing is flushed, so the next open replays the log from the last
    /// checkpoint. What `kill -9` leaves, minus the page-cache question, for tests and
    /// drills that cannot kill their own process.
    pub fn halt(&self) {
        self.stop_writers();
        if let Some(flusher) = self.flusher.lock().take() {
            flusher.stop();
        }
        self.stop_archiver(archive::HALT);
    }

    fn stop_archiver(&self, order: u8) {
        if let Some((stop, thread)) = self.archiving.lock().take() {
            stop.store(order, std::sync::atomic::Ordering::Release);
            let _ = thread.join();
        }
    }

    fn stop_writers(&self) {
        *self.shared.admission.write() = false;
        for partition in &self.shared.partitions {
            partition.close();
        }
        for writer in self.writers.lock().drain(..) {
            let _ = writer.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(%error, "final flush failed; the log will be replayed at next start");
        }
    }
}
