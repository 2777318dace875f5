//! The RocketMQ 5 client protocol (`apache.rocketmq.v2.MessagingService`):
//! what the official clients call, mapped onto the store, the write path
//! and the consumption state. Every answer carries a protocol `Status`;
//! gRPC errors are kept for RPCs the broker does not implement.

mod convert;
mod metered;
mod producers;
mod settings;
pub mod tls;
mod txn;

pub use metered::{ClientMetrics, GroupLabels, Metered};

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use keelmq_proto::rocketmq::v2 as pb;
use keelmq_proto::rocketmq::v2::messaging_service_server::{
    MessagingService, MessagingServiceServer,
};
use pb::Code;
use tonic::{Request, Response, Status, Streaming};

use crate::messaging::arrivals::Arrivals;
use crate::messaging::consumer::{
    Claimed, Consumption, HandleError, RENEW_INVISIBLE_MS, ReceiveRequest, Recorded, TagFilter,
};
use crate::messaging::delivery_log::RemoveEntry;
use crate::messaging::slave_reads::SlaveReads;
use crate::messaging::timer::Timer;
use crate::messaging::transaction::{self, TransactionConfig, Transactions};
use crate::replication::{ReplicationError, ReplicationManager};
use crate::store::{MessageStore, MessageType, StoreError, TopicConfig, keys, now_ms};
use crate::write_path::{WriteError, WritePath};

/// Settings of the client API.
#[derive(Clone, Debug)]
pub struct ClientApiConfig {
    /// Broker group name reported in routes.
    pub broker_name: String,
    /// Host and port clients should dial for this broker.
    pub advertised_host: String,
    pub advertised_port: u16,
    /// Largest message body accepted (default 4 MiB, as RocketMQ).
    pub max_body_size: usize,
    /// Create unknown topics on first use.
    pub auto_create_topics: bool,
    pub default_queue_count: u32,
    /// Transaction check-back timing.
    pub transactions: TransactionConfig,
}

/// Server-side bounds of long polling (RocketMQ proxy defaults).
const MIN_POLLING: Duration = Duration::from_secs(5);
const MAX_POLLING: Duration = Duration::from_secs(20);
/// Bounds of the invisible duration a consumer may ask for.
const MIN_INVISIBLE: Duration = Duration::from_secs(10);
const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);
/// Invisible duration used when the client asks the server to renew.
const AUTO_RENEW_INVISIBLE: Duration = Duration::from_millis(RENEW_INVISIBLE_MS as u64);
/// How often `auto_renew` deliveries are renewed (the proxy's
/// `renewSchedulePeriodMillis`).
const RENEW_PERIOD: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive of the client port: a ping after this long without
/// anything read from a connection, which is closed when the ping is not
/// answered in time. A client host that vanished without closing its
/// connections (power loss, a cut network path) then loses its Telemetry
/// streams within a minute, instead of keeping its place as a producer
/// that takes transaction check-backs nobody answers.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The server of the client port, with HTTP/2 keepalive pings every
/// `interval` of silence, unanswered ones closing the connection after
/// `timeout` (see [`HTTP2_KEEPALIVE_INTERVAL`]).
pub fn server_builder(interval: Duration, timeout: Duration) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(interval))
        .http2_keepalive_timeout(Some(timeout))
}

/// The `MessagingService` implementation.
#[derive(Clone)]
pub struct ClientApi {
    cfg: Arc<ClientApiConfig>,
    store: MessageStore,
    write: WritePath,
    consumption: Arc<Consumption>,
    /// Wakes long-polling receives when their topic is written to (the
    /// consumption state's: dead letters it writes wake them too).
    arrivals: Arc<Arrivals>,
    round_robin: Arc<AtomicU64>,
    /// Half messages and their decisions.
    transactions: Arc<Transactions>,
    /// Producer Telemetry streams, for transaction check-back.
    producers: Arc<producers::ProducerStreams>,
    /// Clients with a Telemetry stream, whose `auto_renew` deliveries are renewed.
    clients: Arc<producers::LiveClients>,
    /// Where received records are read from (a slave, or this broker).
    slave_reads: Option<Arc<SlaveReads>>,
    /// When consumers were last warned about unconfirmed delivery records.
    unconfirmed_warned_ms: Arc<AtomicI64>,
    /// How often a waiting receive looks again without being woken (for
    /// in-flight messages whose invisible time ran out).
    recheck: Duration,
    /// What the client port answered (see [`Metered`]).
    metrics: Arc<ClientMetrics>,
}

/// See [`ClientApi::recheck`].
const RECHECK: Duration = Duration::from_millis(500);

impl ClientApi {
    pub fn new(cfg: ClientApiConfig, write: WritePath, consumption: Arc<Consumption>) -> Self {
        let transactions = Arc::new(Transactions::new(
            write.store().clone(),
            cfg.transactions.clone(),
        ));
        Self {
            store: write.store().clone(),
            cfg: Arc::new(cfg),
            write,
            arrivals: consumption.arrivals(),
            consumption,
            round_robin: Arc::new(AtomicU64::new(0)),
            transactions,
            producers: Arc::default(),
            clients: Arc::default(),
            slave_reads: None,
            unconfirmed_warned_ms: Arc::default(),
            recheck: RECHECK,
            metrics: Arc::default(),
        }
    }

    /// Consumption state lives on the master (a slave's would diverge from
    /// it): a slave refuses receives and acks with the status clients treat
    /// as "ask the route again". The master reads from slaves itself.
    fn consumer_refusal(&self) -> Option<pb::Status> {
        let r = self.write.replication();
        (r.role() == crate::replication::Role::Slave).then(|| {
            status(
                Code::HaNotAvailable,
                format!(
                    "this broker is a slave; consumers are served by the master{}",
                    r.master_client_endpoint()
                        .map(|e| format!(" at {e}"))
                        .unwrap_or_default()
                ),
            )
        })
    }

    /// Runs a change of the consumption state (which appends delivery
    /// records, and dead letters) through the write gate, as a send: refused
    /// with HA_NOT_AVAILABLE unless this broker is a master taking writes, so
    /// no record a switchover did not count reaches the log while it hands
    /// over. `change` must not take the gate itself.
    fn gated<T>(&self, change: impl FnOnce() -> T) -> Result<T, pb::Status> {
        let _gate = self
            .write
            .replication()
            .admit()
            .map_err(|e| write_error_status(&WriteError::Refused(e)))?;
        Ok(change())
    }

    /// OK once a consumer's change, whose delivery records are `recorded`,
    /// is flushed as the flush mode promises and, when enough slaves are in
    /// sync, replicated; the write status when the flush failed or the log
    /// was cut under the records.
    async fn confirm(&self, recorded: Option<Recorded>) -> pb::Status {
        let Some(recorded) = recorded else {
            return ok();
        };
        match self.write.wait_delivery_record(recorded.span()).await {
            Ok(true) => ok(),
            Ok(false) => {
                let now = now_ms();
                let last = self.unconfirmed_warned_ms.load(Ordering::Relaxed);
                if now - last >= 10_000 {
                    self.unconfirmed_warned_ms.store(now, Ordering::Relaxed);
                    tracing::warn!(
                        "consumers are served although the slaves did not confirm their delivery records: a failover now may deliver some messages again"
                    );
                }
                ok()
            }
            Err(e) => write_error_status(&e),
        }
    }

