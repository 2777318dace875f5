//! Slave reads: a master reads the records it hands to consumers from a
//! slave's commit log instead of its own, when they are far behind the head
//! of the log (no longer likely to be in the master's page cache, so reading
//! them would evict the recent data producers and fresh consumers need), or
//! always when configured so.
//!
//! Only the reading moves. Which messages a group is handed, their receipt
//! handles, invisible times, acks and offsets stay with the master, so
//! consumers see one consistent state wherever the bytes came from. A slave
//! serves a read only while it follows the master's epoch and durably holds
//! every requested record; the master checks each record's CRC and its
//! topic, queue and queue offset against its own consume queue. When no
//! slave can serve a read, or one fails, the master reads the records itself:
//! a slave read never fails a receive.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keelmq_proto::admin as pb;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use super::consumer::Claimed;
use crate::replication::{ReplicationManager, Role};
use crate::store::{MessageStore, StoreError, StoredRecord, decode_entry};

/// How long a master waits for a slave's records before reading them itself.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest read a slave serves in one request.
pub const MAX_READ_RECORDS: usize = 1024;
pub const MAX_READ_BYTES: u64 = 64 << 20;

/// When a master reads consumers' messages from a slave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlaveReadMode {
    /// Never: the master reads everything itself.
    Off,
    /// When the record is further behind the head of the log than the
    /// threshold (by default 40 % of the memory the broker may use).
    #[default]
    Auto,
    /// Every read goes to an in-sync slave when one holds the records.
    Always,
}

impl std::fmt::Display for SlaveReadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SlaveReadMode::Off => "off",
            SlaveReadMode::Auto => "auto",
            SlaveReadMode::Always => "always",
        })
    }
}

/// Counters of slave reads, kept by both sides.
#[derive(Debug, Default)]
pub struct SlaveReadStats {
    /// Master: records read from a slave.
    pub read_from_slaves: AtomicU64,
    /// Master: records meant for a slave but read locally.
    pub fallbacks: AtomicU64,
    /// Slave: records served to the master.
    pub served_to_master: AtomicU64,
}

impl SlaveReadStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The memory this process may use: physical memory, or the cgroup's limit
/// when that is lower (a container).
pub fn memory_limit_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let physical = if pages > 0 && page > 0 {
        (pages as u64).saturating_mul(page as u64)
    } else {
        8 << 30
    };
    [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|t| t.trim().parse::<u64>().ok())
    .fold(physical, u64::min)
}

/// The master's side: decides which records to read from a slave and reads them.
pub struct SlaveReads {
    mode: SlaveReadMode,
    /// Auto mode: records further than this many bytes behind the head.
    threshold: u64,
    store: MessageStore,
    replication: Arc<ReplicationManager>,
    stats: Arc<SlaveReadStats>,
    clients: Mutex<HashMap<String, BrokerAdminClient<Channel>>>,
    turn: AtomicU64,
}

impl SlaveReads {
    pub fn new(
        mode: SlaveReadMode,
        threshold: u64,
        store: MessageStore,
        replication: Arc<ReplicationManager>,
        stats: Arc<SlaveReadStats>,
    ) -> Self {
        Self {
            mode,
            threshold,
            store,
            replication,
            stats,
            clients: Mutex::new(HashMap::new()),
            turn: AtomicU64::new(0),
        }
    }

    /// The records of `claimed` (of `topic`), in order: from a slave for
    /// those the mode steers there, from this broker's store otherwise.
    pub async fn read(
        &self,
        topic: &str,
        claimed: &[Claimed],
    ) -> Vec<Result<Option<StoredRecord>, StoreError>> {
        let local = |c: &Claimed| {
            self.store
                .get_entry(topic, c.queue_id, c.queue_offset, c.location)
        };
        let steered = self.steer(claimed);
        if steered.is_empty() {
            // The common case: nothing far behind, no slave involved.
            return claimed.iter().map(local).collect();
        }
        let mut remote: Vec<Option<StoredRecord>> = vec![None; claimed.len()];
        let wanted: Vec<Claimed> = steered.iter().map(|&i| claimed[i]).collect();
        match self.read_remote(topic, &wanted).await {
            Ok(records) => {
                self.stats
                    .read_from_slaves
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                for (&i, r) in steered.iter().zip(records) {
                    remote[i] = Some(r);
                }
            }
            Err(why) => {
                self.stats
                    .fallbacks
                    .fetch_add(wanted.len() as u64, Ordering::Relaxed);
                tracing::debug!(topic, records = wanted.len(), reason = %why, "slave read not possible; reading locally");
            }
        }
        claimed
            .iter()
            .zip(remote)
            .map(|(c, r)| match r {
                Some(r) => Ok(Some(r)),
                None => local(c),
            })
            .collect()
    }

