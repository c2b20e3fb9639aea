//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The CA's own services: generated, and their descriptors kept for server reflection.
    let files = [
        "proto/istio/v1/auth/ca.proto",
        "proto/ca/v1/bundle.proto",
        "proto/ca/v1/audit.proto",
        "proto/ca/v1/jwt.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("ca_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    // The agent's: the SPIFFE Workload API and Envoy's SDS (the subset of Envoy's protos it
    // uses, with Envoy's field numbers), served on a Unix socket and not by the CA.
    let workload = protox::compile(
        [
            "proto/spiffe/workloadapi.proto",
            "proto/envoy/service/secret/v3/sds.proto",
            "proto/envoy/extensions/transport_sockets/tls/v3/secret.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(workload)?;
    // compile_fds prints no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
