//! The official Apache RocketMQ Rust client (crates.io `rocketmq` 5.0.0),
//! unchanged, against a real `keelmq-broker` process: producer and simple
//! consumer for NORMAL, FIFO, DELAY and TRANSACTION topics, tag filters,
//! redelivery of what was not acked, transaction check-back, and messages,
//! timers and half messages surviving a broker restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelmq_tests::BrokerProcess;
use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageBuilder;
use rocketmq::model::transaction::{Transaction, TransactionResolution};
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
    // An empty body is refused with a status this client knows (it panics
    // on a code missing from its list, as MESSAGE_BODY_EMPTY is).
    let empty = MessageBuilder::builder()
        .set_topic("orders")
        .set_body(Vec::new())
        .build()
        .expect("the client builds it");
    assert!(p.send(empty).await.is_err(), "an empty body is refused");

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

/// Settings that keep transaction check-back short in tests (the defaults
/// are RocketMQ's 6 s first check and 30 s interval).
const FAST_CHECKS: [&str; 4] = [
    "--transaction-check-first-ms",
    "1000",
    "--transaction-check-interval-ms",
    "1000",
];

/// What a transaction checker was asked: (transaction id, message id, body).
type Checked = Arc<Mutex<Vec<(String, String, String)>>>;

/// A transactional producer whose checker records each question and answers
/// COMMIT for bodies starting with "commit", ROLLBACK for "rollback", and
/// UNKNOWN otherwise.
async fn transaction_producer(endpoint: &str, topic: &str) -> (Producer, Checked) {
    let checked: Checked = Arc::default();
    let seen = checked.clone();
    let mut po = ProducerOption::default();
    po.set_topics(vec![topic]);
    let mut p = Producer::new_transaction_producer(
        po,
        client_option(endpoint),
        Box::new(move |tx_id, m| {
            let body = String::from_utf8_lossy(m.body()).into_owned();
            let answer = if body.starts_with("commit") {
                TransactionResolution::COMMIT
            } else if body.starts_with("rollback") {
                TransactionResolution::ROLLBACK
            } else {
                TransactionResolution::UNKNOWN
            };
            if let Ok(mut v) = seen.lock() {
                v.push((tx_id, m.message_id().to_owned(), body));
            }
            answer
        }),
    )
    .expect("transaction producer");
    p.start().await.expect("producer starts");
    (p, checked)
}

fn checked_bodies(c: &Checked) -> BTreeSet<String> {
    c.lock()
        .map(|v| v.iter().map(|x| x.2.clone()).collect())
        .unwrap_or_default()
}

fn tx_message(topic: &str, body: &str) -> impl rocketmq::model::message::Message {
    MessageBuilder::transaction_message_builder(topic, body.as_bytes().to_vec())
        .build()
        .expect("message")
}

/// The bodies of one receive (one long poll), acked.
async fn receive_once(c: &SimpleConsumer, topic: &str) -> Vec<String> {
    let batch = c
        .receive_with(
            topic.to_string(),
            &FilterExpression::new(FilterType::Tag, "*"),
            32,
            Duration::from_secs(10),
        )
        .await
        .expect("receive");
    let mut out = Vec::new();
    for m in batch {
        out.push(String::from_utf8_lossy(m.body()).into_owned());
        c.ack(&m).await.expect("ack");
    }
    out
}

/// Bodies received (and acked) by `c` until `want` arrived or 60 s passed,
/// then whatever else shows up within one more receive.
async fn bodies(c: &SimpleConsumer, topic: &str, want: usize) -> Vec<String> {
    let mut got: Vec<String> = receive_all(c, topic, "*", want, true)
        .await
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.1).into_owned())
        .collect();
    got.extend(receive_once(c, topic).await);
    got.sort();
    got
}

/// TRANSACTION: a half message is invisible until committed; a rollback
/// discards it; a transaction the producer leaves open is checked back on
/// the producer's Telemetry stream and its checker's answer (from
/// SOURCE_SERVER_CHECK) applied; a second commit is harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_commit_rollback_and_check_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &FAST_CHECKS);
    broker.cli_ok(&[
        "topic",
        "create",
        "payments",
        "--queues",
        "2",
        "--type",
        "TRANSACTION",
    ]);
    let endpoint = broker.endpoint();
    let (p, checked) = transaction_producer(&endpoint, "payments").await;
    let c = consumer(&endpoint, "payment-readers", "payments").await;

    let tx = p
        .send_transaction_message(tx_message("payments", "explicit commit"))
        .await
        .expect("half message stored");
    assert!(!tx.transaction_id().is_empty(), "a transaction id is given");
    // Not visible before the commit (its checker would answer UNKNOWN).
    let early = receive_once(&c, "payments").await;
    assert!(early.is_empty(), "a half message was delivered: {early:?}");
    tx.commit().await.expect("commit");

    let tx = p
        .send_transaction_message(tx_message("payments", "explicit rollback"))
        .await
        .expect("half message stored");
    tx.rollback().await.expect("rollback");

    // Left open: the broker asks the producer, whose checker decides.
    let open_commit = p
        .send_transaction_message(tx_message("payments", "commit when asked"))
        .await
        .expect("half message stored");
    let open_rollback = p
        .send_transaction_message(tx_message("payments", "rollback when asked"))
        .await
        .expect("half message stored");
    let open_ids = [
        open_commit.transaction_id().to_owned(),
        open_rollback.transaction_id().to_owned(),
    ];
    drop((open_commit, open_rollback));

    let got = bodies(&c, "payments", 2).await;
    assert_eq!(got, vec!["commit when asked", "explicit commit"]);
    let asked = checked_bodies(&checked);
    assert!(asked.contains("commit when asked"), "checked: {asked:?}");
    assert!(asked.contains("rollback when asked"), "checked: {asked:?}");
    let ids: BTreeSet<String> = checked
        .lock()
        .map(|v| v.iter().map(|x| x.0.clone()).collect())
        .unwrap_or_default();
    assert!(
        open_ids.iter().all(|i| ids.contains(i)),
        "check-backs carry the transaction ids given at send"
    );
    // Resolved transactions are not asked about again.
    let n = checked.lock().map(|v| v.len()).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(checked.lock().map(|v| v.len()).unwrap_or(0), n);
}

