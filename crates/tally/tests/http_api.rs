//! Every rule of the HTTP API, against the real server on port 0.

mod common;

use common::{now_ms, request, server};
use serde_json::{Value, json};

/// The (index, field) of each listed error; every error must also say why.
fn fields(answer: &Value) -> Vec<(u64, String)> {
    answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["reason"].as_str().is_some_and(|r| r.len() > 5), "no reason given: {e}");
            (e["index"].as_u64().unwrap(), e["field"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn ingest_accepts_object_array_and_ndjson_and_counts_at_once() {
    let (_dir, server) = server("");
    let one = server.post_events(r#"{"video_id":"a"}"#, &[]);
    let position = one.json()["position"].as_str().unwrap().to_owned();
    assert!(position.contains(':'), "a write answers where it reached: {position:?}");
    assert_eq!((one.status, one.json()), (200, json!({"accepted": 1, "duplicates": 0, "position": position})));
    assert_eq!(server.count("a"), 1, "counted the moment it was acknowledged");
    let many = server.post_events(r#"[{"video_id":"a"},{"video_id":"b","type":"like","value":7}]"#, &[]);
    assert_eq!(many.json()["accepted"], 2);
    let ndjson = server.post_ndjson(b"{\"video_id\":\"a\"}\n\n{\"video_id\":\"a\"}\r\n");
    assert_eq!((ndjson.status, ndjson.json()["accepted"].clone()), (200, json!(2)));
    assert_eq!(server.count("a"), 4);
    let likes = server.get("/v1/count?video_id=b&type=like").json();
    assert_eq!((likes["count"].clone(), likes["sum"].clone()), (json!(1), json!(7)));
    let empty = server.post_events("[]", &[]);
    assert_eq!(empty.json(), json!({"accepted": 0, "duplicates": 0, "position": ""}));
}

#[test]
fn wrong_content_type_is_415() {
    let (_dir, server) = server("");
    for headers in [vec![("content-type", "text/html")], vec![]] {
        let answer = request(server.address, "POST", "/v1/events", &headers, br#"{"video_id":"a"}"#).unwrap();
        assert_eq!(answer.status, 415);
        assert_eq!(answer.error_json()["error"], "unsupported_media_type");
    }
    assert_eq!(server.count("a"), 0);
}

#[test]
fn malformed_json_and_invalid_utf8_are_400_and_count_nothing() {
    let (_dir, server) = server("");
    let cases: [&[u8]; 4] = [br#"[{"video_id":"a"},"#, b"not json", b"[{\"video_id\":\"a\xff\"}]", b"42"];
    for body in cases {
        let answer =
            request(server.address, "POST", "/v1/events", &[("content-type", "application/json")], body).unwrap();
        assert_eq!(answer.status, 400, "{}", answer.text());
        assert!(["malformed_json", "invalid_utf8"].contains(&answer.error_json()["error"].as_str().unwrap()));
    }
    let ndjson = server.post_ndjson(b"{\"video_id\":\"a\"}\n{oops\n");
    assert_eq!((ndjson.status, ndjson.json()["line"].clone()), (400, json!(2)));
    assert_eq!(server.count("a"), 0);
}

#[test]
fn every_bad_field_of_every_event_is_named_and_the_batch_counts_nothing() {
    let (_dir, server) = server("");
    let now = now_ms();
    let body = json!([
        {"video_id": "ok"},
        {"type": "view"},
        {"video_id": ""},
        {"video_id": "x".repeat(257)},
        {"video_id": "tab\there"},
        {"video_id": 5},
        {"video_id": "v", "type": "View"},
        {"video_id": "v", "ts": now - 8 * 86_400_000i64},
        {"video_id": "v", "ts": now + 6 * 60_000},
        {"video_id": "v", "ts": "yesterday"},
        {"video_id": "v", "value": 1.5},
        {"video_id": "v", "value": "3"},
        {"video_id": "v", "value": 9_007_199_254_740_992i64},
        {"video_id": "v", "event_id": "e".repeat(129)},
        {"video_id": "v", "viewer_id": "u".repeat(257)},
        {"video_id": "v", "colour": "red"},
        {"video_id": "v", "ts": true},
    ])
    .to_string();
    let answer = server.post_events(&body, &[]);
    assert_eq!(answer.status, 400);
    let answer = answer.json();
    assert_eq!(answer["error"], "invalid_events");
    let expected: Vec<(u64, String)> = [
        (1, "video_id"),
        (2, "video_id"),
        (3, "video_id"),
        (4, "video_id"),
        (5, "video_id"),
        (6, "type"),
        (7, "ts"),
        (8, "ts"),
        (9, "ts"),
        (10, "value"),
        (11, "value"),
        (12, "value"),
        (13, "event_id"),
        (14, "viewer_id"),
        (15, "colour"),
        (16, "ts"),
    ]
    .iter()
    .map(|(i, f)| (*i, (*f).to_owned()))
    .collect();
    assert_eq!(fields(&answer), expected);
    let codes: Vec<&str> = answer["errors"].as_array().unwrap().iter().map(|e| e["code"].as_str().unwrap()).collect();
    let mut expected_codes = vec!["invalid_field"; 16];
    expected_codes[0] = "missing_field";
    expected_codes[14] = "unknown_field";
    assert_eq!(codes, expected_codes);
    assert_eq!(answer["error_count"], 16);
    assert_eq!(server.count("ok"), 0, "all or nothing");
}

#[test]
fn error_list_is_capped_but_the_total_is_given() {
    let (_dir, server) = server("field_errors_max = 3");
    let body = json!((0..10).map(|_| json!({"video_id": ""})).collect::<Vec<_>>()).to_string();
    let answer = server.post_events(&body, &[]).json();
    assert_eq!(answer["errors"].as_array().unwrap().len(), 3);
    assert_eq!(answer["error_count"], 10);
}

#[test]
fn body_and_event_limits_answer_413() {
    let (_dir, server) = server("body_bytes_max = 1024\nevents_per_request_max = 3");
    let big = json!(vec![json!({"video_id": "v".repeat(256)}); 5]).to_string();
    assert!(big.len() > 1024);
    let answer = server.post_events(&big, &[]);
    assert_eq!((answer.status, answer.error_json()["error"].clone()), (413, json!("body_too_large")));
    // Without Content-Length (chunked), the server stops reading at the limit: it answers
    // 413 while the client is still sending a body that would only end after 256 MiB.
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut stream = std::net::TcpStream::connect(server.address).unwrap();
    write!(stream, "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let writer = {
        let (mut stream, written) = (stream.try_clone().unwrap(), std::sync::Arc::clone(&written));
        std::thread::spawn(move || {
            let chunk = format!("1000\r\n{}\r\n", "x".repeat(4096));
            while written.load(Ordering::Relaxed) < 256 << 20 && stream.write_all(chunk.as_bytes()).is_ok() {
                written.fetch_add(4096, Ordering::Relaxed);
            }
            let _ = stream.write_all(b"0\r\n\r\n");
        })
    };
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    let written_when_answered = written.load(Ordering::Relaxed);
    assert_eq!(&head, b"HTTP/1.1 413");
    assert!(written_when_answered < 64 << 20, "answered only after {written_when_answered} bytes of a 1 KiB limit");
    let streamed = rest_of_answer(&mut stream, head.to_vec());
    assert!(streamed.contains("\r\ncontent-type: application/json\r\n"), "{streamed}");
    let body: Value = serde_json::from_str(streamed.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!((body["error"].as_str(), body["limit_bytes"].as_u64()), (Some("body_too_large"), Some(1024)));
    let _ = stream.shutdown(std::net::Shutdown::Both); // unblocks the writer if still open
    writer.join().unwrap();
    let four = json!([{"video_id": "a"}, {"video_id": "a"}, {"video_id": "a"}, {"video_id": "a"}]).to_string();
    let answer = server.post_events(&four, &[]);
    assert_eq!((answer.status, answer.json()["error"].clone()), (413, json!("too_many_events")));
    assert_eq!(server.count("a"), 0);
}

/// Reads an answer whose first bytes were `start` up to the end of its body (by its
/// `Content-Length`), while the client may still be sending: head and body as text.
fn rest_of_answer(stream: &mut impl std::io::Read, start: Vec<u8>) -> String {
    let mut answer = start;
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length =
                head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ")?.parse().ok());
            if body.len() >= length.expect("an error answer says its length") {
                return text.to_ascii_lowercase().split_once("\r\n\r\n").unwrap().0.to_owned() + "\r\n\r\n" + body;
            }
        }
        let read = stream.read(&mut buffer).unwrap();
        assert!(read > 0, "closed before the whole answer: {text}");
        answer.extend_from_slice(&buffer[..read]);
    }
}

#[test]
fn idempotency_key_repeats_answer_like_the_first_and_count_once() {
    let (_dir, server) = server("");
    let body = r#"[{"video_id":"a","event_id":"1"},{"video_id":"a","event_id":"1"},{"video_id":"b"}]"#;
    let first = server.post_events(body, &[("idempotency-key", "k-1")]);
    let position = first.json()["position"].clone();
    assert_eq!(first.json(), json!({"accepted": 2, "duplicates": 1, "position": position}));
    for _ in 0..3 {
        // Answered from memory: the first counts, and nothing new written.
        let again = server.post_events(body, &[("idempotency-key", "k-1")]);
        assert_eq!((again.status, again.json()), (200, json!({"accepted": 2, "duplicates": 1, "position": ""})));
    }
    assert_eq!((server.count("a"), server.count("b")), (1, 1));
    let reused = server.post_events(r#"[{"video_id":"c"}]"#, &[("idempotency-key", "k-1")]);
    assert_eq!((reused.status, reused.json()["error"].clone()), (422, json!("idempotency_key_reused")));
    assert_eq!(server.count("c"), 0);
    let too_long = "k".repeat(129);
    let bad = server.post_events(body, &[("idempotency-key", &too_long)]);
    assert_eq!((bad.status, bad.json()["error"].clone()), (400, json!("invalid_idempotency_key")));
}

#[test]
fn event_ids_are_deduplicated_within_and_across_requests() {
    let (_dir, server) = server("");
    let answer = server.post_events(
        r#"[{"video_id":"a","event_id":"x"},{"video_id":"a","event_id":"x"},{"video_id":"b","event_id":"x"}]"#,
        &[],
    );
    assert_eq!((answer.json()["accepted"].clone(), answer.json()["duplicates"].clone()), (json!(2), json!(1)));
    let again = server.post_events(r#"{"video_id":"a","event_id":"x"}"#, &[]);
    assert_eq!((again.json()["accepted"].clone(), again.json()["duplicates"].clone()), (json!(0), json!(1)));
    assert_eq!((server.count("a"), server.count("b")), (1, 1));
}

#[test]
fn count_ranges_are_half_open_minute_aligned_and_stated() {
    let (_dir, server) = server("");
    let minute = now_ms() / 60_000 * 60_000 - 10 * 60_000;
    let body = json!([
        {"video_id": "v", "ts": minute},
        {"video_id": "v", "ts": minute + 59_999},
        {"video_id": "v", "ts": minute + 60_000},
        {"video_id": "v", "ts": jiff::Timestamp::from_millisecond(minute + 120_000).unwrap().to_string()},
    ])
    .to_string();
    assert_eq!(server.post_events(&body, &[]).status, 200);
    let count = |from: i64, to: i64| server.get(&format!("/v1/count?video_id=v&from={from}&to={to}")).json();
    assert_eq!(count(minute, minute + 60_000)["count"], 2);
    assert_eq!(count(minute, minute + 120_000)["count"], 3);
    // Widened outward to whole minutes, and the answer says so.
    let widened = count(minute + 30_000, minute + 60_001);
    assert_eq!(widened["count"], 3);
    assert_eq!(widened["from"], jiff::Timestamp::from_millisecond(minute).unwrap().to_string());
    assert_eq!(widened["to"], jiff::Timestamp::from_millisecond(minute + 120_000).unwrap().to_string());
    let rfc = |ms: i64| jiff::Timestamp::from_millisecond(ms).unwrap().to_string();
    let by_text = server.get(&format!("/v1/count?video_id=v&from={}&to={}", rfc(minute), rfc(minute + 180_000))).json();
    assert_eq!(by_text["count"], 4);
    assert_eq!(server.get("/v1/count?video_id=v").json()["count"], 4);
    assert_eq!(server.get("/v1/count?video_id=nobody").json()["count"], 0);
    assert_eq!(count(minute, minute)["count"], 0);
}

#[test]
fn bad_query_parameters_are_400() {
    let (_dir, server) = server("");
    // Eight days of minutes from six days ago: minute buckets are still kept there.
    let too_many_minutes = format!(
        "/v1/series?video_id=v&step=minute&from={}&to={}",
        now_ms() - 6 * 86_400_000,
        now_ms() + 2 * 86_400_000
    );
    for (path, code, field) in [
        ("/v1/count", "missing_field", Some("video_id")),
        ("/v1/count?video_id=", "invalid_field", Some("video_id")),
        ("/v1/count?video_id=v&type=Bad", "invalid_field", Some("type")),
        ("/v1/count?video_id=v&from=yesterday", "invalid_field", Some("from")),
        ("/v1/count?video_id=v&tz=Mars/Olympus", "invalid_field", Some("tz")),
        ("/v1/count?video_id=v&after=x", "invalid_field", Some("after")),
        ("/v1/count?video_id=v&from=10&to=5", "invalid_range", None),
        ("/v1/count?video_id=v&vidoe_id=w", "unknown_field", Some("vidoe_id")),
        ("/v1/count?video_id=v&video_id=w", "duplicate_field", Some("video_id")),
        ("/v1/count?video_id=v%zz", "malformed_query", Some("video_id")),
        ("/v1/series?video_id=v&step=week", "invalid_field", Some("step")),
        (&too_many_minutes, "too_many_points", None),
    ] {
        let answer = server.get(path);
        assert_eq!(answer.status, 400, "{path}: {}", answer.text());
        let json = answer.error_json();
        assert_eq!((json["error"].as_str(), json["field"].as_str()), (Some(code), field), "{path}: {json}");
        assert!(json.get("hint").is_none(), "no slip to hint at in {path}: {json}");
    }
}

#[test]
fn counts_answers_a_page_of_videos_in_one_round_trip() {
    let (_dir, server) = server("counts_video_ids_max = 3");
    server.post_events(r#"[{"video_id":"a"},{"video_id":"a"},{"video_id":"b","type":"like"}]"#, &[]);
    let answer = server.post_json("/v1/counts", r#"{"video_ids":["a","b","zzz"]}"#).json();
    assert_eq!(answer["counts"], json!({"a": 2, "b": 0, "zzz": 0}));
    let likes = server.post_json("/v1/counts", r#"{"video_ids":["b"],"type":"like","from":0}"#).json();
    assert_eq!(likes["counts"], json!({"b": 1}));
    let too_many = server.post_json("/v1/counts", r#"{"video_ids":["a","b","c","d"]}"#);
    assert_eq!((too_many.status, too_many.json()["error"].clone()), (400, json!("too_many_video_ids")));
    for (body, code, field) in [
        (r#"{"video_ids":["a"],"colour":1}"#, "unknown_field", Some("colour")),
        (r#"{"type":"view"}"#, "missing_field", Some("video_ids")),
        (r#"{"video_ids":["a"],"type":"view","type":"like"}"#, "duplicate_field", Some("type")),
        (r#"{"video_ids":"a"}"#, "invalid_field", Some("video_ids")),
        (r#"{"video_ids":["a",""]}"#, "invalid_field", Some("video_ids")),
        (r#"{"video_ids":["a"],"type":"Bad"}"#, "invalid_field", Some("type")),
        (r#"{"video_ids":["a"],"from":"soon"}"#, "invalid_field", Some("from")),
        (r#"{"video_ids":["a"],"from":10,"to":5}"#, "invalid_range", None),
        (r#"["a"]"#, "malformed_json", None),
        (r#"{"video_ids":["a"]"#, "malformed_json", None),
    ] {
        let answer = server.post_json("/v1/counts", body);
        assert_eq!(answer.status, 400, "{body}: {}", answer.text());
        let json = answer.error_json();
        assert_eq!((json["error"].as_str(), json["field"].as_str()), (Some(code), field), "{body}: {json}");
    }
    let bad_id = server.post_json("/v1/counts", r#"{"video_ids":["a",""]}"#).json();
    assert_eq!(bad_id["index"], 1);
}

#[test]
fn series_is_zero_filled_per_step() {
    let (_dir, server) = server("");
    let hour = now_ms() / 3_600_000 * 3_600_000 - 3 * 3_600_000;
    let body = json!([
        {"video_id": "v", "ts": hour + 60_000, "value": 2},
        {"video_id": "v", "ts": hour + 2 * 3_600_000},
        {"video_id": "v", "ts": hour + 2 * 3_600_000 + 5},
    ])
    .to_string();
    server.post_events(&body, &[]);
    let answer = server.get(&format!("/v1/series?video_id=v&step=hour&from={hour}&to={}", hour + 3 * 3_600_000)).json();
    let counts: Vec<u64> = answer["points"].as_array().unwrap().iter().map(|p| p["count"].as_u64().unwrap()).collect();
    assert_eq!(counts, [1, 0, 2]);
    assert_eq!(answer["points"][0]["sum"], 2);
    assert_eq!(answer["step"], "hour");
    let minutes = server.get(&format!("/v1/series?video_id=v&step=minute&from={hour}&to={}", hour + 3 * 60_000)).json();
    let counts: Vec<u64> = minutes["points"].as_array().unwrap().iter().map(|p| p["count"].as_u64().unwrap()).collect();
    assert_eq!(counts, [0, 1, 0]);
    let day = server.get("/v1/series?video_id=v&step=day").json();
    assert_eq!(day["points"].as_array().unwrap().len(), 60);
    // The three events straddle midnight UTC when this runs shortly after it. "Today" is
    // the server's last point, not this test's clock, which may already be a day later.
    let points = day["points"].as_array().unwrap();
    let today: jiff::Timestamp = points[59]["t"].as_str().unwrap().parse().unwrap();
    let today = today.as_millisecond();
    let today_count =
        [hour + 60_000, hour + 2 * 3_600_000, hour + 2 * 3_600_000 + 5].iter().filter(|&&ts| ts >= today).count();
    assert_eq!(points[59]["count"], today_count);
    assert_eq!(points[58]["count"], 3 - today_count);
}

#[test]
fn health_readiness_and_metrics() {
    let (_dir, server) = server("");
    assert_eq!(server.get("/healthz").json(), json!({"status": "ok"}));
    assert_eq!(server.get("/readyz").json(), json!({"status": "ready"}));
    let keyed = r#"[{"video_id":"a","event_id":"e"}]"#;
    for _ in 0..2 {
        assert_eq!(server.post_events(keyed, &[("idempotency-key", "k")]).json()["accepted"], 1);
    }
    assert_eq!(server.post_events(keyed, &[]).json()["duplicates"], 1);
    server.post_events(r#"[{"video_id":""}]"#, &[]);
    let metrics = server.get("/metrics").text();
    // Events counted, not answers given: the repeated request adds nothing.
    for line in ["tally_events_accepted_total 1", "tally_events_duplicate_total 1", "tally_events_rejected_total 1"] {
        assert!(metrics.lines().any(|l| l == line), "missing {line} in\n{metrics}");
    }
    for name in [
        "tally_http_request_duration_seconds_bucket{route=\"/v1/events\"",
        "tally_queue_bytes",
        "tally_wal_fsync_seconds_bucket",
        "tally_wal_bytes{partition=\"0\"}",
        "tally_wal_segments",
        "tally_partition_queued_appends",
        "tally_recovery_seconds",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
}

#[test]
fn openapi_document_matches_the_routes() {
    let (_dir, server) = server("");
    let spec = server.get("/v1/openapi.json").json();
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, methods) in spec["paths"].as_object().unwrap() {
        for method in methods
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
        {
            documented.push((method.clone(), path.clone()));
        }
    }
    let mut routes: Vec<(String, String)> =
        tally_server::routes().iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    documented.sort();
    routes.sort();
    assert_eq!(documented, routes, "openapi.json and the router disagree");
    for (method, path) in &documented {
        let answer =
            request(server.address, &method.to_uppercase(), path, &[("content-type", "application/json")], b"{}")
                .unwrap();
        assert!(answer.status != 404 && answer.status != 405, "{method} {path} answered {}", answer.status);
    }
    // Query parameters: the documented ones are exactly those the server accepts, which it
    // lists when it refuses an unknown one.
    let mut checked = Vec::new();
    for (path, methods) in spec["paths"].as_object().unwrap() {
        let Some(operation) = methods.get("get") else { continue };
        let mut documented: Vec<String> = operation["parameters"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|p| match p["$ref"].as_str() {
                Some(reference) => &spec["components"]["parameters"][reference.rsplit('/').next().unwrap()],
                None => p,
            })
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        if documented.is_empty() {
            continue;
        }
        let refused = server.get(&format!("{path}?not_a_parameter=1")).json();
        let message = refused["message"].as_str().unwrap();
        let mut allowed: Vec<String> =
            message.split("allowed: ").nth(1).unwrap().split(", ").map(str::to_owned).collect();
        documented.sort();
        allowed.sort();
        assert_eq!(documented, allowed, "query parameters of GET {path}");
        checked.push(path.as_str());
    }
    checked.sort_unstable();
    assert_eq!(checked, ["/v1/count", "/v1/series", "/v1/stats", "/v1/top", "/v1/uniques"]);
}

#[test]
fn full_dedup_memory_answers_429_with_retry_after_and_counts_nothing() {
    let (_dir, server) = server("partitions = 1\ndedup_entries_max = 3");
    let ids = r#"[{"video_id":"a","event_id":"1"},{"video_id":"a","event_id":"2"},{"video_id":"a","event_id":"3"}]"#;
    assert_eq!(server.post_events(ids, &[]).status, 200);
    let refused = server.post_events(r#"[{"video_id":"a","event_id":"4"}]"#, &[]);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"], "overloaded");
    assert_eq!(server.count("a"), 3);
    // Events without ids need no dedup memory and are still accepted.
    assert_eq!(server.post_events(r#"[{"video_id":"a"}]"#, &[]).status, 200);
    assert_eq!(server.count("a"), 4);
}

/// Many large requests at once against a 1 MiB write queue: some are refused with 429 and
/// `Retry-After`, and exactly the events of the acknowledged ones are counted.
#[test]
fn full_write_queue_answers_429_with_retry_after_and_counts_only_what_was_acknowledged() {
    let (_dir, server) = server("queue_bytes_max = 1048576\npartitions = 2");
    let body: String = serde_json::to_string(
        &(0..20_000).map(|i| json!({"video_id": format!("video-{}", i % 50), "value": 1})).collect::<Vec<_>>(),
    )
    .unwrap();
    let address = server.address;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let (mut accepted, mut refused) = (0u64, Vec::new());
                for _ in 0..25 {
                    let answer = request(
                        address,
                        "POST",
                        "/v1/events",
                        &[("content-type", "application/json")],
                        body.as_bytes(),
                    )
                    .unwrap();
                    match answer.status {
                        200 => accepted += answer.json()["accepted"].as_u64().unwrap(),
                        429 => refused.push(answer),
                        other => panic!("unexpected {other}: {}", answer.text()),
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    let (mut accepted, mut refused) = (0, Vec::new());
    for thread in threads {
        let (a, r) = thread.join().unwrap();
        accepted += a;
        refused.extend(r);
    }
    assert!(!refused.is_empty(), "200 large requests at once never filled a 1 MiB queue");
    for answer in &refused {
        assert_eq!(answer.header("retry-after"), Some("1"));
        assert_eq!(answer.json()["error"], "overloaded");
    }
    let ids: Vec<String> = (0..50).map(|v| format!("video-{v}")).collect();
    let counts = server.post_json("/v1/counts", &json!({ "video_ids": ids }).to_string()).json();
    let counted: u64 = counts["counts"].as_object().unwrap().values().map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(counted, accepted, "{} requests refused", refused.len());
}

/// The body budget is charged by the bytes received: while one large body is still
/// arriving, another request whose bytes do not fit in what is left is refused with 503.
#[test]
fn too_many_bodies_in_flight_answers_503_with_retry_after_and_counts_nothing() {
    use std::io::{Read, Write};
    let (_dir, server) = server("body_bytes_max = 65536\nbody_bytes_in_flight_max = 65536");
    let mut body = br#"[{"video_id":"slow"}]"#.to_vec();
    body.resize(65_530, b' ');
    let mut slow = std::net::TcpStream::connect(server.address).unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\ncontent-type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    // All but 10 bytes: 16 bytes of the budget are left, less than any other body.
    slow.write_all(&body[..65_520]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.get("/metrics").text().lines().any(|l| l == "tally_body_bytes_in_flight 65520") {
        assert!(std::time::Instant::now() < deadline, "the slow body's bytes were never charged");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let refused = server.post_events(r#"[{"video_id":"fast"}]"#, &[]);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("5"));
    assert_eq!(refused.json()["error"], "overloaded");
    slow.write_all(&body[65_520..]).unwrap();
    let mut raw = String::new();
    slow.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!((server.count("slow"), server.count("fast")), (1, 0));
    assert_eq!(server.post_events(r#"[{"video_id":"fast"}]"#, &[]).status, 200, "the budget came back");
}

/// `promtool check metrics` (Debian's `prometheus` package) finds nothing to say about
/// `/metrics` after writes, reads and a refused request: every metric has HELP text and a
/// proper type and name.
#[test]
fn metrics_pass_promtool() {
    let (_dir, server) = server("");
    assert_eq!(server.post_events(r#"[{"video_id":"a"},{"video_id":"b","type":"like"}]"#, &[]).status, 200);
    assert_eq!(server.get("/v1/count?video_id=a").status, 200);
    assert_eq!(server.post_events("[{}]", &[]).status, 400);
    let metrics = server.get("/metrics").text();
    // Counters show from the start, before their first event.
    for line in
        ["tally_writer_stalls_total 0", "tally_log_anomalies_total{kind=\"gap\"} 0", "tally_partition_fenced_total 0"]
    {
        assert!(metrics.lines().any(|l| l == line), "{line} missing:\n{metrics}");
    }
    assert!(metrics.contains(&format!("tally_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{metrics}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is not installed: apt-get install prometheus (as .ci/run does)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && said.trim().is_empty(), "promtool: {said}\n{metrics}");
}

/// A request (method, path, headers, body) and the error it gets (status, code, field).
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str, u16, &'a str, Option<&'a str>);

/// Every error answer follows one contract: JSON (and said to be) with `error` and
/// `message`, the code one the OpenAPI document lists, and one code per kind of mistake on
/// every route: an unknown field is `unknown_field` in any query string or JSON body.
#[test]
fn every_error_is_json_with_a_listed_code_and_one_code_per_mistake() {
    let (_dir, server) = server("");
    let spec = server.get("/v1/openapi.json").json();
    let listed: Vec<&str> = spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    let json_type = [("content-type", "application/json")];
    let cases: [Case; 18] = [
        ("GET", "/v1/nothing", &[], "", 404, "not_found", None),
        ("GET", "/favicon.ico", &[], "", 404, "not_found", None),
        ("DELETE", "/v1/events", &[], "", 405, "method_not_allowed", None),
        ("POST", "/v1/count", &json_type, "{}", 405, "method_not_allowed", None),
        ("PUT", "/", &[], "", 405, "method_not_allowed", None),
        ("POST", "/v1/events", &[("content-type", "text/html")], "{}", 415, "unsupported_media_type", None),
        (
            "POST",
            "/v1/events",
            &[("content-type", "application/json"), ("content-encoding", "br")],
            "{}",
            415,
            "unsupported_content_encoding",
            None,
        ),
        ("GET", "/v1/count?video_id=v&colour=1", &[], "", 400, "unknown_field", Some("colour")),
        ("GET", "/v1/series?video_id=v&colour=1", &[], "", 400, "unknown_field", Some("colour")),
        ("GET", "/v1/top?colour=1", &[], "", 400, "unknown_field", Some("colour")),
        ("GET", "/v1/uniques?video_id=v&colour=1", &[], "", 400, "unknown_field", Some("colour")),
        ("GET", "/v1/stats?video_id=v&colour=1", &[], "", 400, "unknown_field", Some("colour")),
        ("POST", "/v1/counts?colour=1", &json_type, r#"{"video_ids":["a"]}"#, 400, "unknown_field", Some("colour")),
        ("POST", "/v1/counts", &json_type, r#"{"video_ids":["a"],"colour":1}"#, 400, "unknown_field", Some("colour")),
        ("POST", "/v1/events?colour=1", &json_type, r#"{"video_id":"a"}"#, 400, "unknown_field", Some("colour")),
        ("POST", "/v1/events", &json_type, r#"{"video_id":"a","colour":1}"#, 400, "invalid_events", None),
        ("GET", "/v1/count?video_id=v&video_id=w", &[], "", 400, "duplicate_field", Some("video_id")),
        ("GET", "/v1/stats", &[], "", 400, "missing_field", Some("video_id")),
    ];
    for (method, path, headers, body, status, code, field) in cases {
        let answer = request(server.address, method, path, headers, body.as_bytes()).unwrap();
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.text());
        let json = answer.error_json();
        assert_eq!((json["error"].as_str(), json["field"].as_str()), (Some(code), field), "{method} {path}: {json}");
        assert!(listed.contains(&code), "{code} is not listed in openapi.json");
    }
    // Inside a batch, the unknown field is listed with the same code.
    let batch = server.post_events(r#"{"video_id":"a","colour":1}"#, &[]).error_json();
    assert_eq!(
        batch["errors"],
        json!([{"index": 0, "field": "colour", "code": "unknown_field",
        "reason": "unknown field; allowed: video_id, type, ts, value, event_id, viewer_id"}])
    );
    // The dashboard and its assets are still pages, not errors.
    for (path, content_type) in
        [("/", "text/html"), ("/ui/uplot.js", "text/javascript"), ("/v1/tally.js", "text/javascript")]
    {
        let answer = server.get(path);
        assert_eq!(answer.status, 200, "{path}");
        assert!(answer.header("content-type").unwrap().starts_with(content_type), "{path}");
    }
    assert_eq!(server.count("a"), 0);
}

/// Epoch seconds where tally takes milliseconds, and a `+` that a query string turned into
/// a space, are answered with a hint naming the value meant.
#[test]
fn common_slips_get_a_hint_naming_the_value_meant() {
    let (_dir, server) = server("");
    // 2026-01-01T00:00:00Z and the next day, in seconds.
    let (day, next_day) = (1_767_225_600i64, 1_767_312_000i64);
    let events = server.post_events(&json!([{"video_id": "a", "ts": day}]).to_string(), &[]).error_json();
    assert_eq!(
        (events["errors"][0]["field"].as_str(), events["errors"][0]["code"].as_str()),
        (Some("ts"), Some("invalid_field"))
    );
    assert_eq!(
        events["errors"][0]["hint"],
        "ts 1767225600 looks like epoch seconds (2026-01-01T00:00:00Z); tally takes epoch milliseconds: 1767225600000"
    );
    let range = server.get(&format!("/v1/count?video_id=a&from={}&to={next_day}", day * 1000)).error_json();
    assert_eq!(range["error"], "invalid_range");
    assert_eq!(
        range["hint"],
        "to 1767312000 looks like epoch seconds (2026-01-02T00:00:00Z); tally takes epoch milliseconds: 1767312000000"
    );
    let series = server.get(&format!("/v1/series?video_id=a&from={day}&to={}", next_day * 1000)).error_json();
    assert_eq!(series["error"], "too_many_points");
    assert!(series["hint"].as_str().unwrap().starts_with("from 1767225600 looks like epoch seconds"), "{series}");
    let counts =
        server.post_json("/v1/counts", &json!({"video_ids": ["a"], "from": day * 1000, "to": next_day}).to_string());
    assert!(counts.error_json()["hint"].as_str().unwrap().contains("1767312000000"), "{}", counts.text());

    let plus = server.get("/v1/count?video_id=a&from=2026-01-01T00:00:00+01:00").error_json();
    assert_eq!((plus["error"].as_str(), plus["field"].as_str()), (Some("invalid_field"), Some("from")));
    assert_eq!(
        plus["hint"],
        "a + in a query string arrives as a space; percent-encode it as %2B: from=2026-01-01T00:00:00%2B01:00"
    );
    let encoded = server.get("/v1/count?video_id=a&from=2026-01-01T00:00:00%2B01:00");
    assert_eq!(encoded.status, 200, "the hinted form is accepted: {}", encoded.text());
    assert_eq!(encoded.json()["from"], "2025-12-31T23:00:00Z");
    let zone = server.get("/v1/count?video_id=a&tz=Etc/GMT+5").error_json();
    assert_eq!(
        (zone["field"].as_str(), zone["hint"].as_str()),
        (Some("tz"), Some("a + in a query string arrives as a space; percent-encode it as %2B: tz=Etc/GMT%2B5"))
    );
    assert_eq!(server.get("/v1/count?video_id=a&tz=Etc/GMT%2B5").status, 200);
    let offset = server.get("/v1/series?video_id=a&step=day&tz=+05:30").error_json();
    let hint = offset["hint"].as_str().unwrap();
    assert!(hint.contains("%2B") && hint.contains("+05:30") && hint.contains("IANA time zone name"), "{hint}");
}
