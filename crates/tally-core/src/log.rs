//! The log seam: what a partition's writer appends to and what recovery replays.
//!
//! The engine asks three things of a partition's log, whatever holds it (the local
//! write-ahead log in `tally-wal`, or a Kafka partition): append a frame of records
//! durably and say where it ends, replay every frame from an offset, and let go of what
//! lies behind a checkpoint. Offsets are the log's own and only grow; the store keeps, per
//! partition, the offset its aggregates reach, and recovery replays the log from there.

use std::time::Duration;

/// A frame of records as replayed; an `Err` item is a frame whose framing is malformed.
pub type FrameRecords<'a> = dyn Iterator<Item = Result<&'a [u8], String>> + 'a;

/// What recovery does with each replayed frame: `visit(end_offset_of_frame, records)`.
/// Returning `Stop` ends the replay (the visitor keeps its own reason).
pub type Visit<'v> = dyn FnMut(u64, &mut FrameRecords<'_>) -> Result<(), Stop> + 'v;

/// A visitor's request to stop replaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop;

/// A frame made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Where the next frame starts; every offset below it is durable.
    pub end_offset: u64,
    /// How long making it durable took (an fsync, or the broker's acknowledgement).
    pub sync: Duration,
}

/// What a partition's log holds now, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogHeld {
    /// Files, segments or whatever unit the log deletes in.
    pub segments: u64,
    pub bytes: u64,
}

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Nothing was written: the log has no room. `reason` is fit for clients (no paths).
    #[error("{detail}")]
    Full { reason: String, detail: String },
    /// Nothing was written and the log is as it was: a later append may succeed.
    #[error("{detail}")]
    Unwritten { detail: String },
    /// The append may or may not have reached the log (the broker did not answer in
    /// time); the log itself is usable. Callers answer "outcome unknown".
    #[error("{detail}")]
    Uncertain { detail: String },
    /// The log must not be used again (a failed sync leaves it in an unknown state), or
    /// cannot be opened as asked (damaged, or missing what the checkpoint needs).
    #[error("{detail}")]
    Failed { detail: String },
    /// A read asked for what the log no longer holds (deleted by its retention); it
    /// resumes at `resumes` when the log knows where.
    #[error("{detail}")]
    Gone { detail: String, resumes: Option<u64> },
    /// A read failed for now (the log unreachable, or not yet delivering what it holds):
    /// a later read may succeed.
    #[error("{detail}")]
    Unread { detail: String },
}

impl LogError {
    /// Whether the log is as it was before the failed call, so a later append may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, LogError::Full { .. } | LogError::Unwritten { .. })
    }
}

/// One partition's log, as its writer uses it (one writer per partition).
pub trait PartitionLog: Send {
    /// Appends one frame holding `records` (at least one) and makes it durable before
    /// returning. A `Full` or `Unwritten` error leaves the log as it was; after any other
    /// error the log is not used again.
    fn append(&mut self, records: &[&[u8]]) -> Result<Appended, LogError>;

    /// Lets go of what lies wholly before `offset`, which the store has checkpointed. It
    /// may be deleted; a failure only means the log keeps more than it needs.
    fn forget_before(&mut self, offset: u64) -> Result<(), LogError>;

    fn held(&self) -> LogHeld;

    /// The largest record one append takes, bytes. The engine refuses a request whose
    /// record for this partition is larger before anything of it is written.
    fn record_bytes_max(&self) -> usize {
        usize::MAX
    }
}

/// The logs of every partition: where recovery opens each one.
pub trait Log: Send + Sync {
    /// Opens `partition`'s log and replays every frame from `from` (a checkpoint: a frame
    /// boundary, or 0) to its end, in order, before returning the log to append to. The
    /// outer error is the log's (damaged, or not reaching `from`); the inner one says the
    /// visitor stopped the replay.
    fn open(
        &self,
        partition: u32,
        from: u64,
        visit: &mut Visit<'_>,
    ) -> Result<Result<Box<dyn PartitionLog>, Stop>, LogError>;
}

/// The end offset of the shared log's message at `offset`. A frame is named by its end,
/// in a shared log as in a local one: the archive's reader and the owners' notes of what
/// they did not count must agree on it.
pub fn message_end(offset: u64) -> u64 {
    offset + 1
}

/// Reads back what a partition's log holds, beside its writer: the raw-event archive
/// reads the frames the store has checkpointed (`tally-engine`'s archiver).
pub trait LogReader: Send + Sync {
    /// Visits the frames of `partition` from `from` to `to` (frame boundaries at or behind
    /// the store's checkpoint) in order, each with its end offset, until the visitor
    /// stops. A read may end early, before a stretch the log cannot deliver now; a read
    /// starting there fails: `Gone` once the log is known not to hold it, else `Unread`.
    fn read(&self, partition: u32, from: u64, to: u64, visit: &mut Visit<'_>) -> Result<(), LogError>;
}

/// The engine as the owner of partitions of a log it shares with other nodes (cluster
/// mode). The log's consumer group decides which partitions this node owns; the log calls
/// `claim` as a partition arrives (before reading it), hands each record list to `apply`
/// in offset order, and calls `release` as a partition leaves.
pub trait Owner: Send + Sync {
    /// Takes `partition` over: fences its previous owner and restores its state from the
    /// store. Answers the offset to read from (the stored checkpoint).
    fn claim(&self, partition: u32) -> Result<u64, String>;
    /// Gives `partition` up: its state not yet in the store is dropped (the next owner
    /// replays it from the log).
    fn release(&self, partition: u32);
    /// Applies the record list at `offset` of `partition` (`record::encode_list`). Offsets
    /// below the partition's applied offset, and partitions not owned, are skipped. An
    /// `Err` says why the list cannot be decoded: nothing of it was applied, and the
    /// partition moved past it (the log dead-letters it).
    fn apply(&self, partition: u32, offset: u64, records: &[u8]) -> Result<(), String>;
    /// The offset `apply` expects next for an owned `partition` (none when not owned). A
    /// log that delivers a later one has skipped records: it reads them again before
    /// `apply` is given the later offset.
    fn next_offset(&self, partition: u32) -> Option<u64>;
    /// Whether the engine stopped for good (a failed append or store, `Engine::is_healthy`):
    /// it applies nothing more, so the log should give its partitions to other nodes.
    fn failed(&self) -> bool;
    /// The log stops feeding this owner (the node leaves the group): an `apply` waiting for
    /// room (the store unreachable) gives up, applying nothing of its list, and later ones
    /// apply nothing. What was applied is flushed as the partitions are released.
    fn interrupt(&self);
    /// The partitions no node has shown to own for `silent` (every owner marks its
    /// partitions alive in the store each flush interval): a consumer group that left
    /// them unassigned, which the log should mend by joining the group again.
    fn unowned(&self, silent: std::time::Duration) -> Result<Vec<u32>, String>;
    /// Where each owned partition's stored checkpoint is: the log may record it as its own
    /// progress marker (for lag monitoring; recovery never reads it).
    fn checkpoints(&self) -> Vec<(u32, u64)>;
}
