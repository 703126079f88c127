//! Runs every fuzz target over the committed corpus (`fuzz/corpus/<target>/`), over
//! mutations of it (bit flips, byte changes, cuts, insertions, splices of two seeds), and
//! over arbitrary bytes. A short run is part of `cargo test`; a long one:
//!
//! ```text
//! TALLY_FUZZ_ITERATIONS=10000000 cargo test --release -p tally-fuzz
//! ```
//!
//! Besides the committed corpus (grown and minimized by libFuzzer), every run starts from
//! seeds made by tally's own writers (`seeds`), so mutations always start from inputs valid
//! in today's formats.

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
        let made = seeds(name);
        assert!(!made.is_empty(), "no seeds for {name}");
        let mut seeds = corpus(name);
        assert!(!seeds.is_empty(), "no committed corpus for {name}");
        seeds.extend(made);
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

/// Inputs tally itself accepts or writes, for `target`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let texts = |texts: &[&str]| texts.iter().map(|t| t.as_bytes().to_vec()).collect();
    match target {
        "json_body" => texts(&[
            r#"{"video_id":"v1"}"#,
            r#"[{"video_id":"v1","type":"view","ts":"2026-12-01T06:00:00Z","value":3},{"video_id":"v2"}]"#,
            r#"[{"video_id":"caf\u00e9","type":"like","ts":1800000000000,"value":-5,"event_id":"e-1","viewer_id":"u"}]"#,
            r#"[{"video_id":"","value":"x","bad":1},{"type":"BAD","ts":true},{"video_id":"a","video_id":"b"}]"#,
            "[]",
        ]),
        "ndjson_body" => texts(&[
            "{\"video_id\":\"v1\"}\n{\"video_id\":\"v2\",\"type\":\"share\"}\n",
            "{\"video_id\":\"v1\",\"value\":7}\r\n\r\n{\"video_id\":\"v3\",\"event_id\":\"x\"}",
            "{\"video_id\":1}\nnot json\n",
        ]),
        "record" => records().to_vec(),
        "wal_segment" => segments(),
        "store_values" => store_values(),
        "sketches" => sketches(),
        other => panic!("no seeds for target {other}"),
    }
}

fn records() -> [Vec<u8>; 2] {
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
}

/// The first and the last segment of a small log of several segments.
fn segments() -> Vec<Vec<u8>> {
    let records = records();
    let dir = tempfile::tempdir().unwrap();
    let options = tally_wal::WalOptions { segment_bytes_max: 1024, ..tally_wal::WalOptions::default() };
    tally_wal::Wal::create(dir.path(), options).unwrap();
    let mut wal = tally_wal::Wal::open(dir.path(), options, 0, |_, _| Ok::<(), ()>(())).unwrap().unwrap();
    for _ in 0..12 {
        wal.append(&[&records[0], &records[1]]).unwrap();
    }
    drop(wal);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    assert!(paths.len() > 1, "{paths:?}");
    [paths.first(), paths.last()].into_iter().map(|path| std::fs::read(path.unwrap()).unwrap()).collect()
}

/// A counter, a checkpoint, a table name and a type's last day, as stored.
fn store_values() -> Vec<Vec<u8>> {
    let mut counter = 5u64.to_le_bytes().to_vec();
    counter.extend_from_slice(&(-12i128).to_le_bytes());
    let mut checkpoint = 4096u64.to_le_bytes().to_vec();
    checkpoint.extend_from_slice(&2u32.to_le_bytes());
    checkpoint.extend_from_slice(&1_800_000_000_000i64.to_le_bytes());
    checkpoint.extend_from_slice(&1_800_000_150_000i64.to_le_bytes());
    vec![counter, checkpoint, b"counters.hour.681".to_vec(), 29_000_000i64.to_le_bytes().to_vec()]
}

/// Sparse and dense distinct-viewer sketches, and a top-items sketch.
fn sketches() -> Vec<Vec<u8>> {
    let mut sparse = tally_core::hll::Hll::default();
    let mut dense = tally_core::hll::Hll::default();
    for i in 0..20_000u32 {
        if i < 50 {
            sparse.insert(&i.to_le_bytes());
        }
        dense.insert(&i.to_le_bytes());
    }
    let mut top = tally_core::topk::TopSketch::default();
    for (i, video) in ["a", "bb", "ccc", "a", "a", "bb"].iter().enumerate() {
        top.add(video.as_bytes(), i as u64 + 1);
    }
    vec![sparse.encode(), dense.encode(), top.encode()]
}
