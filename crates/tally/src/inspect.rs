//! `tally count` and `tally series`: ask the server, print readable text or `--json`.

use crate::client::{Client, encode_query};

/// What to ask about: shared by `count` and `series`.
#[derive(clap::Args)]
pub struct Selection {
    /// Video id
    video_id: String,
    /// Event type
    #[arg(long = "type", default_value = "view")]
    event_type: String,
    /// Start (RFC 3339 or epoch ms), inclusive; default: the beginning (count) or 60 steps
    /// before the end (series)
    #[arg(long)]
    from: Option<String>,
    /// End (RFC 3339 or epoch ms), exclusive; default: now
    #[arg(long)]
    to: Option<String>,
    /// Print the server's JSON answer
    #[arg(long)]
    json: bool,
    /// Server URL
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "TALLY_SERVER")]
    server: String,
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

pub async fn count(CountArgs { selection: args }: CountArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server)?;
    let q = query(&[
        ("video_id", Some(&args.video_id)),
        ("type", Some(&args.event_type)),
        ("from", args.from.as_deref()),
        ("to", args.to.as_deref()),
    ]);
    let answer = client.get_json(&format!("/v1/count?{q}")).await?;
    if args.json {
        println!("{answer}");
    } else {
        println!(
            "{} {} of {} from {} to {} (sum of values: {})",
            answer["count"],
            answer["type"].as_str().unwrap_or(""),
            answer["video_id"].as_str().unwrap_or(""),
            answer["from"].as_str().unwrap_or(""),
            answer["to"].as_str().unwrap_or(""),
            answer["sum"]
        );
    }
    Ok(())
}

pub async fn series(SeriesArgs { selection: args, step }: SeriesArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server)?;
    let q = query(&[
        ("video_id", Some(&args.video_id)),
        ("type", Some(&args.event_type)),
        ("step", Some(&step)),
        ("from", args.from.as_deref()),
        ("to", args.to.as_deref()),
    ]);
    let answer = client.get_json(&format!("/v1/series?{q}")).await?;
    if args.json {
        println!("{answer}");
        return Ok(());
    }
    let points = answer["points"].as_array().cloned().unwrap_or_default();
    let peak = points.iter().filter_map(|p| p["count"].as_u64()).max().unwrap_or(0).max(1);
    println!("{:<22} {:>12} {:>14}", "time (UTC)", "count", "sum");
    for point in &points {
        let count = point["count"].as_u64().unwrap_or(0);
        let bar = "█".repeat(((count * 40).div_ceil(peak)) as usize);
        println!("{:<22} {:>12} {:>14} {bar}", point["t"].as_str().unwrap_or(""), count, point["sum"]);
    }
    Ok(())
}
