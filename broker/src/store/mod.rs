//! The broker's storage: one commit log, consume queues derived from it,
//! flushing (group commit or interval), crash recovery, retention and the
//! small metadata files.
//!
//! [`MessageStore`] is the one handle the rest of the broker uses. Appends
//! are serialised by one lock; readers never take it. Under ASYNC_FLUSH an
//! append writes straight into the mapped tail segment and is readable when
//! it returns. Under SYNC_FLUSH it is encoded into a staging buffer, and the
//! flusher thread writes each group of staged records, publishes them and
//! flushes them: they are readable once written, before the flush.
//! Durability is reported through [`MessageStore::wait_flushed`], which a
//! SYNC_FLUSH broker awaits before acknowledging and an ASYNC_FLUSH broker
//! does not.

mod commit_log;
mod consume_queue;
pub mod group_config;
mod mapped;
mod metadata;
pub mod record;
mod recovery;
mod signal;
mod staging;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

pub use commit_log::{FsUsage, FsUsageFn, fs_usage, fs_used_ratio};
pub use consume_queue::CqEntry;
pub use mapped::{persist_atomically, sync_dir};
pub use metadata::{
    GroupOffset, MAX_QUEUES, MessageType, Metadata, MetadataSnapshot, TopicConfig, load_json,
    save_json,
};
pub use record::{Appended, NewRecord, Properties, StoredRecord, keys, now_ms};
pub use signal::PublishSignal;

use commit_log::{CommitLog, GrowthLimits, Tail, Writes};
use consume_queue::{ConsumeQueue, CqSlot};
use record::{RECORD_MAGIC, encode_into, tag_hash};
use staging::Staged;

/// When an append counts as durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FlushMode {
    /// Acknowledge after an fdatasync covered the record; concurrent
    /// appends share one fdatasync (group commit).
    SyncFlush,
    /// Acknowledge after the write to the page cache; flush on an interval.
    #[default]
    AsyncFlush,
}

impl std::fmt::Display for FlushMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlushMode::SyncFlush => "SYNC_FLUSH",
            FlushMode::AsyncFlush => "ASYNC_FLUSH",
        })
    }
}

/// Storage settings. Defaults are documented on each field and in the README.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Directory holding the commit log, consume queues and metadata.
    pub data_dir: PathBuf,
    /// Size of each commit-log segment file. Default 1 GiB; at least 64 KiB
    /// and a multiple of 4 KiB. Must not change for an existing log.
    pub segment_size: u64,
    /// SYNC_FLUSH or ASYNC_FLUSH (default).
    pub flush_mode: FlushMode,
    /// ASYNC_FLUSH flush interval. Default 500 ms.
    pub flush_interval: Duration,
    /// How long a SYNC_FLUSH append waits for its fdatasync before failing
    /// (noticed up to two tenths of it, at most 200 ms, later). Default 5 s;
    /// at least 1 ms.
    pub flush_timeout: Duration,
    /// SYNC_FLUSH: while flushes are small (8-256 KiB), write zeros about
    /// 1 MiB ahead of the log's end, so records overwrite written blocks
    /// and each fdatasync is cheaper (see `CommitLog::zero_ahead`). Default
    /// on; always off on copy-on-write filesystems (btrfs, ZFS, bcachefs).
    pub zero_ahead: bool,
    /// SYNC_FLUSH: retention keeps up to two of the commit-log files it
    /// takes from the log and makes the next segments of them instead of
    /// creating new ones: flushes then overwrite written blocks, with no
    /// zeros ahead (see `CommitLog::delete_oldest_while`). Spare files are
    /// kept only while the disk is under its high watermark (and the log
    /// under that share of `max_store_bytes`), are deleted first when it
    /// passes it, and at start-up. Default on; always off on copy-on-write
    /// filesystems.
    pub reuse_segments: bool,
    /// SYNC_FLUSH: appends are refused with [`StoreError::Busy`] while the
    /// records staged for the next flush hold more than this many bytes (a
    /// flush that does not return, a stalled disk); a single append is
    /// always taken when nothing is staged. The flusher's buffer of the group
    /// being written is of the same order, so staging holds at most about
    /// twice this. Default 64 MiB.
    pub max_staged_bytes: usize,
    /// Entries per consume-queue file. Default 300,000 (6,000,000 bytes).
    pub cq_entries_per_file: u64,
    /// Segments whose newest record is older than this are deleted.
    /// Default 72 h.
    pub retention: Duration,
    /// Above this fraction of disk use the oldest segments are deleted even
    /// if younger than the retention. Default 0.85.
    pub disk_high_watermark: f64,
    /// At or above this fraction of disk use writes are refused. Default 0.95.
    pub disk_full_ratio: f64,
    /// Optional cap on the bytes of commit-log segments; growing past it is
    /// refused like a full disk, and retention treats
    /// `disk_high_watermark × max_store_bytes` as its high watermark.
    pub max_store_bytes: Option<u64>,
    /// How often consume queues, offsets and the checkpoint are flushed.
    /// Default 1 s.
    pub checkpoint_interval: Duration,
    /// How often retention runs. Default 10 s.
    pub retention_interval: Duration,
    /// Operator's permission to discard the log from this offset on when
    /// recovery finds a corrupt record exactly there.
    pub allow_truncate_at: Option<u64>,
    /// How full the data directory's filesystem is: [`fs_usage`] (statvfs)
    /// by default. Read by retention and before the log grows; tests put a
    /// fixed answer here instead of depending on the machine's disk.
    pub fs_usage: FsUsageFn,
}

impl StoreConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            segment_size: 1 << 30,
            flush_mode: FlushMode::AsyncFlush,
            flush_interval: Duration::from_millis(500),
            flush_timeout: Duration::from_secs(5),
            zero_ahead: true,
            reuse_segments: true,
            max_staged_bytes: 64 << 20,
            cq_entries_per_file: 300_000,
            retention: Duration::from_secs(72 * 3600),
            disk_high_watermark: 0.85,
            disk_full_ratio: 0.95,
            max_store_bytes: None,
            checkpoint_interval: Duration::from_secs(1),
            retention_interval: Duration::from_secs(10),
            allow_truncate_at: None,
            fs_usage,
        }
    }

    /// Checks the settings without opening anything.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |m: String| Err(StoreError::Config(m));
        if self.segment_size < 64 * 1024
            || !self.segment_size.is_multiple_of(4096)
            || self.segment_size > u32::MAX as u64
        {
            return bad(format!(
                "segment size {} must be a multiple of 4096 from 64 KiB to 4 GiB - 4 KiB \
                 (record lengths are 32-bit)",
                self.segment_size
            ));
        }
        if self.max_staged_bytes == 0 {
            return bad("the staging limit must be at least one byte".into());
        }
        if self.cq_entries_per_file == 0 {
            return bad("consume queue files must hold at least one entry".into());
        }
        for (name, v) in [
            ("disk high watermark", self.disk_high_watermark),
            ("disk full ratio", self.disk_full_ratio),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(format!("{name} {v} must be in (0, 1]"));
            }
        }
        if self.disk_high_watermark > self.disk_full_ratio {
            return bad(format!(
                "disk_high_watermark {} is above disk_full_ratio {}: writes would be refused \
                 before early deletion starts freeing space",
                self.disk_high_watermark, self.disk_full_ratio
            ));
        }
        if self.flush_interval.is_zero()
            || self.checkpoint_interval.is_zero()
            || self.retention_interval.is_zero()
        {
            return bad("flush, checkpoint and retention intervals must be positive".into());
        }
        if self.flush_timeout < Duration::from_millis(1) {
            return bad("the flush timeout must be at least 1 ms".into());
        }
        Ok(())
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data at commit log offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error(
        "entry {queue_offset} of the consume queue of {topic}/{queue_id} is damaged and its record was not found in the commit log"
    )]
    DamagedIndex {
        topic: String,
        queue_id: u32,
        queue_offset: u64,
    },
    #[error(
        "the commit log is corrupt at offset {offset} ({reason}); {why}. The broker will not start: \
         nothing past that offset can be trusted. To discard the log from there on, restart with \
         --allow-truncate-at {offset} (records at and after it are lost)"
    )]
    RefuseToStart {
        offset: u64,
        reason: String,
        why: String,
    },
    #[error(
        "disk full: {0}; writes are refused until space is freed (retention or a larger volume)"
    )]
    DiskFull(String),
    #[error("record of {size} bytes is larger than the {max} bytes a segment can hold")]
    RecordTooLarge { size: u64, max: u64 },
    #[error("invalid name {0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("offset {offset} is outside the log [{min}, {max})")]
    OutOfRange { offset: u64, min: u64, max: u64 },
    #[error("append at offset {got} does not continue the log, which ends at {expected}")]
    OffsetMismatch { expected: u64, got: u64 },
    #[error("offset {offset} was not flushed within {waited:?}")]
    FlushTimeout { offset: u64, waited: Duration },
    #[error(
        "the commit log could not be written or flushed ({0}); the broker refuses writes until restarted"
    )]
    FlushFailed(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "the commit log was cut while the record at offset {offset} waited for its flush \
         (this broker now follows another master); the record is gone"
    )]
    Truncated { offset: u64 },
    /// Nothing was written: too much is waiting for the disk; retry later.
    #[error("store busy: {0}; nothing was written, retry later")]
    Busy(String),
    #[error("the store is shut down")]
    Closed,
}

impl StoreError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

/// What recovery left on disk at the last checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// Everything below this commit-log offset had been flushed.
    pub flushed_offset: u64,
    /// Consume-queue entries of every record below this offset had been flushed.
    pub cq_offset: u64,
    /// The broker stopped cleanly after writing this checkpoint.
    pub clean: bool,
    /// When the checkpoint was written (ms since the Unix epoch).
    pub written_ms: i64,
}

