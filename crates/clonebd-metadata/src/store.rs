//! [`MetadataStore`]: the dm-clone metadata as the engine's driver uses it.
//!
//! - [`MetadataStore::open`] formats a blank device (first 4096 bytes zero) exactly as the
//!   kernel does, or validates existing metadata in the kernel's order and loads the bitmap
//!   into a [`HydrationMap`] (SPEC 5.6);
//! - [`MetadataStore::commit`] writes one transaction: the exact dirty bits, copy-on-write,
//!   then a flush, the superblock, a flush (SPEC 5.4 step 5);
//! - [`MetadataStore::abort`] and [`MetadataStore::reload_into`] recover from a failed
//!   commit the way the kernel does (reopen from the last committed superblock, reload the
//!   in-core bitmap).
//!
//! The store holds no region state of its own: the in-core map belongs to the engine, and
//! the store only ever sets on disk the bits it is given.

use clonebd_core::{BlockDev, DirtySet, Geometry, HydrationMap};

use crate::array;
use crate::error::{IoOp, MetadataError};
use crate::format::array_block::nr_array_blocks;
use crate::format::space_map::{MAX_METADATA_BLOCKS, nr_bitmaps};
use crate::format::superblock::{SUPERBLOCK_LOCATION, Superblock, is_all_zero};
use crate::format::{BLOCK_SIZE, zeroed_block};
use crate::tm::Tm;

/// How to open the metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Never write: refuse to format a blank device, and refuse every commit.
    pub read_only: bool,
}

/// Metadata devices larger than this many sectors get a warning (16 GiB; dm-clone's
/// `DM_CLONE_METADATA_MAX_SECTORS_WARNING`).
pub const METADATA_WARN_SECTORS: u64 = 33_554_432;
/// Sectors of metadata the space map can use (4 161 600 blocks of 8 sectors).
pub const METADATA_MAX_SECTORS: u64 = MAX_METADATA_BLOCKS * 8;

/// The kernel's warning for an oversized metadata device (SPEC 1.2 row 2a), if it applies:
/// `Metadata device <name> is larger than 33292800 sectors: excess space will not be used.`
pub fn metadata_size_warning(name: &str, size_bytes: u64) -> Option<String> {
    (size_bytes / 512 > METADATA_WARN_SECTORS).then(|| {
        format!(
            "Metadata device {name} is larger than {METADATA_MAX_SECTORS} sectors: excess space \
             will not be used."
        )
    })
}

/// Upper bound of the btree nodes the kernel's sequential inserts create for `n` keys:
/// every node but the last of a level is at least half full.
fn btree_nodes_bound(n: u64) -> u64 {
    let mut total = 0;
    let mut level = n;
    loop {
        let nodes = if level <= 252 {
            1
        } else {
            level.div_ceil(126) + 1
        };
        total += nodes;
        if nodes == 1 {
            return total;
        }
        level = nodes;
    }
}

/// Blocks needed on a device whose space map has `nr_bitmaps` bitmaps: the formatted
/// metadata plus room for one transaction that rewrites every array block and btree node
/// (so that no commit can run out of space; used blocks stay constant across commits).
fn required_blocks(nr_regions: u64, bitmaps: u64) -> u64 {
    let words = nr_regions.div_ceil(64);
    let ablocks = nr_array_blocks(words);
    let nodes = btree_nodes_bound(ablocks);
    // Superblock, index block, reference-count root, bitmaps, btree nodes, array blocks.
    let formatted = 3 + bitmaps + nodes + ablocks;
    let transaction = ablocks + nodes + bitmaps + 1;
    formatted + transaction
}

fn required_blocks_for_device(nr_regions: u64, dev_blocks: u64) -> u64 {
    let bitmaps = nr_bitmaps(dev_blocks.min(MAX_METADATA_BLOCKS)).max(1);
    required_blocks(nr_regions, bitmaps)
}

