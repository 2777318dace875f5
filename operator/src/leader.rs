//! Leader election with a `coordination.k8s.io` Lease, so that only one of
//! several operator replicas acts on the brokers. The holder renews the Lease
//! every few seconds; others take it over once it has not been renewed for
//! its duration. Writes carry the resourceVersion read, so two candidates
//! cannot both win. A leader that fails to renew in time stops (exits), as
//! controller-runtime's operators do, instead of acting without the Lease:
//! each renewal is bounded, and the leader gives up at its renew deadline,
//! counted from when its last successful renewal was sent and shorter than
//! the Lease duration the others wait for. On shutdown it releases the Lease
//! so a successor need not wait for it to expire.

use std::time::Duration;

use tokio::time::Instant;

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
    /// How long after sending its last successful renewal the holder stops
    /// acting: shorter than `duration`, which others count from the renew
    /// time it wrote, so it has stopped before anyone else may take over.
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    /// Defaults: 15 s duration, renewed every 5 s, given up 10 s after the
    /// last renewal that succeeded.
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
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

/// One attempt, bounded by `limit`: a request on a half-open connection
/// would otherwise never return (the client sets no read timeout).
async fn try_acquire_within(client: &Client, cfg: &LeaseConfig, limit: Duration) -> Result<bool> {
    match tokio::time::timeout(limit, try_acquire(client, cfg)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Kube(kube::Error::Service(
            format!("no answer from the API server within {limit:?}").into(),
        ))),
    }
}

/// Waits until this process holds the Lease; returns when the request that
/// took it was sent (the start of its renew deadline).
pub async fn acquire(client: &Client, cfg: &LeaseConfig) -> Instant {
    let mut announced = false;
    loop {
        let sent = Instant::now();
        match try_acquire_within(client, cfg, cfg.renew_deadline).await {
            Ok(true) => {
                info!(lease = %cfg.name, identity = %cfg.identity, "became leader: holding Lease {}/{}", cfg.namespace, cfg.name);
                return sent;
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

/// Renews the Lease (taken by a request sent at `acquired`) until no renewal
/// has succeeded for `renew_deadline`, counted from when the last good one
/// was sent; returns then, or when another operator holds the Lease (the
/// caller stops acting).
pub async fn hold(client: &Client, cfg: &LeaseConfig, acquired: Instant) {
    let mut last_ok = acquired;
    let mut pause = cfg.renew_every;
    loop {
        let deadline = last_ok + cfg.renew_deadline;
        tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
        let sent = Instant::now();
        let left = deadline.saturating_duration_since(sent);
        if left.is_zero() {
            warn!(
                "could not renew Lease {}/{} within {:?}; stopping before it expires",
                cfg.namespace, cfg.name, cfg.renew_deadline
            );
            return;
        }
        // After a failure, retried sooner: the deadline is near.
        pause = cfg.renew_every / 5;
        match try_acquire_within(client, cfg, left).await {
            Ok(true) => {
                last_ok = sent;
                pause = cfg.renew_every;
            }
            Ok(false) => {
                warn!(
                    "lost Lease {}/{} to another operator",
                    cfg.namespace, cfg.name
                );
                return;
            }
            Err(e) => warn!(error = %e, "could not renew the Lease"),
        }
    }
}

/// Gives the Lease up (on shutdown), if this process holds it, so that a
/// successor takes it at once instead of after its duration. Best effort.
pub async fn release(client: &Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let released = async {
        let Some(mut lease) = api.get_opt(&cfg.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        api.replace(&cfg.name, &PostParams::default(), &lease)
            .await?;
        Ok::<_, kube::Error>(true)
    };
    match tokio::time::timeout(cfg.renew_every, released).await {
        Ok(Ok(true)) => info!(lease = %cfg.name, "released Lease {}/{}", cfg.namespace, cfg.name),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => warn!(error = %e, "could not release the Lease"),
        Err(_) => warn!("could not release the Lease: no answer in time"),
    }
}
