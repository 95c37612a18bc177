//! ReceiveMessage, AckMessage, ChangeInvisibleDuration and
//! ForwardMessageToDeadLetterQueue: RocketMQ 5's simple and push
//! consumers on the broker's pop model (`crate::pop`).
//!
//! Every member of a group receives from every queue of the topic on this
//! broker; a received message is hidden from the group for its invisible
//! duration, then comes again with its delivery attempt counted, until it
//! is acknowledged or, past the group's attempts, dead-lettered. A push
//! consumer asks the broker to choose the duration (`auto_renew`): it is
//! [`AUTO_RENEW_INVISIBLE`], not renewed, so a message a push consumer
//! takes longer than that over comes again (at least once).

use std::time::Duration;

use futures_util::future::join_all;
use txmq_protocol::{tag_hash, WireError};

use super::telemetry::CONSUMER_MAX_ATTEMPTS;
use super::{convert, pb, status, Front};
use crate::pop::{self, ReceiveRequest};

/// The invisible duration of messages a push consumer receives.
pub(super) const AUTO_RENEW_INVISIBLE: Duration = Duration::from_secs(60);
/// The invisible duration when a receive names none.
const DEFAULT_INVISIBLE: Duration = Duration::from_secs(30);

fn name(r: Option<pb::Resource>) -> String {
    r.map(|r| r.name).unwrap_or_default()
}

/// The tags of a filter expression (`*`, or `a || b`) as hashes; SQL
/// filters are not served.
fn tags(filter: Option<pb::FilterExpression>) -> Result<Vec<u64>, pb::Status> {
    let Some(f) = filter else {
        return Ok(Vec::new());
    };
    if f.r#type == pb::FilterType::Sql as i32 {
        return Err(status::new(
            pb::Code::IllegalFilterExpression,
            "SQL92 filters are not supported by txmq; filter by tag",
        ));
    }
    let expression = f.expression.trim();
    if expression.is_empty() || expression == "*" {
        return Ok(Vec::new());
    }
    expression
        .split("||")
        .map(str::trim)
        .map(|t| {
            if t.is_empty() {
                Err(status::new(
                    pb::Code::IllegalFilterExpression,
                    format!("'{expression}' has an empty tag"),
                ))
            } else {
                Ok(tag_hash(Some(t)))
            }
        })
        .collect()
}

/// The answers of a receive, in RocketMQ's order: the status, then the
/// delivery time and the messages when there are any.
pub(super) async fn receive(
    f: &Front,
    r: pb::ReceiveMessageRequest,
) -> Vec<pb::ReceiveMessageResponse> {
    use pb::receive_message_response::Content;
    let one = |s| {
        vec![pb::ReceiveMessageResponse {
            content: Some(Content::Status(s)),
        }]
    };
    let filter = match tags(r.filter_expression) {
        Ok(t) => t,
        Err(s) => return one(s),
    };
    let topic = r
        .message_queue
        .as_ref()
        .map(|q| name(q.topic.clone()))
        .unwrap_or_default();
    let invisible = match r.invisible_duration.as_ref().map(convert::std_duration) {
        Some(Some(d)) => d,
        Some(None) => {
            return one(status::new(
                pb::Code::IllegalInvisibleTime,
                "the invisible duration must not be negative",
            ))
        }
        None if r.auto_renew => AUTO_RENEW_INVISIBLE,
        None => DEFAULT_INVISIBLE,
    };
    let poll = match r.long_polling_timeout.as_ref().map(convert::std_duration) {
        Some(Some(d)) => d.min(pop::MAX_POLL),
        Some(None) => {
            return one(status::new(
                pb::Code::IllegalPollingTime,
                "the long polling timeout must not be negative",
            ))
        }
        None => Duration::ZERO,
    };
    let request = ReceiveRequest {
        group: name(r.group),
        topic,
        queue: None,
        max_messages: u32::try_from(r.batch_size).unwrap_or(0),
        invisible,
        poll,
        tags: filter,
        fifo: false,
        max_attempts: CONSUMER_MAX_ATTEMPTS as u32,
    };
    let received = match pop::receive(&f.b, request).await {
        Ok(r) => r,
        Err(e) => return one(receive_error(&e, invisible)),
    };
    if received.is_empty() {
        return one(status::new(pb::Code::MessageNotFound, "no new message"));
    }
    let mut answers = Vec::with_capacity(received.len() + 2);
    answers.push(pb::ReceiveMessageResponse {
        content: Some(Content::Status(status::ok())),
    });
    answers.push(pb::ReceiveMessageResponse {
        content: Some(Content::DeliveryTimestamp(convert::timestamp(
            convert::now_ms(),
        ))),
    });
    let host = &f.b.advertised_addr;
    for m in received {
        let kind = convert::message_type(&m.message.message);
        let mut message = convert::to_rocketmq(&m.message, host, kind);
        if let Some(sys) = message.system_properties.as_mut() {
            sys.receipt_handle = Some(m.handle);
            sys.delivery_attempt = Some(i32::try_from(m.attempt).unwrap_or(i32::MAX));
            let left = m.invisible_until_ms.saturating_sub(convert::now_ms());
            sys.invisible_duration = Some(convert::duration(Duration::from_millis(left)));
        }
        answers.push(pb::ReceiveMessageResponse {
            content: Some(Content::Message(message)),
        });
    }
    answers
}

