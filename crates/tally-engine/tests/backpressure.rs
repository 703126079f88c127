//! Back-pressure: while a partition's writer waits for the flusher (its deltas are at
//! `pending_cells_max` and the flusher is still writing an earlier batch), new requests
//! for that partition are refused at once and count nothing, instead of queueing behind
//! the flush; requests admitted before are counted once the flusher catches up.

use std::time::{Duration, Instant};

use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, EngineError, MinuteRange};

/// The engine's clock, fixed: retention is measured from here, whatever the wall clock says.
const NOW_MS: i64 = 1_800_000_000_000;

fn submit_videos(engine: &Engine, videos: &[String]) -> Result<tally_engine::Submitted, EngineError> {
    let events: Vec<EventRef<'_>> = videos
        .iter()
        .map(|video_id| EventRef {
            video_id,
            event_type: "view",
            ts_ms: NOW_MS,
            value: 0,
            event_id: None,
            viewer_id: None,
        })
        .collect();
    engine.submit(&events, None, NOW_MS)
}

fn videos(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|v| format!("{prefix}-{v}")).collect()
}

#[test]
fn a_partition_waiting_for_the_flusher_refuses_new_requests_and_counts_nothing_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig {
        data_dir: dir.path().into(),
        partitions: 1,
        pending_cells_max: 1000,
        flush_interval_ms: 3_600_000,
        clock: Clock::fixed(NOW_MS),
        ..EngineConfig::default()
    })
    .unwrap();
    // A large batch, then a request that makes the flusher take it: the flusher is busy
    // writing it for a while.
    submit_videos(&engine, &videos("backlog", 100_000)).unwrap().outcome_blocking().unwrap();
    submit_videos(&engine, &videos("first", 1)).unwrap().outcome_blocking().unwrap();
    // Past the limit again while that flush runs; the next request makes the writer wait.
    submit_videos(&engine, &videos("more", 2_000)).unwrap().outcome_blocking().unwrap();
    let waiting = submit_videos(&engine, &videos("waiting", 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admitted = Vec::new();
    let refused = loop {
        match submit_videos(&engine, &videos("late", 1)) {
            Err(error @ EngineError::Overloaded { .. }) => break error,
            Ok(submitted) => admitted.push(submitted), // before the writer began to wait
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(Instant::now() < deadline, "the writer never waited for the flusher");
        std::thread::sleep(Duration::from_micros(200));
    };
    assert!(refused.to_string().contains("backlog"), "{refused}");
    waiting.outcome_blocking().unwrap();
    let admitted: u64 = admitted.into_iter().map(|s| u64::from(s.outcome_blocking().unwrap().accepted)).sum();
    let all = MinuteRange { start: 0, end: NOW_MS / 60_000 + 1 };
    let count = |video: &str| engine.count("view", video, all).unwrap().count;
    assert_eq!((count("waiting-0"), count("first-0"), count("more-1999")), (1, 1, 1));
    assert_eq!(count("late-0"), admitted, "refused requests count nothing");
}
