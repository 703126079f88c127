//! API keys: who may call which route, from which page, how fast.
//!
//! Keys live in a JSON file (`keys_file`) that `tally keys` edits and every node reads; a
//! node looks at the file's metadata on each request that needs a key and reloads it when
//! it changed, so a created or revoked key takes effect at the next request, without a
//! restart. The file holds each key's SHA-256, never the key: a key is
//! `tally_<id>_<secret>` (32 random bytes as hex), found by its id and checked in constant
//! time.
//!
//! Scopes: `write` (POST /v1/events; safe in a page when bound to origins and video-id
//! prefixes), `read` (queries), `admin` (metrics). Health, readiness, the OpenAPI document
//! and the beacon script need none. Without a key a request is refused (401) when keys are
//! required, else served as before; a key that is given is always checked.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{ApiError, AppState, ErrorCode};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Write,
    Read,
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        [Scope::Write, Scope::Read, Scope::Admin].into_iter().find(|scope| scope.name() == text)
    }
}

/// One key as the keys file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    /// Who or what the key is for.
    pub name: String,
    /// The SHA-256 of the key's secret, hex.
    pub secret_sha256: String,
    pub scopes: Vec<Scope>,
    /// Pages whose requests may use it (their `Origin`); empty: any client.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Video ids it may write start with one of these; empty: any.
    #[serde(default)]
    pub video_prefixes: Vec<String>,
    #[serde(default)]
    pub events_per_second: Option<u32>,
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// RFC 3339.
    pub created: String,
}

/// The keys file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub keys: Vec<KeyEntry>,
}

impl KeyFile {
    /// Reads `path`; a missing file holds no keys.
    pub fn load(path: &Path) -> Result<KeyFile, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(KeyFile::default()),
            Err(error) => return Err(format!("reading {}: {error}", path.display())),
        };
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces `path` whole (a temporary file, synced, renamed over it), readable by its
    /// owner only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let temporary = path.with_extension("tmp");
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        file.write_all(serde_json::to_string_pretty(self).expect("keys serialize").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    }
}

/// The key a client presents: `tally_<id>_<secret>`.
pub fn token(id: &str, secret: &str) -> String {
    format!("tally_{id}_{secret}")
}

fn parse_token(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix("tally_")?.split_once('_')
}

pub fn secret_sha256(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal bytes, in a time that depends on their length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token bucket: `rate` a second, a second's worth of burst.
pub(crate) struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        let rate = f64::from(rate.max(1));
        Bucket { rate, tokens: rate, last: Instant::now() }
    }

    /// What a bucket holds at most.
    pub(crate) fn capacity(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `n` tokens, or says how long until there are that many.
    pub(crate) fn take(&mut self, n: u64) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        Err(Duration::from_secs_f64((n - self.tokens) / self.rate))
    }
}

/// A key in force: its entry, its digest, and its buckets.
pub(crate) struct Key {
    pub(crate) entry: KeyEntry,
    digest: Vec<u8>,
    requests: Option<Mutex<Bucket>>,
    pub(crate) events: Option<Mutex<Bucket>>,
}

/// The caller a request was authorized as (a request extension, for the routes).
#[derive(Clone)]
pub(crate) struct Caller(pub(crate) Arc<Key>);

/// Which version of the file is loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

#[derive(Default)]
struct Loaded {
    /// Whether the file was looked at yet, and the version read (none: it was missing).
    read: bool,
    stamp: Option<Stamp>,
    keys: HashMap<String, Arc<Key>>,
}

/// The keys in force, and whether a request needs one.
pub struct Keys {
    path: Option<PathBuf>,
    required: bool,
    loaded: RwLock<Loaded>,
}

impl Keys {
    pub fn new(path: Option<PathBuf>, required: bool) -> Keys {
        let keys = Keys { path, required, loaded: RwLock::default() };
        keys.refresh();
        keys
    }

    /// Whether any route checks keys: a file is given, or keys are required.
    pub fn enabled(&self) -> bool {
        self.path.is_some() || self.required
    }

