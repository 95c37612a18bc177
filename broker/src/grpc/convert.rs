//! RocketMQ messages to txmq's and back.
//!
//! A RocketMQ 5 message id is "01" and 16 bytes in hex: exactly a txmq
//! [`MsgId`], so `txmq msg show` finds a message by the id the RocketMQ
//! client printed, and a message sent by txmq's own client reaches a
//! RocketMQ consumer as "01" + its txmq id. A send with an id of another
//! form is refused (ILLEGAL_MESSAGE_ID): the official clients never send
//! one, and txmq could only derive an id from it that the client never
//! learns (and that every message sent with the same string shares). A
//! message an earlier version stored so keeps the id it was sent with in
//! a property, and is delivered with it.
//!
//! What txmq has no field for travels in properties of its own: all the
//! keys (txmq indexes the first), the message group and the born host.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use txmq_protocol::{Message, MsgId, StoredMessage, PROPERTY_DELIVER_AT};

use super::{pb, status};

/// Every key of the message, separated by spaces (as RocketMQ's KEYS).
pub(super) const PROP_KEYS: &str = "__rmq.keys";
/// The FIFO message group (RocketMQ's sharding key).
pub(super) const PROP_MESSAGE_GROUP: &str = "__rmq.message_group";
/// A message id that is not "01" + 32 hex digits, as the client gave it
/// (stored by versions that took such ids).
pub(super) const PROP_MESSAGE_ID: &str = "__rmq.message_id";
pub(super) const PROP_BORN_HOST: &str = "__rmq.born_host";

/// The RocketMQ id of a txmq message.
pub(super) fn message_id(m: &Message) -> String {
    m.properties
        .get(PROP_MESSAGE_ID)
        .cloned()
        .unwrap_or_else(|| format!("01{}", m.msg_id))
}

/// The txmq id a RocketMQ message id stands for: the id of a message sent
/// with it (`01` ids; another form, derived, as earlier versions stored
/// messages sent with one), and whether it is of another form.
pub(super) fn msg_id(id: &str) -> (MsgId, bool) {
    if let Some(id) = Some(id).filter(|id| id.len() == 34).and_then(MsgId::parse) {
        return (id, false);
    }
    // Another form: 16 bytes of two different hashes of it.
    use std::hash::{Hash, Hasher};
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (i, id).hash(&mut h);
        half.copy_from_slice(&h.finish().to_be_bytes());
    }
    (MsgId(bytes), true)
}

pub(super) fn millis(t: &prost_types::Timestamp) -> u64 {
    let ms = t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000);
    u64::try_from(ms).unwrap_or(0)
}

/// A delivery time in ms. The Python client (5.1.2) puts milliseconds in
/// the seconds field; a "seconds" count past the year 5000 is read as
/// milliseconds, which no real delivery time in seconds can be.
fn delivery_millis(t: &prost_types::Timestamp) -> u64 {
    const YEAR_5000_IN_SECONDS: i64 = 95_617_584_000;
    if t.seconds > YEAR_5000_IN_SECONDS {
        return u64::try_from(t.seconds).unwrap_or(0);
    }
    millis(t)
}

