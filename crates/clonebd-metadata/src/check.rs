//! `check`: verifies every block of dm-clone metadata, read-only, and lists every problem.
//!
//! What is checked:
//! 1. the superblock: location, magic, checksum, version (the kernel's order), zero
//!    padding, a valid geometry, a space map size that fits the device;
//! 2. the space map: the index block and every bitmap block (location, checksum), each
//!    bitmap's free count and none-free-before hint, no stray index entries, the
//!    allocated-block count in the root, and the reference-count btree (shape, and that
//!    it holds exactly the blocks whose bitmap entry says "3 or more");
//! 3. the bitset: every btree node (location, checksum, flags, sizes, keys ascending and
//!    inside the parent's range, leaves at one depth), the array block keys `0..n`, every
//!    array block (location, checksum, header, entry count for its position), the number
//!    of words against the geometry, and no bit set past the last region;
//! 4. reference counts: every block reachable from the superblock is counted, and the
//!    space map must record exactly that count for every block: a block counted but
//!    unreachable is leaked, a reachable block counted too low is at risk of being reused,
//!    a block reachable twice is shared (dm-clone never shares blocks).
//!
//! A damaged block is reported and its subtree skipped; the check goes on with the rest.

use std::collections::BTreeMap;
use std::fmt;

use clonebd_core::{BlockDev, Geometry, GeometryError};

use crate::error::{BlockKind, Corruption, IoOp, MetadataError};
use crate::format::array_block::{ARRAY_BLOCK_ENTRIES, check_array_block, nr_array_blocks, word};
use crate::format::space_map::{
    ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS, MAX_METADATA_BLOCKS, MetadataIndex, bitmap_get,
    nr_bitmaps,
};
use crate::format::superblock::{SUPERBLOCK_LOCATION, Superblock, is_all_zero, padding_is_zero};
use crate::format::{BLOCK_SIZE, BlockBuf, validate_envelope, zeroed_block};

