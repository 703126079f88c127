//! Dedup memory: which event ids and idempotency keys a partition has seen recently.
//!
//! Entries are kept in generations, each covering a slice of a quarter window of receive
//! time: a record whose receive time passes the newest generation's start plus a slice
//! opens a new one, and a generation is dropped once the generation after it started a
//! whole window ago. An entry is therefore remembered for at least one window and at most
//! about a window and a quarter, so memory peaks at 1.25 windows of entries (two generations
//! of a window each would peak at 2). Memory per entry: 16 bytes of hash plus hash-table
//! overhead (about 1.15× at hashbrown's load factor, up to 2× right after a table grows):
//! 18–36 bytes per event id, 34–68 per idempotency key (key, fingerprint and outcome).
//!
//! Keys are 128-bit xxh3 hashes: the chance that two distinct ids collide (and an event is
//! wrongly counted as a duplicate) is below 1e-20 for ten billion live entries.

use std::collections::VecDeque;

use hashbrown::{HashMap, HashSet};
use tally_core::RequestKey;
use tally_core::event::{EVENT_ID_BYTES_MAX, VIDEO_ID_BYTES_MAX};
use xxhash_rust::xxh3::xxh3_128;

/// What a request, or its part in one partition, did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: u32,
    pub duplicates: u32,
}

impl Outcome {
    pub fn add(&mut self, other: Outcome) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
    }
}

/// The dedup key of an event: its id is scoped to its video. Stored in the dedup journal,
/// so the bytes hashed must never change: `video_id | 0xFF | event_id`.
pub fn event_key(video_id: &str, event_id: &str) -> u128 {
    // On the stack for every valid event (this runs once per event with an id).
    const STACK_BYTES: usize = VIDEO_ID_BYTES_MAX + 1 + EVENT_ID_BYTES_MAX;
    let len = video_id.len() + 1 + event_id.len();
    let mut stack = [0u8; STACK_BYTES];
    let mut heap = Vec::new();
    let bytes = if len <= STACK_BYTES {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap[..]
    };
    bytes[..video_id.len()].copy_from_slice(video_id.as_bytes());
    bytes[video_id.len()] = 0xFF;
    bytes[video_id.len() + 1..].copy_from_slice(event_id.as_bytes());
    xxh3_128(bytes)
}

/// The dedup key of an idempotency key header value.
pub fn request_key(idempotency_key: &str) -> u128 {
    xxh3_128(idempotency_key.as_bytes())
}

#[derive(Default)]
struct Generation {
    events: HashSet<u128>,
    requests: HashMap<u128, (Outcome, u64)>,
}

impl Generation {
    fn entries(&self) -> usize {
        self.events.len() + self.requests.len()
    }
}

/// Entries added since the last `take_journal`, for persisting with a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupJournal {
    /// Generation start (receive time, ms) → encoded entries added to that generation.
    pub blobs: Vec<(i64, Vec<u8>)>,
}

const ENTRY_EVENT: u8 = 1;
const ENTRY_REQUEST: u8 = 2;

/// Generations per window: each covers a quarter window of receive time.
const SLICES_PER_WINDOW: i64 = 4;

pub struct Dedup {
    window_ms: i64,
    slice_ms: i64,
    /// Oldest first; the last one receives new entries. At most about
    /// `SLICES_PER_WINDOW + 2` are alive at once.
    generations: VecDeque<(i64, Generation)>,
    /// Entries added to the newest generation since the last journal was taken; opening a
    /// generation moves them into `sealed` under the generation they belong to.
    journal: Vec<u8>,
    sealed: Vec<(i64, Vec<u8>)>,
}

impl Dedup {
    pub fn new(window_ms: i64) -> Dedup {
        Dedup::restore(window_ms, &[])
    }

