//! Cluster mode end to end, with real parts: a Kafka-protocol broker (tansu), PostgreSQL,
//! three tally nodes and HAProxy from `deploy/haproxy.cfg`. A load generator with
//! deterministic event ids and Idempotency-Keys writes through HAProxy and retries every
//! unanswered or refused request with the same body and key until it is acknowledged;
//! after each scenario, every node must answer exact minute, hour and day counts equal to
//! the ledger of everything generated.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cluster::{Balancer, Broker, all_owned, free_port, init, node};
use common::{Server, now_ms, request};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tally_engine::Position;
use tally_pgtest::Postgres;

const PARTITIONS: u32 = 8;
const VIDEOS: u32 = 24;
const EVENTS_PER_REQUEST: usize = 100;
/// Events are spread over this many minutes before now: several hour buckets, maybe two
/// days.
const SPREAD_MINUTES: i64 = 150;
/// A node's settings in these tests: short flushes, and a short session so that a dead
/// or paused node's partitions move within seconds.
const NODE_CONFIG: &str = "flush_interval = \"200ms\"\nsession_timeout = \"6s\"\n";
/// How long a request may be retried before the test gives up on the cluster.
const RETRY_FOR: Duration = Duration::from_secs(90);
/// The `wait_ms` of the tests' reads with `after`: long enough for a partition on the move
/// to be claimed by its new owner (the server's default, 5 s, is not).
const AFTER_WAIT_MS: u64 = 30_000;

/// Everything the load generated (each request is retried until acknowledged), and the
/// furthest position the acknowledgements named.
#[derive(Default)]
struct Ledger {
    /// (video, minute) → events.
    expected: BTreeMap<(String, i64), u64>,
    position: Position,
    acknowledged: u64,
    retries: u64,
}

