//! Between protocol messages and store records.

use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use md5::{Digest, Md5};
use pb::Code;

use super::{ClientApiConfig, status};
use crate::messaging::consumer::Delivered;
use crate::store::{MessageType, NewRecord, Properties, StoredRecord, TopicConfig, keys, now_ms};

/// Furthest a delivery time may lie ahead (RocketMQ's timer default: 3 days).
const MAX_DELAY_MS: i64 = 3 * 86_400_000;

/// Longest message group, as RocketMQ allows.
const MAX_GROUP_LEN: usize = 64;

/// Most user properties a message may carry, and most bytes of their keys
/// and values together (the RocketMQ proxy's limits): a consumer must be
/// able to receive what was sent.
const MAX_USER_PROPERTIES: usize = 128;
const MAX_USER_PROPERTIES_BYTES: usize = 16 << 10;

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the epoch of a timestamp from the wire; `None` when
/// that does not fit an `i64`.
fn ms(t: &prost_types::Timestamp) -> Option<i64> {
    t.seconds
        .checked_mul(1000)?
        .checked_add(i64::from(t.nanos) / 1_000_000)
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn message_type(t: MessageType) -> pb::MessageType {
    match t {
        MessageType::Normal => pb::MessageType::Normal,
        MessageType::Fifo => pb::MessageType::Fifo,
        MessageType::Delay => pb::MessageType::Delay,
        MessageType::Transaction => pb::MessageType::Transaction,
    }
}

/// One queue of a route: this broker, the master, read and write.
pub fn queue(cfg: &ClientApiConfig, topic: &TopicConfig, id: u32) -> pb::MessageQueue {
    queue_at(cfg, topic, id, &cfg.advertised_host, cfg.advertised_port)
}

/// One queue of a route served by the master at `host:port` (a slave
/// answering a route query points clients at its master).
pub fn queue_at(
    cfg: &ClientApiConfig,
    topic: &TopicConfig,
    id: u32,
    host: &str,
    port: u16,
) -> pb::MessageQueue {
    let scheme = if host.parse::<std::net::Ipv4Addr>().is_ok() {
        pb::AddressScheme::IPv4
    } else if host.parse::<std::net::Ipv6Addr>().is_ok() {
        pb::AddressScheme::IPv6
    } else {
        pb::AddressScheme::DomainName
    };
    pb::MessageQueue {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: topic.name.clone(),
        }),
        id: id as i32,
        permission: pb::Permission::ReadWrite as i32,
        broker: Some(pb::Broker {
            name: cfg.broker_name.clone(),
            id: 0,
            endpoints: Some(pb::Endpoints {
                scheme: scheme as i32,
                addresses: vec![pb::Address {
                    host: host.to_owned(),
                    port: i32::from(port),
                }],
            }),
        }),
        accept_message_types: vec![message_type(topic.message_type) as i32],
    }
}

