//! Reusable payload buffers and the worker pool that runs requests.
//!
//! [`BufferPool`] hands out buffers in power-of-two size classes from 4 KiB to 32 MiB and takes
//! them back when a [`Buf`] is dropped, so the request path allocates only when the pool is
//! empty. It keeps a bounded number of buffers per class, and at most
//! [`RETAIN_BYTES_TOTAL`] in all: the memory budget bounds the buffers in use, this bounds
//! those kept idle. Every buffer starts on a 4 KiB
//! boundary ([`ALIGN`]), so that a backend whose devices are opened with `O_DIRECT` can hand
//! aligned requests straight to them instead of falling back to buffered I/O. [`JobQueue`] is the shared queue the
//! worker threads take jobs from; its lock is held only to push or pop, never across I/O.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use clonebd_io::uring::IoBuf;

const MIN_CLASS_SHIFT: u32 = 12;
const MAX_CLASS_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Bytes kept per size class when buffers come back.
const RETAIN_BYTES_PER_CLASS: usize = 64 << 20;
/// Buffers kept per size class, whatever their size.
const RETAIN_COUNT_PER_CLASS: usize = 256;
/// Bytes kept in all classes together.
pub(crate) const RETAIN_BYTES_TOTAL: usize = 128 << 20;
/// Where every buffer starts: a multiple of the largest logical block size devices use.
pub(crate) const ALIGN: usize = clonebd_io::uring::ALIGN;

/// Size-classed free lists of buffers.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    classes: [Mutex<Vec<IoBuf>>; CLASSES],
    /// Bytes of the buffers kept in `classes`.
    retained: AtomicUsize,
}

fn class_of(len: usize) -> Option<usize> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_CLASS_SHIFT);
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

impl BufferPool {
    /// A buffer of exactly `len` usable bytes (contents unspecified).
    pub(crate) fn get(self: &Arc<Self>, len: usize) -> Buf {
        let Some(class) = class_of(len) else {
            return Buf {
                io: IoBuf::new(len),
                pool: None,
            };
        };
        let cached = self.classes[class]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(io) = &cached {
            self.retained.fetch_sub(io.capacity(), Ordering::Relaxed);
        }
        let mut io = cached.unwrap_or_else(|| IoBuf::new(1 << (class as u32 + MIN_CLASS_SHIFT)));
        io.set_len(len);
        Buf {
            io,
            pool: Some(Arc::clone(self)),
        }
    }

    /// A buffer that was lent out as an [`IoBuf`] (see [`Buf::into_io`]), back under the
    /// pool's care.
    pub(crate) fn wrap(self: &Arc<Self>, io: IoBuf) -> Buf {
        Buf {
            io,
            pool: Some(Arc::clone(self)),
        }
    }

