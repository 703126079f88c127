//! `tally serve` configuration: a TOML file where every setting can be given, overridden
//! by command-line flags. Unknown keys are an error, so a typo never silently falls back
//! to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tally_core::Limits;
use tally_engine::{EngineConfig, Retention};
use tally_server::ServerConfig;

use crate::units::{Duration, Size};

/// Where the aggregates live; the log stays in the data directory either way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// redb, in `<data_dir>/store.redb`.
    #[default]
    Embedded,
    /// A PostgreSQL-protocol database, `postgres://user@host:port/db`.
    Postgres { url: String, connections_max: usize },
}

/// Most connections `store_connections_max` may ask for.
const STORE_CONNECTIONS_HIGH: usize = 1024;
/// Most origins `cors_origins` may list.
const CORS_ORIGINS_MAX: usize = 1000;

/// The `store` setting: `embedded` (or absent), or a PostgreSQL URL.
fn store_location(store: Option<&str>, connections_max: Option<usize>) -> anyhow::Result<StoreLocation> {
    let connections_max = connections_max.unwrap_or(tally_store::PoolOptions::default().connections_max);
    anyhow::ensure!(
        (1..=STORE_CONNECTIONS_HIGH).contains(&connections_max),
        "store_connections_max must be 1 to {STORE_CONNECTIONS_HIGH}"
    );
    match store {
        None | Some("embedded") => Ok(StoreLocation::Embedded),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(StoreLocation::Postgres { url: url.to_string(), connections_max })
        }
        Some(other) => anyhow::bail!("store {other:?}: expected \"embedded\" or a postgres://user@host:port/db URL"),
    }
}