/// Validates a message for `topic` and turns it into a record.
pub fn record(
    cfg: &ClientApiConfig,
    topic: &TopicConfig,
    m: &pb::Message,
    round_robin: u64,
    born_host: &str,
) -> Result<NewRecord, pb::Status> {
    // BAD_REQUEST, not MESSAGE_BODY_EMPTY (41302): the official Rust client
    // 5.0.0 does not know that code and panics decoding it.
    if m.body.is_empty() {
        return Err(status(Code::BadRequest, "message body is empty"));
    }
    if m.body.len() > cfg.max_body_size {
        return Err(status(
            Code::MessageBodyTooLarge,
            format!(
                "message body of {} bytes exceeds the limit of {} bytes",
                m.body.len(),
                cfg.max_body_size
            ),
        ));
    }
    let no_properties;
    let sp = match &m.system_properties {
        Some(sp) => sp,
        None => {
            no_properties = pb::SystemProperties::default();
            &no_properties
        }
    };
    let group = sp.message_group.as_ref().filter(|g| !g.is_empty());
    let delayed = sp.delivery_timestamp.is_some();
    let declared =
        pb::MessageType::try_from(sp.message_type).unwrap_or(pb::MessageType::Unspecified);
    let kind = match (declared, &group, delayed) {
        (pb::MessageType::Transaction, _, _) => MessageType::Transaction,
        (_, Some(_), _) => MessageType::Fifo,
        (_, None, true) => MessageType::Delay,
        (pb::MessageType::Fifo, None, _) => {
            return Err(status(
                Code::IllegalMessageGroup,
                "a FIFO message needs a message group",
            ));
        }
        _ => MessageType::Normal,
    };
    if let Some(g) = &group
        && (g.len() > MAX_GROUP_LEN || g.chars().any(char::is_control))
    {
        return Err(status(
            Code::IllegalMessageGroup,
            format!("message group must be 1 to {MAX_GROUP_LEN} printable characters"),
        ));
    }
    if kind != topic.message_type {
        return Err(status(
            Code::MessagePropertyConflictWithType,
            format!(
                "topic {} accepts {} messages, not {kind}",
                topic.name, topic.message_type
            ),
        ));
    }
    // Any message with a delivery time waits in the timer (but a half
    // message, which waits for its transaction), so the bound holds for all.
    let due = match sp.delivery_timestamp.as_ref() {
        None => None,
        Some(t) => match ms(t) {
            Some(due) if kind == MessageType::Transaction || due <= now_ms() + MAX_DELAY_MS => {
                Some(due)
            }
            _ => {
                return Err(status(
                    Code::IllegalDeliveryTime,
                    format!(
                        "delivery time must be a time at most {} days ahead",
                        MAX_DELAY_MS / 86_400_000
                    ),
                ));
            }
        },
    };
    let properties_bytes: usize = m
        .user_properties
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if m.user_properties.len() > MAX_USER_PROPERTIES || properties_bytes > MAX_USER_PROPERTIES_BYTES
    {
        return Err(status(
            Code::MessagePropertiesTooLarge,
            format!(
                "{} user properties of {properties_bytes} bytes exceed the limit of {MAX_USER_PROPERTIES} properties and {MAX_USER_PROPERTIES_BYTES} bytes",
                m.user_properties.len()
            ),
        ));
    }
    let mut properties = Properties::new();
    for (k, v) in &m.user_properties {
        if k.is_empty() || k.starts_with("__") {
            return Err(status(
                Code::IllegalMessagePropertyKey,
                format!("user property key {k:?} is empty or reserved"),
            ));
        }
        properties.insert(k.clone(), v.clone());
    }
    if let Some(tag) = sp.tag.as_ref().filter(|t| !t.is_empty()) {
        if tag.contains("||") || tag.chars().any(char::is_whitespace) {
            return Err(status(
                Code::IllegalMessageTag,
                format!("tag {tag:?} contains '||' or whitespace"),
            ));
        }
        properties.insert(keys::TAG.into(), tag.clone());
    }
    if !sp.keys.is_empty() {
        if sp.keys.iter().any(|k| k.chars().any(char::is_whitespace)) {
            return Err(status(
                Code::IllegalMessageKey,
                "message keys must not contain whitespace",
            ));
        }
        properties.insert(keys::KEYS.into(), sp.keys.join(" "));
    }
    if !sp.message_id.is_empty() {
        properties.insert(keys::MESSAGE_ID.into(), sp.message_id.clone());
    }
    let host = if sp.born_host.is_empty() {
        born_host
    } else {
        &sp.born_host
    };
    properties.insert(keys::BORN_HOST.into(), host.to_owned());
    let queue_id = match &group {
        // The group decides the queue, so a group's messages stay in order
        // whatever queue the client picked.
        Some(g) => (crate::store::record::tag_hash(Some(g)) % u64::from(topic.queue_count)) as u32,
        None => u32::try_from(sp.queue_id)
            .ok()
            .filter(|q| *q < topic.queue_count)
            .unwrap_or((round_robin % u64::from(topic.queue_count)) as u32),
    };
    if let Some(g) = group {
        properties.insert(keys::MESSAGE_GROUP.into(), g.clone());
    }
    if let Some(due) = due {
        properties.insert(keys::DELIVERY_TIME.into(), due.to_string());
    }
    Ok(NewRecord {
        topic: topic.name.clone(),
        queue_id,
        born_ms: sp
            .born_timestamp
            .as_ref()
            .and_then(ms)
            .unwrap_or_else(now_ms),
        flags: 0,
        properties,
        body: m.body.clone(),
    })
}

