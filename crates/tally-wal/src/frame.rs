//! One frame: encoding, and the scan that tells a valid frame, a torn tail and corruption
//! apart.

/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Largest payload a frame may carry, bytes. Bigger than any group the engine builds
/// (bounded by its group and body limits), small enough that a reader never allocates
/// absurd amounts on a header that passed its checksum by accident.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 256 << 20;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TLWF");

/// Appends one frame holding `records` to `out`.
pub(crate) fn encode(records: &[&[u8]], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    tally_core::record::encode_list(records, out);
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    assert!(payload_len <= FRAME_PAYLOAD_BYTES_MAX, "frame payload of {payload_len} bytes over the maximum");
    let payload_crc = crc32c::crc32c(&out[start + FRAME_HEADER_BYTES..]);
    let header = &mut out[start..start + FRAME_HEADER_BYTES];
    header[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    header[8..12].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&header[0..12]);
    header[12..16].copy_from_slice(&header_crc.to_le_bytes());
}

/// What is found at a position of a segment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan<'a> {
    /// A whole, checksummed frame; the next one starts at `next`.
    Frame { payload: &'a [u8], next: usize },
    /// Clean end of the data.
    End,
    /// The remains of a write that never completed: truncate here.
    TornTail { reason: &'static str },
    /// Damage to data that was once complete.
    Corrupt { detail: String },
}

/// Reads the frame at `at`. Only the last segment may have a torn tail; in an earlier
/// segment every anomaly is corruption.
///
/// The writer makes each frame durable before it writes the next, so at most one frame,
/// the last, can be torn. In the last segment an anomaly is therefore a torn tail when no
/// valid frame follows it: fewer bytes than a header; only zero bytes; a valid header whose
/// payload runs past the end of the file; a damaged header (say, its page lost) with no
/// valid header anywhere after it; or a valid header whose payload fails its checksum with
/// no valid header after the frame's end. Anything else is corruption of data that had been
/// made durable, and recovery refuses to guess.
pub(crate) fn scan(bytes: &[u8], at: usize, is_last_segment: bool) -> Scan<'_> {
    let rest = &bytes[at..];
    if rest.is_empty() {
        return Scan::End;
    }
    let torn = |reason| {
        if is_last_segment {
            Scan::TornTail { reason }
        } else {
            Scan::Corrupt { detail: format!("{reason} in a segment that is not the last") }
        }
    };
    // Segments are preallocated: after the last frame they hold zeros.
    if rest.iter().all(|&b| b == 0) {
        return Scan::End;
    }
    if rest.len() < FRAME_HEADER_BYTES {
        return torn("partial frame header");
    }
    let Some(payload_len) = header_payload_len(&rest[..FRAME_HEADER_BYTES]) else {
        return if is_last_segment && valid_header_from(bytes, at + 1).is_none() {
            Scan::TornTail { reason: "damaged last frame header" }
        } else {
            Scan::Corrupt { detail: "frame header fails its checksum".into() }
        };
    };
    if payload_len > FRAME_PAYLOAD_BYTES_MAX {
        return Scan::Corrupt { detail: format!("frame length {payload_len} over the maximum") };
    }
    let end = FRAME_HEADER_BYTES + payload_len;
    if end > rest.len() {
        return torn("frame runs past the end of the file");
    }
    let payload = &rest[FRAME_HEADER_BYTES..end];
    let payload_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
    if crc32c::crc32c(payload) != payload_crc {
        return if is_last_segment && valid_header_from(bytes, at + end).is_none() {
            Scan::TornTail { reason: "last frame fails its checksum" }
        } else {
            Scan::Corrupt { detail: "frame payload fails its checksum".into() }
        };
    }
    Scan::Frame { payload, next: at + end }
}

/// How many bytes from `at` a scan needs to tell what is there when `bytes` may hold only
/// the start of the data: a header, then the whole frame it declares; at a run of zeros,
/// all the rest (`usize::MAX`: only the rest of the data tells an end from damage); a
/// damaged header is told with what is there.
pub(crate) fn wanted(bytes: &[u8], at: usize) -> usize {
    let rest = &bytes[at..];
    if rest.len() < FRAME_HEADER_BYTES {
        return FRAME_HEADER_BYTES;
    }
    match header_payload_len(&rest[..FRAME_HEADER_BYTES]) {
        Some(payload_len) if payload_len <= FRAME_PAYLOAD_BYTES_MAX => FRAME_HEADER_BYTES + payload_len,
        _ if rest.iter().all(|&b| b == 0) => usize::MAX,
        _ => rest.len(),
    }
}

