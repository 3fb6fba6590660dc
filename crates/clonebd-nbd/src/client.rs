//! A blocking NBD client: the fixed newstyle handshake, then one request at a time.
//!
//! [`Client`] connects over a unix socket or TCP, negotiates structured replies when the server
//! offers them, optionally selects metadata contexts (such as `clonebd:hydrated`), and enters
//! transmission with `NBD_OPT_GO`, asking for `NBD_INFO_BLOCK_SIZE` and so promising to honour
//! the sizes the server gives (it falls back to `NBD_OPT_EXPORT_NAME` on an old server). It
//! encodes requests and option messages with the crate's codec ([`RequestHeader::encode`],
//! [`ClientOption::encode`]) and decodes non-data reply chunks with
//! [`decode_reply`](crate::codec::decode_reply).
//!
//! Every length the server sends is checked before anything is allocated: option replies are
//! capped at [`MAX_OPTION_LEN`], reply chunks at the maximum payload, and read data must land
//! inside the request's own buffer. A server error is returned as [`ClientError::Server`] with
//! the NBD error value; a protocol violation or an I/O failure breaks the connection, and
//! every later call fails with [`ClientError::Broken`].
//!
//! Requests go out one at a time and each waits for its reply ([`Client::send`] and
//! [`Client::receive`], keyed by cookie). A reply is read in two steps (`reply.rs`): a chunk's
//! header, which names the cookie, then its body, into the buffer of the request with that
//! cookie; [`crate::mux::MuxClient`] uses the same two steps to share one negotiated
//! connection among many threads, replies in any order.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod reply;

pub(crate) use reply::{Assembly, Sink, read_head};

use crate::backend::{BlockSizes, Extent, NbdError};
use crate::codec::RequestHeader;
use crate::handshake::{ClientOption, MetaContext};
use crate::proto::{
    Command, EXTENDED_REQUEST_LEN, HeaderStyle, IHAVEOPT, MAX_OPTION_LEN, MAX_PAYLOAD, NBDMAGIC,
    OPTION_REPLY_MAGIC, client_flags, command_flags as cf, handshake_flags, info, opt, rep,
    transmission_flags as tf,
};
use crate::stream::Stream;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket failed; the connection is broken.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer does not speak the fixed newstyle protocol.
    #[error("not a fixed newstyle NBD server (greeting {magic:#x}, flags {flags:#x})")]
    NotNewstyle {
        /// The first eight bytes.
        magic: u64,
        /// The handshake flags.
        flags: u16,
    },
    /// The server refused an option the client cannot do without.
    #[error("server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        /// The option.
        option: u32,
        /// The error reply type (`NBD_REP_ERR_*`).
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server broke the protocol; the connection is broken.
    #[error("protocol violation by the server: {0}")]
    Protocol(&'static str),
    /// The server answered the request with an error; the connection goes on.
    #[error("server error {value} ({error}){}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Server {
        /// The error as the crate names it.
        error: NbdError,
        /// The NBD error value on the wire.
        value: u32,
        /// The message of a structured error chunk (empty with simple replies).
        message: String,
    },
    /// The export does not advertise this command or flag.
    #[error("the export does not support {0:?}")]
    NotSupported(Command),
    /// The request is larger than the server's maximum payload.
    #[error("{len} bytes exceed the maximum payload of {max}")]
    TooLarge {
        /// The request's length.
        len: u64,
        /// The server's maximum payload.
        max: u32,
    },
    /// `block_status` named a context that was not negotiated.
    #[error("metadata context {0:?} was not negotiated")]
    NoContext(String),
    /// An earlier failure broke the connection.
    #[error("the connection is broken by an earlier failure")]
    Broken,
}

impl ClientError {
    /// The NBD error value of a server error.
    pub fn nbd_value(&self) -> Option<u32> {
        match self {
            Self::Server { value, .. } => Some(*value),
            _ => None,
        }
    }
}

