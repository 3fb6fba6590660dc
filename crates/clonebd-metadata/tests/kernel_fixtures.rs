//! Golden tests against the metadata images written by the real Linux 6.1 dm-clone
//! (tests/fixtures/kernel-metadata): clonebd reads them exactly, and writes the same bytes.

mod common;

use clonebd_core::{BlockDev, DirtySet, HydrationMap};
use clonebd_metadata::format::BLOCK_SIZE;
use clonebd_metadata::format::array_block::{ARRAY_BLOCK_ENTRIES, word};
use clonebd_metadata::format::btree_node::{NodeHeader, value64};
use clonebd_metadata::format::superblock::Superblock;
use clonebd_metadata::{MetadataStore, StoreOptions, check, dump};
use clonebd_testkit::SimDisk;
use common::{FIXTURES, Fixture, differing_blocks, load, ranges_to_dirty};

fn block(img: &[u8], b: u64) -> [u8; BLOCK_SIZE] {
    let mut out = [0u8; BLOCK_SIZE];
    out.copy_from_slice(&img[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE]);
    out
}

fn superblock_of(img: &[u8]) -> Superblock {
    Superblock::decode(&block(img, 0)).expect("valid superblock")
}

/// The bitset's words, decoded straight from an image (independent of the store).
fn bitset_words(img: &[u8]) -> Vec<u64> {
    fn walk(img: &[u8], b: u64, out: &mut Vec<u64>) {
        let n = block(img, b);
        let h = NodeHeader::decode(&n);
        for i in 0..h.nr_entries {
            let v = value64(&n, i);
            if h.is_internal() {
                walk(img, v, out);
            } else {
                let ab = block(img, v);
                let nr = u32::from_le_bytes([ab[8], ab[9], ab[10], ab[11]]);
                assert!(nr <= ARRAY_BLOCK_ENTRIES);
                out.extend((0..nr).map(|e| word(&ab, e)));
            }
        }
    }
    let mut out = Vec::new();
    walk(img, superblock_of(img).bitset_root, &mut out);
    out
}

/// The commit sequences that produced each fixture, from its console.log: every status
/// call commits, so each write or discard is its own transaction. full-4k was hydrated in
/// the background; its transactions are read back from the superseded array blocks the
/// kernel left in the image (each one a prefix of the regions, in hydration order).
fn kernel_transactions(name: &str) -> Vec<Vec<(u64, u64)>> {
    match name {
        "fresh-4k" => vec![],
        "partial-4k" => vec![
            vec![(0, 1)],
            vec![(5, 16)],
            vec![(100, 1)],
            vec![(32767, 1)],
            vec![(1000, 1000)],
            vec![(2001, 2)],
        ],
        "full-4k" => {
            let ends = [
                2304, 7168, 7680, 13248, 18112, 19520, 22464, 26560, 30080, 31488, 32768,
            ];
            let mut start = 0;
            ends.iter()
                .map(|&end| {
                    let t = vec![(start, end - start)];
                    start = end;
                    t
                })
                .collect()
        }
        "partial-64k-tail" => vec![vec![(1600, 1)], vec![(7, 1)], vec![(50, 10)]],
        "multilevel-4k" => vec![
            vec![(0, 262_144)],
            vec![(2_621_440, 7)],
            vec![(16_515_072, 262_144)],
            vec![(8_388_608, 1)],
        ],
        other => panic!("unknown fixture {other}"),
    }
}

fn open_fixture(f: &Fixture, read_only: bool) -> (MetadataStore<SimDisk>, HydrationMap, SimDisk) {
    let dev = SimDisk::from_bytes("meta", f.image.clone());
    let (store, map) = MetadataStore::open(dev.clone(), f.geometry(), StoreOptions { read_only })
        .unwrap_or_else(|e| panic!("{}: open failed: {e}", f.name));
    (store, map, dev)
}

#[test]
fn kernel_images_open_with_the_exact_hydrated_set_and_block_counts() {
    for name in FIXTURES {
        let f = load(name);
        let (store, map, dev) = open_fixture(&f, true);
        assert_eq!(
            map.hydrated_ranges(),
            f.hydrated_ranges,
            "{name}: hydrated set"
        );
        assert_eq!(map.nr_hydrated(), f.nr_hydrated, "{name}: nr_hydrated");
        assert_eq!(
            (store.nr_blocks_used(), store.nr_blocks_total()),
            (f.md_used, f.md_total),
            "{name}: md used/total as in the kernel's status line"
        );
        assert_eq!(
            dev.snapshot(),
            f.image,
            "{name}: opening wrote to the image"
        );
    }
}

