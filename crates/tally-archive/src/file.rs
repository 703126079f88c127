//! One archive file: the counted events of one partition's log offset range received in
//! one hour, encoded as Parquet in memory, and its name in the archive.

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, StringArray};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::Field;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{ArrowColumnWriter, compute_leaves};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::data_type::{DataType, Int32Type, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::file::writer::SerializedRowGroupWriter;
use parquet::schema::types::ColumnPath;
use tally_core::EventBytes;
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

/// The columns of one file being gathered, as plain vectors sized for a full file up
/// front (no growing and copying while a round gathers), turned into Arrow arrays when it
/// is encoded. Text is taken as the log holds it and checked as UTF-8 once per column.
pub struct FileBuilder {
    video_id: TextColumn,
    event_type: TextColumn,
    ts: Vec<i64>,
    value: Vec<i64>,
    event_id: TextColumn,
    viewer_id: TextColumn,
    received_at: Vec<i64>,
    partition: Vec<u32>,
    log_offset: Vec<u64>,
}

impl Default for FileBuilder {
    fn default() -> FileBuilder {
        FileBuilder::with_capacity(0)
    }
}

impl FileBuilder {
    /// A builder with room for `rows` rows before any column grows.
    pub fn with_capacity(rows: usize) -> FileBuilder {
        FileBuilder {
            video_id: TextColumn::with_capacity(rows, TEXT_BYTES_GUESS),
            event_type: TextColumn::with_capacity(rows, TEXT_BYTES_GUESS),
            ts: Vec::with_capacity(rows),
            value: Vec::with_capacity(rows),
            event_id: TextColumn::with_capacity(rows, 0),
            viewer_id: TextColumn::with_capacity(rows, 0),
            received_at: Vec::with_capacity(rows),
            partition: Vec::with_capacity(rows),
            log_offset: Vec::with_capacity(rows),
        }
    }

    /// Adds one event: a validated one, or one read from a log record whose text is
    /// checked when the file is encoded.
    pub fn push<'e>(&mut self, event: impl Into<EventBytes<'e>>, received_ms: i64, partition: u32, log_offset: u64) {
        let event = event.into();
        self.video_id.push(Some(event.video_id));
        self.event_type.push(Some(event.event_type));
        self.ts.push(event.ts_ms);
        self.value.push(event.value);
        // An empty id is no id, as in the log.
        self.event_id.push(event.event_id.filter(|id| !id.is_empty()));
        self.viewer_id.push(event.viewer_id.filter(|id| !id.is_empty()));
        self.received_at.push(received_ms);
        self.partition.push(partition);
        self.log_offset.push(log_offset);
    }

    pub fn rows(&self) -> usize {
        self.value.len()
    }

    /// The gathered rows as one Parquet file; fails if a text field is not UTF-8.
    pub fn encode(self) -> Result<Bytes, ArchiveError> {
        let rows = self.rows();
        let columns = [
            Column::Text(self.video_id.finish("video_id")?),
            Column::Text(self.event_type.finish("type")?),
            Column::Int64(self.ts),
            Column::Int64(self.value),
            Column::Text(self.event_id.finish("event_id")?),
            Column::Text(self.viewer_id.finish("viewer_id")?),
            Column::Int64(self.received_at),
            // Parquet keeps unsigned integers in signed ones, the bits as they are (the
            // column's logical type says unsigned).
            Column::Int32(self.partition.into_iter().map(|p| p as i32).collect()),
            Column::Int64(self.log_offset.into_iter().map(|o| o as i64).collect()),
        ];
        let mut out = Vec::new();
        // Through `ArrowWriter` for the Arrow schema in the file's metadata, as Arrow-based
        // readers expect it.
        let (mut writer, arrow_writers) =
            ArrowWriter::try_new(&mut out, schema(), Some(properties()?))?.into_serialized_writer()?;
        for (group, start) in (0..rows).step_by(ROW_GROUP_ROWS).enumerate() {
            let rows = start..rows.min(start + ROW_GROUP_ROWS);
            let mut row_group = writer.next_row_group()?;
            let arrow_writers = arrow_writers.create_column_writers(group)?;
            for ((column, arrow_writer), field) in columns.iter().zip(arrow_writers).zip(schema().fields()) {
                column.write(&mut row_group, arrow_writer, field, rows.clone())?;
            }
            row_group.close()?;
        }
        writer.close()?;
        Ok(Bytes::from(out))
    }
}

/// One column of a file, as it is written.
enum Column {
    /// Through Arrow, whose Parquet writer builds the dictionaries: the text.
    Text(ArrayRef),
    /// Straight to Parquet's column writer, without Arrow's bookkeeping per row (levels,
    /// gathering by index): the numbers, never absent.
    Int64(Vec<i64>),
    Int32(Vec<i32>),
}

