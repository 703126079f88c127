//! A small HTTP/1.1 client of tally's API, shared by every client subcommand: keep-alive
//! connections, a timeout per request, and retries with exponential backoff and jitter for
//! answers that say "try again" (429, 503, connection errors).

use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

/// Time one request may take before it counts as failed, and is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Attempts for a query (`get_json`, `post_json`).
const QUERY_ATTEMPTS: u32 = 3;

#[derive(Clone)]
pub struct Client {
    base: String,
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    /// `Authorization: Bearer …` on every request: the API key in `TALLY_KEY`, if set.
    authorization: Option<String>,
}

pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("server answered with invalid JSON")
    }

    /// The server's error message, for display.
    pub fn error_text(&self) -> String {
        match self.json() {
            Ok(value) => format!("{} {}", self.status, value),
            Err(_) => format!("{} {}", self.status, String::from_utf8_lossy(&self.body)),
        }
    }
}

impl Client {
    pub fn new(server: &str) -> anyhow::Result<Client> {
        let base = server.trim_end_matches('/').to_owned();
        anyhow::ensure!(base.starts_with("http://"), "--server must be an http:// URL, got {server}");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let inner = HyperClient::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build(connector);
        let authorization =
            std::env::var("TALLY_KEY").ok().filter(|key| !key.is_empty()).map(|key| format!("Bearer {key}"));
        Ok(Client { base, inner, authorization })
    }

    /// Sends `key` as the API key instead of `TALLY_KEY`'s.
    pub fn with_key(mut self, key: Option<&str>) -> Client {
        if let Some(key) = key {
            self.authorization = Some(format!("Bearer {key}"));
        }
        self
    }

    /// One attempt.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let mut request = Request::builder().method(method).uri(format!("{}{}", self.base, path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let request = request.body(Full::new(body))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.inner.request(request))
            .await
            .map_err(|_| anyhow!("request timed out after {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to {}", self.base))?;
        let status = response.status();
        let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| anyhow!("reading the answer timed out"))??
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// Retries while the answer says "try again", up to `attempts` times. Safe for writes
    /// only when the request carries an Idempotency-Key.
    pub async fn request_retrying(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        attempts: u32,
    ) -> anyhow::Result<Answer> {
        let mut backoff = BACKOFF_START;
        let mut attempt = 1;
        loop {
            let result = self.request(method.clone(), path, headers, body.clone()).await;
            let retryable = match &result {
                Ok(answer) => matches!(answer.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE),
                Err(_) => true,
            };
            if !retryable || attempt >= attempts {
                return result;
            }
            let jitter = rand::rng().random_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            attempt += 1;
        }
    }

    /// A query, retried: its JSON answer, or the server's error.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let answer = self.request_retrying(Method::GET, path, &[], Bytes::new(), QUERY_ATTEMPTS).await?;
        anyhow::ensure!(answer.status.is_success(), "{}", answer.error_text());
        answer.json()
    }

    /// A query with a JSON body (`POST /v1/counts`), retried like `get_json`.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let headers = [("content-type", "application/json")];
        let body = Bytes::from(body.to_string());
        let answer = self.request_retrying(Method::POST, path, &headers, body, QUERY_ATTEMPTS).await?;
        anyhow::ensure!(answer.status.is_success(), "{}", answer.error_text());
        answer.json()
    }
}

/// Percent-encodes a query parameter value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
