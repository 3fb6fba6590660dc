//! The hydrator part: background hydration (SPEC 4) and the hydrate requests' queue.
//!
//! The background pass scans from an offset that wraps, skipping regions that are not cold
//! (hydrated, or with a hydration in flight), and issues copies of up to
//! `hydration_batch_size` adjacent regions while fewer than `hydration_threshold` regions of
//! background copies are in flight.
//!
//! Where we differ from the kernel, deliberately (decision D4, issue "keep the priority,
//! guarantee progress"):
//! - the kernel stops the pass whenever any user I/O is in flight, which can starve
//!   hydration under continuous I/O; here foreground activity only limits background copying
//!   to what the copy window allows (`window.rs`: bytes in flight steered by the foreground
//!   latency, copies split into small pieces), and at least one copy job is always allowed,
//!   so hydration always progresses;
//! - a failed background copy backs the whole pass off (100 ms, doubling per consecutive
//!   failure, up to 30 s; a success resets it) instead of retrying at once forever, and the
//!   failures are counted;
//! - an optional bandwidth limit in bytes per second (a token bucket that may go into debt
//!   by one copy, so any copy size works with any limit).
//!
//! Before it scans, the pass copies the ranges of the hydration order queue (order.rs),
//! under the same limits.
//!
//! Hydrate requests (NBD CACHE) are served first, with their own small budget, and are not
//! subject to `hydration_threshold`, the enable flag or the rate limit: they are foreground.
//!
//! The hydrator owns its settings, the scan, the queues, the limits and the copy window.
//! It decides which copies to start and is told how they ended; it never starts an
//! operation itself. The engine asks it for the next background copy
//! ([`Hydrator::next_background`]) against the regions as they stand, starts it, and asks
//! again. Other parts reach its state only through its methods (a metadata reload restarts
//! the scan with [`Hydrator::restart_scan`]).

use std::collections::VecDeque;

use super::order::OrderQueue;
use super::regions::Regions;
use super::window::Allow;
use super::{Config, CopyOrigin, CopyWindow, ReqId, SECOND, Tick};
use crate::geometry::{Geometry, RegionId};

/// A hydrate request's range still to be scheduled.
#[derive(Debug)]
struct PriorityRange {
    req: ReqId,
    next: RegionId,
    end: RegionId,
}

/// One background pass: what holds for all its copies.
#[derive(Debug)]
pub(super) struct Pass {
    now: Tick,
    busy: bool,
    scanned_wrap: bool,
    done: bool,
}

/// The hydrator part. See the module documentation.
#[derive(Debug)]
pub(super) struct Hydrator {
    // Tunables (messages change them).
    enabled: bool,
    threshold: u32,
    batch: u32,
    rate_limit: u64,
    // Fixed settings.
    backoff_min: Tick,
    backoff_max: Tick,
    request_copy_bytes: u64,
    request_copies: u64,
    // The scan.
    offset: RegionId,
    /// Every region below it is hydrated (the map only gains bits, except on a reload).
    scan_floor: RegionId,
    bg_regions: u64,
    bg_jobs: u64,
    /// Hydrate requests, in arrival order.
    requests: VecDeque<PriorityRange>,
    request_jobs: u64,
    /// The hydration order queue, copied before the scan.
    order: OrderQueue,
    // Limits.
    consecutive_failures: u32,
    not_before: Tick,
    tokens: i128,
    tokens_at: Tick,
    busy_limited: bool,
    /// The copy window paces copies: the pass runs again at this time.
    paced_until: Option<Tick>,
    window: CopyWindow,
}

impl Hydrator {
    pub(super) fn new(cfg: &Config, now: Tick) -> Self {
        Self {
            enabled: cfg.hydration_enabled,
            threshold: cfg.hydration_threshold,
            batch: cfg.hydration_batch_size,
            rate_limit: cfg.hydration_rate_limit,
            backoff_min: cfg.retry_backoff_min,
            backoff_max: cfg.retry_backoff_max,
            request_copy_bytes: cfg.priority_copy_bytes,
            request_copies: u64::from(cfg.priority_copies_in_flight.max(1)),
            offset: 0,
            scan_floor: 0,
            bg_regions: 0,
            bg_jobs: 0,
            requests: VecDeque::new(),
            request_jobs: 0,
            order: OrderQueue::default(),
            consecutive_failures: 0,
            not_before: 0,
            tokens: 0,
            tokens_at: now,
            busy_limited: false,
            paced_until: None,
            window: CopyWindow::new(cfg.hydration_priority),
        }
    }

    // ----- settings -----

    pub(super) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(super) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    pub(super) fn threshold(&self) -> u32 {
        self.threshold
    }

    pub(super) fn set_threshold(&mut self, n: u32) {
        self.threshold = n;
    }

