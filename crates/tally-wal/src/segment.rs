//! Segment files: created whole (preallocated, ending in a trailer that records their
//! length), replayed from an offset, appended to in place, rolled over with a marker that
//! names the next segment, and deleted behind a checkpoint.
//!
//! ```text
//! segment := frame* roll_marker? zero bytes… trailer
//! roll_marker := a frame with an empty payload; the next segment begins right after it
//! trailer := "TLWS" | u64le file length | u32le crc32c(first 12 bytes)       (16 bytes)
//! ```
//!
//! So damage at rest is never silent: a segment cut short has lost its trailer, a newest
//! segment deleted after a roll is named by the previous one's marker, and a log with no
//! segment at all is refused (the first segment is made when the data directory is).
//! Preallocation also means a frame write never needs new disk blocks: a full disk is met
//! only when a segment is created, which fails cleanly and is retried with the next write.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::WalError;
use crate::frame::{self, FRAME_HEADER_BYTES, FrameRecords, Scan};

#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    /// Bytes of a new segment file (more when one frame needs more). Segments are the unit
    /// of deletion, so smaller ones free disk sooner after a checkpoint.
    pub segment_bytes_max: u64,
    /// Free disk space a new segment must leave, so that the store can still flush (and
    /// the flush free segments) when the log has filled the disk.
    pub free_bytes_min: u64,
    /// Open a log whose newest segment was deleted or cut short, dropping what was lost
    /// (and saying what), instead of refusing to.
    pub accept_damage: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes_max: 64 << 20, free_bytes_min: 0, accept_damage: false }
    }
}

/// Sizes for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    pub segments: u64,
    /// Log bytes written over all segments (their files are preallocated, so larger).
    pub bytes: u64,
}

/// An open partition log, positioned for appending at `end_offset`.
pub struct Wal {
    dir: PathBuf,
    options: WalOptions,
    /// Base offsets of the segments on disk, ascending; the last is the active one.
    bases: Vec<u64>,
    active: File,
    /// Bytes of the active segment that frames may fill (its length less the trailer).
    active_capacity: u64,
    end_offset: u64,
    frame_buffer: Vec<u8>,
}

const TRAILER_BYTES: u64 = 16;
const TRAILER_MAGIC: &[u8; 4] = b"TLWS";

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.wal"))
}

/// Where a segment is built before it is published under its name.
fn staging_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.wal.new"))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    fail::fail_point!("wal::sync_dir", |_| Err(WalError::io(dir)(io::Error::from_raw_os_error(libc::EIO))));
    File::open(dir).and_then(|d| d.sync_all()).map_err(WalError::io(dir))
}

fn trailer(len: u64) -> [u8; TRAILER_BYTES as usize] {
    let mut trailer = [0u8; TRAILER_BYTES as usize];
    trailer[0..4].copy_from_slice(TRAILER_MAGIC);
    trailer[4..12].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&trailer[0..12]);
    trailer[12..16].copy_from_slice(&crc.to_le_bytes());
    trailer
}

/// The frames' room in a segment file, if its trailer is intact and matches its length.
fn frames_capacity(bytes: &[u8]) -> Result<usize, String> {
    let len = bytes.len() as u64;
    if len < TRAILER_BYTES {
        return Err(format!("the file holds {len} bytes, too few for its trailer"));
    }
    let tail = &bytes[bytes.len() - TRAILER_BYTES as usize..];
    let crc = u32::from_le_bytes(tail[12..16].try_into().expect("4 bytes"));
    if &tail[0..4] != TRAILER_MAGIC || crc32c::crc32c(&tail[0..12]) != crc {
        return Err(format!("the file ({len} bytes) does not end in its trailer"));
    }
    let recorded = u64::from_le_bytes(tail[4..12].try_into().expect("8 bytes"));
    if recorded != len {
        return Err(format!("the file holds {len} bytes but was made with {recorded}"));
    }
    Ok((len - TRAILER_BYTES) as usize)
}

/// Bytes a new segment takes: the configured size, or enough for one frame of
/// `frame_bytes` plus a roll marker and the trailer.
fn segment_len(options: &WalOptions, frame_bytes: u64) -> u64 {
    let needed = frame_bytes + FRAME_HEADER_BYTES as u64 + TRAILER_BYTES;
    options.segment_bytes_max.max(needed)
}

/// Free bytes for unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    fail::fail_point!("wal::free_bytes", |free| Ok(free.map_or(0, |f| f.parse().expect("a byte count"))));
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs writes only into the struct it is given; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Reserves `len` bytes of disk for `file` (so writes into it never need new blocks).
fn allocate(file: &File, len: u64) -> io::Result<()> {
    fail::fail_point!("wal::allocate", |_| Err(io::Error::from_raw_os_error(libc::ENOSPC)));
    let len_arg = libc::off_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_arg) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        // A file system without preallocation: the file is sparse, and a full disk can
        // then also be met by a frame write (which is undone, see `Wal::append`).
        return file.set_len(len);
    }
    Err(error)
}

fn write_at(file: &File, bytes: &[u8], position: u64) -> io::Result<()> {
    fail::fail_point!("wal::write", |_| Err(io::Error::from_raw_os_error(libc::ENOSPC)));
    file.write_all_at(bytes, position)
}

fn remove_file(path: &Path) -> io::Result<()> {
    fail::fail_point!("wal::remove", |_| Err(io::Error::from_raw_os_error(libc::EIO)));
    fs::remove_file(path)
}

fn sync_data(file: &File) -> io::Result<()> {
    fail::fail_point!("wal::sync", |_| Err(io::Error::from_raw_os_error(libc::EIO)));
    file.sync_data()
}

