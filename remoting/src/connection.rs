//! One connection: a reader task, a writer task, and a handle to send requests.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    Call, ErrorCode, Frame, FrameCodec, Hello, HelloOk, Request, Response, WireError,
    DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION,
};

use crate::Error;

/// A boxed, sendable future: what a [`Service`] returns for one request.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Answers the requests a peer sends on a connection.
pub trait Service: Send + Sync + 'static {
    /// Accepts or refuses the peer's hello (server side only). The version has
    /// already been checked.
    ///
    /// # Errors
    /// A refusal, sent to the peer before the connection closes.
    fn hello(&self, conn: &Connection, hello: &Hello) -> Result<HelloOk, WireError> {
        let _ = (conn, hello);
        Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: String::new(),
        })
    }

    /// Handles one request. Called on the connection's reader task, so it must
    /// not block: do the work in the returned future, which is polled
    /// concurrently with the connection's other requests.
    fn call(&self, conn: &Connection, request: Request) -> BoxFuture<Result<Response, WireError>>;

    /// The connection closed (called once, on the reader task).
    fn closed(&self, conn: &Connection) {
        let _ = conn;
    }
}

/// Settings of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Frames longer than this close the connection (default 8 MiB).
    pub max_frame_len: usize,
    /// How long [`Connection::call`] waits for an answer (default 10 s).
    pub request_timeout: Duration,
    /// Requests from the peer handled at once; more wait in the socket (default 4096).
    pub max_inflight: usize,
    /// Bytes of requests from the peer handled at once (their frames);
    /// past it the connection reads nothing more until answers go out, so
    /// one connection cannot hold 4096 x 8 MiB (default 64 MiB). A single
    /// request larger than this is still served, alone.
    pub max_inflight_bytes: usize,
    /// How long a server waits for the hello (default 10 s).
    pub hello_timeout: Duration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            request_timeout: Duration::from_secs(10),
            max_inflight: 4096,
            max_inflight_bytes: 64 << 20,
            hello_timeout: Duration::from_secs(10),
        }
    }
}

enum Outgoing {
    Frame(Frame),
    /// Write everything queued before this, then close.
    Close,
    /// Write the leftover of a direct write.
    Flush,
    /// Frames already encoded (a batch of responses).
    Encoded(bytes::Bytes),
}

/// Gathered responses are written once they reach this many bytes.
const MAX_BATCH: usize = 256 * 1024;

type Pending = HashMap<u64, oneshot::Sender<Result<Response, WireError>>>;

/// The socket's write half, shared between the writer task and senders.
///
/// While the writer task is idle (nothing queued), `half` is here and a
/// sender writes its frame itself with a non-blocking `try_write`, saving a
/// wake-up of the writer task per frame. The writer task takes `half` while
/// it writes and gives it back only when the queue is empty, checked under
/// this lock; a sender writes directly only when the queue is empty too
/// (also checked under this lock), so a frame written directly does not
/// overtake a queued one. (The one exception is the instant between the
/// writer task taking a frame off the queue and taking `half`: only an
/// answer can be written directly then, since a request goes direct only
/// when no other is pending, and answers are matched by id.)
struct WriteSide {
    half: Option<OwnedWriteHalf>,
    /// What a direct write could not finish; the writer task writes it
    /// first, and no direct write happens while it is not empty.
    leftover: BytesMut,
    /// Reused encoding buffer of direct writes.
    buf: BytesMut,
    codec: FrameCodec,
}

struct Inner {
    id: u64,
    peer: String,
    out: mpsc::Sender<Outgoing>,
    write: Mutex<WriteSide>,
    pending: Mutex<Pending>,
    next_request_id: AtomicU64,
    closed: CancellationToken,
    peer_hello: OnceLock<Hello>,
    config: ConnectionConfig,
    /// Set by the reader before each request it hands to the service:
    /// another whole frame was read with it.
    more_read: AtomicBool,
}

