//! Two engines on one PostgreSQL database: the one that starts second claims every
//! partition, and the first, still running, can no longer flush. The second starts on a
//! copy of the first's data directory, as a standby would after taking over its disk
//! (with the local log, the database's checkpoints point into that log). Its refused flush lands
//! nothing, and it stops acknowledging (what it acknowledged since its last flush is in
//! its own log, for its own restart); the new owner goes on from the stored checkpoints.

mod common;

use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, EngineError, MinuteRange};

const NOW_MS: i64 = 1_800_000_000_000;
const ALL: MinuteRange = MinuteRange { start: 0, end: NOW_MS / 60_000 + 1 };

fn open(dir: &std::path::Path, database: &str) -> Engine {
    let config = EngineConfig {
        data_dir: dir.into(),
        partitions: 2,
        flush_interval_ms: 3_600_000,
        clock: Clock::fixed(NOW_MS),
        ..EngineConfig::default()
    };
    common::open(config, Some(database))
}

/// `from`'s files and directories into `to`, but the lock.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn views(engine: &Engine, n: usize) -> Result<u32, EngineError> {
    let event =
        EventRef { video_id: "v", event_type: "view", ts_ms: NOW_MS, value: 0, event_id: None, viewer_id: None };
    engine.submit(&vec![event; n], None, NOW_MS)?.outcome_blocking().map(|outcome| outcome.accepted)
}

fn count(engine: &Engine) -> u64 {
    engine.count("view", "v", ALL).unwrap().count
}

#[test]
fn a_second_engine_on_the_database_fences_the_first() {
    let server = tally_pgtest::Postgres::start();
    let database = server.create_database();
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = open(first_dir.path(), &database);
    assert_eq!(views(&first, 10).unwrap(), 10);
    first.flush().unwrap();

    copy_dir(first_dir.path(), second_dir.path());
    let second = open(second_dir.path(), &database);
    assert_eq!(count(&second), 10, "the new owner reads what the first flushed");
    assert_eq!(views(&first, 5).unwrap(), 5, "the first still logs until it tries to flush");
    // Refused: the engine fails (the log says why: "another engine owns it now").
    assert!(matches!(first.flush(), Err(EngineError::Unavailable { .. })));
    assert!(!first.is_healthy());
    assert!(matches!(views(&first, 1), Err(EngineError::Unavailable { .. })), "a fenced engine stops acknowledging");
    assert_eq!(count(&second), 10, "nothing of the refused flush landed");

    assert_eq!(views(&second, 3).unwrap(), 3);
    second.flush().unwrap();
    drop(second);
    let reopened = open(second_dir.path(), &database);
    assert_eq!(count(&reopened), 13);
}
