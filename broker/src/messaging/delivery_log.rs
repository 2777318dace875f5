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
//!
//! Version 2 adds to each entry set the client the broker renews it for
//! (`auto_renew`) and until when, and the receive attempt (client id and
//! `attempt_id`) that claimed it, each as an index into a table of the
//! record; a record with none of these is still written as version 1, so a
//! broker of an earlier release reads it.

/// The system topic of the delivery log (queue 0).
pub const DELIVERY_TOPIC: &str = "%SYS_DELIVERY%";

const VERSION_1: u8 = 1;
const VERSION_2: u8 = 2;
const SET: u8 = 1;
const REMOVE: u8 = 2;

/// One message handed out (or handed out again, or given a new invisible
/// time): it is in flight under `delivery` until `visible_at_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetEntry {
    pub queue_id: u32,
    pub queue_offset: u64,
    pub delivery: u64,
    pub attempt: u32,
    pub visible_at_ms: i64,
    /// The client the delivery is renewed for, as 1 + an index into
    /// [`DeliveryOps::clients`]; 0: not renewed.
    pub renew_client: u16,
    /// Renewed until then at most (ms since the epoch; 0 when not renewed).
    pub renew_until_ms: i64,
    /// The receive attempt that claimed it, as 1 + an index into
    /// [`DeliveryOps::claims`]; 0: none.
    pub claim: u16,
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
    /// Client ids [`SetEntry::renew_client`] refers to.
    pub clients: Vec<String>,
    /// Receive attempts (client id, `attempt_id`) [`SetEntry::claim`]
    /// refers to.
    pub claims: Vec<(String, String)>,
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

    /// The [`SetEntry::renew_client`] of `client_id` in this record (added
    /// to [`DeliveryOps::clients`] if new); 0 when the table is full.
    pub fn client_ref(&mut self, client_id: &str) -> u16 {
        if let Some(i) = self.clients.iter().position(|c| c == client_id) {
            return i as u16 + 1;
        }
        if self.clients.len() >= usize::from(u16::MAX) {
            return 0;
        }
        self.clients.push(client_id.to_owned());
        self.clients.len() as u16
    }

    /// The [`SetEntry::claim`] of a receive attempt in this record (added to
    /// [`DeliveryOps::claims`] if new); 0 when the table is full.
    pub fn claim_ref(&mut self, client_id: &str, attempt_id: &str) -> u16 {
        if let Some(i) = self
            .claims
            .iter()
            .position(|(c, a)| c == client_id && a == attempt_id)
        {
            return i as u16 + 1;
        }
        if self.claims.len() >= usize::from(u16::MAX) {
            return 0;
        }
        self.claims
            .push((client_id.to_owned(), attempt_id.to_owned()));
        self.claims.len() as u16
    }

    /// The client a set entry is renewed for.
    pub fn renew_client_of(&self, s: &SetEntry) -> Option<&str> {
        let i = usize::from(s.renew_client).checked_sub(1)?;
        self.clients.get(i).map(String::as_str)
    }

    /// The receive attempt that claimed a set entry.
    pub fn claim_of(&self, s: &SetEntry) -> Option<(&str, &str)> {
        let i = usize::from(s.claim).checked_sub(1)?;
        self.claims.get(i).map(|(c, a)| (c.as_str(), a.as_str()))
    }

    /// Whether the record needs version 2 (renewals or receive attempts).
    fn extended(&self) -> bool {
        !self.clients.is_empty()
            || !self.claims.is_empty()
            || self
                .sets
                .iter()
                .any(|s| s.renew_client != 0 || s.claim != 0)
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
        let v2 = self.extended();
        b.push(if v2 { VERSION_2 } else { VERSION_1 });
        for s in [&self.group, &self.topic, &self.issuer] {
            put_str(&mut b, s);
        }
        if v2 {
            b.extend_from_slice(&(self.clients.len() as u16).to_be_bytes());
            for c in &self.clients {
                put_str(&mut b, c);
            }
            b.extend_from_slice(&(self.claims.len() as u16).to_be_bytes());
            for (c, a) in &self.claims {
                put_str(&mut b, c);
                put_str(&mut b, a);
            }
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
            if v2 {
                b.extend_from_slice(&s.renew_client.to_be_bytes());
                b.extend_from_slice(&s.renew_until_ms.to_be_bytes());
                b.extend_from_slice(&s.claim.to_be_bytes());
            }
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
        let v2 = match r.u8()? {
            VERSION_1 => false,
            VERSION_2 => true,
            _ => return None,
        };
        let mut ops = DeliveryOps::new(&r.str()?, &r.str()?, &r.str()?);
        if v2 {
            for _ in 0..r.u16()? {
                ops.clients.push(r.str()?);
            }
            for _ in 0..r.u16()? {
                ops.claims.push((r.str()?, r.str()?));
            }
        }
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
                SET => {
                    let mut s = SetEntry {
                        queue_id,
                        queue_offset,
                        delivery,
                        attempt: r.u32()?,
                        visible_at_ms: r.u64()? as i64,
                        ..SetEntry::default()
                    };
                    if v2 {
                        s.renew_client = r.u16()?;
                        s.renew_until_ms = r.u64()? as i64;
                        s.claim = r.u16()?;
                        // A reference past its table is malformed.
                        if (s.renew_client != 0 && ops.renew_client_of(&s).is_none())
                            || (s.claim != 0 && ops.claim_of(&s).is_none())
                        {
                            return None;
                        }
                    }
                    ops.sets.push(s);
                }
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
    fn u16(&mut self) -> Option<u16> {
        self.take::<2>().map(u16::from_be_bytes)
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
            ..SetEntry::default()
        });
        ops.removes.push(RemoveEntry {
            queue_id: 0,
            queue_offset: 7,
            delivery: 9,
        });
        ops.nexts.push((3, 43));
        ops
    }

    /// A record with renewals and receive attempts (version 2).
    fn sample_v2() -> DeliveryOps {
        let mut ops = sample();
        let renew_client = ops.client_ref("host@1#2");
        let claim = ops.claim_ref("host@1#2", "attempt-1");
        assert_eq!((renew_client, claim), (1, 1));
        assert_eq!(ops.client_ref("host@1#2"), 1, "deduplicated");
        ops.sets.push(SetEntry {
            queue_id: 1,
            queue_offset: 5,
            delivery: 77,
            attempt: 1,
            visible_at_ms: 1_790_000_060_000,
            renew_client,
            renew_until_ms: 1_790_010_800_000,
            claim,
        });
        let claim = ops.claim_ref("host@9#9", "a");
        ops.sets.push(SetEntry {
            queue_id: 1,
            queue_offset: 6,
            claim,
            ..SetEntry::default()
        });
        ops
    }

    #[test]
    fn round_trip() {
        let ops = sample();
        let body = ops.encode();
        assert_eq!(body[0], VERSION_1, "nothing of version 2 in it");
        assert_eq!(DeliveryOps::decode(&body), Some(ops));
        let ops = sample_v2();
        let body = ops.encode();
        assert_eq!(body[0], VERSION_2);
        let back = DeliveryOps::decode(&body).expect("decodes");
        assert_eq!(back.renew_client_of(&back.sets[1]), Some("host@1#2"));
        assert_eq!(
            back.claim_of(&back.sets[1]),
            Some(("host@1#2", "attempt-1"))
        );
        assert_eq!(back.claim_of(&back.sets[2]), Some(("host@9#9", "a")));
        assert_eq!(back.renew_client_of(&back.sets[0]), None);
        assert_eq!(back, ops);
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

        let body = sample_v2().encode();
        for cut in 0..body.len() {
            assert_eq!(DeliveryOps::decode(&body[..cut]), None, "v2 cut at {cut}");
        }
        // A set entry naming a client or attempt past the record's tables.
        for bad in [
            |s: &mut SetEntry| s.renew_client = 2,
            |s: &mut SetEntry| s.claim = 3,
        ] {
            let mut ops = sample_v2();
            bad(&mut ops.sets[1]);
            assert_eq!(DeliveryOps::decode(&ops.encode()), None);
        }
    }
}
