//! Array blocks: the leaves of a persistent-data array, here the bitset's `u64` words.
//!
//! ```text
//! off  size  field
//!   0     4  csum          crc32c(bytes 4..4096) inverted, ^ 595846735
//!   4     4  max_entries   509 = (4096 - 24) / 8
//!   8     4  nr_entries    509, except in the last block
//!  12     4  value_size    8
//!  16     8  blocknr       the block's own location
//!  24  4072  values[509]   u64 words; region r is bit r % 64 of word r / 64
//! ```

use super::{BlockBuf, read_u32, read_u64, write_u32, write_u64};
use crate::error::{BlockKind, Corruption, MetadataError};

/// Size of the array block header.
pub const ARRAY_HEADER_SIZE: usize = 24;
/// Size of a bitset word.
pub const WORD_SIZE: u32 = 8;
/// Words per array block (`(4096 - 24) / 8`).
pub const ARRAY_BLOCK_ENTRIES: u32 = 509;
/// Regions covered by one full array block.
pub const REGIONS_PER_ARRAY_BLOCK: u64 = ARRAY_BLOCK_ENTRIES as u64 * 64;

/// An array block's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayHeader {
    /// `max_entries`.
    pub max_entries: u32,
    /// `nr_entries`.
    pub nr_entries: u32,
    /// `value_size`.
    pub value_size: u32,
    /// `blocknr`.
    pub blocknr: u64,
}

impl ArrayHeader {
    /// Decodes the header of `b`.
    pub fn decode(b: &BlockBuf) -> Self {
        Self {
            max_entries: read_u32(b, 4),
            nr_entries: read_u32(b, 8),
            value_size: read_u32(b, 12),
            blocknr: read_u64(b, 16),
        }
    }
}

/// Checks that an array block (envelope already valid) has the shape dm-bitset writes.
pub fn check_array_block(b: &BlockBuf, location: u64) -> Result<ArrayHeader, MetadataError> {
    let h = ArrayHeader::decode(b);
    if h.max_entries != ARRAY_BLOCK_ENTRIES
        || h.value_size != WORD_SIZE
        || h.nr_entries > h.max_entries
    {
        return Err(MetadataError::corrupt(
            BlockKind::ArrayBlock,
            location,
            Corruption::ArrayHeader {
                max_entries: h.max_entries,
                nr_entries: h.nr_entries,
                value_size: h.value_size,
            },
        ));
    }
    Ok(h)
}

/// Sets the header fields other than checksum and block number.
pub fn set_header(b: &mut BlockBuf, max_entries: u32, nr_entries: u32, value_size: u32) {
    write_u32(b, 4, max_entries);
    write_u32(b, 8, nr_entries);
    write_u32(b, 12, value_size);
}

/// `nr_entries`.
pub fn nr_entries(b: &BlockBuf) -> u32 {
    read_u32(b, 8)
}

/// Word `i`.
pub fn word(b: &BlockBuf, i: u32) -> u64 {
    read_u64(b, ARRAY_HEADER_SIZE + 8 * i as usize)
}

/// Sets word `i`.
pub fn set_word(b: &mut BlockBuf, i: u32, v: u64) {
    write_u64(b, ARRAY_HEADER_SIZE + 8 * i as usize, v);
}

/// Number of array blocks for `nr_words` words.
pub fn nr_array_blocks(nr_words: u64) -> u64 {
    nr_words.div_ceil(u64::from(ARRAY_BLOCK_ENTRIES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_block_holds_509_words() {
        assert_eq!(
            ARRAY_HEADER_SIZE + ARRAY_BLOCK_ENTRIES as usize * 8,
            super::super::BLOCK_SIZE
        );
        assert_eq!(nr_array_blocks(512), 2);
        assert_eq!(nr_array_blocks(509), 1);
    }
}
