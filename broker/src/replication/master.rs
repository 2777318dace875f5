//! The master side: accepts slaves, streams the commit log to each, and
//! tracks what every slave has acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::frame::{Frame, FrameError, Welcome, holds_whole_frame, read_frame, write_frame};
use super::{ReplicationError, ReplicationManager, ReplicationMode, Role};

/// Largest `Data` frame the master sends.
const MAX_BATCH: usize = 1024 * 1024;
/// A slave that sent nothing for this long is considered gone.
const SLAVE_SILENCE: Duration = Duration::from_secs(10);
/// How often an idle stream sends a heartbeat, and how often a busy one
/// interleaves one with its data: the heartbeat carries the master's log
/// end, from which a slave catching up tells how far behind it is.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// How often the master looks for metadata changes to send (consumer
/// progress changes with every receive; this bounds the frame rate).
const METADATA_EVERY: Duration = Duration::from_millis(200);

/// The one notion of "in sync" (with the stream connected): the slave has
/// acknowledged all but at most `max_lag` bytes of the master's log, which
/// ends at `master_end`. The master counts its slaves by it (SYNC sends,
/// status), and a slave judges its own readiness by it, from the end its
/// master last announced (see [`super::readiness`]).
pub(super) fn within_in_sync_lag(master_end: u64, acked: u64, max_lag: u64) -> bool {
    master_end.saturating_sub(acked) <= max_lag
}

/// What the master knows of one slave, as reported in status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlaveSnapshot {
    pub broker_id: String,
    pub admin_address: String,
    pub replication_address: String,
    pub acked_offset: u64,
    pub lag_bytes: u64,
    pub connected: bool,
    pub in_sync: bool,
    pub millis_since_last_ack: u64,
}

struct SlaveEntry {
    admin_address: String,
    replication_address: String,
    acked: u64,
    connected: bool,
    last_ack: Instant,
    session: u64,
}

/// Acknowledgements of every slave of this master, and the offset they
/// jointly confirm.
pub(super) struct SlaveTable {
    mode: ReplicationMode,
    min_in_sync: u32,
    in_sync_max_lag: u64,
    slaves: Mutex<HashMap<String, SlaveEntry>>,
    /// The highest offset that at least `min_in_sync` slaves hold.
    confirmed: watch::Sender<u64>,
    /// Bumped on every acknowledgement.
    acks: watch::Sender<u64>,
    /// Bumped to end every open session (role change).
    generation: watch::Sender<u64>,
    sessions: AtomicU64,
}

impl SlaveTable {
    pub(super) fn new(mode: ReplicationMode, min_in_sync: u32, in_sync_max_lag: u64) -> Self {
        Self {
            mode,
            min_in_sync,
            in_sync_max_lag,
            slaves: Mutex::new(HashMap::new()),
            confirmed: watch::channel(0).0,
            acks: watch::channel(0).0,
            generation: watch::channel(0).0,
            sessions: AtomicU64::new(0),
        }
    }

    pub(super) fn confirmed(&self) -> u64 {
        *self.confirmed.borrow()
    }

    /// Forgets every slave (after a promotion: a new epoch starts).
    pub(super) fn reset(&self) {
        self.disconnect_all();
        self.slaves.lock().clear();
        self.confirmed.send_replace(0);
    }

    /// Ends every open session.
    pub(super) fn disconnect_all(&self) {
        self.generation.send_modify(|g| *g += 1);
        for s in self.slaves.lock().values_mut() {
            s.connected = false;
        }
    }

    fn register(&self, broker_id: &str, admin: &str, replication: &str, from: u64) -> u64 {
        let session = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        self.slaves.lock().insert(
            broker_id.to_owned(),
            SlaveEntry {
                admin_address: admin.to_owned(),
                replication_address: replication.to_owned(),
                acked: from,
                connected: true,
                last_ack: Instant::now(),
                session,
            },
        );
        self.recompute();
        session
    }

    fn disconnected(&self, broker_id: &str, session: u64) {
        if let Some(s) = self.slaves.lock().get_mut(broker_id)
            && s.session == session
        {
            s.connected = false;
        }
    }

