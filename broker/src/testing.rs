//! Helpers shared by the broker's own randomized tests (unit and
//! integration); not part of the broker's interface.

use std::path::Path;
use std::time::Duration;

use rand::SeedableRng;

use crate::replication::{ReplicationConfig, ReplicationManager, ReplicationMode, StartRole};
use crate::store::{MessageStore, StoreConfig};
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
