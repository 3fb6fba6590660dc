//! The persistent-data btree (one level of `u64` keys), on top of the transaction manager.
//!
//! Lookups walk down by `lower_bound`. Inserts shadow the path from the root to the leaf
//! (so a changed btree is a new set of blocks sharing the untouched subtrees with the
//! committed one), keeping at most two nodes of the path at a time, and make room in a full
//! node the way the kernel does: a full root gets two new children beneath it; any other
//! full node first gives entries to a sibling with at least 8 free slots (left sibling
//! first), and otherwise splits (one node into two at either end of its parent, two into
//! three elsewhere). Because the same steps move the same bytes, the resulting nodes match
//! the kernel's byte for byte, including the stale bytes past `nr_entries`.
//!
//! Two trees use this code: the bitset's array btree (values: array block locations,
//! reference counted), and the space map's reference-count tree (values: `u32` counts).

use clonebd_core::BlockDev;

use crate::error::{BlockKind, Corruption, MetadataError};
use crate::format::BlockBuf;
use crate::format::btree_node::{
    INTERNAL_NODE, LEAF_NODE, NODE_HEADER_SIZE, calc_max_entries, check_node, flags, key,
    lower_bound, max_entries, nr_entries, set_header, set_key, set_nr_entries, set_value64,
    value_offset, value_size, value64,
};
use crate::tm::Tm;

/// Most levels a valid tree can have (252^16 keys is far beyond any metadata device).
pub(crate) const MAX_DEPTH: usize = 16;
/// A sibling needs this many free entries for a rebalance to be worth it.
const SPACE_THRESHOLD: u32 = 8;

/// How often each way of making room was taken (tests check that all are exercised).
#[cfg(test)]
static MAKE_ROOM: [std::sync::atomic::AtomicUsize; 5] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 5];

#[cfg(test)]
fn count_path(i: usize) {
    MAKE_ROOM[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(not(test))]
fn count_path(_: usize) {}

/// What a tree's leaf values are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Values {
    /// Locations of array blocks, each holding a reference on its block.
    ArrayBlocks,
    /// Plain `u32` numbers (reference counts). The space map's reference-count tree is
    /// only ever made empty (`Tm::new_empty_leaf`), so only the tests build such a tree.
    #[cfg(test)]
    Counts,
}

/// A btree's value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tree {
    pub leaf_value_size: u32,
    pub values: Values,
}

/// The bitset's array btree.
pub(crate) const ARRAY_TREE: Tree = Tree {
    leaf_value_size: 8,
    values: Values::ArrayBlocks,
};

/// Reads node `b` and checks its structure.
pub(crate) fn read_header<D: BlockDev>(
    tm: &mut Tm<D>,
    b: u64,
    tree: Tree,
) -> Result<crate::format::btree_node::NodeHeader, MetadataError> {
    tm.read(b, BlockKind::BtreeNode, |n| {
        check_node(n, b, tree.leaf_value_size)
    })?
}

/// Creates an empty tree: a single empty leaf (`dm_btree_empty`).
pub(crate) fn empty<D: BlockDev>(tm: &mut Tm<D>, tree: Tree) -> Result<u64, MetadataError> {
    tm.new_empty_leaf(tree.leaf_value_size)
}

/// The value stored under `k`, as a `u64` (`dm_btree_lookup`).
pub(crate) fn lookup<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    k: u64,
    tree: Tree,
) -> Result<Option<u64>, MetadataError> {
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        let h = read_header(tm, block, tree)?;
        let (i, found_key, v) = tm.read(block, BlockKind::BtreeNode, |n| {
            let i = lower_bound(n, k);
            if i < 0 || i >= i64::from(h.nr_entries) {
                return (i, 0, 0);
            }
            let v = if h.is_internal() || tree.leaf_value_size == 8 {
                value64(n, i as u32)
            } else {
                u64::from(crate::format::btree_node::value32(n, i as u32))
            };
            (i, key(n, i as u32), v)
        })?;
        if i < 0 || i >= i64::from(h.nr_entries) {
            return Ok(None);
        }
        if h.is_internal() {
            block = v;
            continue;
        }
        return Ok((found_key == k).then_some(v));
    }
    Err(MetadataError::corrupt(
        BlockKind::BtreeNode,
        root,
        Corruption::TooDeep,
    ))
}

