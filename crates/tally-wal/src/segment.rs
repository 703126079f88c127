//! Segment files: opening and replaying them, appending frames, rolling to a new segment,
//! and deleting the segments a checkpoint has made unnecessary.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::WalError;
use crate::frame::{self, FrameRecords, Scan};

#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    /// A segment is closed and a new one started once it holds this many bytes. Segments
    /// are the unit of deletion, so smaller ones free disk sooner after a checkpoint.
    pub segment_bytes_max: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes_max: 64 << 20 }
    }
}

/// Sizes for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    pub segments: u64,
    /// Bytes on disk over all segments.
    pub bytes: u64,
}

/// An open partition log, positioned for appending at `end_offset`.
pub struct Wal {
    dir: PathBuf,
    options: WalOptions,
    /// Base offsets of the segments on disk, ascending; the last is the active one.
    bases: Vec<u64>,
    active: File,
    end_offset: u64,
    frame_buffer: Vec<u8>,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.wal"))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(WalError::io(dir))
}

impl Wal {
    /// Opens the log in `dir` (created if absent) and replays every frame from
    /// `start_offset` to the end: `visit(end_offset_of_frame, records)`. A torn tail is
    /// truncated away (and that truncation made durable); corruption anywhere else is an
    /// error naming the file and byte.
    pub fn open<E>(
        dir: &Path,
        options: WalOptions,
        start_offset: u64,
        mut visit: impl FnMut(u64, FrameRecords<'_>) -> Result<(), E>,
    ) -> Result<Result<Wal, E>, WalError> {
        fs::create_dir_all(dir).map_err(WalError::io(dir))?;
        let mut bases = list_segments(dir)?;
        if bases.is_empty() {
            if start_offset != 0 {
                return Err(WalError::Missing {
                    dir: dir.into(),
                    offset: start_offset,
                    detail: "no segment files, but the checkpoint says data was logged".into(),
                });
            }
            File::create(segment_path(dir, 0)).map_err(WalError::io(segment_path(dir, 0)))?;
            sync_dir(dir)?;
            bases.push(0);
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
        for index in first - 1..bases.len() {
            let base = bases[index];
            let path = segment_path(dir, base);
            let is_last = index == bases.len() - 1;
            let bytes = fs::read(&path).map_err(WalError::io(&path))?;
            let mut at = usize::try_from(end_offset - base).expect("segment offset fits in memory");
            if at > bytes.len() {
                return Err(WalError::Missing {
                    dir: dir.into(),
                    offset: end_offset,
                    detail: format!("{} holds only {} bytes", path.display(), bytes.len()),
                });
            }
            loop {
                match frame::scan(&bytes, at, is_last) {
                    Scan::Frame { payload, next } => {
                        end_offset = base + next as u64;
                        if let Err(e) = visit(end_offset, FrameRecords::new(payload)) {
                            return Ok(Err(e));
                        }
                        at = next;
                    }
                    Scan::End => break,
                    Scan::TornTail { reason } => {
                        let file = OpenOptions::new().write(true).open(&path).map_err(WalError::io(&path))?;
                        file.set_len(at as u64).and_then(|()| file.sync_all()).map_err(WalError::io(&path))?;
                        eprintln!(
                            "tally-wal: truncated torn tail of {} at byte {at}: {reason} ({} bytes dropped, never acknowledged)",
                            path.display(),
                            bytes.len() - at
                        );
                        break;
                    }
                    Scan::Corrupt { detail } => {
                        return Err(WalError::Corrupt { path, position: at as u64, offset: base + at as u64, detail });
                    }
                }
            }
            if let Some(&next_base) = bases.get(index + 1)
                && base + bytes.len() as u64 != next_base
            {
                return Err(WalError::Corrupt {
                    path,
                    position: bytes.len() as u64,
                    offset: base + bytes.len() as u64,
                    detail: format!(
                        "segment ends at offset {} but the next begins at {next_base}",
                        base + bytes.len() as u64
                    ),
                });
            }
            end_offset = end_offset.max(base + at as u64);
        }
        let active_path = segment_path(dir, *bases.last().expect("at least one segment"));
        let active = OpenOptions::new().append(true).open(&active_path).map_err(WalError::io(&active_path))?;
        Ok(Ok(Wal { dir: dir.into(), options, bases, active, end_offset, frame_buffer: Vec::new() }))
    }

    /// The offset the next frame will start at; every offset below it is durable.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// Writes one frame holding `records` and makes it durable with one `fdatasync`.
    /// Returns the new end offset and how long the fdatasync took. On error the log must not be used again: a failed
    /// fsync leaves the page cache in an unknown state, and the process recovers from disk.
    pub fn append(&mut self, records: &[&[u8]]) -> Result<(u64, std::time::Duration), WalError> {
        self.frame_buffer.clear();
        frame::encode(records, &mut self.frame_buffer);
        let active_base = *self.bases.last().expect("active segment");
        if self.end_offset > active_base
            && self.end_offset - active_base + self.frame_buffer.len() as u64 > self.options.segment_bytes_max
        {
            self.roll()?;
        }
        let path = segment_path(&self.dir, *self.bases.last().expect("active segment"));
        self.active.write_all(&self.frame_buffer).map_err(WalError::io(&path))?;
        let sync_started = std::time::Instant::now();
        self.active.sync_data().map_err(WalError::io(&path))?;
        let sync = sync_started.elapsed();
        self.end_offset += self.frame_buffer.len() as u64;
        Ok((self.end_offset, sync))
    }

    fn roll(&mut self) -> Result<(), WalError> {
        let path = segment_path(&self.dir, self.end_offset);
        let file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(WalError::io(&path))?;
        sync_dir(&self.dir)?;
        self.active = file;
        self.bases.push(self.end_offset);
        Ok(())
    }

    /// Deletes every segment whose frames all lie below `offset` (a checkpoint). The
    /// active segment is never deleted. Returns how many were removed.
    pub fn remove_segments_before(&mut self, offset: u64) -> Result<usize, WalError> {
        let removable = self.bases.windows(2).take_while(|pair| pair[1] <= offset).count();
        for &base in &self.bases[..removable] {
            let path = segment_path(&self.dir, base);
            fs::remove_file(&path).map_err(WalError::io(&path))?;
        }
        if removable > 0 {
            self.bases.drain(..removable);
            sync_dir(&self.dir)?;
        }
        Ok(removable)
    }

    pub fn stats(&self) -> WalStats {
        WalStats { segments: self.bases.len() as u64, bytes: self.end_offset - self.bases[0] }
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(WalError::io(dir))? {
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

    #[test]
    fn appended_frames_replay_from_any_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions { segment_bytes_max: 64 };
        let (mut wal, replayed) = open(dir.path(), 0, options).unwrap();
        assert!(replayed.is_empty());
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
    fn removed_segments_are_gone_and_replay_still_works_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let options = WalOptions { segment_bytes_max: 64 };
        let (mut wal, _) = open(dir.path(), 0, options).unwrap();
        let mut ends = Vec::new();
        for i in 0..10u8 {
            ends.push(wal.append(&[&[i; 30]]).unwrap().0);
        }
        let before = wal.stats().segments;
        let removed = wal.remove_segments_before(ends[6]).unwrap();
        assert!(removed > 0);
        assert_eq!(wal.stats().segments, before - removed as u64);
        drop(wal);
        let (_, replayed) = open(dir.path(), ends[6], options).unwrap();
        assert_eq!(replayed.len(), 3);
        let err = open(dir.path(), 0, options).err().expect("offset 0 was deleted");
        assert!(matches!(err, WalError::Missing { .. }), "{err}");
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 0, WalOptions::default()).unwrap();
        let first = wal.append(&[b"kept"]).unwrap().0;
        wal.append(&[b"torn away"]).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let (mut wal, replayed) = open(dir.path(), 0, WalOptions::default()).unwrap();
        assert_eq!(replayed, vec![(first, vec![b"kept".to_vec()])]);
        assert_eq!(fs::metadata(&path).unwrap().len(), first);
        wal.append(&[b"after"]).unwrap();
        drop(wal);
        let (_, replayed) = open(dir.path(), 0, WalOptions::default()).unwrap();
        assert_eq!(replayed.len(), 2);
    }

    #[test]
    fn mid_log_damage_refuses_to_open_and_names_file_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 0, WalOptions::default()).unwrap();
        let first = wal.append(&[b"one"]).unwrap().0;
        wal.append(&[b"two"]).unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[first as usize + 20] ^= 0x40;
        bytes[5] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = open(dir.path(), 0, WalOptions::default()).err().expect("must refuse");
        let message = err.to_string();
        assert!(message.contains("00000000000000000000.wal") && message.contains("at byte 0"), "{message}");
    }

