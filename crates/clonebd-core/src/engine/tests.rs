//! Unit tests of the engine, scenario by scenario, driving it by hand. The model-based test
//! and the simulations with real metadata live in the driver crate's tests.

use std::sync::Arc;

use super::*;
use crate::bitmap::HydrationMap;
use crate::geometry::Geometry;

/// A hand-driven engine: requests in, actions collected, completions chosen by the test.
struct H {
    e: Engine,
    now: Tick,
    out: Vec<Action>,
}

const RB: u64 = 4096;

impl H {
    fn new(nr_regions: u64) -> Self {
        Self::with(nr_regions * 8, |_| {})
    }

    fn with(target_sectors: u64, f: impl FnOnce(&mut Config)) -> Self {
        Self::with_region(target_sectors, 8, f)
    }

    fn with_region(target_sectors: u64, region_sectors: u64, f: impl FnOnce(&mut Config)) -> Self {
        let g = Geometry::new(target_sectors, region_sectors).expect("geometry");
        let mut cfg = Config::new(g);
        cfg.hydration_enabled = false;
        f(&mut cfg);
        let view = Arc::new(SharedView::new(HydrationMap::new(g.nr_regions())));
        let mut e = Engine::new(cfg, view, 0);
        e.apply(0, Input::Control(Control::Resume));
        let mut h = Self {
            e,
            now: 0,
            out: Vec::new(),
        };
        h.pump();
        h
    }

    fn pump(&mut self) {
        while let Some(a) = self.e.poll_action() {
            self.out.push(a);
        }
        self.e.check_invariants().expect("invariants");
    }

    fn apply(&mut self, i: Input) -> Vec<Action> {
        self.e.apply(self.now, i);
        self.pump();
        std::mem::take(&mut self.out)
    }

    fn req(&mut self, id: ReqId, r: Request) -> Vec<Action> {
        self.apply(Input::Request(id, r))
    }

    fn done(&mut self, op: OpId, st: IoStatus) -> Vec<Action> {
        self.apply(Input::Completed(op, st))
    }

    fn advance(&mut self, dt: Tick) -> Vec<Action> {
        self.now += dt;
        self.apply(Input::Tick)
    }

    fn hydrated(&self, r: u64) -> bool {
        self.e.view().map().is_hydrated(r)
    }

    /// Completes every I/O action in `acts` successfully (commit steps included) until
    /// quiet, returning all replies.
    fn settle_all(&mut self, mut acts: Vec<Action>) -> Vec<(ReqId, IoStatus)> {
        let mut replies = Vec::new();
        while !acts.is_empty() {
            let mut next = Vec::new();
            for a in acts {
                match a {
                    Action::Reply { req, status } => replies.push((req, status)),
                    a => {
                        if let Some(op) = op_of(&a) {
                            next.extend(self.done(op, IoStatus::Ok));
                        }
                    }
                }
            }
            acts = next;
        }
        replies
    }
}

fn op_of(a: &Action) -> Option<OpId> {
    match *a {
        Action::WriteDest { op, .. }
        | Action::Copy { op, .. }
        | Action::DiscardDest { op, .. }
        | Action::FlushDest { op }
        | Action::CommitMetadata { op, .. }
        | Action::AbortMetadata { op } => Some(op),
        _ => None,
    }
}

fn only(acts: &[Action], pred: impl Fn(&Action) -> bool) -> Vec<&Action> {
    acts.iter().filter(|a| pred(a)).collect()
}

fn is_reply(a: &Action, id: ReqId, st: IoStatus) -> bool {
    *a == Action::Reply {
        req: id,
        status: st,
    }
}

#[test]
fn write_to_unhydrated_region_waits_for_copy() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 2 * RB + 512,
            len: 1024,
            fua: false,
        },
    );
    let [
        Action::Copy {
            op,
            offset,
            len,
            owner: Some(1),
        },
    ] = a[..]
    else {
        panic!("{a:?}")
    };
    assert_eq!((offset, len), (2 * RB, RB));
    // A second write to the same region queues behind the same copy.
    let a2 = h.req(
        2,
        Request::Write {
            offset: 2 * RB,
            len: 512,
            fua: false,
        },
    );
    assert!(a2.is_empty(), "{a2:?}");
    let a = h.done(op, IoStatus::Ok);
    assert!(h.hydrated(2));
    let writes = only(&a, |x| matches!(x, Action::WriteDest { .. }));
    assert_eq!(writes.len(), 2);
    let replies = h.settle_all(a);
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|(_, s)| s.is_ok()));
}

#[test]
fn full_region_write_skips_copy() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 3 * RB,
            len: RB,
            fua: false,
        },
    );
    assert!(
        matches!(a[..], [Action::WriteDest { len: RB, .. }]),
        "{a:?}"
    );
    assert!(!h.hydrated(3), "marked only once the write completes");
    let r = h.settle_all(a);
    assert_eq!(r, vec![(1, IoStatus::Ok)]);
    assert!(h.hydrated(3));
}

#[test]
fn adjacent_full_region_writes_merge_into_one_destination_write() {
    let mut h = H::new(64);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: 32 * RB,
            fua: false,
        },
    );
    assert!(
        matches!(a[..], [Action::WriteDest { offset: 0, len, .. }] if len == 32 * RB),
        "{a:?}"
    );
    h.settle_all(a);
    assert!(h.e.view().map().is_range_hydrated(0, 32));
}

#[test]
fn short_tail_region_write_always_copies() {
    // 10 regions of 8 sectors plus a 4-sector tail.
    let mut h = H::with(84, |_| {});
    let tail_start = 10 * RB;
    let a = h.req(
        1,
        Request::Write {
            offset: tail_start,
            len: 2048,
            fua: false,
        },
    );
    assert!(matches!(a[..], [Action::Copy { len: 2048, .. }]), "{a:?}");
}

