//! A deliberately small NBD client written from the protocol text, independent of the crate's
//! codec, for tests that need exact bytes on the wire.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META: u32 = 9;
pub const OPT_SET_META: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// NBD error values as the protocol document numbers them, independent of the crate's own.
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// One reply: simple, or all the chunks of a structured reply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawReply {
    pub cookie: u64,
    /// The error of a simple reply, or of the first error chunk.
    pub error: u32,
    /// Read data (simple reply data or OFFSET_DATA payloads, in order received).
    pub data: Vec<u8>,
    /// (type, flags, payload) of each chunk.
    pub chunks: Vec<(u16, u16, Vec<u8>)>,
    /// Offsets echoed by extended reply headers.
    pub header_offsets: Vec<u64>,
}

pub struct RawClient {
    pub stream: UnixStream,
    pub extended: bool,
    pub structured: bool,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes(b[i..i + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

impl RawClient {
    /// Connect and read the greeting; send client flags FIXED_NEWSTYLE | NO_ZEROES.
    pub fn connect(path: &Path) -> Self {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut greet = [0u8; 18];
        stream.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        assert_eq!(u64_at(&greet, 8), IHAVEOPT);
        assert_eq!(u16_at(&greet, 16) & 1, 1, "fixed newstyle");
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        Self {
            stream,
            extended: false,
            structured: false,
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.stream.write_all(&b).unwrap();
    }

    /// (option, reply type, data)
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).unwrap();
        assert_eq!(u64_at(&h, 0), OPT_REPLY_MAGIC);
        let len = u32_at(&h, 16) as usize;
        assert!(len < 1 << 20);
        let mut data = vec![0u8; len];
        self.stream.read_exact(&mut data).unwrap();
        (u32_at(&h, 8), u32_at(&h, 12), data)
    }

    /// Replies up to and including the final ACK or error.
    pub fn option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Negotiate and enter transmission; returns (size, transmission flags, context ids).
    pub fn negotiate(
        &mut self,
        structured: bool,
        extended: bool,
        contexts: &[&str],
    ) -> (u64, u16, Vec<(u32, String)>) {
        if extended {
            self.send_option(OPT_EXTENDED_HEADERS, &[]);
            assert_eq!(self.option_reply().1, REP_ACK);
            self.extended = true;
            self.structured = true;
        } else if structured {
            self.send_option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().1, REP_ACK);
            self.structured = true;
        }
        let mut ids = Vec::new();
        if !contexts.is_empty() {
            self.send_option(OPT_SET_META, &Self::meta_data("disk", contexts));
            for (_, ty, data) in self.option_replies() {
                if ty == REP_META {
                    ids.push((
                        u32_at(&data, 0),
                        String::from_utf8(data[4..].to_vec()).unwrap(),
                    ));
                }
            }
        }
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&3u16.to_be_bytes());
        self.send_option(OPT_GO, &go);
        let mut size = 0;
        let mut flags = 0;
        for (_, ty, data) in self.option_replies() {
            assert!(ty == REP_INFO || ty == REP_ACK, "GO failed with {ty:#x}");
            if ty == REP_INFO && u16_at(&data, 0) == 0 {
                size = u64_at(&data, 2);
                flags = u16_at(&data, 10);
            }
        }
        (size, flags, ids)
    }

    /// Send a request header (compact or extended per negotiation) and its payload.
    pub fn request(
        &mut self,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let b = self.request_bytes(flags, ty, cookie, offset, len, payload);
        self.stream.write_all(&b).unwrap();
    }

    /// Writes `bytes` (requests made by [`RawClient::request_bytes`]) in one write, so the
    /// server finds them all buffered together.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The bytes of a request as [`RawClient::request`] sends it.
    pub fn request_bytes(
        &self,
        flags: u16,
        ty: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + payload.len());
        if self.extended {
            b.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
        } else {
            b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        }
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        b.extend_from_slice(payload);
        b
    }

    /// Read one complete reply. `simple_read_len` is the data length that follows a simple
    /// reply with error zero (the length of the read it answers; zero otherwise).
    pub fn reply(&mut self, simple_read_len: impl Fn(u64) -> usize) -> RawReply {
        let mut r = RawReply::default();
        loop {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic).unwrap();
            match u32::from_be_bytes(magic) {
                0x6744_6698 => {
                    assert!(!self.extended, "simple reply with extended headers");
                    let mut h = [0u8; 12];
                    self.stream.read_exact(&mut h).unwrap();
                    r.error = u32_at(&h, 0);
                    r.cookie = u64_at(&h, 4);
                    if r.error == 0 {
                        r.data = vec![0; simple_read_len(r.cookie)];
                        self.stream.read_exact(&mut r.data).unwrap();
                    }
                    return r;
                }
                m @ (0x668e_33ef | 0x6e8a_278c) => {
                    let ext = m == 0x6e8a_278c;
                    assert_eq!(ext, self.extended, "reply magic does not match negotiation");
                    let mut h = vec![0u8; if ext { 28 } else { 16 }];
                    self.stream.read_exact(&mut h).unwrap();
                    let flags = u16_at(&h, 0);
                    let ty = u16_at(&h, 2);
                    r.cookie = u64_at(&h, 4);
                    let len = if ext {
                        r.header_offsets.push(u64_at(&h, 12));
                        u64_at(&h, 20) as usize
                    } else {
                        u32_at(&h, 12) as usize
                    };
                    assert!(len <= (32 << 20) + 64);
                    let mut p = vec![0u8; len];
                    self.stream.read_exact(&mut p).unwrap();
                    if ty == 1 {
                        r.data.extend_from_slice(&p[8..]);
                    }
                    if ty & 0x8000 != 0 && r.error == 0 {
                        r.error = u32_at(&p, 0);
                    }
                    r.chunks.push((ty, flags, p));
                    if flags & 1 != 0 {
                        return r;
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    /// Whether the server has closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// Decode (length, flags) pairs of a BLOCK_STATUS (compact) or BLOCK_STATUS_EXT payload.
pub fn extents(ty: u16, p: &[u8]) -> (u32, Vec<(u64, u64)>) {
    let id = u32_at(p, 0);
    if ty == 5 {
        (
            id,
            p[4..]
                .chunks(8)
                .map(|c| (u64::from(u32_at(c, 0)), u64::from(u32_at(c, 4))))
                .collect(),
        )
    } else {
        assert_eq!(ty, 6);
        let n = u32_at(p, 4) as usize;
        assert_eq!(p.len(), 8 + 16 * n);
        (
            id,
            p[8..]
                .chunks(16)
                .map(|c| (u64_at(c, 0), u64_at(c, 8)))
                .collect(),
        )
    }
}
