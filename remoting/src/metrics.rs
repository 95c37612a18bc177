//! The `/metrics` endpoint the broker and the nameserver offer with
//! `--metrics-listen`: Prometheus (OpenMetrics) text of one
//! [`Registry`], rendered by `prometheus-client` on each scrape, served
//! over plain HTTP/1 by axum. Anything but `GET /metrics` is a 404.
//!
//! Each server owns its registry (no process-global recorder), so several
//! brokers in one process (tests) never mix their series.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of the exposition `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `listen` for [`serve`]; a separate step so that a bad address
/// fails the server's start, before anything else runs.
///
/// # Errors
/// The address cannot be listened on (in use, not local, malformed).
pub async fn bind(listen: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Renders `registry` as exposition text (what `GET /metrics` answers).
pub fn render(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        // Only a collector's own formatting error gets here.
        tracing::warn!(error = %e, "cannot render the metrics");
    }
    text
}

/// A label value written escaped, as the exposition format wants (`\\`,
/// `\"` and `\n`): the label encoder of `prometheus-client` writes values
/// as they are, and a group name holding a quote would end the value
/// early and spoil the whole scrape, or add series of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelText<S>(pub S);

impl<S: AsRef<str>> prometheus_client::encoding::EncodeLabelValue for LabelText<S> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let mut rest = self.0.as_ref();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, shutdown: CancellationToken) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)) }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            )
                .into_response()
        });
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "serving metrics at /metrics"),
        Err(_) => tracing::info!("serving metrics at /metrics"),
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "the metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn metrics_are_served_and_other_paths_are_404() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        registry.register("demo_events", "Events seen", c.clone());
        c.inc_by(3);
        let (listener, addr) = bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, Arc::new(registry), stop.clone()));
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("demo_events_total 3"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        let missing = get(addr, "/").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_address_in_use_is_an_error() {
        let (_held, addr) = bind("127.0.0.1:0").await.unwrap();
        assert!(bind(&addr.to_string()).await.is_err());
    }
}
