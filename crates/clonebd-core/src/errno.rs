//! System errors in words a user can act on: the system's text once, with the errno's name.
//!
//! `std::io::Error` displays as "No such file or directory (os error 2)"; people search for
//! `ENOENT`. [`describe`] gives "No such file or directory (ENOENT)", and every message that
//! shows a system error goes through it, so the cause appears once and in one form.

use std::io;

/// The symbolic name of a Linux errno value (`ENOENT` for 2), if it is a common one.
pub fn name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        1 => "EPERM",
        2 => "ENOENT",
        4 => "EINTR",
        5 => "EIO",
        6 => "ENXIO",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        15 => "ENOTBLK",
        16 => "EBUSY",
        17 => "EEXIST",
        18 => "EXDEV",
        19 => "ENODEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        23 => "ENFILE",
        24 => "EMFILE",
        26 => "ETXTBSY",
        27 => "EFBIG",
        28 => "ENOSPC",
        29 => "ESPIPE",
        30 => "EROFS",
        32 => "EPIPE",
        36 => "ENAMETOOLONG",
        38 => "ENOSYS",
        40 => "ELOOP",
        61 => "ENODATA",
        62 => "ETIME",
        71 => "EPROTO",
        75 => "EOVERFLOW",
        88 => "ENOTSOCK",
        95 => "EOPNOTSUPP",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        101 => "ENETUNREACH",
        103 => "ECONNABORTED",
        104 => "ECONNRESET",
        107 => "ENOTCONN",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        122 => "EDQUOT",
        _ => return None,
    })
}

/// `e` in words: the system's text with the errno's name ("No such file or directory
/// (ENOENT)"), or the error's own text when it carries no errno.
pub fn describe(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return e.to_string();
    };
    let text = e.to_string();
    // std appends " (os error N)" to the system's text; say it once, by name.
    let plain = text
        .strip_suffix(&format!(" (os error {code})"))
        .unwrap_or(&text);
    match name(code) {
        Some(n) => format!("{plain} ({n})"),
        None => format!("{plain} (errno {code})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_errno_once() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(describe(&e), "No such file or directory (ENOENT)");
        let e = io::Error::from_raw_os_error(28);
        assert_eq!(describe(&e), "No space left on device (ENOSPC)");
        let e = io::Error::from_raw_os_error(4095);
        assert!(describe(&e).ends_with("(errno 4095)"), "{}", describe(&e));
        let e = io::Error::new(io::ErrorKind::InvalidInput, "bad range");
        assert_eq!(describe(&e), "bad range");
    }
}
