//! Every object the model builds, checked field by field.

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::group;
use crate::Error;
use crate::model::*;
use crate::testing::{pod_spec, writable_mounts};

fn full() -> keelmq_crds::BrokerGroup {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/samples/brokergroup-full.yaml"
    ))
    .expect("sample");
    let mut bg: keelmq_crds::BrokerGroup = serde_yaml::from_str(&text).expect("parse");
    prepare_for_render(&mut bg);
    bg
}

#[test]
fn config_map_holds_a_broker_config_the_broker_accepts() {
    let bg = full();
    let cm = config_map(&bg).expect("cm");
    assert_eq!(cm.metadata.name.as_deref(), Some("payments-config"));
    let toml_text = &cm.data.as_ref().expect("data")[CONFIG_FILE];
    let parsed: keelmq_broker::config::BrokerConfig =
        toml::from_str(toml_text).expect("broker parses it");
    assert_eq!(parsed.broker_name, "payments");
    assert_eq!(parsed.data_dir.to_str(), Some(DATA_DIR));
    assert_eq!(parsed.min_in_sync_replicas, 1);
    assert_eq!(parsed.retention_hours, 24, "spec.config reaches the broker");
    assert!(toml_text.contains("role = \"standby\""));
    assert!(toml_text.contains("flush_mode = \"SYNC_FLUSH\""));
    assert!(toml_text.contains("replication_mode = \"sync\""));
    assert_eq!(
        parsed.slave_read,
        keelmq_broker::messaging::slave_reads::SlaveReadMode::Auto,
        "slaves serve reads by default"
    );
    let mut no_slave_reads = bg.clone();
    no_slave_reads.spec.read_from_slaves = false;
    let cm = config_map(&no_slave_reads).expect("cm");
    let parsed: keelmq_broker::config::BrokerConfig =
        toml::from_str(&cm.data.as_ref().expect("data")[CONFIG_FILE]).expect("parses");
    assert_eq!(
        parsed.slave_read,
        keelmq_broker::messaging::slave_reads::SlaveReadMode::Off
    );
    let owner = &cm.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.kind, "BrokerGroup");
    assert_eq!(owner.controller, Some(true));
}

#[test]
fn config_overrides_of_managed_or_unknown_keys_are_refused() {
    let bg = group("g", json!({"config": {"role": "master"}}));
    let e = config_map(&bg).expect_err("role is managed");
    assert!(
        matches!(&e, Error::InvalidSpec(m) if m.contains("config.role is set by the operator")),
        "{e}"
    );
    let bg = group("g", json!({"config": {"retention_hourz": 3}}));
    let e = config_map(&bg).expect_err("typo");
    assert!(
        matches!(&e, Error::InvalidSpec(m) if m.contains("retention_hourz")),
        "{e}"
    );
}

#[test]
fn services_select_the_right_pods() {
    let bg = full();
    let headless = headless_service(&bg).expect("svc");
    let hs = headless.spec.expect("spec");
    assert_eq!(headless.metadata.name.as_deref(), Some("payments-headless"));
    assert_eq!(hs.cluster_ip.as_deref(), Some("None"));
    assert_eq!(hs.publish_not_ready_addresses, Some(true));
    assert_eq!(hs.ports.as_ref().map(Vec::len), Some(4));
    assert!(!hs.selector.as_ref().expect("sel").contains_key(LABEL_ROLE));

    let client = client_service(&bg).expect("svc");
    assert_eq!(client.metadata.name.as_deref(), Some("payments"));
    let sel = client.spec.expect("spec").selector.expect("sel");
    assert_eq!(sel[LABEL_ROLE], "master");
    assert_eq!(sel[LABEL_INSTANCE], "payments");
    assert_eq!(sel[LABEL_NAME], "keelmq");
    assert_eq!(sel[LABEL_COMPONENT], "broker");

    let read = read_service(&bg).expect("svc");
    assert_eq!(read.metadata.name.as_deref(), Some("payments-read"));
    assert!(
        !read
            .spec
            .expect("spec")
            .selector
            .expect("sel")
            .contains_key(LABEL_ROLE)
    );
    let mut master_only = bg.clone();
    master_only.spec.read_from_slaves = false;
    let read = read_service(&master_only).expect("svc");
    assert_eq!(
        read.spec.expect("spec").selector.expect("sel")[LABEL_ROLE],
        "master"
    );
}

