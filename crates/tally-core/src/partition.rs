//! Which partition owns a video: a stable hash, identical across processes, versions and
//! machines, because the answer decides which log a video's events live in.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Fixed forever: changing it would move videos between partitions of an existing log.
const PARTITION_HASH_SEED: u64 = 0x7a11_7a11;

/// The partition of `video_id` among `partitions` partitions.
pub fn partition_of(video_id: &str, partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    // Lemire's multiply-shift reduction: uniform, and cheaper than `%`.
    let hash = xxh3_64_with_seed(video_id.as_bytes(), PARTITION_HASH_SEED);
    ((u128::from(hash >> 32) * u128::from(partitions)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_across_releases() {
        // Pinned values: if this test fails, existing data directories would be misread.
        let got: Vec<u32> = ["v1", "v2", "v3", "v4", "dQw4w9WgXcQ", "video-1000", "é", ""]
            .iter()
            .map(|v| partition_of(v, 16))
            .collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [u32; 8] = [14, 14, 12, 2, 14, 11, 0, 12];

    #[test]
    fn partitions_are_roughly_balanced() {
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            counts[partition_of(&format!("video-{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }
}
