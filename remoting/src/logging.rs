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
        Some(l) => {
            if let Some(word) = not_a_level(l) {
                return Err(format!(
                    "invalid --log-level '{l}': {}",
                    not_a_level_text(word)
                ));
            }
            EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level '{l}': {e}"))
        }
        None => {
            // RUST_LOG is shared with other programs: a word that is no
            // level is said, not refused (it would write nothing at all).
            if let Some(word) = std::env::var("RUST_LOG")
                .ok()
                .as_deref()
                .and_then(not_a_level)
            {
                eprintln!("warning: RUST_LOG: {}", not_a_level_text(word));
            }
            Ok(
                EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER)),
            )
        }
    }
}

/// Levels a filter may name alone.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Targets the servers log under that a filter may name alone (all of
/// their levels): txmq's crates and the libraries they use.
const TARGETS: [&str; 9] = [
    "txmq", "openraft", "tokio", "rustls", "h2", "hyper", "tonic", "tower", "mio",
];

/// The first directive of filter `spec` that is a single word naming
/// neither a level nor a known target: `inf` or `warning`, which the
/// filter's syntax takes as a target's name, so that nothing else is
/// written, errors included.
fn not_a_level(spec: &str) -> Option<&str> {
    spec.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', ':', '[', '{'])
            && !LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l))
            && !TARGETS.iter().any(|t| d.starts_with(t))
    })
}

fn not_a_level_text(word: &str) -> String {
    format!(
        "'{word}' is not a level ({}): alone, a word is read as a target's name, and only that target's lines would be written (none at all, errors included)",
        LEVELS.join(", ")
    )
}

/// Installs the process's logger: `format` on standard error, filtered
/// by [`filter`] of `level`.
///
/// # Errors
/// An invalid `level`.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = filter(level)?;
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(one_line_stderr)
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

/// Writes each log line as one line: a line break inside it (a group name
/// or an error text a client chose, say) is written as `\n` (`\r` as
/// `\r`), so that no one can add a line of their own to the log. The
/// formatter hands over a whole event, its line break last, in one write.
/// (The JSON format escapes them itself.)
pub struct OneLine<W>(W);

/// Standard error, a log line at a time ([`OneLine`]): the writer of the
/// servers' text logs and of `txmq`'s.
pub fn one_line_stderr() -> OneLine<std::io::Stderr> {
    OneLine(std::io::stderr())
}

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            return self.0.write_all(buf).map(|()| buf.len());
        }
        let mut line = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                b => line.push(b),
            }
        }
        line.extend_from_slice(end);
        self.0.write_all(&line).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// How often a line that a peer can cause at will is written at most at
/// `WARN` from one place: see [`Throttle`].
pub const PEER_REPEAT: Duration = Duration::from_secs(10);

/// Holds back the repeats of a line that a peer can cause at will, once per
/// connection: a connection refused past `--max-connections`, a failed TLS
/// handshake, a first frame that is garbage. One is written at `WARN` per
/// [`PEER_REPEAT`] from each place ([`warn_throttled!`]), the next one
/// written saying how many were not (`suppressed=N`); those go to `DEBUG`.
/// Otherwise a client reconnecting in a loop, or anyone who can open
/// connections, fills the log (and its disk) as fast as they connect.
pub struct Throttle(Mutex<Option<(Instant, u64)>>);

impl Throttle {
    /// A throttle that has let nothing through yet (`const`: one lives in a
    /// `static` at each place, see [`warn_throttled!`]).
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Throttle(Mutex::new(None))
    }

    /// `Some(n)`: write the line at `WARN` now, saying that `n` were held
    /// back since the last one written; `None`: hold it back (counted).
    pub fn pass(&self) -> Option<u64> {
        self.pass_at(Instant::now())
    }

    fn pass_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *last {
            Some((at, held)) if now.saturating_duration_since(*at) < PEER_REPEAT => {
                *held += 1;
                None
            }
            other => {
                let held = other.map_or(0, |(_, held)| held);
                *other = Some((now, 0));
                Some(held)
            }
        }
    }
}

#[doc(hidden)]
pub use tracing as __tracing;

/// `tracing::warn!` for a line a peer can cause at will: written at `WARN`
/// at most once per [`PEER_REPEAT`] from this place, the next one with
/// `suppressed=N`; the ones held back at `DEBUG` (see [`Throttle`]).
#[macro_export]
macro_rules! warn_throttled {
    // With a throttle of the caller's: for a place that logs for several
    // (one function serving two ports, say).
    (@$throttle:expr; $($args:tt)+) => {{
        match $throttle.pass() {
            None => $crate::logging::__tracing::debug!($($args)+),
            Some(0) => $crate::logging::__tracing::warn!($($args)+),
            Some(suppressed) => $crate::logging::__tracing::warn!(suppressed, $($args)+),
        }
    }};
    ($($args:tt)+) => {{
        static THROTTLE: $crate::logging::Throttle = $crate::logging::Throttle::new();
        $crate::warn_throttled!(@THROTTLE; $($args)+)
    }};
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
    #[test]
    fn a_word_that_is_no_level_is_refused_rather_than_silence_every_line() {
        for bad in ["inf", "warning", "info,verbose", "Err"] {
            let e = super::filter(Some(bad)).expect_err(bad);
            assert!(e.contains("is not a level"), "{e}");
        }
        for good in [
            "info",
            "WARN",
            "warn,txmq_broker=debug",
            "txmq_broker",
            "openraft",
            "txmq_broker::store=trace",
            "info,openraft=error",
            "[{peer}]=debug",
        ] {
            assert!(super::filter(Some(good)).is_ok(), "{good}");
        }
    }

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

    #[test]
    fn a_peers_repeated_line_is_written_once_per_interval_saying_how_many_were_not() {
        let throttle = Throttle::new();
        let start = Instant::now();
        assert_eq!(throttle.pass_at(start), Some(0), "the first is written");
        for i in 1..=41 {
            assert_eq!(throttle.pass_at(start + Duration::from_millis(i)), None);
        }
        let later = start + PEER_REPEAT;
        assert_eq!(throttle.pass_at(later), Some(41), "says how many were not");
        assert_eq!(throttle.pass_at(later + Duration::from_secs(1)), None);
        let quiet = later + PEER_REPEAT * 3;
        assert_eq!(throttle.pass_at(quiet), Some(1));
        assert_eq!(throttle.pass_at(quiet + PEER_REPEAT), Some(0));
    }

    #[test]
    fn a_line_break_in_a_field_stays_inside_its_line() {
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let out = out.clone();
            move || OneLine(Captured(out.clone()))
        };
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let group = "g\n2026-12-07T11:00:00Z  INFO txmq_broker: FORGED\r";
            tracing::warn!(%group, "access denied");
            tracing::info!("next");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(r"group=g\n2026-12-07T11:00:00Z  INFO txmq_broker: FORGED\r"),
            "{text}"
        );
        assert!(lines[1].contains("next"), "{text}");
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
