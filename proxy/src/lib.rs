//! `remora-proxy`: the Remora sidecar.
#![forbid(unsafe_code)]

pub mod control;
pub mod data;
pub mod mesh;
pub mod transport;

// Kept for the proxy's property tests (proxy/tests), which name these modules
// by their old paths; the crate itself uses the layered ones.
pub use mesh::destination;
pub use transport::{detect, pool};
