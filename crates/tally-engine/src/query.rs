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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use tally_aggregate::{Counter, Deltas};
use tally_core::bucket::DAY_MINUTES;
use tally_core::hll::Hll;
use tally_core::topk::TopSketch;
use tally_core::{Granularity, MinuteRange, Span, partition_of};
use tally_store::Snapshot;

use crate::{Engine, EngineError};

/// Cells copied out of memory: (epoch minute, counter).
type Cells = Vec<(i64, Counter)>;

/// What one partition's memory held for a query, copied under its lock: the pending
/// deltas (beginning at log offset `pending_start`) and those being flushed (beginning at
/// their own offset).
struct MemoryView<T> {
    partition: u32,
    pending_start: u64,
    pending: T,
    flushing: Option<(u64, T)>,
}

impl<T> MemoryView<T> {
    fn of(engine: &Engine, partition: u32, copy: impl Fn(&Deltas) -> T) -> MemoryView<T> {
        let memory = engine.shared.partitions[partition as usize].memory.lock();
        MemoryView {
            partition,
            pending_start: memory.pending_start,
            pending: copy(&memory.state.deltas),
            flushing: memory.flushing.as_ref().map(|(start, deltas)| (*start, copy(deltas))),
        }
    }

    /// The same view with each copy transformed.
    fn map<U>(&self, f: impl Fn(&T) -> U) -> MemoryView<U> {
        MemoryView {
            partition: self.partition,
            pending_start: self.pending_start,
            pending: f(&self.pending),
            flushing: self.flushing.as_ref().map(|(start, copy)| (*start, f(copy))),
        }
    }

    /// The copies that a snapshot with checkpoint `checkpoint` does not contain.
    fn unflushed(&self, checkpoint: u64) -> impl Iterator<Item = &T> {
        let flushing = self.flushing.iter().filter(move |(start, _)| checkpoint <= *start).map(|(_, copy)| copy);
        let pending = (checkpoint <= self.pending_start).then_some(&self.pending);
        flushing.chain(pending)
    }
}

/// Refinements (exact counts of candidates) a top query makes at most before it answers
/// approximately: about 10 µs each.
const TOP_REFINEMENTS_MAX: usize = 4_000;
/// Distinct videos an exact top query counts at most.
pub const TOP_EXACT_VIDEOS_MAX: usize = 10_000_000;

