//! `txmq cluster`: the brokers the nameservers know.

use anyhow::Result;
use serde_json::json;
use txmq::Admin;

use crate::args::GlobalArgs;
use crate::output::Printer;

/// Prints every broker with its cluster, name, address, the age of its last
/// heartbeat and its topic count.
///
/// # Errors
/// When no nameserver answers.
pub async fn run(global: &GlobalArgs) -> Result<()> {
    let admin = Admin::with_config(global.client_config()).await?;
    let brokers = admin.cluster().await?;
    admin.close();
    let rows: Vec<Vec<String>> = brokers
        .iter()
        .map(|b| {
            vec![
                b.cluster.clone(),
                b.broker_name.clone(),
                b.addr.clone(),
                heartbeat_age(b.last_heartbeat_ms_ago),
                b.topic_count.to_string(),
            ]
        })
        .collect();
    let objects: Vec<_> = brokers
        .iter()
        .map(|b| {
            json!({
                "cluster": b.cluster,
                "broker_name": b.broker_name,
                "addr": b.addr,
                "last_heartbeat_ms_ago": b.last_heartbeat_ms_ago,
                "topic_count": b.topic_count,
            })
        })
        .collect();
    Printer::stdout(global.output).records(
        &["CLUSTER", "BROKER", "ADDR", "LAST HEARTBEAT", "TOPICS"],
        &rows,
        &objects,
    )?;
    Ok(())
}

/// `0.4s ago`, `12.0s ago`.
fn heartbeat_age(ms: u64) -> String {
    format!("{:.1}s ago", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_ages_read_in_seconds() {
        assert_eq!(heartbeat_age(0), "0.0s ago");
        assert_eq!(heartbeat_age(1240), "1.2s ago");
        assert_eq!(heartbeat_age(30_000), "30.0s ago");
    }
}
