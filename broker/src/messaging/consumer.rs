//! Consumption state: which messages each consumer group has been handed,
//! until when they stay invisible, how many times each was delivered, and
//! how far each group has consumed each queue.
//!
//! A receive hands out, per queue, first the in-flight messages whose
//! invisible time ran out (a redelivery, one attempt more), then messages
//! never delivered. An ack removes the delivery; the group's committed
//! offset is the lowest offset still in flight (or the next undelivered
//! one), so a restart redelivers what was not acknowledged (at least once)
//! and never what was. A message that used up its attempts goes to the
//! group's dead-letter topic `%DLQ%<group>`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::receipt::ReceiptHandle;
use crate::store::{
    CqEntry, MessageStore, NewRecord, StoreError, StoredRecord, keys, record::tag_hash,
};

/// Prefix of dead-letter topics.
pub const DLQ_PREFIX: &str = "%DLQ%";

/// A tag filter: `*` (everything) or tags separated by `||`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagFilter {
    All,
    Tags(Vec<String>),
}

impl TagFilter {
    /// Parses a TAG expression; an empty expression means everything.
    pub fn parse(expr: &str) -> TagFilter {
        let e = expr.trim();
        if e.is_empty() || e == "*" {
            return TagFilter::All;
        }
        let tags: Vec<String> = e
            .split("||")
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if tags.iter().any(|t| t == "*") || tags.is_empty() {
            TagFilter::All
        } else {
            TagFilter::Tags(tags)
        }
    }

    /// Whether a message with this tag hash (from the consume queue) may match.
    fn may_match(&self, hash: u64) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags(tags) => tags.iter().any(|t| tag_hash(Some(t)) == hash),
        }
    }

    /// Whether the message's tag matches (exact check after the hash).
    fn matches(&self, record: &StoredRecord) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags(tags) => record.tag().is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }
}

/// A message handed to a consumer.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub record: StoredRecord,
    pub handle: ReceiptHandle,
    /// 1 for the first delivery.
    pub attempt: u32,
    /// When it becomes visible again unless acked (ms since the epoch).
    pub invisible_until_ms: i64,
}

/// What a receive asks for.
#[derive(Clone, Debug)]
pub struct ReceiveRequest<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub queue_count: u32,
    pub max_messages: usize,
    pub invisible_ms: i64,
    pub filter: &'a TagFilter,
    /// Deliver the messages of each queue one batch at a time, in order
    /// (FIFO): a queue with anything in flight is skipped.
    pub fifo: bool,
    /// Attempts after which a message goes to the dead-letter topic.
    pub max_attempts: u32,
    pub now_ms: i64,
}

/// Why an ack or an invisible-time change was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("receipt handle is malformed")]
    Malformed,
    #[error("receipt handle was issued by another broker or for another topic")]
    Foreign,
    #[error("receipt handle is stale: the message was acked, redelivered or expired")]
    Stale,
}

#[derive(Default)]
struct QueueState {
    /// Next offset never handed out.
    next: Option<u64>,
    /// Committed offset last recorded in the metadata, so a receive that
    /// changes nothing does not touch it.
    committed: Option<u64>,
    /// Handed-out mark last recorded in the metadata (replicated to slaves).
    marked: Option<u64>,
    /// Offsets below this had been handed out by the master this broker
    /// took over from: handing them out again is a failover redelivery.
    redeliver_below: u64,
    in_flight: BTreeMap<u64, InFlight>,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    delivery: u64,
    visible_at_ms: i64,
    attempt: u32,
}

type Key = (String, String, u32);

/// A message chosen for a consumer and marked in flight, whose record is
/// still to be read (see [`Consumption::claim`]).
#[derive(Clone, Copy, Debug)]
pub struct Claimed {
    pub queue_id: u32,
    pub queue_offset: u64,
    /// Where the record is in the commit log.
    pub location: CqEntry,
    f: InFlight,
}

