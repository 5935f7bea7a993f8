//! `remora-examples`: the sample application behind every sidecar (`sample-app`),
//! the local mesh demo (`mesh-demo`) and the client pieces both the demo and the
//! mesh-level tests use to talk to a proxy in explicit mode.
#![forbid(unsafe_code)]

pub mod explicit_proxy;
pub mod probe;
