//! The transmission phase on the wire: request decoding and reply encoding, without I/O.
//!
//! Decoding is in two steps. [`RequestHeader::parse`] reads a compact (28-byte) or extended
//! (32-byte) header and fails only on a bad magic. [`TransmissionParams::check`] then judges it
//! against the export and what was negotiated, and says what to do with the bytes that follow:
//! read a write payload (never more than the payload cap), skip the payload of a rejected
//! request and answer with an error, or close the connection when the stream cannot be kept in
//! sync. [`RequestDecoder`] puts both steps together over a byte buffer, in the manner of a
//! framed codec: it either asks for more bytes (never more than one header plus the payload
//! cap) or returns one frame and exactly how many bytes it spans.
//!
//! Replies are built as a fixed-size [`ReplyHeader`] (the header plus any fixed prefix of the
//! payload) followed by a body the caller already holds (read data, an error message), so a
//! reply goes out in one gathered write without copying the data. [`decode_reply`] is the
//! client's side, used by tests and fuzzing.

use crate::backend::{Extent, NbdError};
use crate::proto::{
    COMPACT_REQUEST_LEN, Command, EXTENDED_REPLY_LEN, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_LEN,
    EXTENDED_REQUEST_MAGIC, HeaderStyle, MAX_EXTENTS, REQUEST_MAGIC, SIMPLE_REPLY_LEN,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_LEN, STRUCTURED_REPLY_MAGIC, command_flags as cf,
    reply_flags, reply_type, transmission_flags as tf,
};

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

/// A request header as sent, before any check against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: Command,
    /// The client's opaque cookie, echoed in every reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length: the effect length, which for a write (or with `NBD_CMD_FLAG_PAYLOAD_LEN`) is
    /// also the payload length. 32 bits in compact headers, 64 in extended ones.
    pub length: u64,
}

/// A fatal decoding error: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header does not start with the request magic of the negotiated style.
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    /// The header slice does not have the length of the negotiated style.
    #[error("request header of {0} bytes")]
    HeaderLength(usize),
    /// A payload larger than the cap follows the header: it cannot be read into memory and
    /// skipping it is not worth the risk. The server may answer `request` with `NBD_EINVAL`
    /// before it closes the connection.
    #[error("request payload of {} bytes exceeds the cap", .0.length)]
    PayloadTooLarge(RequestHeader),
}

impl RequestHeader {
    /// Parse a header of the given style; `bytes` must be exactly one header long.
    pub fn parse(style: HeaderStyle, bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != style.request_len() {
            return Err(DecodeError::HeaderLength(bytes.len()));
        }
        let magic = be32(bytes, 0);
        match style {
            // "C: 32 bits, 0x25609513, magic (`NBD_REQUEST_MAGIC`) C: 16 bits, command flags
            // C: 16 bits, type C: 64 bits, cookie C: 64 bits, offset (unsigned) C: 32 bits,
            // length (unsigned)".
            HeaderStyle::Simple | HeaderStyle::Structured if magic == REQUEST_MAGIC => Ok(Self {
                flags: be16(bytes, 4),
                command: Command::from_wire(be16(bytes, 6)),
                cookie: be64(bytes, 8),
                offset: be64(bytes, 16),
                length: u64::from(be32(bytes, 24)),
            }),
            // Extended headers: "C: 32 bits, 0x21e41c71, magic (`NBD_EXTENDED_REQUEST_MAGIC`)
            // C: 16 bits, command flags C: 16 bits, type C: 64 bits, cookie C: 64 bits, offset
            // (unsigned) C: 64 bits, length (unsigned)".
            HeaderStyle::Extended if magic == EXTENDED_REQUEST_MAGIC => Ok(Self {
                flags: be16(bytes, 4),
                command: Command::from_wire(be16(bytes, 6)),
                cookie: be64(bytes, 8),
                offset: be64(bytes, 16),
                length: be64(bytes, 24),
            }),
            _ => Err(DecodeError::BadMagic(magic)),
        }
    }

    /// Encode the header as a client sends it; returns the number of bytes written into `out`
    /// (28 or 32). A compact header carries only the low 32 bits of `length`.
    pub fn encode(&self, style: HeaderStyle, out: &mut [u8; EXTENDED_REQUEST_LEN]) -> usize {
        let extended = style == HeaderStyle::Extended;
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        out[0..4].copy_from_slice(&magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        if extended {
            out[24..32].copy_from_slice(&self.length.to_be_bytes());
            EXTENDED_REQUEST_LEN
        } else {
            out[24..28].copy_from_slice(&(self.length as u32).to_be_bytes());
            COMPACT_REQUEST_LEN
        }
    }

    /// Payload bytes that follow this header on the wire, whatever the server thinks of the
    /// request: "*length* bytes of data if the request is of type `NBD_CMD_WRITE`", and with
    /// extended headers also for any command carrying `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub fn wire_payload(&self, style: HeaderStyle) -> u64 {
        let flagged = style == HeaderStyle::Extended && self.flags & cf::PAYLOAD_LEN != 0;
        if self.command == Command::Write || flagged {
            self.length
        } else {
            0
        }
    }
}