    /// Reads received records from slaves as `reads` decides.
    pub fn with_slave_reads(mut self, reads: Arc<SlaveReads>) -> Self {
        self.slave_reads = Some(reads);
        self
    }

    /// Renews the `auto_renew` deliveries of connected clients every
    /// [`RENEW_PERIOD`] until `stop` resolves (see [`Consumption::renew`]).
    /// Only the master holds deliveries to renew.
    pub async fn run_renewals(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(RENEW_PERIOD) => {}
            }
            if self.write.replication().role() != crate::replication::Role::Master {
                continue;
            }
            let clients = self.clients.clone();
            // Not while writes are paused (a switchover): the next round renews.
            let Ok((_, logged)) =
                self.gated(|| self.consumption.renew(now_ms(), |c| clients.contains(c)))
            else {
                continue;
            };
            if let Err(e) = logged {
                tracing::warn!(error = %e, "recording renewed deliveries failed; a failover may hand them out again early");
            }
        }
    }

    /// The transactional-message state (for metrics).
    pub fn transactions(&self) -> Arc<Transactions> {
        self.transactions.clone()
    }

    /// The client port's counters (for metrics).
    pub fn metrics(&self) -> Arc<ClientMetrics> {
        self.metrics.clone()
    }

    /// The tonic service, its calls counted in [`ClientApi::metrics`],
    /// accepting messages up to 130 MiB (batches of maximum-size bodies), as
    /// the RocketMQ proxy does.
    pub fn into_server(self) -> MessagingServiceServer<Metered> {
        let metrics = self.metrics.clone();
        MessagingServiceServer::new(Metered::new(self, metrics))
            .max_decoding_message_size(130 << 20)
            .max_encoding_message_size(130 << 20)
    }

    /// The topic's queues as clients are to reach them (routes and
    /// assignments): a slave sends clients to its master, so it lists the
    /// current master's queues.
    fn client_queues(&self, t: &TopicConfig) -> Vec<pb::MessageQueue> {
        let master = self
            .write
            .replication()
            .master_client_endpoint()
            .and_then(|ep| {
                let (host, port) = ep.rsplit_once(':')?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Some((host.to_owned(), port.parse::<u16>().ok()?))
            });
        (0..t.queue_count)
            .map(|q| match &master {
                Some((host, port)) => convert::queue_at(&self.cfg, t, q, host, *port),
                None => convert::queue(&self.cfg, t, q),
            })
            .collect()
    }

    fn topic(&self, name: &str) -> Result<TopicConfig, pb::Status> {
        if let Some(t) = self.store.metadata().get_topic(name) {
            return Ok(t);
        }
        // Never auto-create over a system topic (half messages, timers):
        // consumers would read what is not theirs to see.
        if self.cfg.auto_create_topics
            && !name.starts_with("%SYS_")
            && crate::store::record::validate_topic(name).is_ok()
        {
            let created = self.store.metadata().ensure_topic(TopicConfig {
                name: name.to_owned(),
                queue_count: self.cfg.default_queue_count,
                message_type: MessageType::Normal,
            });
            if let Ok(t) = created {
                tracing::info!(
                    topic = name,
                    queues = t.queue_count,
                    "topic created on first use"
                );
                return Ok(t);
            }
        }
        Err(status(
            Code::TopicNotFound,
            format!("topic {name} does not exist"),
        ))
    }
}

/// A protocol status.
pub fn status(code: Code, message: impl Into<String>) -> pb::Status {
    pb::Status {
        code: code as i32,
        message: message.into(),
    }
}

fn ok() -> pb::Status {
    status(Code::Ok, "OK")
}