fn broker_container(sts: &k8s_openapi::api::apps::v1::StatefulSet) -> Container {
    sts.spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers[0]
        .clone()
}

#[test]
fn stateful_set_carries_the_spec() {
    let bg = full();
    let sts = stateful_set(&bg).expect("sts");
    let spec = sts.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("payments-headless"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref()),
        Some("OnDelete")
    );
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .expect("retention");
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    assert_eq!(retention.when_scaled.as_deref(), Some("Delete"));
    let claim = &spec.volume_claim_templates.as_ref().expect("vct")[0];
    let cs = claim.spec.as_ref().expect("claim spec");
    assert_eq!(cs.storage_class_name.as_deref(), Some("fast-ssd"));
    assert_eq!(
        cs.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("req")["storage"]
            .0,
        "50Gi"
    );

    let template = &spec.template;
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .expect("labels");
    assert_eq!(labels[LABEL_INSTANCE], "payments");
    assert!(
        !labels.contains_key(LABEL_ROLE),
        "the operator sets roles on pods, not the template"
    );
    let annotations = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .expect("ann");
    assert!(annotations.contains_key(ANNOTATION_CONFIG_HASH));
    let pod = template.spec.as_ref().expect("pod");
    assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        pod.node_selector.as_ref().expect("ns")["kubernetes.io/os"],
        "linux"
    );
    assert!(
        pod.affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .is_some()
    );
    assert_eq!(
        pod.security_context.as_ref().and_then(|s| s.run_as_user),
        Some(10001)
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("keelmq-brokers"));

    let c = broker_container(&sts);
    assert_eq!(c.image.as_deref(), Some("keelmq/broker:0.1.0"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [8081, 8082, 8083, 10912]);
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [("config", "/etc/keelmq"), ("data", "/var/lib/keelmq")]
    );
    let env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert!(env.contains(&("KEELMQ_CONFIG".into(), "/etc/keelmq/broker.toml".into())));
    assert!(env.contains(&(
        "KEELMQ_ADVERTISED_ADDRESS".into(),
        "$(POD_NAME).payments-headless.keelmq.svc".into()
    )));
    assert_eq!(
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests")["cpu"]
            .0,
        "500m"
    );
}

#[test]
fn a_config_change_or_restart_annotation_changes_the_pod_template() {
    let bg = group("g", json!({}));
    let hash = |bg: &keelmq_crds::BrokerGroup| {
        let sts = stateful_set(bg).expect("sts");
        serde_json::to_value(sts.spec.expect("spec").template.metadata).expect("json")["annotations"].clone()
    };
    let before = hash(&bg);
    let mut changed = bg.clone();
    changed
        .spec
        .config
        .insert("retention_hours".into(), json!(1));
    assert_ne!(
        hash(&changed)[ANNOTATION_CONFIG_HASH],
        before[ANNOTATION_CONFIG_HASH]
    );
    let mut restarted = bg.clone();
    restarted
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(
            keelmq_crds::ANNOTATION_RESTART.into(),
            "2026-11-25T20:00:00Z".into(),
        );
    assert_eq!(
        hash(&restarted)[keelmq_crds::ANNOTATION_RESTART],
        "2026-11-25T20:00:00Z"
    );
}

