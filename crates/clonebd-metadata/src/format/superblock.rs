//! The dm-clone superblock (block 0).
//!
//! ```text
//! off  size  field
//!   0     4  csum                     crc32c(bytes 4..4096) inverted, ^ 257649492
//!   4     4  flags                    0
//!   8     8  blocknr                  0 (its own location)
//!  16    16  uuid                     zeros (unused)
//!  32     8  magic                    0x8af27f64
//!  40     4  version                  1
//!  44   128  metadata_space_map_root  nr_blocks, nr_allocated, bitmap_root,
//!                                     ref_count_root (4 x u64), then 96 zero bytes
//! 172     8  region_size              sectors
//! 180     8  target_size              sectors
//! 188     8  bitset_root              root block of the bitset's array btree
//! 196  3900  zero
//! ```
//!
//! The kernel rewrites the superblock from a zeroed buffer on every commit, so everything
//! after byte 196 is zero. That matters for crash safety: all the superblock's contents lie
//! in its first 512-byte sector, so a write torn at sector boundaries can never mix old and
//! new fields (see `docs/FORMAT.md`).

use super::space_map::SmRoot;
use super::{BLOCK_SIZE, BlockBuf, read_u32, read_u64, seal, write_u32, write_u64, zeroed_block};
use crate::error::{BlockKind, MetadataError};

/// dm-clone's superblock magic (`SUPERBLOCK_MAGIC`, 2331148132).
pub const SUPERBLOCK_MAGIC: u64 = 0x8af2_7f64;
/// The only metadata version there is.
pub const METADATA_VERSION: u32 = 1;
/// Lowest version the kernel accepts.
pub const MIN_METADATA_VERSION: u32 = 1;
/// Highest version the kernel accepts.
pub const MAX_METADATA_VERSION: u32 = 1;
/// The superblock lives at block 0.
pub const SUPERBLOCK_LOCATION: u64 = 0;
/// Size reserved for the space map root inside the superblock.
pub const SPACE_MAP_ROOT_SIZE: usize = 128;

const OFF_FLAGS: usize = 4;
const OFF_BLOCKNR: usize = 8;
const OFF_UUID: usize = 16;
const OFF_MAGIC: usize = 32;
const OFF_VERSION: usize = 40;
const OFF_SM_ROOT: usize = 44;
const OFF_REGION_SIZE: usize = 172;
const OFF_TARGET_SIZE: usize = 180;
const OFF_BITSET_ROOT: usize = 188;
/// First byte after the last field.
pub const SUPERBLOCK_USED_BYTES: usize = 196;

/// A decoded superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// `flags` (always 0).
    pub flags: u32,
    /// The block number the superblock says it lives at (0).
    pub blocknr: u64,
    /// `uuid` (unused, zeros).
    pub uuid: [u8; 16],
    /// `magic`.
    pub magic: u64,
    /// `version`.
    pub version: u32,
    /// The metadata space map's root.
    pub sm_root: SmRoot,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Clone length in sectors.
    pub target_sectors: u64,
    /// Root block of the bitset's array btree.
    pub bitset_root: u64,
}

impl Superblock {
    /// The superblock the kernel writes at every commit (`__prepare_superblock`): flags 0,
    /// uuid zero, magic, version 1, and the given roots and geometry.
    pub fn new(
        sm_root: SmRoot,
        region_sectors: u64,
        target_sectors: u64,
        bitset_root: u64,
    ) -> Self {
        Self {
            flags: 0,
            blocknr: SUPERBLOCK_LOCATION,
            uuid: [0; 16],
            magic: SUPERBLOCK_MAGIC,
            version: METADATA_VERSION,
            sm_root,
            region_sectors,
            target_sectors,
            bitset_root,
        }
    }

