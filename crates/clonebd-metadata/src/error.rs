//! Structured errors: every failure names what was found and where, and never carries free
//! text, so callers match on variants, never on text.
//!
//! Where the kernel logs a message for the same failure, `Display` prints the kernel's exact
//! text (SPEC 11: "Superblock check failed: blocknr 17717925331114078289, expected 0",
//! "Region and/or target size don't match the ones in metadata", ...).

use std::fmt;
use std::io;

use clonebd_core::GeometryError;
use thiserror::Error;

/// The kinds of metadata block, each with its own checksum salt and validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockKind {
    /// The dm-clone superblock (block 0).
    Superblock,
    /// A persistent-data btree node.
    BtreeNode,
    /// An array block of the bitset.
    ArrayBlock,
    /// The metadata space map's index block.
    SpaceMapIndex,
    /// A metadata space map bitmap block.
    SpaceMapBitmap,
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Superblock => "superblock",
            BlockKind::BtreeNode => "btree node",
            BlockKind::ArrayBlock => "array block",
            BlockKind::SpaceMapIndex => "space map index",
            BlockKind::SpaceMapBitmap => "space map bitmap",
        })
    }
}

/// Which device operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Reading a block.
    Read,
    /// Writing a block.
    Write,
    /// Flushing the device's write cache.
    Flush,
    /// Querying the device's size.
    Size,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Size => "size query",
        })
    }
}

/// What is structurally wrong with a block whose checksum is fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// A btree node's flags are neither internal (1) nor leaf (2).
    NodeFlags {
        /// The flags found.
        flags: u32,
    },
    /// A btree node's `max_entries` does not fit in a block (or is zero).
    NodeMaxEntries {
        /// The value found.
        max_entries: u32,
        /// The node's value size.
        value_size: u32,
    },
    /// A btree node holds more entries than its `max_entries`.
    NodeTooManyEntries {
        /// `nr_entries` found.
        nr_entries: u32,
        /// `max_entries` found.
        max_entries: u32,
    },
    /// A btree node's value size is not the one its tree uses.
    NodeValueSize {
        /// The value size found.
        found: u32,
        /// The value size expected.
        expected: u32,
    },
    /// A non-root btree node has no entries.
    EmptyNode,
    /// A btree node's keys are not strictly ascending.
    KeysOutOfOrder {
        /// Index of the first key not greater than its predecessor.
        index: u32,
    },
    /// A key lies outside the range its parent assigns to the node.
    KeyOutOfRange {
        /// The offending key.
        key: u64,
        /// Smallest key allowed.
        low: u64,
        /// First key not allowed, if bounded.
        high: Option<u64>,
    },
    /// Leaves of one btree are at different depths.
    UnevenDepth,
    /// The btree is deeper than any valid tree can be (or contains a cycle).
    TooDeep,
    /// A block number points past the end of the metadata.
    BlockOutOfBounds {
        /// The block number.
        target: u64,
        /// Number of metadata blocks.
        nr_blocks: u64,
    },
    /// An array block's header is not the one dm-bitset writes (509 entries of 8 bytes).
    ArrayHeader {
        /// `max_entries` found.
        max_entries: u32,
        /// `nr_entries` found.
        nr_entries: u32,
        /// `value_size` found.
        value_size: u32,
    },
    /// The bitset's array block keys are not `0, 1, 2, ...`.
    ArrayKeys {
        /// The key expected at this position.
        expected: u64,
        /// The key found.
        found: u64,
    },
    /// The bitset holds a different number of words than the geometry needs.
    ArrayLength {
        /// Words needed for `nr_regions` bits.
        expected_words: u64,
        /// Words found.
        found_words: u64,
    },
    /// An array block has a different number of entries than its position requires.
    ArrayBlockEntries {
        /// Index of the array block.
        index: u64,
        /// Entries expected.
        expected: u32,
        /// Entries found.
        found: u32,
    },
    /// The space map root describes no blocks or more than the device holds.
    SpaceMapSize {
        /// `nr_blocks` in the superblock.
        nr_blocks: u64,
        /// Blocks the device holds (capped at the space map's maximum).
        device_blocks: u64,
    },
    /// A space map index entry points at no bitmap block.
    MissingBitmap {
        /// Index of the entry.
        index: u32,
    },
    /// A reference count cannot be decremented below zero.
    CountUnderflow {
        /// The block whose count is already zero.
        target: u64,
    },
    /// The superblock holds bytes where the format has only zeros.
    SuperblockPadding,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Corruption::NodeFlags { flags } => {
                write!(f, "node is neither internal nor leaf (flags {flags})")
            }
            Corruption::NodeMaxEntries {
                max_entries,
                value_size,
            } => write!(
                f,
                "max_entries {max_entries} with {value_size}-byte values does not fit in a block"
            ),
            Corruption::NodeTooManyEntries {
                nr_entries,
                max_entries,
            } => write!(f, "nr_entries {nr_entries} > max_entries {max_entries}"),
            Corruption::NodeValueSize { found, expected } => {
                write!(f, "value size {found}, expected {expected}")
            }
            Corruption::EmptyNode => f.write_str("non-root node has no entries"),
            Corruption::KeysOutOfOrder { index } => {
                write!(f, "key {index} is not greater than the one before it")
            }
            Corruption::KeyOutOfRange { key, low, high } => match high {
                Some(h) => write!(f, "key {key} outside the parent's range [{low}, {h})"),
                None => write!(f, "key {key} below the parent's bound {low}"),
            },
            Corruption::UnevenDepth => f.write_str("leaves at different depths"),
            Corruption::TooDeep => f.write_str("tree too deep (or cyclic)"),
            Corruption::BlockOutOfBounds { target, nr_blocks } => write!(
                f,
                "points at block {target}, past the end of the metadata ({nr_blocks} blocks)"
            ),
            Corruption::ArrayHeader {
                max_entries,
                nr_entries,
                value_size,
            } => write!(
                f,
                "array block header max_entries {max_entries}, nr_entries {nr_entries}, \
                 value_size {value_size} (expected 509 entries of 8 bytes)"
            ),
            Corruption::ArrayKeys { expected, found } => {
                write!(f, "array block key {found} where {expected} was expected")
            }
            Corruption::ArrayLength {
                expected_words,
                found_words,
            } => write!(
                f,
                "bitset holds {found_words} words, the geometry needs {expected_words}"
            ),
            Corruption::ArrayBlockEntries {
                index,
                expected,
                found,
            } => write!(
                f,
                "array block {index} holds {found} entries, expected {expected}"
            ),
            Corruption::SpaceMapSize {
                nr_blocks,
                device_blocks,
            } => write!(
                f,
                "space map covers {nr_blocks} blocks, the device holds {device_blocks}"
            ),
            Corruption::MissingBitmap { index } => {
                write!(f, "index entry {index} points at no bitmap block")
            }
            Corruption::CountUnderflow { target } => {
                write!(f, "reference count of block {target} is already zero")
            }
            Corruption::SuperblockPadding => {
                f.write_str("non-zero bytes after the last superblock field")
            }
        }
    }
}

