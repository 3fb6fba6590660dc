//! `clonebd demo`: a whole clone's life in a temporary directory, with real I/O over NBD.
//!
//! It generates a source image, starts the daemon on it (NBD over a unix socket, a control
//! socket), and with clonebd's own NBD client: reads regions not yet hydrated (they come from
//! the source), writes across regions (partial writes copy their region first, full-region
//! writes do not, FUA writes are durable at once, write-zeroes and discards fast-hydrate),
//! flushes, shows the dm-clone status line and the `clonebd:hydrated` map, enables background
//! hydration and shows its progress, verifies every byte through the export, stops the daemon
//! (which commits), checks the metadata, and verifies the destination alone equals the source
//! with the writes on top. Any mismatch is an error.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clonebd_core::engine::Control;
use clonebd_nbd::{Client, ClientOptions};
use thiserror::Error;

use crate::daemon::{CloneSpec, Daemon, DaemonError, RunOptions, default_batch, default_threshold};
use crate::export_nbd::{HYDRATED_CONTEXT, STATE_HYDRATED};
use crate::status::status_line;
use crate::units::human_bytes;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Size of the generated source image in bytes.
    pub size: u64,
    /// Region size in bytes.
    pub region: u64,
    /// Background hydration bandwidth limit (bytes/s; 0: none), so progress is visible.
    pub rate_limit: u64,
    /// Work here and keep the files, instead of a temporary directory removed at the end.
    pub keep: Option<PathBuf>,
}

/// Why the demo failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DemoError {
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The NBD client failed.
    #[error("NBD: {0}")]
    Nbd(#[from] clonebd_nbd::ClientError),
    /// Data or state was not what it must be.
    #[error("verification failed: {0}")]
    Verify(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// Deterministic pseudo-random bytes (SplitMix64), fast enough for hundreds of MiB.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let v = (z ^ (z >> 31)).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn say(s: &str) {
    println!("{s}");
}

fn verify(what: &str, got: &[u8], want: &[u8], base: u64) -> Result<(), DemoError> {
    if got == want {
        return Ok(());
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    Err(DemoError::Verify(format!(
        "{what}: first difference at byte {}",
        base + i as u64
    )))
}

/// Hydrated ranges (in regions) as the export reports them in `clonebd:hydrated`.
fn hydrated_map(c: &mut Client, size: u64, region: u64) -> Result<Vec<(u64, u64)>, DemoError> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let ext = c.block_status(HYDRATED_CONTEXT, pos, size - pos)?;
        if ext.is_empty() {
            return Err(DemoError::Verify("empty block status".into()));
        }
        for e in ext {
            if e.flags & STATE_HYDRATED != 0 {
                let (first, n) = (pos / region, e.length.div_ceil(region));
                match out.last_mut() {
                    Some((f, m)) if *f + *m == first => *m += n,
                    _ => out.push((first, n)),
                }
            }
            pos += e.length;
        }
    }
    Ok(out)
}

