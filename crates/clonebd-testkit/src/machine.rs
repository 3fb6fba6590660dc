//! What a test needs from the machine: programs on `PATH` (qemu-nbd, nbdinfo, fio, nginx,
//! ...), root, loop devices. Where one is missing, a test skips, saying why, on a
//! developer's machine; under CI (`CI=true`), which installs everything the tests use, it
//! fails instead, so that nothing CI reports green was silently left out.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Whether the tests run under CI (`CI=true`).
pub fn under_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A test cannot run here, for `why`: panics under CI; otherwise prints
/// `SKIPPED: why` and returns `false`, for the test to return early
/// (`if !can_run { return skip(...) }`).
pub fn skip(why: &str) -> bool {
    assert!(!under_ci(), "{why}, and under CI no test may skip for it");
    println!("SKIPPED: {why}");
    false
}

/// The path of `program` on `PATH`, if it is there (without skipping).
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// Whether `program` is on `PATH`; if not, [`skip`] naming it and `hint` (how to install
/// it).
pub fn have(program: &str, hint: &str) -> bool {
    which(program).is_some() || skip(&format!("{program} is not installed ({hint})"))
}

/// Runs `program` with `args` under `timeout SECONDS` (a client that hangs must not hang the
/// test), and returns what it did whatever its status. Panics only if it cannot be started.
pub fn run_status(program: &str, args: &[&str], seconds: u32) -> Output {
    Command::new("timeout")
        .arg(seconds.to_string())
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// As [`run_status`], and it must succeed: panics with its status and both outputs if not.
pub fn run_ok(program: &str, args: &[&str], seconds: u32) -> Output {
    let out = run_status(program, args, seconds);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_on_path_is_found_and_one_that_is_not_is_not() {
        assert!(which("sh").is_some(), "sh is on every PATH");
        assert!(which("clonebd-no-such-program").is_none());
        if !under_ci() {
            assert!(!have("clonebd-no-such-program", "nowhere"));
        }
    }

    #[test]
    fn programs_run_under_a_timeout_and_failures_show_their_output() {
        let out = run_ok("sh", &["-c", "echo hello"], 10);
        assert_eq!(out.stdout, b"hello\n");
        assert!(!run_status("sh", &["-c", "exit 3"], 10).status.success());
        let r = std::panic::catch_unwind(|| run_ok("sh", &["-c", "echo why >&2; exit 3"], 10));
        let msg = r
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("why"), "{msg}");
        // `timeout` ends what runs too long (status 124).
        assert_eq!(run_status("sleep", &["5"], 1).status.code(), Some(124));
    }

    #[test]
    fn under_ci_a_missing_program_fails_the_test() {
        if !under_ci() {
            return;
        }
        let r = std::panic::catch_unwind(|| have("clonebd-no-such-program", "nowhere"));
        assert!(r.is_err(), "a skip under CI must fail");
    }
}
