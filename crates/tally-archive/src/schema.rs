//! The archive's file format, version 1: one Parquet file per partition and log offset
//! range, zstd-compressed, columns named as the API's event fields plus where each event
//! came from. The version is in each file's key-value metadata (`tally.schema_version`).
//!
//! | column | type | |
//! |---|---|---|
//! | `video_id` | string | |
//! | `type` | string | the event type (`view`, `like`, …) |
//! | `ts` | timestamp (ms, UTC) | the event time |
//! | `value` | int64 | summed per bucket (1 for a plain view) |
//! | `event_id` | string, nullable | |
//! | `viewer_id` | string, nullable | |
//! | `received_at` | timestamp (ms, UTC) | when the server received it; files are laid out by it |
//! | `partition` | uint32 | the log partition |
//! | `log_offset` | uint64 | the offset of the log frame holding it |

use std::sync::{Arc, OnceLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Bumped on any change to the columns or their meaning.
pub const SCHEMA_VERSION: u32 = 1;
/// The key of the schema version in each file's metadata.
pub const SCHEMA_VERSION_KEY: &str = "tally.schema_version";

pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    let milliseconds = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::clone(SCHEMA.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("video_id", DataType::Utf8, false),
            Field::new("type", DataType::Utf8, false),
            Field::new("ts", milliseconds(), false),
            Field::new("value", DataType::Int64, false),
            Field::new("event_id", DataType::Utf8, true),
            Field::new("viewer_id", DataType::Utf8, true),
            Field::new("received_at", milliseconds(), false),
            Field::new("partition", DataType::UInt32, false),
            Field::new("log_offset", DataType::UInt64, false),
        ]))
    }))
}
