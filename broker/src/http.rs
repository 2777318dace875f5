//! The broker's HTTP port: `/healthz` (the process is alive), `/readyz`
//! (it serves clients; a slave, only while it follows its master and is in
//! sync), `/prestop` (a master being stopped waits here for the operator to
//! hand its role over) and `/metrics` (Prometheus text format). Kubernetes
//! probes and hooks and Prometheus call it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use parking_lot::Mutex;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::replication::{ReplicationManager, Role};
use crate::store::MessageStore;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub store: MessageStore,
    pub replication: Arc<ReplicationManager>,
    /// Set once every listener is up.
    pub ready: Arc<AtomicBool>,
    /// Consumer-side figures (failover redeliveries).
    pub groups: Option<Arc<dyn crate::admin::GroupInspector>>,
    /// Transactional-message counters, when the client API runs.
    pub transactions: Option<Arc<crate::messaging::transaction::Transactions>>,
    /// Slave-read counters, when the client API runs.
    pub slave_reads: Option<Arc<crate::messaging::slave_reads::SlaveReadStats>>,
    /// Client-port counters, when the client API runs.
    pub client: Option<Arc<crate::client_api::ClientMetrics>>,
    /// How long `/prestop` holds a master's shutdown for a hand-over
    /// ([`PRESTOP_HAND_OVER_WAIT`] in the broker).
    pub prestop_wait: Duration,
}

/// How long a master being stopped waits in `/prestop` for the operator's
/// hand-over. The pod's termination grace period (60 s, set by the
/// operator) covers it, then the 10 s the broker gives its listeners to
/// stop, with room to spare; the operator's hand-over needs its reaction to
/// the pod's deletion plus at most 10 s for the slave to catch up.
pub const PRESTOP_HAND_OVER_WAIT: Duration = Duration::from_secs(30);

/// How many `/prestop` calls may hold at once, in all. The port is
/// reachable from the network and anyone may call it: without a cap every
/// call would keep a connection and a task for up to
/// [`PRESTOP_HAND_OVER_WAIT`], so a flood of them would pile up. A call
/// over a cap does not hold: it is answered at once with 503 Service
/// Unavailable (the server is out of room for holds: 429 Too Many Requests
/// would blame the caller's own rate). The kubelet takes any answer as the
/// hook being done; should the holds be someone else's, the broker then
/// stops without waiting for the hand-over, as a broker without the hook
/// would (no worse than an unplanned stop: the operator's hand-over is
/// started by the pod's deletion, not by a held call). The cap per caller
/// ([`PRESTOP_MAX_HOLDS_PER_PEER`]) keeps one caller from taking every hold.
pub const PRESTOP_MAX_HOLDS: usize = 16;

/// How many `/prestop` calls from one address may hold at once. The
/// kubelet makes one call per stop of the container (from its node's
/// address), so two leave room for it and a retry; a caller that floods the
/// port from its own address takes no more.
pub const PRESTOP_MAX_HOLDS_PER_PEER: usize = 2;

/// Serves the HTTP port until `shutdown` resolves. A `/prestop` still
/// held then answers at once: the server's graceful stop waits for the
/// requests in flight, and a hold (of the kubelet's hook cut short by a
/// short grace period, or of anyone else who called it) must not keep the
/// broker from stopping.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stopping_tx, stopping) = watch::channel(false);
    let app = router(
        state,
        stopping,
        PrestopHolds::new(PRESTOP_MAX_HOLDS, PRESTOP_MAX_HOLDS_PER_PEER),
    );
    tracing::info!(address = ?listener.local_addr().ok(), "http listener ready (/healthz, /readyz, /prestop, /metrics)");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        stopping_tx.send_replace(true);
    })
    .await
}

/// The HTTP port's routes: `/prestop` ends its holds once `stopping` turns
/// true, and holds only while `holds` has room.
fn router(state: HttpState, stopping: watch::Receiver<bool>, holds: PrestopHolds) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/prestop", get(prestop))
        .route("/metrics", get(metrics))
        .layer(Extension(Stopping(stopping)))
        .layer(Extension(holds))
        .with_state(state)
}

