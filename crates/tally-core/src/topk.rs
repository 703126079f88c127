//! Heavy hitters: a Misra–Gries frequent-items summary with weighted, mergeable updates.
//!
//! It keeps at most `capacity` (item, count) pairs. Each kept count is a *lower bound* of
//! the item's true count, and `offset` bounds how much any count may be short: an item's
//! true count lies in `[count, count + offset]`, and an item not kept has at most `offset`.
//! When more than `capacity` items are held, the (capacity+1)-th largest count `t` is
//! subtracted from every count, items at zero or below are dropped, and `offset` grows by
//! `t`. Each such step removes at least `(capacity + 1) · t` from the summary's total, so
//! `offset ≤ (N − kept total) / (capacity + 1)` for `N` events: small where the
//! distribution is skewed, which is where the top items matter.
//!
//! Summaries merge by adding counts and offsets (Agarwal et al., "Mergeable summaries",
//! 2012), so minute summaries combine into any range with a known bound.
//!
//! Byte format (stable, stored): `u64le offset | u32le n | n × (u64le count | u16le len | item)`,
//! items in byte order.

use hashbrown::HashMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopSketch {
    counts: HashMap<Box<[u8]>, u64>,
    offset: u64,
}

impl TopSketch {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Adds `weight` to `item`; call `prune` to bound the size.
    pub fn add(&mut self, item: &[u8], weight: u64) {
        match self.counts.get_mut(item) {
            // Saturating: a damaged stored sketch must not overflow (true counts never near it).
            Some(count) => *count = count.saturating_add(weight),
            None => {
                self.counts.insert(Box::from(item), weight);
            }
        }
    }

    /// Adds `other` (its counts and its error bound) into `self`.
    pub fn merge(&mut self, other: &TopSketch) {
        for (item, &count) in &other.counts {
            self.add(item, count);
        }
        self.offset = self.offset.saturating_add(other.offset);
    }

    /// The sketch of exact counts of *distinct* items, pruned to `capacity`: the same as
    /// adding each and then `prune(capacity)`, without building a table of all of them
    /// (one selection over the list instead of a hash insert per item).
    pub fn from_distinct(mut items: Vec<(u64, &[u8])>, capacity: usize) -> TopSketch {
        debug_assert_eq!(
            items.iter().map(|(_, item)| *item).collect::<hashbrown::HashSet<_>>().len(),
            items.len(),
            "items must be distinct"
        );
        let mut threshold = 0;
        if items.len() > capacity {
            let (_, &mut (t, _), _) = items.select_nth_unstable_by(capacity, |a, b| b.0.cmp(&a.0));
            threshold = t;
            items.truncate(capacity);
        }
        let counts: HashMap<Box<[u8]>, u64> = items
            .into_iter()
            .filter(|&(count, _)| count > threshold)
            .map(|(count, item)| (Box::from(item), count - threshold))
            .collect();
        TopSketch { counts, offset: threshold }
    }

    /// Keeps at most `capacity` items, moving what it drops into the error bound.
    pub fn prune(&mut self, capacity: usize) {
        if self.counts.len() <= capacity {
            return;
        }
        let mut counts: Vec<u64> = self.counts.values().copied().collect();
        let (_, &mut threshold, _) = counts.select_nth_unstable_by(capacity, |a, b| b.cmp(a));
        self.counts.retain(|_, count| {
            *count = count.saturating_sub(threshold);
            *count > 0
        });
        self.offset = self.offset.saturating_add(threshold);
    }

    /// Every kept (item, lower-bound count).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.counts.iter().map(|(item, &count)| (&**item, count))
    }

    pub fn lower_bound(&self, item: &[u8]) -> u64 {
        self.counts.get(item).copied().unwrap_or(0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut items: Vec<(&[u8], u64)> = self.iter().collect();
        items.sort_unstable();
        let mut out = Vec::with_capacity(12 + items.iter().map(|(item, _)| 10 + item.len()).sum::<usize>());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for (item, count) in items {
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&u16::try_from(item.len()).expect("item fits u16").to_le_bytes());
            out.extend_from_slice(item);
        }
        out
    }

    /// Adds a stored sketch into `self` without building it first. The whole sketch is
    /// checked before any of it is added: a refused one changes nothing.
    pub fn merge_encoded(&mut self, bytes: &[u8]) -> Result<(), String> {
        let offset = visit_encoded(bytes, |_, _| {})?;
        visit_encoded(bytes, |item, count| self.add(item, count))?;
        self.offset = self.offset.saturating_add(offset);
        Ok(())
    }

    pub fn decode(bytes: &[u8]) -> Result<TopSketch, String> {
        let mut sketch = TopSketch::default();
        sketch.merge_encoded(bytes)?;
        Ok(sketch)
    }
}

