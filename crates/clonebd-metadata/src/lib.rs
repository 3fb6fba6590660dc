//! clonebd-metadata (placeholder while the crate is written).