#[test]
fn flush_with_changes_commits_with_exactly_one_destination_flush() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    let a = h.req(2, Request::Flush);
    let [Action::FlushDest { op }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Ok);
    let [Action::CommitMetadata { op, ref dirty }] = a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(dirty.regions().collect::<Vec<_>>(), vec![0]);
    let a = h.done(op, IoStatus::Ok);
    // The commit's destination flush stands in for the user's: no second flush (F3).
    assert_eq!(
        a,
        vec![Action::Reply {
            req: 2,
            status: IoStatus::Ok
        }]
    );
}

#[test]
fn flush_without_changes_passes_through_to_destination_only() {
    let mut h = H::new(16);
    let a = h.req(1, Request::Flush);
    let [Action::FlushDest { op }] = a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(
        h.done(op, IoStatus::Ok),
        vec![Action::Reply {
            req: 1,
            status: IoStatus::Ok
        }]
    );
}

#[test]
fn fua_write_to_hydrated_region_waits_for_commit_when_metadata_changed() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    let a = h.req(
        2,
        Request::Write {
            offset: 0,
            len: 512,
            fua: true,
        },
    );
    // The commit goes first, then the write with FUA.
    let [Action::FlushDest { op }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Ok);
    let [Action::CommitMetadata { op, .. }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Ok);
    assert!(
        matches!(
            a[..],
            [Action::WriteDest {
                fua: true,
                len: 512,
                ..
            }]
        ),
        "{a:?}"
    );
    assert_eq!(h.settle_all(a), vec![(2, IoStatus::Ok)]);
    // Nothing changed since: a FUA write goes straight down.
    let a = h.req(
        3,
        Request::Write {
            offset: 0,
            len: 512,
            fua: true,
        },
    );
    assert!(
        matches!(a[..], [Action::WriteDest { fua: true, .. }]),
        "{a:?}"
    );
}

#[test]
fn fua_overwrite_completion_is_held_until_commit() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: RB,
            len: RB,
            fua: true,
        },
    );
    let [Action::WriteDest { op, fua: true, .. }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Ok);
    assert!(
        !a.iter().any(|x| matches!(x, Action::Reply { .. })),
        "{a:?}"
    );
    let [Action::FlushDest { .. }] = a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(h.settle_all(a), vec![(1, IoStatus::Ok)]);
}

#[test]
fn discard_inside_one_region_does_nothing_f4() {
    // Region size 64 sectors; discard sectors [R+5, R+20): nothing covered, nothing passed
    // down, nothing marked.
    let mut h = H::with_region(64 * 10, 64, |_| {});
    let a = h.req(
        1,
        Request::Discard {
            offset: (64 + 5) * 512,
            len: 15 * 512,
        },
    );
    assert_eq!(
        a,
        vec![Action::Reply {
            req: 1,
            status: IoStatus::Ok
        }]
    );
    assert_eq!(h.e.view().map().nr_hydrated(), 0);
    // Ending exactly on a boundary covers the region before it, and only that one.
    let a = h.req(
        2,
        Request::Discard {
            offset: (64 + 5) * 512,
            len: (192 - 69) * 512,
        },
    );
    assert!(
        matches!(a[..], [Action::DiscardDest { offset, len, .. }] if offset == 128 * 512 && len == 64 * 512),
        "{a:?}"
    );
}

#[test]
fn unaligned_discard_ignores_partial_blocks_and_succeeds() {
    // Region size 8 sectors (4 KiB). Not aligned to 512 bytes, inside one region: nothing
    // to do, and that is a success (QEMU passes such heads and tails down).
    let mut h = H::with_region(8 * 16, 8, |_| {});
    let a = h.req(
        1,
        Request::Discard {
            offset: 2_621_540 % (8 * 16 * 512),
            len: 1000,
        },
    );
    assert_eq!(
        a,
        vec![Action::Reply {
            req: 1,
            status: IoStatus::Ok
        }]
    );
    // Less than one block in all.
    let a = h.req(
        2,
        Request::Discard {
            offset: 100,
            len: 300,
        },
    );
    assert_eq!(
        a,
        vec![Action::Reply {
            req: 2,
            status: IoStatus::Ok
        }]
    );
    assert_eq!(h.e.view().map().nr_hydrated(), 0);
    // Unaligned ends around regions 2 to 4: exactly those are discarded and marked.
    let a = h.req(
        3,
        Request::Discard {
            offset: 8000,
            len: 12_700,
        },
    );
    assert!(
        matches!(a[..], [Action::DiscardDest { offset, len, .. }] if offset == 8192 && len == 3 * 4096),
        "{a:?}"
    );
    // Still refused: past the end of the device.
    let a = h.req(
        4,
        Request::Discard {
            offset: 8 * 16 * 512 - 100,
            len: 1000,
        },
    );
    assert_eq!(
        a,
        vec![Action::Reply {
            req: 4,
            status: IoStatus::Invalid
        }]
    );
}

#[test]
fn discard_marks_whole_regions_and_passes_down_trimmed() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Discard {
            offset: RB + 512,
            len: 3 * RB,
        },
    );
    let [
        Action::DiscardDest {
            op, offset, len, ..
        },
    ] = a[..]
    else {
        panic!("{a:?}")
    };
    assert_eq!((offset, len), (2 * RB, 2 * RB));
    assert!(h.hydrated(2) && h.hydrated(3) && !h.hydrated(1) && !h.hydrated(4));
    assert_eq!(
        h.done(op, IoStatus::Ok),
        vec![Action::Reply {
            req: 1,
            status: IoStatus::Ok
        }]
    );
}

