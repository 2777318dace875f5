//! The commit-log record: the unit every other part of the broker agrees on.
//!
//! A record is self-describing and checksummed, so the commit log can be
//! scanned, verified and replicated without any side index:
//!
//! ```text
//! offset size field
//!      0    4 total length of the record in bytes (including this field)
//!      4    4 magic (RECORD_MAGIC, or BLANK_MAGIC for the filler that ends a segment)
//!      8    4 CRC32C of bytes [12, total)
//!     12    4 flags
//!     16    4 queue id
//!     20    8 queue offset (index of the record in its consume queue)
//!     28    8 commit-log offset of this record (self-check on recovery)
//!     36    8 born timestamp (ms since the Unix epoch, set by the producer)
//!     44    8 store timestamp (ms since the Unix epoch, set by the broker)
//!     52    2 topic length, then the topic bytes (UTF-8)
//!      …    4 properties length, then the properties (key/value pairs)
//!      …    4 body length, then the body
//! ```
//!
//! All integers are little-endian. A blank filler is the first eight bytes
//! (length and magic); what follows them up to the end of its segment is
//! not part of the log (zeros, or an older segment's bytes in a reused
//! file), except that a filler of 16 bytes or more ends with the
//! segment-relative offset where it starts (u64), so that it can be found
//! with one read.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::StoreError;

/// Marks a record.
pub const RECORD_MAGIC: u32 = 0x4B4D_5131;
/// Marks the filler that closes a segment whose free space is too small for
/// the next record.
pub const BLANK_MAGIC: u32 = 0x4B4D_5142;
/// Bytes before the topic.
pub const FIXED_HEADER_LEN: usize = 54;
/// Every segment keeps room for a blank filler header after its last record.
pub const BLANK_LEN: usize = 8;
/// Longest topic name, as in RocketMQ.
pub const MAX_TOPIC_LEN: usize = 127;
/// Longest retry or dead-letter topic name (`%RETRY%<group>`,
/// `%DLQ%<group>`), as in RocketMQ: a group may itself be as long as a topic.
pub const MAX_GROUP_TOPIC_LEN: usize = 255;

/// Flag bits carried by a record; the messaging layer gives them meaning.
pub mod flags {
    /// A prepared (half) transactional message: invisible until committed.
    pub const TRANSACTION_HALF: u32 = 1 << 0;
    /// A transaction commit or rollback marker for a half message.
    pub const TRANSACTION_END: u32 = 1 << 1;
    /// A message scheduled for later delivery, held by the timer store.
    pub const DELAYED: u32 = 1 << 2;
    /// A broker-internal state record (offsets, timers, in-flight state).
    pub const SYSTEM: u32 = 1 << 3;
}

/// Flag bits the store keeps for itself: cleared from what is appended,
/// never shown in a [`StoredRecord`].
pub const STORE_FLAGS: u32 = FLUSHED_BEFORE;

/// Set by the SYNC_FLUSH flusher on the first record of a group it writes
/// when the whole log before that group was already durable. Recovery
/// reads damage followed by such a record as a lost write of flushed data
/// (corruption), and damage followed by none as what a power loss leaves
/// of the group whose flush it interrupted (see `recovery::settle`).
pub const FLUSHED_BEFORE: u32 = 1 << 31;

