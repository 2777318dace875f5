//! A minimal RocketMQ 5 gRPC client on the project's generated stubs, for
//! tests that must aim every call at a chosen broker (the fault tests send to
//! whichever broker is master at the moment, and read from a chosen one).
//! The official clients are exercised separately; this one hides nothing.

use std::collections::HashMap;
use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use keelmq_proto::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// One message as a consumer received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub queue_id: u32,
    pub queue_offset: u64,
    pub body: Vec<u8>,
    pub properties: HashMap<String, String>,
    pub handle: String,
    pub message_id: String,
    pub attempt: i32,
}

/// Why a call failed: the broker's status code (or -1 for a transport
/// error) and its message.
#[derive(Clone, Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

/// A plain client of one broker's client port.
#[derive(Clone)]
pub struct RawClient {
    inner: MessagingServiceClient<Channel>,
}

fn with_id<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "x-mq-client-id",
        "keelmq-tests@1#1".parse().expect("header"),
    );
    r.set_timeout(Duration::from_secs(10));
    r
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

/// A response's status as a result: OK, or the broker's code and message.
fn ok(status: Option<pb::Status>) -> Result<(), Failure> {
    match status.unwrap_or_default() {
        s if s.code == pb::Code::Ok as i32 => Ok(()),
        s => Err(Failure {
            code: s.code,
            message: s.message,
        }),
    }
}

fn transport(e: tonic::Status) -> Failure {
    Failure {
        code: -1,
        message: e.to_string(),
    }
}

