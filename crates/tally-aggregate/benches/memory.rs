//! Bytes of heap per in-memory counter cell and per dedup entry, measured with a counting
//! allocator: `cargo bench -p tally-aggregate --bench memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tally_aggregate::{Dedup, Deltas};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarding the caller's valid layout to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn main() {
    const CELLS: usize = 1_000_000;
    for minutes_per_video in [1usize, 3] {
        let before = live();
        let mut deltas = Deltas::default();
        let videos = CELLS / minutes_per_video;
        for video in 0..videos {
            let video_id = format!("video-{video:08}");
            for minute in 0..minutes_per_video {
                deltas.add("view", &video_id, 29_000_000 + minute as i64, 1, None);
            }
        }
        let bytes = live() - before;
        println!(
            "deltas: {} cells ({} videos x {} minutes, 14-byte ids): {} bytes, {:.1} bytes per cell",
            deltas.cells(),
            videos,
            minutes_per_video,
            bytes,
            bytes as f64 / deltas.cells() as f64
        );
    }
    let before = live();
    let mut dedup = Dedup::new(600_000);
    dedup.advance(0);
    for i in 0..CELLS as u128 {
        dedup.insert_event(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
    }
    let journal = dedup.take_journal();
    let journal_bytes: usize = journal.blobs.iter().map(|(_, b)| b.capacity()).sum();
    let bytes = live() - before - journal_bytes as isize;
    println!(
        "dedup: {} event ids: {} bytes in the table, {:.1} bytes per id (plus {:.1} bytes per id of journal until the next flush)",
        dedup.entries(),
        bytes,
        bytes as f64 / dedup.entries() as f64,
        journal_bytes as f64 / dedup.entries() as f64
    );
}
