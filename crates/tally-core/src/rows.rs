//! What a flush writes, as plain rows: the backend-neutral result of rolling a flush's
//! minute cells up into one tier (minute, hour or day). The aggregation side builds them
//! (`tally_aggregate::rollup`), one tier at a time; a store only keys, merges and writes
//! them. Rows borrow their names from the deltas they were built from.

use crate::Granularity;
use crate::hll::Hll;
use crate::topk::TopSketch;

/// A count of events and the sum of their values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub count: u64,
    /// Exact: with |value| ≤ 2^53 per event, 2^64 events cannot overflow 128 bits, so the
    /// sum does not depend on the order events are added in.
    pub sum: i128,
}

impl Counter {
    /// Inlined across crates: it is on the per-event path of every partition writer.
    #[inline]
    pub fn add(&mut self, other: Counter) {
        self.count += other.count;
        self.sum += other.sum;
    }
}

/// Items a stored top-items sketch keeps per bucket, by granularity (minute, hour, day).
/// More items make the error bound smaller and each flush rewrite bigger.
pub const TOP_SKETCH_ITEMS: [usize; 3] = [1024, 4096, 4096];

/// What one (type, video) gained in one bucket: added to the stored counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRow<'a> {
    pub event_type: &'a str,
    pub video_id: &'a str,
    pub bucket: i64,
    pub counter: Counter,
}

impl<'a> CounterRow<'a> {
    /// (type, video, bucket).
    pub fn key(&self) -> (&'a str, &'a str, i64) {
        (self.event_type, self.video_id, self.bucket)
    }
}

/// Distinct viewers one (type, video) gained in one bucket: merged into the stored sketch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniquesRow<'a> {
    pub event_type: &'a str,
    pub video_id: &'a str,
    pub bucket: i64,
    pub sketch: Hll,
}

/// The most counted videos of one (type, bucket) in this flush, already pruned to
/// `TOP_SKETCH_ITEMS`: merged into the stored sketch, which is pruned again.
#[derive(Debug, Clone)]
pub struct TopRow<'a> {
    pub event_type: &'a str,
    pub bucket: i64,
    pub sketch: TopSketch,
}

/// Everything one flush writes into one tier. Buckets before the tier's retention cutoff
/// are already left out. Rows are distinct per key ((type, video, bucket), or (type,
/// bucket) for top rows) and in no particular order: a store sorts them into its own key
/// order, once.
#[derive(Debug, Clone)]
pub struct TierRows<'a> {
    pub granularity: Granularity,
    pub counters: Vec<CounterRow<'a>>,
    pub uniques: Vec<UniquesRow<'a>>,
    pub top: Vec<TopRow<'a>>,
}

impl<'a> TierRows<'a> {
    pub fn new(granularity: Granularity) -> TierRows<'a> {
        TierRows { granularity, counters: Vec::new(), uniques: Vec::new(), top: Vec::new() }
    }

    /// The video index of the day tier: each (type, day, video) with events, once. Empty
    /// for the other tiers.
    pub fn videos(&self) -> impl Iterator<Item = (&'a str, i64, &'a str)> + '_ {
        let day_tier = self.granularity == Granularity::Day;
        self.counters.iter().filter(move |_| day_tier).map(|row| (row.event_type, row.bucket, row.video_id))
    }

    /// Each event type with events in the day tier and its last day with events, once
    /// per type. Empty for the other tiers.
    pub fn last_days(&self) -> Vec<(&'a str, i64)> {
        let mut last: std::collections::HashMap<&'a str, i64> = std::collections::HashMap::new();
        for (event_type, day, _) in self.videos() {
            let stored = last.entry(event_type).or_insert(day);
            *stored = (*stored).max(day);
        }
        last.into_iter().collect()
    }
}