#[test]
fn kernel_images_check_clean_and_dump_as_fixture_json() {
    for name in FIXTURES {
        let f = load(name);
        let dev = SimDisk::from_bytes("meta", f.image.clone());
        let report = check(&dev).expect("readable");
        assert!(
            report.is_clean(),
            "{name}: {:?}",
            report
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        );
        assert_eq!(report.nr_hydrated, f.nr_hydrated, "{name}");
        let d = dump(&dev).expect("dump");
        assert_eq!(d.target_sectors, f.target_sectors);
        assert_eq!(d.region_sectors, f.region_sectors);
        assert_eq!(d.nr_regions, f.nr_regions);
        assert_eq!(d.nr_hydrated, f.nr_hydrated);
        assert_eq!(
            (d.metadata_blocks_used, d.metadata_blocks_total),
            (f.md_used, f.md_total)
        );
        let ranges: Vec<(u64, u64)> = d.hydrated_ranges.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(ranges, f.hydrated_ranges, "{name}: dump ranges");
        // The JSON carries fixture.json's names and values.
        let json: serde_json::Value = serde_json::from_str(&d.to_json()).expect("json");
        let fixture_json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(common::fixtures_dir().join(name).join("fixture.json")).expect("read"),
        )
        .expect("parse");
        for key in [
            "target_sectors",
            "region_sectors",
            "nr_regions",
            "nr_hydrated",
            "hydrated_ranges",
        ] {
            assert_eq!(json[key], fixture_json[key], "{name}: {key}");
        }
        assert_eq!(dev.snapshot(), f.image, "{name}: check or dump wrote");
    }
}

#[test]
fn kernel_superblocks_reencode_byte_identically() {
    for name in FIXTURES {
        let f = load(name);
        let raw = block(&f.image, 0);
        let sb = Superblock::decode(&raw).expect("valid");
        assert_eq!(&sb.encode()[..], &raw[..], "{name}");
        assert_eq!(
            (sb.region_sectors, sb.target_sectors),
            (f.region_sectors, f.target_sectors)
        );
        assert_eq!(sb.sm_root.nr_blocks, f.md_total);
        assert_eq!(sb.sm_root.nr_allocated, f.md_used);
    }
}

#[test]
fn formatting_a_blank_device_writes_the_kernels_image() {
    // fresh-4k is the kernel's format and nothing else: identical to the last byte.
    let f = load("fresh-4k");
    let dev = SimDisk::new("meta", f.metadata_bytes);
    let (store, map) =
        MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default()).expect("format");
    assert!(store.was_formatted());
    assert_eq!(map.nr_hydrated(), 0);
    assert_eq!((store.nr_blocks_used(), store.nr_blocks_total()), (7, 2048));
    assert_eq!(
        differing_blocks(&dev.snapshot(), &f.image),
        Vec::<usize>::new()
    );
    assert_eq!(dev.snapshot(), f.image);
    assert!(!dev.has_unflushed(), "format must end with a flush");
}

#[test]
fn formatted_layout_matches_every_kernel_image_below_its_first_commit() {
    // The other fixtures were committed to after formatting; commits only write blocks
    // past the formatted ones (the allocation cursor moves on), so the formatted blocks
    // 1..used must be identical, including the 3-leaf btree of multilevel-4k.
    for name in FIXTURES {
        let f = load(name);
        let dev = SimDisk::new("meta", f.metadata_bytes);
        let (store, _) = MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default())
            .expect("format");
        let used = store.nr_blocks_used() as usize;
        assert_eq!(used as u64, f.md_used, "{name}: blocks used by the format");
        let ours = dev.snapshot();
        let diff: Vec<usize> = differing_blocks(&ours, &f.image)
            .into_iter()
            .filter(|&b| (1..used).contains(&b))
            .collect();
        assert!(diff.is_empty(), "{name}: formatted blocks differ: {diff:?}");
    }
}

#[test]
fn replaying_the_kernels_transactions_gives_byte_identical_images() {
    for name in FIXTURES {
        let f = load(name);
        let dev = SimDisk::new("meta", f.metadata_bytes);
        let (mut store, _) =
            MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default())
                .expect("format");
        for t in kernel_transactions(name) {
            store.commit(&ranges_to_dirty(&t)).expect("commit");
            assert_eq!(
                store.nr_blocks_used(),
                f.md_used,
                "{name}: used count must stay stable"
            );
        }
        let diff = differing_blocks(&dev.snapshot(), &f.image);
        assert!(
            diff.is_empty(),
            "{name}: blocks differing from the kernel's: {diff:?}"
        );
    }
}

