//! `txmq cluster`: the brokers the nameservers know, masters and slaves,
//! with each slave's replication lag and whether it is in sync.
//!
//! A master is asked for its replication state (`GetReplication`), which
//! lists its slaves with their lag and in-sync flag as the master sees
//! them; that is what a slave's row shows. A slave is asked itself only
//! when its master cannot be asked or does not list it: its lag is then
//! the master's log end as it last heard it minus its own, and it is not
//! counted in sync (only the master decides that). A broker that cannot be
//! asked is shown with its error, no lag and not in sync, and the command
//! ends with exit code 3 (1 when no broker answered).
//!
//! Each row shows an epoch (masters elected by the controller have one; 0
//! without a controller): a master's own, as the nameservers list it; a
//! slave's is that of the master it follows (its group's master when that
//! master lists it, else what the slave says, else 0).

use std::collections::HashMap;

use anyhow::Result;
use futures_util::future::join_all;
use serde_json::{json, Value};
use txmq::{Admin, BrokerInfo, BrokerRole, ReplicationInfo};

use crate::args::GlobalArgs;
use crate::exit;
use crate::output::Printer;

/// The columns of `txmq cluster`'s text output.
const HEADER: [&str; 10] = [
    "CLUSTER",
    "BROKER",
    "ROLE",
    "ADDR",
    "EPOCH",
    "LAG",
    "IN SYNC",
    "LAST HEARTBEAT",
    "TOPICS",
    "ERROR",
];

/// One broker as `txmq cluster` shows it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    cluster: String,
    broker: String,
    role: BrokerRole,
    addr: String,
    /// A master's epoch, or the epoch of the master a slave follows (0: not
    /// known, or no controller).
    epoch: u64,
    last_heartbeat_ms_ago: u64,
    topic_count: u32,
    /// Bytes of the master's log a slave does not hold (0 for a master);
    /// `None` when not known.
    lag: Option<u64>,
    in_sync: bool,
    /// A master's `sync` / `async` replication, when it answered.
    replication: Option<String>,
    /// A master's replication frames, records and bytes shipped since it
    /// started, when it answered.
    shipped: Option<(u64, u64, u64)>,
    /// A slave's master, as the slave names it (when asked).
    master_addr: Option<String>,
    /// Why the broker could not be asked, or the error a slave reports
    /// (it stopped replicating).
    error: Option<String>,
    /// The broker could not be asked.
    unreachable: bool,
}

/// Answers of `GetReplication` by broker address: the info, or the error as text.
type Answers = HashMap<String, std::result::Result<ReplicationInfo, String>>;

