//! Generates the gRPC code from `proto/` with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    // Told to the generator directly: no environment variable set (that would need `unsafe`).
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("x402_batcher_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/x402/batcher/v1/batcher.proto", "proto/x402/batcher/ledger/v1/ledger.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