/// How the server writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Every setting of `tally serve`, each settable in the TOML file, as a `TALLY_<KEY>`
/// environment variable and as a `--<key>` flag, each overriding the one before. Absent
/// keys take the defaults of `EngineConfig`, `ServerConfig` and `Limits`;
/// `tally serve --check-config` prints every key's effective value. Durations carry a
/// unit (`500ms`, `10s`, `5m`, `2h`, `7d`); sizes are bytes or carry one (`64KiB`, `256MiB`).
#[derive(Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory for the log and the embedded store
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Where the aggregates live: `embedded` (redb in the data directory) or a PostgreSQL
    /// URL, postgres://USER@HOST:PORT/DB; the log stays in the data directory [default: embedded]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Connections to the database at most (PostgreSQL store)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_connections_max: Option<usize>,
    /// Cluster mode: the Kafka brokers HOST:PORT[,HOST:PORT…] holding the log; needs postgres
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<String>,
    /// The PostgreSQL store, postgres://USER@HOST:PORT/DB (the same as store, under the
    /// name cluster mode uses)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// Cluster mode: the topic [default: tally-events]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Cluster mode: how long the group waits for a silent node before moving its
    /// partitions
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<Duration>,
    /// Cluster mode: how long the broker may hold an owner's fetch that finds nothing new
    /// (Kafka's fetch.wait.max.ms); brokers that answer only when it runs out (tansu) add
    /// it to every write's delay to visibility on other nodes
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetch_wait: Option<Duration>,
    /// Cluster mode: this node's URL as others reach it (its Kafka client id) [default:
    /// the listen address]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Address to listen on, HOST:PORT (a name or an IP); port 0 picks a free port
    ///
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// A second address serving only /healthz, /readyz and /metrics, apart from client
    /// connections and their limit [default: none]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Tokio worker threads for HTTP [default: one per core]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// Time in-flight requests get to finish after SIGTERM before they are closed
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_drain: Option<Duration>,
    /// Log partitions (one writer thread each); fixed once the data directory exists
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Size at which a log segment is closed and a new one started
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_bytes_max: Option<Size>,
    /// How often aggregates are flushed to the store and the log checkpointed (twice as often
    /// in cluster mode by default)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_interval: Option<Duration>,
    /// How long an event_id or Idempotency-Key is remembered for deduplication
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<Duration>,
    /// Event ids remembered at most, over all partitions; past it writes get 503
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_entries_max: Option<usize>,
    /// Bytes of requests one log append (one fsync) groups at most
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_bytes_max: Option<Size>,
    /// Bytes of requests waiting for the log at most; past it writes get 503
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_bytes_max: Option<Size>,
    /// Aggregate cells waiting for the next flush at most; past it writes get 503
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_cells_max: Option<usize>,
    /// The embedded store's page cache
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_cache_bytes: Option<Size>,
    /// Days minute buckets are kept; 0 keeps them forever
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minute_retention_days: Option<u32>,
    /// Days hour buckets are kept; 0 keeps them forever
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hour_retention_days: Option<u32>,
    /// Days day buckets are kept; 0 keeps them forever
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day_retention_days: Option<u32>,
    /// How often expired buckets are deleted
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_interval: Option<Duration>,
    /// Free disk the log leaves for the store; below it writes get 503
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_free_bytes_min: Option<Size>,
    /// Distinct event types at most
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_types_max: Option<usize>,
    /// Largest request body; larger ones get 413 without being buffered
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_bytes_max: Option<Size>,
    /// Body bytes held by all requests being read at once; past it requests get 503
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_bytes_in_flight_max: Option<Size>,
    /// Time a request body may take to arrive whole; slower ones get 408
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_read_timeout: Option<Duration>,
    /// Time from a request's first byte until its head must be complete
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<Duration>,
    /// Time a connection may stay idle between requests before it is closed
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_idle: Option<Duration>,
    /// Connections served at once; past it a connection gets a fast 503 (lowered to fit
    /// the open-file limit)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    /// Events one request may carry
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_per_request_max: Option<usize>,
    /// Bad events a 400 lists at most (the total is always given)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field_errors_max: Option<usize>,
    /// Video ids one POST /v1/counts may ask for
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts_video_ids_max: Option<usize>,
    /// Points one GET /v1/series may return
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series_points_max: Option<usize>,
    /// Origins whose pages may call the API (CORS), comma-separated, or `*` [default: none]
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_origins: Option<Vec<String>>,
    /// The API keys file (`tally keys create --file …` makes it); reloaded when it changes
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<PathBuf>,
    /// Whether requests need a key [default: yes unless listen is a loopback address]
    #[arg(long, action = clap::ArgAction::Set)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_required: Option<bool>,
    /// How far in the past an event's ts may be
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lateness_max: Option<Duration>,
    /// How far in the future an event's ts may be
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_skew_max: Option<Duration>,
    /// Archive every counted event as Parquet files in S3-compatible object storage
    /// (`s3://bucket/prefix`, credentials from AWS_* variables) or a directory
    /// (`file:///path` or a path), laid out by receive hour; log segments are kept until
    /// archived [default: none]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
    /// Days raw events stay in the archive, by receive hour, purged in whole files; 0 keeps
    /// them forever [default: 0]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_retention_days: Option<u32>,
    /// How often a partition's archive file is written while less than 64 MiB of its log
    /// waits (with more, at once) [default: 1m]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_file_interval: Option<Duration>,
    /// Log lines as text or JSON; RUST_LOG filters them (default info) [default: text]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Log every HTTP request (method, path, status, bytes, duration, client) at info,
    /// target tally::access [default: false]
    #[arg(long, action = clap::ArgAction::Set)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
}

/// Default time to drain in-flight requests on shutdown, milliseconds.
pub const SHUTDOWN_DRAIN_MS_DEFAULT: u64 = 10_000;
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";

/// Cluster mode's settings (`kafka` set).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub brokers: String,
    pub topic: String,
    pub session_timeout_ms: u64,
    pub fetch_wait_ms: u64,
    pub advertise: String,
}