/// One video of a top answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopItem {
    pub video_id: String,
    /// Events in the range: exact when `error` is 0, else a lower bound.
    pub count: u64,
    /// The true count lies in `[count, count + error]`.
    pub error: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopAnswer {
    /// By count, descending; ties by video id, ascending.
    pub items: Vec<TopItem>,
    /// True when these are provably the top videos with their exact counts.
    pub exact: bool,
    /// No video left out of `items` has more events than this.
    pub unlisted_max: u64,
    /// Videos counted exactly to reach the answer.
    pub refined: usize,
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
    fn memory_view(&self, event_type: &str, video_id: &str, range: MinuteRange) -> MemoryView<Cells> {
        let partition = partition_of(video_id, self.shared.config.partitions);
        MemoryView::of(self, partition, |deltas| cells_in(deltas, event_type, video_id, range))
    }

    /// The count and sum of one (type, video) over a minute range.
    pub fn count(&self, event_type: &str, video_id: &str, range: MinuteRange) -> Result<Counter, EngineError> {
        if range.is_empty() {
            return Ok(Counter::default());
        }
        let view = self.memory_view(event_type, video_id, range);
        let snapshot = self.shared.store.snapshot()?;
        let checkpoint = snapshot.checkpoint_offset(view.partition)?;
        total(&*snapshot, checkpoint, range, &range.decompose(), event_type, video_id, &view)
    }

    /// One video's count and sum between consecutive `bounds` (ascending epoch minutes),
    /// all from one store snapshot: for series whose steps are not buckets (local days).
    pub fn counts_between(
        &self,
        event_type: &str,
        video_id: &str,
        bounds: &[i64],
    ) -> Result<Vec<Counter>, EngineError> {
        let (Some(&start), Some(&end)) = (bounds.first(), bounds.last()) else { return Ok(Vec::new()) };
        debug_assert!(bounds.is_sorted(), "bounds must ascend");
        let view = self.memory_view(event_type, video_id, MinuteRange { start, end });
        let snapshot = self.shared.store.snapshot()?;
        let checkpoint = snapshot.checkpoint_offset(view.partition)?;
        bounds
            .windows(2)
            .map(|pair| {
                let range = MinuteRange { start: pair[0], end: pair[1] };
                total(&*snapshot, checkpoint, range, &range.decompose(), event_type, video_id, &view)
            })
            .collect()
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
        let views: Vec<MemoryView<Cells>> =
            video_ids.iter().map(|video_id| self.memory_view(event_type, video_id, range)).collect();
        let snapshot = self.shared.store.snapshot()?;
        let spans = range.decompose();
        // Read once per partition, not once per video.
        let mut checkpoints: Vec<Option<u64>> = vec![None; self.shared.partitions.len()];
        video_ids
            .iter()
            .zip(&views)
            .map(|(video_id, view)| {
                let checkpoint = match checkpoints[view.partition as usize] {
                    Some(checkpoint) => checkpoint,
                    None => *checkpoints[view.partition as usize].insert(snapshot.checkpoint_offset(view.partition)?),
                };
                total(&*snapshot, checkpoint, range, &spans, event_type, video_id, view)
            })
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
        for (minute, counter) in view.unflushed(checkpoint).flatten() {
            points[((granularity.bucket_of(*minute) - range.start) / size) as usize].add(*counter);
        }
        Ok(points)
    }

    /// Count and sum of every event type seen for one video over a range, by type name.
    /// Types with no event in the range are left out.
    pub fn type_stats(&self, video_id: &str, range: MinuteRange) -> Result<Vec<(String, Counter)>, EngineError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let partition = partition_of(video_id, self.shared.config.partitions);
        // The types in memory that have cells of this video, with those cells.
        let view = MemoryView::of(self, partition, |deltas| {
            deltas
                .types()
                .iter()
                .filter_map(|event_type| {
                    let cells = cells_in(deltas, event_type, video_id, range);
                    (!cells.is_empty()).then(|| (event_type.to_string(), cells))
                })
                .collect::<Vec<_>>()
        });
        let snapshot = self.shared.store.snapshot()?;
        // The video's own types in the store, from its type index over the range's days.
        let mut types = Vec::new();
        let first_day = Granularity::Day.bucket_of(range.start);
        let end_day = Granularity::Day.bucket_of(range.end - 1) + DAY_MINUTES;
        snapshot.video_types(video_id, first_day, end_day, &mut |t| types.push(t.to_owned()))?;
        types.extend(view.pending.iter().map(|(t, _)| t.clone()));
        if let Some((_, flushing)) = &view.flushing {
            types.extend(flushing.iter().map(|(t, _)| t.clone()));
        }
        types.sort_unstable();
        types.dedup();
        let spans = range.decompose();
        let checkpoint = snapshot.checkpoint_offset(view.partition)?;
        let mut answer = Vec::new();
        for event_type in types {
            let cells_of_type = |copy: &Vec<(String, Cells)>| {
                copy.iter().find(|(t, _)| *t == event_type).map(|(_, cells)| cells.clone()).unwrap_or_default()
            };
            let total = total(&*snapshot, checkpoint, range, &spans, &event_type, video_id, &view.map(cells_of_type))?;
            if total.count > 0 {
                answer.push((event_type, total));
            }
        }
        Ok(answer)
    }

    /// The distinct-viewer sketch of one (type, video) over a range: the store's buckets
    /// merged with the sketches not yet flushed.
    pub fn uniques(&self, event_type: &str, video_id: &str, range: MinuteRange) -> Result<Hll, EngineError> {
        let mut merged = Hll::default();
        if range.is_empty() {
            return Ok(merged);
        }
        let partition = partition_of(video_id, self.shared.config.partitions);
        let view = MemoryView::of(self, partition, |deltas| {
            deltas
                .get(event_type, video_id)
                .iter()
                .filter(|cell| range.contains(cell.minute))
                .filter_map(|cell| deltas.viewers(event_type, video_id, cell.minute).cloned())
                .collect::<Vec<Hll>>()
        });
        let snapshot = self.shared.store.snapshot()?;
        for span in range.decompose() {
            snapshot.uniques(event_type, video_id, span, &mut merged)?;
        }
        let checkpoint = snapshot.checkpoint_offset(partition)?;
        for sketch in view.unflushed(checkpoint).flatten() {
            merged.merge(sketch);
        }
        Ok(merged)
    }

    /// The `k` videos with the most events of `event_type` over a range.
    ///
    /// The store's top-items sketches of the range's buckets are merged into candidates
    /// with lower and upper bounds, and the events not yet flushed are added exactly. The
    /// candidates are then counted exactly, highest upper bound first, until none left can
    /// beat the k-th exact count: the answer is then exact. It is approximate only when the
    /// sketches' error bound reaches the k-th count (a flat distribution) or the refinement
    /// budget runs out; `unlisted_max` then bounds what was left out. With `exact`, every
    /// video active in the range's days is counted instead (cost: about 10 µs each).
    pub fn top(&self, event_type: &str, range: MinuteRange, k: usize, exact: bool) -> Result<TopAnswer, EngineError> {
        if range.is_empty() || k == 0 {
            return Ok(TopAnswer { items: Vec::new(), exact: true, unlisted_max: 0, refined: 0 });
        }
        let copy = |deltas: &Deltas| -> HashMap<Box<str>, u64> {
            let mut counts = HashMap::new();
            for (t, video_id, cells) in deltas.iter() {
                if t != event_type {
                    continue;
                }
                let count: u64 = cells.iter().filter(|c| range.contains(c.minute)).map(|c| c.counter.count).sum();
                if count > 0 {
                    counts.insert(Box::from(video_id), count);
                }
            }
            counts
        };
        let views: Vec<_> = (0..self.shared.config.partitions).map(|p| MemoryView::of(self, p, copy)).collect();
        let snapshot = self.shared.store.snapshot()?;
        // Events not yet in the snapshot, exactly.
        let mut memory: HashMap<&str, u64> = HashMap::new();
        for view in &views {
            let checkpoint = snapshot.checkpoint_offset(view.partition)?;
            for counts in view.unflushed(checkpoint) {
                for (video_id, count) in counts {
                    *memory.entry(&**video_id).or_default() += count;
                }
            }
        }
        let spans = range.decompose();
        let exact_count = |video_id: &str| -> Result<u64, EngineError> {
            let mut total = memory.get(video_id).copied().unwrap_or(0);
            for span in &spans {
                total += snapshot.sum(event_type, video_id, *span)?.count;
            }
            Ok(total)
        };
        let mut best = Best::new(k);
        if exact {
            let mut videos: HashSet<String> = memory.keys().map(|v| v.to_string()).collect();
            let days = Granularity::Day;
            let (start, end) = (days.bucket_of(range.start), days.bucket_of(range.end - 1) + days.minutes());
            let mut too_many = false;
            snapshot.videos(event_type, start, end, &mut |video_id| {
                if videos.len() < TOP_EXACT_VIDEOS_MAX {
                    videos.insert(video_id.to_string());
                } else if !videos.contains(video_id) {
                    too_many = true;
                }
            })?;
            if too_many {
                return Err(EngineError::TooExpensive {
                    reason: format!("more than {TOP_EXACT_VIDEOS_MAX} videos are active in the range's days"),
                });
            }
            for video_id in &videos {
                best.offer(exact_count(video_id)?, video_id);
            }
            return Ok(TopAnswer { items: best.into_items(), exact: true, unlisted_max: 0, refined: videos.len() });
        }

        let mut sketch = TopSketch::default();
        for span in &spans {
            snapshot.top(event_type, *span, &mut sketch)?;
        }
        let error = sketch.offset();
        // Candidates by upper bound: sketch lower bound + memory + the sketch's error.
        let mut candidates: HashMap<&[u8], u64> = sketch.iter().collect();
        for (video_id, count) in &memory {
            *candidates.entry(video_id.as_bytes()).or_default() += count;
        }
        let mut candidates: Vec<(u64, &[u8])> = candidates.into_iter().map(|(v, low)| (low, v)).collect();
        candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let mut refined = 0;
        let mut unrefined_max = 0;
        let mut unrefined = Vec::new();
        for &(low, video_id) in &candidates {
            let upper = low + error;
            if best.is_full() && upper < best.kth() {
                unrefined_max = upper;
                break;
            }
            let video_id = std::str::from_utf8(video_id).expect("video ids are UTF-8");
            if refined == TOP_REFINEMENTS_MAX {
                // Candidates come by upper bound, descending: the first one left bounds them all.
                if unrefined.is_empty() {
                    unrefined_max = upper;
                }
                unrefined.push((low, video_id));
                if unrefined.len() == k {
                    break;
                }
                continue;
            }
            refined += 1;
            best.offer(exact_count(video_id)?, video_id);
        }
        let budget_ran_out = !unrefined.is_empty();
        let kth = if best.is_full() { best.kth() } else { 0 };
        let exact = !budget_ran_out && (error < kth || (!best.is_full() && error == 0));
        // Past the budget, the best unrefined candidates are listed with their bounds.
        let mut items = best.into_items();
        for (low, video_id) in unrefined.into_iter().take(k) {
            items.push(TopItem { video_id: video_id.to_string(), count: low, error });
        }
        items.sort_unstable_by(|a, b| b.count.cmp(&a.count).then_with(|| a.video_id.cmp(&b.video_id)));
        items.truncate(k);
        let unlisted_max = if exact { 0 } else { error.max(unrefined_max) };
        Ok(TopAnswer { items, exact, unlisted_max, refined })
    }
}