/// Well-known property keys. User properties use any other key.
pub mod keys {
    /// The message id assigned by the producer.
    pub const MESSAGE_ID: &str = "__MSGID";
    /// Message keys: space-separated, or each after a U+001F when one of
    /// them holds a space (see `client_api::convert`).
    pub const KEYS: &str = "__KEYS";
    /// The tag used by filter expressions.
    pub const TAG: &str = "__TAG";
    /// The FIFO message group.
    pub const MESSAGE_GROUP: &str = "__MSG_GROUP";
    /// Delivery timestamp (ms) of a delayed message.
    pub const DELIVERY_TIME: &str = "__DELIVERY_MS";
    /// Transaction state (half/commit/rollback) of a transactional message.
    pub const TRANSACTION_STATE: &str = "__TX_STATE";
    /// The producer's host, reported back to consumers.
    pub const BORN_HOST: &str = "__BORN_HOST";
    /// Queue a delayed message goes to when due.
    pub const ORIGIN_QUEUE: &str = "__ORIGIN_QUEUE";
    /// Topic a dead-lettered or delayed message came from (or goes to).
    pub const ORIGIN_TOPIC: &str = "__ORIGIN_TOPIC";
    /// Deliveries a dead-lettered message had.
    pub const DELIVERY_ATTEMPTS: &str = "__DELIVERY_ATTEMPTS";
    /// Half-queue offset a transaction decision (op record) refers to.
    pub const HALF_OFFSET: &str = "__HALF_OFFSET";
    /// How long (ms) a half message is left alone before it is checked back.
    pub const CHECK_AFTER_MS: &str = "__TX_CHECK_AFTER_MS";
    /// Check-backs a half message has had (an op record written with each
    /// check, so the count survives restarts and failovers).
    pub const TRANSACTION_CHECKS: &str = "__TX_CHECKS";
}

/// Message properties: ordered, so the encoding of a record is deterministic.
pub type Properties = BTreeMap<String, String>;

/// A record to append; the store assigns the offsets and the store time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewRecord {
    pub topic: String,
    pub queue_id: u32,
    pub born_ms: i64,
    pub flags: u32,
    pub properties: Properties,
    pub body: Bytes,
}

impl NewRecord {
    /// A record with no properties and no flags, born now.
    pub fn new(topic: impl Into<String>, queue_id: u32, body: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            queue_id,
            born_ms: now_ms(),
            flags: 0,
            properties: Properties::new(),
            body: body.into(),
        }
    }

    /// Sets a property (builder style).
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN
            + self.topic.len()
            + 4
            + properties_len(&self.properties)
            + 4
            + self.body.len()
    }

    /// Checks what can be checked without the store's state.
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_topic(&self.topic)?;
        for (k, v) in &self.properties {
            if k.is_empty() || k.len() > u16::MAX as usize || v.len() > u32::MAX as usize {
                return Err(StoreError::InvalidArgument(format!(
                    "property key {k:?} is empty or too long"
                )));
            }
        }
        Ok(())
    }
}

/// Where the store put a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Commit-log offset of the record.
    pub offset: u64,
    /// Commit-log offset just past the record.
    pub end_offset: u64,
    /// Index of the record in its consume queue.
    pub queue_offset: u64,
    /// Store timestamp assigned.
    pub store_ms: i64,
    /// Cuts of the log (a returning master following another) before this
    /// append: [`super::MessageStore::wait_appended`] fails if one happened
    /// since, as the record may be gone.
    pub log_cuts: u64,
}

/// A record read back from the commit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub size: u32,
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub born_ms: i64,
    pub store_ms: i64,
    pub flags: u32,
    pub properties: Properties,
    pub body: Bytes,
}

