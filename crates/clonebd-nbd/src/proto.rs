//! Protocol constants and the small enums built on them.
//!
//! Owns every number that appears on the wire: magics, handshake and transmission flags, option
//! and reply types, information types, commands, command flags, structured reply types and error
//! values, plus the caps this implementation puts on lengths chosen by a peer. Nothing here
//! performs I/O or allocates. Values are those of the NBD protocol document (fixed newstyle,
//! structured replies, metadata contexts) and of its `EXTENDED_HEADERS` extension.

/// "S: 64 bits, `0x4e42444d41474943` (ASCII '`NBDMAGIC`')".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "S: 64 bits, `0x49484156454F5054` (ASCII '`IHAVEOPT`')"; also the client's option magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// "S: 64 bits, `0x3e889045565a9` (magic number for replies)" during option haggling.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// "C: 32 bits, 0x25609513, magic (`NBD_REQUEST_MAGIC`)".
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`, the 32-byte request header of the extended headers extension.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// "S: 32 bits, 0x67446698, magic (`NBD_SIMPLE_REPLY_MAGIC`)".
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// "S: 32 bits, 0x668e33ef, magic (`NBD_STRUCTURED_REPLY_MAGIC`)".
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`, the 32-byte reply header of the extended headers extension.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Length of a compact request header (magic, flags, type, cookie, offset, 32-bit length).
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header (magic, flags, type, cookie, offset, 64-bit length).
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// The largest payload this server accepts or sends in one message: 32 MiB.
///
/// "any payload not exceeding 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
/// service attack". It is also the maximum payload advertised in `NBD_INFO_BLOCK_SIZE`.
pub const MAX_PAYLOAD: u32 = 1 << 25;
/// The largest option data the handshake buffers in memory.
///
/// Strings "MUST be no longer than 4096 bytes"; `NBD_OPT_GO` carries one name and at most a few
/// information requests, and a metadata query list of a dozen names fits easily.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The largest option data the handshake drains (reads and drops) before answering an error;
/// anything larger ends the connection, as a denial of service.
pub const MAX_OPTION_DRAIN: u32 = 1 << 20;
/// The longest string (export name, query, message) accepted: "MUST be no longer than 4096 bytes".
pub const MAX_STRING_LEN: usize = 4096;
/// The number of options one handshake may send before the server gives up on it.
pub const MAX_OPTIONS: u32 = 4096;
/// "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk".
pub const MAX_EXTENTS: usize = 1 << 20;

