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

/// State rebuilt from the log for one role generation (timer,
/// transactions).
pub(crate) trait RoleBound {
    /// The role generation it was built for (`None`: not built for one).
    fn basis_mut(&mut self) -> &mut Option<u64>;
}

/// Locks `state` for the writable master behind `write`: reads the role
/// generation (before the role: a role change after it rebuilds the state
/// again next time), refuses unless that broker is a writable master, then
/// locks `state` and replaces it with `fresh()` unless it was built for that
/// generation. Returns the guard, the generation, and whether it rebuilt.
pub(crate) fn lock_for_role<'a, S: RoleBound>(
    write: &crate::write_path::WritePath,
    state: &'a parking_lot::Mutex<S>,
    fresh: impl FnOnce() -> S,
) -> Result<(parking_lot::MutexGuard<'a, S>, u64, bool), crate::replication::ReplicationError> {
    let basis = role_generation(write);
    write.replication().check_writable()?;
    let mut st = state.lock();
    let rebuild = *st.basis_mut() != Some(basis);
    if rebuild {
        *st = fresh();
        *st.basis_mut() = Some(basis);
    }
    Ok((st, basis, rebuild))
}

/// The first readable offset and the end of queue 0 of `topic` (the
/// broker's own topics: delay, half and op queues).
pub(crate) fn queue_bounds(store: &crate::store::MessageStore, topic: &str) -> (u64, u64) {
    (
        store.queue_min_offset(topic, 0),
        store.queue_max_offset(topic, 0),
    )
}

/// The two progress marks named `names` that the op record at `off` of
/// queue 0 of `topic` carries: `None` if no record is readable there (an
/// unreadable one is logged: only its own marks are lost), `Some(None)` if
/// the record lacks either mark (or it is not a number).
pub(crate) fn op_marks(
    store: &crate::store::MessageStore,
    topic: &str,
    off: u64,
    names: [&str; 2],
) -> Option<Option<(u64, u64)>> {
    let op = match store.get(topic, 0, off) {
        Ok(op) => op?,
        Err(e) => {
            tracing::error!(error = %e, topic, offset = off, "op record unreadable; its progress marks are skipped");
            return None;
        }
    };
    let mark = |k: &str| op.properties.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(mark(names[0]).zip(mark(names[1])))
}

/// [`op_marks`] of every readable op record of queue 0 of `topic` in
/// `[min, max)`, the last first (a backwards scan of an op queue: the
/// marks of the last readable record hold for the log up to it, whatever
/// became of the log after it).
pub(crate) fn op_marks_backwards<'a>(
    store: &'a crate::store::MessageStore,
    topic: &'a str,
    (min, max): (u64, u64),
    names: [&'a str; 2],
) -> impl Iterator<Item = Option<(u64, u64)>> + 'a {
    (min..max)
        .rev()
        .filter_map(move |off| op_marks(store, topic, off, names))
}
