//! `tally count`, `series`, `top`, `uniques` and `stats`: ask the server, print readable
//! text or `--json`.

use serde_json::Value;

use crate::client::{QUERY_ATTEMPTS, api, encode_query};

/// The time range and output options every query command shares.
#[derive(clap::Args)]
pub struct Range {
    /// Start, inclusive: RFC 3339, epoch ms, or a local date (2026-11-01) or date-time
    /// (2026-11-01T08:00) in --tz; default: the beginning (count, uniques, stats), the
    /// last hour (top) or 60 steps before the end (series)
    #[arg(long)]
    from: Option<String>,
    /// End, exclusive (same formats); default: now
    #[arg(long)]
    to: Option<String>,
    /// IANA time zone (e.g. Europe/Berlin) for local dates, and for local days in
    /// `series --step day`; default: UTC
    #[arg(long)]
    tz: Option<String>,
    /// Print the server's JSON answer
    #[arg(long)]
    json: bool,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
}

impl Range {
    fn pairs(&self) -> [(&'static str, Option<&str>); 3] {
        [("from", self.from.as_deref()), ("to", self.to.as_deref()), ("tz", self.tz.as_deref())]
    }

    /// GETs `path` with `pairs` plus the range; prints the JSON answer with `--json`,
    /// else hands it back for a readable rendering.
    async fn ask(&self, path: &str, pairs: &[(&str, Option<&str>)]) -> anyhow::Result<Option<Value>> {
        let client = api(&self.server, None, QUERY_ATTEMPTS)?;
        let all: Vec<(&str, Option<&str>)> = pairs.iter().copied().chain(self.pairs()).collect();
        let answer = client.get_json(&format!("{path}?{}", query(&all))).await?;
        if self.json {
            println!("{answer}");
            return Ok(None);
        }
        Ok(Some(answer))
    }
}

/// What to ask about: one video's events of one type.
#[derive(clap::Args)]
pub struct Selection {
    /// Video id
    video_id: String,
    /// Event type
    #[arg(long = "type", default_value = "view")]
    event_type: String,
    #[command(flatten)]
    range: Range,
}

#[derive(clap::Args)]
pub struct UniquesArgs {
    #[command(flatten)]
    selection: Selection,
}

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Video id
    video_id: String,
    #[command(flatten)]
    range: Range,
}

#[derive(clap::Args)]
pub struct TopArgs {
    /// Event type
    #[arg(long = "type", default_value = "view")]
    event_type: String,
    /// How many videos (1 to 1000)
    #[arg(short, long, default_value_t = 10)]
    k: u32,
    /// Count every active video exactly instead of refining sketch candidates (slower)
    #[arg(long)]
    exact: bool,
    #[command(flatten)]
    range: Range,
}

#[derive(clap::Args)]
pub struct CountArgs {
    #[command(flatten)]
    selection: Selection,
}

#[derive(clap::Args)]
pub struct SeriesArgs {
    #[command(flatten)]
    selection: Selection,
    /// Bucket size
    #[arg(long, default_value = "hour", value_parser = ["minute", "hour", "day"])]
    step: String,
}

fn query(pairs: &[(&str, Option<&str>)]) -> String {
    pairs
        .iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name}={}", encode_query(v))))
        .collect::<Vec<_>>()
        .join("&")
}

fn text<'a>(answer: &'a Value, field: &str) -> &'a str {
    answer[field].as_str().unwrap_or("")
}

/// "from … to … (hour resolution)"
fn span(answer: &Value) -> String {
    format!("from {} to {} ({} resolution)", text(answer, "from"), text(answer, "to"), text(answer, "resolution"))
}

fn bar(value: u64, peak: u64) -> String {
    "█".repeat(((value * 40).div_ceil(peak.max(1))) as usize)
}

pub async fn count(CountArgs { selection: args }: CountArgs) -> anyhow::Result<()> {
    let pairs = [("video_id", Some(args.video_id.as_str())), ("type", Some(args.event_type.as_str()))];
    let Some(answer) = args.range.ask("/v1/count", &pairs).await? else { return Ok(()) };
    println!(
        "{} {} of {} {} (sum of values: {})",
        answer["count"],
        text(&answer, "type"),
        text(&answer, "video_id"),
        span(&answer),
        answer["sum"]
    );
    Ok(())
}

