//! Appending to the shared log: the idempotent producer with `acks=all`.

use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, Instant};

use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::Producer as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_core::log::{Appended, LogError, LogHeld, PartitionLog};
use tally_core::record::encode_list;

use crate::{KafkaError, client, dead_letter_topic};

/// Bytes of records in one message at most: under the broker's default `message.max.bytes`
/// (1 MiB), so a stock broker takes every message. An append of more is split.
pub const MESSAGE_BYTES_MAX: usize = 900 << 10;

/// How long the broker has to acknowledge a message before the append's outcome is
/// unknown (`message.timeout.ms`).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// One idempotent producer, shared by every partition's writer and the dead-letter queue.
/// After a fatal error (librdkafka's idempotent producer gives up for good, e.g. when the
/// broker fences its producer id), it is replaced by a new one; the appends it held are
/// answered "outcome unknown", and their retries are deduplicated by the owners.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<RwLock<FutureProducer>>,
    brokers: Arc<str>,
    topic: Arc<str>,
}

fn idempotent_producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
    crate::client_config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Writers gather requests into one message each; this adds little.
        .set("linger.ms", "1")
        .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string())
        .set("message.max.bytes", (MESSAGE_BYTES_MAX + (64 << 10)).to_string())
        .create()
        .map_err(client("producer"))
}

impl Producer {
    pub fn new(brokers: &str, topic: &str) -> Result<Producer, KafkaError> {
        let inner = Arc::new(RwLock::new(idempotent_producer(brokers)?));
        Ok(Producer { inner, brokers: brokers.into(), topic: topic.into() })
    }

    /// Replaces the producer after a fatal error (once, however many writers saw it).
    /// Fatal is what librdkafka says is, or a fenced producer id (which it retries for
    /// ever without a new one: seen with a producer resumed after a long pause).
    fn renew_if_fatal(&self, used: &FutureProducer, failed: Option<&rdkafka::error::KafkaError>) {
        let fenced = failed.and_then(|e| e.rdkafka_error_code()) == Some(RDKafkaErrorCode::ProducerFenced);
        let Some((code, reason)) = used.client().fatal_error().or_else(|| {
            fenced.then(|| (RDKafkaErrorCode::ProducerFenced, "the broker fenced this producer id".to_string()))
        }) else {
            return;
        };
        let mut inner = self.inner.write();
        if !std::ptr::eq(inner.client().native_ptr(), used.client().native_ptr()) {
            return;
        }
        tracing::warn!(?code, %reason, "the Kafka producer failed for good; starting a new one");
        metrics::counter!("tally_producer_renewals_total").increment(1);
        match idempotent_producer(&self.brokers) {
            Ok(fresh) => *inner = fresh,
            Err(error) => tracing::error!(%error, "starting a new Kafka producer failed; retrying at the next append"),
        }
    }

    /// One log per partition, for the engine's writers.
    pub fn partition_logs(&self, partitions: u32) -> Vec<Box<dyn PartitionLog>> {
        (0..partitions)
            .map(|partition| {
                Box::new(KafkaPartitionLog { producer: self.clone(), partition: partition as i32 })
                    as Box<dyn PartitionLog>
            })
            .collect()
    }

    /// Produces a message and waits for the broker's acknowledgement: the offset it got
    /// (never negative).
    fn send(&self, topic: &str, partition: Option<i32>, record: FutureRecord<'_, str, [u8]>) -> Result<i64, LogError> {
        let record = match partition {
            Some(partition) => record.partition(partition),
            None => record,
        };
        let producer = self.inner.read().clone();
        let delivery = match producer.send_result(record) {
            Ok(delivery) => delivery,
            // Not queued: nothing was written.
            Err((error, _)) => {
                self.renew_if_fatal(&producer, Some(&error));
                return Err(LogError::Unwritten { detail: format!("producing to {topic}: {error}") });
            }
        };
        let delivered = match futures_executor::block_on(delivery) {
            // The broker already had it (a retry of librdkafka's own, after a broker
            // restart, answered "duplicate sequence number"): in the log, but where is not
            // said, so no position can be given.
            Ok(Ok(delivery)) if delivery.offset < 0 => {
                format!("producing to {topic}: the broker had the message already and did not say at which offset")
            }
            Ok(Ok(delivery)) => return Ok(delivery.offset),
            Ok(Err((error, _))) => {
                self.renew_if_fatal(&producer, Some(&error));
                return Err(LogError::Uncertain { detail: format!("producing to {topic}: {error}") });
            }
            Err(_) => format!("producing to {topic}: the producer went away"),
        };
        self.renew_if_fatal(&producer, None);
        Err(LogError::Uncertain { detail: delivered })
    }