    /// Three segments of one frame each.
    fn three_segments(dir: &Path) -> (WalOptions, Vec<PathBuf>) {
        let options = WalOptions { segment_bytes_max: 40 };
        let (mut wal, _) = open(dir, 0, options).unwrap();
        for _ in 0..3 {
            wal.append(&[&[7; 20]]).unwrap();
        }
        drop(wal);
        let mut paths: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        assert_eq!(paths.len(), 3);
        (options, paths)
    }

    #[test]
    fn a_torn_segment_before_the_last_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (options, paths) = three_segments(dir.path());
        let len = fs::metadata(&paths[0]).unwrap().len();
        OpenOptions::new().write(true).open(&paths[0]).unwrap().set_len(len - 1).unwrap();
        assert!(matches!(open(dir.path(), 0, options), Err(WalError::Corrupt { .. })));
    }

    #[test]
    fn gap_between_segments_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (options, paths) = three_segments(dir.path());
        fs::remove_file(&paths[1]).unwrap();
        match open(dir.path(), 0, options) {
            Err(WalError::Corrupt { detail, .. }) => assert!(detail.contains("but the next begins at"), "{detail}"),
            other => panic!("a missing middle segment must be corruption, got {:?}", other.map(|_| ())),
        }
    }

    /// Writes three frames, then for every possible cut of the file: recovery keeps exactly
    /// the whole frames before the cut, truncates the rest, and accepts appends again.
    #[test]
    fn recovery_after_a_cut_at_every_byte_keeps_exactly_the_whole_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 0, WalOptions::default()).unwrap();
        let ends: Vec<u64> = [&b"alpha"[..], b"bravo-bravo", b"c"]
            .iter()
            .map(|r| wal.append(&[r, b"second record"]).unwrap().0)
            .collect();
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let full = fs::read(&path).unwrap();
        for cut in 0..=full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let (mut wal, replayed) = open(dir.path(), 0, WalOptions::default()).unwrap();
            let whole = ends.iter().take_while(|&&end| end as usize <= cut).count();
            assert_eq!(replayed.len(), whole, "cut at {cut}");
            let kept = if whole == 0 { 0 } else { ends[whole - 1] };
            assert_eq!(fs::metadata(&path).unwrap().len(), kept, "cut at {cut}: truncated to the last whole frame");
            assert_eq!(wal.append(&[b"after"]).unwrap().0, kept + frame_len(b"after"));
        }
    }

    fn frame_len(record: &[u8]) -> u64 {
        (crate::FRAME_HEADER_BYTES + 4 + record.len()) as u64
    }

    /// Every single flipped bit outside the last frame makes recovery refuse to start.
    #[test]
    fn a_flipped_bit_anywhere_before_the_last_frame_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(dir.path(), 0, WalOptions::default()).unwrap();
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
                assert!(
                    matches!(open(dir.path(), 0, WalOptions::default()), Err(WalError::Corrupt { .. })),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }
}