#[test]
fn the_template_hash_follows_every_template_change_and_only_those() {
    let bg = group("g", json!({}));
    let hash = |bg: &keelmq_crds::BrokerGroup| {
        template_hash(&stateful_set(bg).expect("sts"))
            .expect("hash")
            .to_string()
    };
    assert_eq!(hash(&bg), hash(&bg.clone()), "stable");
    let mut image = bg.clone();
    image.spec.image = Some("keelmq/broker:9".into());
    assert_ne!(hash(&image), hash(&bg));
    let mut pinned_to_default = bg.clone();
    pinned_to_default.spec.image = Some(keelmq_crds::default_image());
    assert_eq!(
        hash(&pinned_to_default),
        hash(&bg),
        "pinning the release the operator would pick restarts nobody"
    );
    let mut restarted = bg.clone();
    restarted
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(keelmq_crds::ANNOTATION_RESTART.into(), "now".into());
    assert_ne!(hash(&restarted), hash(&bg));
    let mut scaled = bg.clone();
    scaled.spec.replicas = 5;
    assert_eq!(hash(&scaled), hash(&bg), "scaling restarts nobody");
}

#[test]
fn the_stateful_set_keeps_the_masters_pod_until_it_moves() {
    let mut bg = group("g", json!({"replicas": 2}));
    assert_eq!(stateful_set_replicas(&bg).expect("n"), 2);
    bg.status = Some(keelmq_crds::BrokerGroupStatus {
        master: Some("g-3".into()),
        ..Default::default()
    });
    assert_eq!(stateful_set_replicas(&bg).expect("n"), 4);
    bg.status = Some(keelmq_crds::BrokerGroupStatus {
        master: Some("g-1".into()),
        ..Default::default()
    });
    assert_eq!(stateful_set_replicas(&bg).expect("n"), 2);
    bg.spec.replicas = 0;
    bg.status = None;
    assert_eq!(stateful_set_replicas(&bg).expect("n"), 1, "never below one");
    let names = GroupNames::of(&bg).expect("names");
    assert_eq!(names.ordinal("g-12"), Some(12));
    assert_eq!(names.ordinal("gx-1"), None);
    assert_eq!(names.ordinal("g-"), None);
}

#[test]
fn pod_disruption_budget_allows_one_broker_down() {
    let pdb = pod_disruption_budget(&full()).expect("pdb");
    let spec = pdb.spec.expect("spec");
    assert_eq!(
        spec.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        spec.selector.and_then(|s| s.match_labels).expect("labels")[LABEL_INSTANCE],
        "payments"
    );
}

#[test]
fn rendered_objects_have_kind_api_version_owner_and_labels() {
    let objects = desired_objects(&full(), &OperatorPeer::default()).expect("objects");
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Service",
            "Service",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "NetworkPolicy"
        ]
    );
    for o in &objects {
        assert!(o["apiVersion"].is_string());
        assert_eq!(o["metadata"]["namespace"], "keelmq");
        assert_eq!(o["metadata"]["labels"][LABEL_MANAGED_BY], "keelmq-operator");
        assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], "BrokerGroup");
    }
}

#[test]
fn an_object_without_namespace_or_uid_is_refused() {
    let mut bg = group("g", json!({}));
    bg.metadata.uid = None;
    assert!(matches!(
        config_map(&bg),
        Err(Error::MissingObjectKey("metadata.uid"))
    ));
    bg.metadata.namespace = None;
    assert!(matches!(
        config_map(&bg),
        Err(Error::MissingObjectKey("metadata.namespace"))
    ));
}