/// A valid kernel format feature that clonebd does not implement (dm-clone never uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// A block shared more than twice (reference count above 2, kept in the space map's
    /// reference-count btree). dm-clone never shares blocks.
    RefCountAboveTwo {
        /// The block.
        block: u64,
    },
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::RefCountAboveTwo { block } => write!(
                f,
                "block {block} would need a reference count above 2, which dm-clone never uses"
            ),
        }
    }
}

/// Everything that can go wrong with dm-clone metadata.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// A block does not hold its own block number (the kernel's first check).
    #[error("{}", WrongLocationText(*kind, *block, *found))]
    WrongLocation {
        /// The type the block was read as.
        kind: BlockKind,
        /// Where it was read from.
        block: u64,
        /// The block number stored in it.
        found: u64,
    },
    /// The superblock's magic number is not dm-clone's.
    #[error("Superblock check failed: magic {found}, expected {expected}")]
    BadMagic {
        /// The magic found.
        found: u64,
        /// dm-clone's magic, 0x8af27f64.
        expected: u64,
    },
    /// A block's checksum does not match its contents.
    #[error("{}", ChecksumText(*kind, *block, *stored, *computed))]
    ChecksumMismatch {
        /// The type the block was read as.
        kind: BlockKind,
        /// Where it was read from.
        block: u64,
        /// The checksum stored in the block.
        stored: u32,
        /// The checksum of its contents.
        computed: u32,
    },
    /// The metadata version is not one clonebd (and the kernel) supports.
    #[error(
        "Clone metadata version {found} found, but only versions between {min} and {max} supported."
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
        /// Lowest supported.
        min: u32,
        /// Highest supported.
        max: u32,
    },
    /// The region size or clone length differs from the ones in the metadata.
    #[error("Region and/or target size don't match the ones in metadata")]
    GeometryMismatch {
        /// Region size stored in the metadata (sectors).
        on_disk_region_sectors: u64,
        /// Clone length stored in the metadata (sectors).
        on_disk_target_sectors: u64,
        /// Region size asked for (sectors).
        requested_region_sectors: u64,
        /// Clone length asked for (sectors).
        requested_target_sectors: u64,
    },
    /// The superblock stores a region size or length no valid clone can have.
    #[error("the superblock's geometry is invalid: {0}")]
    InvalidGeometry(#[from] GeometryError),
    /// The metadata device is too small to hold the bitmap for this many regions.
    #[error(
        "metadata device too small: it has {size_bytes} bytes, but {nr_regions} regions need \
         at least {needed_bytes} bytes ({needed_mib} MiB) of metadata",
        needed_mib = needed_bytes.div_ceil(1 << 20)
    )]
    DeviceTooSmall {
        /// Size of the device.
        size_bytes: u64,
        /// Size needed.
        needed_bytes: u64,
        /// Regions of the clone.
        nr_regions: u64,
    },
    /// The device holds no metadata and was opened read-only, so it cannot be formatted.
    #[error(
        "the metadata device is blank (its first 4096 bytes are zero) and read-only: nothing to open"
    )]
    NotFormatted,
    /// The store is read-only; nothing was written.
    #[error("metadata is read-only: commit refused, nothing written")]
    ReadOnly,
    /// A previous commit failed; the on-disk state must be re-read with `abort()` first.
    #[error("a previous metadata commit failed: abort() must reopen the metadata first")]
    AbortRequired,
    /// A region number past the end of the clone.
    #[error("Region {region} out of range (total number of regions {nr_regions})")]
    RegionOutOfRange {
        /// The region.
        region: u64,
        /// Regions of the clone.
        nr_regions: u64,
    },
    /// A hydration map of the wrong size was passed.
    #[error("hydration map covers {found} regions, the metadata {expected}")]
    MapSizeMismatch {
        /// Regions of the metadata.
        expected: u64,
        /// Regions of the map.
        found: u64,
    },
    /// Every metadata block is in use.
    #[error("out of metadata space: no free block among {nr_blocks}")]
    NoSpace {
        /// Blocks of the metadata space map.
        nr_blocks: u64,
    },
    /// A block passed its checksum but its contents are invalid.
    #[error("corrupt {kind} at block {block}: {reason}")]
    Corrupt {
        /// The type of the block.
        kind: BlockKind,
        /// Where it lives.
        block: u64,
        /// What is wrong.
        reason: Corruption,
    },
    /// The metadata uses a format feature clonebd does not implement.
    #[error("unsupported metadata: {0}")]
    Unsupported(Unsupported),
    /// The device failed.
    #[error("metadata device {op} failed at block {block}: {}", clonebd_core::errno::describe(.source))]
    Io {
        /// The operation.
        op: IoOp,
        /// The block (0 for flushes).
        block: u64,
        /// The device's error.
        #[source]
        source: io::Error,
    },
}

