//! Flags every subcommand takes, and the value parsers they share.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use txmq::{ClientConfig, Credentials, TlsClient, TlsFiles};

use crate::exit;
use crate::output::OutputFormat;
use crate::refusal::RefusalLayer;

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
        value_name = "ADDR[,ADDR..]",
        value_parser = parse_nameservers
    )]
    pub nameserver: String,

    /// Output format: text for people, json for one JSON object per line.
    #[arg(long, global = true, help_heading = "Global options", env = "TXMQ_OUTPUT", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// How long to wait for the answer to one request.
    #[arg(long, global = true, help_heading = "Global options", env = "TXMQ_TIMEOUT", default_value = "3s", value_parser = parse_positive_duration)]
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

    /// Threads the command runs on [default: one per core]. Under `bench`,
    /// the load's producers and consumers share them as a service's tasks
    /// share its runtime's; with the broker on the same machine, 1 spares
    /// the hand-offs of work between threads.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "TXMQ_WORKER_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub worker_threads: Option<u16>,

    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How the command reaches a cluster that runs with TLS and an ACL file.
#[derive(Debug, Args)]
pub struct SecurityArgs {
    /// Connect with TLS, trusting servers whose certificate this CA (PEM)
    /// signed. Without it, connections are plaintext.
    #[arg(
        long,
        global = true,
        help_heading = "Security options",
        env = "TXMQ_TLS_CA",
        value_name = "PEM"
    )]
    pub tls_ca: Option<PathBuf>,

    /// This client's certificate (PEM), for servers that require one
    /// (mutual TLS); needs --tls-key and --tls-ca.
    #[arg(
        long,
        global = true,
        help_heading = "Security options",
        env = "TXMQ_TLS_CERT",
        value_name = "PEM"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        global = true,
        help_heading = "Security options",
        env = "TXMQ_TLS_KEY",
        value_name = "PEM"
    )]
    pub tls_key: Option<PathBuf>,

    /// Sign in as this user of the servers' ACL file; needs --secret-key.
    #[arg(
        long,
        global = true,
        help_heading = "Security options",
        env = "TXMQ_ACCESS_KEY",
        value_name = "KEY"
    )]
    pub access_key: Option<String>,

    /// The secret of --access-key. It never travels: the servers'
    /// challenge is signed with it.
    #[arg(
        long,
        global = true,
        help_heading = "Security options",
        env = "TXMQ_SECRET_KEY",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub secret_key: Option<String>,
}

impl SecurityArgs {
    /// The TLS setting of the flags: `None` without `--tls-ca`.
    ///
    /// # Errors
    /// A usage error (exit 2) naming the file that cannot be used, or a
    /// certificate or key given without the CA.
    pub fn tls(&self) -> Result<Option<TlsClient>> {
        let files = TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        };
        if files.ca.is_none() && files.is_set() {
            return Err(exit::usage(
                "--tls-cert and --tls-key are for TLS connections: give --tls-ca too",
            ));
        }
        if files.ca.is_none() {
            return Ok(None);
        }
        TlsClient::from_files(&files)
            .map(Some)
            .map_err(|e| exit::usage(e.to_string()))
    }

    /// The credentials of the flags: `None` without `--access-key`.
    ///
    /// # Errors
    /// A usage error (exit 2) when only one of the two keys is given; an
    /// empty one (`--secret-key ""`, `TXMQ_SECRET_KEY=`) counts as not
    /// given.
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        Credentials::from_flags(self.access_key.as_deref(), self.secret_key.as_deref())
            .map_err(exit::usage)
    }
}

impl GlobalArgs {
    /// Client settings from the flags, for every client object a command
    /// makes (producers, consumers, admin).
    ///
    /// # Errors
    /// A usage error (exit 2) for TLS files that cannot be used or an
    /// access key without its secret (or the reverse).
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut config = ClientConfig::with_nameservers([&self.nameserver]);
        config.request_timeout = self.timeout;
        config.tls = self.security.tls()?;
        config.credentials = self.security.credentials()?;
        Ok(config)
    }

    /// Sends log messages to stderr, filtered by `--log`, and watches
    /// every warning for a refusal that ends the command
    /// ([`crate::refusal`]), whatever `--log` lets through.
    pub fn init_logging(&self) {
        let filter = EnvFilter::try_new(&self.log).unwrap_or_else(|e| {
            stderr!("warning: bad --log filter {:?} ({e}); using warn", self.log);
            EnvFilter::new("warn")
        });
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(txmq::one_line_stderr)
                    // A line standard error cannot take is dropped, not
                    // reported there again (which panics).
                    .log_internal_errors(false)
                    // Colours for a terminal only, not for a file or a pipe.
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .with(RefusalLayer.with_filter(LevelFilter::WARN))
            .init();
    }
}

