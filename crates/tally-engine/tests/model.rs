//! The engine against a naive model: random submits, flushes, restarts and queries; every
//! count, series, top list, per-type stats and (small) distinct-viewer count must equal
//! what plain maps of the accepted events say.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use tally_core::EventRef;
use tally_engine::{
    Clock, Counter, Engine, EngineConfig, EngineError, Granularity, IdempotencyKey, MinuteRange, Outcome,
};

const VIDEOS: [&str; 4] = ["a", "b", "video-c", "d/é"];
const TYPES: [&str; 2] = ["view", "like"];
/// Three days, in minutes, so ranges cross hour and day boundaries.
const MINUTES: i64 = 3 * 24 * 60;
const RECEIVE_MS: i64 = 1_800_000_000_000;
const BASE_MINUTE: i64 = RECEIVE_MS / 60_000 - MINUTES;

#[derive(Debug, Clone)]
struct TestEvent {
    video: usize,
    event_type: usize,
    minute: i64,
    value: i64,
    event_id: Option<u8>,
    viewer: Option<u8>,
}

#[derive(Debug, Clone)]
enum Op {
    Submit { events: Vec<TestEvent>, key: Option<u8> },
    Flush,
    Restart,
    Count { video: usize, event_type: usize, start: i64, len: i64 },
    Series { video: usize, event_type: usize, granularity: usize, start: i64, len: i64 },
}

