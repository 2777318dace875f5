//! The official Apache RocketMQ Rust client (crates.io `rocketmq` 5.0.0),
//! unchanged, against a real `keelmq-broker` process: producer and simple
//! consumer for NORMAL and FIFO topics, tag filters, redelivery of what
//! was not acked, and messages surviving a broker restart.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use keelmq_tests::BrokerProcess;
use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageBuilder;
use rocketmq::{Producer, SimpleConsumer};

fn client_option(endpoint: &str) -> ClientOption {
    let mut co = ClientOption::default();
    co.set_access_url(endpoint);
    co.set_enable_tls(false);
    co.set_timeout(Duration::from_secs(5));
    co.set_long_polling_timeout(Duration::from_secs(5));
    co
}

async fn producer(endpoint: &str, topic: &str) -> Producer {
    let mut po = ProducerOption::default();
    po.set_topics(vec![topic]);
    let mut p = Producer::new(po, client_option(endpoint)).expect("producer");
    p.start().await.expect("producer starts");
    p
}

async fn consumer(endpoint: &str, group: &str, topic: &str) -> SimpleConsumer {
    let mut so = SimpleConsumerOption::default();
    so.set_consumer_group(group);
    so.set_topics(vec![topic]);
    let mut c = SimpleConsumer::new(so, client_option(endpoint)).expect("consumer");
    c.start().await.expect("consumer starts");
    c
}

