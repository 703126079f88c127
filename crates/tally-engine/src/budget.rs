//! The queue budget: bytes of records accepted but not yet acknowledged. Taken before a
//! request is sent to any partition, returned when its last part is answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) struct QueueBudget {
    used: Arc<AtomicUsize>,
    max: usize,
}

pub(crate) struct Permit {
    used: Arc<AtomicUsize>,
    bytes: usize,
}

impl QueueBudget {
    pub(crate) fn new(max: usize) -> QueueBudget {
        QueueBudget { used: Arc::new(AtomicUsize::new(0)), max }
    }

    /// Takes `bytes` if they fit. A request larger than the whole budget is still admitted
    /// when nothing else is queued, so the body limit, not the budget, bounds request size.
    pub(crate) fn try_take(&self, bytes: usize) -> Option<Permit> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used != 0 && used + bytes > self.max {
                return None;
            }
            match self.used.compare_exchange_weak(used, used + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Permit { used: Arc::clone(&self.used), bytes }),
                Err(now) => used = now,
            }
        }
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}
