//! The BrokerGroup controller: `reconcile` applies the objects the model
//! builds, observes the brokers, lets the failover executor act, and writes
//! the status; `error_policy` counts failures and decides when to retry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use keelmq_crds::{ANNOTATION_PAUSE, BrokerGroup, BrokerGroupStatus, Topic};
use keelmq_failover::{Decision, WaitReason, decide};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, info, info_span, warn};

use crate::brokers::{AddressBook, BrokerAdmin, ClusterDns, GrpcAdmin};
use crate::conditions::{self, DEGRADED, PAUSED, PROGRESSING, READY};
use crate::failover::{self, Outcome};
use crate::metrics::Metrics;
use crate::model::{self, GroupNames, LABEL_INSTANCE};
use crate::replication::{
    self, REASON_CATCHING_UP, REASON_NOT_ENOUGH_IN_SYNC, REASON_REPLICATION_BROKEN,
};
use crate::rollout;
use crate::{Error, MANAGER, Result};

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Broker admin calls.
    pub admin: Arc<dyn BrokerAdmin>,
    /// Where brokers are.
    pub addresses: Arc<dyn AddressBook>,
    /// The last wait reason reported per group, so the Warning event is
    /// published on a change, not on every poll.
    pub last_wait: Mutex<HashMap<String, String>>,
    /// Since when each group's slaves have been seen not connected to the
    /// master.
    pub disconnects: replication::Disconnects,
    /// How long a ready slave may stay unconnected to the master before the
    /// group is Degraded ([`replication::REPLICATION_GRACE`]; tests shorten it).
    pub replication_grace: Duration,
    /// Where the operator runs, for the NetworkPolicy (its namespace and pod
    /// labels; `main` sets them from the flags).
    pub operator_peer: model::OperatorPeer,
    /// True while [`run`] runs the controllers (after it found the CRDs);
    /// the leader's `/readyz` waits for it.
    pub controllers_running: Arc<AtomicBool>,
    /// Planned hand-overs that failed in a row, per group (see
    /// [`failover::hand_over`]).
    pub switchover_failures: Mutex<HashMap<String, failover::SwitchoverFailures>>,
}

impl Context {
    /// A context talking to brokers over gRPC at their cluster DNS names.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self::with_brokers(
            client,
            metrics,
            Arc::new(GrpcAdmin::default()),
            Arc::new(ClusterDns),
        )
    }

    /// A context with the broker side injected (tests).
    pub fn with_brokers(
        client: Client,
        metrics: Arc<Metrics>,
        admin: Arc<dyn BrokerAdmin>,
        addresses: Arc<dyn AddressBook>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            admin,
            addresses,
            last_wait: Mutex::default(),
            disconnects: replication::Disconnects::default(),
            replication_grace: replication::REPLICATION_GRACE,
            operator_peer: model::OperatorPeer::default(),
            controllers_running: Arc::new(AtomicBool::new(false)),
            switchover_failures: Mutex::default(),
        }
    }
}

/// Why this reconcile probably runs; the controller does not say, so it is
/// inferred from the object (watches can miss events, so the reconcile never
/// depends on it).
fn trigger(bg: &BrokerGroup) -> &'static str {
    match bg.status.as_ref().and_then(|s| s.observed_generation) {
        None => "new BrokerGroup",
        Some(g) if Some(g) != bg.metadata.generation => "spec changed",
        Some(_) => "resync, pod or broker change",
    }
}

/// Reconciles one BrokerGroup: one span, one story in the logs.
pub async fn reconcile(bg: Arc<BrokerGroup>, ctx: Arc<Context>) -> Result<Action> {
    let metrics = ctx.metrics.clone();
    let _timer = metrics.reconcile("BrokerGroup");
    let span = info_span!(
        "reconcile",
        kind = "BrokerGroup",
        namespace = bg.namespace().unwrap_or_default(),
        name = bg.name_any(),
        generation = bg.metadata.generation.unwrap_or(0),
        trigger = trigger(&bg),
    );
    reconcile_group(bg, ctx).instrument(span).await
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingObjectKey("metadata.name"))?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Writes the status, only while the BrokerGroup is still at `bg`'s
/// resourceVersion (the object this reconcile read or last wrote): a status
/// built from an older object must not roll back a master or epoch that
/// someone recorded meanwhile. A 409 is [`Error::Conflict`] (retried soon).
async fn write_status(
    api: &Api<BrokerGroup>,
    bg: &BrokerGroup,
    status: &BrokerGroupStatus,
) -> Result<()> {
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": bg.resource_version()},
        "status": status,
    });
    api.patch_status(
        &bg.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(failover::write_error)?;
    Ok(())
}

