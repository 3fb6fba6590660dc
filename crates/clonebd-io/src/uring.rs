//! A small io_uring wrapper: positioned reads and writes of files, socket receives and
//! gathered socket sends, submitted in batches and completed on the thread that owns the ring.
//!
//! A [`Ring`] takes ownership of everything the kernel touches for an operation (the buffer,
//! the descriptor, the I/O vectors) when the operation is queued, and gives the buffers back
//! only in the operation's [`Done`], once the kernel has posted its last completion. Nothing
//! the kernel may still read or write can be dropped, moved or reached from safe code in the
//! meantime: buffers live in heap allocations that stay put, and descriptors are held by
//! `Arc`s, so they stay open until the completion is reaped. Dropping a ring with operations in
//! flight cancels them and waits for their completions; if the ring cannot be waited on any
//! more, the memory of the operations still in flight is leaked rather than freed.
//!
//! Short transfers are finished inside the ring (the rest is submitted again), so a read or a
//! write completes with all of its bytes or with an error, and a send with all of its bytes
//! or with an error. A receive completes with whatever the socket gave, as `recv` does.
//!
//! A ring is used from the thread that created it (it is not `Send`); a [`Waker`] lets other
//! threads interrupt its wait.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

/// Alignment of every [`IoBuf`]: a multiple of the largest logical block size devices use, so
/// the buffers suit `O_DIRECT`.
pub const ALIGN: usize = 4096;

/// Most bytes inline in one [`SendPart::Inline`].
pub const INLINE_MAX: usize = 48;

/// Most parts (I/O vectors) in one send.
pub const MAX_SEND_PARTS: usize = 1024;

/// A descriptor an operation uses, kept open by the ring until the operation completed.
pub type SharedFd = Arc<dyn AsFd + Send + Sync>;

/// Heap memory whose usable part starts on an [`ALIGN`] boundary, with a length up to its
/// capacity. A `Vec`'s heap block does not move when the `Vec` does, so the usable part keeps
/// its address for the life of the buffer.
#[derive(Debug)]
pub struct IoBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A zeroed buffer of `capacity` usable bytes, of that length.
    pub fn new(capacity: usize) -> Self {
        let vec = vec![0u8; capacity + ALIGN];
        let addr = vec.as_ptr().addr();
        let start = addr.next_multiple_of(ALIGN) - addr;
        Self {
            vec,
            start,
            len: capacity,
        }
    }

    /// A buffer of no bytes, allocating nothing.
    pub const fn empty() -> Self {
        Self {
            vec: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    /// Usable bytes.
    pub fn capacity(&self) -> usize {
        self.vec.len().saturating_sub(ALIGN)
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the bytes in use, at most the capacity (a larger value is clamped).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    /// The bytes in use, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }

    /// The address of byte `at` of the usable part, for the kernel. No reference to the bytes
    /// is made: the kernel may be writing other parts of the buffer meanwhile. Callers keep
    /// `at` within the length (checked when an operation is queued).
    fn ptr_at(&mut self, at: usize) -> *mut u8 {
        self.vec.as_mut_ptr().wrapping_add(self.start + at)
    }
}

/// One piece of a read or write: bytes `[at, at + len)` of the operation's buffer, read from
/// or written to `file` at `offset`.
#[derive(Clone)]
pub struct Segment {
    /// The file (for aligned buffers and ranges, one opened with `O_DIRECT`).
    pub file: SharedFd,
    /// Byte offset in the file.
    pub offset: u64,
    /// Where in the buffer.
    pub at: usize,
    /// How many bytes (nonzero).
    pub len: usize,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("fd", &self.file.as_fd().as_raw_fd())
            .field("offset", &self.offset)
            .field("at", &self.at)
            .field("len", &self.len)
            .finish()
    }
}

/// Which way a read or write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the files into the buffer.
    Read,
    /// From the buffer to the files.
    Write,
}

/// Up to [`INLINE_MAX`] bytes held inline, for small headers.
#[derive(Clone, Copy)]
pub struct Inline {
    bytes: [u8; INLINE_MAX],
    len: u8,
}

impl Inline {
    /// `bytes` inline, or `None` if longer than [`INLINE_MAX`].
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let mut b = [0u8; INLINE_MAX];
        b.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(Self {
            bytes: b,
            len: u8::try_from(bytes.len()).ok()?,
        })
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inline({} bytes)", self.len)
    }
}

