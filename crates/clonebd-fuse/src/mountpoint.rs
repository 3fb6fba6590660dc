//! The mount point: the regular file the clone is mounted over, created if missing, and
//! what a daemon that died left there.
//!
//! A daemon killed without unmounting leaves a FUSE mount whose server is gone: `stat` on
//! it fails with `ENOTCONN` (`ECONNABORTED` if the connection was aborted), and
//! `/proc/self/mountinfo` still lists it. [`prepare`] finds such a mount and:
//! - unmounts it lazily when nothing uses it any more (`umount -l`, or `fusermount3 -u -z`
//!   when not root), which is safe: the mount serves nothing, and every I/O on it fails;
//! - refuses, naming the exact commands, when a loop device still has it as backing file
//!   (the loop device and whatever is mounted on it must be released by their owner first);
//! - refuses, naming the command, when the unmount itself fails.
//!
//! A mount point that a live process still serves is refused too: that is another daemon's.

use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::FuseError;

/// One line of `/proc/self/mountinfo`, the fields used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The file system type (`fuse`, `fuse.clonebd`, `ext4`, ...).
    pub fstype: String,
    /// The mount source.
    pub source: String,
}

impl MountEntry {
    /// Whether this is a FUSE mount.
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of `/proc/self/mountinfo`; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            // id parent maj:min root mount_point options [optional...] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next().unwrap_or("");
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The topmost mount at `path` (an absolute path as mountinfo shows it), if any.
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// `path` made absolute without following its last component (which may be a dead mount
/// that cannot be looked at).
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.canonicalize()?,
        _ => std::env::current_dir()?,
    };
    Ok(parent.join(name))
}

/// Whether an error from looking at a path means "a FUSE mount whose server is gone".
pub fn is_dead_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// Loop devices whose backing file is `path`, as `/dev/loopN`.
pub fn loop_users(path: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let want = path.to_string_lossy().into_owned();
    let mut users: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            (backing == want).then(|| format!("/dev/{name}"))
        })
        .collect();
    users.sort();
    users
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Quotes `p` for a shell if it needs it.
pub fn shell_quote(p: &Path) -> String {
    let s = p.to_string_lossy();
    if s.bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command that lazily unmounts `path` for the current user.
pub fn unmount_command(path: &Path) -> String {
    if is_root() {
        format!("umount -l {}", shell_quote(path))
    } else {
        format!("fusermount3 -u -z {}", shell_quote(path))
    }
}

/// Lazily unmounts `path`: `umount2(MNT_DETACH)` as root, `fusermount3 -u -z` otherwise.
pub fn detach(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            let out = Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(path)
                .output()?;
            if out.status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "fusermount3 -u -z failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

/// What [`prepare`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// The file was there, a regular file.
    Existing,
    /// The file was missing and was created (mode 0600, empty).
    Created,
    /// A stale mount left by a dead daemon was unmounted; the file under it is used.
    CleanedStale,
}

/// Makes `path` ready to be mounted over: creates it if missing, cleans up a stale FUSE
/// mount left by a dead daemon when that is safe, and refuses otherwise. Returns the
/// absolute path and what was done.
pub fn prepare(path: &Path) -> Result<(PathBuf, Prepared), FuseError> {
    let abs = absolute(path).map_err(|source| FuseError::Inspect {
        path: path.to_path_buf(),
        source,
    })?;
    let mut cleaned = false;
    // A stale mount may hide another stale mount under it; a few rounds clear a stack.
    for _ in 0..4 {
        match std::fs::symlink_metadata(&abs) {
            Ok(meta) => {
                if let Some(m) = mount_at(&abs).map_err(|source| FuseError::Inspect {
                    path: abs.clone(),
                    source,
                })? {
                    return Err(FuseError::AlreadyMounted {
                        path: abs,
                        fstype: m.fstype,
                    });
                }
                let ft = meta.file_type();
                if !ft.is_file() {
                    let what = if ft.is_dir() {
                        "a directory"
                    } else if ft.is_symlink() {
                        "a symbolic link"
                    } else if ft.is_block_device() {
                        "a block device"
                    } else {
                        "not a regular file"
                    };
                    return Err(FuseError::NotAFile { path: abs, what });
                }
                let how = if cleaned {
                    Prepared::CleanedStale
                } else {
                    Prepared::Existing
                };
                return Ok((abs, how));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&abs)
                    .map_err(|source| FuseError::Create {
                        path: abs.clone(),
                        source,
                    })?;
                return Ok((abs, Prepared::Created));
            }
            Err(e) if is_dead_connection(&e) => {
                clean_stale(&abs)?;
                cleaned = true;
            }
            Err(source) => {
                return Err(FuseError::Inspect { path: abs, source });
            }
        }
    }
    Err(FuseError::StaleCleanup {
        command: unmount_command(&abs),
        path: abs,
        source: io::Error::other("still a dead mount after several unmounts"),
    })
}

/// Unmounts the dead FUSE mount at `abs` if nothing uses it, or refuses with the commands
/// that release it.
fn clean_stale(abs: &Path) -> Result<(), FuseError> {
    let users = loop_users(abs);
    if !users.is_empty() {
        let detach_loops: Vec<String> = users.iter().map(|d| format!("losetup -d {d}")).collect();
        return Err(FuseError::StaleInUse {
            path: abs.to_path_buf(),
            command: format!(
                "umount any file system mounted from {}; {}; {}",
                users.join(", "),
                detach_loops.join("; "),
                unmount_command(abs)
            ),
            users,
        });
    }
    tracing::warn!(
        "{} is a FUSE mount left by a daemon that died; unmounting it",
        abs.display()
    );
    detach(abs).map_err(|source| FuseError::StaleCleanup {
        path: abs.to_path_buf(),
        command: unmount_command(abs),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
35 22 0:31 / /tmp/my\\040dir/clone.img rw,nosuid,nodev,relatime shared:20 - fuse.clonebd clonebd rw,user_id=0,group_id=0
36 22 0:32 / /mnt/x rw - fuse /dev/fuse rw,user_id=0
bogus line
";

    #[test]
    fn parse_mountinfo_reads_escaped_mount_points_and_types() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_point, PathBuf::from("/tmp/my dir/clone.img"));
        assert_eq!(m[1].fstype, "fuse.clonebd");
        assert_eq!(m[1].source, "clonebd");
        assert!(m[1].is_fuse());
        assert!(m[2].is_fuse());
        assert!(!m[0].is_fuse());
    }

    #[test]
    fn unescape_leaves_plain_backslashes_alone() {
        assert_eq!(unescape(r"a\134b\040c"), r"a\b c");
        assert_eq!(unescape(r"a\9x\04"), r"a\9x\04");
    }

    #[test]
    fn shell_quote_quotes_only_when_needed() {
        assert_eq!(shell_quote(Path::new("/tmp/a.img")), "/tmp/a.img");
        assert_eq!(shell_quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }

    #[test]
    fn prepare_creates_a_missing_file_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("clone.img");
        let (abs, how) = prepare(&p).expect("prepare");
        assert_eq!(how, Prepared::Created);
        assert_eq!(
            abs,
            dir.path().canonicalize().expect("dir").join("clone.img")
        );
        let meta = std::fs::metadata(&p).expect("created");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(prepare(&p).expect("again").1, Prepared::Existing);
    }

    #[test]
    fn prepare_refuses_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = prepare(dir.path()).expect_err("a directory");
        assert!(err.to_string().contains("a directory"), "{err}");
    }
}
