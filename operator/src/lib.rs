//! The KeelMQ operator: turns `BrokerGroup` resources into StatefulSets,
//! Services, a ConfigMap and a PodDisruptionBudget, keeps one broker master
//! per group (promoting a slave when the master fails, with the group's epoch
//! recorded in the BrokerGroup status first), and manages `Topic`s through
//! the broker admin API.
//!
//! Layout (kube-rs controller-rs): [`controller`] has `reconcile` and
//! `error_policy`; [`model`] builds objects with pure functions; [`failover`]
//! observes the brokers and carries out `keelmq_failover::decide`;
//! [`brokers`] talks to the broker admin API; [`topic`] is the Topic
//! controller; [`rollout`] rolls pods onto a new template and moves the
//! master off ordinals a scale-down removes; [`replication`] reads the
//! master's view of its slaves for the conditions; [`leader`] holds the Lease; [`metrics`], [`telemetry`] and
//! [`http`] are the process plumbing; [`rbac`] lists every permission used.

pub mod brokers;
pub mod conditions;
pub mod controller;
pub mod failover;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod rbac;
pub mod replication;
pub mod rollout;
pub mod telemetry;
pub mod topic;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

/// Everything that can go wrong in a reconcile, typed so that the error
/// policy and metrics can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object lacks a field every stored object has.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// The spec asks for something the operator cannot build.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// Serialising an object failed.
    #[error("serialising: {0}")]
    Serialize(#[source] serde_json::Error),
    /// A broker admin call failed.
    #[error("broker {broker}: {op} failed: {message}")]
    Admin {
        /// The pod.
        broker: String,
        /// The call (status, promote, follow, ...).
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Someone else changed the BrokerGroup status between read and write;
    /// the reconcile starts over from fresh state.
    #[error("the BrokerGroup status changed while deciding; starting over")]
    Conflict,
    /// The Topic names a BrokerGroup that has no serving master.
    #[error("broker group {0} has no serving master")]
    NoMaster(String),
    /// The BrokerGroup carries the pause annotation: the operator changes
    /// nothing on its brokers.
    #[error("broker group {0} is paused ({ANNOTATION}=true)", ANNOTATION = keelmq_crds::ANNOTATION_PAUSE)]
    Paused(String),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingObjectKey(_) => "missing_key",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Serialize(_) => "serialize",
            Error::Admin { .. } => "admin",
            Error::Conflict => "conflict",
            Error::NoMaster(_) => "no_master",
            Error::Paused(_) => "paused",
        }
    }
}

/// Result of the operator's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Name of the field manager for server-side apply and of the event reporter.
pub const MANAGER: &str = "keelmq-operator";
