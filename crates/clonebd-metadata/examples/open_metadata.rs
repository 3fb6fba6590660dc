//! Creates or opens dm-clone metadata in a file and reports time and memory, for
//! `bench/metadata-open.sh` (docs/PERFORMANCE.md, "Metadata").
//!
//! ```text
//! open_metadata create PATH [REGIONS] [HYDRATED_PERCENT]   format and hydrate a share
//! open_metadata open PATH [REGIONS]                        open; print time and memory
//! ```
//! REGIONS defaults to 2^28 (1 TiB of 4 KiB regions). The clone's geometry is
//! REGIONS regions of 8 sectors.

use std::time::Instant;

use clonebd_core::{DirtySet, Geometry};
use clonebd_io::{FileDevice, OpenOptions};
use clonebd_metadata::{MetadataStore, StoreOptions, required_metadata_bytes};

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: open_metadata create|open PATH [REGIONS] [HYDRATED_PERCENT]";
    let (mode, path) = match (args.get(1), args.get(2)) {
        (Some(m), Some(p)) => (m.as_str(), p.as_str()),
        _ => return Err(usage.into()),
    };
    let regions: u64 = args.get(3).map_or(Ok(1 << 28), |s| s.parse())?;
    let geometry = Geometry::new(regions * 8, 8)?;
    match mode {
        "create" => {
            let percent: u64 = args.get(4).map_or(Ok(50), |s| s.parse())?;
            let size = (required_metadata_bytes(&geometry) * 3 / 2).next_multiple_of(1 << 20);
            let f = std::fs::File::create(path)?;
            f.set_len(size)?;
            drop(f);
            let dev = FileDevice::open(path, OpenOptions::read_write().exclusive(true))?;
            let t = Instant::now();
            let (mut store, _) = MetadataStore::open(dev, geometry, StoreOptions::default())?;
            let formatted = t.elapsed();
            // Hydrate `percent` of the regions, in runs spread over the whole clone.
            let mut dirty = DirtySet::new();
            let words = regions.div_ceil(64);
            for w in 0..words {
                if (w * 7919) % 100 < percent {
                    dirty.insert_word_bits(w, u64::MAX);
                }
            }
            let t = Instant::now();
            store.commit(&dirty)?;
            println!(
                "created {path}: {size} bytes, {regions} regions, {} hydrated; format {:.3} s, \
                 commit {:.3} s; {}/{} metadata blocks used",
                dirty.len(),
                formatted.as_secs_f64(),
                t.elapsed().as_secs_f64(),
                store.nr_blocks_used(),
                store.nr_blocks_total()
            );
        }
        "open" => {
            let before = status_kib("VmHWM:");
            let dev = FileDevice::open(path, OpenOptions::read_write().exclusive(true))?;
            let t = Instant::now();
            let (store, map) = MetadataStore::open(dev, geometry, StoreOptions::default())?;
            let elapsed = t.elapsed();
            let after = status_kib("VmHWM:");
            println!(
                "opened {path}: {} regions, {} hydrated, in {:.3} s; peak RSS {} KiB before, {} KiB \
                 after (+{} KiB; the map itself is {} KiB); {}/{} metadata blocks used",
                map.nr_regions(),
                map.nr_hydrated(),
                elapsed.as_secs_f64(),
                before,
                after,
                after.saturating_sub(before),
                map.nr_words() * 8 / 1024,
                store.nr_blocks_used(),
                store.nr_blocks_total()
            );
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