#[test]
fn discard_without_passdown_completes_at_once() {
    let mut h = H::with(16 * 8, |c| c.discard_passdown = false);
    let a = h.req(
        1,
        Request::Discard {
            offset: 0,
            len: 16 * RB,
        },
    );
    assert_eq!(
        a,
        vec![Action::Reply {
            req: 1,
            status: IoStatus::Ok
        }]
    );
    assert!(h.e.view().map().is_complete());
}

#[test]
fn discard_during_copy_waits_for_the_copy_h1() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 2 * RB,
            len: 512,
            fua: false,
        },
    );
    let [Action::Copy { op: copy, .. }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.req(
        2,
        Request::Discard {
            offset: 0,
            len: 4 * RB,
        },
    );
    assert!(a.is_empty(), "the discard must wait for the copy: {a:?}");
    assert!(!h.hydrated(0), "nothing marked while the copy is in flight");
    // A write to region 0 now must not go straight to the destination.
    let a = h.req(
        3,
        Request::Write {
            offset: 0,
            len: 512,
            fua: false,
        },
    );
    assert!(matches!(a[..], [Action::Copy { .. }]), "{a:?}");
    let a = h.done(copy, IoStatus::Ok);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::WriteDest { req: 1, .. })),
        "{a:?}"
    );
}

#[test]
fn failed_destination_flush_goes_read_only() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    let a = h.req(2, Request::Flush);
    let [Action::FlushDest { op }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Io);
    assert!(a.contains(&Action::Event(Event::ModeChanged(Mode::ReadOnly))));
    assert!(a.contains(&Action::Reply {
        req: 2,
        status: IoStatus::Io
    }));
    let [abort] = only(&a, |x| matches!(x, Action::AbortMetadata { .. }))[..] else {
        panic!("{a:?}")
    };
    let op = op_of(abort).expect("op");
    h.e.view().map().store_word(0, 0); // the driver's reload from disk
    h.done(op, IoStatus::Ok);
    assert_eq!(h.e.mode(), Mode::ReadOnly);
    // Writes to unhydrated regions now fail; every flush fails (the transaction stays
    // changed, SPEC 3.8).
    assert!(is_reply(
        &h.req(
            3,
            Request::Write {
                offset: RB,
                len: 512,
                fua: false
            }
        )[0],
        3,
        IoStatus::Io
    ));
    assert!(h.req(4, Request::Flush).contains(&Action::Reply {
        req: 4,
        status: IoStatus::Io
    }));
    // Discards touching unhydrated regions are ignored, reported as success.
    assert_eq!(
        h.req(
            5,
            Request::Discard {
                offset: RB,
                len: RB
            }
        ),
        vec![Action::Reply {
            req: 5,
            status: IoStatus::Ok
        }]
    );
    assert!(!h.hydrated(1));
}

#[test]
fn failed_abort_goes_fail_and_everything_fails() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    let a = h.req(2, Request::Flush);
    let [Action::FlushDest { op }] = a[..] else {
        panic!()
    };
    let a = h.done(op, IoStatus::Ok);
    let [Action::CommitMetadata { op, .. }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Io);
    let op = a.iter().find_map(|x| match x {
        Action::AbortMetadata { op } => Some(*op),
        _ => None,
    });
    let a = h.done(op.expect("abort"), IoStatus::Io);
    assert!(a.contains(&Action::Event(Event::ModeChanged(Mode::Fail))));
    assert_eq!(
        h.req(
            3,
            Request::Write {
                offset: 0,
                len: 512,
                fua: false,
            }
        ),
        vec![Action::Reply {
            req: 3,
            status: IoStatus::Io
        }]
    );
}

#[test]
fn writes_queued_behind_failed_overwrite_start_a_copy_h4() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    let [Action::WriteDest { op, .. }] = a[..] else {
        panic!()
    };
    assert!(
        h.req(
            2,
            Request::Write {
                offset: 512,
                len: 512,
                fua: false
            }
        )
        .is_empty()
    );
    let a = h.done(op, IoStatus::Io);
    assert!(a.contains(&Action::Reply {
        req: 1,
        status: IoStatus::Io
    }));
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Copy { owner: Some(2), .. })),
        "{a:?}"
    );
}

#[test]
fn failed_copy_fails_the_writes_waiting_on_it() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 512,
            len: 512,
            fua: false,
        },
    );
    let [Action::Copy { op, .. }] = a[..] else {
        panic!()
    };
    let a = h.done(op, IoStatus::Io);
    assert!(a.contains(&Action::Reply {
        req: 1,
        status: IoStatus::Io
    }));
    assert!(!h.hydrated(0));
}

#[test]
fn background_hydration_respects_threshold_and_batch() {
    let mut h = H::with(1024 * 8, |c| {
        c.hydration_enabled = true;
        c.hydration_threshold = 64;
        c.hydration_batch_size = 32;
    });
    let a = h.advance(SECOND);
    let copies: Vec<(u64, u64)> = a
        .iter()
        .filter_map(|x| match *x {
            Action::Copy {
                offset,
                len,
                owner: None,
                ..
            } => Some((offset / RB, len / RB)),
            _ => None,
        })
        .collect();
    assert_eq!(copies, vec![(0, 32), (32, 32)]);
    assert_eq!(h.e.status().hydrating, 64);
    h.settle_all(a);
    // Settling copies keeps the pass going until everything is hydrated.
    let mut guard = 0;
    while !h.e.view().map().is_complete() && guard < 1000 {
        let a = h.advance(SECOND);
        h.settle_all(a);
        guard += 1;
    }
    assert!(h.e.view().map().is_complete());
}

