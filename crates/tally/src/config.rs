//! `tally serve` configuration: a TOML file where every setting can be given, overridden
//! by command-line flags. Unknown keys are an error, so a typo never silently falls back
//! to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use tally_core::Limits;
use tally_engine::{EngineConfig, Retention};
use tally_server::ServerConfig;

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

/// Every setting of `tally serve`. Absent keys take the defaults of `EngineConfig`,
/// `ServerConfig` and `Limits`, documented in the README's configuration table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    /// Where the aggregates live: `embedded` (redb in the data directory, the default) or
    /// a `postgres://user@host:port/db` URL. The log stays in the data directory.
    pub store: Option<String>,
    /// Connections to the database at most (PostgreSQL store); default 16.
    pub store_connections_max: Option<usize>,
    /// Cluster mode: the Kafka brokers (`host:port,host:port`) holding the log. Needs
    /// `postgres`.
    pub kafka: Option<String>,
    /// The PostgreSQL URL of the store (the same as `store`, under the name cluster mode
    /// uses).
    pub postgres: Option<String>,
    /// Cluster mode: the topic (default `tally-events`).
    pub topic: Option<String>,
    /// Cluster mode: how long the group waits for a silent node before moving its
    /// partitions, milliseconds (default 6,000).
    pub session_timeout_ms: Option<u64>,
    /// Cluster mode: how long the broker may hold an owner's fetch that finds nothing new,
    /// milliseconds (Kafka's `fetch.wait.max.ms`; default 100). Brokers that answer a
    /// waiting fetch only when this runs out (tansu) add it to every write's delay to
    /// visibility on other nodes.
    pub fetch_wait_ms: Option<u64>,
    /// Cluster mode: this node's URL as others reach it (its Kafka client id, so group
    /// tools show which node owns which partition); default the listen address.
    pub advertise: Option<String>,
    pub listen: Option<SocketAddr>,
    /// A second address serving only /healthz, /readyz and /metrics, apart from the
    /// client connections and their limit; default: none.
    pub admin_listen: Option<SocketAddr>,
    /// Tokio worker threads for HTTP; default: one per core.
    pub worker_threads: Option<usize>,
    /// Milliseconds to let in-flight requests finish after SIGTERM before closing them.
    pub shutdown_drain_ms: Option<u64>,
    pub partitions: Option<u32>,
    pub segment_bytes_max: Option<u64>,
    pub flush_interval_ms: Option<u64>,
    pub dedup_window_ms: Option<i64>,
    pub dedup_entries_max: Option<usize>,
    pub group_bytes_max: Option<usize>,
    pub queue_bytes_max: Option<usize>,
    pub pending_cells_max: Option<usize>,
    /// The store's page cache, bytes.
    pub store_cache_bytes: Option<usize>,
    /// Days minute buckets are kept; 0 keeps them forever.
    pub minute_retention_days: Option<u32>,
    /// Days hour buckets are kept; 0 keeps them forever.
    pub hour_retention_days: Option<u32>,
    /// Days day buckets are kept; 0 (the default) keeps them forever.
    pub day_retention_days: Option<u32>,
    pub retention_interval_ms: Option<u64>,
    /// Free disk the log leaves for the store, bytes.
    pub disk_free_bytes_min: Option<u64>,
    pub event_types_max: Option<usize>,
    pub body_bytes_max: Option<usize>,
    pub body_bytes_in_flight_max: Option<usize>,
    pub body_read_timeout_ms: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub keep_alive_idle_ms: Option<u64>,
    pub connections_max: Option<usize>,
    pub events_per_request_max: Option<usize>,
    pub field_errors_max: Option<usize>,
    pub counts_video_ids_max: Option<usize>,
    pub series_points_max: Option<usize>,
    /// Origins whose pages may call the API (CORS), e.g. `["https://example.com"]`, or
    /// `["*"]`; default none.
    pub cors_origins: Option<Vec<String>>,
    /// The API keys file (`tally keys create --file …` makes it); reloaded when it
    /// changes.
    pub keys_file: Option<PathBuf>,
    /// Whether requests need a key; default: yes unless `listen` is a loopback address.
    pub keys_required: Option<bool>,
    pub lateness_max_ms: Option<i64>,
    pub clock_skew_max_ms: Option<i64>,
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
/// The range `fetch_wait_ms` may take.
const FETCH_WAIT_MS_LOW: u64 = 1;
const FETCH_WAIT_MS_HIGH: u64 = 10_000;
/// The range `session_timeout_ms` may take (Kafka's brokers refuse less than 6,000 by
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
}

