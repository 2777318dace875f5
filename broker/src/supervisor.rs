//! The controller of a broker group outside Kubernetes: it watches every
//! member through the admin API and carries out what the shared failover
//! decision ([`keelmq_failover::decide`]) says — choose the first master,
//! promote a slave when the master fails, make returning or stray brokers
//! follow. `keelmq dev` runs one over its three local brokers; the
//! multi-process tests run one over theirs.
//!
//! The supervisor keeps the group's record (epoch, master, the master's
//! store id and last seen end offset) in memory and, when given a path, in a
//! JSON file written atomically *before* any promotion is carried out, the
//! same order the operator follows with the BrokerGroup status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_failover::{BrokerObservation, BrokerStatus, Decision, Observation, Policy, Role};
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;
use keelmq_proto::admin::{FollowRequest, PromoteRequest, StatusRequest, StatusResponse};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::store::{load_json, save_json};

/// How long one admin call may take before the member counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_millis(800);

/// How much longer than the wait it asks for a switchover call may take
/// (the flush before it, the target's promotion and the answer).
const SWITCHOVER_MARGIN: Duration = Duration::from_secs(10);

/// One broker of the group, as the supervisor reaches it.
#[derive(Clone, Debug)]
pub struct Member {
    /// Stable name, unique in the group (`b0`, `b1`, ...).
    pub name: String,
    /// Admin API endpoint, `host:port`.
    pub admin: String,
    /// Replication endpoint, `host:port`; what followers are pointed at.
    pub replication: String,
}

/// The group's record: what the controller decided last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub epoch: u64,
    pub master: Option<String>,
    pub master_store_id: Option<String>,
    pub last_known_master_offset: Option<u64>,
    /// The most recent failover, for people.
    pub last_failover: Option<FailoverRecord>,
}

/// One promotion that replaced a failed master.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub from: Option<String>,
    pub to: String,
    pub epoch: u64,
    pub reason: String,
    pub possible_loss: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// Watches a group and keeps it with exactly one master.
pub struct Supervisor {
    members: Vec<Member>,
    policy: Policy,
    record_path: Option<PathBuf>,
    state: Mutex<State>,
    /// Held while a round or a switchover acts, so they never interleave.
    acting: tokio::sync::Mutex<()>,
}

struct State {
    record: GroupRecord,
    channels: Vec<Option<Channel>>,
    master_unready_since: Option<Instant>,
    /// Members whose process is known to be gone (exited), set by whoever
    /// runs the processes.
    gone: Vec<bool>,
    /// Text of the last decision, so an unchanged one is not logged again.
    last_said: String,
}

/// Errors carrying out a decision.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{member}: {what}: {status}")]
    Admin {
        member: String,
        what: &'static str,
        status: String,
    },
    #[error("recording the group state: {0}")]
    Record(String),
    #[error("the decision names an unknown member {0}")]
    UnknownMember(String),
}