#[test]
fn background_copy_failure_backs_off_and_is_counted() {
    let mut h = H::with(16 * 8, |c| c.hydration_enabled = true);
    let a = h.advance(1);
    let [Action::Copy { op, offset: 0, .. }] = a[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Io);
    assert!(
        a.iter().all(|x| !matches!(x, Action::Copy { .. })),
        "backs off: {a:?}"
    );
    assert_eq!(h.e.status().copy_errors, 1);
    assert_eq!(h.e.next_deadline(), Some(h.now + 100 * MS));
    let a = h.advance(100 * MS);
    assert!(matches!(a[..], [Action::Copy { .. }]), "{a:?}");
}

/// The operations of the copies among `a`.
fn copy_ops(a: &[Action]) -> Vec<OpId> {
    a.iter()
        .filter(|x| matches!(x, Action::Copy { .. }))
        .filter_map(op_of)
        .collect()
}

/// A harness with a foreground read in flight the whole time (so clients are active; reads
/// are served by the driver outside the engine, which only hears of them through the shared
/// view), 65536 regions, threshold 128 and batch 128, and `priority`, past the probe of the
/// idle level that the first client activity starts (its latency 100 us): `a` holds the
/// copies started after it.
fn busy_harness(priority: HydrationPriority) -> (H, Vec<Action>) {
    let mut h = H::with(65536 * 8, |c| {
        c.hydration_enabled = true;
        c.hydration_threshold = 128;
        c.hydration_batch_size = 128;
        c.hydration_priority = priority;
    });
    h.e.view().foreground_started(h.now);
    let a = h.apply(Input::Tick);
    // The copy issued at resume, before the client came, was full size; complete it.
    let first: Vec<OpId> = copy_ops(&a);
    assert_eq!(first.len(), 1, "{a:?}");
    // The first client activity starts a probe of the idle level: no copy until it ends.
    let a = h.done(first[0], IoStatus::Ok);
    assert!(copy_ops(&a).is_empty(), "{a:?}");
    let mut a = Vec::new();
    for _ in 0..window::PROBE_LEN / (10 * MS) {
        assert!(copy_ops(&a).is_empty(), "{a:?}");
        h.now += 10 * MS;
        a.extend(h.apply(Input::ForegroundLatency {
            mean: 100_000,
            requests: 10,
        }));
    }
    a.extend(h.advance(0));
    assert!(!copy_ops(&a).is_empty(), "{a:?}");
    (h, a)
}

/// Runs `steps` steps of 1 ms, each reporting foreground latency `latency(step)` and then
/// completing every background copy issued; returns the regions copied and the most
/// background copies and regions in flight at once. `a` holds the actions not yet handled,
/// before and after.
fn run_busy(
    h: &mut H,
    a: &mut Vec<Action>,
    steps: u64,
    latency: impl Fn(u64) -> Tick,
) -> (u64, usize, u64) {
    let (mut copied, mut most_jobs, mut most_regions) = (0, 0, 0);
    for step in 0..steps {
        h.now += MS;
        a.extend(h.apply(Input::ForegroundLatency {
            mean: latency(step),
            requests: 10,
        }));
        a.extend(h.advance(0));
        let copies: Vec<(OpId, u64)> = a
            .iter()
            .filter_map(|x| match *x {
                Action::Copy { op, len, .. } => Some((op, len / RB)),
                _ => None,
            })
            .collect();
        most_jobs = most_jobs.max(copies.len());
        most_regions = most_regions.max(copies.iter().map(|c| c.1).sum());
        a.clear();
        for (op, n) in copies {
            a.extend(h.done(op, IoStatus::Ok));
            copied += n;
        }
    }
    (copied, most_jobs, most_regions)
}

#[test]
fn background_hydration_progresses_under_busy_foreground() {
    let (mut h, mut a) = busy_harness(HydrationPriority::Balanced);
    let (copied, _, _) = run_busy(&mut h, &mut a, 10, |_| 100_000);
    assert!(
        copied >= 5,
        "hydration must progress while busy, got {copied}"
    );
}

#[test]
fn background_copies_split_into_pieces_while_clients_are_active() {
    let (mut h, a) = busy_harness(HydrationPriority::Balanced);
    let first: Vec<u64> = a
        .iter()
        .chain(h.advance(MS).iter())
        .filter_map(|x| match *x {
            Action::Copy { len, .. } => Some(len),
            _ => None,
        })
        .collect();
    // 256 KiB pieces (64 regions) instead of batches of 128 regions, several in flight.
    assert!(first.len() >= 2, "{first:?}");
    assert!(first.iter().all(|&l| l == 256 << 10), "{first:?}");
}

#[test]
fn background_hydration_under_rising_latency_keeps_one_copy_d4() {
    let (mut h, mut a) = busy_harness(HydrationPriority::Balanced);
    // 100 us while idle-ish, then ten times that for good.
    let (_, early_jobs, _) = run_busy(&mut h, &mut a, 20, |_| 100_000);
    assert!(early_jobs >= 2, "{early_jobs}");
    // Long enough for the window to halve below one region.
    let (copied, jobs, _) = run_busy(&mut h, &mut a, 200, |_| 1_000_000);
    let (copied_late, jobs_late, regions_late) = run_busy(&mut h, &mut a, 10, |_| 1_000_000);
    assert!(
        copied > 0 && copied_late > 0,
        "never starved: {copied} {copied_late}"
    );
    assert!(jobs >= 1);
    assert_eq!(jobs_late, 1, "one copy at a time under high latency");
    assert_eq!(
        regions_late, 64,
        "one piece (256 KiB) always allowed, no more"
    );
}

