//! The copy window: how many bytes of background copies may be in flight while clients are
//! active, steered by the foreground latency the driver reports (issue "foreground I/O
//! first, by a latency target").
//!
//! It works the way a delay-based congestion window does (LEDBAT, RFC 6817): the idle level
//! of foreground latency is the lowest smoothed latency over the last minute (a
//! minimum filter, [`BASE_BUCKETS`] buckets of [`BASE_BUCKET`] each, so it follows a device
//! that gets slower or faster); the latency target is that level times the priority's ratio
//! ([`HydrationPriority::target_percent`]). Each time a smoothed latency above the target is
//! reported the window halves (at most once per [`ADJUST_PERIOD`]); each period in which it
//! is at or below the target the window grows by one piece. While clients are active copies
//! are also split into pieces of [`HydrationPriority::piece_bytes`], so one foreground
//! request waits behind a small copy I/O at worst rather than a large one.
//!
//! What it assumes and guarantees:
//! - the latency comes in as an input, with the time ([`CopyWindow::observe`]); the window
//!   reads no clock and keeps no reference to anything else of the engine;
//! - with no client active the window does not limit anything: hydration runs at full
//!   speed, up to `hydration_threshold` (only the bytes/s limit, outside this module, still
//!   applies);
//! - it never stops hydration (decision D4): with no background copy in flight one copy is
//!   always allowed, whatever the latency, and the window never goes below one region.

use super::{MS, SECOND, Tick};

/// How background hydration and client I/O trade (`--hydration-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HydrationPriority {
    /// Clients first: copies yield as soon as foreground latency rises 10 % above its idle
    /// level, and run in 64 KiB pieces while clients are active.
    Background,
    /// The default: copies yield when foreground latency rises 30 % above its idle level,
    /// and run in 256 KiB pieces while clients are active.
    #[default]
    Balanced,
    /// Hydration first: copies keep their full size and yield only when foreground latency
    /// doubles; one full copy always stays in flight (at worst, the behaviour before the
    /// window).
    Hydration,
}

impl HydrationPriority {
    /// Every setting, in the order of the command line's help.
    pub const ALL: [HydrationPriority; 3] = [
        HydrationPriority::Background,
        HydrationPriority::Balanced,
        HydrationPriority::Hydration,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HydrationPriority::Background => "background",
            HydrationPriority::Balanced => "balanced",
            HydrationPriority::Hydration => "hydration",
        }
    }

    /// The setting called `name` on the command line, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The latency target, in percent of the idle level.
    pub fn target_percent(self) -> u64 {
        match self {
            HydrationPriority::Background => 110,
            HydrationPriority::Balanced => 130,
            HydrationPriority::Hydration => 200,
        }
    }

    /// The largest background copy while clients are active, in bytes (`u64::MAX`: not
    /// split). A region larger than this is still copied whole. Smaller pieces cost more than
    /// they save: each is a source read and a destination write of its own, and at 4 to
    /// 16 KiB the copies' I/O count cut QD32 client IOPS to a third to two thirds of idle.
    pub fn piece_bytes(self) -> u64 {
        match self {
            HydrationPriority::Background => 64 << 10,
            HydrationPriority::Balanced => 256 << 10,
            HydrationPriority::Hydration => u64::MAX,
        }
    }
}

/// How long one bucket of the idle-level minimum filter lasts.
pub const BASE_BUCKET: Tick = 10 * SECOND;
/// How many buckets the idle level is the minimum of: a minute, long enough that the
/// latency of a window held small under contention is not taken for the idle level.
pub const BASE_BUCKETS: usize = 6;
/// The window changes at most once per this period.
pub const ADJUST_PERIOD: Tick = 10 * MS;
/// Where the window starts, and its smallest growth step when pieces are not split.
const START_BYTES: u64 = 1 << 20;

/// The copy window. See the module documentation.
#[derive(Debug, Clone)]
pub struct CopyWindow {
    priority: HydrationPriority,
    /// Bytes of background copies allowed in flight while clients are active.
    window: u64,
    /// The largest window that made sense when it was last used (the threshold's bytes).
    cap: u64,
    /// Smoothed foreground latency (an exponential average, gain 1/4).
    smoothed: Option<Tick>,
    /// Minimum reported latency per bucket, newest at `bucket`.
    base: [Option<Tick>; BASE_BUCKETS],
    bucket: usize,
    bucket_start: Tick,
    last_change: Tick,
}

