//! Every error status the client protocol promises, reached over the wire
//! against a real `keelmq-broker` process with a plain gRPC client (the
//! project's own generated stubs), and no input that kills a connection.

use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use keelmq_proto::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use keelmq_tests::BrokerProcess;
use pb::Code;
use tonic::Request;
use tonic::transport::Channel;

async fn client(b: &BrokerProcess) -> MessagingServiceClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", b.endpoint()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    MessagingServiceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn with_id<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("x-mq-client-id", "test@1#1".parse().expect("header"));
    r
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

fn message(topic: &str, body: Vec<u8>, group: Option<&str>) -> pb::Message {
    pb::Message {
        topic: resource(topic),
        user_properties: Default::default(),
        system_properties: Some(pb::SystemProperties {
            message_id: "01ABC".into(),
            message_group: group.map(str::to_owned),
            message_type: if group.is_some() {
                pb::MessageType::Fifo
            } else {
                pb::MessageType::Normal
            } as i32,
            ..Default::default()
        }),
        body: body.into(),
    }
}

async fn send_code(c: &mut MessagingServiceClient<Channel>, m: pb::Message) -> i32 {
    let resp = c
        .send_message(with_id(pb::SendMessageRequest { messages: vec![m] }))
        .await
        .expect("a send always gets a response")
        .into_inner();
    resp.status.expect("status").code
}

async fn receive_codes(
    c: &mut MessagingServiceClient<Channel>,
    req: Request<pb::ReceiveMessageRequest>,
) -> Vec<i32> {
    let mut stream = c.receive_message(req).await.expect("stream").into_inner();
    let mut codes = Vec::new();
    while let Some(frame) = stream.message().await.expect("frame") {
        if let Some(pb::receive_message_response::Content::Status(s)) = frame.content {
            codes.push(s.code);
        }
    }
    codes
}

