//! `repair` on the kernel-written fixtures, damaged in each block type: the output passes
//! `check`, opens in `MetadataStore`, and holds exactly the fixture's hydrated regions
//! outside the reported unknown ranges and the operator's choice inside them. The damaged
//! image is never written.

mod common;

use clonebd_metadata::format::BLOCK_SIZE;
use clonebd_metadata::format::btree_node::{NodeHeader, nr_entries, value64};
use clonebd_metadata::format::space_map::MetadataIndex;
use clonebd_metadata::format::superblock::Superblock;
use clonebd_metadata::repair::{self, RepairOptions, RepairReport, SuperblockState, UnknownAs};
use clonebd_metadata::{BlockKind, MetadataStore, StoreOptions, check, dump};
use clonebd_testkit::SimDisk;
use common::{FIXTURES, Fixture, load};

fn blk(img: &[u8], b: u64) -> [u8; BLOCK_SIZE] {
    let mut out = [0u8; BLOCK_SIZE];
    out.copy_from_slice(&img[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE]);
    out
}

fn flip(img: &mut [u8], b: u64, byte: usize) {
    img[b as usize * BLOCK_SIZE + byte] ^= 0x20;
}

fn sb(img: &[u8]) -> Superblock {
    Superblock::decode(&blk(img, 0)).expect("valid superblock")
}

/// The bitset's leaves, in key order (the root, or the root's children).
fn leaves(img: &[u8]) -> Vec<u64> {
    let root = sb(img).bitset_root;
    let node = blk(img, root);
    if NodeHeader::decode(&node).is_internal() {
        (0..nr_entries(&node)).map(|i| value64(&node, i)).collect()
    } else {
        vec![root]
    }
}

fn first_array_block(img: &[u8]) -> u64 {
    value64(&blk(img, leaves(img)[0]), 0)
}

fn bitmap0(img: &[u8]) -> u64 {
    MetadataIndex::decode(&blk(img, sb(img).sm_root.bitmap_root)).entries[0].blocknr
}

fn options(f: &Fixture, unknown_as: UnknownAs, geometry: bool) -> RepairOptions {
    RepairOptions {
        unknown_as,
        region_sectors: geometry.then_some(f.region_sectors),
        target_sectors: geometry.then_some(f.target_sectors),
    }
}

/// The fixture's hydrated ranges with the unknown ranges replaced by the choice.
fn expected_ranges(f: &Fixture, report: &RepairReport) -> Vec<[u64; 2]> {
    let mut spans: Vec<(u64, u64)> = f.hydrated_ranges.iter().map(|&(a, n)| (a, a + n)).collect();
    for u in &report.unknown_ranges {
        let (ua, ub) = (u.first_region, u.first_region + u.nr_regions);
        spans = spans
            .into_iter()
            .flat_map(|(a, b)| {
                [(a, b.min(ua)), (a.max(ub), b)]
                    .into_iter()
                    .filter(|(x, y)| x < y)
            })
            .collect();
        if report.unknown_as == UnknownAs::Hydrated {
            spans.push((ua, ub));
        }
    }
    spans.sort_unstable();
    let mut out: Vec<[u64; 2]> = Vec::new();
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if last[0] + last[1] >= a => last[1] = last[1].max(b - last[0]),
            _ => out.push([a, b - a]),
        }
    }
    out
}

/// Repairs `img`, checks the contract, and returns the report.
fn repair_and_verify(f: &Fixture, img: &[u8], o: &RepairOptions) -> RepairReport {
    let meta = SimDisk::from_bytes("meta", img.to_vec());
    let recovered = repair::recover(&meta, o).expect("recover");
    assert_eq!(meta.write_count(), 0, "{}: repair wrote META", f.name);
    assert_eq!(meta.snapshot(), img, "{}: META changed", f.name);
    let out = SimDisk::new("out", img.len() as u64);
    let (report, out) = repair::write(recovered, out).expect("write");
    let verdict = check(&out).expect("check");
    assert!(verdict.is_clean(), "{}: {:?}", f.name, verdict.problems);
    let (_, map) =
        MetadataStore::open(out.clone(), f.geometry(), StoreOptions::default()).expect("open");
    assert_eq!(map.nr_hydrated(), report.nr_hydrated, "{}", f.name);
    let got = dump(&out).expect("dump").hydrated_ranges;
    assert_eq!(got, expected_ranges(f, &report), "{}: {report:#?}", f.name);
    report
}

