//! Operations on the stored data, for keys with the `admin` scope: `POST
//! /v1/admin/recompute` rewrites the stored aggregates of whole days from the raw-event
//! archive.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use serde_json::{Value, json};
use tally_core::bucket::{DAY_MS, MINUTE_MS};
use tally_engine::RecomputeRange;

use crate::AppState;
use crate::error::{ApiError, ErrorCode};
use crate::query::{params_among, parse_instant, query_pairs, rfc3339};

pub(crate) async fn recompute(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let engine = Arc::clone(state.engine()?);
    let p = params_among(query_pairs(query.as_deref())?, &["from", "to"])?;
    let instant = |field: &'static str| -> Result<i64, ApiError> {
        let text = p.get(field).ok_or_else(|| {
            ApiError::field(ErrorCode::MissingField, field, format!("{field} is required (a day is rewritten whole)"))
        })?;
        parse_instant(field, text, None)
    };
    let (from_ms, to_ms) = (instant("from")?, instant("to")?);
    if from_ms >= to_ms {
        return Err(ApiError::new(ErrorCode::InvalidRange, "from must be before to"));
    }
    if to_ms - 1 - from_ms.div_euclid(DAY_MS) * DAY_MS >= DAY_MS {
        let message = "a request rewrites one UTC day: from and to must lie within the same day";
        return Err(ApiError::new(ErrorCode::InvalidRange, message)
            .with_hint(Some("tally recompute walks longer ranges day by day".into())));
    }
    let limits = &state.config.limits;
    let range = RecomputeRange {
        from_ms,
        to_ms,
        lateness_max_ms: limits.lateness_max_ms,
        clock_skew_max_ms: limits.clock_skew_max_ms,
    };
    let report = tokio::task::spawn_blocking(move || engine.recompute(range))
        .await
        .map_err(|error| ApiError::new(ErrorCode::Internal, format!("recompute stopped: {error}")))??;
    Ok(Json(json!({
        "from": rfc3339(report.from_ms / MINUTE_MS),
        "to": rfc3339(report.to_ms / MINUTE_MS),
        "files_read": report.files_read,
        "rows_read": report.rows_read,
        "events": report.events,
        "counters_written": report.counters_written,
        "counters_corrected": report.counters_corrected,
        "flush_hold_ms": report.flush_hold_ms,
        "seconds": report.seconds,
    })))
}