/// Consumption state of every group on this broker.
pub struct Consumption {
    store: MessageStore,
    deliveries: AtomicU64,
    /// Messages handed out again because a failover lost their delivery state.
    failover_redeliveries: AtomicU64,
    queues: Mutex<HashMap<Key, QueueState>>,
    /// Queue rotation so every queue gets its turn.
    rotation: AtomicU64,
}

impl Consumption {
    pub fn new(store: MessageStore) -> Self {
        Self {
            store,
            deliveries: AtomicU64::new(1),
            failover_redeliveries: AtomicU64::new(0),
            queues: Mutex::new(HashMap::new()),
            rotation: AtomicU64::new(0),
        }
    }

    /// Forgets every group's in-memory delivery state, so it is reloaded
    /// from the metadata: on a role change, when the metadata came from the
    /// master this broker replaces.
    pub fn reset(&self) {
        self.queues.lock().clear();
    }

    /// How many messages were handed out again because a failover lost their
    /// delivery state (they had been delivered by the previous master).
    pub fn failover_redeliveries(&self) -> u64 {
        self.failover_redeliveries.load(Ordering::Relaxed)
    }

    /// Hands out up to `max_messages` messages of `topic` to `group`, read
    /// from this broker's own store.
    pub fn receive(&self, req: &ReceiveRequest<'_>) -> Result<Vec<Delivered>, StoreError> {
        let claimed = self.claim(req)?;
        let records = claimed
            .iter()
            .map(|c| {
                self.store
                    .get_entry(req.topic, c.queue_id, c.queue_offset, c.location)
            })
            .collect();
        self.complete(req, claimed, records)
    }

    /// First half of a receive: chooses the messages to hand out and marks
    /// them in flight, without reading them, so the records can be read
    /// elsewhere (a slave) with no lock held. [`Consumption::complete`]
    /// finishes it. Messages that used up their attempts go to the
    /// dead-letter topic here.
    pub fn claim(&self, req: &ReceiveRequest<'_>) -> Result<Vec<Claimed>, StoreError> {
        let mut out = Vec::new();
        let mut dead = Vec::new();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        {
            let mut queues = self.queues.lock();
            for i in 0..u64::from(req.queue_count) {
                if out.len() >= req.max_messages {
                    break;
                }
                let q = ((start + i) % u64::from(req.queue_count)) as u32;
                let key = (req.group.to_owned(), req.topic.to_owned(), q);
                let st = queues.entry(key).or_default();
                self.claim_queue(req, q, st, &mut out, &mut dead);
            }
        }
        for (q, off, attempts) in dead {
            if let Some(record) = self.store.get(req.topic, q, off)? {
                self.to_dead_letter(req.group, record, attempts)?;
            }
        }
        Ok(out)
    }

    /// Second half of a receive: pairs each claimed message with its record
    /// (`records[i]` for `claimed[i]`). A message whose record is gone
    /// (retention) or whose tag does not match after all (the consume queue
    /// keeps only a hash) is settled as consumed instead of handed out. On
    /// a read error the error is returned and the claimed messages stay in
    /// flight: they are offered again when their invisible time runs out.
    pub fn complete(
        &self,
        req: &ReceiveRequest<'_>,
        claimed: Vec<Claimed>,
        records: Vec<Result<Option<StoredRecord>, StoreError>>,
    ) -> Result<Vec<Delivered>, StoreError> {
        let mut pairs = Vec::with_capacity(claimed.len());
        for (c, record) in claimed.into_iter().zip(records) {
            pairs.push((c, record?));
        }
        let mut out = Vec::with_capacity(pairs.len());
        for (c, record) in pairs {
            match record {
                Some(record) if req.filter.matches(&record) => {
                    out.push(self.delivered(record, c.queue_id, c.queue_offset, c.f));
                }
                _ => {
                    self.settle(
                        req.group,
                        req.topic,
                        c.queue_id,
                        c.queue_offset,
                        c.f.delivery,
                    );
                }
            }
        }
        Ok(out)
    }

