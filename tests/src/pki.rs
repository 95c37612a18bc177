//! Certificates and ACL files for the security tests: a CA made for the
//! test, certificates it signs (valid for 127.0.0.1 and localhost, or
//! expired), and ACL files, all in a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A test CA and the files it issued, removed with it.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name` (its common name).
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        Pki { dir, ca, ca_key }
    }

    /// The CA's certificate (PEM): what `--tls-ca` is given.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server's TLS flags: `--tls-cert`, `--tls-key` of `server`, and
    /// `--tls-ca` of this CA.
    pub fn server_flags(&self, server: &Issued) -> Vec<String> {
        let shown = |p: &Path| p.display().to_string();
        vec![
            "--tls-cert".into(),
            shown(&server.cert),
            "--tls-key".into(),
            shown(&server.key),
            "--tls-ca".into(),
            shown(&self.ca()),
        ]
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate with common name `name`, for 127.0.0.1 and localhost.
    pub fn issue(&self, name: &str) -> Issued {
        self.issue_with(name, false)
    }

    /// [`Pki::issue`], valid only in 2020 when `expired`.
    pub fn issue_with(&self, name: &str, expired: bool) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("certificate");
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }

    /// The CA's own certificate and key as a server's: what a server
    /// given a self-signed (CA) certificate presents.
    pub fn ca_as_server(&self) -> Issued {
        let issued = Issued {
            cert: self.ca(),
            key: self.dir.path().join("ca.key"),
        };
        std::fs::write(&issued.key, self.ca_key.serialize_pem()).expect("write CA key");
        issued
    }

    /// Writes an ACL file `name` with `text`; returns its path.
    pub fn acl(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write ACL file");
        path
    }
}