impl MetadataError {
    pub(crate) fn corrupt(kind: BlockKind, block: u64, reason: Corruption) -> Self {
        MetadataError::Corrupt {
            kind,
            block,
            reason,
        }
    }
}

struct WrongLocationText(BlockKind, u64, u64);

impl fmt::Display for WrongLocationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let WrongLocationText(kind, block, found) = *self;
        match kind {
            // The kernel's text (dm-clone's `sb_check`).
            BlockKind::Superblock => write!(
                f,
                "Superblock check failed: blocknr {found}, expected {block}"
            ),
            _ => write!(f, "{kind} at block {block} claims to be block {found}"),
        }
    }
}

struct ChecksumText(BlockKind, u64, u32, u32);

impl fmt::Display for ChecksumText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ChecksumText(kind, block, stored, computed) = *self;
        match kind {
            // The kernel's text: it prints the computed checksum first.
            BlockKind::Superblock => write!(
                f,
                "Superblock check failed: checksum {computed}, expected {stored}"
            ),
            _ => write!(
                f,
                "{kind} checksum mismatch at block {block}: stored {stored:#010x}, \
                 computed {computed:#010x}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_location_prints_the_kernel_text() {
        let e = MetadataError::WrongLocation {
            kind: BlockKind::Superblock,
            block: 0,
            found: 17_717_925_331_114_078_289,
        };
        assert_eq!(
            e.to_string(),
            "Superblock check failed: blocknr 17717925331114078289, expected 0"
        );
    }

    #[test]
    fn geometry_mismatch_prints_exactly_the_kernel_text() {
        let e = MetadataError::GeometryMismatch {
            on_disk_region_sectors: 8,
            on_disk_target_sectors: 262_144,
            requested_region_sectors: 16,
            requested_target_sectors: 262_144,
        };
        assert_eq!(
            e.to_string(),
            "Region and/or target size don't match the ones in metadata"
        );
    }

    #[test]
    fn too_small_states_the_size_needed() {
        let e = MetadataError::DeviceTooSmall {
            size_bytes: 4096,
            needed_bytes: 3 << 20,
            nr_regions: 10,
        };
        let s = e.to_string();
        assert!(s.contains("3145728 bytes (3 MiB)"), "{s}");
    }
}