/// One piece of a gathered send.
#[derive(Debug)]
pub enum SendPart {
    /// A few bytes held in the part itself.
    Inline(Inline),
    /// Bytes that live for the whole program.
    Static(&'static [u8]),
    /// Owned bytes.
    Owned(Vec<u8>),
    /// The bytes in use of a buffer.
    Buf(IoBuf),
}

impl SendPart {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline(i) => i.as_bytes(),
            Self::Static(s) => s,
            Self::Owned(v) => v,
            Self::Buf(b) => b.as_slice(),
        }
    }
}

/// A finished operation, with what it owned.
#[derive(Debug)]
pub enum Done<T> {
    /// A read or write: every byte of every segment was transferred, or the first error.
    ReadWrite {
        /// The caller's value.
        user: T,
        /// The buffer.
        buf: IoBuf,
        /// The outcome.
        result: io::Result<()>,
    },
    /// A receive: the bytes received into `buf` at `at` (0 at the end of the stream).
    Recv {
        /// The caller's value.
        user: T,
        /// The buffer.
        buf: IoBuf,
        /// Where the bytes went.
        at: usize,
        /// Bytes received.
        result: io::Result<usize>,
    },
    /// A send: every byte was sent, or the error.
    Send {
        /// The caller's value.
        user: T,
        /// The parts, for reuse.
        parts: Vec<SendPart>,
        /// Bytes sent.
        result: io::Result<usize>,
    },
    /// A [`Waker`] woke the ring.
    Woken,
}

/// An operation the ring refused before submitting it, with what it was given.
#[derive(Debug)]
pub struct Rejected<T> {
    /// The buffer.
    pub buf: IoBuf,
    /// The caller's value.
    pub user: T,
    /// Why.
    pub error: io::Error,
}

/// Interrupts a [`Ring`]'s wait from any thread: the wait returns with [`Done::Woken`].
#[derive(Debug, Clone)]
pub struct Waker {
    fd: Arc<File>,
}

impl Waker {
    /// Wake the ring (one `write` to an eventfd).
    pub fn wake(&self) {
        let _ = (&*self.fd).write(&1u64.to_ne_bytes());
    }
}

struct SegState {
    seg: Segment,
    retries: u8,
}

enum Op {
    Rw {
        dir: Dir,
        buf: IoBuf,
        segs: Vec<SegState>,
        pending: usize,
        error: Option<io::Error>,
    },
    Recv {
        /// Held open until the receive completed.
        _fd: SharedFd,
        buf: IoBuf,
        at: usize,
    },
    Send {
        fd: SharedFd,
        parts: Vec<SendPart>,
        /// One vector per nonempty part; `first` is the first not fully sent.
        iov: Vec<libc::iovec>,
        first: usize,
        /// The message header (one element), pointing into `iov`.
        msg: Vec<libc::msghdr>,
        sent: usize,
        total: usize,
        retries: u8,
    },
}

struct Slot<T> {
    user: T,
    op: Op,
}

struct WakeRead {
    fd: Arc<File>,
    /// Eight bytes the eventfd's counter is read into.
    buf: Vec<u8>,
    armed: bool,
}

const WAKE_UD: u64 = u64::MAX;
const CANCEL_UD: u64 = u64::MAX - 1;
/// The timeout operation that bounds a wait on kernels without timed waits.
const TIMER_UD: u64 = u64::MAX - 2;
/// Resubmissions of an interrupted piece before its error is reported.
const MAX_RETRIES: u8 = 16;

/// An io_uring instance and the operations in flight on it; see the module documentation.
pub struct Ring<T> {
    uring: IoUring,
    slots: Vec<Option<Slot<T>>>,
    free: Vec<usize>,
    live: usize,
    /// Operations finished without a completion (failed at submission).
    ready: Vec<Done<T>>,
    cqes: Vec<(u64, i32)>,
    wake: Option<WakeRead>,
    closing: bool,
    /// Entries handed to the kernel whose completion has not been reaped yet.
    outstanding: usize,
    /// The time of a timeout operation in flight (kernels without timed waits), held until
    /// its completion is reaped.
    timer: Option<Box<types::Timespec>>,
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.live)
            .finish_non_exhaustive()
    }
}

