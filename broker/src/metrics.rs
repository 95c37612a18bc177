//! The broker's Prometheus metrics (`--metrics-listen`, served by
//! [`txmq_remoting::metrics`]).
//!
//! Two kinds of series:
//! - counters and histograms of events (messages in and out per topic,
//!   request latencies, transaction steps and check-back outcomes per
//!   producer group, dead letters per consumer group, fdatasync latency),
//!   incremented where the event happens. The labelled handles are cached
//!   per topic or group in a `DashMap` looked up by `&str`, so counting
//!   allocates nothing once a name was seen, and a send or pull counts once
//!   per request, not per message;
//! - gauges of state (pending and parked transactions and the oldest
//!   pending age, consumer lag, store size, connections, replicas), computed
//!   only when scraped by [`StateCollector`] from the serving incarnation.
//!
//! One [`Metrics`] lives as long as the [`crate::Broker`]: under a
//! controller the broker's incarnations come and go, and each one points
//! the collector at itself ([`Metrics::serve_state_of`]).

use std::sync::{Arc, RwLock, Weak};
use std::time::Instant;

use dashmap::DashMap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use txmq_protocol::{ErrorCode, TxResolution};
use txmq_remoting::metrics::LabelText;

use crate::BrokerInner;

/// One label: `[(name, value)]`.
type Label1 = [(&'static str, LabelText<String>); 1];
/// Two labels.
type Label2 = [(&'static str, LabelText<String>); 2];

/// Counters of one topic.
pub(crate) struct TopicCounters {
    messages_in: Counter,
    bytes_in: Counter,
    messages_out: Counter,
    bytes_out: Counter,
}

/// Counters of one producer group's transactions.
pub(crate) struct TxGroupCounters {
    prepared: Counter,
    committed: Counter,
    rolled_back: Counter,
    checked: Counter,
    parked: Counter,
    answer_commit: Counter,
    answer_rollback: Counter,
    answer_unknown: Counter,
    check_timeouts: Counter,
    check_failures: Counter,
}

/// How a check-back went, for [`Metrics::check_back`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckOutcome {
    /// The producer answered.
    Answered(TxResolution),
    /// Sent, and no answer within `--transaction-check-timeout`.
    TimedOut,
    /// Not sent, or it failed otherwise (no live producer of the group,
    /// a send error, the connection closed, the producer's error).
    Failed,
}

struct Families {
    messages_in: Family<Label1, Counter>,
    bytes_in: Family<Label1, Counter>,
    messages_out: Family<Label1, Counter>,
    bytes_out: Family<Label1, Counter>,
    prepared: Family<Label1, Counter>,
    committed: Family<Label1, Counter>,
    rolled_back: Family<Label1, Counter>,
    checked: Family<Label1, Counter>,
    parked: Family<Label1, Counter>,
    answers: Family<Label2, Counter>,
    check_timeouts: Family<Label1, Counter>,
    check_failures: Family<Label1, Counter>,
    dead_letters: Family<Label1, Counter>,
    stamps_refused: Family<Label1, Counter>,
}

/// The broker's metrics: its registry and the cached handles.
pub(crate) struct Metrics {
    registry: Arc<Registry>,
    families: Families,
    topics: DashMap<Box<str>, TopicCounters, foldhash::fast::RandomState>,
    tx_groups: DashMap<Box<str>, TxGroupCounters>,
    dead_letters: DashMap<Box<str>, Counter>,
    /// Broker-side handling time of sends, pulls (long-poll waits left
    /// out) and ends of transactions.
    pub(crate) send_latency: Histogram,
    pub(crate) pull_latency: Histogram,
    pub(crate) end_latency: Histogram,
    /// Each flusher round's fdatasync calls; shared with the store.
    pub(crate) fdatasync_latency: Histogram,
    /// The incarnation whose state the gauges show.
    serving: Arc<RwLock<Weak<BrokerInner>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Latency buckets from 50 µs to about 1.6 s (doubling).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 16)
}

impl Metrics {
    /// A registry with every series the broker exports.
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::default();
        let families = Families {
            messages_in: Family::default(),
            bytes_in: Family::default(),
            messages_out: Family::default(),
            bytes_out: Family::default(),
            prepared: Family::default(),
            committed: Family::default(),
            rolled_back: Family::default(),
            checked: Family::default(),
            parked: Family::default(),
            answers: Family::default(),
            check_timeouts: Family::default(),
            check_failures: Family::default(),
            dead_letters: Family::default(),
            stamps_refused: Family::default(),
        };
        let f = &families;
        // Counter names go without `_total`: the encoder adds it.
        let counters: [(&str, &str, &Family<Label1, Counter>); 13] = [
            ("txmq_messages_in", "Messages stored for a topic by sends and committed transactions", &f.messages_in),
            ("txmq_bytes_in", "Body bytes of the messages counted by txmq_messages_in_total", &f.bytes_in),
            ("txmq_messages_out", "Messages of a topic handed to consumers by pulls", &f.messages_out),
            ("txmq_bytes_out", "Body bytes of the messages counted by txmq_messages_out_total", &f.bytes_out),
            ("txmq_transactions_prepared", "Transactions prepared (half messages stored), per producer group", &f.prepared),
            ("txmq_transactions_committed", "Transactions committed (by the producer, a check-back answer or an operator)", &f.committed),
            ("txmq_transactions_rolled_back", "Transactions rolled back (by the producer, a check-back answer, an operator or an offset conflict)", &f.rolled_back),
            ("txmq_transactions_checked", "Check-backs sent to a producer of the group", &f.checked),
            ("txmq_transactions_parked", "Transactions parked for an operator after the maximum number of checks", &f.parked),
            ("txmq_check_back_timeouts", "Check-backs sent and not answered within --transaction-check-timeout", &f.check_timeouts),
            ("txmq_check_back_failures", "Check-backs that failed: no live producer of the group, a send error, a closed connection, the producer's error", &f.check_failures),
            ("txmq_dead_letters", "Messages moved to a consumer group's dead-letter topic", &f.dead_letters),
            ("txmq_producer_stamps_refused", "Idempotent sends and prepares refused for their producer stamp, by code (OUT_OF_ORDER_SEQUENCE: a sequence arrived before an earlier one; DUPLICATE_SEQUENCE, UNKNOWN_PRODUCER_ID, PRODUCER_FENCED); nothing was stored", &f.stamps_refused),
        ];
        for (name, help, family) in counters {
            r.register(name, help, family.clone());
        }
        r.register(
            "txmq_check_back_answers",
            "Check-back answers by kind (answer = commit, rollback, unknown)",
            f.answers.clone(),
        );
        let send_latency = Histogram::new(latency_buckets());
        let pull_latency = Histogram::new(latency_buckets());
        let end_latency = Histogram::new(latency_buckets());
        let fdatasync_latency = Histogram::new(latency_buckets());
        r.register(
            "txmq_send_latency_seconds",
            "Broker-side handling time of a send request (store write, and the fdatasync under sync flush)",
            send_latency.clone(),
        );
        r.register(
            "txmq_pull_latency_seconds",
            "Broker-side handling time of a pull request, long-poll waiting left out",
            pull_latency.clone(),
        );
        r.register(
            "txmq_end_transaction_latency_seconds",
            "Broker-side handling time of an end-transaction request (commit or rollback)",
            end_latency.clone(),
        );
        r.register(
            "txmq_fdatasync_latency_seconds",
            "Time of one flush round's fdatasync calls on the commit log",
            fdatasync_latency.clone(),
        );
        let serving = Arc::new(RwLock::new(Weak::new()));
        r.register_collector(Box::new(StateCollector {
            serving: serving.clone(),
        }));
        Metrics {
            registry: Arc::new(r),
            families,
            topics: DashMap::default(),
            tx_groups: DashMap::new(),
            dead_letters: DashMap::new(),
            send_latency,
            pull_latency,
            end_latency,
            fdatasync_latency,
            serving,
        }
    }

    /// The registry to serve.
    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The gauges show `b`'s state from now on.
    pub(crate) fn serve_state_of(&self, b: &Arc<BrokerInner>) {
        *self.serving.write().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(b);
    }

    /// Runs `f` on the topic's counters (created on first use; later
    /// uses look them up by `&str` and allocate nothing).
    fn with_topic(&self, topic: &str, count: impl FnOnce(&TopicCounters)) {
        if let Some(t) = self.topics.get(topic) {
            return count(&t);
        }
        let f = &self.families;
        let l: Label1 = [("topic", LabelText(topic.to_string()))];
        let t = TopicCounters {
            messages_in: f.messages_in.get_or_create(&l).clone(),
            bytes_in: f.bytes_in.get_or_create(&l).clone(),
            messages_out: f.messages_out.get_or_create(&l).clone(),
            bytes_out: f.bytes_out.get_or_create(&l).clone(),
        };
        count(&t);
        self.topics.insert(topic.into(), t);
    }

    /// Lets go of a deleted topic's counters and their series: a topic
    /// made again under its name counts from zero (a counter reset to
    /// Prometheus), and names that come and go do not pile up here.
    pub(crate) fn forget_topic(&self, topic: &str) {
        self.topics.remove(topic);
        let f = &self.families;
        let l: Label1 = [("topic", LabelText(topic.to_string()))];
        for family in [&f.messages_in, &f.bytes_in, &f.messages_out, &f.bytes_out] {
            family.remove(&l);
        }
    }

    /// As [`Metrics::with_topic`], for a producer group.
    fn with_tx_group(&self, group: &str, count: impl FnOnce(&TxGroupCounters)) {
        if let Some(g) = self.tx_groups.get(group) {
            return count(&g);
        }
        let f = &self.families;
        let l: Label1 = [("group", LabelText(group.to_string()))];
        let answer = |a: &str| {
            f.answers
                .get_or_create(&[
                    ("group", LabelText(group.to_string())),
                    ("answer", LabelText(a.to_string())),
                ])
                .clone()
        };
        let g = TxGroupCounters {
            prepared: f.prepared.get_or_create(&l).clone(),
            committed: f.committed.get_or_create(&l).clone(),
            rolled_back: f.rolled_back.get_or_create(&l).clone(),
            checked: f.checked.get_or_create(&l).clone(),
            parked: f.parked.get_or_create(&l).clone(),
            answer_commit: answer("commit"),
            answer_rollback: answer("rollback"),
            answer_unknown: answer("unknown"),
            check_timeouts: f.check_timeouts.get_or_create(&l).clone(),
            check_failures: f.check_failures.get_or_create(&l).clone(),
        };
        count(&g);
        self.tx_groups.insert(group.into(), g);
    }

    /// `messages` of `bytes` body bytes stored for `topic`.
    pub(crate) fn messages_in(&self, topic: &str, messages: usize, bytes: usize) {
        self.with_topic(topic, |t| {
            t.messages_in.inc_by(messages as u64);
            t.bytes_in.inc_by(bytes as u64);
        });
    }

    /// `messages` of `bytes` body bytes of `topic` handed to a consumer.
    pub(crate) fn messages_out(&self, topic: &str, messages: usize, bytes: usize) {
        if messages == 0 {
            return;
        }
        self.with_topic(topic, |t| {
            t.messages_out.inc_by(messages as u64);
            t.bytes_out.inc_by(bytes as u64);
        });
    }

    /// A transaction of `group` was prepared.
    pub(crate) fn prepared(&self, group: &str) {
        self.with_tx_group(group, |g| {
            g.prepared.inc();
        });
    }

    /// A transaction of `group` ended.
    pub(crate) fn ended(&self, group: &str, committed: bool) {
        self.with_tx_group(group, |g| {
            if committed {
                g.committed.inc();
            } else {
                g.rolled_back.inc();
            }
        });
    }

    /// A transaction of `group` was parked.
    pub(crate) fn parked(&self, group: &str) {
        self.with_tx_group(group, |g| {
            g.parked.inc();
        });
    }

    /// A check-back of `group` was sent (`sent`) and came out as `outcome`.
    pub(crate) fn check_back(&self, group: &str, sent: bool, outcome: CheckOutcome) {
        self.with_tx_group(group, |g| {
            if sent {
                g.checked.inc();
            }
            match outcome {
                CheckOutcome::Answered(TxResolution::Commit) => g.answer_commit.inc(),
                CheckOutcome::Answered(TxResolution::Rollback) => g.answer_rollback.inc(),
                CheckOutcome::Answered(TxResolution::Unknown) => g.answer_unknown.inc(),
                CheckOutcome::TimedOut => g.check_timeouts.inc(),
                CheckOutcome::Failed => g.check_failures.inc(),
            };
        });
    }

    /// A message of consumer group `group` went to its dead-letter topic.
    pub(crate) fn dead_letter(&self, group: &str) {
        if let Some(c) = self.dead_letters.get(group) {
            c.inc();
            return;
        }
        let c = self
            .families
            .dead_letters
            .get_or_create(&[("group", LabelText(group.to_string()))])
            .clone();
        c.inc();
        self.dead_letters.insert(group.into(), c);
    }

    /// A stamped send or prepare was answered with `code`: counted when it
    /// is a refusal of its producer stamp (rare: no handle is cached).
    pub(crate) fn stamp_refused(&self, code: ErrorCode) {
        if matches!(
            code,
            ErrorCode::OutOfOrderSequence
                | ErrorCode::DuplicateSequence
                | ErrorCode::UnknownProducerId
                | ErrorCode::ProducerFenced
        ) {
            self.families
                .stamps_refused
                .get_or_create(&[("code", LabelText(code.name().to_string()))])
                .inc();
        }
    }

    /// Per topic seen since start: (topic, messages in, bytes in, messages
    /// out, bytes out), sorted by topic. Reads the counters above; counts
    /// nothing itself.
    pub(crate) fn traffic(&self) -> Vec<(String, u64, u64, u64, u64)> {
        let mut out: Vec<_> = self
            .topics
            .iter()
            .map(|t| {
                (
                    t.key().to_string(),
                    t.messages_in.get(),
                    t.bytes_in.get(),
                    t.messages_out.get(),
                    t.bytes_out.get(),
                )
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// (topic, messages, body bytes) of a transaction's messages, in order of
/// first appearance (one allocation per transaction, not per message).
pub(crate) fn by_topic(messages: &[(u32, txmq_protocol::Message)]) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    for (_, m) in messages {
        match out.iter_mut().find(|(t, _, _)| *t == m.topic) {
            Some(e) => {
                e.1 += 1;
                e.2 += m.body.len();
            }
            None => out.push((m.topic.clone(), 1, m.body.len())),
        }
    }
    out
}

/// Observes the time since it was made into a histogram when dropped: one
/// line at the top of a handler times every way out of it.
pub(crate) struct Timer<'a> {
    histogram: &'a Histogram,
    /// `None` while paused: dropped then, it observes nothing.
    started: Option<Instant>,
}

impl<'a> Timer<'a> {
    pub(crate) fn start(histogram: &'a Histogram) -> Timer<'a> {
        Timer {
            histogram,
            started: Some(Instant::now()),
        }
    }

    /// Stops timing while a long poll waits: a pull dropped then (its
    /// consumer left) is not a pull that took its whole wait.
    pub(crate) fn pause(&mut self) {
        self.started = None;
    }

    /// Starts over (a pull that waited counts from its wake-up).
    pub(crate) fn restart(&mut self) {
        self.started = Some(Instant::now());
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            self.histogram.observe(started.elapsed().as_secs_f64());
        }
    }
}

/// The gauges (and counters kept elsewhere), read from the serving
/// incarnation on each scrape.
#[derive(Debug)]
struct StateCollector {
    serving: Arc<RwLock<Weak<BrokerInner>>>,
}

fn gauge<S: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (S, f64)>,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0.0f64);
    let mut m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn plain_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(b) = self
            .serving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
        else {
            return Ok(());
        };
        let now = txmq_protocol::now_millis();
        let groups = b.transactions.pending_by_group();
        gauge(
            &mut e,
            "txmq_transactions_pending",
            "Transactions prepared and not yet committed, rolled back or parked, per producer group",
            groups.iter().map(|g| ([("group", LabelText(&*g.group))], g.pending as f64)),
        )?;
        gauge(
            &mut e,
            "txmq_transactions_parked_now",
            "Transactions parked now, waiting for an operator (txmq tx resolve), per producer group",
            groups.iter().map(|g| ([("group", LabelText(&*g.group))], g.parked as f64)),
        )?;
        gauge(
            &mut e,
            "txmq_transaction_oldest_pending_age_seconds",
            "Age of the group's oldest pending (not parked) transaction; 0 when none",
            groups.iter().map(|g| {
                let age = g.oldest_prepared_at.map_or(0, |at| now.saturating_sub(at));
                ([("group", LabelText(&*g.group))], age as f64 / 1000.0)
            }),
        )?;
        let lag = consumer_lag(&b);
        gauge(
            &mut e,
            "txmq_consumer_lag",
            "Messages not yet consumed: over the topic's queues, max offset minus the group's committed offset",
            lag.iter()
                .map(|(g, t, n)| ([("group", LabelText(g.as_str())), ("topic", LabelText(t.as_str()))], *n as f64)),
        )?;
        let (segments, bytes) = b.store.disk_usage();
        plain_gauge(
            &mut e,
            "txmq_store_size_bytes",
            "Bytes of records held by the commit log",
            bytes as f64,
        )?;
        plain_gauge(
            &mut e,
            "txmq_store_segments",
            "Commit-log segment files",
            segments as f64,
        )?;
        if let Some(free) = b.store.disk_free() {
            plain_gauge(
                &mut e,
                "txmq_store_disk_free_bytes",
                "Bytes free on the file system holding the data dir; new messages are refused below --disk-free-limit",
                free as f64,
            )?;
        }
        let (_, _, _, fdatasyncs) = b.store.stats();
        let c = ConstCounter::new(fdatasyncs);
        c.encode(e.encode_descriptor(
            "txmq_fdatasync",
            "Flush rounds that fdatasynced the commit log, since the store opened",
            None,
            c.metric_type(),
        )?)?;
        let c = ConstCounter::new(b.store.written_back());
        c.encode(e.encode_descriptor(
            "txmq_store_writeback_bytes",
            "Commit-log bytes the flusher handed to the kernel to start writing to disk between fdatasyncs (async flush), since the store opened",
            None,
            c.metric_type(),
        )?)?;
        plain_gauge(
            &mut e,
            "txmq_connections",
            "Client, producer and replica connections open now (greeted)",
            b.connections.load(std::sync::atomic::Ordering::Acquire) as f64,
        )?;
        plain_gauge(
            &mut e,
            "txmq_grpc_connections",
            "Connections open now on the RocketMQ 5 gRPC port (--grpc-listen)",
            b.grpc_connections
                .load(std::sync::atomic::Ordering::Acquire) as f64,
        )?;
        let (in_flight, _) = b.store.pop_stats();
        plain_gauge(
            &mut e,
            "txmq_pop_in_flight",
            "Messages received by pop (simple) consumers and not yet acknowledged, over all groups",
            in_flight as f64,
        )?;
        if !b.replication.is_slave() {
            let info = b.replication.info(&b);
            gauge(
                &mut e,
                "txmq_replica_lag_bytes",
                "Bytes of the master's log a replica does not hold yet",
                info.replicas.iter().map(|r| {
                    (
                        [("replica", LabelText(r.addr.as_str()))],
                        r.lag_bytes as f64,
                    )
                }),
            )?;
            gauge(
                &mut e,
                "txmq_replica_in_sync",
                "1 when the replica counts toward --min-insync-replicas, else 0",
                info.replicas.iter().map(|r| {
                    (
                        [("replica", LabelText(r.addr.as_str()))],
                        f64::from(u8::from(r.in_sync)),
                    )
                }),
            )?;
        }
        Ok(())
    }
}

