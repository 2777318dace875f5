//! The operator's HTTP port: `/healthz` (the process runs), `/readyz` (it
//! serves; a leader only once its controllers run, a standby waiting for
//! the Lease at once) and `/metrics` (OpenMetrics text, as the broker's).
//!
//! A standby replica is ready: it does what it should (wait for the Lease),
//! and a Deployment with more than one replica, or a rolling update, needs
//! its pods ready to be Available. Which replica leads is the gauge
//! `keelmq_operator_leader` on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// The content type of `/metrics`: prometheus-client writes OpenMetrics
/// text (`# EOF`, counters' `_total` samples), so it is labelled as such,
/// the same as the broker's `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to expose; also says whether this process leads.
    pub metrics: Arc<Metrics>,
    /// True while the controllers run (`Context::controllers_running`).
    pub controllers_running: Arc<AtomicBool>,
}

/// The routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `/readyz`'s answer: ready unless this process leads and its controllers
/// do not run (yet, or any more).
pub fn readiness(leading: bool, controllers_running: bool) -> (StatusCode, &'static str) {
    match (leading, controllers_running) {
        (false, _) => (StatusCode::OK, "ready: standing by for the leader Lease\n"),
        (true, true) => (StatusCode::OK, "ready: leading; controllers running\n"),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "leading, but the controllers do not run yet\n",
        ),
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    readiness(
        s.metrics.is_leader(),
        s.controllers_running.load(Ordering::Acquire),
    )
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        s.metrics.encode(),
    )
}

/// Serves until the process ends.
pub async fn serve(port: u16, state: HttpState) -> std::io::Result<()> {
    let listener = bind_any(port).await?;
    tracing::info!(address = ?listener.local_addr().ok(), "serving /healthz, /readyz and /metrics");
    serve_on(listener, state).await
}

/// Binds `port` on every address: `[::]`, which on Linux also takes IPv4
/// (so IPv4, IPv6 and dual-stack clusters can all probe and scrape), or
/// `0.0.0.0` where the pod has no IPv6.
pub async fn bind_any(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match tokio::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
        Ok(l) => Ok(l),
        Err(e) => {
            tracing::info!(error = %e, port, "no IPv6 listener; listening on IPv4 only");
            tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await
        }
    }
}

/// Serves on a bound listener until the process ends.
pub async fn serve_on(listener: tokio::net::TcpListener, state: HttpState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One HTTP/1.1 GET on a fresh connection: (status line, headers and body).
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        conn.read_to_string(&mut out).await.expect("read");
        out
    }

    /// Serves `state` on a free local port: (its address, the server task).
    async fn start(
        state: HttpState,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, tokio::spawn(serve_on(listener, state)))
    }

    #[tokio::test]
    async fn standby_is_ready_leader_once_its_controllers_run() {
        let metrics = Arc::new(Metrics::default());
        let running = Arc::new(AtomicBool::new(false));
        let (addr, server) = start(HttpState {
            metrics: metrics.clone(),
            controllers_running: running.clone(),
        })
        .await;
        let status = |text: &str| text.lines().next().unwrap_or_default().to_string();

        // A standby (waiting for the Lease): ready, leader gauge 0.
        let r = get(addr, "/readyz").await;
        assert!(status(&r).contains("200"), "{r}");
        assert!(r.contains("standing by"), "{r}");
        let m = get(addr, "/metrics").await;
        assert!(m.contains("keelmq_operator_leader 0"), "{m}");

        // Leading, controllers not started: not ready.
        metrics.set_leader(true);
        let r = get(addr, "/readyz").await;
        assert!(status(&r).contains("503"), "{r}");
        // Leading with the controllers running: ready, gauge 1.
        running.store(true, Ordering::Release);
        let r = get(addr, "/readyz").await;
        assert!(status(&r).contains("200"), "{r}");
        let m = get(addr, "/metrics").await;
        assert!(m.contains("keelmq_operator_leader 1"), "{m}");

        assert!(get(addr, "/healthz").await.contains("200"));
        server.abort();
    }

    #[tokio::test]
    async fn metrics_are_labelled_openmetrics_like_the_brokers() {
        let (addr, server) = start(HttpState {
            metrics: Arc::new(Metrics::default()),
            controllers_running: Arc::new(AtomicBool::new(false)),
        })
        .await;
        let r = get(addr, "/metrics").await;
        let content_type = r
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default();
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(r.trim_end().ends_with("# EOF"), "OpenMetrics text: {r}");
        server.abort();
    }

    #[tokio::test]
    async fn the_listener_takes_ipv4_and_where_the_host_has_it_ipv6() {
        let listener = bind_any(0).await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(serve_on(
            listener,
            HttpState {
                metrics: Arc::new(Metrics::default()),
                controllers_running: Arc::new(AtomicBool::new(true)),
            },
        ));
        let v4 = get(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            "/healthz",
        )
        .await;
        assert!(v4.starts_with("HTTP/1.1 200"), "{v4}");
        // Loopback IPv6 only where this host has it (a test host may not).
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            let v6 = get(
                std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                "/healthz",
            )
            .await;
            assert!(v6.starts_with("HTTP/1.1 200"), "{v6}");
        }
        server.abort();
    }
}
