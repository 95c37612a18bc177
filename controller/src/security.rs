//! The security of a cluster process (a nameserver and its controller
//! member): TLS and the ACL file on what it serves, TLS and credentials on
//! the connections it opens, and the permission each request needs.
//!
//! The flags are the same on every txmq server (`--tls-cert`, `--tls-key`,
//! `--tls-ca`, `--tls-client-auth`, `--acl-file`, `--access-key`,
//! `--secret-key`); [`ClusterSecurity::load`] turns them into what the
//! listeners and the outgoing connections use.

use std::path::Path;

use txmq_protocol::WireError;
use txmq_remoting::tls::client_tls;
use txmq_remoting::{Credentials, Op, ServerSecurity, TlsClient, TlsFiles};

/// How a cluster process serves and how it connects to its peers.
/// The default is today's: plaintext, no authentication, everything allowed.
#[derive(Debug, Clone, Default)]
pub struct ClusterSecurity {
    /// TLS and the ACL file of every listener of the process.
    pub server: ServerSecurity,
    /// TLS of the connections the process opens (to other controller
    /// members); `None`: plaintext.
    pub client_tls: Option<TlsClient>,
    /// Who the process signs in as on the connections it opens; a server
    /// with an ACL file needs a user with `broker = true` here.
    pub credentials: Option<Credentials>,
}

impl ClusterSecurity {
    /// The security the flags ask for: TLS on the listeners when `files`
    /// has a cert and key (client certificates required with
    /// `client_auth`), the ACL file at `acl_file`, TLS to peers when
    /// `files` has a CA, and `credentials` to sign in to them.
    ///
    /// # Errors
    /// A TLS file or the ACL file that cannot be used, named.
    pub fn load(
        files: &TlsFiles,
        client_auth: bool,
        acl_file: Option<&Path>,
        credentials: Option<Credentials>,
    ) -> Result<ClusterSecurity, String> {
        Ok(ClusterSecurity {
            server: ServerSecurity::load(files, client_auth, acl_file)?,
            client_tls: client_tls(files).map_err(|e| e.to_string())?,
            credentials,
        })
    }

    /// Checks that the connection's `user` may do what `request` needs.
    ///
    /// # Errors
    /// `ACCESS_DENIED` naming the user and the operation (logged).
    pub fn check(&self, user: Option<&str>, needed: &Permission) -> Result<(), WireError> {
        self.server.check(user, needed.op())
    }
}

/// The permission a request needs, with what it does on which resource
/// (for the refusal's message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Any authenticated user: reading routes and metadata.
    Authenticated,
    /// A cluster member (`broker = true`) or an admin.
    Cluster(String),
    /// An admin.
    Admin(String),
}

impl Permission {
    /// The ACL operation this permission is checked as.
    pub fn op(&self) -> Op<'_> {
        match self {
            Permission::Authenticated => Op::Authenticated,
            Permission::Cluster(what) => Op::Cluster(what),
            Permission::Admin(what) => Op::Admin(what),
        }
    }
}
