//! `tally bench`: the load generator.
//!
//! Write mode posts batches of events over `--videos` videos whose popularity follows a
//! Zipf law, from `--concurrency` connections, for `--duration` seconds or `--events`
//! events, each request with its own Idempotency-Key (retried on 429/503 with the same
//! key). Bodies are built before the clock starts, so the generator spends its time
//! sending. At the end it asks the server for every video's count and checks that it
//! equals what was acknowledged, exactly.
//!
//! Read mode asks `GET /v1/count` for random videos over random ranges of up to
//! `--range-days` days, and reports requests per second and latency percentiles.
//!
//! Top mode asks `GET /v1/top` for the `--top-k` most-viewed videos of the last
//! `--top-hours` hours, and reports latency percentiles and how many answers were exact.
//!
//! Fresh mode measures freshness: each worker writes one event of a new video to
//! `--server`, and from its acknowledgement asks `GET /v1/count` of `--read-server`
//! (without `after`) until the event counts; it reports the percentiles of that delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::client::{Api, QUERY_ATTEMPTS, api, encode_query};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to load: `write` (POST /v1/events), `read` (GET /v1/count), `top`
    /// (GET /v1/top over the last --top-hours) or `fresh` (the delay from a write's
    /// acknowledgement until --read-server counts it)
    #[arg(long, value_enum, default_value = "write")]
    mode: Mode,
    /// Distinct videos
    #[arg(long, default_value_t = 10_000)]
    videos: u32,
    /// Zipf exponent of video popularity (0: uniform; 1: classic long tail)
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Events per request (write mode)
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Connections, each with one request in flight
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds to run
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Stop after this many events (write mode) or requests (read mode), if sooner
    #[arg(long)]
    events: Option<u64>,
    /// Events per second to send at most, spread over the connections (write mode; a
    /// connection that falls behind sends at once, and latencies count from when each
    /// request was due) [default: as fast as the server takes]
    #[arg(long)]
    rate: Option<u64>,
    /// Distinct request bodies prepared before the run (write mode)
    #[arg(long, default_value_t = 64)]
    bodies: usize,
    /// Spread event timestamps uniformly over this many days before now (write mode; the
    /// server's lateness_max must allow it). 0: no `ts`, the server stamps receive time
    #[arg(long, default_value_t = 0)]
    spread_days: i64,
    /// Longest range a read asks for, days (read mode)
    #[arg(long, default_value_t = 365)]
    range_days: i64,
    /// Videos each top request asks for (top mode)
    #[arg(long, default_value_t = 100)]
    top_k: u32,
    /// Range of each top request: the last this many hours (top mode)
    #[arg(long, default_value_t = 1)]
    top_hours: i64,
    /// Event type; default for writes: a fresh `bench-<run>` type, so counts can be checked
    /// exactly; for reads: view
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Random seed (printed, so a run can be repeated)
    #[arg(long)]
    seed: Option<u64>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
    /// Where fresh mode reads (another node of a cluster); default: --server
    #[arg(long)]
    read_server: Option<String>,
    /// The API key to send (write mode: a write key; the final check and read modes need
    /// read too) [default: $TALLY_KEY]
    #[arg(long)]
    key: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Write,
    Read,
    Top,
    Fresh,
}

/// Step between the bodies one worker sends in turn: a prime, so each worker cycles through
/// every body whatever their number, and workers do not send the same body in lockstep.
const BODY_STRIDE: usize = 7919;
/// Attempts per write request (429/503 and connection errors are retried with backoff).
const WRITE_ATTEMPTS: u32 = 50;

/// Samples ranks 0..n with probability proportional to 1/(rank+1)^s.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: u32, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|k| {
                total += 1.0 / f64::from(k).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut impl Rng) -> u32 {
        let target = rng.random::<f64>() * self.cumulative.last().copied().unwrap_or(0.0);
        self.cumulative.partition_point(|&c| c < target).min(self.cumulative.len() - 1) as u32
    }
}

struct Body {
    bytes: Bytes,
    /// (video rank, events) in this body.
    counts: Vec<(u32, u32)>,
}

