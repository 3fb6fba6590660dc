//! One test per upstream dm-clone fix (F1-F8) and per hazard found by reading the kernel
//! (H1-H4), on the whole stack: engine, driver, the real metadata store, and simulated or
//! real devices. (Engine-level and parser-level variants live beside the code they test.)

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clonebd_core::dmclone::{MetadataMode, StatusInfo, format_status};
use clonebd_core::engine::{Action, Config, Control, Engine, Input, IoStatus, Request, SharedView};
use clonebd_core::{AlignedBuf, BlockDev, Caps, Clock, Geometry, HydrationMap};
use clonebd_driver::exec::{Devices, ReqBuf, SPARSE_COPY, execute_data, execute_metadata, op_of};
use clonebd_driver::{
    BlockExport, IoError, MetadataBackend, MonotonicClock, StoreBackend, Volume, VolumeOptions,
};
use clonebd_io::{FileDevice, OpenOptions};
use clonebd_metadata::{MetadataStore, StoreOptions};
use clonebd_testkit::{CutStyle, Rng, SimDisk, Trace, TraceOp};

const KIB: u64 = 1024;

fn random_disk(name: &str, size: u64, seed: u64) -> SimDisk {
    let mut b = vec![0u8; size as usize];
    Rng::new(seed).fill(&mut b);
    SimDisk::from_bytes(name, b)
}

fn open_store(meta: &SimDisk, g: Geometry) -> (MetadataStore<SimDisk>, HydrationMap) {
    MetadataStore::open(meta.clone(), g, StoreOptions::default()).expect("open metadata")
}

/// A volume on simulated disks with the real metadata store.
fn sim_volume(
    g: Geometry,
    src: &SimDisk,
    dst: &SimDisk,
    meta: &SimDisk,
    tune: impl FnOnce(&mut Config),
) -> Volume {
    let (store, map) = open_store(meta, g);
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    tune(&mut cfg);
    Volume::start(
        VolumeOptions {
            engine: cfg,
            copy_threads: 2,
            copy_chunk: clonebd_driver::exec::COPY_CHUNK,
            sparse: true,
        },
        Arc::new(src.clone()),
        Arc::new(dst.clone()),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    )
}

/// F1 (e6a505f3f9fa): a commit must write exactly the regions of its transaction, never the
/// whole in-core words. Hold a commit between the dirty-set swap and the metadata write,
/// finish hydrating a neighbour in the same 64-region word, cut the power dropping the
/// destination's unflushed writes: the on-disk bitmap must not contain the neighbour.
#[test]
fn f1_commit_writes_only_the_exact_regions_of_its_transaction() {
    let g = Geometry::new(128 * 8, 8).expect("geometry");
    let src = random_disk("source", g.target_bytes(), 1);
    let dst = SimDisk::new("dest", g.target_bytes());
    let meta = SimDisk::new("meta", 256 * KIB);
    let (store, map) = open_store(&meta, g);
    let mut backend = StoreBackend::new(store);
    let view = Arc::new(SharedView::new(map));
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    let mut e = Engine::new(cfg, Arc::clone(&view), 0);
    let mut scratch = AlignedBuf::new(0);
    let devs = Devices {
        source: &src,
        dest: &dst,
    };
    let drain =
        |e: &mut Engine| -> Vec<Action> { std::iter::from_fn(|| e.poll_action()).collect() };
    e.apply(0, Input::Control(Control::Resume));
    drain(&mut e);

    // Region 0 hydrated by a full-region write.
    let data = vec![0x5a; 4096];
    e.apply(
        0,
        Input::Request(
            1,
            Request::Write {
                offset: 0,
                len: 4096,
                fua: false,
            },
        ),
    );
    for a in drain(&mut e) {
        let st = execute_data(
            &devs,
            &a,
            &mut ReqBuf::Write(&data),
            SPARSE_COPY,
            &mut scratch,
        )
        .expect("data action")
        .0;
        e.apply(0, Input::Completed(op_of(&a).expect("op"), st));
    }
    drain(&mut e);
    // A flush starts a round: the dirty set {0} is swapped out; the destination flush is held.
    e.apply(0, Input::Request(2, Request::Flush));
    let acts = drain(&mut e);
    let [Action::FlushDest { op: flush_op }] = acts[..] else {
        panic!("{acts:?}")
    };
    // Region 1, in the same 64-bit word, is hydrated by a copy meanwhile.
    e.apply(
        0,
        Input::Request(
            3,
            Request::Hydrate {
                offset: 4096,
                len: 4096,
            },
        ),
    );
    for a in drain(&mut e) {
        if let Some((st, _)) = execute_data(&devs, &a, &mut ReqBuf::None, SPARSE_COPY, &mut scratch)
        {
            e.apply(0, Input::Completed(op_of(&a).expect("op"), st));
        }
    }
    drain(&mut e);
    assert!(view.map().is_hydrated(1), "region 1 hydrated in core");
    // Now the round goes on: destination flush, then the metadata write.
    let st = execute_data(
        &devs,
        &Action::FlushDest { op: flush_op },
        &mut ReqBuf::None,
        SPARSE_COPY,
        &mut scratch,
    );
    e.apply(0, Input::Completed(flush_op, st.expect("flush").0));
    let acts = drain(&mut e);
    let commit = acts
        .iter()
        .find(|a| matches!(a, Action::CommitMetadata { .. }))
        .expect("commit");
    let st = execute_metadata(&mut backend, view.map(), commit).expect("metadata action");
    assert_eq!(st, IoStatus::Ok);
    // Region 1's copy was never flushed: a power cut loses it.
    dst.power_cut(&mut Rng::new(0), CutStyle::LoseAll);
    drop(backend);
    let (_, map) = open_store(&meta, g);
    assert!(map.is_hydrated(0), "region 0 was committed");
    assert!(
        !map.is_hydrated(1),
        "region 1 must not be committed with region 0's word (F1)"
    );
}

