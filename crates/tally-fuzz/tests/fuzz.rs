//! Runs every fuzz target over the committed corpus (`fuzz/corpus/<target>/`), over
//! mutations of it (bit flips, byte changes, cuts, insertions, splices of two seeds), and
//! over arbitrary bytes. A short run is part of `cargo test`; a long one:
//!
//! ```text
//! TALLY_FUZZ_ITERATIONS=10000000 cargo test --release -p tally-fuzz
//! ```
//!
//! The corpus is made by `write_corpus` (ignored; run it with `--ignored` after a format
//! change) from what tally itself writes, so mutations start from valid inputs.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_fuzz::TARGETS;

/// Mutations per target in a default run.
const ITERATIONS_DEFAULT: u64 = 20_000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|file| std::fs::read(file).unwrap()).collect()
}

fn iterations() -> u64 {
    std::env::var("TALLY_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(ITERATIONS_DEFAULT)
}

/// One random change of `input`, drawing on `seeds` for splices.
fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>], rng: &mut StdRng) {
    let len = input.len();
    match rng.random_range(0..6) {
        0 if len > 0 => {
            let at = rng.random_range(0..len);
            input[at] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let at = rng.random_range(0..len);
            input[at] = [0, 0xff, b'"', b'{', b'}', b',', b'\n', b'\\', rng.random()][rng.random_range(0..9)];
        }
        2 if len > 0 => input.truncate(rng.random_range(0..len)),
        3 => {
            let at = rng.random_range(0..=len);
            let run: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
            input.splice(at..at, run);
        }
        4 if len > 1 => {
            let start = rng.random_range(0..len);
            let end = rng.random_range(start..len);
            input.drain(start..end);
        }
        _ => {
            let other = &seeds[rng.random_range(0..seeds.len())];
            let cut = rng.random_range(0..=len);
            let from = rng.random_range(0..=other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
    }
}

#[test]
fn every_target_survives_its_corpus_and_mutations_of_it() {
    let iterations = iterations();
    for (name, target) in TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "no corpus for {name}");
        for seed in &seeds {
            target(seed);
        }
        let mut rng = StdRng::seed_from_u64(name.len() as u64 * 7919 + iterations);
        for _ in 0..iterations {
            let mut input = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..5) {
                mutate(&mut input, &seeds, &mut rng);
            }
            target(&input);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_target_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for (_, target) in TARGETS {
            target(&bytes);
        }
    }
}

/// The corpus: inputs tally itself accepts or writes.
#[test]
#[ignore = "writes fuzz/corpus; run after a format change"]
fn write_corpus() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for (name, body) in [
        ("one", r#"{"video_id":"v1"}"#),
        ("array", r#"[{"video_id":"v1","type":"view","ts":"2026-12-01T06:00:00Z","value":3},{"video_id":"v2"}]"#),
        (
            "full",
            r#"[{"video_id":"caf\u00e9","type":"like","ts":1800000000000,"value":-5,"event_id":"e-1","viewer_id":"u"}]"#,
        ),
        (
            "invalid",
            r#"[{"video_id":"","value":"x","bad":1},{"type":"BAD","ts":true},{"video_id":"a","video_id":"b"}]"#,
        ),
        ("empty", "[]"),
    ] {
        write("json_body", name, body.as_bytes());
    }
    for (name, body) in [
        ("two", "{\"video_id\":\"v1\"}\n{\"video_id\":\"v2\",\"type\":\"share\"}\n"),
        ("crlf", "{\"video_id\":\"v1\",\"value\":7}\r\n\r\n{\"video_id\":\"v3\",\"event_id\":\"x\"}"),
        ("bad", "{\"video_id\":1}\nnot json\n"),
    ] {
        write("ndjson_body", name, body.as_bytes());
    }
    let records = {
        let event = |video_id| tally_core::EventRef {
            video_id,
            event_type: "view",
            ts_ms: 1_800_000_000_000,
            value: 1,
            event_id: Some("e"),
            viewer_id: Some("u"),
        };
        let key = tally_core::record::RequestKey { key: 42, fingerprint: 7 };
        let mut keyed = tally_core::RecordWriter::new(1_800_000_000_000, Some(key), 64);
        keyed.push(&event("v1"));
        keyed.push(&event("v2"));
        let mut plain = tally_core::RecordWriter::new(1_800_000_000_000, None, 64);
        plain.push(&event("v3"));
        [keyed.finish(), plain.finish()]
    };
    for (i, record) in records.iter().enumerate() {
        write("record", &format!("record-{i}"), record);
    }
    let dir = tempfile::tempdir().unwrap();
    let options = tally_wal::WalOptions { segment_bytes_max: 1024, ..tally_wal::WalOptions::default() };
    tally_wal::Wal::create(dir.path(), options).unwrap();
    let mut wal = tally_wal::Wal::open(dir.path(), options, 0, |_, _| Ok::<(), ()>(())).unwrap().unwrap();
    for _ in 0..12 {
        wal.append(&[&records[0], &records[1]]).unwrap();
    }
    drop(wal);
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    write("wal_segment", "first", &std::fs::read(&segments[0]).unwrap());
    write("wal_segment", "last", &std::fs::read(segments.last().unwrap()).unwrap());
    let mut counter = 5u64.to_le_bytes().to_vec();
    counter.extend_from_slice(&(-12i128).to_le_bytes());
    write("store_values", "counter", &counter);
    let mut checkpoint = 4096u64.to_le_bytes().to_vec();
    checkpoint.extend_from_slice(&2u32.to_le_bytes());
    checkpoint.extend_from_slice(&1_800_000_000_000i64.to_le_bytes());
    checkpoint.extend_from_slice(&1_800_000_150_000i64.to_le_bytes());
    write("store_values", "checkpoint", &checkpoint);
    write("store_values", "table-name", b"counters.hour.681");
    write("store_values", "last-day", &29_000_000i64.to_le_bytes());
    let mut sparse = tally_core::hll::Hll::default();
    let mut dense = tally_core::hll::Hll::default();
    for i in 0..20_000u32 {
        if i < 50 {
            sparse.insert(&i.to_le_bytes());
        }
        dense.insert(&i.to_le_bytes());
    }
    write("sketches", "hll-sparse", &sparse.encode());
    write("sketches", "hll-dense", &dense.encode());
    let mut top = tally_core::topk::TopSketch::default();
    for (i, video) in ["a", "bb", "ccc", "a", "a", "bb"].iter().enumerate() {
        top.add(video.as_bytes(), i as u64 + 1);
    }
    write("sketches", "top", &top.encode());
}
