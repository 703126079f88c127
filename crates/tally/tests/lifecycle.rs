//! Starting, stopping and restarting: SIGTERM makes everything durable and exits 0; a bad
//! config refuses to start; a damaged log (corrupt, cut short, deleted) refuses to start
//! and says where, unless the loss is accepted; a torn tail is dropped and the server
//! starts; a failed first start is made again.

mod common;

use std::time::Duration;

use common::{spawn, start, tally_binary};

/// The documented bound on a clean stop: drain (10 s default) plus the final flush.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn sigterm_flushes_checkpoints_and_exits_zero_and_counts_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start(&data, "flush_interval = \"1h\"");
    for _ in 0..10 {
        assert_eq!(server.post_events(r#"[{"video_id":"a"},{"video_id":"b","type":"like"}]"#, &[]).status, 200);
    }
    let status = server.terminate(STOP_TIMEOUT);
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(server.logged("everything flushed and checkpointed"), "{}", server.log());
    let server = start(&data, "flush_interval = \"1h\"");
    assert!(server.logged("replayed_bytes=0"), "a clean stop leaves nothing to replay:\n{}", server.log());
    assert_eq!(server.count("a"), 10);
    assert_eq!(server.get("/v1/count?video_id=b&type=like").json()["count"], 10);
}

/// While the log is replayed, `/readyz` and ingest say 503 "recovering"; a SIGTERM then
/// exits 0 at once, and the next start recovers every acknowledged event.
#[test]
fn a_stop_during_recovery_exits_zero_and_the_next_start_recovers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "flush_interval = \"1h\"";
    let mut server = start(&data, config);
    // About 80 MB of log, so that the replay lasts far longer than the two requests below.
    let body = serde_json::to_string(
        &(0..20_000).map(|i| serde_json::json!({"video_id": format!("v{}", i % 100)})).collect::<Vec<_>>(),
    )
    .unwrap();
    for _ in 0..100 {
        assert_eq!(server.post_events(&body, &[]).status, 200);
    }
    server.kill();
    let mut server = spawn(&data, config);
    let readyz = server.get("/readyz");
    assert_eq!((readyz.status, readyz.json()), (503, serde_json::json!({"status": "recovering"})));
    let ingest = server.post_events(r#"{"video_id":"v0"}"#, &[]);
    assert_eq!((ingest.status, ingest.header("retry-after")), (503, Some("5")), "{}", ingest.text());
    let status = server.terminate(STOP_TIMEOUT);
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(server.logged("stopped while recovering"), "{}", server.log());
    let server = start(&data, config);
    assert_eq!(server.count("v0"), 20_000);
    assert_eq!(server.count("v99"), 20_000);
}

#[test]
fn unknown_config_key_refuses_to_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "partitons = 4\n").unwrap();
    let output = std::process::Command::new(tally_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown field") && stderr.contains("partitons"), "{stderr}");
}

fn segments(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    for partition in std::fs::read_dir(data.join("wal")).unwrap() {
        for segment in std::fs::read_dir(partition.unwrap().path()).unwrap() {
            let path = segment.unwrap().path();
            if std::fs::metadata(&path).unwrap().len() > 0 {
                all.push(path);
            }
        }
    }
    all
}

