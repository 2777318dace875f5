//! A broker's readiness (`/readyz`) and its preStop hook (`/prestop`), over
//! loopback HTTP against brokers in this process: a slave is ready only
//! while it follows its master and is in sync by the master's own lag
//! threshold, a master streaming a backlog keeps telling the slave where its
//! log ends, and a master being stopped waits in `/prestop` for its role to
//! be handed over.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use keelmq_broker::http::HttpState;
use keelmq_broker::replication::epoch::EpochEntry;
use keelmq_broker::replication::frame::{Frame, Hello, Welcome, read_frame, write_frame};
use keelmq_broker::replication::{
    ReplicationConfig, ReplicationManager, ReplicationMode, Role, StartRole,
};
use keelmq_broker::store::{MessageStore, NewRecord};
use keelmq_broker::testing::{async_store_config, replication_config, serve_replication};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

/// The in-sync lag of these brokers (64 MiB in a real broker).
const IN_SYNC_LAG: u64 = 1 << 20;

/// A broker of this process: store, replication (its listener serving) and
/// its HTTP port.
struct Broker {
    store: MessageStore,
    repl: Arc<ReplicationManager>,
    /// Replication address.
    addr: String,
    /// HTTP address.
    http: String,
    /// Stops the HTTP server, as the broker does on SIGTERM.
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    /// The HTTP server; ends once it has stopped.
    http_served: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(dir: &Path, id: &str, role: StartRole, prestop_wait: Duration) -> Broker {
    let store = MessageStore::open(async_store_config(dir, 4 << 20)).expect("store");
    let cfg = ReplicationConfig {
        broker_id: id.into(),
        in_sync_max_lag_bytes: IN_SYNC_LAG,
        ..replication_config(dir, ReplicationMode::Sync, Duration::from_secs(5), role)
    };
    let (repl, addr) = serve_replication(&store, cfg, std::future::pending()).await;
    let http_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind http");
    let http = http_l.local_addr().expect("addr").to_string();
    let state = HttpState {
        store: store.clone(),
        replication: repl.clone(),
        ready: Arc::new(AtomicBool::new(true)),
        groups: None,
        transactions: None,
        slave_reads: None,
        client: None,
        prestop_wait,
    };
    let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
    let http_served = tokio::spawn(keelmq_broker::http::serve(http_l, state, async move {
        let _ = stopped.await;
    }));
    Broker {
        store,
        repl,
        addr,
        http,
        stop_http: Some(stop_http),
        http_served,
    }
}

/// `GET path` on `addr`: (status code, body), bounded in time.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
        let mut text = String::new();
        conn.read_to_string(&mut text).await.expect("response");
        text
    };
    let text = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("an answer within 60 s");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// Polls `/readyz` of `b` until its answer satisfies `want` (20 s bound);