/// One problem found by [`check()`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Problem {
    /// The device is smaller than one metadata block.
    DeviceTooSmall {
        /// Its size in bytes.
        size_bytes: u64,
    },
    /// Block 0 is all zeros: the device holds no metadata.
    NotFormatted,
    /// The superblock failed validation (location, magic, checksum or version).
    Superblock(MetadataError),
    /// The superblock has non-zero bytes where the format has zeros.
    SuperblockPadding,
    /// The superblock's region size or length is impossible.
    InvalidGeometry(GeometryError),
    /// A block failed validation or is structurally wrong.
    BadBlock(MetadataError),
    /// The space map records a different reference count than the references found.
    CountMismatch {
        /// The block.
        block: u64,
        /// Count in the space map.
        recorded: u32,
        /// References found from the superblock.
        referenced: u32,
    },
    /// A block is referenced more than once (dm-clone never shares blocks).
    Shared {
        /// The block.
        block: u64,
        /// References found.
        references: u32,
    },
    /// The root's allocated-block count disagrees with the bitmaps.
    NrAllocated {
        /// In the superblock's space map root.
        recorded: u64,
        /// Non-zero entries in the bitmaps.
        counted: u64,
    },
    /// A bitmap's free count in the index disagrees with the bitmap.
    NrFree {
        /// Index of the bitmap.
        bitmap: u32,
        /// In the index.
        recorded: u32,
        /// Zero entries in the bitmap.
        counted: u32,
    },
    /// A bitmap's none-free-before hint is past a free entry (that block can never be
    /// allocated).
    NoneFreeBefore {
        /// Index of the bitmap.
        bitmap: u32,
        /// The hint.
        hint: u32,
        /// The first free entry.
        first_free: u32,
    },
    /// A space map bitmap counts blocks past the end of the metadata.
    CountPastEnd {
        /// The block number.
        block: u64,
    },
    /// An index entry beyond the bitmaps in use is not zero.
    StrayIndexEntry {
        /// The entry.
        index: u32,
    },
    /// An entry of the reference-count tree does not match the bitmaps.
    RefCountEntry {
        /// The block.
        block: u64,
        /// The count in the tree (`None`: missing from the tree).
        count: Option<u32>,
        /// The two-bit count in the bitmap.
        bitmap_count: u32,
    },
    /// Bits are set past the last region in the bitset's last word.
    BitsPastEnd {
        /// The word.
        word: u64,
        /// The stray bits.
        bits: u64,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::DeviceTooSmall { size_bytes } => write!(
                f,
                "the device holds {size_bytes} bytes, less than one 4096-byte metadata block"
            ),
            Problem::NotFormatted => {
                f.write_str("block 0 is all zeros: the device holds no dm-clone metadata")
            }
            Problem::Superblock(e) => write!(f, "superblock (block 0): {e}"),
            Problem::SuperblockPadding => {
                write!(f, "superblock (block 0): {}", Corruption::SuperblockPadding)
            }
            Problem::InvalidGeometry(e) => write!(f, "superblock (block 0): invalid geometry: {e}"),
            Problem::BadBlock(e) => write!(f, "{e}"),
            Problem::CountMismatch {
                block,
                recorded,
                referenced,
            } => {
                if *referenced == 0 {
                    write!(
                        f,
                        "block {block} is leaked: the space map counts {recorded} reference(s) \
                         but nothing reachable from the superblock uses it"
                    )
                } else {
                    write!(
                        f,
                        "block {block} has {referenced} reference(s) from the superblock but \
                         the space map counts {recorded}"
                    )
                }
            }
            Problem::Shared { block, references } => write!(
                f,
                "block {block} is referenced {references} times (dm-clone never shares blocks)"
            ),
            Problem::NrAllocated { recorded, counted } => write!(
                f,
                "space map root says {recorded} blocks are allocated, the bitmaps count {counted}"
            ),
            Problem::NrFree {
                bitmap,
                recorded,
                counted,
            } => write!(
                f,
                "space map index entry {bitmap}: nr_free {recorded}, the bitmap has {counted} \
                 free entries"
            ),
            Problem::NoneFreeBefore {
                bitmap,
                hint,
                first_free,
            } => write!(
                f,
                "space map index entry {bitmap}: none_free_before {hint} is past free entry \
                 {first_free}"
            ),
            Problem::CountPastEnd { block } => write!(
                f,
                "the space map counts block {block}, past the end of the metadata"
            ),
            Problem::StrayIndexEntry { index } => {
                write!(
                    f,
                    "space map index entry {index} is past the last bitmap but not zero"
                )
            }
            Problem::RefCountEntry {
                block,
                count,
                bitmap_count,
            } => match count {
                Some(c) => write!(
                    f,
                    "reference-count tree holds {c} for block {block}, whose bitmap entry is \
                     {bitmap_count}"
                ),
                None => write!(
                    f,
                    "block {block} has bitmap entry 3 (count in the tree) but no tree entry"
                ),
            },
            Problem::BitsPastEnd { word, bits } => write!(
                f,
                "bitset word {word} has bits {bits:#x} set past the last region"
            ),
        }
    }
}

/// What [`check()`] found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Every problem, in the order found.
    pub problems: Vec<Problem>,
    /// The superblock's region size, if it could be read.
    pub region_sectors: Option<u64>,
    /// The superblock's length, if it could be read.
    pub target_sectors: Option<u64>,
    /// Regions, if the geometry is valid.
    pub nr_regions: Option<u64>,
    /// Hydrated regions counted in the readable array blocks.
    pub nr_hydrated: u64,
    /// Blocks the space map covers.
    pub metadata_blocks_total: u64,
    /// Blocks allocated according to the space map root.
    pub metadata_blocks_used: u64,
    /// Blocks reachable from the superblock.
    pub blocks_referenced: u64,
}

impl CheckReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Checker<'a, D> {
    dev: &'a D,
    dev_blocks: u64,
    nr_blocks: u64,
    refs: Vec<u32>,
    report: CheckReport,
}

