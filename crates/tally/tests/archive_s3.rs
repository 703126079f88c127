//! The raw-event archive on S3-compatible object storage: moto's S3 server (PyPI
//! `moto[server]`, installed by `.ci/run`) behind a proxy the test can cut. Events go in
//! while the object store refuses every request: ingest goes on, `/readyz` and the metrics
//! say why, the log keeps its segments; a SIGKILL and a start while the store is still
//! down, then the store back and a clean stop leave every counted event archived once,
//! which `tally audit` proves.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BUCKET: &str = "tally-archive";

/// moto's S3 server on a free port, stopped when dropped.
struct Moto {
    child: Child,
    address: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// moto's S3 server on a free port, with the bucket made. A port freed for it may be taken
/// by another test's listener before moto binds it (moto then exits): another is tried.
fn start_moto() -> Moto {
    for attempt in 1..=5 {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server must be installed (.ci/run installs moto[server])");
        let mut moto = Moto { child, address: SocketAddr::from(([127, 0, 0, 1], port)) };
        if bucket_made(&mut moto) {
            return moto;
        }
        eprintln!("moto_server on port {port} did not come up (attempt {attempt}); trying another port");
    }
    panic!("moto_server did not come up on any of 5 ports");
}

/// Makes the bucket once moto answers: false if moto exited, or something else answered.
fn bucket_made(moto: &mut Moto) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if moto.child.try_wait().unwrap().is_some() {
            return false;
        }
        if let Ok(created) = common::request(moto.address, "PUT", &format!("/{BUCKET}"), &[], b"") {
            return created.status == 200;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Forwards connections to `target` while `up`; refuses them (closed at once) while not.
fn proxy(target: SocketAddr, up: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if !up.load(Ordering::Acquire) {
                continue;
            }
            let Ok(server) = TcpStream::connect(target) else { continue };
            let (client_reader, server_reader) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || pipe(client_reader, server));
            std::thread::spawn(move || pipe(server_reader, client));
        }
    });
    address
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 << 10];
    while let Ok(read) = from.read(&mut buffer) {
        if read == 0 || to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn s3_env(endpoint: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", format!("http://{endpoint}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "tally-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "tally-test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn serve(data: &std::path::Path, env: &[(&'static str, String)]) -> common::Server {
    let config = format!(
        "archive = \"s3://{BUCKET}/events-of-test\"\narchive_file_interval = \"200ms\"\nflush_interval = \"100ms\"\n\
         partitions = 2\nsegment_bytes_max = 65536\n"
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = common::spawn_serve_env(data, &config, &["--listen", "127.0.0.1:0"], &env);
    server.wait_ready();
    server
}

/// Waits until `/readyz` says the archive is `status`; its answer.
fn wait_for_archive(server: &common::Server, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = server.get("/readyz");
        assert_eq!(ready.status, 200, "archiving trouble does not make the server unready: {}", ready.text());
        if ready.json()["archive"]["status"] == status {
            return ready.json();
        }
        assert!(Instant::now() < deadline, "the archive never became {status}: {}", ready.text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `tally audit` of the test's S3 archive against `server`.
fn audit(env: &[(&'static str, String)], server: &common::Server) -> std::process::Output {
    Command::new(common::tally_binary())
        .args(["audit", "--archive", &format!("s3://{BUCKET}/events-of-test"), "--server", &server.url()])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

fn batch(round: usize) -> String {
    // Events 900 to 999 repeat an (event id, video) of the batch: duplicates, not counted.
    (0..1000)
        .map(|i| {
            let (video, id) = (i % 900 % 13, i % 900);
            format!("{{\"video_id\":\"s3-{video}\",\"event_id\":\"{round}-{id}\",\"viewer_id\":\"u{}\"}}\n", id % 97)
        })
        .collect()
}

#[test]
fn an_s3_archive_survives_refused_writes_and_a_sigkill_and_the_audit_finds_no_difference() {
    let moto = start_moto();
    let up = Arc::new(AtomicBool::new(true));
    let endpoint = proxy(moto.address, Arc::clone(&up));
    let env = s3_env(endpoint);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = serve(&data, &env);
    assert_eq!(server.post_ndjson(batch(0).as_bytes()).status, 200);

    up.store(false, Ordering::Release);
    for round in 1..=20 {
        assert_eq!(server.post_ndjson(batch(round).as_bytes()).status, 200, "ingest goes on without the archive");
    }
    let ready = wait_for_archive(&server, "failing");
    let archive = &ready["archive"];
    assert!(archive["error"].as_str().is_some_and(|e| !e.is_empty()), "{archive}");
    assert!(archive["lag_bytes"].as_u64().unwrap() > 0, "{archive}");
    let metrics = server.get("/metrics").text();
    assert_eq!(common::metric(&metrics, "tally_archive_failing"), Some(1.0), "{metrics}");
    let segments = |partition: u32| std::fs::read_dir(data.join(format!("wal/p{partition:03}"))).unwrap().count();
    assert!(segments(0) + segments(1) > 4, "the log keeps what the archive has not taken");

    // A crash while the store is down, and a start while it still is: the server starts
    // and acknowledges all the same.
    server.kill();
    let mut server = serve(&data, &env);
    assert_eq!(server.post_ndjson(batch(21).as_bytes()).status, 200);
    let ready = wait_for_archive(&server, "failing");
    assert!(ready["archive"]["error"].as_str().unwrap().contains("archive"), "{ready}");

    up.store(true, Ordering::Release);
    wait_for_archive(&server, "ok");
    assert_eq!(server.post_ndjson(batch(22).as_bytes()).status, 200);
    let counted: u64 = (0..13).map(|v| server.count(&format!("s3-{v}"))).sum();
    assert_eq!(counted, 23 * 900, "each batch holds 900 distinct event ids");
    assert!(server.terminate(Duration::from_secs(60)).success());

    let server = serve(&data, &env);
    let audit = audit(&env, &server);
    let (stdout, stderr) = (String::from_utf8_lossy(&audit.stdout), String::from_utf8_lossy(&audit.stderr));
    assert!(audit.status.success(), "audit: {stdout}\n{stderr}");
    assert!(stdout.contains("no differences"), "{stdout}");
    assert!(stderr.contains(&format!("archive: {} rows read", 23 * 900)), "every counted event once: {stderr}");
    let listing =
        common::request(moto.address, "GET", &format!("/{BUCKET}?list-type=2&prefix=events-of-test/"), &[], b"")
            .unwrap();
    assert!(
        listing.text().contains("events-of-test/events/date="),
        "laid out by date under the prefix: {}",
        listing.text()
    );
}

/// Archiving enabled while the object store is down, across a crash: what was counted
/// before the archive was first reached is archived all the same (the log kept it).
#[test]
fn an_archive_first_reached_after_a_restart_still_gets_everything_counted_before() {
    let moto = start_moto();
    let up = Arc::new(AtomicBool::new(false));
    let env = s3_env(proxy(moto.address, Arc::clone(&up)));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = serve(&data, &env);
    assert_eq!(server.post_ndjson(batch(0).as_bytes()).status, 200);
    let ready = wait_for_archive(&server, "failing");
    assert!(ready["archive"]["lag_bytes"].is_null(), "unknown until the archive is reached: {ready}");
    server.kill();
    let mut server = serve(&data, &env);
    assert_eq!(server.post_ndjson(batch(1).as_bytes()).status, 200);
    up.store(true, Ordering::Release);
    wait_for_archive(&server, "ok");
    assert!(server.terminate(Duration::from_secs(60)).success());
    let server = serve(&data, &env);
    let audit = audit(&env, &server);
    let (stdout, stderr) = (String::from_utf8_lossy(&audit.stdout), String::from_utf8_lossy(&audit.stderr));
    assert!(audit.status.success() && stdout.contains("no differences"), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("archive: {} rows read", 2 * 900)), "both batches archived: {stderr}");
}
