//! Query routes: `GET /v1/count`, `POST /v1/counts`, `GET /v1/series`, and the parameter
//! handling every query route shares.
//!
//! Times are RFC 3339 strings, integer epoch milliseconds, or local dates and times
//! (`2026-11-01`, `2026-11-01T08:00`) read in the `tz` time zone (UTC without one). Ranges
//! are half-open `[from, to)` and widened to whole minutes (whole steps for series), and
//! past a retention tier to that of the next coarser one. Every answer states the aligned
//! range it summed and the resolution it was summed at.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use jiff::tz::TimeZone;
use serde_json::{Value, json};
use tally_core::bucket::MINUTE_MS;
use tally_core::event::{EVENT_TYPE_BYTES_MAX, EVENT_TYPE_DEFAULT, VIDEO_ID_BYTES_MAX, check_id, is_event_type};
use tally_engine::{Engine, EngineError, Granularity, MinuteRange, Position};

use crate::wire::JsonObject;
use crate::{ApiError, AppState, ErrorCode, body, hint};

/// An instant: epoch milliseconds, an RFC 3339 timestamp, or a local date or date-time
/// read in `tz` (UTC when absent; a time that a daylight-saving change skips or repeats
/// is resolved like RFC 5545: the later offset for a gap, the earlier for a fold).
pub(crate) fn parse_instant(field: &'static str, text: &str, tz: Option<&TimeZone>) -> Result<i64, ApiError> {
    let Some(ms) = instant(text, tz) else {
        let message = format!(
            "{field} must be an RFC 3339 timestamp, epoch milliseconds, or a local date (2026-11-01) or date-time (2026-11-01T08:00)"
        );
        let hint = hint::plus_as_space(field, text, |meant| instant(meant, tz).is_some());
        return Err(ApiError::field(ErrorCode::InvalidField, field, message).with_hint(hint));
    };
    in_range(field, ms)
}

/// `text` as an instant (see `parse_instant`), in epoch milliseconds.
fn instant(text: &str, tz: Option<&TimeZone>) -> Option<i64> {
    if !text.is_empty() && text.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<i64>().ok();
    }
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Some(ts.as_millisecond());
    }
    let local = match text.parse::<jiff::civil::DateTime>() {
        Ok(datetime) => datetime,
        Err(_) => text.parse::<jiff::civil::Date>().ok()?.to_datetime(jiff::civil::Time::midnight()),
    };
    let utc = TimeZone::UTC;
    Some(tz.unwrap_or(&utc).to_zoned_datetime(local).ok()?.timestamp().as_millisecond())
}

/// The `tz` parameter: an IANA time zone name.
pub(crate) fn time_zone(p: &HashMap<&'static str, String>) -> Result<Option<TimeZone>, ApiError> {
    p.get("tz")
        .map(|name| {
            TimeZone::get(name).map_err(|_| {
                let shown: String = name.chars().take(64).collect();
                let hint = hint::plus_as_space("tz", name, |meant| TimeZone::get(meant).is_ok())
                    .or_else(|| hint::offset_as_tz(name));
                let message = format!("tz \"{shown}\" is not an IANA time zone name");
                ApiError::field(ErrorCode::InvalidField, "tz", message).with_hint(hint)
            })
        })
        .transpose()
}

/// `from` and `to` of a query string, read in its `tz`.
pub(crate) fn from_to(
    p: &HashMap<&'static str, String>,
    tz: Option<&TimeZone>,
) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let from = p.get("from").map(|t| parse_instant("from", t, tz)).transpose()?;
    let to = p.get("to").map(|t| parse_instant("to", t, tz)).transpose()?;
    Ok((from, to))
}

fn in_range(field: &'static str, ms: i64) -> Result<i64, ApiError> {
    // Two days short of the limits, so rounding outward to whole days stays representable.
    let limit = jiff::Timestamp::MAX.as_millisecond() - 2 * 86_400_000;
    if ms.unsigned_abs() > limit as u64 {
        return Err(ApiError::field(
            ErrorCode::InvalidField,
            field,
            format!("{field} is outside the years -9999 to 9999"),
        ));
    }
    Ok(ms)
}