/// The `/prestop` calls holding, in all and by caller's address, and the
/// caps on both (see [`PRESTOP_MAX_HOLDS`]).
#[derive(Clone)]
struct PrestopHolds(Arc<Mutex<HoldCounts>>);

struct HoldCounts {
    max: usize,
    max_per_peer: usize,
    total: usize,
    /// `None`: calls whose address is not known (counted as one caller).
    by_peer: HashMap<Option<IpAddr>, usize>,
}

impl PrestopHolds {
    fn new(max: usize, max_per_peer: usize) -> Self {
        Self(Arc::new(Mutex::new(HoldCounts {
            max,
            max_per_peer,
            total: 0,
            by_peer: HashMap::new(),
        })))
    }

    /// A hold for a call from `peer`, released when dropped (the call ends,
    /// or its caller goes away); why not when a cap is reached.
    fn take(&self, peer: Option<IpAddr>) -> Result<Hold, String> {
        let mut c = self.0.lock();
        let from_peer = c.by_peer.get(&peer).copied().unwrap_or(0);
        if from_peer >= c.max_per_peer {
            let who = peer.map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string());
            return Err(format!(
                "{from_peer} /prestop calls from {who} are held already: not holding this one"
            ));
        }
        if c.total >= c.max {
            return Err(format!(
                "{} /prestop calls are held already: not holding this one",
                c.total
            ));
        }
        c.total += 1;
        *c.by_peer.entry(peer).or_default() += 1;
        Ok(Hold {
            holds: self.clone(),
            peer,
        })
    }

    /// Calls holding now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.0.lock().total
    }
}

/// One `/prestop` call's place among the holds.
struct Hold {
    holds: PrestopHolds,
    peer: Option<IpAddr>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut c = self.holds.0.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Turns true when the HTTP server starts to stop (the broker is shutting
/// down): what ends a `/prestop` hold early.
#[derive(Clone)]
struct Stopping(watch::Receiver<bool>);

/// 200 once every listener is up, for a master or a standby; for a slave
/// that follows a master, only while it is connected to it and in sync
/// (see [`ReplicationManager::readiness`]). The body says why, either way.
async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned());
    }
    let r = s.replication.readiness();
    if r.ready {
        (StatusCode::OK, format!("ready ({})\n", r.reason))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", r.reason),
        )
    }
}

