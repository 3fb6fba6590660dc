//! The transaction manager and the metadata space map.
//!
//! **Shadowing.** A block written in the current transaction is a *shadow*: either a new
//! block, or a copy of a committed block made at a free location ("copy-on-write"). The
//! committed blocks are never written, so the last committed superblock keeps describing a
//! complete, consistent tree until the next superblock write switches to the new one.
//!
//! **Allocation.** Reference counts live in the metadata space map, which is itself made of
//! metadata blocks (an index block and bitmap blocks) that must be shadowed when they
//! change, which needs allocations, which change counts... The kernel breaks this recursion
//! by deferring the count changes made while a space map operation is in progress (a queue
//! of "block ops" applied when the outermost operation ends). A block is allocated only if
//! it is free both in the current transaction and in the last committed one, searching
//! forward from a cursor that moves past each allocation (and wraps around).
//!
//! This module reproduces that algorithm step for step (the order of allocations, count
//! changes and hint updates), so that clonebd writes the same blocks at the same places as
//! the kernel. Nothing here knows about dm-clone: the btree, array and store modules build
//! on the operations below (`new_block`, `shadow`, `inc`, `dec`, `read`, `write`,
//! `pre_commit`, `commit`).
//!
//! **Memory.** Blocks written in the transaction stay in memory until the commit writes
//! them; past `DIRTY_LIMIT` blocks they are written early (they live at locations free in
//! the committed state, so writing them early can never damage it). Committed space map
//! and btree blocks are kept in a bounded read cache.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use clonebd_core::BlockDev;

use crate::error::{BlockKind, Corruption, IoOp, MetadataError, Unsupported};
use crate::format::space_map::{
    ENTRIES_PER_BITMAP, IndexEntry, MAX_METADATA_BITMAPS, MetadataIndex, SmRoot, bitmap_get,
    bitmap_set, bitmap_word_full, nr_bitmaps,
};
use crate::format::superblock::{SUPERBLOCK_LOCATION, Superblock};
use crate::format::{BLOCK_SIZE, BlockBuf, seal, validate_envelope, zeroed_block};

/// A fast hasher for block numbers (they are not attacker-chosen keys of a long-lived
/// table, and SipHash dominated the cost of small transactions).
#[derive(Default, Clone, Copy)]
pub(crate) struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

/// Blocks of the transaction kept in memory before they are written early.
const DIRTY_LIMIT: usize = 4096;
/// Committed blocks kept in the read cache.
const CLEAN_LIMIT: usize = 2048;
/// Largest single write when flushing a transaction (in blocks).
const MAX_WRITE_RUN: usize = 256;

/// The low-level space map state (`struct ll_disk` of the metadata space map).
#[derive(Debug, Clone)]
pub(crate) struct Ll {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub bitmap_root: u64,
    pub ref_count_root: u64,
    pub index: Box<MetadataIndex>,
    pub index_changed: bool,
}

impl Ll {
    fn empty() -> Self {
        Self {
            nr_blocks: 0,
            nr_allocated: 0,
            bitmap_root: 0,
            ref_count_root: 0,
            index: Box::default(),
            index_changed: false,
        }
    }