/// Receives (10 s invisible duration) until `want` messages arrived or 60 s
/// passed; acks when asked.
async fn receive_all(
    c: &SimpleConsumer,
    topic: &str,
    filter: &str,
    want: usize,
    ack: bool,
) -> Vec<(
    String,
    Vec<u8>,
    Option<String>,
    HashMap<String, String>,
    i32,
)> {
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < want && start.elapsed() < Duration::from_secs(60) {
        let batch = c
            .receive_with(
                topic.to_string(),
                &FilterExpression::new(FilterType::Tag, filter),
                32,
                Duration::from_secs(10),
            )
            .await
            .expect("receive");
        for m in batch {
            got.push((
                m.message_id().to_owned(),
                m.body().to_vec(),
                m.tag().map(str::to_owned),
                m.properties().clone(),
                m.delivery_attempt(),
            ));
            if ack {
                c.ack(&m).await.expect("ack");
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_messages_round_trip_with_tags_and_redelivery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    broker.cli_ok(&["topic", "create", "orders", "--queues", "4"]);
    let endpoint = broker.endpoint();

    let p = producer(&endpoint, "orders").await;
    let mut sent = BTreeMap::new();
    for i in 0..40 {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        let mut props = HashMap::new();
        props.insert("n".to_string(), i.to_string());
        let body = format!("order {i}").into_bytes();
        let m = MessageBuilder::builder()
            .set_topic("orders")
            .set_tag(tag)
            .set_keys(vec![format!("k{i}")])
            .set_properties(props)
            .set_body(body.clone())
            .build()
            .expect("message");
        let receipt = p.send(m).await.expect("send acknowledged");
        sent.insert(receipt.message_id().to_owned(), (body, tag));
    }

    // A group that only wants "even" gets exactly those, with their properties.
    let c = consumer(&endpoint, "even-readers", "orders").await;
    let got = receive_all(&c, "orders", "even", 20, true).await;
    assert_eq!(got.len(), 20);
    for (id, body, tag, props, attempt) in &got {
        let (sent_body, sent_tag) = sent.get(id).expect("known message id");
        assert_eq!(body, sent_body);
        assert_eq!(tag.as_deref(), Some(*sent_tag));
        assert_eq!(*sent_tag, "even");
        assert!(props.contains_key("n"));
        assert_eq!(*attempt, 1);
    }

    // Another group takes everything but acks nothing: after the invisible
    // time the same messages come back as second attempts.
    let all = consumer(&endpoint, "all-readers", "orders").await;
    let first = receive_all(&all, "orders", "*", 40, false).await;
    assert_eq!(first.len(), 40);
    let again = receive_all(&all, "orders", "*", 40, true).await;
    assert_eq!(again.len(), 40);
    assert!(
        again.iter().all(|m| m.4 == 2),
        "redeliveries are second attempts"
    );
    let ids: std::collections::BTreeSet<_> = again.iter().map(|m| m.0.clone()).collect();
    assert_eq!(ids.len(), 40);

    // Restart: acked messages are not redelivered; a new group still sees all.
    drop((p, c, all));
    broker.stop();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let endpoint = broker.endpoint();
    let c = consumer(&endpoint, "even-readers", "orders").await;
    let none = c
        .receive_with(
            "orders".to_string(),
            &FilterExpression::new(FilterType::Tag, "even"),
            32,
            Duration::from_secs(10),
        )
        .await
        .expect("receive");
    assert!(none.is_empty(), "acked messages came back after a restart");
    let fresh = consumer(&endpoint, "late-group", "orders").await;
    assert_eq!(receive_all(&fresh, "orders", "*", 40, true).await.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_messages_keep_group_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    broker.cli_ok(&[
        "topic", "create", "ledger", "--queues", "4", "--type", "FIFO",
    ]);
    let endpoint = broker.endpoint();
    let p = producer(&endpoint, "ledger").await;
    for i in 0..30 {
        let group = format!("account-{}", i % 3);
        let m = MessageBuilder::fifo_message_builder(
            "ledger",
            format!("{group} entry {i}").into_bytes(),
            group,
        )
        .build()
        .expect("message");
        p.send(m).await.expect("send");
    }
    let c = consumer(&endpoint, "ledger-readers", "ledger").await;
    let got = receive_all(&c, "ledger", "*", 30, true).await;
    assert_eq!(got.len(), 30);
    let mut per_group: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (_, body, _, _, _) in &got {
        let text = String::from_utf8(body.clone()).expect("utf8");
        let mut parts = text.split(' ');
        let group = parts.next().expect("group").to_owned();
        let n: u32 = parts.nth(1).and_then(|s| s.parse().ok()).expect("sequence");
        per_group.entry(group).or_default().push(n);
    }
    assert_eq!(per_group.len(), 3);
    for (g, seq) in per_group {
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        assert_eq!(seq, sorted, "group {g} out of order");
        assert_eq!(seq.len(), 10);
    }
}

/// The same client with TLS on, verifying the broker's certificate
/// against the CA the broker generated (`<data dir>/tls/ca.pem`), on the
/// same port that serves plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_plaintext_share_the_client_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &["--auto-create-topics", "true"]);
    let ca = dir.path().join("tls/ca.pem");
    assert!(ca.exists(), "the broker made its CA");
    // The client's TLS uses the platform roots, which honour SSL_CERT_FILE;
    // this test runs in its own process, so setting it affects only itself.
    // SAFETY: set before any other thread of this test reads the environment.
    unsafe { std::env::set_var("SSL_CERT_FILE", &ca) };
    let mut tls = client_option(&broker.endpoint());
    tls.set_enable_tls(true);
    let mut po = ProducerOption::default();
    po.set_topics(vec!["secure"]);
    let mut p = Producer::new(po, tls).expect("producer");
    p.start().await.expect("TLS producer starts");
    let m = MessageBuilder::builder()
        .set_topic("secure")
        .set_body(b"over tls".to_vec())
        .build()
        .expect("message");
    p.send(m).await.expect("send over TLS");
    // Plaintext on the same port.
    let c = consumer(&broker.endpoint(), "secure-readers", "secure").await;
    let got = receive_all(&c, "secure", "*", 1, true).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"over tls");
}

/// DELAY: a message is invisible until its delivery time, then delivered
/// within a second of it; a pending timer survives a broker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_messages_wait_for_their_time_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    broker.cli_ok(&[
        "topic",
        "create",
        "reminders",
        "--queues",
        "2",
        "--type",
        "DELAY",
    ]);
    let endpoint = broker.endpoint();
    let p = producer(&endpoint, "reminders").await;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    // One due in 3 s; one due in 8 s that must outlive a restart.
    let soon = now_s + 3;
    let later = now_s + 8;
    for (due, body) in [(soon, "soon"), (later, "later")] {
        let m = MessageBuilder::delay_message_builder("reminders", body.as_bytes().to_vec(), due)
            .build()
            .expect("message");
        p.send(m).await.expect("send");
    }
    let c = consumer(&endpoint, "reminder-readers", "reminders").await;
    let got = receive_all(&c, "reminders", "*", 1, true).await;
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"soon");
    assert!(at >= soon * 1000, "delivered before its time");
    assert!(
        at <= soon * 1000 + 6_000,
        "delivered {} ms late",
        at - soon * 1000
    );

    // Restart before the second one is due.
    drop((p, c));
    broker.stop();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let c = consumer(&broker.endpoint(), "reminder-readers", "reminders").await;
    let got = receive_all(&c, "reminders", "*", 1, true).await;
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert_eq!(got.len(), 1, "the pending timer survived the restart");
    assert_eq!(got[0].1, b"later");
    assert!(at >= later * 1000, "delivered before its time");
}
