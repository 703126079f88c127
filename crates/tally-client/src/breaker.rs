//! The circuit breaker: after `failures_to_open` failures in a row (no answer, a timeout, a
//! 5xx) it opens and no request is sent for `open_for`; then it is half-open and lets one
//! probe through; the probe's success closes it, its failure opens it again. 429 is the
//! server pacing a healthy client, and 4xx answers prove the server is up: neither counts
//! as a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::Stats;

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub failures_to_open: u32,
    /// How long the breaker stays open before it lets a probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig { failures_to_open: 5, open_for: Duration::from_secs(5) }
    }
}

/// The breaker's state, as its metrics show it (`tally_client_breaker_state`: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
    stats: Arc<Stats>,
}

/// How long to wait before asking again when the probe of a half-open breaker is out.
const PROBE_POLL: Duration = Duration::from_millis(20);

impl Breaker {
    pub(crate) fn new(config: BreakerConfig, stats: Arc<Stats>) -> Breaker {
        Breaker { config, state: Mutex::new(State::Closed { failures: 0 }), stats }
    }

    /// Whether a request may go now (and whether it is a half-open breaker's probe); if not,
    /// how long until it may ask again.
    pub(crate) fn admit(&self) -> Result<bool, Duration> {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => Ok(false),
            State::Open { until } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                *state = State::HalfOpen { probing: true };
                self.stats.breaker_state(BreakerState::HalfOpen);
                Ok(true)
            }
            State::HalfOpen { probing: true } => Err(PROBE_POLL),
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Ok(true)
            }
        }
    }

    pub(crate) fn succeeded(&self) {
        let mut state = self.state.lock();
        if !matches!(*state, State::Closed { .. }) {
            self.stats.breaker_state(BreakerState::Closed);
        }
        *state = State::Closed { failures: 0 };
    }

    pub(crate) fn failed(&self) {
        let mut state = self.state.lock();
        let open = match *state {
            State::Closed { failures } if failures + 1 >= self.config.failures_to_open => true,
            State::Closed { failures } => {
                *state = State::Closed { failures: failures + 1 };
                false
            }
            State::HalfOpen { .. } => true,
            // A request admitted before the breaker opened: it stays open as it is.
            State::Open { .. } => false,
        };
        if open {
            *state = State::Open { until: Instant::now() + self.config.open_for };
            self.stats.breaker_opened();
        }
    }

    /// A probe that ended without telling anything about the server's health (cancelled,
    /// or refused before it was sent): a half-open breaker may probe again.
    pub(crate) fn probe_released(&self) {
        let mut state = self.state.lock();
        if let State::HalfOpen { probing: true } = *state {
            *state = State::HalfOpen { probing: false };
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match *self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for_ms: u64) -> Breaker {
        let config = BreakerConfig { failures_to_open: 3, open_for: Duration::from_millis(open_for_ms) };
        Breaker::new(config, Arc::new(Stats::new("test")))
    }

    #[test]
    fn opens_after_failures_in_a_row_and_a_success_resets_the_count() {
        let breaker = breaker(60_000);
        breaker.failed();
        breaker.failed();
        breaker.succeeded();
        breaker.failed();
        breaker.failed();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.admit().is_ok());
        breaker.failed();
        assert_eq!(breaker.state(), BreakerState::Open);
        let wait = breaker.admit().expect_err("an open breaker refuses");
        assert!(wait > Duration::from_secs(59), "waits until the open time is over, got {wait:?}");
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_outcome_decides() {
        let breaker = breaker(0);
        for _ in 0..3 {
            breaker.failed();
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.admit(), Ok(true), "the open time is over: one probe");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admit().is_err(), "a second request waits for the probe");
        breaker.probe_released();
        assert_eq!(breaker.admit(), Ok(true), "a probe given up on lets another through");
        breaker.failed();
        assert_eq!(breaker.state(), BreakerState::Open, "a failed probe opens it again");
        assert!(breaker.admit().is_ok());
        breaker.succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed, "a good probe closes it");
        assert!(breaker.admit().is_ok());
    }
}