impl<D: BlockDev> Checker<'_, D> {
    fn problem(&mut self, p: Problem) {
        self.report.problems.push(p);
    }

    fn read(&self, b: u64, kind: BlockKind) -> Result<Box<BlockBuf>, MetadataError> {
        read_block(
            self.dev,
            b,
            kind,
            self.nr_blocks.min(self.dev_blocks),
            self.nr_blocks,
        )
    }

    /// Counts a reference to `b`; false (and a problem) if `b` is past the end.
    fn reference(&mut self, b: u64, kind: BlockKind, from: u64) -> bool {
        match self.refs.get_mut(b as usize) {
            Some(r) if b < self.nr_blocks => {
                *r = r.saturating_add(1);
                true
            }
            _ => {
                self.problem(Problem::BadBlock(MetadataError::corrupt(
                    kind,
                    from,
                    Corruption::BlockOutOfBounds {
                        target: b,
                        nr_blocks: self.nr_blocks,
                    },
                )));
                false
            }
        }
    }

    /// Walks a btree from `root`, counting references to its nodes and calling `leaf` for
    /// every entry. Damaged nodes are reported and skipped.
    fn walk_tree(
        &mut self,
        root: u64,
        leaf_value_size: u32,
        leaf: &mut dyn FnMut(&mut Self, u64, u64),
    ) {
        crate::btree::walk_tolerant(&mut CheckWalk { c: self, leaf }, root, leaf_value_size);
    }
}

/// `check`'s side of the tolerant btree walk: every node is a counted reference, every
/// problem is reported, and malformed nodes are walked anyway.
struct CheckWalk<'c, 'a, D> {
    c: &'c mut Checker<'a, D>,
    leaf: &'c mut dyn FnMut(&mut Checker<'a, D>, u64, u64),
}

impl<D: BlockDev> crate::btree::TolerantWalk for CheckWalk<'_, '_, D> {
    fn enter(&mut self, b: u64, from: u64) -> bool {
        if !self.c.reference(b, BlockKind::BtreeNode, from) {
            return false;
        }
        // Already walked (shared, or a cycle): reported by the count comparison.
        self.c.refs.get(b as usize).copied().unwrap_or(0) <= 1
    }
    fn read_node(&mut self, b: u64) -> Result<Box<BlockBuf>, MetadataError> {
        self.c.read(b, BlockKind::BtreeNode)
    }
    fn damaged(&mut self, e: MetadataError) {
        self.c.problem(Problem::BadBlock(e));
    }
    fn malformed(&mut self, e: MetadataError) -> bool {
        self.c.problem(Problem::BadBlock(e));
        true
    }
    fn leaf(&mut self, key: u64, value: u64) {
        (self.leaf)(self.c, key, value);
    }
}

/// Reads block `b` of `dev` and validates its envelope as `kind` (location, then checksum).
/// Blocks at or past `limit` are refused without reading (`BlockOutOfBounds`, naming
/// `nr_blocks`, the space map's size).
pub(crate) fn read_block<D: BlockDev>(
    dev: &D,
    b: u64,
    kind: BlockKind,
    limit: u64,
    nr_blocks: u64,
) -> Result<Box<BlockBuf>, MetadataError> {
    if b >= limit {
        return Err(MetadataError::corrupt(
            kind,
            b,
            Corruption::BlockOutOfBounds {
                target: b,
                nr_blocks,
            },
        ));
    }
    let mut buf = zeroed_block();
    dev.read_at(&mut buf[..], b * BLOCK_SIZE as u64)
        .map_err(|source| MetadataError::Io {
            op: IoOp::Read,
            block: b,
            source,
        })?;
    validate_envelope(&buf, kind, b)?;
    Ok(buf)
}

/// Bitmap state of one space map bitmap block, if it could be read.
struct BitmapState {
    first_block: u64,
    block: Option<Box<BlockBuf>>,
}

