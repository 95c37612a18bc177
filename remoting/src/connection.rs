//! One connection: a reader task, a writer task, and a handle to send requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use foldhash::HashMap;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    Call, ErrorCode, Frame, FrameCodec, Hello, HelloOk, Request, Response, WireError,
    DEFAULT_MAX_FRAME_LEN, PROTOCOL_VERSION,
};

use crate::acl::{auth_signature, AclStore};
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
            challenge: None,
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
    /// How long [`Connection::call`] waits for an answer (default 10 s),
    /// counting the wait for room to send it.
    pub request_timeout: Duration,
    /// Requests from the peer handled at once; more wait in the socket (default 4096).
    pub max_inflight: usize,
    /// Bytes of requests from the peer handled at once (their frames);
    /// past it the connection reads nothing more until answers go out, so
    /// one connection cannot hold 4096 x 8 MiB (default 64 MiB). A single
    /// request larger than this is still served, alone.
    pub max_inflight_bytes: usize,
    /// Bytes of encoded frames waiting for the socket (default 8 MiB). Past
    /// it, senders wait (within their timeout) and answers to the peer wait
    /// unencoded in their handlers, so a peer that reads slowly costs this
    /// much, not an answer per request it sent. A frame is admitted while
    /// less than this is queued, so one larger frame still goes out.
    pub max_queued_bytes: usize,
    /// How long a server waits for the hello (default 10 s).
    pub hello_timeout: Duration,
    /// How long a frame from a client may take to arrive once its first
    /// bytes have (server side; default 30 s; zero: no limit). A peer that stops, or trickles,
    /// mid-frame has its connection closed between once and twice this
    /// after the frame began, so that it cannot hold the frame's memory for
    /// good. Time the reader is paused by this side's own limits does not
    /// count.
    pub frame_timeout: Duration,
    /// Idle time before TCP keepalive probes start (default 15 s; zero turns
    /// keepalive off); data may stay unacknowledged, or the peer's receive
    /// window shut, for twice this before the kernel drops the connection.
    /// A peer whose machine vanished, or that stopped reading, is then
    /// noticed in seconds instead of the kernel's 15 minutes.
    pub keepalive: Duration,
    /// TLS for connections this side opens (client side).
    pub tls: Option<crate::tls::TlsClient>,
    /// The user this side signs in as when a server asks (client side).
    pub credentials: Option<crate::acl::Credentials>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            request_timeout: Duration::from_secs(10),
            max_inflight: 4096,
            max_inflight_bytes: 64 << 20,
            max_queued_bytes: 8 << 20,
            hello_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(15),
            tls: None,
            credentials: None,
        }
    }
}

/// Gathered responses are handed to the writer once they reach this many bytes.
const MAX_BATCH: usize = 256 * 1024;

/// Requests in a row that time out with nothing at all heard from the peer
/// meanwhile: the peer is taken for gone and the connection closed, so that
/// a pool opens a new one rather than waiting on a dead socket.
const SILENT_TIMEOUTS_TO_CLOSE: u32 = 2;

/// Requests sent and not answered yet, with their deadlines.
///
/// A request's deadline is kept here, not in a timer of its own: the
/// connection's sweeper task ([`sweep_deadlines`]) sleeps until the earliest
/// deadline and drops the entries past theirs, which ends their waits. So a
/// request registers no timer, and the sweeper wakes about once per request
/// timeout however many requests go by.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Waiting>,
    /// When the sweeper wakes next; `None` while it waits for a request.
    sweep_at: Option<Instant>,
}

struct Waiting {
    answer: oneshot::Sender<Result<Response, Error>>,
    deadline: Instant,
}

/// Hands the answer to request `id` to its waiting caller. The caller's
/// entry is taken under the lock and the answer handed over after it: the
/// hand-over wakes the caller's task, which on a multi-thread runtime may
/// wake another worker thread, and the tasks sending requests meanwhile
/// need the lock.
fn deliver(pending: &Mutex<Pending>, id: u64, result: Result<Response, Error>) {
    let waiting = lock(pending).waiting.remove(&id);
    if let Some(w) = waiting {
        let _ = w.answer.send(result);
    }
}

/// The socket's write half and the bytes waiting for it, shared between the
/// writer task and senders.
///
/// Senders encode their frames straight into `queued`, under this lock, and
/// wake the writer task, which swaps `queued` for its own (empty) buffer and
/// writes it: every frame queued since its last write goes out in one write,
/// and no frame is allocated on its own. While the writer task is idle
/// (nothing queued), `half` is here and a sender writes its frame itself
/// without waiting (a `try_write`, or under TLS a write and flush polled
/// once), saving a wake-up of the writer task; a frame is written directly
/// only when nothing is queued, so it never overtakes a queued one. The
/// writer task takes `half` with the bytes it writes and gives it back only
/// once `queued` is empty and nothing is left to flush, both under this lock.
struct WriteSide {
    half: Option<Writer>,
    /// Encoded frames waiting for the writer task (the rest of a direct
    /// write that the socket did not take goes here too).
    queued: BytesMut,
    /// Reused encoding buffer of direct writes.
    buf: BytesMut,
    codec: FrameCodec,
    /// Close once `queued` is written; nothing more is queued after it.
    close: bool,
    /// A direct TLS write left encrypted bytes the socket did not take yet:
    /// the writer task must flush them even with nothing queued.
    unflushed: bool,
}

/// How an attempt to queue a frame went.
enum Queue {
    Done,
    /// `max_queued_bytes` are waiting already; nothing was queued.
    Full,
    Closed,
}

struct Inner {
    id: u64,
    peer: String,
    write: Mutex<WriteSide>,
    /// Wakes the writer task: something was queued.
    wake_writer: Notify,
    /// Wakes senders waiting for room: the writer task took the queue.
    room: Notify,
    pending: Mutex<Pending>,
    /// Wakes the sweeper: a request's deadline comes before its next wake.
    sweep: Notify,
    next_request_id: AtomicU64,
    /// Cancelled when the connection closes: through [`Inner::close`], or
    /// through its parent (a server's shutdown).
    closed: CancellationToken,
    /// Set by [`Inner::close`] (which the read and write loops call as they
    /// end), by the sweeper when it sees `closed` cancelled, and by
    /// [`Connection::closed`] (all through [`Inner::mark_closed`]); read
    /// instead of the token: its `is_cancelled` takes a lock, which tasks
    /// sending on one connection took in turn up to three times a request
    /// (1.75% of a client's CPU with 16 producers sharing one connection,
    /// plus the lock's contention). A cancel through the parent shows here
    /// once the sweeper or the write loop runs, a turn of the scheduler
    /// later.
    is_closed: AtomicBool,
    /// The read loop's task, woken when `is_closed` is set: the loop waits
    /// on this and the flag instead of the token, whose future takes two
    /// locks each time the loop is polled (about 1.5% of a broker's CPU
    /// at 16 producers, in flight 1). A cancel through the parent reaches
    /// it through the sweeper, which awaits the token.
    read_waker: AtomicWaker,
    /// Why the reader stopped, when the socket failed under it (a reset,
    /// a TLS alert): told to a hello that the close cut short.
    lost: OnceLock<String>,
    peer_hello: OnceLock<Hello>,
    config: ConnectionConfig,
    /// Set by the reader before each request it hands to the service:
    /// another whole frame was read with it.
    more_read: AtomicBool,
    /// Requests timed out in a row with no frame read meanwhile.
    silent_timeouts: AtomicU32,
    /// Who the peer authenticated as (server side, with an ACL file).
    user: OnceLock<String>,
    /// The name in the peer's TLS client certificate (server side).
    cert_name: Option<String>,
    /// The ACL file the peer authenticates against (server side).
    acl: Option<Arc<AclStore>>,
}

