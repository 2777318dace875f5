//! The broker process: opens the store, runs until SIGTERM or SIGINT, then
//! shuts down cleanly (flush, checkpoint).

use crate::config::BrokerConfig;
use crate::store::{MessageStore, StoreError};

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// Runs a broker with `config` until a termination signal arrives.
pub async fn run(config: BrokerConfig) -> Result<(), ServerError> {
    let store_cfg = config.store_config();
    let store = tokio::task::spawn_blocking(move || MessageStore::open(store_cfg))
        .await
        .map_err(|e| ServerError::Other(format!("store open task failed: {e}")))??;
    tracing::info!(
        broker = %config.broker_name,
        data_dir = %config.data_dir.display(),
        end_offset = store.max_offset(),
        "broker started"
    );
    wait_for_signal().await;
    tracing::info!("termination signal received; shutting down");
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.shutdown())
        .await
        .map_err(|e| ServerError::Other(format!("store shutdown task failed: {e}")))??;
    Ok(())
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
