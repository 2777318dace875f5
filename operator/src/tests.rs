//! Tests of the operator: the objects it builds, reconciles through the
//! mock API server (creation, update and scale, status, pause, bootstrap,
//! failover, waiting, a lost status race, topics, rolling restarts,
//! scale-down, the persisted detection delay, brokers' readiness and a
//! master's pod being deleted), the RBAC table against the requests those
//! reconciles make, and a failover with real brokers.

mod model_tests;
mod readiness_tests;
mod real_failover;
mod reconcile_tests;
mod rollout_tests;

use std::sync::Arc;
use std::time::Duration;

use keelmq_crds::BrokerGroup;
use serde_json::{Value, json};

use crate::brokers::StaticAddresses;
use kube::runtime::controller::Action;

use crate::Error;
use crate::controller::{Context, reconcile};
use crate::metrics::Metrics;
use crate::testing::{FakeApi, FakeBrokers};

const NS: &str = "ns";

/// Fake admin and replication addresses of pods 0..n of a group.
fn addresses(group: &str, n: i32) -> StaticAddresses {
    let mut a = StaticAddresses::default();
    for i in 0..n {
        let p = format!("{group}-{i}");
        a.pods
            .insert(p.clone(), (format!("admin-{p}"), format!("repl-{p}")));
    }
    a
}

/// The BrokerGroup as the mock API server holds it now.
fn stored_group(api: &FakeApi, name: &str) -> BrokerGroup {
    serde_json::from_value(
        api.get("keelmq.io", "brokergroups", NS, name)
            .expect("stored"),
    )
    .expect("BrokerGroup")
}

/// Broker calls in order, as the fake brokers recorded them.
fn timeline(brokers: &FakeBrokers) -> Vec<String> {
    brokers.timeline.lock().expect("timeline").clone()
}

/// The role label the operator wrote on pod `pod`.
fn label(api: &FakeApi, pod: &str) -> Option<String> {
    api.get("", "pods", NS, pod)?["metadata"]["labels"]["keelmq.io/role"]
        .as_str()
        .map(str::to_string)
}

/// Warning events with `reason` published so far.
fn warnings(api: &FakeApi, reason: &str) -> usize {
    api.requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/events"))
        .filter(|r| r.body["type"] == "Warning" && r.body["reason"] == reason)
        .count()
}

/// The message of the group's Degraded condition, which must be True for
/// `reason`.
fn degraded_because(bg: &BrokerGroup, reason: &str) -> String {
    let (status, why, message) = condition(bg, "Degraded");
    assert_eq!(
        (status.as_str(), why.as_str()),
        ("True", reason),
        "{message}"
    );
    message
}

/// One reconcile of the stored BrokerGroup, bounded in time.
async fn run(api: &FakeApi, ctx: &Arc<Context>, name: &str) -> Result<Action, Error> {
    let bg = stored_group(api, name);
    tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(bg), ctx.clone()),
    )
    .await
    .expect("reconcile finishes")
}

/// (status, reason, message) of a condition the operator wrote.
fn condition(bg: &BrokerGroup, type_: &str) -> (String, String, String) {
    let c = bg
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// A BrokerGroup as stored, from YAML spec text.
fn group(name: &str, spec: Value) -> BrokerGroup {
    let mut bg: BrokerGroup = serde_json::from_value(json!({
        "apiVersion": "keelmq.io/v1alpha1",
        "kind": "BrokerGroup",
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }))
    .expect("BrokerGroup");
    bg.metadata.resource_version = Some("1".into());
    bg
}

/// A pod of the group, ready or not.
fn pod(group: &str, i: i32, ready: bool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{group}-{i}"),
            "namespace": "ns",
            "labels": crate::model::selector_labels(group),
        },
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

/// How long a ready slave may stay unconnected to the master before the
/// group is Degraded, in the tests (10 s in production).
const REPLICATION_GRACE: Duration = Duration::from_millis(200);

/// Past the (test) grace a slave gets to connect to the master.
async fn past_the_grace() {
    tokio::time::sleep(REPLICATION_GRACE + Duration::from_millis(50)).await;
}

/// Fake API + fake brokers + a context wired to both; pod `<g>-i` has admin
/// address `admin-<g>-i` and replication address `repl-<g>-i`; the fake
/// masters list the brokers that follow them as connected, in-sync slaves.
fn harness(group: &str, replicas: i32) -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (client, api) = FakeApi::start();
    let brokers = FakeBrokers::default();
    api.state.lock().expect("state").timeline = Some(brokers.timeline.clone());
    let mut ctx = Context::with_brokers(
        client,
        Arc::new(Metrics::default()),
        Arc::new(brokers.clone()),
        Arc::new(addresses(group, replicas.max(4))),
    );
    ctx.replication_grace = REPLICATION_GRACE;
    (Arc::new(ctx), api, brokers)
}

