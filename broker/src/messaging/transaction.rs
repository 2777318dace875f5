//! Transactional messages: half messages, decisions and check-back.
//!
//! A TRANSACTION message is first stored as a *half* message in the system
//! topic [`HALF_TOPIC`] (queue 0), with its real topic and queue in its
//! properties, so consumers of the real topic do not see it. The producer
//! then commits or rolls back (EndTransaction); every decision is appended
//! as an *op* record to [`OP_TOPIC`] (queue 0) naming the half message's
//! offset. A commit writes the real message to its topic in the same append
//! as its op record, the message first: a crash that tears that append can
//! at worst leave the message without its op, so the transaction is checked
//! back and committed again (at least once), never lost. Half
//! messages and ops live in the commit log, so they survive restarts and
//! reach slaves with everything else; the in-memory state below is rebuilt
//! from them, for a writable master only: at start, and again after every
//! role change (a promoted slave then checks back what its master left
//! open; a broker that followed another master meanwhile may have had its
//! log cut at the fork point, or discarded and started again, and must not
//! keep what it had loaded from the part that is gone). A slave keeps no
//! state and stores no progress.
//!
//! A decision is appended, then waited for as a send is (flush and
//! replication). When that wait fails (a timeout), the decision is still in
//! the log and may yet become durable: it stays the half message's decision,
//! so neither a check-back nor a repeated EndTransaction writes it again (a
//! second commit would deliver the message twice). A repeat waits for it
//! instead: for the first request, if that one still waits, then for the
//! decision's own record, and answers OK once that is as durable as a write
//! must be, the write's error otherwise.
//!
//! The same holds for a decision read back from the log (at a restart or
//! after a role change): being in the log says nothing of its durability
//! (on a newly promoted master under SYNC replication it may be on no slave
//! yet; under SYNC_FLUSH it may be written and not flushed). Its op
//! record's position is kept, and a repeat answers OK only once that record
//! is as durable as a write must be under the modes in force, failing as a
//! write does otherwise (once durable, repeats are answered at once). A
//! role change during that wait may cut the log under it: the repeat then
//! looks again, refused unless this broker is a writable master again, and
//! then answered from the log as it is now.
//!
//! A half message left unresolved is *checked back*: after its first-check
//! delay, then every check interval, the broker asks a live producer of the
//! topic (see the client API) for the outcome; after the maximum number of
//! checks it is discarded (a DISCARD op, logged and counted). Defaults are
//! RocketMQ's (`transactionTimeOut` 6 s, `transactionCheckInterval` 30 s,
//! `transactionCheckMax` 15). Each check-back is recorded by an op record
//! with its count, so a restart or a promoted slave continues the count
//! (RocketMQ keeps it by re-appending the half message).
//!
//! Two progress marks say where a rebuild starts: the lowest unresolved
//! half offset (so a restart does not reload half messages resolved long
//! ago), and the lowest op record about a half message at or above it; a
//! rebuild reads the ops from the second, plus the `RECENT_CAP` before it
//! so recent decisions are still answered idempotently. Every op record
//! carries the marks as of its append, which count only decisions already
//! in the log before it, and a rebuild takes them from the last op record
//! in the log: whatever a power loss (the unflushed tail under
//! ASYNC_FLUSH), a cut at a fork or a promotion of a slave behind its
//! master took from the log, the marks left never claim a decision that is
//! gone. A log with no op record holds no decision: the rebuild starts at
//! its first half message. The marks are also kept like a consumer group's
//! offsets, which are saved and replicated apart from the log and may be
//! ahead of it; a store written before op records carried marks has only
//! those, and they are read from there, as they always were.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::store::{
    Appended, MessageStore, NewRecord, StoreError, StoredRecord, keys, record::flags,
};
use crate::write_path::{WriteError, WritePath};

/// System topic holding half messages until they are resolved.
pub const HALF_TOPIC: &str = "%SYS_HALF%";
/// System topic holding the decisions (op records) about half messages.
pub const OP_TOPIC: &str = "%SYS_HALF_OP%";
/// The progress marks are also stored as this group's offsets on
/// [`HALF_TOPIC`] and [`OP_TOPIC`] (what a store from before the op records
/// carried them has).
const TXN_GROUP: &str = "%SYS_TXN%";
/// Op record property: every half message below this half-queue offset was
/// resolved (by an op record before this one in the log, or removed by
/// retention) when this op record was appended.
const HALF_FROM: &str = "__TX_HALF_FROM";
/// Op record property: every op record about a half message at or above
/// [`HALF_FROM`] is at this op-queue offset or later.
const OPS_FROM: &str = "__TX_OPS_FROM";
/// Most looks an EndTransaction takes when it keeps finding another request
/// writing the same decision (each look after the first waits for one).
const MAX_LOOKS: usize = 8;
/// Resolved transactions remembered for idempotent repeats of EndTransaction.
const RECENT_CAP: usize = 65_536;
/// Longest check-back delay a producer may ask for (RocketMQ's proxy caps
/// `orphaned_transaction_recovery_duration` at one hour).
pub const MAX_RECOVERY_DELAY: Duration = Duration::from_secs(3600);

/// Check-back timing, with RocketMQ's broker defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionConfig {
    /// Age before a half message is first checked back (`transactionTimeOut`).
    /// A longer delay asked for by the producer wins.
    pub first_check: Duration,
    /// Time between check-backs (`transactionCheckInterval`).
    pub check_interval: Duration,
    /// Check-backs before an unresolved half message is discarded
    /// (`transactionCheckMax`).
    pub max_checks: u32,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        Self {
            first_check: Duration::from_secs(6),
            check_interval: Duration::from_secs(30),
            max_checks: 15,
        }
    }
}

/// What became of a half message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Rollback,
    /// Given up after the maximum number of check-backs.
    Discard,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "COMMIT",
            Decision::Rollback => "ROLLBACK",
            Decision::Discard => "DISCARD",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "COMMIT" => Some(Decision::Commit),
            "ROLLBACK" => Some(Decision::Rollback),
            "DISCARD" => Some(Decision::Discard),
            _ => None,
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an EndTransaction was not applied.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    /// No half message of this topic and message has this transaction id
    /// (never existed, another broker's, or resolved too long ago).
    #[error("transaction {0:?} is unknown to this broker")]
    Unknown(String),
    /// The transaction exists but belongs to another topic or message.
    #[error("transaction {tx:?} belongs to message {message_id:?} of topic {topic:?}")]
    Mismatch {
        tx: String,
        topic: String,
        message_id: String,
    },
    /// The transaction was already resolved the other way.
    #[error("transaction {tx:?} was already resolved: {previous}")]
    Conflict { tx: String, previous: Decision },
    /// The decision could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// A half message waiting for its decision.
#[derive(Clone, Debug)]
struct Pending {
    tx_id: String,
    message_id: String,
    topic: String,
    next_check_ms: i64,
    checks: u32,
    /// A decision is in the log, not yet confirmed: no check-back, no
    /// second writer.
    resolving: Option<Resolving>,
}

/// A decision appended for a half message and not confirmed yet.
#[derive(Clone, Debug)]
struct Resolving {
    decision: Decision,
    /// The decision's op record (the last record of its append).
    op: Appended,
    /// Open while the request that appended it waits for it; closed when
    /// that request returns or is dropped.
    writer: watch::Receiver<()>,
}

/// A resolved transaction, remembered for idempotent repeats.
#[derive(Clone, Debug)]
struct Resolved {
    decision: Decision,
    topic: String,
    message_id: String,
    /// The decision's op record while it is not known to be as durable as
    /// a write must be: appended here and its write still waiting or timed
    /// out, or read back from the log by a rebuild (see [`OpAt`]). A repeat
    /// waits for it before answering. `None`: known durable, or the
    /// decision has no op record (see [`State::resolve`]).
    unconfirmed: Option<OpAt>,
}

/// Where a decision's op record is in the commit log, for a repeat to wait
/// for (as [`WritePath::confirm`] waits for a fresh write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpAt {
    /// Appended by this broker for the state's role generation: its
    /// [`Appended`] carries the log's cut count, so
    /// [`WritePath::confirm`] tells a cut under it.
    Appended(Appended),
    /// Read back from the log when the state was loaded (at a restart,
    /// after a role change, or replicated before a promotion): it ends at
    /// commit-log offset `end`. It may be no more durable than an
    /// unconfirmed write (on a newly promoted master under SYNC replication
    /// it may be on no slave yet; under SYNC_FLUSH it may be written but
    /// not flushed), so it is waited for in the same way. `log_cuts` is the
    /// log's cut count read before the record was: a cut since then may
    /// have taken it (see [`Transactions::confirm`]).
    Read { end: u64, log_cuts: u64 },
}

impl OpAt {
    /// Where the op record `op`, read back from the log after its cut
    /// count read `log_cuts`, is.
    fn read(op: &StoredRecord, log_cuts: u64) -> Self {
        OpAt::Read {
            end: op.offset.saturating_add(u64::from(op.size)),
            log_cuts,
        }
    }
}

/// What an EndTransaction does next (see [`Transactions::end`]).
enum Step {
    /// The same decision is already durable: answer OK.
    Done,
    /// Another request is writing the same decision: wait for it to return,
    /// then look again.
    Wait(watch::Receiver<()>),
    /// The same decision is in the log, not confirmed: wait for its record.
    Confirm(OpAt),
    /// This request appended the decision (its op record `op`); `writer`
    /// is closed when it returns.
    Written {
        op: Appended,
        writer: watch::Sender<()>,
    },
}

/// Everything known about open and recently resolved transactions, rebuilt
/// from the half and op queues.
#[derive(Default)]
struct State {
    /// Role generation of the replication manager this state was built for
    /// (`None`: built without one, by `new` or `reset`).
    basis: Option<u64>,
    /// Set by a rebuild to the log's write position then, until the state
    /// has read the log up to there (see [`Transactions::sync`]): nothing
    /// is decided on it before.
    catch_up_to: Option<u64>,
    /// Next half-queue offset not yet loaded.
    half_loaded_to: u64,
    /// Next op-queue offset not yet loaded.
    op_loaded_to: u64,
    pending: BTreeMap<u64, Pending>,
    /// (next check ms, half offset) of every pending half message.
    schedule: BTreeSet<(i64, u64)>,
    by_tx: HashMap<String, u64>,
    recent: HashMap<String, Resolved>,
    recent_order: VecDeque<String>,
    /// Ops seen for half offsets not loaded yet (appended between the two
    /// looks of one load), with where they are.
    early_ops: HashMap<u64, (Decision, Option<OpAt>)>,
    /// Last progress stored.
    committed: u64,
    /// Op records a restart must re-read: those about half messages at or
    /// above `committed` (half offset -> op offset), and their op offsets.
    needed_ops: BTreeMap<u64, u64>,
    needed_op_offsets: BTreeSet<u64>,
    /// Last op-queue progress stored.
    op_committed: u64,
}

