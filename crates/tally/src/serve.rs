//! `tally serve`: listen first (so `/readyz` can say "recovering"), recover the engine,
//! serve until SIGTERM or SIGINT, then drain, flush, checkpoint and exit 0.
//!
//! A stop signal during recovery exits at once: nothing has been acknowledged yet and
//! recovery writes nothing the next start cannot redo, so it starts over from the same
//! checkpoint.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_engine::{Engine, EngineConfig};
use tally_server::AppState;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::ServeArgs;
use crate::config::{ClusterSettings, FileConfig, LogFormat, ServeConfig, StoreLocation};

/// Logs to stderr as text or JSON lines, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// The settings: defaults, then the file, then `TALLY_*` variables and flags (clap has
/// already put each flag over its variable).
fn configuration(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let mut config = file.overridden_by(&args.settings)?.resolve()?;
    config.engine.accept_log_loss = args.accept_log_loss;
    Ok(config)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let check = args.check_config;
    let config = configuration(args)?;
    if check {
        print!("{}", config.effective_toml(&crate::config::keys())?);
        return Ok(());
    }
    init_logging(config.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().thread_name("tally-http").build()?;
    let served = runtime.block_on(serve(config));
    // Do not wait for blocking work still running (a long query cut off by the drain
    // timeout): everything acknowledged is already flushed and checkpointed.
    runtime.shutdown_background();
    served
}

async fn serve(mut config: ServeConfig) -> anyhow::Result<()> {
    // Before anything slow, so that a stop during recovery is a clean exit, not a kill.
    let mut stop_signal = StopSignal::install()?;
    config.server.connections_max = connections_within_file_limit(
        config.server.connections_max,
        config.engine.partitions,
        config.admin_listen.is_some(),
    )?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let data_dir = std::path::absolute(&config.engine.data_dir)?;
    tracing::info!(address = %format!("http://{address}"), data_dir = %data_dir.display(), "tally listening; recovering");
    let state = AppState::new(config.server);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(tally_server::serve(listener, Arc::clone(&state), stop_rx.clone()));
    if let Some(admin_listen) = config.admin_listen {
        let admin = TcpListener::bind(admin_listen).await.with_context(|| format!("binding {admin_listen}"))?;
        tracing::info!(admin = %format!("http://{}", admin.local_addr()?), "admin listening: /healthz, /readyz, /metrics");
        tokio::spawn(tally_server::serve_admin(admin, Arc::clone(&state), stop_rx.clone()));
    }

    let (engine_config, store, cluster) = (config.engine, config.store, config.cluster);
    let opening = tokio::task::spawn_blocking(move || open_engine(engine_config, store, cluster));
    let (engine, leave) = tokio::select! {
        opened = opening => {
            let (engine, leave) = opened??;
            (Arc::new(engine), leave)
        }
        () = stop_signal.recv() => {
            tracing::info!("stopped while recovering; the next start recovers from the same checkpoint");
            // At once: an engine that finished opening meanwhile would flush everything
            // it replayed if dropped; the log still holds all of it.
            std::process::exit(0);
        }
    };
    let recovery = engine.recovery();
    tracing::info!(
        seconds = recovery.duration.as_secs_f64(),
        replayed_bytes = recovery.replayed_bytes,
        replayed_records = recovery.replayed_records,
        "ready"
    );
    state.set_engine(Arc::clone(&engine));

    stop_signal.recv().await;
    tracing::info!(drain_ms = config.shutdown_drain_ms, "stopping: draining requests");
    state.set_stopping();
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_millis(config.shutdown_drain_ms), server).await {
        Ok(result) => result?,
        // New requests are refused with 503 from here on; requests already admitted are
        // still answered once the engine has written them, and cut off at exit otherwise.
        Err(_) => tracing::warn!("drain timed out; stopping with requests still open"),
    }
    if let Some(leave) = leave {
        // Cluster mode: the partitions owned here are flushed and given up first.
        tokio::task::spawn_blocking(leave).await?;
    }
    tokio::task::spawn_blocking(move || engine.shutdown()).await??;
    tracing::info!("stopped: everything flushed and checkpointed");
    Ok(())
}

/// What leaves the cluster before the engine stops (cluster mode).
type Leave = Option<Box<dyn FnOnce() + Send>>;

/// The engine on the store the configuration chooses, with the data directory's log, or
/// (cluster mode) a node on the shared log and store.
fn open_engine(
    config: EngineConfig,
    store: StoreLocation,
    cluster: Option<ClusterSettings>,
) -> anyhow::Result<(Engine, Leave)> {
    if let Some(settings) = cluster {
        let StoreLocation::Postgres { url, connections_max } = store else {
            anyhow::bail!("cluster mode needs a PostgreSQL store");
        };
        return start_node(config, &url, connections_max, &settings);
    }
    let engine = match store {
        StoreLocation::Embedded => Engine::open(config).context("opening the data directory")?,
        StoreLocation::Postgres { url, connections_max } => {
            let options = tally_store::PoolOptions { connections_max, ..Default::default() };
            let store = tally_store::PostgresStore::open(&url, options).context("opening the PostgreSQL store")?;
            let log = tally_engine::local::open_log(&config, &store).context("opening the data directory")?;
            Engine::start(config, Arc::new(store), Box::new(log)).context("starting on the PostgreSQL store")?
        }
    };
    Ok((engine, None))
}

#[cfg(feature = "cluster")]
fn start_node(
    config: EngineConfig,
    url: &str,
    connections_max: usize,
    settings: &ClusterSettings,
) -> anyhow::Result<(Engine, Leave)> {
    let (engine, leave) = crate::cluster::start(config, url, connections_max, settings)?;
    Ok((engine, Some(leave)))
}

#[cfg(not(feature = "cluster"))]
fn start_node(_: EngineConfig, _: &str, _: usize, _: &ClusterSettings) -> anyhow::Result<(Engine, Leave)> {
    anyhow::bail!("this tally was built without cluster mode (cargo feature \"cluster\")")
}

/// File descriptors kept for everything but client connections: the store, each
/// partition's log segments and directory, the listener, logs, and headroom.
const FDS_RESERVED_BASE: u64 = 64;
const FDS_RESERVED_PER_PARTITION: u64 = 4;

/// Raises the soft open-file limit to the hard one, and lowers `connections_max` if even
/// that cannot hold every connection (with the over-limit ones that still get their 503
/// and the descriptors the engine needs), so the process never runs out of descriptors
/// and stops accepting anyone.
fn connections_within_file_limit(connections_max: usize, partitions: u32, admin: bool) -> anyhow::Result<usize> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        anyhow::bail!("reading the open-file limit: {}", std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let reserved = FDS_RESERVED_BASE
        + FDS_RESERVED_PER_PARTITION * u64::from(partitions)
        + tally_server::SHED_CONNECTIONS_MAX as u64
        + if admin { tally_server::ADMIN_CONNECTIONS_MAX as u64 } else { 0 };
    let available = usize::try_from(limit.rlim_cur.saturating_sub(reserved)).unwrap_or(usize::MAX);
    anyhow::ensure!(
        available > 0,
        "the open-file limit ({}) leaves no descriptor for connections; raise it (ulimit -n)",
        limit.rlim_cur
    );
    if available < connections_max {
        tracing::warn!(
            connections_max,
            open_file_limit = limit.rlim_cur,
            connections_max_used = available,
            "connections_max lowered to fit the open-file limit"
        );
    }
    Ok(connections_max.min(available))
}

/// SIGTERM or SIGINT, whichever comes first.
struct StopSignal {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignal {
    fn install() -> anyhow::Result<StopSignal> {
        Ok(StopSignal {
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
