//! The load generator's loop, shared by every sending scenario: keeps up
//! to K requests in flight, closed loop (a new request as soon as one
//! completes) or open loop at a fixed rate.
//!
//! Open loop follows a schedule of *intended* send times, `start + i /
//! rate`. When the system falls behind (all K slots busy when a request is
//! due), the request goes out late but keeps its intended time, and its
//! latency is measured from that time: the coordinated-omission correction
//! OpenMessaging Benchmark applies with its publish delay. A request is in
//! the statistics when its intended time is at or after the end of the
//! warm-up.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use super::pacer::Pacer;

/// When a producer stops issuing requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// No request intended at or after this instant.
    Deadline(Instant),
    /// After this many measured requests (warm-up requests come on top).
    Count(u64),
}

/// One producer's schedule.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The intended time of the first request (open loop), or when to start.
    pub start: Instant,
    /// Requests intended before this are warm-up: sent, not measured.
    pub measure_from: Instant,
    /// When to stop.
    pub stop: Stop,
    /// Seconds between two requests' intended times (open loop); `None`
    /// for closed loop.
    pub interval: Option<f64>,
    /// Requests in flight at most.
    pub in_flight: usize,
    /// Wait for send times with a [`Pacer`] (to the microsecond) rather
    /// than tokio's millisecond timer.
    pub precise: bool,
}

impl Plan {
    /// The intended time of request `index` in open loop.
    pub fn intended(&self, index: u64) -> Option<Instant> {
        self.interval
            .map(|secs| self.start + Duration::from_secs_f64(index as f64 * secs))
    }

    /// How many requests the open-loop schedule intends before `deadline`
    /// (0 in closed loop).
    fn scheduled_before(&self, deadline: Instant) -> u64 {
        let Some(secs) = self.interval.filter(|s| *s > 0.0) else {
            return 0;
        };
        let span = deadline.saturating_duration_since(self.start).as_secs_f64();
        // The first index at or after the deadline, found the way
        // `intended` computes times (a division alone may round across it).
        let due_before = |i: u64| self.intended(i).is_some_and(|t| t < deadline);
        let mut n = (span / secs) as u64;
        while due_before(n) {
            n += 1;
        }
        while n > 0 && !due_before(n - 1) {
            n -= 1;
        }
        n
    }
}

/// A request to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Its number for this producer, from 0.
    pub index: u64,
    /// When it should have been sent: latency is measured from here.
    pub intended: Instant,
    /// Whether it counts in the statistics (not warm-up).
    pub measured: bool,
}