fn instant_value(field: &'static str, value: &Value) -> Result<Option<i64>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => parse_instant(field, text, None).map(Some),
        Value::Number(n) => match n.as_i64() {
            Some(ms) => in_range(field, ms).map(Some),
            None => Err(ApiError::field(
                ErrorCode::InvalidField,
                field,
                format!("{field} must be integer epoch milliseconds"),
            )),
        },
        _ => Err(ApiError::field(ErrorCode::InvalidField, field, format!("{field} must be a string or an integer"))),
    }
}

/// Sums are exact 128-bit integers; an answer shows them clamped to the 64-bit range that
/// JSON tooling reads (reached only past about a thousand events of the maximum value).
pub(crate) fn sum_json(sum: i128) -> i64 {
    i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX })
}

pub(crate) fn rfc3339(minute: i64) -> String {
    jiff::Timestamp::from_millisecond(minute.saturating_mul(MINUTE_MS))
        .map(|ts| ts.to_string())
        .unwrap_or_else(|_| (minute * MINUTE_MS).to_string())
}

pub(crate) fn check_video_id(field: &'static str, video_id: &str) -> Result<(), ApiError> {
    check_id(video_id, VIDEO_ID_BYTES_MAX)
        .map_err(|reason| ApiError::field(ErrorCode::InvalidField, field, format!("{field} {reason}")))
}

pub(crate) fn check_type(event_type: &str) -> Result<(), ApiError> {
    if is_event_type(event_type) {
        Ok(())
    } else {
        let message = format!("type must match [a-z0-9_.-]{{1,{EVENT_TYPE_BYTES_MAX}}}");
        Err(ApiError::field(ErrorCode::InvalidField, "type", message))
    }
}

/// The query string's pairs, decoded strictly: `+` is a space, `%` must start two hex
/// digits, and every name and value must be UTF-8, so two different byte strings never
/// name the same video.
pub(crate) fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(raw) = raw else { return Ok(Vec::new()) };
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode_component(name).map_err(|reason| malformed_query(name, reason, None))?;
            let value = decode_component(value).map_err(|reason| malformed_query(value, reason, Some(&name)))?;
            Ok((name, value))
        })
        .collect()
}

/// 400 `malformed_query` for a component that does not decode; `field` when it is the
/// value of a parameter whose name did.
fn malformed_query(component: &str, reason: &str, field: Option<&str>) -> ApiError {
    let shown: String = component.chars().take(64).collect();
    let message = format!("query string component \"{shown}\" {reason}");
    match field {
        Some(field) => ApiError::field(ErrorCode::MalformedQuery, field, message),
        None => ApiError::new(ErrorCode::MalformedQuery, message),
    }
}

/// A query string component, percent- and `+`-decoded; or why it does not decode.
fn decode_component(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' => decoded.push(b' '),
            b'%' => {
                let hex = |i: usize| bytes.get(i).and_then(|b| (*b as char).to_digit(16));
                let (Some(high), Some(low)) = (hex(at + 1), hex(at + 2)) else {
                    return Err("has a % not followed by two hex digits");
                };
                decoded.push((high * 16 + low) as u8);
                at += 2;
            }
            byte => decoded.push(byte),
        }
        at += 1;
    }
    String::from_utf8(decoded).map_err(|_| "does not decode to UTF-8")
}

/// Parameters every query route takes: read-your-writes (`reach`).
const POSITION_PARAMS: [&str; 2] = ["after", "wait_ms"];