impl Inner {
    fn close(&self) {
        self.mark_closed();
        self.closed.cancel();
    }

    /// Sets `is_closed` (the token is or will be cancelled) and wakes the
    /// read loop.
    fn mark_closed(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.read_waker.wake();
    }

    /// Ready once `is_closed` is set: cheap to poll (an atomic load; the
    /// waker is registered again only when the task's waker changed, which
    /// a spawned task's does not).
    fn closed_flag(&self) -> impl Future<Output = ()> + '_ {
        let mut registered: Option<std::task::Waker> = None;
        std::future::poll_fn(move |cx| {
            if self.is_closed() {
                return Poll::Ready(());
            }
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                self.read_waker.register(cx.waker());
                registered = Some(cx.waker().clone());
                // Set between the check and the registration: seen here.
                if self.is_closed() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
    }

    fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Acquire)
    }
}

/// A socket's byte stream under TLS (either side).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open socket a connection runs on.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Tls(Box<dyn Io>),
}

/// Reads and drops up to `unread` bytes of `reader` (at most 64 MiB, for
/// at most `within`): the rest of a frame refused unread.
async fn skip_unread(reader: &mut Reader, unread: usize, within: Duration) {
    const MOST: u64 = 64 << 20;
    let mut rest = tokio::io::AsyncReadExt::take(reader, (unread as u64).min(MOST));
    let _ = tokio::time::timeout(within, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
}

/// The read side of a [`Stream`].
enum Reader {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Box<dyn Io>>),
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// The write side of a [`Stream`], lent to senders for direct writes while
/// the writer task is idle.
enum Writer {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Box<dyn Io>>),
}

impl Writer {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Tcp(w) => w.write_all(buf).await,
            Writer::Tls(w) => {
                w.write_all(buf).await?;
                w.flush().await
            }
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Writer::Tcp(w) => w.shutdown().await,
            Writer::Tls(w) => w.shutdown().await,
        }
    }

    /// Writes what the socket takes now, without waiting: how many bytes of
    /// `buf` it took, and whether they all left (under TLS, encrypted bytes
    /// may stay buffered for the writer task to flush).
    fn write_now(&mut self, buf: &[u8]) -> std::io::Result<(usize, bool)> {
        match self {
            Writer::Tcp(w) => match w.try_write(buf) {
                Ok(n) => Ok((n, true)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok((0, true)),
                Err(e) => Err(e),
            },
            Writer::Tls(w) => {
                // Polled once with a waker that does nothing: whatever would
                // wait is left to the writer task, which polls with its own.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut taken = 0;
                while taken < buf.len() {
                    match Pin::new(&mut *w).poll_write(&mut cx, &buf[taken..]) {
                        Poll::Ready(Ok(0)) | Poll::Pending => break,
                        Poll::Ready(Ok(n)) => taken += n,
                        Poll::Ready(Err(e)) => return Err(e),
                    }
                }
                match Pin::new(&mut *w).poll_flush(&mut cx) {
                    Poll::Ready(Ok(())) => Ok((taken, true)),
                    Poll::Pending => Ok((taken, false)),
                    Poll::Ready(Err(e)) => Err(e),
                }
            }
        }
    }
}

/// Sets up a freshly opened or accepted socket (no delay, keepalive);
/// returns the peer's address. Also for sockets served by another protocol
/// (the broker's gRPC port), so that they are set up as txmq's own.
pub fn prepare_tcp(stream: &TcpStream, config: &ConnectionConfig) -> std::io::Result<String> {
    stream.set_nodelay(true)?;
    if !config.keepalive.is_zero() {
        set_keepalive(stream, config.keepalive)?;
    }
    Ok(stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into()))
}

/// What a server knows of an accepted connection's peer before its hello.
#[derive(Default)]
pub(crate) struct PeerAuth {
    pub cert_name: Option<String>,
    pub acl: Option<Arc<AclStore>>,
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

/// The longest first frame (a hello) a server takes.
const MAX_HELLO_LEN: usize = 64 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// [`crate::warn_throttled!`] with a throttle for each side: a server's
/// peers cannot push a line about this process's own connections (to a
/// master, a nameserver) down to `DEBUG`.
macro_rules! warn_throttled_side {
    ($side:expr; $($args:tt)+) => {{
        static THROTTLES: [crate::logging::Throttle; 2] =
            [crate::logging::Throttle::new(), crate::logging::Throttle::new()];
        crate::warn_throttled!(@THROTTLES[usize::from($side == Side::Server)]; $($args)+)
    }};
}

/// Removes a request's pending entry unless its answer arrived: a request
/// future dropped at any await (its caller gave up in a `select!`) leaves
/// nothing behind.
struct PendingEntry<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.inner.pending).waiting.remove(&self.id);
        }
    }
}

/// How [`Connection::request_when`] (or [`Connection::try_request_when`]) went.
pub enum Queued<'a> {
    /// The request is on its way: its answer comes through the [`Reply`].
    Sent(Reply<'a>),
    /// `ready` said no (or, from `try_request_when`, the write queue had no
    /// room): nothing was sent, and this is the request back.
    NotReady(Request),
}

/// How [`Connection::start_request`] went.
enum Started<'a> {
    /// Queued, or refused by `ready`.
    Done(Queued<'a>),
    /// The write queue is full: the frame waits for room. Boxed: few
    /// requests wait, and inline it would make every request's `Started`
    /// too large to move in registers (176 bytes).
    NoRoom(Box<Unsent<'a>>),
}

/// A registered request whose frame is not queued yet.
struct Unsent<'a> {
    /// Its answer to come, once the frame is queued.
    reply: Reply<'a>,
    frame: Frame,
    /// The only request in flight when it was registered.
    alone: bool,
}

impl<'a> Unsent<'a> {
    /// What became of the request, once the try to queue its frame
    /// ([`try_send`], [`send_frame`]) went as `sent`.
    fn sent(self, sent: Sent) -> Result<Queued<'a>, Error> {
        settle(self.reply, self.frame, sent)
    }
}

/// What became of a request with `reply` to come and `frame`, once the try
/// to queue the frame went as `sent`. Takes the two apart, not an
/// [`Unsent`]: a request queued at once is never put together as one (a
/// copy of 176 bytes per request).
fn settle(reply: Reply<'_>, frame: Frame, sent: Sent) -> Result<Queued<'_>, Error> {
    match sent {
        Sent::Queued => Ok(Queued::Sent(reply)),
        Sent::Closed => Err(reply.conn.closed_error()),
        Sent::NotReady => {
            // Dropping the reply removes the pending entry.
            drop(reply);
            let Frame::Request(_, request) = frame else {
                unreachable!("a request frame stays one")
            };
            Ok(Queued::NotReady(request))
        }
    }
}

/// A request sent on a connection, and its answer to come. Dropped before
/// the answer, it leaves nothing pending (the answer, if it comes, is dropped).
pub struct Reply<'a> {
    conn: &'a Connection,
    entry: PendingEntry<'a>,
    rx: oneshot::Receiver<Result<Response, Error>>,
    deadline: Instant,
    kind: &'static str,
    timeout: Duration,
}

