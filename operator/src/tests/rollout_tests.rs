//! Rolling restarts, scale-down and the persisted detection delay, through
//! the mock API server and fake brokers. The test plays the StatefulSet
//! controller: when the operator deletes a pod, the test recreates it from
//! the StatefulSet's current template and the fake broker restarts in
//! standby.

use std::sync::Arc;
use std::time::Duration;

use keelmq_crds::BrokerGroup;
use serde_json::{Value, json};

use super::{NS, addresses, condition, group, harness, healthy_group, pod, run, stored_group};
use crate::controller::{Context, reconcile};
use crate::metrics::Metrics;
use crate::model::ANNOTATION_TEMPLATE_HASH;
use crate::testing::{FakeApi, FakeBrokers};

/// Timeline entries that delete pods or hand the master role over.
fn steps(brokers: &FakeBrokers) -> Vec<String> {
    brokers
        .timeline
        .lock()
        .expect("timeline")
        .iter()
        .filter(|e| e.starts_with("delete pods") || e.starts_with("switchover"))
        .cloned()
        .collect()
}

fn event_reasons(api: &FakeApi) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/events") && r.method == http::Method::POST)
        .filter_map(|r| r.body["reason"].as_str().map(str::to_string))
        .collect()
}

fn template_hash(api: &FakeApi) -> String {
    api.get("apps", "statefulsets", NS, "orders").expect("sts")["spec"]["template"]["metadata"]
        ["annotations"][ANNOTATION_TEMPLATE_HASH]
        .as_str()
        .expect("hash")
        .to_string()
}