/// The path being shadowed: at most a parent and the current node.
struct Spine {
    nodes: [u64; 2],
    count: usize,
    root: u64,
}

impl Spine {
    fn new() -> Self {
        Self {
            nodes: [0; 2],
            count: 0,
            root: 0,
        }
    }

    fn current(&self) -> u64 {
        self.nodes[self.count.saturating_sub(1)]
    }

    fn parent(&self) -> u64 {
        self.nodes[0]
    }

    fn has_parent(&self) -> bool {
        self.count > 1
    }

    fn set_current(&mut self, b: u64) {
        let i = self.count.saturating_sub(1);
        self.nodes[i] = b;
    }
}

/// Increments the counts of everything a shared node points at (`inc_children`).
fn inc_children<D: BlockDev>(tm: &mut Tm<D>, b: u64, tree: Tree) -> Result<(), MetadataError> {
    let (internal, values) = tm.read(b, BlockKind::BtreeNode, |n| {
        let nr = nr_entries(n).min(max_entries(n));
        let internal = flags(n) & INTERNAL_NODE != 0;
        let vals: Vec<u64> = if internal || tree.values == Values::ArrayBlocks {
            (0..nr).map(|i| value64(n, i)).collect()
        } else {
            Vec::new()
        };
        (internal, vals)
    })?;
    if internal || tree.values == Values::ArrayBlocks {
        // In runs of consecutive blocks, as `dm_tm_with_runs` does.
        let mut i = 0;
        while i < values.len() {
            let start = values[i];
            let mut j = i + 1;
            while j < values.len() && start.checked_add((j - i) as u64) == Some(values[j]) {
                j += 1;
            }
            tm.inc_range(start, start.saturating_add((j - i) as u64))?;
            i = j;
        }
    }
    Ok(())
}

/// Drops a reference held by a leaf value (the value type's `dec`).
fn dec_value<D: BlockDev>(tm: &mut Tm<D>, tree: Tree, value: u64) -> Result<(), MetadataError> {
    if tree.values == Values::ArrayBlocks {
        // dm-array's block_dec: when dropping the last reference it reads the array block
        // to release its entries' references (bitset words hold none), then decrements.
        if tm.ref_count(value)? == 1 {
            tm.read(value, BlockKind::ArrayBlock, |_| ())?;
        }
        tm.dec(value)?;
    }
    Ok(())
}

fn shadow_step<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    b: u64,
    tree: Tree,
) -> Result<(), MetadataError> {
    if s.count == 2 {
        s.nodes[0] = s.nodes[1];
        s.count = 1;
    }
    read_header(tm, b, tree)?;
    let (loc, inc) = tm.shadow(b, BlockKind::BtreeNode)?;
    if inc {
        inc_children(tm, loc, tree)?;
    }
    s.nodes[s.count] = loc;
    if s.count == 0 {
        s.root = loc;
    }
    s.count += 1;
    Ok(())
}

/// Shadows child `index` of `parent` and points the parent at the shadow.
fn shadow_child<D: BlockDev>(
    tm: &mut Tm<D>,
    tree: Tree,
    parent: u64,
    index: u32,
) -> Result<u64, MetadataError> {
    let child = tm.read(parent, BlockKind::BtreeNode, |n| value64(n, index))?;
    read_header(tm, child, tree)?;
    let (loc, inc) = tm.shadow(child, BlockKind::BtreeNode)?;
    if inc {
        inc_children(tm, loc, tree)?;
    }
    tm.write(parent, |n| set_value64(n, index, loc))?;
    Ok(loc)
}

fn node_copy<D: BlockDev>(tm: &mut Tm<D>, b: u64) -> Result<Box<BlockBuf>, MetadataError> {
    tm.copy(b, BlockKind::BtreeNode)
}

fn node_store<D: BlockDev>(tm: &mut Tm<D>, b: u64, data: &BlockBuf) -> Result<(), MetadataError> {
    tm.write(b, |n| n.copy_from_slice(data))
}

// ---------------------------------------------------------------------------------------
// Moving entries between node buffers, byte for byte as the kernel does.

