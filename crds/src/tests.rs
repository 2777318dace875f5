//! Tests of the resource types: the committed CRD YAML matches the types,
//! defaults fill in everything but the name, and the samples validate
//! against the generated schema.

use std::path::PathBuf;

use super::*;
use crate::schema_check::validate;

fn crate_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// The committed CRD YAML is what the types generate. `KEELMQ_BLESS=1`
/// rewrites the files instead of failing.
#[test]
fn committed_crd_yaml_matches_the_types() {
    let cases = [
        (
            "keelmq.io_brokergroups.yaml",
            brokergroup_crd_yaml().expect("yaml"),
        ),
        ("keelmq.io_topics.yaml", topic_crd_yaml().expect("yaml")),
    ];
    let bless = std::env::var("KEELMQ_BLESS").is_ok_and(|v| v == "1");
    for (file, generated) in cases {
        let path = crate_file(file);
        if bless {
            std::fs::write(&path, &generated).expect("write CRD yaml");
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from what the Rust types generate; regenerate it with \
             `KEELMQ_BLESS=1 cargo test -p keelmq-crds` (or `cargo run -p keelmq-operator -- crds`) \
             and commit the result (the Helm chart copies these files)",
            path.display()
        );
    }
}

#[test]
fn crds_are_in_the_keelmq_group_with_status_and_short_name() {
    let bg = BrokerGroup::crd();
    assert_eq!(bg.metadata.name.as_deref(), Some("brokergroups.keelmq.io"));
    assert_eq!(bg.spec.group, GROUP);
    assert_eq!(bg.spec.names.short_names, Some(vec!["bg".to_string()]));
    let v = &bg.spec.versions[0];
    assert_eq!(v.name, VERSION);
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    assert!(sub.scale.is_some(), "kubectl scale works on a BrokerGroup");
    let columns: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Master", "Epoch", "Ready", "Replicas", "Replication", "Age"]
    );
    let topic = Topic::crd();
    assert_eq!(topic.metadata.name.as_deref(), Some("topics.keelmq.io"));
    assert!(topic.spec.versions[0].subresources.is_some());
}

#[test]
fn an_empty_spec_gets_working_defaults() {
    let bg: BrokerGroup = serde_yaml::from_str(
        &std::fs::read_to_string(crate_file("samples/brokergroup-minimal.yaml")).expect("sample"),
    )
    .expect("parse");
    assert_eq!(bg.spec, BrokerGroupSpec::default());
    assert_eq!(bg.spec.replicas, 2);
    assert_eq!(bg.spec.image, None, "resolved by the operator, not stored");
    assert_eq!(
        bg.spec.broker_image(),
        format!("keelmq/broker:{}", env!("CARGO_PKG_VERSION"))
    );
    assert!(bg.spec.network_policy.enabled);
    assert_eq!(bg.spec.replication.mode, ReplicationMode::Sync);
    assert_eq!(bg.spec.replication.min_in_sync_replicas, 1);
    assert_eq!(bg.spec.storage.size.0, "10Gi");
    assert_eq!(bg.spec.storage.when_deleted, RetentionPolicy::Retain);
    assert!(bg.spec.failover.enabled);
    assert_eq!(bg.spec.failover.detection_delay_seconds, 15);
    assert!(!bg.spec.failover.allow_data_loss);
}

#[test]
fn the_schema_carries_the_same_defaults_as_the_types() {
    // The apiserver fills defaults from the schema; they must agree with
    // what serde fills in when a field is absent.
    let crd = serde_json::to_value(BrokerGroup::crd()).expect("json");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["default"], 2);
    assert_eq!(spec["replication"]["default"]["mode"], "Sync");
    assert_eq!(spec["failover"]["default"]["detectionDelaySeconds"], 15);
    assert_eq!(spec["storage"]["default"]["size"], "10Gi");
    assert_eq!(spec["flushMode"]["default"], "AsyncFlush");
    assert_eq!(spec["networkPolicy"]["default"]["enabled"], true);
}

