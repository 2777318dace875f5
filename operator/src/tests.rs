//! Tests of the operator: the objects it builds, reconciles through the
//! mock API server (creation, update and scale, status, pause, bootstrap,
//! failover, waiting, a lost status race, topics, rolling restarts,
//! scale-down, the persisted detection delay), the RBAC table against
//! the requests those reconciles make, and a failover with real brokers.

mod model_tests;
mod real_failover;
mod reconcile_tests;
mod rollout_tests;

use std::sync::Arc;

use keelmq_crds::BrokerGroup;
use serde_json::{Value, json};

use crate::brokers::StaticAddresses;
use crate::controller::Context;
use crate::metrics::Metrics;
use crate::testing::{FakeApi, FakeBrokers};

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

/// Fake API + fake brokers + a context wired to both; pod `<g>-i` has admin
/// address `admin-<g>-i` and replication address `repl-<g>-i`.
fn harness(group: &str, replicas: i32) -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (client, api) = FakeApi::start();
    let brokers = FakeBrokers::default();
    api.state.lock().expect("state").timeline = Some(brokers.timeline.clone());
    let mut addresses = StaticAddresses::default();
    for i in 0..replicas.max(4) {
        let p = format!("{group}-{i}");
        addresses
            .pods
            .insert(p.clone(), (format!("admin-{p}"), format!("repl-{p}")));
    }
    let ctx = Arc::new(Context::with_brokers(
        client,
        Arc::new(Metrics::default()),
        Arc::new(brokers.clone()),
        Arc::new(addresses),
    ));
    (ctx, api, brokers)
}
