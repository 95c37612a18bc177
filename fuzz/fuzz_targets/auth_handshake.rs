//! Arbitrary bytes to a server with an ACL file in force, as one
//! connection's traffic: raw bytes, a hello then raw bytes, or a hello
//! then an `Authenticate` with an arbitrary access key and signature then
//! raw bytes. The server must not panic (libFuzzer's panic hook aborts,
//! also in the server's tasks), and must serve nothing to a peer that has
//! not proved a user's secret: no hello reaches the service, no request
//! is handled, and the only successful answer is the hello's challenge.
//!
//! Input: the first byte picks the shape (its value modulo 3), the rest
//! is the payload. Seeds: `fuzz/corpus/auth_handshake/`.
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    Authenticate, ErrorCode, Frame, FrameCodec, Hello, Request, Response, Role, WireError,
    PROTOCOL_VERSION,
};
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{AclStore, Connection, ConnectionConfig, ServerSecurity, Service};

const ACL: &str = r#"
[[user]]
access_key = "app"
secret_key = "app-secret"
topics = { "*" = ["pub", "sub"] }

[[user]]
access_key = "ops"
secret_key = "ops-secret"
admin = true
"#;

/// Access keys an `Authenticate` of the input may name.
const KEYS: [&str; 4] = ["app", "ops", "nobody", ""];

/// Hellos and requests that reached the service: must stay 0.
static SERVED: AtomicUsize = AtomicUsize::new(0);

/// A service that counts whatever reaches it.
struct Counting;

impl Service for Counting {
    fn hello(
        &self,
        _conn: &Connection,
        _hello: &Hello,
    ) -> Result<txmq_protocol::HelloOk, WireError> {
        SERVED.fetch_add(1, Ordering::SeqCst);
        Ok(txmq_protocol::HelloOk::new(PROTOCOL_VERSION, "fuzz"))
    }

    fn call(&self, _conn: &Connection, _request: Request) -> BoxFuture<Result<Response, WireError>> {
        SERVED.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(WireError::new(ErrorCode::Internal, "served")) })
    }
}

/// The runtime and the address of the server, started once.
fn server() -> &'static (tokio::runtime::Runtime, String) {
    static SERVER: OnceLock<(tokio::runtime::Runtime, String)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let acl_file = dir.join("acl.toml");
        std::fs::write(&acl_file, ACL).expect("write ACL file");
        let acl = AclStore::load(&acl_file).expect("ACL file loads");
        let addr = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("address").to_string();
            let config = ConnectionConfig {
                max_frame_len: 64 * 1024,
                hello_timeout: Duration::from_millis(200),
                ..ConnectionConfig::default()
            };
            let security = ServerSecurity {
                tls: None,
                acl: Some(acl),
            };
            tokio::spawn(txmq_remoting::server::serve_with(
                listener,
                Arc::new(Counting),
                config,
                security,
                tokio_util::sync::CancellationToken::new(),
            ));
            addr
        });
        (rt, addr)
    })
}

fn frame(id: u64, request: Request) -> BytesMut {
    let mut out = BytesMut::new();
    FrameCodec::new(1 << 20)
        .encode(&Frame::Request(id, request), &mut out)
        .expect("encode");
    out
}

fn hello() -> BytesMut {
    frame(
        1,
        Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Producer,
            client_id: "fuzz".into(),
            group: None,
        }),
    )
}

/// The bytes one connection sends for `data`.
fn traffic(data: &[u8]) -> BytesMut {
    let Some((&shape, payload)) = data.split_first() else {
        return BytesMut::new();
    };
    let mut out = BytesMut::new();
    match shape % 3 {
        0 => {}
        1 => out.extend_from_slice(&hello()),
        _ => {
            out.extend_from_slice(&hello());
            let key = KEYS[usize::from(payload.first().copied().unwrap_or(0)) % KEYS.len()];
            let len = usize::from(payload.get(1).copied().unwrap_or(0) % 64);
            let rest = payload.get(2..).unwrap_or_default();
            let (signature, rest) = rest.split_at(len.min(rest.len()));
            out.extend_from_slice(&frame(
                2,
                Request::Authenticate(Authenticate {
                    access_key: key.to_string(),
                    signature: signature.to_vec(),
                }),
            ));
            out.put_slice(rest);
            return out;
        }
    }
    out.put_slice(payload);
    out
}

/// Sends `bytes` on a new connection, closes the writing side, and reads
/// what the server answers until it closes (or a second passes).
async fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return Vec::new();
    };
    // The server may close before reading everything: a write error is fine.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer)).await;
    answer
}

/// Asserts that every answer in `bytes` is a refusal or the hello's
/// challenge.
fn assert_nothing_served(bytes: &[u8]) {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(decoded)) = codec.decode(&mut buf) {
        if let Decoded::Frame(Frame::Response(_, Ok(response))) = decoded {
            let challenged = matches!(
                &response,
                Response::Hello(ok) if ok.challenge.is_some()
            );
            assert!(challenged, "served without authentication: {response:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (rt, addr) = server();
    let answer = rt.block_on(exchange(addr, &traffic(data)));
    assert_nothing_served(&answer);
    assert_eq!(
        SERVED.load(Ordering::SeqCst),
        0,
        "the service saw a peer that did not authenticate"
    );
});
