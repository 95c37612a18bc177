//! The sampler: one background task asks every broker for its counters
//! ([`txmq::Admin::broker_counters`]) every [`SAMPLE_EVERY`] and keeps the
//! rates of the last ten minutes in a ring buffer. Pages and
//! `GET /api/overview` read the buffer; a page view never asks the brokers
//! for counters, so the load on the brokers does not grow with visitors.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use txmq::{Admin, BrokerCounters};

use super::{AppState, SAMPLE_EVERY};

/// How much history the charts show.
const HISTORY: Duration = Duration::from_secs(600);

/// One point of the charts: rates per second over the interval before `t`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Point {
    /// When, ms since the Unix epoch.
    pub t: u64,
    /// Messages stored per second (all brokers).
    pub msg_in: f64,
    /// Messages handed to consumers per second.
    pub msg_out: f64,
    /// Transactions prepared per second.
    pub prepared: f64,
    /// Committed per second.
    pub committed: f64,
    /// Rolled back per second.
    pub rolled_back: f64,
    /// Parked per second.
    pub parked: f64,
    /// Pending (prepared or parked) at `t`.
    pub pending: u64,
}

/// Summed counters of all brokers at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
struct Totals {
    msg_in: u64,
    msg_out: u64,
    prepared: u64,
    committed: u64,
    rolled_back: u64,
    parked: u64,
    pending: u64,
    /// Messages in per topic.
    topics: HashMap<String, u64>,
}

impl Totals {
    fn of(counters: &[BrokerCounters]) -> Totals {
        let mut t = Totals::default();
        for c in counters {
            t.msg_in += c.messages_in;
            t.msg_out += c.messages_out;
            t.prepared += c.tx.prepared;
            t.committed += c.tx.committed;
            t.rolled_back += c.tx.rolled_back;
            t.parked += c.tx.parked;
            t.pending += c.tx.pending;
            for topic in &c.topics {
                *t.topics.entry(topic.topic.clone()).or_default() += topic.messages_in;
            }
        }
        t
    }
}

#[derive(Default)]
struct State {
    points: VecDeque<Point>,
    last: Option<(Instant, Totals)>,
    /// Each broker's last counters, by name.
    brokers: HashMap<String, BrokerCounters>,
    /// Messages in per second per topic, over the last interval.
    topic_rates: HashMap<String, f64>,
    /// Why the last sample failed, if it did.
    error: Option<String>,
}

/// The ring buffer and the latest counters.
#[derive(Default)]
pub struct Sampler {
    state: Mutex<State>,
}

/// A copy of what the sampler holds, for one page.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Oldest first.
    pub points: Vec<Point>,
    /// Each broker's last counters.
    pub brokers: HashMap<String, BrokerCounters>,
    /// Why the last sample failed.
    pub error: Option<String>,
}

impl Sampler {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one sample taken at `at` (`now_ms` on the wall clock).
    fn record(&self, at: Instant, now_ms: u64, counters: Vec<BrokerCounters>) {
        let totals = Totals::of(&counters);
        let mut s = self.lock();
        if let Some((before, prev)) = &s.last {
            let secs = at.duration_since(*before).as_secs_f64();
            if secs > 0.0 {
                // A broker that restarted counts from 0 again: no negative rates.
                let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
                let point = Point {
                    t: now_ms,
                    msg_in: rate(totals.msg_in, prev.msg_in),
                    msg_out: rate(totals.msg_out, prev.msg_out),
                    prepared: rate(totals.prepared, prev.prepared),
                    committed: rate(totals.committed, prev.committed),
                    rolled_back: rate(totals.rolled_back, prev.rolled_back),
                    parked: rate(totals.parked, prev.parked),
                    pending: totals.pending,
                };
                let topic_rates = totals
                    .topics
                    .iter()
                    .map(|(t, n)| {
                        (
                            t.clone(),
                            rate(*n, prev.topics.get(t).copied().unwrap_or(0)),
                        )
                    })
                    .collect();
                s.topic_rates = topic_rates;
                s.points.push_back(point);
                let keep = (HISTORY.as_secs() / SAMPLE_EVERY.as_secs().max(1)) as usize;
                while s.points.len() > keep {
                    s.points.pop_front();
                }
            }
        }
        s.brokers = counters
            .into_iter()
            .map(|c| (c.broker_name.clone(), c))
            .collect();
        s.last = Some((at, totals));
        s.error = None;
    }

    fn failed(&self, error: String) {
        self.lock().error = Some(error);
    }

    /// The points, the brokers' last counters and the last error.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            points: s.points.iter().cloned().collect(),
            brokers: s.brokers.clone(),
            error: s.error.clone(),
        }
    }

    /// The newest point, if two samples were taken.
    pub fn last_point(&self) -> Option<Point> {
        self.lock().points.back().cloned()
    }

    /// Messages in per second of `topic` over the last interval.
    pub fn topic_rate(&self, topic: &str) -> Option<f64> {
        self.lock().topic_rates.get(topic).copied()
    }
}

/// Samples until aborted.
pub async fn run(app: AppState) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        app.reconnect().await;
        let Some(admin): Option<Arc<Admin>> = app.global().or_else(|| app.sessions.any_client())
        else {
            app.sampler
                .failed("no counters yet: nobody has signed in".into());
            continue;
        };
        let at = Instant::now();
        match admin.broker_counters().await {
            Ok(answers) => {
                let mut counters = Vec::with_capacity(answers.len());
                let mut failed = Vec::new();
                for a in answers {
                    match a.result {
                        Ok(c) => counters.push(c),
                        Err(e) => {
                            failed.push(format!("{}: {}", a.broker_name, super::error_text(e)))
                        }
                    }
                }
                app.sampler.record(at, txmq::now_millis(), counters);
                if !failed.is_empty() {
                    app.sampler.failed(format!(
                        "brokers left out of the rates: {}",
                        failed.join("; ")
                    ));
                }
            }
            Err(e) => app.sampler.failed(super::error_text(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use txmq::TopicTraffic;

    fn counters(msg_in: u64, committed: u64) -> BrokerCounters {
        let mut c = BrokerCounters {
            broker_name: "broker-a".into(),
            messages_in: msg_in,
            topics: vec![TopicTraffic {
                topic: "orders".into(),
                messages_in: msg_in,
                messages_out: 0,
            }],
            ..BrokerCounters::default()
        };
        c.tx.committed = committed;
        c
    }

    #[test]
    fn rates_are_differences_over_time_and_the_buffer_is_bounded() {
        let s = Sampler::default();
        let t0 = Instant::now();
        s.record(t0, 1_000, vec![counters(100, 5)]);
        assert!(s.last_point().is_none(), "one sample makes no rate");
        s.record(t0 + Duration::from_secs(2), 3_000, vec![counters(120, 9)]);
        let p = s.last_point().unwrap_or_default();
        assert_eq!((p.t, p.msg_in, p.committed), (3_000, 10.0, 2.0));
        assert_eq!(s.topic_rate("orders"), Some(10.0));
        // A restarted broker counts from 0: the rate is 0, not negative.
        s.record(t0 + Duration::from_secs(4), 5_000, vec![counters(3, 0)]);
        assert_eq!(s.last_point().map(|p| p.msg_in), Some(0.0));
        for i in 0..1000u64 {
            s.record(
                t0 + Duration::from_secs(6 + 2 * i),
                7_000 + i,
                vec![counters(3 + i, 0)],
            );
        }
        assert_eq!(s.snapshot().points.len(), 300);
    }
}
