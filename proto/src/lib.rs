//! Generated protocol code for KeelMQ.
//!
//! * [`admin`]: the broker administration API (`keelmq.admin.v1`).

/// The broker administration API (`keelmq.admin.v1`).
pub mod admin {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keelmq.admin.v1");
}