#[test]
fn undamaged_fixtures_repair_to_exactly_their_hydrated_regions() {
    for name in FIXTURES {
        let f = load(name);
        let r = repair_and_verify(&f, &f.image, &options(&f, UnknownAs::Hydrated, false));
        assert!(r.unknown_ranges.is_empty(), "{name}");
        assert_eq!(r.nr_hydrated, f.nr_hydrated, "{name}");
        assert_eq!(r.superblock, SuperblockState::Valid);
    }
}

#[test]
fn superblock_checksum_damage_loses_nothing_once_the_geometry_is_given() {
    for name in FIXTURES {
        let f = load(name);
        let mut img = f.image.clone();
        flip(&mut img, 0, 1000);
        let meta = SimDisk::from_bytes("meta", img.clone());
        assert!(
            repair::recover(&meta, &options(&f, UnknownAs::Hydrated, false)).is_err(),
            "{name}: repaired without a geometry"
        );
        let r = repair_and_verify(&f, &img, &options(&f, UnknownAs::Hydrated, true));
        assert_eq!(
            r.superblock,
            SuperblockState::DamagedRootsVerified,
            "{name}"
        );
        assert!(r.unknown_ranges.is_empty(), "{name}");
        assert_eq!(r.nr_hydrated, f.nr_hydrated, "{name}");
    }
}

#[test]
fn superblock_with_a_flipped_root_is_not_trusted_and_everything_is_unknown() {
    let f = load("partial-4k");
    let mut img = f.image.clone();
    flip(&mut img, 0, 188); // bitset_root
    for choice in [UnknownAs::Hydrated, UnknownAs::Unhydrated] {
        let r = repair_and_verify(&f, &img, &options(&f, choice, true));
        assert_eq!(r.superblock, SuperblockState::DamagedRootsUnused);
        assert_eq!(r.nr_unknown, f.nr_regions);
    }
}

#[test]
fn damaged_array_block_loses_its_regions_and_nothing_else() {
    for name in FIXTURES {
        let f = load(name);
        let mut img = f.image.clone();
        let ab = first_array_block(&img);
        flip(&mut img, ab, 2000);
        for choice in [UnknownAs::Hydrated, UnknownAs::Unhydrated] {
            let r = repair_and_verify(&f, &img, &options(&f, choice, false));
            assert_eq!(r.unknown_ranges.len(), 1, "{name}");
            assert_eq!(r.unknown_ranges[0].first_region, 0, "{name}");
            assert_eq!(
                r.unknown_ranges[0].nr_regions,
                f.nr_regions.min(32_576),
                "{name}"
            );
            assert_eq!(r.damaged_blocks[0].block, Some(ab), "{name}");
            assert_eq!(r.damaged_blocks[0].kind, Some(BlockKind::ArrayBlock));
        }
    }
}

#[test]
fn damaged_btree_root_is_recovered_by_scanning_the_counted_blocks() {
    // fresh-4k, partial-4k, full-4k: a leaf root over a full block and a 3-word tail, told
    // apart by length; partial-64k-tail: a single (tail) block; multilevel-4k: an internal
    // root over three leaves, which the scan finds (counted, 8-byte values, not reached).
    for name in FIXTURES {
        let f = load(name);
        let mut img = f.image.clone();
        let root = sb(&img).bitset_root;
        flip(&mut img, root, 100);
        let r = repair_and_verify(&f, &img, &options(&f, UnknownAs::Hydrated, false));
        assert!(r.unknown_ranges.is_empty(), "{name}: {r:#?}");
        assert_eq!(r.array_blocks_from_scan, r.array_blocks, "{name}");
        assert_eq!(r.nr_hydrated, f.nr_hydrated, "{name}");
        assert!(r.space_map_usable && r.blocks_scanned > 0, "{name}");
    }
}

#[test]
fn damaged_btree_leaf_of_a_multilevel_tree_loses_only_the_blocks_it_cannot_place() {
    let f = load("multilevel-4k");
    let mut img = f.image.clone();
    let leaf = leaves(&img)[1];
    let first_key = clonebd_metadata::format::btree_node::key(&blk(&img, leaf), 0);
    let n = u64::from(nr_entries(&blk(&img, leaf)));
    flip(&mut img, leaf, 100);
    for choice in [UnknownAs::Hydrated, UnknownAs::Unhydrated] {
        let r = repair_and_verify(&f, &img, &options(&f, choice, false));
        // The middle leaf's blocks hold different words (one has region 8388608): which
        // block was which index cannot be told, so all of them are unknown.
        assert_eq!(r.unknown_ranges.len(), 1);
        assert_eq!(r.unknown_ranges[0].first_region, first_key * 32_576);
        assert_eq!(r.unknown_ranges[0].nr_regions, n * 32_576);
        assert_eq!(r.array_blocks_lost, n);
    }
}