/// Issues requests by `issue` following `plan` until it says stop or
/// `stop` turns true, handing each completed request's output to `done`,
/// and returns once every request issued has completed: how many requests
/// the schedule held that were never issued because the deadline came
/// first (open loop behind its rate; 0 otherwise). A generator that falls
/// behind its rate keeps sending late, but not past the deadline: a rate
/// far above what the system takes would otherwise run for as long as
/// the backlog takes.
pub async fn drive<F, Fut, D>(
    plan: &Plan,
    mut stop: watch::Receiver<bool>,
    mut issue: F,
    mut done: D,
) -> u64
where
    F: FnMut(Op) -> Fut,
    Fut: Future,
    D: FnMut(Fut::Output),
{
    let in_flight = plan.in_flight.max(1);
    let mut inflight = FuturesUnordered::new();
    let mut pacer = Pacer::new(plan.precise);
    let mut next: u64 = 0;
    let mut measured_issued: u64 = 0;
    let mut unsent = 0;
    // Read from the channel only when it changed: its value sits behind a
    // lock that every producer task would take for every request.
    let mut stopping = *stop.borrow_and_update();
    if plan.interval.is_none() {
        // Closed loop: producers start together.
        tokio::time::sleep_until(plan.start).await;
    }
    loop {
        if inflight.len() >= in_flight {
            // Every slot is taken: nothing to decide until one is free.
            if let Some(out) = inflight.next().await {
                done(out);
            }
            continue;
        }
        if !matches!(stop.has_changed(), Ok(false)) {
            stopping |= *stop.borrow_and_update();
        }
        let due = plan.intended(next);
        // Closed loop: a request is intended when it is issued; the clock
        // is read once for both the stop check and its intended time.
        let now = Instant::now();
        let intended = due.unwrap_or(now);
        let more = !stopping
            && match plan.stop {
                // Open loop behind schedule: late requests go out until
                // the deadline itself, then the run ends.
                Stop::Deadline(deadline) if intended < deadline && now >= deadline => {
                    unsent = plan.scheduled_before(deadline).saturating_sub(next);
                    false
                }
                Stop::Deadline(deadline) => intended < deadline,
                Stop::Count(n) => measured_issued < n,
            };
        if more {
            if let Some(due) = due {
                if due > now {
                    // Not due yet: take completions meanwhile.
                    tokio::select! {
                        () = pacer.sleep_until(due) => {}
                        Some(out) = inflight.next(), if !inflight.is_empty() => done(out),
                        Ok(()) = stop.changed() => stopping |= *stop.borrow(),
                    }
                    continue;
                }
            }
            let measured = intended >= plan.measure_from;
            measured_issued += u64::from(measured);
            let op = Op {
                index: next,
                intended,
                measured,
            };
            next += 1;
            if in_flight == 1 {
                // Nothing else in flight: awaited here, in this task's own
                // state, rather than moved into a task of the set (an
                // allocation and a copy of the whole request per message).
                // It is made where it is awaited: made aside first, it was
                // copied in whole (1.4 KB per message, seen with a uprobe
                // on `memmove`); made here, it was not (the compiler's
                // choice either way, not a promise).
                done(issue(op).await);
            } else {
                inflight.push(issue(op));
            }
            continue;
        }
        if !more && inflight.is_empty() {
            break;
        }
        match inflight.next().await {
            Some(out) => done(out),
            None => {
                // Nothing in flight but more to send: only when stopping
                // raced with the check above.
                if !more {
                    break;
                }
            }
        }
    }
    unsent
}

