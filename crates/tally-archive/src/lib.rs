//! The raw-event archive: every counted event, as Parquet files (schema in `schema`) that
//! DuckDB, Spark, pandas and pyarrow read, laid out by receive hour and named by the log
//! offset range they hold (`file::FileKey::path`), so rewriting a range after a crash
//! replaces a file instead of adding one. `Archive` puts, lists, reads and deletes files in
//! S3-compatible object storage (`s3://bucket/prefix`) or a directory (`file://…` or a
//! path) through `object_store`; `aggregate` recomputes counts and sums from the files (the
//! batch layer of the lambda architecture).

mod file;
mod schema;

use std::sync::Arc;
use std::time::Duration;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMillisecondType};
use bytes::Bytes;
use futures_util::TryStreamExt;
use hashbrown::HashMap;
use object_store::RetryConfig;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::EventRef;
use tally_core::hll::Hll;

pub use file::{FileBuilder, FileKey, ROW_GROUP_ROWS};
pub use schema::{SCHEMA_VERSION, SCHEMA_VERSION_KEY, schema};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive location {0:?}: expected s3://bucket/prefix, file:///path or a directory path")]
    Location(String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("archive file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("column {column}: {detail}")]
    Text { column: String, detail: String },
}

/// A directory: each file written to a temporary name, fsync-ed, renamed into place.
fn local(directory: &str) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
    if directory.is_empty() {
        return Err(ArchiveError::Location(directory.to_owned()));
    }
    std::fs::create_dir_all(directory)?;
    Ok(Arc::new(LocalFileSystem::new_with_prefix(directory)?.with_automatic_cleanup(true).with_fsync(true)))
}

/// A bucket and an optional prefix inside it. A PUT of S3 is atomic: a reader sees the
/// whole object or none.
fn s3(location: &str, rest: &str) -> Result<Arc<dyn ObjectStore>, ArchiveError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(ArchiveError::Location(location.to_owned()));
    }
    // A few quick retries, then the error: the archiver retries every round anyway, and
    // `/readyz` should say the store is down within seconds, not minutes.
    let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(20), ..RetryConfig::default() };
    // HTTPS through rustls on ring, the process's one crypto provider (installed once;
    // a provider installed before is kept).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry).build()?;
    let prefix = prefix.trim_matches('/');
    Ok(if prefix.is_empty() { Arc::new(store) } else { Arc::new(PrefixStore::new(store, prefix)) })
}

/// One file in the archive, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedFile {
    pub path: String,
    pub partition: u32,
    /// The log offset range `[first_offset, end_offset)` of the frames it holds.
    pub first_offset: u64,
    pub end_offset: u64,
    pub bytes: u64,
    /// The receive hour it lies in (epoch milliseconds at its start), from its directory.
    pub hour_ms: Option<i64>,
}

impl ArchivedFile {
    /// Reads `events/…/pPPPP-FIRST-END.parquet`; other names are not archive files.
    fn parse(path: &str, bytes: u64) -> Option<ArchivedFile> {
        let name = path.rsplit('/').next()?.strip_suffix(".parquet")?;
        let mut parts = name.strip_prefix('p')?.split('-');
        let partition = parts.next()?.parse().ok()?;
        let first_offset = parts.next()?.parse().ok()?;
        let end_offset = parts.next()?.parse().ok()?;
        parts.next().is_none().then(|| ArchivedFile {
            path: path.to_owned(),
            partition,
            first_offset,
            end_offset,
            bytes,
            hour_ms: hour_of(path),
        })
    }
}

/// The receive hour of `events/date=YYYY-MM-DD/hour=HH/…`, epoch milliseconds.
fn hour_of(path: &str) -> Option<i64> {
    let mut parts = path.split('/');
    let date = parts.find_map(|part| part.strip_prefix("date="))?;
    let hour: i8 = parts.next()?.strip_prefix("hour=")?.parse().ok()?;
    let date: jiff::civil::Date = date.parse().ok()?;
    let at = jiff::tz::TimeZone::UTC.to_timestamp(date.at(hour, 0, 0, 0)).ok()?;
    Some(at.as_millisecond())
}

/// An archive location. Blocking: it drives `object_store` on a small runtime of its own,
/// like the PostgreSQL store, so the engine's threads can call it.
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    /// Always present until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

/// Dropped inside another runtime (a server stopping), a runtime must not wait for its
/// tasks: none of ours outlives the call that started it.
impl Drop for Archive {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Archive {
    /// `s3://bucket/prefix` (credentials, region and endpoint from the usual `AWS_*`
    /// variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` for S3-compatible servers, `AWS_ALLOW_HTTP=true` for plain HTTP),
    /// `file:///var/lib/tally/archive`, or a directory path (created if absent).
    pub fn open(location: &str) -> Result<Archive, ArchiveError> {
        let store: Arc<dyn ObjectStore> = match location.split_once("://") {
            Some(("s3", rest)) => s3(location, rest)?,
            Some(("file", directory)) => local(directory)?,
            None => local(location)?,
            Some(_) => return Err(ArchiveError::Location(location.to_owned())),
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Archive { store, runtime: Some(runtime) })
    }