/// A receive's argument errors in RocketMQ's own codes.
fn receive_error(e: &WireError, invisible: Duration) -> pb::Status {
    if e.code == txmq_protocol::ErrorCode::BadArgument
        && !(pop::MIN_INVISIBLE..=pop::MAX_INVISIBLE).contains(&invisible)
    {
        return status::new(pb::Code::IllegalInvisibleTime, e.message.clone());
    }
    status::from_wire(e)
}

pub(super) async fn ack(f: &Front, r: pb::AckMessageRequest) -> pb::AckMessageResponse {
    let group = name(r.group);
    let topic = name(r.topic);
    // Acks of one request go to the writer together (one group commit).
    let acks = r
        .entries
        .iter()
        .map(|e| pop::ack(&f.b, &group, &topic, &e.receipt_handle));
    let results = join_all(acks).await;
    let entries: Vec<pb::AckMessageResultEntry> = r
        .entries
        .into_iter()
        .zip(results)
        .map(|(e, result)| pb::AckMessageResultEntry {
            message_id: e.message_id,
            receipt_handle: e.receipt_handle,
            status: Some(match result {
                Ok(()) => status::ok(),
                Err(e) => status::from_wire(&e),
            }),
        })
        .collect();
    let status = match entries.first() {
        None => status::new(pb::Code::BadRequest, "an ack needs at least one entry"),
        Some(first) if entries.iter().all(|e| e.status == first.status) => {
            first.status.clone().unwrap_or_else(status::ok)
        }
        Some(_) => status::new(
            pb::Code::MultipleResults,
            "the entries had different results; see each entry",
        ),
    };
    pb::AckMessageResponse {
        status: Some(status),
        entries,
    }
}

pub(super) async fn change_invisible(
    f: &Front,
    r: pb::ChangeInvisibleDurationRequest,
) -> pb::ChangeInvisibleDurationResponse {
    let answer = |status, receipt_handle| pb::ChangeInvisibleDurationResponse {
        status: Some(status),
        receipt_handle,
    };
    let Some(invisible) = r
        .invisible_duration
        .as_ref()
        .and_then(convert::std_duration)
    else {
        return answer(
            status::new(
                pb::Code::IllegalInvisibleTime,
                "an invisible duration (not negative) is needed",
            ),
            String::new(),
        );
    };
    let changed = pop::change_invisible(
        &f.b,
        &name(r.group),
        &name(r.topic),
        &r.receipt_handle,
        invisible,
    )
    .await;
    match changed {
        Ok(received) => answer(status::ok(), received.handle),
        Err(e) => answer(receive_error(&e, invisible), String::new()),
    }
}

pub(super) async fn forward_to_dead_letters(
    f: &Front,
    r: pb::ForwardMessageToDeadLetterQueueRequest,
) -> pb::ForwardMessageToDeadLetterQueueResponse {
    let max_attempts = u32::try_from(r.max_delivery_attempts)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(CONSUMER_MAX_ATTEMPTS as u32);
    let forwarded = pop::forward_to_dead_letters(
        &f.b,
        &name(r.group),
        &name(r.topic),
        &r.receipt_handle,
        max_attempts,
    )
    .await;
    pb::ForwardMessageToDeadLetterQueueResponse {
        status: Some(match forwarded {
            Ok(()) => status::ok(),
            Err(e) => status::from_wire(&e),
        }),
    }
}