fn fmt_ranges(r: &[(u64, u64)]) -> String {
    let parts: Vec<String> = r
        .iter()
        .map(|&(f, n)| {
            if n == 1 {
                format!("{f}")
            } else {
                format!("{f}-{}", f + n - 1)
            }
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Runs the demo; prints what it shows on standard output.
pub fn run(opts: &DemoOptions) -> Result<(), DemoError> {
    let tmp;
    let dir: &Path = match &opts.keep {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
            d
        }
        None => {
            tmp = tempdir()?;
            &tmp.0
        }
    };
    let size = opts.size;
    let region = opts.region;
    let (src, dst, meta) = (
        dir.join("source.img"),
        dir.join("dest.img"),
        dir.join("clone.meta"),
    );
    let (sock, ctl) = (dir.join("nbd.sock"), dir.join("control.sock"));
    for p in [&dst, &meta, &sock, &ctl] {
        let _ = std::fs::remove_file(p);
    }

    say(&format!(
        "== Generating a {} source image in {}",
        human_bytes(size),
        dir.display()
    ));
    let mut expected = vec![0u8; size as usize];
    fill(&mut expected, 0xc10e);
    std::fs::write(&src, &expected).map_err(io("writing the source"))?;
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(size))
        .map_err(io("creating the destination"))?;
    let src_before = std::fs::read(&src).map_err(io("reading the source"))?;

    say(
        "== Starting the clone (new metadata, hydration off for now), serving NBD on a unix socket",
    );
    let run_opts = RunOptions {
        spec: CloneSpec::Flags {
            source: src.clone(),
            dest: dst.clone(),
            metadata: meta.clone(),
            region_bytes: region,
            no_hydration: true,
            no_discard_passdown: false,
            hydration_threshold: default_threshold(region, 1 << 20),
            hydration_batch_size: default_batch(region, 1 << 20),
        },
        size_bytes: None,
        // A new clone: the metadata file was removed above, and --create makes it.
        create_metadata: true,
        nbd_unix: Some(sock.clone()),
        nbd_tcp: None,
        control: Some(ctl.clone()),
        metrics: None,
        sparse_hydration: true,
        fuse: None,
        ublk: false,
        source: crate::source::SourceOptions::default(),
        source_pin: None,
        nbd_tls: None,
        order: Default::default(),
        direct_io: true,
        preallocate: true,
        copy_threads: 8,
        hydration_rate_limit: opts.rate_limit,
        hydrate_on_read: 0,
        hydration_priority: clonebd_core::engine::HydrationPriority::default(),
        nbd_workers: None,
        nbd_io_uring: true,
        nbd_limits: crate::daemon::NbdLimits::default(),
    };
    let daemon = Daemon::start(&run_opts)?;
    let vol = daemon.volume().clone();
    say(&format!("   {}", daemon.table_line()));
    let result = exercise(&daemon, &sock, &mut expected, size, region, opts);
    if let Err(e) = result {
        let _ = daemon.shutdown();
        return Err(e);
    }

    say("== Stopping the daemon: exports close, copies drain, the metadata is committed");
    daemon.shutdown()?;
    let st = vol.status();
    say(&format!("   {}", status_line(&st)));

    say("== Checking the metadata, then the destination on its own");
    let mdev = clonebd_io::FileDevice::open(&meta, clonebd_io::OpenOptions::read_only())
        .map_err(|e| DemoError::Verify(format!("opening the metadata: {e}")))?;
    let report = clonebd_metadata::check(&mdev)
        .map_err(|e| DemoError::Verify(format!("checking the metadata: {e}")))?;
    if !report.is_clean() {
        return Err(DemoError::Verify(format!(
            "metadata problems: {:?}",
            report.problems
        )));
    }
    let dumped = clonebd_metadata::dump(&mdev)
        .map_err(|e| DemoError::Verify(format!("dumping the metadata: {e}")))?;
    if dumped.nr_hydrated != dumped.nr_regions {
        return Err(DemoError::Verify(format!(
            "only {}/{} regions recorded as hydrated",
            dumped.nr_hydrated, dumped.nr_regions
        )));
    }
    say(&format!(
        "   metadata clean: {}/{} regions hydrated, {}/{} metadata blocks used",
        dumped.nr_hydrated,
        dumped.nr_regions,
        dumped.metadata_blocks_used,
        dumped.metadata_blocks_total
    ));
    let dest = std::fs::read(&dst).map_err(io("reading the destination"))?;
    verify("destination", &dest, &expected, 0)?;
    say("   the destination alone equals the source with every write on top");
    let src_after = std::fs::read(&src).map_err(io("reading the source"))?;
    verify("source unchanged", &src_after, &src_before, 0)?;
    say("   the source was never written");
    say("== Demo complete: every check passed");
    if opts.keep.is_some() {
        say(&format!("   files kept in {}", dir.display()));
    }
    Ok(())
}

fn exercise(
    daemon: &Daemon,
    sock: &Path,
    expected: &mut [u8],
    size: u64,
    region: u64,
    opts: &DemoOptions,
) -> Result<(), DemoError> {
    let vol = daemon.volume();
    let mut c = ClientOptions::new("clonebd")
        .meta_context(HYDRATED_CONTEXT)
        .connect_unix(sock)?;
    let bs = c.block_sizes();
    say(&format!(
        "== NBD client connected: export of {}, block sizes min {} / preferred {} / max {}",
        human_bytes(c.size()),
        bs.minimum,
        bs.preferred,
        human_bytes(u64::from(bs.maximum))
    ));
    if c.size() != size {
        return Err(DemoError::Verify(format!(
            "export size {} != {size}",
            c.size()
        )));
    }

    say("== Reading before any hydration: every byte comes from the source");
    let mut buf = vec![0u8; (4 * region) as usize];
    for r in [0, size / region / 2, size / region - 4] {
        c.read(r * region, &mut buf)?;
        let o = (r * region) as usize;
        verify(
            "read of unhydrated regions",
            &buf,
            &expected[o..o + buf.len()],
            r * region,
        )?;
    }
    say(&format!("   {}", status_line(&vol.status())));

    say("== Writing through NBD");
    let w = |c: &mut Client,
             expected: &mut [u8],
             what: &str,
             off: u64,
             len: u64,
             fua: bool,
             seed: u64|
     -> Result<(), DemoError> {
        let mut d = vec![0u8; len as usize];
        fill(&mut d, seed);
        c.write(off, &d, fua)?;
        expected[off as usize..(off + len) as usize].copy_from_slice(&d);
        say(&format!("   {what}: {} at byte {off}", human_bytes(len)));
        Ok(())
    };
    w(
        &mut c,
        expected,
        "partial write (copies its region first)",
        3 * region + 512,
        1024,
        false,
        1,
    )?;
    w(
        &mut c,
        expected,
        "full-region write (no copy needed)",
        10 * region,
        region,
        false,
        2,
    )?;
    w(
        &mut c,
        expected,
        "write across three regions",
        20 * region + region / 2,
        2 * region,
        false,
        3,
    )?;
    w(
        &mut c,
        expected,
        "FUA write (durable, metadata included, on return)",
        40 * region,
        4096,
        true,
        4,
    )?;
    c.write_zeroes(50 * region, 2 * region)?;
    expected[(50 * region) as usize..(52 * region) as usize].fill(0);
    say(&format!(
        "   write-zeroes: {} at byte {}",
        human_bytes(2 * region),
        50 * region
    ));
    // A discard leaves its regions' content undefined; write them again afterwards.
    c.trim(60 * region, 4 * region)?;
    w(
        &mut c,
        expected,
        "rewrite of discarded regions",
        60 * region,
        4 * region,
        false,
        5,
    )?;
    c.flush()?;
    say("   flush: every write above is now durable");
    let mut check = vec![0u8; (80 * region) as usize];
    c.read(0, &mut check)?;
    verify(
        "read back of the writes",
        &check,
        &expected[..check.len()],
        0,
    )?;
    say("   read back: every write is there, untouched bytes still come from the source");
    say(&format!("   {}", status_line(&vol.status())));
    say(&format!(
        "   hydrated regions (clonebd:hydrated): {}",
        fmt_ranges(&hydrated_map(&mut c, size, region)?)
    ));

    say("== Enabling background hydration (dm-clone message `enable_hydration`)");
    vol.control(Control::EnableHydration);
    progress(vol, opts)?;
    say(&format!("   {}", status_line(&vol.status())));
    let map = hydrated_map(&mut c, size, region)?;
    if map != vec![(0, size.div_ceil(region))] {
        return Err(DemoError::Verify(format!(
            "hydrated map after hydration: {}",
            fmt_ranges(&map)
        )));
    }

    say("== Verifying every byte through the export");
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        c.read(off, &mut buf[..n])?;
        verify(
            "final read",
            &buf[..n],
            &expected[off as usize..off as usize + n],
            off,
        )?;
        off += n as u64;
    }
    say(&format!(
        "   {} read back, all as expected",
        human_bytes(size)
    ));
    c.disconnect()?;
    Ok(())
}

