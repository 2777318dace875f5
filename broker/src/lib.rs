//! KeelMQ broker library: storage, replication, the admin API, the HTTP
//! health and metrics port, configuration and the broker process. The
//! `keelmq-broker` binary is a thin wrapper around [`server::run`]; the
//! `keelmq` command-line tool uses [`cli`].

pub mod admin;
pub mod cli;
pub mod client_api;
pub mod coalesce;
pub mod config;
pub mod http;
pub mod messaging;
pub mod replication;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
pub mod write_path;
