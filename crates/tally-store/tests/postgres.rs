//! What only the PostgreSQL store has: several engines on one database, a schema that
//! belongs to the database, space that comes back by dropping tables, and a server that
//! goes away and comes back.

use tally_aggregate::{Deltas, rollup};
use tally_core::bucket::DAY_MINUTES;
use tally_core::{Cutoffs, Granularity, Span};
use tally_pgtest::Postgres;
use tally_store::{ArchiveProgress, Checkpoint, CounterStore, PartitionFlush, PoolOptions, PostgresStore, StoreError};

fn open(server: &Postgres) -> PostgresStore {
    PostgresStore::open(&server.url(), PoolOptions::default()).unwrap()
}

fn views(minute: i64, videos: usize) -> Deltas {
    let mut deltas = Deltas::default();
    for video in 0..videos {
        deltas.add("view", &format!("video-{video}"), minute, 1, None);
    }
    deltas
}

/// Commits `deltas` to `partition` from `start` to `offset`.
fn commit(
    store: &dyn CounterStore,
    partition: u32,
    start: u64,
    offset: u64,
    deltas: &Deltas,
) -> Result<(), StoreError> {
    commit_noting(store, (partition, start, offset), deltas, &[])
}

/// `commit`, with the archive's `notes` of the flushed frames.
fn commit_noting(
    store: &dyn CounterStore,
    (partition, start, offset): (u32, u64, u64),
    deltas: &Deltas,
    notes: &[u8],
) -> Result<(), StoreError> {
    let checkpoint = Checkpoint { partition, offset, dedup_generation_starts: vec![1] };
    let journal = [(1, vec![7; 8])];
    let flushes = [PartitionFlush { start, checkpoint, journal: &journal, notes }];
    store.commit(&flushes, &mut |granularity| rollup(&[deltas], &Cutoffs::NONE, granularity))
}

/// The views of `video` on the first day, or the day starting at minute `day`.
fn day_count(store: &dyn CounterStore, video: &str) -> u64 {
    day_count_at(store, video, 0)
}

fn day_count_at(store: &dyn CounterStore, video: &str, day: i64) -> u64 {
    let span = Span { granularity: Granularity::Day, start: day, end: day + DAY_MINUTES };
    store.snapshot().unwrap().sum("view", video, span).unwrap().count
}

#[test]
fn a_second_engine_claiming_the_partitions_fences_the_first() {
    let server = Postgres::start();
    let first = open(&server);
    first.claim_partitions(2).unwrap();
    commit(&first, 0, 0, 10, &views(5, 3)).unwrap();

    let second = open(&server);
    second.claim_partitions(2).unwrap();
    // The first engine still believes it owns partition 0 and flushes on from where it was.
    let stale = commit(&first, 0, 10, 20, &views(6, 3));
    assert!(matches!(stale, Err(StoreError::Fenced { partition: 0, .. })), "{stale:?}");
    assert!(stale.unwrap_err().to_string().contains("partition 0"));
    assert_eq!(day_count(&second, "video-0"), 1, "nothing of the stale flush applied");
    assert_eq!(second.checkpoint(0).unwrap().unwrap().offset, 10);
    assert_eq!(second.dedup_blobs(0, 1).unwrap().len(), 1, "the stale flush's journal is not stored");

    // The new owner continues from the stored checkpoint; the old one stays fenced.
    commit(&second, 0, 10, 20, &views(6, 3)).unwrap();
    assert_eq!(day_count(&first, "video-0"), 2, "both read the same database");
    assert!(matches!(commit(&first, 1, 0, 5, &views(7, 1)), Err(StoreError::Fenced { partition: 1, .. })));
    assert_eq!(second.checkpoint(1).unwrap(), None);
}

#[test]
fn the_archive_progress_and_notes_sit_beside_the_checkpoint_fenced_by_the_owner() {
    let server = Postgres::start();
    let first = open(&server);
    first.claim_partitions(1).unwrap();
    first.check_archive(Some("file:///archive")).unwrap();
    first.check_archive(Some("file:///archive")).unwrap();
    let elsewhere = first.check_archive(Some("s3://other")).unwrap_err().to_string();
    assert!(elsewhere.contains("file:///archive") && elsewhere.contains("s3://other"), "{elsewhere}");
    let none = first.check_archive(None).unwrap_err().to_string();
    assert!(none.contains("--archive file:///archive"), "{none}");

    commit(&first, 0, 0, 10, &views(5, 1)).unwrap();
    let begun = first.begin_archive(0).unwrap();
    assert_eq!(begun, ArchiveProgress { archived: 10, pending: None }, "a first archive starts at the checkpoint");
    commit_noting(&first, (0, 10, 20), &views(6, 1), &[1; 16]).unwrap();
    commit_noting(&first, (0, 20, 30), &views(7, 1), &[2; 16]).unwrap();
    commit(&first, 0, 30, 40, &views(8, 1)).unwrap();
    assert_eq!(first.archive_notes(0, 10).unwrap(), [vec![1; 16], vec![2; 16]]);
    assert_eq!(first.archive_notes(0, 20).unwrap(), [vec![2; 16]], "only flushes whose checkpoint is past 20");
    let pending = ArchiveProgress { archived: 10, pending: Some(20) };
    let stale = first.set_archive_progress(0, ArchiveProgress { archived: 0, pending: None }, pending);
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "not what the store holds: {stale:?}");
    first.set_archive_progress(0, begun, pending).unwrap();
    let again = first.set_archive_progress(0, begun, pending);
    assert!(matches!(again, Err(StoreError::Fenced { .. })), "moved on from what was expected: {again:?}");

    // The next owner goes on where the first stood, pending write included; the first
    // is fenced.
    let second = open(&server);
    second.claim_partitions(1).unwrap();
    assert_eq!(second.begin_archive(0).unwrap(), pending);
    let done = ArchiveProgress { archived: 20, pending: None };
    let stale = first.set_archive_progress(0, pending, done);
    assert!(matches!(stale, Err(StoreError::Fenced { partition: 0, .. })), "{stale:?}");
    assert!(matches!(first.begin_archive(0), Err(StoreError::Fenced { .. })));
    assert_eq!(second.begin_archive(0).unwrap(), pending, "nothing of the fenced progress landed");
    second.set_archive_progress(0, pending, done).unwrap();
    assert_eq!(second.archive_notes(0, 0).unwrap(), [vec![2; 16]], "the notes the archive passed are dropped");

    // Archiving turned off (the location row cleared, every node stopped) and on again:
    // the progress and notes of the earlier archiving are dropped, and the archive starts
    // anew at the checkpoint.
    server.sql("tally", "DELETE FROM tally_meta WHERE key = 'archive'");
    second.check_archive(Some("file:///archive/")).unwrap();
    assert!(second.archive_notes(0, 0).unwrap().is_empty());
    assert_eq!(second.begin_archive(0).unwrap(), ArchiveProgress { archived: 40, pending: None });
    second.check_archive(Some("file:///archive")).unwrap();
}

