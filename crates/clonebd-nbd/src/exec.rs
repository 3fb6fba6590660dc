//! Running a request: the [`Conn`] its driver made for it, the worker pool's [`Job`], the
//! backend call and the [`ReplyFrame`] that answers it.
//!
//! Both transmission drivers ([`crate::threads`] and [`crate::ring`]) run requests here,
//! on the worker pool or on the connection's own thread (see
//! [`runs_inline`](crate::transmission::runs_inline)), and a finished request's reply goes to
//! the driver through the connection's [`ReplySink`]: the threaded driver writes it to the
//! socket, the io_uring driver hands it to its ring thread.

use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::backend::{Extent, NbdError, ZeroFlags};
use crate::codec::{
    ReplyHeader, ReplyTo, RequestHeader, TransmissionParams, encode_block_status, error_message,
};
use crate::handshake::MetaContext;
use crate::pool::{Buf, JobQueue};
use crate::proto::{Command, HeaderStyle, MAX_EXTENTS, command_flags as cf};
use crate::shared::Inner;

/// What follows a reply header on the wire.
#[derive(Debug)]
pub(crate) enum Body {
    None,
    /// An error message for a structured error chunk.
    Message(&'static str),
    /// Read data.
    Pooled(Buf),
    /// Block status chunks, headers included.
    Owned(Vec<u8>),
}

/// One complete reply, written in one go.
#[derive(Debug)]
pub(crate) struct ReplyFrame {
    pub(crate) head: Option<ReplyHeader>,
    pub(crate) body: Body,
    /// In-flight budget the request took, given back once the frame is out.
    pub(crate) cost: usize,
    pub(crate) error: bool,
}

impl ReplyFrame {
    pub(crate) fn ok(head: ReplyHeader, cost: usize) -> Self {
        Self {
            head: Some(head),
            body: Body::None,
            cost,
            error: false,
        }
    }

    pub(crate) fn error(
        style: HeaderStyle,
        h: &RequestHeader,
        error: NbdError,
        cost: usize,
    ) -> Self {
        let message = error_message(message(error));
        let head = ReplyHeader::error(style, h.cookie, h.offset, error.to_wire(), message);
        let body = if style == HeaderStyle::Simple {
            Body::None
        } else {
            Body::Message(message)
        };
        Self {
            head: Some(head),
            body,
            cost,
            error: true,
        }
    }
}

/// A human-readable message for an error reply.
fn message(error: NbdError) -> &'static str {
    match error {
        NbdError::Io => "input/output error",
        NbdError::Permission => "operation not permitted on this export",
        NbdError::NoMemory => "out of memory",
        NbdError::Invalid => "invalid request for this export",
        NbdError::NoSpace => "no space left, or request beyond the end of the export",
        NbdError::Overflow => "request too large",
        NbdError::NotSupported => "operation not supported",
        NbdError::Shutdown => "server is shutting down",
    }
}

/// Where a connection's driver takes the replies of requests run elsewhere.
pub(crate) trait ReplySink: Send + Sync {
    /// Take a reply to send; what it was charged is given back once it is out (or dropped).
    fn reply(&self, frame: ReplyFrame);
}

/// What running a connection's requests needs, shared by its driver and the workers running
/// them.
pub(crate) struct Conn {
    pub(crate) inner: Arc<Inner>,
    /// The peer's IP address (`None`: a unix socket).
    pub(crate) peer: Option<IpAddr>,
    pub(crate) params: TransmissionParams,
    contexts: Vec<MetaContext>,
    /// The worker pool shared by all connections.
    jobs: Arc<JobQueue<Job>>,
    sink: Arc<dyn ReplySink>,
}

/// What a driver makes its [`Conn`] from, with the [`ReplySink`] it takes replies by.
pub(crate) struct ConnSetup {
    pub(crate) inner: Arc<Inner>,
    pub(crate) jobs: Arc<JobQueue<Job>>,
    pub(crate) peer: Option<IpAddr>,
    pub(crate) params: TransmissionParams,
    pub(crate) contexts: Vec<MetaContext>,
}

impl Conn {
    pub(crate) fn new(setup: ConnSetup, sink: Arc<dyn ReplySink>) -> Self {
        let ConnSetup {
            inner,
            jobs,
            peer,
            params,
            contexts,
        } = setup;
        Self {
            inner,
            peer,
            params,
            contexts,
            jobs,
            sink,
        }
    }

    /// Queue a request for the worker pool; given back if the pool has closed.
    pub(crate) fn push(&self, job: Job) -> Result<(), Job> {
        self.jobs.push(job)
    }
}

/// A request for the worker pool.
pub(crate) struct Job {
    pub(crate) conn: Arc<Conn>,
    pub(crate) header: RequestHeader,
    pub(crate) payload: Option<Buf>,
    pub(crate) cost: usize,
}

/// A worker thread: run jobs until the queue closes.
pub(crate) fn worker(jobs: &JobQueue<Job>) {
    while let Some(job) = jobs.pop() {
        let frame = run_job(&job);
        job.conn.sink.reply(frame);
    }
}