/// Builds segment `base` of `len` bytes under its staging name, durable, not yet
/// published. Fails with `NoSpace`, leaving nothing behind, if the disk cannot hold it and
/// still keep `free_bytes_min` free.
fn stage_segment(dir: &Path, base: u64, len: u64, free_bytes_min: u64) -> Result<File, WalError> {
    let staging = staging_path(dir, base);
    let free = free_bytes(dir).map_err(WalError::io(dir))?;
    let needed = len + free_bytes_min;
    if free < needed {
        return Err(WalError::NoSpace { dir: dir.into(), free_bytes: free, needed_bytes: needed });
    }
    let _ = fs::remove_file(&staging);
    let built = OpenOptions::new().read(true).write(true).create_new(true).open(&staging).and_then(|file| {
        allocate(&file, len)?;
        fail::fail_point!("wal::stage", |_| Err(io::Error::from_raw_os_error(libc::EIO)));
        file.write_all_at(&trailer(len), len - TRAILER_BYTES)?;
        file.sync_all()?;
        Ok(file)
    });
    // Whatever failed, the log itself is as it was: the staged file is not part of it.
    built.map_err(|source| {
        let _ = fs::remove_file(&staging);
        if source.raw_os_error() == Some(libc::ENOSPC) {
            WalError::NoSpace { dir: dir.into(), free_bytes: free, needed_bytes: needed }
        } else {
            WalError::Unwritten { path: staging.clone(), source }
        }
    })
}

/// Gives a staged segment its name, durably.
fn publish_segment(dir: &Path, base: u64) -> Result<(), WalError> {
    let path = segment_path(dir, base);
    fail::fail_point!("wal::rename", |_| Err(WalError::io(&path)(io::Error::from_raw_os_error(libc::EIO))));
    fs::rename(staging_path(dir, base), &path).map_err(WalError::io(&path))?;
    sync_dir(dir)
}

fn create_segment(dir: &Path, base: u64, len: u64) -> Result<File, WalError> {
    let file = stage_segment(dir, base, len, 0)?;
    publish_segment(dir, base)?;
    Ok(file)
}

fn open_segment(path: &Path) -> Result<File, WalError> {
    OpenOptions::new().read(true).write(true).open(path).map_err(WalError::io(path))
}

/// Overwrites `[from, to)` of a segment with zeros and makes that durable.
fn zero_range(path: &Path, from: usize, to: usize) -> Result<(), WalError> {
    let file = open_segment(path)?;
    file.write_all_at(&vec![0u8; to - from], from as u64).and_then(|()| file.sync_data()).map_err(WalError::io(path))
}

impl Wal {
    /// Makes a new, empty log in `dir`: its first segment, durable. Done once, when the
    /// data directory is made; `open` never creates a log, so a deleted one is noticed.
    pub fn create(dir: &Path, options: WalOptions) -> Result<(), WalError> {
        fs::create_dir_all(dir).map_err(WalError::io(dir))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        create_segment(dir, 0, segment_len(&options, 0))?;
        Ok(())
    }

    /// Opens the log in `dir` and replays every frame from `start_offset` to the end:
    /// `visit(end_offset_of_frame, records)`. A torn last frame is zeroed (and that made
    /// durable); corruption, a segment cut short, and a missing segment are errors naming
    /// the file, unless `accept_damage` allows dropping a damaged newest segment's loss.
    pub fn open<E>(
        dir: &Path,
        options: WalOptions,
        start_offset: u64,
        mut visit: impl FnMut(u64, FrameRecords<'_>) -> Result<(), E>,
    ) -> Result<Result<Wal, E>, WalError> {
        let mut bases = list_segments(dir)?;
        if bases.is_empty() {
            bases.push(restart_deleted_log(dir, &options, start_offset)?);
        }
        let first = bases.partition_point(|&base| base <= start_offset);
        if first == 0 {
            return Err(WalError::Missing {
                dir: dir.into(),
                offset: start_offset,
                detail: format!("the oldest segment starts at {}", bases[0]),
            });
        }
        let mut end_offset = start_offset;
        let mut index = first - 1;
        loop {
            let base = bases[index];
            let is_last = index == bases.len() - 1;
            let path = segment_path(dir, base);
            let (capacity, rolled_to) = replay_segment(&path, base, is_last, &options, &mut end_offset, &mut visit)?;
            let rolled_to = match rolled_to {
                Ok(rolled_to) => rolled_to,
                Err(visit_error) => return Ok(Err(visit_error)),
            };
            let next = bases.get(index + 1).copied();
            match (rolled_to, next) {
                (None, None) => {
                    remove_staged(dir)?;
                    let active = open_segment(&path)?;
                    let active_capacity = capacity as u64;
                    let wal = Wal {
                        dir: dir.into(),
                        options,
                        bases,
                        active,
                        active_capacity,
                        end_offset,
                        frame_buffer: Vec::new(),
                    };
                    return Ok(Ok(wal));
                }
                (Some(rolled), Some(next)) if rolled == next => {}
                (Some(rolled), None) => {
                    find_rolled_segment(dir, rolled, base, &options)?;
                    bases.push(rolled);
                }
                (rolled, Some(next)) => {
                    let found = match rolled {
                        Some(rolled) => format!("rolled over to offset {rolled}"),
                        None => "ends without rolling over".into(),
                    };
                    return Err(WalError::Corrupt {
                        path,
                        position: (end_offset - base),
                        offset: end_offset,
                        detail: format!("the segment {found}, but the next segment begins at {next}"),
                    });
                }
            }
            end_offset = bases[index + 1];
            index += 1;
        }
    }

    /// The offset the next frame will start at; every offset below it is durable.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    fn active_base(&self) -> u64 {
        *self.bases.last().expect("an active segment")
    }

