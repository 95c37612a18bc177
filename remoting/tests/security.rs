//! TLS and authentication at the connection level: a server with TLS and
//! an ACL file, and clients with the right and the wrong settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use txmq_protocol::*;
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{
    server, AclStore, Connection, ConnectionConfig, Credentials, Error, ServerSecurity, Service,
    TlsClient, TlsFiles, TlsServer,
};

/// Answers pings, and a route request with its topic (any size); says the
/// connection's user in its hello answer.
struct Echo;

impl Service for Echo {
    fn hello(&self, conn: &Connection, _: &Hello) -> Result<HelloOk, WireError> {
        Ok(HelloOk::new(
            PROTOCOL_VERSION,
            conn.user().unwrap_or("-").to_string(),
        ))
    }
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(async move {
            match request {
                Request::Ping(_) => Ok(Response::Ping(Pong {})),
                Request::GetRoute(r) => Ok(Response::GetRoute(TopicRoute {
                    topic: r.topic,
                    brokers: vec![],
                })),
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "txmq test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `name` (its CN), valid for 127.0.0.1 and localhost.
    fn issue(&self, name: &str, expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

const ACL: &str = r#"
[[user]]
access_key = "app"
secret_key = "app-secret"
topics = { "orders.*" = ["pub"] }

[[user]]
access_key = "certified"
topics = { "*" = ["sub"] }
"#;

async fn start(security: ServerSecurity) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let token = CancellationToken::new();
    tokio::spawn(server::serve_with(
        listener,
        Arc::new(Echo),
        ConnectionConfig::default(),
        security,
        token.clone(),
    ));
    (addr, token)
}

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        role: Role::Admin,
        client_id: "security".into(),
        group: None,
    }
}

fn client(
    ca: &Path,
    cert: Option<(PathBuf, PathBuf)>,
    creds: Option<(&str, &str)>,
) -> ConnectionConfig {
    let (cert, key) = cert.map_or((None, None), |(c, k)| (Some(c), Some(k)));
    ConnectionConfig {
        tls: Some(
            TlsClient::from_files(&TlsFiles {
                cert,
                key,
                ca: Some(ca.to_path_buf()),
            })
            .unwrap(),
        ),
        credentials: creds.map(|(a, s)| Credentials {
            access_key: a.into(),
            secret_key: s.into(),
        }),
        request_timeout: Duration::from_secs(5),
        ..ConnectionConfig::default()
    }
}

/// Connects and pings: a connection that authenticated and is served.
async fn sign_in(addr: &str, config: ConnectionConfig) -> Result<(), Error> {
    let conn = Connection::connect(addr, hello(), None, config).await?;
    conn.call(Ping {}).await?;
    conn.close();
    Ok(())
}

#[tokio::test]
async fn tls_with_an_acl_file_authenticates_by_secret_or_certificate() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", false);
    let acl_path = pki.dir.path().join("acl.toml");
    std::fs::write(&acl_path, ACL).unwrap();
    let acl = AclStore::load(&acl_path).unwrap();
    let tls = TlsServer::from_files(
        &TlsFiles {
            cert: Some(cert),
            key: Some(key),
            ca: Some(pki.ca()),
        },
        false,
    )
    .unwrap();
    let (addr, token) = start(ServerSecurity {
        tls: Some(tls),
        acl: Some(acl.clone()),
    })
    .await;

    // The right secret.
    sign_in(&addr, client(&pki.ca(), None, Some(("app", "app-secret"))))
        .await
        .unwrap();
    // A wrong secret, an unknown key, no credentials at all.
    for creds in [Some(("app", "wrong")), Some(("nobody", "x")), None] {
        let e = sign_in(&addr, client(&pki.ca(), None, creds))
            .await
            .unwrap_err();
        match e {
            Error::Remote(w) => assert_eq!(w.code, ErrorCode::AuthenticationFailed, "{w}"),
            other => panic!("{other}"),
        }
    }
    // A client certificate whose name is a user needs no secret.
    let certified = pki.issue("certified", false);
    sign_in(&addr, client(&pki.ca(), Some(certified), None))
        .await
        .unwrap();

    // A user's permissions follow the file.
    assert!(acl
        .check(Some("app"), txmq_remoting::Op::Pub("orders.eu"))
        .is_ok());
    let denied = acl
        .check(Some("app"), txmq_remoting::Op::Pub("audit"))
        .unwrap_err();
    assert_eq!(denied.code, ErrorCode::AccessDenied);
    assert!(denied.message.contains("'app'") && denied.message.contains("audit"));
    token.cancel();
}

#[tokio::test]
async fn a_replayed_authentication_is_refused() {
    let pki = Pki::new();
    let acl_path = pki.dir.path().join("acl.toml");
    std::fs::write(&acl_path, ACL).unwrap();
    let (addr, token) = start(ServerSecurity {
        tls: None,
        acl: Some(AclStore::load(&acl_path).unwrap()),
    })
    .await;
    // A hello, its challenge and a signature recorded from one connection...
    let mut first = raw_hello(&addr).await;
    let challenge = first.1.clone();
    let signature = txmq_remoting::auth_signature("app-secret", &challenge, "app");
    assert_eq!(
        raw_authenticate(&mut first.0, signature.clone())
            .await
            .map(|_| ()),
        Ok(())
    );
    // ...replayed on another: its challenge differs, so it fails.
    let (mut second, other) = raw_hello(&addr).await;
    assert_ne!(other, challenge);
    let e = raw_authenticate(&mut second, signature).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthenticationFailed);
    token.cancel();
}

