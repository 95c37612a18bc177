//! Settings every client object shares: nameserver addresses, timeouts,
//! retries, route refresh, and the client id sent in the hello.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use txmq_protocol::DEFAULT_MAX_FRAME_LEN;
use txmq_remoting::{ConnectionConfig, Credentials, TlsClient};

use crate::{Error, Result};

/// The check of a `host:port` address every txmq binary applies.
pub use txmq_remoting::check_host_port;
/// How durations are parsed by txmq's programs, for applications' flags.
pub use txmq_remoting::flags::{parse_duration, parse_positive_duration};

/// Default wait for an answer to one request (3 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Default number of extra attempts a failed send gets (2).
pub const DEFAULT_SEND_RETRIES: u32 = 2;
/// Default time a cached route is used before it is asked for again (30 s).
pub const DEFAULT_ROUTE_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Settings shared by [`Producer`](crate::Producer),
/// [`PullConsumer`](crate::PullConsumer) and [`Admin`](crate::Admin).
///
/// More settings come as the client grows: start from
/// [`ClientConfig::default`] or [`ClientConfig::with_nameservers`] and set
/// fields, or use the builders' setters.
///
/// ```
/// use std::time::Duration;
/// use txmq::ClientConfig;
///
/// let mut config = ClientConfig::with_nameservers(["10.0.0.1:9876,10.0.0.2:9876"]);
/// config.request_timeout = Duration::from_secs(5);
/// assert_eq!(config.nameservers.len(), 2);
/// // Then `Producer::builder().config(config)`, or `Admin::with_config(config)`.
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Nameserver addresses (`host:port`), asked in turn until one answers.
    pub nameservers: Vec<String>,
    /// How long to wait for the answer to one request; for a send, per attempt.
    pub request_timeout: Duration,
    /// How many more times a send is tried after a retriable failure.
    pub send_retries: u32,
    /// How long a cached topic route is used before it is fetched again.
    pub route_refresh_interval: Duration,
    /// The id this client gives in its hello (see [`new_client_id`]).
    pub client_id: String,
    /// Largest frame sent or accepted.
    pub max_frame_len: usize,
    /// TLS to nameservers and brokers: the CA that signs their
    /// certificates, and this client's own for mutual TLS
    /// ([`TlsClient::from_files`]). Without it, connections are plaintext.
    pub tls: Option<TlsClient>,
    /// The user this client signs in as where an ACL file is in force
    /// (none needed with a client certificate that names a user).
    pub credentials: Option<Credentials>,
    /// How long closing a producer, a transaction producer or an admin
    /// waits for its calls in flight before it closes the connections under
    /// them (default 10 s).
    pub close_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            nameservers: Vec::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            send_retries: DEFAULT_SEND_RETRIES,
            route_refresh_interval: DEFAULT_ROUTE_REFRESH_INTERVAL,
            client_id: new_client_id(),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            tls: None,
            credentials: None,
            close_timeout: crate::drain::DEFAULT_CLOSE_TIMEOUT,
        }
    }
}

impl ClientConfig {
    /// Defaults with the given nameservers; each item may itself be a
    /// comma-separated list.
    pub fn with_nameservers<I, S>(nameservers: I) -> ClientConfig
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut config = ClientConfig::default();
        for list in nameservers {
            config.add_nameservers(list.as_ref());
        }
        config
    }

    /// Adds one address or a comma-separated list of addresses; duplicates are skipped.
    pub fn add_nameservers(&mut self, list: &str) {
        for addr in parse_address_list(list) {
            if !self.nameservers.contains(&addr) {
                self.nameservers.push(addr);
            }
        }
    }

    /// Checks that the settings can work.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when no nameserver is given, one is not
    /// `host:port`, or the request timeout is zero.
    pub fn validate(&self) -> Result<()> {
        if self.nameservers.is_empty() {
            return Err(Error::BadArgument("no nameserver address given".into()));
        }
        for addr in &self.nameservers {
            check_host_port(addr, false)
                .map_err(|e| Error::BadArgument(format!("nameserver address {e}")))?;
        }
        if self.request_timeout.is_zero() {
            return Err(Error::BadArgument(
                "the request timeout must be above zero".into(),
            ));
        }
        at_most_a_year("the request timeout", self.request_timeout)?;
        at_most_a_year("the route refresh interval", self.route_refresh_interval)?;
        at_most_a_year("the close timeout", self.close_timeout)
    }

    pub(crate) fn connection_config(&self) -> ConnectionConfig {
        ConnectionConfig {
            max_frame_len: self.max_frame_len,
            request_timeout: self.request_timeout,
            tls: self.tls.clone(),
            credentials: self.credentials.clone(),
            ..ConnectionConfig::default()
        }
    }
}

/// The longest a duration setting may be: a deadline past it (with
/// `Duration::MAX` for "forever", say) would overflow the clock.
const LONGEST_SETTING: Duration = Duration::from_secs(365 * 24 * 3600);

/// Refuses a duration setting (`what`, as a message names it) longer than
/// a year.
pub(crate) fn at_most_a_year(what: &str, d: Duration) -> Result<()> {
    if d > LONGEST_SETTING {
        return Err(Error::BadArgument(format!(
            "{what} must be at most a year (365 days), not {d:?}"
        )));
    }
    Ok(())
}