/// How long a query waits for `after` by default, and at most, milliseconds.
const WAIT_MS_DEFAULT: u64 = 5_000;
const WAIT_MS_MAX: u64 = 60_000;
/// How often a waiting query looks again.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// Query string parameters of a query route: `allowed` and the `POSITION_PARAMS`, each at
/// most once (see `params_among`).
pub(crate) fn params(
    pairs: Vec<(String, String)>,
    allowed: &[&'static str],
) -> Result<HashMap<&'static str, String>, ApiError> {
    let all: Vec<&'static str> = allowed.iter().chain(&POSITION_PARAMS).copied().collect();
    params_among(pairs, &all)
}

/// Query string parameters, each at most once (400 `duplicate_field`), none but `allowed`
/// (400 `unknown_field`, listing them).
pub(crate) fn params_among(
    pairs: Vec<(String, String)>,
    allowed: &[&'static str],
) -> Result<HashMap<&'static str, String>, ApiError> {
    let mut found = HashMap::new();
    for (name, value) in pairs {
        let Some(known) = allowed.iter().find(|a| **a == name) else {
            return Err(ApiError::unknown_field("parameter", &name, allowed));
        };
        if found.insert(*known, value).is_some() {
            let message = format!("parameter {known} given more than once");
            return Err(ApiError::field(ErrorCode::DuplicateField, known, message));
        }
    }
    Ok(found)
}

/// Read-your-writes: with `after` (the `position` a write answered), waits until every
/// partition it names has reached it here, up to `wait_ms`, then answers 503
/// `position_not_reached`. A query that follows sees the write.
pub(crate) async fn reach(engine: &Engine, p: &HashMap<&'static str, String>) -> Result<(), ApiError> {
    let Some(after) = p.get("after") else { return Ok(()) };
    let position: Position = after.parse().map_err(|e: String| ApiError::field(ErrorCode::InvalidField, "after", e))?;
    let wait_ms = match p.get("wait_ms") {
        None => WAIT_MS_DEFAULT,
        Some(text) => text.parse().ok().filter(|ms| *ms <= WAIT_MS_MAX).ok_or_else(|| {
            let message = format!("wait_ms must be 0 to {WAIT_MS_MAX} milliseconds");
            ApiError::field(ErrorCode::InvalidField, "wait_ms", message)
        })?,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    while !read(engine, |engine| engine.reached(&position))? {
        if tokio::time::Instant::now() >= deadline {
            let message = format!("the data did not reach position {position} within {wait_ms} ms; retry");
            return Err(ApiError::unavailable(ErrorCode::PositionNotReached, message));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
    Ok(())
}

/// The `video_id` parameter (required), checked.
pub(crate) fn video_param<'a>(p: &'a HashMap<&'static str, String>) -> Result<&'a str, ApiError> {
    let video_id = p
        .get("video_id")
        .ok_or_else(|| ApiError::field(ErrorCode::MissingField, "video_id", "video_id is required"))?;
    check_video_id("video_id", video_id)?;
    Ok(video_id)
}

/// The `type` parameter (default `view`), checked.
pub(crate) fn type_param<'a>(p: &'a HashMap<&'static str, String>) -> Result<&'a str, ApiError> {
    let event_type = p.get("type").map_or(EVENT_TYPE_DEFAULT, String::as_str);
    check_type(event_type)?;
    Ok(event_type)
}

/// Resolves `[from, to)` in milliseconds: absent `to` is the latest instant an event may
/// carry now (receive time plus the maximum clock skew); absent `from` is `span_default`
/// before `to`, or the epoch without one.
pub(crate) fn bounds(
    state: &AppState,
    engine: &Engine,
    given_from: Option<i64>,
    given_to: Option<i64>,
    span_default: Option<i64>,
) -> Result<(i64, i64), ApiError> {
    let to = given_to.unwrap_or_else(|| engine.now_ms() + state.config.limits.clock_skew_max_ms + 1);
    let from = given_from.unwrap_or_else(|| span_default.map_or(0, |span| to.saturating_sub(span)));
    if from > to {
        return Err(from_after_to(given_from, given_to));
    }
    Ok((from, to))
}

/// 400 `invalid_range`, with a hint if a bound given looks like epoch seconds.
fn from_after_to(given_from: Option<i64>, given_to: Option<i64>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRange, "from must not be after to")
        .with_hint(hint::range_in_seconds(given_from, given_to))
}

/// The range a query string asks for: `from`/`to` read in its `tz`, absent bounds
/// resolved (see `bounds`), widened past retention; and the resolution that needed.
pub(crate) fn asked_range(
    state: &AppState,
    engine: &Engine,
    p: &HashMap<&'static str, String>,
    span_default: Option<i64>,
) -> Result<(MinuteRange, Granularity), ApiError> {
    let tz = time_zone(p)?;
    let (from, to) = from_to(p, tz.as_ref())?;
    let (from, to) = bounds(state, engine, from, to, span_default)?;
    Ok(engine.plan_range(from, to))
}

/// Runs a store read. The embedded store answers from memory-mapped pages in
/// microseconds, inline; a database answers over the network, so its reads tell the
/// runtime this worker blocks (`block_in_place`: its other tasks move to another thread),
/// so that a slow database cannot stall ingest and health checks. The server runs on a
/// multi-threaded runtime, which that needs.
pub(crate) fn read<T>(engine: &Engine, work: impl FnOnce(&Engine) -> Result<T, EngineError>) -> Result<T, ApiError> {
    if engine.store_is_remote() {
        return Ok(tokio::task::block_in_place(|| work(engine))?);
    }
    Ok(work(engine)?)
}

/// An answer over a range: `body` plus the aligned range summed and its resolution.
pub(crate) fn ranged(range: MinuteRange, resolution: Granularity, mut body: Value) -> Json<Value> {
    let fields = body.as_object_mut().expect("answers are objects");
    fields.insert("from".into(), json!(rfc3339(range.start)));
    fields.insert("to".into(), json!(rfc3339(range.end)));
    fields.insert("resolution".into(), json!(resolution.name()));
    Json(body)
}

pub(crate) async fn count(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query.as_deref())?, &["video_id", "type", "from", "to", "tz"])?;
    reach(engine, &p).await?;
    let (video_id, event_type) = (video_param(&p)?, type_param(&p)?);
    let (range, resolution) = asked_range(&state, engine, &p, None)?;
    let counter = read(engine, |engine| engine.count(event_type, video_id, range))?;
    Ok(ranged(
        range,
        resolution,
        json!({ "video_id": video_id, "type": event_type, "count": counter.count, "sum": sum_json(counter.sum) }),
    ))
}

