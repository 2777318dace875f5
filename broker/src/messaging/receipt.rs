//! Receipt handles: what a consumer gets with each received message and
//! hands back to ack it or change its invisible time.
//!
//! Clients treat the handle as an opaque string. It names the queue entry
//! and the particular delivery (a per-broker sequence number), so an ack
//! for an older delivery of the same message, or for another broker's
//! message, is recognised as stale instead of acking the wrong delivery.

use std::fmt;

/// One delivery of one queue entry to one consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptHandle {
    /// Store id of the broker that handed the message out.
    pub store_id: String,
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    /// Unique per delivery on this broker.
    pub delivery: u64,
}

const PREFIX: &str = "k1";

impl fmt::Display for ReceiptHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX} {} {} {} {} {}",
            self.store_id, self.queue_id, self.queue_offset, self.delivery, self.topic
        )
    }
}

/// Why a handle could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed receipt handle")]
pub struct MalformedHandle;

impl std::str::FromStr for ReceiptHandle {
    type Err = MalformedHandle;
    fn from_str(s: &str) -> Result<Self, MalformedHandle> {
        let mut it = s.splitn(6, ' ');
        if it.next() != Some(PREFIX) {
            return Err(MalformedHandle);
        }
        let store_id = it
            .next()
            .filter(|v| !v.is_empty())
            .ok_or(MalformedHandle)?
            .to_owned();
        let queue_id = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(MalformedHandle)?;
        let queue_offset = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(MalformedHandle)?;
        let delivery = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(MalformedHandle)?;
        let topic = it
            .next()
            .filter(|v| !v.is_empty())
            .ok_or(MalformedHandle)?
            .to_owned();
        Ok(Self {
            store_id,
            topic,
            queue_id,
            queue_offset,
            delivery,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_garbage_is_refused() {
        let h = ReceiptHandle {
            store_id: "abc".into(),
            topic: "%RETRY%g|t".into(),
            queue_id: 3,
            queue_offset: 42,
            delivery: 7,
        };
        assert_eq!(h.to_string().parse::<ReceiptHandle>(), Ok(h));
        for bad in [
            "",
            "k1",
            "k1 abc 3 x 7 t",
            "k2 abc 3 42 7 t",
            "k1 abc 3 42 7 ",
            "k1  3 42 7 t",
        ] {
            assert_eq!(
                bad.parse::<ReceiptHandle>(),
                Err(MalformedHandle),
                "{bad:?}"
            );
        }
    }
}
