//! How a nameserver is set up: where it listens and when a silent broker expires.

use std::time::Duration;

use txmq_controller::ControllerConfig;

use crate::Error;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9876";

/// The default broker expiry: 30 seconds without a heartbeat.
pub const DEFAULT_BROKER_EXPIRY: Duration = Duration::from_secs(30);

/// Settings of a [`Nameserver`](crate::Nameserver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameserverConfig {
    /// Address to listen on, `host:port` (default `127.0.0.1:9876`); port 0
    /// picks a free port, see [`Nameserver::local_addr`](crate::Nameserver::local_addr).
    pub listen: String,
    /// A broker not heard from for this long is dropped from every route
    /// (default 30 s).
    pub broker_expiry: Duration,
    /// The embedded controller member, if this nameserver runs one
    /// (`--controller-id` and friends); `None`: a plain nameserver.
    pub controller: Option<ControllerConfig>,
}

impl Default for NameserverConfig {
    fn default() -> Self {
        NameserverConfig {
            listen: DEFAULT_LISTEN.to_string(),
            broker_expiry: DEFAULT_BROKER_EXPIRY,
            controller: None,
        }
    }
}

impl NameserverConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the broker expiry is zero;
    /// [`Error::Controller`] when the controller's settings are invalid.
    pub fn validate(&self) -> Result<(), Error> {
        if self.broker_expiry.is_zero() {
            return Err(Error::InvalidConfig(
                "broker expiry must be greater than zero".into(),
            ));
        }
        if let Some(c) = &self.controller {
            c.validate()?;
        }
        Ok(())
    }

    /// How often the expiry scanner looks for silent brokers: a third of the
    /// expiry, at most once a second, at least every 10 ms.
    pub(crate) fn scan_interval(&self) -> Duration {
        (self.broker_expiry / 3).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = NameserverConfig::default();
        assert_eq!(c.listen, "127.0.0.1:9876");
        assert_eq!(c.broker_expiry, Duration::from_secs(30));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn scan_interval_follows_the_expiry_within_bounds() {
        let with = |ms| NameserverConfig {
            broker_expiry: Duration::from_millis(ms),
            ..NameserverConfig::default()
        };
        assert_eq!(with(30_000).scan_interval(), Duration::from_secs(1));
        assert_eq!(with(300).scan_interval(), Duration::from_millis(100));
        assert_eq!(with(1).scan_interval(), Duration::from_millis(10));
    }

    #[test]
    fn zero_expiry_is_refused() {
        let c = NameserverConfig {
            broker_expiry: Duration::ZERO,
            ..NameserverConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("broker expiry"), "{e}");
    }

    #[test]
    fn an_embedded_controller_is_validated_too() {
        let peers = txmq_controller::parse_peers("1=127.0.0.1:9878").unwrap();
        let c = NameserverConfig {
            controller: Some(ControllerConfig::new(
                2,
                "127.0.0.1:0",
                peers,
                "/tmp/unused",
            )),
            ..NameserverConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("--controller-id 2"), "{e}");
    }
}
