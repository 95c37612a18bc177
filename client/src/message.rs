//! [`Message`]: what a user sends. Its id is assigned when it is first
//! sent, so a copy (`clone`) sent again is another message with another
//! id; sharing an id takes an explicit [`Message::with_msg_id`].
//!
//! The broker stores and hands back the protocol's message
//! ([`WireMessage`](crate::WireMessage)), whose id is always set; a send
//! converts one into the other once, before its first attempt, so the
//! client's own retries of that send carry the same id and the broker's
//! idempotence sees them as one.

use std::collections::BTreeMap;

use bytes::Bytes;
use txmq_protocol::{now_millis, MsgId};

/// A message to send: a topic, a body, an optional key and tag, free-form
/// properties, and an id that is normally assigned when it is sent.
///
/// ```
/// use txmq::Message;
///
/// let m = Message::new("orders", "order 42")
///     .with_key("42")
///     .with_tag("created")
///     .with_property("source", "web");
/// assert_eq!(m.topic(), "orders");
/// assert_eq!(m.key(), Some("42"));
/// assert_eq!(m.property("source"), Some("web"));
/// // No id yet: the send assigns one and reports it in its receipt.
/// assert_eq!(m.msg_id(), None);
/// ```
///
/// # Ids
///
/// A message built with [`Message::new`] has no id ([`Message::msg_id`] is
/// `None`). Each send of it (of the message or of any clone) gets a fresh
/// one, kept across that send's own retries, and reported by the send
/// ([`SendReceipt::msg_id`](crate::SendReceipt::msg_id),
/// [`TxOutcome::msg_ids`](crate::TxOutcome::msg_ids)). So two sends of a
/// clone are two messages, and both are stored.
///
/// To send one message with one id more than once, say to retry a send
/// that failed in your own loop without storing it twice, or to store the
/// id in a local table before sending (the local-message-table pattern),
/// give it an id with [`Message::with_msg_id`]. Then a send retried after
/// an unknown outcome (a timeout, a lost connection) is stored once (see
/// [`Producer`](crate::Producer)'s idempotence), and the same id in a
/// second transaction is refused (`DUPLICATE_MSG_ID`, or
/// `TRANSACTION_COMMITTED` / `TRANSACTION_ROLLED_BACK` once the first
/// ended). A plain send repeated after it succeeded is stored again, under
/// the same id: consumers that must apply it once deduplicate by id
/// ([`dedup`](crate::dedup)).
///
/// The messages txmq hands to a
/// [`TransactionListener`](crate::TransactionListener) (execute and
/// check-back) carry the id they were sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    msg_id: Option<MsgId>,
    topic: String,
    key: Option<String>,
    tag: Option<String>,
    properties: BTreeMap<String, String>,
    body: Bytes,
    /// 0 until sent (then the time of the send).
    born_timestamp: u64,
}

impl Message {
    /// A message for `topic` with `body` and no id yet (see [`Message`]).
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Message {
        Message {
            msg_id: None,
            topic: topic.into(),
            key: None,
            tag: None,
            properties: BTreeMap::new(),
            body: body.into(),
            born_timestamp: 0,
        }
    }

