//! A real server on 127.0.0.1:0 and real clients: pipelining, out-of-order
//! answers, requests from server to client, and bad input on one connection
//! leaving the others alone.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use txmq_protocol::*;
use txmq_remoting::connection_types::BoxFuture;
use txmq_remoting::{server, Connection, ConnectionConfig, Error, Service};

/// Answers a ping after a delay given by the peer's client id length, and
/// answers GetRoute with the topic echoed; pings the client back on GetCluster.
struct Echo;

impl Service for Echo {
    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let conn = conn.clone();
        Box::pin(async move {
            match request {
                Request::GetRoute(r) => {
                    let delay: u64 = r.topic.trim_start_matches('t').parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    Ok(Response::GetRoute(TopicRoute {
                        topic: r.topic,
                        brokers: vec![],
                    }))
                }
                Request::GetCluster(_) => {
                    // Ask the client something over its own connection.
                    conn.call(Ping {})
                        .await
                        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
                    Ok(Response::GetCluster(ClusterInfo { brokers: vec![] }))
                }
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

struct PingAnswerer;
impl Service for PingAnswerer {
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(async move {
            match request {
                Request::Ping(_) => Ok(Response::Ping(Pong {})),
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

fn hello(version: u32) -> Hello {
    Hello {
        version,
        role: Role::Admin,
        client_id: "test".into(),
        group: None,
    }
}

async fn start() -> (String, CancellationToken) {
    let config = ConnectionConfig {
        max_frame_len: 64 * 1024,
        ..Default::default()
    };
    serve(Arc::new(Echo), config).await
}

/// A server of `service` on a free port; its address, and the token that
/// stops it.
async fn serve(service: Arc<dyn Service>, config: ConnectionConfig) -> (String, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(listener, service, config, shutdown.clone()));
    (addr, shutdown)
}

async fn client(addr: &str, service: Option<Arc<dyn Service>>) -> Connection {
    Connection::connect(
        addr,
        hello(PROTOCOL_VERSION),
        service,
        ConnectionConfig::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn pipelined_requests_are_answered_out_of_order() {
    let (addr, _s) = start().await;
    let conn = client(&addr, None).await;
    let slow = conn.call(GetRoute {
        topic: "t300".into(),
    });
    let fast = async {
        let r = conn.call(GetRoute { topic: "t0".into() }).await.unwrap();
        (r, std::time::Instant::now())
    };
    let (slow, (fast, fast_at)) = tokio::join!(slow, fast);
    assert_eq!(slow.unwrap().topic, "t300");
    assert_eq!(fast.topic, "t0");
    // The fast answer did not wait behind the slow one.
    assert!(fast_at.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn server_can_call_the_client_back_on_its_connection() {
    let (addr, _s) = start().await;
    let conn = client(&addr, Some(Arc::new(PingAnswerer))).await;
    conn.call(GetCluster {}).await.unwrap();
    // Without a service the client refuses, and the server reports it.
    let plain = client(&addr, None).await;
    let err = plain.call(GetCluster {}).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("Ping requests are not served here"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_version_gets_a_clear_error() {
    let (addr, _s) = start().await;
    let err = Connection::connect(&addr, hello(99), None, ConnectionConfig::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(ErrorCode::UnsupportedVersion),
        "{err}"
    );
}

#[tokio::test]
async fn first_request_must_be_hello() {
    let (addr, _s) = start().await;
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    let body = rmp_serde_frame(&Frame::Request(5, Request::Ping(Ping {})));
    raw.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("the first request must be a hello"), "{text}");
}

fn rmp_serde_frame(frame: &Frame) -> Vec<u8> {
    use tokio_util::codec::Encoder;
    let mut buf = bytes::BytesMut::new();
    FrameCodec::default().encode(frame, &mut buf).unwrap();
    buf.to_vec()
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let (addr, _s) = start().await;
    let good = client(&addr, None).await;
    let bad_inputs: Vec<Vec<u8>> = vec![
        // oversized length prefix
        vec![0x7f, 0xff, 0xff, 0xff, 0, 0],
        // garbage body
        vec![0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1],
    ];
    for bad in bad_inputs {
        let mut raw = TcpStream::connect(&addr).await.unwrap();
        raw.write_all(&rmp_serde_frame(&Frame::Request(
            1,
            Request::Hello(hello(PROTOCOL_VERSION)),
        )))
        .await
        .unwrap();
        raw.write_all(&bad).await.unwrap();
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "server did not close the bad connection");
    }
    let r = good.call(GetRoute { topic: "t0".into() }).await.unwrap();
    assert_eq!(r.topic, "t0");
}

#[tokio::test]
async fn request_timeout_and_closed_connection_are_errors() {
    let (addr, shutdown) = start().await;
    let conn = client(&addr, None).await;
    let err = conn
        .call_with_timeout(
            GetRoute {
                topic: "t500".into(),
            },
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    shutdown.cancel();
    conn.closed().await;
    let err = conn
        .call(GetRoute { topic: "t0".into() })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");
}

/// Deadlines are kept per connection, not per request: a short one that
/// comes after a long one still ends on time, answers that come in time
/// are not cut short, and a request after a timeout gets its answer.
#[tokio::test]
async fn each_request_ends_at_its_own_deadline_in_any_order() {
    let (addr, _s) = start().await;
    let conn = client(&addr, None).await;
    let call = |topic: &str, timeout_ms: u64| {
        let conn = conn.clone();
        let topic = topic.to_string();
        async move {
            let at = std::time::Instant::now();
            let result = conn
                .call_with_timeout(GetRoute { topic }, Duration::from_millis(timeout_ms))
                .await;
            (result, at.elapsed())
        }
    };
    // A long wait in flight first, then a short one behind it, then one
    // whose answer (after 100 ms) comes within its 2 s.
    let long = tokio::spawn(call("t3000", 10_000));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (short, answered) = tokio::join!(call("t1000", 150), call("t100", 2_000));
    let (short, short_took) = short;
    assert!(matches!(short, Err(Error::Timeout { .. })), "{short:?}");
    assert!(
        short_took >= Duration::from_millis(150) && short_took < Duration::from_millis(900),
        "the 150 ms request ended after {short_took:?}"
    );
    let (answered, took) = answered;
    assert_eq!(answered.unwrap().topic, "t100");
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    // The connection is still good: the long request gets its answer.
    let (long, long_took) = long.await.unwrap();
    assert_eq!(long.unwrap().topic, "t3000");
    assert!(long_took >= Duration::from_millis(3_000));
    assert_eq!(conn.pending_requests(), 0);
    let (after, _) = call("t0", 1_000).await;
    assert_eq!(after.unwrap().topic, "t0");
}

/// Counts the requests it serves at once (the most seen); each takes 50 ms.
#[derive(Default)]
struct Gauge {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

struct Gauged(Arc<Gauge>);

impl Service for Gauged {
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        use std::sync::atomic::Ordering::SeqCst;
        let gauge = self.0.clone();
        let now = gauge.now.fetch_add(1, SeqCst) + 1;
        gauge.most.fetch_max(now, SeqCst);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            gauge.now.fetch_sub(1, SeqCst);
            match request {
                Request::GetRoute(r) => Ok(Response::GetRoute(TopicRoute {
                    topic: r.topic,
                    brokers: vec![],
                })),
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

/// A connection's requests in flight are bounded in bytes: with a 10 KiB
/// limit, 20 pipelined requests of 4 KiB are served at most 3 at a time,
/// and every one is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_in_bytes() {
    let gauge = Arc::new(Gauge::default());
    let config = ConnectionConfig {
        max_inflight_bytes: 10 << 10,
        ..Default::default()
    };
    let (addr, shutdown) = serve(Arc::new(Gauged(gauge.clone())), config).await;
    let conn = client(&addr, None).await;
    let calls = (0..20).map(|i| {
        let conn = conn.clone();
        async move {
            let topic = format!("{i}-{}", "x".repeat(4 << 10));
            conn.call(GetRoute {
                topic: topic.clone(),
            })
            .await
            .map(|route| route.topic == topic)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(true))), "{answers:?}");
    let most = gauge.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=3).contains(&most), "served {most} at once");
    shutdown.cancel();
}

/// Records the topics of the GetRoute requests it is handed, in the order
/// the reader hands them over (the order they arrived), and echoes them.
#[derive(Default)]
struct Arrivals(std::sync::Mutex<Vec<String>>);

impl Service for Arrivals {
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let Request::GetRoute(r) = request else {
            return Box::pin(async { Err(WireError::new(ErrorCode::UnsupportedRequest, "")) });
        };
        self.0.lock().unwrap().push(r.topic.clone());
        Box::pin(async move {
            Ok(Response::GetRoute(TopicRoute {
                topic: r.topic,
                brokers: vec![],
            }))
        })
    }
}

/// `request_when`: requests numbered by `ready` reach the peer in the order
/// of their numbers, whichever of many tasks queues them; a request `ready`
/// refuses is handed back, and nothing is sent or left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_made_ready_in_some_order_arrive_in_that_order() {
    let arrivals = Arc::new(Arrivals::default());
    let (addr, shutdown) = serve(arrivals.clone(), ConnectionConfig::default()).await;
    let conn = client(&addr, None).await;
    let timeout = Duration::from_secs(10);

    let refused = conn
        .request_when(
            GetRoute { topic: "x".into() }.into_request(),
            timeout,
            &mut |_| false,
        )
        .await
        .unwrap();
    match refused {
        txmq_remoting::Queued::NotReady(Request::GetRoute(r)) => assert_eq!(r.topic, "x"),
        txmq_remoting::Queued::NotReady(other) => panic!("another request back: {other:?}"),
        txmq_remoting::Queued::Sent(_) => panic!("sent though not ready"),
    }
    assert_eq!(conn.pending_requests(), 0);

    const TASKS: usize = 8;
    const EACH: usize = 50;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (conn, next) = (conn.clone(), next.clone());
            tokio::spawn(async move {
                for _ in 0..EACH {
                    let mut number = |r: &mut Request| {
                        if let Request::GetRoute(g) = r {
                            let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            g.topic = n.to_string();
                        }
                        true
                    };
                    let request = GetRoute {
                        topic: String::new(),
                    }
                    .into_request();
                    let txmq_remoting::Queued::Sent(reply) = conn
                        .request_when(request, timeout, &mut number)
                        .await
                        .unwrap()
                    else {
                        panic!("always ready");
                    };
                    reply.answer().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seen = arrivals.0.lock().unwrap().clone();
    let want: Vec<String> = (0..TASKS * EACH).map(|n| n.to_string()).collect();
    assert_eq!(seen, want, "arrived out of their order");
    assert_eq!(conn.pending_requests(), 0);
    shutdown.cancel();
}

/// Logs when each GetRoute handler starts and ends; in between it yields
/// once, as a broker's send does to let the sends read with it queue theirs
/// for the same commit-log write.
#[derive(Default)]
struct Yielding(Arc<std::sync::Mutex<Vec<String>>>);

impl Service for Yielding {
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let Request::GetRoute(r) = request else {
            return Box::pin(async { Err(WireError::new(ErrorCode::UnsupportedRequest, "")) });
        };
        let log = self.0.clone();
        Box::pin(async move {
            log.lock().unwrap().push(format!("start {}", r.topic));
            tokio::task::yield_now().await;
            log.lock().unwrap().push(format!("end {}", r.topic));
            Ok(Response::GetRoute(TopicRoute {
                topic: r.topic,
                brokers: vec![],
            }))
        })
    }
}

/// Requests read together all start before any of them goes on past a
/// yield: a handler that yields is polled again only once woken, not each
/// time the connection's reader turns. (A broker's sends gather into one
/// write this way.)
#[tokio::test]
async fn handlers_read_together_start_before_any_resumes_from_a_yield() {
    let service = Arc::new(Yielding::default());
    let (addr, shutdown) = serve(service.clone(), ConnectionConfig::default()).await;
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    let mut bytes = rmp_serde_frame(&Frame::Request(1, Request::Hello(hello(PROTOCOL_VERSION))));
    bytes.extend(routes(&[(2, "a"), (3, "b"), (4, "c")]));
    raw.write_all(&bytes).await.unwrap();
    let log = log_of(&service.0, 6).await;
    assert_eq!(
        log[..3],
        ["start a", "start b", "start c"],
        "a handler resumed before the requests read with it had started: {log:?}"
    );
    let mut ends = log[3..].to_vec();
    ends.sort();
    assert_eq!(ends, ["end a", "end b", "end c"]);
    shutdown.cancel();
}

/// Like [`Yielding`], but GetRoute "x" wakes its own waker and answers at
/// once: a wake left behind by a handler that is done.
struct WakesThenDone(Yielding);

impl Service for WakesThenDone {
    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        match &request {
            Request::GetRoute(r) if r.topic == "x" => {
                let log = self.0 .0.clone();
                Box::pin(std::future::poll_fn(move |cx| {
                    cx.waker().wake_by_ref();
                    log.lock().unwrap().push("x".into());
                    std::task::Poll::Ready(Ok(Response::GetRoute(TopicRoute {
                        topic: "x".into(),
                        brokers: vec![],
                    })))
                }))
            }
            _ => self.0.call(conn, request),
        }
    }
}

/// A wake left by a finished handler does not count for the next one: the
/// requests read together after it still all start before any resumes.
#[tokio::test]
async fn a_wake_left_by_a_finished_handler_does_not_resume_the_next_early() {
    let service = Arc::new(WakesThenDone(Yielding::default()));
    let (addr, shutdown) = serve(service.clone(), ConnectionConfig::default()).await;
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    let mut bytes = rmp_serde_frame(&Frame::Request(1, Request::Hello(hello(PROTOCOL_VERSION))));
    bytes.extend(routes(&[(2, "x")]));
    raw.write_all(&bytes).await.unwrap();
    // Both answered (the hello and "x") before the next requests go.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while frames_in(&got) < 2 {
        let n = raw.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    raw.write_all(&routes(&[(3, "b"), (4, "c")])).await.unwrap();
    let log = log_of(&service.0 .0, 5).await;
    assert_eq!(log[..3], ["x", "start b", "start c"], "{log:?}");
    shutdown.cancel();
}

/// How many whole length-prefixed frames `buf` holds.
fn frames_in(buf: &[u8]) -> usize {
    let (mut at, mut n) = (0, 0);
    while let Some(prefix) = buf.get(at..at + 4) {
        let len = u32::from_be_bytes(prefix.try_into().unwrap()) as usize;
        if buf.len() < at + 4 + len {
            break;
        }
        at += 4 + len;
        n += 1;
    }
    n
}

/// GetRoute requests with these ids and topics, encoded one after another.
fn routes(requests: &[(u64, &str)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for &(id, topic) in requests {
        let request = GetRoute {
            topic: topic.into(),
        };
        bytes.extend(rmp_serde_frame(&Frame::Request(id, request.into_request())));
    }
    bytes
}

/// The log once it has `len` entries (within 10 s).
async fn log_of(log: &std::sync::Mutex<Vec<String>>, len: usize) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = log.lock().unwrap().clone();
            if now.len() == len {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every request served")
}

/// Panics on GetRoute "boom"; answers any other GetRoute with its topic.
struct Panics;

impl Service for Panics {
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        Box::pin(async move {
            match request {
                Request::GetRoute(r) if r.topic == "boom" => panic!("a handler's bug"),
                Request::GetRoute(r) => Ok(Response::GetRoute(TopicRoute {
                    topic: r.topic,
                    brokers: vec![],
                })),
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

/// A handler that panics closes its connection: the caller gets `Closed`
/// at once, not at its deadline, and other connections are still served.
#[tokio::test]
async fn a_panicking_handler_closes_its_connection_and_no_other() {
    let (addr, shutdown) = serve(Arc::new(Panics), ConnectionConfig::default()).await;
    let other = client(&addr, None).await;
    let conn = client(&addr, None).await;
    let started = std::time::Instant::now();
    let err = conn
        .call_with_timeout(
            GetRoute {
                topic: "boom".into(),
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered only after {:?}",
        started.elapsed()
    );
    let r = other.call(GetRoute { topic: "ok".into() }).await.unwrap();
    assert_eq!(r.topic, "ok");
    shutdown.cancel();
}

/// Keeps the server side of every connection it serves.
#[derive(Default)]
struct Keeps(std::sync::Mutex<Vec<Connection>>);

impl Service for Keeps {
    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        self.0.lock().unwrap().push(conn.clone());
        Box::pin(async move {
            match request {
                Request::Ping(_) => Ok(Response::Ping(Pong {})),
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

/// A server's shutdown closes the connections it serves (their tokens are
/// its token's children): `is_closed` says so on both ends, as `close` and
/// the peer's going do.
#[tokio::test]
async fn a_servers_shutdown_shows_as_closed_on_both_ends() {
    let keeps = Arc::new(Keeps::default());
    let (addr, shutdown) = serve(keeps.clone(), ConnectionConfig::default()).await;
    let conn = client(&addr, None).await;
    conn.call(Ping {}).await.unwrap();
    let served = keeps.0.lock().unwrap()[0].clone();
    assert!(!served.is_closed() && !conn.is_closed());

    shutdown.cancel();
    // Seen without waiting on the connection's own `closed`, which sets
    // the flag itself: the read loop must set it.
    let started = std::time::Instant::now();
    while !served.is_closed() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the served connection does not show as closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the client's connection was not closed");
    assert!(conn.is_closed());
    let err = conn.call(Ping {}).await.unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");

    // Closed by the client itself: at once, before any task has run.
    let other = client(&start().await.0, None).await;
    other.close();
    assert!(other.is_closed());
}

/// Answers GetRoute with the name of the thread that served it.
struct WhereServed;

impl Service for WhereServed {
    fn call(&self, _: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>> {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        Box::pin(async move {
            match request {
                Request::GetRoute(_) => Ok(Response::GetRoute(TopicRoute {
                    topic: thread,
                    brokers: vec![],
                })),
                other => Err(WireError::new(ErrorCode::UnsupportedRequest, other.kind())),
            }
        })
    }
}

/// The threads of a process whose names start with `prefix` (from `/proc`).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|n| n.starts_with(prefix))
        .count()
}

/// Served on `NetworkThreads`, connections are answered on those threads,
/// placed in turn; the threads end once the last handle is gone.
#[tokio::test]
async fn connections_on_network_threads_are_served_there_in_turn_and_the_threads_end_with_them() {
    let threads = server::NetworkThreads::start(2, "tq-net").unwrap();
    assert_eq!(threads_named("tq-net-"), 2);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server::serve_on(
        listener,
        Arc::new(WhereServed),
        ConnectionConfig::default(),
        txmq_remoting::ServerSecurity::default(),
        Some(threads.clone()),
        shutdown.clone(),
    ));
    let mut served = Vec::new();
    for _ in 0..4 {
        let conn = client(&addr, None).await;
        let answer = conn.call(GetRoute { topic: "t".into() }).await.unwrap();
        served.push(answer.topic);
    }
    assert_eq!(served, ["tq-net-0", "tq-net-1", "tq-net-0", "tq-net-1"]);

    shutdown.cancel();
    serving.await.unwrap();
    drop(threads);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while threads_named("tq-net-") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the threads did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
