//! `POST /v1/events`: read the body under its limits, decode and validate every event,
//! submit the whole batch, answer once it is durable.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use serde_json::json;
use tally_core::{EventRef, Limits};
use tally_engine::{Acknowledged, IdempotencyKey};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use serde::de::DeserializeSeed;

use crate::auth::{self, Caller};
use crate::body;
use crate::query::{params_among, query_pairs};
use crate::wire::{BodySeed, Decoding, EventSeed, Problems, WireEvent};
use crate::{ApiError, AppState, ErrorCode};

/// Query parameters `POST /v1/events` takes: the beacon's API key (`auth`).
const QUERY_PARAMS: [&str; 1] = ["key"];

/// Bytes; an idempotency key is a client-made token (UUID, hash).
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// The discriminant seeds the body fingerprint, which is stored in the log and the dedup
/// journal: never renumber.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json = 0,
    Ndjson = 1,
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat, ApiError> {
    let unsupported = |shown: &str| {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "content type {shown} is not supported; use application/json, application/x-ndjson, \
                 or text/plain holding JSON (what navigator.sendBeacon sends)"
            ),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Err(unsupported("(none)")) };
    let text = value.to_str().map_err(|_| unsupported("(not ASCII)"))?;
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        // A beacon's body: JSON sent as text/plain, which needs no CORS preflight.
        "application/json" | "text/plain" => Ok(BodyFormat::Json),
        "application/x-ndjson" => Ok(BodyFormat::Ndjson),
        _ => Err(unsupported(&format!("\"{}\"", text.chars().take(100).collect::<String>()))),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let bad = |reason: &str| ApiError::new(ErrorCode::InvalidIdempotencyKey, format!("Idempotency-Key {reason}"));
    let key = value.to_str().map_err(|_| bad("must be visible ASCII"))?;
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(bad(&format!("must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes")));
    }
    Ok(Some(key))
}

/// 400 listing the invalid events, if any: each bad field as `{index, field, code,
/// reason}`, and its `hint` if it has one.
fn refuse_invalid(problems: &Problems, events: usize) -> Result<(), ApiError> {
    if problems.total == 0 {
        return Ok(());
    }
    metrics::counter!("tally_events_rejected_total").increment(events as u64);
    let shown: Vec<_> = problems
        .shown
        .iter()
        .map(|e| {
            let mut shown = json!({ "index": e.index, "field": e.field, "code": e.code.as_str(), "reason": e.reason });
            if let Some(hint) = &e.hint {
                shown["hint"] = json!(hint);
            }
            shown
        })
        .collect();
    Err(ApiError::new(
        ErrorCode::InvalidEvents,
        format!("{} of {} events are invalid; nothing was counted", problems.bad_events, events),
    )
    .with("errors", json!(shown))
    .with("error_count", json!(problems.total)))
}

pub(crate) async fn ingest(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let engine = Arc::clone(state.engine()?);
    params_among(query_pairs(query.as_deref())?, &QUERY_PARAMS)?;
    let format = body_format(&headers)?;
    let encoding = body::encoding(&headers)?;
    let key = idempotency_key(&headers)?;
    let limit = state.config.body_bytes_max;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(body::too_large(limit));
    }
    let deadline = Duration::from_millis(state.config.body_read_timeout_ms);
    let mut body = body::read(body, limit, deadline, &state.body_budget).await?;
    if encoding == body::Encoding::Gzip {
        body = body::gunzip(body, limit, &state.body_budget)?;
    }

    let receive_ms = engine.now_ms();
    let text = std::str::from_utf8(&body.bytes).map_err(|e| {
        ApiError::new(ErrorCode::InvalidUtf8, format!("request body is not valid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    let decoding = Decoding {
        limits: &state.config.limits,
        receive_ms,
        problems: RefCell::new(Problems::new(state.config.field_errors_max)),
    };
    let wire_events = decode(format, text, state.config.events_per_request_max, &decoding)?;
    refuse_invalid(&decoding.problems.into_inner(), wire_events.len())?;
    let caller = caller.map(|Extension(caller)| caller);
    auth::admit_events(caller.as_ref(), wire_events.iter().filter_map(|e| e.video_id.as_deref()), wire_events.len())?;

    let events: Vec<EventRef<'_>> = wire_events.iter().map(WireEvent::resolved).collect();
    // A key's Idempotency-Keys are its own: another key's holder cannot claim them first.
    let scoped = caller.as_ref().zip(key).map(|(Caller(api_key), key)| format!("{}:{key}", api_key.entry.id));
    let key = scoped.as_deref().or(key);
    let key = key.map(|key| IdempotencyKey { key, fingerprint: xxh3_64_with_seed(&body.bytes, format as u64) });
    // The accepted and duplicate counters are kept by the partition writers, which know
    // whether a request was counted now or answered again from dedup memory.
    // In cluster mode a keyed request claims its key in the database first.
    let submitted = if key.is_some() && engine.is_cluster() {
        tokio::task::block_in_place(|| engine.submit(&events, key, receive_ms))?
    } else {
        engine.submit(&events, key, receive_ms)?
    };
    // The records are encoded and charged to the queue budget: the body and its decoded
    // events are not needed while the request waits to be written.
    drop(events);
    drop(wire_events);
    drop(body);
    let Acknowledged { outcome, position } = submitted.acknowledged().await?;
    Ok(axum::Json(json!({
        "accepted": outcome.accepted,
        "duplicates": outcome.duplicates,
        "position": position.to_string(),
    })))
}

fn decode<'a>(
    format: BodyFormat,
    text: &'a str,
    events_max: usize,
    decoding: &Decoding<'_>,
) -> Result<Vec<WireEvent<'a>>, ApiError> {
    let too_many = || {
        ApiError::new(ErrorCode::TooManyEvents, format!("a request may carry at most {events_max} events"))
            .with("limit_events", json!(events_max))
    };
    match format {
        BodyFormat::Json => {
            let too_many_seen = Cell::new(false);
            let seed = BodySeed { events_max, decoding, too_many: &too_many_seen };
            let mut deserializer = serde_json::Deserializer::from_str(text);
            match seed.deserialize(&mut deserializer).and_then(|events| deserializer.end().map(|()| events)) {
                Ok(events) => Ok(events),
                Err(_) if too_many_seen.get() => Err(too_many()),
                Err(error) => {
                    Err(ApiError::new(ErrorCode::MalformedJson, format!("request body is not valid JSON: {error}")))
                }
            }
        }
        BodyFormat::Ndjson => {
            let mut events = Vec::new();
            for (line_index, line) in text.split('\n').enumerate() {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.trim().is_empty() {
                    continue;
                }
                if events.len() == events_max {
                    return Err(too_many());
                }
                let seed = EventSeed { index: events.len(), decoding };
                let mut deserializer = serde_json::Deserializer::from_str(line);
                let event = seed.deserialize(&mut deserializer).and_then(|event| deserializer.end().map(|()| event));
                let event = event.map_err(|error| {
                    ApiError::new(
                        ErrorCode::MalformedJson,
                        format!("line {} is not a JSON event object: {error}", line_index + 1),
                    )
                    .with("line", json!(line_index + 1))
                })?;
                events.push(event);
            }
            Ok(events)
        }
    }
}

