//! Bodies as browsers and compressing clients send them: JSON as `text/plain` (what
//! `navigator.sendBeacon` sends), and gzip, inflated under the body limit so that a
//! decompression bomb is refused whole.

mod common;

use std::io::Write;

use common::{request, server};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn post(server: &common::Server, headers: &[(&str, &str)], body: &[u8]) -> common::Answer {
    request(server.address, "POST", "/v1/events", headers, body).unwrap()
}

#[test]
fn a_beacon_body_is_json_sent_as_text_plain() {
    let (_dir, server) = server("");
    let body = br#"[{"video_id":"a","event_id":"e1"},{"video_id":"a","event_id":"e2"}]"#;
    let answer = post(&server, &[("content-type", "text/plain;charset=UTF-8")], body);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["accepted"], 2);
    // A beacon resent (a reload, a retry) counts nothing twice: its events carry ids.
    let again = post(&server, &[("content-type", "text/plain")], body);
    assert_eq!((again.json()["accepted"].as_u64(), again.json()["duplicates"].as_u64()), (Some(0), Some(2)));
    assert_eq!(server.count("a"), 2);
}

#[test]
fn gzip_bodies_are_inflated_and_counted() {
    let (_dir, server) = server("");
    let events: Vec<String> = (0..1000).map(|i| format!(r#"{{"video_id":"g","event_id":"{i}"}}"#)).collect();
    let json = format!("[{}]", events.join(","));
    let ndjson = (0..10).map(|_| r#"{"video_id":"n"}"#).collect::<Vec<_>>().join("\n");
    let cases =
        [("application/json", json.as_bytes(), "g", 1000), ("application/x-ndjson", ndjson.as_bytes(), "n", 10)];
    for (content_type, body, video, n) in cases {
        let answer = post(&server, &[("content-type", content_type), ("content-encoding", "gzip")], &gzip(body));
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(server.count(video), n);
    }
}

#[test]
fn a_decompression_bomb_is_413_and_counts_nothing() {
    let (_dir, server) = server("body_bytes_max = 1048576");
    // 1,000 events padded with 20 MB of spaces: 20 KB on the wire, 20 times the limit inflated.
    let mut bomb = String::from("[");
    bomb.push_str(&(0..1000).map(|_| r#"{"video_id":"bomb"}"#).collect::<Vec<_>>().join(","));
    bomb.push_str(&" ".repeat(20 << 20));
    bomb.push(']');
    let compressed = gzip(bomb.as_bytes());
    assert!(compressed.len() < 1 << 20, "the compressed body is under the limit: {}", compressed.len());
    let answer = post(&server, &[("content-type", "application/json"), ("content-encoding", "gzip")], &compressed);
    assert_eq!(answer.status, 413, "{}", answer.text());
    assert_eq!(answer.json()["error"], "body_too_large");
    assert_eq!(answer.json()["limit_bytes"], 1_048_576);
    assert_eq!(server.count("bomb"), 0);
    // The budget it was charged is back: an ordinary request goes through.
    assert_eq!(post(&server, &[("content-type", "application/json")], br#"{"video_id":"after"}"#).status, 200);
}

#[test]
fn unknown_encodings_and_broken_gzip_are_refused_and_count_nothing() {
    let (_dir, server) = server("");
    let json = br#"{"video_id":"x"}"#;
    let answer = post(&server, &[("content-type", "application/json"), ("content-encoding", "br")], json);
    assert_eq!(answer.status, 415, "{}", answer.text());
    assert_eq!(answer.json()["error"], "unsupported_content_encoding");
    let mut broken = gzip(json);
    let middle = broken.len() / 2;
    broken[middle] ^= 0xff;
    broken.truncate(broken.len() - 4);
    let answer = post(&server, &[("content-type", "application/json"), ("content-encoding", "gzip")], &broken);
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(answer.json()["error"], "invalid_gzip");
    assert_eq!(server.count("x"), 0);
}

fn header<'a>(answer: &'a common::Answer, name: &str) -> Option<&'a str> {
    answer.header(name)
}

fn preflight(server: &common::Server, origin: &str) -> common::Answer {
    let headers = [
        ("origin", origin),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type, idempotency-key"),
    ];
    request(server.address, "OPTIONS", "/v1/events", &headers, b"").unwrap()
}

#[test]
fn pages_of_allowed_origins_may_call_the_api_and_read_its_answers() {
    let (_dir, server) = server(r#"cors_origins = ["https://shop.example"]"#);
    let answer = preflight(&server, "https://shop.example");
    assert_eq!(answer.status, 204);
    assert_eq!(header(&answer, "access-control-allow-origin"), Some("https://shop.example"));
    assert!(header(&answer, "access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    assert!(header(&answer, "access-control-allow-headers").is_some_and(|h| h.contains("idempotency-key")));

    let refused = preflight(&server, "https://evil.example");
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"], "origin_not_allowed");
    assert_eq!(header(&refused, "access-control-allow-origin"), None);

    let headers = [("content-type", "application/json"), ("origin", "https://shop.example")];
    let posted = post(&server, &headers, br#"{"video_id":"c"}"#);
    assert_eq!(posted.status, 200);
    assert_eq!(header(&posted, "access-control-allow-origin"), Some("https://shop.example"));
    assert_eq!(header(&posted, "access-control-expose-headers"), Some("retry-after"));
    let read = request(server.address, "GET", "/v1/count?video_id=c", &[("origin", "https://shop.example")], b"");
    assert_eq!(header(&read.unwrap(), "access-control-allow-origin"), Some("https://shop.example"));

    // Another origin's page gets no CORS headers (its browser hides the answer).
    let other = post(&server, &[("content-type", "application/json"), ("origin", "https://evil.example")], b"{}");
    assert_eq!(header(&other, "access-control-allow-origin"), None);
}

#[test]
fn without_cors_origins_no_origin_is_allowed_and_any_origin_with_a_star() {
    let (_dir, closed) = server("");
    let refused = preflight(&closed, "https://shop.example");
    assert_eq!(refused.status, 405, "no CORS at all: OPTIONS is not a method of the API");
    assert_eq!(header(&refused, "access-control-allow-origin"), None);
    let (_dir2, open) = server(r#"cors_origins = ["*"]"#);
    let answer = preflight(&open, "https://anywhere.example");
    assert_eq!(answer.status, 204);
    assert_eq!(header(&answer, "access-control-allow-origin"), Some("*"));
}

#[test]
fn the_beacon_script_is_served_cached_and_gzipped() {
    let (_dir, server) = server("");
    let script = server.get("/v1/tally.js");
    assert_eq!(script.status, 200);
    assert_eq!(header(&script, "content-type"), Some("text/javascript; charset=utf-8"));
    assert!(script.text().contains("navigator.sendBeacon"), "{}", script.text());
    let etag = header(&script, "etag").expect("an ETag").to_string();
    let again = request(server.address, "GET", "/v1/tally.js", &[("if-none-match", &etag)], b"").unwrap();
    assert_eq!(again.status, 304);
    let zipped = request(server.address, "GET", "/v1/tally.js", &[("accept-encoding", "gzip")], b"").unwrap();
    assert_eq!(header(&zipped, "content-encoding"), Some("gzip"));
    assert!(zipped.body.len() < script.body.len() / 2, "{} of {} bytes", zipped.body.len(), script.body.len());
}
