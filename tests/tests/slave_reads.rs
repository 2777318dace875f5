//! Slave reads with three real `keelmq-broker` processes on loopback: the
//! master hands consumers records read from a slave's commit log (always,
//! or only for records far behind the head of its log), receipt handles and
//! acks keep working on the master, and when the slaves are gone the master
//! reads the records itself instead of failing the receive.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use keelmq_failover::ReplicationMode;
use keelmq_proto::admin as admin_pb;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;
use keelmq_proto::rocketmq::v2::Code;
use keelmq_tests::group::LocalGroup;
use keelmq_tests::rmq::RawClient;

const TOPIC: &str = "reads";
const GROUP: &str = "readers";

type Sent = BTreeMap<(u32, u64), (Vec<u8>, HashMap<String, String>)>;

/// Sends `n` messages of `size` bytes round-robin over `queues` queues.
async fn send(client: &mut RawClient, n: u64, size: usize, queues: u32, sent: &mut Sent) {
    for i in 0..n {
        let q = (i % u64::from(queues)) as u32;
        let mut body = format!("message {i} of queue {q} ").into_bytes();
        body.resize(size, b'a' + (i % 26) as u8);
        let props = HashMap::from([("n".to_owned(), i.to_string())]);
        let offset = client
            .send(TOPIC, q, body.clone(), props.clone())
            .await
            .unwrap_or_else(|f| panic!("send {i}: {f:?}"));
        sent.insert((q, offset), (body, props));
    }
}

/// Receives until every message in `expected` has been seen (acking each
/// batch), checking bodies and properties; bounded by `timeout`.
async fn receive_all(client: &mut RawClient, expected: &Sent, timeout: Duration) {
    let start = Instant::now();
    let mut seen = BTreeMap::new();
    while seen.len() < expected.len() {
        assert!(
            start.elapsed() < timeout,
            "received {} of {} messages within {timeout:?}",
            seen.len(),
            expected.len()
        );
        let got = client
            .receive(
                GROUP,
                TOPIC,
                32,
                Duration::from_secs(30),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|f| panic!("receive: {f:?}"));
        for m in &got {
            let key = (m.queue_id, m.queue_offset);
            let (body, props) = expected
                .get(&key)
                .unwrap_or_else(|| panic!("unexpected message {key:?}"));
            assert_eq!(&m.body, body, "body of {key:?}");
            assert_eq!(&m.properties, props, "properties of {key:?}");
            assert!(seen.insert(key, ()).is_none(), "{key:?} delivered twice");
        }
        let failed = client
            .ack(GROUP, TOPIC, &got)
            .await
            .unwrap_or_else(|f| panic!("ack: {f:?}"));
        assert!(failed.is_empty(), "acks refused: {failed:?}");
    }
}

async fn admin(g: &LocalGroup, i: usize) -> BrokerAdminClient<tonic::transport::Channel> {
    BrokerAdminClient::connect(format!("http://{}", g.members[i].admin_endpoint()))
        .await
        .expect("admin connection")
}

/// (records read from slaves, fallbacks) on the master, and the records
/// every other member served to it.
async fn counts(g: &LocalGroup, master: usize) -> (u64, u64, u64) {
    let m = g.status(master).await.expect("master status");
    let mut served = 0;
    for i in (0..g.members.len()).filter(|&i| i != master) {
        if let Some(s) = g.status(i).await {
            served += s.records_served_to_master;
        }
    }
    (m.records_read_from_slaves, m.slave_read_fallbacks, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_slave_reads_serve_consumers_and_fall_back_when_the_slaves_are_gone() {
    let mut g = LocalGroup::start(
        3,
        ReplicationMode::Sync,
        Duration::from_secs(60),
        &["--slave-read", "always"],
    )
    .await;
    let m = g.master().expect("master");
    let mut client = g.client(m);
    let mut first = Sent::new();
    send(&mut client, 60, 700, 4, &mut first).await;
    let status = g.status(m).await.expect("status");
    assert_eq!(status.slave_read_mode, "always");

    receive_all(&mut client, &first, Duration::from_secs(60)).await;
    let (from_slaves, fallbacks, served) = counts(&g, m).await;
    assert_eq!(
        (from_slaves, fallbacks),
        (60, 0),
        "every record read from a slave"
    );
    assert_eq!(served, 60, "the slaves served what the master read");

    // A slave serves only its master's epoch and only what it holds; the
    // master serves no record reads at all.
    let slave = (0..3).find(|&i| i != m).expect("a slave");
    let end = g.status(slave).await.expect("slave status").max_offset;
    let read = |epoch: u64, offset: u64| admin_pb::ReadRecordsRequest {
        epoch,
        locations: vec![admin_pb::RecordLocation { offset, size: 100 }],
    };
    let refused = admin(&g, slave)
        .await
        .read_records(read(status.epoch + 1, 0))
        .await
        .expect_err("another epoch");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let refused = admin(&g, slave)
        .await
        .read_records(read(status.epoch, end))
        .await
        .expect_err("past the end");
    assert_eq!(refused.code(), tonic::Code::OutOfRange);
    let refused = admin(&g, m)
        .await
        .read_records(read(status.epoch, 0))
        .await
        .expect_err("the master");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // Consumption state lives on the master: a slave sends consumers there.
    let refused = g
        .client(slave)
        .receive(
            GROUP,
            TOPIC,
            1,
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
        .await
        .expect_err("a slave refuses receives");
    assert_eq!(refused.code, Code::HaNotAvailable as i32, "{refused:?}");

    // Without slaves the master reads the records itself.
    let mut second = Sent::new();
    send(&mut client, 12, 700, 4, &mut second).await;
    for i in (0..3).filter(|&i| i != m) {
        g.kill(i);
    }
    receive_all(&mut client, &second, Duration::from_secs(60)).await;
    let status = g.status(m).await.expect("status");
    assert_eq!(status.records_read_from_slaves, 60);
    assert_eq!(status.slave_read_fallbacks, 12);
    g.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_slave_reads_take_only_records_far_behind_the_head() {
    const LAG: u64 = 64 << 10;
    let lag = LAG.to_string();
    let mut g = LocalGroup::start(
        3,
        ReplicationMode::Sync,
        Duration::from_secs(60),
        &["--slave-read", "auto", "--slave-read-lag-bytes", &lag],
    )
    .await;
    let m = g.master().expect("master");
    let mut client = g.client(m);
    let mut sent = Sent::new();
    send(&mut client, 200, 1024, 2, &mut sent).await;
    receive_all(&mut client, &sent, Duration::from_secs(60)).await;
    let (from_slaves, fallbacks, served) = counts(&g, m).await;
    // About 1.1 KiB per record: the last 64 KiB (some 55 records) are near
    // the head and read locally, the rest come from a slave.
    assert_eq!(fallbacks, 0);
    assert_eq!(served, from_slaves);
    assert!(
        (100..=170).contains(&from_slaves),
        "{from_slaves} of 200 records read from slaves with a {LAG}-byte threshold"
    );
    g.shutdown();
}
