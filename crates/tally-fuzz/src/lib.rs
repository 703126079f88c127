//! Fuzz targets: every decoder that reads bytes tally did not just write itself. Each
//! target must return (never panic, never loop, never allocate without bound) whatever the
//! bytes, and checks what it can of the result (round trips, limits).
//!
//! Two drivers run them: `tests/fuzz.rs` (the committed corpus, mutations of it, and
//! arbitrary bytes; part of `cargo test`, and for as long as you like with
//! `TALLY_FUZZ_ITERATIONS`), and the coverage-guided libFuzzer targets in `fuzz/` at the
//! repository root (`cargo +nightly fuzz run <target>`). See the README, "Fuzzing".

use tally_core::RecordReader;
use tally_core::hll::Hll;
use tally_core::topk::TopSketch;

/// A target: its name (also its corpus folder under `fuzz/corpus/`) and its function.
pub type Target = (&'static str, fn(&[u8]));

pub const TARGETS: [Target; 6] = [
    ("json_body", json_body),
    ("ndjson_body", ndjson_body),
    ("wal_segment", wal_segment),
    ("record", record),
    ("store_values", store_values),
    ("sketches", sketches),
];

/// A `POST /v1/events` JSON body.
pub fn json_body(bytes: &[u8]) {
    let _ = tally_server::fuzz_ingest_body(false, bytes);
}

/// A `POST /v1/events` NDJSON body.
pub fn ndjson_body(bytes: &[u8]) {
    let _ = tally_server::fuzz_ingest_body(true, bytes);
}

/// A log segment file, read as recovery reads it.
pub fn wal_segment(bytes: &[u8]) {
    tally_wal::fuzz_segment(bytes);
}

/// One log record.
pub fn record(bytes: &[u8]) {
    if let Ok(reader) = RecordReader::new(bytes) {
        let mut seen = 0u64;
        let complete = reader.for_each_event(|_| seen += 1).is_ok();
        assert!(seen <= u64::from(reader.event_count));
        assert!(!complete || seen == u64::from(reader.event_count));
    }
}

/// Stored counters, checkpoints, type rows and table names.
pub fn store_values(bytes: &[u8]) {
    tally_store::fuzz_values(bytes);
}

/// Distinct-viewer and top-items sketches as stored.
pub fn sketches(bytes: &[u8]) {
    if let Ok(mut hll) = Hll::decode(bytes) {
        assert!(hll.estimate().is_finite() && hll.estimate() >= 0.0);
        let encoded = hll.encode();
        assert_eq!(Hll::decode(&encoded).map(|mut h| h.encode()), Ok(encoded), "HLL round trip");
    }
    if let Ok(top) = TopSketch::decode(bytes) {
        let encoded = top.encode();
        assert_eq!(TopSketch::decode(&encoded).map(|t| t.encode()), Ok(encoded), "top sketch round trip");
    }
    let mut merged = TopSketch::default();
    let _ = merged.merge_encoded(bytes);
}