/// At most as many as a semaphore can count: refuses `n` (`what`, as a
/// message names it) above that.
pub(crate) fn countable(what: &str, n: usize) -> Result<()> {
    if n > tokio::sync::Semaphore::MAX_PERMITS {
        return Err(Error::BadArgument(format!(
            "{what} must be at most {}",
            tokio::sync::Semaphore::MAX_PERMITS
        )));
    }
    Ok(())
}

/// The most messages one pull returns (the broker refuses a pull asking
/// for more).
const MAX_PULL_BATCH: u32 = 1024;

/// Refuses a consumer's batch size the broker would refuse on every pull.
pub(crate) fn most_a_pull_returns(batch_size: u32) -> Result<()> {
    if batch_size > MAX_PULL_BATCH {
        return Err(Error::BadArgument(format!(
            "batch size must be at most {MAX_PULL_BATCH} (the most one pull returns), not {batch_size}"
        )));
    }
    Ok(())
}

/// Writes the setters of a client builder, a struct with the fields
/// `config: ClientConfig` and `group: Option<String>`: `nameserver`,
/// `config` and `client_id`, alike in every builder; `group`, with the doc
/// comment written above `group;`; then one setter per
/// `name(arg: Type) => field;` line that stores `arg` in `config.field`,
/// with the doc comment written above that line (the same setting reads
/// differently for a producer and a consumer).
///
/// A macro rather than a shared trait, so that the setters stay inherent
/// methods that callers use without importing anything.
macro_rules! client_setters {
    (
        $(#[$group_doc:meta])* group;
        $($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty) => $field:ident;)*
    ) => {
        /// Adds a nameserver address, or a comma-separated list of them; may be
        /// called repeatedly.
        pub fn nameserver(mut self, addr: &str) -> Self {
            self.config.add_nameservers(addr);
            self
        }

        /// Replaces all client settings (nameservers included) with `config`.
        pub fn config(mut self, config: $crate::ClientConfig) -> Self {
            self.config = config;
            self
        }

        /// The client id sent in the hello (default: see [`crate::config::new_client_id`]).
        pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
            self.config.client_id = client_id.into();
            self
        }

        /// TLS to nameservers and brokers (see [`crate::TlsClient::from_files`]).
        pub fn tls(mut self, tls: $crate::TlsClient) -> Self {
            self.config.tls = Some(tls);
            self
        }

        /// The user to sign in as where the servers have an ACL file: an
        /// access key and its secret (the secret never travels).
        pub fn credentials(mut self, access_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
            self.config.credentials = Some($crate::Credentials {
                access_key: access_key.into(),
                secret_key: secret_key.into(),
            });
            self
        }

        $(#[$group_doc])*
        pub fn group(mut self, group: impl Into<String>) -> Self {
            self.group = Some(group.into());
            self
        }

        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $ty) -> Self {
                self.config.$field = $arg;
                self
            }
        )*
    };
}
pub(crate) use client_setters;

/// The group given to the builder of a `what` (a consumer, a transaction
/// producer) that cannot work without one.
///
/// # Errors
/// [`Error::BadArgument`] ("a `what` needs a group") when there is none or
/// it is empty.
pub(crate) fn required_group(group: Option<String>, what: &str) -> Result<String> {
    group
        .filter(|g| !g.is_empty())
        .ok_or_else(|| Error::BadArgument(format!("a {what} needs a group")))
}

/// Splits `a:1, b:2,,c:3` into `["a:1", "b:2", "c:3"]`.
pub fn parse_address_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A process-unique client id: `<hostname>@<pid>#<n>` (`client` when the
/// host name cannot be read).
pub fn new_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "client".to_string());
    format!(
        "{host}@{}#{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_split_on_commas_and_skip_blanks_and_duplicates() {
        assert_eq!(parse_address_list(" a:1, b:2,,c:3 "), ["a:1", "b:2", "c:3"]);
        let mut c = ClientConfig::with_nameservers(["a:1,b:2", "b:2"]);
        c.add_nameservers("c:3");
        assert_eq!(c.nameservers, ["a:1", "b:2", "c:3"]);
        assert!(c.validate().is_ok());
        assert!(ClientConfig::default().validate().is_err());
        // Refused when built, not as a connect error retried later.
        let e = ClientConfig::with_nameservers(["localhost"])
            .validate()
            .unwrap_err();
        assert!(
            matches!(&e, Error::BadArgument(m) if m.contains("'localhost' is not host:port")),
            "{e}"
        );
        let mut forever = ClientConfig::with_nameservers(["a:1"]);
        forever.request_timeout = Duration::MAX;
        let e = forever.validate().unwrap_err();
        assert!(e.to_string().contains("at most a year"), "{e}");
    }

    #[test]
    fn client_ids_are_unique_in_a_process() {
        let a = new_client_id();
        let b = new_client_id();
        assert_ne!(a, b);
        assert!(a.contains(&format!("@{}#", std::process::id())));
    }
}
