//! Which storage a path names, so that a clone's three roles (source, destination,
//! metadata) never share any.
//!
//! Two paths can reach the same bytes in many ways: the same name, a symbolic link, a hard
//! link, a loop device over the file, a partition and its whole disk, a device-mapper or md
//! device over another, a file on a file system that lives on the other device. Writing one
//! then changes the other: the source gets written (which clonebd promises never to do), or
//! the metadata gets formatted over the data. [`Identity::of`] follows links and records
//! what a path's storage lies on (from `stat`, `/sys/dev/block` and the loop driver), and
//! [`Identity::overlap`] says how two of them meet, if they do.
//!
//! Only reads are made here: `stat`, sysfs, and a read-only open of a loop device for
//! `LOOP_GET_STATUS64`.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A piece of storage: a file (by device and inode) or a block device (by number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    /// A regular file: the device numbers of its file system and its inode.
    File {
        /// `major:minor` of the file system's device.
        dev: (u32, u32),
        /// The inode.
        ino: u64,
    },
    /// A block device: its `major:minor`.
    Block((u32, u32)),
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::File { dev, ino } => write!(f, "inode {ino} on {}:{}", dev.0, dev.1),
            Node::Block((maj, min)) => write!(f, "block device {maj}:{min}"),
        }
    }
}

/// How a node rests on another one beneath it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// A file on the file system of a device.
    FileOn,
    /// A partition of a whole disk.
    PartitionOf,
    /// A loop device over a file.
    LoopOver,
    /// A device-mapper, md or other stacked device over another device.
    StackedOn,
    /// Further down: through one of the above, on a device that in turn rests on this one.
    StoredOn,
}

impl Relation {
    fn words(self) -> &'static str {
        match self {
            Relation::FileOn => "is a file on",
            Relation::PartitionOf => "is a partition of",
            Relation::LoopOver => "is a loop device over",
            Relation::StackedOn => "is a device built on",
            Relation::StoredOn => "is stored on",
        }
    }
}

/// What a path names, after following links, and everything its storage lies on.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The path as given.
    pub path: PathBuf,
    /// The storage it names.
    pub node: Node,
    /// What that storage lies on, nearest first, each with how.
    pub below: Vec<(Node, Relation)>,
}

/// How two identities meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Both name the same file or device.
    Same(Node),
    /// The first lies on the second.
    FirstOnSecond(Relation),
    /// The second lies on the first.
    SecondOnFirst(Relation),
}

impl Overlap {
    /// The overlap as a sentence between two described paths: "A is a partition of B".
    pub fn sentence(&self, first: &str, second: &str) -> String {
        match self {
            Overlap::Same(Node::File { .. }) => format!("{first} and {second} are the same file"),
            Overlap::Same(Node::Block(_)) => format!("{first} and {second} are the same device"),
            Overlap::FirstOnSecond(r) => format!("{first} {} {second}", r.words()),
            Overlap::SecondOnFirst(r) => format!("{second} {} {first}", r.words()),
        }
    }
}

fn dev_pair(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

impl Identity {
    /// The identity of `path`. `Ok(None)` when nothing exists there (a file still to be
    /// created overlaps nothing).
    pub fn of(path: &Path) -> io::Result<Option<Identity>> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let node = if meta.file_type().is_block_device() {
            Node::Block(dev_pair(meta.rdev()))
        } else {
            Node::File {
                dev: dev_pair(meta.dev()),
                ino: meta.ino(),
            }
        };
        let mut below = Vec::new();
        collect_below(node, path, &mut below, 0);
        Ok(Some(Identity {
            path: path.to_path_buf(),
            node,
            below,
        }))
    }

    /// How `self` and `other` share storage, if they do.
    pub fn overlap(&self, other: &Identity) -> Option<Overlap> {
        if self.node == other.node {
            return Some(Overlap::Same(self.node));
        }
        if let Some((_, r)) = self.below.iter().find(|(n, _)| *n == other.node) {
            return Some(Overlap::FirstOnSecond(*r));
        }
        if let Some((_, r)) = other.below.iter().find(|(n, _)| *n == self.node) {
            return Some(Overlap::SecondOnFirst(*r));
        }
        None
    }
}

