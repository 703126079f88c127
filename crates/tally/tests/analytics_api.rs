//! Top-K, distinct viewers, per-type stats, retention tiers and local-time days, against
//! the real server on port 0.

mod common;

use common::{Server, now_ms, server};
use serde_json::{Value, json};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

fn post(server: &Server, events: Value) {
    let answer = server.post_events(&events.to_string(), &[]);
    assert_eq!(answer.status, 200, "{}", answer.text());
}

fn ok(server: &Server, path: &str) -> Value {
    let answer = server.get(path);
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    answer.json()
}

fn items(answer: &Value) -> Vec<(String, u64)> {
    answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["video_id"].as_str().unwrap().to_owned(), i["count"].as_u64().unwrap()))
        .collect()
}

#[test]
fn top_lists_the_most_viewed_videos_of_the_range_in_order_and_says_it_is_exact() {
    // A fast flush, so the answer mixes stored sketches with events still in memory.
    let (_dir, server) = server("flush_interval = \"50ms\"");
    let now = now_ms();
    let mut events = Vec::new();
    for (video, n) in [("a", 5), ("b", 9), ("c", 5), ("d", 1)] {
        for _ in 0..n {
            events.push(json!({"video_id": video, "ts": now - 60_000}));
        }
    }
    events.push(json!({"video_id": "z", "ts": now - 3 * HOUR_MS}));
    events.push(json!({"video_id": "a", "type": "like", "ts": now}));
    post(&server, json!(events));
    std::thread::sleep(std::time::Duration::from_millis(200));
    post(&server, json!([{"video_id": "d", "ts": now}]));

    let top = ok(&server, "/v1/top?k=3");
    assert_eq!(items(&top), [("b".into(), 9), ("a".into(), 5), ("c".into(), 5)], "ties by video id");
    assert_eq!((top["exact"].clone(), top["k"].clone(), top["type"].clone()), (json!(true), json!(3), json!("view")));
    let exact = ok(&server, "/v1/top?k=3&exact=true");
    assert_eq!(items(&exact), items(&top));
    let day = ok(&server, &format!("/v1/top?k=10&from={}", now - DAY_MS));
    assert_eq!(items(&day).len(), 5, "the last day includes z: {day}");
    let likes = ok(&server, "/v1/top?type=like");
    assert_eq!(items(&likes), [("a".into(), 1)]);
    for (bad, code, field) in [
        ("k=0", "invalid_field", "k"),
        ("k=1001", "invalid_field", "k"),
        ("k=x", "invalid_field", "k"),
        ("exact=yes", "invalid_field", "exact"),
        ("type=BAD", "invalid_field", "type"),
        ("colour=1", "unknown_field", "colour"),
    ] {
        let answer = server.get(&format!("/v1/top?{bad}"));
        let json = answer.json();
        assert_eq!(
            (answer.status, json["error"].as_str(), json["field"].as_str()),
            (400, Some(code), Some(field)),
            "{bad}"
        );
    }
}

#[test]
fn uniques_counts_distinct_viewers_across_minutes_and_requests() {
    let (_dir, server) = server("flush_interval = \"50ms\"");
    let now = now_ms();
    for round in 0..3 {
        // 300 distinct viewers, each seen in all three rounds and several minutes.
        let events: Vec<Value> = (0..300)
            .map(|i| json!({"video_id": "v", "viewer_id": format!("viewer-{i}"), "ts": now - (i % 5) * 60_000 - round}))
            .collect();
        post(&server, json!(events));
    }
    post(&server, json!([{"video_id": "v"}]));
    let answer = ok(&server, &format!("/v1/uniques?video_id=v&from={}", now - HOUR_MS));
    assert_eq!(answer["uniques"], 300, "{answer}");
    assert!(answer["relative_error"].as_f64().unwrap() < 0.015);
    let one_minute = ok(&server, &format!("/v1/uniques?video_id=v&from={}&to={}", now - 60_000, now + 1));
    assert!(one_minute["uniques"].as_u64().unwrap() <= 120, "{one_minute}");
    let nobody = ok(&server, "/v1/uniques?video_id=other");
    assert_eq!(nobody["uniques"], 0);
    assert_eq!(server.get("/v1/uniques").status, 400, "video_id is required");
}

#[test]
fn stats_reports_every_event_type_of_a_video_with_count_sum_and_average() {
    let (_dir, server) = server("");
    post(
        &server,
        json!([
            {"video_id": "v"}, {"video_id": "v"}, {"video_id": "v", "type": "like"},
            {"video_id": "v", "type": "watch_ms", "value": 1000}, {"video_id": "v", "type": "watch_ms", "value": 4000},
            {"video_id": "other", "type": "share"},
        ]),
    );
    let answer = ok(&server, "/v1/stats?video_id=v");
    assert_eq!(
        answer["types"],
        json!({
            "view": {"count": 2, "sum": 0, "avg": 0.0},
            "like": {"count": 1, "sum": 0, "avg": 0.0},
            "watch_ms": {"count": 2, "sum": 5000, "avg": 2500.0},
        })
    );
    let empty = ok(&server, &format!("/v1/stats?video_id=v&to={}", now_ms() - DAY_MS));
    assert_eq!(empty["types"], json!({}));
}