/// What to negotiate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// The export's name (`""` for the default export).
    pub export: String,
    /// Ask for structured replies (used if the server agrees).
    pub structured: bool,
    /// Metadata contexts to select (needs structured replies), e.g. `clonebd:hydrated`.
    pub meta_contexts: Vec<String>,
    /// Read and write timeout of the socket (none: wait forever).
    pub timeout: Option<Duration>,
    /// How long a TCP connect may take (none: the system's limit).
    pub connect_timeout: Option<Duration>,
    /// Ask for TLS (`NBD_OPT_STARTTLS`) before any other option, and run the rest of the
    /// connection through what this returns.
    pub starttls: Option<StartTls>,
}

/// A socket the client connected, handed to [`StartTls`] once the server agreed to TLS.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// A unix socket.
    Unix(UnixStream),
}

/// Makes a connection secure: given the socket after the server agreed to `NBD_OPT_STARTTLS`,
/// it runs the TLS handshake and returns a unix stream that carries the plaintext (the
/// caller relays it through TLS over the socket). The client knows nothing of TLS itself.
#[derive(Clone)]
pub struct StartTls(pub Arc<dyn Fn(Socket) -> io::Result<UnixStream> + Send + Sync>);

impl std::fmt::Debug for StartTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartTls")
    }
}

impl PartialEq for StartTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StartTls {}

impl ClientOptions {
    /// Structured replies, no metadata context, no timeout.
    pub fn new(export: &str) -> Self {
        Self {
            export: export.to_owned(),
            structured: true,
            meta_contexts: Vec::new(),
            timeout: None,
            connect_timeout: None,
            starttls: None,
        }
    }

    /// Also select `context`.
    pub fn meta_context(mut self, context: &str) -> Self {
        self.meta_contexts.push(context.to_owned());
        self
    }

    /// Connect over a unix socket.
    pub fn connect_unix(&self, path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)?;
        Client::handshake(Stream::Unix(s), self)
    }

    /// Connect over TCP (with `TCP_NODELAY`).
    pub fn connect_tcp(&self, addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let s = match self.connect_timeout {
            None => TcpStream::connect(addr)?,
            Some(t) => connect_each(addr, t)?,
        };
        self.handshake_tcp(s)
    }

    /// Negotiate over a TCP socket already connected (one bound to a chosen local address,
    /// say), with `TCP_NODELAY`.
    pub fn handshake_tcp(&self, s: TcpStream) -> Result<Client, ClientError> {
        // "both the client and server SHOULD disable Nagle's algorithm".
        s.set_nodelay(true)?;
        Client::handshake(Stream::Tcp(s), self)
    }
}

/// `TcpStream::connect_timeout` over every address `addr` resolves to, the last error if none
/// answers.
fn connect_each(addr: impl ToSocketAddrs, t: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, t) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A request sent and not yet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The cookie the reply carries.
    pub cookie: u64,
    /// The command.
    pub command: Command,
    /// Offset of the request.
    pub offset: u64,
    /// Length of the request.
    pub length: u64,
}

/// The two checks of a block status request, shared by [`Client::block_status`] and the
/// multiplexed client's: the id `context` was negotiated with among `contexts`, and `len`
/// clipped to what a compact header carries (32 bits; the length is a hint), aligned to the
/// minimum block size.
pub(crate) fn status_query(
    contexts: &[MetaContext],
    sizes: &BlockSizes,
    context: &str,
    len: u64,
) -> Result<(u32, u64), ClientError> {
    let id = contexts
        .iter()
        .find(|c| c.name == context)
        .map(|c| c.id)
        .ok_or_else(|| ClientError::NoContext(context.to_owned()))?;
    let align = u64::from(sizes.minimum.max(1));
    Ok((id, len.min(u64::from(u32::MAX) / align * align)))
}

/// A connection taken over by the multiplexed client.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) reader: Stream,
    pub(crate) writer: Stream,
    pub(crate) style: HeaderStyle,
    pub(crate) size: u64,
    pub(crate) transmission_flags: u16,
    pub(crate) block_sizes: BlockSizes,
    pub(crate) contexts: Vec<MetaContext>,
}

