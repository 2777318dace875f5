//! Reconciles through the mock API server and fake brokers. Each scenario
//! is a function so the RBAC test can replay them all and compare the
//! requests they make with the permission table.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keelmq_crds::{BrokerGroup, Topic};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{
    NS, condition, degraded_because, fail_over_pay, group, harness, label, master_gone,
    past_the_grace, pod, position, run, stored_group, timeline, warnings,
};
use crate::Error;
use crate::controller::{Context, error_policy};
use crate::testing::{FakeApi, FakeBrokers};

/// The status the operator wrote conforms to the generated CRD schema.
fn assert_valid_against_crd(api: &FakeApi, name: &str) {
    let crd = serde_json::to_value(<BrokerGroup as kube::CustomResourceExt>::crd()).expect("crd");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut obj = api
        .get("keelmq.io", "brokergroups", NS, name)
        .expect("stored");
    obj["metadata"] = json!({"name": name});
    let errors = keelmq_crds::schema_check::validate(schema, &obj);
    assert!(errors.is_empty(), "{errors:?}");
}

/// A new group with no pods yet: every object applied, status says why it waits.
pub(super) async fn creation() -> FakeApi {
    let (ctx, api, _) = harness("orders", 2);
    api.insert(serde_json::to_value(group("orders", json!({}))).expect("json"));
    let action = run(&api, &ctx, "orders").await.expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    for (g, res, name) in [
        ("", "configmaps", "orders-config"),
        ("", "services", "orders"),
        ("", "services", "orders-headless"),
        ("", "services", "orders-read"),
        ("apps", "statefulsets", "orders"),
        ("policy", "poddisruptionbudgets", "orders"),
        ("networking.k8s.io", "networkpolicies", "orders"),
    ] {
        let obj = api
            .get(g, res, NS, name)
            .unwrap_or_else(|| panic!("{res}/{name} applied"));
        assert_eq!(obj["metadata"]["ownerReferences"][0]["name"], "orders");
    }
    // No image in the spec: the broker release matching this operator,
    // resolved now (nothing was stored in the BrokerGroup).
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        keelmq_crds::default_image()
    );
    assert!(
        api.get("keelmq.io", "brokergroups", NS, "orders")
            .expect("stored")["spec"]
            .get("image")
            .is_none()
    );
    let applies: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.content_type.contains("apply-patch"))
        .collect();
    assert_eq!(applies.len(), 7);
    assert!(applies.iter().all(
        |r| r.query.contains("fieldManager=keelmq-operator") && r.query.contains("force=true")
    ));
    let bg = stored_group(&api, "orders");
    assert_eq!(
        bg.status.as_ref().and_then(|s| s.observed_generation),
        Some(1)
    );
    let (status, reason, message) = condition(&bg, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "WaitingForBrokers")
    );
    assert!(
        message.contains("0 of 2 brokers are reachable and ready"),
        "{message}"
    );
    assert_eq!(condition(&bg, "ReconciliationPaused").0, "False");
    assert_valid_against_crd(&api, "orders");
    api
}

/// Brokers up in standby: the one holding most becomes the first master,
/// recorded in status before it is promoted.
pub(super) async fn bootstrap() -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (ctx, api, brokers) = harness("orders", 2);
    api.insert(serde_json::to_value(group("orders", json!({}))).expect("json"));
    api.insert(pod("orders", 0, true));
    api.insert(pod("orders", 1, true));
    brokers.add("admin-orders-0", "orders-0", 50);
    brokers.add("admin-orders-1", "orders-1", 100);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let status = bg.status.clone().expect("status");
    assert_eq!(status.master.as_deref(), Some("orders-1"));
    assert_eq!(status.epoch, 1);
    assert_eq!(status.master_store_id.as_deref(), Some("store-orders-1"));
    let t = timeline(&brokers);
    let record = t
        .iter()
        .position(|e| e == "update brokergroups/status orders")
        .expect("status recorded");
    let promote = t
        .iter()
        .position(|e| e == "promote admin-orders-1 epoch 1")
        .expect("promoted");
    let follow = t
        .iter()
        .position(|e| e == "follow admin-orders-0 -> repl-orders-1 epoch 1")
        .expect("followed");
    assert!(record < promote && promote < follow, "{t:?}");
    assert_eq!(label(&api, "orders-1").as_deref(), Some("master"));
    assert_eq!(label(&api, "orders-0").as_deref(), Some("slave"));
    assert!(
        t.iter().any(|e| e.starts_with("create events")),
        "an Event was published: {t:?}"
    );

    // Next round: healthy and ready.
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let (status, reason, message) = condition(&bg, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Serving"),
        "{message}"
    );
    assert_eq!(message, "master orders-1 serves epoch 1; 2/2 brokers ready");
    let st = bg.status.expect("status");
    assert_eq!(st.ready_replicas, 2);
    let roles: Vec<(&str, &str)> = st
        .replicas
        .iter()
        .map(|r| (r.name.as_str(), r.role.as_str()))
        .collect();
    assert_eq!(roles, [("orders-0", "slave"), ("orders-1", "master")]);
    assert_valid_against_crd(&api, "orders");
    (ctx, api, brokers)
}

/// A slave that stopped following and refuses to follow again replicates
/// nothing: the group is not Ready and says why, until it follows.
#[tokio::test]
async fn a_broker_that_refuses_to_follow_makes_the_group_degraded() {
    let (ctx, api, brokers) = bootstrap().await;
    brokers.with("admin-orders-0", |b| {
        b.status.master_address.clear();
        b.refuse_follow = Some("Internal: saving the fence failed: disk full".into());
    });
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    for (kind, want) in [("Ready", "False"), ("Degraded", "True")] {
        let (status, reason, message) = condition(&bg, kind);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            (want, "FollowRefused"),
            "{kind}"
        );
        assert!(message.contains("orders-0 did not accept"), "{message}");
    }
    brokers.with("admin-orders-0", |b| b.refuse_follow = None);
    run(&api, &ctx, "orders").await.expect("reconcile");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let (status, reason, _) = condition(&stored_group(&api, "orders"), "Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Serving"));
}

