//! The server side of the fixed newstyle handshake, as a sans-IO state machine.
//!
//! [`Handshake`] is fed the client's bytes and queues the server's bytes; it never touches a
//! socket. The caller asks [`Handshake::wanted`] how many bytes the machine needs next (never
//! more than a 16-byte option header or [`MAX_OPTION_LEN`] of
//! option data), passes them to [`Handshake::feed`], and sends [`Handshake::output`]. The
//! machine stops consuming input the moment transmission starts, so bytes after the final
//! option belong to the transmission phase. The outcome is a [`Negotiated`]: the export, the
//! header style (simple, structured or extended), the selected metadata contexts with their ids
//! and the client flags.
//!
//! Assumptions: one export, reachable by its name or by the default name `""`. Made with
//! [`Handshake::new`] the server runs in NOTLS mode and answers `NBD_OPT_STARTTLS` with
//! `NBD_REP_ERR_UNSUP`; made with [`Handshake::with_tls`] it runs in FORCEDTLS mode: before
//! TLS every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` gets `NBD_REP_ERR_TLS_REQD`
//! and `NBD_OPT_EXPORT_NAME` ends the session; `NBD_OPT_STARTTLS` is acknowledged and the
//! machine stops at [`Status::StartTls`] until the caller has run the TLS handshake and calls
//! [`Handshake::tls_started`]. The TLS itself is the caller's.

use crate::backend::{Backend, BackendFlags, BlockSizes};
use crate::proto::{
    HeaderStyle, IHAVEOPT, MAX_OPTION_DRAIN, MAX_OPTION_LEN, MAX_OPTIONS, MAX_PAYLOAD,
    MAX_STRING_LEN, NBDMAGIC, OPTION_REPLY_MAGIC, client_flags, handshake_flags, info, opt, rep,
    transmission_flags as tf,
};

/// Why an export's description cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// "If advertised, this value MUST be a power of 2, MUST NOT be larger than 2^16".
    #[error("minimum block size {0} is not a power of two in 1..=65536")]
    BadMinimum(u32),
    /// "this MUST be a power of 2 at least as large as the maximum of the minimum block size
    /// and 2^9".
    #[error("preferred block size {preferred} is not a power of two at least max({minimum}, 512)")]
    BadPreferred {
        /// The preferred block size given.
        preferred: u32,
        /// The minimum block size given.
        minimum: u32,
    },
    /// Names are strings: "MUST be no longer than 4096 bytes", no NUL.
    #[error("export name or description is not a valid NBD string")]
    BadString,
}

/// Everything the handshake tells a client about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical export name; the default name `""` also selects it.
    pub name: String,
    /// Description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Advertised size constraints, already checked: `maximum` is the payload cap.
    pub block_sizes: BlockSizes,
    /// Supported operations.
    pub flags: BackendFlags,
    /// Metadata contexts the export can report; the id of context `i` is `i + 1`.
    pub meta_contexts: Vec<String>,
}

fn valid_string(s: &str) -> bool {
    s.len() <= MAX_STRING_LEN && !s.contains('\0')
}

impl ExportInfo {
    /// Describe an export, checking its block sizes.
    ///
    /// The preferred size is clamped to the 32 MiB payload cap (a region larger than that is
    /// still served, with 32 MiB as the efficient unit), and the maximum payload is
    /// `min(maximum, 32 MiB)` raised to at least the preferred size: "MUST be at least as large
    /// as the preferred block size".
    pub fn new(
        name: &str,
        description: &str,
        size: u64,
        block_sizes: BlockSizes,
        flags: BackendFlags,
        meta_contexts: Vec<String>,
    ) -> Result<Self, ExportError> {
        let BlockSizes {
            minimum,
            preferred,
            maximum,
        } = block_sizes;
        if !minimum.is_power_of_two() || minimum > 65536 {
            return Err(ExportError::BadMinimum(minimum));
        }
        if !preferred.is_power_of_two() || preferred < minimum.max(512) {
            return Err(ExportError::BadPreferred { preferred, minimum });
        }
        if !valid_string(name)
            || !valid_string(description)
            || meta_contexts
                .iter()
                .any(|c| !valid_string(c) || !c.contains(':'))
        {
            return Err(ExportError::BadString);
        }
        let preferred = preferred.min(MAX_PAYLOAD);
        let maximum = maximum.min(MAX_PAYLOAD).max(preferred);
        Ok(Self {
            name: name.to_owned(),
            description: description.to_owned(),
            size,
            block_sizes: BlockSizes {
                minimum,
                preferred,
                maximum,
            },
            flags,
            meta_contexts,
        })
    }

    /// Describe the export a [`Backend`] serves.
    pub fn from_backend(
        name: &str,
        description: &str,
        backend: &dyn Backend,
    ) -> Result<Self, ExportError> {
        Self::new(
            name,
            description,
            backend.size(),
            backend.block_sizes(),
            backend.flags(),
            backend.meta_contexts(),
        )
    }