/// Visits each (item, count) of an encoded sketch; returns its offset. Refuses a sketch
/// that is cut short, has bytes left over, or whose ids are not sorted and distinct.
fn visit_encoded<'a>(bytes: &'a [u8], mut visit: impl FnMut(&'a [u8], u64)) -> Result<u64, String> {
    let corrupt = || format!("not a top-items sketch ({} bytes)", bytes.len());
    let (offset, rest) = bytes.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (n, mut rest) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let mut previous: Option<&[u8]> = None;
    for _ in 0..u32::from_le_bytes(*n) {
        let (count, after) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let (len, after) = after.split_first_chunk::<2>().ok_or_else(corrupt)?;
        let len = usize::from(u16::from_le_bytes(*len));
        let (item, after) = after.split_at_checked(len).ok_or_else(corrupt)?;
        if previous.is_some_and(|previous| previous >= item) {
            return Err(corrupt());
        }
        previous = Some(item);
        visit(item, u64::from_le_bytes(*count));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(corrupt());
    }
    Ok(u64::from_le_bytes(*offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as StdMap;

    proptest! {
        /// Whatever the stream, the split into pieces, the merge order and the capacity,
        /// every true count lies within [lower bound, lower bound + offset].
        #[test]
        fn bounds_hold_after_any_updates_prunes_and_merges(
            pieces in prop::collection::vec(prop::collection::vec((0u8..60, 1u64..20), 0..80), 1..8),
            capacity in 1usize..20,
        ) {
            let mut truth: StdMap<u8, u64> = StdMap::new();
            let mut merged = TopSketch::default();
            for piece in &pieces {
                let mut sketch = TopSketch::default();
                for &(item, weight) in piece {
                    *truth.entry(item).or_default() += weight;
                    sketch.add(&[item], weight);
                    sketch.prune(capacity);
                }
                let stored = TopSketch::decode(&sketch.encode()).unwrap();
                prop_assert_eq!(&stored, &sketch);
                merged.merge(&stored);
                merged.prune(capacity);
            }
            prop_assert!(merged.len() <= capacity);
            let total: u64 = truth.values().sum();
            let kept: u64 = merged.iter().map(|(_, c)| c).sum();
            prop_assert!(merged.offset() * (capacity as u64 + 1) <= total - kept);
            for item in 0u8..60 {
                let true_count = truth.get(&item).copied().unwrap_or(0);
                let low = merged.lower_bound(&[item]);
                prop_assert!(low <= true_count && true_count <= low + merged.offset(),
                    "item {item}: true {true_count}, bounds [{low}, {}]", low + merged.offset());
            }
        }
    }

    proptest! {
        /// Built from a list of distinct items, a sketch is exactly the one built by adding
        /// them one by one and pruning.
        #[test]
        fn from_distinct_equals_adding_then_pruning(
            counts in prop::collection::btree_map(0u16..500, 1u64..50, 0..300),
            capacity in 1usize..40,
        ) {
            let items: Vec<(u64, Vec<u8>)> =
                counts.iter().map(|(item, &count)| (count, item.to_le_bytes().to_vec())).collect();
            let mut added = TopSketch::default();
            for (count, item) in &items {
                added.add(item, *count);
            }
            added.prune(capacity);
            let built = TopSketch::from_distinct(items.iter().map(|(c, i)| (*c, i.as_slice())).collect(), capacity);
            prop_assert_eq!(built, added);
        }
    }

    #[test]
    fn a_sketch_with_room_is_exact() {
        let mut sketch = TopSketch::default();
        sketch.add(b"a", 3);
        sketch.add(b"b", 1);
        sketch.add(b"a", 1);
        sketch.prune(2);
        assert_eq!((sketch.lower_bound(b"a"), sketch.lower_bound(b"b"), sketch.offset()), (4, 1, 0));
        assert!(TopSketch::decode(&[1, 2, 3]).is_err());
    }
}
