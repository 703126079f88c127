//! Events as they arrive on the wire (JSON objects), decoded leniently: every problem of
//! every field is recorded against the event instead of aborting the whole body, so a 400
//! can name each bad event and field.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

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

/// The timestamp as sent: an RFC 3339 string or integer epoch milliseconds.
#[derive(Debug)]
pub(crate) enum WireTs<'a> {
    Absent,
    Text(Cow<'a, str>),
    Millis(i64),
}

/// One event object, fields still unvalidated; `problems` holds what decoding found wrong.
#[derive(Debug)]
pub(crate) struct WireEvent<'a> {
    pub(crate) video_id: Option<Cow<'a, str>>,
    pub(crate) event_type: Option<Cow<'a, str>>,
    pub(crate) ts: WireTs<'a>,
    pub(crate) value: i64,
    pub(crate) event_id: Option<Cow<'a, str>>,
    pub(crate) viewer_id: Option<Cow<'a, str>>,
    pub(crate) problems: Vec<(Cow<'static, str>, String)>,
}

/// Field names an event may have; anything else is rejected.
pub(crate) const EVENT_FIELDS: [&str; 6] = ["video_id", "type", "ts", "value", "event_id", "viewer_id"];

fn expect_string<'a>(
    field: &'static str,
    value: Loose<'a>,
    problems: &mut Vec<(Cow<'static, str>, String)>,
) -> Option<Cow<'a, str>> {
    match value {
        Loose::Str(s) => Some(s),
        Loose::Int(_) => {
            problems.push((field.into(), "must be a string, not a number".into()));
            None
        }
        Loose::Other(kind) => {
            problems.push((field.into(), format!("must be a string, not {kind}")));
            None
        }
    }
}

impl<'de> Deserialize<'de> for WireEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EventVisitor;
        impl<'de> Visitor<'de> for EventVisitor {
            type Value = WireEvent<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut event = WireEvent {
                    video_id: None,
                    event_type: None,
                    ts: WireTs::Absent,
                    value: 0,
                    event_id: None,
                    viewer_id: None,
                    problems: Vec::new(),
                };
                // Keys go through `Loose` too: serde's own `Cow<str>` always copies.
                while let Some(key) = map.next_key::<Loose<'de>>()? {
                    let key = match key {
                        Loose::Str(key) => key,
                        _ => Cow::Borrowed(""),
                    };
                    let value: Loose<'de> = map.next_value()?;
                    let problems = &mut event.problems;
                    match key.as_ref() {
                        "video_id" => event.video_id = expect_string("video_id", value, problems),
                        "type" => event.event_type = expect_string("type", value, problems),
                        "event_id" => event.event_id = expect_string("event_id", value, problems),
                        "viewer_id" => event.viewer_id = expect_string("viewer_id", value, problems),
                        "ts" => {
                            event.ts = match value {
                                Loose::Str(s) => WireTs::Text(s),
                                Loose::Int(ms) => WireTs::Millis(ms),
                                Loose::Other(kind) => {
                                    problems.push((
                                        "ts".into(),
                                        format!("must be an RFC 3339 string or epoch milliseconds, not {kind}"),
                                    ));
                                    WireTs::Absent
                                }
                            }
                        }
                        "value" => match value {
                            Loose::Int(v) => event.value = v,
                            Loose::Str(_) => problems.push(("value".into(), "must be an integer, not a string".into())),
                            Loose::Other(kind) => {
                                problems.push(("value".into(), format!("must be an integer, not {kind}")))
                            }
                        },
                        other => {
                            let shown: String = other.chars().take(64).collect();
                            problems
                                .push((shown.into(), format!("unknown field; allowed: {}", EVENT_FIELDS.join(", "))));
                        }
                    }
                }
                if event.video_id.is_none() && !event.problems.iter().any(|(f, _)| f == "video_id") {
                    event.problems.push(("video_id".into(), "is required".into()));
                }
                Ok(event)
            }
        }
        deserializer.deserialize_map(EventVisitor)
    }
}

/// A body that is one event or an array of events.
pub(crate) enum OneOrMany<'a> {
    One(WireEvent<'a>),
    Many(Vec<WireEvent<'a>>),
}

impl<'de> Deserialize<'de> for OneOrMany<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = OneOrMany<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event object or an array of event objects")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // serde_json gives no length hint for arrays; the Vec grows as it goes.
                let mut events = Vec::new();
                while let Some(event) = seq.next_element()? {
                    events.push(event);
                }
                Ok(OneOrMany::Many(events))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                WireEvent::deserialize(de::value::MapAccessDeserializer::new(map)).map(OneOrMany::One)
            }
        }
        deserializer.deserialize_any(BodyVisitor)
    }
}