impl<T> Ring<T> {
    /// A ring with room for `entries` submissions at a time (more are submitted in several
    /// batches). Completions are run only when the owning thread waits for them
    /// (`IORING_SETUP_DEFER_TASKRUN` where the kernel has it).
    pub fn new(entries: u32) -> io::Result<Self> {
        let cq = entries.saturating_mul(4);
        let uring = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(cq)
            .build(entries)
        {
            Ok(u) => u,
            // Kernels before 6.1: the plain ring.
            Err(_) => IoUring::builder().setup_cqsize(cq).build(entries)?,
        };
        Ok(Self {
            uring,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ready: Vec::new(),
            cqes: Vec::new(),
            wake: None,
            closing: false,
            outstanding: 0,
            timer: None,
        })
    }

    /// Operations in flight (a [`Waker`]'s wait excluded).
    pub fn in_flight(&self) -> usize {
        self.live
    }

    /// Completions the completion queue can still take: a caller that keeps each batch of
    /// new entries within this never makes the kernel hold completions back (an overflowing
    /// queue makes older kernels refuse submissions). An operation takes one entry per
    /// segment (read or write) or one (receive, send); retries of a piece reuse its entry.
    pub fn room(&self) -> usize {
        (self.uring.params().cq_entries() as usize).saturating_sub(self.outstanding)
    }

    /// A waker for this ring (the same eventfd every call).
    pub fn waker(&mut self) -> io::Result<Waker> {
        if let Some(w) = &self.wake {
            return Ok(Waker {
                fd: Arc::clone(&w.fd),
            });
        }
        let fd = Arc::new(crate::eventfd()?);
        self.wake = Some(WakeRead {
            fd: Arc::clone(&fd),
            buf: vec![0u8; 8],
            armed: false,
        });
        self.arm_wake()?;
        Ok(Waker { fd })
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let Some(w) = &mut self.wake else {
            return Ok(());
        };
        if w.armed || self.closing {
            return Ok(());
        }
        let entry = opcode::Read::new(types::Fd(w.fd.as_raw_fd()), w.buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_UD);
        // SAFETY: the eight bytes are `w.buf`'s heap block and the descriptor is `w.fd`; both
        // are owned by `self.wake`, which is only dropped (or leaked) once the read completed
        // (`armed` false), see `Drop`.
        unsafe { self.push(&entry)? };
        if let Some(w) = &mut self.wake {
            w.armed = true;
        }
        Ok(())
    }

