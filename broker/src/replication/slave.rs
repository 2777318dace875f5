//! The slave side: connects to the master, truncates a divergent tail at the
//! fork point, then copies the stream into the local commit log and
//! acknowledges what it holds.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};
use tokio::net::TcpStream;

use super::epoch::{EpochHistory, fork_point};
use super::frame::{Frame, FrameError, Hello, holds_whole_frame, read_frame, write_frame};
use super::{ReplicationError, ReplicationManager, Role, RoleState};

/// A master that sends nothing (not even a heartbeat) for this long is gone.
const MASTER_SILENCE: Duration = Duration::from_secs(5);

/// Bytes read from the master's stream at a time.
const READ_BUFFER: usize = 256 * 1024;

fn io(e: FrameError) -> ReplicationError {
    ReplicationError::Io(e.to_string())
}

/// Follows `master_address` in `epoch` until the task is aborted
/// (promotion, another follow, shutdown), reconnecting with back-off.
/// `session` numbers this follow, for the slave's readiness.
pub(super) async fn follow_loop(
    manager: Arc<ReplicationManager>,
    master_address: String,
    epoch: u64,
    session: u64,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow_once(&manager, &master_address, epoch, session, &mut backoff).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(master = %master_address, error = %e, "replication stream interrupted; retrying");
            }
        }
        manager.follower_connected.send_replace(false);
        manager.stream_progress(session, |p| p.connected = false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn follow_once(
    manager: &Arc<ReplicationManager>,
    master_address: &str,
    fence: u64,
    session: u64,
    backoff: &mut Duration,
) -> Result<(), ReplicationError> {
    let conn = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(master_address))
        .await
        .map_err(|_| ReplicationError::Io(format!("connect to {master_address} timed out")))?
        .map_err(|e| ReplicationError::Io(format!("connect to {master_address}: {e}")))?;
    let _ = conn.set_nodelay(true);
    let (rd, wr) = conn.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let mut wr = BufWriter::new(wr);
    let store = manager.store.clone();
    let ours = manager.history();
    let our_end = store.max_offset();
    write_frame(
        &mut wr,
        &Frame::Hello(Hello {
            broker_id: manager.cfg.broker_id.clone(),
            store_id: store.store_id().to_owned(),
            epochs: ours.entries().to_vec(),
            max_offset: our_end,
            fence_epoch: fence,
            admin_address: manager.cfg.advertised_admin.clone(),
            replication_address: manager.cfg.advertised_replication.clone(),
        }),
    )
    .await
    .map_err(io)?;
    let welcome = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut rd)).await {
        Ok(Ok(Frame::Welcome(w))) => w,
        Ok(Ok(Frame::Reject { reason })) => {
            return Err(ReplicationError::Io(format!("master refused: {reason}")));
        }
        Ok(Ok(other)) => return Err(ReplicationError::Io(format!("unexpected {other:?}"))),
        Ok(Err(e)) => return Err(io(e)),
        Err(_) => {
            return Err(ReplicationError::Io(
                "no answer to Hello within 10 s".into(),
            ));
        }
    };
    if welcome.epoch < fence {
        return Err(ReplicationError::StaleEpoch {
            requested: welcome.epoch,
            known: fence,
        });
    }
    let theirs = EpochHistory::from_entries(welcome.epochs.clone())
        .map_err(|e| ReplicationError::Io(format!("master sent an invalid epoch history: {e}")))?;
    let fork = fork_point(&ours, our_end, &theirs, welcome.max_offset);
    if fork < our_end {
        tracing::warn!(
            master = %welcome.broker_id,
            our_end,
            fork,
            discarded_bytes = our_end - fork,
            "this log diverged from the master's; truncating at the fork point"
        );
        manager.cut_log_at(master_address, fence, fork)?;
    }
    if store.max_offset() < welcome.min_offset {
        // The master's retention deleted what this log needs next: nothing
        // the master holds can follow it. Start again where the master's
        // log starts (what is discarded is older than anything the master
        // still keeps).
        tracing::warn!(
            master = %welcome.broker_id,
            our_end = store.max_offset(),
            master_start = welcome.min_offset,
            "this log ends before the master's oldest segment; discarding it to copy the master's log from its start"
        );
        manager.restart_log_at(master_address, fence, welcome.min_offset, &theirs)?;
    }
    let mut pos = store.max_offset();
    write_frame(&mut wr, &Frame::Start { from: pos })
        .await
        .map_err(io)?;
    manager.set_master_client(
        (!welcome.client_endpoint.is_empty()).then(|| welcome.client_endpoint.clone()),
    );
    manager.follower_connected.send_replace(true);
    manager.stream_progress(session, |p| {
        p.connected = true;
        p.master_epoch = welcome.epoch;
        p.master_end = welcome.max_offset;
        p.acked = pos;
    });
    *backoff = Duration::from_millis(100);
    tracing::info!(master = %welcome.broker_id, epoch = welcome.epoch, from = pos, "following");

    let mut unacked = false;
    loop {
        let frame = match tokio::time::timeout(MASTER_SILENCE, read_frame(&mut rd)).await {
            Ok(f) => f.map_err(io)?,
            Err(_) => {
                return Err(ReplicationError::Io(format!(
                    "master silent for {MASTER_SILENCE:?}"
                )));
            }
        };
        match frame {
            Frame::Data {
                epoch,
                offset,
                bytes,
            } => {
                // Data carries the epoch it was written in, which may be older
                // than the master's current one (a slave catching up after a
                // failover); it can never be newer than the master announced.
                if epoch > welcome.epoch {
                    return Err(ReplicationError::Io(format!(
                        "data of epoch {epoch} from a master of epoch {}",
                        welcome.epoch
                    )));
                }
                if offset != pos {
                    return Err(ReplicationError::Io(format!(
                        "stream gap: expected offset {pos}, got {offset}"
                    )));
                }
                if epoch > manager.epoch() {
                    manager.record_epoch(epoch, offset)?;
                }
                // Under the role state, as a cut is: the abort of a stream
                // replaced by a promotion or another follow takes effect at
                // its next await only, and a stream whose frames are all
                // ready already could otherwise go on appending the old
                // master's records after the promotion began its epoch at
                // the old end (or after a follow of another master).
                pos = manager.while_following(master_address, fence, |_| {
                    store.append_raw(offset, &bytes).map_err(Into::into)
                })?;
                unacked = true;
            }
            Frame::Heartbeat { epoch, max_offset } => {
                if epoch < fence {
                    return Err(ReplicationError::StaleEpoch {
                        requested: epoch,
                        known: fence,
                    });
                }
                manager.stream_progress(session, |p| {
                    p.master_epoch = epoch;
                    p.master_end = max_offset;
                });
                unacked = true;
            }
            Frame::Metadata(snapshot) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.metadata().apply_snapshot(snapshot))
                    .await
                    .map_err(|e| ReplicationError::Io(format!("metadata task: {e}")))??;
            }
            other => return Err(ReplicationError::Io(format!("unexpected {other:?}"))),
        }
        // When the next frame is already here it is handled first, and a run
        // of frames is flushed and acknowledged once, at its end: the master
        // learns the same offset, with one flush and one ack instead of one
        // per frame.
        if unacked && !holds_whole_frame(rd.buffer()) {
            if manager.cfg.slave_flush_before_ack {
                store.flush()?;
            }
            write_frame(&mut wr, &Frame::Ack { offset: pos })
                .await
                .map_err(io)?;
            manager.stream_progress(session, |p| p.acked = pos);
            unacked = false;
        }
    }
}

