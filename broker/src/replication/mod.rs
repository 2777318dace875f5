//! Master → slave replication, roles and epochs.
//!
//! A broker is either the **master** of an epoch, accepting writes and
//! streaming its commit log to every connected slave, or a **slave** that
//! follows one master: it copies the master's commit log byte for byte into
//! its own, builds its own consume queues from it, and reports the offset it
//! holds. A broker started in `standby` is a slave without a master until
//! the controller (the `keelmq dev` supervisor or the operator) tells it to
//! [`ReplicationManager::promote`] or [`ReplicationManager::follow`].
//!
//! Durability contract of a write (see [`ReplicationManager::wait_replicated`]):
//! under `SYNC` replication a send is acknowledged once the master and at
//! least `min_in_sync_replicas` slaves hold it; if they do not confirm within
//! the timeout the send fails (never silently downgraded). Under `ASYNC` it
//! is acknowledged after the master's own write.
//!
//! Epochs fence old masters: a slave never accepts a stream from a master of
//! an epoch lower than the highest it has been told about, and a returning
//! old master truncates its log at the fork point before following.

pub mod epoch;
#[cfg(test)]
mod fork_model_tests;
pub mod frame;
mod master;
mod readiness;
mod slave;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::{MessageStore, PublishSignal, StoreError};
use epoch::{EpochEntry, EpochError, EpochHistory};
pub use master::SlaveSnapshot;
pub use readiness::Readiness;
use readiness::StreamProgress;

/// How a master acknowledges writes with respect to its slaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Acknowledge after the master and `min_in_sync_replicas` slaves hold the write.
    Sync,
    /// Acknowledge after the master's own write; slaves catch up in the background.
    Async,
}

impl std::fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicationMode::Sync => "SYNC",
            ReplicationMode::Async => "ASYNC",
        })
    }
}

/// The role a broker takes when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StartRole {
    /// A stand-alone master: accepts writes at once (epoch 1 on a new data directory).
    Master,
    /// Waits, read-only, until told to promote or follow.
    Standby,
}

/// Settings of the replication component.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    pub broker_id: String,
    pub mode: ReplicationMode,
    pub min_in_sync_replicas: u32,
    /// How long a SYNC write waits for slave confirmations.
    pub sync_timeout: Duration,
    /// A slave this far behind the master's end (bytes) is reported out of sync.
    pub in_sync_max_lag_bytes: u64,
    /// Where this broker listens for slaves.
    pub listen: SocketAddr,
    /// Addresses this broker announces to its peers.
    pub advertised_replication: String,
    pub advertised_admin: String,
    /// Client endpoint announced to slaves, so their routes point clients here.
    pub advertised_client: String,
    /// Directory holding `epochs.json` and `role.json`.
    pub data_dir: PathBuf,
    pub start_role: StartRole,
    /// Flush the slave's copy before acknowledging (SYNC_FLUSH brokers).
    pub slave_flush_before_ack: bool,
}

/// Why a write or a role change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("this broker is not the master (role {role}); writes go to the master")]
    NotMaster { role: Role },
    #[error("writes are paused for a switchover")]
    WritesPaused,
    #[error(
        "only {confirmed} of the required {required} slaves confirmed offset {offset} within {timeout:?}"
    )]
    SlaveTimeout {
        offset: u64,
        required: u32,
        confirmed: u32,
        timeout: Duration,
    },
    #[error("epoch {requested} is stale: this broker already knows epoch {known}")]
    StaleEpoch { requested: u64, known: u64 },
    #[error(transparent)]
    Epoch(#[from] EpochError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("switchover failed: {0}")]
    Switchover(String),
    #[error("replication i/o: {0}")]
    Io(String),
}

/// The role of this broker right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Master,
    Slave,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Slave => "slave",
        })
    }
}

