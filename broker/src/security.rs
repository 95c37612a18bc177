//! The broker's security, loaded once from its flags: TLS and the ACL file
//! on its port ([`ServerSecurity`]), and TLS and credentials on the
//! connections it opens itself (to nameservers, its master, the
//! controller). What each request needs is decided in
//! `handler/authorize.rs`.

use txmq_protocol::WireError;
use txmq_remoting::{Connection, ConnectionConfig, Credentials, Op, ServerSecurity, TlsClient};

use crate::config::SecurityConfig;

/// The broker's security settings with their files loaded: certificates,
/// keys and the ACL file ([`Security::load`], then
/// [`Broker::start_with`](crate::Broker::start_with)).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// TLS and the ACL file of the broker's port.
    pub(crate) server: ServerSecurity,
    /// TLS of the connections the broker opens (`--tls-ca` given).
    client_tls: Option<TlsClient>,
    /// The user those connections sign in as.
    credentials: Option<Credentials>,
}

impl Security {
    /// Reads the certificate, key, CA and ACL files the flags name.
    ///
    /// # Errors
    /// A file that cannot be used, named, with why: a bad setting.
    pub fn load(config: &SecurityConfig) -> Result<Security, String> {
        let server = ServerSecurity::load(
            &config.tls,
            config.tls_client_auth,
            config.acl_file.as_deref(),
        )?;
        let client_tls = txmq_remoting::tls::client_tls(&config.tls).map_err(|e| e.to_string())?;
        Ok(Security {
            server,
            client_tls,
            credentials: config.credentials.clone(),
        })
    }

    /// The same settings for the nameserver a standalone broker runs in
    /// its process: its port serves TLS and checks users as the broker's.
    pub(crate) fn cluster(&self) -> txmq_nameserver::ClusterSecurity {
        txmq_nameserver::ClusterSecurity {
            server: self.server.clone(),
            client_tls: self.client_tls.clone(),
            credentials: self.credentials.clone(),
        }
    }

    /// `base` with the broker's TLS and credentials, for a connection the
    /// broker opens.
    pub(crate) fn outgoing(&self, base: ConnectionConfig) -> ConnectionConfig {
        ConnectionConfig {
            tls: self.client_tls.clone(),
            credentials: self.credentials.clone(),
            ..base
        }
    }

    /// Checks `op` for the user `conn` signed in as; always allowed
    /// without an ACL file. A refusal is logged.
    ///
    /// # Errors
    /// `ACCESS_DENIED` naming the user, the operation and the resource.
    pub(crate) fn check(&self, conn: &Connection, op: Op<'_>) -> Result<(), WireError> {
        self.server.check(conn.user(), op)
    }

    /// Whether `conn`'s user may do `op` now, without logging a refusal:
    /// for choosing among connections (which producer gets a check-back).
    pub(crate) fn allows(&self, conn: &Connection, op: Op<'_>) -> bool {
        self.allows_user(conn.user(), op)
    }

    /// Whether `user` may do `op` now, without logging a refusal (a gRPC
    /// client's telemetry stream, say).
    pub(crate) fn allows_user(&self, user: Option<&str>, op: Op<'_>) -> bool {
        match &self.server.acl {
            None => true,
            Some(acl) => user.is_some_and(|u| acl.current().allows(u, op)),
        }
    }

    /// Whether an ACL file is in force.
    pub(crate) fn authenticates(&self) -> bool {
        self.server.authenticates()
    }
}
