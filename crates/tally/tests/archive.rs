//! The raw-event archive through the real binary: every counted event is archived once
//! (duplicates and repeated requests left out), a clean stop leaves it complete, a SIGKILL
//! under load loses and doubles nothing, and log segments wait for the archive.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tally_archive::{Archive, aggregate};

fn config(archive: &Path) -> String {
    let archive = archive.display().to_string();
    format!("archive = {archive:?}\narchive_file_interval = \"200ms\"\nflush_interval = \"100ms\"\npartitions = 2\n")
}

/// Counts per (type, video).
type Counts = BTreeMap<(String, String), u64>;
/// Each partition's files, as log offset ranges.
type Ranges = BTreeMap<u32, Vec<(u64, u64)>>;

/// The archive's counts, and its files' ranges.
fn archived(dir: &Path) -> (Counts, Ranges) {
    let archive = Archive::open(dir.to_str().unwrap()).unwrap();
    let files = archive.files().unwrap();
    let totals = aggregate(&archive, &files, i64::MIN, i64::MAX).unwrap();
    let counts = totals.totals.into_iter().map(|(key, total)| (key, total.count)).collect();
    let mut ranges = Ranges::new();
    for file in files {
        ranges.entry(file.partition).or_default().push((file.first_offset, file.end_offset));
    }
    (counts, ranges)
}

/// Each partition's files follow one another: no offset archived twice, none skipped.
fn assert_contiguous(ranges: &Ranges) {
    for (partition, files) in ranges {
        for pair in files.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "partition {partition}: files {pair:?} must follow one another");
        }
    }
}

/// `tally audit` of `archive` against `server`.
fn run_audit(archive: &Path, server: &common::Server) -> std::process::Output {
    std::process::Command::new(common::tally_binary())
        .args(["audit", "--archive", archive.to_str().unwrap(), "--server", &server.url()])
        .output()
        .unwrap()
}

#[test]
fn every_counted_event_is_archived_once_and_duplicates_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let mut server = common::start(&dir.path().join("data"), &config(&archive));
    let events: String = (0..300).map(|i| format!("{{\"video_id\":\"v{}\"}}\n", i % 5)).collect();
    assert_eq!(server.post_ndjson(events.as_bytes()).status, 200);
    let with_ids =
        r#"[{"video_id":"ids","event_id":"a"},{"video_id":"ids","event_id":"a"},{"video_id":"ids","event_id":"b"}]"#;
    assert_eq!(server.post_events(with_ids, &[]).status, 200);
    assert_eq!(server.post_events(with_ids, &[]).status, 200, "both ids already seen: two duplicates");
    let keyed = r#"[{"video_id":"keyed","type":"like","value":7}]"#;
    for _ in 0..3 {
        assert_eq!(server.post_events(keyed, &[("idempotency-key", "once")]).status, 200);
    }
    assert!(server.terminate(Duration::from_secs(60)).success());
    let (counts, ranges) = archived(&archive);
    let count = |t: &str, v: &str| counts.get(&(t.to_string(), v.to_string())).copied().unwrap_or(0);
    for video in 0..5 {
        assert_eq!(count("view", &format!("v{video}")), 60);
    }
    assert_eq!(count("view", "ids"), 2, "event ids a and b once each");
    assert_eq!(count("like", "keyed"), 1, "the request sent three times under one key");
    assert_eq!(counts.values().sum::<u64>(), 303);
    assert_contiguous(&ranges);
    let layout = std::fs::read_dir(archive.join("events")).unwrap().next().unwrap().unwrap().file_name();
    assert!(layout.to_string_lossy().starts_with("date="), "laid out by date and hour: {layout:?}");
}

/// Writer `writer` sends batches of 200 events over 7 videos of its own until `stop`; some
/// events repeat an id from the batch before: duplicates, left out.
fn write_until(address: std::net::SocketAddr, writer: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut batch = 0;
        while !stop.load(Ordering::Relaxed) {
            let body: String = (0..200)
                .map(|i| {
                    format!("{{\"video_id\":\"w{writer}-{}\",\"event_id\":\"{batch}-{}\"}}\n", i % 150 % 7, i % 150)
                })
                .collect();
            let headers = [("content-type", "application/x-ndjson")];
            let _ = common::request(address, "POST", "/v1/events", &headers, body.as_bytes());
            batch += 1;
        }
    })
}