/// Checks the metadata on `dev` without writing anything and reports every problem.
///
/// Returns an error only when the device cannot be read at all (block 0 unreadable); any
/// other failure is a [`Problem`] in the report.
pub fn check<D: BlockDev>(dev: &D) -> Result<CheckReport, MetadataError> {
    let size = dev.size_bytes();
    let dev_blocks = size / BLOCK_SIZE as u64;
    let mut report = CheckReport::default();
    if dev_blocks == 0 {
        report
            .problems
            .push(Problem::DeviceTooSmall { size_bytes: size });
        return Ok(report);
    }
    let mut block0 = zeroed_block();
    dev.read_at(&mut block0[..], SUPERBLOCK_LOCATION)
        .map_err(|source| MetadataError::Io {
            op: IoOp::Read,
            block: SUPERBLOCK_LOCATION,
            source,
        })?;
    if is_all_zero(&block0[..]) {
        report.problems.push(Problem::NotFormatted);
        return Ok(report);
    }
    let sb = match Superblock::decode(&block0) {
        Ok(sb) => sb,
        Err(e) => {
            let fatal = matches!(
                e,
                MetadataError::WrongLocation { .. } | MetadataError::BadMagic { .. }
            );
            report.problems.push(Problem::Superblock(e));
            if fatal {
                // Not dm-clone metadata (or not at this place): nothing else can be trusted.
                return Ok(report);
            }
            Superblock::decode_unchecked(&block0)
        }
    };
    if !padding_is_zero(&block0) {
        report.problems.push(Problem::SuperblockPadding);
    }
    report.region_sectors = Some(sb.region_sectors);
    report.target_sectors = Some(sb.target_sectors);
    let geometry = match Geometry::new(sb.target_sectors, sb.region_sectors) {
        Ok(g) => Some(g),
        Err(e) => {
            report.problems.push(Problem::InvalidGeometry(e));
            None
        }
    };
    report.nr_regions = geometry.map(|g| g.nr_regions());
    let root = sb.sm_root;
    let max_blocks = dev_blocks.min(MAX_METADATA_BLOCKS);
    report.metadata_blocks_total = root.nr_blocks;
    report.metadata_blocks_used = root.nr_allocated;
    if root.nr_blocks == 0 || root.nr_blocks > max_blocks {
        report
            .problems
            .push(Problem::BadBlock(MetadataError::corrupt(
                BlockKind::Superblock,
                SUPERBLOCK_LOCATION,
                Corruption::SpaceMapSize {
                    nr_blocks: root.nr_blocks,
                    device_blocks: max_blocks,
                },
            )));
    }
    let nr_blocks = root.nr_blocks.min(max_blocks);
    let mut c = Checker {
        dev,
        dev_blocks,
        nr_blocks,
        refs: vec![0; nr_blocks as usize],
        report,
    };
    if nr_blocks == 0 {
        return Ok(c.report);
    }
    c.reference(
        SUPERBLOCK_LOCATION,
        BlockKind::Superblock,
        SUPERBLOCK_LOCATION,
    );

    // The space map: index and bitmaps.
    let mut bitmaps: Vec<BitmapState> = Vec::new();
    let bitmaps_ok = check_space_map(&mut c, root.bitmap_root, root.nr_allocated, &mut bitmaps);

    // The reference-count tree.
    let mut overflow: BTreeMap<u64, u32> = BTreeMap::new();
    c.walk_tree(root.ref_count_root, 4, &mut |_, k, v| {
        overflow.insert(k, v as u32);
    });

    // The bitset.
    if let Some(g) = geometry {
        check_bitset(&mut c, sb.bitset_root, g);
    }

    // Reference counts.
    let mut referenced_total = 0u64;
    for b in 0..nr_blocks {
        let referenced = c.refs[b as usize];
        if referenced > 0 {
            referenced_total += 1;
        }
        if referenced > 1 {
            c.problem(Problem::Shared {
                block: b,
                references: referenced,
            });
        }
        let i = (b / ENTRIES_PER_BITMAP) as usize;
        let Some(BitmapState {
            first_block,
            block: Some(bm),
        }) = bitmaps.get(i)
        else {
            continue;
        };
        let entry = bitmap_get(bm, b - first_block);
        let recorded = if entry == 3 {
            match overflow.get(&b) {
                Some(&n) => {
                    if n < 3 {
                        c.problem(Problem::RefCountEntry {
                            block: b,
                            count: Some(n),
                            bitmap_count: 3,
                        });
                    }
                    n
                }
                None => {
                    c.problem(Problem::RefCountEntry {
                        block: b,
                        count: None,
                        bitmap_count: 3,
                    });
                    3
                }
            }
        } else {
            if let Some(&n) = overflow.get(&b) {
                c.problem(Problem::RefCountEntry {
                    block: b,
                    count: Some(n),
                    bitmap_count: entry,
                });
            }
            entry
        };
        if recorded != referenced {
            c.problem(Problem::CountMismatch {
                block: b,
                recorded,
                referenced,
            });
        }
    }
    let _ = bitmaps_ok;
    c.report.blocks_referenced = referenced_total;
    Ok(c.report)
}

