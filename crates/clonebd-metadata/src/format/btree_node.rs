//! Persistent-data btree nodes.
//!
//! ```text
//! off  size  field
//!   0     4  csum          crc32c(bytes 4..4096) inverted, ^ 121107
//!   4     4  flags         1 = internal, 2 = leaf
//!   8     8  blocknr       the node's own location
//!  16     4  nr_entries
//!  20     4  max_entries   3 * floor(((4096 - 32) / (8 + value_size)) / 3)
//!  24     4  value_size    8 for internal nodes and the bitset's leaves, 4 for the
//!                          reference-count tree's leaves
//!  28     4  padding
//!  32        keys[max_entries]      u64, ascending
//!  32 + 8*max_entries  values[max_entries]  value_size bytes each
//! ```
//!
//! Internal nodes map the lowest key of each child to the child's block. Bytes past
//! `nr_entries` are not cleared when entries move, so two nodes with the same entries can
//! differ there; clonebd moves bytes exactly as the kernel does, so its nodes match the
//! kernel's byte for byte.

use super::{BlockBuf, read_u32, read_u64, write_u32, write_u64};
use crate::error::{BlockKind, Corruption, MetadataError};

/// `flags` of an internal node.
pub const INTERNAL_NODE: u32 = 1;
/// `flags` of a leaf.
pub const LEAF_NODE: u32 = 2;
/// Size of the node header.
pub const NODE_HEADER_SIZE: usize = 32;

/// The kernel's `calc_max_entries`: as many (key, value) pairs as fit, rounded down to a
/// multiple of 3 (252 for 8-byte values, 336 for 4-byte ones).
pub fn calc_max_entries(value_size: usize) -> u32 {
    let total = (super::BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size);
    (3 * (total / 3)) as u32
}

/// A node's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHeader {
    /// `flags`.
    pub flags: u32,
    /// `blocknr`.
    pub blocknr: u64,
    /// `nr_entries`.
    pub nr_entries: u32,
    /// `max_entries`.
    pub max_entries: u32,
    /// `value_size`.
    pub value_size: u32,
}

impl NodeHeader {
    /// Decodes the header of `b`.
    pub fn decode(b: &BlockBuf) -> Self {
        Self {
            flags: read_u32(b, 4),
            blocknr: read_u64(b, 8),
            nr_entries: read_u32(b, 16),
            max_entries: read_u32(b, 20),
            value_size: read_u32(b, 24),
        }
    }

    /// Whether this is an internal node.
    pub fn is_internal(&self) -> bool {
        self.flags & INTERNAL_NODE != 0
    }

    /// Whether this is a leaf.
    pub fn is_leaf(&self) -> bool {
        self.flags & LEAF_NODE != 0
    }
}

/// Structural checks on a node whose envelope (location, checksum) is valid: the kernel's
/// `node_check` (max_entries fits, nr_entries <= max_entries, internal or leaf), plus the
/// value size the tree expects for its leaves (internal nodes always hold 8-byte values).
pub fn check_node(
    b: &BlockBuf,
    location: u64,
    leaf_value_size: u32,
) -> Result<NodeHeader, MetadataError> {
    let h = NodeHeader::decode(b);
    let bad = |reason| {
        Err(MetadataError::corrupt(
            BlockKind::BtreeNode,
            location,
            reason,
        ))
    };
    let fits = (NODE_HEADER_SIZE as u64) + (8 + u64::from(h.value_size)) * u64::from(h.max_entries)
        <= super::BLOCK_SIZE as u64;
    if !fits || h.max_entries == 0 {
        return bad(Corruption::NodeMaxEntries {
            max_entries: h.max_entries,
            value_size: h.value_size,
        });
    }
    if h.nr_entries > h.max_entries {
        return bad(Corruption::NodeTooManyEntries {
            nr_entries: h.nr_entries,
            max_entries: h.max_entries,
        });
    }
    if !h.is_internal() && !h.is_leaf() {
        return bad(Corruption::NodeFlags { flags: h.flags });
    }
    let expected = if h.is_internal() { 8 } else { leaf_value_size };
    if h.value_size != expected {
        return bad(Corruption::NodeValueSize {
            found: h.value_size,
            expected,
        });
    }
    Ok(h)
}