/// F2/F3 (8fdbfe8d1690, 8b3fd1f53af3): a commit flushes the destination before it writes
/// any metadata, and writes the superblock last; a flush with changes pending sends exactly
/// one flush to the destination; a flush with nothing changed touches no metadata.
#[test]
fn f2_f3_destination_is_flushed_before_metadata_and_superblock_is_written_last() {
    let g = Geometry::new(64 * 8, 8).expect("geometry");
    let trace = Trace::new();
    let src = random_disk("source", g.target_bytes(), 2);
    let dst = SimDisk::new("dest", g.target_bytes()).with_trace(&trace);
    let meta = SimDisk::new("meta", 256 * KIB).with_trace(&trace);
    let vol = sim_volume(g, &src, &dst, &meta, |_| {});
    vol.write(8192 + 512, &[7u8; 512], false)
        .expect("write (copies region 2)");
    trace.clear();
    vol.flush().expect("flush");
    let ev = trace.events();
    let pos = |f: &dyn Fn(&clonebd_testkit::TraceEvent) -> bool| ev.iter().position(f);
    let dest_flushes = ev
        .iter()
        .filter(|e| e.disk == "dest" && e.op == TraceOp::Flush)
        .count();
    assert_eq!(dest_flushes, 1, "exactly one destination flush: {ev:?}");
    let dest_flush = pos(&|e| e.disk == "dest" && e.op == TraceOp::Flush).expect("dest flush");
    let first_meta_write =
        pos(&|e| e.disk == "meta" && matches!(e.op, TraceOp::Write { .. })).expect("meta write");
    let sb = ev
        .iter()
        .rposition(|e| {
            e.disk == "meta"
                && e.op
                    == TraceOp::Write {
                        offset: 0,
                        len: 4096,
                    }
        })
        .expect("superblock write");
    assert!(
        dest_flush < first_meta_write,
        "destination flushed before metadata: {ev:?}"
    );
    assert!(
        ev[first_meta_write..sb]
            .iter()
            .any(|e| e.disk == "meta" && e.op == TraceOp::Flush),
        "metadata blocks flushed before the superblock: {ev:?}"
    );
    assert!(
        ev[sb + 1..]
            .iter()
            .any(|e| e.disk == "meta" && e.op == TraceOp::Flush),
        "superblock flushed: {ev:?}"
    );
    assert!(
        !ev[sb + 1..]
            .iter()
            .any(|e| e.disk == "meta" && matches!(e.op, TraceOp::Write { .. })),
        "the superblock is the last metadata write: {ev:?}"
    );
    // Nothing changed since: the next flush goes to the destination alone.
    trace.clear();
    vol.flush().expect("flush");
    let ev = trace.events();
    assert_eq!(
        ev.iter()
            .filter(|e| e.disk == "dest" && e.op == TraceOp::Flush)
            .count(),
        1
    );
    assert!(
        ev.iter().all(|e| e.disk != "meta"),
        "no metadata I/O without changes: {ev:?}"
    );
    assert!(vol.shutdown().is_ok());
}