    /// Writes one frame holding `records` and makes it durable with one `fdatasync`.
    /// Returns the new end offset and how long the fdatasync took.
    ///
    /// `NoSpace` and `Unwritten` errors leave the log as it was (nothing of the frame can
    /// become durable) and the next append may succeed. Any other error means the log must
    /// not be used again: after a failed fsync the page cache is in an unknown state, and
    /// only recovery from disk is trustworthy.
    pub fn append(&mut self, records: &[&[u8]]) -> Result<(u64, std::time::Duration), WalError> {
        assert!(!records.is_empty(), "a frame without records is the roll marker");
        self.frame_buffer.clear();
        frame::encode(records, &mut self.frame_buffer);
        let frame_bytes = self.frame_buffer.len() as u64;
        // Room for this frame and, after it, the marker that rolls over to the next segment.
        if self.end_offset - self.active_base() + frame_bytes + FRAME_HEADER_BYTES as u64 > self.active_capacity {
            self.roll(frame_bytes)?;
        }
        let position = self.end_offset - self.active_base();
        let frame = std::mem::take(&mut self.frame_buffer);
        let written = self.write_or_undo(&frame, position);
        self.frame_buffer = frame;
        written?;
        let path = segment_path(&self.dir, self.active_base());
        let sync_started = std::time::Instant::now();
        sync_data(&self.active).map_err(WalError::io(&path))?;
        let sync = sync_started.elapsed();
        self.end_offset += frame_bytes;
        Ok((self.end_offset, sync))
    }

    /// Writes `bytes` at `position` of the active segment. If that fails, part of them
    /// may sit in the page cache: they are overwritten with zeros, so no later fsync can
    /// make them durable (`Unwritten`), or, if even that fails, the log is unusable (`Io`).
    fn write_or_undo(&self, bytes: &[u8], position: u64) -> Result<(), WalError> {
        let Err(source) = write_at(&self.active, bytes, position) else { return Ok(()) };
        let path = segment_path(&self.dir, self.active_base());
        Err(match self.active.write_all_at(&vec![0u8; bytes.len()], position) {
            Ok(()) => WalError::Unwritten { path, source },
            Err(_) => WalError::Io { path, source },
        })
    }

    /// Starts the next segment: built whole and durable under a staging name, then the
    /// marker that names it is written and synced, then it is published. A crash between
    /// the marker and the rename leaves the staged file, which `open` publishes.
    fn roll(&mut self, frame_bytes: u64) -> Result<(), WalError> {
        let next_base = self.end_offset + FRAME_HEADER_BYTES as u64;
        let len = segment_len(&self.options, frame_bytes);
        let file = stage_segment(&self.dir, next_base, len, self.options.free_bytes_min)?;
        let mut marker = Vec::with_capacity(FRAME_HEADER_BYTES);
        frame::encode(&[], &mut marker);
        let position = self.end_offset - self.active_base();
        if let Err(error) = self.write_or_undo(&marker, position) {
            let _ = fs::remove_file(staging_path(&self.dir, next_base));
            return Err(error);
        }
        let path = segment_path(&self.dir, self.active_base());
        sync_data(&self.active).map_err(WalError::io(&path))?;
        publish_segment(&self.dir, next_base)?;
        self.active = file;
        self.active_capacity = len - TRAILER_BYTES;
        self.bases.push(next_base);
        self.end_offset = next_base;
        Ok(())
    }

    /// Deletes every segment whose frames all lie below `offset` (a checkpoint). The
    /// active segment is never deleted. Returns how many were removed. A failure leaves
    /// the log usable, with the segments not yet deleted still listed; calling again
    /// retries them (replay skips whatever lies below its checkpoint either way).
    pub fn remove_segments_before(&mut self, offset: u64) -> Result<usize, WalError> {
        let removable = self.bases.windows(2).take_while(|pair| pair[1] <= offset).count();
        let mut removed = 0;
        let mut failed = None;
        for &base in &self.bases[..removable] {
            let path = segment_path(&self.dir, base);
            match remove_file(&path) {
                Ok(()) => removed += 1,
                // Already gone (someone removed it by hand): what was wanted.
                Err(source) if source.kind() == io::ErrorKind::NotFound => removed += 1,
                Err(source) => {
                    failed = Some(WalError::Io { path, source });
                    break;
                }
            }
        }
        self.bases.drain(..removed);
        match failed {
            Some(error) => Err(error),
            None if removed > 0 => sync_dir(&self.dir).map(|()| removed),
            None => Ok(0),
        }
    }

    pub fn stats(&self) -> WalStats {
        WalStats { segments: self.bases.len() as u64, bytes: self.end_offset - self.bases[0] }
    }
}

/// What replaying one segment found: its frames' capacity, and the offset its roll marker
/// names (if it rolled over), or the visitor's error.
type Replayed<E> = (usize, Result<Option<u64>, E>);