/// Half messages and decisions are in the commit log: after a restart a
/// committed transaction is delivered once, a rolled-back one never, and
/// one left open is checked back with a producer connected after the
/// restart (and only that one is asked about).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &FAST_CHECKS);
    broker.cli_ok(&[
        "topic",
        "create",
        "transfers",
        "--queues",
        "2",
        "--type",
        "TRANSACTION",
    ]);
    let (p, checked) = transaction_producer(&broker.endpoint(), "transfers").await;
    let tx = p
        .send_transaction_message(tx_message("transfers", "commit before restart"))
        .await
        .expect("send");
    tx.commit().await.expect("commit");
    let tx = p
        .send_transaction_message(tx_message("transfers", "rollback before restart"))
        .await
        .expect("send");
    tx.rollback().await.expect("rollback");
    // Unknown to the checker until after the restart: checked back, no answer.
    let open = p
        .send_transaction_message(tx_message("transfers", "open across restart"))
        .await
        .expect("send");
    let open_message_id = open.message_id().to_owned();
    drop(open);
    // Let at least one check-back reach the producer, which answers UNKNOWN.
    let start = Instant::now();
    while !checked_bodies(&checked).contains("open across restart") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no check-back before the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(p);
    broker.stop();

    let broker = BrokerProcess::start(dir.path(), &FAST_CHECKS);
    let endpoint = broker.endpoint();
    // After the restart the checker commits whatever it is asked about.
    let asked: Checked = Arc::default();
    let seen = asked.clone();
    let mut po = ProducerOption::default();
    po.set_topics(vec!["transfers"]);
    let mut p = Producer::new_transaction_producer(
        po,
        client_option(&endpoint),
        Box::new(move |tx_id, m| {
            if let Ok(mut v) = seen.lock() {
                v.push((
                    tx_id,
                    m.message_id().to_owned(),
                    String::from_utf8_lossy(m.body()).into_owned(),
                ));
            }
            TransactionResolution::COMMIT
        }),
    )
    .expect("producer");
    p.start().await.expect("producer starts");
    let c = consumer(&endpoint, "transfer-readers", "transfers").await;
    let got = bodies(&c, "transfers", 2).await;
    assert_eq!(got, vec!["commit before restart", "open across restart"]);
    let asked = asked.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(!asked.is_empty());
    assert!(
        asked.iter().all(|(_, id, _)| *id == open_message_id),
        "only the open transaction is checked back after the restart: {asked:?}"
    );
}

/// A transaction nobody resolves is checked back the maximum number of
/// times, then discarded (and counted), never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolved_transactions_are_given_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = FAST_CHECKS.to_vec();
    args.extend(["--transaction-check-max", "2"]);
    let broker = BrokerProcess::start(dir.path(), &args);
    broker.cli_ok(&[
        "topic",
        "create",
        "limbo",
        "--queues",
        "1",
        "--type",
        "TRANSACTION",
    ]);
    let (p, checked) = transaction_producer(&broker.endpoint(), "limbo").await;
    let open = p
        .send_transaction_message(tx_message("limbo", "never decided"))
        .await
        .expect("send");
    drop(open);
    let start = Instant::now();
    loop {
        let metrics = keelmq_tests::http_get(broker.http_port, "/metrics").unwrap_or_default();
        if metrics.contains("keelmq_transactions_discarded_total 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the transaction was not given up: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The producer may still be answering the last check-back.
    let start = Instant::now();
    while checked.lock().map(|v| v.len()).unwrap_or(0) < 2
        && start.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        checked.lock().map(|v| v.len()).unwrap_or(0),
        2,
        "checked back exactly the maximum number of times"
    );
    let c = consumer(&broker.endpoint(), "limbo-readers", "limbo").await;
    assert!(receive_once(&c, "limbo").await.is_empty());
}
