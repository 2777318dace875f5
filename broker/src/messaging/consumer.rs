//! Consumption state: which messages each consumer group has been handed,
//! until when they stay invisible, how many times each was delivered, and
//! how far each group has consumed each queue.
//!
//! A receive hands out, per queue, first the in-flight messages whose
//! invisible time ran out (a redelivery, one attempt more), then messages
//! never delivered. An ack removes the delivery; the group's committed
//! offset is the lowest offset still in flight (or the next undelivered
//! one). A message that used up its attempts goes to the group's
//! dead-letter topic `%DLQ%<group>`.
//!
//! Every change is also appended to the delivery log
//! ([`super::delivery_log`]), under the same lock, so the log's order is
//! the order of the changes. A broker rebuilds the state from the
//! committed offsets and a replay of the log from the stored progress: the
//! oldest record that still set an entry in flight. After a restart or a
//! failover the same messages are in flight under the same receipt handles,
//! acked ones stay acked, and only deliveries whose record never became
//! durable are made again (counted as failover redeliveries when the
//! replicated "handed out up to" mark says a previous master made them).
//! A receive hands its messages out only once their delivery record is as
//! durable as the flush mode promises and still in the log: one that a cut
//! removed meanwhile (this broker followed another master) fails the
//! receive, however far the log is flushed by then.
//! The log also says which client each `auto_renew` delivery is renewed
//! for and which receive attempt made it, so renewals go on and a receive
//! repeated under its `attempt_id` gets its messages again.
//!
//! Every change appends to the commit log, so callers make it through the
//! replication write gate (see [`crate::replication::ReplicationManager::admit`]),
//! as sends do: the client API does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use super::arrivals::Arrivals;
use super::delivery_log::{DELIVERY_TOPIC, DeliveryOps, RemoveEntry, SetEntry};
use super::receipt::ReceiptHandle;
use crate::store::{
    Appended, CqEntry, MessageStore, MessageType, NewRecord, StoreError, StoredRecord, TopicConfig,
    keys, record::tag_hash,
};

/// Prefix of dead-letter topics.
pub const DLQ_PREFIX: &str = "%DLQ%";

/// The metadata "group" whose committed offset on [`DELIVERY_TOPIC`] is
/// where a replay of the delivery log starts.
const DELIVERY_GROUP: &str = "%SYS_DELIVERY%";

/// An entry whose record is this many delivery-log records behind the head,
/// or this old, is logged again, so the replay stays short and retention
/// never removes the only record of something still in flight.
const RELOG_RECORDS: u64 = 50_000;
const RELOG_AGE_MS: i64 = 3_600_000;

/// Server-side renewal of deliveries made with `auto_renew` (the RocketMQ
/// proxy's defaults): an entry this close to showing up again is made
/// invisible for [`RENEW_INVISIBLE_MS`] more, while its consumer's client is
/// connected, for at most [`RENEW_MAX_MS`] after the delivery.
pub const RENEW_INVISIBLE_MS: i64 = 60_000;
pub const RENEW_AHEAD_MS: i64 = 10_000;
pub const RENEW_MAX_MS: i64 = 3 * 3_600_000;

/// Most bytes (stored record sizes) one receive hands out: it stops adding
/// messages before the total would pass this, but always hands out at least
/// one. As large as the largest body a producer may send (4 MiB), so a
/// batch of small messages is rarely cut short, while a response holds at
/// most about 4 MiB plus one message however large `batch_size` is.
pub const MAX_RECEIVE_BYTES: u64 = 4 << 20;

/// A group's state of a queue with nothing in flight, untouched for this
/// long, is dropped from memory (it is rebuilt from the committed offset
/// on next use); looked for at most every [`EVICT_SWEEP_MS`].
const EVICT_IDLE_MS: i64 = 15 * 60_000;
const EVICT_SWEEP_MS: i64 = 60_000;

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
    /// The client (id) that asked the server to keep renewing the messages
    /// it is handed (`auto_renew`), if any: see [`Consumption::renew`].
    pub renew_for: Option<&'a str>,
    /// The asking client's id and the receive's `attempt_id`, if it sent
    /// one: a receive that repeats an attempt whose messages are still in
    /// flight under the deliveries it made gets those messages again
    /// (the client never got the answer), instead of new ones.
    pub attempt: Option<(&'a str, &'a str)>,
}

/// Longest `attempt_id` (and client id) a receive is matched by; a longer
/// one is ignored (the official clients send UUIDs).
const MAX_ATTEMPT_KEY_LEN: usize = 256;

/// Why an ack or an invisible-time change was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("receipt handle is malformed")]
    Malformed,
    #[error("receipt handle was issued by another broker or for another topic")]
    Foreign,
    #[error("receipt handle is stale: the message was acked, redelivered or expired")]
    Stale,
    /// The change was made in memory but its delivery-log record could not
    /// be written: a restart or failover may undo it.
    #[error("the change could not be recorded: {0}")]
    Unrecorded(StoreError),
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
    /// When a receive last looked at the queue (ms since the epoch, the
    /// receive's clock).
    used_ms: i64,
}

impl QueueState {
    /// The offset a restart must consume from: the lowest in flight, or the
    /// next never handed out.
    fn low(&self) -> Option<u64> {
        self.in_flight.keys().next().copied().or(self.next)
    }
}

/// Marks an entry whose delivery-log record is not written yet.
const UNLOGGED: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
struct InFlight {
    delivery: u64,
    visible_at_ms: i64,
    attempt: u32,
    /// Delivery-log queue offset of the record that set this entry.
    event: u64,
    /// The broker that made the delivery (index into [`State::issuers`]).
    issuer: u16,
    /// The client the broker renews this delivery for, as 1 + an index
    /// into [`State::clients`]; 0: not renewed. Logged with the entry, so a
    /// restart or failover keeps renewing it once the client is connected.
    renew_for: u32,
    /// Renewed until then at most (ms since the epoch).
    renew_until_ms: i64,
    /// The receive attempt that made this delivery, as 1 + an index into
    /// [`State::claims`]; 0: none (or the consumer changed it since).
    claim: u32,
}

type Key = (String, String, u32);

/// Delivery-log records that set an entry still in flight: how many
/// entries each, and when it was stored.
#[derive(Default)]
struct Events(BTreeMap<u64, (u32, i64)>);

impl Events {
    fn add(&mut self, event: u64, stored_ms: i64) {
        self.0.entry(event).or_insert((0, stored_ms)).0 += 1;
    }

    fn release(&mut self, event: u64) {
        if let Some((n, _)) = self.0.get_mut(&event) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&event);
            }
        }
    }

    fn oldest(&self) -> Option<(u64, i64)> {
        self.0.first_key_value().map(|(e, (_, ms))| (*e, *ms))
    }
}

#[derive(Default)]
struct State {
    /// Whether the delivery log was replayed into this state.
    loaded: bool,
    queues: HashMap<Key, QueueState>,
    events: Events,
    /// Delivery-log queue offset replayed or appended up to.
    log_end: u64,
    /// Replay start last stored in the metadata.
    progress: Option<u64>,
    /// Brokers (store ids) whose deliveries this state holds: their receipt
    /// handles are honoured here.
    issuers: Vec<String>,
    /// Clients whose deliveries are renewed (see [`InFlight::renew_for`]).
    clients: Vec<String>,
    /// Receive attempts that made deliveries (see [`InFlight::claim`]), as
    /// "client id\nattempt id", and the index of each: one shared key per
    /// attempt, allocated once, for both.
    claims: Vec<Arc<str>>,
    claim_index: HashMap<Arc<str>, u32>,
    /// Where the key of a receive attempt is spelled out to be looked up
    /// (reused: a lookup allocates nothing).
    claim_key: String,
    /// How many receive attempts the last compaction kept.
    claims_kept: usize,
    /// When idle queue states were last looked for (see [`EVICT_IDLE_MS`]).
    swept_ms: i64,
}

/// The entries of `table` an in-flight delivery refers to, through the
/// 1-based index `link` selects (0: none), in their order; the references
/// are renumbered to match.
fn keep_referenced<T>(
    queues: &mut HashMap<Key, QueueState>,
    table: Vec<T>,
    link: fn(&mut InFlight) -> &mut u32,
) -> Vec<T> {
    let mut used = vec![false; table.len()];
    for f in queues.values_mut().flat_map(|qs| qs.in_flight.values_mut()) {
        if let Some(u) = (*link(f) as usize)
            .checked_sub(1)
            .and_then(|i| used.get_mut(i))
        {
            *u = true;
        }
    }
    let mut remap = vec![0u32; used.len()];
    let mut kept = Vec::new();
    for (i, entry) in table.into_iter().enumerate() {
        if used[i] {
            kept.push(entry);
            remap[i] = kept.len() as u32;
        }
    }
    for f in queues.values_mut().flat_map(|qs| qs.in_flight.values_mut()) {
        let r = link(f);
        if let Some(i) = (*r as usize).checked_sub(1) {
            *r = remap.get(i).copied().unwrap_or(0);
        }
    }
    kept
}

impl State {
    fn issuer(&mut self, store_id: &str) -> u16 {
        if let Some(i) = self.issuers.iter().position(|s| s == store_id) {
            return i as u16;
        }
        self.issuers.push(store_id.to_owned());
        (self.issuers.len() - 1) as u16
    }

    /// Forgets clients no in-flight delivery is renewed for, once there are
    /// many of them (every restart of a consumer is a new client id): the
    /// list would otherwise only grow.
    fn compact_clients(&mut self) {
        const KEEP_UP_TO: usize = 64;
        if self.clients.len() <= KEEP_UP_TO {
            return;
        }
        let clients = std::mem::take(&mut self.clients);
        self.clients = keep_referenced(&mut self.queues, clients, |f| &mut f.renew_for);
    }

    /// Forgets receive attempts no in-flight entry was made by, once there
    /// are many (every receive is a new attempt).
    fn compact_claims(&mut self) {
        if self.claims.len() <= (2 * self.claims_kept).max(1024) {
            return;
        }
        let claims = std::mem::take(&mut self.claims);
        self.claims = keep_referenced(&mut self.queues, claims, |f| &mut f.claim);
        self.claim_index = (1..)
            .zip(&self.claims)
            .map(|(i, key)| (Arc::clone(key), i))
            .collect();
        self.claims_kept = self.claims.len();
    }

    /// [`InFlight::claim`] of a receive attempt, made if new: its key is
    /// allocated once, and shared by [`State::claims`] and
    /// [`State::claim_index`].
    fn claim_tag(&mut self, client_id: &str, attempt_id: &str) -> u32 {
        if let Some(i) = self.find_claim(client_id, attempt_id) {
            return i;
        }
        // `find_claim` left the key spelled out in `claim_key`.
        let key: Arc<str> = Arc::from(self.claim_key.as_str());
        self.claims.push(Arc::clone(&key));
        let i = self.claims.len() as u32;
        self.claim_index.insert(key, i);
        i
    }

    /// [`InFlight::claim`] of a receive attempt, if known; leaves its key in
    /// [`State::claim_key`].
    fn find_claim(&mut self, client_id: &str, attempt_id: &str) -> Option<u32> {
        let key = &mut self.claim_key;
        key.clear();
        key.push_str(client_id);
        key.push('\n');
        key.push_str(attempt_id);
        self.claim_index.get(key.as_str()).copied()
    }

    /// The tables log records refer to.
    fn tables(&self) -> Tables<'_> {
        Tables {
            clients: &self.clients,
            claims: &self.claims,
        }
    }

    /// [`InFlight::renew_for`] of a client.
    fn client(&mut self, client_id: &str) -> u32 {
        let i = match self.clients.iter().position(|c| c == client_id) {
            Some(i) => i,
            None => {
                self.clients.push(client_id.to_owned());
                self.clients.len() - 1
            }
        };
        i as u32 + 1
    }
}

/// The client and receive-attempt tables of a [`State`], which log records
/// of its entries refer to.
#[derive(Clone, Copy)]
struct Tables<'a> {
    clients: &'a [String],
    claims: &'a [Arc<str>],
}

impl Tables<'_> {
    /// The set entry that logs `f`, with its client and receive attempt.
    fn set_entry(
        self,
        ops: &mut DeliveryOps,
        queue_id: u32,
        queue_offset: u64,
        f: &InFlight,
    ) -> SetEntry {
        let renew_client = (f.renew_for as usize)
            .checked_sub(1)
            .and_then(|i| self.clients.get(i))
            .map_or(0, |c| ops.client_ref(c));
        let claim = (f.claim as usize)
            .checked_sub(1)
            .and_then(|i| self.claims.get(i))
            .and_then(|k| k.split_once('\n'))
            .map_or(0, |(c, a)| ops.claim_ref(c, a));
        set_entry(queue_id, queue_offset, f, renew_client, claim)
    }
}

/// What a claim marks the entries it hands out with.
#[derive(Clone, Copy)]
struct Tags {
    /// The broker (see [`InFlight::issuer`]).
    issuer: u16,
    /// See [`InFlight::renew_for`] and [`InFlight::claim`].
    renew: u32,
    claim: u32,
    /// The same in the claim's delivery record.
    renew_ref: u16,
    claim_ref: u16,
}

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