/// F4 (4b5142905d4f): a discard inside one region, touching neither boundary, must not
/// discard anything on the destination or mark anything; discards of the short last region
/// and ranges ending exactly on a boundary touch only the regions they cover.
#[test]
fn f4_partial_region_discards_leave_destination_unchanged() {
    // 20 regions of 64 sectors (32 KiB) plus a 24-sector tail.
    let g = Geometry::new(20 * 64 + 24, 64).expect("geometry");
    let src = random_disk("source", g.target_bytes(), 4);
    let dst = SimDisk::new("dest", g.target_bytes());
    dst.set_discard_zeroes(true);
    let meta = SimDisk::new("meta", 256 * KIB);
    let vol = sim_volume(g, &src, &dst, &meta, |_| {});
    let pattern = vec![0xa5u8; g.target_bytes() as usize];
    vol.write(0, &pattern, false).expect("write everything");
    vol.flush().expect("flush");
    let before = dst.snapshot();
    let hydrated = vol.status().engine.nr_hydrated;
    let r = 64 * 512;
    vol.discard(r + 5 * 512, 15 * 512)
        .expect("discard inside region 1");
    assert_eq!(
        dst.snapshot(),
        before,
        "nothing discarded on the destination"
    );
    let tail = 20 * r;
    vol.discard(tail + 512, 8 * 512)
        .expect("discard inside the tail region");
    assert_eq!(dst.snapshot(), before);
    assert_eq!(vol.status().engine.nr_hydrated, hydrated);
    // Ending exactly on a boundary: [R+512, 3R) covers region 2 only.
    vol.discard(r + 512, 2 * r - 512).expect("discard");
    let after = dst.snapshot();
    let changed: Vec<usize> = (0..after.len())
        .step_by(512)
        .filter(|&o| after[o..o + 512] != before[o..o + 512])
        .collect();
    assert_eq!(changed.first().copied(), Some(2 * r as usize));
    assert_eq!(changed.last().copied(), Some(3 * r as usize - 512));
    assert!(vol.shutdown().is_ok());
}

fn sparse_file(dir: &std::path::Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(size).expect("set_len");
    p
}