/// What the server does with a checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Execute it. For a write, `length` payload bytes follow and must be read.
    Execute,
    /// Read and drop `skip` payload bytes, then answer with `error`; the stream stays in sync.
    Reject {
        /// The error to answer with.
        error: NbdError,
        /// Payload bytes to read and drop first.
        skip: u32,
    },
    /// `NBD_CMD_DISC`: finish the requests in flight, then close. No reply.
    Disconnect,
}

/// What a connection negotiated, which every request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionParams {
    /// Header style.
    pub style: HeaderStyle,
    /// Export size in bytes.
    pub size: u64,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub min_block: u32,
    /// Maximum payload size (at most 32 MiB).
    pub max_payload: u32,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Whether at least one metadata context was selected.
    pub has_meta_contexts: bool,
}

impl TransmissionParams {
    fn advertised(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }

    /// Command flags valid for `command` on this connection.
    ///
    /// "`NBD_CMD_FLAG_FUA`; This flag is valid for all commands, provided `NBD_FLAG_SEND_FUA`
    /// has been negotiated, in which case the server MUST accept all commands with this bit
    /// set"; the others are valid only for the commands the protocol names, and only when the
    /// matching transmission flag was sent.
    fn allowed_flags(&self, command: Command) -> u16 {
        let mut allowed = if self.advertised(tf::SEND_FUA) {
            cf::FUA
        } else {
            0
        };
        match command {
            Command::Read if self.advertised(tf::SEND_DF) => allowed |= cf::DF,
            Command::Write if self.style == HeaderStyle::Extended => allowed |= cf::PAYLOAD_LEN,
            Command::WriteZeroes => {
                allowed |= cf::NO_HOLE;
                if self.advertised(tf::SEND_FAST_ZERO) {
                    allowed |= cf::FAST_ZERO;
                }
            }
            Command::BlockStatus => allowed |= cf::REQ_ONE,
            _ => {}
        }
        allowed
    }

    /// Judge a request header against the export and the negotiated options.
    pub fn check(&self, h: &RequestHeader) -> Result<Disposition, DecodeError> {
        let payload = h.wire_payload(self.style);
        if payload > u64::from(self.max_payload) {
            // "either the server or the client MAY initiate a hard disconnect if a payload
            // length of either a request or a reply would be large enough to be deemed a denial
            // of service attack".
            return Err(DecodeError::PayloadTooLarge(*h));
        }
        // Fits in u32: bounded by max_payload just above.
        let skip = payload as u32;
        let reject = |error| Ok(Disposition::Reject { error, skip });
        if h.command == Command::Disc {
            // "The values of the length and offset fields in a disconnect request MUST be
            // zero"; the server closes either way.
            return Ok(Disposition::Disconnect);
        }
        // "The server SHOULD return `NBD_EINVAL` if it receives an unknown command."
        let supported = match h.command {
            Command::Read | Command::Write => true,
            Command::Flush => self.advertised(tf::SEND_FLUSH),
            Command::Trim => self.advertised(tf::SEND_TRIM),
            Command::WriteZeroes => self.advertised(tf::SEND_WRITE_ZEROES),
            Command::Cache => self.advertised(tf::SEND_CACHE),
            // "Servers SHOULD reply with `NBD_EINVAL` to clients sending `NBD_CMD_BLOCK_STATUS`
            // without selecting at least one metadata context."
            Command::BlockStatus => self.has_meta_contexts && self.style.structured(),
            Command::Disc | Command::Unknown(_) => false,
        };
        if !supported {
            return reject(NbdError::Invalid);
        }
        // A payload on anything but a write was never advertised
        // (`NBD_FLAG_BLOCK_STATUS_PAYLOAD` is not sent); it is skipped and refused.
        if h.command != Command::Write && payload != 0 {
            return reject(NbdError::Invalid);
        }
        // "The server SHOULD return `NBD_EINVAL` if it receives an unknown command flag. It
        // also SHOULD return `NBD_EINVAL` if it receives a request with a flag not explicitly
        // documented as applicable to the given request."
        if h.flags & !self.allowed_flags(h.command) != 0 {
            return reject(NbdError::Invalid);
        }
        if h.command == Command::Flush {
            // "For a flush request, *length* and *offset* are reserved, and MUST be set to
            // all-zero."
            return if h.offset == 0 && h.length == 0 {
                Ok(Disposition::Execute)
            } else {
                reject(NbdError::Invalid)
            };
        }
        // "It SHOULD return `NBD_EPERM` if it receives a write or trim request on a read-only
        // export."
        if h.command.is_write() && self.advertised(tf::READ_ONLY) {
            return reject(NbdError::Permission);
        }
        // "The client SHOULD NOT request a ... length of 0; the behavior of a server on such a
        // request is unspecified although the server SHOULD NOT disconnect."
        if h.length == 0 {
            return reject(NbdError::Invalid);
        }
        // "The server SHOULD return `NBD_ENOSPC` if it receives a write request including one
        // or more sectors beyond the size of the device. ... It SHOULD return `NBD_EINVAL` if
        // it receives a read or trim request including one or more sectors beyond the size of
        // the device". Overflow of offset + length counts as beyond.
        let in_range = h
            .offset
            .checked_add(h.length)
            .is_some_and(|end| end <= self.size);
        if !in_range {
            return match h.command {
                Command::Write | Command::WriteZeroes => reject(NbdError::NoSpace),
                _ => reject(NbdError::Invalid),
            };
        }
        // "the client MUST ensure that *offset* and *length* are integer multiples of any
        // advertised minimum block size ... The server SHOULD report an `NBD_EINVAL` error if
        // the client's request is not aligned". A block status length is only a hint. A trim
        // is advisory, and QEMU's block layer passes the unaligned head and tail of a discard
        // down to its NBD driver: like qemu-nbd, take it, and let the backend ignore what
        // does not cover whole blocks.
        let min = u64::from(self.min_block);
        let length_aligned = h.command == Command::BlockStatus || h.length.is_multiple_of(min);
        let aligned = h.offset.is_multiple_of(min) && length_aligned;
        if !aligned && h.command != Command::Trim {
            return reject(NbdError::Invalid);
        }
        // "any client request with a length larger than the maximum payload size will fail";
        // with structured replies the server "is also permitted to reject large read requests
        // up front with `NBD_EOVERFLOW`".
        if h.command == Command::Read && h.length > u64::from(self.max_payload) {
            let error = if self.style.structured() {
                NbdError::Overflow
            } else {
                NbdError::Invalid
            };
            return reject(error);
        }
        Ok(Disposition::Execute)
    }
}

