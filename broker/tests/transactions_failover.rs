//! Transactions across a failover, in one process over loopback TCP: half
//! messages and decisions written on the master reach the slave with the
//! commit log; once promoted, the slave knows which transactions are still
//! open, ends them, answers repeats of decisions the old master applied,
//! and checks back only what is still open.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_broker::messaging::transaction::{
    Decision, TransactionConfig, Transactions, transaction_id,
};
use keelmq_broker::replication::{
    ReplicationConfig, ReplicationManager, ReplicationMode, StartRole,
};
use keelmq_broker::store::{MessageStore, NewRecord, StoreConfig, keys, now_ms};
use keelmq_broker::write_path::WritePath;

struct Broker {
    store: MessageStore,
    repl: Arc<ReplicationManager>,
    write: WritePath,
    addr: String,
}

async fn start(dir: &Path, id: &str, role: StartRole) -> Broker {
    let mut sc = StoreConfig::new(dir);
    sc.segment_size = 256 * 1024;
    let store = MessageStore::open(sc).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cfg = ReplicationConfig {
        broker_id: id.into(),
        mode: ReplicationMode::Async,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_slave_carries_on_with_open_transactions() {
    let dirs: Vec<_> = (0..2)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let m = start(dirs[0].path(), "b0", StartRole::Master).await;
    let s = start(dirs[1].path(), "b1", StartRole::Standby).await;
    s.repl.follow(m.addr.clone(), 1).expect("follow");

    let on_master = Transactions::new(m.store.clone(), config());
    let appended = m
        .write
        .write(vec![half("A"), half("B"), half("C")])
        .await
        .expect("halves");
    let ids: Vec<String> = ["A", "B", "C"]
        .iter()
        .zip(&appended)
        .map(|(id, a)| transaction_id(a.queue_offset, id))
        .collect();
    on_master
        .end(&m.write, &ids[0], "A", "orders", Decision::Commit)
        .await
        .expect("commit on the master");

    // The slave follows along from the replicated log.
    let on_slave = Transactions::new(s.store.clone(), config());
    let start = Instant::now();
    while s.store.indexed_offset() < m.store.max_offset() {
        assert!(start.elapsed() < Duration::from_secs(20), "slave caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
