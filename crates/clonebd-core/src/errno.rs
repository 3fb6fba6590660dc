//! System errors in words a user can act on: the system's text once, with the errno's name.
//!
//! `std::io::Error` displays as "No such file or directory (os error 2)"; people search for
//! `ENOENT`. [`describe`] gives "No such file or directory (ENOENT)", and every message that
//! shows a system error goes through it, so the cause appears once and in one form.

use std::io;

/// The symbolic name of a Linux errno value (`"ENOENT"` for `libc::ENOENT`), if it is a
/// common one.
pub fn name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::ENOTBLK => "ENOTBLK",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::ETIME => "ETIME",
        libc::EPROTO => "EPROTO",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EDQUOT => "EDQUOT",
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
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(describe(&e), "No such file or directory (ENOENT)");
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(describe(&e), "No space left on device (ENOSPC)");
        let e = io::Error::from_raw_os_error(4095);
        assert!(describe(&e).ends_with("(errno 4095)"), "{}", describe(&e));
        let e = io::Error::new(io::ErrorKind::InvalidInput, "bad range");
        assert_eq!(describe(&e), "bad range");
    }
}