    /// Whether a client's export name selects this export.
    pub fn matches(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// The transmission flags for a connection using `style`.
    ///
    /// "bit 7, `NBD_FLAG_SEND_DF` ... MUST leave this flag clear if structured replies have not
    /// been negotiated"; "`NBD_FLAG_SEND_FAST_ZERO` ... MUST set this transmission flag to 0 if
    /// `NBD_FLAG_SEND_WRITE_ZEROES` is not set". Write-type operations are not advertised on a
    /// read-only export.
    pub fn transmission_flags(&self, style: HeaderStyle) -> u16 {
        let f = &self.flags;
        let writable = !f.read_only;
        let mut flags = tf::HAS_FLAGS;
        let mut set = |cond: bool, bit: u16| {
            if cond {
                flags |= bit;
            }
        };
        set(f.read_only, tf::READ_ONLY);
        set(f.flush, tf::SEND_FLUSH);
        set(f.fua, tf::SEND_FUA);
        set(writable && f.trim, tf::SEND_TRIM);
        set(writable && f.write_zeroes, tf::SEND_WRITE_ZEROES);
        set(
            writable && f.write_zeroes && f.fast_zero,
            tf::SEND_FAST_ZERO,
        );
        set(style.structured(), tf::SEND_DF);
        set(f.multi_conn, tf::CAN_MULTI_CONN);
        set(f.cache, tf::SEND_CACHE);
        flags
    }
}

/// A metadata context selected with `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetaContext {
    /// The id the server assigned and sends in block status chunks.
    pub id: u32,
    /// The context name, e.g. `base:allocation`.
    pub name: String,
}

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The canonical name of the chosen export.
    pub export_name: String,
    /// Request and reply header style.
    pub style: HeaderStyle,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Metadata contexts selected for `NBD_CMD_BLOCK_STATUS`, in id order.
    pub meta_contexts: Vec<MetaContext>,
    /// The client flags as sent.
    pub client_flags: u32,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` with `NBD_OPT_GO`, promising to honour it.
    pub block_size_requested: bool,
    /// Transmission began with `NBD_OPT_EXPORT_NAME` rather than `NBD_OPT_GO`.
    pub via_export_name: bool,
}

/// Why a handshake ended without transmission; the connection is to be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// "the server MUST close the TCP connection if it does not recognize the client's flags".
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an unknown export: "the server MUST terminate the session".
    #[error("NBD_OPT_EXPORT_NAME for an unknown export")]
    UnknownExport,
    /// Option data longer than the server drains.
    #[error("option {option} carries {len} bytes, more than the server accepts")]
    OptionTooLarge {
        /// The option type.
        option: u32,
        /// Its declared data length.
        len: u32,
    },
    /// More options than one handshake may send.
    #[error("too many options")]
    TooManyOptions,
    /// Input was fed after the handshake had finished.
    #[error("handshake already finished")]
    Finished,
    /// `NBD_OPT_EXPORT_NAME` before TLS on a server that requires it: "as this request cannot
    /// error, it MUST terminate the session".
    #[error("NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    TlsRequired,
}

/// Where a handshake stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Still haggling: feed [`Handshake::wanted`] more bytes.
    Negotiating,
    /// Transmission begins; send the remaining output first.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`; send the remaining output, then close.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: send the remaining output, run the TLS handshake
    /// on the socket (the server's side), then call [`Handshake::tls_started`] and go on
    /// over TLS. No input is consumed until then.
    StartTls,
    /// A fatal error; send any remaining output, then close.
    Failed(HandshakeError),
}

/// An option as the client sends it, decoded from its type and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with its export name.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data is ignored).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`: export name and information requests.
    Info {
        /// Export name.
        name: String,
        /// Requested `NBD_INFO_*` types.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_GO`: as `Info`, then transmission.
    Go {
        /// Export name.
        name: String,
        /// Requested `NBD_INFO_*` types.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext {
        /// Export name.
        name: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext {
        /// Export name.
        name: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option, with its data.
    Unknown {
        /// The option type.
        option: u32,
        /// Its data.
        data: Vec<u8>,
    },
}

/// Why option data is rejected with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// Data where the option takes none: "the server SHOULD reject a request that includes data
    /// with `NBD_REP_ERR_INVALID`".
    #[error("the option takes no data")]
    UnexpectedData,
    /// A length field reaches past the option's data, or data is left over.
    #[error("option data is truncated or has trailing bytes")]
    BadLength,
    /// A string is not UTF-8, contains NUL or is longer than 4096 bytes.
    #[error("invalid string")]
    BadString,
}

/// A cursor over option data; every read is bounds-checked.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if n > self.data.len() {
            return Err(OptionError::BadLength);
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, len: u32) -> Result<String, OptionError> {
        let len = usize::try_from(len).map_err(|_| OptionError::BadLength)?;
        let bytes = self.take(len)?;
        if len > MAX_STRING_LEN || bytes.contains(&0) {
            return Err(OptionError::BadString);
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| OptionError::BadString)
    }

    fn end(&self) -> Result<(), OptionError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(OptionError::BadLength)
        }
    }
}

fn no_data(data: &[u8], option: ClientOption) -> Result<ClientOption, OptionError> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(OptionError::UnexpectedData)
    }
}

/// Export name, then a count and a list of length-prefixed queries, as in both meta context
/// options: "32 bits, length of export name. String, name of export ... 32 bits, number of
/// queries. Zero or more queries, each being: 32 bits, length of query. String, query".
fn decode_meta(data: &[u8]) -> Result<(String, Vec<String>), OptionError> {
    let mut c = Cursor { data };
    let name_len = c.u32()?;
    let name = c.string(name_len)?;
    let count = c.u32()?;
    // Each query needs at least its 4-byte length, so the count is bounded by the data left;
    // checking first keeps a hostile count from reserving memory.
    if u64::from(count) * 4 > c.data.len() as u64 {
        return Err(OptionError::BadLength);
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = c.u32()?;
        queries.push(c.string(len)?);
    }
    c.end()?;
    Ok((name, queries))
}

/// Export name and information requests of `NBD_OPT_INFO`/`NBD_OPT_GO`: "32 bits, length of
/// name (unsigned); MUST be no larger than the option data length - 6. String: name of the
/// export. 16 bits, number of information requests. 16 bits x n - list of `NBD_INFO`
/// information requests".
fn decode_info(data: &[u8]) -> Result<(String, Vec<u16>), OptionError> {
    let mut c = Cursor { data };
    let name_len = c.u32()?;
    let name = c.string(name_len)?;
    let count = c.u16()?;
    if usize::from(count) * 2 != c.data.len() {
        return Err(OptionError::BadLength);
    }
    let mut requests = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        requests.push(c.u16()?);
    }
    Ok((name, requests))
}

