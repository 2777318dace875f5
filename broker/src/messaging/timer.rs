//! Delayed messages: a durable timer built on the commit log.
//!
//! A message due in the future is stored in the system topic
//! `%SYS_DELAY%` (queue 0) with its real topic, queue and delivery time in
//! its properties, so it is as durable (and replicated) as any message. The
//! timer keeps the pending ones in memory ordered by due time, and when some
//! are due writes them to their real topics, where consumers see them, in
//! one append together with an op record in [`DELAY_OP_TOPIC`] naming their
//! delay-queue offsets (the messages first, as a transaction's commit). The
//! op records are what says a delayed message was delivered: a restart, a
//! promoted slave, or a broker whose log was cut at a fork rebuilds the
//! delivered set from them, so a delivery is made once, and one cut from
//! the log (with its op) is made again. Only a crash tearing the append
//! between a message and its op record can repeat a delivery (at least
//! once, never lost).
//!
//! Two progress marks say where to start: the lowest delay-queue offset not
//! yet delivered (everything below was), and the lowest op record about a
//! delay offset at or above it; a restart reads the ops from the second and
//! the delay queue from the first. Each op record carries the marks as of
//! its append, and a restart takes them from the last op record in the log,
//! so they always match the log, whatever part of it was cut or lost. They
//! are also kept like a consumer group's offsets, which a store written
//! before the op records existed has alone: it is read from there, as it
//! always was.
//!
//! Those stored marks are saved and replicated apart from the log, so they
//! may count deliveries the log no longer holds (the unflushed tail lost in
//! a power loss under ASYNC_FLUSH; a promoted slave that got its master's
//! metadata but not the deliveries). Where the log still holds an op record
//! its marks are used, but where every op record is gone the stored marks
//! cannot be told from an old store's. So before its first op record a
//! master flags the store, in the same stored offsets (one atomic file, one
//! replicated snapshot, so no copy holds marks advanced by op records
//! without the flag): the offset of [`OPS_SINCE_GROUP`] on [`DELAY_TOPIC`]
//! is the delay-queue offset below which everything was delivered without
//! op records (by an earlier release). A flagged store with no readable op
//! record starts from there: what its lost op records delivered is
//! delivered again (at least once), never skipped.
//!
//! The timer works only on a writable master, with a state built for the
//! current role: after every role change (promotion, following another
//! master, whose stream may cut this log at the fork point or discard it)
//! it is rebuilt from the log as after a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::arrivals::Arrivals;
use crate::store::{MessageStore, NewRecord, StoreError, keys, now_ms, record::flags};
use crate::write_path::{WriteError, WritePath};

/// System topic holding messages until they are due.
pub const DELAY_TOPIC: &str = "%SYS_DELAY%";
/// System topic of the op records naming the delay-queue offsets delivered.
pub const DELAY_OP_TOPIC: &str = "%SYS_DELAY_OP%";
/// The timer's progress is stored as this group's offsets on [`DELAY_TOPIC`]
/// and [`DELAY_OP_TOPIC`].
const TIMER_GROUP: &str = "%SYS_TIMER%";
/// Set before the first op record: this group's offset on [`DELAY_TOPIC`]
/// (queue 0) is the delay-queue offset below which every message was
/// delivered before op records were written (see the module doc).
const OPS_SINCE_GROUP: &str = "%SYS_TIMER_OPS_SINCE%";
/// How often the timer looks for due messages (delivery within this of due).
pub const TICK: Duration = Duration::from_millis(100);
/// Most messages delivered in one append.
const BATCH_MAX: usize = 256;
/// Op record property: every delay-queue offset below this was delivered
/// before the op record's append.
const DONE_BELOW: &str = "__DELAY_DONE_BELOW";
/// Op record property: every op record about a delay-queue offset at or
/// above [`DONE_BELOW`] is at this op-queue offset or later.
const OPS_FROM: &str = "__DELAY_OPS_FROM";
/// The two progress marks an op record carries, as [`super::op_marks`]
/// reads them.
const MARKS: [&str; 2] = [DONE_BELOW, OPS_FROM];

