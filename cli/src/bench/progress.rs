//! What a running benchmark shows: shared counters the load tasks bump,
//! and an indicatif progress bar on stderr with the current rates.
//!
//! The bar is hidden when stderr is not a terminal or the output is JSON,
//! so scripts see only the final summary.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// How often the bar is redrawn.
const TICK: Duration = Duration::from_millis(250);
/// The window over which the current rate is computed.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Running totals, bumped by every task (relaxed atomics: they are only
/// read for display; the report is made from each task's own figures).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages acknowledged (sent) or transactions completed.
    pub sent: AtomicU64,
    /// Messages received by consumers.
    pub received: AtomicU64,
    /// Failed sends or transactions.
    pub errors: AtomicU64,
}

impl Counters {
    /// Adds `n` sent messages.
    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` received messages.
    pub fn add_received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` errors.
    pub fn add_errors(&self, n: u64) {
        self.errors.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; 3] {
        [
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        ]
    }
}

/// How far along a run is, for the bar's length.
#[derive(Debug, Clone, Copy)]
pub enum Extent {
    /// Runs for this long (warm-up included).
    Time(Duration),
    /// Sends this many messages.
    Sent(u64),
    /// Unknown (until idle, until Ctrl-C).
    Open,
}

/// A progress bar redrawn by a background task until [`Progress::finish`].
pub struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts a bar on stderr when `show` and stderr is a terminal, else a
    /// hidden one. `warmup_until`: while before it, the bar says so.
    pub fn start(
        show: bool,
        counters: Arc<Counters>,
        extent: Extent,
        warmup_until: Option<Instant>,
    ) -> Progress {
        if !show || !std::io::stderr().is_terminal() {
            return Progress {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        let (len, template) = match extent {
            Extent::Time(d) => (
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                "{spinner} {elapsed_precise} [{bar:30}] {msg}",
            ),
            Extent::Sent(n) => (n, "{spinner} {elapsed_precise} [{bar:30}] {msg}"),
            Extent::Open => (0, "{spinner} {elapsed_precise} {msg}"),
        };
        let bar = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        let started = Instant::now();
        let ticker = tokio::spawn({
            let bar = bar.clone();
            async move {
                let mut rates = RateWindow::default();
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tick.tick().await;
                    let now = Instant::now();
                    let [sent, received, errors] = counters.snapshot();
                    let (sent_rate, received_rate) = rates.push(now, sent, received);
                    match extent {
                        Extent::Time(_) => bar.set_position(
                            u64::try_from(now.duration_since(started).as_millis())
                                .unwrap_or(u64::MAX),
                        ),
                        Extent::Sent(_) => bar.set_position(sent),
                        Extent::Open => {}
                    }
                    let warming = warmup_until.is_some_and(|w| now < w);
                    bar.set_message(status_line(
                        warming,
                        sent,
                        sent_rate,
                        received,
                        received_rate,
                        errors,
                    ));
                }
            }
        });
        Progress {
            bar,
            ticker: Some(ticker),
        }
    }

    /// Stops and clears the bar.
    pub fn finish(self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
    }
}

/// Counter samples over the last [`RATE_WINDOW`], for a current rate that
/// neither jumps on every tick nor lags for long.
#[derive(Debug, Default)]
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64, u64)>,
}

impl RateWindow {
    /// Adds a sample; returns (sent/s, received/s) over the window.
    fn push(&mut self, now: Instant, sent: u64, received: u64) -> (f64, f64) {
        self.samples.push_back((now, sent, received));
        while self
            .samples
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(t0, s0, r0)) = self.samples.front() else {
            return (0.0, 0.0);
        };
        let secs = now.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            return (0.0, 0.0);
        }
        (
            sent.saturating_sub(s0) as f64 / secs,
            received.saturating_sub(r0) as f64 / secs,
        )
    }
}

fn status_line(
    warming: bool,
    sent: u64,
    sent_rate: f64,
    received: u64,
    received_rate: f64,
    errors: u64,
) -> String {
    let mut s = String::new();
    if warming {
        s.push_str("warm-up  ");
    }
    s.push_str(&format!("sent {sent} ({sent_rate:.0} msg/s)"));
    if received > 0 {
        s.push_str(&format!("  received {received} ({received_rate:.0} msg/s)"));
    }
    if errors > 0 {
        s.push_str(&format!("  errors {errors}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_over_the_last_second() {
        let mut w = RateWindow::default();
        let t0 = Instant::now();
        assert_eq!(w.push(t0, 0, 0), (0.0, 0.0));
        let (s, r) = w.push(t0 + Duration::from_millis(500), 500, 100);
        assert!((s - 1000.0).abs() < 1e-6 && (r - 200.0).abs() < 1e-6);
        // The first sample falls out of the window.
        w.push(t0 + Duration::from_millis(1000), 1000, 100);
        let (s, _) = w.push(t0 + Duration::from_millis(1600), 1000, 100);
        assert!(s.abs() < 1e-6, "nothing sent in the last 600 ms: {s}");
    }

    #[test]
    fn the_status_line_shows_what_is_happening() {
        assert_eq!(
            status_line(true, 10, 5.0, 0, 0.0, 0),
            "warm-up  sent 10 (5 msg/s)"
        );
        assert_eq!(
            status_line(false, 10, 5.0, 7, 3.4, 2),
            "sent 10 (5 msg/s)  received 7 (3 msg/s)  errors 2"
        );
    }
}
