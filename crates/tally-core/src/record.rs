//! The log record: one request's events for one partition, as they are written to the
//! write-ahead log and read back on recovery.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! u8    version             = 1
//! i64   receive_ms          server clock when the request arrived; drives dedup expiry
//! u8    flags               bit 0: an idempotency key and fingerprint follow
//! [u128 idempotency_key]    xxh3-128 of the request's Idempotency-Key header
//! [u64  fingerprint]        hash of the request body, to refuse a key reused for another body
//! u32   event_count
//! event_count times:
//!   u16 video_id_len, video_id bytes (UTF-8)
//!   u8  type_len, type bytes (ASCII)
//!   i64 ts_ms
//!   i64 value
//!   u8  event_id_len (0: absent), event_id bytes
//!   u16 viewer_id_len (0: absent), viewer_id bytes
//! ```
//!
//! Ids are never empty once validated, so a zero length can mean "absent".

use crate::event::EventRef;

const RECORD_VERSION: u8 = 1;
const FLAG_IDEMPOTENCY_KEY: u8 = 1;
/// Bytes of the fixed header when an idempotency key is present.
const HEADER_BYTES_MAX: usize = 1 + 8 + 1 + 16 + 8 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record truncated at byte {at}")]
    Truncated { at: usize },
    #[error("unknown record version {version}")]
    Version { version: u8 },
    #[error("record field at byte {at} is not valid UTF-8")]
    Utf8 { at: usize },
    #[error("record has {extra} bytes after its last event")]
    Trailing { extra: usize },
}

/// A request's idempotency key (hashed) and the fingerprint of the body it was first sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey {
    pub key: u128,
    pub fingerprint: u64,
}

/// Builds one record. Append events, then `finish` to get the bytes.
pub struct RecordWriter {
    bytes: Vec<u8>,
    count_at: usize,
    events: u32,
}

impl RecordWriter {
    pub fn new(receive_ms: i64, request_key: Option<RequestKey>, capacity: usize) -> RecordWriter {
        let mut bytes = Vec::with_capacity(HEADER_BYTES_MAX + capacity);
        bytes.push(RECORD_VERSION);
        bytes.extend_from_slice(&receive_ms.to_le_bytes());
        match request_key {
            Some(request) => {
                bytes.push(FLAG_IDEMPOTENCY_KEY);
                bytes.extend_from_slice(&request.key.to_le_bytes());
                bytes.extend_from_slice(&request.fingerprint.to_le_bytes());
            }
            None => bytes.push(0),
        }
        let count_at = bytes.len();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        RecordWriter { bytes, count_at, events: 0 }
    }

    /// Appends one validated event. Panics if a field exceeds its length field: validation
    /// must have run first, and a record that cannot be read back must never reach the log.
    pub fn push(&mut self, event: &EventRef<'_>) {
        let bytes = &mut self.bytes;
        put_str16(bytes, event.video_id);
        put_str8(bytes, event.event_type);
        bytes.extend_from_slice(&event.ts_ms.to_le_bytes());
        bytes.extend_from_slice(&event.value.to_le_bytes());
        put_str8(bytes, event.event_id.unwrap_or(""));
        put_str16(bytes, event.viewer_id.unwrap_or(""));
        self.events += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.bytes[self.count_at..self.count_at + 4].copy_from_slice(&self.events.to_le_bytes());
        self.bytes
    }
}

fn put_str8(bytes: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("field longer than its u8 length: validate first");
    bytes.push(len);
    bytes.extend_from_slice(s.as_bytes());
}

fn put_str16(bytes: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("field longer than its u16 length: validate first");
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(s.as_bytes());
}

/// Appends a record list, `(u32le record_len | record)*`: the payload of a WAL frame and of
/// a Kafka message.
pub fn encode_list(records: &[&[u8]], out: &mut Vec<u8>) {
    for record in records {
        let len = u32::try_from(record.len()).expect("record over 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(record);
    }
}

/// The records of a record list (`encode_list`). An `Err` item is malformed framing; it
/// ends the list.
pub struct ListRecords<'a> {
    list: &'a [u8],
}