#[test]
fn a_database_of_a_newer_schema_is_refused_with_the_versions() {
    let server = Postgres::start();
    drop(open(&server));
    assert_eq!(server.sql("tally", "SELECT value FROM tally_meta WHERE key = 'schema_version'"), "3");
    drop(open(&server)); // opening a current database again changes nothing
    server.sql("tally", "UPDATE tally_meta SET value = '99' WHERE key = 'schema_version'");
    let refused = PostgresStore::open(&server.url(), PoolOptions::default()).err().expect("refused");
    assert!(matches!(refused, StoreError::SchemaVersion { found: 99, expected: 3 }), "{refused:?}");
    let message = refused.to_string();
    assert!(message.contains("99") && message.contains('3'), "{message}");
}

#[test]
fn a_database_of_schema_1_is_migrated_to_the_current_keeping_its_checkpoints() {
    let server = Postgres::start();
    let store = open(&server);
    store.claim_partitions(2).unwrap();
    drop(store);
    // Back to what schema 1 had: no request claims, no liveness column, no archive.
    server.sql(
        "tally",
        "DROP TABLE tally_request_keys; DROP TABLE tally_archive_notes; \
         ALTER TABLE tally_checkpoints DROP COLUMN owner_seen_ms, DROP COLUMN archived_offset, \
         DROP COLUMN archive_pending; UPDATE tally_meta SET value = '1' WHERE key = 'schema_version'",
    );
    let store = open(&server);
    assert_eq!(server.sql("tally", "SELECT value FROM tally_meta WHERE key = 'schema_version'"), "3");
    assert_eq!(server.sql("tally", "SELECT count(*) FROM tally_checkpoints WHERE archived_offset IS NULL"), "2");
    assert!(store.archive_notes(0, 0).unwrap().is_empty(), "the notes table is back");
    assert_eq!(server.sql("tally", "SELECT count(*) FROM tally_checkpoints WHERE owner_seen_ms = 0"), "2");
    assert!(store.claim_request(7, 1, 0).unwrap(), "the new table takes claims");
    assert!(!store.claim_request(7, 2, 0).unwrap(), "another body's claim of the key is refused");
}

#[test]
fn a_database_url_that_does_not_parse_is_a_configuration_error() {
    let refused = PostgresStore::open("postgres://tally@127.0.0.1:notaport/tally", PoolOptions::default());
    assert!(matches!(refused, Err(StoreError::Config { .. })), "{:?}", refused.err());
}

#[test]
fn purging_expired_periods_gives_their_space_back() {
    let server = Postgres::start();
    let store = open(&server);
    store.claim_partitions(1).unwrap();
    let old_day = 100 * DAY_MINUTES;
    commit(&store, 0, 0, 1, &views(old_day + 5, 50_000)).unwrap();
    let before = store.disk_bytes().unwrap();
    let cutoffs = Cutoffs { minute: old_day + 400 * DAY_MINUTES, hour: old_day + 400 * DAY_MINUTES, day: i64::MIN };
    assert!(store.purge(&cutoffs).unwrap() >= 2);
    let after = store.disk_bytes().unwrap();
    eprintln!("database bytes: {before} before the purge, {after} after");
    // 50 000 minute and hour rows each, with their primary-key indexes: several MB.
    assert!(before - after > 4 << 20, "database went from {before} to {after} bytes");
    assert_eq!(day_count_at(&store, "video-0", old_day), 1, "the day tier is kept");
}

#[test]
fn a_database_that_goes_away_is_a_transient_error_and_work_resumes_when_it_is_back() {
    let mut server = Postgres::start();
    let store = open(&server);
    store.claim_partitions(1).unwrap();
    commit(&store, 0, 0, 1, &views(5, 10)).unwrap();

    server.stop();
    let failed = commit(&store, 0, 1, 2, &views(6, 10)).unwrap_err();
    assert!(failed.is_unreachable() && failed.is_transient(), "{failed:?}");
    assert!(store.snapshot().err().expect("no snapshot while down").is_transient());

    server.start_again();
    // The broken connections are dropped, new ones made; the failed flush is retried whole.
    commit(&store, 0, 1, 2, &views(6, 10)).unwrap();
    assert_eq!(day_count(&store, "video-9"), 2);
    assert_eq!(store.checkpoint(0).unwrap().unwrap().offset, 2);
}
