//! The persistent-data array and the bitset built on it.
//!
//! An array of `u64` words is stored in array blocks of 509 words; a btree maps the array
//! block index (0, 1, 2, ...) to the block. Changing a word shadows its array block and,
//! when the shadow is a new block, re-inserts it into the btree (which shadows the btree
//! path). dm-clone's bitset is such an array with `ceil(nr_regions / 64)` words; region `r`
//! is bit `r % 64` of word `r / 64`.
//!
//! A commit sets exactly the regions of the transaction (SPEC 5.4, fix F1): for each dirty
//! word in ascending order, the on-disk word is read and the dirty bits are OR-ed into it,
//! never the in-core word, so a region hydrated after the dirty set was captured cannot
//! reach the disk.

use clonebd_core::{BlockDev, DirtySet, HydrationMap};

use crate::btree::{self, ARRAY_TREE, MAX_DEPTH};
use crate::error::{BlockKind, Corruption, MetadataError};
use crate::format::array_block::{
    ARRAY_BLOCK_ENTRIES, WORD_SIZE, check_array_block, nr_array_blocks, nr_entries, set_header,
    set_word, word,
};
use crate::format::btree_node::{check_node, key, value64};
use crate::format::{BLOCK_SIZE, BlockBuf, validate_envelope, zeroed_block};
use crate::tm::Tm;

const ENTRIES: u64 = ARRAY_BLOCK_ENTRIES as u64;

/// A new, empty array (`dm_array_empty`): an empty btree.
pub(crate) fn empty<D: BlockDev>(tm: &mut Tm<D>) -> Result<u64, MetadataError> {
    btree::empty(tm, ARRAY_TREE)
}

/// Allocates an array block holding `nr` zero words and inserts it at `index`
/// (`insert_new_ablock`).
fn insert_new_ablock<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    index: u64,
    nr: u32,
) -> Result<u64, MetadataError> {
    let b = tm.new_block(BlockKind::ArrayBlock)?;
    // The words are zero already (the bitset is created all clear).
    tm.write(b, |ab| set_header(ab, ARRAY_BLOCK_ENTRIES, nr, WORD_SIZE))?;
    btree::insert(tm, root, index, b, ARRAY_TREE)
}

/// Grows an empty array to `nr_words` zero words (`dm_array_resize` from 0): the full
/// blocks in order, then the partial tail block.
pub(crate) fn grow_from_empty<D: BlockDev>(
    tm: &mut Tm<D>,
    mut root: u64,
    nr_words: u64,
) -> Result<u64, MetadataError> {
    let full = nr_words / ENTRIES;
    let tail = (nr_words % ENTRIES) as u32;
    for i in 0..full {
        root = insert_new_ablock(tm, root, i, ARRAY_BLOCK_ENTRIES)?;
    }
    if tail > 0 {
        root = insert_new_ablock(tm, root, full, tail)?;
    }
    Ok(root)
}

fn missing(root: u64, index: u64) -> MetadataError {
    MetadataError::corrupt(
        BlockKind::BtreeNode,
        root,
        Corruption::ArrayKeys {
            expected: index,
            found: u64::MAX,
        },
    )
}

/// Word `w` (`dm_array_get_value`).
pub(crate) fn get_word<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    w: u64,
) -> Result<u64, MetadataError> {
    let index = w / ENTRIES;
    let b = btree::lookup(tm, root, index, ARRAY_TREE)?.ok_or_else(|| missing(root, index))?;
    let entry = (w % ENTRIES) as u32;
    tm.read(b, BlockKind::ArrayBlock, |ab| {
        let h = check_array_block(ab, b)?;
        if entry >= h.nr_entries {
            return Err(array_entries_error(b, index, entry + 1, h.nr_entries));
        }
        Ok(word(ab, entry))
    })?
}

fn array_entries_error(b: u64, index: u64, expected: u32, found: u32) -> MetadataError {
    MetadataError::corrupt(
        BlockKind::ArrayBlock,
        b,
        Corruption::ArrayBlockEntries {
            index,
            expected,
            found,
        },
    )
}

/// Shadows array block `index` and points the btree at the shadow (`shadow_ablock`).
/// Returns the new root and the shadow's location.
fn shadow_ablock<D: BlockDev>(
    tm: &mut Tm<D>,
    mut root: u64,
    index: u64,
) -> Result<(u64, u64), MetadataError> {
    let b = btree::lookup(tm, root, index, ARRAY_TREE)?.ok_or_else(|| missing(root, index))?;
    tm.read(b, BlockKind::ArrayBlock, |ab| {
        check_array_block(ab, b).map(|_| ())
    })??;
    let (nb, _shared) = tm.shadow(b, BlockKind::ArrayBlock)?;
    // (Bitset words hold no references, so a shared block needs no increments.)
    if nb != b {
        // The shadow dropped the old block's count, but the btree still points at it; the
        // overwrite below drops it again, so take one back first.
        tm.inc(b)?;
        root = btree::insert(tm, root, index, nb, ARRAY_TREE)?;
    }
    Ok((root, nb))
}

/// Sets word `w` to `v` (`dm_array_set_value`); returns the new root.
pub(crate) fn set_word_value<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    w: u64,
    v: u64,
) -> Result<u64, MetadataError> {
    let index = w / ENTRIES;
    let (root, ab) = shadow_ablock(tm, root, index)?;
    let entry = (w % ENTRIES) as u32;
    tm.write(ab, |blk| {
        let nr = nr_entries(blk);
        if entry >= nr {
            return Err(array_entries_error(ab, index, entry + 1, nr));
        }
        set_word(blk, entry, v);
        Ok(())
    })??;
    Ok(root)
}