/// Delivered delay-queue offsets above the progress, as ranges, each with
/// the lowest op-queue offset that may record one of its offsets (none for
/// offsets settled without an op: removed or unreadable).
#[derive(Default)]
struct Done {
    /// Start -> (end, op floor), disjoint and never adjacent.
    ranges: BTreeMap<u64, (u64, Option<u64>)>,
    /// How many ranges have each op floor.
    floors: BTreeMap<u64, usize>,
}

impl Done {
    fn contains(&self, off: u64) -> bool {
        self.ranges
            .range(..=off)
            .next_back()
            .is_some_and(|(_, (end, _))| off < *end)
    }

    fn insert(&mut self, off: u64, floor: Option<u64>) {
        if self.contains(off) {
            return;
        }
        let (mut start, mut end, mut floor) = (off, off + 1, floor);
        if let Some((&s, &(e, f))) = self.ranges.range(..off).next_back()
            && e == off
        {
            self.remove(s);
            start = s;
            floor = lowest(floor, f);
        }
        if let Some(&(e, f)) = self.ranges.get(&end) {
            self.remove(end);
            end = e;
            floor = lowest(floor, f);
        }
        if let Some(f) = floor {
            *self.floors.entry(f).or_default() += 1;
        }
        self.ranges.insert(start, (end, floor));
    }

    /// Removes the range starting at `start`; returns its end.
    fn remove(&mut self, start: u64) -> Option<u64> {
        let (end, floor) = self.ranges.remove(&start)?;
        if let Some(f) = floor
            && let Some(n) = self.floors.get_mut(&f)
        {
            *n -= 1;
            if *n == 0 {
                self.floors.remove(&f);
            }
        }
        Some(end)
    }

    /// The lowest op-queue offset a restart must read from for these.
    fn op_floor(&self) -> Option<u64> {
        self.floors.keys().next().copied()
    }
}

fn lowest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The body of an op record naming delay-queue offsets `offs`: ascending
/// runs, `a-b` (inclusive) or `a`, separated by commas.
fn encode_offsets(offs: &[u64]) -> String {
    let mut sorted = offs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            out.push_str(&sorted[i].to_string());
        } else {
            out.push_str(&format!("{}-{}", sorted[i], sorted[j]));
        }
        i = j + 1;
    }
    out
}