    /// Sends a message that could not be applied to `<topic>-dlq`, with why and where it
    /// came from (headers `reason`, `source_topic`, `source_partition`, `source_offset`;
    /// key `partition:offset`).
    pub fn dead_letter(&self, partition: u32, offset: u64, payload: &[u8], reason: &str) -> Result<(), LogError> {
        self.dead_letter_from(&self.topic.clone(), partition, offset, payload, reason)
    }

    /// `dead_letter` for a message of another topic (`tally bridge`'s source).
    pub fn dead_letter_from(
        &self,
        source_topic: &str,
        partition: u32,
        offset: u64,
        payload: &[u8],
        reason: &str,
    ) -> Result<(), LogError> {
        let topic = dead_letter_topic(&self.topic);
        let (partition_text, offset_text) = (partition.to_string(), offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "reason", value: Some(reason) })
            .insert(Header { key: "source_topic", value: Some(source_topic) })
            .insert(Header { key: "source_partition", value: Some(&partition_text) })
            .insert(Header { key: "source_offset", value: Some(&offset_text) });
        let key = format!("{partition}:{offset}");
        let record = FutureRecord::to(&topic).key(key.as_str()).payload(payload).headers(headers);
        self.send(&topic, None, record).map(|_| ())
    }
}

struct KafkaPartitionLog {
    producer: Producer,
    partition: i32,
}

impl PartitionLog for KafkaPartitionLog {
    /// Each message holds as many records as fit in `MESSAGE_BYTES_MAX` (one at least).
    /// Messages are produced one after the other, each acknowledged before the next, so a
    /// failure leaves the earlier ones in the log and the outcome unknown.
    fn append(&mut self, records: &[&[u8]]) -> Result<Appended, LogError> {
        let started = Instant::now();
        let mut end_offset = 0;
        let mut rest = records;
        let mut sent = 0;
        while !rest.is_empty() {
            let mut take = 1;
            let mut bytes = rest[0].len() + 4;
            while take < rest.len() && bytes + rest[take].len() + 4 <= MESSAGE_BYTES_MAX {
                bytes += rest[take].len() + 4;
                take += 1;
            }
            let mut payload = Vec::with_capacity(bytes);
            encode_list(&rest[..take], &mut payload);
            let topic = &*self.producer.topic;
            let record = FutureRecord::<str, [u8]>::to(topic).payload(&payload);
            match self.producer.send(topic, Some(self.partition), record) {
                Ok(offset) => end_offset = offset as u64 + 1,
                Err(LogError::Unwritten { detail }) if sent > 0 => return Err(LogError::Uncertain { detail }),
                Err(error) => return Err(error),
            }
            sent += 1;
            rest = &rest[take..];
        }
        Ok(Appended { end_offset, sync: started.elapsed() })
    }

    /// The broker's retention decides what the topic keeps; it must outlast the longest
    /// store outage (see the README).
    fn forget_before(&mut self, _offset: u64) -> Result<(), LogError> {
        Ok(())
    }

    fn held(&self) -> LogHeld {
        LogHeld::default()
    }

    /// A record is never split across messages (a keyed request's part must be applied
    /// whole), so one message holds it with its length.
    fn record_bytes_max(&self) -> usize {
        MESSAGE_BYTES_MAX - 4
    }
}
