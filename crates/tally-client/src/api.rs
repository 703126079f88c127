//! Requests to a tally server, retried: 429, 503 (and 408, 502, 504), timeouts and
//! connection errors are tried again after an exponential backoff with full jitter, never
//! sooner than the server's `Retry-After`, through a circuit breaker. A write is retried
//! with the same Idempotency-Key, so the server counts it once however often it arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use rand::Rng;

use crate::breaker::Breaker;
use crate::metrics::{Snapshot, Stats};
use crate::transport::Transport;
use crate::{Answer, BreakerConfig, BreakerState, Error};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Requests sent for one call at most, the first included. Time spent waiting for an
    /// open breaker is not an attempt.
    pub attempts: u32,
    /// The first backoff's upper bound; each retry doubles it, up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The longest `Retry-After` honoured (a larger one is cut to this).
    pub retry_after_max: Duration,
    /// How long one call may keep trying, waits for an open breaker included: shorter than
    /// the server's dedup window (10 minutes by default), so that a retry of a write whose
    /// first attempt was counted but unanswered is still recognised.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 10,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(10),
            retry_after_max: Duration::from_secs(60),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `http://host:port` or `https://host:port`.
    pub server: String,
    /// The API key, sent as `Authorization: Bearer <key>`.
    pub key: Option<String>,
    /// PEM certificates to trust besides the system's roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Time one request may take, connecting and reading the answer included.
    pub timeout: Duration,
    /// Bytes of one answer at most; a larger one is an error, not memory.
    pub answer_bytes_max: usize,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
}

impl ApiConfig {
    pub fn new(server: impl Into<String>) -> ApiConfig {
        ApiConfig {
            server: server.into(),
            key: None,
            ca_pem: None,
            timeout: Duration::from_secs(10),
            answer_bytes_max: 64 << 20,
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// What the server said of a batch of events it counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Events counted now.
    pub accepted: u64,
    /// Events it had counted before (same `event_id`, or a repeated Idempotency-Key).
    pub duplicates: u64,
}

/// A tally server's API. Cheap to clone; clones share connections, breaker and counters.
#[derive(Clone)]
pub struct Api {
    transport: Transport,
    retry: RetryPolicy,
    breaker: Arc<Breaker>,
    stats: Arc<Stats>,
}

/// How an attempt's outcome bears on retrying and on the breaker.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// An answer to keep: success, or a refusal retrying cannot change.
    Final,
    /// "Not now" from a healthy server (429, 408): retry, the breaker is not told.
    Pace,
    /// The server is failing (no answer, timeout, 5xx): retry, and the breaker counts it.
    Failure,
    /// An error of the client's own: final, the breaker is not told.
    Untold,
}

fn verdict(result: &Result<Answer, Error>) -> Verdict {
    match result {
        Ok(answer) => match answer.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => Verdict::Pace,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => Verdict::Failure,
            status if status.is_server_error() => Verdict::Failure,
            _ => Verdict::Final,
        },
        Err(Error::Connection(_) | Error::Timeout(_)) => Verdict::Failure,
        // Nothing was learnt of the server (the request could not be made, or was cut
        // short by the client): final, and the breaker is not told.
        Err(_) => Verdict::Untold,
    }
}

impl Api {
    pub fn new(config: ApiConfig) -> Result<Api, Error> {
        let transport = Transport::new(&config)?;
        if config.retry.attempts == 0 || config.breaker.failures_to_open == 0 {
            return Err(Error::Config("retry attempts and breaker failures_to_open must be at least 1".into()));
        }
        let stats = Arc::new(Stats::new(transport.base()));
        let breaker = Arc::new(Breaker::new(config.breaker, Arc::clone(&stats)));
        Ok(Api { transport, retry: config.retry, breaker, stats })
    }

    pub fn server(&self) -> &str {
        self.transport.base()
    }

    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub(crate) fn counters(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// One attempt, no retry (it still waits for an open breaker, and tells it the outcome).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, Error> {
        self.call(method, path, headers, body, 1).await
    }

