//! Consumer groups: heartbeats and assignment, leaving, handing messages
//! back for retry (or to the dead-letter topic), and the operator's view.

use std::collections::BTreeSet;

use txmq_protocol::{
    dlq_topic, now_millis, retry_topic, validate_topic_name, Done, ErrorCode, GetGroupState,
    GroupList, GroupQueue, GroupState, GroupSummary, Heartbeat, HeartbeatOk, LeaveGroup,
    OffsetTarget, OffsetsReset, QueueOwner, QueueRef, ResetOffset, SendBack, SentBack, WireError,
    PERM_READ, PERM_READ_WRITE, PROPERTY_DELIVER_AT, PROPERTY_REAL_QUEUE, PROPERTY_REAL_TOPIC,
    PROPERTY_RECONSUME_TIMES, PROPERTY_REPORTED_ORIGIN,
};
use txmq_remoting::Connection;

use super::authorize::send_back_needs;
use super::{bad_argument, offset::validate_group, store_error, topic};
use crate::groups::{self, Beat};
use crate::store::record::RecordKind;
use crate::BrokerInner;

/// Most subscriptions one member may have.
const MAX_SUBSCRIPTIONS: usize = 256;
/// Most queues one heartbeat may say it holds.
const MAX_HELD: usize = 65_536;

pub(super) async fn heartbeat(
    b: &BrokerInner,
    conn: &Connection,
    req: Heartbeat,
) -> Result<HeartbeatOk, WireError> {
    if req.broadcast {
        validate_group(&req.group)?;
    } else {
        super::offset::validate_retrying_group(&req.group)?;
    }
    if req.client_id.is_empty() || req.client_id.len() > 255 {
        return Err(bad_argument("client id must be 1 to 255 bytes long"));
    }
    if req.subscriptions.len() > MAX_SUBSCRIPTIONS || req.held.len() > MAX_HELD {
        return Err(bad_argument(format!(
            "at most {MAX_SUBSCRIPTIONS} subscriptions and {MAX_HELD} held queues per heartbeat"
        )));
    }
    let mut topics = BTreeSet::new();
    for s in &req.subscriptions {
        validate_topic_name(&s.topic).map_err(bad_argument)?;
        txmq_protocol::parse_tag_expression(&s.expression).map_err(bad_argument)?;
        if !topics.insert(s.topic.as_str()) {
            return Err(bad_argument(format!(
                "topic '{}' is subscribed twice",
                s.topic
            )));
        }
    }
    // The group's retry topic exists wherever its members consume, so
    // handed-back messages have somewhere to wait. On a full disk it cannot
    // be made yet: the members still get their queues (reading needs no
    // room), and the next heartbeat tries again.
    let retry = retry_topic(&req.group);
    if !req.broadcast
        && req.subscriptions.iter().any(|s| s.topic == retry)
        && b.topics.get(&retry).is_none()
    {
        match topic::create_topic(b, &retry, 1, PERM_READ_WRITE, false).await {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::StoreFull => {
                txmq_remoting::warn_throttled!(group = %req.group, error = %e, "the group's retry topic cannot be made yet; its members consume meanwhile, and a heartbeat tries again");
            }
            Err(e) => return Err(e),
        }
    }
    let group = req.group.clone();
    let beat = Beat {
        group: req.group,
        client_id: req.client_id,
        subscriptions: req.subscriptions,
        broadcast: req.broadcast,
        held: req.held,
    };
    // A topic that may not be read here (write only) has no queue to hand
    // out: its members would only have their pulls refused.
    let (assigned, notices, expired) = b.groups.heartbeat(
        conn,
        beat,
        |t| {
            b.topics
                .get_with(t, |c| (c.perm & PERM_READ != 0).then_some(c.queues))
                .flatten()
        },
        |t, q| super::offset::committed(b, &group, t, q).is_some(),
    );
    if !notices.is_empty() {
        tracing::debug!(%group, notified = notices.len(), "consumer group changed");
    }
    groups::notify(notices);
    if expired {
        tracing::info!(%group, "an expired consumer heartbeats again: told so, it gives up what it read before");
    }
    Ok(HeartbeatOk {
        assigned,
        expiry_ms: b.config.consumer_expiry.as_millis() as u64,
        expired,
    })
}

pub(super) fn leave(b: &BrokerInner, req: LeaveGroup) -> Result<Done, WireError> {
    validate_group(&req.group)?;
    groups::notify(b.groups.leave(&req.group, &req.client_id));
    Ok(Done {})
}

