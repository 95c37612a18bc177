//! The user's message as it travels to and from the broker.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A message id: 16 bytes, assigned by the client before the first send
/// attempt so that a retried send carries the same id.
///
/// Shown as 32 upper-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MsgId(pub [u8; 16]);

impl MsgId {
    /// A new id, unique with overwhelming probability across processes and
    /// machines: an 8-byte per-process prefix (hashed from the process id,
    /// the start time and a random hasher seed) and an 8-byte counter.
    pub fn generate() -> MsgId {
        static PREFIX: OnceLock<[u8; 8]> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = PREFIX.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            h.write_u128(now.as_nanos());
            h.finish().to_be_bytes()
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(prefix);
        id[8..].copy_from_slice(&n.to_be_bytes());
        MsgId(id)
    }

    /// Parses the 32-hex-digit form, or RocketMQ 5's form of the same id
    /// (`01` and the 32 digits), as a RocketMQ client prints it.
    pub fn parse(s: &str) -> Option<MsgId> {
        let s = match s.len() {
            34 => s.strip_prefix("01")?,
            _ => s,
        };
        if s.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(MsgId(id))
    }
}

impl std::str::FromStr for MsgId {
    type Err = String;

    /// [`MsgId::parse`], with a message saying the forms it takes.
    fn from_str(s: &str) -> Result<MsgId, String> {
        MsgId::parse(s).ok_or_else(|| {
            format!("'{s}' is not a message id (32 hex digits, or 01 and 32 hex digits)")
        })
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MsgId({self})")
    }
}

impl Serialize for MsgId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for MsgId {
    /// Read in place: an id is 16 bytes, not worth an allocation each.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Id;
        impl<'de> serde::de::Visitor<'de> for Id {
            type Value = MsgId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("16 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<MsgId, E> {
                v.try_into()
                    .map(MsgId)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MsgId, A::Error> {
                let mut id = [0u8; 16];
                for (i, b) in id.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(17, &self));
                }
                Ok(MsgId(id))
            }
        }
        d.deserialize_bytes(Id)
    }
}

/// A message a producer sends.
///
/// Also read and written without serde, in `fast.rs`: a change to its
/// fields or their serde attributes changes that code too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id, assigned by the client ([`MsgId::generate`]).
    pub msg_id: MsgId,
    /// The topic it is sent to.
    pub topic: String,
    /// An optional business key (order id, ...), also used for key hashing.
    pub key: Option<String>,
    /// An optional tag consumers can filter on.
    pub tag: Option<String>,
    /// Free-form properties.
    pub properties: BTreeMap<String, String>,
    /// The payload.
    #[serde(deserialize_with = "crate::codec::shared_body")]
    pub body: Bytes,
    /// When the producer created it, in milliseconds since the Unix epoch (informational).
    pub born_timestamp: u64,
}

/// The delivery time (ms since the Unix epoch) `delay` from now: what a
/// message's `with_delay` sets.
pub fn deliver_at_after(delay: std::time::Duration) -> u64 {
    now_millis().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
}

impl Message {
    /// A message for `topic` with `body` and a fresh id.
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Message {
        Message {
            msg_id: MsgId::generate(),
            topic: topic.into(),
            key: None,
            tag: None,
            properties: BTreeMap::new(),
            body: body.into(),
            born_timestamp: now_millis(),
        }
    }

    /// Sets the business key.
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.key = Some(key.into());
        self
    }

    /// Sets the tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Message {
        self.tag = Some(tag.into());
        self
    }

    /// Makes the message visible only `delay` after it is stored (see
    /// [`Message::with_deliver_at`]).
    pub fn with_delay(self, delay: std::time::Duration) -> Message {
        self.with_deliver_at(deliver_at_after(delay))
    }

    /// Makes the message visible at `at_ms` (milliseconds since the Unix
    /// epoch, the broker's clock decides). A time already passed means now;
    /// brokers refuse times further ahead than their maximum delay (7 days
    /// by default).
    pub fn with_deliver_at(self, at_ms: u64) -> Message {
        self.with_property(crate::PROPERTY_DELIVER_AT, at_ms.to_string())
    }

    /// Adds a property.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.insert(name.into(), value.into());
        self
    }
}

/// A message as a consumer receives it: the sent message plus where it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message as sent.
    pub message: Message,
    /// The queue it was stored in.
    pub queue: u32,
    /// Its offset within that queue.
    pub queue_offset: u64,
    /// Its offset in the broker's commit log.
    pub log_offset: u64,
    /// When the broker stored it, milliseconds since the Unix epoch (the broker's clock).
    pub store_timestamp: u64,
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The 64-bit FNV-1a hash of `bytes`: the same value in every process, on
/// every machine and in every release, so it may be stored or used to pick
/// a queue.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The 64-bit hash of a tag stored in consume-queue entries ([`fnv1a`]);
/// `0` for no tag.
pub fn tag_hash(tag: Option<&str>) -> u64 {
    match tag {
        None => 0,
        Some(t) => fnv1a(t.as_bytes()).max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_parse_back() {
        let a = MsgId::generate();
        let b = MsgId::generate();
        assert_ne!(a, b);
        assert_eq!(MsgId::parse(&a.to_string()), Some(a));
        assert_eq!(MsgId::parse("xyz"), None);
        assert_eq!(a.to_string().parse::<MsgId>(), Ok(a));
        assert!("xyz"
            .parse::<MsgId>()
            .unwrap_err()
            .contains("32 hex digits"));
    }

    #[test]
    fn fnv1a_has_the_published_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn tag_hash_is_stable_and_nonzero() {
        assert_eq!(tag_hash(None), 0);
        assert_eq!(tag_hash(Some("a")), tag_hash(Some("a")));
        assert_ne!(tag_hash(Some("a")), tag_hash(Some("b")));
        assert_ne!(tag_hash(Some("")), 0);
    }
}
