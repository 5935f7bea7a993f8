//! The Discovery service's server side, generated with a codec of its own:
//! snapshots go out pre-encoded, so one encoding serves every proxy.
//! The wire format is the `remora.v1.Discovery` service of `proto/` unchanged;
//! proxies use the prost-generated client.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let stream = tonic_build::manual::Method::builder()
        .name("stream")
        .route_name("Stream")
        .input_type("remora_proto::v1::DiscoveryRequest")
        .output_type("crate::discovery::push::EncodedSnapshot")
        .codec_path("crate::discovery::push::DiscoveryCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let discovery = tonic_build::manual::Service::builder()
        .name("Discovery")
        .package("remora.v1")
        .method(stream)
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[discovery]);
}
