//! Frames of the replication stream between a master and one slave.
//!
//! Every frame is `u32 length` (big endian, of what follows), `u8 kind`, then
//! the payload. Control frames carry small JSON documents (rare, and easy to
//! read in a packet capture); the hot frames (`Data`, `Ack`, `Heartbeat`) are
//! fixed binary layouts.
//!
//! ```text
//! slave                                   master
//!   Hello{id, store, epochs, end, fence} ->
//!                                      <- Welcome{epoch, epochs, start, end} | Reject{reason}
//!   Start{from}                          ->
//!                                      <- Data{epoch, offset, bytes} ...
//!                                      <- Heartbeat{epoch, end, confirmed}
//!                                      <- Metadata{topics, offsets, marks}
//!   Ack{durable offset}                  ->
//! ```

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::epoch::EpochEntry;
use crate::store::MetadataSnapshot;

/// Largest frame accepted; a `Data` frame carries at most one read batch.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_REJECT: u8 = 3;
const KIND_START: u8 = 4;
const KIND_DATA: u8 = 5;
const KIND_ACK: u8 = 6;
const KIND_HEARTBEAT: u8 = 7;
const KIND_METADATA: u8 = 8;

/// A slave's introduction: who it is and what its log holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub broker_id: String,
    /// Random id created with the slave's data directory.
    pub store_id: String,
    pub epochs: Vec<EpochEntry>,
    /// End of the slave's commit log.
    pub max_offset: u64,
    /// The highest epoch the slave has been told about; a master of a lower
    /// epoch is stale.
    pub fence_epoch: u64,
    /// The slave's admin endpoint, reported in the master's status.
    pub admin_address: String,
    /// The slave's own replication endpoint, for a switchover to it.
    pub replication_address: String,
}

/// The master's answer to an acceptable [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub broker_id: String,
    /// The master's client endpoint (`host:port`); empty from older brokers.
    #[serde(default)]
    pub client_endpoint: String,
    pub epoch: u64,
    pub epochs: Vec<EpochEntry>,
    pub max_offset: u64,
    /// Where the master's log starts (its oldest segment); 0 from older
    /// brokers. A slave whose log ends before it starts its log again there.
    #[serde(default)]
    pub min_offset: u64,
}

/// One message of the replication protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Reject {
        reason: String,
    },
    /// The slave wants the stream from this offset (a record boundary).
    Start {
        from: u64,
    },
    /// Raw commit-log bytes (whole records) written under `epoch`, starting at `offset`.
    Data {
        epoch: u64,
        offset: u64,
        bytes: Bytes,
    },
    /// The slave durably holds everything below `offset`.
    Ack {
        offset: u64,
    },
    /// Sent by the master when there is nothing to stream, and between
    /// `Data` frames at the same pace while it streams a backlog: `max_offset`
    /// is where the master's log ends, which tells a slave how far behind it
    /// is (its readiness).
    Heartbeat {
        epoch: u64,
        max_offset: u64,
    },
    /// The master's topics and consumer progress, sent when they change.
    Metadata(MetadataSnapshot),
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl Frame {
    /// The frame's body as a head and a payload written after it: `Data`
    /// frames keep their bytes where they are (no copy into the head).
    fn encode(&self) -> Result<(Vec<u8>, &[u8]), FrameError> {
        let json = |kind: u8, v: &dyn erased::Json| -> Result<Vec<u8>, FrameError> {
            let mut out = vec![kind];
            out.extend(v.to_json()?);
            Ok(out)
        };
        let head = match self {
            Frame::Hello(h) => json(KIND_HELLO, h)?,
            Frame::Welcome(w) => json(KIND_WELCOME, w)?,
            Frame::Reject { reason } => json(KIND_REJECT, reason)?,
            Frame::Metadata(m) => json(KIND_METADATA, m)?,
            Frame::Start { from } => u64s(KIND_START, &[*from]),
            Frame::Ack { offset } => u64s(KIND_ACK, &[*offset]),
            Frame::Heartbeat { epoch, max_offset } => u64s(KIND_HEARTBEAT, &[*epoch, *max_offset]),
            Frame::Data {
                epoch,
                offset,
                bytes,
            } => return Ok((u64s(KIND_DATA, &[*epoch, *offset]), &bytes[..])),
        };
        Ok((head, &[]))
    }

    fn decode(body: Bytes) -> Result<Frame, FrameError> {
        let (&kind, rest) = body
            .split_first()
            .ok_or_else(|| FrameError::Malformed("empty frame".into()))?;
        let bad = |e: serde_json::Error| FrameError::Malformed(e.to_string());
        Ok(match kind {
            KIND_HELLO => Frame::Hello(serde_json::from_slice(rest).map_err(bad)?),
            KIND_WELCOME => Frame::Welcome(serde_json::from_slice(rest).map_err(bad)?),
            KIND_METADATA => Frame::Metadata(serde_json::from_slice(rest).map_err(bad)?),
            KIND_REJECT => Frame::Reject {
                reason: serde_json::from_slice(rest).map_err(bad)?,
            },
            KIND_START => Frame::Start {
                from: read_u64s::<1>(rest)?[0],
            },
            KIND_ACK => Frame::Ack {
                offset: read_u64s::<1>(rest)?[0],
            },
            KIND_HEARTBEAT => {
                let [epoch, max_offset] = read_u64s::<2>(rest)?;
                Frame::Heartbeat { epoch, max_offset }
            }
            KIND_DATA => {
                let [epoch, offset] = read_u64s::<2>(rest)?;
                Frame::Data {
                    epoch,
                    offset,
                    bytes: body.slice(17..),
                }
            }
            other => return Err(FrameError::Malformed(format!("unknown frame kind {other}"))),
        })
    }
}