    fn entry(&self, i: u64) -> Option<IndexEntry> {
        if i >= nr_bitmaps(self.nr_blocks) {
            return None;
        }
        self.index.entries.get(i as usize).copied()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BopKind {
    Inc,
    Dec,
}

/// A deferred count change on blocks `[b, e)`.
#[derive(Debug, Clone, Copy)]
struct Bop {
    kind: BopKind,
    b: u64,
    e: u64,
}

/// A block held in memory: its type (for sealing) and bytes.
struct Held {
    kind: BlockKind,
    data: Box<BlockBuf>,
}

/// Transaction manager plus metadata space map over a device.
pub(crate) struct Tm<D> {
    dev: D,
    dev_blocks: u64,
    ll: Ll,
    old: Ll,
    begin: u64,
    recursion: u32,
    bops: VecDeque<Bop>,
    allocated_this_transaction: u64,
    bootstrap: bool,
    /// Blocks new or shadowed in this transaction, with their type.
    shadows: BlockMap<BlockKind>,
    dirty: BlockMap<Held>,
    clean: BlockMap<Held>,
}

impl<D: BlockDev> Tm<D> {
    /// Creates a new space map covering `min(dev_blocks, 4161600)` blocks, with block 0
    /// reserved for the superblock (`dm_tm_create_with_sm` and `dm_sm_metadata_create`).
    pub fn create(dev: D, dev_blocks: u64) -> Result<Self, MetadataError> {
        let nr_blocks = dev_blocks.min(crate::format::space_map::MAX_METADATA_BLOCKS);
        let mut tm = Self::blank(dev, dev_blocks);
        tm.bootstrap = true;
        tm.begin = SUPERBLOCK_LOCATION + 1;
        // The space map's own structures, allocated linearly by the bootstrap allocator.
        tm.ll.bitmap_root = tm.new_block(BlockKind::SpaceMapIndex)?;
        tm.ll.ref_count_root = tm.new_empty_leaf(crate::format::space_map::REF_COUNT_VALUE_SIZE)?;
        tm.ll_extend(nr_blocks)?;
        tm.bootstrap = false;
        // Account for everything the bootstrap allocator handed out, superblock included.
        tm.bops.push_back(Bop {
            kind: BopKind::Inc,
            b: SUPERBLOCK_LOCATION,
            e: tm.begin,
        });
        tm.apply_bops()?;
        tm.sm_commit()?;
        Ok(tm)
    }

    /// Opens the space map described by `root` (`dm_sm_metadata_open`).
    pub fn open(dev: D, dev_blocks: u64, root: &SmRoot) -> Result<Self, MetadataError> {
        let mut tm = Self::blank(dev, dev_blocks);
        tm.load_root(root)?;
        Ok(tm)
    }

    /// Forgets the transaction and everything cached, and reloads the space map from
    /// `root` (the kernel's abort reopens everything from the superblock).
    pub fn reopen(&mut self, root: &SmRoot) -> Result<(), MetadataError> {
        self.reset_transaction();
        self.clean.clear();
        self.load_root(root)
    }

    fn blank(dev: D, dev_blocks: u64) -> Self {
        Self {
            dev,
            dev_blocks,
            ll: Ll::empty(),
            old: Ll::empty(),
            begin: 0,
            recursion: 0,
            bops: VecDeque::new(),
            allocated_this_transaction: 0,
            bootstrap: false,
            shadows: BlockMap::default(),
            dirty: BlockMap::default(),
            clean: BlockMap::default(),
        }
    }

    fn load_root(&mut self, root: &SmRoot) -> Result<(), MetadataError> {
        let max = self
            .dev_blocks
            .min(crate::format::space_map::MAX_METADATA_BLOCKS);
        if root.nr_blocks == 0 || root.nr_blocks > max {
            return Err(MetadataError::corrupt(
                BlockKind::Superblock,
                SUPERBLOCK_LOCATION,
                Corruption::SpaceMapSize {
                    nr_blocks: root.nr_blocks,
                    device_blocks: max,
                },
            ));
        }
        let mut ll = Ll::empty();
        ll.nr_blocks = root.nr_blocks;
        ll.nr_allocated = root.nr_allocated;
        ll.bitmap_root = root.bitmap_root;
        ll.ref_count_root = root.ref_count_root;
        self.ll = ll;
        let index = self.read(
            root.bitmap_root,
            BlockKind::SpaceMapIndex,
            MetadataIndex::decode,
        )?;
        *self.ll.index = index;
        self.old = self.ll.clone();
        self.begin = 0;
        self.recursion = 0;
        self.bops.clear();
        self.allocated_this_transaction = 0;
        Ok(())
    }

    /// Drops every uncommitted change held in memory (the on-disk state is untouched).
    pub fn reset_transaction(&mut self) {
        self.dirty.clear();
        self.shadows.clear();
        self.bops.clear();
        self.recursion = 0;
        self.allocated_this_transaction = 0;
        self.ll = self.old.clone();
    }

    /// The device.
    pub fn dev(&self) -> &D {
        &self.dev
    }

    /// Gives the device back.
    pub fn into_dev(self) -> D {
        self.dev
    }

    /// Blocks the space map covers.
    pub fn nr_blocks(&self) -> u64 {
        self.ll.nr_blocks
    }

    /// Blocks in use, as the kernel's status reports them: total minus free, where free is
    /// counted from the last commit minus this transaction's allocations.
    pub fn nr_used(&self) -> u64 {
        let free = self
            .old
            .nr_blocks
            .saturating_sub(self.old.nr_allocated)
            .saturating_sub(self.allocated_this_transaction);
        self.ll.nr_blocks.saturating_sub(free)
    }

    /// The space map root to store in the superblock.
    pub fn sm_root(&self) -> SmRoot {
        SmRoot {
            nr_blocks: self.ll.nr_blocks,
            nr_allocated: self.ll.nr_allocated,
            bitmap_root: self.ll.bitmap_root,
            ref_count_root: self.ll.ref_count_root,
        }
    }

    // ----------------------------------------------------------------------------------
    // Block access.

    fn check_bounds(&self, b: u64, kind: BlockKind) -> Result<(), MetadataError> {
        if b >= self.ll.nr_blocks.max(1) || b >= self.dev_blocks {
            return Err(MetadataError::corrupt(
                kind,
                b,
                Corruption::BlockOutOfBounds {
                    target: b,
                    nr_blocks: self.ll.nr_blocks,
                },
            ));
        }
        Ok(())
    }

    fn read_device(&self, b: u64, buf: &mut BlockBuf) -> Result<(), MetadataError> {
        self.dev
            .read_at(buf, b * BLOCK_SIZE as u64)
            .map_err(|source| MetadataError::Io {
                op: IoOp::Read,
                block: b,
                source,
            })
    }

    /// Makes sure block `b` is in memory (transaction or cache), validated as `kind`.
    fn load(&mut self, b: u64, kind: BlockKind) -> Result<(), MetadataError> {
        if self.dirty.contains_key(&b) {
            return Ok(());
        }
        if let Some(h) = self.clean.get(&b) {
            if h.kind == kind {
                return Ok(());
            }
            validate_envelope(&h.data, kind, b)?;
            return Ok(());
        }
        self.check_bounds(b, kind)?;
        let mut data = zeroed_block();
        self.read_device(b, &mut data)?;
        validate_envelope(&data, kind, b)?;
        let held = Held { kind, data };
        if self.shadows.contains_key(&b) {
            // Written early in this transaction: it belongs with the transaction's blocks.
            self.dirty.insert(b, held);
        } else {
            if self.clean.len() >= CLEAN_LIMIT {
                self.clean.clear();
            }
            self.clean.insert(b, held);
        }
        Ok(())
    }

    fn held(&self, b: u64) -> Option<&Held> {
        self.dirty.get(&b).or_else(|| self.clean.get(&b))
    }

    /// Runs `f` on block `b`, read (and validated as `kind`) if not in memory.
    pub fn read<R>(
        &mut self,
        b: u64,
        kind: BlockKind,
        f: impl FnOnce(&BlockBuf) -> R,
    ) -> Result<R, MetadataError> {
        self.load(b, kind)?;
        match self.held(b) {
            Some(h) => Ok(f(&h.data)),
            None => Err(MetadataError::corrupt(
                kind,
                b,
                Corruption::BlockOutOfBounds {
                    target: b,
                    nr_blocks: self.ll.nr_blocks,
                },
            )),
        }
    }

    /// Runs `f` on block `b` without caching it (for bulk reads of array blocks). The
    /// block is validated as `kind`; `scratch` is a caller-owned buffer.
    pub fn read_uncached<R>(
        &mut self,
        b: u64,
        kind: BlockKind,
        scratch: &mut BlockBuf,
        f: impl FnOnce(&BlockBuf) -> R,
    ) -> Result<R, MetadataError> {
        if let Some(h) = self.held(b) {
            if h.kind != kind {
                validate_envelope(&h.data, kind, b)?;
            }
            return Ok(f(&h.data));
        }
        self.check_bounds(b, kind)?;
        self.read_device(b, scratch)?;
        validate_envelope(scratch, kind, b)?;
        Ok(f(scratch))
    }

    /// Reads `n` consecutive blocks starting at `b` into `buf` straight from the device
    /// (blocks of the open transaction are taken from memory). Not validated.
    pub fn read_run_raw(
        &mut self,
        b: u64,
        n: usize,
        buf: &mut Vec<u8>,
    ) -> Result<(), MetadataError> {
        for i in 0..n as u64 {
            self.check_bounds(b + i, BlockKind::ArrayBlock)?;
        }
        buf.resize(n * BLOCK_SIZE, 0);
        self.dev
            .read_at(buf, b * BLOCK_SIZE as u64)
            .map_err(|source| MetadataError::Io {
                op: IoOp::Read,
                block: b,
                source,
            })?;
        for i in 0..n {
            if let Some(h) = self.dirty.get(&(b + i as u64)) {
                buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].copy_from_slice(&h.data[..]);
            }
        }
        Ok(())
    }

    /// Runs `f` on block `b` of the transaction (a new block or a shadow) for writing.
    pub fn write<R>(
        &mut self,
        b: u64,
        f: impl FnOnce(&mut BlockBuf) -> R,
    ) -> Result<R, MetadataError> {
        // The whole crash-safety argument rests on this: committed blocks are never written.
        assert!(
            self.shadows.contains_key(&b),
            "write to block {b}, which is not part of the transaction"
        );
        if !self.dirty.contains_key(&b) {
            // Written early: bring it back (it is on disk, sealed, and still ours).
            let kind = match (self.shadows.get(&b), self.clean.get(&b)) {
                (Some(&k), _) => k,
                (None, Some(h)) => h.kind,
                (None, None) => BlockKind::BtreeNode,
            };
            match self.clean.remove(&b) {
                Some(h) => {
                    self.dirty.insert(b, h);
                }
                None => {
                    let mut data = zeroed_block();
                    self.read_device(b, &mut data)?;
                    self.dirty.insert(b, Held { kind, data });
                }
            }
        }
        match self.dirty.get_mut(&b) {
            Some(h) => Ok(f(&mut h.data)),
            None => Err(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::BlockOutOfBounds {
                    target: b,
                    nr_blocks: self.ll.nr_blocks,
                },
            )),
        }
    }

