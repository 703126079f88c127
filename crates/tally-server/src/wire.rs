//! Events as they arrive on the wire (JSON objects), decoded leniently and checked as they
//! are decoded: every problem of every field is counted against its event instead of
//! aborting the whole body, so a 400 can name each bad event and field, in order. Strict where leniency would be ambiguous: a field
//! given twice is a problem, not "last one wins".
//!
//! Memory stays proportional to the events, not to the problems: every problem is counted
//! but only the first `shown_max` are kept, and a body is refused as soon as it holds one
//! event more than allowed, before the rest is decoded.
//!
//! Each problem carries the error code of its kind (`unknown_field`, `missing_field`,
//! `duplicate_field`, `invalid_field`): the codes a single field's mistake gets on every
//! other route. `JsonObject` reads other JSON bodies just as strictly, field by field.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use tally_core::event::EVENT_TYPE_DEFAULT;
use tally_core::{EventRef, Limits};

use crate::{ErrorCode, hint};

/// A JSON value of a field, kept only as far as validation needs it.
#[derive(Debug)]
pub(crate) enum Loose<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LooseVisitor;
        impl<'de> Visitor<'de> for LooseVisitor {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Loose::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(Loose::Other("an integer out of range"), Loose::Int))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose::Other("a fractional number"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Loose::Other("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Loose::Other("null"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an object"))
            }
        }
        deserializer.deserialize_any(LooseVisitor)
    }
}

/// One event object, decoded and checked: its problems went to the request's `Problems`
/// (and then it is never submitted). `ts_ms` is resolved: the receive time when absent.
#[derive(Debug)]
pub(crate) struct WireEvent<'a> {
    pub(crate) video_id: Option<Cow<'a, str>>,
    pub(crate) event_type: Option<Cow<'a, str>>,
    pub(crate) ts_ms: i64,
    pub(crate) value: i64,
    pub(crate) event_id: Option<Cow<'a, str>>,
    pub(crate) viewer_id: Option<Cow<'a, str>>,
}

impl WireEvent<'_> {
    /// The event with defaults filled in.
    pub(crate) fn resolved(&self) -> EventRef<'_> {
        EventRef {
            video_id: self.video_id.as_deref().unwrap_or(""),
            event_type: self.event_type.as_deref().unwrap_or(EVENT_TYPE_DEFAULT),
            ts_ms: self.ts_ms,
            value: self.value,
            event_id: self.event_id.as_deref(),
            viewer_id: self.viewer_id.as_deref(),
        }
    }
}

/// A known field's bit in a mask of fields (bit `i` for `EVENT_FIELDS[i]`).
fn field_bit(field: &str) -> Option<u8> {
    EVENT_FIELDS.iter().position(|f| *f == field).map(|i| 1u8 << i)
}

/// Field names an event may have; anything else is rejected.
pub(crate) const EVENT_FIELDS: [&str; 6] = ["video_id", "type", "ts", "value", "event_id", "viewer_id"];
const UNKNOWN_FIELD: &str = "unknown field; allowed: video_id, type, ts, value, event_id, viewer_id";
/// Characters of an unknown field's name repeated in an error.
const FIELD_NAME_SHOWN_MAX: usize = 64;

/// One problem of one field of one event.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) index: usize,
    /// The field's name; for an unknown field, the name the client sent (shortened).
    pub(crate) field: String,
    pub(crate) code: ErrorCode,
    pub(crate) reason: String,
    pub(crate) hint: Option<String>,
}

/// Every problem of a request's events, counted; the first `shown_max` kept to be shown.
pub(crate) struct Problems {
    pub(crate) shown: Vec<Problem>,
    pub(crate) total: usize,
    /// Events with at least one problem.
    pub(crate) bad_events: usize,
    last_bad: Option<usize>,
    shown_max: usize,
}

impl Problems {
    pub(crate) fn new(shown_max: usize) -> Problems {
        Problems { shown: Vec::new(), total: 0, bad_events: 0, last_bad: None, shown_max }
    }

    /// Counts one problem of event `index` (events are visited in order).
    pub(crate) fn push(&mut self, index: usize, code: ErrorCode, field: &str, reason: impl fmt::Display) {
        self.push_hinted(index, code, field, reason, None);
    }

    /// `push`, with a hint for a common slip.
    pub(crate) fn push_hinted(
        &mut self,
        index: usize,
        code: ErrorCode,
        field: &str,
        reason: impl fmt::Display,
        hint: Option<String>,
    ) {
        self.total += 1;
        if self.last_bad != Some(index) {
            self.last_bad = Some(index);
            self.bad_events += 1;
        }
        if self.shown.len() < self.shown_max {
            let field: String = field.chars().take(FIELD_NAME_SHOWN_MAX).collect();
            self.shown.push(Problem { index, field, code, reason: reason.to_string(), hint });
        }
    }
}

/// What decoding a request's events needs besides its bytes.
pub(crate) struct Decoding<'c> {
    pub(crate) limits: &'c Limits,
    /// When the request arrived: the time of events without `ts`, and the rules' "now".
    pub(crate) receive_ms: i64,
    pub(crate) problems: RefCell<Problems>,
}

