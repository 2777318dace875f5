//! Transactions (and delayed messages) across a failover, in one process
//! over loopback TCP: half messages and decisions written on the master
//! reach the slave with the commit log; once promoted, the slave knows
//! which transactions are still open, ends them, answers repeats of
//! decisions the old master applied, and checks back only what is still
//! open. An old master that wrote on after the failover, then follows the
//! new master (its log cut at the fork point, or discarded when it ends
//! before the new master's oldest segment), rebuilds both when it is
//! master again. A slave whose stored transaction progress (metadata,
//! replicated apart from the log) counts decisions its log never got still
//! checks those transactions back once promoted (and delivers the delayed
//! messages whose deliveries its stored timer progress counts); and under SYNC
//! replication a repeated decision answers as its one write is confirmed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_broker::messaging::timer::Timer;
use keelmq_broker::messaging::transaction::{
    Decision, EndError, TransactionConfig, Transactions, transaction_id,
};
use keelmq_broker::replication::{
    ReplicationConfig, ReplicationManager, ReplicationMode, StartRole,
};
use keelmq_broker::store::{MessageStore, NewRecord, StoreConfig, keys, now_ms};
use keelmq_broker::write_path::{WriteError, WritePath};

struct Broker {
    store: MessageStore,
    repl: Arc<ReplicationManager>,
    write: WritePath,
    addr: String,
}

async fn start(dir: &Path, id: &str, role: StartRole) -> Broker {
    start_with(dir, id, role, ReplicationMode::Async).await
}

async fn start_with(dir: &Path, id: &str, role: StartRole, mode: ReplicationMode) -> Broker {
    let mut sc = StoreConfig::new(dir);
    sc.segment_size = 256 * 1024;
    let store = MessageStore::open(sc).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cfg = ReplicationConfig {
        broker_id: id.into(),
        mode,
        min_in_sync_replicas: 1,
        sync_timeout: Duration::from_secs(2),
        in_sync_max_lag_bytes: 1 << 20,
        listen: listener.local_addr().expect("addr"),
        advertised_replication: addr.clone(),
        advertised_admin: String::new(),
        advertised_client: String::new(),
        data_dir: dir.to_owned(),
        start_role: role,
        slave_flush_before_ack: false,
    };
    let repl = ReplicationManager::open(cfg, store.clone()).expect("replication");
    let r = repl.clone();
    tokio::spawn(async move { r.serve_listener(listener, std::future::pending()).await });
    let write = WritePath::new(store.clone(), repl.clone());
    Broker {
        store,
        repl,
        write,
        addr,
    }
}

fn config() -> TransactionConfig {
    TransactionConfig {
        first_check: Duration::ZERO,
        check_interval: Duration::from_secs(30),
        max_checks: 15,
    }
}

fn half(id: &str) -> NewRecord {
    Transactions::hold(
        NewRecord::new("orders", 0, id.as_bytes().to_vec()).with_property(keys::MESSAGE_ID, id),
        None,
    )
}

/// A master and a slave following it, and their directories.
async fn master_and_slave() -> (Vec<tempfile::TempDir>, Broker, Broker) {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let m = start(dirs[0].path(), "b0", StartRole::Master).await;
    let s = start(dirs[1].path(), "b1", StartRole::Standby).await;
    s.repl.follow(m.addr.clone(), 1).expect("follow");
    (dirs, m, s)
}

/// Waits (at most 20 s) until slave `s` has indexed master `m`'s whole log.
async fn caught_up(s: &Broker, m: &Broker) {
    wait_for("s to catch up", || {
        s.store.indexed_offset() >= m.store.max_offset()
    })
    .await;
}

/// Stops the log stream to slave `s`: it follows an address nothing
/// listens on (its metadata can still be given to it by hand).
fn stop_log_stream(s: &Broker) {
    let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = gone.local_addr().expect("addr").to_string();
    drop(gone);
    s.repl.follow(nowhere, 1).expect("follow nothing");
}