/// (status, reason) of a condition.
fn state(bg: &BrokerGroup, type_: &str) -> (String, String) {
    let (status, reason, _) = condition(bg, type_);
    (status, reason)
}

fn is(status: &str, reason: &str) -> (String, String) {
    (status.to_string(), reason.to_string())
}

/// `orders` (two brokers, `spec` as given) bootstrapped with `orders-1` as
/// master and `orders-0` following it, connected and in sync: Ready.
async fn bootstrapped(spec: Value) -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (ctx, api, brokers) = harness("orders", 2);
    api.insert(serde_json::to_value(group("orders", spec)).expect("json"));
    api.insert(pod("orders", 0, true));
    api.insert(pod("orders", 1, true));
    brokers.add("admin-orders-0", "orders-0", 50);
    brokers.add("admin-orders-1", "orders-1", 100);
    run(&api, &ctx, "orders").await.expect("bootstrap");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("True", "Serving"));
    assert_eq!(state(&bg, "Degraded"), is("False", "Healthy"));
    (ctx, api, brokers)
}

/// Under SYNC (the default: one slave must hold a send), the slave still
/// says it follows the master but the master lists no slave (its
/// replication port is blocked): no send can be acknowledged, so the group
/// is not Ready at once; once the slave has had its grace to connect, it is
/// Degraded too, naming the slave; it is Ready again once the slave is back.
#[tokio::test]
async fn sync_group_whose_master_has_no_slave_connected_is_not_ready_and_degraded() {
    let (ctx, api, brokers) = bootstrap().await;
    brokers.list_slaves(false);
    let follows = brokers.with("admin-orders-0", |b| b.status.master_address.clone());
    assert_eq!(
        follows, "repl-orders-1",
        "the slave says it follows the master"
    );

    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let (status, reason, message) = condition(&bg, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NotEnoughInSyncReplicas"),
        "{message}"
    );
    assert!(
        message.contains("0 slave(s) connected to master orders-1 and in sync")
            && message.contains("minInSyncReplicas is 1")
            && message.contains("orders-0 is not connected"),
        "{message}"
    );
    assert_eq!(
        state(&bg, "Degraded"),
        is("False", "Healthy"),
        "not Degraded within the grace"
    );
    assert_eq!(state(&bg, "Progressing"), is("True", "CatchingUp"));

    past_the_grace().await;
    run(&api, &ctx, "orders").await.expect("reconcile");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("False", "NotEnoughInSyncReplicas"));
    let message = degraded_because(&bg, "ReplicationBroken");
    assert!(
        message.starts_with("orders-0 has not been connected to master orders-1")
            && message.contains("SYNC sends fail"),
        "{message}"
    );
    assert_eq!(warnings(&api, "ReplicationBroken"), 1, "one Warning event");

    brokers.list_slaves(true);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("True", "Serving"));
    assert_eq!(state(&bg, "Degraded"), is("False", "Healthy"));
    assert_eq!(state(&bg, "Progressing"), is("False", "Stable"));
}

/// Under ASYNC a send does not wait for a slave, so a slave whose stream is
/// broken (the master lists it as not connected) leaves the group Ready, but
/// Degraded once its grace has passed: its data is not being copied.
#[tokio::test]
async fn async_group_with_a_slave_not_replicating_stays_ready_but_is_degraded() {
    let (ctx, api, brokers) = bootstrapped(json!({"replication": {"mode": "Async"}})).await;
    brokers.set_disconnected("orders-0", true);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("True", "Serving"));
    assert_eq!(state(&bg, "Degraded"), is("False", "Healthy"));
    assert_eq!(state(&bg, "Progressing"), is("True", "CatchingUp"));

    past_the_grace().await;
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("True", "Serving"));
    let message = degraded_because(&bg, "ReplicationBroken");
    assert!(
        message.starts_with("orders-0 has not been connected to master orders-1")
            && message.contains("ASYNC sends are acknowledged without it"),
        "{message}"
    );

    brokers.set_disconnected("orders-0", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("True", "Serving"));
    assert_eq!(state(&bg, "Degraded"), is("False", "Healthy"));
}

/// A slave connected to the master but catching up (after a restart, say)
/// is progress, not a fault: never Degraded, however long it takes. Under
/// SYNC with it the only slave, sends wait for it: not Ready meanwhile.
#[tokio::test]
async fn a_connected_slave_catching_up_is_progressing_not_degraded() {
    let (ctx, api, brokers) = bootstrap().await;
    brokers.set_lagging("orders-0", true);
    run(&api, &ctx, "orders").await.expect("reconcile");
    past_the_grace().await;
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Degraded"), is("False", "Healthy"));
    let (status, reason, message) = condition(&bg, "Progressing");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "CatchingUp"));
    assert!(message.contains("orders-0 is catching up"), "{message}");
    assert_eq!(state(&bg, "Ready"), is("False", "NotEnoughInSyncReplicas"));
    assert_eq!(warnings(&api, "ReplicationBroken"), 0);

    brokers.set_lagging("orders-0", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    assert_eq!(state(&bg, "Ready"), is("True", "Serving"));
    assert_eq!(state(&bg, "Progressing"), is("False", "Stable"));
}

