//! `remora-proto`: the control-plane API (`remora.v1`, generated at build time by
//! protox + tonic-prost-build, no system `protoc`) and the policy model that both
//! the control plane and the proxies validate against.
#![forbid(unsafe_code)]
// No unwrap in the library's own code (tests may: clippy.toml).
#![warn(clippy::unwrap_used)]

pub mod delta;
pub mod identity;
pub mod jwt;
pub mod policy;
pub mod util;

pub use identity::SpiffeId;

/// The `remora.v1` API: Discovery, Identity and Admin.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("remora.v1");
}

/// The sample `Echo` gRPC service used by the examples and tests.
pub mod examples {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("remora.examples.v1");
}

/// The encoded descriptor set of every proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/remora_descriptor.bin"));
