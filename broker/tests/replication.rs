//! Master/slave replication in one process over loopback TCP: SYNC
//! acknowledgement, catching up, promotion with a new epoch, a fenced old
//! master whose writes can no longer be acknowledged, and that old master
//! cutting its divergent tail at the fork point and converging.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_broker::replication::{
    ReplicationConfig, ReplicationError, ReplicationManager, ReplicationMode, Role, StartRole,
};
use keelmq_broker::store::{FlushMode, MessageStore, NewRecord, StoreConfig};
use keelmq_broker::testing::{replication_config, serve_replication};

struct Broker {
    store: MessageStore,
    repl: Arc<ReplicationManager>,
    addr: String,
    /// Closes the replication listener.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start(dir: &Path, id: &str, role: StartRole) -> Broker {
    start_with(dir, id, role, Duration::from_secs(2)).await
}

async fn start_with(dir: &Path, id: &str, role: StartRole, sync_timeout: Duration) -> Broker {
    let mut sc = StoreConfig::new(dir);
    sc.segment_size = 256 * 1024;
    sc.cq_entries_per_file = 1000;
    sc.flush_mode = FlushMode::SyncFlush;
    let store = MessageStore::open(sc).expect("store");
    let cfg = ReplicationConfig {
        broker_id: id.into(),
        slave_flush_before_ack: true,
        ..replication_config(dir, ReplicationMode::Sync, sync_timeout, role)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (repl, addr) = serve_replication(&store, cfg, async move {
        let _ = stopped.await;
    })
    .await;
    Broker {
        store,
        repl,
        addr,
        stop: Some(stop),
    }
}

/// Three brokers in `dirs`, the first master of epoch 1, the others its
/// slaves.
async fn group_of_three(
    dirs: &[tempfile::TempDir],
    ids: &[&str],
    timeout: Duration,
) -> Vec<Broker> {
    let mut brokers = Vec::new();
    brokers.push(start_with(dirs[0].path(), ids[0], StartRole::Master, timeout).await);
    for i in 1..3 {
        let b = start_with(dirs[i].path(), ids[i], StartRole::Standby, timeout).await;
        b.repl.follow(brokers[0].addr.clone(), 1).expect("follow");
        brokers.push(b);
    }
    brokers
}

/// Four producers sending numbered records to `master` until `stop`; the
/// numbers acknowledged go to `acked`.
fn spawn_producers(
    master: &Broker,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    acked: &Arc<parking_lot::Mutex<Vec<u64>>>,
    next: &Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    (0..4)
        .map(|_| {
            let (store, repl) = (master.store.clone(), master.repl.clone());
            let (stop, acked, next) = (stop.clone(), acked.clone(), next.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if send_to(&store, &repl, seq).await.is_ok() {
                        acked.lock().push(seq);
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect()
}

fn body(seq: u64) -> Vec<u8> {
    (0..(100 + seq % 700)).map(|i| (seq + i) as u8).collect()
}

/// What a send does on the master: append (the store wakes the streams
/// when the record is readable), wait for the flush and for the slaves as
/// the mode requires.
async fn send(b: &Broker, seq: u64) -> Result<u64, ReplicationError> {
    send_to(&b.store, &b.repl, seq).await
}

async fn send_to(
    store: &MessageStore,
    repl: &ReplicationManager,
    seq: u64,
) -> Result<u64, ReplicationError> {
    let gate = repl.admit()?;
    let a = store.append(
        NewRecord::new("orders", (seq % 4) as u32, body(seq)).with_property("seq", seq.to_string()),
    )?;
    drop(gate);
    store.wait_flushed(a.end_offset).await?;
    repl.wait_replicated(a.end_offset).await?;
    Ok(a.end_offset)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The store's log, with the marks each store sets by its own flushes
/// cleared (see `record::without_flush_marks`): the bytes a slave must hold
/// exactly as its master does.
fn log_bytes(s: &MessageStore) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = s.min_offset();
    while pos < s.max_offset() {
        let chunk = s.read_raw(pos, 1 << 20).expect("read raw");
        pos += chunk.len() as u64;
        out.extend_from_slice(&chunk);
    }
    keelmq_broker::store::record::without_flush_marks(&out)
}

/// Waits until every broker's log ends where the master's does, and checks
/// that each is a byte copy of it.
async fn assert_converged(brokers: &[Broker], master: usize) {
    wait_for("every broker to converge", || {
        let end = brokers[master].store.max_offset();
        brokers.iter().all(|b| b.store.max_offset() == end)
    })
    .await;
    let log = log_bytes(&brokers[master].store);
    for (i, b) in brokers.iter().enumerate() {
        assert_eq!(
            log_bytes(&b.store),
            log,
            "b{i} is a byte copy of the master"
        );
    }
}

/// The sequence numbers of `acked` that `have` (sorted) lacks.
fn missing(acked: &[u64], have: &[u64]) -> Vec<u64> {
    acked
        .iter()
        .filter(|s| have.binary_search(s).is_err())
        .copied()
        .collect()
}

fn seqs(s: &MessageStore) -> Vec<u64> {
    let mut out = Vec::new();
    for q in 0..4 {
        for qo in s.queue_min_offset("orders", q)..s.queue_max_offset("orders", q) {
            let r = s.get("orders", q, qo).expect("read").expect("present");
            assert_eq!(
                &r.body[..],
                &body(r.properties["seq"].parse().expect("seq"))[..]
            );
            out.push(r.properties["seq"].parse().expect("seq"));
        }
    }
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replication_promotion_fencing_and_fork_truncation() {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let m = start(dirs[0].path(), "b0", StartRole::Master).await;
    let s1 = start(dirs[1].path(), "b1", StartRole::Standby).await;
    let s2 = start(dirs[2].path(), "b2", StartRole::Standby).await;
    assert!(matches!(
        s1.repl.check_writable(),
        Err(ReplicationError::NotMaster { .. })
    ));
    s1.repl.follow(m.addr.clone(), 1).expect("s1 follows");
    s2.repl.follow(m.addr.clone(), 1).expect("s2 follows");

    // SYNC: every acknowledged send is already on at least one slave.
    let mut acked = Vec::new();
    for seq in 0..300 {
        let end = send(&m, seq).await.expect("send acknowledged");
        let held = s1.store.max_offset().max(s2.store.max_offset());
        assert!(
            held >= end,
            "acknowledged before any slave held it ({held} < {end})"
        );
        acked.push(seq);
    }
    wait_for("slaves to catch up", || {
        s1.store.max_offset() == m.store.max_offset()
            && s2.store.max_offset() == m.store.max_offset()
    })
    .await;
    assert_eq!(
        log_bytes(&s1.store),
        log_bytes(&m.store),
        "slave 1 is a byte copy"
    );
    assert_eq!(
        log_bytes(&s2.store),
        log_bytes(&m.store),
        "slave 2 is a byte copy"
    );
    let status = m.repl.status();
    assert_eq!(status.slaves.len(), 2);

    // Failover: s1 becomes master of epoch 2; s2 follows it.
    let fork = s1.store.max_offset();
    let entry = s1.repl.promote(2).expect("promote");
    assert_eq!(entry.start_offset, fork);
    assert!(matches!(
        s1.repl.promote(2),
        Err(ReplicationError::StaleEpoch { .. })
    ));
    s2.repl.follow(s1.addr.clone(), 2).expect("s2 follows s1");

    // The old master still believes it is master of epoch 1; nobody
    // confirms its writes, so they fail instead of being acknowledged.
    let failed = send(&m, 10_000).await;
    assert!(
        matches!(
            failed,
            Err(ReplicationError::SlaveTimeout { confirmed: 0, .. })
        ),
        "got {failed:?}"
    );
    let diverged_end = m.store.max_offset();
    assert!(diverged_end > fork);

    for seq in 300..400 {
        send(&s1, seq).await.expect("new master acknowledges");
        acked.push(seq);
    }

    // The old master returns as a slave: it cuts its tail at the fork
    // point and catches up.
    m.repl
        .follow(s1.addr.clone(), 2)
        .expect("old master follows");
    assert_eq!(m.repl.role(), Role::Slave);
    wait_for("old master to converge", || {
        m.store.max_offset() == s1.store.max_offset()
            && s2.store.max_offset() == s1.store.max_offset()
    })
    .await;
    assert_eq!(
        log_bytes(&m.store),
        log_bytes(&s1.store),
        "old master converged byte for byte"
    );
    assert_eq!(log_bytes(&s2.store), log_bytes(&s1.store));
    let got = seqs(&m.store);
    assert_eq!(
        got, acked,
        "exactly the acknowledged records; the fenced write is gone"
    );
    assert_eq!(m.repl.epoch(), 2);
    // A broker never accepts an older epoch once it knows a newer one.
    assert!(matches!(
        m.repl.follow(s2.addr.clone(), 1),
        Err(ReplicationError::StaleEpoch { .. })
    ));
}

/// Crash failovers under load, over loopback: four producers send to the
/// master while, at a random moment, it dies (its listener closes and its
/// sessions end); the slave holding the most is promoted with the next
/// epoch, the other slave follows it, and the dead master comes back on its
/// data directory as a slave of the new one (cutting its divergent tail).
/// After every failover the new master holds every send acknowledged so
/// far; at the end the three logs are byte-identical and hold every
/// acknowledged send once, and nothing that was never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_failovers_under_load_keep_every_acknowledged_send() {
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut rng = keelmq_broker::testing::seeded_rng();
    let timeout = Duration::from_millis(500);
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let ids = ["b0", "b1", "b2"];
    let mut brokers = group_of_three(&dirs, &ids, timeout).await;
    let (mut master, mut epoch) = (0usize, 1u64);
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));
    for round in 0..4 {
        let stop = Arc::new(AtomicBool::new(false));
        let producers = spawn_producers(&brokers[master], &stop, &acked, &next);
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        // The master dies: no more connections, no more acknowledgements.
        let old = &mut brokers[master];
        if let Some(stop) = old.stop.take() {
            let _ = stop.send(());
        }
        old.repl.shutdown();
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.await.expect("producer");
        }
        old.store.shutdown().expect("shutdown");
        // Promote the slave holding the most; the other follows it.
        let slaves: Vec<usize> = (0..3).filter(|&i| i != master).collect();
        let new = *slaves
            .iter()
            .max_by_key(|&&i| brokers[i].store.max_offset())
            .expect("a slave");
        let other = *slaves.iter().find(|&&i| i != new).expect("another slave");
        epoch += 1;
        brokers[new].repl.promote(epoch).expect("promote");
        let addr = brokers[new].addr.clone();
        brokers[other]
            .repl
            .follow(addr.clone(), epoch)
            .expect("follow");
        // The old master returns on its data as a slave of the new one.
        let back = start_with(
            dirs[master].path(),
            ids[master],
            StartRole::Standby,
            timeout,
        )
        .await;
        back.repl.follow(addr, epoch).expect("old master follows");
        brokers[master] = back;
        master = new;
        let acked_now = acked.lock().clone();
        let lost = missing(&acked_now, &seqs(&brokers[master].store));
        assert!(
            lost.is_empty(),
            "round {round}: the new master b{master} lacks acknowledged sends {lost:?}"
        );
        println!(
            "round {round}: b{master} master of epoch {epoch}; {} acknowledged so far",
            acked_now.len()
        );
    }
    // One more acknowledged send once both slaves follow, then convergence.
    // A send that failed may still be stored: each try has its own number.
    let start = Instant::now();
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if send(&brokers[master], seq).await.is_ok() {
            acked.lock().push(seq);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the last master never confirmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_converged(&brokers, master).await;
    let have = seqs(&brokers[master].store);
    let acked = acked.lock().clone();
    let mut dedup = have.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), have.len(), "each send stored at most once");
    assert!(
        have.iter().all(|&s| s < next.load(Ordering::Relaxed)),
        "only what was sent"
    );
    let lost = missing(&acked, &have);
    assert!(lost.is_empty(), "lost acknowledged sends {lost:?}");
    println!(
        "{} sent, {} acknowledged, {} stored",
        next.load(Ordering::Relaxed),
        acked.len(),
        have.len()
    );
}

/// Planned switchovers while four producers send to the master (SYNC
/// replication, SYNC_FLUSH): each hands the role to a slave, the other slave
/// follows it, and the new master must hold every send acknowledged so far.
/// The master stops writes and waits until the target holds its end: that
/// end must include writes let in just before the stop and records still
/// staged for the flush, or the target is promoted without them and a send
/// the other slave confirmed is cut from every copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchovers_under_load_keep_every_acknowledged_send() {
    use rand::Rng;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut rng = keelmq_broker::testing::seeded_rng();
    let timeout = Duration::from_millis(500);
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let ids = ["b0", "b1", "b2"];
    let brokers = group_of_three(&dirs, &ids, timeout).await;
    let (mut master, mut epoch) = (0usize, 1u64);
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));
    for round in 0..6 {
        wait_for("both slaves to connect", || {
            brokers[master]
                .repl
                .status()
                .slaves
                .iter()
                .filter(|s| s.connected)
                .count()
                == 2
        })
        .await;
        let stop = Arc::new(AtomicBool::new(false));
        let producers = spawn_producers(&brokers[master], &stop, &acked, &next);
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..250))).await;
        let slaves: Vec<usize> = (0..3).filter(|&i| i != master).collect();
        let target = slaves[rng.random_range(0..2)];
        let other = *slaves
            .iter()
            .find(|&&i| i != target)
            .expect("another slave");
        epoch += 1;
        let target_repl = brokers[target].repl.clone();
        brokers[master]
            .repl
            .switchover(
                ids[target],
                epoch,
                Duration::from_secs(10),
                |e| async move {
                    target_repl
                        .promote(e)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                },
            )
            .await
            .expect("switchover");
        brokers[other]
            .repl
            .follow(brokers[target].addr.clone(), epoch)
            .expect("follow");
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.await.expect("producer");
        }
        master = target;
        let acked_now = acked.lock().clone();
        let lost = missing(&acked_now, &seqs(&brokers[master].store));
        assert!(
            lost.is_empty(),
            "round {round}: the new master b{master} lacks acknowledged sends {lost:?}"
        );
        println!(
            "round {round}: b{master} master of epoch {epoch}; {} acknowledged so far",
            acked_now.len()
        );
    }
    assert_converged(&brokers, master).await;
    let lost = missing(&acked.lock(), &seqs(&brokers[master].store));
    assert!(lost.is_empty(), "lost acknowledged sends {lost:?}");
}

