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

/// Most bytes of the names and values of all properties a message is stored
/// with, the broker's own (tag, keys, message id, born host, message group,
/// delivery time) and the user's together: RocketMQ's 32 KiB. Every consumer
/// of the topic is sent them with each delivery.
const MAX_PROPERTIES_BYTES: usize = 32 << 10;

/// Seconds of the earliest and latest times a `google.protobuf.Timestamp`
/// may hold (0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z). The official
/// clients fail to read a message with a time outside, so none is stored.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// Starts and separates the stored keys of a message when one of them holds
/// a space (keys without spaces are stored space-separated). A key may not
/// hold a control character, so it cannot hold this one.
const KEY_SEPARATOR: char = '\u{1f}';

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the epoch of a timestamp from the wire; `None` when it
/// is not a valid `google.protobuf.Timestamp` (seconds from year 1 to year
/// 9999, nanos 0 to 999,999,999).
fn ms(t: &prost_types::Timestamp) -> Option<i64> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds)
        || !(0..1_000_000_000).contains(&t.nanos)
    {
        return None;
    }
    // Within those bounds the milliseconds fit an i64 many times over.
    Some(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// The error text for a wire timestamp that [`ms`] refuses (`what`: born
/// or delivery).
fn invalid_time(what: &str, t: &prost_types::Timestamp) -> String {
    format!(
        "{what} time of {}s {}ns is not a valid timestamp (0001-01-01 to 9999-12-31, nanos below 1e9)",
        t.seconds, t.nanos
    )
}

/// Message keys as stored in [`keys::KEYS`].
fn stored_keys(keys: &[String]) -> String {
    if keys.iter().any(|k| k.contains(' ')) {
        let mut stored = String::new();
        for k in keys {
            stored.push(KEY_SEPARATOR);
            stored.push_str(k);
        }
        stored
    } else {
        keys.join(" ")
    }
}

/// Message keys from their stored form (see [`stored_keys`]).
fn wire_keys(stored: &str) -> Vec<String> {
    match stored.strip_prefix(KEY_SEPARATOR) {
        Some(rest) => rest.split(KEY_SEPARATOR),
        None => stored.split(' '),
    }
    .filter(|k| !k.is_empty())
    .map(str::to_owned)
    .collect()
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

/// Empty or only whitespace.
fn is_blank(s: &str) -> bool {
    s.chars().all(char::is_whitespace)
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
    // The 3-day bound holds for any message with a delivery time, as in the
    // RocketMQ proxy: a DELAY or FIFO one waits in the timer, and a
    // TRANSACTION one is sent to consumers with it. A time in the past is
    // fine (the message is delivered at once); one before 1970 is not.
    let due = match sp.delivery_timestamp.as_ref() {
        None => None,
        Some(t) => match ms(t) {
            None => {
                return Err(status(
                    Code::IllegalDeliveryTime,
                    invalid_time("delivery", t),
                ));
            }
            Some(due) if due < 0 => {
                return Err(status(
                    Code::IllegalDeliveryTime,
                    "delivery time is before 1970-01-01",
                ));
            }
            Some(due) if due > now_ms() + MAX_DELAY_MS => {
                return Err(status(
                    Code::IllegalDeliveryTime,
                    format!(
                        "delivery time must be a time at most {} days ahead",
                        MAX_DELAY_MS / 86_400_000
                    ),
                ));
            }
            Some(due) => Some(due),
        },
    };
    let born_ms = match sp.born_timestamp.as_ref() {
        None => now_ms(),
        Some(t) => ms(t).ok_or_else(|| status(Code::BadRequest, invalid_time("born", t)))?,
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
    // An empty tag is no tag, as in the proxy. A tag may hold spaces, but
    // not '|', which separates the tags of a filter expression. The value is
    // not echoed: it may be megabytes long.
    if let Some(tag) = sp.tag.as_ref().filter(|t| !t.is_empty()) {
        if is_blank(tag) || tag.contains('|') || tag.chars().any(char::is_control) {
            return Err(status(
                Code::IllegalMessageTag,
                "tag is only whitespace or contains '|' or a control character",
            ));
        }
        properties.insert(keys::TAG.into(), tag.clone());
    }
    if !sp.keys.is_empty() {
        // The value is not echoed: it may be megabytes long.
        if let Some(i) = sp
            .keys
            .iter()
            .position(|k| is_blank(k) || k.chars().any(char::is_control))
        {
            return Err(status(
                Code::IllegalMessageKey,
                format!(
                    "message key {i} is empty, only whitespace or contains a control character"
                ),
            ));
        }
        properties.insert(keys::KEYS.into(), stored_keys(&sp.keys));
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
    let total: usize = properties.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_PROPERTIES_BYTES {
        return Err(status(
            Code::MessagePropertiesTooLarge,
            format!(
                "properties of {total} bytes (names and values, tag, keys and the other system properties included) exceed the limit of {MAX_PROPERTIES_BYTES} bytes"
            ),
        ));
    }
    Ok(NewRecord {
        topic: topic.name.clone(),
        queue_id,
        born_ms,
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
            keys: p.get(keys::KEYS).map(|k| wire_keys(k)).unwrap_or_default(),
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

    /// [`msg`] with its system properties changed by `f`.
    fn msg_with(f: impl FnOnce(&mut pb::SystemProperties)) -> pb::Message {
        let mut m = msg(b"x");
        if let Some(sp) = m.system_properties.as_mut() {
            f(sp);
        }
        m
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
        // A born time that does not fit is refused too.
        let mut m = msg(b"x");
        if let Some(sp) = m.system_properties.as_mut() {
            sp.born_timestamp = at(overflowing);
        }
        let r = record(&cfg(), &topic(MessageType::Normal), &m, 0, "h");
        assert_eq!(code(r), Code::BadRequest as i32);
        // No born time: the store's clock.
        let before = now_ms();
        let r = record(&cfg(), &topic(MessageType::Normal), &msg(b"x"), 0, "h").expect("accepted");
        assert!(r.born_ms >= before);
    }

    fn wire_time(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn born_times_outside_protobufs_timestamp_range_are_bad_requests() {
        let born = |seconds, nanos| {
            let m = msg_with(|sp| sp.born_timestamp = wire_time(seconds, nanos));
            record(&cfg(), &topic(MessageType::Normal), &m, 0, "h")
        };
        // 9999-12-31T23:59:59.999999999Z and 0001-01-01T00:00:00Z: the ends.
        let last = born(253_402_300_799, 999_999_999).expect("the last valid second");
        assert_eq!(last.born_ms, 253_402_300_799_999);
        let first = born(-62_135_596_800, 0).expect("the first valid second");
        assert_eq!(first.born_ms, -62_135_596_800_000);
        for (seconds, nanos) in [
            (253_402_300_800, 0),
            (-62_135_596_801, 999_999_999),
            (1_700_000_000, -1),
            (1_700_000_000, 1_000_000_000),
            (i64::MIN, 0),
        ] {
            assert_eq!(
                code(born(seconds, nanos)),
                Code::BadRequest as i32,
                "{seconds}s {nanos}ns"
            );
        }
    }

    #[test]
    fn delivery_times_must_be_valid_timestamps_from_1970_for_every_type() {
        let now_s = now_ms() / 1000;
        let send = |kind: MessageType, seconds, nanos| {
            let m = msg_with(|sp| {
                sp.delivery_timestamp = wire_time(seconds, nanos);
                match kind {
                    MessageType::Fifo => sp.message_group = Some("g1".into()),
                    MessageType::Transaction => {
                        sp.message_type = pb::MessageType::Transaction as i32;
                    }
                    _ => {}
                }
            });
            code(record(&cfg(), &topic(kind), &m, 0, "h"))
        };
        let refused = Code::IllegalDeliveryTime as i32;
        for kind in [
            MessageType::Delay,
            MessageType::Fifo,
            MessageType::Transaction,
        ] {
            // The epoch itself and an hour ago: in the past, delivered at once.
            assert_eq!(send(kind, 0, 0), Code::Ok as i32, "{kind} at the epoch");
            assert_eq!(send(kind, now_s - 3600, 0), Code::Ok as i32, "{kind}");
            // One millisecond before the epoch, and the first second.
            assert_eq!(send(kind, -1, 999_000_000), refused, "{kind} 1969");
            assert_eq!(send(kind, -62_135_596_800, 0), refused, "{kind} year 1");
            // Nanos within 0..1e9 only.
            assert_eq!(send(kind, now_s + 60, 999_999_999), Code::Ok as i32);
            assert_eq!(send(kind, now_s + 60, 1_000_000_000), refused, "{kind}");
            assert_eq!(send(kind, now_s + 60, -1), refused, "{kind}");
            // Up to 3 days ahead, TRANSACTION messages included.
            assert_eq!(send(kind, now_s + 3 * 86_400 - 60, 0), Code::Ok as i32);
            assert_eq!(send(kind, now_s + 3 * 86_400 + 60, 0), refused, "{kind}");
            assert_eq!(send(kind, 253_402_300_800, 0), refused, "{kind} year 10000");
        }
    }

    #[test]
    fn tags_may_hold_spaces_but_not_bars_or_control_characters() {
        let with_tag = |tag: &str| {
            let m = msg_with(|sp| sp.tag = Some(tag.to_owned()));
            record(&cfg(), &topic(MessageType::Normal), &m, 0, "h")
        };
        for tag in ["order created", "TagA", " a ", "caf\u{e9}"] {
            let r = with_tag(tag).expect(tag);
            assert_eq!(r.properties.get(keys::TAG).map(String::as_str), Some(tag));
        }
        // An empty tag is no tag, as in the proxy.
        let r = with_tag("").expect("empty tag");
        assert!(!r.properties.contains_key(keys::TAG));
        for tag in [
            "a|b", "|", "a||b", " ", "\u{3000}", "\t", "a\nb", "a\u{0}", "a\u{7f}", "a\u{85}",
        ] {
            assert_eq!(
                code(with_tag(tag)),
                Code::IllegalMessageTag as i32,
                "{tag:?}"
            );
        }
    }

    fn stored(properties: Properties) -> StoredRecord {
        StoredRecord {
            offset: 0,
            size: 0,
            topic: "t".into(),
            queue_id: 0,
            queue_offset: 0,
            born_ms: 0,
            store_ms: 0,
            flags: 0,
            properties,
            body: bytes::Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn keys_may_hold_spaces_and_reach_consumers_as_sent() {
        let with_keys = |keys: &[&str]| {
            let m = msg_with(|sp| sp.keys = keys.iter().map(|k| (*k).to_owned()).collect());
            record(&cfg(), &topic(MessageType::Normal), &m, 0, "h")
        };
        let received = |r: NewRecord| {
            let m = message(
                &cfg(),
                &topic(MessageType::Normal),
                &stored(r.properties),
                None,
                Duration::ZERO,
            );
            m.system_properties.map(|sp| sp.keys).unwrap_or_default()
        };
        for keys in [
            &["order 42"][..],
            &["order 42", "k2", " x "],
            &["k1", "k2"],
            &["caf\u{e9}"],
        ] {
            let r = with_keys(keys).unwrap_or_else(|s| panic!("{keys:?}: {s:?}"));
            assert_eq!(received(r), keys);
        }
        // Keys without spaces are stored as before: space-separated.
        let r = with_keys(&["k1", "k2"]).expect("k1 k2");
        assert_eq!(
            r.properties.get(keys::KEYS).map(String::as_str),
            Some("k1 k2")
        );
        let mut old = Properties::new();
        old.insert(keys::KEYS.into(), "a b".into());
        let m = message(
            &cfg(),
            &topic(MessageType::Normal),
            &stored(old),
            None,
            Duration::ZERO,
        );
        assert_eq!(
            m.system_properties.map(|sp| sp.keys),
            Some(vec!["a".into(), "b".into()])
        );
        for keys in [
            &[""][..],
            &["  "],
            &["\u{3000}"],
            &["ok", "a\nb"],
            &["a\u{0}"],
            &["a\u{1f}b"],
        ] {
            assert_eq!(
                code(with_keys(keys)),
                Code::IllegalMessageKey as i32,
                "{keys:?}"
            );
        }
    }

    #[test]
    fn all_properties_together_are_limited_to_32_kib() {
        let bytes =
            |r: &NewRecord| -> usize { r.properties.iter().map(|(k, v)| k.len() + v.len()).sum() };
        // User properties at their own 16 KiB limit, and a tag for the rest.
        let user = [("k".to_owned(), "v".repeat((16 << 10) - 1))];
        let with_tag = |n: usize| {
            let mut m = msg_with(|sp| sp.tag = Some("t".repeat(n)));
            m.user_properties = user.iter().cloned().collect();
            record(&cfg(), &topic(MessageType::Normal), &m, 0, "h")
        };
        let base = bytes(&with_tag(1).expect("a short tag")) - 1;
        let fill = (32 << 10) - base;
        let full = with_tag(fill).expect("exactly 32 KiB");
        assert_eq!(bytes(&full), 32 << 10);
        assert_eq!(
            code(with_tag(fill + 1)),
            Code::MessagePropertiesTooLarge as i32
        );
        assert_eq!(
            code(with_tag(50 << 20)),
            Code::MessagePropertiesTooLarge as i32,
            "a 50 MiB tag"
        );
        // Each system property counts: keys, message id, born host.
        let big = "x".repeat(32 << 10);
        let code_of =
            |m: pb::Message| code(record(&cfg(), &topic(MessageType::Normal), &m, 0, "h"));
        let too_large = Code::MessagePropertiesTooLarge as i32;
        let keys = msg_with(|sp| sp.keys = vec![big.clone()]);
        assert_eq!(code_of(keys), too_large, "keys");
        let id = msg_with(|sp| sp.message_id = big.clone());
        assert_eq!(code_of(id), too_large, "id");
        let host = msg_with(|sp| sp.born_host = big.clone());
        assert_eq!(code_of(host), too_large, "host");
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