/// See `crate::fuzz_ingest_body`.
/// An event decoded and checked outside a request (`decode_events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedEvent {
    pub video_id: String,
    pub event_type: String,
    pub ts_ms: i64,
    pub value: i64,
    pub event_id: Option<String>,
    pub viewer_id: Option<String>,
}

impl DecodedEvent {
    pub fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            video_id: &self.video_id,
            event_type: &self.event_type,
            ts_ms: self.ts_ms,
            value: self.value,
            event_id: self.event_id.as_deref(),
            viewer_id: self.viewer_id.as_deref(),
        }
    }
}

/// Decodes a JSON body of events (one object, or an array) exactly as `POST /v1/events`
/// does, every rule checked against `limits` at `receive_ms`: the events, or the error
/// code and message the API would answer (one problem shown).
pub fn decode_events(
    text: &str,
    limits: &Limits,
    receive_ms: i64,
    events_max: usize,
) -> Result<Vec<DecodedEvent>, String> {
    let decoding = Decoding { limits, receive_ms, problems: RefCell::new(Problems::new(1)) };
    let events = decode(BodyFormat::Json, text, events_max, &decoding)
        .map_err(|e| format!("{}: {}", e.code.as_str(), e.message))?;
    let problems = decoding.problems.into_inner();
    if let Some(problem) = problems.shown.first() {
        let hint = problem.hint.as_deref().map(|hint| format!(" ({hint})")).unwrap_or_default();
        return Err(format!(
            "{}: event {} field {}: {}: {}{hint}",
            ErrorCode::InvalidEvents.as_str(),
            problem.index,
            problem.field,
            problem.code.as_str(),
            problem.reason
        ));
    }
    Ok(events
        .iter()
        .map(|event| {
            let event = event.resolved();
            DecodedEvent {
                video_id: event.video_id.into(),
                event_type: event.event_type.into(),
                ts_ms: event.ts_ms,
                value: event.value,
                event_id: event.event_id.map(Into::into),
                viewer_id: event.viewer_id.map(Into::into),
            }
        })
        .collect())
}

pub(crate) fn fuzz(ndjson: bool, bytes: &[u8]) -> Result<usize, &'static str> {
    const EVENTS_MAX: usize = 100;
    const SHOWN_MAX: usize = 10;
    let text = std::str::from_utf8(bytes).map_err(|_| ErrorCode::InvalidUtf8.as_str())?;
    let limits = tally_core::Limits::default();
    let decoding =
        Decoding { limits: &limits, receive_ms: 1_800_000_000_000, problems: RefCell::new(Problems::new(SHOWN_MAX)) };
    let format = if ndjson { BodyFormat::Ndjson } else { BodyFormat::Json };
    let events = decode(format, text, EVENTS_MAX, &decoding).map_err(|error| error.code.as_str())?;
    assert!(events.len() <= EVENTS_MAX, "decoded past the event limit");
    let problems = decoding.problems.into_inner();
    assert!(problems.shown.len() <= SHOWN_MAX && problems.shown.len() <= problems.total);
    assert!(problems.bad_events <= events.len());
    if problems.total > 0 {
        return Err(ErrorCode::InvalidEvents.as_str());
    }
    for event in &events {
        let mut errors = Vec::new();
        limits.check(0, &event.resolved(), 1_800_000_000_000, &mut errors);
        assert!(errors.is_empty(), "an event without problems breaks a rule: {errors:?}");
    }
    Ok(events.len())
}
