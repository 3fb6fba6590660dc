//! The metadata seam: what the driver needs from a metadata store, and how it fails.

use std::io;

use clonebd_core::{BlockDev, DirtySet, HydrationMap, errno};
use clonebd_metadata::{MetadataError, MetadataStore};
use thiserror::Error;

/// Why a commit or an abort failed, for the log line (the engine sees only that it did).
///
/// Each variant shows its cause once: the store's own error as it is (its `source()` is the
/// store error's), a device error in words with its errno's name and no `source()`, so a
/// printed chain never repeats it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The dm-clone metadata store refused or failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The metadata device failed under a backend that does its own I/O.
    #[error("metadata device: {}", errno::describe(.0))]
    Io(io::Error),
}

impl From<io::Error> for BackendError {
    fn from(e: io::Error) -> Self {
        BackendError::Io(e)
    }
}

/// Metadata blocks in use and in total (the status line's `<md used>/<md total>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetadataUsage {
    /// Blocks allocated.
    pub used: u64,
    /// Blocks available in all.
    pub total: u64,
}

/// A metadata store as the driver uses it.
pub trait MetadataBackend: Send {
    /// Commits exactly the regions of `dirty` (SPEC 5.4 step 5): written, flushed, then the
    /// superblock, flushed.
    fn commit(&mut self, dirty: &DirtySet) -> Result<(), BackendError>;

    /// Aborts the open transaction (reopening from the last committed superblock) and loads
    /// the committed hydration state into `map`.
    fn abort_and_reload(&mut self, map: &HydrationMap) -> Result<(), BackendError>;

    /// Blocks in use and in total.
    fn usage(&self) -> MetadataUsage;
}

/// The dm-clone metadata store as the driver's backend.
#[derive(Debug)]
pub struct StoreBackend<D: BlockDev> {
    store: MetadataStore<D>,
}

impl<D: BlockDev> StoreBackend<D> {
    /// Wraps an open store.
    pub fn new(store: MetadataStore<D>) -> Self {
        Self { store }
    }

    /// The store.
    pub fn store(&self) -> &MetadataStore<D> {
        &self.store
    }
}

impl<D: BlockDev> MetadataBackend for StoreBackend<D> {
    fn commit(&mut self, dirty: &DirtySet) -> Result<(), BackendError> {
        Ok(self.store.commit(dirty)?)
    }

    fn abort_and_reload(&mut self, map: &HydrationMap) -> Result<(), BackendError> {
        self.store.abort()?;
        // The store refuses commits from here on, as the kernel's metadata does once the
        // target has gone read-only.
        self.store.set_read_only();
        Ok(self.store.reload_into(map)?)
    }

    fn usage(&self) -> MetadataUsage {
        MetadataUsage {
            used: self.store.nr_blocks_used(),
            total: self.store.nr_blocks_total(),
        }
    }
}