/// returns that answer.
async fn readyz_until(b: &Broker, what: &str, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let start = Instant::now();
    loop {
        let (code, body) = get(&b.http, "/readyz").await;
        if want(code, &body) {
            return (code, body);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}; last /readyz: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn append(store: &MessageStore, n: usize, size: usize) {
    for i in 0..n {
        store
            .append(NewRecord::new(
                "orders",
                (i % 4) as u32,
                vec![i as u8; size],
            ))
            .expect("append");
    }
}

/// A standby and a master are ready as soon as they serve; a slave once it
/// follows its master and is in sync; a slave whose master is gone (here:
/// the old master became a slave itself, so it refuses the stream) is not,
/// and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_is_ready_only_while_it_follows_its_master_in_sync() {
    let (d0, d1) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let master = start(d0.path(), "m", StartRole::Master, Duration::ZERO).await;
    let slave = start(d1.path(), "s", StartRole::Standby, Duration::ZERO).await;
    append(&master.store, 50, 1000);

    let (code, body) = get(&master.http, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready (master of epoch 1)\n"));
    let (code, body) = get(&slave.http, "/readyz").await;
    assert_eq!(code, 200, "a standby is ready: {body}");
    assert!(body.starts_with("ready (standby"), "{body}");

    slave.repl.follow(master.addr.clone(), 1).expect("follow");
    let (_, body) = readyz_until(&slave, "the slave to be ready", |c, _| c == 200).await;
    assert!(
        body.starts_with(&format!(
            "ready (slave of {} in epoch 1, in sync",
            master.addr
        )),
        "{body}"
    );
    assert_eq!(master.repl.in_sync_slaves(), 1, "the master agrees");

    // The master goes away as a master: the slave's stream breaks and is
    // refused from then on.
    master
        .repl
        .follow("127.0.0.1:9".into(), 2)
        .expect("step down");
    let (code, body) = readyz_until(&slave, "the slave to be unready", |c, _| c == 503).await;
    assert_eq!(code, 503);
    assert_eq!(
        body,
        format!(
            "not ready: slave not connected to its master {} (epoch 1)\n",
            master.addr
        )
    );
    // Promoted, it is a master again: ready.
    slave.repl.promote(3).expect("promote");
    let (code, body) = get(&slave.http, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready (master of epoch 3)\n"));
    master.repl.shutdown();
    slave.repl.shutdown();
}

/// A master of this test's own, speaking the replication protocol: it
/// welcomes one slave claiming its log ends at `end`, then sends the
/// heartbeats it is given (epoch 1, log end) as they come.
async fn fake_master(end: u64, mut heartbeats: tokio::sync::mpsc::Receiver<u64>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.expect("accept");
        let (rd, wr) = conn.into_split();
        let (mut rd, mut wr) = (BufReader::new(rd), BufWriter::new(wr));
        assert!(matches!(read_frame(&mut rd).await, Ok(Frame::Hello(_))));
        let welcome = Welcome {
            broker_id: "fake".into(),
            client_endpoint: String::new(),
            epoch: 1,
            epochs: vec![EpochEntry {
                epoch: 1,
                start_offset: 0,
            }],
            max_offset: end,
            min_offset: 0,
        };
        write_frame(&mut wr, &Frame::Welcome(welcome))
            .await
            .expect("welcome");
        assert!(matches!(
            read_frame(&mut rd).await,
            Ok(Frame::Start { from: 0 })
        ));
        // The slave's acks are left unread: nothing here needs them.
        let mut beat = tokio::time::interval(Duration::from_millis(200));
        let mut end = end;
        loop {
            tokio::select! {
                next = heartbeats.recv() => match next {
                    Some(e) => end = e,
                    None => return,
                },
                _ = beat.tick() => {}
            }
            if write_frame(
                &mut wr,
                &Frame::Heartbeat {
                    epoch: 1,
                    max_offset: end,
                },
            )
            .await
            .is_err()
            {
                return;
            }
        }
    });
    addr
}

/// A slave far behind its master is not ready, and says how far behind;
/// once the master's log end is within the master's in-sync lag of what the
/// slave holds, it is ready. The log end the slave goes by is the one its
/// master announced last (here: in heartbeats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_catching_up_is_unready_until_within_the_masters_in_sync_lag() {
    let dir = tempfile::tempdir().expect("dir");
    let slave = start(dir.path(), "s", StartRole::Standby, Duration::ZERO).await;
    let (tell, heartbeats) = tokio::sync::mpsc::channel(4);
    let master = fake_master(3 << 30, heartbeats).await;
    slave.repl.follow(master.clone(), 1).expect("follow");

    let (_, body) = readyz_until(&slave, "the slave to say it catches up", |c, b| {
        c == 503 && b.contains("catching up")
    })
    .await;
    assert_eq!(
        body,
        format!(
            "not ready: slave catching up, 3.0 GiB behind master {master} (in sync within 1.0 MiB)\n"
        )
    );
    // One byte beyond the in-sync lag: still catching up.
    tell.send(IN_SYNC_LAG + 1).await.expect("tell");
    readyz_until(&slave, "the new log end to be heard", |c, b| {
        c == 503 && b.contains("1.0 MiB behind")
    })
    .await;
    tell.send(IN_SYNC_LAG).await.expect("tell");
    let (_, body) = readyz_until(&slave, "the slave to be in sync", |c, _| c == 200).await;
    assert_eq!(
        body,
        format!("ready (slave of {master} in epoch 1, in sync: 1.0 MiB behind)\n")
    );
    slave.repl.shutdown();
}

