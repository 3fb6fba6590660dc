//! Real servers the remote-source tests start on 127.0.0.1 and stop when dropped: nginx
//! (from `nginx-light`, in the foreground, with a configuration the test writes) serving a
//! directory with byte ranges and ETags, and moto's S3 server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::free_port;

/// A server process, killed on drop.
pub struct Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its log.
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn wait_for_port(child: &mut Child, port: u16, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "server exited with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "server not listening on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a program is on PATH (under CI it must be: a missing one fails).
pub fn need(program: &str) -> bool {
    super::daemon::have(program)
}

/// nginx serving `root` on a free port of 127.0.0.1; `extra` goes into its `server` block.
pub fn nginx(root: &Path, extra: &str) -> Server {
    let dir = root.join(format!(".nginx-{}", free_port()));
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let port = free_port();
    let log = dir.join("error.log");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 100000;\n  server {{\n    listen 127.0.0.1:{port};\n    root {r};\n    {extra}\n  }}\n}}\n",
            d = dir.display(),
            r = root.display(),
        ),
    )
    .expect("nginx.conf");
    let mut child = Command::new("nginx")
        .args(["-e", &log.display().to_string(), "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    wait_for_port(&mut child, port, &log);
    Server { child, port, log }
}
