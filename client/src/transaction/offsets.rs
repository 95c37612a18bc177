//! Consumer offsets committed inside a transaction: consume, transform,
//! produce, exactly once.
//!
//! A pipeline reads a message from topic `in` (a [`PullConsumer`] that
//! never commits by itself), writes what it makes of it to topic `out` in a
//! transaction, and puts the input's offset in the same transaction
//! ([`TransactionProducer::send_in_transaction_with_offsets`]). The broker
//! commits the output messages and the offset in one atomic log append, or
//! neither: a crash anywhere leaves either both (the input is done) or none
//! (the input is read again from the committed offset).
//!
//! That alone is at least once: a pipeline that crashed after preparing
//! and restarted re-reads the input, and the first transaction may still
//! be committed by its check-back. The expected offset of a
//! [`ConsumedOffset`] (see [`ConsumedOffset::new`]) closes the
//! gap: the commit applies only if the group's committed offset is still
//! the one the input was read from, so of two transactions made from the
//! same input exactly one commits; the other is rolled back with
//! `OFFSET_CONFLICT`. The output then appears exactly once per input. Since
//! a commit can never apply twice this way, a pipeline's
//! [`TransactionListener::check`](super::TransactionListener::check) may
//! always answer commit.
//!
//! The broker keeps a group without any committed offset on a queue as
//! matching every expectation (the first commit sets it), and an offset
//! below the queue's first stored message as that message's.
//!
//! [`PullConsumer`]: crate::PullConsumer
//! [`TransactionProducer::send_in_transaction_with_offsets`]: super::TransactionProducer::send_in_transaction_with_offsets

use txmq_protocol::TxOffset;

use crate::ReceivedMessage;

/// A consumer group's offset on one queue, to commit with a transaction.
///
/// The queue must be on the broker that holds the transaction: offsets
/// commit atomically with messages of one broker only. The
/// [`TransactionProducer`](super::TransactionProducer) therefore places a
/// transaction with offsets on their broker, and refuses offsets of several
/// brokers, or output topics without a writable queue there, before
/// sending anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedOffset {
    /// The broker the queue is on.
    pub broker_name: String,
    /// The group, topic, queue, offset and expectation sent to it.
    pub offset: TxOffset,
}

impl ConsumedOffset {
    /// `group`'s offset `offset` (the next message to consume) on `queue`
    /// of `topic` at `broker_name`, committed only if the group's offset is
    /// `expected` at commit time (`None`: whatever it is).
    pub fn new(
        group: impl Into<String>,
        broker_name: impl Into<String>,
        topic: impl Into<String>,
        queue: u32,
        offset: u64,
        expected: Option<u64>,
    ) -> ConsumedOffset {
        ConsumedOffset {
            broker_name: broker_name.into(),
            offset: TxOffset {
                group: group.into(),
                topic: topic.into(),
                queue,
                offset,
                expected,
            },
        }
    }

    /// The offset after `message`, as `group` consumed it: the next offset
    /// of its queue, expected to move from the message's own offset. Right
    /// for a pipeline that handles each message of a queue in order, from
    /// the group's committed offset on, one transaction each (as a
    /// [`PullConsumer`](crate::PullConsumer) hands them out); for a batch,
    /// use [`ConsumedOffset::after_batch`].
    pub fn after(group: impl Into<String>, message: &ReceivedMessage) -> ConsumedOffset {
        ConsumedOffset::new(
            group,
            message.broker_name.clone(),
            // The queue's topic: a retry's is its group's retry topic.
            message.queue_topic(),
            message.queue(),
            message.queue_offset() + 1,
            Some(message.queue_offset()),
        )
    }

    /// The offset after `first..=last`, consecutive messages of one queue
    /// handled in one transaction: expected to move from `first`'s offset
    /// to the one after `last`.
    pub fn after_batch(
        group: impl Into<String>,
        first: &ReceivedMessage,
        last: &ReceivedMessage,
    ) -> ConsumedOffset {
        let mut o = ConsumedOffset::after(group, last);
        o.offset.expected = Some(first.queue_offset());
        o
    }
}