impl<'a> Reply<'a> {
    /// Waits for the answer, up to the request's deadline.
    ///
    /// # Errors
    /// As [`Connection::call`], but for [`Error::UnexpectedResponse`].
    // A plain future over the reply (no `async fn`): its callers' futures
    // hold it, and an `async fn` would hold the reply twice.
    pub fn answer(mut self) -> impl Future<Output = Result<Response, Error>> + Send + 'a {
        std::future::poll_fn(move |cx| self.poll_answer(cx))
    }

    /// [`Reply::answer`], as the typed answer of `C`.
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub fn answer_as<C: Call>(
        mut self,
    ) -> impl Future<Output = Result<C::Reply, Error>> + Send + 'a {
        std::future::poll_fn(move |cx| {
            self.poll_answer(cx).map(|answer| {
                C::from_response(answer?).map_err(|_| Error::UnexpectedResponse { kind: self.kind })
            })
        })
    }

    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response, Error>> {
        Poll::Ready(match std::task::ready!(Pin::new(&mut self.rx).poll(cx)) {
            Ok(answer) => {
                // The reader removed the entry when it took the answer.
                self.entry.armed = false;
                answer
            }
            // The sweeper dropped the entry at its deadline, or the
            // connection closed and dropped them all.
            Err(_) if Instant::now() >= self.deadline => {
                Err(self.conn.timed_out(self.kind, self.timeout))
            }
            Err(_) => Err(self.conn.closed_error()),
        })
    }
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Opens a connection to `addr`, says `hello` and waits for the answer.
    /// `service`, if given, answers requests the server sends on this
    /// connection; without one they are refused with `UNSUPPORTED_REQUEST`.
    ///
    /// # Errors
    /// [`Error::Connect`] when the TCP connection fails or closes before
    /// its hello (or sign-in) is answered, [`Error::Remote`] when the
    /// server refuses the hello, [`Error::Timeout`] when it does not answer.
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
        let peer = prepare_tcp(&stream, &config).map_err(|e| connect_err(e.to_string()))?;
        let stream = match &config.tls {
            Some(tls) => Stream::Tls(Box::new(
                tokio::time::timeout(config.request_timeout, tls.connect(addr, stream))
                    .await
                    .map_err(|_| connect_err("TLS handshake timed out".into()))?
                    .map_err(connect_err)?,
            )),
            None => Stream::Tcp(stream),
        };
        let credentials = config.credentials.clone();
        let cert_name = config
            .tls
            .as_ref()
            .and_then(|t| t.cert_name())
            .map(str::to_string);
        let plaintext = config.tls.is_none();
        let conn = Connection::start(
            stream,
            peer,
            Side::Client,
            service,
            config,
            CancellationToken::new(),
            PeerAuth::default(),
        );
        let mut answer = conn.call(hello).await;
        if let Ok(HelloOk {
            challenge: Some(challenge),
            ..
        }) = &answer
        {
            answer = match &credentials {
                Some(c) => {
                    conn.call(txmq_protocol::Authenticate {
                        access_key: c.access_key.clone(),
                        signature: auth_signature(&c.secret_key, challenge, &c.access_key),
                    })
                    .await
                }
                None => Err(Error::Remote(WireError::new(
                    ErrorCode::AuthenticationFailed,
                    format!(
                        "{addr} requires authentication: {}give an access key and a secret key \
                         (--access-key and --secret-key, or TXMQ_ACCESS_KEY and TXMQ_SECRET_KEY)",
                        match &cert_name {
                            Some(name) => format!(
                                "this client's certificate names '{name}', who signs in by \
                                 certificate only where the server checks client certificates \
                                 (it has --tls-ca) and its ACL file has a user '{name}'; or "
                            ),
                            None => String::new(),
                        }
                    ),
                ))),
            };
        }
        match answer {
            Ok(ok) if ok.version == PROTOCOL_VERSION && ok.challenge.is_none() => Ok(conn),
            Ok(ok) if ok.challenge.is_some() => {
                conn.close();
                Err(Error::Remote(WireError::new(
                    ErrorCode::AuthenticationFailed,
                    "the server asked for authentication twice",
                )))
            }
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
            // Closed under the hello: the connection was never made (no
            // request went on it). Why the reader stopped says more (a TLS
            // alert: the server wants a client certificate, say); under a
            // plaintext hello, a close is what a server that listens with
            // TLS does.
            Err(Error::Closed { .. }) => {
                conn.close();
                let why = conn
                    .inner
                    .lost
                    .get()
                    .map(|why| crate::tls::with_hint(format!(": {why}")))
                    .unwrap_or_default();
                let hint = if plaintext {
                    " (a server that listens with TLS closes plaintext connections: if it does, \
                     give --tls-ca)"
                } else {
                    ""
                };
                Err(connect_err(format!(
                    "the connection closed during its hello{why}{hint}"
                )))
            }
            Err(e) => {
                conn.close();
                Err(e)
            }
        }
    }

    /// Starts the reader and writer tasks for an open socket (set up by
    /// [`prepare_tcp`], under TLS already past its handshake).
    pub(crate) fn start(
        stream: Stream,
        peer: String,
        side: Side,
        service: Option<Arc<dyn Service>>,
        config: ConnectionConfig,
        closed: CancellationToken,
        auth: PeerAuth,
    ) -> Connection {
        let (read_half, write_half) = match stream {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Reader::Tcp(r), Writer::Tcp(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (Reader::Tls(r), Writer::Tls(w))
            }
        };
        let conn = Connection {
            inner: Arc::new(Inner {
                id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
                peer,
                write: Mutex::new(WriteSide {
                    half: Some(write_half),
                    queued: BytesMut::new(),
                    buf: BytesMut::with_capacity(16 * 1024),
                    codec: FrameCodec::new(config.max_frame_len),
                    close: false,
                    unflushed: false,
                }),
                wake_writer: Notify::new(),
                room: Notify::new(),
                pending: Mutex::new(Pending::default()),
                sweep: Notify::new(),
                next_request_id: AtomicU64::new(1),
                closed,
                is_closed: AtomicBool::new(false),
                read_waker: AtomicWaker::new(),
                lost: OnceLock::new(),
                peer_hello: OnceLock::new(),
                config,
                more_read: AtomicBool::new(false),
                silent_timeouts: AtomicU32::new(0),
                user: OnceLock::new(),
                cert_name: auth.cert_name,
                acl: auth.acl,
            }),
        };
        tokio::spawn(write_loop(conn.inner.clone()));
        tokio::spawn(sweep_deadlines(conn.inner.clone()));
        let codec = FrameCodec::new(conn.inner.config.max_frame_len);
        // A server (the broker) writes the bodies it receives to its log and
        // drops them: they may share the frame's buffer. A client's messages
        // go to application code, which may keep one of many for long.
        let codec = match side {
            Side::Server => codec.with_shared_bodies(),
            Side::Client => codec,
        };
        let reader = FramedRead::with_capacity(read_half, codec, 64 * 1024);
        tokio::spawn(read_loop(reader, side, service, conn.clone()));
        conn
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
        // Taken apart before the answer is awaited, so that this future
        // does not keep the request's outcome across that wait.
        let reply = match self
            .request_when(request.into_request(), timeout, &mut |_| true)
            .await?
        {
            Queued::Sent(reply) => reply,
            Queued::NotReady(_) => unreachable!("a request always ready was not sent"),
        };
        reply.answer_as::<C>().await
    }

    /// Sends a request and waits up to `timeout` for the answer; the
    /// timeout counts the wait for room to send it too.
    ///
    /// # Errors
    /// As [`Connection::call`].
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Response, Error> {
        let reply = match self.request_when(request, timeout, &mut |_| true).await? {
            Queued::Sent(reply) => reply,
            Queued::NotReady(_) => unreachable!("a request always ready was not sent"),
        };
        reply.answer().await
    }

    /// Queues a request once `ready` says so, and hands back its [`Reply`]
    /// without waiting for the answer. `ready` is called at most once,
    /// when the frame has room: under the connection's write lock, so that
    /// requests made ready in some order (numbered by `ready`, say) reach
    /// the peer in that order, whichever task queues them. It may change
    /// the request; false sends nothing and hands the request back
    /// ([`Queued::NotReady`]). `timeout` counts the wait for room too.
    ///
    /// `ready` runs with a lock held that every sender on this connection
    /// takes: it must be quick and must not send on this connection.
    ///
    /// # Errors
    /// [`Error::Timeout`] when the frame found no room in time,
    /// [`Error::Closed`]: also after `ready` said yes, when the write of
    /// the frame failed (the peer may have read it).
    pub async fn request_when(
        &self,
        request: Request,
        timeout: Duration,
        ready: &mut (dyn FnMut(&mut Request) -> bool + Send),
    ) -> Result<Queued<'_>, Error> {
        // Most frames find room at once and are queued without a wait, in
        // a plain function: this future holds its arguments and a box, not
        // the frame and the bookkeeping, and every caller's future holds
        // this one (and copies it as it starts it).
        let wait = match self.start_request(request, timeout, ready) {
            Ok(Started::Done(queued)) => return Ok(queued),
            Err(e) => return Err(e),
            // Boxed: the wait (its timer, the queue's notification) would
            // otherwise take a place in every request's future, and few
            // requests wait.
            Ok(Started::NoRoom(unsent)) => Box::pin(self.send_when_room(unsent, ready)),
        };
        wait.await
    }

    /// [`Connection::request_when`] without its wait: when the write queue
    /// has no room, nothing is sent (`ready` is not asked) and the request
    /// comes back as [`Queued::NotReady`], as when `ready` says no.
    ///
    /// # Errors
    /// As [`Connection::request_when`], but for [`Error::Timeout`].
    pub fn try_request_when(
        &self,
        request: Request,
        timeout: Duration,
        ready: &mut dyn FnMut(&mut Request) -> bool,
    ) -> Result<Queued<'_>, Error> {
        match self.start_request(request, timeout, ready)? {
            Started::Done(queued) => Ok(queued),
            Started::NoRoom(unsent) => unsent.sent(Sent::NotReady),
        }
    }

    /// Registers the request and queues its frame if the queue has room
    /// ([`Connection::request_when`] without its wait).
    fn start_request(
        &self,
        request: Request,
        timeout: Duration,
        ready: &mut dyn FnMut(&mut Request) -> bool,
    ) -> Result<Started<'_>, Error> {
        let kind = request.kind();
        let deadline = Instant::now() + timeout;
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let alone = {
            let mut pending = lock(&self.inner.pending);
            let waiting = Waiting {
                answer: tx,
                deadline,
            };
            pending.waiting.insert(id, waiting);
            if pending.sweep_at.is_none_or(|at| deadline < at) {
                pending.sweep_at = Some(deadline);
                self.inner.sweep.notify_one();
            }
            pending.waiting.len() == 1
        };
        let reply = Reply {
            conn: self,
            entry: PendingEntry {
                inner: &self.inner,
                id,
                armed: true,
            },
            rx,
            deadline,
            kind,
            timeout,
        };
        let mut frame = Frame::Request(id, request);
        // The only request in flight goes out at once; with others in
        // flight, the writer task gathers this one with the requests other
        // tasks send meanwhile into one write. A timer is armed only if the
        // frame has to wait for room.
        Ok(match try_send(&self.inner, &mut frame, alone, ready) {
            Some(sent) => Started::Done(settle(reply, frame, sent)?),
            None => Started::NoRoom(Box::new(Unsent {
                reply,
                frame,
                alone,
            })),
        })
    }

    /// Waits for room for a frame [`Connection::start_request`] could not
    /// queue, up to its request's deadline.
    async fn send_when_room<'c>(
        &'c self,
        mut unsent: Box<Unsent<'c>>,
        ready: &mut (dyn FnMut(&mut Request) -> bool + Send),
    ) -> Result<Queued<'c>, Error> {
        let deadline = unsent.reply.deadline;
        let sent = tokio::select! {
            sent = send_frame(&self.inner, &mut unsent.frame, unsent.alone, ready) => sent,
            () = tokio::time::sleep_until(deadline) => {
                return Err(self.timed_out(unsent.reply.kind, unsent.reply.timeout));
            }
        };
        unsent.sent(sent)
    }

    /// The error of a request that timed out. Timeouts in a row with
    /// nothing heard from the peer meanwhile close the connection.
    fn timed_out(&self, kind: &'static str, after: Duration) -> Error {
        let silent = self.inner.silent_timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if silent == SILENT_TIMEOUTS_TO_CLOSE {
            warn!(peer = %self.inner.peer, kind, ?after, "{silent} requests in a row timed out and the peer sent nothing meanwhile; closing the connection");
            self.close();
        }
        Error::Timeout {
            kind,
            peer: self.inner.peer.clone(),
            after,
        }
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            peer: self.inner.peer.clone(),
        }
    }

    /// True once the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Closes the connection at once; requests in flight fail with [`Error::Closed`].
    pub fn close(&self) {
        self.inner.close();
    }

    /// Waits until the connection is closed.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
        self.inner.mark_closed();
    }

    /// Who the peer authenticated as (server side, with an ACL file in
    /// force): an access key, or the name in its client certificate.
    pub fn user(&self) -> Option<&str> {
        self.inner.user.get().map(String::as_str)
    }

    /// The peer's hello, once received (server side).
    pub fn peer_hello(&self) -> Option<&Hello> {
        self.inner.peer_hello.get()
    }

    /// Whether another whole request arrived in the same read as the one
    /// being handed to [`Service::call`]: a service may then wait for it to
    /// batch their work. Meaningful inside `call` only.
    pub fn more_requests_read(&self) -> bool {
        self.inner.more_read.load(Ordering::Relaxed)
    }

    /// Requests sent on this connection and not answered yet.
    pub fn pending_requests(&self) -> usize {
        lock(&self.inner.pending).waiting.len()
    }

    /// A process-unique id of this connection.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &str {
        &self.inner.peer
    }

    /// Sends an answer without waiting for room; false when it was not sent.
    fn respond(&self, id: u64, result: Result<Response, WireError>) -> bool {
        matches!(
            try_queue(
                &self.inner,
                &mut Frame::Response(id, result),
                true,
                &mut |_| true
            ),
            Some(Queue::Done)
        )
    }
}

