//! Listening sockets that stop without touching the file system, and unix socket files that
//! are removed only while they are still ours.
//!
//! An accept loop blocked in `accept(2)` has to be woken to stop. Connecting to our own
//! address does that only while the address still leads to us: once the socket file has been
//! removed (`rm`, a tmpfiles cleanup) or another server has bound the path, the connection
//! fails or reaches someone else, and the loop never returns. An [`Acceptor`] instead waits
//! in `poll(2)` on the listening socket and on the eventfd of a [`StopSignal`];
//! [`StopSignal::stop`] makes that eventfd readable for good, so every loop sharing the
//! signal returns, now or at its next wait, whatever became of the path.
//!
//! [`bind_unix`] creates a unix socket file. A socket file left by a server that died (nobody
//! answers on it) is replaced; a path where a server answers, or that is not a socket, is
//! refused. It returns a [`SocketFile`] that remembers the file's device and inode, and
//! [`SocketFile::remove`] unlinks the path only if it still names that file, so the socket
//! of a server that took the path since is left alone.
//!
//! `unsafe` here: `poll(2)` on two borrowed descriptors.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clonebd_core::errno::describe;

/// Tells accept loops to stop; shared by every [`Acceptor`] of one server.
#[derive(Debug)]
pub struct StopSignal {
    /// Written once by [`stop`](Self::stop) and never read, so it stays readable.
    event: File,
    stopped: AtomicBool,
}

impl StopSignal {
    /// A signal not yet given.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            event: crate::eventfd()?,
            stopped: AtomicBool::new(false),
        })
    }

    /// Stops every [`Acceptor`] using this signal: a blocked [`Acceptor::accept`] returns
    /// `None` at once, later calls return `None` without waiting. Returns whether this call
    /// gave the signal (false if it had been given before).
    pub fn stop(&self) -> bool {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return false;
        }
        // An eventfd write fails only when the counter would overflow, and this is its only
        // write.
        let _ = (&self.event).write(&1u64.to_ne_bytes());
        true
    }

    /// Whether the signal has been given.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// A listening socket an [`Acceptor`] serves.
pub trait Listener: AsFd {
    /// A connection accepted.
    type Stream;

    /// `accept(2)` once. On Linux the connection does not inherit the listener's
    /// `O_NONBLOCK` (accept(2), NOTES), so it blocks as usual.
    fn accept_one(&self) -> io::Result<Self::Stream>;

    /// Sets `O_NONBLOCK` on the listener.
    fn nonblocking(&self) -> io::Result<()>;
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }

    fn nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    fn accept_one(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }

    fn nonblocking(&self) -> io::Result<()> {
        self.set_nonblocking(true)
    }
}

/// Accepts connections on a listener until a [`StopSignal`] is given.
#[derive(Debug)]
pub struct Acceptor<L> {
    listener: L,
    stop: Arc<StopSignal>,
}

impl<L: Listener> Acceptor<L> {
    /// Serves `listener` (made non-blocking) until `stop` is given.
    pub fn new(listener: L, stop: Arc<StopSignal>) -> io::Result<Self> {
        listener.nonblocking()?;
        Ok(Self { listener, stop })
    }

    /// The listener.
    pub fn listener(&self) -> &L {
        &self.listener
    }

    /// Waits for the next connection: `Some` with it, or `None` once the signal is given
    /// (connections still queued then are not taken). Errors are `accept(2)`'s (out of
    /// descriptors, a connection aborted) or `poll(2)`'s; the caller decides whether to go on.
    pub fn accept(&self) -> io::Result<Option<L::Stream>> {
        loop {
            if self.stop.is_stopped() {
                return Ok(None);
            }
            match self.listener.accept_one() {
                Ok(s) => return Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            wait_readable(self.listener.as_fd(), self.stop.event.as_fd())?;
        }
    }
}

/// Blocks until `a` or `b` is readable (or in error, which the next call then reports).
fn wait_readable(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<()> {
    let mut fds = [a, b].map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a live local array of two `pollfd`, and the count passed is its
        // length; poll writes only their `revents`. Both descriptors are borrowed, so they
        // stay open for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Why a unix socket could not be created at a path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// A server answers on the path.
    #[error("in use: a server answers on it")]
    InUse,
    /// Something that is not a socket is at the path; it is left alone.
    #[error("exists and is not a socket; not replacing it")]
    NotSocket,
    /// A socket file is there, and whether anyone answers on it could not be told.
    #[error("cannot tell whether a server answers on it: {}", describe(.0))]
    Probe(io::Error),
    /// Binding (or setting the mode, or moving the socket into place) failed.
    #[error("cannot create it: {}", describe(.0))]
    Create(io::Error),
}

/// What [`SocketFile::remove`] found at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Removal {
    /// Our socket file was there and is removed.
    Removed,
    /// Nothing was there any more.
    Gone,
    /// Another file (another server's socket, say) is there now; it is left alone.
    Replaced,
}

/// A unix socket file bound by [`bind_unix`], known by its device and inode.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The path bound.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the path if it still names the socket file bound. The check and the unlink are
    /// two system calls: a file put there between them would be removed, a window of
    /// microseconds that no interface closes.
    pub fn remove(&self) -> io::Result<Removal> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {}
            Ok(_) => return Ok(Removal::Replaced),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Gone),
            Err(e) => return Err(e),
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(Removal::Removed),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removal::Gone),
            Err(e) => Err(e),
        }
    }
}

