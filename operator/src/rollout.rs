//! Rolling changes and scale-down, one safe step per reconcile.
//!
//! The StatefulSet uses `OnDelete`, so a new pod template (image, resources,
//! broker configuration, the `keelmq.io/restart` annotation) reaches a broker
//! only when its pod is deleted. The operator deletes them itself, in the one
//! order that keeps the group writable and loses nothing: the slaves one at a
//! time, each only once every broker is ready and every slave is in sync with
//! the master; then a planned switchover hands the master role to an updated,
//! in-sync slave; then the old master, now a slave, is restarted and follows.
//! Nothing is deleted while the group is degraded: a slave out of sync, a pod
//! missing or unready, a failover in progress (the caller only calls in when
//! the failover decision is `Healthy`), or reconciliation paused.
//!
//! A scale-down removes the highest ordinals; when the master is on one of
//! them, the StatefulSet keeps it (see `model::stateful_set_replicas`) until
//! the master role has been handed to a slave that stays.
//!
//! [`plan`] is the pure decision over [`Member`]s; [`advance`] observes,
//! asks it, and carries the step out, recording progress in the BrokerGroup
//! status (`status.rollout`) so that a restarted operator resumes the roll.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keelmq_crds::{
    ANNOTATION_RESTART, BrokerGroup, BrokerGroupStatus, PendingRestart, RolloutStatus,
};
use keelmq_failover::Role;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::events::EventType;
use tracing::info;

use crate::conditions::{self, PROGRESSING};
use crate::controller::Context;
use crate::failover::{self, Observed, Outcome};
use crate::model::{self, ANNOTATION_TEMPLATE_HASH, GroupNames, LABEL_REVISION};
use crate::{Error, Result};

/// Progressing reason while the roll or the scale-down acts.
pub const REASON_ROLLING: &str = "RollingUpdate";
/// Progressing reason while the roll or the scale-down waits for the group.
pub const REASON_WAITING: &str = "WaitingForSync";
/// Progressing reason while the master is moved off a removed ordinal.
pub const REASON_SCALE_DOWN: &str = "ScaleDown";
/// `status.rollout.reason`: the pod template changed.
pub const TEMPLATE_CHANGED: &str = "TemplateChanged";
/// `status.rollout.reason`: the restart annotation asked for it.
pub const RESTART_REQUESTED: &str = "RestartRequested";

/// One member of the group as the roll sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    /// Pod name.
    pub name: String,
    /// Its ordinal in the StatefulSet.
    pub ordinal: Option<i32>,
    /// Uid of its pod; `None` when there is no pod.
    pub uid: Option<String>,
    /// Its pod is being deleted.
    pub terminating: bool,
    /// It serves ([`failover::serving`]): its pod is Ready, or it follows a
    /// master and answers. Whether a slave is connected and in sync is
    /// `follows` and `in_sync`, from the master's view.
    pub ready: bool,
    /// Its admin API answered.
    pub reachable: bool,
    /// It is the recorded master.
    pub master: bool,
    /// It reports following the master (always true for the master).
    pub follows: bool,
    /// The master counts it in sync (always true for the master).
    pub in_sync: bool,
    /// Its pod was made from an older template than the StatefulSet's.
    pub outdated: bool,
}

/// The next step of a roll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Every pod that stays runs the current template.
    Idle,
    /// Pods are outdated but the group is not healthy enough to restart one.
    Wait(String),
    /// Delete this pod; the StatefulSet recreates it from the new template.
    Restart {
        /// The pod.
        pod: String,
        /// Its uid (the delete is made conditional on it).
        uid: String,
        /// It is the master of a one-broker group: there is nobody to hand
        /// over to, so the group is down until it returns.
        only_broker: bool,
    },
    /// Hand the master role to an updated, in-sync slave.
    Switchover {
        /// The outdated master.
        from: String,
        /// The slave that takes over.
        to: String,
    },
}