    /// Decodes the fields without validating anything.
    pub fn decode_unchecked(block: &BlockBuf) -> Self {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&block[OFF_UUID..OFF_UUID + 16]);
        Self {
            flags: read_u32(block, OFF_FLAGS),
            blocknr: read_u64(block, OFF_BLOCKNR),
            uuid,
            magic: read_u64(block, OFF_MAGIC),
            version: read_u32(block, OFF_VERSION),
            sm_root: SmRoot::decode(&block[OFF_SM_ROOT..OFF_SM_ROOT + SPACE_MAP_ROOT_SIZE]),
            region_sectors: read_u64(block, OFF_REGION_SIZE),
            target_sectors: read_u64(block, OFF_TARGET_SIZE),
            bitset_root: read_u64(block, OFF_BITSET_ROOT),
        }
    }

    /// Decodes and validates block 0 in the kernel's order (`sb_check`): location, magic,
    /// checksum, version.
    pub fn decode(block: &BlockBuf) -> Result<Self, MetadataError> {
        let sb = Self::decode_unchecked(block);
        if sb.blocknr != SUPERBLOCK_LOCATION {
            return Err(MetadataError::WrongLocation {
                kind: BlockKind::Superblock,
                block: SUPERBLOCK_LOCATION,
                found: sb.blocknr,
            });
        }
        if sb.magic != SUPERBLOCK_MAGIC {
            return Err(MetadataError::BadMagic {
                found: sb.magic,
                expected: SUPERBLOCK_MAGIC,
            });
        }
        let stored = super::stored_checksum(block);
        let computed = super::block_checksum(block, BlockKind::Superblock);
        if stored != computed {
            return Err(MetadataError::ChecksumMismatch {
                kind: BlockKind::Superblock,
                block: SUPERBLOCK_LOCATION,
                stored,
                computed,
            });
        }
        if !(MIN_METADATA_VERSION..=MAX_METADATA_VERSION).contains(&sb.version) {
            return Err(MetadataError::UnsupportedVersion {
                found: sb.version,
                min: MIN_METADATA_VERSION,
                max: MAX_METADATA_VERSION,
            });
        }
        Ok(sb)
    }

    /// Encodes the superblock into a fresh zeroed block, with its checksum. The block number
    /// written is `self.blocknr` (0 for every valid superblock).
    pub fn encode(&self) -> Box<BlockBuf> {
        let mut b = zeroed_block();
        write_u32(&mut b[..], OFF_FLAGS, self.flags);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        write_u64(&mut b[..], OFF_MAGIC, self.magic);
        write_u32(&mut b[..], OFF_VERSION, self.version);
        self.sm_root
            .encode_into(&mut b[OFF_SM_ROOT..OFF_SM_ROOT + SPACE_MAP_ROOT_SIZE]);
        write_u64(&mut b[..], OFF_REGION_SIZE, self.region_sectors);
        write_u64(&mut b[..], OFF_TARGET_SIZE, self.target_sectors);
        write_u64(&mut b[..], OFF_BITSET_ROOT, self.bitset_root);
        seal(&mut b, BlockKind::Superblock, self.blocknr);
        b
    }
}

/// Whether a block is entirely zero (the kernel's "not formatted" test for block 0).
pub fn is_all_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Whether the bytes the format leaves zero (the space map root's padding and everything
/// after the last field) are zero.
pub fn padding_is_zero(block: &BlockBuf) -> bool {
    is_all_zero(&block[OFF_SM_ROOT + 32..OFF_SM_ROOT + SPACE_MAP_ROOT_SIZE])
        && is_all_zero(&block[SUPERBLOCK_USED_BYTES..BLOCK_SIZE])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock::new(
            SmRoot {
                nr_blocks: 2048,
                nr_allocated: 7,
                bitmap_root: 1,
                ref_count_root: 2,
            },
            8,
            262_144,
            4,
        )
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b).expect("valid"), sb);
        assert!(padding_is_zero(&b));
    }

    #[test]
    fn superblock_checks_run_in_kernel_order() {
        // A wrong location is reported even when the magic and checksum are also wrong.
        let mut b = sample().encode();
        b[8] = 1;
        b[32] = 0;
        assert!(matches!(
            Superblock::decode(&b),
            Err(MetadataError::WrongLocation { found: 1, .. })
        ));
        let mut b = sample().encode();
        b[32] ^= 0xff;
        assert!(matches!(
            Superblock::decode(&b),
            Err(MetadataError::BadMagic { .. })
        ));
        let mut b = sample().encode();
        b[200] = 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(MetadataError::ChecksumMismatch {
                kind: BlockKind::Superblock,
                ..
            })
        ));
        let mut sb = sample();
        sb.version = 2;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(MetadataError::UnsupportedVersion { found: 2, .. })
        ));
    }
}
