//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/istio/v1/auth/ca.proto",
        "proto/ca/v1/bundle.proto",
        "proto/ca/v1/audit.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    // compile_fds prints no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
