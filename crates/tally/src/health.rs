//! `tally health`: one probe of a server's `/healthz` (alive) or `/readyz` (ready for
//! traffic), for container health checks where no HTTP client is installed. Exit 0 on a
//! 200, 1 on anything else, with one line saying which.

use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use hyper::{Method, StatusCode};

/// Time the whole probe (connect, request, answer) may take, seconds: well under any
/// orchestrator's probe timeout (Docker's HEALTHCHECK in the Dockerfile allows 5 s), so a
/// hung server is reported by this process rather than by it being killed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub struct HealthArgs {
    /// Ask `/readyz` (recovered, not stopping, store healthy) instead of `/healthz` (alive)
    #[arg(long)]
    ready: bool,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let url = format!("{}{path}", args.server.trim_end_matches('/'));
    // One attempt: a probe that retried would hide the failure it is there to report.
    let api = crate::client::api(&args.server, None, 1)?;
    let probe = api.request(Method::GET, path, &[], Bytes::new());
    let answer = tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .map_err(|_| anyhow!("{url}: no answer within {PROBE_TIMEOUT:?}"))?
        .map_err(|error| anyhow!("{url}: {error}"))?;
    let body = String::from_utf8_lossy(&answer.body);
    anyhow::ensure!(answer.status == StatusCode::OK, "{url}: {} {}", answer.status, body.trim());
    println!("{url}: {} {}", answer.status, body.trim());
    Ok(())
}