/// One decoded frame, borrowing its payload from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A request to execute, with its payload (empty unless a write).
    Request(RequestHeader, &'a [u8]),
    /// A request to answer with `error`; its payload, if any, was consumed.
    Reject(RequestHeader, NbdError),
    /// `NBD_CMD_DISC`.
    Disconnect(RequestHeader),
}

/// The outcome of one [`RequestDecoder::decode`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// The buffer holds less than a frame; a frame needs `total` bytes from its start. Never
    /// more than one extended header plus the payload cap.
    Need(usize),
    /// A frame, spanning exactly `consumed` bytes from the start of the buffer.
    Frame {
        /// The frame.
        frame: Frame<'a>,
        /// Bytes it spans: its header plus the declared payload.
        consumed: usize,
    },
}

/// A framed decoder over a byte buffer for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDecoder {
    params: TransmissionParams,
}

impl RequestDecoder {
    /// A decoder for a connection with these parameters.
    pub fn new(params: TransmissionParams) -> Self {
        Self { params }
    }

    /// The parameters requests are checked against.
    pub fn params(&self) -> &TransmissionParams {
        &self.params
    }

    /// Parse and judge one header; `bytes` must be exactly one header long. The payload its
    /// header declares ([`RequestHeader::wire_payload`]) follows it on the wire; it is within
    /// the payload cap unless this fails with [`DecodeError::PayloadTooLarge`].
    pub fn header(&self, bytes: &[u8]) -> Result<(RequestHeader, Disposition), DecodeError> {
        let header = RequestHeader::parse(self.params.style, bytes)?;
        let disposition = self.params.check(&header)?;
        Ok((header, disposition))
    }

    /// Decode the frame at the start of `buf`.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Progress<'a>, DecodeError> {
        let header_len = self.params.style.request_len();
        if buf.len() < header_len {
            return Ok(Progress::Need(header_len));
        }
        let (header, disposition) = self.header(&buf[..header_len])?;
        // `check` refused every payload above the cap, so this fits in usize.
        let payload = header.wire_payload(self.params.style) as usize;
        let total = header_len + payload;
        if buf.len() < total {
            return Ok(Progress::Need(total));
        }
        let frame = match disposition {
            Disposition::Execute => Frame::Request(header, &buf[header_len..total]),
            Disposition::Reject { error, .. } => Frame::Reject(header, error),
            Disposition::Disconnect => Frame::Disconnect(header),
        };
        Ok(Progress::Frame {
            frame,
            consumed: total,
        })
    }
}

/// A reply header, with any fixed-size prefix of its payload, ready to send.
///
/// At most 40 bytes: an extended chunk header (32) plus the 8-byte offset of
/// `NBD_REPLY_TYPE_OFFSET_DATA` or the 8-byte prefix of `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    bytes: [u8; 40],
    len: u8,
}