impl Claimed {
    /// The delivery made (for [`Consumption::release`]).
    pub fn entry(&self) -> RemoveEntry {
        RemoveEntry {
            queue_id: self.queue_id,
            queue_offset: self.queue_offset,
            delivery: self.f.delivery,
        }
    }
}

/// Where the records a consumer's change appended are in the commit log
/// (delivery records, dead letters), as one span: from the start of the
/// first to the end of the last, with the log's cut count before the
/// first was appended. Waiting on it with
/// [`MessageStore::wait_appended`] (through
/// [`crate::write_path::WritePath::wait_delivery_record`]) tells both that
/// they are durable and that no cut removed any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded(Appended);

impl Recorded {
    /// One append.
    pub fn of(a: &Appended) -> Self {
        Self(*a)
    }

    /// The span of `a` and `b`; either may be `None` (nothing recorded).
    pub fn join(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(Self(a)), Some(Self(b))) => {
                let (first, last) = if a.offset <= b.offset { (a, b) } else { (b, a) };
                Some(Self(Appended {
                    end_offset: first.end_offset.max(last.end_offset),
                    log_cuts: first.log_cuts.min(last.log_cuts),
                    ..first
                }))
            }
            (a, b) => a.or(b),
        }
    }

    /// Commit-log offset the span ends at.
    pub fn end_offset(&self) -> u64 {
        self.0.end_offset
    }

    /// The span as one append (its queue offset and store time are the
    /// first record's), to wait on.
    pub fn span(&self) -> &Appended {
        &self.0
    }
}

/// Where a change's delivery records are (`None`: nothing to record), or
/// why they could not be written.
pub type Logged = Result<Option<Recorded>, StoreError>;

/// What [`Consumption::claim`] chose.
#[derive(Debug, Default)]
pub struct Claim {
    pub items: Vec<Claimed>,
    /// Where the delivery record is: hand the messages out only once it is
    /// durable (see [`crate::write_path::WritePath::wait_delivery_record`]).
    pub durable_at: Option<Recorded>,
}

/// Consumption state of every group on this broker.
pub struct Consumption {
    store: MessageStore,
    deliveries: AtomicU64,
    /// Messages handed out again because a failover lost their delivery state.
    failover_redeliveries: AtomicU64,
    state: Mutex<State>,
    /// Queue rotation so every queue gets its turn.
    rotation: AtomicU64,
    /// When entries are logged again (see [`Consumption::relog_old`]).
    relog_records: u64,
    relog_age_ms: i64,
    /// See [`MAX_RECEIVE_BYTES`].
    max_receive_bytes: u64,
    /// See [`EVICT_IDLE_MS`].
    evict_idle_ms: i64,
    /// Wakes receives waiting on a topic a message was appended to.
    arrivals: Arc<Arrivals>,
    /// Claims made (receives that looked for messages); tests count them.
    claims: AtomicU64,
}

impl Consumption {
    pub fn new(store: MessageStore) -> Self {
        Self {
            store,
            deliveries: AtomicU64::new(first_delivery_number()),
            failover_redeliveries: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            rotation: AtomicU64::new(0),
            relog_records: RELOG_RECORDS,
            relog_age_ms: RELOG_AGE_MS,
            max_receive_bytes: MAX_RECEIVE_BYTES,
            evict_idle_ms: EVICT_IDLE_MS,
            arrivals: Arc::default(),
            claims: AtomicU64::new(0),
        }
    }

    /// The wake-ups of waiting receives, which whatever appends a message
    /// consumers can see must notify (dead letters are notified here).
    pub fn arrivals(&self) -> Arc<Arrivals> {
        self.arrivals.clone()
    }