fn pod_hash(api: &FakeApi, pod: &str) -> Option<String> {
    api.get("", "pods", NS, pod)?["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH]
        .as_str()
        .map(str::to_string)
}

/// What rolling the three brokers of [`healthy_group`] does, in order:
/// the slaves, a switchover to an updated slave, then the old master.
const ROLL_OF_THREE: [&str; 4] = [
    "delete pods orders-2",
    "delete pods orders-1",
    "switchover admin-orders-0 -> admin-orders-1 epoch 2",
    "delete pods orders-0",
];

/// Changes the stored BrokerGroup as a user would (a new generation).
fn edit(api: &FakeApi, f: impl FnOnce(&mut Value)) {
    let mut bg = api
        .get("keelmq.io", "brokergroups", NS, "orders")
        .expect("stored");
    f(&mut bg);
    let g = bg["metadata"]["generation"].as_i64().unwrap_or(1);
    bg["metadata"]["generation"] = json!(g + 1);
    api.insert(bg);
}

/// Reconciles until the roll is over (bounded), playing the StatefulSet
/// controller. After each pod deletion one more reconcile runs while the
/// pod is gone, and must delete nothing. Returns the number of reconciles.
async fn drive_roll(api: &FakeApi, ctx: &Arc<Context>, brokers: &FakeBrokers) -> usize {
    for n in 1..=40 {
        run(api, ctx, "orders").await.expect("reconcile");
        let missing: Vec<i32> = (0..3)
            .filter(|i| api.get("", "pods", NS, &format!("orders-{i}")).is_none())
            .collect();
        assert!(missing.len() <= 1, "one pod at a time: {missing:?} missing");
        if let Some(&i) = missing.first() {
            brokers.with(&format!("admin-orders-{i}"), |b| b.up = false);
            let before = steps(brokers).len();
            run(api, ctx, "orders").await.expect("reconcile");
            assert_eq!(
                steps(brokers).len(),
                before,
                "nothing else is deleted while orders-{i} is away"
            );
            let bg = stored_group(api, "orders");
            let (_, reason, message) = condition(&bg, "Progressing");
            assert_eq!(reason, "WaitingForSync", "{message}");
            assert!(
                message.contains(&format!("orders-{i} has no pod yet")),
                "{message}"
            );
            api.pod_from_stateful_set(NS, "orders", i, true);
            brokers.restart(&format!("admin-orders-{i}"));
            continue;
        }
        let bg = stored_group(api, "orders");
        let hash = template_hash(api);
        let all_new = (0..3).all(|i| pod_hash(api, &format!("orders-{i}")) == Some(hash.clone()));
        if all_new && bg.status.as_ref().is_some_and(|s| s.rollout.is_none()) {
            return n;
        }
    }
    panic!(
        "the roll did not finish: {:?}",
        stored_group(api, "orders").status
    );
}

/// A new image rolls the slaves (highest ordinal first, each back and in
/// sync before the next), then hands the master role to an updated slave,
/// then restarts the old master, which follows.
pub(super) async fn template_change() -> FakeApi {
    let (ctx, api, brokers) = healthy_group().await;
    let old_hash = template_hash(&api);
    edit(&api, |bg| {
        bg["spec"]["image"] = json!("keelmq/broker:0.2.0")
    });

    run(&api, &ctx, "orders").await.expect("reconcile");
    assert_ne!(template_hash(&api), old_hash);
    assert_eq!(steps(&brokers), ["delete pods orders-2"]);
    let bg = stored_group(&api, "orders");
    let rollout = bg
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .expect("recorded");
    assert_eq!(rollout.reason, "TemplateChanged");
    assert_eq!(
        rollout.pending.as_ref().map(|p| p.pod.as_str()),
        Some("orders-2")
    );
    assert_eq!(condition(&bg, "Progressing").1, "RollingUpdate");
    assert_eq!(condition(&bg, "Ready").0, "False", "a broker is away");
    assert_eq!(bg.status.as_ref().map(|s| s.ready_replicas), Some(2));

    drive_roll(&api, &ctx, &brokers).await;
    assert_eq!(steps(&brokers), ROLL_OF_THREE);
    let t = brokers.timeline.lock().expect("timeline").clone();
    let followed = t
        .iter()
        .position(|e| e == "follow admin-orders-1 -> repl-orders-0 epoch 1")
        .expect("orders-1 followed the master after its restart");
    let handed = t
        .iter()
        .position(|e| e.starts_with("switchover"))
        .expect("switched over");
    assert!(followed < handed, "{t:?}");
    assert!(
        t.contains(&"follow admin-orders-0 -> repl-orders-1 epoch 2".to_string()),
        "the old master follows after its restart: {t:?}"
    );
    let bg = stored_group(&api, "orders");
    let st = bg.status.clone().expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-1"), 2));
    assert!(
        st.last_failover
            .as_ref()
            .is_some_and(|f| f.reason.starts_with("rolling update"))
    );
    assert_eq!(condition(&bg, "Progressing").1, "Stable");
    assert_eq!(condition(&bg, "Ready").0, "True");
    let reasons = event_reasons(&api);
    for r in [
        "RollingUpdateStarted",
        "RestartingBroker",
        "BrokerRestarted",
        "SwitchedOver",
        "RollingUpdateFinished",
    ] {
        assert!(reasons.iter().any(|x| x == r), "{r} in {reasons:?}");
    }
    api
}

/// A lagging slave holds the roll (requested with the restart annotation)
/// until it catches up; then the roll runs to the end and every pod carries
/// the annotation's value.
pub(super) async fn restart_annotation_waits_for_sync() -> FakeApi {
    let (ctx, api, brokers) = healthy_group().await;
    brokers.set_lagging("orders-1", true);
    edit(&api, |bg| {
        bg["metadata"]["annotations"] =
            json!({keelmq_crds::ANNOTATION_RESTART: "2026-11-25T23:00:00Z"});
    });
    for _ in 0..3 {
        run(&api, &ctx, "orders").await.expect("reconcile");
    }
    assert!(
        steps(&brokers).is_empty(),
        "nothing deleted while orders-1 lags"
    );
    let bg = stored_group(&api, "orders");
    let (status, reason, message) = condition(&bg, "Progressing");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "WaitingForSync")
    );
    assert!(
        message.contains("orders-1 is not in sync with master orders-0"),
        "{message}"
    );
    let rollout = bg
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .expect("recorded");
    assert_eq!(rollout.reason, "RestartRequested");
    assert!(
        rollout.message.contains("orders-1 is not in sync"),
        "{}",
        rollout.message
    );

    brokers.set_lagging("orders-1", false);
    drive_roll(&api, &ctx, &brokers).await;
    assert_eq!(steps(&brokers), ROLL_OF_THREE);
    for i in 0..3 {
        let p = api
            .get("", "pods", NS, &format!("orders-{i}"))
            .expect("pod");
        assert_eq!(
            p["metadata"]["annotations"][keelmq_crds::ANNOTATION_RESTART],
            "2026-11-25T23:00:00Z"
        );
    }
    api
}

