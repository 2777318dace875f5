//! Counts what the client port answers, for `/metrics`: every call by
//! method and protocol status code, the messages producers stored and the
//! messages consumers were handed and acknowledged, by topic (and consumer
//! group). [`Metered`] wraps the service: the handlers know nothing of it.
//!
//! Label values come from requests the broker accepted: a topic only once a
//! send to it or a receive from it succeeded (topics exist, or were created
//! under `auto_create_topics`); a consumer group only once it was handed or
//! acknowledged a message. Refused calls are counted by method and code
//! alone, so a client sending nonsense cannot make the series grow.

use std::sync::Arc;

use futures::StreamExt;
use keelmq_proto::rocketmq::v2 as pb;
use keelmq_proto::rocketmq::v2::messaging_service_server::MessagingService;
use pb::Code;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::{Request, Response, Status, Streaming};

use super::{ClientApi, PullStream, ReceiveStream, TelemetryStream, resource_name};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

/// A consumer group and a topic, as metric labels (also the consumer lag's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
    pub topic: String,
}

/// The client port's counters (shared by every connection).
#[derive(Default)]
pub struct ClientMetrics {
    calls: Family<CallLabels, Counter>,
    messages_in: Family<TopicLabels, Counter>,
    bytes_in: Family<TopicLabels, Counter>,
    messages_out: Family<GroupLabels, Counter>,
    acked: Family<GroupLabels, Counter>,
}

impl ClientMetrics {
    /// Adds the counters to a registry (prefix `keelmq` in `/metrics`).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "client_requests",
            "Client RPCs answered, by method and protocol status code (grpc_* codes: the call failed at the gRPC level)",
            self.calls.clone(),
        );
        r.register(
            "messages_in",
            "Messages stored from producers' sends, by topic (delayed and transactional messages counted when sent)",
            self.messages_in.clone(),
        );
        r.register(
            "message_bytes_in",
            "Body bytes of the messages stored from producers' sends, by topic",
            self.bytes_in.clone(),
        );
        r.register(
            "messages_out",
            "Messages handed to consumers by ReceiveMessage, by consumer group and topic (redeliveries included)",
            self.messages_out.clone(),
        );
        r.register(
            "messages_acked",
            "Messages consumers acknowledged, by consumer group and topic",
            self.acked.clone(),
        );
    }

    fn call(&self, method: &'static str, code: &'static str) {
        self.calls.get_or_create(&CallLabels { method, code }).inc();
    }

    /// Counts a unary call by the code of its answer's status.
    fn answered<T: Answer>(
        &self,
        method: &'static str,
        answer: &Result<Response<T>, Status>,
    ) -> &'static str {
        let code = match answer {
            Ok(r) => r.get_ref().status().map_or("OK", code_name),
            Err(e) => grpc_code_name(e.code()),
        };
        self.call(method, code);
        code
    }
}

/// The name a protocol status code has in the protocol (`OK`,
/// `TOO_MANY_REQUESTS`, ...).
fn code_name(s: &pb::Status) -> &'static str {
    Code::try_from(s.code).map_or("UNKNOWN_CODE", |c| c.as_str_name())
}

fn grpc_code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as G;
    match c {
        G::Ok => "grpc_ok",
        G::Cancelled => "grpc_cancelled",
        G::InvalidArgument => "grpc_invalid_argument",
        G::DeadlineExceeded => "grpc_deadline_exceeded",
        G::NotFound => "grpc_not_found",
        G::PermissionDenied => "grpc_permission_denied",
        G::ResourceExhausted => "grpc_resource_exhausted",
        G::FailedPrecondition => "grpc_failed_precondition",
        G::Unimplemented => "grpc_unimplemented",
        G::Unavailable => "grpc_unavailable",
        G::Unauthenticated => "grpc_unauthenticated",
        G::Internal => "grpc_internal",
        _ => "grpc_other",
    }
}

/// A unary answer's protocol status.
trait Answer {
    fn status(&self) -> Option<&pb::Status>;
}

macro_rules! answers {
    ($($t:ty),* $(,)?) => {
        $(impl Answer for $t {
            fn status(&self) -> Option<&pb::Status> {
                self.status.as_ref()
            }
        })*
    };
}