#[test]
fn background_window_grows_back_when_latency_falls() {
    let (mut h, mut a) = busy_harness(HydrationPriority::Balanced);
    run_busy(&mut h, &mut a, 20, |_| 100_000);
    run_busy(&mut h, &mut a, 40, |_| 1_000_000);
    let (_, jobs, _) = run_busy(&mut h, &mut a, 5, |_| 1_000_000);
    assert_eq!(jobs, 1);
    let (_, jobs, _) = run_busy(&mut h, &mut a, 200, |_| 100_000);
    assert!(jobs >= 2, "{jobs}");
}

#[test]
fn hydration_priority_keeps_full_copies_while_clients_are_active() {
    let (mut h, mut a) = busy_harness(HydrationPriority::Hydration);
    let (_, _, regions) = run_busy(&mut h, &mut a, 1, |_| 100_000);
    assert_eq!(regions, 128, "one batch of 128 regions, not split");
    // Latency doubled and more: one full copy stays in flight.
    run_busy(&mut h, &mut a, 40, |_| 100_000);
    let (copied, jobs, regions) = run_busy(&mut h, &mut a, 1, |_| 1_000_000);
    assert_eq!((jobs, regions), (1, 128), "copied {copied}");
}

#[test]
fn periodic_commit_runs_after_the_interval_only_when_dirty() {
    let mut h = H::new(16);
    assert!(
        h.advance(2 * SECOND).is_empty(),
        "nothing changed, nothing committed"
    );
    // More than the interval since the last commit (at resume): the kernel's worker commits
    // at its next run, so a change now is committed at once.
    let a = h.req(1, Request::Discard { offset: 0, len: RB });
    assert!(
        a.iter().any(|x| matches!(x, Action::FlushDest { .. })),
        "{a:?}"
    );
    h.settle_all(a);
    // The next change waits for the interval.
    h.advance(SECOND / 10);
    let a = h.req(
        2,
        Request::Discard {
            offset: RB,
            len: RB,
        },
    );
    assert!(
        !a.iter().any(|x| matches!(x, Action::FlushDest { .. })),
        "{a:?}"
    );
    h.settle_all(a);
    assert!(h.advance(SECOND / 2).is_empty());
    let a = h.advance(SECOND / 2);
    assert!(matches!(a[..], [Action::FlushDest { .. }]), "{a:?}");
}

#[test]
fn commit_token_answers_at_once_when_nothing_changed() {
    let mut h = H::new(16);
    let a = h.apply(Input::Control(Control::Commit { token: 7 }));
    assert_eq!(
        a,
        vec![Action::ControlDone {
            token: 7,
            status: IoStatus::Ok
        }]
    );
}

#[test]
fn suspend_waits_for_copies_then_commits() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 512,
            len: 512,
            fua: false,
        },
    );
    let [Action::Copy { op, .. }] = a[..] else {
        panic!()
    };
    assert!(
        h.apply(Input::Control(Control::Suspend { token: 5 }))
            .is_empty()
    );
    let a = h.done(op, IoStatus::Ok);
    let write = a.iter().find_map(op_of).expect("queued write issued");
    let a = h.done(write, IoStatus::Ok);
    assert!(a.contains(&Action::Reply {
        req: 1,
        status: IoStatus::Ok
    }));
    let flush = a.iter().find_map(op_of).expect("suspend commit");
    let a = h.done(flush, IoStatus::Ok);
    let commit = a.iter().find_map(op_of).expect("metadata write");
    assert_eq!(
        h.done(commit, IoStatus::Ok),
        vec![Action::ControlDone {
            token: 5,
            status: IoStatus::Ok
        }]
    );
}

#[test]
fn hydrate_request_copies_its_range_and_replies_when_done() {
    let mut h = H::new(64);
    let a = h.req(
        1,
        Request::Hydrate {
            offset: RB,
            len: 3 * RB,
        },
    );
    let copies = only(&a, |x| matches!(x, Action::Copy { .. }));
    assert_eq!(copies.len(), 1);
    assert_eq!(h.settle_all(a), vec![(1, IoStatus::Ok)]);
    assert!(h.e.view().map().is_range_hydrated(1, 3));
}

#[test]
fn requests_past_the_end_or_misaligned_are_invalid() {
    let mut h = H::new(16);
    for (id, r) in [
        (
            1,
            Request::Write {
                offset: 16 * RB,
                len: 512,
                fua: false,
            },
        ),
        (
            2,
            Request::Write {
                offset: 100,
                len: 512,
                fua: false,
            },
        ),
        (
            3,
            Request::Hydrate {
                offset: u64::MAX - 511,
                len: 512,
            },
        ),
        (4, Request::Discard { offset: 0, len: 0 }),
    ] {
        assert_eq!(
            h.req(id, r),
            vec![Action::Reply {
                req: id,
                status: IoStatus::Invalid
            }]
        );
    }
}

#[test]
fn only_the_exact_regions_of_a_transaction_are_committed_f1() {
    // Region 0 is marked and its round starts (the dirty set is swapped); region 1, in the
    // same 64-bit word, finishes hydrating before the metadata write: it must not be in it.
    let mut h = H::new(64);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    let a = h.req(
        2,
        Request::Write {
            offset: RB + 512,
            len: 512,
            fua: false,
        },
    );
    let [Action::Copy { op: copy, .. }] = a[..] else {
        panic!()
    };
    let a = h.req(3, Request::Flush);
    let [Action::FlushDest { op }] = a[..] else {
        panic!("{a:?}")
    };
    let writes = h.done(copy, IoStatus::Ok);
    h.settle_all(writes);
    assert!(h.hydrated(1));
    let a = h.done(op, IoStatus::Ok);
    let [Action::CommitMetadata { ref dirty, .. }] = a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(dirty.regions().collect::<Vec<_>>(), vec![0]);
}

