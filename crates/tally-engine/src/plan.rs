//! Query planning: which buckets answer a question about `[from, to)` milliseconds, given
//! what retention keeps now (by the engine's clock). Ranges become whole minutes; past a
//! tier's retention they widen, and series steps coarsen, to the finest tier still holding
//! them. Every plan says the resolution it could answer at, so answers can state it.

use tally_core::bucket::MINUTE_MS;
use tally_core::{Granularity, MinuteRange};

use crate::Engine;

/// Instants read at the tier retained where each falls (see `Engine::plan_boundaries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundaries {
    /// Epoch minutes to cut at, one per instant asked.
    pub minutes: Vec<i64>,
    /// Whether every instant fell on its minute exactly (none was rounded down).
    pub exact: bool,
    /// The finest granularity the cuts need.
    pub resolution: Granularity,
}

impl Engine {
    /// Whether its store's reads cross a network (see `CounterStore::is_remote`).
    pub fn store_is_remote(&self) -> bool {
        self.shared.store.is_remote()
    }

    /// Whether this engine is a node of a cluster (`Engine::start_cluster`).
    pub fn is_cluster(&self) -> bool {
        self.shared.cluster
    }

    /// The engine's wall clock, epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.shared.config.clock.now_ms()
    }

    /// The minutes to sum for `[from_ms, to_ms)`: whole minutes covering it, widened past
    /// each retention tier to the next coarser one; and the resolution that took.
    pub fn plan_range(&self, from_ms: i64, to_ms: i64) -> (MinuteRange, Granularity) {
        self.shared.cutoffs().widen(MinuteRange::covering(from_ms, to_ms))
    }

    /// The steps of a series over `[from_ms, to_ms)`: `step`, or past its retention the
    /// finest tier still holding the start; and the whole steps covering the range.
    pub fn plan_series(&self, step: Granularity, from_ms: i64, to_ms: i64) -> (Granularity, MinuteRange) {
        let minutes = MinuteRange::covering(from_ms, to_ms);
        let finest = self.shared.cutoffs().finest_at(minutes.start).unwrap_or(Granularity::Day);
        let step = step.max(finest);
        let range =
            MinuteRange { start: step.bucket_of(minutes.start), end: step.bucket_of(minutes.end + step.minutes() - 1) };
        (step, range)
    }

    /// Instants (such as local midnights) as minutes to cut a series at: each read at the
    /// finest tier retained there, so rounded down to the hour or day past the minute
    /// tier's retention.
    pub fn plan_boundaries(&self, instants_ms: &[i64]) -> Boundaries {
        let cutoffs = self.shared.cutoffs();
        let mut exact = true;
        let mut resolution = Granularity::Day;
        let minutes = instants_ms
            .iter()
            .map(|&ms| {
                let read = cutoffs.floor(ms.div_euclid(MINUTE_MS));
                exact &= read * MINUTE_MS == ms;
                // The coarsest granularity the boundary is a multiple of.
                let needs =
                    Granularity::ALL.into_iter().rev().find(|g| read % g.minutes() == 0).unwrap_or(Granularity::Minute);
                resolution = resolution.min(needs);
                read
            })
            .collect();
        Boundaries { minutes, exact, resolution }
    }
}
