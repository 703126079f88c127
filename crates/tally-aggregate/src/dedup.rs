//! Dedup memory: which event ids and idempotency keys a partition has seen recently.
//!
//! Two generations, each opened when a record's receive time passes the current one's
//! start plus the window: an entry lives in `current`, then in `previous`, then is dropped.
//! An entry is therefore remembered for at least one window and at most two. Memory per
//! entry: 16 bytes of hash plus hash-table overhead (about 1.15× at hashbrown's load
//! factor, and up to 2× right after a table grows): 18–36 bytes per event id, 26–52 per
//! idempotency key (key, fingerprint and outcome).
//!
//! Keys are 128-bit xxh3 hashes: the chance that two distinct ids collide (and an event is
//! wrongly counted as a duplicate) is below 1e-20 for ten billion live entries.

use hashbrown::{HashMap, HashSet};
use tally_core::RequestKey;
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

/// The dedup key of an event: its id is scoped to its video.
pub fn event_key(video_id: &str, event_id: &str) -> u128 {
    let mut bytes = Vec::with_capacity(video_id.len() + 1 + event_id.len());
    bytes.extend_from_slice(video_id.as_bytes());
    bytes.push(0xFF);
    bytes.extend_from_slice(event_id.as_bytes());
    xxh3_128(&bytes)
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

pub struct Dedup {
    window_ms: i64,
    current_start_ms: i64,
    previous_start_ms: i64,
    current: Generation,
    previous: Generation,
    /// Entries added to `current` since the last journal was taken; a rotation moves the
    /// pending bytes into `sealed` under the generation they belong to.
    journal: Vec<u8>,
    sealed: Vec<(i64, Vec<u8>)>,
}

impl Dedup {
    pub fn new(window_ms: i64) -> Dedup {
        Dedup::restore(window_ms, i64::MIN, i64::MIN, &[], &[])
    }

    /// Rebuilds the memory from a checkpoint: its two generation starts and the journal
    /// blobs stored for each.
    pub fn restore(
        window_ms: i64,
        current_start_ms: i64,
        previous_start_ms: i64,
        current: &[&[u8]],
        previous: &[&[u8]],
    ) -> Dedup {
        assert!(window_ms > 0, "dedup window must be positive");
        let mut dedup = Dedup {
            window_ms,
            current_start_ms,
            previous_start_ms,
            current: Generation::default(),
            previous: Generation::default(),
            journal: Vec::new(),
            sealed: Vec::new(),
        };
        for blob in current {
            decode_into(blob, &mut dedup.current);
        }
        for blob in previous {
            decode_into(blob, &mut dedup.previous);
        }
        dedup
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// (current, previous) generation starts, to store with a checkpoint.
    pub fn generation_starts(&self) -> (i64, i64) {
        (self.current_start_ms, self.previous_start_ms)
    }

    /// Entries held over both generations.
    pub fn entries(&self) -> usize {
        self.current.entries() + self.previous.entries()
    }

    /// Moves time forward to `receive_ms`, rotating generations when the window has passed.
    pub fn advance(&mut self, receive_ms: i64) {
        if self.current_start_ms != i64::MIN && receive_ms < self.current_start_ms.saturating_add(self.window_ms) {
            return;
        }
        self.seal();
        if self.current_start_ms != i64::MIN && receive_ms < self.current_start_ms.saturating_add(2 * self.window_ms) {
            self.previous = std::mem::take(&mut self.current);
            self.previous_start_ms = self.current_start_ms;
        } else {
            self.previous = Generation::default();
            self.current = Generation::default();
            self.previous_start_ms = i64::MIN;
        }
        self.current_start_ms = receive_ms;
    }

    fn seal(&mut self) {
        if !self.journal.is_empty() {
            self.sealed.push((self.current_start_ms, std::mem::take(&mut self.journal)));
        }
    }

    /// The outcome a request key had here, and the fingerprint of the body it came with.
    pub fn request_outcome(&self, key: u128) -> Option<(Outcome, u64)> {
        self.current.requests.get(&key).or_else(|| self.previous.requests.get(&key)).copied()
    }

    pub fn insert_request(&mut self, request: RequestKey, outcome: Outcome) {
        self.current.requests.insert(request.key, (outcome, request.fingerprint));
        self.journal.push(ENTRY_REQUEST);
        self.journal.extend_from_slice(&request.key.to_le_bytes());
        self.journal.extend_from_slice(&request.fingerprint.to_le_bytes());
        self.journal.extend_from_slice(&outcome.accepted.to_le_bytes());
        self.journal.extend_from_slice(&outcome.duplicates.to_le_bytes());
    }

    /// Records an event key; false if it was already there (a duplicate).
    pub fn insert_event(&mut self, key: u128) -> bool {
        if self.previous.events.contains(&key) || !self.current.events.insert(key) {
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

    #[test]
    fn journal_restores_the_same_memory() {
        let window = 1_000;
        let mut live = Dedup::new(window);
        live.advance(0);
        live.insert_event(1);
        live.insert_request(RequestKey { key: 2, fingerprint: 8 }, Outcome { accepted: 3, duplicates: 4 });
        live.advance(1_500);
        live.insert_event(5);
        let journal = live.take_journal();
        let (current, previous) = live.generation_starts();
        let blobs_of = |start: i64| -> Vec<&[u8]> {
            journal.blobs.iter().filter(|(s, _)| *s == start).map(|(_, b)| b.as_slice()).collect()
        };
        let mut restored = Dedup::restore(window, current, previous, &blobs_of(current), &blobs_of(previous));
        assert_eq!(restored.entries(), 3);
        assert!(!restored.insert_event(1));
        assert!(!restored.insert_event(5));
        assert_eq!(restored.request_outcome(2), Some((Outcome { accepted: 3, duplicates: 4 }, 8)));
        assert_eq!(restored.generation_starts(), live.generation_starts());
    }
}