#[test]
fn resume_racing_a_pending_suspend_does_not_cancel_it() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 512,
            len: 512,
            fua: false,
        },
    );
    let [Action::Copy { op, .. }] = a[..] else {
        panic!()
    };
    assert!(
        h.apply(Input::Control(Control::Suspend { token: 9 }))
            .is_empty()
    );
    assert!(h.apply(Input::Control(Control::Resume)).is_empty());
    let a = h.done(op, IoStatus::Ok);
    let before = h.e.status().suspended;
    // The queued write, then the suspend's commit round; the token must be answered.
    let mut acts = a;
    let mut answered = false;
    while !acts.is_empty() {
        let mut next = Vec::new();
        for x in acts {
            answered |= x
                == Action::ControlDone {
                    token: 9,
                    status: IoStatus::Ok,
                };
            if let Some(op) = op_of(&x) {
                next.extend(h.done(op, IoStatus::Ok));
            }
        }
        acts = next;
    }
    assert!(before && answered, "the suspend must be answered");
    assert!(
        h.e.status().suspended,
        "still suspended after the suspend completed"
    );
}

/// The background copies among `acts`: (first region, regions, operation).
fn background_copies(acts: &[Action]) -> Vec<(u64, u64, OpId)> {
    acts.iter()
        .filter_map(|x| match *x {
            Action::Copy {
                op,
                offset,
                len,
                owner: None,
            } => Some((offset / RB, len.div_ceil(RB), op)),
            _ => None,
        })
        .collect()
}

/// Queues `[first, first+n)` regions in the hydration order queue.
fn hydrate_first(h: &mut H, first: u64, n: u64, front: bool) -> Vec<Action> {
    h.apply(Input::Control(Control::HydrateFirst {
        offset: first * RB,
        len: n * RB,
        front,
    }))
}

/// With one region in flight at a time: completes each background copy as it comes and
/// returns the first regions of the first `count` copies, in the order they were issued.
fn copy_order(h: &mut H, mut acts: Vec<Action>, count: usize) -> Vec<u64> {
    let mut order = Vec::new();
    while order.len() < count {
        let copies = background_copies(&acts);
        let [(first, _, op)] = copies[..] else {
            panic!("one background copy at a time: {acts:?}");
        };
        order.push(first);
        acts = h.done(op, IoStatus::Ok);
    }
    order
}

#[test]
fn hydrate_first_ranges_are_copied_in_order_before_the_scan() {
    let mut h = H::new(32);
    assert!(hydrate_first(&mut h, 10, 2, false).is_empty());
    assert!(hydrate_first(&mut h, 4, 1, false).is_empty());
    let a = h.apply(Input::Control(Control::EnableHydration));
    // The queue in its order, then the scan from its own offset (0), skipping region 4.
    assert_eq!(copy_order(&mut h, a, 8), vec![10, 11, 4, 0, 1, 2, 3, 5]);
    assert_eq!(h.e.queued_regions(), 0);
}

#[test]
fn hydrate_first_at_the_front_goes_before_ranges_already_queued() {
    let mut h = H::new(32);
    hydrate_first(&mut h, 20, 1, false);
    hydrate_first(&mut h, 5, 1, true);
    let a = h.apply(Input::Control(Control::EnableHydration));
    assert_eq!(copy_order(&mut h, a, 3), vec![5, 20, 0]);
}

#[test]
fn hydrate_first_waits_while_hydration_is_disabled() {
    let mut h = H::new(32);
    let a = hydrate_first(&mut h, 3, 2, true);
    assert!(background_copies(&a).is_empty(), "{a:?}");
    assert!(h.advance(10 * SECOND).is_empty());
    assert_eq!(h.e.queued_regions(), 2);
    let a = h.apply(Input::Control(Control::EnableHydration));
    assert_eq!(copy_order(&mut h, a, 2), vec![3, 4]);
}

#[test]
fn hydrate_first_copies_obey_threshold_and_batch_within_their_range() {
    let mut h = H::with(64 * 8, |c| {
        c.hydration_threshold = 4;
        c.hydration_batch_size = 2;
    });
    hydrate_first(&mut h, 10, 3, false);
    // Past the foreground window of the start, so the pass is not limited to one job.
    h.now += SECOND;
    let a = h.apply(Input::Control(Control::EnableHydration));
    let copies: Vec<(u64, u64)> = background_copies(&a)
        .iter()
        .map(|&(r, n, _)| (r, n))
        .collect();
    // A batch stops at its range's end; the scan gets what the threshold leaves.
    assert_eq!(copies, vec![(10, 2), (12, 1), (0, 1)]);
    assert_eq!(h.e.status().hydrating, 4);
}

#[test]
fn hydrate_first_copies_obey_the_bandwidth_limit() {
    let mut h = H::with(32 * 8, |c| c.hydration_rate_limit = RB);
    hydrate_first(&mut h, 8, 2, false);
    let a = h.apply(Input::Control(Control::EnableHydration));
    let [(8, 1, op)] = background_copies(&a)[..] else {
        panic!("{a:?}")
    };
    let a = h.done(op, IoStatus::Ok);
    assert!(background_copies(&a).is_empty(), "limited: {a:?}");
    let wait = h.e.next_deadline().expect("the limit's deadline") - h.now;
    assert!(wait >= SECOND - MS, "one region per second: {wait}");
    let a = h.advance(wait);
    assert_eq!(
        background_copies(&a)
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![9]
    );
}

