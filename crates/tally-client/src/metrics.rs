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

/// One counter, kept here (for `snapshot`) and exported (its handle registered once).
struct Tallied {
    value: AtomicU64,
    exported: metrics::Counter,
}

impl Tallied {
    fn new(name: &'static str, server: &str) -> Tallied {
        Tallied { value: AtomicU64::new(0), exported: metrics::counter!(name, "server" => server.to_owned()) }
    }

    fn add(&self, n: u64) {
        self.value.fetch_add(n, Relaxed);
        self.exported.increment(n);
    }

    fn get(&self) -> u64 {
        self.value.load(Relaxed)
    }
}

pub(crate) struct Stats {
    events_accepted: Tallied,
    events_duplicate: Tallied,
    events_failed: Tallied,
    events_dropped: Tallied,
    requests: Tallied,
    retries: Tallied,
    breaker_opened: Tallied,
    events_buffered: AtomicU64,
    buffered_gauge: metrics::Gauge,
    breaker_state: AtomicU8,
    breaker_gauge: metrics::Gauge,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Stats").field(&self.snapshot()).finish()
    }
}

impl Stats {
    pub(crate) fn new(server: &str) -> Stats {
        let label = || server.to_owned();
        Stats {
            events_accepted: Tallied::new("tally_client_events_accepted_total", server),
            events_duplicate: Tallied::new("tally_client_events_duplicate_total", server),
            events_failed: Tallied::new("tally_client_events_failed_total", server),
            events_dropped: Tallied::new("tally_client_events_dropped_total", server),
            requests: Tallied::new("tally_client_requests_total", server),
            retries: Tallied::new("tally_client_retries_total", server),
            breaker_opened: Tallied::new("tally_client_breaker_opened_total", server),
            events_buffered: AtomicU64::new(0),
            buffered_gauge: metrics::gauge!("tally_client_events_buffered", "server" => label()),
            breaker_state: AtomicU8::new(BreakerState::Closed as u8),
            breaker_gauge: metrics::gauge!("tally_client_breaker_state", "server" => label()),
        }
    }

    pub(crate) fn request(&self, retry: bool) {
        self.requests.add(1);
        if retry {
            self.retries.add(1);
        }
    }

    pub(crate) fn acknowledged(&self, accepted: u64, duplicates: u64) {
        self.events_accepted.add(accepted);
        self.events_duplicate.add(duplicates);
    }

    pub(crate) fn failed(&self, events: u64) {
        self.events_failed.add(events);
    }

    pub(crate) fn dropped(&self, events: u64) {
        self.events_dropped.add(events);
    }

    /// `delta` events joined (+) or left (-) the buffer.
    pub(crate) fn buffered(&self, delta: i64) {
        let now = if delta >= 0 {
            self.events_buffered.fetch_add(delta.unsigned_abs(), Relaxed) + delta.unsigned_abs()
        } else {
            self.events_buffered.fetch_sub(delta.unsigned_abs(), Relaxed) - delta.unsigned_abs()
        };
        self.buffered_gauge.set(now as f64);
    }

    pub(crate) fn breaker_state(&self, state: BreakerState) {
        self.breaker_state.store(state as u8, Relaxed);
        self.breaker_gauge.set(state as u8 as f64);
    }

    pub(crate) fn breaker_opened(&self) {
        self.breaker_opened.add(1);
        self.breaker_state(BreakerState::Open);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            events_accepted: self.events_accepted.get(),
            events_duplicate: self.events_duplicate.get(),
            events_failed: self.events_failed.get(),
            events_dropped: self.events_dropped.get(),
            events_buffered: self.events_buffered.load(Relaxed),
            requests: self.requests.get(),
            retries: self.retries.get(),
            breaker_opened: self.breaker_opened.get(),
            breaker_state: match self.breaker_state.load(Relaxed) {
                1 => BreakerState::Open,
                2 => BreakerState::HalfOpen,
                _ => BreakerState::Closed,
            },
        }
    }
}