    /// A copy of block `b`.
    pub fn copy(&mut self, b: u64, kind: BlockKind) -> Result<Box<BlockBuf>, MetadataError> {
        self.read(b, kind, |d| Box::new(*d))
    }

    fn hold_new(&mut self, b: u64, kind: BlockKind, data: Box<BlockBuf>) {
        self.clean.remove(&b);
        self.dirty.insert(b, Held { kind, data });
        self.shadows.insert(b, kind);
    }

    fn maybe_write_early(&mut self) -> Result<(), MetadataError> {
        if self.dirty.len() >= DIRTY_LIMIT {
            self.write_dirty()?;
        }
        Ok(())
    }

    /// A new zeroed block for this transaction (`dm_tm_new_block`).
    pub fn new_block(&mut self, kind: BlockKind) -> Result<u64, MetadataError> {
        self.maybe_write_early()?;
        let b = self.sm_new_block()?;
        if b >= self.dev_blocks {
            return Err(MetadataError::NoSpace {
                nr_blocks: self.ll.nr_blocks,
            });
        }
        self.hold_new(b, kind, zeroed_block());
        Ok(b)
    }

    /// A new block holding an empty btree leaf for values of `vsize` bytes: a new tree's
    /// root (`dm_btree_empty`). The space map makes its reference-count tree this way, so
    /// the transaction manager needs nothing of the btree code above it.
    pub fn new_empty_leaf(&mut self, vsize: u32) -> Result<u64, MetadataError> {
        let b = self.new_block(BlockKind::BtreeNode)?;
        self.write(b, |n| crate::format::btree_node::init_empty_leaf(n, vsize))?;
        Ok(b)
    }