/// Checks the index block and the bitmaps; fills `bitmaps` with what could be read.
fn check_space_map<D: BlockDev>(
    c: &mut Checker<'_, D>,
    index_root: u64,
    nr_allocated: u64,
    bitmaps: &mut Vec<BitmapState>,
) -> bool {
    if !c.reference(index_root, BlockKind::SpaceMapIndex, SUPERBLOCK_LOCATION) {
        return false;
    }
    let index = match c.read(index_root, BlockKind::SpaceMapIndex) {
        Ok(b) => MetadataIndex::decode(&b),
        Err(e) => {
            c.problem(Problem::BadBlock(e));
            return false;
        }
    };
    let n = nr_bitmaps(c.nr_blocks) as usize;
    let mut counted_allocated = 0u64;
    let mut all_read = true;
    for (i, ie) in index.entries.iter().enumerate().take(MAX_METADATA_BITMAPS) {
        if i >= n {
            if ie.blocknr != 0 || ie.nr_free != 0 || ie.none_free_before != 0 {
                c.problem(Problem::StrayIndexEntry { index: i as u32 });
            }
            continue;
        }
        let first_block = i as u64 * ENTRIES_PER_BITMAP;
        let mut state = BitmapState {
            first_block,
            block: None,
        };
        if ie.blocknr == 0 {
            c.problem(Problem::BadBlock(MetadataError::corrupt(
                BlockKind::SpaceMapIndex,
                index_root,
                Corruption::MissingBitmap { index: i as u32 },
            )));
            all_read = false;
            bitmaps.push(state);
            continue;
        }
        if !c.reference(ie.blocknr, BlockKind::SpaceMapBitmap, index_root) {
            all_read = false;
            bitmaps.push(state);
            continue;
        }
        match c.read(ie.blocknr, BlockKind::SpaceMapBitmap) {
            Ok(bm) => {
                let in_range = (c.nr_blocks - first_block).min(ENTRIES_PER_BITMAP);
                let mut used_all = 0u32;
                let mut first_free: Option<u32> = None;
                for w in 0..ENTRIES_PER_BITMAP / 32 {
                    let used = bitmap_used_mask(&bm, w);
                    used_all += used.count_ones();
                    let base = w * 32;
                    // Entries of this word inside the space map.
                    let inside = in_range.saturating_sub(base).min(32);
                    let inside_mask = if inside == 32 {
                        u32::MAX
                    } else {
                        (1u32 << inside) - 1
                    };
                    counted_allocated += u64::from((used & inside_mask).count_ones());
                    let mut past = used & !inside_mask;
                    while past != 0 {
                        let e = past.trailing_zeros();
                        past &= past - 1;
                        c.problem(Problem::CountPastEnd {
                            block: first_block + base + u64::from(e),
                        });
                    }
                    let free_inside = !used & inside_mask;
                    if first_free.is_none() && free_inside != 0 {
                        first_free = Some((base + u64::from(free_inside.trailing_zeros())) as u32);
                    }
                }
                let free = ENTRIES_PER_BITMAP as u32 - used_all;
                if free != ie.nr_free {
                    c.problem(Problem::NrFree {
                        bitmap: i as u32,
                        recorded: ie.nr_free,
                        counted: free,
                    });
                }
                if let Some(ff) = first_free
                    && ie.none_free_before > ff
                {
                    c.problem(Problem::NoneFreeBefore {
                        bitmap: i as u32,
                        hint: ie.none_free_before,
                        first_free: ff,
                    });
                }
                state.block = Some(bm);
            }
            Err(e) => {
                c.problem(Problem::BadBlock(e));
                all_read = false;
            }
        }
        bitmaps.push(state);
    }
    if all_read && counted_allocated != nr_allocated {
        c.problem(Problem::NrAllocated {
            recorded: nr_allocated,
            counted: counted_allocated,
        });
    }
    all_read
}

