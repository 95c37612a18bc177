//! Where a transaction's half messages go: one broker for all of them (the
//! broker commits them together), and on it one queue per topic. Pure
//! functions, so they are tested here.

use std::collections::BTreeSet;

use crate::producer::{round_robin, select_by_hash, select_round_robin};
use crate::route::MessageQueue;

/// How the queue of a one-topic transaction is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// The next queue in turn over all writable queues of all brokers (for
    /// several topics: the next broker serving all of them, in turn).
    RoundRobin,
    /// The queue a shard key's hash maps to (one topic only).
    Hash(u64),
}

/// Picks one queue per topic, all on one broker. `topics` lists each
/// distinct topic with its writable queues (ordered by broker then queue,
/// as routes list them); the answer is in the same order. `turn` is the
/// producer's counter, `avoid` a broker that just failed (used only if no
/// other fits). `None` when no broker has a writable queue of every topic.
pub(crate) fn place(
    topics: &[(&str, &[MessageQueue])],
    placement: Placement,
    turn: u64,
    avoid: Option<&str>,
) -> Option<Vec<MessageQueue>> {
    match topics {
        [] => None,
        [(_, queues)] => {
            let i = match placement {
                Placement::RoundRobin => select_round_robin(queues, turn, avoid)?,
                Placement::Hash(hash) => select_by_hash(queues, hash)?,
            };
            Some(vec![queues[i].clone()])
        }
        _ => {
            let brokers = common_brokers(topics);
            let pick = round_robin(brokers.len(), turn, |i| Some(brokers[i]) == avoid)?;
            let broker = brokers[pick];
            let n = brokers.len() as u64;
            topics
                .iter()
                .map(|(_, queues)| {
                    let on_broker: Vec<&MessageQueue> =
                        queues.iter().filter(|q| q.broker_name == broker).collect();
                    // Vary the queue with the turns that chose this broker again.
                    let len = on_broker.len() as u64;
                    (len > 0).then(|| on_broker[((turn / n) % len) as usize].clone())
                })
                .collect()
        }
    }
}

/// Names of the brokers with a writable queue of every topic, sorted.
fn common_brokers<'a>(topics: &[(&str, &'a [MessageQueue])]) -> Vec<&'a str> {
    let mut sets = topics.iter().map(|(_, queues)| {
        queues
            .iter()
            .map(|q| q.broker_name.as_str())
            .collect::<BTreeSet<&str>>()
    });
    let Some(mut common) = sets.next() else {
        return Vec::new();
    };
    for set in sets {
        common.retain(|b| set.contains(b));
    }
    common.into_iter().collect()
}

/// The distinct topics of `topics_in_order`, first occurrence first.
pub(crate) fn distinct<'a>(topics_in_order: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = BTreeSet::new();
    topics_in_order.filter(|t| seen.insert(*t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::test_queues as queues;

    fn names(placed: &Option<Vec<MessageQueue>>) -> Vec<(String, u32)> {
        placed
            .iter()
            .flatten()
            .map(|q| (q.broker_name.clone(), q.queue))
            .collect()
    }

    #[test]
    fn one_topic_goes_round_robin_or_by_hash_like_a_plain_send() {
        let qs = queues(&[("a", 2), ("b", 1)]);
        let topics = [("t", &qs[..])];
        for turn in 0..6 {
            let placed = place(&topics, Placement::RoundRobin, turn, None);
            assert_eq!(
                names(&placed),
                [(
                    qs[(turn % 3) as usize].broker_name.clone(),
                    qs[(turn % 3) as usize].queue
                )]
            );
        }
        let avoided = place(&topics, Placement::RoundRobin, 0, Some("a"));
        assert_eq!(names(&avoided), [("b".to_string(), 0)]);
        let by_key = place(&topics, Placement::Hash(4), 0, None);
        assert_eq!(names(&by_key), [("a".to_string(), 1)]);
        assert_eq!(
            place(&[("t", &[][..])], Placement::RoundRobin, 0, None),
            None
        );
        assert_eq!(place(&[], Placement::RoundRobin, 0, None), None);
    }

    #[test]
    fn several_topics_share_one_broker_that_serves_them_all() {
        let orders = queues(&[("a", 2), ("b", 2), ("c", 1)]);
        let audit = queues(&[("b", 3), ("c", 1), ("d", 1)]);
        let topics = [("orders", &orders[..]), ("audit", &audit[..])];
        let mut used = BTreeSet::new();
        for turn in 0..8 {
            let placed = place(&topics, Placement::RoundRobin, turn, None);
            let Some(placed) = placed else {
                panic!("b and c serve both topics")
            };
            assert_eq!(placed.len(), 2);
            assert_eq!(placed[0].broker_name, placed[1].broker_name);
            assert!(["b", "c"].contains(&placed[0].broker_name.as_str()));
            used.insert((
                placed[0].broker_name.clone(),
                placed[0].queue,
                placed[1].queue,
            ));
        }
        // Both brokers, and more than one queue of b, get used.
        assert!(used.iter().any(|u| u.0 == "c"));
        assert!(used.iter().filter(|u| u.0 == "b").count() > 1);

        // A failed broker is avoided while another fits.
        for turn in 0..4 {
            let placed = place(&topics, Placement::RoundRobin, turn, Some("b"));
            assert_eq!(names(&placed).first().map(|n| n.0.as_str()), Some("c"));
        }

        let lonely = queues(&[("z", 1)]);
        let none = [("orders", &orders[..]), ("lonely", &lonely[..])];
        assert_eq!(place(&none, Placement::RoundRobin, 0, None), None);
    }

    #[test]
    fn distinct_topics_keep_their_first_order() {
        let topics = ["b", "a", "b", "c", "a"];
        assert_eq!(distinct(topics.into_iter()), ["b", "a", "c"]);
    }
}
