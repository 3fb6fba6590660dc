//! `clonebd demo` runs its whole scenario and verifies it: it must exit 0 and say so.

use std::process::Command;

#[test]
fn demo_runs_and_every_check_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_clonebd"))
        .args([
            "demo",
            "--size",
            "16m",
            "--region-size",
            "4k",
            "--rate-limit",
            "0",
            "--keep",
        ])
        .arg(dir.path())
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Demo complete: every check passed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hydrated regions (clonebd:hydrated): 3, 10, 20-22, 40, 50-51, 60-63"),
        "{stdout}"
    );
    // The kept files: a destination equal to... what the demo verified; a clean metadata file.
    let meta = dir.path().join("clone.meta");
    let check = Command::new(env!("CARGO_BIN_EXE_clonebd"))
        .arg("check")
        .arg(&meta)
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
