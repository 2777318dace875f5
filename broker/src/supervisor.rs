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
//! same order the operator follows with the BrokerGroup status. A promotion
//! that replaces (or reinstates) a master fences the other brokers first
//! (they follow the chosen broker in the new epoch, so a live but
//! unreachable old master stops collecting their acknowledgements), measures
//! them again, and only then promotes (see [`keelmq_failover::check_fenced`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_failover::{
    BrokerObservation, BrokerStatus, Decision, Hold, Observation, Policy, Role, check_fenced,
    check_measured,
};
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
    /// The promotion of `broker` was not carried out this round; the old
    /// master is recorded again (in the raised epoch) and the next round
    /// decides again.
    #[error("not promoting {broker} this round: {hold}; the next round decides again")]
    PromotionHeld { broker: String, hold: Hold },
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
                // 1. Record first: the raised epoch is durable whatever
                // happens next, so a later round promotes in a newer one.
                let before = {
                    let st = self.state.lock();
                    (st.record.clone(), st.master_unready_since)
                };
                self.make_master(broker, *new_epoch, &statuses, Some(failover))?;
                // 2. Fence, 3. measure again.
                if let Err(hold) = self
                    .fence_and_measure(&obs, broker, *new_epoch, followers)
                    .await
                {
                    self.restore_master(before, *new_epoch)?;
                    return Err(SupervisorError::PromotionHeld {
                        broker: broker.clone(),
                        hold,
                    });
                }
                // 4. Promote; the fenced brokers follow again so they
                // connect at once instead of at their next retry.
                self.promote(broker, *new_epoch).await?;
                self.follow_all(followers, broker, *new_epoch).await;
            }
            Decision::MakeFollow {
                brokers,
                master,
                epoch,
            } => {
                self.follow_all(brokers, master, *epoch).await;
            }
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

    /// A promotion held after fencing: the record from `before` (the old
    /// master, its store and last seen offset, the unready timer) is put
    /// back, keeping the raised `epoch`. The next round then replaces (or
    /// reinstates) that master again from fresh offsets, counting the same
    /// brokers as its slaves, in a newer epoch than the fence's.
    fn restore_master(
        &self,
        before: (GroupRecord, Option<Instant>),
        epoch: u64,
    ) -> Result<(), SupervisorError> {
        let (record, unready_since) = before;
        let record = {
            let mut st = self.state.lock();
            st.record = GroupRecord { epoch, ..record };
            st.master_unready_since = unready_since;
            st.record.clone()
        };
        if let Some(p) = &self.record_path {
            save_json(p, &record).map_err(|e| SupervisorError::Record(e.to_string()))?;
        }
        Ok(())
    }

    /// Fences every broker of `followers` by telling it to follow `broker`
    /// in `epoch` (it drops its stream from the old master and refuses it
    /// from then on; until `broker` is promoted it retries), then measures
    /// `broker` and the fenced brokers again. `Err` says why `broker` must
    /// not be promoted now.
    async fn fence_and_measure(
        &self,
        obs: &Observation,
        broker: &str,
        epoch: u64,
        followers: &[String],
    ) -> Result<(), Hold> {
        let fenced = self.follow_all(followers, broker, epoch).await;
        tracing::info!(broker, epoch, fenced = ?fenced, "fenced before promoting");
        check_fenced(obs, &self.policy, broker, &fenced)?;
        let measure = |name: String| async move {
            let s = match self.index(&name) {
                Some(i) => self.status_of(i).await.map(|s| self.reduce(&s)),
                None => None,
            };
            (name, s)
        };
        let chosen_now = measure(broker.to_owned()).await.1;
        let fenced_now = futures::future::join_all(fenced.into_iter().map(measure)).await;
        check_measured(obs, &self.policy, broker, chosen_now.as_ref(), &fenced_now)
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
    /// now is told in a later round (the decision says so again). Returns
    /// the brokers that accepted.
    async fn follow_all(&self, brokers: &[String], master: &str, epoch: u64) -> Vec<String> {
        let mut accepted = Vec::new();
        let Some(m) = self.index(master) else {
            return accepted;
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
                    accepted.push(b.clone());
                }
                Err(e) => {
                    tracing::warn!(broker = %b, master, epoch, error = %e.message(), "could not be told to follow yet");
                }
            }
        }
        accepted
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

#[cfg(test)]
mod tests {
    //! The supervisor against fake brokers: in-process admin servers that
    //! answer `status`, `promote` and `follow` as a broker would (epochs,
    //! fence) and record the calls in order.

    use std::collections::BTreeMap;

