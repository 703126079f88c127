//! Stop the server again and again under concurrent load, by SIGKILL and by SIGTERM in
//! turn; retry every unanswered request with the same body (and key, when it had one); at
//! the end the counts must equal exactly the events of the ledger: nothing acknowledged
//! lost, nothing counted twice. After each restart, requests acknowledged before the stop
//! are repeated with their keys: they must be answered exactly as the first time.
//!
//! Half the requests carry an Idempotency-Key; the other half carry none, but each of their
//! events has an event_id, so their retries are deduplicated event by event. The flush
//! interval is short, so kills land during flushes and checkpoints too.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, request, start};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const CONFIG: &str = "flush_interval = \"20ms\"\nsegment_bytes_max = 65536\npartitions = 4";
const ROUNDS: usize = 6;
const CLIENTS: usize = 4;
const VIDEOS: u32 = 40;
/// Far above the documented bound at this load (drain plus one small flush).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Pending {
    body: String,
    key: Option<String>,
}

#[derive(Default)]
struct Ledger {
    /// Events per video of every request generated; each is retried until acknowledged.
    expected: BTreeMap<String, u64>,
    unanswered: Vec<Pending>,
    acknowledged_requests: u64,
    /// Keyed requests acknowledged since the last stop, with their answers.
    acknowledged_keyed: Vec<(Pending, serde_json::Value)>,
}

fn post(address: SocketAddr, pending: &Pending) -> std::io::Result<common::Answer> {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = &pending.key {
        headers.push(("idempotency-key", key));
    }
    request(address, "POST", "/v1/events", &headers, pending.body.as_bytes())
}

