//! The real `clonebd run` binary driven by real NBD clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy, fio's nbd engine, and our own client), over a unix socket and TCP at once.
//!
//! Every test keeps an expected image (the source overlaid with what the test wrote) and the
//! set of regions it expects hydrated, and checks the export, the hydration map and finally the
//! destination file alone against them. The source is checksummed before and after.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use clonebd_core::dmclone::{StatusLine, format_status_line, parse_status};
use clonebd_nbd::{ClientOptions, Extent};
use common::daemon::{Daemon, Files, checksum, clonebd, first_difference, have, run};

const SIZE: u64 = 32 << 20;
const REGION: u64 = 64 << 10;
const HYDRATED: &str = "clonebd:hydrated";

/// What the clone must hold: the source overlaid with the test's writes, and which regions
/// the test's requests hydrated.
struct Expected {
    data: Vec<u8>,
    hydrated: BTreeSet<u64>,
}

impl Expected {
    fn new(files: &Files) -> Self {
        Self {
            data: files.source_bytes(),
            hydrated: BTreeSet::new(),
        }
    }

    fn touch(&mut self, offset: u64, len: u64) {
        self.hydrated
            .extend(offset / REGION..(offset + len).div_ceil(REGION));
    }

    fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        self.data[offset as usize..(offset + len) as usize].fill(byte);
        self.touch(offset, len);
    }

    /// A discard: whole regions become the destination's (zeros, the destination being
    /// sparse and never written there); partial regions at either end are ignored (SPEC 3.6).
    fn discard(&mut self, offset: u64, len: u64) {
        let (first, end) = (offset.div_ceil(REGION), (offset + len) / REGION);
        for r in first..end {
            self.data[(r * REGION) as usize..((r + 1) * REGION) as usize].fill(0);
            self.hydrated.insert(r);
        }
    }

    /// The hydration map as `nbdinfo --map` prints it: (offset, length, hydrated) runs.
    fn map(&self, size: u64) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for r in 0..size.div_ceil(REGION) {
            let t = u64::from(self.hydrated.contains(&r));
            let len = REGION.min(size - r * REGION);
            match out.last_mut() {
                Some(last) if last.2 == t => last.1 += len,
                _ => out.push((r * REGION, len, t)),
            }
        }
        out
    }

    fn save(&self, files: &Files) -> String {
        let p = files.path("expected.img");
        std::fs::write(&p, &self.data).unwrap();
        p.display().to_string()
    }
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &a);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed:"), "{out}");
    out
}

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&run("nbdinfo", &a)).expect("nbdinfo JSON")
}

/// `nbdinfo --map=clonebd:hydrated` as (offset, length, type) runs.
fn hydrated_map(d: &Daemon) -> Vec<(u64, u64, u64)> {
    d.hydrated_map()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = first_difference(got, want) {
        panic!("{what}: {d}");
    }
}

fn have_all(programs: &[&str]) -> bool {
    programs.iter().all(|p| have(p))
}

