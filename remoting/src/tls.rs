//! TLS for txmq connections (rustls): the server side an accepted socket
//! goes through before its hello, and the client side of
//! [`Connection::connect`](crate::Connection::connect).
//!
//! Servers present `--tls-cert`/`--tls-key` (PEM) and, with
//! `--tls-client-auth`, require a client certificate signed by
//! `--tls-ca`; under mutual TLS the certificate's common name is the
//! connection's identity (a user of the ACL file with that access key).
//! Clients verify the server against `--tls-ca` (the system's roots are
//! not consulted: a txmq cluster has its own CA) and present their own
//! certificate when they have one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

/// What a TLS setting failed on: a file that cannot be read or parsed, or
/// a certificate and key that do not belong together.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {message}")]
pub struct TlsSetupError {
    what: &'static str,
    path: String,
    message: String,
}

impl TlsSetupError {
    fn new(what: &'static str, path: &Path, message: impl ToString) -> TlsSetupError {
        TlsSetupError {
            what,
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// The PEM files of a TLS setting, as given on a command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// This side's private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA that signs the peers' certificates (PEM).
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsSetupError::new("certificate file", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::new("certificate file", path, e))?;
    if certs.is_empty() {
        return Err(TlsSetupError::new(
            "certificate file",
            path,
            "holds no PEM certificate",
        ));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsSetupError::new("private key file", path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsSetupError::new("CA file", path, e))?;
    }
    Ok(roots)
}

fn cert_and_key(
    files: &TlsFiles,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsSetupError> {
    match (&files.cert, &files.key) {
        (Some(c), Some(k)) => Ok(Some((certs(c)?, key(k)?))),
        (None, None) => Ok(None),
        (Some(c), None) => Err(TlsSetupError::new(
            "certificate file",
            c,
            "given without its private key (--tls-key)",
        )),
        (None, Some(k)) => Err(TlsSetupError::new(
            "private key file",
            k,
            "given without its certificate (--tls-cert)",
        )),
    }
}

/// A server's TLS: what accepted sockets are wrapped in.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    acceptor: tokio_rustls::TlsAcceptor,
    client_auth: bool,
}

/// A connection a [`TlsServer`] accepted.
pub type TlsServerStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// A server presenting `files.cert` and `files.key`. With
    /// `client_auth`, clients must present a certificate signed by
    /// `files.ca`; without it, a client certificate is still verified
    /// (and names the connection's user) when `files.ca` is given and the
    /// client offers one.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, a missing cert or key, a key
    /// that does not fit, or `client_auth` without a CA.
    pub fn from_files(files: &TlsFiles, client_auth: bool) -> Result<TlsServer, TlsSetupError> {
        let Some((chain, key)) = cert_and_key(files)? else {
            return Err(TlsSetupError::new(
                "certificate file",
                Path::new("(none)"),
                "a TLS server needs --tls-cert and --tls-key",
            ));
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::new("TLS settings", Path::new(""), e))?;
        let builder = match &files.ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
                let verifier = if client_auth {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| TlsSetupError::new("CA file", ca, e))?,
                )
            }
            None if client_auth => {
                return Err(TlsSetupError::new(
                    "CA file",
                    Path::new("(none)"),
                    "--tls-client-auth needs --tls-ca to verify client certificates",
                ))
            }
            None => builder.with_no_client_auth(),
        };
        let cert_path = files.cert.clone().unwrap_or_default();
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsSetupError::new("certificate file", &cert_path, e))?;
        let config = Arc::new(config);
        Ok(TlsServer {
            acceptor: tokio_rustls::TlsAcceptor::from(config.clone()),
            config,
            client_auth,
        })
    }

    /// The same server offering `protocols` in the handshake (ALPN, most
    /// preferred first): `h2` for gRPC, whose clients ask for it.
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> TlsServer {
        let mut config = (*self.config).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        TlsServer {
            acceptor: tokio_rustls::TlsAcceptor::from(config.clone()),
            config,
            client_auth: self.client_auth,
        }
    }

    /// Whether clients must present a certificate.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    pub(crate) async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsServerStream> {
        self.acceptor.accept(stream).await
    }
}

/// The client side of a process's TLS flags: TLS to servers when a CA
/// is given (`--tls-ca`), presenting `--tls-cert`/`--tls-key` if set.
///
/// # Errors
/// A file that cannot be used, named.
pub fn client_tls(files: &TlsFiles) -> Result<Option<TlsClient>, TlsSetupError> {
    match files.ca {
        Some(_) => TlsClient::from_files(files).map(Some),
        None => Ok(None),
    }
}