fn progress(vol: &clonebd_driver::Volume, opts: &DemoOptions) -> Result<(), DemoError> {
    let start = Instant::now();
    let total = vol.status().engine.nr_regions;
    let bar = std::io::stdout().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "   [{elapsed_precise}] {wide_bar} {pos}/{len} regions {msg}",
        ) {
            b.set_style(s);
        }
        b
    });
    let mut last_print = Instant::now();
    loop {
        let s = vol.status();
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        let rate = s.engine.bytes_hydrated as f64 / secs;
        let left = s.engine.nr_regions - s.engine.nr_hydrated;
        let eta = if rate > 0.0 {
            left as f64 * s.geometry.region_bytes() as f64 / rate
        } else {
            0.0
        };
        let msg = format!("{}/s ETA {:.1}s", human_bytes(rate as u64), eta);
        match &bar {
            Some(b) => {
                b.set_position(s.engine.nr_hydrated);
                b.set_message(msg);
            }
            None if last_print.elapsed() >= Duration::from_millis(500) || left == 0 => {
                say(&format!(
                    "   {}/{} regions hydrated, {msg}",
                    s.engine.nr_hydrated, s.engine.nr_regions
                ));
                last_print = Instant::now();
            }
            None => {}
        }
        if left == 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(DemoError::Verify(
                "hydration did not finish within 10 minutes".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(b) = bar {
        b.finish_with_message("hydrated");
    }
    let _ = opts;
    say(&format!(
        "   hydrated {} in {:.2} s (background copies, {})",
        human_bytes(vol.size_bytes()),
        start.elapsed().as_secs_f64(),
        if opts.rate_limit > 0 {
            format!("limited to {}/s", human_bytes(opts.rate_limit))
        } else {
            "no limit".into()
        }
    ));
    Ok(())
}

/// A directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> Result<TempDir, DemoError> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let p = base.join(format!("clonebd-demo-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(TempDir(p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("creating a temporary directory")(e)),
        }
    }
    Err(DemoError::Verify("no free temporary directory name".into()))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