pub const TOPIC_DEFAULT: &str = "tally-events";
/// A cluster node flushes twice as often as a single node: a query sees another node's
/// acknowledged write once its owner has read it from the log and flushed it, so the
/// delay is up to a flush interval plus a flush and a fetch; at 500 ms (and a 100 ms fetch
/// wait) the median is 0.4 s and the p99 0.6 s (the README's freshness figures).
const CLUSTER_FLUSH_INTERVAL_MS_DEFAULT: u64 = 500;
const SESSION_TIMEOUT_MS_DEFAULT: u64 = 6_000;
/// A fifth of librdkafka's default: brokers that hold a waiting fetch until this runs out
/// even when data arrives (tansu) add it to every write's delay to visibility; Kafka
/// answers as soon as data arrives, so there it only sets how often an idle partition is
/// asked again (ten times a second per broker).
const FETCH_WAIT_MS_DEFAULT: u64 = 100;
/// The range `fetch_wait` may take, milliseconds.
const FETCH_WAIT_MS_LOW: u64 = 1;
const FETCH_WAIT_MS_HIGH: u64 = 10_000;
/// The range `session_timeout` may take, milliseconds (Kafka's brokers refuse less than 6,000 by
/// default, `group.min.session.timeout.ms`, and more than 300,000).
const SESSION_TIMEOUT_MS_LOW: u64 = 1_000;
const SESSION_TIMEOUT_MS_HIGH: u64 = 300_000;

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub cluster: Option<ClusterSettings>,
    pub admin_listen: Option<SocketAddr>,
    pub worker_threads: Option<usize>,
    pub shutdown_drain_ms: u64,
    pub engine: EngineConfig,
    pub store: StoreLocation,
    pub server: ServerConfig,
    pub log_format: LogFormat,
}

/// A retention setting: absent takes the default, 0 means forever.
fn days(setting: Option<u32>, default: Option<u32>) -> Option<u32> {
    match setting {
        None => default,
        Some(0) => None,
        Some(days) => Some(days),
    }
}

/// `HOST:PORT`, the host a name or an IP address: the first address it resolves to.
fn socket_address(key: &str, text: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut addresses = text.to_socket_addrs().with_context(|| format!("{key} {text:?}: expected HOST:PORT"))?;
    addresses.next().with_context(|| format!("{key} {text:?}: the host name resolves to no address"))
}

fn millis(duration: Option<Duration>, default: u64) -> u64 {
    duration.map_or(default, |d| d.0)
}

/// A duration as the signed milliseconds some settings are kept in.
fn signed_millis(duration: Option<Duration>, default: i64) -> i64 {
    duration.map_or(default, |d| i64::try_from(d.0).unwrap_or(i64::MAX))
}

fn bytes<T: TryFrom<u64> + Copy>(size: Option<Size>, default: T) -> T {
    size.map_or(default, |s| T::try_from(s.0).unwrap_or(default))
}

