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

use super::arrivals::Arrivals;
use crate::store::{MessageStore, NewRecord, StoreError, keys, now_ms, record::flags};
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

    /// Runs until `stop` resolves, delivering due messages through `write`
    /// and waking the receives waiting on their topics.
    pub async fn run(
        self: Arc<Self>,
        write: WritePath,
        arrivals: Arc<Arrivals>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(TICK) => {}
            }
            if let Err(e) = self.deliver_due_to(&write, now_ms(), Some(&arrivals)).await {
                tracing::debug!(error = %e, "delayed messages not delivered yet");
            }
        }
    }

    /// Delivers every message due at `now`; returns how many.
    pub async fn deliver_due(&self, write: &WritePath, now: i64) -> Result<usize, String> {
        self.deliver_due_to(write, now, None).await
    }

    /// [`Timer::deliver_due`], notifying `arrivals` of each message's topic
    /// as soon as it is written there.
    async fn deliver_due_to(
        &self,
        write: &WritePath,
        now: i64,
        arrivals: Option<&Arrivals>,
    ) -> Result<usize, String> {
        let due: Vec<(i64, u64)> = {
            let mut st = self.state.lock();
            self.load(&mut st);
            st.pending
                .keys()
                .take_while(|(t, _)| *t <= now)
                .copied()
                .collect()
        };
        let mut delivered = 0;
        let mut unread = None;
        for key in due {
            let held = match self.store.get(DELAY_TOPIC, 0, key.1) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.mark_done(key);
                    continue;
                }
                // Corrupt: it will never be readable; skipped, as `load`
                // does, so it does not hold up the messages due after it.
                Err(e @ (StoreError::Corrupt { .. } | StoreError::DamagedIndex { .. })) => {
                    tracing::error!(error = %e, offset = key.1, "unreadable delayed message skipped");
                    self.mark_done(key);
                    continue;
                }
                // Perhaps passing: tried again next time; the others go now.
                Err(e) => {
                    tracing::warn!(error = %e, offset = key.1, "delayed message not readable now; trying again later");
                    unread.get_or_insert(e.to_string());
                    continue;
                }
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
            let topic = rec.topic.clone();
            match write.write(vec![rec]).await {
                Ok(_) => {
                    self.mark_done(key);
                    if let Some(a) = arrivals {
                        a.notify(&topic);
                    }
                    delivered += 1;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        match unread {
            Some(e) if delivered == 0 => Err(e),
            _ => Ok(delivered),
        }
    }

    /// Records that the pending message `key` (due ms, delay-queue offset)
    /// was delivered.
    fn mark_done(&self, key: (i64, u64)) {
        let mut st = self.state.lock();
        st.pending.remove(&key);
        self.settle(&mut st, key.1);
    }

    /// Counts delay-queue offset `off` as done and moves the stored
    /// progress over every done offset at its front.
    fn settle(&self, st: &mut State, off: u64) {
        st.done.insert(off);
        let before = st.committed;
        while st.done.remove(&st.committed) {
            st.committed += 1;
        }
        if st.committed != before {
            self.store
                .metadata()
                .commit_offset(TIMER_GROUP, DELAY_TOPIC, 0, st.committed);
        }
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
                // Removed by retention, or unreadable: nothing to deliver,
                // and the progress must not stop there (it would hold every
                // later delivered offset in memory and deliver them all
                // again after a restart).
                Ok(None) => self.settle(st, off),
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable delayed message skipped");
                    self.settle(st, off);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::Rng;

    use super::*;

    /// Every delivered copy in `topic`: message id to how many copies.
    fn delivered(store: &MessageStore, topic: &str) -> HashMap<String, u32> {
        let mut seen = HashMap::new();
        for q in 0..2 {
            for i in 0..store.queue_max_offset(topic, q) {
                let r = store.get(topic, q, i).expect("read").expect("present");
                let id = r.properties.get(keys::MESSAGE_ID).expect("id").clone();
                assert!(!r.properties.contains_key(keys::ORIGIN_TOPIC));
                *seen.entry(id).or_insert(0) += 1;
            }
        }
        seen
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delayed_message_wakes_the_receives_of_its_topic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let arrivals = Arc::new(Arrivals::default());
        let (on_t, on_other) = (arrivals.watch("t"), arrivals.watch("other"));
        let (t, other) = (on_t.notified(), on_other.notified());
        tokio::pin!(t, other);
        t.as_mut().enable();
        other.as_mut().enable();
        let rec = NewRecord::new("t", 0, b"later".to_vec());
        write
            .write(vec![Timer::hold(rec, now_ms() + 300)])
            .await
            .expect("hold");
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(Timer::new(store.clone()).run(
            write.clone(),
            arrivals.clone(),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ));
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("the receives of t woken when the message is due");
        assert_eq!(store.queue_max_offset("t", 0), 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), other.as_mut())
                .await
                .is_err(),
            "another topic's receives are not woken"
        );
        let _ = stop_tx.send(true);
        run.await.expect("timer task");
    }

    #[tokio::test]
    async fn delayed_messages_come_due_never_early_and_survive_restarts() {
        let mut rng = crate::testing::seeded_rng();
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let base = now_ms();
        let mut due: HashMap<String, i64> = HashMap::new();
        for i in 0..80 {
            let id = format!("m{i}");
            let at = base + rng.random_range(0..10_000);
            let rec = NewRecord::new("t", i % 2, vec![i as u8; 10])
                .with_property(keys::MESSAGE_ID, id.clone());
            write.write(vec![Timer::hold(rec, at)]).await.expect("hold");
            due.insert(id, at);
        }
        let mut timer = Timer::new(store.clone());
        let mut now = base - 1_000;
        // Copies already there at the last restart, which may be repeated.
        let mut at_restart: HashMap<String, u32> = HashMap::new();
        while now < base + 12_000 {
            now += rng.random_range(0..700);
            if rng.random_range(0..10) == 0 {
                timer = Timer::new(store.clone());
                at_restart = delivered(&store, "t");
            }
            timer.deliver_due(&write, now).await.expect("deliver");
            let seen = delivered(&store, "t");
            for (id, &at) in &due {
                let copies = seen.get(id).copied().unwrap_or(0);
                if at <= now {
                    assert!(copies >= 1, "{id} due at {at} not delivered by {now}");
                } else {
                    assert_eq!(copies, 0, "{id} due at {at} delivered by {now}");
                }
                // Between restarts each message is delivered once.
                let before = at_restart.get(id).copied().unwrap_or(0);
                assert!(
                    copies <= before + 1,
                    "{id} delivered twice without a restart"
                );
            }
        }
        // Everything delivered: the progress covers the delay queue, and a
        // restart delivers nothing again.
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(80)
        );
        let before = delivered(&store, "t");
        let timer = Timer::new(store.clone());
        assert_eq!(timer.deliver_due(&write, now).await.expect("deliver"), 0);
        assert_eq!(delivered(&store, "t"), before);
        assert_eq!(before.len(), 80, "every message delivered");
    }

    #[tokio::test]
    async fn a_delayed_message_damaged_after_loading_does_not_hold_up_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let now = now_ms();
        let mut held = Vec::new();
        for (id, due) in [("a", now + 1_000), ("b", now + 2_000)] {
            let rec = NewRecord::new("t", 0, b"body".to_vec()).with_property(keys::MESSAGE_ID, id);
            held.push(
                write
                    .write(vec![Timer::hold(rec, due)])
                    .await
                    .expect("hold")[0],
            );
        }
        let timer = Timer::new(store.clone());
        assert_eq!(
            timer.deliver_due(&write, now).await.expect("deliver"),
            0,
            "none due yet"
        );
        // a damaged on disk once it was loaded.
        crate::testing::corrupt_on_disk(&store, &held[0]);
        assert_eq!(
            timer
                .deliver_due(&write, now + 3_000)
                .await
                .expect("deliver"),
            1
        );
        assert_eq!(
            delivered(&store, "t").get("b"),
            Some(&1),
            "b came due after a"
        );
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(2),
            "the progress passes the unreadable message"
        );
    }

    #[tokio::test]
    async fn an_unreadable_delayed_message_does_not_stop_the_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let past = now_ms() - 1_000;
        let held = |id: &str| {
            Timer::hold(
                NewRecord::new("t", 0, b"body".to_vec()).with_property(keys::MESSAGE_ID, id),
                past,
            )
        };
        let a = write.write(vec![held("a")]).await.expect("hold")[0];
        // Move the log's tail to a later segment, so a clean start checks
        // only that one and the damage below is found when read.
        let filler = vec![0u8; 100_000];
        for _ in 0..12 {
            write
                .write(vec![NewRecord::new("other", 0, filler.clone())])
                .await
                .expect("write");
        }
        store.shutdown().expect("shutdown");
        crate::testing::corrupt_on_disk(&store, &a);
        drop((store, write));
        let (store, write) = crate::testing::lone_master(dir.path());
        assert!(store.get(DELAY_TOPIC, 0, 0).is_err(), "the damage is seen");
        write.write(vec![held("b")]).await.expect("hold");
        let timer = Timer::new(store.clone());
        assert_eq!(
            timer.deliver_due(&write, now_ms()).await.expect("deliver"),
            1
        );
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(2),
            "the progress passes the unreadable message"
        );
        // A restart does not deliver b again.
        let timer = Timer::new(store.clone());
        assert_eq!(
            timer.deliver_due(&write, now_ms()).await.expect("deliver"),
            0
        );
        assert_eq!(delivered(&store, "t").get("b"), Some(&1));
    }
}
