//! The broker's own admin gRPC service (`keelmq.admin.v1.BrokerAdmin`):
//! status, promotion, following, switchover, topics and consumer groups.
//! Used by the `keelmq` CLI, the local-group supervisor and the operator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_proto::admin as pb;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;
use keelmq_proto::admin::broker_admin_server::{BrokerAdmin, BrokerAdminServer};
use tonic::{Request, Response, Status};

use crate::messaging::slave_reads::{SlaveReadMode, SlaveReadStats, serve_read};
use crate::replication::{ReplicationError, ReplicationManager, Role};
use crate::store::group_config::{GroupConfig, RetryBackoff};
use crate::store::{MessageStore, MessageType, StoreError, TopicConfig};

/// Facts about this broker that status reports and that do not change
/// while it runs.
#[derive(Clone, Debug)]
pub struct BrokerIdentity {
    pub broker_name: String,
    pub broker_id: String,
    pub client_endpoint: String,
    pub replication_endpoint: String,
    pub flush_mode: String,
    pub default_queue_count: u32,
}

/// Extra per-group facts (in-flight messages) supplied by the messaging layer.
pub trait GroupInspector: Send + Sync + 'static {
    /// Messages of `group` on `topic`/`queue_id` handed out and not yet acked.
    fn in_flight(&self, group: &str, topic: &str, queue_id: u32) -> u64;
    /// Messages handed out again because a failover lost their delivery state.
    fn failover_redeliveries(&self) -> u64;
}

/// The admin service implementation.
#[derive(Clone)]
pub struct AdminService {
    identity: BrokerIdentity,
    store: MessageStore,
    replication: Arc<ReplicationManager>,
    started: Instant,
    groups: Option<Arc<dyn GroupInspector>>,
    slave_reads: SlaveReadMode,
    slave_read_stats: Arc<SlaveReadStats>,
}

impl AdminService {
    pub fn new(
        identity: BrokerIdentity,
        store: MessageStore,
        replication: Arc<ReplicationManager>,
        groups: Option<Arc<dyn GroupInspector>>,
    ) -> Self {
        Self {
            identity,
            store,
            replication,
            started: Instant::now(),
            groups,
            slave_reads: SlaveReadMode::Off,
            slave_read_stats: Arc::default(),
        }
    }

    /// Reports and serves slave reads with these settings and counters.
    pub fn with_slave_reads(mut self, mode: SlaveReadMode, stats: Arc<SlaveReadStats>) -> Self {
        self.slave_reads = mode;
        self.slave_read_stats = stats;
        self
    }

    pub fn into_server(self) -> BrokerAdminServer<Self> {
        BrokerAdminServer::new(self)
    }

    fn topic_info(&self, t: &TopicConfig) -> pb::TopicInfo {
        pb::TopicInfo {
            name: t.name.clone(),
            queue_count: t.queue_count,
            message_type: to_pb_type(t.message_type) as i32,
            queues: (0..t.queue_count)
                .map(|q| pb::QueueInfo {
                    queue_id: q,
                    min_offset: self.store.queue_min_offset(&t.name, q),
                    max_offset: self.store.queue_max_offset(&t.name, q),
                })
                .collect(),
        }
    }
}

fn to_pb_type(t: MessageType) -> pb::MessageType {
    match t {
        MessageType::Normal => pb::MessageType::Normal,
        MessageType::Fifo => pb::MessageType::Fifo,
        MessageType::Delay => pb::MessageType::Delay,
        MessageType::Transaction => pb::MessageType::Transaction,
    }
}

fn from_pb_type(t: i32) -> Result<MessageType, Status> {
    match pb::MessageType::try_from(t) {
        Ok(pb::MessageType::Normal) | Ok(pb::MessageType::Unspecified) => Ok(MessageType::Normal),
        Ok(pb::MessageType::Fifo) => Ok(MessageType::Fifo),
        Ok(pb::MessageType::Delay) => Ok(MessageType::Delay),
        Ok(pb::MessageType::Transaction) => Ok(MessageType::Transaction),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown message type {t}"
        ))),
    }
}