fn receive(topic: &str, invisible: Option<u64>, polling: Option<i64>) -> pb::ReceiveMessageRequest {
    pb::ReceiveMessageRequest {
        group: resource("g"),
        message_queue: Some(pb::MessageQueue {
            topic: resource(topic),
            ..Default::default()
        }),
        filter_expression: None,
        batch_size: 16,
        invisible_duration: invisible.map(|s| prost_types::Duration {
            seconds: s as i64,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: polling.map(|s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        }),
        attempt_id: None,
    }
}

/// The status codes of the official Rust client 5.0.0 (crate `rocketmq`,
/// `src/pb/apache.rocketmq.v2.rs`, enum `Code`). The client decodes every
/// status with `Code::from_i32(..).unwrap()`, so any other code panics it.
const RUST_CLIENT_5_0_0_CODES: &[i32] = &[
    0, 20000, 30000, 40000, 40001, 40002, 40003, 40004, 40005, 40006, 40007, 40008, 40009, 40010,
    40011, 40012, 40013, 40014, 40015, 40016, 40017, 40018, 40100, 40200, 40300, 40400, 40401,
    40402, 40403, 40800, 41300, 41301, 42800, 42900, 43100, 43101, 50000, 50001, 50002, 50100,
    50400, 50401, 50402, 50500, 50501, 50502, 60000,
];

/// `MessageBodyEmpty` -> `MESSAGE_BODY_EMPTY`, the protocol's name.
fn screaming_snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// Every status code the client API's source names (`Code::X`) is one the
/// official Rust client 5.0.0 can decode.
#[test]
fn every_status_code_the_broker_sends_is_known_to_the_rust_client() {
    let sources = [
        (
            "convert.rs",
            include_str!("../../broker/src/client_api/convert.rs"),
        ),
        ("mod.rs", include_str!("../../broker/src/client_api/mod.rs")),
        (
            "producers.rs",
            include_str!("../../broker/src/client_api/producers.rs"),
        ),
        (
            "settings.rs",
            include_str!("../../broker/src/client_api/settings.rs"),
        ),
        ("tls.rs", include_str!("../../broker/src/client_api/tls.rs")),
        ("txn.rs", include_str!("../../broker/src/client_api/txn.rs")),
    ];
    let mut seen = 0;
    for (file, text) in sources {
        for (at, _) in text.match_indices("Code::") {
            let name: String = text[at + "Code::".len()..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            if !name.starts_with(|c: char| c.is_ascii_uppercase()) {
                continue;
            }
            let code = Code::from_str_name(&screaming_snake(&name))
                .unwrap_or_else(|| panic!("{file}: Code::{name} is not a protocol code"));
            assert!(
                RUST_CLIENT_5_0_0_CODES.contains(&(code as i32)),
                "{file}: Code::{name} ({}) is unknown to the Rust client 5.0.0, which panics on it",
                code as i32
            );
            seen += 1;
        }
    }
    assert!(seen > 20, "the scan found the codes ({seen})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_error_code_is_reachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    b.cli_ok(&["topic", "create", "plain", "--queues", "2"]);
    b.cli_ok(&[
        "topic", "create", "later", "--queues", "2", "--type", "DELAY",
    ]);
    b.cli_ok(&[
        "topic", "create", "ordered", "--queues", "2", "--type", "FIFO",
    ]);
    let mut c = client(&b).await;

    // Missing client id: every RPC says so.
    let r = c
        .query_route(Request::new(pb::QueryRouteRequest {
            topic: resource("plain"),
            endpoints: None,
        }))
        .await
        .expect("route")
        .into_inner();
    assert_eq!(
        r.status.expect("status").code,
        Code::ClientIdRequired as i32
    );
    let r = c
        .send_message(Request::new(pb::SendMessageRequest {
            messages: vec![message("plain", b"x".to_vec(), None)],
        }))
        .await
        .expect("send")
        .into_inner();
    assert_eq!(
        r.status.expect("status").code,
        Code::ClientIdRequired as i32
    );

    // Unknown topic.
    let r = c
        .query_route(with_id(pb::QueryRouteRequest {
            topic: resource("nope"),
            endpoints: None,
        }))
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r.status.expect("status").code, Code::TopicNotFound as i32);
    assert_eq!(
        send_code(&mut c, message("nope", b"x".to_vec(), None)).await,
        Code::TopicNotFound as i32
    );

    // Route of a known topic: master queues with the accepted type.
    let r = c
        .query_route(with_id(pb::QueryRouteRequest {
            topic: resource("ordered"),
            endpoints: None,
        }))
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r.status.expect("status").code, Code::Ok as i32);
    assert_eq!(r.message_queues.len(), 2);
    assert!(
        r.message_queues
            .iter()
            .all(|q| q.accept_message_types == vec![pb::MessageType::Fifo as i32])
    );

    // Bodies: empty, too large (4 MiB limit), fine. An empty body is a
    // BAD_REQUEST: MESSAGE_BODY_EMPTY (41302) would panic the Rust client.
    assert_eq!(
        send_code(&mut c, message("plain", vec![], None)).await,
        Code::BadRequest as i32
    );
    assert_eq!(
        send_code(&mut c, message("plain", vec![7u8; (4 << 20) + 1], None)).await,
        Code::MessageBodyTooLarge as i32
    );
    assert_eq!(
        send_code(&mut c, message("plain", b"ok".to_vec(), None)).await,
        Code::Ok as i32
    );

    // User properties: at most 128, of at most 16 KiB together, as upstream.
    let with_properties = |props: Vec<(String, String)>| {
        let mut m = message("plain", b"x".to_vec(), None);
        m.user_properties = props.into_iter().collect();
        m
    };
    let many = (0..129).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        send_code(&mut c, with_properties(many)).await,
        Code::MessagePropertiesTooLarge as i32,
        "129 properties"
    );
    let big = vec![("k".to_owned(), "v".repeat(64 << 10))];
    assert_eq!(
        send_code(&mut c, with_properties(big)).await,
        Code::MessagePropertiesTooLarge as i32,
        "a 64 KiB property"
    );

    // Message type the topic does not accept, and bad message groups.
    assert_eq!(
        send_code(&mut c, message("plain", b"x".to_vec(), Some("g1"))).await,
        Code::MessagePropertyConflictWithType as i32
    );
    let mut groupless = message("ordered", b"x".to_vec(), None);
    if let Some(sp) = groupless.system_properties.as_mut() {
        sp.message_type = pb::MessageType::Fifo as i32;
    }
    assert_eq!(
        send_code(&mut c, groupless).await,
        Code::IllegalMessageGroup as i32,
        "a FIFO message without a group"
    );
    assert_eq!(
        send_code(&mut c, message("ordered", b"x".to_vec(), None)).await,
        Code::MessagePropertyConflictWithType as i32,
        "a NORMAL message to a FIFO topic"
    );
    assert_eq!(
        send_code(
            &mut c,
            message("ordered", b"x".to_vec(), Some(&"g".repeat(65)))
        )
        .await,
        Code::IllegalMessageGroup as i32
    );
    assert_eq!(
        send_code(&mut c, message("ordered", b"x".to_vec(), Some("g1"))).await,
        Code::Ok as i32
    );

    // Delivery times: more than the timer's 3 days ahead is refused.
    let delayed = |seconds_ahead: i64| {
        let mut m = message("later", b"x".to_vec(), None);
        if let Some(sp) = m.system_properties.as_mut() {
            sp.message_type = pb::MessageType::Delay as i32;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs() as i64;
            sp.delivery_timestamp = Some(prost_types::Timestamp {
                seconds: now + seconds_ahead,
                nanos: 0,
            });
        }
        m
    };
    assert_eq!(
        send_code(&mut c, delayed(4 * 86_400)).await,
        Code::IllegalDeliveryTime as i32
    );
    // Seconds whose milliseconds overflow an i64: refused, not wrapped into
    // the past (delivered at once) nor a panic.
    let mut overflowing = delayed(0);
    if let Some(sp) = overflowing.system_properties.as_mut() {
        sp.delivery_timestamp = Some(prost_types::Timestamp {
            seconds: i64::MAX / 1000 + 1,
            nanos: 0,
        });
    }
    assert_eq!(
        send_code(&mut c, overflowing).await,
        Code::IllegalDeliveryTime as i32
    );
    assert_eq!(send_code(&mut c, delayed(60)).await, Code::Ok as i32);
    assert_eq!(
        send_code(&mut c, message("later", b"x".to_vec(), None)).await,
        Code::MessagePropertyConflictWithType as i32,
        "a NORMAL message to a DELAY topic"
    );

    // Receive: bad invisible duration, bad polling time, then a real receive.
    let codes = receive_codes(&mut c, with_id(receive("plain", Some(1), Some(5)))).await;
    assert_eq!(codes, vec![Code::IllegalInvisibleTime as i32]);
    let codes = receive_codes(&mut c, with_id(receive("plain", None, Some(5)))).await;
    assert_eq!(codes, vec![Code::IllegalInvisibleTime as i32]);
    let codes = receive_codes(&mut c, with_id(receive("plain", Some(30), Some(-3)))).await;
    assert_eq!(codes, vec![Code::IllegalPollingTime as i32]);
    let mut short = with_id(receive("plain", Some(30), Some(5)));
    short.set_timeout(Duration::from_millis(500));
    let codes = receive_codes(&mut c, short).await;
    assert_eq!(
        codes,
        vec![Code::IllegalPollingTime as i32],
        "deadline too short to poll"
    );
    let codes = receive_codes(&mut c, with_id(receive("nope", Some(30), Some(5)))).await;
    assert_eq!(codes, vec![Code::TopicNotFound as i32]);
    let codes = receive_codes(&mut c, Request::new(receive("plain", Some(30), Some(5)))).await;
    assert_eq!(codes, vec![Code::ClientIdRequired as i32]);
    // A consumer group that cannot name a dead-letter topic (%DLQ%<group>)
    // is refused by every consumer RPC.
    for bad in ["", "orders.v1", "svc:pay"] {
        let mut r = receive("plain", Some(30), Some(5));
        r.group = resource(bad);
        let codes = receive_codes(&mut c, with_id(r)).await;
        assert_eq!(codes, vec![Code::IllegalConsumerGroup as i32], "{bad:?}");
        let r = c
            .ack_message(with_id(pb::AckMessageRequest {
                group: resource(bad),
                topic: resource("plain"),
                entries: vec![],
            }))
            .await
            .expect("ack")
            .into_inner();
        assert_eq!(
            r.status.expect("status").code,
            Code::IllegalConsumerGroup as i32
        );
        let r = c
            .change_invisible_duration(with_id(pb::ChangeInvisibleDurationRequest {
                group: resource(bad),
                topic: resource("plain"),
                receipt_handle: "h".into(),
                invisible_duration: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                message_id: "01ABC".into(),
                lite_topic: None,
                suspend: None,
            }))
            .await
            .expect("change")
            .into_inner();
        assert_eq!(
            r.status.expect("status").code,
            Code::IllegalConsumerGroup as i32
        );
        let r = c
            .forward_message_to_dead_letter_queue(with_id(
                pb::ForwardMessageToDeadLetterQueueRequest {
                    group: resource(bad),
                    topic: resource("plain"),
                    receipt_handle: "h".into(),
                    message_id: "01ABC".into(),
                    delivery_attempt: 3,
                    max_delivery_attempts: 3,
                    lite_topic: None,
                },
            ))
            .await
            .expect("forward")
            .into_inner();
        assert_eq!(
            r.status.expect("status").code,
            Code::IllegalConsumerGroup as i32
        );
    }

    let mut stream = c
        .receive_message(with_id(receive("plain", Some(30), Some(5))))
        .await
        .expect("stream")
        .into_inner();
    let mut handle = None;
    let mut frames = Vec::new();
    while let Some(f) = stream.message().await.expect("frame") {
        if let Some(pb::receive_message_response::Content::Message(m)) = &f.content {
            let sp = m.system_properties.as_ref().expect("system properties");
            handle = sp.receipt_handle.clone();
            let digest = sp.body_digest.as_ref().expect("digest");
            assert_eq!(digest.r#type, pb::DigestType::Md5 as i32);
            assert_eq!(
                digest.checksum, "444BCB3A3FCF8389296C49467F27E1D6",
                "MD5 of \"ok\", upper-case hex"
            );
        }
        frames.push(f.content.expect("content"));
    }
    assert!(
        matches!(frames.first(), Some(pb::receive_message_response::Content::Status(s)) if s.code == Code::Ok as i32)
    );
    assert!(matches!(
        frames.last(),
        Some(pb::receive_message_response::Content::DeliveryTimestamp(_))
    ));
    let handle = handle.expect("a message was received");

    // Acks: a foreign or garbage handle, then the real one twice.
    let ack = |h: String| {
        with_id(pb::AckMessageRequest {
            group: resource("g"),
            topic: resource("plain"),
            entries: vec![pb::AckMessageEntry {
                message_id: "01ABC".into(),
                receipt_handle: h,
                lite_topic: None,
            }],
        })
    };
    let code = |r: pb::AckMessageResponse| r.status.expect("status").code;
    assert_eq!(
        code(
            c.ack_message(ack("garbage".into()))
                .await
                .expect("ack")
                .into_inner()
        ),
        Code::InvalidReceiptHandle as i32
    );
    let foreign = handle.replacen(' ', " someone-else-", 1);
    assert_eq!(
        code(c.ack_message(ack(foreign)).await.expect("ack").into_inner()),
        Code::InvalidReceiptHandle as i32
    );
    // Changing the invisible time outside its range is refused.
    let change = c
        .change_invisible_duration(with_id(pb::ChangeInvisibleDurationRequest {
            group: resource("g"),
            topic: resource("plain"),
            receipt_handle: handle.clone(),
            invisible_duration: Some(prost_types::Duration {
                seconds: 13 * 3600,
                nanos: 0,
            }),
            message_id: "01ABC".into(),
            lite_topic: None,
            suspend: None,
        }))
        .await
        .expect("change")
        .into_inner();
    assert_eq!(
        change.status.expect("status").code,
        Code::IllegalInvisibleTime as i32
    );
    assert_eq!(
        code(
            c.ack_message(ack(handle.clone()))
                .await
                .expect("ack")
                .into_inner()
        ),
        Code::Ok as i32
    );
    assert_eq!(
        code(c.ack_message(ack(handle)).await.expect("ack").into_inner()),
        Code::InvalidReceiptHandle as i32,
        "a second ack of the same delivery is stale"
    );

    // RPCs the broker does not implement answer UNIMPLEMENTED, as upstream.
    let err = c
        .get_offset(with_id(pb::GetOffsetRequest::default()))
        .await
        .expect_err("unimplemented");
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    // The connection survived all of it.
    let r = c
        .heartbeat(with_id(pb::HeartbeatRequest {
            group: None,
            client_type: pb::ClientType::Producer as i32,
        }))
        .await
        .expect("heartbeat")
        .into_inner();
    assert_eq!(r.status.expect("status").code, Code::Ok as i32);
}

fn end(
    topic: &str,
    message_id: &str,
    transaction_id: &str,
    resolution: pb::TransactionResolution,
    source: pb::TransactionSource,
) -> pb::EndTransactionRequest {
    pb::EndTransactionRequest {
        topic: resource(topic),
        message_id: message_id.into(),
        transaction_id: transaction_id.into(),
        resolution: resolution as i32,
        source: source as i32,
        trace_context: String::new(),
    }
}

async fn end_code(
    c: &mut MessagingServiceClient<Channel>,
    r: Request<pb::EndTransactionRequest>,
) -> i32 {
    c.end_transaction(r)
        .await
        .expect("EndTransaction always gets a response")
        .into_inner()
        .status
        .expect("status")
        .code
}

/// TRANSACTION messages over the wire: type checks both ways, and every
/// status EndTransaction answers (upstream: a blank transaction id is
/// INVALID_TRANSACTION_ID; so is one naming no half message of that topic
/// and message here, or one already resolved the other way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_transaction_error_codes() {
    use pb::TransactionResolution::{Commit, Rollback};
    use pb::TransactionSource::{SourceClient, SourceServerCheck};
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    b.cli_ok(&["topic", "create", "plain", "--queues", "2"]);
    b.cli_ok(&[
        "topic",
        "create",
        "tx",
        "--queues",
        "2",
        "--type",
        "TRANSACTION",
    ]);
    let mut c = client(&b).await;
    let tx_message = |topic: &str, id: &str| {
        let mut m = message(topic, b"half".to_vec(), None);
        if let Some(sp) = m.system_properties.as_mut() {
            sp.message_type = pb::MessageType::Transaction as i32;
            sp.message_id = id.into();
        }
        m
    };

    // A topic accepts only its own message type.
    assert_eq!(
        send_code(&mut c, tx_message("plain", "01TX0")).await,
        Code::MessagePropertyConflictWithType as i32,
        "a TRANSACTION message to a NORMAL topic"
    );
    assert_eq!(
        send_code(&mut c, message("tx", b"x".to_vec(), None)).await,
        Code::MessagePropertyConflictWithType as i32,
        "a NORMAL message to a TRANSACTION topic"
    );

    let send = |m: pb::Message| with_id(pb::SendMessageRequest { messages: vec![m] });
    let mut ids = Vec::new();
    for id in ["01TX1", "01TX2"] {
        let r = c
            .send_message(send(tx_message("tx", id)))
            .await
            .expect("send")
            .into_inner();
        assert_eq!(r.status.expect("status").code, Code::Ok as i32);
        let entry = r.entries.first().expect("entry");
        assert_eq!(entry.message_id, id);
        assert!(!entry.transaction_id.is_empty());
        ids.push(entry.transaction_id.clone());
    }

    // The half message is invisible.
    let codes = receive_codes(&mut c, with_id(receive("tx", Some(30), Some(5)))).await;
    assert_eq!(codes, vec![Code::MessageNotFound as i32]);

    // Errors.
    assert_eq!(
        end_code(
            &mut c,
            Request::new(end("tx", "01TX1", &ids[0], Commit, SourceClient))
        )
        .await,
        Code::ClientIdRequired as i32
    );
    let cases = [
        (
            end("tx", "01TX1", "", Commit, SourceClient),
            Code::InvalidTransactionId,
            "blank id",
        ),
        (
            end("tx", "01TX1", "  ", Rollback, SourceClient),
            Code::InvalidTransactionId,
            "blank id",
        ),
        (
            end("nowhere", "01TX1", &ids[0], Commit, SourceClient),
            Code::TopicNotFound,
            "unknown topic",
        ),
        (
            end("tx", "01TX1", "FFFF-01TX1", Commit, SourceClient),
            Code::InvalidTransactionId,
            "unknown id",
        ),
        (
            end(
                "tx",
                "01TX1",
                "not-a-transaction",
                Commit,
                SourceServerCheck,
            ),
            Code::InvalidTransactionId,
            "foreign id",
        ),
        (
            end("plain", "01TX1", &ids[0], Commit, SourceClient),
            Code::InvalidTransactionId,
            "another topic's",
        ),
        (
            end("tx", "01TX2", &ids[0], Commit, SourceClient),
            Code::InvalidTransactionId,
            "another message's",
        ),
    ];
    for (req, want, what) in cases {
        assert_eq!(end_code(&mut c, with_id(req)).await, want as i32, "{what}");
    }

    // Commit, then the same answer again (as a check-back answer would be):
    // fine; the opposite answer afterwards is refused.
    for source in [SourceClient, SourceServerCheck] {
        assert_eq!(
            end_code(&mut c, with_id(end("tx", "01TX1", &ids[0], Commit, source))).await,
            Code::Ok as i32
        );
    }
    assert_eq!(
        end_code(
            &mut c,
            with_id(end("tx", "01TX1", &ids[0], Rollback, SourceClient))
        )
        .await,
        Code::InvalidTransactionId as i32,
        "a committed transaction cannot be rolled back"
    );
    assert_eq!(
        end_code(
            &mut c,
            with_id(end("tx", "01TX2", &ids[1], Rollback, SourceServerCheck))
        )
        .await,
        Code::Ok as i32
    );
    assert_eq!(
        end_code(
            &mut c,
            with_id(end("tx", "01TX2", &ids[1], Commit, SourceClient))
        )
        .await,
        Code::InvalidTransactionId as i32,
        "a rolled-back transaction cannot be committed"
    );

    // Exactly the committed message is visible.
    let mut stream = c
        .receive_message(with_id(receive("tx", Some(30), Some(5))))
        .await
        .expect("stream")
        .into_inner();
    let mut got = Vec::new();
    while let Some(frame) = stream.message().await.expect("frame") {
        if let Some(pb::receive_message_response::Content::Message(m)) = frame.content {
            got.push(m.system_properties.map(|p| (p.message_id, p.message_type)));
        }
    }
    assert_eq!(
        got,
        vec![Some((
            "01TX1".to_owned(),
            pb::MessageType::Transaction as i32
        ))]
    );
}