#[test]
fn damaged_space_map_loses_no_regions() {
    for name in FIXTURES {
        let f = load(name);
        for target in ["bitmap", "index"] {
            let mut img = f.image.clone();
            let b = match target {
                "bitmap" => bitmap0(&img),
                _ => sb(&img).sm_root.bitmap_root,
            };
            flip(&mut img, b, 3000);
            let r = repair_and_verify(&f, &img, &options(&f, UnknownAs::Unhydrated, false));
            assert!(r.unknown_ranges.is_empty(), "{name} {target}");
            assert_eq!(r.nr_hydrated, f.nr_hydrated, "{name} {target}");
            assert_eq!(r.damaged_blocks.len(), 1, "{name} {target}");
            assert_eq!(r.damaged_blocks[0].block, Some(b), "{name} {target}");
        }
    }
}

/// Metadata written by `MetadataStore` over many transactions (so the device is full of
/// superseded copies with valid checksums), damaged in 1 to 3 random blocks at random
/// bytes, many times over: repair never fails, its output always passes check, and outside
/// the reported ranges it always holds exactly what the undamaged metadata held. (The
/// geometry is given, as an operator would after a damaged superblock.)
#[test]
fn random_damage_never_yields_a_wrong_region_outside_the_reported_ranges() {
    use clonebd_core::{DirtySet, Geometry};
    use clonebd_testkit::Rng;

    // 200 000 regions: seven array blocks (six full ones and a tail of 81 words).
    let nr_regions = 200_000u64;
    let g = Geometry::new(nr_regions * 8, 8).expect("geometry");
    let dev = SimDisk::new("meta", 4 << 20);
    let (mut store, _) =
        MetadataStore::open(dev.clone(), g, StoreOptions::default()).expect("format");
    let mut rng = Rng::new(12);
    let mut all = DirtySet::new();
    for _ in 0..40 {
        let mut d = DirtySet::new();
        let first = rng.below(nr_regions);
        for r in first..(first + rng.range(1, 20_000)).min(nr_regions) {
            d.insert(r);
        }
        store.commit(&d).expect("commit");
        all.union_with(&d);
    }
    // Whole array blocks hydrated too, so that elimination by identical words is tried.
    let mut d = DirtySet::new();
    for r in 0..3 * 32_576 {
        d.insert(r);
    }
    store.commit(&d).expect("commit");
    all.union_with(&d);
    let img = dev.snapshot();
    let used = store.nr_blocks_used();
    let f = Fixture {
        name: "clonebd-written",
        image: img.clone(),
        target_sectors: g.target_sectors(),
        region_sectors: 8,
        nr_regions,
        metadata_bytes: img.len() as u64,
        nr_hydrated: all.len(),
        hydrated_ranges: ranges_of(&all),
        md_used: used,
        md_total: store.nr_blocks_total(),
    };
    // Blocks worth damaging: the ones in use and the superseded ones among them.
    let span = (0..img.len() / BLOCK_SIZE)
        .rev()
        .find(|&b| {
            img[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE]
                .iter()
                .any(|&x| x != 0)
        })
        .expect("non-empty") as u64
        + 1;
    let mut lost_some = 0;
    let mut scanned_some = 0;
    for round in 0..150 {
        let mut damaged = img.clone();
        for _ in 0..rng.range(1, 4) {
            let b = rng.below(span);
            let byte = rng.below(BLOCK_SIZE as u64) as usize;
            damaged[b as usize * BLOCK_SIZE + byte] ^= 1 << rng.below(8);
        }
        if rng.chance(1, 4) {
            // The btree root too, so that the scan has work.
            flip(&mut damaged, sb(&img).bitset_root, 100);
        }
        let choice = if round % 2 == 0 {
            UnknownAs::Hydrated
        } else {
            UnknownAs::Unhydrated
        };
        let r = repair_and_verify(&f, &damaged, &options(&f, choice, true));
        lost_some += usize::from(r.nr_unknown > 0);
        scanned_some += usize::from(r.array_blocks_from_scan > 0);
    }
    // The damage reached the bitset often enough for the test to mean something.
    assert!(
        lost_some > 5 && scanned_some > 5,
        "{lost_some} {scanned_some}"
    );
}

fn ranges_of(d: &clonebd_core::DirtySet) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in d.regions() {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == r => last.1 += 1,
            _ => out.push((r, 1)),
        }
    }
    out
}