/// An operator restart mid-roll (a fresh context; only the status is
/// left): the roll goes on where it was, not from the start.
pub(super) async fn resume_after_operator_restart() -> FakeApi {
    let (ctx, api, brokers) = healthy_group().await;
    edit(&api, |bg| {
        bg["spec"]["image"] = json!("keelmq/broker:0.2.0")
    });
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert_eq!(steps(&brokers), ["delete pods orders-2"]);
    let before = stored_group(&api, "orders")
        .status
        .and_then(|s| s.rollout)
        .expect("rollout");
    drop(ctx);

    // The operator is gone; the StatefulSet recreates the pod meanwhile.
    api.pod_from_stateful_set(NS, "orders", 2, true);
    brokers.restart("admin-orders-2");
    let ctx = Arc::new(Context::with_brokers(
        api.client.clone(),
        Arc::new(Metrics::default()),
        Arc::new(brokers.clone()),
        Arc::new(addresses("orders", 4)),
    ));
    run(&api, &ctx, "orders")
        .await
        .expect("the returned pod follows");
    run(&api, &ctx, "orders").await.expect("the roll goes on");
    assert_eq!(
        steps(&brokers),
        ["delete pods orders-2", "delete pods orders-1"],
        "orders-2 is not restarted again"
    );
    let after = stored_group(&api, "orders")
        .status
        .and_then(|s| s.rollout)
        .expect("rollout");
    assert_eq!(after.started, before.started, "the same roll, resumed");
    assert_eq!(after.restarted, ["orders-2"]);
    assert_eq!(after.pending.map(|p| p.pod), Some("orders-1".to_string()));
    let started = event_reasons(&api)
        .iter()
        .filter(|r| *r == "RollingUpdateStarted")
        .count();
    assert_eq!(started, 1);
    api
}

/// Scaling 3 -> 2 with the master on ordinal 2: the StatefulSet keeps three
/// pods while no slave that stays is in sync, then the master hands over,
/// and only once every broker that stays follows the new master in sync
/// does the StatefulSet shrink.
pub(super) async fn scale_down_moves_the_master() -> FakeApi {
    let (ctx, api, brokers) = three_with_master_on_the_last().await;
    let st = stored_group(&api, "orders").status.expect("status");
    assert_eq!(st.master.as_deref(), Some("orders-2"));
    brokers.timeline.lock().expect("timeline").clear();

    brokers.set_lagging("orders-0", true);
    brokers.set_lagging("orders-1", true);
    edit(&api, |bg| bg["spec"]["replicas"] = json!(2));
    run(&api, &ctx, "orders").await.expect("reconcile");
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 3, "the master's pod is kept");
    assert!(steps(&brokers).is_empty());
    let bg = stored_group(&api, "orders");
    let (_, reason, message) = condition(&bg, "Progressing");
    assert_eq!(reason, "WaitingForSync");
    assert!(
        message.starts_with("scale-down held: master orders-2 is on ordinal 2"),
        "{message}"
    );

    brokers.set_lagging("orders-1", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert_eq!(
        steps(&brokers),
        ["switchover admin-orders-2 -> admin-orders-1 epoch 2"]
    );
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(
        sts["spec"]["replicas"], 3,
        "not yet: the switchover came first"
    );
    let bg = stored_group(&api, "orders");
    assert_eq!(
        bg.status.as_ref().and_then(|s| s.master.as_deref()),
        Some("orders-1")
    );
    assert_eq!(condition(&bg, "Progressing").1, "ScaleDown");

    // orders-0 is told to follow the new master, but still lags.
    run(&api, &ctx, "orders").await.expect("reconcile");
    run(&api, &ctx, "orders").await.expect("reconcile");
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 3, "held while orders-0 lags");
    let bg = stored_group(&api, "orders");
    let (_, reason, message) = condition(&bg, "Progressing");
    assert_eq!(reason, "WaitingForSync");
    assert_eq!(
        message,
        "scale-down to 2 held at 3 pods: orders-0 is not in sync with master orders-1"
    );

    brokers.set_lagging("orders-0", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 2, "shrinks once the master stays");
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"],
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );
    api
}

