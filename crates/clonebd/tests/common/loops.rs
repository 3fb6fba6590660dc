//! Loop devices over test files, detached on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use super::daemon::run;

/// A loop device over a file, detached on drop.
pub struct Loop(pub String);

impl Loop {
    /// Attaches `file` (scanning its partitions if `partitions`).
    pub fn attach(file: &Path, partitions: bool) -> Loop {
        let mut args = vec!["-f", "--show"];
        if partitions {
            args.push("-P");
        }
        args.push(file.to_str().expect("utf-8 path"));
        let dev = run("losetup", &args).trim().to_string();
        Loop(dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Whether the test may attach loop devices (root, /dev/loop-control); under CI it must.
pub fn can_use_loop_devices() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/loop-control").exists()
        || clonebd_testkit::machine::skip("loop devices need root and /dev/loop-control")
}