/// A connected NBD client in the transmission phase.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<Stream>,
    writer: Stream,
    style: HeaderStyle,
    size: u64,
    transmission_flags: u16,
    block_sizes: BlockSizes,
    contexts: Vec<MetaContext>,
    next_cookie: u64,
    broken: bool,
    closed: bool,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Largest length one trim, write-zeroes or cache request carries in a compact header: a
/// multiple of every possible minimum block size (at most 64 KiB).
const MAX_EFFECT_LEN: u64 = 1 << 30;

impl Client {
    /// Connect over a unix socket to `export` with structured replies and no metadata context.
    pub fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Self, ClientError> {
        ClientOptions::new(export).connect_unix(path)
    }

    /// Connect over TCP to `export` with structured replies and no metadata context.
    pub fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> Result<Self, ClientError> {
        ClientOptions::new(export).connect_tcp(addr)
    }

    fn handshake(stream: Stream, opts: &ClientOptions) -> Result<Self, ClientError> {
        stream.set_read_timeout(opts.timeout)?;
        stream.set_write_timeout(opts.timeout)?;
        let writer = stream.try_clone()?;
        let mut c = Self {
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            style: HeaderStyle::Simple,
            size: 0,
            transmission_flags: 0,
            block_sizes: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_PAYLOAD,
            },
            contexts: Vec::new(),
            next_cookie: 1,
            broken: false,
            closed: false,
        };
        // "S: 64 bits, `0x4e42444d41474943` (ASCII '`NBDMAGIC`') S: 64 bits,
        // `0x49484156454F5054` (ASCII '`IHAVEOPT`') S: 16 bits, handshake flags".
        let mut greeting = [0u8; 18];
        c.reader.read_exact(&mut greeting)?;
        let (magic, opt_magic, hflags) =
            (be64(&greeting, 0), be64(&greeting, 8), be16(&greeting, 16));
        if magic != NBDMAGIC
            || opt_magic != IHAVEOPT
            || hflags & handshake_flags::FIXED_NEWSTYLE == 0
        {
            return Err(ClientError::NotNewstyle {
                magic,
                flags: hflags,
            });
        }
        let no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
        let mut cflags = client_flags::FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= client_flags::NO_ZEROES;
        }
        c.writer.write_all(&cflags.to_be_bytes())?;
        if let Some(tls) = &opts.starttls {
            c.starttls(tls, opts.timeout)?;
        }
        if opts.structured {
            c.send_option(&ClientOption::StructuredReply)?;
            let (ty, _) = c.option_reply(opt::STRUCTURED_REPLY)?;
            // Any error ("`NBD_REP_ERR_UNSUP`" from an older server) leaves simple replies.
            if ty == rep::ACK {
                c.style = HeaderStyle::Structured;
            }
        }
        if c.style.structured() && !opts.meta_contexts.is_empty() {
            c.send_option(&ClientOption::SetMetaContext {
                name: opts.export.clone(),
                queries: opts.meta_contexts.clone(),
            })?;
            loop {
                let (ty, data) = c.option_reply(opt::SET_META_CONTEXT)?;
                match ty {
                    // "32 bits, NBD metadata context ID. String, name of the metadata
                    // context."
                    rep::META_CONTEXT if data.len() >= 4 => {
                        let name = String::from_utf8(data[4..].to_vec())
                            .map_err(|_| ClientError::Protocol("context name is not UTF-8"))?;
                        c.contexts.push(MetaContext {
                            id: be32(&data, 0),
                            name,
                        });
                    }
                    rep::META_CONTEXT => {
                        return Err(ClientError::Protocol("short NBD_REP_META_CONTEXT"));
                    }
                    rep::ACK => break,
                    // A server that cannot report contexts: go on without them.
                    _ => {
                        c.contexts.clear();
                        break;
                    }
                }
            }
        }
        c.go(&opts.export, no_zeroes)?;
        Ok(c)
    }

    /// "the client ... sends `NBD_OPT_STARTTLS` ... the server replies with `NBD_REP_ACK` ...
    /// the client and server then negotiate TLS"; the rest of the handshake and the whole
    /// transmission phase go through the stream `tls` returns.
    fn starttls(&mut self, tls: &StartTls, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.send_option(&ClientOption::StartTls)?;
        let (ty, data) = self.option_reply(opt::STARTTLS)?;
        if ty != rep::ACK {
            return Err(ClientError::OptionRefused {
                option: opt::STARTTLS,
                reply: ty,
                message: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        if !self.reader.buffer().is_empty() {
            return Err(ClientError::Protocol("data after NBD_OPT_STARTTLS's reply"));
        }
        let socket = match self.writer.try_clone()? {
            Stream::Tcp(s) => Socket::Tcp(s),
            Stream::Unix(s) => Socket::Unix(s),
        };
        let plain = (tls.0)(socket)?;
        plain.set_read_timeout(timeout)?;
        plain.set_write_timeout(timeout)?;
        self.writer = Stream::Unix(plain.try_clone()?);
        self.reader = BufReader::with_capacity(64 * 1024, Stream::Unix(plain));
        Ok(())
    }

    /// `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, or `NBD_OPT_EXPORT_NAME` if the server does not
    /// know `NBD_OPT_GO`.
    fn go(&mut self, export: &str, no_zeroes: bool) -> Result<(), ClientError> {
        self.send_option(&ClientOption::Go {
            name: export.to_owned(),
            requests: vec![info::BLOCK_SIZE],
        })?;
        let mut have_export = false;
        loop {
            let (ty, data) = self.option_reply(opt::GO)?;
            match ty {
                rep::INFO if data.len() >= 2 => match be16(&data, 0) {
                    // "16 bits, `NBD_INFO_EXPORT` 64 bits, size of the export in bytes
                    // (unsigned) 16 bits, transmission flags".
                    info::EXPORT if data.len() == 12 => {
                        self.size = be64(&data, 2);
                        self.transmission_flags = be16(&data, 10);
                        have_export = true;
                    }
                    // "32 bits, minimum block size 32 bits, preferred block size 32 bits,
                    // maximum payload size".
                    info::BLOCK_SIZE if data.len() == 14 => {
                        let sizes = BlockSizes {
                            minimum: be32(&data, 2),
                            preferred: be32(&data, 6),
                            maximum: be32(&data, 10),
                        };
                        if !sizes.minimum.is_power_of_two()
                            || sizes.minimum > 65536
                            || sizes.preferred < sizes.minimum
                            || sizes.maximum < sizes.minimum
                        {
                            return Err(ClientError::Protocol("invalid NBD_INFO_BLOCK_SIZE"));
                        }
                        self.block_sizes = sizes;
                    }
                    info::EXPORT | info::BLOCK_SIZE => {
                        return Err(ClientError::Protocol("NBD_REP_INFO of the wrong length"));
                    }
                    // Information not asked for is ignored.
                    _ => {}
                },
                rep::INFO => return Err(ClientError::Protocol("empty NBD_REP_INFO")),
                rep::ACK if have_export => break,
                rep::ACK => {
                    return Err(ClientError::Protocol("NBD_OPT_GO without NBD_INFO_EXPORT"));
                }
                // "Clients ... SHOULD ... handle `NBD_REP_ERR_UNSUP` by falling back to using
                // `NBD_OPT_EXPORT_NAME`."
                rep::ERR_UNSUP => return self.export_name(export, no_zeroes),
                _ => {
                    return Err(ClientError::OptionRefused {
                        option: opt::GO,
                        reply: ty,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
            }
        }
        self.finish_handshake()
    }

    /// "S: 64 bits, size of the export in bytes (unsigned) S: 16 bits, transmission flags S:
    /// 124 bytes, zeroes (reserved) (unless `NBD_FLAG_C_NO_ZEROES` was negotiated by the
    /// client)". Structured replies still apply if negotiated; metadata contexts do not.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(), ClientError> {
        self.send_option(&ClientOption::ExportName(export.to_owned()))?;
        let mut b = [0u8; 10 + 124];
        let n = if no_zeroes { 10 } else { b.len() };
        self.reader.read_exact(&mut b[..n])?;
        self.size = be64(&b, 0);
        self.transmission_flags = be16(&b, 8);
        self.contexts.clear();
        self.finish_handshake()
    }

    fn finish_handshake(&mut self) -> Result<(), ClientError> {
        if self.transmission_flags & tf::HAS_FLAGS == 0 {
            return Err(ClientError::Protocol(
                "transmission flags without HAS_FLAGS",
            ));
        }
        Ok(())
    }

    fn send_option(&mut self, option: &ClientOption) -> Result<(), ClientError> {
        let mut out = Vec::new();
        option.encode(&mut out);
        self.writer.write_all(&out)?;
        Ok(())
    }

    /// One option reply for `option`: (reply type, data). "S: 64 bits, `0x3e889045565a9`
    /// (magic number for replies) S: 32 bits, the option as sent by the client to which this
    /// is a reply S: 32 bits, reply type S: 32 bits, length of the reply".
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let mut h = [0u8; 20];
        self.reader.read_exact(&mut h)?;
        if be64(&h, 0) != OPTION_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad option reply magic"));
        }
        if be32(&h, 8) != option {
            return Err(ClientError::Protocol("option reply for another option"));
        }
        let len = be32(&h, 16);
        if len > MAX_OPTION_LEN {
            return Err(ClientError::Protocol("option reply too long"));
        }
        let mut data = vec![0u8; len as usize];
        self.reader.read_exact(&mut data)?;
        Ok((be32(&h, 12), data))
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The block sizes the server advertised (the protocol's defaults if it sent none).
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// The transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Whether structured replies are in use.
    pub fn structured(&self) -> bool {
        self.style.structured()
    }

    /// The metadata contexts selected, with the ids the server gave them.
    pub fn meta_contexts(&self) -> &[MetaContext] {
        &self.contexts
    }

    /// The connection's two halves and what was negotiated, for the multiplexed client.
    /// Nothing follows the handshake until a request is sent, so no reply can be buffered.
    pub(crate) fn into_parts(mut self) -> Result<Parts, ClientError> {
        self.usable()?;
        if !self.reader.buffer().is_empty() {
            return Err(ClientError::Protocol("data after the handshake"));
        }
        let parts = Parts {
            reader: self.reader.get_ref().try_clone()?,
            writer: self.writer.try_clone()?,
            style: self.style,
            size: self.size,
            transmission_flags: self.transmission_flags,
            block_sizes: self.block_sizes,
            contexts: std::mem::take(&mut self.contexts),
        };
        // Dropping `self` now closes only its own descriptors, sending nothing.
        self.closed = true;
        Ok(parts)
    }

    fn advertised(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }

    fn usable(&self) -> Result<(), ClientError> {
        if self.broken || self.closed {
            Err(ClientError::Broken)
        } else {
            Ok(())
        }
    }

    /// Send one request (and a write's payload); returns what to wait for.
    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<Pending, ClientError> {
        self.usable()?;
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut h = [0u8; EXTENDED_REQUEST_LEN];
        let n = header.encode(self.style, &mut h);
        let r = write_all_vectored(
            &mut self.writer,
            &mut [IoSlice::new(&h[..n]), IoSlice::new(payload)],
        );
        if let Err(e) = r {
            self.broken = true;
            return Err(e.into());
        }
        Ok(Pending {
            cookie,
            command,
            offset,
            length,
        })
    }

    /// Wait for the reply to `p`, putting any read data in `buf` (which must be `p.length`
    /// long for a read).
    pub fn receive(&mut self, p: &Pending, buf: &mut [u8]) -> Result<(), ClientError> {
        let sink = if p.command == Command::Read {
            Sink::Read(buf)
        } else {
            Sink::None
        };
        self.finish(p, sink)
    }

    fn finish(&mut self, p: &Pending, sink: Sink<'_>) -> Result<(), ClientError> {
        self.usable()?;
        match self.reply(p, sink) {
            Ok(r) => r,
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Read every chunk of the reply to `p`. The outer error breaks the connection; the inner
    /// one is the server's answer.
    fn reply(
        &mut self,
        p: &Pending,
        sink: Sink<'_>,
    ) -> Result<Result<(), ClientError>, ClientError> {
        let mut a = Assembly::new(*p, sink);
        loop {
            let head = read_head(&mut self.reader, self.style)?;
            if head.cookie() != p.cookie {
                return Err(ClientError::Protocol("reply for an unknown cookie"));
            }
            if a.feed(&mut self.reader, self.style, head)? {
                return a.outcome().0;
            }
        }
    }

    fn check_payload(&self, len: u64) -> Result<(), ClientError> {
        let max = self.block_sizes.maximum.min(MAX_PAYLOAD);
        if len > u64::from(max) {
            return Err(ClientError::TooLarge { len, max });
        }
        Ok(())
    }

    fn simple_command(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
    ) -> Result<(), ClientError> {
        let p = self.send(command, flags, offset, length, &[])?;
        self.finish(&p, Sink::None)
    }

    /// Run an effect command over `[offset, offset+len)` in pieces a compact header carries.
    fn ranged(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let mut at = offset;
        let end = offset.saturating_add(len);
        loop {
            let n = (end - at).min(MAX_EFFECT_LEN);
            self.simple_command(command, flags, at, n)?;
            at += n;
            if at >= end {
                return Ok(());
            }
        }
    }

    /// Read `buf.len()` bytes at `offset` (at most the maximum payload).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = buf.len() as u64;
        self.check_payload(len)?;
        let p = self.send(Command::Read, 0, offset, len, &[])?;
        self.finish(&p, Sink::Read(buf))
    }

    /// Write `data` at `offset` (at most the maximum payload); with `fua`, durable before
    /// the reply.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_payload(data.len() as u64)?;
        let flags = self.fua_flag(fua, Command::Write)?;
        let p = self.send(Command::Write, flags, offset, data.len() as u64, data)?;
        self.finish(&p, Sink::None)
    }

    fn fua_flag(&self, fua: bool, command: Command) -> Result<u16, ClientError> {
        match fua {
            false => Ok(0),
            true if self.advertised(tf::SEND_FUA) => Ok(cf::FUA),
            true => Err(ClientError::NotSupported(command)),
        }
    }

    fn require(&self, flag: u16, command: Command) -> Result<(), ClientError> {
        if self.advertised(flag) {
            Ok(())
        } else {
            Err(ClientError::NotSupported(command))
        }
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.require(tf::SEND_FLUSH, Command::Flush)?;
        self.simple_command(Command::Flush, 0, 0, 0)
    }

    /// Discard `len` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.require(tf::SEND_TRIM, Command::Trim)?;
        self.ranged(Command::Trim, 0, offset, len)
    }

    /// Make `len` bytes at `offset` read as zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.require(tf::SEND_WRITE_ZEROES, Command::WriteZeroes)?;
        self.ranged(Command::WriteZeroes, 0, offset, len)
    }

    /// Ask the server to prepare `len` bytes at `offset` (a clonebd export hydrates them).
    pub fn cache(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.require(tf::SEND_CACHE, Command::Cache)?;
        self.ranged(Command::Cache, 0, offset, len)
    }

    /// The status of `[offset, offset+len)` in `context`: extents from `offset` covering a
    /// prefix of the range (the server may describe less than asked; ask again for the rest).
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, ClientError> {
        let (id, len) = status_query(&self.contexts, &self.block_sizes, context, len)?;
        let p = self.send(Command::BlockStatus, 0, offset, len, &[])?;
        let mut extents = Vec::new();
        self.finish(&p, Sink::Status(id, &mut extents))?;
        Ok(extents)
    }

    /// Send `NBD_CMD_DISC` and close the connection.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.disconnect_inner()
    }

    fn disconnect_inner(&mut self) -> Result<(), ClientError> {
        if self.closed {
            return Ok(());
        }
        let r = if self.broken {
            Ok(())
        } else {
            self.send(Command::Disc, 0, 0, 0, &[]).map(drop)
        };
        self.closed = true;
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
        r
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.disconnect_inner();
    }
}

fn server_error(value: u32, message: Vec<u8>) -> ClientError {
    ClientError::Server {
        error: NbdError::from_wire(value),
        value,
        message: String::from_utf8_lossy(&message).into_owned(),
    }
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
