//! The FUSE file system: one inode, the root, a regular file of the clone's size.
//!
//! | FUSE request | what it does |
//! |---|---|
//! | `getattr`, `lookup` | the root's attributes: mode 0600, the daemon's user, the clone's size |
//! | `setattr` | times are accepted and ignored; a size change, `chmod` or `chown` is refused (`EPERM`) |
//! | `open` | `O_DIRECT` opens get `FOPEN_DIRECT_IO` (no page cache) with parallel direct writes |
//! | `read`, `write` | [`BlockFile`]; writes with `O_SYNC`/`O_DSYNC` are FUA |
//! | `fsync` | a flush of the clone: writes and the metadata routing them made durable |
//! | `flush` (on `close`) | nothing: `close(2)` is no durability point, `fsync(2)` is |
//! | `fallocate` | `PUNCH_HOLE` discards then zeroes, `ZERO_RANGE` zeroes; allocation is a no-op |
//! | `statfs` | one file's worth of blocks, none free |
//!
//! Requests run on several threads at once (fuser's `n_threads`, one cloned `/dev/fuse`
//! descriptor each), so a loop device doing asynchronous direct I/O gets parallelism. Every
//! request passes a [`Gate`] so that stopping the export can wait for the requests in flight
//! and refuse new ones.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use clonebd_core::AlignedBuf;
use clonebd_driver::BlockExport;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::blockio::{BlockFile, ZeroMode};

/// Attributes never change (the size is fixed), so the kernel may keep them long.
const ATTR_TTL: Duration = Duration::from_secs(3600);

/// `FALLOC_FL_WRITE_ZEROES` (Linux 6.17): zeroes, allocating written blocks.
const FALLOC_FL_WRITE_ZEROES: i32 = 0x80;

thread_local! {
    /// Each FUSE thread's staging buffer, grown to the largest request it saw.
    static SCRATCH: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(0));
}

/// Requests in flight, and whether new ones are still let in.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    idle: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    inflight: usize,
    max_inflight: usize,
}

/// A request let through the gate; leaving it on drop.
#[derive(Debug)]
pub(crate) struct Pass<'a>(&'a Gate);

impl Gate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request in, unless the gate is closed.
    pub(crate) fn enter(&self) -> Option<Pass<'_>> {
        let mut s = self.state();
        if s.closed {
            return None;
        }
        s.inflight += 1;
        s.max_inflight = s.max_inflight.max(s.inflight);
        Some(Pass(self))
    }

    /// The most requests that were in flight at once.
    pub(crate) fn max_inflight(&self) -> usize {
        self.state().max_inflight
    }

    /// Closes the gate and waits (up to `limit`) for the requests in flight; returns how
    /// many are still running.
    pub(crate) fn close_and_drain(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut s = self.state();
        s.closed = true;
        while s.inflight > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .idle
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        s.inflight
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.inflight -= 1;
        let wake = s.closed && s.inflight == 0;
        drop(s);
        if wake {
            self.0.idle.notify_all();
        }
    }
}

/// Counters of what the kernel asked, for the log at unmount (and for tuning: request
/// sizes and concurrency are what FUSE performance hangs on).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    partial_writes: AtomicU64,
}

impl Stats {
    fn count(n: &AtomicU64, by: u64) {
        n.fetch_add(by, Ordering::Relaxed);
    }

    /// One line for the log.
    pub(crate) fn summary(&self, max_inflight: usize) -> String {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let avg_kib = |bytes: u64, n: u64| {
            if n == 0 {
                0.0
            } else {
                bytes as f64 / n as f64 / 1024.0
            }
        };
        format!(
            "{} reads (average {:.1} KiB), {} writes (average {:.1} KiB, {} not whole blocks), at most {} requests at once",
            get(&self.reads),
            avg_kib(get(&self.read_bytes), get(&self.reads)),
            get(&self.writes),
            avg_kib(get(&self.write_bytes), get(&self.writes)),
            get(&self.partial_writes),
            max_inflight,
        )
    }
}

/// How the kernel is told to talk to us.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Largest read or write request, bytes.
    pub(crate) max_io_bytes: u32,
    /// Asynchronous requests the kernel keeps in flight.
    pub(crate) max_background: u16,
}

/// The file system.
#[derive(Debug)]
pub(crate) struct CloneFs<B> {
    file: BlockFile<B>,
    attr: FileAttr,
    gate: Arc<Gate>,
    stats: Arc<Stats>,
    tuning: Tuning,
}

