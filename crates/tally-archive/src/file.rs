//! One archive file: the counted events of one partition's log offset range received in
//! one hour, encoded as Parquet in memory, and its name in the archive.

use std::sync::Arc;

use arrow_array::builder::{StringBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;
use tally_core::EventRef;
use tally_core::bucket::HOUR_MS;

use crate::ArchiveError;
use crate::schema::{SCHEMA_VERSION, SCHEMA_VERSION_KEY, schema};

/// Rows per row group: large enough for good compression and fast scans, small enough
/// that a reader holds one group of a few MiB at a time.
pub const ROW_GROUP_ROWS: usize = 1 << 20;
const ZSTD_LEVEL: i32 = 3;

/// Which file an event goes to: its partition and its receive hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub partition: u32,
    /// The receive hour, epoch milliseconds at its start.
    pub hour_ms: i64,
}

impl FileKey {
    pub fn of(partition: u32, received_ms: i64) -> FileKey {
        FileKey { partition, hour_ms: received_ms.div_euclid(HOUR_MS) * HOUR_MS }
    }

    /// `events/date=YYYY-MM-DD/hour=HH/p0003-<first offset>-<end offset>.parquet`: laid out
    /// by receive hour (engines prune by the directory names), named by the offset range
    /// `[first, end)` of the log frames it holds, so writing a range again replaces the
    /// file instead of adding one.
    pub fn path(&self, first_offset: u64, end_offset: u64) -> String {
        let hour = jiff::Timestamp::from_millisecond(self.hour_ms)
            .map_or_else(|_| "date=invalid/hour=00".to_string(), |t| t.strftime("date=%Y-%m-%d/hour=%H").to_string());
        format!("events/{hour}/p{:04}-{first_offset:020}-{end_offset:020}.parquet", self.partition)
    }
}

/// The columns of one file being gathered.
pub struct FileBuilder {
    video_id: StringBuilder,
    event_type: StringBuilder,
    ts: TimestampMillisecondBuilder,
    value: Vec<i64>,
    event_id: StringBuilder,
    viewer_id: StringBuilder,
    received_at: TimestampMillisecondBuilder,
    partition: UInt32Builder,
    log_offset: UInt64Builder,
    /// The first log offset and the end of the last frame whose events it holds.
    pub first_offset: Option<u64>,
    pub end_offset: u64,
}

impl Default for FileBuilder {
    fn default() -> FileBuilder {
        FileBuilder {
            video_id: StringBuilder::new(),
            event_type: StringBuilder::new(),
            ts: TimestampMillisecondBuilder::new(),
            value: Vec::new(),
            event_id: StringBuilder::new(),
            viewer_id: StringBuilder::new(),
            received_at: TimestampMillisecondBuilder::new(),
            partition: UInt32Builder::new(),
            log_offset: UInt64Builder::new(),
            first_offset: None,
            end_offset: 0,
        }
    }
}

impl FileBuilder {
    pub fn push(&mut self, event: &EventRef<'_>, received_ms: i64, partition: u32, log_offset: u64) {
        self.video_id.append_value(event.video_id);
        self.event_type.append_value(event.event_type);
        self.ts.append_value(event.ts_ms);
        self.value.push(event.value);
        self.event_id.append_option(event.event_id);
        self.viewer_id.append_option(event.viewer_id);
        self.received_at.append_value(received_ms);
        self.partition.append_value(partition);
        self.log_offset.append_value(log_offset);
        self.first_offset.get_or_insert(log_offset);
    }

    pub fn rows(&self) -> usize {
        self.value.len()
    }

    /// The gathered rows as one Parquet file.
    pub fn encode(mut self) -> Result<Bytes, ArchiveError> {
        let utc =
            |builder: &mut TimestampMillisecondBuilder| -> ArrayRef { Arc::new(builder.finish().with_timezone("UTC")) };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.video_id.finish()),
            Arc::new(self.event_type.finish()),
            utc(&mut self.ts),
            Arc::new(Int64Array::from(std::mem::take(&mut self.value))),
            Arc::new(self.event_id.finish()),
            Arc::new(self.viewer_id.finish()),
            utc(&mut self.received_at),
            Arc::new(self.partition.finish()),
            Arc::new(self.log_offset.finish()),
        ];
        let batch = RecordBatch::try_new(schema(), columns)?;
        // Statistics (min and max) only where readers prune by them, the two times, and
        // per column chunk: per page, on every string column, they cost as much as the
        // encoding.
        let times = |builder: WriterPropertiesBuilder| {
            ["ts", "received_at"].into_iter().fold(builder, |builder, column| {
                builder.set_column_statistics_enabled(ColumnPath::from(column), EnabledStatistics::Chunk)
            })
        };
        let properties = times(WriterProperties::builder().set_statistics_enabled(EnabledStatistics::None))
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(vec![KeyValue::new(SCHEMA_VERSION_KEY.into(), SCHEMA_VERSION.to_string())]))
            .build();
        let mut out = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut out, schema(), Some(properties))?;
        writer.write(&batch)?;
        writer.close()?;
        Ok(Bytes::from(out))
    }
}