fn group_to_pb(g: &GroupConfig) -> pb::GroupSettings {
    use pb::group_settings::RetryBackoff as B;
    pb::GroupSettings {
        name: g.name.clone(),
        max_delivery_attempts: g.max_delivery_attempts,
        retry_backoff: Some(match &g.retry_backoff {
            RetryBackoff::Customized { steps_ms } => B::Customized(pb::CustomizedBackoff {
                steps_ms: steps_ms.clone(),
            }),
            RetryBackoff::Exponential {
                initial_ms,
                max_ms,
                multiplier,
            } => B::Exponential(pb::ExponentialBackoff {
                initial_ms: *initial_ms,
                max_ms: *max_ms,
                multiplier: *multiplier,
            }),
        }),
    }
}

/// Settings as asked for; omitted fields take the defaults. Validation is
/// the store's.
fn group_from_pb(g: pb::GroupSettings) -> GroupConfig {
    use pb::group_settings::RetryBackoff as B;
    let defaults = GroupConfig::defaults(&g.name);
    GroupConfig {
        max_delivery_attempts: match g.max_delivery_attempts {
            0 => defaults.max_delivery_attempts,
            n => n,
        },
        retry_backoff: match g.retry_backoff {
            None => defaults.retry_backoff,
            Some(B::Customized(c)) => RetryBackoff::Customized {
                steps_ms: c.steps_ms,
            },
            Some(B::Exponential(e)) => RetryBackoff::Exponential {
                initial_ms: e.initial_ms,
                max_ms: e.max_ms,
                multiplier: e.multiplier,
            },
        },
        name: g.name,
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::not_found(e.to_string()),
        StoreError::InvalidName(_) | StoreError::InvalidArgument(_) => {
            Status::invalid_argument(e.to_string())
        }
        StoreError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn replication_status(e: ReplicationError) -> Status {
    match e {
        ReplicationError::StaleEpoch { .. } => Status::failed_precondition(e.to_string()),
        ReplicationError::NotMaster { .. } | ReplicationError::WritesPaused => {
            Status::failed_precondition(e.to_string())
        }
        ReplicationError::Switchover(_) | ReplicationError::SlaveTimeout { .. } => {
            Status::aborted(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

/// Only the master changes topics: slaves receive them through replication.
fn require_master(r: &ReplicationManager) -> Result<(), Status> {
    if r.role() == Role::Master {
        Ok(())
    } else {
        Err(Status::failed_precondition(
            "this broker is a slave; change topics on the master",
        ))
    }
}

#[tonic::async_trait]
impl BrokerAdmin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let r = self.replication.status();
        Ok(Response::new(pb::StatusResponse {
            broker_name: self.identity.broker_name.clone(),
            broker_id: self.identity.broker_id.clone(),
            role: match r.role {
                Role::Master => pb::Role::Master,
                Role::Slave => pb::Role::Slave,
            } as i32,
            epoch: r.epoch,
            epochs: r
                .epochs
                .iter()
                .map(|e| pb::EpochEntry {
                    epoch: e.epoch,
                    start_offset: e.start_offset,
                })
                .collect(),
            min_offset: self.store.min_offset(),
            max_offset: self.store.max_offset(),
            flushed_offset: self.store.flushed_offset(),
            confirmed_offset: r.confirmed_offset,
            master_address: r.master_address.unwrap_or_default(),
            slaves: r
                .slaves
                .iter()
                .map(|s| pb::SlaveStatus {
                    broker_id: s.broker_id.clone(),
                    address: s.admin_address.clone(),
                    acked_offset: s.acked_offset,
                    lag_bytes: s.lag_bytes,
                    connected: s.connected,
                    in_sync: s.in_sync,
                    millis_since_last_ack: s.millis_since_last_ack,
                })
                .collect(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            replication_mode: r.mode.to_string(),
            flush_mode: self.identity.flush_mode.clone(),
            min_in_sync_replicas: r.min_in_sync_replicas,
            writable: r.writable,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store_id: self.store.store_id().to_owned(),
            client_endpoint: self.identity.client_endpoint.clone(),
            replication_endpoint: self.identity.replication_endpoint.clone(),
            failover_redeliveries: self
                .groups
                .as_ref()
                .map_or(0, |g| g.failover_redeliveries()),
            slave_read_mode: self.slave_reads.to_string(),
            records_read_from_slaves: SlaveReadStats::get(&self.slave_read_stats.read_from_slaves),
            slave_read_fallbacks: SlaveReadStats::get(&self.slave_read_stats.fallbacks),
            records_served_to_master: SlaveReadStats::get(&self.slave_read_stats.served_to_master),
        }))
    }

    async fn read_records(
        &self,
        req: Request<pb::ReadRecordsRequest>,
    ) -> Result<Response<pb::ReadRecordsResponse>, Status> {
        let req = req.into_inner();
        let (store, replication, stats) = (
            self.store.clone(),
            self.replication.clone(),
            self.slave_read_stats.clone(),
        );
        // Reading may fault pages in from disk: keep it off the async workers.
        let records =
            tokio::task::spawn_blocking(move || serve_read(&store, &replication, &stats, &req))
                .await
                .map_err(|e| Status::internal(format!("read task failed: {e}")))??;
        Ok(Response::new(pb::ReadRecordsResponse { records }))
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let epoch = req.into_inner().epoch;
        let entry = self
            .replication
            .promote(epoch)
            .map_err(replication_status)?;
        Ok(Response::new(pb::PromoteResponse {
            epoch: entry.epoch,
            start_offset: entry.start_offset,
        }))
    }

    async fn follow(
        &self,
        req: Request<pb::FollowRequest>,
    ) -> Result<Response<pb::FollowResponse>, Status> {
        let req = req.into_inner();
        if req.master_address.is_empty() {
            return Err(Status::invalid_argument("master_address is required"));
        }
        self.replication
            .follow(req.master_address, req.epoch)
            .map_err(replication_status)?;
        Ok(Response::new(pb::FollowResponse {
            truncated_to: 0,
            truncated: false,
        }))
    }

    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::SwitchoverResponse>, Status> {
        let req = req.into_inner();
        let target_admin = if req.target_admin_address.is_empty() {
            self.replication
                .status()
                .slaves
                .into_iter()
                .find(|s| s.broker_id == req.target_broker_id)
                .map(|s| s.admin_address)
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "{} is not a connected slave",
                        req.target_broker_id
                    ))
                })?
        } else {
            req.target_admin_address.clone()
        };
        let timeout = Duration::from_millis(if req.timeout_ms == 0 {
            10_000
        } else {
            req.timeout_ms
        });
        // The hand-over runs on its own task: a caller that gives up (its
        // deadline, a dropped connection) must not cut it off halfway, with
        // writes stopped and no new master.
        let replication = self.replication.clone();
        let target = req.target_broker_id.clone();
        let new_epoch = req.new_epoch;
        let handover = tokio::spawn(async move {
            replication
                .switchover(&target, new_epoch, timeout, |epoch| {
                    promote_remote(target_admin, epoch)
                })
                .await
        });
        let pause = handover
            .await
            .map_err(|e| Status::internal(format!("switchover task: {e}")))?
            .map_err(replication_status)?;
        Ok(Response::new(pb::SwitchoverResponse {
            epoch: req.new_epoch,
            write_pause_ms: pause.as_millis() as u64,
        }))
    }

    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::TopicResponse>, Status> {
        require_master(&self.replication)?;
        let req = req.into_inner();
        let queue_count = if req.queue_count == 0 {
            self.identity.default_queue_count
        } else {
            req.queue_count
        };
        let topic = TopicConfig {
            name: req.name,
            queue_count,
            message_type: from_pb_type(req.message_type)?,
        };
        self.store
            .metadata()
            .create_topic(topic.clone())
            .map_err(store_status)?;
        Ok(Response::new(pb::TopicResponse {
            topic: Some(self.topic_info(&topic)),
        }))
    }

    async fn update_topic(
        &self,
        req: Request<pb::UpdateTopicRequest>,
    ) -> Result<Response<pb::TopicResponse>, Status> {
        require_master(&self.replication)?;
        let req = req.into_inner();
        let topic = self
            .store
            .metadata()
            .update_topic_queues(&req.name, req.queue_count)
            .map_err(store_status)?;
        Ok(Response::new(pb::TopicResponse {
            topic: Some(self.topic_info(&topic)),
        }))
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        require_master(&self.replication)?;
        self.store
            .metadata()
            .delete_topic(&req.into_inner().name)
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self
            .store
            .metadata()
            .list_topics()
            .iter()
            .map(|t| self.topic_info(t))
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        req: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::TopicResponse>, Status> {
        let name = req.into_inner().name;
        let topic = self
            .store
            .metadata()
            .get_topic(&name)
            .ok_or_else(|| Status::not_found(format!("topic {name} does not exist")))?;
        Ok(Response::new(pb::TopicResponse {
            topic: Some(self.topic_info(&topic)),
        }))
    }

    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let mut groups: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        // The broker's own progress records (transactions, timers, the
        // delivery log) are kept as offsets of `%SYS_` groups: not consumers.
        for o in self.store.metadata().list_offsets() {
            if !o.group.starts_with("%SYS_") {
                groups.entry(o.group).or_default().insert(o.topic);
            }
        }
        // Groups with settings are listed before they consume anything.
        for g in self.store.metadata().list_groups() {
            groups.entry(g.name).or_default();
        }
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|(name, topics)| pb::GroupSummary {
                    name,
                    topics: topics.into_iter().collect(),
                })
                .collect(),
        }))
    }

    async fn describe_group(
        &self,
        req: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let name = req.into_inner().name;
        let queues: Vec<pb::GroupQueueState> = self
            .store
            .metadata()
            .list_offsets()
            .into_iter()
            .filter(|o| o.group == name)
            .map(|o| {
                let max = self.store.queue_max_offset(&o.topic, o.queue_id);
                pb::GroupQueueState {
                    in_flight: self
                        .groups
                        .as_ref()
                        .map_or(0, |g| g.in_flight(&name, &o.topic, o.queue_id)),
                    lag: max.saturating_sub(o.offset),
                    max_offset: max,
                    committed_offset: o.offset,
                    queue_id: o.queue_id,
                    topic: o.topic,
                }
            })
            .collect();
        let configured = self.store.metadata().get_group(&name);
        if queues.is_empty() && configured.is_none() {
            return Err(Status::not_found(format!(
                "consumer group {name} has no committed offsets and no settings"
            )));
        }
        let settings = configured
            .clone()
            .unwrap_or_else(|| GroupConfig::defaults(&name));
        Ok(Response::new(pb::DescribeGroupResponse {
            name,
            queues,
            settings: Some(group_to_pb(&settings)),
            configured: configured.is_some(),
        }))
    }

    async fn set_group(
        &self,
        req: Request<pb::SetGroupRequest>,
    ) -> Result<Response<pb::GroupSettings>, Status> {
        require_master(&self.replication)?;
        let settings = req
            .into_inner()
            .settings
            .ok_or_else(|| Status::invalid_argument("settings are required"))?;
        let group = group_from_pb(settings);
        self.store
            .metadata()
            .set_group(group.clone())
            .map_err(store_status)?;
        Ok(Response::new(group_to_pb(&group)))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        require_master(&self.replication)?;
        self.store
            .metadata()
            .delete_group(&req.into_inner().name)
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }
}