    /// Reloads the file if it changed since it was read. A file that does not parse keeps
    /// the keys of the last one that did.
    fn refresh(&self) {
        let Some(path) = &self.path else { return };
        let stamp =
            std::fs::metadata(path).ok().map(|m| Stamp { modified: m.modified().ok(), len: m.len(), inode: m.ino() });
        let unchanged = |loaded: &Loaded| loaded.read && loaded.stamp == stamp;
        if unchanged(&self.loaded.read()) {
            return;
        }
        let mut loaded = self.loaded.write();
        if unchanged(&loaded) {
            return;
        }
        match KeyFile::load(path) {
            Ok(file) => {
                loaded.keys = file.keys.into_iter().map(|entry| (entry.id.clone(), Arc::new(key(entry)))).collect();
                tracing::info!(keys = loaded.keys.len(), path = %path.display(), "keys loaded");
            }
            Err(error) => {
                metrics::counter!("tally_keys_file_errors_total").increment(1);
                tracing::error!(%error, "the keys file does not parse; the keys loaded before stay in force");
            }
        }
        loaded.stamp = stamp;
        loaded.read = true;
    }

    /// Whether a key in force is bound to `origin` (its pages may call the API).
    pub(crate) fn bound_to(&self, origin: &str) -> bool {
        if self.path.is_none() {
            return false;
        }
        self.refresh();
        let loaded = self.loaded.read();
        loaded.keys.values().any(|key| lists_origin(&key.entry.origins, origin))
    }

    /// The key `token` names, if it is one in force.
    fn verify(&self, token: &str) -> Option<Arc<Key>> {
        self.refresh();
        let (id, secret) = parse_token(token)?;
        let key = self.loaded.read().keys.get(id).cloned()?;
        let digest = Sha256::digest(secret.as_bytes());
        constant_time_eq(&digest, &key.digest).then_some(key)
    }
}

/// Bytes of a SHA-256 digest.
const DIGEST_BYTES: usize = 32;

fn key(entry: KeyEntry) -> Key {
    let digest: Vec<u8> = (0..entry.secret_sha256.len() / 2)
        .filter_map(|i| u8::from_str_radix(entry.secret_sha256.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    if digest.len() != DIGEST_BYTES || entry.secret_sha256.len() != 2 * DIGEST_BYTES {
        // Never matches: a hand-edited file says why its key is refused.
        tracing::error!(id = %entry.id, "secret_sha256 is not 64 hex digits; this key matches no secret");
    }
    let requests = entry.requests_per_second.map(|rate| Mutex::new(Bucket::new(rate)));
    let events = entry.events_per_second.map(|rate| Mutex::new(Bucket::new(rate)));
    Key { entry, digest, requests, events }
}

/// The key a request presents: `Authorization: Bearer …`, or `?key=…` where the route
/// takes it (the beacon cannot set headers).
fn presented(request: &Request, query_key: bool) -> Option<String> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        // Any other scheme is a key that does not check: 401, not anonymous.
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
        return Some(token.trim().to_string());
    }
    if !query_key {
        return None;
    }
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| pair.strip_prefix("key=")).map(str::to_string)
}

/// 429 with the wait, in whole seconds (at least one).
pub(crate) fn rate_limited(wait: Duration, what: &str) -> ApiError {
    ApiError::new(ErrorCode::RateLimited, format!("this key's {what} limit is reached; nothing was counted"))
        .retry_after(wait.as_secs_f64().ceil().max(1.0) as u32)
}

fn unauthorized(code: ErrorCode, message: &str) -> Response {
    let mut response = ApiError::new(code, message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tally\""));
    response
}

/// Whether `origins` names `origin` (origins compare without regard to case).
pub(crate) fn lists_origin(origins: &[String], origin: &str) -> bool {
    origins.iter().any(|listed| listed.eq_ignore_ascii_case(origin))
}