/// Key `i`.
pub fn key(b: &BlockBuf, i: u32) -> u64 {
    read_u64(b, NODE_HEADER_SIZE + 8 * i as usize)
}

/// Sets key `i`.
pub fn set_key(b: &mut BlockBuf, i: u32, k: u64) {
    write_u64(b, NODE_HEADER_SIZE + 8 * i as usize, k);
}

/// `nr_entries`.
pub fn nr_entries(b: &BlockBuf) -> u32 {
    read_u32(b, 16)
}

/// Sets `nr_entries`.
pub fn set_nr_entries(b: &mut BlockBuf, n: u32) {
    write_u32(b, 16, n);
}

/// `max_entries`.
pub fn max_entries(b: &BlockBuf) -> u32 {
    read_u32(b, 20)
}

/// `value_size`.
pub fn value_size(b: &BlockBuf) -> u32 {
    read_u32(b, 24)
}

/// `flags`.
pub fn flags(b: &BlockBuf) -> u32 {
    read_u32(b, 4)
}

/// Writes the header fields other than checksum and block number.
pub fn set_header(b: &mut BlockBuf, flags: u32, nr_entries: u32, max_entries: u32, vsize: u32) {
    write_u32(b, 4, flags);
    write_u32(b, 16, nr_entries);
    write_u32(b, 20, max_entries);
    write_u32(b, 24, vsize);
}

/// Makes `b` an empty leaf for values of `vsize` bytes (`dm_btree_empty`'s node): the whole
/// tree of a new btree.
pub fn init_empty_leaf(b: &mut BlockBuf, vsize: u32) {
    set_header(b, LEAF_NODE, 0, calc_max_entries(vsize as usize), vsize);
}

/// Byte offset of value `i`, per the node's own `max_entries` and `value_size`.
pub fn value_offset(b: &BlockBuf, i: u32) -> usize {
    NODE_HEADER_SIZE + 8 * max_entries(b) as usize + value_size(b) as usize * i as usize
}

/// Value `i` read as a `u64` (internal nodes and the bitset's leaves).
pub fn value64(b: &BlockBuf, i: u32) -> u64 {
    read_u64(b, value_offset(b, i))
}

/// Sets value `i` as a `u64`.
pub fn set_value64(b: &mut BlockBuf, i: u32, v: u64) {
    let o = value_offset(b, i);
    write_u64(b, o, v);
}

/// Value `i` read as a `u32` (the reference-count tree's leaves).
pub fn value32(b: &BlockBuf, i: u32) -> u32 {
    read_u32(b, value_offset(b, i))
}

/// The kernel's `lower_bound`: the index of the last key `<= key`, or -1. A binary search
/// that assumes ascending keys (as the kernel's does).
pub fn lower_bound(b: &BlockBuf, k: u64) -> i64 {
    let mut lo: i64 = -1;
    let mut hi: i64 = i64::from(nr_entries(b).min(max_entries(b)));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let mk = key(b, mid as u32);
        if mk == k {
            return mid;
        }
        if mk < k {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_entries_match_the_kernel() {
        assert_eq!(calc_max_entries(8), 252);
        assert_eq!(calc_max_entries(4), 336);
    }

    #[test]
    fn lower_bound_finds_last_key_not_above() {
        let mut b = [0u8; super::super::BLOCK_SIZE];
        set_header(&mut b, LEAF_NODE, 3, 252, 8);
        set_key(&mut b, 0, 10);
        set_key(&mut b, 1, 20);
        set_key(&mut b, 2, 30);
        assert_eq!(lower_bound(&b, 5), -1);
        assert_eq!(lower_bound(&b, 10), 0);
        assert_eq!(lower_bound(&b, 25), 1);
        assert_eq!(lower_bound(&b, 99), 2);
    }
}
