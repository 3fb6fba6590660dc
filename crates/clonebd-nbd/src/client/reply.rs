//! Reading a reply off the wire in two steps, shared by the one-at-a-time [`Client`] and the
//! multiplexed [`MuxClient`]: [`read_head`] reads the header of one reply chunk (or a simple
//! reply) and says whose cookie it carries; the request's [`Assembly`] then reads the chunk's
//! body into the request's own buffer, checking every length and offset against the request
//! first, and says when the reply is complete. Chunks of different requests may interleave
//! ("the server MAY interleave ... chunks from different requests"), so the caller looks the
//! cookie up between the two steps.
//!
//! [`Client`]: super::Client
//! [`MuxClient`]: crate::mux::MuxClient

use std::io::Read;

use super::{ClientError, Pending, be16, be32, be64, server_error};
use crate::backend::Extent;
use crate::codec::{ChunkBody, Reply, decode_reply};
use crate::proto::{
    Command, HeaderStyle, MAX_PAYLOAD, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_LEN,
    STRUCTURED_REPLY_MAGIC, reply_flags, reply_type,
};

/// Where a reply's data goes.
#[derive(Debug)]
pub(crate) enum Sink<'a> {
    /// No data expected.
    None,
    /// Read data for the request's range, into the caller's buffer.
    Read(&'a mut [u8]),
    /// Read data for the request's range, into a buffer the assembly owns.
    Owned(Vec<u8>),
    /// Block status extents, kept for one context id.
    Status(u32, &'a mut Vec<Extent>),
    /// Block status extents for one context id, into a list the assembly owns.
    OwnedStatus(u32, Vec<Extent>),
}

impl Sink<'_> {
    fn data(&mut self) -> Option<&mut [u8]> {
        match self {
            Sink::Read(b) => Some(b),
            Sink::Owned(v) => Some(v),
            _ => None,
        }
    }

    /// The context id and the list of a block status request.
    fn status(&mut self) -> Option<(u32, &mut Vec<Extent>)> {
        match self {
            Sink::Status(id, out) => Some((*id, out)),
            Sink::OwnedStatus(id, out) => Some((*id, out)),
            _ => None,
        }
    }
}

/// The header of one reply chunk, or a simple reply.
#[derive(Debug)]
pub(crate) enum ChunkHead {
    /// "S: 32 bits, 0x67446698, magic (`NBD_SIMPLE_REPLY_MAGIC`) S: 32 bits, error (MAY be
    /// zero) S: 64 bits, cookie".
    Simple { cookie: u64, error: u32 },
    /// "S: 32 bits, 0x668e33ef, magic (`NBD_STRUCTURED_REPLY_MAGIC`) S: 16 bits, flags S: 16
    /// bits, type S: 64 bits, cookie S: 32 bits, length of payload (unsigned)".
    Structured {
        raw: [u8; STRUCTURED_REPLY_LEN],
        flags: u16,
        ty: u16,
        cookie: u64,
        len: u32,
    },
}

impl ChunkHead {
    /// The cookie of the request the chunk answers.
    pub(crate) fn cookie(&self) -> u64 {
        match self {
            ChunkHead::Simple { cookie, .. } | ChunkHead::Structured { cookie, .. } => *cookie,
        }
    }
}

/// Reads the next chunk header. Any error breaks the connection.
pub(crate) fn read_head(r: &mut impl Read, style: HeaderStyle) -> Result<ChunkHead, ClientError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    let magic_v = u32::from_be_bytes(magic);
    if magic_v == SIMPLE_REPLY_MAGIC {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        h[..4].copy_from_slice(&magic);
        r.read_exact(&mut h[4..])?;
        let Some((Reply::Simple { cookie, error }, _)) =
            decode_reply(&h, MAX_PAYLOAD).map_err(|_| ClientError::Protocol("bad simple reply"))?
        else {
            return Err(ClientError::Protocol("bad simple reply"));
        };
        return Ok(ChunkHead::Simple { cookie, error });
    }
    if magic_v != STRUCTURED_REPLY_MAGIC || !style.structured() {
        return Err(ClientError::Protocol("bad reply magic"));
    }
    let mut raw = [0u8; STRUCTURED_REPLY_LEN];
    raw[..4].copy_from_slice(&magic);
    r.read_exact(&mut raw[4..])?;
    Ok(ChunkHead::Structured {
        raw,
        flags: be16(&raw, 4),
        ty: be16(&raw, 6),
        cookie: be64(&raw, 8),
        len: be32(&raw, 16),
    })
}

/// One request's reply, as its chunks arrive.
#[derive(Debug)]
pub(crate) struct Assembly<'a> {
    pub(crate) pending: Pending,
    pub(crate) sink: Sink<'a>,
    covered: u64,
    first_error: Option<ClientError>,
}

impl<'a> Assembly<'a> {
    /// Waits for the reply to `pending`, its data going to `sink`.
    pub(crate) fn new(pending: Pending, sink: Sink<'a>) -> Self {
        Self {
            pending,
            sink,
            covered: 0,
            first_error: None,
        }
    }