/// A stored record as the protocol's message, with the delivery's handle.
pub fn message(
    cfg: &ClientApiConfig,
    topic: &TopicConfig,
    r: &StoredRecord,
    delivery: Option<&Delivered>,
    invisible: Duration,
) -> pb::Message {
    let p = &r.properties;
    let user_properties = p
        .iter()
        .filter(|(k, _)| !k.starts_with("__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let digest = Md5::digest(&r.body);
    let checksum: String = digest.iter().map(|b| format!("{b:02X}")).collect();
    pb::Message {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: r.topic.clone(),
        }),
        user_properties,
        system_properties: Some(pb::SystemProperties {
            tag: p.get(keys::TAG).cloned(),
            keys: p
                .get(keys::KEYS)
                .map(|k| {
                    k.split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            message_id: p
                .get(keys::MESSAGE_ID)
                .cloned()
                .unwrap_or_else(|| format!("{:016X}", r.offset)),
            body_digest: Some(pb::Digest {
                r#type: pb::DigestType::Md5 as i32,
                checksum,
            }),
            body_encoding: pb::Encoding::Identity as i32,
            message_type: message_type(topic.message_type) as i32,
            born_timestamp: Some(timestamp(r.born_ms)),
            born_host: p.get(keys::BORN_HOST).cloned().unwrap_or_default(),
            store_timestamp: Some(timestamp(r.store_ms)),
            store_host: format!("{}:{}", cfg.advertised_host, cfg.advertised_port),
            delivery_timestamp: p
                .get(keys::DELIVERY_TIME)
                .and_then(|t| t.parse().ok())
                .map(timestamp),
            receipt_handle: delivery.map(|d| d.handle.to_string()),
            queue_id: r.queue_id as i32,
            queue_offset: Some(r.queue_offset as i64),
            invisible_duration: delivery.map(|_| proto_duration(invisible)),
            delivery_attempt: delivery.map(|d| d.attempt as i32),
            message_group: p.get(keys::MESSAGE_GROUP).cloned(),
            trace_context: None,
            orphaned_transaction_recovery_duration: None,
            dead_letter_queue: None,
            lite_topic: None,
            priority: None,
        }),
        body: r.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClientApiConfig {
        ClientApiConfig {
            broker_name: "b".into(),
            advertised_host: "127.0.0.1".into(),
            advertised_port: 8081,
            max_body_size: 4 << 20,
            auto_create_topics: false,
            default_queue_count: 2,
            transactions: Default::default(),
        }
    }

    fn topic(message_type: MessageType) -> TopicConfig {
        TopicConfig {
            name: "t".into(),
            queue_count: 2,
            message_type,
        }
    }

    fn msg(body: &[u8]) -> pb::Message {
        pb::Message {
            topic: None,
            user_properties: Default::default(),
            system_properties: Some(pb::SystemProperties {
                message_id: "01AB".into(),
                ..Default::default()
            }),
            body: body.to_vec().into(),
        }
    }

    fn code(r: Result<NewRecord, pb::Status>) -> i32 {
        r.map_or_else(|s| s.code, |_| Code::Ok as i32)
    }

    #[test]
    fn an_empty_body_is_a_bad_request_the_rust_client_can_decode() {
        let r = record(&cfg(), &topic(MessageType::Normal), &msg(b""), 0, "h");
        assert_eq!(code(r), Code::BadRequest as i32);
    }

    #[test]
    fn wire_timestamps_that_overflow_do_not_wrap() {
        let at = |seconds| {
            Some(prost_types::Timestamp {
                seconds,
                nanos: 999_999_999,
            })
        };
        let overflowing = i64::MAX / 1000 + 1;
        for (kind, group) in [
            (MessageType::Delay, None),
            (MessageType::Fifo, Some("g1".to_owned())),
        ] {
            let mut m = msg(b"x");
            if let Some(sp) = m.system_properties.as_mut() {
                sp.message_group = group.clone();
                sp.delivery_timestamp = at(overflowing);
            }
            let r = record(&cfg(), &topic(kind), &m, 0, "h");
            assert_eq!(code(r), Code::IllegalDeliveryTime as i32, "{kind}");
            // Four days ahead: refused too.
            if let Some(sp) = m.system_properties.as_mut() {
                sp.delivery_timestamp = Some(timestamp(now_ms() + 4 * 86_400_000));
            }
            let r = record(&cfg(), &topic(kind), &m, 0, "h");
            assert_eq!(code(r), Code::IllegalDeliveryTime as i32, "{kind}");
            // In an hour: fine.
            if let Some(sp) = m.system_properties.as_mut() {
                sp.delivery_timestamp = Some(timestamp(now_ms() + 3_600_000));
            }
            record(&cfg(), &topic(kind), &m, 0, "h").expect("an hour ahead");
        }
        // A born time that does not fit is replaced by the store's clock.
        let mut m = msg(b"x");
        if let Some(sp) = m.system_properties.as_mut() {
            sp.born_timestamp = at(overflowing);
        }
        let before = now_ms();
        let r = record(&cfg(), &topic(MessageType::Normal), &m, 0, "h").expect("accepted");
        assert!(r.born_ms >= before);
    }

    #[test]
    fn user_properties_are_limited_in_count_and_size() {
        let with = |props: Vec<(String, String)>| {
            let mut m = msg(b"x");
            m.user_properties = props.into_iter().collect();
            code(record(&cfg(), &topic(MessageType::Normal), &m, 0, "h"))
        };
        let many = |n: usize| (0..n).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert_eq!(with(many(128)), Code::Ok as i32);
        assert_eq!(
            with(many(129)),
            Code::MessagePropertiesTooLarge as i32,
            "129 properties"
        );
        // Keys and values count together: 16 KiB in all is the most.
        let sized = |n: usize| vec![("k".to_owned(), "v".repeat(n - 1))];
        assert_eq!(with(sized(16 << 10)), Code::Ok as i32);
        assert_eq!(
            with(sized((16 << 10) + 1)),
            Code::MessagePropertiesTooLarge as i32
        );
        assert_eq!(
            with(sized(64 << 10)),
            Code::MessagePropertiesTooLarge as i32
        );
    }
}
