//! Small, rarely written state kept beside the commit log: topics, consumer
//! group settings and consumer group offsets. Each kind is one JSON file replaced atomically
//! (temp file, fsync, rename, fsync of the directory), so a crash leaves
//! either the old or the new version, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::group_config::{DEFAULT_MAX_DELIVERY_ATTEMPTS, GroupConfig};
use super::mapped::persist_atomically;
use super::record::validate_topic;

/// Most queues a topic may have.
pub const MAX_QUEUES: u32 = 1024;

/// Which messages a topic accepts (RocketMQ 5's topic message types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MessageType {
    #[default]
    Normal,
    Fifo,
    Delay,
    Transaction,
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MessageType::Normal => "NORMAL",
            MessageType::Fifo => "FIFO",
            MessageType::Delay => "DELAY",
            MessageType::Transaction => "TRANSACTION",
        })
    }
}

impl std::str::FromStr for MessageType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "NORMAL" => Ok(MessageType::Normal),
            "FIFO" => Ok(MessageType::Fifo),
            "DELAY" => Ok(MessageType::Delay),
            "TRANSACTION" => Ok(MessageType::Transaction),
            _ => Err(format!(
                "unknown message type {s:?} (expected NORMAL, FIFO, DELAY or TRANSACTION)"
            )),
        }
    }
}

/// A topic as the broker knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub name: String,
    pub queue_count: u32,
    pub message_type: MessageType,
}

/// A consumer group's committed offset on one queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffset {
    pub group: String,
    pub topic: String,
    pub queue_id: u32,
    pub offset: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct TopicsFile {
    topics: Vec<TopicConfig>,
}

#[derive(Default, Serialize, Deserialize)]
struct GroupsFile {
    groups: Vec<GroupConfig>,
}

#[derive(Default, Serialize, Deserialize)]
struct OffsetsFile {
    offsets: Vec<GroupOffset>,
}

type OffsetKey = (String, String, u32);

/// Everything a slave copies from its master besides the commit log: the
/// topics, the consumer groups' settings, every group's committed offsets,
/// and how far each group's deliveries had gone (so a promoted slave can
/// count the redeliveries a failover causes). Sent on the replication stream
/// whenever it changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetadataSnapshot {
    pub topics: Vec<TopicConfig>,
    /// Absent in snapshots from brokers that predate group settings.
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    pub offsets: Vec<GroupOffset>,
    /// Per group and queue: the first offset never handed out.
    pub dispatched: Vec<GroupOffset>,
}

/// Topics and consumer offsets, in memory and on disk.
pub struct Metadata {
    dir: PathBuf,
    topics: RwLock<BTreeMap<String, TopicConfig>>,
    groups: RwLock<BTreeMap<String, GroupConfig>>,
    offsets: RwLock<BTreeMap<OffsetKey, u64>>,
    offsets_dirty: AtomicBool,
    /// Per group and queue, the first offset never handed out (in memory:
    /// replicated to slaves, not persisted).
    dispatched: RwLock<BTreeMap<OffsetKey, u64>>,
    /// Bumped on every change a slave must see.
    version: AtomicU64,
    /// Serialises writers of the files.
    write: Mutex<()>,
}

