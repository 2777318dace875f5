//! The objects a BrokerGroup is made of, built by pure functions from the
//! spec (Strimzi's model classes): no I/O, so every object is unit tested
//! and `keelmq-operator render` prints exactly what the reconciler applies.
//! The only input besides the BrokerGroup is where the operator itself runs
//! ([`OperatorPeer`]), which the NetworkPolicy admits to the admin port.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keelmq_crds::{ANNOTATION_RESTART, BrokerGroup, TLS_SECRET_CERT_KEY, TLS_SECRET_KEY_KEY};
use kube::{Resource, ResourceExt};

use crate::Error;

/// Label: the application (always `keelmq`).
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label: the BrokerGroup a pod belongs to.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Label: the part of the application (`broker`).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Label: who manages the object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label on broker pods: `master` or `slave`, moved by the operator.
pub const LABEL_ROLE: &str = "keelmq.io/role";
/// Pod annotation: hash of the broker configuration, so a change restarts the brokers.
pub const ANNOTATION_CONFIG_HASH: &str = "keelmq.io/config-hash";
/// Pod annotation: hash of the whole pod template the pod was made from; a
/// pod whose value differs from the StatefulSet's runs an older template and
/// is rolled.
pub const ANNOTATION_TEMPLATE_HASH: &str = "keelmq.io/template-hash";
/// Pod label the StatefulSet controller sets to the revision a pod was made from.
pub const LABEL_REVISION: &str = "controller-revision-hash";

/// Broker client (RocketMQ gRPC) port.
pub const CLIENT_PORT: i32 = 8081;
/// Broker admin gRPC port.
pub const ADMIN_PORT: i32 = 8082;
/// Broker HTTP port (health, metrics).
pub const HTTP_PORT: i32 = 8083;
/// Broker replication port.
pub const REPLICATION_PORT: i32 = 10912;
/// Where the broker's data volume is mounted.
pub const DATA_DIR: &str = "/var/lib/keelmq";
/// Directory the ConfigMap is mounted at.
pub const CONFIG_DIR: &str = "/etc/keelmq";
/// The configuration file inside [`CONFIG_DIR`] (and key in the ConfigMap).
pub const CONFIG_FILE: &str = "broker.toml";
/// Name of the pod volume holding the `spec.tls` Secret.
pub const TLS_VOLUME: &str = "tls";
/// Directory the `spec.tls` Secret is mounted at. Not under [`CONFIG_DIR`]:
/// the kubelet cannot make a mount point inside a ConfigMap volume.
pub const TLS_DIR: &str = "/etc/keelmq-tls";
/// The certificate chain inside [`TLS_DIR`] (the broker's `tls_cert`).
pub const TLS_CERT_FILE: &str = "tls.crt";
/// The private key inside [`TLS_DIR`] (the broker's `tls_key`).
pub const TLS_KEY_FILE: &str = "tls.key";
/// Mode of the mounted certificate files: readable by their owner and by
/// the pod's fsGroup (the broker's group), by no one else.
pub const TLS_FILE_MODE: i32 = 0o440;
/// The broker image's user and group (docker/broker.Dockerfile `USER`),
/// also the default fsGroup, so the data volume is writable for it.
pub const BROKER_UID: i64 = 65532;
/// How long a broker may take to start (open and recover its store) before
/// the kubelet restarts it: the startup probe allows this many seconds
/// (`STARTUP_PROBE_PERIOD` times its failure threshold); liveness counts
/// only after it.
pub const STARTUP_ALLOWANCE_SECONDS: i32 = 3600;
/// Period of the startup probe.
pub const STARTUP_PROBE_PERIOD: i32 = 10;
/// Namespace label every namespace carries (Kubernetes 1.21 and later).
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// Where the operator runs: its namespace and its pods' labels. The
/// NetworkPolicy admits these pods to the brokers' admin and replication
/// ports (the operator calls the admin API of every broker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPeer {
    /// The operator's namespace.
    pub namespace: String,
    /// Labels the operator's pods carry (all of them must match).
    pub pod_labels: BTreeMap<String, String>,
}