/// F6 (9fc06ff56845): region-to-sector arithmetic is 64-bit: writes, discards and batched
/// copies above 2^32 sectors hit exactly their own sectors. Sparse 4 TiB files, 64 KiB
/// regions.
#[test]
fn f6_io_above_two_to_the_32_sectors_hits_exactly_its_sectors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4u64 << 40;
    let srcp = sparse_file(dir.path(), "src", size);
    let dstp = sparse_file(dir.path(), "dst", size);
    let metap = sparse_file(dir.path(), "meta", 0);
    let g = Geometry::new(size / 512, 128).expect("geometry");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&metap)
        .and_then(|f| f.set_len(clonebd_metadata::required_metadata_bytes(&g) + (1 << 20)))
        .expect("metadata size");
    let rb = g.region_bytes();
    // Region k lies above 2^32 sectors (2 TiB).
    let k = (3u64 << 40) / rb + 7;
    let base = k * rb;
    // Source content at regions k..k+3.
    let pattern: Vec<u8> = (0..3 * rb).map(|i| (i % 251) as u8 + 1).collect();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&srcp)
            .expect("open source");
        f.seek(SeekFrom::Start(base)).expect("seek");
        f.write_all(&pattern).expect("write source");
    }
    let src = FileDevice::open(&srcp, OpenOptions::read_only()).expect("src");
    let dst = FileDevice::open(&dstp, OpenOptions::read_write()).expect("dst");
    let meta = FileDevice::open(&metap, OpenOptions::read_write()).expect("meta");
    let (store, map) = MetadataStore::open(meta, g, StoreOptions::default()).expect("metadata");
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    let vol = Volume::start(
        VolumeOptions {
            engine: cfg,
            copy_threads: 2,
            copy_chunk: clonebd_driver::exec::COPY_CHUNK,
            sparse: true,
        },
        Arc::new(src),
        Arc::new(dst),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    );
    // A batched copy of three regions (one I/O of 3R).
    vol.hydrate(base, 3 * rb).expect("hydrate");
    // A partial write to region k+3 (copies it, then writes 4 KiB into it).
    vol.write(base + 3 * rb + 8192, &[0xee; 4096], false)
        .expect("write");
    // A discard of region k+5 (passdown punches a hole).
    vol.discard(base + 5 * rb, rb).expect("discard");
    vol.flush().expect("flush");
    let st = vol.status();
    assert_eq!(st.engine.nr_hydrated, 5, "regions k..k+3 and k+5");
    let map = vol.view().map();
    assert!(map.is_range_hydrated(k, 4) && !map.is_hydrated(k + 4) && map.is_hydrated(k + 5));
    assert!(!map.is_hydrated(k - 1) && !map.is_hydrated(k + 6));
    assert!(vol.shutdown().is_ok());
    // The destination alone: regions k..k+2 equal the source, region k+3 is the source's
    // (zeros) with the write, everything around is untouched (zeros).
    let dst = FileDevice::open(&dstp, OpenOptions::read_only()).expect("dst");
    let mut buf = vec![0u8; (7 * rb) as usize];
    dst.read_at(&mut buf, base - rb).expect("read dest");
    let (r0, rest) = buf.split_at(rb as usize);
    assert!(r0.iter().all(|&b| b == 0), "region k-1 untouched");
    assert_eq!(
        &rest[..(3 * rb) as usize],
        &pattern[..],
        "regions k..k+2 copied to their own sectors"
    );
    let r3 = &rest[(3 * rb) as usize..(4 * rb) as usize];
    assert!(r3[..8192].iter().all(|&b| b == 0) && r3[8192..12288].iter().all(|&b| b == 0xee));
    assert!(
        rest[(4 * rb) as usize..].iter().all(|&b| b == 0),
        "regions k+4..k+5 zero"
    );
}

/// F7 (81d5553d1288): with 2^31 regions all hydrated, the count prints as an unsigned
/// number. An 8 TiB clone at 4 KiB regions, wholly discarded.
#[test]
fn f7_two_to_the_31_hydrated_regions_are_counted_unsigned() {
    let g = Geometry::new(8u64 << 31, 8).expect("geometry");
    assert_eq!(g.nr_regions(), 1 << 31);
    let view = Arc::new(SharedView::new(HydrationMap::new(g.nr_regions())));
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    cfg.discard_passdown = false;
    let mut e = Engine::new(cfg, Arc::clone(&view), 0);
    e.apply(0, Input::Control(Control::Resume));
    e.apply(
        0,
        Input::Request(
            1,
            Request::Discard {
                offset: 0,
                len: g.target_bytes(),
            },
        ),
    );
    let acts: Vec<Action> = std::iter::from_fn(|| e.poll_action()).collect();
    assert!(acts.contains(&Action::Reply {
        req: 1,
        status: IoStatus::Ok
    }));
    let s = e.status();
    let line = format_status(&StatusInfo {
        md_used: 0,
        md_total: 0,
        region_sectors: 8,
        nr_hydrated: s.nr_hydrated,
        nr_regions: s.nr_regions,
        hydrating: s.hydrating,
        hydration_enabled: s.hydration_enabled,
        discard_passdown: s.discard_passdown,
        hydration_threshold: s.hydration_threshold,
        hydration_batch_size: s.hydration_batch_size,
        mode: MetadataMode::ReadWrite,
    });
    assert!(line.contains(" 2147483648/2147483648 "), "{line}");
}

