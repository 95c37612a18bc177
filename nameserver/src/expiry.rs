//! The expiry scanner: drops brokers that stopped sending heartbeats.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Every `interval`, drops the brokers silent for longer than the expiry,
/// until `shutdown` is cancelled.
pub(crate) async fn scan(registry: Arc<Registry>, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        registry.expire(Instant::now());
    }
}
