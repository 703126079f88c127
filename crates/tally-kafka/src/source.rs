//! A user's own topic, read by `tally bridge`: every partition assigned to this one
//! reader (no group membership, so no rebalances to wait for after a crash), from the
//! offsets committed for its group, which it commits only after what it read is in
//! tally's topic. One bridge per source topic: a second would read everything again
//! (harmless, since every event carries an id, but wasted).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::{ADMIN_TIMEOUT, KafkaError, client};

/// One message of the source topic.
#[derive(Debug, Clone)]
pub struct SourceMessage {
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

pub struct Source {
    consumer: BaseConsumer,
    topic: String,
}

impl Source {
    /// Reads every partition of `topic` from the offsets committed for `group` (the
    /// earliest, the first time).
    pub fn new(brokers: &str, topic: &str, group: &str) -> Result<Source, KafkaError> {
        let consumer: BaseConsumer = crate::client_config(brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(client("source consumer"))?;
        let metadata =
            consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT).map_err(client("read the source topic's metadata"))?;
        let partitions = crate::partitions_in(&metadata, topic);
        if partitions == 0 {
            return Err(KafkaError::Other { detail: format!("source topic {topic} does not exist") });
        }
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            list.add_partition(topic, partition);
        }
        let mut start =
            consumer.committed_offsets(list, ADMIN_TIMEOUT).map_err(client("read the committed offsets"))?;
        for partition in 0..partitions as i32 {
            if !matches!(start.find_partition(topic, partition).map(|e| e.offset()), Some(Offset::Offset(_))) {
                tracing::info!(partition, "no committed offset: reading from the beginning");
                start.set_partition_offset(topic, partition, Offset::Beginning).map_err(client("start offsets"))?;
            }
        }
        consumer.assign(&start).map_err(client("assign the source partitions"))?;
        Ok(Source { consumer, topic: topic.into() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next message, if one comes within `wait`.
    pub fn poll(&self, wait: Duration) -> Option<Result<SourceMessage, KafkaError>> {
        let message = self.consumer.poll(wait)?;
        Some(message.map_err(client("read the source topic")).map(|message| SourceMessage {
            partition: message.partition(),
            offset: message.offset(),
            payload: message.payload().unwrap_or_default().to_vec(),
        }))
    }

    /// Commits, per partition, the offset to read next; returns once the broker has it.
    pub fn commit(&self, next: &[(i32, i64)]) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        for &(partition, offset) in next {
            list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(client("commit the source offsets"))?;
        }
        self.consumer.commit(&list, CommitMode::Sync).map_err(client("commit the source offsets"))
    }
}
