//! What the operator makes of a broker's readiness, now that a slave
//! following a master reports ready (`/readyz`, its pod's Ready) only while
//! it is connected and in sync: a slave unready because its master died is
//! still promoted, one cut off from a live master is still judged broken
//! replication, and a master whose pod is being deleted (a drain) hands its
//! role over to an in-sync slave before it stops.

use k8s_openapi::api::core::v1::Pod;
use keelmq_proto::admin as pb;
use serde_json::{Value, json};

use super::{
    NS, condition, degraded_because, fail_over_pay, group, harness, healthy_group, label,
    master_gone, past_the_grace, pod, position, run, stored_group, timeline, warnings,
};
use crate::failover::serving;
use crate::testing::FakeApi;

/// Changes the stored pod `name` (keeping what the operator wrote on it).
fn edit_pod(api: &FakeApi, name: &str, f: impl FnOnce(&mut Value)) {
    let mut p = api.get("", "pods", NS, name).expect("pod");
    f(&mut p);
    api.insert(p);
}

/// Sets the stored pod's Ready condition, as the kubelet does from `/readyz`.
fn set_pod_ready(api: &FakeApi, name: &str, ready: bool) {
    edit_pod(api, name, |p| {
        p["status"]["conditions"] =
            json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
    });
}

/// Marks the stored pod as being deleted (a drain's eviction, `kubectl
/// delete pod`): the kubelet runs its preStop hook and the broker still
/// answers meanwhile.
fn delete_pod_gracefully(api: &FakeApi, name: &str) {
    edit_pod(api, name, |p| {
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    });
}