/// A clock that notices being read by the volume's own threads after shutdown.
struct WatchClock {
    inner: MonotonicClock,
    stopped: AtomicBool,
    late_reads: AtomicU64,
}

impl Clock for WatchClock {
    fn now(&self) -> u64 {
        let internal = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("clonebd-"));
        if internal && self.stopped.load(Ordering::Acquire) {
            self.late_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.now()
    }
}

/// F8 (e4b5957c6f74): the periodic worker must never run after teardown, even when a resume
/// races the shutdown. Many start/resume/shutdown cycles with concurrent resumes; after
/// shutdown returns, no thread of the volume may run.
#[test]
fn f8_no_periodic_work_runs_after_shutdown_even_with_concurrent_resume() {
    let g = Geometry::new(64 * 8, 8).expect("geometry");
    for i in 0..50 {
        let src = random_disk("source", g.target_bytes(), i);
        let dst = SimDisk::new("dest", g.target_bytes());
        let meta = SimDisk::new("meta", 256 * KIB);
        let (store, map) = open_store(&meta, g);
        let clock = Arc::new(WatchClock {
            inner: MonotonicClock::new(),
            stopped: AtomicBool::new(false),
            late_reads: AtomicU64::new(0),
        });
        let mut cfg = Config::new(g);
        cfg.hydration_threshold = 4;
        let vol = Volume::start(
            VolumeOptions {
                engine: cfg,
                copy_threads: 2,
                copy_chunk: clonebd_driver::exec::COPY_CHUNK,
                sparse: true,
            },
            Arc::new(src),
            Arc::new(dst),
            Box::new(StoreBackend::new(store)),
            map,
            Arc::clone(&clock) as Arc<dyn Clock>,
        );
        vol.write(0, &[1u8; 512], false).expect("write");
        let v2 = vol.clone();
        let racer = std::thread::spawn(move || {
            for _ in 0..20 {
                v2.control(Control::Resume);
            }
        });
        let st = vol.shutdown();
        clock.stopped.store(true, Ordering::Release);
        racer.join().expect("racer");
        assert!(st.is_ok(), "cycle {i}: shutdown commit {st:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(
            clock.late_reads.load(Ordering::Relaxed),
            0,
            "cycle {i}: a volume thread ran after shutdown"
        );
    }
}

/// A device whose reads take `delay`: holds a copy in flight.
struct Slow<D> {
    dev: D,
    delay: std::time::Duration,
}

impl<D: BlockDev> BlockDev for Slow<D> {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.dev.flush()
    }
}

/// H1: a discard covering a region whose copy is in flight must not mark it until the copy
/// is done, or a write acknowledged meanwhile could be overwritten by the copy's source
/// data. Threads, real store: a slow source read holds the copy while the discard and a
/// write arrive.
#[test]
fn h1_discard_during_copy_never_loses_a_later_write() {
    let g = Geometry::new(16 * 8, 8).expect("geometry");
    let src = random_disk("source", g.target_bytes(), 11);
    let dst = SimDisk::new("dest", g.target_bytes());
    dst.set_caps(Caps {
        discard: false,
        write_zeroes: false,
        volatile_cache: true,
    });
    let meta = SimDisk::new("meta", 256 * KIB);
    let (store, map) = open_store(&meta, g);
    let mut cfg = Config::new(g);
    cfg.hydration_enabled = false;
    cfg.discard_passdown = false;
    let slow = Slow {
        dev: src.clone(),
        delay: std::time::Duration::from_millis(40),
    };
    let vol = Volume::start(
        VolumeOptions {
            engine: cfg,
            copy_threads: 2,
            copy_chunk: clonebd_driver::exec::COPY_CHUNK,
            sparse: true,
        },
        Arc::new(slow),
        Arc::new(dst.clone()),
        Box::new(StoreBackend::new(store)),
        map,
        Arc::new(MonotonicClock::new()),
    );
    let pause = || std::thread::sleep(std::time::Duration::from_millis(5));
    for round in 0..8u8 {
        let off = u64::from(round) * 4096;
        let v1 = vol.clone();
        // A partial write starts a copy of the region (its source read takes 40 ms).
        let w1 = std::thread::spawn(move || v1.write(off + 512, &[round; 512], false));
        pause();
        // While it is in flight: a discard of the region, then a write to it.
        let v2 = vol.clone();
        let d = std::thread::spawn(move || v2.discard(off, 4096));
        pause();
        let v3 = vol.clone();
        let w2 = std::thread::spawn(move || v3.write(off, &[round ^ 0xff; 512], false));
        w1.join().expect("w1").expect("write 1");
        d.join().expect("d").expect("discard");
        w2.join().expect("w2").expect("write 2");
        let mut b = [0u8; 512];
        dst.read_at(&mut b, off).expect("read");
        assert_eq!(
            b,
            [round ^ 0xff; 512],
            "round {round}: the acknowledged write must survive the copy"
        );
        dst.read_at(&mut b, off + 512).expect("read");
        assert_eq!(b, [round; 512], "round {round}");
    }
    assert!(vol.shutdown().is_ok());
}

