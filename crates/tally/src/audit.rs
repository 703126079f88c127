//! `tally audit`: recomputes every counter of a time range from the raw-event archive and
//! compares it with what the server's store answers, video by video and type by type
//! (count and sum exactly, distinct viewers within the sketches' error), printing each
//! difference.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tally_archive::{Archive, Total, aggregate_viewers};
use tally_core::hll::Hll;

use crate::client::{Api, QUERY_ATTEMPTS, api, encode_query};

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The archive: file:///path or a directory (the server's `archive` setting)
    #[arg(long, env = "TALLY_ARCHIVE")]
    archive: String,
    /// Start, inclusive: RFC 3339 or epoch ms [default: the beginning]
    #[arg(long)]
    from: Option<String>,
    /// End, exclusive (same formats) [default: now]
    #[arg(long)]
    to: Option<String>,
    /// Requests in flight at once
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
}

/// One (video, type) as the archive has it: count and sum, and the distinct-viewer sketch
/// of its events that carry viewer ids.
struct Archived {
    total: Total,
    viewers: Option<Hll>,
}

/// A video id no event has: asks the server for the range it will answer over.
const PROBE_VIDEO: &str = "tally-audit-range-probe";

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=256).contains(&args.concurrency), "--concurrency must be 1 to 256");
    let client = Arc::new(api(&args.server, None, QUERY_ATTEMPTS)?);
    let range = range_query(&args);
    // The server answers over whole buckets: the archive is read over the same range.
    let probe = client.get_json(&format!("/v1/stats?video_id={PROBE_VIDEO}{range}")).await?;
    let (from_ms, to_ms) = (instant(&probe["from"])?, instant(&probe["to"])?);
    // Every later query asks for exactly the range the probe resolved ("now" moves on).
    let range = format!(
        "&from={}&to={}",
        encode_query(probe["from"].as_str().unwrap_or_default()),
        encode_query(probe["to"].as_str().unwrap_or_default())
    );
    let location = args.archive.clone();
    let started = std::time::Instant::now();
    let archived = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let archive = Archive::open(&location)?;
        let files = archive.files()?;
        Ok(aggregate_viewers(&archive, &files, from_ms, to_ms)?)
    })
    .await??;
    let mut by_video: BTreeMap<String, BTreeMap<String, Archived>> = BTreeMap::new();
    let mut viewers = archived.viewers;
    for ((event_type, video), total) in archived.totals {
        let sketch = viewers.remove(&(event_type.clone(), video.clone()));
        by_video.entry(video).or_default().insert(event_type, Archived { total, viewers: sketch });
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "archive: {} rows read and aggregated in {seconds:.2} s ({:.0} rows/s), {} videos with events from {} to {}",
        archived.rows_read,
        archived.rows_read as f64 / seconds,
        by_video.len(),
        probe["from"],
        probe["to"]
    );
    let differences = compare(&client, by_video, &range, args.concurrency).await?;
    if differences > 0 {
        anyhow::bail!("{differences} counters differ between the store and the archive");
    }
    println!("no differences: every counter and distinct-viewer count of the archived videos matches the store");
    Ok(())
}

fn range_query(args: &AuditArgs) -> String {
    let mut query = String::new();
    for (name, value) in [("from", &args.from), ("to", &args.to)] {
        if let Some(value) = value {
            query.push_str(&format!("&{name}={}", encode_query(value)));
        }
    }
    if args.from.is_none() {
        query.push_str("&from=0");
    }
    query
}

/// An RFC 3339 instant of an answer, epoch milliseconds.
fn instant(value: &serde_json::Value) -> anyhow::Result<i64> {
    let text = value.as_str().with_context(|| format!("the server's range bound {value} is not a string"))?;
    let at: jiff::Timestamp = text.parse().with_context(|| format!("the server's range bound {text:?}"))?;
    Ok(at.as_millisecond())
}

/// Asks the store for each video's counters and prints every one that differs from the
/// archive's; the number of differences.
async fn compare(
    client: &Arc<Api>,
    by_video: BTreeMap<String, BTreeMap<String, Archived>>,
    range: &str,
    concurrency: usize,
) -> anyhow::Result<usize> {
    let bar = ProgressBar::new(by_video.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:40} {pos}/{len} videos ({eta} left)").expect("valid template"));
    let mut differences = 0;
    let mut tasks = tokio::task::JoinSet::new();
    let mut videos = by_video.into_iter();
    loop {
        while tasks.len() < concurrency {
            let Some((video, archived)) = videos.next() else { break };
            let (client, range) = (Arc::clone(client), range.to_owned());
            tasks.spawn(async move {
                let stored = stored_video(&client, &video, &archived, &range).await;
                (video, archived, stored)
            });
        }
        let Some(done) = tasks.join_next().await else { break };
        let (video, archived, stored) = done?;
        let (stats, uniques) = stored?;
        differences += differ(&video, &archived, &stats) + differ_viewers(&video, &archived, &uniques);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(differences)
}

/// What the store answers for `video`: its stats, and the distinct viewers of each type
/// the archive has viewer ids for.
async fn stored_video(
    client: &Api,
    video: &str,
    archived: &BTreeMap<String, Archived>,
    range: &str,
) -> anyhow::Result<(serde_json::Value, BTreeMap<String, serde_json::Value>)> {
    let video_id = encode_query(video);
    let stats = client.get_json(&format!("/v1/stats?video_id={video_id}{range}")).await?;
    let mut uniques = BTreeMap::new();
    for (event_type, _) in archived.iter().filter(|(_, a)| a.viewers.is_some()) {
        let path = format!("/v1/uniques?video_id={video_id}&type={}{range}", encode_query(event_type));
        uniques.insert(event_type.clone(), client.get_json(&path).await?);
    }
    Ok((stats, uniques))
}

/// Prints each type of `video` whose distinct-viewer estimate in the store is further from
/// the archive's than the sketches' error allows (three standard errors, at least one
/// viewer); how many were.
fn differ_viewers(
    video: &str,
    archived: &BTreeMap<String, Archived>,
    stored: &BTreeMap<String, serde_json::Value>,
) -> usize {
    let mut differences = 0;
    for (event_type, answer) in stored {
        let Some(sketch) = archived.get(event_type).and_then(|a| a.viewers.as_ref()) else { continue };
        let expected = sketch.estimate().round();
        let got = answer["uniques"].as_f64().unwrap_or(-1.0);
        let allowed = (3.0 * sketch.relative_error() * expected).max(1.0);
        if (got - expected).abs() > allowed {
            println!("{video} {event_type}: store distinct viewers {got}, archive {expected} (allowed ±{allowed:.0})");
            differences += 1;
        }
    }
    differences
}

/// Prints each type of `video` whose count or sum differs; how many did.
fn differ(video: &str, archived: &BTreeMap<String, Archived>, stored: &serde_json::Value) -> usize {
    let empty = serde_json::Map::new();
    let types = stored["types"].as_object().unwrap_or(&empty);
    let names: BTreeSet<&str> = archived.keys().map(String::as_str).chain(types.keys().map(String::as_str)).collect();
    let mut differences = 0;
    for name in names {
        let (count, sum) =
            types.get(name).map_or((0, 0), |t| (t["count"].as_u64().unwrap_or(0), t["sum"].as_i64().unwrap_or(0)));
        let archive = archived.get(name).map(|a| a.total).unwrap_or_default();
        if (count, sum) != (archive.count, archive.sum) {
            println!(
                "{video} {name}: store count {count} sum {sum}, archive count {} sum {}",
                archive.count, archive.sum
            );
            differences += 1;
        }
    }
    differences
}