#[test]
fn hydrate_first_skips_hydrated_regions_and_clips_at_the_end() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 3 * RB,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    assert!(h.hydrated(3));
    hydrate_first(&mut h, 2, 3, false);
    // Past the end: only regions 14 and 15 are queued; wholly past it, nothing.
    h.apply(Input::Control(Control::HydrateFirst {
        offset: 14 * RB,
        len: u64::MAX,
        front: false,
    }));
    hydrate_first(&mut h, 40, 2, false);
    assert_eq!(h.e.queued_regions(), 3 + 2);
    let a = h.apply(Input::Control(Control::EnableHydration));
    assert_eq!(copy_order(&mut h, a, 5), vec![2, 4, 14, 15, 0]);
}

// ----- copy-on-read (fills) -----

/// The destination writes of request `id` in `acts`, as `(op, offset, len, at)`.
fn writes_of(acts: &[Action], id: ReqId) -> Vec<(OpId, u64, u64, u64)> {
    acts.iter()
        .filter_map(|a| match *a {
            Action::WriteDest {
                op,
                req,
                offset,
                len,
                data: WriteData::Buffer { at },
                ..
            } if req == id => Some((op, offset, len, at)),
            _ => None,
        })
        .collect()
}

#[test]
fn fill_hydrates_only_the_cold_idle_regions_it_covers_wholly() {
    let mut h = H::new(16);
    // Region 2 is hydrated by a full-region write first.
    let a = h.req(
        1,
        Request::Write {
            offset: 2 * RB,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    // A read of [RB/2, 4 RB + 512) offers its data: regions 1 and 3 are covered wholly and
    // cold; 0 and 4 are covered only partly, 2 is hydrated.
    let a = h.req(
        2,
        Request::Fill {
            offset: RB / 2,
            len: 4 * RB,
        },
    );
    let w = writes_of(&a, 2);
    assert_eq!(
        w.iter()
            .map(|&(_, o, l, at)| (o, l, at))
            .collect::<Vec<_>>(),
        vec![(RB, RB, RB / 2), (3 * RB, RB, 5 * RB / 2)],
        "{a:?}"
    );
    assert!(!h.hydrated(1) && !h.hydrated(3), "marked only once written");
    assert_eq!(h.e.status().hydrating, 2);
    let replies = h.settle_all(a);
    assert_eq!(replies, vec![(2, IoStatus::Ok)]);
    for (r, want) in [(0, false), (1, true), (2, true), (3, true), (4, false)] {
        assert_eq!(h.hydrated(r), want, "region {r}");
    }
    let st = h.e.status();
    assert_eq!((st.regions_filled, st.fills_refused), (2, 1));
    assert_eq!(st.bytes_hydrated, 2 * RB);
    // The fill's regions are committed by the next round, as a copy's are.
    let a = h.req(3, Request::Flush);
    let commits: Vec<_> = a
        .iter()
        .filter(|x| matches!(x, Action::FlushDest { .. }))
        .collect();
    assert_eq!(commits.len(), 1, "the round flushes the destination first");
    let mut acts = a;
    let mut dirty = None;
    while !acts.is_empty() {
        let mut next = Vec::new();
        for x in acts {
            if let Action::CommitMetadata { dirty: d, .. } = &x {
                dirty = Some(d.regions().collect::<Vec<_>>());
            }
            if let Some(op) = op_of(&x) {
                next.extend(h.done(op, IoStatus::Ok));
            }
        }
        acts = next;
    }
    assert_eq!(dirty, Some(vec![1, 2, 3]));
}

#[test]
fn fill_reaching_the_end_takes_the_short_last_region() {
    // 4 regions and a short tail region of 2 KiB.
    let mut h = H::with(4 * 8 + 4, |_| {});
    let a = h.req(
        1,
        Request::Fill {
            offset: 3 * RB,
            len: RB + RB / 2,
        },
    );
    let w = writes_of(&a, 1);
    assert_eq!(
        w.iter()
            .map(|&(_, o, l, at)| (o, l, at))
            .collect::<Vec<_>>(),
        vec![(3 * RB, RB + RB / 2, 0)]
    );
    h.settle_all(a);
    assert!(h.hydrated(3) && h.hydrated(4));
}

#[test]
fn write_that_got_there_first_makes_the_fill_be_dropped() {
    let mut h = H::new(16);
    // A write into region 1 starts its copy, and a full-region write of region 2 is in
    // flight, while a read of regions 1..=3 returned the source's data.
    let a = h.req(
        1,
        Request::Write {
            offset: RB + 512,
            len: 512,
            fua: false,
        },
    );
    let copy = op_of(&a[0]).expect("copy");
    let b = h.req(
        2,
        Request::Write {
            offset: 2 * RB,
            len: RB,
            fua: false,
        },
    );
    let f = h.req(
        3,
        Request::Fill {
            offset: RB,
            len: 3 * RB,
        },
    );
    // Only region 3 is taken: 1 and 2 belong to the writes.
    let w = writes_of(&f, 3);
    assert_eq!(
        w.iter().map(|&(_, o, l, _)| (o, l)).collect::<Vec<_>>(),
        vec![(3 * RB, RB)]
    );
    let mut replies = h.settle_all(f);
    replies.extend(h.settle_all(b));
    let a = h.done(copy, IoStatus::Ok);
    replies.extend(h.settle_all(a));
    replies.sort_unstable_by_key(|&(r, _)| r);
    assert_eq!(
        replies,
        vec![(1, IoStatus::Ok), (2, IoStatus::Ok), (3, IoStatus::Ok)]
    );
    assert_eq!(h.e.status().fills_refused, 2);
    // Once hydrated by the writes, a later fill of the same regions takes nothing.
    let f = h.req(
        4,
        Request::Fill {
            offset: RB,
            len: 2 * RB,
        },
    );
    assert!(writes_of(&f, 4).is_empty(), "{f:?}");
    assert_eq!(h.settle_all(f), vec![(4, IoStatus::Ok)]);
}

#[test]
fn write_arriving_during_a_fill_waits_for_it_and_lands_after_it() {
    let mut h = H::new(16);
    let f = h.req(
        1,
        Request::Fill {
            offset: 0,
            len: 2 * RB,
        },
    );
    let [(fill_op, 0, len, 0)] = writes_of(&f, 1)[..] else {
        panic!("{f:?}")
    };
    assert_eq!(len, 2 * RB);
    // A partial write and a full-region write arrive while the fill's write is in flight:
    // both wait on the fill's record (no copy, no destination write yet).
    let a = h.req(
        2,
        Request::Write {
            offset: 512,
            len: 512,
            fua: false,
        },
    );
    assert!(a.is_empty(), "{a:?}");
    let a = h.req(
        3,
        Request::Write {
            offset: RB,
            len: RB,
            fua: false,
        },
    );
    assert!(a.is_empty(), "{a:?}");
    // The fill's write completes: the regions are hydrated, and only now are the user
    // writes issued, to the destination, after the fill's data (so they win).
    let a = h.done(fill_op, IoStatus::Ok);
    assert!(h.hydrated(0) && h.hydrated(1));
    let mut w = writes_of(&a, 2);
    w.extend(writes_of(&a, 3));
    assert_eq!(
        w.iter().map(|&(_, o, l, _)| (o, l)).collect::<Vec<_>>(),
        vec![(512, 512), (RB, RB)]
    );
    assert!(copy_ops(&a).is_empty());
    let mut replies = h.settle_all(a);
    replies.sort_unstable_by_key(|&(r, _)| r);
    assert_eq!(
        replies,
        vec![(1, IoStatus::Ok), (2, IoStatus::Ok), (3, IoStatus::Ok)]
    );
}

#[test]
fn failed_fill_write_leaves_regions_cold_and_waiting_writes_copy_afresh() {
    let mut h = H::new(16);
    let f = h.req(1, Request::Fill { offset: 0, len: RB });
    let [(fill_op, ..)] = writes_of(&f, 1)[..] else {
        panic!("{f:?}")
    };
    let a = h.req(
        2,
        Request::Write {
            offset: 512,
            len: 512,
            fua: false,
        },
    );
    assert!(a.is_empty());
    let a = h.done(fill_op, IoStatus::Io);
    assert!(!h.hydrated(0), "a failed fill marks nothing");
    assert!(a.iter().any(|x| is_reply(x, 1, IoStatus::Io)), "{a:?}");
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Copy { owner: Some(2), .. })),
        "the waiting write starts a copy: {a:?}"
    );
    let replies = h.settle_all(a);
    assert!(replies.contains(&(2, IoStatus::Ok)));
    assert!(h.hydrated(0));
    assert_eq!(h.e.status().copy_errors, 1);
}

