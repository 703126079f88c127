//! Recompute: the stored aggregates of whole UTC days rewritten from the raw-event archive
//! (the batch layer correcting the speed layer), while the engine runs.
//!
//! The archive is read in two steps. First, without holding anything up, every file that
//! can hold an event of the days (received from `clock_skew_max` before them to
//! `lateness_max` after them). Then, holding the flush lock (so that no checkpoint moves),
//! the archiver catches up to the checkpoints and the files it adds are read too: the
//! recomputed counters now hold exactly the events the store counted. They replace the
//! stored rows of those days in every tier (counters, distinct-viewer sketches, top items)
//! in one transaction; stored rows the archive has no event for are removed. Events
//! applied after the checkpoints reach the store later, by the flushes, as always.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tally_aggregate::{Deltas, rollup};
use tally_archive::{ArchivedFile, read_events};
use tally_core::bucket::{DAY_MS, HOUR_MS, MINUTE_MS};
use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Counter, CounterRow, Granularity, TopRow, UniquesRow};
use tally_store::Snapshot;

use crate::archive::Archiver;
use crate::{EngineError, Shared};

/// What to recompute: events whose `ts` lies in `[from_ms, to_ms)`, widened to whole UTC
/// days, and how far the receive time of such an event may be from its `ts`.
#[derive(Debug, Clone, Copy)]
pub struct RecomputeRange {
    pub from_ms: i64,
    pub to_ms: i64,
    pub lateness_max_ms: i64,
    pub clock_skew_max_ms: i64,
}

/// What a recompute did.
#[derive(Debug, Clone, Default)]
pub struct RecomputeReport {
    /// The days rewritten, `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    pub files_read: usize,
    pub rows_read: u64,
    /// Archived events with `ts` in the days.
    pub events: u64,
    /// Counter rows written, every tier together (removals included).
    pub counters_written: usize,
    /// Of those, the ones whose stored value differed: what the recompute corrected.
    pub counters_corrected: usize,
    /// Time spent holding flushes back.
    pub flush_hold_ms: u64,
    pub seconds: f64,
}

fn refused(reason: impl Into<String>) -> EngineError {
    EngineError::Recompute { reason: reason.into() }
}

/// A failure that may pass (the object store, a flush being retried): 503, try again.
fn unavailable(reason: impl Into<String>) -> EngineError {
    EngineError::Unavailable { reason: reason.into() }
}

/// Passes of catching up and reading before flushes are held back: each leaves less
/// for the held part to do.
const UNHELD_PASSES: usize = 2;

pub(crate) fn recompute(shared: &Shared, range: RecomputeRange) -> Result<RecomputeReport, EngineError> {
    let started = Instant::now();
    let archiver = shared.archiver.as_deref().ok_or_else(|| refused("no archive is configured (`archive`)"))?;
    if shared.cluster {
        // Each node holds only its partitions' deltas and checkpoints; a rewrite must
        // cover every partition's at once.
        return Err(refused("recompute is not built for cluster mode yet (`tally audit` works)"));
    }
    let from_ms = range.from_ms.div_euclid(DAY_MS) * DAY_MS;
    let to_ms = (range.to_ms + DAY_MS - 1).div_euclid(DAY_MS) * DAY_MS;
    if range.from_ms >= range.to_ms || to_ms - from_ms > DAY_MS {
        return Err(refused("the range must lie within one UTC day (`tally recompute` walks longer ones day by day)"));
    }
    let Some(_one_at_a_time) = shared.recomputing.try_lock() else {
        return Err(unavailable("another recompute is running"));
    };
    // A file's hour is its first frame's, and a frame's records are not in receive order:
    // an hour of margin on each side.
    let received = (from_ms - range.clock_skew_max_ms - HOUR_MS, to_ms + range.lateness_max_ms + HOUR_MS);
    let mut report = RecomputeReport { from_ms, to_ms, ..RecomputeReport::default() };
    let mut deltas = Deltas::default();
    let mut read: HashSet<String> = HashSet::new();
    let mut gather = |report: &mut RecomputeReport| -> Result<(), EngineError> {
        archiver.catch_up(&shared.partitions).map_err(|e| unavailable(format!("the archive cannot catch up: {e}")))?;
        let files = archiver.archive().files().map_err(|e| unavailable(format!("listing the archive: {e}")))?;
        check_complete(&files, shared.partitions.len(), received)?;
        read_files(archiver, &files, received, (from_ms, to_ms), &mut read, &mut deltas, report)
    };
    for _ in 0..UNHELD_PASSES {
        gather(&mut report)?;
    }
    let held = Instant::now();
    let state = shared.flush_lock.lock();
    if let Some(reason) = shared.failure.lock().clone() {
        return Err(EngineError::Unavailable { reason });
    }
    if !state.is_settled() {
        return Err(unavailable("a flush is being retried; the store may hold more than its checkpoint says"));
    }
    gather(&mut report)?;
    rewrite(shared, archiver, &deltas, (from_ms, to_ms), &mut report)?;
    drop(state);
    report.flush_hold_ms = held.elapsed().as_millis() as u64;
    report.seconds = started.elapsed().as_secs_f64();
    metrics::counter!("tally_recompute_counters_corrected_total").increment(report.counters_corrected as u64);
    tracing::info!(?report, "recomputed stored aggregates from the archive");
    Ok(report)
}

