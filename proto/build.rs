//! Compiles the `.proto` files with `protox` (pure Rust), so no system `protoc` is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos =
        ["eddy/v1/admin.proto", "eddy/v1/broker.proto", "eddy/v1/groups.proto", "eddy/v1/raft.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("eddy_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().bytes(".eddy.v1").compile_fds(fds)?;
    Ok(())
}