    /// Indices of the claimed messages to read from a slave.
    fn steer(&self, claimed: &[Claimed]) -> Vec<usize> {
        if self.mode == SlaveReadMode::Off || self.replication.role() != Role::Master {
            return Vec::new();
        }
        let head = self.store.max_offset();
        (0..claimed.len())
            .filter(|&i| {
                self.mode == SlaveReadMode::Always
                    || head.saturating_sub(claimed[i].location.offset) > self.threshold
            })
            .collect()
    }

    async fn read_remote(
        &self,
        topic: &str,
        wanted: &[Claimed],
    ) -> Result<Vec<StoredRecord>, String> {
        if wanted.len() > MAX_READ_RECORDS {
            return Err(format!("{} records in one read", wanted.len()));
        }
        let end = wanted
            .iter()
            .map(|c| c.location.offset + u64::from(c.location.size))
            .max()
            .unwrap_or(0);
        let status = self.replication.status();
        let able: Vec<String> = status
            .slaves
            .iter()
            .filter(|s| s.connected && s.in_sync && s.acked_offset >= end)
            .filter(|s| !s.admin_address.is_empty())
            .map(|s| s.admin_address.clone())
            .collect();
        if able.is_empty() {
            return Err("no connected in-sync slave holds the records yet".into());
        }
        let address = &able[self.turn.fetch_add(1, Ordering::Relaxed) as usize % able.len()];
        let mut client = self.client(address)?;
        let request = pb::ReadRecordsRequest {
            epoch: status.epoch,
            locations: wanted
                .iter()
                .map(|c| pb::RecordLocation {
                    offset: c.location.offset,
                    size: c.location.size,
                })
                .collect(),
        };
        let reply = match client.read_records(request).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                // Connect afresh next time: the slave may have restarted.
                self.clients.lock().remove(address);
                return Err(format!("slave {address}: {}", e.message()));
            }
        };
        if reply.records.len() != wanted.len() {
            return Err(format!(
                "slave {address} returned {} records for {}",
                reply.records.len(),
                wanted.len()
            ));
        }
        wanted
            .iter()
            .zip(reply.records)
            .map(|(c, bytes)| {
                if bytes.len() != c.location.size as usize {
                    return Err(format!(
                        "slave {address} returned {} bytes for the {}-byte record at {}",
                        bytes.len(),
                        c.location.size,
                        c.location.offset
                    ));
                }
                decode_entry(&bytes, topic, c.queue_id, c.queue_offset, c.location.offset)
                    .map_err(|e| format!("slave {address}: {e}"))
            })
            .collect()
    }

    fn client(&self, address: &str) -> Result<BrokerAdminClient<Channel>, String> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("slave address {address:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(READ_TIMEOUT)
            .connect_lazy();
        let client = BrokerAdminClient::new(channel).max_decoding_message_size(
            usize::try_from(MAX_READ_BYTES).unwrap_or(usize::MAX) + (1 << 20),
        );
        clients.insert(address.to_owned(), client.clone());
        Ok(client)
    }
}

/// The slave's side of a read: the stored bytes of each requested record,
/// when this broker is a slave of `epoch` and holds them all.
pub fn serve_read(
    store: &MessageStore,
    replication: &ReplicationManager,
    stats: &SlaveReadStats,
    request: &pb::ReadRecordsRequest,
) -> Result<Vec<bytes::Bytes>, tonic::Status> {
    if replication.role() != Role::Slave {
        return Err(tonic::Status::failed_precondition(
            "only a slave serves record reads",
        ));
    }
    // The epoch of the master this slave follows (its own log may not hold
    // a record of that epoch yet).
    let epoch = replication.fence_epoch();
    if epoch != request.epoch {
        return Err(tonic::Status::failed_precondition(format!(
            "this slave follows epoch {epoch}, not {}",
            request.epoch
        )));
    }
    let total: u64 = request.locations.iter().map(|l| u64::from(l.size)).sum();
    if request.locations.len() > MAX_READ_RECORDS || total > MAX_READ_BYTES {
        return Err(tonic::Status::invalid_argument(format!(
            "a read is limited to {MAX_READ_RECORDS} records and {MAX_READ_BYTES} bytes"
        )));
    }
    let records = request
        .locations
        .iter()
        .map(|l| store.record_bytes(l.offset, l.size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tonic::Status::out_of_range(e.to_string()))?;
    stats
        .served_to_master
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    Ok(records)
}