/// A size too large for the machine's `usize` is refused by name.
fn check_sizes(file: &FileConfig) -> anyhow::Result<()> {
    for (name, size) in [
        ("group_bytes_max", file.group_bytes_max),
        ("queue_bytes_max", file.queue_bytes_max),
        ("store_cache_bytes", file.store_cache_bytes),
        ("body_bytes_max", file.body_bytes_max),
        ("body_bytes_in_flight_max", file.body_bytes_in_flight_max),
    ] {
        if let Some(size) = size {
            anyhow::ensure!(usize::try_from(size.0).is_ok(), "{name} {size} is too large");
        }
    }
    Ok(())
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// This configuration with every key `overrides` sets replaced by its value.
    pub fn overridden_by(self, overrides: &FileConfig) -> anyhow::Result<FileConfig> {
        let mut table = toml::Table::try_from(&self)?;
        table.extend(toml::Table::try_from(overrides)?);
        Ok(table.try_into()?)
    }

    fn engine(&self) -> EngineConfig {
        let default = EngineConfig::default();
        let flush_default =
            if self.kafka.is_some() { CLUSTER_FLUSH_INTERVAL_MS_DEFAULT } else { default.flush_interval_ms };
        EngineConfig {
            data_dir: self.data_dir.clone().unwrap_or(default.data_dir),
            partitions: self.partitions.unwrap_or(default.partitions),
            segment_bytes_max: bytes(self.segment_bytes_max, default.segment_bytes_max),
            flush_interval_ms: millis(self.flush_interval, flush_default),
            dedup_window_ms: signed_millis(self.dedup_window, default.dedup_window_ms),
            dedup_entries_max: self.dedup_entries_max.unwrap_or(default.dedup_entries_max),
            group_bytes_max: bytes(self.group_bytes_max, default.group_bytes_max),
            queue_bytes_max: bytes(self.queue_bytes_max, default.queue_bytes_max),
            pending_cells_max: self.pending_cells_max.unwrap_or(default.pending_cells_max),
            store_cache_bytes: bytes(self.store_cache_bytes, default.store_cache_bytes),
            retention: Retention {
                minute_days: days(self.minute_retention_days, default.retention.minute_days),
                hour_days: days(self.hour_retention_days, default.retention.hour_days),
                day_days: days(self.day_retention_days, default.retention.day_days),
            },
            retention_interval_ms: millis(self.retention_interval, default.retention_interval_ms),
            disk_free_bytes_min: bytes(self.disk_free_bytes_min, default.disk_free_bytes_min),
            event_types_max: self.event_types_max.unwrap_or(default.event_types_max),
            archive: self.archive.clone(),
            archive_retention_days: days(self.archive_retention_days, default.archive_retention_days),
            archive_file_interval_ms: millis(self.archive_file_interval, default.archive_file_interval_ms),
            accept_log_loss: false,
            clock: default.clock,
        }
    }

    fn server(&self, listen: SocketAddr) -> ServerConfig {
        let default = ServerConfig::default();
        let limits = Limits::default();
        ServerConfig {
            keys_required: self.keys_required.unwrap_or(!listen.ip().is_loopback()),
            keys_file: self.keys_file.clone(),
            body_bytes_max: bytes(self.body_bytes_max, default.body_bytes_max),
            body_bytes_in_flight_max: bytes(self.body_bytes_in_flight_max, default.body_bytes_in_flight_max),
            body_read_timeout_ms: millis(self.body_read_timeout, default.body_read_timeout_ms),
            header_read_timeout_ms: millis(self.header_read_timeout, default.header_read_timeout_ms),
            keep_alive_idle_ms: millis(self.keep_alive_idle, default.keep_alive_idle_ms),
            connections_max: self.connections_max.unwrap_or(default.connections_max),
            events_per_request_max: self.events_per_request_max.unwrap_or(default.events_per_request_max),
            field_errors_max: self.field_errors_max.unwrap_or(default.field_errors_max),
            counts_video_ids_max: self.counts_video_ids_max.unwrap_or(default.counts_video_ids_max),
            series_points_max: self.series_points_max.unwrap_or(default.series_points_max),
            cors_origins: self.cors_origins.clone().unwrap_or_default(),
            limits: Limits {
                lateness_max_ms: signed_millis(self.lateness_max, limits.lateness_max_ms),
                clock_skew_max_ms: signed_millis(self.clock_skew_max, limits.clock_skew_max_ms),
            },
            access_log: self.access_log.unwrap_or(false),
        }
    }

    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        check_sizes(&self)?;
        let engine = self.engine();
        let listen = socket_address("listen", self.listen.as_deref().unwrap_or(LISTEN_DEFAULT))?;
        let admin_listen = self.admin_listen.as_deref().map(|text| socket_address("admin_listen", text)).transpose()?;
        let server = self.server(listen);
        validate(&engine, &server, self.worker_threads)?;
        let store = match (self.store.as_deref(), self.postgres.as_deref()) {
            (Some(store), Some(postgres)) if store != postgres => {
                anyhow::bail!("store and postgres name different databases; give one")
            }
            (store, postgres) => store_location(postgres.or(store), self.store_connections_max)?,
        };
        anyhow::ensure!(
            !server.keys_required || server.keys_file.is_some(),
            "{listen} is reachable from other machines, so requests need API keys: set keys_file (create one with \
             `tally keys create --file FILE --scope write`), or keys_required = false to serve without keys"
        );
        let keys = ClusterKeys {
            kafka: self.kafka,
            topic: self.topic,
            session_timeout_ms: self.session_timeout.map(|d| d.0),
            fetch_wait_ms: self.fetch_wait.map(|d| d.0),
            advertise: self.advertise,
        };
        let cluster = cluster_settings(keys, &store, listen)?;
        Ok(ServeConfig {
            cluster,
            listen,
            admin_listen,
            worker_threads: self.worker_threads,
            shutdown_drain_ms: millis(self.shutdown_drain, SHUTDOWN_DRAIN_MS_DEFAULT),
            engine,
            store,
            server,
            log_format: self.log_format.unwrap_or_default(),
        })
    }
}

