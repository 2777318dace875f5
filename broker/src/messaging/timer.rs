//! Delayed messages: a durable timer built on the commit log.
//!
//! A message due in the future is stored in the system topic
//! `%SYS_DELAY%` (queue 0) with its real topic, queue and delivery time in
//! its properties, so it is as durable (and replicated) as any message. The
//! timer keeps the pending ones in memory ordered by due time, and when one
//! is due writes it to its real topic, where consumers see it. Its progress
//! (the lowest delay-queue offset not yet delivered) is kept like a consumer
//! group's offset; after a restart it reloads from there, so a timer that
//! was pending survives, and one delivered just before a crash may be
//! delivered again (at least once, never lost).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::store::{MessageStore, NewRecord, keys, now_ms, record::flags};
use crate::write_path::WritePath;

/// System topic holding messages until they are due.
pub const DELAY_TOPIC: &str = "%SYS_DELAY%";
/// The timer's progress is stored as this group's offset on [`DELAY_TOPIC`].
const TIMER_GROUP: &str = "%SYS_TIMER%";
/// How often the timer looks for due messages (delivery within this of due).
pub const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct State {
    /// Next delay-queue offset not yet loaded.
    loaded_to: u64,
    /// (due ms, delay-queue offset) of messages not yet delivered.
    pending: BTreeMap<(i64, u64), ()>,
    /// Delivered offsets above `committed`.
    done: BTreeSet<u64>,
    /// Every delay-queue offset below this was delivered.
    committed: u64,
}

/// The timer of delayed messages.
pub struct Timer {
    store: MessageStore,
    state: Mutex<State>,
}

impl Timer {
    pub fn new(store: MessageStore) -> Arc<Self> {
        let state = Mutex::new(Self::initial_state(&store));
        Arc::new(Self { store, state })
    }

    /// Forgets what is pending and reloads from the stored progress: on a
    /// role change, when that progress came from the master this broker
    /// replaces (which delivered what it records as done).
    pub fn reset(&self) {
        *self.state.lock() = Self::initial_state(&self.store);
    }

    fn initial_state(store: &MessageStore) -> State {
        let min = store.queue_min_offset(DELAY_TOPIC, 0);
        let committed = store
            .metadata()
            .get_offset(TIMER_GROUP, DELAY_TOPIC, 0)
            .unwrap_or(min)
            .max(min);
        State {
            loaded_to: committed,
            committed,
            ..State::default()
        }
    }

    /// The record to store for `rec`, due at `due_ms`: held in the delay topic.
    pub fn hold(rec: NewRecord, due_ms: i64) -> NewRecord {
        let mut properties = rec.properties;
        properties.insert(keys::ORIGIN_TOPIC.into(), rec.topic);
        properties.insert(keys::ORIGIN_QUEUE.into(), rec.queue_id.to_string());
        properties.insert(keys::DELIVERY_TIME.into(), due_ms.to_string());
        NewRecord {
            topic: DELAY_TOPIC.into(),
            queue_id: 0,
            born_ms: rec.born_ms,
            flags: rec.flags | flags::DELAYED,
            properties,
            body: rec.body,
        }
    }

    /// Runs until `stop` resolves, delivering due messages through `write`.
    pub async fn run(
        self: Arc<Self>,
        write: WritePath,
        arrivals: Arc<Notify>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(TICK) => {}
            }
            match self.deliver_due(&write, now_ms()).await {
                Ok(0) => {}
                Ok(_) => arrivals.notify_waiters(),
                Err(e) => tracing::debug!(error = %e, "delayed messages not delivered yet"),
            }
        }
    }

    /// Delivers every message due at `now`; returns how many.
    pub async fn deliver_due(&self, write: &WritePath, now: i64) -> Result<usize, String> {
        let due: Vec<u64> = {
            let mut st = self.state.lock();
            self.load(&mut st);
            st.pending
                .keys()
                .take_while(|(t, _)| *t <= now)
                .map(|(_, o)| *o)
                .collect()
        };
        let mut delivered = 0;
        for off in due {
            let held = match self.store.get(DELAY_TOPIC, 0, off) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.mark_done(off);
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let mut properties = held.properties.clone();
            let topic = properties.remove(keys::ORIGIN_TOPIC).unwrap_or_default();
            let queue_id = properties
                .remove(keys::ORIGIN_QUEUE)
                .and_then(|q| q.parse().ok())
                .unwrap_or(0);
            let rec = NewRecord {
                topic,
                queue_id,
                born_ms: held.born_ms,
                flags: held.flags & !flags::DELAYED,
                properties,
                body: held.body.clone(),
            };
            match write.write(vec![rec]).await {
                Ok(_) => {
                    self.mark_done(off);
                    delivered += 1;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(delivered)
    }

    fn mark_done(&self, off: u64) {
        let mut st = self.state.lock();
        st.pending.retain(|(_, o), _| *o != off);
        st.done.insert(off);
        loop {
            let next = st.committed;
            if !st.done.remove(&next) {
                break;
            }
            st.committed += 1;
        }
        self.store
            .metadata()
            .commit_offset(TIMER_GROUP, DELAY_TOPIC, 0, st.committed);
    }

    /// Loads delay-queue entries appended since the last look.
    fn load(&self, st: &mut State) {
        let max = self.store.queue_max_offset(DELAY_TOPIC, 0);
        while st.loaded_to < max {
            let off = st.loaded_to;
            st.loaded_to += 1;
            match self.store.get(DELAY_TOPIC, 0, off) {
                Ok(Some(r)) => {
                    let due = r
                        .properties
                        .get(keys::DELIVERY_TIME)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    st.pending.insert((due, off), ());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable delayed message skipped");
                }
            }
        }
    }
}
