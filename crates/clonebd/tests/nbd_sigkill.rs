//! SIGKILL under a write-and-flush load, then restart on the same files.
//!
//! A load thread writes through our NBD client: random offsets, partial-region and
//! full-region writes, some with FUA, and flushes now and then. For every 512-byte block the
//! test keeps the value that is durable (the last one acknowledged before the last
//! acknowledged flush, or acknowledged with FUA; the source's if none) and every value
//! submitted since. The daemon is killed with SIGKILL at a random moment, the metadata must
//! pass `clonebd check`, and after a restart every block must read back as its durable value
//! or as a value submitted since (SPEC 5.8: I2 and I3). Some rounds run with background
//! hydration (rate-limited, so kills land in the middle of it). At the end hydration runs to
//! completion and the destination file alone must hold what the clone showed. The source is
//! checksummed after every round.
//!
//! It runs twice: with a local source, and with the source on an NBD server (qemu-nbd), so
//! that reads of unhydrated regions and copies go over the network while the daemon dies.
//!
//! The seed is printed; set `CLONEBD_SIGKILL_SEED` to replay one, `CLONEBD_SIGKILL_ROUNDS` to
//! change the number of rounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clonebd_nbd::{Client, ClientOptions};
use common::daemon::{Daemon, Files, Rng, checksum, clonebd};
use common::servers::{Listen, need, qemu_nbd};

// Small regions and many of them, so that every round still finds unhydrated regions and a
// flush must commit new hydration bits to keep its promise.
const SIZE: u64 = 64 << 20;
const REGION: u64 = 4 << 10;
const BLOCK: u64 = 512;
const BLOCKS: usize = (SIZE / BLOCK) as usize;

/// The bytes write `id` puts in block `b` (ids start at 1; 0 is never written).
fn content(id: u32, b: usize, out: &mut [u8]) {
    let mut r = Rng::new((u64::from(id) << 32) | b as u64);
    r.fill(out);
    out[..4].copy_from_slice(&id.to_le_bytes());
}

/// What each block may hold after a crash.
struct Model {
    /// The durable value: `None` is the source's.
    durable: Vec<Option<u32>>,
    /// Values submitted since the durable one, in order.
    since: Vec<Vec<u32>>,
    /// Writes acknowledged without FUA since the last acknowledged flush: (id, first block,
    /// blocks).
    acked: Vec<(u32, usize, usize)>,
    next_id: u32,
    /// Operations acknowledged (for the report).
    writes: u64,
    flushes: u64,
}

impl Model {
    fn new() -> Self {
        Self {
            durable: vec![None; BLOCKS],
            since: vec![Vec::new(); BLOCKS],
            acked: Vec::new(),
            next_id: 1,
            writes: 0,
            flushes: 0,
        }
    }

    fn submit(&mut self, first: usize, n: usize) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        for b in first..first + n {
            self.since[b].push(id);
        }
        id
    }

    fn make_durable(&mut self, id: u32, first: usize, n: usize) {
        for b in first..first + n {
            if self.durable[b].is_none_or(|d| d < id) {
                self.durable[b] = Some(id);
            }
            self.since[b].retain(|&s| s > id);
        }
    }

    fn acked_write(&mut self, id: u32, first: usize, n: usize, fua: bool) {
        self.writes += 1;
        if fua {
            self.make_durable(id, first, n);
        } else {
            self.acked.push((id, first, n));
        }
    }

    /// A flush was acknowledged: the first `covered` acknowledged writes (those acknowledged
    /// before it was sent) are durable.
    fn acked_flush(&mut self, covered: usize) {
        self.flushes += 1;
        let done: Vec<_> = self.acked.drain(..covered).collect();
        for (id, first, n) in done {
            self.make_durable(id, first, n);
        }
    }

    /// Check what the restarted clone shows against the model, then take it as the new durable
    /// state (nothing is in flight any more). Returns a description of the first bad block.
    fn check_and_settle(&mut self, image: &[u8], source: &[u8]) -> Result<(), String> {
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..BLOCKS {
            let got = &image[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            let matches = |v: Option<u32>, buf: &mut [u8]| match v {
                None => got == &source[b * BLOCK as usize..(b + 1) * BLOCK as usize],
                Some(id) => {
                    content(id, b, buf);
                    got == buf
                }
            };
            let found = if matches(self.durable[b], &mut buf) {
                Some(self.durable[b])
            } else {
                self.since[b]
                    .iter()
                    .rev()
                    .find(|&&id| matches(Some(id), &mut buf))
                    .map(|&id| Some(id))
            };
            let Some(v) = found else {
                let tag = u32::from_le_bytes(got[..4].try_into().unwrap());
                return Err(format!(
                    "block {b} (offset {}, region {}): durable {:?}, submitted since {:?}, \
                     reads neither (first word {tag})",
                    b as u64 * BLOCK,
                    b as u64 * BLOCK / REGION,
                    self.durable[b],
                    self.since[b]
                ));
            };
            self.durable[b] = v;
            self.since[b].clear();
        }
        self.acked.clear();
        Ok(())
    }

    /// The image the model says the clone holds, once settled.
    fn image(&self, source: &[u8]) -> Vec<u8> {
        let mut out = source.to_vec();
        for (b, v) in self.durable.iter().enumerate() {
            if let Some(id) = v {
                content(
                    *id,
                    b,
                    &mut out[b * BLOCK as usize..(b + 1) * BLOCK as usize],
                );
            }
        }
        out
    }
}