/// A handle to one connection. Cloning is cheap; the connection lives until
/// either side closes it, whether or not handles remain.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id)
            .field("peer", &self.inner.peer)
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Opens a connection to `addr`, says `hello` and waits for the answer.
    /// `service`, if given, answers requests the server sends on this
    /// connection; without one they are refused with `UNSUPPORTED_REQUEST`.
    ///
    /// # Errors
    /// [`Error::Connect`] when the TCP connection fails, [`Error::Remote`]
    /// when the server refuses the hello, [`Error::Timeout`] when it does not answer.
    pub async fn connect(
        addr: &str,
        hello: Hello,
        service: Option<Arc<dyn Service>>,
        config: ConnectionConfig,
    ) -> Result<Connection, Error> {
        let connect_err = |message: String| Error::Connect {
            addr: addr.to_string(),
            message,
        };
        let stream = tokio::time::timeout(config.request_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = Connection::start(
            stream,
            Side::Client,
            service,
            config,
            CancellationToken::new(),
        )
        .map_err(|e| connect_err(e.to_string()))?;
        match conn.call(hello).await {
            Ok(ok) if ok.version == PROTOCOL_VERSION => Ok(conn),
            Ok(ok) => {
                conn.close();
                Err(Error::Remote(WireError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "server speaks protocol version {}, this client {PROTOCOL_VERSION}",
                        ok.version
                    ),
                )))
            }
            Err(e) => {
                conn.close();
                Err(e)
            }
        }
    }

    /// Starts the reader and writer tasks for an open socket.
    pub(crate) fn start(
        stream: TcpStream,
        side: Side,
        service: Option<Arc<dyn Service>>,
        config: ConnectionConfig,
        closed: CancellationToken,
    ) -> std::io::Result<Connection> {
        stream.set_nodelay(true)?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let (read_half, write_half) = stream.into_split();
        let (tx, rx) = mpsc::channel(4096);
        let conn = Connection {
            inner: Arc::new(Inner {
                id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
                peer,
                out: tx,
                write: Mutex::new(WriteSide {
                    half: Some(write_half),
                    leftover: BytesMut::new(),
                    buf: BytesMut::with_capacity(16 * 1024),
                    codec: FrameCodec::new(config.max_frame_len),
                }),
                pending: Mutex::new(HashMap::new()),
                next_request_id: AtomicU64::new(1),
                closed,
                peer_hello: OnceLock::new(),
                config,
                more_read: AtomicBool::new(false),
            }),
        };
        tokio::spawn(write_loop(rx, conn.inner.clone()));
        let reader = FramedRead::with_capacity(
            read_half,
            FrameCodec::new(conn.inner.config.max_frame_len),
            64 * 1024,
        );
        tokio::spawn(read_loop(reader, side, service, conn.clone()));
        Ok(conn)
    }

    /// Sends a typed request and waits for its typed answer, up to the
    /// configured request timeout.
    ///
    /// # Errors
    /// [`Error::Remote`] with the peer's error, [`Error::Timeout`],
    /// [`Error::Closed`], or [`Error::UnexpectedResponse`].
    pub async fn call<C: Call>(&self, request: C) -> Result<C::Reply, Error> {
        self.call_with_timeout(request, self.inner.config.request_timeout)
            .await
    }

    /// [`Connection::call`] with an explicit timeout (for long polls).
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub async fn call_with_timeout<C: Call>(
        &self,
        request: C,
        timeout: Duration,
    ) -> Result<C::Reply, Error> {
        let request = request.into_request();
        let kind = request.kind();
        let response = self.request(request, timeout).await?;
        C::from_response(response).map_err(|_| Error::UnexpectedResponse { kind })
    }

    /// Sends a request and waits up to `timeout` for the answer.
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Response, Error> {
        let kind = request.kind();
        let id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let alone = {
            let mut pending = lock(&self.inner.pending);
            pending.insert(id, tx);
            pending.len() == 1
        };
        // The only request in flight goes out at once; with others in
        // flight, the writer task gathers this one with the requests other
        // tasks send meanwhile into one write.
        let frame = Outgoing::Frame(Frame::Request(id, request));
        let queued = if alone {
            queue_or_closed(&self.inner, frame).await
        } else {
            queue_only(&self.inner, frame).await
        };
        if !queued {
            lock(&self.inner.pending).remove(&id);
            return Err(self.closed_error());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(e))) => Err(Error::Remote(e)),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(Error::Timeout {
                    kind,
                    peer: self.inner.peer.clone(),
                    after: timeout,
                })
            }
        }
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            peer: self.inner.peer.clone(),
        }
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Closes the connection at once; requests in flight fail with [`Error::Closed`].
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// Waits until the connection is closed.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await
    }

    /// The peer's hello (server side), once received.
    pub fn peer_hello(&self) -> Option<&Hello> {
        self.inner.peer_hello.get()
    }

    /// Whether another whole request arrived in the same read as the one
    /// being handed to [`Service::call`]: a service may then wait for it to
    /// batch their work. Meaningful inside `call` only.
    pub fn more_requests_read(&self) -> bool {
        self.inner.more_read.load(Ordering::Relaxed)
    }

    /// A process-unique id of this connection.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &str {
        &self.inner.peer
    }

    fn respond(&self, id: u64, result: Result<Response, WireError>) -> bool {
        send_now(&self.inner, Outgoing::Frame(Frame::Response(id, result))).is_ok()
    }
}

