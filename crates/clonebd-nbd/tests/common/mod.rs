//! Test support: a file-backed [`Backend`], a server running on a unix socket and a TCP port,
//! a minimal raw NBD client for byte-level tests, and helpers to run the real clients.
#![allow(dead_code, clippy::unwrap_used)]

pub mod raw;

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use clonebd_nbd::proto::{
    CONTEXT_BASE_ALLOCATION, CONTEXT_CLONEBD_HYDRATED, STATE_HOLE, STATE_ZERO,
};
use clonebd_nbd::{
    Backend, BackendFlags, BlockSizes, Extent, NbdError, Route, RouteKind, Segment, Server,
    ServerConfig, ShutdownHandle, ZeroFlags,
};

/// Allocation granule of the test backend's `base:allocation` map.
pub const GRANULE: u64 = 64 * 1024;

/// Counters of backend calls, to check that flags reach the backend.
#[derive(Debug, Default)]
pub struct Calls {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub fast_zero_refused: AtomicU64,
    pub caches: AtomicU64,
    pub block_status: AtomicU64,
    /// Read and write buffers that did not start on a 4 KiB boundary.
    pub unaligned_buffers: AtomicU64,
}

/// A backend over a regular file, with an in-memory allocation map (per 64 KiB granule) and a
/// hydration map (per region of `preferred` bytes).
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
    sizes: BlockSizes,
    flags: BackendFlags,
    contexts: Vec<String>,
    allocated: Mutex<Vec<bool>>,
    hydrated: Mutex<Vec<bool>>,
    /// Delay reads whose offset falls in an odd granule by this much, so that replies come out
    /// of order.
    pub jitter: Option<Duration>,
    /// When set, reads wait until the gate is opened.
    pub gate: Option<Arc<Gate>>,
    pub calls: Calls,
    /// Route reads and plain writes (`Backend::route`) so that the server transfers them
    /// itself; reads of more than one granule are split in two segments at a granule boundary.
    pub route: bool,
    /// Routed requests.
    pub routed: AtomicU64,
}

/// A latch that holds backend calls until opened.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.changed.wait(open).unwrap();
        }
    }
}

impl FileBackend {
    /// A backend over `path`, created with `size` bytes of zeroes. Every granule starts as a
    /// hole; the first half of the regions start hydrated.
    pub fn create(path: &Path, size: u64, sizes: BlockSizes, read_only: bool) -> Self {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        let granules = size.div_ceil(GRANULE) as usize;
        let regions = size.div_ceil(u64::from(sizes.preferred)) as usize;
        let hydrated = (0..regions).map(|r| r < regions / 2).collect();
        Self {
            file: Arc::new(file),
            size,
            sizes,
            flags: BackendFlags {
                read_only,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                cache: true,
                multi_conn: true,
            },
            contexts: vec![
                CONTEXT_BASE_ALLOCATION.into(),
                CONTEXT_CLONEBD_HYDRATED.into(),
            ],
            allocated: Mutex::new(vec![false; granules]),
            hydrated: Mutex::new(hydrated),
            jitter: None,
            gate: None,
            calls: Calls::default(),
            route: false,
            routed: AtomicU64::new(0),
        }
    }