/// Splits `total` over `parts` as evenly as possible; part `i`'s share.
pub fn share(total: u64, parts: u64, i: u64) -> u64 {
    if parts == 0 {
        return 0;
    }
    total / parts + u64::from(i < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn never_stop() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        // Keep the sender alive for the whole test.
        std::mem::forget(tx);
        rx
    }

    #[test]
    fn shares_add_up() {
        let parts: Vec<u64> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(parts, [4, 3, 3]);
        assert_eq!((0..7).map(|i| share(5, 7, i)).sum::<u64>(), 5);
        assert_eq!(share(5, 0, 0), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_k_in_flight_and_counts_exactly() {
        let start = Instant::now();
        let plan = Plan {
            start,
            measure_from: start,
            stop: Stop::Count(20),
            interval: None,
            in_flight: 4,
            precise: false,
        };
        let current = RefCell::new(0usize);
        let peak = RefCell::new(0usize);
        let mut done_ops = Vec::new();
        drive(
            &plan,
            never_stop(),
            |op| {
                *current.borrow_mut() += 1;
                let now = *current.borrow();
                peak.replace_with(|p| (*p).max(now));
                let current = &current;
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    *current.borrow_mut() -= 1;
                    op
                }
            },
            |op| done_ops.push(op),
        )
        .await;
        assert_eq!(done_ops.len(), 20);
        assert_eq!(*peak.borrow(), 4);
        assert!(done_ops.iter().all(|o| o.measured));
        // 20 requests, 4 at a time, 10 ms each.
        assert_eq!(start.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_keeps_intended_times_when_falling_behind() {
        let start = Instant::now();
        // 1000 requests/s for 100 ms, one in flight, each taking 5 ms: the
        // generator falls behind, but intended times stay on the schedule.
        let plan = Plan {
            start,
            measure_from: start + Duration::from_millis(20),
            stop: Stop::Deadline(start + Duration::from_millis(100)),
            interval: Some(0.001),
            in_flight: 1,
            precise: false,
        };
        let mut done_ops = Vec::new();
        let unsent = drive(
            &plan,
            never_stop(),
            |op| async move {
                let sent = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await;
                (op, sent)
            },
            |x| done_ops.push(x),
        )
        .await;
        // One every 5 ms until the deadline, each later than the last.
        assert_eq!(done_ops.len(), 20);
        for (i, (op, sent)) in done_ops.iter().enumerate() {
            assert_eq!(op.index, i as u64);
            assert_eq!(op.intended, start + Duration::from_millis(i as u64));
            assert_eq!(*sent, start + Duration::from_millis(5 * i as u64));
            assert_eq!(op.measured, i >= 20);
        }
        // The last one went out 76 ms late: its latency counts that.
        let (last, sent) = done_ops[19];
        assert_eq!(
            sent.duration_since(last.intended),
            Duration::from_millis(76)
        );
        // The other 80 of the schedule were never sent, and the run ended
        // at its deadline rather than when the backlog would have.
        assert_eq!(unsent, 80);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_on_time_waits_for_the_schedule() {
        let start = Instant::now();
        let plan = Plan {
            start,
            measure_from: start,
            stop: Stop::Count(10),
            interval: Some(0.01),
            in_flight: 8,
            precise: false,
        };
        let mut sent_at = Vec::new();
        drive(
            &plan,
            never_stop(),
            |op| async move { (op, Instant::now()) },
            |(op, at)| sent_at.push((op.intended, at)),
        )
        .await;
        assert_eq!(sent_at.len(), 10);
        assert!(sent_at.iter().all(|(i, a)| i == a));
        assert_eq!(start.elapsed(), Duration::from_millis(90));
    }

    #[tokio::test(start_paused = true)]
    async fn the_stop_signal_ends_a_run_and_waits_for_in_flight_requests() {
        let start = Instant::now();
        let plan = Plan {
            start,
            measure_from: start,
            stop: Stop::Deadline(start + Duration::from_secs(3600)),
            interval: Some(0.001),
            in_flight: 64,
            precise: false,
        };
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(true);
        });
        let mut n = 0;
        drive(
            &plan,
            rx,
            |_| tokio::time::sleep(Duration::from_millis(20)),
            |()| n += 1,
        )
        .await;
        assert!((45..=55).contains(&n), "{n} requests");
        assert!(start.elapsed() < Duration::from_millis(80));
    }

    #[tokio::test(start_paused = true)]
    async fn one_in_flight_runs_back_to_back_and_the_one_out_at_the_stop_finishes() {
        let start = Instant::now();
        let plan = Plan {
            start,
            measure_from: start,
            stop: Stop::Deadline(start + Duration::from_secs(3600)),
            interval: None,
            in_flight: 1,
            precise: false,
        };
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(true);
        });
        let running = RefCell::new(0usize);
        let mut ends = Vec::new();
        drive(
            &plan,
            rx,
            |op| {
                *running.borrow_mut() += 1;
                assert_eq!(*running.borrow(), 1, "two requests in flight");
                let running = &running;
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *running.borrow_mut() -= 1;
                    (op.index, Instant::now())
                }
            },
            |x| ends.push(x),
        )
        .await;
        // 20 ms each, one after the other; the third was out at the stop
        // (50 ms) and is done at 60 ms; no fourth.
        let ms = |t: Instant| t.duration_since(start).as_millis();
        let ends: Vec<_> = ends.into_iter().map(|(i, t)| (i, ms(t))).collect();
        assert_eq!(ends, [(0, 20), (1, 40), (2, 60)]);
        assert_eq!(start.elapsed(), Duration::from_millis(60));
    }
}
