//! The failover executor: observes a group's pods and brokers, asks the
//! shared pure [`keelmq_failover::decide`] what to do, and carries the
//! decision out in the only safe order: the new epoch and master are written
//! to the BrokerGroup status first (a PUT carrying the resourceVersion that
//! was read, so Kubernetes is the consensus store and a stale operator loses),
//! then (for a promotion that replaces or reinstates a master) the others
//! are fenced by following the chosen broker in the new epoch and measured
//! again, then the broker is promoted, then the others follow it, then the
//! role labels move so the client Service follows the master.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keelmq_crds::{
    BrokerGroup, BrokerGroupStatus, FailoverRecord, MasterReplication, MasterUnready,
    ReplicaStatus, ReplicationMode,
};
use keelmq_failover::{
    BrokerObservation, BrokerStatus, Decision, Hold, Observation, Policy, PossibleLoss, Role,
    check_fenced, check_measured,
};
use keelmq_proto::admin as pb;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::controller::Context;
use crate::model::{GroupNames, LABEL_ROLE};
use crate::{Error, Result};

/// What was seen of a group at one moment: the decision's input plus the
/// raw broker answers the status is built from.
#[derive(Clone, Debug)]
pub struct Observed {
    /// Input of `decide`.
    pub observation: Observation,
    /// Admin `status` answers by pod name.
    pub statuses: BTreeMap<String, pb::StatusResponse>,
    /// Pods by name.
    pub pods: BTreeMap<String, Pod>,
    /// The recorded master is unready: since when (carried over from the
    /// status, or now); written back to the status.
    pub master_unready: Option<MasterUnready>,
}

/// The group's failover policy: from its spec, and from the settings its
/// master last reported (see [`replication_in_effect`]).
pub fn policy(bg: &BrokerGroup) -> Policy {
    let spec = &bg.spec;
    let running = bg.status.as_ref().and_then(|s| {
        s.master_replication
            .as_ref()
            .filter(|r| s.master.as_deref() == Some(r.master.as_str()))
    });
    let (mode, min_in_sync) = replication_in_effect(
        spec.replication.mode,
        spec.replication.min_in_sync_replicas,
        running,
    );
    Policy {
        mode: match mode {
            keelmq_crds::ReplicationMode::Sync => keelmq_failover::ReplicationMode::Sync,
            keelmq_crds::ReplicationMode::Async => keelmq_failover::ReplicationMode::Async,
        },
        min_in_sync_replicas: u32::try_from(min_in_sync).unwrap_or(0),
        replicas: u32::try_from(spec.replicas).unwrap_or(1),
        enabled: spec.failover.enabled,
        detection_delay: Duration::from_secs(
            u64::try_from(spec.failover.detection_delay_seconds).unwrap_or(0),
        ),
        allow_data_loss: spec.failover.allow_data_loss,
    }
}

/// The replication settings a failover is decided by. A broker reads its
/// settings when it starts, so after a change of the spec the master
/// acknowledges sends by the old ones until the roll restarts it; while the
/// settings it reported (`running`) differ from the spec's, the more
/// cautious of each is taken: `Async` if either is (sends a master running
/// `Async` acknowledged may be on no slave, so no promotion can be called
/// lossless), else the lower minimum of in-sync slaves (fewer slaves held
/// each send, so more of them must be compared before one is promoted).
pub fn replication_in_effect(
    mode: ReplicationMode,
    min_in_sync: i32,
    running: Option<&MasterReplication>,
) -> (ReplicationMode, i32) {
    let Some(r) = running else {
        return (mode, min_in_sync);
    };
    if mode == ReplicationMode::Async || r.mode == ReplicationMode::Async {
        return (ReplicationMode::Async, min_in_sync);
    }
    (
        ReplicationMode::Sync,
        min_in_sync.min(r.min_in_sync_replicas),
    )
}

/// The replication settings the recorded `master` runs with: as it reports
/// them now, or as recorded `before` while it does not answer.
pub fn master_replication(
    observed: &Observed,
    master: Option<&str>,
    before: Option<&MasterReplication>,
) -> Option<MasterReplication> {
    let master = master?;
    let reported = observed.statuses.get(master).and_then(|s| {
        let mode = match s.replication_mode.to_ascii_uppercase().as_str() {
            "SYNC" => ReplicationMode::Sync,
            "ASYNC" => ReplicationMode::Async,
            _ => return None,
        };
        Some(MasterReplication {
            master: master.to_owned(),
            mode,
            min_in_sync_replicas: i32::try_from(s.min_in_sync_replicas).unwrap_or(i32::MAX),
        })
    });
    reported.or_else(|| before.filter(|r| r.master == master).cloned())
}

