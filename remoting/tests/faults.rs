//! Connections to peers that stop reading, stop answering, or both serve
//! requests at full speed: no caller waits past its timeout, a silent peer's
//! connection is closed, a slow reader cannot make the other side queue
//! without bound, and two serving peers never deadlock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use txmq_protocol::codec::Decoded;
use txmq_protocol::*;
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{server, Connection, ConnectionConfig, Error, Service};

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        role: Role::Admin,
        client_id: "faults".into(),
        group: None,
    }
}

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
        .encode(frame, &mut buf)
        .unwrap();
    buf
}

/// Reads one whole frame from a raw socket.
async fn read_frame(s: &mut TcpStream, buf: &mut BytesMut) -> Frame {
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
    loop {
        if let Some(Decoded::Frame(f)) = codec.decode(buf).unwrap() {
            return f;
        }
        let n = s.read_buf(buf).await.unwrap();
        assert!(n > 0, "peer closed");
    }
}

/// What a hand-written peer does after it answered the hello.
#[derive(Clone, Copy)]
enum Peer {
    /// Reads nothing more (a paused process: its socket buffers fill).
    StopsReading,
    /// Reads everything and answers nothing (a black hole).
    Swallows,
}

/// A server that answers the hello and then behaves as `peer`; returns its address.
async fn silent_server(peer: Peer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let Frame::Request(id, Request::Hello(_)) = read_frame(&mut s, &mut buf).await
                else {
                    panic!("no hello")
                };
                let ok = Response::Hello(HelloOk {
                    version: PROTOCOL_VERSION,
                    server: String::new(),
                    challenge: None,
                });
                s.write_all(&encode(&Frame::Response(id, Ok(ok))))
                    .await
                    .unwrap();
                match peer {
                    Peer::StopsReading => {
                        // Hold the socket open, unread, until the test ends.
                        tokio::time::sleep(Duration::from_secs(600)).await;
                        drop(s);
                    }
                    Peer::Swallows => {
                        let mut sink = vec![0u8; 64 * 1024];
                        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                }
            });
        }
    });
    addr
}

/// A client connection to `addr` whose requests time out after `request_timeout`.
async fn connect(addr: &str, request_timeout: Duration) -> Connection {
    let config = ConnectionConfig {
        request_timeout,
        ..Default::default()
    };
    Connection::connect(addr, hello(), None, config)
        .await
        .unwrap()
}

/// A request of about `len` bytes (the peers here do not look at it).
fn big_request(len: usize) -> GetRoute {
    GetRoute {
        topic: "x".repeat(len),
    }
}

/// Against a peer that stops reading, the socket and then the writer's
/// queue fill up: a request that waits for room must still end at its
/// timeout, not when the kernel gives up on the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wait_counts_against_the_request_timeout() {
    let addr = silent_server(Peer::StopsReading).await;
    let timeout = Duration::from_millis(300);
    let conn = connect(&addr, timeout).await;
    let started = Instant::now();
    let calls = (0..6000).map(|_| {
        let conn = conn.clone();
        async move { conn.call(big_request(16 << 10)).await }
    });
    let answers = tokio::time::timeout(Duration::from_secs(10), join_all(calls))
        .await
        .expect("requests waited past their timeout for room in the writer's queue");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Err(Error::Timeout { .. } | Error::Closed { .. }))),
        "every request fails by timeout (or by the close that follows)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A request that finds the writer's queue full (a peer that stopped
/// reading) ends at its own timeout, while the requests queued before it
/// wait on for theirs, and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_room_ends_at_its_own_timeout() {
    let addr = silent_server(Peer::StopsReading).await;
    let conn = connect(&addr, Duration::from_secs(60)).await;
    // More than the socket's buffers and the queue's 8 MiB hold.
    let fill: Vec<_> = (0..1200)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call(big_request(16 << 10)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = conn.call_with_timeout(big_request(16 << 10), Duration::from_millis(300));
    let late = tokio::time::timeout(Duration::from_secs(5), late)
        .await
        .expect("the request waited for room past its timeout");
    assert!(matches!(late, Err(Error::Timeout { .. })), "{late:?}");
    assert!(!conn.is_closed());
    fill.iter().for_each(|t| t.abort());
}