/// A master streaming a backlog to a slave interleaves heartbeats with the
/// data, each telling where its log ends, instead of only once it has
/// nothing left to send: a slave catching up learns how far behind it is
/// while it catches up. The test plays the slave and reads slowly, so the
/// backlog (larger than what the loopback socket buffers hold) takes the
/// master longer than one heartbeat period to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_streaming_a_backlog_keeps_telling_where_its_log_ends() {
    let dir = tempfile::tempdir().expect("dir");
    let master = start(dir.path(), "m", StartRole::Master, Duration::ZERO).await;
    append(&master.store, 40 * 1024, 1024);
    let end = master.store.max_offset();

    // A small receive buffer (no autotuning), so that what the socket holds
    // is far below the backlog whatever the system's limits.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("buffer size");
    let conn = socket
        .connect(master.addr.parse().expect("address"))
        .await
        .expect("connect");
    let (rd, wr) = conn.into_split();
    let (mut rd, mut wr) = (BufReader::new(rd), BufWriter::new(wr));
    let hello = Hello {
        broker_id: "s".into(),
        store_id: "fake".into(),
        epochs: Vec::new(),
        max_offset: 0,
        fence_epoch: 1,
        admin_address: String::new(),
        replication_address: String::new(),
    };
    write_frame(&mut wr, &Frame::Hello(hello))
        .await
        .expect("hello");
    let welcome = match read_frame(&mut rd).await {
        Ok(Frame::Welcome(w)) => w,
        other => panic!("expected Welcome, got {other:?}"),
    };
    assert_eq!(welcome.max_offset, end);
    write_frame(&mut wr, &Frame::Start { from: 0 })
        .await
        .expect("start");
    // Read nothing for a while: the master fills the socket buffers and
    // waits for room, past its heartbeat period.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut pos = 0;
    let mut heard = Vec::new();
    let read_all = async {
        while pos < end {
            match read_frame(&mut rd).await.expect("frame") {
                Frame::Data { offset, bytes, .. } => {
                    assert_eq!(offset, pos);
                    pos += bytes.len() as u64;
                }
                Frame::Heartbeat { epoch, max_offset } => heard.push((pos, epoch, max_offset)),
                Frame::Metadata(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_all)
        .await
        .expect("the backlog arrives within 30 s");
    assert!(
        heard
            .iter()
            .any(|&(at, epoch, max_offset)| at < end && epoch == 1 && max_offset == end),
        "a heartbeat with the log end came before the backlog was through: {heard:?} (end {end})"
    );
    master.repl.shutdown();
}

/// A master with a slave in sync holds `/prestop` until its role has been
/// handed over (here the test does the switchover, as the operator would)
/// and says so; it does not wait when no slave could take over, nor longer
/// than its bound; other brokers answer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestop_holds_a_master_until_its_role_is_handed_over() {
    let (d0, d1) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let wait = Duration::from_secs(60);
    let master = start(d0.path(), "m", StartRole::Master, wait).await;
    let slave = start(d1.path(), "s", StartRole::Standby, wait).await;
    append(&master.store, 50, 1000);

    // No slave yet: nobody could take over, so no wait.
    let (code, body) = get(&master.http, "/prestop").await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        "no slave is connected and in sync to take over; stopping as master\n"
    );
    let (_, body) = get(&slave.http, "/prestop").await;
    assert_eq!(body, "not the master: nothing to hand over\n");

    slave.repl.follow(master.addr.clone(), 1).expect("follow");
    readyz_until(&slave, "the slave to be in sync", |c, _| c == 200).await;
    let hook = held_prestop(&master).await;
    assert_eq!(master.repl.role(), Role::Master);

    let target = slave.repl.clone();
    master
        .repl
        .switchover("s", 2, Duration::from_secs(10), move |epoch| async move {
            target.promote(epoch).map(|_| ()).map_err(|e| e.to_string())
        })
        .await
        .expect("switchover");
    let (code, body) = answer(hook).await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        format!(
            "handed the master role over; now a slave of {}\n",
            slave.addr
        )
    );
    master.repl.shutdown();
    slave.repl.shutdown();
}

