//! Units and the clone's geometry: sectors, regions and every conversion between them.
//!
//! A *sector* is 512 bytes. A *region* is `region_sectors` sectors and is the unit of
//! hydration and of tracking; region `r` covers sectors `[r*R, (r+1)*R)` of the clone, the
//! same sectors on the source and on the destination (identity mapping, no offsets). The last
//! region may be short. All arithmetic is `u64` (SPEC F5, F6): nothing here can truncate on
//! any platform.

use thiserror::Error;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Smallest region size the kernel accepts, in sectors (4 KiB).
pub const MIN_REGION_SECTORS: u64 = 8;
/// Largest region size the kernel accepts, in sectors (1 GiB).
pub const MAX_REGION_SECTORS: u64 = 2_097_152;
/// Most regions one clone may have (the kernel's limit, kept for format compatibility).
pub const MAX_REGIONS: u64 = 1 << 31;

/// A region number.
pub type RegionId = u64;

/// The logical block size a clone works in for a configured one: never below a sector (a
/// device that reports less, or nothing, is taken as 512).
pub fn logical_block_bytes(configured: u64) -> u64 {
    configured.max(SECTOR_SIZE)
}

/// Why a geometry is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum GeometryError {
    /// The clone has zero length.
    #[error("the clone's length is zero")]
    ZeroLength,
    /// The region size is outside `[8, 2097152]` sectors.
    #[error("region size {region_sectors} sectors is outside [8, 2097152]")]
    RegionSizeOutOfRange {
        /// The rejected size, in sectors.
        region_sectors: u64,
    },
    /// The region size is not a power of two.
    #[error("region size {region_sectors} sectors is not a power of 2")]
    RegionSizeNotPowerOfTwo {
        /// The rejected size, in sectors.
        region_sectors: u64,
    },
    /// More than 2^31 regions.
    #[error("{nr_regions} regions is more than the 2^31 allowed; use a larger region size")]
    TooManyRegions {
        /// How many regions the geometry would have.
        nr_regions: u64,
    },
}

/// The shape of a clone: its length and region size, both in sectors.
///
/// Constructed only through [`Geometry::new`], so every value in circulation is valid:
/// `target_sectors > 0`, `region_sectors` a power of two in `[8, 2^21]`, and
/// `1 <= nr_regions <= 2^31`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    target_sectors: u64,
    region_sectors: u64,
    nr_regions: u64,
}

impl Geometry {
    /// Validates and builds a geometry.
    pub fn new(target_sectors: u64, region_sectors: u64) -> Result<Self, GeometryError> {
        if !(MIN_REGION_SECTORS..=MAX_REGION_SECTORS).contains(&region_sectors) {
            return Err(GeometryError::RegionSizeOutOfRange { region_sectors });
        }
        if !region_sectors.is_power_of_two() {
            return Err(GeometryError::RegionSizeNotPowerOfTwo { region_sectors });
        }
        if target_sectors == 0 {
            return Err(GeometryError::ZeroLength);
        }
        let nr_regions = target_sectors.div_ceil(region_sectors);
        if nr_regions > MAX_REGIONS {
            return Err(GeometryError::TooManyRegions { nr_regions });
        }
        Ok(Self {
            target_sectors,
            region_sectors,
            nr_regions,
        })
    }

    /// The clone's length in sectors (the table line's `len`).
    pub fn target_sectors(&self) -> u64 {
        self.target_sectors
    }

    /// The clone's length in bytes.
    pub fn target_bytes(&self) -> u64 {
        self.target_sectors * SECTOR_SIZE
    }

    /// The region size in sectors.
    pub fn region_sectors(&self) -> u64 {
        self.region_sectors
    }

    /// The region size in bytes.
    pub fn region_bytes(&self) -> u64 {
        self.region_sectors * SECTOR_SIZE
    }

    /// `log2(region_bytes)`, for shifts on the hot path.
    pub fn region_shift(&self) -> u32 {
        self.region_bytes().trailing_zeros()
    }

