//! Bad input: every malformed frame closes only the connection it came on
//! (answered with an error first when its request id was readable), while
//! the broker keeps serving the clients connected before and after; bad
//! arguments get an error response with a code and a message; bad settings
//! and environments (a corrupt config file, an unusable data dir, a taken
//! port, a missing nameserver) are a clear message and a non-zero exit, or
//! a warning while the broker keeps going. The README's "Bad input and what
//! you see" lists every case with the test that tries it.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};
use txmq::{ErrorCode, Message, PullConsumer, PERM_READ, PERM_READ_WRITE, PERM_WRITE};
use txmq_broker::{BrokerConfig, FlushMode};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    CommitOffset, CreateTopic, EndTransaction, Frame, FrameCodec, HalfMessage, Heartbeat, Hello,
    Ping, PrepareTransaction, PullRequest, QueryOffset, Request, Response, Role, SendRequest,
    TxAction, TxSource, WireError, DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use txmq_remoting::{Connection, ConnectionConfig};
use txmq_tests::{consume_all, Cluster};

/// How long the broker may take to close a bad connection.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn hello(version: u32) -> Hello {
    Hello {
        version,
        role: Role::Producer,
        client_id: "bad-input-test".into(),
        group: None,
    }
}

/// A connection through the client library, greeted with `version`.
async fn connect(addr: &str, version: u32) -> Result<Connection, txmq_remoting::Error> {
    Connection::connect(addr, hello(version), None, ConnectionConfig::default()).await
}

/// A frame as the real codec puts it on the wire.
fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(frame, &mut buf)
        .expect("frame encodes");
    buf.to_vec()
}

/// Request `id`: a send of one message with `body` to the `survivors`
/// topic, encoded.
fn encoded_send(id: u64, body: &str) -> Vec<u8> {
    let send = SendRequest {
        producer: None,
        queue: 0,
        messages: vec![txmq::WireMessage::new("survivors", body.to_string())],
    };
    encode(&Frame::Request(id, Request::Send(send)))
}

/// `body` behind a correct 4-byte big-endian length prefix.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(body.len())
        .expect("short body")
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// A hand-made MessagePack frame body, in the layout rmp-serde gives the
/// real types (enums as one-entry maps, tuple variants as arrays).
fn msgpack(value: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("msgpack encodes")
}

/// A raw TCP connection to a broker that speaks the framing by hand.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the broker");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connected and greeted with a valid hello, whose answer is checked.
    async fn greeted(addr: SocketAddr) -> Raw {
        Raw::greeted_by(addr, "broker-a").await
    }

    /// [`Raw::greeted`] by the broker named `server`.
    async fn greeted_by(addr: SocketAddr, server: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.write(&encode(&Frame::Request(
            1,
            Request::Hello(hello(PROTOCOL_VERSION)),
        )))
        .await;
        match raw.next_frame().await {
            Some(Frame::Response(1, Ok(Response::Hello(ok)))) => {
                assert_eq!(ok.version, PROTOCOL_VERSION);
                assert_eq!(ok.server, server);
            }
            other => panic!("expected the hello's answer, got {other:?}"),
        }
        raw
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("write to the broker");
    }

    /// The next frame the broker sends; `None` when it closes first.
    async fn next_frame(&mut self) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
        loop {
            if let Some(frame) = decode_one(&mut self.buf) {
                return Some(frame);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .expect("the broker answers within 5 s");
            match n {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Reads until the broker closes the connection and asserts that it
    /// refused request `id` with `code` first (see [`assert_refused`]).
    async fn refused(self, id: u64, code: ErrorCode) {
        assert_refused(&self.frames_until_closed().await, id, code);
    }

    /// Reads until the broker closes the connection (panicking when it is
    /// still open after [`CLOSE_WITHIN`]); returns the frames it sent first.
    async fn frames_until_closed(mut self) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
        loop {
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| {
                    panic!("the bad connection is still open after {CLOSE_WITHIN:?}")
                });
            match n {
                Ok(0) => break,
                Ok(_) => {}
                // A close with unread input resets the connection: closed too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read failed: {e}"),
            }
        }
        let mut frames = Vec::new();
        while let Some(frame) = decode_one(&mut self.buf) {
            frames.push(frame);
        }
        assert!(
            self.buf.is_empty(),
            "the broker sent a partial frame: {:?}",
            self.buf
        );
        frames
    }
}

fn decode_one(buf: &mut BytesMut) -> Option<Frame> {
    match FrameCodec::default()
        .decode(buf)
        .expect("the broker sends valid frames")
    {
        None => None,
        Some(Decoded::Frame(frame)) => Some(frame),
        Some(other) => panic!("the broker sent a malformed frame: {other:?}"),
    }
}

/// The error answers among `frames`, as (request id, error).
fn errors(frames: &[Frame]) -> Vec<(u64, WireError)> {
    frames
        .iter()
        .map(|f| match f {
            Frame::Response(id, Err(e)) => (*id, e.clone()),
            other => panic!("expected only error answers, got {other:?}"),
        })
        .collect()
}

/// Asserts that the broker answered request `id` with exactly one error of
/// `code` (with a message) before closing.
fn assert_refused(frames: &[Frame], id: u64, code: ErrorCode) {
    let errors = errors(frames);
    assert_eq!(
        errors.len(),
        1,
        "one error answer before the close: {frames:?}"
    );
    let (got_id, e) = &errors[0];
    assert_eq!(*got_id, id, "the answer carries the request's id");
    assert_eq!(e.code, code, "{e}");
    assert!(!e.message.is_empty(), "the error says what went wrong");
}

fn bodies(messages: &[txmq::ReceivedMessage]) -> Vec<String> {
    let mut b: Vec<String> = messages.iter().map(common::body_text).collect();
    b.sort();
    b
}