impl CopyWindow {
    /// A window for `priority`, before any latency was reported.
    pub fn new(priority: HydrationPriority) -> Self {
        Self {
            priority,
            window: START_BYTES,
            cap: u64::MAX,
            smoothed: None,
            base: [None; BASE_BUCKETS],
            bucket: 0,
            bucket_start: 0,
            last_change: 0,
        }
    }

    /// The priority it follows.
    pub fn priority(&self) -> HydrationPriority {
        self.priority
    }

    /// Bytes of background copies allowed in flight while clients are active.
    pub fn bytes(&self) -> u64 {
        self.window.min(self.cap)
    }

    /// The idle level of foreground latency, once one was reported.
    pub fn idle_latency(&self) -> Option<Tick> {
        self.base.iter().flatten().copied().min()
    }

    /// The smoothed foreground latency, once one was reported.
    pub fn latency(&self) -> Option<Tick> {
        self.smoothed
    }

    /// Foreground requests completed, `requests` of them with a mean latency of `mean`,
    /// reported at `now`: updates the idle level and the smoothed latency, and shrinks or
    /// grows the window.
    pub fn observe(&mut self, now: Tick, mean: Tick, requests: u64) {
        if requests == 0 {
            return;
        }
        let s = match self.smoothed {
            None => mean,
            Some(s) => s - s / 4 + mean / 4,
        };
        self.smoothed = Some(s);
        // The smoothed value, not the report: a report may hold a single request, and the
        // luckiest of those is below the idle mean.
        self.note_base(now, s);
        if now < self.last_change.saturating_add(ADJUST_PERIOD) {
            return;
        }
        let Some(base) = self.idle_latency() else {
            return;
        };
        let target =
            u64::try_from(u128::from(base) * u128::from(self.priority.target_percent()) / 100)
                .unwrap_or(u64::MAX);
        self.last_change = now;
        if s > target {
            self.window = (self.window / 2).max(1);
        } else if self.window < self.cap {
            let step = self.priority.piece_bytes().min(START_BYTES);
            self.window = self.window.saturating_add(step).min(self.cap);
        }
    }

    /// Adds a smoothed latency to the current bucket of the idle-level filter, first moving on
    /// to a new bucket (and forgetting the oldest) for each [`BASE_BUCKET`] that passed.
    fn note_base(&mut self, now: Tick, mean: Tick) {
        let passed = now.saturating_sub(self.bucket_start) / BASE_BUCKET;
        if passed > 0 {
            for _ in 0..passed.min(BASE_BUCKETS as u64) {
                self.bucket = (self.bucket + 1) % BASE_BUCKETS;
                self.base[self.bucket] = None;
            }
            self.bucket_start = now;
        }
        let b = &mut self.base[self.bucket];
        *b = Some(b.map_or(mean, |x| x.min(mean)));
    }