    /// How many claims (looks for messages) were made.
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }

    /// Forgets every group's in-memory delivery state, so it is rebuilt
    /// from the metadata and the delivery log: on a role change, when both
    /// came from the master this broker replaces.
    pub fn reset(&self) {
        *self.state.lock() = State::default();
    }

    /// How many messages were handed out again because a failover lost their
    /// delivery state (they had been delivered by the previous master).
    pub fn failover_redeliveries(&self) -> u64 {
        self.failover_redeliveries.load(Ordering::Relaxed)
    }

    /// Rebuilds the delivery state now rather than on first use (a master
    /// does so at start and when promoted, so status shows it at once).
    pub fn load(&self) {
        drop(self.lock());
    }

    /// The state, rebuilt from the delivery log on first use.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock();
        if !st.loaded {
            self.replay(&mut st);
        }
        st
    }

    /// Hands out up to `max_messages` messages of `topic` to `group`, read
    /// from this broker's own store, without waiting for the delivery
    /// record to be durable (the client API claims, waits, reads, completes).
    #[cfg(test)]
    pub fn receive(&self, req: &ReceiveRequest<'_>) -> Result<Vec<Delivered>, StoreError> {
        let claim = self.claim(req)?;
        let records = self.read_local(req.topic, &claim.items);
        self.complete(req, claim.items, records)
    }

    /// Reads the records of claimed messages from this broker's store.
    pub fn read_local(
        &self,
        topic: &str,
        claimed: &[Claimed],
    ) -> Vec<Result<Option<StoredRecord>, StoreError>> {
        claimed
            .iter()
            .map(|c| {
                self.store
                    .get_entry(topic, c.queue_id, c.queue_offset, c.location)
            })
            .collect()
    }

    /// First half of a receive: chooses the messages to hand out, marks
    /// them in flight and logs that, without reading them, so the records
    /// can be read elsewhere (a slave) with no lock held.
    /// [`Consumption::complete`] finishes it. Messages that used up their
    /// attempts go to the dead-letter topic here.
    pub fn claim(&self, req: &ReceiveRequest<'_>) -> Result<Claim, StoreError> {
        let mut out = Vec::new();
        let mut dead = Vec::new();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        self.claims.fetch_add(1, Ordering::Relaxed);
        let attempt = req
            .attempt
            .filter(|(c, a)| !a.is_empty() && c.len().max(a.len()) <= MAX_ATTEMPT_KEY_LEN);
        let durable_at = {
            let mut guard = self.lock();
            let st = &mut *guard;
            self.evict_idle(st, req.now_ms);
            let me = st.issuer(self.store.store_id());
            let renew = req.renew_for.map_or(0, |c| st.client(c));
            let mut ops = DeliveryOps::new(req.group, req.topic, self.store.store_id());
            // A repeated attempt whose messages are still in flight under
            // the deliveries it made: those again, nothing else.
            if let Some(tag) = attempt.and_then(|(c, a)| st.find_claim(c, a)) {
                let again = self.claim_again(req, st, tag, (me, renew), &mut ops);
                if !again.is_empty() {
                    let durable_at = self.log(st, &ops);
                    if durable_at.is_err() {
                        self.unclaim(st, req, &again);
                    }
                    return Ok(Claim {
                        items: again,
                        durable_at: durable_at?,
                    });
                }
            }
            st.compact_claims();
            let tag = attempt.map_or(0, |(c, a)| st.claim_tag(c, a));
            let renew_ref = req.renew_for.map_or(0, |c| ops.client_ref(c));
            let claim_ref = attempt.map_or(0, |(c, a)| ops.claim_ref(c, a));
            for i in 0..u64::from(req.queue_count) {
                if out.len() >= req.max_messages {
                    break;
                }
                let q = ((start + i) % u64::from(req.queue_count)) as u32;
                let key = (req.group.to_owned(), req.topic.to_owned(), q);
                let qs = st.queues.entry(key).or_default();
                self.init_queue(req.group, req.topic, q, qs);
                qs.used_ms = req.now_ms;
                let (sets, next) = (ops.sets.len(), qs.next);
                self.claim_queue(
                    req,
                    q,
                    qs,
                    &mut st.events,
                    Tags {
                        issuer: me,
                        renew,
                        claim: tag,
                        renew_ref,
                        claim_ref,
                    },
                    &mut out,
                    &mut dead,
                    &mut ops,
                );
                // Every record that sets entries of a queue also carries its
                // "next never handed out", so a replay from any entry's record
                // on knows it exactly.
                if ops.sets.len() > sets || qs.next != next {
                    ops.nexts.push((q, qs.next.unwrap_or(0)));
                }
            }
            let logged = self.log(st, &ops);
            if logged.is_err() {
                self.unclaim(st, req, &out);
            }
            logged
        };
        // Messages that used up their attempts are still in flight (hidden
        // for another invisible time): each leaves it only once its dead
        // letter is written. One whose dead letter cannot be written stays,
        // logged, to be tried again when it shows up again. One whose record
        // is gone, or cannot be read, leaves it without a dead letter (an
        // unreadable message costs only itself). None stops the others or
        // this claim.
        let mut moved_out = Vec::with_capacity(dead.len());
        for (entry, attempts) in dead {
            let (q, off) = (entry.queue_id, entry.queue_offset);
            let record = match self.store.get(req.topic, q, off) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        group = req.group,
                        topic = req.topic,
                        queue = q,
                        queue_offset = off,
                        attempts,
                        "a message that used up its attempts could not be read; it is dropped instead of dead-lettered"
                    );
                    None
                }
            };
            let moved = record.map(|r| self.to_dead_letter(req.group, r, attempts));
            match moved.transpose() {
                Ok(_) => moved_out.push(entry),
                Err(e) => tracing::error!(
                    error = %e,
                    group = req.group,
                    topic = req.topic,
                    queue = q,
                    queue_offset = off,
                    attempts,
                    "a message that used up its attempts could not be moved to the dead-letter topic; it stays in flight and is tried again later"
                ),
            }
        }
        if !moved_out.is_empty() {
            // Not waited for: if this record is lost, the message is only
            // moved to the dead-letter topic again.
            let mut st = self.lock();
            let (_, logged) = self.settle(&mut st, req.group, req.topic, &moved_out);
            if let Err(e) = logged {
                tracing::warn!(error = %e, "recording messages moved to the dead-letter topic failed; they may be moved again");
            }
        }
        Ok(Claim {
            items: out,
            durable_at: durable_at?,
        })
    }

    /// Second half of a receive: pairs each claimed message with its record
    /// (`records[i]` for `claimed[i]`). A message whose record is gone
    /// (retention) or whose tag does not match after all (the consume queue
    /// keeps only a hash) is settled as consumed instead of handed out. On
    /// a read error the error is returned and the claimed messages stay in
    /// flight: they are offered again when their invisible time runs out.
    /// Messages left in flight without being handed out are not renewed.
    pub fn complete(
        &self,
        req: &ReceiveRequest<'_>,
        claimed: Vec<Claimed>,
        records: Vec<Result<Option<StoredRecord>, StoreError>>,
    ) -> Result<Vec<Delivered>, StoreError> {
        let mut pairs = Vec::with_capacity(claimed.len());
        let mut unreadable = None;
        // FIFO queues with an unreadable message: what follows it there
        // stays in flight too, to come back in order behind it.
        let mut held: Vec<u32> = Vec::new();
        // Claimed messages left in flight without being handed out.
        let mut left = Vec::new();
        for (c, record) in claimed.into_iter().zip(records) {
            if held.contains(&c.queue_id) {
                left.push(c.entry());
                continue;
            }
            match record {
                Ok(r) => pairs.push((c, r)),
                Err(e) => {
                    left.push(c.entry());
                    if req.fifo {
                        held.push(c.queue_id);
                    }
                    // Left in flight: offered again once its invisible time
                    // runs out, until its attempts are used up.
                    tracing::error!(
                        error = %e,
                        group = req.group,
                        topic = req.topic,
                        queue = c.queue_id,
                        queue_offset = c.queue_offset,
                        "a claimed message could not be read; the others are handed out"
                    );
                    unreadable.get_or_insert(e);
                }
            }
        }
        // Their consumer never gets them: renewing them would keep them
        // (and a FIFO queue behind them) from coming back for hours.
        if req.renew_for.is_some() && !left.is_empty() {
            let mut st = self.lock();
            if let Err(e) = self.stop_renewing(&mut st, req.group, req.topic, &left) {
                tracing::warn!(error = %e, "recording the end of renewals failed; a restart may renew them again");
            }
        }
        // Nothing readable at all: the caller hears why.
        if pairs.is_empty()
            && let Some(e) = unreadable
        {
            return Err(e);
        }
        let mut out = Vec::with_capacity(pairs.len());
        let mut settled = Vec::new();
        for (c, record) in pairs {
            match record {
                Some(record) if req.filter.matches(&record) => {
                    out.push(self.delivered(record, c.queue_id, c.queue_offset, c.f));
                }
                _ => settled.push(c.entry()),
            }
        }
        if !settled.is_empty() {
            // Not waited for: if this record is lost, the message is only
            // offered again and filtered out again.
            let mut st = self.lock();
            let (_, logged) = self.settle(&mut st, req.group, req.topic, &settled);
            if let Err(e) = logged {
                tracing::warn!(error = %e, "recording messages settled without delivery failed; they may be offered again");
            }
        }
        Ok(out)
    }

    /// Drops from memory the state of queues with nothing in flight that no
    /// receive looked at for [`EVICT_IDLE_MS`] and whose committed offset
    /// (in the metadata) says where they stand: [`Consumption::init_queue`]
    /// rebuilds the same state from it on next use, so groups that come
    /// and go do not pile up here. Nothing in flight means no FIFO hold, no
    /// delivery-log record to tie and no receipt handle to honour (any
    /// handle of the queue is stale); a replay of the delivery log only
    /// makes states again that are dropped again once idle.
    fn evict_idle(&self, st: &mut State, now_ms: i64) {
        let every = EVICT_SWEEP_MS.min(self.evict_idle_ms);
        if now_ms.abs_diff(st.swept_ms) < every.unsigned_abs() {
            return;
        }
        st.swept_ms = now_ms;
        let before = st.queues.len();
        st.queues.retain(|(_, topic, q), qs| {
            if !qs.in_flight.is_empty() || now_ms.saturating_sub(qs.used_ms) < self.evict_idle_ms {
                return true;
            }
            let recorded = qs.committed == qs.next
                || (qs.committed.is_none()
                    && qs
                        .next
                        .is_none_or(|n| n <= self.store.queue_min_offset(topic, *q)));
            !recorded
        });
        let evicted = before - st.queues.len();
        if evicted > 0 {
            tracing::debug!(
                evicted,
                kept = st.queues.len(),
                "idle consumer queue states dropped from memory"
            );
        }
    }

    /// How many group-queue states are held in memory.
    pub fn queue_states(&self) -> usize {
        self.state.lock().queues.len()
    }

    /// Loads a queue's committed offset and handed-out mark on first use.
    fn init_queue(&self, group: &str, topic: &str, q: u32, qs: &mut QueueState) {
        if qs.next.is_some() {
            return;
        }
        let min = self.store.queue_min_offset(topic, q);
        let metadata = self.store.metadata();
        let committed = metadata.get_offset(group, topic, q);
        qs.next = Some(committed.unwrap_or(min).max(min));
        qs.committed = committed;
        qs.redeliver_below = metadata.dispatched(group, topic, q).unwrap_or(0);
        qs.marked = None;
    }

    /// A claim whose delivery record could not be written hands nothing
    /// out: its entries show up again now, unrenewed (in memory only, as
    /// the log cannot be written; a retry of the attempt still finds them).
    fn unclaim(&self, st: &mut State, req: &ReceiveRequest<'_>, claimed: &[Claimed]) {
        let entries: Vec<RemoveEntry> = claimed.iter().map(Claimed::entry).collect();
        let _unlogged = self.unrenew(st, req.group, req.topic, &entries, Some(req.now_ms));
    }

    /// The in-flight entries of `group` on `topic` that receive attempt
    /// `tag` made, still under those deliveries, made invisible (and
    /// renewed) afresh as a new claim of the same messages under the same
    /// receipt handles. Entries whose message retention removed end here.
    fn claim_again(
        &self,
        req: &ReceiveRequest<'_>,
        st: &mut State,
        tag: u32,
        (me, renew): (u16, u32),
        ops: &mut DeliveryOps,
    ) -> Vec<Claimed> {
        let mut out = Vec::new();
        let State {
            queues,
            events,
            clients,
            claims,
            ..
        } = st;
        for q in 0..req.queue_count {
            let key = (req.group.to_owned(), req.topic.to_owned(), q);
            let Some(qs) = queues.get_mut(&key) else {
                continue;
            };
            let mine: Vec<u64> = qs
                .in_flight
                .iter()
                .filter(|(_, f)| f.claim == tag)
                .map(|(o, _)| *o)
                .collect();
            if mine.is_empty() {
                continue;
            }
            for off in mine {
                let Some(location) = self.store.queue_entry(req.topic, q, off) else {
                    if let Some(f) = qs.in_flight.remove(&off) {
                        events.release(f.event);
                    }
                    continue;
                };
                let Some(f) = qs.in_flight.get_mut(&off) else {
                    continue;
                };
                f.visible_at_ms = req.now_ms + req.invisible_ms;
                f.issuer = me;
                f.renew_for = renew;
                if f.renew_until_ms == 0 {
                    f.renew_until_ms = req.now_ms.saturating_add(RENEW_MAX_MS);
                }
                let e = Tables { clients, claims }.set_entry(ops, q, off, f);
                ops.sets.push(e);
                out.push(Claimed {
                    queue_id: q,
                    queue_offset: off,
                    location,
                    f: *f,
                });
            }
            ops.nexts.push((q, qs.next.unwrap_or(0)));
        }
        if !out.is_empty() {
            tracing::info!(
                group = req.group,
                topic = req.topic,
                messages = out.len(),
                "a receive repeated its attempt: the messages that attempt was handed are handed out again"
            );
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn claim_queue(
        &self,
        req: &ReceiveRequest<'_>,
        q: u32,
        st: &mut QueueState,
        events: &mut Events,
        tags: Tags,
        out: &mut Vec<Claimed>,
        dead: &mut Vec<(RemoveEntry, u32)>,
        ops: &mut DeliveryOps,
    ) {
        let min = self.store.queue_min_offset(req.topic, q);
        // Bytes claimed so far: see [`MAX_RECEIVE_BYTES`].
        let mut bytes: u64 = out.iter().map(|c| u64::from(c.location.size)).sum();
        let next = st.next.get_or_insert(min);
        // Entries removed by retention cannot be delivered any more.
        st.in_flight.retain(|off, f| {
            let keep = *off >= min;
            if !keep {
                events.release(f.event);
            }
            keep
        });
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
                if let Some(f) = st.in_flight.remove(&off) {
                    events.release(f.event);
                }
                continue;
            };
            let Some(f) = st.in_flight.get_mut(&off) else {
                continue;
            };
            if f.attempt < req.max_attempts
                && !out.is_empty()
                && bytes + u64::from(location.size) > self.max_receive_bytes
            {
                return;
            }
            if f.attempt >= req.max_attempts {
                // Goes to the dead-letter topic once this claim lets go of
                // the lock, and stays in flight until it is there; hidden
                // meanwhile, so no other receive moves it. Under a new
                // delivery number, logged with the claim: the expired
                // delivery's receipt handle can no longer ack it or change
                // it while it moves, and the move's record ends it.
                f.visible_at_ms = req.now_ms + req.invisible_ms;
                f.renew_for = 0;
                f.claim = 0;
                f.delivery = self.deliveries.fetch_add(1, Ordering::Relaxed);
                f.issuer = tags.issuer;
                ops.sets.push(set_entry(q, off, f, 0, 0));
                dead.push((
                    RemoveEntry {
                        queue_id: q,
                        queue_offset: off,
                        delivery: f.delivery,
                    },
                    f.attempt,
                ));
                continue;
            }
            f.attempt += 1;
            bytes += u64::from(location.size);
            f.delivery = self.deliveries.fetch_add(1, Ordering::Relaxed);
            f.visible_at_ms = req.now_ms + req.invisible_ms;
            f.issuer = tags.issuer;
            f.renew_for = tags.renew;
            f.renew_until_ms = req.now_ms.saturating_add(RENEW_MAX_MS);
            f.claim = tags.claim;
            ops.sets
                .push(set_entry(q, off, f, tags.renew_ref, tags.claim_ref));
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
            let Some(location) = self.store.queue_entry(req.topic, q, off) else {
                *next += 1;
                continue;
            };
            if !req.filter.may_match(location.tag_hash) {
                *next += 1;
                continue;
            }
            if !out.is_empty() && bytes + u64::from(location.size) > self.max_receive_bytes {
                break;
            }
            *next += 1;
            bytes += u64::from(location.size);
            let f = InFlight {
                delivery: self.deliveries.fetch_add(1, Ordering::Relaxed),
                visible_at_ms: req.now_ms + req.invisible_ms,
                attempt: 1,
                event: UNLOGGED,
                issuer: tags.issuer,
                renew_for: tags.renew,
                renew_until_ms: req.now_ms.saturating_add(RENEW_MAX_MS),
                claim: tags.claim,
            };
            st.in_flight.insert(off, f);
            ops.sets
                .push(set_entry(q, off, &f, tags.renew_ref, tags.claim_ref));
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
        self.store_committed(req.group, req.topic, q, st, min);
        // As for the committed offset: a mark that says nothing was handed
        // out is not recorded.
        if st.marked != Some(next) && (st.marked.is_some() || next > min) {
            st.marked = Some(next);
            self.store
                .metadata()
                .mark_dispatched(req.group, req.topic, q, next);
        }
    }

    /// Records the queue's committed offset in the metadata when it moved.
    /// A group with no committed offset starts from the queue's first
    /// offset (`min`): none is recorded until it consumed past it, so a
    /// group that looked and found nothing leaves no offsets behind.
    fn store_committed(&self, group: &str, topic: &str, q: u32, st: &mut QueueState, min: u64) {
        if let Some(low) = st.low()
            && st.committed != Some(low)
            && (st.committed.is_some() || low > min)
        {
            st.committed = Some(low);
            self.store.metadata().commit_offset(group, topic, q, low);
        }
    }

    /// Ends deliveries (acked, or consumed without being handed out) and
    /// moves the group's committed offsets. Says for each whether it was in
    /// flight under that delivery, and where the delivery record ends.
    fn settle(
        &self,
        st: &mut State,
        group: &str,
        topic: &str,
        items: &[RemoveEntry],
    ) -> (Vec<bool>, Logged) {
        let mut ops = DeliveryOps::new(group, topic, self.store.store_id());
        let mut found = Vec::with_capacity(items.len());
        let mut key = (group.to_owned(), topic.to_owned(), 0);
        for r in items {
            key.2 = r.queue_id;
            let Some(qs) = st.queues.get_mut(&key) else {
                found.push(false);
                continue;
            };
            match qs.in_flight.get(&r.queue_offset) {
                Some(f) if f.delivery == r.delivery => {
                    st.events.release(f.event);
                    qs.in_flight.remove(&r.queue_offset);
                    ops.removes.push(*r);
                    let min = match qs.committed {
                        Some(_) => 0,
                        None => self.store.queue_min_offset(topic, r.queue_id),
                    };
                    self.store_committed(group, topic, r.queue_id, qs, min);
                    found.push(true);
                }
                _ => found.push(false),
            }
        }
        let logged = self.log(st, &ops);
        (found, logged)
    }

    /// Appends `ops` to the delivery log and ties the entries it set to its
    /// record. Returns the commit-log offset the record ends at.
    fn log(&self, st: &mut State, ops: &DeliveryOps) -> Logged {
        if ops.is_empty() {
            return Ok(None);
        }
        let a = self.append_ops(st, ops)?;
        self.relog_old(st, a.store_ms);
        self.store_progress(st);
        Ok(Some(Recorded::of(&a)))
    }

    /// Appends one delivery record and ties the entries it set to it.
    fn append_ops(&self, st: &mut State, ops: &DeliveryOps) -> Result<Appended, StoreError> {
        let a = self
            .store
            .append(NewRecord::new(DELIVERY_TOPIC, 0, ops.encode()))?;
        st.log_end = st.log_end.max(a.queue_offset + 1);
        tie(st, ops, a.queue_offset, a.store_ms);
        Ok(a)
    }

    /// Logs again the entries whose record is far behind the head of the
    /// delivery log, so the replay stays short and retention cannot remove
    /// the only record of an entry still in flight.
    fn relog_old(&self, st: &mut State, now_ms: i64) {
        let Some((oldest, oldest_ms)) = st.events.oldest() else {
            return;
        };
        if oldest + self.relog_records > st.log_end && oldest_ms + self.relog_age_ms > now_ms {
            return;
        }
        // Everything in the older half of what is pinned moves to the head.
        let cutoff = oldest + (st.log_end - oldest) / 2 + 1;
        // Each entry keeps the broker that made its delivery, so the
        // consumer's receipt handle stays valid after a replay.
        let mut by_topic: BTreeMap<(String, String, u16), DeliveryOps> = BTreeMap::new();
        let tables = st.tables();
        for ((group, topic, q), qs) in &st.queues {
            for (off, f) in &qs.in_flight {
                if f.event < cutoff {
                    let issuer = st
                        .issuers
                        .get(usize::from(f.issuer))
                        .map_or("", String::as_str);
                    let ops = by_topic
                        .entry((group.clone(), topic.clone(), f.issuer))
                        .or_insert_with(|| DeliveryOps::new(group, topic, issuer));
                    let e = tables.set_entry(ops, *q, *off, f);
                    ops.sets.push(e);
                    if ops.nexts.last().is_none_or(|(last, _)| last != q) {
                        ops.nexts.push((*q, qs.next.unwrap_or(0)));
                    }
                }
            }
        }
        for ops in by_topic.values() {
            if let Err(e) = self.append_ops(st, ops) {
                tracing::warn!(error = %e, "logging old in-flight entries again failed; will retry");
                return;
            }
        }
    }

    /// Stores where a replay must start: the oldest record that set an
    /// entry still in flight, or the end of the log.
    fn store_progress(&self, st: &mut State) {
        let low = st.events.oldest().map_or(st.log_end, |(e, _)| e);
        if st.progress != Some(low) {
            st.progress = Some(low);
            self.store
                .metadata()
                .commit_offset(DELIVERY_GROUP, DELIVERY_TOPIC, 0, low);
        }
    }

    /// Rebuilds the state from the committed offsets and the delivery log.
    /// Writes nothing: the committed offsets and the progress are stored
    /// by the next change.
    fn replay(&self, st: &mut State) {
        *st = State {
            loaded: true,
            ..State::default()
        };
        let min = self.store.queue_min_offset(DELIVERY_TOPIC, 0);
        let max = self.store.queue_max_offset(DELIVERY_TOPIC, 0);
        let from = self
            .store
            .metadata()
            .get_offset(DELIVERY_GROUP, DELIVERY_TOPIC, 0)
            .unwrap_or(0)
            .clamp(min, max);
        let mut highest_delivery = 0;
        let mut skipped = 0u64;
        for off in from..max {
            let record = match self.store.get(DELIVERY_TOPIC, 0, off) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable delivery record skipped");
                    skipped += 1;
                    continue;
                }
            };
            let Some(ops) = DeliveryOps::decode(&record.body) else {
                tracing::error!(offset = off, "delivery record in an unknown format skipped");
                skipped += 1;
                continue;
            };
            for s in &ops.sets {
                highest_delivery = highest_delivery.max(s.delivery);
            }
            self.apply(st, &ops, off, record.store_ms);
        }
        st.log_end = max;
        let in_flight: usize = st.queues.values().map(|qs| qs.in_flight.len()).sum();
        self.deliveries
            .fetch_max(highest_delivery.saturating_add(1), Ordering::Relaxed);
        if max > from {
            tracing::info!(
                records = max - from,
                skipped,
                in_flight,
                "consumer delivery state rebuilt from the delivery log"
            );
        }
    }

    /// Applies one replayed delivery record (queue offset `event`).
    fn apply(&self, st: &mut State, ops: &DeliveryOps, event: u64, stored_ms: i64) {
        let issuer = st.issuer(&ops.issuer);
        for r in &ops.removes {
            let key = (ops.group.clone(), ops.topic.clone(), r.queue_id);
            if let Some(qs) = st.queues.get_mut(&key)
                && let Some(f) = qs.in_flight.get(&r.queue_offset)
                && f.delivery == r.delivery
            {
                st.events.release(f.event);
                qs.in_flight.remove(&r.queue_offset);
            }
        }
        for s in &ops.sets {
            // The renewal and the receive attempt go on as they were.
            let renew_for = ops.renew_client_of(s).map_or(0, |c| st.client(c));
            let claim = ops.claim_of(s).map_or(0, |(c, a)| st.claim_tag(c, a));
            let key = (ops.group.clone(), ops.topic.clone(), s.queue_id);
            let qs = st.queues.entry(key).or_default();
            self.init_queue(&ops.group, &ops.topic, s.queue_id, qs);
            let f = InFlight {
                delivery: s.delivery,
                visible_at_ms: s.visible_at_ms,
                attempt: s.attempt,
                event,
                issuer,
                renew_for,
                renew_until_ms: if renew_for == 0 { 0 } else { s.renew_until_ms },
                claim,
            };
            if let Some(old) = qs.in_flight.insert(s.queue_offset, f) {
                st.events.release(old.event);
            }
            st.events.add(event, stored_ms);
        }
        for (q, next) in &ops.nexts {
            let key = (ops.group.clone(), ops.topic.clone(), *q);
            let qs = st.queues.entry(key).or_default();
            self.init_queue(&ops.group, &ops.topic, *q, qs);
            qs.next = qs.next.max(Some(*next));
        }
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

    /// Acknowledges one delivery; see [`Consumption::ack_many`].
    pub fn ack(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
    ) -> Result<Option<Recorded>, HandleError> {
        let (mut results, logged) = self.ack_many(group, topic, &[handle]);
        let result = results.pop().unwrap_or(Err(HandleError::Stale));
        result?;
        logged.map_err(HandleError::Unrecorded)
    }

    /// Acknowledges deliveries, with one delivery record for all of them.
    /// Returns each one's outcome and the commit-log offset the record ends
    /// at (to wait for before confirming the acks).
    pub fn ack_many(
        &self,
        group: &str,
        topic: &str,
        handles: &[&str],
    ) -> (Vec<Result<(), HandleError>>, Logged) {
        let mut st = self.lock();
        let mut results = Vec::with_capacity(handles.len());
        let mut items = Vec::with_capacity(handles.len());
        for handle in handles {
            match self.parse(&st, topic, handle) {
                Ok(h) => {
                    items.push((
                        results.len(),
                        h.topic,
                        RemoveEntry {
                            queue_id: h.queue_id,
                            queue_offset: h.queue_offset,
                            delivery: h.delivery,
                        },
                    ));
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        // Handles name their topic; an ack without one settles each on its own.
        let mut end = Ok(None);
        let mut by_topic: BTreeMap<String, Vec<(usize, RemoveEntry)>> = BTreeMap::new();
        for (i, t, r) in items {
            by_topic.entry(t).or_default().push((i, r));
        }
        for (t, entries) in by_topic {
            let removes: Vec<RemoveEntry> = entries.iter().map(|(_, r)| *r).collect();
            let (found, logged) = self.settle(&mut st, group, &t, &removes);
            for ((i, _), ok) in entries.iter().zip(found) {
                if !ok {
                    results[*i] = Err(HandleError::Stale);
                }
            }
            end = match (end, logged) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(a), Ok(b)) => Ok(Recorded::join(a, b)),
            };
        }
        (results, end)
    }

    /// Makes a delivery invisible for `invisible_ms` from `now_ms`; returns
    /// the new handle (the old one becomes stale) and where its delivery
    /// record ends.
    pub fn change_invisible(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
        invisible_ms: i64,
        now_ms: i64,
    ) -> Result<(ReceiptHandle, Option<Recorded>), HandleError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut h = self.parse(st, topic, handle)?;
        let me = st.issuer(self.store.store_id());
        let qs = st
            .queues
            .get_mut(&(group.to_owned(), h.topic.clone(), h.queue_id))
            .ok_or(HandleError::Stale)?;
        let f = qs
            .in_flight
            .get_mut(&h.queue_offset)
            .ok_or(HandleError::Stale)?;
        if f.delivery != h.delivery {
            return Err(HandleError::Stale);
        }
        f.delivery = self.deliveries.fetch_add(1, Ordering::Relaxed);
        f.visible_at_ms = now_ms + invisible_ms;
        f.issuer = me;
        // The consumer set the time itself (a push consumer's retry back-off):
        // renewing would override it. It holds the new handle, not the one
        // its receive attempt was handed.
        f.renew_for = 0;
        f.claim = 0;
        h.delivery = f.delivery;
        h.store_id = self.store.store_id().to_owned();
        let mut ops = DeliveryOps::new(group, &h.topic, self.store.store_id());
        ops.sets
            .push(set_entry(h.queue_id, h.queue_offset, f, 0, 0));
        ops.nexts.push((h.queue_id, qs.next.unwrap_or(0)));
        let end = self.log(st, &ops).map_err(HandleError::Unrecorded)?;
        Ok((h, end))
    }

    /// Moves one delivery to the dead-letter topic at the consumer's request
    /// (a FIFO consumer that gave up on a message). Returns where the
    /// records written end. A message whose record is gone (retention) or
    /// cannot be read has nothing to move: its delivery ends, as a claim
    /// ends one that used up its attempts. When the dead letter cannot be
    /// written the delivery stays, no longer renewed, so it shows up again
    /// by its invisible time even if the consumer gives up on it.
    pub fn forward_to_dead_letter(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
        attempts: u32,
    ) -> Result<Option<Recorded>, HandleError> {
        // Under the lock throughout, so nothing acks or redelivers the
        // message between the check, the dead letter and the ack. The dead
        // letter is written first: if that fails, the delivery stays in
        // flight and the handle valid, so the consumer can try again.
        let mut guard = self.lock();
        let st = &mut *guard;
        let h = self.parse(st, topic, handle)?;
        let live = st
            .queues
            .get(&(group.to_owned(), h.topic.clone(), h.queue_id))
            .and_then(|qs| qs.in_flight.get(&h.queue_offset))
            .is_some_and(|f| f.delivery == h.delivery);
        if !live {
            return Err(HandleError::Stale);
        }
        let entry = RemoveEntry {
            queue_id: h.queue_id,
            queue_offset: h.queue_offset,
            delivery: h.delivery,
        };
        let moved = match self.store.get(&h.topic, h.queue_id, h.queue_offset) {
            Ok(Some(record)) => match self.to_dead_letter(group, record, attempts) {
                Ok(a) => Some(Recorded::of(&a)),
                Err(e) => {
                    tracing::error!(error = %e, group, topic = %h.topic, queue = h.queue_id, queue_offset = h.queue_offset, "writing to the dead-letter topic failed; the message stays in flight, no longer renewed");
                    if let Err(e) = self.stop_renewing(st, group, &h.topic, &[entry]) {
                        tracing::warn!(error = %e, "recording the end of a renewal failed; a restart may renew it again");
                    }
                    return Err(HandleError::Unrecorded(e));
                }
            },
            Ok(None) => {
                tracing::warn!(group, topic = %h.topic, queue = h.queue_id, queue_offset = h.queue_offset, "a message to move to the dead-letter topic is gone (retention); its delivery ends");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, group, topic = %h.topic, queue = h.queue_id, queue_offset = h.queue_offset, "a message to move to the dead-letter topic could not be read; it is dropped instead");
                None
            }
        };
        let (found, logged) = self.settle(st, group, &h.topic, &[entry]);
        if found.first() != Some(&true) {
            return Err(HandleError::Stale);
        }
        let acked = logged.map_err(HandleError::Unrecorded)?;
        Ok(Recorded::join(moved, acked))
    }

    /// Gives back deliveries a consumer never got (the receive failed after
    /// claiming them, or its answer was dropped): each still under that
    /// delivery is no longer renewed and shows up again now. Their receive
    /// attempt still finds them, so a retry of it gets them back (see
    /// [`ReceiveRequest::attempt`]). Returns where the record ends.
    pub fn release(
        &self,
        group: &str,
        topic: &str,
        entries: &[RemoveEntry],
        now_ms: i64,
    ) -> Logged {
        let mut st = self.lock();
        let changed = self.unrenew(&mut st, group, topic, entries, Some(now_ms));
        let given_back: usize = changed.iter().map(|ops| ops.sets.len()).sum();
        if given_back > 0 {
            tracing::info!(
                group,
                topic,
                messages = given_back,
                "messages claimed by a receive that did not reach its consumer are given back"
            );
        }
        self.log_all(&mut st, &changed)
    }

    /// Stops renewing deliveries (each still under that delivery); see
    /// [`Consumption::unrenew`].
    fn stop_renewing(
        &self,
        st: &mut State,
        group: &str,
        topic: &str,
        entries: &[RemoveEntry],
    ) -> Logged {
        let changed = self.unrenew(st, group, topic, entries, None);
        self.log_all(st, &changed)
    }

    /// Stops renewing the entries still under the deliveries named, and
    /// makes them visible at `visible_at_ms` when it is earlier. Returns
    /// the records that log it, still to be written.
    fn unrenew(
        &self,
        st: &mut State,
        group: &str,
        topic: &str,
        entries: &[RemoveEntry],
        visible_at_ms: Option<i64>,
    ) -> Vec<DeliveryOps> {
        // Each entry keeps the broker that made its delivery (see
        // [`Consumption::relog_old`]).
        let mut by_issuer: BTreeMap<u16, DeliveryOps> = BTreeMap::new();
        let State {
            queues,
            clients,
            claims,
            issuers,
            ..
        } = st;
        let tables = Tables { clients, claims };
        let mut key = (group.to_owned(), topic.to_owned(), 0);
        for r in entries {
            key.2 = r.queue_id;
            let Some(qs) = queues.get_mut(&key) else {
                continue;
            };
            let Some(f) = qs.in_flight.get_mut(&r.queue_offset) else {
                continue;
            };
            if f.delivery != r.delivery {
                continue;
            }
            f.renew_for = 0;
            if let Some(at) = visible_at_ms {
                f.visible_at_ms = f.visible_at_ms.min(at);
            }
            let ops = by_issuer.entry(f.issuer).or_insert_with(|| {
                let issuer = issuers
                    .get(usize::from(f.issuer))
                    .map_or("", String::as_str);
                DeliveryOps::new(group, topic, issuer)
            });
            let e = tables.set_entry(ops, r.queue_id, r.queue_offset, f);
            ops.sets.push(e);
            if ops.nexts.last().is_none_or(|(last, _)| *last != r.queue_id) {
                ops.nexts.push((r.queue_id, qs.next.unwrap_or(0)));
            }
        }
        by_issuer.into_values().collect()
    }

    /// Logs several records; see [`Consumption::log`].
    fn log_all<'o>(
        &self,
        st: &mut State,
        all: impl IntoIterator<Item = &'o DeliveryOps>,
    ) -> Logged {
        let mut end = Ok(None);
        for ops in all {
            let logged = self.log(st, ops);
            end = match (end, logged) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(a), Ok(b)) => Ok(Recorded::join(a, b)),
            };
        }
        end
    }

    /// Messages of `group` on a queue handed out and not yet acked (0 until
    /// the state is loaded: a slave holds none).
    pub fn in_flight(&self, group: &str, topic: &str, queue_id: u32) -> u64 {
        self.state
            .lock()
            .queues
            .get(&(group.to_owned(), topic.to_owned(), queue_id))
            .map_or(0, |s| s.in_flight.len() as u64)
    }

    /// Renews deliveries made with `auto_renew` (see [`RENEW_INVISIBLE_MS`]):
    /// each within [`RENEW_AHEAD_MS`] of showing up again, whose client
    /// `live` says is still connected and whose [`RENEW_MAX_MS`] is not used
    /// up, stays invisible for [`RENEW_INVISIBLE_MS`] more under the same
    /// receipt handle. Returns how many were renewed and where their
    /// delivery records end. Only for a master taking writes (as every
    /// change): the state is rebuilt from the delivery log first if need be,
    /// with the renewals it records.
    pub fn renew(&self, now_ms: i64, live: impl Fn(&str) -> bool) -> (usize, Logged) {
        let mut guard = self.lock();
        let st = &mut *guard;
        // Each entry keeps the broker that made its delivery (see
        // [`Consumption::relog_old`]): a failover carries renewals over.
        let mut by_topic: BTreeMap<(String, String, u16), DeliveryOps> = BTreeMap::new();
        let mut renewed = 0;
        let State {
            queues,
            clients,
            claims,
            issuers,
            ..
        } = st;
        let tables = Tables { clients, claims };
        for ((group, topic, q), qs) in queues.iter_mut() {
            let next = qs.next.unwrap_or(0);
            for (off, f) in qs.in_flight.iter_mut() {
                if f.renew_for == 0
                    || f.visible_at_ms <= now_ms
                    || f.visible_at_ms > now_ms + RENEW_AHEAD_MS
                {
                    continue;
                }
                let client = tables
                    .clients
                    .get(f.renew_for as usize - 1)
                    .map_or("", String::as_str);
                if now_ms >= f.renew_until_ms {
                    // Left to run out: the consumer had long enough.
                    f.renew_for = 0;
                    continue;
                }
                if !live(client) {
                    // Not renewed while the client is not connected (it may
                    // be reconnecting, as after a failover): the entry runs
                    // out unless it connects before then.
                    continue;
                }
                f.visible_at_ms = (now_ms + RENEW_INVISIBLE_MS).min(f.renew_until_ms);
                let ops = by_topic
                    .entry((group.clone(), topic.clone(), f.issuer))
                    .or_insert_with(|| {
                        let issuer = issuers
                            .get(usize::from(f.issuer))
                            .map_or("", String::as_str);
                        DeliveryOps::new(group, topic, issuer)
                    });
                let e = tables.set_entry(ops, *q, *off, f);
                ops.sets.push(e);
                if ops.nexts.last().is_none_or(|(last, _)| last != q) {
                    ops.nexts.push((*q, next));
                }
                renewed += 1;
                tracing::debug!(group = %group, topic = %topic, queue = q, queue_offset = off, client, visible_at_ms = f.visible_at_ms, "delivery renewed for its connected client");
            }
        }
        st.compact_clients();
        let end = self.log_all(st, by_topic.values());
        (renewed, end)
    }

    fn parse(&self, st: &State, topic: &str, handle: &str) -> Result<ReceiptHandle, HandleError> {
        let h: ReceiptHandle = handle.parse().map_err(|_| HandleError::Malformed)?;
        let known = h.store_id == self.store.store_id() || st.issuers.contains(&h.store_id);
        if !known || (!topic.is_empty() && h.topic != topic) {
            return Err(HandleError::Foreign);
        }
        Ok(h)
    }

    /// Appends a copy of `record` to the group's dead-letter topic; returns
    /// where it went.
    fn to_dead_letter(
        &self,
        group: &str,
        record: StoredRecord,
        attempts: u32,
    ) -> Result<Appended, StoreError> {
        let dlq = format!("{DLQ_PREFIX}{group}");
        // A topic of one queue, so consumers can read (and re-drive) it.
        self.store.metadata().ensure_topic(TopicConfig {
            name: dlq.clone(),
            queue_count: 1,
            message_type: MessageType::Normal,
        })?;
        let mut properties = record.properties.clone();
        properties.insert(keys::ORIGIN_TOPIC.into(), record.topic.clone());
        properties.insert(keys::DELIVERY_ATTEMPTS.into(), attempts.to_string());
        let a = self.store.append(NewRecord {
            topic: dlq.clone(),
            queue_id: 0,
            born_ms: record.born_ms,
            flags: record.flags,
            properties,
            body: record.body.clone(),
        })?;
        self.arrivals.notify(&dlq);
        tracing::info!(group, topic = %record.topic, queue = record.queue_id, offset = record.queue_offset, attempts, dead_letter_topic = %dlq, "message moved to the dead-letter topic");
        Ok(a)
    }
}

