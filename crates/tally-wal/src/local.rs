//! The local write-ahead log as the engine's log (`tally_core::log`): one `Wal` per
//! partition, in `<root>/p000`, `<root>/p001`, …

use std::fs::File;
use std::path::{Path, PathBuf};

use tally_core::log::{Appended, FrameRecords, Log, LogError, LogHeld, LogReader, PartitionLog, Stop, Visit};

use crate::{Wal, WalError, WalOptions};

pub struct LocalLog {
    root: PathBuf,
    options: WalOptions,
    /// A lock kept as long as the logs are in use (the data directory's).
    _lock: Option<File>,
}

impl LocalLog {
    pub fn new(root: &Path, options: WalOptions) -> LocalLog {
        LocalLog { root: root.into(), options, _lock: None }
    }

    /// Keeps `lock` (an open, locked file) until the logs are dropped.
    pub fn holding(self, lock: File) -> LocalLog {
        LocalLog { _lock: Some(lock), ..self }
    }

    /// The directory of `partition`'s log.
    pub fn dir(&self, partition: u32) -> PathBuf {
        partition_dir(&self.root, partition)
    }

    /// Whether `partition`'s log has a segment: a directory left empty by a first start
    /// that stopped inside `create` holds no log yet.
    pub fn exists(&self, partition: u32) -> bool {
        std::fs::read_dir(self.dir(partition)).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|entry| entry.path().extension().is_some_and(|ext| ext == "wal"))
        })
    }

    /// Makes `partition`'s log, empty (see `Wal::create`).
    pub fn create(&self, partition: u32) -> Result<(), WalError> {
        Wal::create(&self.dir(partition), self.options)
    }
}

impl Log for LocalLog {
    fn open(
        &self,
        partition: u32,
        from: u64,
        visit: &mut Visit<'_>,
    ) -> Result<Result<Box<dyn PartitionLog>, Stop>, LogError> {
        let opened = Wal::open(&self.dir(partition), self.options, from, |end, mut records| {
            visit(end, &mut records as &mut FrameRecords<'_>)
        })?;
        Ok(opened.map(|wal| Box::new(wal) as Box<dyn PartitionLog>))
    }
}

/// The directory of `partition`'s log under `root`.
fn partition_dir(root: &Path, partition: u32) -> PathBuf {
    root.join(format!("p{partition:03}"))
}

/// Reads the local logs under a root (`LocalLog`'s) beside their writers.
pub struct LocalReader {
    root: PathBuf,
}

impl LocalReader {
    pub fn new(root: &Path) -> LocalReader {
        LocalReader { root: root.into() }
    }
}

impl LogReader for LocalReader {
    fn read(&self, partition: u32, from: u64, to: u64, visit: &mut Visit<'_>) -> Result<(), LogError> {
        let dir = partition_dir(&self.root, partition);
        let read = crate::segment::read_frames(&dir, from, to, |end, mut records| {
            visit(end, &mut records as &mut FrameRecords<'_>).is_ok()
        });
        match read {
            Err(error @ WalError::Missing { .. }) => Err(LogError::Gone { detail: error.to_string(), resumes: None }),
            other => Ok(other?),
        }
    }
}

impl PartitionLog for Wal {
    fn append(&mut self, records: &[&[u8]]) -> Result<Appended, LogError> {
        let (end_offset, sync) = Wal::append(self, records)?;
        Ok(Appended { end_offset, sync })
    }

    fn forget_before(&mut self, offset: u64) -> Result<(), LogError> {
        self.remove_segments_before(offset)?;
        Ok(())
    }

    fn held(&self) -> LogHeld {
        let stats = self.stats();
        LogHeld { segments: stats.segments, bytes: stats.bytes }
    }
}

impl From<WalError> for LogError {
    fn from(error: WalError) -> LogError {
        let detail = error.to_string();
        match &error {
            WalError::NoSpace { free_bytes, needed_bytes, .. } => LogError::Full {
                reason: format!(
                    "the disk holding the log has {free_bytes} bytes free, below the {needed_bytes} a new log \
                     segment needs with the reserve; writes resume once space is freed"
                ),
                detail,
            },
            WalError::Unwritten { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => LogError::Full {
                reason: "the disk holding the log is full; writes resume once space is freed".into(),
                detail,
            },
            WalError::Unwritten { .. } => LogError::Unwritten { detail },
            WalError::Io { .. } | WalError::Corrupt { .. } | WalError::Missing { .. } => LogError::Failed { detail },
        }
    }
}
