//! A full or failing disk, simulated with failpoints in the log and under the store.
//! Log writes that need a new segment are refused with `DiskFull` and count nothing; the
//! rest of the engine goes on (queries, the flusher), and writes resume by themselves once
//! there is room. Store writes that fail are retried until they succeed, and the engine
//! keeps acknowledging meanwhile. A failed fsync of the log or the store, by contrast,
//! stops acknowledging writes until a restart, which recovers every acknowledged event.

use std::time::{Duration, Instant};

use tally_core::EventRef;
use tally_engine::{Clock, Engine, EngineConfig, EngineError, MinuteRange};

const NOW_MS: i64 = 1_800_000_000_000;

fn submit(engine: &Engine, video_id: &str, n: usize) -> Result<u64, EngineError> {
    let event = EventRef { video_id, event_type: "view", ts_ms: NOW_MS, value: 0, event_id: None, viewer_id: None };
    let events = vec![event; n];
    engine.submit(&events, None, NOW_MS)?.outcome_blocking().map(|outcome| outcome.accepted as u64)
}

fn count(engine: &Engine) -> u64 {
    let day_ms = 86_400_000;
    engine.count("view", "v", MinuteRange::covering(NOW_MS - day_ms, NOW_MS + day_ms)).unwrap().count
}

/// Stops `engine`, ends the failpoints, opens the data directory again and counts.
fn count_after_restart(engine: Engine, scenario: fail::FailScenario<'_>, dir: &std::path::Path) -> u64 {
    drop(engine);
    scenario.teardown();
    count(&Engine::open(config(dir)).unwrap())
}

fn config(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        data_dir: dir.into(),
        partitions: 1,
        segment_bytes_max: 16 << 10,
        flush_interval_ms: 20,
        disk_free_bytes_min: 1 << 20,
        clock: Clock::fixed(NOW_MS),
        ..EngineConfig::default()
    }
}

#[test]
fn a_full_disk_refuses_writes_and_they_resume_once_space_is_freed() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    let mut acknowledged = submit(&engine, "v", 10).unwrap();
    fail::cfg("wal::free_bytes", "return(1000)").unwrap();
    let refused = loop {
        match submit(&engine, "v", 50) {
            Ok(accepted) => acknowledged += accepted,
            Err(error) => break error,
        }
        assert!(acknowledged < 10_000, "the segment never filled");
    };
    let EngineError::DiskFull { reason } = &refused else { panic!("expected DiskFull, got {refused}") };
    assert!(reason.contains("1000 bytes free") && !reason.contains('/'), "{reason}");
    assert!(matches!(submit(&engine, "v", 1), Err(EngineError::DiskFull { .. })), "refused at admission too");
    assert_eq!(count(&engine), acknowledged, "reads go on, and a refused write counted nothing");
    assert!(engine.is_healthy(), "a full disk is not a failure");
    fail::remove("wal::free_bytes");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match submit(&engine, "v", 50) {
            Ok(accepted) => {
                acknowledged += accepted;
                break;
            }
            Err(EngineError::DiskFull { .. }) => assert!(Instant::now() < deadline, "writes never resumed"),
            Err(other) => panic!("{other}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(&engine), acknowledged);
    assert_eq!(count_after_restart(engine, scenario, dir.path()), acknowledged, "every acknowledged event survives");
}

#[test]
fn a_failed_fsync_stops_acknowledging_and_a_restart_recovers_what_was() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    let acknowledged = submit(&engine, "v", 10).unwrap();
    fail::cfg("wal::sync", "return").unwrap();
    assert!(matches!(submit(&engine, "v", 5), Err(EngineError::OutcomeUnknown { .. })));
    fail::remove("wal::sync");
    let refused = submit(&engine, "v", 5).unwrap_err();
    let EngineError::Unavailable { reason } = &refused else { panic!("expected Unavailable, got {refused}") };
    assert!(reason.contains("restart") && !reason.contains('/'), "no file names for clients: {reason}");
    assert!(!engine.is_healthy());
    let recovered = count_after_restart(engine, scenario, dir.path());
    // The frame whose fsync failed was written: it may or may not have reached the disk.
    assert!(recovered == acknowledged || recovered == acknowledged + 5, "{recovered}");
}

/// Submits `n` events to each of `videos` distinct videos until the writers refuse;
/// returns what was acknowledged and the refusal.
fn submit_until_refused(engine: &Engine, videos: usize) -> (u64, EngineError) {
    let mut acknowledged = 0;
    for round in 0.. {
        for video in 0..videos {
            match submit(engine, &format!("r{round}v{video}"), 1) {
                Ok(accepted) => acknowledged += accepted,
                Err(error) => return (acknowledged, error),
            }
        }
        assert!(round < 1_000, "writes were never refused");
    }
    unreachable!()
}