/// Scaling 3 -> 2 while a slave that stays lags (Sync): `orders-2` may hold
/// the only copy of acknowledged records besides the master's, so the
/// StatefulSet keeps it until `orders-1` is in sync; Progressing says why.
#[tokio::test]
async fn scale_down_waits_until_the_slaves_that_stay_are_in_sync() {
    let (ctx, api, brokers) = healthy_group().await;
    brokers.set_lagging("orders-1", true);
    edit(&api, |bg| bg["spec"]["replicas"] = json!(2));
    for _ in 0..2 {
        run(&api, &ctx, "orders").await.expect("reconcile");
        let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
        assert_eq!(sts["spec"]["replicas"], 3, "held while orders-1 lags");
    }
    let bg = stored_group(&api, "orders");
    let (status, reason, message) = condition(&bg, "Progressing");
    assert_eq!(
        (status.as_str(), reason.as_str(), message.as_str()),
        (
            "True",
            "WaitingForSync",
            "scale-down to 2 held at 3 pods: orders-1 is not in sync with master orders-0"
        )
    );
    assert!(steps(&brokers).is_empty());

    brokers.set_lagging("orders-1", false);
    run(&api, &ctx, "orders").await.expect("reconcile");
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(
        sts["spec"]["replicas"], 2,
        "shrinks once orders-1 is in sync"
    );
}

/// `orders` (three brokers, replicas tracked) bootstrapped and healthy,
/// with `orders-2`, the fullest, as master.
async fn three_with_master_on_the_last() -> (Arc<Context>, FakeApi, FakeBrokers) {
    let (ctx, api, brokers) = harness("orders", 3);
    brokers.track_replication();
    api.insert(serde_json::to_value(group("orders", json!({"replicas": 3}))).expect("json"));
    run(&api, &ctx, "orders").await.expect("creates");
    for i in 0..3 {
        api.pod_from_stateful_set(NS, "orders", i, true);
        brokers.add(
            &format!("admin-orders-{i}"),
            &format!("orders-{i}"),
            100 + 100 * i as u64,
        );
    }
    run(&api, &ctx, "orders").await.expect("bootstrap");
    run(&api, &ctx, "orders").await.expect("healthy");
    (ctx, api, brokers)
}

/// A hand-over that fails (the switchover call errs) leaves the old master
/// recorded as master, in the raised epoch: the StatefulSet of a scale-down
/// keeps its pod, and the next reconcile makes it master again.
#[tokio::test]
async fn a_failed_hand_over_records_the_old_master_again() {
    let (ctx, api, brokers) = three_with_master_on_the_last().await;
    let st = stored_group(&api, "orders").status.expect("status");
    assert_eq!((st.master.as_deref(), st.epoch), (Some("orders-2"), 1));
    let last_failover = st.last_failover.clone();

    *brokers.switchover_error.lock().expect("switchover") =
        Some("DeadlineExceeded: timeout expired".into());
    edit(&api, |bg| bg["spec"]["replicas"] = json!(2));
    let err = run(&api, &ctx, "orders")
        .await
        .expect_err("the hand-over fails");
    assert!(
        matches!(
            err,
            crate::Error::Admin {
                op: "switchover",
                ..
            }
        ),
        "{err}"
    );
    let st = stored_group(&api, "orders").status.expect("status");
    assert_eq!(
        (st.master.as_deref(), st.epoch),
        (Some("orders-2"), 2),
        "the old master again, in the raised epoch"
    );
    assert_eq!(st.master_store_id.as_deref(), Some("store-orders-2"));
    assert_eq!(st.last_failover, last_failover, "no hand-over is recorded");

    run(&api, &ctx, "orders").await.expect("reconcile");
    let sts = api.get("apps", "statefulsets", NS, "orders").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 3, "the master's pod is kept");
    let st = stored_group(&api, "orders").status.expect("status");
    assert_eq!(st.master.as_deref(), Some("orders-2"));
    assert!(
        brokers
            .timeline
            .lock()
            .expect("timeline")
            .contains(&"promote admin-orders-2 epoch 3".to_string()),
        "the old master is made master again in a newer epoch"
    );
}

