//! Connections: accept under a limit, cut slow and idle clients, shed the excess with a
//! fast 503, and give hyper's own protocol errors (400, 414, 431) the JSON error body. The
//! shed and admin routers answer unknown paths and methods with JSON errors too.
//!
//! Each connection has a watchdog that knows one of three phases: idle (between requests:
//! `keep_alive_idle_ms`), reading a request head (from its first byte: `header_read_timeout_ms`)
//! and busy (a handler runs; the body deadline is the handler's, see `body.rs`). A connection
//! past its phase's deadline is closed. Over `connections_max`, a connection is served by a
//! small router that still answers `/healthz` and `/readyz` and refuses everything else
//! with 503, one request per connection; past that second limit it is closed at once.
//! An optional admin listener serves health, readiness and metrics apart from all that.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower_service::Service;

use crate::error::{ApiError, ErrorCode};
use crate::{AppState, monitoring};

/// Connections over the limit that are still read (for health checks) before being closed.
pub const SHED_CONNECTIONS_MAX: usize = 256;
/// How long an over-limit connection may take to send its request head: short, so that
/// idle connections cannot hold the slots that health checks need.
const SHED_HEADER_TIMEOUT: Duration = Duration::from_millis(250);
/// Bytes hyper buffers for one connection's reads, and so the largest request head: a
/// connection's head costs at most this much memory.
pub const HEAD_BYTES_MAX: usize = 64 << 10;
/// Pause after an accept error (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one warning a second about shed connections or accept errors.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Serves `listener` until `stop` turns true, then lets open requests finish (each
/// connection closes after its current request) and returns once every connection is
/// closed.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let config = &state.config;
    let timeouts = Timeouts {
        idle: Duration::from_millis(config.keep_alive_idle_ms),
        head: Duration::from_millis(config.header_read_timeout_ms),
    };
    let served = Arc::new(Semaphore::new(config.connections_max));
    let shed = Arc::new(Semaphore::new(SHED_CONNECTIONS_MAX));
    let app = crate::router(Arc::clone(&state));
    let shed_app = shed_router(Arc::clone(&state));
    let mut warned = Warn::default();
    while let Some(stream) = accept(&listener, &mut stop, &mut warned).await {
        if let Ok(permit) = Arc::clone(&served).try_acquire_owned() {
            metrics::gauge!("tally_connections_open").increment(1.0);
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                serve_connection(stream, app, timeouts, true, stop).await;
                metrics::gauge!("tally_connections_open").decrement(1.0);
                drop(permit);
            });
            continue;
        }
        metrics::counter!("tally_connections_shed_total").increment(1);
        warned.warn(|| {
            tracing::warn!(
                connections_max = config.connections_max,
                "connection limit reached: new connections get 503 (health checks still answer)"
            )
        });
        let Ok(permit) = Arc::clone(&shed).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (app, stop) = (shed_app.clone(), stop.clone());
        let timeouts = Timeouts { idle: SHED_HEADER_TIMEOUT, head: SHED_HEADER_TIMEOUT };
        tokio::spawn(async move {
            serve_connection(stream, app, timeouts, false, stop).await;
            drop(permit);
        });
    }
    // Every connection task holds a permit: all are back once every connection closed.
    let _ = served.acquire_many(config.connections_max as u32).await;
    let _ = shed.acquire_many(SHED_CONNECTIONS_MAX as u32).await;
}

/// Connections the admin listener serves at once; more are closed at once.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;
/// Head and idle deadline on the admin listener: probes and scrapes ask at once.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/healthz`, `/readyz` and `/metrics` on a listener of their own (`admin_listen`),
/// so that probes and scrapes answer however many clients crowd the main one. Stops like
/// `serve`.
pub async fn serve_admin(listener: TcpListener, state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX));
    let app = admin_router(state);
    let timeouts = Timeouts { idle: ADMIN_TIMEOUT, head: ADMIN_TIMEOUT };
    let mut warned = Warn::default();
    while let Some(stream) = accept(&listener, &mut stop, &mut warned).await {
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            warned.warn(|| tracing::warn!(ADMIN_CONNECTIONS_MAX, "admin listener full; closing a connection"));
            continue;
        };
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            serve_connection(stream, app, timeouts, true, stop).await;
            drop(permit);
        });
    }
    let _ = slots.acquire_many(ADMIN_CONNECTIONS_MAX as u32).await;
}

