//! tally's HTTP API, version 1. Only this crate knows JSON: it decodes wire events into
//! core events, validates them, hands them to the engine, and renders query results.
//!
//! Architecture invariant: a 200 on `POST /v1/events` is sent only after the engine
//! reported the events durable and applied; every other outcome counts nothing that the
//! response does not say it counted.

mod admin;
mod analytics;
mod auth;
mod body;
mod cors;
mod error;
mod hint;
mod ingest;
mod listen;
mod metric_help;
mod monitoring;
mod process;
mod query;
mod web;
mod wire;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::routing::{MethodRouter, get, post};
use tally_core::Limits;
use tally_engine::Engine;
use tokio::sync::Semaphore;

pub use auth::{KeyEntry, KeyFile, Scope, secret_sha256, token};
pub use error::{ApiError, ErrorCode};
pub use listen::{ADMIN_CONNECTIONS_MAX, SHED_CONNECTIONS_MAX, serve, serve_admin};
pub use monitoring::install_metrics;

/// Every HTTP-level limit. Defaults are documented where they are set.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body, bytes; larger ones get 413 without being buffered.
    pub body_bytes_max: usize,
    /// Body bytes held by all requests being read or parsed at once, charged as the bytes
    /// arrive; past it requests get 503, so many large concurrent bodies cannot exhaust
    /// memory and a client that declares a large body but trickles it holds only what it sent.
    pub body_bytes_in_flight_max: usize,
    /// Milliseconds a request body may take to arrive whole; slower ones get 408.
    pub body_read_timeout_ms: u64,
    /// Milliseconds from a request's first byte until its head must be complete.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a connection may stay idle between requests before it is closed.
    pub keep_alive_idle_ms: u64,
    /// Connections served at once; past it a connection gets a fast 503 (health checks
    /// still answer).
    pub connections_max: usize,
    /// Events one request may carry.
    pub events_per_request_max: usize,
    /// Bad events a 400 lists at most (the total is always given).
    pub field_errors_max: usize,
    /// Video ids one `POST /v1/counts` may ask for.
    pub counts_video_ids_max: usize,
    /// Points one `GET /v1/series` may return.
    pub series_points_max: usize,
    /// Origins whose pages may call the API and read its answers (CORS); `*` for any.
    /// Empty: same-origin only (beacons, which need no preflight, still get in).
    pub cors_origins: Vec<String>,
    /// The API keys file (`tally keys` edits it); none: no keys.
    pub keys_file: Option<std::path::PathBuf>,
    /// Whether every route but health, the OpenAPI document and the beacon script needs a
    /// key (401 without one).
    pub keys_required: bool,
    pub limits: Limits,
    /// Whether every request is logged (target `tally::access`).
    pub access_log: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            body_bytes_max: 16 << 20,
            body_bytes_in_flight_max: 512 << 20,
            body_read_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            keep_alive_idle_ms: 60_000,
            connections_max: 10_000,
            events_per_request_max: 100_000,
            field_errors_max: 100,
            counts_video_ids_max: 1_000,
            series_points_max: 10_080,
            cors_origins: Vec::new(),
            keys_file: None,
            keys_required: false,
            limits: Limits::default(),
            access_log: false,
        }
    }
}

pub struct AppState {
    config: ServerConfig,
    /// Set once recovery is complete; until then every data route answers 503.
    engine: OnceLock<Arc<Engine>>,
    body_budget: Arc<Semaphore>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stopping: std::sync::atomic::AtomicBool,
    keys: auth::Keys,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Arc<AppState> {
        Arc::new(AppState {
            keys: auth::Keys::new(config.keys_file.clone(), config.keys_required),
            body_budget: Arc::new(Semaphore::new(config.body_bytes_in_flight_max)),
            config,
            engine: OnceLock::new(),
            metrics: install_metrics(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks recovery complete: data routes and `/readyz` start answering.
    pub fn set_engine(&self, engine: Arc<Engine>) {
        metrics::gauge!("tally_recovery_seconds").set(engine.recovery().duration.as_secs_f64());
        let _ = self.engine.set(engine);
    }

    /// Marks the server as draining: `/readyz` answers 503 so load balancers stop sending.
    pub fn set_stopping(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        self.engine.get().ok_or_else(|| ApiError::unavailable(ErrorCode::Recovering, "recovery is in progress".into()))
    }
}

pub use ingest::{DecodedEvent, decode_events};

/// Fuzzing entry point: decodes and checks `bytes` as a `POST /v1/events` body (NDJSON or
/// JSON) with the default limits, at most 100 events. Returns the events, or the error
/// code of the 4xx the server would answer; must never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_ingest_body(ndjson: bool, bytes: &[u8]) -> Result<usize, &'static str> {
    ingest::fuzz(ndjson, bytes)
}

/// Method, path, handler, and the key scope the route needs.
type Route = (&'static str, &'static str, MethodRouter<Arc<AppState>>, Option<Scope>);

/// Every route: method, path, handler, and the key scope it needs. The router is built
/// from this table alone, and the OpenAPI document is checked against it (`routes`), so
/// neither can drift.
fn table() -> [Route; 16] {
    [
        ("post", "/v1/events", post(ingest::ingest), Some(Scope::Write)),
        ("get", "/v1/count", get(query::count), Some(Scope::Read)),
        ("post", "/v1/counts", post(query::counts), Some(Scope::Read)),
        ("get", "/v1/series", get(query::series), Some(Scope::Read)),
        ("get", "/v1/top", get(analytics::top), Some(Scope::Read)),
        ("get", "/v1/uniques", get(analytics::uniques), Some(Scope::Read)),
        ("get", "/v1/stats", get(analytics::stats), Some(Scope::Read)),
        ("get", "/v1/openapi.json", get(monitoring::openapi), None),
        ("get", "/v1/tally.js", get(web::tally_js), None),
        ("get", "/", get(web::dashboard), None),
        ("get", "/ui/uplot.js", get(web::uplot_js), None),
        ("get", "/ui/uplot.css", get(web::uplot_css), None),
        ("get", "/healthz", get(monitoring::healthz), None),
        ("get", "/readyz", get(monitoring::readyz), None),
        ("get", "/metrics", get(monitoring::metrics), Some(Scope::Admin)),
        ("post", "/v1/admin/recompute", post(admin::recompute), Some(Scope::Admin)),
    ]
}

/// Every route the router serves, as (method, path).
pub fn routes() -> Vec<(&'static str, &'static str)> {
    table().into_iter().map(|(method, path, _, _)| (method, path)).collect()
}

pub fn router(state: Arc<AppState>) -> Router {
    // Only when keys are in use: a layer costs every request a little.
    let keys = state.keys.enabled();
    let mut router = table()
        .into_iter()
        .fold(Router::new(), |router, (_, path, handler, scope)| match scope.filter(|_| keys) {
            Some(scope) => {
                let layer = axum::middleware::from_fn_with_state((Arc::clone(&state), scope), auth::authorize);
                router.route(path, handler.layer(layer))
            }
            None => router.route(path, handler),
        })
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() });
    // Only when configured: a layer costs every request a little.
    if !state.config.cors_origins.is_empty() || state.keys.enabled() {
        router = router.layer(axum::middleware::from_fn_with_state(Arc::clone(&state), cors::cors));
    }
    if state.config.access_log {
        router = router.layer(axum::middleware::from_fn(monitoring::access_log));
    }
    router.layer(axum::middleware::from_fn(monitoring::track_request)).with_state(state)
}
