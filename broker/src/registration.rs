//! Registration with the nameservers: at start, every heartbeat interval,
//! and at once when the topic table changes; a goodbye at shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use txmq_protocol::{Hello, RegisterBroker, Role, UnregisterBroker, PROTOCOL_VERSION};
use txmq_remoting::{Connection, ConnectionConfig};

use crate::BrokerInner;

pub(crate) async fn run(b: Arc<BrokerInner>, nameservers: Vec<String>) {
    let mut conns: HashMap<String, Connection> = HashMap::new();
    let mut healthy: HashMap<String, bool> = HashMap::new();
    loop {
        let version = b.topics_version.load(std::sync::atomic::Ordering::Acquire);
        let topics = b.topics.all();
        let req = RegisterBroker {
            cluster: b.config.cluster.clone(),
            broker_name: b.config.broker_name.clone(),
            addr: b.advertised_addr.clone(),
            topics,
        };
        let results = join_all(nameservers.iter().map(|ns| {
            let conn = conns.get(ns).filter(|c| !c.is_closed()).cloned();
            let req = req.clone();
            let b = b.clone();
            let ns = ns.clone();
            async move {
                let conn = match conn {
                    Some(c) => c,
                    None => connect(&b, &ns).await?,
                };
                conn.call_with_timeout(req, Duration::from_secs(3))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((ns, conn))
            }
        }))
        .await;
        for (ns, result) in nameservers.iter().zip(results) {
            let was = healthy.insert(ns.clone(), result.is_ok());
            match result {
                Ok((_, conn)) => {
                    if was != Some(true) {
                        tracing::info!(nameserver = %ns, "registered with nameserver");
                    }
                    conns.insert(ns.clone(), conn);
                }
                Err(e) => {
                    if was != Some(false) {
                        tracing::warn!(nameserver = %ns, error = %e, "cannot register with nameserver; will keep trying");
                    }
                    conns.remove(ns);
                }
            }
        }
        // Creates waiting for this table version may answer now (whether or
        // not every nameserver took it: an unreachable one is retried).
        b.registered_version.send_if_modified(|v| {
            let grew = *v < version;
            *v = (*v).max(version);
            grew
        });
        // Retry a failed nameserver sooner than a full heartbeat interval.
        let wait = if healthy.values().all(|h| *h) {
            b.config.heartbeat_interval
        } else {
            b.config.heartbeat_interval.min(Duration::from_secs(1))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = b.topics_changed.notified() => {}
            _ = b.shutdown.cancelled() => break,
        }
    }
    let bye = UnregisterBroker {
        broker_name: b.config.broker_name.clone(),
    };
    join_all(conns.values().map(|c| {
        let bye = bye.clone();
        async move {
            let _ = c.call_with_timeout(bye, Duration::from_millis(500)).await;
            c.close();
        }
    }))
    .await;
}

async fn connect(b: &BrokerInner, ns: &str) -> Result<Connection, String> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Broker,
        client_id: format!("{}@{}", b.config.broker_name, b.advertised_addr),
        group: None,
    };
    let config = ConnectionConfig {
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    Connection::connect(ns, hello, None, config)
        .await
        .map_err(|e| e.to_string())
}