/// The next connection, or `None` once `stop` is true. Accept errors (out of file
/// descriptors) are logged at most once a second and paused on.
async fn accept(listener: &TcpListener, stop: &mut watch::Receiver<bool>, warned: &mut Warn) -> Option<TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(error) => {
                    warned.warn(|| tracing::warn!(%error, "accepting a connection failed; pausing"));
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            () = stopped(stop) => return None,
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Answers `/healthz` and `/readyz`; everything else gets 503 `connections_exhausted`
/// (another method on those two, 405).
fn shed_router(state: Arc<AppState>) -> Router {
    health_routes()
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .fallback(|| async {
            ApiError::unavailable(
                ErrorCode::ConnectionsExhausted,
                "the server is at its connection limit; retry shortly or reuse a connection".into(),
            )
        })
        .with_state(state)
}

/// Health, readiness and metrics; everything else is 404 (another method on those, 405).
fn admin_router(state: Arc<AppState>) -> Router {
    health_routes()
        .route("/metrics", get(monitoring::metrics))
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .fallback(|| async {
            ApiError::new(ErrorCode::NotFound, "the admin listener serves /healthz, /readyz and /metrics")
        })
        .with_state(state)
}

fn health_routes() -> Router<Arc<AppState>> {
    Router::new().route("/healthz", get(monitoring::healthz)).route("/readyz", get(monitoring::readyz))
}

#[derive(Clone, Copy)]
struct Timeouts {
    idle: Duration,
    head: Duration,
}

/// Logs at most once per `WARN_INTERVAL`.
#[derive(Default)]
struct Warn {
    last: Option<Instant>,
}

impl Warn {
    fn warn(&mut self, log: impl FnOnce()) {
        if self.last.is_none_or(|last| last.elapsed() >= WARN_INTERVAL) {
            self.last = Some(Instant::now());
            log();
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    timeouts: Timeouts,
    keep_alive: bool,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let peer = stream.peer_addr().ok().map(Peer);
    let io = TokioIo::new(Guarded { inner: stream, activity: Arc::clone(&activity), rewrite: None });
    let service = Tracked { app, activity: Arc::clone(&activity), peer };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(keep_alive).max_buf_size(HEAD_BYTES_MAX);
    let connection = builder.serve_connection(io, hyper_util::service::TowerToHyperService::new(service));
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let deadline = activity.next_check(timeouts);
        tokio::select! {
            _ = connection.as_mut() => return,
            () = stopped(&mut stop), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if activity.expired(timeouts) {
                    metrics::counter!("tally_connections_timed_out_total").increment(1);
                    return;
                }
            }
        }
    }
}

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// What a connection is doing, and since when (milliseconds after `origin`).
struct Activity {
    origin: Instant,
    phase: AtomicU8,
    since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { origin: Instant::now(), phase: AtomicU8::new(IDLE), since_ms: AtomicU64::new(0) }
    }

    fn enter(&self, phase: u8) {
        self.since_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Release);
    }

    /// When the current phase runs out; a busy connection is looked at again after its
    /// idle timeout.
    fn deadline(&self, timeouts: Timeouts) -> Instant {
        let since = self.origin + Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        match self.phase.load(Ordering::Acquire) {
            IDLE => since + timeouts.idle,
            HEAD => since + timeouts.head,
            _ => Instant::now() + timeouts.idle,
        }
    }

    /// When to look again: the deadline, or sooner, since a phase that begins meanwhile
    /// (a head starting on an idle connection) may have an earlier one.
    fn next_check(&self, timeouts: Timeouts) -> Instant {
        self.deadline(timeouts).min(Instant::now() + timeouts.head)
    }

    fn expired(&self, timeouts: Timeouts) -> bool {
        self.phase.load(Ordering::Acquire) != BUSY && Instant::now() >= self.deadline(timeouts)
    }
}

/// The client's address, in each request's extensions (for the access log).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub std::net::SocketAddr);

/// The router, marking the connection busy from a request's head until its response.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
    peer: Option<Peer>,
}

impl Service<Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        self.activity.enter(BUSY);
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(peer);
        }
        let activity = Arc::clone(&self.activity);
        let response = self.app.call(request.map(Body::new));
        Box::pin(async move {
            let response = response.await;
            activity.enter(IDLE);
            response
        })
    }
}

/// The socket, watched: the first byte after an idle spell starts the head deadline, and a
/// bodiless error head that hyper writes for a request it could not parse is replaced by
/// the same status with the JSON error body.
struct Guarded {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// A replacement response still being written, and how much of it is written.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && self.activity.phase.load(Ordering::Acquire) == IDLE {
            self.activity.enter(HEAD);
        }
        polled
    }
}