#[test]
fn a_sigkill_under_load_then_a_clean_stop_leaves_each_counted_event_archived_once() {
    let dir = tempfile::tempdir().unwrap();
    let (data, archive) = (dir.path().join("data"), dir.path().join("archive"));
    let mut server = common::start(&data, &config(&archive));
    let address = server.address;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3).map(|writer| write_until(address, writer, Arc::clone(&stop))).collect();
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let mut server = common::start(&data, &config(&archive));
    let mut expected = BTreeMap::new();
    for writer in 0..3 {
        for video in 0..7 {
            let id = format!("w{writer}-{video}");
            expected.insert(("view".to_string(), id.clone()), server.count(&id));
        }
    }
    assert!(expected.values().sum::<u64>() > 0, "the writers got events in before the kill");
    assert!(server.terminate(Duration::from_secs(60)).success());
    let (counts, ranges) = archived(&archive);
    assert_eq!(
        counts,
        expected.into_iter().filter(|(_, n)| *n > 0).collect(),
        "the archive counts what the store counts"
    );
    assert_contiguous(&ranges);
    let server = common::start(&data, &config(&archive));
    let audit = run_audit(&archive, &server);
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success() && stdout.contains("no differences"), "{stdout}");

    // An archive file gone (one of several of its partition, so that its videos have
    // events left elsewhere): the audit says which counters no longer match, and fails.
    let files = Archive::open(archive.to_str().unwrap()).unwrap().files().unwrap();
    let holding: Vec<_> = files.iter().filter(|f| f.end_offset > f.first_offset).collect();
    let gone = holding
        .iter()
        .find(|f| holding.iter().filter(|g| g.partition == f.partition).count() > 1)
        .expect("a partition with several files");
    std::fs::remove_file(archive.join(&gone.path)).unwrap();
    let audit = run_audit(&archive, &server);
    let (stdout, stderr) = (String::from_utf8_lossy(&audit.stdout), String::from_utf8_lossy(&audit.stderr));
    assert!(!audit.status.success(), "{stdout}");
    assert!(stdout.contains(" view: store count ") && stderr.contains("counters differ"), "{stdout}{stderr}");
}

#[test]
fn log_segments_wait_for_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let (data, archive) = (dir.path().join("data"), dir.path().join("archive"));
    // The archive location is a file: every round fails, so nothing may be forgotten.
    std::fs::create_dir_all(&archive).unwrap();
    let config = format!("{}segment_bytes_max = 65536\n", config(&archive));
    let mut server = common::start(&data, &config);
    std::fs::remove_dir_all(&archive).unwrap();
    std::fs::write(&archive, "not a directory").unwrap();
    let events: String = (0..2000).map(|i| format!("{{\"video_id\":\"long-video-id-{i:06}\"}}\n")).collect();
    for _ in 0..10 {
        assert_eq!(server.post_ndjson(events.as_bytes()).status, 200);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = server.get("/metrics").text();
    assert!(common::metric(&metrics, "tally_archive_errors_total").unwrap() > 0.0, "{metrics}");
    let segments = |partition: u32| std::fs::read_dir(data.join(format!("wal/p{partition:03}"))).unwrap().count();
    let held = segments(0) + segments(1);
    assert!(held > 4, "the log keeps its segments while the archive fails ({held} files)");
    std::fs::remove_file(&archive).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    assert!(server.terminate(Duration::from_secs(60)).success());
    let (counts, ranges) = archived(&archive);
    assert_eq!(counts.values().sum::<u64>(), 20_000, "archived in full once the archive is back");
    assert_contiguous(&ranges);
}

/// `tally recompute` under load: the days are rewritten while writers go on, nothing is
/// corrected on a healthy store, nothing acknowledged is lost; without an archive it is
/// refused with the reason.
#[test]
fn recompute_under_load_corrects_nothing_on_a_healthy_store_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, archive) = (dir.path().join("data"), dir.path().join("archive"));
    let mut server = common::start(&data, &config(&archive));
    let address = server.address;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut acknowledged = 0u64;
            let body: String = (0..100).map(|i| format!("{{\"video_id\":\"r{}\"}}\n", i % 4)).collect();
            while !stop.load(Ordering::Relaxed) {
                let headers = [("content-type", "application/x-ndjson")];
                if common::request(address, "POST", "/v1/events", &headers, body.as_bytes()).unwrap().status == 200 {
                    acknowledged += 100;
                }
            }
            acknowledged
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (now, later) = (common::now_ms().to_string(), (common::now_ms() + 1).to_string());
    let recompute = std::process::Command::new(common::tally_binary())
        .args(["recompute", "--from", &now, "--to", &later, "--server", &server.url()])
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&recompute.stdout);
    assert!(recompute.status.success(), "{stdout}{}", String::from_utf8_lossy(&recompute.stderr));
    assert!(stdout.contains(" 0 corrected"), "{stdout}");
    let counted: u64 = (0..4).map(|v| server.count(&format!("r{v}"))).sum();
    assert_eq!(counted, acknowledged, "every acknowledged event counted once");
    assert!(server.terminate(Duration::from_secs(60)).success());

    let (_dir, plain) = common::server("partitions = 2\n");
    let refused = std::process::Command::new(common::tally_binary())
        .args(["recompute", "--from", &now, "--to", &later, "--server", &plain.url()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("409") && stderr.contains("no archive is configured"), "{stderr}");
}
