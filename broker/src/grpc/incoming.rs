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

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::BrokerInner;

/// The connections accepted on `listener`, within the broker's limit.
pub(super) fn accepted(
    b: Arc<BrokerInner>,
    listener: TcpListener,
    tcp: txmq_remoting::ConnectionConfig,
) -> impl Stream<Item = Result<Counted, std::convert::Infallible>> {
    let state = (b, listener, tcp);
    futures_util::stream::unfold(state, |(b, listener, tcp)| async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    txmq_remoting::server::after_failed_accept(&e, "gRPC accept").await;
                    continue;
                }
            };
            if let Err(e) = txmq_remoting::prepare_tcp(&stream, &tcp) {
                tracing::warn!(%peer, error = %e, "cannot set up accepted gRPC connection");
                continue;
            }
            let max = b.config.max_connections;
            if !crate::take_slot(&b.grpc_connections, max) {
                tracing::warn!(%peer, max, "gRPC connection refused: --max-connections reached; closed");
                continue;
            }
            let counted = Counted {
                _slot: Slot(b.clone()),
                stream,
            };
            return Some((Ok(counted), (b, listener, tcp)));
        }
    })
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
    stream: TcpStream,
    _slot: Slot,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
