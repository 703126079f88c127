//! Monitoring: `/healthz`, `/readyz`, Prometheus `/metrics` (request latency per route,
//! engine gauges), and the OpenAPI document.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::AppState;

/// Latency buckets, seconds: 50 µs to 2 minutes, dense below a millisecond where reads
/// live; flushes of millions of cells take tens of seconds.
const LATENCY_BUCKETS_S: [f64; 19] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
    60.0, 120.0,
];
/// Group sizes (requests per fdatasync) and flushed cells (up to 16 M).
const COUNT_BUCKETS: [f64; 15] =
    [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 16384.0, 262144.0, 1048576.0, 4194304.0, 16777216.0];

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS_S)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("tally_wal_group_records".into()), &COUNT_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("tally_flush_cells".into()), &COUNT_BUCKETS))
                .expect("valid buckets")
                .install_recorder()
                .inspect(|_| crate::metric_help::describe())
                .expect("install the Prometheus recorder")
        })
        .clone()
}

pub(crate) async fn track_request(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("tally_http_request_duration_seconds", "route" => route, "method" => method, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Longest path (and X-Forwarded-For) an access log line shows; longer paths are cut and
/// marked so.
const LOGGED_PATH_CHARS_MAX: usize = 256;

/// One `tally::access` log line per request: method, path (never the query, which may
/// hold a key), status, response bytes, duration, client address and `X-Forwarded-For`.
pub(crate) async fn access_log(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let mut path: String = request.uri().path().chars().take(LOGGED_PATH_CHARS_MAX).collect();
    if path.len() < request.uri().path().len() {
        path.push('…');
    }
    let client = request.extensions().get::<crate::listen::Peer>().map(|peer| peer.0.to_string());
    let forwarded_for = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(LOGGED_PATH_CHARS_MAX).collect::<String>());
    let started = Instant::now();
    let response = next.run(request).await;
    // The body's length when known whole (every answer but a stream).
    let bytes = axum::body::HttpBody::size_hint(response.body()).exact();
    tracing::info!(
        target: "tally::access",
        %method,
        path,
        status = response.status().as_u16(),
        bytes,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        client,
        forwarded_for,
        "request"
    );
    response
}

pub(crate) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (status, text) = match state.engine.get() {
        None => (StatusCode::SERVICE_UNAVAILABLE, "recovering"),
        Some(_) if state.stopping.load(Ordering::Acquire) => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        Some(engine) if !engine.is_healthy() => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
        Some(_) => (StatusCode::OK, "ready"),
    };
    let mut body = json!({ "status": text });
    // Archiving trouble does not stop ingest (the log keeps what waits): said, not refused.
    if let Some(archive) = state.engine.get().and_then(|engine| engine.archive_status()) {
        body["archive"] = json!({
            "status": if archive.error.is_some() { "failing" } else { "ok" },
            "error": archive.error,
            "lag_bytes": archive.lag_bytes,
        });
    }
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(engine) = state.engine.get() {
        let stats = engine.stats();
        metrics::gauge!("tally_queue_bytes").set(stats.queue_bytes as f64);
        metrics::gauge!("tally_engine_failed").set(if stats.failed { 1.0 } else { 0.0 });
        metrics::gauge!("tally_store_failing").set(if stats.store_failing { 1.0 } else { 0.0 });
        metrics::gauge!("tally_event_types").set(stats.event_types as f64);
        for (index, p) in stats.partitions.iter().enumerate() {
            let label = index.to_string();
            metrics::gauge!("tally_partition_queued_appends", "partition" => label.clone())
                .set(p.queued_appends as f64);
            metrics::gauge!("tally_partition_pending_cells", "partition" => label.clone()).set(p.pending_cells as f64);
            metrics::gauge!("tally_partition_dedup_entries", "partition" => label.clone()).set(p.dedup_entries as f64);
            metrics::gauge!("tally_wal_segments", "partition" => label.clone()).set(p.wal_segments as f64);
            metrics::gauge!("tally_wal_bytes", "partition" => label.clone()).set(p.wal_bytes as f64);
            metrics::gauge!("tally_partition_applied_offset", "partition" => label.clone())
                .set(p.applied_offset as f64);
            metrics::gauge!("tally_partition_checkpoint_offset", "partition" => label).set(p.checkpoint_offset as f64);
        }
    }
    metrics::gauge!("tally_body_bytes_in_flight")
        .set((state.config.body_bytes_in_flight_max - state.body_budget.available_permits()) as f64);
    let mut text = state.metrics.render();
    crate::process::render(&mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub(crate) const OPENAPI_JSON: &str = include_str!("../openapi.json");

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}
