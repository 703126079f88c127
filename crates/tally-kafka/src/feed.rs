//! The partition owners' side: a consumer-group member that claims what the group assigns
//! and applies it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tally_core::log::Owner;

use crate::{KafkaError, Producer, client};

/// How long after a failed claim (the database unreachable) it is tried again.
const CLAIM_RETRY: Duration = Duration::from_secs(1);
/// How long a seek may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the store's checkpoints are committed to Kafka as the group's offsets.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// How long one poll waits for a message (the owners' feed and the archive's reader).
pub(crate) const POLL_WAIT: Duration = Duration::from_millis(100);
/// How often a partition is read again from the offset its owner (or the archive's reader)
/// expects when the log delivers a later one, before the hole is taken as real.
pub(crate) const HOLE_REFETCHES: u32 = 5;

/// How a node joins the owners' group.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    pub brokers: String,
    pub topic: String,
    /// The consumer group: one per cluster (every node of it uses the same).
    pub group: String,
    /// How long the group waits for a silent member before it gives its partitions to
    /// others (`session.timeout.ms`): the takeover time after a crash.
    pub session_timeout: Duration,
    /// How long the broker may hold a fetch that finds nothing new (`fetch.wait.max.ms`).
    pub fetch_wait: Duration,
    /// How this member is named to the group (`client.id`; the group tools show it).
    pub client_id: Option<String>,
}