/// The client id every request must carry.
fn client_id<T>(req: &Request<T>) -> Result<String, pb::Status> {
    req.metadata()
        .get("x-mq-client-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| status(Code::ClientIdRequired, "x-mq-client-id header is required"))
}

/// Refuses a consumer group the broker cannot serve: its dead-letter topic
/// `%DLQ%<group>` must be a valid topic, or its messages out of attempts
/// would have nowhere to go. The rule is the one group settings follow.
fn consumer_group(name: &str) -> Result<(), pb::Status> {
    crate::store::group_config::validate_group_name(name)
        .map_err(|e| status(Code::IllegalConsumerGroup, e.to_string()))
}

/// Time left before the client's gRPC deadline (`grpc-timeout` header):
/// at most 8 digits and a unit, as gRPC defines it; `None` for anything
/// else.
fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn duration(d: &prost_types::Duration) -> Option<Duration> {
    (d.seconds >= 0 && d.nanos >= 0).then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}

fn resource_name(r: &Option<pb::Resource>) -> &str {
    r.as_ref().map_or("", |r| r.name.as_str())
}

fn write_error_status(e: &WriteError) -> pb::Status {
    match e {
        WriteError::Refused(ReplicationError::NotMaster { .. }) => status(
            Code::HaNotAvailable,
            format!("{e}; the route will point at the new master"),
        ),
        WriteError::Refused(_) => status(Code::HaNotAvailable, e.to_string()),
        WriteError::FlushTimeout(_) => status(Code::MasterPersistenceTimeout, e.to_string()),
        WriteError::ReplicationTimeout(_) => status(Code::SlavePersistenceTimeout, e.to_string()),
        WriteError::Store(StoreError::RecordTooLarge { .. }) => {
            status(Code::MessageBodyTooLarge, e.to_string())
        }
        WriteError::Store(StoreError::InvalidName(_)) => status(Code::IllegalTopic, e.to_string()),
        WriteError::Store(StoreError::InvalidArgument(_)) => {
            status(Code::BadRequest, e.to_string())
        }
        // Too much waiting for a stalled flush: the client backs off and retries.
        WriteError::Store(StoreError::Busy(_)) => status(Code::TooManyRequests, e.to_string()),
        // The log was cut under the record (this broker stopped being the
        // master): the send was not kept, and the new master takes it.
        WriteError::Store(StoreError::Truncated { .. }) => {
            status(Code::HaNotAvailable, e.to_string())
        }
        WriteError::Store(_) => status(Code::InternalServerError, e.to_string()),
    }
}

type ReceiveStream = Pin<Box<dyn Stream<Item = Result<pb::ReceiveMessageResponse, Status>> + Send>>;
type TelemetryStream = Pin<Box<dyn Stream<Item = Result<pb::TelemetryCommand, Status>> + Send>>;
type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullMessageResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MessagingService for ClientApi {
    async fn query_route(
        &self,
        req: Request<pb::QueryRouteRequest>,
    ) -> Result<Response<pb::QueryRouteResponse>, Status> {
        if let Err(s) = client_id(&req) {
            return Ok(Response::new(pb::QueryRouteResponse {
                status: Some(s),
                message_queues: vec![],
            }));
        }
        let name = resource_name(&req.get_ref().topic).to_owned();
        let resp = match self.topic(&name) {
            Err(s) => pb::QueryRouteResponse {
                status: Some(s),
                message_queues: vec![],
            },
            Ok(t) => pb::QueryRouteResponse {
                status: Some(ok()),
                message_queues: self.client_queues(&t),
            },
        };
        Ok(Response::new(resp))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let s = client_id(&req).err().unwrap_or_else(ok);
        Ok(Response::new(pb::HeartbeatResponse { status: Some(s) }))
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        if let Err(s) = client_id(&req) {
            return Ok(Response::new(pb::SendMessageResponse {
                status: Some(s),
                entries: vec![],
            }));
        }
        let born_host = req
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let messages = req.into_inner().messages;
        if messages.is_empty() {
            return Ok(Response::new(pb::SendMessageResponse {
                status: Some(status(Code::BadRequest, "no messages to send")),
                entries: vec![],
            }));
        }
        // Validate everything first: a batch is stored whole or not at all.
        let mut records = Vec::with_capacity(messages.len());
        let mut ids = Vec::with_capacity(messages.len());
        let mut half = Vec::with_capacity(messages.len());
        let mut topic: Option<TopicConfig> = None;
        for m in &messages {
            // A batch is usually for one topic: look it up once.
            let name = resource_name(&m.topic);
            let topic = match topic.take() {
                Some(t) if t.name == name => topic.insert(t),
                _ => match self.topic(name) {
                    Ok(t) => topic.insert(t),
                    Err(s) => return Ok(Response::new(send_failure(s, &messages))),
                },
            };
            let queue = self.round_robin.fetch_add(1, Ordering::Relaxed);
            match convert::record(&self.cfg, topic, m, queue, &born_host) {
                Ok(r) => {
                    let due = r
                        .properties
                        .get(keys::DELIVERY_TIME)
                        .and_then(|t| t.parse::<i64>().ok());
                    let is_half = topic.message_type == MessageType::Transaction;
                    let r = match due {
                        _ if is_half => Transactions::hold(r, recovery_delay(m)),
                        Some(due) if due > now_ms() => Timer::hold(r, due),
                        _ => r,
                    };
                    half.push(is_half);
                    ids.push(
                        m.system_properties
                            .as_ref()
                            .map(|p| p.message_id.clone())
                            .unwrap_or_default(),
                    );
                    records.push(r);
                }
                Err(s) => return Ok(Response::new(send_failure(s, &messages))),
            }
        }
        // The topics written to: a message held for later (delayed, or a
        // half message) is in a system topic nobody receives from, and wakes
        // its topic's receives when the timer or the commit writes it there.
        let mut written: Vec<String> = Vec::new();
        for r in &records {
            if !written.contains(&r.topic) {
                written.push(r.topic.clone());
            }
        }
        let resp = match self.write.write(records).await {
            Ok(appended) => {
                self.arrivals
                    .notify_each(written.iter().map(String::as_str));
                pb::SendMessageResponse {
                    status: Some(ok()),
                    entries: appended
                        .iter()
                        .zip(ids)
                        .zip(half)
                        .map(|((a, id), is_half)| pb::SendResultEntry {
                            status: Some(ok()),
                            transaction_id: if is_half {
                                transaction::transaction_id(a.queue_offset, &id)
                            } else {
                                String::new()
                            },
                            message_id: id,
                            offset: a.queue_offset as i64,
                            recall_handle: String::new(),
                        })
                        .collect(),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "send failed");
                send_failure(write_error_status(&e), &messages)
            }
        };
        Ok(Response::new(resp))
    }

    async fn query_assignment(
        &self,
        req: Request<pb::QueryAssignmentRequest>,
    ) -> Result<Response<pb::QueryAssignmentResponse>, Status> {
        if let Err(s) = client_id(&req) {
            return Ok(Response::new(pb::QueryAssignmentResponse {
                status: Some(s),
                assignments: vec![],
            }));
        }
        let resp = match self.topic(resource_name(&req.get_ref().topic)) {
            Err(s) => pb::QueryAssignmentResponse {
                status: Some(s),
                assignments: vec![],
            },
            Ok(t) => pb::QueryAssignmentResponse {
                status: Some(ok()),
                assignments: self
                    .client_queues(&t)
                    .into_iter()
                    .map(|q| pb::Assignment {
                        message_queue: Some(q),
                    })
                    .collect(),
            },
        };
        Ok(Response::new(resp))
    }

    type ReceiveMessageStream = ReceiveStream;

    async fn receive_message(
        &self,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        let started = Instant::now();
        let one = |s: pb::Status| -> Result<Response<ReceiveStream>, Status> {
            let frames = vec![
                Ok(pb::ReceiveMessageResponse {
                    content: Some(pb::receive_message_response::Content::Status(s)),
                }),
                Ok(delivery_timestamp()),
            ];
            Ok(Response::new(Box::pin(futures::stream::iter(frames))))
        };
        let client = match client_id(&req) {
            Ok(c) => c,
            Err(s) => return one(s),
        };
        if let Some(s) = self.consumer_refusal() {
            return one(s);
        }
        let grpc_deadline = deadline(&req);
        let r = req.into_inner();
        let group = resource_name(&r.group).to_owned();
        if let Err(s) = consumer_group(&group) {
            return one(s);
        }
        let topic_name = r
            .message_queue
            .as_ref()
            .map(|q| resource_name(&q.topic).to_owned())
            .unwrap_or_default();
        let topic = match self.topic(&topic_name) {
            Ok(t) => t,
            Err(s) => return one(s),
        };
        let invisible = if r.auto_renew {
            AUTO_RENEW_INVISIBLE
        } else {
            match r.invisible_duration.as_ref().and_then(duration) {
                Some(d) if (MIN_INVISIBLE..=MAX_INVISIBLE).contains(&d) => d,
                Some(d) => {
                    return one(status(
                        Code::IllegalInvisibleTime,
                        format!(
                            "invisible duration {d:?} is outside [{MIN_INVISIBLE:?}, {MAX_INVISIBLE:?}]"
                        ),
                    ));
                }
                None => {
                    return one(status(
                        Code::IllegalInvisibleTime,
                        "invisible duration is required",
                    ));
                }
            }
        };
        let requested = match r.long_polling_timeout.as_ref() {
            None => MAX_POLLING,
            Some(d) => match duration(d) {
                Some(d) => d.clamp(MIN_POLLING, MAX_POLLING),
                None => {
                    return one(status(
                        Code::IllegalPollingTime,
                        "long polling timeout is negative",
                    ));
                }
            },
        };
        // Answer before the client gives up: some clients set the gRPC
        // deadline to the polling time itself.
        let polling = match grpc_deadline {
            Some(d) if d < Duration::from_secs(1) => {
                return one(status(
                    Code::IllegalPollingTime,
                    format!("only {d:?} left before the deadline"),
                ));
            }
            Some(d) => requested.min(
                d.saturating_sub(d / 10)
                    .max(d.saturating_sub(Duration::from_secs(2))),
            ),
            None => requested,
        };
        let filter = match r.filter_expression.as_ref() {
            None => TagFilter::All,
            Some(f) if f.r#type == pb::FilterType::Sql as i32 => {
                return one(status(
                    Code::IllegalFilterExpression,
                    "SQL92 filters are not supported; use TAG expressions",
                ));
            }
            Some(f) => TagFilter::parse(&f.expression),
        };
        // At most 1024 messages and (by the claim) about 4 MiB: see
        // `MAX_RECEIVE_BYTES`.
        let batch = r.batch_size.clamp(1, 1024) as usize;
        let fifo = topic.message_type == MessageType::Fifo;
        let until = started + polling;
        // What this receive claimed and has not handed to its client yet:
        // given back when the receive fails or is dropped before that.
        let mut handout = Handout {
            consumption: self.consumption.clone(),
            replication: self.write.replication().clone(),
            group: group.clone(),
            topic: topic.name.clone(),
            entries: Vec::new(),
        };
        // Woken by messages written to this topic only.
        let watch = self.arrivals.watch(&topic.name);
        loop {
            // Registered before looking, so a send that lands between the
            // look and the wait still wakes this receive.
            let notified = watch.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let request = ReceiveRequest {
                group: &group,
                topic: &topic.name,
                queue_count: topic.queue_count,
                max_messages: batch,
                invisible_ms: invisible.as_millis() as i64,
                filter: &filter,
                fifo,
                max_attempts: self.store.metadata().max_delivery_attempts(&group),
                now_ms: now_ms(),
                renew_for: r.auto_renew.then_some(client.as_str()),
                attempt: r
                    .attempt_id
                    .as_deref()
                    .filter(|a| !a.is_empty())
                    .map(|a| (client.as_str(), a)),
            };
            let claimed = match self.gated(|| self.consumption.claim(&request)) {
                Ok(c) => c,
                Err(s) => return one(s),
            };
            let got = match claimed {
                Ok(claim) if claim.items.is_empty() => Ok(Vec::new()),
                Ok(claim) => {
                    handout.entries = claim.items.iter().map(Claimed::entry).collect();
                    // The delivery record is made durable (and replicated when
                    // the slaves can confirm it) before anything is handed out,
                    // so a restart or failover keeps it.
                    let recorded = self.confirm(claim.durable_at).await;
                    if recorded.code != Code::Ok as i32 {
                        handout.give_back();
                        return one(recorded);
                    }
                    let records = match &self.slave_reads {
                        Some(reads) => reads.read(&topic.name, &claim.items).await,
                        None => self.consumption.read_local(&topic.name, &claim.items),
                    };
                    let completed = match self
                        .gated(|| self.consumption.complete(&request, claim.items, records))
                    {
                        Ok(c) => c,
                        Err(s) => {
                            handout.give_back();
                            return one(s);
                        }
                    };
                    // What complete did not hand out it settled, or left in
                    // flight unrenewed (unreadable) to come back in time.
                    handout.entries.clear();
                    match completed {
                        // Everything claimed was filtered out: look again.
                        Ok(msgs) if msgs.is_empty() => continue,
                        other => other,
                    }
                }
                Err(e) => Err(e),
            };
            match got {
                Err(e) => return one(status(Code::InternalServerError, e.to_string())),
                Ok(msgs) if !msgs.is_empty() => {
                    let mut frames = vec![Ok(pb::ReceiveMessageResponse {
                        content: Some(pb::receive_message_response::Content::Status(ok())),
                    })];
                    handout.entries = msgs
                        .iter()
                        .map(|d| RemoveEntry {
                            queue_id: d.handle.queue_id,
                            queue_offset: d.handle.queue_offset,
                            delivery: d.handle.delivery,
                        })
                        .collect();
                    for d in msgs {
                        let m = convert::message(&self.cfg, &topic, &d.record, Some(&d), invisible);
                        frames.push(Ok(pb::ReceiveMessageResponse {
                            content: Some(pb::receive_message_response::Content::Message(m)),
                        }));
                    }
                    frames.push(Ok(delivery_timestamp()));
                    return Ok(Response::new(Box::pin(Frames {
                        frames: frames.into(),
                        handout: Some(handout),
                    })));
                }
                Ok(_) => {}
            }
            let now = Instant::now();
            if now >= until {
                return one(status(Code::MessageNotFound, "no new message"));
            }
            // Wake on a new message, or re-check for expiring in-flight ones.
            let _ = tokio::time::timeout((until - now).min(self.recheck), notified).await;
        }
    }

    async fn ack_message(
        &self,
        req: Request<pb::AckMessageRequest>,
    ) -> Result<Response<pb::AckMessageResponse>, Status> {
        if let Err(s) = client_id(&req) {
            return Ok(Response::new(pb::AckMessageResponse {
                status: Some(s),
                entries: vec![],
            }));
        }
        let r = req.into_inner();
        if let Some(s) = self.consumer_refusal() {
            return Ok(Response::new(pb::AckMessageResponse {
                status: Some(s),
                entries: vec![],
            }));
        }
        let group = resource_name(&r.group);
        if let Err(s) = consumer_group(group) {
            return Ok(Response::new(pb::AckMessageResponse {
                status: Some(s),
                entries: vec![],
            }));
        }
        let topic = resource_name(&r.topic);
        let handles: Vec<&str> = r
            .entries
            .iter()
            .map(|e| e.receipt_handle.as_str())
            .collect();
        let (results, logged) =
            match self.gated(|| self.consumption.ack_many(group, topic, &handles)) {
                Ok(done) => done,
                Err(s) => {
                    return Ok(Response::new(pb::AckMessageResponse {
                        entries: r
                            .entries
                            .iter()
                            .map(|e| pb::AckMessageResultEntry {
                                message_id: e.message_id.clone(),
                                receipt_handle: e.receipt_handle.clone(),
                                status: Some(s.clone()),
                            })
                            .collect(),
                        status: Some(s),
                    }));
                }
            };
        // An ack is confirmed once its delivery record is as durable as a
        // send: a failover then never hands the message out again.
        let unconfirmed = match logged {
            Ok(end) => Some(self.confirm(end).await).filter(|s| s.code != Code::Ok as i32),
            Err(e) => Some(status(
                Code::InternalServerError,
                format!("the acks could not be recorded: {e}"),
            )),
        };
        let mut all_ok = true;
        let entries: Vec<_> = r
            .entries
            .iter()
            .zip(results)
            .map(|(e, result)| {
                let s = match (result, &unconfirmed) {
                    (Ok(()), None) => ok(),
                    (Ok(()), Some(failed)) => {
                        all_ok = false;
                        failed.clone()
                    }
                    (Err(err), _) => {
                        all_ok = false;
                        handle_status(&err)
                    }
                };
                pb::AckMessageResultEntry {
                    message_id: e.message_id.clone(),
                    receipt_handle: e.receipt_handle.clone(),
                    status: Some(s),
                }
            })
            .collect();
        let top = if all_ok {
            ok()
        } else if entries.len() == 1 {
            entries[0].status.clone().unwrap_or_else(ok)
        } else {
            status(Code::MultipleResults, "some acks failed; see the entries")
        };
        Ok(Response::new(pb::AckMessageResponse {
            status: Some(top),
            entries,
        }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<pb::ForwardMessageToDeadLetterQueueResponse>, Status> {
        if let Err(s) = client_id(&req) {
            return Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
                status: Some(s),
            }));
        }
        let r = req.into_inner();
        if let Some(s) = self.consumer_refusal() {
            return Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
                status: Some(s),
            }));
        }
        if let Err(s) = consumer_group(resource_name(&r.group)) {
            return Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
                status: Some(s),
            }));
        }
        let s = match self.gated(|| {
            self.consumption.forward_to_dead_letter(
                resource_name(&r.group),
                resource_name(&r.topic),
                &r.receipt_handle,
                r.delivery_attempt.max(0) as u32,
            )
        }) {
            Ok(Ok(end)) => self.confirm(end).await,
            Ok(Err(e)) => handle_status(&e),
            Err(s) => s,
        };
        Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse {
            status: Some(s),
        }))
    }

    type PullMessageStream = PullStream;

    async fn pull_message(
        &self,
        _: Request<pb::PullMessageRequest>,
    ) -> Result<Response<Self::PullMessageStream>, Status> {
        Err(Status::unimplemented("PullMessage is not implemented"))
    }

    async fn update_offset(
        &self,
        _: Request<pb::UpdateOffsetRequest>,
    ) -> Result<Response<pb::UpdateOffsetResponse>, Status> {
        Err(Status::unimplemented("UpdateOffset is not implemented"))
    }

    async fn get_offset(
        &self,
        _: Request<pb::GetOffsetRequest>,
    ) -> Result<Response<pb::GetOffsetResponse>, Status> {
        Err(Status::unimplemented("GetOffset is not implemented"))
    }

    async fn query_offset(
        &self,
        _: Request<pb::QueryOffsetRequest>,
    ) -> Result<Response<pb::QueryOffsetResponse>, Status> {
        Err(Status::unimplemented("QueryOffset is not implemented"))
    }

    async fn end_transaction(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        let s = match client_id(&req) {
            Err(s) => s,
            Ok(_) => self.end(req.get_ref()).await,
        };
        Ok(Response::new(pb::EndTransactionResponse {
            status: Some(s),
        }))
    }

    type TelemetryStream = TelemetryStream;

    async fn telemetry(
        &self,
        req: Request<Streaming<pb::TelemetryCommand>>,
    ) -> Result<Response<Self::TelemetryStream>, Status> {
        let id = client_id(&req).ok();
        let mut inbound = req.into_inner();
        // Room for a burst of transaction check-backs (due together after
        // a restart) besides the settings replies.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::TelemetryCommand, Status>>(1024);
        let producers = self.producers.clone();
        let clients = self.clients.clone();
        let store = self.store.clone();
        let stream = producers.new_stream_id();
        tokio::spawn(async move {
            let Some(id) = id else {
                let _ = tx
                    .send(Ok(pb::TelemetryCommand {
                        status: Some(status(
                            Code::ClientIdRequired,
                            "x-mq-client-id header is required",
                        )),
                        command: None,
                    }))
                    .await;
                return;
            };
            clients.open(&id);
            while let Ok(Some(cmd)) = inbound.message().await {
                let reply = match cmd.command {
                    Some(pb::telemetry_command::Command::Settings(s)) => {
                        // Producers are reachable for transaction check-back
                        // under the topics they publish to.
                        if let Some(pb::settings::PubSub::Publishing(p)) = &s.pub_sub {
                            let topics: Vec<String> =
                                p.topics.iter().map(|t| t.name.clone()).collect();
                            producers.register(stream, &id, &topics, &tx);
                        }
                        let metadata = store.metadata();
                        settings::reply(
                            s,
                            |g| metadata.group_or_default(g),
                            |t| {
                                metadata
                                    .get_topic(t)
                                    .is_some_and(|t| t.message_type == MessageType::Fifo)
                            },
                        )
                    }
                    // Thread stack traces and verification results need no answer.
                    _ => continue,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
            producers.remove(stream);
            clients.close(&id);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn notify_client_termination(
        &self,
        req: Request<pb::NotifyClientTerminationRequest>,
    ) -> Result<Response<pb::NotifyClientTerminationResponse>, Status> {
        let s = client_id(&req).err().unwrap_or_else(ok);
        Ok(Response::new(pb::NotifyClientTerminationResponse {
            status: Some(s),
        }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<pb::ChangeInvisibleDurationResponse>, Status> {
        let fail = |s| {
            Ok(Response::new(pb::ChangeInvisibleDurationResponse {
                status: Some(s),
                receipt_handle: String::new(),
            }))
        };
        if let Err(s) = client_id(&req) {
            return fail(s);
        }
        if let Some(s) = self.consumer_refusal() {
            return fail(s);
        }
        let r = req.into_inner();
        if let Err(s) = consumer_group(resource_name(&r.group)) {
            return fail(s);
        }
        let d = match r.invisible_duration.as_ref().and_then(duration) {
            Some(d) if d <= MAX_INVISIBLE => d,
            _ => {
                return fail(status(
                    Code::IllegalInvisibleTime,
                    format!("invisible duration must be between 0 and {MAX_INVISIBLE:?}"),
                ));
            }
        };
        let changed = self.gated(|| {
            self.consumption.change_invisible(
                resource_name(&r.group),
                resource_name(&r.topic),
                &r.receipt_handle,
                d.as_millis() as i64,
                now_ms(),
            )
        });
        match changed {
            Ok(Ok((h, end))) => Ok(Response::new(pb::ChangeInvisibleDurationResponse {
                status: Some(self.confirm(end).await),
                receipt_handle: h.to_string(),
            })),
            Ok(Err(e)) => fail(handle_status(&e)),
            Err(s) => fail(s),
        }
    }

    async fn recall_message(
        &self,
        _: Request<pb::RecallMessageRequest>,
    ) -> Result<Response<pb::RecallMessageResponse>, Status> {
        Err(Status::unimplemented("RecallMessage is not implemented"))
    }

    async fn sync_lite_subscription(
        &self,
        _: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> Result<Response<pb::SyncLiteSubscriptionResponse>, Status> {
        Err(Status::unimplemented("lite topics are not implemented"))
    }
}

/// Deliveries a receive claimed and has not handed to its client: given
/// back ([`Consumption::release`]: shown again now, no longer renewed) when
/// the receive fails after claiming them or its answer is dropped before
/// its last frame went out (the client cancelled, its connection broke).
/// A client that retries under the same `attempt_id` gets them again.
struct Handout {
    consumption: Arc<Consumption>,
    replication: Arc<ReplicationManager>,
    group: String,
    topic: String,
    entries: Vec<RemoveEntry>,
}

impl Handout {
    fn give_back(&mut self) {
        let entries = std::mem::take(&mut self.entries);
        if entries.is_empty() {
            return;
        }
        // Through the write gate, as every change; refused while writes are
        // paused or after a role change, when a retry of the attempt (or
        // the invisible time) brings them back instead.
        match self.replication.admit() {
            Ok(_gate) => {
                if let Err(e) =
                    self.consumption
                        .release(&self.group, &self.topic, &entries, now_ms())
                {
                    tracing::warn!(error = %e, group = %self.group, topic = %self.topic, "recording messages given back failed; a restart may keep them invisible until their invisible time runs out");
                }
            }
            Err(e) => tracing::info!(
                error = %e,
                group = %self.group,
                topic = %self.topic,
                messages = entries.len(),
                "messages of a receive that did not reach its consumer stay in flight: writes are refused"
            ),
        }
    }
}

impl Drop for Handout {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// The frames of a receive's answer; the messages in them are given back
/// if the answer is dropped before its last frame is taken (see [`Handout`]).
struct Frames {
    frames: std::collections::VecDeque<Result<pb::ReceiveMessageResponse, Status>>,
    handout: Option<Handout>,
}

impl Stream for Frames {
    type Item = Result<pb::ReceiveMessageResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let next = self.frames.pop_front();
        if self.frames.is_empty()
            && let Some(mut handed) = self.handout.take()
        {
            // The last frame goes out: the answer is complete.
            handed.entries.clear();
        }
        std::task::Poll::Ready(next)
    }
}

/// The check-back delay a producer asked for on a TRANSACTION message.
fn recovery_delay(m: &pb::Message) -> Option<Duration> {
    m.system_properties
        .as_ref()?
        .orphaned_transaction_recovery_duration
        .as_ref()
        .and_then(duration)
}

fn handle_status(e: &HandleError) -> pb::Status {
    match e {
        HandleError::Unrecorded(_) => status(Code::InternalServerError, e.to_string()),
        _ => status(Code::InvalidReceiptHandle, e.to_string()),
    }
}

fn delivery_timestamp() -> pb::ReceiveMessageResponse {
    pb::ReceiveMessageResponse {
        content: Some(pb::receive_message_response::Content::DeliveryTimestamp(
            convert::timestamp(now_ms()),
        )),
    }
}

fn send_failure(s: pb::Status, messages: &[pb::Message]) -> pb::SendMessageResponse {
    pb::SendMessageResponse {
        entries: messages
            .iter()
            .map(|m| pb::SendResultEntry {
                status: Some(s.clone()),
                message_id: m
                    .system_properties
                    .as_ref()
                    .map(|p| p.message_id.clone())
                    .unwrap_or_default(),
                transaction_id: String::new(),
                offset: 0,
                recall_handle: String::new(),
            })
            .collect(),
        status: Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(v: &str) -> Option<Duration> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("grpc-timeout", v.parse().expect("header"));
        deadline(&r)
    }

    #[test]
    fn grpc_timeouts_from_the_wire_neither_wrap_nor_panic() {
        assert_eq!(timeout("20S"), Some(Duration::from_secs(20)));
        assert_eq!(
            timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(timeout("1500m"), Some(Duration::from_millis(1500)));
        // More than gRPC's 8 digits (these overflowed `n * 3600`), no
        // digits, signs, unknown units: no deadline.
        for bad in [
            "99999999999999999H",
            "18446744073709551615M",
            "123456789S",
            "H",
            "",
            "+5S",
            "5x",
        ] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
    }

    /// A TCP relay that stops passing bytes on either way once `frozen` is
    /// set, as a cut network path does (nothing arrives, nothing is closed).
    async fn relay(
        to: std::net::SocketAddr,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((client, _)) = l.accept().await else {
                return;
            };
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let pass = |mut from: tokio::net::tcp::OwnedReadHalf,
                        mut to: tokio::net::tcp::OwnedWriteHalf,
                        frozen: Arc<std::sync::atomic::AtomicBool>| async move {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = from.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if !frozen.load(Ordering::Relaxed) && to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // Keep the connection open (a cut path closes nothing).
                std::future::pending::<()>().await;
            };
            tokio::spawn(pass(cr, sw, frozen.clone()));
            tokio::spawn(pass(sr, cw, frozen));
        });
        addr
    }

    /// A lone broker's client API without auto-created topics.
    fn test_config() -> ClientApiConfig {
        ClientApiConfig {
            broker_name: "b".into(),
            advertised_host: "127.0.0.1".into(),
            advertised_port: 0,
            max_body_size: 4 << 20,
            auto_create_topics: false,
            default_queue_count: 1,
            transactions: Default::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_telemetry_stream_over_a_dead_connection_ends_by_keepalive() {
        use keelmq_proto::rocketmq::v2::messaging_service_client::MessagingServiceClient;
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, write) = crate::testing::lone_master(dir.path());
        let api = ClientApi::new(test_config(), write, Arc::new(Consumption::new(store)));
        let (tls, _) = tls::acceptor(None, &dir.path().join("tls"), "127.0.0.1").expect("tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server_addr = listener.local_addr().expect("addr");
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let serve = server_builder(Duration::from_millis(300), Duration::from_millis(300))
            .add_service(api.clone().into_server())
            .serve_with_incoming_shutdown(tls::incoming(listener, tls), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            });
        let server = tokio::spawn(serve);

        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let relay_addr = relay(server_addr, frozen.clone()).await;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{relay_addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = MessagingServiceClient::new(ch);
        let (cmds, rx) = tokio::sync::mpsc::channel(4);
        cmds.send(pb::TelemetryCommand {
            status: None,
            command: Some(pb::telemetry_command::Command::Settings(pb::Settings {
                pub_sub: Some(pb::settings::PubSub::Publishing(pb::Publishing {
                    topics: vec![pb::Resource {
                        resource_namespace: String::new(),
                        name: "t".into(),
                    }],
                    ..Default::default()
                })),
                ..Default::default()
            })),
        })
        .await
        .expect("queue settings");
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("x-mq-client-id", "host@1#1".parse().expect("header"));
        let mut replies = client.telemetry(req).await.expect("telemetry").into_inner();
        let reply = replies.message().await.expect("reply").expect("settings");
        assert_eq!(reply.status.map(|s| s.code), Some(Code::Ok as i32));
        // Alive: the producer takes commands, and keepalive pings are answered.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            api.producers
                .send_to_one("t", pb::TelemetryCommand::default())
                .is_some()
        );
        assert!(api.clients.contains("host@1#1"));

        // The path goes dead: the unanswered ping closes the connection and
        // the producer is gone.
        frozen.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while api
            .producers
            .send_to_one("t", pb::TelemetryCommand::default())
            .is_some()
        {
            assert!(
                Instant::now() < deadline,
                "the producer's stream outlived its dead connection"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nor are its auto_renew deliveries renewed any more.
        while api.clients.contains("host@1#1") {
            assert!(
                Instant::now() < deadline,
                "the client still counts as connected"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(cmds);
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }

    fn resource(name: &str) -> Option<pb::Resource> {
        Some(pb::Resource {
            resource_namespace: String::new(),
            name: name.into(),
        })
    }

    /// An ack of one message of group "g" on topic "f".
    fn ack_of(handle: &str) -> Request<pb::AckMessageRequest> {
        with_client(pb::AckMessageRequest {
            group: resource("g"),
            topic: resource("f"),
            entries: vec![pb::AckMessageEntry {
                message_id: "id".into(),
                receipt_handle: handle.to_owned(),
                ..Default::default()
            }],
        })
    }

    fn with_client<T>(m: T) -> Request<T> {
        let mut r = Request::new(m);
        r.metadata_mut()
            .insert("x-mq-client-id", "host@1#1".parse().expect("header"));
        r
    }

    /// A client API over a lone master with topics `a` and `b` (one queue each).
    fn api_over(dir: &std::path::Path) -> (ClientApi, Arc<Consumption>, MessageStore) {
        let (store, write) = crate::testing::lone_master(dir);
        for t in ["a", "b"] {
            store
                .metadata()
                .ensure_topic(TopicConfig {
                    name: t.into(),
                    queue_count: 1,
                    message_type: MessageType::Normal,
                })
                .expect("topic");
        }
        let consumption = Arc::new(Consumption::new(store.clone()));
        let mut api = ClientApi::new(test_config(), write, consumption.clone());
        // No re-checks within a test: a receive that answers was woken.
        api.recheck = Duration::from_secs(600);
        (api, consumption, store)
    }

    async fn send_to(api: &ClientApi, topic: &str, body: &str) {
        let m = message_to(topic, body);
        let resp = api
            .send_message(with_client(pb::SendMessageRequest { messages: vec![m] }))
            .await
            .expect("send")
            .into_inner();
        assert_eq!(resp.status.map(|s| s.code), Some(Code::Ok as i32));
    }

    /// The bodies a receive of `topic` hands out (long polling up to 20 s).
    async fn receive_from(api: ClientApi, topic: &str) -> Vec<Vec<u8>> {
        use futures::StreamExt;
        let req = pb::ReceiveMessageRequest {
            group: resource("g"),
            message_queue: Some(pb::MessageQueue {
                topic: resource(topic),
                ..Default::default()
            }),
            filter_expression: None,
            batch_size: 16,
            invisible_duration: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 20,
                nanos: 0,
            }),
            ..Default::default()
        };
        let frames: Vec<_> = api
            .receive_message(with_client(req))
            .await
            .expect("stream")
            .into_inner()
            .collect()
            .await;
        frames
            .into_iter()
            .filter_map(|f| match f.expect("frame").content {
                Some(pb::receive_message_response::Content::Message(m)) => Some(m.body.to_vec()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_receive_is_woken_by_its_own_topic_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (api, consumption, store) = api_over(dir.path());
        let waiting = tokio::spawn(receive_from(api.clone(), "b"));
        // The receive looked once and waits.
        let deadline = Instant::now() + Duration::from_secs(5);
        while consumption.claims() == 0 {
            assert!(Instant::now() < deadline, "the receive never looked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Traffic on another topic does not wake the receive on b (and
        // its periodic re-check is off in this test).
        let before = consumption.claims();
        let sent = 1000;
        for i in 0..sent {
            send_to(&api, "a", &format!("a{i}")).await;
            tokio::task::yield_now().await;
        }
        let claims = consumption.claims() - before;
        assert_eq!(
            claims, 0,
            "{claims} looks during {sent} sends to another topic"
        );
        assert!(!waiting.is_finished());
        // A send to b wakes it: with no re-check, nothing else could.
        send_to(&api, "b", "b0").await;
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the receive answered")
            .expect("receive task");
        assert_eq!(got, vec![b"b0".to_vec()]);
        // Nobody waits any more: no topic entry is left behind.
        assert_eq!(api.arrivals.watched_topics(), 0);
        store.shutdown().expect("shutdown");
    }

    /// A push consumer's receive of `topic` (`auto_renew`, an attempt id),
    /// answering within about 1.4 s when nothing comes.
    fn push_receive(topic: &str, attempt: &str) -> Request<pb::ReceiveMessageRequest> {
        let mut r = with_client(pb::ReceiveMessageRequest {
            group: resource("g"),
            message_queue: Some(pb::MessageQueue {
                topic: resource(topic),
                ..Default::default()
            }),
            batch_size: 16,
            auto_renew: true,
            attempt_id: Some(attempt.into()),
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        });
        r.metadata_mut()
            .insert("grpc-timeout", "1500m".parse().expect("header"));
        r
    }

    /// A receive's status code and messages.
    async fn answer(
        api: &ClientApi,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> (i32, Vec<pb::Message>) {
        use futures::StreamExt;
        let frames: Vec<_> = api
            .receive_message(req)
            .await
            .expect("stream")
            .into_inner()
            .collect()
            .await;
        let mut code = None;
        let mut messages = Vec::new();
        for f in frames {
            match f.expect("frame").content {
                Some(pb::receive_message_response::Content::Status(s)) => code = Some(s.code),
                Some(pb::receive_message_response::Content::Message(m)) => messages.push(m),
                _ => {}
            }
        }
        (code.expect("a status"), messages)
    }

    fn receipt_handles(messages: &[pb::Message]) -> Vec<String> {
        messages
            .iter()
            .map(|m| {
                m.system_properties
                    .as_ref()
                    .and_then(|p| p.receipt_handle.clone())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// A client API with a FIFO topic `f` holding `bodies` on its queue.
    fn fifo_api(
        dir: &std::path::Path,
        bodies: &[&str],
    ) -> (ClientApi, Arc<Consumption>, MessageStore) {
        let (api, consumption, store) = api_over(dir);
        store
            .metadata()
            .ensure_topic(TopicConfig {
                name: "f".into(),
                queue_count: 1,
                message_type: MessageType::Fifo,
            })
            .expect("topic");
        for b in bodies {
            store
                .append(crate::store::NewRecord::new("f", 0, b.as_bytes().to_vec()))
                .expect("append");
        }
        (api, consumption, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receive_repeated_under_its_attempt_id_gets_the_same_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (api, _, store) = fifo_api(dir.path(), &["m1", "m2"]);
        api.clients.open("host@1#1");
        // The answer is lost on its way (the client's call failed after the
        // broker sent it): the client retries under the same attempt id.
        let (code, first) = answer(&api, push_receive("f", "a1")).await;
        assert_eq!(code, Code::Ok as i32);
        assert_eq!(first.len(), 2);
        let (code, again) = answer(&api, push_receive("f", "a1")).await;
        assert_eq!(
            code,
            Code::Ok as i32,
            "the FIFO queue is held by the lost batch"
        );
        let bodies: Vec<&[u8]> = again.iter().map(|m| &m.body[..]).collect();
        assert_eq!(bodies, [&b"m1"[..], b"m2"]);
        assert_eq!(receipt_handles(&again), receipt_handles(&first));
        // Any other attempt finds the queue held.
        let (code, _) = answer(&api, push_receive("f", "a2")).await;
        assert_eq!(code, Code::MessageNotFound as i32);
        store.shutdown().expect("shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receive_answer_dropped_unread_gives_its_messages_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (api, consumption, store) = fifo_api(dir.path(), &["m1", "m2"]);
        api.clients.open("host@1#1");
        // The client's call is cancelled before it read the answer.
        let dropped = api
            .receive_message(push_receive("f", "a1"))
            .await
            .expect("stream");
        assert_eq!(consumption.in_flight("g", "f", 0), 2);
        drop(dropped);
        // Not renewed for a client that never got them...
        assert_eq!(consumption.renew(now_ms() + 55_000, |_| true).0, 0);
        // ...and back at once: the retry of the attempt gets them first
        // time round, under the same deliveries.
        let (code, again) = answer(&api, push_receive("f", "a1")).await;
        assert_eq!(code, Code::Ok as i32);
        let attempts: Vec<Option<i32>> = again
            .iter()
            .map(|m| {
                m.system_properties
                    .as_ref()
                    .and_then(|p| p.delivery_attempt)
            })
            .collect();
        assert_eq!(attempts, [Some(1), Some(1)]);
        // Fully read, they are renewed as usual.
        assert_eq!(consumption.renew(now_ms() + 55_000, |_| true).0, 2);
        store.shutdown().expect("shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumer_changes_are_refused_while_a_switchover_holds_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (api, _, store) = fifo_api(dir.path(), &["m1", "m2"]);
        api.clients.open("host@1#1");
        let (code, got) = answer(&api, push_receive("f", "a1")).await;
        assert_eq!(code, Code::Ok as i32);
        let handles = receipt_handles(&got);
        // A switchover stops writes and counts the log's end: nothing a
        // consumer does may add to the log past it.
        api.write.replication().set_writable(false);
        let end = store.max_offset();
        let ha = Code::HaNotAvailable as i32;
        let ack = api
            .ack_message(ack_of(&handles[0]))
            .await
            .expect("ack")
            .into_inner();
        assert_eq!(ack.status.map(|s| s.code), Some(ha));
        assert_eq!(ack.entries[0].status.as_ref().map(|s| s.code), Some(ha));
        let change = api
            .change_invisible_duration(with_client(pb::ChangeInvisibleDurationRequest {
                group: resource("g"),
                topic: resource("f"),
                receipt_handle: handles[1].clone(),
                invisible_duration: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
                message_id: "id".into(),
                ..Default::default()
            }))
            .await
            .expect("change")
            .into_inner();
        assert_eq!(change.status.map(|s| s.code), Some(ha));
        let forward = api
            .forward_message_to_dead_letter_queue(with_client(
                pb::ForwardMessageToDeadLetterQueueRequest {
                    group: resource("g"),
                    topic: resource("f"),
                    receipt_handle: handles[1].clone(),
                    message_id: "id".into(),
                    delivery_attempt: 1,
                    max_delivery_attempts: 16,
                    ..Default::default()
                },
            ))
            .await
            .expect("forward")
            .into_inner();
        assert_eq!(forward.status.map(|s| s.code), Some(ha));
        let (code, _) = answer(&api, push_receive("f", "a1")).await;
        assert_eq!(code, ha);
        assert_eq!(
            store.max_offset(),
            end,
            "the log grew while writes were held"
        );
        // Writes resume (the switchover failed): the ack goes through.
        api.write.replication().set_writable(true);
        let ack = api
            .ack_message(ack_of(&handles[0]))
            .await
            .expect("ack")
            .into_inner();
        assert_eq!(ack.status.map(|s| s.code), Some(Code::Ok as i32));
        store.shutdown().expect("shutdown");
    }

    #[test]
    fn consumer_groups_without_a_valid_dead_letter_topic_are_refused() {
        for ok in ["g", "orders_v1-x", &"g".repeat(127)] {
            assert!(consumer_group(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "orders.v1",
            "svc:pay",
            &"g".repeat(128),
            "%SYS_DELIVERY%",
        ] {
            let s = consumer_group(bad).expect_err(bad);
            assert_eq!(s.code, Code::IllegalConsumerGroup as i32, "{bad:?}");
        }
    }

    fn message_to(topic: &str, body: &str) -> pb::Message {
        pb::Message {
            topic: resource(topic),
            user_properties: Default::default(),
            system_properties: Some(pb::SystemProperties {
                message_id: format!("id-{body}"),
                ..Default::default()
            }),
            body: body.as_bytes().to_vec().into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_client_port_counts_calls_messages_in_out_and_acked() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (api, _, _) = api_over(dir.path());
        let metrics = api.metrics();
        let svc = Metered::new(api, metrics.clone());
        let send = |messages: Vec<pb::Message>| {
            svc.send_message(with_client(pb::SendMessageRequest { messages }))
        };
        send(vec![message_to("a", "one"), message_to("a", "two")])
            .await
            .expect("send");
        send(vec![message_to("a", "three")]).await.expect("send");
        // Refused: counted by method and code only, no series for the name.
        let refused = send(vec![message_to("nope", "x")])
            .await
            .expect("send")
            .into_inner();
        assert_eq!(
            refused.status.map(|s| s.code),
            Some(Code::TopicNotFound as i32)
        );
        let frames: Vec<_> = svc
            .receive_message(with_client(pb::ReceiveMessageRequest {
                group: resource("g"),
                message_queue: Some(pb::MessageQueue {
                    topic: resource("a"),
                    ..Default::default()
                }),
                batch_size: 16,
                invisible_duration: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                long_polling_timeout: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                ..Default::default()
            }))
            .await
            .expect("stream")
            .into_inner()
            .collect()
            .await;
        let handles: Vec<String> = frames
            .into_iter()
            .filter_map(|f| match f.expect("frame").content {
                Some(pb::receive_message_response::Content::Message(m)) => {
                    m.system_properties.and_then(|p| p.receipt_handle)
                }
                _ => None,
            })
            .collect();
        assert_eq!(handles.len(), 3);
        let acked = svc
            .ack_message(with_client(pb::AckMessageRequest {
                group: resource("g"),
                topic: resource("a"),
                entries: handles[..2]
                    .iter()
                    .map(|h| pb::AckMessageEntry {
                        message_id: "id".into(),
                        receipt_handle: h.clone(),
                        ..Default::default()
                    })
                    .collect(),
            }))
            .await
            .expect("ack")
            .into_inner();
        assert_eq!(acked.status.map(|s| s.code), Some(Code::Ok as i32));

        let mut registry = prometheus_client::registry::Registry::with_prefix("keelmq");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            r#"keelmq_client_requests_total{method="SendMessage",code="OK"} 2"#,
            r#"keelmq_client_requests_total{method="SendMessage",code="TOPIC_NOT_FOUND"} 1"#,
            r#"keelmq_client_requests_total{method="ReceiveMessage",code="OK"} 1"#,
            r#"keelmq_client_requests_total{method="AckMessage",code="OK"} 1"#,
            r#"keelmq_messages_in_total{topic="a"} 3"#,
            r#"keelmq_message_bytes_in_total{topic="a"} 11"#,
            r#"keelmq_messages_out_total{group="g",topic="a"} 3"#,
            r#"keelmq_messages_acked_total{group="g",topic="a"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("nope"), "{text}");
    }
}
