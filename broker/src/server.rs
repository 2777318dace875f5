//! The broker process: opens the store and the replication state, binds
//! the admin, HTTP and replication ports, and runs until SIGTERM or SIGINT,
//! then shuts down cleanly (stop serving, flush, checkpoint).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{AdminService, BrokerIdentity};
use crate::client_api::{ClientApi, ClientApiConfig};
use crate::config::BrokerConfig;
use crate::http::HttpState;
use crate::messaging::consumer::Consumption;
use crate::messaging::slave_reads::{SlaveReadStats, SlaveReads};
use crate::replication::{ReplicationConfig, ReplicationError, ReplicationManager};
use crate::store::{FlushMode, MessageStore, StoreError};
use crate::write_path::WritePath;

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("cannot listen on {address} ({what}): {source}")]
    Bind {
        what: &'static str,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Binds `host:port`. `::` (every address, IPv4 too on Linux: what the
/// operator sets) falls back to `0.0.0.0` where the host has no IPv6.
async fn bind(what: &'static str, host: &str, port: u16) -> Result<TcpListener, ServerError> {
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let bound = match TcpListener::bind(&address).await {
        Err(e) if host == "::" && e.kind() != std::io::ErrorKind::AddrInUse => {
            tracing::warn!(error = %e, what, port, "cannot listen on IPv6 ([::]); listening on IPv4 (0.0.0.0) only");
            TcpListener::bind(("0.0.0.0", port)).await
        }
        bound => bound,
    };
    bound.map_err(|source| ServerError::Bind {
        what,
        address,
        source,
    })
}

fn local(l: &TcpListener) -> Result<SocketAddr, ServerError> {
    l.local_addr()
        .map_err(|e| ServerError::Other(format!("listener address: {e}")))
}

/// Runs a broker with `config` until a termination signal arrives.
pub async fn run(config: BrokerConfig) -> Result<(), ServerError> {
    let store_cfg = config.store_config();
    let store = tokio::task::spawn_blocking(move || MessageStore::open(store_cfg))
        .await
        .map_err(|e| ServerError::Other(format!("store open task failed: {e}")))??;
    let result = serve(&config, store.clone()).await;
    let s = store.clone();
    let closed = tokio::task::spawn_blocking(move || s.shutdown())
        .await
        .map_err(|e| ServerError::Other(format!("store shutdown task failed: {e}")))?;
    result?;
    closed?;
    Ok(())
}

async fn serve(config: &BrokerConfig, store: MessageStore) -> Result<(), ServerError> {
    let host = config.advertised_host();
    let client_l = bind("client", &config.listen_address, config.client_port).await?;
    let admin_l = bind("admin", &config.listen_address, config.admin_port).await?;
    let http_l = bind("http", &config.listen_address, config.http_port).await?;
    let repl_l = bind(
        "replication",
        &config.listen_address,
        config.replication_port,
    )
    .await?;
    let (client_a, admin_a, http_a, repl_a) = (
        local(&client_l)?,
        local(&admin_l)?,
        local(&http_l)?,
        local(&repl_l)?,
    );
    let broker_id = config.broker_id();
    let repl = ReplicationManager::open(
        ReplicationConfig {
            broker_id: broker_id.clone(),
            mode: config.replication_mode,
            min_in_sync_replicas: config.min_in_sync_replicas,
            sync_timeout: Duration::from_millis(config.replication_timeout_ms),
            in_sync_max_lag_bytes: 64 << 20,
            listen: repl_a,
            advertised_replication: format!("{host}:{}", repl_a.port()),
            advertised_admin: format!("{host}:{}", admin_a.port()),
            advertised_client: format!("{host}:{}", client_a.port()),
            data_dir: config.data_dir.clone(),
            start_role: config.role,
            slave_flush_before_ack: config.flush_mode == FlushMode::SyncFlush,
        },
        store.clone(),
    )?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ready = Arc::new(AtomicBool::new(false));
    let consumption = Arc::new(Consumption::new(store.clone()));
    let arrivals = consumption.arrivals();
    let transactions;
    let client_metrics;
    let slave_read_stats = Arc::new(SlaveReadStats::default());
    {
        let slave_reads = Arc::new(SlaveReads::new(
            config.slave_read,
            config.slave_read_threshold(),
            store.clone(),
            repl.clone(),
            slave_read_stats.clone(),
        ));
        let api = ClientApi::new(
            ClientApiConfig {
                broker_name: config.broker_name.clone(),
                advertised_host: host.clone(),
                advertised_port: client_a.port(),
                max_body_size: 4 << 20,
                auto_create_topics: config.auto_create_topics,
                default_queue_count: config.default_queue_count,
                transactions: config.transaction_config(),
            },
            WritePath::new(store.clone(), repl.clone()),
            consumption.clone(),
        )
        .with_slave_reads(slave_reads);
        // Transactions: check back unresolved half messages.
        transactions = api.transactions();
        client_metrics = api.metrics();
        let (checker, stop) = (api.clone(), stopped(stop_rx.clone()));
        tasks.spawn(async move {
            checker.run_transaction_checks(stop).await;
            Ok::<(), String>(())
        });
        // auto_renew deliveries of connected clients.
        let (renewer, stop) = (api.clone(), stopped(stop_rx.clone()));
        tasks.spawn(async move {
            renewer.run_renewals(stop).await;
            Ok::<(), String>(())
        });
        let timer = crate::messaging::timer::Timer::new(store.clone());
        {
            // A role change means the delivery state in memory belongs to a
            // previous master's history: rebuild it from the (replicated)
            // metadata and delivery log. A master does so at once (at start
            // and when promoted), so its status shows the state.
            let (mut changes, timer, consumption, repl) = (
                repl.subscribe_role_changes(),
                timer.clone(),
                consumption.clone(),
                repl.clone(),
            );
            let stop = stopped(stop_rx.clone());
            tasks.spawn(async move {
                tokio::pin!(stop);
                loop {
                    if repl.role() == crate::replication::Role::Master {
                        consumption.load();
                    }
                    tokio::select! {
                        _ = &mut stop => return Ok::<(), String>(()),
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return Ok(());
                            }
                            consumption.reset();
                            timer.reset();
                        }
                    }
                }
            });
        }
        let (write, arrivals, stop) = (
            WritePath::new(store.clone(), repl.clone()),
            arrivals.clone(),
            stopped(stop_rx.clone()),
        );
        tasks.spawn(async move {
            timer.run(write, arrivals, stop).await;
            Ok::<(), String>(())
        });
        let files = config
            .tls_cert
            .clone()
            .zip(config.tls_key.clone())
            .map(|(cert, key)| crate::client_api::tls::TlsFiles { cert, key });
        let (acceptor, ca) =
            crate::client_api::tls::acceptor(files.as_ref(), &config.data_dir.join("tls"), &host)
                .map_err(|e| ServerError::Other(format!("TLS for the client port: {e}")))?;
        if let Some(ca) = ca {
            tracing::info!(ca = %ca.display(), "client port serves TLS with the broker's own certificate; clients verifying it must trust this CA");
        }
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            crate::client_api::server_builder(
                crate::client_api::HTTP2_KEEPALIVE_INTERVAL,
                crate::client_api::HTTP2_KEEPALIVE_TIMEOUT,
            )
            .add_service(api.into_server())
            .serve_with_incoming_shutdown(
                crate::client_api::tls::incoming(client_l, acceptor),
                stop,
            )
            .await
            .map_err(|e| format!("client server: {e}"))
        });
    }

    {
        let (r, stop) = (repl.clone(), stopped(stop_rx.clone()));
        tasks.spawn(async move {
            r.serve_listener(repl_l, stop).await;
            Ok::<(), String>(())
        });
    }
    {
        let identity = BrokerIdentity {
            broker_name: config.broker_name.clone(),
            broker_id: broker_id.clone(),
            client_endpoint: format!("{host}:{}", client_a.port()),
            replication_endpoint: format!("{host}:{}", repl_a.port()),
            flush_mode: config.flush_mode.to_string(),
            default_queue_count: config.default_queue_count,
        };
        let inspector: Arc<dyn crate::admin::GroupInspector> = consumption.clone();
        let svc = AdminService::new(identity, store.clone(), repl.clone(), Some(inspector))
            .with_slave_reads(config.slave_read, slave_read_stats.clone())
            .into_server();
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(admin_l),
                    stop,
                )
                .await
                .map_err(|e| format!("admin server: {e}"))
        });
    }
    {
        let state = HttpState {
            store: store.clone(),
            replication: repl.clone(),
            ready: ready.clone(),
            groups: Some(consumption.clone()),
            transactions: Some(transactions.clone()),
            slave_reads: Some(slave_read_stats.clone()),
            client: Some(client_metrics.clone()),
            prestop_wait: crate::http::PRESTOP_HAND_OVER_WAIT,
        };
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            crate::http::serve(http_l, state, stop)
                .await
                .map_err(|e| format!("http server: {e}"))
        });
    }
    ready.store(true, Ordering::Release);
    tracing::info!(
        broker = %config.broker_name,
        broker_id = %broker_id,
        role = %repl.role(),
        epoch = repl.epoch(),
        client = %client_a,
        admin = %admin_a,
        http = %http_a,
        replication = %repl_a,
        data_dir = %config.data_dir.display(),
        end_offset = store.max_offset(),
        "broker started"
    );

    let failure = tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("termination signal received; shutting down");
            None
        }
        Some(done) = tasks.join_next() => Some(match done {
            Ok(Ok(())) => "a listener stopped unexpectedly".to_owned(),
            Ok(Err(e)) => e,
            Err(e) => format!("a listener task failed: {e}"),
        }),
    };
    ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    repl.shutdown();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("listeners did not stop within 10 s; closing anyway");
        tasks.abort_all();
    }
    match failure {
        Some(e) => Err(ServerError::Other(e)),
        None => Ok(()),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the broker would be unstoppable but for
        // SIGKILL; waiting forever is the honest fallback.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