/// The set entry that logs `f`, whose client and receive attempt are
/// `renew_client` and `claim` in the record (see [`Tables::set_entry`]).
fn set_entry(
    queue_id: u32,
    queue_offset: u64,
    f: &InFlight,
    renew_client: u16,
    claim: u16,
) -> SetEntry {
    SetEntry {
        queue_id,
        queue_offset,
        delivery: f.delivery,
        attempt: f.attempt,
        visible_at_ms: f.visible_at_ms,
        renew_client,
        renew_until_ms: if renew_client == 0 {
            0
        } else {
            f.renew_until_ms
        },
        claim,
    }
}

/// Ties the entries `ops` set (if still under the same delivery) to their
/// delivery record `event`.
fn tie(st: &mut State, ops: &DeliveryOps, event: u64, stored_ms: i64) {
    let mut key = (ops.group.clone(), ops.topic.clone(), u32::MAX);
    for s in &ops.sets {
        key.2 = s.queue_id;
        let Some(qs) = st.queues.get_mut(&key) else {
            continue;
        };
        if let Some(f) = qs.in_flight.get_mut(&s.queue_offset)
            && f.delivery == s.delivery
            && f.event != event
        {
            st.events.release(f.event);
            f.event = event;
            st.events.add(event, stored_ms);
        }
    }
}

