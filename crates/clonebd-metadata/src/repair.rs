//! `repair`: consistent metadata rebuilt from whatever a damaged device still holds.
//!
//! Repair never writes the damaged device. It runs in two steps:
//!
//! 1. [`recover`] reads the damaged metadata and decides the state of every region it can:
//!    - **geometry**: from a valid superblock; from the operator otherwise (refused without
//!      it). With a damaged superblock its roots are used only if, sealed again with the
//!      given geometry, they describe metadata that passes [`check()`](crate::check()) in
//!      full; otherwise they might be a stale or bit-flipped pointer, and are not used;
//!    - **the bitset**: the btree is walked with the tolerant walk `check` uses, so a
//!      damaged node loses only its subtree, and a damaged array block only its own 32 576
//!      regions;
//!    - **what a damaged node pointed at** is looked for by scanning the device, but only
//!      when the committed space map can be read, because only it tells the current blocks
//!      from superseded copies (which the copy-on-write format leaves behind, with valid
//!      checksums and older contents): an *allocated* btree leaf with 8-byte values that
//!      the walk did not reach is a leaf of the bitset's btree (the space map's tree has
//!      4-byte values), and its entries are used; allocated array blocks that nothing
//!      reached are the lost indices' blocks, and are placed when that is unambiguous
//!      (the last block by its shorter length; otherwise only when as many blocks as lost
//!      indices remain and all hold the same words, so any placement gives the same map).
//!
//!    Every region whose array block could not be placed is *unknown*, reported as a
//!    range, and becomes what the operator chose ([`UnknownAs`]).
//! 2. [`write()`] formats a blank device with the same formatter `MetadataStore::open` uses
//!    for fresh metadata, commits the recovered hydrated set as one transaction, and runs
//!    `check` on the result: a repair is reported as done only for output that passes.
//!
//! The space map of the damaged device is never copied: the output's is built afresh.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use clonebd_core::{BlockDev, Caps, DirtySet, Geometry, GeometryError};
use serde::Serialize;
use thiserror::Error;

use crate::btree::{TolerantWalk, walk_tolerant};
use crate::check::{Problem, check, read_block};
use crate::dump::ByRef;
use crate::error::{BlockKind, IoOp, MetadataError};
use crate::format::array_block::{
    ARRAY_BLOCK_ENTRIES, REGIONS_PER_ARRAY_BLOCK, check_array_block, nr_array_blocks, word,
};
use crate::format::btree_node::{check_node, key, value64};
use crate::format::space_map::{MAX_METADATA_BLOCKS, MetadataIndex, SmRoot, nr_bitmaps};
use crate::format::superblock::{SUPERBLOCK_LOCATION, Superblock, is_all_zero};
use crate::format::{BLOCK_SIZE, BlockBuf, validate_envelope};
use crate::store::{MetadataStore, StoreOptions, read_superblock_block};
use crate::tm::Tm;

/// Blocks read at a time while scanning.
const SCAN_RUN: u64 = 256;

/// What regions whose state could not be read become.
///
/// There is no safe default. Marking a region hydrated that was never copied makes the
/// clone serve the destination's garbage for it; marking one unhydrated that clients
/// wrote makes the clone copy the source over their writes (and serve the source until
/// then). Only the operator knows which is worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAs {
    /// Served from the destination, never copied again.
    Hydrated,
    /// Served from the source and copied again.
    Unhydrated,
}

impl fmt::Display for UnknownAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnknownAs::Hydrated => "hydrated",
            UnknownAs::Unhydrated => "unhydrated",
        })
    }
}

/// How to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairOptions {
    /// What unknown regions become.
    pub unknown_as: UnknownAs,
    /// Region size in sectors, if the operator gave it: required when the superblock is
    /// damaged; when it is valid, it must agree.
    pub region_sectors: Option<u64>,
    /// The clone's length in sectors, likewise.
    pub target_sectors: Option<u64>,
}

/// Where the geometry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GeometrySource {
    /// The (valid) superblock.
    Superblock,
    /// The operator's options.
    Options,
}

/// What was made of the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuperblockState {
    /// Valid: its geometry and roots were used.
    Valid,
    /// Damaged, but its roots, with the given geometry, describe metadata that passes
    /// `check` in full: they were used.
    DamagedRootsVerified,
    /// Damaged, and its roots could not be verified: they were not used.
    DamagedRootsUnused,
}

/// A block that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamagedBlock {
    /// Its location (`None` when the problem names none).
    pub block: Option<u64>,
    /// What it was read as.
    pub kind: Option<BlockKind>,
    /// What is wrong, as `check` words it.
    pub problem: String,
}

/// A run of regions whose state could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UnknownRange {
    /// First region.
    pub first_region: u64,
    /// Number of regions.
    pub nr_regions: u64,
    /// Byte offset of the first region in the clone.
    pub offset_bytes: u64,
    /// Length in bytes (the last region may be a partial one).
    pub len_bytes: u64,
}