    fn claim_queue(
        &self,
        req: &ReceiveRequest<'_>,
        q: u32,
        st: &mut QueueState,
        out: &mut Vec<Claimed>,
        dead: &mut Vec<(u32, u64, u32)>,
    ) {
        let min = self.store.queue_min_offset(req.topic, q);
        if st.next.is_none() {
            let metadata = self.store.metadata();
            let committed = metadata.get_offset(req.group, req.topic, q);
            st.next = Some(committed.unwrap_or(min).max(min));
            st.committed = committed;
            st.redeliver_below = metadata.dispatched(req.group, req.topic, q).unwrap_or(0);
            st.marked = None;
        }
        let next = st.next.get_or_insert(min);
        // Entries removed by retention cannot be delivered any more.
        st.in_flight.retain(|off, _| *off >= min);
        if *next < min {
            *next = min;
        }
        // Redeliveries first: in-flight messages whose invisible time ran out.
        let expired: Vec<u64> = st
            .in_flight
            .iter()
            .filter(|(_, f)| f.visible_at_ms <= req.now_ms)
            .map(|(o, _)| *o)
            .collect();
        if req.fifo && st.in_flight.len() > expired.len() {
            return; // part of the previous batch is still being processed
        }
        for off in expired {
            if out.len() >= req.max_messages {
                return;
            }
            let Some(location) = self.store.queue_entry(req.topic, q, off) else {
                st.in_flight.remove(&off);
                continue;
            };
            let Some(f) = st.in_flight.get_mut(&off) else {
                continue;
            };
            if f.attempt >= req.max_attempts {
                dead.push((q, off, f.attempt));
                st.in_flight.remove(&off);
                continue;
            }
            f.attempt += 1;
            f.delivery = self.deliveries.fetch_add(1, Ordering::Relaxed);
            f.visible_at_ms = req.now_ms + req.invisible_ms;
            out.push(Claimed {
                queue_id: q,
                queue_offset: off,
                location,
                f: *f,
            });
        }
        if req.fifo && !st.in_flight.is_empty() {
            return;
        }
        let max = self.store.queue_max_offset(req.topic, q);
        let next = st.next.get_or_insert(min);
        while out.len() < req.max_messages && *next < max {
            let off = *next;
            *next += 1;
            let Some(location) = self.store.queue_entry(req.topic, q, off) else {
                continue;
            };
            if !req.filter.may_match(location.tag_hash) {
                continue;
            }
            let f = InFlight {
                delivery: self.deliveries.fetch_add(1, Ordering::Relaxed),
                visible_at_ms: req.now_ms + req.invisible_ms,
                attempt: 1,
            };
            st.in_flight.insert(off, f);
            if off < st.redeliver_below {
                self.failover_redeliveries.fetch_add(1, Ordering::Relaxed);
            }
            out.push(Claimed {
                queue_id: q,
                queue_offset: off,
                location,
                f,
            });
        }
        let next = *next;
        let committed = st.in_flight.keys().next().copied().unwrap_or(next);
        if st.committed != Some(committed) {
            st.committed = Some(committed);
            self.store
                .metadata()
                .commit_offset(req.group, req.topic, q, committed);
        }
        if st.marked != Some(next) {
            st.marked = Some(next);
            self.store
                .metadata()
                .mark_dispatched(req.group, req.topic, q, next);
        }
    }

    /// Ends delivery `delivery` of a message (acked, or consumed without
    /// being handed out) and moves the group's committed offset. False when
    /// the message is not in flight under that delivery.
    fn settle(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
        delivery: u64,
    ) -> bool {
        let mut queues = self.queues.lock();
        let Some(st) = queues.get_mut(&(group.to_owned(), topic.to_owned(), queue_id)) else {
            return false;
        };
        match st.in_flight.get(&queue_offset) {
            Some(f) if f.delivery == delivery => {
                st.in_flight.remove(&queue_offset);
            }
            _ => return false,
        }
        let committed = st
            .in_flight
            .keys()
            .next()
            .copied()
            .or(st.next)
            .unwrap_or(queue_offset + 1);
        st.committed = Some(committed);
        self.store
            .metadata()
            .commit_offset(group, topic, queue_id, committed);
        true
    }

