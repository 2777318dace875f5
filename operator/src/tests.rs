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