impl std::fmt::Debug for ReplyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReplyHeader")
            .field(&self.as_bytes())
            .finish()
    }
}

impl ReplyHeader {
    fn empty() -> Self {
        Self {
            bytes: [0; 40],
            len: 0,
        }
    }

    fn put(&mut self, data: &[u8]) {
        let at = usize::from(self.len);
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.len += data.len() as u8;
    }

    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A simple reply: "S: 32 bits, 0x67446698, magic (`NBD_SIMPLE_REPLY_MAGIC`) S: 32 bits,
    /// error (MAY be zero) S: 64 bits, cookie".
    pub fn simple(cookie: u64, error: u32) -> Self {
        let mut h = Self::empty();
        h.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h.put(&error.to_be_bytes());
        h.put(&cookie.to_be_bytes());
        h
    }

    /// A structured or extended chunk header whose payload is `payload_len` bytes.
    ///
    /// Structured: "S: 32 bits, 0x668e33ef, magic (`NBD_STRUCTURED_REPLY_MAGIC`) S: 16 bits,
    /// flags S: 16 bits, type S: 64 bits, cookie S: 32 bits, length of payload (unsigned)".
    /// Extended: "S: 32 bits, 0x6e8a278c, magic (`NBD_EXTENDED_REPLY_MAGIC`) S: 16 bits, flags
    /// S: 16 bits, type S: 64 bits, cookie S: 64 bits, offset (unsigned) S: 64 bits, length of
    /// payload (unsigned)", where the offset echoes the request's.
    ///
    /// With [`HeaderStyle::Simple`] there are no chunks; the structured form is used, and the
    /// caller must not do that.
    pub fn chunk(
        style: HeaderStyle,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        payload_len: u64,
    ) -> Self {
        let mut h = Self::empty();
        if style == HeaderStyle::Extended {
            h.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            h.put(&flags.to_be_bytes());
            h.put(&ty.to_be_bytes());
            h.put(&cookie.to_be_bytes());
            h.put(&offset.to_be_bytes());
            h.put(&payload_len.to_be_bytes());
        } else {
            h.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h.put(&flags.to_be_bytes());
            h.put(&ty.to_be_bytes());
            h.put(&cookie.to_be_bytes());
            h.put(&(payload_len as u32).to_be_bytes());
        }
        h
    }

    /// Success without data: a simple reply with error zero, or with extended headers (where
    /// simple replies do not exist) "`NBD_REPLY_TYPE_NONE` ... This chunk type MUST always be
    /// used with the `NBD_REPLY_FLAG_DONE` bit set".
    pub fn done(style: HeaderStyle, cookie: u64, offset: u64) -> Self {
        match style {
            HeaderStyle::Extended => Self::chunk(
                style,
                reply_flags::DONE,
                reply_type::NONE,
                cookie,
                offset,
                0,
            ),
            _ => Self::simple(cookie, 0),
        }
    }

    /// The header of a successful read of `data_len` bytes at `offset`; the data follows.
    ///
    /// Simple: the simple reply, then "*length* bytes of data". Structured or extended: one
    /// final `NBD_REPLY_TYPE_OFFSET_DATA` chunk, "64 bits: offset (unsigned) *length - 8*
    /// bytes: data", which also satisfies `NBD_CMD_FLAG_DF`.
    pub fn read_data(style: HeaderStyle, cookie: u64, offset: u64, data_len: u64) -> Self {
        if style == HeaderStyle::Simple {
            return Self::simple(cookie, 0);
        }
        let flags = reply_flags::DONE;
        let mut h = Self::chunk(
            style,
            flags,
            reply_type::OFFSET_DATA,
            cookie,
            offset,
            data_len + 8,
        );
        h.put(&offset.to_be_bytes());
        h
    }

    /// The header of an error reply; `message` (at most 4096 bytes) follows it unless the
    /// style is simple.
    ///
    /// With structured replies: "`NBD_REPLY_TYPE_ERROR` ... 32 bits: error (MUST be nonzero)
    /// 16 bits: message length (no more than header *length* - 6) *message length* bytes:
    /// optional string", sent as the final chunk. Simple: "S: 32 bits, error".
    pub fn error(style: HeaderStyle, cookie: u64, offset: u64, error: u32, message: &str) -> Self {
        if style == HeaderStyle::Simple {
            return Self::simple(cookie, error);
        }
        let msg_len = message.len().min(crate::proto::MAX_STRING_LEN) as u16;
        let ty = reply_type::ERROR;
        let mut h = Self::chunk(
            style,
            reply_flags::DONE,
            ty,
            cookie,
            offset,
            6 + u64::from(msg_len),
        );
        h.put(&error.to_be_bytes());
        h.put(&msg_len.to_be_bytes());
        h
    }
}