impl Supervisor {
    /// A supervisor of `members`; `record_path` keeps the group record
    /// across supervisor restarts.
    pub fn new(
        members: Vec<Member>,
        policy: Policy,
        record_path: Option<PathBuf>,
    ) -> Result<Arc<Self>, SupervisorError> {
        let record = match &record_path {
            Some(p) => load_json(p).map_err(|e| SupervisorError::Record(e.to_string()))?,
            None => GroupRecord::default(),
        };
        let n = members.len();
        Ok(Arc::new(Self {
            members,
            policy,
            record_path,
            state: Mutex::new(State {
                record,
                channels: vec![None; n],
                master_unready_since: None,
                gone: vec![false; n],
                last_said: String::new(),
            }),
            acting: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The group record as it stands.
    pub fn record(&self) -> GroupRecord {
        self.state.lock().record.clone()
    }

    /// Tells the supervisor that a member's process exited (or is back):
    /// a master whose process is gone fails at once, without the detection delay.
    pub fn set_gone(&self, name: &str, gone: bool) {
        if let Some(i) = self.index(name) {
            self.state.lock().gone[i] = gone;
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    fn channel(&self, i: usize) -> Result<Channel, tonic::transport::Error> {
        if let Some(c) = &self.state.lock().channels[i] {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{}", self.members[i].admin))?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        self.state.lock().channels[i] = Some(ch.clone());
        Ok(ch)
    }

    async fn status_of(&self, i: usize) -> Option<StatusResponse> {
        let ch = self.channel(i).ok()?;
        let mut c = BrokerAdminClient::new(ch);
        match tokio::time::timeout(CALL_TIMEOUT, c.status(StatusRequest {})).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// Asks every member for its status, all at once.
    pub async fn observe(&self) -> (Observation, Vec<Option<StatusResponse>>) {
        let statuses =
            futures::future::join_all((0..self.members.len()).map(|i| self.status_of(i))).await;
        let mut st = self.state.lock();
        let brokers = self
            .members
            .iter()
            .zip(&statuses)
            .map(|(m, s)| BrokerObservation {
                name: m.name.clone(),
                reachable: s.is_some(),
                ready: s.is_some(),
                status: s.as_ref().map(|s| self.reduce(s)),
            })
            .collect::<Vec<_>>();
        let master_idx = st.record.master.as_deref().and_then(|n| self.index(n));
        let master_up = master_idx.is_some_and(|i| statuses[i].is_some() && !st.gone[i]);
        if master_up || master_idx.is_none() {
            st.master_unready_since = None;
        } else if st.master_unready_since.is_none() {
            st.master_unready_since = Some(Instant::now());
        }
        // While the master serves, remember how far its log reaches.
        if let Some(i) = master_idx
            && let Some(s) = &statuses[i]
            && s.role == keelmq_proto::admin::Role::Master as i32
            && s.store_id == st.record.master_store_id.clone().unwrap_or_default()
        {
            st.record.last_known_master_offset = Some(s.max_offset);
        }
        let obs = Observation {
            group_epoch: st.record.epoch,
            current_master: st.record.master.clone(),
            master_store_id: st.record.master_store_id.clone(),
            last_known_master_offset: st.record.last_known_master_offset,
            brokers,
            master_unready_for: st.master_unready_since.map(|t| t.elapsed()),
            master_gone: master_idx.is_some_and(|i| st.gone[i]),
        };
        (obs, statuses)
    }

    fn reduce(&self, s: &StatusResponse) -> BrokerStatus {
        let role = match keelmq_proto::admin::Role::try_from(s.role) {
            Ok(keelmq_proto::admin::Role::Master) => Role::Master,
            Ok(keelmq_proto::admin::Role::Slave) => Role::Slave,
            _ => Role::Unknown,
        };
        let master = (!s.master_address.is_empty())
            .then(|| {
                self.members
                    .iter()
                    .find(|m| m.replication == s.master_address)
                    .map(|m| m.name.clone())
            })
            .flatten();
        BrokerStatus {
            role,
            epoch: s.epochs.last().map_or(0, |e| e.epoch),
            max_offset: s.max_offset,
            store_id: s.store_id.clone(),
            empty: s.max_offset == 0,
            master,
        }
    }

    /// One round: observe, decide, act. Returns the decision taken.
    pub async fn step(&self) -> Result<Decision, SupervisorError> {
        let _acting = self.acting.lock().await;
        let (obs, statuses) = self.observe().await;
        let decision = keelmq_failover::decide(&obs, &self.policy);
        self.say(&decision);
        match &decision {
            Decision::Healthy | Decision::Wait { .. } => {}
            Decision::Bootstrap {
                broker,
                epoch,
                followers,
            } => {
                self.make_master(broker, *epoch, &statuses, None)?;
                self.promote(broker, *epoch).await?;
                self.follow_all(followers, broker, *epoch).await;
            }
            Decision::Promote {
                broker,
                new_epoch,
                followers,
                possible_loss,
                reason,
            } => {
                let failover = FailoverRecord {
                    from: obs.current_master.clone(),
                    to: broker.clone(),
                    epoch: *new_epoch,
                    reason: reason.to_string(),
                    possible_loss: possible_loss.to_string(),
                    at_ms: crate::store::now_ms(),
                };
                self.make_master(broker, *new_epoch, &statuses, Some(failover))?;
                self.promote(broker, *new_epoch).await?;
                self.follow_all(followers, broker, *new_epoch).await;
            }
            Decision::MakeFollow {
                brokers,
                master,
                epoch,
            } => self.follow_all(brokers, master, *epoch).await,
        }
        Ok(decision)
    }

    /// Planned hand-over of the master role to `target`: the master stops
    /// accepting writes, waits until `target` holds everything, promotes it
    /// in the next epoch and follows it. Returns how long writes paused.
    pub async fn switchover(
        &self,
        target: &str,
        timeout: Duration,
    ) -> Result<Duration, SupervisorError> {
        let _acting = self.acting.lock().await;
        let (master, epoch) = {
            let st = self.state.lock();
            (st.record.master.clone(), st.record.epoch)
        };
        let master = master.ok_or_else(|| SupervisorError::Admin {
            member: target.to_owned(),
            what: "switchover",
            status: "the group has no master yet".into(),
        })?;
        let (m, t) = (
            self.index(&master)
                .ok_or_else(|| SupervisorError::UnknownMember(master.clone()))?,
            self.index(target)
                .ok_or_else(|| SupervisorError::UnknownMember(target.to_owned()))?,
        );
        let err = |status: String| SupervisorError::Admin {
            member: master.clone(),
            what: "switchover",
            status,
        };
        // Not the members' shared channel: its per-call timeout is far
        // shorter than a switchover may take. The master finishes (or undoes)
        // a switchover whose caller gave up, so the bound here only keeps
        // this call from hanging.
        let ch = Endpoint::from_shared(format!("http://{}", self.members[m].admin))
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(CALL_TIMEOUT)
            .connect_lazy();
        let new_epoch = epoch + 1;
        tracing::info!(from = %master, to = target, epoch = new_epoch, "switchover requested");
        let mut client = BrokerAdminClient::new(ch);
        let call = client.switchover(keelmq_proto::admin::SwitchoverRequest {
            target_broker_id: target.to_owned(),
            target_admin_address: self.members[t].admin.clone(),
            new_epoch,
            timeout_ms: timeout.as_millis() as u64,
        });
        let resp = tokio::time::timeout(timeout + SWITCHOVER_MARGIN, call)
            .await
            .map_err(|_| {
                err(format!(
                    "no answer within {:?}",
                    timeout + SWITCHOVER_MARGIN
                ))
            })?
            .map_err(|e| err(e.message().to_owned()))?
            .into_inner();
        let status = self.status_of(t).await;
        self.make_master(target, new_epoch, &self.slot_status(t, status), None)?;
        let pause = Duration::from_millis(resp.write_pause_ms);
        tracing::info!(from = %master, to = target, epoch = new_epoch, pause_ms = resp.write_pause_ms, "switchover complete");
        Ok(pause)
    }

    fn slot_status(&self, i: usize, s: Option<StatusResponse>) -> Vec<Option<StatusResponse>> {
        let mut v = vec![None; self.members.len()];
        v[i] = s;
        v
    }

    /// Records `broker` as master of `epoch` (persisted before acting).
    fn make_master(
        &self,
        broker: &str,
        epoch: u64,
        statuses: &[Option<StatusResponse>],
        failover: Option<FailoverRecord>,
    ) -> Result<(), SupervisorError> {
        let i = self
            .index(broker)
            .ok_or_else(|| SupervisorError::UnknownMember(broker.to_owned()))?;
        let record = {
            let mut st = self.state.lock();
            st.record.epoch = epoch;
            st.record.master = Some(broker.to_owned());
            st.record.master_store_id = statuses[i].as_ref().map(|s| s.store_id.clone());
            st.record.last_known_master_offset = statuses[i].as_ref().map(|s| s.max_offset);
            if failover.is_some() {
                st.record.last_failover = failover;
            }
            st.master_unready_since = None;
            st.record.clone()
        };
        if let Some(p) = &self.record_path {
            save_json(p, &record).map_err(|e| SupervisorError::Record(e.to_string()))?;
        }
        Ok(())
    }

    async fn promote(&self, broker: &str, epoch: u64) -> Result<(), SupervisorError> {
        let i = self
            .index(broker)
            .ok_or_else(|| SupervisorError::UnknownMember(broker.to_owned()))?;
        let admin_err = |what, status: String| SupervisorError::Admin {
            member: broker.to_owned(),
            what,
            status,
        };
        let ch = self
            .channel(i)
            .map_err(|e| admin_err("promote", e.to_string()))?;
        BrokerAdminClient::new(ch)
            .promote(PromoteRequest { epoch })
            .await
            .map_err(|e| admin_err("promote", e.message().to_owned()))?;
        tracing::info!(broker, epoch, "promoted to master");
        Ok(())
    }

    /// Points each of `brokers` at `master`; a broker that cannot be told
    /// now is told in a later round (the decision says so again).
    async fn follow_all(&self, brokers: &[String], master: &str, epoch: u64) {
        let Some(m) = self.index(master) else {
            return;
        };
        let master_address = self.members[m].replication.clone();
        for b in brokers {
            let Some(i) = self.index(b) else { continue };
            let Ok(ch) = self.channel(i) else { continue };
            let res = BrokerAdminClient::new(ch)
                .follow(FollowRequest {
                    master_address: master_address.clone(),
                    epoch,
                })
                .await;
            match res {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.truncated {
                        tracing::warn!(broker = %b, master, epoch, truncated_to = r.truncated_to, "follows the master after truncating its divergent tail");
                    } else {
                        tracing::info!(broker = %b, master, epoch, "follows the master");
                    }
                }
                Err(e) => {
                    tracing::warn!(broker = %b, master, epoch, error = %e.message(), "could not be told to follow yet");
                }
            }
        }
    }

    fn say(&self, decision: &Decision) {
        let text = decision.to_string();
        let mut st = self.state.lock();
        if st.last_said == text {
            return;
        }
        st.last_said = text.clone();
        drop(st);
        match decision {
            Decision::Healthy => tracing::info!(decision = %text, "group healthy"),
            Decision::Wait { .. } => tracing::warn!(decision = %text, "waiting"),
            _ => tracing::warn!(decision = %text, "acting"),
        }
    }

    /// Runs rounds every `interval` until `stop` resolves.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.step().await {
                tracing::warn!(error = %e, "supervisor round failed; retrying");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
