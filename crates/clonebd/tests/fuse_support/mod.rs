//! What the FUSE tests share: the built binary run as a daemon, loop devices, mounts, each
//! undone by a drop guard so a failing test still leaves the machine clean.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether the test can run: as root (mount, losetup) with /dev/fuse. Prints why not.
pub fn can_run(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        eprintln!("{test}: skipped: needs root (mount, losetup)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("{test}: skipped: /dev/fuse is missing");
        return false;
    }
    true
}

/// Runs a command and returns its output; panics with its stderr if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    clonebd_testkit::machine::run_ok(cmd, args, 300)
}

/// stdout of a successful command, trimmed.
pub fn stdout(cmd: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run(cmd, args).stdout)
        .trim()
        .to_string()
}

/// Whether `path` (absolute) is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            let want = path.to_string_lossy().replace(' ', "\\040");
            t.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A running `clonebd run`, stopped (SIGTERM, then SIGKILL) on drop; a FUSE file it left
/// mounted is detached.
pub struct Daemon {
    child: Option<Child>,
    pub fuse: Option<PathBuf>,
    pub log: PathBuf,
}

/// `clonebd run` arguments with `--create` added when the `--metadata` file does not exist
/// yet: a new clone the first time, the same clone on every restart.
pub fn create_if_new<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let meta = out
        .iter()
        .position(|a| a == "--metadata")
        .and_then(|i| out.get(i + 1));
    if meta.is_some_and(|m| !Path::new(m).exists()) {
        out.push("--create".to_string());
    }
    out
}

impl Daemon {
    /// Starts `clonebd run ARGS` (with `--create` for a new clone) and waits until FILE (if
    /// `fuse`) is mounted, or until `ready` exists.
    pub fn start(args: &[&str], fuse: Option<&Path>, ready: Option<&Path>, log: &Path) -> Daemon {
        let logf = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_clonebd"))
            .arg("run")
            .args(create_if_new(args))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn clonebd");
        let mut d = Daemon {
            child: Some(child),
            fuse: fuse.map(Path::to_path_buf),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The log line, not the mount table: a dead mount may still be listed there.
            let up = fuse.is_none_or(|f| {
                is_mounted(f) && d.log_text().contains("serving the clone as the file")
            }) && ready.is_none_or(Path::exists);
            if up {
                return d;
            }
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                d.child = None;
                panic!("clonebd exited ({st}) before serving:\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "clonebd did not come up:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, and the exit status (waits up to 60 s).
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let st = self.wait(Duration::from_secs(60));
        st.unwrap_or_else(|| panic!("clonebd did not stop on SIGTERM:\n{}", self.log_text()))
    }

    /// SIGKILL: the daemon dies without cleaning up.
    pub fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.wait(Duration::from_secs(10));
        self.fuse = None;
    }

    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-TERM");
            if self.wait(Duration::from_secs(20)).is_none() {
                self.signal("-KILL");
                let _ = self.wait(Duration::from_secs(10));
            }
        }
        if let Some(f) = &self.fuse
            && is_mounted(f)
        {
            let _ = Command::new("umount").arg("-l").arg(f).status();
        }
    }
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(file: &Path, direct_io: bool, read_only: bool) -> Loop {
        let mut args = vec!["-f", "--show"];
        if direct_io {
            args.push("--direct-io=on");
        }
        if read_only {
            args.push("-r");
        }
        let f = file.to_string_lossy().into_owned();
        args.push(&f);
        Loop {
            dev: stdout("losetup", &args),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("losetup")
                .args(["-d", &self.dev])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A mounted file system, unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
    done: bool,
}

impl Mounted {
    pub fn mount(dev: &str, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).expect("mount dir");
        let d = dir.to_string_lossy().into_owned();
        run("mount", &["-o", opts, dev, &d]);
        Mounted {
            dir: dir.to_path_buf(),
            done: false,
        }
    }

    /// Unmounts now (asserting it worked).
    pub fn umount(mut self) {
        run("umount", &[&self.dir.to_string_lossy()]);
        self.done = true;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.done && is_mounted(&self.dir) {
            let d = self.dir.to_string_lossy().into_owned();
            if !Command::new("umount")
                .arg(&d)
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = Command::new("umount").args(["-l", &d]).status();
            }
        }
    }
}

/// Source, destination and metadata paths in a temporary directory.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Files {
        // Under the target directory rather than /tmp: a real disk file system, where
        // O_DIRECT works as it will in production.
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        Files {
            dir: tempfile::tempdir_in(base).expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}