    /// Tries until an answer is final or the attempts run out; then the last answer (which
    /// may be a 429 or 503) or the last error. Safe for writes only with an Idempotency-Key.
    pub async fn request_retrying(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, Error> {
        self.call(method, path, headers, body, self.retry.attempts).await
    }

    /// Up to `attempts` attempts, within `give_up_after`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        attempts: u32,
    ) -> Result<Answer, Error> {
        let deadline = Instant::now() + self.retry.give_up_after;
        let mut attempt = 1;
        loop {
            let permit = self.admitted(deadline).await?;
            let (result, verdict) =
                self.attempt(permit, method.clone(), path, headers, body.clone(), attempt > 1).await;
            if matches!(verdict, Verdict::Final | Verdict::Untold) || attempt >= attempts {
                return result;
            }
            let retry_after = result.as_ref().ok().and_then(Answer::retry_after);
            let backoff = self.backoff(attempt, retry_after);
            if Instant::now() + backoff >= deadline {
                return result;
            }
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }

    async fn attempt(
        &self,
        permit: Permit<'_>,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        retry: bool,
    ) -> (Result<Answer, Error>, Verdict) {
        self.stats.request(retry);
        let result = self.transport.request(method, path, headers, body).await;
        let verdict = verdict(&result);
        match verdict {
            Verdict::Failure => permit.failed(),
            Verdict::Final | Verdict::Pace => permit.succeeded(),
            Verdict::Untold => drop(permit),
        }
        (result, verdict)
    }

    /// Waits while the breaker is open, until `deadline` at most.
    async fn admitted(&self, deadline: Instant) -> Result<Permit<'_>, Error> {
        loop {
            match self.breaker.admit() {
                Ok(probe) => return Ok(Permit { breaker: &self.breaker, probe, told: false }),
                Err(wait) if Instant::now() + wait > deadline => {
                    let waited = self.retry.give_up_after;
                    return Err(Error::GaveUp(format!("the circuit breaker stayed open past {waited:?}")));
                }
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Full jitter (a uniform wait up to the exponential bound), after `Retry-After`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let bound = self.retry.backoff_base.saturating_mul(1 << (attempt - 1).min(20)).min(self.retry.backoff_max);
        let jitter = bound.mul_f64(rand::rng().random_range(0.0..=1.0));
        retry_after.map_or(Duration::ZERO, |wait| wait.min(self.retry.retry_after_max)) + jitter
    }

    /// Sends one NDJSON batch of events under `idempotency_key`, retried: the server's
    /// acknowledgement, or why it was not given.
    pub async fn post_events(&self, ndjson: Bytes, idempotency_key: &str) -> Result<Ack, Error> {
        let headers = [("content-type", "application/x-ndjson"), ("idempotency-key", idempotency_key)];
        let answer = self.request_retrying(Method::POST, "/v1/events", &headers, ndjson).await?;
        if !answer.status.is_success() {
            return Err(Error::Refused(Box::new(answer)));
        }
        let outcome = answer.json()?;
        let field = |name: &str| {
            outcome[name]
                .as_u64()
                .ok_or_else(|| Error::Protocol(format!("the acknowledgement has no {name}: {outcome}")))
        };
        Ok(Ack { accepted: field("accepted")?, duplicates: field("duplicates")? })
    }

    /// A query, retried: its JSON answer, or the server's error.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, Error> {
        let answer = self.request_retrying(Method::GET, path, &[], Bytes::new()).await?;
        if !answer.status.is_success() {
            return Err(Error::Refused(Box::new(answer)));
        }
        answer.json()
    }

    /// A query with a JSON body (`POST /v1/counts`), retried like `get_json`.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, Error> {
        let headers = [("content-type", "application/json")];
        let answer = self.request_retrying(Method::POST, path, &headers, Bytes::from(body.to_string())).await?;
        if !answer.status.is_success() {
            return Err(Error::Refused(Box::new(answer)));
        }
        answer.json()
    }
}

/// A request the breaker let through. A probe dropped without a verdict (the caller gave
/// up on it) frees the half-open breaker's probe slot instead of holding it forever.
struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    told: bool,
}

impl Permit<'_> {
    fn succeeded(mut self) {
        self.told = true;
        self.breaker.succeeded();
    }

    fn failed(mut self) {
        self.told = true;
        self.breaker.failed();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.told {
            self.breaker.probe_released();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_below_a_doubling_bound_and_after_retry_after() {
        let api = Api::new(ApiConfig::new("http://127.0.0.1:1")).unwrap();
        assert!(api.retry.give_up_after < Duration::from_secs(600), "within the default dedup window");
        for attempt in 1..=12 {
            let bound = Duration::from_millis(50 * (1 << (attempt - 1))).min(Duration::from_secs(10));
            for _ in 0..50 {
                assert!(api.backoff(attempt, None) <= bound);
            }
            let waits: Vec<Duration> = (0..50).map(|_| api.backoff(attempt, None)).collect();
            assert!(waits.iter().any(|w| *w != waits[0]), "the wait is random");
        }
        let wait = api.backoff(1, Some(Duration::from_secs(3)));
        assert!(wait >= Duration::from_secs(3) && wait <= Duration::from_millis(3050));
        assert!(api.backoff(1, Some(Duration::from_secs(3600))) <= Duration::from_millis(60_050), "capped");
    }

    #[test]
    fn retrying_stops_when_give_up_after_runs_out() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut config = ApiConfig::new("http://127.0.0.1:1");
        config.retry = RetryPolicy {
            attempts: 1_000_000,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(20),
            retry_after_max: Duration::ZERO,
            give_up_after: Duration::from_millis(300),
        };
        let api = Api::new(config).unwrap();
        let result = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), api.request_retrying(Method::GET, "/", &[], Bytes::new()))
                .await
        });
        let error = result.expect("gave up long before the guard").unwrap_err();
        assert!(matches!(error, Error::GaveUp(_) | Error::Connection(_)), "{error}");
        assert_eq!(api.breaker_state(), BreakerState::Open, "nothing listens on port 1");
        assert!(api.stats().requests < 1_000, "{:?}", api.stats());
    }

    #[test]
    fn verdicts_separate_pacing_from_failure() {
        let answer = |status: u16| {
            Ok(Answer {
                status: StatusCode::from_u16(status).unwrap(),
                headers: Default::default(),
                body: Bytes::new(),
            })
        };
        assert_eq!(verdict(&answer(200)), Verdict::Final);
        assert_eq!(verdict(&answer(400)), Verdict::Final);
        assert_eq!(verdict(&answer(429)), Verdict::Pace);
        assert_eq!(verdict(&answer(503)), Verdict::Failure);
        assert_eq!(verdict(&answer(500)), Verdict::Failure);
        assert_eq!(verdict(&Err(Error::Timeout(Duration::from_secs(1)))), Verdict::Failure);
        assert_eq!(verdict(&Err(Error::Connection("reset".into()))), Verdict::Failure);
    }
}