mod erased {
    use super::FrameError;

    /// Object-safe "serialize to JSON" so `encode` can share one closure.
    pub trait Json {
        fn to_json(&self) -> Result<Vec<u8>, FrameError>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<Vec<u8>, FrameError> {
            serde_json::to_vec(self).map_err(|e| FrameError::Malformed(e.to_string()))
        }
    }
}

fn u64s(kind: u8, values: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 * values.len());
    out.push(kind);
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

fn read_u64s<const N: usize>(bytes: &[u8]) -> Result<[u64; N], FrameError> {
    if bytes.len() < 8 * N {
        return Err(FrameError::Malformed(format!(
            "expected {} bytes, got {}",
            8 * N,
            bytes.len()
        )));
    }
    let mut out = [0u64; N];
    for (i, v) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        *v = u64::from_be_bytes(b);
    }
    Ok(out)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let (head, payload) = frame.encode()?;
    let size = head.len() + payload.len();
    if size > MAX_FRAME {
        return Err(FrameError::TooLarge(size));
    }
    let len = u32::try_from(size).map_err(|_| FrameError::TooLarge(size))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// Whether `buffered` (bytes already read from the stream) holds at least
/// one whole frame, so reading it will not wait on the network. A reader
/// uses this to answer a run of frames once instead of once per frame.
pub fn holds_whole_frame(buffered: &[u8]) -> bool {
    match buffered.get(..4) {
        Some(len) => {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            buffered.len() - 4 >= len
        }
        None => false,
    }
}

/// Reads one frame; [`FrameError::Closed`] on a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Frame::decode(Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(frame: Frame) -> Frame {
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).await.expect("write");
        let mut slice = buf.as_slice();
        read_frame(&mut slice).await.expect("read")
    }

    #[tokio::test]
    async fn every_kind_round_trips() {
        let frames = vec![
            Frame::Hello(Hello {
                broker_id: "b-1".into(),
                store_id: "s".into(),
                epochs: vec![EpochEntry {
                    epoch: 2,
                    start_offset: 10,
                }],
                max_offset: 99,
                fence_epoch: 3,
                admin_address: "127.0.0.1:8082".into(),
                replication_address: "127.0.0.1:10912".into(),
            }),
            Frame::Welcome(Welcome {
                broker_id: "b-0".into(),
                client_endpoint: "127.0.0.1:8081".into(),
                epoch: 3,
                epochs: vec![],
                max_offset: 7,
                min_offset: 4096,
            }),
            Frame::Reject {
                reason: "stale".into(),
            },
            Frame::Start { from: 4096 },
            Frame::Data {
                epoch: 3,
                offset: 4096,
                bytes: Bytes::from_static(b"records"),
            },
            Frame::Ack { offset: 1 << 40 },
            Frame::Heartbeat {
                epoch: 3,
                max_offset: 5,
            },
            Frame::Metadata(MetadataSnapshot {
                topics: vec![crate::store::TopicConfig {
                    name: "orders".into(),
                    queue_count: 4,
                    message_type: crate::store::MessageType::Fifo,
                }],
                groups: vec![crate::store::group_config::GroupConfig {
                    name: "g".into(),
                    max_delivery_attempts: 4,
                    retry_backoff: crate::store::group_config::RetryBackoff::Exponential {
                        initial_ms: 100,
                        max_ms: 5000,
                        multiplier: 1.5,
                    },
                }],
                offsets: vec![crate::store::GroupOffset {
                    group: "g".into(),
                    topic: "orders".into(),
                    queue_id: 2,
                    offset: 17,
                }],
                dispatched: vec![],
            }),
        ];
        for f in frames {
            assert_eq!(round_trip(f.clone()).await, f);
        }
    }

    #[tokio::test]
    async fn a_whole_frame_is_told_from_a_part_of_one() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Frame::Ack { offset: 9 })
            .await
            .expect("write");
        write_frame(
            &mut wire,
            &Frame::Data {
                epoch: 1,
                offset: 9,
                bytes: Bytes::from_static(b"abc"),
            },
        )
        .await
        .expect("write");
        let ack_len = 4 + 1 + 8;
        assert!(!holds_whole_frame(&[]));
        assert!(!holds_whole_frame(&wire[..3]));
        for cut in 4..ack_len {
            assert!(!holds_whole_frame(&wire[..cut]), "{cut}");
        }
        assert!(holds_whole_frame(&wire[..ack_len]));
        assert!(!holds_whole_frame(&wire[ack_len..wire.len() - 1]));
        assert!(holds_whole_frame(&wire[ack_len..]));
        let mut slice = &wire[ack_len..];
        assert_eq!(
            read_frame(&mut slice).await.expect("read"),
            Frame::Data {
                epoch: 1,
                offset: 9,
                bytes: Bytes::from_static(b"abc"),
            }
        );
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        for input in [
            &[0u8, 0, 0, 1, 99][..],
            &[0, 0, 0, 3, KIND_ACK, 1, 2][..],
            &[0, 0, 0, 2, KIND_HELLO, b'{'][..],
            &[0xff, 0xff, 0xff, 0xff][..],
            &[0, 0, 0, 9, KIND_DATA, 0][..],
        ] {
            let mut slice = input;
            assert!(read_frame(&mut slice).await.is_err(), "{input:?}");
        }
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read_frame(&mut empty).await,
            Err(FrameError::Closed)
        ));
    }
}
