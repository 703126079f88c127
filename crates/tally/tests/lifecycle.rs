//! Starting, stopping and restarting: SIGTERM makes everything durable and exits 0; a bad
//! config refuses to start; a damaged log refuses to start and says where; a torn tail is
//! dropped and the server starts.

mod common;

use std::time::Duration;

use common::{spawn, start, tally_binary};

/// The documented bound on a clean stop: drain (10 s default) plus the final flush.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn sigterm_flushes_checkpoints_and_exits_zero_and_counts_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start(&data, "flush_interval_ms = 3600000");
    for _ in 0..10 {
        assert_eq!(server.post_events(r#"[{"video_id":"a"},{"video_id":"b","type":"like"}]"#, &[]).status, 200);
    }
    let status = server.terminate(STOP_TIMEOUT);
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(server.logged("everything flushed and checkpointed"), "{}", server.log());
    let server = start(&data, "flush_interval_ms = 3600000");
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
    let config = "flush_interval_ms = 3600000";
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
    let config = "flush_interval_ms = 3600000\npartitions = 1";
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

#[test]
fn torn_tail_is_dropped_and_earlier_events_survive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = "flush_interval_ms = 3600000\npartitions = 1";
    let mut server = start(&data, config);
    for _ in 0..5 {
        assert_eq!(server.post_events(r#"[{"video_id":"v"}]"#, &[]).status, 200);
    }
    server.kill();
    let segment = &segments(&data)[0];
    let len = std::fs::metadata(segment).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(segment).unwrap().set_len(len - 3).unwrap();
    let server = start(&data, config);
    assert_eq!(server.count("v"), 4, "the torn last frame held one request");
    assert!(server.logged("truncated torn tail"), "{}", server.log());
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
    let server = start(&data, "partitions = 1\nsegment_bytes_max = 4096\nflush_interval_ms = 20");
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