/// Decodes and checks one event object as event `index` of its request.
pub(crate) struct EventSeed<'d, 'c> {
    pub(crate) index: usize,
    pub(crate) decoding: &'d Decoding<'c>,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_, '_> {
    type Value = WireEvent<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_, '_> {
    type Value = WireEvent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut event = WireEvent {
            video_id: None,
            event_type: None,
            ts_ms: self.decoding.receive_ms,
            value: 0,
            event_id: None,
            viewer_id: None,
        };
        // Fields given, and fields with a problem (which are then not checked again).
        let (mut seen, mut broken) = (0u8, 0u8);
        // `ts` as given, when a number: a hint if it is epoch seconds.
        let mut ts_number = None;
        let mut problems = self.decoding.problems.borrow_mut();
        // Keys go through `Loose` too: serde's own `Cow<str>` always copies.
        while let Some(key) = map.next_key::<Loose<'de>>()? {
            let key = match key {
                Loose::Str(key) => key,
                _ => Cow::Borrowed(""),
            };
            let value: Loose<'de> = map.next_value()?;
            let Some(bit) = field_bit(&key) else {
                problems.push(self.index, ErrorCode::UnknownField, &key, UNKNOWN_FIELD);
                continue;
            };
            if seen & bit != 0 {
                broken |= bit;
                problems.push(self.index, ErrorCode::DuplicateField, &key, "is given more than once");
                continue;
            }
            let mut problem = |reason: &dyn fmt::Display| {
                broken |= bit;
                problems.push(self.index, ErrorCode::InvalidField, &key, reason);
            };
            seen |= bit;
            match key.as_ref() {
                "video_id" => event.video_id = expect_string(value, &mut problem),
                "type" => event.event_type = expect_string(value, &mut problem),
                "event_id" => event.event_id = expect_string(value, &mut problem),
                "viewer_id" => event.viewer_id = expect_string(value, &mut problem),
                "ts" => match value {
                    Loose::Str(text) => match text.parse::<jiff::Timestamp>() {
                        Ok(ts) => event.ts_ms = ts.as_millisecond(),
                        Err(_) => problem(&"is not an RFC 3339 timestamp"),
                    },
                    Loose::Int(ms) => {
                        event.ts_ms = ms;
                        ts_number = Some(ms);
                    }
                    Loose::Other(kind) => {
                        problem(&format_args!("must be an RFC 3339 string or epoch milliseconds, not {kind}"))
                    }
                },
                _ => match value {
                    Loose::Int(v) => event.value = v,
                    Loose::Str(_) => problem(&"must be an integer, not a string"),
                    Loose::Other(kind) => problem(&format_args!("must be an integer, not {kind}")),
                },
            }
        }
        if seen & 1 == 0 {
            broken |= 1;
            problems.push(self.index, ErrorCode::MissingField, "video_id", "is required");
        }
        let mut rule_errors = Vec::new();
        self.decoding.limits.check(self.index, &event.resolved(), self.decoding.receive_ms, &mut rule_errors);
        // One reason per field: a field that failed to decode is not also checked.
        for error in rule_errors {
            if field_bit(&error.field).is_none_or(|bit| broken & bit == 0) {
                let hint = ts_number.filter(|_| error.field == "ts").and_then(|ms| hint::epoch_seconds("ts", ms));
                problems.push_hinted(self.index, ErrorCode::InvalidField, &error.field, &error.reason, hint);
            }
        }
        Ok(event)
    }
}

fn expect_string<'a>(value: Loose<'a>, problem: &mut impl FnMut(&dyn fmt::Display)) -> Option<Cow<'a, str>> {
    match value {
        Loose::Str(s) => Some(s),
        Loose::Int(_) => {
            problem(&"must be a string, not a number");
            None
        }
        Loose::Other(kind) => {
            problem(&format_args!("must be a string, not {kind}"));
            None
        }
    }
}

/// Decodes a JSON body that is one event object or an array of them, refusing it (with
/// `too_many` set) as soon as it holds more than `events_max` events.
pub(crate) struct BodySeed<'d, 'c> {
    pub(crate) events_max: usize,
    pub(crate) decoding: &'d Decoding<'c>,
    pub(crate) too_many: &'d Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_, '_> {
    type Value = Vec<WireEvent<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_, '_> {
    type Value = Vec<WireEvent<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object or an array of event objects")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // serde_json gives no length hint for arrays; the Vec grows as it goes.
        let mut events = Vec::new();
        loop {
            if events.len() == self.events_max {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    self.too_many.set(true);
                    return Err(de::Error::custom("too many events"));
                }
                return Ok(events);
            }
            let seed = EventSeed { index: events.len(), decoding: self.decoding };
            match seq.next_element_seed(seed)? {
                Some(event) => events.push(event),
                None => return Ok(events),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let seed = EventSeed { index: 0, decoding: self.decoding };
        seed.visit_map(map).map(|event| vec![event])
    }
}

/// A JSON object's fields in the order given, duplicates kept, so that a body other than
/// events (`POST /v1/counts`) can name each field at fault: unknown, missing, repeated or
/// invalid.
pub(crate) struct JsonObject(pub(crate) Vec<(String, Value)>);

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = JsonObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonObject, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    fields.push(entry);
                }
                Ok(JsonObject(fields))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}
