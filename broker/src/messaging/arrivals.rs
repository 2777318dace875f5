//! Wake-ups of long-polling receives, per topic.
//!
//! A receive that found nothing waits on its topic's [`Notify`] (and
//! re-checks now and then for invisible times running out). Whatever
//! appends a message consumers can see notifies that message's topic only,
//! so idle receives on quiet topics are not woken by traffic elsewhere.
//! A topic's entry exists only while someone waits on it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// The per-topic wake-ups of waiting receives.
#[derive(Default)]
pub struct Arrivals {
    /// Each topic someone waits on: its `Notify` and how many wait.
    topics: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

/// A receive's registration for the arrivals of one topic; the entry goes
/// when the last registration for the topic is dropped.
pub struct Watch<'a> {
    arrivals: &'a Arrivals,
    topic: String,
    notify: Arc<Notify>,
}

impl Arrivals {
    /// Registers interest in `topic` for as long as the result lives.
    pub fn watch(&self, topic: &str) -> Watch<'_> {
        let mut topics = self.topics.lock();
        let entry = topics
            .entry(topic.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Watch {
            arrivals: self,
            topic: topic.to_owned(),
            notify: entry.0.clone(),
        }
    }

    /// Wakes the receives waiting on `topic`.
    pub fn notify(&self, topic: &str) {
        if let Some((n, _)) = self.topics.lock().get(topic) {
            n.notify_waiters();
        }
    }

    /// Wakes the receives waiting on any of `topics` (each once).
    pub fn notify_each<'a>(&self, topics: impl IntoIterator<Item = &'a str>) {
        let waiting = self.topics.lock();
        if waiting.is_empty() {
            return;
        }
        let mut done: Vec<&str> = Vec::new();
        for t in topics {
            if done.contains(&t) {
                continue;
            }
            done.push(t);
            if let Some((n, _)) = waiting.get(t) {
                n.notify_waiters();
            }
        }
    }

    /// How many topics someone waits on.
    pub fn watched_topics(&self) -> usize {
        self.topics.lock().len()
    }
}

impl Watch<'_> {
    /// Resolves at the next notification of the topic after it is created
    /// (or enabled: see [`Notified::enable`]).
    pub fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut topics = self.arrivals.topics.lock();
        if let Some(entry) = topics.get_mut(&self.topic) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                topics.remove(&self.topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn only_the_written_topic_wakes_and_entries_go_with_their_waiters() {
        let a = Arrivals::default();
        let (wa, wb, wb2) = (a.watch("a"), a.watch("b"), a.watch("b"));
        assert_eq!(a.watched_topics(), 2);
        {
            let (na, nb) = (wa.notified(), wb.notified());
            tokio::pin!(na, nb);
            na.as_mut().enable();
            nb.as_mut().enable();
            a.notify_each(["a", "a", "c"]);
            tokio::time::timeout(Duration::from_secs(1), na)
                .await
                .expect("a woken");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), nb.as_mut())
                    .await
                    .is_err(),
                "b not woken by a"
            );
            a.notify("b");
            tokio::time::timeout(Duration::from_secs(1), nb)
                .await
                .expect("b woken");
        }
        drop(wa);
        drop(wb);
        assert_eq!(a.watched_topics(), 1, "b still has a waiter");
        drop(wb2);
        assert_eq!(a.watched_topics(), 0);
        a.notify("b"); // nobody waits: nothing to do
    }
}