/// The back-off before redelivery number `attempt` (1-based).
fn backoff_ms(b: &BrokerInner, attempt: u32) -> u64 {
    let delays = &b.config.retry_delays;
    let i = (attempt.max(1) as usize - 1).min(delays.len().saturating_sub(1));
    delays.get(i).map_or(1000, |d| d.as_millis() as u64)
}

/// Copies a message a consumer of `req.group` hands back (or the broker
/// itself, `conn` `None`) into the group's retry or dead-letter topic.
pub(crate) async fn send_back(
    b: &BrokerInner,
    conn: Option<&Connection>,
    req: SendBack,
) -> Result<SentBack, WireError> {
    send_back_delivered(b, conn, req, None).await
}

/// As [`send_back`]; `delivered`: how many times the group was handed the
/// message (a pop consumer's attempts, which no retry copy counted), in
/// place of what its reconsume-times property says.
pub(crate) async fn send_back_delivered(
    b: &BrokerInner,
    conn: Option<&Connection>,
    req: SendBack,
    delivered: Option<u32>,
) -> Result<SentBack, WireError> {
    super::offset::validate_retrying_group(&req.group)?;
    let (mut message, queue) = match req.message {
        // The consumer's copy, for a record that is gone.
        Some(mut stored) => {
            send_back_needs(b, conn, &req.group, &stored.message.topic)?;
            if conn.is_some() && b.security.authenticates() {
                // Where it came from is the consumer's word: its dead
                // letter goes back only where an operator names.
                stored
                    .message
                    .properties
                    .insert(PROPERTY_REPORTED_ORIGIN.into(), "consumer".into());
            }
            (stored.message, stored.queue)
        }
        None => {
            let Some((record, _)) = b.store.read_record_at(req.log_offset) else {
                return Err(WireError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!(
                        "no message at log offset {} on broker {}",
                        req.log_offset, b.config.broker_name
                    ),
                ));
            };
            if !matches!(
                record.kind,
                RecordKind::Message | RecordKind::Delayed | RecordKind::DelayedCopy
            ) {
                return Err(bad_argument(format!(
                    "the record at log offset {} is not a message",
                    req.log_offset
                )));
            }
            // Before the permission: another topic's record there is the
            // cut-short case, whose answer sends the consumer's own copy.
            if let Some(id) = req.msg_id.filter(|id| *id != record.message.msg_id) {
                return Err(WireError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!(
                        "the message at log offset {} on broker {} is not {id}: the log was cut short and written again",
                        req.log_offset, b.config.broker_name
                    ),
                ));
            }
            send_back_needs(b, conn, &req.group, &record.message.topic)?;
            (record.message, record.queue)
        }
    };
    let props = &mut message.properties;
    let reconsumed: u32 = match delivered {
        Some(d) => d.saturating_sub(1),
        None => props
            .get(PROPERTY_RECONSUME_TIMES)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    };
    let attempt = reconsumed.saturating_add(1);
    if !props.contains_key(PROPERTY_REAL_TOPIC) {
        props.insert(PROPERTY_REAL_TOPIC.into(), message.topic.clone());
        props.insert(PROPERTY_REAL_QUEUE.into(), queue.to_string());
    }
    props.remove(PROPERTY_DELIVER_AT);
    props.insert(PROPERTY_RECONSUME_TIMES.into(), attempt.to_string());
    let dead = req.dead_letter || attempt > req.max_reconsume_times;
    let target = if dead {
        dlq_topic(&req.group)
    } else {
        retry_topic(&req.group)
    };
    if b.topics.get(&target).is_none() {
        topic::create_topic(b, &target, 1, PERM_READ_WRITE, false).await?;
    }
    message.topic = target.clone();
    let bytes = message.body.len();
    let (deliver_at, appended) = if dead {
        let appended = b
            .store
            .append(&target, 0, vec![message])
            .await
            .map_err(store_error)?;
        tracing::info!(group = %req.group, log_offset = req.log_offset, attempt, "message moved to the dead-letter topic");
        b.metrics.dead_letter(&req.group);
        (0, appended)
    } else {
        let max = b.config.max_delay.as_millis() as u64;
        let delay = req
            .delay_ms
            .unwrap_or_else(|| backoff_ms(b, attempt))
            .min(max);
        let at = now_millis().saturating_add(delay);
        let appended = b
            .store
            .append_delayed(&target, 0, vec![message], at)
            .await
            .map_err(store_error)?;
        (at, appended)
    };
    // Into the retry or dead-letter topic, counted as a send is.
    b.metrics.messages_in(&target, 1, bytes);
    // The consumer commits past the message once this is answered: under
    // a controller with sync replication the copy must be on the in-sync
    // replicas first (on the master only, a failover may cut it, and the
    // message would be neither handled nor retried); refused otherwise,
    // so the consumer handles it again. Without a controller nothing cuts
    // the master's log, and a refusal would only add copies.
    if b.replication.control.is_some() {
        b.replication
            .confirm(appended.end)
            .await
            .into_result("the handed-back message")?;
    }
    Ok(SentBack {
        topic: target,
        reconsume_times: attempt,
        deliver_at,
    })
}