fn client(
    address: SocketAddr,
    seed: u64,
    client_id: usize,
    round: usize,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sequence = 0;
    while !stop.load(Ordering::Relaxed) {
        let keyed = rng.random_bool(0.5);
        let events: Vec<String> =
            (0..rng.random_range(1..40)).map(|_| format!("v{}", rng.random_range(0..VIDEOS))).collect();
        let body = serde_json::to_string(
            &events
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if keyed {
                        serde_json::json!({ "video_id": v })
                    } else {
                        serde_json::json!({ "video_id": v, "event_id": format!("{round}-{client_id}-{sequence}-{i}") })
                    }
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let pending = Pending { body, key: keyed.then(|| format!("key-{round}-{client_id}-{sequence}")) };
        sequence += 1;
        {
            let mut ledger = ledger.lock().unwrap();
            for v in &events {
                *ledger.expected.entry(v.clone()).or_default() += 1;
            }
        }
        match post(address, &pending) {
            Ok(answer) if answer.status == 200 => {
                let outcome = answer.json();
                assert_eq!(outcome["accepted"].as_u64().unwrap(), events.len() as u64, "fresh events are all new");
                let mut ledger = ledger.lock().unwrap();
                ledger.acknowledged_requests += 1;
                if pending.key.is_some() {
                    ledger.acknowledged_keyed.push((pending, outcome));
                }
            }
            Ok(answer) if answer.status == 503 || answer.status == 429 => {
                ledger.lock().unwrap().unanswered.push(pending)
            }
            Ok(answer) => panic!("unexpected answer {}: {}", answer.status, answer.text()),
            Err(_) => {
                ledger.lock().unwrap().unanswered.push(pending);
                return; // the server is gone
            }
        }
    }
}

fn retry_unanswered(server: &Server, ledger: &Mutex<Ledger>) {
    let unanswered = std::mem::take(&mut ledger.lock().unwrap().unanswered);
    for pending in unanswered {
        loop {
            match post(server.address, &pending) {
                Ok(answer) if answer.status == 200 => {
                    let outcome = answer.json();
                    let total = outcome["accepted"].as_u64().unwrap() + outcome["duplicates"].as_u64().unwrap();
                    if pending.key.is_none() {
                        let events =
                            serde_json::from_str::<serde_json::Value>(&pending.body).unwrap().as_array().unwrap().len();
                        assert_eq!(total, events as u64, "every event is either new or a duplicate");
                    }
                    break;
                }
                Ok(answer) if answer.status == 503 || answer.status == 429 => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(answer) => panic!("retry got {}: {}", answer.status, answer.text()),
                Err(error) => panic!("retry failed: {error}"),
            }
        }
    }
}

/// Requests acknowledged before the stop, sent again with their keys: the answer is the
/// first one, and (checked by the caller) nothing is counted again.
fn repeat_acknowledged(server: &Server, ledger: &Mutex<Ledger>, rng: &mut SmallRng) -> usize {
    let acknowledged = std::mem::take(&mut ledger.lock().unwrap().acknowledged_keyed);
    let sample: Vec<_> = acknowledged.iter().filter(|_| rng.random_bool(0.2)).collect();
    for (pending, first) in &sample {
        let answer = post(server.address, pending).unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        // The counts are the first answer's; the position is empty (nothing new was
        // written) where the first named where its write reached.
        let (again, first) = (answer.json(), first);
        assert_eq!(again["accepted"], first["accepted"], "a repeated request is answered like the first");
        assert_eq!(again["duplicates"], first["duplicates"], "a repeated request is answered like the first");
        assert_eq!(again["position"], "", "a repeated request wrote nothing new");
    }
    sample.len()
}

fn check_counts(server: &Server, ledger: &Ledger, when: &str) {
    let ids: Vec<String> = (0..VIDEOS).map(|v| format!("v{v}")).collect();
    let answer = server.post_json("/v1/counts", &serde_json::json!({ "video_ids": ids }).to_string());
    assert_eq!(answer.status, 200);
    let counts = answer.json();
    for id in &ids {
        let expected = ledger.expected.get(id).copied().unwrap_or(0);
        assert_eq!(counts["counts"][id].as_u64().unwrap(), expected, "{when}: video {id}");
    }
}

#[test]
fn sigkill_under_load_loses_nothing_acknowledged_and_counts_nothing_twice() {
    stop_under_load(CONFIG);
}

/// The same with the aggregates in PostgreSQL: the server's own data directory keeps
/// only the log, the checkpoints that say what of it landed live in the database.
#[test]
fn sigkill_under_load_with_postgresql_loses_nothing_and_counts_nothing_twice() {
    let database = tally_pgtest::Postgres::start();
    stop_under_load(&format!("{CONFIG}\nstore = \"{}\"", database.url()));
}

fn stop_under_load(config: &str) {
    let seed: u64 = std::env::var("TALLY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with TALLY_TEST_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut repeated_total = 0;
    let mut server = start(&data, config);
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (stop, ledger, address, seed) =
                    (Arc::clone(&stop), Arc::clone(&ledger), server.address, rng.random());
                std::thread::spawn(move || client(address, seed, c, round, stop, ledger))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(150..600)));
        let how = if round % 2 == 0 {
            server.kill();
            "kill"
        } else {
            let status = server.terminate(STOP_TIMEOUT);
            assert!(status.success(), "SIGTERM under load: {status:?}\n{}", server.log());
            "SIGTERM"
        };
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        server = start(&data, config);
        {
            let ledger = ledger.lock().unwrap();
            let replayed = server.log().lines().find(|l| l.contains("recovery complete")).unwrap_or("").to_owned();
            eprintln!(
                "round {round} ({how}): {} acknowledged so far, {} unanswered to retry; {replayed}",
                ledger.acknowledged_requests,
                ledger.unanswered.len()
            );
        }
        retry_unanswered(&server, &ledger);
        let repeated = repeat_acknowledged(&server, &ledger, &mut rng);
        eprintln!("round {round}: {repeated} acknowledged requests repeated");
        repeated_total += repeated;
        check_counts(&server, &ledger.lock().unwrap(), &format!("after {how} {round}"));
    }
    let ledger = ledger.lock().unwrap();
    assert!(repeated_total > 0, "no acknowledged request was ever repeated after a restart");
    assert!(
        ledger.acknowledged_requests > 50,
        "the load was too light to mean anything: {}",
        ledger.acknowledged_requests
    );
    let status = server.terminate(STOP_TIMEOUT);
    assert!(status.success());
    let server = start(&data, config);
    check_counts(&server, &ledger, "after a clean restart");
}