    /// Runs `future` to completion on the archive's runtime. Not from within another
    /// tokio runtime's thread: callers are the engine's own threads.
    fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.as_ref().expect("present until dropped").block_on(future)
    }

    /// Writes `bytes` at `path`, whole or not at all (a temporary file renamed into place),
    /// replacing a file of the same name.
    pub fn put(&self, path: &str, bytes: Bytes) -> Result<(), ArchiveError> {
        self.block_on(self.store.put(&Path::from(path), bytes.into()))?;
        Ok(())
    }

    pub fn get(&self, path: &str) -> Result<Bytes, ArchiveError> {
        Ok(self.block_on(async { self.store.get(&Path::from(path)).await?.bytes().await })?)
    }

    pub fn delete(&self, path: &str) -> Result<(), ArchiveError> {
        Ok(self.block_on(self.store.delete(&Path::from(path)))?)
    }

    /// Every archive file, in partition and offset order.
    pub fn files(&self) -> Result<Vec<ArchivedFile>, ArchiveError> {
        let prefix = Path::from("events");
        let objects: Vec<object_store::ObjectMeta> = self.block_on(self.store.list(Some(&prefix)).try_collect())?;
        let mut files: Vec<ArchivedFile> =
            objects.iter().filter_map(|o| ArchivedFile::parse(o.location.as_ref(), o.size)).collect();
        files.sort_by_key(|f| (f.partition, f.first_offset, f.end_offset));
        Ok(files)
    }
}

/// Count and sum of one event type of one video.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Total {
    pub count: u64,
    pub sum: i64,
}

/// Counts and sums per (event type, video) of the archived events whose `ts` lies in
/// `[from_ms, to_ms)`, and the rows read; with `aggregate_viewers`, the distinct-viewer
/// sketch of each (event type, video) whose events carry viewer ids, too.
#[derive(Debug, Default)]
pub struct Totals {
    pub totals: HashMap<(String, String), Total>,
    pub viewers: HashMap<(String, String), Hll>,
    pub rows_read: u64,
}

/// Recomputes `Totals` from `files`: reads only the columns it needs.
pub fn aggregate(archive: &Archive, files: &[ArchivedFile], from_ms: i64, to_ms: i64) -> Result<Totals, ArchiveError> {
    aggregate_files(archive, files, (from_ms, to_ms), false)
}

/// `aggregate`, with the distinct-viewer sketches (built as the store builds them).
pub fn aggregate_viewers(
    archive: &Archive,
    files: &[ArchivedFile],
    from_ms: i64,
    to_ms: i64,
) -> Result<Totals, ArchiveError> {
    aggregate_files(archive, files, (from_ms, to_ms), true)
}

fn aggregate_files(
    archive: &Archive,
    files: &[ArchivedFile],
    (from_ms, to_ms): (i64, i64),
    viewers: bool,
) -> Result<Totals, ArchiveError> {
    let mut totals = Totals::default();
    for file in files {
        let rows = read_events(archive, file, viewers, &mut |event| {
            if event.ts_ms < from_ms || event.ts_ms >= to_ms {
                return;
            }
            let key = Key(event.event_type, event.video_id);
            let total = match totals.totals.get_mut(&key) {
                Some(total) => total,
                None => totals.totals.entry((key.0.to_owned(), key.1.to_owned())).or_default(),
            };
            total.count += 1;
            total.sum += event.value;
            if let Some(viewer) = event.viewer_id {
                let sketch = match totals.viewers.get_mut(&key) {
                    Some(sketch) => sketch,
                    None => totals.viewers.entry((key.0.to_owned(), key.1.to_owned())).or_default(),
                };
                sketch.insert(viewer.as_bytes());
            }
        })?;
        totals.rows_read += rows;
    }
    Ok(totals)
}

/// Rows decoded at a time when reading.
const READ_BATCH_ROWS: usize = 64 << 10;