fn pod_condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// The pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod_condition(pod, "Ready").as_deref() == Some("True")
}

/// Whether a member counts as ready where the operator reads readiness
/// (the failover decision's `ready`, the replication verdict, the roll, the
/// hand-over checks, `readyReplicas`): its pod is Ready, or it is a slave
/// that follows a master, answered its admin call (`status`), and its pod
/// is neither being deleted nor on a node that stopped reporting.
///
/// A following slave's own readiness (`/readyz`, hence its pod's Ready and
/// the PodDisruptionBudget) is stricter: connected to its master and in
/// sync, so that a drain counts only slaves that can stand in for the
/// master. A slave unready only by that rule still serves: one whose master
/// died must stay a promotion candidate (and count towards the safe
/// promotion rule), and one cut off from a live master must still be judged
/// broken replication after the grace. Whether a slave is connected and in
/// sync is read from the master's own view (its `slaves`), as before.
pub fn serving(pod: &Pod, status: Option<&pb::StatusResponse>) -> bool {
    if pod_ready(pod) {
        return true;
    }
    status.is_some_and(following) && !pod_gone(pod)
}

/// The broker says it is a slave following a master (not a standby).
fn following(s: &pb::StatusResponse) -> bool {
    role_of(s) == Role::Slave && !s.master_address.is_empty()
}

/// The pod is being deleted, or its node stopped reporting (Ready Unknown).
fn pod_gone(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || pod_condition(pod, "Ready").as_deref() == Some("Unknown")
}

fn role_of(s: &pb::StatusResponse) -> Role {
    match pb::Role::try_from(s.role) {
        Ok(pb::Role::Master) => Role::Master,
        Ok(pb::Role::Slave) => Role::Slave,
        _ => Role::Unknown,
    }
}

/// A broker's admin status reduced to what the decision reads; the master
/// it follows is named by pod when `replication_to_pod` knows its address.
fn broker_status(
    s: &pb::StatusResponse,
    replication_to_pod: &BTreeMap<String, String>,
) -> BrokerStatus {
    BrokerStatus {
        role: role_of(s),
        epoch: s.epoch,
        max_offset: s.max_offset,
        store_id: s.store_id.clone(),
        empty: s.max_offset == 0,
        master: (!s.master_address.is_empty()).then(|| {
            replication_to_pod
                .get(&s.master_address)
                .cloned()
                .unwrap_or_else(|| s.master_address.clone())
        }),
    }
}

/// Pods that belong to the group: every ordinal the spec asks for, plus any
/// existing pod beyond it (a scale-down in progress).
pub fn member_names(
    names: &GroupNames,
    replicas: i32,
    pods: &BTreeMap<String, Pod>,
) -> Vec<String> {
    let mut members: Vec<String> = (0..replicas.max(1)).map(|i| names.pod(i)).collect();
    for p in pods.keys() {
        if !members.contains(p) {
            members.push(p.clone());
        }
    }
    members.sort();
    members
}

/// Asks every member's admin API for its status (concurrently, each call
/// bounded) and builds the observation.
pub async fn observe(
    ctx: &Context,
    bg: &BrokerGroup,
    names: &GroupNames,
    pods: Vec<Pod>,
) -> Observed {
    let pods: BTreeMap<String, Pod> = pods.into_iter().map(|p| (p.name_any(), p)).collect();
    let members = member_names(names, bg.spec.replicas, &pods);
    let answers = futures::future::join_all(members.iter().map(|m| {
        let addr = ctx.addresses.admin(names, m);
        let admin = ctx.admin.clone();
        async move { admin.status(&addr).await }
    }))
    .await;
    let status = bg.status.clone().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let replication_to_pod: BTreeMap<String, String> = members
        .iter()
        .map(|m| (ctx.addresses.replication(names, m), m.clone()))
        .collect();

    let mut statuses = BTreeMap::new();
    let mut brokers = Vec::new();
    for (m, answer) in members.iter().zip(answers) {
        let pod = pods.get(m);
        let answer = answer
            .map_err(
                |e| tracing::debug!(broker = %m, error = %e, "broker admin API did not answer"),
            )
            .ok();
        let ready = pod.is_some_and(|p| serving(p, answer.as_ref()));
        let st = answer.map(|s| {
            let reduced = broker_status(&s, &replication_to_pod);
            statuses.insert(m.clone(), s);
            reduced
        });
        brokers.push(BrokerObservation {
            name: m.clone(),
            reachable: st.is_some(),
            ready,
            status: st,
        });
    }

    let master = status.master.clone();
    let master_up = master.as_ref().is_some_and(|m| {
        brokers
            .iter()
            .any(|b| &b.name == m && b.reachable && b.ready)
    });
    let master_unready = match (&master, master_up) {
        (Some(m), false) => Some(
            status
                .master_unready
                .clone()
                .filter(|u| &u.master == m)
                .unwrap_or_else(|| MasterUnready {
                    master: m.clone(),
                    since: Time(now),
                }),
        ),
        _ => None,
    };
    let master_unready_for = master_unready.as_ref().map(|u| unready_for(&u.since, now));
    let master_gone = master
        .as_ref()
        .is_some_and(|m| pods.get(m).is_none_or(pod_gone));
    let last_known_master_offset = master.as_ref().and_then(|m| {
        status
            .replicas
            .iter()
            .find(|r| &r.name == m && r.offset > 0)
            .and_then(|r| u64::try_from(r.offset).ok())
    });
    Observed {
        observation: Observation {
            group_epoch: u64::try_from(status.epoch).unwrap_or(0),
            current_master: master,
            master_store_id: status.master_store_id.clone(),
            last_known_master_offset,
            brokers,
            master_unready_for,
            master_gone,
        },
        statuses,
        pods,
        master_unready,
    }
}