impl RawClient {
    /// A client of `endpoint` (`host:port`); connects lazily.
    pub fn new(endpoint: &str) -> RawClient {
        let ch = Endpoint::from_shared(format!("http://{endpoint}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        RawClient {
            inner: MessagingServiceClient::new(ch)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        }
    }

    /// The endpoints (`host:port`) a route query for `topic` lists.
    pub async fn route(&mut self, topic: &str) -> Result<Vec<String>, Failure> {
        let resp = self
            .inner
            .query_route(with_id(pb::QueryRouteRequest {
                topic: resource(topic),
                endpoints: None,
            }))
            .await
            .map_err(transport)?
            .into_inner();
        ok(resp.status)?;
        Ok(endpoints_of(resp.message_queues.iter()))
    }

    /// The endpoints (`host:port`) a `QueryAssignment` for `topic` and
    /// `group` lists.
    pub async fn assignment(&mut self, topic: &str, group: &str) -> Result<Vec<String>, Failure> {
        let resp = self
            .inner
            .query_assignment(with_id(pb::QueryAssignmentRequest {
                topic: resource(topic),
                group: resource(group),
                endpoints: None,
            }))
            .await
            .map_err(transport)?
            .into_inner();
        ok(resp.status)?;
        Ok(endpoints_of(
            resp.assignments
                .iter()
                .filter_map(|a| a.message_queue.as_ref()),
        ))
    }

    /// Sends one NORMAL message to `queue_id`; the queue offset it got.
    pub async fn send(
        &mut self,
        topic: &str,
        queue_id: u32,
        body: Vec<u8>,
        properties: HashMap<String, String>,
    ) -> Result<u64, Failure> {
        let m = pb::Message {
            topic: resource(topic),
            user_properties: properties,
            system_properties: Some(pb::SystemProperties {
                message_id: format!("{:032X}", rand_id()),
                message_type: pb::MessageType::Normal as i32,
                queue_id: queue_id as i32,
                ..Default::default()
            }),
            body: body.into(),
        };
        let resp = self
            .inner
            .send_message(with_id(pb::SendMessageRequest { messages: vec![m] }))
            .await
            .map_err(transport)?
            .into_inner();
        ok(resp.status)?;
        let entry = resp.entries.first().ok_or_else(|| Failure {
            code: -1,
            message: "no entry in an OK send response".into(),
        })?;
        Ok(entry.offset as u64)
    }

    /// One receive call: up to `batch` messages, long polling up to `poll`.
    pub async fn receive(
        &mut self,
        group: &str,
        topic: &str,
        batch: i32,
        invisible: Duration,
        poll: Duration,
    ) -> Result<Vec<Received>, Failure> {
        let req = pb::ReceiveMessageRequest {
            group: resource(group),
            message_queue: Some(pb::MessageQueue {
                topic: resource(topic),
                ..Default::default()
            }),
            filter_expression: None,
            batch_size: batch,
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: 0,
            }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: poll.as_secs() as i64,
                nanos: poll.subsec_nanos() as i32,
            }),
            attempt_id: None,
        };
        let mut r = with_id(req);
        r.set_timeout(poll + Duration::from_secs(10));
        let mut stream = self
            .inner
            .receive_message(r)
            .await
            .map_err(transport)?
            .into_inner();
        let mut out = Vec::new();
        let mut failure = None;
        while let Some(frame) = stream.message().await.map_err(transport)? {
            match frame.content {
                Some(pb::receive_message_response::Content::Message(m)) => {
                    let sp = m.system_properties.unwrap_or_default();
                    out.push(Received {
                        queue_id: sp.queue_id as u32,
                        queue_offset: sp.queue_offset.unwrap_or(-1) as u64,
                        body: m.body.to_vec(),
                        properties: m.user_properties,
                        handle: sp.receipt_handle.unwrap_or_default(),
                        message_id: sp.message_id,
                        attempt: sp.delivery_attempt.unwrap_or(0),
                    });
                }
                Some(pb::receive_message_response::Content::Status(s))
                    if s.code != pb::Code::Ok as i32
                        && s.code != pb::Code::MessageNotFound as i32 =>
                {
                    failure = Some(Failure {
                        code: s.code,
                        message: s.message,
                    });
                }
                _ => {}
            }
        }
        match failure {
            Some(f) if out.is_empty() => Err(f),
            _ => Ok(out),
        }
    }

    /// Acknowledges received messages; the codes of the entries that failed.
    pub async fn ack(
        &mut self,
        group: &str,
        topic: &str,
        msgs: &[Received],
    ) -> Result<Vec<i32>, Failure> {
        if msgs.is_empty() {
            return Ok(vec![]);
        }
        let resp = self
            .inner
            .ack_message(with_id(pb::AckMessageRequest {
                group: resource(group),
                topic: resource(topic),
                entries: msgs
                    .iter()
                    .map(|m| pb::AckMessageEntry {
                        message_id: m.message_id.clone(),
                        receipt_handle: m.handle.clone(),
                        lite_topic: None,
                    })
                    .collect(),
            }))
            .await
            .map_err(transport)?
            .into_inner();
        Ok(resp
            .entries
            .iter()
            .filter_map(|e| e.status.as_ref())
            .filter(|s| s.code != pb::Code::Ok as i32)
            .map(|s| s.code)
            .collect())
    }

    /// Makes a received message visible again after `after` (a consumer's
    /// "retry later"); the new receipt handle.
    pub async fn nack(
        &mut self,
        group: &str,
        topic: &str,
        msg: &Received,
        after: Duration,
    ) -> Result<String, Failure> {
        let resp = self
            .inner
            .change_invisible_duration(with_id(pb::ChangeInvisibleDurationRequest {
                group: resource(group),
                topic: resource(topic),
                receipt_handle: msg.handle.clone(),
                invisible_duration: Some(prost_types::Duration {
                    seconds: after.as_secs() as i64,
                    nanos: after.subsec_nanos() as i32,
                }),
                message_id: msg.message_id.clone(),
                lite_topic: None,
                suspend: None,
            }))
            .await
            .map_err(transport)?
            .into_inner();
        ok(resp.status)?;
        Ok(resp.receipt_handle)
    }

    /// Opens a Telemetry stream as a simple consumer of `group` and returns
    /// the retry policy of the Settings the broker answers with.
    pub async fn consumer_retry_policy(
        &mut self,
        group: &str,
        topic: &str,
    ) -> Result<pb::RetryPolicy, Failure> {
        let settings = pb::Settings {
            client_type: Some(pb::ClientType::SimpleConsumer as i32),
            pub_sub: Some(pb::settings::PubSub::Subscription(pb::Subscription {
                group: resource(group),
                subscriptions: vec![pb::SubscriptionEntry {
                    topic: resource(topic),
                    expression: None,
                }],
                ..Default::default()
            })),
            ..Default::default()
        };
        let command = pb::TelemetryCommand {
            status: None,
            command: Some(pb::telemetry_command::Command::Settings(settings)),
        };
        let mut req = with_id(tokio_stream::iter(vec![command]));
        req.set_timeout(Duration::from_secs(10));
        let mut replies = self
            .inner
            .telemetry(req)
            .await
            .map_err(transport)?
            .into_inner();
        while let Some(reply) = replies.message().await.map_err(transport)? {
            if let Some(pb::telemetry_command::Command::Settings(s)) = reply.command {
                return s.backoff_policy.ok_or_else(|| Failure {
                    code: -1,
                    message: "Settings without a retry policy".into(),
                });
            }
        }
        Err(Failure {
            code: -1,
            message: "the Telemetry stream ended without Settings".into(),
        })
    }
}

fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    t ^ u128::from(N.fetch_add(1, Ordering::Relaxed)) << 64 | u128::from(std::process::id())
}

/// Every `host:port` the queues name.
fn endpoints_of<'a>(queues: impl Iterator<Item = &'a pb::MessageQueue>) -> Vec<String> {
    queues
        .filter_map(|q| q.broker.as_ref()?.endpoints.as_ref())
        .flat_map(|e| e.addresses.iter().map(|a| format!("{}:{}", a.host, a.port)))
        .collect()
}
