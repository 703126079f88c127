//! Opening a test engine on either store: the embedded one in its data directory, or a
//! PostgreSQL database (the data directory then holds only the log).

#![allow(dead_code)]

use std::sync::Arc;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tally_engine::{Engine, EngineConfig};
use tally_store::{PoolOptions, PostgresStore};

/// Opens the engine on `config.data_dir`, with its aggregates in `database` (a URL) when
/// given, else in the embedded store.
pub fn open(config: EngineConfig, database: Option<&str>) -> Engine {
    let Some(url) = database else { return Engine::open(config).unwrap() };
    let store = PostgresStore::open(url, PoolOptions { connections_max: 4, ..PoolOptions::default() }).unwrap();
    let log = tally_engine::local::open_log(&config, &store).unwrap();
    Engine::start(config, Arc::new(store), Box::new(log)).unwrap()
}

/// Property cases run over the PostgreSQL store: one server for them all, a fresh
/// database (its URL handed to `case`) for each.
pub fn on_postgresql<S: Strategy>(cases: u32, strategy: S, case: impl Fn(S::Value, &str) -> Result<(), TestCaseError>) {
    let server = tally_pgtest::Postgres::start();
    let mut runner = TestRunner::new(Config { cases, ..Config::default() });
    if let Err(failure) = runner.run(&strategy, |value| case(value, &server.create_database())) {
        panic!("{failure}");
    }
}
