//! Cluster mode's archive, with a shared log in memory standing in for Kafka (the test
//! drives the owners as the consumer group would): the notes travel with the flushes into
//! PostgreSQL, and the archive's progress sits beside the checkpoint. An owner that wrote
//! a file and died before recording it leaves that range pending; the next owner writes
//! exactly that range again, under the same name, and goes on after it: each counted
//! event is archived once, duplicates left out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_archive::{Archive, aggregate};
use tally_core::log::{Appended, FrameRecords, LogError, LogHeld, LogReader, Owner, PartitionLog, Visit};
use tally_core::record::{ListRecords, encode_list};
use tally_core::{EventRef, partition_of};
use tally_engine::{Engine, EngineConfig};
use tally_pgtest::Postgres;
use tally_store::{PoolOptions, PostgresStore};

const PARTITIONS: u32 = 2;

/// Each partition's record lists, a list's offset its index.
type Lists = Arc<Mutex<Vec<Vec<Vec<u8>>>>>;

struct MemoryLog {
    lists: Lists,
    partition: usize,
}

impl PartitionLog for MemoryLog {
    fn append(&mut self, records: &[&[u8]]) -> Result<Appended, LogError> {
        let mut list = Vec::new();
        encode_list(records, &mut list);
        let mut lists = self.lists.lock().unwrap();
        lists[self.partition].push(list);
        Ok(Appended { end_offset: lists[self.partition].len() as u64, sync: Duration::ZERO })
    }

    fn forget_before(&mut self, _offset: u64) -> Result<(), LogError> {
        Ok(())
    }

    fn held(&self) -> LogHeld {
        LogHeld::default()
    }
}

/// Reads the lists back as the Kafka reader does: each named by the offset past it.
struct MemoryReader {
    lists: Lists,
}

impl LogReader for MemoryReader {
    fn read(&self, partition: u32, from: u64, to: u64, visit: &mut Visit<'_>) -> Result<(), LogError> {
        let lists = self.lists.lock().unwrap()[partition as usize].clone();
        for offset in from..to.min(lists.len() as u64) {
            let records: &mut FrameRecords<'_> = &mut ListRecords::new(&lists[offset as usize]);
            if visit(offset + 1, records).is_err() {
                break;
            }
        }
        Ok(())
    }
}

struct Node {
    engine: Engine,
    owner: Arc<dyn Owner>,
    /// Per partition: the next offset to hand to the owner.
    next: Vec<u64>,
}

impl Node {
    /// A node on `database` that claims every partition.
    fn start(database: &str, lists: &Lists, archive: &str) -> Node {
        let store =
            PostgresStore::open(database, PoolOptions { connections_max: 4, ..PoolOptions::default() }).unwrap();
        store.prepare_partitions(PARTITIONS).unwrap();
        let config = EngineConfig {
            partitions: PARTITIONS,
            flush_interval_ms: 3_600_000,
            archive: Some(archive.into()),
            ..EngineConfig::default()
        };
        let logs: Vec<Box<dyn PartitionLog>> = (0..PARTITIONS as usize)
            .map(|partition| Box::new(MemoryLog { lists: Arc::clone(lists), partition }) as Box<dyn PartitionLog>)
            .collect();
        let reader = Box::new(MemoryReader { lists: Arc::clone(lists) });
        let engine = Engine::start_cluster(config, Arc::new(store), logs, Some(reader)).unwrap();
        let owner = engine.owner();
        let next = (0..PARTITIONS).map(|partition| owner.claim(partition).unwrap()).collect();
        Node { engine, owner, next }
    }

    /// Writes `video`'s events with `ids`, and applies everything the log holds, as the
    /// consumer group's feed would.
    fn write(&mut self, lists: &Lists, video_id: &str, ids: &[&str]) {
        let now = tally_engine::Clock::system().now_ms();
        let events: Vec<EventRef<'_>> = ids
            .iter()
            .map(|id| EventRef {
                video_id,
                event_type: "view",
                ts_ms: now,
                value: 1,
                event_id: Some(id),
                viewer_id: None,
            })
            .collect();
        self.engine.submit(&events, None, now).unwrap().outcome_blocking().unwrap();
        let lists = lists.lock().unwrap().clone();
        for (partition, lists) in lists.iter().enumerate() {
            for offset in self.next[partition]..lists.len() as u64 {
                self.owner.apply(partition as u32, offset, &lists[offset as usize]).unwrap();
            }
            self.next[partition] = lists.len() as u64;
        }
    }
}

