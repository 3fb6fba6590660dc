//! A multiplexed NBD client: one connection carries the reads (and block status queries) of
//! many threads at once.
//!
//! [`MuxClient`] takes over a connection [`Client`] has negotiated (so the handshake, the
//! request encoding and the reply parsing are the client's, over the crate's codec: there is
//! no second implementation of the framing). Each request gets its own cookie and a slot to
//! wait on; it is registered before it is sent, so a quick reply always finds it. One reader
//! thread per connection reads reply chunks as they come, in any order and interleaved
//! between requests, looks each cookie up, and lets that request's assembly (`client/reply.rs`) read the
//! chunk straight into the request's buffer. A request that is complete wakes its caller.
//!
//! Failure breaks the whole connection and fails every request on it with
//! [`ClientError::Broken`]: a socket error, a protocol violation, a reply for an unknown
//! cookie, or a request whose reply did not come within the caller's timeout (a server that
//! stopped answering is not waited for on other requests either). Callers resend on a new
//! connection; a server error (`EIO`, say) fails only its own request.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{BlockSizes, Extent};
use crate::client::{Assembly, Client, ClientError, Pending, Sink, read_head, status_query};
use crate::codec::RequestHeader;
use crate::handshake::MetaContext;
use crate::proto::{Command, EXTENDED_REQUEST_LEN, HeaderStyle, MAX_PAYLOAD};
use crate::stream::Stream;

/// Where one request's outcome is left for its caller.
#[derive(Debug, Default)]
struct Slot {
    done: Mutex<Option<Result<Sink<'static>, ClientError>>>,
    cv: Condvar,
}

impl Slot {
    fn complete(&self, r: Result<Sink<'static>, ClientError>) {
        *lock(&self.done) = Some(r);
        self.cv.notify_one();
    }
}