/// A client's TLS: how it verifies servers and what certificate it shows.
#[derive(Clone)]
pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    /// The name in this client's own certificate (`--tls-cert`), if it
    /// has one: who a server that signs users in by certificate takes it for.
    cert_name: Option<String>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// A client trusting servers signed by `files.ca` and presenting
    /// `files.cert`/`files.key` when given (for mutual TLS).
    ///
    /// # Errors
    /// A file that cannot be read or parsed, no CA, or a cert without a key.
    pub fn from_files(files: &TlsFiles) -> Result<TlsClient, TlsSetupError> {
        let Some(ca) = &files.ca else {
            return Err(TlsSetupError::new(
                "CA file",
                Path::new("(none)"),
                "a TLS client needs --tls-ca to verify servers",
            ));
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::new("TLS settings", Path::new(""), e))?
            .with_root_certificates(roots(ca)?);
        let pair = cert_and_key(files)?;
        let cert_name = pair
            .as_ref()
            .and_then(|(chain, _)| chain.first())
            .and_then(|c| certificate_name(c));
        let config = match pair {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsSetupError::new(
                    "certificate file",
                    files.cert.as_deref().unwrap_or(Path::new("")),
                    e,
                )
            })?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            cert_name,
        })
    }

    /// The name in this client's certificate, if it has one.
    pub fn cert_name(&self) -> Option<&str> {
        self.cert_name.as_deref()
    }

    /// The handshake with the server at `addr` (`host:port`), verifying
    /// its certificate for `host`. The error names the certificate problem.
    pub(crate) async fn connect(
        &self,
        addr: &str,
        stream: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let host = match addr.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("TLS: '{host}' is not a valid server name: {e}"))?;
        self.connector
            .connect(name, stream)
            .await
            .map_err(|e| with_hint(format!("TLS handshake failed: {e}")))
    }
}

/// `text` (a TLS failure in rustls's words) with what it means for the
/// user in parentheses, when that is known: for every client, the CLI's
/// and a broker's own connections alike.
pub(crate) fn with_hint(text: String) -> String {
    // An alert received is the server's complaint about what this client
    // sent: its own certificate, not the server's.
    if let Some(alert) = text.split("received fatal alert: ").nth(1) {
        let refused = "the server refused this client's certificate (--tls-cert)";
        let hint = match alert.split(|c: char| !c.is_alphanumeric()).next() {
            Some("CertificateRequired") => {
                "the server requires a client certificate: give --tls-cert and --tls-key".into()
            }
            Some("CertificateExpired") => format!("{refused}: it has expired"),
            Some("UnknownCA") => {
                format!("{refused}: it is not signed by a CA the server trusts")
            }
            Some(
                "BadCertificate"
                | "UnsupportedCertificate"
                | "CertificateUnknown"
                | "CertificateRevoked",
            ) => refused.to_string(),
            _ => return text,
        };
        return format!("{text} ({hint})");
    }
    let hints = [
        (
            "UnknownIssuer",
            "the server's certificate is not signed by the --tls-ca CA",
        ),
        ("expired", "the server's certificate has expired"),
        ("Expired", "the server's certificate has expired"),
        ("not valid yet", "the server's certificate is not valid yet"),
        ("NotValidYet", "the server's certificate is not valid yet"),
        (
            "NotValidForName",
            "the server's certificate does not name the address connected to",
        ),
        (
            "InvalidContentType",
            "the server does not speak TLS: leave out --tls-ca",
        ),
        (
            "corrupt message",
            "the server does not speak TLS: leave out --tls-ca",
        ),
        (
            "CaUsedAsEndEntity",
            "the server presents a CA's certificate as its own (a self-signed one, say): \
             give the server a certificate signed by the --tls-ca CA",
        ),
        (
            "handshake eof",
            "the server closed the connection during the handshake: it may not use TLS \
             (then leave out --tls-ca)",
        ),
    ];
    match hints.iter().find(|(words, _)| text.contains(words)) {
        Some((_, hint)) => format!("{text} ({hint})"),
        None => text,
    }
}

/// The name on the certificate a TLS client presented (mutual TLS), which
/// names its user: [`certificate_name`] of the first in its chain.
pub fn client_name(stream: &TlsServerStream) -> Option<String> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| certificate_name(c))
}

/// The common name of a DER certificate's subject, else its first DNS
/// subject alternative name.
pub(crate) fn certificate_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod hint_tests {
    use super::with_hint;

    #[test]
    fn tls_failures_say_what_is_wrong() {
        let failed = |why: &str| with_hint(format!("TLS handshake failed: {why}"));
        assert!(failed("invalid peer certificate: UnknownIssuer")
            .ends_with("(the server's certificate is not signed by the --tls-ca CA)"));
        assert!(
            failed("invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))")
                .contains("(the server presents a CA's certificate as its own")
        );
        assert!(failed("tls handshake eof").contains("it may not use TLS"));
        assert!(failed(
            "invalid peer certificate: certificate expired: verification time 1 (UNIX)"
        )
        .ends_with("(the server's certificate has expired)"));
        assert!(
            failed("received corrupt message of type InvalidContentType")
                .ends_with("(the server does not speak TLS: leave out --tls-ca)")
        );
        // A TLS alert that closed the connection during its hello.
        assert!(
            with_hint(": received fatal alert: CertificateRequired".into())
                .ends_with("give --tls-cert and --tls-key)")
        );
        // Alerts received are about this client's own certificate.
        assert!(
            with_hint(": received fatal alert: CertificateExpired".into()).ends_with(
                "(the server refused this client's certificate (--tls-cert): it has expired)"
            )
        );
        assert!(with_hint(": received fatal alert: UnknownCA".into())
            .ends_with("it is not signed by a CA the server trusts)"));
        assert!(with_hint(": received fatal alert: BadCertificate".into())
            .ends_with("(the server refused this client's certificate (--tls-cert))"));
        assert_eq!(
            with_hint("ACCESS_DENIED (55): no".into()),
            "ACCESS_DENIED (55): no"
        );
    }
}