    pub(super) fn batch(&self) -> u32 {
        self.batch
    }

    pub(super) fn set_batch(&mut self, n: u32) {
        self.batch = n;
    }

    pub(super) fn rate_limit(&self) -> u64 {
        self.rate_limit
    }

    /// A new bandwidth limit, counted from `now` with no credit.
    pub(super) fn set_rate_limit(&mut self, n: u64, now: Tick) {
        self.rate_limit = n;
        self.tokens = 0;
        self.tokens_at = now;
    }

    /// Client requests completed with a mean latency of `mean` (the copy window's input).
    pub(super) fn observe(&mut self, now: Tick, mean: Tick, requests: u64) {
        self.window.observe(now, mean, requests);
    }

    /// Queues the regions `[offset, offset+len)` touches in the hydration order queue.
    pub(super) fn queue_first(&mut self, g: &Geometry, offset: u64, len: u64, front: bool) {
        self.order.push(g, offset, len, front);
    }

    /// Regions still in the hydration order queue (counted whole, hydrated or not).
    pub(super) fn queued_regions(&self) -> u64 {
        self.order.regions()
    }

    /// The map may have lost bits anywhere (a metadata reload): scan it from the start.
    pub(super) fn restart_scan(&mut self) {
        self.scan_floor = 0;
    }

    // ----- the background pass -----

    /// Whether background hydration would run if nothing held it back; `open` says the
    /// engine lets it (mode `rw`, not suspended, not every region hydrated).
    pub(super) fn wanted(&self, open: bool) -> bool {
        open && self.enabled && self.threshold > 0
    }

    /// Reports (to `at`) when the pass next wants to run, if something holds it back.
    pub(super) fn deadlines(
        &self,
        now: Tick,
        open: bool,
        busy_window: Tick,
        at: &mut impl FnMut(Tick),
    ) {
        if !self.wanted(open) {
            return;
        }
        if self.not_before > now {
            at(self.not_before);
        }
        if let Some(t) = self.rate_limit_deadline() {
            at(t);
        }
        if self.busy_limited {
            at(now.saturating_add(busy_window));
        }
        if let Some(t) = self.paced_until {
            at(t.max(now));
        }
    }

    /// When the bandwidth limit next allows a copy, if it is what holds hydration back.
    fn rate_limit_deadline(&self) -> Option<Tick> {
        if self.rate_limit == 0 || self.tokens >= 0 {
            return None;
        }
        let debt = self.tokens.unsigned_abs();
        let wait = debt.saturating_mul(u128::from(SECOND)) / u128::from(self.rate_limit) + 1;
        Some(
            self.tokens_at
                .saturating_add(u64::try_from(wait).unwrap_or(u64::MAX)),
        )
    }

    fn refill_tokens(&mut self, now: Tick) {
        if self.rate_limit == 0 {
            return;
        }
        let elapsed = now.saturating_sub(self.tokens_at);
        let add = u128::from(elapsed) * u128::from(self.rate_limit) / u128::from(SECOND);
        // Cap the credit at one second of bandwidth so an idle period does not burst.
        let cap = i128::from(self.rate_limit);
        self.tokens = (self.tokens + add as i128).min(cap);
        self.tokens_at = now;
    }

    /// Starts a background pass at `now`, if one may run; `busy` says clients are active.
    pub(super) fn begin_pass(&mut self, now: Tick, open: bool, busy: bool) -> Option<Pass> {
        self.busy_limited = false;
        self.paced_until = None;
        if !self.wanted(open) || now < self.not_before {
            return None;
        }
        self.refill_tokens(now);
        Some(Pass {
            now,
            busy,
            scanned_wrap: false,
            done: false,
        })
    }

