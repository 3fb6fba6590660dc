//! Shared helpers for the integration tests: the kernel fixtures.

#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

use clonebd_core::{DirtySet, Geometry};

/// The five kernel-written fixtures.
pub const FIXTURES: [&str; 5] = [
    "fresh-4k",
    "partial-4k",
    "full-4k",
    "partial-64k-tail",
    "multilevel-4k",
];

/// One kernel fixture: the image and what fixture.json says it holds.
pub struct Fixture {
    pub name: &'static str,
    pub image: Vec<u8>,
    pub target_sectors: u64,
    pub region_sectors: u64,
    pub nr_regions: u64,
    pub metadata_bytes: u64,
    pub nr_hydrated: u64,
    pub hydrated_ranges: Vec<(u64, u64)>,
    pub md_used: u64,
    pub md_total: u64,
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/kernel-metadata")
}

pub fn load(name: &'static str) -> Fixture {
    let dir = fixtures_dir().join(name);
    let gz = std::fs::read(dir.join("meta.img.gz")).expect("read meta.img.gz");
    let mut image = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut image)
        .expect("gunzip");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fixture.json")).expect("read json"))
            .expect("parse json");
    let u = |k: &str| json[k].as_u64().expect(k);
    let ranges = json["hydrated_ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| (r[0].as_u64().expect("first"), r[1].as_u64().expect("count")))
        .collect();
    // "0 262144 clone 8 7/2048 8 ..." -> 7, 2048
    let status = json["status_line"].as_str().expect("status");
    let used_total = status.split(' ').nth(4).expect("md field");
    let (used, total) = used_total.split_once('/').expect("used/total");
    let f = Fixture {
        name,
        target_sectors: u("target_sectors"),
        region_sectors: u("region_sectors"),
        nr_regions: u("nr_regions"),
        metadata_bytes: u("metadata_bytes"),
        nr_hydrated: u("nr_hydrated"),
        hydrated_ranges: ranges,
        md_used: used.parse().expect("used"),
        md_total: total.parse().expect("total"),
        image,
    };
    assert_eq!(f.image.len() as u64, f.metadata_bytes, "{name}: image size");
    f
}

impl Fixture {
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.target_sectors, self.region_sectors).expect("fixture geometry")
    }

    /// The fixture's hydrated set as one dirty set.
    pub fn dirty_set(&self) -> DirtySet {
        ranges_to_dirty(&self.hydrated_ranges)
    }
}

pub fn ranges_to_dirty(ranges: &[(u64, u64)]) -> DirtySet {
    let mut d = DirtySet::new();
    for &(first, count) in ranges {
        for r in first..first + count {
            d.insert(r);
        }
    }
    d
}

/// Indices of the 4096-byte blocks where two images differ.
pub fn differing_blocks(a: &[u8], b: &[u8]) -> Vec<usize> {
    a.chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}
