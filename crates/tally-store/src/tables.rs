//! Which redb table holds a bucket: one table per (kind, granularity, period), named
//! `kind.granularity.period`. Retention then drops whole tables, which frees their pages
//! at once, instead of deleting rows one by one.
//!
//! A period is a fixed run of minutes: one day for minute buckets, 30 days for hour
//! buckets, 360 days for day buckets. A tier therefore keeps at most one period more than
//! its retention on disk; queries never read past the retention cutoff.

use tally_core::Granularity;
use tally_core::bucket::DAY_MINUTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Counters,
    Uniques,
    Top,
    Videos,
    /// The event types each video has in a period of days (`videotypes.day.*`).
    VideoTypes,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Counters, Kind::Uniques, Kind::Top, Kind::Videos, Kind::VideoTypes];

    pub(crate) fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Counters => "counters",
            Kind::Uniques => "uniques",
            Kind::Top => "top",
            Kind::Videos => "videos",
            Kind::VideoTypes => "videotypes",
        }
    }
}

pub(crate) fn period_minutes(granularity: Granularity) -> i64 {
    match granularity {
        Granularity::Minute => DAY_MINUTES,
        Granularity::Hour => 30 * DAY_MINUTES,
        Granularity::Day => 360 * DAY_MINUTES,
    }
}

pub(crate) fn period_of(granularity: Granularity, bucket: i64) -> i64 {
    bucket.div_euclid(period_minutes(granularity))
}

pub(crate) fn name(kind: Kind, granularity: Granularity, period: i64) -> String {
    format!("{}.{}.{period}", kind.name(), granularity.name())
}

/// The (kind, granularity, period) a table name stands for; `None` for other tables.
pub(crate) fn parse(name: &str) -> Option<(Kind, Granularity, i64)> {
    let mut parts = name.split('.');
    let kind = parts.next()?;
    let kind = Kind::ALL.into_iter().find(|k| k.name() == kind)?;
    let granularity = Granularity::from_name(parts.next()?)?;
    let period = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((kind, granularity, period))
}

/// The periods overlapping the buckets `[start, end)`, each with the part of the range
/// inside it, in order.
pub(crate) fn periods(granularity: Granularity, start: i64, end: i64) -> impl Iterator<Item = (i64, i64, i64)> {
    let size = period_minutes(granularity);
    let first = start.div_euclid(size);
    let last = if end > start { (end - 1).div_euclid(size) } else { first - 1 };
    (first..=last).map(move |period| (period, start.max(period * size), end.min((period + 1) * size)))
}

/// Whether every bucket of the table lies before `cutoff`.
pub(crate) fn entirely_before(granularity: Granularity, period: i64, cutoff: i64) -> bool {
    (period + 1).saturating_mul(period_minutes(granularity)) <= cutoff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_periods_tile_a_range() {
        let name = name(Kind::Uniques, Granularity::Hour, -3);
        assert_eq!(name, "uniques.hour.-3");
        assert_eq!(parse(&name), Some((Kind::Uniques, Granularity::Hour, -3)));
        assert_eq!(parse("checkpoints"), None);
        assert_eq!(parse("top.day.1.2"), None);
        let parts: Vec<_> = periods(Granularity::Minute, 1000, 3000).collect();
        assert_eq!(parts, vec![(0, 1000, 1440), (1, 1440, 2880), (2, 2880, 3000)]);
        assert_eq!(periods(Granularity::Minute, 5, 5).count(), 0);
        assert!(entirely_before(Granularity::Minute, 0, 1440));
        assert!(!entirely_before(Granularity::Minute, 1, 1440));
    }
}