impl StoredRecord {
    /// The tag property, if any.
    pub fn tag(&self) -> Option<&str> {
        self.properties.get(keys::TAG).map(String::as_str)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Topic names: 1..=127 characters of `[A-Za-z0-9_%|-]` (RocketMQ's rule;
/// `%` appears in retry and dead-letter topics), up to 255 for retry and
/// dead-letter topics.
pub fn validate_topic(topic: &str) -> Result<(), StoreError> {
    let max = if topic.starts_with("%DLQ%") || topic.starts_with("%RETRY%") {
        MAX_GROUP_TOPIC_LEN
    } else {
        MAX_TOPIC_LEN
    };
    let ok = !topic.is_empty()
        && topic.len() <= max
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'%' | b'|'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(format!(
            "{topic:?}: topic names are 1 to {MAX_TOPIC_LEN} characters of letters, digits, '_', '-', '%' and '|' ({MAX_GROUP_TOPIC_LEN} for %RETRY% and %DLQ% topics)"
        )))
    }
}

/// Stable 64-bit hash of a tag (FNV-1a), kept in consume-queue entries so
/// tag filters can skip records without reading them. 0 means "no tag".
pub fn tag_hash(tag: Option<&str>) -> u64 {
    let Some(tag) = tag else { return 0 };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

fn properties_len(p: &Properties) -> usize {
    p.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum()
}

/// Writes `rec` into `dst` (exactly `rec.encoded_len()` bytes) with the
/// given offsets, and fills in the checksum.
pub fn encode_into(dst: &mut [u8], rec: &NewRecord, offset: u64, queue_offset: u64, store_ms: i64) {
    let total = dst.len();
    debug_assert_eq!(total, rec.encoded_len());
    let mut w = Writer { buf: dst, pos: 0 };
    w.u32(total as u32);
    w.u32(RECORD_MAGIC);
    w.u32(0);
    w.u32(rec.flags & !STORE_FLAGS);
    w.u32(rec.queue_id);
    w.u64(queue_offset);
    w.u64(offset);
    w.u64(rec.born_ms as u64);
    w.u64(store_ms as u64);
    w.u16(rec.topic.len() as u16);
    w.bytes(rec.topic.as_bytes());
    w.u32(properties_len(&rec.properties) as u32);
    for (k, v) in &rec.properties {
        w.u16(k.len() as u16);
        w.bytes(k.as_bytes());
        w.u32(v.len() as u32);
        w.bytes(v.as_bytes());
    }
    w.u32(rec.body.len() as u32);
    w.bytes(&rec.body);
    seal(dst);
}

/// Fills in the checksum of the encoded record `rec` (exactly one whole
/// record), over everything after it.
pub fn seal(rec: &mut [u8]) {
    let crc = crc32c::crc32c(&rec[12..]);
    rec[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// The header of a filler `len` bytes long (header included), which closes
/// a segment from where it starts to the segment's end.
pub fn blank_header(len: u32) -> [u8; BLANK_LEN] {
    let mut h = [0u8; BLANK_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&BLANK_MAGIC.to_le_bytes());
    h
}

/// Sets or clears [`FLUSHED_BEFORE`] on the encoded record `rec` (exactly
/// one whole record) and recomputes its checksum.
pub fn set_flushed_before(rec: &mut [u8], on: bool) {
    let flags = le_u32(rec, 12);
    let flags = if on {
        flags | FLUSHED_BEFORE
    } else {
        flags & !FLUSHED_BEFORE
    };
    rec[12..16].copy_from_slice(&flags.to_le_bytes());
    seal(rec);
}

/// `bytes` of a log (whole records and segment fillers, from a record's
/// start) with every record's [`FLUSHED_BEFORE`] mark cleared: what a
/// master's and its slave's copies of the log have in common, as each sets
/// the mark by its own flushes.
pub fn without_flush_marks(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let mut at = 0;
    while at + 8 <= out.len() {
        let len = le_u32(&out, at) as usize;
        if len < 8 || at + len > out.len() {
            break;
        }
        if le_u32(&out, at + 4) == RECORD_MAGIC && is_flushed_before(&out[at..at + len]) {
            set_flushed_before(&mut out[at..at + len], false);
        }
        at += len;
    }
    out
}

/// Whether a checked record carries [`FLUSHED_BEFORE`].
pub fn is_flushed_before(rec: &[u8]) -> bool {
    rec.len() >= 16 && le_u32(rec, 12) & FLUSHED_BEFORE != 0
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// What is found at a position of the commit log.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// A complete record whose checksum matches; `len` bytes long.
    Record {
        len: usize,
        queue_offset: u64,
        queue_id: u32,
    },
    /// The filler that closes the segment.
    Blank,
    /// Zeros: nothing was ever written here.
    Empty,
    /// Anything else: a torn or corrupt record, with the reason.
    Bad(String),
}

/// Reads a little-endian u32 at `at` (caller guarantees the bounds).
pub fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Reads a little-endian u64 at `at` (caller guarantees the bounds).
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Examines the bytes at the start of `b`, which is everything from the
/// position to the end of its segment; `offset` is the position's
/// commit-log offset (records carry it, so a record copied to the wrong
/// place is caught).
pub fn probe(b: &[u8], offset: u64) -> Probe {
    if b.len() < BLANK_LEN {
        return if b.iter().all(|&x| x == 0) {
            Probe::Empty
        } else {
            Probe::Bad("bytes in the space reserved at the end of the segment".into())
        };
    }
    let len = le_u32(b, 0) as usize;
    let magic = le_u32(b, 4);
    if len == 0 && magic == 0 {
        return Probe::Empty;
    }
    if magic == BLANK_MAGIC {
        return if len == b.len() {
            Probe::Blank
        } else {
            Probe::Bad(format!(
                "segment filler of {len} bytes where {} remain",
                b.len()
            ))
        };
    }
    if magic != RECORD_MAGIC {
        return Probe::Bad(format!("bad magic {magic:#010x}"));
    }
    if len < FIXED_HEADER_LEN + 8 || len > b.len() {
        return Probe::Bad(format!("record length {len} out of range"));
    }
    let rec = &b[..len];
    let crc = le_u32(rec, 8);
    if crc32c::crc32c(&rec[12..]) != crc {
        return Probe::Bad("checksum mismatch".into());
    }
    let stored_offset = le_u64(rec, 28);
    if stored_offset != offset {
        return Probe::Bad(format!("record claims offset {stored_offset}"));
    }
    if let Err(e) = decode_fields(rec) {
        return Probe::Bad(e);
    }
    Probe::Record {
        len,
        queue_offset: le_u64(rec, 20),
        queue_id: le_u32(rec, 16),
    }
}

/// Decodes one complete record (`b` is exactly the record) and checks its
/// checksum: corrupt bytes are reported, never returned.
pub fn decode(b: &[u8], offset: u64) -> Result<StoredRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { offset, reason };
    if b.len() < FIXED_HEADER_LEN + 8 {
        return Err(corrupt("short record".into()));
    }
    if le_u32(b, 4) != RECORD_MAGIC || le_u32(b, 0) as usize != b.len() {
        return Err(corrupt("bad header".into()));
    }
    if crc32c::crc32c(&b[12..]) != le_u32(b, 8) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (topic, properties, body) = decode_fields(b).map_err(corrupt)?;
    Ok(StoredRecord {
        offset,
        size: b.len() as u32,
        topic,
        queue_id: le_u32(b, 16),
        queue_offset: le_u64(b, 20),
        born_ms: le_u64(b, 36) as i64,
        store_ms: le_u64(b, 44) as i64,
        flags: le_u32(b, 12) & !STORE_FLAGS,
        properties,
        body: Bytes::copy_from_slice(body),
    })
}

/// Topic, properties and body of a record whose header has been checked.
fn decode_fields(b: &[u8]) -> Result<(String, Properties, &[u8]), String> {
    let mut r = Reader { b, pos: 52 };
    let tlen = r.u16()? as usize;
    let topic = std::str::from_utf8(r.take(tlen)?)
        .map_err(|_| "topic is not UTF-8".to_string())?
        .to_owned();
    let plen = r.u32()? as usize;
    let props = r.take(plen)?;
    let mut properties = Properties::new();
    let mut pr = Reader { b: props, pos: 0 };
    while pr.pos < props.len() {
        let kl = pr.u16()? as usize;
        let k = pr.take(kl)?;
        let vl = pr.u32()? as usize;
        let v = pr.take(vl)?;
        let k = std::str::from_utf8(k).map_err(|_| "property key is not UTF-8".to_string())?;
        let v = std::str::from_utf8(v).map_err(|_| "property value is not UTF-8".to_string())?;
        properties.insert(k.to_owned(), v.to_owned());
    }
    let blen = r.u32()? as usize;
    let body = r.take(blen)?;
    if r.pos != b.len() {
        return Err(format!("{} trailing bytes", b.len() - r.pos));
    }
    Ok((topic, properties, body))
}

/// The topic and tag hash of a checked record, for consume-queue dispatch
/// without decoding the body.
pub fn topic_and_tag_hash(b: &[u8]) -> Result<(&str, u64), String> {
    let mut r = Reader { b, pos: 52 };
    let tlen = r.u16()? as usize;
    let topic = std::str::from_utf8(r.take(tlen)?).map_err(|_| "topic is not UTF-8".to_string())?;
    let plen = r.u32()? as usize;
    let props = r.take(plen)?;
    let mut pr = Reader { b: props, pos: 0 };
    let mut tag = None;
    while pr.pos < props.len() {
        let kl = pr.u16()? as usize;
        let k = pr.take(kl)?;
        let vl = pr.u32()? as usize;
        let v = pr.take(vl)?;
        if k == keys::TAG.as_bytes() {
            tag = std::str::from_utf8(v).ok();
        }
    }
    Ok((topic, tag_hash(tag)))
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err("field runs past the end of the record".into());
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(le_u32(self.take(4)?, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NewRecord {
        NewRecord::new("orders", 3, &b"hello world"[..])
            .with_property(keys::TAG, "paid")
            .with_property("user", "42")
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let rec = sample();
        let mut buf = vec![0u8; rec.encoded_len()];
        encode_into(&mut buf, &rec, 4096, 7, 1234);
        let back = decode(&buf, 4096).expect("decodes");
        assert_eq!(back.topic, "orders");
        assert_eq!(back.queue_id, 3);
        assert_eq!(back.queue_offset, 7);
        assert_eq!(back.store_ms, 1234);
        assert_eq!(back.born_ms, rec.born_ms);
        assert_eq!(back.properties, rec.properties);
        assert_eq!(&back.body[..], b"hello world");
        assert_eq!(back.tag(), Some("paid"));
        let (topic, hash) = topic_and_tag_hash(&buf).expect("fields");
        assert_eq!((topic, hash), ("orders", tag_hash(Some("paid"))));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let rec = sample();
        let mut buf = vec![0u8; rec.encoded_len()];
        encode_into(&mut buf, &rec, 0, 0, 1);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            let mut seg = bad.clone();
            seg.extend_from_slice(&[0u8; 64]);
            assert!(
                !matches!(probe(&seg, 0), Probe::Record { len, .. } if len == buf.len()),
                "flip at byte {i} not detected"
            );
            assert!(decode(&bad, 0).is_err(), "flip at byte {i} decoded");
        }
    }

    #[test]
    fn probe_tells_blank_empty_and_wrong_offset() {
        let mut seg = vec![0u8; 64];
        assert_eq!(probe(&seg, 0), Probe::Empty);
        seg[..BLANK_LEN].copy_from_slice(&blank_header(64));
        assert_eq!(probe(&seg, 0), Probe::Blank);
        let rec = sample();
        let mut buf = vec![0u8; rec.encoded_len()];
        encode_into(&mut buf, &rec, 100, 0, 1);
        assert!(matches!(probe(&buf, 100), Probe::Record { .. }));
        assert!(matches!(probe(&buf, 200), Probe::Bad(_)));
    }

    #[test]
    fn topic_names_follow_the_rule() {
        assert!(validate_topic("%DLQ%group-1").is_ok());
        assert!(validate_topic("").is_err());
        assert!(validate_topic("a b").is_err());
        assert!(validate_topic(&"x".repeat(128)).is_err());
        // The dead-letter topic of the longest group is valid.
        assert!(validate_topic(&format!("%DLQ%{}", "g".repeat(MAX_TOPIC_LEN))).is_ok());
        assert!(validate_topic(&format!("%DLQ%{}", "g".repeat(251))).is_err());
    }
}