fn build_bodies(args: &BenchArgs, event_type: &str, rng: &mut SmallRng) -> Vec<Body> {
    let zipf = Zipf::new(args.videos, args.zipf);
    let now_ms = jiff::Timestamp::now().as_millisecond();
    // Stay a minute inside the lateness limit so bodies built now are still valid when sent.
    let spread_ms = (args.spread_days * 86_400_000 - 60_000).max(0);
    (0..args.bodies)
        .map(|_| {
            let mut text = String::with_capacity(args.batch_size * 60);
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            text.push('[');
            for i in 0..args.batch_size {
                let video = zipf.sample(rng);
                *counts.entry(video).or_default() += 1;
                if i > 0 {
                    text.push(',');
                }
                if spread_ms > 0 {
                    let ts = now_ms - rng.random_range(0..spread_ms);
                    text.push_str(&format!(
                        "{{\"video_id\":\"v{video}\",\"type\":\"{event_type}\",\"value\":1,\"ts\":{ts}}}"
                    ));
                } else {
                    text.push_str(&format!("{{\"video_id\":\"v{video}\",\"type\":\"{event_type}\",\"value\":1}}"));
                }
            }
            text.push(']');
            Body { bytes: Bytes::from(text), counts: counts.into_iter().collect() }
        })
        .collect()
}

/// Latencies in microseconds, sorted.
struct Latencies(Vec<u32>);

impl Latencies {
    fn sorted(mut micros: Vec<u32>) -> Latencies {
        micros.sort_unstable();
        Latencies(micros)
    }

    /// A duration as the microseconds a latency holds (saturating at `u32::MAX`, 71 min).
    fn micros(elapsed: Duration) -> u32 {
        elapsed.as_micros().min(u128::from(u32::MAX)) as u32
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.0[index]) / 1000.0
    }

    /// The `latency_ms` object of a result.
    fn summary(&self) -> serde_json::Value {
        json!({
            "p50": self.percentile_ms(0.50), "p90": self.percentile_ms(0.90),
            "p99": self.percentile_ms(0.99), "p999": self.percentile_ms(0.999),
            "max": self.percentile_ms(1.0),
        })
    }
}

/// Takes one request from what is left to send; false once nothing is left.
fn take_one(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.videos > 0 && args.concurrency > 0 && args.batch_size > 0 && args.bodies > 0 && args.rate != Some(0),
        "sizes and --rate must be positive"
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("seed {seed}");
    let client = api(&args.server, args.key.as_deref(), WRITE_ATTEMPTS)?;
    match args.mode {
        Mode::Write => write(args, client, seed).await,
        Mode::Read | Mode::Top => read(args, client, seed).await,
        Mode::Fresh => fresh(args, client, seed).await,
    }
}

fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// One connection of a write run: sends bodies in turn until the deadline, what is left
/// runs out, or another connection failed.
struct Connection {
    worker: usize,
    workers: usize,
    client: Api,
    bodies: Arc<Vec<Body>>,
    sent: Arc<Vec<AtomicU64>>,
    left: Arc<AtomicU64>,
    acknowledged: Arc<AtomicU64>,
    reached: Arc<Reached>,
    stop: Arc<AtomicBool>,
    run_id: String,
    batch: u64,
    pace: Option<Duration>,
    deadline: Instant,
}

impl Connection {
    /// The latencies of the batches acknowledged, or why one was not.
    async fn send(self) -> anyhow::Result<Vec<u32>> {
        let mut latencies = Vec::new();
        let mut sequence = 0u64;
        // Paced connections start spread over one pace, so that their sends interleave.
        let stagger = self.pace.map_or(Duration::ZERO, |pace| pace.mul_f64(self.worker as f64 / self.workers as f64));
        let mut next_at = Instant::now() + stagger;
        while !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline {
            // Paced, a request's latency counts from when it was due, not from when a
            // connection that fell behind got to send it (no coordinated omission).
            let due = match self.pace {
                Some(pace) => {
                    tokio::time::sleep_until(next_at.min(self.deadline).into()).await;
                    if Instant::now() >= self.deadline {
                        break;
                    }
                    next_at += pace;
                    next_at - pace
                }
                None => Instant::now(),
            };
            if !take_one(&self.left) {
                break;
            }
            let index = (self.worker + sequence as usize * BODY_STRIDE) % self.bodies.len();
            let key = format!("bench-{}-{}-{sequence}", self.run_id, self.worker);
            sequence += 1;
            let headers = [("content-type", "application/json"), ("idempotency-key", key.as_str())];
            let body = self.bodies[index].bytes.clone();
            match self.client.request_retrying(Method::POST, "/v1/events", &headers, body).await {
                Ok(answer) if answer.status.is_success() => {
                    latencies.push(Latencies::micros(due.elapsed()));
                    self.sent[index].fetch_add(1, Ordering::Relaxed);
                    self.acknowledged.fetch_add(self.batch, Ordering::Relaxed);
                    self.reached.record(&answer.body);
                }
                Ok(answer) => {
                    self.stop.store(true, Ordering::Relaxed);
                    return Err(anyhow::anyhow!("server refused a batch: {}", answer.error_text()));
                }
                Err(error) => {
                    self.stop.store(true, Ordering::Relaxed);
                    return Err(anyhow::Error::from(error).context(format!("a batch failed {WRITE_ATTEMPTS} attempts")));
                }
            }
        }
        Ok(latencies)
    }
}

