//! Counters and latency histograms of a [`crate::Volume`]'s requests and commits, kept with
//! relaxed atomic adds only: recording a request takes no lock and allocates nothing, so
//! the I/O path pays a few uncontended atomic instructions. Read by the metrics endpoint
//! at scrape time (each part's `snapshot`).
//!
//! Every export reaches the volume through its request methods (and the routed writes of
//! [`crate::Volume::route_write`], counted when the route is dropped), so this one place
//! counts NBD, FUSE and ublk requests alike. It is also where the foreground latency that
//! background hydration yields to is taken from ([`IoMetrics::take_foreground_latency`]):
//! the same measurement, no second clock read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::exec::CopyDone;

pub use clonebd_core::histogram::{Histogram, HistogramSnapshot, LATENCY_BOUNDS};

/// A client request's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read.
    Read,
    /// Write (with or without FUA).
    Write,
    /// Flush.
    Flush,
    /// Discard (NBD trim, FUSE punch hole, ublk discard).
    Discard,
    /// Write zeroes.
    WriteZeroes,
    /// Hydrate a range (NBD cache).
    Cache,
}

impl Op {
    /// Every operation, in the order of `IoMetrics::op`.
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::Cache,
    ];

    /// Its name as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The counters of one operation.
#[derive(Debug, Default)]
pub struct OpStats {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

/// What one operation's counters held when read.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSnapshot {
    /// Requests completed.
    pub requests: u64,
    /// Of them, those that failed.
    pub errors: u64,
    /// Bytes the requests covered.
    pub bytes: u64,
    /// Their latency.
    pub latency: HistogramSnapshot,
}

impl OpStats {
    /// The counters now.
    pub fn snapshot(&self) -> OpSnapshot {
        OpSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            latency: self.latency.snapshot(),
        }
    }
}

/// A volume's request and commit counters.
#[derive(Debug, Default)]
pub struct IoMetrics {
    ops: [OpStats; 6],
    commits: AtomicU64,
    commit_errors: AtomicU64,
    commit_latency: Histogram,
    copied_bytes: AtomicU64,
    zeroed_bytes: AtomicU64,
    /// Reads and writes completed, and their latency in nanoseconds, since the volume last
    /// took them for its engine.
    fg_requests: AtomicU64,
    fg_nanos: AtomicU64,
    unread_bytes: AtomicU64,
}

impl IoMetrics {
    /// Records one completed request.
    pub fn request(&self, op: Op, bytes: u64, took: Duration, ok: bool) {
        let s = &self.ops[op.index()];
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.latency.observe(took);
        if matches!(op, Op::Read | Op::Write) {
            let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            self.fg_nanos.fetch_add(ns, Ordering::Relaxed);
            self.fg_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The reads and writes completed since the last call, and their mean latency in
    /// nanoseconds: `(mean, requests)`, for the engine's copy window. A request recorded
    /// while this runs may be counted in this call or the next, but never lost.
    pub fn take_foreground_latency(&self) -> (u64, u64) {
        let n = self.fg_requests.swap(0, Ordering::Relaxed);
        if n == 0 {
            return (0, 0);
        }
        let ns = self.fg_nanos.swap(0, Ordering::Relaxed);
        (ns / n, n)
    }

    /// Records one metadata commit.
    pub fn commit(&self, took: Duration, ok: bool) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.commit_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.commit_latency.observe(took);
    }

    /// Records what a completed copy did (sparse-aware hydration).
    pub fn copy(&self, done: CopyDone) {
        self.copied_bytes.fetch_add(done.copied, Ordering::Relaxed);
        self.zeroed_bytes.fetch_add(done.zeroed, Ordering::Relaxed);
        self.unread_bytes.fetch_add(done.unread, Ordering::Relaxed);
    }

    /// What copies did so far: bytes they read from the source and wrote, bytes they zeroed
    /// instead (holes and zeros of the source), and of those the holes, never read.
    pub fn copies(&self) -> CopyDone {
        CopyDone {
            copied: self.copied_bytes.load(Ordering::Relaxed),
            zeroed: self.zeroed_bytes.load(Ordering::Relaxed),
            unread: self.unread_bytes.load(Ordering::Relaxed),
        }
    }

    /// One operation's counters.
    pub fn op(&self, op: Op) -> &OpStats {
        &self.ops[op.index()]
    }

    /// Commits made, and of them those that failed.
    pub fn commits(&self) -> (u64, u64) {
        (
            self.commits.load(Ordering::Relaxed),
            self.commit_errors.load(Ordering::Relaxed),
        )
    }

    /// The commits' latency.
    pub fn commit_latency(&self) -> HistogramSnapshot {
        self.commit_latency.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_operation() {
        let m = IoMetrics::default();
        m.request(Op::Read, 4096, Duration::from_micros(100), true);
        m.request(Op::Read, 4096, Duration::from_micros(100), false);
        m.request(Op::Flush, 0, Duration::from_millis(2), true);
        let r = m.op(Op::Read).snapshot();
        assert_eq!((r.requests, r.errors, r.bytes), (2, 1, 8192));
        assert_eq!(m.op(Op::Flush).snapshot().requests, 1);
        assert_eq!(m.op(Op::Write).snapshot().requests, 0);
        m.commit(Duration::from_millis(3), true);
        assert_eq!(m.commits(), (1, 0));
    }

    #[test]
    fn foreground_latency_is_the_mean_of_reads_and_writes_since_last_taken() {
        let m = IoMetrics::default();
        m.request(Op::Read, 4096, Duration::from_micros(100), true);
        m.request(Op::Write, 4096, Duration::from_micros(300), true);
        m.request(Op::Flush, 0, Duration::from_millis(20), true);
        assert_eq!(m.take_foreground_latency(), (200_000, 2));
        assert_eq!(m.take_foreground_latency(), (0, 0));
    }
}
