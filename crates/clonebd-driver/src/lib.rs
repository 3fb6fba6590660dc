//! clonebd-driver (placeholder while the crate is written).