impl super::RoleBound for State {
    fn basis_mut(&mut self) -> &mut Option<u64> {
        &mut self.basis
    }
}

impl State {
    fn remember(&mut self, tx_id: String, r: Resolved) {
        if self.recent.insert(tx_id.clone(), r).is_none() {
            self.recent_order.push_back(tx_id);
            while self.recent_order.len() > RECENT_CAP {
                if let Some(old) = self.recent_order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
    }

    /// A restart must re-read op record `op` about the half message at
    /// `half` (the latest op about a half message supersedes earlier ones).
    fn need_op(&mut self, half: u64, op: u64) {
        if let Some(old) = self.needed_ops.insert(half, op) {
            self.needed_op_offsets.remove(&old);
        }
        self.needed_op_offsets.insert(op);
    }

    /// Records that the half message at `off` had `checks` check-backs, the
    /// next one due at `next_ms` at the earliest.
    fn note_checks(&mut self, off: u64, checks: u32, next_ms: i64) {
        let Some(p) = self.pending.get_mut(&off) else {
            return;
        };
        p.checks = p.checks.max(checks);
        if next_ms > p.next_check_ms {
            let old = std::mem::replace(&mut p.next_check_ms, next_ms);
            self.schedule.remove(&(old, off));
            self.schedule.insert((next_ms, off));
        }
    }

    /// Removes a pending half message; returns it.
    fn take(&mut self, off: u64) -> Option<Pending> {
        let p = self.pending.remove(&off)?;
        self.schedule.remove(&(p.next_check_ms, off));
        self.by_tx.remove(&p.tx_id);
        Some(p)
    }

    /// Applies a decision; `named` is the (topic, message id) an op record
    /// carries, so decisions about half messages no longer loaded (resolved
    /// before a restart) are still remembered; `read` is where that op
    /// record is when it was read back from the log (`None`: applied
    /// without reading it, see below).
    ///
    /// A repeat of the decision answers OK only once its op record is as
    /// durable as a write must be, so the record's position is kept
    /// whenever it is known. Every decision read from the log has one,
    /// whether its half message is loaded, not loaded yet, or below the
    /// loaded range (remembered by name). Decisions applied without one:
    /// - confirmed here ([`State::confirmed`]): durable, nothing to wait for;
    /// - the discard of a half message removed by retention before any
    ///   decision (`due_checks`): it has no op record, so there is nothing
    ///   to wait for; it is never answered OK anyway, as producers only
    ///   commit or roll back (a conflict with it), and the discard of
    ///   check-backs is only written for a half message still pending.
    ///
    /// A decision whose op record is not read (more than `RECENT_CAP` op
    /// records before the op progress) or that was pushed out of the
    /// `RECENT_CAP` remembered is not known at all: a repeat of it is
    /// answered [`EndError::Unknown`], never OK, as its record's position
    /// is not known.
    fn resolve(
        &mut self,
        off: u64,
        decision: Decision,
        named: Option<(String, String)>,
        read: Option<OpAt>,
    ) {
        if let Some(p) = self.take(off) {
            // Appended here for this role generation: its record's append
            // (with the log's cut count); else where it was read back.
            let unconfirmed = p
                .resolving
                .filter(|r| r.decision == decision)
                .map(|r| OpAt::Appended(r.op))
                .or(read);
            self.remember(
                p.tx_id,
                Resolved {
                    decision,
                    topic: p.topic,
                    message_id: p.message_id,
                    unconfirmed,
                },
            );
        } else if off >= self.half_loaded_to {
            self.early_ops.insert(off, (decision, read));
        } else if let Some((topic, message_id)) = named {
            self.remember(
                transaction_id(off, &message_id),
                Resolved {
                    decision,
                    topic,
                    message_id,
                    unconfirmed: read,
                },
            );
        }
    }

    /// The decision of transaction `tx_id` whose op record is `op` is as
    /// durable as a write must be: the half message is resolved. Returns
    /// whether that is news (not known confirmed before).
    fn confirmed(&mut self, tx_id: &str, decision: Decision, op: OpAt) -> bool {
        if let Some(&off) = self.by_tx.get(tx_id)
            && self
                .pending
                .get(&off)
                .and_then(|p| p.resolving.as_ref())
                .is_some_and(|r| OpAt::Appended(r.op) == op)
        {
            self.resolve(off, decision, None, None);
        }
        match self.recent.get_mut(tx_id) {
            Some(r) if r.unconfirmed == Some(op) => {
                r.unconfirmed = None;
                true
            }
            _ => false,
        }
    }
}

/// What the last op record in the log says of the progress.
enum LastOp {
    /// Its marks: the lowest unresolved half offset, the lowest op needed.
    Marks(u64, u64),
    /// It has none (written before op records carried them).
    Unmarked,
    /// There is no readable op record.
    None,
}

/// A half message due for a check-back.
#[derive(Clone, Debug)]
pub struct DueCheck {
    pub tx_id: String,
    /// Offset of the half message in the half queue.
    pub half_offset: u64,
    /// The message as its producer sent it (real topic and queue).
    pub message: StoredRecord,
    /// 1 for the first check-back.
    pub check: u32,
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct TransactionStats {
    pub committed: AtomicU64,
    pub rolled_back: AtomicU64,
    pub discarded: AtomicU64,
    pub checks_sent: AtomicU64,
    pub checks_unanswerable: AtomicU64,
}

/// The broker's transactional-message state.
pub struct Transactions {
    store: MessageStore,
    cfg: TransactionConfig,
    state: Mutex<State>,
    pub stats: TransactionStats,
}

/// The transaction id given to the producer for a half message: its
/// half-queue offset and message id, so it names one half message of one
/// broker group (the offset is the same on every replica).
pub fn transaction_id(half_offset: u64, message_id: &str) -> String {
    format!("{half_offset:X}-{message_id}")
}

impl Transactions {
    pub fn new(store: MessageStore, cfg: TransactionConfig) -> Self {
        let state = Mutex::new(Self::fresh(&store));
        Self {
            store,
            cfg,
            state,
            stats: TransactionStats::default(),
        }
    }

    /// Forgets everything loaded; the state is rebuilt from the stored
    /// progress and the log.
    pub fn reset(&self) {
        *self.state.lock() = Self::fresh(&self.store);
    }

    /// The state to rebuild from: the progress marks of the last op record
    /// in the log (see the module doc), within the queues.
    fn fresh(store: &MessageStore) -> State {
        let (min, max) = super::queue_bounds(store, HALF_TOPIC);
        let (op_min, op_max) = super::queue_bounds(store, OP_TOPIC);
        let (committed, op_committed) = match Self::last_op_marks(store, op_min, op_max) {
            LastOp::Marks(half, ops) => (half, ops),
            // No decision in the log (none made, or every one gone with a
            // power loss or a cut): nothing is resolved but what retention
            // removed, whatever the stored marks say.
            LastOp::None => (min, op_min),
            // Written before op records carried the marks: the stored ones.
            LastOp::Unmarked => {
                let meta = store.metadata();
                (
                    meta.get_offset(TXN_GROUP, HALF_TOPIC, 0).unwrap_or(min),
                    meta.get_offset(TXN_GROUP, OP_TOPIC, 0).unwrap_or(op_min),
                )
            }
        };
        let committed = committed.min(max).max(min);
        let op_committed = op_committed.min(op_max).max(op_min);
        let op_from = op_committed.saturating_sub(RECENT_CAP as u64).max(op_min);
        State {
            half_loaded_to: committed,
            op_loaded_to: op_from,
            committed,
            op_committed,
            ..State::default()
        }
    }

    /// The progress marks the last readable op record in the log carries
    /// (those of the log up to it, whatever became of the log after it).
    fn last_op_marks(store: &MessageStore, op_min: u64, op_max: u64) -> LastOp {
        match super::op_marks_backwards(store, OP_TOPIC, (op_min, op_max), [HALF_FROM, OPS_FROM])
            .next()
        {
            Some(Some((half, ops))) => LastOp::Marks(half, ops),
            Some(None) => LastOp::Unmarked,
            None => LastOp::None,
        }
    }

    /// Makes the state that of the master behind `write`: refused unless
    /// that broker is a writable master; rebuilt if the role changed since
    /// it was built; then brought up to date with the log. Returns the role
    /// generation it is valid for, and, while the state has not read the
    /// log up to where it was written when the state was rebuilt, that
    /// offset: nothing may be decided on the state before (wait until the
    /// log is flushed up to it, then sync again).
    ///
    /// Why: a rebuild reads only what is readable. Records appended before
    /// it (in this broker's previous role) may still be staged for the
    /// SYNC_FLUSH flusher; a decision among them would be missed, its
    /// transaction taken for open, and a repeat of it, or a check-back's
    /// answer, would write it a second time (the message delivered twice).
    fn sync(&self, write: &WritePath) -> Result<(u64, Option<u64>), WriteError> {
        let (mut st, basis, rebuilt) =
            super::lock_for_role(write, &self.state, || Self::fresh(&self.store))
                .map_err(WriteError::Refused)?;
        if rebuilt {
            st.catch_up_to = Some(self.store.appended_end());
        }
        // Read before loading: the load covers at least this much.
        let readable = self.store.indexed_offset();
        self.load_into(&mut st);
        if st.catch_up_to.is_some_and(|end| readable >= end) {
            st.catch_up_to = None;
        }
        Ok((basis, st.catch_up_to))
    }

    pub fn config(&self) -> &TransactionConfig {
        &self.cfg
    }

    /// The half message to store for `rec`: held in [`HALF_TOPIC`] with its
    /// real topic and queue, first checked back after `recovery` (the
    /// producer's wish, if any, capped at [`MAX_RECOVERY_DELAY`]).
    pub fn hold(rec: NewRecord, recovery: Option<Duration>) -> NewRecord {
        let mut properties = rec.properties;
        properties.insert(keys::ORIGIN_TOPIC.into(), rec.topic);
        properties.insert(keys::ORIGIN_QUEUE.into(), rec.queue_id.to_string());
        if let Some(d) = recovery {
            let ms = d.min(MAX_RECOVERY_DELAY).as_millis();
            properties.insert(keys::CHECK_AFTER_MS.into(), ms.to_string());
        }
        NewRecord {
            topic: HALF_TOPIC.into(),
            queue_id: 0,
            born_ms: rec.born_ms,
            flags: rec.flags | flags::TRANSACTION_HALF,
            properties,
            body: rec.body,
        }
    }

    /// The real message a half message stands for (its topic, queue and
    /// properties as sent).
    fn real(half: &StoredRecord) -> StoredRecord {
        let mut r = half.clone();
        r.topic = r.properties.remove(keys::ORIGIN_TOPIC).unwrap_or_default();
        r.queue_id = r
            .properties
            .remove(keys::ORIGIN_QUEUE)
            .and_then(|q| q.parse().ok())
            .unwrap_or(0);
        r.properties.remove(keys::CHECK_AFTER_MS);
        r.flags &= !flags::TRANSACTION_HALF;
        r
    }

    /// Half messages waiting for a decision.
    pub fn pending_count(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Loads half messages and decisions appended since the last look
    /// (sends, ends, replication, or everything at start).
    pub fn load(&self) {
        let mut st = self.state.lock();
        self.load_into(&mut st);
    }

    fn load_into(&self, st: &mut State) {
        // Before any record is read: a cut after this makes the records
        // read below count as possibly cut (see `OpAt::Read`).
        let log_cuts = self.store.log_cuts();
        let half_max = self.store.queue_max_offset(HALF_TOPIC, 0);
        while st.half_loaded_to < half_max {
            let off = st.half_loaded_to;
            st.half_loaded_to += 1;
            let r = match self.store.get(HALF_TOPIC, 0, off) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable half message skipped");
                    continue;
                }
            };
            let message_id = r
                .properties
                .get(keys::MESSAGE_ID)
                .cloned()
                .unwrap_or_default();
            let tx_id = transaction_id(off, &message_id);
            let topic = r
                .properties
                .get(keys::ORIGIN_TOPIC)
                .cloned()
                .unwrap_or_default();
            if let Some((decision, read)) = st.early_ops.remove(&off) {
                st.remember(
                    tx_id,
                    Resolved {
                        decision,
                        topic,
                        message_id,
                        unconfirmed: read,
                    },
                );
                continue;
            }
            let delay = r
                .properties
                .get(keys::CHECK_AFTER_MS)
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_millis)
                .unwrap_or_default()
                .max(self.cfg.first_check);
            let next_check_ms = r.store_ms.saturating_add(delay.as_millis() as i64);
            st.by_tx.insert(tx_id.clone(), off);
            st.schedule.insert((next_check_ms, off));
            st.pending.insert(
                off,
                Pending {
                    tx_id,
                    message_id,
                    topic,
                    next_check_ms,
                    checks: 0,
                    resolving: None,
                },
            );
        }
        let mut next_op = st.op_loaded_to;
        for (off, op) in self.store.read_on(OP_TOPIC, 0, &mut next_op) {
            let op = match op {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, offset = off, "unreadable transaction op skipped");
                    continue;
                }
            };
            let half = op
                .properties
                .get(keys::HALF_OFFSET)
                .and_then(|o| o.parse::<u64>().ok());
            let decision = op
                .properties
                .get(keys::TRANSACTION_STATE)
                .and_then(|d| Decision::parse(d));
            let checks = op
                .properties
                .get(keys::TRANSACTION_CHECKS)
                .and_then(|n| n.parse::<u32>().ok());
            if let (Some(half), None, Some(checks)) = (half, decision, checks) {
                // A check-back was sent: its count and time survive restarts.
                let next = op
                    .store_ms
                    .saturating_add(self.cfg.check_interval.as_millis() as i64);
                st.note_checks(half, checks, next);
                if half >= st.committed {
                    st.need_op(half, off);
                }
            }
            if let (Some(half), Some(decision)) = (half, decision) {
                let named = op
                    .properties
                    .get(keys::ORIGIN_TOPIC)
                    .cloned()
                    .zip(op.properties.get(keys::MESSAGE_ID).cloned());
                st.resolve(half, decision, named, Some(OpAt::read(&op, log_cuts)));
                if half >= st.committed {
                    st.need_op(half, off);
                }
            }
        }
        st.op_loaded_to = next_op;
        self.store_progress(st);
    }

    fn store_progress(&self, st: &mut State) {
        let low = st
            .pending
            .keys()
            .next()
            .copied()
            .unwrap_or(st.half_loaded_to);
        if low != st.committed {
            st.committed = low;
            self.store
                .metadata()
                .commit_offset(TXN_GROUP, HALF_TOPIC, 0, low);
        }
        // Stored after the half progress: a snapshot taken in between holds
        // an op progress that is still low enough for its half progress.
        let kept = st.needed_ops.split_off(&low);
        for op in std::mem::replace(&mut st.needed_ops, kept).into_values() {
            st.needed_op_offsets.remove(&op);
        }
        let op_low = st
            .needed_op_offsets
            .first()
            .copied()
            .unwrap_or(st.op_loaded_to);
        if op_low != st.op_committed {
            st.op_committed = op_low;
            self.store
                .metadata()
                .commit_offset(TXN_GROUP, OP_TOPIC, 0, op_low);
        }
    }

    /// Applies a producer's decision about transaction `tx_id` (message
    /// `message_id` of `topic`): a commit writes the message to its topic.
    /// Repeating a decision already applied is a success once that decision
    /// is as durable as a write must be, also when it was read back from
    /// the log after a restart or a role change; a repeat of one still
    /// being confirmed waits for it and never writes it again.
    pub async fn end(
        &self,
        write: &WritePath,
        tx_id: &str,
        message_id: &str,
        topic: &str,
        decision: Decision,
    ) -> Result<(), EndError> {
        for _ in 0..MAX_LOOKS {
            let (basis, behind) = self.sync(write)?;
            if let Some(end) = behind {
                // Rebuilt, and not yet up to what was appended before
                // (see `sync`): look again once that is written (a
                // stalled flush fails this request as it fails a write).
                write
                    .store()
                    .wait_flushed(end)
                    .await
                    .map_err(WritePath::flush_error)?;
                continue;
            }
            match self.next_step(write, tx_id, message_id, topic, decision)? {
                Step::Done => return Ok(()),
                Step::Wait(mut writer) => {
                    // Returns once the writer returned (or was dropped).
                    let _ = writer.changed().await;
                }
                Step::Confirm(op) => {
                    if self.confirm(write, basis, tx_id, decision, op).await? {
                        return Ok(());
                    }
                    // The role changed while it waited for a record read
                    // back from the log: look again (see `confirm`).
                }
                Step::Written { op, writer } => {
                    let confirmed = self
                        .confirm(write, basis, tx_id, decision, OpAt::Appended(op))
                        .await;
                    drop(writer);
                    // Its own append: a cut under it is an error, never a
                    // second look.
                    return confirmed.map(|_| ());
                }
            }
        }
        // Every look found another request writing this decision, and each
        // of those wrote nothing, or the log was cut or the role changed
        // under the decision waited for.
        Err(EndError::Write(WriteError::Store(StoreError::Busy(
            format!(
                "transaction {tx_id}: the decision could not be settled in {MAX_LOOKS} looks \
             (other requests kept failing to write it, or the broker's role kept changing)"
            ),
        ))))
    }

    /// Looks at transaction `tx_id` and decides what [`Transactions::end`]
    /// does next; when no decision is in the log yet, appends this one
    /// (under the state lock, so no other request or check-back can write
    /// another in between, and the progress marks it carries are exact).
    fn next_step(
        &self,
        write: &WritePath,
        tx_id: &str,
        message_id: &str,
        topic: &str,
        decision: Decision,
    ) -> Result<Step, EndError> {
        let mut st = self.state.lock();
        let check = |t: &str, m: &str| {
            if t != topic || (!message_id.is_empty() && m != message_id) {
                Err(EndError::Mismatch {
                    tx: tx_id.to_owned(),
                    topic: t.to_owned(),
                    message_id: m.to_owned(),
                })
            } else {
                Ok(())
            }
        };
        let conflict = |previous| EndError::Conflict {
            tx: tx_id.to_owned(),
            previous,
        };
        if let Some(r) = st.recent.get(tx_id) {
            check(&r.topic, &r.message_id)?;
            if r.decision != decision {
                return Err(conflict(r.decision));
            }
            return Ok(r.unconfirmed.map_or(Step::Done, Step::Confirm));
        }
        let Some(off) = st.by_tx.get(tx_id).copied() else {
            return Err(EndError::Unknown(tx_id.to_owned()));
        };
        let Some(p) = st.pending.get(&off) else {
            return Err(EndError::Unknown(tx_id.to_owned()));
        };
        check(&p.topic, &p.message_id)?;
        match &p.resolving {
            Some(r) if r.decision != decision => return Err(conflict(r.decision)),
            // The request that appended it still waits for it.
            Some(r) if r.writer.has_changed().is_ok() => return Ok(Step::Wait(r.writer.clone())),
            Some(r) => return Ok(Step::Confirm(OpAt::Appended(r.op))),
            None => {}
        }
        let named = (p.topic.clone(), p.message_id.clone());
        let records = self.decision_records(&mut st, off, decision, named)?;
        let appended = write.append(records)?;
        let op = *appended.last().ok_or_else(|| {
            EndError::Write(WriteError::Store(StoreError::InvalidArgument(
                "empty append".into(),
            )))
        })?;
        let (writer, watching) = watch::channel(());
        if let Some(p) = st.pending.get_mut(&off) {
            p.resolving = Some(Resolving {
                decision,
                op,
                writer: watching,
            });
        }
        Ok(Step::Written { op, writer })
    }

    /// Waits until the decision of `tx_id` whose op record is `op` is as
    /// durable as a write must be, then counts the transaction resolved
    /// (unless the state was rebuilt since `basis`: it read the log
    /// instead). On failure the decision stays in the log, unconfirmed.
    ///
    /// Returns `Ok(true)` once it is confirmed. A cut under an append of
    /// this broker fails with [`StoreError::Truncated`] (from
    /// [`WritePath::confirm`]): the decision is gone, and the next request
    /// rebuilds the state from the log as it is now. For a record read
    /// back from the log ([`OpAt::Read`]), a cut since it was read, or a
    /// role change (which comes with any cut: the log is cut only after
    /// this broker followed another master), seen after the wait, gives
    /// `Ok(false)`, and [`Transactions::end`] looks again at once, as the
    /// next request would: refused unless this broker is a writable master
    /// again, and then from the log as it is now (the decision waited for
    /// again if it is still there, the half message open again if the cut
    /// took it). A role change does not end the wait itself: like a fresh
    /// write's, it ends when the flush and the slaves answer, or times out.
    async fn confirm(
        &self,
        write: &WritePath,
        basis: u64,
        tx_id: &str,
        decision: Decision,
        op: OpAt,
    ) -> Result<bool, EndError> {
        match op {
            OpAt::Appended(a) => write.confirm(&a).await?,
            OpAt::Read { end, log_cuts } => {
                write.confirm_to(end).await?;
                // Counted before any flush after it (see
                // `MessageStore::log_cuts`): a flush seen above that
                // followed a cut is seen with the cut.
                if write.store().log_cuts() != log_cuts {
                    // The state may hold what the cut took: the next look
                    // rebuilds it from the log as it is now.
                    let mut st = self.state.lock();
                    if st.basis == Some(basis) {
                        st.basis = None;
                    }
                    return Ok(false);
                }
                let writable = write.replication().check_writable().is_ok();
                if !writable || super::role_generation(write) != basis {
                    return Ok(false);
                }
            }
        }
        let mut st = self.state.lock();
        // Only appends of this broker confirmed here count: a decision read
        // back from the log is not counted again (it was counted where it
        // was confirmed, if it was: an append whose wait failed before a
        // restart or role change is counted nowhere).
        if st.basis == Some(basis)
            && st.confirmed(tx_id, decision, op)
            && matches!(op, OpAt::Appended(_))
        {
            self.store_progress(&mut st);
            let counter = match decision {
                Decision::Commit => &self.stats.committed,
                Decision::Rollback => &self.stats.rolled_back,
                Decision::Discard => &self.stats.discarded,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// The records that apply `decision` to the half message at `off`,
    /// whose topic and message id are `named` (as the state holds them):
    /// on commit the real message, then the op record, to append together.
    /// Only a commit reads the half message: a rollback or discard needs
    /// nothing from it, so one that can no longer be read is still
    /// resolved.
    fn decision_records(
        &self,
        st: &mut State,
        off: u64,
        decision: Decision,
        (topic, message_id): (String, String),
    ) -> Result<Vec<NewRecord>, EndError> {
        let mut records = Vec::with_capacity(2);
        if decision == Decision::Commit {
            let half = self
                .store
                .get(HALF_TOPIC, 0, off)
                .map_err(|e| EndError::Write(WriteError::Store(e)))?;
            // Removed by retention: nothing left to commit.
            let Some(real) = half.map(|h| Self::real(&h)) else {
                return Err(EndError::Unknown(format!("half message {off}")));
            };
            records.push(NewRecord {
                topic: real.topic,
                queue_id: real.queue_id,
                born_ms: real.born_ms,
                flags: real.flags,
                properties: real.properties,
                body: real.body,
            });
        }
        let mut op = self
            .op_record(st, off)
            .with_property(keys::TRANSACTION_STATE, decision.as_str())
            .with_property(keys::ORIGIN_TOPIC, topic)
            .with_property(keys::MESSAGE_ID, message_id);
        op.flags = flags::TRANSACTION_END | flags::SYSTEM;
        records.push(op);
        Ok(records)
    }

    /// An op record about the half message at `off`, carrying the progress
    /// marks as they are now (stored first, so they are current): to be
    /// appended before the state lock is released, or at least before
    /// anything the marks do not count is appended, as they count only
    /// what is in the log already.
    fn op_record(&self, st: &mut State, off: u64) -> NewRecord {
        self.store_progress(st);
        NewRecord::new(OP_TOPIC, 0, off.to_string())
            .with_property(keys::HALF_OFFSET, off.to_string())
            .with_property(HALF_FROM, st.committed.to_string())
            .with_property(OPS_FROM, st.op_committed.to_string())
    }

    /// Half messages due for a check-back at `now`, each counted as one
    /// more check and rescheduled one interval later; those that used up
    /// their checks are discarded (an op record each) instead.
    pub async fn due_checks(&self, write: &WritePath, now: i64) -> Vec<DueCheck> {
        // Not while the state is behind what was appended before its
        // rebuild (see `sync`): a later round checks them.
        if !matches!(self.sync(write), Ok((_, None))) {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut give_up = Vec::new();
        let mut recorded = None;
        {
            let mut st = self.state.lock();
            let offs: Vec<(i64, u64)> = st
                .schedule
                .iter()
                .take_while(|(t, _)| *t <= now)
                .copied()
                .collect();
            let interval = self.cfg.check_interval.as_millis() as i64;
            for (t, off) in offs {
                st.schedule.remove(&(t, off));
                let Some(p) = st.pending.get_mut(&off) else {
                    continue;
                };
                if p.resolving.is_some() {
                    // Its decision is in the log, being confirmed: resolved
                    // once confirmed or read back.
                    p.next_check_ms = now + interval;
                    st.schedule.insert((now + interval, off));
                    continue;
                }
                if p.checks >= self.cfg.max_checks {
                    give_up.push((off, p.tx_id.clone(), p.topic.clone()));
                    continue;
                }
                p.checks += 1;
                p.next_check_ms = now + interval;
                let (tx_id, check) = (p.tx_id.clone(), p.checks);
                st.schedule.insert((now + interval, off));
                match self.store.get(HALF_TOPIC, 0, off) {
                    Ok(Some(h)) => due.push(DueCheck {
                        half_offset: off,
                        tx_id,
                        message: Self::real(&h),
                        check,
                    }),
                    Ok(None) => {
                        // Removed by retention: nothing left to decide.
                        tracing::warn!(tx = %tx_id, "half message expired before its transaction ended");
                        st.resolve(off, Decision::Discard, None, None);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, tx = %tx_id, "half message unreadable for check-back");
                    }
                }
            }
            self.store_progress(&mut st);
            if !due.is_empty() {
                // One op record per check-back, so a restart or a promoted
                // slave continues the count instead of starting over;
                // appended under the lock, as the marks they carry require.
                let ops = due
                    .iter()
                    .map(|d| {
                        let mut op = self
                            .op_record(&mut st, d.half_offset)
                            .with_property(keys::TRANSACTION_CHECKS, d.check.to_string());
                        op.flags = flags::SYSTEM;
                        op
                    })
                    .collect();
                match write.append(ops) {
                    Ok(appended) => recorded = appended.last().copied(),
                    Err(e) => {
                        tracing::warn!(error = %e, "recording check-backs failed; a restart may check these half messages again");
                    }
                }
            }
        }
        if let Some(last) = recorded
            && let Err(e) = write.confirm(&last).await
        {
            tracing::warn!(error = %e, "check-backs recorded but not confirmed; a restart may check these half messages again");
        }
        for (off, tx_id, topic) in give_up {
            let (message_id, checks) = {
                let st = self.state.lock();
                st.pending
                    .get(&off)
                    .map(|p| (p.message_id.clone(), p.checks))
                    .unwrap_or_default()
            };
            match self
                .end(write, &tx_id, &message_id, &topic, Decision::Discard)
                .await
            {
                Ok(()) => tracing::warn!(
                    tx = %tx_id,
                    topic = %topic,
                    message_id = %message_id,
                    checks,
                    "transaction never resolved; half message discarded after the maximum check-backs"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, tx = %tx_id, "discarding an unresolved transaction failed; will retry");
                    let mut st = self.state.lock();
                    if let Some(p) = st.pending.get_mut(&off) {
                        p.next_check_ms = now + 1000;
                        st.schedule.insert((now + 1000, off));
                    }
                }
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now_ms;

    fn half(id: &str) -> NewRecord {
        Transactions::hold(
            NewRecord::new("orders", 1, id.as_bytes().to_vec()).with_property(keys::MESSAGE_ID, id),
            None,
        )
    }

    /// Writes a half message per id through `write`, in one append; their
    /// transaction ids.
    async fn halves(write: &WritePath, ids: &[&str]) -> Vec<String> {
        let appended = write
            .write(ids.iter().map(|id| half(id)).collect())
            .await
            .expect("halves");
        ids.iter()
            .zip(&appended)
            .map(|(m, a)| transaction_id(a.queue_offset, m))
            .collect()
    }

    /// Checks that transaction `id` of message `m` in `orders` is committed:
    /// a repeat of the commit is answered, a rollback is a conflict.
    async fn committed(tx: &Transactions, write: &WritePath, id: &str, m: &str) {
        tx.end(write, id, m, "orders", Decision::Commit)
            .await
            .expect("a repeat of the commit is answered");
        assert!(matches!(
            tx.end(write, id, m, "orders", Decision::Rollback).await,
            Err(EndError::Conflict { .. })
        ));
    }

    /// Rebuilds the transactions of `store` from its log: nothing is
    /// pending, a repeat of the commit of `id` (message `m`) is answered,
    /// and `orders` holds `expected`.
    async fn rebuilt_with_nothing_pending(
        store: &MessageStore,
        write: &WritePath,
        id: &str,
        m: &str,
        expected: &[&str],
    ) {
        let tx = Transactions::new(store.clone(), cfg());
        tx.load();
        assert_eq!(tx.pending_count(), 0);
        tx.end(write, id, m, "orders", Decision::Commit)
            .await
            .expect("idempotent");
        assert_eq!(orders(store), expected);
    }

    fn cfg() -> TransactionConfig {
        TransactionConfig {
            first_check: Duration::from_millis(0),
            check_interval: Duration::from_millis(10),
            max_checks: 2,
        }
    }

    #[tokio::test]
    async fn commit_rollback_idempotence_and_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        let ids = halves(&write, &["A", "B", "C"]).await;
        assert_eq!(
            store.queue_max_offset("orders", 1),
            0,
            "halves are invisible"
        );

        tx.end(&write, &ids[0], "A", "orders", Decision::Commit)
            .await
            .expect("commit");
        committed(&tx, &write, &ids[0], "A").await;
        tx.end(&write, &ids[1], "B", "orders", Decision::Rollback)
            .await
            .expect("rollback");
        assert!(matches!(
            tx.end(&write, &ids[2], "C", "other", Decision::Commit)
                .await,
            Err(EndError::Mismatch { .. })
        ));
        assert!(matches!(
            tx.end(&write, "7-X", "X", "orders", Decision::Commit).await,
            Err(EndError::Unknown(_))
        ));
        let real = store.get("orders", 1, 0).expect("read").expect("committed");
        assert_eq!(&real.body[..], b"A");
        assert_eq!(real.flags & flags::TRANSACTION_HALF, 0);
        assert!(!real.properties.contains_key(keys::ORIGIN_TOPIC));
        assert_eq!(
            store.queue_max_offset("orders", 1),
            1,
            "only the commit is visible"
        );
        assert_eq!(tx.pending_count(), 1);

        // A restart rebuilds the same state from the log.
        drop(tx);
        let tx = Transactions::new(store.clone(), cfg());
        tx.load();
        assert_eq!(tx.pending_count(), 1);
        tx.end(&write, &ids[0], "A", "orders", Decision::Commit)
            .await
            .expect("still idempotent");
        tx.end(&write, &ids[2], "C", "orders", Decision::Commit)
            .await
            .expect("commit after restart");
        assert_eq!(store.queue_max_offset("orders", 1), 2);
        assert_eq!(tx.pending_count(), 0);
    }

    /// Whether an EndTransaction failed as a write whose flush timed out.
    fn flush_timed_out(got: &Result<(), EndError>) -> bool {
        matches!(got, Err(EndError::Write(WriteError::FlushTimeout(_))))
    }

    /// Whether an EndTransaction failed as a write whose replication timed
    /// out.
    fn replication_timed_out(got: &Result<(), EndError>) -> bool {
        matches!(got, Err(EndError::Write(WriteError::ReplicationTimeout(_))))
    }

    /// Bodies of the messages in queue 1 of `orders`.
    fn orders(store: &MessageStore) -> Vec<String> {
        store
            .get_range("orders", 1, 0, usize::MAX, usize::MAX)
            .expect("read")
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_power_loss_that_takes_decisions_leaves_their_transactions_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        let ids = halves(&write, &["A", "B", "C"]).await;
        tx.end(&write, &ids[0], "A", "orders", Decision::Commit)
            .await
            .expect("commit A");
        // The last flush before the power loss reaches here.
        let keep = store.max_offset();
        tx.end(&write, &ids[1], "B", "orders", Decision::Commit)
            .await
            .expect("commit B");
        tx.end(&write, &ids[2], "C", "orders", Decision::Rollback)
            .await
            .expect("roll back C");
        tx.load();
        let meta = store.metadata();
        assert_eq!(meta.get_offset(TXN_GROUP, HALF_TOPIC, 0), Some(3));
        assert_eq!(meta.get_offset(TXN_GROUP, OP_TOPIC, 0), Some(3));
        drop(tx);

        let (store, write) = crate::testing::power_loss(dir.path(), &store, keep);
        assert_eq!(
            store.queue_max_offset(HALF_TOPIC, 0),
            3,
            "the halves are kept"
        );
        assert_eq!(store.queue_max_offset(OP_TOPIC, 0), 1, "only A's commit is");
        assert_eq!(orders(&store), ["A"]);
        let tx = Transactions::new(store.clone(), cfg());
        tx.load();
        assert_eq!(tx.pending_count(), 2, "B and C are open again");
        let due = tx.due_checks(&write, now_ms() + 1000).await;
        let asked: Vec<&str> = due.iter().map(|d| d.tx_id.as_str()).collect();
        assert_eq!(asked, [ids[1].as_str(), ids[2].as_str()], "checked back");
        committed(&tx, &write, &ids[0], "A").await;
        // The producers' repeats of the lost decisions apply them again.
        tx.end(&write, &ids[1], "B", "orders", Decision::Commit)
            .await
            .expect("commit B again");
        tx.end(&write, &ids[2], "C", "orders", Decision::Rollback)
            .await
            .expect("roll back C again");
        assert_eq!(orders(&store), ["A", "B"]);
        assert_eq!(tx.pending_count(), 0);

        // Another power loss, this time losing nothing: the marks the last
        // op record carries rebuild the same state.
        let (store, write) = crate::testing::power_loss(dir.path(), &store, store.max_offset());
        rebuilt_with_nothing_pending(&store, &write, &ids[1], "B", &["A", "B"]).await;
        store.shutdown().expect("shutdown");
    }

    /// The op record of decision `d` about the half message at `off`
    /// (message `m` of `orders`) as releases before the progress marks
    /// wrote it: the broker's own, less the marks.
    fn unmarked_op(off: u64, m: &str, d: Decision) -> NewRecord {
        let mut op = NewRecord::new(OP_TOPIC, 0, off.to_string())
            .with_property(keys::HALF_OFFSET, off.to_string())
            .with_property(keys::TRANSACTION_STATE, d.as_str())
            .with_property(keys::ORIGIN_TOPIC, "orders")
            .with_property(keys::MESSAGE_ID, m);
        op.flags = flags::TRANSACTION_END | flags::SYSTEM;
        op
    }

    /// A store written before op records carried the progress marks: its
    /// ops have none, and its progress is only in the stored offsets.
    #[tokio::test]
    async fn a_store_from_before_the_marks_is_rebuilt_from_its_stored_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let ids = halves(&write, &["A", "B", "C"]).await;
        // A committed and B rolled back as earlier releases recorded it.
        write
            .write(vec![
                NewRecord::new("orders", 1, "A").with_property(keys::MESSAGE_ID, "A"),
                unmarked_op(0, "A", Decision::Commit),
            ])
            .await
            .expect("commit A");
        write
            .write(vec![unmarked_op(1, "B", Decision::Rollback)])
            .await
            .expect("roll back B");
        let meta = store.metadata();
        meta.commit_offset(TXN_GROUP, HALF_TOPIC, 0, 2);
        meta.commit_offset(TXN_GROUP, OP_TOPIC, 0, 2);
        store.shutdown().expect("shutdown");

        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        tx.load();
        assert_eq!(tx.pending_count(), 1, "C");
        tx.end(&write, &ids[0], "A", "orders", Decision::Commit)
            .await
            .expect("a recent decision is answered");
        tx.end(&write, &ids[1], "B", "orders", Decision::Rollback)
            .await
            .expect("a recent decision is answered");
        tx.end(&write, &ids[2], "C", "orders", Decision::Commit)
            .await
            .expect("commit C");
        assert_eq!(orders(&store), ["A", "C"]);
        // C's commit carries the marks: from now on they come from there.
        store.shutdown().expect("shutdown");
        let (store, write) = crate::testing::lone_master(dir.path());
        rebuilt_with_nothing_pending(&store, &write, &ids[2], "C", &["A", "C"]).await;
        store.shutdown().expect("shutdown");
    }

    /// A SYNC_FLUSH store whose flush times out after 200 ms, and the
    /// write path of a lone master over it.
    fn sync_flush_master(dir: &std::path::Path) -> (MessageStore, WritePath) {
        sync_flush_master_with(dir, Duration::from_millis(200))
    }

    /// [`sync_flush_master`] with a flush timeout of `flush_timeout`.
    fn sync_flush_master_with(
        dir: &std::path::Path,
        flush_timeout: Duration,
    ) -> (MessageStore, WritePath) {
        use crate::replication::{ReplicationManager, ReplicationMode, StartRole};
        let mut c = crate::store::StoreConfig::new(dir);
        c.segment_size = 1 << 20;
        c.flush_mode = crate::store::FlushMode::SyncFlush;
        c.flush_timeout = flush_timeout;
        let store = MessageStore::open(c).expect("store");
        let repl = ReplicationManager::open(
            crate::testing::replication_config(
                dir,
                ReplicationMode::Async,
                Duration::from_secs(1),
                StartRole::Master,
            ),
            store.clone(),
        )
        .expect("replication");
        (store.clone(), WritePath::new(store, repl))
    }

    /// Keeps `store`'s flushes stalled (see [`MessageStore::stall_flushes`])
    /// from another thread until dropped (at most 60 s).
    struct Stall {
        release: Option<std::sync::mpsc::Sender<()>>,
        holder: Option<std::thread::JoinHandle<()>>,
    }

    impl Stall {
        fn new(store: &MessageStore) -> Self {
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            let store = store.clone();
            let holder = std::thread::spawn(move || {
                let _stalled = store.stall_flushes();
                let _ = held_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(60));
            });
            held_rx.recv().expect("flushes stalled");
            Self {
                release: Some(release),
                holder: Some(holder),
            }
        }
    }

    impl Drop for Stall {
        fn drop(&mut self) {
            self.release.take();
            if let Some(h) = self.holder.take() {
                let _ = h.join();
            }
        }
    }

    /// Waits (at most 10 s) until `done`.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 10 s: {what}");
    }

    /// A commit whose flush timed out is in the log although the producer
    /// was told it failed; under SYNC_FLUSH it may not even be readable yet
    /// (written behind a flush that has not returned). The producer's
    /// repeat must not write a second commit (the message would be
    /// delivered twice): it waits for the first, and answers OK once that
    /// is durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeated_decision_whose_flush_timed_out_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write, tx, id, stall) = a_commit_staged_behind_a_stall(dir.path()).await;
        let repeat = tx.end(&write, &id, "A", "orders", Decision::Commit).await;
        assert!(flush_timed_out(&repeat), "not durable yet: {repeat:?}");
        let other = tx.end(&write, &id, "A", "orders", Decision::Rollback).await;
        assert!(
            matches!(
                other,
                Err(EndError::Conflict {
                    previous: Decision::Commit,
                    ..
                })
            ),
            "the commit is in the log: {other:?}"
        );
        assert!(
            tx.due_checks(&write, now_ms() + 60_000).await.is_empty(),
            "not checked back while its decision is in the log"
        );
        drop(stall);
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("durable now");
        assert_eq!(orders(&store), ["A"], "committed once");
        assert_eq!(tx.stats.committed.load(Ordering::Relaxed), 1);
        tx.load();
        assert_eq!(tx.pending_count(), 0);
        store.shutdown().expect("shutdown");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        tx.load();
        assert_eq!(tx.pending_count(), 0);
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("idempotent after a restart");
        assert_eq!(orders(&store), ["A"]);
        store.shutdown().expect("shutdown");
    }

    /// A lone master under SYNC replication with no slave (no write is
    /// ever confirmed; each wait times out after `timeout_ms`), and its
    /// transactions.
    fn unconfirmable_master(
        dir: &std::path::Path,
        timeout_ms: u64,
    ) -> (MessageStore, WritePath, Transactions) {
        let (store, write) = crate::testing::lone_master_with(
            dir,
            crate::replication::ReplicationMode::Sync,
            Duration::from_millis(timeout_ms),
        );
        let tx = Transactions::new(store.clone(), cfg());
        (store, write, tx)
    }

    /// SYNC replication with no slave: every decision is appended, then not
    /// confirmed. A repeat arriving while the first request still waits
    /// must not answer OK (the decision is not as durable as promised): it
    /// waits for that request, then for the decision itself, and fails as
    /// it does; so does a later one. The decision is written once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_answers_as_the_decision_it_repeats_is_confirmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write, tx) = unconfirmable_master(dir.path(), 300);
        let a = store.append(half("A")).expect("half");
        let id = transaction_id(a.queue_offset, "A");
        tx.load();
        let (first, repeat) = tokio::join!(
            tx.end(&write, &id, "A", "orders", Decision::Commit),
            async {
                wait_until("the first request appended the commit", || {
                    store.queue_max_offset("orders", 1) == 1
                })
                .await;
                tx.end(&write, &id, "A", "orders", Decision::Commit).await
            }
        );
        for (what, got) in [("first", first), ("repeat", repeat)] {
            assert!(replication_timed_out(&got), "{what}: {got:?}");
        }
        let later = tx.end(&write, &id, "A", "orders", Decision::Commit).await;
        assert!(replication_timed_out(&later), "{later:?}");
        assert_eq!(orders(&store), ["A"], "written once");
        assert_eq!(tx.stats.committed.load(Ordering::Relaxed), 0);
        store.shutdown().expect("shutdown");
    }

    /// Under SYNC_FLUSH: writes half message A, stalls the flushes behind
    /// a record the flusher took, and commits A: the commit is appended and
    /// not even written (staged, not readable), and its flush times out.
    async fn a_commit_staged_behind_a_stall(
        dir: &std::path::Path,
    ) -> (MessageStore, WritePath, Transactions, String, Stall) {
        let (store, write) = sync_flush_master(dir);
        let tx = Transactions::new(store.clone(), cfg());
        let a = write.write_one(half("A")).await.expect("half");
        let id = transaction_id(a.queue_offset, "A");
        tx.load();
        let stall = Stall::new(&store);
        // The flusher writes this and stops in front of its flush; what is
        // appended after it waits, not written.
        store
            .append(NewRecord::new("other", 0, "x"))
            .expect("append");
        wait_until("the flusher took the first record", || {
            store.queue_max_offset("other", 0) == 1
        })
        .await;
        let first = tx.end(&write, &id, "A", "orders", Decision::Commit).await;
        assert!(flush_timed_out(&first), "{first:?}");
        assert_eq!(store.queue_max_offset("orders", 1), 0, "not readable yet");
        (store, write, tx, id, stall)
    }

    /// A commit appended and still staged for the flusher when the role
    /// changes is not in what the rebuild reads: neither a check-back round
    /// nor a repeat may take A for open (a check-back's answer or the repeat
    /// would write its commit again, and A would be delivered twice). The
    /// repeat fails as the flush does while the flush stalls, then answers
    /// OK; the commit is written once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decision_staged_at_a_role_change_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write, tx, id, stall) = a_commit_staged_behind_a_stall(dir.path()).await;
        role_change(&write);
        // The rebuild after the role change is made by the check-back
        // round: it checks nothing back while behind.
        assert!(
            tx.due_checks(&write, now_ms() + 3_600_000).await.is_empty(),
            "A is not taken for open"
        );
        let repeat = tx.end(&write, &id, "A", "orders", Decision::Commit).await;
        assert!(flush_timed_out(&repeat), "{repeat:?}");
        drop(stall);
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("durable now");
        assert_eq!(orders(&store), ["A"], "committed once");
        assert_eq!(store.queue_max_offset(OP_TOPIC, 0), 1, "one op record");
        store.shutdown().expect("shutdown");
    }

    /// Under SYNC_FLUSH: writes half message A, stalls the flushes, and
    /// commits A: the commit's flush times out, and it is written
    /// (readable) but not durable. Its transaction id, and the stall.
    async fn a_commit_written_not_flushed(
        store: &MessageStore,
        write: &WritePath,
        tx: &Transactions,
    ) -> (String, Stall) {
        let a = write.write_one(half("A")).await.expect("half");
        let id = transaction_id(a.queue_offset, "A");
        tx.load();
        let stall = Stall::new(store);
        let first = tx.end(write, &id, "A", "orders", Decision::Commit).await;
        assert!(flush_timed_out(&first), "{first:?}");
        wait_until("the commit is written (readable), not flushed", || {
            store.queue_max_offset(OP_TOPIC, 0) == 1
        })
        .await;
        assert_eq!(orders(store), ["A"]);
        (id, stall)
    }

    /// Promotes the master behind `write` again (a role change: the state
    /// is rebuilt from the log); its new role generation.
    fn role_change(write: &WritePath) -> u64 {
        let repl = write.replication();
        repl.promote(repl.epoch() + 1).expect("promote");
        super::super::role_generation(write)
    }

    /// A decision read back from the log when the state is rebuilt after a
    /// role change is not known to be durable: here the commit is written
    /// but its flush stalls (SYNC_FLUSH). A repeat must not answer OK
    /// before it is flushed (a power loss could still take it): it times
    /// out as the write did, then answers OK once the record is durable.
    /// The commit is written once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_after_a_role_change_waits_for_the_decision_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = sync_flush_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        let (id, stall) = a_commit_written_not_flushed(&store, &write, &tx).await;
        let generation = role_change(&write);
        let repeat = tx.end(&write, &id, "A", "orders", Decision::Commit).await;
        assert!(
            flush_timed_out(&repeat),
            "read back, not durable yet: {repeat:?}"
        );
        {
            let st = tx.state.lock();
            assert_eq!(st.basis, Some(generation), "rebuilt for the new role");
            assert!(
                matches!(
                    st.recent.get(&id).and_then(|r| r.unconfirmed),
                    Some(OpAt::Read { .. })
                ),
                "remembered from the log, with where its record is"
            );
        }
        let other = tx.end(&write, &id, "A", "orders", Decision::Rollback).await;
        assert!(
            matches!(
                other,
                Err(EndError::Conflict {
                    previous: Decision::Commit,
                    ..
                })
            ),
            "{other:?}"
        );
        drop(stall);
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("durable now");
        assert!(
            tx.state
                .lock()
                .recent
                .get(&id)
                .is_some_and(|r| r.unconfirmed.is_none()),
            "known durable from now on"
        );
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("answered at once");
        assert_eq!(orders(&store), ["A"], "committed once");
        assert_eq!(tx.pending_count(), 0);
        store.shutdown().expect("shutdown");
    }

    /// A lone master whose half message A is committed (and confirmed):
    /// its store, write path, transactions and A's transaction id.
    async fn committed_a(dir: &std::path::Path) -> (MessageStore, WritePath, Transactions, String) {
        let (store, write) = crate::testing::lone_master(dir);
        let tx = Transactions::new(store.clone(), cfg());
        let id = halves(&write, &["A"]).await.remove(0);
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("commit");
        (store, write, tx, id)
    }

    /// Where the decision of `id` remembered as resolved waits to be
    /// confirmed (`None`: known durable, or not remembered).
    fn unconfirmed(tx: &Transactions, id: &str) -> Option<OpAt> {
        tx.state.lock().recent.get(id).and_then(|r| r.unconfirmed)
    }

    /// A commit counted once, where its own append was confirmed, is read
    /// back from the log after each role change and confirmed again by a
    /// repeat: it is not counted again (the commit counter stays at 1).
    #[tokio::test]
    async fn a_decision_counted_once_is_not_counted_again_after_a_role_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write, tx, id) = committed_a(dir.path()).await;
        let counted = || tx.stats.committed.load(Ordering::Relaxed);
        assert_eq!(counted(), 1, "counted where it was confirmed");
        for round in 0..2 {
            role_change(&write);
            tx.sync(&write).expect("rebuilt from the log");
            assert!(
                matches!(unconfirmed(&tx, &id), Some(OpAt::Read { .. })),
                "round {round}: read back"
            );
            tx.end(&write, &id, "A", "orders", Decision::Commit)
                .await
                .expect("a repeat is answered");
            assert_eq!(unconfirmed(&tx, &id), None, "round {round}: confirmed");
            assert_eq!(counted(), 1, "round {round}: not counted again");
        }
        assert_eq!(orders(&store), ["A"], "committed once");
        store.shutdown().expect("shutdown");
    }

    /// A decision whose op record is read before its half message is
    /// loaded (kept aside until it is: `early_ops`) keeps where its record
    /// is. Under SYNC replication with no slave in sync, a repeat must not
    /// answer OK (the record is on no slave): it times out as a write does;
    /// once a slave has caught up it is answered. (The op record is
    /// appended before the half message here, so that the load reads it
    /// first every time, as a load racing both appends would.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decision_read_before_its_half_message_waits_for_its_record() {
        use crate::replication::{ReplicationConfig, ReplicationMode, StartRole};
        use crate::testing::{replication_config, serve_replication};
        let (d0, d1) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let timeout = Duration::from_millis(300);
        let open = |dir: &std::path::Path| {
            MessageStore::open(crate::testing::async_store_config(dir, 1 << 20)).expect("store")
        };
        let store = open(d0.path());
        let (master, master_addr) = serve_replication(
            &store,
            replication_config(d0.path(), ReplicationMode::Sync, timeout, StartRole::Master),
            std::future::pending(),
        )
        .await;
        let write = WritePath::new(store.clone(), master.clone());
        let tx = Transactions::new(store.clone(), cfg());
        store.append(half("A")).expect("half A");
        write
            .append(vec![unmarked_op(1, "B", Decision::Commit)])
            .expect("B's commit");
        tx.sync(&write).expect("built");
        {
            let st = tx.state.lock();
            assert!(
                matches!(
                    st.early_ops.get(&1),
                    Some((Decision::Commit, Some(OpAt::Read { .. })))
                ),
                "kept aside with where its record is"
            );
            assert_eq!(st.pending.len(), 1, "A");
        }
        let b = store.append(half("B")).expect("half B");
        assert_eq!(b.queue_offset, 1);
        let id = transaction_id(b.queue_offset, "B");
        tx.sync(&write).expect("up to date");
        assert!(tx.state.lock().early_ops.is_empty(), "B loaded");
        assert_eq!(tx.pending_count(), 1, "B is resolved, A open");
        let repeat = tx.end(&write, &id, "B", "orders", Decision::Commit).await;
        assert!(
            replication_timed_out(&repeat),
            "on no slave yet: {repeat:?}"
        );
        assert!(
            matches!(unconfirmed(&tx, &id), Some(OpAt::Read { .. })),
            "B remembered with where its commit is"
        );

        let slave_store = open(d1.path());
        let (slave, _) = serve_replication(
            &slave_store,
            ReplicationConfig {
                broker_id: "s".into(),
                ..replication_config(
                    d1.path(),
                    ReplicationMode::Sync,
                    timeout,
                    StartRole::Standby,
                )
            },
            std::future::pending(),
        )
        .await;
        slave.follow(master_addr, master.epoch()).expect("follow");
        wait_until("the slave to be in sync", || master.in_sync_slaves() == 1).await;
        tx.end(&write, &id, "B", "orders", Decision::Commit)
            .await
            .expect("on a slave now");
        assert_eq!(unconfirmed(&tx, &id), None, "known durable from now on");
        assert_eq!(
            tx.stats.committed.load(Ordering::Relaxed),
            0,
            "read back: not counted here"
        );
        slave.shutdown();
        master.shutdown();
        store.shutdown().expect("shutdown");
    }

    /// A decision read back from the log, then cut from it (with the
    /// message it committed) and the log grown past where it was: a repeat
    /// must not take the flushed offset past the record for its
    /// durability. The cut is seen, the state rebuilt from the log as it
    /// is now (A open again), and the repeat writes the commit again:
    /// A is delivered.
    #[tokio::test]
    async fn a_repeat_of_a_decision_read_back_then_cut_writes_it_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write, tx, id) = committed_a(dir.path()).await;
        role_change(&write);
        tx.sync(&write).expect("rebuilt from the log");
        assert!(
            tx.state
                .lock()
                .recent
                .get(&id)
                .is_some_and(|r| matches!(r.unconfirmed, Some(OpAt::Read { .. }))),
            "read back"
        );
        let committed_at = store
            .get("orders", 1, 0)
            .expect("read")
            .expect("committed")
            .offset;
        store.truncate_to(committed_at).expect("cut");
        assert!(orders(&store).is_empty(), "the cut took the commit");
        for i in 0..4u8 {
            write
                .write_one(NewRecord::new("other", 0, vec![i; 200]))
                .await
                .expect("filler");
        }
        tx.end(&write, &id, "A", "orders", Decision::Commit)
            .await
            .expect("written again");
        assert_eq!(orders(&store), ["A"]);
        assert_eq!(tx.pending_count(), 0);
        store.shutdown().expect("shutdown");
    }

    /// A repeat waiting for a decision read back from the log, when this
    /// broker follows another master meanwhile (whose stream may cut the
    /// log under the record), is not answered OK even though the record is
    /// flushed after that: it is refused, as a request to a slave is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_waiting_for_a_decision_read_back_is_refused_after_a_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Time enough for the follow to come while the repeat waits.
        let (store, write) = sync_flush_master_with(dir.path(), Duration::from_secs(2));
        let tx = Transactions::new(store.clone(), cfg());
        let (id, stall) = a_commit_written_not_flushed(&store, &write, &tx).await;
        let generation = role_change(&write);
        let (repeat, ()) = tokio::join!(
            tx.end(&write, &id, "A", "orders", Decision::Commit),
            async {
                wait_until("the repeat waits for the record read back", || {
                    let st = tx.state.lock();
                    st.basis == Some(generation)
                        && st
                            .recent
                            .get(&id)
                            .is_some_and(|r| matches!(r.unconfirmed, Some(OpAt::Read { .. })))
                })
                .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                let repl = write.replication();
                repl.follow("127.0.0.1:9".into(), repl.epoch() + 1)
                    .expect("follow");
                drop(stall);
            }
        );
        assert!(
            matches!(repeat, Err(EndError::Write(WriteError::Refused(_)))),
            "{repeat:?}"
        );
        assert_eq!(store.queue_max_offset(OP_TOPIC, 0), 1, "written once");
        write.replication().shutdown();
        store.shutdown().expect("shutdown");
    }

    /// SYNC replication with no slave: decisions are appended and never
    /// confirmed. After a restart the state is rebuilt from the log, where
    /// they are: one about a half message still loaded, one below the
    /// loaded range (remembered by its name only). Repeats must not answer
    /// OK, as neither record is on a slave: they time out as a write does.
    /// Reopened without SYNC replication, the same repeats are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_after_a_restart_waits_for_the_decision_to_be_replicated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write, tx) = unconfirmable_master(dir.path(), 200);
        let appended = write
            .append(vec![half("A"), half("B"), half("C")])
            .expect("halves");
        let ids: Vec<String> = ["A", "B", "C"]
            .iter()
            .zip(&appended)
            .map(|(m, a)| transaction_id(a.queue_offset, m))
            .collect();
        for (id, m, d) in [
            (&ids[0], "A", Decision::Commit),
            (&ids[1], "B", Decision::Rollback),
        ] {
            let got = tx.end(&write, id, m, "orders", d).await;
            assert!(replication_timed_out(&got), "{got:?}");
        }
        drop(tx);

        let tx = Transactions::new(store.clone(), cfg());
        assert_eq!(
            tx.state.lock().committed,
            1,
            "A is below the range B's op record says to load"
        );
        tx.load();
        assert_eq!(tx.pending_count(), 1, "C");
        for (id, m, d) in [
            (&ids[0], "A", Decision::Commit),
            (&ids[1], "B", Decision::Rollback),
        ] {
            let got = tx.end(&write, id, m, "orders", d).await;
            assert!(replication_timed_out(&got), "{m}: not on a slave: {got:?}");
        }
        assert_eq!(tx.stats.committed.load(Ordering::Relaxed), 0);
        store.shutdown().expect("shutdown");

        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        tx.end(&write, &ids[0], "A", "orders", Decision::Commit)
            .await
            .expect("durable under ASYNC replication");
        tx.end(&write, &ids[1], "B", "orders", Decision::Rollback)
            .await
            .expect("durable under ASYNC replication");
        assert_eq!(orders(&store), ["A"], "committed once");
        store.shutdown().expect("shutdown");
    }

    #[tokio::test]
    async fn progress_skips_what_a_restart_need_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        let ids = halves(&write, &["A", "B", "C"]).await;
        tx.end(&write, &ids[1], "B", "orders", Decision::Commit)
            .await
            .expect("commit");
        tx.end(&write, &ids[2], "C", "orders", Decision::Commit)
            .await
            .expect("commit");
        tx.load();
        {
            let st = tx.state.lock();
            assert_eq!(st.committed, 0, "A is still open");
            assert_eq!(
                st.op_committed, 0,
                "B's and C's ops are needed after a restart"
            );
        }
        tx.end(&write, &ids[0], "A", "orders", Decision::Rollback)
            .await
            .expect("rollback");
        tx.load();
        let meta = store.metadata();
        assert_eq!(meta.get_offset(TXN_GROUP, HALF_TOPIC, 0), Some(3));
        assert_eq!(meta.get_offset(TXN_GROUP, OP_TOPIC, 0), Some(3));
        // A restart still answers repeats of recent decisions.
        let again = Transactions::new(store.clone(), cfg());
        again
            .end(&write, &ids[0], "A", "orders", Decision::Rollback)
            .await
            .expect("idempotent after a restart");
        assert_eq!(again.pending_count(), 0);
    }

    #[tokio::test]
    async fn check_back_counts_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        write.write(vec![half("A")]).await.expect("write");
        let now = now_ms() + 1000;
        assert_eq!(tx.due_checks(&write, now).await[0].check, 1);
        // A restarted broker (or a promoted slave) continues the count: the
        // second check is the last one allowed, the third gives up.
        let again = Transactions::new(store.clone(), cfg());
        again.load();
        let second = again.due_checks(&write, now + 10).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].check, 2, "the count did not start over");
        assert!(again.due_checks(&write, now + 20).await.is_empty());
        assert_eq!(again.pending_count(), 0, "given up after the maximum");
        // Once the half message is resolved its check ops are not needed by
        // a restart: the op progress reaches the end of the op queue.
        let third = Transactions::new(store.clone(), cfg());
        third.load();
        assert_eq!(third.pending_count(), 0);
        assert_eq!(
            store.metadata().get_offset(TXN_GROUP, OP_TOPIC, 0),
            Some(store.queue_max_offset(OP_TOPIC, 0))
        );
        assert_eq!(
            store.queue_max_offset(OP_TOPIC, 0),
            3,
            "two checks and the discard"
        );
    }

    #[tokio::test]
    async fn a_restart_keeps_the_time_of_the_last_check_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let cfg = TransactionConfig {
            check_interval: Duration::from_secs(60),
            ..cfg()
        };
        let tx = Transactions::new(store.clone(), cfg.clone());
        write.write(vec![half("A")]).await.expect("write");
        assert_eq!(tx.due_checks(&write, now_ms()).await.len(), 1);
        // After a restart the next check is an interval after the last one
        // (its op record's time), not due again at once.
        let again = Transactions::new(store.clone(), cfg);
        again.load();
        assert!(again.due_checks(&write, now_ms()).await.is_empty());
        let second = again.due_checks(&write, now_ms() + 61_000).await;
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].check, 2);
    }

    #[tokio::test]
    async fn an_unreadable_half_message_is_still_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        let a = write.write(vec![half("A")]).await.expect("write")[0];
        // Loaded by the master (nothing is due at time 0).
        assert!(tx.due_checks(&write, 0).await.is_empty());
        // Damaged on disk after it was loaded.
        crate::testing::corrupt_on_disk(&store, &a);
        let now = now_ms() + 1000;
        for i in 0..3 {
            assert!(
                tx.due_checks(&write, now + 10 * i).await.is_empty(),
                "nothing to ask a producer about"
            );
        }
        assert_eq!(tx.pending_count(), 0, "discarded after the maximum checks");
        assert_eq!(tx.stats.discarded.load(Ordering::Relaxed), 1);
        // The discard is recorded under the transaction's topic and message.
        let again = Transactions::new(store.clone(), cfg());
        again.load();
        assert_eq!(again.pending_count(), 0);
        let id = transaction_id(a.queue_offset, "A");
        assert!(matches!(
            again
                .end(&write, &id, "A", "orders", Decision::Commit)
                .await,
            Err(EndError::Conflict {
                previous: Decision::Discard,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn unresolved_halves_are_checked_then_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let tx = Transactions::new(store.clone(), cfg());
        write.write(vec![half("A")]).await.expect("write");
        let now = now_ms() + 1000;
        let first = tx.due_checks(&write, now).await;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].check, 1);
        assert_eq!(first[0].message.topic, "orders");
        assert_eq!(first[0].message.queue_id, 1);
        assert!(
            tx.due_checks(&write, now).await.is_empty(),
            "not again before the interval"
        );
        assert_eq!(tx.due_checks(&write, now + 10).await.len(), 1);
        assert!(tx.due_checks(&write, now + 20).await.is_empty(), "given up");
        assert_eq!(tx.pending_count(), 0);
        assert_eq!(tx.stats.discarded.load(Ordering::Relaxed), 1);
        // The discard is durable.
        let again = Transactions::new(store.clone(), cfg());
        again.load();
        assert_eq!(again.pending_count(), 0);
        assert_eq!(store.queue_max_offset("orders", 1), 0);
    }

    /// What the model knows of one transaction.
    #[derive(Clone)]
    struct Modeled {
        tx_id: String,
        message_id: String,
        half_offset: u64,
        fate: Option<Decision>,
        checks: u32,
        /// The broker's next check-back is due within `[due_lo, due_hi]`
        /// (virtual ms): exact while the broker runs, a range after a
        /// restart, which takes the time of the last check from its op
        /// record (written at real time, within the call's bounds).
        due_lo: i64,
        due_hi: i64,
        /// When the half message was stored plus its first-check delay.
        first_due: i64,
        /// Real time around the call that made the last check-back.
        last_check_real: (i64, i64),
    }

    /// Random sends of transactional messages, decisions (repeated,
    /// conflicting, for the wrong topic, unknown), check-back rounds at
    /// random times, restarts of the transaction state and of the store,
    /// and power losses that take the log back to where it ended after an
    /// earlier step (the stored progress marks stay as they were, ahead of
    /// it): the model goes back to that step. After every step: EndTransaction answers as the model says,
    /// check-backs are never early, never late, count up by one and stop at
    /// the maximum, after which the half message is discarded; the pending
    /// count is the model's; and the real topic holds each committed
    /// message exactly once and nothing else.
    #[tokio::test]
    async fn random_transactions_keep_their_promises() {
        use rand::Rng;
        let mut rng = crate::testing::seeded_rng();
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, mut write) = crate::testing::lone_master(dir.path());
        let cfg = TransactionConfig {
            first_check: Duration::from_millis(100),
            check_interval: Duration::from_millis(200),
            max_checks: 3,
        };
        let interval = cfg.check_interval.as_millis() as i64;
        let mut tx = Transactions::new(store.clone(), cfg.clone());
        let mut txs: Vec<Modeled> = Vec::new();
        // Virtual time: ahead of the real clock by a growing skew.
        let mut skew = 0i64;
        // The end of the log after each step, and the model then.
        let mut history: Vec<(u64, Vec<Modeled>)> = Vec::new();
        let mut power_losses = 0;
        for step in 0..400 {
            match rng.random_range(0..100) {
                0..30 => {
                    let id = format!("M{step}");
                    let delay = rng
                        .random_bool(0.5)
                        .then(|| Duration::from_millis(rng.random_range(0..500)));
                    let rec = NewRecord::new("orders", rng.random_range(0..2), id.clone())
                        .with_property(keys::MESSAGE_ID, id.clone());
                    let a = write
                        .write_one(Transactions::hold(rec, delay))
                        .await
                        .expect("send half");
                    let wait = delay.unwrap_or_default().max(cfg.first_check);
                    let first_due = a.store_ms + wait.as_millis() as i64;
                    txs.push(Modeled {
                        tx_id: transaction_id(a.queue_offset, &id),
                        message_id: id,
                        half_offset: a.queue_offset,
                        fate: None,
                        checks: 0,
                        due_lo: first_due,
                        due_hi: first_due,
                        first_due,
                        last_check_real: (0, 0),
                    });
                }
                30..55 if !txs.is_empty() => {
                    // Mostly open transactions, so decisions race check-backs.
                    let open: Vec<usize> =
                        (0..txs.len()).filter(|&i| txs[i].fate.is_none()).collect();
                    let i = if !open.is_empty() && rng.random_bool(0.7) {
                        open[rng.random_range(0..open.len())]
                    } else {
                        rng.random_range(0..txs.len())
                    };
                    let decision = if rng.random_bool(0.5) {
                        Decision::Commit
                    } else {
                        Decision::Rollback
                    };
                    let t = &mut txs[i];
                    let (tx_id, topic) = match rng.random_range(0..20) {
                        0 => (format!("{:X}-nobody", t.half_offset + 10_000), "orders"),
                        1 => (t.tx_id.clone(), "payments"),
                        _ => (t.tx_id.clone(), "orders"),
                    };
                    let got = tx.end(&write, &tx_id, &t.message_id, topic, decision).await;
                    match (got, t.fate) {
                        (Err(EndError::Unknown(_)), _) if tx_id != t.tx_id => {}
                        (Err(EndError::Mismatch { .. }), _) if topic != "orders" => {}
                        (Ok(()), None) if tx_id == t.tx_id && topic == "orders" => {
                            t.fate = Some(decision)
                        }
                        (Ok(()), Some(d))
                            if d == decision && tx_id == t.tx_id && topic == "orders" => {}
                        (Err(EndError::Conflict { previous, .. }), Some(d))
                            if previous == d
                                && d != decision
                                && tx_id == t.tx_id
                                && topic == "orders" => {}
                        (got, fate) => panic!(
                            "step {step}: end({tx_id}, {topic}, {decision}) on a transaction \
                             {fate:?} gave {got:?}"
                        ),
                    }
                }
                55..80 => {
                    skew += rng.random_range(0..150);
                    let r0 = now_ms();
                    let now = r0 + skew;
                    let due = tx.due_checks(&write, now).await;
                    let r1 = now_ms();
                    let mut checked: HashMap<u64, u32> = HashMap::new();
                    for d in &due {
                        assert!(
                            checked.insert(d.half_offset, d.check).is_none(),
                            "step {step}: two checks of one"
                        );
                    }
                    let pending: BTreeSet<u64> = tx.state.lock().pending.keys().copied().collect();
                    for t in txs.iter_mut().filter(|t| t.fate.is_none()) {
                        if let Some(&check) = checked.get(&t.half_offset) {
                            assert!(
                                now >= t.due_lo,
                                "step {step}: {} checked {} ms early",
                                t.tx_id,
                                t.due_lo - now
                            );
                            assert_eq!(check, t.checks + 1, "step {step}: {} check count", t.tx_id);
                            assert!(check <= cfg.max_checks, "step {step}: too many checks");
                            t.checks = check;
                            (t.due_lo, t.due_hi) = (now + interval, now + interval);
                            t.last_check_real = (r0, r1);
                        } else if !pending.contains(&t.half_offset) {
                            assert!(
                                t.checks == cfg.max_checks && now >= t.due_lo,
                                "step {step}: {} discarded after {} checks, {} ms before due",
                                t.tx_id,
                                t.checks,
                                t.due_lo - now
                            );
                            t.fate = Some(Decision::Discard);
                        } else {
                            assert!(
                                now < t.due_hi,
                                "step {step}: {} overdue by {} ms and not checked",
                                t.tx_id,
                                now - t.due_hi
                            );
                        }
                    }
                    for d in &due {
                        let t = txs.iter().find(|t| t.half_offset == d.half_offset);
                        let t =
                            t.unwrap_or_else(|| panic!("step {step}: check of an unknown half"));
                        assert_eq!(t.tx_id, d.tx_id);
                        assert_eq!(d.message.topic, "orders");
                        assert_eq!(
                            d.message.properties.get(keys::MESSAGE_ID),
                            Some(&t.message_id)
                        );
                    }
                }
                80..92 => {
                    if rng.random_bool(0.5) {
                        store.shutdown().expect("shutdown");
                        (store, write) = crate::testing::lone_master(dir.path());
                    }
                    tx = Transactions::new(store.clone(), cfg.clone());
                    tx.load();
                    // The next check's time now comes from the op record.
                    for t in txs.iter_mut().filter(|t| t.fate.is_none() && t.checks > 0) {
                        t.due_lo = t.first_due.max(t.last_check_real.0 + interval);
                        t.due_hi = t.first_due.max(t.last_check_real.1 + interval);
                    }
                }
                92..96 if !history.is_empty() => {
                    let back = rng.random_range(0..history.len().min(20));
                    let (keep, before) = history[history.len() - 1 - back].clone();
                    let (end, seg) = (store.max_offset(), store.config().segment_size);
                    if keep > 0 && keep / seg == end.saturating_sub(1) / seg {
                        (store, write) = crate::testing::power_loss(dir.path(), &store, keep);
                        history.truncate(history.len() - back);
                        txs = before;
                        power_losses += 1;
                        tx = Transactions::new(store.clone(), cfg.clone());
                        tx.load();
                        for t in txs.iter_mut().filter(|t| t.fate.is_none() && t.checks > 0) {
                            t.due_lo = t.first_due.max(t.last_check_real.0 + interval);
                            t.due_hi = t.first_due.max(t.last_check_real.1 + interval);
                        }
                    }
                }
                _ => {}
            }
            tx.load();
            let open = txs.iter().filter(|t| t.fate.is_none()).count();
            assert_eq!(tx.pending_count(), open, "step {step}: pending");
            let mut committed: Vec<&str> = txs
                .iter()
                .filter(|t| t.fate == Some(Decision::Commit))
                .map(|t| t.message_id.as_str())
                .collect();
            committed.sort_unstable();
            let mut real: Vec<String> = Vec::new();
            for q in 0..2 {
                for r in store
                    .get_range("orders", q, 0, usize::MAX, usize::MAX)
                    .expect("read")
                {
                    assert_eq!(r.flags & flags::TRANSACTION_HALF, 0);
                    real.push(
                        r.properties
                            .get(keys::MESSAGE_ID)
                            .cloned()
                            .unwrap_or_default(),
                    );
                }
            }
            real.sort_unstable();
            assert_eq!(real, committed, "step {step}: the real topic");
            history.push((store.max_offset(), txs.clone()));
        }
        let fates = |d| txs.iter().filter(|t| t.fate == Some(d)).count();
        eprintln!(
            "{} transactions: {} committed, {} rolled back, {} discarded, {} open; {power_losses} power losses",
            txs.len(),
            fates(Decision::Commit),
            fates(Decision::Rollback),
            fates(Decision::Discard),
            txs.iter().filter(|t| t.fate.is_none()).count()
        );
        assert!(fates(Decision::Discard) > 0 && fates(Decision::Commit) > 0);
        store.shutdown().expect("shutdown");
    }
}
