//! A remote source's state and counters, shared by its requests and read by `status`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use clonebd_core::histogram::{Histogram, HistogramSnapshot};

/// Where a remote source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// The last request succeeded.
    Connected,
    /// A request is being retried.
    Retrying,
    /// The last request gave up (the source is unreachable or refuses); later requests try
    /// again.
    Failed,
    /// The source is not the one the clone began with; every read fails from now on.
    Changed,
}

impl SourceState {
    /// The state's name in `status --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Connected => "connected",
            SourceState::Retrying => "retrying",
            SourceState::Failed => "failed",
            SourceState::Changed => "changed",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => SourceState::Retrying,
            2 => SourceState::Failed,
            3 => SourceState::Changed,
            _ => SourceState::Connected,
        }
    }
}

/// Counters and state of one remote source. Updated with atomic operations on the request
/// path; the last error takes a lock only when there is an error.
#[derive(Debug)]
pub struct SourceStats {
    uri: String,
    state: AtomicU8,
    requests: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    latency: Histogram,
}

/// A snapshot of [`SourceStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    /// The URI, without credentials.
    pub uri: String,
    /// The state.
    pub state: SourceState,
    /// Requests made (each retry counts once more).
    pub requests: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Requests that failed for good.
    pub errors: u64,
    /// The last failure, in words.
    pub last_error: Option<String>,
}

impl SourceStats {
    /// Fresh counters for the source shown as `uri`.
    pub fn new(uri: String) -> Self {
        Self {
            uri,
            state: AtomicU8::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            latency: Histogram::default(),
        }
    }

    /// The URI, without credentials.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The state now.
    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state; `Changed` is final.
    pub fn set_state(&self, s: SourceState) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != 3).then_some(s as u8)
            });
    }

    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// One request (one attempt) took `d`, whatever its outcome.
    pub(crate) fn took(&self, d: Duration) {
        self.latency.observe(d);
    }

    /// The latency of the requests (each attempt on its own).
    pub fn latency(&self) -> HistogramSnapshot {
        self.latency.snapshot()
    }

    pub(crate) fn retry(&self, why: &str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.set_state(SourceState::Retrying);
        self.note(why);
    }

    pub(crate) fn failed(&self, why: &str, state: SourceState) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.set_state(state);
        self.note(why);
    }

    fn note(&self, why: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }

    /// A snapshot.
    pub fn report(&self) -> SourceReport {
        SourceReport {
            uri: self.uri.clone(),
            state: self.state(),
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}
