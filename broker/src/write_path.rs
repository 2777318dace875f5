//! The one way records enter a broker's commit log on behalf of a client
//! (sends, commits, re-deliveries, state records): role check, append
//! (the store wakes the replication streams when the records become
//! readable), then wait for what the flush mode and the replication mode
//! promise before the caller acknowledges anything.

use std::sync::Arc;

use crate::replication::{ReplicationError, ReplicationManager};
use crate::store::{Appended, MessageStore, NewRecord, StoreError};

/// Why a write was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Not the master, or writes are paused: nothing was written.
    #[error(transparent)]
    Refused(ReplicationError),
    /// Nothing was written (bad input, full disk, ...).
    #[error(transparent)]
    Store(StoreError),
    /// Written locally but not flushed in time under SYNC_FLUSH: the client
    /// must treat the send as failed (it may still be delivered).
    #[error("not flushed in time: {0}")]
    FlushTimeout(StoreError),
    /// Written and flushed locally but not confirmed by enough slaves in
    /// time under SYNC replication: the send fails (it may still be delivered).
    #[error(transparent)]
    ReplicationTimeout(ReplicationError),
}

/// Appends and waits for durability as configured.
#[derive(Clone)]
pub struct WritePath {
    store: MessageStore,
    replication: Arc<ReplicationManager>,
}

impl WritePath {
    pub fn new(store: MessageStore, replication: Arc<ReplicationManager>) -> Self {
        Self { store, replication }
    }

    pub fn store(&self) -> &MessageStore {
        &self.store
    }

    pub fn replication(&self) -> &Arc<ReplicationManager> {
        &self.replication
    }

    /// Writes `records` contiguously and returns once they are as durable as
    /// the flush and replication modes promise.
    pub async fn write(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, WriteError> {
        let appended = self.append(records)?;
        // One append: contiguous, the last record ends it.
        if let Some(last) = appended.last() {
            self.confirm(last).await?;
        }
        Ok(appended)
    }

    /// The first half of [`WritePath::write`]: appends `records`
    /// contiguously through the write gate and returns where they went,
    /// not yet confirmed. For a writer that must know where its records are
    /// even when the wait for them fails (they are in the log, and may yet
    /// become durable): it then calls [`WritePath::confirm`].
    pub fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, WriteError> {
        let gate = self.replication.admit().map_err(WriteError::Refused)?;
        let appended = self
            .store
            .append_batch(records)
            .map_err(WriteError::Store)?;
        drop(gate);
        Ok(appended)
    }

    /// The second half of [`WritePath::write`]: waits until the append
    /// ending with `last` is as durable as the flush and replication modes
    /// promise. Fails with [`StoreError::Truncated`] if the log was cut
    /// under it meanwhile. May be called again after a timeout.
    pub async fn confirm(&self, last: &Appended) -> Result<(), WriteError> {
        self.store
            .wait_appended(last)
            .await
            .map_err(Self::flush_error)?;
        self.replication
            .wait_replicated(last.end_offset)
            .await
            .map_err(WriteError::ReplicationTimeout)
    }

    /// Waits until the log up to `end` is as durable as a write must be,
    /// as [`WritePath::confirm`] does, but with no check for a cut under
    /// it: for records read back from the log, whose caller tells a cut
    /// otherwise (see the transactions' repeated decisions).
    pub(crate) async fn confirm_to(&self, end: u64) -> Result<(), WriteError> {
        self.store
            .wait_flushed(end)
            .await
            .map_err(Self::flush_error)?;
        self.replication
            .wait_replicated(end)
            .await
            .map_err(WriteError::ReplicationTimeout)
    }

    /// Waits for a consumer's delivery records (`recorded`: one append, or
    /// the span of several, with the log's cut count before the first):
    /// always for the local flush the flush mode promises, failing with
    /// [`StoreError::Truncated`] if the log was cut under them meanwhile
    /// (this broker followed another master: the records are gone, and a
    /// later flush past their end says nothing about them); for the slaves
    /// only when enough of them are in sync to confirm it, and at most the
    /// replication timeout. Consumers keep being served when the slaves
    /// cannot confirm (as RocketMQ's POP does with its checkpoints);
    /// `Ok(false)` says so: a failover may then make such a delivery again.
    pub async fn wait_delivery_record(&self, recorded: &Appended) -> Result<bool, WriteError> {
        self.store
            .wait_appended(recorded)
            .await
            .map_err(Self::flush_error)?;
        if !self.replication.can_confirm() {
            return Ok(false);
        }
        Ok(self
            .replication
            .wait_replicated(recorded.end_offset)
            .await
            .is_ok())
    }

    /// The error of a write whose wait for the flush failed with `e`.
    pub(crate) fn flush_error(e: StoreError) -> WriteError {
        match e {
            StoreError::FlushTimeout { .. } => WriteError::FlushTimeout(e),
            other => WriteError::Store(other),
        }
    }

    /// Writes one record; see [`WritePath::write`].
    pub async fn write_one(&self, record: NewRecord) -> Result<Appended, WriteError> {
        let mut v = self.write(vec![record]).await?;
        v.pop()
            .ok_or_else(|| WriteError::Store(StoreError::InvalidArgument("empty append".into())))
    }
}