    /// Rebuilds the memory from a checkpoint: the live generations' starts (oldest first)
    /// and, for each, the journal blobs stored for it.
    pub fn restore(window_ms: i64, generations: &[(i64, Vec<&[u8]>)]) -> Dedup {
        assert!(window_ms >= SLICES_PER_WINDOW, "dedup window must be at least {SLICES_PER_WINDOW} ms");
        let mut dedup = Dedup {
            window_ms,
            slice_ms: window_ms / SLICES_PER_WINDOW,
            generations: VecDeque::new(),
            journal: Vec::new(),
            sealed: Vec::new(),
        };
        for (start, blobs) in generations {
            let mut generation = Generation::default();
            for blob in blobs {
                decode_into(blob, &mut generation);
            }
            dedup.generations.push_back((*start, generation));
        }
        dedup
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Starts (receive time, ms) of the live generations, oldest first, to store with a
    /// checkpoint.
    pub fn generation_starts(&self) -> Vec<i64> {
        self.generations.iter().map(|(start, _)| *start).collect()
    }

    /// Entries held over all generations.
    pub fn entries(&self) -> usize {
        self.generations.iter().map(|(_, g)| g.entries()).sum()
    }

    /// Moves time forward to `receive_ms`: opens a new generation when the newest is a
    /// slice old, and drops every generation whose successor started a window ago.
    pub fn advance(&mut self, receive_ms: i64) {
        if let Some((start, _)) = self.generations.back()
            && receive_ms < start.saturating_add(self.slice_ms)
        {
            return;
        }
        self.seal();
        self.generations.push_back((receive_ms, Generation::default()));
        while self.generations.len() >= 2 && self.generations[1].0.saturating_add(self.window_ms) <= receive_ms {
            self.generations.pop_front();
        }
    }

    fn seal(&mut self) {
        if !self.journal.is_empty() {
            let start = self.generations.back().expect("entries were added to a generation").0;
            self.sealed.push((start, std::mem::take(&mut self.journal)));
        }
    }

    fn newest(&mut self) -> &mut Generation {
        &mut self.generations.back_mut().expect("advance opens a generation before anything is added").1
    }

    /// The outcome a request key had here, and the fingerprint of the body it came with.
    pub fn request_outcome(&self, key: u128) -> Option<(Outcome, u64)> {
        self.generations.iter().rev().find_map(|(_, g)| g.requests.get(&key)).copied()
    }

    pub fn insert_request(&mut self, request: RequestKey, outcome: Outcome) {
        self.newest().requests.insert(request.key, (outcome, request.fingerprint));
        self.journal.push(ENTRY_REQUEST);
        self.journal.extend_from_slice(&request.key.to_le_bytes());
        self.journal.extend_from_slice(&request.fingerprint.to_le_bytes());
        self.journal.extend_from_slice(&outcome.accepted.to_le_bytes());
        self.journal.extend_from_slice(&outcome.duplicates.to_le_bytes());
    }

    /// Records an event key; false if it was already there (a duplicate).
    pub fn insert_event(&mut self, key: u128) -> bool {
        let older = self.generations.len().saturating_sub(1);
        if self.generations.iter().take(older).any(|(_, g)| g.events.contains(&key))
            || !self.newest().events.insert(key)
        {
            return false;
        }
        self.journal.push(ENTRY_EVENT);
        self.journal.extend_from_slice(&key.to_le_bytes());
        true
    }

    /// Takes the entries added since the last call, grouped by generation start.
    pub fn take_journal(&mut self) -> DedupJournal {
        self.seal();
        DedupJournal { blobs: std::mem::take(&mut self.sealed) }
    }
}

fn decode_into(mut blob: &[u8], generation: &mut Generation) {
    while let Some((&kind, rest)) = blob.split_first() {
        let key = u128::from_le_bytes(rest[..16].try_into().expect("dedup journal entry cut short"));
        match kind {
            ENTRY_EVENT => {
                generation.events.insert(key);
                blob = &rest[16..];
            }
            ENTRY_REQUEST => {
                let fingerprint = u64::from_le_bytes(rest[16..24].try_into().expect("8 bytes"));
                let accepted = u32::from_le_bytes(rest[24..28].try_into().expect("4 bytes"));
                let duplicates = u32::from_le_bytes(rest[28..32].try_into().expect("4 bytes"));
                generation.requests.insert(key, (Outcome { accepted, duplicates }, fingerprint));
                blob = &rest[32..];
            }
            other => panic!("dedup journal holds unknown entry kind {other}: the store is corrupt"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Event keys are stored: the bytes hashed are `video | 0xFF | id`, on the stack or not.
    #[test]
    fn event_keys_hash_video_separator_and_id() {
        assert_eq!(event_key("v1", "e-9"), xxh3_128(b"v1\xFFe-9"));
        let (long_video, long_id) = ("v".repeat(VIDEO_ID_BYTES_MAX + 5), "e".repeat(EVENT_ID_BYTES_MAX));
        let expected = xxh3_128(&[long_video.as_bytes(), &[0xFF], long_id.as_bytes()].concat());
        assert_eq!(event_key(&long_video, &long_id), expected);
    }

    fn restored_from(live: &mut Dedup) -> Dedup {
        let journal = live.take_journal();
        let generations: Vec<(i64, Vec<&[u8]>)> = live
            .generation_starts()
            .into_iter()
            .map(|start| {
                (start, journal.blobs.iter().filter(|(s, _)| *s == start).map(|(_, b)| b.as_slice()).collect())
            })
            .collect();
        Dedup::restore(live.window_ms(), &generations)
    }

    #[test]
    fn journal_restores_the_same_memory() {
        let window = 1_000;
        let mut live = Dedup::new(window);
        live.advance(0);
        live.insert_event(1);
        live.insert_request(RequestKey { key: 2, fingerprint: 8 }, Outcome { accepted: 3, duplicates: 4 });
        live.advance(300);
        live.insert_event(5);
        live.advance(700);
        let mut restored = restored_from(&mut live);
        assert_eq!(restored.entries(), 3);
        assert_eq!(restored.generation_starts(), live.generation_starts());
        assert!(!restored.insert_event(1));
        assert!(!restored.insert_event(5));
        assert_eq!(restored.request_outcome(2), Some((Outcome { accepted: 3, duplicates: 4 }, 8)));
    }

    #[test]
    fn entries_live_at_least_one_window_and_at_most_a_window_and_two_slices() {
        let window = 1_000;
        let slice = window / SLICES_PER_WINDOW;
        for inserted_at in [0, 1, slice - 1, slice, 3 * slice + 7] {
            let mut dedup = Dedup::new(window);
            dedup.advance(0);
            dedup.advance(inserted_at);
            assert!(dedup.insert_event(42));
            // Time moves on in small steps; the entry must survive a whole window…
            let mut now = inserted_at;
            while now + 10 < inserted_at + window {
                now += 10;
                dedup.advance(now);
                assert!(!dedup.insert_event(42), "forgotten at {now}, inserted at {inserted_at}");
            }
            // …and be gone soon after.
            while now < inserted_at + window + 2 * slice {
                now += 10;
                dedup.advance(now);
            }
            assert!(dedup.insert_event(42), "still remembered at {now}, inserted at {inserted_at}");
            assert!(dedup.generation_starts().len() <= SLICES_PER_WINDOW as usize + 2);
        }
    }
}