impl<'a> ListRecords<'a> {
    pub fn new(list: &'a [u8]) -> ListRecords<'a> {
        ListRecords { list }
    }
}

impl<'a> Iterator for ListRecords<'a> {
    type Item = Result<&'a [u8], String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.list.is_empty() {
            return None;
        }
        let Some(len) = self.list.get(..4) else {
            self.list = &[];
            return Some(Err("record length cut short".into()));
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some(record) = self.list.get(4..4 + len) else {
            self.list = &[];
            return Some(Err(format!("record of {len} bytes runs past its list")));
        };
        self.list = &self.list[4 + len..];
        Some(Ok(record))
    }
}

/// Reads one record: the header eagerly, the events lazily through `for_each_event`.
#[derive(Debug, Clone)]
pub struct RecordReader<'a> {
    pub receive_ms: i64,
    pub request_key: Option<RequestKey>,
    pub event_count: u32,
    body: &'a [u8],
    body_at: usize,
}

impl<'a> RecordReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Result<RecordReader<'a>, RecordError> {
        let mut cursor = Cursor { bytes, at: 0 };
        let version = cursor.u8()?;
        if version != RECORD_VERSION {
            return Err(RecordError::Version { version });
        }
        let receive_ms = cursor.i64()?;
        let flags = cursor.u8()?;
        let request_key = if flags & FLAG_IDEMPOTENCY_KEY != 0 {
            let key = u128::from_le_bytes(cursor.take(16)?.try_into().expect("16 bytes"));
            let fingerprint = u64::from_le_bytes(cursor.take(8)?.try_into().expect("8 bytes"));
            Some(RequestKey { key, fingerprint })
        } else {
            None
        };
        let event_count = u32::from_le_bytes(cursor.take(4)?.try_into().expect("4 bytes"));
        Ok(RecordReader { receive_ms, request_key, event_count, body: bytes, body_at: cursor.at })
    }

    /// Decodes every event, calling `visit` on each; fails on the first malformed event
    /// (each event's framing is read before its text is checked as UTF-8).
    pub fn for_each_event(&self, mut visit: impl FnMut(EventRef<'a>)) -> Result<(), RecordError> {
        let text = |field: &'a [u8]| {
            // Where the field sits in the record, for the error.
            let at = field.as_ptr() as usize - self.body.as_ptr() as usize;
            std::str::from_utf8(field).map_err(|_| RecordError::Utf8 { at })
        };
        self.try_for_each_event_bytes(|event| {
            visit(EventRef {
                video_id: text(event.video_id)?,
                event_type: text(event.event_type)?,
                ts_ms: event.ts_ms,
                value: event.value,
                event_id: event.event_id.map(text).transpose()?,
                viewer_id: event.viewer_id.map(text).transpose()?,
            });
            Ok(())
        })
    }

    /// Decodes every event without checking its text fields as UTF-8, calling `visit` on
    /// each; fails on the first malformed framing. For readers that check the text in
    /// bulk, or not at all.
    pub fn for_each_event_bytes(&self, mut visit: impl FnMut(EventBytes<'a>)) -> Result<(), RecordError> {
        self.try_for_each_event_bytes(|event| {
            visit(event);
            Ok(())
        })
    }

    fn try_for_each_event_bytes(
        &self,
        mut visit: impl FnMut(EventBytes<'a>) -> Result<(), RecordError>,
    ) -> Result<(), RecordError> {
        let mut cursor = Cursor { bytes: self.body, at: self.body_at };
        for _ in 0..self.event_count {
            let video_len = usize::from(cursor.u16()?);
            let video_id = cursor.take(video_len)?;
            let type_len = usize::from(cursor.u8()?);
            let event_type = cursor.take(type_len)?;
            let ts_ms = cursor.i64()?;
            let value = cursor.i64()?;
            let event_id_len = usize::from(cursor.u8()?);
            let event_id = cursor.take(event_id_len)?;
            let viewer_len = usize::from(cursor.u16()?);
            let viewer_id = cursor.take(viewer_len)?;
            visit(EventBytes {
                video_id,
                event_type,
                ts_ms,
                value,
                event_id: (!event_id.is_empty()).then_some(event_id),
                viewer_id: (!viewer_id.is_empty()).then_some(viewer_id),
            })?;
        }
        if cursor.at != self.body.len() {
            return Err(RecordError::Trailing { extra: self.body.len() - cursor.at });
        }
        Ok(())
    }
}

/// An event as its record holds it, its text fields not yet checked as UTF-8 (the record
/// framing is). What `EventRef` is once they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBytes<'a> {
    pub video_id: &'a [u8],
    pub event_type: &'a [u8],
    pub ts_ms: i64,
    pub value: i64,
    pub event_id: Option<&'a [u8]>,
    pub viewer_id: Option<&'a [u8]>,
}