/// Writes `item` at once when the writer task is idle and the socket takes
/// it without waiting, else queues it for the writer task. Hands the item
/// back when the queue is full.
// The item comes back by value so that a full queue costs no allocation.
#[allow(clippy::result_large_err)]
fn send_now(inner: &Inner, item: Outgoing) -> Result<(), Outgoing> {
    let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
    let w = &mut *w;
    if let (Outgoing::Frame(frame), Some(half)) = (&item, w.half.as_ref()) {
        if w.leftover.is_empty() && queue_empty(inner) && !inner.closed.is_cancelled() {
            w.buf.clear();
            encode_frame(&mut w.codec, frame, &mut w.buf, inner);
            let written = match half.try_write(&w.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    debug!(peer = %inner.peer, error = %e, "write failed; closing");
                    inner.closed.cancel();
                    return Ok(());
                }
            };
            if written == w.buf.len() {
                return Ok(());
            }
            // The socket is full: the writer task finishes it (the queue
            // is empty while the half is here, so the wake-up fits).
            w.leftover.extend_from_slice(&w.buf[written..]);
            let _ = inner.out.try_send(Outgoing::Flush);
            return Ok(());
        }
    }
    inner.out.try_send(item).map_err(|e| match e {
        mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item) => item,
    })
}

/// Nothing waits in the writer task's queue: a direct write would not
/// overtake anything.
fn queue_empty(inner: &Inner) -> bool {
    inner.out.capacity() == inner.out.max_capacity()
}

/// Sends or queues a frame ([`send_now`]), waiting for room in the queue,
/// giving up when the connection closes meanwhile; false when it is closed.
async fn queue_or_closed(inner: &Inner, item: Outgoing) -> bool {
    let item = match send_now(inner, item) {
        Ok(()) => return !inner.closed.is_cancelled(),
        Err(item) => item,
    };
    queue_only(inner, item).await
}

/// Queues `item` for the writer task, waiting for room in the queue,
/// giving up when the connection closes meanwhile; false when it is closed.
async fn queue_only(inner: &Inner, item: Outgoing) -> bool {
    tokio::select! {
        r = inner.out.send(item) => r.is_ok(),
        _ = inner.closed.cancelled() => false,
    }
}