/// The admin client waits for a switchover's answer longer than the broker
/// is asked to wait for its slave: giving up first would drop the call
/// halfway, with the old master refusing writes.
#[test]
fn the_switchover_call_outlasts_the_wait_it_asks_for() {
    let admin = crate::brokers::GrpcAdmin::default();
    let req = keelmq_proto::admin::SwitchoverRequest {
        timeout_ms: crate::failover::SWITCHOVER_WAIT_MS,
        ..Default::default()
    };
    assert!(admin.switchover_timeout(&req) > Duration::from_millis(req.timeout_ms));
    assert!(
        admin.switchover_timeout(&req) >= admin.timeout + Duration::from_millis(req.timeout_ms)
    );
}

/// The detection delay runs from the time recorded in status: a fresh
/// operator whose status says the master has been unready for a minute
/// fails over at once; one that says five seconds waits, keeping the
/// recorded start; with no record the start is recorded.
#[tokio::test]
async fn detection_delay_start_survives_an_operator_restart() {
    async fn with_since(since: Option<jiff::Timestamp>) -> (FakeApi, FakeBrokers) {
        let (ctx, api, brokers) = harness("pay", 3);
        let mut bg = serde_json::to_value(group("pay", json!({"replicas": 3}))).expect("json");
        bg["status"] = json!({"master": "pay-0", "epoch": 1});
        if let Some(t) = since {
            bg["status"]["masterUnready"] = json!({"master": "pay-0", "since": t.to_string()});
        }
        api.insert(bg);
        api.insert(pod("pay", 0, false));
        for i in 1..3 {
            api.insert(pod("pay", i, true));
            brokers.add(&format!("admin-pay-{i}"), &format!("pay-{i}"), 10);
            brokers.with(&format!("admin-pay-{i}"), |b| b.status.epoch = 1);
        }
        let bg: BrokerGroup =
            serde_json::from_value(api.get("keelmq.io", "brokergroups", NS, "pay").expect("bg"))
                .expect("BrokerGroup");
        tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(bg), ctx))
            .await
            .expect("finishes")
            .expect("reconcile");
        (api, brokers)
    }
    let stored_pay = |api: &FakeApi| -> BrokerGroup {
        serde_json::from_value(api.get("keelmq.io", "brokergroups", NS, "pay").expect("bg"))
            .expect("BrokerGroup")
    };
    let now = jiff::Timestamp::now();

    let long_ago = now - jiff::SignedDuration::from_secs(60);
    let (api, brokers) = with_since(Some(long_ago)).await;
    let st = stored_pay(&api).status.expect("status");
    assert_eq!(st.master.as_deref(), Some("pay-1"), "failed over at once");
    assert!(
        st.last_failover
            .is_some_and(|f| f.reason.starts_with("the master has been unready for")),
    );
    assert!(st.master_unready.is_none(), "cleared with the new master");
    assert!(
        brokers
            .timeline
            .lock()
            .expect("timeline")
            .contains(&"promote admin-pay-1 epoch 2".to_string())
    );

    let recent = now - jiff::SignedDuration::from_secs(5);
    let (api, brokers) = with_since(Some(recent)).await;
    let bg = stored_pay(&api);
    let st = bg.status.clone().expect("status");
    assert_eq!(
        st.master.as_deref(),
        Some("pay-0"),
        "still within the delay"
    );
    assert_eq!(
        st.master_unready.map(|u| u.since.0.as_second()),
        Some(recent.as_second()),
        "the recorded start is kept (status times have whole seconds)"
    );
    assert_eq!(condition(&bg, "Ready").1, "MasterUnready");
    assert!(
        !brokers
            .timeline
            .lock()
            .expect("timeline")
            .iter()
            .any(|e| e.starts_with("promote"))
    );

    let (api, _) = with_since(None).await;
    let st = stored_pay(&api).status.expect("status");
    let u = st.master_unready.expect("the start is recorded");
    assert_eq!(u.master, "pay-0");
    assert!(u.since.0.as_second() >= now.as_second());
}

