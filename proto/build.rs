//! Compiles the .proto files with protox (pure Rust, no system `protoc`) and
//! generates the tonic/prost code from the resulting descriptor set.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["remora/v1/remora.proto", "remora/examples/v1/echo.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("remora_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
