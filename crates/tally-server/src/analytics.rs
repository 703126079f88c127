//! Analytics routes: `GET /v1/top` (trending videos), `GET /v1/uniques` (distinct
//! viewers) and `GET /v1/stats` (every event type of a video in one call).
//!
//! They take the same range parameters as `/v1/count` (see `query`) and run on the
//! blocking pool: a top query may count thousands of candidates.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::{Value, json};
use tally_core::hll::Hll;
use tally_engine::Engine;

use crate::query::{asked_range, params, query_pairs, ranged, reach, sum_json, type_param, video_param};
use crate::{ApiError, AppState, ErrorCode};

/// Most videos one top answer lists.
pub const TOP_K_MAX: usize = 1_000;
const TOP_K_DEFAULT: usize = 10;
/// The range of a top query without `from`: the last hour ("trending now").
const TOP_DEFAULT_SPAN_MS: i64 = 3_600_000;

async fn blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    work: impl FnOnce(&Engine) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let engine = Arc::clone(engine);
    tokio::task::spawn_blocking(move || work(&engine))
        .await
        .map_err(|e| ApiError::internal(format!("query task failed: {e}")))?
}

pub(crate) async fn top(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query.as_deref())?, &["type", "from", "to", "k", "exact", "tz"])?;
    reach(engine, &p).await?;
    let event_type = type_param(&p)?.to_string();
    let k = match p.get("k") {
        None => TOP_K_DEFAULT,
        Some(text) => text.parse::<usize>().ok().filter(|k| (1..=TOP_K_MAX).contains(k)).ok_or_else(|| {
            ApiError::field(ErrorCode::InvalidField, "k", format!("k must be an integer from 1 to {TOP_K_MAX}"))
        })?,
    };
    let exact = match p.get("exact").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::field(ErrorCode::InvalidField, "exact", "exact must be true or false"));
        }
    };
    let (range, resolution) = asked_range(&state, engine, &p, Some(TOP_DEFAULT_SPAN_MS))?;
    let answer = {
        let event_type = event_type.clone();
        blocking(engine, move |engine| Ok(engine.top(&event_type, range, k, exact)?)).await?
    };
    let items: Vec<Value> = answer
        .items
        .iter()
        .map(|item| json!({ "video_id": item.video_id, "count": item.count, "error": item.error }))
        .collect();
    Ok(ranged(
        range,
        resolution,
        json!({
            "type": event_type,
            "k": k,
            "exact": answer.exact,
            "unlisted_max": answer.unlisted_max,
            "candidates_counted": answer.refined,
            "items": items,
        }),
    ))
}

pub(crate) async fn uniques(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query.as_deref())?, &["video_id", "type", "from", "to", "tz"])?;
    reach(engine, &p).await?;
    let (video_id, event_type) = (video_param(&p)?, type_param(&p)?);
    let (range, resolution) = asked_range(&state, engine, &p, None)?;
    let sketch: Hll = {
        let (video_id, event_type) = (video_id.to_string(), event_type.to_string());
        blocking(engine, move |engine| Ok(engine.uniques(&event_type, &video_id, range)?)).await?
    };
    Ok(ranged(
        range,
        resolution,
        json!({
            "video_id": video_id,
            "type": event_type,
            "uniques": sketch.estimate().round() as u64,
            "relative_error": sketch.relative_error(),
        }),
    ))
}

pub(crate) async fn stats(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let engine = state.engine()?;
    let p = params(query_pairs(query.as_deref())?, &["video_id", "from", "to", "tz"])?;
    reach(engine, &p).await?;
    let video_id = video_param(&p)?;
    let (range, resolution) = asked_range(&state, engine, &p, None)?;
    let by_type = {
        let video_id = video_id.to_string();
        blocking(engine, move |engine| Ok(engine.type_stats(&video_id, range)?)).await?
    };
    let types: serde_json::Map<String, Value> = by_type
        .into_iter()
        .map(|(event_type, c)| {
            let avg = c.sum as f64 / c.count as f64;
            (event_type, json!({ "count": c.count, "sum": sum_json(c.sum), "avg": avg }))
        })
        .collect();
    Ok(ranged(range, resolution, json!({ "video_id": video_id, "types": types })))
}