    /// Whether the next background copy may start, and how large it may be: the most bytes
    /// it may cover (at least one region), or `None` to wait for a copy in flight.
    ///
    /// `busy`: clients are active; `jobs` and `in_flight`: background copies in flight and
    /// the bytes they cover; `cap`: the bytes `hydration_threshold` allows in flight;
    /// `region`: the bytes of one region.
    pub fn allow(
        &mut self,
        busy: bool,
        jobs: u64,
        in_flight: u64,
        cap: u64,
        region: u64,
    ) -> Option<u64> {
        self.cap = cap.max(region);
        self.window = self.window.min(self.cap);
        if !busy {
            return Some(u64::MAX);
        }
        let piece = self.priority.piece_bytes().max(region);
        if jobs == 0 {
            // Progress whatever the latency (D4): one copy of a piece (at least one region),
            // or as large as the window when pieces are not split.
            let floor = if piece == u64::MAX { region } else { piece };
            return Some(piece.min(self.bytes().max(floor)));
        }
        let room = self.bytes().saturating_sub(in_flight);
        if room < region {
            return None;
        }
        Some(room.min(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Tick = 1_000;
    const REGION: u64 = 4096;
    const CAP: u64 = 8 << 20;

    /// Reports `mean` every adjust period for `periods` periods from `from`; returns the
    /// time after the last.
    fn feed(w: &mut CopyWindow, from: Tick, periods: u64, mean: Tick) -> Tick {
        let mut t = from;
        for _ in 0..periods {
            t += ADJUST_PERIOD;
            w.observe(t, mean, 10);
        }
        t
    }

    fn idle_then(priority: HydrationPriority) -> (CopyWindow, Tick) {
        let mut w = CopyWindow::new(priority);
        w.allow(true, 1, 0, CAP, REGION);
        let t = feed(&mut w, 0, 50, 100 * US);
        (w, t)
    }

    #[test]
    fn window_shrinks_when_latency_rises_above_the_target() {
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let before = w.bytes();
        feed(&mut w, t, 20, 300 * US);
        assert!(w.bytes() < before / 16, "{} -> {}", before, w.bytes());
        assert_eq!(w.idle_latency(), Some(100 * US));
    }

    #[test]
    fn window_grows_back_when_latency_falls() {
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let t = feed(&mut w, t, 40, 300 * US);
        let low = w.bytes();
        feed(&mut w, t, 200, 100 * US);
        assert!(w.bytes() > low, "{low} -> {}", w.bytes());
        assert_eq!(w.bytes(), CAP);
    }

    #[test]
    fn window_ignores_latency_within_the_target() {
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let before = w.bytes();
        feed(&mut w, t, 50, 120 * US);
        assert!(w.bytes() >= before);
    }

    #[test]
    fn window_never_stops_progress_d4() {
        let (mut w, t) = idle_then(HydrationPriority::Background);
        feed(&mut w, t, 1000, 10_000 * US);
        assert!(w.bytes() < REGION);
        // One piece stays allowed, never less, however high the latency.
        assert_eq!(w.allow(true, 0, 0, CAP, REGION), Some(64 << 10));
        assert_eq!(w.allow(true, 1, REGION, CAP, REGION), None);
    }

    #[test]
    fn window_does_not_limit_an_idle_volume() {
        let (mut w, t) = idle_then(HydrationPriority::Background);
        feed(&mut w, t, 100, 10_000 * US);
        assert_eq!(w.allow(false, 100, CAP, CAP, REGION), Some(u64::MAX));
    }

    #[test]
    fn window_splits_copies_while_clients_are_active() {
        let (mut w, _) = idle_then(HydrationPriority::Balanced);
        assert_eq!(w.allow(true, 1, 0, CAP, REGION), Some(256 << 10));
        assert_eq!(w.allow(true, 0, 0, CAP, 1 << 20), Some(1 << 20));
    }

    #[test]
    fn window_idle_level_follows_a_slower_device() {
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let later = t + BASE_BUCKET * (BASE_BUCKETS as u64 + 1);
        feed(&mut w, later, 100, 400 * US);
        // The old level is forgotten; the new one is reached as the smoothing settles.
        let idle = w.idle_latency().unwrap_or(0);
        assert!(idle > 150 * US && idle <= 400 * US, "{idle}");
    }

    #[test]
    fn priorities_yield_at_their_documented_targets() {
        // 150 % of the idle level: past balanced's and background's targets, within
        // hydration's.
        let shrunk = |p| {
            let (mut w, t) = idle_then(p);
            let before = w.bytes();
            feed(&mut w, t, 20, 150 * US);
            w.bytes() < before
        };
        assert!(shrunk(HydrationPriority::Background));
        assert!(shrunk(HydrationPriority::Balanced));
        assert!(!shrunk(HydrationPriority::Hydration));
        // 120 %: only background yields.
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let before = w.bytes();
        feed(&mut w, t, 20, 120 * US);
        assert!(w.bytes() >= before);
        let (mut w, t) = idle_then(HydrationPriority::Background);
        let before = w.bytes();
        feed(&mut w, t, 20, 120 * US);
        assert!(w.bytes() < before);
    }

    #[test]
    fn hydration_priority_keeps_one_full_copy_in_flight() {
        let (mut w, t) = idle_then(HydrationPriority::Hydration);
        feed(&mut w, t, 100, 10_000 * US);
        assert_eq!(w.allow(true, 0, 0, CAP, 1 << 20), Some(1 << 20));
        assert_eq!(w.allow(true, 1, 1 << 20, CAP, 1 << 20), None);
    }

    #[test]
    fn priority_names_round_trip() {
        for p in HydrationPriority::ALL {
            assert_eq!(HydrationPriority::from_name(p.name()), Some(p));
        }
        assert_eq!(HydrationPriority::from_name("fast"), None);
        assert_eq!(HydrationPriority::default(), HydrationPriority::Balanced);
    }
}