    fn alloc(&mut self, slot: Slot<T>) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, i: usize) -> Option<Slot<T>> {
        let s = self.slots.get_mut(i)?.take()?;
        self.live -= 1;
        self.free.push(i);
        Some(s)
    }

    /// Queue an entry, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer and descriptor `entry` refers to must stay valid and unmoved until its
    /// completion has been reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the entry's memory and descriptors outlive it.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                self.outstanding += 1;
                return Ok(());
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Read or write `segments` of `buf` (see [`Segment`]); completes with [`Done::ReadWrite`]
    /// once every segment is done. Refused if a segment is empty or reaches past the buffer's
    /// length.
    pub fn read_write(
        &mut self,
        dir: Dir,
        buf: IoBuf,
        segments: Vec<Segment>,
        user: T,
    ) -> Result<(), Box<Rejected<T>>> {
        let valid = !segments.is_empty()
            && segments.iter().all(|s| {
                s.len > 0
                    && u32::try_from(s.len).is_ok()
                    && s.at.checked_add(s.len).is_some_and(|e| e <= buf.len())
                    && s.offset.checked_add(s.len as u64).is_some()
            });
        if !valid {
            return Err(Box::new(Rejected {
                buf,
                user,
                error: io::Error::new(io::ErrorKind::InvalidInput, "bad segment"),
            }));
        }
        let n = segments.len();
        let segs = segments
            .into_iter()
            .map(|seg| SegState { seg, retries: 0 })
            .collect();
        let i = self.alloc(Slot {
            user,
            op: Op::Rw {
                dir,
                buf,
                segs,
                pending: n,
                error: None,
            },
        });
        for k in 0..n {
            if let Err(e) = self.submit_segment(i, k) {
                self.segment_done(i, Some(e));
            }
        }
        Ok(())
    }

    fn submit_segment(&mut self, i: usize, k: usize) -> io::Result<()> {
        let ud = ((i as u64) << 32) | k as u64;
        let entry = match self.slots.get_mut(i) {
            Some(Some(Slot {
                op: Op::Rw { dir, buf, segs, .. },
                ..
            })) => {
                let Some(s) = segs.get(k) else {
                    return Err(io::ErrorKind::InvalidInput.into());
                };
                let fd = types::Fd(s.seg.file.as_fd().as_raw_fd());
                // Checked by `read_write` and kept by `advance`: at + len <= buf.len().
                let ptr = buf.ptr_at(s.seg.at);
                let len = u32::try_from(s.seg.len).map_err(|_| io::ErrorKind::InvalidInput)?;
                match dir {
                    Dir::Read => opcode::Read::new(fd, ptr, len).offset(s.seg.offset).build(),
                    Dir::Write => opcode::Write::new(fd, ptr.cast_const(), len)
                        .offset(s.seg.offset)
                        .build(),
                }
                .user_data(ud)
            }
            _ => return Err(io::ErrorKind::InvalidInput.into()),
        };
        // SAFETY: the entry points into the slot's buffer (a heap block that does not move
        // while the slot owns the `IoBuf`) and at the segment's descriptor (held open by the
        // segment's `Arc`); the slot is released only when its last segment completed.
        unsafe { self.push(&entry) }
    }

    /// One segment of slot `i` finished, with `error` if it failed.
    fn segment_done(&mut self, i: usize, error: Option<io::Error>) {
        let finished = match self.slots.get_mut(i) {
            Some(Some(Slot {
                op: Op::Rw {
                    pending, error: e, ..
                },
                ..
            })) => {
                *pending -= 1;
                if e.is_none() {
                    *e = error;
                }
                *pending == 0
            }
            _ => false,
        };
        if finished
            && let Some(Slot {
                user,
                op: Op::Rw { buf, error, .. },
            }) = self.release(i)
        {
            self.ready.push(Done::ReadWrite {
                user,
                buf,
                result: error.map_or(Ok(()), Err),
            });
        }
    }

    /// Receive into `buf[at..buf.len()]` from the socket `fd`; completes with [`Done::Recv`].
    pub fn recv(
        &mut self,
        fd: SharedFd,
        buf: IoBuf,
        at: usize,
        user: T,
    ) -> Result<(), Box<Rejected<T>>> {
        let len = buf.len().checked_sub(at).filter(|&l| l > 0);
        let Some(len) = len.and_then(|l| u32::try_from(l).ok()) else {
            return Err(Box::new(Rejected {
                buf,
                user,
                error: io::Error::new(io::ErrorKind::InvalidInput, "no room to receive into"),
            }));
        };
        let mut buf = buf;
        let entry = opcode::Recv::new(types::Fd(fd.as_fd().as_raw_fd()), buf.ptr_at(at), len);
        let i = self.alloc(Slot {
            user,
            op: Op::Recv { _fd: fd, buf, at },
        });
        let entry = entry.build().user_data((i as u64) << 32);
        // SAFETY: the entry points into the slot's buffer (a heap block that does not move
        // while the slot owns it) and at `fd`, held open by the slot's `Arc`; the slot is
        // released only at the receive's completion.
        if let Err(error) = unsafe { self.push(&entry) }
            && let Some(Slot {
                user,
                op: Op::Recv { buf, at, .. },
            }) = self.release(i)
        {
            self.ready.push(Done::Recv {
                user,
                buf,
                at,
                result: Err(error),
            });
        }
        Ok(())
    }

    /// Send the parts, in order, on the socket `fd` (with `MSG_NOSIGNAL`); completes with
    /// [`Done::Send`] once every byte went out. At most [`MAX_SEND_PARTS`] parts.
    pub fn send(
        &mut self,
        fd: SharedFd,
        mut parts: Vec<SendPart>,
        user: T,
    ) -> Result<(), (Vec<SendPart>, T, io::Error)> {
        if parts.len() > MAX_SEND_PARTS {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "too many parts");
            return Err((parts, user, e));
        }
        let mut iov = Vec::with_capacity(parts.len());
        let mut total = 0usize;
        for p in &mut parts {
            let len = p.bytes().len();
            if len == 0 {
                continue;
            }
            total += len;
            let base = match p {
                SendPart::Inline(i) => i.bytes.as_mut_ptr(),
                SendPart::Static(s) => s.as_ptr().cast_mut(),
                SendPart::Owned(v) => v.as_mut_ptr(),
                SendPart::Buf(b) => b.ptr_at(0),
            };
            iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            });
        }
        if total == 0 {
            self.ready.push(Done::Send {
                user,
                parts,
                result: Ok(0),
            });
            return Ok(());
        }
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let i = self.alloc(Slot {
            user,
            op: Op::Send {
                fd,
                parts,
                iov,
                first: 0,
                msg: vec![msg],
                sent: 0,
                total,
                retries: 0,
            },
        });
        if let Err(e) = self.submit_send(i) {
            self.finish_send(i, Err(e));
        }
        Ok(())
    }

    fn submit_send(&mut self, i: usize) -> io::Result<()> {
        let entry = match self.slots.get_mut(i) {
            Some(Some(Slot {
                op:
                    Op::Send {
                        fd,
                        iov,
                        first,
                        msg,
                        ..
                    },
                ..
            })) => {
                let rest = &mut iov[*first..];
                let m = &mut msg[0];
                m.msg_iov = rest.as_mut_ptr();
                m.msg_iovlen = rest.len();
                opcode::SendMsg::new(types::Fd(fd.as_fd().as_raw_fd()), m as *const _)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
                    .user_data((i as u64) << 32)
            }
            _ => return Err(io::ErrorKind::InvalidInput.into()),
        };
        // SAFETY: the header, the vectors and every byte they point at are heap blocks (or
        // statics) owned by the slot, which is released only at the send's last completion;
        // the descriptor is held open by the slot's `Arc`.
        unsafe { self.push(&entry) }
    }

    fn finish_send(&mut self, i: usize, result: io::Result<usize>) {
        if let Some(Slot {
            user,
            op: Op::Send { parts, .. },
        }) = self.release(i)
        {
            self.ready.push(Done::Send {
                user,
                parts,
                result,
            });
        }
    }

    /// Submit what is queued, wait until at least one operation finished (unless one already
    /// has, or nothing is in flight), and append every finished operation to `out`.
    pub fn wait(&mut self, out: &mut Vec<Done<T>>) -> io::Result<()> {
        let waiting = self.live > 0 || self.wake.as_ref().is_some_and(|w| w.armed);
        let want = usize::from(self.ready.is_empty() && waiting);
        match self.uring.submitter().submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        Ok(())
    }

    /// As [`wait`](Self::wait), but return after `timeout` at the latest even if nothing
    /// finished (`None`: as `wait`). Kernels before 5.11, which cannot bound a wait, get a
    /// timeout operation instead, one at a time: there a wait may end up to one earlier,
    /// longer `timeout` late.
    pub fn wait_timeout(
        &mut self,
        out: &mut Vec<Done<T>>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let Some(timeout) = timeout else {
            return self.wait(out);
        };
        let waiting = self.live > 0 || self.wake.as_ref().is_some_and(|w| w.armed);
        let want = usize::from(self.ready.is_empty() && waiting);
        let waited = if want == 0 {
            self.uring.submitter().submit()
        } else if self.uring.params().is_feature_ext_arg() {
            let ts = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.uring.submitter().submit_with_args(want, &args)
        } else {
            self.arm_timer(timeout)?;
            self.uring.submitter().submit_and_wait(want)
        };
        match waited {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        Ok(())
    }

    /// Queue a timeout operation of `timeout`, unless one is in flight.
    fn arm_timer(&mut self, timeout: Duration) -> io::Result<()> {
        if self.timer.is_some() || self.closing {
            return Ok(());
        }
        let ts = Box::new(types::Timespec::from(timeout));
        let entry = opcode::Timeout::new(&raw const *ts)
            .build()
            .user_data(TIMER_UD);
        // SAFETY: the timespec is a heap block owned by `self.timer` from here until the
        // timeout's completion is reaped (`complete`), or, if the ring is dropped first, until
        // `Drop` cancelled it and reaped its completion (or leaked it).
        unsafe { self.push(&entry)? };
        self.timer = Some(ts);
        Ok(())
    }

    /// Submit what is queued and collect finished operations without waiting.
    pub fn poll(&mut self, out: &mut Vec<Done<T>>) -> io::Result<()> {
        match self.uring.submitter().submit() {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        self.reap(out);
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Done<T>>) {
        loop {
            self.cqes.clear();
            self.cqes
                .extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
            if self.cqes.is_empty() {
                break;
            }
            let cqes = std::mem::take(&mut self.cqes);
            for &(ud, res) in &cqes {
                self.complete(ud, res);
            }
            self.cqes = cqes;
        }
        // A waker that cannot be re-armed only loses early wake-ups; the caller's next
        // completion still ends its wait.
        let _ = self.arm_wake();
        out.append(&mut self.ready);
    }

    fn complete(&mut self, ud: u64, res: i32) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if ud == CANCEL_UD {
            return;
        }
        if ud == TIMER_UD {
            self.timer = None;
            return;
        }
        if ud == WAKE_UD {
            if let Some(w) = &mut self.wake {
                w.armed = false;
            }
            self.ready.push(Done::Woken);
            return;
        }
        let i = (ud >> 32) as usize;
        let k = (ud & 0xffff_ffff) as usize;
        let err = (res < 0).then(|| io::Error::from_raw_os_error(-res));
        let retry = matches!(-res, libc::EINTR | libc::EAGAIN) && !self.closing;
        match self.slots.get_mut(i) {
            Some(Some(Slot {
                op: Op::Rw { dir, segs, .. },
                ..
            })) => {
                let Some(s) = segs.get_mut(k) else { return };
                let outcome = match err {
                    Some(_) if retry && s.retries < MAX_RETRIES => {
                        s.retries += 1;
                        None
                    }
                    Some(e) => Some(Some(e)),
                    None => {
                        let n = res as usize;
                        if n >= s.seg.len {
                            Some(None)
                        } else if n == 0 || self.closing {
                            Some(Some(io::Error::from(match dir {
                                Dir::Read => io::ErrorKind::UnexpectedEof,
                                Dir::Write => io::ErrorKind::WriteZero,
                            })))
                        } else {
                            // Short transfer: the rest goes again.
                            s.seg.offset += n as u64;
                            s.seg.at += n;
                            s.seg.len -= n;
                            None
                        }
                    }
                };
                match outcome {
                    Some(e) => self.segment_done(i, e),
                    None => {
                        if let Err(e) = self.submit_segment(i, k) {
                            self.segment_done(i, Some(e));
                        }
                    }
                }
            }
            Some(Some(Slot {
                op: Op::Recv { .. },
                ..
            })) => {
                if let Some(Slot {
                    user,
                    op: Op::Recv { buf, at, .. },
                }) = self.release(i)
                {
                    self.ready.push(Done::Recv {
                        user,
                        buf,
                        at,
                        result: err.map_or(Ok(res as usize), Err),
                    });
                }
            }
            Some(Some(Slot {
                op:
                    Op::Send {
                        iov,
                        first,
                        sent,
                        total,
                        retries,
                        ..
                    },
                ..
            })) => {
                let again = match err {
                    Some(_) if retry && *retries < MAX_RETRIES => {
                        *retries += 1;
                        true
                    }
                    Some(e) => {
                        self.finish_send(i, Err(e));
                        return;
                    }
                    None => {
                        let mut n = res as usize;
                        *sent += n;
                        if *sent >= *total {
                            let t = *total;
                            self.finish_send(i, Ok(t));
                            return;
                        }
                        if n == 0 || self.closing {
                            self.finish_send(i, Err(io::ErrorKind::WriteZero.into()));
                            return;
                        }
                        // Short send: skip what went out, send the rest.
                        while n > 0 && *first < iov.len() {
                            let v = &mut iov[*first];
                            if v.iov_len <= n {
                                n -= v.iov_len;
                                *first += 1;
                            } else {
                                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                                v.iov_len -= n;
                                n = 0;
                            }
                        }
                        true
                    }
                };
                if again && let Err(e) = self.submit_send(i) {
                    self.finish_send(i, Err(e));
                }
            }
            _ => {}
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        self.closing = true;
        // The waker's read ends when the eventfd counts: no cancellation needed for it.
        if let Some(w) = &self.wake
            && w.armed
        {
            let _ = (&*w.fd).write(&1u64.to_ne_bytes());
        }
        let mut scratch = Vec::new();
        let busy =
            |r: &Self| r.live > 0 || r.timer.is_some() || r.wake.as_ref().is_some_and(|w| w.armed);
        let timed = self.uring.params().is_feature_ext_arg();
        let mut rounds = 0u32;
        while busy(self) {
            // Cancel the socket operations and a wait's timeout (by their user data, which
            // every kernel with io_uring networking understands); disk I/O cannot be
            // cancelled and completes on its own. Again every round, for anything resubmitted while a cancellation ran.
            let socket_ops: Vec<u64> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    matches!(
                        s,
                        Some(Slot {
                            op: Op::Recv { .. } | Op::Send { .. },
                            ..
                        })
                    )
                })
                .map(|(i, _)| (i as u64) << 32)
                .chain(self.timer.is_some().then_some(TIMER_UD))
                .collect();
            let mut pushed = Ok(());
            for ud in socket_ops {
                let cancel = opcode::AsyncCancel::new(ud).build().user_data(CANCEL_UD);
                // SAFETY: a cancellation refers to no memory.
                pushed = pushed.and(unsafe { self.push(&cancel) });
            }
            let waited = if timed {
                let ts = types::Timespec::from(Duration::from_millis(100));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            } else {
                self.uring.submitter().submit_and_wait(1)
            };
            let fatal = match (&pushed, &waited) {
                (Err(_), _) => true,
                (_, Err(e)) => !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)),
                _ => false,
            };
            rounds += 1;
            if fatal || rounds > 36_000 {
                // The kernel may still use the memory of what is in flight: leak it.
                std::mem::forget(std::mem::take(&mut self.slots));
                if let Some(w) = self.wake.take() {
                    std::mem::forget(w);
                }
                if let Some(t) = self.timer.take() {
                    std::mem::forget(t);
                }
                return;
            }
            self.reap(&mut scratch);
            scratch.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;

    fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(data, 0).unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(f.path())
                .unwrap(),
        );
        (f, file)
    }

    fn wait_one<T>(ring: &mut Ring<T>) -> Done<T> {
        let mut out = Vec::new();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    }

    #[test]
    fn buffers_are_aligned() {
        assert_eq!(IoBuf::empty().capacity(), 0);
        assert!(IoBuf::empty().as_slice().is_empty());
        for cap in [0, 1, 4096, 5000, 1 << 20] {
            let mut b = IoBuf::new(cap);
            assert_eq!(b.len(), cap);
            assert_eq!(b.as_mut_slice().as_ptr().addr() % ALIGN, 0);
            b.set_len(cap + 10);
            assert_eq!(b.len(), cap);
        }
    }

    #[test]
    fn reads_and_writes_segments_into_one_buffer() {
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let (_a, fa) = file_with(&data);
        let (_b, fb) = file_with(&[0u8; 16384]);
        let mut ring = Ring::new(8).unwrap();
        let segs = vec![
            Segment {
                file: fa.clone(),
                offset: 4096,
                at: 0,
                len: 4096,
            },
            Segment {
                file: fa.clone(),
                offset: 0,
                at: 4096,
                len: 4096,
            },
        ];
        ring.read_write(Dir::Read, IoBuf::new(8192), segs, 7u32)
            .unwrap();
        let Done::ReadWrite { user, buf, result } = wait_one(&mut ring) else {
            panic!("not a read");
        };
        result.unwrap();
        assert_eq!(user, 7);
        assert_eq!(&buf.as_slice()[..4096], &data[4096..8192]);
        assert_eq!(&buf.as_slice()[4096..], &data[..4096]);
        let seg = Segment {
            file: fb.clone(),
            offset: 8192,
            at: 0,
            len: 8192,
        };
        ring.read_write(Dir::Write, buf, vec![seg], 8).unwrap();
        let Done::ReadWrite { result, .. } = wait_one(&mut ring) else {
            panic!("not a write");
        };
        result.unwrap();
        let mut back = vec![0u8; 8192];
        fb.read_exact_at(&mut back, 8192).unwrap();
        assert_eq!(&back[..4096], &data[4096..8192]);
    }

    #[test]
    fn errors_and_short_files_are_reported() {
        let (_a, fa) = file_with(&[1u8; 4096]);
        let mut ring = Ring::new(4).unwrap();
        // Past the end of the file: nothing to read.
        let seg = Segment {
            file: fa.clone(),
            offset: 8192,
            at: 0,
            len: 4096,
        };
        ring.read_write(Dir::Read, IoBuf::new(4096), vec![seg], ())
            .unwrap();
        let Done::ReadWrite { result, .. } = wait_one(&mut ring) else {
            panic!()
        };
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // A write through a read-only descriptor.
        let ro = Arc::new(File::open(_a.path()).unwrap());
        let seg = Segment {
            file: ro,
            offset: 0,
            at: 0,
            len: 4096,
        };
        ring.read_write(Dir::Write, IoBuf::new(4096), vec![seg], ())
            .unwrap();
        let Done::ReadWrite { result, .. } = wait_one(&mut ring) else {
            panic!()
        };
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EBADF));
        // Segments outside the buffer are refused before submission.
        let seg = Segment {
            file: fa,
            offset: 0,
            at: 4000,
            len: 4096,
        };
        let r = ring.read_write(Dir::Read, IoBuf::new(4096), vec![seg], ());
        assert!(r.is_err());
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn sends_every_part_and_receives() {
        let (a, b) = UnixStream::pair().unwrap();
        let a: SharedFd = Arc::new(a);
        let b: SharedFd = Arc::new(b);
        let mut ring = Ring::new(8).unwrap();
        let mut big = IoBuf::new(1 << 20);
        big.as_mut_slice().fill(9);
        let parts = vec![
            SendPart::Inline(Inline::new(b"head").unwrap()),
            SendPart::Buf(big),
            SendPart::Static(b"tail"),
            SendPart::Owned(vec![]),
        ];
        // A megabyte does not fit the socket at once: the send finishes as it is received.
        ring.send(a, parts, 1).unwrap();
        let mut got = 0usize;
        let mut sent = false;
        let mut rx = Some(IoBuf::new(65536));
        let mut last = Vec::new();
        while !(sent && got == 8 + (1 << 20)) {
            if let Some(buf) = rx.take() {
                ring.recv(b.clone(), buf, 0, 2)
                    .map_err(|r| r.error)
                    .unwrap();
            }
            let mut out = Vec::new();
            ring.wait(&mut out).unwrap();
            for d in out {
                match d {
                    Done::Send { result, parts, .. } => {
                        assert_eq!(result.unwrap(), 8 + (1 << 20));
                        assert_eq!(parts.len(), 4);
                        sent = true;
                    }
                    Done::Recv { buf, result, .. } => {
                        let n = result.unwrap();
                        last = buf.as_slice()[..n].to_vec();
                        got += n;
                        rx = Some(buf);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(last.ends_with(b"tail"));
    }

    #[test]
    fn waker_interrupts_a_wait() {
        let mut ring: Ring<()> = Ring::new(4).unwrap();
        let w = ring.waker().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.wake();
        });
        assert!(matches!(wait_one(&mut ring), Done::Woken));
        t.join().unwrap();
    }

    #[test]
    fn a_timed_wait_returns_with_nothing_done_and_the_receive_still_in_flight() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut ring = Ring::new(4).unwrap();
        let _w = ring.waker().unwrap();
        ring.recv(Arc::new(a), IoBuf::new(64), 0, ())
            .map_err(|r| r.error)
            .unwrap();
        let mut out = Vec::new();
        // Nothing will arrive: without the timeout this would wait for ever.
        ring.wait_timeout(&mut out, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(ring.in_flight(), 1);
        // The receive is still there and completes when data comes.
        (&b).write_all(b"x").unwrap();
        while out.is_empty() {
            ring.wait_timeout(&mut out, Some(Duration::from_secs(60)))
                .unwrap();
        }
        assert!(matches!(out.pop(), Some(Done::Recv { result: Ok(1), .. })));
    }

    #[test]
    fn room_counts_completions_not_yet_reaped() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut ring = Ring::new(8).unwrap();
        let full = ring.room();
        assert!(full >= 8);
        ring.recv(Arc::new(a), IoBuf::new(64), 0, ())
            .map_err(|r| r.error)
            .unwrap();
        assert_eq!(ring.room(), full - 1);
        (&b).write_all(b"x").unwrap();
        assert!(matches!(wait_one(&mut ring), Done::Recv { .. }));
        assert_eq!(ring.room(), full);
    }

    #[test]
    fn dropping_a_ring_with_a_receive_in_flight_cancels_it() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut ring = Ring::new(4).unwrap();
        let _w = ring.waker().unwrap();
        ring.recv(Arc::new(a), IoBuf::new(4096), 0, ())
            .map_err(|r| r.error)
            .unwrap();
        ring.poll(&mut Vec::new()).unwrap();
        assert_eq!(ring.in_flight(), 1);
        drop(ring);
    }
}
