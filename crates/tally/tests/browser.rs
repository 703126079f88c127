//! In a real browser: headless Chromium (Debian's `chromium`), driven by puppeteer-core
//! (`tests/browser/`, installed with `npm ci` when missing), loads a page of another origin
//! that includes the beacon script from the server, with a write key bound to that origin,
//! and tracks events across a reload. Every
//! batch is delivered twice (the page doubles `navigator.sendBeacon`), and still each event
//! counts once. The screenshot is kept in the target directory.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Answer, Server, create_key, metric, request, start};

/// The page: a stub that queues calls made before the script loads (as the README's
/// snippet does), the script from the server, and a beacon that delivers twice.
fn page(tally: &Server, key: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>beacon test</title>
<script>
  window.tally = window.tally || {{ q: [], track: function () {{ this.q.push(arguments); }} }};
  tally.track("beacon-3");
  var once = navigator.sendBeacon.bind(navigator);
  navigator.sendBeacon = function (url, body) {{ return once(url, body) && once(url, body); }};
</script>
<script src="{}/v1/tally.js" data-key="{key}" async></script>
</head><body><h1>A page with a tally beacon</h1></body></html>"#,
        tally.url()
    )
}

/// Serves `html` at every path but /favicon.ico (empty), until the process ends.
fn serve_page(listener: TcpListener, html: String) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while reader.read_line(&mut head).is_ok_and(|n| n > 2) && !head.ends_with("\r\n\r\n") {}
            let (status, body) =
                if head.starts_with("GET /favicon.ico") { ("204 No Content", "") } else { ("200 OK", html.as_str()) };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
}

/// The driver's directory, its packages installed (`npm ci`) if they are not.
fn driver() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/puppeteer-core").is_dir() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm is not installed: apt-get install nodejs npm (as .ci/run does)");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).is_file(), "{chromium} is missing: apt-get install chromium (as .ci/run does)");
    dir
}

fn get(server: &Server, key: &str, path: &str) -> Answer {
    request(server.address, "GET", path, &[("authorization", &format!("Bearer {key}"))], b"").unwrap()
}

fn count(server: &Server, key: &str, video: &str, event_type: &str) -> u64 {
    let answer = get(server, key, &format!("/v1/count?video_id={video}&type={event_type}"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()["count"].as_u64().unwrap()
}

#[test]
fn the_beacon_counts_each_event_once_across_a_reload_and_duplicate_deliveries() {
    let dir = driver();
    // The page's origin is allowed, as a site would configure it (the beacon itself needs
    // no CORS answer; its fetch fallback does).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let page_port = listener.local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{page_port}");
    // A write key bound to the page's origin and the videos it may count, as a site
    // would embed it; keys are required.
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("keys.json");
    let key = create_key(&file, &["--scope", "write", "--origin", &origin, "--video-prefix", "beacon-"]);
    let reader = create_key(&file, &["--scope", "read,admin"]);
    let config =
        format!("cors_origins = [\"{origin}\"]\nkeys_file = {:?}\nkeys_required = true\n", file.to_str().unwrap());
    let tally = start(&data.path().join("data"), &config);
    serve_page(listener, page(&tally, &key));
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("beacon.png");
    let output = Command::new("node")
        .arg(dir.join("beacon.mjs"))
        .arg(format!("http://127.0.0.1:{page_port}/"))
        .arg(&screenshot)
        .output()
        .expect("node is not installed: apt-get install nodejs (as .ci/run does)");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser run failed:\n{printed}\n{}", tally.log());
    eprintln!("screenshot: {}", screenshot.display());

    // beacon-1: three views before the reload, two after; beacon-2: a like; beacon-3: one
    // view queued before the script loaded, on each of the two loads.
    let expected = [("beacon-1", "view", 5), ("beacon-2", "like", 1), ("beacon-3", "view", 2)];
    let deadline = Instant::now() + Duration::from_secs(10);
    while expected.iter().any(|&(video, kind, n)| count(&tally, &reader, video, kind) < n) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (video, kind, n) in expected {
        assert_eq!(count(&tally, &reader, video, kind), n, "{video} {kind}:\n{printed}\n{}", tally.log());
    }
    let duplicates = metric(&get(&tally, &reader, "/metrics").text(), "tally_events_duplicate_total").unwrap_or(0.0);
    assert_eq!(duplicates, 8.0, "every batch was delivered twice; its second copy counts nothing");
}

#[test]
fn the_dashboard_shows_what_the_api_answers_and_draws_its_chart() {
    let dir = driver();
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("keys.json");
    let writer = create_key(&file, &["--scope", "write"]);
    let reader = create_key(&file, &["--scope", "read,admin"]);
    let config = format!("keys_file = {:?}\nkeys_required = true\n", file.to_str().unwrap());
    let tally = start(&data.path().join("data"), &config);
    // dash-1: 7 views from 5 viewers and 3 likes; dash-2: 12 views.
    let mut events: Vec<String> =
        (0..7).map(|i| format!(r#"{{"video_id":"dash-1","viewer_id":"u{}"}}"#, i % 5)).collect();
    events.extend((0..3).map(|_| r#"{"video_id":"dash-1","type":"like"}"#.to_string()));
    events.extend((0..12).map(|_| r#"{"video_id":"dash-2"}"#.to_string()));
    let bearer = format!("Bearer {writer}");
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let body = format!("[{}]", events.join(","));
    assert_eq!(request(tally.address, "POST", "/v1/events", &headers, body.as_bytes()).unwrap().status, 200);

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let output = Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .arg(format!("{}/?video=dash-1&tz=UTC", tally.url()))
        .arg(&reader)
        .arg(&screenshot)
        .output()
        .expect("node is not installed: apt-get install nodejs (as .ci/run does)");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser run failed:\n{printed}\n{}", tally.log());
    let shown: serde_json::Value = serde_json::from_str(printed.lines().next().unwrap()).expect(&printed);
    eprintln!(
        "screenshot: {}; first load {} bytes, first chart after {} ms",
        screenshot.display(),
        shown["firstLoadBytes"],
        shown["firstChartMs"]
    );

    let api = |path: &str| get(&tally, &reader, path).json();
    assert_eq!(shown["message"], "", "{shown}");
    assert_eq!(shown["ready"], "ready");
    assert_eq!(shown["count"], api("/v1/count?video_id=dash-1")["count"].to_string());
    assert_eq!(shown["count"], "7");
    assert_eq!(shown["countHour"], "7");
    let uniques = api(&format!("/v1/uniques?video_id=dash-1&from={}", common::now_ms() - 86_400_000));
    assert_eq!(shown["uniques"], uniques["uniques"].to_string());
    let stats = shown["stats"].to_string();
    assert!(stats.contains("view7") && stats.contains("like3"), "{stats}");
    let top = top_ids(&api("/v1/top?k=10"));
    assert_eq!(shown["top"], serde_json::json!(top));
    assert_eq!(shown["errors"], "0", "the health checks' 503s while starting are not errors");
    assert!(shown["chartWidth"].as_u64().unwrap() > 100 && shown["chartPainted"].as_u64().unwrap() > 100, "{shown}");
}

/// The video ids of a `/v1/top` answer, in order.
fn top_ids(answer: &serde_json::Value) -> Vec<String> {
    answer["items"].as_array().unwrap().iter().map(|i| i["video_id"].as_str().unwrap().to_string()).collect()
}
