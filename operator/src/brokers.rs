//! Talking to brokers: where a pod's admin and replication endpoints are
//! ([`AddressBook`], injectable so tests can point at loopback ports), and
//! the admin calls the operator makes ([`BrokerAdmin`], gRPC in production,
//! a fake in unit tests).

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use keelmq_proto::admin as pb;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;

use crate::model::{ADMIN_PORT, GroupNames, REPLICATION_PORT};

/// Where a broker pod's endpoints are.
pub trait AddressBook: Send + Sync {
    /// `host:port` of the pod's admin API.
    fn admin(&self, group: &GroupNames, pod: &str) -> String;
    /// `host:port` of the pod's replication listener (what slaves follow).
    fn replication(&self, group: &GroupNames, pod: &str) -> String;
}

/// Production addresses: `<pod>.<group>-headless.<ns>.svc:<port>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterDns;

impl AddressBook for ClusterDns {
    fn admin(&self, group: &GroupNames, pod: &str) -> String {
        format!("{}:{ADMIN_PORT}", group.pod_host(pod))
    }
    fn replication(&self, group: &GroupNames, pod: &str) -> String {
        format!("{}:{REPLICATION_PORT}", group.pod_host(pod))
    }
}

/// Fixed addresses per pod name (tests: brokers on loopback ports).
#[derive(Clone, Debug, Default)]
pub struct StaticAddresses {
    /// pod name -> (admin, replication) `host:port`.
    pub pods: HashMap<String, (String, String)>,
}

impl AddressBook for StaticAddresses {
    fn admin(&self, _: &GroupNames, pod: &str) -> String {
        self.pods
            .get(pod)
            .map(|p| p.0.clone())
            .unwrap_or_else(|| "127.0.0.1:1".into())
    }
    fn replication(&self, _: &GroupNames, pod: &str) -> String {
        self.pods
            .get(pod)
            .map(|p| p.1.clone())
            .unwrap_or_else(|| "127.0.0.1:1".into())
    }
}

/// A failed admin call, in words.
pub type AdminError = String;

/// The broker admin calls the operator makes. Each is bounded in time.
pub trait BrokerAdmin: Send + Sync {
    /// Role, epoch and offsets.
    fn status<'a>(&'a self, addr: &'a str)
    -> BoxFuture<'a, Result<pb::StatusResponse, AdminError>>;
    /// Make the broker master of `epoch`.
    fn promote<'a>(
        &'a self,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<pb::PromoteResponse, AdminError>>;
    /// Make the broker follow `master` (replication address) in `epoch`.
    fn follow<'a>(
        &'a self,
        addr: &'a str,
        master: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<pb::FollowResponse, AdminError>>;
    /// Planned hand-over: tell the master at `addr` to pass its role to a slave.
    fn switchover<'a>(
        &'a self,
        addr: &'a str,
        req: pb::SwitchoverRequest,
    ) -> BoxFuture<'a, Result<pb::SwitchoverResponse, AdminError>>;
    /// Describe a topic; `Ok(None)` when the broker does not have it.
    fn describe_topic<'a>(
        &'a self,
        addr: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<pb::TopicInfo>, AdminError>>;
    /// Create a topic.
    fn create_topic<'a>(
        &'a self,
        addr: &'a str,
        req: pb::CreateTopicRequest,
    ) -> BoxFuture<'a, Result<pb::TopicInfo, AdminError>>;
    /// Grow a topic's queue count.
    fn update_topic<'a>(
        &'a self,
        addr: &'a str,
        req: pb::UpdateTopicRequest,
    ) -> BoxFuture<'a, Result<pb::TopicInfo, AdminError>>;
    /// Delete a topic.
    fn delete_topic<'a>(
        &'a self,
        addr: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), AdminError>>;
}

/// The admin API over gRPC (plaintext, inside the cluster network).
#[derive(Clone, Debug)]
pub struct GrpcAdmin {
    /// Limit on connecting and on each call.
    pub timeout: Duration,
}

impl Default for GrpcAdmin {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
        }
    }
}

impl GrpcAdmin {
    /// The limit on a switchover call: the broker may wait up to
    /// `req.timeout_ms` for the target to catch up before it answers, and a
    /// client that gives up first drops the call halfway through (the
    /// broker then stops it with writes refused), so the limit is that wait
    /// plus the ordinary call limit.
    pub fn switchover_timeout(&self, req: &pb::SwitchoverRequest) -> Duration {
        Duration::from_millis(req.timeout_ms).saturating_add(self.timeout)
    }

    async fn client(
        &self,
        addr: &str,
    ) -> Result<BrokerAdminClient<tonic::transport::Channel>, AdminError> {
        self.client_with_timeout(addr, self.timeout).await
    }

    async fn client_with_timeout(
        &self,
        addr: &str,
        call_timeout: Duration,
    ) -> Result<BrokerAdminClient<tonic::transport::Channel>, AdminError> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad address {addr}: {e}"))?
            .connect_timeout(self.timeout)
            .timeout(call_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        Ok(BrokerAdminClient::new(channel))
    }
}

fn status_text(s: tonic::Status) -> AdminError {
    format!("{:?}: {}", s.code(), s.message())
}

impl BrokerAdmin for GrpcAdmin {
    fn status<'a>(
        &'a self,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<pb::StatusResponse, AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            c.status(pb::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(status_text)
        })
    }
    fn promote<'a>(
        &'a self,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<pb::PromoteResponse, AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            c.promote(pb::PromoteRequest { epoch })
                .await
                .map(|r| r.into_inner())
                .map_err(status_text)
        })
    }
    fn follow<'a>(
        &'a self,
        addr: &'a str,
        master: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<pb::FollowResponse, AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            c.follow(pb::FollowRequest {
                master_address: master.to_string(),
                epoch,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(status_text)
        })
    }
    fn switchover<'a>(
        &'a self,
        addr: &'a str,
        req: pb::SwitchoverRequest,
    ) -> BoxFuture<'a, Result<pb::SwitchoverResponse, AdminError>> {
        Box::pin(async move {
            let mut c = self
                .client_with_timeout(addr, self.switchover_timeout(&req))
                .await?;
            c.switchover(req)
                .await
                .map(|r| r.into_inner())
                .map_err(status_text)
        })
    }
    fn describe_topic<'a>(
        &'a self,
        addr: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<pb::TopicInfo>, AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            match c
                .describe_topic(pb::DescribeTopicRequest {
                    name: name.to_string(),
                })
                .await
            {
                Ok(r) => Ok(r.into_inner().topic),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                Err(s) => Err(status_text(s)),
            }
        })
    }
    fn create_topic<'a>(
        &'a self,
        addr: &'a str,
        req: pb::CreateTopicRequest,
    ) -> BoxFuture<'a, Result<pb::TopicInfo, AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            c.create_topic(req)
                .await
                .map_err(status_text)?
                .into_inner()
                .topic
                .ok_or_else(|| "the broker returned no topic".to_string())
        })
    }
    fn update_topic<'a>(
        &'a self,
        addr: &'a str,
        req: pb::UpdateTopicRequest,
    ) -> BoxFuture<'a, Result<pb::TopicInfo, AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            c.update_topic(req)
                .await
                .map_err(status_text)?
                .into_inner()
                .topic
                .ok_or_else(|| "the broker returned no topic".to_string())
        })
    }
    fn delete_topic<'a>(
        &'a self,
        addr: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let mut c = self.client(addr).await?;
            c.delete_topic(pb::DeleteTopicRequest {
                name: name.to_string(),
            })
            .await
            .map(|_| ())
            .map_err(status_text)
        })
    }
}