/// How the last start went: reported in status and logs.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub clean_shutdown: bool,
    pub scanned_from: u64,
    pub end: u64,
    pub records_scanned: u64,
    pub truncated_bytes_at: Option<u64>,
    pub rebuilt_consume_queues: bool,
    /// Bytes recovery read past where the scan stopped, looking for records
    /// of the log there (see the `recovery` module).
    pub searched_bytes: u64,
    pub elapsed: Duration,
}

/// A cheap, cloneable handle to the store.
#[derive(Clone)]
pub struct MessageStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: StoreConfig,
    store_id: String,
    clog: CommitLog,
    cq_dir: PathBuf,
    /// topic → consume queue per queue id.
    cqs: RwLock<HashMap<String, Vec<Option<Arc<ConsumeQueue>>>>>,
    /// The write position; holding it is holding the append lock.
    tail: Mutex<Tail>,
    /// Held while staged records are written and published (SYNC_FLUSH),
    /// so that they reach the log in order; taken before `tail`.
    commit_lock: Mutex<()>,
    /// Notified whenever records become readable.
    published: Arc<PublishSignal>,
    /// Consume-queue entries of every record below this offset are written.
    dispatched: AtomicU64,
    /// Consume-queue entries of every record below this offset are durable
    /// (what the checkpoint's `cq_offset` may claim). Raised only after a
    /// flush of the queues, to `dispatched` as read before it; lowered by a cut.
    cq_flushed: Mutex<u64>,
    /// Times the log was cut ([`MessageStore::truncate_to`],
    /// [`MessageStore::restart_at`]) since the store opened.
    cuts: AtomicU64,
    flushed: AtomicU64,
    flush_lock: Mutex<()>,
    flush_watch: tokio::sync::watch::Sender<u64>,
    /// Periods the flush watchdog has looked since the store opened: the
    /// clock of durability waits, which read it instead of the time.
    watch_ticks: AtomicU64,
    /// Ticks after which a durability wait has certainly waited the flush
    /// timeout (see `MessageStore::wait_durable`).
    timeout_ticks: u64,
    flush_cv: Condvar,
    flush_cv_lock: Mutex<()>,
    flush_failed: Mutex<Option<String>>,
    flusher: std::sync::OnceLock<Thread>,
    /// Appends ever staged (SYNC_FLUSH); counted under the append lock.
    staged_appends: AtomicU64,
    /// `staged_appends` when the last flush released its waiters.
    staged_at_release: AtomicU64,
    /// fdatasync calls on the commit log.
    flushes: AtomicU64,
    /// Nanoseconds spent in them.
    flush_nanos: AtomicU64,
    /// Staged (SYNC_FLUSH) appends written to the log.
    group_appends: AtomicU64,
    /// While the flusher gathers a group it is woken only when
    /// `staged_appends` reaches this; 0 otherwise (every append wakes it).
    gather_until: AtomicU64,
    /// Set once a flush failed: cheap to check on every append.
    failed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
    stopped: AtomicBool,
    metadata: Metadata,
    last_checkpoint: Mutex<Checkpoint>,
    recovery: RecoveryReport,
    /// The data directory lock, released at shutdown.
    lock: Mutex<Option<File>>,
}

/// See [`MessageStore::flush_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushCounts {
    /// fdatasync calls on the commit log since the store opened.
    pub flushes: u64,
    /// Time spent in them: over an interval, its growth divided by the
    /// interval is the share of the time the log was being flushed, and
    /// divided by the growth of `flushes` the mean flush time.
    pub flush_time: Duration,
    /// Appends (one record or one batch each) written to the log by
    /// SYNC_FLUSH group commits since the store opened.
    pub group_appends: u64,
    /// Bytes of zeros written ahead of the SYNC_FLUSH writer (extra disk
    /// writes that make its flushes cheaper; see `CommitLog::zero_ahead`).
    pub zeroed_ahead_bytes: u64,
    /// Segments made of files retention took from the log since the store
    /// opened (see [`StoreConfig::reuse_segments`]).
    pub reused_segments: u64,
}

const CHECKPOINT: &str = "checkpoint.json";

/// The longest the SYNC_FLUSH flusher waits for the callers its last flush
/// released to append again (see `flush_loop`).
const MAX_GATHER: Duration = Duration::from_millis(1);

/// A damaged consume-queue entry is searched for between the nearest
/// sound entries at most this many entries away on either side...
const REPAIR_NEIGHBOURS: u64 = 16;
/// ...in at most this much of the commit log.
const REPAIR_MAX_SCAN: u64 = 256 << 20;

/// Decodes (CRC-checked) the record stored at commit-log `offset` and
/// checks it is message `queue_offset` of `topic`/`queue_id`, as the consume
/// queue said: a mismatch is corruption, never a message.
pub fn decode_entry(
    bytes: &[u8],
    topic: &str,
    queue_id: u32,
    queue_offset: u64,
    offset: u64,
) -> Result<StoredRecord, StoreError> {
    let rec = record::decode(bytes, offset)?;
    if rec.topic != topic || rec.queue_id != queue_id || rec.queue_offset != queue_offset {
        return Err(StoreError::Corrupt {
            offset,
            reason: format!(
                "consume queue {topic}/{queue_id} entry {queue_offset} points at a record of {}/{} entry {}",
                rec.topic, rec.queue_id, rec.queue_offset
            ),
        });
    }
    Ok(rec)
}

impl MessageStore {
    /// Opens the store in `config.data_dir`, recovering from a crash if the
    /// last run did not stop cleanly, and starts the background threads.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        let lock = lock_data_dir(&dir)?;
        let store_id = load_or_create_store_id(&dir)?;
        let metadata = Metadata::open(&dir.join("config"))?;
        let full_ratio = config.disk_full_ratio;
        let clog = CommitLog::open(
            &dir.join("commitlog"),
            config.segment_size,
            GrowthLimits {
                max_bytes: config.max_store_bytes,
                full_ratio,
                writes: match config.flush_mode {
                    FlushMode::SyncFlush => Writes::ThroughFile,
                    FlushMode::AsyncFlush => Writes::ThroughMapping,
                },
                zero_ahead: zero_ahead_enabled(&config),
                reuse_segments: reuse_segments_enabled(&config),
                fs_usage: config.fs_usage,
            },
        )?;
        let checkpoint: Option<Checkpoint> = match std::fs::read(dir.join(CHECKPOINT)) {
            Ok(b) => serde_json::from_slice(&b).ok(),
            Err(_) => None,
        };
        let cq_dir = dir.join("consumequeue");
        let recovered = recovery::recover(&config, &clog, &cq_dir, checkpoint.as_ref())?;
        let end = recovered.report.end;
        let tail = clog.tail_at(end)?;
        let (flush_watch, _) = tokio::sync::watch::channel(end);
        // A wait starts at most one tick after the count it read, and ticks
        // are at least a period apart.
        let timeout_ticks = config
            .flush_timeout
            .as_nanos()
            .div_ceil(watchdog_period(config.flush_timeout).as_nanos())
            as u64
            + 1;
        let inner = Arc::new(Inner {
            store_id,
            clog,
            cq_dir,
            cqs: RwLock::new(recovered.queues),
            tail: Mutex::new(tail),
            commit_lock: Mutex::new(()),
            published: Arc::new(PublishSignal::default()),
            dispatched: AtomicU64::new(end),
            // Recovery flushed every queue entry it kept.
            cq_flushed: Mutex::new(end),
            cuts: AtomicU64::new(0),
            flushed: AtomicU64::new(end),
            flush_lock: Mutex::new(()),
            flush_watch,
            watch_ticks: AtomicU64::new(0),
            timeout_ticks,
            flush_cv: Condvar::new(),
            flush_cv_lock: Mutex::new(()),
            flush_failed: Mutex::new(None),
            flusher: std::sync::OnceLock::new(),
            staged_appends: AtomicU64::new(0),
            staged_at_release: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush_nanos: AtomicU64::new(0),
            group_appends: AtomicU64::new(0),
            gather_until: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            metadata,
            last_checkpoint: Mutex::new(Checkpoint::default()),
            recovery: recovered.report,
            config,
            lock: Mutex::new(Some(lock)),
        });
        let store = MessageStore { inner };
        store.clamp_consumer_offsets();
        store.write_checkpoint(false)?;
        store.inner.clog.start_preparer();
        store.start_threads()?;
        let r = &store.inner.recovery;
        tracing::info!(
            data_dir = %dir.display(),
            flush_mode = %store.inner.config.flush_mode,
            clean_shutdown = r.clean_shutdown,
            min_offset = store.min_offset(),
            end = r.end,
            scanned_from = r.scanned_from,
            records_scanned = r.records_scanned,
            rebuilt_consume_queues = r.rebuilt_consume_queues,
            searched_bytes = r.searched_bytes,
            elapsed_ms = r.elapsed.as_millis() as u64,
            "store opened"
        );
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub fn flush_mode(&self) -> FlushMode {
        self.inner.config.flush_mode
    }

    /// Identifies this data directory; a new one (empty disk) gets a new id.
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// Brings consumer offsets past the end of their queue back to it, and
    /// returns how many there were. They arise when messages a group had
    /// consumed are gone: the tail an ASYNC_FLUSH crash lost (offsets are
    /// saved on their own schedule), or, on a slave being promoted, messages
    /// the old master served before any slave held them (offsets replicate
    /// apart from the log). The queue goes on from its end; left as they
    /// were, the offsets would skip the messages stored next. Called at open
    /// and at promotion, before anything new is appended.
    pub fn clamp_consumer_offsets(&self) -> usize {
        let metadata = &self.inner.metadata;
        let mut clamped = 0;
        for o in metadata.list_offsets() {
            let end = self.queue_max_offset(&o.topic, o.queue_id);
            if o.offset <= end {
                continue;
            }
            tracing::warn!(
                group = %o.group,
                topic = %o.topic,
                queue = o.queue_id,
                committed = o.offset,
                queue_end = end,
                "consumer offset past the end of its queue (the messages in between are gone); continuing from the end"
            );
            metadata.commit_offset(&o.group, &o.topic, o.queue_id, end);
            if metadata
                .dispatched(&o.group, &o.topic, o.queue_id)
                .is_some_and(|d| d > end)
            {
                metadata.mark_dispatched(&o.group, &o.topic, o.queue_id, end);
            }
            clamped += 1;
        }
        clamped
    }