impl ServeConfig {
    /// Every setting's effective value, as the keys of a configuration file (what
    /// `--check-config` prints). Settings with no value (no Kafka, no admin address) are
    /// absent.
    pub fn effective(&self) -> FileConfig {
        let (engine, server) = (&self.engine, &self.server);
        let forever = |days: Option<u32>| Some(days.unwrap_or(0));
        let size = |bytes: u64| Some(Size(bytes));
        let (store, store_connections_max) = match &self.store {
            StoreLocation::Embedded => ("embedded".to_string(), tally_store::PoolOptions::default().connections_max),
            StoreLocation::Postgres { url, connections_max } => (url.clone(), *connections_max),
        };
        let cluster = self.cluster.as_ref();
        FileConfig {
            data_dir: Some(engine.data_dir.clone()),
            store: Some(store),
            store_connections_max: Some(store_connections_max),
            kafka: cluster.map(|c| c.brokers.clone()),
            postgres: None,
            topic: Some(cluster.map_or(TOPIC_DEFAULT.to_string(), |c| c.topic.clone())),
            session_timeout: Some(Duration(cluster.map_or(SESSION_TIMEOUT_MS_DEFAULT, |c| c.session_timeout_ms))),
            fetch_wait: Some(Duration(cluster.map_or(FETCH_WAIT_MS_DEFAULT, |c| c.fetch_wait_ms))),
            advertise: cluster.map(|c| c.advertise.clone()),
            listen: Some(self.listen.to_string()),
            admin_listen: self.admin_listen.map(|a| a.to_string()),
            worker_threads: self.worker_threads,
            shutdown_drain: Some(Duration(self.shutdown_drain_ms)),
            partitions: Some(engine.partitions),
            segment_bytes_max: size(engine.segment_bytes_max),
            flush_interval: Some(Duration(engine.flush_interval_ms)),
            dedup_window: Some(Duration(engine.dedup_window_ms.unsigned_abs())),
            dedup_entries_max: Some(engine.dedup_entries_max),
            group_bytes_max: size(engine.group_bytes_max as u64),
            queue_bytes_max: size(engine.queue_bytes_max as u64),
            pending_cells_max: Some(engine.pending_cells_max),
            store_cache_bytes: size(engine.store_cache_bytes as u64),
            minute_retention_days: forever(engine.retention.minute_days),
            hour_retention_days: forever(engine.retention.hour_days),
            day_retention_days: forever(engine.retention.day_days),
            retention_interval: Some(Duration(engine.retention_interval_ms)),
            disk_free_bytes_min: size(engine.disk_free_bytes_min),
            event_types_max: Some(engine.event_types_max),
            archive: engine.archive.clone(),
            archive_retention_days: forever(engine.archive_retention_days),
            archive_file_interval: Some(Duration(engine.archive_file_interval_ms)),
            ..self.effective_server(server)
        }
    }

    fn effective_server(&self, server: &ServerConfig) -> FileConfig {
        let size = |bytes: usize| Some(Size(bytes as u64));
        FileConfig {
            body_bytes_max: size(server.body_bytes_max),
            body_bytes_in_flight_max: size(server.body_bytes_in_flight_max),
            body_read_timeout: Some(Duration(server.body_read_timeout_ms)),
            header_read_timeout: Some(Duration(server.header_read_timeout_ms)),
            keep_alive_idle: Some(Duration(server.keep_alive_idle_ms)),
            connections_max: Some(server.connections_max),
            events_per_request_max: Some(server.events_per_request_max),
            field_errors_max: Some(server.field_errors_max),
            counts_video_ids_max: Some(server.counts_video_ids_max),
            series_points_max: Some(server.series_points_max),
            cors_origins: Some(server.cors_origins.clone()),
            keys_file: server.keys_file.clone(),
            keys_required: Some(server.keys_required),
            lateness_max: Some(Duration(server.limits.lateness_max_ms.unsigned_abs())),
            clock_skew_max: Some(Duration(server.limits.clock_skew_max_ms.unsigned_abs())),
            log_format: Some(self.log_format),
            access_log: Some(server.access_log),
            ..FileConfig::default()
        }
    }

    /// The effective configuration as a TOML file, every key in `keys` order: set keys
    /// as `key = value`, the others as a comment saying they are not set.
    pub fn effective_toml(&self, keys: &[String]) -> anyhow::Result<String> {
        let table = toml::Table::try_from(self.effective())?;
        let mut text = String::new();
        for key in keys {
            match table.get(key) {
                Some(value) => text.push_str(&format!("{key} = {value}\n")),
                None => text.push_str(&format!("# {key} is not set\n")),
            }
        }
        Ok(text)
    }
}

