//! Messaging semantics on top of the store: consumption (receive, ack,
//! invisible time, redelivery, dead letters), receipt handles, delayed
//! messages and transactional (half) messages.

pub mod arrivals;
pub mod consumer;
pub mod delivery_log;
pub mod receipt;
pub mod slave_reads;
pub mod timer;
pub mod transaction;
