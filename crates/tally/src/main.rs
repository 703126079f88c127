//! `tally`: the server (`serve`) and its command-line client (`send`, `count`, `series`,
//! `top`, `uniques`, `stats`, `bench`). Thin glue: parse arguments, run the chosen command, map errors to exit codes.

mod bench;
mod client;
mod config;
mod inspect;
mod send;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    Serve(ServeArgs),
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
    /// Load generator: write or read load against a server, with latency percentiles and
    /// (for writes) an exact check of the server's counts at the end.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Directory for the log and the store [default: ./tally-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port [default: 127.0.0.1:8080]
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// TOML file with any setting (see README); flags override it
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Send(args) => client_runtime().and_then(|rt| rt.block_on(send::run(args))),
        Command::Count(args) => client_runtime().and_then(|rt| rt.block_on(inspect::count(args))),
        Command::Series(args) => client_runtime().and_then(|rt| rt.block_on(inspect::series(args))),
        Command::Top(args) => client_runtime().and_then(|rt| rt.block_on(inspect::top(args))),
        Command::Uniques(args) => client_runtime().and_then(|rt| rt.block_on(inspect::uniques(args))),
        Command::Stats(args) => client_runtime().and_then(|rt| rt.block_on(inspect::stats(args))),
        Command::Bench(args) => client_runtime().and_then(|rt| rt.block_on(bench::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