pub async fn series(SeriesArgs { selection: args, step }: SeriesArgs) -> anyhow::Result<()> {
    let pairs = [
        ("video_id", Some(args.video_id.as_str())),
        ("type", Some(args.event_type.as_str())),
        ("step", Some(step.as_str())),
    ];
    let Some(answer) = args.range.ask("/v1/series", &pairs).await? else { return Ok(()) };
    let points = answer["points"].as_array().cloned().unwrap_or_default();
    let peak = points.iter().filter_map(|p| p["count"].as_u64()).max().unwrap_or(0);
    let zone = answer["tz"].as_str().unwrap_or("UTC");
    println!("{:<26} {:>12} {:>14}   ({} steps)", format!("time ({zone})"), "count", "sum", text(&answer, "step"));
    for point in &points {
        let count = point["count"].as_u64().unwrap_or(0);
        // A JSON value's Display ignores width: render it to a string first.
        let sum = point["sum"].to_string();
        println!("{:<26} {:>12} {sum:>14} {}", text(point, "t"), count, bar(count, peak));
    }
    if answer["exact_boundaries"] == false {
        println!("note: day boundaries rounded down to the hour (minute buckets are no longer kept there)");
    }
    Ok(())
}

pub async fn top(args: TopArgs) -> anyhow::Result<()> {
    let k = args.k.to_string();
    let pairs =
        [("type", Some(args.event_type.as_str())), ("k", Some(k.as_str())), ("exact", args.exact.then_some("true"))];
    let Some(answer) = args.range.ask("/v1/top", &pairs).await? else { return Ok(()) };
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    let exact = if answer["exact"] == true {
        "exact".to_string()
    } else {
        format!("approximate: any video not listed has at most {}", answer["unlisted_max"])
    };
    println!("top {} {} {} — {exact}", items.len(), text(&answer, "type"), span(&answer));
    let peak = items.first().and_then(|i| i["count"].as_u64()).unwrap_or(0);
    for (rank, item) in items.iter().enumerate() {
        let count = item["count"].as_u64().unwrap_or(0);
        let error = item["error"].as_u64().unwrap_or(0);
        let shown = if error == 0 { count.to_string() } else { format!("{count}..{}", count + error) };
        println!("{:>5}. {:<40} {:>14} {}", rank + 1, text(item, "video_id"), shown, bar(count, peak));
    }
    Ok(())
}

pub async fn uniques(UniquesArgs { selection: args }: UniquesArgs) -> anyhow::Result<()> {
    let pairs = [("video_id", Some(args.video_id.as_str())), ("type", Some(args.event_type.as_str()))];
    let Some(answer) = args.range.ask("/v1/uniques", &pairs).await? else { return Ok(()) };
    let error = answer["relative_error"].as_f64().unwrap_or(0.0) * 100.0;
    println!(
        "{} distinct viewers (±{error:.2}% standard error) of {} of {} {}",
        answer["uniques"],
        text(&answer, "type"),
        text(&answer, "video_id"),
        span(&answer)
    );
    Ok(())
}

pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let pairs = [("video_id", Some(args.video_id.as_str()))];
    let Some(answer) = args.range.ask("/v1/stats", &pairs).await? else { return Ok(()) };
    println!("{} {}", text(&answer, "video_id"), span(&answer));
    let types = answer["types"].as_object().cloned().unwrap_or_default();
    if types.is_empty() {
        println!("no events in the range");
        return Ok(());
    }
    println!("{:<32} {:>14} {:>16} {:>14}", "type", "count", "sum", "avg");
    for (event_type, stats) in &types {
        let avg = stats["avg"].as_f64().unwrap_or(0.0);
        let (count, sum) = (stats["count"].to_string(), stats["sum"].to_string());
        println!("{event_type:<32} {count:>14} {sum:>16} {avg:>14.2}");
    }
    Ok(())
}
