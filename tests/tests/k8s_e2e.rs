//! Opt-in end-to-end test of the operator on a real Kubernetes cluster
//! (kind, k3d or any other): skipped, saying why, unless
//! `KEELMQ_E2E_KUBECONFIG` names a kubeconfig.
//!
//! With it, the test installs (or updates) the CRDs from the crds crate,
//! runs the operator in this process against the cluster, applies a
//! three-broker SYNC BrokerGroup and a Topic in a namespace of its own
//! (`KEELMQ_E2E_NAMESPACE`, default a fresh `keelmq-e2e-<random>` it creates
//! and deletes), waits for Ready, sends messages to the master through a
//! port-forward, deletes the master pod, waits for the operator to promote a
//! slave, and checks that every acknowledged message can be consumed from
//! the new master. Every wait is bounded; traffic on this side stays on
//! loopback (port-forwards through the API server).
//!
//! The operator runs outside the cluster, so it reaches each broker's admin
//! API through a port-forward too (the replication addresses it hands the
//! brokers stay the in-cluster DNS names). A planned switchover would pass a
//! loopback address to the master, so this test does not exercise one.
//!
//! `KEELMQ_E2E_IMAGE` sets the broker image (default: the image a
//! BrokerGroup gets when its spec names none); the cluster must be able to
//! pull it (for kind: `kind load docker-image`).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keelmq_crds::{BrokerGroup, Topic};
use keelmq_operator::brokers::{AddressBook, ClusterDns, GrpcAdmin};
use keelmq_operator::controller::{self, Context};
use keelmq_operator::metrics::Metrics;
use keelmq_operator::model::{ADMIN_PORT, CLIENT_PORT, GroupNames};
use keelmq_tests::rmq::RawClient;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, CustomResourceExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const GROUP: &str = "e2e";
const TOPIC: &str = "e2e-orders";
const MESSAGES: usize = 100;
const FIELD_MANAGER: &str = "keelmq-e2e";

type Outcome<T = ()> = Result<T, String>;

/// Why the test is skipped here, or `None` when it runs.
fn skip_reason() -> Option<&'static str> {
    match std::env::var_os("KEELMQ_E2E_KUBECONFIG") {
        Some(v) if !v.is_empty() => None,
        _ => Some(
            "KEELMQ_E2E_KUBECONFIG is not set; set it to a kubeconfig of a cluster (kind, k3d, ...) \
             to run the operator end-to-end test (see README.md)",
        ),
    }
}

/// A namespace name nobody else uses: `keelmq-e2e-<hex>`.
fn fresh_namespace() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "keelmq-e2e-{:08x}",
        nanos ^ std::process::id().rotate_left(16)
    )
}

#[test]
fn fresh_namespaces_are_valid_names() {
    let ns = fresh_namespace();
    assert!(ns.len() <= 63, "{ns}");
    assert!(
        ns.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
        "{ns}"
    );
}

#[tokio::test]
async fn an_unreadable_kubeconfig_is_reported_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing-kubeconfig");
    let err = client_from(&path).await.err().expect("no client");
    assert!(err.contains("missing-kubeconfig"), "{err}");
    std::fs::write(&path, "not: [a kubeconfig").expect("write");
    let err = client_from(&path).await.err().expect("no client");
    assert!(err.contains("missing-kubeconfig"), "{err}");
}

