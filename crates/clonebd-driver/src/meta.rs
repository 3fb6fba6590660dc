//! The metadata seam: what the driver needs from a metadata store.

use clonebd_core::{DirtySet, HydrationMap};

/// A metadata error, kept for the log line and the status.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

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