/// The smallest metadata device, in bytes, that clonebd formats for `geometry`.
///
/// That is the kernel's layout for the bitmap (one 4 KiB array block per 32 576 regions,
/// the btree over them, the superblock and the space map) plus room to rewrite all of it
/// once, since a transaction allocates before it frees.
pub fn required_metadata_bytes(geometry: &Geometry) -> u64 {
    let n = geometry.nr_regions();
    let mut blocks = required_blocks(n, 1);
    // More blocks may need more bitmap blocks: iterate to the fixed point.
    loop {
        let again = required_blocks(n, nr_bitmaps(blocks.min(MAX_METADATA_BLOCKS)).max(1));
        if again <= blocks {
            return blocks * BLOCK_SIZE as u64;
        }
        blocks = again;
    }
}

/// dm-clone metadata on a device: open or format, commit, abort, reload.
pub struct MetadataStore<D: BlockDev> {
    tm: Tm<D>,
    geometry: Geometry,
    bitset_root: u64,
    read_only: bool,
    needs_abort: bool,
    formatted: bool,
    size_bytes: u64,
}

impl<D: BlockDev> std::fmt::Debug for MetadataStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataStore")
            .field("geometry", &self.geometry)
            .field("bitset_root", &self.bitset_root)
            .field("read_only", &self.read_only)
            .field("needs_abort", &self.needs_abort)
            .field("nr_blocks_used", &self.nr_blocks_used())
            .field("nr_blocks_total", &self.nr_blocks_total())
            .finish()
    }
}

pub(crate) fn read_superblock_block<D: BlockDev>(
    dev: &D,
) -> Result<Box<crate::format::BlockBuf>, MetadataError> {
    let mut b = zeroed_block();
    dev.read_at(&mut b[..], SUPERBLOCK_LOCATION)
        .map_err(|source| MetadataError::Io {
            op: IoOp::Read,
            block: SUPERBLOCK_LOCATION,
            source,
        })?;
    Ok(b)
}

fn check_geometry(sb: &Superblock, geometry: &Geometry) -> Result<(), MetadataError> {
    if sb.region_sectors != geometry.region_sectors()
        || sb.target_sectors != geometry.target_sectors()
    {
        return Err(MetadataError::GeometryMismatch {
            on_disk_region_sectors: sb.region_sectors,
            on_disk_target_sectors: sb.target_sectors,
            requested_region_sectors: geometry.region_sectors(),
            requested_target_sectors: geometry.target_sectors(),
        });
    }
    Ok(())
}

impl<D: BlockDev> MetadataStore<D> {
    /// Opens the metadata on `dev` for a clone of `geometry`, formatting it first if its
    /// first 4096 bytes are all zero (unless `opts.read_only`: then it fails with
    /// [`MetadataError::NotFormatted`] and writes nothing).
    ///
    /// Existing metadata is validated as the kernel does: superblock location, magic,
    /// checksum, version; then the region size and length must equal the stored ones
    /// ([`MetadataError::GeometryMismatch`]); then the space map and the whole bitset are
    /// read and checked. Metadata that fails validation is never written. Returns the
    /// store and the in-core hydration map loaded from disk.
    pub fn open(
        dev: D,
        geometry: Geometry,
        opts: StoreOptions,
    ) -> Result<(Self, HydrationMap), MetadataError> {
        let size_bytes = dev.size_bytes();
        let dev_blocks = size_bytes / BLOCK_SIZE as u64;
        if dev_blocks == 0 {
            return Err(MetadataError::DeviceTooSmall {
                size_bytes,
                needed_bytes: required_metadata_bytes(&geometry),
                nr_regions: geometry.nr_regions(),
            });
        }
        let block0 = read_superblock_block(&dev)?;
        if is_all_zero(&block0[..]) {
            if opts.read_only {
                return Err(MetadataError::NotFormatted);
            }
            return Self::format(dev, geometry, size_bytes);
        }
        let sb = Superblock::decode(&block0)?;
        check_geometry(&sb, &geometry)?;
        let tm = Tm::open(dev, dev_blocks, &sb.sm_root)?;
        let mut store = Self {
            tm,
            geometry,
            bitset_root: sb.bitset_root,
            read_only: opts.read_only,
            needs_abort: false,
            formatted: false,
            size_bytes,
        };
        let map = HydrationMap::new(geometry.nr_regions());
        array::load_into(&mut store.tm, store.bitset_root, &map)?;
        Ok((store, map))
    }