    /// Makes `orig` writable in this transaction (`dm_tm_shadow_block`): the block itself
    /// if it is already a shadow and not shared, otherwise a copy at a newly allocated
    /// block, decrementing the original's count. Returns the location and whether the
    /// original was shared (then the caller must increment the children's counts).
    pub fn shadow(&mut self, orig: u64, kind: BlockKind) -> Result<(u64, bool), MetadataError> {
        let shared = self.count_is_more_than_one(orig)?;
        if self.shadows.contains_key(&orig) && !shared {
            self.load(orig, kind)?;
            self.write(orig, |_| ())?;
            return Ok((orig, false));
        }
        self.maybe_write_early()?;
        let new = self.sm_new_block()?;
        if new >= self.dev_blocks {
            return Err(MetadataError::NoSpace {
                nr_blocks: self.ll.nr_blocks,
            });
        }
        self.sm_dec_range(orig, orig.saturating_add(1))?;
        let data = self.copy(orig, kind)?;
        self.hold_new(new, kind, data);
        Ok((new, shared))
    }

    /// Increments the count of `b` (`dm_tm_inc`).
    pub fn inc(&mut self, b: u64) -> Result<(), MetadataError> {
        self.sm_inc_range(b, b.saturating_add(1))
    }

    /// Increments the counts of `[b, e)`.
    pub fn inc_range(&mut self, b: u64, e: u64) -> Result<(), MetadataError> {
        self.sm_inc_range(b, e)
    }

