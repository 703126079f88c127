//! Top-K when the sketches cannot decide: a flat distribution over more videos than a
//! minute sketch keeps. The answer must say it is approximate and bound what it left out;
//! `exact` must still find the true top.

use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, MinuteRange};

const MINUTE: i64 = 29_000_000;

#[test]
fn a_flat_distribution_is_answered_approximately_with_true_bounds_and_exactly_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig {
        data_dir: dir.path().into(),
        flush_interval_ms: 3_600_000,
        clock: Clock::fixed(MINUTE * 60_000),
        ..EngineConfig::default()
    })
    .unwrap();
    // 5,000 videos with one event each, and video "w" with two: a minute sketch keeps
    // 1,024 items, so after the flush no count survives pruning.
    let ids: Vec<String> = (0..5_000).map(|i| format!("video-{i:05}")).collect();
    let mut events: Vec<EventRef<'_>> = ids
        .iter()
        .map(|id| EventRef {
            video_id: id,
            event_type: "view",
            ts_ms: MINUTE * 60_000,
            value: 0,
            event_id: None,
            viewer_id: None,
        })
        .collect();
    let w = EventRef { video_id: "w", ..events[0] };
    events.extend([w, w]);
    engine.submit(&events, None, MINUTE * 60_000).unwrap().outcome_blocking().unwrap();
    engine.flush().unwrap();
    let range = MinuteRange { start: MINUTE, end: MINUTE + 1 };

    let approximate = engine.top("view", range, 10, false).unwrap();
    assert!(!approximate.exact);
    for item in &approximate.items {
        let truth = engine.count("view", &item.video_id, range).unwrap().count;
        assert!(item.count <= truth && truth <= item.count + item.error, "{item:?} true {truth}");
    }
    let listed: Vec<&str> = approximate.items.iter().map(|i| i.video_id.as_str()).collect();
    for id in ids.iter().map(String::as_str).chain(["w"]).filter(|id| !listed.contains(id)) {
        let truth = engine.count("view", id, range).unwrap().count;
        assert!(truth <= approximate.unlisted_max, "{id} has {truth} > {}", approximate.unlisted_max);
    }

    let exact = engine.top("view", range, 3, true).unwrap();
    assert!(exact.exact);
    let items: Vec<(&str, u64)> = exact.items.iter().map(|i| (i.video_id.as_str(), i.count)).collect();
    assert_eq!(items, [("w", 2), ("video-00000", 1), ("video-00001", 1)]);
}