    /// First readable commit-log offset.
    pub fn min_offset(&self) -> u64 {
        self.inner.clog.min_offset()
    }

    /// The log's write position: the end of everything appended, SYNC_FLUSH
    /// appends still staged for the flusher (not yet readable) included.
    pub fn appended_end(&self) -> u64 {
        self.inner.tail.lock().pos
    }

    /// End of the commit log.
    pub fn max_offset(&self) -> u64 {
        self.inner.clog.max_offset()
    }

    /// Everything below this offset is in the consume queues too (the
    /// commit log's end is published first, then the queue entries).
    pub fn indexed_offset(&self) -> u64 {
        self.inner.dispatched.load(Ordering::Acquire)
    }

    /// Everything below this offset is durable.
    pub fn flushed_offset(&self) -> u64 {
        self.inner.flushed.load(Ordering::Acquire)
    }

    /// Whether the store holds no records at all (a new or wiped disk).
    pub fn is_empty(&self) -> bool {
        self.max_offset() == 0
    }

    /// Appends one record; see [`MessageStore::append_batch`].
    pub fn append(&self, record: NewRecord) -> Result<Appended, StoreError> {
        let mut out = None;
        self.append_records(std::slice::from_ref(&record), now_ms(), |a| out = Some(a))?;
        out.ok_or_else(|| StoreError::InvalidArgument("empty append".into()))
    }

    /// Appends records contiguously (all in one segment) and returns where
    /// they went. Under ASYNC_FLUSH they are readable at once; under
    /// SYNC_FLUSH once the flusher has written them, at the latest when
    /// [`MessageStore::wait_flushed`] returns, which tells they are durable.
    pub fn append_batch(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, StoreError> {
        self.append_batch_at(records, now_ms())
    }

    /// [`MessageStore::append_batch`] with the store timestamp given (tests
    /// of time-based behaviour use it).
    #[doc(hidden)]
    pub fn append_batch_at(
        &self,
        records: Vec<NewRecord>,
        store_ms: i64,
    ) -> Result<Vec<Appended>, StoreError> {
        let mut out = Vec::with_capacity(records.len());
        self.append_records(&records, store_ms, |a| out.push(a))?;
        Ok(out)
    }

    fn append_records(
        &self,
        records: &[NewRecord],
        store_ms: i64,
        mut done: impl FnMut(Appended),
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Err(StoreError::InvalidArgument("empty append".into()));
        }
        let mut lens: SmallVec<[usize; 1]> = SmallVec::with_capacity(records.len());
        for r in records {
            r.validate()?;
            lens.push(r.encoded_len());
        }
        let total: usize = lens.iter().sum();
        let inner = &self.inner;
        let mut tail = inner.tail.lock();
        self.check_writable()?;
        let staged = tail.staged.byte_len();
        if staged > 0 && staged + total > inner.config.max_staged_bytes {
            return Err(StoreError::Busy(format!(
                "{staged} bytes of SYNC_FLUSH appends are waiting for the disk to flush \
                 (limit {} bytes)",
                inner.config.max_staged_bytes
            )));
        }
        inner.clog.make_room(&mut tail, total as u64)?;
        // Everything that can fail happens before the first byte is written.
        let mut slots: SmallVec<[(Arc<ConsumeQueue>, CqSlot); 1]> =
            SmallVec::with_capacity(records.len());
        for r in records {
            let cq = match self.queue_for_write(&r.topic, r.queue_id) {
                Ok(cq) => cq,
                Err(e) => {
                    unreserve(&slots);
                    return Err(e);
                }
            };
            let qo = cq.reserve();
            match cq.ensure(qo) {
                Ok(slot) => slots.push((cq, slot)),
                Err(e) => {
                    cq.unreserve_to(qo);
                    unreserve(&slots);
                    return Err(StoreError::Io {
                        context: format!(
                            "creating consume queue file for {}/{}",
                            r.topic, r.queue_id
                        ),
                        source: e,
                    });
                }
            }
        }
        // SYNC_FLUSH encodes into the staging buffer (the flusher writes,
        // publishes and flushes: see the `staging` module); ASYNC_FLUSH
        // straight into the mapped segment, published below.
        let staging = inner.clog.writes() == Writes::ThroughFile;
        let log_cuts = inner.cuts.load(Ordering::Acquire);
        let Tail {
            segment,
            pos,
            staged,
        } = &mut *tail;
        let start = *pos;
        let buf = if staging {
            staged.reserve(segment, start, total)
        } else {
            // SAFETY: the append lock is held and room was made; the bytes
            // are published only below, after they are written.
            unsafe { inner.clog.reserve(segment, start, total) }
        };
        let mut entries: SmallVec<[CqEntry; 1]> = SmallVec::with_capacity(records.len());
        for ((r, &len), (_, slot)) in records.iter().zip(&lens).zip(&slots) {
            let qo = slot.index();
            let offset = *pos;
            let at = (offset - start) as usize;
            encode_into(&mut buf[at..at + len], r, offset, qo, store_ms);
            *pos += len as u64;
            entries.push(CqEntry {
                offset,
                size: len as u32,
                tag_hash: tag_hash(r.properties.get(keys::TAG).map(String::as_str)),
            });
            done(Appended {
                offset,
                end_offset: *pos,
                queue_offset: qo,
                store_ms,
                log_cuts,
            });
        }
        if staging {
            for ((cq, slot), e) in slots.into_iter().zip(entries) {
                staged.push_entry(cq, slot, e);
            }
            let staged_appends = inner.staged_appends.fetch_add(1, Ordering::SeqCst) + 1;
            drop(tail);
            if staged_appends >= inner.gather_until.load(Ordering::SeqCst)
                && let Some(t) = inner.flusher.get()
            {
                t.unpark();
            }
            return Ok(());
        }
        inner.clog.publish(&tail);
        for ((cq, slot), e) in slots.iter().zip(entries) {
            slot.put(e);
            cq.publish(slot.index() + 1);
        }
        inner.dispatched.store(tail.pos, Ordering::Release);
        drop(tail);
        inner.published.notify();
        Ok(())
    }

    /// Writes staged records to the log and publishes them (the caller
    /// holds the commit lock). A failed write latches the store failed, as
    /// a failed flush does: the records' appenders were not acknowledged.
    fn write_staged(&self, staged: &mut Staged) -> Result<(), StoreError> {
        let Some(start) = staged.start() else {
            return Ok(());
        };
        let inner = &self.inner;
        // Everything before the group is durable: say so in its first
        // record, for recovery (see `record::FLUSHED_BEFORE`).
        if self.flushed_offset() >= start {
            staged.mark_first_flushed_before();
        }
        for (segment, at, bytes) in staged.pieces() {
            // SAFETY: the commit lock is held; the range is past the
            // published end and no appender writes there (they stage).
            if let Err(e) = unsafe { inner.clog.write(segment, at, bytes) } {
                let err = StoreError::Io {
                    context: format!("writing to commit log segment at {at}"),
                    source: e,
                };
                self.latch_failure(err.to_string());
                return Err(err);
            }
        }
        inner.clog.publish_to(staged.end());
        for (cq, slot, e) in staged.entries() {
            slot.put(*e);
            cq.publish(slot.index() + 1);
        }
        inner.dispatched.store(staged.end(), Ordering::Release);
        inner
            .group_appends
            .fetch_add(staged.appends() as u64, Ordering::Relaxed);
        inner.published.notify();
        Ok(())
    }

