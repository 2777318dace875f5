//! The KeelMQ custom resources: [`BrokerGroup`] (a replicated broker group
//! the operator runs) and [`Topic`] (a topic the operator creates on a
//! group through the broker admin API).
//!
//! The CRD YAML that the Helm chart ships is generated from these types
//! (`keelmq-operator crds`) and committed beside this crate; a test fails when
//! the committed files drift from the types. Every spec field has a default
//! except the object's name (and, for a Topic, the group it belongs to), so
//! `spec: {}` is a working BrokerGroup. The broker image has no schema
//! default on purpose: the operator fills it in at every reconcile (see
//! [`BrokerGroupSpec::broker_image`]), so upgrading the operator moves brokers that
//! do not pin an image to the matching broker release.

#![warn(missing_docs)]
// kube's `printcolumn(name = .., type_ = ..)` repeats `type_` per column.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, PodSecurityContext, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod schema_check;

/// The API group of every KeelMQ resource.
pub const GROUP: &str = "keelmq.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Annotation: `"true"` stops the operator from changing anything of the
/// group (status then shows the `ReconciliationPaused` condition).
pub const ANNOTATION_PAUSE: &str = "keelmq.io/pause-reconciliation";
/// Annotation: name of a slave pod to hand the master role to (planned
/// switchover); removed by the operator once done.
pub const ANNOTATION_SWITCHOVER_TO: &str = "keelmq.io/switchover-to";
/// Annotation: any new value triggers a rolling restart of the brokers.
pub const ANNOTATION_RESTART: &str = "keelmq.io/restart";

/// The image brokers run when the spec names none: the broker release
/// matching this operator (this crate is built into the operator, with the
/// workspace's version).
pub fn default_image() -> String {
    format!("keelmq/broker:{}", env!("CARGO_PKG_VERSION"))
}

/// A replicated KeelMQ broker group: one master and `replicas - 1` slaves,
/// run as one StatefulSet whose pods carry their current role as a label.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keelmq.io",
    version = "v1alpha1",
    kind = "BrokerGroup",
    namespaced,
    shortname = "bg",
    status = "BrokerGroupStatus",
    doc = "A replicated KeelMQ broker group (one master, replicas-1 slaves) run by the KeelMQ operator",
    printcolumn(name = "Master", type_ = "string", json_path = ".status.master"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Replication", type_ = "string", json_path = ".spec.replication.mode"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.readyReplicas"
    ),
    validation = Rule::new(
        "self.spec.replication.mode == 'Async' || self.spec.replication.minInSyncReplicas < self.spec.replicas"
    ).message("replication.minInSyncReplicas must be below replicas in Sync mode (the master is not counted)"),
    validation = Rule::new(
        "self.spec.replication.mode == 'Async' || self.spec.replication.minInSyncReplicas >= 1"
    ).message("replication.minInSyncReplicas must be at least 1 in Sync mode (with 0, sends are acknowledged like Async and failover can never be sure to lose nothing); use mode Async instead")
)]
#[serde(rename_all = "camelCase")]
pub struct BrokerGroupSpec {
    /// Brokers in the group: one master plus `replicas - 1` slaves.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: i32,
    /// Broker container image. Unset: the broker release matching the
    /// running operator, resolved at every reconcile, so an operator upgrade
    /// rolls these brokers onto the new release (one at a time, the master
    /// last, after a switchover). Set it to pin a release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// CPU and memory of the broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Each broker's persistent volume.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How sends are replicated before they are acknowledged.
    #[serde(default)]
    pub replication: ReplicationSpec,
    /// When a send counts as durable on one broker.
    #[serde(default)]
    pub flush_mode: FlushMode,
    /// What happens when the master fails.
    #[serde(default)]
    pub failover: FailoverSpec,
    /// Whether slaves serve reads: the `<name>-read` Service includes them and
    /// each master reads records far behind its head from an in-sync slave
    /// (broker `slave_read = "auto"`). False: the read Service selects only
    /// the master and brokers run with `slave_read = "off"`. A
    /// `config.slave_read` entry overrides the broker side.
    #[serde(default = "default_true")]
    pub read_from_slaves: bool,
    /// Extra broker settings (keys of the broker's TOML file, e.g.
    /// `retention_hours: 24`). Keys the operator manages (ports, paths,
    /// identity, role, replication, flush) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "config_schema")]
    pub config: BTreeMap<String, serde_json::Value>,
    /// Scheduling and security settings of the broker pods.
    #[serde(default)]
    pub pod_template: PodTemplateSpec,
    /// The NetworkPolicy the operator keeps for the group's pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// The certificate the brokers serve TLS with on the client port.
    /// Unset: each broker makes its own CA and certificate at first start
    /// (per pod, naming only the pod; for trying things out). Either way
    /// the client port also accepts plaintext: there is no switch to turn
    /// TLS off or to require it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

impl BrokerGroupSpec {
    /// The image the brokers run: `image` when set, otherwise
    /// [`default_image`] (the broker release matching this operator).
    pub fn broker_image(&self) -> String {
        self.image.clone().unwrap_or_else(default_image)
    }
}

impl Default for BrokerGroupSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            image: None,
            image_pull_policy: None,
            resources: None,
            storage: StorageSpec::default(),
            replication: ReplicationSpec::default(),
            flush_mode: FlushMode::default(),
            failover: FailoverSpec::default(),
            read_from_slaves: true,
            config: BTreeMap::new(),
            pod_template: PodTemplateSpec::default(),
            network_policy: NetworkPolicySpec::default(),
            tls: None,
        }
    }
}