/// What [`recover`] found and [`write()`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// Length of the clone in sectors.
    pub target_sectors: u64,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Number of regions.
    pub nr_regions: u64,
    /// Where the geometry came from.
    pub geometry_from: GeometrySource,
    /// What was made of the superblock.
    pub superblock: SuperblockState,
    /// Whether the committed space map could be read (needed only to place blocks found by
    /// scanning; the output's space map is always built afresh).
    pub space_map_usable: bool,
    /// Array blocks the bitset has.
    pub array_blocks: u64,
    /// Array blocks reached through the btree from the root.
    pub array_blocks_from_tree: u64,
    /// Array blocks placed by scanning the device.
    pub array_blocks_from_scan: u64,
    /// Array blocks lost: their regions are unknown.
    pub array_blocks_lost: u64,
    /// Blocks read while scanning (0: no scan was needed or possible).
    pub blocks_scanned: u64,
    /// Every block that could not be used.
    pub damaged_blocks: Vec<DamagedBlock>,
    /// What unknown regions became.
    pub unknown_as: UnknownAs,
    /// Regions whose state could not be read.
    pub nr_unknown: u64,
    /// They, as sorted, merged ranges.
    pub unknown_ranges: Vec<UnknownRange>,
    /// Hydrated regions read from the damaged metadata.
    pub nr_hydrated_recovered: u64,
    /// Hydrated regions in the output (recovered, plus the unknown ones if they became
    /// hydrated); 0 until [`write()`] ran.
    pub nr_hydrated: u64,
    /// Metadata blocks used by the output; 0 until [`write()`] ran.
    pub metadata_blocks_used: u64,
    /// Metadata blocks of the output's space map; 0 until [`write()`] ran.
    pub metadata_blocks_total: u64,
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = match self.geometry_from {
            GeometrySource::Superblock => "from the superblock",
            GeometrySource::Options => "as given",
        };
        writeln!(
            f,
            "geometry:        {} sectors, regions of {} sectors, {} regions ({from})",
            self.target_sectors, self.region_sectors, self.nr_regions
        )?;
        let sb = match self.superblock {
            SuperblockState::Valid => "valid",
            SuperblockState::DamagedRootsVerified => {
                "damaged; its roots were verified (they pass check with the given geometry) and used"
            }
            SuperblockState::DamagedRootsUnused => {
                "damaged; its roots could not be verified and were not used"
            }
        };
        writeln!(f, "superblock:      {sb}")?;
        writeln!(
            f,
            "space map:       {} (the output's is built afresh)",
            if self.space_map_usable {
                "readable"
            } else {
                "not usable: blocks found by scanning cannot be told from superseded copies"
            }
        )?;
        writeln!(
            f,
            "array blocks:    {} of {}: {} through the btree, {} found by scanning, {} lost",
            self.array_blocks - self.array_blocks_lost,
            self.array_blocks,
            self.array_blocks_from_tree,
            self.array_blocks_from_scan,
            self.array_blocks_lost
        )?;
        if self.blocks_scanned > 0 {
            writeln!(f, "scanned:         {} blocks", self.blocks_scanned)?;
        }
        writeln!(f, "damaged blocks:  {}", self.damaged_blocks.len())?;
        for d in &self.damaged_blocks {
            writeln!(f, "  {}", d.problem)?;
        }
        writeln!(
            f,
            "recovered:       {} hydrated regions",
            self.nr_hydrated_recovered
        )?;
        if self.unknown_ranges.is_empty() {
            writeln!(f, "unknown:         none: every region's state was read")?;
        } else {
            writeln!(
                f,
                "unknown:         {} regions in {} range{}, written as {}",
                self.nr_unknown,
                self.unknown_ranges.len(),
                if self.unknown_ranges.len() == 1 {
                    ""
                } else {
                    "s"
                },
                self.unknown_as
            )?;
            for r in &self.unknown_ranges {
                writeln!(
                    f,
                    "  regions {}..={} ({}), bytes {}..{} ({} bytes)",
                    r.first_region,
                    r.first_region + r.nr_regions - 1,
                    r.nr_regions,
                    r.offset_bytes,
                    r.offset_bytes + r.len_bytes,
                    r.len_bytes
                )?;
            }
        }
        writeln!(
            f,
            "written:         {}/{} regions hydrated, {}/{} metadata blocks used, passes check",
            self.nr_hydrated,
            self.nr_regions,
            self.metadata_blocks_used,
            self.metadata_blocks_total
        )
    }
}

/// Why a repair was refused or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RepairError {
    /// The damaged device could not be read at all (block 0).
    #[error("cannot read it: {0}")]
    Read(MetadataError),
    /// The superblock is damaged and the operator did not give (all of) the geometry.
    #[error("{}", MissingGeometryText(.cause, *.region_size, *.length))]
    MissingGeometry {
        /// What is wrong with the superblock.
        cause: Box<MetadataError>,
        /// The region size is missing.
        region_size: bool,
        /// The length (or number of regions) is missing.
        length: bool,
    },
    /// The operator's geometry differs from the valid superblock's.
    #[error(
        "the superblock is valid and records {sb_target_sectors} sectors in regions of \
         {sb_region_sectors} sectors, which differs from the geometry given; drop the \
         geometry options or correct them"
    )]
    GeometryConflict {
        /// Region size in the superblock.
        sb_region_sectors: u64,
        /// Length in the superblock.
        sb_target_sectors: u64,
    },
    /// The superblock is sound but of a metadata version repair does not know.
    #[error("{0}; repair rebuilds only version 1 metadata")]
    UnsupportedVersion(MetadataError),
    /// The given geometry is impossible.
    #[error("invalid geometry: {0}")]
    InvalidGeometry(GeometryError),
    /// The output device already holds something (its first block is not zero).
    #[error(
        "the output is not blank (its first 4096 bytes are not zero): repair writes only fresh metadata"
    )]
    OutputNotBlank,
    /// Formatting or committing the output failed.
    #[error("writing the repaired metadata failed: {0}")]
    Write(MetadataError),
    /// The output does not pass `check` (never expected: a bug).
    #[error("the repaired metadata does not pass check ({count} problems), first: {first}")]
    OutputNotClean {
        /// How many problems.
        count: usize,
        /// The first.
        first: Box<Problem>,
    },
}

struct MissingGeometryText<'a>(&'a MetadataError, bool, bool);