/// The API server writes a schema default into every object it stores, so
/// a default image would pin each group to the release of the CRD it was
/// created under: an operator upgrade (Helm never updates CRDs) would move
/// no broker. The image has no schema default; the operator resolves it.
#[test]
fn the_image_has_no_schema_default_and_a_pinned_image_stays() {
    let crd = serde_json::to_value(BrokerGroup::crd()).expect("json");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(
        spec["properties"]["image"].get("default").is_none(),
        "{}",
        spec["properties"]["image"]
    );
    assert!(
        !spec["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|f| f == "image")),
        "image is optional"
    );
    // The spec-level default (an empty spec) names no image either.
    let spec_default =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["default"];
    assert!(spec_default.get("image").is_none(), "{spec_default}");
    let round_trip = serde_json::to_value(BrokerGroupSpec::default()).expect("json");
    assert!(round_trip.get("image").is_none(), "{round_trip}");
    let pinned = BrokerGroupSpec {
        image: Some("registry.example.com/keelmq/broker:0.0.9".into()),
        ..BrokerGroupSpec::default()
    };
    assert_eq!(
        pinned.broker_image(),
        "registry.example.com/keelmq/broker:0.0.9"
    );
}

#[test]
fn storage_class_and_size_are_immutable_by_cel_rule() {
    let crd = serde_json::to_value(BrokerGroup::crd()).expect("json");
    let storage = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["storage"];
    let rules = storage["x-kubernetes-validations"].to_string();
    assert!(rules.contains("oldSelf.storageClassName"), "{rules}");
    assert!(rules.contains("storageClassName is immutable"), "{rules}");
    let size_rules = storage["properties"]["size"]["x-kubernetes-validations"].to_string();
    assert!(size_rules.contains("self == oldSelf"), "{size_rules}");
    let root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
        .to_string();
    assert!(
        root.contains("minInSyncReplicas < self.spec.replicas"),
        "{root}"
    );
}

/// The CEL rules evaluated (kube's client-side CEL validator), creation and
/// transition rules alike, not only found in the schema.
#[test]
fn cel_rules_accept_and_refuse_what_they_say() {
    use kube::core::cel::Validator;
    let v = Validator::new();
    let check =
        |schema: &serde_json::Value,
         new: &serde_json::Value,
         old: Option<&serde_json::Value>|
         -> Result<(), String> { v.validate(schema, new, old).map_err(|e| e.to_string()) };

    let bg_schema = schema_of(&BrokerGroup::crd());
    let bg = |spec: serde_json::Value| {
        let mut full = serde_json::to_value(BrokerGroupSpec::default()).expect("json");
        json_merge(&mut full, &spec);
        serde_json::json!({"apiVersion": "keelmq.io/v1alpha1", "kind": "BrokerGroup",
            "metadata": {"name": "g"}, "spec": full})
    };
    // Creation: minInSyncReplicas must leave the master out in Sync mode.
    check(&bg_schema, &bg(serde_json::json!({"replicas": 3})), None).expect("defaults pass");
    let too_many = bg(serde_json::json!({"replicas": 2,
        "replication": {"mode": "Sync", "minInSyncReplicas": 2}}));
    let err = check(&bg_schema, &too_many, None).expect_err("refused");
    assert!(
        err.contains("minInSyncReplicas must be below replicas"),
        "{err}"
    );
    let async_ok = bg(serde_json::json!({"replicas": 2,
        "replication": {"mode": "Async", "minInSyncReplicas": 2}}));
    check(&bg_schema, &async_ok, None).expect("Async ignores minInSyncReplicas");
    // Sync with no in-sync slave acknowledges like Async and can never fail
    // over without risking loss: refused; Async with 0 is fine.
    let sync_zero = bg(serde_json::json!({"replicas": 3,
        "replication": {"mode": "Sync", "minInSyncReplicas": 0}}));
    let err = check(&bg_schema, &sync_zero, None).expect_err("Sync with 0 refused");
    assert!(
        err.contains("minInSyncReplicas must be at least 1 in Sync mode"),
        "{err}"
    );
    let async_zero = bg(serde_json::json!({"replicas": 3,
        "replication": {"mode": "Async", "minInSyncReplicas": 0}}));
    check(&bg_schema, &async_zero, None).expect("Async with 0 passes");

    // Transitions: storage size and class are fixed; other fields move.
    let old = bg(serde_json::json!({"storage": {"size": "10Gi", "storageClassName": "fast"}}));
    let grown = bg(serde_json::json!({"storage": {"size": "20Gi", "storageClassName": "fast"}}));
    let err = check(&bg_schema, &grown, Some(&old)).expect_err("size is fixed");
    assert!(err.contains("storage.size is immutable"), "{err}");
    let moved = bg(serde_json::json!({"storage": {"size": "10Gi", "storageClassName": "slow"}}));
    let err = check(&bg_schema, &moved, Some(&old)).expect_err("class is fixed");
    assert!(
        err.contains("storage.storageClassName is immutable"),
        "{err}"
    );
    let dropped = bg(serde_json::json!({"storage": {"size": "10Gi"}}));
    let err = check(&bg_schema, &dropped, Some(&old)).expect_err("class cannot be removed");
    assert!(
        err.contains("storage.storageClassName is immutable"),
        "{err}"
    );
    let scaled = bg(serde_json::json!({"replicas": 4,
        "storage": {"size": "10Gi", "storageClassName": "fast"}}));
    check(&bg_schema, &scaled, Some(&old)).expect("scaling and other changes pass");

    // Topics: queues only grow; group, name and type are fixed.
    let topic_schema = schema_of(&Topic::crd());
    let topic = |spec: serde_json::Value| {
        serde_json::json!({"apiVersion": "keelmq.io/v1alpha1", "kind": "Topic",
            "metadata": {"name": "t"}, "spec": spec})
    };
    let old = topic(serde_json::json!({"brokerGroup": "g", "queues": 8, "messageType": "Normal"}));
    let more =
        topic(serde_json::json!({"brokerGroup": "g", "queues": 16, "messageType": "Normal"}));
    check(&topic_schema, &more, Some(&old)).expect("queues grow");
    let fewer =
        topic(serde_json::json!({"brokerGroup": "g", "queues": 4, "messageType": "Normal"}));
    let err = check(&topic_schema, &fewer, Some(&old)).expect_err("queues shrink");
    assert!(err.contains("queues may only grow"), "{err}");
    let elsewhere =
        topic(serde_json::json!({"brokerGroup": "h", "queues": 8, "messageType": "Normal"}));
    let err = check(&topic_schema, &elsewhere, Some(&old)).expect_err("group is fixed");
    assert!(err.contains("brokerGroup is immutable"), "{err}");
    let fifo = topic(serde_json::json!({"brokerGroup": "g", "queues": 8, "messageType": "Fifo"}));
    let err = check(&topic_schema, &fifo, Some(&old)).expect_err("type is fixed");
    assert!(err.contains("messageType is immutable"), "{err}");
    // The broker's topic name is fixed too: changed, set or removed.
    let named = |name: &str| {
        topic(
            serde_json::json!({"brokerGroup": "g", "queues": 8, "messageType": "Normal",
            "topicName": name}),
        )
    };
    for (new, was) in [
        (named("b"), named("a")),
        (named("a"), old.clone()),
        (old.clone(), named("a")),
    ] {
        let err = check(&topic_schema, &new, Some(&was)).expect_err("name is fixed");
        assert!(err.contains("topicName is immutable"), "{err}");
    }
    check(&topic_schema, &named("a"), Some(&named("a"))).expect("same name passes");
    check(&topic_schema, &more, Some(&old)).expect("no name either side passes");
}

/// `spec.tls.secretName` must be a Secret name: the CEL rule refuses what
/// the API server would not accept as one, with a message naming the
/// field; the schema requires the name once `tls` is given and bounds its
/// length. Unset, `tls` stays out of the stored spec.
#[test]
fn tls_takes_a_valid_secret_name() {
    use kube::core::cel::Validator;
    let v = Validator::new();
    let schema = schema_of(&BrokerGroup::crd());
    let bg = |tls: serde_json::Value| {
        let mut spec = serde_json::to_value(BrokerGroupSpec::default()).expect("json");
        spec["tls"] = tls;
        serde_json::json!({"apiVersion": "keelmq.io/v1alpha1", "kind": "BrokerGroup",
            "metadata": {"name": "orders"}, "spec": spec})
    };
    for good in ["orders-tls", "orders.tls", "a", "0", "tls-2026.example"] {
        let obj = bg(serde_json::json!({"secretName": good}));
        v.validate(&schema, &obj, None)
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        assert!(validate(&schema, &obj).is_empty(), "{good}");
        let parsed: BrokerGroup = serde_json::from_value(obj).expect("parse");
        assert_eq!(
            parsed.spec.tls,
            Some(TlsSpec {
                secret_name: good.into()
            })
        );
    }
    for bad in [
        "",
        "Orders-TLS",
        "orders_tls",
        "-orders",
        "orders-",
        "orders..tls",
        ".orders",
        "orders/tls",
        "orders tls",
    ] {
        let err = v
            .validate(&schema, &bg(serde_json::json!({"secretName": bad})), None)
            .expect_err(bad)
            .to_string();
        assert!(
            err.contains("tls.secretName must be a Secret name"),
            "{bad:?}: {err}"
        );
    }
    let errors = validate(&schema, &bg(serde_json::json!({}))).join("\n");
    assert!(
        errors.contains("spec.tls.secretName: required field is missing"),
        "{errors}"
    );
    let errors = validate(
        &schema,
        &bg(serde_json::json!({"secretName": "a".repeat(254)})),
    )
    .join("\n");
    assert!(
        errors.contains("spec.tls.secretName: longer than 253 characters"),
        "{errors}"
    );
    assert!(
        validate(
            &schema,
            &bg(serde_json::json!({"secretName": "a".repeat(253)}))
        )
        .is_empty()
    );
    let errors = validate(
        &schema,
        &bg(serde_json::json!({"secretName": "t", "enabled": false})),
    )
    .join("\n");
    assert!(
        errors.contains("spec.tls.enabled: unknown field"),
        "there is no switch to turn TLS off: {errors}"
    );
    // Unset: no `tls` in the spec the operator reads or in the defaults.
    let round_trip = serde_json::to_value(BrokerGroupSpec::default()).expect("json");
    assert!(round_trip.get("tls").is_none(), "{round_trip}");
    let crd = serde_json::to_value(BrokerGroup::crd()).expect("json");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(spec["default"].get("tls").is_none(), "{}", spec["default"]);
    assert!(spec["properties"]["tls"].get("default").is_none());
}

/// JSON merge of `patch` into `target` (objects merged, the rest replaced).
fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        _ => *target = patch.clone(),
    }
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> serde_json::Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("json")
}