fn keys_range(i: u32, count: u32) -> std::ops::Range<usize> {
    let s = NODE_HEADER_SIZE + 8 * i as usize;
    s..s + 8 * count as usize
}

fn values_range(n: &BlockBuf, i: u32, count: u32) -> std::ops::Range<usize> {
    let s = value_offset(n, i);
    s..s + value_size(n) as usize * count as usize
}

/// Copies `count` entries from `src[soff..]` to `dest[doff..]` (different nodes).
fn copy_entries(dest: &mut BlockBuf, doff: u32, src: &BlockBuf, soff: u32, count: u32) {
    let vs = value_size(dest) as usize;
    dest[keys_range(doff, count)].copy_from_slice(&src[keys_range(soff, count)]);
    let d = value_offset(dest, doff);
    let s = value_offset(src, soff);
    let len = vs * count as usize;
    dest[d..d + len].copy_from_slice(&src[s..s + len]);
}

/// Moves `count` entries of `n` from `soff` to `doff` (ranges may overlap).
fn move_entries(n: &mut BlockBuf, doff: u32, soff: u32, count: u32) {
    let k = keys_range(soff, count);
    n.copy_within(k, keys_range(doff, 0).start);
    let v = values_range(n, soff, count);
    let d = value_offset(n, doff);
    n.copy_within(v, d);
}

fn shift_down(n: &mut BlockBuf, count: u32) {
    let nr = nr_entries(n);
    move_entries(n, 0, count, nr - count);
}

fn shift_up(n: &mut BlockBuf, count: u32) {
    let nr = nr_entries(n);
    move_entries(n, count, 0, nr);
}

/// Evens out the entries of two siblings (`redistribute2`).
fn redistribute2(left: &mut BlockBuf, right: &mut BlockBuf) {
    let nr_left = nr_entries(left);
    let nr_right = nr_entries(right);
    let total = nr_left + nr_right;
    let target_left = total / 2;
    let target_right = total - target_left;
    if nr_left < target_left {
        let delta = target_left - nr_left;
        copy_entries(left, nr_left, right, 0, delta);
        shift_down(right, delta);
    } else if nr_left > target_left {
        let delta = nr_left - target_left;
        if nr_right > 0 {
            shift_up(right, delta);
        }
        copy_entries(right, 0, left, target_left, delta);
    }
    set_nr_entries(left, target_left);
    set_nr_entries(right, target_right);
}

/// Spreads the entries of two siblings over three nodes, the middle one empty
/// (`redistribute3`).
fn redistribute3(left: &mut BlockBuf, center: &mut BlockBuf, right: &mut BlockBuf) {
    let nr_left = nr_entries(left);
    let nr_right = nr_entries(right);
    let total = nr_left + nr_right;
    let target_left = total / 3;
    let target_center = (total - target_left) / 2;
    let target_right = total - target_left - target_center;
    if nr_left < target_left {
        let left_short = target_left - nr_left;
        copy_entries(left, nr_left, right, 0, left_short);
        copy_entries(center, 0, right, left_short, target_center);
        shift_down(right, nr_right - target_right);
    } else if nr_left < target_left + target_center {
        let left_to_center = nr_left - target_left;
        copy_entries(center, 0, left, target_left, left_to_center);
        copy_entries(
            center,
            left_to_center,
            right,
            0,
            target_center - left_to_center,
        );
        shift_down(right, nr_right - target_right);
    } else {
        let right_short = target_right - nr_right;
        shift_up(right, right_short);
        copy_entries(right, 0, left, nr_left - right_short, right_short);
        copy_entries(center, 0, left, target_left, nr_left - target_left);
    }
    set_nr_entries(left, target_left);
    set_nr_entries(center, target_center);
    set_nr_entries(right, target_right);
}

