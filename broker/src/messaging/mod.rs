//! Messaging semantics on top of the store: consumption (receive, ack,
//! invisible time, redelivery, dead letters) and receipt handles.

pub mod consumer;
pub mod receipt;
pub mod timer;
