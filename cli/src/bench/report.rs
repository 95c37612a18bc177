//! The summary printed at the end of a run: a readable table, or with
//! `--output json` one JSON object with OpenMessaging Benchmark's names
//! where they apply (`publish_rate_msg_s`, `publish_rate_mb_s`,
//! `consume_rate_msg_s`, `latency_us.p99_9`, ...).

use serde_json::{Map, Value};

use super::histogram::Summary;
use crate::output::{table, OutputFormat, Printer};

/// Bytes in the MB of the rates (OMB divides by 1024 * 1024).
const MB: f64 = 1024.0 * 1024.0;

/// A run's figures, in the order they are shown.
#[derive(Debug, Clone)]
pub struct Report {
    fields: Vec<(String, Value)>,
    latencies: Vec<(String, Summary)>,
}

impl Report {
    /// A report of `scenario` (`produce`, `consume`, `e2e`, `tx`).
    pub fn new(scenario: &str) -> Report {
        Report {
            fields: vec![("scenario".into(), Value::from(scenario))],
            latencies: Vec::new(),
        }
    }

    /// Adds (or replaces) a figure.
    pub fn field(&mut self, key: &str, value: impl Into<Value>) -> &mut Report {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.fields.push((key.to_string(), value)),
        }
        self
    }

    /// A figure added before.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Adds `<prefix>_rate_msg_s` and `<prefix>_rate_mb_s` for `messages`
    /// of `bytes` in `secs`.
    pub fn rates(&mut self, prefix: &str, messages: u64, bytes: u64, secs: f64) -> &mut Report {
        let (msgs, mbs) = if secs > 0.0 {
            (messages as f64 / secs, bytes as f64 / MB / secs)
        } else {
            (0.0, 0.0)
        };
        self.field(&format!("{prefix}_rate_msg_s"), round(msgs, 1));
        self.field(&format!("{prefix}_rate_mb_s"), round(mbs, 3))
    }

    /// Adds a latency distribution under `key` (e.g. `latency_us`).
    pub fn latency(&mut self, key: &str, summary: Summary) -> &mut Report {
        self.latencies.push((key.to_string(), summary));
        self
    }

    /// The report as one JSON object.
    pub fn json(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        for (k, s) in &self.latencies {
            m.insert(k.clone(), s.json());
        }
        Value::Object(m)
    }

    /// The report as text lines: the figures, then a latency table.
    pub fn text(&self) -> Vec<String> {
        let rows: Vec<Vec<String>> = self
            .fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| vec![k.clone(), value_text(v)])
            .collect();
        let mut lines = table(&["FIGURE", "VALUE"], &rows);
        let measured: Vec<_> = self.latencies.iter().filter(|(_, s)| s.count > 0).collect();
        if !measured.is_empty() {
            lines.push(String::new());
            let mut header = vec!["LATENCY"];
            header.extend(Summary::HEADER);
            let rows: Vec<Vec<String>> = measured
                .iter()
                .map(|(k, s)| {
                    let mut row = vec![k.trim_end_matches("_us").to_string()];
                    row.extend(s.cells());
                    row
                })
                .collect();
            lines.extend(table(&header, &rows));
        }
        lines
    }

    /// Prints the report in `printer`'s format.
    ///
    /// # Errors
    /// When stdout cannot be written.
    pub fn print(&self, printer: &Printer) -> std::io::Result<()> {
        match printer.format {
            OutputFormat::Json => printer.json(&self.json()),
            OutputFormat::Text => self.text().iter().try_for_each(|l| printer.line(l)),
        }
    }
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(0.0);
            if x.abs() >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.3}")
            }
        }
        Value::Array(all) => {
            let all: Vec<String> = all.iter().map(value_text).collect();
            format!("[{}]", all.join(", "))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::histogram::Latencies;
    use std::time::Duration;

    fn sample() -> Report {
        let mut l = Latencies::new();
        for us in [100, 200, 300, 400] {
            l.record(Duration::from_micros(us));
        }
        let mut r = Report::new("produce");
        r.field("topic", "t")
            .field("messages", 1000u64)
            .field("duration_s", 2.0)
            .field("target_rate", Value::Null)
            .rates("publish", 1000, 1000 * 1024, 2.0)
            .field("errors", 0u64)
            .latency("latency_us", l.summary())
            .latency("e2e_latency_us", Latencies::new().summary());
        r
    }

    #[test]
    fn the_json_summary_has_the_omb_style_fields() {
        let v = sample().json();
        assert_eq!(v["scenario"], "produce");
        assert_eq!(v["messages"], 1000);
        assert_eq!(v["publish_rate_msg_s"], 500.0);
        assert_eq!(v["publish_rate_mb_s"], 0.488);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["duration_s"], 2.0);
        assert_eq!(v["target_rate"], Value::Null);
        let lat = &v["latency_us"];
        for key in [
            "avg", "p50", "p75", "p95", "p99", "p99_9", "p99_99", "max", "count",
        ] {
            assert!(lat.get(key).is_some(), "latency_us.{key} in {v}");
        }
        assert_eq!(lat["avg"], 250.0);
        assert_eq!(lat["max"], 400);
        assert_eq!(v["e2e_latency_us"], Value::Null);
        assert!(!v.to_string().contains('\n'));
    }

    #[test]
    fn the_text_summary_is_a_table_of_figures_and_latencies() {
        let lines = sample().text();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["FIGURE", "VALUE"]
        );
        assert!(lines
            .iter()
            .any(|l| l.starts_with("publish_rate_msg_s") && l.ends_with("500")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("publish_rate_mb_s") && l.ends_with("0.488")));
        assert!(
            !lines.iter().any(|l| l.starts_with("target_rate")),
            "nulls are left out"
        );
        let header = lines.iter().position(|l| l.starts_with("LATENCY"));
        let Some(header) = header else {
            panic!("a latency table in {lines:#?}")
        };
        assert!(lines[header].contains("P99.99"));
        assert!(lines[header + 1].starts_with("latency "));
        assert!(lines[header + 1].contains("400us"));
        assert_eq!(lines.len(), header + 2, "empty distributions are left out");
    }

    #[test]
    fn a_field_set_twice_keeps_its_place() {
        let mut r = Report::new("e2e");
        r.field("a", 1u64).field("b", 2u64).field("a", 3u64);
        let v = r.json();
        assert_eq!(v["a"], 3);
        assert_eq!(r.fields.len(), 3);
        assert_eq!(round(1.23456, 2), 1.23);
        assert_eq!(
            Report::new("x").rates("consume", 5, 5, 0.0).json()["consume_rate_msg_s"],
            0.0
        );
    }
}
