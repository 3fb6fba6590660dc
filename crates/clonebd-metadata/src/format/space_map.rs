//! The metadata space map: its root (in the superblock), its index block and its bitmap
//! blocks.
//!
//! Every metadata block has a reference count. Counts 0, 1 and 2 are stored as two bits in
//! a bitmap block; the value 3 means "3 or more, see the reference-count btree" (a btree of
//! `u32` values keyed by block number). One bitmap block covers 16 320 blocks; the index
//! block lists up to 255 bitmap blocks, hence the 4 161 600-block cap.
//!
//! Bitmap block: a 16-byte header (`csum u32`, `not_used u32`, `blocknr u64`) and 4080
//! bytes of entries, 32 per little-endian `u64` word. Entry `i` of a word is bits `2i`
//! (the high bit of the count) and `2i+1` (the low bit).
//!
//! Index block: a 16-byte header (`csum u32`, `padding u32`, `blocknr u64`), then 255
//! entries of 16 bytes: `blocknr u64` (the bitmap block), `nr_free u32` (entries of that
//! bitmap with count 0), `none_free_before u32` (a hint: no entry below it is free).

use super::{BLOCK_SIZE, BlockBuf, read_u32, read_u64, write_u32, write_u64};

/// Size of the space map root as the kernel stores it (4 x u64).
pub const SM_ROOT_SIZE: usize = 32;
/// Bytes of a value in the reference-count btree (a little-endian `u32` count, for blocks
/// whose bitmap entry says "3 or more").
pub const REF_COUNT_VALUE_SIZE: u32 = 4;
/// Entries of a bitmap block: (4096 - 16) * 4.
pub const ENTRIES_PER_BITMAP: u64 = ((BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4) as u64;
/// Bitmap block header size.
pub const BITMAP_HEADER_SIZE: usize = 16;
/// Entries of the index block (`MAX_METADATA_BITMAPS`).
pub const MAX_METADATA_BITMAPS: usize = 255;
/// Most blocks a metadata space map can describe: 255 * 16 320.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;
/// Index block header size.
pub const INDEX_HEADER_SIZE: usize = 16;
/// Size of one index entry.
pub const INDEX_ENTRY_SIZE: usize = 16;

/// The space map root stored in the superblock (`struct disk_sm_root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    /// Blocks the space map covers.
    pub nr_blocks: u64,
    /// Blocks with a non-zero count.
    pub nr_allocated: u64,
    /// Location of the index block.
    pub bitmap_root: u64,
    /// Root of the reference-count btree.
    pub ref_count_root: u64,
}

impl SmRoot {
    /// Decodes the first 32 bytes of `b`.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            nr_blocks: read_u64(b, 0),
            nr_allocated: read_u64(b, 8),
            bitmap_root: read_u64(b, 16),
            ref_count_root: read_u64(b, 24),
        }
    }

    /// Encodes into the first 32 bytes of `b` (the rest is left alone).
    pub fn encode_into(&self, b: &mut [u8]) {
        write_u64(b, 0, self.nr_blocks);
        write_u64(b, 8, self.nr_allocated);
        write_u64(b, 16, self.bitmap_root);
        write_u64(b, 24, self.ref_count_root);
    }
}

/// One index entry (`struct disk_index_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// The bitmap block.
    pub blocknr: u64,
    /// Entries of the bitmap with count 0.
    pub nr_free: u32,
    /// No entry below this one is free (an allocation hint).
    pub none_free_before: u32,
}

/// The index block's contents (`struct disk_metadata_index`), header included: the kernel
/// copies the whole structure into each new index block, so the `padding` word read from
/// disk is carried along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataIndex {
    /// The `padding` word after the checksum.
    pub padding: u32,
    /// All 255 entries (unused ones are zero).
    pub entries: [IndexEntry; MAX_METADATA_BITMAPS],
}

impl Default for MetadataIndex {
    fn default() -> Self {
        Self {
            padding: 0,
            entries: [IndexEntry::default(); MAX_METADATA_BITMAPS],
        }
    }
}

impl MetadataIndex {
    /// Decodes an index block (its envelope is validated separately).
    pub fn decode(b: &BlockBuf) -> Self {
        let mut idx = Self {
            padding: read_u32(b, 4),
            ..Self::default()
        };
        for (i, e) in idx.entries.iter_mut().enumerate() {
            let o = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
            *e = IndexEntry {
                blocknr: read_u64(b, o),
                nr_free: read_u32(b, o + 8),
                none_free_before: read_u32(b, o + 12),
            };
        }
        idx
    }