/// The operator pods' labels when none are configured: what the Helm
/// chart's pods carry whatever the release is called.
pub const DEFAULT_OPERATOR_POD_LABELS: &str =
    "app.kubernetes.io/name=keelmq,app.kubernetes.io/component=operator";

impl Default for OperatorPeer {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            pod_labels: parse_labels(DEFAULT_OPERATOR_POD_LABELS).unwrap_or_default(),
        }
    }
}

/// Parses `key=value,key=value` (a label selector of equalities only).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    if out.is_empty() {
        return Err("no labels given".into());
    }
    Ok(out)
}

/// Broker settings the operator decides when the spec has a `tls` Secret;
/// a spec's `config` may then not set them.
pub const TLS_CONFIG_KEYS: &[&str] = &["tls_cert", "tls_key"];

/// Broker settings the operator decides; a spec's `config` may not set them.
pub const RESERVED_CONFIG_KEYS: &[&str] = &[
    "data_dir",
    "broker_name",
    "broker_id",
    "listen_address",
    "advertised_address",
    "client_port",
    "admin_port",
    "http_port",
    "replication_port",
    "role",
    "replication_mode",
    "min_in_sync_replicas",
    "flush_mode",
];

/// Names of the objects of one group, in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupNames {
    /// The BrokerGroup's name; also the StatefulSet, client Service and PDB name.
    pub group: String,
    /// Its namespace.
    pub namespace: String,
}

impl GroupNames {
    /// Names for a BrokerGroup (which must have a name and a namespace).
    pub fn of(bg: &BrokerGroup) -> Result<Self, Error> {
        Ok(Self {
            group: bg
                .metadata
                .name
                .clone()
                .ok_or(Error::MissingObjectKey("metadata.name"))?,
            namespace: bg
                .metadata
                .namespace
                .clone()
                .ok_or(Error::MissingObjectKey("metadata.namespace"))?,
        })
    }
    /// ConfigMap holding `broker.toml`.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.group)
    }
    /// Headless Service giving each pod a DNS name.
    pub fn headless(&self) -> String {
        format!("{}-headless", self.group)
    }
    /// NetworkPolicy guarding the brokers' ports.
    pub fn network_policy(&self) -> String {
        self.group.clone()
    }
    /// Service for reads (all ready brokers, or only the master).
    pub fn read(&self) -> String {
        format!("{}-read", self.group)
    }
    /// The pod of ordinal `i`.
    pub fn pod(&self, i: i32) -> String {
        format!("{}-{i}", self.group)
    }
    /// A pod's stable DNS name.
    pub fn pod_host(&self, pod: &str) -> String {
        format!("{pod}.{}.{}.svc", self.headless(), self.namespace)
    }
    /// The ordinal of a pod of this group (`<group>-<i>`), if it is one.
    pub fn ordinal(&self, pod: &str) -> Option<i32> {
        pod.strip_prefix(&self.group)?
            .strip_prefix('-')?
            .parse()
            .ok()
            .filter(|i: &i32| *i >= 0)
    }
}

/// How many pods the StatefulSet keeps: the spec's replicas (at least one),
/// except while the recorded master sits on an ordinal a scale-down would
/// remove; then up to and including the master's pod, until the operator
/// has handed the master role to a broker that stays.
pub fn stateful_set_replicas(bg: &BrokerGroup) -> Result<i32, Error> {
    let names = GroupNames::of(bg)?;
    let wanted = bg.spec.replicas.max(1);
    let master = bg.status.as_ref().and_then(|s| s.master.as_deref());
    Ok(match master.and_then(|m| names.ordinal(m)) {
        Some(o) if o >= wanted => o.saturating_add(1),
        _ => wanted,
    })
}