#[test]
fn one_commit_of_the_fixture_set_matches_the_kernels_contents() {
    // The kernel reached each state in several transactions; one transaction places the
    // shadows elsewhere (so the roots in the superblock differ), but everything the kernel
    // validates or reads must agree.
    for name in FIXTURES {
        let f = load(name);
        let dev = SimDisk::new("meta", f.metadata_bytes);
        let (mut store, _) =
            MetadataStore::open(dev.clone(), f.geometry(), StoreOptions::default())
                .expect("format");
        store.commit(&f.dirty_set()).expect("commit");
        let ours = dev.snapshot();
        let report = check(&dev).expect("readable");
        assert!(report.is_clean(), "{name}: {:?}", report.problems);
        assert_eq!(
            bitset_words(&ours),
            bitset_words(&f.image),
            "{name}: bitset words"
        );
        let (a, b) = (superblock_of(&ours), superblock_of(&f.image));
        assert_eq!(
            (
                a.flags,
                a.uuid,
                a.magic,
                a.version,
                a.region_sectors,
                a.target_sectors
            ),
            (
                b.flags,
                b.uuid,
                b.magic,
                b.version,
                b.region_sectors,
                b.target_sectors
            ),
            "{name}"
        );
        assert_eq!(
            (
                a.sm_root.nr_blocks,
                a.sm_root.nr_allocated,
                a.sm_root.ref_count_root
            ),
            (
                b.sm_root.nr_blocks,
                b.sm_root.nr_allocated,
                b.sm_root.ref_count_root
            ),
            "{name}"
        );
        if kernel_transactions(name).len() <= 1 {
            assert_eq!(ours, f.image, "{name}: same transactions, same bytes");
        }
    }
}

#[test]
fn kernel_metadata_committed_further_by_clonebd_stays_valid() {
    for name in FIXTURES {
        let f = load(name);
        let (mut store, map, dev) = open_fixture(&f, false);
        // Hydrate a few more regions: the first unhydrated one, the last one, and a run in
        // the middle, as a transaction of the engine would.
        let mut dirty = DirtySet::new();
        let n = f.nr_regions;
        for r in [0, n / 2, n / 2 + 1, n / 2 + 63, n / 2 + 64, n - 1] {
            if !map.is_hydrated(r) {
                dirty.insert(r);
                map.set(r);
            }
        }
        if let Some(r) = map.first_unhydrated_in(0, n) {
            dirty.insert(r);
            map.set(r);
        }
        store.commit(&dirty).expect("commit");
        assert_eq!(
            store.nr_blocks_used(),
            f.md_used,
            "{name}: used count stays stable"
        );
        drop(store);
        let report = check(&dev).expect("readable");
        assert!(report.is_clean(), "{name}: {:?}", report.problems);
        let (_, reopened) =
            MetadataStore::open(dev.clone(), f.geometry(), StoreOptions { read_only: true })
                .expect("reopen");
        assert_eq!(reopened.hydrated_ranges(), map.hydrated_ranges(), "{name}");
        for r in dirty.regions() {
            assert!(reopened.is_hydrated(r), "{name}: region {r} lost");
        }
    }
}

#[test]
fn a_reopened_store_commits_like_a_reopened_kernel() {
    // After open (or abort) the kernel's allocation cursor starts again at block 0; the
    // shadows therefore go to the lowest free blocks. The result must stay check-clean.
    let f = load("partial-64k-tail");
    let (mut store, _, dev) = open_fixture(&f, false);
    // The kernel's image uses blocks 0, 2 and 14..=17; 1 and 3..=13 are free.
    store.commit(&ranges_to_dirty(&[(100, 5)])).expect("commit");
    let sb = superblock_of(&dev.snapshot());
    // Shadows in allocation order: array block -> 1, bitmap -> 3, btree leaf -> 4,
    // index -> 5.
    assert_eq!((sb.bitset_root, sb.sm_root.bitmap_root), (4, 5));
    store.abort().expect("abort");
    store.commit(&ranges_to_dirty(&[(200, 1)])).expect("commit");
    let sb = superblock_of(&dev.snapshot());
    // Reopened again: the cursor restarts at 0 and the first free blocks are now 6..=9.
    assert_eq!((sb.bitset_root, sb.sm_root.bitmap_root), (8, 9));
    let report = check(&dev).expect("readable");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(store.nr_blocks_used(), 6);
    assert_eq!(dev.size_bytes(), f.metadata_bytes);
}
