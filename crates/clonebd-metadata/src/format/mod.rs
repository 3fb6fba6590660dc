//! The on-disk format, as pure functions on byte slices: no I/O, no allocation policy.
//!
//! Every metadata block is 4096 bytes, little-endian, and starts with a `u32` checksum:
//! `csum = !crc32c(block[4..4096]) ^ salt`, with one salt per block type (SPEC 5.1;
//! the kernel computes `crc32c(~0, ...) ^ salt` without the final inversion, which is the
//! same number). Each block also stores its own block number, so a block written to or read
//! from the wrong place is detected. The kernel validates the location first, then the
//! checksum, and so do we.
//!
//! - [`superblock`]: block 0;
//! - [`btree_node`]: persistent-data btree nodes (the bitset's index and the space map's
//!   reference-count tree);
//! - [`array_block`]: the bitset's array blocks of 509 `u64` words;
//! - [`space_map`]: the metadata space map's root, index block and bitmap blocks.
//!
//! Byte tables for all of them are in `docs/FORMAT.md`.

pub mod array_block;
pub mod btree_node;
pub mod space_map;
pub mod superblock;

use crate::error::{BlockKind, MetadataError};

/// Size of every metadata block, in bytes (dm-clone's `DM_CLONE_METADATA_BLOCK_SIZE`).
pub const BLOCK_SIZE: usize = 4096;

/// A metadata block's bytes.
pub type BlockBuf = [u8; BLOCK_SIZE];

/// Checksum salt of the dm-clone superblock (`SUPERBLOCK_CSUM_XOR`).
pub const SUPERBLOCK_CSUM_XOR: u32 = 257_649_492;
/// Checksum salt of btree nodes (`BTREE_CSUM_XOR`).
pub const BTREE_CSUM_XOR: u32 = 121_107;
/// Checksum salt of array blocks (dm-array's `CSUM_XOR`).
pub const ARRAY_CSUM_XOR: u32 = 595_846_735;
/// Checksum salt of the metadata space map's index block (`INDEX_CSUM_XOR`).
pub const INDEX_CSUM_XOR: u32 = 160_478;
/// Checksum salt of space-map bitmap blocks (`BITMAP_CSUM_XOR`).
pub const BITMAP_CSUM_XOR: u32 = 240_779;

impl BlockKind {
    /// The checksum salt of this block type.
    pub fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => SUPERBLOCK_CSUM_XOR,
            BlockKind::BtreeNode => BTREE_CSUM_XOR,
            BlockKind::ArrayBlock => ARRAY_CSUM_XOR,
            BlockKind::SpaceMapIndex => INDEX_CSUM_XOR,
            BlockKind::SpaceMapBitmap => BITMAP_CSUM_XOR,
        }
    }

    /// Byte offset of the `blocknr` self-reference inside a block of this type.
    pub fn blocknr_offset(self) -> usize {
        match self {
            // Array blocks have three u32 fields (max_entries, nr_entries, value_size)
            // between the checksum and the block number.
            BlockKind::ArrayBlock => 16,
            _ => 8,
        }
    }
}

/// The checksum of `block` (4096 bytes) for a block of type `kind`: crc32c of bytes
/// `4..4096`, inverted, XOR the type's salt.
pub fn block_checksum(block: &[u8], kind: BlockKind) -> u32 {
    !crc32c::crc32c(block.get(4..).unwrap_or(&[])) ^ kind.salt()
}

/// The checksum stored in a block's first four bytes.
pub fn stored_checksum(block: &[u8]) -> u32 {
    read_u32(block, 0)
}

/// The block number a block says it lives at.
pub fn stored_blocknr(block: &[u8], kind: BlockKind) -> u64 {
    read_u64(block, kind.blocknr_offset())
}

/// Validates the generic envelope of a block read from `location`: first the self-reference
/// (`WrongLocation`), then the checksum (`ChecksumMismatch`), in the kernel's order.
pub fn validate_envelope(
    block: &BlockBuf,
    kind: BlockKind,
    location: u64,
) -> Result<(), MetadataError> {
    let found = stored_blocknr(block, kind);
    if found != location {
        return Err(MetadataError::WrongLocation {
            kind,
            block: location,
            found,
        });
    }
    let stored = stored_checksum(block);
    let computed = block_checksum(block, kind);
    if stored != computed {
        return Err(MetadataError::ChecksumMismatch {
            kind,
            block: location,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Prepares a block for writing at `location`, as the kernel's `prepare_for_write`
/// validators do: stores the block number, then the checksum over everything else.
pub fn seal(block: &mut BlockBuf, kind: BlockKind, location: u64) {
    write_u64(block, kind.blocknr_offset(), location);
    let csum = block_checksum(block, kind);
    write_u32(block, 0, csum);
}

/// Little-endian `u32` at `off`; 0 past the end (callers bound-check their offsets).
pub(crate) fn read_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Little-endian `u64` at `off`; 0 past the end (callers bound-check their offsets).
pub(crate) fn read_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Stores a little-endian `u32` at `off` (ignored past the end).
pub(crate) fn write_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Stores a little-endian `u64` at `off` (ignored past the end).
pub(crate) fn write_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// A zero-filled block on the heap.
pub(crate) fn zeroed_block() -> Box<BlockBuf> {
    Box::new([0u8; BLOCK_SIZE])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_validate_round_trips_for_every_kind() {
        for kind in [
            BlockKind::Superblock,
            BlockKind::BtreeNode,
            BlockKind::ArrayBlock,
            BlockKind::SpaceMapIndex,
            BlockKind::SpaceMapBitmap,
        ] {
            let mut b = [7u8; BLOCK_SIZE];
            seal(&mut b, kind, 42);
            assert!(validate_envelope(&b, kind, 42).is_ok());
            assert!(matches!(
                validate_envelope(&b, kind, 43),
                Err(MetadataError::WrongLocation { found: 42, .. })
            ));
            b[100] ^= 1;
            assert!(matches!(
                validate_envelope(&b, kind, 42),
                Err(MetadataError::ChecksumMismatch { .. })
            ));
        }
    }

    #[test]
    fn checksum_is_inverted_crc32c_xor_salt() {
        // crc32c("123456789") = 0xE3069283 (the standard check value).
        let mut b = vec![0u8; 4];
        b.extend_from_slice(b"123456789");
        assert_eq!(
            block_checksum(&b, BlockKind::Superblock),
            !0xE306_9283u32 ^ SUPERBLOCK_CSUM_XOR
        );
    }
}
