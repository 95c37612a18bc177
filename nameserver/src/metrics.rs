//! The nameserver's Prometheus metrics (`--metrics-listen`, served by
//! [`txmq_remoting::metrics`]): connections open, requests answered by
//! kind, and the live brokers, counted from the route table when scraped.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry as MetricRegistry;

use crate::registry::Registry;

/// Requests by kind: the label value is the request's static name, so
/// counting allocates nothing.
type KindLabel = [(&'static str, &'static str); 1];

/// The nameserver's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Arc<MetricRegistry>,
    connections: Gauge,
    requests: Family<KindLabel, Counter>,
    routes: Arc<OnceLock<Arc<Registry>>>,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut r = MetricRegistry::default();
        let connections = Gauge::default();
        let requests = Family::<KindLabel, Counter>::default();
        r.register(
            "txmq_connections",
            "Connections open now (greeted)",
            connections.clone(),
        );
        r.register(
            "txmq_nameserver_requests",
            "Requests answered, by kind (kind = RegisterBroker, GetRoute, ...)",
            requests.clone(),
        );
        let routes = Arc::new(OnceLock::new());
        r.register_collector(Box::new(Brokers {
            routes: routes.clone(),
        }));
        Metrics {
            registry: Arc::new(r),
            connections,
            requests,
            routes,
        }
    }

    /// The registry to serve.
    pub(crate) fn registry(&self) -> Arc<MetricRegistry> {
        self.registry.clone()
    }

    /// The route table whose brokers `txmq_nameserver_brokers` counts.
    pub(crate) fn watch(&self, routes: Arc<Registry>) {
        let _ = self.routes.set(routes);
    }

    pub(crate) fn connected(&self) {
        self.connections.inc();
    }

    pub(crate) fn disconnected(&self) {
        self.connections.dec();
    }

    pub(crate) fn request(&self, kind: &'static str) {
        self.requests.get_or_create(&[("kind", kind)]).inc();
    }
}

#[derive(Debug)]
struct Brokers {
    routes: Arc<OnceLock<Arc<Registry>>>,
}

impl Collector for Brokers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self
            .routes
            .get()
            .map_or(0, |r| r.cluster(tokio::time::Instant::now()).brokers.len());
        let g = ConstGauge::new(live as i64);
        g.encode(encoder.encode_descriptor(
            "txmq_nameserver_brokers",
            "Brokers registered and live (masters and slaves)",
            None,
            g.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_connections_and_brokers_are_exposed() {
        let m = Metrics::new();
        m.connected();
        m.connected();
        m.disconnected();
        m.request("GetRoute");
        m.request("GetRoute");
        let before = txmq_remoting::metrics::render(&m.registry());
        assert!(before.contains("txmq_nameserver_brokers 0"), "{before}");
        m.watch(Arc::new(Registry::new(std::time::Duration::from_secs(30))));
        let text = txmq_remoting::metrics::render(&m.registry());
        assert!(text.contains("txmq_connections 1\n"), "{text}");
        assert!(
            text.contains("txmq_nameserver_requests_total{kind=\"GetRoute\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("txmq_nameserver_brokers 0\n"), "{text}");
    }
}