/// Deletes the group's NetworkPolicy (`spec.networkPolicy.enabled` false),
/// if the operator made it for this group: found by its labels, deleted only
/// when this BrokerGroup owns it, and only that very object (uid
/// precondition).
async fn remove_network_policy(ctx: &Context, bg: &BrokerGroup, names: &GroupNames) -> Result<()> {
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let selector = format!(
        "{}={},{}={}",
        LABEL_INSTANCE,
        names.group,
        model::LABEL_MANAGED_BY,
        MANAGER
    );
    let uid = bg.uid();
    for np in api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let ours = np.owner_references().iter().any(|o| {
            o.controller == Some(true) && o.kind == "BrokerGroup" && Some(&o.uid) == uid.as_ref()
        });
        if !ours || np.metadata.name.as_deref() != Some(names.network_policy().as_str()) {
            continue;
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: np.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&names.network_policy(), &params).await {
            Ok(_) => info!(
                "deleted NetworkPolicy {}: spec.networkPolicy.enabled is false",
                names.network_policy()
            ),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Holds a scale-down while a broker that stays is not ready, following the
/// master and in sync: the pods a scale-down removes may hold the only copies
/// of acknowledged records besides the master's. `sts` (as built) keeps the
/// StatefulSet's current size then; returns why, when it holds.
async fn hold_scale_down(
    ctx: &Context,
    bg: &BrokerGroup,
    names: &GroupNames,
    observed: &failover::Observed,
    status: &BrokerGroupStatus,
    sts: &mut StatefulSet,
) -> Result<Option<String>> {
    let members = rollout::members(names, observed, status, sts);
    let Some(why) = rollout::scale_down_blocked(&members, bg.spec.replicas) else {
        return Ok(None);
    };
    let Some(spec) = sts.spec.as_mut() else {
        return Ok(None);
    };
    let wanted = spec.replicas.unwrap_or(1);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let current = sets
        .get_opt(&names.group)
        .await?
        .and_then(|s| s.spec)
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    if current <= wanted {
        return Ok(None);
    }
    spec.replicas = Some(current);
    Ok(Some(format!(
        "scale-down to {} held at {current} pods: {why}",
        bg.spec.replicas.max(1)
    )))
}

async fn reconcile_group(cached: Arc<BrokerGroup>, ctx: Arc<Context>) -> Result<Action> {
    let names = GroupNames::of(&cached)?;
    let api: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &names.namespace);
    // Everything is built from the group as stored now, not from the
    // controller's cache: a pod event can start this reconcile before the
    // BrokerGroup watch has delivered the last status write, and an older
    // master or epoch would move the master label back and roll the status
    // back.
    let Some(mut bg) = api.get_opt(&names.group).await? else {
        return Ok(Action::await_change());
    };
    let generation = bg.metadata.generation;
    let now = Time(jiff::Timestamp::now());
    let mut status = bg.status.clone().unwrap_or_default();

    if bg.annotations().get(ANNOTATION_PAUSE).map(String::as_str) == Some("true") {
        if !conditions::is_true(&status.conditions, PAUSED) {
            info!(
                "reconciliation paused by annotation {ANNOTATION_PAUSE}=true; changing nothing until it is removed"
            );
        }
        conditions::set(
            &mut status.conditions,
            PAUSED,
            true,
            "PausedByAnnotation",
            format!("{ANNOTATION_PAUSE} is true: the operator changes nothing in this group"),
            generation,
            &now,
        );
        write_status(&api, &bg, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    if conditions::is_true(&status.conditions, PAUSED) {
        info!("reconciliation resumed: pause annotation removed");
    }
    conditions::set(
        &mut status.conditions,
        PAUSED,
        false,
        "Reconciling",
        "the operator manages this group",
        generation,
        &now,
    );

    // 1. Desired objects, built purely from the spec.
    let built = (|| -> Result<_> {
        Ok((
            model::config_map(&bg)?,
            model::headless_service(&bg)?,
            model::client_service(&bg)?,
            model::read_service(&bg)?,
            model::stateful_set(&bg)?,
            model::pod_disruption_budget(&bg)?,
            model::network_policy(&bg, &ctx.operator_peer)?,
        ))
    })();

    // 2. Observe pods and brokers.
    let ns = names.namespace.as_str();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pod_list = pods
        .list(&ListParams::default().labels(&model::selector_string(&names.group)))
        .await?
        .items;
    let observed = failover::observe(&ctx, &bg, &names, pod_list).await;

    // 3. Applied with server-side apply (idempotent; creates or updates).
    // A spec that cannot be built, or an apply the API server refuses, is
    // reported in the conditions, but failover below goes on regardless (the
    // running pods keep serving); only the roll waits for a good spec.
    let mut problem: Option<(&'static str, String)> = None;
    let mut held = None;
    let sts = match built {
        Ok((cm, headless, client_svc, read_svc, mut sts, pdb, netpol)) => {
            held = hold_scale_down(&ctx, &bg, &names, &observed, &status, &mut sts).await?;
            let applied = async {
                apply(&ctx.client, ns, &cm).await?;
                apply(&ctx.client, ns, &headless).await?;
                apply(&ctx.client, ns, &client_svc).await?;
                apply(&ctx.client, ns, &read_svc).await?;
                let sts = apply(&ctx.client, ns, &sts).await?;
                apply(&ctx.client, ns, &pdb).await?;
                if bg.spec.network_policy.enabled {
                    apply(&ctx.client, ns, &netpol).await?;
                } else {
                    remove_network_policy(&ctx, &bg, &names).await?;
                }
                Ok::<_, Error>(sts)
            }
            .await;
            match applied {
                Ok(sts) => Some(sts),
                Err(e) => {
                    problem = Some((
                        "ApplyFailed",
                        format!("applying the group's objects failed: {e}"),
                    ));
                    None
                }
            }
        }
        Err(Error::InvalidSpec(msg)) => {
            problem = Some(("InvalidSpec", msg));
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(sts) = &sts {
        let sts_replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        if status.observed_generation != generation {
            info!(
                replicas = bg.spec.replicas,
                "applied ConfigMap {}, Services {}, {}, {}, StatefulSet {} ({} replicas), PodDisruptionBudget {}{}",
                names.config_map(),
                names.group,
                names.headless(),
                names.read(),
                names.group,
                sts_replicas,
                names.group,
                if bg.spec.network_policy.enabled {
                    format!(" and NetworkPolicy {}", names.network_policy())
                } else {
                    " (no NetworkPolicy: spec.networkPolicy.enabled is false)".into()
                }
            );
        }
        if let Some(why) = &held {
            if conditions::message(&status.conditions, PROGRESSING) != Some(why.as_str()) {
                info!(replicas = bg.spec.replicas, "{why}");
            }
        } else if sts_replicas > bg.spec.replicas.max(1) {
            info!(
                replicas = bg.spec.replicas,
                "scale-down to {} held at {sts_replicas} pods: master {} is on an ordinal the StatefulSet would remove; it hands over to a slave that stays first",
                bg.spec.replicas.max(1),
                status.master.as_deref().unwrap_or("-")
            );
        }
    }

    // 4. Decide and act.
    let decision = decide(&observed.observation, &failover::policy(&bg));
    let mut outcome = failover::execute(
        &ctx,
        &mut bg,
        &names,
        &observed,
        decision.clone(),
        &mut status,
    )
    .await?;
    // A master whose pod is being deleted hands over before it stops.
    if outcome == Outcome::Healthy
        && let Some(done) =
            failover::hand_over_from_terminating(&ctx, &mut bg, &names, &observed, &mut status)
                .await?
    {
        outcome = done;
    }
    let switchover_to = bg
        .annotations()
        .get(keelmq_crds::ANNOTATION_SWITCHOVER_TO)
        .cloned();
    if outcome == Outcome::Healthy
        && let Some(target) = &switchover_to
        && let Some(done) =
            failover::switchover(&ctx, &mut bg, &names, &observed, target, &mut status).await?
    {
        outcome = done;
    }
    // Rolling restarts and scale-down hand-overs, only while nothing else
    // is going on, and only with the spec applied.
    let mut roll = None;
    if outcome == Outcome::Healthy && switchover_to.is_none() {
        if let Some(sts) = &sts {
            let (report, done) =
                rollout::advance(&ctx, &mut bg, &names, &observed, sts, &mut status).await?;
            roll = report;
            if let Some(done) = done {
                outcome = done;
            }
        }
        if roll.is_none()
            && let Some(why) = held
        {
            roll = Some(rollout::Report {
                reason: rollout::REASON_WAITING,
                message: why,
                deleted: None,
            });
        }
    } else if let Some(r) = status.rollout.as_mut() {
        r.message = match &outcome {
            Outcome::Redirected { brokers, .. } => format!(
                "{} told to follow the master; the roll goes on once every broker is in sync",
                brokers.join(", ")
            ),
            Outcome::Waiting(why) => format!("on hold: {why}"),
            Outcome::Promoted { master, .. } => {
                format!("on hold while {master} takes over as master")
            }
            Outcome::Healthy => "on hold while the switchover annotation is handled".into(),
        };
    }

    // 5. Status.
    let previous = bg
        .status
        .as_ref()
        .map(|s| s.replicas.clone())
        .unwrap_or_default();
    status.replicas = failover::replica_statuses(&observed, status.master.as_deref(), &previous);
    // Brokers that serve (`failover::serving`): a following slave counts
    // while it answers, in sync or not, as it did before its pod's
    // readiness came to need it in sync; the Ready condition reads the
    // master's view of its slaves for that (`replication::judge`).
    status.ready_replicas = i32::try_from(
        observed
            .observation
            .brokers
            .iter()
            .filter(|b| b.ready)
            .count(),
    )
    .unwrap_or(i32::MAX);
    if roll.as_ref().is_some_and(|r| r.deleted.is_some()) {
        // The pod just deleted was ready when observed.
        status.ready_replicas = status.ready_replicas.saturating_sub(1);
    }
    status.observed_generation = generation;
    status.master_unready = observed
        .master_unready
        .clone()
        .filter(|u| status.master.as_deref() == Some(u.master.as_str()));
    status.master_replication = failover::master_replication(
        &observed,
        status.master.as_deref(),
        bg.status
            .as_ref()
            .and_then(|s| s.master_replication.as_ref()),
    );
    let key = format!("{}/{}", names.namespace, names.group);
    let replicas = bg.spec.replicas;
    // What the master says of its slaves (only once the failover decision
    // is Healthy: every reachable slave says it follows the master). Any
    // other outcome (a promotion, a redirect, a wait) starts the slaves'
    // grace again.
    let verdict = match (&outcome, status.master.as_deref()) {
        (Outcome::Healthy, Some(master)) => replication::links(&observed, master).map(|links| {
            let unconnected_for = ctx.disconnects.observe(
                &key,
                master,
                status.epoch,
                &links,
                std::time::Instant::now(),
            );
            replication::judge(
                &failover::policy(&bg),
                master,
                &links,
                &unconnected_for,
                ctx.replication_grace,
            )
        }),
        _ => {
            ctx.disconnects.forget(&key);
            None
        }
    }
    .unwrap_or_default();
    let newly_broken = ctx.disconnects.announce(&key, verdict.broken.as_deref());
    let requeue = match &outcome {
        Outcome::Healthy if status.ready_replicas >= replicas => {
            let msg = format!(
                "master {} serves epoch {}; {}/{} brokers ready",
                status.master.as_deref().unwrap_or("-"),
                status.epoch,
                status.ready_replicas,
                replicas
            );
            match &verdict.not_ready {
                None => {
                    if !conditions::is_true(&status.conditions, READY) {
                        info!("group ready: {msg}");
                    }
                    conditions::set(
                        &mut status.conditions,
                        READY,
                        true,
                        "Serving",
                        msg,
                        generation,
                        &now,
                    );
                }
                Some(why) => {
                    if conditions::reason(&status.conditions, READY)
                        != Some(REASON_NOT_ENOUGH_IN_SYNC)
                    {
                        info!("group not ready: {why}");
                    }
                    conditions::set(
                        &mut status.conditions,
                        READY,
                        false,
                        REASON_NOT_ENOUGH_IN_SYNC,
                        why,
                        generation,
                        &now,
                    );
                }
            }
            match &verdict.pending {
                None => conditions::set(
                    &mut status.conditions,
                    PROGRESSING,
                    false,
                    "Stable",
                    "nothing to change",
                    generation,
                    &now,
                ),
                Some(what) => conditions::set(
                    &mut status.conditions,
                    PROGRESSING,
                    true,
                    REASON_CATCHING_UP,
                    what,
                    generation,
                    &now,
                ),
            }
            set_degraded_by_replication(
                &mut status.conditions,
                verdict.broken.as_deref(),
                "all brokers follow the master",
                generation,
                &now,
            );
            lock(&ctx.last_wait).remove(&key);
            if verdict.pending.is_some() {
                Duration::from_secs(2)
            } else if verdict.not_ready.is_some() || verdict.broken.is_some() {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(30)
            }
        }
        Outcome::Healthy => {
            let msg = format!("{}/{} brokers ready", status.ready_replicas, replicas);
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                "BrokersNotReady",
                &msg,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                true,
                "BrokersStarting",
                &msg,
                generation,
                &now,
            );
            // A ready slave the master has not seen for the grace is
            // broken whatever the other pods do.
            set_degraded_by_replication(
                &mut status.conditions,
                verdict.broken.as_deref(),
                "the master serves",
                generation,
                &now,
            );
            Duration::from_secs(5)
        }
        Outcome::Waiting(why) => {
            let starting = matches!(
                decision,
                Decision::Wait {
                    reason: WaitReason::WaitingForMembers { .. }
                }
            );
            let reason = match &decision {
                Decision::Wait {
                    reason: WaitReason::WaitingForMembers { .. },
                } => "WaitingForBrokers",
                Decision::Wait {
                    reason: WaitReason::DetectionDelay { .. },
                } => "MasterUnready",
                _ => "FailoverBlocked",
            };
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                reason,
                why,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                starting,
                reason,
                why,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                !starting,
                reason,
                why,
                generation,
                &now,
            );
            let changed =
                lock(&ctx.last_wait).insert(key, why.clone()).as_deref() != Some(why.as_str());
            if changed {
                info!("waiting: {why}");
                if !starting {
                    failover::publish(
                        &ctx,
                        &bg,
                        EventType::Warning,
                        reason,
                        "Failover",
                        why.clone(),
                    )
                    .await;
                }
            }
            Duration::from_secs(2)
        }
        Outcome::Promoted { master, epoch } => {
            let msg = format!("{master} promoted to master of epoch {epoch}");
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                "MasterChanged",
                &msg,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                true,
                "MasterChanged",
                &msg,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                false,
                "MasterChanged",
                &msg,
                generation,
                &now,
            );
            lock(&ctx.last_wait).remove(&key);
            Duration::from_secs(1)
        }
        Outcome::Redirected { brokers, refused } => {
            let msg = format!("{} told to follow the master", brokers.join(", "));
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                true,
                "Following",
                &msg,
                generation,
                &now,
            );
            if !refused.is_empty() {
                // A broker that will not follow replicates nothing: the
                // group is not what Ready promises until it does.
                let why = format!(
                    "{} did not accept to follow the master; told again every second",
                    refused.join(", ")
                );
                for (kind, value) in [(READY, false), (DEGRADED, true)] {
                    conditions::set(
                        &mut status.conditions,
                        kind,
                        value,
                        "FollowRefused",
                        &why,
                        generation,
                        &now,
                    );
                }
            }
            Duration::from_secs(1)
        }
    };
    if newly_broken && let Some(why) = &verdict.broken {
        warn!("replication broken: {why}");
        failover::publish(
            &ctx,
            &bg,
            EventType::Warning,
            REASON_REPLICATION_BROKEN,
            "Replicate",
            why.clone(),
        )
        .await;
    }
    let requeue = match roll {
        Some(r) => {
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                true,
                r.reason,
                r.message,
                generation,
                &now,
            );
            requeue.min(Duration::from_secs(2))
        }
        None => requeue,
    };
    let requeue = match problem {
        Some((reason, msg)) => {
            // Told once per problem: the stored Ready condition already says
            // it after the first time.
            let stored = bg.status.as_ref().map(|s| s.conditions.as_slice());
            if stored.and_then(|c| conditions::message(c, READY)) != Some(msg.as_str()) {
                warn!(
                    "{msg}; the brokers are still watched and failed over, but nothing else changes until the BrokerGroup is fixed"
                );
                failover::publish(
                    &ctx,
                    &bg,
                    EventType::Warning,
                    reason,
                    "Reconcile",
                    msg.clone(),
                )
                .await;
            }
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                reason,
                &msg,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                true,
                reason,
                &msg,
                generation,
                &now,
            );
            requeue.min(Duration::from_secs(15))
        }
        None => requeue,
    };
    write_status(&api, &bg, &status).await?;
    Ok(Action::requeue(requeue))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What to do after a failed reconcile: count it and retry, sooner for a
/// lost status race than for an API outage.
pub fn error_policy(bg: Arc<BrokerGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(namespace = bg.namespace().unwrap_or_default(), name = bg.name_any(), %error, "reconcile failed");
    ctx.metrics.error("BrokerGroup", error);
    match error {
        Error::Conflict => Action::requeue(Duration::from_millis(500)),
        Error::Admin { .. } => Action::requeue(Duration::from_secs(2)),
        Error::InvalidSpec(_) => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(15)),
    }
}

