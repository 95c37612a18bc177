//! Consumer-group offsets: commit (durably, as a log record) and query.

use txmq_protocol::{CommitOffset, Done, ErrorCode, QueryOffset, QueueOffsets, WireError};

use super::{bad_argument, existing_queue, store_error};
use crate::BrokerInner;

pub(crate) fn validate_group(group: &str) -> Result<(), WireError> {
    if group.is_empty() || group.len() > 255 {
        return Err(bad_argument("group name must be 1 to 255 bytes long"));
    }
    Ok(())
}

/// A group whose retry and dead-letter topics may be made (a clustering
/// member's heartbeat, a send-back): its name must fit in a topic name.
/// Other requests take any group of 1 to 255 bytes ([`validate_group`]),
/// so that groups named before this rule can still be shown, reset and
/// read by pull consumers.
pub(crate) fn validate_retrying_group(group: &str) -> Result<(), WireError> {
    txmq_protocol::validate_group_name(group).map_err(bad_argument)
}

/// A clustering group's members divide its queues, and only a queue's
/// owner may move its offset: a commit of such a group must name the
/// member it comes from, of that group (forward-only commits, a slave
/// handing its master the offsets it kept, move nothing back).
///
/// # Errors
/// `BAD_ARGUMENT`.
fn check_names_owner(b: &BrokerInner, req: &CommitOffset) -> Result<(), WireError> {
    match &req.owner {
        Some(o) if o.group != req.group => Err(bad_argument(format!(
            "an offset commit of group '{}' names a member of group '{}' as its owner",
            req.group, o.group
        ))),
        None if b.groups.is_clustering(&req.group) => Err(bad_argument(format!(
            "group '{}' consumes in clustering mode on broker {}: an offset commit must name \
             its owner (the member's group and client id) for queue {} of '{}'",
            req.group, b.config.broker_name, req.queue, req.topic
        ))),
        _ => Ok(()),
    }
}

pub(super) async fn commit(b: &BrokerInner, req: CommitOffset) -> Result<Done, WireError> {
    validate_group(&req.group)?;
    existing_queue(b, &req.topic, req.queue)?;
    if !req.forward_only {
        check_names_owner(b, &req)?;
        super::group::check_owner(b, req.owner.as_ref(), &req.topic, req.queue)?;
    }
    let q = b
        .store
        .queue(&req.topic, req.queue)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
    if let Some(read) = req.topic_generation {
        if read != b.store.topic_generation(&req.topic) {
            // Read from a topic deleted since: its offsets mean nothing
            // in the topic made again under its name.
            return Err(WireError::new(
                ErrorCode::UnknownTopic,
                format!(
                    "topic '{}' was deleted on broker {} after this offset was read; \
                     nothing committed",
                    req.topic, b.config.broker_name
                ),
            ));
        }
    }
    if req.offset > q.max_offset() {
        return Err(WireError::new(
            ErrorCode::OffsetOutOfRange,
            format!(
                "offset {} is past the end of queue {} of '{}' ({})",
                req.offset,
                req.queue,
                req.topic,
                q.max_offset()
            ),
        ));
    }
    let key = (req.group.clone(), req.topic.clone(), req.queue);
    if b.replication.is_slave() {
        // Kept here (reads see it) and handed to the master when it is
        // reachable; the master takes it only forward.
        let committed = b.store.committed_offset(&req.group, &req.topic, req.queue);
        if committed.is_none_or(|c| c < req.offset) {
            b.replication
                .kept_offsets
                .entry(key)
                .and_modify(|o| *o = (*o).max(req.offset))
                .or_insert(req.offset);
        }
        return Ok(Done {});
    }
    if req.forward_only
        && b.store
            .committed_offset(&req.group, &req.topic, req.queue)
            .is_some_and(|c| c >= req.offset)
    {
        return Ok(Done {});
    }
    let appended = b
        .store
        .commit_offset(&req.group, &req.topic, req.queue, req.offset)
        .await
        .map_err(|e| match e {
            // Deleted while the commit waited for the writer.
            crate::store::StoreError::NoQueue { .. } => super::unknown_topic(b, &req.topic),
            e => store_error(e),
        })?;
    b.replication
        .confirm(appended.end)
        .await
        .into_result("the offset commit")?;
    Ok(Done {})
}

/// A group's committed offset here: on a slave, the larger of the
/// replicated one and one committed to the slave meanwhile.
pub(crate) fn committed(b: &BrokerInner, group: &str, topic: &str, queue: u32) -> Option<u64> {
    let stored = b.store.committed_offset(group, topic, queue);
    let kept = b
        .replication
        .kept_offsets
        .get(&(group.to_string(), topic.to_string(), queue))
        .map(|v| *v);
    stored.max(kept)
}

pub(super) fn query(b: &BrokerInner, req: QueryOffset) -> Result<QueueOffsets, WireError> {
    validate_group(&req.group)?;
    existing_queue(b, &req.topic, req.queue)?;
    let q = b
        .store
        .queue(&req.topic, req.queue)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
    // Read after the queue, as a pull does.
    let topic_generation = b.store.topic_generation(&req.topic);
    let (min_offset, max_offset) = (q.min_offset(), q.max_offset());
    let since_offset = match req.stored_since_ms {
        Some(ts) => Some(super::group::first_at_or_after(
            b, &req.topic, req.queue, min_offset, max_offset, ts,
        )?),
        None => None,
    };
    Ok(QueueOffsets {
        committed: committed(b, &req.group, &req.topic, req.queue),
        min_offset,
        max_offset,
        since_offset,
        topic_generation,
    })
}