/// Truncate an error message to the length [`ReplyHeader::error`] announces.
pub fn error_message(message: &str) -> &str {
    let mut end = message.len().min(crate::proto::MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// The request a reply chunk answers: the style of its header, its cookie and its offset
/// (echoed by extended headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Header style of the connection.
    pub style: HeaderStyle,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset.
    pub offset: u64,
}

/// Append an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: "32 bits: error (MUST be nonzero) 16 bits:
/// message length (no more than header *length* - 14) *message length* bytes: optional string
/// ... 64 bits: offset (unsigned)".
pub fn encode_error_offset(
    to: ReplyTo,
    done: bool,
    error: u32,
    message: &str,
    error_offset: u64,
    out: &mut Vec<u8>,
) {
    let message = error_message(message);
    let flags = if done { reply_flags::DONE } else { 0 };
    let len = 14 + message.len() as u64;
    let ReplyTo {
        style,
        cookie,
        offset,
    } = to;
    let h = ReplyHeader::chunk(style, flags, reply_type::ERROR_OFFSET, cookie, offset, len);
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(&error_offset.to_be_bytes());
}

/// Append one block status chunk for `context_id`, with at most [`MAX_EXTENTS`] extents.
///
/// Structured: "`NBD_REPLY_TYPE_BLOCK_STATUS` (5) ... 32 bits, metadata context ID ... 32
/// bits, length of the extent to which the status below applies (unsigned, MUST be nonzero) 32
/// bits, status flags". Extended headers require `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (6): 32 bits
/// context ID, 32 bits descriptor count, then 64-bit lengths and 64-bit status flags.
///
/// Extents must be nonzero; in compact form a length above `u32::MAX` is cut to `u32::MAX`
/// rounded down to `align`, and the list ends there (the client asks again for the rest).
/// Returns the number of bytes the chunk's extents describe.
pub fn encode_block_status(
    to: ReplyTo,
    context_id: u32,
    extents: &[Extent],
    done: bool,
    align: u32,
    out: &mut Vec<u8>,
) -> u64 {
    let ReplyTo {
        style,
        cookie,
        offset: request_offset,
    } = to;
    let extents = &extents[..extents.len().min(MAX_EXTENTS)];
    let flags = if done { reply_flags::DONE } else { 0 };
    let mut covered = 0u64;
    if style == HeaderStyle::Extended {
        let len = 8 + 16 * extents.len() as u64;
        let ty = reply_type::BLOCK_STATUS_EXT;
        out.extend_from_slice(
            ReplyHeader::chunk(style, flags, ty, cookie, request_offset, len).as_bytes(),
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            out.extend_from_slice(&e.length.to_be_bytes());
            out.extend_from_slice(&u64::from(e.flags).to_be_bytes());
            covered = covered.saturating_add(e.length);
        }
        return covered;
    }
    let cap = u64::from(u32::MAX) / u64::from(align.max(1)) * u64::from(align.max(1));
    let mut count = 0;
    for e in extents {
        count += 1;
        if e.length > cap {
            break;
        }
    }
    let len = 4 + 8 * count as u64;
    let header = ReplyHeader::chunk(style, flags, reply_type::BLOCK_STATUS, cookie, 0, len);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&context_id.to_be_bytes());
    for e in &extents[..count] {
        let length = e.length.min(cap);
        out.extend_from_slice(&(length as u32).to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        covered += length;
    }
    covered
}

/// The payload of a reply chunk, as a client decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Offset of the data.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Its size.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`; extents as (length, flags).
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// Extents as (length, status flags).
        extents: Vec<(u64, u64)>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// Error value.
        error: u32,
        /// Message.
        message: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// Error value.
        error: u32,
        /// Message.
        message: Vec<u8>,
        /// Offset of the error.
        offset: u64,
    },
    /// Any other chunk type, raw.
    Other {
        /// Chunk type.
        ty: u16,
        /// Payload.
        data: Vec<u8>,
    },
}

/// A reply as a client decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply (any read data follows it and is not part of this value).
    Simple {
        /// Cookie.
        cookie: u64,
        /// Error value (zero for success).
        error: u32,
    },
    /// A structured or extended chunk.
    Chunk {
        /// Reply flags.
        flags: u16,
        /// Cookie.
        cookie: u64,
        /// The header's offset (extended headers only; zero otherwise).
        offset: u64,
        /// The decoded payload.
        body: ChunkBody,
    },
}

/// Why a reply cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// Unknown magic.
    #[error("bad reply magic {0:#x}")]
    BadMagic(u32),
    /// A payload inconsistent with its type, or longer than `max_payload`.
    #[error("malformed reply chunk of type {0}")]
    Malformed(u16),
}