impl Metadata {
    /// Loads the files in `dir` (missing files mean "nothing yet").
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        let topics: TopicsFile = load_json(&dir.join("topics.json"))?;
        let offsets: OffsetsFile = load_json(&dir.join("offsets.json"))?;
        let groups: GroupsFile = load_json(&dir.join("groups.json"))?;
        Ok(Self {
            groups: RwLock::new(
                groups
                    .groups
                    .into_iter()
                    .map(|g| (g.name.clone(), g))
                    .collect(),
            ),
            dir: dir.to_owned(),
            topics: RwLock::new(
                topics
                    .topics
                    .into_iter()
                    .map(|t| (t.name.clone(), t))
                    .collect(),
            ),
            offsets: RwLock::new(
                offsets
                    .offsets
                    .into_iter()
                    .map(|o| ((o.group, o.topic, o.queue_id), o.offset))
                    .collect(),
            ),
            offsets_dirty: AtomicBool::new(false),
            dispatched: RwLock::new(BTreeMap::new()),
            version: AtomicU64::new(1),
            write: Mutex::new(()),
        })
    }

    /// Creates a topic; it must not exist yet.
    pub fn create_topic(&self, topic: TopicConfig) -> Result<(), StoreError> {
        validate_topic(&topic.name)?;
        check_queue_count(topic.queue_count)?;
        let _w = self.write.lock();
        {
            let mut topics = self.topics.write();
            if let Some(existing) = topics.get(&topic.name) {
                return Err(StoreError::AlreadyExists(format!(
                    "topic {} already exists ({} queues, {})",
                    existing.name, existing.queue_count, existing.message_type
                )));
            }
            topics.insert(topic.name.clone(), topic);
        }
        self.persist_topics()
    }

    /// Creates a topic unless it exists; returns the topic as stored.
    pub fn ensure_topic(&self, topic: TopicConfig) -> Result<TopicConfig, StoreError> {
        if let Some(t) = self.get_topic(&topic.name) {
            return Ok(t);
        }
        match self.create_topic(topic.clone()) {
            Ok(()) => Ok(topic),
            Err(StoreError::AlreadyExists(_)) => self
                .get_topic(&topic.name)
                .ok_or_else(|| StoreError::NotFound(format!("topic {}", topic.name))),
            Err(e) => Err(e),
        }
    }

    /// Changes a topic's queue count; queues can be added, never removed
    /// (their messages and offsets would be orphaned).
    pub fn update_topic_queues(
        &self,
        name: &str,
        queue_count: u32,
    ) -> Result<TopicConfig, StoreError> {
        check_queue_count(queue_count)?;
        let _w = self.write.lock();
        let updated = {
            let mut topics = self.topics.write();
            let t = topics
                .get_mut(name)
                .ok_or_else(|| StoreError::NotFound(format!("topic {name} does not exist")))?;
            if queue_count < t.queue_count {
                return Err(StoreError::InvalidArgument(format!(
                    "topic {name} has {} queues; queues cannot be removed",
                    t.queue_count
                )));
            }
            t.queue_count = queue_count;
            t.clone()
        };
        self.persist_topics()?;
        Ok(updated)
    }

    /// Deletes a topic and its consumer offsets (its records age out with retention).
    pub fn delete_topic(&self, name: &str) -> Result<(), StoreError> {
        let _w = self.write.lock();
        if self.topics.write().remove(name).is_none() {
            return Err(StoreError::NotFound(format!("topic {name} does not exist")));
        }
        self.offsets.write().retain(|(_, t, _), _| t != name);
        self.offsets_dirty.store(true, Ordering::Release);
        self.persist_topics()
    }

    pub fn get_topic(&self, name: &str) -> Option<TopicConfig> {
        self.topics.read().get(name).cloned()
    }

    pub fn list_topics(&self) -> Vec<TopicConfig> {
        self.topics.read().values().cloned().collect()
    }

    /// Creates or replaces a consumer group's settings.
    pub fn set_group(&self, group: GroupConfig) -> Result<(), StoreError> {
        group.validate()?;
        let _w = self.write.lock();
        self.groups.write().insert(group.name.clone(), group);
        self.persist_groups()
    }

    /// Removes a consumer group's settings (it goes back to the defaults);
    /// its offsets stay.
    pub fn delete_group(&self, name: &str) -> Result<(), StoreError> {
        let _w = self.write.lock();
        if self.groups.write().remove(name).is_none() {
            return Err(StoreError::NotFound(format!(
                "consumer group {name} has no settings"
            )));
        }
        self.persist_groups()
    }

    /// A group's settings, if any were set.
    pub fn get_group(&self, name: &str) -> Option<GroupConfig> {
        self.groups.read().get(name).cloned()
    }

    /// A group's settings, or the defaults when none were set.
    pub fn group_or_default(&self, name: &str) -> GroupConfig {
        self.get_group(name)
            .unwrap_or_else(|| GroupConfig::defaults(name))
    }

    /// Deliveries of a message to `group` before it is dead-lettered.
    pub fn max_delivery_attempts(&self, group: &str) -> u32 {
        self.groups
            .read()
            .get(group)
            .map_or(DEFAULT_MAX_DELIVERY_ATTEMPTS, |g| g.max_delivery_attempts)
    }

    pub fn list_groups(&self) -> Vec<GroupConfig> {
        self.groups.read().values().cloned().collect()
    }

    /// Records a consumer group's progress; written to disk by [`Metadata::flush_offsets`].
    pub fn commit_offset(&self, group: &str, topic: &str, queue_id: u32, offset: u64) {
        if set_offset(&mut self.offsets.write(), group, topic, queue_id, offset) {
            self.offsets_dirty.store(true, Ordering::Release);
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    /// Records that `group` has handed out every offset of the queue below `next`.
    pub fn mark_dispatched(&self, group: &str, topic: &str, queue_id: u32, next: u64) {
        if set_offset(&mut self.dispatched.write(), group, topic, queue_id, next) {
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    /// The first offset of the queue `group` had not handed out, as last
    /// recorded (here or, on a slave, by the master).
    pub fn dispatched(&self, group: &str, topic: &str, queue_id: u32) -> Option<u64> {
        self.dispatched
            .read()
            .get(&(group.to_owned(), topic.to_owned(), queue_id))
            .copied()
    }

    /// A counter that changes whenever the snapshot would.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// What a slave needs to copy.
    pub fn snapshot(&self) -> MetadataSnapshot {
        MetadataSnapshot {
            topics: self.list_topics(),
            groups: self.list_groups(),
            offsets: self.list_offsets(),
            dispatched: group_offsets(&self.dispatched.read()),
        }
    }

    /// Slave side: replaces topics, offsets and delivery marks with the
    /// master's, and persists them, so a promotion continues from them.
    pub fn apply_snapshot(&self, snap: MetadataSnapshot) -> Result<(), StoreError> {
        let key = |o: GroupOffset| ((o.group, o.topic, o.queue_id), o.offset);
        let topics: BTreeMap<String, TopicConfig> = snap
            .topics
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let offsets: BTreeMap<OffsetKey, u64> = snap.offsets.into_iter().map(key).collect();
        let groups: BTreeMap<String, GroupConfig> = snap
            .groups
            .into_iter()
            .map(|g| (g.name.clone(), g))
            .collect();
        let _w = self.write.lock();
        if *self.groups.read() != groups {
            *self.groups.write() = groups;
            self.persist_groups()?;
        }
        let topics_changed = *self.topics.read() != topics;
        let offsets_changed = *self.offsets.read() != offsets;
        *self.dispatched.write() = snap.dispatched.into_iter().map(key).collect();
        if offsets_changed {
            *self.offsets.write() = offsets;
            self.offsets_dirty.store(true, Ordering::Release);
        }
        if topics_changed {
            *self.topics.write() = topics;
            self.persist_topics()?;
        } else {
            self.version.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }

    pub fn get_offset(&self, group: &str, topic: &str, queue_id: u32) -> Option<u64> {
        self.offsets
            .read()
            .get(&(group.to_owned(), topic.to_owned(), queue_id))
            .copied()
    }

    pub fn list_offsets(&self) -> Vec<GroupOffset> {
        group_offsets(&self.offsets.read())
    }

    /// Writes the offsets file if anything changed since the last write.
    pub fn flush_offsets(&self) -> Result<(), StoreError> {
        if !self.offsets_dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let _w = self.write.lock();
        let file = OffsetsFile {
            offsets: self.list_offsets(),
        };
        let res = save_json(&self.dir.join("offsets.json"), &file);
        if res.is_err() {
            self.offsets_dirty.store(true, Ordering::Release);
        }
        res
    }

    fn persist_groups(&self) -> Result<(), StoreError> {
        self.version.fetch_add(1, Ordering::Release);
        let file = GroupsFile {
            groups: self.list_groups(),
        };
        save_json(&self.dir.join("groups.json"), &file)
    }

    fn persist_topics(&self) -> Result<(), StoreError> {
        self.version.fetch_add(1, Ordering::Release);
        let file = TopicsFile {
            topics: self.list_topics(),
        };
        save_json(&self.dir.join("topics.json"), &file)?;
        // The flag goes down before the offsets are read, as in
        // `flush_offsets`: one committed after the read raises it again
        // (lowered after the write, it was lost, and the commit with it
        // until another came).
        if self.offsets_dirty.swap(false, Ordering::AcqRel) {
            let file = OffsetsFile {
                offsets: self.list_offsets(),
            };
            let res = save_json(&self.dir.join("offsets.json"), &file);
            if res.is_err() {
                self.offsets_dirty.store(true, Ordering::Release);
            }
            res?;
        }
        Ok(())
    }
}

/// Sets one queue's value; whether it changed.
fn set_offset(
    map: &mut BTreeMap<OffsetKey, u64>,
    group: &str,
    topic: &str,
    queue_id: u32,
    value: u64,
) -> bool {
    let slot = map
        .entry((group.to_owned(), topic.to_owned(), queue_id))
        .or_insert(0);
    let changed = *slot != value;
    *slot = value;
    changed
}

fn group_offsets(map: &BTreeMap<OffsetKey, u64>) -> Vec<GroupOffset> {
    map.iter()
        .map(|((group, topic, queue_id), offset)| GroupOffset {
            group: group.clone(),
            topic: topic.clone(),
            queue_id: *queue_id,
            offset: *offset,
        })
        .collect()
}

fn check_queue_count(n: u32) -> Result<(), StoreError> {
    if n == 0 || n > MAX_QUEUES {
        return Err(StoreError::InvalidArgument(format!(
            "queue count {n} out of range (1 to {MAX_QUEUES})"
        )));
    }
    Ok(())
}

/// Reads a JSON file; a missing file gives the default value.
pub fn load_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            offset: 0,
            reason: format!("{} is not valid: {e}", path.display()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(StoreError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Writes a JSON file atomically.
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
    persist_atomically(path, &bytes).map_err(StoreError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, q: u32) -> TopicConfig {
        TopicConfig {
            name: name.into(),
            queue_count: q,
            message_type: MessageType::Fifo,
        }
    }

    #[test]
    fn topics_and_offsets_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Metadata::open(dir.path()).expect("open");
        m.create_topic(topic("orders", 4)).expect("create");
        assert!(matches!(
            m.create_topic(topic("orders", 4)),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            m.create_topic(topic("bad name", 4)),
            Err(StoreError::InvalidName(_))
        ));
        assert!(matches!(
            m.create_topic(topic("zero", 0)),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            m.update_topic_queues("orders", 2),
            Err(StoreError::InvalidArgument(_))
        ));
        assert_eq!(
            m.update_topic_queues("orders", 8)
                .expect("grow")
                .queue_count,
            8
        );
        m.commit_offset("g1", "orders", 3, 17);
        m.flush_offsets().expect("flush");
        drop(m);
        let m = Metadata::open(dir.path()).expect("reopen");
        assert_eq!(m.get_topic("orders"), Some(topic("orders", 8)));
        assert_eq!(m.get_offset("g1", "orders", 3), Some(17));
        m.delete_topic("orders").expect("delete");
        assert!(matches!(
            m.delete_topic("orders"),
            Err(StoreError::NotFound(_))
        ));
        drop(m);
        let m = Metadata::open(dir.path()).expect("reopen");
        assert!(m.list_topics().is_empty());
        assert!(m.list_offsets().is_empty());
    }

    #[test]
    fn message_type_parses() {
        assert_eq!("fifo".parse::<MessageType>(), Ok(MessageType::Fifo));
        assert!("lifo".parse::<MessageType>().is_err());
    }

    #[test]
    fn group_settings_persist_and_reach_a_slave() {
        use crate::store::group_config::{GroupConfig, RetryBackoff};
        let (m_dir, s_dir) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let master = Metadata::open(m_dir.path()).expect("open");
        let slave = Metadata::open(s_dir.path()).expect("open");
        let g = GroupConfig {
            name: "billing".into(),
            max_delivery_attempts: 3,
            retry_backoff: RetryBackoff::Customized {
                steps_ms: vec![500, 2000],
            },
        };
        let before = master.version();
        master.set_group(g.clone()).expect("set");
        assert!(master.version() > before, "slaves must be sent the change");
        assert!(
            master
                .set_group(GroupConfig {
                    max_delivery_attempts: 0,
                    ..g.clone()
                })
                .is_err()
        );
        assert_eq!(master.max_delivery_attempts("billing"), 3);
        assert_eq!(master.max_delivery_attempts("other"), 17);
        slave.apply_snapshot(master.snapshot()).expect("apply");
        assert_eq!(slave.get_group("billing"), Some(g.clone()));
        // Both keep it across a restart.
        drop((master, slave));
        for dir in [&m_dir, &s_dir] {
            let reopened = Metadata::open(dir.path()).expect("reopen");
            assert_eq!(reopened.get_group("billing"), Some(g.clone()));
        }
        // Removing it reaches the slave too.
        let master = Metadata::open(m_dir.path()).expect("reopen");
        master.delete_group("billing").expect("delete");
        assert!(master.delete_group("billing").is_err());
        let slave = Metadata::open(s_dir.path()).expect("reopen");
        slave.apply_snapshot(master.snapshot()).expect("apply");
        assert_eq!(slave.get_group("billing"), None);
        assert_eq!(
            slave.group_or_default("billing"),
            GroupConfig::defaults("billing")
        );
    }
}
