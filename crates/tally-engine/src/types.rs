//! The distinct event types the engine counts, bounded: a request bringing a type beyond
//! `event_types_max` is refused at admission. Every type costs a row in the type list, a
//! top-items sketch per bucket, and a line in `/v1/stats`; unbounded, one client could make
//! every type-wide operation slow for everyone.

use std::collections::HashSet;

use parking_lot::RwLock;
use tally_core::EventRef;

use crate::EngineError;

pub(crate) struct EventTypes {
    known: RwLock<HashSet<Box<str>>>,
    max: usize,
}

impl EventTypes {
    pub(crate) fn new(known: impl IntoIterator<Item = String>, max: usize) -> EventTypes {
        EventTypes { known: RwLock::new(known.into_iter().map(String::into_boxed_str).collect()), max }
    }

    /// Admits the types of `events`, all or nothing: the new ones are learned only if all
    /// of them fit. Events of one request mostly share a type, so each run of one type is
    /// looked up once.
    pub(crate) fn admit(&self, events: &[EventRef<'_>]) -> Result<(), EngineError> {
        let mut new: Vec<&str> = Vec::new();
        let mut previous = None;
        {
            let known = self.known.read();
            for event in events {
                if previous == Some(event.event_type) {
                    continue;
                }
                previous = Some(event.event_type);
                if !known.contains(event.event_type) {
                    new.push(event.event_type);
                }
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        new.sort_unstable();
        new.dedup();
        let mut known = self.known.write();
        new.retain(|event_type| !known.contains(*event_type));
        let room = self.max.saturating_sub(known.len());
        if let Some(beyond) = new.get(room) {
            metrics::counter!("tally_event_types_refused_total").increment(1);
            return Err(EngineError::TooManyTypes { event_type: (*beyond).to_owned(), max: self.max });
        }
        known.extend(new.into_iter().map(Box::from));
        Ok(())
    }

    /// Replaces the known types (after retention dropped some).
    pub(crate) fn reset(&self, known: impl IntoIterator<Item = String>) {
        *self.known.write() = known.into_iter().map(String::into_boxed_str).collect();
    }

    pub(crate) fn count(&self) -> usize {
        self.known.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str) -> EventRef<'_> {
        EventRef { video_id: "v", event_type, ts_ms: 0, value: 0, event_id: None, viewer_id: None }
    }

    #[test]
    fn types_past_the_limit_are_refused_and_known_ones_always_pass() {
        let types = EventTypes::new(["view".to_string()], 2);
        types.admit(&[event("view"), event("like"), event("view")]).unwrap();
        assert_eq!(types.count(), 2);
        let refused = types.admit(&[event("like"), event("share")]).unwrap_err();
        assert!(matches!(refused, EngineError::TooManyTypes { ref event_type, max: 2 } if event_type == "share"));
        let types = EventTypes::new(["view".to_string()], 3);
        assert!(types.admit(&[event("a"), event("b"), event("c")]).is_err());
        assert_eq!(types.count(), 1, "all or nothing: a refused request adds no type");
        types.admit(&[event("a"), event("b")]).unwrap();
        assert!(types.admit(&[event("c")]).is_err());
        types.reset(["view".to_string()]);
        types.admit(&[event("share")]).unwrap();
    }
}