    fn delivered(&self, record: StoredRecord, queue_id: u32, off: u64, f: InFlight) -> Delivered {
        Delivered {
            handle: ReceiptHandle {
                store_id: self.store.store_id().to_owned(),
                topic: record.topic.clone(),
                queue_id,
                queue_offset: off,
                delivery: f.delivery,
            },
            record,
            attempt: f.attempt,
            invisible_until_ms: f.visible_at_ms,
        }
    }

    /// Acknowledges one delivery.
    pub fn ack(&self, group: &str, topic: &str, handle: &str) -> Result<(), HandleError> {
        let h = self.parse(topic, handle)?;
        if self.settle(group, &h.topic, h.queue_id, h.queue_offset, h.delivery) {
            Ok(())
        } else {
            Err(HandleError::Stale)
        }
    }

    /// Makes a delivery invisible for `invisible_ms` from `now_ms`; returns
    /// the new handle (the old one becomes stale).
    pub fn change_invisible(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
        invisible_ms: i64,
        now_ms: i64,
    ) -> Result<ReceiptHandle, HandleError> {
        let mut h = self.parse(topic, handle)?;
        let mut queues = self.queues.lock();
        let st = queues
            .get_mut(&(group.to_owned(), h.topic.clone(), h.queue_id))
            .ok_or(HandleError::Stale)?;
        let f = st
            .in_flight
            .get_mut(&h.queue_offset)
            .ok_or(HandleError::Stale)?;
        if f.delivery != h.delivery {
            return Err(HandleError::Stale);
        }
        f.delivery = self.deliveries.fetch_add(1, Ordering::Relaxed);
        f.visible_at_ms = now_ms + invisible_ms;
        h.delivery = f.delivery;
        Ok(h)
    }

    /// Moves one delivery to the dead-letter topic at the consumer's request
    /// (a FIFO consumer that gave up on a message).
    pub fn forward_to_dead_letter(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
        attempts: u32,
    ) -> Result<(), HandleError> {
        let h = self.parse(topic, handle)?;
        let record = match self.store.get(&h.topic, h.queue_id, h.queue_offset) {
            Ok(Some(r)) => r,
            _ => return Err(HandleError::Stale),
        };
        self.ack(group, topic, handle)?;
        self.to_dead_letter(group, record, attempts).map_err(|e| {
            tracing::error!(error = %e, "writing to the dead-letter topic failed");
            HandleError::Stale
        })
    }

    /// Messages of `group` on a queue handed out and not yet acked.
    pub fn in_flight(&self, group: &str, topic: &str, queue_id: u32) -> u64 {
        self.queues
            .lock()
            .get(&(group.to_owned(), topic.to_owned(), queue_id))
            .map_or(0, |s| s.in_flight.len() as u64)
    }

    fn parse(&self, topic: &str, handle: &str) -> Result<ReceiptHandle, HandleError> {
        let h: ReceiptHandle = handle.parse().map_err(|_| HandleError::Malformed)?;
        if h.store_id != self.store.store_id() || (!topic.is_empty() && h.topic != topic) {
            return Err(HandleError::Foreign);
        }
        Ok(h)
    }

    fn to_dead_letter(
        &self,
        group: &str,
        record: StoredRecord,
        attempts: u32,
    ) -> Result<(), StoreError> {
        let dlq = format!("{DLQ_PREFIX}{group}");
        let mut properties = record.properties.clone();
        properties.insert(keys::ORIGIN_TOPIC.into(), record.topic.clone());
        properties.insert(keys::DELIVERY_ATTEMPTS.into(), attempts.to_string());
        self.store.append(NewRecord {
            topic: dlq.clone(),
            queue_id: 0,
            born_ms: record.born_ms,
            flags: record.flags,
            properties,
            body: record.body.clone(),
        })?;
        tracing::info!(group, topic = %record.topic, queue = record.queue_id, offset = record.queue_offset, attempts, dead_letter_topic = %dlq, "message moved to the dead-letter topic");
        Ok(())
    }
}