    fn ack(&self, broker_id: &str, session: u64, offset: u64) {
        {
            let mut slaves = self.slaves.lock();
            let Some(s) = slaves.get_mut(broker_id) else {
                return;
            };
            // A session ended by a role change (or replaced by a newer
            // one) no longer confirms anything.
            if s.session != session || !s.connected {
                return;
            }
            s.acked = s.acked.max(offset);
            s.last_ack = Instant::now();
        }
        self.recompute();
        self.acks.send_modify(|a| *a += 1);
    }

    /// Recomputes the jointly confirmed offset: the `min_in_sync`-th highest
    /// acknowledgement among the slaves of this epoch.
    fn recompute(&self) {
        let k = self.min_in_sync as usize;
        if k == 0 {
            return;
        }
        let mut acked: Vec<u64> = self.slaves.lock().values().map(|s| s.acked).collect();
        if acked.len() < k {
            return;
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let kth = acked[k - 1];
        self.confirmed.send_if_modified(|c| {
            if kth > *c {
                *c = kth;
                true
            } else {
                false
            }
        });
    }

    pub(super) async fn wait_confirmed(
        &self,
        end: u64,
        timeout: Duration,
    ) -> Result<(), ReplicationError> {
        let mut rx = self.confirmed.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|c| *c >= end)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ReplicationError::SlaveTimeout {
                offset: end,
                required: self.min_in_sync,
                confirmed: self
                    .slaves
                    .lock()
                    .values()
                    .filter(|s| s.acked >= end)
                    .count() as u32,
                timeout,
            }),
        }
    }

    pub(super) async fn wait_slave_acked(
        &self,
        broker_id: &str,
        end: u64,
        timeout: Duration,
    ) -> Result<(), ReplicationError> {
        let mut rx = self.acks.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let acked = self
                .slaves
                .lock()
                .get(broker_id)
                .map(|s| (s.acked, s.connected));
            match acked {
                Some((a, _)) if a >= end => return Ok(()),
                Some((_, true)) => {}
                _ => {
                    return Err(ReplicationError::Switchover(format!(
                        "{broker_id} disconnected before catching up"
                    )));
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(ReplicationError::Switchover(format!(
                    "{broker_id} did not catch up to {end} within {timeout:?}"
                )));
            }
        }
    }

    pub(super) fn replication_address_of(&self, broker_id: &str) -> Option<String> {
        self.slaves
            .lock()
            .get(broker_id)
            .filter(|s| s.connected)
            .map(|s| s.replication_address.clone())
    }

    /// Whether a slave is connected and within the in-sync lag of `master_end`.
    fn in_sync(&self, s: &SlaveEntry, master_end: u64) -> bool {
        s.connected && within_in_sync_lag(master_end, s.acked, self.in_sync_max_lag)
    }

    /// Slaves connected and within the in-sync lag of `master_end`.
    pub(super) fn in_sync_count(&self, master_end: u64) -> u32 {
        let slaves = self.slaves.lock();
        slaves
            .values()
            .filter(|s| self.in_sync(s, master_end))
            .count() as u32
    }

    pub(super) fn snapshot(&self, master_end: u64) -> Vec<SlaveSnapshot> {
        let now = Instant::now();
        let mut out: Vec<SlaveSnapshot> = self
            .slaves
            .lock()
            .iter()
            .map(|(id, s)| {
                let lag = master_end.saturating_sub(s.acked);
                SlaveSnapshot {
                    broker_id: id.clone(),
                    admin_address: s.admin_address.clone(),
                    replication_address: s.replication_address.clone(),
                    acked_offset: s.acked,
                    lag_bytes: lag,
                    connected: s.connected,
                    in_sync: self.in_sync(s, master_end),
                    millis_since_last_ack: now.duration_since(s.last_ack).as_millis() as u64,
                }
            })
            .collect();
        out.sort_by(|a, b| a.broker_id.cmp(&b.broker_id));
        let _ = self.mode;
        out
    }
}