/// Writes the responses gathered in `batch` at once when the writer task is
/// idle and the socket takes them, else hands them to the writer task;
/// false when the connection is closed.
async fn flush_batch(inner: &Inner, batch: &mut BytesMut) -> bool {
    if batch.is_empty() {
        return !inner.closed.is_cancelled();
    }
    {
        let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
        let w = &mut *w;
        if let Some(half) = w.half.as_ref() {
            if w.leftover.is_empty() && queue_empty(inner) && !inner.closed.is_cancelled() {
                let written = match half.try_write(batch) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(e) => {
                        debug!(peer = %inner.peer, error = %e, "write failed; closing");
                        inner.closed.cancel();
                        return false;
                    }
                };
                if written == batch.len() {
                    batch.clear();
                    return true;
                }
                w.leftover.extend_from_slice(&batch[written..]);
                batch.clear();
                let _ = inner.out.try_send(Outgoing::Flush);
                return true;
            }
        }
    }
    let encoded = batch.split().freeze();
    queue_only(inner, Outgoing::Encoded(encoded)).await
}

fn lock(m: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // A panic while holding this lock cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `buf` starts with a whole frame (its length prefix and body).
fn holds_a_frame(buf: &[u8]) -> bool {
    match buf.get(..4) {
        Some(prefix) => {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            buf.len() - 4 >= len
        }
        None => false,
    }
}

/// A handler's future tagged with its request id.
struct Tagged {
    id: u64,
    /// The request frame's length, held until it is answered.
    bytes: usize,
    fut: BoxFuture<Result<Response, WireError>>,
}

impl Future for Tagged {
    type Output = (u64, usize, Result<Response, WireError>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (id, bytes) = (self.id, self.bytes);
        self.fut.as_mut().poll(cx).map(|r| (id, bytes, r))
    }
}

// `greeted` only gates entry to the serving loop, which ends by `break`.
#[allow(clippy::while_immutable_condition)]
async fn read_loop(
    mut reader: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    side: Side,
    service: Option<Arc<dyn Service>>,
    conn: Connection,
) {
    let inner = conn.inner.clone();
    let mut greeted = side == Side::Client;
    if !greeted {
        let first = tokio::select! {
            f = reader.next() => f,
            _ = tokio::time::sleep(inner.config.hello_timeout) => {
                debug!(peer = %inner.peer, "no hello in time; closing");
                None
            }
            _ = inner.closed.cancelled() => None,
        };
        greeted = match first {
            Some(Ok(Decoded::Frame(Frame::Request(id, Request::Hello(hello))))) => {
                answer_hello(&conn, service.as_deref(), id, hello)
            }
            Some(Ok(Decoded::Frame(Frame::Request(id, other)))) => {
                warn!(peer = %inner.peer, kind = other.kind(), "first request is not a hello; closing");
                refuse_and_close(
                    &conn,
                    id,
                    ErrorCode::HelloRequired,
                    "the first request must be a hello".into(),
                )
                .await;
                false
            }
            Some(Ok(Decoded::Malformed {
                is_request: true,
                id,
                error,
            })) => {
                warn!(peer = %inner.peer, %error, "malformed first request; closing");
                refuse_and_close(
                    &conn,
                    id,
                    ErrorCode::MalformedRequest,
                    format!("malformed request: {error}"),
                )
                .await;
                false
            }
            Some(Ok(_)) => {
                warn!(peer = %inner.peer, "first frame is not a request; closing");
                false
            }
            Some(Err(e)) => {
                warn!(peer = %inner.peer, error = %e, "bad frame; closing connection");
                false
            }
            None => false,
        };
    }

    let mut inflight: FuturesUnordered<Tagged> = FuturesUnordered::new();
    let mut inflight_bytes = 0usize;
    let mut bytes_limit_logged = false;
    // Responses ready at once go out in one write: gathered here while
    // requests or answers are ready, written when the loop would wait.
    let mut batch = BytesMut::new();
    let mut codec = FrameCodec::new(inner.config.max_frame_len);
    while greeted {
        tokio::select! {
            biased;
            _ = inner.closed.cancelled() => break,
            Some((id, bytes, result)) = inflight.next(), if !inflight.is_empty() => {
                inflight_bytes -= bytes;
                encode_frame(&mut codec, &Frame::Response(id, result), &mut batch, &inner);
                // Nothing else to answer soon (no request pending, none read):
                // write now rather than after another read attempt.
                let last = inflight.is_empty() && !holds_a_frame(reader.read_buffer());
                if (last || batch.len() >= MAX_BATCH) && !flush_batch(&inner, &mut batch).await {
                    break;
                }
            }
            next = reader.next(), if inflight.len() < inner.config.max_inflight
                && (inflight_bytes < inner.config.max_inflight_bytes || inflight.is_empty()) => match next {
                None => break,
                Some(Err(txmq_protocol::codec::CodecError::Io(e))) => {
                    // A reset or a peer gone mid-frame: not the peer's bad input.
                    debug!(peer = %inner.peer, error = %e, "connection lost");
                    break;
                }
                Some(Err(e)) => {
                    warn!(peer = %inner.peer, error = %e, "bad frame; closing connection");
                    break;
                }
                Some(Ok(Decoded::Frame(Frame::Response(id, result)))) => {
                    if let Some(tx) = lock(&inner.pending).remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                Some(Ok(Decoded::Frame(Frame::Request(id, Request::Hello(_))))) => {
                    conn.respond(id, Err(WireError::new(ErrorCode::HelloRequired, "hello already received")));
                }
                Some(Ok(Decoded::Frame(Frame::Request(id, request)))) => match &service {
                    Some(service) => {
                        inner.more_read.store(holds_a_frame(reader.read_buffer()), Ordering::Relaxed);
                        let bytes = reader.decoder().last_frame_len();
                        inflight_bytes += bytes;
                        if inflight_bytes >= inner.config.max_inflight_bytes && !bytes_limit_logged {
                            bytes_limit_logged = true;
                            info!(peer = %inner.peer, inflight_bytes, limit = inner.config.max_inflight_bytes,
                                "requests in flight reach the connection's byte limit; reading pauses until answers go out");
                        }
                        inflight.push(Tagged { id, bytes, fut: service.call(&conn, request) });
                    }
                    None => {
                        let e = WireError::new(
                            ErrorCode::UnsupportedRequest,
                            format!("{} requests are not served here", request.kind()),
                        );
                        encode_frame(&mut codec, &Frame::Response(id, Err(e)), &mut batch, &inner);
                    }
                },
                Some(Ok(Decoded::Malformed { is_request, id, error })) => {
                    warn!(peer = %inner.peer, %error, "malformed frame; closing connection");
                    if is_request {
                        let _ = flush_batch(&inner, &mut batch).await;
                        refuse_and_close(&conn, id, ErrorCode::MalformedRequest, format!("malformed request: {error}")).await;
                    } else if let Some(tx) = lock(&inner.pending).remove(&id) {
                        let _ = tx.send(Err(WireError::new(ErrorCode::MalformedRequest, format!("malformed response: {error}"))));
                    }
                    break;
                }
            },
            // Nothing else is ready: write what was gathered.
            () = std::future::ready(()), if !batch.is_empty() => {
                if !flush_batch(&inner, &mut batch).await {
                    break;
                }
            }
        }
    }
    let _ = flush_batch(&inner, &mut batch).await;
    if !greeted || !inner.closed.is_cancelled() {
        // Let the writer flush what is queued (a refusal, say), then stop.
        let _ = send_now(&inner, Outgoing::Close);
    }
    // Give the writer a moment to flush a final error before cancelling.
    tokio::select! {
        _ = inner.closed.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(200)) => inner.closed.cancel(),
    }
    lock(&inner.pending).clear();
    if let Some(service) = &service {
        service.closed(&conn);
    }
    debug!(peer = %inner.peer, "connection closed");
}

fn answer_hello(conn: &Connection, service: Option<&dyn Service>, id: u64, hello: Hello) -> bool {
    if hello.version != PROTOCOL_VERSION {
        warn!(peer = %conn.inner.peer, version = hello.version, "unsupported protocol version; closing");
        conn.respond(
            id,
            Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this server speaks version {PROTOCOL_VERSION}",
                    hello.version
                ),
            )),
        );
        return false;
    }
    let answer = match service {
        Some(s) => s.hello(conn, &hello),
        None => Ok(HelloOk {
            version: PROTOCOL_VERSION,
            server: String::new(),
        }),
    };
    let ok = answer.is_ok();
    if ok {
        let _ = conn.inner.peer_hello.set(hello);
    }
    conn.respond(id, answer.map(Response::Hello));
    ok
}

