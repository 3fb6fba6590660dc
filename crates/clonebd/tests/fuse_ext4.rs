//! End to end: an ext4 file system on a clone exported as a FUSE file, through a loop
//! device, changed while background hydration runs, checked through the clone, then on
//! the destination alone once a restarted daemon has finished hydrating.
//!
//! Needs root, /dev/fuse, loop devices and e2fsprogs (as CI has); skips with a reason
//! otherwise.

mod fuse_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use fuse_support::{Daemon, Files, Loop, Mounted, can_run, is_mounted, pattern, run, stdout};

const SIZE: &str = "128M";

/// The source's files: name → contents.
fn source_files() -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for i in 0..24u64 {
        // Sizes from a few bytes to several MiB, so some span many regions.
        let len = match i % 4 {
            0 => 17 + i as usize,
            1 => 4096 * (i as usize + 1),
            2 => (1 << 20) + 123 * i as usize,
            _ => (3 << 20) + 7,
        };
        let name = if i % 3 == 0 {
            format!("dir{}/file{i}", i % 2)
        } else {
            format!("file{i}")
        };
        m.insert(name, pattern(i, len));
    }
    m
}

fn write_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in files {
        let p = root.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(&p, data).expect("write file");
    }
}

/// Every file of `want` has its contents under `root`, and nothing else is there.
fn check_tree(root: &Path, want: &BTreeMap<String, Vec<u8>>) {
    for (name, data) in want {
        let got = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            got == *data,
            "{name}: contents differ ({} vs {} bytes)",
            got.len(),
            data.len()
        );
    }
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readdir") {
            let e = e.expect("entry");
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "lost+found") {
                continue;
            }
            if e.file_type().expect("type").is_dir() {
                stack.push(p);
            } else {
                found.push(
                    p.strip_prefix(root)
                        .expect("prefix")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    found.sort();
    let names: Vec<String> = want.keys().cloned().collect();
    assert_eq!(
        found, names,
        "the file system holds other files than expected"
    );
}

/// `(hydrated, total)` regions from the dm-clone status line.
fn hydration(control: &str) -> (u64, u64) {
    let line = stdout(
        env!("CARGO_BIN_EXE_clonebd"),
        &["status", "--control", control],
    );
    // <start> <len> clone <meta bs> <used/total meta> <region sectors> <hydrated/total> ...
    let w: Vec<&str> = line.split_whitespace().collect();
    let (h, t) = w[6].split_once('/').expect("hydrated/total");
    (h.parse().expect("hydrated"), t.parse().expect("total"))
}

fn sha256(path: &Path) -> String {
    stdout("sha256sum", &[&path.to_string_lossy()])
}

#[test]
fn ext4_on_fuse_file_survives_changes_during_hydration_and_restart() {
    if !can_run("ext4_on_fuse_file_survives_changes_during_hydration_and_restart") {
        return;
    }
    let t0 = Instant::now();
    let f = Files::new();
    let original = source_files();
    write_tree(&f.path("tree"), &original);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            &f.s("tree"),
            &f.s("src.img"),
            SIZE,
        ],
    );
    run("truncate", &["-s", SIZE, &f.s("dst.img")]);
    let src_sum = sha256(&f.path("src.img"));
    let clone = f.path("clone.img");
    let ctl = f.s("ctl");
    let base = [
        "--source",
        &f.s("src.img"),
        "--dest",
        &f.s("dst.img"),
        "--metadata",
        &f.s("meta"),
        "--fuse",
        &f.s("clone.img"),
        "--control",
        &ctl,
    ];

    // Hydration limited to 4 MiB/s: it is still running while the file system changes.
    let mut args = base.to_vec();
    args.extend(["--hydration-rate-limit", "4m"]);
    let daemon = Daemon::start(&args, Some(&clone), None, &f.path("log1"));
    let after = {
        let lo = Loop::attach(&clone, true, false);
        let m = Mounted::mount(&lo.dev, &f.path("mnt"), "rw");
        check_tree(&m.dir, &original);

        let (h, total) = hydration(&ctl);
        assert!(
            h < total,
            "hydration already finished ({h}/{total}): nothing runs alongside"
        );

        // Change it: delete some old files, overwrite one in place, add new ones.
        let mut after = original.clone();
        for name in ["file1", "file2", "dir1/file3", "file7"] {
            std::fs::remove_file(m.dir.join(name)).expect("delete");
            after.remove(name);
        }
        let overwritten = pattern(1000, (2 << 20) + 5);
        std::fs::write(m.dir.join("file5"), &overwritten).expect("overwrite");
        after.insert("file5".to_string(), overwritten);
        for i in 0..12u64 {
            let name = format!("new/n{i}");
            let data = pattern(500 + i, 4096 * (i as usize * 37 % 300) + 11);
            std::fs::create_dir_all(m.dir.join("new")).expect("mkdir");
            std::fs::write(m.dir.join(&name), &data).expect("new file");
            after.insert(name, data);
        }
        run("sync", &[]);
        check_tree(&m.dir, &after);
        let (h2, total2) = hydration(&ctl);
        assert!(
            h2 < total2,
            "hydration finished before the changes were done"
        );
        m.umount();

        // Through the clone: a clean file system.
        run("e2fsck", &["-fn", &lo.dev]);
        after
    };
    let st = daemon.stop();
    assert!(st.success(), "clonebd exited with {st}");
    assert!(
        !is_mounted(&clone),
        "the FUSE file is still mounted after SIGTERM"
    );

    // Restart without a limit and let hydration finish.
    let daemon = Daemon::start(&base, Some(&clone), Some(Path::new(&ctl)), &f.path("log2"));
    run(
        env!("CARGO_BIN_EXE_clonebd"),
        &[
            "wait",
            "--control",
            &ctl,
            "--timeout",
            "120",
            "--no-progress",
        ],
    );
    let (h, total) = hydration(&ctl);
    assert_eq!(h, total, "hydration did not finish");
    let st = daemon.stop();
    assert!(st.success(), "clonebd exited with {st}");

    // The destination on its own: clean, with the new files and without the deleted ones.
    run("e2fsck", &["-fn", &f.s("dst.img")]);
    {
        let lo = Loop::attach(&f.path("dst.img"), false, true);
        let m = Mounted::mount(&lo.dev, &f.path("mnt-dst"), "ro");
        check_tree(&m.dir, &after);
        m.umount();
    }
    assert_eq!(sha256(&f.path("src.img")), src_sum, "the source changed");
    eprintln!("ext4 end to end: {:.1} s", t0.elapsed().as_secs_f64());
}
