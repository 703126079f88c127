//! The write-ahead log of one partition: an append-only sequence of frames spread over
//! segment files, addressed by a byte offset that grows forever.
//!
//! On-disk format (see ARCHITECTURE.md, "WAL segment and frame"):
//!
//! ```text
//! <dir>/<base offset, 20 digits>.wal     one segment; holds the offsets [base, next base)
//! segment:= frame* roll_marker? zeros trailer        preallocated; see `segment`
//! frame  := header payload
//! header := u32 magic "TLWF" | u32 payload_len | u32 crc32c(payload) | u32 crc32c(first 12 header bytes)
//! payload:= (u32 record_len, record bytes)*      records are opaque to this crate
//! ```
//!
//! One `append` writes one frame (a group of records, possibly from many requests) and
//! calls `fdatasync` once before returning: that is the group commit. A frame is the unit
//! of atomicity; a crash leaves at most the last frame torn. Anything else missing (a
//! segment cut short, a deleted one, a deleted log) is damage and is refused by name.
//!
//! What we assume of the disk: after `fdatasync` returns, the bytes written before it
//! survive power loss; bytes written after the last successful `fdatasync` may be lost,
//! truncated, or zero-filled, in any page order. A new segment file and a removed one are
//! made durable by fsyncing the directory.

mod frame;
mod local;
mod segment;

pub use frame::{FRAME_HEADER_BYTES, FRAME_PAYLOAD_BYTES_MAX, FrameRecords};
pub use local::{LocalLog, LocalReader};
pub use segment::{Wal, WalOptions, WalStats, free_bytes};

/// Fuzzing entry point: reads `bytes` as a segment file the way recovery does (trailer,
/// then frames as the last segment and as an earlier one) and iterates every frame's
/// records. Returns the records found; must never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_segment(bytes: &[u8]) -> usize {
    segment::fuzz(bytes)
}

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt write-ahead log {path} at byte {position} (log offset {offset}): {detail}")]
    Corrupt { path: PathBuf, position: u64, offset: u64, detail: String },
    #[error("write-ahead log in {dir} does not reach offset {offset}: {detail}")]
    Missing { dir: PathBuf, offset: u64, detail: String },
    /// A new segment would leave less free disk than the reserve; nothing was written.
    #[error("no room for a new log segment in {dir}: {free_bytes} bytes free, {needed_bytes} needed")]
    NoSpace { dir: PathBuf, free_bytes: u64, needed_bytes: u64 },
    /// A frame write failed and was undone, or the next segment could not be built;
    /// nothing of it can become durable.
    #[error("writing to {path} failed, undone: {source}")]
    Unwritten { path: PathBuf, source: std::io::Error },
}

impl WalError {
    /// Whether the log is as it was before the failed call, so a later append may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, WalError::NoSpace { .. } | WalError::Unwritten { .. })
    }

    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WalError {
        let path = path.into();
        move |source| WalError::Io { path, source }
    }
}
