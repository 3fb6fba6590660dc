//! Damaged, foreign and mismatched metadata: refused with the kernel's texts, reported by
//! `check` (every problem, named), and never written to.

mod common;

use clonebd_core::{DirtySet, Geometry};
use clonebd_metadata::check::Problem;
use clonebd_metadata::format::array_block::set_word;
use clonebd_metadata::format::space_map::{MetadataIndex, bitmap_set};
use clonebd_metadata::format::superblock::Superblock;
use clonebd_metadata::format::{BLOCK_SIZE, BlockBuf, seal};
use clonebd_metadata::{BlockKind, MetadataError, MetadataStore, StoreOptions, check};
use clonebd_testkit::SimDisk;
use common::load;

fn blk(img: &[u8], b: u64) -> BlockBuf {
    let mut out = [0u8; BLOCK_SIZE];
    out.copy_from_slice(&img[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE]);
    out
}

fn put(img: &mut [u8], b: u64, data: &BlockBuf) {
    img[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE].copy_from_slice(data);
}

/// partial-4k's layout: superblock 0, refcount root 2, array blocks 27 and 19, bitmap 28,
/// btree root 29, index 30.
struct Layout {
    bitmap: u64,
    index: u64,
    ablock0: u64,
}

fn layout(img: &[u8]) -> Layout {
    let sb = Superblock::decode(&blk(img, 0)).expect("valid");
    let index = MetadataIndex::decode(&blk(img, sb.sm_root.bitmap_root));
    let root = blk(img, sb.bitset_root);
    Layout {
        bitmap: index.entries[0].blocknr,
        index: sb.sm_root.bitmap_root,
        ablock0: clonebd_metadata::format::btree_node::value64(&root, 0),
    }
}

/// Opening `img` for `g` read-write must fail with an error matching `want`, and write
/// nothing at all.
fn open_fails(img: Vec<u8>, g: Geometry, want: impl Fn(&MetadataError) -> bool) -> String {
    let dev = SimDisk::from_bytes("meta", img.clone());
    let err = match MetadataStore::open(dev.clone(), g, StoreOptions::default()) {
        Ok(_) => panic!("open succeeded on damaged metadata"),
        Err(e) => e,
    };
    assert!(want(&err), "unexpected error: {err:?}");
    assert_eq!(
        dev.write_count(),
        0,
        "writes to metadata that failed validation"
    );
    assert_eq!(dev.flush_count(), 0);
    assert_eq!(dev.snapshot(), img);
    err.to_string()
}

fn problems(img: &[u8]) -> Vec<String> {
    let dev = SimDisk::from_bytes("meta", img.to_vec());
    let report = check(&dev).expect("readable");
    assert_eq!(dev.write_count(), 0, "check wrote");
    report.problems.iter().map(ToString::to_string).collect()
}

#[test]
fn flipped_superblock_byte_is_refused_as_a_superblock_checksum_failure() {
    let f = load("partial-4k");
    let mut img = f.image.clone();
    img[150] ^= 0x10;
    let text = open_fails(img.clone(), f.geometry(), |e| {
        matches!(
            e,
            MetadataError::ChecksumMismatch {
                kind: BlockKind::Superblock,
                block: 0,
                ..
            }
        )
    });
    assert!(
        text.starts_with("Superblock check failed: checksum "),
        "{text}"
    );
    let p = problems(&img);
    assert!(p[0].contains("Superblock check failed: checksum"), "{p:?}");
}

#[test]
fn flipped_array_block_byte_is_refused_and_named() {
    let f = load("partial-4k");
    let l = layout(&f.image);
    let mut img = f.image.clone();
    img[l.ablock0 as usize * BLOCK_SIZE + 1000] ^= 1;
    open_fails(
        img.clone(),
        f.geometry(),
        |e| matches!(e, MetadataError::ChecksumMismatch { kind: BlockKind::ArrayBlock, block, .. } if *block == l.ablock0),
    );
    let p = problems(&img);
    assert!(
        p.iter().any(|s| s.contains(&format!(
            "array block checksum mismatch at block {}",
            l.ablock0
        ))),
        "{p:?}"
    );
}

