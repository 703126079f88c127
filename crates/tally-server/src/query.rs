//! Query routes: `GET /v1/count`, `POST /v1/counts`, `GET /v1/series`.
//!
//! Times are RFC 3339 strings or integer epoch milliseconds; ranges are half-open
//! `[from, to)` and widened to whole minutes (whole steps for series). Every answer states
//! the aligned range it summed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_core::bucket::MINUTE_MS;
use tally_core::event::{EVENT_TYPE_DEFAULT, VIDEO_ID_BYTES_MAX, check_id, is_event_type};
use tally_engine::{Granularity, MinuteRange};

use crate::{ApiError, AppState};

fn parse_instant(field: &'static str, text: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_parameter",
            format!("{field} must be an RFC 3339 timestamp or epoch milliseconds"),
        )
        .with("field", json!(field))
    };
    let ms = if !text.is_empty() && text.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<i64>().map_err(|_| bad())?
    } else {
        text.parse::<jiff::Timestamp>().map(|ts| ts.as_millisecond()).map_err(|_| bad())?
    };
    in_range(field, ms)
}

/// Instants must lie within years -9999 to 9999, the range answers can be written in.
fn in_range(field: &'static str, ms: i64) -> Result<i64, ApiError> {
    // Two days short of the limits, so rounding outward to whole days stays representable.
    let limit = jiff::Timestamp::MAX.as_millisecond() - 2 * 86_400_000;
    if ms.unsigned_abs() > limit as u64 {
        return Err(ApiError::bad_request("invalid_parameter", format!("{field} is outside the years -9999 to 9999"))
            .with("field", json!(field)));
    }
    Ok(ms)
}

fn instant_value(field: &'static str, value: &Value) -> Result<Option<i64>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => parse_instant(field, text).map(Some),
        Value::Number(n) => match n.as_i64() {
            Some(ms) => in_range(field, ms).map(Some),
            None => {
                Err(ApiError::bad_request("invalid_parameter", format!("{field} must be integer epoch milliseconds"))
                    .with("field", json!(field)))
            }
        },
        _ => Err(ApiError::bad_request("invalid_parameter", format!("{field} must be a string or an integer"))
            .with("field", json!(field))),
    }
}

/// Sums are exact 128-bit integers; an answer shows them clamped to the 64-bit range that
/// JSON tooling reads (reached only past about a thousand events of the maximum value).
fn sum_json(sum: i128) -> i64 {
    i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX })
}

fn rfc3339(minute: i64) -> String {
    jiff::Timestamp::from_millisecond(minute.saturating_mul(MINUTE_MS))
        .map(|ts| ts.to_string())
        .unwrap_or_else(|_| (minute * MINUTE_MS).to_string())
}

fn check_video_id(field: &'static str, video_id: &str) -> Result<(), ApiError> {
    check_id(video_id, VIDEO_ID_BYTES_MAX).map_err(|reason| {
        ApiError::bad_request("invalid_parameter", format!("{field} {reason}")).with("field", json!(field))
    })
}

fn check_type(event_type: &str) -> Result<(), ApiError> {
    if is_event_type(event_type) {
        Ok(())
    } else {
        Err(ApiError::bad_request("invalid_parameter", "type must match [a-z0-9_.-]{1,32}")
            .with("field", json!("type")))
    }
}

fn query_pairs(query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Vec<(String, String)>, ApiError> {
    query.map(|Query(pairs)| pairs).map_err(|e| ApiError::bad_request("invalid_parameter", e.body_text()))
}

/// Query string parameters, each at most once, none unknown.
fn params(pairs: Vec<(String, String)>, allowed: &[&'static str]) -> Result<HashMap<&'static str, String>, ApiError> {
    let mut found = HashMap::new();
    for (name, value) in pairs {
        let Some(known) = allowed.iter().find(|a| **a == name) else {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("unknown parameter \"{shown}\"; allowed: {}", allowed.join(", ")),
            ));
        };
        if found.insert(*known, value).is_some() {
            return Err(ApiError::bad_request("invalid_parameter", format!("parameter {known} given more than once")));
        }
    }
    Ok(found)
}

/// The `video_id` (required) and `type` (default `view`) parameters, checked.
fn video_and_type<'a>(p: &'a HashMap<&'static str, String>) -> Result<(&'a str, &'a str), ApiError> {
    let video_id = p.get("video_id").ok_or_else(|| {
        ApiError::bad_request("invalid_parameter", "video_id is required").with("field", json!("video_id"))
    })?;
    check_video_id("video_id", video_id)?;
    let event_type = p.get("type").map_or(EVENT_TYPE_DEFAULT, String::as_str);
    check_type(event_type)?;
    Ok((video_id, event_type))
}

/// Resolves `[from, to)` in milliseconds: absent `from` is the epoch, absent `to` is the
/// latest instant an event may carry now (receive time plus the maximum clock skew).
fn bounds(state: &AppState, from: Option<i64>, to: Option<i64>) -> Result<(i64, i64), ApiError> {
    let from = from.unwrap_or(0);
    let to = to.unwrap_or_else(|| (state.clock)() + state.config.limits.clock_skew_max_ms + 1);
    if from > to {
        return Err(ApiError::bad_request("invalid_range", "from must not be after to"));
    }
    Ok((from, to))
}