#[tokio::test]
async fn a_template_change_rolls_slaves_then_switches_over_then_the_old_master() {
    template_change().await;
}

#[tokio::test]
async fn the_restart_annotation_rolls_once_every_slave_is_in_sync() {
    restart_annotation_waits_for_sync().await;
}

#[tokio::test]
async fn a_restarted_operator_resumes_the_roll_from_status() {
    resume_after_operator_restart().await;
}

#[tokio::test]
async fn scale_down_hands_the_master_over_before_removing_its_pod() {
    scale_down_moves_the_master().await;
}

/// Sets every pod's Ready condition as its broker's `/readyz` would: a
/// master or a standby once it answers, a slave following a master only
/// while that master is up and lists it connected and in sync.
fn mirror_broker_readiness(api: &FakeApi, brokers: &FakeBrokers) {
    use keelmq_proto::admin::Role;
    for i in 0..3 {
        let name = format!("orders-{i}");
        let Some(mut p) = api.get("", "pods", NS, &name) else {
            continue;
        };
        let ready = {
            let all = brokers.brokers.lock().expect("brokers");
            let repl = brokers.replication.lock().expect("replication");
            let master_up = |addr: &str| {
                all.values().any(|m| {
                    m.up && m.status.role == Role::Master as i32
                        && format!("repl-{}", m.status.broker_id) == addr
                })
            };
            match all.get(&format!("admin-{name}")) {
                Some(b) if b.up => {
                    let s = &b.status;
                    s.role == Role::Master as i32
                        || s.master_address.is_empty()
                        || (master_up(&s.master_address)
                            && !repl.lagging.contains(&name)
                            && !repl.disconnected.contains(&name))
                }
                _ => false,
            }
        };
        let want = json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
        if p["status"]["conditions"] != want {
            p["status"]["conditions"] = want;
            api.insert(p);
        }
    }
}