impl crate::admin::GroupInspector for Consumption {
    fn in_flight(&self, group: &str, topic: &str, queue_id: u32) -> u64 {
        Consumption::in_flight(self, group, topic, queue_id)
    }

    fn failover_redeliveries(&self) -> u64 {
        Consumption::failover_redeliveries(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FlushMode, StoreConfig};

    fn store(dir: &std::path::Path) -> MessageStore {
        let mut c = StoreConfig::new(dir);
        c.segment_size = 1 << 20;
        c.flush_mode = FlushMode::AsyncFlush;
        MessageStore::open(c).expect("open")
    }

    fn req<'a>(filter: &'a TagFilter, now_ms: i64, fifo: bool) -> ReceiveRequest<'a> {
        ReceiveRequest {
            group: "g",
            topic: "t",
            queue_count: 2,
            max_messages: 10,
            invisible_ms: 1000,
            filter,
            fifo,
            max_attempts: 3,
            now_ms,
        }
    }

    fn put(s: &MessageStore, q: u32, tag: &str, body: &str) {
        s.append(NewRecord::new("t", q, body.as_bytes().to_vec()).with_property(keys::TAG, tag))
            .expect("append");
    }

    #[test]
    fn ack_redelivery_and_stale_handles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        for i in 0..4 {
            put(&s, i % 2, "a", &format!("m{i}"));
        }
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let got = c.receive(&req(&all, 0, false)).expect("receive");
        assert_eq!(got.len(), 4);
        assert!(
            c.receive(&req(&all, 10, false))
                .expect("receive")
                .is_empty(),
            "invisible"
        );
        let first = &got[0];
        c.ack("g", "t", &first.handle.to_string()).expect("ack");
        assert!(matches!(
            c.ack("g", "t", &first.handle.to_string()),
            Err(HandleError::Stale)
        ));
        assert!(matches!(
            c.ack("g", "t", "garbage"),
            Err(HandleError::Malformed)
        ));
        let mut foreign = first.handle.clone();
        foreign.store_id = "other".into();
        assert!(matches!(
            c.ack("g", "t", &foreign.to_string()),
            Err(HandleError::Foreign)
        ));
        // Extend one, let the others expire: they come back with attempt 2.
        let kept = c
            .change_invisible("g", "t", &got[1].handle.to_string(), 10_000, 0)
            .expect("change");
        assert!(matches!(
            c.ack("g", "t", &got[1].handle.to_string()),
            Err(HandleError::Stale)
        ));
        let again = c.receive(&req(&all, 2000, false)).expect("receive");
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|d| d.attempt == 2));
        c.ack("g", "t", &kept.to_string())
            .expect("ack with the new handle");
        for d in &again {
            c.ack("g", "t", &d.handle.to_string()).expect("ack");
        }
        // Everything acked: committed offsets reach the end of each queue.
        for q in 0..2 {
            assert_eq!(s.metadata().get_offset("g", "t", q), Some(2));
        }
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn tag_filter_and_dead_letter_after_max_attempts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        put(&s, 0, "a", "x");
        put(&s, 0, "b", "y");
        let c = Consumption::new(s.clone());
        let only_b = TagFilter::parse("b || c");
        let got = c.receive(&req(&only_b, 0, false)).expect("receive");
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].record.body[..], b"y");
        // Never acked: attempts 2 and 3, then the dead-letter topic.
        assert_eq!(
            c.receive(&req(&only_b, 2000, false)).expect("r")[0].attempt,
            2
        );
        assert_eq!(
            c.receive(&req(&only_b, 4000, false)).expect("r")[0].attempt,
            3
        );
        assert!(c.receive(&req(&only_b, 6000, false)).expect("r").is_empty());
        let dlq = s.get("%DLQ%g", 0, 0).expect("read").expect("in the DLQ");
        assert_eq!(&dlq.body[..], b"y");
        assert_eq!(
            dlq.properties.get(keys::ORIGIN_TOPIC).map(String::as_str),
            Some("t")
        );
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn records_read_elsewhere_complete_a_claim() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        for i in 0..3 {
            put(&s, 0, "a", &format!("m{i}"));
        }
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let mut r = req(&all, 0, false);
        r.queue_count = 1;
        let claimed = c.claim(&r).expect("claim");
        assert_eq!(claimed.len(), 3);
        assert_eq!(c.in_flight("g", "t", 0), 3);
        // The first record is gone (as after retention), the second comes
        // with the wrong tag: both are settled, only the third is handed out.
        let wrong_tag = s.get("t", 0, 1).expect("read").map(|mut rec| {
            rec.properties.insert(keys::TAG.into(), "b".into());
            rec
        });
        let only_a = TagFilter::parse("a");
        r.filter = &only_a;
        let third = s.get("t", 0, 2);
        let got = c
            .complete(&r, claimed, vec![Ok(None), Ok(wrong_tag), third])
            .expect("complete");
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].record.body[..], b"m2");
        assert_eq!(c.in_flight("g", "t", 0), 1);
        assert_eq!(s.metadata().get_offset("g", "t", 0), Some(2));
        c.ack("g", "t", &got[0].handle.to_string()).expect("ack");
        assert_eq!(s.metadata().get_offset("g", "t", 0), Some(3));
        // A read error leaves the claim in flight, to be offered again later.
        let claimed = {
            put(&s, 0, "a", "m3");
            c.claim(&r).expect("claim")
        };
        let err = c.complete(
            &r,
            claimed,
            vec![Err(StoreError::InvalidArgument("unreadable".into()))],
        );
        assert!(err.is_err());
        assert_eq!(c.in_flight("g", "t", 0), 1);
        let again = c
            .receive(&ReceiveRequest { now_ms: 5000, ..r })
            .expect("receive");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt, 2);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn fifo_holds_a_queue_until_its_batch_is_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        for i in 0..3 {
            put(&s, 0, "a", &format!("m{i}"));
        }
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let mut r = req(&all, 0, true);
        r.max_messages = 2;
        let first = c.receive(&r).expect("receive");
        assert_eq!(first.len(), 2);
        assert!(
            c.receive(&r).expect("receive").is_empty(),
            "queue held while in flight"
        );
        c.ack("g", "t", &first[0].handle.to_string()).expect("ack");
        assert!(
            c.receive(&r).expect("receive").is_empty(),
            "still one in flight"
        );
        c.ack("g", "t", &first[1].handle.to_string()).expect("ack");
        let next = c.receive(&r).expect("receive");
        assert_eq!(next.len(), 1);
        assert_eq!(&next[0].record.body[..], b"m2");
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_new_consumer_state_resumes_from_committed_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        for i in 0..3 {
            put(&s, 0, "a", &format!("m{i}"));
        }
        let all = TagFilter::All;
        let c = Consumption::new(s.clone());
        let got = c.receive(&req(&all, 0, false)).expect("receive");
        c.ack("g", "t", &got[0].handle.to_string()).expect("ack");
        c.ack("g", "t", &got[2].handle.to_string()).expect("ack");
        // A restart forgets in-flight state: the unacked m1 comes back, m0 does not.
        let c = Consumption::new(s.clone());
        let again = c.receive(&req(&all, 0, false)).expect("receive");
        let bodies: Vec<_> = again.iter().map(|d| d.record.body.clone()).collect();
        assert_eq!(
            bodies,
            vec![
                bytes::Bytes::from_static(b"m1"),
                bytes::Bytes::from_static(b"m2")
            ]
        );
        s.shutdown().expect("shutdown");
    }
}
