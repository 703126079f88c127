//! Retention tiers: how long minute, hour and day buckets are kept, and which granularity
//! a query may read at a given instant.
//!
//! A tier's *cutoff* is the first minute it still holds. Cutoffs are aligned to the next
//! coarser granularity (the minute cutoff to an hour, the hour cutoff to a day), so a
//! coarser bucket is either wholly inside a finer tier or wholly outside it. A range that
//! reaches past a tier is widened outward to the coarser tier's buckets there; a boundary
//! instant is floored to the finest tier holding it.

use crate::bucket::{DAY_MINUTES, Granularity, HOUR_MINUTES, MinuteRange};

/// Days each granularity is kept; `None` keeps it forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub minute_days: Option<u32>,
    pub hour_days: Option<u32>,
    pub day_days: Option<u32>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { minute_days: Some(7), hour_days: Some(400), day_days: None }
    }
}

/// The first epoch minute each tier holds at one instant (`i64::MIN`: everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    pub minute: i64,
    pub hour: i64,
    pub day: i64,
}

impl Retention {
    /// Keeps every tier forever.
    pub const KEEP_ALL: Retention = Retention { minute_days: None, hour_days: None, day_days: None };

    /// The cutoffs at epoch minute `now`.
    pub fn cutoffs(&self, now: i64) -> Cutoffs {
        let cut = |days: Option<u32>, align: i64| {
            days.map_or(i64::MIN, |days| (now - i64::from(days) * DAY_MINUTES).div_euclid(align) * align)
        };
        let day = cut(self.day_days, DAY_MINUTES);
        // A coarser tier never starts later than a finer one.
        let hour = cut(self.hour_days, DAY_MINUTES).max(day);
        let minute = cut(self.minute_days, HOUR_MINUTES).max(hour);
        Cutoffs { minute, hour, day }
    }
}

impl Cutoffs {
    /// Nothing is cut off.
    pub const NONE: Cutoffs = Cutoffs { minute: i64::MIN, hour: i64::MIN, day: i64::MIN };

    pub fn of(&self, granularity: Granularity) -> i64 {
        match granularity {
            Granularity::Minute => self.minute,
            Granularity::Hour => self.hour,
            Granularity::Day => self.day,
        }
    }

    /// The finest granularity holding `minute`, or `None` if no tier holds it any more.
    pub fn finest_at(&self, minute: i64) -> Option<Granularity> {
        Granularity::ALL.into_iter().find(|g| minute >= self.of(*g))
    }

    /// `minute` floored to the buckets of the finest tier holding it (clamped to the day
    /// cutoff when nothing holds it).
    pub fn floor(&self, minute: i64) -> i64 {
        match self.finest_at(minute) {
            Some(granularity) => granularity.bucket_of(minute),
            None => self.day,
        }
    }

    /// The range to sum for `range`: each end widened outward to the buckets of the finest
    /// tier holding it, the start clamped to the oldest data kept. Also the coarsest
    /// granularity the result may need.
    pub fn widen(&self, range: MinuteRange) -> (MinuteRange, Granularity) {
        if range.is_empty() {
            return (range, Granularity::Minute);
        }
        let start = self.floor(range.start.max(self.day));
        let end_granularity = self.finest_at(range.end - 1).unwrap_or(Granularity::Day);
        let size = end_granularity.minutes();
        let end = (range.end - 1).div_euclid(size) * size + size;
        let end = end.max(start);
        let start_granularity = self.finest_at(start).unwrap_or(Granularity::Day);
        (MinuteRange { start, end }, start_granularity.max(end_granularity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 29_000_000; // an epoch minute in 2025

    #[test]
    fn cutoffs_are_aligned_and_ordered() {
        let cutoffs = Retention::default().cutoffs(NOW + 17);
        assert_eq!(cutoffs.minute % 60, 0);
        assert_eq!(cutoffs.hour % DAY_MINUTES, 0);
        assert_eq!(cutoffs.day, i64::MIN);
        assert!(cutoffs.minute > NOW - 7 * DAY_MINUTES - 60 && cutoffs.minute <= NOW - 7 * DAY_MINUTES + 17);
        let everything = Retention { minute_days: None, hour_days: None, day_days: None }.cutoffs(NOW);
        assert_eq!(everything.finest_at(i64::MIN + 1), Some(Granularity::Minute));
    }

    #[test]
    fn a_recent_range_is_untouched_and_an_old_one_widens_to_hours_then_days() {
        let cutoffs = Retention::default().cutoffs(NOW);
        let recent = MinuteRange { start: NOW - 100, end: NOW - 3 };
        assert_eq!(cutoffs.widen(recent), (recent, Granularity::Minute));
        let old = MinuteRange { start: NOW - 30 * DAY_MINUTES + 7, end: NOW - 3 };
        let (widened, resolution) = cutoffs.widen(old);
        assert_eq!((widened.start % 60, widened.end, resolution), (0, NOW - 3, Granularity::Hour));
        let ancient = MinuteRange { start: NOW - 500 * DAY_MINUTES + 7, end: NOW - 450 * DAY_MINUTES + 7 };
        let (widened, resolution) = cutoffs.widen(ancient);
        assert_eq!((widened.start % DAY_MINUTES, widened.end % DAY_MINUTES, resolution), (0, 0, Granularity::Day));
    }

    proptest! {
        /// Every span of a widened range lies wholly inside the tier it is read from, and
        /// the widened range covers the asked one.
        #[test]
        fn widened_ranges_read_only_retained_buckets(start in -1_000_000i64..1_000_000, len in 1i64..1_000_000) {
            let cutoffs = Retention { minute_days: Some(7), hour_days: Some(400), day_days: Some(3000) }.cutoffs(NOW);
            let asked = MinuteRange { start: NOW - start.abs(), end: NOW - start.abs() + len };
            let (widened, resolution) = cutoffs.widen(asked);
            prop_assert!(widened.end >= asked.end);
            prop_assert!(widened.start <= asked.start.max(cutoffs.day));
            // The boundaries are exact to the resolution reported.
            prop_assert_eq!(widened.start.rem_euclid(resolution.minutes()), 0);
            for span in widened.decompose() {
                prop_assert!(span.start >= cutoffs.of(span.granularity), "{span:?} {cutoffs:?}");
            }
        }
    }
}
