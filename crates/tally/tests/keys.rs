//! API keys against the real binary: `tally keys` makes them, a server reading the file
//! enforces each scope on each route, a revoked key stops working at the next request, a
//! rate-limited key's accepted events are counted exactly, a write key bound to origins and
//! video-id prefixes keeps to them (and its origins may call the API cross-origin), and one
//! key cannot claim another's Idempotency-Keys.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Answer, Server, create_key, request, start, tally_binary};

fn keys(file: &Path, args: &[&str]) -> String {
    let output = Command::new(tally_binary()).arg("keys").args(args).arg("--file").arg(file).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn call(server: &Server, method: &str, path: &str, key: Option<&str>, body: &str) -> Answer {
    let bearer = key.map(|key| format!("Bearer {key}"));
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(bearer.as_deref().map(|b| ("authorization", b)));
    request(server.address, method, path, &headers, body.as_bytes()).unwrap()
}

/// A server requiring keys from `file`.
fn server(dir: &Path, file: &Path) -> Server {
    start(&dir.join("data"), &format!("keys_file = {:?}\nkeys_required = true\n", file.to_str().unwrap()))
}

const ROUTES: [(&str, &str, &str, &str); 8] = [
    ("POST", "/v1/events", r#"{"video_id":"a"}"#, "write"),
    ("GET", "/v1/count?video_id=a", "", "read"),
    ("POST", "/v1/counts", r#"{"video_ids":["a"]}"#, "read"),
    ("GET", "/v1/series?video_id=a&step=day&from=2026-10-24&to=2026-10-27", "", "read"),
    ("GET", "/v1/top?k=3", "", "read"),
    ("GET", "/v1/uniques?video_id=a", "", "read"),
    ("GET", "/v1/stats?video_id=a", "", "read"),
    ("GET", "/metrics", "", "admin"),
];

#[test]
fn each_scope_is_allowed_and_refused_on_each_route_and_a_revoked_key_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let scoped: Vec<(&str, String)> =
        ["write", "read", "admin"].into_iter().map(|scope| (scope, create_key(&file, &["--scope", scope]))).collect();
    let server = server(dir.path(), &file);
    for (method, path, body, needs) in ROUTES {
        let none = call(&server, method, path, None, body);
        assert_eq!((none.status, none.json()["error"].as_str()), (401, Some("key_required")), "{path}");
        assert_eq!(none.header("www-authenticate"), Some("Bearer realm=\"tally\""));
        let wrong = call(&server, method, path, Some("tally_k000000000000_00"), body);
        assert_eq!((wrong.status, wrong.json()["error"].as_str()), (401, Some("invalid_key")), "{path}");
        let headers = [("content-type", "application/json"), ("authorization", "Basic dTpw")];
        let basic = request(server.address, method, path, &headers, body.as_bytes()).unwrap();
        assert_eq!(basic.status, 401, "{path}: another scheme is no key");
        for (scope, key) in &scoped {
            let answer = call(&server, method, path, Some(key), body);
            if *scope == needs {
                assert_eq!(answer.status, 200, "{scope} on {method} {path}: {}", answer.text());
            } else {
                assert_eq!(answer.status, 403, "{scope} on {method} {path}: {}", answer.text());
                assert_eq!(answer.json()["error"], "scope_missing");
            }
        }
    }
    for path in ["/healthz", "/readyz", "/v1/openapi.json", "/v1/tally.js"] {
        assert_eq!(call(&server, "GET", path, None, "").status, 200, "{path} needs no key");
    }
    // The beacon's way: the write key in the query, on ingest only.
    let write = &scoped[0].1;
    let path = format!("/v1/events?key={write}");
    let beacon = request(server.address, "POST", &path, &[("content-type", "text/plain")], br#"{"video_id":"q"}"#);
    assert_eq!(beacon.unwrap().status, 200);
    let read = &scoped[1].1;
    assert_eq!(call(&server, "GET", &format!("/v1/count?video_id=q&key={read}"), None, "").status, 401);
    assert_eq!(call(&server, "GET", "/v1/count?video_id=q", Some(read), "").json()["count"], 1);

    // Revoked: refused from the next request on, with no restart.
    let listed = keys(&file, &["list", "--json"]);
    let ids: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(ids.len(), 3);
    assert!(!listed.contains("secret"), "{listed}");
    let write_id = ids[0]["id"].as_str().unwrap();
    assert!(write.contains(write_id));
    keys(&file, &["revoke", write_id]);
    let revoked = call(&server, "POST", "/v1/events", Some(write), r#"{"video_id":"a"}"#);
    assert_eq!((revoked.status, revoked.json()["error"].as_str()), (401, Some("invalid_key")));
    // A key created now works at once.
    let fresh = create_key(&file, &["--scope", "write"]);
    assert_eq!(call(&server, "POST", "/v1/events", Some(&fresh), r#"{"video_id":"a"}"#).status, 200);
}

#[test]
fn a_rate_limited_key_counts_exactly_what_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let limited = create_key(&file, &["--scope", "write,read", "--events-per-second", "50"]);
    let server = server(dir.path(), &file);
    let body = format!("[{}]", [r#"{"video_id":"limited"}"#; 10].join(","));
    let (mut accepted, mut limited_answers) = (0, 0);
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(3) {
        let answer = call(&server, "POST", "/v1/events", Some(&limited), &body);
        match answer.status {
            200 => accepted += answer.json()["accepted"].as_u64().unwrap(),
            429 => {
                limited_answers += 1;
                assert_eq!(answer.json()["error"], "rate_limited");
                assert!(answer.header("retry-after").is_some_and(|s| s.parse::<u32>().unwrap() >= 1));
            }
            status => panic!("{status}: {}", answer.text()),
        }
    }
    assert!(limited_answers > 0, "the limit never applied");
    assert!(accepted >= 50, "{accepted}");
    assert_eq!(call(&server, "GET", "/v1/count?video_id=limited", Some(&limited), "").json()["count"], accepted);
    // A batch larger than a second's worth can never pass: 413, not a retry loop.
    let big = format!("[{}]", [r#"{"video_id":"limited"}"#; 51].join(","));
    let refused = call(&server, "POST", "/v1/events", Some(&limited), &big);
    assert_eq!((refused.status, refused.json()["error"].as_str()), (413, Some("too_many_events_for_key")));
}

#[test]
fn a_page_key_keeps_to_its_origins_and_prefixes_and_idempotency_keys_are_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let page = create_key(&file, &["--scope", "write", "--origin", "https://shop.example", "--video-prefix", "shop-"]);
    let other = create_key(&file, &["--scope", "write,read"]);
    let server = server(dir.path(), &file);
    let post = |key: &str, origin: Option<&str>, body: &str, idempotency: Option<&str>| {
        let bearer = format!("Bearer {key}");
        let mut headers = vec![("content-type", "application/json"), ("authorization", bearer.as_str())];
        headers.extend(origin.map(|o| ("origin", o)));
        headers.extend(idempotency.map(|k| ("idempotency-key", k)));
        request(server.address, "POST", "/v1/events", &headers, body.as_bytes()).unwrap()
    };
    let shop = Some("https://shop.example");
    let posted = post(&page, shop, r#"{"video_id":"shop-1"}"#, None);
    assert_eq!(posted.status, 200);
    // The key's origins are CORS origins too (the server lists none itself).
    assert_eq!(posted.header("access-control-allow-origin"), shop);
    let preflight = |origin: &str| {
        let headers = [("origin", origin), ("access-control-request-method", "POST")];
        request(server.address, "OPTIONS", "/v1/events", &headers, b"").unwrap()
    };
    let allowed = preflight("https://shop.example");
    assert_eq!((allowed.status, allowed.header("access-control-allow-origin")), (204, shop));
    assert_eq!(preflight("https://evil.example").status, 403);
    let elsewhere = post(&page, Some("https://evil.example"), r#"{"video_id":"shop-1"}"#, None);
    assert_eq!((elsewhere.status, elsewhere.json()["error"].as_str()), (403, Some("origin_not_allowed")));
    assert_eq!(post(&page, None, r#"{"video_id":"shop-1"}"#, None).status, 403, "no Origin, no page");
    let foreign = post(&page, shop, r#"[{"video_id":"shop-2"},{"video_id":"news-1"}]"#, None);
    assert_eq!((foreign.status, foreign.json()["error"].as_str()), (403, Some("video_not_allowed")));

    // The page key used an Idempotency-Key first; the other key's request with the same
    // key and another body is its own, and counts.
    assert_eq!(post(&page, shop, r#"{"video_id":"shop-3"}"#, Some("batch-1")).status, 200);
    let second = post(&other, None, r#"{"video_id":"shop-4"}"#, Some("batch-1"));
    assert_eq!(second.status, 200, "{}", second.text());
    let count = |video: &str| call(&server, "GET", &format!("/v1/count?video_id={video}"), Some(&other), "").json();
    assert_eq!(count("shop-1")["count"], 1);
    assert_eq!(count("shop-2")["count"], 0, "a refused request counts nothing");
    assert_eq!(count("shop-3")["count"], 1);
    assert_eq!(count("shop-4")["count"], 1);
    // Within one key, the same Idempotency-Key with another body is still refused.
    assert_eq!(post(&other, None, r#"{"video_id":"shop-5"}"#, Some("batch-1")).status, 422);
}

#[test]
fn keys_are_optional_on_loopback_and_required_elsewhere_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let read = create_key(&file, &["--scope", "read"]);
    let config = format!("keys_file = {:?}\n", file.to_str().unwrap());
    let open = start(&dir.path().join("open"), &config);
    assert_eq!(call(&open, "POST", "/v1/events", None, r#"{"video_id":"a"}"#).status, 200);
    // A key that is given is checked all the same.
    assert_eq!(call(&open, "POST", "/v1/events", Some(&read), r#"{"video_id":"a"}"#).status, 403);
    assert_eq!(call(&open, "GET", "/v1/count?video_id=a", Some("tally_kx_y"), "").status, 401);
    assert_eq!(call(&open, "GET", "/v1/count?video_id=a", Some(&read), "").json()["count"], 1);
    let refused = Command::new(tally_binary())
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("public"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("keys_file"), "{stderr}");
}
