//! The real `clonebd` binary as a daemon under test: files in a temporary directory (a source
//! with random content, a sparse destination, no metadata yet), `clonebd run` serving NBD on a
//! unix socket and on a free TCP port of 127.0.0.1 with a control socket, and a guard that
//! stops it (SIGTERM, then SIGKILL) when dropped. Also the client programs the tests drive.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const CLONEBD: &str = env!("CARGO_BIN_EXE_clonebd");

/// A deterministic pseudo-random generator (xorshift64*), seeded.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fill `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The three files of a clone in a temporary directory.
pub struct Files {
    /// The directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The source, random content.
    pub source: PathBuf,
    /// The destination, sparse.
    pub dest: PathBuf,
    /// The metadata (created by the daemon).
    pub meta: PathBuf,
    /// The clone's size.
    pub size: u64,
}

impl Files {
    /// A source of `size` random bytes (from `seed`), a sparse destination of the same size, and
    /// no metadata file.
    pub fn new(size: u64, seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source.img");
        let mut data = vec![0u8; size as usize];
        Rng::new(seed).fill(&mut data);
        std::fs::write(&source, &data).expect("write source");
        let dest = dir.path().join("dest.img");
        File::create(&dest)
            .and_then(|f| f.set_len(size))
            .expect("create destination");
        Self {
            source,
            dest,
            meta: dir.path().join("meta.img"),
            size,
            dir,
        }
    }

    /// A clone of the remote source `uri` of this clone's size: a fresh destination and
    /// metadata in a directory of their own, the source `uri` (for comparisons, `self`'s
    /// source holds the bytes `uri` serves).
    pub fn with_remote_source(&self, uri: &str) -> Files {
        let g = Files::new(self.size, 0);
        Files {
            source: PathBuf::from(uri),
            ..g
        }
    }

    /// A path in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The source's bytes.
    pub fn source_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.source).expect("read source")
    }

    /// The destination's bytes.
    pub fn dest_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.dest).expect("read destination")
    }
}

