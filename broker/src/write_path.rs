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
        let gate = self.replication.admit().map_err(WriteError::Refused)?;
        let appended = self
            .store
            .append_batch(records)
            .map_err(WriteError::Store)?;
        drop(gate);
        // One append: contiguous, the last record ends it.
        let Some(last) = appended.last() else {
            return Ok(appended);
        };
        let end = last.end_offset;
        self.store
            .wait_appended(last)
            .await
            .map_err(Self::flush_error)?;
        self.replication
            .wait_replicated(end)
            .await
            .map_err(WriteError::ReplicationTimeout)?;
        Ok(appended)
    }

    /// Waits for a consumer's delivery record (ending at `end`): always for
    /// the local flush the flush mode promises, for the slaves only when
    /// enough of them are in sync to confirm it, and at most the replication
    /// timeout. Consumers keep being served when the slaves cannot confirm
    /// (as RocketMQ's POP does with its checkpoints); `Ok(false)` says so:
    /// a failover may then make such a delivery again.
    pub async fn wait_delivery_record(&self, end: u64) -> Result<bool, WriteError> {
        self.wait_flushed(end).await?;
        if !self.replication.can_confirm() {
            return Ok(false);
        }
        Ok(self.replication.wait_replicated(end).await.is_ok())
    }

    async fn wait_flushed(&self, end: u64) -> Result<(), WriteError> {
        self.store
            .wait_flushed(end)
            .await
            .map_err(Self::flush_error)
    }

    fn flush_error(e: StoreError) -> WriteError {
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