/// The keys of the configuration, in their documented order.
pub fn keys() -> Vec<String> {
    use clap::Args;
    let command = FileConfig::augment_args(clap::Command::new("settings"));
    command.get_arguments().map(|arg| arg.get_id().to_string()).collect()
}

/// The configuration file's cluster keys, as given.
struct ClusterKeys {
    kafka: Option<String>,
    topic: Option<String>,
    session_timeout_ms: Option<u64>,
    fetch_wait_ms: Option<u64>,
    advertise: Option<String>,
}

/// Cluster mode's settings, when `kafka` is set (it needs a PostgreSQL store).
fn cluster_settings(
    keys: ClusterKeys,
    store: &StoreLocation,
    listen: SocketAddr,
) -> anyhow::Result<Option<ClusterSettings>> {
    let Some(brokers) = keys.kafka else { return Ok(None) };
    anyhow::ensure!(
        matches!(store, StoreLocation::Postgres { .. }),
        "cluster mode (kafka) needs a PostgreSQL store: give postgres = \"postgres://…\""
    );
    let session_timeout_ms = keys.session_timeout_ms.unwrap_or(SESSION_TIMEOUT_MS_DEFAULT);
    anyhow::ensure!(
        (SESSION_TIMEOUT_MS_LOW..=SESSION_TIMEOUT_MS_HIGH).contains(&session_timeout_ms),
        "session_timeout must be {} to {}, got {}",
        Duration(SESSION_TIMEOUT_MS_LOW),
        Duration(SESSION_TIMEOUT_MS_HIGH),
        Duration(session_timeout_ms)
    );
    let fetch_wait_ms = keys.fetch_wait_ms.unwrap_or(FETCH_WAIT_MS_DEFAULT);
    anyhow::ensure!(
        (FETCH_WAIT_MS_LOW..=FETCH_WAIT_MS_HIGH).contains(&fetch_wait_ms),
        "fetch_wait must be {} to {}, got {}",
        Duration(FETCH_WAIT_MS_LOW),
        Duration(FETCH_WAIT_MS_HIGH),
        Duration(fetch_wait_ms)
    );
    let topic = keys.topic.unwrap_or_else(|| TOPIC_DEFAULT.into());
    let advertise = keys.advertise.unwrap_or_else(|| format!("http://{listen}"));
    Ok(Some(ClusterSettings { brokers, topic, session_timeout_ms, fetch_wait_ms, advertise }))
}

/// An origin is `*` or `scheme://host[:port]`, as browsers send it: no path, no
/// trailing slash.
fn check_origins(origins: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(origins.len() <= CORS_ORIGINS_MAX, "cors_origins: at most {CORS_ORIGINS_MAX} origins");
    for origin in origins {
        let (scheme, rest) = origin.split_once("://").unwrap_or(("", origin));
        let well_formed = origin == "*"
            || (matches!(scheme, "http" | "https")
                && !rest.is_empty()
                && !rest.contains('/')
                && rest.bytes().all(|b| b.is_ascii_graphic()));
        anyhow::ensure!(well_formed, "cors_origins: {origin:?} is not an origin (\"*\" or scheme://host[:port])");
    }
    Ok(())
}

