//! Cluster fixtures: a Kafka-protocol broker (tansu), PostgreSQL, tally nodes and HAProxy
//! (from `deploy/haproxy.cfg`), all on loopback ports picked here. Absent tools are a
//! failure that says how to install them (as `.ci/run` does), never a skipped test.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Server, request, spawn_serve, tally_binary};

/// A free port of 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A program on `PATH` or in `~/.cargo/bin`, or a failure naming how to install it.
pub fn program(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: {install} (as .ci/run does)"))
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tansu broker. Its storage: `memory://` (lost at exit), or SQLite in its directory
/// (kept across restarts).
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    storage: String,
    dir: PathBuf,
}

impl Broker {
    pub fn start(dir: &Path, durable: bool) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        // A relative path: tansu reads `sqlite://` URLs relative to its directory.
        let storage = if durable { "sqlite://tansu.db".to_string() } else { "memory://tansu/".into() };
        let mut broker = Broker { child: None, port: free_port(), storage, dir: dir.into() };
        broker.start_again();
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        let tansu = program("tansu", "cargo install tansu --version 0.6.0 --locked --features dynostore,libsql");
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.join("broker.log")).unwrap();
        let mut child = Command::new(tansu)
            .current_dir(&self.dir)
            .args(["broker", "--storage-engine", &self.storage, "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        wait_for_port(self.port, "tansu", &mut child);
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// HAProxy on `deploy/haproxy.cfg`, its addresses replaced by the ports given.
pub struct Balancer {
    child: Child,
    pub address: SocketAddr,
}

impl Balancer {
    pub fn start(dir: &Path, nodes: &[u16]) -> Balancer {
        let haproxy = program("haproxy", "apt-get install haproxy");
        let template = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/haproxy.cfg");
        let mut config = std::fs::read_to_string(template).unwrap();
        let port = free_port();
        config = config.replace("bind 127.0.0.1:8080", &format!("bind 127.0.0.1:{port}"));
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| format!("    server node{} 127.0.0.1:{node} check\n", i + 1))
            .collect();
        let first = config.find("    server node1").expect("the template lists its nodes last");
        config.truncate(first);
        config.push_str(&servers);
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        wait_for_port(port, "haproxy", &mut child);
        Balancer { child, address: ([127, 0, 0, 1], port).into() }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tally cluster init`, checked to succeed; its output.
pub fn init(brokers: &str, postgres: &str, partitions: u32) -> String {
    let output = Command::new(tally_binary())
        .args(["cluster", "init", "--kafka", brokers, "--postgres", postgres])
        .args(["--partitions", &partitions.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cluster init failed: {text}");
    text
}

/// A cluster node on `port`.
pub fn node(dir: &Path, name: &str, port: u16, brokers: &str, postgres: &str, extra: &str) -> Server {
    let config = format!("kafka = \"{brokers}\"\npostgres = \"{postgres}\"\n{extra}");
    let listen = format!("127.0.0.1:{port}");
    let server = spawn_serve(&dir.join(name), &config, &["--listen", &listen]);
    server.wait_ready();
    server
}

/// Whether every partition is owned by one of `nodes` (their `/metrics`).
pub fn all_owned(nodes: &[&Server], partitions: u32) -> bool {
    let mut owned = vec![false; partitions as usize];
    for node in nodes {
        let Ok(answer) = request(node.address, "GET", "/metrics", &[], b"") else { continue };
        for line in answer.text().lines().filter(|l| l.starts_with("tally_partition_owned{")) {
            let partition = line.split("partition=\"").nth(1).and_then(|r| r.split('"').next());
            if let (Some(partition), Some(" 1")) =
                (partition.and_then(|p| p.parse::<usize>().ok()), line.rsplit_once('}').map(|(_, v)| v))
            {
                owned[partition] = true;
            }
        }
    }
    owned.iter().all(|o| *o)
}
