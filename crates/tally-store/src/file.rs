//! The store file as redb sees it: redb's own `FileBackend`, with failpoints at every
//! write, length change and sync, so tests can fill or break the disk under redb itself
//! (`store::write`, `store::set_len`, `store::sync`; the argument `eio` makes the error
//! an I/O error, anything else a full disk). Without the `failpoints` feature the
//! failpoints compile to nothing.

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

#[derive(Debug)]
pub(crate) struct StoreFile(FileBackend);

impl StoreFile {
    /// Opens the file at `path`, creating it if it does not exist.
    pub(crate) fn open(path: &Path) -> Result<StoreFile, redb::Error> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(StoreFile(FileBackend::new(file)?))
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
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        fail::fail_point!("store::set_len", |kind| Err(injected(kind)));
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        fail::fail_point!("store::sync", |kind| Err(injected(kind)));
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        fail::fail_point!("store::write", |kind| Err(injected(kind)));
        self.0.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.0.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}
