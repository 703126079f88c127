//! A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` from the `postgresql`
//! package, in a temporary directory, listening on a free port of 127.0.0.1. Run as
//! root (as CI does), the server runs as the `postgres` user, since PostgreSQL refuses
//! to run as root. No PostgreSQL installed is a failure that says what to install, never
//! a skipped test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    running: bool,
}

/// The directory holding `initdb` and `pg_ctl`: Debian's newest, else `PATH`'s.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return newest;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists()).unwrap_or_else(
        || panic!("PostgreSQL is not installed (no initdb or pg_ctl): apt-get install postgresql, as .ci/run does"),
    )
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl Postgres {
    /// Creates a cluster and starts it; the database `tally` exists, user `tally`, trust
    /// authentication on 127.0.0.1.
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new().prefix("tally-pg-").tempdir().expect("temporary directory");
        let bin = bin_dir();
        let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().unwrap().port();
        let mut server = Postgres { dir, bin, port, running: false };
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(server.dir.path()));
        }
        let data = server.data().to_str().unwrap().to_string();
        server.run_as_owner(
            "initdb",
            &["-D", &data, "-U", "tally", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
        );
        server.start_again();
        server.sql("postgres", "CREATE DATABASE tally");
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://tally@127.0.0.1:PORT/tally`
    pub fn url(&self) -> String {
        format!("postgres://tally@127.0.0.1:{}/tally", self.port)
    }

    /// Starts the server again after `stop`, on the same port.
    pub fn start_again(&mut self) {
        let data = self.data().to_str().unwrap().to_string();
        let log = self.dir.path().join("server.log").to_str().unwrap().to_string();
        // fsync off: the tests kill tally, not the machine; commits still reach the OS.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        self.run_as_owner("pg_ctl", &["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start"]);
        self.running = true;
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`): open
    /// connections break, nothing committed is lost.
    pub fn stop(&mut self) {
        let data = self.data().to_str().unwrap().to_string();
        self.run_as_owner("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        self.running = false;
    }

    /// A new, empty database on this server; returns its URL. For tests that need many
    /// fresh databases (one per property-test case) and one server.
    pub fn create_database(&self) -> String {
        static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!("case_{}", CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        format!("postgres://tally@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` with `psql` in `database` and returns its unaligned output (one row per
    /// line, columns separated by `|`); a failing statement panics with the error.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", self.dir.path().to_str().unwrap(), "-p", &self.port.to_string(), "-U", "tally"])
            .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .expect("run psql");
        check(&format!("psql {sql:?}"), &output);
        String::from_utf8_lossy(&output.stdout).trim_end().to_string()
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `program` from the server's binaries, run as the owner of its files.
    fn owner_command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn run_as_owner(&self, program: &str, args: &[&str]) {
        let output = self
            .owner_command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        if !output.status.success() {
            panic!("{program} {args:?} failed: {}\n{}", describe(&output), self.log());
        }
    }
}

fn run(command: &mut Command) {
    let output = command.output().expect("run command");
    check(&format!("{command:?}"), &output);
}

fn check(what: &str, output: &Output) {
    assert!(output.status.success(), "{what} failed: {}", describe(output));
}

fn describe(output: &Output) -> String {
    format!("{}{}{}", output.status, String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = self.owner_command("pg_ctl").arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]).output();
        }
    }
}