/// A consistent snapshot of the replication state, for status reporting.
#[derive(Clone, Debug)]
pub struct ReplicationStatus {
    pub role: Role,
    pub epoch: u64,
    pub epochs: Vec<EpochEntry>,
    pub writable: bool,
    /// For a slave: the master it follows.
    pub master_address: Option<String>,
    /// For a slave: whether its stream is currently connected.
    pub connected_to_master: bool,
    /// For a master: its slaves.
    pub slaves: Vec<SlaveSnapshot>,
    /// Highest offset acknowledged under the replication mode.
    pub confirmed_offset: u64,
    pub mode: ReplicationMode,
    pub min_in_sync_replicas: u32,
}

/// Persisted role facts that must survive restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct FenceFile {
    /// Highest epoch this broker has been told about.
    fence_epoch: u64,
}

struct RoleState {
    role: Role,
    writable: bool,
    history: EpochHistory,
    fence_epoch: u64,
    master_address: Option<String>,
    /// The client endpoint the followed master announced.
    master_client: Option<String>,
    follower: Option<JoinHandle<()>>,
    /// The number of the current follow (see `StreamProgress::session`),
    /// raised by every follow and promotion.
    follow_session: u64,
}

/// Owner of this broker's role, epoch history and replication connections.
pub struct ReplicationManager {
    cfg: ReplicationConfig,
    store: MessageStore,
    state: Mutex<RoleState>,
    slaves: Arc<master::SlaveTable>,
    /// The store's: notified whenever records become readable, so master
    /// streams wake at once.
    appended: Arc<PublishSignal>,
    /// Slave side: whether the stream to the master is up.
    follower_connected: watch::Sender<bool>,
    /// Slave side: what the current stream from the master says, for
    /// [`ReplicationManager::readiness`].
    stream: Mutex<Option<StreamProgress>>,
    role_changed: watch::Sender<u64>,
    /// Held shared by a client write from the writability check until its
    /// records are in the store (see [`ReplicationManager::admit`]), and
    /// exclusively by a switchover while it stops writes: once it has the
    /// lock, every write that was let in is in the log.
    write_gate: RwLock<()>,
}

/// Puts writes back on when a switchover ends before the target took over
/// (an error, or the switchover's future dropped).
struct ResumeWrites<'a> {
    manager: &'a ReplicationManager,
    armed: bool,
}

impl Drop for ResumeWrites<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.manager.set_writable(true);
        }
    }
}

impl ReplicationManager {
    /// Loads the epoch history and sets the starting role. Does not open
    /// any socket: call [`ReplicationManager::serve`] for that.
    pub fn open(
        cfg: ReplicationConfig,
        store: MessageStore,
    ) -> Result<Arc<Self>, ReplicationError> {
        let mut history = EpochHistory::load(&cfg.data_dir.join("epochs.json"))?;
        let fence = load_fence(&cfg.data_dir)?;
        // A log written past the history's knowledge cannot exist unless the
        // history is empty and the log is not (a store created before
        // epochs existed): treat it as epoch 1 from the start.
        let end = store.max_offset();
        if history.is_empty() && end > store.min_offset() {
            history.begin(1, store.min_offset())?;
            history.save(&cfg.data_dir.join("epochs.json"))?;
        }
        let mut fence_epoch = fence.fence_epoch.max(history.last_epoch());
        let role = match cfg.start_role {
            StartRole::Master => {
                if history.is_empty() {
                    history.begin(fence_epoch.max(1), end)?;
                    history.save(&cfg.data_dir.join("epochs.json"))?;
                }
                fence_epoch = fence_epoch.max(history.last_epoch());
                Role::Master
            }
            StartRole::Standby => Role::Slave,
        };
        save_fence(&cfg.data_dir, fence_epoch)?;
        let manager = Arc::new(Self {
            slaves: Arc::new(master::SlaveTable::new(
                cfg.mode,
                cfg.min_in_sync_replicas,
                cfg.in_sync_max_lag_bytes,
            )),
            state: Mutex::new(RoleState {
                role,
                writable: role == Role::Master,
                history,
                fence_epoch,
                master_address: None,
                master_client: None,
                follower: None,
                follow_session: 0,
            }),
            appended: store.published_notify(),
            follower_connected: watch::channel(false).0,
            stream: Mutex::new(None),
            role_changed: watch::channel(0).0,
            write_gate: RwLock::new(()),
            cfg,
            store,
        });
        tracing::info!(
            role = %role,
            epoch = manager.epoch(),
            end_offset = end,
            "replication state loaded"
        );
        Ok(manager)
    }