/// The running member; dropping it leaves the group (its partitions are released).
pub struct Feed {
    owner: Arc<dyn Owner>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Feed {
    pub fn start(settings: FeedSettings, owner: Arc<dyn Owner>, producer: Producer) -> Result<Feed, KafkaError> {
        let heartbeat = (settings.session_timeout / 3).max(Duration::from_millis(100));
        let context = OwnerContext {
            owner: Arc::clone(&owner),
            topic: settings.topic.clone(),
            pending: Mutex::new(Vec::new()),
            last_rebalance: Mutex::new(Instant::now()),
        };
        let mut config = crate::client_config(&settings.brokers);
        if let Some(id) = &settings.client_id {
            config.set("client.id", id);
        }
        let consumer: BaseConsumer<OwnerContext> = config
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", settings.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", heartbeat.as_millis().to_string())
            .set("statistics.interval.ms", "5000")
            .set("fetch.wait.max.ms", settings.fetch_wait.as_millis().to_string())
            .create_with_context(context)
            .map_err(client("consumer"))?;
        consumer.subscribe(&[&settings.topic]).map_err(client("subscribe"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_owner) = (Arc::clone(&stop), Arc::clone(&owner));
        let thread = std::thread::Builder::new()
            .name("tally-owner".into())
            .spawn(move || run(&consumer, &settings, &*thread_owner, &producer, &thread_stop))
            .expect("spawn owner thread");
        Ok(Feed { owner, stop, thread: Some(thread) })
    }

    /// Leaves the group: the partitions owned here are flushed and released.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Release);
        // An apply waiting for the database to make room would hold the thread.
        self.owner.interrupt();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Mends a group that left partitions without an owner (seen with brokers whose group
/// coordinator loses a dead leader's partitions in a rebalance): once this member's last
/// rebalance is half a session timeout old and some partition's owner has been silent for
/// a session timeout (owners write their liveness at every flush), this member leaves and
/// joins again, which makes the group assign anew. A group with no owner missing costs one
/// small query per second.
struct Mend {
    session_timeout: Duration,
    last_check: Instant,
    last_rejoin: Option<Instant>,
}

impl Mend {
    /// Whether to leave and join again now.
    fn due(&mut self, owner: &dyn Owner, last_rebalance: Instant) -> bool {
        let silent = self.session_timeout;
        if self.last_check.elapsed() < Duration::from_secs(1)
            || last_rebalance.elapsed() < silent / 2
            || self.last_rejoin.is_some_and(|at| at.elapsed() < silent * 2)
        {
            return false;
        }
        self.last_check = Instant::now();
        match owner.unowned(silent) {
            Ok(unowned) if !unowned.is_empty() => {
                tracing::warn!(?unowned, "partitions have had no owner for a session timeout; joining the group again");
                metrics::counter!("tally_group_rejoins_total").increment(1);
                self.last_rejoin = Some(Instant::now());
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::debug!(%error, "reading the partitions' owners failed");
                false
            }
        }
    }
}

fn run(
    consumer: &BaseConsumer<OwnerContext>,
    settings: &FeedSettings,
    owner: &dyn Owner,
    producer: &Producer,
    stop: &AtomicBool,
) {
    let topic = settings.topic.as_str();
    let mut committed = Vec::new();
    let mut last_commit = Instant::now();
    let mut mend = Mend { session_timeout: settings.session_timeout, last_check: Instant::now(), last_rejoin: None };
    // When a claim last failed.
    let mut last_claim: Option<Instant> = None;
    let mut last_reclaim = Instant::now();
    let mut holes = Holes::default();
    while !stop.load(Ordering::Acquire) {
        if owner.failed() {
            tracing::error!("the engine failed; leaving the owners' group so that other nodes take its partitions");
            break;
        }
        match consumer.poll(POLL_WAIT) {
            Some(Ok(message)) => {
                let (partition, offset) = (message.partition() as u32, message.offset() as u64);
                if !holes.refetch(consumer, topic, owner, partition, offset) {
                    apply(owner, producer, partition, offset, message.payload().unwrap_or_default());
                }
            }
            Some(Err(error)) => tracing::debug!(%error, "consumer"),
            None => {}
        }
        if !consumer.context().pending.lock().is_empty()
            && last_claim.is_none_or(|at| at.elapsed() >= CLAIM_RETRY)
            && !claim_pending(consumer, topic, owner)
        {
            last_claim = Some(Instant::now());
        }
        if last_reclaim.elapsed() >= CLAIM_RETRY {
            last_reclaim = Instant::now();
            reclaim_dropped(consumer, owner);
        }
        let last_rebalance = *consumer.context().last_rebalance.lock();
        if mend.due(owner, last_rebalance) {
            consumer.unsubscribe();
            if let Err(error) = consumer.subscribe(&[topic]) {
                tracing::error!(%error, "subscribing again failed");
            }
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            last_commit = Instant::now();
            commit_checkpoints(consumer, topic, owner, &mut committed);
        }
    }
    // Dropping the consumer leaves the group; its revocation releases every partition.
    // A failed engine leaves now, not when the node stops.
    if owner.failed() {
        consumer.unsubscribe();
        while !stop.load(Ordering::Acquire) {
            let _ = consumer.poll(POLL_WAIT);
        }
    }
}

/// Applies one message of an owned partition; one that does not decode goes to the
/// dead-letter topic.
fn apply(owner: &dyn Owner, producer: &Producer, partition: u32, offset: u64, payload: &[u8]) {
    let Err(reason) = owner.apply(partition, offset, payload) else { return };
    tracing::warn!(partition, offset, %reason, "message does not decode; dead-lettered");
    metrics::counter!("tally_dead_letters_total").increment(1);
    if let Err(error) = producer.dead_letter(partition, offset, payload, &reason) {
        tracing::error!(partition, offset, %error, "dead-lettering failed; the message is skipped");
        metrics::counter!("tally_dead_letter_failures_total").increment(1);
    }
}

/// Reads a partition again when the log skips offsets its owner has not applied: a Kafka
/// partition has no holes while its records are retained (the idempotent producer writes
/// no control records), so a skip is the broker's fault. tansu 0.6's memory storage, under
/// produce from several nodes, now and then delivers offsets 505, 507, 507, with 506
/// acknowledged to a writer; reading again from 506 gets it. A hole still there after
/// `HOLE_REFETCHES` reads is real (retention deleted the records): the owner applies past
/// it and reports it (`tally_log_anomalies_total{kind="gap"}`).
#[derive(Default)]
struct Holes {
    /// Per partition: the offset its owner expects, and how often it was read again.
    tries: HashMap<u32, (u64, u32)>,
}

impl Holes {
    /// Whether the message at `offset` is dropped because its partition is read again
    /// from the offset the owner expects.
    fn refetch(
        &mut self,
        consumer: &BaseConsumer<OwnerContext>,
        topic: &str,
        owner: &dyn Owner,
        partition: u32,
        offset: u64,
    ) -> bool {
        let Some(expected) = self.seek_to(owner.next_offset(partition), partition, offset) else { return false };
        tracing::warn!(partition, expected, offset, "the log skipped offsets; reading the partition again");
        metrics::counter!("tally_log_refetches_total").increment(1);
        if let Err(error) = consumer.seek(topic, partition as i32, Offset::Offset(expected as i64), SEEK_TIMEOUT) {
            tracing::error!(partition, %error, "seeking back to the skipped offset failed");
        }
        true
    }

    /// Where to read `partition` again from, given the offset its owner expects and the
    /// one the log delivered; none to apply what was delivered.
    fn seek_to(&mut self, expected: Option<u64>, partition: u32, offset: u64) -> Option<u64> {
        let expected = match expected {
            Some(expected) if offset > expected => expected,
            _ => {
                self.tries.remove(&partition);
                return None;
            }
        };
        let tries = self.tries.entry(partition).or_insert((expected, 0));
        if tries.0 != expected {
            *tries = (expected, 0);
        }
        if tries.1 >= HOLE_REFETCHES {
            return None;
        }
        tries.1 += 1;
        Some(expected)
    }
}

/// Commits the store's checkpoints as the group's offsets (monitoring only: recovery
/// reads the store's).
fn commit_checkpoints(
    consumer: &BaseConsumer<OwnerContext>,
    topic: &str,
    owner: &dyn Owner,
    last: &mut Vec<(u32, u64)>,
) {
    let checkpoints = owner.checkpoints();
    if checkpoints.is_empty() || checkpoints == *last {
        return;
    }
    let mut list = TopicPartitionList::new();
    for &(partition, offset) in &checkpoints {
        if list.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64)).is_err() {
            return;
        }
    }
    if let Err(error) = consumer.commit(&list, CommitMode::Async) {
        tracing::debug!(%error, "committing offsets for monitoring failed");
    }
    *last = checkpoints;
}

struct OwnerContext {
    owner: Arc<dyn Owner>,
    topic: String,
    /// Assigned by the group, not claimed yet: paused until claimed (`claim_pending`).
    pending: Mutex<Vec<u32>>,
    /// When the group last assigned or revoked partitions here.
    last_rebalance: Mutex<Instant>,
}

impl ClientContext for OwnerContext {
    /// Lag per owned partition: the broker's high watermark past the stored checkpoint.
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        for (partition, checkpoint) in self.owner.checkpoints() {
            if let Some(stats) = topic.partitions.get(&(partition as i32))
                && stats.hi_offset >= 0
            {
                let lag = (stats.hi_offset as u64).saturating_sub(checkpoint);
                metrics::gauge!("tally_partition_lag_records", "partition" => partition.to_string()).set(lag as f64);
            }
        }
    }
}