/// The master's pod vanishes: the slave is promoted in a new epoch, status
/// first, then the label moves.
pub(super) async fn failover() -> FakeApi {
    let (ctx, api, brokers) = bootstrap().await;
    brokers.timeline.lock().expect("timeline").clear();
    api.remove("", "pods", NS, "orders-1");
    brokers.with("admin-orders-1", |b| b.up = false);
    brokers.with("admin-orders-0", |b| b.status.epoch = 1);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!(st.master.as_deref(), Some("orders-0"));
    assert_eq!(st.epoch, 2);
    let last = st.last_failover.expect("recorded");
    assert_eq!(
        (last.from.as_deref(), last.to.as_str(), last.epoch),
        (Some("orders-1"), "orders-0", 2)
    );
    assert_eq!(last.reason, "the master's pod or node is gone");
    assert_eq!(last.possible_loss, "no acknowledged message is lost");
    let gone = st
        .replicas
        .iter()
        .find(|r| r.name == "orders-1")
        .expect("listed");
    assert!(!gone.reachable);
    assert_eq!(
        gone.offset, 100,
        "the offset last seen is kept for an unreachable broker"
    );
    let t = timeline(&brokers);
    let record = t
        .iter()
        .position(|e| e == "update brokergroups/status orders")
        .expect("recorded");
    let promote = t
        .iter()
        .position(|e| e == "promote admin-orders-0 epoch 2")
        .expect("promoted");
    let relabel = t
        .iter()
        .position(|e| e == "patch pods orders-0")
        .expect("relabelled");
    assert!(record < promote && promote < relabel, "{t:?}");
    assert_eq!(label(&api, "orders-0").as_deref(), Some("master"));
    let (_, reason, _) = condition(&bg, "Progressing");
    assert_eq!(reason, "MasterChanged");
    assert!(
        ctx.metrics
            .encode()
            .contains("keelmq_operator_failovers_total{namespace=\"ns\",group=\"orders\"} 1")
    );

    // The old master returns (standby, empty epoch history): it is told to follow.
    api.insert(pod("orders", 1, true));
    brokers.with("admin-orders-1", |b| {
        b.up = true;
        b.status.role = keelmq_proto::admin::Role::Slave as i32;
        b.status.master_address.clear();
    });
    brokers.timeline.lock().expect("timeline").clear();
    run(&api, &ctx, "orders").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(
        t.contains(&"follow admin-orders-1 -> repl-orders-0 epoch 2".to_string()),
        "{t:?}"
    );
    assert_eq!(label(&api, "orders-1").as_deref(), Some("slave"));
    assert_valid_against_crd(&api, "orders");
    api
}

/// The switchover annotation hands the master role to an in-sync slave:
/// status first, then the master hands over, labels move, annotation gone.
pub(super) async fn switchover() -> FakeApi {
    let (ctx, api, brokers) = bootstrap().await;
    brokers.with("admin-orders-1", |b| {
        b.status.slaves = vec![keelmq_proto::admin::SlaveStatus {
            broker_id: "orders-0".into(),
            in_sync: true,
            connected: true,
            ..Default::default()
        }];
    });
    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    bg["metadata"]["annotations"] = json!({keelmq_crds::ANNOTATION_SWITCHOVER_TO: "orders-0"});
    api.insert(bg);
    brokers.timeline.lock().expect("timeline").clear();
    run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-0"), 2));
    let last = st.last_failover.expect("recorded");
    assert!(
        last.reason.starts_with("planned switchover"),
        "{}",
        last.reason
    );
    let t = timeline(&brokers);
    let record = t
        .iter()
        .position(|e| e == "update brokergroups/status orders")
        .expect("recorded");
    let hand = t
        .iter()
        .position(|e| e == "switchover admin-orders-1 -> admin-orders-0 epoch 2")
        .expect("switched");
    assert!(record < hand, "{t:?}");
    assert_eq!(label(&api, "orders-0").as_deref(), Some("master"));
    assert_eq!(label(&api, "orders-1").as_deref(), Some("slave"));
    assert!(
        !bg.annotations()
            .contains_key(keelmq_crds::ANNOTATION_SWITCHOVER_TO)
    );
    api
}

/// `pay` (three brokers, `spec` and `status` as given, master `pay-0`):
/// `pay-0`'s pod is gone, `pay-1` answers with data, `pay-2` is unready.
fn pay_without_its_master(spec: Value, status: Value) -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (ctx, api, brokers) = harness("pay", 3);
    let mut bg = serde_json::to_value(group("pay", spec)).expect("json");
    bg["status"] = status;
    api.insert(bg);
    api.insert(pod("pay", 1, true));
    api.insert(pod("pay", 2, false));
    brokers.add("admin-pay-1", "pay-1", 10);
    brokers.with("admin-pay-1", |b| b.status.epoch = 1);
    (ctx, api, brokers)
}

/// `pay` kept `pay-0` as master and says why: one of its two slaves
/// answers, two are needed.
fn assert_blocked_on_one_of_two_slaves(api: &FakeApi, brokers: &FakeBrokers) {
    let bg = stored_group(api, "pay");
    assert_eq!(
        bg.status.as_ref().and_then(|s| s.master.as_deref()),
        Some("pay-0")
    );
    let (status, reason, message) = condition(&bg, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "FailoverBlocked")
    );
    assert!(
        message.contains("1 of 2 slaves are reachable and ready with data, 2 are needed"),
        "{message}"
    );
    let t = timeline(brokers);
    assert!(!t.iter().any(|e| e.starts_with("promote")), "{t:?}");
}

/// Too few slaves reachable under Sync: no promotion; conditions and a
/// Warning event say why.
pub(super) async fn waiting() -> FakeApi {
    let (ctx, api, brokers) = pay_without_its_master(
        json!({"replicas": 3}),
        json!({"master": "pay-0", "epoch": 1}),
    );
    run(&api, &ctx, "pay").await.expect("reconcile");
    assert_blocked_on_one_of_two_slaves(&api, &brokers);
    let events: Vec<Value> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/events"))
        .map(|r| r.body)
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "Warning" && e["reason"] == "FailoverBlocked"),
        "{events:?}"
    );

    // Polling again with the same reason publishes nothing new ...
    let before = api
        .requests()
        .iter()
        .filter(|r| r.path.contains("/events"))
        .count();
    run(&api, &ctx, "pay").await.expect("reconcile");
    let after = api
        .requests()
        .iter()
        .filter(|r| r.path.contains("/events"))
        .count();
    assert_eq!(
        before, after,
        "no event spam while the reason stays the same"
    );
    // ... and once the remembered reason is gone (as after it changed), the
    // Recorder counts the repeat on the existing Event (a PATCH).
    ctx.last_wait.lock().expect("memory").clear();
    run(&api, &ctx, "pay").await.expect("reconcile");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.method == http::Method::PATCH && r.path.contains("/events/"))
    );
    api
}