/// Writes a half message per id on `m`, in one append; their transaction ids.
async fn halves(m: &Broker, ids: &[&str]) -> Vec<String> {
    let appended = m
        .write
        .write(ids.iter().map(|id| half(id)).collect())
        .await
        .expect("halves");
    ids.iter()
        .zip(&appended)
        .map(|(id, a)| transaction_id(a.queue_offset, id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_slave_carries_on_with_open_transactions() {
    let (_dirs, m, s) = master_and_slave().await;

    let on_master = Transactions::new(m.store.clone(), config());
    let ids = halves(&m, &["A", "B", "C"]).await;
    on_master
        .end(&m.write, &ids[0], "A", "orders", Decision::Commit)
        .await
        .expect("commit on the master");

    // The slave follows along from the replicated log.
    let on_slave = Transactions::new(s.store.clone(), config());
    caught_up(&s, &m).await;
    on_slave.load();
    assert_eq!(on_slave.pending_count(), 2, "B and C are open");

    // Failover.
    s.repl.promote(2).expect("promote");
    on_slave
        .end(&s.write, &ids[0], "A", "orders", Decision::Commit)
        .await
        .expect("a repeat of the old master's decision is fine");
    on_slave
        .end(&s.write, &ids[1], "B", "orders", Decision::Commit)
        .await
        .expect("commit on the new master");
    let due = on_slave.due_checks(&s.write, now_ms() + 1000).await;
    let asked: Vec<&str> = due.iter().map(|d| d.tx_id.as_str()).collect();
    assert_eq!(asked, vec![ids[2].as_str()], "only C is checked back");
    assert_eq!(due[0].message.topic, "orders");

    let bodies: Vec<Vec<u8>> = (0..s.store.queue_max_offset("orders", 0))
        .map(|o| {
            s.store
                .get("orders", 0, o)
                .expect("read")
                .expect("present")
                .body
                .to_vec()
        })
        .collect();
    assert_eq!(bodies, vec![b"A".to_vec(), b"B".to_vec()]);
}

/// Waits (at most 20 s) until `done`.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message of topic `t` held until `due`.
fn held(id: &str, due: i64) -> NewRecord {
    Timer::hold(
        NewRecord::new("t", 0, id.as_bytes().to_vec()).with_property(keys::MESSAGE_ID, id),
        due,
    )
}

/// Message id to copies in queue 0 of `topic`.
fn copies(store: &MessageStore, topic: &str) -> HashMap<String, u32> {
    let mut seen = HashMap::new();
    for o in store.queue_min_offset(topic, 0)..store.queue_max_offset(topic, 0) {
        if let Some(r) = store.get(topic, 0, o).expect("read") {
            let id = r.properties.get(keys::MESSAGE_ID).expect("id").clone();
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    seen
}

/// Review s17 finding 3. Master m and slave s; s is promoted while m, cut
/// off, goes on as master: m writes half message A, checks back the open
/// X, and delivers delayed F; s writes half Y (at A's half offset),
/// commits X and delivers delayed H. Then m follows s, its log cut at the
/// fork point (`restart_log`: s's retention deleted everything m has, so m
/// discards its whole log and starts at s's oldest segment), and m is
/// promoted again. Its transactions and timer must be s's, not what it had
/// loaded from the part of its log that is gone.
async fn an_old_master_follows_the_new_one_then_takes_over(restart_log: bool) {
    let (_dirs, m, s) = master_and_slave().await;
    let on_master = Transactions::new(m.store.clone(), config());
    let m_timer = Timer::new(m.store.clone());
    let now = now_ms();

    // Before the failover: X open, L pending for an hour, D delivered.
    let x = m.write.write_one(half("X")).await.expect("half X");
    let tx_x = transaction_id(x.queue_offset, "X");
    m.write
        .write(vec![held("L", now + 3_600_000), held("D", now)])
        .await
        .expect("hold");
    assert_eq!(m_timer.deliver_due(&m.write, now + 1_000).await, Ok(1));
    caught_up(&s, &m).await;

    // The failover, m not told.
    s.repl.promote(2).expect("promote s");
    let on_slave = Transactions::new(s.store.clone(), config());
    let s_timer = Timer::new(s.store.clone());
    // m's divergent tail.
    let a = m.write.write_one(half("A")).await.expect("half A");
    let tx_a = transaction_id(a.queue_offset, "A");
    m.write.write(vec![held("F", now)]).await.expect("hold F");
    assert_eq!(
        on_master.due_checks(&m.write, now_ms() + 1_000).await.len(),
        2,
        "m checks back X and A"
    );
    assert_eq!(m_timer.deliver_due(&m.write, now + 1_000).await, Ok(1), "F");
    // s's history.
    on_slave
        .end(&s.write, &tx_x, "X", "orders", Decision::Commit)
        .await
        .expect("commit X on the new master");
    if restart_log {
        let filler = vec![0u8; 60_000];
        for _ in 0..30 {
            s.write
                .write(vec![NewRecord::new("filler", 0, filler.clone())])
                .await
                .expect("filler");
        }
        let far_future = now_ms() + 10 * 365 * 24 * 3600 * 1000;
        let removed = s.store.enforce_retention(far_future).expect("retention");
        assert!(removed >= 3, "retention removed {removed} segments");
        assert!(
            s.store.min_offset() > m.store.max_offset(),
            "nothing m holds is on s any more"
        );
    }
    let y = s.write.write_one(half("Y")).await.expect("half Y");
    assert_eq!(y.queue_offset, a.queue_offset, "Y is where m has A");
    let tx_y = transaction_id(y.queue_offset, "Y");
    s.write
        .write(vec![held("H", now), held("G", now + 5_000)])
        .await
        .expect("hold");
    assert_eq!(
        s_timer.deliver_due(&s.write, now + 1_000).await,
        Ok(1),
        "H only: D was delivered by the old master"
    );

    // m follows s and catches up, then takes over again.
    m.repl.follow(s.addr.clone(), 2).expect("m follows s");
    wait_for("m to converge with s", || {
        m.repl.history() == s.repl.history()
            && m.store.max_offset() == s.store.max_offset()
            && m.store.indexed_offset() == m.store.max_offset()
    })
    .await;
    on_master.load();
    m.repl.promote(3).expect("promote m");

    on_master
        .end(&m.write, &tx_y, "Y", "orders", Decision::Commit)
        .await
        .expect("Y is known to m");
    let repeat = on_master
        .end(&m.write, &tx_x, "X", "orders", Decision::Commit)
        .await;
    if restart_log {
        // X's half message and commit went with s's oldest segments.
        assert!(matches!(repeat, Err(EndError::Unknown(_))), "{repeat:?}");
    } else {
        repeat.expect("a repeat of s's commit of X");
    }
    let a_end = on_master
        .end(&m.write, &tx_a, "A", "orders", Decision::Commit)
        .await;
    assert!(
        matches!(a_end, Err(EndError::Unknown(_))),
        "A was cut: {a_end:?}"
    );
    let due = on_master.due_checks(&m.write, now_ms() + 60_000).await;
    assert!(due.is_empty(), "nothing left open: {due:?}");
    let orders = copies(&m.store, "orders");
    let expected: HashMap<String, u32> = if restart_log {
        [("Y".to_owned(), 1)].into()
    } else {
        [("X".to_owned(), 1), ("Y".to_owned(), 1)].into()
    };
    assert_eq!(orders, expected);

    assert_eq!(
        m_timer.deliver_due(&m.write, now + 10_000).await,
        Ok(1),
        "G, and nothing s or m delivered before"
    );
    let t = copies(&m.store, "t");
    let expected: HashMap<String, u32> = if restart_log {
        [("H".to_owned(), 1), ("G".to_owned(), 1)].into()
    } else {
        [
            ("D".to_owned(), 1),
            ("H".to_owned(), 1),
            ("G".to_owned(), 1),
        ]
        .into()
    };
    assert_eq!(t, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_master_cut_at_the_fork_rebuilds_its_transactions_and_timer() {
    an_old_master_follows_the_new_one_then_takes_over(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_master_that_discards_its_log_rebuilds_its_transactions_and_timer() {
    an_old_master_follows_the_new_one_then_takes_over(true).await;
}

/// Bodies of the messages in queue 0 of `orders`.
fn orders(store: &MessageStore) -> Vec<String> {
    store
        .get_range("orders", 0, 0, usize::MAX, usize::MAX)
        .expect("read")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

/// Metadata, the stored transaction progress with it, replicates apart
/// from the log: a slave may hold its master's progress marks, which count
/// decisions, without the log records of those decisions. Promoted, it
/// must check those transactions back (and apply the producers' answers),
/// not count them as resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_slave_checks_back_decisions_its_stored_progress_counts_but_its_log_lacks() {
    let (_dirs, m, s) = master_and_slave().await;
    let on_master = Transactions::new(m.store.clone(), config());
    let ids = halves(&m, &["A", "B"]).await;
    caught_up(&s, &m).await;

    // The log stream stops...
    stop_log_stream(&s);
    on_master
        .end(&m.write, &ids[0], "A", "orders", Decision::Commit)
        .await
        .expect("commit A");
    on_master
        .end(&m.write, &ids[1], "B", "orders", Decision::Rollback)
        .await
        .expect("roll back B");
    on_master.load();
    assert_eq!(on_master.pending_count(), 0);
    // ...while the master's metadata still reaches s.
    s.store
        .metadata()
        .apply_snapshot(m.store.metadata().snapshot())
        .expect("metadata");

    s.repl.promote(2).expect("promote");
    let on_slave = Transactions::new(s.store.clone(), config());
    let due = on_slave.due_checks(&s.write, now_ms() + 1_000).await;
    let asked: Vec<&str> = due.iter().map(|d| d.tx_id.as_str()).collect();
    assert_eq!(
        asked,
        [ids[0].as_str(), ids[1].as_str()],
        "both checked back"
    );
    on_slave
        .end(&s.write, &ids[0], "A", "orders", Decision::Commit)
        .await
        .expect("commit A on the new master");
    on_slave
        .end(&s.write, &ids[1], "B", "orders", Decision::Rollback)
        .await
        .expect("roll back B on the new master");
    assert_eq!(orders(&s.store), ["A"]);
    assert_eq!(on_slave.pending_count(), 0);
}

/// SYNC replication: a commit made while the slave is away is appended but
/// not confirmed, and the producer is told so. Its repeats never write it
/// again: they fail while no slave holds it, and answer OK once the slave
/// is back and has it. Either way the message is in the topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sync_replication_a_repeated_commit_is_answered_once_a_slave_holds_it() {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let m = start_with(
        dirs[0].path(),
        "b0",
        StartRole::Master,
        ReplicationMode::Sync,
    )
    .await;
    let on_master = Transactions::new(m.store.clone(), config());
    let a = m.store.append(half("A")).expect("half");
    let id = transaction_id(a.queue_offset, "A");
    for attempt in 0..2 {
        let got = on_master
            .end(&m.write, &id, "A", "orders", Decision::Commit)
            .await;
        assert!(
            matches!(got, Err(EndError::Write(WriteError::ReplicationTimeout(_)))),
            "attempt {attempt}: {got:?}"
        );
    }
    let s = start_with(
        dirs[1].path(),
        "b1",
        StartRole::Standby,
        ReplicationMode::Sync,
    )
    .await;
    s.repl.follow(m.addr.clone(), 1).expect("follow");
    // Each repeat waits up to the replication timeout (2 s) for the slave.
    let mut answered = None;
    for _ in 0..10 {
        match on_master
            .end(&m.write, &id, "A", "orders", Decision::Commit)
            .await
        {
            Ok(()) => {
                answered = Some(());
                break;
            }
            Err(EndError::Write(WriteError::ReplicationTimeout(_))) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(answered.is_some(), "confirmed once the slave holds it");
    assert_eq!(orders(&m.store), ["A"]);
    caught_up(&s, &m).await;
    assert_eq!(orders(&s.store), ["A"]);
}

/// The timer's stored progress replicates apart from the log too: a slave
/// may hold its master's marks, which count deliveries, without those
/// deliveries or their op records (here, the first ever made). Promoted,
/// it must deliver those messages, not count them as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_slave_delivers_delayed_messages_its_stored_progress_counts_but_its_log_lacks() {
    let (_dirs, m, s) = master_and_slave().await;
    let past = now_ms() - 1_000;
    m.write
        .write(vec![held("a", past), held("b", past)])
        .await
        .expect("hold");
    caught_up(&s, &m).await;
    stop_log_stream(&s);
    let m_timer = Timer::new(m.store.clone());
    assert_eq!(m_timer.deliver_due(&m.write, now_ms()).await, Ok(2));
    assert_eq!(copies(&m.store, "t").len(), 2);
    s.store
        .metadata()
        .apply_snapshot(m.store.metadata().snapshot())
        .expect("metadata");

    s.repl.promote(2).expect("promote");
    let s_timer = Timer::new(s.store.clone());
    assert_eq!(
        s_timer.deliver_due(&s.write, now_ms()).await,
        Ok(2),
        "delivered on the new master"
    );
    assert_eq!(s_timer.deliver_due(&s.write, now_ms()).await, Ok(0));
    let seen = copies(&s.store, "t");
    assert_eq!((seen.get("a"), seen.get("b")), (Some(&1), Some(&1)));
}