/// Bit `i` set iff entry `i` of bitmap word `w` is non-zero.
fn bitmap_used_mask(bm: &BlockBuf, w: u64) -> u32 {
    let v = crate::format::read_u64(bm, 16 + 8 * w as usize);
    let fields = (v | (v >> 1)) & 0x5555_5555_5555_5555;
    let mut out = 0u32;
    let mut f = fields;
    while f != 0 {
        let bit = f.trailing_zeros();
        out |= 1 << (bit / 2);
        f &= f - 1;
    }
    out
}

/// Checks the bitset against the geometry.
fn check_bitset<D: BlockDev>(c: &mut Checker<'_, D>, root: u64, g: Geometry) {
    let nr_words = g.nr_regions().div_ceil(64);
    let expected_blocks = nr_array_blocks(nr_words);
    let mut ablocks: Vec<(u64, u64)> = Vec::new();
    c.walk_tree(root, 8, &mut |_, k, v| ablocks.push((k, v)));
    let mut found_words = 0u64;
    for (pos, &(k, loc)) in ablocks.iter().enumerate() {
        if k != pos as u64 {
            c.problem(Problem::BadBlock(MetadataError::corrupt(
                BlockKind::BtreeNode,
                root,
                Corruption::ArrayKeys {
                    expected: pos as u64,
                    found: k,
                },
            )));
        }
        if !c.reference(loc, BlockKind::ArrayBlock, root) {
            continue;
        }
        if c.refs.get(loc as usize).copied().unwrap_or(0) > 1 {
            continue;
        }
        let ab = match c.read(loc, BlockKind::ArrayBlock) {
            Ok(b) => b,
            Err(e) => {
                c.problem(Problem::BadBlock(e));
                continue;
            }
        };
        let h = match check_array_block(&ab, loc) {
            Ok(h) => h,
            Err(e) => {
                c.problem(Problem::BadBlock(e));
                continue;
            }
        };
        let expected_entries = nr_words
            .saturating_sub(k.saturating_mul(u64::from(ARRAY_BLOCK_ENTRIES)))
            .min(u64::from(ARRAY_BLOCK_ENTRIES)) as u32;
        if k < expected_blocks && h.nr_entries != expected_entries {
            c.problem(Problem::BadBlock(MetadataError::corrupt(
                BlockKind::ArrayBlock,
                loc,
                Corruption::ArrayBlockEntries {
                    index: k,
                    expected: expected_entries,
                    found: h.nr_entries,
                },
            )));
        }
        found_words += u64::from(h.nr_entries);
        let base = k.saturating_mul(u64::from(ARRAY_BLOCK_ENTRIES));
        for e in 0..h.nr_entries {
            let w = base.saturating_add(u64::from(e));
            let v = word(&ab, e);
            let valid_bits = g.nr_regions().saturating_sub(w.saturating_mul(64)).min(64);
            let valid = if valid_bits == 64 {
                u64::MAX
            } else {
                (1u64 << valid_bits) - 1
            };
            if v & !valid != 0 {
                c.problem(Problem::BitsPastEnd {
                    word: w,
                    bits: v & !valid,
                });
            }
            c.report.nr_hydrated += u64::from((v & valid).count_ones());
        }
    }
    if ablocks.len() as u64 != expected_blocks || found_words != nr_words {
        c.problem(Problem::BadBlock(MetadataError::corrupt(
            BlockKind::BtreeNode,
            root,
            Corruption::ArrayLength {
                expected_words: nr_words,
                found_words,
            },
        )));
    }
}
