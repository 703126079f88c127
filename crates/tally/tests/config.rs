//! Configuration through the real binary: file, `TALLY_*` variables and flags, each over
//! the one before, in human units; `--check-config`; `deploy/tally.toml` at the defaults;
//! host names in `--listen`; JSON logs and the access log.

mod common;

use std::path::Path;
use std::process::Command;

fn check_config(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(common::tally_binary());
    command.args(["serve", "--check-config"]).args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("TALLY_")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).output().unwrap()
}

/// The value `--check-config` printed for `key`.
fn value<'a>(printed: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    printed.lines().find_map(|line| line.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{key} in {printed}"))
}

#[test]
fn file_then_environment_then_flags_each_override_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tally.toml");
    std::fs::write(
        &file,
        "partitions = 8\nflush_interval = \"2s\"\ndedup_window = \"20m\"\nbody_bytes_max = \"1MiB\"\n",
    )
    .unwrap();
    let env = [("TALLY_FLUSH_INTERVAL", "3s"), ("TALLY_DEDUP_WINDOW", "30m"), ("TALLY_CONFIG", file.to_str().unwrap())];
    let out = check_config(&["--dedup-window", "40m", "--queue-bytes-max", "64MiB"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(value(&printed, "partitions"), "8", "from the file");
    assert_eq!(value(&printed, "body_bytes_max"), "\"1MiB\"", "from the file");
    assert_eq!(value(&printed, "flush_interval"), "\"3s\"", "the variable beats the file");
    assert_eq!(value(&printed, "dedup_window"), "\"40m\"", "the flag beats the variable");
    assert_eq!(value(&printed, "queue_bytes_max"), "\"64MiB\"", "a flag alone");
    assert!(printed.contains("# kafka is not set"), "{printed}");

    let out = check_config(&[], &[("TALLY_FLUSH_INTERVAL", "10")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is not a duration"), "a bare number names the units: {stderr}");
    let out = check_config(&["--listen", "0.0.0.0:8080"], &[]);
    assert!(!out.status.success(), "beyond loopback, keys are required");
    assert!(String::from_utf8_lossy(&out.stderr).contains("keys_file"));
}

#[test]
fn deploy_tally_toml_names_every_key_at_its_default() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/tally.toml");
    let defaults = check_config(&[], &[]);
    let from_file = check_config(&["--config", deploy.to_str().unwrap()], &[]);
    assert!(from_file.status.success(), "{}", String::from_utf8_lossy(&from_file.stderr));
    assert_eq!(String::from_utf8_lossy(&from_file.stdout), String::from_utf8_lossy(&defaults.stdout));
    let text = std::fs::read_to_string(&deploy).unwrap();
    let printed = String::from_utf8(defaults.stdout).unwrap();
    for line in printed.lines() {
        let key = line.trim_start_matches("# ").split(' ').next().unwrap();
        let documented =
            text.lines().any(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = ")));
        assert!(documented, "deploy/tally.toml lacks {key}");
    }
}

#[test]
fn listen_takes_a_host_name_and_logs_are_json_with_an_access_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--listen", "localhost:0", "--log-format", "json", "--access-log", "true"];
    let mut server = common::spawn_serve(&dir.path().join("data"), "", &args);
    server.wait_ready();
    assert!(server.address.ip().is_loopback());
    let answer = server.get("/v1/count?video_id=never-logged");
    assert_eq!(answer.status, 200);
    server.terminate(std::time::Duration::from_secs(60));
    let log = server.log();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"))).collect();
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string()), "{log}");
    let access = lines
        .iter()
        .find(|l| l["target"] == "tally::access" && l["path"] == "/v1/count")
        .unwrap_or_else(|| panic!("no access line: {log}"));
    assert_eq!((access["method"].as_str(), access["status"].as_u64()), (Some("GET"), Some(200)));
    assert!(access["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{access}");
    assert!(access["duration_ms"].is_number() && access["bytes"].is_number(), "{access}");
    assert!(!log.contains("never-logged"), "the query string, which may hold a key, is not logged");
}
