//! `tally serve --store postgres://…`: the aggregates live in a real PostgreSQL server,
//! started per test on a free port. The database may go away under load: writers are
//! told to back off (429, while the log holds what they were acknowledged), readers get
//! 503, and once it is back every acknowledged event is counted exactly once.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, start_with};
use tally_pgtest::Postgres;

/// Little room for cells not yet in the database, so an outage soon holds writers back.
const CONFIG: &str = "flush_interval = \"20ms\"\npartitions = 4\npending_cells_max = 1000";
const VIDEOS: usize = 300;

/// What the writer threads saw: events acknowledged per video, and the statuses refused.
#[derive(Default)]
struct Seen {
    acknowledged: Vec<u64>,
    refusals: Vec<u16>,
}

/// Posts batches of one event per video (each with its own event id) until `stop`; a
/// refused batch is retried with the same ids until acknowledged. Each batch lands in
/// another minute of the last two days, so the cells waiting for the database pile up.
fn write(server_address: std::net::SocketAddr, writer: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut batch = 0;
    while !stop.load(Ordering::Relaxed) {
        let ts = common::now_ms() - (batch * 2 + writer as i64) % 2880 * 60_000;
        let events: Vec<_> = (0..VIDEOS)
            .map(|v| serde_json::json!({ "video_id": format!("v{v}"), "ts": ts, "event_id": format!("{writer}-{batch}-{v}") }))
            .collect();
        let body = serde_json::to_string(&events).unwrap();
        loop {
            let answer = common::request(
                server_address,
                "POST",
                "/v1/events",
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .unwrap();
            if answer.status == 200 {
                let mut seen = seen.lock().unwrap();
                for count in &mut seen.acknowledged {
                    *count += 1;
                }
                break;
            }
            assert!(matches!(answer.status, 429 | 503), "{} {}", answer.status, answer.text());
            assert!(answer.header("retry-after").is_some(), "a refusal says when to retry");
            seen.lock().unwrap().refusals.push(answer.status);
            std::thread::sleep(Duration::from_millis(50));
        }
        batch += 1;
    }
}

fn counts(server: &Server) -> Result<Vec<u64>, u16> {
    let ids: Vec<String> = (0..VIDEOS).map(|v| format!("v{v}")).collect();
    let answer = server.post_json("/v1/counts", &serde_json::json!({ "video_ids": ids }).to_string());
    if answer.status != 200 {
        return Err(answer.status);
    }
    let counts = answer.json();
    Ok(ids.iter().map(|id| counts["counts"][id].as_u64().unwrap()).collect())
}

#[test]
fn a_database_outage_under_load_loses_nothing_and_counts_catch_up() {
    let mut database = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start_with(&data, CONFIG, &["--store", &database.url()]);
    let seen = Arc::new(Mutex::new(Seen { acknowledged: vec![0; VIDEOS], refusals: vec![] }));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (address, stop, seen) = (server.address, Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || write(address, w, stop, seen))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(counts(&server).is_ok(), "reads work while the database is up");

    database.stop();
    let down = Instant::now();
    let mut read_refused = None;
    while down.elapsed() < Duration::from_secs(3) {
        if let Err(status) = counts(&server) {
            read_refused = Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(read_refused, Some(503), "reads while the database is down");
    let refusals = seen.lock().unwrap().refusals.clone();
    assert!(refusals.contains(&429), "writers were held back while the database was down: {refusals:?}");

    database.start_again();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let expected = seen.lock().unwrap().acknowledged.clone();
    // The flusher retries on a backoff of up to a few seconds; then everything is in.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = counts(&server);
    while last.as_ref() != Ok(&expected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        last = counts(&server);
    }
    assert_eq!(last, Ok(expected.clone()), "counts after the outage\n{}", server.log());
    assert!(server.logged("store writes succeed again"), "{}", server.log());

    // And from the database alone, after a SIGKILL that loses whatever was in memory.
    let mut server = server;
    server.kill();
    let server = start_with(&data, CONFIG, &["--store", &database.url()]);
    assert_eq!(counts(&server), Ok(expected), "after SIGKILL and restart");
}

/// `tally store-stats --json` for either backend: rows per table group.
fn store_stats(args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(common::tally_binary())
        .arg("store-stats")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn rows(stats: &serde_json::Value, group: &str) -> u64 {
    let group = stats.as_array().unwrap().iter().find(|g| g["group"] == group).unwrap_or_else(|| panic!("{stats}"));
    group["rows"].as_u64().unwrap()
}

#[test]
fn store_stats_reads_the_embedded_store_and_postgresql() {
    let database = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    for (data, args) in
        [(dir.path().join("embedded"), vec![]), (dir.path().join("pg"), vec!["--store", &database.url()])]
    {
        let mut server = start_with(&data, CONFIG, &args);
        let body = r#"[{"video_id":"a"},{"video_id":"b"},{"video_id":"c"},{"video_id":"c"}]"#;
        assert_eq!(server.post_events(body, &[]).status, 200);
        assert!(server.terminate(Duration::from_secs(30)).success(), "a clean stop flushes everything");
        let stats = match args.as_slice() {
            [] => store_stats(&["--data-dir", data.to_str().unwrap()]),
            _ => store_stats(&args),
        };
        assert_eq!((rows(&stats, "counters.minute"), rows(&stats, "counters.day")), (3, 3), "{stats}");
        assert_eq!(rows(&stats, "videos.day"), 3, "{stats}");
    }
}
