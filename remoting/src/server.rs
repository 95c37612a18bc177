//! Accepting connections.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::connection::Side;
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
                let token = shutdown.child_token();
                if let Err(e) = Connection::start(
                    stream,
                    Side::Server,
                    Some(service.clone()),
                    config.clone(),
                    token,
                ) {
                    warn!(error = %e, "cannot set up accepted connection");
                }
            }
            Err(e) => {
                // Running out of file descriptors, say: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    info!(%addr, "stopped accepting connections");
}