/// Inserts `(k, value)` at `index`, shifting later entries up (`insert_at`). `vsize` is the
/// size of `value`.
fn insert_at(
    n: &mut BlockBuf,
    location: u64,
    index: u32,
    k: u64,
    value: &[u8],
) -> Result<(), MetadataError> {
    let nr = nr_entries(n);
    let max = max_entries(n);
    if index > nr || index >= max || nr >= max {
        return Err(MetadataError::corrupt(
            BlockKind::BtreeNode,
            location,
            Corruption::NodeTooManyEntries {
                nr_entries: nr + 1,
                max_entries: max,
            },
        ));
    }
    let vsize = value.len();
    // Keys.
    if index < nr {
        let src = keys_range(index, nr - index);
        n.copy_within(src, keys_range(index + 1, 0).start);
    }
    set_key(n, index, k);
    // Values (their base is after max_entries keys).
    let base = NODE_HEADER_SIZE + 8 * max as usize;
    if index < nr {
        let s = base + vsize * index as usize;
        let e = base + vsize * nr as usize;
        n.copy_within(s..e, s + vsize);
    }
    let at = base + vsize * index as usize;
    n[at..at + vsize].copy_from_slice(value);
    set_nr_entries(n, nr + 1);
    Ok(())
}

fn has_space_for_insert(n: &BlockBuf, k: u64) -> bool {
    if nr_entries(n) == max_entries(n) {
        if flags(n) & LEAF_NODE != 0 {
            // An overwrite needs no room.
            let i = lower_bound(n, k);
            return i >= 0 && key(n, i as u32) == k;
        }
        return false;
    }
    true
}

/// Makes room in a full root by moving its entries into two new children
/// (`btree_split_beneath`).
fn split_beneath<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    tree: Tree,
) -> Result<(), MetadataError> {
    count_path(0);
    let parent = s.current();
    let pn = node_copy(tm, parent)?;
    let pflags = flags(&pn);
    let pnr = nr_entries(&pn);
    let pmax = max_entries(&pn);
    let pvs = value_size(&pn);
    let size = if pflags & INTERNAL_NODE != 0 {
        8
    } else {
        tree.leaf_value_size as usize
    };

    let left = tm.new_block(BlockKind::BtreeNode)?;
    let nr_left = pnr / 2;
    let left_key = tm.write(left, |ln| {
        set_header(ln, pflags, nr_left, pmax, pvs);
        ln[keys_range(0, nr_left)].copy_from_slice(&pn[keys_range(0, nr_left)]);
        let d = value_offset(ln, 0);
        let sv = value_offset(&pn, 0);
        let len = nr_left as usize * size;
        ln[d..d + len].copy_from_slice(&pn[sv..sv + len]);
        key(ln, 0)
    })?;

    let right = tm.new_block(BlockKind::BtreeNode)?;
    let nr_right = pnr - nr_left;
    let right_key = tm.write(right, |rn| {
        set_header(rn, pflags, nr_right, pmax, pvs);
        rn[keys_range(0, nr_right)].copy_from_slice(&pn[keys_range(nr_left, nr_right)]);
        let d = value_offset(rn, 0);
        let sv = value_offset(&pn, nr_left);
        let len = nr_right as usize * size;
        rn[d..d + len].copy_from_slice(&pn[sv..sv + len]);
        key(rn, 0)
    })?;

    tm.write(parent, |p| {
        set_header(p, INTERNAL_NODE, 2, calc_max_entries(8), 8);
        set_key(p, 0, left_key);
        set_value64(p, 0, left);
        set_key(p, 1, right_key);
        set_value64(p, 1, right);
    })?;
    Ok(())
}

/// Moves entries of the current node into its left sibling (`rebalance_left`).
fn rebalance_left<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    tree: Tree,
    parent_index: u32,
    k: u64,
) -> Result<(), MetadataError> {
    count_path(1);
    let sib = shadow_child(tm, tree, s.parent(), parent_index - 1)?;
    let cur = s.current();
    rebalance_pair(tm, s, (sib, cur), parent_index, k)
}

/// Moves entries of the current node into its right sibling (`rebalance_right`).
fn rebalance_right<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    tree: Tree,
    parent_index: u32,
    k: u64,
) -> Result<(), MetadataError> {
    count_path(2);
    let sib = shadow_child(tm, tree, s.parent(), parent_index + 1)?;
    let cur = s.current();
    rebalance_pair(tm, s, (cur, sib), parent_index + 1, k)
}

