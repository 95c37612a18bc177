//! The gRPC port's accept loop: what txmq's own port does on accept, for
//! the connections tonic serves.
//!
//! - `TCP_NODELAY` and TCP keepalive on every connection, as on txmq's own
//!   port, so that a peer gone without a word frees its slot (tonic's own
//!   settings are not applied to connections it is handed, as here).
//! - At most `--max-connections` gRPC connections at once: one past it is
//!   closed at once, with a `WARN` line, and a closed one frees its slot.
//! - An accept that fails (the process out of file descriptors, say) backs
//!   off for 100 ms with a `WARN` line, where tonic's loop would try again
//!   at once and spin a core for as long as the condition lasts.
//! - With `--tls-cert` and `--tls-key`, TLS (ALPN `h2`), the handshake
//!   beside the loop as on txmq's own port; a plaintext client is closed
//!   with a `WARN` line.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use txmq_remoting::logging::Throttle;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};
use txmq_remoting::tls::{TlsServer, TlsServerStream};

use crate::BrokerInner;

/// The connections accepted on `listener`, within the broker's limit,
/// through `tls`'s handshake when given. The loop stops once the stream is
/// dropped (tonic drops it when it stops serving), closing the listener.
pub(super) fn accepted(
    b: Arc<BrokerInner>,
    listener: TcpListener,
    tcp: txmq_remoting::ConnectionConfig,
    tls: Option<TlsServer>,
) -> impl Stream<Item = Result<Counted, std::convert::Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(b, listener, tcp, tls, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

async fn accept_loop(
    b: Arc<BrokerInner>,
    listener: TcpListener,
    tcp: txmq_remoting::ConnectionConfig,
    tls: Option<TlsServer>,
    tx: mpsc::Sender<Counted>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tx.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                static THROTTLE: Throttle = Throttle::new();
                txmq_remoting::server::after_failed_accept(&e, "gRPC accept", &THROTTLE).await;
                continue;
            }
        };
        if let Err(e) = txmq_remoting::prepare_tcp(&stream, &tcp) {
            txmq_remoting::warn_throttled!(%peer, error = %e, "cannot set up accepted gRPC connection");
            continue;
        }
        let max = b.config.max_connections;
        if !crate::take_slot(&b.grpc_connections, max) {
            txmq_remoting::warn_throttled!(%peer, max, "gRPC connection refused: --max-connections reached; closed");
            continue;
        }
        // The slot is held through the handshake: handshakes under way
        // count against the limit too.
        let slot = Slot(b.clone());
        match &tls {
            None => {
                let counted = Counted {
                    io: Io::Plain(stream),
                    _slot: slot,
                };
                if tx.send(counted).await.is_err() {
                    return;
                }
            }
            // The handshake runs beside the loop: a slow or silent peer
            // holds up no one else.
            Some(tls) => {
                let (tls, tx, wait) = (tls.clone(), tx.clone(), tcp.hello_timeout);
                tokio::spawn(async move {
                    let peer = peer.to_string();
                    let Some(stream) =
                        txmq_remoting::server::tls_accept(&tls, stream, &peer, wait).await
                    else {
                        return;
                    };
                    let counted = Counted {
                        io: Io::Tls(Box::new(stream)),
                        _slot: slot,
                    };
                    let _ = tx.send(counted).await;
                });
            }
        }
    }
}

/// A gRPC connection's place among `--max-connections`, given back when
/// the connection is dropped.
struct Slot(Arc<BrokerInner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.grpc_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection holding its slot.
pub(super) struct Counted {
    io: Io,
    _slot: Slot,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsServerStream>),
}

/// What a call knows of its connection (in its request's extensions).
#[derive(Clone, Debug)]
pub(super) struct Peer {
    /// The client's address.
    pub(super) addr: Option<std::net::SocketAddr>,
    /// The name on the certificate the client presented (mutual TLS).
    pub(super) cert_name: Option<String>,
    /// Whether a call of the connection was refused as not signed in.
    refused: Arc<std::sync::atomic::AtomicBool>,
}

impl Peer {
    /// Whether this is the connection's first call refused as not signed
    /// in (the next ones are logged at DEBUG).
    pub(super) fn first_refusal(&self) -> bool {
        !self.refused.swap(true, Ordering::Relaxed)
    }
}

impl Connected for Counted {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        let (tcp, cert_name): (TcpConnectInfo, _) = match &self.io {
            Io::Plain(s) => (s.connect_info(), None),
            Io::Tls(s) => (
                s.get_ref().0.connect_info(),
                txmq_remoting::tls::client_name(s),
            ),
        };
        Peer {
            addr: tcp.remote_addr(),
            cert_name,
            refused: Arc::default(),
        }
    }
}

/// Calls `$call` on the connection's stream, plain or TLS.
macro_rules! on_io {
    ($self:ident, $s:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $call
            }
            Io::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_io!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(self, s => s.poll_shutdown(cx))
    }
}