/// What of a BrokerGroup starts a reconcile when it changes: the spec (its
/// generation) and the annotations (pause, switchover, restart). Not the
/// status: every reconcile writes it (broker offsets and lags move with any
/// traffic), so reconciling on status changes would loop without pause
/// instead of every 30 s. Pods and owned objects trigger reconciles through
/// their own watches.
pub fn group_trigger(bg: &BrokerGroup) -> Option<u64> {
    predicates::generation
        .combine(predicates::annotations)
        .hash_property(bg)
}

/// Runs the BrokerGroup and Topic controllers until a shutdown signal;
/// `ctx.controllers_running` is true from when they start until they stop.
pub async fn run(client: Client, namespace: Option<String>, ctx: Arc<Context>) -> Result<()> {
    let (groups, topics, sts, svc, cm, pdb, netpol, pods) = match &namespace {
        Some(ns) => (
            Api::<BrokerGroup>::namespaced(client.clone(), ns),
            Api::<Topic>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
            Api::<NetworkPolicy>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    groups
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| {
            warn!("cannot list BrokerGroups ({e}); are the CRDs installed? `keelmq-operator crds | kubectl apply -f -`");
            Error::Kube(e)
        })?;
    info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        "watching BrokerGroups and Topics"
    );
    let owned = || watcher::Config::default().labels(&format!("{}=keelmq", model::LABEL_NAME));
    // BrokerGroups trigger a reconcile on a spec or annotation change only:
    // the status is written by every reconcile (see `group_trigger`).
    let (reader, writer) = reflector::store();
    let group_changes = watcher(groups, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(group_trigger, Default::default());
    let group_controller = Controller::for_stream(group_changes, reader)
        .owns(sts, owned())
        .owns(svc, owned())
        .owns(cm, owned())
        .owns(pdb, owned())
        .owns(netpol, owned())
        .watches(pods, owned(), |pod: Pod| {
            let ns = pod.namespace();
            pod.labels().get(LABEL_INSTANCE).map(|g| match ns {
                Some(ns) => ObjectRef::new(g).within(&ns),
                None => ObjectRef::new(g),
            })
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        });
    let running = ctx.controllers_running.clone();
    let topic_controller = Controller::new(topics, watcher::Config::default().any_semantic())
        .shutdown_on_signal()
        .run(crate::topic::reconcile, crate::topic::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        });
    running.store(true, Ordering::Release);
    futures::join!(group_controller, topic_controller);
    running.store(false, Ordering::Release);
    Ok(())
}

/// Degraded from the master's view of replication: True (ReplicationBroken)
/// naming the broken slaves, or False with `healthy`.
fn set_degraded_by_replication(
    conditions: &mut Vec<Condition>,
    broken: Option<&str>,
    healthy: &str,
    generation: Option<i64>,
    now: &Time,
) {
    match broken {
        None => conditions::set(
            conditions, DEGRADED, false, "Healthy", healthy, generation, now,
        ),
        Some(why) => conditions::set(
            conditions,
            DEGRADED,
            true,
            REASON_REPLICATION_BROKEN,
            why,
            generation,
            now,
        ),
    }
}
