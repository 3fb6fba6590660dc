//! The dm-clone language: table lines, status lines and messages, with the kernel's exact strings.
//!
//! Everything here is pure text in, text or values out; nothing opens a device. The pieces:
//!
//! - [`table`]: the constructor ([`parse_table`], checked in the kernel's order through the
//!   [`TableDevices`] seam) and the TABLE status ([`format_table`]);
//! - [`status`]: the INFO status line ([`format_status`]) and its reader ([`parse_status`]);
//! - [`message`]: the four messages, and clonebd's `hydrate_range` ([`parse_message`]);
//! - [`words`]: splitting a table line into words as the kernel does;
//! - [`number`]: the kernel's two number readers (`%u` and `kstrtouint`).
//!
//! The strings are the kernel's, byte for byte (SPEC D5), with two deliberate differences
//! (SPEC D3, H4): words after a table's core arguments, and words after `enable_hydration` or
//! `disable_hydration`, are refused instead of ignored.

pub mod message;
pub mod number;
pub mod status;
pub mod table;
pub mod words;

pub use message::{Message, MessageError, MessageErrorKind, parse_message};
pub use number::{NumberError, parse_kstrtouint, parse_scan_u32};
pub use status::{
    MetadataMode, StatusInfo, StatusLine, StatusParseError, format_error_status, format_status,
    format_status_line, parse_status,
};
pub use table::{
    CloneTable, DeviceInfo, OpenFailure, TableDevices, TableError, TableErrorKind, format_table,
    format_table_line, parse_table,
};
pub use words::{TableLine, TableLineError, parse_table_line, split_table_words};

/// The Linux errno values this module reports, by name.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = libc::EPERM;
    /// Out of memory.
    pub const ENOMEM: i32 = libc::ENOMEM;
    /// No such device: what the kernel returns for a device path that does not exist.
    pub const ENODEV: i32 = libc::ENODEV;
    /// Invalid argument.
    pub const EINVAL: i32 = libc::EINVAL;
    /// Result out of range (`kstrtouint` overflow).
    pub const ERANGE: i32 = libc::ERANGE;
    /// Value too large for defined data type.
    pub const EOVERFLOW: i32 = libc::EOVERFLOW;
}