/// Handshake flags sent by the server after `IHAVEOPT`.
pub mod handshake_flags {
    /// "bit 0, `NBD_FLAG_FIXED_NEWSTYLE`; MUST be set by servers that support the fixed newstyle
    /// protocol".
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// "bit 1, `NBD_FLAG_NO_ZEROES`".
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags sent in answer to the handshake flags.
pub mod client_flags {
    /// "bit 0, `NBD_FLAG_C_FIXED_NEWSTYLE`".
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// "bit 1, `NBD_FLAG_C_NO_ZEROES`".
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set: "Clients MUST NOT set any other flags".
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits), sent in `NBD_INFO_EXPORT` or after `NBD_OPT_EXPORT_NAME`.
pub mod transmission_flags {
    /// "bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1."
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// "bit 1, `NBD_FLAG_READ_ONLY`".
    pub const READ_ONLY: u16 = 1 << 1;
    /// "bit 2, `NBD_FLAG_SEND_FLUSH`: exposes support for `NBD_CMD_FLUSH`."
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// "bit 3, `NBD_FLAG_SEND_FUA`: exposes support for `NBD_CMD_FLAG_FUA`."
    pub const SEND_FUA: u16 = 1 << 3;
    /// "bit 4, `NBD_FLAG_ROTATIONAL`".
    pub const ROTATIONAL: u16 = 1 << 4;
    /// "bit 5, `NBD_FLAG_SEND_TRIM`: exposes support for `NBD_CMD_TRIM`."
    pub const SEND_TRIM: u16 = 1 << 5;
    /// "bit 6, `NBD_FLAG_SEND_WRITE_ZEROES`".
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// "bit 7, `NBD_FLAG_SEND_DF`: do not fragment a structured reply."
    pub const SEND_DF: u16 = 1 << 7;
    /// "bit 8, `NBD_FLAG_CAN_MULTI_CONN`".
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// "bit 9, `NBD_FLAG_SEND_RESIZE`".
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// "bit 10, `NBD_FLAG_SEND_CACHE`".
    pub const SEND_CACHE: u16 = 1 << 10;
    /// "bit 11, `NBD_FLAG_SEND_FAST_ZERO`".
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// "bit 12, `NBD_FLAG_BLOCK_STATUS_PAYLOAD`" (extended headers; never set by this server).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Command flags (16 bits) in every request.
pub mod command_flags {
    /// "bit 0, `NBD_CMD_FLAG_FUA`".
    pub const FUA: u16 = 1 << 0;
    /// "bit 1, `NBD_CMD_FLAG_NO_HOLE`; valid during `NBD_CMD_WRITE_ZEROES`."
    pub const NO_HOLE: u16 = 1 << 1;
    /// "bit 2, `NBD_CMD_FLAG_DF`; the "don't fragment" flag, valid during `NBD_CMD_READ`."
    pub const DF: u16 = 1 << 2;
    /// "bit 3, `NBD_CMD_FLAG_REQ_ONE`; valid during `NBD_CMD_BLOCK_STATUS`."
    pub const REQ_ONE: u16 = 1 << 3;
    /// "bit 4, `NBD_CMD_FLAG_FAST_ZERO`; valid during `NBD_CMD_WRITE_ZEROES`."
    pub const FAST_ZERO: u16 = 1 << 4;
    /// "bit 5, `NBD_CMD_FLAG_PAYLOAD_LEN`" (extended headers): the length field is a payload
    /// length for a command other than `NBD_CMD_WRITE`.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flags.
pub mod reply_flags {
    /// "bit 0, `NBD_REPLY_FLAG_DONE`".
    pub const DONE: u16 = 1 << 0;
}

/// Option types sent by the client during option haggling.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME` (1).
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT` (2).
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST` (3).
    pub const LIST: u32 = 3;
    /// `NBD_OPT_PEEK_EXPORT` (4), withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// `NBD_OPT_STARTTLS` (5).
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO` (6).
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO` (7).
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY` (8).
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT` (9).
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT` (10).
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS` (11).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types sent by the server during option haggling.
pub mod rep {
    /// `NBD_REP_ACK` (1).
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER` (2).
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO` (3).
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT` (4).
    pub const META_CONTEXT: u32 = 4;
    /// `NBD_REP_ERR_UNSUP` (2^31 + 1).
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// `NBD_REP_ERR_POLICY` (2^31 + 2).
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// `NBD_REP_ERR_INVALID` (2^31 + 3).
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// `NBD_REP_ERR_PLATFORM` (2^31 + 4).
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// `NBD_REP_ERR_TLS_REQD` (2^31 + 5).
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// `NBD_REP_ERR_UNKNOWN` (2^31 + 6).
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// `NBD_REP_ERR_SHUTDOWN` (2^31 + 7).
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD` (2^31 + 8).
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    /// `NBD_REP_ERR_TOO_BIG` (2^31 + 9).
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
    /// `NBD_REP_ERR_EXT_HEADER_REQD` (2^31 + 10).
    pub const ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;
}

/// Information types inside `NBD_REP_INFO` replies and `NBD_OPT_INFO`/`GO` requests.
pub mod info {
    /// `NBD_INFO_EXPORT` (0): size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME` (1): canonical export name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION` (2): human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE` (3): minimum, preferred, maximum payload.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// `NBD_REPLY_TYPE_NONE` (0).
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA` (1).
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` (2).
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` (5).
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (6), only with extended headers.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// `NBD_REPLY_TYPE_ERROR` (2^15 + 1).
    pub const ERROR: u16 = (1 << 15) + 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET` (2^15 + 2).
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values carried in replies ("the allowed values for the error field").
pub mod errno {
    /// `NBD_EPERM` (1).
    pub const EPERM: u32 = 1;
    /// `NBD_EIO` (5).
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM` (12).
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL` (22).
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC` (28).
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW` (75).
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP` (95).
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN` (108).
    pub const ESHUTDOWN: u32 = 108;
}

/// The `base:allocation` metadata context name.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// clonebd's own context: whether each extent of the destination is hydrated.
pub const CONTEXT_CLONEBD_HYDRATED: &str = "clonebd:hydrated";
/// `NBD_STATE_HOLE` (bit 0 of `base:allocation`).
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` (bit 1 of `base:allocation`).
pub const STATE_ZERO: u32 = 1 << 1;
/// Bit 0 of `clonebd:hydrated`: the extent has been copied to the destination (or written).
pub const STATE_HYDRATED: u32 = 1 << 0;

/// A transmission-phase command ("Request types").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1).
    Write,
    /// `NBD_CMD_DISC` (2).
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other type, kept so that it can be answered with `NBD_EINVAL`.
    Unknown(u16),
}

impl Command {
    /// The command for a wire type value.
    pub fn from_wire(value: u16) -> Self {
        match value {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire type value of the command.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disc => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::Cache => 5,
            Self::WriteZeroes => 6,
            Self::BlockStatus => 7,
            Self::Unknown(other) => other,
        }
    }

    /// Whether the command changes the export's content.
    pub fn is_write(self) -> bool {
        matches!(self, Self::Write | Self::Trim | Self::WriteZeroes)
    }
}

/// The request and reply header style chosen during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderStyle {
    /// 28-byte requests; simple replies only.
    Simple,
    /// 28-byte requests; structured replies negotiated with `NBD_OPT_STRUCTURED_REPLY`.
    Structured,
    /// 32-byte requests and replies, negotiated with `NBD_OPT_EXTENDED_HEADERS`.
    Extended,
}

impl HeaderStyle {
    /// Length of a request header in this style.
    pub fn request_len(self) -> usize {
        match self {
            Self::Simple | Self::Structured => COMPACT_REQUEST_LEN,
            Self::Extended => EXTENDED_REQUEST_LEN,
        }
    }

    /// Whether structured reply chunks may (and for reads must) be used.
    pub fn structured(self) -> bool {
        !matches!(self, Self::Simple)
    }
}