/// The status changed under the operator: it promotes nobody and retries.
pub(super) async fn conflict() -> FakeApi {
    let (ctx, api, brokers) = harness("orders", 2);
    api.insert(serde_json::to_value(group("orders", json!({}))).expect("json"));
    api.insert(pod("orders", 0, true));
    api.insert(pod("orders", 1, true));
    brokers.add("admin-orders-0", "orders-0", 50);
    brokers.add("admin-orders-1", "orders-1", 100);
    api.state.lock().expect("state").conflict_next_status_put = true;
    let bg = stored_group(&api, "orders");
    let err = run(&api, &ctx, "orders").await.expect_err("conflict");
    assert!(matches!(err, Error::Conflict), "{err}");
    assert!(!timeline(&brokers).iter().any(|e| e.starts_with("promote")));
    let action = error_policy(Arc::new(bg), &err, ctx.clone());
    assert_eq!(action, Action::requeue(Duration::from_millis(500)));
    assert!(ctx.metrics.encode().contains("error=\"conflict\""));
    api
}

/// The pause annotation: only the status is written.
pub(super) async fn pause() -> FakeApi {
    let (ctx, api, _) = harness("orders", 2);
    let mut bg = group("orders", json!({}));
    bg.metadata
        .annotations
        .get_or_insert_default()
        .insert(keelmq_crds::ANNOTATION_PAUSE.into(), "true".into());
    api.insert(serde_json::to_value(bg).expect("json"));
    run(&api, &ctx, "orders").await.expect("reconcile");
    let writes: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| r.method != http::Method::GET)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        writes,
        ["PATCH /apis/keelmq.io/v1alpha1/namespaces/ns/brokergroups/orders/status"]
    );
    let bg = stored_group(&api, "orders");
    let (status, reason, _) = condition(&bg, "ReconciliationPaused");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "PausedByAnnotation")
    );
    api
}

/// Spec changes (scale to 3, new image) reach the StatefulSet; the status
/// follows the generation.
pub(super) async fn update_and_scale() -> FakeApi {
    let api = creation().await;
    let (ctx, _, _) = harness("orders", 3);
    // Reuse the same fake API through a context bound to it.
    let ctx = Arc::new(Context::with_brokers(
        ctx_client(&api, &ctx),
        ctx.metrics.clone(),
        ctx.admin.clone(),
        ctx.addresses.clone(),
    ));
    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    bg["spec"]["replicas"] = json!(3);
    bg["spec"]["image"] = json!("keelmq/broker:0.2.0");
    bg["metadata"]["generation"] = json!(2);
    api.insert(bg);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "keelmq/broker:0.2.0"
    );
    let bg = stored_group(&api, "orders");
    assert_eq!(
        bg.status.as_ref().and_then(|s| s.observed_generation),
        Some(2)
    );
    assert!(condition(&bg, "Ready").2.contains("0 of 3 brokers"));
    api
}

fn ctx_client(api: &FakeApi, _: &Arc<Context>) -> kube::Client {
    api.client.clone()
}

/// `spec.networkPolicy.enabled: false` removes the NetworkPolicy the
/// operator made for the group, and only that one; true makes it again.
pub(super) async fn network_policy_off_and_on() -> FakeApi {
    let (ctx, api, _) = harness("orders", 2);
    api.insert(serde_json::to_value(group("orders", json!({}))).expect("json"));
    run(&api, &ctx, "orders").await.expect("reconcile");
    let np = api
        .get("networking.k8s.io", "networkpolicies", NS, "orders")
        .expect("made by default");
    assert_eq!(np["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    // A policy of the user's with the group's labels, owned by nobody.
    let mut theirs = np.clone();
    theirs["metadata"] = json!({"name": "orders-extra", "namespace": NS,
        "labels": crate::model::labels("orders")});
    theirs["apiVersion"] = json!("networking.k8s.io/v1");
    theirs["kind"] = json!("NetworkPolicy");
    api.insert(theirs);

    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    bg["spec"]["networkPolicy"] = json!({"enabled": false});
    bg["metadata"]["generation"] = json!(2);
    api.insert(bg);
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert!(
        api.get("networking.k8s.io", "networkpolicies", NS, "orders")
            .is_none(),
        "the operator's policy is deleted"
    );
    assert!(
        api.get("networking.k8s.io", "networkpolicies", NS, "orders-extra")
            .is_some(),
        "a policy the group does not own stays"
    );
    let deletes = api
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::DELETE)
        .count();
    assert_eq!(deletes, 1);
    // Reconciled again while off: nothing more to delete, nothing applied.
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert!(
        api.get("networking.k8s.io", "networkpolicies", NS, "orders")
            .is_none()
    );
    assert_eq!(
        condition(&stored_group(&api, "orders"), "Ready").1,
        "WaitingForBrokers",
        "no problem reported"
    );

    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    bg["spec"]["networkPolicy"] = json!({"enabled": true});
    bg["metadata"]["generation"] = json!(3);
    api.insert(bg);
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert!(
        api.get("networking.k8s.io", "networkpolicies", NS, "orders")
            .is_some()
    );
    api
}

#[tokio::test]
async fn the_network_policy_can_be_turned_off_and_on() {
    network_policy_off_and_on().await;
}

/// A Topic: finalizer, creation on the master, growth, deletion.
pub(super) async fn topic() -> FakeApi {
    let (ctx, api, brokers) = harness("orders", 2);
    let mut bg = serde_json::to_value(group("orders", json!({}))).expect("json");
    bg["status"] = json!({"master": "orders-0", "epoch": 1});
    api.insert(bg);
    brokers.add("admin-orders-0", "orders-0", 0);
    api.insert(json!({"apiVersion": "keelmq.io/v1alpha1", "kind": "Topic",
        "metadata": {"name": "created", "namespace": NS},
        "spec": {"brokerGroup": "orders", "queues": 4}}));
    let get = |api: &FakeApi| -> Topic {
        serde_json::from_value(
            api.get("keelmq.io", "topics", NS, "created")
                .expect("topic"),
        )
        .expect("Topic")
    };
    let step = |api: &FakeApi| {
        let t = get(api);
        let ctx = ctx.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                crate::topic::reconcile(Arc::new(t), ctx),
            )
            .await
            .expect("reconcile finishes")
        }
    };
    step(&api).await.expect("adds finalizer");
    assert_eq!(
        get(&api).metadata.finalizers,
        Some(vec![crate::topic::FINALIZER.to_string()])
    );
    step(&api).await.expect("creates");
    assert!(timeline(&brokers).contains(&"create topic created".to_string()));
    let t = get(&api);
    let st = t.status.expect("status");
    assert_eq!(st.queues, 4);
    assert_eq!(st.conditions[0].status, "True");

    let mut grown = api
        .get("keelmq.io", "topics", NS, "created")
        .expect("topic");
    grown["spec"]["queues"] = json!(8);
    api.insert(grown);
    step(&api).await.expect("grows");
    assert!(timeline(&brokers).contains(&"update topic created queues 8".to_string()));

    let mut deleting = api
        .get("keelmq.io", "topics", NS, "created")
        .expect("topic");
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-25T20:00:00Z");
    api.insert(deleting);
    step(&api).await.expect("deletes");
    assert!(timeline(&brokers).contains(&"delete topic created".to_string()));
    assert_eq!(
        get(&api).metadata.finalizers.unwrap_or_default(),
        Vec::<String>::new()
    );
    api
}