/// The payload length a header declares, if the header is intact.
fn header_payload_len(header: &[u8]) -> Option<usize> {
    let field = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    (field(0) == FRAME_MAGIC && crc32c::crc32c(&header[0..12]) == field(12)).then(|| field(4) as usize)
}

/// The first position at or after `from` holding an intact frame header.
fn valid_header_from(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = FRAME_MAGIC.to_le_bytes();
    (from..bytes.len().saturating_sub(FRAME_HEADER_BYTES - 1))
        .find(|&i| bytes[i..i + 4] == magic && header_payload_len(&bytes[i..i + FRAME_HEADER_BYTES]).is_some())
}

/// The records of one frame payload (a record list). `Err` means a checksummed frame
/// holds malformed framing: a bug, not disk damage.
pub type FrameRecords<'a> = tally_core::record::ListRecords<'a>;

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(groups: &[&[&[u8]]]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for group in groups {
            encode(group, &mut out);
            ends.push(out.len());
        }
        (out, ends)
    }

    fn scan_all(bytes: &[u8], is_last: bool) -> (Vec<Vec<Vec<u8>>>, Scan<'_>) {
        let mut at = 0;
        let mut found = Vec::new();
        loop {
            match scan(bytes, at, is_last) {
                Scan::Frame { payload, next } => {
                    found.push(FrameRecords::new(payload).map(|r| r.unwrap().to_vec()).collect());
                    at = next;
                }
                other => return (found, other),
            }
        }
    }

    #[test]
    fn frames_round_trip() {
        let (bytes, _) = frames(&[&[b"a", b"bc"], &[], &[b"def"]]);
        let (found, end) = scan_all(&bytes, true);
        assert_eq!(end, Scan::End);
        assert_eq!(found, vec![vec![b"a".to_vec(), b"bc".to_vec()], vec![], vec![b"def".to_vec()]]);
    }

    #[test]
    fn torn_tail_at_every_byte_keeps_exactly_the_whole_frames() {
        let (bytes, ends) = frames(&[&[b"first"], &[b"second", b"x"], &[b"third record"]]);
        for cut in 0..=bytes.len() {
            let (found, end) = scan_all(&bytes[..cut], true);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(found.len(), whole, "cut at {cut}");
            let clean = cut == 0 || ends.contains(&cut);
            assert!(matches!(end, Scan::End) == clean, "cut at {cut}: {end:?}");
            assert!(matches!(end, Scan::End | Scan::TornTail { .. }), "cut at {cut}: {end:?}");
        }
    }

    #[test]
    fn torn_tail_in_an_earlier_segment_is_corruption() {
        let (bytes, _) = frames(&[&[b"first"], &[b"second"]]);
        let (_, end) = scan_all(&bytes[..bytes.len() - 1], false);
        assert!(matches!(end, Scan::Corrupt { .. }), "{end:?}");
    }

    #[test]
    fn zero_filled_tail_is_the_end_of_the_frames() {
        let (mut bytes, _) = frames(&[&[b"first"]]);
        bytes.extend_from_slice(&[0; 4096]);
        for is_last in [true, false] {
            let (found, end) = scan_all(&bytes, is_last);
            assert_eq!(found.len(), 1);
            assert_eq!(end, Scan::End);
        }
    }

    #[test]
    fn lost_header_page_of_the_last_frame_is_torn_but_of_an_earlier_frame_is_corruption() {
        let (bytes, ends) = frames(&[&[b"first"], &[b"second"], &[&[7u8; 64]]]);
        let mut last_header_lost = bytes.clone();
        last_header_lost[ends[1]..ends[1] + FRAME_HEADER_BYTES].fill(0);
        let (found, end) = scan_all(&last_header_lost, true);
        assert_eq!(found.len(), 2);
        assert!(matches!(end, Scan::TornTail { .. }), "{end:?}");
        let mut middle_header_lost = bytes.clone();
        middle_header_lost[ends[0]..ends[0] + FRAME_HEADER_BYTES].fill(0);
        let (found, end) = scan_all(&middle_header_lost, true);
        assert_eq!(found.len(), 1);
        assert!(matches!(end, Scan::Corrupt { .. }), "{end:?}");
    }

    #[test]
    fn every_flipped_bit_before_the_last_frame_is_corruption() {
        let (bytes, ends) = frames(&[&[b"first"], &[b"second", b"x"], &[b"third"]]);
        let last_frame_start = ends[1];
        for byte in 0..last_frame_start {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[byte] ^= 1 << bit;
                let (_, end) = scan_all(&damaged, true);
                assert!(matches!(end, Scan::Corrupt { .. }), "byte {byte} bit {bit}: {end:?}");
            }
        }
    }
}