pub(crate) async fn count(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query)?, &["video_id", "type", "from", "to"])?;
    let (video_id, event_type) = video_and_type(&p)?;
    let from = p.get("from").map(|t| parse_instant("from", t)).transpose()?;
    let to = p.get("to").map(|t| parse_instant("to", t)).transpose()?;
    let (from, to) = bounds(&state, from, to)?;
    let range = MinuteRange::covering(from, to);
    let counter = engine.count(event_type, video_id, range)?;
    Ok(Json(json!({
        "video_id": video_id,
        "type": event_type,
        "from": rfc3339(range.start),
        "to": rfc3339(range.end),
        "count": counter.count,
        "sum": sum_json(counter.sum),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountsRequest {
    video_ids: Vec<String>,
    #[serde(rename = "type", default)]
    event_type: Option<String>,
    #[serde(default)]
    from: Value,
    #[serde(default)]
    to: Value,
}

pub(crate) async fn counts(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let body = body.map_err(|e| ApiError::new(e.status(), "body_unreadable", e.body_text()))?;
    let request: CountsRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("request body is not a valid counts request: {e}"))
    })?;
    let ids_max = state.config.counts_video_ids_max;
    if request.video_ids.len() > ids_max {
        return Err(ApiError::bad_request("too_many_video_ids", format!("at most {ids_max} video_ids per request"))
            .with("limit", json!(ids_max)));
    }
    for (index, video_id) in request.video_ids.iter().enumerate() {
        check_video_id("video_ids", video_id).map_err(|e| e.with("index", json!(index)))?;
    }
    let event_type = request.event_type.as_deref().unwrap_or(EVENT_TYPE_DEFAULT);
    check_type(event_type)?;
    let (from, to) = bounds(&state, instant_value("from", &request.from)?, instant_value("to", &request.to)?)?;
    let range = MinuteRange::covering(from, to);
    let video_ids: Vec<&str> = request.video_ids.iter().map(String::as_str).collect();
    let counters = engine.counts(event_type, &video_ids, range)?;
    let counts: serde_json::Map<String, Value> =
        request.video_ids.iter().zip(counters).map(|(video_id, c)| (video_id.clone(), json!(c.count))).collect();
    Ok(Json(json!({
        "type": event_type,
        "from": rfc3339(range.start),
        "to": rfc3339(range.end),
        "counts": counts,
    })))
}

/// Points a series has when neither `from` nor `to` is given.
const SERIES_DEFAULT_POINTS: i64 = 60;

pub(crate) async fn series(
    State(state): State<Arc<AppState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query)?, &["video_id", "type", "from", "to", "step"])?;
    let (video_id, event_type) = video_and_type(&p)?;
    let step_name = p.get("step").map_or("minute", String::as_str);
    let granularity = Granularity::from_name(step_name).ok_or_else(|| {
        ApiError::bad_request("invalid_parameter", "step must be minute, hour or day").with("field", json!("step"))
    })?;
    let step_ms = granularity.minutes() * MINUTE_MS;
    let from = p.get("from").map(|t| parse_instant("from", t)).transpose()?;
    let to = p.get("to").map(|t| parse_instant("to", t)).transpose()?;
    // Without bounds: the last 60 steps up to now. With one bound: 60 steps from it.
    let (from, to) = match (from, to) {
        (Some(from), Some(to)) => (from, to),
        (Some(from), None) => (from, from.saturating_add(SERIES_DEFAULT_POINTS * step_ms)),
        (None, Some(to)) => (to.saturating_sub(SERIES_DEFAULT_POINTS * step_ms), to),
        (None, None) => {
            let now = (state.clock)();
            (now.saturating_sub((SERIES_DEFAULT_POINTS - 1) * step_ms), now + 1)
        }
    };
    if from > to {
        return Err(ApiError::bad_request("invalid_range", "from must not be after to"));
    }
    let minutes = MinuteRange::covering(from, to);
    let range = MinuteRange {
        start: granularity.bucket_of(minutes.start),
        end: granularity.bucket_of(minutes.end + granularity.minutes() - 1),
    };
    let points_max = state.config.series_points_max;
    let points = (range.end - range.start) / granularity.minutes();
    if points > points_max as i64 {
        return Err(ApiError::bad_request(
            "too_many_points",
            format!("{points} points asked for; at most {points_max} per request"),
        )
        .with("limit", json!(points_max)));
    }
    let counters = engine.series(event_type, video_id, granularity, range)?;
    let points: Vec<Value> = counters
        .iter()
        .enumerate()
        .map(|(i, c)| json!({ "t": rfc3339(range.start + i as i64 * granularity.minutes()), "count": c.count, "sum": sum_json(c.sum) }))
        .collect();
    Ok(Json(json!({
        "video_id": video_id,
        "type": event_type,
        "step": granularity.name(),
        "from": rfc3339(range.start),
        "to": rfc3339(range.end),
        "points": points,
    })))
}
