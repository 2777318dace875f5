//! Replication and failover with three real `keelmq-broker` processes on
//! loopback and the supervisor `keelmq dev` runs: kill the master under
//! load (SYNC and ASYNC), bring the old master back, restart a master with
//! an empty data directory, cut the master off from its slaves, hand the
//! master role over under load, and count the redeliveries a failover causes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keelmq_broker::supervisor::Supervisor;
use keelmq_failover::ReplicationMode;
use keelmq_proto::rocketmq::v2::Code;
use keelmq_tests::group::{LocalGroup, commit_log_bytes};
use keelmq_tests::rmq::{RawClient, Received};

const TOPIC: &str = "orders";
const PRODUCERS: u32 = 4;

/// The body producer `p` sends as its message number `seq`.
fn body(p: u32, seq: u64) -> Vec<u8> {
    let mut b = format!("producer {p} message {seq} ").into_bytes();
    b.resize(300, b'a' + (seq % 26) as u8);
    b
}

fn props(p: u32, seq: u64) -> HashMap<String, String> {
    HashMap::from([
        ("producer".to_owned(), p.to_string()),
        ("seq".to_owned(), seq.to_string()),
    ])
}

/// What one producer got acknowledged: (seq, queue offset), and the codes
/// of the sends that failed.
#[derive(Default)]
struct Produced {
    acked: Vec<(u64, u64)>,
    failures: Vec<i32>,
}