/// Turns on TCP keepalive (probes after `idle`, then every `idle / 3`, three
/// of them) and, where the system has it, a user timeout of twice `idle`:
/// data the peer does not acknowledge (or a receive window it keeps shut)
/// for that long drops the connection.
fn set_keepalive(stream: &TcpStream, idle: Duration) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let probes = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)));
    #[cfg(any(target_os = "linux", target_os = "android", target_vendor = "apple"))]
    let probes = probes.with_retries(3);
    sock.set_tcp_keepalive(&probes)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(idle * 2))?;
    Ok(())
}

/// Queues `frame` for the writer task, or, with `direct`, writes it at
/// once when the writer task is idle and nothing is queued. A request
/// frame goes only if `ready` says so once it has room (see
/// [`Connection::request_when`]); `None` when it did not.
fn try_queue(
    inner: &Inner,
    frame: &mut Frame,
    direct: bool,
    ready: &mut dyn FnMut(&mut Request) -> bool,
) -> Option<Queue> {
    let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
    let w = &mut *w;
    if w.close || inner.is_closed() {
        return Some(Queue::Closed);
    }
    let direct = direct && w.queued.is_empty() && !w.unflushed && w.half.is_some();
    if !direct && w.queued.len() >= inner.config.max_queued_bytes {
        return Some(Queue::Full);
    }
    if let Frame::Request(_, request) = frame {
        if !ready(request) {
            return None;
        }
    }
    if let (true, Some(half)) = (direct, w.half.as_mut()) {
        w.buf.clear();
        encode_frame(&mut w.codec, frame, &mut w.buf, inner);
        return Some(
            match write_direct(inner, half, &w.buf, &mut w.queued, &mut w.unflushed) {
                true => Queue::Done,
                false => Queue::Closed,
            },
        );
    }
    encode_frame(&mut w.codec, frame, &mut w.queued, inner);
    inner.wake_writer.notify_one();
    Some(Queue::Done)
}