/// Checks every setting's range, and that retention tiers do not shrink.
fn validate(engine: &EngineConfig, server: &ServerConfig, worker_threads: Option<usize>) -> anyhow::Result<()> {
    // The bounds keep every product of two settings far from overflow, and every WAL
    // frame (one group plus one record, a record at most about twice its JSON) under
    // the log's frame limit.
    let within = |name: &str, value: u64, low: u64, high: u64| {
        anyhow::ensure!((low..=high).contains(&value), "{name} must be {low} to {high}, got {value}");
        Ok(())
    };
    const MIB: u64 = 1 << 20;
    const GROUP_BYTES_HIGH: u64 = 64 * MIB;
    const BODY_BYTES_HIGH: u64 = 64 * MIB;
    // A frame holds up to a group plus one more request's records, which can take about
    // twice the request's JSON body.
    const _: () = assert!(GROUP_BYTES_HIGH + 2 * BODY_BYTES_HIGH < tally_wal::FRAME_PAYLOAD_BYTES_MAX as u64);
    let non_negative = |value: i64| u64::try_from(value).unwrap_or(u64::MAX);
    let within_ms = |name: &str, value: u64, low: u64, high: u64| {
        let (value, low, high) = (Duration(value), Duration(low), Duration(high));
        anyhow::ensure!((low.0..=high.0).contains(&value.0), "{name} must be {low} to {high}, got {value}");
        Ok(())
    };
    within("partitions", engine.partitions.into(), 1, 1024)?;
    within_ms("dedup_window", non_negative(engine.dedup_window_ms), 60_000, 30 * 86_400_000)?;
    within("dedup_entries_max", engine.dedup_entries_max as u64, 1, 1 << 32)?;
    within_ms("flush_interval", engine.flush_interval_ms, 10, 86_400_000)?;
    within("segment_bytes_max", engine.segment_bytes_max, 4096, 1 << 30)?;
    within("group_bytes_max", engine.group_bytes_max as u64, 4096, GROUP_BYTES_HIGH)?;
    within("queue_bytes_max", engine.queue_bytes_max as u64, MIB, 64 << 30)?;
    within("pending_cells_max", engine.pending_cells_max as u64, 1000, 1 << 32)?;
    within("store_cache_bytes", engine.store_cache_bytes as u64, 16 * MIB, 1 << 40)?;
    within_ms("retention_interval", engine.retention_interval_ms, 1000, 86_400_000)?;
    within_ms("archive_file_interval", engine.archive_file_interval_ms, 100, 3_600_000)?;
    within("disk_free_bytes_min", engine.disk_free_bytes_min, 0, 1 << 50)?;
    within("event_types_max", engine.event_types_max as u64, 1, 1_000_000)?;
    // A coarser tier answers for a finer one past its retention, so it must last as long.
    let forever = |days: Option<u32>| days.unwrap_or(u32::MAX);
    let retention = engine.retention;
    anyhow::ensure!(
        forever(retention.minute_days) <= forever(retention.hour_days)
            && forever(retention.hour_days) <= forever(retention.day_days),
        "retention must not shrink from minute to hour to day buckets: minute {}, hour {}, day {} days (0 = forever)",
        retention.minute_days.unwrap_or(0),
        retention.hour_days.unwrap_or(0),
        retention.day_days.unwrap_or(0)
    );
    within("body_bytes_max", server.body_bytes_max as u64, 1024, BODY_BYTES_HIGH)?;
    if let Some(threads) = worker_threads {
        within("worker_threads", threads as u64, 1, 1024)?;
    }
    within("body_bytes_in_flight_max", server.body_bytes_in_flight_max as u64, server.body_bytes_max as u64, 64 << 30)?;
    within_ms("body_read_timeout", server.body_read_timeout_ms, 100, 3_600_000)?;
    within_ms("header_read_timeout", server.header_read_timeout_ms, 100, 600_000)?;
    within_ms("keep_alive_idle", server.keep_alive_idle_ms, 100, 3_600_000)?;
    within("connections_max", server.connections_max as u64, 1, 1_000_000)?;
    within("events_per_request_max", server.events_per_request_max as u64, 1, 1_000_000)?;
    within("field_errors_max", server.field_errors_max as u64, 1, 100_000)?;
    within("counts_video_ids_max", server.counts_video_ids_max as u64, 1, 100_000)?;
    within("series_points_max", server.series_points_max as u64, 1, 1_000_000)?;
    check_origins(&server.cors_origins)?;
    within_ms("lateness_max", non_negative(server.limits.lateness_max_ms), 0, 100 * 365 * 86_400_000)?;
    within_ms("clock_skew_max", non_negative(server.limits.clock_skew_max_ms), 0, 86_400_000)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_an_error() {
        let error = toml::from_str::<FileConfig>("partitons = 3").unwrap_err().to_string();
        assert!(error.contains("unknown field") && error.contains("partitons"), "{error}");
        let error = toml::from_str::<FileConfig>("flush_interval_ms = 500").unwrap_err().to_string();
        assert!(error.contains("flush_interval_ms"), "{error}");
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        for (text, name) in [
            ("pending_cells_max = 0", "pending_cells_max"),
            ("cors_origins = [\"https://a.example/\"]", "cors_origins"),
            ("cors_origins = [\"a.example\"]", "cors_origins"),
            ("dedup_window = \"5s\"", "dedup_window must be 1m to 30d, got 5s"),
            ("kafka = \"k:9092\"\npostgres = \"postgres://t@h/d\"\nfetch_wait = \"0ms\"", "fetch_wait"),
            ("body_bytes_max = \"1GiB\"", "body_bytes_max"),
            ("minute_retention_days = 30\nhour_retention_days = 10", "retention must not shrink"),
            ("listen = \"no-such-host.invalid:80\"", "listen"),
            ("listen = \"8080\"", "listen \"8080\": expected HOST:PORT"),
        ] {
            let error = toml::from_str::<FileConfig>(text).unwrap().resolve().err().expect(text);
            assert!(format!("{error:#}").contains(name), "{error:#}");
        }
        let error = toml::from_str::<FileConfig>("flush_interval = 500").unwrap_err().to_string();
        assert!(error.contains("a duration is a string with a unit"), "{error}");
    }

    #[test]
    fn every_key_is_accepted_and_printed_back_as_it_resolves() {
        let text = r#"
            data_dir = "/tmp/x"
            kafka = "127.0.0.1:9092"
            postgres = "postgres://tally@127.0.0.1:5432/tally"
            store = "postgres://tally@127.0.0.1:5432/tally"
            store_connections_max = 4
            topic = "views"
            session_timeout = "10s"
            fetch_wait = "100ms"
            advertise = "http://10.0.0.5:8080"
            cors_origins = ["https://a.example", "http://localhost:3000"]
            listen = "localhost:0"
            admin_listen = "127.0.0.1:0"
            worker_threads = 2
            shutdown_drain = "5s"
            partitions = 8
            segment_bytes_max = "1MiB"
            flush_interval = "500ms"
            dedup_window = "15m"
            dedup_entries_max = 1000
            group_bytes_max = "1MiB"
            queue_bytes_max = "1MiB"
            pending_cells_max = 1000
            store_cache_bytes = "16MiB"
            minute_retention_days = 2
            hour_retention_days = 90
            day_retention_days = 0
            retention_interval = "5s"
            disk_free_bytes_min = "0B"
            event_types_max = 50
            body_bytes_max = "1MiB"
            body_bytes_in_flight_max = "2MiB"
            body_read_timeout = "5s"
            header_read_timeout = "5s"
            keep_alive_idle = "5s"
            connections_max = 100
            events_per_request_max = 10
            field_errors_max = 5
            counts_video_ids_max = 10
            series_points_max = 100
            keys_file = "/etc/tally/keys.json"
            keys_required = true
            lateness_max = "1s"
            clock_skew_max = "1s"
            archive = "file:///var/lib/tally/archive"
            archive_retention_days = 30
            archive_file_interval = "10s"
            log_format = "json"
            access_log = true
        "#;
        let config = toml::from_str::<FileConfig>(text).unwrap().resolve().unwrap();
        assert_eq!(config.engine.partitions, 8);
        assert_eq!(config.engine.segment_bytes_max, 1 << 20);
        assert_eq!(config.cluster.as_ref().unwrap().fetch_wait_ms, 100);
        assert_eq!(config.server.limits.clock_skew_max_ms, 1000);
        assert!(config.listen.ip().is_loopback(), "a host name resolves");
        let effective = config.effective();
        let table = toml::Table::try_from(&effective).unwrap();
        let given: toml::Table = toml::from_str(text).unwrap();
        for key in keys() {
            assert!(given.contains_key(&key), "the test gives every key: {key}");
            if !["listen", "admin_listen", "postgres", "store"].contains(&key.as_str()) {
                assert_eq!(table.get(&key), given.get(&key), "{key} prints back as given");
            }
        }
        let again = effective.resolve().unwrap().effective();
        assert_eq!(toml::Table::try_from(again).unwrap(), table, "the printed configuration resolves the same");
    }

    #[test]
    fn later_layers_override_earlier_ones_key_by_key() {
        let file: FileConfig = toml::from_str("partitions = 8\nflush_interval = \"2s\"").unwrap();
        let flags = FileConfig { flush_interval: Some(Duration(250)), ..FileConfig::default() };
        let merged = file.overridden_by(&flags).unwrap();
        assert_eq!((merged.partitions, merged.flush_interval), (Some(8), Some(Duration(250))));
    }
}
