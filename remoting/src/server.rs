//! Accepting connections.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::acl::ServerSecurity;
use crate::connection::{prepare_tcp, PeerAuth, Side, Stream};
use crate::tls::TlsServer;
use crate::{Connection, ConnectionConfig, Service};

/// Accepts connections on `listener` and serves each with `service` until
/// `shutdown` is cancelled; then stops accepting and closes every connection
/// it accepted.
pub async fn serve(
    listener: TcpListener,
    service: Arc<dyn Service>,
    config: ConnectionConfig,
    shutdown: CancellationToken,
) {
    serve_with(
        listener,
        service,
        config,
        ServerSecurity::default(),
        shutdown,
    )
    .await;
}

/// [`serve`] with TLS on every accepted connection and, with an ACL file,
/// authentication in every hello.
pub async fn serve_with(
    listener: TcpListener,
    service: Arc<dyn Service>,
    config: ConnectionConfig,
    security: ServerSecurity,
    shutdown: CancellationToken,
) {
    serve_on(listener, service, config, security, None, shutdown).await;
}

/// [`serve_with`], each connection served by one of `threads` (in turn)
/// instead of the runtime that accepts; `None` serves them where accepted.
pub async fn serve_on(
    listener: TcpListener,
    service: Arc<dyn Service>,
    config: ConnectionConfig,
    security: ServerSecurity,
    threads: Option<Arc<NetworkThreads>>,
    shutdown: CancellationToken,
) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = match prepare_tcp(&stream, &config) {
                    Ok(peer) => peer,
                    Err(e) => {
                        crate::warn_throttled!(error = %e, "cannot set up accepted connection");
                        continue;
                    }
                };
                // Entered, the chosen thread's runtime gets the socket's
                // registration and the connection's tasks.
                let placed = threads.as_ref().map(|t| t.next().enter());
                let stream = if placed.is_some() {
                    match stream.into_std().and_then(TcpStream::from_std) {
                        Ok(s) => s,
                        Err(e) => {
                            crate::warn_throttled!(error = %e, "cannot move accepted connection to its thread");
                            continue;
                        }
                    }
                } else {
                    stream
                };
                let token = shutdown.child_token();
                let acl = security.acl.clone();
                match &security.tls {
                    None => {
                        Connection::start(
                            Stream::Tcp(stream),
                            peer,
                            Side::Server,
                            Some(service.clone()),
                            config.clone(),
                            token,
                            PeerAuth {
                                cert_name: None,
                                acl,
                            },
                        );
                    }
                    Some(tls) => {
                        // The handshake runs beside the accept loop: a slow
                        // or silent peer holds up no one else.
                        let (tls, service, config) = (tls.clone(), service.clone(), config.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                () = handshake(tls, stream, peer, service, config, token.clone(), acl) => {}
                                () = token.cancelled() => {}
                            }
                        });
                    }
                }
                drop(placed);
            }
            Err(e) => {
                static THROTTLE: crate::logging::Throttle = crate::logging::Throttle::new();
                after_failed_accept(&e, "accept", &THROTTLE).await;
            }
        }
    }
    info!(%addr, "stopped accepting connections");
}

/// How long an accept loop waits after an accept that failed.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// After an accept failed with `e` (`what` names it in the log): a
/// connection gone before it was taken costs nothing, as the next one may
/// be waiting already; any other error (out of file descriptors, say) is
/// logged (at `WARN` at most once per [`crate::logging::PEER_REPEAT`] by
/// `throttle`, the accept loop's own) and waited out for
/// [`ACCEPT_BACKOFF`] instead of spinning a core.
pub async fn after_failed_accept(
    e: &std::io::Error,
    what: &str,
    throttle: &crate::logging::Throttle,
) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionReset) {
        tracing::debug!(error = %e, "connection gone before its {what}");
        return;
    }
    crate::warn_throttled!(@throttle; error = %e, "{what} failed; trying again in {ACCEPT_BACKOFF:?}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Threads that each run a single-threaded runtime and serve the
/// connections placed on them.
///
/// On tokio's multi-thread runtime a worker that finds a second task ready
/// wakes a parked worker to take it, and the tasks of a connection wander
/// between threads: with many requests in flight that costs more than the
/// work they do. Placed on one of these threads, a connection's reader,
/// writer and handlers stay on it, and wake no other thread but the ones
/// they hand work to. What a request does that blocks its thread (file
/// work done inline, such as a segment roll's `fdatasync`) holds up the
/// other connections of that thread meanwhile. The threads stop when the
/// last handle is dropped; what still runs on them is dropped, and the
/// connections still on them are closed.
pub struct NetworkThreads {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
    stop: CancellationToken,
}

impl NetworkThreads {
    /// Starts `n` threads (at least one) named `{name}-{i}` (keep `name`
    /// short: Linux shows 15 bytes of a thread's name).
    ///
    /// # Errors
    /// A runtime or thread that cannot be started.
    pub fn start(n: usize, name: &str) -> std::io::Result<Arc<NetworkThreads>> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            // Each runtime is made on its own thread: one that failed, or
            // a thread that never started, must not drop a runtime here,
            // which may be async code (tokio refuses that).
            let (made, handle) = std::sync::mpsc::channel();
            let stopped = stop.clone();
            let started = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            let _ = made.send(Ok(runtime.handle().clone()));
                            runtime.block_on(stopped.cancelled());
                        }
                        Err(e) => {
                            let _ = made.send(Err(e));
                        }
                    }
                });
            let handle = started.and_then(|_| {
                handle
                    .recv()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended at once")))
            });
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(NetworkThreads {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
            stop,
        }))
    }

    /// The thread the next connection goes to.
    fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

impl Drop for NetworkThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn handshake(
    tls: TlsServer,
    stream: TcpStream,
    peer: String,
    service: Arc<dyn Service>,
    config: ConnectionConfig,
    token: CancellationToken,
    acl: Option<Arc<crate::acl::AclStore>>,
) {
    let Some(stream) = tls_accept(&tls, stream, &peer, config.hello_timeout).await else {
        return;
    };
    let cert_name = crate::tls::client_name(&stream);
    Connection::start(
        Stream::Tls(Box::new(stream)),
        peer,
        Side::Server,
        Some(service),
        config,
        token,
        PeerAuth { cert_name, acl },
    );
}

/// The TLS handshake of an accepted connection, within `wait`; `None`
/// (logged, the socket closed) when the peer speaks plaintext, sends no
/// handshake in time or fails it.
pub async fn tls_accept(
    tls: &TlsServer,
    stream: TcpStream,
    peer: &str,
    wait: Duration,
) -> Option<crate::tls::TlsServerStream> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            crate::warn_throttled!(%peer, "plaintext (not TLS) connection to a TLS port; closing");
            close_cleanly(stream).await;
            return None;
        }
        Ok(Ok(1)) => {}
        Ok(Ok(_)) | Ok(Err(_)) => return None,
        Err(_) => {
            crate::warn_throttled!(%peer, "no TLS handshake in time; closing");
            return None;
        }
    }
    match tokio::time::timeout(wait, tls.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            crate::warn_throttled!(%peer, error = %e, "TLS handshake failed; closing");
            None
        }
        Err(_) => {
            crate::warn_throttled!(%peer, "TLS handshake timed out; closing");
            None
        }
    }
}

/// Reads what the peer sent (so the close is a FIN, not a reset) and
/// closes the socket.
async fn close_cleanly(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    while let Ok(Ok(())) = tokio::time::timeout_at(deadline, stream.readable()).await {
        match stream.try_read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown().await;
}