#[test]
fn flipped_space_map_bitmap_byte_is_reported_and_never_written_over() {
    let f = load("partial-4k");
    let l = layout(&f.image);
    let mut img = f.image.clone();
    img[l.bitmap as usize * BLOCK_SIZE + 40] ^= 0x04;
    let p = problems(&img);
    assert!(
        p.iter().any(|s| s.contains(&format!(
            "space map bitmap checksum mismatch at block {}",
            l.bitmap
        ))),
        "{p:?}"
    );
    // The kernel reads bitmaps only when allocating, so opening succeeds; the first commit
    // fails on the bitmap before writing anything.
    let dev = SimDisk::from_bytes("meta", img.clone());
    let (mut store, _) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("open");
    let mut d = DirtySet::new();
    d.insert(3);
    let err = store.commit(&d).expect_err("commit over a damaged bitmap");
    assert!(
        matches!(
            err,
            MetadataError::ChecksumMismatch {
                kind: BlockKind::SpaceMapBitmap,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(dev.write_count(), 0);
    assert_eq!(dev.snapshot(), img);
    assert!(matches!(
        store.commit(&d),
        Err(MetadataError::AbortRequired)
    ));
}

#[test]
fn geometry_mismatch_uses_the_kernels_text_and_writes_nothing() {
    let f = load("fresh-4k");
    for g in [
        Geometry::new(f.target_sectors, 16).expect("valid"),
        Geometry::new(f.target_sectors - 8, 8).expect("valid"),
    ] {
        let text = open_fails(f.image.clone(), g, |e| {
            matches!(e, MetadataError::GeometryMismatch { .. })
        });
        assert_eq!(
            text,
            "Region and/or target size don't match the ones in metadata"
        );
    }
}

#[test]
fn garbage_is_refused_with_the_kernels_blocknr_text() {
    let mut img = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in img.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // A block number the kernel printed for its random-garbage test.
    img[8..16].copy_from_slice(&17_717_925_331_114_078_289u64.to_le_bytes());
    let g = Geometry::new(262_144, 8).expect("valid");
    let text = open_fails(img, g, |e| matches!(e, MetadataError::WrongLocation { .. }));
    assert_eq!(
        text,
        "Superblock check failed: blocknr 17717925331114078289, expected 0"
    );
}

#[test]
fn wrong_magic_and_version_are_refused_in_kernel_order() {
    let f = load("fresh-4k");
    let mut sb = Superblock::decode(&blk(&f.image, 0)).expect("valid");
    sb.version = 2;
    let mut img = f.image.clone();
    put(&mut img, 0, &sb.encode());
    let text = open_fails(img, f.geometry(), |e| {
        matches!(e, MetadataError::UnsupportedVersion { found: 2, .. })
    });
    assert_eq!(
        text,
        "Clone metadata version 2 found, but only versions between 1 and 1 supported."
    );
    let mut img = f.image.clone();
    img[32] ^= 1;
    let text = open_fails(img, f.geometry(), |e| {
        matches!(e, MetadataError::BadMagic { .. })
    });
    assert_eq!(
        text,
        "Superblock check failed: magic 2331148133, expected 2331148132"
    );
}

#[test]
fn too_small_device_states_the_size_it_needs_and_stays_blank() {
    // The kernel's test suite: 32 sectors of metadata for 1 GiB at 4 KiB regions fails.
    let g = Geometry::new(2 * 1024 * 1024, 8).expect("valid");
    let dev = SimDisk::new("meta", 32 * 512);
    let err = MetadataStore::open(dev.clone(), g, StoreOptions::default()).expect_err("too small");
    let MetadataError::DeviceTooSmall {
        needed_bytes,
        size_bytes,
        ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!(size_bytes, 16_384);
    assert_eq!(needed_bytes, clonebd_metadata::required_metadata_bytes(&g));
    let text = err_text(g, 32 * 512);
    assert!(
        text.contains(&format!("at least {needed_bytes} bytes")),
        "{text}"
    );
    assert!(text.contains("MiB"), "{text}");
    assert_eq!(dev.write_count(), 0);
    // "4 MiB is ample for 1 GiB".
    let dev = SimDisk::new("meta", 4 << 20);
    MetadataStore::open(dev.clone(), g, StoreOptions::default()).expect("4 MiB is enough");
    assert!(check(&dev).expect("readable").is_clean());
}

fn err_text(g: Geometry, size: u64) -> String {
    match MetadataStore::open(SimDisk::new("meta", size), g, StoreOptions::default()) {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn blank_device_opened_read_only_is_refused_and_untouched() {
    let g = Geometry::new(262_144, 8).expect("valid");
    let dev = SimDisk::new("meta", 8 << 20);
    let err =
        MetadataStore::open(dev.clone(), g, StoreOptions { read_only: true }).expect_err("blank");
    assert!(matches!(err, MetadataError::NotFormatted));
    assert_eq!(dev.write_count(), 0);
}

#[test]
fn read_only_store_refuses_commits_and_writes_nothing() {
    let f = load("partial-4k");
    let dev = SimDisk::from_bytes("meta", f.image.clone());
    let (mut store, _) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("open");
    store.set_read_only();
    assert!(store.is_read_only());
    let mut d = DirtySet::new();
    d.insert(7);
    assert!(matches!(store.commit(&d), Err(MetadataError::ReadOnly)));
    assert_eq!(dev.write_count(), 0);
    // An empty transaction writes nothing either, read-only or not.
    let dev2 = SimDisk::from_bytes("meta", f.image.clone());
    let (mut store2, _) =
        MetadataStore::open(dev2.clone(), f.geometry(), StoreOptions::default()).expect("open");
    store2.commit(&DirtySet::new()).expect("empty commit");
    assert_eq!((dev2.write_count(), dev2.flush_count()), (0, 0));
}

#[test]
fn regions_past_the_end_are_refused_before_anything_is_written() {
    let f = load("partial-64k-tail");
    let dev = SimDisk::from_bytes("meta", f.image.clone());
    let (mut store, _) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("open");
    let mut d = DirtySet::new();
    d.insert(3);
    d.insert(1601);
    let err = store.commit(&d).expect_err("out of range");
    assert_eq!(
        err.to_string(),
        "Region 1601 out of range (total number of regions 1601)"
    );
    assert_eq!(dev.write_count(), 0);
    // The store is still usable: nothing was started.
    d = DirtySet::new();
    d.insert(1600);
    store.commit(&d).expect("commit");
}

#[test]
fn check_lists_every_problem_not_just_the_first() {
    let f = load("partial-64k-tail");
    let l = layout(&f.image);
    let mut img = f.image.clone();
    // 1. A bit past the last region (1601 regions: word 25 holds one) in the bitset,
    //    resealed, so only the content is wrong.
    let mut ab = blk(&img, l.ablock0);
    set_word(&mut ab, 25, 1 << 63 | 1);
    seal(&mut ab, BlockKind::ArrayBlock, l.ablock0);
    put(&mut img, l.ablock0, &ab);
    // 2. A leaked block: the bitmap counts block 100, which nothing uses.
    let mut bm = blk(&img, l.bitmap);
    bitmap_set(&mut bm, 100, 1);
    seal(&mut bm, BlockKind::SpaceMapBitmap, l.bitmap);
    put(&mut img, l.bitmap, &bm);
    // 3. A damaged node: the reference-count tree's root (block 2).
    img[2 * BLOCK_SIZE + 77] ^= 0x80;
    let p = problems(&img);
    let has = |needle: &str| p.iter().any(|s| s.contains(needle));
    assert!(
        has("bitset word 25 has bits 0x8000000000000000 set past the last region"),
        "{p:?}"
    );
    assert!(has("block 100 is leaked"), "{p:?}");
    assert!(has("btree node checksum mismatch at block 2"), "{p:?}");
    assert!(
        has("space map index entry 0: nr_free 16314, the bitmap has 16313"),
        "{p:?}"
    );
    assert!(
        has("space map root says 6 blocks are allocated, the bitmaps count 7"),
        "{p:?}"
    );
    let _ = l.index;
}

#[test]
fn check_finds_a_block_the_space_map_forgot() {
    // The opposite of a leak: a live block recorded as free could be handed out and
    // overwritten by the next transaction.
    let f = load("partial-64k-tail");
    let l = layout(&f.image);
    let mut img = f.image.clone();
    let mut bm = blk(&img, l.bitmap);
    bitmap_set(&mut bm, l.ablock0 % 16_320, 0);
    seal(&mut bm, BlockKind::SpaceMapBitmap, l.bitmap);
    put(&mut img, l.bitmap, &bm);
    let p = problems(&img);
    assert!(
        p.iter().any(|s| s.contains(&format!(
            "block {} has 1 reference(s) from the superblock but the space map counts 0",
            l.ablock0
        ))),
        "{p:?}"
    );
}

#[test]
fn exclusive_file_devices_cannot_be_opened_twice_but_can_be_checked() {
    use clonebd_io::{FileDevice, OpenError, OpenOptions};
    let f = load("partial-64k-tail");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.img");
    std::fs::write(&path, &f.image).expect("write image");
    let first = FileDevice::open(&path, OpenOptions::read_write().exclusive(true)).expect("open");
    let (store, map) =
        MetadataStore::open(first, f.geometry(), StoreOptions::default()).expect("metadata");
    assert_eq!(map.nr_hydrated(), 12);
    match FileDevice::open(&path, OpenOptions::read_write().exclusive(true)) {
        Err(e @ OpenError::InUse { .. }) => {
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        other => panic!("second exclusive open: {other:?}"),
    }
    // A read-only, unlocked open (what `clonebd check` does) still works while it is held.
    let ro = FileDevice::open(&path, OpenOptions::read_only()).expect("read-only open");
    assert!(check(&ro).expect("readable").is_clean());
    drop(store);
    // Released with the store.
    FileDevice::open(&path, OpenOptions::read_write().exclusive(true)).expect("reopen");
    assert_eq!(std::fs::read(&path).expect("read"), f.image);
}

#[test]
fn problem_variants_render_for_every_report() {
    // A problem list is printable as one line each.
    let p = Problem::NotFormatted;
    assert!(p.to_string().contains("all zeros"));
}

/// The type of a valid block, found by its checksum salt.
fn kind_of(b: &BlockBuf, loc: u64) -> Option<BlockKind> {
    [
        BlockKind::Superblock,
        BlockKind::BtreeNode,
        BlockKind::ArrayBlock,
        BlockKind::SpaceMapIndex,
        BlockKind::SpaceMapBitmap,
    ]
    .into_iter()
    .find(|&k| clonebd_metadata::format::validate_envelope(b, k, loc).is_ok())
}

#[test]
fn random_damage_never_panics_and_never_passes_silently() {
    // Random bytes changed in the live blocks, half of the time with the checksum fixed up
    // so that the structural checks are reached: open, check, dump and a commit must return
    // errors, never panic; and whatever `open` accepts must also be accepted by `check` or
    // be flagged by it.
    let f = load("partial-64k-tail");
    let live: Vec<u64> = vec![0, 2, 14, 15, 16, 17];
    let mut rng = clonebd_testkit::Rng::new(99);
    for case in 0..400 {
        let mut img = f.image.clone();
        let b = live[rng.below(live.len() as u64) as usize];
        let mut data = blk(&img, b);
        let kind = kind_of(&data, b);
        for _ in 0..rng.range(1, 4) {
            // Mostly headers and early entries, where the structure lives.
            let off = if rng.chance(3, 4) {
                rng.below(256)
            } else {
                rng.below(4096)
            } as usize;
            data[off] ^= 1 << rng.below(8);
        }
        if let (Some(k), true) = (kind, rng.chance(1, 2)) {
            seal(&mut data, k, b);
        }
        put(&mut img, b, &data);
        let dev = SimDisk::from_bytes("meta", img.clone());
        let report = check(&dev).expect("readable");
        let _ = clonebd_metadata::dump(&dev);
        match MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()) {
            Ok((mut store, _)) => {
                let mut d = DirtySet::new();
                d.insert(rng.below(1601));
                let _ = store.commit(&d);
            }
            Err(e) => {
                assert_eq!(
                    dev.write_count(),
                    0,
                    "case {case}: wrote after a failed open"
                );
                // (check knows no expected geometry, so a changed one can pass it.)
                if !matches!(e, MetadataError::GeometryMismatch { .. }) {
                    assert!(
                        !report.is_clean(),
                        "case {case}: open refused what check passed: {e}"
                    );
                }
            }
        }
    }
}