async fn raw_frame(s: &mut TcpStream, frame: Frame) -> Frame {
    use tokio_util::codec::{Decoder, Encoder};
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
    let mut buf = bytes::BytesMut::new();
    codec.encode(&frame, &mut buf).unwrap();
    s.write_all(&buf).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some(txmq_protocol::codec::Decoded::Frame(f)) = codec.decode(&mut buf).unwrap() {
            return f;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed");
    }
}

async fn raw_hello(addr: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    match raw_frame(&mut s, Frame::Request(1, Request::Hello(hello()))).await {
        Frame::Response(
            1,
            Ok(Response::Hello(HelloOk {
                challenge: Some(c), ..
            })),
        ) => (s, c),
        other => panic!("{other:?}"),
    }
}

async fn raw_authenticate(s: &mut TcpStream, signature: Vec<u8>) -> Result<Response, WireError> {
    let auth = Authenticate {
        access_key: "app".into(),
        signature,
    };
    match raw_frame(s, Frame::Request(2, Request::Authenticate(auth))).await {
        Frame::Response(2, r) => r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn tls_refuses_plaintext_a_wrong_ca_an_expired_certificate_and_no_client_certificate() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", false);
    let files = TlsFiles {
        cert: Some(cert),
        key: Some(key),
        ca: Some(pki.ca()),
    };
    let (addr, token) = start(ServerSecurity {
        tls: Some(TlsServer::from_files(&files, true).unwrap()),
        acl: None,
    })
    .await;

    // Plaintext to the TLS port: a clean close.
    let plain = ConnectionConfig {
        request_timeout: Duration::from_secs(3),
        ..ConnectionConfig::default()
    };
    let e = Connection::connect(&addr, hello(), None, plain)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Closed { .. } | Error::Connect { .. } | Error::Timeout { .. }
        ),
        "{e}"
    );

    // A client that trusts another CA names the problem.
    let other = Pki::new();
    let e = Connection::connect(
        &addr,
        hello(),
        None,
        client(&other.ca(), Some(pki.issue("c", false)), None),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("invalid peer certificate"), "{e}");

    // Mutual TLS without a client certificate: refused in the handshake
    // (under TLS 1.3 the client learns it at its first read).
    if let Ok(conn) = Connection::connect(&addr, hello(), None, client(&pki.ca(), None, None)).await
    {
        assert!(
            conn.call(Ping {}).await.is_err(),
            "served without a client certificate"
        );
    }

    // An expired server certificate.
    let (cert, key) = pki.issue("old", true);
    let (old_addr, old_token) = start(ServerSecurity {
        tls: Some(
            TlsServer::from_files(
                &TlsFiles {
                    cert: Some(cert),
                    key: Some(key),
                    ca: None,
                },
                false,
            )
            .unwrap(),
        ),
        acl: None,
    })
    .await;
    let e = Connection::connect(&old_addr, hello(), None, client(&pki.ca(), None, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate expired"), "{e}");

    // The right settings work.
    let ok = Connection::connect(
        &addr,
        hello(),
        None,
        client(&pki.ca(), Some(pki.issue("c2", false)), None),
    )
    .await
    .unwrap();
    ok.call(Ping {}).await.unwrap();
    token.cancel();
    old_token.cancel();
}

/// Many large requests and answers in flight at once over TLS: writes the
/// socket does not take at once (records left to flush, frames queued
/// behind them) all arrive, whole and in their own answers.
#[tokio::test]
async fn tls_carries_many_large_frames_in_flight_both_ways() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", false);
    let tls = TlsServer::from_files(
        &TlsFiles {
            cert: Some(cert),
            key: Some(key),
            ca: None,
        },
        false,
    )
    .unwrap();
    let (addr, token) = start(ServerSecurity {
        tls: Some(tls),
        acl: None,
    })
    .await;
    let conn = Connection::connect(&addr, hello(), None, client(&pki.ca(), None, None))
        .await
        .unwrap();
    let calls = (0..64u8).map(|i| {
        let conn = conn.clone();
        async move {
            // 4 KiB to 1 MiB, each filled with its own letter: frames
            // under TLS's buffer limit leave records to flush, larger ones
            // leave bytes queued.
            let len = [4 << 10, 16 << 10, 48 << 10, 256 << 10, 1 << 20][usize::from(i % 5)];
            let topic = char::from(b'a' + i % 26).to_string().repeat(len);
            let route = conn
                .call(GetRoute {
                    topic: topic.clone(),
                })
                .await
                .unwrap();
            assert!(route.topic == topic, "answer {i} differs from its request");
        }
    });
    futures_util::future::join_all(calls).await;
    conn.call(Ping {}).await.unwrap();
    conn.close();
    token.cancel();
}