answers!(
    pb::QueryRouteResponse,
    pb::HeartbeatResponse,
    pb::SendMessageResponse,
    pb::QueryAssignmentResponse,
    pb::AckMessageResponse,
    pb::ForwardMessageToDeadLetterQueueResponse,
    pb::UpdateOffsetResponse,
    pb::GetOffsetResponse,
    pb::QueryOffsetResponse,
    pb::EndTransactionResponse,
    pb::NotifyClientTerminationResponse,
    pb::ChangeInvisibleDurationResponse,
    pb::RecallMessageResponse,
    pb::SyncLiteSubscriptionResponse,
);

/// The client service with its calls counted (see the module doc).
#[derive(Clone)]
pub struct Metered {
    api: ClientApi,
    metrics: Arc<ClientMetrics>,
}

type Frames<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

impl Metered {
    pub fn new(api: ClientApi, metrics: Arc<ClientMetrics>) -> Self {
        Self { api, metrics }
    }

    /// Counts a streamed answer as its frames pass: the call by the code of
    /// the status frame `see` names (or of a gRPC error), anything else by
    /// what `see` does with it.
    fn frames<T: Send + 'static>(
        &self,
        answer: Result<Response<Frames<T>>, Status>,
        method: &'static str,
        mut see: impl FnMut(&ClientMetrics, &T) -> Option<&'static str> + Send + 'static,
    ) -> Result<Response<Frames<T>>, Status> {
        let stream = match answer {
            Ok(stream) => stream.into_inner(),
            Err(e) => {
                self.metrics.call(method, grpc_code_name(e.code()));
                return Err(e);
            }
        };
        let metrics = self.metrics.clone();
        let counted = stream.map(move |frame| {
            match &frame {
                Ok(f) => {
                    if let Some(code) = see(&metrics, f) {
                        metrics.call(method, code);
                    }
                }
                Err(e) => metrics.call(method, grpc_code_name(e.code())),
            }
            frame
        });
        Ok(Response::new(Box::pin(counted)))
    }

    /// Runs a call whose counting is only by method and code.
    async fn unary<T: Answer>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        let answer = call.await;
        self.metrics.answered(method, &answer);
        answer
    }
}

/// The service impl: calls whose counting is only by method and code are
/// listed in `unary` (each passes its request on and counts the answer's
/// code); the others are written out after them.
macro_rules! metered_service {
    (unary { $($method:ident($req:ident) -> $resp:ident = $name:literal;)* } $($rest:tt)*) => {
        #[tonic::async_trait]
        impl MessagingService for Metered {
            $(
                async fn $method(
                    &self,
                    req: Request<pb::$req>,
                ) -> Result<Response<pb::$resp>, Status> {
                    self.unary($name, self.api.$method(req)).await
                }
            )*
            $($rest)*
        }
    };
}