impl fmt::Display for MissingGeometryText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let missing = match (self.1, self.2) {
            (true, true) => "the region size and the clone's length (or number of regions)",
            (true, false) => "the region size",
            _ => "the clone's length (or number of regions)",
        };
        write!(
            f,
            "the superblock is unusable ({}), so the geometry cannot be read from it: give {missing}",
            self.0
        )
    }
}

/// What [`recover`] read: the report so far and the hydrated set to write.
#[derive(Debug)]
pub struct Recovered {
    geometry: Geometry,
    hydrated: DirtySet,
    report: RepairReport,
}

impl Recovered {
    /// The clone's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// What was found so far (the output's counts are filled in by [`write()`]).
    pub fn report(&self) -> &RepairReport {
        &self.report
    }

    /// The regions the output will have hydrated.
    pub fn hydrated(&self) -> &DirtySet {
        &self.hydrated
    }
}

/// The damaged device with block 0 replaced by a superblock under test.
struct Overlay<'a, D> {
    dev: &'a D,
    block0: Option<Box<BlockBuf>>,
}

impl<D: BlockDev> BlockDev for Overlay<'_, D> {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn logical_block_size(&self) -> u32 {
        self.dev.logical_block_size()
    }
    fn caps(&self) -> Caps {
        self.dev.caps()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_at(buf, offset)?;
        if let Some(b0) = &self.block0
            && offset < BLOCK_SIZE as u64
        {
            let start = offset as usize;
            let n = (BLOCK_SIZE - start).min(buf.len());
            buf[..n].copy_from_slice(&b0[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        // Repair never writes the damaged device.
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
    fn flush(&self) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
}

fn damaged(e: &MetadataError) -> DamagedBlock {
    let (kind, block) = match *e {
        MetadataError::WrongLocation { kind, block, .. }
        | MetadataError::ChecksumMismatch { kind, block, .. }
        | MetadataError::Corrupt { kind, block, .. } => (Some(kind), Some(block)),
        MetadataError::BadMagic { .. } | MetadataError::UnsupportedVersion { .. } => {
            (Some(BlockKind::Superblock), Some(SUPERBLOCK_LOCATION))
        }
        MetadataError::Io { block, .. } => (None, Some(block)),
        MetadataError::NotFormatted => {
            return DamagedBlock {
                block: Some(SUPERBLOCK_LOCATION),
                kind: Some(BlockKind::Superblock),
                problem: "superblock (block 0): all zeros".to_string(),
            };
        }
        _ => (None, None),
    };
    let problem = match kind {
        Some(BlockKind::Superblock) => format!("superblock (block 0): {e}"),
        _ => e.to_string(),
    };
    DamagedBlock {
        block,
        kind,
        problem,
    }
}

/// `repair`'s side of the tolerant btree walk: collects leaf entries, visits each node
/// once, and treats a malformed node as damaged (its entries cannot be trusted).
struct RepairWalk<'a, D> {
    dev: &'a D,
    limit: u64,
    nr_blocks: u64,
    visited: HashSet<u64>,
    entries: BTreeMap<u64, u64>,
    conflicting: BTreeSet<u64>,
    damaged: Vec<MetadataError>,
}

impl<D: BlockDev> TolerantWalk for RepairWalk<'_, D> {
    fn enter(&mut self, b: u64, _from: u64) -> bool {
        self.visited.insert(b)
    }
    fn read_node(&mut self, b: u64) -> Result<Box<BlockBuf>, MetadataError> {
        read_block(
            self.dev,
            b,
            BlockKind::BtreeNode,
            self.limit,
            self.nr_blocks,
        )
    }
    fn damaged(&mut self, e: MetadataError) {
        self.damaged.push(e);
    }
    fn malformed(&mut self, e: MetadataError) -> bool {
        self.damaged.push(e);
        false
    }
    fn leaf(&mut self, k: u64, v: u64) {
        add_entry(&mut self.entries, &mut self.conflicting, k, v);
    }
}

/// Records `k -> v`; two different values for one key make the key unusable.
fn add_entry(entries: &mut BTreeMap<u64, u64>, conflicting: &mut BTreeSet<u64>, k: u64, v: u64) {
    if conflicting.contains(&k) {
        return;
    }
    match entries.get(&k) {
        Some(&old) if old != v => {
            entries.remove(&k);
            conflicting.insert(k);
        }
        _ => {
            entries.insert(k, v);
        }
    }
}

/// The array blocks read so far and the hydrated regions they hold.
struct Known {
    indices: BTreeSet<u64>,
    hydrated: DirtySet,
    nr_regions: u64,
}

impl Known {
    /// Takes array block `index`'s words (bits past the last region dropped).
    fn add(&mut self, index: u64, words: &[u64]) {
        let base = index * u64::from(ARRAY_BLOCK_ENTRIES);
        for (e, &v) in words.iter().enumerate() {
            let w = base + e as u64;
            self.hydrated
                .insert_word_bits(w, v & valid_mask(self.nr_regions, w));
        }
        self.indices.insert(index);
    }
}

/// The bits of word `w` that are regions (all but in the last word).
fn valid_mask(nr_regions: u64, w: u64) -> u64 {
    let n = nr_regions.saturating_sub(w.saturating_mul(64)).min(64);
    if n == 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// Words array block `index` holds when the bitset has `nr_words` words.
fn expected_entries(nr_words: u64, index: u64) -> u32 {
    let entries = u64::from(ARRAY_BLOCK_ENTRIES);
    nr_words
        .saturating_sub(index.saturating_mul(entries))
        .min(entries) as u32
}

/// Reads array block `index` at `loc`; its words if it is valid and of the right length.
fn read_array_block<D: BlockDev>(
    dev: &D,
    loc: u64,
    index: u64,
    nr_words: u64,
    limit: u64,
    nr_blocks: u64,
) -> Result<Vec<u64>, MetadataError> {
    let blk = read_block(dev, loc, BlockKind::ArrayBlock, limit, nr_blocks)?;
    let h = check_array_block(&blk, loc)?;
    let expected = expected_entries(nr_words, index);
    if h.nr_entries != expected {
        return Err(MetadataError::corrupt(
            BlockKind::ArrayBlock,
            loc,
            crate::error::Corruption::ArrayBlockEntries {
                index,
                expected,
                found: h.nr_entries,
            },
        ));
    }
    Ok((0..h.nr_entries).map(|e| word(&blk, e)).collect())
}

/// What a scan of the unreached, allocated blocks found.
#[derive(Default)]
struct Scan {
    blocks_read: u64,
    leaf_entries: BTreeMap<u64, u64>,
    conflicting: BTreeSet<u64>,
    orphans: BTreeMap<u64, Vec<u64>>,
}

/// Scans blocks `1..limit` not in `reached` for allocated bitset leaves and array blocks.
fn scan<D: BlockDev>(
    dev: &D,
    tm: &mut Tm<ByRef<'_, D>>,
    limit: u64,
    reached: &HashSet<u64>,
) -> Result<Scan, MetadataError> {
    let mut s = Scan::default();
    let mut buf = vec![0u8; SCAN_RUN as usize * BLOCK_SIZE];
    let mut start = 1u64;
    while start < limit {
        let n = (limit - start).min(SCAN_RUN);
        let bytes = n as usize * BLOCK_SIZE;
        dev.read_at(&mut buf[..bytes], start * BLOCK_SIZE as u64)
            .map_err(|source| MetadataError::Io {
                op: IoOp::Read,
                block: start,
                source,
            })?;
        s.blocks_read += n;
        for (i, chunk) in buf[..bytes].chunks_exact(BLOCK_SIZE).enumerate() {
            let b = start + i as u64;
            if reached.contains(&b) {
                continue;
            }
            let mut blk = [0u8; BLOCK_SIZE];
            blk.copy_from_slice(chunk);
            let is_leaf = validate_envelope(&blk, BlockKind::BtreeNode, b).is_ok()
                && check_node(&blk, b, 8).is_ok_and(|h| h.is_leaf() && !h.is_internal());
            let is_array = !is_leaf
                && validate_envelope(&blk, BlockKind::ArrayBlock, b).is_ok()
                && check_array_block(&blk, b).is_ok();
            if !is_leaf && !is_array {
                continue;
            }
            // Only the committed space map tells a current block from a superseded copy;
            // a block whose count cannot be read is not used.
            if !tm.ref_count(b).is_ok_and(|c| c > 0) {
                continue;
            }
            if is_leaf {
                let nr = crate::format::btree_node::nr_entries(&blk);
                for e in 0..nr {
                    add_entry(
                        &mut s.leaf_entries,
                        &mut s.conflicting,
                        key(&blk, e),
                        value64(&blk, e),
                    );
                }
            } else {
                let nr = crate::format::array_block::nr_entries(&blk);
                s.orphans
                    .insert(b, (0..nr).map(|e| word(&blk, e)).collect());
            }
        }
        start += n;
    }
    Ok(s)
}

/// Places the lost array blocks `lost` among `orphans` where that is unambiguous (see the
/// module doc); returns `index -> location`.
fn place_orphans(
    lost: &BTreeSet<u64>,
    orphans: &BTreeMap<u64, Vec<u64>>,
    nr_words: u64,
    last_index: u64,
) -> BTreeMap<u64, u64> {
    let mut placed = BTreeMap::new();
    if lost.is_empty() || orphans.len() != lost.len() {
        return placed;
    }
    let full = ARRAY_BLOCK_ENTRIES as usize;
    let tail_len = expected_entries(nr_words, last_index) as usize;
    let mut rest_lost: Vec<u64> = lost.iter().copied().collect();
    let mut rest: Vec<(u64, &Vec<u64>)> = orphans.iter().map(|(&b, w)| (b, w)).collect();
    if tail_len != full {
        let tails: Vec<(u64, &Vec<u64>)> = rest
            .iter()
            .copied()
            .filter(|(_, w)| w.len() == tail_len)
            .collect();
        let tail_lost = lost.contains(&last_index);
        if tails.len() != usize::from(tail_lost) {
            return placed;
        }
        if let Some(&(b, _)) = tails.first() {
            placed.insert(last_index, b);
            rest.retain(|(x, _)| *x != b);
            rest_lost.retain(|&i| i != last_index);
        }
    }
    if rest.iter().any(|(_, w)| w.len() != full) || rest.len() != rest_lost.len() {
        return placed;
    }
    let Some(&(_, first)) = rest.first() else {
        return placed;
    };
    if rest.iter().all(|(_, w)| *w == first) {
        for (&i, &(b, _)) in rest_lost.iter().zip(rest.iter()) {
            placed.insert(i, b);
        }
    }
    placed
}

/// What finding lost array blocks by scanning needs to know about the device.
struct Placing<'a, D> {
    dev: &'a D,
    limit: u64,
    nr_blocks: u64,
    nr_words: u64,
    nr_ablocks: u64,
}

impl<D: BlockDev> Placing<'_, D> {
    /// Looks for the array blocks `known` lacks among the blocks the committed space map
    /// (`tm`) counts and the walk did not reach: first through counted bitset leaves, then
    /// by elimination. Returns the blocks scanned and the array blocks placed.
    fn by_scan(
        &self,
        tm: &mut Tm<ByRef<'_, D>>,
        reached: &HashSet<u64>,
        known: &mut Known,
        errors: &mut Vec<MetadataError>,
    ) -> Result<(u64, u64), MetadataError> {
        let lost: BTreeSet<u64> = (0..self.nr_ablocks)
            .filter(|i| !known.indices.contains(i))
            .collect();
        let mut s = scan(self.dev, tm, self.limit, reached)?;
        let mut placed = 0u64;
        for (&index, &loc) in &s.leaf_entries {
            if !lost.contains(&index) || s.conflicting.contains(&index) {
                continue;
            }
            s.orphans.remove(&loc);
            let read = read_array_block(
                self.dev,
                loc,
                index,
                self.nr_words,
                self.limit,
                self.nr_blocks,
            );
            match read {
                Ok(words) => {
                    known.add(index, &words);
                    placed += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        let still: BTreeSet<u64> = lost
            .iter()
            .copied()
            .filter(|i| !known.indices.contains(i))
            .collect();
        let by_elimination = place_orphans(&still, &s.orphans, self.nr_words, self.nr_ablocks - 1);
        for (index, loc) in by_elimination {
            if let Some(words) = s.orphans.remove(&loc) {
                known.add(index, &words);
                placed += 1;
            }
        }
        Ok((s.blocks_read, placed))
    }
}

/// Reads what the damaged metadata on `meta` still holds (never writing to it) and decides
/// every region's state: read, or unknown (then as `opts.unknown_as` says).
pub fn recover<D: BlockDev>(meta: &D, opts: &RepairOptions) -> Result<Recovered, RepairError> {
    let dev_blocks = meta.size_bytes() / BLOCK_SIZE as u64;
    let block0 = if dev_blocks == 0 {
        None
    } else {
        Some(read_superblock_block(meta).map_err(RepairError::Read)?)
    };
    let decoded = match &block0 {
        None => Err(MetadataError::NotFormatted),
        Some(b) if is_all_zero(&b[..]) => Err(MetadataError::NotFormatted),
        Some(b) => Superblock::decode(b).and_then(|sb| {
            Geometry::new(sb.target_sectors, sb.region_sectors)
                .map(|g| (sb, g))
                .map_err(MetadataError::InvalidGeometry)
        }),
    };
    let given = |cause: MetadataError| -> Result<Geometry, RepairError> {
        match (opts.region_sectors, opts.target_sectors) {
            (Some(r), Some(t)) => Geometry::new(t, r).map_err(RepairError::InvalidGeometry),
            (r, t) => Err(RepairError::MissingGeometry {
                cause: Box::new(cause),
                region_size: r.is_none(),
                length: t.is_none(),
            }),
        }
    };
    if let Err(e @ MetadataError::UnsupportedVersion { .. }) = decoded {
        // A sound superblock (its checksum is checked first) of another format version:
        // rebuilding it as version 1 could misread every other block.
        return Err(RepairError::UnsupportedVersion(e));
    }
    let mut damaged_blocks = Vec::new();
    let (geometry, geometry_from, state, roots, overlay) = match decoded {
        Ok((sb, g)) => {
            let differs = opts.region_sectors.is_some_and(|r| r != g.region_sectors())
                || opts.target_sectors.is_some_and(|t| t != g.target_sectors());
            if differs {
                return Err(RepairError::GeometryConflict {
                    sb_region_sectors: g.region_sectors(),
                    sb_target_sectors: g.target_sectors(),
                });
            }
            (
                g,
                GeometrySource::Superblock,
                SuperblockState::Valid,
                Some((sb.sm_root, sb.bitset_root)),
                None,
            )
        }
        Err(cause) => {
            damaged_blocks.push(damaged(&cause));
            let g = given(cause)?;
            // The damaged superblock's roots, sealed again with the given geometry: used
            // only if everything they describe passes check.
            let candidate = block0
                .as_ref()
                .filter(|b| !is_all_zero(&b[..]))
                .map(|b| Superblock::decode_unchecked(b))
                .map(|u| {
                    Superblock::new(
                        u.sm_root,
                        g.region_sectors(),
                        g.target_sectors(),
                        u.bitset_root,
                    )
                });
            let verified = candidate.and_then(|sb| {
                let o = Overlay {
                    dev: meta,
                    block0: Some(sb.encode()),
                };
                let clean = check(&o).is_ok_and(|r| r.is_clean());
                clean.then_some((sb, o.block0))
            });
            match verified {
                Some((sb, b0)) => (
                    g,
                    GeometrySource::Options,
                    SuperblockState::DamagedRootsVerified,
                    Some((sb.sm_root, sb.bitset_root)),
                    b0,
                ),
                None => (
                    g,
                    GeometrySource::Options,
                    SuperblockState::DamagedRootsUnused,
                    None,
                    None,
                ),
            }
        }
    };
    let dev = Overlay {
        dev: meta,
        block0: overlay,
    };
    let nr_regions = geometry.nr_regions();
    let nr_words = nr_regions.div_ceil(64);
    let nr_ablocks = nr_array_blocks(nr_words);
    // Indices read, and their hydrated bits (added as each block is read, so that no
    // second copy of the bitset is held).
    let mut known = Known {
        indices: BTreeSet::new(),
        hydrated: DirtySet::new(),
        nr_regions,
    };
    let mut from_tree = 0u64;
    let mut from_scan = 0u64;
    let mut blocks_scanned = 0u64;
    let mut space_map_usable = false;
    if let Some((sm_root, bitset_root)) = roots {
        let nr_blocks = sm_root.nr_blocks;
        let limit = dev_blocks.min(nr_blocks).min(MAX_METADATA_BLOCKS);
        let mut walk = RepairWalk {
            dev: &dev,
            limit,
            nr_blocks,
            visited: HashSet::new(),
            entries: BTreeMap::new(),
            conflicting: BTreeSet::new(),
            damaged: Vec::new(),
        };
        walk_tolerant(&mut walk, bitset_root, 8);
        let mut errors = std::mem::take(&mut walk.damaged);
        let mut reached: HashSet<u64> = walk.visited.iter().copied().collect();
        for (&index, &loc) in walk.entries.range(..nr_ablocks) {
            reached.insert(loc);
            match read_array_block(&dev, loc, index, nr_words, limit, nr_blocks) {
                Ok(words) => {
                    known.add(index, &words);
                    from_tree += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        match open_space_map(&dev, dev_blocks, &sm_root, &mut errors) {
            Ok(mut tm) => {
                space_map_usable = true;
                if known.indices.len() as u64 != nr_ablocks {
                    let place = Placing {
                        dev: &dev,
                        limit,
                        nr_blocks,
                        nr_words,
                        nr_ablocks,
                    };
                    match place.by_scan(&mut tm, &reached, &mut known, &mut errors) {
                        Ok((scanned, placed)) => {
                            blocks_scanned = scanned;
                            from_scan = placed;
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        damaged_blocks.extend(errors.iter().map(damaged));
    }
    // The hydrated set: the recovered words, then the unknown regions as chosen.
    let Known {
        indices: known,
        mut hydrated,
        ..
    } = known;
    let entries = u64::from(ARRAY_BLOCK_ENTRIES);
    let nr_hydrated_recovered = hydrated.len();
    let mut unknown_ranges: Vec<UnknownRange> = Vec::new();
    let mut nr_unknown = 0u64;
    for index in (0..nr_ablocks).filter(|i| !known.contains(i)) {
        let first = index * REGIONS_PER_ARRAY_BLOCK;
        let n = (nr_regions - first).min(REGIONS_PER_ARRAY_BLOCK);
        nr_unknown += n;
        match unknown_ranges.last_mut() {
            Some(last) if last.first_region + last.nr_regions == first => last.nr_regions += n,
            _ => unknown_ranges.push(UnknownRange {
                first_region: first,
                nr_regions: n,
                offset_bytes: 0,
                len_bytes: 0,
            }),
        }
        if opts.unknown_as == UnknownAs::Hydrated {
            let words = u64::from(expected_entries(nr_words, index));
            for w in index * entries..index * entries + words {
                hydrated.insert_word_bits(w, valid_mask(nr_regions, w));
            }
        }
    }
    for r in &mut unknown_ranges {
        r.offset_bytes = geometry.region_start_byte(r.first_region);
        let end = geometry.region_start_byte(r.first_region + r.nr_regions - 1)
            + geometry.region_len_bytes(r.first_region + r.nr_regions - 1);
        r.len_bytes = end - r.offset_bytes;
    }
    let lost = nr_ablocks - known.len() as u64;
    let report = RepairReport {
        target_sectors: geometry.target_sectors(),
        region_sectors: geometry.region_sectors(),
        nr_regions,
        geometry_from,
        superblock: state,
        space_map_usable,
        array_blocks: nr_ablocks,
        array_blocks_from_tree: from_tree,
        array_blocks_from_scan: from_scan,
        array_blocks_lost: lost,
        blocks_scanned,
        damaged_blocks,
        unknown_as: opts.unknown_as,
        nr_unknown,
        unknown_ranges,
        nr_hydrated_recovered,
        nr_hydrated: 0,
        metadata_blocks_used: 0,
        metadata_blocks_total: 0,
    };
    Ok(Recovered {
        geometry,
        hydrated,
        report,
    })
}

/// The committed space map of `dev` (its index block read and checked). Each bitmap block
/// that fails validation is added to `errors`: the counts it holds are then unreadable,
/// and the scan uses no block they cover.
fn open_space_map<'a, D: BlockDev>(
    dev: &'a D,
    dev_blocks: u64,
    root: &SmRoot,
    errors: &mut Vec<MetadataError>,
) -> Result<Tm<ByRef<'a, D>>, MetadataError> {
    let tm = Tm::open(ByRef(dev), dev_blocks, root)?;
    let limit = dev_blocks.min(root.nr_blocks);
    let index = read_block(
        dev,
        root.bitmap_root,
        BlockKind::SpaceMapIndex,
        limit,
        root.nr_blocks,
    )
    .map(|b| MetadataIndex::decode(&b))?;
    for ie in index
        .entries
        .iter()
        .take(nr_bitmaps(root.nr_blocks) as usize)
    {
        if let Err(e) = read_block(
            dev,
            ie.blocknr,
            BlockKind::SpaceMapBitmap,
            limit,
            root.nr_blocks,
        ) {
            errors.push(e);
        }
    }
    Ok(tm)
}

/// Writes the recovered state to `out`, which must be blank: formats it as
/// `MetadataStore::open` formats fresh metadata, commits the hydrated set in one
/// transaction, and checks the result. Returns the full report and the device.
pub fn write<D: BlockDev>(recovered: Recovered, out: D) -> Result<(RepairReport, D), RepairError> {
    let block0 = read_superblock_block(&out).map_err(RepairError::Write)?;
    if !is_all_zero(&block0[..]) {
        return Err(RepairError::OutputNotBlank);
    }
    let Recovered {
        geometry,
        hydrated,
        mut report,
    } = recovered;
    let (mut store, _map) =
        MetadataStore::open(out, geometry, StoreOptions::default()).map_err(RepairError::Write)?;
    store.commit(&hydrated).map_err(RepairError::Write)?;
    report.metadata_blocks_used = store.nr_blocks_used();
    report.metadata_blocks_total = store.nr_blocks_total();
    let out = store.into_inner();
    let mut verdict = check(&out).map_err(RepairError::Write)?;
    if !verdict.is_clean() {
        let count = verdict.problems.len();
        let first = Box::new(verdict.problems.remove(0));
        return Err(RepairError::OutputNotClean { count, first });
    }
    report.nr_hydrated = verdict.nr_hydrated;
    Ok((report, out))
}

#[cfg(test)]
mod tests {
    use clonebd_core::HydrationMap;
    use clonebd_testkit::SimDisk;

    use super::*;
    use crate::format::btree_node::value64;

    const META_BYTES: u64 = 4 << 20;
    /// 70 000 regions of 8 sectors: three array blocks (509 + 509 + 76 words).
    const NR_REGIONS: u64 = 70_000;

    fn geometry() -> Geometry {
        Geometry::new(NR_REGIONS * 8, 8).expect("geometry")
    }

    /// Metadata written by `MetadataStore` with `ranges` hydrated, one commit per range (so
    /// the device also holds superseded copies of blocks).
    fn build(ranges: &[(u64, u64)]) -> (Vec<u8>, DirtySet) {
        let dev = SimDisk::new("meta", META_BYTES);
        let (mut store, _) =
            MetadataStore::open(dev.clone(), geometry(), StoreOptions::default()).expect("format");
        let mut all = DirtySet::new();
        for &(first, n) in ranges {
            let mut d = DirtySet::new();
            for r in first..first + n {
                d.insert(r);
            }
            store.commit(&d).expect("commit");
            all.union_with(&d);
        }
        (dev.snapshot(), all)
    }

    fn opts(unknown_as: UnknownAs) -> RepairOptions {
        RepairOptions {
            unknown_as,
            region_sectors: None,
            target_sectors: None,
        }
    }

    fn with_geometry(unknown_as: UnknownAs) -> RepairOptions {
        RepairOptions {
            region_sectors: Some(8),
            target_sectors: Some(NR_REGIONS * 8),
            ..opts(unknown_as)
        }
    }

    /// Repairs `img` into a fresh device, checking that `img` was not written.
    fn repair(img: &[u8], o: &RepairOptions) -> Result<(RepairReport, SimDisk), RepairError> {
        let meta = SimDisk::from_bytes("meta", img.to_vec());
        let recovered = recover(&meta, o);
        assert_eq!(meta.write_count(), 0, "repair wrote the damaged device");
        assert_eq!(meta.snapshot(), img);
        write(recovered?, SimDisk::new("out", img.len() as u64))
    }

    /// The output opens in `MetadataStore` and holds `expected` outside the unknown ranges
    /// and the operator's choice inside them.
    fn assert_contract(report: &RepairReport, out: &SimDisk, expected: &DirtySet) {
        let (_, map): (_, HydrationMap) =
            MetadataStore::open(out.clone(), geometry(), StoreOptions::default()).expect("open");
        let inside = |r: u64| {
            report
                .unknown_ranges
                .iter()
                .any(|u| (u.first_region..u.first_region + u.nr_regions).contains(&r))
        };
        for r in 0..NR_REGIONS {
            let want = if inside(r) {
                report.unknown_as == UnknownAs::Hydrated
            } else {
                expected.contains(r)
            };
            assert_eq!(map.is_hydrated(r), want, "region {r}");
        }
        assert_eq!(report.nr_hydrated, map.nr_hydrated());
    }

    fn flip(img: &mut [u8], block: u64, byte: usize) {
        img[block as usize * BLOCK_SIZE + byte] ^= 0x20;
    }

    fn sb(img: &[u8]) -> Superblock {
        let mut b = [0u8; BLOCK_SIZE];
        b.copy_from_slice(&img[..BLOCK_SIZE]);
        Superblock::decode(&b).expect("valid superblock")
    }

    fn block(img: &[u8], b: u64) -> BlockBuf {
        let mut out = [0u8; BLOCK_SIZE];
        out.copy_from_slice(&img[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE]);
        out
    }

    /// Location of array block `index` (the bitset root is a leaf here).
    fn ablock(img: &[u8], index: u32) -> u64 {
        value64(&block(img, sb(img).bitset_root), index)
    }

    const RANGES: [(u64, u64); 4] = [(0, 10), (5000, 3000), (40_000, 7), (69_999, 1)];

    #[test]
    fn undamaged_metadata_is_copied_exactly() {
        let (img, expected) = build(&RANGES);
        let (report, out) = repair(&img, &opts(UnknownAs::Unhydrated)).expect("repair");
        assert_eq!(report.superblock, SuperblockState::Valid);
        assert!(report.unknown_ranges.is_empty() && report.damaged_blocks.is_empty());
        assert_eq!(report.nr_hydrated_recovered, expected.len());
        assert_eq!(report.array_blocks_from_tree, 3);
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn superblock_checksum_damage_with_geometry_given_loses_nothing() {
        let (mut img, expected) = build(&RANGES);
        flip(&mut img, 0, 300);
        let (report, out) = repair(&img, &with_geometry(UnknownAs::Hydrated)).expect("repair");
        assert_eq!(report.superblock, SuperblockState::DamagedRootsVerified);
        assert_eq!(report.geometry_from, GeometrySource::Options);
        assert!(report.unknown_ranges.is_empty());
        assert_eq!(report.damaged_blocks[0].kind, Some(BlockKind::Superblock));
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn superblock_damage_without_geometry_names_what_is_missing() {
        let (mut img, _) = build(&RANGES);
        flip(&mut img, 0, 300);
        let err = repair(&img, &opts(UnknownAs::Hydrated)).expect_err("refused");
        assert!(
            matches!(
                err,
                RepairError::MissingGeometry {
                    region_size: true,
                    length: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
        let o = RepairOptions {
            region_sectors: Some(8),
            ..opts(UnknownAs::Hydrated)
        };
        let err = repair(&img, &o).expect_err("refused");
        assert!(
            matches!(
                err,
                RepairError::MissingGeometry {
                    region_size: false,
                    length: true,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn geometry_that_contradicts_a_valid_superblock_is_refused() {
        let (img, _) = build(&RANGES);
        let o = RepairOptions {
            region_sectors: Some(16),
            ..opts(UnknownAs::Hydrated)
        };
        assert!(matches!(
            repair(&img, &o),
            Err(RepairError::GeometryConflict {
                sb_region_sectors: 8,
                ..
            })
        ));
    }

    #[test]
    fn damaged_array_block_loses_only_its_regions_either_way() {
        let (mut img, expected) = build(&RANGES);
        let b = ablock(&img, 1);
        flip(&mut img, b, 2000);
        for choice in [UnknownAs::Hydrated, UnknownAs::Unhydrated] {
            let (report, out) = repair(&img, &opts(choice)).expect("repair");
            assert_eq!(
                report.unknown_ranges,
                vec![UnknownRange {
                    first_region: 32_576,
                    nr_regions: 32_576,
                    offset_bytes: 32_576 * 4096,
                    len_bytes: 32_576 * 4096,
                }]
            );
            assert_eq!(report.damaged_blocks[0].block, Some(b));
            assert_eq!(report.array_blocks_lost, 1);
            assert_contract(&report, &out, &expected);
        }
    }

    #[test]
    fn damaged_btree_root_places_the_tail_by_length_and_keeps_ambiguous_blocks_unknown() {
        let (mut img, expected) = build(&RANGES);
        let root = sb(&img).bitset_root;
        flip(&mut img, root, 100);
        let (report, out) = repair(&img, &opts(UnknownAs::Unhydrated)).expect("repair");
        // Blocks 0 and 1 hold different words: which is which cannot be told.
        assert_eq!(report.array_blocks_from_scan, 1);
        assert_eq!(report.unknown_ranges.len(), 1);
        assert_eq!(report.unknown_ranges[0].first_region, 0);
        assert_eq!(report.unknown_ranges[0].nr_regions, 2 * 32_576);
        assert!(report.space_map_usable && report.blocks_scanned > 0);
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn damaged_btree_root_over_identical_blocks_loses_nothing() {
        // Blocks 0 and 1 fully hydrated (in several commits, leaving superseded copies
        // with other contents behind), the tail partly.
        let (mut img, expected) = build(&[(0, 20_000), (20_000, 45_152), (65_152, 3)]);
        let root = sb(&img).bitset_root;
        flip(&mut img, root, 100);
        let (report, out) = repair(&img, &opts(UnknownAs::Hydrated)).expect("repair");
        assert_eq!(report.array_blocks_from_scan, 3);
        assert!(report.unknown_ranges.is_empty());
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn damaged_space_map_bitmap_loses_nothing_and_is_reported() {
        let (mut img, expected) = build(&RANGES);
        let index = sb(&img).sm_root.bitmap_root;
        let bitmap = MetadataIndex::decode(&block(&img, index)).entries[0].blocknr;
        flip(&mut img, bitmap, 3000);
        let (report, out) = repair(&img, &opts(UnknownAs::Hydrated)).expect("repair");
        assert!(report.unknown_ranges.is_empty());
        assert_eq!(report.damaged_blocks.len(), 1);
        assert_eq!(
            report.damaged_blocks[0].kind,
            Some(BlockKind::SpaceMapBitmap)
        );
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn without_a_readable_space_map_scanned_blocks_are_not_used() {
        let (mut img, expected) = build(&[(0, 20_000), (20_000, 45_152), (65_152, 3)]);
        let s = sb(&img);
        let bitmap = MetadataIndex::decode(&block(&img, s.sm_root.bitmap_root)).entries[0].blocknr;
        flip(&mut img, bitmap, 3000);
        flip(&mut img, s.bitset_root, 100);
        let (report, out) = repair(&img, &opts(UnknownAs::Unhydrated)).expect("repair");
        assert_eq!(report.array_blocks_from_scan, 0);
        assert_eq!(report.nr_unknown, NR_REGIONS);
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn damaged_superblock_whose_roots_fail_check_uses_none_of_them() {
        let (mut img, expected) = build(&RANGES);
        let b = ablock(&img, 0);
        flip(&mut img, b, 2000);
        flip(&mut img, 0, 300);
        let (report, out) = repair(&img, &with_geometry(UnknownAs::Hydrated)).expect("repair");
        assert_eq!(report.superblock, SuperblockState::DamagedRootsUnused);
        assert_eq!(report.nr_unknown, NR_REGIONS);
        assert_eq!(report.nr_hydrated, NR_REGIONS);
        assert_contract(&report, &out, &expected);
    }

    #[test]
    fn sound_superblock_of_another_version_is_refused() {
        let (img, _) = build(&RANGES);
        let mut s = sb(&img);
        s.version = 2;
        let mut img = img;
        img[..BLOCK_SIZE].copy_from_slice(&s.encode()[..]);
        let err = repair(&img, &with_geometry(UnknownAs::Hydrated)).expect_err("refused");
        assert!(matches!(err, RepairError::UnsupportedVersion(_)), "{err:?}");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn output_that_is_not_blank_is_refused() {
        let (img, _) = build(&RANGES);
        let meta = SimDisk::from_bytes("meta", img.clone());
        let recovered = recover(&meta, &opts(UnknownAs::Hydrated)).expect("recover");
        let out = SimDisk::from_bytes("out", img);
        assert!(matches!(
            write(recovered, out.clone()),
            Err(RepairError::OutputNotBlank)
        ));
        assert_eq!(out.write_count(), 0);
    }
}