    /// Decrements the count of `b` (`dm_tm_dec`).
    pub fn dec(&mut self, b: u64) -> Result<(), MetadataError> {
        self.sm_dec_range(b, b.saturating_add(1))
    }

    // ----------------------------------------------------------------------------------
    // Commit.

    /// Finishes the space map's part of the transaction (`dm_tm_pre_commit`): shadows the
    /// index block if any bitmap changed and makes the current state the committed one for
    /// allocation purposes. Returns the root to store in the superblock.
    pub fn pre_commit(&mut self) -> Result<SmRoot, MetadataError> {
        self.sm_commit()?;
        Ok(self.sm_root())
    }

    /// Writes every block of the transaction and flushes the device.
    pub fn write_transaction(&mut self) -> Result<(), MetadataError> {
        self.write_dirty()?;
        self.flush()
    }

    /// Writes `sb` to block 0 and flushes: the switch to the new transaction
    /// (`dm_tm_commit`). Afterwards nothing of the transaction is a shadow any more.
    pub fn commit_superblock(&mut self, sb: &Superblock) -> Result<(), MetadataError> {
        let b = sb.encode();
        self.dev
            .write_at(&b[..], SUPERBLOCK_LOCATION)
            .map_err(|source| MetadataError::Io {
                op: IoOp::Write,
                block: SUPERBLOCK_LOCATION,
                source,
            })?;
        self.flush()?;
        self.shadows.clear();
        Ok(())
    }

    fn flush(&self) -> Result<(), MetadataError> {
        self.dev.flush().map_err(|source| MetadataError::Io {
            op: IoOp::Flush,
            block: 0,
            source,
        })
    }