    /// Formats a blank device (`__format_metadata`): the space map, an empty bitset grown
    /// to `nr_regions` clear bits, a flush, the superblock, a flush.
    fn format(
        dev: D,
        geometry: Geometry,
        size_bytes: u64,
    ) -> Result<(Self, HydrationMap), MetadataError> {
        let dev_blocks = size_bytes / BLOCK_SIZE as u64;
        let needed = required_blocks_for_device(geometry.nr_regions(), dev_blocks);
        if dev_blocks < needed {
            return Err(MetadataError::DeviceTooSmall {
                size_bytes,
                needed_bytes: required_metadata_bytes(&geometry).max(needed * BLOCK_SIZE as u64),
                nr_regions: geometry.nr_regions(),
            });
        }
        let mut tm = Tm::create(dev, dev_blocks)?;
        let root = array::empty(&mut tm)?;
        let root = array::grow_from_empty(&mut tm, root, geometry.nr_regions().div_ceil(64))?;
        let sm_root = tm.pre_commit()?;
        tm.write_transaction()?;
        let sb = Superblock::new(
            sm_root,
            geometry.region_sectors(),
            geometry.target_sectors(),
            root,
        );
        tm.commit_superblock(&sb)?;
        let store = Self {
            tm,
            geometry,
            bitset_root: root,
            read_only: false,
            needs_abort: false,
            formatted: true,
            size_bytes,
        };
        Ok((store, HydrationMap::new(geometry.nr_regions())))
    }

    /// Commits one transaction: sets on disk exactly the regions of `dirty` (never whole
    /// in-core words), shadowing every block it changes, writes them, flushes, writes the
    /// superblock, flushes. An empty set writes nothing.
    ///
    /// Cost grows with the number of dirty words (plus a btree path each), not with the
    /// number of regions. On failure the on-disk state is the last committed one or this
    /// transaction (whichever the superblock holds); the store then refuses further
    /// commits until [`abort`](Self::abort) re-reads it.
    pub fn commit(&mut self, dirty: &DirtySet) -> Result<(), MetadataError> {
        if dirty.is_empty() {
            return Ok(());
        }
        if self.read_only {
            return Err(MetadataError::ReadOnly);
        }
        if self.needs_abort {
            return Err(MetadataError::AbortRequired);
        }
        let nr_regions = self.geometry.nr_regions();
        let nr_words = nr_regions.div_ceil(64);
        for (w, mask) in dirty.words() {
            let valid = if w + 1 < nr_words {
                u64::MAX
            } else if w + 1 == nr_words {
                let n = nr_regions - w * 64;
                if n == 64 { u64::MAX } else { (1u64 << n) - 1 }
            } else {
                0
            };
            if mask & !valid != 0 {
                let bit = (mask & !valid).trailing_zeros();
                return Err(MetadataError::RegionOutOfRange {
                    region: w * 64 + u64::from(bit),
                    nr_regions,
                });
            }
        }
        self.needs_abort = true;
        match self.commit_inner(dirty) {
            Ok(root) => {
                self.bitset_root = root;
                self.needs_abort = false;
                Ok(())
            }
            Err(e) => {
                self.tm.reset_transaction();
                Err(e)
            }
        }
    }

