//! Clients as a network sees them: TCP connections from a chosen loopback address (all of
//! 127.0.0.0/8 reaches a server on 127.0.0.1, so each address is a distinct peer to it), and
//! a process's memory as the kernel counts it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection from `src` (any port) to `dst`, an IPv4 address.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        return Err(io::Error::other("IPv4 only"));
    };
    // SAFETY: socket(2) takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and belongs to nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let local = sockaddr(src, 0);
    // SAFETY: bind(2) reads `len` bytes of a live sockaddr_in.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sockaddr(*dst.ip(), dst.port());
    // SAFETY: connect(2) reads `len` bytes of a live sockaddr_in.
    if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpStream::from(sock))
}

/// The loopback address 127.0.0.`n`.
pub fn loopback(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