impl Column {
    fn write<W: Write + Send>(
        &self,
        row_group: &mut SerializedRowGroupWriter<'_, W>,
        mut arrow_writer: ArrowColumnWriter,
        field: &Field,
        rows: Range<usize>,
    ) -> Result<(), ArchiveError> {
        match self {
            Column::Text(array) => {
                for leaf in compute_leaves(field, &array.slice(rows.start, rows.len()))? {
                    arrow_writer.write(&leaf)?;
                }
                arrow_writer.close()?.append_to_row_group(row_group)?;
            }
            Column::Int64(values) => write_numbers::<Int64Type, W>(row_group, &values[rows])?,
            Column::Int32(values) => write_numbers::<Int32Type, W>(row_group, &values[rows])?,
        }
        Ok(())
    }
}

fn write_numbers<T: DataType, W: Write + Send>(
    row_group: &mut SerializedRowGroupWriter<'_, W>,
    values: &[T::T],
) -> Result<(), ArchiveError> {
    let mut column = row_group.next_column()?.expect("the schema's next column");
    column.typed::<T>().write_batch(values, None, None)?;
    column.close()?;
    Ok(())
}

/// Bytes per row first set aside for a text column that is always there (`video_id`,
/// `type`); the optional ids start empty (most loads send none).
const TEXT_BYTES_GUESS: usize = 16;

/// A string column being gathered: its values end to end, and where each ends. An absent
/// value is an empty one (ids are never empty, and the log does not tell the two apart);
/// which ones are absent is worked out once, when the column is finished.
struct TextColumn {
    bytes: Vec<u8>,
    ends: Vec<i32>,
    absent: usize,
}

impl TextColumn {
    fn with_capacity(rows: usize, bytes_per_row: usize) -> TextColumn {
        let mut ends = Vec::with_capacity(rows + 1);
        ends.push(0);
        TextColumn { bytes: Vec::with_capacity(rows * bytes_per_row), ends, absent: 0 }
    }

    fn push(&mut self, value: Option<&[u8]>) {
        self.bytes.extend_from_slice(value.unwrap_or_default());
        let end = i32::try_from(self.bytes.len()).expect("an archive file's text column over 2 GiB");
        self.ends.push(end);
        self.absent += usize::from(value.is_none());
    }

    /// The column as an Arrow string array, its bytes checked as UTF-8 at once.
    fn finish(self, name: &str) -> Result<ArrayRef, ArchiveError> {
        let rows = self.ends.len() - 1;
        if self.absent == rows {
            // Nothing to check (an id the load never sends).
            return Ok(Arc::new(StringArray::new_null(rows)));
        }
        let nulls = (self.absent > 0).then(|| self.ends.windows(2).map(|end| end[1] > end[0]).collect::<NullBuffer>());
        let array = StringArray::try_new(OffsetBuffer::new(self.ends.into()), self.bytes.into(), nulls)
            .map_err(|error| ArchiveError::Text { column: name.to_string(), detail: error.to_string() })?;
        Ok(Arc::new(array))
    }
}