/// Visits every event of `file`, reading only the columns needed: never the event id, the
/// viewer id when `viewers`; the rows read.
pub fn read_events(
    archive: &Archive,
    file: &ArchivedFile,
    viewers: bool,
    visit: &mut dyn FnMut(EventRef<'_>),
) -> Result<u64, ArchiveError> {
    let bytes = archive.get(&file.path)?;
    read_file(bytes, viewers, visit)
        .map_err(|error| ArchiveError::File { path: file.path.clone(), reason: error.to_string() })
}

fn read_file(bytes: Bytes, viewers: bool, visit: &mut dyn FnMut(EventRef<'_>)) -> Result<u64, ArchiveError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let version = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|pairs| pairs.iter().find(|kv| kv.key == SCHEMA_VERSION_KEY).and_then(|kv| kv.value.clone()));
    if version.as_deref() != Some(&SCHEMA_VERSION.to_string()) {
        return Err(ArchiveError::Location(format!("schema version {version:?}, this build reads {SCHEMA_VERSION}")));
    }
    // video_id, type, ts, value: the first four columns; viewer_id the sixth.
    let columns: &[usize] = if viewers { &[0, 1, 2, 3, 5] } else { &[0, 1, 2, 3] };
    let mask = ProjectionMask::roots(builder.parquet_schema(), columns.iter().copied());
    let mut rows = 0;
    for batch in builder.with_projection(mask).with_batch_size(READ_BATCH_ROWS).build()? {
        let batch = batch?;
        let (videos, types) = (batch.column(0).as_string::<i32>(), batch.column(1).as_string::<i32>());
        let ts = batch.column(2).as_primitive::<TimestampMillisecondType>();
        let values = batch.column(3).as_primitive::<Int64Type>();
        let viewer_ids = viewers.then(|| batch.column(4).as_string::<i32>());
        rows += batch.num_rows() as u64;
        for row in 0..batch.num_rows() {
            visit(EventRef {
                video_id: videos.value(row),
                event_type: types.value(row),
                ts_ms: ts.value(row),
                value: values.value(row),
                event_id: None,
                viewer_id: viewer_ids.and_then(|ids| ids.is_valid(row).then(|| ids.value(row))),
            });
        }
    }
    Ok(rows)
}

/// A `(type, video)` key borrowed from a batch: looks the owned key up without allocating
/// (it hashes as the `(String, String)` tuple does).
#[derive(Hash)]
struct Key<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for Key<'_> {
    fn equivalent(&self, key: &(String, String)) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(video_id: &'a str, event_type: &'a str, ts_ms: i64, value: i64) -> EventRef<'a> {
        EventRef { video_id, event_type, ts_ms, value, event_id: None, viewer_id: None }
    }

    #[test]
    fn files_are_named_by_receive_hour_and_offset_range() {
        let key = FileKey::of(3, 1_764_633_600_000 + 5 * 3_600_000 + 59_999);
        assert_eq!(key.hour_ms, 1_764_633_600_000 + 5 * 3_600_000);
        let path = key.path(120, 4_096);
        assert_eq!(path, "events/date=2025-12-02/hour=05/p0003-00000000000000000120-00000000000000004096.parquet");
        let parsed = ArchivedFile::parse(&path, 10).unwrap();
        assert_eq!((parsed.partition, parsed.first_offset, parsed.end_offset), (3, 120, 4_096));
        assert_eq!(parsed.hour_ms, Some(key.hour_ms));
        assert!(ArchivedFile::parse("events/date=2025-12-02/hour=05/notes.txt", 1).is_none());
    }

    #[test]
    fn aggregates_counts_and_sums_in_the_time_range_from_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open(dir.path().to_str().unwrap()).unwrap();
        let mut builder = FileBuilder::default();
        builder.push(&event("a", "view", 1_000, 1), 5_000, 0, 10);
        builder.push(&event("a", "view", 2_000, 1), 5_000, 0, 10);
        builder.push(&event("a", "watch_ms", 2_500, 700), 5_000, 0, 20);
        builder.push(&event("b", "view", 9_000, 1), 5_000, 0, 20);
        assert_eq!(builder.rows(), 4);
        let path = FileKey::of(0, 5_000).path(10, 30);
        archive.put(&path, builder.encode().unwrap()).unwrap();
        let files = archive.files().unwrap();
        assert_eq!(files.len(), 1);
        let totals = aggregate(&archive, &files, 0, 5_000).unwrap();
        assert_eq!(totals.rows_read, 4);
        let total = |t: &str, v: &str| totals.totals.get(&(t.to_string(), v.to_string())).copied();
        assert_eq!(total("view", "a"), Some(Total { count: 2, sum: 2 }));
        assert_eq!(total("watch_ms", "a"), Some(Total { count: 1, sum: 700 }));
        assert_eq!(total("view", "b"), None, "ts 9,000 is outside [0, 5,000)");
    }

    #[test]
    fn writing_a_range_again_replaces_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open(&format!("file://{}", dir.path().display())).unwrap();
        let path = FileKey::of(1, 0).path(0, 100);
        for _ in 0..2 {
            let mut builder = FileBuilder::default();
            builder.push(&event("a", "view", 1, 1), 0, 1, 0);
            archive.put(&path, builder.encode().unwrap()).unwrap();
        }
        let files = archive.files().unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(aggregate(&archive, &files, 0, 10).unwrap().rows_read, 1);
        assert!(Archive::open("gs://bucket/prefix").is_err(), "only s3:// and file:// are known");
        assert!(Archive::open("s3:///prefix").is_err(), "a bucket is needed");
    }
}