pub(super) fn list(b: &BrokerInner) -> GroupList {
    let mut all: std::collections::BTreeMap<String, (u32, BTreeSet<String>)> = Default::default();
    for (group, topic) in b.store.committed_groups() {
        all.entry(group).or_default().1.insert(topic);
    }
    for (group, members, topics) in b.groups.list() {
        let e = all.entry(group).or_default();
        e.0 = members;
        e.1.extend(topics);
    }
    GroupList {
        broker_name: b.config.broker_name.clone(),
        groups: all
            .into_iter()
            .map(|(group, (members, topics))| GroupSummary {
                group,
                members,
                topics: topics.into_iter().collect(),
            })
            .collect(),
    }
}

pub(super) fn state(b: &BrokerInner, req: GetGroupState) -> Result<GroupState, WireError> {
    validate_group(&req.group)?;
    let (members, owned) = b.groups.state(&req.group);
    let owned: std::collections::HashMap<(String, u32), Option<String>> = owned
        .into_iter()
        .map(|o| ((o.topic, o.queue), o.owner))
        .collect();
    let mut topics: BTreeSet<String> = members
        .iter()
        .flat_map(|m| m.subscriptions.iter().map(|s| s.topic.clone()))
        .collect();
    topics.extend(
        b.store
            .committed_groups()
            .into_iter()
            .filter(|(g, _)| *g == req.group)
            .map(|(_, t)| t),
    );
    topics.extend(
        b.replication
            .kept_offsets
            .iter()
            .filter(|e| e.key().0 == req.group)
            .map(|e| e.key().1.clone()),
    );
    let mut queues = Vec::new();
    for topic in topics {
        let Some(config) = b.topics.get(&topic) else {
            continue;
        };
        for queue in 0..config.queues {
            let Some(q) = b.store.queue(&topic, queue) else {
                continue;
            };
            // On a slave, with what was committed here while the master
            // was away (reads go by it too).
            let committed = super::offset::committed(b, &req.group, &topic, queue);
            let max = q.max_offset();
            // A write-only topic's queues are assigned to nobody (see
            // `heartbeat`), whoever last held them.
            let owner = owned
                .get(&(topic.clone(), queue))
                .cloned()
                .flatten()
                .filter(|_| config.perm & PERM_READ != 0);
            // A queue nobody owns may wait for a reader the broker lost
            // track of (a restart, a closed connection): `group show` says
            // so, rather than show it free.
            let waiting_ms = match (&owner, config.perm & PERM_READ != 0) {
                (None, true) => {
                    let q = QueueRef {
                        topic: topic.clone(),
                        queue,
                    };
                    b.groups
                        .waiting(&req.group, &q, committed.is_some())
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
                }
                _ => None,
            };
            queues.push(GroupQueue {
                topic: topic.clone(),
                queue,
                owner,
                committed,
                max_offset: max,
                // What retention removed is no lag: it cannot be read.
                lag: max.saturating_sub(committed.unwrap_or(0).max(q.min_offset())),
                waiting_ms,
            });
        }
    }
    Ok(GroupState {
        broker_name: b.config.broker_name.clone(),
        group: req.group,
        members,
        queues,
    })
}