#[test]
fn local_days_follow_daylight_saving_and_half_hour_zones() {
    // The October 2026 days below must stay writable and in the hour tier whenever this
    // runs: the longest lateness allowed (100 years) and hour buckets kept forever.
    let (_dir, server) = server("lateness_max = \"36500d\"\nhour_retention_days = 0");
    // Berlin left summer time on 2026-10-25: that day has 25 hours.
    post(
        &server,
        json!([
            {"video_id": "v", "ts": "2026-10-24T21:30:00Z"}, // 24th 23:30 CEST
            {"video_id": "v", "ts": "2026-10-24T22:30:00Z"}, // 25th 00:30 CEST
            {"video_id": "v", "ts": "2026-10-25T22:30:00Z"}, // 25th 23:30 CET
            {"video_id": "v", "ts": "2026-10-25T23:30:00Z"}, // 26th 00:30 CET
        ]),
    );
    let series = ok(&server, "/v1/series?video_id=v&step=day&tz=Europe/Berlin&from=2026-10-24&to=2026-10-27");
    let points: Vec<(String, u64)> = series["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["t"].as_str().unwrap().to_owned(), p["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        points,
        [
            ("2026-10-24T00:00:00+02:00".into(), 1),
            ("2026-10-25T00:00:00+02:00".into(), 2),
            ("2026-10-26T00:00:00+01:00".into(), 1)
        ]
    );
    assert_eq!((series["resolution"].clone(), series["exact_boundaries"].clone()), (json!("hour"), json!(true)));
    let count = ok(&server, "/v1/count?video_id=v&from=2026-10-25&to=2026-10-26&tz=Europe/Berlin");
    assert_eq!((count["count"].clone(), count["from"].clone()), (json!(2), json!("2026-10-24T22:00:00Z")));
    let utc = ok(&server, "/v1/count?video_id=v&from=2026-10-25&to=2026-10-26");
    assert_eq!(utc["count"], 2, "bare dates without tz are UTC days: 22:30 and 22:30");
    let top = ok(&server, "/v1/top?from=2026-10-25&to=2026-10-26&tz=Europe/Berlin&exact=true");
    assert_eq!(items(&top), [("v".into(), 2)]);

    // Kolkata is UTC+05:30: its days start at 18:30 UTC, read from minute buckets while
    // they are kept (two days ago), rounded to the hour once they are not (the October days).
    let day = (now_ms() - 2 * DAY_MS) / DAY_MS * DAY_MS;
    post(
        &server,
        json!([
            {"video_id": "k", "ts": day + 18 * HOUR_MS + 15 * 60_000}, // 23:45 IST
            {"video_id": "k", "ts": day + 18 * HOUR_MS + 45 * 60_000}, // 00:15 IST, next day
        ]),
    );
    let from = day - DAY_MS;
    let series =
        ok(&server, &format!("/v1/series?video_id=k&step=day&tz=Asia/Kolkata&from={from}&to={}", day + 2 * DAY_MS));
    let counts: Vec<u64> = series["points"].as_array().unwrap().iter().map(|p| p["count"].as_u64().unwrap()).collect();
    assert_eq!(counts.iter().sum::<u64>(), 2);
    assert!(counts.windows(2).any(|w| w == [1, 1]), "{series}");
    assert_eq!((series["resolution"].clone(), series["exact_boundaries"].clone()), (json!("minute"), json!(true)));
    let old = ok(&server, "/v1/series?video_id=v&step=day&tz=Asia/Kolkata&from=2026-10-24&to=2026-10-26");
    assert_eq!((old["resolution"].clone(), old["exact_boundaries"].clone()), (json!("hour"), json!(false)));
    assert_eq!(server.get("/v1/series?video_id=v&step=day&tz=Mars/Olympus").status, 400);
}

#[test]
fn events_older_than_minute_retention_count_in_hours_and_days_and_queries_say_so() {
    let (_dir, server) = server("lateness_max = \"30d\"\nflush_interval = \"50ms\"");
    let old = now_ms() - 10 * DAY_MS;
    let old_hour = old / HOUR_MS * HOUR_MS;
    post(&server, json!([{"video_id": "v", "ts": old_hour + 17 * 60_000 + 5}, {"video_id": "v", "ts": now_ms()}]));
    std::thread::sleep(std::time::Duration::from_millis(300)); // flushed
    // A minute-precise range 10 days ago is answered from the hour tier, widened.
    let from = old_hour + 10 * 60_000;
    let count = ok(&server, &format!("/v1/count?video_id=v&from={from}&to={}", from + 60_000));
    assert_eq!(count["count"], 1, "{count}");
    assert_eq!(count["resolution"], "hour");
    assert_eq!(count["from"], json!(jiff_like(old_hour)));
    // A recent range stays at minute resolution.
    let recent = ok(&server, &format!("/v1/count?video_id=v&from={}", now_ms() - HOUR_MS));
    assert_eq!((recent["count"].clone(), recent["resolution"].clone()), (json!(1), json!("minute")));
    // A minute series there coarsens to hours.
    let series = ok(&server, &format!("/v1/series?video_id=v&step=minute&from={from}&to={}", from + 120_000));
    assert_eq!(series["step"], "hour");
    assert_eq!(series["points"][0]["count"], 1);
    let all = ok(&server, "/v1/count?video_id=v");
    assert_eq!(all["count"], 2);
}

/// RFC 3339 of an epoch-ms instant, as the server writes it.
fn jiff_like(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
}