/// (group, topic, lag) for every group with a committed offset: over the
/// topic's queues, the max offset minus the committed one (the queue's
/// min offset where the group committed none).
fn consumer_lag(b: &BrokerInner) -> Vec<(String, String, u64)> {
    b.store
        .committed_groups()
        .into_iter()
        .map(|(group, topic)| {
            let queues = b.topics.get(&topic).map_or(0, |c| c.queues);
            let lag = (0..queues)
                .filter_map(|q| {
                    let queue = b.store.queue(&topic, q)?;
                    // What retention removed is no lag: it cannot be read.
                    let from = b
                        .store
                        .committed_offset(&group, &topic, q)
                        .unwrap_or(0)
                        .max(queue.min_offset());
                    Some(queue.max_offset().saturating_sub(from))
                })
                .sum();
            (group, topic, lag)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name{labels}` in exposition `text`.
    pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().ok())?
        })
    }

    #[test]
    fn a_pull_dropped_while_it_waits_is_not_observed() {
        let m = Metrics::new();
        {
            let mut t = Timer::start(&m.pull_latency);
            t.pause();
        }
        {
            let mut t = Timer::start(&m.pull_latency);
            t.pause();
            t.restart();
        }
        let text = txmq_remoting::metrics::render(&m.registry());
        assert_eq!(
            value(&text, "txmq_pull_latency_seconds_count"),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped_so_no_name_can_spoil_the_scrape() {
        let m = Metrics::new();
        let evil = "evil\"} 1\ntxmq_injected_total 42\n#\\";
        m.prepared(evil);
        m.dead_letter("a\"b");
        let text = txmq_remoting::metrics::render(&m.registry());
        assert!(
            !text.lines().any(|l| l.starts_with("txmq_injected_total")),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"txmq_transactions_prepared_total{group="evil\"} 1\ntxmq_injected_total 42\n#\\"}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, r#"txmq_dead_letters_total{group="a\"b"}"#),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn counted_events_show_with_their_labels() {
        let m = Metrics::new();
        m.messages_in("orders", 3, 30);
        m.messages_in("orders", 1, 5);
        m.messages_out("orders", 2, 20);
        m.messages_out("orders", 0, 0);
        m.prepared("payments");
        m.prepared("payments");
        m.ended("payments", true);
        m.ended("payments", false);
        m.check_back(
            "payments",
            true,
            CheckOutcome::Answered(TxResolution::Unknown),
        );
        m.check_back("payments", true, CheckOutcome::TimedOut);
        m.check_back("payments", false, CheckOutcome::Failed);
        m.parked("payments");
        m.dead_letter("billing");
        {
            let _t = Timer::start(&m.send_latency);
        }
        let text = txmq_remoting::metrics::render(&m.registry());
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v(r#"txmq_messages_in_total{topic="orders"}"#),
            Some(4.0),
            "{text}"
        );
        assert_eq!(v(r#"txmq_bytes_in_total{topic="orders"}"#), Some(35.0));
        assert_eq!(v(r#"txmq_messages_out_total{topic="orders"}"#), Some(2.0));
        assert_eq!(v(r#"txmq_bytes_out_total{topic="orders"}"#), Some(20.0));
        assert_eq!(
            v(r#"txmq_transactions_prepared_total{group="payments"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(r#"txmq_transactions_committed_total{group="payments"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"txmq_transactions_rolled_back_total{group="payments"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"txmq_transactions_checked_total{group="payments"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(r#"txmq_transactions_parked_total{group="payments"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"txmq_check_back_answers_total{group="payments",answer="unknown"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"txmq_check_back_answers_total{group="payments",answer="commit"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(r#"txmq_check_back_timeouts_total{group="payments"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"txmq_check_back_failures_total{group="payments"}"#),
            Some(1.0)
        );
        assert_eq!(v(r#"txmq_dead_letters_total{group="billing"}"#), Some(1.0));
        assert_eq!(v("txmq_send_latency_seconds_count"), Some(1.0));
        assert!(
            text.contains("# TYPE txmq_send_latency_seconds histogram"),
            "{text}"
        );
        // No broker serving yet: no state gauges, and no error.
        assert!(!text.contains("txmq_transactions_pending"), "{text}");
    }

    #[test]
    fn messages_of_a_transaction_are_counted_by_topic() {
        let m = |t: &str, body: &'static [u8]| (0, txmq_protocol::Message::new(t, body));
        let counted = by_topic(&[m("a", b"12"), m("b", b"1"), m("a", b"123")]);
        assert_eq!(
            counted,
            vec![("a".to_string(), 2, 5), ("b".to_string(), 1, 1)]
        );
    }

    /// The state gauges read a real broker: its pending transactions, its
    /// store, its connections; `/metrics` serves them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_gauges_show_the_serving_broker() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::BrokerConfig::new(dir.path());
        config.listen = "127.0.0.1:0".into();
        config.standalone = true;
        config.nameserver_listen = "127.0.0.1:0".into();
        config.nameservers = Vec::new();
        config.segment_size = 8 << 20;
        config.metrics_listen = Some("127.0.0.1:0".into());
        let broker = crate::Broker::start(config).await.unwrap();
        let crate::Run::Single(inc) = &broker.run else {
            panic!("a single broker")
        };
        let b = inc.inner.clone();
        b.store.ensure_queues("orders", 1).unwrap();
        let msg = txmq_protocol::Message::new("orders", &b"half"[..]);
        b.transactions
            .prepare("payments", Some(60_000), None, vec![(0, msg)], None)
            .await
            .unwrap();
        let text = txmq_remoting::metrics::render(&b.metrics.registry());
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v(r#"txmq_transactions_pending{group="payments"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            v(r#"txmq_transactions_parked_now{group="payments"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(r#"txmq_transactions_prepared_total{group="payments"}"#),
            Some(1.0)
        );
        let age = v(r#"txmq_transaction_oldest_pending_age_seconds{group="payments"}"#).unwrap();
        assert!((0.0..5.0).contains(&age), "{age}");
        assert!(v("txmq_store_size_bytes").unwrap() > 0.0, "{text}");
        assert_eq!(v("txmq_store_segments"), Some(1.0));
        assert!(v("txmq_store_disk_free_bytes").unwrap() > 0.0, "{text}");
        assert_eq!(v("txmq_connections"), Some(0.0));
        assert_eq!(v("txmq_grpc_connections"), Some(0.0));
        assert_eq!(v("txmq_pop_in_flight"), Some(0.0));
        assert!(text.contains("# TYPE txmq_fdatasync counter"), "{text}");
        assert!(
            text.contains("# TYPE txmq_store_writeback_bytes counter"),
            "{text}"
        );
        assert!(broker.metrics_addr().is_some());
        broker.shutdown().await;
    }
}