impl ReplicationManager {
    /// Slave side: the stream crossed into a new epoch at `offset`.
    pub(super) fn record_epoch(&self, epoch: u64, offset: u64) -> Result<(), ReplicationError> {
        let mut st = self.state.lock();
        let mut history = st.history.clone();
        history.begin(epoch, offset)?;
        history.save(&self.cfg.data_dir.join("epochs.json"))?;
        st.history = history;
        Ok(())
    }

    /// Slave side: holds the role state while the log is changed under a
    /// follow of `master` in `fence`, if that follow is still current. A
    /// promotion or another follow waits for the change to end, and one
    /// that came first makes this refuse: the follower task's abort cannot
    /// interrupt a blocking cut, which could otherwise remove the epoch a
    /// promotion had just begun at the old end, nor a run of appends of
    /// frames already received.
    fn while_following<T>(
        &self,
        master: &str,
        fence: u64,
        change: impl FnOnce(&mut RoleState) -> Result<T, ReplicationError>,
    ) -> Result<T, ReplicationError> {
        let mut st = self.state.lock();
        if st.role != Role::Slave
            || st.fence_epoch != fence
            || st.master_address.as_deref() != Some(master)
        {
            return Err(ReplicationError::Io(format!(
                "no longer following {master} in epoch {fence}; the log is left as it is"
            )));
        }
        change(&mut st)
    }

