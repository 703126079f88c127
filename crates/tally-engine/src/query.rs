//! Queries: the store's buckets plus the deltas not yet flushed, combined so that every
//! acknowledged event is counted exactly once.
//!
//! The partition lock is taken first, to copy the relevant cells of the pending deltas
//! (which begin at log offset P) and of the deltas being flushed (which begin at F); the
//! store snapshot is taken after, so its checkpoint C is at least F (while a flush runs)
//! or P (otherwise). Deltas are added only when the snapshot does not contain them yet:
//! the flushing ones if C ≤ F, the pending ones if C ≤ P. A flush that commits between the
//! two steps moves C past them, and its cells are then read from the store instead.
//!
//! Many videos at once (`counts`): every view is taken first, then one snapshot. The
//! snapshot is newer than each view, so the rule holds for each of them, and the answers
//! all come from one consistent store state.

use tally_aggregate::{Counter, Deltas};
use tally_core::{Granularity, MinuteRange, Span, partition_of};
use tally_store::Snapshot;

use crate::{Engine, EngineError};

/// Cells copied out of memory: (epoch minute, counter).
type Cells = Vec<(i64, Counter)>;

struct MemoryView {
    partition: u32,
    pending_start: u64,
    pending: Cells,
    flushing: Option<(u64, Cells)>,
}

fn cells_in(deltas: &Deltas, event_type: &str, video_id: &str, range: MinuteRange) -> Cells {
    deltas
        .get(event_type, video_id)
        .iter()
        .filter(|cell| range.contains(cell.minute))
        .map(|cell| (cell.minute, cell.counter))
        .collect()
}

impl Engine {
    fn memory_view(&self, event_type: &str, video_id: &str, range: MinuteRange) -> MemoryView {
        let partition = partition_of(video_id, self.shared.config.partitions);
        let memory = self.shared.partitions[partition as usize].memory.lock();
        MemoryView {
            partition,
            pending_start: memory.pending_start,
            pending: cells_in(&memory.state.deltas, event_type, video_id, range),
            flushing: memory
                .flushing
                .as_ref()
                .map(|(start, deltas)| (*start, cells_in(deltas, event_type, video_id, range))),
        }
    }

    /// The count and sum of one (type, video) over a minute range.
    pub fn count(&self, event_type: &str, video_id: &str, range: MinuteRange) -> Result<Counter, EngineError> {
        if range.is_empty() {
            return Ok(Counter::default());
        }
        let view = self.memory_view(event_type, video_id, range);
        let snapshot = self.shared.store.snapshot()?;
        total(&*snapshot, &range.decompose(), event_type, video_id, &view)
    }

    /// `count` for many videos of one type over one range, from one store snapshot.
    pub fn counts(
        &self,
        event_type: &str,
        video_ids: &[&str],
        range: MinuteRange,
    ) -> Result<Vec<Counter>, EngineError> {
        if range.is_empty() {
            return Ok(vec![Counter::default(); video_ids.len()]);
        }
        let views: Vec<MemoryView> =
            video_ids.iter().map(|video_id| self.memory_view(event_type, video_id, range)).collect();
        let snapshot = self.shared.store.snapshot()?;
        let spans = range.decompose();
        video_ids
            .iter()
            .zip(&views)
            .map(|(video_id, view)| total(&*snapshot, &spans, event_type, video_id, view))
            .collect()
    }

    /// One counter per bucket of `granularity` over `range`, zero-filled. The range must be
    /// aligned to the granularity.
    pub fn series(
        &self,
        event_type: &str,
        video_id: &str,
        granularity: Granularity,
        range: MinuteRange,
    ) -> Result<Vec<Counter>, EngineError> {
        let size = granularity.minutes();
        debug_assert!(range.start % size == 0 && range.end % size == 0, "series range must be aligned");
        let mut points =
            vec![Counter::default(); usize::try_from((range.end - range.start).max(0) / size).expect("point count")];
        if points.is_empty() {
            return Ok(points);
        }
        let view = self.memory_view(event_type, video_id, range);
        let snapshot = self.shared.store.snapshot()?;
        snapshot.buckets(event_type, video_id, granularity, range.start, range.end, &mut |bucket, counter| {
            points[((bucket - range.start) / size) as usize].add(counter);
        })?;
        let checkpoint = snapshot.checkpoint_offset(view.partition)?;
        for (minute, counter) in unflushed(&view, checkpoint) {
            points[((granularity.bucket_of(*minute) - range.start) / size) as usize].add(*counter);
        }
        Ok(points)
    }
}

/// The store's buckets over `spans` plus the cells of `view` the snapshot does not hold.
fn total(
    snapshot: &dyn Snapshot,
    spans: &[Span],
    event_type: &str,
    video_id: &str,
    view: &MemoryView,
) -> Result<Counter, EngineError> {
    let mut total = Counter::default();
    for span in spans {
        total.add(snapshot.sum(event_type, video_id, *span)?);
    }
    let checkpoint = snapshot.checkpoint_offset(view.partition)?;
    for (_, counter) in unflushed(view, checkpoint) {
        total.add(*counter);
    }
    Ok(total)
}

/// The copied cells that the snapshot with checkpoint `checkpoint` does not contain.
fn unflushed(view: &MemoryView, checkpoint: u64) -> impl Iterator<Item = &(i64, Counter)> {
    let flushing = view.flushing.iter().filter(move |(start, _)| checkpoint <= *start).flat_map(|(_, cells)| cells);
    let pending = (checkpoint <= view.pending_start).then_some(&view.pending).into_iter().flatten();
    flushing.chain(pending)
}