/// Evens out two adjacent children of the spine's parent, `left` and `right` (the latter at
/// `right_index` in the parent), updates the parent's key for `right`, and leaves the spine on
/// the one that now holds `k`.
fn rebalance_pair<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    (left, right): (u64, u64),
    right_index: u32,
    k: u64,
) -> Result<(), MetadataError> {
    let mut ln = node_copy(tm, left)?;
    let mut rn = node_copy(tm, right)?;
    redistribute2(&mut ln, &mut rn);
    node_store(tm, left, &ln)?;
    node_store(tm, right, &rn)?;
    let rk = key(&rn, 0);
    tm.write(s.parent(), |p| set_key(p, right_index, rk))?;
    s.set_current(if k < rk { left } else { right });
    Ok(())
}

/// Splits the current node in two, adding the new right half to the parent
/// (`split_one_into_two`).
fn split_one_into_two<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    parent_index: u32,
    k: u64,
) -> Result<(), MetadataError> {
    count_path(3);
    let left = s.current();
    let right = tm.new_block(BlockKind::BtreeNode)?;
    let mut ln = node_copy(tm, left)?;
    let mut rn = node_copy(tm, right)?;
    set_header(&mut rn, flags(&ln), 0, max_entries(&ln), value_size(&ln));
    redistribute2(&mut ln, &mut rn);
    node_store(tm, left, &ln)?;
    node_store(tm, right, &rn)?;
    let rk = key(&rn, 0);
    let parent = s.parent();
    tm.write(parent, |p| {
        insert_at(p, parent, parent_index + 1, rk, &right.to_le_bytes())
    })??;
    if k >= rk {
        s.set_current(right);
    }
    Ok(())
}

/// Splits the current node and a sibling into three (`split_two_into_three`).
fn split_two_into_three<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    tree: Tree,
    parent_index: u32,
    k: u64,
) -> Result<(), MetadataError> {
    count_path(4);
    let parent = s.parent();
    let (middle_index, left, right) = if parent_index == 0 {
        let right = shadow_child(tm, tree, parent, parent_index + 1)?;
        (1, s.current(), right)
    } else {
        let left = shadow_child(tm, tree, parent, parent_index - 1)?;
        (parent_index, left, s.current())
    };
    let middle = tm.new_block(BlockKind::BtreeNode)?;
    let mut ln = node_copy(tm, left)?;
    let mut mn = node_copy(tm, middle)?;
    let mut rn = node_copy(tm, right)?;
    set_header(&mut mn, flags(&ln), 0, max_entries(&ln), value_size(&ln));
    redistribute3(&mut ln, &mut mn, &mut rn);
    node_store(tm, left, &ln)?;
    node_store(tm, middle, &mn)?;
    node_store(tm, right, &rn)?;
    let mk = key(&mn, 0);
    let rk = key(&rn, 0);
    tm.write(parent, |p| {
        set_key(p, middle_index, rk);
        insert_at(p, parent, middle_index, mk, &middle.to_le_bytes())
    })??;
    if k < mk {
        s.set_current(left);
    } else if k < rk {
        s.set_current(middle);
    } else {
        s.set_current(right);
    }
    Ok(())
}

/// Makes room in a full non-root node (`rebalance_or_split`).
fn rebalance_or_split<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    tree: Tree,
    parent_index: u32,
    k: u64,
) -> Result<(), MetadataError> {
    let parent = s.parent();
    let nr_parent = tm.read(parent, BlockKind::BtreeNode, nr_entries)?;
    let mut left_shared = false;
    let mut right_shared = false;

    if parent_index > 0 {
        let left_b = tm.read(parent, BlockKind::BtreeNode, |p| {
            value64(p, parent_index - 1)
        })?;
        left_shared = tm.count_is_more_than_one(left_b)?;
        if !left_shared {
            let h = read_header(tm, left_b, tree)?;
            if h.max_entries - h.nr_entries >= SPACE_THRESHOLD {
                return rebalance_left(tm, s, tree, parent_index, k);
            }
        }
    }

    if parent_index + 1 < nr_parent {
        let right_b = tm.read(parent, BlockKind::BtreeNode, |p| {
            value64(p, parent_index + 1)
        })?;
        right_shared = tm.count_is_more_than_one(right_b)?;
        if !right_shared {
            let h = read_header(tm, right_b, tree)?;
            if h.max_entries - h.nr_entries >= SPACE_THRESHOLD {
                return rebalance_right(tm, s, tree, parent_index, k);
            }
        }
    }

    // Splitting two nodes into three fills nodes better, but a sequence of increasing (or
    // decreasing) keys is better served by splitting one node into two.
    if left_shared
        || right_shared
        || nr_parent <= 2
        || parent_index == 0
        || parent_index + 1 == nr_parent
    {
        split_one_into_two(tm, s, parent_index, k)
    } else {
        split_two_into_three(tm, s, tree, parent_index, k)
    }
}