async fn write(args: BenchArgs, client: Api, seed: u64) -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let run_id = format!("{:08x}", rng.random::<u32>());
    let fresh_type = args.event_type.is_none();
    let event_type = args.event_type.clone().unwrap_or_else(|| format!("bench-{run_id}"));
    // The exact check compares counts after the run with counts before it plus what was
    // acknowledged; a fresh type starts at zero.
    let before =
        if fresh_type { vec![0; args.videos as usize] } else { count_all(&client, args.videos, &event_type).await? };
    let bodies = Arc::new(build_bodies(&args, &event_type, &mut rng));
    let sent_per_body: Arc<Vec<AtomicU64>> = Arc::new((0..bodies.len()).map(|_| AtomicU64::new(0)).collect());
    let requests_left = Arc::new(AtomicU64::new(args.events.map_or(u64::MAX, |e| e.div_ceil(args.batch_size as u64))));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let reached = Arc::new(Reached::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let bar = spinner();

    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let connection = Connection {
            worker,
            workers: args.concurrency,
            client: client.clone(),
            bodies: Arc::clone(&bodies),
            sent: Arc::clone(&sent_per_body),
            left: Arc::clone(&requests_left),
            acknowledged: Arc::clone(&acknowledged),
            reached: Arc::clone(&reached),
            stop: Arc::clone(&stop),
            run_id: run_id.clone(),
            batch: args.batch_size as u64,
            // Each connection's share of --rate: one request every `pace`.
            pace: args
                .rate
                .map(|rate| Duration::from_secs_f64((args.batch_size * args.concurrency) as f64 / rate as f64)),
            deadline,
        };
        workers.push(tokio::spawn(connection.send()));
    }
    let ticker = {
        let (bar, acked) = (bar.clone(), Arc::clone(&acknowledged));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let events = acked.load(Ordering::Relaxed);
                bar.set_message(format!(
                    "{events} events, {:.0} events/s",
                    events as f64 / started.elapsed().as_secs_f64()
                ));
            }
        })
    };
    let mut latencies = Vec::new();
    let mut first_error = None;
    for worker in workers {
        match worker.await? {
            Ok(mut l) => latencies.append(&mut l),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();
    if let Some(error) = first_error {
        return Err(error);
    }
    let latencies = Latencies::sorted(latencies);
    let events = acknowledged.load(Ordering::Relaxed);

    // Exact check: what the server counts must equal what it acknowledged.
    let mut expected = vec![0u64; args.videos as usize];
    for (body, sent) in bodies.iter().zip(sent_per_body.iter()) {
        let times = sent.load(Ordering::Relaxed);
        for (video, n) in &body.counts {
            expected[*video as usize] += u64::from(*n) * times;
        }
    }
    // After every acknowledged write: a cluster answers from its database, which is at
    // most a flush behind, and waits for the position.
    let after = count_all_after(&client, args.videos, &event_type, &reached.position()).await?;
    let mut mismatches = 0u64;
    let mut counted = 0u64;
    for (video, (after, before)) in after.iter().zip(&before).enumerate() {
        let got = after.saturating_sub(*before);
        counted += got;
        if *after != before + expected[video] {
            mismatches += 1;
            if mismatches <= 5 {
                eprintln!("mismatch: v{video}: server counts {got} more, acknowledged {}", expected[video]);
            }
        }
    }
    let result = json!({
        "mode": "write",
        "seed": seed,
        "event_type": event_type,
        "videos": args.videos,
        "zipf": args.zipf,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "events": events,
        "requests": latencies.0.len(),
        "events_per_second": events as f64 / elapsed,
        "requests_per_second": latencies.0.len() as f64 / elapsed,
        "latency_ms": latencies.summary(),
        "fresh_type": fresh_type,
        "counted": counted,
        "mismatched_videos": mismatches,
    });
    print_result(&args, &result);
    if mismatches > 0 {
        bail!("{mismatches} videos' counts differ from what the server acknowledged");
    }
    Ok(())
}

async fn read(args: BenchArgs, client: Api, seed: u64) -> anyhow::Result<()> {
    let event_type = args.event_type.clone().unwrap_or_else(|| "view".into());
    let requests_left = Arc::new(AtomicU64::new(args.events.unwrap_or(u64::MAX)));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let zipf = Arc::new(Zipf::new(args.videos, args.zipf));
    let top = args.mode == Mode::Top;
    let (top_k, top_ms) = (args.top_k, args.top_hours * 3_600_000);
    let started = Instant::now();
    let bar = spinner();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (client, left, zipf, event_type) =
            (client.clone(), Arc::clone(&requests_left), Arc::clone(&zipf), event_type.clone());
        let range_ms = args.range_days * 86_400_000;
        workers.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed ^ worker as u64);
            let mut latencies = Vec::new();
            let mut exact_answers = 0u64;
            while Instant::now() < deadline {
                if !take_one(&left) {
                    break;
                }
                let path = if top {
                    let to = jiff::Timestamp::now().as_millisecond();
                    format!("/v1/top?type={}&k={top_k}&from={}&to={to}", encode_query(&event_type), to - top_ms)
                } else {
                    let to = now_ms - rng.random_range(0..7 * 86_400_000);
                    let from = to - rng.random_range(1..=range_ms);
                    format!(
                        "/v1/count?video_id={}&type={}&from={from}&to={to}",
                        encode_query(&format!("v{}", zipf.sample(&mut rng))),
                        encode_query(&event_type)
                    )
                };
                let sent_at = Instant::now();
                let answer = client.request(Method::GET, &path, &[], Bytes::new()).await?;
                anyhow::ensure!(answer.status.is_success(), "query failed: {}", answer.error_text());
                latencies.push(Latencies::micros(sent_at.elapsed()));
                if top && answer.json()?["exact"] == true {
                    exact_answers += 1;
                }
            }
            anyhow::Ok((latencies, exact_answers))
        }));
    }
    let mut latencies = Vec::new();
    let mut exact_answers = 0;
    for worker in workers {
        let (mut part, exact) = worker.await??;
        latencies.append(&mut part);
        exact_answers += exact;
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let latencies = Latencies::sorted(latencies);
    let result = json!({
        "mode": if top { "top" } else { "read" },
        "top_k": top.then_some(top_k),
        "top_hours": top.then_some(args.top_hours),
        "exact_answers": top.then_some(exact_answers),
        "seed": seed,
        "videos": args.videos,
        "range_days_max": args.range_days,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "requests": latencies.0.len(),
        "requests_per_second": latencies.0.len() as f64 / elapsed,
        "latency_ms": latencies.summary(),
    });
    print_result(&args, &result);
    Ok(())
}

