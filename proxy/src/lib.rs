//! `remora-proxy`: the Remora sidecar.
//!
//! Four layers, each a folder; a module names only modules of its own layer
//! or of the layers below it, and no two modules import each other, even
//! through others (`tests/tests/structure.rs` checks it):
//!
//! 1. [`transport`]: bytes and HTTP messages. Protocol detection, the
//!    proxy's body type and its end-of-body hooks, replayable and `Expect`
//!    bodies, the error table, TLS and the workload's certificate slot,
//!    opening upstream connections (TCP, mTLS), connection pools,
//!    forwarding one request, TCP relays, serving HTTP, drain. It knows
//!    nothing of policy: the layers above pass in what to do (a
//!    `connect::Connect`, a `body::OnEnd` hook).
//! 2. [`mesh`]: the compiled policy. A control-plane snapshot compiled
//!    into lookup tables (`Mesh::compile`): services, endpoints, routes,
//!    destinations (balancer, breakers, budget, bulkhead), authorization
//!    and end-user authentication.
//! 3. [`data`]: the data path. `data::outbound` (read `mod.rs` first: the
//!    steps of one request in order, then one file per step) and
//!    `data::inbound`, what they record (`observe`), the state they share
//!    (`state`), the application's health.
//! 4. [`control`]: the control side. `run` (the process, and what runs
//!    where), discovery and certificates (each taking a `ControlPlane`
//!    handle and its own settings), the admin and health endpoints, the
//!    settings, `init` (the interception rules).

#![forbid(unsafe_code)]

pub mod control;
pub mod data;
pub mod mesh;
pub mod transport;

// Kept for the proxy's property tests (proxy/tests), which name these modules
// by their old paths; the crate itself uses the layered ones.
pub use mesh::destination;
pub use transport::{detect, pool};