fn default_replicas() -> i32 {
    2
}

fn default_true() -> bool {
    true
}

fn default_storage_size() -> Quantity {
    Quantity("10Gi".into())
}

fn config_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "Extra broker settings, as keys of the broker's TOML configuration file",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Image pull policy of the broker container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

/// Each broker's persistent volume; the class and size cannot change once
/// the group exists (StatefulSet volume claim templates are immutable).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)"
).message("storage.storageClassName is immutable"))]
pub struct StorageSpec {
    /// Volume size per broker.
    #[serde(default = "default_storage_size")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage.size is immutable"))]
    pub size: Quantity,
    /// Storage class of the volumes (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// What happens to a broker's volume when the group is deleted.
    #[serde(default)]
    pub when_deleted: RetentionPolicy,
    /// What happens to a slave's volume when the group is scaled down.
    #[serde(default)]
    pub when_scaled: RetentionPolicy,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            when_deleted: RetentionPolicy::Retain,
            when_scaled: RetentionPolicy::Retain,
        }
    }
}

/// Keep or delete a volume (StatefulSet PVC retention policy).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RetentionPolicy {
    /// Keep the volume and its data.
    #[default]
    Retain,
    /// Delete the volume.
    Delete,
}

impl RetentionPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}

/// Replication settings of the group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ReplicationSpec {
    /// Sync: a send is acknowledged once `minInSyncReplicas` slaves hold it
    /// (failover loses nothing acknowledged). Async: once the master holds it.
    pub mode: ReplicationMode,
    /// Sync mode: slaves that must hold a send before it is acknowledged (at
    /// least 1, and below `replicas`).
    #[schemars(range(min = 0))]
    pub min_in_sync_replicas: i32,
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        Self {
            mode: ReplicationMode::Sync,
            min_in_sync_replicas: 1,
        }
    }
}

/// How the master acknowledges sends relative to its slaves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReplicationMode {
    /// After `minInSyncReplicas` slaves hold the send.
    #[default]
    Sync,
    /// After the master's own write.
    Async,
}

impl ReplicationMode {
    /// The broker configuration spelling (`replication_mode`).
    pub fn broker_value(self) -> &'static str {
        match self {
            ReplicationMode::Sync => "sync",
            ReplicationMode::Async => "async",
        }
    }
}

/// When a broker counts a send as durable.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FlushMode {
    /// After an fsync covered it.
    SyncFlush,
    /// After the write to the page cache; flushed on an interval.
    #[default]
    AsyncFlush,
}

impl FlushMode {
    /// The broker configuration spelling (`flush_mode`).
    pub fn broker_value(self) -> &'static str {
        match self {
            FlushMode::SyncFlush => "SYNC_FLUSH",
            FlushMode::AsyncFlush => "ASYNC_FLUSH",
        }
    }
}

/// What the operator does when the master fails.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct FailoverSpec {
    /// Promote a slave automatically when the master fails.
    pub enabled: bool,
    /// Seconds the master must stay unready before it counts as failed (a
    /// deleted pod or lost node counts at once).
    #[schemars(range(min = 0))]
    pub detection_delay_seconds: i32,
    /// Promote even when acknowledged messages may be lost (too few slaves
    /// reachable in Sync mode).
    pub allow_data_loss: bool,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            detection_delay_seconds: 15,
            allow_data_loss: false,
        }
    }
}