/// How often fresh mode asks whether a write counts yet: the resolution of its figures.
const FRESH_POLL: Duration = Duration::from_millis(2);
/// How long fresh mode waits for one write to count before it fails.
const FRESH_WAIT_MAX: Duration = Duration::from_secs(60);

async fn fresh(args: BenchArgs, client: Api, seed: u64) -> anyhow::Result<()> {
    let reader = api(args.read_server.as_deref().unwrap_or(&args.server), args.key.as_deref(), QUERY_ATTEMPTS)?;
    let writes_left = Arc::new(AtomicU64::new(args.events.unwrap_or(u64::MAX)));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let bar = spinner();
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (client, reader, left) = (client.clone(), reader.clone(), Arc::clone(&writes_left));
        workers.push(tokio::spawn(async move {
            let mut delays = Vec::new();
            while Instant::now() < deadline && take_one(&left) {
                let video = format!("fresh-{seed:x}-{worker}-{}", delays.len());
                delays.push(time_to_visible(&client, &reader, &video).await?);
            }
            anyhow::Ok(delays)
        }));
    }
    let mut delays = Vec::new();
    for worker in workers {
        delays.append(&mut worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let delays = Latencies::sorted(delays);
    let result = json!({
        "mode": "fresh",
        "seed": seed,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        "requests": delays.0.len(),
        "requests_per_second": delays.0.len() as f64 / elapsed,
        "latency_ms": delays.summary(),
    });
    print_result(&args, &result);
    Ok(())
}

/// Writes one event of `video` and asks `reader` for its count until it is 1: the
/// microseconds from the acknowledgement until then.
async fn time_to_visible(writer: &Api, reader: &Api, video: &str) -> anyhow::Result<u32> {
    let body = Bytes::from(json!([{ "video_id": video }]).to_string());
    let headers = [("content-type", "application/json"), ("idempotency-key", video)];
    let answer = writer.request_retrying(Method::POST, "/v1/events", &headers, body).await?;
    anyhow::ensure!(answer.status.is_success(), "write failed: {}", answer.error_text());
    let acknowledged = Instant::now();
    let path = format!("/v1/count?video_id={}&from=0", encode_query(video));
    loop {
        let count = reader.get_json(&path).await?["count"].as_u64().unwrap_or(0);
        if count > 0 {
            anyhow::ensure!(count == 1, "{video} counts {count}, written once");
            return Ok(Latencies::micros(acknowledged.elapsed()));
        }
        anyhow::ensure!(acknowledged.elapsed() < FRESH_WAIT_MAX, "{video} did not count within {FRESH_WAIT_MAX:?}");
        tokio::time::sleep(FRESH_POLL).await;
    }
}

/// The furthest log position the acknowledgements named, per partition.
#[derive(Default)]
struct Reached(std::sync::Mutex<tally_engine::Position>);

impl Reached {
    /// Takes the `position` of a write's answer.
    fn record(&self, answer: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(answer) else { return };
        let Some(Ok(position)) = answer["position"].as_str().map(str::parse) else { return };
        self.0.lock().expect("not poisoned").extend(&position);
    }

    fn position(&self) -> String {
        self.0.lock().expect("not poisoned").to_string()
    }
}

/// The all-time count of every bench video (`v0`…) of one type, a page of ids per request
/// (the server's default page limit).
async fn count_all(client: &Api, videos: u32, event_type: &str) -> anyhow::Result<Vec<u64>> {
    count_all_after(client, videos, event_type, "").await
}

/// `count_all` once the server has reached `position` (waiting up to a minute).
async fn count_all_after(client: &Api, videos: u32, event_type: &str, position: &str) -> anyhow::Result<Vec<u64>> {
    let path = if position.is_empty() {
        "/v1/counts".to_string()
    } else {
        format!("/v1/counts?after={position}&wait_ms=60000")
    };
    let page = tally_server::ServerConfig::default().counts_video_ids_max as u32;
    let mut counts = Vec::with_capacity(videos as usize);
    for chunk_start in (0..videos).step_by(page as usize) {
        let ids: Vec<String> = (chunk_start..(chunk_start + page).min(videos)).map(|v| format!("v{v}")).collect();
        let answer = client
            .post_json(&path, &json!({ "video_ids": ids, "type": event_type }))
            .await
            .context("counts query failed")?;
        counts.extend(ids.iter().map(|id| answer["counts"][id].as_u64().unwrap_or(0)));
    }
    Ok(counts)
}

fn print_result(args: &BenchArgs, result: &serde_json::Value) {
    if args.json {
        println!("{result}");
        return;
    }
    let l = &result["latency_ms"];
    let percentiles =
        format!("p50 {} p90 {} p99 {} p99.9 {} max {}", l["p50"], l["p90"], l["p99"], l["p999"], l["max"]);
    if result["mode"] == "fresh" {
        println!("{} writes in {:.1} s", result["requests"], result["seconds"].as_f64().unwrap_or(0.0));
        println!("acknowledged to visible, ms: {percentiles}");
        return;
    }
    if result["mode"] == "write" {
        println!(
            "{} events in {:.1} s: {:.0} events/s, {:.0} requests/s",
            result["events"],
            result["seconds"].as_f64().unwrap_or(0.0),
            result["events_per_second"].as_f64().unwrap_or(0.0),
            result["requests_per_second"].as_f64().unwrap_or(0.0)
        );
    } else {
        println!(
            "{} requests in {:.1} s: {:.0} requests/s",
            result["requests"],
            result["seconds"].as_f64().unwrap_or(0.0),
            result["requests_per_second"].as_f64().unwrap_or(0.0)
        );
    }
    println!("latency ms: {percentiles}");
    if result["mode"] == "top" {
        println!("exact answers: {} of {}", result["exact_answers"], result["requests"]);
    }
    if result["mode"] == "write" {
        println!(
            "verified: server counts {} {}events, {} videos differ{}",
            result["counted"],
            if result["fresh_type"] == true { "" } else { "more " },
            result["mismatched_videos"],
            if result["fresh_type"] == true { "" } else { " (other writers of this type would show as differences)" }
        );
    }
}
