//! `tally`: the server (`serve`) and its command-line client (`send`, `count`, `series`,
//! `top`, `uniques`, `stats`, `bench`, `health`), and `store-stats` (disk use of a stopped
//! server's store). Thin glue: parse arguments, run the chosen command, map errors to exit
//! codes.

mod audit;
mod bench;
#[cfg(feature = "cluster")]
mod bridge;
mod client;
#[cfg(feature = "cluster")]
mod cluster;
mod config;
mod health;
mod inspect;
mod keys;
mod recompute;
mod send;
mod serve;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Exact, durable, real-time event counting.
#[derive(Parser)]
#[command(name = "tally", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: HTTP API, write-ahead log and embedded store in one process.
    Serve(Box<ServeArgs>),
    /// Send events from a JSON-lines or CSV file (or stdin) in batches; resumable.
    Send(send::SendArgs),
    /// Count one video's events over a time range.
    Count(inspect::CountArgs),
    /// One video's counts per minute, hour or day (local days with --tz).
    Series(inspect::SeriesArgs),
    /// The videos with the most events over a time range (default: the last hour).
    Top(inspect::TopArgs),
    /// Distinct viewers of one video over a time range (HyperLogLog estimate).
    Uniques(inspect::UniquesArgs),
    /// Count, sum and average of every event type of one video over a time range.
    Stats(inspect::StatsArgs),
    /// Space the store takes per table group (rows, bytes of data, bytes of pages), for
    /// capacity planning. Reads the data directory of a stopped server.
    StoreStats(StoreStatsArgs),
    /// API keys: create, list and revoke them in a keys file.
    Keys(keys::KeysArgs),
    /// Recompute every counter of a time range from the raw-event archive and compare it
    /// with the store, printing each difference (exit 1 if any).
    Audit(audit::AuditArgs),
    /// Rewrite the stored aggregates of whole UTC days from the raw-event archive, while
    /// the server runs (the batch layer correcting the speed layer).
    Recompute(recompute::RecomputeArgs),
    /// Load generator: write or read load against a server, with latency percentiles and
    /// (for writes) an exact check of the server's counts at the end.
    Bench(bench::BenchArgs),
    /// Probe a server's /healthz (or /readyz with --ready): exit 0 on 200, else 1. The
    /// container image's health check, which has no HTTP client of its own.
    Health(health::HealthArgs),
    /// Cluster mode's setup (Kafka topic and database schema).
    #[cfg(feature = "cluster")]
    Cluster(cluster::ClusterArgs),
    /// Re-partition events from an existing Kafka topic into tally's, exactly once.
    #[cfg(feature = "cluster")]
    Bridge(bridge::BridgeArgs),
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (deploy/tally.toml lists them all);
    /// TALLY_<SETTING> environment variables override it, and flags override those
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration (defaults, file, environment, flags) as TOML and
    /// exit without starting
    #[arg(long)]
    check_config: bool,
    /// Start even if a partition's newest log segment was deleted or cut short, or all of
    /// its segments were deleted: the lost events are dropped, and the log says what was
    /// dropped. Without it such a start is refused, naming the damage
    #[arg(long)]
    accept_log_loss: bool,
    #[command(flatten)]
    settings: config::FileConfig,
}

#[derive(clap::Args)]
pub struct StoreStatsArgs {
    /// Data directory of a stopped server (its embedded store)
    #[arg(long, default_value = "./tally-data")]
    data_dir: PathBuf,
    /// A PostgreSQL store instead (postgres://USER@HOST:PORT/DB); the server may run
    #[arg(long)]
    store: Option<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

fn store_stats(args: StoreStatsArgs) -> anyhow::Result<()> {
    let (usage, disk) = match &args.store {
        Some(url) => {
            let options = tally_store::PoolOptions { connections_max: 1, ..Default::default() };
            let store = tally_store::PostgresStore::open(url, options)?;
            (store.usage()?, format!("database: {} bytes", store.disk_bytes()?))
        }
        None => {
            let path = args.data_dir.join(tally_engine::STORE_FILE);
            anyhow::ensure!(path.exists(), "no store at {}", path.display());
            // A small cache: this reads each table once.
            let store = tally_store::RedbStore::open(&path, 64 << 20, false)?;
            (store.usage()?, format!("file: {} bytes", store.disk_bytes()?))
        }
    };
    if args.json {
        let rows: Vec<serde_json::Value> = usage
            .iter()
            .map(|u| {
                serde_json::json!({"group": u.group, "tables": u.tables, "rows": u.rows,
                    "stored_bytes": u.stored_bytes, "page_bytes": u.page_bytes})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<20} {:>7} {:>14} {:>16} {:>16} {:>10}",
        "group", "tables", "rows", "data bytes", "page bytes", "B/row"
    );
    for u in &usage {
        let per_row = u.page_bytes.checked_div(u.rows).unwrap_or(0);
        println!(
            "{:<20} {:>7} {:>14} {:>16} {:>16} {:>10}",
            u.group, u.tables, u.rows, u.stored_bytes, u.page_bytes, per_row
        );
    }
    println!("{disk}");
    Ok(())
}

/// The command line, with every `serve` setting also read from `TALLY_<SETTING>`.
fn command() -> clap::Command {
    Cli::command().mut_subcommand("serve", |mut serve| {
        for key in config::keys() {
            let variable = format!("TALLY_{}", key.to_uppercase());
            serve = serve.mut_arg(key, |arg| arg.env(variable));
        }
        serve
    })
}

fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|error| error.exit());
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Send(args) => run_client(send::run(args)),
        Command::Count(args) => run_client(inspect::count(args)),
        Command::Series(args) => run_client(inspect::series(args)),
        Command::Top(args) => run_client(inspect::top(args)),
        Command::Uniques(args) => run_client(inspect::uniques(args)),
        Command::Stats(args) => run_client(inspect::stats(args)),
        Command::StoreStats(args) => store_stats(args),
        Command::Keys(args) => keys::run(args),
        Command::Bench(args) => run_client(bench::run(args)),
        Command::Audit(args) => run_client(audit::run(args)),
        Command::Recompute(args) => run_client(recompute::run(args)),
        Command::Health(args) => probe_runtime().and_then(|rt| rt.block_on(health::run(args))),
        #[cfg(feature = "cluster")]
        Command::Cluster(args) => cluster::run(args),
        #[cfg(feature = "cluster")]
        Command::Bridge(args) => bridge::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command. The runtime is shut down without waiting for blocking tasks: a
/// command that failed must not hang on a reader still blocked on its input (stdin).
fn run_client(command: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(command);
    runtime.shutdown_background();
    result
}

/// One thread: a probe that runs every few seconds should not start a thread per core.
fn probe_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Now, epoch milliseconds (the receive time `tally bridge` stamps).
#[cfg(feature = "cluster")]
pub(crate) fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