/// Leader election against the fake API: first candidate wins, a second
/// waits, the holder renews.
pub(super) async fn leader_election() -> FakeApi {
    let (client, api) = FakeApi::start();
    let me = crate::leader::LeaseConfig::new("keelmq-operator", NS, "op-a");
    let other = crate::leader::LeaseConfig::new("keelmq-operator", NS, "op-b");
    assert!(
        crate::leader::try_acquire(&client, &me)
            .await
            .expect("acquire")
    );
    assert!(
        !crate::leader::try_acquire(&client, &other)
            .await
            .expect("other")
    );
    assert!(
        crate::leader::try_acquire(&client, &me)
            .await
            .expect("renew")
    );
    let lease = api
        .get("coordination.k8s.io", "leases", NS, "keelmq-operator")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "op-a");
    api
}

/// The controllers start: they list and watch what they own, and say they
/// run (the leader's /readyz waits for it).
pub(super) async fn controllers_watch() -> FakeApi {
    let (ctx, api, _) = harness("orders", 2);
    let client = api.client.clone();
    let running = ctx.controllers_running.clone();
    assert!(!running.load(std::sync::atomic::Ordering::Acquire));
    let run = crate::controller::run(client, Some(NS.into()), ctx);
    let wanted: BTreeSet<&str> = [
        "brokergroups",
        "topics",
        "statefulsets",
        "services",
        "configmaps",
        "poddisruptionbudgets",
        "networkpolicies",
        "pods",
    ]
    .into();
    let watched = |api: &FakeApi| -> BTreeSet<String> {
        api.requests()
            .iter()
            .filter(|r| r.query.contains("watch=true"))
            .flat_map(|r| r.rbac().into_iter().map(|(_, res, _)| res))
            .collect()
    };
    tokio::select! {
        _ = run => panic!("controllers stopped"),
        () = async {
            while watched(&api).len() < wanted.len() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } => {}
        () = tokio::time::sleep(Duration::from_secs(20)) => panic!("not every watch started: {:?}", watched(&api)),
    }
    assert!(
        running.load(std::sync::atomic::Ordering::Acquire),
        "the controllers say they run"
    );
    api
}

/// A reconcile started from an out-of-date cached object (the operator's
/// own status write not yet seen by the watch) works from the group as
/// stored: the master label stays, and the status is not rolled back.
#[tokio::test]
async fn a_stale_cached_group_moves_no_label_and_rolls_back_no_status() {
    let (ctx, api, _) = bootstrap().await;
    let stored = stored_group(&api, "orders");
    let st = stored.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-1"), 1));
    let mut stale = stored.clone();
    stale.status = Some(keelmq_crds::BrokerGroupStatus {
        master: Some("orders-0".into()),
        epoch: 0,
        ..Default::default()
    });
    stale.metadata.resource_version = Some("1".into());
    tokio::time::timeout(
        Duration::from_secs(10),
        crate::controller::reconcile(Arc::new(stale), ctx.clone()),
    )
    .await
    .expect("finishes")
    .expect("reconcile");
    assert_eq!(label(&api, "orders-1").as_deref(), Some("master"));
    assert_eq!(label(&api, "orders-0").as_deref(), Some("slave"));
    let after = stored_group(&api, "orders").status.expect("status");
    assert_eq!(
        (after.master.as_deref(), after.epoch, after.master_store_id),
        (Some("orders-1"), 1, st.master_store_id)
    );
}

/// The status is written only while the group is still as read: a change
/// in between (another writer) makes the reconcile start over.
#[tokio::test]
async fn the_status_write_is_conditional_on_the_object_read() {
    let (ctx, api, _) = bootstrap().await;
    api.state.lock().expect("state").change_after_next_get = true;
    let err = run(&api, &ctx, "orders")
        .await
        .expect_err("the group changed after it was read");
    assert!(matches!(err, Error::Conflict), "{err}");
    let last = api
        .requests()
        .into_iter()
        .rfind(|r| r.path.ends_with("/brokergroups/orders/status"))
        .expect("a status write");
    assert_eq!(last.method, http::Method::PATCH);
    assert!(last.body["metadata"]["resourceVersion"].is_string());
    run(&api, &ctx, "orders").await.expect("the retry succeeds");
}