    /// Fixes the id this message is sent with, for the local-message-table
    /// pattern (store the id before sending) or a retry loop of your own:
    /// every send of this message, and of its clones, carries `id` (see
    /// [`Message`] for what the broker does with a repeated id).
    ///
    /// ```
    /// use txmq::{Message, MsgId};
    ///
    /// let id = MsgId::generate();
    /// // ... record `id` in the local transaction ...
    /// let m = Message::new("orders", "order 42").with_msg_id(id);
    /// assert_eq!(m.msg_id(), Some(id));
    /// ```
    pub fn with_msg_id(mut self, id: MsgId) -> Message {
        self.msg_id = Some(id);
        self
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

    /// Adds a property (replacing one of the same name).
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Makes the message visible only `delay` after it is stored (see
    /// [`Message::with_deliver_at`]).
    pub fn with_delay(self, delay: std::time::Duration) -> Message {
        self.with_deliver_at(txmq_protocol::deliver_at_after(delay))
    }

    /// Makes the message visible at `at_ms` (milliseconds since the Unix
    /// epoch, the broker's clock decides). A time already passed means now;
    /// brokers refuse times further ahead than their maximum delay (7 days
    /// by default).
    pub fn with_deliver_at(self, at_ms: u64) -> Message {
        self.with_property(txmq_protocol::PROPERTY_DELIVER_AT, at_ms.to_string())
    }

    /// The id it is sent with: `None` until one is given with
    /// [`Message::with_msg_id`] (a send then assigns one); set on the
    /// messages txmq hands to a transaction listener.
    pub fn msg_id(&self) -> Option<MsgId> {
        self.msg_id
    }

    /// The topic it is sent to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The business key, if set.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The tag, if set.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The property `name`, if set.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
    }

    /// Every property, by name.
    pub fn properties(&self) -> &BTreeMap<String, String> {
        &self.properties
    }

    /// The payload.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// When it was sent, in milliseconds since the Unix epoch on the
    /// sender's clock; 0 for a message not sent yet.
    pub fn born_timestamp(&self) -> u64 {
        self.born_timestamp
    }

    /// The message as sent: its id (assigned now if it has none) and birth
    /// time fixed. Called once per send, before the first attempt.
    pub(crate) fn into_wire(self) -> txmq_protocol::Message {
        txmq_protocol::Message {
            msg_id: self.msg_id.unwrap_or_else(MsgId::generate),
            topic: self.topic,
            key: self.key,
            tag: self.tag,
            properties: self.properties,
            body: self.body,
            born_timestamp: if self.born_timestamp == 0 {
                now_millis()
            } else {
                self.born_timestamp
            },
        }
    }

    /// The message as it would be sent now: an id and a birth time where
    /// it has none (what a transaction listener is handed).
    pub(crate) fn into_sent(self) -> Message {
        Message::from_wire(self.into_wire())
    }

    /// A message that was sent, with the id it was sent with.
    pub(crate) fn from_wire(m: txmq_protocol::Message) -> Message {
        Message {
            msg_id: Some(m.msg_id),
            topic: m.topic,
            key: m.key,
            tag: m.tag,
            properties: m.properties,
            body: m.body,
            born_timestamp: m.born_timestamp,
        }
    }
}

/// A message as it was sent (a consumer, a look-up or a test hands it
/// over), keeping its id and birth time: sending it again is sending the
/// same message, which the broker refuses as a duplicate while it
/// remembers the id. To forward a message, build a new one from its parts.
impl From<txmq_protocol::Message> for Message {
    fn from(m: txmq_protocol::Message) -> Message {
        Message::from_wire(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_sent_again_gets_another_id() {
        let m = Message::new("t", "x");
        let a = m.clone().into_wire();
        let b = m.into_wire();
        assert_ne!(a.msg_id, b.msg_id);
        assert_ne!(a.born_timestamp, 0);
    }

    #[test]
    fn a_given_id_is_kept_by_every_send() {
        let id = MsgId::generate();
        let m = Message::new("t", "x").with_msg_id(id);
        assert_eq!(m.clone().into_wire().msg_id, id);
        assert_eq!(m.into_wire().msg_id, id);
    }

    #[test]
    fn a_sent_message_comes_back_whole() {
        let wire = Message::new("t", "x")
            .with_key("k")
            .with_tag("g")
            .with_property("p", "v")
            .into_wire();
        let back = Message::from_wire(wire.clone());
        assert_eq!(back.msg_id(), Some(wire.msg_id));
        assert_eq!(back.clone().into_wire(), wire);
        assert_eq!((back.key(), back.tag()), (Some("k"), Some("g")));
        assert_eq!(back.property("p"), Some("v"));
    }
}