/// Replays the frames of one segment from `end_offset`, advancing it.
fn replay_segment<E>(
    path: &Path,
    base: u64,
    is_last: bool,
    options: &WalOptions,
    end_offset: &mut u64,
    visit: &mut impl FnMut(u64, FrameRecords<'_>) -> Result<(), E>,
) -> Result<Replayed<E>, WalError> {
    let mut bytes = fs::read(path).map_err(WalError::io(path))?;
    let capacity = match frames_capacity(&bytes) {
        Ok(capacity) => capacity,
        Err(detail) if is_last && options.accept_damage => {
            bytes = repair_cut_segment(path, bytes, options, &detail)?;
            frames_capacity(&bytes).expect("a repaired segment has its trailer")
        }
        Err(detail) => {
            let hint = if is_last { " (start with --accept-log-loss to go on without its lost frames)" } else { "" };
            return Err(WalError::Corrupt {
                path: path.into(),
                position: bytes.len() as u64,
                offset: base + bytes.len() as u64,
                detail: format!("the segment is cut short or its end is damaged: {detail}{hint}"),
            });
        }
    };
    let region = &bytes[..capacity];
    let mut at = usize::try_from(*end_offset - base).expect("segment offset fits in memory");
    if at > capacity {
        return Err(WalError::Missing {
            dir: path.parent().unwrap_or(path).into(),
            offset: *end_offset,
            detail: format!("{} holds only {capacity} bytes of frames", path.display()),
        });
    }
    loop {
        match frame::scan(region, at, is_last) {
            Scan::Frame { payload: [], next } => return Ok((capacity, Ok(Some(base + next as u64)))),
            Scan::Frame { payload, next } => {
                *end_offset = base + next as u64;
                if let Err(e) = visit(*end_offset, FrameRecords::new(payload)) {
                    return Ok((capacity, Err(e)));
                }
                at = next;
            }
            Scan::End => return Ok((capacity, Ok(None))),
            Scan::TornTail { reason } => {
                let to = region.iter().rposition(|&b| b != 0).map_or(at, |last| last + 1);
                zero_range(path, at, to)?;
                tracing::warn!(
                    segment = %path.display(), position = at, bytes = to - at,
                    "zeroed the torn last frame: {reason} (never acknowledged)"
                );
                return Ok((capacity, Ok(None)));
            }
            Scan::Corrupt { detail } => {
                return Err(WalError::Corrupt {
                    path: path.into(),
                    position: at as u64,
                    offset: base + at as u64,
                    detail,
                });
            }
        }
    }
}

/// With the loss accepted: keeps the whole frames of a newest segment that was cut short,
/// restores its length and trailer, and says what was dropped. Returns its new bytes.
fn repair_cut_segment(path: &Path, bytes: Vec<u8>, options: &WalOptions, detail: &str) -> Result<Vec<u8>, WalError> {
    let mut kept = 0;
    let mut frames = 0;
    while let Scan::Frame { next, .. } = frame::scan(&bytes, kept, true) {
        kept = next;
        frames += 1;
    }
    let len = segment_len(options, kept as u64);
    let file = open_segment(path)?;
    file.set_len(kept as u64)
        .and_then(|()| allocate(&file, len))
        .and_then(|()| file.write_all_at(&trailer(len), len - TRAILER_BYTES))
        .and_then(|()| file.sync_all())
        .map_err(WalError::io(path))?;
    tracing::warn!(
        segment = %path.display(), kept_frames = frames, dropped_bytes = bytes.len() - kept,
        "{detail}: kept its {frames} whole frames, dropped the {} bytes after them; the frames that \
         were in the missing part are lost and cannot be counted (accepted loss)",
        bytes.len() - kept
    );
    fs::read(path).map_err(WalError::io(path))
}

/// A log without segments was deleted: refused, or (the loss accepted) started anew at
/// `start_offset`, whose base is returned.
fn restart_deleted_log(dir: &Path, options: &WalOptions, start_offset: u64) -> Result<u64, WalError> {
    let detail = "no segment files: the log was deleted";
    if !options.accept_damage {
        return Err(WalError::Missing { dir: dir.into(), offset: start_offset, detail: detail.into() });
    }
    tracing::warn!(dir = %dir.display(), start_offset, "{detail}; starting a new one (accepted loss)");
    create_segment(dir, start_offset, segment_len(options, 0))?;
    Ok(start_offset)
}

/// The newest segment rolled over to `rolled`, which has no file: publish it if a crash
/// left it staged, make a new one if the loss is accepted, or refuse.
fn find_rolled_segment(dir: &Path, rolled: u64, from: u64, options: &WalOptions) -> Result<(), WalError> {
    let staged = staging_path(dir, rolled);
    if fs::read(&staged).is_ok_and(|bytes| frames_capacity(&bytes).is_ok()) {
        return publish_segment(dir, rolled);
    }
    let detail = format!(
        "segment {} is missing: {} rolled over to it, so its frames are lost unless the file is restored",
        segment_path(dir, rolled).display(),
        segment_path(dir, from).display()
    );
    if !options.accept_damage {
        return Err(WalError::Missing {
            dir: dir.into(),
            offset: rolled,
            detail: format!("{detail} (start with --accept-log-loss to go on without them)"),
        });
    }
    tracing::warn!("{detail}; starting it anew (accepted loss; how many frames it held cannot be known)");
    create_segment(dir, rolled, segment_len(options, 0)).map(drop)
}

/// Removes staged segments no marker names (a roll interrupted before its marker).
fn remove_staged(dir: &Path) -> Result<(), WalError> {
    for entry in fs::read_dir(dir).map_err(WalError::io(dir))? {
        let path = entry.map_err(WalError::io(dir))?.path();
        if path.extension().is_some_and(|e| e == "new") {
            fs::remove_file(&path).map_err(WalError::io(&path))?;
        }
    }
    Ok(())
}

/// See `crate::fuzz_segment`.
pub(crate) fn fuzz(bytes: &[u8]) -> usize {
    let region = frames_capacity(bytes).map_or(bytes, |capacity| &bytes[..capacity]);
    let mut records = 0;
    for is_last in [true, false] {
        let mut at = 0;
        while let Scan::Frame { payload, next } = frame::scan(region, at, is_last) {
            assert!(next > at && next <= region.len(), "a frame ends after it starts, inside the segment");
            records += FrameRecords::new(payload).count();
            at = next;
        }
    }
    records
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut bases = Vec::new();
    let entries = fs::read_dir(dir).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            WalError::Missing { dir: dir.into(), offset: 0, detail: "the log directory is missing".into() }
        } else {
            WalError::Io { path: dir.into(), source }
        }
    })?;
    for entry in entries {
        let entry = entry.map_err(WalError::io(dir))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else {
            continue;
        };
        let base = stem.parse::<u64>().map_err(|_| WalError::Corrupt {
            path: entry.path(),
            position: 0,
            offset: 0,
            detail: "segment file name is not a 20-digit offset".into(),
        })?;
        bases.push(base);
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Reads the frames of the log in `dir` between `from` and `to`, both frame boundaries
/// below the durable end (a checkpoint is one): `visit(end, records)` for each (a frame is
/// named by its end offset, as `Wal::open` names it), in order, until it answers false. Read-only, beside the writer: it reads exactly the bytes
/// of whole frames, never the segment's unwritten rest.
pub(crate) fn read_frames(
    dir: &Path,
    from: u64,
    to: u64,
    mut visit: impl FnMut(u64, FrameRecords<'_>) -> bool,
) -> Result<(), WalError> {
    let bases = list_segments(dir)?;
    let first = bases.partition_point(|&base| base <= from);
    if first == 0 {
        let oldest = bases.first().map_or("no segment".to_string(), |b| format!("the oldest segment starts at {b}"));
        return Err(WalError::Missing { dir: dir.into(), offset: from, detail: oldest });
    }
    let mut at = from;
    let mut chunk = Vec::new();
    for (index, &base) in bases.iter().enumerate().skip(first - 1) {
        if at >= to {
            break;
        }
        let segment_end = bases.get(index + 1).copied().unwrap_or(u64::MAX);
        let end = to.min(segment_end);
        let path = segment_path(dir, base);
        let file = File::open(&path).map_err(WalError::io(&path))?;
        let mut segment = SegmentRead { file: &file, path: &path, base, chunk: &mut chunk };
        if !segment.frames(at, end, &mut visit)? {
            return Ok(());
        }
        at = end;
    }
    Ok(())
}

/// Bytes a reader takes from a segment at a time: a round of the archiver reads the frames
/// it needs, not everything behind the checkpoint.
const READ_CHUNK_BYTES: usize = 4 << 20;

/// One segment being read a chunk at a time into a buffer reused across segments.
struct SegmentRead<'a> {
    file: &'a File,
    path: &'a Path,
    /// The log offset of the segment's first byte.
    base: u64,
    chunk: &'a mut Vec<u8>,
}

impl SegmentRead<'_> {
    /// Visits the frames from `at` to `end`: false once `visit` answers false. A frame cut
    /// by the end of a chunk is read whole before it is scanned, so each scan (of a segment
    /// taken as not the last: no look-ahead past the frame) sees what it would see with the
    /// whole range in memory. A read error or damage further on fails the read after the
    /// frames before it were visited.
    fn frames(
        &mut self,
        at: u64,
        end: u64,
        visit: &mut impl FnMut(u64, FrameRecords<'_>) -> bool,
    ) -> Result<bool, WalError> {
        // `chunk[..filled]` holds the log from `chunk_at`; `read_to` is the first offset not
        // read yet. The chunk is zeroed only when it grows.
        let (mut chunk_at, mut read_to, mut filled) = (at, at, 0);
        let mut position = 0;
        loop {
            let wanted = frame::wanted(&self.chunk[..filled], position);
            if read_to < end && filled - position < wanted {
                self.chunk.copy_within(position..filled, 0);
                (chunk_at, filled, position) = (chunk_at + position as u64, filled - position, 0);
                let more = (end - read_to).min(READ_CHUNK_BYTES.max(wanted.saturating_sub(filled)) as u64) as usize;
                if self.chunk.len() < filled + more {
                    self.chunk.resize(filled + more, 0);
                }
                self.file
                    .read_exact_at(&mut self.chunk[filled..filled + more], read_to - self.base)
                    .map_err(WalError::io(self.path))?;
                (filled, read_to) = (filled + more, read_to + more as u64);
                continue;
            }
            let corrupt = |detail| WalError::Corrupt {
                path: self.path.into(),
                position: chunk_at - self.base + position as u64,
                offset: chunk_at + position as u64,
                detail,
            };
            match frame::scan(&self.chunk[..filled], position, false) {
                // The roll marker: the rest is in the next segment.
                Scan::Frame { payload: [], .. } | Scan::End => return Ok(true),
                Scan::Frame { payload, next } => {
                    if !visit(chunk_at + next as u64, FrameRecords::new(payload)) {
                        return Ok(false);
                    }
                    position = next;
                }
                Scan::TornTail { reason } => return Err(corrupt(reason.to_string())),
                Scan::Corrupt { detail } => return Err(corrupt(detail)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Replayed = Vec<(u64, Vec<Vec<u8>>)>;

    fn open(dir: &Path, start: u64, options: WalOptions) -> Result<(Wal, Replayed), WalError> {
        let mut replayed = Vec::new();
        let wal = Wal::open(dir, options, start, |end, records| {
            replayed.push((end, records.map(|r| r.unwrap().to_vec()).collect()));
            Ok::<(), ()>(())
        })?
        .unwrap();
        Ok((wal, replayed))
    }

    /// A new log in `dir`, opened.
    fn fresh(dir: &Path, options: WalOptions) -> Wal {
        Wal::create(dir, options).unwrap();
        let (wal, replayed) = open(dir, 0, options).unwrap();
        assert!(replayed.is_empty());
        wal
    }

    fn small(segment_bytes_max: u64) -> WalOptions {
        WalOptions { segment_bytes_max, ..WalOptions::default() }
    }

    fn accepting(options: WalOptions) -> WalOptions {
        WalOptions { accept_damage: true, ..options }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "wal"))
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn appended_frames_replay_from_any_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let options = small(64);
        let mut wal = fresh(dir.path(), options);
        let mut ends = vec![0];
        for i in 0..20u8 {
            ends.push(wal.append(&[&[i; 10], &[i]]).unwrap().0);
        }
        assert!(wal.stats().segments > 5, "{:?}", wal.stats());
        drop(wal);
        for (i, &start) in ends.iter().enumerate() {
            let (wal, replayed) = open(dir.path(), start, options).unwrap();
            assert_eq!(replayed.len(), 20 - i);
            assert_eq!(replayed.first().map(|r| r.1[1].clone()), (i < 20).then(|| vec![i as u8]));
            assert_eq!(wal.end_offset(), *ends.last().unwrap());
        }
    }

    #[test]
    fn frames_are_read_between_any_two_boundaries_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(64));
        let mut ends = vec![0];
        for i in 0..20u8 {
            ends.push(wal.append(&[&[i; 10], &[i]]).unwrap().0);
        }
        assert!(wal.stats().segments > 5);
        for (from, to) in [(0, 20), (3, 17), (7, 8), (19, 20), (5, 5)] {
            let mut read = Vec::new();
            read_frames(dir.path(), ends[from], ends[to], |end, records| {
                read.push((end, records.map(|r| r.unwrap()[0]).collect::<Vec<u8>>()));
                true
            })
            .unwrap();
            let expected: Vec<(u64, Vec<u8>)> = (from..to).map(|i| (ends[i + 1], vec![i as u8, i as u8])).collect();
            assert_eq!(read, expected, "frames {from}..{to}");
        }
        // The writer goes on while a reader reads what is durable.
        wal.append(&[b"more"]).unwrap();
        let mut count = 0;
        read_frames(dir.path(), 0, ends[20], |_, _| {
            count += 1;
            count < 5
        })
        .unwrap();
        assert_eq!(count, 5, "the visitor stops the read");
    }

    #[test]
    fn frames_cut_by_the_read_chunks_or_larger_than_one_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(64 << 20));
        // Frames of 1.5 MiB straddle the 4 MiB chunks; one of 9 MiB spans more than two.
        let sizes = [1_500_000, 1_500_000, 1_500_000, 9_000_000, 1_500_000, 100, 1_500_000];
        let mut ends = vec![0];
        for (i, &size) in sizes.iter().enumerate() {
            ends.push(wal.append(&[&vec![i as u8; size], &[i as u8]]).unwrap().0);
        }
        assert!(READ_CHUNK_BYTES < 9_000_000 && ends[3] as usize > READ_CHUNK_BYTES);
        for (from, to) in [(0, sizes.len()), (1, 5), (3, 4), (4, sizes.len())] {
            let mut read = Vec::new();
            read_frames(dir.path(), ends[from], ends[to], |end, records| {
                let records: Vec<Vec<u8>> = records.map(|r| r.unwrap().to_vec()).collect();
                read.push((end, records[0].len(), records[0].iter().all(|&b| b == records[1][0]), records[1][0]));
                true
            })
            .unwrap();
            let expected: Vec<_> = (from..to).map(|i| (ends[i + 1], sizes[i], true, i as u8)).collect();
            assert_eq!(read, expected, "frames {from}..{to}");
        }
    }

    #[test]
    fn zeros_read_in_chunks_end_the_data_only_if_nothing_follows_them() {
        // Six frames of 1.5 MiB; zeros from the third frame on span several read chunks.
        let write = |dir: &Path| {
            let mut wal = fresh(dir, small(64 << 20));
            let ends: Vec<u64> =
                std::iter::once(0).chain((0..6u8).map(|i| wal.append(&[&vec![i; 1_500_000]]).unwrap().0)).collect();
            ends
        };
        let zero = |dir: &Path, from: u64, to: u64| {
            let file = OpenOptions::new().write(true).open(segment_path(dir, 0)).unwrap();
            file.write_all_at(&vec![0; (to - from) as usize], from).unwrap();
        };
        let read = |dir: &Path, to: u64| {
            let mut visited = Vec::new();
            let result = read_frames(dir, 0, to, |end, _| {
                visited.push(end);
                true
            });
            (visited, result)
        };
        // Zeros to the end of the range: the data ends there.
        let tail = tempfile::tempdir().unwrap();
        let ends = write(tail.path());
        zero(tail.path(), ends[2], ends[6]);
        let (visited, result) = read(tail.path(), ends[6]);
        assert_eq!(visited, ends[1..3]);
        assert!(result.is_ok(), "{result:?}");
        // Zeros, then a frame: damage where the zeros start, after the frames before them.
        let hole = tempfile::tempdir().unwrap();
        let ends = write(hole.path());
        zero(hole.path(), ends[2], ends[5]);
        let (visited, result) = read(hole.path(), ends[6]);
        assert_eq!(visited, ends[1..3]);
        match result {
            Err(WalError::Corrupt { position, offset, .. }) => assert_eq!((position, offset), (ends[2], ends[2])),
            other => panic!("expected corruption at {}, got {other:?}", ends[2]),
        }
    }

    #[test]
    fn segments_are_preallocated_and_end_in_their_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(8192));
        wal.append(&[b"one"]).unwrap();
        let bytes = fs::read(segment_path(dir.path(), 0)).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(frames_capacity(&bytes), Ok(8192 - TRAILER_BYTES as usize));
    }

    #[test]
    fn removed_segments_are_gone_and_replay_still_works_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let options = small(64);
        let mut wal = fresh(dir.path(), options);
        let mut ends = Vec::new();
        for i in 0..10u8 {
            ends.push(wal.append(&[&[i; 30]]).unwrap().0);
        }
        let before = wal.stats().segments;
        let removed = wal.remove_segments_before(ends[6]).unwrap();
        assert!(removed > 0);
        assert_eq!(wal.stats().segments, before - removed as u64);
        assert!(!segment_path(dir.path(), 0).exists(), "the first segment was deleted");
        drop(wal);
        let (_, replayed) = open(dir.path(), ends[6], options).unwrap();
        assert_eq!(replayed.len(), 3);
        let err = open(dir.path(), 0, options).err().expect("offset 0 was deleted");
        assert!(matches!(err, WalError::Missing { .. }), "{err}");
    }

    #[test]
    fn torn_last_frame_is_zeroed_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(4096));
        let first = wal.append(&[b"kept"]).unwrap().0;
        let torn_end = wal.append(&[b"torn away"]).unwrap().0;
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[torn_end as usize - 3..torn_end as usize].fill(0);
        fs::write(&path, &bytes).unwrap();
        let (mut wal, replayed) = open(dir.path(), 0, small(4096)).unwrap();
        assert_eq!(replayed, vec![(first, vec![b"kept".to_vec()])]);
        assert!(fs::read(&path).unwrap()[first as usize..torn_end as usize].iter().all(|&b| b == 0));
        assert_eq!(wal.append(&[b"after"]).unwrap().0, first + frame_len(b"after"));
        drop(wal);
        let (_, replayed) = open(dir.path(), 0, small(4096)).unwrap();
        assert_eq!(replayed.len(), 2);
    }

    #[test]
    fn mid_log_damage_refuses_to_open_and_names_file_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(4096));
        let first = wal.append(&[b"one"]).unwrap().0;
        wal.append(&[b"two"]).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[first as usize + 20] ^= 0x40;
        bytes[5] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = open(dir.path(), 0, small(4096)).err().expect("must refuse");
        let message = err.to_string();
        assert!(message.contains("00000000000000000000.wal") && message.contains("at byte 0"), "{message}");
    }

    /// Several segments of one frame each (a segment's room fits one frame and its marker).
    fn one_frame_per_segment(dir: &Path) -> (WalOptions, Vec<PathBuf>, Vec<u64>) {
        let options = small(72);
        let mut wal = fresh(dir, options);
        let ends: Vec<u64> = (0..3).map(|_| wal.append(&[&[7; 20]]).unwrap().0).collect();
        drop(wal);
        let paths = segment_files(dir);
        assert!(paths.len() >= 3, "{paths:?}");
        (options, paths, ends)
    }

    #[test]
    fn a_cut_segment_before_the_last_is_corruption_even_when_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (options, paths, _) = one_frame_per_segment(dir.path());
        let len = fs::metadata(&paths[0]).unwrap().len();
        OpenOptions::new().write(true).open(&paths[0]).unwrap().set_len(len - 1).unwrap();
        assert!(matches!(open(dir.path(), 0, options), Err(WalError::Corrupt { .. })));
        assert!(matches!(open(dir.path(), 0, accepting(options)), Err(WalError::Corrupt { .. })));
    }

    #[test]
    fn gap_between_segments_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (options, paths, _) = one_frame_per_segment(dir.path());
        fs::remove_file(&paths[1]).unwrap();
        match open(dir.path(), 0, accepting(options)) {
            Err(WalError::Corrupt { detail, .. }) => {
                assert!(detail.contains("but the next segment begins at"), "{detail}")
            }
            other => panic!("a missing middle segment must be corruption, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_deleted_newest_segment_is_refused_by_name_unless_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (options, paths, ends) = one_frame_per_segment(dir.path());
        let newest = paths.last().unwrap();
        fs::remove_file(newest).unwrap();
        match open(dir.path(), 0, options) {
            Err(error @ WalError::Missing { .. }) => {
                let name = newest.file_name().unwrap().to_str().unwrap();
                assert!(error.to_string().contains(name), "{error}");
            }
            other => panic!("a deleted newest segment must be refused, got {:?}", other.map(|_| ())),
        }
        let (mut wal, replayed) = open(dir.path(), 0, accepting(options)).unwrap();
        assert_eq!(replayed.len(), 2, "the frames before the lost segment");
        let after = wal.append(&[b"after"]).unwrap().0;
        assert!(after > ends[1]);
        drop(wal);
        let (_, replayed) = open(dir.path(), 0, options).unwrap();
        assert_eq!(replayed.len(), 3, "repaired for good");
    }

    #[test]
    fn a_deleted_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(4096));
        wal.append(&[b"one"]).unwrap();
        drop(wal);
        fs::remove_file(segment_path(dir.path(), 0)).unwrap();
        assert!(matches!(open(dir.path(), 0, small(4096)), Err(WalError::Missing { .. })));
        let (_, replayed) = open(dir.path(), 0, accepting(small(4096))).unwrap();
        assert!(replayed.is_empty());
    }

    /// A new log of three frames: their end offsets, the segment's path and bytes.
    fn three_frames(dir: &Path, options: WalOptions) -> (Vec<u64>, PathBuf, Vec<u8>) {
        let mut wal = fresh(dir, options);
        let ends: Vec<u64> = [&b"alpha"[..], b"bravo-bravo", b"c"]
            .iter()
            .map(|r| wal.append(&[r, b"second record"]).unwrap().0)
            .collect();
        drop(wal);
        let path = segment_path(dir, 0);
        let full = fs::read(&path).unwrap();
        (ends, path, full)
    }

    /// The newest segment cut at every byte of its frames: refused, naming the cut; with the
    /// loss accepted, the whole frames before the cut are kept and the log goes on.
    #[test]
    fn a_cut_short_newest_segment_is_refused_unless_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let options = small(4096);
        let (ends, path, full) = three_frames(dir.path(), options);
        for cut in (0..=*ends.last().unwrap() as usize).step_by(7).chain([full.len() - 1]) {
            fs::write(&path, &full[..cut]).unwrap();
            match open(dir.path(), 0, options) {
                Err(WalError::Corrupt { detail, .. }) => assert!(detail.contains("cut short"), "{detail}"),
                other => panic!("cut at {cut}: must be refused, got {:?}", other.map(|_| ())),
            }
            let (mut wal, replayed) = open(dir.path(), 0, accepting(options)).unwrap();
            let whole = ends.iter().take_while(|&&end| end as usize <= cut).count();
            assert_eq!(replayed.len(), whole, "cut at {cut}");
            let kept = if whole == 0 { 0 } else { ends[whole - 1] };
            assert_eq!(wal.append(&[b"after"]).unwrap().0, kept + frame_len(b"after"), "cut at {cut}");
            drop(wal);
            assert_eq!(open(dir.path(), 0, options).unwrap().1.len(), whole + 1, "cut at {cut}: repaired");
        }
    }

    /// A torn last frame, zero-filled from every byte on (what a crash leaves in a
    /// preallocated segment): recovery keeps exactly the whole frames before it.
    #[test]
    fn recovery_after_a_torn_write_at_every_byte_keeps_exactly_the_whole_frames() {
        let dir = tempfile::tempdir().unwrap();
        let options = small(4096);
        let (ends, path, full) = three_frames(dir.path(), options);
        let last_start = ends[1] as usize;
        for cut in last_start..ends[2] as usize {
            let mut torn = full.clone();
            torn[cut..ends[2] as usize].fill(0);
            fs::write(&path, &torn).unwrap();
            let (mut wal, replayed) = open(dir.path(), 0, options).unwrap();
            assert_eq!(replayed.len(), 2, "torn at {cut}");
            assert_eq!(wal.append(&[b"after"]).unwrap().0, ends[1] + frame_len(b"after"));
        }
    }

    #[test]
    fn a_roll_interrupted_after_its_marker_is_finished_and_one_before_it_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (options, paths, _) = one_frame_per_segment(dir.path());
        let newest = paths.last().unwrap();
        let base: u64 = newest.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        fs::rename(newest, staging_path(dir.path(), base)).unwrap();
        let stray = staging_path(dir.path(), 999_999);
        fs::write(&stray, b"left by a roll that never wrote its marker").unwrap();
        let (_, replayed) = open(dir.path(), 0, options).unwrap();
        assert_eq!(replayed.len(), 3);
        assert!(newest.exists() && !stray.exists());
    }

    fn frame_len(record: &[u8]) -> u64 {
        (crate::FRAME_HEADER_BYTES + 4 + record.len()) as u64
    }

    /// Every single flipped bit outside the last frame makes recovery refuse to start.
    #[test]
    fn a_flipped_bit_anywhere_before_the_last_frame_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let options = small(4096);
        let mut wal = fresh(dir.path(), options);
        let first_two_end = [b"one", b"two"].iter().map(|r| wal.append(&[&r[..]]).unwrap().0).last().unwrap();
        wal.append(&[b"three"]).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let full = fs::read(&path).unwrap();
        for byte in 0..first_two_end as usize {
            for bit in 0..8 {
                let mut damaged = full.clone();
                damaged[byte] ^= 1 << bit;
                fs::write(&path, &damaged).unwrap();
                assert!(matches!(open(dir.path(), 0, options), Err(WalError::Corrupt { .. })), "byte {byte} bit {bit}");
            }
        }
    }

    /// A disk too full for the next segment refuses the write, leaves the log as it was,
    /// and the write succeeds once there is room; a failed frame write is undone.
    #[test]
    fn a_full_disk_and_a_failed_write_leave_the_log_as_it_was() {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions { segment_bytes_max: 72, free_bytes_min: 1 << 20, accept_damage: false };
        let mut wal = fresh(dir.path(), options);
        let mut ends = vec![wal.append(&[&[1; 20]]).unwrap().0];
        fail::cfg("wal::free_bytes", "return(1000)").unwrap();
        let refused = wal.append(&[&[2; 20]]).unwrap_err();
        assert!(matches!(refused, WalError::NoSpace { free_bytes: 1000, .. }) && refused.is_transient(), "{refused}");
        fail::remove("wal::free_bytes");
        fail::cfg("wal::allocate", "return").unwrap();
        assert!(matches!(wal.append(&[&[3; 20]]), Err(WalError::NoSpace { .. })));
        fail::remove("wal::allocate");
        let staged = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "new"));
        assert_eq!(staged.count(), 0, "a failed segment leaves nothing behind");
        ends.push(wal.append(&[&[4; 20]]).unwrap().0);
        fail::cfg("wal::write", "return").unwrap();
        let undone = wal.append(&[&[5; 20]]).unwrap_err();
        assert!(matches!(undone, WalError::Unwritten { .. }) && undone.is_transient(), "{undone}");
        fail::remove("wal::write");
        ends.push(wal.append(&[&[6; 20]]).unwrap().0);
        fail::cfg("wal::sync", "return").unwrap();
        assert!(!wal.append(&[&[7; 20]]).unwrap_err().is_transient(), "a failed fsync is final");
        fail::remove("wal::sync");
        drop(wal);
        scenario.teardown();
        let (_, replayed) = open(dir.path(), 0, options).unwrap();
        let firsts: Vec<u8> = replayed.iter().map(|(_, records)| records[0][0]).collect();
        // The frame whose fsync failed may or may not have reached the disk.
        assert!(firsts == [1, 4, 6] || firsts == [1, 4, 6, 7], "{firsts:?}");
        assert_eq!(replayed.iter().map(|r| r.0).take(3).collect::<Vec<_>>(), ends);
    }

    /// Each step of a roll failing: building the next segment leaves the log as it was;
    /// a failed rename or directory sync after the marker is final, and reopening finishes
    /// the roll (the marker names the staged segment), so every frame appended survives.
    #[test]
    fn a_roll_that_fails_at_any_step_loses_no_appended_frame() {
        let scenario = fail::FailScenario::setup();
        for (failpoint, transient) in [("wal::stage", true), ("wal::rename", false), ("wal::sync_dir", false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut wal = fresh(dir.path(), small(72));
            let mut appended = vec![1u8];
            wal.append(&[&[1; 20]]).unwrap();
            fail::cfg(failpoint, "return").unwrap();
            let failed = wal.append(&[&[2; 20]]).unwrap_err();
            fail::remove(failpoint);
            assert_eq!(failed.is_transient(), transient, "{failpoint}: {failed}");
            if transient {
                wal.append(&[&[3; 20]]).unwrap();
                appended.push(3);
            }
            drop(wal);
            let (mut wal, replayed) = open(dir.path(), 0, small(72)).unwrap();
            let firsts: Vec<u8> = replayed.iter().map(|(_, records)| records[0][0]).collect();
            assert_eq!(firsts, appended, "{failpoint}");
            wal.append(&[&[4; 20]]).unwrap();
        }
        scenario.teardown();
    }

    /// Deleting checkpointed segments that fails leaves them listed; the next call
    /// deletes them, and replay past the checkpoint is unaffected.
    #[test]
    fn a_failed_segment_removal_is_retried() {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let mut wal = fresh(dir.path(), small(72));
        let mut ends = Vec::new();
        for byte in 1..=4u8 {
            ends.push(wal.append(&[&[byte; 20]]).unwrap().0);
        }
        let segments = segment_files(dir.path()).len();
        assert!(segments >= 3, "{segments}");
        fail::cfg("wal::remove", "1*off->return").unwrap();
        assert!(wal.remove_segments_before(ends[2]).is_err());
        fail::remove("wal::remove");
        assert_eq!(segment_files(dir.path()).len(), segments - 1, "the first went before the failure");
        assert!(wal.remove_segments_before(ends[2]).unwrap() >= 1, "the rest go on the next call");
        assert!(segment_files(dir.path()).len() < segments - 1);
        drop(wal);
        scenario.teardown();
        let (_, replayed) = open(dir.path(), ends[2], small(72)).unwrap();
        assert_eq!(replayed.iter().map(|(_, records)| records[0][0]).collect::<Vec<_>>(), [4]);
    }
}