/// A roll where the brokers' pods are Ready as their `/readyz` says: each
/// restarted broker comes back in standby (ready), is told to follow, and is
/// then unready while it catches up. The roll waits for it each time, the
/// master's switchover included, and never deadlocks: it goes on once the
/// broker is in sync, and ends.
#[tokio::test]
async fn a_roll_waits_for_each_restarted_broker_to_catch_up_and_ends() {
    let (ctx, api, brokers) = healthy_group().await;
    mirror_broker_readiness(&api, &brokers);
    edit(&api, |bg| {
        bg["spec"]["image"] = json!("keelmq/broker:0.2.0")
    });
    let mut held = Vec::new();
    let mut done = false;
    for _ in 0..60 {
        run(&api, &ctx, "orders").await.expect("reconcile");
        mirror_broker_readiness(&api, &brokers);
        if let Some(i) = (0..3).find(|i| api.get("", "pods", NS, &format!("orders-{i}")).is_none())
        {
            // The StatefulSet recreates the pod; the broker restarts far
            // behind the master.
            api.pod_from_stateful_set(NS, "orders", i, false);
            brokers.restart(&format!("admin-orders-{i}"));
            brokers.set_lagging(&format!("orders-{i}"), true);
            mirror_broker_readiness(&api, &brokers);
            continue;
        }
        let catching_up: Vec<String> = (0..3)
            .map(|i| format!("orders-{i}"))
            .filter(|n| brokers.replication.lock().expect("r").lagging.contains(n))
            .filter(|n| {
                brokers.with(&format!("admin-{n}"), |b| {
                    !b.status.master_address.is_empty()
                })
            })
            .collect();
        for name in catching_up {
            let pod = api.get("", "pods", NS, &name).expect("pod");
            assert_eq!(
                pod["status"]["conditions"][0]["status"], "False",
                "{name} is not ready while it catches up"
            );
            let before = steps(&brokers);
            run(&api, &ctx, "orders").await.expect("reconcile");
            assert_eq!(
                steps(&brokers),
                before,
                "nothing is restarted or handed over while {name} catches up"
            );
            let (_, reason, message) = condition(&stored_group(&api, "orders"), "Progressing");
            assert!(
                reason == "WaitingForSync" || reason == "CatchingUp",
                "{reason}: {message}"
            );
            held.push(name.clone());
            brokers.set_lagging(&name, false);
            mirror_broker_readiness(&api, &brokers);
        }
        let bg = stored_group(&api, "orders");
        let hash = template_hash(&api);
        let all_new = (0..3).all(|i| pod_hash(&api, &format!("orders-{i}")) == Some(hash.clone()));
        if all_new && bg.status.as_ref().is_some_and(|s| s.rollout.is_none()) {
            done = true;
            break;
        }
    }
    assert!(
        done,
        "the roll did not end: {:?}",
        stored_group(&api, "orders").status
    );
    assert_eq!(steps(&brokers), ROLL_OF_THREE);
    assert_eq!(held, ["orders-2", "orders-1", "orders-0"]);
    let bg = stored_group(&api, "orders");
    assert_eq!(condition(&bg, "Ready").0, "True");
    assert_eq!(
        bg.status.and_then(|s| s.master),
        Some("orders-1".to_string())
    );
}

/// A hand-over stops the master's writes while it waits for its target, so
/// one that keeps failing is not tried again every few seconds: after a
/// failure the next attempt waits (10 s, doubled with each failure in a
/// row, at most 5 minutes); one that succeeds clears the record.
#[tokio::test]
async fn a_failing_hand_over_is_tried_again_only_after_a_wait() {
    use crate::failover::switchover_backoff;
    let (ctx, api, brokers) = three_with_master_on_the_last().await;
    *brokers.switchover_error.lock().expect("switchover") =
        Some("DeadlineExceeded: timeout expired".into());
    edit(&api, |bg| bg["spec"]["replicas"] = json!(2));
    run(&api, &ctx, "orders")
        .await
        .expect_err("the hand-over fails");
    for _ in 0..3 {
        run(&api, &ctx, "orders").await.expect("reconcile");
    }
    let attempts = |brokers: &FakeBrokers| {
        brokers
            .timeline
            .lock()
            .expect("timeline")
            .iter()
            .filter(|e| e.starts_with("switchover") || e.starts_with("failed switchover"))
            .count()
    };
    assert_eq!(attempts(&brokers), 1, "not tried again during the wait");
    let key = format!("{NS}/orders");
    let failures = ctx.switchover_failures.lock().expect("failures")[&key].clone();
    assert_eq!(failures.count, 1);

    // Once the wait is over (here: the failure is made an hour old) it is
    // tried again; it succeeds and the record goes.
    *brokers.switchover_error.lock().expect("switchover") = None;
    if let Some(f) = ctx
        .switchover_failures
        .lock()
        .expect("failures")
        .get_mut(&key)
    {
        f.last = f
            .last
            .checked_sub(Duration::from_secs(3600))
            .expect("an hour ago");
    }
    run(&api, &ctx, "orders").await.expect("reconcile");
    assert_eq!(attempts(&brokers), 2, "tried again after the wait");
    assert!(
        !ctx.switchover_failures
            .lock()
            .expect("failures")
            .contains_key(&key)
    );
    let st = stored_group(&api, "orders").status.expect("status");
    assert_ne!(st.master.as_deref(), Some("orders-2"), "handed over");

    let first = Duration::from_secs(10);
    let waits: Vec<u64> = (1..=7)
        .map(|n| switchover_backoff(first, n).as_secs())
        .collect();
    assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
}