/// A `POST /v1/counts` body.
struct CountsRequest {
    video_ids: Vec<String>,
    event_type: Option<String>,
    from: Value,
    to: Value,
}

/// The fields of a `POST /v1/counts` body.
const COUNTS_FIELDS: [&str; 4] = ["video_ids", "type", "from", "to"];

/// Reads a `POST /v1/counts` body field by field, so that each mistake names its field:
/// unknown, given twice, missing (`video_ids`), or of the wrong type.
fn counts_request(bytes: &[u8]) -> Result<CountsRequest, ApiError> {
    let JsonObject(fields) = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(ErrorCode::MalformedJson, format!("request body is not a counts request object: {e}"))
    })?;
    let mut request = CountsRequest { video_ids: Vec::new(), event_type: None, from: Value::Null, to: Value::Null };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in fields {
        let Some(&field) = COUNTS_FIELDS.iter().find(|f| **f == name) else {
            return Err(ApiError::unknown_field("field", &name, &COUNTS_FIELDS));
        };
        if seen.contains(&field) {
            return Err(ApiError::field(ErrorCode::DuplicateField, field, format!("{field} is given more than once")));
        }
        seen.push(field);
        match field {
            "video_ids" => request.video_ids = video_ids_value(value)?,
            "type" => {
                request.event_type = match value {
                    Value::Null => None,
                    Value::String(event_type) => Some(event_type),
                    _ => return Err(ApiError::field(ErrorCode::InvalidField, "type", "type must be a string")),
                }
            }
            "from" => request.from = value,
            _ => request.to = value,
        }
    }
    if !seen.contains(&"video_ids") {
        return Err(ApiError::field(ErrorCode::MissingField, "video_ids", "video_ids is required"));
    }
    Ok(request)
}