/// The first reason the group is not healthy enough to lose a broker, if any.
fn unhealthy(staying: &[&Member]) -> Option<String> {
    let master = staying.iter().find(|m| m.master).map(|m| m.name.as_str());
    let Some(master) = master else {
        return Some("the master is not among the brokers that stay".into());
    };
    for m in staying {
        let n = &m.name;
        let problem = if m.uid.is_none() {
            format!("{n} has no pod yet")
        } else if m.terminating {
            format!("{n} is terminating")
        } else if !m.ready {
            format!("{n} is not ready")
        } else if !m.reachable {
            format!("{n}'s admin API does not answer")
        } else if !m.master && !m.follows {
            format!("{n} does not follow master {master} yet")
        } else if !m.master && !m.in_sync {
            format!("{n} is not in sync with master {master}")
        } else {
            continue;
        };
        return Some(problem);
    }
    None
}

/// Why the StatefulSet may not shrink to `replicas` yet, if it may not: a
/// broker that stays is missing, unready, not following the master or not in
/// sync with it (the brokers a scale-down removes may hold the only copies
/// of acknowledged records besides the master's), or the master is among the
/// brokers that go (it hands over first, see [`scale_down_target`]).
pub fn scale_down_blocked(members: &[Member], replicas: i32) -> Option<String> {
    unhealthy(&staying(members, replicas))
}