/// How files are written: zstd; dictionaries for the text columns (few distinct video
/// ids and types, each repeated many times) but `event_id` (unique by nature); the numbers
/// never hashed into a dictionary: the times and log offsets delta-encoded (they rise:
/// their deltas pack into a few bits), values and partitions plain (they repeat: zstd
/// takes them to almost nothing, faster than delta-packing them). Statistics (min and max)
/// only where readers prune by them, the two times, and per column chunk: per page, on
/// every string column, they cost as much as the encoding.
fn properties() -> Result<WriterProperties, ArchiveError> {
    let numbers = |builder: WriterPropertiesBuilder| {
        [
            ("ts", Encoding::DELTA_BINARY_PACKED),
            ("value", Encoding::PLAIN),
            ("received_at", Encoding::DELTA_BINARY_PACKED),
            ("partition", Encoding::PLAIN),
            ("log_offset", Encoding::DELTA_BINARY_PACKED),
        ]
        .into_iter()
        .fold(builder, |builder, (column, encoding)| {
            builder
                .set_column_dictionary_enabled(ColumnPath::from(column), false)
                .set_column_encoding(ColumnPath::from(column), encoding)
        })
    };
    let times = |builder: WriterPropertiesBuilder| {
        ["ts", "received_at"].into_iter().fold(builder, |builder, column| {
            builder.set_column_statistics_enabled(ColumnPath::from(column), EnabledStatistics::Chunk)
        })
    };
    Ok(times(numbers(WriterProperties::builder().set_statistics_enabled(EnabledStatistics::None)))
        .set_column_dictionary_enabled(ColumnPath::from("event_id"), false)
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_key_value_metadata(Some(vec![KeyValue::new(SCHEMA_VERSION_KEY.into(), SCHEMA_VERSION.to_string())]))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(video_id: &'a [u8], viewer_id: Option<&'a [u8]>) -> EventBytes<'a> {
        EventBytes { video_id, event_type: b"view", ts_ms: 1, value: 1, event_id: None, viewer_id }
    }

    #[test]
    fn every_column_reads_back_as_pushed_across_row_groups() {
        use arrow_array::cast::AsArray;
        use arrow_array::types::{Int64Type, TimestampMillisecondType, UInt32Type, UInt64Type};
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

        let rows = ROW_GROUP_ROWS + 3;
        let mut file = FileBuilder::with_capacity(16);
        for row in 0..rows {
            let (video_id, viewer_id) = (format!("v{}", row % 7), format!("u{row}"));
            let event = EventBytes {
                video_id: video_id.as_bytes(),
                event_type: if row % 2 == 0 { b"view" } else { b"like" },
                ts_ms: 1_000 + row as i64,
                value: -(row as i64),
                event_id: (row % 3 == 0).then_some(b"e".as_slice()),
                viewer_id: (row % 5 == 0).then_some(viewer_id.as_bytes()),
            };
            file.push(event, 2_000 + row as i64, 4_000_000_000, 10 + row as u64);
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new(file.encode().unwrap()).unwrap();
        assert_eq!(reader.schema().fields(), schema().fields(), "names, types (UTC), nullability");
        let metadata = reader.metadata().clone();
        let key_values = metadata.file_metadata().key_value_metadata().unwrap();
        assert!(
            key_values.iter().any(|kv| kv.key == SCHEMA_VERSION_KEY && kv.value == Some(SCHEMA_VERSION.to_string()))
        );
        assert_eq!(metadata.num_row_groups(), 2);
        for group in metadata.row_groups() {
            for time in [2, 6] {
                let statistics = group.column(time).statistics().expect("min and max of the times");
                assert!(statistics.min_bytes_opt().is_some() && statistics.max_bytes_opt().is_some());
            }
        }
        let (mut base, mut absent_event_ids) = (0, 0);
        for batch in reader.build().unwrap() {
            let batch = batch.unwrap();
            let text = |name: &str| batch.column_by_name(name).unwrap().as_string::<i32>().clone();
            let (video_id, event_type) = (text("video_id"), text("type"));
            let (event_id, viewer_id) = (text("event_id"), text("viewer_id"));
            let times =
                |name: &str| batch.column_by_name(name).unwrap().as_primitive::<TimestampMillisecondType>().clone();
            let (ts, received_at) = (times("ts"), times("received_at"));
            let value = batch.column_by_name("value").unwrap().as_primitive::<Int64Type>();
            let partition = batch.column_by_name("partition").unwrap().as_primitive::<UInt32Type>();
            let log_offset = batch.column_by_name("log_offset").unwrap().as_primitive::<UInt64Type>();
            for (index, row) in (base..base + batch.num_rows()).enumerate() {
                assert_eq!(video_id.value(index), format!("v{}", row % 7));
                assert_eq!(event_type.value(index), if row % 2 == 0 { "view" } else { "like" });
                assert_eq!((ts.value(index), value.value(index)), (1_000 + row as i64, -(row as i64)));
                assert_eq!(event_id.is_valid(index).then(|| event_id.value(index)), (row % 3 == 0).then_some("e"));
                let viewer = viewer_id.is_valid(index).then(|| viewer_id.value(index).to_string());
                assert_eq!(viewer, (row % 5 == 0).then(|| format!("u{row}")));
                assert_eq!(received_at.value(index), 2_000 + row as i64);
                assert_eq!((partition.value(index), log_offset.value(index)), (4_000_000_000, 10 + row as u64));
            }
            absent_event_ids += event_id.null_count();
            base += batch.num_rows();
        }
        assert_eq!((base, absent_event_ids), (rows, rows - rows.div_ceil(3)));
    }

    #[test]
    fn a_file_of_no_rows_has_the_schema_and_no_row_group() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

        let reader = ParquetRecordBatchReaderBuilder::try_new(FileBuilder::default().encode().unwrap()).unwrap();
        assert_eq!(reader.schema().fields(), schema().fields());
        assert_eq!((reader.metadata().num_row_groups(), reader.metadata().file_metadata().num_rows()), (0, 0));
    }

    #[test]
    fn text_is_checked_as_utf8_when_the_file_is_encoded() {
        let mut file = FileBuilder::with_capacity(2);
        file.push(event("v\u{e9}".as_bytes(), Some(b"u1")), 1, 0, 10);
        file.push(event(b"v2", None), 1, 0, 10);
        assert!(file.encode().is_ok());
        let mut file = FileBuilder::default();
        file.push(event(b"v1", None), 1, 0, 10);
        file.push(event(b"v\xff", None), 1, 0, 10);
        let error = file.encode().unwrap_err().to_string();
        assert!(error.starts_with("column video_id: ") && error.contains("UTF-8"), "{error}");
    }
}