/// Asks the broker at `admin` to become master of `epoch` (the last step of a
/// switchover). When no answer comes (a timeout, a dropped connection), the
/// target is asked what it is now: had it taken the role, this master must
/// follow it rather than take writes again.
async fn promote_remote(admin: String, epoch: u64) -> Result<(), String> {
    const CALL: Duration = Duration::from_secs(5);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin}"))
        .map_err(|e| format!("{admin}: {e}"))?
        .connect_timeout(CALL)
        .connect()
        .await
        .map_err(|e| format!("connect {admin}: {e}"))?;
    let mut client = BrokerAdminClient::new(channel);
    let e = match tokio::time::timeout(CALL, client.promote(pb::PromoteRequest { epoch })).await {
        Ok(Ok(_)) => return Ok(()),
        // The target answered and refused: it did not take the role.
        Ok(Err(e))
            if !matches!(
                e.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
            ) =>
        {
            return Err(e.message().to_owned());
        }
        Ok(Err(e)) => e.message().to_owned(),
        Err(_) => format!("no answer within {CALL:?}"),
    };
    match tokio::time::timeout(CALL, client.status(pb::StatusRequest {})).await {
        Ok(Ok(s)) if s.get_ref().role == pb::Role::Master as i32 && s.get_ref().epoch >= epoch => {
            tracing::warn!(target = %admin, epoch, error = %e, "the promote call failed but the target is master of the new epoch");
            Ok(())
        }
        Ok(Ok(_)) => Err(e),
        _ => Err(format!(
            "{e}; and {admin} did not say whether it took the role"
        )),
    }
}
