//! The push consumer's membership: heartbeat every broker of the
//! subscribed topics, start a worker for each queue a broker assigns, and
//! make workers give up queues it no longer assigns.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use txmq_protocol::{Heartbeat, LeaveGroup, QueueRef, Subscription};

use super::{lock, worker, MessageHandler, QueueId, Shared, WorkerHandle};
use crate::Error;

/// How often to heartbeat: well within the brokers' member expiry,
/// whatever the interval says.
fn period<H>(shared: &Shared<H>) -> Duration {
    let expiry = shared.broker_expiry_ms.load(Ordering::Relaxed);
    let every = shared.settings.rebalance_interval;
    match expiry {
        0 => every,
        ms => every.min(Duration::from_millis(ms / 3)),
    }
}

/// Rebalances every interval, or at once when woken.
pub(crate) async fn run<H: MessageHandler>(shared: Arc<Shared<H>>) {
    loop {
        let every = period(&shared);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.rebalance.notified() => {}
            _ = shared.stop_rebalance.cancelled() => return,
            _ = shared.cancel.cancelled() => return,
        }
        round(&shared).await;
    }
}

/// The broker groups serving any subscribed topic, by name; their
/// addresses go to `shared.brokers`.
async fn brokers<H>(shared: &Shared<H>) -> BTreeSet<String> {
    let mut brokers = BTreeSet::new();
    for sub in &shared.subs {
        match shared.routes.get(&sub.topic).await {
            Ok(info) => {
                for b in &info.route.brokers {
                    shared.brokers.update(b);
                    brokers.insert(b.broker_name.clone());
                }
            }
            Err(Error::NoRoute { .. }) => {
                tracing::debug!(topic = %sub.topic, "no route for a subscribed topic yet");
            }
            Err(e) => {
                tracing::warn!(topic = %sub.topic, error = %crate::error::chain(&e), "cannot get a route")
            }
        }
    }
    brokers
}