/// The members that stay at `replicas` (ordinal below it), by name.
fn staying(members: &[Member], replicas: i32) -> Vec<&Member> {
    let mut v: Vec<&Member> = members
        .iter()
        .filter(|m| m.ordinal.is_some_and(|o| o < replicas.max(1)))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Decides the next step of a roll over the members that stay at
/// `replicas`. `pending` names a pod restarted earlier and not yet seen back
/// healthy: while it is, the roll is not finished. Pure.
pub fn plan(members: &[Member], replicas: i32, pending: Option<&str>) -> Step {
    let staying = staying(members, replicas);
    let problem = unhealthy(&staying);
    let outdated: Vec<&&Member> = staying.iter().filter(|m| m.outdated).collect();
    if outdated.is_empty() {
        return match (pending, problem) {
            (Some(_), Some(p)) => Step::Wait(p),
            _ => Step::Idle,
        };
    }
    if let Some(p) = problem {
        return Step::Wait(p);
    }
    // Slaves first, highest ordinal first (the StatefulSet's own order).
    if let Some(slave) = outdated
        .iter()
        .filter(|m| !m.master)
        .max_by_key(|m| m.ordinal)
    {
        return Step::Restart {
            pod: slave.name.clone(),
            uid: slave.uid.clone().unwrap_or_default(),
            only_broker: false,
        };
    }
    // Only the master is left on the old template.
    let Some(master) = staying.iter().find(|m| m.master) else {
        return Step::Wait("the group has no master".into());
    };
    if staying.len() == 1 {
        return Step::Restart {
            pod: master.name.clone(),
            uid: master.uid.clone().unwrap_or_default(),
            only_broker: true,
        };
    }
    match staying
        .iter()
        .filter(|m| !m.master && !m.outdated)
        .min_by_key(|m| m.ordinal)
    {
        Some(to) => Step::Switchover {
            from: master.name.clone(),
            to: to.name.clone(),
        },
        None => Step::Wait(format!(
            "no updated, in-sync slave can take over from master {}",
            master.name
        )),
    }
}

/// Whether the master must move before the StatefulSet may shrink to
/// `replicas`, and to whom: `None` when it need not move, `Some(Ok(slave))`
/// to hand over to, `Some(Err(why))` when no slave that stays can take over.
pub fn scale_down_target(members: &[Member], replicas: i32) -> Option<Result<String, String>> {
    let master = members.iter().find(|m| m.master)?;
    let o = master.ordinal?;
    if o < replicas.max(1) {
        return None;
    }
    let staying = staying(members, replicas);
    Some(
        staying
            .iter()
            .filter(|m| {
                !m.master
                    && m.uid.is_some()
                    && !m.terminating
                    && m.ready
                    && m.reachable
                    && m.follows
                    && m.in_sync
            })
            .min_by_key(|m| m.ordinal)
            .map(|m| m.name.clone())
            .ok_or_else(|| {
                format!(
                    "master {} is on ordinal {o}, which scaling to {} removes, and no slave that stays is ready and in sync to take over",
                    master.name,
                    replicas.max(1)
                )
            }),
    )
}

/// The StatefulSet's update revision, once its controller has seen the
/// current template (otherwise pods cannot be judged by it yet).
fn update_revision(sts: &StatefulSet) -> Option<&str> {
    let st = sts.status.as_ref()?;
    let seen = st.observed_generation? >= sts.metadata.generation?;
    seen.then_some(st.update_revision.as_deref()).flatten()
}

/// Whether a pod was made from an older template than `sts` holds: its
/// template hash differs, or (once the StatefulSet controller has caught up)
/// its revision label differs from the update revision.
pub fn outdated(pod: &Pod, sts: &StatefulSet) -> bool {
    let by_hash = match (
        pod.annotations().get(ANNOTATION_TEMPLATE_HASH),
        model::template_hash(sts),
    ) {
        (Some(have), Some(want)) => have != want,
        _ => false,
    };
    let by_revision = match (pod.labels().get(LABEL_REVISION), update_revision(sts)) {
        (Some(have), Some(want)) => have != want,
        _ => false,
    };
    by_hash || by_revision
}

fn restart_value(sts: &StatefulSet) -> Option<&str> {
    crate::model::template_annotation(sts, ANNOTATION_RESTART)
}

/// The group's members as the roll sees them.
pub fn members(
    names: &GroupNames,
    observed: &Observed,
    status: &BrokerGroupStatus,
    sts: &StatefulSet,
) -> Vec<Member> {
    let master = status.master.as_deref();
    let replicas = failover::replica_statuses(observed, master, &status.replicas);
    observed
        .observation
        .brokers
        .iter()
        .map(|b| {
            let pod = observed.pods.get(&b.name);
            let is_master = Some(b.name.as_str()) == master;
            let in_sync = replicas.iter().any(|r| r.name == b.name && r.in_sync);
            let follows = b.status.as_ref().is_some_and(|s| {
                if is_master {
                    s.role == Role::Master
                } else {
                    s.role == Role::Slave && s.master.as_deref() == master
                }
            });
            Member {
                name: b.name.clone(),
                ordinal: names.ordinal(&b.name),
                uid: pod.and_then(|p| p.metadata.uid.clone()),
                terminating: pod.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
                ready: b.ready,
                reachable: b.reachable,
                master: is_master,
                follows,
                in_sync: is_master || in_sync,
                outdated: pod.is_some_and(|p| outdated(p, sts)),
            }
        })
        .collect()
}

/// What the roll or scale-down did or waits for, for the Progressing condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Condition reason: [`REASON_ROLLING`], [`REASON_WAITING`] or [`REASON_SCALE_DOWN`].
    pub reason: &'static str,
    /// In words.
    pub message: String,
    /// A ready pod this step deleted (it no longer counts as ready).
    pub deleted: Option<String>,
}

