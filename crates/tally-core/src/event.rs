//! The event: one view (or like, share, …) of one video, and the rules that make it valid.

use std::borrow::Cow;

/// One event as the core sees it, borrowed from wherever it was decoded (a request body or
/// a log record). Timestamps are already resolved: `ts_ms` is never "absent" here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRef<'a> {
    pub video_id: &'a str,
    pub event_type: &'a str,
    /// Event time, epoch milliseconds (UTC).
    pub ts_ms: i64,
    /// Summed per bucket (e.g. watch time in milliseconds).
    pub value: i64,
    /// Identifies the event within its video; repeats inside the dedup window are not counted.
    pub event_id: Option<&'a str>,
    /// Kept in the log for unique-viewer estimates.
    pub viewer_id: Option<&'a str>,
}

/// The event type used when a request names none.
pub const EVENT_TYPE_DEFAULT: &str = "view";
/// Bytes; a video id is an opaque key, 256 bytes covers URLs-as-ids and UUID compounds.
pub const VIDEO_ID_BYTES_MAX: usize = 256;
/// Bytes; event types are short names matching `[a-z0-9_.-]{1,32}`.
pub const EVENT_TYPE_BYTES_MAX: usize = 32;
/// Bytes; event ids are client-made keys (UUIDs, hashes): 128 bytes is generous.
pub const EVENT_ID_BYTES_MAX: usize = 128;
/// Bytes; viewer ids are opaque user or session keys.
pub const VIEWER_ID_BYTES_MAX: usize = 256;

/// Largest magnitude of an event's value: integers beyond 2^53 lose precision in the
/// JavaScript and JSON tooling that reads our answers.
pub const VALUE_ABS_MAX: i64 = (1 << 53) - 1;

/// The time window an event timestamp must fall in, relative to the server's receive time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How far in the past an event may be, milliseconds.
    pub lateness_max_ms: i64,
    /// How far in the future an event may be (client clock skew), milliseconds.
    pub clock_skew_max_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { lateness_max_ms: 7 * 24 * 3_600_000, clock_skew_max_ms: 5 * 60_000 }
    }
}

/// One reason an event was rejected, pointing at the event and the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub index: usize,
    /// The field's name; for an unknown field, the name the client sent.
    pub field: Cow<'static, str>,
    pub reason: String,
}

impl Limits {
    /// Checks every rule of one event and pushes one `FieldError` per broken rule.
    pub fn check(&self, index: usize, event: &EventRef<'_>, receive_ms: i64, errors: &mut Vec<FieldError>) {
        let mut fail =
            |field: &'static str, reason: String| errors.push(FieldError { index, field: field.into(), reason });
        if let Err(reason) = check_id(event.video_id, VIDEO_ID_BYTES_MAX) {
            fail("video_id", reason);
        }
        if !is_event_type(event.event_type) {
            fail("type", format!("must match [a-z0-9_.-]{{1,{EVENT_TYPE_BYTES_MAX}}}"));
        }
        let earliest = receive_ms.saturating_sub(self.lateness_max_ms);
        let latest = receive_ms.saturating_add(self.clock_skew_max_ms);
        if event.ts_ms < earliest {
            fail("ts", format!("older than the maximum lateness of {} ms", self.lateness_max_ms));
        } else if event.ts_ms > latest {
            fail("ts", format!("later than the maximum clock skew of {} ms", self.clock_skew_max_ms));
        }
        if event.value.unsigned_abs() > VALUE_ABS_MAX as u64 {
            fail("value", format!("magnitude over {VALUE_ABS_MAX}"));
        }
        if let Some(event_id) = event.event_id
            && let Err(reason) = check_id(event_id, EVENT_ID_BYTES_MAX)
        {
            fail("event_id", reason);
        }
        if let Some(viewer_id) = event.viewer_id
            && let Err(reason) = check_id(viewer_id, VIEWER_ID_BYTES_MAX)
        {
            fail("viewer_id", reason);
        }
    }
}

/// An id is 1..=max bytes of UTF-8 with no control characters.
pub fn check_id(id: &str, bytes_max: usize) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > bytes_max {
        return Err(format!("longer than {bytes_max} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    Ok(())
}

/// `[a-z0-9_.-]{1,32}`.
pub fn is_event_type(event_type: &str) -> bool {
    (1..=EVENT_TYPE_BYTES_MAX).contains(&event_type.len())
        && event_type.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(video_id: &str) -> EventRef<'_> {
        EventRef { video_id, event_type: "view", ts_ms: 1_000_000, value: 0, event_id: None, viewer_id: None }
    }

    #[test]
    fn valid_event_passes() {
        let mut errors = Vec::new();
        Limits::default().check(0, &event("v1"), 1_000_000, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn every_broken_rule_is_reported() {
        let mut errors = Vec::new();
        let bad = EventRef {
            video_id: "",
            event_type: "View!",
            ts_ms: 0,
            value: i64::MIN,
            event_id: Some(&"x"[..0]),
            viewer_id: Some("a\u{7}b"),
        };
        Limits::default().check(3, &bad, 10 * 24 * 3_600_000, &mut errors);
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_ref()).collect();
        assert_eq!(fields, ["video_id", "type", "ts", "value", "event_id", "viewer_id"]);
        assert!(errors.iter().all(|e| e.index == 3));
    }

    #[test]
    fn timestamp_window_is_inclusive_at_both_ends() {
        let limits = Limits { lateness_max_ms: 100, clock_skew_max_ms: 10 };
        let mut errors = Vec::new();
        for (ts, ok) in [(900, true), (899, false), (1010, true), (1011, false)] {
            errors.clear();
            limits.check(0, &EventRef { ts_ms: ts, ..event("v") }, 1000, &mut errors);
            assert_eq!(errors.is_empty(), ok, "ts {ts}");
        }
    }

    #[test]
    fn id_length_limit_counts_bytes() {
        assert!(check_id(&"é".repeat(128), 256).is_ok());
        assert!(check_id(&"é".repeat(129), 256).is_err());
    }

    #[test]
    fn event_type_grammar() {
        for ok in ["view", "like", "a.b-c_d", "0", &"x".repeat(32)] {
            assert!(is_event_type(ok), "{ok}");
        }
        for bad in ["", "View", "a b", "é", &"x".repeat(33)] {
            assert!(!is_event_type(bad), "{bad}");
        }
    }
}