/// An invalid spec is reported, but failover still runs: the master's pod
/// goes and the slave is promoted.
#[tokio::test]
async fn an_invalid_spec_does_not_stop_failover() {
    let (ctx, api, brokers) = bootstrap().await;
    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    bg["spec"]["config"] = json!({"role": "x"});
    bg["metadata"]["generation"] = json!(2);
    api.insert(bg);
    api.remove("", "pods", NS, "orders-1");
    brokers.with("admin-orders-1", |b| b.up = false);
    brokers.with("admin-orders-0", |b| b.status.epoch = 1);
    let action = run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-0"), 2));
    assert_eq!(label(&api, "orders-0").as_deref(), Some("master"));
    let (status, reason, message) = condition(&bg, "Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("config.role"), "{message}");
    assert_eq!(condition(&bg, "Degraded").1, "InvalidSpec");
    assert_ne!(action, Action::await_change(), "polled again");
}

/// Applies the API server refuses (an admission webhook, RBAC) are
/// reported, but failover still runs.
#[tokio::test]
async fn refused_applies_do_not_stop_failover() {
    let (ctx, api, brokers) = bootstrap().await;
    api.state.lock().expect("state").refuse_applies = true;
    api.remove("", "pods", NS, "orders-1");
    brokers.with("admin-orders-1", |b| b.up = false);
    brokers.with("admin-orders-0", |b| b.status.epoch = 1);
    let action = run(&api, &ctx, "orders").await.expect("reconcile");
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-0"), 2));
    let (status, reason, message) = condition(&bg, "Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "ApplyFailed"));
    assert!(message.contains("403"), "{message}");
    assert_ne!(action, Action::await_change(), "polled again");
}

/// Only spec and annotation changes of a BrokerGroup start a reconcile:
/// the status the operator writes on every reconcile does not.
#[test]
fn status_writes_do_not_trigger_reconciles() {
    use crate::controller::group_trigger;
    let bg = group("orders", json!({}));
    let mut status_only = bg.clone();
    status_only.status = Some(keelmq_crds::BrokerGroupStatus {
        ready_replicas: 2,
        ..Default::default()
    });
    status_only.metadata.resource_version = Some("2".into());
    assert_eq!(group_trigger(&status_only), group_trigger(&bg));
    let mut spec = bg.clone();
    spec.metadata.generation = Some(2);
    assert_ne!(group_trigger(&spec), group_trigger(&bg));
    let mut annotated = bg.clone();
    annotated
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(
            keelmq_crds::ANNOTATION_SWITCHOVER_TO.into(),
            "orders-1".into(),
        );
    assert_ne!(group_trigger(&annotated), group_trigger(&bg));
}

/// The topic calls the fake brokers received.
fn broker_topic_calls(brokers: &FakeBrokers) -> Vec<String> {
    timeline(brokers)
        .into_iter()
        .filter(|e| {
            ["create topic ", "update topic ", "delete topic "]
                .iter()
                .any(|p| e.starts_with(p))
        })
        .collect()
}

/// A paused group's brokers are not changed for its Topics: no topic is
/// created, and a deleted Topic keeps its finalizer until the pause ends.
#[tokio::test]
async fn topics_of_a_paused_group_change_nothing_on_its_brokers() {
    let (ctx, api, brokers) = harness("orders", 2);
    let mut bg = serde_json::to_value(group("orders", json!({}))).expect("json");
    bg["status"] = json!({"master": "orders-0", "epoch": 1});
    bg["metadata"]["annotations"] = json!({keelmq_crds::ANNOTATION_PAUSE: "true"});
    api.insert(bg);
    brokers.add("admin-orders-0", "orders-0", 0);
    api.insert(json!({"apiVersion": "keelmq.io/v1alpha1", "kind": "Topic",
        "metadata": {"name": "paused", "namespace": NS},
        "spec": {"brokerGroup": "orders", "queues": 4}}));
    let get = |api: &FakeApi| -> Topic {
        serde_json::from_value(api.get("keelmq.io", "topics", NS, "paused").expect("topic"))
            .expect("Topic")
    };
    let step = |api: &FakeApi| {
        let t = get(api);
        let ctx = ctx.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                crate::topic::reconcile(Arc::new(t), ctx),
            )
            .await
            .expect("reconcile finishes")
        }
    };
    step(&api).await.expect("adds finalizer");
    step(&api).await.expect("waits");
    assert_eq!(broker_topic_calls(&brokers), Vec::<String>::new());
    let st = get(&api).status.expect("status");
    let paused = st
        .conditions
        .iter()
        .find(|c| c.type_ == "ReconciliationPaused")
        .expect("condition");
    assert_eq!(
        (paused.status.as_str(), paused.reason.as_str()),
        ("True", "GroupPaused")
    );

    let mut deleting = api.get("keelmq.io", "topics", NS, "paused").expect("topic");
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-25T20:00:00Z");
    api.insert(deleting);
    let err = step(&api).await.expect_err("held while paused");
    assert!(matches!(err, Error::Paused(_)), "{err}");
    assert_eq!(broker_topic_calls(&brokers), Vec::<String>::new());
    assert_eq!(
        get(&api).metadata.finalizers,
        Some(vec![crate::topic::FINALIZER.to_string()])
    );

    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("group");
    bg["metadata"]["annotations"] = json!({});
    api.insert(bg);
    step(&api).await.expect("deletes");
    assert!(timeline(&brokers).contains(&"delete topic paused".to_string()));
}