/// Takes the next step of a scale-down or roll, if any. Call only when the
/// failover decision is `Healthy` and nothing else changed the master in this
/// reconcile. Returns what to report and, when the master was handed over,
/// the outcome.
pub async fn advance(
    ctx: &Context,
    bg: &mut BrokerGroup,
    names: &GroupNames,
    observed: &Observed,
    sts: &StatefulSet,
    status: &mut BrokerGroupStatus,
) -> Result<(Option<Report>, Option<Outcome>)> {
    let Some(master) = status.master.clone() else {
        return Ok((None, None));
    };
    let members = members(names, observed, status, sts);
    let replicas = bg.spec.replicas.max(1);

    // A scale-down that would remove the master: hand over first.
    match scale_down_target(&members, replicas) {
        None => {}
        Some(Err(why)) => {
            let message = format!("scale-down held: {why}");
            if conditions::message(&status.conditions, PROGRESSING) != Some(message.as_str()) {
                info!("{message}; the StatefulSet keeps the master's pod until it can hand over");
            }
            return Ok((
                Some(Report {
                    reason: REASON_WAITING,
                    message,
                    deleted: None,
                }),
                None,
            ));
        }
        Some(Ok(target)) => {
            let reason = format!(
                "planned switchover before scaling down to {replicas}: master {master} is on an ordinal the StatefulSet removes"
            );
            let outcome =
                failover::hand_over(ctx, bg, names, observed, &target, &reason, status).await?;
            let message = match &outcome {
                Some(_) => format!(
                    "handed the master role from {master} to {target}; the StatefulSet shrinks to {replicas} next"
                ),
                None => format!("scale-down held: {target} could not take over from {master}"),
            };
            return Ok((
                Some(Report {
                    reason: REASON_SCALE_DOWN,
                    message,
                    deleted: None,
                }),
                outcome,
            ));
        }
    }

    let Some(hash) = model::template_hash(sts).map(str::to_string) else {
        return Ok((None, None));
    };
    let now = Time(jiff::Timestamp::now());
    let total = members
        .iter()
        .filter(|m| m.ordinal.is_some_and(|o| o < replicas))
        .count();

    // A pod restarted earlier: back, or never deleted?
    if let Some(r) = status.rollout.as_mut()
        && let Some(p) = r.pending.clone()
    {
        let m = members.iter().find(|m| m.name == p.pod);
        let uid = m.and_then(|m| m.uid.as_deref());
        if uid == Some(p.uid.as_str()) && m.is_some_and(|m| !m.terminating) {
            info!(pod = %p.pod, "{} still has the pod that was to be deleted; judging it again", p.pod);
            r.pending = None;
        } else if let Some(m) = m
            && uid.is_some()
            && m.ready
            && m.reachable
            && m.follows
            && m.in_sync
        {
            r.pending = None;
            if !r.restarted.contains(&p.pod) {
                r.restarted.push(p.pod.clone());
            }
            let role = if m.master { "master" } else { "slave" };
            let note = format!(
                "{} is back on the new pod template: ready, {role}{} ({} of {total} brokers restarted)",
                p.pod,
                if m.master {
                    String::new()
                } else {
                    format!(", following {master} and in sync")
                },
                r.restarted.len()
            );
            info!(pod = %p.pod, "rolling update: {note}");
            failover::publish(
                ctx,
                bg,
                EventType::Normal,
                "BrokerRestarted",
                "RollingUpdate",
                note,
            )
            .await;
        }
    }

    let pending = status
        .rollout
        .as_ref()
        .and_then(|r| r.pending.as_ref())
        .map(|p| p.pod.clone());
    let step = plan(&members, replicas, pending.as_deref());
    if step == Step::Idle {
        if let Some(done) = status.rollout.take() {
            let note = format!(
                "every broker runs the current pod template (restarted: {})",
                if done.restarted.is_empty() {
                    "none".to_string()
                } else {
                    done.restarted.join(", ")
                }
            );
            info!("rolling update finished: {note}");
            failover::publish(
                ctx,
                bg,
                EventType::Normal,
                "RollingUpdateFinished",
                "RollingUpdate",
                note,
            )
            .await;
        }
        return Ok((None, None));
    }

    // A roll is due or under way: record it (again, if the template moved on).
    let stale: Vec<&str> = members
        .iter()
        .filter(|m| m.outdated && m.ordinal.is_some_and(|o| o < replicas))
        .map(|m| m.name.as_str())
        .collect();
    let reason = if stale.iter().any(|p| {
        observed
            .pods
            .get(*p)
            .and_then(|pod| pod.annotations().get(ANNOTATION_RESTART))
            .map(String::as_str)
            != restart_value(sts)
    }) {
        RESTART_REQUESTED
    } else {
        TEMPLATE_CHANGED
    };
    match status.rollout.as_mut() {
        Some(r) if r.template_hash == hash => {}
        Some(r) => {
            info!(
                "rolling update: the pod template changed again during the roll; carrying on with the new one ({} restarted so far will be restarted again)",
                r.restarted.len()
            );
            r.template_hash = hash.clone();
            r.reason = reason.to_string();
            r.restarted.clear();
        }
        None => {
            let why = if reason == RESTART_REQUESTED {
                format!("the {ANNOTATION_RESTART} annotation changed")
            } else {
                "the pod template changed (image, resources, configuration or pod settings)"
                    .to_string()
            };
            let note = format!(
                "{} of {total} brokers run an older pod template: {why}; restarting the slaves one at a time, then handing the master role to an updated slave, then restarting {master}",
                stale.len()
            );
            info!("rolling update started: {note}");
            failover::publish(
                ctx,
                bg,
                EventType::Normal,
                "RollingUpdateStarted",
                "RollingUpdate",
                note,
            )
            .await;
            status.rollout = Some(RolloutStatus {
                template_hash: hash.clone(),
                reason: reason.to_string(),
                started: now,
                restarted: Vec::new(),
                pending: None,
                message: String::new(),
            });
        }
    }

    let (report, outcome) = match step {
        Step::Idle => return Ok((None, None)),
        Step::Wait(why) => {
            let message =
                format!("{why}; no broker is restarted until every broker is ready and in sync");
            if conditions::message(&status.conditions, PROGRESSING) != Some(message.as_str()) {
                info!("rolling update waits: {message}");
            }
            (
                Report {
                    reason: REASON_WAITING,
                    message,
                    deleted: None,
                },
                None,
            )
        }
        Step::Restart {
            pod,
            uid,
            only_broker,
        } => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            pods.delete(&pod, &dp).await.map_err(Error::Kube)?;
            let left = stale.len().saturating_sub(1);
            let note = if only_broker {
                format!(
                    "restarting {pod}, the group's only broker, onto the new pod template: there is no slave to hand over to, so clients wait until it is back"
                )
            } else {
                format!(
                    "restarting slave {pod} onto the new pod template (its pod is deleted and the StatefulSet recreates it); master {master} keeps serving; {left} more to restart after it"
                )
            };
            info!(pod = %pod, "rolling update: {note}");
            failover::publish(
                ctx,
                bg,
                EventType::Normal,
                "RestartingBroker",
                "RollingUpdate",
                note.clone(),
            )
            .await;
            if let Some(r) = status.rollout.as_mut() {
                r.pending = Some(PendingRestart {
                    pod: pod.clone(),
                    uid,
                });
            }
            (
                Report {
                    reason: REASON_ROLLING,
                    message: format!(
                        "restarted {pod}; waiting for it to come back ready and in sync"
                    ),
                    deleted: Some(pod.clone()),
                },
                None,
            )
        }
        Step::Switchover { from, to } => {
            let reason = format!(
                "rolling update: master {from} runs an older pod template and is restarted last, after handing over to {to}, which is updated and in sync"
            );
            let outcome =
                failover::hand_over(ctx, bg, names, observed, &to, &reason, status).await?;
            let message = match &outcome {
                Some(_) => {
                    format!("handed the master role from {from} to {to}; {from} is restarted next")
                }
                None => format!("{to} could not take over from {from}; trying again"),
            };
            (
                Report {
                    reason: REASON_ROLLING,
                    message,
                    deleted: None,
                },
                outcome,
            )
        }
    };
    if let Some(r) = status.rollout.as_mut() {
        r.message = report.message.clone();
    }
    Ok((Some(report), outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three healthy members, `orders-0` master; `outdated` lists ordinals
    /// on an older template.
    fn group(outdated: &[i32]) -> Vec<Member> {
        (0..3)
            .map(|i| Member {
                name: format!("orders-{i}"),
                ordinal: Some(i),
                uid: Some(format!("u{i}")),
                terminating: false,
                ready: true,
                reachable: true,
                master: i == 0,
                follows: true,
                in_sync: true,
                outdated: outdated.contains(&i),
            })
            .collect()
    }

    fn restart(pod: &str, uid: &str) -> Step {
        Step::Restart {
            pod: pod.into(),
            uid: uid.into(),
            only_broker: false,
        }
    }

    #[test]
    fn slaves_go_first_highest_ordinal_first_then_the_master_hands_over() {
        assert_eq!(plan(&group(&[]), 3, None), Step::Idle);
        assert_eq!(plan(&group(&[0, 1, 2]), 3, None), restart("orders-2", "u2"));
        assert_eq!(plan(&group(&[0, 1]), 3, None), restart("orders-1", "u1"));
        assert_eq!(
            plan(&group(&[0]), 3, None),
            Step::Switchover {
                from: "orders-0".into(),
                to: "orders-1".into()
            }
        );
    }

    #[test]
    fn nothing_is_restarted_while_any_broker_is_away_or_behind() {
        type Breaks = fn(&mut Member);
        let cases: [(&str, Breaks); 6] = [
            ("orders-1 has no pod yet", |m| m.uid = None),
            ("orders-1 is terminating", |m| m.terminating = true),
            ("orders-1 is not ready", |m| m.ready = false),
            ("orders-1's admin API does not answer", |m| {
                m.reachable = false
            }),
            ("orders-1 does not follow master orders-0 yet", |m| {
                m.follows = false
            }),
            ("orders-1 is not in sync with master orders-0", |m| {
                m.in_sync = false
            }),
        ];
        for (why, break_it) in cases {
            let mut g = group(&[0, 1, 2]);
            break_it(&mut g[1]);
            assert_eq!(plan(&g, 3, None), Step::Wait(why.into()));
        }
    }

    #[test]
    fn a_roll_ends_only_once_the_last_restarted_pod_is_back() {
        let mut g = group(&[]);
        g[0].ready = false;
        assert_eq!(
            plan(&g, 3, Some("orders-0")),
            Step::Wait("orders-0 is not ready".into())
        );
        assert_eq!(plan(&g, 3, None), Step::Idle);
    }

    #[test]
    fn a_single_broker_is_restarted_in_place() {
        let g: Vec<Member> = group(&[0]).into_iter().take(1).collect();
        assert_eq!(
            plan(&g, 1, None),
            Step::Restart {
                pod: "orders-0".into(),
                uid: "u0".into(),
                only_broker: true
            }
        );
    }

    #[test]
    fn pods_a_scale_down_removes_are_not_rolled() {
        // Scaling 3 -> 2: orders-2 goes away, so it is not restarted.
        assert_eq!(plan(&group(&[2]), 2, None), Step::Idle);
    }

    #[test]
    fn scale_down_moves_the_master_only_when_its_ordinal_goes() {
        let mut g = group(&[]);
        assert_eq!(scale_down_target(&g, 2), None);
        g[0].master = false;
        g[2].master = true;
        assert_eq!(scale_down_target(&g, 2), Some(Ok("orders-0".into())));
        assert_eq!(
            scale_down_target(&g, 0),
            Some(Ok("orders-0".into())),
            "never below one"
        );
        g[0].in_sync = false;
        assert_eq!(scale_down_target(&g, 2), Some(Ok("orders-1".into())));
        g[1].in_sync = false;
        assert!(matches!(scale_down_target(&g, 2), Some(Err(_))));
    }
}