fn decode_body(ty: u16, p: &[u8], extended: bool) -> Result<ChunkBody, ReplyError> {
    let bad = ReplyError::Malformed(ty);
    let body = match ty {
        reply_type::NONE if p.is_empty() => ChunkBody::None,
        reply_type::OFFSET_DATA if p.len() > 8 => ChunkBody::OffsetData {
            offset: be64(p, 0),
            data: p[8..].to_vec(),
        },
        reply_type::OFFSET_HOLE if p.len() == 12 => ChunkBody::OffsetHole {
            offset: be64(p, 0),
            length: be32(p, 8),
        },
        reply_type::BLOCK_STATUS
            if !extended && p.len() >= 12 && (p.len() - 4).is_multiple_of(8) =>
        {
            let extents = p[4..]
                .chunks_exact(8)
                .map(|e| (u64::from(be32(e, 0)), u64::from(be32(e, 4))))
                .collect();
            ChunkBody::BlockStatus {
                context_id: be32(p, 0),
                extents,
            }
        }
        reply_type::BLOCK_STATUS_EXT
            if extended && p.len() >= 24 && (p.len() - 8).is_multiple_of(16) =>
        {
            if be32(p, 4) as usize != (p.len() - 8) / 16 {
                return Err(bad);
            }
            let extents = p[8..]
                .chunks_exact(16)
                .map(|e| (be64(e, 0), be64(e, 8)))
                .collect();
            ChunkBody::BlockStatus {
                context_id: be32(p, 0),
                extents,
            }
        }
        reply_type::ERROR | reply_type::ERROR_OFFSET if p.len() >= 6 => {
            let msg_len = usize::from(be16(p, 4));
            let tail = if ty == reply_type::ERROR { 0 } else { 8 };
            if 6 + msg_len + tail != p.len() {
                return Err(bad);
            }
            let error = be32(p, 0);
            let message = p[6..6 + msg_len].to_vec();
            if ty == reply_type::ERROR {
                ChunkBody::Error { error, message }
            } else {
                ChunkBody::ErrorOffset {
                    error,
                    message,
                    offset: be64(p, 6 + msg_len),
                }
            }
        }
        reply_type::NONE
        | reply_type::OFFSET_DATA
        | reply_type::OFFSET_HOLE
        | reply_type::BLOCK_STATUS
        | reply_type::BLOCK_STATUS_EXT
        | reply_type::ERROR
        | reply_type::ERROR_OFFSET => return Err(bad),
        _ => ChunkBody::Other {
            ty,
            data: p.to_vec(),
        },
    };
    Ok(body)
}

