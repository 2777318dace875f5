//! The BrokerGroup controller: `reconcile` applies the objects the model
//! builds, observes the brokers, lets the failover executor act, and writes
//! the status; `error_policy` counts failures and decides when to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keelmq_crds::{ANNOTATION_PAUSE, BrokerGroup, BrokerGroupStatus, Topic};
use keelmq_failover::{Decision, WaitReason, decide};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, info, info_span, warn};

use crate::brokers::{AddressBook, BrokerAdmin, ClusterDns, GrpcAdmin};
use crate::conditions::{self, DEGRADED, PAUSED, PROGRESSING, READY};
use crate::failover::{self, Outcome};
use crate::metrics::Metrics;
use crate::model::{self, GroupNames, LABEL_INSTANCE};
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

async fn patch_status(
    api: &Api<BrokerGroup>,
    name: &str,
    status: &BrokerGroupStatus,
) -> Result<()> {
    let patch = serde_json::json!({ "status": status });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn reconcile_group(bg: Arc<BrokerGroup>, ctx: Arc<Context>) -> Result<Action> {
    let names = GroupNames::of(&bg)?;
    let api: Api<BrokerGroup> = Api::namespaced(ctx.client.clone(), &names.namespace);
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
        patch_status(&api, &names.group, &status).await?;
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
        ))
    })();
    let (cm, headless, client_svc, read_svc, sts, pdb) = match built {
        Ok(objects) => objects,
        Err(Error::InvalidSpec(msg)) => {
            warn!("the spec cannot be built: {msg}; fix the BrokerGroup");
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                "InvalidSpec",
                &msg,
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                true,
                "InvalidSpec",
                &msg,
                generation,
                &now,
            );
            status.observed_generation = generation;
            failover::publish(
                &ctx,
                &bg,
                EventType::Warning,
                "InvalidSpec",
                "Reconcile",
                msg,
            )
            .await;
            patch_status(&api, &names.group, &status).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };

    // 2. Applied with server-side apply (idempotent; creates or updates).
    let ns = names.namespace.as_str();
    apply(&ctx.client, ns, &cm).await?;
    apply(&ctx.client, ns, &headless).await?;
    apply(&ctx.client, ns, &client_svc).await?;
    apply(&ctx.client, ns, &read_svc).await?;
    let sts = apply(&ctx.client, ns, &sts).await?;
    apply(&ctx.client, ns, &pdb).await?;
    let sts_replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    if status.observed_generation != generation {
        info!(
            replicas = bg.spec.replicas,
            "applied ConfigMap {}, Services {}, {}, {}, StatefulSet {} ({} replicas) and PodDisruptionBudget {}",
            names.config_map(),
            names.group,
            names.headless(),
            names.read(),
            names.group,
            sts_replicas,
            names.group
        );
    }
    if sts_replicas > bg.spec.replicas.max(1) {
        info!(
            replicas = bg.spec.replicas,
            "scale-down to {} held at {sts_replicas} pods: master {} is on an ordinal the StatefulSet would remove; it hands over to a slave that stays first",
            bg.spec.replicas.max(1),
            status.master.as_deref().unwrap_or("-")
        );
    }

    // 3. Observe pods and brokers, decide, act.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pod_list = pods
        .list(&ListParams::default().labels(&model::selector_string(&names.group)))
        .await?
        .items;
    let fresh = api.get(&names.group).await?;
    let observed = failover::observe(&ctx, &fresh, &names, pod_list).await;
    let decision = decide(&observed.observation, &failover::policy(&fresh));
    let mut outcome = failover::execute(
        &ctx,
        &fresh,
        &names,
        &observed,
        decision.clone(),
        &mut status,
    )
    .await?;
    let switchover_to = fresh
        .annotations()
        .get(keelmq_crds::ANNOTATION_SWITCHOVER_TO);
    if outcome == Outcome::Healthy
        && let Some(target) = switchover_to
        && let Some(done) =
            failover::switchover(&ctx, &fresh, &names, &observed, target, &mut status).await?
    {
        outcome = done;
    }
    // Rolling restarts and scale-down hand-overs, only while nothing else
    // is going on.
    let mut roll = None;
    if outcome == Outcome::Healthy && switchover_to.is_none() {
        let (report, done) =
            rollout::advance(&ctx, &fresh, &names, &observed, &sts, &mut status).await?;
        roll = report;
        if let Some(done) = done {
            outcome = done;
        }
    } else if let Some(r) = status.rollout.as_mut() {
        r.message = match &outcome {
            Outcome::Redirected(b) => format!(
                "{} told to follow the master; the roll goes on once every broker is in sync",
                b.join(", ")
            ),
            Outcome::Waiting(why) => format!("on hold: {why}"),
            Outcome::Promoted { master, .. } => {
                format!("on hold while {master} takes over as master")
            }
            Outcome::Healthy => "on hold while the switchover annotation is handled".into(),
        };
    }

    // 4. Status.
    let previous = fresh
        .status
        .as_ref()
        .map(|s| s.replicas.clone())
        .unwrap_or_default();
    status.replicas = failover::replica_statuses(&observed, status.master.as_deref(), &previous);
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
    let key = format!("{}/{}", names.namespace, names.group);
    let replicas = bg.spec.replicas;
    let requeue = match &outcome {
        Outcome::Healthy if status.ready_replicas >= replicas => {
            let msg = format!(
                "master {} serves epoch {}; {}/{} brokers ready",
                status.master.as_deref().unwrap_or("-"),
                status.epoch,
                status.ready_replicas,
                replicas
            );
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
            conditions::set(
                &mut status.conditions,
                PROGRESSING,
                false,
                "Stable",
                "nothing to change",
                generation,
                &now,
            );
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                false,
                "Healthy",
                "all brokers follow the master",
                generation,
                &now,
            );
            lock(&ctx.last_wait).remove(&key);
            Duration::from_secs(30)
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
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                false,
                "Healthy",
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
        Outcome::Redirected(brokers) => {
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
            Duration::from_secs(1)
        }
    };
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
    patch_status(&api, &names.group, &status).await?;
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

/// Runs the BrokerGroup and Topic controllers until a shutdown signal.
pub async fn run(client: Client, namespace: Option<String>, ctx: Arc<Context>) -> Result<()> {
    let (groups, topics, sts, svc, cm, pdb, pods) = match &namespace {
        Some(ns) => (
            Api::<BrokerGroup>::namespaced(client.clone(), ns),
            Api::<Topic>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
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
    let group_controller = Controller::new(groups, watcher::Config::default().any_semantic())
        .owns(sts, owned())
        .owns(svc, owned())
        .owns(cm, owned())
        .owns(pdb, owned())
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
    let topic_controller = Controller::new(topics, watcher::Config::default().any_semantic())
        .shutdown_on_signal()
        .run(crate::topic::reconcile, crate::topic::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        });
    futures::join!(group_controller, topic_controller);
    Ok(())
}
