//! How the server processes log: `--log-format text|json` and
//! `--log-level` (a `RUST_LOG`-style filter), on standard error.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

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
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (standard error a pipe whose
        // reader is gone) is dropped: reporting that on the same standard
        // error panicked the task logging it, such as the one that stops
        // the server on SIGTERM.
        .log_internal_errors(false)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            // Colours only on a terminal, so logs captured to a file stay plain.
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
    Ok(())
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
}