/// The parts of the broker pods a user may set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct PodTemplateSpec {
    /// Pod affinity and anti-affinity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints the brokers tolerate.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node labels the brokers must run on.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Pod-level security context, merged field by field over the
    /// operator's default (runAsNonRoot, runAsUser, runAsGroup and fsGroup
    /// 65532, fsGroupChangePolicy OnRootMismatch, seccompProfile
    /// RuntimeDefault): a field set here replaces the default's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Priority class of the broker pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Extra labels on the broker pods.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the broker pods.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The NetworkPolicy `<group>` the operator keeps: the broker pods accept
/// the admin (8082) and replication (10912) ports, which have no
/// authentication, only from the group's own pods and from the operator's
/// pods; the client (8081) and HTTP (8083: health, metrics) ports from
/// anywhere. Further policies of your own can only allow more (Kubernetes
/// adds up the policies that select a pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkPolicySpec {
    /// Keep the policy. False: the operator deletes the one it made, for
    /// clusters whose own policies already cover the brokers. A cluster
    /// whose network plugin does not enforce NetworkPolicies ignores it, so
    /// the ports are open there either way.
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The client port's certificate, from a Secret the user keeps (made with
/// cert-manager or `kubectl create secret tls`). The operator mounts it
/// read-only in every broker pod and points the broker's `tls_cert` and
/// `tls_key` at it; it never reads the Secret itself. A missing Secret or
/// key keeps the pods in ContainerCreating (the kubelet's events name
/// it). The brokers read the files at start only: a renewed certificate is
/// served after the next restart (`keelmq.io/restart`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret in the group's namespace, of type kubernetes.io/tls: `tls.crt`
    /// (the server certificate, then any intermediates, PEM) and `tls.key`
    /// (its private key, PEM). A `ca.crt` key is allowed and not used by the
    /// brokers (it is what clients trust). The certificate must name what
    /// clients dial: `<group>.<namespace>.svc`, `<group>-read.<namespace>.svc`
    /// and `*.<group>-headless.<namespace>.svc` (routes send clients to the
    /// master pod by that name). Changing it restarts the brokers, one at a
    /// time.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(
        "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')"
    ).message("tls.secretName must be a Secret name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"))]
    pub secret_name: String,
}

/// The key of the certificate chain in a kubernetes.io/tls Secret.
pub const TLS_SECRET_CERT_KEY: &str = "tls.crt";
/// The key of the private key in a kubernetes.io/tls Secret.
pub const TLS_SECRET_KEY_KEY: &str = "tls.key";

/// What the operator last saw of a group and did with it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerGroupStatus {
    /// Ready, Progressing, Degraded, ReconciliationPaused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The pod that is master (written before it is promoted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// The group's epoch: raised by every promotion; fences old masters.
    #[serde(default)]
    pub epoch: i64,
    /// Store id the master had when it became master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_store_id: Option<String>,
    /// Brokers that serve (see replicas[].ready).
    #[serde(default)]
    pub ready_replicas: i32,
    /// Each broker as last observed, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    /// The most recent automatic or planned change of master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,
    /// Since when the recorded master has been unready: the failover
    /// detection delay runs from here, so an operator restart does not start
    /// it over.
    // Serialised as null when None, so the operator's merge patch clears it.
    #[serde(default)]
    pub master_unready: Option<MasterUnready>,
    /// The rolling restart in progress (pods onto a new pod template), so a
    /// restarted operator resumes it.
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    /// The replication settings the master last said it runs with. A broker
    /// reads them only when it starts, so after a change of
    /// `spec.replication` the master acknowledges sends by its old settings
    /// until the roll restarts it; a failover meanwhile is decided by the
    /// more cautious of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_replication: Option<MasterReplication>,
}

/// Replication settings a master reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MasterReplication {
    /// The master pod that reported them (the record is void once another
    /// pod is master).
    pub master: String,
    /// Its replication mode.
    pub mode: ReplicationMode,
    /// Its minimum of in-sync slaves (see `spec.replication`).
    pub min_in_sync_replicas: i32,
}

/// The recorded master seen unready, and since when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MasterUnready {
    /// The master pod (the record is void once another pod is master).
    pub master: String,
    /// When it was first seen unready (or unreachable).
    pub since: Time,
}