impl<B: BlockExport + 'static> CloneFs<B> {
    pub(crate) fn new(backend: B, gate: Arc<Gate>, stats: Arc<Stats>, tuning: Tuning) -> Self {
        let file = BlockFile::new(backend);
        let now = SystemTime::now();
        let attr = FileAttr {
            ino: INodeNo::ROOT,
            size: file.size(),
            blocks: file.size() / 512,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        Self {
            file,
            attr,
            gate,
            stats,
            tuning,
        }
    }

    /// Runs `f` if `ino` is ours and the gate lets the request in; otherwise the error.
    fn admit(&self, ino: INodeNo) -> Result<Pass<'_>, Errno> {
        if ino != INodeNo::ROOT {
            return Err(Errno::ENOENT);
        }
        self.gate.enter().ok_or(Errno::EIO)
    }
}

fn wants_fua(flags: OpenFlags) -> bool {
    flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0
}

impl<B: BlockExport + 'static> Filesystem for CloneFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let io = self.tuning.max_io_bytes.max(4096);
        if let Err(max) = config.set_max_write(io) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(io) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(self.tuning.max_background.max(1));
        let _ = config.set_congestion_threshold((self.tuning.max_background / 4 * 3).max(1));
        // Asynchronous direct I/O lets a loop device keep many requests in flight.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        // The root is a file: nothing can be looked up in it.
        reply.error(Errno::ENOTDIR);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&ATTR_TTL, &self.attr);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
            return;
        }
        let size_changes = size.is_some_and(|s| s != self.attr.size);
        let mode_changes = mode.is_some_and(|m| m & 0o7777 != u32::from(self.attr.perm));
        let owner_changes =
            uid.is_some_and(|u| u != self.attr.uid) || gid.is_some_and(|g| g != self.attr.gid);
        if size_changes || mode_changes || owner_changes {
            // The clone's size is fixed, and so is who may reach it.
            reply.error(Errno::EPERM);
        } else {
            reply.attr(&ATTR_TTL, &self.attr);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
            return;
        }
        let mut f = FopenFlags::empty();
        if flags.0 & libc::O_DIRECT != 0 {
            f |= FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        }
        reply.opened(FileHandle(0), f);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _pass = match self.admit(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        Stats::count(&self.stats.reads, 1);
        Stats::count(&self.stats.read_bytes, u64::from(size));
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            match self.file.read(offset, u64::from(size), &mut s) {
                Ok(data) => reply.data(data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _pass = match self.admit(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        Stats::count(&self.stats.writes, 1);
        Stats::count(&self.stats.write_bytes, data.len() as u64);
        let lbs = self.file.block_size();
        if !offset.is_multiple_of(lbs) || !(data.len() as u64).is_multiple_of(lbs) {
            Stats::count(&self.stats.partial_writes, 1);
        }
        let r = SCRATCH.with(|s| {
            self.file
                .write(offset, data, wants_fua(flags), &mut s.borrow_mut())
        });
        match r.and_then(|n| u32::try_from(n).map_err(|_| Errno::EINVAL)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = match self.admit(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match self.file.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bs = self.file.block_size().max(512);
        reply.statfs(
            self.file.size() / bs,
            0,
            0,
            1,
            0,
            u32::try_from(bs).unwrap_or(512),
            255,
            u32::try_from(bs).unwrap_or(512),
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = match self.admit(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match fallocate(&self.file, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// `fallocate(2)` on the file: what each mode means for a file that cannot change size.
pub(crate) fn fallocate<B: BlockExport>(
    file: &BlockFile<B>,
    offset: u64,
    length: u64,
    mode: i32,
) -> Result<(), Errno> {
    let known = libc::FALLOC_FL_KEEP_SIZE
        | libc::FALLOC_FL_PUNCH_HOLE
        | libc::FALLOC_FL_ZERO_RANGE
        | FALLOC_FL_WRITE_ZEROES;
    if mode & !known != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
    if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > file.size() {
        // The file would have to grow.
        return Err(Errno::EFBIG);
    }
    let zero = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
        Some(ZeroMode::PunchHole)
    } else if mode & (libc::FALLOC_FL_ZERO_RANGE | FALLOC_FL_WRITE_ZEROES) != 0 {
        Some(ZeroMode::ZeroRange)
    } else {
        // Plain allocation: every byte of the clone is already backed.
        None
    };
    match zero {
        Some(z) => SCRATCH.with(|s| file.zero(offset, length, z, &mut s.borrow_mut())),
        None => Ok(()),
    }
}