#[test]
fn mid_log_corruption_refuses_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = UNFLUSHED;
    let mut server = start(&data, config);
    for i in 0..5 {
        server.post_events(&format!(r#"[{{"video_id":"v{i}"}}]"#), &[]);
    }
    server.kill();
    let segment = &segments(&data)[0];
    let mut bytes = std::fs::read(segment).unwrap();
    bytes[20] ^= 0x10; // inside the first frame's payload, with four frames after it
    std::fs::write(segment, &bytes).unwrap();

    let mut server = spawn(&data, config);
    let status = server.child.wait().unwrap();
    assert!(!status.success());
    assert!(server.logged("corrupt write-ahead log"), "{}", server.log());
    let log = server.log();
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(log.contains("corrupt write-ahead log") && log.contains(name) && log.contains("at byte 0"), "{log}");
}

/// A crash in the middle of a frame write leaves the frame's start followed by the zeros
/// of the preallocated segment: that torn frame is dropped, everything before it survives.
#[test]
fn torn_tail_is_dropped_and_earlier_events_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = UNFLUSHED;
    let mut server = start(&data, config);
    for _ in 0..5 {
        assert_eq!(server.post_events(r#"[{"video_id":"v"}]"#, &[]).status, 200);
    }
    server.kill();
    let segment = &segments(&data)[0];
    let mut bytes = std::fs::read(segment).unwrap();
    let frames_end = frames_end(&bytes);
    bytes[frames_end - 3..frames_end].fill(0);
    std::fs::write(segment, &bytes).unwrap();
    let server = start(&data, config);
    assert_eq!(server.count("v"), 4, "the torn last frame held one request");
    assert!(server.logged("zeroed the torn last frame"), "{}", server.log());
}

/// Bytes of a segment before its trailer.
const TRAILER_BYTES: usize = 16;

/// Where a segment's frames end: its last non-zero byte before the trailer, plus one.
fn frames_end(segment: &[u8]) -> usize {
    segment[..segment.len() - TRAILER_BYTES].iter().rposition(|&b| b != 0).unwrap() + 1
}

/// One partition, never flushed on its own: everything written lives in the log.
const UNFLUSHED: &str = "flush_interval = \"1h\"\npartitions = 1";

/// A data directory (in a temporary one) whose server took `requests` requests under
/// `UNFLUSHED` and was killed.
fn unflushed_log(requests: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    logged_then_killed(&data, UNFLUSHED, requests);
    (dir, data)
}

/// Writes `requests` requests of one event each for videos `v` and `w` and kills the
/// server: nothing is checkpointed, everything lives in the log.
fn logged_then_killed(data: &std::path::Path, config: &str, requests: usize) {
    let mut server = start(data, config);
    for _ in 0..requests {
        assert_eq!(server.post_events(r#"[{"video_id":"v"},{"video_id":"w"}]"#, &[]).status, 200);
    }
    server.kill();
}

/// Starts a server that must refuse to start; returns its log.
fn refused(data: &std::path::Path, config: &str) -> String {
    let mut server = spawn(data, config);
    let status = server.child.wait().unwrap();
    assert!(!status.success(), "started despite the damage:\n{}", server.log());
    assert!(server.logged("error"), "{}", server.log());
    server.log()
}

/// Defect 4: deleting the newest log segment of a stopped server lost acknowledged events
/// without a word. Now the start is refused naming the segment; `--accept-log-loss` starts
/// without it and says so.
#[test]
fn a_deleted_newest_segment_refuses_to_start_unless_the_loss_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "flush_interval = \"1h\"\npartitions = 1\nsegment_bytes_max = 8192";
    logged_then_killed(&data, config, 300);
    let mut all = segments(&data);
    all.sort();
    assert!(all.len() > 3, "{all:?}");
    let newest = all.last().unwrap();
    std::fs::remove_file(newest).unwrap();
    let log = refused(&data, config);
    let name = newest.file_name().unwrap().to_str().unwrap();
    assert!(log.contains(name) && log.contains("is missing") && log.contains("--accept-log-loss"), "{log}");
    let server = common::start_with(&data, config, &["--accept-log-loss"]);
    assert!(server.logged("accepted loss"), "{}", server.log());
    let kept = server.count("v");
    assert!(kept > 0 && kept < 300, "{kept}");
    assert_eq!(server.count("w"), kept);
}

/// Defect 4: the only segment deleted (nothing checkpointed yet).
#[test]
fn a_deleted_log_refuses_to_start() {
    let (_dir, data) = unflushed_log(5);
    let config = UNFLUSHED;
    for segment in segments(&data) {
        std::fs::remove_file(segment).unwrap();
    }
    let log = refused(&data, config);
    assert!(log.contains("no segment files"), "{log}");
}

/// Defect 4: cutting the newest segment in half lost the events in the cut part silently.
#[test]
fn a_newest_segment_cut_short_refuses_to_start_unless_the_loss_is_accepted() {
    let (_dir, data) = unflushed_log(100);
    let config = UNFLUSHED;
    let segment = &segments(&data)[0];
    let bytes = std::fs::read(segment).unwrap();
    let half = frames_end(&bytes) / 2;
    std::fs::write(segment, &bytes[..half]).unwrap();
    let log = refused(&data, config);
    assert!(log.contains("cut short") && log.contains(segment.file_name().unwrap().to_str().unwrap()), "{log}");
    let server = common::start_with(&data, config, &["--accept-log-loss"]);
    assert!(server.logged("whole frames, dropped the"), "{}", server.log());
    let kept = server.count("v");
    assert!(kept > 0 && kept < 100, "{kept}");
    assert_eq!(server.post_events(r#"[{"video_id":"v"}]"#, &[]).status, 200);
    assert_eq!(server.count("v"), kept + 1);
}

/// Defect 5: a first start that failed part-way left a store that every later start
/// refused as corrupt. Such a directory has no store file yet, and is made again.
#[test]
fn a_failed_first_start_is_made_again_not_reported_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("wal").join("p000")).unwrap();
    // What a first start cut short leaves: a half-written staged store, an empty segment.
    std::fs::write(data.join("store.redb.new"), b"not a redb database").unwrap();
    std::fs::write(data.join("wal/p000/00000000000000000000.wal"), vec![0u8; 4096]).unwrap();
    let server = start(&data, "partitions = 2");
    assert!(server.logged("data directory created"), "{}", server.log());
    assert_eq!(server.post_events(r#"[{"video_id":"v"}]"#, &[]).status, 200);
    assert_eq!(server.count("v"), 1);
    assert!(!data.join("store.redb.new").exists());
}

/// A store file removed from a directory whose log holds events is damage: refused.
#[test]
fn a_removed_store_with_a_logged_log_refuses_to_start() {
    let (_dir, data) = unflushed_log(3);
    let config = UNFLUSHED;
    std::fs::remove_file(data.join("store.redb")).unwrap();
    let log = refused(&data, config);
    assert!(log.contains("store file is missing but the log holds events"), "{log}");
}

#[test]
fn two_servers_cannot_share_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _first = start(&data, "");
    let mut second = spawn(&data, "");
    let status = second.child.wait().unwrap();
    assert!(!status.success());
    assert!(second.logged("another tally process"), "{}", second.log());
}

#[test]
fn segments_behind_the_checkpoint_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "partitions = 1\nsegment_bytes_max = 4096\nflush_interval = \"20ms\"");
    for i in 0..200 {
        assert_eq!(server.post_events(&format!(r#"[{{"video_id":"v{i}"}},{{"video_id":"w"}}]"#), &[]).status, 200);
    }
    let files = || std::fs::read_dir(data.join("wal").join("p000")).unwrap().count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while files() > 2 {
        assert!(std::time::Instant::now() < deadline, "{} segments left behind the checkpoint", files());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The log did roll over (about 10 KB into 4 KB segments), and its first segment is gone.
    let first = data.join("wal").join("p000").join("00000000000000000000.wal");
    assert!(!first.exists(), "no segment was ever deleted");
    assert_eq!(server.count("w"), 200);
}
