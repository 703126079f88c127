//! Connections to PostgreSQL for a synchronous caller: a small runtime of its own drives
//! the sockets, and callers wait on the client's futures from their own thread, which
//! needs no runtime (tokio-postgres' requests and answers travel over channels). So the
//! store can be used from the engine's threads and from inside the server's runtime
//! alike.
//!
//! The pool is bounded (`PoolOptions::connections_max`): a caller waits at most
//! `PoolOptions::wait` for a free connection, then gets `StoreError::Unavailable`. A
//! connection that broke is dropped on return, and the next caller opens a new one.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio_postgres::{Client, NoTls, Statement};

use crate::StoreError;

/// Bounds of the pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Connections open at once, at most.
    pub connections_max: usize,
    /// How long a caller waits for a free connection, and a new one for its handshake.
    pub wait: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions { connections_max: 16, wait: Duration::from_secs(5) }
    }
}

/// A session left idle inside a transaction (its process paused or hung mid-flush) is
/// ended by the server after this, which frees the rows it locked: a node's claim of a
/// partition waits at most this long for the old owner's paused flush.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Prepared statements kept per connection.
const STATEMENTS_MAX: usize = 512;

/// Waits for a future on the calling thread.
pub(crate) fn wait<F: Future>(future: F) -> F::Output {
    futures_executor::block_on(future)
}

pub(crate) struct Pool {
    /// Always `Some` until dropped (taken to shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
    config: tokio_postgres::Config,
    options: PoolOptions,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Connection>,
    /// Connections handed out or idle.
    open: usize,
}

/// One session, with the statements it has prepared, by SQL text.
pub(crate) struct Connection {
    pub(crate) client: Client,
    statements: HashMap<String, Statement>,
    /// Left in an unknown state (a transaction that could not be ended): closed on return.
    broken: bool,
}

impl Connection {
    /// The prepared statement for `sql`, prepared on first use.
    pub(crate) fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = wait(self.client.prepare(sql)).map_err(super::pg_error("prepare"))?;
        if self.statements.len() >= STATEMENTS_MAX {
            // Statements name period tables, which come and go: start over, rather
            // than keep those of dropped tables forever.
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Runs `work` in one transaction opened with `begin`: committed if it succeeds,
    /// rolled back if it fails (and the connection dropped if even that fails).
    pub(crate) fn transaction<T>(
        &mut self,
        begin: &str,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        wait(self.client.batch_execute(begin)).map_err(super::pg_error("begin"))?;
        let result = work(self).and_then(|value| {
            wait(self.client.batch_execute("COMMIT")).map_err(super::pg_error("commit"))?;
            Ok(value)
        });
        if result.is_err() {
            self.end();
        }
        result
    }

    /// Rolls back whatever transaction is open; a connection that cannot is dropped.
    pub(crate) fn end(&mut self) {
        if wait(self.client.batch_execute("ROLLBACK")).is_err() {
            self.broken = true;
        }
    }
}

impl Pool {
    pub(crate) fn new(mut config: tokio_postgres::Config, options: PoolOptions) -> Result<Pool, StoreError> {
        config.connect_timeout(options.wait);
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(Duration::from_secs(30));
        config.application_name("tally");
        let timeout = IDLE_IN_TRANSACTION_TIMEOUT.as_millis();
        let given = config.get_options().map(|given| format!("{given} ")).unwrap_or_default();
        config.options(format!("{given}-c idle_in_transaction_session_timeout={timeout}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tally-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable { detail: format!("cannot start the PostgreSQL runtime: {e}") })?;
        let state = Mutex::new(PoolState { idle: Vec::new(), open: 0 });
        Ok(Pool { runtime: Some(runtime), config, options, state, freed: Condvar::new() })
    }

    /// A connection, reused or new; waits for one to be free at the limit.
    pub(crate) fn get(&self) -> Result<Pooled<'_>, StoreError> {
        let deadline = Instant::now() + self.options.wait;
        let mut state = self.state.lock();
        loop {
            if let Some(connection) = state.idle.pop() {
                if connection.client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                return Ok(Pooled { pool: self, connection: Some(connection) });
            }
            if state.open < self.options.connections_max {
                state.open += 1;
                break;
            }
            if self.freed.wait_until(&mut state, deadline).timed_out() {
                return Err(StoreError::Unavailable {
                    detail: format!("all {} database connections stayed busy", self.options.connections_max),
                });
            }
        }
        drop(state);
        match self.connect() {
            Ok(connection) => Ok(Pooled { pool: self, connection: Some(connection) }),
            Err(error) => {
                self.state.lock().open -= 1;
                self.freed.notify_one();
                Err(error)
            }
        }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let config = self.config.clone();
        let connecting = self.runtime.as_ref().expect("runtime until dropped").spawn(async move {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "database connection ended");
                }
            });
            Ok::<Client, tokio_postgres::Error>(client)
        });
        let client = wait(connecting)
            .map_err(|e| StoreError::Unavailable { detail: format!("database connection task failed: {e}") })?
            .map_err(super::pg_error("connect"))?;
        Ok(Connection { client, statements: HashMap::new(), broken: false })
    }

    /// Closes the idle connections, so the next callers open fresh ones.
    pub(crate) fn clear(&self) {
        let mut state = self.state.lock();
        let dropped = state.idle.len();
        state.idle.clear();
        state.open -= dropped;
        self.freed.notify_all();
    }
}

/// A connection out of the pool; back in it when dropped, unless it broke.
pub(crate) struct Pooled<'p> {
    pool: &'p Pool,
    connection: Option<Connection>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.connection.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.connection.as_mut().expect("present until dropped")
    }
}

impl Drop for Pool {
    /// The store may be dropped on a thread of another runtime, where waiting for this
    /// one's threads is not allowed: the connection tasks are told to stop and left to end.
    fn drop(&mut self) {
        self.state.get_mut().idle.clear();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let connection = self.connection.take().expect("present until dropped");
        let mut state = self.pool.state.lock();
        // A panic may have left a transaction open on it: never hand that out again.
        if connection.broken || connection.client.is_closed() || std::thread::panicking() {
            state.open -= 1;
        } else {
            state.idle.push(connection);
        }
        drop(state);
        self.pool.freed.notify_one();
    }
}
