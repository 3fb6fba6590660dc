//! The copy window: how many bytes of background copies may be in flight while clients are
//! active, steered by the foreground latency the driver reports (issue "foreground I/O
//! first, by a latency target").
//!
//! It works the way a delay-based congestion window does (LEDBAT, RFC 6817): the idle level
//! of foreground latency is the lowest smoothed latency over the last minute (a
//! minimum filter, [`BASE_BUCKETS`] buckets of [`BASE_BUCKET`] each, so it follows a device
//! that gets slower or faster); the latency target is that level times the priority's ratio
//! ([`HydrationPriority::target_percent`]). Each time a smoothed latency above the target is
//! reported the window halves (at most once per [`HALVING_HOLD`]); each period of
//! [`ADJUST_PERIOD`] in which it
//! is at or below the target the window grows by one piece (by a sixteenth of one while it
//! is below a piece). While clients are active copies are also split into pieces of
//! [`HydrationPriority::piece_bytes`], so one foreground request waits behind a small copy
//! I/O at worst rather than a large one.
//!
//! A window below one piece is kept by pacing, as a congestion window below one packet is:
//! one piece at a time, each started only after a gap after the last one ended, so that the
//! copies keep the device busy for the window's share of a piece (`window / piece` of the
//! time). The gap is the last paced copy's own duration times `piece / window - 1`, at most
//! [`MAX_GAP`].
//!
//! What it assumes and guarantees:
//! - the latency comes in as an input, with the time ([`CopyWindow::observe`]); the window
//!   reads no clock and keeps no reference to anything else of the engine;
//! - with no client active the window does not limit anything: hydration runs at full
//!   speed, up to `hydration_threshold` (only the bytes/s limit, outside this module, still
//!   applies);
//! - it never stops hydration (decision D4): with no background copy in flight one piece is
//!   always allowed, at the latest [`MAX_GAP`] after the last one ended, whatever the
//!   latency; copies pause only for a probe, [`PROBE_LEN`] every [`PROBE_EVERY`] while
//!   clients are active.
//!
//! The idle level is measured by those probes: copies are held back for a moment and the
//! latency clients see then is taken as idle (a window that never shrank could not learn
//! it from latencies seen under copies).

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
/// The window halves at most once per this time: about as long as the smoothed latency
/// takes to show the last halving.
pub const HALVING_HOLD: Tick = 50 * MS;
/// The gain of the latency's exponential average is 1/this. Over reports every 10 ms, 16
/// smooth the noise of single requests enough that the idle level (a minimum) is not far
/// below the idle mean, which would set the target below the latency clients see idle.
const SMOOTHING: u64 = 16;
/// Where the window starts, and its smallest growth step when pieces are not split.
const START_BYTES: u64 = 1 << 20;
/// The longest gap a paced copy waits after the last one ended (D4: progress, at least one
/// piece per gap and copy, whatever the latency).
pub const MAX_GAP: Tick = 50 * MS;

/// How often the idle level is measured while clients are active: a probe, in which no
/// copy starts (the first at the first client activity).
pub const PROBE_EVERY: Tick = 10 * SECOND;
/// How long a probe holds copies back.
pub const PROBE_LEN: Tick = 60 * MS;
/// Reports in the first part of a probe are not taken: copies started before it are still
/// in flight.
pub const PROBE_SETTLE: Tick = 20 * MS;

/// A probe of the idle level in progress.
#[derive(Debug, Clone, Copy)]
struct Probe {
    start: Tick,
    /// Sum of the latencies of the requests reported after the settling time, and their count.
    sum: u128,
    n: u64,
}

/// What [`CopyWindow::allow`] allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// A copy of at most this many bytes (at least one region).
    Bytes(u64),
    /// Nothing until a copy in flight ends.
    Wait,
    /// Nothing before this time: the window is below one piece, and the gap after the last
    /// paced copy runs until then.
    Until(Tick),
}

