//! Cluster mode: `tally cluster init`, and the node `tally serve --kafka … --postgres …`
//! starts (the engine on the shared log and store, and its consumer-group member).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_core::log::LogReader;
use tally_engine::{Engine, EngineConfig};
use tally_kafka::{Feed, FeedSettings, Producer, Reader};
use tally_store::{PoolOptions, PostgresStore};

use crate::config::{ClusterSettings, TOPIC_DEFAULT};

#[derive(clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(clap::Subcommand)]
enum ClusterCommand {
    /// Create the topic (and its dead-letter topic) and the database schema; run again,
    /// it changes nothing and says so.
    Init(InitArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Kafka brokers, host:port[,host:port…]
    #[arg(long)]
    kafka: String,
    /// The PostgreSQL database, postgres://USER@HOST:PORT/DB
    #[arg(long)]
    postgres: String,
    #[arg(long, default_value = TOPIC_DEFAULT)]
    topic: String,
    /// tally partitions, one Kafka partition each; fixed for the life of the cluster
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Replicas of each Kafka partition (3 in production, with min.insync.replicas=2)
    #[arg(long, default_value_t = 1)]
    replication_factor: i32,
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::Init(args) => init(args),
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=1024).contains(&args.partitions), "partitions must be 1 to 1024");
    let store = PostgresStore::open(&args.postgres, PoolOptions { connections_max: 1, ..Default::default() })
        .context("opening the database")?;
    if store.prepare_partitions(args.partitions).context("recording the partitions")? {
        println!("database: schema ready, {} partitions recorded", args.partitions);
    } else {
        println!("database: already initialised with {} partitions; nothing changed", args.partitions);
    }
    let topics = tally_kafka::init(&args.kafka, &args.topic, args.partitions, args.replication_factor)?;
    for topic in topics {
        let verb = if topic.created { "created" } else { "already exists; nothing changed" };
        println!("topic {}: {verb} ({} partitions)", topic.topic, topic.partitions);
    }
    Ok(())
}

/// A started node: its engine, and how it leaves the group (releasing its partitions
/// after flushing them) before the engine shuts down.
pub fn start(
    mut config: EngineConfig,
    url: &str,
    connections_max: usize,
    settings: &ClusterSettings,
) -> anyhow::Result<(Engine, Box<dyn FnOnce() + Send>)> {
    let store = PostgresStore::open(url, PoolOptions { connections_max, ..Default::default() })
        .context("opening the PostgreSQL store")?;
    let partitions = store
        .partitions()?
        .context("the database holds no tally cluster: run `tally cluster init --kafka … --postgres …` first")?;
    config.partitions = partitions;
    let reader: Option<Box<dyn LogReader>> = match &config.archive {
        Some(_) => Some(Box::new(Reader::new(&settings.brokers, &settings.topic)?)),
        None => None,
    };
    let producer = Producer::new(&settings.brokers, &settings.topic)?;
    let engine = Engine::start_cluster(config, Arc::new(store), producer.partition_logs(partitions), reader)?;
    let feed = Feed::start(
        FeedSettings {
            brokers: settings.brokers.clone(),
            topic: settings.topic.clone(),
            group: format!("{}-owners", settings.topic),
            session_timeout: Duration::from_millis(settings.session_timeout_ms),
            fetch_wait: Duration::from_millis(settings.fetch_wait_ms),
            client_id: Some(settings.advertise.clone()),
        },
        engine.owner(),
        producer,
    )?;
    tracing::info!(partitions, topic = %settings.topic, "cluster node started; joining the owners' group");
    Ok((engine, Box::new(move || feed.stop())))
}
