//! `tally keys`: create, list and revoke the API keys of a keys file. A server reading the
//! file (`keys_file`) picks a change up at its next request; the file keeps each key's
//! SHA-256 only, so a key is shown once, when it is created.

use std::path::PathBuf;

use anyhow::Context;
use tally_server::{KeyEntry, KeyFile, Scope};

#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// Create a key and print it (once: the file keeps its hash only).
    Create(CreateArgs),
    /// List the keys (never their secrets).
    List(ListArgs),
    /// Revoke a key: a server reading the file refuses it from its next request on.
    Revoke(RevokeArgs),
}

#[derive(clap::Args)]
struct CreateArgs {
    /// The keys file (created if absent).
    #[arg(long)]
    file: PathBuf,
    /// What the key may do: write (ingest), read (queries), admin (metrics); comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    scope: Vec<String>,
    /// Who or what the key is for.
    #[arg(long, default_value = "")]
    name: String,
    /// Only requests from this page origin (e.g. https://shop.example) may use it; repeatable.
    #[arg(long)]
    origin: Vec<String>,
    /// Only video ids starting with this may be written with it; repeatable.
    #[arg(long)]
    video_prefix: Vec<String>,
    /// Events it may send per second (a second's worth of burst).
    #[arg(long)]
    events_per_second: Option<u32>,
    /// Requests it may make per second (a second's worth of burst).
    #[arg(long)]
    requests_per_second: Option<u32>,
}

#[derive(clap::Args)]
struct ListArgs {
    #[arg(long)]
    file: PathBuf,
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RevokeArgs {
    #[arg(long)]
    file: PathBuf,
    /// The key's id (`tally keys list` shows them).
    id: String,
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    match args.command {
        KeysCommand::Create(args) => create(args),
        KeysCommand::List(args) => list(args),
        KeysCommand::Revoke(args) => revoke(args),
    }
}

fn load(file: &std::path::Path) -> anyhow::Result<KeyFile> {
    KeyFile::load(file).map_err(anyhow::Error::msg)
}

/// Random bytes in a key's id (hex, after a `k`): enough that ids do not collide in a file.
const KEY_ID_BYTES: usize = 6;
/// Random bytes in a key's secret (hex): 256 bits, past guessing.
const KEY_SECRET_BYTES: usize = 32;

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|e| anyhow::anyhow!("no randomness from the system: {e}"))?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    let scopes = args
        .scope
        .iter()
        .map(|s| Scope::parse(s.trim()).with_context(|| format!("scope {s:?}: expected write, read or admin")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for origin in &args.origin {
        anyhow::ensure!(
            origin.starts_with("http://") || origin.starts_with("https://"),
            "origin {origin:?}: expected scheme://host[:port], as browsers send it"
        );
    }
    anyhow::ensure!(args.events_per_second != Some(0), "events_per_second must be at least 1");
    anyhow::ensure!(args.requests_per_second != Some(0), "requests_per_second must be at least 1");
    let mut file = load(&args.file)?;
    let (id, secret) = (format!("k{}", random_hex(KEY_ID_BYTES)?), random_hex(KEY_SECRET_BYTES)?);
    file.keys.push(KeyEntry {
        id: id.clone(),
        name: args.name,
        secret_sha256: tally_server::secret_sha256(&secret),
        scopes,
        origins: args.origin,
        video_prefixes: args.video_prefix,
        events_per_second: args.events_per_second,
        requests_per_second: args.requests_per_second,
        created: jiff::Timestamp::now().to_string(),
    });
    file.save(&args.file).with_context(|| format!("writing {}", args.file.display()))?;
    eprintln!("key {id} created; it is shown once, keep it:");
    println!("{}", tally_server::token(&id, &secret));
    Ok(())
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    let file = load(&args.file)?;
    if args.json {
        let keys: Vec<serde_json::Value> = file
            .keys
            .iter()
            .map(|k| {
                let mut value = serde_json::to_value(k).expect("keys serialize");
                value.as_object_mut().expect("an object").remove("secret_sha256");
                value
            })
            .collect();
        println!("{}", serde_json::Value::Array(keys));
        return Ok(());
    }
    println!(
        "{:<14} {:<20} {:<18} {:<10} {:<10} name / origins / prefixes",
        "id", "created", "scopes", "events/s", "req/s"
    );
    for key in &file.keys {
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.name()).collect();
        let rate = |r: Option<u32>| r.map_or("-".to_string(), |r| r.to_string());
        println!(
            "{:<14} {:<20} {:<18} {:<10} {:<10} {} / {} / {}",
            key.id,
            key.created.get(..19).unwrap_or(&key.created),
            scopes.join(","),
            rate(key.events_per_second),
            rate(key.requests_per_second),
            key.name,
            key.origins.join(","),
            key.video_prefixes.join(",")
        );
    }
    Ok(())
}

fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let mut file = load(&args.file)?;
    let before = file.keys.len();
    file.keys.retain(|key| key.id != args.id);
    anyhow::ensure!(file.keys.len() < before, "no key {} in {}", args.id, args.file.display());
    file.save(&args.file).with_context(|| format!("writing {}", args.file.display()))?;
    eprintln!("key {} revoked", args.id);
    Ok(())
}