/// Refuses when the archive may lack events received in `received`: a partition without
/// files, or whose archive starts after the log did, in an hour that ends after the
/// window begins (archiving enabled then, or files purged), or whose files leave a gap
/// that may hold receive times of the window.
fn check_complete(files: &[ArchivedFile], partitions: usize, received: (i64, i64)) -> Result<(), EngineError> {
    let mut seen = vec![false; partitions];
    for partition in files.chunk_by(|a, b| a.partition == b.partition) {
        let first = &partition[0];
        if let Some(seen) = seen.get_mut(first.partition as usize) {
            *seen = true;
        }
        // A partition archived from offset 0 holds its whole log, however late it began.
        if first.first_offset > 0 && first.hour_ms.is_none_or(|hour| hour + HOUR_MS > received.0) {
            return Err(refused(format!(
                "the archive of partition {} begins with {} (archiving began later, or older files were purged): \
                 events of the range may be missing from it",
                first.partition, first.path
            )));
        }
        for pair in partition.windows(2) {
            // A gap matters if what it lacks may have been received in the window: between
            // the hour of the file before it and the end of the hour of the file after it.
            let (before, after) = (pair[0].hour_ms.unwrap_or(i64::MIN), pair[1].hour_ms.unwrap_or(i64::MAX));
            let needed = before < received.1 && after.saturating_add(HOUR_MS) > received.0;
            if needed && pair[0].end_offset != pair[1].first_offset {
                return Err(refused(format!(
                    "the archive of partition {} has a gap between {} and {}",
                    first.partition, pair[0].path, pair[1].path
                )));
            }
        }
    }
    if let Some(missing) = seen.iter().position(|seen| !seen) {
        return Err(refused(format!("the archive holds no file of partition {missing}")));
    }
    Ok(())
}

/// Adds the events of the files not read yet whose receive hour may hold an event of
/// `days` to `deltas`.
fn read_files(
    archiver: &Archiver,
    files: &[ArchivedFile],
    received: (i64, i64),
    days: (i64, i64),
    read: &mut HashSet<String>,
    deltas: &mut Deltas,
    report: &mut RecomputeReport,
) -> Result<(), EngineError> {
    for file in files {
        let in_window = file.hour_ms.is_none_or(|hour| hour + HOUR_MS > received.0 && hour < received.1);
        if !in_window || !read.insert(file.path.clone()) {
            continue;
        }
        let rows = read_events(archiver.archive(), file, true, &mut |event| {
            if event.ts_ms >= days.0 && event.ts_ms < days.1 {
                report.events += 1;
                let minute = event.ts_ms.div_euclid(MINUTE_MS);
                deltas.add(event.event_type, event.video_id, minute, event.value, event.viewer_id);
            }
        })
        .map_err(|e| unavailable(format!("reading the archive: {e}")))?;
        report.files_read += 1;
        report.rows_read += rows;
    }
    Ok(())
}

