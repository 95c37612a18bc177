//! Flags every subcommand takes, and the value parsers they share.

use std::time::Duration;

use clap::Args;
use tracing_subscriber::EnvFilter;
use txmq::ClientConfig;

use crate::output::OutputFormat;

/// Flags of every subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Nameserver address, or several separated by commas.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "TXMQ_NAMESERVER",
        default_value = "127.0.0.1:9876",
        value_name = "ADDR[,ADDR..]"
    )]
    pub nameserver: String,

    /// Output format: text for people, json for one JSON object per line.
    #[arg(long, global = true, help_heading = "Global options", env = "TXMQ_OUTPUT", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// How long to wait for the answer to one request.
    #[arg(long, global = true, help_heading = "Global options", env = "TXMQ_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Log filter for messages on stderr (error, warn, info, debug, trace,
    /// or tracing directives such as txmq=debug).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "TXMQ_LOG",
        default_value = "warn"
    )]
    pub log: String,
}

impl GlobalArgs {
    /// Client settings from the flags.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::with_nameservers([&self.nameserver]);
        config.request_timeout = self.timeout;
        config
    }

    /// Sends log messages to stderr, filtered by `--log`.
    pub fn init_logging(&self) {
        let filter = EnvFilter::try_new(&self.log).unwrap_or_else(|e| {
            eprintln!("warning: bad --log filter {:?} ({e}); using warn", self.log);
            EnvFilter::new("warn")
        });
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    }
}

/// Parses durations written like `500ms`, `6s`, `2m`, `1h 30m`.
///
/// # Errors
/// A message saying what is wrong, shown by clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e} (write durations like 500ms, 6s or 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_human_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("6s"), Ok(Duration::from_secs(6)));
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("6").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
