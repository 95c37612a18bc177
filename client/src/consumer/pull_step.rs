//! One pull of one queue, shared by the pull consumer's readers and the
//! push consumer's workers: it sends the pull, follows the broker's next
//! position wherever it points (backwards too), recovers from an
//! out-of-range offset, and says when the reader should pause.
//!
//! The position moves back when a broker comes back with a shorter queue
//! than the reader had seen (a power cut under async flush loses the
//! unflushed tail): the broker answers a pull past its end at once with its
//! end. A reader that kept its old, higher position would pull in a busy
//! loop and never see the messages written below it since. Nor is the
//! broker's end the place to go back to: new messages may already fill the
//! lost offsets by the time the reader asks. It goes back to the group's
//! committed offset (everything below was handled; what lies between is
//! delivered again, as at-least-once allows), and the rewind is logged as a
//! warning with both positions.
//!
//! A reader of a replicated broker group reads from a slave while the
//! master is unreachable (see `read_targets`). The slave's queues are
//! copies of the master's at the same offsets, but may lag them: one that
//! ends below the reader's position has not caught up yet, so there the
//! reader keeps its position and waits instead of going back. Its trail
//! goes with it: the slave answers the first pull as another run, and
//! finds the reader's last message where the master had it once it holds
//! that far.
//!
//! New messages may even fill the queue back up to the reader's position
//! before it pulls again, so that the queue does not look short. A reader
//! therefore keeps a [`Trail`]: the broker run that last answered it and
//! the last message it got. The first pull after the broker restarted names
//! that message, and a broker that no longer has it there answers with a
//! position below the pull's, which is the short-queue case again.

use std::time::{Duration, Instant};

use txmq_protocol::{ErrorCode, MsgId, PullRequest, QueryOffset, StoredMessage, WireError};
use txmq_remoting::Connection;

/// Pause after an empty pull that came back well before its wait was over.
pub(crate) const EARLY_EMPTY_PAUSE: Duration = Duration::from_millis(50);

/// What a reader of a queue last heard from its broker: which run of the
/// broker answered, and the last message it got (offset and id).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Trail {
    epoch: u64,
    after: Option<(u64, MsgId)>,
    /// Which topic of the name the reader reads
    /// ([`txmq_protocol::PullResult::topic_generation`]); `None` before
    /// its first answer.
    generation: Option<u64>,
}

impl Trail {
    /// The trail of a reader starting on a queue of topic `generation`
    /// (as the broker's offsets answer named it): its first pull is
    /// checked against it.
    pub(crate) fn of_generation(generation: u64) -> Trail {
        Trail {
            generation: Some(generation),
            ..Trail::default()
        }
    }

    /// The topic generation to name in a commit of what was read.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.generation
    }
}

/// What a pull brought.
#[derive(Debug)]
pub(crate) struct Pulled {
    /// The reader's trail after this pull: keep it for the next one.
    pub(crate) trail: Trail,
    pub(crate) messages: Vec<StoredMessage>,
    /// Where the next pull starts: the broker's position after the batch,
    /// lower than the pull's offset when the queue was cut short.
    pub(crate) next_offset: u64,
    /// Nothing came and the broker answered well before the wait was
    /// over: pause ([`EARLY_EMPTY_PAUSE`]) before pulling again.
    pub(crate) early_empty: bool,
}

impl Pulled {
    /// How long to wait before the next pull.
    pub(crate) fn pause(&self) -> Duration {
        if self.early_empty {
            EARLY_EMPTY_PAUSE
        } else {
            Duration::ZERO
        }
    }
}

