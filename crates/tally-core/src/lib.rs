//! tally's core vocabulary: what an event is, which events are valid, how time is cut into
//! buckets, which partition owns a video, and how a batch of events is laid out inside one
//! write-ahead-log record.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and knows nothing about
//! HTTP or JSON. Every function here is deterministic in its inputs, which is what lets
//! recovery replay the log and reach exactly the state the live process had.

pub mod bucket;
pub mod event;
pub mod hll;
pub mod log;
pub mod partition;
pub mod record;
pub mod retention;
pub mod rows;
pub mod topk;

pub use bucket::{Granularity, MinuteRange, Span};
pub use event::{EventRef, FieldError, Limits};
pub use partition::partition_of;
pub use record::{EventBytes, RecordError, RecordReader, RecordWriter, RequestKey};
pub use retention::{Cutoffs, Retention};
pub use rows::{Counter, CounterRow, TOP_SKETCH_ITEMS, TierRows, TopRow, UniquesRow};