/// Sets exactly the bits of `dirty` in the bitset (dm-clone's `__flush_dmap` with
/// dm-bitset's one-word cache): per dirty word in ascending order, read the on-disk word,
/// OR in the dirty bits, write it back. Returns the new root.
pub(crate) fn set_bits<D: BlockDev>(
    tm: &mut Tm<D>,
    mut root: u64,
    dirty: &DirtySet,
) -> Result<u64, MetadataError> {
    for (w, mask) in dirty.words() {
        let old = get_word(tm, root, w)?;
        root = set_word_value(tm, root, w, old | mask)?;
    }
    Ok(root)
}

/// Reads the whole bitset (`nr_words` words) and calls `f(word_index, word)` for each, in
/// order, checking the array's shape: keys 0, 1, 2, ..., full blocks of 509 words and a
/// tail block of the right length. Array blocks are read in runs of adjacent blocks.
pub(crate) fn for_each_word<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    nr_words: u64,
    f: &mut dyn FnMut(u64, u64),
) -> Result<(), MetadataError> {
    let expected_blocks = nr_array_blocks(nr_words);
    let mut next_index = 0u64;
    let mut words_seen = 0u64;
    let mut run_buf: Vec<u8> = Vec::new();
    let mut leaf_depth: Option<usize> = None;
    let mut stack: Vec<(u64, usize, u64, Option<u64>)> = vec![(root, 0, 0, None)];
    let mut scratch = zeroed_block();
    while let Some((b, depth, low, high)) = stack.pop() {
        if depth >= MAX_DEPTH {
            return Err(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::TooDeep,
            ));
        }
        let (internal, entries) =
            tm.read_uncached(b, BlockKind::BtreeNode, &mut scratch, |n| {
                let h = check_node(n, b, ARRAY_TREE.leaf_value_size)?;
                let e: Vec<(u64, u64)> = (0..h.nr_entries)
                    .map(|i| (key(n, i), value64(n, i)))
                    .collect();
                Ok::<_, MetadataError>((h.is_internal(), e))
            })??;
        if entries.is_empty() && depth > 0 {
            return Err(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::EmptyNode,
            ));
        }
        btree::check_keys(b, &entries, low, high)?;
        if internal {
            for (i, &(k, child)) in entries.iter().enumerate().rev() {
                let next = entries.get(i + 1).map(|e| e.0).or(high);
                stack.push((child, depth + 1, k, next));
            }
            continue;
        }
        match leaf_depth {
            None => leaf_depth = Some(depth),
            Some(d) if d != depth => {
                return Err(MetadataError::corrupt(
                    BlockKind::BtreeNode,
                    b,
                    Corruption::UnevenDepth,
                ));
            }
            Some(_) => {}
        }
        // Check the keys, then read the array blocks in runs of adjacent locations.
        for &(k, _) in &entries {
            if k != next_index || k >= expected_blocks {
                return Err(MetadataError::corrupt(
                    BlockKind::BtreeNode,
                    b,
                    Corruption::ArrayKeys {
                        expected: next_index,
                        found: k,
                    },
                ));
            }
            next_index += 1;
        }
        let mut i = 0;
        while i < entries.len() {
            let start = entries[i].1;
            let mut j = i + 1;
            while j < entries.len()
                && start.checked_add((j - i) as u64) == Some(entries[j].1)
                && j - i < 256
            {
                j += 1;
            }
            tm.read_run_raw(start, j - i, &mut run_buf)?;
            for (n, chunk) in run_buf.chunks_exact(BLOCK_SIZE).enumerate() {
                let mut blk: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
                blk.copy_from_slice(chunk);
                let loc = start + n as u64;
                let index = entries[i + n].0;
                words_seen += visit_array_block(&blk, loc, index, nr_words, f)?;
            }
            i = j;
        }
    }
    if next_index != expected_blocks || words_seen != nr_words {
        return Err(MetadataError::corrupt(
            BlockKind::BtreeNode,
            root,
            Corruption::ArrayLength {
                expected_words: nr_words,
                found_words: words_seen,
            },
        ));
    }
    Ok(())
}

/// Validates array block `index` (at `loc`) and hands its words to `f`; returns how many.
fn visit_array_block(
    blk: &BlockBuf,
    loc: u64,
    index: u64,
    nr_words: u64,
    f: &mut dyn FnMut(u64, u64),
) -> Result<u64, MetadataError> {
    validate_envelope(blk, BlockKind::ArrayBlock, loc)?;
    let h = check_array_block(blk, loc)?;
    let expected = (nr_words - index * ENTRIES).min(ENTRIES) as u32;
    if h.nr_entries != expected {
        return Err(array_entries_error(loc, index, expected, h.nr_entries));
    }
    let base = index * ENTRIES;
    for e in 0..h.nr_entries {
        f(base + u64::from(e), word(blk, e));
    }
    Ok(u64::from(h.nr_entries))
}

/// Loads the bitset into `map` (every word replaced, so bits not on disk are cleared).
pub(crate) fn load_into<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    map: &HydrationMap,
) -> Result<(), MetadataError> {
    let nr_words = map.nr_words();
    for_each_word(tm, root, nr_words, &mut |w, v| map.store_word(w, v))
}