impl ClientOption {
    /// Decode an option from its type and data.
    pub fn decode(option: u32, data: &[u8]) -> Result<Self, OptionError> {
        match option {
            // "Data: String, name of the export, as free-form text. The length of the name is
            // determined from the option header."
            opt::EXPORT_NAME => {
                let mut c = Cursor { data };
                Ok(Self::ExportName(c.string(data.len() as u32)?))
            }
            // "The client SHOULD NOT send any additional data with the option; however, a
            // server SHOULD ignore any data sent by the client".
            opt::ABORT => Ok(Self::Abort),
            // "The client MUST NOT send any additional data with the option".
            opt::LIST => no_data(data, Self::List),
            opt::STARTTLS => no_data(data, Self::StartTls),
            opt::INFO => decode_info(data).map(|(name, requests)| Self::Info { name, requests }),
            opt::GO => decode_info(data).map(|(name, requests)| Self::Go { name, requests }),
            opt::STRUCTURED_REPLY => no_data(data, Self::StructuredReply),
            opt::LIST_META_CONTEXT => {
                decode_meta(data).map(|(name, queries)| Self::ListMetaContext { name, queries })
            }
            opt::SET_META_CONTEXT => {
                decode_meta(data).map(|(name, queries)| Self::SetMetaContext { name, queries })
            }
            opt::EXTENDED_HEADERS => no_data(data, Self::ExtendedHeaders),
            option => Ok(Self::Unknown {
                option,
                data: data.to_vec(),
            }),
        }
    }

    /// The option type.
    pub fn option(&self) -> u32 {
        match self {
            Self::ExportName(_) => opt::EXPORT_NAME,
            Self::Abort => opt::ABORT,
            Self::List => opt::LIST,
            Self::StartTls => opt::STARTTLS,
            Self::Info { .. } => opt::INFO,
            Self::Go { .. } => opt::GO,
            Self::StructuredReply => opt::STRUCTURED_REPLY,
            Self::ListMetaContext { .. } => opt::LIST_META_CONTEXT,
            Self::SetMetaContext { .. } => opt::SET_META_CONTEXT,
            Self::ExtendedHeaders => opt::EXTENDED_HEADERS,
            Self::Unknown { option, .. } => *option,
        }
    }

    /// Append the option as a client sends it: `IHAVEOPT`, type, length, data.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        let put_str = |data: &mut Vec<u8>, s: &str| {
            data.extend_from_slice(&(s.len() as u32).to_be_bytes());
            data.extend_from_slice(s.as_bytes());
        };
        match self {
            Self::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            Self::Info { name, requests } | Self::Go { name, requests } => {
                put_str(&mut data, name);
                data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
                for r in requests {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            Self::ListMetaContext { name, queries } | Self::SetMetaContext { name, queries } => {
                put_str(&mut data, name);
                data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                for q in queries {
                    put_str(&mut data, q);
                }
            }
            Self::Unknown { data: d, .. } => data.extend_from_slice(d),
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders => {}
        }
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option().to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
    }
}

/// What the machine is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// "C: 32 bits, client flags".
    ClientFlags,
    /// "C: 64 bits, `IHAVEOPT`; C: 32 bits, option; C: 32 bits, length of option data".
    OptionHeader,
    /// The option's data, buffered (at most `MAX_OPTION_LEN` bytes).
    OptionData { option: u32, len: u32 },
    /// Option data too long to buffer, dropped as it arrives; then `reply` is sent.
    Drain {
        option: u32,
        remaining: u32,
        reply: u32,
    },
}

/// The server's TLS mode, and where a FORCEDTLS handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// NOTLS.
    Off,
    /// FORCEDTLS, TLS not yet initiated.
    Required,
    /// FORCEDTLS, the rest of the handshake runs over TLS.
    Active,
}

/// The server side of one handshake.
#[derive(Debug)]
pub struct Handshake {
    tls: Tls,
    export: ExportInfo,
    reading: Reading,
    input: Vec<u8>,
    output: Vec<u8>,
    status: Status,
    client_flags: u32,
    style: HeaderStyle,
    contexts: Vec<MetaContext>,
    options_seen: u32,
}

/// Append an option reply: "S: 64 bits, `0x3e889045565a9` (magic number for replies) S: 32
/// bits, the option as sent by the client to which this is a reply S: 32 bits, reply type S: 32
/// bits, length of the reply. ... S: any data as required by the reply".
fn push_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

fn push_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    push_reply(out, option, reply_type, &[message.as_bytes()]);
}

impl Handshake {
    /// Start a handshake for `export`; the greeting is queued in [`output`](Self::output):
    /// "S: 64 bits, `NBDMAGIC`; S: 64 bits, `IHAVEOPT`; S: 16 bits, handshake flags".
    pub fn new(export: ExportInfo) -> Self {
        let mut output = Vec::with_capacity(256);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(
            &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
        );
        Self {
            tls: Tls::Off,
            export,
            reading: Reading::ClientFlags,
            input: Vec::new(),
            output,
            status: Status::Negotiating,
            client_flags: 0,
            style: HeaderStyle::Simple,
            contexts: Vec::new(),
            options_seen: 0,
        }
    }

    /// Start a handshake for `export` on a server that requires TLS (FORCEDTLS mode).
    pub fn with_tls(export: ExportInfo) -> Self {
        let mut hs = Self::new(export);
        hs.tls = Tls::Required;
        hs
    }

    /// The TLS handshake the machine stopped for ([`Status::StartTls`]) has succeeded: the
    /// option haggling goes on, over TLS. Does nothing in any other state.
    pub fn tls_started(&mut self) {
        if self.status == Status::StartTls {
            self.status = Status::Negotiating;
            self.tls = Tls::Active;
        }
    }