/// Walks down to the leaf for `k`, shadowing the path and making room where needed
/// (`btree_insert_raw`). Returns the index in the leaf where `k` is or belongs.
fn insert_raw<D: BlockDev>(
    tm: &mut Tm<D>,
    s: &mut Spine,
    root: u64,
    k: u64,
    tree: Tree,
) -> Result<u32, MetadataError> {
    let mut i: i64 = -1;
    let mut top = true;
    let mut block = root;
    for _ in 0..MAX_DEPTH {
        shadow_step(tm, s, block, tree)?;
        let cur = s.current();
        if s.has_parent() && i >= 0 {
            let parent = s.parent();
            tm.write(parent, |p| set_value64(p, i as u32, cur))?;
        }
        let has_space = tm.read(cur, BlockKind::BtreeNode, |n| has_space_for_insert(n, k))?;
        if !has_space {
            if top {
                split_beneath(tm, s, tree)?;
            } else {
                rebalance_or_split(tm, s, tree, i as u32, k)?;
            }
        }
        let cur = s.current();
        let (is_leaf, idx) = tm.read(cur, BlockKind::BtreeNode, |n| {
            (flags(n) & LEAF_NODE != 0, lower_bound(n, k))
        })?;
        i = idx;
        if is_leaf {
            let present = i >= 0 && tm.read(cur, BlockKind::BtreeNode, |n| key(n, i as u32))? == k;
            if !present {
                i += 1;
            }
            return Ok(i as u32);
        }
        if i < 0 {
            // The new key is below every key: it becomes the lowest bound.
            tm.write(cur, |n| set_key(n, 0, k))?;
            i = 0;
        }
        block = tm.read(cur, BlockKind::BtreeNode, |n| value64(n, i as u32))?;
        top = false;
    }
    Err(MetadataError::corrupt(
        BlockKind::BtreeNode,
        root,
        Corruption::TooDeep,
    ))
}

/// Inserts or overwrites `k -> value` (`dm_btree_insert`); returns the new root.
pub(crate) fn insert<D: BlockDev>(
    tm: &mut Tm<D>,
    root: u64,
    k: u64,
    value: u64,
    tree: Tree,
) -> Result<u64, MetadataError> {
    let bytes = value.to_le_bytes();
    let value_bytes = &bytes[..tree.leaf_value_size as usize];
    let mut s = Spine::new();
    let index = insert_raw(tm, &mut s, root, k, tree)?;
    let cur = s.current();
    let (need_insert, old) = tm.read(cur, BlockKind::BtreeNode, |n| {
        let nr = nr_entries(n);
        let need = index >= nr || key(n, index) != k;
        let old = if need {
            0
        } else {
            let o = value_offset(n, index);
            let mut v = [0u8; 8];
            v[..value_bytes.len()].copy_from_slice(&n[o..o + value_bytes.len()]);
            u64::from_le_bytes(v)
        };
        (need, old)
    })?;
    if need_insert {
        tm.write(cur, |n| insert_at(n, cur, index, k, value_bytes))??;
    } else {
        if old != value {
            dec_value(tm, tree, old)?;
        }
        tm.write(cur, |n| {
            let o = value_offset(n, index);
            n[o..o + value_bytes.len()].copy_from_slice(value_bytes);
        })?;
    }
    Ok(s.root)
}

