//! Leader election with a `coordination.k8s.io` Lease, so that only one of
//! several operator replicas acts on the brokers. The holder renews the Lease
//! every few seconds; others take it over once it has not been renewed for
//! its duration. Writes carry the resourceVersion read, so two candidates
//! cannot both win. A leader that fails to renew in time stops (exits), as
//! controller-runtime's operators do, instead of acting without the Lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::{Error, Result};

/// Which Lease, who we are, and the timings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This process's identity (the pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews and candidates retry.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// Defaults: 15 s duration, renewed every 5 s.
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// One attempt to take or renew the Lease; `Ok(true)` when we hold it.
pub async fn try_acquire(client: &Client, cfg: &LeaseConfig) -> Result<bool> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let duration_secs = i32::try_from(cfg.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(secs)) => {
            let valid_until = renewed.0 + jiff::SignedDuration::from_secs(i64::from(secs));
            valid_until < jiff::Timestamp::now()
        }
        _ => true,
    };
    if !ours && !expired && spec.holder_identity.is_some() {
        return Ok(false);
    }
    let mut next = spec.clone();
    if !ours {
        next.acquire_time = Some(now());
        next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        next.holder_identity = Some(cfg.identity.clone());
    }
    next.renew_time = Some(now());
    next.lease_duration_seconds = Some(duration_secs);
    lease.spec = Some(next);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Waits until this process holds the Lease.
pub async fn acquire(client: &Client, cfg: &LeaseConfig) {
    let mut announced = false;
    loop {
        match try_acquire(client, cfg).await {
            Ok(true) => {
                info!(lease = %cfg.name, identity = %cfg.identity, "became leader: holding Lease {}/{}", cfg.namespace, cfg.name);
                return;
            }
            Ok(false) => {
                if !announced {
                    info!(lease = %cfg.name, "another operator holds Lease {}/{}; standing by", cfg.namespace, cfg.name);
                    announced = true;
                }
            }
            Err(e) => warn!(error = %e, "could not read or write the Lease"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews the Lease until renewal fails for longer than its duration;
/// returns then (the caller stops acting).
pub async fn hold(client: &Client, cfg: &LeaseConfig) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_acquire(client, cfg).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                warn!(
                    "lost Lease {}/{} to another operator",
                    cfg.namespace, cfg.name
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, "could not renew the Lease");
                if last_ok.elapsed() >= cfg.duration {
                    return;
                }
            }
        }
    }
}
