//! `dump`: what a metadata device holds, read-only.
//!
//! The geometry comes from the superblock, the block counts from the space map root (what
//! the kernel's status line prints as `md used/md total` after a commit), and the hydrated
//! regions from the bitset, streamed word by word into sorted, merged ranges so that even a
//! 2^31-region bitset needs no full in-memory map. The JSON form uses the field names of
//! the kernel fixtures' `fixture.json`.

use std::fmt;

use clonebd_core::{BlockDev, Caps, Geometry};
use serde::{Deserialize, Serialize};

use crate::array;
use crate::error::MetadataError;
use crate::format::BLOCK_SIZE;
use crate::format::superblock::Superblock;
use crate::tm::Tm;

/// The contents of dm-clone metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpReport {
    /// Length of the clone in sectors (the superblock's `target_size`).
    pub target_sectors: u64,
    /// Region size in sectors.
    pub region_sectors: u64,
    /// Number of regions, `ceil(target_sectors / region_sectors)`.
    pub nr_regions: u64,
    /// Number of hydrated regions.
    pub nr_hydrated: u64,
    /// Metadata blocks in use (the status line's `md used`).
    pub metadata_blocks_used: u64,
    /// Metadata blocks of the space map (the status line's `md total`).
    pub metadata_blocks_total: u64,
    /// Hydrated regions as sorted, merged `[first_region, count]` pairs.
    pub hydrated_ranges: Vec<[u64; 2]>,
}

impl DumpReport {
    /// The report as JSON, laid out like the fixtures' `fixture.json`: one key per line,
    /// each range as a compact `[first_region, count]` pair.
    pub fn to_json(&self) -> String {
        let ranges: Vec<String> = self
            .hydrated_ranges
            .iter()
            .map(|[first, count]| format!("[{first}, {count}]"))
            .collect();
        format!(
            "{{\n \"target_sectors\": {},\n \"region_sectors\": {},\n \"nr_regions\": {},\n \
             \"nr_hydrated\": {},\n \"metadata_blocks_used\": {},\n \
             \"metadata_blocks_total\": {},\n \"hydrated_ranges\": [{}]\n}}",
            self.target_sectors,
            self.region_sectors,
            self.nr_regions,
            self.nr_hydrated,
            self.metadata_blocks_used,
            self.metadata_blocks_total,
            ranges.join(", ")
        )
    }
}

impl fmt::Display for DumpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = if self.nr_regions == 0 {
            0.0
        } else {
            self.nr_hydrated as f64 * 100.0 / self.nr_regions as f64
        };
        writeln!(
            f,
            "length:           {} sectors ({} bytes)",
            self.target_sectors,
            self.target_sectors * 512
        )?;
        writeln!(
            f,
            "region size:      {} sectors ({} bytes)",
            self.region_sectors,
            self.region_sectors * 512
        )?;
        writeln!(f, "regions:          {}", self.nr_regions)?;
        writeln!(
            f,
            "hydrated:         {}/{} ({pct:.2}%)",
            self.nr_hydrated, self.nr_regions
        )?;
        writeln!(
            f,
            "metadata blocks:  {}/{} used (4096-byte blocks)",
            self.metadata_blocks_used, self.metadata_blocks_total
        )?;
        writeln!(f, "hydrated ranges:  {}", self.hydrated_ranges.len())?;
        for [first, count] in &self.hydrated_ranges {
            if *count == 1 {
                writeln!(f, "  {first}")?;
            } else {
                writeln!(f, "  {first}..={} ({count})", first + count - 1)?;
            }
        }
        Ok(())
    }
}

/// A borrowed device, so the read-only tools can use the transaction manager's readers
/// without taking ownership.
pub(crate) struct ByRef<'a, D>(pub &'a D);

impl<D: BlockDev> BlockDev for ByRef<'_, D> {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn logical_block_size(&self) -> u32 {
        self.0.logical_block_size()
    }
    fn caps(&self) -> Caps {
        self.0.caps()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        // The read-only tools never write; refuse rather than trust that.
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
    fn flush(&self) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
}

/// Reads and validates the superblock of `dev`.
pub(crate) fn read_superblock<D: BlockDev>(dev: &D) -> Result<Superblock, MetadataError> {
    let b = crate::store::read_superblock_block(dev)?;
    if crate::format::superblock::is_all_zero(&b[..]) {
        return Err(MetadataError::NotFormatted);
    }
    Superblock::decode(&b)
}

/// Reads the metadata on `dev` (never writing) and summarises it.
pub fn dump<D: BlockDev>(dev: &D) -> Result<DumpReport, MetadataError> {
    let sb = read_superblock(dev)?;
    let geometry = Geometry::new(sb.target_sectors, sb.region_sectors)?;
    let dev_blocks = dev.size_bytes() / BLOCK_SIZE as u64;
    let mut tm = Tm::open(ByRef(dev), dev_blocks, &sb.sm_root)?;
    let nr_regions = geometry.nr_regions();
    let mut ranges: Vec<[u64; 2]> = Vec::new();
    let mut nr_hydrated = 0u64;
    array::for_each_word(
        &mut tm,
        sb.bitset_root,
        nr_regions.div_ceil(64),
        &mut |w, v| {
            let base = w * 64;
            let valid = nr_regions.saturating_sub(base).min(64);
            let mut v = if valid == 64 {
                v
            } else {
                v & ((1u64 << valid) - 1)
            };
            nr_hydrated += u64::from(v.count_ones());
            while v != 0 {
                let start = u64::from(v.trailing_zeros());
                let run = u64::from((!(v >> start)).trailing_zeros()).min(64 - start);
                let first = base + start;
                match ranges.last_mut() {
                    Some(last) if last[0] + last[1] == first => last[1] += run,
                    _ => ranges.push([first, run]),
                }
                v = if start + run >= 64 {
                    0
                } else {
                    v & !(((1u64 << run) - 1) << start)
                };
            }
        },
    )?;
    Ok(DumpReport {
        target_sectors: sb.target_sectors,
        region_sectors: sb.region_sectors,
        nr_regions,
        nr_hydrated,
        metadata_blocks_used: sb.sm_root.nr_allocated,
        metadata_blocks_total: sb.sm_root.nr_blocks,
        hydrated_ranges: ranges,
    })
}