    /// Accepts slave connections on the replication listener until `shutdown`.
    pub async fn serve(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ReplicationError> {
        let listener = tokio::net::TcpListener::bind(self.cfg.listen)
            .await
            .map_err(|e| ReplicationError::Io(format!("bind {}: {e}", self.cfg.listen)))?;
        self.serve_listener(listener, shutdown).await;
        Ok(())
    }

    /// Accepts slave connections on an already bound listener.
    pub async fn serve_listener(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        tracing::info!(address = ?listener.local_addr().ok(), "replication listener ready");
        master::accept_loop(self.clone(), listener, shutdown).await;
    }

    pub fn config(&self) -> &ReplicationConfig {
        &self.cfg
    }

    pub fn store(&self) -> &MessageStore {
        &self.store
    }

    pub fn role(&self) -> Role {
        self.state.lock().role
    }

    /// For a slave: the client endpoint of the master it follows, once the
    /// master announced it. Routes served by a slave point clients there.
    pub fn master_client_endpoint(&self) -> Option<String> {
        let st = self.state.lock();
        (st.role == Role::Slave)
            .then(|| st.master_client.clone())
            .flatten()
    }

    pub(super) fn set_master_client(&self, endpoint: Option<String>) {
        self.state.lock().master_client = endpoint;
    }

    pub fn epoch(&self) -> u64 {
        self.state.lock().history.last_epoch()
    }

    pub fn history(&self) -> EpochHistory {
        self.state.lock().history.clone()
    }

    /// Changes whenever the role or epoch changes.
    pub fn subscribe_role_changes(&self) -> watch::Receiver<u64> {
        self.role_changed.subscribe()
    }

    /// Fails unless this broker may accept a client write now.
    pub fn check_writable(&self) -> Result<(), ReplicationError> {
        let st = self.state.lock();
        match (st.role, st.writable) {
            (Role::Master, true) => Ok(()),
            (Role::Master, false) => Err(ReplicationError::WritesPaused),
            (role, _) => Err(ReplicationError::NotMaster { role }),
        }
    }

    /// Lets a client write in: checks that this broker takes writes and
    /// returns a guard to hold until the write's records are appended to the
    /// store (not across an await). A switchover stopping writes waits for
    /// every guard, so no write it did not count can still reach the log.
    pub fn admit(&self) -> Result<RwLockReadGuard<'_, ()>, ReplicationError> {
        let gate = self.write_gate.read();
        self.check_writable()?;
        Ok(gate)
    }

    /// Waits until the write ending at `end_offset` is acknowledged under
    /// the replication mode in force.
    pub async fn wait_replicated(&self, end_offset: u64) -> Result<(), ReplicationError> {
        if self.cfg.mode == ReplicationMode::Async || self.cfg.min_in_sync_replicas == 0 {
            return Ok(());
        }
        self.slaves
            .wait_confirmed(end_offset, self.cfg.sync_timeout)
            .await
    }

    /// Whether enough slaves are connected and in sync for a SYNC write to
    /// be confirmed now (always under ASYNC replication).
    pub fn can_confirm(&self) -> bool {
        self.cfg.mode == ReplicationMode::Async
            || self.cfg.min_in_sync_replicas == 0
            || self.slaves.in_sync_count(self.store.max_offset()) >= self.cfg.min_in_sync_replicas
    }

    /// For a master: how many slaves are connected and in sync now (those
    /// a planned switchover could hand over to); 0 for a slave.
    pub fn in_sync_slaves(&self) -> u32 {
        if self.role() == Role::Master {
            self.slaves.in_sync_count(self.store.max_offset())
        } else {
            0
        }
    }

    /// For a master: whether it refuses writes for a switchover under way
    /// (from when it stops writes until it follows the target, or puts
    /// writes back on after a failed one).
    pub fn writes_paused(&self) -> bool {
        let st = self.state.lock();
        st.role == Role::Master && !st.writable
    }