    /// Whether TLS has been initiated on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls == Tls::Active
    }

    /// Bytes the server must send now, in order.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Forget the first `n` bytes of [`output`](Self::output), once sent.
    pub fn consume_output(&mut self, n: usize) {
        let n = n.min(self.output.len());
        self.output.drain(..n);
    }

    /// Where the handshake stands.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// How many more input bytes the machine needs for its next step: zero once finished, and
    /// never more than `MAX_OPTION_LEN`. Feeding exactly this many never consumes bytes that
    /// belong to the transmission phase.
    pub fn wanted(&self) -> usize {
        if self.status != Status::Negotiating {
            return 0;
        }
        let need = match self.reading {
            Reading::ClientFlags => 4,
            Reading::OptionHeader => 16,
            Reading::OptionData { len, .. } => len as usize,
            Reading::Drain { remaining, .. } => remaining.min(MAX_OPTION_LEN) as usize,
        };
        need.saturating_sub(self.input.len())
    }

    /// Feed client bytes; returns how many were consumed. Consumption stops when the handshake
    /// finishes, so leftover bytes belong to the transmission phase.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<usize, HandshakeError> {
        if self.status != Status::Negotiating {
            return Err(HandshakeError::Finished);
        }
        let mut consumed = 0;
        while self.status == Status::Negotiating && !input.is_empty() {
            let n = self.wanted().min(input.len());
            match &mut self.reading {
                Reading::Drain { remaining, .. } => *remaining -= n as u32,
                _ => self.input.extend_from_slice(&input[..n]),
            }
            input = &input[n..];
            consumed += n;
            if self.wanted() == 0 {
                self.step();
            }
        }
        match &self.status {
            Status::Failed(err) => Err(err.clone()),
            _ => Ok(consumed),
        }
    }

    /// Handle one complete unit of input.
    fn step(&mut self) {
        let input = std::mem::take(&mut self.input);
        match self.reading {
            Reading::ClientFlags => {
                let flags = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
                // "the server MUST drop the TCP connection if the client sets an unknown flag".
                if flags & !client_flags::KNOWN != 0 {
                    self.status = Status::Failed(HandshakeError::BadClientFlags(flags));
                } else {
                    self.client_flags = flags;
                    self.reading = Reading::OptionHeader;
                }
            }
            Reading::OptionHeader => self.option_header(&input),
            // Before TLS the data of an option to be refused is not even decoded: malformed
            // or not, it gets `NBD_REP_ERR_TLS_REQD`.
            Reading::OptionData { option, .. }
                if self.tls == Tls::Required
                    && !matches!(option, opt::STARTTLS | opt::ABORT | opt::EXPORT_NAME) =>
            {
                self.reading = Reading::OptionHeader;
                push_error(&mut self.output, option, rep::ERR_TLS_REQD, "TLS required");
            }
            Reading::OptionData { option, .. } => {
                self.reading = Reading::OptionHeader;
                match ClientOption::decode(option, &input) {
                    Ok(decoded) => self.handle(decoded),
                    // An export name that is not a valid string names no export, and
                    // `NBD_OPT_EXPORT_NAME` cannot be answered with an error.
                    Err(_) if option == opt::EXPORT_NAME => {
                        self.status = Status::Failed(HandshakeError::UnknownExport)
                    }
                    Err(err) => {
                        push_error(&mut self.output, option, rep::ERR_INVALID, &err.to_string())
                    }
                }
            }
            Reading::Drain {
                option,
                remaining,
                reply,
            } => {
                if remaining == 0 {
                    self.reading = Reading::OptionHeader;
                    push_error(&mut self.output, option, reply, "option data too large");
                }
            }
        }
        // Keep the allocation for the next unit.
        self.input = input;
        self.input.clear();
    }

    /// "C: 64 bits, `0x49484156454F5054` (ASCII '`IHAVEOPT`') C: 32 bits, option C: 32 bits,
    /// length of option data (unsigned)".
    fn option_header(&mut self, h: &[u8]) {
        let magic = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if magic != IHAVEOPT {
            self.status = Status::Failed(HandshakeError::BadMagic(magic));
            return;
        }
        self.options_seen += 1;
        if self.options_seen > MAX_OPTIONS {
            self.status = Status::Failed(HandshakeError::TooManyOptions);
            return;
        }
        if len <= MAX_OPTION_LEN {
            self.reading = Reading::OptionData { option, len };
            if len == 0 {
                self.step();
            }
            return;
        }
        // "The presence of the option length in every option allows the server to skip any
        // options presented by the client that it does not understand." Long data is skipped
        // without buffering, up to a bound; past it, or when no error can be sent (an export
        // name), the session ends.
        let known = (opt::EXPORT_NAME..=opt::EXTENDED_HEADERS).contains(&option)
            && option != opt::PEEK_EXPORT;
        if len > MAX_OPTION_DRAIN || option == opt::EXPORT_NAME {
            self.status = Status::Failed(HandshakeError::OptionTooLarge { option, len });
            return;
        }
        let reply = if self.tls == Tls::Required && option != opt::ABORT {
            rep::ERR_TLS_REQD
        } else if known {
            rep::ERR_TOO_BIG
        } else {
            rep::ERR_UNSUP
        };
        self.reading = Reading::Drain {
            option,
            remaining: len,
            reply,
        };
    }

    fn handle(&mut self, option: ClientOption) {
        let code = option.option();
        if self.tls == Tls::Required {
            match option {
                // "If the server receives `NBD_OPT_STARTTLS` prior to negotiating TLS, it MUST
                // reply with `NBD_REP_ACK`."
                ClientOption::StartTls => {
                    push_reply(&mut self.output, code, rep::ACK, &[]);
                    self.status = Status::StartTls;
                    return;
                }
                ClientOption::Abort => {}
                // "If the server receives a request to enter transmission mode via
                // `NBD_OPT_EXPORT_NAME` when TLS has not been initiated, then as this request
                // cannot error, it MUST terminate the session."
                ClientOption::ExportName(_) => {
                    self.status = Status::Failed(HandshakeError::TlsRequired);
                    return;
                }
                // "If the server receives any other option, including `NBD_OPT_INFO` and
                // unsupported options, it MUST reply with `NBD_REP_ERR_TLS_REQD` if TLS has
                // not been initiated".
                _ => {
                    push_error(&mut self.output, code, rep::ERR_TLS_REQD, "TLS required");
                    return;
                }
            }
        }
        match option {
            ClientOption::ExportName(name) => {
                if !self.export.matches(&name) {
                    self.status = Status::Failed(HandshakeError::UnknownExport);
                    return;
                }
                // "S: 64 bits, size of the export in bytes (unsigned) S: 16 bits, transmission
                // flags S: 124 bytes, zeroes (reserved) (unless `NBD_FLAG_C_NO_ZEROES` was
                // negotiated by the client)".
                let flags = self.export.transmission_flags(self.style);
                self.output
                    .extend_from_slice(&self.export.size.to_be_bytes());
                self.output.extend_from_slice(&flags.to_be_bytes());
                if self.client_flags & client_flags::NO_ZEROES == 0 {
                    self.output.extend_from_slice(&[0u8; 124]);
                }
                self.finish(flags, false, true);
            }
            ClientOption::Abort => {
                // "The server MUST reply with `NBD_REP_ACK`."
                push_reply(&mut self.output, code, rep::ACK, &[]);
                self.status = Status::Aborted;
            }
            ClientOption::List => {
                // "Return zero or more `NBD_REP_SERVER` replies, one for each export, followed
                // by `NBD_REP_ACK`"; the description follows the name.
                let name = self.export.name.as_bytes();
                let len = (name.len() as u32).to_be_bytes();
                let desc = self.export.description.as_bytes();
                push_reply(&mut self.output, code, rep::SERVER, &[&len, name, desc]);
                push_reply(&mut self.output, code, rep::ACK, &[]);
            }
            // "If the server receives `NBD_OPT_STARTTLS` when TLS has already been negotiated,
            // it MUST reply with `NBD_REP_ERR_INVALID`."
            ClientOption::StartTls if self.tls == Tls::Active => push_error(
                &mut self.output,
                code,
                rep::ERR_INVALID,
                "TLS already negotiated",
            ),
            ClientOption::StartTls => {
                // NOTLS mode: "it MUST respond with ... `NBD_REP_ERR_UNSUP` (if it does not
                // support the `NBD_OPT_STARTTLS` option at all)".
                push_error(
                    &mut self.output,
                    code,
                    rep::ERR_UNSUP,
                    "TLS is not supported",
                );
            }
            ClientOption::Info { name, requests } => self.info_go(code, &name, &requests, false),
            ClientOption::Go { name, requests } => self.info_go(code, &name, &requests, true),
            ClientOption::StructuredReply => match self.style {
                // Once extended headers are in use, structured replies are implied and the
                // older option is refused, as by other servers.
                HeaderStyle::Extended => push_error(
                    &mut self.output,
                    code,
                    rep::ERR_EXT_HEADER_REQD,
                    "extended headers already negotiated",
                ),
                // "The client SHOULD NOT send such messages more than once; if it does, the
                // server MAY fail the repeated message with `NBD_REP_ERR_INVALID`."
                HeaderStyle::Structured => push_error(
                    &mut self.output,
                    code,
                    rep::ERR_INVALID,
                    "structured replies already negotiated",
                ),
                HeaderStyle::Simple => {
                    self.style = HeaderStyle::Structured;
                    push_reply(&mut self.output, code, rep::ACK, &[]);
                }
            },
            ClientOption::ExtendedHeaders => {
                if self.style == HeaderStyle::Extended {
                    push_error(
                        &mut self.output,
                        code,
                        rep::ERR_INVALID,
                        "extended headers already negotiated",
                    );
                } else {
                    self.style = HeaderStyle::Extended;
                    push_reply(&mut self.output, code, rep::ACK, &[]);
                }
            }
            ClientOption::ListMetaContext { name, queries } => {
                self.meta_context(code, &name, &queries, false)
            }
            ClientOption::SetMetaContext { name, queries } => {
                self.meta_context(code, &name, &queries, true)
            }
            ClientOption::Unknown { option, .. } => {
                // "Servers that receive messages which they do not implement MUST reply to them
                // with `NBD_REP_ERR_UNSUP`, and MUST NOT fail to parse the next message".
                push_error(
                    &mut self.output,
                    option,
                    rep::ERR_UNSUP,
                    "unsupported option",
                );
            }
        }
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: "The server replies with a number of `NBD_REP_INFO`
    /// replies ... then concludes the list of information with a final error reply or with a
    /// declaration of success".
    fn info_go(&mut self, code: u32, name: &str, requests: &[u16], go: bool) {
        if !self.export.matches(name) {
            // "`NBD_REP_ERR_UNKNOWN`: The chosen export does not exist on this server. In this
            // case, the server SHOULD NOT send `NBD_REP_INFO` replies."
            push_error(&mut self.output, code, rep::ERR_UNKNOWN, "unknown export");
            return;
        }
        let flags = self.export.transmission_flags(self.style);
        let out = &mut self.output;
        // "`NBD_INFO_EXPORT` (0) ... 16 bits, `NBD_INFO_EXPORT` 64 bits, size of the export in
        // bytes (unsigned) 16 bits, transmission flags".
        push_reply(
            out,
            code,
            rep::INFO,
            &[
                &info::EXPORT.to_be_bytes(),
                &self.export.size.to_be_bytes(),
                &flags.to_be_bytes(),
            ],
        );
        // "`NBD_INFO_BLOCK_SIZE` (3) ... 32 bits, minimum block size 32 bits, preferred block
        // size 32 bits, maximum payload size"; sent always, as the server enforces it.
        let bs = self.export.block_sizes;
        push_reply(
            out,
            code,
            rep::INFO,
            &[
                &info::BLOCK_SIZE.to_be_bytes(),
                &bs.minimum.to_be_bytes(),
                &bs.preferred.to_be_bytes(),
                &bs.maximum.to_be_bytes(),
            ],
        );
        if requests.contains(&info::NAME) {
            // "`NBD_INFO_NAME` (1) ... 16 bits, `NBD_INFO_NAME` String: name of the export".
            let name = self.export.name.as_bytes();
            push_reply(out, code, rep::INFO, &[&info::NAME.to_be_bytes(), name]);
        }
        if requests.contains(&info::DESCRIPTION) && !self.export.description.is_empty() {
            // "`NBD_INFO_DESCRIPTION` (2) ... String: description of the export".
            let desc = self.export.description.as_bytes();
            push_reply(
                out,
                code,
                rep::INFO,
                &[&info::DESCRIPTION.to_be_bytes(), desc],
            );
        }
        push_reply(out, code, rep::ACK, &[]);
        if go {
            let block_size_requested = requests.contains(&info::BLOCK_SIZE);
            self.finish(flags, block_size_requested, false);
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, code: u32, name: &str, queries: &[String], set: bool) {
        if set {
            // "Issuing this command replaces all previously-set metadata contexts (including
            // when this command fails)".
            self.contexts.clear();
            // "This option MUST NOT be requested unless structured replies have been negotiated
            // first. If a client attempts to do so, a server SHOULD send
            // `NBD_REP_ERR_INVALID`."
            if !self.style.structured() {
                push_error(
                    &mut self.output,
                    code,
                    rep::ERR_INVALID,
                    "structured replies not negotiated",
                );
                return;
            }
        }
        if !self.export.matches(name) {
            push_error(&mut self.output, code, rep::ERR_UNKNOWN, "unknown export");
            return;
        }
        let mut selected: Vec<usize> = Vec::new();
        let mut select = |i: usize| {
            if !selected.contains(&i) {
                selected.push(i);
            }
        };
        let available = &self.export.meta_contexts;
        if queries.is_empty() && !set {
            // "If zero queries are sent, then the server MUST return all the metadata contexts
            // that are available". For SET: "the server MUST select no metadata contexts".
            (0..available.len()).for_each(&mut select);
        }
        for query in queries {
            match query.split_once(':') {
                // "the empty leaf-name makes sense as a wildcard for a client query during
                // `NBD_OPT_LIST_META_CONTEXT`, but SHOULD NOT select any contexts during
                // `NBD_OPT_SET_META_CONTEXT`": `base:` and `clonebd:` list a whole namespace.
                Some((ns, "")) if !set => available
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.split_once(':').is_some_and(|(n, _)| n == ns))
                    .for_each(|(i, _)| select(i)),
                // "If a `[leaf-name]` requested by the client is not recognized, the server
                // MUST ignore it"; "the server MUST ignore query strings belonging to an
                // unknown namespace".
                _ => {
                    if let Some(i) = available.iter().position(|c| c == query) {
                        select(i);
                    }
                }
            }
        }
        selected.sort_unstable();
        for i in selected {
            let context_name = &self.export.meta_contexts[i];
            // "The metadata context ID in these replies is reserved and SHOULD be set to zero"
            // for LIST; SET gives "each with a unique metadata context ID".
            let id = if set { i as u32 + 1 } else { 0 };
            push_reply(
                &mut self.output,
                code,
                rep::META_CONTEXT,
                &[&id.to_be_bytes(), context_name.as_bytes()],
            );
            if set {
                self.contexts.push(MetaContext {
                    id,
                    name: context_name.clone(),
                });
            }
        }
        push_reply(&mut self.output, code, rep::ACK, &[]);
    }

    fn finish(
        &mut self,
        transmission_flags: u16,
        block_size_requested: bool,
        via_export_name: bool,
    ) {
        self.status = Status::Transmission(Negotiated {
            export_name: self.export.name.clone(),
            style: self.style,
            transmission_flags,
            meta_contexts: std::mem::take(&mut self.contexts),
            client_flags: self.client_flags,
            block_size_requested,
            via_export_name,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo::new(
            "disk",
            "a test disk",
            1 << 20,
            BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: u32::MAX,
            },
            BackendFlags {
                flush: true,
                fua: true,
                trim: true,
                ..Default::default()
            },
            vec!["base:allocation".into(), "clonebd:hydrated".into()],
        )
        .unwrap()
    }

    fn started(flags: u32) -> Handshake {
        let mut hs = Handshake::new(export());
        hs.consume_output(hs.output().len());
        hs.feed(&flags.to_be_bytes()).unwrap();
        hs
    }

    fn send(hs: &mut Handshake, option: &ClientOption) -> Vec<u8> {
        let mut bytes = Vec::new();
        option.encode(&mut bytes);
        assert_eq!(hs.feed(&bytes).unwrap(), bytes.len());
        let out = hs.output().to_vec();
        hs.consume_output(out.len());
        out
    }

    /// Split option replies into (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(
                u64::from_be_bytes(out[..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(out[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            v.push((option, ty, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let hs = Handshake::new(export());
        let out = hs.output();
        assert_eq!(out.len(), 18);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([out[16], out[17]]), 3);
    }

    #[test]
    fn unknown_client_flags_fail() {
        let mut hs = Handshake::new(export());
        assert_eq!(
            hs.feed(&4u32.to_be_bytes()),
            Err(HandshakeError::BadClientFlags(4))
        );
    }

    #[test]
    fn unknown_option_gets_err_unsup_and_handshake_continues() {
        let mut hs = started(1);
        let out = send(
            &mut hs,
            &ClientOption::Unknown {
                option: 42,
                data: vec![1, 2, 3],
            },
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        let out = send(
            &mut hs,
            &ClientOption::Go {
                name: String::new(),
                requests: vec![],
            },
        );
        assert_eq!(replies(&out).last().unwrap().1, rep::ACK);
        assert!(matches!(hs.status(), Status::Transmission(_)));
    }

    #[test]
    fn long_unknown_option_is_drained_then_answered() {
        let mut hs = started(1);
        let len = MAX_OPTION_LEN + 10;
        let out = send(
            &mut hs,
            &ClientOption::Unknown {
                option: 99,
                data: vec![7; len as usize],
            },
        );
        assert_eq!(
            replies(&out),
            vec![(99, rep::ERR_UNSUP, b"option data too large".to_vec())]
        );
        assert_eq!(hs.wanted(), 16);
    }

    #[test]
    fn huge_option_fails_without_buffering() {
        let mut hs = started(1);
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&77u32.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            hs.feed(&header),
            Err(HandshakeError::OptionTooLarge {
                option: 77,
                len: u32::MAX
            })
        );
    }

    #[test]
    fn go_reports_export_and_block_size_and_stops_consuming() {
        let mut hs = started(1);
        let mut bytes = Vec::new();
        ClientOption::Go {
            name: "disk".into(),
            requests: vec![info::BLOCK_SIZE, info::NAME],
        }
        .encode(&mut bytes);
        bytes.extend_from_slice(b"trailing");
        assert_eq!(hs.feed(&bytes).unwrap(), bytes.len() - 8);
        let r = replies(hs.output());
        assert_eq!(r.len(), 4);
        assert_eq!(&r[0].2[..2], &info::EXPORT.to_be_bytes());
        assert_eq!(
            u64::from_be_bytes(r[0].2[2..10].try_into().unwrap()),
            1 << 20
        );
        assert_eq!(&r[1].2[..2], &info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(u32::from_be_bytes(r[1].2[2..6].try_into().unwrap()), 512);
        assert_eq!(u32::from_be_bytes(r[1].2[6..10].try_into().unwrap()), 4096);
        assert_eq!(
            u32::from_be_bytes(r[1].2[10..14].try_into().unwrap()),
            MAX_PAYLOAD
        );
        assert_eq!(r[2].2, [&info::NAME.to_be_bytes()[..], b"disk"].concat());
        assert_eq!(r[3].1, rep::ACK);
        let Status::Transmission(n) = hs.status() else {
            panic!("not finished")
        };
        assert!(n.block_size_requested);
        assert_eq!(n.style, HeaderStyle::Simple);
    }

    #[test]
    fn unknown_export_in_go_is_err_unknown() {
        let mut hs = started(1);
        let out = send(
            &mut hs,
            &ClientOption::Go {
                name: "nope".into(),
                requests: vec![],
            },
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
        assert_eq!(hs.status(), &Status::Negotiating);
    }

    #[test]
    fn export_name_honours_no_zeroes() {
        let mut hs = started(3);
        let out = send(&mut hs, &ClientOption::ExportName(String::new()));
        assert_eq!(out.len(), 10);
        let mut hs = started(1);
        let out = send(&mut hs, &ClientOption::ExportName("disk".into()));
        assert_eq!(out.len(), 134);
        assert!(matches!(hs.status(), Status::Transmission(n) if n.via_export_name));
    }

    #[test]
    fn export_name_unknown_fails() {
        let mut hs = started(1);
        let mut bytes = Vec::new();
        ClientOption::ExportName("nope".into()).encode(&mut bytes);
        assert_eq!(hs.feed(&bytes), Err(HandshakeError::UnknownExport));
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let mut hs = started(1);
        let q = ClientOption::SetMetaContext {
            name: String::new(),
            queries: vec!["base:allocation".into()],
        };
        assert_eq!(replies(&send(&mut hs, &q))[0].1, rep::ERR_INVALID);
        send(&mut hs, &ClientOption::StructuredReply);
        let r = replies(&send(&mut hs, &q));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, rep::META_CONTEXT);
        assert_eq!(
            r[0].2,
            [&1u32.to_be_bytes()[..], b"base:allocation"].concat()
        );
    }

    #[test]
    fn list_meta_context_namespace_wildcard_lists_ours() {
        let mut hs = started(1);
        send(&mut hs, &ClientOption::ExtendedHeaders);
        let q = ClientOption::ListMetaContext {
            name: "disk".into(),
            queries: vec!["clonebd:".into(), "clonebd:".into(), "other:x".into()],
        };
        let r = replies(&send(&mut hs, &q));
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0].2,
            [&0u32.to_be_bytes()[..], b"clonebd:hydrated"].concat()
        );
        assert_eq!(r[1].1, rep::ACK);
    }

    #[test]
    fn set_meta_context_selects_both_with_distinct_ids() {
        let mut hs = started(1);
        send(&mut hs, &ClientOption::StructuredReply);
        let q = ClientOption::SetMetaContext {
            name: String::new(),
            queries: vec![
                "clonebd:hydrated".into(),
                "base:allocation".into(),
                "base:".into(),
            ],
        };
        assert_eq!(replies(&send(&mut hs, &q)).len(), 3);
        send(
            &mut hs,
            &ClientOption::Go {
                name: String::new(),
                requests: vec![],
            },
        );
        let Status::Transmission(n) = hs.status() else {
            panic!("not finished")
        };
        assert_eq!(
            n.meta_contexts,
            vec![
                MetaContext {
                    id: 1,
                    name: "base:allocation".into()
                },
                MetaContext {
                    id: 2,
                    name: "clonebd:hydrated".into()
                }
            ]
        );
        assert_eq!(n.style, HeaderStyle::Structured);
        assert_ne!(n.transmission_flags & tf::SEND_DF, 0);
    }

    #[test]
    fn structured_reply_after_extended_headers_is_refused() {
        let mut hs = started(1);
        send(&mut hs, &ClientOption::ExtendedHeaders);
        let r = replies(&send(&mut hs, &ClientOption::StructuredReply));
        assert_eq!(r[0].1, rep::ERR_EXT_HEADER_REQD);
    }

    #[test]
    fn list_with_data_is_invalid() {
        let mut hs = started(1);
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&opt::LIST.to_be_bytes());
        bytes.extend_from_slice(&1u32.to_be_bytes());
        bytes.push(0);
        hs.feed(&bytes).unwrap();
        assert_eq!(replies(hs.output())[0].1, rep::ERR_INVALID);
    }

    #[test]
    fn abort_acks_and_stops() {
        let mut hs = started(1);
        let r = replies(&send(&mut hs, &ClientOption::Abort));
        assert_eq!(r[0].1, rep::ACK);
        assert_eq!(hs.status(), &Status::Aborted);
        assert_eq!(hs.wanted(), 0);
    }

    fn started_tls(flags: u32) -> Handshake {
        let mut hs = Handshake::with_tls(export());
        hs.consume_output(hs.output().len());
        hs.feed(&flags.to_be_bytes()).unwrap();
        hs
    }

    #[test]
    fn forced_tls_refuses_options_before_starttls() {
        let mut hs = started_tls(1);
        let go = ClientOption::Go {
            name: String::new(),
            requests: vec![],
        };
        for o in [
            ClientOption::List,
            ClientOption::StructuredReply,
            ClientOption::Info {
                name: String::new(),
                requests: vec![],
            },
            go.clone(),
            ClientOption::Unknown {
                option: 42,
                data: vec![],
            },
        ] {
            let r = replies(&send(&mut hs, &o));
            assert_eq!(
                r,
                vec![(o.option(), rep::ERR_TLS_REQD, b"TLS required".to_vec())]
            );
            assert_eq!(hs.status(), &Status::Negotiating);
        }
        // Malformed option data too: NBD_OPT_GO whose name length overruns its data.
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&opt::GO.to_be_bytes());
        bytes.extend_from_slice(&4u32.to_be_bytes());
        bytes.extend_from_slice(&99u32.to_be_bytes());
        hs.feed(&bytes).unwrap();
        assert_eq!(replies(hs.output())[0].1, rep::ERR_TLS_REQD);
        hs.consume_output(hs.output().len());
        // Long option data is drained and refused the same way.
        let r = replies(&send(
            &mut hs,
            &ClientOption::Unknown {
                option: 77,
                data: vec![0; MAX_OPTION_LEN as usize + 1],
            },
        ));
        assert_eq!(r[0].1, rep::ERR_TLS_REQD);
        assert!(!hs.tls_active());
    }

    #[test]
    fn forced_tls_export_name_before_tls_ends_the_session() {
        let mut hs = started_tls(1);
        let mut bytes = Vec::new();
        ClientOption::ExportName("disk".into()).encode(&mut bytes);
        assert_eq!(hs.feed(&bytes), Err(HandshakeError::TlsRequired));
        assert!(hs.output().is_empty());
    }

    #[test]
    fn forced_tls_abort_is_still_acked() {
        let mut hs = started_tls(1);
        let r = replies(&send(&mut hs, &ClientOption::Abort));
        assert_eq!(r[0].1, rep::ACK);
        assert_eq!(hs.status(), &Status::Aborted);
    }

    #[test]
    fn starttls_acks_stops_then_haggling_goes_on_over_tls() {
        let mut hs = started_tls(1);
        let mut bytes = Vec::new();
        ClientOption::StartTls.encode(&mut bytes);
        // What follows the option is the client's TLS handshake, not the machine's.
        bytes.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(hs.feed(&bytes).unwrap(), bytes.len() - 3);
        assert_eq!(
            replies(hs.output()),
            vec![(opt::STARTTLS, rep::ACK, vec![])]
        );
        hs.consume_output(hs.output().len());
        assert_eq!(hs.status(), &Status::StartTls);
        assert_eq!(hs.wanted(), 0);
        hs.tls_started();
        assert!(hs.tls_active());
        assert_eq!(hs.wanted(), 16);
        let r = replies(&send(&mut hs, &ClientOption::StartTls));
        assert_eq!(r[0].1, rep::ERR_INVALID);
        let r = replies(&send(&mut hs, &ClientOption::StructuredReply));
        assert_eq!(r[0].1, rep::ACK);
        let r = replies(&send(
            &mut hs,
            &ClientOption::Go {
                name: "disk".into(),
                requests: vec![],
            },
        ));
        assert_eq!(r.last().unwrap().1, rep::ACK);
        let Status::Transmission(n) = hs.status() else {
            panic!("not finished")
        };
        assert_eq!(n.style, HeaderStyle::Structured);
    }

    #[test]
    fn notls_server_answers_starttls_unsup() {
        let mut hs = started(1);
        let r = replies(&send(&mut hs, &ClientOption::StartTls));
        assert_eq!(r[0].1, rep::ERR_UNSUP);
        hs.tls_started();
        assert!(!hs.tls_active());
    }

    #[test]
    fn bad_block_sizes_are_refused() {
        let e = |min, pref| {
            ExportInfo::new(
                "",
                "",
                0,
                BlockSizes {
                    minimum: min,
                    preferred: pref,
                    maximum: 0,
                },
                BackendFlags::default(),
                vec![],
            )
        };
        assert_eq!(e(3, 4096), Err(ExportError::BadMinimum(3)));
        assert!(matches!(
            e(4096, 512),
            Err(ExportError::BadPreferred { .. })
        ));
        let ok = e(512, 1 << 30).unwrap();
        assert_eq!(ok.block_sizes.preferred, MAX_PAYLOAD);
        assert_eq!(ok.block_sizes.maximum, MAX_PAYLOAD);
    }
}