/// `video_ids`: an array of strings (`index` names an item that is not one).
fn video_ids_value(value: Value) -> Result<Vec<String>, ApiError> {
    let invalid = || ApiError::field(ErrorCode::InvalidField, "video_ids", "video_ids must be an array of strings");
    let Value::Array(items) = value else { return Err(invalid()) };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::String(video_id) => Ok(video_id),
            _ => Err(invalid().with("index", json!(index))),
        })
        .collect()
}

/// Bytes of a `POST /v1/counts` body: room for the most ids allowed at their longest.
const COUNTS_BODY_BYTES_MAX: usize = 2 << 20;

pub(crate) async fn counts(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    reach(engine, &params(query_pairs(query.as_deref())?, &[])?).await?;
    let deadline = Duration::from_millis(state.config.body_read_timeout_ms);
    let body = body::read(body, COUNTS_BODY_BYTES_MAX, deadline, &state.body_budget).await?;
    let request = counts_request(&body.bytes)?;
    let ids_max = state.config.counts_video_ids_max;
    if request.video_ids.len() > ids_max {
        let message = format!("at most {ids_max} video_ids per request");
        return Err(ApiError::field(ErrorCode::TooManyVideoIds, "video_ids", message).with("limit", json!(ids_max)));
    }
    for (index, video_id) in request.video_ids.iter().enumerate() {
        check_video_id("video_ids", video_id).map_err(|e| e.with("index", json!(index)))?;
    }
    let event_type = request.event_type.as_deref().unwrap_or(EVENT_TYPE_DEFAULT);
    check_type(event_type)?;
    let (from, to) =
        bounds(&state, engine, instant_value("from", &request.from)?, instant_value("to", &request.to)?, None)?;
    let (range, resolution) = engine.plan_range(from, to);
    let video_ids: Vec<&str> = request.video_ids.iter().map(String::as_str).collect();
    let counters = read(engine, |engine| engine.counts(event_type, &video_ids, range))?;
    let counts: serde_json::Map<String, Value> =
        request.video_ids.iter().zip(counters).map(|(video_id, c)| (video_id.clone(), json!(c.count))).collect();
    Ok(ranged(range, resolution, json!({ "type": event_type, "counts": counts })))
}

/// Points a series has when neither `from` nor `to` is given.
const SERIES_DEFAULT_POINTS: i64 = 60;