    /// The pass's next background copy, `(first region, count)`, counted as started: the
    /// caller starts it before asking again. `None` ends the pass.
    pub(super) fn next_background(
        &mut self,
        pass: &mut Pass,
        regions: &Regions,
        g: &Geometry,
    ) -> Option<(RegionId, u64)> {
        if pass.done {
            return None;
        }
        let threshold = u64::from(self.threshold);
        let batch_max = u64::from(self.batch.max(1)).min(threshold);
        let nr = g.nr_regions();
        // Every region left is already in flight: nothing to scan for (this keeps the end of
        // a hydration from rescanning the whole map at every completion).
        if regions.map().nr_hydrated() + regions.nr_busy() >= nr {
            return None;
        }
        if self.bg_regions >= threshold {
            return None;
        }
        let region = g.region_bytes();
        let most = match self.window.allow(
            pass.now,
            pass.busy,
            self.bg_jobs,
            self.bg_regions.saturating_mul(region),
            threshold.saturating_mul(region),
            region,
        ) {
            Allow::Bytes(most) => most,
            Allow::Wait => {
                self.busy_limited = true;
                return None;
            }
            Allow::Until(t) => {
                self.paced_until = Some(t);
                return None;
            }
        };
        if self.rate_limit > 0 && self.tokens < 0 {
            return None;
        }
        // The copy window bounds the bytes in flight (window.rs).
        let room = (threshold - self.bg_regions)
            .min(batch_max)
            .min((most / region).max(1));
        // The hydration order queue goes first (order.rs).
        if let Some((r, end)) = self.order.next(regions) {
            let n = self.claim(r, room, end, regions, g);
            self.order.started(r, n);
            return Some((r, n));
        }
        // Find the next cold region at or after the offset, wrapping once.
        let r = match regions.first_cold_in(self.offset, nr) {
            Some(r) => r,
            None => {
                if pass.scanned_wrap {
                    return None;
                }
                pass.scanned_wrap = true;
                // Regions below the floor are known hydrated.
                let to = self.offset.min(nr);
                let floor = self.scan_floor.min(self.offset);
                self.scan_floor = regions.map().first_unhydrated_in(floor, to).unwrap_or(to);
                regions.first_cold_in(self.scan_floor, to)?
            }
        };
        let n = self.claim(r, room, nr, regions, g);
        self.offset = r + n;
        if self.offset >= nr {
            self.offset = 0;
            if pass.scanned_wrap {
                pass.done = true;
            }
            pass.scanned_wrap = true;
        }
        Some((r, n))
    }

    /// Counts a background copy at the cold region `r` of up to `room` adjacent cold regions
    /// below `limit` against the threshold and the bandwidth limit; returns how many regions
    /// it covers.
    fn claim(
        &mut self,
        r: RegionId,
        room: u64,
        limit: RegionId,
        regions: &Regions,
        g: &Geometry,
    ) -> u64 {
        let n = regions.cold_run(r, room, limit);
        self.bg_regions += n;
        self.bg_jobs += 1;
        if self.rate_limit > 0 {
            let (s, e) = g.regions_byte_range(r, n);
            self.tokens -= i128::from(e - s);
        }
        n
    }

    /// A copy of `n` regions started by `origin` ended (`ok`: it succeeded) at `now`.
    pub(super) fn copy_done(&mut self, origin: CopyOrigin, n: u64, ok: bool, now: Tick) {
        match origin {
            CopyOrigin::Background => {
                self.bg_regions = self.bg_regions.saturating_sub(n);
                self.bg_jobs = self.bg_jobs.saturating_sub(1);
                self.window.copy_ended(now);
                if ok {
                    self.consecutive_failures = 0;
                } else {
                    // Back the pass off.
                    self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                    let shift = (self.consecutive_failures - 1).min(20);
                    let delay = self
                        .backoff_min
                        .saturating_mul(1u64 << shift)
                        .min(self.backoff_max);
                    self.not_before = now.saturating_add(delay);
                }
            }
            CopyOrigin::Priority => self.request_jobs = self.request_jobs.saturating_sub(1),
            CopyOrigin::Write => {}
        }
    }

    /// Regions of background copies in flight, by this part's count.
    pub(super) fn background_regions(&self) -> u64 {
        self.bg_regions
    }

    // ----- hydrate requests -----

    /// Queues hydrate request `req` for regions `[first, end)`.
    pub(super) fn queue_request(&mut self, req: ReqId, first: RegionId, end: RegionId) {
        self.requests.push_back(PriorityRange {
            req,
            next: first,
            end,
        });
    }

    /// The regions one copy for a hydrate request covers at most.
    pub(super) fn request_copy_regions(&self, g: &Geometry) -> u64 {
        (self.request_copy_bytes / g.region_bytes()).max(1)
    }

    /// The oldest hydrate request not fully scheduled, `(req, next region, end)`, if its
    /// budget allows another copy.
    pub(super) fn next_request(&self) -> Option<(ReqId, RegionId, RegionId)> {
        if self.request_jobs >= self.request_copies {
            return None;
        }
        self.requests.front().map(|p| (p.req, p.next, p.end))
    }

    /// The oldest hydrate request is fully scheduled.
    pub(super) fn request_scheduled(&mut self) {
        self.requests.pop_front();
    }

    /// A copy for the oldest hydrate request started; it goes on at `next`.
    pub(super) fn request_copy_started(&mut self, next: RegionId) {
        self.request_jobs += 1;
        if let Some(p) = self.requests.front_mut() {
            p.next = next;
        }
    }

    /// Drops every hydrate request not yet fully scheduled, returning them.
    pub(super) fn take_requests(&mut self) -> Vec<ReqId> {
        self.requests.drain(..).map(|p| p.req).collect()
    }
}