    use keelmq_failover::ReplicationMode;
    use keelmq_proto::admin as pb;
    use keelmq_proto::admin::broker_admin_server::{BrokerAdmin, BrokerAdminServer};
    use tonic::{Request, Response, Status};

    use super::*;

    /// One fake broker.
    #[derive(Clone, Debug, Default)]
    struct Fake {
        master: bool,
        /// The epoch of its log's tail (what status reports).
        epoch: u64,
        /// The newest epoch it was told about.
        fence: u64,
        max_offset: u64,
        master_address: String,
        /// `follow` fails (the call errs) and changes nothing.
        refuse_follow: bool,
        /// Where its log ends once told to follow: what it received from
        /// the old master between the observation and the fence.
        offset_when_fenced: Option<u64>,
    }

    #[derive(Default)]
    struct Brokers {
        by_name: BTreeMap<String, Fake>,
        /// `follow <broker> -> <master replication address> epoch <e>` and
        /// `promote <broker> epoch <e>`, in order; refused calls are absent.
        calls: Vec<String>,
    }

    type Shared = Arc<Mutex<Brokers>>;

    #[derive(Clone)]
    struct FakeAdmin {
        name: String,
        brokers: Shared,
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    #[tonic::async_trait]
    impl BrokerAdmin for FakeAdmin {
        async fn status(
            &self,
            _: Request<pb::StatusRequest>,
        ) -> Result<Response<pb::StatusResponse>, Status> {
            let b = self.brokers.lock().by_name[&self.name].clone();
            Ok(Response::new(pb::StatusResponse {
                broker_id: self.name.clone(),
                role: if b.master {
                    pb::Role::Master
                } else {
                    pb::Role::Slave
                } as i32,
                epoch: b.epoch,
                epochs: (b.epoch > 0)
                    .then_some(pb::EpochEntry {
                        epoch: b.epoch,
                        start_offset: 0,
                    })
                    .into_iter()
                    .collect(),
                max_offset: b.max_offset,
                master_address: b.master_address.clone(),
                store_id: format!("store-{}", self.name),
                ..Default::default()
            }))
        }

        async fn promote(
            &self,
            r: Request<pb::PromoteRequest>,
        ) -> Result<Response<pb::PromoteResponse>, Status> {
            let epoch = r.into_inner().epoch;
            let mut all = self.brokers.lock();
            let b = all.by_name.get_mut(&self.name).expect("known");
            let known = b.fence.max(b.epoch);
            if epoch <= known {
                return Err(Status::failed_precondition(format!(
                    "stale epoch {epoch}: {known} known"
                )));
            }
            (b.master, b.epoch, b.fence) = (true, epoch, epoch);
            b.master_address.clear();
            let start_offset = b.max_offset;
            all.calls
                .push(format!("promote {} epoch {epoch}", self.name));
            Ok(Response::new(pb::PromoteResponse {
                epoch,
                start_offset,
            }))
        }

        async fn follow(
            &self,
            r: Request<pb::FollowRequest>,
        ) -> Result<Response<pb::FollowResponse>, Status> {
            let r = r.into_inner();
            let mut all = self.brokers.lock();
            let b = all.by_name.get_mut(&self.name).expect("known");
            let known = b.fence.max(b.epoch);
            if b.refuse_follow || r.epoch < known {
                return Err(Status::unavailable("refused"));
            }
            b.master = false;
            b.fence = r.epoch;
            b.master_address = r.master_address.clone();
            if let Some(end) = b.offset_when_fenced.take() {
                b.max_offset = end;
            }
            all.calls.push(format!(
                "follow {} -> {} epoch {}",
                self.name, r.master_address, r.epoch
            ));
            Ok(Response::new(pb::FollowResponse::default()))
        }

