//! A latency histogram of fixed buckets kept with relaxed atomic adds: recording takes no
//! lock and allocates nothing, so the I/O paths that record (client requests, commits,
//! requests to a remote source) pay a few uncontended atomic instructions. Read at scrape
//! time by the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds: 10 us to 10 s, about three per decade.
pub const LATENCY_BOUNDS: [f64; 19] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
];

const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram of fixed buckets ([`LATENCY_BOUNDS`], and one past the last).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 20],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// What a histogram held when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// The sum of the observations, in seconds.
    pub sum_seconds: f64,
    /// How many observations.
    pub count: u64,
    /// Per bucket (not cumulative): its upper bound in seconds (the last is infinity) and
    /// how many observations fell in it.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The histogram now (each field read on its own: a scrape may see an observation in
    /// one and not yet in another, which Prometheus tolerates).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY),
                    b.load(Ordering::Relaxed),
                )
            })
            .collect();
        HistogramSnapshot {
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(11));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), 20);
        assert_eq!(s.buckets[0], (10e-6, 2), "5 us and 10 us are <= 10 us");
        assert_eq!(s.buckets[1], (25e-6, 1));
        assert_eq!(s.buckets[19], (f64::INFINITY, 1));
        assert!(
            (s.sum_seconds - 60.000026).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }
}