/// The broker container's preStop hook: the kubelet calls it when the pod
/// is deleted (a node drain, an eviction, `kubectl delete pod`), before it
/// sends SIGTERM. A master with a slave connected and in sync holds its
/// shutdown here until the operator, which sees the pod being deleted, has
/// handed the master role to a slave (a planned switchover: nothing
/// acknowledged is lost and writes pause only for the hand-over), or until
/// no slave is in sync any more, or `prestop_wait` has passed; then the
/// broker stops as before. Any other broker answers at once. Always 200:
/// the body says what happened.
///
/// Anyone who reaches the port may call it: it only waits (never longer
/// than `prestop_wait`, and not once the broker stops), it pauses no write
/// and starts nothing; the hand-over is the operator's, started by the
/// pod's deletion, not by this call. At most [`PRESTOP_MAX_HOLDS`] calls
/// hold at once, [`PRESTOP_MAX_HOLDS_PER_PEER`] of them from one address;
/// one more is answered at once, 503 (see there).
async fn prestop(
    State(s): State<HttpState>,
    Extension(Stopping(stopping)): Extension<Stopping>,
    Extension(holds): Extension<PrestopHolds>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> impl IntoResponse {
    let peer = peer.map(|Extension(ConnectInfo(a))| a.ip().to_canonical());
    let _hold = match holds.take(peer) {
        Ok(hold) => hold,
        Err(why) => {
            tracing::debug!("preStop: {why}");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
        }
    };
    let outcome = hold_for_hand_over(&s.replication, s.prestop_wait, stopping).await;
    tracing::info!("preStop: {outcome}");
    (StatusCode::OK, format!("{outcome}\n"))
}

/// Waits, as `/prestop` does, until this broker is no longer master, no
/// slave is connected and in sync (and no hand-over is under way), `wait`
/// has passed, or `stopping` turns true (or its sender is gone); says which.
pub async fn hold_for_hand_over(
    repl: &ReplicationManager,
    wait: Duration,
    mut stopping: watch::Receiver<bool>,
) -> String {
    const STOPPING: &str = "the broker is stopping: no longer waiting for a hand-over";
    if repl.role() != Role::Master {
        return "not the master: nothing to hand over".into();
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = repl.subscribe_role_changes();
    tracing::info!(
        "preStop while master: waiting up to {wait:?} for the operator to hand the master role to an in-sync slave"
    );
    loop {
        if *stopping.borrow_and_update() {
            return STOPPING.into();
        }
        if repl.role() != Role::Master {
            let master = repl.status().master_address.unwrap_or_default();
            return format!("handed the master role over; now a slave of {master}");
        }
        // A switchover under way pauses writes until the target took over,
        // and its target drops this master's stream as it is promoted,
        // before this broker follows it: not a master left without a slave.
        if repl.in_sync_slaves() == 0 && !repl.writes_paused() {
            return "no slave is connected and in sync to take over; stopping as master".into();
        }
        if tokio::time::Instant::now() >= deadline {
            return format!("no hand-over within {wait:?}; stopping as master");
        }
        // Role changes and the broker stopping wake at once; the in-sync
        // count is looked at again every 200 ms.
        let tick = deadline.min(tokio::time::Instant::now() + Duration::from_millis(200));
        tokio::select! {
            _ = changes.changed() => {}
            changed = stopping.changed() => if changed.is_err() {
                return STOPPING.into();
            },
            _ = tokio::time::sleep_until(tick) => {}
        }
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

/// Consumer lag: per consumer group and topic, the messages stored past
/// the group's committed offsets, summed over the topic's queues (what
/// `keelmq group describe` shows per queue). Only groups that committed an
/// offset appear (the broker's own `%SYS_` records do not).
fn consumer_lag(store: &MessageStore, r: &mut Registry) {
    use prometheus_client::metrics::family::Family;
    let lag: Family<crate::client_api::GroupLabels, Gauge> = Family::default();
    for o in store.metadata().list_offsets() {
        // The broker's own progress records (timer, transactions, delivery
        // log) are kept as offsets of `%SYS_` groups: not consumers.
        if o.group.starts_with("%SYS_") {
            continue;
        }
        let behind = store
            .queue_max_offset(&o.topic, o.queue_id)
            .saturating_sub(o.offset);
        lag.get_or_create(&crate::client_api::GroupLabels {
            group: o.group,
            topic: o.topic,
        })
        .inc_by(i64::try_from(behind).unwrap_or(i64::MAX));
    }
    r.register(
        "consumer_lag_messages",
        "Messages stored past a consumer group's committed offsets, by group and topic (summed over the topic's queues)",
        lag,
    );
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let mut r = Registry::with_prefix("keelmq");
    let status = s.replication.status();
    gauge(
        &mut r,
        "commitlog_min_offset",
        "First readable commit-log offset",
        s.store.min_offset() as i64,
    );
    gauge(
        &mut r,
        "commitlog_max_offset",
        "End of the commit log",
        s.store.max_offset() as i64,
    );
    gauge(
        &mut r,
        "commitlog_flushed_offset",
        "Durable end of the commit log",
        s.store.flushed_offset() as i64,
    );
    let flush = s.store.flush_counts();
    counter(
        &mut r,
        "commitlog_flushes",
        "fdatasync calls on the commit log",
        flush.flushes,
    );
    {
        let c: Counter<f64, std::sync::atomic::AtomicU64> = Counter::default();
        c.inc_by(flush.flush_time.as_secs_f64());
        r.register(
            "commitlog_flush_seconds",
            "Time spent in fdatasync calls on the commit log: its rate is the share of the time the log is being flushed; divided by the rate of commitlog_flushes_total, the mean flush time",
            c,
        );
    }
    counter(
        &mut r,
        "commitlog_group_commit_appends",
        "SYNC_FLUSH appends (a record or a batch each) written by group commits; per flush: divide by commitlog_flushes_total",
        flush.group_appends,
    );
    counter(
        &mut r,
        "commitlog_zeroed_ahead_bytes",
        "Bytes of zeros written just ahead of the SYNC_FLUSH writer, so that its flushes overwrite written blocks",
        flush.zeroed_ahead_bytes,
    );
    counter(
        &mut r,
        "commitlog_reused_segments",
        "SYNC_FLUSH: commit-log segments made of files retention took from the log (reuse_segments), since start",
        flush.reused_segments,
    );
    gauge(
        &mut r,
        "replication_confirmed_offset",
        "Offset acknowledged under the replication mode",
        status.confirmed_offset as i64,
    );
    gauge(
        &mut r,
        "epoch",
        "Current master epoch known to this broker",
        status.epoch as i64,
    );
    gauge(
        &mut r,
        "is_master",
        "1 when this broker is the master",
        i64::from(status.role == Role::Master),
    );
    gauge(
        &mut r,
        "replication_connected_slaves",
        "Slaves with an open replication stream",
        status.slaves.iter().filter(|x| x.connected).count() as i64,
    );
    gauge(
        &mut r,
        "replication_in_sync_slaves",
        "Slaves within the in-sync lag",
        status.slaves.iter().filter(|x| x.in_sync).count() as i64,
    );
    gauge(
        &mut r,
        "replication_max_slave_lag_bytes",
        "Largest lag of a connected slave, in bytes",
        status
            .slaves
            .iter()
            .filter(|x| x.connected)
            .map(|x| x.lag_bytes)
            .max()
            .unwrap_or(0) as i64,
    );
    if let Some(groups) = &s.groups {
        counter(
            &mut r,
            "failover_redeliveries",
            "Messages handed out again because a failover lost their delivery state",
            groups.failover_redeliveries(),
        );
    }
    if let Some(t) = &s.transactions {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &t.stats;
        gauge(
            &mut r,
            "transactions_pending",
            "Half messages waiting for commit or rollback",
            t.pending_count() as i64,
        );
        for (name, help, v) in [
            (
                "transactions_committed",
                "Transactions committed",
                &st.committed,
            ),
            (
                "transactions_rolled_back",
                "Transactions rolled back",
                &st.rolled_back,
            ),
            (
                "transactions_discarded",
                "Half messages discarded after the maximum check-backs",
                &st.discarded,
            ),
            (
                "transaction_checks_sent",
                "Check-backs sent to producers",
                &st.checks_sent,
            ),
            (
                "transaction_checks_unanswerable",
                "Check-backs due with no live producer of the topic",
                &st.checks_unanswerable,
            ),
        ] {
            counter(&mut r, name, help, v.load(Relaxed));
        }
    }
    if let Some(st) = &s.slave_reads {
        use std::sync::atomic::Ordering::Relaxed;
        for (name, help, v) in [
            (
                "slave_read_records",
                "Records a master read from a slave for consumers",
                &st.read_from_slaves,
            ),
            (
                "slave_read_fallbacks",
                "Records meant for a slave read that the master read itself",
                &st.fallbacks,
            ),
            (
                "slave_read_records_served",
                "Records a slave served to its master",
                &st.served_to_master,
            ),
        ] {
            counter(&mut r, name, help, v.load(Relaxed));
        }
    }
    if let Some(c) = &s.client {
        c.register(&mut r);
    }
    consumer_lag(&s.store, &mut r);
    let mut body = String::new();
    match encode(&mut body, &r) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{ReplicationConfig, ReplicationMode, StartRole};
    use crate::store::NewRecord;
    use crate::testing::{replication_config, serve_replication};
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A broker of this test: its store and replication (serving), as
    /// `tests/readiness.rs` starts them.
    async fn broker(
        dir: &std::path::Path,
        id: &str,
        role: StartRole,
    ) -> (MessageStore, Arc<ReplicationManager>, String) {
        let store =
            MessageStore::open(crate::testing::async_store_config(dir, 4 << 20)).expect("store");
        let cfg = ReplicationConfig {
            broker_id: id.into(),
            ..replication_config(dir, ReplicationMode::Sync, Duration::from_secs(5), role)
        };
        let (repl, addr) = serve_replication(&store, cfg, std::future::pending()).await;
        (store, repl, addr)
    }

    /// `GET /prestop` on `app` from `peer` (127.0.0.`peer`): (status, body).
    async fn prestop_call(app: Router, peer: u8) -> (StatusCode, String) {
        let mut request = Request::get("/prestop")
            .body(Body::empty())
            .expect("request");
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, peer], 40_000))));
        let response = app.oneshot(request).await.expect("routed");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Polls `what` until it holds (20 s bound).
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let start = tokio::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A master with a slave in sync (where `/prestop` holds), and its
    /// HTTP routes, holding at most `wait` and as `holds` allows.
    struct HeldMaster {
        app: Router,
        /// Set true: the broker stops (every hold ends).
        stopping: watch::Sender<bool>,
        master: Arc<ReplicationManager>,
        slave: Arc<ReplicationManager>,
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    impl HeldMaster {
        async fn start(wait: Duration, holds: &PrestopHolds) -> Self {
            let (d0, d1) = (
                tempfile::tempdir().expect("dir"),
                tempfile::tempdir().expect("dir"),
            );
            let (store, master, master_addr) = broker(d0.path(), "m", StartRole::Master).await;
            let (_slave_store, slave, _) = broker(d1.path(), "s", StartRole::Standby).await;
            for i in 0..20u32 {
                store
                    .append(NewRecord::new("orders", i % 4, vec![i as u8; 100]))
                    .expect("append");
            }
            slave.follow(master_addr, 1).expect("follow");
            until("the slave to be in sync", || {
                slave.readiness().ready && master.in_sync_slaves() == 1
            })
            .await;
            let state = HttpState {
                store,
                replication: master.clone(),
                ready: Arc::new(AtomicBool::new(true)),
                groups: None,
                transactions: None,
                slave_reads: None,
                client: None,
                prestop_wait: wait,
            };
            let (stopping_tx, stopping) = watch::channel(false);
            Self {
                app: router(state, stopping, holds.clone()),
                stopping: stopping_tx,
                master,
                slave,
                _dirs: (d0, d1),
            }
        }
    }

    /// With as many `/prestop` calls holding a master with a slave in sync
    /// as one caller may make, one more from that caller is answered at
    /// once, 503, while others' calls still hold; with as many holding as
    /// all callers may make, one more from a new caller is answered at once
    /// too. The held calls go on holding, and once they have ended, a new
    /// call holds again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prestop_holds_are_capped_and_a_call_over_a_cap_is_answered_at_once() {
        let wait = Duration::from_secs(5);
        let holds = PrestopHolds::new(4, 2);
        let HeldMaster {
            app,
            stopping: stopping_tx,
            master,
            slave,
            _dirs,
        } = HeldMaster::start(wait, &holds).await;
        let over_cap = |answer: (StatusCode, String), why: &str| {
            assert_eq!(
                answer,
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{why}: not holding this one\n")
                )
            );
        };
        let answered_at_once = |peer: u8| {
            let call = prestop_call(app.clone(), peer);
            async move {
                tokio::time::timeout(Duration::from_secs(2), call)
                    .await
                    .expect("a call over a cap is answered at once")
            }
        };

        let mut held: Vec<_> = (0..2)
            .map(|_| tokio::spawn(prestop_call(app.clone(), 1)))
            .collect();
        until("the first caller's holds", || holds.held() == 2).await;
        over_cap(
            answered_at_once(1).await,
            "2 /prestop calls from 127.0.0.1 are held already",
        );
        held.extend((2..4).map(|peer| tokio::spawn(prestop_call(app.clone(), peer))));
        until("every hold to be taken", || holds.held() == 4).await;
        over_cap(
            answered_at_once(9).await,
            "4 /prestop calls are held already",
        );
        assert!(
            held.iter().all(|h| !h.is_finished()),
            "the held calls go on holding"
        );
        assert_eq!(holds.held(), 4);

        for h in held {
            let answer = tokio::time::timeout(wait + Duration::from_secs(10), h)
                .await
                .expect("a held call ends at its bound")
                .expect("join");
            assert_eq!(
                answer,
                (
                    StatusCode::OK,
                    format!("no hand-over within {wait:?}; stopping as master\n")
                )
            );
        }
        assert_eq!(holds.held(), 0, "released");
        assert!(holds.0.lock().by_peer.is_empty(), "no caller left counted");

        // Room again: a new call holds (until the broker stops).
        let again = tokio::spawn(prestop_call(app.clone(), 1));
        until("the new call to hold", || holds.held() == 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!again.is_finished(), "the new call holds");
        stopping_tx.send_replace(true);
        let answer = tokio::time::timeout(Duration::from_secs(10), again)
            .await
            .expect("the hold ends as the broker stops")
            .expect("join");
        assert_eq!(
            answer,
            (
                StatusCode::OK,
                "the broker is stopping: no longer waiting for a hand-over\n".to_owned()
            )
        );
        assert_eq!(holds.held(), 0);
        master.shutdown();
        slave.shutdown();
    }

    /// A `/prestop` hold is released when its caller goes away mid-hold
    /// (the server drops the request's future as the connection closes):
    /// here a held call's task is aborted, and another held call's future
    /// is dropped. The same caller can then hold as many calls again as its
    /// cap allows (and no more), and nothing of the calls gone stays
    /// counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prestop_hold_is_released_when_its_caller_goes_away() {
        let holds = PrestopHolds::new(4, 2);
        let m = HeldMaster::start(Duration::from_secs(60), &holds).await;
        let from_1 = || {
            let peer = Some(IpAddr::from([127, 0, 0, 1]));
            holds.0.lock().by_peer.get(&peer).copied()
        };
        let answered_at_once = || async {
            tokio::time::timeout(Duration::from_secs(2), prestop_call(m.app.clone(), 1))
                .await
                .expect("answered at once")
        };
        let full = (
            StatusCode::SERVICE_UNAVAILABLE,
            "2 /prestop calls from 127.0.0.1 are held already: not holding this one\n".to_owned(),
        );

        let aborted = tokio::spawn(prestop_call(m.app.clone(), 1));
        let mut dropped = Box::pin(prestop_call(m.app.clone(), 1));
        tokio::select! {
            got = &mut dropped => panic!("answered, not held: {got:?}"),
            () = until("both calls to hold", || holds.held() == 2) => {}
        }
        assert_eq!(answered_at_once().await, full);

        aborted.abort();
        assert!(
            aborted.await.expect_err("aborted").is_cancelled(),
            "gone mid-hold"
        );
        until("the aborted call's hold to be released", || {
            holds.held() == 1
        })
        .await;
        assert_eq!(from_1(), Some(1));
        drop(dropped);
        assert_eq!(holds.held(), 0, "released as its future is dropped");
        assert_eq!(from_1(), None, "no call from 127.0.0.1 counted");

        // The caller holds again, up to its cap.
        let again: Vec<_> = (0..2)
            .map(|_| tokio::spawn(prestop_call(m.app.clone(), 1)))
            .collect();
        until("the new calls to hold", || holds.held() == 2).await;
        assert_eq!(answered_at_once().await, full);
        assert!(again.iter().all(|h| !h.is_finished()), "the new calls hold");
        m.stopping.send_replace(true);
        for h in again {
            let answer = tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .expect("the hold ends as the broker stops")
                .expect("join");
            assert_eq!(answer.0, StatusCode::OK, "{answer:?}");
        }
        assert_eq!(holds.held(), 0);
        assert_eq!(from_1(), None);
        m.master.shutdown();
        m.slave.shutdown();
    }
}
