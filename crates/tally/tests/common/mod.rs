//! Test harness: runs the real `tally` binary on port 0 in a temporary data directory,
//! and talks to it with a minimal blocking HTTP/1.1 client.

#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub address: SocketAddr,
    pub data_dir: PathBuf,
    /// Everything the server wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

/// How long a server may take to start and recover in tests.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn tally_binary() -> &'static str {
    env!("CARGO_BIN_EXE_tally")
}

/// Starts `tally serve` with `config` (TOML) and waits until `/readyz` says ready.
pub fn start(data_dir: &Path, config: &str) -> Server {
    let server = spawn(data_dir, config);
    server.wait_ready();
    server
}

/// A ready server on a fresh temporary data directory (removed when the guard drops).
pub fn server(config: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), config);
    (dir, server)
}

/// `start` with more command-line arguments.
pub fn start_with(data_dir: &Path, config: &str, args: &[&str]) -> Server {
    let server = spawn_with(data_dir, config, args);
    server.wait_ready();
    server
}

/// Starts `tally serve` and returns once it listens (it may still be recovering).
pub fn spawn(data_dir: &Path, config: &str) -> Server {
    spawn_with(data_dir, config, &[])
}

/// `spawn` with more command-line arguments.
pub fn spawn_with(data_dir: &Path, config: &str, args: &[&str]) -> Server {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    spawn_serve(data_dir, config, &all)
}

/// `tally serve --data-dir DATA_DIR --config (CONFIG written beside it) ARGS…`, returned
/// once it listens.
pub fn spawn_serve(data_dir: &Path, config: &str, args: &[&str]) -> Server {
    spawn_serve_env(data_dir, config, args, &[])
}

/// `spawn_serve` with more environment variables.
pub fn spawn_serve_env(data_dir: &Path, config: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
    let config_path = data_dir.with_extension("toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(tally_binary())
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(&config_path)
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tally");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let thread_log = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut address_tx = Some(address_tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // Text logs say address=http://…, JSON logs "address":"http://…".
            let text = line.split("address=http://").nth(1).and_then(|rest| rest.split_whitespace().next());
            let json = || line.split("\"address\":\"http://").nth(1).and_then(|rest| rest.split('"').next());
            if let Some(found) = text.or_else(json) {
                let address: SocketAddr = found.parse().unwrap();
                if let Some(tx) = address_tx.take() {
                    let _ = tx.send(address);
                }
            }
            let mut log = thread_log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let address = address_rx
        .recv_timeout(START_TIMEOUT)
        .unwrap_or_else(|_| panic!("server did not start: {}", log.lock().unwrap()));
    Server { child, address, data_dir: data_dir.into(), log }
}

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body of an error answer, checked against the error contract: JSON (and said to
    /// be) with a string `error` and `message`.
    pub fn error_json(&self) -> serde_json::Value {
        assert_eq!(self.header("content-type"), Some("application/json"), "{} {}", self.status, self.text());
        let json = self.json();
        assert!(json["error"].is_string() && json["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
        json
    }
}

/// One request on a fresh connection (`Connection: close`). `Err` if the connection failed
/// or closed before a whole answer arrived: the request may or may not have been applied.
pub fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_answer(&raw).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "incomplete answer"))
}

fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))).collect();
    let body = raw[split + 4..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(length) if body.len() < length => None,
        Some(length) => Some(Answer { status, headers, body: body[..length].to_vec() }),
        None => Some(Answer { status, headers, body }),
    }
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn get(&self, path: &str) -> Answer {
        request(self.address, "GET", path, &[], b"").unwrap()
    }

    pub fn post_json(&self, path: &str, body: &str) -> Answer {
        request(self.address, "POST", path, &[("content-type", "application/json")], body.as_bytes()).unwrap()
    }

    pub fn post_events(&self, body: &str, headers: &[(&str, &str)]) -> Answer {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        request(self.address, "POST", "/v1/events", &all, body.as_bytes()).unwrap()
    }

    pub fn post_ndjson(&self, body: &[u8]) -> Answer {
        request(self.address, "POST", "/v1/events", &[("content-type", "application/x-ndjson")], body).unwrap()
    }

    /// The count of one video's `view` events over all time.
    pub fn count(&self, video_id: &str) -> u64 {
        let answer = self.get(&format!("/v1/count?video_id={video_id}"));
        assert_eq!(answer.status, 200, "{}", answer.text());
        answer.json()["count"].as_u64().unwrap()
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(answer) = request(self.address, "GET", "/readyz", &[], b"")
                && answer.status == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server never became ready: {}", self.log.lock().unwrap());
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.child.wait().unwrap();
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process, whose pid is valid until waited.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then the exit status, within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the server's log says `needle` within a few seconds (the log is read by
    /// another thread, which may lag behind the process, even after it exited).
    pub fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Now, epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The value of the first sample of metric `name` (with or without labels) in a
/// Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `tally keys create --file FILE ARGS…`: the key it prints.
pub fn create_key(file: &Path, args: &[&str]) -> String {
    let output = Command::new(tally_binary()).args(["keys", "create", "--file"]).arg(file).args(args).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}
