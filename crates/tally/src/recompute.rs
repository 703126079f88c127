//! `tally recompute`: asks the server to rewrite the stored aggregates of whole UTC days
//! from the raw-event archive (`POST /v1/admin/recompute`), and prints what it did.

use std::time::Duration;

use bytes::Bytes;
use hyper::Method;

use crate::client::{Api, api_config, encode_query};

#[derive(clap::Args)]
pub struct RecomputeArgs {
    /// Start, inclusive: RFC 3339 or epoch ms; widened to the start of its UTC day
    #[arg(long)]
    from: String,
    /// End, exclusive (same formats); widened to the end of its UTC day
    #[arg(long)]
    to: String,
    /// How long to wait for the server to finish (seconds)
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
    /// An API key with the admin scope [default: $TALLY_KEY]
    #[arg(long)]
    key: Option<String>,
}

pub async fn run(args: RecomputeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.timeout > 0, "--timeout must be at least 1 second");
    // One attempt: a request that timed out may still be running on the server.
    let mut config = api_config(&args.server, args.key.as_deref(), 1)?;
    config.timeout = Duration::from_secs(args.timeout);
    let api = Api::new(config)?;
    let path = format!("/v1/admin/recompute?from={}&to={}", encode_query(&args.from), encode_query(&args.to));
    eprintln!("recomputing the days of {} to {} from the archive…", args.from, args.to);
    let answer = api.request(Method::POST, &path, &[], Bytes::new()).await?;
    anyhow::ensure!(answer.status.is_success(), "the server refused: {}", answer.error_text());
    let report = answer.json()?;
    println!(
        "rewrote {} to {}: {} events of {} rows in {} files; {} counters written, {} corrected; \
         flushes held back {} ms; {:.2} s in all",
        report["from"].as_str().unwrap_or("?"),
        report["to"].as_str().unwrap_or("?"),
        report["events"],
        report["rows_read"],
        report["files_read"],
        report["counters_written"],
        report["counters_corrected"],
        report["flush_hold_ms"],
        report["seconds"].as_f64().unwrap_or(0.0),
    );
    Ok(())
}
