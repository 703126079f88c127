//! Idempotency keys under concurrency: requests racing with one key and different bodies
//! are seen in one order by every partition, so exactly one body is counted and every
//! other request is refused whole.

use std::sync::Arc;

use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, EngineError, IdempotencyKey, MinuteRange};

/// The engine's clock, fixed: retention is measured from here, whatever the wall clock says.
const RECEIVE_MS: i64 = 1_800_000_000_000;

#[test]
fn racing_reuse_of_a_key_counts_exactly_one_body() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(
        Engine::open(EngineConfig {
            data_dir: dir.path().into(),
            partitions: 4,
            clock: Clock::fixed(RECEIVE_MS),
            ..EngineConfig::default()
        })
        .unwrap(),
    );
    for round in 0..20 {
        let key = format!("key-{round}");
        let threads: Vec<_> = (0..8u64)
            .map(|body| {
                let (engine, key) = (Arc::clone(&engine), key.clone());
                std::thread::spawn(move || {
                    // Each body spreads over many videos, so it touches every partition.
                    let videos: Vec<String> = (0..32).map(|v| format!("r{round}-b{body}-v{v}")).collect();
                    let events: Vec<EventRef<'_>> = videos
                        .iter()
                        .map(|video_id| EventRef {
                            video_id,
                            event_type: "view",
                            ts_ms: RECEIVE_MS,
                            value: 0,
                            event_id: None,
                            viewer_id: None,
                        })
                        .collect();
                    let submitted =
                        engine.submit(&events, Some(IdempotencyKey { key: &key, fingerprint: body }), RECEIVE_MS);
                    (body, submitted.and_then(|s| s.outcome_blocking()))
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<u64> = results.iter().filter(|(_, r)| r.is_ok()).map(|(b, _)| *b).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(|(_, r)| matches!(r, Ok(_) | Err(EngineError::IdempotencyConflict))), "{results:?}");
        let all = MinuteRange { start: 0, end: RECEIVE_MS / 60_000 + 1 };
        for body in 0..8u64 {
            let counted: u64 =
                (0..32).map(|v| engine.count("view", &format!("r{round}-b{body}-v{v}"), all).unwrap().count).sum();
            assert_eq!(counted, if body == winners[0] { 32 } else { 0 }, "round {round} body {body}");
        }
    }
}