/// Polls `consumer` until `n` messages came (10 s at most).
async fn receive(consumer: &mut PullConsumer, n: usize) -> Vec<txmq::ReceivedMessage> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived",
            got.len()
        );
        got.extend(
            consumer
                .poll_at_most(n - got.len(), Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    got
}

/// Starts a cluster whose clients are busy before `bad` runs against the
/// broker's address, then checks that the clients connected before (a
/// producer, a consumer with a long poll in flight, a plain connection) and
/// a fresh producer and consumer still work.
async fn broker_survives<F, Fut>(bad: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: Future<Output = ()>,
{
    broker_survives_with(|_| {}, bad).await;
}

/// [`broker_survives`] with the broker's settings adjusted by `tweak`.
async fn broker_survives_with<F, Fut>(tweak: impl FnOnce(&mut BrokerConfig), bad: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: Future<Output = ()>,
{
    let cluster = Cluster::start_with(|cfg| {
        cfg.flush = FlushMode::Async;
        tweak(cfg);
    })
    .await;
    let addr = cluster.brokers[0].local_addr();
    let topic = "survivors";
    common::create_topic(&cluster.nameserver, topic, 2).await;
    let producer = cluster.producer().await;
    let mut consumer = PullConsumer::builder()
        .nameserver(&cluster.nameserver)
        .group("before")
        .topic(topic)
        .build()
        .await
        .unwrap();
    producer.send(Message::new(topic, "before")).await.unwrap();
    assert_eq!(bodies(&receive(&mut consumer, 1).await), ["before"]);
    let bystander = connect(&addr.to_string(), PROTOCOL_VERSION)
        .await
        .expect("a plain connection says hello");

    bad(addr).await;

    // The connection opened before is still the same, open connection.
    assert!(!bystander.is_closed(), "an unrelated connection was closed");
    bystander
        .call(Ping {})
        .await
        .expect("the unrelated connection still answers");
    // The producer and the consumer (whose long poll was waiting) go on.
    producer.send(Message::new(topic, "after")).await.unwrap();
    assert_eq!(bodies(&receive(&mut consumer, 1).await), ["after"]);
    consumer.shutdown().await.unwrap();
    // And new clients are served.
    let fresh = cluster.producer().await;
    fresh.send(Message::new(topic, "fresh")).await.unwrap();
    let all = consume_all(
        &cluster.nameserver,
        "fresh",
        topic,
        3,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(bodies(&all), ["after", "before", "fresh"]);
    bystander.close();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_prefix_closes_only_that_connection() {
    broker_survives(|addr| async move {
        let mut raw = Raw::greeted(addr).await;
        // One byte over the 8 MiB maximum, its body not a request's:
        // refused from its first byte, the body never read. (The prefix
        // alone waits for that byte, as a read cut there would.)
        let len = u32::try_from(DEFAULT_MAX_FRAME_LEN + 1).unwrap();
        raw.write(&len.to_be_bytes()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw.write(b"x").await;
        let frames = raw.frames_until_closed().await;
        assert!(frames.is_empty(), "no request id to answer: {frames:?}");

        // The same before the hello, with the largest length there is.
        let mut raw = Raw::connect(addr).await;
        raw.write(&[&u32::MAX.to_be_bytes()[..], b"GET"].concat())
            .await;
        assert!(raw.frames_until_closed().await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_only_that_connection() {
    broker_survives(|addr| async move {
        // A well-framed body that is not MessagePack at all (0xc1 is never used).
        let mut raw = Raw::greeted(addr).await;
        raw.write(&framed(&[0xc1; 16])).await;
        assert!(raw.frames_until_closed().await.is_empty());

        // An empty body.
        let mut raw = Raw::greeted(addr).await;
        raw.write(&framed(&[])).await;
        assert!(raw.frames_until_closed().await.is_empty());

        // Valid MessagePack that is not a frame.
        let mut raw = Raw::greeted(addr).await;
        raw.write(&framed(&msgpack(&json!(["not", "a", "frame"]))))
            .await;
        assert!(raw.frames_until_closed().await.is_empty());

        // Another protocol altogether: an HTTP request instead of a hello.
        let mut raw = Raw::connect(addr).await;
        raw.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        assert!(raw.frames_until_closed().await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_cut_off_by_the_peer_closing_closes_only_that_connection() {
    broker_survives(|addr| async move {
        let whole = encoded_send(2, "never stored");
        let mut raw = Raw::greeted(addr).await;
        raw.write(&whole[..whole.len() / 2]).await;
        // The peer goes away mid-frame.
        raw.stream.shutdown().await.expect("half-close");
        assert!(raw.frames_until_closed().await.is_empty());

        // Cut off inside the length prefix.
        let mut raw = Raw::greeted(addr).await;
        raw.write(&whole[..2]).await;
        raw.stream.shutdown().await.expect("half-close");
        assert!(raw.frames_until_closed().await.is_empty());
    })
    .await;
}

/// A frame begun and never finished, or trickled a byte at a time, closes
/// its connection within twice `--frame-timeout`: half-sent frames cannot
/// hold the broker's memory for good. A frame that finishes within the
/// timeout, however slowly, is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_stalled_mid_way_closes_only_that_connection_after_the_frame_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(400);
    broker_survives_with(
        |cfg| cfg.frame_timeout = TIMEOUT,
        |addr| async move {
            // A send's first half, then nothing.
            let whole = encoded_send(2, "never finished");
            let mut raw = Raw::greeted(addr).await;
            let began = Instant::now();
            raw.write(&whole[..whole.len() / 2]).await;
            assert!(raw.frames_until_closed().await.is_empty());
            let took = began.elapsed();
            assert!(
                took >= TIMEOUT && took < 2 * TIMEOUT + Duration::from_millis(600),
                "closed after {took:?}"
            );

            // A frame announced as 1 MiB, trickled a byte every 50 ms.
            let mut raw = Raw::greeted(addr).await;
            raw.write(&(1u32 << 20).to_be_bytes()).await;
            let began = Instant::now();
            let closed_after = loop {
                assert!(
                    began.elapsed() < Duration::from_secs(5),
                    "a trickled frame kept its connection open"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                if raw.stream.write_all(b"x").await.is_err() {
                    break began.elapsed();
                }
            };
            assert!(closed_after >= TIMEOUT, "closed after {closed_after:?}");

            // Slow but within the timeout: served.
            let mut raw = Raw::greeted(addr).await;
            let whole = encode(&Frame::Request(3, Request::Ping(Ping {})));
            raw.write(&whole[..whole.len() / 2]).await;
            tokio::time::sleep(TIMEOUT / 4).await;
            raw.write(&whole[whole.len() / 2..]).await;
            match raw.next_frame().await {
                Some(Frame::Response(3, result)) => {
                    result.expect("a slow frame within the timeout is answered");
                }
                other => panic!("expected the ping's answer, got {other:?}"),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_messagepack_body_closes_only_that_connection() {
    broker_survives(|addr| async move {
        let whole = encoded_send(2, "never stored");
        // The length prefix matches the bytes sent, but the MessagePack
        // inside ends half way through the message.
        let body = &whole[4..4 + (whole.len() - 4) / 2];
        let mut raw = Raw::greeted(addr).await;
        raw.write(&framed(body)).await;
        let frames = raw.frames_until_closed().await;
        // Whether or not the id was still readable, anything sent back is a
        // refusal of request 2.
        for (id, e) in errors(&frames) {
            assert_eq!((id, e.code), (2, ErrorCode::MalformedRequest), "{e}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrongly_typed_request_is_refused_and_closes_only_that_connection() {
    broker_survives(|addr| async move {
        // A send whose queue is a string and whose messages are a number.
        let mut raw = Raw::greeted(addr).await;
        let body = msgpack(&json!({"Request": [7, {"Send": {"queue": "zero", "messages": 5}}]}));
        raw.write(&framed(&body)).await;
        raw.refused(7, ErrorCode::MalformedRequest).await;

        // A hello whose fields have the wrong types, as the first request.
        let mut raw = Raw::connect(addr).await;
        let body = msgpack(&json!({"Request": [3, {"Hello": {"version": "one", "role": 5}}]}));
        raw.write(&framed(&body)).await;
        raw.refused(3, ErrorCode::MalformedRequest).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_request_kind_is_refused_and_closes_only_that_connection() {
    broker_survives(|addr| async move {
        let mut raw = Raw::greeted(addr).await;
        let body = msgpack(&json!({"Request": [9, {"Frobnicate": {"how": "hard"}}]}));
        raw.write(&framed(&body)).await;
        raw.refused(9, ErrorCode::MalformedRequest).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_that_is_not_a_hello_is_refused_and_closed() {
    broker_survives(|addr| async move {
        let mut raw = Raw::connect(addr).await;
        raw.write(&encode(&Frame::Request(5, Request::Ping(Ping {}))))
            .await;
        raw.refused(5, ErrorCode::HelloRequired).await;

        // A send, too, is refused rather than stored.
        let mut raw = Raw::connect(addr).await;
        raw.write(&encoded_send(6, "sneaked in")).await;
        raw.refused(6, ErrorCode::HelloRequired).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_another_protocol_version_is_refused_with_unsupported_version() {
    broker_survives(|addr| async move {
        let mut raw = Raw::connect(addr).await;
        let newer = hello(PROTOCOL_VERSION + 1);
        raw.write(&encode(&Frame::Request(1, Request::Hello(newer))))
            .await;
        let frames = raw.frames_until_closed().await;
        assert_refused(&frames, 1, ErrorCode::UnsupportedVersion);
        let (_, e) = &errors(&frames)[0];
        assert!(
            e.message.contains(&(PROTOCOL_VERSION + 1).to_string()),
            "the message names the version: {e}"
        );

        // The client library reports the same refusal.
        let e = connect(&addr.to_string(), 0)
            .await
            .expect_err("version 0 is refused");
        assert_eq!(
            e.remote().map(|w| w.code),
            Some(ErrorCode::UnsupportedVersion),
            "{e}"
        );
    })
    .await;
}

/// A request with a bad argument is answered with an error, and the
/// connection it came on stays open and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_get_an_error_answer_and_the_connection_stays_open() {
    let cluster = Cluster::start(FlushMode::Async).await;
    cluster
        .admin()
        .await
        .create_topic("orders", 2, PERM_READ_WRITE, None)
        .await
        .unwrap();
    let addr = cluster.brokers[0].local_addr().to_string();
    let conn = connect(&addr, PROTOCOL_VERSION).await.unwrap();
    let refusal = |r: Result<_, txmq_remoting::Error>| -> WireError {
        match r {
            Err(txmq_remoting::Error::Remote(e)) => e,
            Err(other) => panic!("expected an error answer, got {other}"),
            Ok(_) => panic!("expected an error answer, got success"),
        }
    };
    let send = |topic: &str, queue: u32| SendRequest {
        producer: None,
        queue,
        messages: vec![txmq::WireMessage::new(topic, "x")],
    };

    // The broker checks names itself (the client library is bypassed here).
    for topic in ["", "a/b", &"x".repeat(200)] {
        let e = refusal(conn.call(send(topic, 0)).await.map(|_| ()));
        assert_eq!(e.code, ErrorCode::BadArgument, "{e}");
        assert!(e.message.contains("topic name"), "{e}");
    }
    let e = refusal(
        conn.call(SendRequest {
            producer: None,
            queue: 0,
            messages: vec![],
        })
        .await
        .map(|_| ()),
    );
    assert_eq!(e.code, ErrorCode::BadArgument, "{e}");
    let e = refusal(conn.call(send("orders", 99)).await.map(|_| ()));
    assert_eq!(e.code, ErrorCode::UnknownQueue, "{e}");
    assert!(e.message.contains("99"), "{e}");
    let pull = |topic: &str, max_messages| PullRequest {
        topic: topic.into(),
        queue: 0,
        offset: 0,
        max_messages,
        max_wait_ms: 0,
        tag_filter: Vec::new(),
        owner: None,
        epoch: 0,
        after: None,
        browse: false,
    };
    let e = refusal(conn.call(pull("orders", 0)).await.map(|_| ()));
    assert_eq!(e.code, ErrorCode::BadArgument, "{e}");
    let e = refusal(conn.call(pull("nowhere", 1)).await.map(|_| ()));
    assert_eq!(e.code, ErrorCode::UnknownTopic, "{e}");
    assert!(e.message.contains("nowhere"), "{e}");

    // Still the same connection, and it still works.
    assert!(!conn.is_closed());
    let stored = conn
        .call(send("orders", 1))
        .await
        .expect("a good send after bad ones");
    assert_eq!((stored.queue, stored.first_offset), (1, 0));
    conn.close();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_broker_logs_a_warning_for_a_bad_connection_and_keeps_serving() {
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start_broker(
        &dir.path().join("data"),
        &cluster.nameserver,
        "broker-p",
        &["--frame-timeout", "300ms"],
    )
    .await;
    let addr: SocketAddr = broker.addr.parse().unwrap();

    // A frame begun and left: closed by --frame-timeout, with a warning.
    let mut stalled = Raw::greeted_by(addr, "broker-p").await;
    stalled.write(&encoded_send(2, "half")[..10]).await;
    assert!(stalled.frames_until_closed().await.is_empty());

    let mut garbage = Raw::connect(addr).await;
    garbage.write(&framed(&[0xc1; 8])).await;
    assert!(garbage.frames_until_closed().await.is_empty());
    let mut typed = Raw::connect(addr).await;
    typed
        .write(&framed(&msgpack(
            &json!({"Request": [4, {"Send": {"queue": []}}]}),
        )))
        .await;
    typed.refused(4, ErrorCode::MalformedRequest).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    let warnings = loop {
        let log = broker.log_text();
        let warnings: Vec<String> = log
            .lines()
            .filter(|l| l.contains("WARN"))
            .map(String::from)
            .collect();
        let bad_frame = warnings
            .iter()
            .any(|l| l.contains("bad frame") || l.contains("garbage"));
        let malformed = warnings.iter().any(|l| l.contains("malformed"));
        let stalled = warnings
            .iter()
            .any(|l| l.contains("did not finish within the frame timeout"));
        if bad_frame && malformed && stalled {
            break warnings;
        }
        assert!(
            Instant::now() < deadline,
            "no warning for the bad connections in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        warnings.iter().any(|l| l.contains("peer=127.0.0.1:")),
        "the warning names the peer: {warnings:?}"
    );
    assert!(
        !broker.log_text().contains("panicked"),
        "{}",
        broker.log_text()
    );

    let producer = cluster.producer().await;
    let receipt = producer
        .send(Message::new("after-garbage", "still here"))
        .await
        .unwrap();
    assert_eq!(receipt.broker_name, "broker-p");
    let got = consume_all(
        &cluster.nameserver,
        "g",
        "after-garbage",
        1,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(bodies(&got), ["still here"]);
    producer.close().await.unwrap();
    drop(broker);
    cluster.shutdown().await;
}

/// A flood of connections refused or failing the same way (past
/// `--max-connections`, garbage for a first frame) writes one `WARN` line
/// of each kind, the rest at `DEBUG`: anyone who can connect cannot fill
/// the log. The connection within the limit is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_connections_writes_one_warning_of_each_kind() {
    const FLOOD: usize = 20;
    let cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start_broker(
        &dir.path().join("data"),
        &cluster.nameserver,
        "broker-f",
        &[
            "--max-connections",
            "1",
            "--log-level",
            "info,txmq_broker::handler=debug,txmq_remoting::connection=debug",
        ],
    )
    .await;
    let held = connect(&broker.addr, PROTOCOL_VERSION)
        .await
        .expect("within the limit");
    let addr: SocketAddr = broker.addr.parse().unwrap();
    for _ in 0..FLOOD {
        let refused = connect(&broker.addr, PROTOCOL_VERSION)
            .await
            .expect_err("past the limit");
        let code = refused.remote().map(|e| e.code);
        assert_eq!(code, Some(ErrorCode::TooManyConnections), "{refused}");
        let mut garbage = Raw::connect(addr).await;
        garbage.write(&framed(&[0xc1; 8])).await;
        assert!(garbage.frames_until_closed().await.is_empty());
    }
    let stats = held.call(txmq_protocol::GetStoreStats {}).await;
    assert!(stats.is_ok(), "served throughout: {stats:?}");

    let refusal = "connection refused: --max-connections reached";
    let garbage = |l: &str| l.contains("bad frame") || l.contains("first frame is not a request");
    let count = |log: &str, level: &str, is: &dyn Fn(&str) -> bool| {
        log.lines().filter(|l| l.contains(level) && is(l)).count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = broker.log_text();
        let refused = |l: &str| l.contains(refusal);
        let seen = (
            count(&log, "WARN", &refused),
            count(&log, "DEBUG", &refused),
            count(&log, "WARN", &garbage),
            count(&log, "DEBUG", &garbage),
        );
        if seen == (1, FLOOD - 1, 1, FLOOD - 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "want one WARN of each kind and the rest at DEBUG, got {seen:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.close();
    drop(broker);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_a_missing_topic_without_auto_create_fails_with_its_code() {
    let cluster = Cluster::start_with(|c| c.auto_create_topics = false).await;
    let producer = cluster.producer().await;
    let e = producer
        .send(Message::new("ghost", "nobody home"))
        .await
        .expect_err("no topic, no auto-creation");
    let code = e.code();
    assert!(
        matches!(code, Some(ErrorCode::UnknownTopic | ErrorCode::NoRoute)),
        "code {code:?}: {e}"
    );
    let text = error_chain(&e);
    assert!(text.contains("ghost"), "the error names the topic: {text}");
    // Nothing was created on the way.
    let route = cluster.admin().await.route("ghost").await;
    assert_eq!(route.err().and_then(|e| e.code()), Some(ErrorCode::NoRoute));
    // Once the topic exists the same producer sends to it.
    cluster
        .admin()
        .await
        .create_topic("ghost", 1, PERM_READ_WRITE, None)
        .await
        .unwrap();
    producer
        .send(Message::new("ghost", "now home"))
        .await
        .unwrap();
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// An error with all its causes, as a person would read it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topic_names_are_bad_arguments() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let producer = cluster.producer().await;
    let admin = cluster.admin().await;
    let long = "t".repeat(200);
    for name in ["", "a/b", "with space", long.as_str()] {
        let e = producer
            .send(Message::new(name, "x"))
            .await
            .expect_err("invalid name");
        assert_eq!(
            e.code(),
            Some(ErrorCode::BadArgument),
            "send to {name:?}: {e}"
        );
        // The broker refuses to create it too.
        let e = admin
            .create_topic(name, 1, PERM_READ_WRITE, None)
            .await
            .expect_err("invalid name");
        assert_eq!(
            e.code(),
            Some(ErrorCode::BadArgument),
            "create {name:?}: {}",
            error_chain(&e)
        );
        let e = PullConsumer::builder()
            .nameserver(&cluster.nameserver)
            .group("g")
            .topic(name)
            .build()
            .await
            .expect_err("invalid name");
        assert_eq!(
            e.code(),
            Some(ErrorCode::BadArgument),
            "consume {name:?}: {e}"
        );
    }
    // 127 characters is the longest name allowed.
    let longest = "t".repeat(127);
    producer
        .send(Message::new(longest.as_str(), "x"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let topics = loop {
        let topics = admin.list_topics().await.unwrap();
        if topics.iter().any(|t| t.config.name == longest) {
            break topics;
        }
        assert!(
            Instant::now() < deadline,
            "the valid topic never showed up: {topics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        topics.iter().all(|t| t.config.name == longest),
        "only the valid topic exists: {topics:?}"
    );
    producer.close().await.unwrap();
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

/// A consumer group joined by a clustering member follows the topic
/// names' rule (its retry topic holds its name), so a name no such
/// consumer could use is refused at once, saying why. Other requests (a
/// producer group, a pull consumer's offsets, group show) take any name
/// of 1 to 255 bytes, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_group_names_are_bad_arguments() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let addr = cluster.brokers[0].local_addr().to_string();
    let conn = connect(&addr, PROTOCOL_VERSION).await.unwrap();
    let long = "g".repeat(121);
    let heartbeat = |group: &str| Heartbeat {
        group: group.into(),
        client_id: "c1".into(),
        subscriptions: vec![],
        broadcast: false,
        held: vec![],
    };
    for (group, says) in [
        ("bad group", "contains ' '"),
        ("a/b", "contains '/'"),
        ("evil\"} 1", "contains '\"'"),
        (long.as_str(), "at most 120"),
    ] {
        let e = conn.call(heartbeat(group)).await.expect_err("a bad group");
        let e = e.remote().expect("an error answer").clone();
        assert_eq!(e.code, ErrorCode::BadArgument, "{group:?}: {e}");
        assert!(e.message.contains(says), "{group:?}: {e}");
    }
    // The longest consumer group name is taken.
    let longest = "g".repeat(120);
    conn.call(heartbeat(&longest))
        .await
        .expect("the longest name");
    // A broadcasting member makes no retry topic: any name, as before; so
    // does a producer group (a prepare of nothing fails for that only).
    let mut broadcast = heartbeat("svc/orders");
    broadcast.broadcast = true;
    conn.call(broadcast)
        .await
        .expect("a broadcast group of any name");
    let e = conn
        .call(PrepareTransaction {
            producer_group: "svc/orders".into(),
            messages: vec![],
            first_check_delay_ms: None,
            attempt: None,
            producer: None,
            offsets: vec![],
        })
        .await
        .expect_err("no messages");
    let e = e.remote().expect("an error answer").clone();
    assert!(e.message.contains("messages"), "{e}");
    // A push consumer of the group says so when it starts, naming the group
    // (it said "topic name \"%RETRY%bad group\" ..."), and so does a group
    // named like a retry or dead-letter topic.
    for (group, says) in [
        ("bad group", "group name \"bad group\" contains ' '"),
        ("%RETRY%g", "starts with %RETRY%"),
        ("%DLQ%g", "starts with %DLQ%"),
    ] {
        let e = txmq::PushConsumer::builder()
            .nameserver(&cluster.nameserver)
            .group(group)
            .subscribe("t", "*")
            .start(txmq::handler_fn(|_: &txmq::ReceivedMessage| async {
                txmq::ConsumeResult::Success
            }))
            .await
            .expect_err("a bad group");
        assert!(
            matches!(&e, txmq::Error::BadArgument(m) if m.contains(says)),
            "{group:?}: {e}"
        );
    }
    // The CLI says so before connecting, naming the flag.
    for args in [
        &["consume", "t", "--group", "bad group"][..],
        &["bench", "consume", "t", "--group", "a/b"],
    ] {
        let out = common::txmq(&cluster.nameserver, args, None).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--group") && err.contains("allowed are"),
            "{args:?}: {err}"
        );
    }
    // A broadcasting member's group may be any name, from the CLI too (it
    // refused one before knowing it broadcasts).
    let out = common::txmq(
        &cluster.nameserver,
        &[
            "consume",
            "t",
            "--group",
            "bad group",
            "--broadcast",
            "--idle-timeout",
            "500ms",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    conn.close();
    cluster.shutdown().await;
}

/// Settings no clock or semaphore can hold (`Duration::MAX` for "forever",
/// `usize::MAX` for "no limit") and a push consumer's zero long-poll wait
/// (a busy loop) are refused when the client is built; they panicked in
/// the client's tasks, or spun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_settings_past_what_the_client_can_count_are_bad_arguments() {
    let ns = "127.0.0.1:9"; // nothing is connected before the check
    let handler =
        || txmq::handler_fn(|_: &txmq::ReceivedMessage| async { txmq::ConsumeResult::Success });
    let push = || {
        txmq::PushConsumer::builder()
            .nameserver(ns)
            .group("g")
            .subscribe("t", "*")
    };
    let refused = |e: txmq::Error, says: &str| {
        assert!(
            matches!(&e, txmq::Error::BadArgument(m) if m.contains(says)),
            "{says}: {e}"
        );
    };
    refused(
        push()
            .concurrency(usize::MAX)
            .start(handler())
            .await
            .unwrap_err(),
        "concurrency must be at most",
    );
    refused(
        push().batch_size(1025).start(handler()).await.unwrap_err(),
        "batch size must be at most 1024",
    );
    refused(
        push()
            .rebalance_interval(Duration::MAX)
            .start(handler())
            .await
            .unwrap_err(),
        "the rebalance interval must be at most a year",
    );
    refused(
        push()
            .max_wait(Duration::ZERO)
            .start(handler())
            .await
            .unwrap_err(),
        "max wait must be above zero",
    );
    refused(
        push()
            .max_wait(Duration::MAX)
            .start(handler())
            .await
            .unwrap_err(),
        "max wait must be at most a year",
    );
    refused(
        push()
            .request_timeout(Duration::MAX)
            .start(handler())
            .await
            .unwrap_err(),
        "the request timeout must be at most a year",
    );
    let pull = || PullConsumer::builder().nameserver(ns).group("g").topic("t");
    refused(
        pull()
            .buffered_batches(usize::MAX)
            .build()
            .await
            .unwrap_err(),
        "buffered batches must be at most",
    );
    refused(
        pull().max_wait(Duration::MAX).build().await.unwrap_err(),
        "max wait must be at most a year",
    );
    refused(
        txmq::Producer::builder()
            .nameserver(ns)
            .send_timeout(Duration::MAX)
            .build()
            .await
            .unwrap_err(),
        "the request timeout must be at most a year",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_counts_out_of_range_are_bad_arguments() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let admin = cluster.admin().await;
    for queues in [0, 1025, 5000] {
        let e = admin
            .create_topic("sized", queues, PERM_READ_WRITE, None)
            .await
            .expect_err("queue count out of range");
        assert_eq!(
            e.code(),
            Some(ErrorCode::BadArgument),
            "{queues} queues: {}",
            error_chain(&e)
        );
        assert!(
            error_chain(&e).contains(&queues.to_string()),
            "{}",
            error_chain(&e)
        );
    }
    assert_eq!(
        admin.route("sized").await.err().and_then(|e| e.code()),
        Some(ErrorCode::NoRoute)
    );
    let created = admin
        .create_topic("sized", 1024, PERM_READ_WRITE, None)
        .await
        .unwrap();
    assert_eq!(created[0].config.queues, 1024);
    admin.close().await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_max_message_size_is_message_too_large() {
    let cluster = Cluster::start(FlushMode::Async).await;
    cluster
        .admin()
        .await
        .create_topic("big", 1, PERM_READ_WRITE, None)
        .await
        .unwrap();
    let producer = cluster.producer().await;
    // The harness's brokers accept messages up to 1 MiB.
    let e = producer
        .send(Message::new("big", vec![7u8; 2 << 20]))
        .await
        .expect_err("2 MiB is over the limit");
    assert_eq!(
        e.code(),
        Some(ErrorCode::MessageTooLarge),
        "{}",
        error_chain(&e)
    );
    // Over the frame limit as well: refused before it is sent, and the
    // error says so rather than reading as the broker's answer.
    let e = producer
        .send(Message::new("big", vec![7u8; 9 << 20]))
        .await
        .expect_err("9 MiB is over every limit");
    assert_eq!(
        e.code(),
        Some(ErrorCode::FrameTooLarge),
        "{}",
        error_chain(&e)
    );
    assert!(e.wire_error().is_none(), "{}", error_chain(&e));
    assert!(
        error_chain(&e).contains("refused before sending"),
        "{}",
        error_chain(&e)
    );
    // Nothing was stored, and a message under the limit still goes through,
    // as does a body of exactly the limit (the limit is the body's, as
    // RocketMQ's `maxMessageSize` and its clients' `max_body_size`, not the
    // record's with its topic and properties).
    let ok = producer
        .send(Message::new("big", vec![7u8; 512 << 10]))
        .await
        .unwrap();
    assert_eq!(ok.queue_offset, 0, "the refused messages took no offset");
    producer
        .send(Message::new("big", vec![7u8; 1 << 20]).with_property("p", "v"))
        .await
        .expect("a body of exactly --max-message-size");
    // Headers past their 32 KiB beside the body are refused, by name.
    let heavy = (0..40).fold(Message::new("big", "small"), |m, i| {
        m.with_property(format!("p{i}"), "x".repeat(1000))
    });
    let e = producer.send(heavy).await.expect_err("40 KB of properties");
    assert_eq!(e.code(), Some(ErrorCode::MessageTooLarge));
    assert!(
        error_chain(&e).contains("topic, key, tag and properties take"),
        "{}",
        error_chain(&e)
    );
    let got = consume_all(&cluster.nameserver, "g", "big", 3, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body().len(), 512 << 10);
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// Sends one line of `size` bytes to topic `big` (created here) with
/// `txmq send --stdin --retries 0`, which is to fail (exit 1) with a
/// known outcome; its stderr. Then checks that nothing was stored and
/// that the broker serves the next send, and shuts the cluster down.
async fn send_one_line_too_large(cluster: Cluster, size: usize, check: impl FnOnce(&str)) {
    cluster
        .admin()
        .await
        .create_topic("big", 1, PERM_READ_WRITE, None)
        .await
        .unwrap();
    let line = "x".repeat(size);
    let out = common::txmq(
        &cluster.nameserver,
        &["send", "big", "--stdin", "--retries", "0"],
        Some(&line),
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("outcome unknown"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("UNKNOWN"));
    check(&err);
    // Nothing was stored, and the broker serves the next send.
    let producer = cluster.producer().await;
    let ok = producer.send(Message::new("big", "small")).await.unwrap();
    assert_eq!(ok.queue_offset, 0);
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// A request over the broker's frame limit but under the client's is
/// refused by name (FRAME_TOO_LARGE: not read, so not stored), not left as
/// an unknown outcome by the connection's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_brokers_frame_limit_is_refused_by_name() {
    let cluster = Cluster::start_with(|cfg| cfg.max_frame_size = (1 << 20) + (64 << 10)).await;
    // One line of 2 MB: over the broker's 1.06 MiB frames, under the
    // client's 8 MiB.
    send_one_line_too_large(cluster, 2_000_000, |err| {
        assert!(
            err.contains("FRAME_TOO_LARGE") && err.contains("--max-frame-size"),
            "{err}"
        );
    })
    .await;
}

/// A body over the client's own frame limit is refused before it is
/// sent, and `txmq send` says so: it printed `broker broker-a (ADDR):
/// FRAME_TOO_LARGE (15): frame of ... bytes ...`, as if the broker had
/// answered, which never saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_clients_frame_limit_is_refused_before_sending() {
    let cluster = Cluster::start(FlushMode::Async).await;
    // One line of 9 MB: over the client's 8 MiB frames.
    send_one_line_too_large(cluster, 9 << 20, |err| {
        assert!(
            err.contains("not sent") && err.contains("refused before sending"),
            "{err}"
        );
        assert!(
            !err.contains("FRAME_TOO_LARGE (15): frame of"),
            "no broker answered: {err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_messagepack_closes_only_that_connection() {
    broker_survives(|addr| async move {
        // {"Request": [7, [[[[ ... 100,000 levels ... ]]]]]}: a few hundred
        // kilobytes that once overflowed the decoding thread's stack.
        let mut body = vec![0x81, 0xa7];
        body.extend_from_slice(b"Request");
        body.extend_from_slice(&[0x92, 0x07]);
        body.extend(std::iter::repeat_n(0x91, 100_000));
        body.push(0xc0);
        let mut raw = Raw::greeted(addr).await;
        raw.write(&framed(&body)).await;
        assert!(raw.frames_until_closed().await.is_empty());
    })
    .await;
}

/// Queue ids and offsets at the ends of their types: each request gets an
/// answer that says what is wrong (or, for a pull past the end, where to
/// read instead), and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_queue_ids_and_offsets_get_clear_answers() {
    let cluster = Cluster::start(FlushMode::Async).await;
    cluster
        .admin()
        .await
        .create_topic("orders", 2, PERM_READ_WRITE, None)
        .await
        .unwrap();
    let addr = cluster.brokers[0].local_addr().to_string();
    let conn = connect(&addr, PROTOCOL_VERSION).await.unwrap();
    let refused = |r: Result<(), txmq_remoting::Error>, code: ErrorCode, text: &str| match r {
        Err(txmq_remoting::Error::Remote(e)) => {
            assert_eq!(e.code, code, "{e}");
            assert!(e.message.contains(text), "names {text}: {e}");
        }
        Err(other) => panic!("expected an error answer, got {other}"),
        Ok(()) => panic!("expected {code:?}, got success"),
    };
    let stored = conn
        .call(SendRequest {
            producer: None,
            queue: 0,
            messages: vec![txmq::WireMessage::new("orders", "first")],
        })
        .await
        .unwrap();
    assert_eq!(stored.first_offset, 0);

    let max_queue = u32::MAX;
    refused(
        conn.call(SendRequest {
            producer: None,
            queue: max_queue,
            messages: vec![txmq::WireMessage::new("orders", "x")],
        })
        .await
        .map(drop),
        ErrorCode::UnknownQueue,
        "4294967295",
    );
    let pull = |queue, offset, max_messages| PullRequest {
        topic: "orders".into(),
        queue,
        offset,
        max_messages,
        max_wait_ms: u64::MAX,
        tag_filter: Vec::new(),
        owner: None,
        epoch: 0,
        after: None,
        browse: false,
    };
    // A half message, with the longest first check the broker takes (its
    // --max-delay, 7 days).
    let prepare = |topic: &str, queue| PrepareTransaction {
        producer: None,
        offsets: Vec::new(),
        producer_group: "pg".into(),
        messages: vec![HalfMessage {
            queue,
            message: txmq::WireMessage::new(topic, "half"),
        }],
        first_check_delay_ms: Some(7 * 24 * 3600 * 1000),
        attempt: None,
    };
    // A read-only topic refuses sends (whatever their queue) and prepares,
    // and a write-only one refuses pulls, each naming the topic; a pull's
    // queue is checked before its permission.
    let admin = cluster.admin().await;
    admin
        .create_topic("readonly", 2, PERM_READ, None)
        .await
        .unwrap();
    admin
        .create_topic("writeonly", 2, PERM_WRITE, None)
        .await
        .unwrap();
    for queue in [0, max_queue] {
        refused(
            conn.call(SendRequest {
                producer: None,
                queue,
                messages: vec![txmq::WireMessage::new("readonly", "x")],
            })
            .await
            .map(drop),
            ErrorCode::NoPermission,
            "topic 'readonly' is not writable",
        );
    }
    refused(
        conn.call(prepare("readonly", 0)).await.map(drop),
        ErrorCode::NoPermission,
        "topic 'readonly' is not writable",
    );
    // A message's own first check delay (its `txmq.check-delay`
    // property, as gRPC clients set it) is held to --max-delay too, and
    // one that is not a duration is refused, not left to the default.
    for (delay, says) in [
        ("10000y", "longer than the broker's --max-delay"),
        // Named to the millisecond: rounded down, it read "7days is
        // longer than ... (7days)".
        (
            "7d500ms",
            "first check delay 7days 500ms is longer than the broker's --max-delay (7days)",
        ),
        ("banana", "'banana' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
    ] {
        let mut own = prepare("orders", 0);
        own.first_check_delay_ms = None;
        own.messages[0].message = txmq::WireMessage::new("orders", "half")
            .with_property(txmq_broker::PROP_USER_CHECK_DELAY, delay);
        refused(conn.call(own).await.map(drop), ErrorCode::BadArgument, says);
    }
    let from_writeonly = |queue| PullRequest {
        topic: "writeonly".into(),
        max_wait_ms: 0,
        ..pull(queue, 0, 1)
    };
    refused(
        conn.call(from_writeonly(0)).await.map(drop),
        ErrorCode::NoPermission,
        "topic 'writeonly' is not readable",
    );
    refused(
        conn.call(from_writeonly(max_queue)).await.map(drop),
        ErrorCode::UnknownQueue,
        "4294967295",
    );
    refused(
        conn.call(pull(max_queue, 0, 1)).await.map(drop),
        ErrorCode::UnknownQueue,
        "4294967295",
    );
    refused(
        conn.call(pull(0, 0, u32::MAX)).await.map(drop),
        ErrorCode::BadArgument,
        "max messages",
    );
    // Past the end, with the longest wait there is: an empty answer at
    // once that points back at the end of the queue.
    let started = Instant::now();
    let past = conn.call(pull(0, u64::MAX, 1)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(past.messages.is_empty());
    assert_eq!((past.next_offset, past.max_offset), (1, 1), "{past:?}");
    let commit = |queue, offset| CommitOffset {
        group: "g".into(),
        topic: "orders".into(),
        queue,
        offset,
        owner: None,
        forward_only: false,
        topic_generation: None,
    };
    refused(
        conn.call(commit(0, u64::MAX)).await.map(drop),
        ErrorCode::OffsetOutOfRange,
        "18446744073709551615",
    );
    refused(
        conn.call(commit(max_queue, 0)).await.map(drop),
        ErrorCode::UnknownQueue,
        "4294967295",
    );
    refused(
        conn.call(QueryOffset {
            group: "g".into(),
            topic: "orders".into(),
            queue: max_queue,
            stored_since_ms: None,
        })
        .await
        .map(drop),
        ErrorCode::UnknownQueue,
        "4294967295",
    );
    refused(
        conn.call(prepare("orders", max_queue)).await.map(drop),
        ErrorCode::UnknownQueue,
        "4294967295",
    );
    refused(
        conn.call(CreateTopic {
            topic: "huge".into(),
            queues: u32::MAX,
            perm: PERM_READ_WRITE,
        })
        .await
        .map(drop),
        ErrorCode::BadArgument,
        "4294967295",
    );

    // The same connection still works, and nothing was stored or committed.
    assert!(!conn.is_closed());
    let got = conn.call(pull(0, 0, 10)).await.unwrap();
    assert_eq!(got.messages.len(), 1);
    assert_eq!(&got.messages[0].message.body[..], b"first");
    let offsets = conn
        .call(QueryOffset {
            group: "g".into(),
            topic: "orders".into(),
            queue: 0,
            stored_since_ms: None,
        })
        .await
        .unwrap();
    assert_eq!((offsets.committed, offsets.max_offset), (None, 1));
    conn.close();
    cluster.shutdown().await;
}

/// Ending a transaction the broker never prepared: UNKNOWN_TRANSACTION to a
/// client, whatever the action and source, and a non-zero exit from the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_an_unknown_transaction_is_unknown_transaction() {
    let cluster = Cluster::start(FlushMode::Async).await;
    let addr = cluster.brokers[0].local_addr().to_string();
    let conn = connect(&addr, PROTOCOL_VERSION).await.unwrap();
    // Not a position any transaction of this empty broker can have.
    let random = u64::from(std::process::id()) << 20 | 0x5eed;
    for tx_id in [random, u64::MAX, 0] {
        for action in [TxAction::Commit, TxAction::Rollback] {
            for source in [TxSource::Producer, TxSource::Operator] {
                let e = conn
                    .call(EndTransaction {
                        producer: None,
                        tx_id,
                        action,
                        source,
                        msg_id: None,
                    })
                    .await
                    .expect_err("nothing to end");
                let e = e.remote().expect("an error answer").clone();
                assert_eq!(e.code, ErrorCode::UnknownTransaction, "{e}");
                assert!(e.message.contains(&tx_id.to_string()), "{e}");
            }
        }
    }
    assert!(!conn.is_closed());
    conn.call(Ping {}).await.expect("the connection goes on");

    let out = common::txmq(
        &cluster.nameserver,
        &["tx", "resolve", &u64::MAX.to_string(), "--commit"],
        None,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("UNKNOWN_TRANSACTION") || err.contains("unknown transaction"),
        "{err}"
    );
    assert!(err.contains(&u64::MAX.to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    conn.close();
    cluster.shutdown().await;
}

// ---- bad settings and environments of the real binaries ----

/// Runs `binary` with `args`; it must exit on its own within 20 s.
fn run_to_exit(binary: &str, args: &[&str]) -> std::process::Output {
    let child = std::process::Command::new(txmq_tests::binary(binary))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.expect("wait for the binary"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{binary} {args:?} is still running after 20 s instead of failing");
        }
    }
}

/// A broker's flags for a one-shot run that should fail: its own free port,
/// a nameserver nobody listens on, and `extra`.
fn broker_args<'a>(listen: &'a str, data: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--listen",
        listen,
        "--nameserver",
        "127.0.0.1:1",
        "--data-dir",
        data,
    ];
    args.extend_from_slice(extra);
    args
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A thread count of 0, or past what a runtime can start, is a usage
/// error of either binary, named by its flag, before anything starts; so
/// is a network thread count past that, or not a number.
#[test]
fn a_worker_thread_count_out_of_range_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
    for n in ["0", "1025"] {
        let out = run_to_exit(
            "txmq-broker",
            &broker_args(&listen, data, &["--worker-threads", n]),
        );
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{n}: {err}");
        assert!(
            err.contains("--worker-threads") && err.contains("between 1 and 1024"),
            "{n}: {err}"
        );
        let out = run_to_exit("txmq", &["--worker-threads", n, "cluster"]);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{n}: {err}");
        assert!(
            err.contains("--worker-threads") && err.contains("1..=1024"),
            "{n}: {err}"
        );
    }
    // `--network-threads` takes 0 (connections on the worker threads).
    for n in ["1025", "many"] {
        let out = run_to_exit(
            "txmq-broker",
            &broker_args(&listen, data, &["--network-threads", n]),
        );
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{n}: {err}");
        assert!(err.contains("--network-threads"), "{n}: {err}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was started");
    // The nameserver's settings are usage errors too, as the broker's are.
    let out = run_to_exit(
        "txmq-nameserver",
        &["--listen", &listen, "--broker-expiry", "0s"],
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--broker-expiry must be above 0"), "{err}");
    // Its durations are read by the servers' and txmq's one parser.
    let out = run_to_exit(
        "txmq-nameserver",
        &["--listen", &listen, "--master-expiry=-5s"],
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("a duration cannot be negative (write durations like 500ms"),
        "{err}"
    );
}

/// An address that is not `host:port`, given to either binary, is a usage
/// error (exit 2) naming the flag, as the CLI's `--nameserver` is; and
/// `--retry-delays` is taken from the command line.
#[test]
fn malformed_addresses_are_usage_errors_and_retry_delays_parse() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
    let standalone = ["--standalone", "--nameserver-listen", "127.0.0.1:0"];
    for (extra, says) in [
        (
            &["--metrics-listen", "bad"][..],
            "--metrics-listen: 'bad' is not host:port",
        ),
        (
            &["--grpc-listen", "bad"],
            "--grpc-listen: 'bad' is not host:port",
        ),
        (&["--nameserver", ""], "--nameserver lists an empty address"),
        (
            &["--nameserver", "foo,,"],
            "--nameserver lists an empty address",
        ),
        (
            &["--standalone", "--nameserver-listen", "bad"],
            "--nameserver-listen: 'bad'",
        ),
        (
            &[&standalone[..], &["--broker-expiry", "0s"]].concat(),
            "--broker-expiry must be above 0",
        ),
        (&["--max-delay", "0s"], "must be at most --max-delay (0s)"),
        (&["--retry-delays", "1s,soon"], "--retry-delays"),
        (&["--frame-timeout=-5s"], "a duration cannot be negative"),
    ] {
        let out = run_to_exit("txmq-broker", &broker_args(&listen, data, extra));
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was started");
    for (args, says) in [
        (&["--listen", "bad"][..], "'bad' is not host:port"),
        (
            &["--listen", &listen, "--metrics-listen", "bad:port"],
            "--metrics-listen",
        ),
    ] {
        let out = run_to_exit("txmq-nameserver", args);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A valid list: the broker starts (it panicked on any value).
    let mut broker = txmq_tests::BrokerProcess::start(
        &dir.path().join("ok"),
        "127.0.0.1:1",
        "broker-a",
        &["--retry-delays", "1s,2s"],
    );
    assert_eq!(broker.stop(), Some(0), "{}", broker.log_text());
    assert!(!broker.log_text().contains("panicked"));
}

/// A nameserver or broker whose log pipe has lost its reader (`... 2>&1 |
/// head -1`) still stops on SIGTERM: the log line of the stop, which
/// cannot be written, no longer panics the task that stops it.
#[test]
fn a_server_whose_log_pipe_closed_stops_on_sigterm() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    for binary in ["txmq-nameserver", "txmq-broker"] {
        let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
        let args: Vec<&str> = match binary {
            "txmq-nameserver" => vec!["--listen", &listen],
            _ => vec![
                "--standalone",
                "--listen",
                &listen,
                "--nameserver-listen",
                "127.0.0.1:0",
                "--data-dir",
                data,
            ],
        };
        let mut child = std::process::Command::new(txmq_tests::binary(binary))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start");
        let mut first = String::new();
        std::io::BufReader::new(child.stderr.take().expect("stderr"))
            .read_line(&mut first)
            .expect("a first log line");
        // The reader is gone now (dropped above); let the server start.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "{binary} never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("{binary} ignored SIGTERM with its log pipe closed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.code().is_some(), "{binary}: {status}");
    }
}

#[test]
fn a_corrupt_config_file_is_a_clear_error_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
    let cases: &[(&str, &[u8], &[&str])] = &[
        // (file name, contents, what stderr must say besides the path)
        (
            "binary.toml",
            b"\x00\xff\xfe binary",
            &["cannot read config file", "valid UTF-8"],
        ),
        (
            "garbage.toml",
            b"this is { not TOML",
            &["invalid config file"],
        ),
        (
            "type.toml",
            b"flush = 5\n",
            &["invalid config file", "flush"],
        ),
        (
            "value.toml",
            b"flush = \"sometimes\"\n",
            &["invalid config file", "sometimes"],
        ),
        (
            "duration.toml",
            b"heartbeat_interval = \"soon\"\n",
            &["invalid config file", "500ms"],
        ),
        (
            "size.toml",
            b"segment_size = \"12 parsecs\"\n",
            &["invalid config file", "12 parsecs"],
        ),
        (
            "unknown-key.toml",
            b"listen = \"127.0.0.1:1\"\nno_such_key = 1\n",
            &["invalid config file", "no_such_key"],
        ),
        (
            "impossible.toml",
            b"segment_size = \"1KiB\"\n",
            &["segment size", "too small"],
        ),
        (
            "no-flush-interval.toml",
            b"flush_interval = \"0s\"\n",
            &["--flush-interval", "must not be zero"],
        ),
        (
            "no-check-timeout.toml",
            b"transaction_check_timeout = \"0s\"\n",
            &["transaction check", "timeout must not be zero"],
        ),
        (
            "no-threads.toml",
            b"worker_threads = 0\n",
            &["worker_threads", "between 1 and 1024"],
        ),
        (
            "network-threads.toml",
            b"network_threads = 5000\n",
            &[
                "invalid config file",
                "network_threads",
                "between 0 and 1024",
            ],
        ),
    ];
    for (name, contents, says) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let out = run_to_exit(
            "txmq-broker",
            &broker_args(&listen, data, &["--config", path.to_str().unwrap()]),
        );
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.starts_with("txmq-broker: error:"), "{name}: {err}");
        for s in *says {
            assert!(err.contains(s), "{name} says {s:?}: {err}");
        }
        if ![
            "impossible.toml",
            "no-flush-interval.toml",
            "no-check-timeout.toml",
            "no-threads.toml",
        ]
        .contains(name)
        {
            assert!(err.contains(path.to_str().unwrap()), "{name}: {err}");
        }
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let missing = dir.path().join("missing.toml");
    let out = run_to_exit(
        "txmq-broker",
        &broker_args(&listen, data, &["--config", missing.to_str().unwrap()]),
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read config file") && err.contains("missing.toml"),
        "{err}"
    );
    // None of it got as far as the data directory.
    assert!(!dir.path().join("data").exists());
}

/// A setting that would start a broker serving nobody is refused as
/// impossible, naming its flag, from the flag, the environment and the
/// config file alike: `--max-connections 0` refused every client
/// (TOO_MANY_CONNECTIONS), `--grpc-max-streams 0` every gRPC call,
/// `--max-message-size 0` every message with a body.
#[test]
fn settings_that_make_a_broker_serve_nobody_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
    for (flag, var, value, key, says) in [
        (
            "--max-connections",
            "TXMQ_MAX_CONNECTIONS",
            "0",
            "max_connections = 0",
            "--max-connections must be at least 1",
        ),
        (
            "--grpc-max-streams",
            "TXMQ_GRPC_MAX_STREAMS",
            "0",
            "grpc_max_streams = 0",
            "--grpc-max-streams must be at least 1",
        ),
        (
            "--max-message-size",
            "TXMQ_MAX_MESSAGE_SIZE",
            "0",
            "max_message_size = \"0\"",
            "--max-message-size must be above 0",
        ),
        // Past what a timer can reach (it made every connection panic).
        (
            "--frame-timeout",
            "TXMQ_FRAME_TIMEOUT",
            "400000000000y",
            "frame_timeout = \"400000000000y\"",
            "--frame-timeout must be at most a year",
        ),
    ] {
        let config = dir.path().join(format!("{var}.toml"));
        std::fs::write(&config, format!("{key}\n")).unwrap();
        let config = config.to_str().unwrap();
        let refused = |extra: &[&str], env: &[(&str, &str)]| {
            let out = std::process::Command::new(txmq_tests::binary("txmq-broker"))
                .args(broker_args(&listen, data, extra))
                .envs(env.iter().copied())
                .output()
                .expect("run txmq-broker");
            let err = stderr_of(&out);
            assert_eq!(out.status.code(), Some(2), "{extra:?} {env:?}: {err}");
            assert!(err.contains(says), "{extra:?} {env:?}: {err}");
        };
        refused(&[flag, value], &[]);
        refused(&[], &[(var, value)]);
        refused(&["--config", config], &[]);
    }
    assert!(!dir.path().join("data").exists(), "nothing was started");
    // 1 starts: one client, a one-byte body.
    let mut broker = txmq_tests::BrokerProcess::start(
        &dir.path().join("ok"),
        "127.0.0.1:1",
        "broker-a",
        &["--max-connections", "1", "--max-message-size", "1"],
    );
    assert_eq!(broker.stop(), Some(0), "{}", broker.log_text());
}

#[test]
fn a_data_dir_that_cannot_be_created_is_a_clear_error_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
    for data in [file.join("data"), file.clone()] {
        let out = run_to_exit(
            "txmq-broker",
            &broker_args(&listen, data.to_str().unwrap(), &[]),
        );
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("txmq-broker: error:"), "{err}");
        assert!(
            err.contains("data dir") || err.contains("cannot open the store"),
            "{err}"
        );
        assert!(err.contains(data.to_str().unwrap()), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn a_data_dir_without_write_permission_is_a_clear_error_and_exit_1() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).unwrap();
    if std::fs::write(data.join("probe"), "x").is_ok() {
        // Root (or a capability) ignores permissions; nothing to test here.
        eprintln!("skipped: this user can write to a mode 0500 directory");
        return;
    }
    let listen = format!("127.0.0.1:{}", txmq_tests::free_port());
    let out = run_to_exit(
        "txmq-broker",
        &broker_args(&listen, data.to_str().unwrap(), &[]),
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("txmq-broker: error:"), "{err}");
    assert!(err.contains("ermission denied"), "{err}");
    assert!(err.contains(data.to_str().unwrap()), "{err}");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_port_already_in_use_is_a_clear_error_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = run_to_exit(
        "txmq-broker",
        &broker_args(&addr, data.to_str().unwrap(), &[]),
    );
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("in use"), "{err}");

    let out = run_to_exit("txmq-nameserver", &["--listen", &addr]);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("txmq-nameserver: error:"), "{err}");
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
    drop(taken);
}

/// A broker whose nameserver is not there yet starts anyway, serves
/// clients that connect to it directly, logs that it keeps trying, and
/// registers as soon as the nameserver comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_nameserver_is_unreachable_keeps_trying_and_registers_later() {
    let ns_addr = format!("127.0.0.1:{}", txmq_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = tokio::task::block_in_place(|| {
        txmq_tests::BrokerProcess::start(&data, &ns_addr, "broker-u", &[])
    });
    let conn = connect(&broker.addr, PROTOCOL_VERSION)
        .await
        .expect("the broker serves without a nameserver");
    conn.call(Ping {}).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !broker
        .log_text()
        .contains("cannot register with nameserver")
    {
        assert!(
            Instant::now() < deadline,
            "no warning about the nameserver:\n{}",
            broker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        broker.log_text().contains(&ns_addr),
        "{}",
        broker.log_text()
    );

    // The nameserver comes up on that address: the broker registers.
    let ns = txmq_nameserver::Nameserver::bind(txmq_nameserver::NameserverConfig {
        listen: ns_addr.clone(),
        broker_expiry: Duration::from_secs(30),
        controller: None,
    })
    .await
    .expect("the nameserver binds the address the broker was given");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ns.run(stop.clone()));
    txmq_tests::wait_for_broker(&ns_addr, "broker-u").await;
    assert!(!conn.is_closed(), "the direct client was not disturbed");
    conn.call(Ping {}).await.unwrap();
    assert!(!broker.log_text().contains("panicked"));
    conn.close();
    drop(broker);
    stop.cancel();
}

/// Disk full, simulated with `--max-store-size`: a send that needs a new
/// segment beyond the limit is refused with STORE_FULL and a message naming
/// the limit (smaller ones still fill the last segment); nothing
/// acknowledged is lost, consumers keep reading and committing, and the CLI
/// exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_sends_clearly_and_keeps_serving_reads() {
    let mut cluster = txmq_tests::Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster
        .add_broker("broker-a", |c| {
            c.segment_size = 1 << 20;
            c.max_message_size = 128 << 10;
            c.max_store_size = Some(3 << 20);
        })
        .await;
    let ns = cluster.nameserver.clone();
    let producer = cluster.producer().await;
    let body = vec![b'x'; 100 << 10];
    let mut acked = 0;
    let refusal = loop {
        match producer
            .send(txmq::Message::new("full", body.clone()))
            .await
        {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 100, "never refused");
    };
    assert_eq!(refusal.code(), Some(ErrorCode::StoreFull), "{refusal:?}");
    let text = txmq::error::chain(&refusal);
    assert!(
        text.contains("store is full") && text.contains("--max-store-size"),
        "{text}"
    );
    assert!(acked >= 20, "only {acked} fit in 3 MiB");
    // Everything acknowledged is there, and offsets still commit.
    let got = txmq_tests::consume_all(&ns, "g", "full", acked, Duration::from_secs(3)).await;
    assert_eq!(got.len(), acked);
    // The CLI says so and exits 1.
    let out = tokio::task::spawn_blocking({
        let ns = ns.clone();
        let big = "y".repeat(100 << 10);
        move || txmq_tests::txmq_cli(&ns, &["send", "full", "--body", &big], None)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("STORE_FULL") && err.contains("store is full"),
        "{err}"
    );
    producer.close().await.unwrap();
    cluster.shutdown().await;
}

/// A TLS handshake sent to a port without TLS is closed at once, also
/// when `--max-frame-size` is above what its first bytes read as (about
/// 369 MB): a first frame longer than a hello is refused before its body
/// is waited for (it was waited for until the hello's timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_is_closed_at_once_whatever_the_max_frame_size() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let addr = cluster
        .add_broker("broker-a", |c| c.max_frame_size = 512 << 20)
        .await;
    let mut tls = Raw::connect(addr).await;
    // A ClientHello's record header (handshake, version 3.1, 512 bytes)
    // and the start of its body.
    tls.write(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
        .await;
    assert!(tls.frames_until_closed().await.is_empty());
    // A hello is greeted as before.
    drop(Raw::greeted(addr).await);
    cluster.shutdown().await;
}

/// `--max-connections`: a hello past the limit is refused with
/// TOO_MANY_CONNECTIONS and the connection closes; the connections already
/// there keep being served, and a slot freed by a close is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_clearly_and_the_others_served() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    let addr = cluster
        .add_broker("broker-a", |c| c.max_connections = 3)
        .await
        .to_string();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            connect(&addr, PROTOCOL_VERSION)
                .await
                .expect("within the limit"),
        );
    }
    let refused = connect(&addr, PROTOCOL_VERSION)
        .await
        .expect_err("past the limit");
    let e = refused.remote().expect("an error answer").clone();
    assert_eq!(e.code, ErrorCode::TooManyConnections, "{e}");
    assert!(e.message.contains("--max-connections"), "{e}");
    // The others are still served.
    for conn in &open {
        let route = conn.call(txmq_protocol::GetStoreStats {}).await;
        assert!(route.is_ok(), "{route:?}");
    }
    let gone = open.pop().unwrap();
    gone.close();
    gone.closed().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match connect(&addr, PROTOCOL_VERSION).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the freed slot was not given back: {e}"),
        }
    };
    again.close();
    for conn in open {
        conn.close();
    }
    cluster.shutdown().await;
}

/// `--max-topics`: creating or auto-creating a topic past the limit is
/// refused with TOO_MANY_TOPICS (the CLI exits 1 saying so); existing
/// topics keep working, and the internal retry topics of consumer groups
/// are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_past_the_limit_are_refused_clearly() {
    let mut cluster = Cluster::nameserver_only(Duration::from_secs(30)).await;
    cluster.add_broker("broker-a", |c| c.max_topics = 2).await;
    let ns = cluster.nameserver.clone();
    let producer = cluster.producer().await;
    producer
        .send(Message::new("first", "1"))
        .await
        .expect("auto-created");
    producer
        .send(Message::new("second", "2"))
        .await
        .expect("auto-created");
    let refused = producer
        .send(Message::new("third", "3"))
        .await
        .expect_err("past the limit");
    assert_eq!(
        refused.code(),
        Some(ErrorCode::TooManyTopics),
        "{refused:?}"
    );
    let text = txmq::error::chain(&refused);
    assert!(text.contains("--max-topics"), "{text}");
    // A name that looks internal is counted like any other.
    let sneaky = producer
        .send(Message::new("%sneaky", "4"))
        .await
        .expect_err("counted too");
    assert_eq!(sneaky.code(), Some(ErrorCode::TooManyTopics), "{sneaky:?}");
    let out = tokio::task::spawn_blocking({
        let ns = ns.clone();
        move || txmq_tests::txmq_cli(&ns, &["topic", "create", "fourth", "--queues", "1"], None)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TOO_MANY_TOPICS"), "{err}");
    // Existing topics still work, and a consumer group's retry topic is made.
    producer
        .send(Message::new("first", "again"))
        .await
        .expect("an existing topic");
    let got = consume_all(&ns, "g", "first", 2, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 2);
    producer.close().await.unwrap();
    cluster.shutdown().await;
}