/// A checksum of a file (FNV-1a over 64-bit words), to see that the source never changes.
pub fn checksum(path: &Path) -> u64 {
    let mut f = File::open(path).expect("open for checksum");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read for checksum");
        if n == 0 {
            return h;
        }
        for b in &buf[..n] {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A TCP port nobody listens on now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A running `clonebd run`.
pub struct Daemon {
    child: Option<Child>,
    /// NBD unix socket.
    pub socket: PathBuf,
    /// NBD TCP address.
    pub tcp: SocketAddr,
    /// Control socket.
    pub control: PathBuf,
    /// The daemon's standard error.
    pub log: PathBuf,
}

impl Daemon {
    /// Start `clonebd run` on `files` with 64 KiB regions and the extra arguments `extra`
    /// (for example `--no-hydration`); returns once the control socket answers.
    pub fn start(files: &Files, extra: &[&str]) -> Self {
        Self::start_with_region(files, "64k", extra)
    }

    /// As [`start`](Self::start) with another region size.
    pub fn start_with_region(files: &Files, region: &str, extra: &[&str]) -> Self {
        Self::start_with_env(files, region, extra, &[])
    }

    /// As [`start_with_region`](Self::start_with_region), with these environment variables
    /// set (the AWS settings of an S3 source, for example).
    pub fn start_with_env(
        files: &Files,
        region: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = vec!["--source", files.source.to_str().expect("utf-8 path")];
        args.extend(["--region-size", region]);
        args.extend_from_slice(extra);
        Self::spawn(files, &args, env)
    }

    /// Start `clonebd run` on the destination and metadata of `files` without `--source`
    /// (a fully hydrated clone, served finalized), with the extra arguments `extra`.
    pub fn start_without_source(files: &Files, extra: &[&str]) -> Self {
        Self::spawn(files, extra, &[])
    }

    fn spawn(files: &Files, args: &[&str], env: &[(&str, &str)]) -> Self {
        for attempt in 0.. {
            let port = free_port();
            let socket = files.path("nbd.sock");
            let control = files.path("ctl.sock");
            let log = files.path(&format!("daemon-{}.log", log_serial()));
            let tcp: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
            // A new clone the first time, the same clone on every restart.
            let create: &[&str] = if files.meta.exists() {
                &[]
            } else {
                &["--create"]
            };
            let child = Command::new(CLONEBD)
                .arg("run")
                .args(create)
                .arg("--dest")
                .arg(&files.dest)
                .arg("--metadata")
                .arg(&files.meta)
                .arg("--nbd-unix")
                .arg(&socket)
                .args(["--nbd-tcp", &tcp.to_string()])
                .arg("--control")
                .arg(&control)
                .args(args)
                .envs(env.iter().copied())
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn clonebd run");
            let mut d = Self {
                child: Some(child),
                socket,
                tcp,
                control,
                log,
            };
            match d.wait_ready() {
                Ok(()) => return d,
                // Someone took the port between our probe and the daemon's bind: try another.
                Err(log) if attempt < 3 && log.contains("Address already in use") => continue,
                Err(log) => panic!("clonebd run did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {st}:\n{}", self.log_text()));
            }
            if self.socket.exists() && self.control.exists() {
                let out = clonebd(&["status", "--noflush", "--control", self.control_str()]);
                if out.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 30 s:\n{}", self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The control socket as a string.
    pub fn control_str(&self) -> &str {
        self.control.to_str().expect("utf-8 path")
    }

    /// `nbd+unix:///clonebd?socket=...`.
    pub fn unix_uri(&self) -> String {
        format!("nbd+unix:///clonebd?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/clonebd`.
    pub fn tcp_uri(&self) -> String {
        format!("nbd://{}/clonebd", self.tcp)
    }

    /// Run a control subcommand (`status`, `message`, `wait`, ...) against this daemon:
    /// `args` come after the subcommand, and `--control` is added.
    pub fn ctl(&self, sub: &str, args: &[&str]) -> Output {
        let mut a = vec![sub, "--control", self.control_str()];
        a.extend_from_slice(args);
        clonebd(&a)
    }

    /// As [`ctl`](Self::ctl), and it must succeed; returns its standard output.
    pub fn ctl_ok(&self, sub: &str, args: &[&str]) -> String {
        let out = self.ctl(sub, args);
        assert!(
            out.status.success(),
            "clonebd {sub} {args:?}: {}\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// `status --json --noflush`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ctl_ok("status", &["--json", "--noflush"])).expect("status JSON")
    }

    /// `nbdinfo --map=clonebd:hydrated` over the unix socket, as (offset, length, type)
    /// runs (type 1: hydrated).
    pub fn hydrated_map(&self) -> Vec<(u64, u64, u64)> {
        let out = run(
            "nbdinfo",
            &["--json", "--map=clonebd:hydrated", &self.unix_uri()],
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
        v.as_array()
            .expect("array")
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["type"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Waits until every region is hydrated (failing after `within`); the status then.
    pub fn wait_complete(&self, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let st = self.status_json();
            if st["complete"].as_bool() == Some(true) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "hydration did not finish within {within:?}: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with the pid of our own child, which has not been reaped yet
            // (reaping happens only through `self.child`), so the pid cannot have been reused.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 60 s); returns the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(60))
            .unwrap_or_else(|log| panic!("clonebd did not stop within 60 s of SIGTERM:\n{log}"))
    }

    /// SIGTERM and wait up to `timeout` for the exit; returns the exit status, or, if the
    /// daemon was still running (it is then killed), its log.
    pub fn terminate_within(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        self.signal(libc::SIGTERM);
        if let Some(st) = self.wait_for(timeout) {
            return Ok(st);
        }
        let log = self.log_text();
        self.signal(libc::SIGKILL);
        let _ = self.wait_for(Duration::from_secs(10));
        Err(log)
    }

    /// SIGKILL: the process dies wherever it is.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let st = self
            .wait_for(Duration::from_secs(30))
            .expect("killed daemon exits");
        assert!(!st.success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_for(Duration::from_secs(20)).is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait_for(Duration::from_secs(10));
        }
    }
}

fn log_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Run the clonebd binary with `args`.
pub fn clonebd(args: &[&str]) -> Output {
    clonebd_env(args, &[])
}

/// Run the clonebd binary with `args` and these environment variables set.
pub fn clonebd_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(CLONEBD)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run clonebd")
}

/// Whether a client program is installed; prints why a test is skipped when it is not.
pub fn have(program: &str) -> bool {
    clonebd_testkit::machine::have(program, "apt-get install qemu-utils libnbd-bin fio")
}

/// Run a program (under `timeout 300`); it must succeed. Returns its standard output.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = clonebd_testkit::machine::run_ok(program, args, 300);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a program under `timeout 300`, whatever its status.
pub fn run_status(program: &str, args: &[&str]) -> Output {
    clonebd_testkit::machine::run_status(program, args, 300)
}

/// Read `len` bytes at `offset` of a file.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(path)
        .expect("open")
        .read_exact_at(&mut b, offset)
        .expect("read");
    b
}

/// The first differing byte of two images, as a readable message.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("lengths differ: {} and {}", a.len(), b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| {
        format!(
            "first difference at byte {i} (block {}): {:#04x} != {:#04x}",
            i / 512,
            a[i],
            b[i]
        )
    })
}
