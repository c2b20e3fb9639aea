//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/istio/v1/auth/ca.proto",
        "proto/ca/v1/bundle.proto",
        "proto/ca/v1/audit.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    // The encoded descriptors, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ca_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    // compile_fds prints no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
