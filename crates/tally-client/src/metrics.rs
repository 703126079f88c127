//! What a client did, two ways: `Client::stats()` / `Api::stats()` read a snapshot, and the
//! same numbers go to the `metrics` facade (`tally_client_*`, labelled with the server),
//! so a service that exports its metrics to Prometheus shows them with no extra code.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

use crate::BreakerState;

/// A snapshot of a client's counters since it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Events the server acknowledged as counted (new, not duplicates).
    pub events_accepted: u64,
    /// Events the server acknowledged as already counted (a retried or repeated event).
    pub events_duplicate: u64,
    /// Events given up on: refused by the server (4xx) or out of attempts.
    pub events_failed: u64,
    /// Events not taken because the buffer was full (`WhenFull::Drop`).
    pub events_dropped: u64,
    /// Events waiting in the buffer or in flight.
    pub events_buffered: u64,
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Requests that were retries of an earlier one.
    pub retries: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    pub breaker_state: BreakerState,
}

#[derive(Debug)]
pub(crate) struct Stats {
    server: String,
    events_accepted: AtomicU64,
    events_duplicate: AtomicU64,
    events_failed: AtomicU64,
    events_dropped: AtomicU64,
    events_buffered: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    breaker_opened: AtomicU64,
    breaker_state: AtomicU8,
}

impl Stats {
    pub(crate) fn new(server: &str) -> Stats {
        Stats {
            server: server.to_owned(),
            events_accepted: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            events_failed: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            events_buffered: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            breaker_opened: AtomicU64::new(0),
            breaker_state: AtomicU8::new(BreakerState::Closed as u8),
        }
    }

    fn count(&self, counter: &AtomicU64, name: &'static str, n: u64) {
        counter.fetch_add(n, Relaxed);
        metrics::counter!(name, "server" => self.server.clone()).increment(n);
    }

    pub(crate) fn request(&self, retry: bool) {
        self.count(&self.requests, "tally_client_requests_total", 1);
        if retry {
            self.count(&self.retries, "tally_client_retries_total", 1);
        }
    }

    pub(crate) fn acknowledged(&self, accepted: u64, duplicates: u64) {
        self.count(&self.events_accepted, "tally_client_events_accepted_total", accepted);
        self.count(&self.events_duplicate, "tally_client_events_duplicate_total", duplicates);
    }

    pub(crate) fn failed(&self, events: u64) {
        self.count(&self.events_failed, "tally_client_events_failed_total", events);
    }

    pub(crate) fn dropped(&self, events: u64) {
        self.count(&self.events_dropped, "tally_client_events_dropped_total", events);
    }

    /// `delta` events joined (+) or left (-) the buffer.
    pub(crate) fn buffered(&self, delta: i64) {
        let now = if delta >= 0 {
            self.events_buffered.fetch_add(delta.unsigned_abs(), Relaxed) + delta.unsigned_abs()
        } else {
            self.events_buffered.fetch_sub(delta.unsigned_abs(), Relaxed) - delta.unsigned_abs()
        };
        metrics::gauge!("tally_client_events_buffered", "server" => self.server.clone()).set(now as f64);
    }

    pub(crate) fn breaker_state(&self, state: BreakerState) {
        self.breaker_state.store(state as u8, Relaxed);
        metrics::gauge!("tally_client_breaker_state", "server" => self.server.clone()).set(state as u8 as f64);
    }

    pub(crate) fn breaker_opened(&self) {
        self.count(&self.breaker_opened, "tally_client_breaker_opened_total", 1);
        self.breaker_state(BreakerState::Open);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            events_accepted: self.events_accepted.load(Relaxed),
            events_duplicate: self.events_duplicate.load(Relaxed),
            events_failed: self.events_failed.load(Relaxed),
            events_dropped: self.events_dropped.load(Relaxed),
            events_buffered: self.events_buffered.load(Relaxed),
            requests: self.requests.load(Relaxed),
            retries: self.retries.load(Relaxed),
            breaker_opened: self.breaker_opened.load(Relaxed),
            breaker_state: match self.breaker_state.load(Relaxed) {
                1 => BreakerState::Open,
                2 => BreakerState::HalfOpen,
                _ => BreakerState::Closed,
            },
        }
    }
}