/// Prints every broker with its cluster, name, role, address, replication
/// lag and in-sync flag, the age of its last heartbeat and its topic count.
///
/// # Errors
/// When no nameserver answers; exit code 3 when some brokers could not be
/// asked (1 when none could), after printing all of them.
pub async fn run(global: &GlobalArgs) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let brokers = admin.cluster().await?;
    let masters = ask(
        &admin,
        brokers.iter().filter(|b| b.role == BrokerRole::Master),
    )
    .await;
    let on_their_own = ask(
        &admin,
        brokers.iter().filter(|b| {
            b.role == BrokerRole::Slave && master_view(&brokers, &masters, b).is_none()
        }),
    )
    .await;
    admin.close().await.ok();
    let rows = rows(&brokers, &masters, &on_their_own);

    let printer = Printer::stdout(global.output);
    let table: Vec<Vec<String>> = rows.iter().map(text_row).collect();
    let objects: Vec<Value> = rows.iter().map(json_row).collect();
    printer.records(&HEADER, &table, &objects)?;
    let unreachable: Vec<&Row> = rows.iter().filter(|r| r.unreachable).collect();
    if unreachable.is_empty() {
        return Ok(());
    }
    for r in &unreachable {
        stderr!(
            "warning: cannot ask broker {} ({} {}): {}",
            r.broker,
            r.role.name(),
            r.addr,
            r.error.as_deref().unwrap_or("?")
        );
    }
    let code = if unreachable.len() < rows.len() {
        exit::PARTIAL
    } else {
        exit::FAILURE
    };
    Err(exit::with_code(
        code,
        format!(
            "{} of {} broker(s) could not be asked: {}",
            unreachable.len(),
            rows.len(),
            unreachable
                .iter()
                .map(|r| r.addr.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Asks each of `brokers` for its replication state, all at once.
async fn ask(admin: &Admin, brokers: impl Iterator<Item = &BrokerInfo>) -> Answers {
    let brokers: Vec<&BrokerInfo> = brokers.collect();
    let answers = join_all(
        brokers
            .iter()
            .map(|b| admin.replication(&b.broker_name, &b.addr)),
    )
    .await;
    brokers
        .into_iter()
        .zip(answers)
        .map(|(b, a)| {
            let a = a.map_err(|e| {
                // The broker is named in the row already: its error alone.
                let e: &(dyn std::error::Error + 'static) = &e;
                match e.source() {
                    Some(source) => txmq::error::chain(source),
                    None => e.to_string(),
                }
            });
            (b.addr.clone(), a)
        })
        .collect()
}

/// How the master of `slave`'s group sees it, when the master answered
/// and lists it: (lag, in sync, the master's epoch).
fn master_view(
    brokers: &[BrokerInfo],
    masters: &Answers,
    slave: &BrokerInfo,
) -> Option<(u64, bool, u64)> {
    brokers
        .iter()
        .filter(|b| b.role == BrokerRole::Master && b.broker_name == slave.broker_name)
        .filter_map(|m| Some((m, masters.get(&m.addr)?.as_ref().ok()?)))
        .find_map(|(m, info)| {
            info.replicas
                .iter()
                .find(|r| r.addr == slave.addr)
                .map(|r| (r.lag_bytes, r.in_sync, master_epoch(m, Some(info))))
        })
}

/// A master's epoch: as the nameservers list it, else as it answered
/// (a nameserver older than epochs lists 0).
fn master_epoch(master: &BrokerInfo, info: Option<&ReplicationInfo>) -> u64 {
    match (master.epoch, info) {
        (0, Some(info)) => info.epoch,
        (epoch, _) => epoch,
    }
}

/// The rows of `brokers`: masters from their own answers, slaves from
/// their master's (else their own), by cluster, group, master first.
fn rows(brokers: &[BrokerInfo], masters: &Answers, slaves: &Answers) -> Vec<Row> {
    let mut rows: Vec<Row> = brokers
        .iter()
        .map(|b| {
            let mut row = Row {
                cluster: b.cluster.clone(),
                broker: b.broker_name.clone(),
                role: b.role,
                addr: b.addr.clone(),
                epoch: 0,
                last_heartbeat_ms_ago: b.last_heartbeat_ms_ago,
                topic_count: b.topic_count,
                lag: None,
                in_sync: false,
                replication: None,
                shipped: None,
                master_addr: None,
                error: None,
                unreachable: false,
            };
            match b.role {
                BrokerRole::Master => match masters.get(&b.addr) {
                    Some(Ok(info)) => {
                        row.epoch = master_epoch(b, Some(info));
                        row.lag = Some(0);
                        row.in_sync = true;
                        row.replication = Some(info.replication.clone());
                        row.shipped = Some((
                            info.shipped_frames,
                            info.shipped_records,
                            info.shipped_bytes,
                        ));
                    }
                    Some(Err(e)) => {
                        row.epoch = b.epoch;
                        row.error = Some(e.clone());
                        row.unreachable = true;
                    }
                    None => row.epoch = b.epoch,
                },
                BrokerRole::Slave => {
                    if let Some((lag, in_sync, epoch)) = master_view(brokers, masters, b) {
                        row.lag = Some(lag);
                        row.in_sync = in_sync;
                        row.epoch = epoch;
                    } else {
                        match slaves.get(&b.addr) {
                            Some(Ok(info)) => {
                                row.epoch = info.epoch;
                                // Its master cannot tell: not counted in sync,
                                // the lag as the slave last heard.
                                let master_listed_none = masters_answered(brokers, masters, b);
                                row.lag = (!master_listed_none)
                                    .then(|| {
                                        info.master_end.map(|m| m.saturating_sub(info.log_end))
                                    })
                                    .flatten();
                                row.master_addr = info.master_addr.clone();
                                row.error = info.error.clone();
                            }
                            Some(Err(e)) => {
                                row.error = Some(e.clone());
                                row.unreachable = true;
                            }
                            None => {}
                        }
                    }
                }
            }
            row
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.cluster, &a.broker, a.role != BrokerRole::Master, &a.addr).cmp(&(
            &b.cluster,
            &b.broker,
            b.role != BrokerRole::Master,
            &b.addr,
        ))
    });
    rows
}

/// True when the master of `slave`'s group answered (and so does not
/// list the slave: its lag is not known).
fn masters_answered(brokers: &[BrokerInfo], masters: &Answers, slave: &BrokerInfo) -> bool {
    brokers
        .iter()
        .filter(|b| b.role == BrokerRole::Master && b.broker_name == slave.broker_name)
        .any(|m| matches!(masters.get(&m.addr), Some(Ok(_))))
}

fn text_row(r: &Row) -> Vec<String> {
    let (lag, in_sync) = match (r.role, r.unreachable) {
        (_, true) => ("?".to_string(), "no".to_string()),
        (BrokerRole::Master, false) => ("-".to_string(), "-".to_string()),
        (BrokerRole::Slave, false) => (
            r.lag.map_or_else(|| "?".to_string(), bytes),
            if r.in_sync { "yes" } else { "no" }.to_string(),
        ),
    };
    vec![
        r.cluster.clone(),
        r.broker.clone(),
        r.role.name().to_string(),
        r.addr.clone(),
        r.epoch.to_string(),
        lag,
        in_sync,
        heartbeat_age(r.last_heartbeat_ms_ago),
        r.topic_count.to_string(),
        r.error.clone().unwrap_or_default(),
    ]
}

fn json_row(r: &Row) -> Value {
    let mut v = json!({
        "cluster": r.cluster,
        "broker": r.broker,
        "broker_name": r.broker,
        "role": r.role.name(),
        "addr": r.addr,
        "epoch": r.epoch,
        "replication_lag_bytes": r.lag,
        "in_sync": r.in_sync,
        "last_heartbeat_ms_ago": r.last_heartbeat_ms_ago,
        "topic_count": r.topic_count,
        "error": r.error,
    });
    if let Some(m) = v.as_object_mut() {
        if let Some(replication) = &r.replication {
            m.insert("replication".into(), json!(replication));
        }
        if let Some((frames, records, bytes)) = r.shipped {
            m.insert("replication_frames".into(), json!(frames));
            m.insert("replication_records".into(), json!(records));
            m.insert("replication_bytes".into(), json!(bytes));
        }
        if let Some(master) = &r.master_addr {
            m.insert("master_addr".into(), json!(master));
        }
    }
    v
}

/// `0B`, `512B`, `1.5KiB`, `3.0MiB`, `1.2GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// `0.4s ago`, `12.0s ago`.
fn heartbeat_age(ms: u64) -> String {
    format!("{:.1}s ago", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::table;
    use txmq::ReplicaInfo;

    #[test]
    fn heartbeat_ages_read_in_seconds() {
        assert_eq!(heartbeat_age(0), "0.0s ago");
        assert_eq!(heartbeat_age(1240), "1.2s ago");
        assert_eq!(heartbeat_age(30_000), "30.0s ago");
    }

    #[test]
    fn lags_read_in_binary_units() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0MiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0GiB");
    }

    fn broker(name: &str, role: BrokerRole, addr: &str) -> BrokerInfo {
        BrokerInfo {
            epoch: Default::default(),
            cluster: "c".into(),
            broker_name: name.into(),
            addr: addr.into(),
            last_heartbeat_ms_ago: 400,
            topic_count: 2,
            role,
        }
    }

    fn info(role: BrokerRole, addr: &str, replicas: Vec<ReplicaInfo>) -> ReplicationInfo {
        ReplicationInfo {
            epoch: Default::default(),
            shipped_records: Default::default(),
            shipped_frames: Default::default(),
            shipped_bytes: Default::default(),
            broker_name: "broker-a".into(),
            role,
            addr: addr.into(),
            log_end: 5000,
            replication: "sync".into(),
            min_insync_replicas: 2,
            master_addr: None,
            master_end: None,
            error: None,
            replicas,
        }
    }

    fn replica(addr: &str, lag_bytes: u64, in_sync: bool) -> ReplicaInfo {
        ReplicaInfo {
            addr: addr.into(),
            acked: 5000 - lag_bytes,
            lag_bytes,
            in_sync,
            last_seen_ms_ago: 10,
        }
    }

    #[test]
    fn slaves_show_the_lag_and_in_sync_flag_their_master_reports() {
        let mut master = broker("broker-a", BrokerRole::Master, "h:10911");
        master.epoch = 3;
        let brokers = [
            broker("broker-a", BrokerRole::Slave, "h:10931"),
            broker("broker-a", BrokerRole::Slave, "h:10921"),
            master,
            broker("broker-a", BrokerRole::Slave, "h:10941"),
        ];
        let masters: Answers = [(
            "h:10911".to_string(),
            Ok(info(
                BrokerRole::Master,
                "h:10911",
                vec![replica("h:10921", 0, true), replica("h:10931", 2048, false)],
            )),
        )]
        .into();
        // h:10941 is not listed by the master; asked itself, it answered.
        let mut own = info(BrokerRole::Slave, "h:10941", Vec::new());
        own.master_end = Some(9000);
        own.error = Some("diverged at 4096".into());
        own.epoch = 2;
        let slaves: Answers = [("h:10941".to_string(), Ok(own))].into();
        let rows = rows(&brokers, &masters, &slaves);
        let addrs: Vec<&str> = rows.iter().map(|r| r.addr.as_str()).collect();
        assert_eq!(addrs, ["h:10911", "h:10921", "h:10931", "h:10941"]);
        assert_eq!((rows[0].lag, rows[0].in_sync), (Some(0), true));
        assert_eq!((rows[1].lag, rows[1].in_sync), (Some(0), true));
        assert_eq!((rows[2].lag, rows[2].in_sync), (Some(2048), false));
        assert_eq!((rows[3].lag, rows[3].in_sync), (None, false));
        assert_eq!(rows[3].error.as_deref(), Some("diverged at 4096"));
        assert!(rows.iter().all(|r| !r.unreachable));

        let text = table(&HEADER, &rows.iter().map(text_row).collect::<Vec<_>>());
        assert_eq!(
            text,
            [
                "CLUSTER  BROKER    ROLE    ADDR     EPOCH  LAG     IN SYNC  LAST HEARTBEAT  TOPICS  ERROR",
                "c        broker-a  master  h:10911  3      -       -        0.4s ago        2",
                "c        broker-a  slave   h:10921  3      0B      yes      0.4s ago        2",
                "c        broker-a  slave   h:10931  3      2.0KiB  no       0.4s ago        2",
                "c        broker-a  slave   h:10941  2      ?       no       0.4s ago        2       diverged at 4096",
            ]
        );

        let json: Vec<Value> = rows.iter().map(json_row).collect();
        assert_eq!(json[0]["broker"], "broker-a");
        assert_eq!(json[0]["role"], "master");
        assert_eq!(json[0]["addr"], "h:10911");
        assert_eq!(json[0]["epoch"], 3);
        assert_eq!(json[1]["epoch"], 3);
        assert_eq!(json[3]["epoch"], 2);
        assert_eq!(json[0]["replication_lag_bytes"], 0);
        assert_eq!(json[0]["in_sync"], true);
        assert_eq!(json[0]["replication"], "sync");
        assert_eq!(json[0]["last_heartbeat_ms_ago"], 400);
        assert_eq!(json[0]["topic_count"], 2);
        assert_eq!(json[0]["error"], Value::Null);
        assert_eq!(json[1]["role"], "slave");
        assert_eq!(json[1]["replication_lag_bytes"], 0);
        assert_eq!(json[1]["in_sync"], true);
        assert_eq!(json[2]["replication_lag_bytes"], 2048);
        assert_eq!(json[2]["in_sync"], false);
        assert_eq!(json[3]["replication_lag_bytes"], Value::Null);
        assert_eq!(json[3]["in_sync"], false);
        assert_eq!(json[3]["error"], "diverged at 4096");
    }

    #[test]
    fn without_a_master_to_ask_slaves_speak_for_themselves_and_unreachable_ones_are_marked() {
        let brokers = [
            broker("broker-a", BrokerRole::Master, "h:10911"),
            broker("broker-a", BrokerRole::Slave, "h:10921"),
            broker("broker-a", BrokerRole::Slave, "h:10931"),
            // A group whose master is not live at all.
            broker("broker-b", BrokerRole::Slave, "h:20921"),
        ];
        let masters: Answers = [(
            "h:10911".to_string(),
            Err("cannot connect to h:10911: connection refused".to_string()),
        )]
        .into();
        let mut a1 = info(BrokerRole::Slave, "h:10921", Vec::new());
        a1.master_end = Some(5300);
        a1.master_addr = Some("h:10911".into());
        let mut b1 = info(BrokerRole::Slave, "h:20921", Vec::new());
        b1.master_end = None;
        let slaves: Answers = [
            ("h:10921".to_string(), Ok(a1)),
            ("h:10931".to_string(), Err("timed out".to_string())),
            ("h:20921".to_string(), Ok(b1)),
        ]
        .into();
        let rows = rows(&brokers, &masters, &slaves);
        assert_eq!(
            (rows[0].lag, rows[0].in_sync, rows[0].unreachable),
            (None, false, true)
        );
        assert_eq!(
            rows[0].error.as_deref(),
            Some("cannot connect to h:10911: connection refused")
        );
        // Lag as the slave last heard of the master's end; not in sync.
        assert_eq!(
            (rows[1].lag, rows[1].in_sync, rows[1].unreachable),
            (Some(300), false, false)
        );
        assert_eq!(rows[1].master_addr.as_deref(), Some("h:10911"));
        assert_eq!(
            (rows[2].lag, rows[2].in_sync, rows[2].unreachable),
            (None, false, true)
        );
        assert_eq!(
            (rows[3].lag, rows[3].in_sync, rows[3].unreachable),
            (None, false, false)
        );
        let text: Vec<Vec<String>> = rows.iter().map(text_row).collect();
        assert_eq!(text[0][5..7], ["?", "no"]);
        assert_eq!(text[1][5..7], ["300B", "no"]);
        assert_eq!(text[2][5..7], ["?", "no"]);
        assert_eq!(text[2][9], "timed out");
        // No controller: every epoch is 0.
        assert!(text.iter().all(|r| r[4] == "0"), "{text:?}");
        let json = json_row(&rows[1]);
        assert_eq!(json["replication_lag_bytes"], 300);
        assert_eq!(json["in_sync"], false);
        assert_eq!(json["master_addr"], "h:10911");
    }
}