    /// Offset acknowledged under the replication mode in force.
    pub fn confirmed_offset(&self) -> u64 {
        match self.cfg.mode {
            ReplicationMode::Async => self.store.max_offset(),
            ReplicationMode::Sync if self.cfg.min_in_sync_replicas == 0 => self.store.max_offset(),
            ReplicationMode::Sync => self.slaves.confirmed(),
        }
    }

    pub fn status(&self) -> ReplicationStatus {
        let st = self.state.lock();
        ReplicationStatus {
            role: st.role,
            epoch: st.history.last_epoch(),
            epochs: st.history.entries().to_vec(),
            writable: st.role == Role::Master && st.writable,
            master_address: st.master_address.clone(),
            connected_to_master: *self.follower_connected.borrow(),
            slaves: if st.role == Role::Master {
                self.slaves.snapshot(self.store.max_offset())
            } else {
                Vec::new()
            },
            confirmed_offset: if st.role == Role::Master {
                self.confirmed_offset()
            } else {
                self.store.max_offset()
            },
            mode: self.cfg.mode,
            min_in_sync_replicas: self.cfg.min_in_sync_replicas,
        }
    }

    /// Whether this broker counts as ready, and why (see [`readiness`]): a
    /// master or a standby once it serves, a slave only while it is
    /// connected to the master it follows and in sync by the master's rule.
    pub fn readiness(&self) -> Readiness {
        let st = self.state.lock();
        let me = readiness::Following {
            role: st.role,
            epoch: st.history.last_epoch(),
            master: st.master_address.as_deref(),
            fence: st.fence_epoch,
            session: st.follow_session,
        };
        let stream = self.stream.lock().clone();
        readiness::judge(&me, stream.as_ref(), self.cfg.in_sync_max_lag_bytes)
    }

    /// Slave side: records what the stream of follow `session` says, unless
    /// a newer follow replaced it (or a promotion ended it).
    fn stream_progress(&self, session: u64, update: impl FnOnce(&mut StreamProgress)) {
        let mut stream = self.stream.lock();
        let current = stream.get_or_insert_with(StreamProgress::default);
        if current.session != session {
            if session < current.session {
                return;
            }
            *current = StreamProgress {
                session,
                ..StreamProgress::default()
            };
        }
        update(current);
    }

    /// Makes this broker the master of `epoch`, which must be newer than
    /// every epoch it knows. The new epoch starts at the end of its log.
    pub fn promote(&self, epoch: u64) -> Result<EpochEntry, ReplicationError> {
        let mut st = self.state.lock();
        let known = st.fence_epoch.max(st.history.last_epoch());
        if epoch <= known {
            return Err(ReplicationError::StaleEpoch {
                requested: epoch,
                known,
            });
        }
        if let Some(task) = st.follower.take() {
            task.abort();
        }
        self.store.clamp_consumer_offsets();
        let start = self.store.max_offset();
        let mut history = st.history.clone();
        history.begin(epoch, start)?;
        history.save(&self.cfg.data_dir.join("epochs.json"))?;
        save_fence(&self.cfg.data_dir, epoch)?;
        st.history = history;
        st.fence_epoch = epoch;
        st.role = Role::Master;
        st.writable = true;
        st.master_address = None;
        st.master_client = None;
        // No stream counts any more: one of a follow before it is stale.
        st.follow_session += 1;
        drop(st);
        self.follower_connected.send_replace(false);
        self.slaves.reset();
        self.role_changed.send_modify(|v| *v += 1);
        tracing::info!(epoch, start_offset = start, "promoted to master");
        Ok(EpochEntry {
            epoch,
            start_offset: start,
        })
    }

