//! The rollup of a flush: the minute cells of every partition's deltas, summed into the
//! buckets of one tier (minute, hour or day), with each bucket's top-items sketch and the
//! distinct-viewer sketches, and without the buckets already past the tier's retention.
//! Backend-neutral: a store gets plain rows (`tally_core::rows`) and only keys, merges
//! and writes them. Built one tier at a time, so a flush holds one tier's rows at once.

use std::collections::HashMap;

use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Counter, CounterRow, Cutoffs, Granularity, TOP_SKETCH_ITEMS, TierRows, TopRow, UniquesRow};

use crate::Deltas;

/// The exact counts of the videos of one (type, bucket), as (count, video id).
type BucketItems<'a> = Vec<(u64, &'a [u8])>;

/// The rows `deltas` add to the tier of `granularity`, leaving out buckets before its
/// cutoff.
pub fn rollup<'a>(deltas: &[&'a Deltas], cutoffs: &Cutoffs, granularity: Granularity) -> TierRows<'a> {
    let mut rows = TierRows::new(granularity);
    let cutoff = cutoffs.of(granularity);
    // The exact count of every video in each (type, bucket); each becomes a pruned
    // top-items sketch at the end. A video lives in one partition and has one counter per
    // bucket, so the items of a bucket are distinct.
    let mut top: HashMap<(&str, i64), BucketItems> = HashMap::new();
    let mut merged: Vec<(i64, Counter)> = Vec::new();
    for deltas in deltas {
        for (event_type, video_id, cells) in deltas.iter() {
            merged.clear();
            for cell in cells {
                let bucket = granularity.bucket_of(cell.minute);
                if bucket < cutoff {
                    continue;
                }
                match merged.iter_mut().find(|(b, _)| *b == bucket) {
                    Some((_, counter)) => counter.add(cell.counter),
                    None => merged.push((bucket, cell.counter)),
                }
            }
            for &(bucket, counter) in &merged {
                rows.counters.push(CounterRow { event_type, video_id, bucket, counter });
                top.entry((event_type, bucket)).or_default().push((counter.count, video_id.as_bytes()));
            }
        }
        let mut uniques: HashMap<(&str, &str, i64), Hll> = HashMap::new();
        for (event_type, video_id, minute, sketch) in deltas.iter_viewers() {
            let bucket = granularity.bucket_of(minute);
            if bucket >= cutoff {
                uniques.entry((event_type, video_id, bucket)).or_default().merge(sketch);
            }
        }
        rows.uniques.extend(uniques.into_iter().map(|((event_type, video_id, bucket), sketch)| UniquesRow {
            event_type,
            video_id,
            bucket,
            sketch,
        }));
    }
    let items = TOP_SKETCH_ITEMS[granularity as usize];
    rows.top.extend(top.into_iter().map(|((event_type, bucket), videos)| TopRow {
        event_type,
        bucket,
        sketch: TopSketch::from_distinct(videos, items),
    }));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::bucket::{DAY_MINUTES, HOUR_MINUTES};

    fn deltas(cells: &[(&str, &str, i64, u64)]) -> Deltas {
        let mut deltas = Deltas::default();
        for &(event_type, video_id, minute, count) in cells {
            for _ in 0..count {
                deltas.add(event_type, video_id, minute, 1, None);
            }
        }
        deltas
    }

    #[test]
    fn minutes_roll_up_into_hours_and_days_without_expired_buckets() {
        let day = 20_000 * DAY_MINUTES;
        let a = deltas(&[("view", "v", day + 1, 2), ("view", "v", day + 59, 3), ("view", "w", day + 61, 1)]);
        let b = deltas(&[("like", "x", day - DAY_MINUTES, 4)]);
        let hours = rollup(&[&a, &b], &Cutoffs::NONE, Granularity::Hour);
        let mut counts: Vec<_> =
            hours.counters.iter().map(|r| (r.event_type, r.video_id, r.bucket, r.counter.count)).collect();
        counts.sort_unstable();
        assert_eq!(
            counts,
            [("like", "x", day - DAY_MINUTES, 4), ("view", "v", day, 5), ("view", "w", day + HOUR_MINUTES, 1)]
        );
        let days = rollup(&[&a, &b], &Cutoffs::NONE, Granularity::Day);
        let mut last_days = days.last_days();
        last_days.sort_unstable();
        assert_eq!(last_days, [("like", day - DAY_MINUTES), ("view", day)]);
        assert_eq!(days.videos().count(), 3);
        let top = days.top.iter().find(|t| t.event_type == "view").unwrap();
        assert_eq!((top.sketch.lower_bound(b"v"), top.sketch.lower_bound(b"w")), (5, 1));
        let cutoffs = Cutoffs { minute: day, hour: day, day };
        let kept = rollup(&[&a, &b], &cutoffs, Granularity::Day);
        assert!(kept.counters.iter().all(|r| r.event_type == "view"), "the expired day is left out");
        assert!(rollup(&[&a], &Cutoffs::NONE, Granularity::Minute).videos().next().is_none());
    }
}