/// A rolling restart: slaves one at a time, then a planned switchover, then
/// the old master; each pod only once the group is healthy and in sync.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Hash of the pod template being rolled out (pod annotation
    /// `keelmq.io/template-hash`).
    pub template_hash: String,
    /// Why: `TemplateChanged` or `RestartRequested`.
    pub reason: String,
    /// When the roll started.
    pub started: Time,
    /// Pods restarted onto the template so far, in order.
    #[serde(default)]
    pub restarted: Vec<String>,
    /// The pod deleted last, not yet back ready and in sync.
    #[serde(default)]
    pub pending: Option<PendingRestart>,
    /// What the roll does or waits for, in words.
    #[serde(default)]
    pub message: String,
}

/// A pod the operator deleted and waits for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingRestart {
    /// Pod name.
    pub pod: String,
    /// Uid of the pod that was deleted (its replacement has another).
    pub uid: String,
}

/// One broker as last observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Pod name.
    pub name: String,
    /// master, slave or unknown (not reachable).
    pub role: String,
    /// It serves: its pod is ready or, for a slave following the master, it
    /// answers (a slave's pod is ready only while it is connected and in
    /// sync; see inSync).
    pub ready: bool,
    /// Its admin API answered.
    pub reachable: bool,
    /// End of its commit log.
    #[serde(default)]
    pub offset: i64,
    /// Bytes it is behind the master.
    #[serde(default)]
    pub lag: i64,
    /// The master counts it as in sync.
    #[serde(default)]
    pub in_sync: bool,
}

/// A change of master, as recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// When the new master was recorded.
    pub time: Time,
    /// The previous master, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The new master.
    pub to: String,
    /// The epoch it became master in.
    pub epoch: i64,
    /// Why.
    pub reason: String,
    /// What acknowledged data may have been lost, in words.
    pub possible_loss: String,
}

/// A topic on a KeelMQ broker group, created and kept in shape through the
/// group master's admin API.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keelmq.io",
    version = "v1alpha1",
    kind = "Topic",
    namespaced,
    status = "TopicStatus",
    doc = "A topic on a KeelMQ broker group, managed by the KeelMQ operator",
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.brokerGroup"),
    printcolumn(name = "Queues", type_ = "integer", json_path = ".status.queues"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.messageType"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// On the spec, not the field: a field's rule runs only when the old and the
// new object both have it, so setting or removing the name passed it.
#[x_kube(validation = Rule::new(
    "has(self.topicName) == has(oldSelf.topicName) && (!has(self.topicName) || self.topicName == oldSelf.topicName)"
).message("topicName is immutable"))]
pub struct TopicSpec {
    /// The BrokerGroup (same namespace) that holds the topic.
    #[x_kube(validation = Rule::new("self == oldSelf").message("brokerGroup is immutable"))]
    pub broker_group: String,
    /// Topic name on the broker (default: the object's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,
    /// Queue count; may only grow.
    #[serde(default = "default_queues")]
    #[schemars(range(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("queues may only grow"))]
    pub queues: i32,
    /// Kind of messages the topic carries.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("messageType is immutable"))]
    pub message_type: MessageType,
}

fn default_queues() -> i32 {
    8
}

/// Kind of messages a topic carries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum MessageType {
    /// Ordinary messages.
    #[default]
    Normal,
    /// Ordered per message group.
    Fifo,
    /// Delivered at a set time.
    Delay,
    /// Two-phase transactional messages.
    Transaction,
}

/// What the broker holds for a Topic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    /// Ready (the broker holds the topic as specified).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Queue count the broker reports.
    #[serde(default)]
    pub queues: i32,
    /// Message type the broker reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<MessageType>,
}

impl Topic {
    /// The topic's name on the broker.
    pub fn topic_name(&self) -> String {
        self.spec
            .topic_name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }
}

/// The two CRDs, serialised as one multi-document YAML stream (what
/// `keelmq-operator crds` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "---\n{}---\n{}",
        brokergroup_crd_yaml()?,
        topic_crd_yaml()?
    ))
}

/// The BrokerGroup CRD as YAML (committed as `crds/keelmq.io_brokergroups.yaml`).
pub fn brokergroup_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&BrokerGroup::crd())
}

/// The Topic CRD as YAML (committed as `crds/keelmq.io_topics.yaml`).
pub fn topic_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&Topic::crd())
}

#[cfg(test)]
mod tests;