    /// Encodes into `b` (checksum and block number are left for `seal`).
    pub fn encode_into(&self, b: &mut BlockBuf) {
        write_u32(b, 4, self.padding);
        for (i, e) in self.entries.iter().enumerate() {
            let o = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
            write_u64(b, o, e.blocknr);
            write_u32(b, o + 8, e.nr_free);
            write_u32(b, o + 12, e.none_free_before);
        }
    }
}

/// Number of bitmap blocks needed for `nr_blocks` blocks.
pub fn nr_bitmaps(nr_blocks: u64) -> u64 {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP)
}

/// The two-bit count of entry `i` (0..16320) of a bitmap block.
pub fn bitmap_get(b: &BlockBuf, i: u64) -> u32 {
    let w = read_u64(b, BITMAP_HEADER_SIZE + (i / 32) as usize * 8);
    let shift = (i % 32) * 2;
    let hi = (w >> shift) & 1;
    let lo = (w >> (shift + 1)) & 1;
    ((hi << 1) | lo) as u32
}

/// Sets the two-bit count of entry `i` to `v` (0..=3).
pub fn bitmap_set(b: &mut BlockBuf, i: u64, v: u32) {
    let off = BITMAP_HEADER_SIZE + (i / 32) as usize * 8;
    let mut w = read_u64(b, off);
    let shift = (i % 32) * 2;
    w &= !(0b11u64 << shift);
    w |= u64::from((v >> 1) & 1) << shift;
    w |= u64::from(v & 1) << (shift + 1);
    write_u64(b, off, w);
}

/// Whether all 32 entries of the word holding entry `i` are non-zero.
pub fn bitmap_word_full(b: &BlockBuf, i: u64) -> bool {
    let w = read_u64(b, BITMAP_HEADER_SIZE + (i / 32) as usize * 8);
    // A two-bit field is zero iff both of its bits are clear.
    let nonzero_fields = (w | (w >> 1)) & 0x5555_5555_5555_5555;
    nonzero_fields == 0x5555_5555_5555_5555
}

/// Counts the entries `< limit` with a non-zero count.
pub fn bitmap_count_used(b: &BlockBuf, limit: u64) -> u64 {
    (0..limit.min(ENTRIES_PER_BITMAP))
        .filter(|&i| bitmap_get(b, i) != 0)
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_entries_use_the_kernels_bit_order() {
        let mut b = [0u8; BLOCK_SIZE];
        bitmap_set(&mut b, 0, 1);
        bitmap_set(&mut b, 1, 2);
        bitmap_set(&mut b, 2, 3);
        // Count 1 sets the odd bit (2i+1), count 2 the even bit (2i).
        assert_eq!(read_u64(&b, 16), 0b11_01_10);
        assert_eq!(bitmap_get(&b, 0), 1);
        assert_eq!(bitmap_get(&b, 1), 2);
        assert_eq!(bitmap_get(&b, 2), 3);
        bitmap_set(&mut b, 1, 0);
        assert_eq!(bitmap_get(&b, 1), 0);
        assert_eq!(bitmap_get(&b, 2), 3);
    }

    #[test]
    fn word_full_detects_any_zero_field() {
        let mut b = [0u8; BLOCK_SIZE];
        for i in 0..32 {
            bitmap_set(&mut b, i, 1 + (i as u32 % 3));
        }
        assert!(bitmap_word_full(&b, 0));
        bitmap_set(&mut b, 17, 0);
        assert!(!bitmap_word_full(&b, 5));
    }

    #[test]
    fn capacity_is_the_kernels() {
        assert_eq!(ENTRIES_PER_BITMAP, 16_320);
        assert_eq!(MAX_METADATA_BLOCKS, 4_161_600);
        assert_eq!(
            INDEX_HEADER_SIZE + MAX_METADATA_BITMAPS * INDEX_ENTRY_SIZE,
            BLOCK_SIZE
        );
    }

    #[test]
    fn index_round_trips() {
        let mut idx = MetadataIndex::default();
        idx.entries[0] = IndexEntry {
            blocknr: 3,
            nr_free: 16_313,
            none_free_before: 7,
        };
        idx.entries[254].blocknr = 99;
        let mut b = [0u8; BLOCK_SIZE];
        idx.encode_into(&mut b);
        assert_eq!(MetadataIndex::decode(&b), idx);
    }
}