    /// Reads the body of the chunk `head` (of this request's cookie) from `r`; true once the
    /// reply is complete. An error breaks the connection.
    pub(crate) fn feed(
        &mut self,
        r: &mut impl Read,
        style: HeaderStyle,
        head: ChunkHead,
    ) -> Result<bool, ClientError> {
        let p = self.pending;
        let (raw, flags, ty, len) = match head {
            ChunkHead::Simple { error, .. } => {
                // "S: (*length* bytes of data if the request is of type `NBD_CMD_READ` and
                // *error* is zero)". Structured replies forbid it for reads: "the server MUST
                // NOT send a simple reply to NBD_CMD_READ".
                if error != 0 {
                    self.first_error = Some(server_error(error, Vec::new()));
                    return Ok(true);
                }
                let structured = style.structured();
                match &mut self.sink {
                    Sink::Status(..) | Sink::OwnedStatus(..) => {
                        return Err(ClientError::Protocol("simple reply to block status"));
                    }
                    Sink::None => {}
                    _ if structured => {
                        return Err(ClientError::Protocol("simple reply to a structured read"));
                    }
                    sink => {
                        if let Some(buf) = sink.data() {
                            r.read_exact(buf)?;
                        }
                        self.covered = p.length;
                    }
                }
                return Ok(true);
            }
            ChunkHead::Structured {
                raw,
                flags,
                ty,
                len,
                ..
            } => (raw, flags, ty, len),
        };
        if ty == reply_type::OFFSET_DATA {
            // "64 bits: offset (unsigned) *length - 8* bytes: data". Read straight into the
            // request's buffer, after checking the range lies within the request.
            let Some(buf) = self.sink.data() else {
                return Err(ClientError::Protocol(
                    "data chunk for a request without data",
                ));
            };
            if len <= 8 {
                return Err(ClientError::Protocol("empty data chunk"));
            }
            let mut o = [0u8; 8];
            r.read_exact(&mut o)?;
            let at = u64::from_be_bytes(o);
            let n = u64::from(len - 8);
            let start = at.checked_sub(p.offset);
            let range = start.and_then(|s| Some((s, s.checked_add(n)?)));
            let Some((s, e)) = range.filter(|&(_, e)| e <= p.length) else {
                return Err(ClientError::Protocol("data chunk outside the request"));
            };
            r.read_exact(&mut buf[s as usize..e as usize])?;
            self.covered += n;
        } else {
            // Everything else is small: at most the extents of one context, capped.
            if len > MAX_PAYLOAD {
                return Err(ClientError::Protocol("reply chunk too long"));
            }
            let mut chunk = vec![0u8; STRUCTURED_REPLY_LEN + len as usize];
            chunk[..STRUCTURED_REPLY_LEN].copy_from_slice(&raw);
            r.read_exact(&mut chunk[STRUCTURED_REPLY_LEN..])?;
            let Some((Reply::Chunk { body, .. }, _)) = decode_reply(&chunk, MAX_PAYLOAD)
                .map_err(|_| ClientError::Protocol("malformed reply chunk"))?
            else {
                return Err(ClientError::Protocol("malformed reply chunk"));
            };
            self.chunk(flags, body)?;
        }
        Ok(flags & reply_flags::DONE != 0)
    }

    fn chunk(&mut self, flags: u16, body: ChunkBody) -> Result<(), ClientError> {
        let p = self.pending;
        match body {
            ChunkBody::None if flags & reply_flags::DONE == 0 => {
                return Err(ClientError::Protocol("NBD_REPLY_TYPE_NONE without DONE"));
            }
            ChunkBody::None => {}
            ChunkBody::OffsetHole { offset, length } => {
                let Some(buf) = self.sink.data() else {
                    return Err(ClientError::Protocol(
                        "hole chunk for a request without data",
                    ));
                };
                let n = u64::from(length);
                let range = offset
                    .checked_sub(p.offset)
                    .and_then(|s| Some((s, s.checked_add(n)?)));
                let Some((s, e)) = range.filter(|&(_, e)| e <= p.length && n > 0) else {
                    return Err(ClientError::Protocol("hole chunk outside the request"));
                };
                buf[s as usize..e as usize].fill(0);
                self.covered += n;
            }
            ChunkBody::BlockStatus {
                context_id,
                extents,
            } => {
                let Some((want, out)) = self.sink.status() else {
                    return Err(ClientError::Protocol("block status for another command"));
                };
                if extents.is_empty() || extents.iter().any(|&(l, _)| l == 0) {
                    return Err(ClientError::Protocol("empty block status extent"));
                }
                if context_id == want {
                    out.extend(extents.into_iter().map(|(length, flags)| Extent {
                        length,
                        flags: flags as u32,
                    }));
                }
            }
            ChunkBody::Error { error, message } | ChunkBody::ErrorOffset { error, message, .. } => {
                if error == 0 {
                    return Err(ClientError::Protocol("error chunk with error zero"));
                }
                self.first_error.get_or_insert(server_error(error, message));
            }
            ChunkBody::OffsetData { .. } => {
                return Err(ClientError::Protocol("data chunk decoded as a small chunk"));
            }
            // "A client MUST NOT ... unless it is an error type": an unknown type without the
            // error bit cannot be understood.
            ChunkBody::Other { ty, .. } if ty & (1 << 15) != 0 => {
                self.first_error
                    .get_or_insert(server_error(crate::proto::errno::EINVAL, Vec::new()));
            }
            ChunkBody::Other { .. } => {
                return Err(ClientError::Protocol("unknown reply chunk type"));
            }
        }
        Ok(())
    }

    /// The reply's outcome once complete, and the sink back. The outer error breaks the connection (a reply
    /// that does not add up); the inner one is the server's answer.
    pub(crate) fn outcome(mut self) -> (Result<Result<(), ClientError>, ClientError>, Sink<'a>) {
        let r = self.check();
        (r, self.sink)
    }

    fn check(&mut self) -> Result<Result<(), ClientError>, ClientError> {
        if let Some(e) = self.first_error.take() {
            return Ok(Err(e));
        }
        if self.pending.command == Command::Read && self.covered != self.pending.length {
            return Err(ClientError::Protocol(
                "read reply does not cover the request",
            ));
        }
        if let Some((_, out)) = self.sink.status()
            && out.is_empty()
        {
            return Err(ClientError::Protocol("no block status for the context"));
        }
        Ok(Ok(()))
    }
}
