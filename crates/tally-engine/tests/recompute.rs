//! Recompute: a store the speed layer got wrong (counts added twice, a video that never
//! had an event) is rewritten from the archive, in every tier, counters, distinct viewers
//! and top items, while the engine keeps counting.

use std::sync::Arc;

use tally_aggregate::{Deltas, rollup};
use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, MinuteRange, RecomputeRange, Retention};
use tally_store::{CounterStore, PoolOptions, PostgresStore};

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 24 * 60 * MINUTE_MS;
/// 10:00 on a day, UTC.
const NOW_MS: i64 = 20_000 * DAY_MS + 10 * 60 * MINUTE_MS;

fn event<'a>(
    video_id: &'a str,
    event_type: &'a str,
    ts_ms: i64,
    value: i64,
    viewer_id: Option<&'a str>,
) -> EventRef<'a> {
    EventRef { video_id, event_type, ts_ms, value, event_id: None, viewer_id }
}

fn range(from_ms: i64, to_ms: i64) -> RecomputeRange {
    RecomputeRange { from_ms, to_ms, lateness_max_ms: 7 * DAY_MS, clock_skew_max_ms: 5 * MINUTE_MS }
}

/// The minutes of the whole day, and of one minute of it.
fn day() -> MinuteRange {
    MinuteRange { start: (NOW_MS / DAY_MS) * DAY_MS / MINUTE_MS, end: (NOW_MS / DAY_MS + 1) * DAY_MS / MINUTE_MS }
}

#[test]
fn a_damaged_store_is_rewritten_from_the_archive_in_every_tier() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (store, log) = tally_engine::local::open(&config).unwrap();
    rewrites_a_damaged_store(Engine::start(config, Arc::clone(&store), Box::new(log)).unwrap(), &*store);
}

#[test]
fn a_damaged_postgresql_store_is_rewritten_from_the_archive_in_every_tier() {
    let server = tally_pgtest::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let options = PoolOptions { connections_max: 4, ..PoolOptions::default() };
    let store: Arc<dyn CounterStore> = Arc::new(PostgresStore::open(&server.create_database(), options).unwrap());
    let log = tally_engine::local::open_log(&config, &*store).unwrap();
    rewrites_a_damaged_store(Engine::start(config, Arc::clone(&store), Box::new(log)).unwrap(), &*store);
}

fn config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.join("data"),
        flush_interval_ms: 3_600_000,
        archive: Some(dir.join("archive").display().to_string()),
        clock: Clock::fixed(NOW_MS),
        ..EngineConfig::default()
    }
}

fn rewrites_a_damaged_store(engine: Engine, store: &dyn CounterStore) {
    let an_hour_ago = NOW_MS - 60 * MINUTE_MS;
    let mut events: Vec<EventRef<'_>> =
        ["v1", "v2", "v3", "v1", "v2"].iter().map(|viewer| event("a", "view", an_hour_ago, 1, Some(viewer))).collect();
    events.extend([event("b", "view", an_hour_ago + MINUTE_MS, 1, None), event("b", "like", an_hour_ago, 7, None)]);
    engine.submit(&events, None, NOW_MS).unwrap().outcome_blocking().unwrap();
    engine.flush().unwrap();

    // The speed layer's damage: video a counted three times more, a video never seen.
    let mut damage = Deltas::default();
    for _ in 0..3 {
        damage.add("view", "a", an_hour_ago / MINUTE_MS, 1, Some("intruder"));
    }
    damage.add("view", "ghost", an_hour_ago / MINUTE_MS, 4, None);
    let cutoffs = Retention::default().cutoffs(NOW_MS / MINUTE_MS);
    store.commit(&[], &mut |granularity| rollup(&[&damage], &cutoffs, granularity)).unwrap();
    let count = |video: &str, event_type: &str| engine.count(event_type, video, day()).unwrap().count;
    assert_eq!((count("a", "view"), count("ghost", "view")), (8, 1), "the damage is visible");

    let report = engine.recompute(range(an_hour_ago, an_hour_ago + 1)).unwrap();
    assert_eq!((report.from_ms, report.to_ms), ((NOW_MS / DAY_MS) * DAY_MS, (NOW_MS / DAY_MS + 1) * DAY_MS));
    assert_eq!(report.events, 7);
    // a and ghost, in the minute, hour and day tiers.
    assert_eq!(report.counters_corrected, 6, "{report:?}");
    assert_eq!((count("a", "view"), count("ghost", "view")), (5, 0));
    assert_eq!((count("b", "view"), count("b", "like")), (1, 1));
    assert_eq!(engine.count("like", "b", day()).unwrap().sum, 7);
    let minute = MinuteRange { start: an_hour_ago / MINUTE_MS, end: an_hour_ago / MINUTE_MS + 1 };
    assert_eq!(engine.count("view", "a", minute).unwrap().count, 5, "the minute tier too");
    let viewers = engine.uniques("view", "a", day()).unwrap().estimate().round();
    assert_eq!(viewers, 3.0, "the intruder's sketch is gone");
    let top = engine.top("view", day(), 5, false).unwrap();
    let items: Vec<(&str, u64)> = top.items.iter().map(|i| (i.video_id.as_str(), i.count)).collect();
    assert_eq!(items, [("a", 5), ("b", 1)], "no ghost among the top items");

    // Counting goes on; a second recompute finds nothing to correct.
    engine.submit(&[event("a", "view", NOW_MS, 1, Some("v4"))], None, NOW_MS).unwrap().outcome_blocking().unwrap();
    let again = engine.recompute(range(NOW_MS - 1, NOW_MS)).unwrap();
    assert_eq!(again.counters_corrected, 0, "{again:?}");
    assert_eq!(count("a", "view"), 6, "the event not flushed yet counts once");
    engine.flush().unwrap();
    assert_eq!(count("a", "view"), 6);
}

#[test]
fn recompute_is_refused_without_an_archive_or_when_the_archive_began_later() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        EngineConfig { data_dir: dir.path().join("data"), clock: Clock::fixed(NOW_MS), ..EngineConfig::default() };
    let engine = Engine::open(config.clone()).unwrap();
    engine.submit(&[event("a", "view", NOW_MS, 1, None)], None, NOW_MS).unwrap().outcome_blocking().unwrap();
    let refused = engine.recompute(range(NOW_MS - 1, NOW_MS)).unwrap_err().to_string();
    assert!(refused.contains("no archive is configured"), "{refused}");
    drop(engine);

    // Archiving begins a day later, behind a checkpoint that has moved: yesterday's
    // events are not in the archive, so the archive cannot prove them.
    let tomorrow = NOW_MS + DAY_MS;
    let later = EngineConfig {
        archive: Some(dir.path().join("archive").display().to_string()),
        clock: Clock::fixed(tomorrow),
        ..config
    };
    let engine = Engine::open(later).unwrap();
    let refused = engine.recompute(range(NOW_MS - 1, NOW_MS)).unwrap_err().to_string();
    assert!(refused.contains("begins with"), "{refused}");
    assert_eq!(engine.count("view", "a", day()).unwrap().count, 1, "nothing was rewritten");
}