/// The copy window. See the module documentation.
#[derive(Debug, Clone)]
pub struct CopyWindow {
    priority: HydrationPriority,
    /// Bytes of background copies allowed in flight while clients are active.
    window: u64,
    /// The largest window that made sense when it was last used (the threshold's bytes).
    cap: u64,
    /// Smoothed foreground latency (an exponential average, gain 1/[`SMOOTHING`]).
    smoothed: Option<Tick>,
    /// Minimum reported latency per bucket, newest at `bucket`.
    base: [Option<Tick>; BASE_BUCKETS],
    bucket: usize,
    bucket_start: Tick,
    last_change: Tick,
    last_halving: Tick,
    /// When the paced copy in flight started, if one is.
    paced_since: Option<Tick>,
    /// The earliest start of the next paced copy.
    paced_next: Tick,
    /// The bytes of one region, as last told.
    region: u64,
    probe: Option<Probe>,
    next_probe: Tick,
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
            last_halving: 0,
            paced_since: None,
            paced_next: 0,
            region: 1,
            probe: None,
            next_probe: 0,
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
        self.end_probe(now);
        if let Some(p) = &mut self.probe {
            // No copy starts during a probe: what clients see is the idle level.
            if now >= p.start.saturating_add(PROBE_SETTLE) {
                p.sum += u128::from(mean) * u128::from(requests);
                p.n += requests;
            }
            return;
        }
        let s = match self.smoothed {
            None => mean,
            Some(s) => s - s / SMOOTHING + mean / SMOOTHING,
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
            // The smoothed latency shows a halving only after a while: one per hold.
            if now >= self.last_halving.saturating_add(HALVING_HOLD) {
                self.window = (self.window / 2).max(1);
                self.last_halving = now;
            }
        } else if self.window < self.cap {
            let piece = self.priority.piece_bytes().min(START_BYTES);
            // Below a piece the window sets the pacing's duty: it climbs back gently.
            let step = if self.window < piece {
                (piece / 16).max(1)
            } else {
                piece
            };
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

    /// Whether the next background copy may start at `now`, and how large it may be.
    ///
    /// `busy`: clients are active; `jobs` and `in_flight`: background copies in flight and
    /// the bytes they cover; `cap`: the bytes `hydration_threshold` allows in flight;
    /// `region`: the bytes of one region. A copy allowed while the window is below one
    /// piece is paced: the caller reports its end with [`CopyWindow::copy_ended`].
    pub fn allow(
        &mut self,
        now: Tick,
        busy: bool,
        jobs: u64,
        in_flight: u64,
        cap: u64,
        region: u64,
    ) -> Allow {
        self.cap = cap.max(region);
        self.window = self.window.min(self.cap);
        self.region = region.max(1);
        if !busy {
            self.paced_next = 0;
            return Allow::Bytes(u64::MAX);
        }
        if let Some(until) = self.probing(now) {
            return Allow::Until(until);
        }
        let piece = self.priority.piece_bytes().max(region);
        // The smallest copy: a piece, or one region when pieces are not split.
        let floor = if piece == u64::MAX { region } else { piece };
        if jobs == 0 {
            if self.bytes() >= floor || piece == u64::MAX {
                // One copy whatever the latency (D4), as large as the window allows.
                return Allow::Bytes(piece.min(self.bytes().max(floor)));
            }
            if now < self.paced_next {
                return Allow::Until(self.paced_next);
            }
            self.paced_since = Some(now);
            return Allow::Bytes(floor);
        }
        let room = self.bytes().saturating_sub(in_flight);
        if room < region || self.paced_since.is_some() {
            return Allow::Wait;
        }
        Allow::Bytes(room.min(piece))
    }

    /// Whether copies are held back for a probe of the idle level at `now` (clients are
    /// active), and until when: starts one when it is due, and ends the one that ran out,
    /// taking the mean latency clients saw in it as an idle level (and as the smoothed
    /// latency, which the copies held back brought down too).
    ///
    /// The idle level cannot be learnt from latencies alone while copies run: a window
    /// never small enough to show the idle latency would take the loaded latency for it
    /// and never shrink.
    fn probing(&mut self, now: Tick) -> Option<Tick> {
        self.end_probe(now);
        match self.probe {
            Some(p) => Some(p.start.saturating_add(PROBE_LEN)),
            None if now >= self.next_probe => {
                self.probe = Some(Probe {
                    start: now,
                    sum: 0,
                    n: 0,
                });
                Some(now.saturating_add(PROBE_LEN))
            }
            None => None,
        }
    }

    /// Ends the probe in progress if it ran out by `now`, taking the mean latency reported
    /// in it as an idle level and as the smoothed latency.
    fn end_probe(&mut self, now: Tick) {
        let Some(p) = self.probe else { return };
        if now < p.start.saturating_add(PROBE_LEN) {
            return;
        }
        self.probe = None;
        self.next_probe = now.saturating_add(PROBE_EVERY);
        if let Some(mean) =
            u128::checked_div(p.sum, u128::from(p.n)).and_then(|m| u64::try_from(m).ok())
        {
            self.note_base(now, mean);
            self.smoothed = Some(mean);
        }
    }

    /// When the probe in progress ends, if one is.
    pub fn probe_until(&self) -> Option<Tick> {
        self.probe.map(|p| p.start.saturating_add(PROBE_LEN))
    }

    /// A background copy ended at `now`. If it was paced, the next waits for a gap of its
    /// duration times `piece / window - 1` (at most `MAX_GAP`), so that copies take the
    /// window's share of a piece of the device's time.
    pub fn copy_ended(&mut self, now: Tick) {
        let Some(since) = self.paced_since.take() else {
            return;
        };
        let piece = self.priority.piece_bytes().max(self.region);
        let window = self.bytes().max(1);
        let took = now.saturating_sub(since);
        let gap = if window >= piece {
            0
        } else {
            let g = u128::from(took) * u128::from(piece - window) / u128::from(window);
            u64::try_from(g).unwrap_or(u64::MAX).min(MAX_GAP)
        };
        self.paced_next = now.saturating_add(gap);
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
        w.allow(0, true, 1, 0, CAP, REGION);
        let t = feed(&mut w, 0, 50, 100 * US);
        (w, t)
    }

    #[test]
    fn the_idle_level_is_what_clients_see_while_a_probe_holds_copies_back() {
        let mut w = CopyWindow::new(HydrationPriority::Balanced);
        // The first client activity: a probe, no copy until it ends.
        assert_eq!(w.allow(0, true, 0, 0, CAP, REGION), Allow::Until(PROBE_LEN));
        assert_eq!(w.probe_until(), Some(PROBE_LEN));
        // Copies started before it still run at first: those reports are not taken.
        w.observe(10 * MS, 900 * US, 10);
        for t in (2..6).map(|i| i * 10 * MS) {
            w.observe(t, 100 * US, 10);
        }
        assert_eq!(
            w.allow(PROBE_LEN, true, 0, 0, CAP, REGION),
            Allow::Bytes(256 << 10)
        );
        assert_eq!(w.probe_until(), None);
        assert_eq!(w.idle_latency(), Some(100 * US));
        // Under copies clients see three times that: the window shrinks.
        let before = w.bytes();
        feed(&mut w, PROBE_LEN, 40, 300 * US);
        assert!(w.bytes() < before / 8, "{before} -> {}", w.bytes());
    }

    #[test]
    fn a_window_that_never_saw_the_idle_latency_learns_it_from_the_next_probe() {
        let mut w = CopyWindow::new(HydrationPriority::Balanced);
        // A first probe that saw only loaded latencies (say the device was busy elsewhere).
        assert!(matches!(
            w.allow(0, true, 0, 0, CAP, REGION),
            Allow::Until(_)
        ));
        let t = feed(&mut w, 0, 10, 300 * US);
        assert_eq!(w.idle_latency(), Some(300 * US));
        let t = feed(&mut w, t, 100, 300 * US);
        assert!(w.bytes() >= START_BYTES, "300 us looks idle: {}", w.bytes());
        // The next probe, PROBE_EVERY later, sees 100 us: the window then yields.
        let due = PROBE_LEN + PROBE_EVERY;
        let t = feed(&mut w, t, (due - t) / ADJUST_PERIOD, 300 * US);
        let until = t + PROBE_LEN;
        assert_eq!(w.allow(t, true, 1, 0, CAP, REGION), Allow::Until(until));
        let t = feed(&mut w, t, PROBE_LEN / ADJUST_PERIOD, 100 * US);
        assert!(matches!(
            w.allow(t, true, 1, 0, CAP, REGION),
            Allow::Bytes(_)
        ));
        assert_eq!(w.idle_latency(), Some(100 * US));
        let before = w.bytes();
        feed(&mut w, t, 40, 300 * US);
        assert!(w.bytes() < before / 8, "{before} -> {}", w.bytes());
    }

    #[test]
    fn window_shrinks_when_latency_rises_above_the_target() {
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let before = w.bytes();
        feed(&mut w, t, 40, 300 * US);
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
        let t = feed(&mut w, t, 400, 10_000 * US);
        assert!(w.bytes() < REGION);
        // One piece stays allowed, never less, however high the latency.
        assert_eq!(w.allow(t, true, 0, 0, CAP, REGION), Allow::Bytes(64 << 10));
        assert_eq!(w.allow(t, true, 1, REGION, CAP, REGION), Allow::Wait);
    }

    #[test]
    fn a_window_far_below_a_piece_paces_pieces_at_most_max_gap_apart_d4() {
        let (mut w, t) = idle_then(HydrationPriority::Background);
        let t = feed(&mut w, t, 400, 10_000 * US);
        assert_eq!(w.allow(t, true, 0, 0, CAP, REGION), Allow::Bytes(64 << 10));
        // The paced piece is the only copy.
        assert_eq!(w.allow(t, true, 1, 64 << 10, CAP, REGION), Allow::Wait);
        w.copy_ended(t + MS);
        let next = t + MS + MAX_GAP;
        assert_eq!(
            w.allow(t + 2 * MS, true, 0, 0, CAP, REGION),
            Allow::Until(next)
        );
        assert_eq!(
            w.allow(next, true, 0, 0, CAP, REGION),
            Allow::Bytes(64 << 10)
        );
        // Clients gone: no pacing.
        w.copy_ended(next + MS);
        assert_eq!(
            w.allow(next + 2 * MS, false, 0, 0, CAP, REGION),
            Allow::Bytes(u64::MAX)
        );
        assert_eq!(
            w.allow(next + 2 * MS, true, 0, 0, CAP, REGION),
            Allow::Bytes(64 << 10)
        );
    }

    #[test]
    fn a_paced_gap_gives_copies_the_window_s_share_of_the_time() {
        let (mut w, mut t) = idle_then(HydrationPriority::Background);
        let piece: u64 = 64 << 10;
        while w.bytes() >= piece {
            t = feed(&mut w, t, 1, 300 * US);
        }
        let b = w.bytes();
        assert!(b >= piece / 4, "halved once below a piece: {b}");
        assert_eq!(w.allow(t, true, 0, 0, CAP, REGION), Allow::Bytes(piece));
        // The copy took 2 ms: the gap is 2 ms * (piece - window) / window.
        w.copy_ended(t + 2 * MS);
        let gap = 2 * MS * (piece - b) / b;
        assert!(gap > 0 && gap < MAX_GAP, "{gap}");
        assert_eq!(
            w.allow(t + 2 * MS, true, 0, 0, CAP, REGION),
            Allow::Until(t + 2 * MS + gap)
        );
        // Latency back within the target: the window climbs back over a piece, and copies
        // are no longer paced.
        let t = feed(&mut w, t + 2 * MS + gap, 200, 100 * US);
        assert!(w.bytes() >= piece);
        assert_eq!(w.allow(t, true, 0, 0, CAP, REGION), Allow::Bytes(piece));
        assert_eq!(w.allow(t, true, 1, piece, CAP, REGION), Allow::Bytes(piece));
    }

    #[test]
    fn window_does_not_limit_an_idle_volume() {
        let (mut w, t) = idle_then(HydrationPriority::Background);
        let t = feed(&mut w, t, 100, 10_000 * US);
        assert_eq!(
            w.allow(t, false, 100, CAP, CAP, REGION),
            Allow::Bytes(u64::MAX)
        );
    }

    #[test]
    fn window_splits_copies_while_clients_are_active() {
        let (mut w, _) = idle_then(HydrationPriority::Balanced);
        assert_eq!(w.allow(0, true, 1, 0, CAP, REGION), Allow::Bytes(256 << 10));
        assert_eq!(w.allow(0, true, 0, 0, CAP, 1 << 20), Allow::Bytes(1 << 20));
    }

    #[test]
    fn window_idle_level_follows_a_slower_device() {
        let (mut w, t) = idle_then(HydrationPriority::Balanced);
        let later = t + BASE_BUCKET * (BASE_BUCKETS as u64 + 1);
        let t = feed(&mut w, later, 100, 400 * US);
        // The old level is forgotten at once; the new one is reached once the buckets that
        // saw the smoothing settle have gone too.
        let idle = w.idle_latency().unwrap_or(0);
        assert!(idle > 100 * US && idle <= 400 * US, "{idle}");
        let periods = BASE_BUCKET * (BASE_BUCKETS as u64 + 1) / ADJUST_PERIOD;
        feed(&mut w, t, periods, 400 * US);
        let idle = w.idle_latency().unwrap_or(0);
        assert!(idle > 390 * US && idle <= 400 * US, "{idle}");
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
        let t = feed(&mut w, t, 100, 10_000 * US);
        assert_eq!(w.allow(t, true, 0, 0, CAP, 1 << 20), Allow::Bytes(1 << 20));
        assert_eq!(w.allow(t, true, 1, 1 << 20, CAP, 1 << 20), Allow::Wait);
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