/// Keys strictly ascending and inside `[low, high)`.
pub(crate) fn check_keys(
    b: u64,
    entries: &[(u64, u64)],
    low: u64,
    high: Option<u64>,
) -> Result<(), MetadataError> {
    for (i, &(k, _)) in entries.iter().enumerate() {
        if i > 0 && k <= entries[i - 1].0 {
            return Err(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::KeysOutOfOrder { index: i as u32 },
            ));
        }
        if k < low || high.is_some_and(|h| k >= h) {
            return Err(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::KeyOutOfRange { key: k, low, high },
            ));
        }
    }
    Ok(())
}

/// The caller's side of [`walk_tolerant`]: how nodes are read, and what is done with what
/// the walk finds. `check` counts references and reports every problem; `repair` collects
/// the leaves it can still read.
pub(crate) trait TolerantWalk {
    /// Called for every reference to a node (`from`: the referring block; the root is
    /// referred to by the superblock, 0). False skips the node without reading it.
    fn enter(&mut self, b: u64, from: u64) -> bool;
    /// Reads node `b`, validating its envelope (location, checksum).
    fn read_node(&mut self, b: u64) -> Result<Box<BlockBuf>, MetadataError>;
    /// Node `b` is unusable (unreadable, invalid, empty, too deep): its subtree is skipped.
    fn damaged(&mut self, e: MetadataError);
    /// A readable node is malformed (keys out of order or out of the parent's range,
    /// leaves at different depths). True walks it anyway; false skips it as damaged.
    fn malformed(&mut self, e: MetadataError) -> bool;
    /// One entry of a leaf, in key order within the leaf.
    fn leaf(&mut self, key: u64, value: u64);
}