/// Check-back on the wire: a producer's Telemetry stream that declared the
/// topic receives RecoverOrphanedTransactionCommand (message and
/// transaction id) for a transaction left open, not before the
/// orphaned-transaction-recovery duration the producer asked for, and its
/// EndTransaction from SOURCE_SERVER_CHECK commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_back_over_a_raw_telemetry_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(
        dir.path(),
        &[
            "--transaction-check-first-ms",
            "1000",
            "--transaction-check-interval-ms",
            "1000",
        ],
    );
    b.cli_ok(&[
        "topic",
        "create",
        "tx",
        "--queues",
        "1",
        "--type",
        "TRANSACTION",
    ]);
    let mut c = client(&b).await;
    let (out, rx) = tokio::sync::mpsc::channel::<pb::TelemetryCommand>(4);
    out.send(pb::TelemetryCommand {
        status: None,
        command: Some(pb::telemetry_command::Command::Settings(pb::Settings {
            client_type: Some(pb::ClientType::Producer as i32),
            pub_sub: Some(pb::settings::PubSub::Publishing(pb::Publishing {
                topics: vec![pb::Resource {
                    resource_namespace: String::new(),
                    name: "tx".into(),
                }],
                ..Default::default()
            })),
            ..Default::default()
        })),
    })
    .await
    .expect("queue settings");
    let mut inbound = c
        .telemetry(with_id(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect("telemetry")
        .into_inner();
    let first = inbound
        .message()
        .await
        .expect("frame")
        .expect("settings reply");
    assert!(matches!(
        first.command,
        Some(pb::telemetry_command::Command::Settings(_))
    ));

    let mut m = message("tx", b"orphan".to_vec(), None);
    if let Some(sp) = m.system_properties.as_mut() {
        sp.message_type = pb::MessageType::Transaction as i32;
        sp.message_id = "01ORPHAN".into();
        sp.orphaned_transaction_recovery_duration = Some(prost_types::Duration {
            seconds: 3,
            nanos: 0,
        });
    }
    let sent_at = std::time::Instant::now();
    let r = c
        .send_message(with_id(pb::SendMessageRequest { messages: vec![m] }))
        .await
        .expect("send")
        .into_inner();
    let tx_id = r.entries.first().expect("entry").transaction_id.clone();

    let cmd = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let frame = inbound
                .message()
                .await
                .expect("frame")
                .expect("stream open");
            if let Some(pb::telemetry_command::Command::RecoverOrphanedTransactionCommand(c)) =
                frame.command
            {
                return c;
            }
        }
    })
    .await
    .expect("checked back within 30 s");
    assert!(
        sent_at.elapsed() >= Duration::from_millis(2500),
        "checked back after {:?}, before the 3 s the producer asked for",
        sent_at.elapsed()
    );
    assert_eq!(cmd.transaction_id, tx_id);
    let msg = cmd.message.expect("message");
    assert_eq!(msg.topic.expect("topic").name, "tx");
    assert_eq!(&msg.body[..], b"orphan");
    let sp = msg.system_properties.expect("system properties");
    assert_eq!(sp.message_id, "01ORPHAN");
    assert_eq!(sp.message_type, pb::MessageType::Transaction as i32);

    assert_eq!(
        end_code(
            &mut c,
            with_id(end(
                "tx",
                "01ORPHAN",
                &tx_id,
                pb::TransactionResolution::Commit,
                pb::TransactionSource::SourceServerCheck,
            ))
        )
        .await,
        Code::Ok as i32
    );
    let codes = receive_codes(&mut c, with_id(receive("tx", Some(30), Some(5)))).await;
    assert_eq!(
        codes,
        vec![Code::Ok as i32],
        "the committed message is there"
    );
    drop(out);
}

/// Auto-creation never makes a client-visible topic of a system topic: half
/// messages (and timers) stay out of consumers' reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_topics_are_not_auto_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &["--auto-create-topics", "true"]);
    let mut c = client(&b).await;
    for topic in ["%SYS_HALF%", "%SYS_HALF_OP%", "%SYS_DELAY%"] {
        let codes = receive_codes(&mut c, with_id(receive(topic, Some(30), Some(5)))).await;
        assert_eq!(codes, vec![Code::TopicNotFound as i32], "{topic}");
        assert_eq!(
            send_code(&mut c, message(topic, b"x".to_vec(), None)).await,
            Code::TopicNotFound as i32,
            "{topic}"
        );
    }
    // Ordinary names still are.
    assert_eq!(
        send_code(&mut c, message("made-on-use", b"x".to_vec(), None)).await,
        Code::Ok as i32
    );
}