/// The stored counters of the days, per (type, video): each tier's buckets.
type Stored = Vec<(String, String, Vec<(Granularity, i64, Counter)>)>;

fn read_stored(snapshot: &dyn Snapshot, days: (i64, i64)) -> Result<Stored, EngineError> {
    let (start, end) = (days.0 / MINUTE_MS, days.1 / MINUTE_MS);
    let mut stored = Stored::new();
    for event_type in snapshot.types()? {
        let mut videos = Vec::new();
        snapshot.videos(&event_type, start, end, &mut |video| videos.push(video.to_owned()))?;
        for video in videos {
            let mut buckets = Vec::new();
            for granularity in Granularity::ALL {
                snapshot.buckets(&event_type, &video, granularity, start, end, &mut |bucket, counter| {
                    buckets.push((granularity, bucket, counter))
                })?;
            }
            stored.push((event_type.clone(), video, buckets));
        }
    }
    Ok(stored)
}

/// Replaces the stored rows of `days` with the rollup of `deltas`, removing the stored
/// rows the archive has no event for.
fn rewrite(
    shared: &Shared,
    archiver: &Archiver,
    deltas: &Deltas,
    days: (i64, i64),
    report: &mut RecomputeReport,
) -> Result<(), EngineError> {
    let stored = {
        let snapshot = shared.store.snapshot()?;
        for partition in &shared.partitions {
            let (held, stored) =
                (partition.checkpoint_offset.load(Ordering::Acquire), snapshot.checkpoint_offset(partition.index)?);
            if held != stored || archiver.archived(partition.index) < held {
                return Err(unavailable(format!(
                    "partition {}: the store's checkpoint ({stored}), the engine's ({held}) and the archive's differ; try again",
                    partition.index
                )));
            }
        }
        read_stored(&*snapshot, days)?
    };
    let cutoffs = shared.write_cutoffs();
    let mut written = 0;
    let mut corrected = 0;
    shared.store.rewrite(&mut |granularity| {
        let mut rows = rollup(&[deltas], &cutoffs, granularity);
        let current: HashMap<(&str, &str, i64), Counter> = stored
            .iter()
            .flat_map(|(t, v, buckets)| {
                buckets.iter().filter(|b| b.0 == granularity).map(move |b| ((t.as_str(), v.as_str(), b.1), b.2))
            })
            .collect();
        corrected += rows.counters.iter().filter(|row| current.get(&row.key()) != Some(&row.counter)).count();
        let kept: HashSet<(&str, &str, i64)> = rows.counters.iter().map(CounterRow::key).collect();
        // A counter without viewer ids in the archive has no sketch: a stored one goes.
        let sketched: HashSet<(&str, &str, i64)> =
            rows.uniques.iter().map(|u| (u.event_type, u.video_id, u.bucket)).collect();
        for &(event_type, video_id, bucket) in kept.iter().filter(|key| !sketched.contains(*key)) {
            rows.uniques.push(UniquesRow { event_type, video_id, bucket, sketch: Hll::default() });
        }
        let tops: HashSet<(&str, i64)> = rows.top.iter().map(|row| (row.event_type, row.bucket)).collect();
        let mut emptied_tops = HashSet::new();
        for (&(event_type, video_id, bucket), _) in current.iter().filter(|(key, _)| !kept.contains(*key)) {
            corrected += 1;
            rows.counters.push(CounterRow { event_type, video_id, bucket, counter: Counter::default() });
            rows.uniques.push(UniquesRow { event_type, video_id, bucket, sketch: Hll::default() });
            if !tops.contains(&(event_type, bucket)) && emptied_tops.insert((event_type, bucket)) {
                rows.top.push(TopRow { event_type, bucket, sketch: TopSketch::default() });
            }
        }
        written += rows.counters.len();
        rows
    })?;
    report.counters_written = written;
    report.counters_corrected = corrected;
    Ok(())
}
