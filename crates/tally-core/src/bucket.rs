//! Time buckets: minutes, hours and days (UTC), and how a minute range is cut into the
//! fewest stored buckets that cover it exactly.
//!
//! Every bucket is named by the epoch minute it starts at, whatever its granularity: the
//! hour bucket of 10:00 and the minute bucket of 10:00 share the number, the granularity
//! tells them apart.

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MINUTES: i64 = 60;
pub const DAY_MINUTES: i64 = 24 * 60;
pub const HOUR_MS: i64 = HOUR_MINUTES * MINUTE_MS;
pub const DAY_MS: i64 = DAY_MINUTES * MINUTE_MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Granularity {
    Minute = 0,
    Hour = 1,
    Day = 2,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn minutes(self) -> i64 {
        match self {
            Granularity::Minute => 1,
            Granularity::Hour => HOUR_MINUTES,
            Granularity::Day => DAY_MINUTES,
        }
    }

    /// The start (epoch minute) of the bucket holding `minute`.
    pub fn bucket_of(self, minute: i64) -> i64 {
        minute.div_euclid(self.minutes()) * self.minutes()
    }

    pub fn name(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn from_name(name: &str) -> Option<Granularity> {
        Granularity::ALL.into_iter().find(|g| g.name() == name)
    }
}

/// The epoch minute holding the instant `ms`.
pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS)
}

/// A half-open range of epoch minutes `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteRange {
    pub start: i64,
    pub end: i64,
}

impl MinuteRange {
    /// The minute-aligned range covering the instants `[from_ms, to_ms)`: the start is
    /// rounded down and the end rounded up, so every instant asked for is included.
    pub fn covering(from_ms: i64, to_ms: i64) -> MinuteRange {
        let start = minute_of(from_ms);
        if to_ms <= from_ms {
            return MinuteRange { start, end: start };
        }
        let end = (to_ms.div_euclid(MINUTE_MS)) + i64::from(to_ms.rem_euclid(MINUTE_MS) != 0);
        MinuteRange { start, end }
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub fn contains(&self, minute: i64) -> bool {
        self.start <= minute && minute < self.end
    }

    /// Cuts the range into spans of whole buckets, coarsest first where they fit: the
    /// result sums to exactly the minutes of the range, each minute in exactly one span.
    pub fn decompose(&self) -> Vec<Span> {
        let mut spans = Vec::with_capacity(5);
        decompose_into(self.start, self.end, Granularity::Day, &mut spans);
        spans
    }
}

/// A run of whole buckets of one granularity: bucket starts `start, start+g, …` below `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub granularity: Granularity,
    pub start: i64,
    pub end: i64,
}

fn decompose_into(start: i64, end: i64, granularity: Granularity, spans: &mut Vec<Span>) {
    if start >= end {
        return;
    }
    let size = granularity.minutes();
    let inner_start = start.div_euclid(size) * size + if start.rem_euclid(size) == 0 { 0 } else { size };
    let inner_end = end.div_euclid(size) * size;
    let finer = match granularity {
        Granularity::Day => Some(Granularity::Hour),
        Granularity::Hour => Some(Granularity::Minute),
        Granularity::Minute => None,
    };
    match finer {
        Some(finer) if inner_start >= inner_end => decompose_into(start, end, finer, spans),
        Some(finer) => {
            decompose_into(start, inner_start, finer, spans);
            spans.push(Span { granularity, start: inner_start, end: inner_end });
            decompose_into(inner_end, end, finer, spans);
        }
        None => spans.push(Span { granularity, start, end }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn covering_rounds_outward() {
        assert_eq!(MinuteRange::covering(0, 60_000), MinuteRange { start: 0, end: 1 });
        assert_eq!(MinuteRange::covering(30_000, 60_001), MinuteRange { start: 0, end: 2 });
        assert_eq!(MinuteRange::covering(-1, 0), MinuteRange { start: -1, end: 0 });
        assert!(MinuteRange::covering(5, 5).is_empty());
    }

    #[test]
    fn year_range_uses_few_spans() {
        let start = 17; // 00:17 on day 0
        let end = 365 * DAY_MINUTES + 5 * 60 + 3;
        let spans = MinuteRange { start, end }.decompose();
        assert_eq!(spans.len(), 5);
        let buckets: i64 = spans.iter().map(|s| (s.end - s.start) / s.granularity.minutes()).sum();
        assert!(buckets < 2 * 60 + 2 * 24 + 365, "{buckets}");
    }

    proptest! {
        #[test]
        fn decompose_covers_each_minute_once(start in -5_000_000i64..5_000_000, len in 0i64..3_000_000) {
            let range = MinuteRange { start, end: start + len };
            let spans = range.decompose();
            let mut next = start;
            for span in &spans {
                let size = span.granularity.minutes();
                prop_assert_eq!(span.start, next, "spans must be contiguous");
                prop_assert_eq!(span.start.rem_euclid(size), 0);
                prop_assert_eq!(span.end.rem_euclid(size), 0);
                prop_assert!(span.start < span.end);
                next = span.end;
            }
            prop_assert_eq!(next, range.end.max(start));
        }
    }
}
