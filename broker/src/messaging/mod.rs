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

/// The replication manager's role generation, which changes at every
/// promotion and every `follow`. State rebuilt from the log (timer,
/// transactions) is valid for the generation it was built in: a broker
/// that follows another master may have its log cut at the fork point, or
/// discarded and started again, before it is promoted again.
pub(crate) fn role_generation(write: &crate::write_path::WritePath) -> u64 {
    *write.replication().subscribe_role_changes().borrow()
}

/// The first readable offset and the end of queue 0 of `topic` (the
/// broker's own topics: delay, half and op queues).
pub(crate) fn queue_bounds(store: &crate::store::MessageStore, topic: &str) -> (u64, u64) {
    (
        store.queue_min_offset(topic, 0),
        store.queue_max_offset(topic, 0),
    )
}