/// Pulls `request` from `conn` for `group`, whose committed offset is asked
/// for when the queue ends below the request's offset; `broker` names the
/// broker in the log. `slave`: `conn` is to a slave of the broker group
/// (its master is unreachable), whose queues may lag the master's: a queue
/// ending below the request's offset there means the slave has not caught
/// up yet, not a lost tail, and the reader stays where it is (it never
/// moves back for a slave; see the module docs).
///
/// # Errors
/// When the pull fails, or the query after a short or out-of-range answer.
pub(crate) async fn pull(
    conn: &Connection,
    slave: bool,
    broker: &str,
    group: &str,
    mut request: PullRequest,
    timeout: Duration,
    trail: Trail,
) -> Result<Pulled, txmq_remoting::Error> {
    request.epoch = trail.epoch;
    request.after = trail.after;
    let start = request.offset;
    let max_wait = Duration::from_millis(request.max_wait_ms);
    let (topic, queue) = (request.topic.clone(), request.queue);
    let began = Instant::now();
    // Whether the broker said the queue ends below `start`.
    // A position moved back keeps no last message.
    let mut moved = Trail {
        epoch: trail.epoch,
        after: None,
        generation: trail.generation,
    };
    let answer = conn.call_with_timeout(request, timeout).await;
    if let Ok(r) = &answer {
        if trail.generation.is_some_and(|g| g != r.topic_generation) {
            // Deleted and made again since the last answer: this reader's
            // position and what it read belong to the old topic.
            return Err(txmq_remoting::Error::Remote(WireError::new(
                ErrorCode::UnknownTopic,
                format!("topic '{topic}' was deleted and made again on broker {broker}"),
            )));
        }
    }
    let below_end = match answer {
        Ok(r) if r.next_offset >= start => {
            let early =
                r.messages.is_empty() && r.next_offset == start && began.elapsed() < max_wait / 2;
            let last = r
                .messages
                .last()
                .map(|m| (m.queue_offset, m.message.msg_id));
            return Ok(Pulled {
                trail: Trail {
                    epoch: r.epoch,
                    after: last.or(trail.after),
                    generation: Some(r.topic_generation),
                },
                messages: r.messages,
                next_offset: r.next_offset,
                early_empty: early,
            });
        }
        Ok(_) if slave => {
            tracing::debug!(%broker, %topic, queue, from = start, "the slave has not caught up to this reader's position yet; waiting");
            return Ok(behind_on_slave(trail, start));
        }
        Ok(r) => {
            moved.epoch = r.epoch;
            moved.generation = Some(r.topic_generation);
            true
        }
        Err(e)
            if e.remote()
                .is_some_and(|w| w.code == ErrorCode::OffsetOutOfRange) =>
        {
            false
        }
        Err(e) => return Err(e),
    };
    let q = conn
        .call(QueryOffset {
            group: group.to_string(),
            topic: topic.clone(),
            queue,
            stored_since_ms: None,
        })
        .await?;
    if slave && start > q.max_offset {
        tracing::debug!(%broker, %topic, queue, from = start, end = q.max_offset, "the slave has not caught up to this reader's position yet; waiting");
        return Ok(behind_on_slave(trail, start));
    }
    let to = if below_end || start > q.max_offset {
        // The queue ends below where this reader stands. Messages may
        // already have been written again at the lost offsets, below the
        // broker's end now: go back to the group's committed offset
        // (everything below it was handled), or to the first message when
        // the group has none there. (Not `clamp`: it panics on bounds out of
        // order, and these come off the wire.)
        let to = q
            .committed
            .unwrap_or(q.min_offset)
            .min(q.max_offset)
            .max(q.min_offset);
        tracing::warn!(%broker, %topic, queue, %group, from = start, to, end = q.max_offset, committed = ?q.committed, "the queue ends below this reader's position (the broker lost its tail); reading again from the group's committed offset");
        to
    } else {
        let to = start.min(q.max_offset).max(q.min_offset);
        tracing::warn!(%broker, %topic, queue, %group, from = start, to, "offset out of range; moved");
        to
    };
    Ok(Pulled {
        trail: moved,
        messages: Vec::new(),
        next_offset: to,
        early_empty: false,
    })
}

/// A slave whose queue ends below the reader's position: stay there, keep
/// the trail, and pull again after a pause.
fn behind_on_slave(trail: Trail, start: u64) -> Pulled {
    Pulled {
        trail,
        messages: Vec::new(),
        next_offset: start,
        early_empty: true,
    }
}