fn pod_object(ready: Option<&str>, deleting: bool) -> Pod {
    let mut p = json!({"metadata": {"name": "g-1"}});
    if let Some(r) = ready {
        p["status"] = json!({"conditions": [{"type": "Ready", "status": r}]});
    }
    if deleting {
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    serde_json::from_value(p).expect("pod")
}

fn answer(role: pb::Role, master_address: &str) -> pb::StatusResponse {
    pb::StatusResponse {
        role: role as i32,
        master_address: master_address.into(),
        ..Default::default()
    }
}

/// A pod that is Ready serves; otherwise only a slave following a master
/// that answered, on a pod neither being deleted nor on a lost node (its
/// `/readyz` says no only because it is not connected or not in sync).
#[test]
fn a_following_slave_serves_by_its_answer_whatever_its_pods_readiness() {
    let following = answer(pb::Role::Slave, "repl-g-0");
    let standby = answer(pb::Role::Slave, "");
    let master = answer(pb::Role::Master, "");
    let unready = pod_object(Some("False"), false);
    assert!(serving(&pod_object(Some("True"), false), None));
    assert!(serving(&unready, Some(&following)));
    assert!(serving(&pod_object(None, false), Some(&following)));
    assert!(!serving(&unready, None), "it did not answer");
    assert!(
        !serving(&unready, Some(&standby)),
        "a standby's readiness is its own"
    );
    assert!(
        !serving(&unready, Some(&master)),
        "a master's readiness is its own"
    );
    assert!(
        !serving(&pod_object(Some("False"), true), Some(&following)),
        "its pod is being deleted"
    );
    assert!(
        !serving(&pod_object(Some("Unknown"), false), Some(&following)),
        "its node stopped reporting"
    );
}

/// The slaves' pods are unready only because their master died: they are
/// still the candidates, and the safe promotion rule counts them; `pay-1`
/// is promoted after `pay-2` is fenced.
#[tokio::test]
async fn slaves_unready_because_their_master_died_are_still_promoted() {
    let (api, st) = fail_over_pay(false).await;
    assert_eq!(
        st.last_failover.map(|f| f.possible_loss),
        Some("no acknowledged message is lost".to_string())
    );
    assert_eq!(label(&api, "pay-1").as_deref(), Some("master"));
}

/// A following slave whose pod is being deleted does not serve: with the
/// master gone too, `pay-2` alone is not enough to know that nothing
/// acknowledged is lost (two of two slaves needed), so the group waits.
#[tokio::test]
async fn a_following_slave_being_deleted_is_not_a_candidate() {
    let (ctx, api, brokers) = master_gone(json!({}), false);
    delete_pod_gracefully(&api, "pay-1");
    run(&api, &ctx, "pay").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(!t.iter().any(|e| e.starts_with("promote")), "{t:?}");
    let message = degraded_because(&stored_group(&api, "pay"), "FailoverBlocked");
    assert!(
        message.contains("1 of 2 slaves are reachable and ready"),
        "{message}"
    );
}

/// Under ASYNC a slave whose stream from the (live) master is cut reports
/// unready, as its `/readyz` does: it still counts as a broker that serves
/// (readyReplicas, the group stays Ready), and once its grace has passed
/// the group is Degraded naming it, as before.
#[tokio::test]
async fn a_slave_cut_off_from_a_live_master_is_still_judged_broken() {
    let (ctx, api, brokers) = harness("orders", 2);
    api.insert(
        serde_json::to_value(group("orders", json!({"replication": {"mode": "Async"}})))
            .expect("json"),
    );
    api.insert(pod("orders", 0, true));
    api.insert(pod("orders", 1, true));
    brokers.add("admin-orders-0", "orders-0", 50);
    brokers.add("admin-orders-1", "orders-1", 100);
    run(&api, &ctx, "orders").await.expect("bootstrap");
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert_eq!(condition(&stored_group(&api, "orders"), "Ready").0, "True");

    brokers.set_disconnected("orders-0", true);
    set_pod_ready(&api, "orders-0", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    past_the_grace().await;
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let message = degraded_because(&bg, "ReplicationBroken");
    assert!(
        message.starts_with("orders-0 has not been connected to master orders-1"),
        "{message}"
    );
    assert_eq!(condition(&bg, "Ready").0, "True", "ASYNC sends go on");
    assert_eq!(bg.status.map(|s| s.ready_replicas), Some(2));
}

/// The master's pod is being deleted (a drain evicts it) while it still
/// serves, held by its preStop hook: the operator hands the master role to
/// the in-sync slave holding the most, recorded in status first (a planned
/// switchover, nothing lost), and the labels move; no failover follows.
#[tokio::test]
async fn a_master_whose_pod_is_being_deleted_hands_over_to_an_in_sync_slave() {
    let (ctx, api, brokers) = healthy_group().await;
    delete_pod_gracefully(&api, "orders-0");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    let record = position(&t, "update brokergroups/status orders");
    let hand = position(&t, "switchover admin-orders-0 -> admin-orders-1 epoch 2");
    assert!(record < hand, "{t:?}");
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-1"), 2));
    let last = st.last_failover.expect("recorded");
    assert_eq!(
        last.reason,
        "planned switchover: master orders-0's pod is being deleted (node drain, eviction or delete)"
    );
    assert_eq!(last.possible_loss, "no acknowledged message is lost");
    assert_eq!(label(&api, "orders-1").as_deref(), Some("master"));
    assert_eq!(label(&api, "orders-0").as_deref(), Some("slave"));
    assert_eq!(condition(&bg, "Progressing").1, "MasterChanged");

    // The old master, a slave now, stops; nothing else is done meanwhile.
    brokers.timeline.lock().expect("timeline").clear();
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(
        !t.iter()
            .any(|e| e.starts_with("switchover") || e.starts_with("promote")),
        "{t:?}"
    );
}

/// A terminating master hands over only to a slave that can take over:
/// connected and in sync, and not on its way out itself. With none, nothing
/// is done (no refusal event either): it fails over once it stops. Once one
/// is in sync, it gets the role.
#[tokio::test]
async fn a_terminating_master_hands_over_only_to_a_slave_that_stays_in_sync() {
    let (ctx, api, brokers) = healthy_group().await;
    brokers.set_lagging("orders-1", true);
    delete_pod_gracefully(&api, "orders-2");
    delete_pod_gracefully(&api, "orders-0");
    run(&api, &ctx, "orders").await.expect("reconcile");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(!t.iter().any(|e| e.starts_with("switchover")), "{t:?}");
    let st = stored_group(&api, "orders").status.expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-0"), 1));
    assert_eq!(warnings(&api, "SwitchoverRefused"), 0);

    brokers.set_lagging("orders-1", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(
        t.contains(&"switchover admin-orders-0 -> admin-orders-1 epoch 2".to_string()),
        "{t:?}"
    );
}

/// The hand-over points the other slaves at the new master in the same
/// reconcile: their streams broke as the old master stepped down, and the
/// old master, for now the new master's only slave, stops as soon as its
/// preStop hook returns, so under SYNC the new master would otherwise have
/// no slave in sync to acknowledge sends until a later reconcile.
#[tokio::test]
async fn a_hand_over_points_the_other_slaves_at_the_new_master() {
    let (ctx, api, brokers) = healthy_group().await;
    delete_pod_gracefully(&api, "orders-0");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    let hand = position(&t, "switchover admin-orders-0 -> admin-orders-1 epoch 2");
    let follow = position(&t, "follow admin-orders-2 -> repl-orders-1 epoch 2");
    assert!(hand < follow, "{t:?}");
    assert!(
        !t.iter().any(|e| e.starts_with("follow admin-orders-0")),
        "the old master follows the new one by itself: {t:?}"
    );
}

/// A master drained while a scale-down is held (the spec asks for two
/// brokers, the StatefulSet still has three) hands over to a slave that
/// stays, even one holding less than the slave on the ordinal being
/// removed: that one would have to hand the role on again at once.
#[tokio::test]
async fn a_terminating_master_hands_over_to_a_slave_that_the_scale_down_keeps() {
    let (ctx, api, brokers) = healthy_group().await;
    brokers.with("admin-orders-2", |b| b.status.max_offset = 250);
    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    bg["spec"]["replicas"] = json!(2);
    bg["metadata"]["generation"] = json!(2);
    api.insert(bg);
    delete_pod_gracefully(&api, "orders-0");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(
        t.contains(&"switchover admin-orders-0 -> admin-orders-1 epoch 2".to_string()),
        "{t:?}"
    );
}