    /// Number of regions, `ceil(target_sectors / region_sectors)`.
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }

    /// The region holding byte `offset`. The caller ensures `offset < target_bytes()`.
    pub fn region_of_byte(&self, offset: u64) -> RegionId {
        offset >> self.region_shift()
    }

    /// The region holding sector `sector`.
    pub fn region_of_sector(&self, sector: u64) -> RegionId {
        sector / self.region_sectors
    }

    /// First byte of region `r`.
    pub fn region_start_byte(&self, r: RegionId) -> u64 {
        r << self.region_shift()
    }

    /// Length of region `r` in bytes: the region size, or less for a short last region.
    pub fn region_len_bytes(&self, r: RegionId) -> u64 {
        let start = self.region_start_byte(r);
        self.region_bytes()
            .min(self.target_bytes().saturating_sub(start))
    }

    /// Byte range `[start, end)` covered by `n` regions from `first`, clipped to the clone.
    pub fn regions_byte_range(&self, first: RegionId, n: u64) -> (u64, u64) {
        let start = self.region_start_byte(first);
        let end = self.region_start_byte(first + n).min(self.target_bytes());
        (start, end)
    }

    /// Whether the last region is shorter than the others.
    pub fn has_short_tail(&self) -> bool {
        !self.target_sectors.is_multiple_of(self.region_sectors)
    }

    /// Whether `[offset, offset+len)` is non-empty and inside the clone (without overflow).
    pub fn contains_range(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.target_bytes())
    }

    /// Whether a request's byte range is valid: non-empty, inside the clone, and aligned to
    /// the logical block size ([`logical_block_bytes`] of `lbs`). The one range check: the
    /// engine and the driver's fast paths both use it.
    pub fn is_valid_request(&self, lbs: u64, offset: u64, len: u64) -> bool {
        let lbs = logical_block_bytes(lbs);
        self.contains_range(offset, len) && offset.is_multiple_of(lbs) && len.is_multiple_of(lbs)
    }

    /// The regions that a byte range `[offset, offset+len)` touches at all: `(first, count)`.
    /// `len` must be non-zero and the range inside the clone.
    pub fn touched_regions(&self, offset: u64, len: u64) -> (RegionId, u64) {
        let first = self.region_of_byte(offset);
        let last = self.region_of_byte(offset + len - 1);
        (first, last - first + 1)
    }

    /// The regions that a byte range covers *wholly* (SPEC 3.6 / F4): `(first, count)`,
    /// count 0 when no region is wholly covered: `first = ceil(start / R)`,
    /// `end = floor((start + len) / R)`. As in the kernel, a short last region is never
    /// counted as covered (its end is not a multiple of the region size).
    pub fn covered_regions(&self, offset: u64, len: u64) -> (RegionId, u64) {
        let rb = self.region_bytes();
        let end = offset.saturating_add(len).min(self.target_bytes());
        let first = offset.div_ceil(rb);
        let last_excl = end / rb;
        if first >= last_excl {
            (first, 0)
        } else {
            (first, last_excl - first)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_range_check_with_one_minimum() {
        let g = super::Geometry::new(64, 8).expect("geometry");
        assert!(g.is_valid_request(512, 0, 512));
        assert!(
            g.is_valid_request(0, 512, 512),
            "no block size reported: a sector"
        );
        assert!(!g.is_valid_request(1, 100, 512), "below a sector: a sector");
        assert!(!g.is_valid_request(4096, 512, 4096));
        assert!(!g.is_valid_request(512, 0, 0));
        assert!(!g.is_valid_request(512, 64 * 512, 512));
        assert!(!g.is_valid_request(512, u64::MAX - 511, 512));
        assert!(g.contains_range(100, 1));
    }

    use super::*;

    #[test]
    fn geometry_rejects_kernel_invalid_region_sizes() {
        assert!(matches!(
            Geometry::new(100, 4),
            Err(GeometryError::RegionSizeOutOfRange { .. })
        ));
        assert!(matches!(
            Geometry::new(100, 4_194_304),
            Err(GeometryError::RegionSizeOutOfRange { .. })
        ));
        assert!(matches!(
            Geometry::new(100, 12),
            Err(GeometryError::RegionSizeNotPowerOfTwo { .. })
        ));
        assert!(Geometry::new(32768, 2_097_152).is_ok());
    }

    #[test]
    fn geometry_allows_exactly_two_to_the_31_regions_f5() {
        assert_eq!(
            Geometry::new(8 << 31, 8).map(|g| g.nr_regions()),
            Ok(1 << 31)
        );
        assert!(matches!(
            Geometry::new((8 << 31) + 1, 8),
            Err(GeometryError::TooManyRegions { nr_regions }) if nr_regions == (1 << 31) + 1
        ));
        // More than 2^32 regions must not wrap around (F5).
        assert!(matches!(
            Geometry::new(8 << 33, 8),
            Err(GeometryError::TooManyRegions { .. })
        ));
    }

    #[test]
    fn geometry_short_tail_region_has_its_real_length() {
        let g = Geometry::new(204_824, 128).expect("valid");
        assert_eq!(g.nr_regions(), 1601);
        assert_eq!(g.region_len_bytes(1600), 24 * 512);
        assert_eq!(g.region_len_bytes(1599), 128 * 512);
        assert!(g.has_short_tail());
    }

    #[test]
    fn covered_regions_ignores_partial_ends() {
        let g = Geometry::new(64 * 100, 64).expect("valid");
        let rb = g.region_bytes();
        // Inside one region, touching neither boundary (F4): nothing covered.
        assert_eq!(g.covered_regions(rb + 5 * 512, 15 * 512).1, 0);
        assert_eq!(g.covered_regions(rb, rb), (1, 1));
        assert_eq!(g.covered_regions(rb + 512, 3 * rb), (2, 2));
        // Whole device.
        assert_eq!(g.covered_regions(0, g.target_bytes()), (0, 100));
    }

    #[test]
    fn covered_regions_never_covers_short_tail() {
        let g = Geometry::new(204_824, 128).expect("valid");
        let start = g.region_start_byte(1599);
        assert_eq!(
            g.covered_regions(start, g.target_bytes() - start),
            (1599, 1)
        );
        assert_eq!(g.covered_regions(0, g.target_bytes()), (0, 1600));
    }

    #[test]
    fn high_regions_use_64_bit_offsets() {
        // 4 TiB+ with 4 KiB regions: sectors above 2^32 (F6).
        let g = Geometry::new(1 << 34, 8).expect("valid");
        let r = (1u64 << 32) / 8 + 3;
        assert_eq!(g.region_start_byte(r), r * 4096);
        assert_eq!(g.region_of_byte(r * 4096 + 17), r);
        assert_eq!(g.regions_byte_range(r, 4), (r * 4096, (r + 4) * 4096));
    }
}
