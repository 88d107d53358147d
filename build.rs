//! Compiles the protobuf definitions in `proto/` with protox (a pure-Rust protobuf compiler), so the
//! build needs nothing but cargo: no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/qr/runner/v1/runner.proto",
        "proto/qr/admin/v1/admin.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("qr_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        // The admin messages are also served as JSON (`/api/…` of the dashboard).
        .type_attribute(".qr.admin.v1", "#[derive(serde::Serialize)]")
        // Malformed messages are the peer's fault: INVALID_ARGUMENT, not tonic-prost's INTERNAL.
        .codec_path("crate::grpc::codec::QrCodec")
        .compile_fds(fds)?;
    Ok(())
}