/// Writes `bytes` with the idle writer task's socket half, without waiting;
/// what the socket does not take goes to the (empty) queue for the writer
/// task, and what it did not flush is marked `unflushed` for it. False when
/// the write failed, which closes the connection.
fn write_direct(
    inner: &Inner,
    half: &mut Writer,
    bytes: &[u8],
    queued: &mut BytesMut,
    unflushed: &mut bool,
) -> bool {
    let (written, flushed) = match half.write_now(bytes) {
        Ok(done) => done,
        Err(e) => {
            debug!(peer = %inner.peer, error = %e, "write failed; closing");
            inner.close();
            return false;
        }
    };
    if written < bytes.len() || !flushed {
        queued.extend_from_slice(&bytes[written..]);
        *unflushed = !flushed;
        inner.wake_writer.notify_one();
    }
    true
}

/// How [`send_frame`] went.
enum Sent {
    Queued,
    /// `ready` said no.
    NotReady,
    Closed,
}

/// Tries to send `frame` ([`try_queue`]) without waiting: `None` when
/// the queue was full.
fn try_send(
    inner: &Inner,
    frame: &mut Frame,
    direct: bool,
    ready: &mut dyn FnMut(&mut Request) -> bool,
) -> Option<Sent> {
    match try_queue(inner, frame, direct, ready) {
        Some(Queue::Done) => Some(Sent::Queued),
        Some(Queue::Closed) => Some(Sent::Closed),
        None => Some(Sent::NotReady),
        Some(Queue::Full) => None,
    }
}

/// Sends `frame` ([`try_send`]), waiting for room in the queue.
async fn send_frame(
    inner: &Inner,
    frame: &mut Frame,
    direct: bool,
    ready: &mut (dyn FnMut(&mut Request) -> bool + Send),
) -> Sent {
    // Most frames find room at once: no waiter is registered for them.
    if let Some(s) = try_send(inner, frame, direct, ready) {
        return s;
    }
    loop {
        // Registered before the next try, so that room made after that
        // try's look at the queue wakes this one.
        let room = inner.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        if let Some(s) = try_send(inner, frame, direct, ready) {
            return s;
        }
        tokio::select! {
            () = room => {}
            () = inner.closed.cancelled() => return Sent::Closed,
        }
    }
}

/// Waits until the writer's queue has room (or the connection closed).
async fn room(inner: &Inner) {
    let room = inner.room.notified();
    tokio::pin!(room);
    room.as_mut().enable();
    if has_room(inner) {
        return;
    }
    tokio::select! {
        () = room => {}
        () = inner.closed.cancelled() => {}
    }
}

fn has_room(inner: &Inner) -> bool {
    let w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
    w.queued.len() < inner.config.max_queued_bytes || w.close || inner.is_closed()
}

/// Hands the responses gathered in `batch` on: written at once when the
/// writer task is idle and the socket takes them, else queued for the
/// writer task. Leaves `batch` as it is when the queue is full.
fn flush_batch(inner: &Inner, batch: &mut BytesMut) -> Queue {
    if batch.is_empty() {
        return Queue::Done;
    }
    let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
    let w = &mut *w;
    if w.close || inner.is_closed() {
        return Queue::Closed;
    }
    if w.queued.is_empty() && !w.unflushed {
        if let Some(half) = w.half.as_mut() {
            let ok = write_direct(inner, half, batch, &mut w.queued, &mut w.unflushed);
            batch.clear();
            return if ok { Queue::Done } else { Queue::Closed };
        }
        // Nothing queued: the batch becomes the queue without a copy.
        std::mem::swap(&mut w.queued, batch);
    } else if w.queued.len() >= inner.config.max_queued_bytes {
        return Queue::Full;
    } else {
        w.queued.extend_from_slice(batch);
        batch.clear();
    }
    inner.wake_writer.notify_one();
    Queue::Done
}