impl ConsumerContext for OwnerContext {
    /// Takes what is assigned, paused: claiming (a database transaction and the dedup
    /// memory's restore) happens outside the callback, so that it cannot hold up the
    /// group's rebalance (`claim_pending`). Releases what is revoked. Runs inside `poll`,
    /// on the owner thread, so no message of a partition is applied after its release.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, list: &mut TopicPartitionList) {
        *self.last_rebalance.lock() = Instant::now();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                log_assignment(consumer.assign(list), "assign");
                log_assignment(consumer.pause(list), "pause");
                self.pending.lock().extend(list.elements().iter().map(|e| e.partition() as u32));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, list),
            error => {
                tracing::error!(?error, "rebalance failed; giving every partition up");
                self.revoke(consumer, list);
            }
        }
    }
}

impl OwnerContext {
    fn revoke(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        self.pending.lock().clear();
        for element in list.elements() {
            self.owner.release(element.partition() as u32);
        }
        log_assignment(consumer.unassign(), "unassign");
    }
}

/// Claims the partitions assigned and not claimed yet; each starts at its stored
/// checkpoint (messages read before the claim are skipped by `apply`, which applies
/// nothing of a partition it does not own, nor below its applied offset) and resumes.
/// A partition whose claim fails stays paused and pending, and is tried again later.
fn claim_pending(consumer: &BaseConsumer<OwnerContext>, topic: &str, owner: &dyn Owner) -> bool {
    let pending = std::mem::take(&mut *consumer.context().pending.lock());
    let mut failed = Vec::new();
    for partition in pending {
        let claimed = owner.claim(partition).and_then(|offset| {
            consumer
                .seek(topic, partition as i32, Offset::Offset(offset as i64), SEEK_TIMEOUT)
                .map_err(|e| format!("seeking to the checkpoint: {e}"))
        });
        match claimed {
            Ok(()) => {
                let mut list = TopicPartitionList::new();
                list.add_partition(topic, partition as i32);
                log_assignment(consumer.resume(&list), "resume");
            }
            Err(error) => {
                tracing::warn!(partition, %error, "claiming a partition failed; retrying");
                owner.release(partition);
                failed.push(partition);
            }
        }
    }
    let all_claimed = failed.is_empty();
    consumer.context().pending.lock().extend(failed);
    all_claimed
}

