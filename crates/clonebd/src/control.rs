//! The control socket: a unix socket (mode 0600) through which `clonebd status`, `table`,
//! `message`, `wait` and `finalize` talk to a running daemon.
//!
//! The protocol is one JSON object per line: the client sends a [`ControlRequest`], the
//! daemon answers with one [`ControlReply`] and closes the connection. Requests are capped
//! at 64 KiB.
//!
//! The socket is created and served through [`clonebd_io::socket`], as the NBD sockets are: a
//! stale socket file is replaced and a live one refused at start; stopping wakes the accept
//! loop without connecting to the path, and removes the file only if it is still ours.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use clonebd_core::errno::describe;
use clonebd_io::socket::{Acceptor, BindError, Removal, SocketFile, StopSignal, bind_unix};
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
    /// Finalize the clone: refused unless every region is hydrated; then commit, detach the
    /// source and serve every request straight from the destination.
    Finalize,
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
    /// The socket could not be created: a server answers on the path, something else is
    /// there, or binding failed.
    #[error("control socket {}: {error}", .path.display())]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        error: BindError,
    },
    /// The socket was created but could not be served.
    #[error("control socket {}: cannot serve it: {}", .path.display(), describe(.cause))]
    Serve {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        cause: io::Error,
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
    file: SocketFile,
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600: it is never reachable with a looser one) and
    /// serves it on a thread. A socket file left by a daemon that died is replaced; a path a
    /// server answers on, or where something other than a socket is, is refused.
    pub fn start(path: &Path, handler: Arc<dyn ControlHandler>) -> Result<Self, ControlError> {
        let serve_err = |cause| ControlError::Serve {
            path: path.to_path_buf(),
            cause,
        };
        let stop = Arc::new(StopSignal::new().map_err(serve_err)?);
        let (listener, file) =
            bind_unix(path, Some(0o600)).map_err(|error| ControlError::Bind {
                path: path.to_path_buf(),
                error,
            })?;
        let spawned = Acceptor::new(listener, Arc::clone(&stop)).and_then(|acceptor| {
            std::thread::Builder::new()
                .name("clonebd-control".into())
                .spawn(move || accept_loop(&acceptor, &handler))
        });
        match spawned {
            Ok(thread) => Ok(Self {
                file,
                stop,
                thread: Some(thread),
            }),
            Err(cause) => {
                remove_socket("control socket", &file);
                Err(serve_err(cause))
            }
        }
    }

    /// Stops serving and removes the socket file, if it is still ours.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_socket("control socket", &self.file);
    }
}

/// Removes a socket file we bound (`role` names it in the log), unless another has taken its
/// path since: that one is left alone, and the log says so.
pub(crate) fn remove_socket(role: &str, file: &SocketFile) {
    let path = file.path().display();
    match file.remove() {
        Ok(Removal::Removed) => {}
        Ok(Removal::Gone) => tracing::info!("{role} {path}: already removed"),
        Ok(Removal::Replaced) => {
            tracing::warn!("{role} {path}: another socket took the path; left it in place");
        }
        Err(e) => tracing::warn!("{role} {path}: cannot remove it: {}", describe(&e)),
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}

fn accept_loop(acceptor: &Acceptor<UnixListener>, handler: &Arc<dyn ControlHandler>) {
    loop {
        let conn = match acceptor.accept() {
            Ok(Some(conn)) => conn,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("control socket: accept failed: {}", describe(&e));
                // Out of descriptors and the like: back off rather than spin.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
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
    use std::os::unix::fs::PermissionsExt;

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
        let in_use = ControlServer::start(&p, Arc::new(Echo)).expect_err("in use");
        assert!(
            matches!(
                in_use,
                ControlError::Bind {
                    error: BindError::InUse,
                    ..
                }
            ),
            "{in_use}"
        );
        assert_eq!(
            in_use.to_string(),
            format!(
                "control socket {}: in use: a server answers on it",
                p.display()
            )
        );
        srv.stop();
        assert!(!p.exists());
        assert!(matches!(
            request(&p, &ControlRequest::Table),
            Err(ControlError::Connect { .. })
        ));
    }
}