/// Where `entry` is in a broker timeline; panics, showing it, if absent.
fn position(t: &[String], entry: &str) -> usize {
    t.iter()
        .position(|e| e == entry)
        .unwrap_or_else(|| panic!("no {entry:?} in {t:?}"))
}

/// A three-broker group `pay` whose master `pay-0` has just gone (pod
/// deleted, admin API silent) while `pay-1` (offset 100) and `pay-2`
/// (offset 90), slaves of epoch 1, still say they follow it; their pods are
/// Ready as `slaves_ready` says (a following slave's `/readyz` says no once
/// its master is gone). Ready or not, the decision is to promote `pay-1` in
/// epoch 2 with `pay-2` as its follower.
fn master_gone(replication: Value, slaves_ready: bool) -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (ctx, api, brokers) = harness("pay", 3);
    let mut bg = serde_json::to_value(group(
        "pay",
        json!({"replicas": 3, "replication": replication}),
    ))
    .expect("json");
    bg["status"] = json!({"master": "pay-0", "epoch": 1, "masterStoreId": "store-pay-0"});
    api.insert(bg);
    for (i, offset) in [(1, 100), (2, 90)] {
        api.insert(pod("pay", i, slaves_ready));
        brokers.add(&format!("admin-pay-{i}"), &format!("pay-{i}"), offset);
        brokers.with(&format!("admin-pay-{i}"), |b| {
            b.status.epoch = 1;
            b.status.master_address = "repl-pay-0".into();
        });
    }
    (ctx, api, brokers)
}

/// `orders` (three brokers, SYNC) with its objects applied, its pods made
/// from the StatefulSet and Ready, and bootstrapped: `orders-0` (offset 300)
/// is master of epoch 1, `orders-1` (200) and `orders-2` (100) follow it in
/// sync (the fake master lists its followers), and the group is Ready.
async fn healthy_group() -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (ctx, api, brokers) = harness("orders", 3);
    brokers.track_replication();
    api.insert(serde_json::to_value(group("orders", json!({"replicas": 3}))).expect("json"));
    run(&api, &ctx, "orders")
        .await
        .expect("creates the objects");
    for i in 0..3 {
        api.pod_from_stateful_set(NS, "orders", i, true);
        brokers.add(
            &format!("admin-orders-{i}"),
            &format!("orders-{i}"),
            300 - 100 * i as u64,
        );
    }
    run(&api, &ctx, "orders").await.expect("bootstrap");
    run(&api, &ctx, "orders").await.expect("healthy");
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-0"), 1));
    assert_eq!(
        condition(&bg, "Ready").0,
        "True",
        "{:?}",
        condition(&bg, "Ready")
    );
    assert!(st.rollout.is_none());
    brokers.timeline.lock().expect("timeline").clear();
    (ctx, api, brokers)
}

/// One reconcile of [`master_gone`] (SYNC), checked: `pay-1` is recorded
/// as master of epoch 2 first, then `pay-2`, the only reachable follower,
/// is fenced (told to follow `pay-1` in epoch 2), then `pay-1` is promoted.
/// Returns the fake API server and the stored status.
async fn fail_over_pay(slaves_ready: bool) -> (FakeApi, keelmq_crds::BrokerGroupStatus) {
    let (ctx, api, brokers) = master_gone(json!({}), slaves_ready);
    run(&api, &ctx, "pay").await.expect("reconcile");
    let st = stored_group(&api, "pay").status.expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("pay-1"), 2));
    let t = brokers.timeline.lock().expect("timeline").clone();
    let record = position(&t, "update brokergroups/status pay");
    let fence = position(&t, "follow admin-pay-2 -> repl-pay-1 epoch 2");
    let promote = position(&t, "promote admin-pay-1 epoch 2");
    assert!(record < fence && fence < promote, "{t:?}");
    let follows: Vec<&String> = t.iter().filter(|e| e.starts_with("follow")).collect();
    assert!(
        follows
            .iter()
            .all(|e| *e == "follow admin-pay-2 -> repl-pay-1 epoch 2"),
        "only pay-2 is a reachable follower: {t:?}"
    );
    (api, st)
}
