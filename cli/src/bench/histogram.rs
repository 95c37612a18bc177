//! Latency recording: an HdrHistogram of microseconds per task, merged at
//! the end, and the summary a report shows (OpenMessaging Benchmark's
//! percentiles: avg, p50, p75, p95, p99, p99.9, p99.99, max).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// The largest latency recorded as itself (one hour); longer ones are
/// recorded as this.
const HIGHEST_US: u64 = 3_600_000_000;

/// Latencies in microseconds, 3 significant digits. One per task, merged
/// with [`Latencies::merge`]; recording never allocates.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl Latencies {
    /// An empty recorder for 1 µs .. 1 h.
    pub fn new() -> Latencies {
        // Fixed, valid bounds: creation cannot fail.
        let histogram = Histogram::new_with_bounds(1, HIGHEST_US, 3)
            .unwrap_or_else(|e| unreachable!("fixed histogram bounds are valid: {e}"));
        Latencies { histogram }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.record_n(latency, 1);
    }

    /// Records the same latency for `n` messages (a batch).
    pub fn record_n(&mut self, latency: Duration, n: u64) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram
            .saturating_record_n(us.clamp(1, HIGHEST_US), n);
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// How many values were recorded.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The summary of what was recorded.
    pub fn summary(&self) -> Summary {
        let h = &self.histogram;
        if h.is_empty() {
            return Summary::default();
        }
        let q = |p: f64| h.value_at_quantile(p);
        Summary {
            count: h.len(),
            avg: h.mean(),
            p50: q(0.50),
            p75: q(0.75),
            p95: q(0.95),
            p99: q(0.99),
            p99_9: q(0.999),
            p99_99: q(0.9999),
            max: h.max(),
        }
    }
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub avg: f64,
    /// Median.
    pub p50: u64,
    /// 75th percentile.
    pub p75: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
    /// 99.99th percentile.
    pub p99_99: u64,
    /// Largest value.
    pub max: u64,
}

impl Summary {
    /// The column names of [`Summary::cells`].
    pub const HEADER: [&'static str; 9] = [
        "COUNT", "AVG", "P50", "P75", "P95", "P99", "P99.9", "P99.99", "MAX",
    ];

    /// `{"count","avg","p50","p75","p95","p99","p99_9","p99_99","max"}`,
    /// microseconds; `null` when nothing was recorded.
    pub fn json(&self) -> Value {
        if self.count == 0 {
            return Value::Null;
        }
        json!({
            "count": self.count,
            "avg": (self.avg * 10.0).round() / 10.0,
            "p50": self.p50,
            "p75": self.p75,
            "p95": self.p95,
            "p99": self.p99,
            "p99_9": self.p99_9,
            "p99_99": self.p99_99,
            "max": self.max,
        })
    }

    /// Table cells in the order of [`Summary::HEADER`], readable units
    /// (µs below 10 ms, ms below 10 s, else s).
    pub fn cells(&self) -> Vec<String> {
        let mut cells = vec![self.count.to_string(), human_us(self.avg.round() as u64)];
        cells.extend(
            [
                self.p50,
                self.p75,
                self.p95,
                self.p99,
                self.p99_9,
                self.p99_99,
                self.max,
            ]
            .map(human_us),
        );
        cells
    }
}

/// `850us`, `12.3ms`, `4.56s`.
pub fn human_us(us: u64) -> String {
    if us < 10_000 {
        format!("{us}us")
    } else if us < 10_000_000 {
        format!("{:.1}ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2}s", us as f64 / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latencies::new();
        for us in 1..=10_000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        assert!((s.avg - 5_000.5).abs() < 5.0, "avg {}", s.avg);
        // Three significant digits: within 0.1 %.
        let near = |got: u64, want: u64| got.abs_diff(want) <= want / 1000 + 1;
        assert!(near(s.p50, 5_000), "p50 {}", s.p50);
        assert!(near(s.p75, 7_500), "p75 {}", s.p75);
        assert!(near(s.p95, 9_500), "p95 {}", s.p95);
        assert!(near(s.p99, 9_900), "p99 {}", s.p99);
        assert!(near(s.p99_9, 9_990), "p99.9 {}", s.p99_9);
        assert!(near(s.p99_99, 9_999), "p99.99 {}", s.p99_99);
        assert!(near(s.max, 10_000), "max {}", s.max);
    }

    #[test]
    fn merged_recorders_count_everything_and_batches_count_per_message() {
        let mut a = Latencies::new();
        let mut b = Latencies::new();
        a.record_n(Duration::from_millis(1), 64);
        b.record(Duration::from_millis(100));
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 65);
        assert!(s.p50.abs_diff(1_000) <= 1);
        assert!(s.max.abs_diff(100_000) <= 100);
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut l = Latencies::new();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(10 * 3600));
        let s = l.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.p50, 1);
        assert!(s.max >= HIGHEST_US);
    }

    #[test]
    fn the_json_has_omb_percentile_names() {
        let mut l = Latencies::new();
        l.record(Duration::from_micros(250));
        let v = l.summary().json();
        for key in [
            "count", "avg", "p50", "p75", "p95", "p99", "p99_9", "p99_99", "max",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["p99_9"], 250);
        assert_eq!(v["count"], 1);
        assert_eq!(Latencies::new().summary().json(), Value::Null);
    }

    #[test]
    fn cells_use_readable_units() {
        assert_eq!(human_us(850), "850us");
        assert_eq!(human_us(12_345), "12.3ms");
        assert_eq!(human_us(4_560_000), "4560.0ms");
        assert_eq!(human_us(45_600_000), "45.60s");
        let mut l = Latencies::new();
        l.record(Duration::from_micros(100));
        let cells = l.summary().cells();
        assert_eq!(cells.len(), Summary::HEADER.len());
        assert_eq!(cells[0], "1");
        assert_eq!(cells[2], "100us");
    }
}