/// A leader whose renewal never gets an answer (a half-open connection)
/// stops acting before its Lease can expire for the others.
#[tokio::test]
async fn a_leader_whose_renewal_hangs_stops_before_its_lease_expires() {
    let (client, api) = FakeApi::start();
    let mut cfg = crate::leader::LeaseConfig::new("keelmq-operator", NS, "op-a");
    cfg.duration = Duration::from_millis(1500);
    cfg.renew_every = Duration::from_millis(100);
    cfg.renew_deadline = Duration::from_millis(1000);
    let acquired = crate::leader::acquire(&client, &cfg).await;
    api.state.lock().expect("state").hang_lease_writes = true;
    tokio::time::timeout(cfg.duration, crate::leader::hold(&client, &cfg, acquired))
        .await
        .expect("hold gives up before the Lease expires");
    assert!(acquired.elapsed() >= cfg.renew_deadline);
}

/// On shutdown the leader releases the Lease: another candidate takes it
/// at once instead of after its duration.
#[tokio::test]
async fn a_released_lease_is_taken_over_at_once() {
    let (client, _api) = FakeApi::start();
    let me = crate::leader::LeaseConfig::new("keelmq-operator", NS, "op-a");
    let other = crate::leader::LeaseConfig::new("keelmq-operator", NS, "op-b");
    crate::leader::acquire(&client, &me).await;
    assert!(
        !crate::leader::try_acquire(&client, &other)
            .await
            .expect("other")
    );
    crate::leader::release(&client, &other).await;
    assert!(
        !crate::leader::try_acquire(&client, &other)
            .await
            .expect("only the holder releases")
    );
    crate::leader::release(&client, &me).await;
    assert!(
        crate::leader::try_acquire(&client, &other)
            .await
            .expect("taken over")
    );
}

#[tokio::test]
async fn creation_applies_every_object_and_reports_waiting() {
    creation().await;
}

#[tokio::test]
async fn bootstrap_records_then_promotes_the_fullest_broker() {
    bootstrap().await;
}

#[tokio::test]
async fn failover_promotes_the_slave_and_the_old_master_follows() {
    failover().await;
}

#[tokio::test]
async fn too_few_slaves_means_waiting_with_a_reason() {
    waiting().await;
}

#[tokio::test]
async fn a_lost_status_race_promotes_nobody() {
    conflict().await;
}

#[tokio::test]
async fn switchover_annotation_hands_over_to_an_in_sync_slave() {
    switchover().await;
}

#[tokio::test]
async fn pause_writes_only_the_status() {
    pause().await;
}

#[tokio::test]
async fn spec_updates_and_scaling_reach_the_stateful_set() {
    update_and_scale().await;
}

#[tokio::test]
async fn topics_are_created_grown_and_deleted_on_the_master() {
    topic().await;
}

#[tokio::test]
async fn leader_election_uses_a_lease() {
    leader_election().await;
}

#[tokio::test]
async fn controllers_list_and_watch_their_resources() {
    controllers_watch().await;
}

/// Every request the scenarios make is allowed by the RBAC table, and every
/// permission in the table is used by some scenario.
#[tokio::test]
async fn rbac_table_is_exactly_what_the_code_uses() {
    let apis = vec![
        creation().await,
        failover().await,
        waiting().await,
        conflict().await,
        pause().await,
        update_and_scale().await,
        topic().await,
        switchover().await,
        network_policy_off_and_on().await,
        leader_election().await,
        controllers_watch().await,
        super::rollout_tests::template_change().await,
        super::rollout_tests::restart_annotation_waits_for_sync().await,
        super::rollout_tests::resume_after_operator_restart().await,
        super::rollout_tests::scale_down_moves_the_master().await,
    ];
    let mut used = BTreeSet::new();
    for api in &apis {
        for r in api.requests() {
            for (g, res, verb) in r.rbac() {
                assert!(
                    crate::rbac::allows(&g, &res, &verb),
                    "{} {}?{} needs {verb} on {g}/{res}, which operator/src/rbac.rs does not grant",
                    r.method,
                    r.path,
                    r.query
                );
                used.insert((g, res, verb));
            }
        }
    }
    for p in crate::rbac::PERMISSIONS {
        for g in p.api_groups {
            for res in p.resources {
                for verb in p.verbs {
                    assert!(
                        used.contains(&(g.to_string(), res.to_string(), verb.to_string())),
                        "rbac.rs grants {verb} on {g}/{res} but no test exercises it; remove it or test it"
                    );
                }
            }
        }
    }
}

/// Fence first, then measure, then promote: every reachable follower is
/// told to follow the chosen broker in the new epoch (it stops streaming
/// from the old master, which may still be alive and acknowledging writes)
/// after the status records it and before it is promoted.
#[tokio::test]
async fn failover_fences_every_reachable_follower_before_promoting() {
    fail_over_pay(true).await;
}

/// Under SYNC with one in-sync slave of two, the old master may still
/// collect an acknowledgement from `pay-2` alone while `pay-2` cannot be
/// fenced: no promotion then. The old master is recorded again (in the
/// raised epoch) and the group reports why; once `pay-2` accepts the
/// fence the next round promotes in a newer epoch. Under ASYNC the same
/// refusal does not hold the promotion.
#[tokio::test]
async fn a_follower_that_cannot_be_fenced_holds_a_sync_promotion() {
    let (ctx, api, brokers) = master_gone(json!({}), true);
    brokers.with("admin-pay-2", |b| {
        b.refuse_follow = Some("DeadlineExceeded: timeout expired".into());
    });
    run(&api, &ctx, "pay").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(!t.iter().any(|e| e.starts_with("promote")), "{t:?}");
    let bg = stored_group(&api, "pay");
    let st = bg.status.clone().expect("status");
    assert_eq!(
        (st.master.as_deref(), st.epoch),
        (Some("pay-0"), 2),
        "the old master again, in the raised epoch"
    );
    assert_eq!(st.master_store_id.as_deref(), Some("store-pay-0"));
    assert!(st.last_failover.is_none(), "no failover is recorded");
    let (status, reason, message) = condition(&bg, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "FailoverBlocked")
    );
    assert!(
        message.contains("only 1 of 2 slaves stopped following the old master"),
        "{message}"
    );

    brokers.with("admin-pay-2", |b| b.refuse_follow = None);
    brokers.timeline.lock().expect("timeline").clear();
    run(&api, &ctx, "pay").await.expect("reconcile");
    let t = timeline(&brokers);
    let fence = position(&t, "follow admin-pay-2 -> repl-pay-1 epoch 3");
    let promote = position(&t, "promote admin-pay-1 epoch 3");
    assert!(fence < promote, "{t:?}");
    let st = stored_group(&api, "pay").status.expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("pay-1"), 3));

    let (ctx, api, brokers) = master_gone(json!({"mode": "Async"}), true);
    brokers.with("admin-pay-2", |b| {
        b.refuse_follow = Some("DeadlineExceeded: timeout expired".into());
    });
    run(&api, &ctx, "pay").await.expect("reconcile");
    assert!(timeline(&brokers).contains(&"promote admin-pay-1 epoch 2".to_string()));
}