/// Requests sent and not yet answered, and whether the connection still works.
#[derive(Debug, Default)]
struct Table {
    waiting: HashMap<u64, (Assembly<'static>, Arc<Slot>)>,
    next_cookie: u64,
    broken: Option<String>,
}

#[derive(Debug)]
struct Shared {
    table: Mutex<Table>,
    /// A handle to shut the socket down from any thread.
    control: Stream,
    style: HeaderStyle,
}

impl Shared {
    /// Breaks the connection: every waiting request fails, and no new one is taken.
    fn break_all(&self, why: String) {
        let waiting = {
            let mut t = lock(&self.table);
            if t.broken.is_none() {
                tracing::debug!("NBD connection broken: {why}");
                t.broken = Some(why);
            }
            std::mem::take(&mut t.waiting)
        };
        let _ = self.control.shutdown(Shutdown::Both);
        for (_, (_, slot)) in waiting {
            slot.complete(Err(ClientError::Broken));
        }
    }
}

/// Locks `m`; a poisoned lock (a panicked holder) is taken as is: the table is consistent
/// between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An NBD connection shared by many threads, for reads.
#[derive(Debug)]
pub struct MuxClient {
    shared: Arc<Shared>,
    writer: Mutex<Stream>,
    reader: Mutex<Option<JoinHandle<()>>>,
    size: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    contexts: Vec<MetaContext>,
}

impl MuxClient {
    /// Takes over `client`'s connection. `write_timeout` bounds sending one request (a
    /// server that stopped reading); replies are waited for as each call says.
    pub fn new(client: Client, write_timeout: Option<Duration>) -> Result<Self, ClientError> {
        let parts = client.into_parts()?;
        parts.reader.set_read_timeout(None)?;
        parts.writer.set_write_timeout(write_timeout)?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Table {
                next_cookie: 1,
                ..Table::default()
            }),
            control: parts.writer.try_clone()?,
            style: parts.style,
        });
        let s = Arc::clone(&shared);
        let reader = BufReader::with_capacity(256 * 1024, parts.reader);
        let handle = std::thread::Builder::new()
            .name("nbd-client-rx".into())
            .spawn(move || receive(&s, reader))?;
        Ok(Self {
            shared,
            writer: Mutex::new(parts.writer),
            reader: Mutex::new(Some(handle)),
            size: parts.size,
            transmission_flags: parts.transmission_flags,
            block_sizes: parts.block_sizes,
            contexts: parts.contexts,
        })
    }

    /// The metadata contexts selected, with the ids the server gave them.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.contexts
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The block sizes the server advertised.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// The largest read one request may ask for.
    pub fn max_read(&self) -> usize {
        self.block_sizes.maximum.min(MAX_PAYLOAD) as usize
    }

    /// Why the connection no longer works, once it does not.
    pub fn broken(&self) -> Option<String> {
        lock(&self.shared.table).broken.clone()
    }

    /// Reads `buf.len()` bytes at `offset` (at most [`MuxClient::max_read`]), waiting at most
    /// `timeout` for the reply; a reply that does not come in time breaks the connection.
    pub fn read(&self, offset: u64, buf: &mut [u8], timeout: Duration) -> Result<(), ClientError> {
        let len = buf.len() as u64;
        let max = self.max_read();
        if buf.len() > max {
            return Err(ClientError::TooLarge {
                len,
                max: max as u32,
            });
        }
        let sink = Sink::Owned(vec![0u8; buf.len()]);
        match self.request(Command::Read, offset, len, sink, timeout)? {
            Sink::Owned(data) => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            _ => Err(ClientError::Protocol("read reply without data")),
        }
    }

    /// The status of `[offset, offset+len)` in `context`, as [`Client::block_status`]:
    /// extents from `offset` covering a prefix of the range. Waits as [`MuxClient::read`].
    pub fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> Result<Vec<Extent>, ClientError> {
        let (id, len) = status_query(&self.contexts, &self.block_sizes, context, len)?;
        let sink = Sink::OwnedStatus(id, Vec::new());
        match self.request(Command::BlockStatus, offset, len, sink, timeout)? {
            Sink::OwnedStatus(_, extents) => Ok(extents),
            _ => Err(ClientError::Protocol("block status reply without extents")),
        }
    }

    /// Sends one request whose reply goes to `sink`, and waits for it; returns the sink.
    fn request(
        &self,
        command: Command,
        offset: u64,
        len: u64,
        sink: Sink<'static>,
        timeout: Duration,
    ) -> Result<Sink<'static>, ClientError> {
        let deadline = Instant::now() + timeout;
        let slot = Arc::new(Slot::default());
        // Registered before it is sent: the reply may come before `send` returns.
        let cookie = {
            let mut t = lock(&self.shared.table);
            if t.broken.is_some() {
                return Err(ClientError::Broken);
            }
            let cookie = t.next_cookie;
            t.next_cookie = t.next_cookie.wrapping_add(1).max(1);
            let pending = Pending {
                cookie,
                command,
                offset,
                length: len,
            };
            let a = Assembly::new(pending, sink);
            t.waiting.insert(cookie, (a, Arc::clone(&slot)));
            cookie
        };
        let header = RequestHeader {
            flags: 0,
            command,
            cookie,
            offset,
            length: len,
        };
        let mut h = [0u8; EXTENDED_REQUEST_LEN];
        let n = header.encode(self.shared.style, &mut h);
        if let Err(e) = lock(&self.writer).write_all(&h[..n]) {
            self.shared
                .break_all(format!("sending a request failed: {e}"));
            return Err(e.into());
        }
        let mut done = lock(&slot.done);
        loop {
            if let Some(r) = done.take() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(done);
                self.shared.break_all(format!(
                    "no reply to a {command:?} of {len} bytes at {offset} within {timeout:?}"
                ));
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply within {timeout:?}"),
                )));
            }
            done = slot
                .cv
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends `NBD_CMD_DISC` if the connection still works, and closes it.
    pub fn close(&self) {
        if self.broken().is_none() {
            let header = RequestHeader {
                flags: 0,
                command: Command::Disc,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            let mut h = [0u8; EXTENDED_REQUEST_LEN];
            let n = header.encode(self.shared.style, &mut h);
            let _ = lock(&self.writer).write_all(&h[..n]);
        }
        self.shared.break_all("closed".to_string());
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
    }
}

impl Drop for MuxClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reader thread: reply chunks to the requests they answer, until the connection breaks.
fn receive(shared: &Shared, mut r: BufReader<Stream>) {
    let why = loop {
        let head = match read_head(&mut r, shared.style) {
            Ok(h) => h,
            Err(e) => break e.to_string(),
        };
        let cookie = head.cookie();
        // Taken out of the table while its chunk is read, so requesters are not held up.
        let Some((mut a, slot)) = lock(&shared.table).waiting.remove(&cookie) else {
            break format!("a reply for cookie {cookie}, which no request has");
        };
        match a.feed(&mut r, shared.style, head) {
            Err(e) => {
                slot.complete(Err(ClientError::Broken));
                break e.to_string();
            }
            Ok(false) => {
                let mut t = lock(&shared.table);
                if t.broken.is_some() {
                    // Broken meanwhile: break_all did not see this request.
                    drop(t);
                    slot.complete(Err(ClientError::Broken));
                } else {
                    t.waiting.insert(cookie, (a, slot));
                }
            }
            Ok(true) => match a.outcome() {
                (Ok(Ok(())), sink) => slot.complete(Ok(sink)),
                (Ok(Err(server)), _) => slot.complete(Err(server)),
                (Err(e), _) => {
                    slot.complete(Err(ClientError::Broken));
                    break e.to_string();
                }
            },
        }
    };
    shared.break_all(why);
}
