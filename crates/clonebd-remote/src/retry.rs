//! The one place that decides how a remote source waits, retries and gives up.
//!
//! Every request to a remote source (an HTTP range, an S3 range, an NBD read) goes through
//! [`Policy::run`], by way of `request`, which also keeps the source's counters and state
//! the same way for every protocol: each attempt has a timeout of its own (set on the
//! connection, and never past the request's deadline), failures the network is known to heal (a reset or refused connection, a timeout, HTTP 5xx, 429
//! and 503 "SlowDown", with `Retry-After` honoured) are retried with exponential back-off
//! and full jitter, and the whole request gives up once `--source-timeout` has passed, so a
//! cold read never hangs: it fails with EIO, and the engine's own back-off retries a
//! background copy later, which is how hydration pauses while a source is away and resumes
//! when it comes back. A failure that retrying cannot heal (the source changed, a 403,
//! a 404) ends the request at once.

use std::time::{Duration, Instant};

use crate::stats::{SourceState, SourceStats};

/// How one attempt ended, as the policy sees it.
#[derive(Debug)]
pub enum Attempt<T, E> {
    /// Done.
    Done(T),
    /// Failed in a way that may heal: retry, no sooner than `after` if the server said so.
    Transient {
        /// The failure.
        error: E,
        /// The server's `Retry-After`, if it gave one.
        after: Option<Duration>,
    },
    /// Failed for good.
    Fatal(E),
}

/// Waiting and retrying rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The longest a request may take, all attempts and waits included.
    pub deadline: Duration,
    /// The first back-off.
    pub base: Duration,
    /// The longest back-off.
    pub max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(60),
            base: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

/// Why [`Policy::run`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The deadline passed; the last transient failure.
    TimedOut {
        /// The last failure.
        last: E,
        /// Attempts made.
        attempts: u32,
    },
    /// A failure that retrying cannot heal.
    Fatal(E),
}