#[test]
fn fill_in_read_only_mode_takes_nothing() {
    let mut h = H::new(16);
    let a = h.req(
        1,
        Request::Write {
            offset: 0,
            len: RB,
            fua: false,
        },
    );
    h.settle_all(a);
    // A failed destination flush of a commit round switches to read-only.
    let a = h.req(2, Request::Flush);
    let flush = a
        .iter()
        .find_map(|x| match *x {
            Action::FlushDest { op } => Some(op),
            _ => None,
        })
        .expect("commit flush");
    let a = h.done(flush, IoStatus::Io);
    h.settle_all(a);
    assert_eq!(h.e.mode(), Mode::ReadOnly);
    let f = h.req(
        3,
        Request::Fill {
            offset: RB,
            len: 2 * RB,
        },
    );
    assert!(writes_of(&f, 3).is_empty(), "{f:?}");
    assert!(f.iter().any(|x| is_reply(x, 3, IoStatus::Ok)));
    assert!(!h.hydrated(1) && !h.hydrated(2));
}

/// Copies of a window far below one piece are paced: with the piece in flight nothing more
/// starts; once it ends, the engine asks to be woken when the gap is over, and only then
/// starts the next piece, by itself (D4: progress whatever the latency).
#[test]
fn paced_copies_wait_out_their_gap_then_go_on_by_themselves() {
    let (mut h, mut a) = busy_harness(HydrationPriority::Background);
    run_busy(&mut h, &mut a, 20, |_| 100_000);
    // Latency a hundred times the idle level, long enough to halve the window to nothing.
    run_busy(&mut h, &mut a, 300, |_| 10_000_000);
    assert!(
        copy_ops(&a).is_empty(),
        "the last paced copy ended: the next waits for its gap: {a:?}"
    );
    // The first wake-up is the end of that gap: one piece, alone.
    let wake =
        h.e.next_deadline()
            .expect("a wake-up for the end of the gap");
    let a = h.advance(wake - h.now);
    let copies: Vec<OpId> = copy_ops(&a);
    assert_eq!(copies.len(), 1, "one paced piece: {a:?}");
    // It takes 2 ms; nothing else starts meanwhile.
    let during = h.advance(MS);
    assert!(copy_ops(&during).is_empty(), "{during:?}");
    h.now += MS;
    let after = h.done(copies[0], IoStatus::Ok);
    assert!(copy_ops(&after).is_empty(), "{after:?}");
    let wake =
        h.e.next_deadline()
            .expect("a wake-up for the end of the gap");
    assert!(
        wake > h.now && wake <= h.now + window::MAX_GAP,
        "woken {} after the copy ended",
        wake.saturating_sub(h.now)
    );
    let early = h.advance(wake - h.now - 1);
    assert!(copy_ops(&early).is_empty(), "{early:?}");
    let next = h.advance(1);
    assert_eq!(
        copy_ops(&next).len(),
        1,
        "the next piece starts when the gap is over: {next:?}"
    );
}
