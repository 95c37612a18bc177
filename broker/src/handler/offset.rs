//! Consumer-group offsets: commit (durably, as a log record) and query.

use txmq_protocol::{CommitOffset, Done, ErrorCode, QueryOffset, QueueOffsets, WireError};

use super::{bad_argument, existing_queue, store_error};
use crate::BrokerInner;

pub(super) fn validate_group(group: &str) -> Result<(), WireError> {
    if group.is_empty() || group.len() > 255 {
        return Err(bad_argument("group name must be 1 to 255 bytes long"));
    }
    Ok(())
}

pub(super) async fn commit(b: &BrokerInner, req: CommitOffset) -> Result<Done, WireError> {
    validate_group(&req.group)?;
    existing_queue(b, &req.topic, req.queue)?;
    super::group::check_owner(b, req.owner.as_ref(), &req.topic, req.queue)?;
    let q = b
        .store
        .queue(&req.topic, req.queue)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
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
    b.store
        .commit_offset(&req.group, &req.topic, req.queue, req.offset)
        .await
        .map_err(store_error)?;
    Ok(Done {})
}

pub(super) fn query(b: &BrokerInner, req: QueryOffset) -> Result<QueueOffsets, WireError> {
    validate_group(&req.group)?;
    existing_queue(b, &req.topic, req.queue)?;
    let q = b
        .store
        .queue(&req.topic, req.queue)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
    Ok(QueueOffsets {
        committed: b.store.committed_offset(&req.group, &req.topic, req.queue),
        min_offset: q.min_offset(),
        max_offset: q.max_offset(),
    })
}