/// Claims again the partitions the group assigns here that the engine dropped because a
/// flush was refused (a node paused past its session claimed them meanwhile, and then
/// this one's flush was fenced). The group's assignment decides who owns a partition;
/// the claim fences the other node, which gives the partition up when the group tells it.
fn reclaim_dropped(consumer: &BaseConsumer<OwnerContext>, owner: &dyn Owner) {
    let Ok(assignment) = consumer.assignment() else { return };
    let owned: Vec<u32> = owner.checkpoints().into_iter().map(|(partition, _)| partition).collect();
    let mut pending = consumer.context().pending.lock();
    for element in assignment.elements() {
        let partition = element.partition() as u32;
        if !owned.contains(&partition) && !pending.contains(&partition) {
            tracing::warn!(partition, "assigned here but dropped after a refused flush; claiming it again");
            pending.push(partition);
        }
    }
}

fn log_assignment(result: KafkaResult<()>, what: &'static str) {
    if let Err(error) = result {
        tracing::error!(%error, what, "changing the consumer's assignment failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hole_is_read_again_a_few_times_then_taken_as_real() {
        let mut holes = Holes::default();
        for _ in 0..HOLE_REFETCHES {
            assert_eq!(holes.seek_to(Some(506), 5, 507), Some(506));
        }
        assert_eq!(holes.seek_to(Some(506), 5, 507), None, "applied past the hole");
        // The next hole of the partition gets its own tries.
        assert_eq!(holes.seek_to(Some(600), 5, 602), Some(600));
    }

    #[test]
    fn in_order_repeated_and_unowned_offsets_are_applied_and_reset_the_tries() {
        let mut holes = Holes::default();
        assert_eq!(holes.seek_to(Some(506), 5, 510), Some(506));
        assert_eq!(holes.seek_to(Some(506), 5, 506), None, "the skipped offset arrived");
        assert!(holes.tries.is_empty());
        assert_eq!(holes.seek_to(Some(508), 5, 507), None, "a repeated offset is the owner's to skip");
        assert_eq!(holes.seek_to(None, 5, 900), None, "not owned here");
        assert_eq!(holes.seek_to(Some(10), 6, 11), Some(10), "partitions are tracked apart");
        assert_eq!(holes.seek_to(Some(506), 5, 507), Some(506));
        assert_eq!(holes.tries.len(), 2);
    }
}