// Ignored (reported as skipped, never as passed) unless asked for with
// `--run-ignored`: it needs a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: set KEELMQ_E2E_KUBECONFIG and pass --run-ignored all (README.md)"]
async fn operator_fails_over_a_broker_group_on_a_real_cluster() {
    if let Some(why) = skip_reason() {
        panic!("{why}");
    }
    let path = std::env::var_os("KEELMQ_E2E_KUBECONFIG").unwrap_or_default();
    keelmq_operator::telemetry::init(keelmq_operator::telemetry::LogFormat::Text);
    let client = match client_from(std::path::Path::new(&path)).await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let (ns, created) = match std::env::var("KEELMQ_E2E_NAMESPACE") {
        Ok(ns) if !ns.is_empty() => (ns, false),
        _ => (fresh_namespace(), true),
    };
    let image = std::env::var("KEELMQ_E2E_IMAGE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(keelmq_crds::default_image);
    println!("e2e: namespace {ns}, broker image {image}");

    let mut tasks = Vec::new();
    let result = scenario(&client, &ns, created, &image, &mut tasks).await;
    for t in &tasks {
        t.abort();
    }
    let cleanup = cleanup(&client, &ns, created).await;
    if let Err(e) = result {
        panic!("end-to-end test failed: {e}");
    }
    if let Err(e) = cleanup {
        panic!("cleanup failed: {e}");
    }
}

async fn client_from(path: &std::path::Path) -> Outcome<Client> {
    let kc = Kubeconfig::read_from(path)
        .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

async fn scenario(
    client: &Client,
    ns: &str,
    create_namespace: bool,
    image: &str,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Outcome {
    install_crds(client).await?;
    if create_namespace {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let n = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &n)
            .await
            .map_err(|e| format!("creating namespace {ns}: {e}"))?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);

    // The operator, in this process; admin calls go through port-forwards.
    let mut admin = HashMap::new();
    for i in 0..3 {
        let pod = format!("{GROUP}-{i}");
        let (addr, task) = forward(pods.clone(), pod.clone(), ADMIN_PORT).await?;
        admin.insert(pod, addr.to_string());
        tasks.push(task);
    }
    let ctx = Arc::new(Context::with_brokers(
        client.clone(),
        Arc::new(Metrics::default()),
        Arc::new(GrpcAdmin::default()),
        Arc::new(Forwarded { admin }),
    ));
    let op_client = client.clone();
    let op_ns = ns.to_string();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = controller::run(op_client, Some(op_ns), ctx).await {
            eprintln!("e2e: operator stopped: {e}");
        }
    }));

    // A three-broker SYNC group and a topic.
    let groups: Api<BrokerGroup> = Api::namespaced(client.clone(), ns);
    let bg = json!({
        "apiVersion": "keelmq.io/v1alpha1",
        "kind": "BrokerGroup",
        "metadata": {"name": GROUP, "namespace": ns},
        "spec": {
            "replicas": 3,
            "image": image,
            "replication": {"mode": "Sync", "minInSyncReplicas": 1},
            "flushMode": "SyncFlush",
            "failover": {"enabled": true, "detectionDelaySeconds": 5},
            "storage": {"size": "1Gi", "whenDeleted": "Delete", "whenScaled": "Delete"},
        }
    });
    groups
        .patch(
            GROUP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&bg),
        )
        .await
        .map_err(|e| format!("applying BrokerGroup: {e}"))?;
    let topics: Api<Topic> = Api::namespaced(client.clone(), ns);
    let topic = json!({
        "apiVersion": "keelmq.io/v1alpha1",
        "kind": "Topic",
        "metadata": {"name": TOPIC, "namespace": ns},
        "spec": {"brokerGroup": GROUP, "queues": 1},
    });
    topics
        .patch(
            TOPIC,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&topic),
        )
        .await
        .map_err(|e| format!("applying Topic: {e}"))?;

    let ready = wait_for(
        "the BrokerGroup to be Ready",
        Duration::from_secs(300),
        || async {
            let bg = groups.get(GROUP).await.ok()?;
            let st = bg.status?;
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && st.master.is_some()).then_some(st)
        },
    )
    .await?;
    let master = ready.master.clone().unwrap_or_default();
    println!("e2e: ready; master {master}, epoch {}", ready.epoch);
    wait_for(
        "the Topic to be Ready",
        Duration::from_secs(120),
        || async {
            let t = topics.get(TOPIC).await.ok()?;
            t.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await?;

    // Acknowledged sends to the master.
    let (addr, task) = forward(pods.clone(), master.clone(), CLIENT_PORT).await?;
    tasks.push(task);
    let mut producer = RawClient::new(&addr.to_string());
    let mut acked = BTreeSet::new();
    for i in 0..MESSAGES {
        let body = format!("e2e-{i}");
        for _ in 0..3 {
            if producer
                .send(TOPIC, 0, body.clone().into_bytes(), HashMap::new())
                .await
                .is_ok()
            {
                acked.insert(body.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    println!("e2e: {} of {MESSAGES} sends acknowledged", acked.len());
    if acked.len() < MESSAGES / 2 {
        return Err(format!(
            "only {} of {MESSAGES} sends were acknowledged by a healthy group",
            acked.len()
        ));
    }

    // The master pod is deleted; the operator promotes a slave.
    pods.delete(&master, &DeleteParams::default())
        .await
        .map_err(|e| format!("deleting master pod {master}: {e}"))?;
    println!("e2e: deleted master pod {master}");
    let promoted = wait_for(
        "a slave to be promoted",
        Duration::from_secs(180),
        || async {
            let st = groups.get(GROUP).await.ok()?.status?;
            (st.master.as_deref() != Some(master.as_str()) && st.epoch > ready.epoch).then_some(st)
        },
    )
    .await?;
    let new_master = promoted.master.clone().unwrap_or_default();
    let record = promoted
        .last_failover
        .ok_or("no failover recorded in status")?;
    println!(
        "e2e: {new_master} promoted in epoch {} ({}; {})",
        promoted.epoch, record.reason, record.possible_loss
    );
    if record.possible_loss != "no acknowledged message is lost" {
        return Err(format!("a SYNC failover reported {}", record.possible_loss));
    }

    // Every acknowledged message is on the new master.
    let (addr, task) = forward(pods.clone(), new_master.clone(), CLIENT_PORT).await?;
    tasks.push(task);
    let mut consumer = RawClient::new(&addr.to_string());
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !acked.is_subset(&seen) && Instant::now() < deadline {
        match consumer
            .receive(
                "e2e-check",
                TOPIC,
                32,
                Duration::from_secs(60),
                Duration::from_secs(2),
            )
            .await
        {
            Ok(got) => {
                for m in &got {
                    seen.insert(String::from_utf8_lossy(&m.body).into_owned());
                }
                let _ = consumer.ack("e2e-check", TOPIC, &got).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
    let missing: Vec<&String> = acked.difference(&seen).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} acknowledged messages are not on the new master {new_master}, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        ));
    }
    println!(
        "e2e: all {} acknowledged messages consumed from {new_master}",
        acked.len()
    );
    Ok(())
}

/// Applies both CRDs and waits until the API server serves them.
async fn install_crds(client: &Client) -> Outcome {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [BrokerGroup::crd(), Topic::crd()] {
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or("a generated CRD has no name")?;
        crds.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| format!("applying CRD {name}: {e}"))?;
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| format!("CRD {name} not established within 60 s"))?
        .map_err(|e| format!("waiting for CRD {name}: {e}"))?;
    }
    Ok(())
}

/// Deletes the BrokerGroup (its objects go with it) and the namespace if
/// the test made it.
async fn cleanup(client: &Client, ns: &str, created: bool) -> Outcome {
    let groups: Api<BrokerGroup> = Api::namespaced(client.clone(), ns);
    let topics: Api<Topic> = Api::namespaced(client.clone(), ns);
    // The Topic's finalizer needs the operator, which is stopped: drop it.
    let unfinalize = json!({"metadata": {"finalizers": null}});
    let _ = topics
        .patch(TOPIC, &PatchParams::default(), &Patch::Merge(&unfinalize))
        .await;
    let _ = topics.delete(TOPIC, &DeleteParams::default()).await;
    let _ = groups.delete(GROUP, &DeleteParams::default()).await;
    if created {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .delete(ns, &DeleteParams::default())
            .await
            .map_err(|e| format!("deleting namespace {ns}: {e}"))?;
        println!("e2e: deleted namespace {ns}");
    }
    Ok(())
}

/// Polls `check` every two seconds until it gives a value or `limit` passes.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, check: F) -> Outcome<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("gave up waiting for {what} after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A loopback listener whose connections are forwarded to `port` of `pod`
/// through the API server. A connection made while the pod does not exist
/// is closed, which looks like an unreachable broker.
async fn forward(pods: Api<Pod>, pod: String, port: i32) -> Outcome<(SocketAddr, JoinHandle<()>)> {
    let port = u16::try_from(port).map_err(|_| format!("bad port {port}"))?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("binding a loopback port: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("loopback address: {e}"))?;
    let task = tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            let pods = pods.clone();
            let pod = pod.clone();
            tokio::spawn(async move {
                let Ok(mut pf) = pods.portforward(&pod, &[port]).await else {
                    return;
                };
                if let Some(mut remote) = pf.take_stream(port) {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
                pf.abort();
            });
        }
    });
    Ok((addr, task))
}

/// Admin addresses through port-forwards; replication addresses are the
/// in-cluster names the brokers use among themselves.
struct Forwarded {
    admin: HashMap<String, String>,
}

impl AddressBook for Forwarded {
    fn admin(&self, group: &GroupNames, pod: &str) -> String {
        self.admin
            .get(pod)
            .cloned()
            .unwrap_or_else(|| ClusterDns.admin(group, pod))
    }
    fn replication(&self, group: &GroupNames, pod: &str) -> String {
        ClusterDns.replication(group, pod)
    }
}