impl Guarded {
    /// Writes what is left of a replacement response.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.rewrite {
            if *written == bytes.len() {
                self.rewrite = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_rewrite(cx))?;
        if let Some(replacement) = protocol_error_response(buf) {
            self.rewrite = Some((replacement, 0));
            std::task::ready!(self.poll_rewrite(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_rewrite(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_rewrite(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper answers a request it cannot parse with a bare head: status line, `content-length: 0`,
/// `date` and perhaps `connection`, nothing else. Every answer of ours has a content type, so such a head is
/// recognised exactly and replaced.
fn protocol_error_response(written: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(written).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let (code, message) = match status {
        400 => (ErrorCode::MalformedRequest, "the request line or a header could not be parsed"),
        414 => (ErrorCode::UriTooLong, "the request target is too long"),
        431 => (ErrorCode::HeadersTooLarge, "the request head is too large or has too many headers"),
        _ => return None,
    };
    let head = text.split_once("\r\n\r\n").filter(|(_, body)| body.is_empty())?.0;
    let headers: Vec<&str> = head.lines().skip(1).collect();
    let bare = headers.iter().all(|h| {
        let name = h.split(':').next().unwrap_or("").to_ascii_lowercase();
        matches!(name.as_str(), "content-length" | "date" | "connection")
    }) && headers.iter().any(|h| h.eq_ignore_ascii_case("content-length: 0"));
    if !bare {
        return None;
    }
    let error = ApiError::new(code, message);
    debug_assert_eq!(error.status.as_u16(), status, "{}", code.as_str());
    let body = serde_json::to_vec(&error.body()).ok()?;
    let reason = error.status.canonical_reason().unwrap_or("");
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    Some(response)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    /// Answers `method path` through `router`: status, content type, and the JSON body.
    async fn answer(router: &Router, method: &str, path: &str) -> (u16, String, serde_json::Value) {
        let request = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        let response = router.clone().call(request).await.unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e})"));
        (status, content_type.unwrap_or_default(), body)
    }

    /// Unknown paths and methods get JSON errors from every router: the main one, the one
    /// that serves connections over the limit, and the admin listener's.
    #[tokio::test]
    async fn every_router_answers_unknown_paths_and_methods_with_json() {
        let state = AppState::new(crate::ServerConfig::default());
        let main = crate::router(Arc::clone(&state));
        let (shed, admin) = (shed_router(Arc::clone(&state)), admin_router(state));
        let cases = [
            (&main, "GET", "/nowhere", 404, "not_found"),
            (&main, "DELETE", "/v1/events", 405, "method_not_allowed"),
            (&main, "POST", "/v1/count", 405, "method_not_allowed"),
            (&main, "PUT", "/", 405, "method_not_allowed"),
            (&main, "POST", "/healthz", 405, "method_not_allowed"),
            (&main, "GET", "/v1/count?video_id=v", 503, "recovering"),
            (&shed, "POST", "/healthz", 405, "method_not_allowed"),
            (&shed, "GET", "/v1/count", 503, "connections_exhausted"),
            (&admin, "POST", "/metrics", 405, "method_not_allowed"),
            (&admin, "DELETE", "/readyz", 405, "method_not_allowed"),
            (&admin, "GET", "/v1/count", 404, "not_found"),
        ];
        for (router, method, path, status, code) in cases {
            let (got, content_type, body) = answer(router, method, path).await;
            assert_eq!((got, body["error"].as_str()), (status, Some(code)), "{method} {path}: {body}");
            assert_eq!(content_type, "application/json", "{method} {path}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {body}");
        }
        // The dashboard and its assets are still served.
        for path in ["/", "/ui/uplot.js", "/ui/uplot.css", "/v1/tally.js"] {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            assert_eq!(main.clone().call(request).await.unwrap().status(), StatusCode::OK, "{path}");
        }
    }

    #[test]
    fn only_hyper_bare_error_heads_are_replaced() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 06:00:00 GMT\r\n\r\n";
        let replaced = String::from_utf8(protocol_error_response(bare).expect("replaced")).unwrap();
        assert!(replaced.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{replaced}");
        assert!(
            replaced.ends_with(
                r#"{"error":"headers_too_large","message":"the request head is too large or has too many headers"}"#
            ),
            "{replaced}"
        );
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(protocol_error_response(ours).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(protocol_error_response(ok).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx";
        assert!(protocol_error_response(with_body).is_none());
    }
}
