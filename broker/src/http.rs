//! The broker's HTTP port: `/healthz` (the process is alive), `/readyz`
//! (it serves clients) and `/metrics` (Prometheus text format). Kubernetes
//! probes and Prometheus scrape it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
}

/// Serves the HTTP port until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    tracing::info!(address = ?listener.local_addr().ok(), "http listener ready (/healthz, /readyz, /metrics)");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        (
            StatusCode::OK,
            format!("ready ({})\n", s.replication.role()),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned())
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