    /// Writes all blocks held for the transaction, sealed, in ascending order and in runs
    /// of adjacent blocks; they move to the read cache.
    fn write_dirty(&mut self) -> Result<(), MetadataError> {
        let mut locs: Vec<u64> = self.dirty.keys().copied().collect();
        locs.sort_unstable();
        let mut buf: Vec<u8> = Vec::with_capacity(MAX_WRITE_RUN * BLOCK_SIZE);
        let mut i = 0;
        while i < locs.len() {
            let start = locs[i];
            let mut j = i;
            buf.clear();
            while j < locs.len() && locs[j] == start + (j - i) as u64 && j - i < MAX_WRITE_RUN {
                if let Some(h) = self.dirty.get_mut(&locs[j]) {
                    seal(&mut h.data, h.kind, locs[j]);
                    buf.extend_from_slice(&h.data[..]);
                }
                j += 1;
            }
            self.dev
                .write_at(&buf, start * BLOCK_SIZE as u64)
                .map_err(|source| MetadataError::Io {
                    op: IoOp::Write,
                    block: start,
                    source,
                })?;
            i = j;
        }
        if self.clean.len() + self.dirty.len() > CLEAN_LIMIT {
            self.clean.clear();
        }
        for (b, h) in self.dirty.drain() {
            if self.clean.len() < CLEAN_LIMIT {
                self.clean.insert(b, h);
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------
    // The metadata space map (dm-space-map-metadata and dm-space-map-common).

    fn in_(&mut self) {
        self.recursion += 1;
    }

    fn out(&mut self) -> Result<(), MetadataError> {
        let r = if self.recursion == 1 {
            self.apply_bops()
        } else {
            Ok(())
        };
        self.recursion = self.recursion.saturating_sub(1);
        r
    }

    fn apply_bops(&mut self) -> Result<(), MetadataError> {
        while let Some(&op) = self.bops.front() {
            match op.kind {
                BopKind::Inc => self.ll_mutate(op.b, op.e, BopKind::Inc)?,
                BopKind::Dec => self.ll_mutate(op.b, op.e, BopKind::Dec)?,
            }
            self.bops.pop_front();
        }
        Ok(())
    }

    fn adjustment(&self, b: u64) -> i64 {
        self.bops
            .iter()
            .filter(|op| op.b <= b && b < op.e)
            .map(|op| match op.kind {
                BopKind::Inc => 1,
                BopKind::Dec => -1,
            })
            .sum()
    }

    /// The two-bit count of `b` in the current (`old == false`) or committed space map.
    fn lookup_bitmap(&mut self, old: bool, b: u64) -> Result<u32, MetadataError> {
        let ll = if old { &self.old } else { &self.ll };
        let Some(ie) = ll.entry(b / ENTRIES_PER_BITMAP) else {
            return Err(MetadataError::corrupt(
                BlockKind::SpaceMapIndex,
                ll.bitmap_root,
                Corruption::BlockOutOfBounds {
                    target: b,
                    nr_blocks: ll.nr_blocks,
                },
            ));
        };
        let bit = b % ENTRIES_PER_BITMAP;
        self.read(ie.blocknr, BlockKind::SpaceMapBitmap, |blk| {
            bitmap_get(blk, bit)
        })
    }

    /// `dm_sm_count_is_more_than_one`, including deferred changes.
    pub fn count_is_more_than_one(&mut self, b: u64) -> Result<bool, MetadataError> {
        let adj = self.adjustment(b);
        if adj > 1 {
            return Ok(true);
        }
        let rc = self.lookup_bitmap(false, b)?;
        if rc == 3 {
            return Ok(true);
        }
        Ok(i64::from(rc) + adj > 1)
    }

    /// `dm_sm_get_count`, including deferred changes.
    pub fn ref_count(&mut self, b: u64) -> Result<u32, MetadataError> {
        let rc = self.lookup_bitmap(false, b)?;
        if rc == 3 {
            return Err(MetadataError::Unsupported(Unsupported::RefCountAboveTwo {
                block: b,
            }));
        }
        let v = i64::from(rc) + self.adjustment(b);
        Ok(u32::try_from(v.max(0)).unwrap_or(0))
    }

    fn sm_inc_range(&mut self, b: u64, e: u64) -> Result<(), MetadataError> {
        self.sm_mutate_range(b, e, BopKind::Inc)
    }

    fn sm_dec_range(&mut self, b: u64, e: u64) -> Result<(), MetadataError> {
        self.sm_mutate_range(b, e, BopKind::Dec)
    }

    fn sm_mutate_range(&mut self, b: u64, e: u64, kind: BopKind) -> Result<(), MetadataError> {
        if self.bootstrap || self.recursion > 0 {
            self.bops.push_back(Bop { kind, b, e });
            return Ok(());
        }
        self.in_();
        let r = self.ll_mutate(b, e, kind);
        let r2 = self.out();
        r.and(r2)
    }

    /// `sm_metadata_new_block`.
    fn sm_new_block(&mut self) -> Result<u64, MetadataError> {
        if self.bootstrap {
            // The whole device is known to be unused: hand out blocks in order.
            if self.begin == self.ll.nr_blocks {
                return Err(MetadataError::NoSpace {
                    nr_blocks: self.ll.nr_blocks,
                });
            }
            let b = self.begin;
            self.begin += 1;
            return Ok(b);
        }
        let b = match self.find_common_free(self.begin)? {
            Some(b) => b,
            // Nothing free after the cursor: search from the start, in case something
            // before it was freed.
            None => self.find_common_free(0)?.ok_or(MetadataError::NoSpace {
                nr_blocks: self.ll.nr_blocks,
            })?,
        };
        self.begin = b + 1;
        self.sm_inc_range(b, b + 1)?;
        self.allocated_this_transaction += 1;
        Ok(b)
    }

    /// A block free both now and in the last committed state, at or after `begin`.
    fn find_common_free(&mut self, mut begin: u64) -> Result<Option<u64>, MetadataError> {
        loop {
            let Some(b) = self.find_free(begin)? else {
                return Ok(None);
            };
            let count = if b >= self.old.nr_blocks {
                0
            } else {
                self.lookup_bitmap(true, b)?
            };
            if count == 0 {
                return Ok(Some(b));
            }
            begin = b + 1;
        }
    }

    /// `sm_ll_find_free_block` over the current space map, from `begin` to the end.
    fn find_free(&mut self, begin: u64) -> Result<Option<u64>, MetadataError> {
        let end = self.ll.nr_blocks;
        let index_begin = begin / ENTRIES_PER_BITMAP;
        let mut bit_begin = begin % ENTRIES_PER_BITMAP;
        let index_end = end.div_ceil(ENTRIES_PER_BITMAP);
        // As in the kernel, the bound within the last bitmap is `end % entries`, so when
        // the space map ends exactly on a bitmap boundary its last bitmap is not searched.
        let end_bit = end % ENTRIES_PER_BITMAP;
        let mut i = index_begin;
        while i < index_end {
            let Some(ie) = self.ll.entry(i) else {
                break;
            };
            if ie.nr_free == 0 {
                i += 1;
                bit_begin = 0;
                continue;
            }
            let bit_end = if i == index_end - 1 {
                end_bit
            } else {
                ENTRIES_PER_BITMAP
            };
            let start = bit_begin.max(u64::from(ie.none_free_before));
            let pos = self.read(ie.blocknr, BlockKind::SpaceMapBitmap, |blk| {
                find_free_in_bitmap(blk, start, bit_end)
            })?;
            if let Some(p) = pos {
                return Ok(Some(i * ENTRIES_PER_BITMAP + p));
            }
            i += 1;
            bit_begin = 0;
        }
        Ok(None)
    }

    /// `sm_ll_inc`/`sm_ll_dec` on `[b, e)`: per bitmap block, shadow it, change the counts,
    /// update its index entry (free count and the none-free-before hint).
    fn ll_mutate(&mut self, mut b: u64, e: u64, kind: BopKind) -> Result<(), MetadataError> {
        while b < e {
            let i = b / ENTRIES_PER_BITMAP;
            let Some(mut ie) = self.ll.entry(i) else {
                return Err(MetadataError::corrupt(
                    BlockKind::SpaceMapIndex,
                    self.ll.bitmap_root,
                    Corruption::BlockOutOfBounds {
                        target: b,
                        nr_blocks: self.ll.nr_blocks,
                    },
                ));
            };
            let bit_begin = b % ENTRIES_PER_BITMAP;
            let bit_end = ENTRIES_PER_BITMAP.min(bit_begin + (e - b));
            let (nb, _) = self.shadow(ie.blocknr, BlockKind::SpaceMapBitmap)?;
            ie.blocknr = nb;
            let base = i * ENTRIES_PER_BITMAP;
            let mut nr_allocated = self.ll.nr_allocated;
            let outcome = self.write(nb, |blk| {
                for bit in bit_begin..bit_end {
                    let old = bitmap_get(blk, bit);
                    match (kind, old) {
                        (BopKind::Inc, 0) => {
                            bitmap_set(blk, bit, 1);
                            nr_allocated += 1;
                            ie.nr_free = ie.nr_free.saturating_sub(1);
                            if u64::from(ie.none_free_before) == bit {
                                ie.none_free_before = (bit + 1) as u32;
                            }
                        }
                        (BopKind::Inc, 1) => bitmap_set(blk, bit, 2),
                        (BopKind::Dec, 0) => {
                            return Err(MetadataError::corrupt(
                                BlockKind::SpaceMapBitmap,
                                nb,
                                Corruption::CountUnderflow { target: base + bit },
                            ));
                        }
                        (BopKind::Dec, 1) => {
                            bitmap_set(blk, bit, 0);
                            nr_allocated = nr_allocated.saturating_sub(1);
                            ie.nr_free = ie.nr_free.saturating_add(1);
                            ie.none_free_before = ie.none_free_before.min(bit as u32);
                        }
                        (BopKind::Dec, 2) => bitmap_set(blk, bit, 1),
                        _ => {
                            return Err(MetadataError::Unsupported(
                                Unsupported::RefCountAboveTwo { block: base + bit },
                            ));
                        }
                    }
                }
                Ok(())
            })?;
            outcome?;
            self.ll.nr_allocated = nr_allocated;
            if let Some(slot) = self.ll.index.entries.get_mut(i as usize) {
                *slot = ie;
            }
            self.ll.index_changed = true;
            b += bit_end - bit_begin;
        }
        Ok(())
    }

    /// `sm_ll_extend`: grows the space map to `nr_blocks`, creating bitmap blocks.
    fn ll_extend(&mut self, nr_blocks: u64) -> Result<(), MetadataError> {
        let old_bitmaps = nr_bitmaps(self.ll.nr_blocks);
        let bitmaps = nr_bitmaps(nr_blocks);
        if bitmaps > MAX_METADATA_BITMAPS as u64 {
            return Err(MetadataError::NoSpace {
                nr_blocks: self.ll.nr_blocks,
            });
        }
        self.ll.nr_blocks = nr_blocks;
        for i in old_bitmaps..bitmaps {
            let b = self.new_block(BlockKind::SpaceMapBitmap)?;
            if let Some(slot) = self.ll.index.entries.get_mut(i as usize) {
                *slot = IndexEntry {
                    blocknr: b,
                    nr_free: ENTRIES_PER_BITMAP as u32,
                    none_free_before: 0,
                };
            }
            self.ll.index_changed = true;
        }
        Ok(())
    }

    /// `sm_metadata_commit`: writes the index into a shadow of the index block if it
    /// changed, then the current state becomes the committed one.
    fn sm_commit(&mut self) -> Result<(), MetadataError> {
        if self.ll.index_changed {
            let (nb, _) = self.shadow(self.ll.bitmap_root, BlockKind::SpaceMapIndex)?;
            // The shadow's own allocation has been accounted for by now: copy the index.
            let index = self.ll.index.clone();
            self.write(nb, |blk| index.encode_into(blk))?;
            self.ll.bitmap_root = nb;
            self.ll.index_changed = false;
        }
        self.old = self.ll.clone();
        self.allocated_this_transaction = 0;
        Ok(())
    }
}

/// `sm_find_free` within one bitmap block: the first zero count in `[begin, end)`, skipping
/// whole words that are fully used.
fn find_free_in_bitmap(blk: &BlockBuf, mut begin: u64, end: u64) -> Option<u64> {
    while begin < end {
        if begin.is_multiple_of(32) && bitmap_word_full(blk, begin) {
            begin += 32;
            continue;
        }
        if bitmap_get(blk, begin) == 0 {
            return Some(begin);
        }
        begin += 1;
    }
    None
}