        async fn switchover(
            &self,
            _: Request<pb::SwitchoverRequest>,
        ) -> Result<Response<pb::SwitchoverResponse>, Status> {
            unimplemented()
        }
        async fn create_topic(
            &self,
            _: Request<pb::CreateTopicRequest>,
        ) -> Result<Response<pb::TopicResponse>, Status> {
            unimplemented()
        }
        async fn update_topic(
            &self,
            _: Request<pb::UpdateTopicRequest>,
        ) -> Result<Response<pb::TopicResponse>, Status> {
            unimplemented()
        }
        async fn delete_topic(
            &self,
            _: Request<pb::DeleteTopicRequest>,
        ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
            unimplemented()
        }
        async fn list_topics(
            &self,
            _: Request<pb::ListTopicsRequest>,
        ) -> Result<Response<pb::ListTopicsResponse>, Status> {
            unimplemented()
        }
        async fn describe_topic(
            &self,
            _: Request<pb::DescribeTopicRequest>,
        ) -> Result<Response<pb::TopicResponse>, Status> {
            unimplemented()
        }
        async fn list_groups(
            &self,
            _: Request<pb::ListGroupsRequest>,
        ) -> Result<Response<pb::ListGroupsResponse>, Status> {
            unimplemented()
        }
        async fn describe_group(
            &self,
            _: Request<pb::DescribeGroupRequest>,
        ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
            unimplemented()
        }
        async fn set_group(
            &self,
            _: Request<pb::SetGroupRequest>,
        ) -> Result<Response<pb::GroupSettings>, Status> {
            unimplemented()
        }
        async fn delete_group(
            &self,
            _: Request<pb::DeleteGroupRequest>,
        ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
            unimplemented()
        }
        async fn read_records(
            &self,
            _: Request<pb::ReadRecordsRequest>,
        ) -> Result<Response<pb::ReadRecordsResponse>, Status> {
            unimplemented()
        }
    }

    /// A group `a`, `b`, `c` (SYNC, one in-sync slave) whose recorded
    /// master `a` (epoch 1) is gone: its admin port refuses connections,
    /// as if it were partitioned from the supervisor, while `b` (offset
    /// 100) and `c` (offset 90) are its slaves in epoch 1.
    struct Group {
        _dir: tempfile::TempDir,
        sup: Arc<Supervisor>,
        brokers: Shared,
        _servers: Vec<tokio::task::JoinHandle<()>>,
    }

    async fn master_partitioned(mode: ReplicationMode) -> Group {
        let brokers: Shared = Arc::default();
        let mut members = Vec::new();
        let mut servers = Vec::new();
        for (name, offset) in [("a", 120), ("b", 100), ("c", 90)] {
            brokers.lock().by_name.insert(
                name.to_owned(),
                Fake {
                    master: name == "a",
                    epoch: 1,
                    fence: 1,
                    max_offset: offset,
                    master_address: if name == "a" {
                        String::new()
                    } else {
                        "repl-a".to_owned()
                    },
                    ..Default::default()
                },
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let admin = listener.local_addr().expect("addr").to_string();
            if name == "a" {
                // Nobody answers there.
                drop(listener);
            } else {
                let svc = BrokerAdminServer::new(FakeAdmin {
                    name: name.to_owned(),
                    brokers: brokers.clone(),
                });
                servers.push(tokio::spawn(async move {
                    let _ = tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        ))
                        .await;
                }));
            }
            members.push(Member {
                name: name.to_owned(),
                admin,
                replication: format!("repl-{name}"),
            });
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("group.json");
        save_json(
            &path,
            &GroupRecord {
                epoch: 1,
                master: Some("a".into()),
                master_store_id: Some("store-a".into()),
                last_known_master_offset: Some(120),
                last_failover: None,
            },
        )
        .expect("record");
        let policy = Policy {
            mode,
            min_in_sync_replicas: 1,
            replicas: 3,
            enabled: true,
            detection_delay: Duration::from_secs(60),
            allow_data_loss: false,
        };
        let sup = Supervisor::new(members, policy, Some(path)).expect("supervisor");
        sup.set_gone("a", true);
        Group {
            _dir: dir,
            sup,
            brokers,
            _servers: servers,
        }
    }