/// Asks the writer task to write what is queued and then close.
fn close_after_writes(inner: &Inner) {
    inner.write.lock().unwrap_or_else(|e| e.into_inner()).close = true;
    inner.wake_writer.notify_one();
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

/// The handlers in flight on one connection. The first has a waker of its
/// own and is polled when woken; more go to a `FuturesUnordered`. That set
/// wakes its task again whenever it has polled every future it holds and all
/// are pending (a yield against starvation): with one request in flight, as
/// a producer's sends are, every send that waits (for the commit-log writer
/// another connection holds, for a flush) would reschedule the read loop for
/// nothing, and on a multi-thread runtime a reschedule as a yield also wakes
/// an idle worker. Like the set, the slot polls its future only when that
/// future was woken: a send that yields to gather the sends read after it
/// (`more_coming`) must not run before they are queued.
struct InFlight {
    first: Option<Tagged>,
    /// `first` is new or was woken since its last poll.
    first_due: bool,
    slot: Arc<SlotWaker>,
    /// The slot's waker, made with `slot` (once per connection, unless a
    /// clone outlives a future: see `push`).
    slot_waker: std::task::Waker,
    rest: FuturesUnordered<Tagged>,
}

/// Marks the slot's future due and wakes the read loop.
#[derive(Default)]
struct SlotWaker {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl InFlight {
    fn new() -> InFlight {
        let slot = Arc::new(SlotWaker::default());
        InFlight {
            first: None,
            first_due: false,
            slot_waker: std::task::Waker::from(slot.clone()),
            slot,
            rest: FuturesUnordered::new(),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    fn push(&mut self, tagged: Tagged) {
        if self.first.is_some() {
            self.rest.push(tagged);
            return;
        }
        // A clone of the slot's waker that outlived the last future held
        // there (kept by some registry) would wake the new one for nothing,
        // and the new one would go on past a yield too soon: it gets a
        // waker of its own then. (Held here twice: `slot`, `slot_waker`.)
        if Arc::strong_count(&self.slot) > 2 {
            let slot = Arc::new(SlotWaker::default());
            self.slot_waker = std::task::Waker::from(slot.clone());
            self.slot = slot;
        }
        (self.first, self.first_due) = (Some(tagged), true);
    }

    /// The next answer ready; pending when none is (or none is in flight).
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<(u64, usize, Result<Response, WireError>)> {
        if let Some(first) = &mut self.first {
            // Registered before the flag is read: a wake between the two
            // still wakes this task.
            self.slot.task.register(cx.waker());
            // `|`, not `||`: the flag is cleared also when the future is
            // new, so that a wake left by the last one (a future that woke
            // itself as it finished) does not count for this one.
            if std::mem::take(&mut self.first_due) | self.slot.woken.swap(false, Ordering::AcqRel) {
                let mut slot_cx = Context::from_waker(&self.slot_waker);
                if let Poll::Ready(answer) = Pin::new(first).poll(&mut slot_cx) {
                    self.first = None;
                    return Poll::Ready(answer);
                }
            }
        }
        if self.rest.is_empty() {
            return Poll::Pending;
        }
        match self.rest.poll_next_unpin(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(answer),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn next(&mut self) -> impl Future<Output = (u64, usize, Result<Response, WireError>)> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }
}

// `greeted` only gates entry to the serving loop, which ends by `break`.
#[allow(clippy::while_immutable_condition)]
async fn read_loop(
    mut reader: FramedRead<Reader, FrameCodec>,
    side: Side,
    service: Option<Arc<dyn Service>>,
    conn: Connection,
) {
    let inner = conn.inner.clone();
    let mut ended = Ended {
        conn: conn.clone(),
        service: service.clone(),
        cleaned: false,
    };
    let mut greeted = side == Side::Client;
    if !greeted {
        // A hello is small: a first frame longer is refused before its body
        // is waited for, whatever --max-frame-size allows (a TLS handshake's
        // first bytes read as a length of about 369 MB).
        let max = reader.decoder().max_frame_len();
        reader
            .decoder_mut()
            .set_max_frame_len(max.min(MAX_HELLO_LEN));
        let first = tokio::select! {
            f = reader.next() => f,
            _ = tokio::time::sleep(inner.config.hello_timeout) => {
                debug!(peer = %inner.peer, "no hello in time; closing");
                None
            }
            _ = inner.closed.cancelled() => None,
        };
        reader.decoder_mut().set_max_frame_len(max);
        greeted = match first {
            Some(Ok(Decoded::Frame(Frame::Request(id, Request::Hello(hello))))) => {
                greet(&conn, &mut reader, service.as_deref(), id, hello).await
            }
            Some(Ok(Decoded::Frame(Frame::Request(id, other)))) => {
                crate::warn_throttled!(peer = %inner.peer, kind = other.kind(), "first request is not a hello; closing");
                refuse(
                    &conn,
                    id,
                    ErrorCode::HelloRequired,
                    "the first request must be a hello".into(),
                );
                false
            }
            Some(Ok(Decoded::Malformed {
                is_request: true,
                id,
                error,
            })) => {
                crate::warn_throttled!(peer = %inner.peer, %error, "malformed first request; closing");
                refuse(
                    &conn,
                    id,
                    ErrorCode::MalformedRequest,
                    format!("malformed request: {error}"),
                );
                false
            }
            Some(Ok(_)) => {
                crate::warn_throttled!(peer = %inner.peer, "first frame is not a request; closing");
                false
            }
            Some(Err(txmq_protocol::codec::CodecError::FrameTooLarge { len, .. }))
                if len >> 16 == 0x1603 =>
            {
                // A TLS record's first bytes (handshake, version 3.x) read
                // as a length prefix.
                crate::warn_throttled!(peer = %inner.peer, "a TLS handshake on a port without TLS (probably a client \
                    with --tls-ca; this server was started without --tls-cert and --tls-key); closing");
                false
            }
            Some(Err(e)) => {
                crate::warn_throttled!(peer = %inner.peer, error = %e, "bad frame; closing connection");
                false
            }
            None => false,
        };
    }

    let mut inflight = InFlight::new();
    let mut inflight_bytes = 0usize;
    // No more requests are taken past these. The peer's requests then wait
    // in the socket, unless this side waits for answers from the peer: its
    // reader must reach them (the peer's handlers may be waiting on this
    // side's answers in turn), so requests past the limits are refused with
    // BUSY instead.
    let full = |inflight: &InFlight, bytes: usize| {
        inflight.len() >= inner.config.max_inflight
            || (bytes >= inner.config.max_inflight_bytes && !inflight.is_empty())
    };
    let mut bytes_limit_logged = false;
    // Responses ready at once go out in one write: gathered here while
    // requests or answers are ready, written when the loop would wait.
    let mut batch = BytesMut::new();
    // The writer's queue was full when the batch was to go: the loop waits
    // for room, still reading the peer's frames (answers to this side's
    // requests above all: with both sides serving, a reader that stopped
    // reading until its writer had room could wait for a peer waiting on it
    // the same way: requests past the in-flight limits are then refused with
    // BUSY rather than left in the socket), but finishes no more handlers,
    // so that their answers wait unencoded. `blocked_at` is the batch's
    // length then: the answers the loop makes itself (refusals) may add a
    // queue's worth before reading pauses too.
    let mut blocked = false;
    let mut blocked_at = 0;
    let mut codec = FrameCodec::new(inner.config.max_frame_len);
    // Made once, so that it registers the task's waker once.
    let closed = inner.closed_flag();
    tokio::pin!(closed);
    // The frame timeout guards a server's memory against its clients; a
    // client waits on its server's answers with its own request timeouts.
    let mut stall = Stall::new(match side {
        Side::Server => inner.config.frame_timeout,
        Side::Client => Duration::ZERO,
    });
    while greeted {
        let reading = !full(&inflight, inflight_bytes)
            || (blocked && batch.len() < blocked_at + inner.config.max_queued_bytes)
            || (!blocked && !lock(&inner.pending).waiting.is_empty());
        stall.watch(reading);
        tokio::select! {
            biased;
            () = &mut closed => break,
            () = room(&inner), if blocked => match flush_batch(&inner, &mut batch) {
                Queue::Done => blocked = false,
                Queue::Full => {}
                Queue::Closed => break,
            },
            (id, bytes, result) = inflight.next(), if !inflight.is_empty() && !blocked => {
                inflight_bytes -= bytes;
                encode_frame(&mut codec, &Frame::Response(id, result), &mut batch, &inner);
                // Nothing else to answer soon (no request pending, none read):
                // write now rather than after another read attempt.
                let last = inflight.is_empty() && !holds_a_frame(reader.read_buffer());
                if last || batch.len() >= MAX_BATCH {
                    match flush_batch(&inner, &mut batch) {
                        Queue::Done => {}
                        Queue::Full => (blocked, blocked_at) = (true, batch.len()),
                        Queue::Closed => break,
                    }
                }
            }
            next = reader.next(), if reading => {
                stall.frame_read();
                if inner.silent_timeouts.load(Ordering::Relaxed) != 0 {
                    inner.silent_timeouts.store(0, Ordering::Relaxed);
                }
                match next {
                None => break,
                Some(Err(txmq_protocol::codec::CodecError::Io(e))) => {
                    // A reset or a peer gone mid-frame: not the peer's bad input.
                    debug!(peer = %inner.peer, error = %e, "connection lost");
                    let _ = inner.lost.set(e.to_string());
                    break;
                }
                Some(Err(e)) => {
                    warn_throttled_side!(side; peer = %inner.peer, error = %e, "bad frame; closing connection");
                    // A request too large to read: its sender is told, so it
                    // knows the request was not served (not an unknown outcome).
                    if let txmq_protocol::codec::CodecError::FrameTooLarge { len, max, request: Some(id) } = e {
                        if service.is_some() {
                            let _ = flush_batch(&inner, &mut batch);
                            refuse(&conn, id, ErrorCode::FrameTooLarge, format!(
                                "request of {len} bytes exceeds this server's maximum frame of {max} bytes (--max-frame-size); it was not read"
                            ));
                            // The rest of the frame is read and dropped before
                            // the close: closed with it unread, the socket
                            // resets the connection, and the peer may lose
                            // the refusal (an unknown outcome after all).
                            let unread = (4 + len).saturating_sub(reader.read_buffer().len());
                            skip_unread(reader.get_mut(), unread, inner.config.hello_timeout).await;
                        }
                    }
                    break;
                }
                Some(Ok(Decoded::Frame(Frame::Response(id, result)))) => {
                    deliver(&inner.pending, id, result.map_err(Error::Remote));
                }
                Some(Ok(Decoded::Frame(Frame::Request(id, Request::Hello(_) | Request::Authenticate(_))))) => {
                    let e = WireError::new(ErrorCode::HelloRequired, "hello already received");
                    encode_frame(&mut codec, &Frame::Response(id, Err(e)), &mut batch, &inner);
                }
                Some(Ok(Decoded::Frame(Frame::Request(id, request)))) => match &service {
                    // Read only to reach the peer's answers behind it.
                    Some(_) if full(&inflight, inflight_bytes) => {
                        let e = WireError::new(
                            ErrorCode::Busy,
                            format!("too many {} requests in flight on this connection; retry later", request.kind()),
                        );
                        encode_frame(&mut codec, &Frame::Response(id, Err(e)), &mut batch, &inner);
                    }
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
                    warn_throttled_side!(side; peer = %inner.peer, %error, "malformed frame; closing connection");
                    if is_request {
                        let _ = flush_batch(&inner, &mut batch);
                        refuse(&conn, id, ErrorCode::MalformedRequest, format!("malformed request: {error}"));
                    } else {
                        deliver(&inner.pending, id, Err(Error::Remote(WireError::new(ErrorCode::MalformedRequest, format!("malformed response: {error}")))));
                    }
                    break;
                }
            }},
            () = stall.timer(), if stall.armed() => if stall.fired(!reader.read_buffer().is_empty()) {
                warn_throttled_side!(side; peer = %inner.peer, buffered = reader.read_buffer().len(),
                    timeout = ?inner.config.frame_timeout,
                    "a frame started and did not finish within the frame timeout; closing connection");
                break;
            },
            // Nothing else is ready: write what was gathered.
            () = std::future::ready(()), if !batch.is_empty() && !blocked => match flush_batch(&inner, &mut batch) {
                Queue::Done => {}
                Queue::Full => (blocked, blocked_at) = (true, batch.len()),
                Queue::Closed => break,
            },
        }
    }
    // Whatever fits goes out before the close; a peer that reads nothing
    // gets nothing more.
    let _ = flush_batch(&inner, &mut batch);
    close_after_writes(&inner);
    // Give the writer a moment to flush a final error before cancelling.
    tokio::select! {
        _ = inner.closed.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(200)) => inner.close(),
    }
    ended.clean_up(true);
    debug!(peer = %inner.peer, "connection closed");
}

/// The frame timeout ([`ConnectionConfig::frame_timeout`]), kept off the
/// per-frame path: a timer fires once per period. A frame held in part at
/// one firing, with no frame read by the next, part of one still held and
/// the reader reading all along, began at least a period before: the
/// connection closes. So a frame the peer stops sending closes it between
/// one and two periods after it began. A period in which this side paused
/// its reader (its own limits) does not count: that wait is not the peer's.
struct Stall {
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// A frame was held in part at the last firing.
    partial: bool,
    /// The reader paused since the last firing.
    paused: bool,
    frames: u64,
    frames_then: u64,
}

impl Stall {
    /// `timeout` zero (or too far off to reach): no limit.
    fn new(timeout: Duration) -> Stall {
        let reachable = timeout
            .checked_mul(2)
            .and_then(|t| Instant::now().checked_add(t))
            .is_some();
        Stall {
            timeout: if reachable { timeout } else { Duration::ZERO },
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
            partial: false,
            paused: false,
            frames: 0,
            frames_then: 0,
        }
    }

    /// Called before each wait with whether the reader reads on.
    fn watch(&mut self, reading: bool) {
        if !self.armed && !self.timeout.is_zero() {
            self.armed = true;
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
        }
        self.paused |= !reading;
    }

    fn armed(&self) -> bool {
        self.armed
    }

    fn timer(&mut self) -> &mut Pin<Box<tokio::time::Sleep>> {
        &mut self.sleep
    }

    fn frame_read(&mut self) {
        self.frames += 1;
    }

    /// The timer fired; `partial`: the reader holds part of a frame now.
    /// Whether that frame was held at the last firing too, with no frame
    /// read since and the reader reading all along (the connection is to
    /// close).
    fn fired(&mut self, partial: bool) -> bool {
        let stalled = partial && self.partial && !self.paused && self.frames == self.frames_then;
        self.partial = partial;
        self.paused = false;
        self.frames_then = self.frames;
        self.sleep.as_mut().reset(Instant::now() + self.timeout);
        stalled
    }
}

#[cfg(test)]
mod stall_tests {
    use super::*;

    /// Fires the timer (paused time) and says whether it found a stall.
    async fn fire(stall: &mut Stall, partial: bool) -> bool {
        stall.timer().as_mut().await;
        stall.fired(partial)
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_held_over_a_whole_period_of_reading_is_a_stall() {
        let mut stall = Stall::new(Duration::from_secs(30));
        stall.watch(true);
        assert!(stall.armed());
        // Part of a frame at one firing, still at the next, none read.
        assert!(!fire(&mut stall, true).await);
        stall.watch(true);
        assert!(fire(&mut stall, true).await);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_read_or_a_paused_reader_or_no_partial_frame_are_no_stall() {
        let mut stall = Stall::new(Duration::from_secs(30));
        stall.watch(true);
        assert!(!fire(&mut stall, true).await);
        // A frame read in between: progress.
        stall.frame_read();
        assert!(!fire(&mut stall, true).await);
        // The reader paused by this side's limits during the period.
        stall.watch(false);
        stall.watch(true);
        assert!(!fire(&mut stall, true).await);
        // Nothing held at the last firing (an idle connection).
        assert!(!fire(&mut stall, false).await);
        assert!(!fire(&mut stall, true).await);
        assert!(fire(&mut stall, true).await);
    }

    #[tokio::test]
    async fn zero_or_an_unreachable_timeout_is_no_limit() {
        let mut stall = Stall::new(Duration::ZERO);
        stall.watch(true);
        assert!(!stall.armed());
        let mut stall = Stall::new(Duration::MAX);
        stall.watch(true);
        assert!(!stall.armed());
    }
}

/// The end of a connection for its callers and its service: run by the read
/// loop as it ends, or when its future is dropped first (a handler that
/// panicked, a runtime shutting down), so that the connection is closed,
/// its callers get `Closed` at once rather than at their deadlines, and the
/// service forgets it.
struct Ended {
    conn: Connection,
    service: Option<Arc<dyn Service>>,
    cleaned: bool,
}

impl Ended {
    /// `tell_service`: whether to call the service's `closed`, which may
    /// spawn tasks (not outside a runtime, where a future may be dropped).
    fn clean_up(&mut self, tell_service: bool) {
        if std::mem::replace(&mut self.cleaned, true) {
            return;
        }
        self.conn.inner.close();
        lock(&self.conn.inner.pending).waiting.clear();
        if let (Some(service), true) = (&self.service, tell_service) {
            service.closed(&self.conn);
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        if !self.cleaned {
            debug!(peer = %self.conn.inner.peer, "reader dropped before its end; closing the connection");
        }
        self.clean_up(tokio::runtime::Handle::try_current().is_ok());
    }
}

/// Answers a hello: checks its version, authenticates the peer when an
/// ACL file is in force (by its client certificate, or a challenge it
/// must sign next), then asks the service.
async fn greet(
    conn: &Connection,
    reader: &mut FramedRead<Reader, FrameCodec>,
    service: Option<&dyn Service>,
    id: u64,
    hello: Hello,
) -> bool {
    let inner = &conn.inner;
    if hello.version != PROTOCOL_VERSION {
        return answer_hello(conn, service, id, hello, Response::Hello);
    }
    let Some(acl) = inner.acl.clone() else {
        return answer_hello(conn, service, id, hello, Response::Hello);
    };
    if let Some(name) = inner
        .cert_name
        .as_deref()
        .filter(|n| acl.current().has_user(n))
    {
        let _ = inner.user.set(name.to_string());
        return answer_hello(conn, service, id, hello, Response::Hello);
    }
    let challenge = crate::acl::challenge();
    conn.respond(
        id,
        Ok(Response::Hello(HelloOk {
            version: PROTOCOL_VERSION,
            server: String::new(),
            challenge: Some(challenge.clone()),
        })),
    );
    let next = tokio::select! {
        f = reader.next() => f,
        _ = tokio::time::sleep(inner.config.hello_timeout) => None,
        _ = inner.closed.cancelled() => None,
    };
    match next {
        Some(Ok(Decoded::Frame(Frame::Request(auth_id, Request::Authenticate(a))))) => {
            if !acl
                .current()
                .verify(&a.access_key, &challenge, &a.signature)
            {
                let key = crate::acl::shown_key(&a.access_key);
                warn!(peer = %inner.peer, access_key = ?key, "authentication failed; closing");
                refuse(
                    conn,
                    auth_id,
                    ErrorCode::AuthenticationFailed,
                    format!(
                        "authentication failed for access key '{key}': unknown access key or wrong secret"
                    ),
                );
                return false;
            }
            let _ = inner.user.set(a.access_key);
            answer_hello(conn, service, auth_id, hello, Response::Authenticate)
        }
        Some(Ok(Decoded::Frame(Frame::Request(other_id, other)))) => {
            warn!(peer = %inner.peer, kind = other.kind(), "no authentication after the hello; closing");
            refuse(
                conn,
                other_id,
                ErrorCode::AuthenticationFailed,
                "this server requires authentication: give an access key and a secret key".into(),
            );
            false
        }
        Some(Ok(Decoded::Malformed {
            is_request: true,
            id,
            error,
        })) => {
            warn!(peer = %inner.peer, %error, "malformed authentication; closing");
            refuse(
                conn,
                id,
                ErrorCode::MalformedRequest,
                format!("malformed request: {error}"),
            );
            false
        }
        _ => {
            match inner.cert_name.as_deref() {
                Some(name) => warn!(peer = %inner.peer, certificate = ?name,
                    "no sign-in: the client certificate names no user of the ACL file, and no keys followed; closing"),
                None => debug!(peer = %inner.peer, "no authentication in time; closing"),
            }
            false
        }
    }
}

/// Answers the hello (or the authentication completing it, `answer`
/// making the response of either).
fn answer_hello(
    conn: &Connection,
    service: Option<&dyn Service>,
    id: u64,
    hello: Hello,
    answer: fn(HelloOk) -> Response,
) -> bool {
    if hello.version != PROTOCOL_VERSION {
        crate::warn_throttled!(peer = %conn.inner.peer, version = hello.version, "unsupported protocol version; closing");
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
    let reply = match service {
        Some(s) => s.hello(conn, &hello),
        None => Ok(HelloOk::new(PROTOCOL_VERSION, "")),
    };
    let ok = reply.is_ok();
    if ok {
        let _ = conn.inner.peer_hello.set(hello);
    }
    conn.respond(id, reply.map(answer));
    ok
}

/// Answers `id` with an error; the caller closes the connection next. A
/// peer that leaves no room in the queue does not get it.
fn refuse(conn: &Connection, id: u64, code: ErrorCode, message: String) {
    let mut frame = Frame::Response(id, Err(WireError::new(code, message)));
    let _ = try_queue(&conn.inner, &mut frame, true, &mut |_| true);
}

/// Ends the waits of requests past their deadlines (see [`Pending`]):
/// sleeps until the earliest deadline, drops the entries past theirs (their
/// callers see the dropped sender and report a timeout), and sleeps again
/// until the earliest one left, or until a request comes while none is.
async fn sweep_deadlines(inner: Arc<Inner>) {
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    loop {
        let next = {
            let mut pending = lock(&inner.pending);
            let now = Instant::now();
            pending.waiting.retain(|_, w| w.deadline > now);
            pending.sweep_at = pending.waiting.values().map(|w| w.deadline).min();
            pending.sweep_at
        };
        if let Some(at) = next {
            sleep.as_mut().reset(at);
        }
        tokio::select! {
            () = &mut sleep, if next.is_some() => {}
            () = inner.sweep.notified() => {}
            () = inner.closed.cancelled() => {
                // A cancel through the parent (a server's shutdown) is
                // passed on to the read loop here.
                inner.mark_closed();
                return;
            }
        }
    }
}

async fn write_loop(inner: Arc<Inner>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut half: Option<Writer> = None;
    'outer: loop {
        tokio::select! {
            () = inner.wake_writer.notified() => {}
            () = inner.closed.cancelled() => break,
        }
        // Let the tasks woken together with this one (by one read of many
        // answers, say) queue their frames too, so that one write takes all.
        tokio::task::yield_now().await;
        loop {
            {
                let mut w = inner.write.lock().unwrap_or_else(|e| e.into_inner());
                let w = &mut *w;
                if w.queued.is_empty() && !w.unflushed {
                    if w.close {
                        break 'outer;
                    }
                    // Idle: give the half back for direct writes.
                    if let Some(h) = half.take() {
                        w.half = Some(h);
                    }
                    break;
                }
                if half.is_none() {
                    half = w.half.take();
                }
                // Writing the queue (even an empty one) flushes.
                w.unflushed = false;
                std::mem::swap(&mut buf, &mut w.queued);
            }
            inner.room.notify_waiters();
            let Some(writer) = half.as_mut() else {
                break 'outer;
            };
            // A peer that stops reading must not pin the connection: closing
            // (by either side, or after timeouts upstream) ends the write.
            let written = tokio::select! {
                r = writer.write_all(&buf) => r,
                () = inner.closed.cancelled() => break 'outer,
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
    inner.close();
    inner.room.notify_waiters();
}

/// Encodes one frame; one too large fails its request, as refused before
/// sending (the peer never sees it), or is answered with an error instead.
fn encode_frame(codec: &mut FrameCodec, frame: &Frame, buf: &mut BytesMut, inner: &Inner) {
    if let Err(e) = codec.encode(frame, buf) {
        match frame {
            Frame::Request(id, request) => {
                let (code, reason) = match e {
                    txmq_protocol::codec::CodecError::FrameTooLarge { len, max, .. } => (
                        ErrorCode::FrameTooLarge,
                        format!("its frame of {len} bytes is over the maximum of {max} bytes"),
                    ),
                    e => (ErrorCode::MalformedRequest, e.to_string()),
                };
                let error = Error::NotSent {
                    kind: request.kind(),
                    code,
                    reason,
                };
                deliver(&inner.pending, *id, Err(error));
            }
            Frame::Response(id, _) => {
                let error = WireError::new(ErrorCode::FrameTooLarge, e.to_string());
                warn!(peer = %inner.peer, %error, "response cannot be sent; answering with an error");
                let _ = codec.encode(&Frame::Response(*id, Err(error)), buf);
            }
        }
    }
}

#[cfg(test)]
mod size_tests {
    /// A request queued at once comes back from `start_request` as a
    /// `Started`, moved into its caller's result: small enough to move in
    /// registers (at most 128 bytes), not a `memcpy` call per request.
    #[test]
    fn a_started_request_moves_in_registers() {
        use std::mem::size_of;
        assert!(
            size_of::<super::Started<'_>>() <= 96,
            "{}",
            size_of::<super::Started<'_>>()
        );
        assert!(size_of::<Result<super::Queued<'_>, crate::Error>>() <= 96);
    }
}