    /// Writes and publishes what is staged now, swapping buffers with
    /// `spare` so appenders go on while the bytes are written; returns how
    /// many appends that was.
    fn commit_staged(&self, spare: &mut Staged) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let _c = inner.commit_lock.lock();
        {
            let mut tail = inner.tail.lock();
            if tail.staged.is_empty() {
                return Ok(0);
            }
            std::mem::swap(&mut tail.staged, spare);
        }
        let appends = spare.appends();
        let written = self.write_staged(spare);
        spare.clear();
        written.map(|()| appends)
    }

    /// Waits, at most `max`, until `staged_appends` reaches `want`: lets the
    /// callers a flush just released append again before the next flush
    /// starts (see `flush_loop`).
    fn gather(&self, want: u64, max: Duration) {
        let inner = &self.inner;
        inner.gather_until.store(want, Ordering::SeqCst);
        let deadline = Instant::now() + max;
        while inner.staged_appends.load(Ordering::SeqCst) < want
            && !inner.stopping.load(Ordering::Acquire)
        {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
        inner.gather_until.store(0, Ordering::SeqCst);
    }

    /// Writes zeros a little ahead of the log's write position after a
    /// SYNC_FLUSH flush of `flushed` bytes (see `CommitLog::zero_ahead`).
    /// Only a speed-up: if it fails, the blocks stay reserved, and a disk
    /// that fails writes fails the next flush too, which is reported.
    fn zero_ahead(&self, flushed: u64) {
        let inner = &self.inner;
        if !inner.clog.zeroes_ahead_after(flushed) {
            return;
        }
        let _c = inner.commit_lock.lock();
        let pos = inner.tail.lock().pos;
        // SAFETY: the commit lock is held and `pos` was read under it.
        if let Err(e) = unsafe { inner.clog.zero_ahead(pos) } {
            tracing::debug!(error = %e, "writing zeros ahead of the commit log failed");
        }
    }

    /// Writes and publishes what is staged, with the append lock held (and
    /// the commit lock, taken before it).
    fn drain_staged_locked(&self, tail: &mut Tail) -> Result<(), StoreError> {
        let written = self.write_staged(&mut tail.staged);
        tail.staged.clear();
        written
    }

    /// Unmaps from the process the pages of the commit log and consume
    /// queues that lie well behind their ends (the maintenance thread does
    /// it every checkpoint interval; the log's writer pages also go as it
    /// grows). The data stays in the files and their page cache.
    pub fn release_mapped_behind(&self) {
        self.inner.clog.release_behind();
        for q in self.all_queues() {
            q.release_behind();
        }
    }

    fn all_queues(&self) -> Vec<Arc<ConsumeQueue>> {
        self.inner
            .cqs
            .read()
            .values()
            .flat_map(|qs| qs.iter().flatten().cloned())
            .collect()
    }

    /// Segments the log holds.
    pub fn segments_held(&self) -> usize {
        self.inner.clog.segments().len()
    }

    /// Segments of the log made of files retention took from it (see
    /// [`StoreConfig::reuse_segments`]).
    pub fn reused_segments(&self) -> usize {
        self.inner
            .clog
            .segments()
            .iter()
            .filter(|s| s.is_reused())
            .count()
    }

    /// Flush counters: under SYNC_FLUSH, `group_appends / flushes` is how
    /// many appends shared each fdatasync (group commit).
    pub fn flush_counts(&self) -> FlushCounts {
        FlushCounts {
            flushes: self.inner.flushes.load(Ordering::Relaxed),
            flush_time: Duration::from_nanos(self.inner.flush_nanos.load(Ordering::Relaxed)),
            group_appends: self.inner.group_appends.load(Ordering::Relaxed),
            zeroed_ahead_bytes: self.inner.clog.zeroed_ahead_bytes(),
            reused_segments: self.inner.clog.segments_made_of_spares(),
        }
    }

    /// Notified each time appended records become readable: after each
    /// append under ASYNC_FLUSH, after each group the flusher writes under
    /// SYNC_FLUSH, after each replicated chunk. The streams to the slaves
    /// wait on it.
    pub fn published_notify(&self) -> Arc<PublishSignal> {
        self.inner.published.clone()
    }

    /// Waits until everything below `offset` is durable when the store runs
    /// SYNC_FLUSH; returns at once under ASYNC_FLUSH.
    pub async fn wait_flushed(&self, offset: u64) -> Result<(), StoreError> {
        if self.inner.config.flush_mode == FlushMode::AsyncFlush {
            return Ok(());
        }
        self.wait_durable(offset).await
    }

    /// [`MessageStore::wait_flushed`] for an append: waits until it is
    /// durable under SYNC_FLUSH, and fails with [`StoreError::Truncated`] if
    /// the log was cut since it was appended (its offsets may now hold
    /// another broker's records), in either mode.
    pub async fn wait_appended(&self, a: &Appended) -> Result<(), StoreError> {
        if self.inner.config.flush_mode != FlushMode::AsyncFlush {
            self.wait_durable(a.end_offset).await?;
        }
        self.check_not_cut(a)
    }

    /// How many times the log was cut (truncated) since the store opened:
    /// records read while it held a count are gone if it differs later. A
    /// cut is counted under the flush lock, before any flush after it, so
    /// a flush seen before the count is read again was seen with the cut.
    pub fn log_cuts(&self) -> u64 {
        self.inner.cuts.load(Ordering::Acquire)
    }

    /// Fails if the log was cut since `a` was appended. Called after its
    /// end was seen flushed: a cut is counted under the flush lock, before
    /// any flush after it, so a flush that followed a cut is never seen
    /// without the cut.
    fn check_not_cut(&self, a: &Appended) -> Result<(), StoreError> {
        if self.inner.cuts.load(Ordering::Acquire) != a.log_cuts {
            return Err(StoreError::Truncated { offset: a.offset });
        }
        Ok(())
    }

    /// Waits until everything below `offset` is durable, whatever the mode.
    /// Fails with [`StoreError::FlushTimeout`] once `flush_timeout` has
    /// passed (noticed within two tenths of it, at most 200 ms late: no
    /// timer is registered and the clock is not read per wait; the flush
    /// watchdog ticks and wakes the waiters while the flushed offset stands
    /// still, see `flush_watchdog`).
    pub async fn wait_durable(&self, offset: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        if self.flushed_offset() >= offset {
            return Ok(());
        }
        let mut rx = inner.flush_watch.subscribe();
        if inner.config.flush_mode == FlushMode::AsyncFlush
            && let Some(t) = inner.flusher.get()
        {
            t.unpark();
        }
        let started = inner.watch_ticks.load(Ordering::Acquire);
        loop {
            if *rx.borrow_and_update() >= offset {
                return Ok(());
            }
            self.check_flush_ok()?;
            let waited = inner.watch_ticks.load(Ordering::Acquire) - started;
            if waited >= inner.timeout_ticks {
                return Err(StoreError::FlushTimeout {
                    offset,
                    waited: inner.config.flush_timeout,
                });
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Closed);
            }
        }
    }

    /// Blocking form of [`MessageStore::wait_flushed`], for threads outside
    /// an async runtime.
    pub fn wait_flushed_blocking(&self, offset: u64) -> Result<(), StoreError> {
        if self.inner.config.flush_mode == FlushMode::AsyncFlush {
            return Ok(());
        }
        let deadline = Instant::now() + self.inner.config.flush_timeout;
        let mut g = self.inner.flush_cv_lock.lock();
        loop {
            if self.flushed_offset() >= offset {
                return Ok(());
            }
            self.check_flush_ok()?;
            if self.inner.flush_cv.wait_until(&mut g, deadline).timed_out()
                && self.flushed_offset() < offset
            {
                return Err(StoreError::FlushTimeout {
                    offset,
                    waited: self.inner.config.flush_timeout,
                });
            }
        }
    }

    /// Flushes everything written so far, now (used by a slave before it
    /// reports an offset as held).
    pub fn flush(&self) -> Result<u64, StoreError> {
        {
            let _c = self.inner.commit_lock.lock();
            let mut tail = self.inner.tail.lock();
            self.check_open()?;
            self.drain_staged_locked(&mut tail)?;
        }
        self.flush_to(self.max_offset())
    }

    /// The record at commit-log offset `offset`.
    pub fn read_at(&self, offset: u64) -> Result<StoredRecord, StoreError> {
        self.inner.clog.with_bytes(offset, |b| {
            if b.len() < 8 || record::le_u32(b, 4) != RECORD_MAGIC {
                return Err(StoreError::InvalidArgument(format!(
                    "no record starts at offset {offset}"
                )));
            }
            let len = record::le_u32(b, 0) as usize;
            if len > b.len() {
                return Err(StoreError::Corrupt {
                    offset,
                    reason: "record runs past the end of the log".into(),
                });
            }
            record::decode(&b[..len], offset)
        })
    }

    /// Message `queue_offset` of a topic-queue, if it exists and has not
    /// been removed by retention. Corrupt bytes are an error, never a message.
    pub fn get(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let Some(e) = self.entry(topic, queue_id, queue_offset)? else {
            return Ok(None);
        };
        self.get_entry(topic, queue_id, queue_offset, e)
    }

    /// The record consume-queue entry `e` (message `queue_offset` of a
    /// topic-queue) points at, unless retention removed it.
    pub fn get_entry(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
        e: CqEntry,
    ) -> Result<Option<StoredRecord>, StoreError> {
        if e.offset < self.min_offset() {
            return Ok(None);
        }
        let err = match self.read_entry(topic, queue_id, queue_offset, e) {
            Ok(r) => return Ok(Some(r)),
            Err(err) => err,
        };
        // The entry may be what is damaged rather than the log.
        match self
            .queue(topic, queue_id)
            .and_then(|q| self.repair_entry(&q, topic, queue_id, queue_offset, &err.to_string()))
        {
            Some(fixed) if fixed != e => self
                .read_entry(topic, queue_id, queue_offset, fixed)
                .map(Some),
            _ => Err(err),
        }
    }

    fn read_entry(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
        e: CqEntry,
    ) -> Result<StoredRecord, StoreError> {
        let bytes = self.inner.clog.read(e.offset, e.size as usize)?;
        decode_entry(&bytes, topic, queue_id, queue_offset, e.offset)
    }

    /// Rewrites entry `queue_offset` of a consume queue from the commit log
    /// after it was found damaged (`why`): the record is searched between
    /// the nearest earlier and later entries that check out. Consume
    /// queues are derived data; a damaged entry must neither hide its
    /// message (a consumer would skip it) nor fail every read of it. Returns
    /// the entry written, or `None` (logged) when the record is not found.
    fn repair_entry(
        &self,
        q: &ConsumeQueue,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
        why: &str,
    ) -> Option<CqEntry> {
        let sound = |i: u64| {
            q.get_stored(i).filter(|e| {
                e.size != 0
                    && e.offset >= self.min_offset()
                    && self.read_entry(topic, queue_id, i, *e).is_ok()
            })
        };
        let from = (1..=REPAIR_NEIGHBOURS)
            .filter_map(|k| queue_offset.checked_sub(k))
            .find_map(sound)
            .map_or(self.min_offset(), |e| e.offset + u64::from(e.size))
            .max(self.min_offset());
        let to = (1..=REPAIR_NEIGHBOURS)
            .map(|k| queue_offset + k)
            .find_map(sound)
            .map_or(self.max_offset(), |e| e.offset);
        let found = if to.saturating_sub(from) > REPAIR_MAX_SCAN {
            None
        } else {
            self.find_record(topic, queue_id, queue_offset, from, to)
        };
        let Some(e) = found else {
            tracing::error!(
                topic,
                queue_id,
                queue_offset,
                reason = why,
                searched_from = from,
                searched_to = to,
                "a consume-queue entry is damaged and its record was not found in the commit log"
            );
            return None;
        };
        if let Some(slot) = q.slot(queue_offset) {
            // Appenders write entries under the append lock; so does this.
            let _tail = self.inner.tail.lock();
            slot.put(e);
        }
        tracing::warn!(
            topic,
            queue_id,
            queue_offset,
            offset = e.offset,
            reason = why,
            "a consume-queue entry was damaged; rewrote it from the commit log"
        );
        Some(e)
    }

    /// The consume-queue entry of message `queue_offset` of a topic-queue,
    /// found by walking the commit log's records in `[from, to)`.
    fn find_record(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
        from: u64,
        to: u64,
    ) -> Option<CqEntry> {
        let mut pos = from;
        while pos < to {
            let (step, hit) = self
                .inner
                .clog
                .with_bytes(pos, |b| {
                    Ok(match record::probe(b, pos) {
                        record::Probe::Record {
                            len,
                            queue_offset: qo,
                            queue_id: qid,
                        } => {
                            // Checksummed by the probe; the topic is the last check.
                            let hit = (qid == queue_id && qo == queue_offset)
                                .then(|| record::topic_and_tag_hash(&b[..len]).ok())
                                .flatten()
                                .filter(|(t, _)| *t == topic)
                                .map(|(_, tag_hash)| CqEntry {
                                    offset: pos,
                                    size: len as u32,
                                    tag_hash,
                                });
                            (len, hit)
                        }
                        // The rest of the segment.
                        record::Probe::Blank => (b.len(), None),
                        record::Probe::Empty | record::Probe::Bad(_) => (0, None),
                    })
                })
                .ok()?;
            if hit.is_some() || step == 0 {
                return hit;
            }
            pos += step as u64;
        }
        None
    }

    /// The bytes of the whole record stored at `offset`, `size` long, as a
    /// slave hands them to its master for a slave read. Only the framing is
    /// checked here; the reader verifies the CRC when it decodes them.
    pub fn record_bytes(&self, offset: u64, size: u32) -> Result<Bytes, StoreError> {
        let end = offset.saturating_add(u64::from(size));
        if offset < self.min_offset() || end > self.max_offset() || size < 8 {
            return Err(StoreError::InvalidArgument(format!(
                "no record of {size} bytes at offset {offset}: the log holds [{}, {})",
                self.min_offset(),
                self.max_offset()
            )));
        }
        let bytes = Bytes::from(self.inner.clog.read(offset, size as usize)?);
        if bytes.len() != size as usize
            || record::le_u32(&bytes, 0) != size
            || record::le_u32(&bytes, 4) != RECORD_MAGIC
        {
            return Err(StoreError::InvalidArgument(format!(
                "no record of {size} bytes starts at offset {offset}"
            )));
        }
        Ok(bytes)
    }

    /// Up to `max_count` messages (and about `max_bytes`) of a topic-queue
    /// from `from`; skips nothing, stops at the end.
    pub fn get_range(
        &self,
        topic: &str,
        queue_id: u32,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut qo = from.max(self.queue_min_offset(topic, queue_id));
        while out.len() < max_count && (bytes < max_bytes || out.is_empty()) {
            match self.get(topic, queue_id, qo)? {
                Some(r) => {
                    bytes += r.size as usize;
                    out.push(r);
                }
                None => break,
            }
            qo += 1;
        }
        Ok(out)
    }

    /// The consume-queue entry `queue_offset` (offset, size and tag hash).
    /// A damaged entry whose record cannot be found is skipped (`None`;
    /// the error is logged).
    pub fn queue_entry(&self, topic: &str, queue_id: u32, queue_offset: u64) -> Option<CqEntry> {
        self.entry(topic, queue_id, queue_offset).ok().flatten()
    }

    /// The consume-queue entry `queue_offset`, if it is visible. One that
    /// reads as never written is damaged: it is rewritten from the commit
    /// log (see `repair_entry`), or reported if its record is not found.
    fn entry(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
    ) -> Result<Option<CqEntry>, StoreError> {
        let Some(q) = self.queue(topic, queue_id) else {
            return Ok(None);
        };
        let Some(e) = q.get_stored(queue_offset) else {
            return Ok(None);
        };
        if e.is_blank() {
            return Ok(None);
        }
        if e.size != 0 {
            return Ok(Some(e));
        }
        self.repair_entry(
            &q,
            topic,
            queue_id,
            queue_offset,
            "entry reads as never written",
        )
        .map(Some)
        .ok_or_else(|| StoreError::DamagedIndex {
            topic: topic.to_owned(),
            queue_id,
            queue_offset,
        })
    }

    /// First readable message index of a topic-queue.
    pub fn queue_min_offset(&self, topic: &str, queue_id: u32) -> u64 {
        self.queue(topic, queue_id)
            .map_or(0, |q| q.min_index(self.min_offset()))
    }

    /// The entries of a topic-queue from `*next` (first raised to the
    /// queue's first readable entry) to its end as it is now, each with its
    /// queue offset, `*next` moving past each as it is yielded: how the
    /// broker's own readers of a system queue go on from where they were.
    /// `Ok(None)` is an entry whose record retention removed.
    pub fn read_on<'a>(
        &'a self,
        topic: &'a str,
        queue_id: u32,
        next: &'a mut u64,
    ) -> impl Iterator<Item = (u64, Result<Option<StoredRecord>, StoreError>)> + 'a {
        let end = self.queue_max_offset(topic, queue_id);
        *next = (*next).max(self.queue_min_offset(topic, queue_id));
        std::iter::from_fn(move || {
            (*next < end).then(|| {
                let off = *next;
                *next += 1;
                (off, self.get(topic, queue_id, off))
            })
        })
    }

    /// One past the last message index of a topic-queue.
    pub fn queue_max_offset(&self, topic: &str, queue_id: u32) -> u64 {
        self.queue(topic, queue_id).map_or(0, |q| q.max_index())
    }

    /// Every topic-queue that has a consume queue.
    pub fn queues(&self) -> Vec<(String, u32)> {
        let cqs = self.inner.cqs.read();
        let mut out: Vec<_> = cqs
            .iter()
            .flat_map(|(t, qs)| {
                qs.iter()
                    .enumerate()
                    .filter(|(_, q)| q.is_some())
                    .map(move |(i, _)| (t.clone(), i as u32))
            })
            .collect();
        out.sort();
        out
    }

    /// The entries of a consume queue as bytes (to compare rebuilt queues).
    pub fn consume_queue_snapshot(&self, topic: &str, queue_id: u32) -> Vec<u8> {
        self.queue(topic, queue_id)
            .map(|q| q.snapshot())
            .unwrap_or_default()
    }

    /// Whole records from `from`, at most about `max` bytes (at least one
    /// record), never crossing a segment: what a replication stream ships.
    pub fn read_raw(&self, from: u64, max: usize) -> Result<Bytes, StoreError> {
        self.inner.clog.with_bytes(from, |b| {
            let mut n = 0usize;
            while n < b.len() {
                if b.len() - n < 8 {
                    break;
                }
                let len = record::le_u32(b, n) as usize;
                if len < 8 || n + len > b.len() {
                    return Err(StoreError::Corrupt {
                        offset: from + n as u64,
                        reason: format!("record length {len} out of range"),
                    });
                }
                if n > 0 && n + len > max {
                    break;
                }
                n += len;
            }
            Ok(Bytes::copy_from_slice(&b[..n]))
        })
    }

    /// Appends bytes read from another broker's log at `offset` (which must
    /// be this log's end): each record is verified, written at the same
    /// offset and indexed. Returns the new end.
    pub fn append_raw(&self, offset: u64, bytes: &[u8]) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let _c = inner.commit_lock.lock();
        let mut tail = inner.tail.lock();
        self.check_writable()?;
        // Nothing is staged on a slave; a master that became one may have
        // records staged still, which go first.
        self.drain_staged_locked(&mut tail)?;
        if tail.pos != offset {
            return Err(StoreError::OffsetMismatch {
                expected: tail.pos,
                got: offset,
            });
        }
        let result = self.append_raw_locked(&mut tail, bytes);
        inner.clog.publish(&tail);
        inner.dispatched.store(tail.pos, Ordering::Release);
        let end = tail.pos;
        drop(tail);
        inner.published.notify();
        result.map(|()| end)
    }

    fn append_raw_locked(&self, tail: &mut Tail, bytes: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut n = 0usize;
        while n < bytes.len() {
            let rest = &bytes[n..];
            let seg_left = (tail.segment.end() - tail.pos) as usize;
            let view = &rest[..rest.len().min(seg_left)];
            // Bytes from the network: too few for a record's length and
            // magic is a broken frame, not something to probe.
            if view.len() < 8 {
                return Err(StoreError::Corrupt {
                    offset: tail.pos,
                    reason: format!("{} stray bytes where a record should start", view.len()),
                });
            }
            // Probe against the rest of the segment as the sender saw it.
            let probe_len = record::le_u32(view, 0) as usize;
            let magic = record::le_u32(view, 4);
            if magic == record::BLANK_MAGIC {
                if probe_len != seg_left || rest.len() < probe_len {
                    return Err(StoreError::Corrupt {
                        offset: tail.pos,
                        reason: format!(
                            "segment filler of {probe_len} bytes where {seg_left} remain"
                        ),
                    });
                }
                inner.clog.roll(tail)?;
                n += probe_len;
                continue;
            }
            if probe_len > view.len() {
                return Err(StoreError::Corrupt {
                    offset: tail.pos,
                    reason: "replicated record is incomplete or does not fit its segment".into(),
                });
            }
            let rec = &view[..probe_len];
            let (qid, qo) = match record::probe(rec, tail.pos) {
                record::Probe::Record {
                    queue_id,
                    queue_offset,
                    len,
                } if len == probe_len => (queue_id, queue_offset),
                record::Probe::Bad(reason) => {
                    return Err(StoreError::Corrupt {
                        offset: tail.pos,
                        reason,
                    });
                }
                other => {
                    return Err(StoreError::Corrupt {
                        offset: tail.pos,
                        reason: format!("unexpected {other:?} in a replication stream"),
                    });
                }
            };
            let (topic, hash) =
                record::topic_and_tag_hash(rec).map_err(|reason| StoreError::Corrupt {
                    offset: tail.pos,
                    reason,
                })?;
            // The name becomes a directory: a record that passed its
            // checksum can still name `..` or an absolute path.
            record::validate_topic(topic).map_err(|e| StoreError::Corrupt {
                offset: tail.pos,
                reason: format!("replicated record names no valid topic: {e}"),
            })?;
            let cq = self.queue_for_write(topic, qid)?;
            // A log that starts past offset 0 (its master's oldest
            // segment, after a resync) meets queues whose first entries
            // are in segments neither side holds any more.
            if qo > 0 && cq.is_new() && self.min_offset() > 0 {
                cq.start_at(qo)
                    .map_err(StoreError::io("starting a consume queue"))?;
            }
            if cq.max_index() != qo {
                return Err(StoreError::Corrupt {
                    offset: tail.pos,
                    reason: format!(
                        "record is entry {qo} of {topic}/{qid} but the local queue has {} entries",
                        cq.max_index()
                    ),
                });
            }
            let slot = cq
                .ensure(qo)
                .map_err(StoreError::io("creating a consume queue file"))?;
            inner.clog.make_room(tail, probe_len as u64)?;
            let offset = tail.pos;
            // The master's `record::FLUSHED_BEFORE` marks say what was
            // durable on the master when it wrote them, not here; recovery
            // reads them as this log's (damage before a marked record is a
            // lost write of flushed data). So the mark is set as this
            // store's own flusher would set it: on a record written when
            // everything before it is durable here, under SYNC_FLUSH.
            let durable_before =
                inner.config.flush_mode == FlushMode::SyncFlush && self.flushed_offset() >= offset;
            let rec = if record::is_flushed_before(rec) == durable_before {
                Cow::Borrowed(rec)
            } else {
                let mut r = rec.to_vec();
                record::set_flushed_before(&mut r, durable_before);
                Cow::Owned(r)
            };
            // SAFETY: append lock held, room made, published after writing.
            unsafe { inner.clog.write(&tail.segment, offset, &rec) }.map_err(StoreError::io(
                format!("writing to commit log segment at {offset}"),
            ))?;
            tail.pos += probe_len as u64;
            inner.clog.publish(tail);
            slot.put(CqEntry {
                offset,
                size: probe_len as u32,
                tag_hash: hash,
            });
            cq.publish(qo + 1);
            n += probe_len;
        }
        Ok(())
    }

    /// Cuts the log at `offset` (a record boundary): used by a returning
    /// master to drop what it wrote after the fork point.
    pub fn truncate_to(&self, offset: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _c = inner.commit_lock.lock();
        let mut tail = inner.tail.lock();
        self.check_writable()?;
        self.drain_staged_locked(&mut tail)?;
        if offset < self.min_offset() || offset > tail.pos {
            return Err(StoreError::OutOfRange {
                offset,
                min: self.min_offset(),
                max: tail.pos,
            });
        }
        if offset == tail.pos {
            return Ok(());
        }
        if offset > self.min_offset() {
            // The cut must be at a record boundary: a record must end exactly
            // there, before the next record or the filler closing its segment
            // (a slave may have the last record of a segment and not yet the
            // filler its master wrote after it).
            let seg = inner
                .clog
                .segment_for(offset)
                .or_else(|| inner.clog.segment_for(offset - 1));
            if let Some(seg) = seg
                && offset != seg.base
            {
                let at_record = inner.clog.with_bytes(offset, |b| {
                    Ok(b.len() >= 8
                        && matches!(record::le_u32(b, 4), RECORD_MAGIC | record::BLANK_MAGIC))
                })?;
                if !at_record {
                    return Err(StoreError::InvalidArgument(format!(
                        "offset {offset} is not a record boundary"
                    )));
                }
            }
        }
        let _f = inner.flush_lock.lock();
        // The checkpoint goes down first: after a crash during the cut, one
        // still claiming the cut bytes flushed would make recovery take the
        // zeros the cut leaves for a lost write and refuse to start.
        self.note_cut(offset);
        inner.flushed.fetch_min(offset, Ordering::AcqRel);
        self.write_checkpoint(false)?;
        let cut = inner.clog.truncate(offset, true).and_then(|t| {
            *tail = t;
            for qs in inner.cqs.read().values() {
                for q in qs.iter().flatten() {
                    q.truncate_to_log_end(offset)
                        .map_err(StoreError::io("truncating a consume queue"))?;
                }
            }
            Ok(())
        });
        cut.map_err(|e| self.latch_cut_failure(e))?;
        inner.dispatched.store(offset, Ordering::Release);
        inner.flush_watch.send_replace(self.flushed_offset());
        drop(_f);
        drop(tail);
        // The checkpoint written before the cut already says so.
        tracing::warn!(offset, "commit log truncated");
        Ok(())
    }

    /// Discards the whole log and every consume queue, and starts the log
    /// again, empty, at `base` (a multiple of the segment size, at or past
    /// the end). For a slave whose log ends before its master's oldest
    /// segment: retention on the master deleted what it would need next, so
    /// it can only catch up from where the master's log now starts. Topics
    /// and consumer offsets are kept.
    ///
    /// Crash-safe in every step: first a checkpoint that claims nothing
    /// flushed, so that recovery takes whatever segments are left (none: an
    /// empty log) for the whole log; then the consume queues go (the next
    /// open rebuilds them), then the segments oldest first (see
    /// [`CommitLog::restart_at`]); then the checkpoint is written for the
    /// new log. A step that fails leaves the store failed (see
    /// `latch_cut_failure`).
    pub fn restart_at(&self, base: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _c = inner.commit_lock.lock();
        let mut tail = inner.tail.lock();
        self.check_writable()?;
        self.drain_staged_locked(&mut tail)?;
        if base < tail.pos {
            return Err(StoreError::InvalidArgument(format!(
                "the log cannot start again at {base}, before its end {}",
                tail.pos
            )));
        }
        let _f = inner.flush_lock.lock();
        let old_min = self.min_offset();
        let old_end = tail.pos;
        // A checkpoint that still claimed the old log flushed would make
        // recovery, after a crash once its segments are gone, take their
        // absence for lost writes and refuse to start.
        self.note_cut(0);
        inner.flushed.store(0, Ordering::Release);
        self.write_checkpoint(false)
            .map_err(|e| self.latch_cut_failure(e))?;
        let restarted = self
            .discard_queues()
            .and_then(|()| inner.clog.restart_at(base));
        *tail = restarted.map_err(|e| self.latch_cut_failure(e))?;
        inner.dispatched.store(base, Ordering::Release);
        inner.flushed.store(base, Ordering::Release);
        // No queue holds an entry: nothing to flush below the new start.
        *inner.cq_flushed.lock() = base;
        self.write_checkpoint(false)?;
        inner.flush_watch.send_replace(base);
        drop(_f);
        drop(tail);
        tracing::warn!(
            discarded_from = old_min,
            discarded_to = old_end,
            start = base,
            "commit log discarded and started again empty"
        );
        Ok(())
    }

    /// Deletes segments past the retention time or beyond the disk
    /// watermark; `now_ms` is the current time.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let horizon = now_ms - cfg.retention.as_millis() as i64;
        let clog = &inner.clog;
        let hw = cfg.disk_high_watermark;
        // Measured once, before anything is deleted: a deleted segment's
        // space comes back only when nothing maps it any more, so the
        // filesystem's use is not measured again (and `doom` below runs
        // under the segments lock, where nothing may be measured).
        let fs_excess = clog.fs_usage().map_or(0, |u| u.excess_over(hw));
        // Files retention takes are kept for reuse (see
        // `StoreConfig::reuse_segments`) only while the disk is under its
        // watermarks, and as long as they keep it there.
        let cap = cfg
            .max_store_bytes
            .map_or(u64::MAX, |m| (hw * m as f64) as u64);
        let keep_within = (fs_excess == 0).then_some(cap);
        let end = clog.max_offset();
        let mut unreadable = None;
        let mut removed =
            clog.delete_oldest_while(keep_within, |_, next| match first_store_ms(next) {
                Some(t) => t < horizon,
                // An empty segment (the log's end at its start) has no record yet.
                None => {
                    if next.base < end {
                        unreadable = Some(next.base);
                    }
                    false
                }
            })?;
        if let Some(base) = unreadable {
            tracing::error!(
                segment = base,
                "the first record of a commit log segment cannot be read: the segment before it \
                 and all later ones are kept past their retention time"
            );
        }
        // Over a watermark: the bytes to free, less what time already freed.
        let by_fs = fs_excess.saturating_sub(removed as u64 * clog.segment_size());
        let by_cap = cfg.max_store_bytes.map_or(0, |m| {
            clog.disk_bytes()
                .saturating_sub((hw * m as f64).ceil() as u64)
        });
        let need = by_fs.max(by_cap);
        if need > 0 {
            // Spare files first: they hold no records.
            let mut freed = clog.drop_spares();
            let forced = clog.delete_oldest_while(None, |seg, _| {
                if freed >= need {
                    return false;
                }
                freed += seg.file.len();
                true
            })?;
            if forced > 0 {
                tracing::warn!(
                    segments = forced,
                    over_by = need,
                    "disk use above the high watermark: deleted the oldest segments before their retention time"
                );
            }
            removed += forced;
        }
        self.retire_deleted_topics_queues()?;
        if removed > 0 {
            let min = self.min_offset();
            for qs in inner.cqs.read().values() {
                for q in qs.iter().flatten() {
                    q.delete_before(min)
                        .map_err(StoreError::io("deleting old consume queue files"))?;
                }
            }
        }
        Ok(removed)
    }

    /// Retires (see `ConsumeQueue::retire`) the consume queues of deleted
    /// topics whose messages all went with deleted segments: their files,
    /// mappings and descriptors are released; the queue keeps its length,
    /// and a topic created again under the name goes on numbering its
    /// messages from there. Topics absent from the metadata because they
    /// are internal, retry or dead-letter topics (`%...`) are left alone.
    fn retire_deleted_topics_queues(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let deleted = |t: &str| !t.starts_with('%') && inner.metadata.get_topic(t).is_none();
        let expired = |q: &ConsumeQueue| q.min_index(self.min_offset()) == q.max_index();
        let candidates: Vec<(String, u32)> = inner
            .cqs
            .read()
            .iter()
            .filter(|(t, _)| deleted(t))
            .flat_map(|(t, qs)| {
                qs.iter()
                    .enumerate()
                    .filter(|(_, q)| q.as_ref().is_some_and(|q| q.holds_files() && expired(q)))
                    .map(move |(i, _)| (t.clone(), i as u32))
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        // No record is staged, written or indexed meanwhile.
        let _c = inner.commit_lock.lock();
        let _tail = inner.tail.lock();
        for (topic, queue_id) in candidates {
            let Some(q) = self.queue(&topic, queue_id) else {
                continue;
            };
            if !deleted(&topic) || !q.holds_files() || q.has_unpublished() || !expired(&q) {
                continue;
            }
            q.retire()
                .map_err(StoreError::io("retiring a deleted topic's consume queue"))?;
            tracing::info!(
                topic,
                queue_id,
                next = q.max_index(),
                "released the consume queue of a deleted topic"
            );
        }
        Ok(())
    }

    /// Flushes everything and stops the background threads; the next open
    /// finds a clean shutdown. Idempotent.
    pub fn shutdown(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        inner.stopping.store(true, Ordering::Release);
        if let Some(t) = inner.flusher.get() {
            t.unpark();
        }
        for h in inner.threads.lock().drain(..) {
            h.thread().unpark();
            let _ = h.join();
        }
        inner.clog.stop_preparer();
        let _c = inner.commit_lock.lock();
        let mut tail = inner.tail.lock();
        self.drain_staged_locked(&mut tail)?;
        self.flush_to(self.max_offset())?;
        // Nothing is appended while the append lock is held.
        let dispatched = inner.dispatched.load(Ordering::Acquire);
        self.flush_queues()?;
        {
            let mut cq = inner.cq_flushed.lock();
            *cq = (*cq).max(dispatched);
        }
        inner.metadata.flush_offsets()?;
        self.write_checkpoint(true)?;
        inner.lock.lock().take();
        tracing::info!(end = self.max_offset(), "store shut down cleanly");
        Ok(())
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        self.check_open()?;
        self.check_flush_ok()
    }

    /// Fails once shutdown has begun. Called under the commit lock by every
    /// path that writes or cuts the log: `shutdown` sets `stopping` before
    /// it takes that lock, so nothing reaches the log after its final flush
    /// and clean checkpoint, which recovery relies on (a clean checkpoint's
    /// end is taken as the end of the log).
    fn check_open(&self) -> Result<(), StoreError> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    fn check_flush_ok(&self) -> Result<(), StoreError> {
        if !self.inner.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.inner.flush_failed.lock().as_ref() {
            Some(e) => Err(StoreError::FlushFailed(e.clone())),
            None => Ok(()),
        }
    }

    fn queue(&self, topic: &str, queue_id: u32) -> Option<Arc<ConsumeQueue>> {
        self.inner
            .cqs
            .read()
            .get(topic)?
            .get(queue_id as usize)?
            .clone()
    }

    fn queue_for_write(&self, topic: &str, queue_id: u32) -> Result<Arc<ConsumeQueue>, StoreError> {
        if let Some(q) = self.queue(topic, queue_id) {
            return Ok(q);
        }
        if queue_id >= MAX_QUEUES {
            return Err(StoreError::InvalidArgument(format!(
                "queue id {queue_id} out of range (0 to {})",
                MAX_QUEUES - 1
            )));
        }
        let inner = &self.inner;
        let dir = queue_dir(&inner.cq_dir, topic, queue_id);
        let q = Arc::new(
            ConsumeQueue::open(&dir, inner.config.cq_entries_per_file).map_err(StoreError::io(
                format!("opening consume queue {}", dir.display()),
            ))?,
        );
        let mut cqs = inner.cqs.write();
        let slots = cqs.entry(topic.to_owned()).or_default();
        if slots.len() <= queue_id as usize {
            slots.resize(queue_id as usize + 1, None);
        }
        Ok(slots[queue_id as usize].get_or_insert(q).clone())
    }

    /// Flushes the log up to `target` (serialised with the flusher thread).
    fn flush_to(&self, target: u64) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let _g = inner.flush_lock.lock();
        self.check_flush_ok()?;
        // The target may have been read before a cut (`truncate_to`, which
        // takes this lock) lowered the end: never mark bytes past the end
        // flushed, or records appended there later would count as durable
        // before any flush covered them.
        let target = target.min(self.max_offset());
        let from = self.flushed_offset();
        if target > from {
            let started = Instant::now();
            let flushed = inner.clog.flush(from, target);
            inner.flush_nanos.fetch_add(
                u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            if let Err(e) = flushed {
                let msg = format!("fdatasync: {e}");
                self.latch_failure(msg.clone());
                return Err(StoreError::FlushFailed(msg));
            }
            inner.flushed.store(target, Ordering::Release);
            inner.flushes.fetch_add(1, Ordering::Relaxed);
            // Appends staged by now are not the ones this flush releases.
            inner.staged_at_release.store(
                inner.staged_appends.load(Ordering::SeqCst),
                Ordering::SeqCst,
            );
            inner.flush_watch.send_replace(target);
            let _l = inner.flush_cv_lock.lock();
            inner.flush_cv.notify_all();
        }
        Ok(self.flushed_offset())
    }

    /// Records that writing or flushing the log failed: the store refuses
    /// writes from now on, and every waiter for durability is told.
    fn latch_failure(&self, msg: String) {
        let inner = &self.inner;
        tracing::error!(error = %msg, "the commit log could not be written or flushed; refusing further writes");
        *inner.flush_failed.lock() = Some(msg);
        inner.failed.store(true, Ordering::Release);
        inner.flush_watch.send_modify(|_| {});
        let _l = inner.flush_cv_lock.lock();
        inner.flush_cv.notify_all();
    }

    /// Drops every consume queue, in memory and on disk (`restart_at`; the
    /// next open rebuilds them from the log).
    fn discard_queues(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut cqs = inner.cqs.write();
        cqs.clear();
        if inner.cq_dir.exists() {
            std::fs::remove_dir_all(&inner.cq_dir)
                .map_err(StoreError::io("removing the consume queues"))?;
        }
        std::fs::create_dir_all(&inner.cq_dir)
            .map_err(StoreError::io("creating the consume queue directory"))?;
        sync_dir(&inner.config.data_dir).map_err(StoreError::io("syncing the data directory"))
    }

    /// A cut of the log (`truncate_to`, `restart_at`) that failed half-way
    /// leaves the files and what the store holds in memory apart (segments
    /// dropped from its list but still on disk, or the other way round):
    /// latches the store failed, so that nothing more is appended to it or
    /// acknowledged; the next start recovers from the files. Returns `e`.
    fn latch_cut_failure(&self, e: StoreError) -> StoreError {
        self.latch_failure(format!("cutting the commit log: {e}"));
        e
    }

    /// The maintenance thread's checkpoint: flushes the consume queues and
    /// the offsets, then writes the checkpoint. `between` runs right after
    /// the queues are flushed (tests append there).
    fn checkpoint_with(&self, between: impl FnOnce()) -> Result<(), StoreError> {
        let inner = &self.inner;
        // Read before the flush: entries published during it may not be
        // covered, and a cut meanwhile makes this offset mean other records.
        let cuts = inner.cuts.load(Ordering::Acquire);
        let dispatched = inner.dispatched.load(Ordering::Acquire);
        self.flush_queues()?;
        between();
        {
            let mut cq = inner.cq_flushed.lock();
            if inner.cuts.load(Ordering::Acquire) == cuts {
                *cq = (*cq).max(dispatched);
            }
        }
        inner.metadata.flush_offsets()?;
        self.write_checkpoint(false)
    }

    /// Lowers what the checkpoint may claim of the queues to a cut at
    /// `offset`, and counts the cut.
    fn note_cut(&self, offset: u64) {
        let inner = &self.inner;
        let mut cq = inner.cq_flushed.lock();
        inner.cuts.fetch_add(1, Ordering::AcqRel);
        *cq = (*cq).min(offset);
    }

    fn flush_queues(&self) -> Result<(), StoreError> {
        for q in self.all_queues() {
            q.flush()
                .map_err(StoreError::io("flushing a consume queue"))?;
        }
        Ok(())
    }

    /// Writes the checkpoint if it changed.
    fn write_checkpoint(&self, clean: bool) -> Result<(), StoreError> {
        let inner = &self.inner;
        // The offsets are read under the lock that orders the writes: read
        // before it, a checkpoint could go down after a cut's and claim
        // flushed what the cut then removes.
        let mut last = inner.last_checkpoint.lock();
        let flushed = self.flushed_offset();
        let cp = Checkpoint {
            flushed_offset: flushed,
            cq_offset: (*inner.cq_flushed.lock()).min(flushed),
            clean,
            written_ms: now_ms(),
        };
        if last.flushed_offset == cp.flushed_offset
            && last.cq_offset == cp.cq_offset
            && last.clean == cp.clean
            && last.written_ms != 0
        {
            return Ok(());
        }
        save_json(&inner.config.data_dir.join(CHECKPOINT), &cp)?;
        *last = cp;
        Ok(())
    }

    fn start_threads(&self) -> Result<(), StoreError> {
        let weak = Arc::downgrade(&self.inner);
        let flusher = std::thread::Builder::new()
            .name("keelmq-flush".into())
            .spawn(move || flush_loop(&weak))
            .map_err(StoreError::io("starting the flush thread"))?;
        let _ = self.inner.flusher.set(flusher.thread().clone());
        let weak = Arc::downgrade(&self.inner);
        let maint = std::thread::Builder::new()
            .name("keelmq-store-maint".into())
            .spawn(move || maintenance_loop(&weak))
            .map_err(StoreError::io("starting the store maintenance thread"))?;
        let weak = Arc::downgrade(&self.inner);
        let watchdog = std::thread::Builder::new()
            .name("keelmq-flush-watch".into())
            .spawn(move || flush_watchdog(&weak))
            .map_err(StoreError::io("starting the flush watchdog thread"))?;
        let mut threads = self.inner.threads.lock();
        threads.push(flusher);
        threads.push(maint);
        threads.push(watchdog);
        Ok(())
    }
}

fn unreserve(slots: &[(Arc<ConsumeQueue>, CqSlot)]) {
    for (q, slot) in slots.iter().rev() {
        q.unreserve_to(slot.index());
    }
}

/// The store timestamp of the first record of a segment, if it has one.
fn first_store_ms(seg: &commit_log::Segment) -> Option<i64> {
    let mut head = [0u8; record::FIXED_HEADER_LEN];
    seg.file.pread(&mut head, 0).ok()?;
    (record::le_u32(&head, 4) == RECORD_MAGIC).then(|| record::le_u64(&head, 44) as i64)
}

/// Whether retention keeps commit-log files to make later segments of
/// (see `CommitLog::delete_oldest_while`): as configured, under SYNC_FLUSH
/// only (ASYNC_FLUSH writes through the mapping, where a page of a reused
/// file that is no longer cached is read from the disk on its first
/// write), and never on a copy-on-write filesystem, where an overwrite
/// allocates new blocks anyway.
fn reuse_segments_enabled(config: &StoreConfig) -> bool {
    config.reuse_segments
        && config.flush_mode == FlushMode::SyncFlush
        && commit_log::copy_on_write_fs(&config.data_dir).is_none()
}

/// Whether the SYNC_FLUSH flusher writes zeros ahead (see
/// `CommitLog::zero_ahead`): as configured, except on a copy-on-write
/// filesystem, where it is always off.
fn zero_ahead_enabled(config: &StoreConfig) -> bool {
    if !config.zero_ahead || config.flush_mode != FlushMode::SyncFlush {
        return false;
    }
    match commit_log::copy_on_write_fs(&config.data_dir) {
        Some(fs) => {
            tracing::info!(
                filesystem = fs,
                "not writing zeros ahead of the commit log on a copy-on-write filesystem"
            );
            false
        }
        None => true,
    }
}

/// The commit-log segment file holding `offset` in `data_dir` (tests damage
/// segments on disk through it).
#[cfg(test)]
pub(crate) fn segment_path(data_dir: &Path, segment_size: u64, offset: u64) -> PathBuf {
    data_dir.join("commitlog").join(consume_queue::base_name(
        offset / segment_size * segment_size,
    ))
}

/// Stops the flusher in front of its next fdatasync for as long as the
/// guard lives, as if the disk did not answer: under SYNC_FLUSH it writes
/// (and publishes) what is staged, then waits; what is appended after that
/// is not even written, and waits for durability time out. For tests
/// outside this module of what waits for durability.
#[cfg(test)]
impl MessageStore {
    pub(crate) fn stall_flushes(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.inner.flush_lock.lock()
    }
}

fn queue_dir(cq_dir: &Path, topic: &str, queue_id: u32) -> PathBuf {
    cq_dir.join(topic).join(queue_id.to_string())
}

/// The SYNC_FLUSH flusher writes what is staged and flushes everything
/// written so far: appends that arrive during an fdatasync share the next
/// one (group commit). After a flush that released several callers it
/// waits, for at most as long as that flush took, until as many appends
/// are back; otherwise every append wakes it. Under ASYNC_FLUSH it flushes
/// on the interval.
fn flush_loop(weak: &std::sync::Weak<Inner>) {
    let mut spare = Staged::default();
    // Under SYNC_FLUSH: appends the last flush released and how long it took.
    let (mut released, mut took) = (0usize, Duration::ZERO);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let store = MessageStore { inner };
        let stopping = store.inner.stopping.load(Ordering::Acquire);
        let sync = store.inner.config.flush_mode == FlushMode::SyncFlush;
        if sync && released > 1 && !stopping {
            // Group commit: the callers the last flush released usually
            // append again at once (a client's next send). Flushing as soon
            // as the first of them is back splits them over two flushes,
            // each paying the disk's whole flush time, and the split
            // repeats, so groups stay at half the callers. Wait for them,
            // at most as long as a flush takes: a record that arrives just
            // after a flush starts waits that long anyway.
            let staged = store.inner.staged_at_release.load(Ordering::SeqCst);
            store.gather(staged + released as u64, took.min(MAX_GATHER));
        }
        let committed = if sync {
            match store.commit_staged(&mut spare) {
                Ok(n) => n,
                // Already reported and latched.
                Err(_) => return,
            }
        } else {
            0
        };
        let target = store.max_offset();
        let from = store.flushed_offset();
        let pending = target > from;
        let started = Instant::now();
        if pending && store.flush_to(target).is_err() {
            // Already reported and latched; nothing more this thread can do.
            return;
        }
        (released, took) = (committed, started.elapsed());
        if stopping {
            return;
        }
        if sync && pending {
            // The disk is idle while the callers just released append again.
            store.zero_ahead(target - from);
        }
        let interval = store.inner.config.flush_interval;
        drop(store);
        if sync && pending {
            continue;
        }
        std::thread::park_timeout(interval);
    }
}