/// Whether a key bound to origins may be used by this request: only from those pages.
fn origin_allowed(entry: &KeyEntry, headers: &HeaderMap) -> bool {
    if entry.origins.is_empty() {
        return true;
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    origin.is_some_and(|origin| lists_origin(&entry.origins, origin))
}

/// The layer of every route that needs `scope`.
pub(crate) async fn authorize(
    State((state, scope)): State<(Arc<AppState>, Scope)>,
    mut request: Request,
    next: Next,
) -> Response {
    let keys = &state.keys;
    let Some(token) = presented(&request, scope == Scope::Write) else {
        if keys.required {
            return unauthorized(
                ErrorCode::KeyRequired,
                "this server requires an API key: Authorization: Bearer <key>",
            );
        }
        return next.run(request).await;
    };
    let Some(key) = keys.verify(&token) else {
        return unauthorized(ErrorCode::InvalidKey, "the API key is not one this server knows (revoked, or mistyped)");
    };
    let entry = &key.entry;
    if !entry.scopes.contains(&scope) {
        let has: Vec<&str> = entry.scopes.iter().map(|s| s.name()).collect();
        let message = format!("this route needs a key with the {} scope; this key has {has:?}", scope.name());
        return ApiError::new(ErrorCode::ScopeMissing, message).into_response();
    }
    if !origin_allowed(entry, request.headers()) {
        let message = "this key is bound to other origins than the request's";
        return ApiError::new(ErrorCode::OriginNotAllowed, message).into_response();
    }
    if let Some(bucket) = &key.requests
        && let Err(wait) = bucket.lock().take(1)
    {
        metrics::counter!("tally_rate_limited_total", "limit" => "requests").increment(1);
        return rate_limited(wait, "requests_per_second").into_response();
    }
    request.extensions_mut().insert(Caller(Arc::clone(&key)));
    next.run(request).await
}

/// Checks what only the events tell: every video id under the key's prefixes, and the
/// key's events-per-second budget.
pub(crate) fn admit_events<'a>(
    caller: Option<&Caller>,
    mut video_ids: impl Iterator<Item = &'a str>,
    count: usize,
) -> Result<(), ApiError> {
    let Some(Caller(key)) = caller else { return Ok(()) };
    let prefixes = &key.entry.video_prefixes;
    if !prefixes.is_empty()
        && let Some(video) = video_ids.find(|video| !prefixes.iter().any(|p| video.starts_with(p.as_str())))
    {
        let message =
            format!("this key may write video ids starting with {prefixes:?}, not {video:?}; nothing was counted");
        return Err(ApiError::new(ErrorCode::VideoNotAllowed, message));
    }
    let Some(bucket) = &key.events else { return Ok(()) };
    let mut bucket = bucket.lock();
    if count as u64 > bucket.capacity() {
        let message = format!(
            "{count} events in one request; this key takes at most {} a second: send smaller batches",
            bucket.capacity()
        );
        return Err(
            ApiError::new(ErrorCode::TooManyEventsForKey, message).with("limit_events", json!(bucket.capacity()))
        );
    }
    bucket.take(count as u64).map_err(|wait| {
        metrics::counter!("tally_rate_limited_total", "limit" => "events").increment(1);
        rate_limited(wait, "events_per_second")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_found_by_its_id_and_checked_by_its_secret() {
        assert_eq!(parse_token("tally_k1a2b3_00ff"), Some(("k1a2b3", "00ff")));
        assert_eq!(parse_token("k1a2b3_00ff"), None);
        let entry = KeyEntry {
            id: "k1".into(),
            name: "t".into(),
            secret_sha256: secret_sha256("s3cret"),
            scopes: vec![Scope::Read],
            origins: vec![],
            video_prefixes: vec![],
            events_per_second: None,
            requests_per_second: None,
            created: String::new(),
        };
        let key = key(entry);
        assert!(constant_time_eq(&Sha256::digest(b"s3cret"), &key.digest));
        assert!(!constant_time_eq(&Sha256::digest(b"s3cres"), &key.digest));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }

    #[test]
    fn a_bucket_gives_a_second_of_burst_then_says_how_long_to_wait() {
        let mut bucket = Bucket::new(10);
        assert_eq!(bucket.capacity(), 10);
        assert!(bucket.take(10).is_ok());
        let wait = bucket.take(5).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
    }
}