pub(crate) async fn series(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query.as_deref())?, &["video_id", "type", "from", "to", "step", "tz"])?;
    reach(engine, &p).await?;
    let (video_id, event_type) = (video_param(&p)?, type_param(&p)?);
    let step_name = p.get("step").map_or("minute", String::as_str);
    let granularity = Granularity::from_name(step_name)
        .ok_or_else(|| ApiError::field(ErrorCode::InvalidField, "step", "step must be minute, hour or day"))?;
    let tz = time_zone(&p)?;
    let step_ms = granularity.minutes() * MINUTE_MS;
    let (given_from, given_to) = from_to(&p, tz.as_ref())?;
    let seconds_hint = |error: ApiError| match error.code {
        ErrorCode::TooManyPoints => error.with_hint(hint::range_in_seconds(given_from, given_to)),
        _ => error,
    };
    // Without bounds: the last 60 steps up to now. With one bound: 60 steps from it.
    let (from, to) = match (given_from, given_to) {
        (Some(from), Some(to)) => (from, to),
        (Some(from), None) => (from, from.saturating_add(SERIES_DEFAULT_POINTS * step_ms)),
        (None, Some(to)) => (to.saturating_sub(SERIES_DEFAULT_POINTS * step_ms), to),
        (None, None) => {
            let now = engine.now_ms();
            (now.saturating_sub((SERIES_DEFAULT_POINTS - 1) * step_ms), now + 1)
        }
    };
    if from > to {
        return Err(from_after_to(given_from, given_to));
    }
    if let (Granularity::Day, Some(tz)) = (granularity, &tz) {
        return local_days(&state, engine, video_id, event_type, tz, p.get("tz").expect("tz given"), from, to)
            .map_err(seconds_hint);
    }
    let (granularity, range) = engine.plan_series(granularity, from, to);
    let points_max = state.config.series_points_max;
    let points = (range.end - range.start) / granularity.minutes();
    if points > points_max as i64 {
        let message = format!("{points} points asked for; at most {points_max} per request");
        return Err(seconds_hint(ApiError::new(ErrorCode::TooManyPoints, message).with("limit", json!(points_max))));
    }
    let counters = read(engine, |engine| engine.series(event_type, video_id, granularity, range))?;
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
        "resolution": granularity.name(),
        "points": points,
    })))
}

/// A day series in a time zone: one point per local calendar day touching `[from, to)`,
/// each summed between the instants its day starts and the next one starts (23 or 25
/// hours across daylight-saving changes). Those instants are read at the finest tier
/// retained there: whole hours for most zones; minutes for half- and quarter-hour zones
/// while minute buckets are kept, otherwise rounded down to the hour (and then
/// `exact_boundaries` is false).
#[allow(clippy::too_many_arguments)]
fn local_days(
    state: &AppState,
    engine: &Engine,
    video_id: &str,
    event_type: &str,
    tz: &TimeZone,
    tz_name: &str,
    from: i64,
    to: i64,
) -> Result<Json<Value>, ApiError> {
    let date_of =
        |ms: i64| jiff::Timestamp::from_millisecond(ms).expect("checked range").to_zoned_datetime(tz.clone()).date();
    let first = date_of(from);
    let last = if to > from { date_of(to - 1) } else { first };
    let points_max = state.config.series_points_max;
    let unbuildable =
        |e: jiff::Error| ApiError::new(ErrorCode::InvalidRange, format!("local days cannot be built there: {e}"));
    // Day starts: one per day plus the start of the day after the last.
    let mut starts: Vec<jiff::ZonedDateTime> = Vec::new();
    let mut date = first;
    loop {
        starts.push(tz.to_zoned_datetime(date.to_datetime(jiff::civil::Time::midnight())).map_err(unbuildable)?);
        if date > last {
            break;
        }
        if starts.len() > points_max {
            return Err(ApiError::new(
                ErrorCode::TooManyPoints,
                format!("more than {points_max} days asked for; at most {points_max} per request"),
            )
            .with("limit", json!(points_max)));
        }
        date = date.tomorrow().map_err(unbuildable)?;
    }
    let instants: Vec<i64> = starts.iter().map(|start| start.timestamp().as_millisecond()).collect();
    let boundaries = engine.plan_boundaries(&instants);
    let local = |z: &jiff::ZonedDateTime| z.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string();
    let points: Vec<Value> = read(engine, |engine| engine.counts_between(event_type, video_id, &boundaries.minutes))?
        .into_iter()
        .zip(&starts)
        .map(|(counter, start)| {
            json!({
                "t": local(start),
                "date": start.date().to_string(),
                "count": counter.count,
                "sum": sum_json(counter.sum),
            })
        })
        .collect();
    Ok(Json(json!({
        "video_id": video_id,
        "type": event_type,
        "step": "day",
        "tz": tz_name,
        "from": local(&starts[0]),
        "to": local(starts.last().expect("at least two starts")),
        "resolution": boundaries.resolution.name(),
        "exact_boundaries": boundaries.exact,
        "points": points,
    })))
}