fn total(engine: &Engine) -> Result<u64, EngineError> {
    let day_ms = 86_400_000;
    let range = MinuteRange::covering(NOW_MS - day_ms, NOW_MS + day_ms);
    Ok(engine.top("view", range, 1_000_000, true)?.items.iter().map(|item| item.count).sum())
}

/// Waits until store writes succeed again and a flush has emptied memory.
fn wait_until_flushed(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.stats().store_failing || engine.stats().partitions.iter().any(|p| p.pending_cells > 0) {
        assert!(Instant::now() < deadline, "store writes never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The store's disk fills under redb itself (every write to the store file fails, reopening
/// included): flushes fail and are retried, acknowledged events stay counted, writers that
/// must wait for the flusher answer "disk full", and once space is freed everything heals
/// without a restart, counting nothing twice.
#[test]
fn a_store_on_a_full_disk_heals_once_space_is_freed() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig { pending_cells_max: 200, ..config(dir.path()) }).unwrap();
    let mut acknowledged = submit(&engine, "v", 10).unwrap();
    engine.flush().unwrap();
    fail::cfg("store::write", "return").unwrap();
    let (accepted, refused) = submit_until_refused(&engine, 50);
    acknowledged += accepted;
    let EngineError::DiskFull { reason } = &refused else { panic!("expected DiskFull, got {refused}") };
    assert!(reason.contains("store's disk is full"), "{reason}");
    assert!(engine.is_healthy() && engine.stats().store_failing, "a full disk is not a failure");
    assert!(matches!(engine.flush(), Err(EngineError::DiskFull { .. })));
    fail::remove("store::write");
    // And one read fails on the way back (the checkpoint read before the retry, or the
    // reopening): that too is retried.
    fail::cfg("store::read", "1*return(eio)").unwrap();
    wait_until_flushed(&engine);
    assert_eq!(total(&engine).unwrap(), acknowledged, "every acknowledged event, once");
    acknowledged += submit(&engine, "v", 5).unwrap();
    engine.flush().unwrap();
    assert_eq!(total(&engine).unwrap(), acknowledged);
    drop(engine);
    scenario.teardown();
    assert_eq!(total(&Engine::open(config(dir.path())).unwrap()).unwrap(), acknowledged, "and after a restart");
}

/// A store sync that fails, at each of the first syncs flushes make: after it the page
/// cache may hold pages the disk never got, so the engine stops acknowledging (as after a
/// failed log fsync) and never reopens the store; each restart recovers every
/// acknowledged event exactly once, whether or not the failed commit reached the file.
#[test]
fn a_failed_store_sync_stops_acknowledging_and_a_restart_counts_everything_once() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    // Only this test's flushes meet the failpoint: the flusher's own interval is long.
    let config = EngineConfig { flush_interval_ms: 3_600_000, ..config(dir.path()) };
    let mut acknowledged = 0;
    for syncs_before in 0..4 {
        let engine = Engine::open(config.clone()).unwrap();
        assert_eq!(total(&engine).unwrap(), acknowledged, "after the restart before {syncs_before}");
        let failing = format!("{syncs_before}*off->1*return(eio)");
        fail::cfg("store::sync", &failing).unwrap();
        let mut flushes = 0;
        loop {
            acknowledged += submit(&engine, &format!("s{syncs_before}-{flushes}"), 7).unwrap();
            if engine.flush().is_err() {
                break;
            }
            flushes += 1;
            assert!(flushes < 10, "no flush met the failing sync ({failing})");
        }
        fail::remove("store::sync");
        assert!(!engine.is_healthy(), "after {failing}");
        assert!(matches!(submit(&engine, "late", 1), Err(EngineError::Unavailable { .. })));
        assert!(engine.flush().is_err(), "the store is not reopened after a failed sync");
    }
    scenario.teardown();
    assert_eq!(total(&Engine::open(config).unwrap()).unwrap(), acknowledged);
}

/// Queries go on while the store fails: from the store reopened, plus memory.
#[test]
fn queries_answer_while_store_commits_fail() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(config(dir.path())).unwrap();
    let mut acknowledged = submit(&engine, "v", 10).unwrap();
    engine.flush().unwrap();
    fail::cfg("store::commit", "return").unwrap();
    acknowledged += submit(&engine, "v", 5).unwrap();
    assert!(matches!(engine.flush(), Err(EngineError::DiskFull { .. })));
    assert!(engine.is_healthy() && engine.stats().store_failing);
    acknowledged += submit(&engine, "v", 3).unwrap();
    assert_eq!(count(&engine), acknowledged, "stored, flushing and pending, each once");
    fail::remove("store::commit");
    wait_until_flushed(&engine);
    assert_eq!(count(&engine), acknowledged);
    assert_eq!(count_after_restart(engine, scenario, dir.path()), acknowledged);
}
