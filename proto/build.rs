//! Compiles the project's `.proto` files with `protox` (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`.
//!
//! * `apache/rocketmq/v2/*.proto`: the RocketMQ 5 client protocol, KeelMQ's own
//!   files, wire-compatible with upstream (see `tests/wire.rs`).
//! * `keelmq/admin/v1/admin.proto`: the KeelMQ admin API.
//!
//! `google/protobuf/{duration,timestamp}.proto` come from protox's bundled
//! well-known types and map to `prost_types`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "apache/rocketmq/v2/definition.proto",
        "apache/rocketmq/v2/service.proto",
        "apache/rocketmq/v2/admin.proto",
        "keelmq/admin/v1/admin.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut compiler = protox::Compiler::new(["."])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(files)?;
    // Also kept as bytes (see `FILE_DESCRIPTOR_SET` in lib.rs): the wire test
    // compares it with the official client's descriptors, and it can serve
    // gRPC reflection.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("keelmq_proto_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Record bytes a slave serves to its master: shared, not copied.
        .bytes(".keelmq.admin.v1.ReadRecordsResponse.records")
        // Message bodies: decoded as a slice of the request buffer and
        // handed to the store (and cloned by senders) without copying.
        .bytes(".apache.rocketmq.v2.Message.body")
        .compile_fds(fds)?;
    Ok(())
}
