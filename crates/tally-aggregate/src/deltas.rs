//! Counter deltas: what a partition counted since its last flush, per (type, video, minute).

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use tally_core::Counter;
use tally_core::hll::Hll;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteCell {
    /// Epoch minute.
    pub minute: i64,
    pub counter: Counter,
}

/// Deltas keyed by `type 0xFF video` (0xFF never occurs in UTF-8, so the split is
/// unambiguous). Each key holds its few minutes in a small vector: between two flushes a
/// video is seen in one or two minutes, rarely more.
#[derive(Default)]
pub struct Deltas {
    cells_by_key: HashMap<Box<[u8]>, Vec<MinuteCell>>,
    cells: usize,
    /// Distinct-viewer sketches per (type 0xFF video, minute), only for events that carry
    /// a viewer id.
    viewers: HashMap<(Box<[u8]>, i64), Hll>,
    /// The distinct event types held; few, so a list.
    types: Vec<Box<str>>,
    key_scratch: Vec<u8>,
}

const KEY_SEPARATOR: u8 = 0xFF;

fn build_key(scratch: &mut Vec<u8>, event_type: &str, video_id: &str) {
    scratch.clear();
    scratch.extend_from_slice(event_type.as_bytes());
    scratch.push(KEY_SEPARATOR);
    scratch.extend_from_slice(video_id.as_bytes());
}

/// Looks up a viewer sketch without allocating a key; hashes like `(Box<[u8]>, i64)`.
#[derive(Hash)]
struct ViewerKeyRef<'a>(&'a [u8], i64);

impl hashbrown::Equivalent<(Box<[u8]>, i64)> for ViewerKeyRef<'_> {
    fn equivalent(&self, key: &(Box<[u8]>, i64)) -> bool {
        *self.0 == *key.0 && self.1 == key.1
    }
}

fn split_key(key: &[u8]) -> (&str, &str) {
    let split = key.iter().position(|&b| b == KEY_SEPARATOR).expect("separator in key");
    let event_type = std::str::from_utf8(&key[..split]).expect("utf-8 type");
    let video_id = std::str::from_utf8(&key[split + 1..]).expect("utf-8 video");
    (event_type, video_id)
}

impl Deltas {
    pub fn add(&mut self, event_type: &str, video_id: &str, minute: i64, value: i64, viewer_id: Option<&str>) {
        if !self.types.iter().any(|known| **known == *event_type) {
            self.types.push(Box::from(event_type));
        }
        build_key(&mut self.key_scratch, event_type, video_id);
        if let Some(viewer_id) = viewer_id {
            match self.viewers.get_mut(&ViewerKeyRef(&self.key_scratch, minute)) {
                Some(sketch) => sketch.insert(viewer_id.as_bytes()),
                None => {
                    let mut sketch = Hll::default();
                    sketch.insert(viewer_id.as_bytes());
                    self.viewers.insert((Box::from(&self.key_scratch[..]), minute), sketch);
                }
            }
        }
        // One hash lookup; the key is allocated only when new. Most keys see one minute
        // between flushes: room for exactly one cell, where a plain push would reserve four.
        let cells = match self.cells_by_key.entry_ref(&self.key_scratch[..]) {
            EntryRef::Occupied(cells) => cells.into_mut(),
            EntryRef::Vacant(vacant) => vacant.insert_with_key(Box::from(&self.key_scratch[..]), Vec::with_capacity(1)),
        };
        let one = Counter { count: 1, sum: i128::from(value) };
        match cells.iter_mut().find(|c| c.minute == minute) {
            Some(cell) => cell.counter.add(one),
            None => {
                cells.push(MinuteCell { minute, counter: one });
                self.cells += 1;
            }
        }
    }

    /// The minutes of one (type, video), in no particular order.
    pub fn get(&self, event_type: &str, video_id: &str) -> &[MinuteCell] {
        let mut key = Vec::with_capacity(event_type.len() + 1 + video_id.len());
        build_key(&mut key, event_type, video_id);
        self.cells_by_key.get(&key[..]).map_or(&[], Vec::as_slice)
    }

    /// Every (type, video, cells), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &[MinuteCell])> {
        self.cells_by_key.iter().map(|(key, cells)| {
            let (event_type, video_id) = split_key(key);
            (event_type, video_id, cells.as_slice())
        })
    }

    /// The distinct-viewer sketch of one (type, video, minute), if any event there had a
    /// viewer id.
    pub fn viewers(&self, event_type: &str, video_id: &str, minute: i64) -> Option<&Hll> {
        let mut key = Vec::with_capacity(event_type.len() + 1 + video_id.len());
        build_key(&mut key, event_type, video_id);
        self.viewers.get(&ViewerKeyRef(&key, minute))
    }

    /// Every (type, video, minute, sketch), in no particular order.
    pub fn iter_viewers(&self) -> impl Iterator<Item = (&str, &str, i64, &Hll)> {
        self.viewers.iter().map(|((key, minute), sketch)| {
            let (event_type, video_id) = split_key(key);
            (event_type, video_id, *minute, sketch)
        })
    }

    /// The distinct event types held.
    pub fn types(&self) -> &[Box<str>] {
        &self.types
    }

    /// Distinct (type, video, minute) cells held.
    pub fn cells(&self) -> usize {
        self.cells
    }
}
