//! gRPC protocols between the runner, its builders and its operators.

/// Generated code for `proto/qr/runner/v1/runner.proto`.
pub mod runner_v1 {
    tonic::include_proto!("qr.runner.v1");
}

/// The encoded file descriptor set of every proto (for the reflection service).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/qr_descriptor.bin"));