/// `try_request_when` on a connection whose writer's queue is full (a
/// peer that stopped reading) sends nothing and waits for nothing: the
/// request comes back, `ready` is not asked (it would draw a sequence
/// number for a frame that does not go), and nothing is left pending.
/// With room, it queues the frame as `request_when` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_tried_without_room_comes_back_unsent() {
    let addr = silent_server(Peer::StopsReading).await;
    let conn = connect(&addr, Duration::from_secs(60)).await;
    let asked = std::cell::Cell::new(0);
    let mut ready = |_: &mut Request| {
        asked.set(asked.get() + 1);
        true
    };
    // With room: queued at once, answered never (the peer does not read).
    match conn
        .try_request_when(
            Request::GetRoute(big_request(8)),
            Duration::from_secs(60),
            &mut ready,
        )
        .unwrap()
    {
        txmq_remoting::Queued::Sent(_reply) => {}
        txmq_remoting::Queued::NotReady(_) => panic!("a request with room was not sent"),
    }
    assert_eq!(asked.get(), 1);
    // About 1.5 times what the socket's buffers, the writer's buffer and
    // the queue's 8 MiB hold.
    let fill: Vec<_> = (0..2000)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call(big_request(16 << 10)).await })
        })
        .collect();
    // Every filler registered: from here only this test's tries change
    // the pending count.
    let registered = async {
        while conn.pending_requests() < 2000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), registered)
        .await
        .expect("the fillers never all registered");
    // Tried until a try finds no room (`ready` not asked); a try that found
    // room sent its request, one more for the queue.
    let full = async {
        loop {
            let pending_before = conn.pending_requests();
            let asked_before = asked.get();
            let back = conn
                .try_request_when(
                    Request::GetRoute(big_request(16 << 10)),
                    Duration::from_secs(60),
                    &mut ready,
                )
                .unwrap();
            if asked.get() > asked_before {
                assert!(matches!(back, txmq_remoting::Queued::Sent(_)));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            break (back, pending_before);
        }
    };
    let (back, pending_before) = tokio::time::timeout(Duration::from_secs(20), full)
        .await
        .expect("the writer's queue never filled");
    match back {
        txmq_remoting::Queued::NotReady(Request::GetRoute(r)) => {
            assert_eq!(r.topic.len(), 16 << 10)
        }
        txmq_remoting::Queued::NotReady(other) => panic!("another request back: {other:?}"),
        txmq_remoting::Queued::Sent(_) => panic!("sent without asking ready"),
    }
    assert_eq!(
        conn.pending_requests(),
        pending_before,
        "the unsent request left an entry"
    );
    assert!(!conn.is_closed());
    fill.iter().for_each(|t| t.abort());
}

/// A peer that takes requests and never answers (paused, or black-holed
/// behind a firewall) has its connection closed after repeated timeouts,
/// so that a pool opens a new one instead of timing out forever.
#[tokio::test]
async fn a_silent_peer_is_closed_after_repeated_timeouts() {
    let addr = silent_server(Peer::Swallows).await;
    let conn = connect(&addr, Duration::from_millis(100)).await;
    for _ in 0..3 {
        let err = conn.call(Ping {}).await.unwrap_err();
        assert!(
            matches!(err, Error::Timeout { .. } | Error::Closed { .. }),
            "{err}"
        );
    }
    tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .expect("the connection to a silent peer stays open");
}

/// A peer that answers now and then is not closed for the timeouts of its
/// slow requests.
#[tokio::test]
async fn a_slow_but_answering_peer_keeps_its_connection() {
    struct Slow;
    impl Service for Slow {
        fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
            Box::pin(async move {
                match request {
                    Request::Ping(_) => Ok(Response::Ping(Pong {})),
                    _ => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        Err(WireError::new(ErrorCode::Internal, "late"))
                    }
                }
            })
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        Arc::new(Slow),
        ConnectionConfig::default(),
        shutdown.clone(),
    ));
    let conn = connect(&addr, ConnectionConfig::default().request_timeout).await;
    for _ in 0..4 {
        let slow = conn.call_with_timeout(big_request(1), Duration::from_millis(50));
        assert!(matches!(slow.await, Err(Error::Timeout { .. })));
        conn.call(Ping {}).await.unwrap();
    }
    assert!(!conn.is_closed());
    shutdown.cancel();
}

/// Answers every request with about `len` bytes, counting the answers made.
struct BigAnswers {
    len: usize,
    made: Arc<AtomicUsize>,
}

impl Service for BigAnswers {
    fn call(&self, _: &Connection, _: Request) -> BoxFuture<Result<Response, WireError>> {
        let (len, made) = (self.len, self.made.clone());
        Box::pin(async move {
            made.fetch_add(1, Ordering::SeqCst);
            Ok(Response::GetRoute(TopicRoute {
                topic: "y".repeat(len),
                brokers: vec![],
            }))
        })
    }
}