/// Labels every object of the group carries.
pub fn labels(group: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(group);
    l.insert(LABEL_MANAGED_BY.into(), "keelmq-operator".into());
    l
}

/// Labels that select the group's broker pods (the StatefulSet selector).
pub fn selector_labels(group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "keelmq".to_string()),
        (LABEL_INSTANCE.to_string(), group.to_string()),
        (LABEL_COMPONENT.to_string(), "broker".to_string()),
    ])
}

/// `key=value,...` form of the selector, for list calls.
pub fn selector_string(group: &str) -> String {
    selector_labels(group)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(bg: &BrokerGroup, name: String) -> Result<ObjectMeta, Error> {
    let owner: OwnerReference = bg
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: bg.namespace(),
        labels: Some(labels(&bg.name_any())),
        owner_references: Some(vec![owner]),
        ..Default::default()
    })
}

/// The broker configuration file: operator-managed settings first, then the
/// spec's extra settings. Checked by parsing it as the broker would.
pub fn broker_config(bg: &BrokerGroup) -> Result<String, Error> {
    let spec = &bg.spec;
    let mut table = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        table.insert(k.to_string(), v);
    };
    set("broker_name", bg.name_any().into());
    set("data_dir", DATA_DIR.into());
    // Every address, IPv6 and IPv4 (the broker listens on IPv4 alone where
    // the pod has no IPv6).
    set("listen_address", "::".into());
    set("client_port", i64::from(CLIENT_PORT).into());
    set("admin_port", i64::from(ADMIN_PORT).into());
    set("http_port", i64::from(HTTP_PORT).into());
    set("replication_port", i64::from(REPLICATION_PORT).into());
    set("role", "standby".into());
    set(
        "replication_mode",
        spec.replication.mode.broker_value().into(),
    );
    set(
        "min_in_sync_replicas",
        i64::from(spec.replication.min_in_sync_replicas).into(),
    );
    set("flush_mode", spec.flush_mode.broker_value().into());
    if !spec.read_from_slaves && !spec.config.contains_key("slave_read") {
        set("slave_read", "off".into());
    }
    if spec.tls.is_some() {
        set("tls_cert", format!("{TLS_DIR}/{TLS_CERT_FILE}").into());
        set("tls_key", format!("{TLS_DIR}/{TLS_KEY_FILE}").into());
    }
    let mut extra = toml::Table::new();
    for (key, value) in &spec.config {
        if RESERVED_CONFIG_KEYS.contains(&key.as_str()) {
            return Err(Error::InvalidSpec(format!(
                "config.{key} is set by the operator and cannot be overridden"
            )));
        }
        if spec.tls.is_some() && TLS_CONFIG_KEYS.contains(&key.as_str()) {
            return Err(Error::InvalidSpec(format!(
                "config.{key} cannot be set together with tls.secretName: the operator points \
                 it at the mounted Secret"
            )));
        }
        let v = toml::Value::try_from(value)
            .map_err(|e| Error::InvalidSpec(format!("config.{key}: {e}")))?;
        extra.insert(key.clone(), v);
    }
    let mut text = String::from("# Written by the KeelMQ operator from the BrokerGroup spec.\n");
    text.push_str(&toml::to_string(&table).map_err(|e| Error::InvalidSpec(e.to_string()))?);
    if !extra.is_empty() {
        text.push_str("\n# spec.config\n");
        text.push_str(&toml::to_string(&extra).map_err(|e| Error::InvalidSpec(e.to_string()))?);
    }
    let parsed: keelmq_broker::config::BrokerConfig = toml::from_str(&text).map_err(|e| {
        Error::InvalidSpec(format!("the broker would refuse config: {}", e.message()))
    })?;
    parsed
        .validate()
        .map_err(|e| Error::InvalidSpec(format!("the broker would refuse config: {e}")))?;
    Ok(text)
}

