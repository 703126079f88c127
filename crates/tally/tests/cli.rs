//! The command-line client against the real server: `send` (JSON lines, CSV, resume without
//! double counting), `count` and `series`.

mod common;

use std::io::Write;
use std::process::Command;

use common::{start, tally_binary};

fn tally(server: &common::Server, args: &[&str]) -> std::process::Output {
    Command::new(tally_binary()).args(args).env("TALLY_SERVER", server.url()).output().unwrap()
}

#[test]
fn send_jsonl_and_csv_then_count() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let jsonl = dir.path().join("events.jsonl");
    let lines: String = (0..2500).map(|i| format!("{{\"video_id\":\"v{}\"}}\n", i % 3)).collect();
    std::fs::write(&jsonl, lines).unwrap();
    let out = tally(&server, &["send", jsonl.to_str().unwrap(), "--batch-size", "100"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sent 2500 events in this run; in all, 2500 events accepted")
    );
    assert_eq!(server.count("v0") + server.count("v1") + server.count("v2"), 2500);

    let csv = dir.path().join("events.csv");
    std::fs::write(
        &csv,
        "video_id,type,ts,value,event_id,viewer_id\nc1,like,,5,e1,u1\nc1,like,,7,e2,\nc1,like,,9,e2,\n",
    )
    .unwrap();
    let out = tally(&server, &["send", csv.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tally(&server, &["count", "c1", "--type", "like", "--json"]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((answer["count"].clone(), answer["sum"].clone()), (serde_json::json!(2), serde_json::json!(12)));
    let out = tally(&server, &["count", "c1", "--type", "like"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("2 like of c1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = tally(&server, &["series", "c1", "--type", "like", "--step", "minute", "--json"]);
    let series: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = series["points"].as_array().unwrap().iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 2);
}

#[test]
fn send_resumes_where_it_stopped_and_never_double_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let file = dir.path().join("events.jsonl");
    // 4,000 good lines (past the 64 KiB that identify the file), one bad, 50 good.
    let good = |n: usize| "{\"video_id\":\"r\"}\n".repeat(n);
    std::fs::write(&file, format!("{}{{\"video_id\":\"\"}}\n{}", good(4000), good(50))).unwrap();
    let out = tally(&server, &["send", file.to_str().unwrap(), "--batch-size", "1000", "--concurrency", "1"]);
    assert!(!out.status.success(), "the fifth batch holds an invalid event");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_events"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.count("r"), 4000);
    std::fs::write(&file, format!("{}{}", good(4000), good(51))).unwrap();
    let out = tally(&server, &["send", file.to_str().unwrap(), "--batch-size", "1000"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resuming at byte"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.count("r"), 4051);
    // Sending the whole file again from the start is deduplicated by the batch keys.
    let out = tally(&server, &["send", file.to_str().unwrap(), "--batch-size", "1000", "--restart"]);
    assert!(out.status.success());
    assert_eq!(server.count("r"), 4051);
}

#[test]
fn an_appended_file_sends_only_its_new_lines_and_a_named_stdin_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let file = dir.path().join("grows.jsonl");
    let line = "{\"video_id\":\"grow\"}\n";
    std::fs::write(&file, line.repeat(10)).unwrap();
    let out = tally(&server, &["send", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(line.repeat(5).as_bytes()).unwrap();
    let out = tally(&server, &["send", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("sent 5 events in this run"), "{stderr}");
    assert_eq!(server.count("grow"), 15, "the first ten lines are not sent again");

    let stdin = |source_id: Option<&str>| {
        let mut args = vec!["send", "-"];
        args.extend(source_id.map(|id| ["--source-id", id]).iter().flatten());
        let mut child = Command::new(tally_binary())
            .args(&args)
            .env("TALLY_SERVER", server.url())
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all("{\"video_id\":\"piped\"}\n".repeat(7).as_bytes()).unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
    };
    stdin(Some("nightly-export"));
    stdin(Some("nightly-export"));
    assert_eq!(server.count("piped"), 7, "a rerun of a named source is recognised");
    stdin(None);
    assert_eq!(server.count("piped"), 14, "an unnamed stdin is a new source each run");
}

#[test]
fn csv_columns_are_found_by_header_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let csv = dir.path().join("some-columns.csv");
    std::fs::write(&csv, "value,video_id,type\n5,\"col,1\",like\n7,\"col,1\",like\n").unwrap();
    let out = tally(&server, &["send", csv.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tally(&server, &["count", "col,1", "--type", "like", "--json"]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((answer["count"].as_u64(), answer["sum"].as_i64()), (Some(2), Some(12)));
    std::fs::write(&csv, "video_id,colour\na,red\n").unwrap();
    let out = tally(&server, &["send", csv.to_str().unwrap(), "--restart"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"colour\" is not an event field"));
}

#[test]
fn top_uniques_and_stats_print_readable_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let body = r#"[{"video_id":"hit","viewer_id":"u1"},{"video_id":"hit","viewer_id":"u2"},{"video_id":"hit","viewer_id":"u1"},
        {"video_id":"miss"},{"video_id":"hit","type":"watch_ms","value":3000}]"#;
    assert_eq!(server.post_events(body, &[]).status, 200);
    let stdout = |args: &[&str]| {
        let output = tally(&server, args);
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let top = stdout(&["top", "-k", "5"]);
    assert!(top.contains("exact"), "{top}");
    let lines: Vec<&str> = top.lines().collect();
    assert!(lines[1].contains("1.") && lines[1].contains("hit") && lines[1].contains(" 3 "), "{top}");
    assert!(lines[2].contains("miss"), "{top}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&["top", "--json", "--exact"])).unwrap();
    assert_eq!(json["items"][0], serde_json::json!({"video_id": "hit", "count": 3, "error": 0}));
    assert!(stdout(&["uniques", "hit"]).starts_with("2 distinct viewers"));
    let stats = stdout(&["stats", "hit"]);
    assert!(stats.lines().any(|l| l.starts_with("watch_ms") && l.contains("3000.00")), "{stats}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&["stats", "hit", "--json"])).unwrap();
    assert_eq!(json["types"]["view"]["count"], 3);
    let bad = tally(&server, &["top", "-k", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("k must be"), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// The load generator checks the server's counts exactly, on a fresh type and on one that
/// already has events (counts before plus what was acknowledged).
#[test]
fn bench_checks_counts_on_a_fresh_and_an_existing_type() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--events",
            "20000",
            "--videos",
            "300",
            "--batch-size",
            "500",
            "--concurrency",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = tally(&server, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let fresh = bench(&[]);
    assert_eq!(
        (fresh["events"].clone(), fresh["counted"].clone()),
        (serde_json::json!(20000), serde_json::json!(20000))
    );
    assert_eq!(fresh["mismatched_videos"], 0);
    let event_type = fresh["event_type"].as_str().unwrap().to_owned();
    let again = bench(&["--type", &event_type]);
    assert_eq!(
        (again["counted"].clone(), again["mismatched_videos"].clone()),
        (serde_json::json!(20000), serde_json::json!(0))
    );
    let ids: Vec<String> = (0..300).map(|v| format!("v{v}")).collect();
    let counts = server.post_json("/v1/counts", &serde_json::json!({"video_ids": ids, "type": event_type}).to_string());
    let total: u64 = counts.json()["counts"].as_object().unwrap().values().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(total, 40_000);
}

#[test]
fn bench_fresh_mode_times_writes_until_they_count() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), "");
    let args = ["bench", "--mode", "fresh", "--events", "12", "--concurrency", "3", "--seed", "7", "--json"];
    let out = tally(&server, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["mode"], "fresh");
    assert_eq!(result["requests"], 12);
    // Every delay includes at least the read that saw the write.
    let latency = &result["latency_ms"];
    assert!(latency["p50"].as_f64().unwrap() > 0.0, "{latency}");
    // Each write was one event of its own video (`fresh-<seed>-<worker>-<n>`, the workers
    // sharing the 12 writes in any split), counted once.
    let mut counted = 0;
    for worker in 0..3 {
        for n in 0..12 {
            let video = format!("fresh-7-{worker}-{n}");
            let count = server.get(&format!("/v1/count?video_id={video}&from=0")).json()["count"].as_u64().unwrap();
            assert!(count <= 1, "{video} counted {count}");
            counted += count;
        }
    }
    assert_eq!(counted, 12);
}