    /// Slave side: cuts the log and the epoch history at the fork point.
    fn cut_log_at(&self, master: &str, fence: u64, fork: u64) -> Result<(), ReplicationError> {
        self.while_following(master, fence, |st| {
            self.store.truncate_to(fork)?;
            let mut history = st.history.clone();
            history.truncate_to(fork);
            history.save(&self.cfg.data_dir.join("epochs.json"))?;
            st.history = history;
            Ok(())
        })
    }

    /// Slave side: the log starts again, empty, at `base`, where the
    /// master's (history `theirs`) starts. The history goes first: one that
    /// knows epochs past the log's end is harmless (the next fork point is
    /// still the log's end), while a log starting at `base` under the old
    /// history could make a later fork point fall before the log's start.
    fn restart_log_at(
        &self,
        master: &str,
        fence: u64,
        base: u64,
        theirs: &EpochHistory,
    ) -> Result<(), ReplicationError> {
        self.while_following(master, fence, |st| {
            let mut history = theirs.clone();
            history.truncate_to(base);
            history.save(&self.cfg.data_dir.join("epochs.json"))?;
            st.history = history;
            self.store.restart_at(base)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::replication::{ReplicationMode, StartRole};
    use crate::store::{MessageStore, NewRecord};

    /// A promotion that lands while a follow's handshake is about to cut
    /// the log must win: the cut (which an abort cannot interrupt once it
    /// runs) is refused, so the log and the epoch the promotion began at
    /// its end stay.
    #[tokio::test]
    async fn a_cut_for_a_follow_a_promotion_ended_leaves_the_log_and_the_new_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MessageStore::open(crate::testing::async_store_config(dir.path(), 64 * 1024))
            .expect("store");
        for i in 0..20u32 {
            store
                .append(NewRecord::new("orders", 0, vec![i as u8; 100]))
                .expect("append");
        }
        let end = store.max_offset();
        let cfg = crate::testing::replication_config(
            dir.path(),
            ReplicationMode::Sync,
            Duration::from_secs(1),
            StartRole::Standby,
        );
        let manager = ReplicationManager::open(cfg, store.clone()).expect("manager");
        // Port 9 on loopback refuses: the follow loop just retries.
        let master = "127.0.0.1:9";
        manager.follow(master.into(), 3).expect("follow");
        // While the follow is current a cut goes through (here: to the end).
        manager
            .cut_log_at(master, 3, end)
            .expect("cut while following");
        manager.promote(4).expect("promote");
        let err = manager.cut_log_at(master, 3, 0);
        assert!(err.is_err(), "a cut for an ended follow is refused");
        assert_eq!(store.max_offset(), end, "the log is not cut");
        assert_eq!(
            manager.history().last().map(|e| (e.epoch, e.start_offset)),
            Some((4, end)),
            "the promotion's epoch stays"
        );
        let theirs = EpochHistory::default();
        assert!(
            manager
                .restart_log_at(master, 3, 64 * 1024, &theirs)
                .is_err()
        );
        assert_eq!(store.max_offset(), end);
        manager.shutdown();
        store.shutdown().expect("shutdown");
    }
}
