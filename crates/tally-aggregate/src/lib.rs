//! The state machine of one partition: applying a log record to it updates the in-memory
//! counter deltas and the dedup memory, and yields the request's outcome.
//!
//! Architecture invariant: applying the same records in the same order to the same
//! starting state always gives the same state and the same outcomes. Nothing here reads a
//! clock: dedup expiry follows the receive time stamped in each record. This is what makes
//! recovery (replaying the log after a checkpoint) reach exactly the state the crashed
//! process had, so an event acknowledged as counted is counted once, never zero or twice.

pub mod dedup;
pub mod deltas;
mod rollup;

pub use dedup::{Dedup, DedupJournal, Outcome};
pub use deltas::{Deltas, MinuteCell};
pub use rollup::rollup;
pub use tally_core::Counter;

use tally_core::bucket::minute_of;
use tally_core::{RecordError, RecordReader};

/// Deltas plus dedup memory of one partition.
pub struct PartitionState {
    pub deltas: Deltas,
    pub dedup: Dedup,
}

impl PartitionState {
    pub fn new(dedup: Dedup) -> PartitionState {
        PartitionState { deltas: Deltas::default(), dedup }
    }

    /// Applies one record. A request whose idempotency key was already applied counts
    /// nothing: with the same body fingerprint it answers what it answered the first time,
    /// with another it is `KeyReused`. An event whose id was already seen for its video
    /// counts as a duplicate.
    pub fn apply(&mut self, record: &RecordReader<'_>) -> Result<Applied, RecordError> {
        self.apply_noting(record, &mut |_| {})
    }

    /// `apply`, telling `uncounted` the index (within the record) of each event it did not
    /// count: a duplicate, or every event of a repeated or reused request key. What the
    /// raw-event archive leaves out.
    pub fn apply_noting(
        &mut self,
        record: &RecordReader<'_>,
        uncounted: &mut dyn FnMut(u32),
    ) -> Result<Applied, RecordError> {
        self.dedup.advance(record.receive_ms);
        if let Some(request) = record.request_key
            && let Some((first, fingerprint)) = self.dedup.request_outcome(request.key)
        {
            let mut index = 0;
            record.for_each_event(|_| {
                uncounted(index);
                index += 1;
            })?;
            return Ok(if fingerprint == request.fingerprint { Applied::Repeated(first) } else { Applied::KeyReused });
        }
        let mut outcome = Outcome::default();
        let Self { deltas, dedup } = self;
        let mut index = 0;
        record.for_each_event(|event| {
            let at = index;
            index += 1;
            if let Some(event_id) = event.event_id
                && !dedup.insert_event(dedup::event_key(event.video_id, event_id))
            {
                outcome.duplicates += 1;
                uncounted(at);
                return;
            }
            outcome.accepted += 1;
            deltas.add(event.event_type, event.video_id, minute_of(event.ts_ms), event.value, event.viewer_id);
        })?;
        if let Some(request) = record.request_key {
            self.dedup.insert_request(request, outcome);
        }
        Ok(Applied::Done(outcome))
    }
}

/// What applying a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Counted now.
    Done(Outcome),
    /// The idempotency key was already applied with the same body: nothing counted now;
    /// the outcome is the first one.
    Repeated(Outcome),
    /// The idempotency key was already used with a different body: nothing counted.
    KeyReused,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{EventRef, RecordWriter, RequestKey};

    fn record(receive_ms: i64, key: Option<u128>, events: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut writer = RecordWriter::new(receive_ms, key.map(|key| RequestKey { key, fingerprint: 0 }), 0);
        for (video_id, event_id) in events {
            writer.push(&EventRef {
                video_id,
                event_type: "view",
                ts_ms: receive_ms,
                value: 5,
                event_id: *event_id,
                viewer_id: None,
            });
        }
        writer.finish()
    }

    fn apply(state: &mut PartitionState, bytes: &[u8]) -> Outcome {
        match state.apply(&RecordReader::new(bytes).unwrap()).unwrap() {
            Applied::Done(outcome) | Applied::Repeated(outcome) => outcome,
            Applied::KeyReused => panic!("key reused"),
        }
    }

    fn count(state: &PartitionState, video: &str) -> u64 {
        state.deltas.get("view", video).iter().map(|c| c.counter.count).sum()
    }

    #[test]
    fn repeated_idempotency_key_answers_like_the_first_and_counts_nothing() {
        let mut state = PartitionState::new(Dedup::new(600_000));
        let bytes = record(1_000, Some(42), &[("a", Some("e1")), ("a", Some("e1")), ("b", None)]);
        let first = apply(&mut state, &bytes);
        assert_eq!(first, Outcome { accepted: 2, duplicates: 1 });
        assert_eq!(apply(&mut state, &bytes), first);
        assert_eq!(count(&state, "a"), 1);
        assert_eq!(count(&state, "b"), 1);
    }

    #[test]
    fn the_events_not_counted_are_named_by_their_index() {
        let mut state = PartitionState::new(Dedup::new(600_000));
        let bytes = record(1_000, Some(9), &[("a", Some("e1")), ("b", None), ("a", Some("e1")), ("a", Some("e2"))]);
        let reader = RecordReader::new(&bytes).unwrap();
        let mut uncounted = Vec::new();
        state.apply_noting(&reader, &mut |index| uncounted.push(index)).unwrap();
        assert_eq!(uncounted, [2], "the repeated event id");
        uncounted.clear();
        state.apply_noting(&reader, &mut |index| uncounted.push(index)).unwrap();
        assert_eq!(uncounted, [0, 1, 2, 3], "a repeated request counts none of its events");
    }

    #[test]
    fn a_key_reused_for_another_body_counts_nothing() {
        let mut state = PartitionState::new(Dedup::new(600_000));
        let mut writer = RecordWriter::new(0, Some(RequestKey { key: 7, fingerprint: 1 }), 0);
        writer.push(&EventRef {
            video_id: "a",
            event_type: "view",
            ts_ms: 0,
            value: 0,
            event_id: None,
            viewer_id: None,
        });
        let first = writer.finish();
        let mut writer = RecordWriter::new(0, Some(RequestKey { key: 7, fingerprint: 2 }), 0);
        writer.push(&EventRef {
            video_id: "b",
            event_type: "view",
            ts_ms: 0,
            value: 0,
            event_id: None,
            viewer_id: None,
        });
        let second = writer.finish();
        apply(&mut state, &first);
        assert_eq!(state.apply(&RecordReader::new(&second).unwrap()).unwrap(), Applied::KeyReused);
        assert_eq!(count(&state, "b"), 0);
    }

    #[test]
    fn event_ids_are_scoped_to_their_video() {
        let mut state = PartitionState::new(Dedup::new(600_000));
        let outcome = apply(&mut state, &record(0, None, &[("a", Some("x")), ("b", Some("x"))]));
        assert_eq!(outcome, Outcome { accepted: 2, duplicates: 0 });
    }

    #[test]
    fn dedup_remembers_at_least_one_window_then_forgets() {
        let window = 600_000;
        let mut state = PartitionState::new(Dedup::new(window));
        apply(&mut state, &record(0, None, &[("a", Some("x"))]));
        let again = apply(&mut state, &record(window - 1, None, &[("a", Some("x"))]));
        assert_eq!(again.duplicates, 1, "still inside the window");
        let much_later = apply(&mut state, &record(2 * window + 1, None, &[("a", Some("x"))]));
        assert_eq!(much_later.accepted, 1, "forgotten after two windows");
    }
}