/// Run a request, answering `NBD_EIO` if the backend panics.
pub(crate) fn run_job(job: &Job) -> ReplyFrame {
    catch_unwind(AssertUnwindSafe(|| execute(job))).unwrap_or_else(|_| {
        tracing::error!("backend panicked; answering EIO");
        ReplyFrame::error(job.conn.params.style, &job.header, NbdError::Io, job.cost)
    })
}

fn execute(job: &Job) -> ReplyFrame {
    let conn = &job.conn;
    let h = &job.header;
    let style = conn.params.style;
    let backend = conn.inner.backend.as_ref();
    let fua = h.flags & cf::FUA != 0;
    let done = || ReplyFrame::ok(ReplyHeader::done(style, h.cookie, h.offset), job.cost);
    let result = match h.command {
        Command::Read => {
            // Lengths were checked against the 32 MiB cap.
            let mut buf = conn.inner.buffers.get(h.length as usize);
            backend
                .read(h.offset, buf.as_mut_slice())
                .map(|()| ReplyFrame {
                    head: Some(ReplyHeader::read_data(style, h.cookie, h.offset, h.length)),
                    body: Body::Pooled(buf),
                    cost: job.cost,
                    error: false,
                })
        }
        Command::Write => {
            let data = job.payload.as_ref().map_or(&[][..], Buf::as_slice);
            backend.write(h.offset, data, fua).map(|()| done())
        }
        Command::Flush => backend.flush().map(|()| done()),
        Command::Trim => backend.trim(h.offset, h.length, fua).map(|()| done()),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                fua,
                no_hole: h.flags & cf::NO_HOLE != 0,
                fast_zero: h.flags & cf::FAST_ZERO != 0,
            };
            backend
                .write_zeroes(h.offset, h.length, flags)
                .map(|()| done())
        }
        Command::Cache => backend.cache(h.offset, h.length).map(|()| done()),
        Command::BlockStatus => block_status(conn, h, job.cost),
        Command::Disc | Command::Unknown(_) => Err(NbdError::Invalid),
    };
    result.unwrap_or_else(|e| ReplyFrame::error(style, h, e, job.cost))
}

/// Keep the extents a reply may carry: nonzero, covering at most `limit` bytes, one only with
/// `NBD_CMD_FLAG_REQ_ONE` ("every reply chunk MUST contain exactly one descriptor, and that
/// descriptor MUST NOT exceed the *length* of the original request").
fn clip_extents(extents: &mut Vec<Extent>, limit: u64, req_one: bool) -> Result<(), NbdError> {
    if extents.is_empty() || extents.iter().any(|e| e.length == 0) {
        tracing::error!("backend returned an empty block status or a zero-length extent");
        return Err(NbdError::Io);
    }
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut covered = 0u64;
    let mut keep = 0;
    for e in extents.iter_mut().take(max) {
        keep += 1;
        if e.length >= limit - covered {
            e.length = limit - covered;
            break;
        }
        covered += e.length;
    }
    extents.truncate(keep);
    Ok(())
}

/// "the server MUST use a structured reply, containing exactly one chunk of type
/// `NBD_REPLY_TYPE_BLOCK_STATUS` per selected context id".
fn block_status(conn: &Conn, h: &RequestHeader, cost: usize) -> Result<ReplyFrame, NbdError> {
    let p = &conn.params;
    // Checked: offset + length <= size and length > 0.
    let limit = h.length.min(p.size - h.offset);
    let req_one = h.flags & cf::REQ_ONE != 0;
    let mut body = Vec::new();
    let last = conn.contexts.len().saturating_sub(1);
    for (i, ctx) in conn.contexts.iter().enumerate() {
        let mut extents = conn
            .inner
            .backend
            .block_status(&ctx.name, h.offset, limit)?;
        clip_extents(&mut extents, limit, req_one)?;
        let to = ReplyTo {
            style: p.style,
            cookie: h.cookie,
            offset: h.offset,
        };
        encode_block_status(to, ctx.id, &extents, i == last, p.min_block, &mut body);
    }
    Ok(ReplyFrame {
        head: None,
        body: Body::Owned(body),
        cost,
        error: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(length: u64) -> Extent {
        Extent { length, flags: 0 }
    }

    #[test]
    fn clip_extents_cuts_at_limit() {
        let mut v = vec![e(512), e(1024), e(4096)];
        clip_extents(&mut v, 1024, false).unwrap();
        assert_eq!(v, vec![e(512), e(512)]);
    }

    #[test]
    fn clip_extents_req_one_keeps_first_within_request() {
        let mut v = vec![e(8192), e(512)];
        clip_extents(&mut v, 4096, true).unwrap();
        assert_eq!(v, vec![e(4096)]);
    }

    #[test]
    fn clip_extents_refuses_empty_and_zero_length() {
        assert_eq!(clip_extents(&mut vec![], 512, false), Err(NbdError::Io));
        assert_eq!(clip_extents(&mut vec![e(0)], 512, false), Err(NbdError::Io));
    }
}
