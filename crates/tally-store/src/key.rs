//! Byte layouts of store keys and values, chosen so that byte order equals the order
//! queries scan in.
//!
//! ```text
//! bucket key   := u8 type_len | type | u16be video_len | video | i64be(bucket ^ sign bit)
//! bucket value := u64le count | i128le sum                       (tables counters.*)
//! uniques      := bucket key → distinct-viewer sketch            (tables uniques.*)
//! top key      := u8 type_len | type | i64be(bucket ^ sign bit) → top-items sketch (tables top.*)
//! videos key   := u8 type_len | type | i64be(day ^ sign bit) | video → empty  (tables videos.day.*)
//! video types  := u16be video_len | video | type → empty          (tables videotypes.day.*)
//! types        := type → i64le last day with events (table types)
//! checkpoint   := u64le offset | u32le n | n × i64le dedup generation start (oldest first)
//! dedup key    := u32be partition | i64be(generation_start ^ sign bit) | u64be checkpoint offset
//! ```
//!
//! The granularity and the period of a bucket name its table (see `tables`), so it is
//! not part of the key.
//!
//! Flipping the sign bit makes big-endian signed integers sort like the numbers they hold.

use tally_core::Counter;

const SIGN: u64 = 1 << 63;

pub(crate) fn ordered_i64(value: i64) -> [u8; 8] {
    ((value as u64) ^ SIGN).to_be_bytes()
}

pub(crate) fn from_ordered_i64(bytes: &[u8]) -> i64 {
    (u64::from_be_bytes(bytes.try_into().expect("8 bytes")) ^ SIGN) as i64
}

/// The key prefix shared by every bucket of one (type, video).
pub(crate) fn bucket_prefix(out: &mut Vec<u8>, event_type: &str, video_id: &str) {
    type_prefix(out, event_type);
    out.extend_from_slice(&u16::try_from(video_id.len()).expect("video id fits u16").to_be_bytes());
    out.extend_from_slice(video_id.as_bytes());
}

pub(crate) fn bucket_key(out: &mut Vec<u8>, event_type: &str, video_id: &str, bucket: i64) {
    bucket_prefix(out, event_type, video_id);
    out.extend_from_slice(&ordered_i64(bucket));
}

/// The key prefix of everything of one type in a time-first table (top, videos).
pub(crate) fn type_prefix(out: &mut Vec<u8>, event_type: &str) {
    out.clear();
    out.push(u8::try_from(event_type.len()).expect("type fits u8"));
    out.extend_from_slice(event_type.as_bytes());
}

pub(crate) fn top_key(out: &mut Vec<u8>, event_type: &str, bucket: i64) {
    type_prefix(out, event_type);
    out.extend_from_slice(&ordered_i64(bucket));
}

pub(crate) fn videos_key(out: &mut Vec<u8>, event_type: &str, day: i64, video_id: &str) {
    top_key(out, event_type, day);
    out.extend_from_slice(video_id.as_bytes());
}

/// The key prefix of one video's types in a `videotypes` table.
pub(crate) fn video_prefix(out: &mut Vec<u8>, video_id: &str) {
    out.clear();
    out.extend_from_slice(&u16::try_from(video_id.len()).expect("video id fits u16").to_be_bytes());
    out.extend_from_slice(video_id.as_bytes());
}

pub(crate) fn video_types_key(out: &mut Vec<u8>, video_id: &str, event_type: &str) {
    video_prefix(out, video_id);
    out.extend_from_slice(event_type.as_bytes());
}

pub(crate) fn encode_counter(counter: Counter) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&counter.count.to_le_bytes());
    out[8..].copy_from_slice(&counter.sum.to_le_bytes());
    out
}

pub(crate) fn decode_counter(bytes: &[u8]) -> Result<Counter, String> {
    let (count, sum) = bytes
        .split_first_chunk::<8>()
        .and_then(|(count, rest)| Some((count, <&[u8; 16]>::try_from(rest).ok()?)))
        .ok_or_else(|| format!("a bucket value is {} bytes, not 24", bytes.len()))?;
    Ok(Counter { count: u64::from_le_bytes(*count), sum: i128::from_le_bytes(*sum) })
}

pub(crate) fn dedup_key(partition: u32, generation_start_ms: i64, offset: u64) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&partition.to_be_bytes());
    out[4..12].copy_from_slice(&ordered_i64(generation_start_ms));
    out[12..].copy_from_slice(&offset.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_i64_sorts_like_numbers() {
        let values = [i64::MIN, -61, -1, 0, 1, 60, i64::MAX];
        for pair in values.windows(2) {
            assert!(ordered_i64(pair[0]) < ordered_i64(pair[1]));
            assert_eq!(from_ordered_i64(&ordered_i64(pair[0])), pair[0]);
        }
    }

    #[test]
    fn one_video_prefix_never_matches_another() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        bucket_prefix(&mut a, "view", "ab");
        bucket_prefix(&mut b, "view", "abc");
        assert!(!b.starts_with(&a));
    }
}
