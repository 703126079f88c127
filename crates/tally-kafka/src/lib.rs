//! The shared log of cluster mode: tally partition `p` is partition `p` of a Kafka topic
//! (any Kafka-protocol broker, through librdkafka).
//!
//! - `init` creates the topic (one Kafka partition per tally partition) and its
//!   dead-letter topic `<topic>-dlq`.
//! - `Producer::partition_logs` are the engine's `PartitionLog`s: each append is one
//!   message (or several, each under `MESSAGE_BYTES_MAX`) holding a record list, produced
//!   with the idempotent producer and `acks=all`; it returns once the broker acknowledged
//!   it, with the offset past it.
//! - `Feed` is a consumer-group member: as partitions are assigned it claims them
//!   through the engine's `Owner` and starts reading each at the offset the claim answers
//!   (the store's checkpoint, never Kafka's committed offset); it hands every message to
//!   `Owner::apply` and dead-letters those that do not decode. It commits the store's
//!   checkpoints to Kafka afterwards, for lag monitoring only.
//! - `Reader` reads a partition's messages from one offset to another, outside the
//!   group: a partition owner's raw-event archive reads what the store has checkpointed.
//! - `Source` reads a user's topic for `tally bridge`, committing its offsets only once
//!   what it read is in tally's topic.

mod feed;
mod produce;
mod read;
mod source;

pub use feed::{Feed, FeedSettings};
pub use produce::{MESSAGE_BYTES_MAX, Producer};
pub use read::Reader;
pub use source::{Source, SourceMessage};

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

/// How long an admin call or metadata request may take before it is abandoned.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait between two attempts to reach a broker that went away (librdkafka's
/// default grows to 10 s, longer than the producer's delivery timeout allows for a broker
/// that restarts in seconds).
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The settings every client of tally's starts from: where the brokers are, and how soon
/// it reconnects. `TALLY_KAFKA_DEBUG` turns on librdkafka's own debug contexts (e.g.
/// `cgrp,fetch,msg`), for diagnosing the brokers and the group.
fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX.as_millis().to_string());
    if let Ok(contexts) = std::env::var("TALLY_KAFKA_DEBUG") {
        config.set("debug", contexts);
    }
    config
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka {context}: {source}")]
    Client { context: &'static str, source: rdkafka::error::KafkaError },
    #[error("topic {topic} has {found} partitions; this cluster uses {expected}")]
    PartitionCount { topic: String, found: usize, expected: u32 },
    #[error("kafka: {detail}")]
    Other { detail: String },
}

fn client(context: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
    move |source| KafkaError::Client { context, source }
}

/// The dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}-dlq")
}

/// What `init` found or made, per topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInit {
    pub topic: String,
    pub partitions: usize,
    pub created: bool,
}

/// Creates `topic` with `partitions` partitions and its dead-letter topic, unless they
/// exist; an existing topic with another partition count is an error.
pub fn init(brokers: &str, topic: &str, partitions: u32, replication: i32) -> Result<Vec<TopicInit>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers).create().map_err(client("admin client"))?;
    let dlq = dead_letter_topic(topic);
    let wanted = [(topic, partitions as i32), (dlq.as_str(), 1)];
    let new: Vec<NewTopic<'_>> =
        wanted.iter().map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(replication))).collect();
    let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT)).operation_timeout(Some(ADMIN_TIMEOUT));
    let results = futures_executor::block_on(admin.create_topics(&new, &options)).map_err(client("create topics"))?;
    let mut report = Vec::new();
    for (result, (name, _)) in results.into_iter().zip(wanted) {
        let created = match result {
            Ok(_) => true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => false,
            Err((_, code)) => return Err(KafkaError::Other { detail: format!("creating topic {name}: {code}") }),
        };
        let found = partition_count(&admin, name)?;
        if name == topic && found != partitions as usize {
            return Err(KafkaError::PartitionCount { topic: name.into(), found, expected: partitions });
        }
        report.push(TopicInit { topic: name.into(), partitions: found, created });
    }
    Ok(report)
}

/// Partitions of `topic` (0 if it does not exist).
pub fn topic_partitions(brokers: &str, topic: &str) -> Result<usize, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers).create().map_err(client("admin client"))?;
    let metadata = admin.inner().fetch_metadata(Some(topic), ADMIN_TIMEOUT).map_err(client("read metadata"))?;
    Ok(partitions_in(&metadata, topic))
}

/// Partitions of `topic` in the broker's metadata (0 if it is not there).
pub(crate) fn partitions_in(metadata: &rdkafka::metadata::Metadata, topic: &str) -> usize {
    metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len())
}

/// Partitions of `topic`, from the broker's metadata (it may take a moment to show a new
/// topic: asked again until it does, within `ADMIN_TIMEOUT`).
fn partition_count(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Result<usize, KafkaError> {
    let deadline = std::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        let metadata = admin.inner().fetch_metadata(Some(topic), ADMIN_TIMEOUT).map_err(client("read metadata"))?;
        let found = partitions_in(&metadata, topic);
        if found > 0 || std::time::Instant::now() >= deadline {
            return Ok(found);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