    /// Take a buffer back.
    pub(crate) fn put(&self, mut io: IoBuf) {
        let size = io.capacity();
        let Some(class) = class_of(size) else {
            return;
        };
        if size != 1 << (class as u32 + MIN_CLASS_SHIFT) {
            return;
        }
        io.set_len(size);
        let limit = (RETAIN_BYTES_PER_CLASS / size).clamp(1, RETAIN_COUNT_PER_CLASS);
        // Claim the room first, so that racing puts never keep more than the total.
        if self.retained.fetch_add(size, Ordering::Relaxed) + size > RETAIN_BYTES_TOTAL {
            self.retained.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        let mut free = self.classes[class]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if free.len() < limit {
            free.push(io);
        } else {
            drop(free);
            self.retained.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

/// A buffer on loan from a [`BufferPool`]; returns itself on drop.
#[derive(Debug)]
pub(crate) struct Buf {
    io: IoBuf,
    pool: Option<Arc<BufferPool>>,
}

impl Buf {
    pub(crate) fn as_slice(&self) -> &[u8] {
        self.io.as_slice()
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        self.io.as_mut_slice()
    }

    /// The buffer itself, to lend to the kernel; give it back with [`BufferPool::put`] or
    /// [`BufferPool::wrap`].
    pub(crate) fn into_io(mut self) -> IoBuf {
        self.pool = None;
        std::mem::replace(&mut self.io, IoBuf::empty())
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put(std::mem::replace(&mut self.io, IoBuf::empty()));
        }
    }
}

/// A multi-consumer job queue for the worker threads.
#[derive(Debug)]
pub(crate) struct JobQueue<J> {
    state: Mutex<QueueState<J>>,
    ready: Condvar,
}

#[derive(Debug)]
struct QueueState<J> {
    jobs: VecDeque<J>,
    closed: bool,
    /// Workers waiting for a job: a push wakes one only if there is one, since every
    /// notification is a system call.
    idle: usize,
}

impl<J> JobQueue<J> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
                idle: 0,
            }),
            ready: Condvar::new(),
        }
    }

    /// Queue a job; returns it back if the queue is closed.
    pub(crate) fn push(&self, job: J) -> Result<(), J> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return Err(job);
        }
        state.jobs.push_back(job);
        let wake = state.idle > 0;
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Wait for a job; `None` once the queue is closed and empty.
    pub(crate) fn pop(&self) -> Option<J> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state.idle += 1;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.idle -= 1;
        }
    }

    /// Refuse new jobs; workers finish the queued ones and stop.
    pub(crate) fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_within_a_class() {
        let pool = Arc::new(BufferPool::default());
        let ptr = {
            let b = pool.get(5000);
            assert_eq!(b.as_slice().len(), 5000);
            b.as_slice().as_ptr()
        };
        let b = pool.get(8192);
        assert_eq!(b.as_slice().as_ptr(), ptr);
    }

    #[test]
    fn buffers_start_on_a_4k_boundary_in_every_class() {
        let pool = Arc::new(BufferPool::default());
        for len in [
            1,
            512,
            4096,
            5000,
            65536,
            1 << 20,
            32 << 20,
            (32 << 20) + 512,
        ] {
            let mut b = pool.get(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_mut_slice().as_ptr().addr() % ALIGN, 0, "len {len}");
        }
        // And again once they come back from the free lists.
        let b = pool.get(4096);
        assert_eq!(b.as_slice().as_ptr().addr() % ALIGN, 0);
    }

    #[test]
    fn idle_buffers_are_kept_up_to_the_total_across_classes() {
        let pool = Arc::new(BufferPool::default());
        // 64 MiB in each of three classes would be 192 MiB; the total keeps 128 MiB.
        let held: Vec<Buf> = [32 << 20, 16 << 20, 8 << 20]
            .iter()
            .flat_map(|&len| {
                let n = (RETAIN_BYTES_PER_CLASS / len).min(8);
                (0..n).map(|_| pool.get(len)).collect::<Vec<_>>()
            })
            .collect();
        drop(held);
        assert_eq!(pool.retained.load(Ordering::Relaxed), RETAIN_BYTES_TOTAL);
        let kept: usize = pool
            .classes
            .iter()
            .map(|c| c.lock().unwrap().iter().map(IoBuf::capacity).sum::<usize>())
            .sum();
        assert_eq!(kept, RETAIN_BYTES_TOTAL);
        // Taking one out makes room again.
        let b = pool.get(32 << 20);
        assert_eq!(
            pool.retained.load(Ordering::Relaxed),
            RETAIN_BYTES_TOTAL - (32 << 20)
        );
        drop(b);
        assert_eq!(pool.retained.load(Ordering::Relaxed), RETAIN_BYTES_TOTAL);
    }

    #[test]
    fn oversized_buffers_are_not_pooled() {
        let pool = Arc::new(BufferPool::default());
        let b = pool.get((32 << 20) + 1);
        assert!(b.pool.is_none());
    }

    #[test]
    fn closed_queue_drains_then_stops() {
        let q = JobQueue::new();
        q.push(1).unwrap();
        q.close();
        assert_eq!(q.push(2), Err(2));
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), None);
    }
}