/// `pay-2` received more from the old master between the observation and
/// its fence: `pay-1`, behind it now, is not promoted; the next round
/// chooses `pay-2` in a newer epoch, after fencing `pay-1`.
#[tokio::test]
async fn a_follower_found_ahead_after_fencing_is_not_outranked() {
    let (ctx, api, brokers) = master_gone(json!({}), true);
    brokers.with("admin-pay-2", |b| b.offset_when_fenced = Some(120));
    run(&api, &ctx, "pay").await.expect("reconcile");
    let t = timeline(&brokers);
    assert!(
        t.contains(&"follow admin-pay-2 -> repl-pay-1 epoch 2".to_string()),
        "{t:?}"
    );
    assert!(!t.iter().any(|e| e.starts_with("promote")), "{t:?}");
    let bg = stored_group(&api, "pay");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("pay-0"), 2));
    let message = condition(&bg, "Degraded").2;
    assert!(message.contains("pay-2 holds more than pay-1"), "{message}");

    brokers.timeline.lock().expect("timeline").clear();
    run(&api, &ctx, "pay").await.expect("reconcile");
    let t = timeline(&brokers);
    let fence = position(&t, "follow admin-pay-1 -> repl-pay-2 epoch 3");
    let promote = position(&t, "promote admin-pay-2 epoch 3");
    assert!(fence < promote, "{t:?}");
    assert!(!t.contains(&"promote admin-pay-1 epoch 3".to_string()));
    let st = stored_group(&api, "pay").status.expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("pay-2"), 3));
    let last = st.last_failover.expect("recorded");
    assert_eq!((last.to.as_str(), last.epoch), ("pay-2", 3));
}

/// A broker reads its replication settings when it starts, so after a
/// change of `spec.replication` the master acknowledges sends by its old
/// settings until the roll restarts it. The operator records what the
/// master reports, and keeps the record while the master does not answer;
/// a failover meanwhile is decided by the more cautious settings. Here the
/// master ran with one in-sync slave while the spec now asks two: a send
/// may be on one slave only, so both slaves must be compared, and the one
/// that answers is not promoted alone.
#[tokio::test]
async fn a_failover_is_decided_by_the_settings_the_master_ran_with() {
    use keelmq_crds::{MasterReplication, ReplicationMode};
    let recorded = |api: &FakeApi, group: &str| {
        stored_group(api, group)
            .status
            .and_then(|s| s.master_replication)
    };
    let (ctx, api, brokers) = bootstrapped(json!({})).await;
    brokers.with("admin-orders-1", |b| {
        b.status.replication_mode = "SYNC".into();
        b.status.min_in_sync_replicas = 1;
    });
    run(&api, &ctx, "orders").await.expect("reconcile");
    let ran = Some(MasterReplication {
        master: "orders-1".into(),
        mode: ReplicationMode::Sync,
        min_in_sync_replicas: 1,
    });
    assert_eq!(recorded(&api, "orders"), ran, "recorded as reported");
    brokers.with("admin-orders-1", |b| b.up = false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert_eq!(
        recorded(&api, "orders"),
        ran,
        "kept while it does not answer"
    );
    assert_valid_against_crd(&api, "orders");

    let (ctx, api, brokers) = pay_without_its_master(
        json!({"replicas": 3, "replication": {"minInSyncReplicas": 2}}),
        json!({
            "master": "pay-0",
            "epoch": 1,
            "masterReplication": {"master": "pay-0", "mode": "Sync", "minInSyncReplicas": 1},
        }),
    );
    run(&api, &ctx, "pay").await.expect("reconcile");
    assert_blocked_on_one_of_two_slaves(&api, &brokers);

    // By the spec's settings alone one slave would do.
    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "pay")
        .expect("stored");
    bg["status"]["masterReplication"] = Value::Null;
    api.insert(bg);
    run(&api, &ctx, "pay").await.expect("reconcile");
    assert_eq!(
        stored_group(&api, "pay")
            .status
            .and_then(|s| s.master)
            .as_deref(),
        Some("pay-1")
    );
}

#[test]
fn the_more_cautious_replication_settings_are_in_effect() {
    use crate::failover::replication_in_effect;
    use keelmq_crds::MasterReplication;
    use keelmq_crds::ReplicationMode::{Async, Sync};
    let ran = |mode, min| MasterReplication {
        master: "m".into(),
        mode,
        min_in_sync_replicas: min,
    };
    assert_eq!(replication_in_effect(Sync, 2, None), (Sync, 2));
    assert_eq!(
        replication_in_effect(Sync, 2, Some(&ran(Sync, 1))),
        (Sync, 1)
    );
    assert_eq!(
        replication_in_effect(Sync, 1, Some(&ran(Sync, 2))),
        (Sync, 1)
    );
    assert_eq!(
        replication_in_effect(Sync, 1, Some(&ran(Async, 1))).0,
        Async
    );
    assert_eq!(
        replication_in_effect(Async, 1, Some(&ran(Sync, 1))).0,
        Async
    );
}
