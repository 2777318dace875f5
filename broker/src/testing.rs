//! Helpers shared by the broker's own randomized tests (unit and
//! integration); not part of the broker's interface.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;

use crate::replication::{ReplicationConfig, ReplicationManager, ReplicationMode, StartRole};
use crate::store::{FlushMode, MessageStore, StoreConfig};
use crate::write_path::WritePath;

/// A random generator seeded from `KEELMQ_TEST_SEED` when set, otherwise
/// from a fresh random seed; the seed is printed so a failure can be
/// repeated.
pub fn seeded_rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("KEELMQ_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set KEELMQ_TEST_SEED to repeat)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A store in `dir` (1 MiB segments) and the write path of a lone master
/// over it, opening no socket.
pub fn lone_master(dir: &Path) -> (MessageStore, WritePath) {
    lone_master_with(dir, ReplicationMode::Async, Duration::from_secs(1))
}

/// As [`lone_master`], replicating in `mode` with `sync_timeout` (under
/// SYNC, with no slave, every write is appended and then fails after it).
pub fn lone_master_with(
    dir: &Path,
    mode: ReplicationMode,
    sync_timeout: Duration,
) -> (MessageStore, WritePath) {
    let mut cfg = StoreConfig::new(dir);
    cfg.segment_size = 1 << 20;
    let store = MessageStore::open(cfg).expect("store");
    let repl = ReplicationManager::open(
        replication_config(dir, mode, sync_timeout, StartRole::Master),
        store.clone(),
    )
    .expect("replication");
    (store.clone(), WritePath::new(store, repl))
}

/// A replication configuration for a broker in `dir` that listens on an
/// ephemeral loopback port and advertises nothing reachable.
pub fn replication_config(
    dir: &Path,
    mode: ReplicationMode,
    sync_timeout: Duration,
    start_role: StartRole,
) -> ReplicationConfig {
    ReplicationConfig {
        broker_id: "b0".into(),
        mode,
        min_in_sync_replicas: 1,
        sync_timeout,
        in_sync_max_lag_bytes: 1 << 20,
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertised_replication: "127.0.0.1:0".into(),
        advertised_admin: "127.0.0.1:0".into(),
        advertised_client: "127.0.0.1:0".into(),
        data_dir: dir.to_owned(),
        start_role,
        slave_flush_before_ack: false,
    }
}

/// A store configuration for tests in `dir`: ASYNC_FLUSH, segments of
/// `segment_size` bytes, and no disk limits (retention and the full-disk
/// check would react to how full the machine's disk happens to be).
pub fn async_store_config(dir: &Path, segment_size: u64) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = segment_size;
    c.flush_mode = FlushMode::AsyncFlush;
    c.disk_high_watermark = 1.0;
    c.disk_full_ratio = 1.0;
    c
}

/// The replication side of a broker in a group run inside one test
/// process: binds an ephemeral loopback port, opens `store`'s replication
/// with `cfg` listening on and advertising that port (see
/// [`replication_config`] for the rest), and serves slaves there until
/// `shutdown`. Returns the manager and its replication address.
pub async fn serve_replication(
    store: &MessageStore,
    mut cfg: ReplicationConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Arc<ReplicationManager>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let listen = listener.local_addr().expect("addr");
    cfg.listen = listen;
    cfg.advertised_replication = listen.to_string();
    let repl = ReplicationManager::open(cfg, store.clone()).expect("replication");
    let r = repl.clone();
    tokio::spawn(async move { r.serve_listener(listener, shutdown).await });
    (repl, listen.to_string())
}

/// Flips the last byte of record `a` (its body's last byte) in its segment
/// file on disk, as a bad disk would: its checksum then fails.
#[cfg(test)]
pub fn corrupt_on_disk(store: &MessageStore, a: &crate::store::Appended) {
    use std::os::unix::fs::FileExt;
    let seg = store.config().segment_size;
    let path = crate::store::segment_path(&store.config().data_dir, seg, a.offset);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("segment");
    let at = a.end_offset - 1 - a.offset / seg * seg;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0xff], at).expect("damage");
}

/// A power loss: the store in `dir` loses everything from commit-log
/// offset `keep` on, as when the last flush under ASYNC_FLUSH reached only
/// there, while the metadata (the stored progress marks with it), saved on
/// its own schedule, was saved after. Returns the store and the write path
/// of a lone master as they reopen.
#[cfg(test)]
pub fn power_loss(dir: &Path, store: &MessageStore, keep: u64) -> (MessageStore, WritePath) {
    use std::os::unix::fs::FileExt;
    let (end, seg) = (store.max_offset(), store.config().segment_size);
    assert_eq!(
        keep / seg,
        (end - 1) / seg,
        "the lost tail is in one segment"
    );
    // Saves the metadata, as the checkpoint thread would have.
    store.shutdown().expect("shutdown");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(crate::store::segment_path(dir, seg, keep))
        .expect("segment");
    f.write_all_at(&vec![0u8; (end - keep) as usize], keep % seg)
        .expect("lose the tail");
    // The last checkpoint saw the log flushed to `keep`, and the broker
    // never stopped cleanly (the store's checkpoint file).
    let cp = crate::store::Checkpoint {
        flushed_offset: keep,
        cq_offset: keep,
        clean: false,
        written_ms: crate::store::now_ms(),
    };
    crate::store::save_json(&dir.join("checkpoint.json"), &cp).expect("checkpoint");
    let reopened = lone_master(dir);
    assert_eq!(reopened.0.max_offset(), keep, "the tail is gone");
    reopened
}

/// What a log subscriber writes, kept for a test to read (the broker's and
/// the operator's telemetry tests).
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}