fn event() -> impl Strategy<Value = TestEvent> {
    (
        0..VIDEOS.len(),
        0..TYPES.len(),
        0..MINUTES,
        -5i64..100,
        proptest::option::of(0u8..6),
        proptest::option::of(0u8..8),
    )
        .prop_map(|(video, event_type, minute, value, event_id, viewer)| TestEvent {
            video,
            event_type,
            minute,
            value,
            event_id,
            viewer,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (proptest::collection::vec(event(), 0..12), proptest::option::of(0u8..4)).prop_map(|(events, key)| Op::Submit { events, key }),
        1 => Just(Op::Flush),
        1 => Just(Op::Restart),
        2 => (0..VIDEOS.len(), 0..TYPES.len(), -10..MINUTES, 0..MINUTES + 20)
            .prop_map(|(video, event_type, start, len)| Op::Count { video, event_type, start, len }),
        2 => (0..VIDEOS.len(), 0..TYPES.len(), 0..3usize, -10..MINUTES, 0..MINUTES)
            .prop_map(|(video, event_type, granularity, start, len)| Op::Series { video, event_type, granularity, start, len }),
    ]
}

#[derive(Default)]
struct Model {
    counters: BTreeMap<(usize, usize, i64), Counter>,
    viewers: BTreeMap<(usize, usize, i64), HashSet<u8>>,
    seen_events: HashSet<(usize, u8)>,
    seen_keys: HashMap<u8, (u64, Outcome)>,
}

fn fingerprint(events: &[TestEvent]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{events:?}").hash(&mut hasher);
    hasher.finish()
}

impl Model {
    /// `None`: the key was used before for another body.
    fn submit(&mut self, events: &[TestEvent], key: Option<u8>) -> Option<Outcome> {
        if let Some((first_fingerprint, outcome)) = key.and_then(|k| self.seen_keys.get(&k)) {
            return (*first_fingerprint == fingerprint(events)).then_some(*outcome);
        }
        let mut outcome = Outcome::default();
        for e in events {
            if let Some(id) = e.event_id
                && !self.seen_events.insert((e.video, id))
            {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            self.counters
                .entry((e.video, e.event_type, BASE_MINUTE + e.minute))
                .or_default()
                .add(Counter { count: 1, sum: i128::from(e.value) });
            if let Some(viewer) = e.viewer {
                self.viewers.entry((e.video, e.event_type, BASE_MINUTE + e.minute)).or_default().insert(viewer);
            }
        }
        if let Some(k) = key {
            self.seen_keys.insert(k, (fingerprint(events), outcome));
        }
        Some(outcome)
    }

    fn sum(&self, video: usize, event_type: usize, start: i64, end: i64) -> Counter {
        let mut total = Counter::default();
        for (_, c) in self.counters.range((video, event_type, start)..(video, event_type, end)) {
            total.add(*c);
        }
        total
    }

    fn uniques(&self, video: usize, event_type: usize, start: i64, end: i64) -> usize {
        let range = (video, event_type, start)..(video, event_type, end);
        self.viewers.range(range).flat_map(|(_, set)| set).collect::<HashSet<_>>().len()
    }

    /// The `k` videos with the most events, ties by id; videos with none left out.
    fn top(&self, event_type: usize, start: i64, end: i64, k: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = (0..VIDEOS.len())
            .map(|v| (VIDEOS[v].to_string(), self.sum(v, event_type, start, end).count))
            .filter(|(_, count)| *count > 0)
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }
}

fn open(dir: &std::path::Path, database: Option<&str>) -> Engine {
    let config = EngineConfig {
        data_dir: dir.into(),
        partitions: 3,
        segment_bytes_max: 512,
        flush_interval_ms: 3_600_000,
        clock: Clock::fixed(RECEIVE_MS),
        ..EngineConfig::default()
    };
    common::open(config, database)
}

/// Runs the ops against the engine (its aggregates in `database` when given) and the
/// model, comparing every answer.
fn run(ops: Vec<Op>, database: Option<&str>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path(), database);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Submit { events, key } => {
                let ids: Vec<String> =
                    events.iter().map(|e| e.event_id.map(|i| format!("id-{i}")).unwrap_or_default()).collect();
                let viewers: Vec<String> = events.iter().map(|e| format!("viewer-{:?}", e.viewer)).collect();
                let refs: Vec<EventRef<'_>> = events
                    .iter()
                    .zip(&ids)
                    .zip(&viewers)
                    .map(|((e, id), viewer)| EventRef {
                        video_id: VIDEOS[e.video],
                        event_type: TYPES[e.event_type],
                        ts_ms: (BASE_MINUTE + e.minute) * 60_000 + 59_999,
                        value: e.value,
                        event_id: e.event_id.map(|_| id.as_str()),
                        viewer_id: e.viewer.map(|_| viewer.as_str()),
                    })
                    .collect();
                let key_text = key.map(|k| format!("key-{k}"));
                let idempotency_key =
                    key_text.as_deref().map(|key| IdempotencyKey { key, fingerprint: fingerprint(&events) });
                let expected = model.submit(&events, key);
                match engine.submit(&refs, idempotency_key, RECEIVE_MS) {
                    Ok(submitted) => prop_assert_eq!(Some(submitted.outcome_blocking().unwrap()), expected),
                    Err(EngineError::IdempotencyConflict) => prop_assert_eq!(None, expected),
                    Err(other) => return Err(TestCaseError::fail(other.to_string())),
                }
            }
            Op::Flush => engine.flush().unwrap(),
            Op::Restart => {
                drop(engine);
                engine = open(dir.path(), database);
            }
            Op::Count { video, event_type, start, len } => {
                let range = MinuteRange { start: BASE_MINUTE + start, end: BASE_MINUTE + start + len };
                let got = engine.count(TYPES[event_type], VIDEOS[video], range).unwrap();
                prop_assert_eq!(got, model.sum(video, event_type, range.start, range.end), "count {:?}", range);
                let all = engine.counts(TYPES[event_type], &VIDEOS, range).unwrap();
                let expected: Vec<Counter> =
                    (0..VIDEOS.len()).map(|v| model.sum(v, event_type, range.start, range.end)).collect();
                prop_assert_eq!(all, expected, "counts {:?}", range);

                let uniques = engine.uniques(TYPES[event_type], VIDEOS[video], range).unwrap().estimate().round();
                prop_assert_eq!(uniques as usize, model.uniques(video, event_type, range.start, range.end));

                let expected = model.top(event_type, range.start, range.end, 2);
                for exact in [false, true] {
                    let top = engine.top(TYPES[event_type], range, 2, exact).unwrap();
                    prop_assert!(top.exact, "few videos: the sketches hold them all");
                    let got: Vec<(String, u64)> = top.items.into_iter().map(|i| (i.video_id, i.count)).collect();
                    prop_assert_eq!(&got, &expected, "top {:?} exact={}", range, exact);
                }

                let stats = engine.type_stats(VIDEOS[video], range).unwrap();
                let expected: Vec<(String, Counter)> = (0..TYPES.len())
                    .map(|t| (TYPES[t].to_string(), model.sum(video, t, range.start, range.end)))
                    .filter(|(_, c)| c.count > 0)
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect();
                prop_assert_eq!(stats, expected, "stats {:?}", range);
            }
            Op::Series { video, event_type, granularity, start, len } => {
                let granularity = Granularity::ALL[granularity];
                let size = granularity.minutes();
                let start = granularity.bucket_of(BASE_MINUTE + start);
                let end = granularity.bucket_of(start + len.min(200 * size)) + size;
                let got =
                    engine.series(TYPES[event_type], VIDEOS[video], granularity, MinuteRange { start, end }).unwrap();
                let expected: Vec<Counter> =
                    (start..end).step_by(size as usize).map(|b| model.sum(video, event_type, b, b + size)).collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_naive_model(ops in ops()) {
        run(ops, None)?;
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..40)
}

/// The same model over the PostgreSQL store: one server, a fresh database per case.
#[test]
fn engine_on_postgresql_matches_naive_model() {
    common::on_postgresql(32, ops(), |ops, database| run(ops, Some(database)));
}
