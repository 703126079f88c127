//! `POST /v1/events`: read the body under its limits, decode and validate every event,
//! submit the whole batch, answer once it is durable.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::json;
use tally_core::event::EVENT_TYPE_DEFAULT;
use tally_core::{EventRef, FieldError};
use tally_engine::IdempotencyKey;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::wire::{OneOrMany, WireEvent, WireTs};
use crate::{ApiError, AppState};

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
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type {shown} is not supported; use application/json or application/x-ndjson"),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Err(unsupported("(none)")) };
    let text = value.to_str().map_err(|_| unsupported("(not ASCII)"))?;
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" => Ok(BodyFormat::Ndjson),
        _ => Err(unsupported(&format!("\"{}\"", text.chars().take(100).collect::<String>()))),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let bad = |reason: &str| ApiError::bad_request("invalid_idempotency_key", format!("Idempotency-Key {reason}"));
    let key = value.to_str().map_err(|_| bad("must be visible ASCII"))?;
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(bad(&format!("must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes")));
    }
    Ok(Some(key))
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body is over the limit of {limit} bytes"),
    )
    .with("limit_bytes", json!(limit))
}

pub(crate) async fn ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let engine = Arc::clone(state.engine()?);
    let format = body_format(&headers)?;
    let key = idempotency_key(&headers)?;
    let limit = state.config.body_bytes_max;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let reserve = declared.unwrap_or(limit).max(1);
    let _budget = Arc::clone(&state.body_budget)
        .try_acquire_many_owned(reserve as u32)
        .map_err(|_| ApiError::unavailable("overloaded", "too many request bodies in flight".into()))?;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|error| {
        let over_limit =
            std::error::Error::source(&error).is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large(limit)
        } else {
            ApiError::bad_request("body_unreadable", format!("could not read the request body: {error}"))
        }
    })?;

    let receive_ms = (state.clock)();
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        ApiError::bad_request("invalid_utf8", format!("request body is not valid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    let wire_events = decode(format, text, state.config.events_per_request_max)?;
    let mut errors = Vec::new();
    let events = to_events(&wire_events, receive_ms, &state, &mut errors);
    if !errors.is_empty() {
        metrics::counter!("tally_events_rejected_total").increment(wire_events.len() as u64);
        let shown: Vec<_> = errors
            .iter()
            .take(state.config.field_errors_max)
            .map(|e| json!({ "index": e.index, "field": e.field, "reason": e.reason }))
            .collect();
        let bad_events = errors.iter().map(|e| e.index).collect::<std::collections::BTreeSet<_>>().len();
        return Err(ApiError::bad_request(
            "invalid_events",
            format!("{bad_events} of {} events are invalid; nothing was counted", wire_events.len()),
        )
        .with("errors", json!(shown))
        .with("error_count", json!(errors.len())));
    }

    let key = key.map(|key| IdempotencyKey { key, fingerprint: xxh3_64_with_seed(&bytes, format as u64) });
    // The accepted and duplicate counters are kept by the partition writers, which know
    // whether a request was counted now or answered again from dedup memory.
    let outcome = engine.submit(&events, key, receive_ms)?.outcome().await?;
    Ok(axum::Json(json!({ "accepted": outcome.accepted, "duplicates": outcome.duplicates })))
}

fn decode(format: BodyFormat, text: &str, events_max: usize) -> Result<Vec<WireEvent<'_>>, ApiError> {
    let too_many = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("a request may carry at most {events_max} events"),
        )
        .with("limit_events", json!(events_max))
    };
    let events = match format {
        BodyFormat::Json => match serde_json::from_str::<OneOrMany<'_>>(text) {
            Ok(OneOrMany::One(event)) => vec![event],
            Ok(OneOrMany::Many(events)) => events,
            Err(error) => {
                return Err(ApiError::bad_request(
                    "malformed_json",
                    format!("request body is not valid JSON: {error}"),
                ));
            }
        },
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
                let event = serde_json::from_str::<WireEvent<'_>>(line).map_err(|error| {
                    ApiError::bad_request(
                        "malformed_json",
                        format!("line {} is not a JSON event object: {error}", line_index + 1),
                    )
                    .with("line", json!(line_index + 1))
                })?;
                events.push(event);
            }
            events
        }
    };
    if events.len() > events_max {
        return Err(too_many());
    }
    Ok(events)
}

/// Resolves defaults and checks every rule; fills `errors` and returns the events that
/// would be submitted (meaningless when `errors` is not empty).
fn to_events<'a>(
    wire: &'a [WireEvent<'a>],
    receive_ms: i64,
    state: &AppState,
    errors: &mut Vec<FieldError>,
) -> Vec<EventRef<'a>> {
    let mut events = Vec::with_capacity(wire.len());
    for (index, event) in wire.iter().enumerate() {
        let errors_before = errors.len();
        for (field, reason) in &event.problems {
            errors.push(FieldError { index, field: field.clone(), reason: reason.clone() });
        }
        let ts_ms = match &event.ts {
            WireTs::Absent => receive_ms,
            WireTs::Millis(ms) => *ms,
            WireTs::Text(text) => match text.parse::<jiff::Timestamp>() {
                Ok(ts) => ts.as_millisecond(),
                Err(_) => {
                    errors.push(FieldError {
                        index,
                        field: "ts".into(),
                        reason: "is not an RFC 3339 timestamp".into(),
                    });
                    receive_ms
                }
            },
        };
        let resolved = EventRef {
            video_id: event.video_id.as_deref().unwrap_or(""),
            event_type: event.event_type.as_deref().unwrap_or(EVENT_TYPE_DEFAULT),
            ts_ms,
            value: event.value,
            event_id: event.event_id.as_deref(),
            viewer_id: event.viewer_id.as_deref(),
        };
        let mut rule_errors = Vec::new();
        state.config.limits.check(index, &resolved, receive_ms, &mut rule_errors);
        // One reason per field: a field that failed to decode is not also checked.
        rule_errors.retain(|e| !errors[errors_before..].iter().any(|d| d.field == e.field));
        errors.extend(rule_errors);
        events.push(resolved);
    }
    events
}