/// A video of each partition.
fn videos() -> [String; PARTITIONS as usize] {
    let of =
        |partition| (0..).map(|i| format!("video-{i}")).find(|v| partition_of(v, PARTITIONS) == partition).unwrap();
    [of(0), of(1)]
}

/// The archive's files of `partition`, as offset ranges.
fn ranges(archive: &Archive, partition: u32) -> Vec<(u64, u64)> {
    let files = archive.files().unwrap();
    files.iter().filter(|f| f.partition == partition).map(|f| (f.first_offset, f.end_offset)).collect()
}

fn archived_count(archive: &Archive, video_id: &str) -> u64 {
    let totals = aggregate(archive, &archive.files().unwrap(), i64::MIN, i64::MAX).unwrap();
    totals.totals.get(&("view".to_string(), video_id.to_string())).map_or(0, |t| t.count)
}

fn column(server: &Postgres, sql: &str) -> u64 {
    server.sql("tally", sql).parse().unwrap()
}

/// A trigger refusing to record an archive write as finished.
const REFUSE_FINISHED_WRITES: &str = "CREATE FUNCTION refuse_finished_writes() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
    IF NEW.archive_pending IS NULL AND NEW.archived_offset > 0 THEN RAISE EXCEPTION 'refused by the test'; END IF; \
    RETURN NEW; END $$; \
    CREATE TRIGGER refuse_finished_writes BEFORE UPDATE ON tally_checkpoints \
    FOR EACH ROW EXECUTE FUNCTION refuse_finished_writes()";

#[test]
fn the_next_owner_writes_a_pending_range_again_and_each_counted_event_is_archived_once() {
    let server = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().join("archive").display().to_string();
    let lists: Lists = Arc::new(Mutex::new(vec![Vec::new(); PARTITIONS as usize]));
    let [zero, one] = videos();

    let mut first = Node::start(&server.url(), &lists, &location);
    // The database refuses to record a finished archive write: the first owner writes its
    // file, then fails to record it, as if it died between the two.
    server.sql("tally", REFUSE_FINISHED_WRITES);
    first.write(&lists, &zero, &["a", "b", "a"]);
    first.write(&lists, &one, &["c"]);
    first.write(&lists, &zero, &["b", "d"]);
    first.engine.flush().unwrap();
    let archive = Archive::open(&location).unwrap();
    let checkpoint = column(&server, "SELECT log_offset FROM tally_checkpoints WHERE partition = 0");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ranges(&archive, 0).is_empty() {
        assert!(Instant::now() < deadline, "the first owner never archived partition 0");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ranges(&archive, 0), [(0, checkpoint)]);
    assert_eq!(archived_count(&archive, &zero), 3, "a, b, d; the duplicates left out");
    let recorded =
        server.sql("tally", "SELECT archived_offset, archive_pending FROM tally_checkpoints WHERE partition = 0");
    assert_eq!(recorded, format!("0|{checkpoint}"), "the write is recorded as pending, not as done");
    // Applied after the flush, never checkpointed: the next owner replays it.
    first.write(&lists, &zero, &["d", "e"]);
    first.engine.halt();
    server.sql("tally", "DROP TRIGGER refuse_finished_writes ON tally_checkpoints");

    let mut second = Node::start(&server.url(), &lists, &location);
    second.write(&lists, &zero, &["e", "f"]);
    second.write(&lists, &one, &["c", "g"]);
    second.engine.shutdown().unwrap();

    assert_eq!(archived_count(&archive, &zero), 5, "a, b, d, e, f: once each");
    assert_eq!(archived_count(&archive, &one), 2, "c and g");
    let zero_ranges = ranges(&archive, 0);
    assert_eq!(zero_ranges[0], (0, checkpoint), "the pending range written again, not a longer one");
    for pair in zero_ranges.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "files {pair:?} must follow one another");
    }
    let end = lists.lock().unwrap()[0].len() as u64;
    assert_eq!(zero_ranges.last().unwrap().1, end, "a clean stop archives everything: {zero_ranges:?}");
    let recorded =
        server.sql("tally", "SELECT archived_offset, archive_pending FROM tally_checkpoints ORDER BY partition");
    assert_eq!(recorded, format!("{end}|\n{}|", lists.lock().unwrap()[1].len()));
    assert_eq!(column(&server, "SELECT count(*) FROM tally_archive_notes"), 0, "the notes the archive passed are gone");
}
