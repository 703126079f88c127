//! Reading a partition's messages back, outside the owners' group: the raw-event archive
//! of a partition owner reads what the store has checkpointed (`tally_core::log::LogReader`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_core::log::{LogError, LogReader, Visit, message_end};
use tally_core::record::ListRecords;

use crate::feed::{HOLE_REFETCHES, POLL_WAIT};
use crate::{KafkaError, client};

/// How long a read may go without a message before it fails (the broker unreachable).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a read waits before it reads a hole again (`feed::HOLE_REFETCHES` times).
const HOLE_PAUSE: Duration = Duration::from_millis(100);
/// How long a hole that the partition's low watermark does not explain (older offsets are
/// still held) is read again, pass after pass, before it is taken as lost: a broker that
/// briefly skips offsets delivers them on a later read; a real hole stays.
const HOLE_PATIENCE: Duration = Duration::from_secs(300);
/// How long asking the broker for a partition's watermarks may take.
const WATERMARK_WAIT: Duration = Duration::from_secs(10);
/// How long a read waits for a message before it asks whether the partition still holds
/// the offset due (retention may have deleted everything up to the end of the read).
const SILENCE_CHECK: Duration = Duration::from_secs(2);

/// Reads ranges of the topic's partitions; one read at a time.
pub struct Reader {
    consumer: Mutex<BaseConsumer>,
    topic: String,
    /// Holes met at the start of a read, by (partition, offset): when first met.
    holes: Mutex<HashMap<(u32, u64), Instant>>,
}

/// How one attempt at a read ended.
enum Attempt {
    Done,
    /// The log delivered `got` where `next` was due.
    Hole {
        next: u64,
        got: u64,
    },
}

impl Reader {
    pub fn new(brokers: &str, topic: &str) -> Result<Reader, KafkaError> {
        let consumer: BaseConsumer = crate::client_config(brokers)
            // Partitions are assigned by hand; the group id is never joined or committed.
            .set("group.id", format!("{topic}-archive-reader"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // An offset already deleted starts at the oldest one left: the hole shows.
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(client("archive reader"))?;
        Ok(Reader { consumer: Mutex::new(consumer), topic: topic.into(), holes: Mutex::new(HashMap::new()) })
    }

    /// One pass from `from`: each message's record list to `visit`, named by the offset
    /// past it, until `to`, the visitor stops, or a later offset than the one due.
    fn attempt(
        &self,
        consumer: &BaseConsumer,
        partition: u32,
        from: u64,
        to: u64,
        visit: &mut Visit<'_>,
    ) -> Result<Attempt, LogError> {
        let mut list = TopicPartitionList::new();
        let unread = |e: rdkafka::error::KafkaError| LogError::Unread {
            detail: format!("reading partition {partition} of {} from offset {from}: {e}", self.topic),
        };
        list.add_partition_offset(&self.topic, partition as i32, Offset::Offset(from as i64)).map_err(unread)?;
        consumer.assign(&list).map_err(unread)?;
        let (mut next, mut heard, mut checked) = (from, Instant::now(), false);
        while next < to {
            let message = match consumer.poll(POLL_WAIT) {
                None if !checked && heard.elapsed() >= SILENCE_CHECK => {
                    checked = true;
                    match self.low_watermark(consumer, partition) {
                        Some(low) if low > next => return Ok(Attempt::Hole { next, got: low }),
                        _ => continue,
                    }
                }
                None if heard.elapsed() >= STALL_TIMEOUT => {
                    let detail = format!(
                        "reading partition {partition} of {}: nothing at offset {next} within {} s",
                        self.topic,
                        STALL_TIMEOUT.as_secs()
                    );
                    return Err(LogError::Unread { detail });
                }
                None => continue,
                // librdkafka recovers from most on its own; a read that stays stuck ends at
                // the stall timeout.
                Some(Err(error)) => {
                    tracing::debug!(partition, %error, "archive reader: poll error");
                    continue;
                }
                Some(Ok(message)) => message,
            };
            heard = Instant::now();
            let offset = message.offset() as u64;
            if message.partition() != partition as i32 || offset < next {
                continue;
            }
            if offset > next {
                return Ok(Attempt::Hole { next, got: offset });
            }
            next = message_end(offset);
            let mut records = ListRecords::new(message.payload().unwrap_or_default());
            if visit(next, &mut records).is_err() {
                break;
            }
        }
        Ok(Attempt::Done)
    }

    /// A read that starts at a hole (`next` due, `got` delivered): gone if the partition no
    /// longer holds `next` (retention deleted it), or if it stayed a hole for
    /// `HOLE_PATIENCE`; otherwise read again later.
    fn hole(&self, consumer: &BaseConsumer, partition: u32, next: u64, got: u64) -> LogError {
        let topic = &self.topic;
        let low = self.low_watermark(consumer, partition);
        let mut holes = self.holes.lock();
        if let Some(low) = low
            && low > next
        {
            holes.remove(&(partition, next));
            let detail = format!(
                "partition {partition} of {topic} no longer holds offsets {next} to {low} (deleted by its retention)"
            );
            return LogError::Gone { detail, resumes: Some(low) };
        }
        let first = *holes.entry((partition, next)).or_insert_with(Instant::now);
        if first.elapsed() >= HOLE_PATIENCE {
            holes.remove(&(partition, next));
            let detail = format!(
                "partition {partition} of {topic} skipped offsets {next} to {got} for {} s though it holds older ones",
                HOLE_PATIENCE.as_secs()
            );
            return LogError::Gone { detail, resumes: Some(got) };
        }
        LogError::Unread {
            detail: format!("partition {partition} of {topic} delivered offset {got} where {next} was due; read again"),
        }
    }

    /// The oldest offset the partition holds, if the broker says.
    fn low_watermark(&self, consumer: &BaseConsumer, partition: u32) -> Option<u64> {
        let watermarks = consumer.fetch_watermarks(&self.topic, partition as i32, WATERMARK_WAIT);
        watermarks.ok().map(|(low, _)| low.max(0) as u64)
    }
}

impl LogReader for Reader {
    fn read(&self, partition: u32, from: u64, to: u64, visit: &mut Visit<'_>) -> Result<(), LogError> {
        if from >= to {
            return Ok(());
        }
        let consumer = self.consumer.lock();
        // Holes behind this read were read past: forgotten.
        self.holes.lock().retain(|&(p, offset), _| p != partition || offset >= from);
        let (mut at, mut rereads) = (from, 0);
        let result = loop {
            match self.attempt(&consumer, partition, at, to, visit) {
                Ok(Attempt::Hole { next, .. }) if rereads < HOLE_REFETCHES => {
                    // A new hole gets its own rereads.
                    rereads = if next == at { rereads + 1 } else { 1 };
                    at = next;
                    std::thread::sleep(HOLE_PAUSE);
                }
                // What came before the hole is read: the read ends there, and the next one
                // starts at the hole.
                Ok(Attempt::Hole { next, .. }) if next > from => break Ok(()),
                Ok(Attempt::Hole { next, got }) => break Err(self.hole(&consumer, partition, next, got)),
                other => break other.map(|_| ()),
            }
        };
        let _ = consumer.unassign();
        result
    }
}