/// Parses a group name (consumer or producer group, to show, reset or
/// answer for): 1 to 255 bytes, as the brokers take them.
///
/// # Errors
/// A message saying what is wrong, shown by clap.
pub fn parse_group(s: &str) -> Result<String, String> {
    match s.len() {
        0 => Err("a group name cannot be empty".into()),
        1..=255 => Ok(s.to_string()),
        n => Err(format!(
            "a group name is at most 255 bytes long; this one has {n}"
        )),
    }
}

/// Parses the group of a consumer that joins it (its retry topic is made):
/// 1 to 120 characters of `A-Z a-z 0-9 - _ . %`, as the brokers take it.
///
/// # Errors
/// A message saying what is wrong, shown by clap.
pub fn parse_consumer_group(s: &str) -> Result<String, String> {
    parse_group(s)?;
    txmq::validate_group_name(s)?;
    Ok(s.to_string())
}

/// Parses a topic name as the brokers take it (a name no topic can have
/// is a usage error, not an unknown topic on each broker).
///
/// # Errors
/// What is wrong with the name, shown by clap.
pub fn parse_topic_name(s: &str) -> Result<String, String> {
    txmq::validate_topic_name(s)?;
    Ok(s.to_string())
}

pub use txmq::config::{parse_duration, parse_positive_duration};

/// Parses `--nameserver`: one `host:port`, or several separated by commas.
///
/// # Errors
/// An empty list, or an entry without a host or a port.
pub fn parse_nameservers(s: &str) -> Result<String, String> {
    let list = txmq::config::parse_address_list(s);
    if list.is_empty() {
        return Err("no address given (write host:port, or several separated by commas)".into());
    }
    for addr in &list {
        txmq::config::check_host_port(addr, false)?;
    }
    Ok(s.to_string())
}

/// Parses a message's tag: one a tag expression can name (not empty, not
/// `*`, no `||`, no space at either end).
///
/// # Errors
/// A tag no subscription could select.
pub fn parse_tag(s: &str) -> Result<String, String> {
    if s.is_empty() || s == "*" || s.contains("||") || s.trim() != s {
        return Err(format!(
            "'{s}' cannot be a tag: a subscription selects tags by `a || b`, so a tag is not empty or `*`, holds no `||` and no space at either end"
        ));
    }
    Ok(s.to_string())
}

/// Parses a tag expression (`*`, or `a || b`), as brokers read it.
///
/// # Errors
/// An empty tag between separators.
pub fn parse_tag_filter(s: &str) -> Result<String, String> {
    txmq::parse_tag_expression(s)?;
    Ok(s.to_string())
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

    #[test]
    fn group_names_are_what_the_brokers_take() {
        assert_eq!(parse_group("g1"), Ok("g1".to_string()));
        assert_eq!(parse_group(""), Err("a group name cannot be empty".into()));
        assert!(parse_group(&"g".repeat(255)).is_ok());
        assert!(parse_group(&"g".repeat(256)).unwrap_err().contains("256"));
        assert!(
            parse_group("svc/orders").is_ok(),
            "any bytes to show or reset"
        );
        assert!(parse_consumer_group(&"g".repeat(120)).is_ok());
        let e = parse_consumer_group(&"g".repeat(121)).unwrap_err();
        assert!(
            e.contains("121") && e.contains("at most 120") && e.contains("%RETRY%"),
            "{e}"
        );
        assert_eq!(
            parse_consumer_group(""),
            Err("a group name cannot be empty".into())
        );
        for bad in ["bad group", "a/b", "a\"b", "caf\u{e9}"] {
            let e = parse_consumer_group(bad).unwrap_err();
            assert!(e.contains("allowed are A-Z a-z 0-9 - _ . %"), "{bad}: {e}");
        }
        for (bad, prefix) in [("%RETRY%g", "%RETRY%"), ("%DLQ%g", "%DLQ%")] {
            let e = parse_consumer_group(bad).unwrap_err();
            assert!(e.contains(&format!("starts with {prefix}")), "{bad}: {e}");
        }
    }
}