pub(super) async fn reset(b: &BrokerInner, req: ResetOffset) -> Result<OffsetsReset, WireError> {
    validate_group(&req.group)?;
    let config = b
        .topics
        .get(&req.topic)
        .ok_or_else(|| super::unknown_topic(b, &req.topic))?;
    if b.groups.has_live_members(&req.group, &req.topic) {
        return Err(WireError::new(
            ErrorCode::GroupActive,
            format!(
                "group '{}' has live consumers of '{}' on broker {}; stop them before resetting its offsets",
                req.group, req.topic, b.config.broker_name
            ),
        ));
    }
    // A group of RocketMQ 5 consumers (gRPC) reads where its pop state
    // says, not at a committed offset: that state is reset instead (which
    // commits the offset too). It has no members to refuse: it keeps no
    // position of its own, and what it holds in flight is dropped.
    let pop = b.store.is_pop_group(&req.group, &req.topic);
    let mut queues = Vec::new();
    for queue in 0..config.queues {
        let Some(q) = b.store.queue(&req.topic, queue) else {
            continue;
        };
        let (min, max) = (q.min_offset(), q.max_offset());
        let offset = match req.to {
            OffsetTarget::First => min,
            OffsetTarget::Last => max,
            OffsetTarget::Timestamp(ts) => first_at_or_after(b, &req.topic, queue, min, max, ts)?,
        };
        let reset = if pop {
            let key = (req.group.clone(), req.topic.clone(), queue);
            b.store.pop_reset(key, offset).await
        } else {
            b.store
                .commit_offset(&req.group, &req.topic, queue, offset)
                .await
        };
        reset.map_err(store_error)?;
        if pop {
            // Its long polls look again: a reset back has messages for them.
            q.wake_polls();
        }
        queues.push((queue, offset));
    }
    tracing::info!(group = %req.group, topic = %req.topic, to = ?req.to, "offsets reset");
    Ok(OffsetsReset {
        broker_name: b.config.broker_name.clone(),
        queues,
    })
}

/// The first offset in `min..max` whose message came into the queue at or
/// after `ts` (`max` when none): a binary search over those times, which
/// grow along a queue. A delayed message (a retry in a `%RETRY%` topic too)
/// comes into its queue when it is delivered, though it was stored when it
/// was sent: its time is its delivery time (a search by store times skipped
/// the messages stored between a delayed message's send and its delivery).
pub(super) fn first_at_or_after(
    b: &BrokerInner,
    topic: &str,
    queue: u32,
    min: u64,
    max: u64,
    ts: u64,
) -> Result<u64, WireError> {
    let (mut lo, mut hi) = (min, max);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let found = b
            .store
            .read_found(topic, queue, mid, 1)
            .map_err(store_error)?;
        // A delayed record's aux is its delivery time; a copy made when
        // it was moved (its aux is where it moved from) is stored then.
        let queued_at = found.first().map(|(_, f)| match f.record.kind {
            RecordKind::Delayed => f.record.store_timestamp.max(f.record.aux),
            _ => f.record.store_timestamp,
        });
        match queued_at {
            Some(at) if at >= ts => hi = mid,
            _ => lo = mid + 1,
        }
    }
    Ok(lo)
}

/// Refuses a member's pull of a queue another member owns (a rebalance
/// moved it: QUEUE_NOT_OWNED, the reader stops), or of any queue before
/// the member heartbeated since the broker started or since its
/// connection closed (HEARTBEAT_REQUIRED: retriable; the member is asked
/// over `conn` to heartbeat at once). See [`crate::groups`].
pub(super) fn check_reader(
    b: &BrokerInner,
    conn: &Connection,
    owner: Option<&QueueOwner>,
    topic: &str,
    queue: u32,
) -> Result<(), WireError> {
    let Some(o) = owner else { return Ok(()) };
    match b.groups.may_pull(&o.group, &o.client_id, topic, queue) {
        Ok(()) => Ok(()),
        Err(groups::Refusal::NotOwner) => Err(not_owner(b, &o.group, topic, queue)),
        Err(groups::Refusal::NotMember) => {
            groups::notify(vec![(o.group.clone(), conn.clone())]);
            Err(WireError::new(
                ErrorCode::HeartbeatRequired,
                format!(
                    "consumer '{}' has not heartbeated to broker {} as a member of group '{}' since the broker started or since its connection closed; it may pull queue {queue} of '{topic}' once it has",
                    o.client_id, b.config.broker_name, o.group
                ),
            ))
        }
    }
}

fn not_owner(b: &BrokerInner, group: &str, topic: &str, queue: u32) -> WireError {
    WireError::new(
        ErrorCode::QueueNotOwned,
        format!(
            "queue {queue} of '{topic}' on broker {} is assigned to another member of group '{group}'",
            b.config.broker_name
        ),
    )
}

/// Refuses a member's commit of a queue another member owns (a rebalance
/// moved it): the old reader cannot move the new owner's position back.
pub(super) fn check_owner(
    b: &BrokerInner,
    owner: Option<&QueueOwner>,
    topic: &str,
    queue: u32,
) -> Result<(), WireError> {
    match owner {
        Some(o) if !b.groups.may_use(&o.group, &o.client_id, topic, queue) => {
            Err(not_owner(b, &o.group, topic, queue))
        }
        _ => Ok(()),
    }
}