/// A client that sends many requests for 1 MiB answers and reads none of
/// them makes the server hold a bounded number of bytes for it, not every
/// answer (4096 frames of up to the frame limit each, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_waiting_for_a_slow_reader_are_bounded_in_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let made = Arc::new(AtomicUsize::new(0));
    tokio::spawn(server::serve(
        listener,
        Arc::new(BigAnswers {
            len: 1 << 20,
            made: made.clone(),
        }),
        ConnectionConfig::default(),
        shutdown.clone(),
    ));
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&encode(&Frame::Request(0, Request::Hello(hello()))))
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_frame(&mut s, &mut buf).await,
        Frame::Response(0, Ok(_))
    ));
    let mut requests = BytesMut::new();
    for id in 1..=300u64 {
        requests.extend_from_slice(&encode(&Frame::Request(id, Request::Ping(Ping {}))));
    }
    s.write_all(&requests).await.unwrap();
    // Give the server time to answer everything it is willing to hold.
    let mut last = usize::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = made.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    let made = made.load(Ordering::SeqCst);
    // The socket buffers hold a few MiB; the writer's queue 8 MiB.
    assert!(
        made < 64,
        "the server made {made} answers of 1 MiB for a client that reads none"
    );
    shutdown.cancel();
}

/// Both sides serve requests and both send many large ones: with both
/// writers' queues full, each reader must still read the other's answers,
/// or neither side ever makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serving_peers_do_not_deadlock_with_full_queues() {
    /// Answers GetRoute with its topic; on GetCluster, calls the peer back
    /// with a large GetRoute first.
    struct Both;
    impl Service for Both {
        fn call(
            &self,
            conn: &Connection,
            request: Request,
        ) -> BoxFuture<Result<Response, WireError>> {
            let conn = conn.clone();
            Box::pin(async move {
                match request {
                    Request::GetRoute(r) => Ok(Response::GetRoute(TopicRoute {
                        topic: r.topic,
                        brokers: vec![],
                    })),
                    Request::GetCluster(_) => {
                        conn.call(big_request(4 << 10))
                            .await
                            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
                        Ok(Response::GetCluster(ClusterInfo { brokers: vec![] }))
                    }
                    other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
                }
            })
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let config = ConnectionConfig {
        request_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    tokio::spawn(server::serve(
        listener,
        Arc::new(Both),
        config.clone(),
        shutdown.clone(),
    ));
    let conn = Connection::connect(&addr, hello(), Some(Arc::new(Both)), config.clone())
        .await
        .unwrap();
    // Requests and answers of 4 KiB each way, far more than either
    // queue holds.
    let calls = (0..20000).map(|i| {
        let conn = conn.clone();
        async move {
            if i % 2 == 0 {
                conn.call(big_request(4 << 10)).await.map(|_| ())
            } else {
                conn.call(GetCluster {}).await.map(|_| ())
            }
        }
    });
    let answers = tokio::time::timeout(Duration::from_secs(20), join_all(calls))
        .await
        .expect("the two peers deadlocked");
    // Requests past a side's in-flight limit may be refused as BUSY; none
    // may time out or lose its connection.
    let failed: Vec<_> = answers
        .iter()
        .filter_map(|a| a.as_ref().err())
        .filter(|e| !matches!(e.remote(), Some(w) if w.code == ErrorCode::Busy))
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    // How many are refused depends on how the two sides' reads and
    // handlers interleave (0 to more than half of them), so no count tells
    // serving that went on from serving that stopped once the limits were
    // first reached. What does: both sides still serve afterwards.
    assert!(answers.iter().any(|a| a.is_ok()), "nothing was answered");
    let after = async {
        conn.call(GetCluster {}).await?;
        conn.call(big_request(4 << 10)).await
    };
    tokio::time::timeout(Duration::from_secs(5), after)
        .await
        .expect("not served once the load was over")
        .expect("not served once the load was over");
    shutdown.cancel();
}

/// A request dropped while it waits for room in the writer's queue (its
/// caller timed out in a `select!`, say) leaves no pending entry behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_queued_leaves_nothing_behind() {
    let addr = silent_server(Peer::StopsReading).await;
    let conn = connect(&addr, Duration::from_secs(30)).await;
    let calls = (0..2000).map(|_| {
        let conn = conn.clone();
        async move {
            tokio::time::timeout(Duration::from_millis(200), conn.call(big_request(16 << 10)))
                .await
                .ok()
        }
    });
    join_all(calls).await;
    assert_eq!(conn.pending_requests(), 0);
}
