//! The broker's HTTP port: `/healthz` (the process is alive), `/readyz`
//! (it serves clients; a slave, only while it follows its master and is in
//! sync), `/prestop` (a master being stopped waits here for the operator to
//! hand its role over) and `/metrics` (Prometheus text format). Kubernetes
//! probes and hooks and Prometheus call it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
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
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/prestop", get(prestop))
        .route("/metrics", get(metrics))
        .layer(Extension(Stopping(stopping)))
        .with_state(state);
    tracing::info!(address = ?listener.local_addr().ok(), "http listener ready (/healthz, /readyz, /prestop, /metrics)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping_tx.send_replace(true);
        })
        .await
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
/// pod's deletion, not by this call.
async fn prestop(
    State(s): State<HttpState>,
    Extension(Stopping(stopping)): Extension<Stopping>,
) -> impl IntoResponse {
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
