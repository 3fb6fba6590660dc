//! The sans-IO clone engine.
