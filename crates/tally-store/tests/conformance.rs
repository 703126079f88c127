//! Every store behaviour the engine relies on, run against each backend: the embedded
//! redb store and PostgreSQL (a server of its own per test, see `tally-pgtest`).
//!
//! A new backend passes this suite before the engine may use it.

use tally_aggregate::{Deltas, rollup};
use tally_core::bucket::DAY_MINUTES;
use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Counter, Cutoffs, Granularity, Span};
use tally_store::{Checkpoint, CounterStore, PartitionFlush, PoolOptions, PostgresStore, RedbStore, StoreError};

/// A store to test, and what keeps its data alive.
struct Opened {
    store: Box<dyn CounterStore>,
    _data: Box<dyn std::any::Any>,
}

fn redb() -> Opened {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("store.redb"), 64 << 20, true).unwrap();
    Opened { store: Box::new(store), _data: Box::new(dir) }
}

fn postgres() -> Opened {
    let server = tally_pgtest::Postgres::start();
    let store = PostgresStore::open(&server.url(), PoolOptions::default()).unwrap();
    // Dropped in field order: the store's connections close before the server stops.
    Opened { store: Box::new(store), _data: Box::new(server) }
}

macro_rules! conformance {
    ($($behaviour:ident),* $(,)?) => {
        mod redb {
            $(#[test] fn $behaviour() { super::$behaviour(&*super::redb().store) })*
        }
        mod postgres {
            $(#[test] fn $behaviour() { super::$behaviour(&*super::postgres().store) })*
        }
    };
}

conformance!(
    a_flush_rolls_minutes_into_hours_and_days_and_moves_the_checkpoint,
    sketches_types_and_the_video_index_follow_the_flushed_events,
    a_type_whose_days_all_expired_leaves_the_type_list,
    retention_skips_expired_tiers_at_flush_and_purge_drops_whole_periods,
    a_commit_not_starting_at_the_stored_checkpoint_is_refused_whole,
    sums_are_exact_past_64_bits_and_negative_values_count,
    a_snapshot_does_not_see_later_commits,
    the_dedup_journal_keeps_only_live_generations,
);

/// Commits `deltas` for `partition` the way the engine does: rolled up one tier at a time,
/// starting where the stored checkpoint is.
fn flush(store: &dyn CounterStore, partition: u32, deltas: &Deltas, offset: u64, cutoffs: &Cutoffs) {
    let start = store.checkpoint(partition).unwrap().map_or(0, |c| c.offset);
    let checkpoint = Checkpoint { partition, offset, dedup_generation_starts: vec![] };
    let flushes = [PartitionFlush { start, checkpoint, journal: &[], notes: &[] }];
    store.commit(&flushes, &mut |granularity| rollup(&[deltas], cutoffs, granularity)).unwrap();
}

fn sum(
    store: &dyn CounterStore,
    event_type: &str,
    video: &str,
    granularity: Granularity,
    start: i64,
    end: i64,
) -> Counter {
    store.snapshot().unwrap().sum(event_type, video, Span { granularity, start, end }).unwrap()
}

fn a_flush_rolls_minutes_into_hours_and_days_and_moves_the_checkpoint(store: &dyn CounterStore) {
    store.claim_partitions(2).unwrap();
    let mut deltas = Deltas::default();
    deltas.add("view", "v", 59, 1, None);
    deltas.add("view", "v", 60, 2, None);
    deltas.add("view", "v", 60, 3, None);
    deltas.add("view", "w", 60, 9, None);
    let checkpoint = Checkpoint { partition: 1, offset: 77, dedup_generation_starts: vec![5] };
    let journal = [(5, vec![1; 17])];
    let flushes = [PartitionFlush { start: 0, checkpoint: checkpoint.clone(), journal: &journal, notes: &[] }];
    store.commit(&flushes, &mut |g| rollup(&[&deltas], &Cutoffs::NONE, g)).unwrap();
    assert_eq!(store.checkpoint(1).unwrap(), Some(checkpoint));
    assert_eq!(store.checkpoint(0).unwrap(), None, "never flushed");
    assert_eq!(store.dedup_blobs(1, 5).unwrap(), vec![vec![1; 17]]);

    assert_eq!(sum(store, "view", "v", Granularity::Minute, 0, 60), Counter { count: 1, sum: 1 });
    assert_eq!(sum(store, "view", "v", Granularity::Minute, 60, 61), Counter { count: 2, sum: 5 });
    assert_eq!(sum(store, "view", "v", Granularity::Hour, 0, 120), Counter { count: 3, sum: 6 });
    assert_eq!(sum(store, "view", "v", Granularity::Day, 0, 1440), Counter { count: 3, sum: 6 });
    assert_eq!(sum(store, "view", "unseen", Granularity::Day, 0, 1440), Counter::default());
    let snapshot = store.snapshot().unwrap();
    assert_eq!((snapshot.checkpoint_offset(1).unwrap(), snapshot.checkpoint_offset(0).unwrap()), (77, 0));
    let mut buckets = Vec::new();
    snapshot.buckets("view", "v", Granularity::Minute, 0, 1440, &mut |b, c| buckets.push((b, c.count))).unwrap();
    assert_eq!(buckets, [(59, 1), (60, 2)], "ascending, non-empty buckets");
    drop(snapshot);
    assert!(matches!(store.claim_partitions(3), Err(StoreError::PartitionCount { stored: 2, configured: 3 })));
    store.claim_partitions(2).unwrap();
}

fn sketches_types_and_the_video_index_follow_the_flushed_events(store: &dyn CounterStore) {
    store.claim_partitions(1).unwrap();
    let day = 20_000 * DAY_MINUTES;
    let mut deltas = Deltas::default();
    for (minute, viewer) in [(day, "ann"), (day + 1, "bob"), (day + 61, "ann")] {
        deltas.add("view", "v", minute, 1, Some(viewer));
    }
    deltas.add("view", "w", day, 1, None);
    deltas.add("like", "v", day, 1, Some("cy"));
    flush(store, 0, &deltas, 1, &Cutoffs::NONE);
    // A second flush merges into the stored sketches.
    let mut more = Deltas::default();
    more.add("view", "v", day + 2, 1, Some("dee"));
    flush(store, 0, &more, 2, &Cutoffs::NONE);

    let snapshot = store.snapshot().unwrap();
    let uniques = |granularity, start, end| {
        let mut hll = Hll::default();
        snapshot.uniques("view", "v", Span { granularity, start, end }, &mut hll).unwrap();
        hll.estimate().round() as u64
    };
    assert_eq!(uniques(Granularity::Minute, day, day + 60), 3);
    assert_eq!(uniques(Granularity::Hour, day, day + 120), 3);
    assert_eq!(uniques(Granularity::Day, day, day + DAY_MINUTES), 3);
    assert_eq!(uniques(Granularity::Minute, day + 1, day + 2), 1);

    let mut top = TopSketch::default();
    let whole_day = Span { granularity: Granularity::Day, start: day, end: day + DAY_MINUTES };
    snapshot.top("view", whole_day, &mut top).unwrap();
    assert_eq!((top.lower_bound(b"v"), top.lower_bound(b"w"), top.offset()), (4, 1, 0));

    let mut videos = Vec::new();
    snapshot.videos("view", day, day + DAY_MINUTES, &mut |v| videos.push(v.to_string())).unwrap();
    videos.sort();
    assert_eq!(videos, ["v", "w"]);
    assert_eq!(snapshot.types().unwrap(), ["like", "view"]);
    let video_types = |video: &str, start: i64, end: i64| {
        let mut types = Vec::new();
        snapshot.video_types(video, start, end, &mut |t| types.push(t.to_string())).unwrap();
        types.sort();
        types
    };
    assert_eq!(video_types("v", day, day + DAY_MINUTES), ["like", "view"]);
    assert_eq!(video_types("w", 0, day + DAY_MINUTES), ["view"]);
    assert!(video_types("v", day + 360 * DAY_MINUTES, day + 361 * DAY_MINUTES).is_empty(), "another period");
    assert!(video_types("unseen", 0, day + DAY_MINUTES).is_empty());
}

/// The type list shrinks when day retention drops every day of a type.
fn a_type_whose_days_all_expired_leaves_the_type_list(store: &dyn CounterStore) {
    store.claim_partitions(1).unwrap();
    let (old, recent) = (100 * DAY_MINUTES, 500 * DAY_MINUTES);
    let mut deltas = Deltas::default();
    deltas.add("gone", "v", old, 1, None);
    deltas.add("kept", "v", old, 1, None);
    deltas.add("kept", "v", recent, 1, None);
    flush(store, 0, &deltas, 1, &Cutoffs::NONE);
    assert_eq!(store.snapshot().unwrap().types().unwrap(), ["gone", "kept"]);
    store.purge(&Cutoffs { minute: recent, hour: recent, day: recent }).unwrap();
    assert_eq!(store.snapshot().unwrap().types().unwrap(), ["kept"]);
}

fn retention_skips_expired_tiers_at_flush_and_purge_drops_whole_periods(store: &dyn CounterStore) {
    store.claim_partitions(1).unwrap();
    let old_day = 100 * DAY_MINUTES;
    let mut deltas = Deltas::default();
    deltas.add("view", "v", old_day + 5, 1, None);
    // Minutes of `old_day` are already past the minute cutoff: only hour and day land.
    let cutoffs = Cutoffs { minute: old_day + DAY_MINUTES, hour: i64::MIN, day: i64::MIN };
    flush(store, 0, &deltas, 1, &cutoffs);
    let read = |granularity| sum(store, "view", "v", granularity, old_day, old_day + DAY_MINUTES).count;
    assert_eq!((read(Granularity::Minute), read(Granularity::Hour)), (0, 1));
    let later = Cutoffs { minute: old_day + 60 * DAY_MINUTES, hour: old_day + 60 * DAY_MINUTES, day: i64::MIN };
    assert!(store.purge(&later).unwrap() >= 2, "hour counters and top items of that period");
    assert_eq!((read(Granularity::Hour), read(Granularity::Day)), (0, 1));
    assert_eq!(store.purge(&later).unwrap(), 0);
    // A purged period can be written again.
    flush(store, 0, &deltas, 2, &Cutoffs::NONE);
    assert_eq!(read(Granularity::Hour), 1);
}

/// The fencing rule every backend keeps: a flush applies only on top of the checkpoint
/// it starts from, or not at all, whatever else it carries.
fn a_commit_not_starting_at_the_stored_checkpoint_is_refused_whole(store: &dyn CounterStore) {
    store.claim_partitions(2).unwrap();
    let mut deltas = Deltas::default();
    deltas.add("view", "v", 10, 1, None);
    flush(store, 0, &deltas, 100, &Cutoffs::NONE);
    let at = |partition, start, offset| PartitionFlush {
        start,
        checkpoint: Checkpoint { partition, offset, dedup_generation_starts: vec![] },
        journal: &[],
        notes: &[],
    };
    // Partition 1 is fine, partition 0 replays from 0 although 100 is stored.
    let refused = store.commit(&[at(1, 0, 50), at(0, 0, 200)], &mut |g| rollup(&[&deltas], &Cutoffs::NONE, g));
    assert!(matches!(refused, Err(StoreError::Fenced { partition: 0, .. })), "{refused:?}");
    assert_eq!(store.checkpoint(1).unwrap(), None, "nothing of the refused commit applied");
    assert_eq!(sum(store, "view", "v", Granularity::Day, 0, DAY_MINUTES).count, 1);
    store.commit(&[at(1, 0, 50), at(0, 100, 200)], &mut |g| rollup(&[&deltas], &Cutoffs::NONE, g)).unwrap();
    assert_eq!(sum(store, "view", "v", Granularity::Day, 0, DAY_MINUTES).count, 2);
}

fn sums_are_exact_past_64_bits_and_negative_values_count(store: &dyn CounterStore) {
    store.claim_partitions(1).unwrap();
    let big = 1_i64 << 53;
    let mut deltas = Deltas::default();
    for _ in 0..4096 {
        deltas.add("watch", "v", 5, big, None);
    }
    deltas.add("watch", "v", 6, -7, None);
    flush(store, 0, &deltas, 1, &Cutoffs::NONE);
    flush(store, 0, &deltas, 2, &Cutoffs::NONE);
    let expected = 2 * (4096 * i128::from(big) - 7);
    assert!(expected > i128::from(i64::MAX));
    assert_eq!(sum(store, "watch", "v", Granularity::Hour, 0, 60), Counter { count: 2 * 4097, sum: expected });
}

fn a_snapshot_does_not_see_later_commits(store: &dyn CounterStore) {
    store.claim_partitions(1).unwrap();
    let mut deltas = Deltas::default();
    deltas.add("view", "v", 10, 1, None);
    flush(store, 0, &deltas, 1, &Cutoffs::NONE);
    let before = store.snapshot().unwrap();
    let span = Span { granularity: Granularity::Minute, start: 0, end: 60 };
    assert_eq!(before.sum("view", "v", span).unwrap().count, 1);
    flush(store, 0, &deltas, 2, &Cutoffs::NONE);
    assert_eq!((before.sum("view", "v", span).unwrap().count, before.checkpoint_offset(0).unwrap()), (1, 1));
    assert_eq!(store.snapshot().unwrap().sum("view", "v", span).unwrap().count, 2);
}

fn the_dedup_journal_keeps_only_live_generations(store: &dyn CounterStore) {
    store.claim_partitions(1).unwrap();
    let deltas = Deltas::default();
    let commit = |start, offset, generations: Vec<i64>, journal: &[(i64, Vec<u8>)]| {
        let checkpoint = Checkpoint { partition: 0, offset, dedup_generation_starts: generations };
        let flushes = [PartitionFlush { start, checkpoint, journal, notes: &[] }];
        store.commit(&flushes, &mut |g| rollup(&[&deltas], &Cutoffs::NONE, g)).unwrap();
    };
    commit(0, 10, vec![1000, 2000], &[(1000, vec![1]), (2000, vec![2])]);
    commit(10, 20, vec![1000, 2000], &[(2000, vec![3])]);
    assert_eq!(store.dedup_blobs(0, 2000).unwrap(), [vec![2], vec![3]], "in log order");
    commit(20, 30, vec![2000, 3000], &[(3000, vec![4])]);
    assert!(store.dedup_blobs(0, 1000).unwrap().is_empty(), "a dead generation is forgotten");
    assert_eq!(store.dedup_blobs(0, 2000).unwrap().len(), 2);
    assert_eq!(store.checkpoint(0).unwrap().unwrap().dedup_generation_starts, [2000, 3000]);
}