/// H2: one process owns a metadata device at a time: a second opener is refused, naming
/// the path.
#[test]
fn h2_a_second_owner_of_the_metadata_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = sparse_file(dir.path(), "meta", 4 << 20);
    let _first = FileDevice::open(&p, OpenOptions::read_write().exclusive(true)).expect("first");
    let err = FileDevice::open(&p, OpenOptions::read_write().exclusive(true)).expect_err("second");
    let msg = err.to_string();
    assert!(
        msg.contains("in use") && msg.contains(&p.display().to_string()),
        "{msg}"
    );
}

/// H3: shutdown commits. Writes hydrate regions, nobody flushes, the volume shuts down:
/// the metadata must hold them (the kernel's destructor alone would not commit).
#[test]
fn h3_shutdown_commits_without_an_explicit_flush() {
    let g = Geometry::new(64 * 8, 8).expect("geometry");
    let src = random_disk("source", g.target_bytes(), 3);
    let dst = SimDisk::new("dest", g.target_bytes());
    let meta = SimDisk::new("meta", 256 * KIB);
    let vol = sim_volume(g, &src, &dst, &meta, |c| c.commit_interval = u64::MAX / 4);
    vol.write(0, &[1u8; 4096 * 3], false).expect("write");
    vol.write(10 * 4096 + 512, &[2u8; 512], false)
        .expect("write");
    assert!(vol.shutdown().is_ok());
    // Power cut after the shutdown: only what was flushed counts.
    meta.power_cut(&mut Rng::new(3), CutStyle::LoseAll);
    dst.power_cut(&mut Rng::new(3), CutStyle::LoseAll);
    let (_, map) = open_store(&meta, g);
    assert_eq!(map.hydrated_ranges(), vec![(0, 3), (10, 1)]);
    let mut b = [0u8; 512];
    dst.read_at(&mut b, 10 * 4096 + 512).expect("read");
    assert_eq!(b, [2u8; 512]);
}

/// H4 (discard errors): a discard the destination fails is reported to the caller instead
/// of being swallowed as success.
#[test]
fn h4_discard_errors_are_reported() {
    let g = Geometry::new(16 * 8, 8).expect("geometry");
    let src = random_disk("source", g.target_bytes(), 5);
    let dst = SimDisk::new("dest", g.target_bytes());
    let meta = SimDisk::new("meta", 256 * KIB);
    let vol = sim_volume(g, &src, &dst, &meta, |_| {});
    dst.inject_fault(
        clonebd_testkit::FaultOp::Discard,
        None,
        Some(1),
        std::io::ErrorKind::Other,
    );
    assert_eq!(vol.discard(0, 4096), Err(IoError::Io));
    assert_eq!(vol.discard(0, 4096), Ok(()));
    assert!(vol.shutdown().is_ok());
}

#[test]
fn metadata_backend_usage_matches_the_store() {
    let g = Geometry::new(32768 * 8, 8).expect("geometry");
    let meta = SimDisk::new("meta", 8 << 20);
    let (store, _) = open_store(&meta, g);
    let b = StoreBackend::new(store);
    // The kernel shows 7/2048 for this geometry on 8 MiB of metadata.
    assert_eq!((b.usage().used, b.usage().total), (7, 2048));
}