    /// The same backend without the `clonebd:hydrated` context.
    pub fn without_hydrated(mut self) -> Self {
        self.contexts.retain(|c| c != CONTEXT_CLONEBD_HYDRATED);
        self
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let mut map = self.allocated.lock().unwrap();
        let (first, last) = if allocated {
            (offset / GRANULE, (offset + len).div_ceil(GRANULE))
        } else {
            // Only whole granules become holes.
            (offset.div_ceil(GRANULE), (offset + len) / GRANULE)
        };
        for g in first..last {
            map[g as usize] = allocated;
        }
        if allocated {
            let region = u64::from(self.sizes.preferred);
            let mut h = self.hydrated.lock().unwrap();
            for r in offset / region..(offset + len).div_ceil(region) {
                h[r as usize] = true;
            }
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(|e| NbdError::from_io(&e))?;
            at += n as u64;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), NbdError> {
        self.file.sync_data().map_err(|e| NbdError::from_io(&e))
    }
}

fn runs(
    map: &[bool],
    unit: u64,
    offset: u64,
    len: u64,
    size: u64,
    state: impl Fn(bool) -> u32,
) -> Vec<Extent> {
    let end = (offset + len).min(size);
    let mut out: Vec<Extent> = Vec::new();
    let mut at = offset;
    while at < end {
        let idx = (at / unit) as usize;
        let next = ((at / unit + 1) * unit).min(end);
        let flags = state(map[idx]);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += next - at,
            _ => out.push(Extent {
                length: next - at,
                flags,
            }),
        }
        at = next;
    }
    out
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }

    fn flags(&self) -> BackendFlags {
        self.flags
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.calls.reads.fetch_add(1, Ordering::Relaxed);
        if !buf.as_ptr().addr().is_multiple_of(4096) {
            self.calls.unaligned_buffers.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(gate) = &self.gate {
            gate.wait();
        }
        if let Some(delay) = self.jitter
            && (offset / GRANULE) % 2 == 1
        {
            std::thread::sleep(delay);
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| NbdError::from_io(&e))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        self.calls.writes.fetch_add(1, Ordering::Relaxed);
        if !data.as_ptr().addr().is_multiple_of(4096) {
            self.calls.unaligned_buffers.fetch_add(1, Ordering::Relaxed);
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| NbdError::from_io(&e))?;
        self.mark(offset, data.len() as u64, true);
        if fua {
            self.calls.fua_writes.fetch_add(1, Ordering::Relaxed);
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), NbdError> {
        self.calls.flushes.fetch_add(1, Ordering::Relaxed);
        self.sync()
    }

    fn route(&self, kind: RouteKind, offset: u64, len: u64, _align: usize) -> Option<Route> {
        if !self.route || (kind == RouteKind::Write && self.flags.read_only) {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        let seg = |at: usize, len: usize| Segment {
            file: self.file.clone(),
            offset: offset + at as u64,
            at,
            len,
        };
        let split = (offset / GRANULE + 1) * GRANULE - offset;
        let segments = match usize::try_from(split) {
            Ok(first) if kind == RouteKind::Read && first < len => {
                vec![seg(0, first), seg(first, len - first)]
            }
            _ => vec![seg(0, len)],
        };
        if kind == RouteKind::Write {
            // Marked before the data lands, which a test backend may do: nothing reads the
            // map while a client waits for its own write.
            self.mark(offset, len as u64, true);
        }
        self.routed.fetch_add(1, Ordering::Relaxed);
        Some(Route {
            segments,
            guard: Box::new(()),
            error: |e| NbdError::from_io(e),
        })
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        self.calls.trims.fetch_add(1, Ordering::Relaxed);
        self.zero(offset, len)?;
        self.mark(offset, len, false);
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), NbdError> {
        if flags.fast_zero
            && (flags.no_hole || !offset.is_multiple_of(GRANULE) || !len.is_multiple_of(GRANULE))
        {
            self.calls.fast_zero_refused.fetch_add(1, Ordering::Relaxed);
            return Err(NbdError::NotSupported);
        }
        self.calls.zeroes.fetch_add(1, Ordering::Relaxed);
        self.zero(offset, len)?;
        if flags.no_hole {
            self.mark(offset, len, true);
        } else {
            self.mark(offset, len, false);
        }
        if flags.fua {
            self.sync()?;
        }
        Ok(())
    }

    fn cache(&self, _offset: u64, _len: u64) -> Result<(), NbdError> {
        self.calls.caches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.contexts.clone()
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>, NbdError> {
        self.calls.block_status.fetch_add(1, Ordering::Relaxed);
        match context {
            CONTEXT_BASE_ALLOCATION => {
                let map = self.allocated.lock().unwrap();
                Ok(runs(&map, GRANULE, offset, len, self.size, |a| {
                    if a { 0 } else { STATE_HOLE | STATE_ZERO }
                }))
            }
            CONTEXT_CLONEBD_HYDRATED => {
                let map = self.hydrated.lock().unwrap();
                let region = u64::from(self.sizes.preferred);
                Ok(runs(&map, region, offset, len, self.size, u32::from))
            }
            _ => Err(NbdError::Invalid),
        }
    }
}

/// A running server with its backend, a unix socket and a TCP port on 127.0.0.1.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub backend: Arc<FileBackend>,
    pub server: Arc<Server>,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    shutdown: ShutdownHandle,
    threads: Vec<JoinHandle<()>>,
}

/// Default block sizes: 512-byte logical blocks, 64 KiB regions.
pub fn sizes() -> BlockSizes {
    BlockSizes {
        minimum: 512,
        preferred: 64 * 1024,
        maximum: 32 << 20,
    }
}

impl TestServer {
    /// Start a server over a fresh file of `size` bytes.
    pub fn start(size: u64) -> Self {
        Self::start_with(size, |b| b, ServerConfig::default())
    }

    pub fn start_with(
        size: u64,
        tweak: impl FnOnce(FileBackend) -> FileBackend,
        config: ServerConfig,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(tweak(FileBackend::create(
            &dir.path().join("disk.img"),
            size,
            sizes(),
            false,
        )));
        Self::serve(dir, backend, config)
    }

    pub fn serve(
        dir: tempfile::TempDir,
        backend: Arc<FileBackend>,
        mut config: ServerConfig,
    ) -> Self {
        if config.export_name.is_empty() {
            config.export_name = "disk".into();
            config.description = "clonebd test export".into();
        }
        let server = Arc::new(Server::new(backend.clone(), config).unwrap());
        let socket = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&socket).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let shutdown = server.shutdown_handle();
        let s1 = server.clone();
        let s2 = server.clone();
        let threads = vec![
            std::thread::spawn(move || s1.serve_unix(unix).unwrap()),
            std::thread::spawn(move || s2.serve_tcp(tcp).unwrap()),
        ];
        Self {
            dir,
            backend,
            server,
            socket,
            tcp: tcp_addr,
            shutdown,
            threads,
        }
    }

    /// The libnbd/qemu URI of the export over the unix socket.
    pub fn unix_uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }

    /// The URI of the export over TCP.
    pub fn tcp_uri(&self) -> String {
        format!("nbd://{}/disk", self.tcp)
    }

    /// Bytes of the backing file.
    pub fn read_file(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.backend.file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// Write straight into the backing file.
    pub fn write_file(&self, offset: u64, data: &[u8]) {
        self.backend.file().write_all_at(data, offset).unwrap();
    }

    /// Stop the server and wait for its accept loops and connections.
    pub fn stop(&mut self) {
        self.shutdown.shutdown();
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether a client program is installed; prints why a test is skipped when it is not.
pub fn have(program: &str) -> bool {
    clonebd_testkit::machine::have(program, "apt-get install qemu-utils libnbd-bin fio")
}

/// Run a program with a timeout; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    clonebd_testkit::machine::run_ok(program, args, 120)
}

/// Run a program under `timeout 120`, returning its output whatever the status.
pub fn run_status(program: &str, args: &[&str]) -> Output {
    clonebd_testkit::machine::run_status(program, args, 120)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic pseudo-random pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