/// One heartbeat round: learn the assignment of every broker, start and
/// stop workers to match.
pub(crate) async fn round<H: MessageHandler>(shared: &Arc<Shared<H>>) {
    let brokers = brokers(shared).await;
    let subscriptions: Vec<Subscription> = shared
        .subs
        .iter()
        .map(|s| Subscription {
            topic: s.topic.clone(),
            expression: s.expression.clone(),
        })
        .collect();
    let (held, released): (Vec<QueueId>, u64) = {
        let workers = lock(&shared.workers);
        (
            workers.keys().cloned().collect(),
            shared.released.load(Ordering::Acquire),
        )
    };
    // A broker that does not answer (paused, or cut off) must not hold up
    // the heartbeats of the next round to the others past their expiry: each
    // heartbeat, connecting included, gets one period.
    let patience = period(shared);
    let beats = brokers.iter().map(|name| {
        let request = Heartbeat {
            group: shared.group.clone(),
            client_id: shared.client_id.clone(),
            subscriptions: subscriptions.clone(),
            broadcast: shared.settings.broadcast,
            held: held
                .iter()
                .filter(|q| q.broker_name == *name)
                .map(|q| QueueRef {
                    topic: q.topic.clone(),
                    queue: q.queue,
                })
                .collect(),
        };
        let beat = async move {
            let target = shared.connect(name).await?;
            let ok = target
                .conn
                .call_with_timeout(request, patience)
                .await
                .map_err(|e| Error::at_broker(name, &target.addr, e))?;
            if ok.expiry_ms > 0 {
                shared
                    .broker_expiry_ms
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                        Some(if e == 0 {
                            ok.expiry_ms
                        } else {
                            e.min(ok.expiry_ms)
                        })
                    })
                    .ok();
            }
            Ok::<_, Error>((name.clone(), ok.assigned, ok.expired))
        };
        async move {
            tokio::time::timeout(patience, beat)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Remoting(txmq_remoting::Error::Timeout {
                        kind: "Heartbeat",
                        peer: format!("broker {name}"),
                        after: patience,
                    }))
                })
        }
    });
    // The brokers' expiry clocks started no earlier than this.
    let sent = std::time::Instant::now();
    let answers = join_all(beats).await;
    let mut answered = HashSet::new();
    let mut wanted = HashSet::new();
    // Brokers that had expired this member (it was paused, or cut off from
    // them, past the expiry): others may have read its queues past where
    // its workers stand.
    let mut lapsed = HashSet::new();
    for answer in answers {
        match answer {
            Ok((broker, assigned, expired)) => {
                if expired && !shared.settings.broadcast {
                    lapsed.insert(broker.clone());
                }
                answered.insert(broker.clone());
                wanted.extend(assigned.into_iter().map(|q| QueueId {
                    broker_name: broker.clone(),
                    topic: q.topic,
                    queue: q.queue,
                }));
            }
            Err(e) => {
                tracing::warn!(group = %shared.group, error = %crate::error::chain(&e), "heartbeat failed")
            }
        }
    }
    let mut workers = lock(&shared.workers);
    for (q, w) in workers.iter() {
        if lapsed.contains(&q.broker_name) && !w.expired.is_cancelled() {
            // Its position and its commits would move the group's offset
            // back; the queue, if it is still this member's, gets a new
            // reader from the committed offset.
            tracing::warn!(group = %shared.group, broker = %q.broker_name, topic = %q.topic, queue = q.queue,
                "the broker had expired this member (no heartbeat within its consumer expiry): another member may have read the queue meanwhile; giving it up without committing");
            w.expired.cancel();
            continue;
        }
        // Queues of a broker that answered and no longer assigns them are
        // given up. A broker that does not answer (restarting, say) keeps
        // its queues here: their readers retry and commit once it is back.
        let dropped = answered.contains(&q.broker_name) && !wanted.contains(q);
        if dropped && !w.release.is_cancelled() {
            tracing::info!(group = %shared.group, broker = %q.broker_name, topic = %q.topic, queue = q.queue, "giving the queue up");
            w.release.cancel();
        }
    }
    // Only now, the lapsed workers stopped: the answer lifts the fence
    // (see `worker::fence_at`), which would let them start and commit.
    for broker in &answered {
        shared.answered.insert(broker.clone(), sent);
    }
    // A queue given up while the heartbeats were out may be in an answer
    // already handed to another member: ask again before taking any.
    if shared.released.load(Ordering::Acquire) != released {
        shared.rebalance.notify_one();
        return;
    }
    if shared.shutting_down.load(Ordering::Acquire) {
        return;
    }
    for q in wanted {
        if workers.contains_key(&q) {
            continue;
        }
        tracing::info!(group = %shared.group, broker = %q.broker_name, topic = %q.topic, queue = q.queue, "queue assigned");
        let (release, expired) = (CancellationToken::new(), CancellationToken::new());
        workers.insert(
            q.clone(),
            WorkerHandle {
                release: release.clone(),
                expired: expired.clone(),
            },
        );
        shared
            .tracker
            .spawn(worker::run(shared.clone(), Arc::new(q), release, expired));
    }
}

/// Gives every queue up cleanly, then leaves the group on every broker.
/// Heartbeats go on while the queues drain, so the brokers keep them with
/// this member until they are committed.
pub(crate) async fn shutdown<H: MessageHandler>(shared: &Shared<H>) -> crate::Result<()> {
    {
        // Under the lock a round checks for shutdown before starting workers.
        let workers = lock(&shared.workers);
        shared.shutting_down.store(true, Ordering::Release);
        for w in workers.values() {
            w.release.cancel();
        }
    }
    while !lock(&shared.workers).is_empty() && !shared.cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.stop_rebalance.cancel();
    shared.tracker.close();
    shared.tracker.wait().await;
    let brokers: Vec<String> = shared.brokers.names();
    join_all(brokers.iter().map(|name| async move {
        if let Ok(target) = shared.connect(name).await {
            let _ = target
                .conn
                .call(LeaveGroup {
                    group: shared.group.clone(),
                    client_id: shared.client_id.clone(),
                })
                .await;
        }
    }))
    .await;
    shared.cancel.cancel();
    shared.pool.close();
    match shared.commit_failures.load(Ordering::Relaxed) {
        0 => Ok(()),
        queues => Err(Error::CommitFailed { queues }),
    }
}