/// Binds a unix socket at `path`, with the file's permission bits set to `mode` if given
/// (the socket is bound under a temporary name beside it, restricted, then renamed into
/// place, so it is never reachable with a looser mode).
///
/// A socket file already at `path` that nobody answers on (its server died) is replaced; one
/// a server answers on is [`BindError::InUse`]; anything else there is
/// [`BindError::NotSocket`] and stays as it is.
pub fn bind_unix(path: &Path, mode: Option<u32>) -> Result<(UnixListener, SocketFile), BindError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(BindError::NotSocket);
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse),
            // Refused: no listener is bound to it. Not found: removed meanwhile.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) => {}
            Err(e) => return Err(BindError::Probe(e)),
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BindError::Create(e)),
        }
    }
    let Some(mode) = mode else {
        let listener = UnixListener::bind(path).map_err(BindError::Create)?;
        let file = identify(path).map_err(BindError::Create)?;
        return Ok((listener, file));
    };
    let mut tmp = OsString::from(path);
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // Left by a process of ours that died between bind and rename.
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(BindError::Create)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| identify(&tmp))
        .and_then(|file| std::fs::rename(&tmp, path).map(|()| file));
    match placed {
        Ok(file) => Ok((
            listener,
            SocketFile {
                path: path.to_path_buf(),
                ..file
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(BindError::Create(e))
        }
    }
}

fn identify(path: &Path) -> io::Result<SocketFile> {
    let m = std::fs::symlink_metadata(path)?;
    Ok(SocketFile {
        path: path.to_path_buf(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::thread;
    use std::time::{Duration, Instant};

    /// Runs `accept` on a thread, gives the signal after the thread has blocked, and returns
    /// how long the accept took to return `None`.
    fn stop_while_blocked<L: Listener + Send + 'static>(listener: L) -> Duration
    where
        L::Stream: Send,
    {
        let stop = Arc::new(StopSignal::new().unwrap());
        let acceptor = Acceptor::new(listener, Arc::clone(&stop)).unwrap();
        let t = thread::spawn(move || {
            let start = Instant::now();
            let got = acceptor.accept().unwrap();
            (got.is_none(), start.elapsed())
        });
        thread::sleep(Duration::from_millis(200));
        assert!(
            !t.is_finished(),
            "accept returned without a connection or a stop"
        );
        assert!(stop.stop());
        assert!(
            !stop.stop(),
            "the second stop reports the signal as already given"
        );
        let (none, took) = t.join().unwrap();
        assert!(none, "a stopped acceptor returns no connection");
        took
    }

    #[test]
    fn stop_wakes_a_unix_accept_whose_socket_file_was_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(stop_while_blocked(listener) < Duration::from_secs(2));
    }

    #[test]
    fn stop_wakes_a_tcp_accept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(stop_while_blocked(listener) < Duration::from_secs(2));
    }

    #[test]
    fn acceptor_returns_connections_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let stop = Arc::new(StopSignal::new().unwrap());
        let acceptor =
            Acceptor::new(UnixListener::bind(&path).unwrap(), Arc::clone(&stop)).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let mut server = acceptor.accept().unwrap().expect("a connection");
        server.write_all(b"hi").unwrap();
        drop(server);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi");
        let _queued = UnixStream::connect(&path).unwrap();
        stop.stop();
        assert!(
            acceptor.accept().unwrap().is_none(),
            "queued connections are not taken"
        );
    }

    #[test]
    fn bind_replaces_a_dead_servers_socket_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a closed listener leaves its file");
        let (_live, _file) = bind_unix(&path, None).unwrap();
        assert!(matches!(bind_unix(&path, None), Err(BindError::InUse)));
        assert!(matches!(
            bind_unix(&path, Some(0o600)),
            Err(BindError::InUse)
        ));
    }

    #[test]
    fn bind_leaves_what_is_not_a_socket_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(bind_unix(&path, None), Err(BindError::NotSocket)));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn bind_with_a_mode_sets_it_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        let (_l, file) = bind_unix(&path, Some(0o600)).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(file.remove().unwrap(), Removal::Removed);
        assert!(!path.exists());
    }

    #[test]
    fn remove_leaves_a_socket_that_took_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (_ours, file) = bind_unix(&path, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.remove().unwrap(), Removal::Gone);
        let _theirs = UnixListener::bind(&path).unwrap();
        assert_eq!(file.remove().unwrap(), Removal::Replaced);
        assert!(
            UnixStream::connect(&path).is_ok(),
            "their socket still answers"
        );
    }
}