/// A PVC is mounted over the image's data directory and belongs to whoever
/// formatted it (often root): without an fsGroup the broker's user cannot
/// write it. Every pod gets the default context; the spec's fields are
/// merged over it one by one.
#[test]
fn broker_pods_get_a_default_security_context_the_spec_merges_over() {
    let pod = pod_spec(&group("g", json!({})));
    let sc = serde_json::to_value(pod.security_context.expect("set")).expect("json");
    assert_eq!(
        sc,
        json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"}
        })
    );

    let pod = pod_spec(&group(
        "g",
        json!({"podTemplate": {"securityContext": {
            "runAsUser": 10001,
            "fsGroup": 10001,
            "supplementalGroups": [5000],
            "seccompProfile": {"type": "Localhost", "localhostProfile": "keelmq.json"}
        }}}),
    ));
    let sc = serde_json::to_value(pod.security_context.expect("set")).expect("json");
    assert_eq!(
        sc,
        json!({
            "runAsNonRoot": true,
            "runAsUser": 10001,
            "runAsGroup": 65532,
            "fsGroup": 10001,
            "fsGroupChangePolicy": "OnRootMismatch",
            "supplementalGroups": [5000],
            "seccompProfile": {"type": "Localhost", "localhostProfile": "keelmq.json"}
        })
    );
    // An explicit false is the user's choice, not filled in.
    let pod = pod_spec(&group(
        "g",
        json!({"podTemplate": {"securityContext": {"runAsNonRoot": false, "fsGroupChangePolicy": "Always"}}}),
    ));
    let sc = pod.security_context.expect("set");
    assert_eq!(sc.run_as_non_root, Some(false));
    assert_eq!(sc.fs_group_change_policy.as_deref(), Some("Always"));
    assert_eq!(sc.fs_group, Some(65532));
}

/// What Pod Security "restricted" asks of a container, with a read-only
/// root filesystem: the broker writes only under its data volume (store,
/// metadata, generated TLS material in `<data>/tls`) and reads the config
/// mount.
#[test]
fn the_broker_container_runs_restricted() {
    let c = broker_container(&stateful_set(&group("g", json!({}))).expect("sts"));
    let sc = serde_json::to_value(c.security_context.as_ref().expect("set")).expect("json");
    assert_eq!(
        sc,
        json!({
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": true
        })
    );
    assert_eq!(
        writable_mounts(&c),
        [DATA_DIR],
        "the data volume is the only writable path"
    );
}

/// The store is opened (and recovered) before /healthz answers: the
/// liveness probe alone would restart a broker whose recovery takes more
/// than a minute, in a loop.
#[test]
fn a_startup_probe_gives_recovery_an_hour_before_liveness_counts() {
    let c = broker_container(&stateful_set(&group("g", json!({}))).expect("sts"));
    let startup = c.startup_probe.expect("startup probe");
    assert_eq!(
        startup.http_get.as_ref().and_then(|h| h.path.as_deref()),
        Some("/healthz")
    );
    let allowed = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(allowed >= 3600, "{allowed} s");
    let liveness = c.liveness_probe.expect("liveness");
    assert!(
        allowed > liveness.period_seconds.unwrap_or(10) * liveness.failure_threshold.unwrap_or(3)
    );
}

/// A master being stopped asks to hand over first (the broker's
/// `/prestop`), within a grace period longer than its 30 s wait; the pods
/// get no service-link variables; brokers listen on every address.
#[test]
fn broker_pods_hand_over_before_stopping_and_listen_everywhere() {
    let bg = group("g", json!({}));
    let sts = stateful_set(&bg).expect("sts");
    let c = broker_container(&sts);
    let hook = c
        .lifecycle
        .and_then(|l| l.pre_stop)
        .and_then(|h| h.http_get)
        .expect("a preStop HTTP hook");
    assert_eq!(hook.path.as_deref(), Some("/prestop"));
    assert_eq!(hook.port, IntOrString::Int(HTTP_PORT));
    let pod = pod_spec(&bg);
    let grace = pod.termination_grace_period_seconds.expect("grace period");
    assert!(
        grace > keelmq_broker::http::PRESTOP_HAND_OVER_WAIT.as_secs() as i64 + 10,
        "{grace} s"
    );
    assert_eq!(pod.enable_service_links, Some(false));
    let cm = config_map(&bg).expect("cm");
    let parsed: keelmq_broker::config::BrokerConfig =
        toml::from_str(&cm.data.as_ref().expect("data")[CONFIG_FILE]).expect("parses");
    assert_eq!(parsed.listen_address, "::");
}