impl Policy {
    /// The back-off before attempt `n + 1` (n >= 1 attempts made): full jitter over
    /// `base * 2^(n-1)`, capped at `max`. `seed` varies it between callers.
    pub fn backoff(&self, n: u32, seed: u64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(20))
            .min(self.max);
        let nanos = u64::try_from(exp.as_nanos()).unwrap_or(u64::MAX).max(1);
        Duration::from_nanos(jitter(seed, n) % nanos + 1)
    }

    /// Runs `attempt` (given the attempt number, from 1, and the time left) until it is done,
    /// fails for good, or the deadline passes. `on_retry` is told of each transient failure
    /// before the wait.
    pub fn run<T, E>(
        &self,
        mut attempt: impl FnMut(u32, Duration) -> Attempt<T, E>,
        mut on_retry: impl FnMut(&E, Duration),
    ) -> Result<T, GaveUp<E>> {
        let start = Instant::now();
        let seed = seed_of(&start);
        let mut n = 0u32;
        loop {
            n += 1;
            let left = self.deadline.saturating_sub(start.elapsed());
            match attempt(n, left.max(Duration::from_millis(1))) {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fatal(e) => return Err(GaveUp::Fatal(e)),
                Attempt::Transient { error, after } => {
                    let wait = after
                        .unwrap_or_else(|| self.backoff(n, seed))
                        .min(self.max.max(after.unwrap_or_default()));
                    let elapsed = start.elapsed();
                    if elapsed + wait >= self.deadline {
                        return Err(GaveUp::TimedOut {
                            last: error,
                            attempts: n,
                        });
                    }
                    on_retry(&error, wait);
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

/// One failed attempt of a request to a remote source, as every protocol reports it.
#[derive(Debug)]
pub(crate) enum Failure {
    /// May heal (with the server's `Retry-After`, if any).
    Transient(String, Option<Duration>),
    /// Cannot heal; the source is reachable.
    Fatal(String),
    /// The source is not the pinned one.
    Changed(String),
}

impl Failure {
    /// A TLS error under an I/O error (rustls's, however the transport wrapped it): fatal,
    /// since a certificate that does not verify does not heal by trying again. `None` for
    /// any other I/O error.
    pub(crate) fn of_tls(io: &std::io::Error) -> Option<Failure> {
        let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
        let why = tls.to_string();
        Some(Failure::Fatal(if why.contains("certificate") {
            format!("TLS: {why} (give the CA that signed it with --source-tls-ca)")
        } else {
            format!("TLS: {why}")
        }))
    }

    pub(crate) fn describe(&self) -> &str {
        match self {
            Failure::Transient(s, _) | Failure::Fatal(s) | Failure::Changed(s) => s,
        }
    }
}

/// Runs one request to a remote source under `policy`, keeping `stats`: every attempt
/// counts (and is timed, whatever its outcome), each transient failure is logged and counted as a retry, and the outcome sets the
/// state (connected, failed, or changed for good). The error is in words, for the caller to
/// put after the source's URI. A source marked changed is not asked again. `f` is given what
/// is left of the deadline, to bound its own waits by.
pub(crate) fn request<T>(
    policy: &Policy,
    stats: &SourceStats,
    mut f: impl FnMut(Duration) -> Result<T, Failure>,
) -> Result<T, String> {
    if stats.state() == SourceState::Changed {
        return Err("changed since the clone began; no more reads are made from it".to_string());
    }
    let r = policy.run(
        |_, left| {
            stats.request();
            let t = Instant::now();
            let r = f(left);
            stats.took(t.elapsed());
            match r {
                Ok(v) => Attempt::Done(v),
                Err(Failure::Transient(e, after)) => Attempt::Transient {
                    error: Failure::Transient(e, after),
                    after,
                },
                Err(e) => Attempt::Fatal(e),
            }
        },
        |e, wait| {
            let why = e.describe();
            tracing::warn!(source = stats.uri(), "retrying in {wait:?}: {why}");
            stats.retry(why);
        },
    );
    match r {
        Ok(v) => {
            if stats.state() != SourceState::Connected {
                stats.set_state(SourceState::Connected);
            }
            Ok(v)
        }
        Err(GaveUp::TimedOut { last, attempts }) => {
            let why = format!(
                "unreachable: {} (gave up after {attempts} attempts in {:?})",
                last.describe(),
                policy.deadline
            );
            stats.failed(&why, SourceState::Failed);
            Err(why)
        }
        Err(GaveUp::Fatal(Failure::Changed(why))) => {
            let why = format!(
                "changed since the clone began ({why}); hydration stops, hydrated regions keep serving"
            );
            tracing::error!(source = stats.uri(), "{why}");
            stats.failed(&why, SourceState::Changed);
            Err(why)
        }
        Err(GaveUp::Fatal(f)) => {
            let why = f.describe().to_string();
            stats.failed(&why, SourceState::Failed);
            Err(why)
        }
    }
}

fn seed_of(start: &Instant) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(start.elapsed().as_nanos() as u64);
    h.finish()
}

/// A pseudo-random value for attempt `n` (splitmix64): jitter needs spread, not secrecy.
fn jitter(seed: u64, n: u32) -> u64 {
    let mut z = seed.wrapping_add(u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `Retry-After` in seconds (the HTTP-date form is treated as absent).
pub fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_below_it() {
        let p = Policy {
            deadline: Duration::from_secs(10),
            base: Duration::from_millis(10),
            max: Duration::from_millis(80),
        };
        for n in 1..12 {
            let cap = Duration::from_millis(10 * (1 << (n - 1).min(3)));
            for seed in 0..50 {
                let b = p.backoff(n, seed);
                assert!(b > Duration::ZERO && b <= cap, "n={n} {b:?} > {cap:?}");
            }
        }
    }

    #[test]
    fn transient_failures_are_retried_fatal_ones_are_not_and_the_deadline_holds() {
        let p = Policy {
            deadline: Duration::from_millis(300),
            base: Duration::from_millis(1),
            max: Duration::from_millis(5),
        };
        let mut retries = 0;
        let r: Result<u32, GaveUp<&str>> = p.run(
            |n, _| {
                if n < 4 {
                    Attempt::Transient {
                        error: "reset",
                        after: None,
                    }
                } else {
                    Attempt::Done(n)
                }
            },
            |_, _| retries += 1,
        );
        assert_eq!(r.ok(), Some(4));
        assert_eq!(retries, 3);
        let r: Result<(), GaveUp<&str>> = p.run(|_, _| Attempt::Fatal("404"), |_, _| {});
        assert!(matches!(r, Err(GaveUp::Fatal("404"))));
        let t = Instant::now();
        let r: Result<(), GaveUp<&str>> = p.run(
            |_, _| Attempt::Transient {
                error: "down",
                after: None,
            },
            |_, _| {},
        );
        assert!(matches!(r, Err(GaveUp::TimedOut { last: "down", .. })));
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
