//! `spec.tls`: the objects the model builds when a group names a
//! certificate Secret, and that nothing changes when it names none.

use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
use keelmq_broker::config::BrokerConfig;
use keelmq_crds::BrokerGroup;
use serde_json::{Value, json};

use crate::Error;
use crate::model::*;
use crate::testing::{pod_spec, writable_mounts};

/// A BrokerGroup as stored, from its spec.
fn group(spec: Value) -> BrokerGroup {
    serde_json::from_value(json!({
        "apiVersion": "keelmq.io/v1alpha1",
        "kind": "BrokerGroup",
        "metadata": {"name": "orders", "namespace": "messaging", "uid": "uid-1"},
        "spec": spec,
    }))
    .expect("BrokerGroup")
}

fn with_tls(secret: &str) -> BrokerGroup {
    group(json!({"replicas": 3, "tls": {"secretName": secret}}))
}

fn broker(pod: &PodSpec) -> &Container {
    pod.containers
        .iter()
        .find(|c| c.name == "broker")
        .expect("broker container")
}

/// The broker configuration as the broker reads it from the ConfigMap.
fn broker_settings(bg: &BrokerGroup) -> BrokerConfig {
    let cm = config_map(bg).expect("cm");
    toml::from_str(&cm.data.as_ref().expect("data")[CONFIG_FILE]).expect("the broker parses it")
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> Option<&'a Volume> {
    pod.volumes.iter().flatten().find(|v| v.name == name)
}

#[test]
fn a_tls_secret_is_mounted_read_only_and_is_what_the_broker_serves() {
    let bg = with_tls("orders-tls");
    let pod = pod_spec(&bg);

    let tls = volume(&pod, TLS_VOLUME).expect("a volume for the Secret");
    assert_eq!(
        serde_json::to_value(tls).expect("json"),
        json!({
            "name": "tls",
            "secret": {
                "secretName": "orders-tls",
                "items": [
                    {"key": "tls.crt", "path": "tls.crt"},
                    {"key": "tls.key", "path": "tls.key"}
                ],
                "defaultMode": 0o440
            }
        }),
        "only the certificate and key, readable by the broker's group"
    );
    let c = broker(&pod);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == TLS_VOLUME)
        .expect("mounted in the broker container");
    assert_eq!(mount.mount_path, "/etc/keelmq-tls");
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(
        mount.sub_path, None,
        "a subPath mount would never be updated"
    );
    assert!(
        !mount.mount_path.starts_with(&format!("{CONFIG_DIR}/")),
        "no mount point inside the ConfigMap volume"
    );

    let settings = broker_settings(&bg);
    assert_eq!(
        settings.tls_cert.as_deref().and_then(|p| p.to_str()),
        Some("/etc/keelmq-tls/tls.crt")
    );
    assert_eq!(
        settings.tls_key.as_deref().and_then(|p| p.to_str()),
        Some("/etc/keelmq-tls/tls.key")
    );
    settings
        .validate()
        .expect("the broker accepts the settings");
    // The certificate reaches the broker through its configuration file,
    // as every other setting: no TLS variables in the environment.
    assert!(
        c.env
            .iter()
            .flatten()
            .all(|e| !e.name.starts_with("KEELMQ_TLS")),
        "{:?}",
        c.env
    );
}

#[test]
fn a_tls_secret_keeps_the_pod_restricted() {
    let pod = pod_spec(&with_tls("orders-tls"));
    assert_eq!(
        serde_json::to_value(&pod.security_context).expect("json"),
        serde_json::to_value(pod_security_context(&group(json!({})))).expect("json"),
    );
    let c = broker(&pod);
    assert_eq!(c.security_context, Some(container_security_context()));
    assert_eq!(
        c.security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem),
        Some(true)
    );
    assert_eq!(
        writable_mounts(c),
        [DATA_DIR],
        "the data volume stays the only writable path"
    );
    assert!(
        pod.volumes.iter().flatten().all(|v| v.host_path.is_none()),
        "no hostPath"
    );
}

#[test]
fn without_tls_the_pods_name_no_secret_and_the_broker_makes_its_own() {
    let bg = group(json!({"replicas": 3}));
    let pod = pod_spec(&bg);
    let volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["config"]);
    assert!(pod.volumes.iter().flatten().all(|v| v.secret.is_none()));
    let mounts: Vec<(&str, &str)> = broker(&pod)
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(mounts, [("config", CONFIG_DIR), ("data", DATA_DIR)]);
    let settings = broker_settings(&bg);
    assert_eq!(
        settings.tls_cert, None,
        "the broker makes its own certificate"
    );
    assert_eq!(settings.tls_key, None);
    let text = broker_config(&bg).expect("config");
    assert!(!text.contains("tls"), "{text}");
}

#[test]
fn setting_changing_or_removing_the_secret_rolls_the_brokers() {
    let hash = |bg: &BrokerGroup| {
        template_hash(&stateful_set(bg).expect("sts"))
            .expect("hash")
            .to_string()
    };
    let plain = group(json!({"replicas": 3}));
    let first = with_tls("orders-tls");
    let renamed = with_tls("orders-tls-2026");
    assert_ne!(hash(&first), hash(&plain), "turning it on rolls");
    assert_ne!(hash(&renamed), hash(&first), "a new Secret name rolls");
    assert_eq!(hash(&first), hash(&with_tls("orders-tls")), "stable");
    // Removing `tls` goes back to exactly the template without it.
    let mut removed = first.clone();
    removed.spec.tls = None;
    assert_eq!(hash(&removed), hash(&plain));
}

#[test]
fn config_may_not_set_the_certificate_paths_next_to_a_tls_secret() {
    for key in ["tls_cert", "tls_key"] {
        let bg = group(json!({
            "tls": {"secretName": "orders-tls"},
            "config": {key: "/var/lib/keelmq/mine.pem"}
        }));
        let e = config_map(&bg).expect_err("refused");
        assert!(
            matches!(&e, Error::InvalidSpec(m)
                if m.contains(&format!("config.{key} cannot be set together with tls.secretName"))),
            "{e}"
        );
        let e = stateful_set(&bg).expect_err("no pods either");
        assert!(matches!(e, Error::InvalidSpec(_)), "{e}");
    }
    // Without spec.tls they are broker settings like any other, as before.
    let bg = group(json!({"config": {
        "tls_cert": "/var/lib/keelmq/c.pem",
        "tls_key": "/var/lib/keelmq/k.pem"
    }}));
    let settings = broker_settings(&bg);
    assert_eq!(
        settings.tls_cert.as_deref().and_then(|p| p.to_str()),
        Some("/var/lib/keelmq/c.pem")
    );
    assert!(volume(&pod_spec(&bg), TLS_VOLUME).is_none());
}