/// How long since `since`, as of `now` (zero if `since` is in the future,
/// as with clocks that disagree between operator replicas).
fn unready_for(since: &Time, now: jiff::Timestamp) -> Duration {
    let nanos = now.as_nanosecond().saturating_sub(since.0.as_nanosecond());
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

/// Per-replica status lines from an observation. An unreachable broker keeps
/// the offset last seen (from `previous`): it is what tells a master that
/// restarts shorter from one that restarts complete, and what an `ASYNC`
/// failover may lose.
pub fn replica_statuses(
    observed: &Observed,
    master: Option<&str>,
    previous: &[ReplicaStatus],
) -> Vec<ReplicaStatus> {
    let master_status = master.and_then(|m| observed.statuses.get(m));
    let master_offset = master_status.map(|s| s.max_offset).unwrap_or(0);
    observed
        .observation
        .brokers
        .iter()
        .map(|b| {
            let s = observed.statuses.get(&b.name);
            let offset = s.map(|s| s.max_offset).unwrap_or_else(|| {
                previous
                    .iter()
                    .find(|r| r.name == b.name)
                    .and_then(|r| u64::try_from(r.offset).ok())
                    .unwrap_or(0)
            });
            let is_master = Some(b.name.as_str()) == master;
            let in_sync = is_master
                || master_status.is_some_and(|ms| {
                    ms.slaves
                        .iter()
                        .any(|sl| sl.broker_id == b.name && sl.in_sync)
                });
            ReplicaStatus {
                name: b.name.clone(),
                role: b
                    .status
                    .as_ref()
                    .filter(|_| b.reachable)
                    .map(|s| s.role.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                ready: b.ready,
                reachable: b.reachable,
                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                lag: if s.is_some() && !is_master {
                    i64::try_from(master_offset.saturating_sub(offset)).unwrap_or(i64::MAX)
                } else {
                    0
                },
                in_sync,
            }
        })
        .collect()
}

/// What the executor did, for the status conditions and the requeue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do.
    Healthy,
    /// Waiting, with the reason in words.
    Waiting(String),
    /// A broker was made master (first master, failover or reinstatement).
    Promoted {
        /// The new master.
        master: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Stray brokers were told to follow the master.
    Redirected {
        /// The brokers told.
        brokers: Vec<String>,
        /// Those that did not accept it (told again next round).
        refused: Vec<String>,
    },
}

/// A failed write of the BrokerGroup: 409 (someone changed it since it was
/// read) is [`Error::Conflict`].
pub fn write_error(e: kube::Error) -> Error {
    match e {
        kube::Error::Api(s) if s.code == 409 => Error::Conflict,
        e => Error::Kube(e),
    }
}

/// Carries out `decision`; `status` is updated to what was recorded, and
/// `bg` to the BrokerGroup as written.
pub async fn execute(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    observed: &Observed,
    decision: Decision,
    status: &mut BrokerGroupStatus,
) -> Result<Outcome> {
    match decision {
        Decision::Healthy => {
            if let Some(m) = status.master.clone() {
                label_roles(ctx, names, observed, &m).await?;
            }
            Ok(Outcome::Healthy)
        }
        Decision::Wait { reason } => Ok(Outcome::Waiting(reason.to_string())),
        Decision::Bootstrap {
            broker,
            epoch,
            followers,
        } => {
            info!(
                master = %broker, epoch,
                "no master yet and every broker is up: choosing {broker}, which holds the most data, as the first master of epoch {epoch}"
            );
            record_master(ctx, bg, names, observed, &broker, epoch, None, status).await?;
            promote(ctx, names, observed, &broker, epoch, &followers).await?;
            publish(
                ctx,
                bg,
                EventType::Normal,
                "MasterElected",
                "Promote",
                format!("{broker} is the first master, epoch {epoch}"),
            )
            .await;
            Ok(Outcome::Promoted {
                master: broker,
                epoch,
            })
        }
        Decision::Promote {
            broker,
            new_epoch,
            followers,
            possible_loss,
            reason,
        } => {
            let from = status.master.clone();
            info!(
                from = from.as_deref().unwrap_or("-"), to = %broker, epoch = new_epoch,
                "failing over: {reason}; promoting {broker} to master of epoch {new_epoch} ({possible_loss})"
            );
            let record = FailoverRecord {
                time: Time(jiff::Timestamp::now()),
                from: from.clone(),
                to: broker.clone(),
                epoch: i64::try_from(new_epoch).unwrap_or(i64::MAX),
                reason: reason.to_string(),
                possible_loss: possible_loss.to_string(),
            };
            let policy = policy(bg);
            let before = bg.status.clone().unwrap_or_default();
            // 1. The record first: it raises the group's epoch, so whatever
            // happens next, a later round promotes in a newer one.
            record_master(
                ctx,
                bg,
                names,
                observed,
                &broker,
                new_epoch,
                Some(record),
                status,
            )
            .await?;
            // 2. Fence, 3. measure again.
            if let Err(hold) = fence_and_measure(
                ctx,
                names,
                &observed.observation,
                &policy,
                &broker,
                new_epoch,
                &followers,
            )
            .await
            {
                warn!(
                    from = from.as_deref().unwrap_or("-"), to = %broker, epoch = new_epoch,
                    "not promoting {broker} this round: {hold}; {} stays recorded as master (in epoch {new_epoch}) and the next round decides again",
                    from.as_deref().unwrap_or("nobody")
                );
                restore_master(ctx, bg, names, &before, status).await?;
                return Ok(Outcome::Waiting(format!(
                    "failover to {broker} held after fencing: {hold}; deciding again"
                )));
            }
            // 4. Promote, and the others follow it.
            promote(ctx, names, observed, &broker, new_epoch, &followers).await?;
            ctx.metrics.failover(&names.namespace, &names.group);
            let kind = if matches!(possible_loss, PossibleLoss::Nothing) {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish(
                ctx,
                bg,
                kind,
                "FailedOver",
                "Promote",
                format!(
                    "promoted {broker} to master of epoch {new_epoch} (was {}): {reason}; {possible_loss}",
                    from.as_deref().unwrap_or("none")
                ),
            )
            .await;
            Ok(Outcome::Promoted {
                master: broker,
                epoch: new_epoch,
            })
        }
        Decision::MakeFollow {
            brokers,
            master,
            epoch,
        } => {
            let master_repl = ctx.addresses.replication(names, &master);
            let mut refused = Vec::new();
            for b in &brokers {
                info!(broker = %b, %master, epoch, "{b} does not follow master {master}; telling it to follow in epoch {epoch}");
                if !follow(ctx, names, b, &master_repl, epoch).await {
                    refused.push(b.clone());
                }
            }
            label_roles(ctx, names, observed, &master).await?;
            publish(
                ctx,
                bg,
                EventType::Normal,
                "Following",
                "Follow",
                format!(
                    "told {} to follow master {master} in epoch {epoch}",
                    brokers.join(", ")
                ),
            )
            .await;
            Ok(Outcome::Redirected { brokers, refused })
        }
    }
}

/// Records `broker` as master of `epoch` in the BrokerGroup status, with
/// optimistic concurrency on the object read: done before any broker is
/// told anything.
#[allow(clippy::too_many_arguments)]
async fn record_master(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    observed: &Observed,
    broker: &str,
    epoch: u64,
    record: Option<FailoverRecord>,
    status: &mut BrokerGroupStatus,
) -> Result<()> {
    let api: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let mut next = bg.clone();
    let mut st = bg.status.clone().unwrap_or_default();
    st.master = Some(broker.to_string());
    st.epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    st.master_store_id = observed.statuses.get(broker).map(|s| s.store_id.clone());
    st.master_unready = None;
    if record.is_some() {
        st.last_failover = record;
    }
    next.status = Some(st.clone());
    let written = api
        .replace_status(&names.group, &PostParams::default(), &next)
        .await
        .map_err(write_error)?;
    info!(
        master = %broker, epoch,
        resource_version = written.resource_version().as_deref().unwrap_or(""),
        "recorded {broker} as master of epoch {epoch} in the BrokerGroup status"
    );
    *bg = written;
    *status = BrokerGroupStatus {
        conditions: status.conditions.clone(),
        replicas: status.replicas.clone(),
        rollout: status.rollout.clone(),
        ..st
    };
    Ok(())
}

/// A promotion held after fencing: the status names the master recorded
/// before (`before`) again, keeping the raised epoch, so the next round
/// replaces (or reinstates) that master from fresh offsets and in a newer
/// epoch, with the same brokers counted as its slaves.
async fn restore_master(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    before: &BrokerGroupStatus,
    status: &mut BrokerGroupStatus,
) -> Result<()> {
    let api: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let mut back = bg.clone();
    let mut st = bg.status.clone().unwrap_or_default();
    st.master = before.master.clone();
    st.master_store_id = before.master_store_id.clone();
    st.master_unready = before.master_unready.clone();
    st.last_failover = before.last_failover.clone();
    back.status = Some(st.clone());
    *bg = api
        .replace_status(&names.group, &PostParams::default(), &back)
        .await
        .map_err(write_error)?;
    info!(
        master = st.master.as_deref().unwrap_or("-"),
        epoch = st.epoch,
        "recorded {} as master again, in epoch {}",
        st.master.as_deref().unwrap_or("nobody"),
        st.epoch
    );
    *status = BrokerGroupStatus {
        conditions: status.conditions.clone(),
        replicas: status.replicas.clone(),
        rollout: status.rollout.clone(),
        ..st
    };
    Ok(())
}

/// Fences every reachable follower by telling it to follow `broker` in
/// `epoch` (it drops its stream from the old master and refuses it from
/// then on; until `broker` is promoted it retries), then measures `broker`
/// and the fenced brokers again. `Err` says why `broker` must not be
/// promoted now (see [`check_fenced`] and [`check_measured`]).
async fn fence_and_measure(
    ctx: &Context,
    names: &GroupNames,
    observation: &Observation,
    policy: &Policy,
    broker: &str,
    epoch: u64,
    followers: &[String],
) -> std::result::Result<(), Hold> {
    let master_repl = ctx.addresses.replication(names, broker);
    let mut fenced = Vec::new();
    for f in followers {
        if follow(ctx, names, f, &master_repl, epoch).await {
            fenced.push(f.clone());
        }
    }
    info!(
        master = %broker, epoch,
        "fenced {} of {} followers before promoting {broker}: {}",
        fenced.len(), followers.len(), fenced.join(", ")
    );
    check_fenced(observation, policy, broker, &fenced)?;
    let no_names = BTreeMap::new();
    let measure = |name: String| {
        let addr = ctx.addresses.admin(names, &name);
        let no_names = &no_names;
        async move {
            let s = ctx.admin.status(&addr).await.ok();
            (name, s.map(|s| broker_status(&s, no_names)))
        }
    };
    let chosen_now = measure(broker.to_string()).await.1;
    let fenced_now = futures::future::join_all(fenced.into_iter().map(measure)).await;
    check_measured(
        observation,
        policy,
        broker,
        chosen_now.as_ref(),
        &fenced_now,
    )
}

/// Promotes `broker` to master of `epoch` (already recorded), then has
/// `followers` follow it (again, after a fence: a fenced broker connects at
/// once instead of at its next retry), then moves the role labels.
async fn promote(
    ctx: &Context,
    names: &GroupNames,
    observed: &Observed,
    broker: &str,
    epoch: u64,
    followers: &[String],
) -> Result<()> {
    // Promote.
    let addr = ctx.addresses.admin(names, broker);
    let promoted = ctx
        .admin
        .promote(&addr, epoch)
        .await
        .map_err(|message| Error::Admin {
            broker: broker.to_string(),
            op: "promote",
            message,
        })?;
    info!(master = %broker, epoch, start_offset = promoted.start_offset, "{broker} is master of epoch {epoch}, writing from offset {}", promoted.start_offset);

    // The others follow.
    let master_repl = ctx.addresses.replication(names, broker);
    for f in followers {
        follow(ctx, names, f, &master_repl, epoch).await;
    }

    // Labels: the client Service follows the master.
    label_roles(ctx, names, observed, broker).await
}

/// How long a master may wait for its slave to catch up in a planned
/// hand-over (`SwitchoverRequest.timeout_ms`); the admin client waits longer
/// than this for the answer (see `brokers::GrpcAdmin`).
pub const SWITCHOVER_WAIT_MS: u64 = 10_000;

/// Planned switchover requested with the `keelmq.io/switchover-to`
/// annotation, done only while the group is healthy (see [`hand_over`]);
/// the annotation is removed either way, with an Event saying what happened.
pub async fn switchover(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    observed: &Observed,
    target: &str,
    status: &mut BrokerGroupStatus,
) -> Result<Option<Outcome>> {
    let reason = format!(
        "planned switchover requested with {}",
        keelmq_crds::ANNOTATION_SWITCHOVER_TO
    );
    // After a failed attempt the annotation stays, and is acted on once
    // the wait is over.
    if hand_over_held(ctx, names, &reason, target) {
        return Ok(None);
    }
    let outcome = hand_over(ctx, bg, names, observed, target, &reason, status).await?;
    let api: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {keelmq_crds::ANNOTATION_SWITCHOVER_TO: null}}});
    *bg = api
        .patch(&names.group, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(outcome)
}

/// Whether `target` may take the master role in a planned hand-over: a
/// reachable, ready slave the master counts as in sync.
pub fn can_take_over(observed: &Observed, status: &BrokerGroupStatus, target: &str) -> bool {
    let master = status.master.as_deref();
    replica_statuses(observed, master, &status.replicas)
        .iter()
        .find(|r| r.name == target)
        .is_some_and(|r| r.reachable && r.ready && r.in_sync && r.role == "slave")
}

/// How long the first retry of a failed planned hand-over waits. A
/// hand-over stops the master's writes while it waits for the target (up to
/// [`SWITCHOVER_WAIT_MS`]), so a target that cannot take over must not have
/// them stopped every few seconds for good.
pub const SWITCHOVER_BACKOFF: Duration = Duration::from_secs(10);
/// The longest wait between two attempts.
pub const MAX_SWITCHOVER_BACKOFF: Duration = Duration::from_secs(300);

/// Planned hand-overs of a group that failed in a row.
#[derive(Clone, Debug)]
pub struct SwitchoverFailures {
    /// How many.
    pub count: u32,
    /// When the last one failed.
    pub last: std::time::Instant,
}

fn group_key(names: &GroupNames) -> String {
    format!("{}/{}", names.namespace, names.group)
}

/// While the group's last planned hand-over failed too recently to try
/// again: how many failed in a row, and how long until the next attempt.
pub fn switchover_held(ctx: &Context, names: &GroupNames) -> Option<(u32, Duration)> {
    let f = ctx
        .switchover_failures
        .lock()
        .ok()?
        .get(&group_key(names))
        .cloned()?;
    let wait = switchover_backoff(SWITCHOVER_BACKOFF, f.count);
    let since = f.last.elapsed();
    (since < wait).then(|| (f.count, wait - since))
}

/// Whether a planned hand-over of the group waits after an earlier one
/// failed (see [`switchover_held`]); says so in the log.
fn hand_over_held(ctx: &Context, names: &GroupNames, reason: &str, target: &str) -> bool {
    let Some((count, left)) = switchover_held(ctx, names) else {
        return false;
    };
    info!(
        "{reason}: switchover to {target} held: the last {count} attempt(s) failed; the next in {left:.0?}"
    );
    true
}

/// How long after the `count`th failure in a row the next hand-over waits:
/// `first`, doubled for each further failure, at most
/// [`MAX_SWITCHOVER_BACKOFF`].
pub fn switchover_backoff(first: Duration, count: u32) -> Duration {
    let doublings = count.saturating_sub(1).min(16);
    first
        .saturating_mul(1u32 << doublings)
        .min(MAX_SWITCHOVER_BACKOFF)
}

/// The planned hand-over of the master role to `target` (the switchover
/// annotation, a rolling update, a scale-down), done only to a reachable,
/// ready slave the master counts as in sync. Recorded in status first (new
/// epoch, optimistic concurrency), then the master hands over through the
/// admin API, then the labels move. `Ok(None)` when nothing was done (the
/// target is already master, or not eligible: a Warning event says so; or
/// the last attempt failed too recently, see [`switchover_backoff`]).
pub async fn hand_over(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    observed: &Observed,
    target: &str,
    reason: &str,
    status: &mut BrokerGroupStatus,
) -> Result<Option<Outcome>> {
    let Some(master) = status.master.clone() else {
        return Ok(None);
    };
    if target == master {
        info!("{reason}: switchover to {target} requested, but it is already the master");
        return Ok(None);
    }
    if !can_take_over(observed, status, target) {
        warn!(
            "{reason}: switchover to {target} refused: it is not a reachable, ready, in-sync slave"
        );
        publish(
            ctx,
            bg,
            EventType::Warning,
            "SwitchoverRefused",
            "Switchover",
            format!("{target} is not a reachable, ready, in-sync slave of {master}"),
        )
        .await;
        return Ok(None);
    }
    let key = group_key(names);
    if hand_over_held(ctx, names, reason, target) {
        return Ok(None);
    }
    let new_epoch = u64::try_from(status.epoch).unwrap_or(0) + 1;
    info!(from = %master, to = %target, epoch = new_epoch, "{reason}: handing the master role from {master} to {target} in epoch {new_epoch}");
    let api: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let mut next = bg.clone();
    let mut st = bg.status.clone().unwrap_or_default();
    st.master = Some(target.to_string());
    st.epoch = i64::try_from(new_epoch).unwrap_or(i64::MAX);
    st.master_store_id = observed.statuses.get(target).map(|s| s.store_id.clone());
    st.master_unready = None;
    st.last_failover = Some(FailoverRecord {
        time: Time(jiff::Timestamp::now()),
        from: Some(master.clone()),
        to: target.to_string(),
        epoch: st.epoch,
        reason: reason.to_string(),
        possible_loss: PossibleLoss::Nothing.to_string(),
    });
    next.status = Some(st.clone());
    let before = bg.status.clone().unwrap_or_default();
    *bg = api
        .replace_status(&names.group, &PostParams::default(), &next)
        .await
        .map_err(write_error)?;
    info!(master = %target, epoch = new_epoch, "recorded {target} as master of epoch {new_epoch} in the BrokerGroup status");
    *status = BrokerGroupStatus {
        conditions: status.conditions.clone(),
        replicas: status.replicas.clone(),
        rollout: status.rollout.clone(),
        ..st.clone()
    };
    let answer = ctx
        .admin
        .switchover(
            &ctx.addresses.admin(names, &master),
            pb::SwitchoverRequest {
                target_broker_id: target.to_string(),
                target_admin_address: ctx.addresses.admin(names, target),
                new_epoch,
                timeout_ms: SWITCHOVER_WAIT_MS,
            },
        )
        .await;
    let r = match answer {
        Ok(r) => r,
        Err(message) => {
            // The labels still point at the old master, which keeps (or takes
            // back) the role: record it as master again, so that nothing that
            // reads the status (the StatefulSet size of a scale-down, the
            // roll) acts as if the hand-over had happened. The raised epoch
            // stays: the next reconcile makes it master in a newer one.
            warn!(from = %master, to = %target, epoch = new_epoch, error = %message, "{reason}: the hand-over from {master} to {target} failed; recording {master} as master again");
            let mut back = bg.clone();
            let mut st = st;
            st.master = Some(master.clone());
            st.master_store_id = before.master_store_id;
            st.last_failover = before.last_failover;
            back.status = Some(st.clone());
            *bg = api
                .replace_status(&names.group, &PostParams::default(), &back)
                .await
                .map_err(write_error)?;
            *status = BrokerGroupStatus {
                conditions: status.conditions.clone(),
                replicas: status.replicas.clone(),
                rollout: status.rollout.clone(),
                ..st
            };
            if let Ok(mut f) = ctx.switchover_failures.lock() {
                let e = f.entry(key).or_insert(SwitchoverFailures {
                    count: 0,
                    last: std::time::Instant::now(),
                });
                e.count = e.count.saturating_add(1);
                e.last = std::time::Instant::now();
            }
            return Err(Error::Admin {
                broker: master.clone(),
                op: "switchover",
                message,
            });
        }
    };
    if let Ok(mut f) = ctx.switchover_failures.lock() {
        f.remove(&key);
    }
    info!(
        epoch = r.epoch,
        write_pause_ms = r.write_pause_ms,
        "{target} is master of epoch {}; writes paused for {} ms",
        r.epoch,
        r.write_pause_ms
    );
    // The old master follows the new one (it did that itself); the other
    // slaves, whose streams broke as it stepped down, are pointed at the new
    // master now, as after a promotion, not a reconcile later: the old
    // master may be about to stop (a drained master's preStop hook lets it
    // go once it has handed over), and under SYNC the new master
    // acknowledges sends only with a slave in sync.
    let target_repl = ctx.addresses.replication(names, target);
    for (name, s) in &observed.statuses {
        if name != target && *name != master && following(s) {
            follow(ctx, names, name, &target_repl, new_epoch).await;
        }
    }
    label_roles(ctx, names, observed, target).await?;
    publish(
        ctx,
        bg,
        EventType::Normal,
        "SwitchedOver",
        "Switchover",
        format!("master role handed from {master} to {target} in epoch {new_epoch}: {reason}"),
    )
    .await;
    Ok(Some(Outcome::Promoted {
        master: target.to_string(),
        epoch: new_epoch,
    }))
}

/// Whether the recorded master's pod is being deleted.
pub fn master_terminating(observed: &Observed, status: &BrokerGroupStatus) -> bool {
    status
        .master
        .as_ref()
        .and_then(|m| observed.pods.get(m))
        .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
}

/// The slave to hand the master role to when the master's pod goes: one
/// that [`can_take_over`] and whose own pod is not being deleted; first one
/// that stays (an ordinal below `replicas`: during a scale-down, a slave on
/// an ordinal being removed would have to hand the role on again), then the
/// one holding the most (the hand-over waits least for it), then by name.
pub fn successor(
    observed: &Observed,
    status: &BrokerGroupStatus,
    names: &GroupNames,
    replicas: i32,
) -> Option<String> {
    let master = status.master.as_deref();
    let stays = |name: &str| names.ordinal(name).is_some_and(|o| o < replicas.max(1));
    replica_statuses(observed, master, &status.replicas)
        .into_iter()
        .filter(|r| Some(r.name.as_str()) != master)
        .filter(|r| can_take_over(observed, status, &r.name))
        .filter(|r| {
            observed
                .pods
                .get(&r.name)
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
        })
        .max_by(|a, b| {
            stays(&a.name)
                .cmp(&stays(&b.name))
                .then(a.offset.cmp(&b.offset))
                .then_with(|| b.name.cmp(&a.name))
        })
        .map(|r| r.name)
}

/// The recorded master's pod is being deleted (a node drain, an eviction,
/// `kubectl delete pod`) while the master still serves: the broker's
/// preStop hook (`/prestop`) holds its shutdown while it has a slave in
/// sync, so the role is handed to that slave now, a planned switchover (no
/// acknowledged message lost, writes paused only for the hand-over) instead
/// of a failover once it has stopped. Call only when the failover decision
/// is `Healthy`. `Ok(None)`: the master is not terminating, or no slave can
/// take over (then it fails over once it stops, as any lost master).
pub async fn hand_over_from_terminating(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    observed: &Observed,
    status: &mut BrokerGroupStatus,
) -> Result<Option<Outcome>> {
    if !master_terminating(observed, status) {
        return Ok(None);
    }
    let master = status.master.clone().unwrap_or_default();
    let Some(target) = successor(observed, status, names, bg.spec.replicas) else {
        info!(
            "master {master}'s pod is being deleted and no slave can take over (reachable, ready, in sync and staying): it fails over once it stops"
        );
        return Ok(None);
    };
    let reason = format!(
        "planned switchover: master {master}'s pod is being deleted (node drain, eviction or delete)"
    );
    hand_over(ctx, bg, names, observed, &target, &reason, status).await
}

/// Tells `broker` to follow the master at `master_repl` in `epoch`; whether
/// it accepted.
async fn follow(
    ctx: &Context,
    names: &GroupNames,
    broker: &str,
    master_repl: &str,
    epoch: u64,
) -> bool {
    let addr = ctx.addresses.admin(names, broker);
    match ctx.admin.follow(&addr, master_repl, epoch).await {
        Ok(r) if r.truncated => {
            info!(
                broker,
                epoch,
                "{broker} follows the master in epoch {epoch}; it cut its log back to offset {} (records after the fork point were never acknowledged)",
                r.truncated_to
            );
            true
        }
        Ok(_) => {
            info!(
                broker,
                epoch, "{broker} follows the master in epoch {epoch}"
            );
            true
        }
        Err(e) => {
            warn!(broker, epoch, error = %e, "{broker} did not accept follow; will retry");
            false
        }
    }
}

/// Sets `keelmq.io/role` on each existing pod: `master` on `master`, `slave`
/// on the others; pods already labelled right are not touched.
async fn label_roles(
    ctx: &Context,
    names: &GroupNames,
    observed: &Observed,
    master: &str,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    for (name, pod) in &observed.pods {
        let want = if name == master { "master" } else { "slave" };
        if pod.labels().get(LABEL_ROLE).map(String::as_str) == Some(want) {
            continue;
        }
        let patch = serde_json::json!({"metadata": {"labels": {LABEL_ROLE: want}}});
        pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        info!(pod = %name, role = want, "labelled {name} {LABEL_ROLE}={want}");
    }
    Ok(())
}

/// Publishes a Kubernetes Event about the group; a failure is logged, not fatal.
pub async fn publish(
    ctx: &Context,
    bg: &BrokerGroup,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &bg.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

/// Shared handle type for the context.
pub type SharedContext = Arc<Context>;
