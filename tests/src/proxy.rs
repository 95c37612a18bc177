//! A TCP proxy that stands between clients and a broker and injects
//! network faults on command: cut every connection, delay traffic by a
//! mean plus or minus a jitter, and drop a reply after its request was
//! delivered (forward the client's bytes, then discard the broker's next
//! bytes on that connection and close it, as a network that fails at the
//! worst moment does).
//!
//! The broker advertises the proxy's address (`txmq-broker
//! --advertise-addr`), so every client reaches it only through the proxy.
//! [`Proxy::black_hole`] partitions one client from the broker: the proxy
//! reads each connection's hello, and from then on drops every byte of the
//! connections of matching client ids, both ways, keeping them open; once
//! healed, a connection that lost bytes is closed (what follows a gap is no
//! longer a whole frame), and new ones pass.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rng::Rng;

/// Counters of what a [`Proxy`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections closed by [`Proxy::cut`].
    pub cut: u64,
    /// Replies discarded by [`Proxy::drop_next_reply`].
    pub replies_dropped: u64,
}

/// A running proxy; it stops (closing every connection) when dropped.
pub struct Proxy {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
}

struct Inner {
    target: Mutex<Option<String>>,
    /// Cancelled by [`Proxy::cut`] and replaced with a fresh one; every
    /// connection holds the token current when it was accepted.
    cut: Mutex<CancellationToken>,
    /// (mean, jitter) added to every chunk, both ways.
    delay: Mutex<Option<(Duration, Duration)>>,
    /// Armed by [`Proxy::drop_next_reply`] until a connection claims it.
    drop_armed: AtomicBool,
    /// Armed by [`Proxy::drop_reply_to`]: the kind of request whose reply
    /// the next connection that sends one loses.
    drop_kind: Mutex<Option<&'static str>>,
    /// Client id prefixes whose connections pass nothing ([`Proxy::black_hole`]).
    black_holes: Mutex<Vec<String>>,
    rng: Mutex<Rng>,
    accepted: AtomicU64,
    cut_count: AtomicU64,
    dropped: AtomicU64,
    open: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Binds 127.0.0.1 on an ephemeral port and starts accepting. Until
    /// [`Proxy::set_target`] is called, connections are closed at once.
    ///
    /// # Errors
    /// The bind failure.
    pub async fn bind() -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target: Mutex::new(None),
            cut: Mutex::new(CancellationToken::new()),
            delay: Mutex::new(None),
            drop_armed: AtomicBool::new(false),
            drop_kind: Mutex::new(None),
            black_holes: Mutex::new(Vec::new()),
            rng: Mutex::new(Rng::new(u64::from(addr.port()))),
            accepted: AtomicU64::new(0),
            cut_count: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, inner.clone(), stop.clone()));
        Ok(Proxy { inner, addr, stop })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections are forwarded (`host:port`).
    pub fn set_target(&self, target: &str) {
        *lock(&self.inner.target) = Some(target.to_string());
    }

    /// Closes every open connection now (both sides); new ones are accepted
    /// as before.
    pub fn cut(&self) {
        let old = std::mem::replace(&mut *lock(&self.inner.cut), CancellationToken::new());
        self.inner
            .cut_count
            .fetch_add(self.inner.open.load(Ordering::Relaxed), Ordering::Relaxed);
        old.cancel();
    }

    /// Delays every chunk, both ways, by `mean` plus or minus up to
    /// `jitter` (keeping the byte order of each direction); `None` stops
    /// delaying new chunks.
    pub fn set_delay(&self, delay: Option<(Duration, Duration)>) {
        *lock(&self.inner.delay) = delay;
    }

    /// The next connection that forwards a request to the broker has the
    /// broker's next bytes (its reply) discarded and is then closed: the
    /// request took effect, the client never hears so.
    pub fn drop_next_reply(&self) {
        self.inner.drop_armed.store(true, Ordering::SeqCst);
    }

    /// Whether a [`Proxy::drop_next_reply`] or [`Proxy::drop_reply_to`] is
    /// still waiting for a victim.
    pub fn drop_pending(&self) -> bool {
        self.inner.drop_armed.load(Ordering::SeqCst) || lock(&self.inner.drop_kind).is_some()
    }

    /// As [`Proxy::drop_next_reply`], for the next connection that sends a
    /// request of `kind` ([`txmq_protocol::Request::kind`], e.g.
    /// `"PrepareTransaction"`), whatever it sent before (its hello, say):
    /// the broker's next bytes on it after that request are discarded and
    /// it is closed. Only requests sent after this call are looked at.
    pub fn drop_reply_to(&self, kind: &'static str) {
        *lock(&self.inner.drop_kind) = Some(kind);
    }

    /// Drops every byte, both ways, of the connections (open ones and new
    /// ones) whose hello names a client id starting with `client_id`,
    /// keeping them open: that client is cut off from the broker without
    /// either side seeing a close, as behind a firewall that drops packets.
    pub fn black_hole(&self, client_id: &str) {
        lock(&self.inner.black_holes).push(client_id.to_string());
    }

    /// Removes every fault: no delay, no armed drop, no black hole.
    pub fn heal(&self) {
        self.set_delay(None);
        self.inner.drop_armed.store(false, Ordering::SeqCst);
        *lock(&self.inner.drop_kind) = None;
        lock(&self.inner.black_holes).clear();
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.inner.accepted.load(Ordering::Relaxed),
            cut: self.inner.cut_count.load(Ordering::Relaxed),
            replies_dropped: self.inner.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        lock(&self.inner.cut).cancel();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        inner.accepted.fetch_add(1, Ordering::Relaxed);
        let inner = inner.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let target = lock(&inner.target).clone();
            let Some(target) = target else { return };
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let cut = lock(&inner.cut).child_token();
            inner.open.fetch_add(1, Ordering::Relaxed);
            let conn = Arc::new(Conn {
                victim: AtomicBool::new(false),
                close: cut,
                client_id: std::sync::OnceLock::new(),
                lost: AtomicBool::new(false),
            });
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(
                client_read,
                server_write,
                inner.clone(),
                conn.clone(),
                Direction::Up,
            );
            let down = pump(
                server_read,
                client_write,
                inner.clone(),
                conn.clone(),
                Direction::Down,
            );
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn.close.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
            inner.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One proxied connection's shared state.
struct Conn {
    /// This connection claimed the armed reply drop.
    victim: AtomicBool,
    /// Cancelled to close both sides.
    close: CancellationToken,
    /// The client id its hello named, once read.
    client_id: std::sync::OnceLock<String>,
    /// A black hole dropped some of its bytes: it cannot carry on.
    lost: AtomicBool,
}

impl Conn {
    fn black_holed(&self, inner: &Inner) -> bool {
        self.client_id.get().is_some_and(|id| {
            lock(&inner.black_holes)
                .iter()
                .any(|prefix| id.starts_with(prefix.as_str()))
        })
    }
}

/// Whether the client's bytes so far (`sent`, with `chunk` added) finish a
/// request of `kind`; whole frames are taken out of `sent` as they are
/// looked at, so what is left is the start of the next one.
fn sends_kind(sent: &mut BytesMut, chunk: &[u8], kind: &str) -> bool {
    use tokio_util::codec::Decoder;
    sent.extend_from_slice(chunk);
    let mut codec = txmq_protocol::FrameCodec::new(txmq_protocol::DEFAULT_MAX_FRAME_LEN);
    let mut found = false;
    loop {
        match codec.decode(sent) {
            Ok(Some(txmq_protocol::codec::Decoded::Frame(txmq_protocol::Frame::Request(
                _,
                request,
            )))) => found |= request.kind() == kind,
            Ok(Some(_)) => {}
            Ok(None) => return found,
            // Not at a frame's start (the arming came in the middle of
            // one): look again from the next chunk's start, where a
            // client's write of whole frames begins.
            Err(_) => {
                sent.clear();
                return found;
            }
        }
    }
}

/// Reads the client id from a connection's first bytes once they hold the
/// whole hello frame.
fn read_hello(conn: &Conn, first: &mut BytesMut, chunk: &[u8]) {
    use tokio_util::codec::Decoder;
    if conn.client_id.get().is_some() || first.len() > 64 * 1024 {
        return;
    }
    first.extend_from_slice(chunk);
    let mut codec = txmq_protocol::FrameCodec::new(txmq_protocol::DEFAULT_MAX_FRAME_LEN);
    let mut probe = first.clone();
    if let Ok(Some(txmq_protocol::codec::Decoded::Frame(txmq_protocol::Frame::Request(
        _,
        txmq_protocol::Request::Hello(hello),
    )))) = codec.decode(&mut probe)
    {
        let _ = conn.client_id.set(hello.client_id);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to broker.
    Up,
    /// Broker to client.
    Down,
}

/// Copies one direction: a reader task hands chunks with their delivery
/// times to a writer that waits for each (delays keep the order: a chunk is
/// never due before the one ahead of it).
async fn pump(
    mut from: OwnedReadHalf,
    to: OwnedWriteHalf,
    inner: Arc<Inner>,
    conn: Arc<Conn>,
    dir: Direction,
) {
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let writer = tokio::spawn(write_out(to, rx, conn.close.clone()));
    let mut last_due = Instant::now();
    let mut first = BytesMut::new();
    // The client's bytes from where a frame starts, kept only while a
    // reply drop by request kind is armed (see `sends_kind`).
    let mut sent: Option<BytesMut> = None;
    loop {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let n = tokio::select! {
            _ = conn.close.cancelled() => break,
            n = from.read_buf(&mut buf) => n,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if dir == Direction::Up {
            read_hello(&conn, &mut first, &buf);
        }
        if conn.black_holed(&inner) {
            conn.lost.store(true, Ordering::SeqCst);
            continue;
        }
        if conn.lost.load(Ordering::SeqCst) {
            // Healed, but bytes went missing both ways: the stream would
            // resume in the middle of a frame. Closing it is what a peer
            // sees after a long partition anyway.
            break;
        }
        match dir {
            Direction::Up => {
                if inner
                    .drop_armed
                    .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    conn.victim.store(true, Ordering::SeqCst);
                }
                let armed = *lock(&inner.drop_kind);
                match armed {
                    // Frames are followed from the first chunk after the
                    // arming on.
                    Some(kind)
                        if sends_kind(sent.get_or_insert_with(BytesMut::new), &buf, kind) =>
                    {
                        let mut armed = lock(&inner.drop_kind);
                        if *armed == Some(kind) {
                            *armed = None;
                            conn.victim.store(true, Ordering::SeqCst);
                        }
                    }
                    Some(_) => {}
                    None => sent = None,
                }
            }
            Direction::Down => {
                if conn.victim.load(Ordering::SeqCst) {
                    // The request went up; this is the broker's answer.
                    inner.dropped.fetch_add(1, Ordering::Relaxed);
                    conn.close.cancel();
                    break;
                }
            }
        }
        let delay = *lock(&inner.delay);
        let due = match delay {
            None => Instant::now(),
            Some((mean, jitter)) => {
                let j = jitter.as_micros() as i64;
                let offset = if j == 0 {
                    0
                } else {
                    lock(&inner.rng).below(2 * j as u64 + 1) as i64 - j
                };
                let micros = (mean.as_micros() as i64 + offset).max(0) as u64;
                Instant::now() + Duration::from_micros(micros)
            }
        };
        last_due = last_due.max(due);
        if tx.send((last_due, buf.freeze())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
    // Whichever side ends first ends the connection.
    conn.close.cancel();
}

async fn write_out(
    mut to: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Instant, Bytes)>,
    close: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = close.cancelled() => return,
            n = rx.recv() => n,
        };
        let Some((due, chunk)) = next else { break };
        tokio::select! {
            _ = close.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        if to.write_all(&chunk).await.is_err() {
            close.cancel();
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn forwards_cuts_delays_and_drops_a_reply() {
        let echo = echo_server().await;
        let proxy = Proxy::bind().await.unwrap();
        proxy.set_target(&echo.to_string());

        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");

        // Cut: the open connection ends, a new one works.
        proxy.cut();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the cut connection ends")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"again").await.unwrap(), b"again");

        // Delay: 100 ms each way, give or take 20.
        proxy.set_delay(Some((
            Duration::from_millis(100),
            Duration::from_millis(20),
        )));
        let t = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await.unwrap(), b"slow");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(160) && took < Duration::from_secs(1),
            "{took:?}"
        );
        proxy.heal();

        // Drop a reply: the echo server got the bytes (it answered), the
        // client gets nothing and the connection closes.
        proxy.drop_next_reply();
        s.write_all(b"lost").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the victim connection ends")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(!proxy.drop_pending());
        let stats = proxy.stats();
        assert_eq!(stats.accepted, 2);
        assert_eq!(stats.cut, 1);
        assert_eq!(stats.replies_dropped, 1);
    }

    /// A hello frame naming `client_id`, as a client's first bytes.
    fn hello_frame(client_id: &str) -> Vec<u8> {
        use tokio_util::codec::Encoder;
        let hello = txmq_protocol::Hello {
            version: txmq_protocol::PROTOCOL_VERSION,
            role: txmq_protocol::Role::Admin,
            client_id: client_id.into(),
            group: None,
        };
        let mut out = BytesMut::new();
        txmq_protocol::FrameCodec::new(txmq_protocol::DEFAULT_MAX_FRAME_LEN)
            .encode(
                txmq_protocol::Frame::Request(1, txmq_protocol::Request::Hello(hello)),
                &mut out,
            )
            .unwrap();
        out.to_vec()
    }

    #[tokio::test]
    async fn a_black_holed_connection_is_closed_once_healed_and_new_ones_pass() {
        let echo = echo_server().await;
        let proxy = Proxy::bind().await.unwrap();
        proxy.set_target(&echo.to_string());
        let hello = hello_frame("victim-1");
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, &hello).await.unwrap(), hello);

        // Everyone (the empty prefix): bytes vanish, the connection stays.
        proxy.black_hole("");
        s.write_all(b"into the void").await.unwrap();
        let mut buf = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf))
                .await
                .is_err(),
            "nothing comes back through a black hole, and nothing closes"
        );

        // Healed: the connection that lost bytes ends at its next bytes
        // instead of resuming mid-stream; a new one works.
        proxy.heal();
        let _ = s.write_all(b"after").await;
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the damaged connection ends")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, &hello).await.unwrap(), hello);
    }
}
