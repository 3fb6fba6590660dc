//! Shared test equipment for the driver's tests.

#![allow(dead_code)]

pub mod sim;

use std::sync::{Arc, Mutex};

use clonebd_core::{BlockDev, DirtySet, Geometry, HydrationMap};
use clonebd_driver::{BackendError, MetadataBackend, MetadataUsage};
use clonebd_testkit::SimDisk;

use sim::MetaFactory;

/// An atomic model of a metadata store: a commit writes and flushes one block of the
/// metadata disk (so injected faults there make it fail) and, only if both succeed, the
/// committed set changes, all at once. It stands in for the real store where the subject
/// under test is the engine and the data path; the real store has its own crash tests and
/// is used by the whole-stack power-cut runs.
#[derive(Default)]
pub struct AtomicMetaModel {
    committed: Arc<Mutex<Vec<u64>>>,
}

struct AtomicMeta {
    disk: SimDisk,
    committed: Arc<Mutex<Vec<u64>>>,
}

/// A lock a panicking test thread left poisoned, as a backend failure.
fn poisoned() -> BackendError {
    BackendError::Io(std::io::Error::other("poisoned"))
}

impl MetadataBackend for AtomicMeta {
    fn commit(&mut self, dirty: &DirtySet) -> Result<(), BackendError> {
        if dirty.is_empty() {
            return Ok(());
        }
        self.disk.write_at(&[1u8; 512], 0)?;
        self.disk.flush()?;
        let mut c = self.committed.lock().map_err(|_| poisoned())?;
        for (w, m) in dirty.words() {
            c[w as usize] |= m;
        }
        Ok(())
    }

    fn abort_and_reload(&mut self, map: &HydrationMap) -> Result<(), BackendError> {
        let mut b = [0u8; 512];
        self.disk.read_at(&mut b, 0)?;
        let c = self.committed.lock().map_err(|_| poisoned())?;
        for (w, &v) in c.iter().enumerate() {
            map.store_word(w as u64, v);
        }
        Ok(())
    }

    fn usage(&self) -> MetadataUsage {
        MetadataUsage { used: 1, total: 1 }
    }
}

impl MetaFactory for AtomicMetaModel {
    fn open(
        &self,
        disk: &SimDisk,
        g: Geometry,
    ) -> Result<(Box<dyn MetadataBackend>, HydrationMap), String> {
        let map = HydrationMap::new(g.nr_regions());
        let mut c = self.committed.lock().map_err(|_| "poisoned")?;
        if c.is_empty() {
            c.resize(map.nr_words() as usize, 0);
        }
        for (w, &v) in c.iter().enumerate() {
            map.store_word(w as u64, v);
        }
        Ok((
            Box::new(AtomicMeta {
                disk: disk.clone(),
                committed: Arc::clone(&self.committed),
            }),
            map,
        ))
    }

    fn check(&self, _disk: &SimDisk, _g: Geometry) -> Result<(), String> {
        Ok(())
    }
}

/// The real dm-clone metadata store on the simulated metadata disk, with `clonebd check`.
#[derive(Default)]
pub struct RealMeta;

impl MetaFactory for RealMeta {
    fn open(
        &self,
        disk: &SimDisk,
        g: Geometry,
    ) -> Result<(Box<dyn MetadataBackend>, HydrationMap), String> {
        let (store, map) = clonebd_metadata::MetadataStore::open(
            disk.clone(),
            g,
            clonebd_metadata::StoreOptions::default(),
        )
        .map_err(|e| e.to_string())?;
        Ok((Box::new(clonebd_driver::StoreBackend::new(store)), map))
    }

    fn check(&self, disk: &SimDisk, _g: Geometry) -> Result<(), String> {
        let report = clonebd_metadata::check(disk).map_err(|e| e.to_string())?;
        if report.is_clean() {
            Ok(())
        } else {
            Err(format!("{:?}", report.problems))
        }
    }
}