    fn commit_inner(&mut self, dirty: &DirtySet) -> Result<u64, MetadataError> {
        let root = array::set_bits(&mut self.tm, self.bitset_root, dirty)?;
        let sm_root = self.tm.pre_commit()?;
        self.tm.write_transaction()?;
        let sb = Superblock::new(
            sm_root,
            self.geometry.region_sectors(),
            self.geometry.target_sectors(),
            root,
        );
        self.tm.commit_superblock(&sb)?;
        Ok(root)
    }

    /// Drops every uncommitted change and reopens the metadata from the superblock on disk,
    /// as the kernel's abort does. Reads only, so it is allowed in read-only mode too. If it
    /// fails, the metadata is unusable (the kernel's fail mode).
    pub fn abort(&mut self) -> Result<(), MetadataError> {
        self.tm.reset_transaction();
        self.needs_abort = true;
        let block0 = read_superblock_block(self.tm.dev())?;
        let sb = Superblock::decode(&block0)?;
        check_geometry(&sb, &self.geometry)?;
        self.tm.reopen(&sb.sm_root)?;
        self.bitset_root = sb.bitset_root;
        self.needs_abort = false;
        Ok(())
    }

    /// Loads the committed on-disk bitset into `map`, replacing every word (so regions not
    /// hydrated on disk become unhydrated). Used after a failed commit and an abort
    /// (SPEC 5.4: "reload the in-core bitmap from disk").
    pub fn reload_into(&mut self, map: &HydrationMap) -> Result<(), MetadataError> {
        if map.nr_regions() != self.geometry.nr_regions() {
            return Err(MetadataError::MapSizeMismatch {
                expected: self.geometry.nr_regions(),
                found: map.nr_regions(),
            });
        }
        if self.needs_abort {
            return Err(MetadataError::AbortRequired);
        }
        array::load_into(&mut self.tm, self.bitset_root, map)
    }

    /// Switches to read-only: every later commit fails with [`MetadataError::ReadOnly`]
    /// and writes nothing.
    pub fn set_read_only(&mut self) {
        self.read_only = true;
    }

    /// Whether the store is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether `open` formatted the device.
    pub fn was_formatted(&self) -> bool {
        self.formatted
    }

    /// Metadata blocks in use (the status line's `md used`).
    pub fn nr_blocks_used(&self) -> u64 {
        self.tm.nr_used()
    }

    /// Metadata blocks the space map covers (the status line's `md total`):
    /// `min(device blocks, 4161600)`, fixed at format time.
    pub fn nr_blocks_total(&self) -> u64 {
        self.tm.nr_blocks()
    }

    /// The clone's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The kernel's warning for metadata devices over 16 GiB, naming the device `name`.
    pub fn size_warning(&self, name: &str) -> Option<String> {
        metadata_size_warning(name, self.size_bytes)
    }

    /// The device.
    pub fn device(&self) -> &D {
        self.tm.dev()
    }

    /// Closes the store and gives the device back. Nothing is written.
    pub fn into_inner(self) -> D {
        self.tm.into_dev()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_warning_has_the_kernel_text() {
        assert_eq!(metadata_size_warning("m", 16 << 30), None);
        assert_eq!(
            metadata_size_warning("m", (16 << 30) + 512).as_deref(),
            Some(
                "Metadata device m is larger than 33292800 sectors: excess space will not be used."
            )
        );
    }

    #[test]
    fn required_size_grows_with_regions() {
        let small = Geometry::new(262_144, 8).expect("valid");
        let big = Geometry::new(1 << 31, 8).expect("valid");
        assert!(required_metadata_bytes(&small) < (1 << 20));
        assert!(required_metadata_bytes(&big) > required_metadata_bytes(&small));
        // 2^28 regions: 8241 array blocks, about 2 x 33 MiB with the transaction's room.
        let r = required_metadata_bytes(&big);
        assert!(r > 64 << 20 && r < 80 << 20, "{r}");
    }
}
