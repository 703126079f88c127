//! tally's client library: what a service embeds to send events to a tally server.
//!
//! - [`Client`]: `send` an [`Event`] and go on; the client buffers (bounded memory, with
//!   back-pressure or dropping when full, the caller's choice), batches by size and linger
//!   time, and posts batches in the background.
//! - [`Api`]: requests with a timeout, retried on 429/503/timeouts/connection errors with
//!   exponential backoff and full jitter, never before the server's `Retry-After`, behind a
//!   circuit breaker (closed → open → half-open); writes keep their Idempotency-Key across
//!   retries, so the server counts each batch once. Queries (`get_json`, `post_json`) too.
//!
//! Both speak http and https (rustls, the system's roots plus an optional private CA) and
//! send an API key. Counters (`stats()`, and `tally_client_*` through the `metrics` facade)
//! show events accepted, duplicate, failed and dropped, requests, retries and the breaker.
//!
//! ```no_run
//! use tally_client::{Client, ClientConfig, Event, WhenFull};
//!
//! # async fn example() -> Result<(), tally_client::Error> {
//! let mut config = ClientConfig::new("https://tally.example.com");
//! config.api.key = std::env::var("TALLY_KEY").ok();
//! config.when_full = WhenFull::Drop; // never block the caller; count what is dropped
//! let client = Client::new(config)?;
//! client.send(&Event::view("video-42").by("viewer-7")).await?;
//! client.send(&Event::view("video-42").of_type("like").with_id("like-123")).await?;
//! let stats = client.close().await?; // sends what is buffered
//! assert_eq!(stats.events_failed, 0);
//! # Ok(())
//! # }
//! ```
//!
//! Exactly-once: an event the client reports as accepted or duplicate is counted once.
//! An event given up on (`events_failed`) may or may not have been counted; give events an
//! `event_id` to make resending them safe (the server counts an id once within its dedup
//! window).

mod api;
mod breaker;
mod client;
mod metrics;
mod transport;

use std::time::Duration;

pub use api::{Ack, Api, ApiConfig, RetryPolicy};
pub use breaker::{BreakerConfig, BreakerState};
pub use client::{Client, ClientConfig, Event, WhenFull};
pub use metrics::Snapshot;
pub use transport::Answer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("no connection to the server: {0}")]
    Connection(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server's final answer was not a success (after any retries).
    #[error("the server refused: {}", .0.error_text())]
    Refused(Box<Answer>),
    #[error("{0}")]
    Protocol(String),
    /// Retrying stopped: `RetryPolicy::give_up_after` ran out.
    #[error("gave up: {0}")]
    GaveUp(String),
    /// The buffer is full and the client drops rather than waits.
    #[error("the client's buffer is full; the event was dropped")]
    Full,
    #[error("the client is closed")]
    Closed,
}
