//! `tally recompute`: asks the server to rewrite the stored aggregates of each UTC day of a
//! range from the raw-event archive (`POST /v1/admin/recompute`, one day per request),
//! with a progress bar, and prints what it did.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use tally_core::bucket::DAY_MS;

use crate::client::{Api, api_config};

#[derive(clap::Args)]
pub struct RecomputeArgs {
    /// Start, inclusive: RFC 3339 or epoch ms; widened to the start of its UTC day
    #[arg(long)]
    from: String,
    /// End, exclusive (same formats); widened to the end of its UTC day
    #[arg(long)]
    to: String,
    /// How long to wait for the server to finish one day (seconds)
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
    /// An API key with the admin scope [default: $TALLY_KEY]
    #[arg(long)]
    key: Option<String>,
}

/// What the days rewritten so far add up to.
#[derive(Default)]
struct Sums {
    days: u64,
    events: u64,
    rows_read: u64,
    counters_written: u64,
    counters_corrected: u64,
    flush_hold_ms_max: u64,
}

pub async fn run(args: RecomputeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.timeout > 0, "--timeout must be at least 1 second");
    let (from, to) = (instant("--from", &args.from)?, instant("--to", &args.to)?);
    anyhow::ensure!(from < to, "--from must be before --to");
    // One attempt per day: a request that timed out may still be running on the server.
    let mut config = api_config(&args.server, args.key.as_deref(), 1)?;
    config.timeout = Duration::from_secs(args.timeout);
    let api = Api::new(config)?;
    let first_day = from.div_euclid(DAY_MS) * DAY_MS;
    let days: Vec<i64> = (first_day..to).step_by(DAY_MS as usize).collect();
    let bar = ProgressBar::new(days.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:40} {pos}/{len} days ({eta} left)").expect("valid template"));
    let mut sums = Sums::default();
    for day in days {
        let path = format!("/v1/admin/recompute?from={day}&to={}", day + DAY_MS);
        let answer = api.request(Method::POST, &path, &[], Bytes::new()).await?;
        anyhow::ensure!(
            answer.status.is_success(),
            "the server refused the day {}: {}",
            date(day),
            answer.error_text()
        );
        let report = answer.json()?;
        let field = |name: &str| report[name].as_u64().unwrap_or(0);
        bar.suspend(|| {
            eprintln!(
                "{}: {} events; {} counters written, {} corrected; flushes held back {} ms",
                date(day),
                field("events"),
                field("counters_written"),
                field("counters_corrected"),
                field("flush_hold_ms")
            )
        });
        sums.days += 1;
        sums.events += field("events");
        sums.rows_read += field("rows_read");
        sums.counters_written += field("counters_written");
        sums.counters_corrected += field("counters_corrected");
        sums.flush_hold_ms_max = sums.flush_hold_ms_max.max(field("flush_hold_ms"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "rewrote {} days from the archive: {} events of {} rows read; {} counters written, {} corrected; \
         flushes held back {} ms at most",
        sums.days, sums.events, sums.rows_read, sums.counters_written, sums.counters_corrected, sums.flush_hold_ms_max
    );
    Ok(())
}

/// Epoch milliseconds or RFC 3339.
fn instant(flag: &str, text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let at: jiff::Timestamp =
        text.parse().with_context(|| format!("{flag} {text:?}: expected epoch milliseconds or RFC 3339"))?;
    Ok(at.as_millisecond())
}

fn date(day_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(day_ms)
        .map_or_else(|_| day_ms.to_string(), |t| t.strftime("%Y-%m-%d").to_string())
}