#[test]
fn samples_validate_against_the_generated_schema() {
    let bg_schema = schema_of(&BrokerGroup::crd());
    let topic_schema = schema_of(&Topic::crd());
    for (file, schema) in [
        ("samples/brokergroup-minimal.yaml", &bg_schema),
        ("samples/brokergroup-full.yaml", &bg_schema),
        ("samples/topic.yaml", &topic_schema),
    ] {
        let text = std::fs::read_to_string(crate_file(file)).expect("sample");
        let value: serde_json::Value = serde_yaml::from_str(&text).expect("yaml");
        let errors = validate(schema, &value);
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
    // And they parse into the types.
    let full: BrokerGroup = serde_yaml::from_str(
        &std::fs::read_to_string(crate_file("samples/brokergroup-full.yaml")).expect("sample"),
    )
    .expect("parse");
    assert_eq!(full.spec.replicas, 3);
    assert_eq!(full.spec.storage.when_scaled, RetentionPolicy::Delete);
    assert_eq!(full.spec.pod_template.tolerations.len(), 1);
    assert_eq!(full.spec.config["retention_hours"], 24);
}

#[test]
fn the_schema_rejects_what_it_should() {
    let schema = schema_of(&BrokerGroup::crd());
    let bad = serde_json::json!({
        "apiVersion": "keelmq.io/v1alpha1",
        "kind": "BrokerGroup",
        "metadata": {"name": "x"},
        "spec": {"replicas": 0, "replication": {"mode": "Eventually"}, "flushMode": 3}
    });
    let errors = validate(&schema, &bad).join("\n");
    assert!(errors.contains("spec.replicas"), "{errors}");
    assert!(errors.contains("spec.replication.mode"), "{errors}");
    assert!(errors.contains("spec.flushMode"), "{errors}");
    let topic_schema = schema_of(&Topic::crd());
    let no_group = serde_json::json!({"apiVersion": "keelmq.io/v1alpha1", "kind": "Topic",
        "metadata": {"name": "t"}, "spec": {"queues": 4}});
    let errors = validate(&topic_schema, &no_group).join("\n");
    assert!(errors.contains("brokerGroup"), "{errors}");
}

#[test]
fn status_round_trips() {
    let status = BrokerGroupStatus {
        master: Some("orders-1".into()),
        epoch: 3,
        ready_replicas: 2,
        replicas: vec![ReplicaStatus {
            name: "orders-0".into(),
            role: "slave".into(),
            ready: true,
            reachable: true,
            offset: 100,
            lag: 0,
            in_sync: true,
        }],
        ..Default::default()
    };
    let json = serde_json::to_value(&status).expect("json");
    assert_eq!(json["replicas"][0]["inSync"], true);
    assert_eq!(json["readyReplicas"], 2);
    let back: BrokerGroupStatus = serde_json::from_value(json).expect("back");
    assert_eq!(back, status);
}

#[test]
fn topic_name_defaults_to_the_object_name() {
    let t: Topic = serde_yaml::from_str(
        &std::fs::read_to_string(crate_file("samples/topic.yaml")).expect("sample"),
    )
    .expect("parse");
    assert_eq!(t.topic_name(), "orders-created");
    assert_eq!(t.spec.queues, 8);
}
