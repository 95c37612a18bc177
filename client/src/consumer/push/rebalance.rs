//! The push consumer's membership: heartbeat every broker of the
//! subscribed topics, start a worker for each queue a broker assigns, and
//! make workers give up queues it no longer assigns.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use txmq_protocol::{Heartbeat, LeaveGroup, QueueRef, Subscription};

use super::{lock, worker, MessageHandler, QueueId, Shared, WorkerHandle};
use crate::Error;

/// Rebalances every interval, or at once when woken.
pub(crate) async fn run<H: MessageHandler>(shared: Arc<Shared<H>>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(shared.settings.rebalance_interval) => {}
            _ = shared.rebalance.notified() => {}
            _ = shared.stop_rebalance.cancelled() => return,
            _ = shared.cancel.cancelled() => return,
        }
        round(&shared).await;
    }
}

/// The brokers serving any subscribed topic, by name.
async fn brokers<H>(shared: &Shared<H>) -> BTreeMap<String, String> {
    let mut brokers = BTreeMap::new();
    for sub in &shared.subs {
        match shared.routes.get(&sub.topic).await {
            Ok(info) => {
                for b in &info.route.brokers {
                    brokers.insert(b.broker_name.clone(), b.addr.clone());
                }
            }
            Err(Error::NoRoute { .. }) => {
                tracing::debug!(topic = %sub.topic, "no route for a subscribed topic yet");
            }
            Err(e) => tracing::warn!(topic = %sub.topic, error = %e, "cannot get a route"),
        }
    }
    brokers
}

/// One heartbeat round: learn the assignment of every broker, start and
/// stop workers to match.
pub(crate) async fn round<H: MessageHandler>(shared: &Arc<Shared<H>>) {
    let brokers = brokers(shared).await;
    for (name, addr) in &brokers {
        shared.brokers.insert(name.clone(), addr.clone());
    }
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
    let beats = brokers.keys().map(|name| {
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
        async move {
            let (addr, conn) = shared.connect(name).await?;
            let ok = conn
                .call(request)
                .await
                .map_err(|e| Error::at_broker(name, &addr, e))?;
            Ok::<_, Error>((name.clone(), ok.assigned))
        }
    });
    let answers = join_all(beats).await;
    let mut answered = HashSet::new();
    let mut wanted = HashSet::new();
    for answer in answers {
        match answer {
            Ok((broker, assigned)) => {
                answered.insert(broker.clone());
                wanted.extend(assigned.into_iter().map(|q| QueueId {
                    broker_name: broker.clone(),
                    topic: q.topic,
                    queue: q.queue,
                }));
            }
            Err(e) => tracing::warn!(group = %shared.group, error = %e, "heartbeat failed"),
        }
    }
    let mut workers = lock(&shared.workers);
    for (q, w) in workers.iter() {
        // Queues of a broker that answered and no longer assigns them are
        // given up. A broker that does not answer (restarting, say) keeps
        // its queues here: their readers retry and commit once it is back.
        let dropped = answered.contains(&q.broker_name) && !wanted.contains(q);
        if dropped && !w.release.is_cancelled() {
            tracing::info!(group = %shared.group, broker = %q.broker_name, topic = %q.topic, queue = q.queue, "giving the queue up");
            w.release.cancel();
        }
    }
    // A queue given up while the heartbeats were out may be in an answer
    // already handed to another member: ask again before taking any.
    if shared.released.load(Ordering::Acquire) != released {
        shared.rebalance.notify_one();
        return;
    }
    if shared.stop_rebalance.is_cancelled() {
        return;
    }
    for q in wanted {
        if workers.contains_key(&q) {
            continue;
        }
        tracing::info!(group = %shared.group, broker = %q.broker_name, topic = %q.topic, queue = q.queue, "queue assigned");
        let release = CancellationToken::new();
        workers.insert(
            q.clone(),
            WorkerHandle {
                release: release.clone(),
            },
        );
        shared
            .tracker
            .spawn(worker::run(shared.clone(), Arc::new(q), release));
    }
}

/// Gives every queue up cleanly, then leaves the group on every broker.
pub(crate) async fn shutdown<H: MessageHandler>(shared: &Shared<H>) {
    {
        // Under the lock a round checks for shutdown before starting workers.
        let workers = lock(&shared.workers);
        shared.stop_rebalance.cancel();
        for w in workers.values() {
            w.release.cancel();
        }
    }
    shared.tracker.close();
    shared.tracker.wait().await;
    let brokers: Vec<String> = shared.brokers.iter().map(|e| e.key().clone()).collect();
    join_all(brokers.iter().map(|name| async move {
        if let Ok((_, conn)) = shared.connect(name).await {
            let _ = conn
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
}
