//! KeelMQ broker library: storage, configuration and the broker process.
//! The `keelmq-broker` binary is a thin wrapper around [`server::run`].

pub mod config;
pub mod replication;
pub mod server;
pub mod store;
pub mod telemetry;