/// A switchover whose caller gives up halfway (the admin call's deadline)
/// must not leave the master refusing writes with nobody else in charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_dropped_halfway_puts_writes_back_on() {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let master = start(dirs[0].path(), "b0", StartRole::Master).await;
    let slave = start(dirs[1].path(), "b1", StartRole::Standby).await;
    slave.repl.follow(master.addr.clone(), 1).expect("follow");
    send(&master, 0).await.expect("a send");
    // A promotion that never answers; the caller gives up after 100 ms.
    let given_up = tokio::time::timeout(
        Duration::from_millis(100),
        master
            .repl
            .switchover("b1", 2, Duration::from_secs(10), |_| std::future::pending()),
    )
    .await;
    assert!(given_up.is_err(), "the switchover was still waiting");
    master.repl.check_writable().expect("writes are back on");
    send(&master, 1).await.expect("a send after it");
}

/// A slave whose log ends before the master's oldest segment (a new or
/// replaced slave, or one that was away longer than the master's retention)
/// cannot be streamed what it needs next: it starts its log again where the
/// master's starts, copies the rest, and serves the same messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_behind_the_masters_retention_starts_again_at_the_masters_oldest_segment() {
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let m = start(dirs[0].path(), "b0", StartRole::Master).await;
    let s1 = start(dirs[1].path(), "b1", StartRole::Standby).await;
    let mut away = start(dirs[2].path(), "b2", StartRole::Standby).await;
    s1.repl.follow(m.addr.clone(), 1).expect("s1 follows");
    away.repl.follow(m.addr.clone(), 1).expect("b2 follows");
    for seq in 0..200 {
        send(&m, seq).await.expect("send acknowledged");
    }
    wait_for("b2 to catch up", || {
        away.store.max_offset() == m.store.max_offset()
    })
    .await;
    // b2 goes away with what it has.
    if let Some(stop) = away.stop.take() {
        let _ = stop.send(());
    }
    away.repl.shutdown();
    away.store.shutdown().expect("shutdown b2");
    let away_end = away.store.max_offset();
    drop(away);
    // The master writes several segments more, and retention deletes all
    // but its newest.
    for seq in 200..4000 {
        send(&m, seq).await.expect("send acknowledged");
    }
    let far_future = keelmq_broker::store::now_ms() + 10 * 365 * 24 * 3600 * 1000;
    let removed = m.store.enforce_retention(far_future).expect("retention");
    assert!(removed >= 3, "retention removed {removed} segments");
    let master_start = m.store.min_offset();
    assert!(
        master_start > away_end,
        "b2's end is no longer on the master"
    );

    // An empty slave and the slave that was away both catch up.
    let fresh = start(dirs[3].path(), "b3", StartRole::Standby).await;
    fresh.repl.follow(m.addr.clone(), 1).expect("b3 follows");
    let back = start(dirs[2].path(), "b2", StartRole::Standby).await;
    assert_eq!(back.store.max_offset(), away_end);
    back.repl
        .follow(m.addr.clone(), 1)
        .expect("b2 follows again");
    for seq in 4000..4100 {
        send(&m, seq).await.expect("send acknowledged");
    }
    wait_for("the restarted slaves to catch up", || {
        let end = m.store.max_offset();
        fresh.store.max_offset() == end && back.store.max_offset() == end
    })
    .await;
    let log = log_bytes(&m.store);
    for (name, b) in [("b2", &back), ("b3", &fresh)] {
        assert_eq!(
            b.store.min_offset(),
            master_start,
            "{name} starts where the master does"
        );
        assert_eq!(
            log_bytes(&b.store),
            log,
            "{name} is a byte copy of the master"
        );
        assert_eq!(
            seqs(&b.store),
            seqs(&m.store),
            "{name} serves the same messages"
        );
        for q in 0..4 {
            assert_eq!(
                b.store.queue_min_offset("orders", q),
                m.store.queue_min_offset("orders", q),
                "{name}: first message of queue {q}"
            );
        }
    }
    // The restarted log, its queues (which start past their first entries)
    // and its epochs survive a restart of the slave.
    let b3_dir = dirs[3].path().to_owned();
    let mut fresh = fresh;
    if let Some(stop) = fresh.stop.take() {
        let _ = stop.send(());
    }
    fresh.repl.shutdown();
    fresh.store.shutdown().expect("shutdown b3");
    drop(fresh);
    let fresh = start(&b3_dir, "b3", StartRole::Standby).await;
    assert_eq!(seqs(&fresh.store), seqs(&m.store), "b3 after a restart");
    fresh
        .repl
        .follow(m.addr.clone(), 1)
        .expect("b3 follows again");
    for seq in 4100..4200 {
        send(&m, seq).await.expect("send acknowledged");
    }
    wait_for("b3 to follow on", || {
        fresh.store.max_offset() == m.store.max_offset()
    })
    .await;
    assert_eq!(log_bytes(&fresh.store), log_bytes(&m.store));
    assert_eq!(fresh.repl.history(), m.repl.history());
}
