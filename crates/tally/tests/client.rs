//! The client library (`tally-client`) against a real server, directly and through a
//! fault-injecting proxy that refuses, slows, and resets: every event the library reports
//! as acknowledged is counted once, none twice; the circuit breaker opens and recovers;
//! the buffer's bound holds; https with a private CA.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tally_client::{BreakerConfig, BreakerState, Client, ClientConfig, Error, Event, RetryPolicy, WhenFull};

/// What the proxy does with a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Fault {
    /// Forward it and its answer.
    None = 0,
    /// Answer 503 with `Retry-After: 0` without forwarding.
    Unavailable = 1,
    /// Close the connection without reading the request.
    Refuse = 2,
    /// Forward it, then wait past the client's timeout before answering.
    Slow = 3,
    /// Forward it (the server counts it), then cut the connection instead of answering.
    ResetAfter = 4,
    /// A mix of all of the above, chosen at random per request.
    Mixed = 5,
}

struct Proxy {
    address: std::net::SocketAddr,
    mode: Arc<AtomicU8>,
    forwarded: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: String, slow: Duration) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (mode, forwarded) = (Arc::new(AtomicU8::new(Fault::None as u8)), Arc::new(AtomicU64::new(0)));
        let client: HyperClient<HttpConnector, Full<Bytes>> =
            HyperClient::builder(TokioExecutor::new()).build(HttpConnector::new());
        let (mode_in, forwarded_in) = (Arc::clone(&mode), Arc::clone(&forwarded));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let fault = Proxy::choose(mode_in.load(Relaxed));
                if fault == Fault::Refuse {
                    drop(stream);
                    continue;
                }
                let (client, upstream, forwarded) = (client.clone(), upstream.clone(), Arc::clone(&forwarded_in));
                let mode = Arc::clone(&mode_in);
                let service = hyper::service::service_fn(move |request| {
                    let fault = Proxy::choose(mode.load(Relaxed));
                    Proxy::handle(request, fault, client.clone(), upstream.clone(), Arc::clone(&forwarded), slow)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Proxy { address, mode, forwarded }
    }

    fn choose(mode: u8) -> Fault {
        let faults = [Fault::None, Fault::Unavailable, Fault::Refuse, Fault::Slow, Fault::ResetAfter];
        match mode {
            5 => faults[rand::rng().random_range(0..faults.len())],
            mode => faults[usize::from(mode)],
        }
    }

    fn set(&self, fault: Fault) {
        self.mode.store(fault as u8, Relaxed);
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn handle(
        request: Request<hyper::body::Incoming>,
        fault: Fault,
        client: HyperClient<HttpConnector, Full<Bytes>>,
        upstream: String,
        forwarded: Arc<AtomicU64>,
        slow: Duration,
    ) -> Result<Response<Full<Bytes>>, std::io::Error> {
        if fault == Fault::Unavailable || fault == Fault::Refuse {
            let body = Full::new(Bytes::from_static(br#"{"error":"overloaded","message":"injected"}"#));
            let answer = Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).header("retry-after", "0");
            return Ok(answer.body(body).unwrap());
        }
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(std::io::Error::other)?.to_bytes();
        let mut outgoing = Request::builder().method(parts.method).uri(format!("{upstream}{}", parts.uri));
        for (name, value) in &parts.headers {
            outgoing = outgoing.header(name, value);
        }
        let response = client.request(outgoing.body(Full::new(body)).unwrap()).await.map_err(std::io::Error::other)?;
        forwarded.fetch_add(1, Relaxed);
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(std::io::Error::other)?.to_bytes();
        match fault {
            Fault::Slow => tokio::time::sleep(slow).await,
            // An error from the service makes hyper drop the connection unanswered.
            Fault::ResetAfter => return Err(std::io::Error::other("injected reset")),
            _ => {}
        }
        Ok(Response::from_parts(parts, Full::new(body)))
    }
}

/// A client that gives up on nothing the test's faults cause: short timeout and backoff,
/// many attempts.
fn patient_config(server: &str) -> ClientConfig {
    let mut config = ClientConfig::new(server);
    config.api.timeout = Duration::from_millis(300);
    config.api.retry = RetryPolicy {
        attempts: 200,
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        retry_after_max: Duration::from_secs(1),
        give_up_after: Duration::from_secs(120),
    };
    config.api.breaker = BreakerConfig { failures_to_open: 20, open_for: Duration::from_millis(50) };
    config.batch_events_max = 50;
    config.linger = Duration::from_millis(5);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_counted_once_through_refusals_slow_answers_and_resets() {
    let (_dir, server) = common::server("");
    let proxy = Proxy::start(server.url(), Duration::from_millis(600)).await;
    proxy.set(Fault::Mixed);
    let client = Client::new(patient_config(&proxy.url())).unwrap();
    let events = 3_000;
    for i in 0..events {
        client.send(&Event::view(format!("faulty-{}", i % 7))).await.unwrap();
    }
    let stats = client.close().await.unwrap();
    assert_eq!(stats.events_failed, 0, "nothing was given up on: {stats:?}");
    assert_eq!(stats.events_accepted, events, "every event acknowledged as new once: {stats:?}");
    assert!(stats.retries > 0, "the faults caused retries: {stats:?}");
    assert!(proxy.forwarded.load(Relaxed) > stats.requests - stats.retries, "some batches reached the server twice");
    let counted: u64 = (0..7).map(|v| server.count(&format!("faulty-{v}"))).sum();
    assert_eq!(counted, events, "the server counted each event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_while_the_server_fails_and_closes_when_it_recovers() {
    let (_dir, server) = common::server("");
    let proxy = Proxy::start(server.url(), Duration::ZERO).await;
    proxy.set(Fault::Unavailable);
    let mut config = patient_config(&proxy.url());
    config.api.breaker = BreakerConfig { failures_to_open: 3, open_for: Duration::from_millis(400) };
    let client = Client::new(config).unwrap();
    for i in 0..10 {
        client.send(&Event::view("breaker").with_id(format!("b{i}"))).await.unwrap();
    }
    let opened = wait_until(|| client.stats().breaker_state == BreakerState::Open).await;
    assert!(opened, "the breaker opened: {:?}", client.stats());
    let requests = client.stats().requests;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(client.stats().requests <= requests + 1, "an open breaker sends nothing (a probe at most)");
    proxy.set(Fault::None);
    client.flush().await.unwrap();
    let stats = client.stats();
    assert_eq!(stats.breaker_state, BreakerState::Closed, "a good probe closed it: {stats:?}");
    assert!(stats.breaker_opened >= 1);
    assert_eq!((stats.events_accepted, stats.events_failed), (10, 0));
    assert_eq!(server.count("breaker"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_or_waits_as_asked_and_never_grows() {
    let (_dir, server) = common::server("");
    let proxy = Proxy::start(server.url(), Duration::ZERO).await;
    proxy.set(Fault::Unavailable);
    let line_bytes = serde_json::to_vec(&Event::view("full")).unwrap().len() + 1;
    let mut config = patient_config(&proxy.url());
    (config.batch_bytes_max, config.buffer_bytes_max) = (line_bytes * 10, line_bytes * 20);
    config.when_full = WhenFull::Drop;
    let dropping = Client::new(config.clone()).unwrap();
    let mut refused = 0;
    for _ in 0..50 {
        match dropping.send(&Event::view("full")).await {
            Ok(()) => {}
            Err(Error::Full) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(refused, 30, "20 events fit the buffer, the rest are dropped");
    assert_eq!((dropping.stats().events_dropped, dropping.stats().events_buffered), (30, 20));

    config.when_full = WhenFull::Wait;
    let waiting = Client::new(config).unwrap();
    for _ in 0..20 {
        waiting.send(&Event::view("full")).await.unwrap();
    }
    let blocked = tokio::time::timeout(Duration::from_millis(300), waiting.send(&Event::view("full"))).await;
    assert!(blocked.is_err(), "with a full buffer, send waits");
    proxy.set(Fault::None);
    waiting.send(&Event::view("full")).await.unwrap();
    let (dropped, waited) = (dropping.close().await.unwrap(), waiting.close().await.unwrap());
    assert_eq!((dropped.events_accepted, waited.events_accepted), (20, 21));
    assert_eq!(server.count("full"), 41);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_invalid_event_is_sent_again_without_it() {
    let (_dir, server) = common::server("");
    let mut config = patient_config(&server.url());
    config.linger = Duration::from_secs(60);
    let client = Client::new(config).unwrap();
    for i in 0..10 {
        let event = Event::view("mixed");
        client.send(&if i == 4 { event.of_type("Not A Type") } else { event }).await.unwrap();
    }
    let stats = client.close().await.unwrap();
    assert_eq!((stats.events_accepted, stats.events_failed), (9, 1), "{stats:?}");
    assert_eq!(server.count("mixed"), 9, "the nine valid events of the batch are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_refusals_are_not_retried() {
    let (_dir, server) = common::server("");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&calls);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = Arc::clone(&counter);
            let service = hyper::service::service_fn(move |_request| {
                let first = counter.fetch_add(1, Relaxed) == 0;
                let (status, retry_after) = if first { (429, "1") } else { (400, "0") };
                let answer = Response::builder().status(status).header("retry-after", retry_after);
                async move { Ok::<_, Infallible>(answer.body(Full::new(Bytes::from_static(b"{}"))).unwrap()) }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    let api = tally_client::Api::new(patient_config(&format!("http://{address}")).api).unwrap();
    let started = Instant::now();
    let error = api.post_events(Bytes::from_static(b"{\"video_id\":\"x\"}\n"), "k1").await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(1), "waited for Retry-After: 1");
    assert!(matches!(&error, Error::Refused(answer) if answer.status == 400), "{error}");
    assert_eq!(calls.load(Relaxed), 2, "the 400 is final");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_and_a_key() {
    let keys = tempfile::tempdir().unwrap();
    let keys_file = keys.path().join("keys.json");
    let key = common::create_key(&keys_file, &["--scope", "write,read"]);
    let config = format!("keys_file = {:?}\nkeys_required = true\n", keys_file.display().to_string());
    let (_dir, server) = common::server(&config);
    let (proxy, ca_pem) = tls_proxy(server.address).await;

    let mut config = ClientConfig::new(format!("https://localhost:{}", proxy.port()));
    config.api.ca_pem = Some(ca_pem.clone().into_bytes());
    config.api.key = Some(key);
    let client = Client::new(config.clone()).unwrap();
    client.send(&Event::view("tls")).await.unwrap();
    let stats = client.close().await.unwrap();
    assert_eq!((stats.events_accepted, stats.events_failed), (1, 0));
    let counted = tally_client::Api::new(config.api.clone()).unwrap().get_json("/v1/count?video_id=tls").await.unwrap();
    assert_eq!(counted["count"], 1, "counted through https with the key");

    config.api.ca_pem = None;
    config.api.retry.attempts = 1;
    let untrusted = tally_client::Api::new(config.api.clone()).unwrap();
    let error = untrusted.get_json("/v1/count?video_id=tls").await.unwrap_err();
    assert!(error.to_string().contains("certificate"), "an unknown CA is refused: {error}");

    config.api.ca_pem = Some(ca_pem.into_bytes());
    config.api.key = None;
    let keyless = tally_client::Api::new(config.api).unwrap();
    let error = keyless.get_json("/v1/count?video_id=tls").await.unwrap_err();
    assert!(matches!(&error, Error::Refused(answer) if answer.status == 401), "{error}");
}

/// A TLS-terminating proxy in front of `upstream`, with a certificate for `localhost`
/// signed by a fresh CA; returns its address and the CA's PEM.
async fn tls_proxy(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut plain = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (address, ca.pem())
}

/// Polls `condition` for up to 30 s.
async fn wait_until(condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