/// qemu-io's commands over both sockets, qemu-img compare and convert, nbdinfo's size, block
/// sizes and hydration map, fio with crc32c verification over four connections at once, NBD
/// CACHE through our client, then full hydration and a clean stop: the destination alone must
/// then equal the expected image, and the source must be unchanged.
#[test]
fn real_clients_see_the_expected_image_and_the_destination_ends_equal_to_it() {
    if !have_all(&["qemu-io", "qemu-img", "nbdinfo", "fio"]) {
        return;
    }
    let files = Files::new(SIZE, 1);
    let source_sum = checksum(&files.source);
    let d = Daemon::start(&files, &["--no-hydration"]);
    let mut want = Expected::new(&files);

    // nbdinfo: size, block sizes (logical block, region, 32 MiB) and what is advertised.
    let info = nbdinfo_json(&[&d.unix_uri()]);
    let e = &info["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(SIZE), "{info}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512));
    assert_eq!(e["block_size_preferred"].as_u64(), Some(REGION));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20));
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_cache",
        "can_multi_conn",
    ] {
        assert_eq!(e[cap].as_bool(), Some(true), "{cap}: {info}");
    }
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(contexts.contains(&HYDRATED), "{info}");
    assert_eq!(hydrated_map(&d), vec![(0, SIZE, 0)], "nothing hydrated yet");

    // qemu-io over the unix socket: partial-region writes (copy first), a FUA full-region
    // overwrite, several whole regions, write-zeroes, a discard, a flush, and reads that
    // check patterns through the export.
    let unix = d.unix_uri();
    let mut cmds: Vec<String> = Vec::new();
    let mut write = |w: &mut Expected, off: u64, len: u64, byte: u8, fua: bool| {
        let f = if fua { "-f " } else { "" };
        cmds.push(format!("write {f}-P {byte:#x} {off} {len}"));
        w.fill(off, len, byte);
    };
    write(&mut want, 4096, 8192, 0xab, false);
    write(&mut want, REGION * 16, REGION, 0xcd, true);
    write(&mut want, REGION * 32, REGION * 3, 0x11, false);
    write(&mut want, REGION * 40 + 512, 1536, 0x5a, true);
    write(&mut want, REGION * 41 - 512, 1024, 0x77, false);
    cmds.push(format!("write -z {} {}", REGION * 48, REGION * 2));
    want.fill(REGION * 48, REGION * 2, 0);
    cmds.push(format!("write -z {} {}", REGION * 52 + 4096, 8192));
    want.fill(REGION * 52 + 4096, 8192, 0);
    // Whole region 64; the partial ends in 63 and 65 are ignored.
    cmds.push(format!(
        "discard {} {}",
        REGION * 63 + 4096,
        REGION * 3 - 8192
    ));
    want.discard(REGION * 63 + 4096, REGION * 3 - 8192);
    cmds.push("flush".into());
    cmds.push("read -P 0xab 4096 8192".to_string());
    cmds.push(format!("read -P 0xcd {} {}", REGION * 16, REGION));
    cmds.push(format!("read -P 0 {} {}", REGION * 48, REGION * 2));
    cmds.push(format!("read -P 0 {} {}", REGION * 64, REGION));
    let out = qemu_io(&unix, &cmds);
    assert!(out.contains("wrote 65536/65536"), "{out}");

    // qemu-io over TCP: more writes, and reads of what the unix connection wrote.
    let tcp = d.tcp_uri();
    let mut cmds = vec![
        format!("write -P 0x22 {} 4096", REGION * 80 + REGION - 4096),
        format!("write -f -P 0x33 {} {}", REGION * 90, REGION * 2),
        "flush".to_string(),
        format!("read -P 0x11 {} {}", REGION * 32, REGION * 3),
        format!("read -P 0x5a {} 1536", REGION * 40 + 512),
        format!("read -P 0x77 {} 1024", REGION * 41 - 512),
    ];
    want.fill(REGION * 80 + REGION - 4096, 4096, 0x22);
    want.fill(REGION * 90, REGION * 2, 0x33);
    cmds.push(format!("read -P 0x22 {} 4096", REGION * 80 + REGION - 4096));
    qemu_io(&tcp, &cmds);

    // The hydration map is exactly the regions written, zeroed or discarded.
    assert_eq!(hydrated_map(&d), want.map(SIZE), "after qemu-io");

    // fio: random reads and writes verified with crc32c, two connections on each socket,
    // queue depth 32, each job on its own 4 MiB.
    let fio_base = 8u64 << 20;
    let job = files.path("verify.fio");
    let mut text = String::from(
        "[global]\nioengine=nbd\nrw=randrw\nbsrange=512-64k\nbs_unaligned=0\niodepth=32\n\
         size=4m\nverify=crc32c\ndo_verify=1\nverify_fatal=1\nverify_state_save=0\n\
         randrepeat=0\n",
    );
    for (i, uri) in [&unix, &unix, &tcp, &tcp].iter().enumerate() {
        text += &format!(
            "[job{i}]\nuri={uri}\noffset={}\n",
            fio_base + (i as u64) * (4 << 20)
        );
    }
    std::fs::write(&job, text).unwrap();
    let out = run("fio", &[job.to_str().unwrap(), "--output-format=terse"]);
    assert!(!out.contains("verify:"), "{out}");
    let json = d.ctl_ok("status", &["--json", "--noflush"]);
    let s: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(s["total_connections"].as_u64().unwrap() >= 4 + 4, "{s}");

    // What fio left (verified by fio itself) becomes part of the expected image; everything it
    // did not write must still read as the source.
    let mut c = ClientOptions::new("clonebd")
        .meta_context(HYDRATED)
        .connect_unix(&d.socket)
        .unwrap();
    let mut area = vec![0u8; 16 << 20];
    c.read(fio_base, &mut area).unwrap();
    let fio_regions = c.block_status(HYDRATED, fio_base, 16 << 20).unwrap();
    let mut at = fio_base;
    for Extent { length, flags } in fio_regions {
        if flags & 1 == 0 {
            let (a, b) = ((at - fio_base) as usize, (at - fio_base + length) as usize);
            assert_same(
                "unhydrated fio area",
                &area[a..b],
                &want.data[at as usize..(at + length) as usize],
            );
        }
        at += length;
    }
    assert_eq!(at, fio_base + (16 << 20));
    want.data[fio_base as usize..(fio_base as usize + area.len())].copy_from_slice(&area);
    let fio_hydrated: BTreeSet<u64> = {
        let mut set = BTreeSet::new();
        let mut at = fio_base;
        for e in c.block_status(HYDRATED, fio_base, 16 << 20).unwrap() {
            if e.flags & 1 != 0 {
                set.extend(at / REGION..(at + e.length) / REGION);
            }
            at += e.length;
        }
        set
    };
    assert!(!fio_hydrated.is_empty());
    want.hydrated.extend(fio_hydrated);

    // NBD CACHE hydrates exactly the regions it touches (SPEC D6), content unchanged.
    let cache_at = (24u64 << 20) + REGION + 4096;
    c.cache(cache_at, 2 * REGION).unwrap();
    want.touch(cache_at, 2 * REGION);
    let around = c
        .block_status(HYDRATED, 24 << 20, 8 * REGION)
        .unwrap()
        .iter()
        .map(|e| (e.length, e.flags))
        .collect::<Vec<_>>();
    assert_eq!(
        around,
        vec![(REGION, 0), (3 * REGION, 1), (4 * REGION, 0)],
        "after CACHE"
    );
    assert_eq!(hydrated_map(&d), want.map(SIZE), "after fio and CACHE");

    // qemu-img compare against the expected image, and convert out of the export.
    let expected_img = want.save(&files);
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &expected_img, &unix],
    );
    assert!(out.contains("Images are identical"), "{out}");
    let converted = files.path("converted.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &tcp,
            converted.to_str().unwrap(),
        ],
    );
    assert_same(
        "qemu-img convert",
        &std::fs::read(&converted).unwrap(),
        &want.data,
    );
    c.disconnect().unwrap();

    // Hydrate everything, stop, and look at the destination alone.
    d.ctl_ok("message", &["enable_hydration"]);
    d.ctl_ok("wait", &["--timeout", "120", "--no-progress"]);
    assert_eq!(hydrated_map(&d), vec![(0, SIZE, 1)], "after hydration");
    let line = d.ctl_ok("status", &[]);
    let Ok(StatusLine::Info(st)) = parse_status(line.trim()) else {
        panic!("status: {line}");
    };
    assert_eq!((st.nr_hydrated, st.nr_regions), (512, 512), "{line}");
    let exit = d.terminate();
    assert!(exit.success(), "clonebd run exited with {exit}");
    assert_same(
        "destination after hydration",
        &files.dest_bytes(),
        &want.data,
    );
    assert_eq!(checksum(&files.source), source_sum, "the source changed");
    let out = clonebd(&["check", files.meta.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// nbdcopy into the export (zero runs become write-zeroes) and back out.
#[test]
fn nbdcopy_in_and_out_round_trips_and_hydrates_what_it_writes() {
    nbdcopy_round_trip(&[]);
}

/// The same with connections served by threads instead of io_uring.
#[test]
fn nbdcopy_round_trips_with_threaded_connections() {
    nbdcopy_round_trip(&["--no-nbd-io-uring"]);
}

fn nbdcopy_round_trip(extra: &[&str]) {
    if !have_all(&["nbdcopy", "nbdinfo"]) {
        return;
    }
    let files = Files::new(SIZE, 2);
    let source_sum = checksum(&files.source);
    let mut args = vec!["--no-hydration"];
    args.extend_from_slice(extra);
    let d = Daemon::start(&files, &args);
    // An input image: random data with runs of zeros.
    let mut input = vec![0u8; SIZE as usize];
    common::daemon::Rng::new(3).fill(&mut input);
    for i in (0..SIZE as usize).step_by(3 << 20) {
        input[i..i + (1 << 20)].fill(0);
    }
    let input_path = files.path("input.img");
    std::fs::write(&input_path, &input).unwrap();
    run("nbdcopy", &[input_path.to_str().unwrap(), &d.unix_uri()]);
    let out_path = files.path("out.img");
    run("nbdcopy", &[&d.tcp_uri(), out_path.to_str().unwrap()]);
    assert_same("nbdcopy out", &std::fs::read(&out_path).unwrap(), &input);
    // Every region was written or zeroed: all of them are hydrated.
    assert_eq!(hydrated_map(&d), vec![(0, SIZE, 1)]);
    assert!(d.terminate().success());
    assert_same("destination", &files.dest_bytes(), &input);
    assert_eq!(checksum(&files.source), source_sum, "the source changed");
}

/// `clonebd status` prints the kernel's line byte for byte, `--json` carries the same numbers
/// plus the connections, and the control socket is private to its owner.
#[test]
fn status_is_the_kernels_line_and_json_agrees_and_control_socket_is_0600() {
    let files = Files::new(SIZE, 4);
    let d = Daemon::start(&files, &["--no-hydration"]);
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let mut c = clonebd_nbd::Client::connect_tcp(d.tcp, "clonebd").unwrap();
    c.write(REGION * 3, &[1; 4096], false).unwrap();
    c.write(REGION * 7, &vec![2; REGION as usize], true)
        .unwrap();
    let line = d.ctl_ok("status", &[]);
    assert!(line.ends_with('\n') && !line.ends_with("\n\n"), "{line:?}");
    let line = line.trim_end_matches('\n');
    let Ok(StatusLine::Info(st)) = parse_status(line) else {
        panic!("status: {line}");
    };
    let sectors = SIZE / 512;
    // The whole line, rebuilt from what it says, is the same bytes.
    assert_eq!(format_status_line(sectors, &st), line);
    let want = format!(
        "0 {sectors} clone 8 {}/{} 128 2/512 0 1 no_hydration 4 hydration_threshold 128 \
         hydration_batch_size 16 rw",
        st.md_used, st.md_total
    );
    assert_eq!(line, want);
    // 4 MiB of metadata: 1024 blocks of 4 KiB.
    assert_eq!(st.md_total, 1024);
    let json = d.ctl_ok("status", &["--json"]);
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["status_line"].as_str(), Some(line), "{j}");
    assert_eq!(j["target_sectors"].as_u64(), Some(sectors));
    assert_eq!(j["region_sectors"].as_u64(), Some(128));
    assert_eq!(j["nr_regions"].as_u64(), Some(512));
    assert_eq!(j["nr_hydrated"].as_u64(), Some(2));
    assert_eq!(j["complete"].as_bool(), Some(false));
    assert_eq!(j["mode"].as_str(), Some("rw"));
    assert_eq!(j["features"], serde_json::json!(["no_hydration"]));
    assert_eq!(j["hydration_enabled"].as_bool(), Some(false));
    assert_eq!(j["metadata_blocks_total"].as_u64(), Some(st.md_total));
    assert_eq!(j["dirty_regions"].as_u64(), Some(0), "status commits first");
    assert!(j["connections"].as_u64() >= Some(1), "{j}");
    c.disconnect().unwrap();
    assert!(d.terminate().success());
}

/// Waits until copy-on-read is quiet: no read data waiting for the destination and no
/// hydration in flight (failing after 30 s); the status then.
fn wait_fills_done(d: &Daemon) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = d.status_json();
        if st["fill_bytes_pending"].as_u64() == Some(0) && st["hydrating"].as_u64() == Some(0) {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "copy-on-read did not settle: {st}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The map `nbdinfo --map` prints for exactly these 4 KiB regions hydrated.
fn map_of(hydrated: &BTreeSet<u64>, size: u64, region: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for r in 0..size.div_ceil(region) {
        let t = u64::from(hydrated.contains(&r));
        match out.last_mut() {
            Some(last) if last.2 == t => last.1 += region,
            _ => out.push((r * region, region, t)),
        }
    }
    out
}

/// `--hydrate-on-read` with 4 KiB regions and background hydration off: random 4 KiB reads
/// through qemu-io hydrate exactly the regions they read (the status counts, nbdinfo's
/// `clonebd:hydrated` map and the bytes hydrated say so, so no more bytes are hydrated than
/// were read), reads covering regions only partly hydrate nothing, and the destination
/// holds the source's data there. Then reads raced by writes to the same regions, in one
/// qemu-io session: the writes win, on the export and on the destination.
#[test]
fn hydrate_on_read_hydrates_exactly_the_regions_read_and_writes_win_races() {
    if !have_all(&["qemu-io", "nbdinfo"]) {
        return;
    }
    const R: u64 = 4096;
    let size = 8u64 << 20;
    let files = Files::new(size, 11);
    let source = files.source_bytes();
    let source_sum = checksum(&files.source);
    let d = Daemon::start_with_region(&files, "4k", &["--no-hydration", "--hydrate-on-read"]);
    let nr = size / R;

    // 300 random 4 KiB reads, aligned to the region size (some repeat a region).
    let mut rng = common::daemon::Rng::new(5);
    let mut want = BTreeSet::new();
    let mut cmds = Vec::new();
    for _ in 0..300 {
        let r = rng.below(nr);
        want.insert(r);
        cmds.push(format!("read {} {R}", r * R));
    }
    // Reads that cover regions only partly: inside one region, and across a boundary.
    let (inside, across) = (nr / 2 + 1, nr / 2 + 3);
    for r in [inside, across, across + 1] {
        assert!(!want.contains(&r));
    }
    cmds.push(format!("read {} 2048", inside * R + 1024));
    cmds.push(format!("read {} {R}", across * R + R / 2));
    qemu_io(&d.unix_uri(), &cmds);

    let st = wait_fills_done(&d);
    let n = want.len() as u64;
    assert_eq!(st["nr_hydrated"].as_u64(), Some(n), "{st}");
    assert_eq!(st["regions_filled"].as_u64(), Some(n), "{st}");
    assert_eq!(st["bytes_hydrated"].as_u64(), Some(n * R), "{st}");
    assert_eq!(st["fills_dropped"].as_u64(), Some(0), "{st}");
    assert_eq!(hydrated_map(&d), map_of(&want, size, R));
    let dest = files.dest_bytes();
    for &r in &want {
        let (a, b) = ((r * R) as usize, ((r + 1) * R) as usize);
        assert_same(
            &format!("destination region {r}"),
            &dest[a..b],
            &source[a..b],
        );
    }

    // Races: each read of a cold region is followed at once by a write to it (a partial
    // write, or a whole region), before its data can have reached the destination or not.
    let mut race = Vec::new();
    let mut written = Vec::new();
    for k in 0..64u64 {
        let r = 2 * k + 1; // Odd regions from 1: none read above (checked below).
        if want.contains(&r) {
            continue;
        }
        let (off, len) = if k % 2 == 0 {
            (r * R + 512, 1024)
        } else {
            (r * R, R)
        };
        let byte = 0x40 + (k % 64) as u8;
        race.push(format!("read {} {R}", r * R));
        race.push(format!("write -P {byte} {off} {len}"));
        written.push((r, off, len, byte));
    }
    assert!(written.len() > 40);
    qemu_io(&d.unix_uri(), &race);
    wait_fills_done(&d);
    // Every written region is hydrated, and reads (which now come from the destination)
    // return the written bytes, and the source's around them.
    let mut check = Vec::new();
    for &(r, off, len, byte) in &written {
        want.insert(r);
        check.push(format!("read -P {byte} {off} {len}"));
    }
    qemu_io(&d.unix_uri(), &check);
    assert_eq!(hydrated_map(&d), map_of(&want, size, R));
    let mut expected = source.clone();
    for &(_, off, len, byte) in &written {
        expected[off as usize..(off + len) as usize].fill(byte);
    }
    let dest = files.dest_bytes();
    for &(r, ..) in &written {
        let (a, b) = ((r * R) as usize, ((r + 1) * R) as usize);
        assert_same(
            &format!("destination region {r}"),
            &dest[a..b],
            &expected[a..b],
        );
    }
    assert!(d.terminate().success());
    assert_eq!(
        checksum(&files.source),
        source_sum,
        "the source was written"
    );
}

/// Read data over `--hydrate-on-read-budget` is dropped, not waited for: with a 64 KiB
/// budget, a 1 MiB read through qemu-io returns its data and hydrates nothing (one fill
/// dropped), while a 64 KiB read still hydrates its 16 regions.
#[test]
fn hydrate_on_read_drops_read_data_over_its_budget() {
    if !have_all(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let size = 4u64 << 20;
    let files = Files::new(size, 12);
    let d = Daemon::start_with_region(
        &files,
        "4k",
        &[
            "--no-hydration",
            "--hydrate-on-read",
            "--hydrate-on-read-budget",
            "64k",
        ],
    );
    qemu_io(&d.unix_uri(), &["read 0 1M".to_string()]);
    let st = wait_fills_done(&d);
    assert_eq!(st["fills_dropped"].as_u64(), Some(1), "{st}");
    assert_eq!(st["nr_hydrated"].as_u64(), Some(0), "{st}");
    qemu_io(&d.unix_uri(), &["read 2M 64k".to_string()]);
    let st = wait_fills_done(&d);
    assert_eq!(st["nr_hydrated"].as_u64(), Some(16), "{st}");
    let want: BTreeSet<u64> = (512..528).collect();
    assert_eq!(hydrated_map(&d), map_of(&want, size, 4096));
    assert!(d.terminate().success());
}
