//! Recovery reproduces the live state exactly: the same requests, with receive times that
//! cross many dedup generations, give the same outcomes and the same counts whether the
//! engine runs straight through or is flushed, cleanly restarted and crashed (halted
//! without a flush, so the log is replayed) at random points in between. Distinct-viewer
//! sketches must come out identical too.

mod common;

use proptest::prelude::*;
use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, EngineError, IdempotencyKey, MinuteRange, Outcome};

const VIDEOS: [&str; 3] = ["a", "b", "c"];
/// A short window, so that generations open and expire within a test case.
const WINDOW_MS: i64 = 4_000;
const START_MS: i64 = 1_800_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Submit { advance_ms: i64, events: Vec<(usize, Option<u8>)>, key: Option<u8> },
    Flush,
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..2_500i64, proptest::collection::vec((0..VIDEOS.len(), proptest::option::of(0u8..5)), 0..6), proptest::option::of(0u8..3))
            .prop_map(|(advance_ms, events, key)| Op::Submit { advance_ms, events, key }),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

fn open(dir: &std::path::Path, database: Option<&str>) -> Engine {
    let config = EngineConfig {
        data_dir: dir.into(),
        partitions: 2,
        flush_interval_ms: 3_600_000,
        dedup_window_ms: WINDOW_MS,
        segment_bytes_max: 1024,
        clock: Clock::fixed(START_MS),
        ..EngineConfig::default()
    };
    common::open(config, database)
}

/// Runs the ops; `disturb` decides whether flushes, restarts and crashes happen. The
/// aggregates go to `database` when given.
fn run(ops: &[Op], disturb: bool, database: Option<&str>) -> (Vec<Option<Outcome>>, Vec<u64>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path(), database);
    let mut now = START_MS;
    let mut outcomes = Vec::new();
    for op in ops {
        match op {
            Op::Submit { advance_ms, events, key } => {
                now += advance_ms;
                let ids: Vec<String> =
                    events.iter().map(|(_, id)| id.map(|i| format!("e{i}")).unwrap_or_default()).collect();
                let refs: Vec<EventRef<'_>> = events
                    .iter()
                    .zip(&ids)
                    .map(|((video, id), text)| EventRef {
                        video_id: VIDEOS[*video],
                        event_type: "view",
                        ts_ms: now,
                        value: 1,
                        event_id: id.map(|_| text.as_str()),
                        viewer_id: Some(if id.is_some() { text.as_str() } else { "anonymous" }),
                    })
                    .collect();
                let key_text = key.map(|k| format!("k{k}"));
                let fingerprint = {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    events.hash(&mut h);
                    h.finish()
                };
                let idempotency_key = key_text.as_deref().map(|key| IdempotencyKey { key, fingerprint });
                outcomes.push(match engine.submit(&refs, idempotency_key, now).and_then(|s| s.outcome_blocking()) {
                    Ok(outcome) => Some(outcome),
                    Err(EngineError::IdempotencyConflict) => None,
                    Err(other) => panic!("{other}"),
                });
            }
            Op::Flush if disturb => engine.flush().unwrap(),
            Op::Restart if disturb => {
                drop(engine);
                engine = open(dir.path(), database);
            }
            Op::Crash if disturb => {
                engine.halt();
                drop(engine);
                engine = open(dir.path(), database);
            }
            _ => {}
        }
    }
    let all = MinuteRange { start: 0, end: now / 60_000 + 1 };
    let counts = VIDEOS.iter().map(|v| engine.count("view", v, all).unwrap().count).collect();
    let uniques = VIDEOS.iter().map(|v| engine.uniques("view", v, all).unwrap().estimate().to_bits()).collect();
    (outcomes, counts, uniques)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn restarts_and_crashes_change_no_outcome_and_no_count(ops in ops()) {
        let straight = run(&ops, false, None);
        let disturbed = run(&ops, true, None);
        prop_assert_eq!(straight, disturbed);
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..60)
}

/// The same over the PostgreSQL store (the undisturbed run stays on the embedded one):
/// one server, a fresh database per case.
#[test]
fn restarts_and_crashes_on_postgresql_change_no_outcome_and_no_count() {
    common::on_postgresql(32, ops(), |ops, database| {
        let straight = run(&ops, false, None);
        let disturbed = run(&ops, true, Some(database));
        prop_assert_eq!(straight, disturbed);
        Ok(())
    });
}