pub(super) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub(super) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A protobuf duration as a std one; negative is `None`.
pub(super) fn std_duration(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The txmq id of a message's RocketMQ id, which must be `01` and 32
/// hex digits (as every RocketMQ 5 client makes them).
///
/// # Errors
/// ILLEGAL_MESSAGE_ID for an id of another form, or none.
fn sent_msg_id(id: &str) -> Result<MsgId, pb::Status> {
    let hex = id
        .strip_prefix("01")
        .filter(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    match hex.and_then(MsgId::parse) {
        Some(id) => Ok(id),
        None if id.is_empty() => Err(status::new(
            pb::Code::IllegalMessageId,
            "a message needs a message id: 01 and 32 hexadecimal digits",
        )),
        None => Err(status::new(
            pb::Code::IllegalMessageId,
            format!(
                "message id '{}' is not 01 and 32 hexadecimal digits, as RocketMQ 5 clients make them",
                id.chars().take(80).collect::<String>()
            ),
        )),
    }
}

/// A RocketMQ message as txmq's: the id, topic, key, tag, user properties
/// and body as they are; the rest in `__rmq.*` properties and, for a
/// delayed message, txmq's delivery time.
///
/// # Errors
/// BAD_REQUEST for a user property the broker reserves or a gzip-encoded
/// body, ILLEGAL_MESSAGE_ID (see [`sent_msg_id`]), ILLEGAL_DELIVERY_TIME
/// for a DELAY message without a delivery time.
pub(super) fn to_txmq(m: pb::Message) -> Result<Message, pb::Status> {
    let topic = m.topic.map(|t| t.name).unwrap_or_default();
    let sys = m.system_properties.unwrap_or_default();
    if let Some(bad) = m.user_properties.keys().find(|k| k.starts_with("__")) {
        return Err(status::new(
            pb::Code::BadRequest,
            format!("user property '{bad}': names starting with '__' are the broker's"),
        ));
    }
    if sys.body_encoding == pb::Encoding::Gzip as i32 {
        return Err(status::new(
            pb::Code::BadRequest,
            "gzip-encoded bodies are not supported; send the body as it is",
        ));
    }
    let msg_id = sent_msg_id(&sys.message_id)?;
    // The clients make a message DELAY by giving it a delivery time; one
    // without would be stored as a normal message, which its sender did
    // not mean.
    if sys.message_type == pb::MessageType::Delay as i32 && sys.delivery_timestamp.is_none() {
        return Err(status::new(
            pb::Code::IllegalDeliveryTime,
            "a DELAY message needs a delivery timestamp",
        ));
    }
    let mut message = Message {
        msg_id,
        topic,
        key: sys.keys.first().cloned(),
        tag: sys.tag.filter(|t| !t.is_empty()),
        properties: m.user_properties.into_iter().collect(),
        body: Bytes::from(m.body),
        born_timestamp: sys
            .born_timestamp
            .as_ref()
            .map(millis)
            .unwrap_or_else(now_ms),
    };
    let props = &mut message.properties;
    if sys.keys.len() > 1 {
        props.insert(PROP_KEYS.into(), sys.keys.join(" "));
    }
    if let Some(group) = sys.message_group.filter(|g| !g.is_empty()) {
        props.insert(PROP_MESSAGE_GROUP.into(), group);
    }
    if !sys.born_host.is_empty() {
        props.insert(PROP_BORN_HOST.into(), sys.born_host);
    }
    if let Some(at) = sys.delivery_timestamp.as_ref().map(delivery_millis) {
        props.insert(PROPERTY_DELIVER_AT.into(), at.to_string());
    }
    Ok(message)
}

/// The message group of a RocketMQ message, if any.
pub(super) fn message_group(m: &pb::Message) -> Option<&str> {
    m.system_properties
        .as_ref()
        .and_then(|s| s.message_group.as_deref())
        .filter(|g| !g.is_empty())
}

/// A stored txmq message as RocketMQ's, for a consumer or a check-back.
pub(super) fn to_rocketmq(
    stored: &StoredMessage,
    broker_host: &str,
    message_type: pb::MessageType,
) -> pb::Message {
    let m = &stored.message;
    let props = &m.properties;
    let keys = match props.get(PROP_KEYS) {
        Some(all) => all.split(' ').map(str::to_string).collect(),
        None => m.key.iter().cloned().collect(),
    };
    // What the broker keeps for itself (`__*`), and txmq's own properties
    // that RocketMQ carries as system properties (the delivery time) or
    // not at all (a retry's count and first home); a user's `TXMQ_ORDER`
    // is the user's.
    let user_properties = props
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("__")
                && *k != PROPERTY_DELIVER_AT
                && !crate::handler::BROKER_PROPERTIES.contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    pb::Message {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: m.topic.clone(),
        }),
        user_properties,
        system_properties: Some(pb::SystemProperties {
            tag: m.tag.clone(),
            keys,
            message_id: message_id(m),
            body_digest: Some(pb::Digest {
                r#type: pb::DigestType::Crc32 as i32,
                checksum: format!("{:08X}", crc32fast::hash(&m.body)),
            }),
            body_encoding: pb::Encoding::Identity as i32,
            message_type: message_type as i32,
            born_timestamp: Some(timestamp(m.born_timestamp)),
            born_host: props.get(PROP_BORN_HOST).cloned().unwrap_or_default(),
            store_timestamp: Some(timestamp(stored.store_timestamp)),
            store_host: broker_host.to_string(),
            delivery_timestamp: props
                .get(PROPERTY_DELIVER_AT)
                .and_then(|v| v.parse().ok())
                .map(timestamp),
            queue_id: stored.queue as i32,
            queue_offset: Some(stored.queue_offset as i64),
            message_group: props.get(PROP_MESSAGE_GROUP).cloned(),
            ..Default::default()
        }),
        body: m.body.to_vec(),
    }
}

/// The message type a stored message was sent as.
pub(super) fn message_type(m: &Message) -> pb::MessageType {
    if m.properties.contains_key(PROP_MESSAGE_GROUP) {
        pb::MessageType::Fifo
    } else if m.properties.contains_key(PROPERTY_DELIVER_AT) {
        pb::MessageType::Delay
    } else {
        pb::MessageType::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rocketmq_id_is_a_txmq_id_and_back() {
        let id = MsgId::generate();
        let rmq = format!("01{id}");
        assert_eq!(msg_id(&rmq), (id, false));
        let (other, keep) = msg_id("not-a-rocketmq-id");
        assert!(keep);
        assert_eq!(msg_id("not-a-rocketmq-id").0, other);
        assert_ne!(msg_id("another").0, other);
    }

    /// A user's own properties reach a RocketMQ consumer, `TXMQ_`-named
    /// ones too; the broker's and txmq's system ones do not.
    #[test]
    fn user_properties_are_delivered_and_the_brokers_are_not() {
        let message = Message::new("t", "b")
            .with_property("TXMQ_ORDER", "42")
            .with_property("origin", "python")
            .with_property(PROPERTY_DELIVER_AT, "1")
            .with_property(txmq_protocol::PROPERTY_RECONSUME_TIMES, "2")
            .with_property(txmq_protocol::PROPERTY_REAL_TOPIC, "t")
            .with_property(PROP_BORN_HOST, "h");
        let stored = StoredMessage {
            message,
            queue: 0,
            queue_offset: 0,
            log_offset: 0,
            store_timestamp: 0,
        };
        let rmq = to_rocketmq(&stored, "b", pb::MessageType::Normal);
        let mut names: Vec<&str> = rmq.user_properties.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["TXMQ_ORDER", "origin"]);
    }
}
