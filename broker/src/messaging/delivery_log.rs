//! The delivery log: every change to a consumer group's in-flight state
//! (messages handed out, invisible times changed, acks, moves to the
//! dead-letter topic) is appended to the commit log as one record of the
//! system topic [`DELIVERY_TOPIC`]. It is replicated and flushed like any
//! record, so a restarted broker, or a slave promoted to master, rebuilds
//! exactly which messages are in flight under which receipt handles by
//! replaying it from the progress stored in the metadata.
//!
//! A record holds the changes of one group on one topic, made under one
//! lock: entries set (in flight with a delivery number, attempt and
//! invisible time), entries removed (only if still under the same
//! delivery), and the new "next never handed out" offset of each queue.
//! The body is a small versioned binary layout; anything that does not
//! decode is skipped with an error log, never trusted.

/// The system topic of the delivery log (queue 0).
pub const DELIVERY_TOPIC: &str = "%SYS_DELIVERY%";

const VERSION: u8 = 1;
const SET: u8 = 1;
const REMOVE: u8 = 2;

/// One message handed out (or handed out again, or given a new invisible
/// time): it is in flight under `delivery` until `visible_at_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetEntry {
    pub queue_id: u32,
    pub queue_offset: u64,
    pub delivery: u64,
    pub attempt: u32,
    pub visible_at_ms: i64,
}

/// One delivery ended (acked, settled or dead-lettered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoveEntry {
    pub queue_id: u32,
    pub queue_offset: u64,
    pub delivery: u64,
}

/// The changes of one group on one topic, in the order they were made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryOps {
    pub group: String,
    pub topic: String,
    /// Store id of the broker that made the deliveries (receipt handles name it).
    pub issuer: String,
    pub sets: Vec<SetEntry>,
    pub removes: Vec<RemoveEntry>,
    /// Per queue, the first offset never handed out after these changes.
    pub nexts: Vec<(u32, u64)>,
}

impl DeliveryOps {
    pub fn new(group: &str, topic: &str, issuer: &str) -> Self {
        Self {
            group: group.to_owned(),
            topic: topic.to_owned(),
            issuer: issuer.to_owned(),
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && self.removes.is_empty() && self.nexts.is_empty()
    }

    /// The record body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            32 + self.group.len()
                + self.topic.len()
                + self.issuer.len()
                + self.sets.len() * 33
                + self.removes.len() * 21
                + self.nexts.len() * 12,
        );
        b.push(VERSION);
        for s in [&self.group, &self.topic, &self.issuer] {
            put_str(&mut b, s);
        }
        b.extend_from_slice(&(self.sets.len() as u32 + self.removes.len() as u32).to_be_bytes());
        // Removes first: a record never removes an entry it sets itself.
        for r in &self.removes {
            b.push(REMOVE);
            b.extend_from_slice(&r.queue_id.to_be_bytes());
            b.extend_from_slice(&r.queue_offset.to_be_bytes());
            b.extend_from_slice(&r.delivery.to_be_bytes());
        }
        for s in &self.sets {
            b.push(SET);
            b.extend_from_slice(&s.queue_id.to_be_bytes());
            b.extend_from_slice(&s.queue_offset.to_be_bytes());
            b.extend_from_slice(&s.delivery.to_be_bytes());
            b.extend_from_slice(&s.attempt.to_be_bytes());
            b.extend_from_slice(&s.visible_at_ms.to_be_bytes());
        }
        b.extend_from_slice(&(self.nexts.len() as u32).to_be_bytes());
        for (q, next) in &self.nexts {
            b.extend_from_slice(&q.to_be_bytes());
            b.extend_from_slice(&next.to_be_bytes());
        }
        b
    }

    /// Reads a record body; `None` when it is not one this version wrote.
    pub fn decode(body: &[u8]) -> Option<Self> {
        let mut r = Reader(body);
        if r.u8()? != VERSION {
            return None;
        }
        let mut ops = DeliveryOps::new(&r.str()?, &r.str()?, &r.str()?);
        let n = r.u32()?;
        for _ in 0..n {
            let kind = r.u8()?;
            let (queue_id, queue_offset, delivery) = (r.u32()?, r.u64()?, r.u64()?);
            match kind {
                REMOVE => ops.removes.push(RemoveEntry {
                    queue_id,
                    queue_offset,
                    delivery,
                }),
                SET => ops.sets.push(SetEntry {
                    queue_id,
                    queue_offset,
                    delivery,
                    attempt: r.u32()?,
                    visible_at_ms: r.u64()? as i64,
                }),
                _ => return None,
            }
        }
        let n = r.u32()?;
        for _ in 0..n {
            ops.nexts.push((r.u32()?, r.u64()?));
        }
        r.0.is_empty().then_some(ops)
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_be_bytes)
    }
    fn str(&mut self) -> Option<String> {
        let len = usize::from(self.take::<2>().map(u16::from_be_bytes)?);
        if self.0.len() < len {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(s.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeliveryOps {
        let mut ops = DeliveryOps::new("group-a", "orders", "store-1");
        ops.sets.push(SetEntry {
            queue_id: 3,
            queue_offset: 42,
            delivery: u64::MAX - 1,
            attempt: 2,
            visible_at_ms: 1_790_000_000_000,
        });
        ops.removes.push(RemoveEntry {
            queue_id: 0,
            queue_offset: 7,
            delivery: 9,
        });
        ops.nexts.push((3, 43));
        ops
    }

    #[test]
    fn round_trip() {
        let ops = sample();
        assert_eq!(DeliveryOps::decode(&ops.encode()), Some(ops));
        let empty = DeliveryOps::new("", "", "");
        assert!(empty.is_empty());
        assert_eq!(DeliveryOps::decode(&empty.encode()), Some(empty));
    }

    #[test]
    fn anything_malformed_is_refused() {
        let body = sample().encode();
        for cut in 0..body.len() {
            assert_eq!(DeliveryOps::decode(&body[..cut]), None, "cut at {cut}");
        }
        let mut trailing = body.clone();
        trailing.push(0);
        assert_eq!(DeliveryOps::decode(&trailing), None);
        let mut version = body.clone();
        version[0] = 9;
        assert_eq!(DeliveryOps::decode(&version), None);
        // The first op's kind byte, after the version and three strings.
        let kind_at = 1 + (2 + 7) + (2 + 6) + (2 + 7) + 4;
        let mut kind = body;
        assert_eq!(kind[kind_at], REMOVE);
        kind[kind_at] = 7;
        assert_eq!(DeliveryOps::decode(&kind), None);
    }
}