/// The offsets an op record's body names; `None` if it is not one the
/// timer wrote (a range longer than a batch included).
fn decode_offsets(body: &[u8]) -> Option<Vec<u64>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let a = part.parse::<u64>().ok()?;
                (a, a)
            }
        };
        if b < a || b - a >= BATCH_MAX as u64 || out.len() > BATCH_MAX {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

#[derive(Default)]
struct State {
    /// Role generation of the replication manager this state was built for
    /// (`None`: not built for one yet).
    basis: Option<u64>,
    /// Next delay-queue offset not yet loaded.
    loaded_to: u64,
    /// (due ms, delay-queue offset) of messages not yet delivered.
    pending: BTreeSet<(i64, u64)>,
    /// Due time of every pending delay-queue offset.
    due_of: HashMap<u64, i64>,
    /// Delivered offsets at or above `committed`.
    done: Done,
    /// Every delay-queue offset below this was delivered.
    committed: u64,
    /// Next op-queue offset not yet loaded.
    op_loaded_to: u64,
}

impl super::RoleBound for State {
    fn basis_mut(&mut self) -> &mut Option<u64> {
        &mut self.basis
    }
}

/// A batch of due messages being delivered in one append.
#[derive(Default)]
struct Batch {
    records: Vec<NewRecord>,
    offsets: Vec<u64>,
    topics: BTreeSet<String>,
    bytes: usize,
}

/// The timer of delayed messages.
pub struct Timer {
    store: MessageStore,
    state: Mutex<State>,
    /// One delivery round at a time: two would write the same messages.
    delivering: tokio::sync::Mutex<()>,
}

impl Timer {
    pub fn new(store: MessageStore) -> Arc<Self> {
        let state = Mutex::new(Self::initial_state(&store));
        Arc::new(Self {
            store,
            state,
            delivering: tokio::sync::Mutex::new(()),
        })
    }

    /// Forgets what is pending and reloads from the stored progress and
    /// the op records (as the next delivery round after a role change
    /// does anyway).
    pub fn reset(&self) {
        *self.state.lock() = Self::initial_state(&self.store);
    }

    fn initial_state(store: &MessageStore) -> State {
        let (min, max) = super::queue_bounds(store, DELAY_TOPIC);
        let (op_min, op_max) = super::queue_bounds(store, DELAY_OP_TOPIC);
        let meta = store.metadata();
        let (committed, op_committed) = match (
            Self::last_op_marks(store, op_min, op_max),
            meta.get_offset(OPS_SINCE_GROUP, DELAY_TOPIC, 0),
        ) {
            (Some(marks), _) => marks,
            // Op records were written here, and none is left (lost with
            // the tail, cut, never replicated here): the stored marks may
            // count their deliveries. Everything after what was delivered
            // without op records is read again.
            (None, Some(since)) => (since, op_min),
            // A store from before the op records: its stored marks (without
            // an op progress, the op queue from its start).
            (None, None) => (
                meta.get_offset(TIMER_GROUP, DELAY_TOPIC, 0).unwrap_or(min),
                meta.get_offset(TIMER_GROUP, DELAY_OP_TOPIC, 0)
                    .unwrap_or(op_min),
            ),
        };
        let committed = committed.min(max).max(min);
        let op_committed = op_committed.min(op_max).max(op_min);
        State {
            loaded_to: committed,
            committed,
            op_loaded_to: op_committed,
            ..State::default()
        }
    }

    /// The progress marks the last readable op record in the log carries:
    /// those of the log up to it, whatever became of the log after it (cut
    /// at a fork, lost in a crash) and of the stored marks. An unreadable
    /// op record loses its own marks only: the ones before it hold for the
    /// log up to there, and the ops after them are read again.
    fn last_op_marks(store: &MessageStore, op_min: u64, op_max: u64) -> Option<(u64, u64)> {
        super::op_marks_backwards(store, DELAY_OP_TOPIC, (op_min, op_max), MARKS)
            .flatten()
            .next()
    }

    /// The marks of the op record at `off`, if it is readable and has them.
    fn op_marks(store: &MessageStore, off: u64) -> Option<(u64, u64)> {
        super::op_marks(store, DELAY_OP_TOPIC, off, MARKS).flatten()
    }

    /// Flags the store as one whose timer writes op records, unless it is
    /// already (see the module doc). Called on a writable master before it
    /// delivers anything, with `st` just rebuilt from the log.
    fn flag_op_records(&self, st: &State) {
        let meta = self.store.metadata();
        if meta.get_offset(OPS_SINCE_GROUP, DELAY_TOPIC, 0).is_some() {
            return;
        }
        // With op records in the log (written by a release that set no
        // flag), the first one's delay mark: everything below it was
        // delivered before it, and what it or a later op delivered is
        // above. Without: the marks were stored without op records, the
        // state starts from them, and they are the old deliveries.
        let (op_min, op_max) = super::queue_bounds(&self.store, DELAY_OP_TOPIC);
        let since = (op_min..op_max)
            .find_map(|off| Self::op_marks(&self.store, off))
            .map_or(st.committed, |(done_below, _)| done_below);
        meta.commit_offset(OPS_SINCE_GROUP, DELAY_TOPIC, 0, since);
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

    /// Delivers every message due at `now`; returns how many. An error
    /// after some were written (they were not confirmed in time) still
    /// counts them as delivered: they are not written again.
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
        let _round = self.delivering.lock().await;
        // Only a writable master delivers; a slave keeps no state (its log
        // may yet be cut at a fork), and rebuilds it once promoted.
        let (basis, due): (u64, Vec<(i64, u64)>) = {
            let Ok((mut st, basis, rebuilt)) =
                super::lock_for_role(write, &self.state, || Self::initial_state(&self.store))
            else {
                return Ok(0);
            };
            if rebuilt {
                self.flag_op_records(&st);
            }
            self.load(&mut st);
            let due = st
                .pending
                .iter()
                .take_while(|(t, _)| *t <= now)
                .copied()
                .collect();
            (basis, due)
        };
        let max_bytes = (self.store.config().segment_size / 4) as usize;
        let mut delivered = 0;
        let mut unread = None;
        let mut unconfirmed = None;
        let mut batch = Batch::default();
        for key in due {
            let held = match self.store.get(DELAY_TOPIC, 0, key.1) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.settle(basis, &[key.1], None);
                    continue;
                }
                // Corrupt: it will never be readable; skipped, as `load`
                // does, so it does not hold up the messages due after it.
                Err(e @ (StoreError::Corrupt { .. } | StoreError::DamagedIndex { .. })) => {
                    tracing::error!(error = %e, offset = key.1, "unreadable delayed message skipped");
                    self.settle(basis, &[key.1], None);
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
            let len = rec.encoded_len();
            if !batch.records.is_empty()
                && (batch.records.len() >= BATCH_MAX || batch.bytes + len > max_bytes)
            {
                let full = std::mem::take(&mut batch);
                delivered += self
                    .write_batch(write, basis, full, arrivals, &mut unconfirmed)
                    .await?;
            }
            batch.bytes += len;
            if !batch.topics.contains(&rec.topic) {
                batch.topics.insert(rec.topic.clone());
            }
            batch.offsets.push(key.1);
            batch.records.push(rec);
        }
        if !batch.records.is_empty() {
            delivered += self
                .write_batch(write, basis, batch, arrivals, &mut unconfirmed)
                .await?;
        }
        match (unconfirmed, unread) {
            (Some(e), _) => Err(e),
            (None, Some(e)) if delivered == 0 => Err(e),
            _ => Ok(delivered),
        }
    }

    /// Writes `batch` to its topics with the op record naming its delay
    /// offsets, in one append; returns how many messages it delivered. A
    /// write that was appended but not confirmed in time (flush or
    /// replication timeout) counts as delivered: consumers may already see
    /// it, and its op record tells a restart so. Otherwise nothing was
    /// written, and the batch is tried again next time.
    async fn write_batch(
        &self,
        write: &WritePath,
        basis: u64,
        batch: Batch,
        arrivals: Option<&Arrivals>,
        unconfirmed: &mut Option<String>,
    ) -> Result<usize, String> {
        let Batch {
            mut records,
            offsets,
            topics,
            ..
        } = batch;
        // Only this timer appends op records, one round at a time: the op
        // lands at the op queue's end or later.
        let floor = self.store.queue_max_offset(DELAY_OP_TOPIC, 0);
        let (done_below, ops_from) = {
            let st = self.state.lock();
            if st.basis != Some(basis) {
                return Err("the role changed; delivering in the next round".into());
            }
            let from = st.done.op_floor().map_or(floor, |f| f.min(floor));
            (st.committed, from)
        };
        let mut op = NewRecord::new(DELAY_OP_TOPIC, 0, encode_offsets(&offsets))
            .with_property(DONE_BELOW, done_below.to_string())
            .with_property(OPS_FROM, ops_from.to_string());
        op.flags = flags::SYSTEM;
        records.push(op);
        let floor = match write.write(records).await {
            Ok(appended) => appended.last().map_or(floor, |a| a.queue_offset),
            Err(e @ (WriteError::FlushTimeout(_) | WriteError::ReplicationTimeout(_))) => {
                tracing::warn!(error = %e, messages = offsets.len(), "delayed messages written but not confirmed in time; they are not written again");
                unconfirmed.get_or_insert(e.to_string());
                floor
            }
            Err(e) => return Err(e.to_string()),
        };
        self.settle(basis, &offsets, Some(floor));
        if let Some(a) = arrivals {
            for topic in &topics {
                a.notify(topic);
            }
        }
        Ok(offsets.len())
    }

    /// Records that the delay-queue offsets `offs` were delivered (their op
    /// record at `floor` or later; `None`: nothing to deliver there), unless
    /// the state was rebuilt since `basis` (it then read the log instead).
    fn settle(&self, basis: u64, offs: &[u64], floor: Option<u64>) {
        let mut st = self.state.lock();
        if st.basis != Some(basis) {
            return;
        }
        for &off in offs {
            Self::mark(&mut st, off, floor);
        }
        self.store_progress(&mut st);
    }

    /// Counts delay-queue offset `off` as delivered and moves the progress
    /// over every delivered offset at its front.
    fn mark(st: &mut State, off: u64, floor: Option<u64>) {
        if off < st.committed {
            return;
        }
        if let Some(due) = st.due_of.remove(&off) {
            st.pending.remove(&(due, off));
        }
        st.done.insert(off, floor);
        while let Some(end) = st.done.remove(st.committed) {
            st.committed = end;
        }
    }

    /// Stores the progress marks that differ from the stored ones (which
    /// may be those of a log since cut or lost): the delay-queue one first,
    /// so a metadata snapshot taken in between holds an op progress low
    /// enough for the delay progress it holds.
    fn store_progress(&self, st: &mut State) {
        let meta = self.store.metadata();
        if meta.get_offset(TIMER_GROUP, DELAY_TOPIC, 0) != Some(st.committed) {
            meta.commit_offset(TIMER_GROUP, DELAY_TOPIC, 0, st.committed);
        }
        let op_low = st.done.op_floor().unwrap_or(st.op_loaded_to);
        if meta.get_offset(TIMER_GROUP, DELAY_OP_TOPIC, 0) != Some(op_low) {
            meta.commit_offset(TIMER_GROUP, DELAY_OP_TOPIC, 0, op_low);
        }
    }

    /// Loads the op records and the delay-queue entries appended since the
    /// last look, the ops first: an entry an op names is not pending.
    fn load(&self, st: &mut State) {
        let max = self.store.queue_max_offset(DELAY_TOPIC, 0);
        let mut next_op = st.op_loaded_to;
        for (off, op) in self.store.read_on(DELAY_OP_TOPIC, 0, &mut next_op) {
            match op {
                Ok(Some(r)) => match decode_offsets(&r.body) {
                    Some(offs) => {
                        for d in offs.into_iter().filter(|&d| d < max) {
                            Self::mark(st, d, Some(off));
                        }
                    }
                    None => {
                        tracing::error!(
                            offset = off,
                            "delay op record in an unknown format skipped"
                        );
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable delay op record skipped; the deliveries it records may be made again");
                }
            }
        }
        st.op_loaded_to = next_op;
        st.loaded_to = st.loaded_to.max(st.committed);
        while st.loaded_to < max {
            let off = st.loaded_to;
            st.loaded_to += 1;
            if off < st.committed || st.done.contains(off) {
                continue;
            }
            match self.store.get(DELAY_TOPIC, 0, off) {
                Ok(Some(r)) => {
                    let due = r
                        .properties
                        .get(keys::DELIVERY_TIME)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    st.pending.insert((due, off));
                    st.due_of.insert(off, due);
                }
                // Removed by retention, or unreadable: nothing to deliver,
                // and the progress must not stop there (it would hold every
                // later delivered offset in memory and read their ops
                // again after every restart).
                Ok(None) => Self::mark(st, off, None),
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable delayed message skipped");
                    Self::mark(st, off, None);
                }
            }
        }
        self.store_progress(st);
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

    /// Random due times, delivery rounds, restarts, and power losses that
    /// take the log back to where it ended after one of the last rounds
    /// (the stored marks, saved apart from the log, staying ahead).
    #[tokio::test]
    async fn delayed_messages_come_due_never_early_and_survive_restarts() {
        let mut rng = crate::testing::seeded_rng();
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, mut write) = crate::testing::lone_master(dir.path());
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
        // Where the log ended after each round (the holds first): where a
        // power loss may take it back to, the stored marks staying ahead.
        let mut ends = vec![store.max_offset()];
        let mut power_losses = 0;
        let mut timer = Timer::new(store.clone());
        let mut now = base - 1_000;
        while now < base + 12_000 {
            now += rng.random_range(0..700);
            match rng.random_range(0..10) {
                0 => timer = Timer::new(store.clone()),
                1 => {
                    let keep = ends[rng.random_range(ends.len().saturating_sub(6)..ends.len())];
                    ends.retain(|&e| e <= keep);
                    (store, write) = crate::testing::power_loss(dir.path(), &store, keep);
                    timer = Timer::new(store.clone());
                    power_losses += 1;
                }
                _ => {}
            }
            timer.deliver_due(&write, now).await.expect("deliver");
            ends.push(store.max_offset());
            let seen = delivered(&store, "t");
            for (id, &at) in &due {
                let copies = seen.get(id).copied().unwrap_or(0);
                if at <= now {
                    assert!(copies >= 1, "{id} due at {at} not delivered by {now}");
                } else {
                    assert_eq!(copies, 0, "{id} due at {at} delivered by {now}");
                }
                // Once, restarts or not: the op records say what was, and
                // a power loss takes a delivery with its op record.
                assert!(copies <= 1, "{id} delivered twice");
            }
        }
        eprintln!("{power_losses} power losses");
        // Everything delivered: a restart delivers nothing again, and the
        // progress covers the delay queue (and the op queue, once the last
        // op record was read back).
        let before = delivered(&store, "t");
        let timer = Timer::new(store.clone());
        assert_eq!(timer.deliver_due(&write, now).await.expect("deliver"), 0);
        assert_eq!(delivered(&store, "t"), before);
        assert_eq!(before.len(), 80, "every message delivered");
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(80)
        );
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_OP_TOPIC, 0),
            Some(store.queue_max_offset(DELAY_OP_TOPIC, 0))
        );
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

    /// A lone master whose SYNC writes are never confirmed (no slave): each
    /// write is appended, then fails after `sync_timeout`.
    fn unconfirmed_master(dir: &std::path::Path) -> (MessageStore, WritePath) {
        crate::testing::lone_master_with(
            dir,
            crate::replication::ReplicationMode::Sync,
            Duration::from_millis(50),
        )
    }

    /// The delivery round, at the current time, of a timer started afresh
    /// on `store` (as after a restart or at the first start).
    async fn fresh_round(store: &MessageStore, write: &WritePath) -> Result<usize, String> {
        Timer::new(store.clone()).deliver_due(write, now_ms()).await
    }

    /// Checks that `t` holds exactly the messages `ids`, each once.
    fn assert_delivered_once(store: &MessageStore, ids: &[&str]) {
        let seen = delivered(store, "t");
        let want: HashMap<String, u32> = ids.iter().map(|id| (id.to_string(), 1)).collect();
        assert_eq!(seen, want);
    }

    /// Holds a message per id in `t`, each in its own append, all due.
    async fn hold_due(write: &WritePath, ids: &[&str]) {
        let past = now_ms() - 1_000;
        for id in ids {
            write.write(vec![held(id, past)]).await.expect("hold");
        }
    }

    fn held(id: &str, due: i64) -> NewRecord {
        Timer::hold(
            NewRecord::new("t", 0, id.as_bytes().to_vec()).with_property(keys::MESSAGE_ID, id),
            due,
        )
    }

    /// Review s17 finding 1: the stored progress stops at the oldest
    /// message still pending, and a restart (or a promoted slave) used to
    /// deliver again everything delivered above it.
    #[tokio::test]
    async fn a_restart_does_not_repeat_deliveries_made_past_a_message_still_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let now = now_ms();
        write
            .write(vec![held("late", now + 3_600_000)])
            .await
            .expect("hold");
        let soon: Vec<NewRecord> = (0..100).map(|i| held(&format!("m{i}"), now + 10)).collect();
        write.write(soon).await.expect("hold");
        let timer = Timer::new(store.clone());
        assert_eq!(timer.deliver_due(&write, now + 1_000).await, Ok(100));
        for round in 0..3 {
            let timer = Timer::new(store.clone());
            assert_eq!(
                timer.deliver_due(&write, now + 2_000).await,
                Ok(0),
                "restart {round}"
            );
        }
        let seen = delivered(&store, "t");
        assert_eq!(seen.len(), 100);
        assert!(seen.values().all(|&n| n == 1), "each delivered once");
        assert_eq!(
            store.queue_max_offset(DELAY_OP_TOPIC, 0),
            1,
            "one append, one op record"
        );
        // The late one is still delivered, once, after a last restart.
        let timer = Timer::new(store.clone());
        assert_eq!(timer.deliver_due(&write, now + 3_600_000).await, Ok(1));
        assert_eq!(
            Timer::new(store.clone())
                .deliver_due(&write, now + 3_600_000)
                .await,
            Ok(0)
        );
        let seen = delivered(&store, "t");
        assert_eq!(seen.len(), 101);
        assert!(seen.values().all(|&n| n == 1), "each delivered once");
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(101)
        );
    }

    /// Review s17 finding 2: a delivery appended but not confirmed in time
    /// (here: SYNC replication and no slave) used to be written again at
    /// every tick, and held up every message due after it.
    #[tokio::test]
    async fn a_delivery_written_but_not_confirmed_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = unconfirmed_master(dir.path());
        let past = now_ms() - 1_000;
        // Held straight through the store: a write would time out too.
        for id in ["a", "b"] {
            store.append(held(id, past)).expect("hold");
        }
        let timer = Timer::new(store.clone());
        for round in 0..5 {
            let got = timer.deliver_due(&write, now_ms()).await;
            if round == 0 {
                assert!(got.is_err(), "not confirmed: {got:?}");
            }
            let seen = delivered(&store, "t");
            assert_eq!(seen.get("a"), Some(&1), "round {round}: a written once");
            assert_eq!(
                seen.get("b"),
                Some(&1),
                "round {round}: b not held up behind a"
            );
        }
        // Nor after a restart: the op record went with the messages.
        let _ = fresh_round(&store, &write).await;
        let seen = delivered(&store, "t");
        assert_eq!((seen.get("a"), seen.get("b")), (Some(&1), Some(&1)));
    }

    /// A log cut after a delivery (as an old master's at the fork point
    /// when it follows the new master) takes the delivery and its op record
    /// with it; after the role change the timer makes the delivery again,
    /// even though the stored progress (not cut with the log) had passed it.
    #[tokio::test]
    async fn a_delivery_cut_from_the_log_is_made_again_after_a_role_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let past = now_ms() - 1_000;
        write.write(vec![held("a", past)]).await.expect("hold");
        let timer = Timer::new(store.clone());
        assert_eq!(timer.deliver_due(&write, now_ms()).await, Ok(1));
        write.write(vec![held("b", past)]).await.expect("hold");
        assert_eq!(timer.deliver_due(&write, now_ms()).await, Ok(1));
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(2)
        );
        // Cut b's delivery: its message in t and its op record.
        let cut = store.queue_entry("t", 0, 1).expect("b delivered").offset;
        store.truncate_to(cut).expect("truncate");
        assert_eq!(delivered(&store, "t").get("b"), None);
        let repl = write.replication();
        repl.promote(repl.epoch() + 1).expect("role change");
        assert_eq!(timer.deliver_due(&write, now_ms()).await, Ok(1));
        let seen = delivered(&store, "t");
        assert_eq!((seen.get("a"), seen.get("b")), (Some(&1), Some(&1)));
        // And a restart agrees.
        assert_eq!(fresh_round(&store, &write).await, Ok(0));
    }

    /// A store from before the op records has only the stored progress: it
    /// is read from there, delivering what it delivered before and nothing
    /// below it.
    #[tokio::test]
    async fn a_store_with_only_the_old_progress_mark_delivers_from_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        hold_due(&write, &["a", "b", "c"]).await;
        // As an old broker leaves it after delivering a and b.
        store
            .metadata()
            .commit_offset(TIMER_GROUP, DELAY_TOPIC, 0, 2);
        assert_eq!(fresh_round(&store, &write).await, Ok(1));
        assert_eq!(fresh_round(&store, &write).await, Ok(0));
        assert_delivered_once(&store, &["c"]);
    }

    /// A power loss under ASYNC_FLUSH takes the first deliveries ever made
    /// here with their op record, while the stored marks, saved on their
    /// own schedule, count them. With no op record left they used to be
    /// read as an old store's marks, and the messages were never delivered.
    #[tokio::test]
    async fn deliveries_lost_with_every_op_record_are_made_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let past = now_ms() - 1_000;
        write
            .write(vec![held("a", past), held("b", past)])
            .await
            .expect("hold");
        // The last flush before the power loss reaches here.
        let keep = store.max_offset();
        assert_eq!(fresh_round(&store, &write).await, Ok(2));
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(2)
        );

        let (store, write) = crate::testing::power_loss(dir.path(), &store, keep);
        assert_eq!(store.queue_max_offset(DELAY_OP_TOPIC, 0), 0, "op lost");
        assert!(delivered(&store, "t").is_empty(), "deliveries lost");
        assert_eq!(fresh_round(&store, &write).await, Ok(2), "delivered again");
        // Once: a restart reads the new op record.
        assert_eq!(fresh_round(&store, &write).await, Ok(0));
        let seen = delivered(&store, "t");
        assert_eq!((seen.get("a"), seen.get("b")), (Some(&1), Some(&1)));
        store.shutdown().expect("shutdown");
    }

    /// A store an earlier release left with only the stored mark (a and b
    /// delivered), whose first op record, this release's delivery of c, is
    /// lost in a power loss: c is delivered again, a and b are not.
    #[tokio::test]
    async fn an_old_store_whose_first_op_record_is_lost_delivers_from_its_old_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        hold_due(&write, &["a", "b", "c"]).await;
        store
            .metadata()
            .commit_offset(TIMER_GROUP, DELAY_TOPIC, 0, 2);
        let keep = store.max_offset();
        assert_eq!(fresh_round(&store, &write).await, Ok(1));

        let (store, write) = crate::testing::power_loss(dir.path(), &store, keep);
        assert_eq!(
            store.metadata().get_offset(TIMER_GROUP, DELAY_TOPIC, 0),
            Some(3),
            "the stored mark counts c"
        );
        assert_eq!(fresh_round(&store, &write).await, Ok(1));
        assert_delivered_once(&store, &["c"]);
        store.shutdown().expect("shutdown");
    }

    /// A store whose op records were written before the store was flagged
    /// (the previous release): flagged from its first op record, so once
    /// every op record is lost it delivers again what they delivered, and
    /// not what was delivered before them.
    #[tokio::test]
    async fn a_store_with_unflagged_op_records_is_flagged_from_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        hold_due(&write, &["a", "b", "c"]).await;
        let keep = store.max_offset();
        // As the previous release leaves it: a delivered without op records,
        // b with one, and its stored marks.
        let rec = store.get(DELAY_TOPIC, 0, 1).expect("read").expect("b");
        let mut op = NewRecord::new(DELAY_OP_TOPIC, 0, "1")
            .with_property(DONE_BELOW, "1")
            .with_property(OPS_FROM, "0");
        op.flags = flags::SYSTEM;
        write
            .write(vec![
                NewRecord::new("t", 0, rec.body.clone()).with_property(keys::MESSAGE_ID, "b"),
                op,
            ])
            .await
            .expect("deliver b");
        let meta = store.metadata();
        meta.commit_offset(TIMER_GROUP, DELAY_TOPIC, 0, 2);
        meta.commit_offset(TIMER_GROUP, DELAY_OP_TOPIC, 0, 1);
        assert_eq!(fresh_round(&store, &write).await, Ok(1), "c");
        assert_eq!(meta.get_offset(OPS_SINCE_GROUP, DELAY_TOPIC, 0), Some(1));

        let (store, write) = crate::testing::power_loss(dir.path(), &store, keep);
        assert_eq!(fresh_round(&store, &write).await, Ok(2), "b and c");
        assert_delivered_once(&store, &["b", "c"]);
        store.shutdown().expect("shutdown");
    }

    #[test]
    fn op_record_offsets_round_trip_as_runs() {
        let offs = [9, 3, 4, 5, 7, 12, 11, 10];
        let body = encode_offsets(&offs);
        assert_eq!(body, "3-5,7,9-12");
        let mut sorted = offs.to_vec();
        sorted.sort_unstable();
        assert_eq!(decode_offsets(body.as_bytes()), Some(sorted));
        assert_eq!(decode_offsets(b"0-100000"), None, "longer than a batch");
        assert_eq!(decode_offsets(b"x"), None);
    }

    #[test]
    fn done_ranges_merge_and_keep_their_lowest_op() {
        let mut d = Done::default();
        d.insert(5, Some(3));
        d.insert(7, Some(2));
        d.insert(6, None);
        assert_eq!(d.ranges.len(), 1);
        assert_eq!(d.op_floor(), Some(2));
        assert!(d.contains(5) && d.contains(7) && !d.contains(8) && !d.contains(4));
        assert_eq!(d.remove(5), Some(8));
        assert_eq!(d.op_floor(), None);
    }
}
