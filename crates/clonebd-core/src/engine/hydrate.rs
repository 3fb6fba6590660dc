//! Background hydration (SPEC 4) and hydrate requests.
//!
//! The background pass scans from an offset that wraps, skipping hydrated regions and regions
//! with a hydration in flight, and issues copies of up to `hydration_batch_size` adjacent
//! regions while fewer than `hydration_threshold` regions of background copies are in flight.
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

use super::{CopyOrigin, Engine, IoStatus, Mode, PriorityRange, RegionId, SECOND, Tick, Waiter};

impl Engine {
    /// Whether background hydration would run if nothing held it back.
    pub(super) fn hydration_wanted(&self) -> bool {
        self.mode == Mode::ReadWrite
            && !self.suspended
            && self.enabled
            && self.threshold > 0
            && !self.view.map().is_complete()
    }

    /// Records a failed background copy: back off the pass.
    pub(super) fn note_background_failure(&mut self) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let shift = (self.consecutive_failures - 1).min(20);
        let delay = self
            .cfg
            .retry_backoff_min
            .saturating_mul(1u64 << shift)
            .min(self.cfg.retry_backoff_max);
        self.not_before = self.now.saturating_add(delay);
    }

    /// When the bandwidth limit next allows a copy, if it is what holds hydration back.
    pub(super) fn rate_limit_deadline(&self) -> Option<Tick> {
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

    fn refill_tokens(&mut self) {
        if self.rate_limit == 0 {
            return;
        }
        let elapsed = self.now.saturating_sub(self.tokens_at);
        let add = u128::from(elapsed) * u128::from(self.rate_limit) / u128::from(SECOND);
        // Cap the credit at one second of bandwidth so an idle period does not burst.
        let cap = i128::from(self.rate_limit);
        self.tokens = (self.tokens + add as i128).min(cap);
        self.tokens_at = self.now;
    }

    /// Runs the priority queue and the background pass.
    pub(super) fn run_hydration(&mut self) {
        self.run_priority();
        self.busy_limited = false;
        if !self.hydration_wanted() || self.now < self.not_before {
            return;
        }
        self.refill_tokens();
        let busy =
            !self.reqs.is_empty() || self.view.foreground_busy(self.now, self.cfg.busy_window);
        let threshold = u64::from(self.threshold);
        let batch_max = u64::from(self.batch.max(1)).min(threshold);
        let nr = self.geometry().nr_regions();
        let mut scanned_wrap = false;
        loop {
            // Every region left is already in flight: nothing to scan for (this keeps the
            // end of a hydration from rescanning the whole map at every completion).
            if self.view.map().nr_hydrated() + self.inflight.len() as u64 >= nr {
                break;
            }
            if self.bg_regions >= threshold {
                break;
            }
            let region = self.geometry().region_bytes();
            let Some(most) = self.window.allow(
                busy,
                self.bg_jobs,
                self.bg_regions.saturating_mul(region),
                threshold.saturating_mul(region),
                region,
            ) else {
                self.busy_limited = true;
                break;
            };
            if self.rate_limit > 0 && self.tokens < 0 {
                break;
            }
            // The copy window bounds the bytes in flight (window.rs).
            let room = (threshold - self.bg_regions)
                .min(batch_max)
                .min((most / region).max(1));
            // The hydration order queue goes first (order.rs).
            if let Some((r, end)) = self.next_queued() {
                let n = self.start_background(r, room, end);
                self.queued_started(r, n);
                continue;
            }
            // Find the next idle unhydrated region at or after the offset, wrapping once.
            let Some(r) = self.next_candidate(self.offset, nr).or_else(|| {
                if scanned_wrap {
                    return None;
                }
                scanned_wrap = true;
                // Regions below the floor are known hydrated.
                let floor = self.scan_floor.min(self.offset);
                let r = self
                    .view
                    .map()
                    .first_unhydrated_in(floor, self.offset.min(nr));
                self.scan_floor = r.unwrap_or(self.offset.min(nr));
                self.next_candidate(self.scan_floor, self.offset.min(nr))
            }) else {
                break;
            };
            let n = self.start_background(r, room, nr);
            self.offset = r + n;
            if self.offset >= nr {
                self.offset = 0;
                if scanned_wrap {
                    break;
                }
                scanned_wrap = true;
            }
        }
    }

    /// Starts a background copy at the idle region `r` of up to `room` adjacent idle
    /// regions below `limit`, counting it against the threshold and the bandwidth limit;
    /// returns how many regions it covers.
    fn start_background(&mut self, r: RegionId, room: u64, limit: RegionId) -> u64 {
        let mut n = 1;
        while n < room
            && r + n < limit
            && !self.view.map().is_hydrated(r + n)
            && !self.inflight.contains_key(&(r + n))
        {
            n += 1;
        }
        self.start_copy(r, n, CopyOrigin::Background, None);
        self.bg_regions += n;
        self.bg_jobs += 1;
        if self.rate_limit > 0 {
            let (s, e) = self.geometry().regions_byte_range(r, n);
            self.tokens -= i128::from(e - s);
        }
        n
    }

    /// The first unhydrated region in `[from, to)` with no hydration in flight.
    pub(super) fn next_candidate(&self, from: u64, to: u64) -> Option<u64> {
        let mut from = from;
        loop {
            let r = self.view.map().first_unhydrated_in(from, to)?;
            if !self.inflight.contains_key(&r) {
                return Some(r);
            }
            // Skip the whole run in flight at once.
            let mut x = r + 1;
            while self.inflight.contains_key(&x) {
                x += 1;
            }
            from = x;
        }
    }

    /// Schedules copies for hydrate requests, in arrival order.
    fn run_priority(&mut self) {
        if self.mode != Mode::ReadWrite {
            self.fail_priority(IoStatus::ReadOnly);
            return;
        }
        let per_copy = (self.cfg.priority_copy_bytes / self.geometry().region_bytes()).max(1);
        while self.priority_jobs < u64::from(self.cfg.priority_copies_in_flight.max(1)) {
            let Some(pr) = self.priority.front_mut() else {
                break;
            };
            let (req, mut next, end) = (pr.req, pr.next, pr.end);
            // Skip hydrated regions; attach to regions already in flight.
            while next < end {
                if self.view.map().is_hydrated(next) {
                    next += 1;
                } else if let Some(f) = self.inflight.get_mut(&next) {
                    f.waiters.push(Waiter::Hydrate(req));
                    if let Some(s) = self.reqs.get_mut(&req) {
                        s.pending += 1;
                    }
                    next += 1;
                } else {
                    break;
                }
            }
            if next >= end {
                self.priority.pop_front();
                self.settle(req, 1, IoStatus::Ok);
                continue;
            }
            let mut n = 1;
            while n < per_copy
                && next + n < end
                && !self.view.map().is_hydrated(next + n)
                && !self.inflight.contains_key(&(next + n))
            {
                n += 1;
            }
            self.start_copy(next, n, CopyOrigin::Priority, None);
            self.priority_jobs += 1;
            for r in next..next + n {
                if let Some(f) = self.inflight.get_mut(&r) {
                    f.waiters.push(Waiter::Hydrate(req));
                }
            }
            if let Some(s) = self.reqs.get_mut(&req) {
                s.pending += n;
            }
            if let Some(pr) = self.priority.front_mut() {
                pr.next = next + n;
            }
        }
    }

    /// Fails every hydrate request not yet fully scheduled.
    pub(super) fn fail_priority(&mut self, status: IoStatus) {
        while let Some(PriorityRange { req, .. }) = self.priority.pop_front() {
            self.settle(req, 1, status);
        }
    }
}