/// A master whose hand-over does not come stops waiting at its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestop_waits_no_longer_than_its_bound() {
    let dirs = two_dirs();
    let (master, slave) = master_and_slave_in_sync(&dirs, Duration::from_millis(300)).await;
    let (code, body) = get(&master.http, "/prestop").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "no hand-over within 300ms; stopping as master\n")
    );
    assert_eq!(master.repl.role(), Role::Master);
    master.repl.shutdown();
    slave.repl.shutdown();
}

/// Calls `/prestop` of `master` and checks that it is held (not answered
/// after 300 ms): the call, to be answered later.
async fn held_prestop(master: &Broker) -> tokio::task::JoinHandle<(u16, String)> {
    let http = master.http.clone();
    let hook = tokio::spawn(async move { get(&http, "/prestop").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!hook.is_finished(), "the hook waits for a hand-over");
    assert_eq!(master.repl.role(), Role::Master);
    hook
}

/// The answer to a held `/prestop` call, once it comes (10 s bound).
async fn answer(hook: tokio::task::JoinHandle<(u16, String)>) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(10), hook)
        .await
        .expect("the held hook answers")
        .expect("join")
}

/// A master and a slave in sync (following it, `/readyz` 200), brokers of
/// this process whose `/prestop` holds for at most `wait`.
async fn master_and_slave_in_sync(
    dirs: &(tempfile::TempDir, tempfile::TempDir),
    wait: Duration,
) -> (Broker, Broker) {
    let master = start(dirs.0.path(), "m", StartRole::Master, wait).await;
    let slave = start(dirs.1.path(), "s", StartRole::Standby, wait).await;
    append(&master.store, 50, 1000);
    slave.repl.follow(master.addr.clone(), 1).expect("follow");
    readyz_until(&slave, "the slave to be in sync", |c, _| c == 200).await;
    (master, slave)
}

fn two_dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    )
}

/// A `/prestop` held when the broker starts to stop (SIGTERM: the kubelet's
/// hook cut short by a grace period under the hold's bound, or a call by
/// anyone else on the network) answers at once, and the HTTP server stops
/// instead of waiting for the hold, which would keep the broker from
/// stopping cleanly within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_prestop_lets_the_broker_stop() {
    let dirs = two_dirs();
    let (mut master, slave) = master_and_slave_in_sync(&dirs, Duration::from_secs(600)).await;
    let hook = held_prestop(&master).await;

    let _ = master.stop_http.take().expect("stop").send(());
    tokio::time::timeout(Duration::from_secs(20), &mut master.http_served)
        .await
        .expect("the HTTP server stops without waiting out the hold")
        .expect("join")
        .expect("served");
    let (code, body) = answer(hook).await;
    assert_eq!(
        (code, body.as_str()),
        (
            200,
            "the broker is stopping: no longer waiting for a hand-over\n"
        )
    );
    assert_eq!(master.repl.role(), Role::Master);
    master.repl.shutdown();
    slave.repl.shutdown();
}

/// The hand-over's target drops its stream from the master as it is
/// promoted, before the master follows it: the master has no slave in sync
/// for that moment, but its hand-over is under way (writes paused), so
/// `/prestop` holds on and says the role was handed over, instead of
/// letting the kubelet stop a master in the middle of its switchover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestop_holds_through_a_hand_over_under_way() {
    let dirs = two_dirs();
    let (master, slave) = master_and_slave_in_sync(&dirs, Duration::from_secs(60)).await;
    let hook = held_prestop(&master).await;

    let (target, old) = (slave.repl.clone(), master.repl.clone());
    master
        .repl
        .switchover("s", 2, Duration::from_secs(10), move |epoch| async move {
            target.promote(epoch).map_err(|e| e.to_string())?;
            // The promoted target's stream from the master is gone ...
            let start = Instant::now();
            while old.in_sync_slaves() > 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the master saw its slave go"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // ... for longer than the hold takes to look again (200 ms)
            // before the answer reaches the master.
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        })
        .await
        .expect("switchover");
    let (code, body) = answer(hook).await;
    assert_eq!(
        (code, body.as_str()),
        (
            200,
            format!(
                "handed the master role over; now a slave of {}\n",
                slave.addr
            )
            .as_str()
        )
    );
    master.repl.shutdown();
    slave.repl.shutdown();
}
