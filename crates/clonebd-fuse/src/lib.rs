//! clonebd-fuse (placeholder while the crate is written).
