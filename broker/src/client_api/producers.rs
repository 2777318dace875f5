//! Live producer Telemetry streams, by topic.
//!
//! Transaction check-back needs a way to reach a producer of a topic: the
//! RocketMQ proxy registers every gRPC producer under the topics its
//! Settings list in `publishing.topics` (the topic name is the producer
//! group) and writes `RecoverOrphanedTransactionCommand` onto that
//! producer's Telemetry stream. This registry is that map; a stream is
//! dropped from it when it ends or can no longer take commands.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use keelmq_proto::rocketmq::v2 as pb;
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// Sending half of one Telemetry response stream.
pub type StreamSender = mpsc::Sender<Result<pb::TelemetryCommand, tonic::Status>>;

struct Entry {
    stream: u64,
    client_id: String,
    tx: StreamSender,
}

/// Producer Telemetry streams per topic.
#[derive(Default)]
pub struct ProducerStreams {
    by_topic: Mutex<HashMap<String, Vec<Entry>>>,
    next_stream: AtomicU64,
    /// Rotates the choice among a topic's producers.
    rotation: AtomicU64,
}

impl ProducerStreams {
    /// An id for a new Telemetry stream.
    pub fn new_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that `stream` (of `client_id`) publishes to `topics`,
    /// replacing what it declared before (clients re-send their settings).
    pub fn register(&self, stream: u64, client_id: &str, topics: &[String], tx: &StreamSender) {
        let mut map = self.by_topic.lock();
        Self::remove_locked(&mut map, stream);
        for t in topics {
            map.entry(t.clone()).or_default().push(Entry {
                stream,
                client_id: client_id.to_owned(),
                tx: tx.clone(),
            });
        }
    }

    /// Forgets a stream that ended.
    pub fn remove(&self, stream: u64) {
        Self::remove_locked(&mut self.by_topic.lock(), stream);
    }

    fn remove_locked(map: &mut HashMap<String, Vec<Entry>>, stream: u64) {
        map.retain(|_, v| {
            v.retain(|e| e.stream != stream);
            !v.is_empty()
        });
    }

    /// Sends `cmd` to one live producer of `topic`; returns its client id,
    /// or None when no producer of the topic could take it.
    pub fn send_to_one(&self, topic: &str, cmd: pb::TelemetryCommand) -> Option<String> {
        let mut map = self.by_topic.lock();
        let entries = map.get_mut(topic)?;
        entries.retain(|e| !e.tx.is_closed());
        let n = entries.len();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..n {
            let e = &entries[(start + i) % n];
            if e.tx.try_send(Ok(cmd.clone())).is_ok() {
                return Some(e.client_id.clone());
            }
        }
        None
    }
}

/// Clients with at least one open Telemetry stream, by client id: the
/// broker renews `auto_renew` deliveries only for those (see
/// [`crate::messaging::consumer::Consumption::renew`]).
#[derive(Default)]
pub struct LiveClients(Mutex<HashMap<String, usize>>);

impl LiveClients {
    /// A Telemetry stream of `client_id` opened.
    pub fn open(&self, client_id: &str) {
        *self.0.lock().entry(client_id.to_owned()).or_default() += 1;
    }

    /// A Telemetry stream of `client_id` ended.
    pub fn close(&self, client_id: &str) {
        let mut map = self.0.lock();
        if let Some(n) = map.get_mut(client_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(client_id);
            }
        }
    }

    pub fn contains(&self, client_id: &str) -> bool {
        self.0.lock().contains_key(client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_reach_a_live_producer_of_the_topic() {
        let reg = ProducerStreams::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, rx2) = mpsc::channel(4);
        let s1 = reg.new_stream_id();
        let s2 = reg.new_stream_id();
        reg.register(s1, "c1", &["a".into(), "b".into()], &tx1);
        reg.register(s2, "c2", &["a".into()], &tx2);
        assert!(
            reg.send_to_one("z", pb::TelemetryCommand::default())
                .is_none()
        );
        drop(rx2);
        // c2 is gone: every command for "a" lands on c1.
        for _ in 0..3 {
            assert_eq!(
                reg.send_to_one("a", pb::TelemetryCommand::default())
                    .as_deref(),
                Some("c1")
            );
        }
        assert!(rx1.recv().await.is_some());
        reg.register(s1, "c1", &["b".into()], &tx1);
        assert!(
            reg.send_to_one("a", pb::TelemetryCommand::default())
                .is_none()
        );
        reg.remove(s1);
        assert!(
            reg.send_to_one("b", pb::TelemetryCommand::default())
                .is_none()
        );
    }
}