/// Accepts slave connections until `shutdown` resolves.
pub(super) async fn accept_loop(
    manager: Arc<ReplicationManager>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) => {
                    let manager = manager.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_slave(manager, conn).await {
                            tracing::info!(%peer, error = %e, "replication session ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a replication connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn reject(w: &mut (impl tokio::io::AsyncWrite + Unpin), reason: String) -> ReplicationError {
    let _ = write_frame(
        w,
        &Frame::Reject {
            reason: reason.clone(),
        },
    )
    .await;
    ReplicationError::Io(reason)
}

fn io(e: FrameError) -> ReplicationError {
    ReplicationError::Io(e.to_string())
}

/// One slave's session: handshake, then stream records and read acks.
async fn serve_slave(
    manager: Arc<ReplicationManager>,
    conn: TcpStream,
) -> Result<(), ReplicationError> {
    let _ = conn.set_nodelay(true);
    let (rd, wr) = conn.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);
    let hello = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut rd)).await {
        Ok(Ok(Frame::Hello(h))) => h,
        Ok(Ok(other)) => {
            return Err(reject(&mut wr, format!("expected Hello, got {other:?}")).await);
        }
        Ok(Err(e)) => return Err(io(e)),
        Err(_) => return Err(ReplicationError::Io("no Hello within 10 s".into())),
    };
    let mut generation = manager.slaves.generation.subscribe();
    let (role, history) = {
        let st = manager.state.lock();
        (st.role, st.history.clone())
    };
    let epoch = history.last_epoch();
    if role != Role::Master {
        return Err(reject(
            &mut wr,
            format!("{} is not a master", manager.cfg.broker_id),
        )
        .await);
    }
    if hello.fence_epoch > epoch {
        tracing::warn!(
            slave = %hello.broker_id,
            slave_epoch = hello.fence_epoch,
            epoch,
            "a slave knows a newer epoch than this master: this master is stale"
        );
        return Err(reject(
            &mut wr,
            format!(
                "master epoch {epoch} is older than the slave's epoch {}",
                hello.fence_epoch
            ),
        )
        .await);
    }
    let store = manager.store.clone();
    write_frame(
        &mut wr,
        &Frame::Welcome(Welcome {
            broker_id: manager.cfg.broker_id.clone(),
            client_endpoint: manager.cfg.advertised_client.clone(),
            epoch,
            epochs: history.entries().to_vec(),
            max_offset: store.max_offset(),
            min_offset: store.min_offset(),
        }),
    )
    .await
    .map_err(io)?;
    let from = match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut rd)).await {
        Ok(Ok(Frame::Start { from })) => from,
        Ok(Ok(other)) => {
            return Err(reject(&mut wr, format!("expected Start, got {other:?}")).await);
        }
        Ok(Err(e)) => return Err(io(e)),
        Err(_) => return Err(ReplicationError::Io("no Start within 30 s".into())),
    };
    if from > store.max_offset() || from < store.min_offset() {
        return Err(reject(
            &mut wr,
            format!(
                "cannot stream from {from}: this master holds [{}, {})",
                store.min_offset(),
                store.max_offset()
            ),
        )
        .await);
    }
    let table = manager.slaves.clone();
    let session = table.register(
        &hello.broker_id,
        &hello.admin_address,
        &hello.replication_address,
        from,
    );
    tracing::info!(
        slave = %hello.broker_id,
        from,
        slave_end = hello.max_offset,
        epoch,
        "slave connected; streaming"
    );

    // Acks arrive on the read half.
    let ack_table = table.clone();
    let slave_id = hello.broker_id.clone();
    let mut acks = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(SLAVE_SILENCE, read_frame(&mut rd)).await {
                // Acks only grow: of a run already read, the last one counts.
                Ok(Ok(Frame::Ack { .. })) if holds_whole_frame(rd.buffer()) => {}
                Ok(Ok(Frame::Ack { offset })) => ack_table.ack(&slave_id, session, offset),
                Ok(Ok(other)) => return format!("unexpected frame {other:?}"),
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return format!("silent for {SLAVE_SILENCE:?}"),
            }
        }
    });

    let result = async {
        let mut pos = from;
        let metadata = store.metadata();
        let mut sent_version = metadata.version();
        write_frame(&mut wr, &Frame::Metadata(metadata.snapshot()))
            .await
            .map_err(io)?;
        let mut last_metadata = tokio::time::Instant::now();
        let mut last_sent = tokio::time::Instant::now();
        // When the slave was last told where this log ends (the Welcome
        // told it first).
        let mut end_told = tokio::time::Instant::now();
        loop {
            let notified = manager.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if last_metadata.elapsed() >= METADATA_EVERY {
                last_metadata = tokio::time::Instant::now();
                let version = metadata.version();
                if version != sent_version {
                    sent_version = version;
                    write_frame(&mut wr, &Frame::Metadata(metadata.snapshot()))
                        .await
                        .map_err(io)?;
                    last_sent = tokio::time::Instant::now();
                }
            }
            let end = store.max_offset();
            if pos < end && end_told.elapsed() >= HEARTBEAT_EVERY {
                // A slave streaming a backlog hears where the log ends now,
                // not only where it ended when it connected.
                write_frame(&mut wr, &Frame::Heartbeat { epoch, max_offset: end })
                    .await
                    .map_err(io)?;
                end_told = tokio::time::Instant::now();
            }
            if pos < end {
                let limit = history.next_epoch_start_after(pos).unwrap_or(u64::MAX);
                let max = (limit - pos).min(MAX_BATCH as u64) as usize;
                let bytes = store.read_raw(pos, max)?;
                if bytes.is_empty() {
                    return Err(ReplicationError::Io(format!("no records readable at {pos}")));
                }
                let chunk_epoch = history.epoch_at(pos).unwrap_or(epoch);
                let len = bytes.len() as u64;
                write_frame(&mut wr, &Frame::Data {
                    epoch: chunk_epoch,
                    offset: pos,
                    bytes,
                })
                .await
                .map_err(io)?;
                last_sent = tokio::time::Instant::now();
                pos += len;
                continue;
            }
            let heartbeat_due = last_sent + HEARTBEAT_EVERY;
            let wake = heartbeat_due.min(last_metadata + METADATA_EVERY);
            tokio::select! {
                _ = &mut notified => {
                    // Let the other appends that are ready run first, so one
                    // frame (one write, one ack) carries them all.
                    tokio::task::yield_now().await;
                }
                _ = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= heartbeat_due {
                        write_frame(&mut wr, &Frame::Heartbeat { epoch, max_offset: end }).await.map_err(io)?;
                        last_sent = tokio::time::Instant::now();
                        end_told = last_sent;
                    }
                }
                _ = generation.changed() => {
                    return Err(ReplicationError::Io("role changed; closing the stream".into()));
                }
                reason = &mut acks => {
                    return Err(ReplicationError::Io(format!(
                        "slave stream closed: {}",
                        reason.unwrap_or_else(|e| e.to_string())
                    )));
                }
            }
        }
    }
    .await;
    acks.abort();
    table.disconnected(&hello.broker_id, session);
    tracing::info!(slave = %hello.broker_id, "slave disconnected");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn confirmed_offset_is_the_kth_highest_ack() {
        let t = SlaveTable::new(ReplicationMode::Sync, 2, 1024);
        let a = t.register("a", "", "", 0);
        let b = t.register("b", "", "", 0);
        let c = t.register("c", "", "", 0);
        t.ack("a", a, 300);
        assert_eq!(t.confirmed(), 0, "one slave is not enough for two");
        t.ack("b", b, 200);
        assert_eq!(t.confirmed(), 200);
        t.ack("c", c, 250);
        assert_eq!(t.confirmed(), 250);
        // A stale session's acks are ignored.
        t.ack("c", c + 100, 10_000);
        assert_eq!(t.confirmed(), 250);
    }

    #[tokio::test]
    async fn waiting_times_out_with_the_count_of_confirming_slaves() {
        let t = SlaveTable::new(ReplicationMode::Sync, 2, 1024);
        let a = t.register("a", "", "", 0);
        t.register("b", "", "", 0);
        t.ack("a", a, 100);
        match t.wait_confirmed(100, Duration::from_millis(20)).await {
            Err(ReplicationError::SlaveTimeout {
                offset: 100,
                required: 2,
                confirmed: 1,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn waiters_are_released_by_acks() {
        let t = Arc::new(SlaveTable::new(ReplicationMode::Sync, 1, 1024));
        let a = t.register("a", "", "", 0);
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_confirmed(500, Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        t.ack("a", a, 600);
        waiter.await.expect("join").expect("confirmed");
    }
}