impl<'a> From<&EventRef<'a>> for EventBytes<'a> {
    fn from(event: &EventRef<'a>) -> EventBytes<'a> {
        EventBytes {
            video_id: event.video_id.as_bytes(),
            event_type: event.event_type.as_bytes(),
            ts_ms: event.ts_ms,
            value: event.value,
            event_id: event.event_id.map(str::as_bytes),
            viewer_id: event.viewer_id.map(str::as_bytes),
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let slice = self.bytes.get(self.at..self.at + n).ok_or(RecordError::Truncated { at: self.at })?;
        self.at += n;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn i64(&mut self) -> Result<i64, RecordError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owned(e: EventRef<'_>) -> (String, String, i64, i64, Option<String>, Option<String>) {
        (
            e.video_id.into(),
            e.event_type.into(),
            e.ts_ms,
            e.value,
            e.event_id.map(Into::into),
            e.viewer_id.map(Into::into),
        )
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_where_it_sits_but_read_as_bytes() {
        let mut writer = RecordWriter::new(7, None, 64);
        let event =
            EventRef { video_id: "v1", event_type: "view", ts_ms: 1, value: 1, event_id: None, viewer_id: None };
        writer.push(&event);
        writer.push(&EventRef { video_id: "v\u{e9}", ..event });
        let mut bytes = writer.finish();
        // The second event's video id is "v" then é's two bytes: spoil the first of them.
        let at = bytes.len() - (2 + 1 + 4 + 8 + 8 + 1 + 2);
        bytes[at] = 0xff;
        let reader = RecordReader::new(&bytes).unwrap();
        let mut seen = Vec::new();
        assert_eq!(reader.for_each_event(|e| seen.push(e.video_id.to_string())), Err(RecordError::Utf8 { at: at - 1 }));
        assert_eq!(seen, ["v1"]);
        let mut raw = Vec::new();
        reader.for_each_event_bytes(|e| raw.push(e.video_id.to_vec())).unwrap();
        assert_eq!(raw, [b"v1".to_vec(), vec![b'v', 0xff, 0xa9]]);
    }

    proptest! {
        #[test]
        fn record_round_trips(
            receive_ms in any::<i64>(),
            key in proptest::option::of((any::<u128>(), any::<u64>()).prop_map(|(key, fingerprint)| RequestKey { key, fingerprint })),
            events in proptest::collection::vec(
                ("[^\u{0}]{1,20}", "[a-z]{1,32}", any::<i64>(), any::<i64>(),
                 proptest::option::of("[a-z0-9]{1,128}"), proptest::option::of(".{1,50}")),
                0..20),
        ) {
            let mut writer = RecordWriter::new(receive_ms, key, 0);
            for (v, t, ts, value, id, viewer) in &events {
                writer.push(&EventRef { video_id: v, event_type: t, ts_ms: *ts, value: *value,
                    event_id: id.as_deref(), viewer_id: viewer.as_deref() });
            }
            let bytes = writer.finish();
            let reader = RecordReader::new(&bytes).unwrap();
            prop_assert_eq!(reader.receive_ms, receive_ms);
            prop_assert_eq!(reader.request_key, key);
            let mut decoded = Vec::new();
            reader.for_each_event(|e| decoded.push(owned(e))).unwrap();
            prop_assert_eq!(decoded, events);
        }
    }

    #[test]
    fn truncated_record_is_an_error_not_a_panic() {
        let mut writer = RecordWriter::new(7, Some(RequestKey { key: 9, fingerprint: 1 }), 0);
        writer.push(&EventRef {
            video_id: "v",
            event_type: "view",
            ts_ms: 1,
            value: 2,
            event_id: None,
            viewer_id: None,
        });
        let bytes = writer.finish();
        for cut in 0..bytes.len() {
            let result = RecordReader::new(&bytes[..cut]).and_then(|r| r.for_each_event(|_| {}));
            assert!(result.is_err(), "cut at {cut}");
        }
    }
}