/// Delivery numbers start from the clock (2^16 per millisecond), so they
/// keep growing across restarts and failovers even before a replay raises
/// them past every number in the log: a handle from an earlier delivery
/// never matches a later one.
fn first_delivery_number() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms << 16
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
            renew_for: None,
            attempt: None,
        }
    }

    /// [`req`] for `group`, whose messages have one attempt each: the next
    /// receive after their invisible time moves them to the dead letters.
    fn last_attempt<'a>(group: &'a str, filter: &'a TagFilter, now_ms: i64) -> ReceiveRequest<'a> {
        ReceiveRequest {
            group,
            max_attempts: 1,
            ..req(filter, now_ms, false)
        }
    }

    /// [`req`] at time 0 for queue 0 of `t` only, up to `max_messages`.
    fn one_queue(filter: &TagFilter, max_messages: usize) -> ReceiveRequest<'_> {
        ReceiveRequest {
            queue_count: 1,
            max_messages,
            ..req(filter, 0, false)
        }
    }

    /// A store with `n` messages `m0`, `m1`, ... tagged `a` on queue 0 of `t`.
    fn filled(n: usize) -> (tempfile::TempDir, MessageStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        for i in 0..n {
            put(&s, 0, "a", &format!("m{i}"));
        }
        (dir, s)
    }

    fn put(s: &MessageStore, q: u32, tag: &str, body: &str) {
        s.append(NewRecord::new("t", q, body.as_bytes().to_vec()).with_property(keys::TAG, tag))
            .expect("append");
    }

    /// A delivery record that a cut of the log removed (this broker
    /// followed another master whose log forked before it) must not be
    /// taken for durable when the records written there since are flushed
    /// past where it ended: the receive would hand out messages that the
    /// new master's consumption state knows nothing of.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_record_a_cut_removed_is_not_taken_for_durable() {
        a_cut_delivery_record_is_reported(FlushMode::SyncFlush).await;
    }

    /// The same under ASYNC_FLUSH, where nothing is waited for: the cut is
    /// still reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_async_flush_a_delivery_record_a_cut_removed_is_reported() {
        a_cut_delivery_record_is_reported(FlushMode::AsyncFlush).await;
    }

    async fn a_cut_delivery_record_is_reported(mode: FlushMode) {
        use crate::replication::{ReplicationManager, ReplicationMode, StartRole};
        use crate::write_path::{WriteError, WritePath};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = StoreConfig::new(dir.path());
        cfg.segment_size = 1 << 20;
        cfg.flush_mode = mode;
        let s = MessageStore::open(cfg).expect("open");
        let repl = ReplicationManager::open(
            crate::testing::replication_config(
                dir.path(),
                ReplicationMode::Async,
                std::time::Duration::from_secs(1),
                StartRole::Master,
            ),
            s.clone(),
        )
        .expect("replication");
        let write = WritePath::new(s.clone(), repl);
        let bounded = |f| tokio::time::timeout(std::time::Duration::from_secs(30), f);
        for i in 0..2 {
            write
                .write_one(NewRecord::new("t", 0, format!("m{i}")))
                .await
                .expect("send");
        }
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let r = one_queue(&all, 1);
        let claim = c.claim(&r).expect("claim");
        assert_eq!(claim.items.len(), 1);
        let first = claim.durable_at.expect("a delivery record");
        let waited = bounded(write.wait_delivery_record(first.span()))
            .await
            .expect("bounded");
        assert!(matches!(waited, Ok(true)), "{waited:?}");
        let claim = c.claim(&r).expect("claim");
        assert_eq!(claim.items.len(), 1);
        let second = claim.durable_at.expect("a delivery record");
        // The log is cut under the second record, and the other master's
        // records fill it past where that one ended, and are flushed.
        s.truncate_to(second.span().offset).expect("cut");
        while s.max_offset() < second.end_offset() {
            s.append(NewRecord::new("other", 0, vec![0u8; 64]))
                .expect("append");
        }
        s.flush().expect("flush");
        assert!(s.flushed_offset() >= second.end_offset());
        // A span starting before the cut and ending after it is cut too.
        let both = Recorded::join(Some(first), Some(second)).expect("span");
        for cut in [second, both] {
            let waited = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                write.wait_delivery_record(cut.span()),
            )
            .await
            .expect("bounded");
            assert!(
                matches!(waited, Err(WriteError::Store(StoreError::Truncated { .. }))),
                "{waited:?}"
            );
        }
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_receive_that_hands_out_nothing_records_no_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let r = ReceiveRequest {
            group: "new",
            ..req(&all, 0, false)
        };
        // Both queues empty: a group that only looked leaves nothing behind.
        assert!(c.receive(&r).expect("receive").is_empty());
        assert!(c.receive(&r).expect("receive").is_empty());
        for q in 0..2 {
            assert_eq!(s.metadata().get_offset("new", "t", q), None, "queue {q}");
            assert_eq!(s.metadata().dispatched("new", "t", q), None, "queue {q}");
        }
        // A message handed out and still in flight: the delivery log holds
        // it, the offset (still the queue's first) is not recorded either.
        put(&s, 0, "a", "m0");
        let got = c.receive(&r).expect("receive");
        assert_eq!(got.len(), 1);
        assert_eq!(s.metadata().get_offset("new", "t", 0), None);
        assert_eq!(s.metadata().dispatched("new", "t", 0), Some(1));
        // Acked: progress, recorded.
        c.ack("new", "t", &got[0].handle.to_string()).expect("ack");
        assert_eq!(s.metadata().get_offset("new", "t", 0), Some(1));
        assert_eq!(s.metadata().get_offset("new", "t", 1), None);
        // A restart resumes past it, and hands out what comes next.
        put(&s, 0, "a", "m1");
        let c = Consumption::new(s.clone());
        let got = c.receive(&r).expect("receive");
        let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(bodies, [&b"m1"[..]]);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn one_receive_hands_out_about_max_receive_bytes_at_most() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = StoreConfig::new(dir.path());
        cfg.segment_size = 16 << 20;
        cfg.flush_mode = FlushMode::AsyncFlush;
        let s = MessageStore::open(cfg).expect("open");
        // Three messages of 3 MiB: two would pass 4 MiB.
        for i in 0..3u8 {
            s.append(NewRecord::new("t", 0, vec![i; 3 << 20]))
                .expect("append");
        }
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let mut r = one_queue(&all, 1024);
        for i in 0..3u8 {
            let got = c.receive(&r).expect("receive");
            assert_eq!(got.len(), 1, "receive {i}");
            assert_eq!(got[0].record.body[0], i);
        }
        // Redeliveries are capped as well.
        r.now_ms = 10_000;
        assert_eq!(c.receive(&r).expect("receive").len(), 1);
        // Small messages still come many at a time.
        for i in 0..100 {
            put(&s, 0, "a", &format!("s{i}"));
        }
        r.now_ms = 0;
        assert_eq!(c.receive(&r).expect("receive").len(), 100);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn idle_queue_states_are_dropped_and_rebuilt_as_they_were() {
        let (_dir, s) = filled(3);
        let all = TagFilter::All;
        let mut c = Consumption::new(s.clone());
        c.evict_idle_ms = 60_000;
        let mut r = req(&all, 1_000, false);
        r.queue_count = 1;
        r.max_messages = 2;
        // Groups that only looked (at an empty topic), once.
        for i in 0..50 {
            let g = format!("g{i}");
            let look = ReceiveRequest {
                group: &g,
                topic: "empty",
                ..req(&all, 1_000, false)
            };
            assert!(c.receive(&look).expect("receive").is_empty());
        }
        // g has m0 and m1 in flight (a FIFO group would be held on them).
        let got = c.receive(&r).expect("receive");
        assert_eq!(got.len(), 2);
        assert_eq!(c.queue_states(), 50 * 2 + 1);
        // Long after (a receive that looks at no queue sweeps): the idle
        // states go, g's queue (in flight) stays.
        r.now_ms = 1_000 + 3_600_000;
        r.max_messages = 0;
        assert!(c.receive(&r).expect("receive").is_empty());
        assert_eq!(c.queue_states(), 1, "g's queue, in flight");
        // The in-flight messages are still acked by their handles; m2 is
        // handed out next, nothing again.
        for d in &got {
            c.ack("g", "t", &d.handle.to_string()).expect("ack");
        }
        // Idle with nothing in flight, its offset committed: dropped too,
        // and rebuilt from that offset.
        r.now_ms += 3_600_000;
        assert!(c.receive(&r).expect("receive").is_empty());
        assert_eq!(c.queue_states(), 0);
        r.now_ms += 1;
        r.max_messages = 10;
        let again = c.receive(&r).expect("receive");
        let bodies: Vec<&[u8]> = again.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(bodies, [&b"m2"[..]]);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn an_unreadable_message_holds_up_neither_its_batch_nor_the_dead_letters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let appended: Vec<_> = (0..3)
            .map(|i| {
                s.append(
                    NewRecord::new("t", 0, format!("m{i}").into_bytes())
                        .with_property(keys::TAG, "a"),
                )
                .expect("append")
            })
            .collect();
        crate::testing::corrupt_on_disk(&s, &appended[1]);
        assert!(s.get("t", 0, 1).is_err(), "m1 is unreadable");
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        // A FIFO group gets what comes before it; what follows waits behind it.
        let fifo = ReceiveRequest {
            group: "f",
            ..req(&all, 0, true)
        };
        let got = c.receive(&fifo).expect("receive");
        let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(bodies, [&b"m0"[..]]);
        assert_eq!(c.in_flight("f", "t", 0), 3);
        for (round, now) in [0, 2000, 4000].into_iter().enumerate() {
            let got = c.receive(&req(&all, now, false)).expect("receive");
            let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
            assert_eq!(bodies, [&b"m0"[..], b"m2"], "round {round}");
        }
        // Attempts used up: m0 and m2 go to the dead-letter topic; m1,
        // unreadable, is logged and does not stop them.
        assert!(
            c.receive(&req(&all, 6000, false))
                .expect("receive")
                .is_empty()
        );
        let dead: Vec<Vec<u8>> = (0..s.queue_max_offset("%DLQ%g", 0))
            .map(|i| {
                s.get("%DLQ%g", 0, i)
                    .expect("read")
                    .expect("dead letter")
                    .body
                    .to_vec()
            })
            .collect();
        assert_eq!(dead, [b"m0".to_vec(), b"m2".to_vec()]);
        assert_eq!(c.in_flight("g", "t", 0), 0, "m1 is dropped, not held");
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn an_offset_past_the_queue_end_after_a_failover_skips_no_new_message() {
        // A promoted slave got the group's offset (5) ahead of the messages
        // it holds (3): the old master served m3 and m4 before they reached it.
        let (_dir, s) = filled(3);
        s.metadata().commit_offset("g", "t", 0, 5);
        // What promotion does before the new master takes writes.
        assert_eq!(s.clamp_consumer_offsets(), 1);
        let c = Consumption::new(s.clone());
        put(&s, 0, "a", "new");
        let got = c.receive(&req(&TagFilter::All, 0, false)).expect("receive");
        let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(bodies, [&b"new"[..]]);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_damaged_queue_entry_does_not_hide_its_message() {
        use std::os::unix::fs::FileExt;
        let (dir, s) = filled(4);
        // Entry 1 of queue 0 reads as never written, as a lost write of the
        // queue file would leave it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("consumequeue/t/0/00000000000000000000"))
            .and_then(|f| f.write_all_at(&[0u8; 20], 20))
            .expect("damage the entry");
        let c = Consumption::new(s.clone());
        let got = c.receive(&req(&TagFilter::All, 0, false)).expect("receive");
        let bodies: Vec<&[u8]> = got.iter().map(|d| &d.record.body[..]).collect();
        assert_eq!(bodies, [&b"m0"[..], b"m1", b"m2", b"m3"]);
        s.shutdown().expect("shutdown");
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
        let (kept, _) = c
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
        let topic = s
            .metadata()
            .get_topic("%DLQ%g")
            .expect("the DLQ is a topic");
        assert_eq!(
            (topic.queue_count, topic.message_type),
            (1, MessageType::Normal)
        );
        assert_eq!(&dlq.body[..], b"y");
        assert_eq!(
            dlq.properties.get(keys::ORIGIN_TOPIC).map(String::as_str),
            Some("t")
        );
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_message_out_of_attempts_stays_in_flight_until_its_dead_letter_is_written() {
        let (_dir, s) = filled(1);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        // "a.b" cannot name a dead-letter topic (the client API refuses it
        // up front): the message must not be lost for it.
        let bad = |now| last_attempt("a.b", &all, now);
        assert_eq!(c.receive(&bad(0)).expect("receive").len(), 1);
        assert!(c.receive(&bad(2000)).expect("receive").is_empty());
        assert_eq!(c.in_flight("a.b", "t", 0), 1, "still in flight");
        // Not consumed past it (a group with no offset starts at the first).
        assert_eq!(
            s.metadata().get_offset("a.b", "t", 0).unwrap_or(0),
            0,
            "the committed offset"
        );
        // Hidden while it waits for another try, then tried again.
        assert!(c.receive(&bad(2500)).expect("receive").is_empty());
        assert_eq!(c.in_flight("a.b", "t", 0), 1);

        // The longest valid group has a valid dead-letter topic: the
        // message moves there and leaves the in-flight state.
        let long = "g".repeat(crate::store::record::MAX_TOPIC_LEN);
        let ok = |now| last_attempt(&long, &all, now);
        assert_eq!(c.receive(&ok(0)).expect("receive").len(), 1);
        assert!(c.receive(&ok(2000)).expect("receive").is_empty());
        assert_eq!(c.in_flight(&long, "t", 0), 0);
        assert_eq!(s.metadata().get_offset(&long, "t", 0), Some(1));
        let dead = s
            .get(&format!("{DLQ_PREFIX}{long}"), 0, 0)
            .expect("read")
            .expect("in the dead-letter topic");
        assert_eq!(&dead.body[..], b"m0");
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_failed_forward_to_the_dead_letter_topic_leaves_the_handle_valid() {
        let (_dir, s) = filled(2);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let bad = ReceiveRequest {
            group: "a.b",
            ..req(&all, 0, false)
        };
        let got = c.receive(&bad).expect("receive");
        assert_eq!(got.len(), 2);
        let h = got[0].handle.to_string();
        // The dead-letter topic "%DLQ%a.b" cannot exist: the forward fails
        // and the message is neither acked nor anywhere else.
        assert!(matches!(
            c.forward_to_dead_letter("a.b", "t", &h, 1),
            Err(HandleError::Unrecorded(_))
        ));
        assert_eq!(c.in_flight("a.b", "t", 0), 2);
        assert!(matches!(
            c.forward_to_dead_letter("a.b", "t", &h, 1),
            Err(HandleError::Unrecorded(_))
        ));
        c.ack("a.b", "t", &h).expect("the handle is still valid");

        // A forward that works acks the delivery; a second one is stale.
        let h = got[1].handle.to_string();
        assert!(
            c.forward_to_dead_letter("g", "t", &h, 1).is_err(),
            "not g's"
        );
        let ok = ReceiveRequest {
            group: "g",
            ..req(&all, 0, false)
        };
        let got = c.receive(&ok).expect("receive");
        let h = got[0].handle.to_string();
        c.forward_to_dead_letter("g", "t", &h, 3).expect("forward");
        assert!(matches!(
            c.forward_to_dead_letter("g", "t", &h, 3),
            Err(HandleError::Stale)
        ));
        assert!(matches!(c.ack("g", "t", &h), Err(HandleError::Stale)));
        let dead = s.get("%DLQ%g", 0, 0).expect("read").expect("dead letter");
        assert_eq!(&dead.body[..], b"m0");
        assert_eq!(s.queue_max_offset("%DLQ%g", 0), 1, "written once");
        s.shutdown().expect("shutdown");
    }

    /// The bodies of `got`.
    fn bodies(got: &[Delivered]) -> Vec<String> {
        got.iter()
            .map(|d| String::from_utf8_lossy(&d.record.body).into_owned())
            .collect()
    }

    /// Their receipt handles.
    fn handles(got: &[Delivered]) -> Vec<String> {
        got.iter().map(|d| d.handle.to_string()).collect()
    }

    #[test]
    fn a_repeated_receive_attempt_gets_its_batch_again() {
        let (_dir, s) = filled(3);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let t0 = 1_000_000;
        // A FIFO push consumer: auto_renew, an attempt id per receive.
        let push = |client, attempt, now| ReceiveRequest {
            renew_for: Some(client),
            attempt: Some((client, attempt)),
            invisible_ms: RENEW_INVISIBLE_MS,
            max_messages: 2,
            max_attempts: 10,
            ..req(&all, now, true)
        };
        let first = c.receive(&push("c1", "a1", t0)).expect("receive");
        assert_eq!(bodies(&first), ["m0", "m1"]);
        // The answer was lost: the same attempt gets the same batch, under
        // the same handles and attempt, while the queue stays held for
        // every other receive.
        let again = c.receive(&push("c1", "a1", t0 + 1_000)).expect("receive");
        assert_eq!(bodies(&again), ["m0", "m1"]);
        assert_eq!(handles(&again), handles(&first));
        assert!(again.iter().all(|d| d.attempt == 1));
        assert_eq!(again[0].invisible_until_ms, t0 + 1_000 + RENEW_INVISIBLE_MS);
        assert!(
            c.receive(&push("c1", "a2", t0 + 1_000))
                .expect("r")
                .is_empty()
        );
        assert!(
            c.receive(&push("c2", "a1", t0 + 1_000))
                .expect("r")
                .is_empty(),
            "another client's attempt of the same id"
        );
        // Once part of it is acked, the attempt gets what is left of it.
        c.ack("g", "t", &first[0].handle.to_string()).expect("ack");
        let rest = c.receive(&push("c1", "a1", t0 + 2_000)).expect("receive");
        assert_eq!(handles(&rest), handles(&first[1..]));
        // Redelivered to someone else, the attempt has nothing left: it
        // is a receive as any other (FIFO: m1 again, then m2).
        let later = t0 + 2_000 + RENEW_INVISIBLE_MS;
        let other = c.receive(&push("c2", "b1", later)).expect("receive");
        assert_eq!(bodies(&other), ["m1"]);
        assert_eq!(other[0].attempt, 2);
        assert!(c.receive(&push("c1", "a1", later)).expect("r").is_empty());
        c.ack("g", "t", &other[0].handle.to_string()).expect("ack");
        let last = c.receive(&push("c1", "a1", later)).expect("receive");
        assert_eq!(bodies(&last), ["m2"]);
        // A consumer's own invisible time (a nack) ends the attempt's hold
        // on it: the handle it was handed is stale.
        c.change_invisible("g", "t", &last[0].handle.to_string(), 20_000, later)
            .expect("change");
        assert!(c.receive(&push("c1", "a1", later)).expect("r").is_empty());
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn deliveries_that_never_reached_the_consumer_are_given_back_unrenewed() {
        let (_dir, s) = filled(3);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let t0 = 1_000_000;
        let push = |attempt, now| ReceiveRequest {
            renew_for: Some("c1"),
            attempt: Some(("c1", attempt)),
            invisible_ms: RENEW_INVISIBLE_MS,
            max_messages: 2,
            max_attempts: 10,
            ..req(&all, now, true)
        };
        // Claimed, then the receive failed (or its answer was dropped).
        let claim = c.claim(&push("a1", t0)).expect("claim");
        assert_eq!(claim.items.len(), 2);
        let entries: Vec<RemoveEntry> = claim.items.iter().map(Claimed::entry).collect();
        c.release("g", "t", &entries, t0 + 10).expect("release");
        assert_eq!(c.renew(t0 + 55_000, |_| true).0, 0, "not renewed");
        // The same attempt gets them back, renewed again.
        let again = c.receive(&push("a1", t0 + 20)).expect("receive");
        assert_eq!(bodies(&again), ["m0", "m1"]);
        assert_eq!(again[0].handle.delivery, claim.items[0].f.delivery);
        assert_eq!(c.renew(t0 + 20 + 55_000, |_| true).0, 2);
        let renewed_until = t0 + 20 + 55_000 + RENEW_INVISIBLE_MS;
        // Given back again: shown again at once, to any receive.
        c.release("g", "t", &entries, renewed_until - 1_000)
            .expect("release");
        let other = c
            .receive(&ReceiveRequest {
                attempt: Some(("c2", "b1")),
                renew_for: None,
                ..push("b1", renewed_until - 1_000)
            })
            .expect("receive");
        assert_eq!(bodies(&other), ["m0", "m1"]);
        assert!(other.iter().all(|d| d.attempt == 2));
        for d in &other {
            c.ack("g", "t", &d.handle.to_string()).expect("ack");
        }

        // A claim whose record cannot be read: left in flight to come back
        // by its invisible time, but not renewed.
        let now = renewed_until;
        let claim = c.claim(&push("a2", now)).expect("claim");
        assert_eq!(claim.items.len(), 1);
        let err = c.complete(
            &push("a2", now),
            claim.items,
            vec![Err(StoreError::InvalidArgument("unreadable".into()))],
        );
        assert!(err.is_err());
        assert_eq!(c.in_flight("g", "t", 0), 1);
        assert_eq!(c.renew(now + 55_000, |_| true).0, 0, "not renewed");
        let back = c.receive(&push("a3", now + RENEW_INVISIBLE_MS)).expect("r");
        assert_eq!(bodies(&back), ["m2"]);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn renewals_and_receive_attempts_survive_a_restart() {
        let (_dir, s) = filled(4);
        let all = TagFilter::All;
        let t0 = 1_000_000;
        let push = |client, attempt, now| ReceiveRequest {
            renew_for: Some(client),
            attempt: Some((client, attempt)),
            invisible_ms: RENEW_INVISIBLE_MS,
            max_messages: 1,
            max_attempts: 10,
            queue_count: 1,
            ..req(&all, now, false)
        };
        let c = Consumption::new(s.clone());
        let m0 = c.receive(&push("c", "a0", t0)).expect("receive");
        let m1 = c.receive(&push("c", "a1", t0)).expect("receive");
        let m2 = c.receive(&push("c", "a2", t0)).expect("receive");
        assert_eq!(
            bodies(&[m0.clone(), m1.clone(), m2.clone()].concat()),
            ["m0", "m1", "m2"]
        );
        // m1's consumer sets its own time (not renewed any more); m2 is
        // renewed once before the restart.
        c.change_invisible("g", "t", &m1[0].handle.to_string(), 50_000, t0)
            .expect("change");
        drop(c);
        // A restart (or a slave promoted with this log): m0 and m2 are still
        // renewed for their client, m1 is not.
        let c = Consumption::new(s.clone());
        assert_eq!(c.renew(t0 + 55_000, |_| true).0, 2);
        // A receive attempt is known after the restart too: m2's answer
        // was lost, and its retry gets m2 under the same handle.
        let c = Consumption::new(s.clone());
        let again = c.receive(&push("c", "a2", t0 + 56_000)).expect("receive");
        assert_eq!(handles(&again), handles(&m2));
        // A client not connected (yet) is not renewed, but keeps its claim
        // to renewal until its delivery runs out.
        let t1 = t0 + 55_000 + RENEW_INVISIBLE_MS - 5_000;
        assert_eq!(c.renew(t1, |_| false).0, 0);
        assert_eq!(c.renew(t1 + 2_000, |_| true).0, 2);
        let c = Consumption::new(s.clone());
        // Renewal still ends RENEW_MAX_MS after the delivery.
        let mut renewed = 0;
        let mut now = t1 + 2_000;
        while now < t0 + RENEW_MAX_MS + RENEW_INVISIBLE_MS {
            now += 5_000;
            renewed += c.renew(now, |_| true).0;
        }
        assert!(renewed > 0);
        assert_eq!(c.renew(now + 5_000, |_| true).0, 0);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_forward_of_a_message_that_is_gone_or_unreadable_ends_its_delivery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let a: Vec<_> = (0..2)
            .map(|i| {
                s.append(NewRecord::new("t", 0, format!("m{i}").into_bytes()))
                    .expect("append")
            })
            .collect();
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let t0 = 1_000_000;
        let got = c
            .receive(&ReceiveRequest {
                renew_for: Some("c"),
                invisible_ms: RENEW_INVISIBLE_MS,
                queue_count: 1,
                ..req(&all, t0, true)
            })
            .expect("receive");
        assert_eq!(got.len(), 2);
        // The FIFO consumer gives up on m0, whose record went bad: nothing
        // to move, and its delivery ends (it would hold the queue).
        crate::testing::corrupt_on_disk(&s, &a[0]);
        c.forward_to_dead_letter("g", "t", &got[0].handle.to_string(), 16)
            .expect("nothing left to move");
        assert_eq!(c.in_flight("g", "t", 0), 1);
        assert_eq!(s.queue_max_offset("%DLQ%g", 0), 0);
        assert!(matches!(
            c.ack("g", "t", &got[0].handle.to_string()),
            Err(HandleError::Stale)
        ));
        // m1's dead letter cannot be written (here: its dead-letter topic's
        // queue file is not a directory): it stays in flight, no longer
        // renewed, so it comes back by its invisible time.
        std::fs::create_dir_all(dir.path().join("consumequeue/%DLQ%g")).expect("mkdir");
        std::fs::write(dir.path().join("consumequeue/%DLQ%g/0"), b"x").expect("block");
        assert!(matches!(
            c.forward_to_dead_letter("g", "t", &got[1].handle.to_string(), 16),
            Err(HandleError::Unrecorded(_))
        ));
        assert_eq!(c.in_flight("g", "t", 0), 1);
        assert_eq!(c.renew(t0 + 55_000, |_| true).0, 0, "not renewed");
        // Nor after a restart.
        let c = Consumption::new(s.clone());
        assert_eq!(c.renew(t0 + 55_000, |_| true).0, 0, "not renewed");
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_message_moving_to_the_dead_letter_topic_is_out_of_its_last_consumers_reach() {
        let (_dir, s) = filled(2);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        // "%DLQ%a.b" cannot be written: the move fails and is retried later.
        let bad = |now| last_attempt("a.b", &all, now);
        let got = c.receive(&bad(0)).expect("receive");
        assert_eq!(got.len(), 2);
        // Their invisible time ran out: the next receive moves them.
        assert!(c.receive(&bad(2_000)).expect("receive").is_empty());
        assert_eq!(c.in_flight("a.b", "t", 0), 2);
        // The late consumer's handles neither ack nor hide them any more.
        assert!(matches!(
            c.ack("a.b", "t", &got[0].handle.to_string()),
            Err(HandleError::Stale)
        ));
        assert!(matches!(
            c.change_invisible("a.b", "t", &got[1].handle.to_string(), 60_000, 2_000),
            Err(HandleError::Stale)
        ));
        // Nor after a restart.
        let c = Consumption::new(s.clone());
        c.load();
        assert_eq!(c.in_flight("a.b", "t", 0), 2);
        assert!(matches!(
            c.ack("a.b", "t", &got[0].handle.to_string()),
            Err(HandleError::Stale)
        ));
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn clients_no_delivery_is_renewed_for_are_forgotten() {
        let mut st = State::default();
        let ids: Vec<u32> = (0..100).map(|i| st.client(&format!("host@{i}"))).collect();
        assert_eq!(ids[99], 100);
        // One delivery still renewed, for the 51st client.
        let mut qs = QueueState::default();
        qs.in_flight.insert(
            0,
            InFlight {
                delivery: 1,
                visible_at_ms: 0,
                attempt: 1,
                event: 0,
                issuer: 0,
                renew_for: ids[50],
                renew_until_ms: 0,
                claim: 0,
            },
        );
        st.queues.insert(("g".into(), "t".into(), 0), qs);
        st.compact_clients();
        assert_eq!(st.clients, ["host@50"]);
        let f = &st.queues[&("g".into(), "t".into(), 0)].in_flight[&0];
        assert_eq!(f.renew_for, 1);
        assert_eq!(st.client("host@50"), 1);
    }

    #[test]
    fn auto_renew_keeps_a_connected_clients_delivery_invisible() {
        let (_dir, s) = filled(3);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let t0 = 1_000_000;
        let renewing = |client, now| ReceiveRequest {
            renew_for: Some(client),
            invisible_ms: RENEW_INVISIBLE_MS,
            max_messages: 1,
            max_attempts: 10,
            ..req(&all, now, false)
        };
        let plain = |now| ReceiveRequest {
            max_messages: 10,
            max_attempts: 10,
            ..req(&all, now, false)
        };
        let bodies = |got: &[Delivered]| -> Vec<String> {
            got.iter()
                .map(|d| String::from_utf8_lossy(&d.record.body).into_owned())
                .collect()
        };
        let m0 = c.receive(&renewing("c1", t0)).expect("receive").remove(0);
        let m1 = c.receive(&renewing("c2", t0)).expect("receive").remove(0);
        let m2 = c.receive(&renewing("c1", t0)).expect("receive").remove(0);
        assert_eq!(bodies(&[m0.clone(), m1, m2.clone()]), ["m0", "m1", "m2"]);
        // m2's consumer sets its own time (a retry back-off): not renewed.
        let (m2h, _) = c
            .change_invisible("g", "t", &m2.handle.to_string(), 50_000, t0 + 1_000)
            .expect("change");
        // Not yet due; then c1's m0 is renewed, c2 (disconnected) is not.
        let live = |id: &str| id == "c1";
        assert_eq!(c.renew(t0 + 30_000, live).0, 0);
        assert_eq!(c.renew(t0 + 55_000, live).0, 1);
        // At t0+61 s m0 is still invisible; m1 and m2 come back.
        let got = c.receive(&plain(t0 + 61_000)).expect("receive");
        assert_eq!(bodies(&got), ["m1", "m2"]);
        assert!(matches!(
            c.ack("g", "t", &m2h.to_string()),
            Err(HandleError::Stale)
        ));
        // m0's original handle still acks at t0+90 s.
        c.ack("g", "t", &m0.handle.to_string())
            .expect("the renewed handle acks");

        c.ack("g", "t", &got[1].handle.to_string())
            .expect("m2 acked");

        // Renewal stops after RENEW_MAX_MS: the message then comes back.
        let t1 = t0 + 70_000;
        let m = c.receive(&renewing("c1", t1)).expect("receive");
        assert_eq!(bodies(&m), ["m1"]);
        let mut now = t1;
        while now < t1 + RENEW_MAX_MS + RENEW_INVISIBLE_MS {
            now += 5_000;
            let _ = c.renew(now, live);
            if now < t1 + RENEW_MAX_MS {
                assert!(
                    c.receive(&plain(now)).expect("receive").is_empty(),
                    "renewed at {now}"
                );
            }
        }
        let got = c.receive(&plain(now)).expect("receive");
        assert_eq!(bodies(&got), ["m1"]);
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn records_read_elsewhere_complete_a_claim() {
        let (_dir, s) = filled(3);
        let c = Consumption::new(s.clone());
        let all = TagFilter::All;
        let mut r = one_queue(&all, 10);
        let claimed = c.claim(&r).expect("claim").items;
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
            c.claim(&r).expect("claim").items
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
        let (_dir, s) = filled(3);
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
    fn in_flight_state_survives_a_restart_under_the_same_handles() {
        let (_dir, s) = filled(4);
        let all = TagFilter::All;
        let r = one_queue(&all, 10);
        let c = Consumption::new(s.clone());
        let got = c.receive(&r).expect("receive");
        assert_eq!(got.len(), 4);
        c.ack("g", "t", &got[0].handle.to_string()).expect("ack");
        c.ack("g", "t", &got[2].handle.to_string()).expect("ack");
        let (extended, _) = c
            .change_invisible("g", "t", &got[3].handle.to_string(), 60_000, 0)
            .expect("change");
        // A new state (a restart, or a slave promoted with this log): m1 and
        // m3 are still in flight under their handles, m0 and m2 stay acked.
        let c = Consumption::new(s.clone());
        c.load();
        assert_eq!(c.in_flight("g", "t", 0), 2);
        assert!(
            c.receive(&ReceiveRequest {
                now_ms: 500,
                ..r.clone()
            })
            .expect("receive")
            .is_empty(),
            "still invisible"
        );
        assert!(matches!(
            c.ack("g", "t", &got[3].handle.to_string()),
            Err(HandleError::Stale)
        ));
        let mut foreign = got[1].handle.clone();
        foreign.store_id = "other".into();
        assert!(matches!(
            c.ack("g", "t", &foreign.to_string()),
            Err(HandleError::Foreign)
        ));
        // m1's invisible time runs out: it comes back as attempt 2; m3 was
        // extended and keeps its new handle.
        let again = c
            .receive(&ReceiveRequest {
                now_ms: 2000,
                ..r.clone()
            })
            .expect("receive");
        assert_eq!(again.len(), 1);
        assert_eq!(&again[0].record.body[..], b"m1");
        assert_eq!(again[0].attempt, 2);
        assert!(again[0].handle.delivery > got[3].handle.delivery);
        c.ack("g", "t", &extended.to_string())
            .expect("extended handle");
        c.ack("g", "t", &again[0].handle.to_string()).expect("ack");
        assert_eq!(s.metadata().get_offset("g", "t", 0), Some(4));
        // Nothing in flight: a replay would start at the end of the log.
        let log_end = s.queue_max_offset(DELIVERY_TOPIC, 0);
        assert_eq!(
            s.metadata().get_offset(DELIVERY_GROUP, DELIVERY_TOPIC, 0),
            Some(log_end)
        );
        let c = Consumption::new(s.clone());
        c.load();
        assert_eq!(c.in_flight("g", "t", 0), 0);
        assert!(
            c.receive(&ReceiveRequest {
                now_ms: 100_000,
                ..r
            })
            .expect("receive")
            .is_empty()
        );
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn old_in_flight_entries_are_logged_again_so_the_replay_stays_short() {
        let (_dir, s) = filled(40);
        let all = TagFilter::All;
        let mut r = one_queue(&all, 1);
        r.invisible_ms = 3_600_000;
        let mut c = Consumption::new(s.clone());
        c.relog_records = 8;
        // m0 is never acked; 39 more are received and acked one by one.
        let pinned = c.receive(&r).expect("receive").remove(0);
        for _ in 0..39 {
            let d = c.receive(&r).expect("receive").remove(0);
            c.ack("g", "t", &d.handle.to_string()).expect("ack");
        }
        let log_end = s.queue_max_offset(DELIVERY_TOPIC, 0);
        let progress = s
            .metadata()
            .get_offset(DELIVERY_GROUP, DELIVERY_TOPIC, 0)
            .expect("progress");
        assert!(
            progress > 0 && log_end - progress <= 2 * 8,
            "the replay starts near the head ({progress} of {log_end})"
        );
        // The replay finds m0 in flight under its original handle.
        let c = Consumption::new(s.clone());
        c.load();
        assert_eq!(c.in_flight("g", "t", 0), 1);
        c.ack("g", "t", &pinned.handle.to_string())
            .expect("the original handle still acks");
        assert_eq!(s.metadata().get_offset("g", "t", 0), Some(40));
        s.shutdown().expect("shutdown");
    }

    #[test]
    fn a_lost_delivery_log_falls_back_to_the_committed_offset() {
        let (_dir, s) = filled(3);
        let all = TagFilter::All;
        let r = one_queue(&all, 10);
        let c = Consumption::new(s.clone());
        let got = c.receive(&r).expect("receive");
        c.ack("g", "t", &got[0].handle.to_string()).expect("ack");
        // A replay that starts past every delivery record (as when retention
        // removed them) knows nothing in flight: the group resumes from its
        // committed offset, so m1 and m2 come back and nothing is skipped.
        let end = s.queue_max_offset(DELIVERY_TOPIC, 0);
        s.metadata()
            .commit_offset(DELIVERY_GROUP, DELIVERY_TOPIC, 0, end);
        let c = Consumption::new(s.clone());
        let again = c.receive(&r).expect("receive");
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

    /// Where a message stands in the model of one group's consumption.
    #[derive(Clone, Debug, PartialEq)]
    enum Seen {
        New,
        InFlight {
            handle: String,
            visible_at: i64,
            attempt: u32,
        },
        Acked,
        Dead,
    }

    /// Whether a refusal of `handle`'s ack is allowed: only a message that
    /// used up its attempts and whose invisible time ran out may have been
    /// moved to the dead-letter topic by a receive.
    fn may_be_dead(seen: &Seen, now: i64, max_attempts: u32) -> bool {
        matches!(seen, Seen::InFlight { visible_at, attempt, .. } if *visible_at <= now && *attempt >= max_attempts)
    }

    /// A message of the model in flight, chosen at random: its key, handle
    /// and attempt.
    fn pick_in_flight(
        msgs: &BTreeMap<(u32, u64), (String, Seen)>,
        rng: &mut impl rand::Rng,
    ) -> Option<((u32, u64), String, u32)> {
        let flying: Vec<_> = msgs
            .iter()
            .filter_map(|(k, (_, m))| match m {
                Seen::InFlight {
                    handle, attempt, ..
                } => Some((*k, handle.clone(), *attempt)),
                _ => None,
            })
            .collect();
        if flying.is_empty() {
            return None;
        }
        let i = rng.random_range(0..flying.len());
        flying.into_iter().nth(i)
    }

    #[test]
    fn random_consumption_keeps_its_promises() {
        for fifo in [false, true] {
            consumption_against_a_model(fifo);
        }
    }

    /// Sends, receives, acks (with current and stale handles), invisible
    /// time changes, clock steps and restarts in a random order; after
    /// each, the promises hold: nothing acked or dead-lettered comes back,
    /// nothing comes back before its invisible time ran out, attempts count
    /// up by one, only the newest handle of a delivery acks it, a FIFO
    /// queue hands out in order one batch at a time, and in the end every
    /// message was acked or is in the dead-letter topic, exactly once.
    fn consumption_against_a_model(fifo: bool) {
        use rand::Rng;
        let mut rng = crate::testing::seeded_rng();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = store(dir.path());
        // Idle queue states are dropped after a short while, so the model
        // also checks that dropping and rebuilding them changes nothing.
        let evict_idle_ms = 1_500;
        let mut c = Consumption::new(s.clone());
        c.evict_idle_ms = evict_idle_ms;
        let all = TagFilter::All;
        let max_attempts = 3;
        let mut msgs: BTreeMap<(u32, u64), (String, Seen)> = BTreeMap::new();
        let mut stale: Vec<String> = Vec::new();
        let (mut now, mut sent) = (0i64, 0u64);
        let receive = |c: &Consumption,
                       msgs: &mut BTreeMap<(u32, u64), (String, Seen)>,
                       stale: &mut Vec<String>,
                       now: i64,
                       max: usize,
                       invisible_ms: i64,
                       step: usize| {
            let got = c
                .receive(&ReceiveRequest {
                    group: "g",
                    topic: "t",
                    queue_count: 2,
                    max_messages: max,
                    invisible_ms,
                    filter: &all,
                    fifo,
                    max_attempts,
                    now_ms: now,
                    renew_for: None,
                    attempt: None,
                })
                .expect("receive");
            let keys: Vec<(u32, u64)> = got
                .iter()
                .map(|d| (d.record.queue_id, d.record.queue_offset))
                .collect();
            for d in &got {
                let key = (d.record.queue_id, d.record.queue_offset);
                let (body, seen) = msgs.get_mut(&key).expect("a message that was sent");
                assert_eq!(&d.record.body[..], body.as_bytes(), "step {step}");
                let attempt = match seen {
                    Seen::New => 1,
                    Seen::InFlight {
                        visible_at,
                        attempt,
                        handle,
                    } => {
                        assert!(
                            *visible_at <= now,
                            "step {step}: {key:?} handed out while invisible"
                        );
                        assert!(
                            *attempt < max_attempts,
                            "step {step}: {key:?} past its attempts"
                        );
                        stale.push(handle.clone());
                        *attempt + 1
                    }
                    other => panic!("step {step}: {key:?} handed out again when {other:?}"),
                };
                assert_eq!(d.attempt, attempt, "step {step}: {key:?} attempt");
                if fifo {
                    // Everything before it in its queue is settled (or
                    // was just moved to the dead-letter topic) or in this
                    // same batch.
                    for (k, (_, before)) in msgs.range((key.0, 0)..key) {
                        assert!(
                            matches!(before, Seen::Acked | Seen::Dead)
                                || may_be_dead(before, now, max_attempts)
                                || keys.contains(k),
                            "step {step}: FIFO {key:?} handed out while {k:?} is {before:?}"
                        );
                    }
                }
            }
            for d in got {
                let key = (d.record.queue_id, d.record.queue_offset);
                msgs.get_mut(&key).expect("sent").1 = Seen::InFlight {
                    handle: d.handle.to_string(),
                    visible_at: d.invisible_until_ms,
                    attempt: d.attempt,
                };
            }
        };
        for step in 0..500 {
            match rng.random_range(0..100) {
                0..20 => {
                    for _ in 0..rng.random_range(1..4) {
                        let q = rng.random_range(0..2);
                        let body = format!("m{sent}");
                        sent += 1;
                        let a = s
                            .append(NewRecord::new("t", q, body.clone().into_bytes()))
                            .expect("append");
                        msgs.insert((q, a.queue_offset), (body, Seen::New));
                    }
                }
                20..45 => {
                    let max = rng.random_range(1..8);
                    let invisible_ms = rng.random_range(100..3_000);
                    receive(&c, &mut msgs, &mut stale, now, max, invisible_ms, step);
                }
                45..65 => {
                    let Some((key, handle, _)) = pick_in_flight(&msgs, &mut rng) else {
                        continue;
                    };
                    let seen = &mut msgs.get_mut(&key).expect("in flight").1;
                    match c.ack("g", "t", &handle) {
                        Ok(_) => *seen = Seen::Acked,
                        Err(HandleError::Stale) if may_be_dead(seen, now, max_attempts) => {
                            *seen = Seen::Dead
                        }
                        Err(e) => panic!("step {step}: ack of {key:?} ({seen:?}): {e}"),
                    }
                    stale.push(handle);
                }
                65..72 => {
                    if stale.is_empty() {
                        continue;
                    }
                    let h = &stale[rng.random_range(0..stale.len())];
                    assert!(
                        matches!(c.ack("g", "t", h), Err(HandleError::Stale)),
                        "step {step}: a stale handle acked"
                    );
                }
                72..80 => {
                    let Some((key, handle, attempt)) = pick_in_flight(&msgs, &mut rng) else {
                        continue;
                    };
                    let seen = &mut msgs.get_mut(&key).expect("in flight").1;
                    let ms = rng.random_range(100..5_000);
                    match c.change_invisible("g", "t", &handle, ms, now) {
                        Ok((h, _)) => {
                            *seen = Seen::InFlight {
                                handle: h.to_string(),
                                visible_at: now + ms,
                                attempt,
                            }
                        }
                        Err(HandleError::Stale) if may_be_dead(seen, now, max_attempts) => {
                            *seen = Seen::Dead
                        }
                        Err(e) => panic!("step {step}: change of {key:?} ({seen:?}): {e}"),
                    }
                    stale.push(handle);
                }
                80..92 => now += rng.random_range(0..2_000),
                92..96 => {
                    c = Consumption::new(s.clone());
                    c.evict_idle_ms = evict_idle_ms;
                    c.load();
                }
                _ => {
                    s.shutdown().expect("shutdown");
                    s = store(dir.path());
                    c = Consumption::new(s.clone());
                    c.evict_idle_ms = evict_idle_ms;
                    c.load();
                }
            }
        }
        // Drain: let every invisible time run out, take and ack everything.
        for round in 0.. {
            assert!(round < 100, "the queues never drained");
            now += 10_000;
            receive(&c, &mut msgs, &mut stale, now, 64, 1_000, 500 + round);
            let flying: Vec<((u32, u64), String)> = msgs
                .iter()
                .filter_map(|(k, (_, m))| match m {
                    Seen::InFlight { handle, .. } => Some((*k, handle.clone())),
                    _ => None,
                })
                .collect();
            if flying.is_empty() && msgs.values().all(|(_, m)| *m != Seen::New) {
                break;
            }
            // Ack only those not yet at their last attempt: the others go
            // to the dead-letter topic when their invisible time runs out.
            for (key, handle) in flying {
                let seen = &mut msgs.get_mut(&key).expect("in flight").1;
                if may_be_dead(seen, now + 10_000, max_attempts) {
                    continue;
                }
                c.ack("g", "t", &handle).expect("ack while draining");
                *seen = Seen::Acked;
            }
            // Messages at their last attempt become dead once a receive
            // passes them after their invisible time.
            for (_, m) in msgs.values_mut() {
                if may_be_dead(m, now, max_attempts) {
                    *m = Seen::Dead;
                }
            }
        }
        let dead: Vec<&str> = msgs
            .values()
            .filter(|(_, m)| *m == Seen::Dead)
            .map(|(b, _)| b.as_str())
            .collect();
        let mut in_dlq: Vec<String> = (0..s.queue_max_offset("%DLQ%g", 0))
            .map(|i| {
                let r = s.get("%DLQ%g", 0, i).expect("read").expect("present");
                String::from_utf8(r.body.to_vec()).expect("utf-8")
            })
            .collect();
        in_dlq.sort();
        let mut dead: Vec<String> = dead.into_iter().map(str::to_owned).collect();
        dead.sort();
        assert_eq!(in_dlq, dead, "fifo {fifo}: the dead-letter topic");
        assert_eq!(c.in_flight("g", "t", 0) + c.in_flight("g", "t", 1), 0);
        s.shutdown().expect("shutdown");
    }

    /// A receive attempt's tag is made once and found again; its key is
    /// one allocation shared by the attempt table and its index, and reads
    /// back as "client id\nattempt id".
    #[test]
    fn a_receive_attempt_key_is_shared_by_both_tables() {
        let mut st = State::default();
        assert_eq!(st.find_claim("c1", "a1"), None);
        let t1 = st.claim_tag("c1", "a1");
        let t2 = st.claim_tag("c1", "a2");
        let t3 = st.claim_tag("c2", "a1");
        assert_eq!((t1, t2, t3), (1, 2, 3));
        assert_eq!(st.claim_tag("c1", "a1"), t1, "made once");
        assert_eq!(st.find_claim("c1", "a2"), Some(t2));
        assert_eq!(st.find_claim("c2", "a2"), None);
        assert_eq!(st.claims.len(), 3);
        assert_eq!(st.claim_index.len(), 3);
        for (i, key) in (1..).zip(&st.claims) {
            let (indexed, &tag) = st.claim_index.get_key_value(&**key).expect("indexed");
            assert_eq!(tag, i);
            assert!(Arc::ptr_eq(indexed, key), "one allocation for both");
        }
        assert_eq!(&*st.claims[1], "c1\na2");
        let tables = st.tables();
        assert_eq!(tables.claims[2].split_once('\n'), Some(("c2", "a1")));
    }
}