/// Walks the btree at `root` depth first, in key order, without stopping at the first
/// damaged node: a node that cannot be used loses only its own subtree. This is the one
/// tolerant reader of btrees; the strict readers (`lookup`, `array::for_each_word`) fail
/// on the first bad block instead.
pub(crate) fn walk_tolerant(w: &mut dyn TolerantWalk, root: u64, leaf_value_size: u32) {
    let mut leaf_depth: Option<usize> = None;
    // (block, depth, low, high, referencing block)
    let mut stack: Vec<(u64, usize, u64, Option<u64>, u64)> = vec![(root, 0, 0, None, 0)];
    while let Some((b, depth, low, high, from)) = stack.pop() {
        if !w.enter(b, from) {
            continue;
        }
        if depth >= MAX_DEPTH {
            w.damaged(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::TooDeep,
            ));
            continue;
        }
        let node = match w.read_node(b) {
            Ok(n) => n,
            Err(e) => {
                w.damaged(e);
                continue;
            }
        };
        let h = match check_node(&node, b, leaf_value_size) {
            Ok(h) => h,
            Err(e) => {
                w.damaged(e);
                continue;
            }
        };
        let entries: Vec<(u64, u64)> = (0..h.nr_entries)
            .map(|i| {
                let v = if h.is_internal() || leaf_value_size == 8 {
                    value64(&node, i)
                } else {
                    u64::from(crate::format::btree_node::value32(&node, i))
                };
                (key(&node, i), v)
            })
            .collect();
        if entries.is_empty() && depth > 0 {
            w.damaged(MetadataError::corrupt(
                BlockKind::BtreeNode,
                b,
                Corruption::EmptyNode,
            ));
            continue;
        }
        if let Err(e) = check_keys(b, &entries, low, high)
            && !w.malformed(e)
        {
            continue;
        }
        if h.is_internal() {
            for (i, &(k, child)) in entries.iter().enumerate().rev() {
                let next = entries.get(i + 1).map(|e| e.0).or(high);
                stack.push((child, depth + 1, k, next, b));
            }
            continue;
        }
        match leaf_depth {
            None => leaf_depth = Some(depth),
            Some(d) if d != depth => {
                if !w.malformed(MetadataError::corrupt(
                    BlockKind::BtreeNode,
                    b,
                    Corruption::UnevenDepth,
                )) {
                    continue;
                }
            }
            Some(_) => {}
        }
        for &(k, v) in &entries {
            w.leaf(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clonebd_testkit::{Rng, SimDisk};

    /// The metadata space map's reference-count tree.
    const REF_COUNT_TREE: Tree = Tree {
        leaf_value_size: crate::format::space_map::REF_COUNT_VALUE_SIZE,
        values: Values::Counts,
    };

    /// Every entry of the tree in order, checking node structure, key order and bounds.
    fn entries(
        tm: &mut Tm<SimDisk>,
        b: u64,
        tree: Tree,
        low: u64,
        high: Option<u64>,
        out: &mut Vec<(u64, u64)>,
    ) {
        let h = read_header(tm, b, tree).expect("valid node");
        let e: Vec<(u64, u64)> = tm
            .read(b, BlockKind::BtreeNode, |n| {
                (0..h.nr_entries)
                    .map(|i| {
                        let v = if h.is_internal() || tree.leaf_value_size == 8 {
                            value64(n, i)
                        } else {
                            u64::from(crate::format::btree_node::value32(n, i))
                        };
                        (key(n, i), v)
                    })
                    .collect()
            })
            .expect("read");
        check_keys(b, &e, low, high).expect("keys in order and in range");
        if h.is_internal() {
            for (i, &(k, child)) in e.iter().enumerate() {
                let next = e.get(i + 1).map(|x| x.0).or(high);
                entries(tm, child, tree, k, next, out);
            }
        } else {
            out.extend(e);
        }
    }

    fn random_inserts(tree: Tree, n: usize, seed: u64) {
        let dev = SimDisk::new("m", 64 << 20);
        let mut tm = Tm::create(dev, 16_384).expect("space map");
        let mut root = empty(&mut tm, tree).expect("empty");
        let mut rng = Rng::new(seed);
        let mut model = std::collections::BTreeMap::new();
        for i in 0..n {
            let k = rng.below(1 << 20);
            let v = rng.below(1 << 31);
            root = insert(&mut tm, root, k, v, tree).expect("insert");
            model.insert(k, v);
            if i % 997 == 0 {
                for (&k, &v) in model.iter().step_by(37) {
                    assert_eq!(lookup(&mut tm, root, k, tree).expect("lookup"), Some(v));
                }
            }
        }
        let mut all = Vec::new();
        entries(&mut tm, root, tree, 0, None, &mut all);
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        assert_eq!(lookup(&mut tm, root, 1 << 21, tree).expect("lookup"), None);
        for (i, c) in MAKE_ROOM.iter().enumerate() {
            assert!(
                c.load(std::sync::atomic::Ordering::Relaxed) > 0,
                "path {i} never taken"
            );
        }
    }

    #[test]
    fn random_inserts_keep_a_valid_tree_with_8_byte_values() {
        // Random order exercises every way of making room: splitting the root, moving
        // entries to either sibling, and splitting one node into two or two into three.
        random_inserts(
            Tree {
                leaf_value_size: 8,
                values: Values::Counts,
            },
            20_000,
            1,
        );
    }

    #[test]
    fn random_inserts_keep_a_valid_tree_with_4_byte_values() {
        random_inserts(REF_COUNT_TREE, 20_000, 2);
    }

    #[test]
    fn redistribute3_spreads_entries_evenly() {
        let mut l = [0u8; crate::format::BLOCK_SIZE];
        let mut c = [0u8; crate::format::BLOCK_SIZE];
        let mut r = [0u8; crate::format::BLOCK_SIZE];
        for n in [&mut l, &mut c, &mut r] {
            set_header(n, LEAF_NODE, 0, 252, 8);
        }
        for i in 0..252 {
            set_key(&mut l, i, u64::from(i));
            set_value64(&mut l, i, u64::from(i) * 10);
        }
        set_nr_entries(&mut l, 252);
        for i in 0..100 {
            set_key(&mut r, i, 1000 + u64::from(i));
            set_value64(&mut r, i, 7);
        }
        set_nr_entries(&mut r, 100);
        redistribute3(&mut l, &mut c, &mut r);
        assert_eq!(
            (nr_entries(&l), nr_entries(&c), nr_entries(&r)),
            (117, 117, 118)
        );
        assert_eq!(key(&c, 0), 117);
        assert_eq!(value64(&c, 0), 1170);
        assert_eq!(key(&r, 0), 234);
        assert_eq!(key(&r, 18), 1000);
        assert_eq!(key(&r, 117), 1099);
    }
}
