//! The control socket: a unix socket (mode 0600) through which `clonebd status`, `table`,
//! `message` and `wait` talk to a running daemon.
//!
//! The protocol is one JSON object per line: the client sends a [`ControlRequest`], the
//! daemon answers with one [`ControlReply`] and closes the connection. Requests are capped
//! at 64 KiB.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use clonebd_core::errno::describe;
use serde::{Deserialize, Serialize};
use thiserror::Error;

const MAX_REQUEST: u64 = 64 * 1024;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The dm-clone status line. Commits first unless `noflush` (as `dmsetup status`).
    Status {
        /// Do not commit first (`dmsetup status --noflush`).
        #[serde(default)]
        noflush: bool,
    },
    /// The status as JSON, with rate, ETA and counters.
    StatusJson {
        /// Do not commit first.
        #[serde(default)]
        noflush: bool,
    },
    /// The dm-clone table line.
    Table,
    /// A dm-clone message.
    Message {
        /// The message's words.
        words: Vec<String>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The output (a status or table line, or a JSON document).
    #[serde(default)]
    pub output: String,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

impl ControlReply {
    /// A success with `output`.
    pub fn ok(output: String) -> Self {
        Self {
            ok: true,
            output,
            error: None,
        }
    }

    /// A failure.
    pub fn err(error: String) -> Self {
        Self {
            ok: false,
            output: String::new(),
            error: Some(error),
        }
    }
}

/// Answers control requests.
pub trait ControlHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, req: ControlRequest) -> ControlReply;
}

/// Control socket errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The socket could not be created.
    #[error("control socket {}: cannot create it: {}", .path.display(), describe(.cause))]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        cause: io::Error,
    },
    /// Another daemon answers on the path.
    #[error("control socket {}: in use by a running clonebd", .path.display())]
    InUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// The daemon could not be reached.
    #[error("control socket {path}: cannot reach clonebd: {} (is `clonebd run --control {path}` running?)", describe(.cause), path = .path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        cause: io::Error,
    },
    /// The exchange failed half way.
    #[error("control socket {}: the exchange with clonebd failed: {}", .path.display(), describe(.cause))]
    Exchange {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        cause: io::Error,
    },
    /// The daemon's answer was not understood.
    #[error("control socket {}: unexpected answer from clonebd: {detail}", .path.display())]
    Protocol {
        /// The socket's path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// A running control socket.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600) and serves it on a thread.
    pub fn start(path: &Path, handler: Arc<dyn ControlHandler>) -> Result<Self, ControlError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            // A socket left by a daemon that died: nobody answers it.
            let _ = std::fs::remove_file(path);
        }
        // Bind under a temporary name, restrict it, then move it into place, so the socket
        // is never reachable with a looser mode.
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let bind_err = |cause| ControlError::Bind {
            path: path.to_path_buf(),
            cause,
        };
        let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        std::fs::rename(&tmp, path).map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("clonebd-control".into())
            .spawn(move || accept_loop(&listener, &stop2, &handler))
            .map_err(bind_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}

fn accept_loop(listener: &UnixListener, stop: &AtomicBool, handler: &Arc<dyn ControlHandler>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let h = Arc::clone(handler);
        let _ = std::thread::Builder::new()
            .name("clonebd-control-conn".into())
            .spawn(move || serve_one(conn, &*h));
    }
}

fn serve_one(conn: UnixStream, handler: &dyn ControlHandler) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn.take(MAX_REQUEST));
    let mut line = String::new();
    let reply = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<ControlRequest>(line.trim_end()) {
            Ok(req) => handler.handle(req),
            Err(e) => ControlReply::err(format!("malformed request: {e}")),
        },
        Err(e) => ControlReply::err(format!("cannot read request: {e}")),
    };
    let mut w = write_half;
    if let Ok(mut s) = serde_json::to_string(&reply) {
        s.push('\n');
        let _ = w.write_all(s.as_bytes());
    }
}

/// Sends one request to the daemon at `path` and returns its answer.
pub fn request(path: &Path, req: &ControlRequest) -> Result<ControlReply, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|cause| ControlError::Connect {
        path: path.to_path_buf(),
        cause,
    })?;
    let ex = |cause| ControlError::Exchange {
        path: path.to_path_buf(),
        cause,
    };
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(ex)?;
    let mut out = String::new();
    BufReader::new(s.take(16 << 20))
        .read_line(&mut out)
        .map_err(ex)?;
    serde_json::from_str(out.trim_end()).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl ControlHandler for Echo {
        fn handle(&self, req: ControlRequest) -> ControlReply {
            ControlReply::ok(format!("{req:?}"))
        }
    }

    #[test]
    fn control_socket_round_trip_and_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ctl");
        let srv = ControlServer::start(&p, Arc::new(Echo)).expect("start");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let r = request(&p, &ControlRequest::Table).expect("request");
        assert!(r.ok);
        assert_eq!(r.output, "Table");
        assert!(matches!(
            ControlServer::start(&p, Arc::new(Echo)),
            Err(ControlError::InUse { .. })
        ));
        srv.stop();
        assert!(!p.exists());
        assert!(matches!(
            request(&p, &ControlRequest::Table),
            Err(ControlError::Connect { .. })
        ));
    }
}