impl Ledger {
    fn record_position(&mut self, position: &str) {
        self.position.extend(&position.parse().expect("a position"));
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Fields drop in order: the nodes stop first, the guard that lets the next cluster
/// start goes last.
struct Cluster {
    nodes: Vec<Option<Server>>,
    balancer: Balancer,
    broker: Broker,
    postgres: Postgres,
    ports: Vec<u16>,
    ledger: Arc<Mutex<Ledger>>,
    /// Settings every node gets besides `NODE_CONFIG`.
    extra: String,
    dir: tempfile::TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// `nodes` nodes, room in the balancer for `spare` more, on a broker whose storage is
    /// durable (SQLite: it keeps the log across its restarts) or in memory.
    fn start(nodes: usize, spare: usize, durable: bool) -> Cluster {
        Cluster::start_with(nodes, spare, durable, |_| String::new())
    }

    /// `start`, every node also given the settings `extra` makes of the cluster's directory.
    fn start_with(nodes: usize, spare: usize, durable: bool, extra: impl FnOnce(&Path) -> String) -> Cluster {
        // One cluster at a time: each is a broker, a database and several nodes under
        // load, and their session timeouts assume the machine is theirs.
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let postgres = Postgres::start();
        let broker = Broker::start(&dir.path().join("broker"), durable);
        let first = init(&broker.address(), &postgres.url(), PARTITIONS);
        assert!(first.contains("created"), "{first}");
        let again = init(&broker.address(), &postgres.url(), PARTITIONS);
        assert!(again.contains("nothing changed") && !again.contains("created ("), "{again}");
        let ports: Vec<u16> = (0..nodes + spare).map(|_| free_port()).collect();
        let balancer = Balancer::start(dir.path(), &ports);
        let mut cluster = Cluster {
            nodes: Vec::new(),
            balancer,
            broker,
            postgres,
            ports,
            ledger: Arc::default(),
            extra: extra(dir.path()),
            dir,
            _serial: serial,
        };
        for index in 0..nodes {
            cluster.nodes.push(Some(cluster.start_node(index)));
        }
        cluster.nodes.extend((0..spare).map(|_| None));
        cluster.wait_all_owned();
        cluster
    }

    /// Node 1 flushes every 5 s, so that whenever it is paused it holds deltas to flush.
    fn start_node(&self, index: usize) -> Server {
        let name = format!("node{index}");
        let config = if index == 1 { format!("{NODE_CONFIG}flush_interval = \"5s\"\n") } else { NODE_CONFIG.into() };
        let config = config.replacen("flush_interval = \"200ms\"\n", "", usize::from(index == 1)) + &self.extra;
        node(self.dir.path(), &name, self.ports[index], &self.broker.address(), &self.postgres.url(), &config)
    }

    fn alive(&self) -> Vec<&Server> {
        self.nodes.iter().flatten().collect()
    }

    fn wait_all_owned(&self) -> Duration {
        let started = Instant::now();
        while !all_owned(&self.alive(), PARTITIONS) {
            assert!(started.elapsed() < Duration::from_secs(60), "partitions left unowned: {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        started.elapsed()
    }

    /// Runs `disrupt` two seconds into a load through the balancer, ends the load, and
    /// checks every node's counts once every partition is owned again.
    fn under_load(&mut self, disrupt: impl FnOnce(&mut Cluster)) {
        let load = Load::start(self.balancer.address, 4, &self.ledger);
        std::thread::sleep(Duration::from_secs(2));
        disrupt(self);
        load.finish(self);
        self.wait_all_owned();
        self.check_exact();
    }

    /// Waits until every partition is owned and no node claimed or released one for
    /// `quiet` (the group settled).
    fn wait_settled(&self, quiet: Duration) {
        let started = Instant::now();
        let moves = || -> usize {
            self.alive()
                .iter()
                .map(|n| n.log().matches("partition claimed").count() + n.log().matches("partition released").count())
                .sum()
        };
        let (mut seen, mut since) = (moves(), Instant::now());
        loop {
            assert!(started.elapsed() < Duration::from_secs(120), "the group never settled: {}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
            let now = moves();
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet && all_owned(&self.alive(), PARTITIONS) {
                return;
            }
        }
    }

    fn logs(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().flatten().map(|n| n.log()).collect();
        format!("{}\nbroker:\n{}", nodes.join("\n----\n"), self.broker.log())
    }

    /// Every alive node answers, for every video, series at minute, hour and day steps
    /// equal to the ledger (after waiting for the position of every acknowledgement).
    fn check_exact(&self) {
        let ledger = self.ledger.lock().unwrap();
        let position = ledger.position.to_string();
        let minutes = ledger.expected.keys().map(|(_, minute)| *minute);
        let (from, to) = (minutes.clone().min().unwrap() * 60_000, (minutes.max().unwrap() + 1) * 60_000);
        for node in self.alive() {
            for video in 0..VIDEOS {
                let video = format!("v{video}");
                for (step, minutes) in [("minute", 1), ("hour", 60), ("day", 1440)] {
                    let (from, to) = (align(from, minutes), align(to + minutes * 60_000 - 1, minutes));
                    let path = format!(
                        "/v1/series?video_id={video}&step={step}&from={from}&to={to}&after={position}&wait_ms={AFTER_WAIT_MS}"
                    );
                    let answer = request(node.address, "GET", &path, &[], b"").unwrap();
                    assert_eq!(answer.status, 200, "{path}: {}\n{}", answer.text(), self.logs());
                    let got: BTreeMap<i64, u64> = answer.json()["points"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|p| p["count"].as_u64().unwrap() > 0)
                        .map(|p| (minute_of(p["t"].as_str().unwrap()), p["count"].as_u64().unwrap()))
                        .collect();
                    let mut want: BTreeMap<i64, u64> = BTreeMap::new();
                    for ((v, minute), events) in ledger.expected.range((video.clone(), i64::MIN)..) {
                        if *v != video {
                            break;
                        }
                        *want.entry(minute.div_euclid(minutes) * minutes).or_default() += events;
                    }
                    if got != want {
                        let anomalies: f64 =
                            self.alive().iter().map(|n| metric_sum(n, "tally_log_anomalies_total")).sum();
                        panic!(
                            "node {} video {video} step {step}: got {got:?}, want {want:?}; log anomalies the \
                             owners saw (offsets skipped or repeated by the broker): {anomalies}\n{}",
                            node.address,
                            self.logs()
                        );
                    }
                }
            }
        }
    }
}

fn align(ms: i64, minutes: i64) -> i64 {
    ms.div_euclid(minutes * 60_000) * minutes * 60_000
}

fn minute_of(rfc3339: &str) -> i64 {
    let ts: jiff::Timestamp = rfc3339.parse().unwrap();
    ts.as_millisecond().div_euclid(60_000)
}

/// Clients writing through the balancer until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Requests generated so far, over every load: keys and event ids stay unique.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

impl Load {
    fn start(address: SocketAddr, clients: usize, ledger: &Arc<Mutex<Ledger>>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|client| {
                let (stop, ledger) = (Arc::clone(&stop), Arc::clone(ledger));
                std::thread::spawn(move || run_client(address, client as u64, &stop, &ledger))
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the clients; the cluster's logs are shown if one of them failed.
    fn finish(self, cluster: &Cluster) {
        self.stop.store(true, Ordering::Release);
        let failed = self.threads.into_iter().filter_map(|thread| thread.join().err()).count();
        assert_eq!(failed, 0, "load clients failed (their messages are above)\n{}", cluster.logs());
    }
}

fn run_client(address: SocketAddr, client: u64, stop: &AtomicBool, ledger: &Mutex<Ledger>) {
    let mut rng = SmallRng::seed_from_u64(client);
    while !stop.load(Ordering::Acquire) {
        let number = REQUESTS.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let mut events = Vec::with_capacity(EVENTS_PER_REQUEST);
        let mut counts: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for i in 0..EVENTS_PER_REQUEST {
            let video = format!("v{}", rng.random_range(0..VIDEOS));
            let ts = now - rng.random_range(0..SPREAD_MINUTES * 60_000);
            events.push(format!(r#"{{"video_id":"{video}","ts":{ts},"event_id":"r{number}-{i}"}}"#));
            *counts.entry((video, ts.div_euclid(60_000))).or_default() += 1;
        }
        let body = format!("[{}]", events.join(","));
        {
            let mut ledger = ledger.lock().unwrap();
            for (key, n) in counts {
                *ledger.expected.entry(key).or_default() += n;
            }
        }
        let position = send_until_acknowledged(address, &body, &format!("k{number}"), ledger);
        let mut ledger = ledger.lock().unwrap();
        ledger.acknowledged += 1;
        ledger.record_position(&position);
    }
}

/// Posts until answered 200 (same body, same key); the answer's position.
fn send_until_acknowledged(address: SocketAddr, body: &str, key: &str, ledger: &Mutex<Ledger>) -> String {
    let started = Instant::now();
    let headers = [("content-type", "application/json"), ("idempotency-key", key)];
    loop {
        let last = match request(address, "POST", "/v1/events", &headers, body.as_bytes()) {
            Ok(answer) if answer.status == 200 => return answer.json()["position"].as_str().unwrap().to_string(),
            Ok(answer) => {
                assert!(
                    matches!(answer.status, 429 | 502 | 503 | 504),
                    "refused for good: {} {}",
                    answer.status,
                    answer.text()
                );
                format!("{} {}", answer.status, answer.text())
            }
            Err(error) => error.to_string(),
        };
        assert!(started.elapsed() < RETRY_FOR, "request {key} never acknowledged; last: {last}");
        ledger.lock().unwrap().retries += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric_sum(server: &Server, name: &str) -> f64 {
    request(server.address, "GET", "/metrics", &[], b"")
        .expect("a node answers /metrics")
        .text()
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn three_nodes_behind_haproxy_count_exactly_through_crashes_pauses_and_moves() {
    let mut cluster = Cluster::start(3, 1, false);

    eprintln!("scenario 1");
    // 1. Steady state.
    let load = Load::start(cluster.balancer.address, 4, &cluster.ledger);
    std::thread::sleep(Duration::from_secs(4));
    load.finish(&cluster);
    cluster.check_exact();

    eprintln!("scenario 2");
    // 2. kill -9 of a node under load; clients retry through HAProxy with the same keys.
    let load = Load::start(cluster.balancer.address, 4, &cluster.ledger);
    std::thread::sleep(Duration::from_secs(2));
    cluster.nodes[0].as_mut().unwrap().kill();
    cluster.nodes[0] = None;
    let takeover = cluster.wait_all_owned();
    std::thread::sleep(Duration::from_secs(2));
    load.finish(&cluster);
    eprintln!("takeover after kill -9: {takeover:?}");
    cluster.check_exact();
    cluster.nodes[0] = Some(cluster.start_node(0));
    cluster.wait_all_owned();

    eprintln!("scenario 3");
    // 3. A node paused past its session: the others take its partitions; once resumed,
    // its late flush is refused and it drops them.
    cluster.wait_settled(Duration::from_secs(5));
    let load = Load::start(cluster.balancer.address, 4, &cluster.ledger);
    std::thread::sleep(Duration::from_secs(2));
    let paused = cluster.nodes[1].as_ref().unwrap();
    assert!(metric_sum(paused, "tally_partition_owned") >= 1.0, "node 1 owns nothing to flush late");
    paused.signal(libc::SIGSTOP);
    // Past the session timeout (6 s), and past the time the others take to mend a group
    // the broker left without an owner for those partitions (a session timeout, then a
    // rebalance of a few seconds).
    std::thread::sleep(Duration::from_secs(25));
    cluster.nodes[1].as_ref().unwrap().signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(4));
    load.finish(&cluster);
    let paused = cluster.nodes[1].as_ref().unwrap();
    assert!(
        paused.logged("another node owns this partition now"),
        "the paused node's late flush was not refused: {}",
        paused.log()
    );
    cluster.wait_all_owned();
    cluster.check_exact();

    eprintln!("scenario 4");
    // 4. A fourth node joins under load, then one leaves with SIGTERM.
    cluster.under_load(|cluster| {
        cluster.nodes[3] = Some(cluster.start_node(3));
        cluster.wait_settled(Duration::from_secs(3));
        let status = cluster.nodes[2].as_mut().unwrap().terminate(Duration::from_secs(60));
        assert!(status.success(), "SIGTERM did not stop node 2 cleanly");
        cluster.nodes[2] = None;
        cluster.wait_all_owned();
        std::thread::sleep(Duration::from_secs(2));
    });

    eprintln!("scenario 6");
    // 6. PostgreSQL restarted under load: writes go on into the log, flushes wait.
    cluster.under_load(|cluster| {
        cluster.postgres.stop();
        std::thread::sleep(Duration::from_secs(4));
        cluster.postgres.start_again();
        std::thread::sleep(Duration::from_secs(4));
    });
    let ledger = cluster.ledger.lock().unwrap();
    eprintln!("acknowledged {} requests, {} retries", ledger.acknowledged, ledger.retries);
}

#[test]
fn a_broker_restart_under_load_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(2, 0, true);
    // 5. The broker killed and restarted (its storage is durable) under load.
    cluster.under_load(|cluster| {
        cluster.broker.kill();
        std::thread::sleep(Duration::from_secs(3));
        cluster.broker.start_again();
        std::thread::sleep(Duration::from_secs(5));
    });
}

#[test]
fn a_node_whose_owner_waits_for_the_database_stops_on_sigterm_and_loses_nothing() {
    let mut cluster = Cluster::start(1, 1, false);
    // A second node with little room for deltas: while the database is down, its owner
    // fills up and waits for room to apply more.
    let config = format!("{NODE_CONFIG}pending_cells_max = 1000\n");
    let (broker, postgres) = (cluster.broker.address(), cluster.postgres.url());
    cluster.nodes[1] = Some(node(cluster.dir.path(), "tight", cluster.ports[1], &broker, &postgres, &config));
    cluster.wait_settled(Duration::from_secs(3));
    let tight = cluster.nodes[1].as_ref().unwrap();
    assert!(metric_sum(tight, "tally_partition_owned") >= 1.0, "the second node owns nothing");
    cluster.postgres.stop();
    // 100 videos x 100 minutes: about 1,250 cells per partition. Unkeyed writes need no
    // database.
    let now = now_ms();
    let mut position = Position::default();
    for minute in 0..100 {
        let ts = now - minute * 60_000;
        let events: Vec<String> = (0..100).map(|v| format!(r#"{{"video_id":"d{v}","ts":{ts}}}"#)).collect();
        let answer = tight.post_events(&format!("[{}]", events.join(",")), &[]);
        assert_eq!(answer.status, 200, "{}", answer.text());
        position.extend(&answer.json()["position"].as_str().unwrap().parse().unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let full = |line: &str| {
        line.starts_with("tally_partition_pending_cells{")
            && line.rsplit_once(' ').and_then(|(_, n)| n.parse::<f64>().ok()).is_some_and(|n| n >= 1000.0)
    };
    while !tight.get("/metrics").text().lines().any(full) {
        assert!(Instant::now() < deadline, "no partition filled up: {}", tight.get("/metrics").text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its owner now waits for the database; SIGTERM still stops the node (the final flush
    // fails, so the exit status says so), and the other node replays what it applied.
    cluster.nodes[1].as_mut().unwrap().terminate(Duration::from_secs(60));
    cluster.nodes[1] = None;
    cluster.postgres.start_again();
    cluster.wait_all_owned();
    let reader = &cluster.alive()[0];
    for video in 0..100 {
        let path = format!("/v1/count?video_id=d{video}&from=0&after={position}&wait_ms={AFTER_WAIT_MS}");
        let answer = reader.get(&path);
        assert_eq!(answer.json()["count"].as_u64(), Some(100), "{path}: {}", answer.text());
    }
}

#[test]
fn one_idempotency_key_with_two_bodies_racing_through_two_nodes_counts_one() {
    let cluster = Cluster::start(2, 0, false);
    let nodes = cluster.alive();
    for round in 0..20 {
        let key = format!("race-{round}");
        let bodies = [
            format!(r#"[{{"video_id":"race-a-{round}"}},{{"video_id":"race-b-{round}"}}]"#),
            format!(
                r#"[{{"video_id":"race-a-{round}"}},{{"video_id":"race-c-{round}"}},{{"video_id":"race-d-{round}"}}]"#
            ),
        ];
        let answers: Vec<u16> = std::thread::scope(|scope| {
            let sent: Vec<_> = nodes
                .iter()
                .zip(&bodies)
                .map(|(node, body)| {
                    let headers = [("content-type", "application/json"), ("idempotency-key", key.as_str())];
                    scope.spawn(move || request(node.address, "POST", "/v1/events", &headers, body.as_bytes()))
                })
                .collect();
            sent.into_iter().map(|s| s.join().unwrap().unwrap().status).collect()
        });
        let mut sorted = answers.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [200, 422], "round {round}: {answers:?}");
        let winner = answers.iter().position(|s| *s == 200).unwrap();
        let count = |video: String| -> u64 {
            let path = format!("/v1/count?video_id={video}&from=0");
            // The winner's write reaches the store within a flush; wait for it.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let answer = request(nodes[0].address, "GET", &path, &[], b"").unwrap();
                let n = answer.json()["count"].as_u64().unwrap();
                if n > 0 || Instant::now() > deadline {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let a = count(format!("race-a-{round}"));
        assert_eq!(a, 1, "round {round}");
        let loser_only = if winner == 0 { format!("race-c-{round}") } else { format!("race-b-{round}") };
        // The winner's events are in (a is); the loser's own video must stay at zero.
        let path = format!("/v1/count?video_id={loser_only}&from=0");
        let answer = request(nodes[1].address, "GET", &path, &[], b"").unwrap();
        assert_eq!(answer.json()["count"].as_u64(), Some(0), "round {round}: the refused body counted");
    }

    // One video's events larger than a log message holds: 413, nothing counted, on any
    // node, and a smaller batch of the same video is taken.
    let event = |i: usize| format!(r#"{{"video_id":"big","event_id":"{i:0>128}","viewer_id":"{i:0>256}"}}"#);
    let body = format!("[{}]", (0..3_000).map(event).collect::<Vec<_>>().join(","));
    let refused = nodes[0].post_events(&body, &[]);
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.json()["error"], "record_too_large");
    assert!(refused.json()["limit_bytes"].as_u64().unwrap() < body.len() as u64);
    let body = format!("[{}]", (3_000..3_100).map(event).collect::<Vec<_>>().join(","));
    let taken = nodes[1].post_events(&body, &[]);
    assert_eq!(taken.status, 200, "{}", taken.text());
    let position = taken.json()["position"].as_str().unwrap().to_string();
    let answer = nodes[0].get(&format!("/v1/count?video_id=big&from=0&after={position}&wait_ms={AFTER_WAIT_MS}"));
    assert_eq!(answer.json()["count"].as_u64(), Some(100), "only the smaller batch counts: {}", answer.text());
}

#[test]
fn a_query_after_a_write_sees_it_on_every_node_and_old_ids_count_zero_after_a_move() {
    let mut cluster = Cluster::start(3, 0, false);
    // The nodes joined one after the other: let the group's rebalances end, so that the
    // reads below wait for flushes, not for partitions on the move (a read during a move
    // waits for the new owner's claim, which `AFTER_WAIT_MS` also covers).
    cluster.wait_settled(Duration::from_secs(3));
    // 9. Read-your-writes across nodes.
    for round in 0..30 {
        let writer = &cluster.alive()[round % 3];
        let reader = &cluster.alive()[(round + 1) % 3];
        let body = format!(r#"[{{"video_id":"ryw-{round}","event_id":"e{round}"}},{{"video_id":"ryw-{round}"}}]"#);
        let answer = writer.post_events(&body, &[]);
        assert_eq!(answer.status, 200, "{}", answer.text());
        let position = answer.json()["position"].as_str().unwrap().to_string();
        assert!(!position.is_empty());
        let path = format!("/v1/count?video_id=ryw-{round}&from=0&after={position}&wait_ms={AFTER_WAIT_MS}");
        let answer = reader.get(&path);
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["count"].as_u64(), Some(2), "round {round}: the read missed the write");
    }
    // A position no partition reaches: a clear 503 once the wait is over.
    let answer = cluster.alive()[0].get("/v1/count?video_id=x&after=0:999999999&wait_ms=200");
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.json()["error"], "position_not_reached");

    // 8. Event ids resent after their partition moved to another node count zero.
    let ids: Vec<String> = (0..50).map(|i| format!(r#"{{"video_id":"moved-{}","event_id":"m{i}"}}"#, i % 10)).collect();
    let body = format!("[{}]", ids.join(","));
    let first = cluster.alive()[0].post_events(&body, &[]);
    assert_eq!(first.status, 200, "{}", first.text());
    let position = first.json()["position"].as_str().unwrap().to_string();
    // Stop a node cleanly: its partitions move (SIGTERM flushes and leaves the group).
    let status = cluster.nodes[2].as_mut().unwrap().terminate(Duration::from_secs(60));
    assert!(status.success());
    cluster.nodes[2] = None;
    cluster.wait_all_owned();
    let again = cluster.alive()[1].post_events(&body, &[]);
    assert_eq!(again.status, 200, "{}", again.text());
    let position_again = again.json()["position"].as_str().unwrap().to_string();
    for node in cluster.alive() {
        for video in 0..10 {
            let path =
                format!("/v1/count?video_id=moved-{video}&from=0&after={position_again}&wait_ms={AFTER_WAIT_MS}");
            let answer = node.get(&path);
            assert_eq!(answer.json()["count"].as_u64(), Some(5), "{path} (first write at {position})");
        }
    }
    let duplicates: f64 = cluster.alive().iter().map(|n| metric_sum(n, "tally_events_duplicate_total")).sum();
    assert!(duplicates >= 50.0, "the resent ids were not counted as duplicates: {duplicates}");
}

/// Produces `messages` to `topic` (created with 3 partitions if absent), each acknowledged.
fn produce(brokers: &str, topic: &str, messages: &[String]) {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let new = NewTopic::new(topic, 3, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let _ = futures_executor_block_on(admin.create_topics([&new], &options));
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("acks", "all").create().unwrap();
    for (i, message) in messages.iter().enumerate() {
        let key = format!("k{}", i % 7);
        let record = FutureRecord::to(topic).key(&key).payload(message);
        futures_executor_block_on(producer.send(record, Duration::from_secs(10))).expect("produced");
    }
}

fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// Distinct source messages (partition, offset) in tally's dead-letter topic that came
/// from `source_topic` (a message dead-lettered again after a crash counts once).
fn dead_letters_from(brokers: &str, source_topic: &str) -> usize {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["tally-events-dlq"]).unwrap();
    let mut found = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut idle_since = Instant::now();
    while Instant::now() < deadline && idle_since.elapsed() < Duration::from_secs(5) {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        idle_since = Instant::now();
        let header = |name: &str| {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            })
        };
        if header("source_topic").as_deref() == Some(source_topic) {
            found.insert((
                header("source_partition").expect("a partition"),
                header("source_offset").expect("an offset"),
            ));
        }
    }
    found.len()
}

fn bridge(brokers: &str, from_topic: &str, log: &Path) -> std::process::Child {
    std::process::Command::new(common::tally_binary())
        .args(["bridge", "--kafka", brokers, "--from-topic", from_topic])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start tally bridge")
}

/// The platform's messages of one phase: single events without ids, arrays with and
/// without ids, and bad messages; adds the good events to `expected`.
fn platform_messages(phase: usize, expected: &mut BTreeMap<String, u64>) -> (Vec<String>, usize) {
    let mut messages = Vec::new();
    let mut bad = 0;
    for i in 0..600 {
        let video = format!("b{}", (i * 7 + phase) % 13);
        let message = match i % 10 {
            0 => {
                bad += 1;
                if i % 20 == 0 { "{not json".to_string() } else { r#"{"type":"view"}"#.to_string() }
            }
            1 => format!(r#"[{{"video_id":"{video}"}},{{"video_id":"{video}"}},{{"video_id":"x{video}"}}]"#),
            2 => format!(r#"{{"video_id":"{video}","event_id":"p{phase}-{i}"}}"#),
            _ => format!(r#"{{"video_id":"{video}"}}"#),
        };
        match i % 10 {
            0 => {}
            1 => {
                *expected.entry(video.clone()).or_default() += 2;
                *expected.entry(format!("x{video}")).or_default() += 1;
            }
            _ => *expected.entry(video).or_default() += 1,
        }
        messages.push(message);
    }
    (messages, bad)
}

#[test]
fn the_bridge_killed_and_restarted_mid_topic_counts_every_source_event_once() {
    let cluster = Cluster::start(2, 0, false);
    let brokers = cluster.broker.address();
    let mut expected = BTreeMap::new();
    let (first, bad_first) = platform_messages(0, &mut expected);
    produce(&brokers, "platform-views", &first);
    let log = cluster.dir.path().join("bridge.log");
    let mut running = bridge(&brokers, "platform-views", &log);
    // Killed as soon as some events are counted: mid-topic, maybe between an append and
    // its commit.
    let reader = cluster.alive()[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.count("b0") == 0 {
        assert!(Instant::now() < deadline, "the bridge counted nothing: {}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    running.kill().unwrap();
    running.wait().unwrap();
    let (second, bad_second) = platform_messages(1, &mut expected);
    produce(&brokers, "platform-views", &second);
    let log2 = log.with_extension("2.log");
    let mut running = bridge(&brokers, "platform-views", &log2);
    let deadline = Instant::now() + Duration::from_secs(90);
    for node in cluster.alive() {
        for (video, count) in &expected {
            while node.count(video) != *count {
                assert!(
                    Instant::now() < deadline,
                    "{video}: {} of {count}; the bridge said: {}",
                    node.count(video),
                    std::fs::read_to_string(&log2).unwrap()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // Nothing more arrives later (no event counted twice after a settle).
    std::thread::sleep(Duration::from_secs(2));
    for (video, count) in &expected {
        assert_eq!(reader.count(video), *count, "{video}");
    }
    // SIGTERM: the bridge appends what it holds, commits, and exits 0.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(running.id() as i32, libc::SIGTERM) };
    assert!(running.wait().unwrap().success());
    assert_eq!(dead_letters_from(&brokers, "platform-views"), bad_first + bad_second);
}

/// The load balancer configurations shipped in `deploy/` are accepted by the real
/// programs (HAProxy also runs every cluster test above).
#[test]
fn the_deploy_configurations_are_valid() {
    let deploy = std::path::absolute(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy")).unwrap();
    let haproxy = common::cluster::program("haproxy", "apt-get install haproxy");
    let checked =
        std::process::Command::new(haproxy).arg("-c").arg("-f").arg(deploy.join("haproxy.cfg")).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let nginx = common::cluster::program("nginx", "apt-get install nginx-light");
    let checked =
        std::process::Command::new(nginx).arg("-t").arg("-c").arg(deploy.join("nginx.conf")).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
}

#[test]
fn archiving_nodes_archive_each_acknowledged_event_once_through_a_kill_a_move_and_stops() {
    let mut cluster = Cluster::start_with(2, 1, false, |dir| {
        format!("archive = {:?}\narchive_file_interval = \"300ms\"\n", dir.join("archive").display().to_string())
    });
    let archive = cluster.dir.path().join("archive");
    // Duplicates the archive must leave out: an event id sent twice, a keyed request
    // sent three times.
    let node = cluster.alive()[0];
    let ids = r#"[{"video_id":"dup","event_id":"a"},{"video_id":"dup","event_id":"a"}]"#;
    assert_eq!(node.post_events(ids, &[]).status, 200);
    let keyed = r#"[{"video_id":"keyed","type":"like"}]"#;
    for _ in 0..3 {
        assert_eq!(node.post_events(keyed, &[("idempotency-key", "once")]).status, 200);
    }
    // kill -9 of an owner while it archives; the other takes its partitions and goes on
    // from the archive progress in the database (a half-written file written again).
    cluster.under_load(|cluster| {
        cluster.nodes[0].as_mut().unwrap().kill();
        cluster.nodes[0] = None;
        cluster.wait_all_owned();
        std::thread::sleep(Duration::from_secs(2));
    });
    // A node joins (partitions move to it) and the load goes on; then every node stops
    // cleanly, one after the other: each archives what it checkpointed as it leaves.
    cluster.nodes[2] = Some(cluster.start_node(2));
    cluster.under_load(|cluster| cluster.wait_settled(Duration::from_secs(3)));
    for index in [1, 2] {
        let status = cluster.nodes[index].as_mut().unwrap().terminate(Duration::from_secs(90));
        assert!(status.success(), "SIGTERM did not stop node {index} cleanly\n{}", cluster.logs());
        cluster.nodes[index] = None;
    }

    let store = tally_archive::Archive::open(archive.to_str().unwrap()).unwrap();
    let files = store.files().unwrap();
    let totals = tally_archive::aggregate(&store, &files, i64::MIN, i64::MAX).unwrap().totals;
    let archived: BTreeMap<(String, String), u64> = totals.into_iter().map(|(key, t)| (key, t.count)).collect();
    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((video, _), events) in &cluster.ledger.lock().unwrap().expected {
        *expected.entry(("view".into(), video.clone())).or_default() += events;
    }
    expected.insert(("view".into(), "dup".into()), 1);
    expected.insert(("like".into(), "keyed".into()), 1);
    assert_eq!(archived, expected, "the archive holds every acknowledged event once");
    let mut ranges: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for file in &files {
        ranges.entry(file.partition).or_default().push((file.first_offset, file.end_offset));
    }
    assert_eq!(ranges.len(), PARTITIONS as usize, "every partition archived: {ranges:?}");
    for (partition, files) in &ranges {
        assert_eq!(files[0].0, 0, "partition {partition} archived from the start: {files:?}");
        for pair in files.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "partition {partition}: files {pair:?} must follow one another");
        }
    }
}