/// Decode the reply at the start of `buf` (client side). Returns `Ok(None)` when more bytes
/// are needed, else the reply and the bytes it spans. Chunk payloads above `max_payload + 16`
/// bytes are refused before anything is allocated; simple replies span 16 bytes, and the data
/// of a simple read reply is left in the buffer for the caller.
pub fn decode_reply(buf: &[u8], max_payload: u32) -> Result<Option<(Reply, usize)>, ReplyError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = be32(buf, 0);
    let (header_len, extended) = match magic {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_LEN {
                return Ok(None);
            }
            let reply = Reply::Simple {
                cookie: be64(buf, 8),
                error: be32(buf, 4),
            };
            return Ok(Some((reply, SIMPLE_REPLY_LEN)));
        }
        STRUCTURED_REPLY_MAGIC => (STRUCTURED_REPLY_LEN, false),
        EXTENDED_REPLY_MAGIC => (EXTENDED_REPLY_LEN, true),
        other => return Err(ReplyError::BadMagic(other)),
    };
    if buf.len() < header_len {
        return Ok(None);
    }
    let flags = be16(buf, 4);
    let ty = be16(buf, 6);
    let cookie = be64(buf, 8);
    let (offset, len) = if extended {
        (be64(buf, 16), be64(buf, 24))
    } else {
        (0, u64::from(be32(buf, 16)))
    };
    if len > u64::from(max_payload) + 16 {
        return Err(ReplyError::Malformed(ty));
    }
    let total = header_len + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let body = decode_body(ty, &buf[header_len..total], extended)?;
    Ok(Some((
        Reply::Chunk {
            flags,
            cookie,
            offset,
            body,
        },
        total,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{MAX_PAYLOAD, errno};

    fn params(style: HeaderStyle) -> TransmissionParams {
        TransmissionParams {
            style,
            size: 1 << 20,
            min_block: 512,
            max_payload: MAX_PAYLOAD,
            transmission_flags: tf::HAS_FLAGS
                | tf::SEND_FLUSH
                | tf::SEND_FUA
                | tf::SEND_TRIM
                | tf::SEND_WRITE_ZEROES
                | tf::SEND_DF,
            has_meta_contexts: true,
        }
    }

    fn to(style: HeaderStyle) -> ReplyTo {
        ReplyTo {
            style,
            cookie: 1,
            offset: 0,
        }
    }

    fn header(command: Command, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    fn check(style: HeaderStyle, h: RequestHeader) -> Result<Disposition, DecodeError> {
        params(style).check(&h)
    }

    fn rejected(error: NbdError, skip: u32) -> Result<Disposition, DecodeError> {
        Ok(Disposition::Reject { error, skip })
    }

    #[test]
    fn aligned_in_range_read_executes() {
        let r = check(HeaderStyle::Simple, header(Command::Read, 0, 512, 4096));
        assert_eq!(r, Ok(Disposition::Execute));
    }

    #[test]
    fn read_past_end_is_einval() {
        let r = check(HeaderStyle::Simple, header(Command::Read, 0, 1 << 20, 512));
        assert_eq!(r, rejected(NbdError::Invalid, 0));
    }

    #[test]
    fn write_past_end_is_enospc_and_skips_payload() {
        let r = check(
            HeaderStyle::Simple,
            header(Command::Write, 0, (1 << 20) - 512, 1024),
        );
        assert_eq!(r, rejected(NbdError::NoSpace, 1024));
    }

    #[test]
    fn overflowing_offset_is_rejected_not_wrapped() {
        let r = check(
            HeaderStyle::Extended,
            header(Command::Trim, 0, u64::MAX - 511, 1024),
        );
        assert_eq!(r, rejected(NbdError::Invalid, 0));
    }

    #[test]
    fn unaligned_write_is_einval() {
        let r = check(HeaderStyle::Simple, header(Command::Write, 0, 100, 512));
        assert_eq!(r, rejected(NbdError::Invalid, 512));
    }

    #[test]
    fn unaligned_trim_is_taken_but_not_past_the_end() {
        // Advisory: the backend ignores what does not cover whole blocks.
        let r = check(HeaderStyle::Simple, header(Command::Trim, 0, 100, 1000));
        assert_eq!(r, Ok(Disposition::Execute));
        let r = check(
            HeaderStyle::Simple,
            header(Command::WriteZeroes, 0, 100, 1000),
        );
        assert_eq!(r, rejected(NbdError::Invalid, 0));
        let r = check(HeaderStyle::Simple, header(Command::Trim, 0, 1 << 40, 1000));
        assert_eq!(r, rejected(NbdError::Invalid, 0));
    }

    #[test]
    fn zero_length_read_is_einval() {
        let r = check(HeaderStyle::Simple, header(Command::Read, 0, 0, 0));
        assert_eq!(r, rejected(NbdError::Invalid, 0));
    }

    #[test]
    fn bad_flag_for_command_is_einval() {
        let r = check(
            HeaderStyle::Simple,
            header(Command::Read, cf::NO_HOLE, 0, 512),
        );
        assert_eq!(r, rejected(NbdError::Invalid, 0));
        let r = check(HeaderStyle::Simple, header(Command::Read, cf::DF, 0, 512));
        assert_eq!(r, Ok(Disposition::Execute));
        let r = check(
            HeaderStyle::Simple,
            header(Command::WriteZeroes, cf::FAST_ZERO, 0, 512),
        );
        assert_eq!(r, rejected(NbdError::Invalid, 0));
    }

    #[test]
    fn oversized_write_is_fatal() {
        let h = header(Command::Write, 0, 0, u64::from(MAX_PAYLOAD) + 512);
        assert_eq!(
            check(HeaderStyle::Simple, h),
            Err(DecodeError::PayloadTooLarge(h))
        );
    }

    #[test]
    fn extended_payload_on_non_write_is_skipped_and_refused() {
        let h = header(Command::BlockStatus, cf::PAYLOAD_LEN, 0, 16);
        assert_eq!(
            check(HeaderStyle::Extended, h),
            rejected(NbdError::Invalid, 16)
        );
        // Without extended headers the flag is unknown and carries no payload.
        assert_eq!(
            check(HeaderStyle::Structured, h),
            rejected(NbdError::Invalid, 0)
        );
    }

    #[test]
    fn flush_with_length_is_einval_and_unadvertised_cache_is_einval() {
        let r = check(HeaderStyle::Simple, header(Command::Flush, 0, 0, 512));
        assert_eq!(r, rejected(NbdError::Invalid, 0));
        let r = check(HeaderStyle::Simple, header(Command::Cache, 0, 0, 512));
        assert_eq!(r, rejected(NbdError::Invalid, 0));
    }

    #[test]
    fn read_only_export_refuses_writes_with_eperm() {
        let mut p = params(HeaderStyle::Simple);
        p.transmission_flags |= tf::READ_ONLY;
        let r = p.check(&header(Command::Write, 0, 0, 512));
        assert_eq!(r, rejected(NbdError::Permission, 512));
    }

    #[test]
    fn large_read_is_eoverflow_with_structured_replies() {
        let h = header(Command::Read, 0, 0, u64::from(MAX_PAYLOAD) * 2);
        let mut p = params(HeaderStyle::Extended);
        p.size = u64::MAX;
        assert_eq!(p.check(&h), rejected(NbdError::Overflow, 0));
    }

    #[test]
    fn decoder_consumes_exactly_a_rejected_write() {
        let d = RequestDecoder::new(params(HeaderStyle::Simple));
        let mut buf = [0u8; 32];
        let n = header(Command::Write, 0, 3, 512).encode(HeaderStyle::Simple, &mut buf);
        let mut stream = buf[..n].to_vec();
        assert_eq!(d.decode(&stream), Ok(Progress::Need(28 + 512)));
        stream.extend_from_slice(&[9; 512]);
        stream.extend_from_slice(&[1, 2, 3]);
        let Ok(Progress::Frame { frame, consumed }) = d.decode(&stream) else {
            panic!()
        };
        assert_eq!(consumed, 28 + 512);
        assert!(matches!(frame, Frame::Reject(_, NbdError::Invalid)));
    }

    #[test]
    fn bad_magic_is_fatal() {
        let d = RequestDecoder::new(params(HeaderStyle::Extended));
        let mut buf = [0u8; 32];
        header(Command::Read, 0, 0, 512).encode(HeaderStyle::Simple, &mut buf);
        assert_eq!(d.decode(&buf), Err(DecodeError::BadMagic(REQUEST_MAGIC)));
    }

    #[test]
    fn read_reply_headers_per_style() {
        assert_eq!(
            ReplyHeader::read_data(HeaderStyle::Simple, 1, 0, 512)
                .as_bytes()
                .len(),
            16
        );
        let h = ReplyHeader::read_data(HeaderStyle::Structured, 1, 4096, 512);
        assert_eq!(h.as_bytes().len(), 28);
        let mut wire = h.as_bytes().to_vec();
        wire.extend_from_slice(&[5; 512]);
        let (reply, used) = decode_reply(&wire, MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(used, wire.len());
        let Reply::Chunk {
            flags,
            cookie,
            body,
            ..
        } = reply
        else {
            panic!()
        };
        assert_eq!((flags, cookie), (reply_flags::DONE, 1));
        assert_eq!(
            body,
            ChunkBody::OffsetData {
                offset: 4096,
                data: vec![5; 512]
            }
        );
    }

    #[test]
    fn extended_done_is_a_none_chunk_echoing_offset() {
        let h = ReplyHeader::done(HeaderStyle::Extended, 9, 1234);
        let (reply, used) = decode_reply(h.as_bytes(), MAX_PAYLOAD).unwrap().unwrap();
        assert_eq!(used, 32);
        let want = Reply::Chunk {
            flags: reply_flags::DONE,
            cookie: 9,
            offset: 1234,
            body: ChunkBody::None,
        };
        assert_eq!(reply, want);
    }

    #[test]
    fn error_chunk_carries_message() {
        let msg = error_message("out of range");
        let h = ReplyHeader::error(HeaderStyle::Structured, 3, 0, errno::EINVAL, msg);
        let mut wire = h.as_bytes().to_vec();
        wire.extend_from_slice(msg.as_bytes());
        let (reply, _) = decode_reply(&wire, MAX_PAYLOAD).unwrap().unwrap();
        let Reply::Chunk { body, .. } = reply else {
            panic!()
        };
        assert_eq!(
            body,
            ChunkBody::Error {
                error: 22,
                message: b"out of range".to_vec()
            }
        );
    }

    #[test]
    fn compact_block_status_splits_huge_extent() {
        let mut out = Vec::new();
        let extents = [
            Extent {
                length: 1 << 33,
                flags: 3,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let covered = encode_block_status(
            to(HeaderStyle::Structured),
            1,
            &extents,
            true,
            512,
            &mut out,
        );
        assert_eq!(covered, u64::from(u32::MAX) / 512 * 512);
        let (reply, _) = decode_reply(&out, MAX_PAYLOAD).unwrap().unwrap();
        let Reply::Chunk {
            body: ChunkBody::BlockStatus { extents, .. },
            ..
        } = reply
        else {
            panic!()
        };
        assert_eq!(extents, vec![(covered, 3)]);
    }

    #[test]
    fn extended_block_status_keeps_64_bit_lengths() {
        let mut out = Vec::new();
        let extents = [
            Extent {
                length: 1 << 33,
                flags: 1,
            },
            Extent {
                length: 512,
                flags: 2,
            },
        ];
        encode_block_status(to(HeaderStyle::Extended), 2, &extents, true, 512, &mut out);
        let (reply, _) = decode_reply(&out, MAX_PAYLOAD).unwrap().unwrap();
        let Reply::Chunk { body, .. } = reply else {
            panic!()
        };
        let want = ChunkBody::BlockStatus {
            context_id: 2,
            extents: vec![(1 << 33, 1), (512, 2)],
        };
        assert_eq!(body, want);
    }
}