async fn refuse_and_close(conn: &Connection, id: u64, code: ErrorCode, message: String) {
    let frame = Outgoing::Frame(Frame::Response(id, Err(WireError::new(code, message))));
    let _ = queue_or_closed(&conn.inner, frame).await;
}

async fn write_loop(mut rx: mpsc::Receiver<Outgoing>, inner: Arc<Inner>) {
    let mut codec = FrameCodec::new(inner.config.max_frame_len);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut closing = false;
    let mut half: Option<OwnedWriteHalf> = None;
    'outer: while !closing {
        let first = tokio::select! {
            f = rx.recv() => f,
            _ = inner.closed.cancelled() => None,
        };
        let Some(first) = first else { break };
        {
            // Taken at once: while the writer task holds the half, senders
            // queue behind `first` instead of writing before it.
            let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
            if half.is_none() {
                half = w.half.take();
            }
            buf.extend_from_slice(&w.leftover);
            w.leftover.clear();
        }
        // Let the tasks woken together with this one (by one read of many
        // answers, say) queue their frames too, so that one write takes all.
        tokio::task::yield_now().await;
        let Some(writer) = half.as_mut() else { break };
        closing = encode_into(&mut codec, first, &mut buf, &inner);
        loop {
            // Everything queued meanwhile goes out in the same write.
            while !closing && buf.len() < 1024 * 1024 {
                match rx.try_recv() {
                    Ok(next) => closing = encode_into(&mut codec, next, &mut buf, &inner),
                    Err(_) => break,
                }
            }
            // A peer that stops reading must not pin the connection: closing
            // (by either side, or a timeout upstream) ends the write.
            let written = tokio::select! {
                r = writer.write_all(&buf) => r,
                _ = inner.closed.cancelled() => break 'outer,
            };
            if let Err(e) = written {
                debug!(peer = %inner.peer, error = %e, "write failed; closing");
                break 'outer;
            }
            if buf.capacity() > 4 * 1024 * 1024 {
                buf = BytesMut::with_capacity(64 * 1024);
            } else {
                buf.clear();
            }
            if closing {
                break 'outer;
            }
            // Idle: give the half back for direct writes, unless something
            // was queued meanwhile (checked under the senders' lock).
            let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
            if rx.is_empty() {
                w.half = half.take();
                break;
            }
        }
    }
    let mut half = half.or_else(|| {
        inner
            .write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .half
            .take()
    });
    if let Some(h) = half.as_mut() {
        let _ = h.shutdown().await;
    }
    inner.closed.cancel();
}

/// Encodes one outgoing item; returns true when it asks to close.
fn encode_into(codec: &mut FrameCodec, item: Outgoing, buf: &mut BytesMut, inner: &Inner) -> bool {
    match item {
        Outgoing::Close => true,
        Outgoing::Flush => false,
        Outgoing::Encoded(bytes) => {
            buf.extend_from_slice(&bytes);
            false
        }
        Outgoing::Frame(frame) => {
            encode_frame(codec, &frame, buf, inner);
            false
        }
    }
}

/// Encodes one frame; one too large fails its request or is answered with
/// an error instead.
fn encode_frame(codec: &mut FrameCodec, frame: &Frame, buf: &mut BytesMut, inner: &Inner) {
    if let Err(e) = codec.encode(frame, buf) {
        let error = WireError::new(ErrorCode::FrameTooLarge, e.to_string());
        match frame {
            Frame::Request(id, _) => {
                if let Some(tx) = lock(&inner.pending).remove(id) {
                    let _ = tx.send(Err(error));
                }
            }
            Frame::Response(id, _) => {
                warn!(peer = %inner.peer, %error, "response cannot be sent; answering with an error");
                let _ = codec.encode(&Frame::Response(*id, Err(error)), buf);
            }
        }
    }
}