    /// Makes this broker a slave of the master at `master_address` in
    /// `epoch`. Truncation to the fork point happens when the stream starts.
    pub fn follow(
        self: &Arc<Self>,
        master_address: String,
        epoch: u64,
    ) -> Result<(), ReplicationError> {
        let mut st = self.state.lock();
        let known = st.fence_epoch.max(st.history.last_epoch());
        if epoch < known {
            return Err(ReplicationError::StaleEpoch {
                requested: epoch,
                known,
            });
        }
        if let Some(task) = st.follower.take() {
            task.abort();
        }
        save_fence(&self.cfg.data_dir, epoch)?;
        st.fence_epoch = epoch;
        st.role = Role::Slave;
        st.writable = false;
        st.master_address = Some(master_address.clone());
        st.follow_session += 1;
        let session = st.follow_session;
        let me = self.clone();
        st.follower = Some(tokio::spawn(async move {
            slave::follow_loop(me, master_address, epoch, session).await;
        }));
        drop(st);
        self.slaves.disconnect_all();
        self.role_changed.send_modify(|v| *v += 1);
        tracing::info!(epoch, "following a new master");
        Ok(())
    }

    /// Stops or resumes client writes (used by switchover).
    pub fn set_writable(&self, writable: bool) {
        let mut st = self.state.lock();
        st.writable = writable;
    }

    /// Planned hand-over to `target_broker_id`: refuse writes, wait until the
    /// target holds everything, then hand it the master role through
    /// `promote_target` (the caller's admin call), and follow it.
    /// Returns how long writes were refused.
    pub async fn switchover<F, Fut>(
        self: &Arc<Self>,
        target_broker_id: &str,
        new_epoch: u64,
        timeout: Duration,
        promote_target: F,
    ) -> Result<Duration, ReplicationError>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        self.check_writable()?;
        let known = self.epoch().max(self.state.lock().fence_epoch);
        if new_epoch <= known {
            return Err(ReplicationError::StaleEpoch {
                requested: new_epoch,
                known,
            });
        }
        let target_addr = self
            .slaves
            .replication_address_of(target_broker_id)
            .ok_or_else(|| {
                ReplicationError::Switchover(format!(
                    "{target_broker_id} is not a connected slave of this master"
                ))
            })?;
        let paused_at = Instant::now();
        {
            // Writes already let in finish appending first.
            let _gate = self.write_gate.write();
            self.set_writable(false);
        }
        let mut resume = ResumeWrites {
            manager: self,
            armed: true,
        };
        // Everything appended, staged records included (under SYNC_FLUSH
        // they reach the published end only with the next flush).
        let end = self.store.flush().map_err(|e| {
            ReplicationError::Switchover(format!("flushing before the hand-over: {e}"))
        })?;
        self.slaves
            .wait_slave_acked(target_broker_id, end, timeout)
            .await?;
        // The caller bounds this call and tells a refusal from a lost answer.
        if let Err(e) = promote_target(new_epoch).await {
            return Err(ReplicationError::Switchover(format!(
                "promoting {target_broker_id}: {e}"
            )));
        }
        resume.armed = false;
        self.follow(target_addr, new_epoch)?;
        let pause = paused_at.elapsed();
        tracing::info!(
            target = target_broker_id,
            epoch = new_epoch,
            pause_ms = pause.as_millis() as u64,
            "switchover complete; now following the new master"
        );
        Ok(pause)
    }

    /// Stops following (shutdown).
    pub fn shutdown(&self) {
        if let Some(task) = self.state.lock().follower.take() {
            task.abort();
        }
        self.slaves.disconnect_all();
    }

    /// The highest epoch this broker has been told about (it refuses older ones).
    pub fn fence_epoch(&self) -> u64 {
        self.state.lock().fence_epoch
    }
}

fn load_fence(dir: &std::path::Path) -> Result<FenceFile, ReplicationError> {
    let path = dir.join("fence.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            ReplicationError::Epoch(EpochError::Invalid {
                path,
                reason: e.to_string(),
            })
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FenceFile::default()),
        Err(source) => Err(ReplicationError::Epoch(EpochError::Io { path, source })),
    }
}

fn save_fence(dir: &std::path::Path, fence_epoch: u64) -> Result<(), ReplicationError> {
    let path = dir.join("fence.json");
    let bytes = serde_json::to_vec(&FenceFile { fence_epoch }).map_err(|e| {
        ReplicationError::Epoch(EpochError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })
    })?;
    crate::store::persist_atomically(&path, &bytes)
        .map_err(|source| ReplicationError::Epoch(EpochError::Io { path, source }))
}
