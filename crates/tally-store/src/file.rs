//! The store file as redb sees it: redb's own `FileBackend`, with failpoints at every
//! read, write, length change and sync, so tests can fill or break the disk under redb
//! itself (`store::read`, `store::write`, `store::set_len`, `store::sync`; the argument
//! `eio` makes the error an I/O error, anything else a full disk), and a record of failed
//! syncs. Without the `failpoints` feature the failpoints compile to nothing.

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

#[derive(Debug)]
pub(crate) struct StoreFile {
    file: FileBackend,
    /// Set by a failed sync, and never cleared: after one, the page cache may hold pages
    /// the disk never got (and never will: the kernel marks them clean), so nothing read
    /// back through it, a reopened file included, can be trusted until a restart.
    sync_failed: Arc<AtomicBool>,
}

impl StoreFile {
    /// Opens the file at `path`, creating it if it does not exist.
    pub(crate) fn open(path: &Path, sync_failed: Arc<AtomicBool>) -> Result<StoreFile, redb::Error> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(StoreFile { file: FileBackend::new(file)?, sync_failed })
    }
}

/// The error a failpoint injects.
#[allow(dead_code, reason = "called only by failpoints, which compile to nothing without fail's feature")]
fn injected(kind: Option<String>) -> io::Error {
    match kind.as_deref() {
        Some("eio") => io::Error::other("injected I/O error"),
        _ => io::ErrorKind::StorageFull.into(),
    }
}

impl StorageBackend for StoreFile {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        fail::fail_point!("store::read", |kind| Err(injected(kind)));
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        fail::fail_point!("store::set_len", |kind| Err(injected(kind)));
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let synced = (|| {
            fail::fail_point!("store::sync", |kind| Err(injected(kind)));
            self.file.sync_data()
        })();
        if synced.is_err() {
            self.sync_failed.store(true, Ordering::Release);
        }
        synced
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        fail::fail_point!("store::write", |kind| Err(injected(kind)));
        self.file.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.query_lock_range(start, end)
    }
}
