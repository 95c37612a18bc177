//! How the server processes log: `--log-format text|json` and
//! `--log-level` (a `RUST_LOG`-style filter), on standard error.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The filter without `--log-level` or `RUST_LOG`.
pub const DEFAULT_FILTER: &str = "info,openraft=error";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON formatter):
    /// `timestamp`, `level`, `target`, `fields` (with `message`), `span`s.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format '{other}' (text or json)")),
        }
    }
}

/// The filter for `level`: `--log-level` when given, else `RUST_LOG`,
/// else [`DEFAULT_FILTER`].
///
/// # Errors
/// A `level` that is not a valid filter (`info`, `warn,txmq_broker=debug`).
pub fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level '{l}': {e}")),
        None => Ok(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        ),
    }
}

/// Installs the process's logger: `format` on standard error, filtered
/// by [`filter`] of `level`.
///
/// # Errors
/// An invalid `level`.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = filter(level)?;
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (standard error a pipe whose
        // reader is gone) is dropped: reporting that on the same standard
        // error panicked the task logging it, such as the one that stops
        // the server on SIGTERM.
        .log_internal_errors(false);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            // Colours only on a terminal, so logs captured to a file stay plain.
            .with(
                layer
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(Repeats::default()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                layer
                    .json()
                    .with_current_span(false)
                    .with_filter(Repeats::default()),
            )
            .init(),
    }
    Ok(())
}

/// How often a warning or error of openraft's is written at most, from any
/// one place in its code.
const RAFT_REPEAT: Duration = Duration::from_secs(30);

/// Lets a warning or error of openraft's through once per [`RAFT_REPEAT`]
/// from each place in its code: openraft logs a failed replication RPC at
/// ERROR on every retry, twice a second for each controller member that is
/// down, which buried every other line of a nameserver's log.
#[derive(Default)]
struct Repeats {
    last: Mutex<HashMap<Identifier, Instant>>,
}

impl Repeats {
    fn applies(meta: &Metadata<'_>) -> bool {
        meta.is_event() && *meta.level() <= Level::WARN && meta.target().starts_with("openraft")
    }
}

impl<S> Filter<S> for Repeats {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !Self::applies(meta) {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(&meta.callsite()) {
            Some(at) if now.duration_since(*at) < RAFT_REPEAT => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if Self::applies(meta) {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_levels_parse_or_are_named() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml"
            .parse::<LogFormat>()
            .unwrap_err()
            .contains("text or json"));
        assert!(filter(Some("warn,txmq_broker=debug")).is_ok());
        assert!(filter(Some("info,[")).unwrap_err().contains("--log-level"));
    }

    #[test]
    fn openraft_repeats_its_errors_at_most_once_per_interval_from_one_place() {
        let out = std::sync::Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || Captured(sink.clone()))
            .with_filter(Repeats::default());
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(DEFAULT_FILTER))
            .with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..5 {
                tracing::error!(target: "openraft::replication", i, "RPCError");
                tracing::warn!(target: "txmq_controller", i, "ours");
            }
            tracing::error!(target: "openraft::core", "another place");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("RPCError").count(), 1, "{text}");
        assert_eq!(text.matches("ours").count(), 5, "{text}");
        assert_eq!(text.matches("another place").count(), 1, "{text}");
    }

    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