/// A retention setting: absent takes the default, 0 means forever.
fn days(setting: Option<u32>, default: Option<u32>) -> Option<u32> {
    match setting {
        None => default,
        Some(0) => None,
        Some(days) => Some(days),
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        let engine_default = EngineConfig::default();
        let server_default = ServerConfig::default();
        let limits_default = Limits::default();
        let engine = EngineConfig {
            data_dir: self.data_dir.unwrap_or(engine_default.data_dir),
            partitions: self.partitions.unwrap_or(engine_default.partitions),
            segment_bytes_max: self.segment_bytes_max.unwrap_or(engine_default.segment_bytes_max),
            flush_interval_ms: self.flush_interval_ms.unwrap_or(if self.kafka.is_some() {
                CLUSTER_FLUSH_INTERVAL_MS_DEFAULT
            } else {
                engine_default.flush_interval_ms
            }),
            dedup_window_ms: self.dedup_window_ms.unwrap_or(engine_default.dedup_window_ms),
            dedup_entries_max: self.dedup_entries_max.unwrap_or(engine_default.dedup_entries_max),
            group_bytes_max: self.group_bytes_max.unwrap_or(engine_default.group_bytes_max),
            queue_bytes_max: self.queue_bytes_max.unwrap_or(engine_default.queue_bytes_max),
            pending_cells_max: self.pending_cells_max.unwrap_or(engine_default.pending_cells_max),
            store_cache_bytes: self.store_cache_bytes.unwrap_or(engine_default.store_cache_bytes),
            retention: Retention {
                minute_days: days(self.minute_retention_days, engine_default.retention.minute_days),
                hour_days: days(self.hour_retention_days, engine_default.retention.hour_days),
                day_days: days(self.day_retention_days, engine_default.retention.day_days),
            },
            retention_interval_ms: self.retention_interval_ms.unwrap_or(engine_default.retention_interval_ms),
            disk_free_bytes_min: self.disk_free_bytes_min.unwrap_or(engine_default.disk_free_bytes_min),
            event_types_max: self.event_types_max.unwrap_or(engine_default.event_types_max),
            accept_log_loss: false,
            clock: engine_default.clock,
        };
        let listen = self.listen.unwrap_or_else(|| LISTEN_DEFAULT.parse().expect("valid default address"));
        let server = ServerConfig {
            keys_required: self.keys_required.unwrap_or(!listen.ip().is_loopback()),
            keys_file: self.keys_file,
            body_bytes_max: self.body_bytes_max.unwrap_or(server_default.body_bytes_max),
            body_bytes_in_flight_max: self.body_bytes_in_flight_max.unwrap_or(server_default.body_bytes_in_flight_max),
            body_read_timeout_ms: self.body_read_timeout_ms.unwrap_or(server_default.body_read_timeout_ms),
            header_read_timeout_ms: self.header_read_timeout_ms.unwrap_or(server_default.header_read_timeout_ms),
            keep_alive_idle_ms: self.keep_alive_idle_ms.unwrap_or(server_default.keep_alive_idle_ms),
            connections_max: self.connections_max.unwrap_or(server_default.connections_max),
            events_per_request_max: self.events_per_request_max.unwrap_or(server_default.events_per_request_max),
            field_errors_max: self.field_errors_max.unwrap_or(server_default.field_errors_max),
            counts_video_ids_max: self.counts_video_ids_max.unwrap_or(server_default.counts_video_ids_max),
            series_points_max: self.series_points_max.unwrap_or(server_default.series_points_max),
            cors_origins: self.cors_origins.unwrap_or_default(),
            limits: Limits {
                lateness_max_ms: self.lateness_max_ms.unwrap_or(limits_default.lateness_max_ms),
                clock_skew_max_ms: self.clock_skew_max_ms.unwrap_or(limits_default.clock_skew_max_ms),
            },
        };
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
            session_timeout_ms: self.session_timeout_ms,
            fetch_wait_ms: self.fetch_wait_ms,
            advertise: self.advertise,
        };
        let cluster = cluster_settings(keys, &store, listen)?;
        Ok(ServeConfig {
            cluster,
            listen,
            admin_listen: self.admin_listen,
            worker_threads: self.worker_threads,
            shutdown_drain_ms: self.shutdown_drain_ms.unwrap_or(SHUTDOWN_DRAIN_MS_DEFAULT),
            engine,
            store,
            server,
        })
    }
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
        "session_timeout_ms must be {SESSION_TIMEOUT_MS_LOW} to {SESSION_TIMEOUT_MS_HIGH}, got {session_timeout_ms}"
    );
    let fetch_wait_ms = keys.fetch_wait_ms.unwrap_or(FETCH_WAIT_MS_DEFAULT);
    anyhow::ensure!(
        (FETCH_WAIT_MS_LOW..=FETCH_WAIT_MS_HIGH).contains(&fetch_wait_ms),
        "fetch_wait_ms must be {FETCH_WAIT_MS_LOW} to {FETCH_WAIT_MS_HIGH}, got {fetch_wait_ms}"
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
    within("partitions", engine.partitions.into(), 1, 1024)?;
    within("dedup_window_ms", non_negative(engine.dedup_window_ms), 60_000, 30 * 86_400_000)?;
    within("dedup_entries_max", engine.dedup_entries_max as u64, 1, 1 << 32)?;
    within("flush_interval_ms", engine.flush_interval_ms, 10, 86_400_000)?;
    within("segment_bytes_max", engine.segment_bytes_max, 4096, 1 << 30)?;
    within("group_bytes_max", engine.group_bytes_max as u64, 4096, GROUP_BYTES_HIGH)?;
    within("queue_bytes_max", engine.queue_bytes_max as u64, MIB, 64 << 30)?;
    within("pending_cells_max", engine.pending_cells_max as u64, 1000, 1 << 32)?;
    within("store_cache_bytes", engine.store_cache_bytes as u64, 16 * MIB, 1 << 40)?;
    within("retention_interval_ms", engine.retention_interval_ms, 1000, 86_400_000)?;
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
    within("body_read_timeout_ms", server.body_read_timeout_ms, 100, 3_600_000)?;
    within("header_read_timeout_ms", server.header_read_timeout_ms, 100, 600_000)?;
    within("keep_alive_idle_ms", server.keep_alive_idle_ms, 100, 3_600_000)?;
    within("connections_max", server.connections_max as u64, 1, 1_000_000)?;
    within("events_per_request_max", server.events_per_request_max as u64, 1, 1_000_000)?;
    within("field_errors_max", server.field_errors_max as u64, 1, 100_000)?;
    within("counts_video_ids_max", server.counts_video_ids_max as u64, 1, 100_000)?;
    within("series_points_max", server.series_points_max as u64, 1, 1_000_000)?;
    check_origins(&server.cors_origins)?;
    within("lateness_max_ms", non_negative(server.limits.lateness_max_ms), 0, 100 * 365 * 86_400_000)?;
    within("clock_skew_max_ms", non_negative(server.limits.clock_skew_max_ms), 0, 86_400_000)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_an_error() {
        let error = toml::from_str::<FileConfig>("partitons = 3").unwrap_err().to_string();
        assert!(error.contains("unknown field") && error.contains("partitons"), "{error}");
    }

    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        for (text, name) in [
            ("pending_cells_max = 0", "pending_cells_max"),
            ("cors_origins = [\"https://a.example/\"]", "cors_origins"),
            ("cors_origins = [\"a.example\"]", "cors_origins"),
            ("dedup_window_ms = -5", "dedup_window_ms"),
            ("kafka = \"k:9092\"\npostgres = \"postgres://t@h/d\"\nfetch_wait_ms = 0", "fetch_wait_ms"),
            ("body_bytes_max = 1073741824", "body_bytes_max"),
            ("minute_retention_days = 30\nhour_retention_days = 10", "retention must not shrink"),
        ] {
            let error = toml::from_str::<FileConfig>(text).unwrap().resolve().err().expect(text).to_string();
            assert!(error.contains(name), "{error}");
        }
    }

    #[test]
    fn every_key_is_accepted() {
        let text = r#"
            data_dir = "/tmp/x"
            kafka = "127.0.0.1:9092"
            postgres = "postgres://tally@127.0.0.1:5432/tally"
            topic = "views"
            session_timeout_ms = 10000
            fetch_wait_ms = 100
            advertise = "http://10.0.0.5:8080"
            cors_origins = ["https://a.example", "http://localhost:3000"]
            listen = "127.0.0.1:0"
            worker_threads = 2
            shutdown_drain_ms = 5000
            partitions = 8
            segment_bytes_max = 1048576
            flush_interval_ms = 500
            dedup_window_ms = 900000
            dedup_entries_max = 1000
            group_bytes_max = 1048576
            queue_bytes_max = 1048576
            pending_cells_max = 1000
            store_cache_bytes = 16777216
            minute_retention_days = 2
            hour_retention_days = 90
            day_retention_days = 0
            retention_interval_ms = 5000
            disk_free_bytes_min = 0
            event_types_max = 50
            body_bytes_max = 1048576
            body_bytes_in_flight_max = 2097152
            body_read_timeout_ms = 5000
            header_read_timeout_ms = 5000
            keep_alive_idle_ms = 5000
            connections_max = 100
            events_per_request_max = 10
            field_errors_max = 5
            counts_video_ids_max = 10
            series_points_max = 100
            lateness_max_ms = 1000
            clock_skew_max_ms = 1000
        "#;
        let config = toml::from_str::<FileConfig>(text).unwrap().resolve().unwrap();
        assert_eq!(config.engine.partitions, 8);
        assert_eq!(config.cluster.unwrap().fetch_wait_ms, 100);
        assert_eq!(config.server.limits.clock_skew_max_ms, 1000);
    }
}
