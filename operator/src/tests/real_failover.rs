//! Failover with real `keelmq-broker` processes standing in for the pods
//! (Kubernetes is the mock API server): two brokers start in standby, the
//! operator makes one master, acknowledged SYNC sends go in, the master is
//! killed with SIGKILL and its pod turns unready, the operator promotes the
//! slave, moves the labels and records the failover; nothing acknowledged is
//! missing on the new master; the old master restarts and is made to follow.
//!
//! Needs the broker binary (`cargo build --workspace --bins` first, as CI does).

use std::sync::Arc;
use std::time::Duration;

use keelmq_crds::BrokerGroup;
use keelmq_proto::rocketmq::v2 as mq;
use keelmq_proto::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use keelmq_tests::{BrokerProcess, free_port};
use serde_json::json;

use super::{group, pod};
use crate::brokers::{BrokerAdmin, GrpcAdmin, StaticAddresses};
use crate::controller::{Context, reconcile};
use crate::metrics::Metrics;
use crate::testing::FakeApi;

const NS: &str = "ns";

fn broker_args(id: &str) -> Vec<String> {
    [
        "--role",
        "standby",
        "--broker-name",
        "orders",
        "--broker-id",
        id,
        "--replication-mode",
        "sync",
        "--min-in-sync-replicas",
        "1",
        "--flush-mode",
        "SYNC_FLUSH",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(dir: &std::path::Path, ports: (u16, u16, u16, u16), id: &str) -> BrokerProcess {
    let args = broker_args(id);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    BrokerProcess::start_on(dir, ports, &refs)
}

fn stored(api: &FakeApi) -> BrokerGroup {
    serde_json::from_value(
        api.get("keelmq.io", "brokergroups", NS, "orders")
            .expect("stored"),
    )
    .expect("BrokerGroup")
}

async fn reconcile_until(
    api: &FakeApi,
    ctx: &Arc<Context>,
    what: &str,
    done: impl Fn(&BrokerGroup) -> bool,
) -> BrokerGroup {
    for _ in 0..120 {
        let bg = stored(api);
        if done(&bg) {
            return bg;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(15),
            reconcile(Arc::new(bg), ctx.clone()),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "gave up waiting for: {what}; status {:?}",
        stored(api).status
    );
}

fn resource(name: &str) -> Option<mq::Resource> {
    Some(mq::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

/// Sends `n` messages; returns how many the broker acknowledged (code OK).
async fn send(endpoint: &str, n: usize, tag: &str) -> usize {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to master");
    let mut c = MessagingServiceClient::new(ch);
    let mut acked = 0;
    for i in 0..n {
        let mut req = tonic::Request::new(mq::SendMessageRequest {
            messages: vec![mq::Message {
                topic: resource("orders-created"),
                user_properties: Default::default(),
                system_properties: Some(mq::SystemProperties {
                    message_id: format!("{tag}-{i}"),
                    message_type: mq::MessageType::Normal as i32,
                    ..Default::default()
                }),
                body: format!("{tag} {i}").into_bytes().into(),
            }],
        });
        req.metadata_mut().insert(
            "x-mq-client-id",
            "operator-test@1#1".parse().expect("header"),
        );
        if let Ok(r) = c.send_message(req).await
            && r.into_inner().status.map(|s| s.code) == Some(mq::Code::Ok as i32)
        {
            acked += 1;
        }
    }
    acked
}

/// Messages the broker at `admin` holds in the topic.
async fn held(admin: &GrpcAdmin, addr: &str) -> u64 {
    let info = admin
        .describe_topic(addr, "orders-created")
        .await
        .expect("describe")
        .expect("topic exists");
    info.queues.iter().map(|q| q.max_offset).sum()
}

fn role_label(api: &FakeApi, pod: &str) -> Option<String> {
    api.get("", "pods", NS, pod)?["metadata"]["labels"]["keelmq.io/role"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_slave_promoted_nothing_acknowledged_lost_old_master_follows() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEELMQ_TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("keelmq_operator=info")),
        )
        .with_test_writer()
        .try_init();
    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let ports: Vec<(u16, u16, u16, u16)> = (0..2)
        .map(|_| (free_port(), free_port(), free_port(), free_port()))
        .collect();
    let mut procs: Vec<Option<BrokerProcess>> = (0..2)
        .map(|i| Some(start(dirs[i].path(), ports[i], &format!("orders-{i}"))))
        .collect();

    let (client, api) = FakeApi::start();
    let mut addresses = StaticAddresses::default();
    for (i, p) in ports.iter().enumerate() {
        addresses.pods.insert(
            format!("orders-{i}"),
            (format!("127.0.0.1:{}", p.1), format!("127.0.0.1:{}", p.3)),
        );
    }
    let admin = GrpcAdmin::default();
    let ctx = Arc::new(Context::with_brokers(
        client,
        Arc::new(Metrics::default()),
        Arc::new(admin.clone()),
        Arc::new(addresses.clone()),
    ));
    api.insert(
        serde_json::to_value(group(
            "orders",
            json!({"failover": {"detectionDelaySeconds": 1}}),
        ))
        .expect("json"),
    );
    api.insert(pod("orders", 0, true));
    api.insert(pod("orders", 1, true));

    // The operator chooses the first master.
    let bg = reconcile_until(&api, &ctx, "a first master, Ready", |bg| {
        bg.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;
    let first = bg
        .status
        .as_ref()
        .and_then(|s| s.master.clone())
        .expect("master");
    let first_i: usize = if first == "orders-0" { 0 } else { 1 };
    let other_i = 1 - first_i;
    let other = format!("orders-{other_i}");
    assert_eq!(role_label(&api, &first).as_deref(), Some("master"));
    assert_eq!(role_label(&api, &other).as_deref(), Some("slave"));

    // Acknowledged SYNC sends.
    let master_admin = format!("127.0.0.1:{}", ports[first_i].1);
    admin
        .create_topic(
            &master_admin,
            keelmq_proto::admin::CreateTopicRequest {
                name: "orders-created".into(),
                queue_count: 1,
                message_type: keelmq_proto::admin::MessageType::Normal as i32,
            },
        )
        .await
        .expect("create topic");
    let endpoint = format!("127.0.0.1:{}", ports[first_i].0);
    let acked = send(&endpoint, 100, "before").await as u64;
    assert_eq!(
        acked, 100,
        "with the slave in sync every send is acknowledged"
    );
    // Where the master's log ended after the last acknowledged send.
    let acked_end = admin
        .status(&master_admin)
        .await
        .expect("status")
        .max_offset;
    assert!(acked_end > 0);

    // The master dies; its pod turns unready (what the kubelet would report).
    procs[first_i].take().expect("running").kill();
    api.insert(pod("orders", first_i as i32, false));

    let bg = reconcile_until(&api, &ctx, "the slave promoted", |bg| {
        bg.status.as_ref().and_then(|s| s.master.as_deref()) == Some(other.as_str())
            && role_label(&api, &other).as_deref() == Some("master")
    })
    .await;
    let status = bg.status.expect("status");
    assert_eq!(status.epoch, 2);
    let last = status.last_failover.expect("failover recorded");
    assert_eq!(last.from.as_deref(), Some(first.as_str()));
    assert_eq!(last.to, other);
    assert_eq!(last.possible_loss, "no acknowledged message is lost");
    assert!(
        last.reason.starts_with("the master has been unready for"),
        "{}",
        last.reason
    );
    assert_eq!(role_label(&api, &first).as_deref(), Some("slave"));
    let new_admin = format!("127.0.0.1:{}", ports[other_i].1);
    let promoted = admin.status(&new_admin).await.expect("status");
    assert!(
        promoted.max_offset >= acked_end,
        "every acknowledged byte is on the new master: its log ends at {}, the old master's \
         at {acked_end} after the last acknowledged send",
        promoted.max_offset
    );

    // The old master comes back (standby, its old data) and is made to follow.
    procs[first_i] = Some(start(dirs[first_i].path(), ports[first_i], &first));
    api.insert(pod("orders", first_i as i32, true));
    let new_repl = format!("127.0.0.1:{}", ports[other_i].3);
    let old_admin = format!("127.0.0.1:{}", ports[first_i].1);
    reconcile_until(&api, &ctx, "the old master following", |bg| {
        bg.status.as_ref().is_some_and(|s| {
            s.replicas
                .iter()
                .any(|r| r.name == first && r.role == "slave" && r.reachable)
        })
    })
    .await;
    let st = admin.status(&old_admin).await.expect("status");
    assert_eq!(st.master_address, new_repl);

    // SYNC sends succeed again (they need the returned broker in sync). The
    // topic is created on the new master as the Topic controller would.
    if admin
        .describe_topic(&new_admin, "orders-created")
        .await
        .expect("describe")
        .is_none()
    {
        admin
            .create_topic(
                &new_admin,
                keelmq_proto::admin::CreateTopicRequest {
                    name: "orders-created".into(),
                    queue_count: 1,
                    message_type: keelmq_proto::admin::MessageType::Normal as i32,
                },
            )
            .await
            .expect("create topic");
    }
    let new_endpoint = format!("127.0.0.1:{}", ports[other_i].0);
    assert_eq!(send(&new_endpoint, 20, "after").await, 20);
    assert!(held(&admin, &new_admin).await >= 20);
    // Those SYNC sends were acknowledged only once the returned broker held
    // them: its log now has entries of epoch 2.
    let st = admin.status(&old_admin).await.expect("status");
    assert_eq!(st.epoch, 2);
    assert!(st.max_offset > acked_end);
}