/// A short, stable hash of the configuration (FNV-1a), for the pod annotation.
pub fn config_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// ConfigMap `<group>-config` with `broker.toml`.
pub fn config_map(bg: &BrokerGroup) -> Result<ConfigMap, Error> {
    let names = GroupNames::of(bg)?;
    Ok(ConfigMap {
        metadata: meta(bg, names.config_map())?,
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            broker_config(bg)?,
        )])),
        ..Default::default()
    })
}

fn port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Headless Service `<group>-headless`: a DNS name per pod, published
/// before the pods are ready (the operator must reach standby brokers).
pub fn headless_service(bg: &BrokerGroup) -> Result<Service, Error> {
    let names = GroupNames::of(bg)?;
    Ok(Service {
        metadata: meta(bg, names.headless())?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&names.group)),
            ports: Some(vec![
                port("client", CLIENT_PORT),
                port("admin", ADMIN_PORT),
                port("http", HTTP_PORT),
                port("replication", REPLICATION_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Client Service `<group>`: the pod labelled master.
pub fn client_service(bg: &BrokerGroup) -> Result<Service, Error> {
    let names = GroupNames::of(bg)?;
    let mut selector = selector_labels(&names.group);
    selector.insert(LABEL_ROLE.into(), "master".into());
    Ok(Service {
        metadata: meta(bg, names.group.clone())?,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Read Service `<group>-read`: every ready broker, or only the master
/// when `readFromSlaves` is false.
pub fn read_service(bg: &BrokerGroup) -> Result<Service, Error> {
    let names = GroupNames::of(bg)?;
    let mut selector = selector_labels(&names.group);
    if !bg.spec.read_from_slaves {
        selector.insert(LABEL_ROLE.into(), "master".into());
    }
    Ok(Service {
        metadata: meta(bg, names.read())?,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// PodDisruptionBudget: at most one broker voluntarily down at a time.
pub fn pod_disruption_budget(bg: &BrokerGroup) -> Result<PodDisruptionBudget, Error> {
    let names = GroupNames::of(bg)?;
    Ok(PodDisruptionBudget {
        metadata: meta(bg, names.group.clone())?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&names.group)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The pod security context: the operator's default (non-root as the
/// image's user, the data volume's group set to it, the runtime's seccomp
/// profile) with every field the spec sets taking its place.
pub fn pod_security_context(bg: &BrokerGroup) -> PodSecurityContext {
    let user = bg
        .spec
        .pod_template
        .security_context
        .clone()
        .unwrap_or_default();
    PodSecurityContext {
        run_as_non_root: user.run_as_non_root.or(Some(true)),
        run_as_user: user.run_as_user.or(Some(BROKER_UID)),
        run_as_group: user.run_as_group.or(Some(BROKER_UID)),
        fs_group: user.fs_group.or(Some(BROKER_UID)),
        fs_group_change_policy: user
            .fs_group_change_policy
            .clone()
            .or(Some("OnRootMismatch".into())),
        seccomp_profile: user.seccomp_profile.clone().or(Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        })),
        ..user
    }
}

/// The broker container's security context: no privilege escalation, no
/// capabilities, a read-only root filesystem (the broker writes only to its
/// data volume, generated TLS material included, and reads its config and
/// `spec.tls` Secret mounts).
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HTTP_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// The `spec.tls` Secret as a read-only volume at [`TLS_DIR`], with only
/// the certificate and key projected (a Secret lacking either is not
/// mounted: the kubelet reports it on the pod). The kubelet reads the
/// Secret; the operator never does. The Secret's name is in the pod
/// template, so a new name rolls the brokers.
fn tls_volume(secret_name: &str) -> (VolumeMount, Volume) {
    let item = |key: &str, path: &str| KeyToPath {
        key: key.into(),
        path: path.into(),
        ..Default::default()
    };
    (
        VolumeMount {
            name: TLS_VOLUME.into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        Volume {
            name: TLS_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name.into()),
                items: Some(vec![
                    item(TLS_SECRET_CERT_KEY, TLS_CERT_FILE),
                    item(TLS_SECRET_KEY_KEY, TLS_KEY_FILE),
                ]),
                default_mode: Some(TLS_FILE_MODE),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

/// StatefulSet `<group>`: the brokers. Pods start in standby; the operator
/// promotes one and moves the role label. `OnDelete` updates so that the
/// operator, not the StatefulSet controller, decides the order of restarts
/// (slaves first, the master after a switchover).
pub fn stateful_set(bg: &BrokerGroup) -> Result<StatefulSet, Error> {
    let names = GroupNames::of(bg)?;
    let spec = &bg.spec;
    let config = broker_config(bg)?;
    let pt = &spec.pod_template;

    let mut pod_labels = pt.labels.clone();
    pod_labels.extend(labels(&names.group));
    let mut pod_annotations = pt.annotations.clone();
    pod_annotations.insert(ANNOTATION_CONFIG_HASH.into(), config_hash(&config));
    if let Some(restart) = bg.annotations().get(ANNOTATION_RESTART) {
        pod_annotations.insert(ANNOTATION_RESTART.into(), restart.clone());
    }

    let mut volume_mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names.config_map(),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(tls) = &spec.tls {
        let (mount, volume) = tls_volume(&tls.secret_name);
        volume_mounts.push(mount);
        volumes.push(volume);
    }

    let container = Container {
        name: "broker".into(),
        image: Some(spec.broker_image()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            env("KEELMQ_CONFIG", &format!("{CONFIG_DIR}/{CONFIG_FILE}")),
            env("KEELMQ_BROKER_ID", "$(POD_NAME)"),
            env(
                "KEELMQ_ADVERTISED_ADDRESS",
                &format!("$(POD_NAME).{}.{}.svc", names.headless(), names.namespace),
            ),
        ]),
        ports: Some(
            [
                ("client", CLIENT_PORT),
                ("admin", ADMIN_PORT),
                ("http", HTTP_PORT),
                ("replication", REPLICATION_PORT),
            ]
            .into_iter()
            .map(|(n, p)| ContainerPort {
                name: Some(n.into()),
                container_port: p,
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect(),
        ),
        // Until /healthz first answers (the store is open and recovered),
        // only the startup probe counts: a long recovery is not killed by
        // the liveness probe.
        startup_probe: Some(http_probe(
            "/healthz",
            STARTUP_PROBE_PERIOD,
            STARTUP_ALLOWANCE_SECONDS / STARTUP_PROBE_PERIOD,
        )),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        // A master being stopped (a drain, a deletion) first waits, up to
        // 30 s, for the operator's planned hand-over to an in-sync slave;
        // within the 60 s grace period below.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                http_get: http_probe("/prestop", 0, 0).http_get,
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: spec.resources.clone(),
        security_context: Some(container_security_context()),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    };

    let pod_spec = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        affinity: pt.affinity.clone(),
        tolerations: (!pt.tolerations.is_empty()).then(|| pt.tolerations.clone()),
        node_selector: (!pt.node_selector.is_empty()).then(|| pt.node_selector.clone()),
        security_context: Some(pod_security_context(bg)),
        priority_class_name: pt.priority_class_name.clone(),
        termination_grace_period_seconds: Some(60),
        // No `<SERVICE>_SERVICE_HOST`-style variables from the namespace's
        // Services: brokers find each other by DNS, and the variables of a
        // Service named `keelmq...` would look like broker settings.
        enable_service_links: Some(false),
        ..Default::default()
    };

    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels(&names.group)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    spec.storage.size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(pod_annotations),
            ..Default::default()
        }),
        spec: Some(pod_spec),
    };
    let hash = config_hash(&serde_json::to_string(&template).map_err(Error::Serialize)?);
    if let Some(a) = template
        .metadata
        .as_mut()
        .and_then(|m| m.annotations.as_mut())
    {
        a.insert(ANNOTATION_TEMPLATE_HASH.into(), hash);
    }

    Ok(StatefulSet {
        metadata: meta(bg, names.group.clone())?,
        spec: Some(StatefulSetSpec {
            replicas: Some(stateful_set_replicas(bg)?),
            service_name: Some(names.headless()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&names.group)),
                ..Default::default()
            },
            template,
            volume_claim_templates: Some(vec![claim]),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(spec.storage.when_deleted.as_str().into()),
                    when_scaled: Some(spec.storage.when_scaled.as_str().into()),
                },
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// NetworkPolicy `<group>`: the admin and replication ports, which have no
/// authentication, only from the group's own pods (replication, slave
/// reads) and from the operator's pods; the client and HTTP ports from
/// anywhere. Egress is not restricted.
pub fn network_policy(bg: &BrokerGroup, operator: &OperatorPeer) -> Result<NetworkPolicy, Error> {
    let names = GroupNames::of(bg)?;
    let ports = |ps: &[i32]| -> Option<Vec<NetworkPolicyPort>> {
        Some(
            ps.iter()
                .map(|p| NetworkPolicyPort {
                    port: Some(IntOrString::Int(*p)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        )
    };
    let selector = |labels: BTreeMap<String, String>| {
        Some(LabelSelector {
            match_labels: Some(labels),
            ..Default::default()
        })
    };
    Ok(NetworkPolicy {
        metadata: meta(bg, names.network_policy())?,
        spec: Some(NetworkPolicySpec {
            pod_selector: selector(selector_labels(&names.group)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: None,
                    ports: ports(&[CLIENT_PORT, HTTP_PORT]),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![
                        NetworkPolicyPeer {
                            pod_selector: selector(selector_labels(&names.group)),
                            ..Default::default()
                        },
                        NetworkPolicyPeer {
                            namespace_selector: selector(BTreeMap::from([(
                                LABEL_NAMESPACE_NAME.to_string(),
                                operator.namespace.clone(),
                            )])),
                            pod_selector: selector(operator.pod_labels.clone()),
                            ..Default::default()
                        },
                    ]),
                    ports: ports(&[ADMIN_PORT, REPLICATION_PORT]),
                },
            ]),
            ..Default::default()
        }),
    })
}

/// The template hash a StatefulSet's pods should carry.
pub fn template_hash(sts: &StatefulSet) -> Option<&str> {
    template_annotation(sts, ANNOTATION_TEMPLATE_HASH)
}

/// An annotation of a StatefulSet's pod template.
pub fn template_annotation<'a>(sts: &'a StatefulSet, key: &str) -> Option<&'a str> {
    sts.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Every object of the group, in the order they are applied (the
/// NetworkPolicy only while `spec.networkPolicy.enabled`).
pub fn desired_objects(
    bg: &BrokerGroup,
    operator: &OperatorPeer,
) -> Result<Vec<serde_json::Value>, Error> {
    let to = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(Error::Serialize);
    let mut objects = vec![
        to(serde_json::to_value(config_map(bg)?))?,
        to(serde_json::to_value(headless_service(bg)?))?,
        to(serde_json::to_value(client_service(bg)?))?,
        to(serde_json::to_value(read_service(bg)?))?,
        to(serde_json::to_value(stateful_set(bg)?))?,
        to(serde_json::to_value(pod_disruption_budget(bg)?))?,
    ];
    if bg.spec.network_policy.enabled {
        objects.push(to(serde_json::to_value(network_policy(bg, operator)?))?);
    }
    Ok(objects)
}

/// Fills what a stored object always has and a file may lack (namespace
/// `default`, a placeholder uid for the owner reference), for `render`.
pub fn prepare_for_render(bg: &mut BrokerGroup) {
    bg.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    bg.metadata
        .uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
}