/// Writes and flushes until the connection fails (the daemon was killed).
fn load(mut c: Client, model: &Mutex<Model>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut data = Vec::new();
    loop {
        let roll = rng.below(100);
        if roll < 10 {
            let covered = model.lock().unwrap().acked.len();
            if c.flush().is_err() {
                return;
            }
            model.lock().unwrap().acked_flush(covered);
            continue;
        }
        let (offset, len) = if roll < 30 {
            // Full-region overwrites of one to four regions.
            let len = (1 + rng.below(4)) * REGION;
            (rng.below((SIZE - len) / REGION + 1) * REGION, len)
        } else {
            // A partial write, anywhere, perhaps across a region boundary.
            let len = (1 + rng.below(32)) * BLOCK;
            (rng.below((SIZE - len) / BLOCK + 1) * BLOCK, len)
        };
        let fua = rng.below(100) < 5;
        let (first, n) = ((offset / BLOCK) as usize, (len / BLOCK) as usize);
        let id = model.lock().unwrap().submit(first, n);
        data.resize(len as usize, 0);
        for (i, chunk) in data.chunks_mut(BLOCK as usize).enumerate() {
            content(id, first + i, chunk);
        }
        if c.write(offset, &data, fua).is_err() {
            return;
        }
        model.lock().unwrap().acked_write(id, first, n, fua);
    }
}

fn read_all(d: &Daemon) -> Vec<u8> {
    let mut c = Client::connect_unix(&d.socket, "clonebd").unwrap();
    let mut image = vec![0u8; SIZE as usize];
    for (i, chunk) in image.chunks_mut(4 << 20).enumerate() {
        c.read(i as u64 * (4 << 20), chunk).unwrap();
    }
    c.disconnect().unwrap();
    image
}

fn check_metadata(files: &Files) {
    let out = clonebd(&["check", files.meta.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "clonebd check after SIGKILL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[test]
fn sigkill_under_writes_and_flushes_loses_nothing_acknowledged_as_durable() {
    let seed = seed();
    let files = Files::new(SIZE, seed);
    let source = files.source.clone();
    let rounds = env_u64("CLONEBD_SIGKILL_ROUNDS").unwrap_or(12);
    sigkill_rounds(&files, &source, seed, rounds);
}

/// The same with the source on an NBD server (qemu-nbd, read-only, on a unix socket): the
/// clone's reads of unhydrated regions and its copies go over the network.
#[test]
fn sigkill_with_a_remote_nbd_source_loses_nothing_acknowledged_as_durable() {
    if !need("qemu-nbd") {
        return;
    }
    let seed = seed();
    let local = Files::new(SIZE, seed);
    let at = Listen::Unix(local.path("source.sock"));
    let _server = qemu_nbd(&local.source, "golden", &at);
    let g = Files::new(SIZE, 0);
    let files = Files {
        source: PathBuf::from(at.uri("golden")),
        ..g
    };
    let rounds = env_u64("CLONEBD_SIGKILL_ROUNDS").unwrap_or(6);
    sigkill_rounds(&files, &local.source, seed, rounds);
}

fn seed() -> u64 {
    let seed = env_u64("CLONEBD_SIGKILL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed} (CLONEBD_SIGKILL_SEED={seed} replays it)");
    seed
}

/// `rounds` SIGKILLs of the clone `files`, whose source holds the bytes of `source_file`.
fn sigkill_rounds(files: &Files, source_file: &Path, seed: u64, rounds: u64) {
    println!("{rounds} rounds");
    let mut rng = Rng::new(seed);
    let source = std::fs::read(source_file).unwrap();
    let source_sum = checksum(source_file);
    let model = Arc::new(Mutex::new(Model::new()));
    let started = Instant::now();
    for round in 0..rounds {
        // Odd rounds hydrate in the background, slowly enough that kills land mid-way.
        let hydrate = round % 2 == 1;
        let extra: &[&str] = if hydrate {
            &["--hydration-rate-limit", "4m"]
        } else {
            &["--no-hydration"]
        };
        let d = Daemon::start_with_region(files, "4k", extra);
        let opts = ClientOptions::new("clonebd");
        let c = opts.connect_unix(&d.socket).unwrap();
        let m = Arc::clone(&model);
        let load_seed = rng.next_u64();
        let loader = std::thread::spawn(move || load(c, &m, load_seed));
        std::thread::sleep(Duration::from_millis(50 + rng.below(500)));
        d.kill();
        loader.join().unwrap();
        check_metadata(files);
        assert_eq!(
            checksum(source_file),
            source_sum,
            "round {round}: the source changed"
        );
        let d = Daemon::start_with_region(files, "4k", &["--no-hydration"]);
        let image = read_all(&d);
        let mut m = model.lock().unwrap();
        if let Err(e) = m.check_and_settle(&image, &source) {
            panic!("round {round} (seed {seed}): {e}");
        }
        println!(
            "round {round}: {} writes and {} flushes acknowledged so far, all durable data intact",
            m.writes, m.flushes
        );
        drop(m);
        assert!(d.terminate().success());
    }
    // Finish: hydrate everything and compare the destination alone.
    let d = Daemon::start_with_region(files, "4k", &[]);
    d.ctl_ok("wait", &["--timeout", "120", "--no-progress"]);
    let image = read_all(&d);
    let want = model.lock().unwrap().image(&source);
    assert!(image == want, "the clone changed across a clean restart");
    assert!(d.terminate().success());
    check_metadata(files);
    assert!(
        files.dest_bytes() == want,
        "the destination alone differs from the clone after full hydration"
    );
    assert_eq!(checksum(source_file), source_sum, "the source changed");
    let m = model.lock().unwrap();
    assert!(
        m.writes > 100 && m.flushes > 5,
        "too little load: {} writes",
        m.writes
    );
    println!(
        "{rounds} SIGKILLs, {} writes, {} flushes, {:.1} s",
        m.writes,
        m.flushes,
        started.elapsed().as_secs_f64()
    );
}
