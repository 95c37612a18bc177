//! How a send picks its queue among a topic's writable queues: round robin
//! (skipping the broker that just failed), by a stable hash of a shard key,
//! or one named queue. Pure functions, so they are tested here.

use txmq_protocol::fnv1a;

use crate::route::{MessageQueue, RouteInfo};

/// Where a send goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// The next queue in turn over all writable queues of all brokers.
    RoundRobin,
    /// The queue picked by a shard key's hash ([`shard_hash`]).
    Hash(u64),
    /// One given queue.
    Queue { broker: &'a str, queue: u32 },
}

impl Target<'_> {
    /// Picks a writable queue of `route`. `turn` is the producer's send
    /// counter, `avoid` the broker that failed the previous attempt. A
    /// shard key's queue is never picked on a provisional route.
    pub(crate) fn select<'q>(
        &self,
        route: &'q RouteInfo,
        turn: u64,
        avoid: Option<&str>,
    ) -> Option<&'q MessageQueue> {
        let queues = &route.writable;
        match *self {
            Target::RoundRobin => select_round_robin(queues, turn, avoid).map(|i| &queues[i]),
            Target::Hash(_) if route.provisional => None,
            Target::Hash(hash) => select_by_hash(queues, hash).map(|i| &queues[i]),
            Target::Queue { broker, queue } => queues
                .iter()
                .find(|q| q.broker_name == broker && q.queue == queue),
        }
    }

    /// True when a retry goes to a queue chosen afresh (and may switch broker).
    pub(crate) fn may_switch_broker(&self) -> bool {
        matches!(self, Target::RoundRobin)
    }
}

/// A random start for a producer's round robin, so that short-lived
/// producers (one message per process, say) do not all send to the first
/// queue.
pub(crate) fn random_start() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() >> 1
}

/// The index of the queue for send number `turn`: queues in turn, but
/// the first one after that position not on `avoid` when there is one.
pub fn select_round_robin(
    queues: &[MessageQueue],
    turn: u64,
    avoid: Option<&str>,
) -> Option<usize> {
    round_robin(queues.len(), turn, |i| {
        Some(queues[i].broker_name.as_str()) == avoid
    })
}

/// The index of the item for turn `turn` among `n` items taken in turn,
/// moved on to the next one for which `avoided` is false when there is one.
pub(crate) fn round_robin(n: usize, turn: u64, avoided: impl Fn(usize) -> bool) -> Option<usize> {
    let n = n as u64;
    if n == 0 {
        return None;
    }
    let first = turn % n;
    let preferred = (0..n)
        .map(|i| ((first + i) % n) as usize)
        .find(|&i| !avoided(i));
    Some(preferred.unwrap_or(first as usize))
}

/// The index of the queue for a shard key's hash: `hash % queues.len()`.
/// Stable as long as the topic's writable queues stay the same.
pub fn select_by_hash(queues: &[MessageQueue], hash: u64) -> Option<usize> {
    let n = queues.len() as u64;
    (n > 0).then(|| (hash % n) as usize)
}

/// The stable 64-bit hash of a shard key (FNV-1a): the same key maps to the
/// same value in every process, on every machine and in every release.
pub fn shard_hash(key: &str) -> u64 {
    fnv1a(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::test_queues as queues;

    #[test]
    fn round_robin_visits_every_queue_of_every_broker_evenly() {
        let qs = queues(&[("a", 2), ("b", 3)]);
        let mut hits = vec![0; qs.len()];
        for turn in 0..50 {
            let i = select_round_robin(&qs, turn, None);
            assert_eq!(i, Some((turn % 5) as usize));
            hits[(turn % 5) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| h == 10));
        assert_eq!(select_round_robin(&[], 3, None), None);
    }

    #[test]
    fn round_robin_skips_the_failed_broker_when_another_exists() {
        let qs = queues(&[("a", 2), ("b", 1)]);
        // Turn 0 would be a/0; avoiding a, the next queue in turn is b/0.
        assert_eq!(select_round_robin(&qs, 0, Some("a")), Some(2));
        assert_eq!(select_round_robin(&qs, 2, Some("b")), Some(0));
        // Only one broker: it is used anyway.
        let only_a = queues(&[("a", 2)]);
        assert_eq!(select_round_robin(&only_a, 1, Some("a")), Some(1));
    }

    #[test]
    fn shard_hash_is_stable_across_releases() {
        // Fixed values: changing the hash would reorder existing users' keys.
        assert_eq!(shard_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(shard_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(shard_hash("order-42"), shard_hash("order-42"));
        assert_ne!(shard_hash("order-42"), shard_hash("order-43"));
    }

    #[test]
    fn a_key_always_maps_to_the_same_queue() {
        let qs = queues(&[("a", 4), ("b", 4)]);
        for key in ["k1", "k2", "customer-17", ""] {
            let first = select_by_hash(&qs, shard_hash(key));
            for _ in 0..10 {
                assert_eq!(select_by_hash(&qs, shard_hash(key)), first);
            }
        }
        // Keys spread over the queues.
        let used: std::collections::HashSet<_> = (0..100)
            .filter_map(|i| select_by_hash(&qs, shard_hash(&format!("key-{i}"))))
            .collect();
        assert_eq!(used.len(), qs.len());
        assert_eq!(select_by_hash(&[], 1), None);
    }

    /// A route whose writable queues are `spec`'s.
    fn route(spec: &[(&str, u32)], provisional: bool) -> RouteInfo {
        RouteInfo {
            route: txmq_protocol::TopicRoute {
                topic: "t".into(),
                brokers: Vec::new(),
            },
            writable: queues(spec),
            readable: Vec::new(),
            generation: 1,
            provisional,
        }
    }

    #[test]
    fn a_named_queue_is_found_or_not() {
        let r = route(&[("a", 2), ("b", 2)], false);
        let t = Target::Queue {
            broker: "b",
            queue: 1,
        };
        assert_eq!(t.select(&r, 0, None), Some(&r.writable[3]));
        let missing = Target::Queue {
            broker: "c",
            queue: 0,
        };
        assert_eq!(missing.select(&r, 0, None), None);
        assert!(!t.may_switch_broker());
        assert!(Target::RoundRobin.may_switch_broker());
    }

    #[test]
    fn a_shard_keys_queue_is_never_picked_on_a_provisional_route() {
        // One queue per broker while the nameservers know no route: the
        // key's queue among the topic's real queues is not there.
        let provisional = route(&[("a", 1), ("b", 1)], true);
        assert_eq!(
            Target::Hash(shard_hash("k")).select(&provisional, 0, None),
            None
        );
        assert!(Target::RoundRobin.select(&provisional, 0, None).is_some());
        let real = route(&[("a", 4), ("b", 4)], false);
        assert!(Target::Hash(shard_hash("k"))
            .select(&real, 0, None)
            .is_some());
    }
}