/// The best `k` (count, video) seen, by count descending then video id ascending.
struct Best {
    k: usize,
    /// Min-heap on that order: the top is the k-th best.
    heap: BinaryHeap<Reverse<(u64, Reverse<String>)>>,
}

impl Best {
    fn new(k: usize) -> Best {
        Best { k, heap: BinaryHeap::with_capacity(k + 1) }
    }

    fn is_full(&self) -> bool {
        self.heap.len() == self.k
    }

    /// The k-th best count (only meaningful when full).
    fn kth(&self) -> u64 {
        self.heap.peek().map_or(0, |Reverse((count, _))| *count)
    }

    fn offer(&mut self, count: u64, video_id: &str) {
        if count == 0 {
            return;
        }
        if self.is_full() {
            let Some(Reverse((kth, Reverse(kth_video)))) = self.heap.peek() else { return };
            if count < *kth || (count == *kth && video_id >= kth_video.as_str()) {
                return;
            }
            self.heap.pop();
        }
        self.heap.push(Reverse((count, Reverse(video_id.to_string()))));
    }

    fn into_items(self) -> Vec<TopItem> {
        let mut items: Vec<TopItem> = self
            .heap
            .into_iter()
            .map(|Reverse((count, Reverse(video_id)))| TopItem { video_id, count, error: 0 })
            .collect();
        items.sort_unstable_by(|a, b| b.count.cmp(&a.count).then_with(|| a.video_id.cmp(&b.video_id)));
        items
    }
}

/// The store's buckets over `spans` (the decomposition of `range`) plus the cells of
/// `view` inside `range` that the snapshot does not hold; `checkpoint` is the snapshot's
/// checkpoint of the view's partition (read once by the caller, however many totals).
fn total(
    snapshot: &dyn Snapshot,
    checkpoint: u64,
    range: MinuteRange,
    spans: &[Span],
    event_type: &str,
    video_id: &str,
    view: &MemoryView<Cells>,
) -> Result<Counter, EngineError> {
    let mut total = Counter::default();
    for span in spans {
        total.add(snapshot.sum(event_type, video_id, *span)?);
    }
    for (_, counter) in view.unflushed(checkpoint).flatten().filter(|(minute, _)| range.contains(*minute)) {
        total.add(*counter);
    }
    Ok(total)
}