/// With no image in the spec, the broker release matching the operator;
/// a pinned image stays.
#[test]
fn the_image_is_resolved_by_the_operator_unless_pinned() {
    let c = broker_container(&stateful_set(&group("g", json!({}))).expect("sts"));
    assert_eq!(c.image, Some(keelmq_crds::default_image()));
    assert_eq!(
        c.image.as_deref(),
        Some(concat!("keelmq/broker:", env!("CARGO_PKG_VERSION")))
    );
    let c = broker_container(
        &stateful_set(&group(
            "g",
            json!({"image": "registry.example.com/keelmq/broker:0.0.9"}),
        ))
        .expect("sts"),
    );
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/keelmq/broker:0.0.9")
    );
}

/// The admin and replication ports have no authentication: only the
/// group's own pods and the operator's pods reach them. Client and HTTP
/// ports stay open.
#[test]
fn the_network_policy_guards_admin_and_replication() {
    let peer = OperatorPeer {
        namespace: "keelmq-system".into(),
        pod_labels: parse_labels("app.kubernetes.io/name=keelmq,app.kubernetes.io/instance=keelmq")
            .expect("labels"),
    };
    let bg = full();
    let np = serde_json::to_value(network_policy(&bg, &peer).expect("np")).expect("json");
    assert_eq!(np["metadata"]["name"], "payments");
    assert_eq!(np["metadata"]["ownerReferences"][0]["kind"], "BrokerGroup");
    let spec = &np["spec"];
    let group_pods = json!({"matchLabels": {
        "app.kubernetes.io/component": "broker",
        "app.kubernetes.io/instance": "payments",
        "app.kubernetes.io/name": "keelmq"}});
    assert_eq!(spec["podSelector"], group_pods);
    assert_eq!(spec["policyTypes"], json!(["Ingress"]));
    let port = |p: i32| json!({"port": p, "protocol": "TCP"});
    assert_eq!(
        spec["ingress"],
        json!([
            {"ports": [port(CLIENT_PORT), port(HTTP_PORT)]},
            {"from": [
                {"podSelector": group_pods},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keelmq-system"}},
                 "podSelector": {"matchLabels": {
                     "app.kubernetes.io/instance": "keelmq",
                     "app.kubernetes.io/name": "keelmq"}}}
             ],
             "ports": [port(ADMIN_PORT), port(REPLICATION_PORT)]}
        ])
    );
    let mut off = bg.clone();
    off.spec.network_policy.enabled = false;
    let kinds: Vec<String> = desired_objects(&off, &peer)
        .expect("objects")
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!kinds.contains(&"NetworkPolicy".to_string()), "{kinds:?}");
}

#[test]
fn operator_pod_labels_parse() {
    assert_eq!(
        OperatorPeer::default().pod_labels,
        std::collections::BTreeMap::from([
            (
                "app.kubernetes.io/component".to_string(),
                "operator".to_string()
            ),
            ("app.kubernetes.io/name".to_string(), "keelmq".to_string()),
        ])
    );
    assert_eq!(parse_labels(" a=b , c=d ").expect("ok").len(), 2);
    assert!(parse_labels("").is_err());
    assert!(parse_labels("a").is_err());
    assert!(parse_labels("=b").is_err());
}

/// Sync with no in-sync slave acknowledges like Async and never fails over
/// safely: the broker refuses it, so the operator reports it as an invalid
/// spec (for groups stored before the CRD rule refused it).
#[test]
fn sync_with_no_in_sync_slave_is_an_invalid_spec() {
    let bg = group(
        "g",
        json!({"replicas": 3, "replication": {"mode": "Sync", "minInSyncReplicas": 0}}),
    );
    let e = config_map(&bg).expect_err("refused");
    assert!(
        matches!(&e, Error::InvalidSpec(m) if m.contains("min_in_sync_replicas")),
        "{e}"
    );
    let bg = group(
        "g",
        json!({"replicas": 3, "replication": {"mode": "Async", "minInSyncReplicas": 0}}),
    );
    config_map(&bg).expect("Async with 0 is fine");
}
