//! Send: append one message or a batch to one queue.

use txmq_protocol::{
    validate_topic_name, ErrorCode, SendRequest, SendResult, SendStatus, WireError,
    PERM_READ_WRITE, PERM_WRITE,
};

use super::{bad_argument, check_queue, store_error, topic};
use crate::BrokerInner;

pub(super) async fn handle(b: &BrokerInner, req: SendRequest) -> Result<SendResult, WireError> {
    let Some(first) = req.messages.first() else {
        return Err(bad_argument("a send needs at least one message"));
    };
    let topic_name = first.topic.clone();
    validate_topic_name(&topic_name).map_err(bad_argument)?;
    if let Some(other) = req.messages.iter().find(|m| m.topic != topic_name) {
        return Err(bad_argument(format!(
            "all messages of one send must have the same topic; found '{topic_name}' and '{}'",
            other.topic
        )));
    }
    let config = match b.topics.get(&topic_name) {
        Some(c) => c,
        None if b.config.auto_create_topics => {
            topic::create_topic(
                b,
                &topic_name,
                b.config.default_queues,
                PERM_READ_WRITE,
                false,
            )
            .await?
        }
        None => return Err(super::unknown_topic(b, &topic_name)),
    };
    if config.perm & PERM_WRITE == 0 {
        return Err(WireError::new(
            ErrorCode::NoPermission,
            format!(
                "topic '{topic_name}' is not writable on broker {}",
                b.config.broker_name
            ),
        ));
    }
    check_queue(&config, req.queue)?;
    let msg_ids = req.messages.iter().map(|m| m.msg_id).collect();
    let appended = b
        .store
        .append(&topic_name, req.queue, req.messages)
        .await
        .map_err(store_error)?;
    Ok(SendResult {
        status: if appended.durable {
            SendStatus::SendOk
        } else {
            SendStatus::FlushDiskTimeout
        },
        queue: req.queue,
        first_offset: appended.first_offset,
        msg_ids,
    })
}
