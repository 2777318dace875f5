//! Generated protocol code for KeelMQ.
//!
//! * [`rocketmq::v2`]: the RocketMQ 5 client protocol (`apache.rocketmq.v2`):
//!   the `MessagingService` the official clients call, and the small upstream
//!   `Admin` service. Built from KeelMQ's own `.proto` files, which are
//!   wire-compatible with upstream (checked by `tests/wire.rs` against bytes
//!   produced by the official Python client's generated code).
//! * [`admin`]: the broker administration API (`keelmq.admin.v1`).

/// Encoded `google.protobuf.FileDescriptorSet` of every `.proto` file this
/// crate compiles (with imports and source info), for gRPC reflection and for
/// the wire-compatibility test.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keelmq_proto_descriptor.bin"));

/// The RocketMQ 5 gRPC protocol.
pub mod rocketmq {
    /// `apache.rocketmq.v2`: messages, enums, `MessagingService` and `Admin`
    /// client and server stubs.
    pub mod v2 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("apache.rocketmq.v2");
    }
}

/// The broker administration API (`keelmq.admin.v1`).
pub mod admin {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keelmq.admin.v1");
}