/// Stacks deeper than this are not followed (a cycle cannot happen in sysfs, but a bound
/// costs nothing).
const MAX_DEPTH: usize = 16;

fn push(below: &mut Vec<(Node, Relation)>, node: Node, rel: Relation, depth: usize) -> bool {
    if below.iter().any(|(n, _)| *n == node) {
        return false;
    }
    below.push((node, if depth == 0 { rel } else { Relation::StoredOn }));
    true
}

/// Adds what `node` lies on. `path` opens it (for a loop device's ioctl) at depth 0; deeper
/// devices are opened through `/dev/block/MAJ:MIN`.
fn collect_below(node: Node, path: &Path, below: &mut Vec<(Node, Relation)>, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    match node {
        Node::File { dev, .. } => {
            // Major 0 is an anonymous device (tmpfs, overlayfs, btrfs subvolumes): no
            // block device is under it that a path could name.
            if dev.0 != 0 {
                let d = Node::Block(dev);
                if push(below, d, Relation::FileOn, depth) {
                    collect_below(d, &block_path(dev), below, depth + 1);
                }
            }
        }
        Node::Block(dev) => {
            let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
            let Ok(real) = std::fs::canonicalize(&sys) else {
                return;
            };
            if real.join("partition").exists()
                && let Some(parent) = real.parent().and_then(|p| read_dev(&p.join("dev")))
            {
                let d = Node::Block(parent);
                if push(below, d, Relation::PartitionOf, depth) {
                    collect_below(d, &block_path(parent), below, depth + 1);
                }
            }
            if let Ok(entries) = std::fs::read_dir(real.join("slaves")) {
                for e in entries.flatten() {
                    if let Some(s) = read_dev(&e.path().join("dev")) {
                        let d = Node::Block(s);
                        if push(below, d, Relation::StackedOn, depth) {
                            collect_below(d, &block_path(s), below, depth + 1);
                        }
                    }
                }
            }
            if real.join("loop").exists()
                && let Some(f) = loop_backing(path)
                && push(below, f, Relation::LoopOver, depth)
            {
                collect_below(f, path, below, depth + 1);
            }
        }
    }
}

fn block_path(dev: (u32, u32)) -> PathBuf {
    PathBuf::from(format!("/dev/block/{}:{}", dev.0, dev.1))
}

fn read_dev(p: &Path) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(p).ok()?;
    let (maj, min) = s.trim().split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// `struct loop_info64` of `<linux/loop.h>`; only the backing file's numbers are read.
#[repr(C)]
#[allow(dead_code)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// The file a loop device reads and writes, by device and inode (which survive a rename
/// or an unlinked name, unlike `loop/backing_file`).
fn loop_backing(path: &Path) -> Option<Node> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` through the pointer, which
    // points at a live local of exactly that layout (#[repr(C)], same field order and sizes
    // as <linux/loop.h>); the fd stays open for the call.
    let rc = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    };
    if rc != 0 {
        // ENXIO: a loop device with nothing attached.
        return None;
    }
    Some(Node::File {
        dev: dev_pair(info.lo_device),
        ino: info.lo_inode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_the_same_file_and_distinct_files_do_not_overlap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        std::fs::write(&a, b"a").expect("write");
        std::fs::write(&b, b"b").expect("write");
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&a, &sym).expect("symlink");
        let hard = dir.path().join("hard");
        std::fs::hard_link(&a, &hard).expect("link");
        let id = |p: &Path| Identity::of(p).expect("stat").expect("exists");
        let (ia, ib) = (id(&a), id(&b));
        assert_eq!(ia.overlap(&ib), None);
        assert!(matches!(
            ia.overlap(&id(&sym)),
            Some(Overlap::Same(Node::File { .. }))
        ));
        assert!(matches!(id(&hard).overlap(&ia), Some(Overlap::Same(_))));
        assert!(
            Identity::of(&dir.path().join("missing"))
                .expect("ok")
                .is_none()
        );
        assert_eq!(
            Overlap::Same(ia.node).sentence("source a", "destination sym"),
            "source a and destination sym are the same file"
        );
    }
}