metered_service! {
    unary {
        query_route(QueryRouteRequest) -> QueryRouteResponse = "QueryRoute";
        heartbeat(HeartbeatRequest) -> HeartbeatResponse = "Heartbeat";
        query_assignment(QueryAssignmentRequest) -> QueryAssignmentResponse = "QueryAssignment";
        forward_message_to_dead_letter_queue(ForwardMessageToDeadLetterQueueRequest) -> ForwardMessageToDeadLetterQueueResponse = "ForwardMessageToDeadLetterQueue";
        update_offset(UpdateOffsetRequest) -> UpdateOffsetResponse = "UpdateOffset";
        get_offset(GetOffsetRequest) -> GetOffsetResponse = "GetOffset";
        query_offset(QueryOffsetRequest) -> QueryOffsetResponse = "QueryOffset";
        end_transaction(EndTransactionRequest) -> EndTransactionResponse = "EndTransaction";
        notify_client_termination(NotifyClientTerminationRequest) -> NotifyClientTerminationResponse = "NotifyClientTermination";
        change_invisible_duration(ChangeInvisibleDurationRequest) -> ChangeInvisibleDurationResponse = "ChangeInvisibleDuration";
        recall_message(RecallMessageRequest) -> RecallMessageResponse = "RecallMessage";
        sync_lite_subscription(SyncLiteSubscriptionRequest) -> SyncLiteSubscriptionResponse = "SyncLiteSubscription";
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        // The batch's topics (usually one), and each message's topic and
        // body size in the order of the answer's entries: one label and two
        // counter updates per topic, not per message.
        let mut topics: Vec<(String, u64, u64)> = Vec::new();
        let sent: Vec<(usize, u64)> = req
            .get_ref()
            .messages
            .iter()
            .map(|m| {
                let name = resource_name(&m.topic);
                let i = topics.iter().position(|(t, ..)| t == name).unwrap_or_else(|| {
                    topics.push((name.to_owned(), 0, 0));
                    topics.len() - 1
                });
                (i, m.body.len() as u64)
            })
            .collect();
        let answer = self.api.send_message(req).await;
        if self.metrics.answered("SendMessage", &answer) == "OK"
            && let Ok(r) = &answer
        {
            for ((i, bytes), entry) in sent.into_iter().zip(&r.get_ref().entries) {
                if entry.status.as_ref().is_none_or(|s| code_name(s) == "OK") {
                    topics[i].1 += 1;
                    topics[i].2 += bytes;
                }
            }
            for (topic, messages, bytes) in topics.into_iter().filter(|t| t.1 > 0) {
                let labels = TopicLabels { topic };
                self.metrics.messages_in.get_or_create(&labels).inc_by(messages);
                self.metrics.bytes_in.get_or_create(&labels).inc_by(bytes);
            }
        }
        answer
    }

    type ReceiveMessageStream = ReceiveStream;

    async fn receive_message(
        &self,
        req: Request<pb::ReceiveMessageRequest>,
    ) -> Result<Response<ReceiveStream>, Status> {
        let group = resource_name(&req.get_ref().group).to_owned();
        let answer = self.api.receive_message(req).await;
        // The answer's status is a frame of the stream (after the messages).
        // The counter of the last message's topic (a receive reads one
        // queue): looked up again only when the topic changes.
        let mut counting: Option<(String, Counter)> = None;
        self.frames(answer, "ReceiveMessage", move |metrics, frame| {
            use pb::receive_message_response::Content;
            match &frame.content {
                Some(Content::Status(s)) => Some(code_name(s)),
                Some(Content::Message(m)) => {
                    let topic = resource_name(&m.topic);
                    match &counting {
                        Some((t, c)) if t == topic => {
                            c.inc();
                        }
                        _ => {
                            let c = metrics
                                .messages_out
                                .get_or_create(&GroupLabels {
                                    group: group.clone(),
                                    topic: topic.to_owned(),
                                })
                                .clone();
                            c.inc();
                            counting = Some((topic.to_owned(), c));
                        }
                    };
                    None
                }
                _ => None,
            }
        })
    }

    async fn ack_message(
        &self,
        req: Request<pb::AckMessageRequest>,
    ) -> Result<Response<pb::AckMessageResponse>, Status> {
        let labels = GroupLabels {
            group: resource_name(&req.get_ref().group).to_owned(),
            topic: resource_name(&req.get_ref().topic).to_owned(),
        };
        let answer = self.api.ack_message(req).await;
        self.metrics.answered("AckMessage", &answer);
        if let Ok(r) = &answer {
            let acked = r
                .get_ref()
                .entries
                .iter()
                .filter(|e| e.status.as_ref().is_some_and(|s| code_name(s) == "OK"))
                .count();
            if acked > 0 {
                self.metrics
                    .acked
                    .get_or_create(&labels)
                    .inc_by(acked as u64);
            }
        }
        answer
    }

    type PullMessageStream = PullStream;

    async fn pull_message(
        &self,
        req: Request<pb::PullMessageRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let answer = self.api.pull_message(req).await;
        self.frames(answer, "PullMessage", |_, frame| {
            use pb::pull_message_response::Content;
            match &frame.content {
                Some(Content::Status(s)) => Some(code_name(s)),
                _ => None,
            }
        })
    }

    type TelemetryStream = TelemetryStream;

    /// Counted when the stream opens (it lasts as long as the client).
    async fn telemetry(
        &self,
        req: Request<Streaming<pb::TelemetryCommand>>,
    ) -> Result<Response<TelemetryStream>, Status> {
        let answer = self.api.telemetry(req).await;
        let code = match &answer {
            Ok(_) => "OK",
            Err(e) => grpc_code_name(e.code()),
        };
        self.metrics.call("Telemetry", code);
        answer
    }
}
