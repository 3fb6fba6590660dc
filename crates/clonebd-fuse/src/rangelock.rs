//! A lock over byte ranges: writers of overlapping ranges take turns, writers of disjoint
//! ranges run in parallel.
//!
//! Every write through the file holds the range of whole logical blocks it touches while
//! it runs. That is what makes a read-modify-write of a partial block safe: no other write
//! to that block can land between its read and its write, so two concurrent unaligned
//! writes to one block cannot lose either's bytes, and neither can an aligned write racing
//! an unaligned one. The cost on the aligned path is one uncontended mutex round trip.

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct Held {
    /// Ranges held now, `[start, end)`.
    ranges: Vec<(u64, u64)>,
    /// Threads waiting for a range; the last holder wakes them only if there are any.
    waiters: usize,
}

/// Byte ranges held by writers.
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<Held>,
    freed: Condvar,
}

/// A held range, released on drop.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

fn lock(m: &Mutex<Held>) -> MutexGuard<'_, Held> {
    // The state is a plain list, valid even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RangeLock {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut h = lock(&self.held);
        while h.ranges.iter().any(|&(s, e)| s < end && start < e) {
            h.waiters += 1;
            h = self.freed.wait(h).unwrap_or_else(|p| p.into_inner());
            h.waiters -= 1;
        }
        h.ranges.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        lock(&self.held).ranges.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut h = lock(&self.lock.held);
        if let Some(i) = h.ranges.iter().position(|&r| r == self.range) {
            h.ranges.swap_remove(i);
        }
        let wake = h.waiters > 0;
        drop(h);
        if wake {
            self.lock.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn lock_disjoint_ranges_do_not_wait() {
        let l = RangeLock::default();
        let a = l.lock(0, 512);
        let b = l.lock(512, 1024);
        assert_eq!(l.held(), 2);
        drop(a);
        drop(b);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn lock_overlapping_range_waits_for_release() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 4096);
        let got = Arc::new(AtomicBool::new(false));
        let (l2, got2) = (Arc::clone(&l), Arc::clone(&got));
        let t = std::thread::spawn(move || {
            let _g = l2.lock(4095, 4097);
            got2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !got.load(Ordering::SeqCst),
            "an overlapping range was granted"
        );
        drop(g);
        t.join().expect("waiter");
        assert!(got.load(Ordering::SeqCst));
        assert_eq!(l.held(), 0);
    }
}