/// Producer `p` sends to queue `p` of whichever broker the supervisor
/// records as master, one message at a time, retrying a failed number
/// until it is acknowledged, until `stop` is set.
fn spawn_producer(
    p: u32,
    sup: Arc<Supervisor>,
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Produced> {
    tokio::spawn(async move {
        let clients: Vec<RawClient> = endpoints.iter().map(|e| RawClient::new(e)).collect();
        let mut out = Produced::default();
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            let Some(m) = sup
                .record()
                .master
                .and_then(|n| sup.members().iter().position(|x| x.name == n))
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let mut c = clients[m].clone();
            match c.send(TOPIC, p, body(p, seq), props(p, seq)).await {
                Ok(offset) => {
                    out.acked.push((seq, offset));
                    seq += 1;
                }
                Err(f) => {
                    out.failures.push(f.code);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        out
    })
}

fn endpoints(g: &LocalGroup) -> Vec<String> {
    g.members.iter().map(|m| m.client_endpoint()).collect()
}

/// Receives and acks everything `group` can get from member `m`, until two
/// polls in a row come back empty.
async fn drain(g: &LocalGroup, m: usize, group: &str) -> Vec<Received> {
    let mut c = g.client(m);
    let mut all = Vec::new();
    let mut empty = 0;
    while empty < 2 {
        let got = c
            .receive(
                group,
                TOPIC,
                64,
                Duration::from_secs(60),
                Duration::from_millis(500),
            )
            .await
            .expect("receive from the master");
        if got.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        let failed = c.ack(group, TOPIC, &got).await.expect("ack");
        assert!(failed.is_empty(), "acks failed: {failed:?}");
        all.extend(got);
        assert!(all.len() < 1_000_000, "runaway drain");
    }
    all
}

/// The (producer, seq) a received message carries.
fn id_of(r: &Received) -> (u32, u64) {
    (
        r.properties["producer"].parse().expect("producer"),
        r.properties["seq"].parse().expect("seq"),
    )
}

/// Acknowledged messages missing from `received`. Every received copy must
/// carry its producer's body and properties on its producer's queue; with
/// `exact_offsets` (SYNC: nothing acknowledged may move) the queue offset a
/// send was acknowledged with must hold that very message. Each queue must
/// hold its producer's numbers in order (retries of failed sends may repeat
/// a number, never go back).
fn missing(
    produced: &BTreeMap<u32, Produced>,
    received: &[Received],
    exact_offsets: bool,
) -> Vec<(u32, u64)> {
    let mut ids = std::collections::HashSet::new();
    let mut at = HashMap::new();
    for r in received {
        let (p, seq) = id_of(r);
        assert_eq!(r.body, body(p, seq), "body of {p}/{seq}");
        assert_eq!(r.properties, props(p, seq), "properties of {p}/{seq}");
        assert_eq!(r.queue_id, p, "queue of {p}/{seq}");
        ids.insert((p, seq));
        at.insert((r.queue_id, r.queue_offset), (p, seq));
    }
    let mut lost = Vec::new();
    for (p, out) in produced {
        for &(seq, offset) in &out.acked {
            if !ids.contains(&(*p, seq)) {
                lost.push((*p, seq));
            } else if exact_offsets {
                assert_eq!(
                    at.get(&(*p, offset)),
                    Some(&(*p, seq)),
                    "queue {p} offset {offset} must hold acknowledged message {seq}"
                );
            }
        }
    }
    // Per-queue order: first appearances of each number increase.
    for p in produced.keys() {
        let mut queue: Vec<&Received> = received.iter().filter(|r| r.queue_id == *p).collect();
        queue.sort_by_key(|r| r.queue_offset);
        let mut last = None;
        let mut seen = std::collections::HashSet::new();
        for r in queue {
            let s: u64 = r.properties["seq"].parse().expect("seq");
            if seen.insert(s) {
                assert!(
                    last.is_none_or(|l| s > l),
                    "queue {p}: message {s} stored after {last:?}"
                );
                last = Some(s);
            }
        }
    }
    lost
}

async fn create_topic(g: &LocalGroup, queues: u32) {
    let m = g.master().expect("master");
    let b = g.members[m].process.as_ref().expect("running");
    b.cli_ok(&["topic", "create", TOPIC, "--queues", &queues.to_string()]);
    // Topics reach the slaves with the metadata stream.
    for (i, mem) in g.members.iter().enumerate() {
        if i == m {
            continue;
        }
        let p = mem.process.as_ref().expect("running");
        let start = std::time::Instant::now();
        while !p.cli(&["topic", "describe", TOPIC]).status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "topic did not reach {}",
                mem.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn produce_for(
    g: &LocalGroup,
    before: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Produced>> {
    let handles = (0..PRODUCERS)
        .map(|p| spawn_producer(p, g.supervisor.clone(), endpoints(g), stop.clone()))
        .collect();
    tokio::time::sleep(before).await;
    handles
}

async fn finish(
    handles: Vec<tokio::task::JoinHandle<Produced>>,
    stop: &AtomicBool,
) -> BTreeMap<u32, Produced> {
    stop.store(true, Ordering::Relaxed);
    let mut out = BTreeMap::new();
    for (p, h) in handles.into_iter().enumerate() {
        out.insert(p as u32, h.await.expect("producer"));
    }
    out
}

fn total_acked(produced: &BTreeMap<u32, Produced>) -> usize {
    produced.values().map(|p| p.acked.len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_master_killed_under_load_loses_no_acknowledged_message() {
    let mut g = LocalGroup::start(3, ReplicationMode::Sync, Duration::from_secs(1), &[]).await;
    create_topic(&g, PRODUCERS).await;
    let old = g.master().expect("master");
    let stop = Arc::new(AtomicBool::new(false));
    let handles = produce_for(&g, Duration::from_millis(1500), stop.clone()).await;
    let before_kill = g.status(old).await.expect("status").max_offset;
    g.kill(old);
    let new = g.wait_new_master(old, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let produced = finish(handles, &stop).await;
    for (p, out) in &produced {
        assert!(
            out.acked.len() > 10,
            "producer {p} made little progress: {} acked",
            out.acked.len()
        );
    }
    let received = drain(&g, new, "verify").await;
    let lost = missing(&produced, &received, true);
    let failures: usize = produced.values().map(|p| p.failures.len()).sum();
    println!(
        "SYNC failover b{old} -> b{new}: {} acknowledged, {} sends failed during the failover, \
         old master held {before_kill} bytes when killed, {} received, lost {}",
        total_acked(&produced),
        failures,
        received.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged messages lost: {lost:?}");
    let record = g.supervisor.record();
    let f = record.last_failover.expect("failover recorded");
    assert_eq!(
        f.possible_loss,
        keelmq_failover::PossibleLoss::Nothing.to_string()
    );
    assert_eq!(f.to, format!("b{new}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_failover_reports_loss_and_old_master_rejoins_byte_identical() {
    let mut g = LocalGroup::start(3, ReplicationMode::Async, Duration::from_secs(1), &[]).await;
    create_topic(&g, PRODUCERS).await;
    let old = g.master().expect("master");
    let stop = Arc::new(AtomicBool::new(false));
    let handles = produce_for(&g, Duration::from_millis(1500), stop.clone()).await;
    // The supervisor is not told: it must notice the master is unreachable.
    g.kill_silently(old);
    let new = g.wait_new_master(old, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let produced = finish(handles, &stop).await;
    let received = drain(&g, new, "verify").await;
    let lost = missing(&produced, &received, false);
    let record = g.supervisor.record();
    let f = record.last_failover.clone().expect("failover recorded");
    println!(
        "ASYNC failover b{old} -> b{new}: {} acknowledged, {} lost (possible loss reported: {})",
        total_acked(&produced),
        lost.len(),
        f.possible_loss
    );
    assert_ne!(
        f.possible_loss,
        keelmq_failover::PossibleLoss::Nothing.to_string(),
        "ASYNC promotion must not claim safety"
    );

    // The old master comes back, follows, truncates what diverged, catches up.
    g.restart(old).await;
    let m = g.wait_healthy(Duration::from_secs(30)).await;
    assert_eq!(m, new, "the old master must follow, not take over");
    let head = g.status(new).await.expect("status").max_offset;
    let start = std::time::Instant::now();
    loop {
        let ends: Vec<u64> = {
            let mut v = Vec::new();
            for i in 0..3 {
                v.push(g.status(i).await.expect("status").max_offset);
            }
            v
        };
        if ends.iter().all(|e| *e == head) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "members did not converge on {head}: {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_status = g.status(old).await.expect("status");
    assert_eq!(
        old_status.role,
        keelmq_proto::admin::Role::Slave as i32,
        "old master is a slave now"
    );
    let dirs: Vec<_> = g.members.iter().map(|m| m.data_dir.clone()).collect();
    g.shutdown();
    let reference = commit_log_bytes(&dirs[new], head);
    assert_eq!(reference.len() as u64, head);
    for (i, d) in dirs.iter().enumerate() {
        assert!(
            commit_log_bytes(d, head) == reference,
            "b{i}'s commit log differs from the new master's"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_restarted_with_an_empty_data_directory_becomes_a_slave() {
    // A long detection delay: the master is back before anyone reacts.
    let mut g = LocalGroup::start(3, ReplicationMode::Sync, Duration::from_secs(60), &[]).await;
    create_topic(&g, 1).await;
    let old = g.master().expect("master");
    let mut c = g.client(old);
    let mut acked = BTreeMap::new();
    let mut out = Produced::default();
    for seq in 0..50 {
        let off = c
            .send(TOPIC, 0, body(0, seq), props(0, seq))
            .await
            .expect("send");
        out.acked.push((seq, off));
    }
    acked.insert(0, out);
    g.kill_silently(old);
    g.wipe(old);
    g.restart(old).await;
    let new = g.wait_new_master(old, Duration::from_secs(20)).await;
    let m = g.wait_healthy(Duration::from_secs(30)).await;
    assert_eq!(m, new);
    let st = g.status(old).await.expect("status");
    assert_eq!(st.role, keelmq_proto::admin::Role::Slave as i32);
    let received = drain(&g, new, "verify").await;
    assert!(missing(&acked, &received, true).is_empty());
    // The emptied broker copies the log back from the new master.
    let head = g.status(new).await.expect("status").max_offset;
    let start = std::time::Instant::now();
    while g.status(old).await.expect("status").max_offset < head {
        assert!(start.elapsed() < Duration::from_secs(20), "no catch-up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn master_cut_off_from_its_slaves_refuses_sends_and_loses_nothing() {
    let g = LocalGroup::start(
        3,
        ReplicationMode::Sync,
        Duration::from_secs(5),
        &["--replication-timeout-ms", "1000"],
    )
    .await;
    create_topic(&g, 1).await;
    let m = g.master().expect("master");
    let mut c = g.client(m);
    let mut out = Produced::default();
    let mut seq = 0;
    for _ in 0..20 {
        out.acked.push((
            seq,
            c.send(TOPIC, 0, body(0, seq), props(0, seq))
                .await
                .expect("send"),
        ));
        seq += 1;
    }
    // SIGSTOP both slaves: the master can no longer get a confirmation.
    for i in (0..3).filter(|i| *i != m) {
        g.signal(i, libc::SIGSTOP);
    }
    let err = c
        .send(TOPIC, 0, body(0, seq), props(0, seq))
        .await
        .expect_err("a SYNC send without slaves must fail");
    assert_eq!(
        err.code,
        Code::SlavePersistenceTimeout as i32,
        "clear status: {}",
        err.message
    );
    assert!(err.message.contains("slave"), "{}", err.message);
    // Heal; sends are acknowledged again.
    for i in (0..3).filter(|i| *i != m) {
        g.signal(i, libc::SIGCONT);
    }
    let start = std::time::Instant::now();
    loop {
        match c.send(TOPIC, 0, body(0, seq), props(0, seq)).await {
            Ok(off) => {
                out.acked.push((seq, off));
                break;
            }
            Err(_) => {
                assert!(start.elapsed() < Duration::from_secs(20), "never healed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(g.master(), Some(m), "a healthy master is not replaced");
    let received = drain(&g, m, "verify").await;
    let acked = BTreeMap::from([(0, out)]);
    assert!(missing(&acked, &received, true).is_empty());
    // The refused message may be stored (at least once), never lost or reordered.
    drop(g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchover_under_load_loses_nothing() {
    let g = LocalGroup::start(3, ReplicationMode::Sync, Duration::from_secs(2), &[]).await;
    create_topic(&g, PRODUCERS).await;
    let old = g.master().expect("master");
    let target = (old + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let handles = produce_for(&g, Duration::from_millis(1000), stop.clone()).await;
    let pause = g
        .supervisor
        .switchover(&g.members[target].name, Duration::from_secs(10))
        .await
        .expect("switchover");
    let m = g.wait_healthy(Duration::from_secs(20)).await;
    assert_eq!(m, target);
    // Routes and assignments served by any member send clients to the new
    // master (assignments on a slave used to name the slave).
    for i in 0..3 {
        let route = g.client(i).route(TOPIC).await.expect("route");
        let assigned = g
            .client(i)
            .assignment(TOPIC, "verify")
            .await
            .expect("assignment");
        for (what, endpoints) in [("routes", &route), ("assigns", &assigned)] {
            assert!(
                !endpoints.is_empty()
                    && endpoints
                        .iter()
                        .all(|e| *e == g.members[target].client_endpoint()),
                "b{i} {what} to {endpoints:?}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let produced = finish(handles, &stop).await;
    let received = drain(&g, target, "verify").await;
    let lost = missing(&produced, &received, true);
    println!(
        "switchover b{old} -> b{target}: writes paused {pause:?}; {} acknowledged, lost {}",
        total_acked(&produced),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}");
    assert!(produced.values().all(|p| p.acked.len() > 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_keep_their_in_flight_messages_and_handles_across_a_failover() {
    let mut g = LocalGroup::start(3, ReplicationMode::Sync, Duration::from_secs(1), &[]).await;
    create_topic(&g, 1).await;
    let old = g.master().expect("master");
    let mut c = g.client(old);
    for seq in 0..30 {
        c.send(TOPIC, 0, body(0, seq), props(0, seq))
            .await
            .expect("send");
    }
    // Ten consumed and acked, ten received and still being processed.
    let first = c
        .receive(
            "g",
            TOPIC,
            10,
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await
        .expect("receive");
    assert_eq!(first.len(), 10);
    assert!(c.ack("g", TOPIC, &first).await.expect("ack").is_empty());
    let second = c
        .receive(
            "g",
            TOPIC,
            10,
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await
        .expect("receive");
    assert_eq!(second.len(), 10);
    // No waiting for the slaves: under SYNC replication a receive or an ack
    // is answered only once its delivery record is on a slave.
    g.kill(old);
    let new = g.wait_new_master(old, Duration::from_secs(20)).await;
    let after = drain(&g, new, "g").await;
    let seqs: Vec<u64> = after
        .iter()
        .map(|r| r.properties["seq"].parse().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (20..30).collect::<Vec<_>>(),
        "acked messages are not redelivered, in-flight ones stay invisible"
    );
    // The consumer finishes the ten it was processing with the handles the
    // old master gave it.
    let mut c = g.client(new);
    let failed = c.ack("g", TOPIC, &second).await.expect("ack");
    assert!(failed.is_empty(), "old handles refused: {failed:?}");
    let st = g.status(new).await.expect("status");
    assert_eq!(
        st.failover_redeliveries, 0,
        "nothing was handed out twice because of the failover"
    );
    let rest = c
        .receive(
            "g",
            TOPIC,
            10,
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await
        .expect("receive");
    assert!(rest.is_empty(), "everything was acked: {rest:?}");
}