/// How often the flush watchdog looks: a tenth of the flush timeout,
/// between 1 ms and 100 ms.
fn watchdog_period(flush_timeout: Duration) -> Duration {
    (flush_timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// Wakes everyone waiting for durability whenever the flushed offset has
/// not moved for a whole period, so each can tell whether its flush
/// timeout has passed. Waiters register no timer of their own: at tens of
/// thousands of SYNC_FLUSH appends a second, registering and cancelling one
/// per wait cost about a tenth of the CPU of the storage benchmark at 64
/// writers, and it lay on the path between a flush and the next. While
/// flushes complete this thread only reads an atomic; it touches no disk,
/// so a stuck fdatasync (the case the timeout is for) does not stop it.
/// Its tick count is the waits' clock: they compare counts instead of
/// reading the time (one clock read less per SYNC_FLUSH send).
fn flush_watchdog(weak: &std::sync::Weak<Inner>) {
    let Some(period) = weak
        .upgrade()
        .map(|inner| watchdog_period(inner.config.flush_timeout))
    else {
        return;
    };
    let mut last = None;
    let mut tick = Instant::now();
    loop {
        std::thread::park_timeout(period);
        let Some(inner) = weak.upgrade() else { return };
        if inner.stopping.load(Ordering::Acquire) {
            return;
        }
        // Ticks stay at least a period apart (a park may end early).
        if tick.elapsed() < period {
            continue;
        }
        tick = Instant::now();
        inner.watch_ticks.fetch_add(1, Ordering::AcqRel);
        let flushed = inner.flushed.load(Ordering::Acquire);
        if last == Some(flushed) {
            inner.flush_watch.send_modify(|_| {});
        }
        last = Some(flushed);
    }
}

/// Periodically flushes consume queues and offsets, writes the
/// checkpoint, and applies retention.
fn maintenance_loop(weak: &std::sync::Weak<Inner>) {
    let mut last_retention = Instant::now();
    loop {
        let interval = match weak.upgrade() {
            Some(inner) => inner.config.checkpoint_interval,
            None => return,
        };
        std::thread::park_timeout(interval);
        let Some(inner) = weak.upgrade() else { return };
        if inner.stopping.load(Ordering::Acquire) {
            return;
        }
        let store = MessageStore { inner };
        // Pages readers mapped in old segments (the writer's are released
        // as the end moves on), and old pages of the consume queues.
        store.release_mapped_behind();
        if let Err(e) = store.checkpoint_with(|| {}) {
            tracing::error!(error = %e, "store checkpoint failed");
        }
        if last_retention.elapsed() >= store.inner.config.retention_interval {
            last_retention = Instant::now();
            if let Err(e) = store.enforce_retention(now_ms()) {
                tracing::error!(error = %e, "retention failed");
            }
        }
    }
}

/// Takes an exclusive lock on the data directory so two brokers never
/// share one.
fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(StoreError::io(format!("opening {}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Config(format!(
            "data directory {} is in use by another process",
            dir.display()
        )));
    }
    Ok(f)
}

fn load_or_create_store_id(dir: &Path) -> Result<String, StoreError> {
    let path = dir.join("store_id");
    // Only a missing or empty file means a new disk: any other failure to
    // read it must not silently give the broker another identity.
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
        Ok(_) | Err(_) => {
            let id = format!("{:032x}", rand::random::<u128>());
            persist_atomically(&path, id.as_bytes())
                .map_err(StoreError::io("writing the store id"))?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests;