    impl Group {
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut self.brokers.lock().calls)
        }
        fn with(&self, name: &str, f: impl FnOnce(&mut Fake)) {
            f(self.brokers.lock().by_name.get_mut(name).expect("known"));
        }
    }

    fn position(calls: &[String], call: &str) -> usize {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("no {call:?} in {calls:?}"))
    }

    /// Fence first, then promote: `c` is told to follow `b` in the new
    /// epoch (and stops streaming from `a`, which may still be serving)
    /// before `b` is promoted.
    #[tokio::test]
    async fn a_failover_fences_the_followers_before_promoting() {
        let g = master_partitioned(ReplicationMode::Sync).await;
        let decision = g.sup.step().await.expect("promotes");
        assert!(
            matches!(&decision, Decision::Promote { broker, new_epoch: 2, .. } if broker == "b"),
            "{decision}"
        );
        let calls = g.calls();
        let fence = position(&calls, "follow c -> repl-b epoch 2");
        let promote = position(&calls, "promote b epoch 2");
        assert!(fence < promote, "{calls:?}");
        let record = g.sup.record();
        assert_eq!((record.master.as_deref(), record.epoch), (Some("b"), 2));
    }

    /// `c` received more from `a` between the observation and its fence:
    /// `b` is not promoted over it. The old master stays recorded in the
    /// raised epoch; the next round promotes `c` in a newer one, after
    /// fencing `b`.
    #[tokio::test]
    async fn a_follower_found_ahead_after_fencing_is_not_outranked() {
        let g = master_partitioned(ReplicationMode::Sync).await;
        g.with("c", |c| c.offset_when_fenced = Some(130));
        let err = g.sup.step().await.expect_err("held");
        assert!(
            matches!(&err, SupervisorError::PromotionHeld { broker, hold: Hold::FencedHoldsMore { broker: ahead, .. } } if broker == "b" && ahead == "c"),
            "{err}"
        );
        let calls = g.calls();
        assert_eq!(calls, ["follow c -> repl-b epoch 2"]);
        let record = g.sup.record();
        assert_eq!(
            (record.master.as_deref(), record.epoch),
            (Some("a"), 2),
            "the old master again, in the raised epoch"
        );
        assert_eq!(record.last_known_master_offset, Some(120));
        assert!(record.last_failover.is_none());

        let decision = g.sup.step().await.expect("promotes");
        assert!(
            matches!(&decision, Decision::Promote { broker, new_epoch: 3, .. } if broker == "c"),
            "{decision}"
        );
        let calls = g.calls();
        let fence = position(&calls, "follow b -> repl-c epoch 3");
        let promote = position(&calls, "promote c epoch 3");
        assert!(fence < promote, "{calls:?}");
        assert!(
            !calls.iter().any(|c| c.starts_with("promote b")),
            "{calls:?}"
        );
        assert_eq!(g.sup.record().master.as_deref(), Some("c"));
    }

    /// Under SYNC with one in-sync slave of two, `a` could still get a
    /// write acknowledged by `c` alone while `c` cannot be fenced: no
    /// promotion. Under ASYNC the promotion goes on.
    #[tokio::test]
    async fn a_follower_that_cannot_be_fenced_holds_a_sync_promotion() {
        let g = master_partitioned(ReplicationMode::Sync).await;
        g.with("c", |c| c.refuse_follow = true);
        let err = g.sup.step().await.expect_err("held");
        assert!(
            matches!(
                &err,
                SupervisorError::PromotionHeld {
                    hold: Hold::NotEnoughFenced {
                        fenced: 1,
                        needed: 2,
                        slaves: 2
                    },
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(g.calls(), Vec::<String>::new());
        assert_eq!(g.sup.record().master.as_deref(), Some("a"));
        g.with("c", |c| c.refuse_follow = false);
        g.sup.step().await.expect("promotes");
        let calls = g.calls();
        assert!(
            position(&calls, "follow c -> repl-b epoch 3") < position(&calls, "promote b epoch 3")
        );

        let g = master_partitioned(ReplicationMode::Async).await;
        g.with("c", |c| c.refuse_follow = true);
        g.sup.step().await.expect("promotes");
        assert_eq!(g.calls(), ["promote b epoch 2"]);
    }

    /// A master back in standby is reinstated in a new epoch: the others are
    /// fenced (they follow it) first, then it is promoted.
    #[tokio::test]
    async fn a_reinstated_master_is_promoted_after_the_others_follow_it() {
        let g = master_partitioned(ReplicationMode::Sync).await;
        // `b` is the recorded master of epoch 1 and restarted in standby;
        // `a` does not answer. With two in-sync slaves required, `c` alone
        // is enough to tell that `b` lost nothing.
        let path = g._dir.path().join("group.json");
        save_json(
            &path,
            &GroupRecord {
                epoch: 1,
                master: Some("b".into()),
                master_store_id: Some("store-b".into()),
                last_known_master_offset: Some(100),
                last_failover: None,
            },
        )
        .expect("record");
        g.with("b", |b| b.master_address.clear());
        let mut policy = g.sup.policy.clone();
        policy.min_in_sync_replicas = 2;
        let sup =
            Supervisor::new(g.sup.members().to_vec(), policy, Some(path)).expect("supervisor");
        let decision = sup.step().await.expect("reinstates");
        assert!(
            matches!(&decision, Decision::Promote { broker, new_epoch: 2, reason: keelmq_failover::PromoteReason::Reinstate, .. } if broker == "b"),
            "{decision}"
        );
        let calls = g.calls();
        let fence = position(&calls, "follow c -> repl-b epoch 2");
        let promote = position(&calls, "promote b epoch 2");
        assert!(fence < promote, "{calls:?}");
    }
}
