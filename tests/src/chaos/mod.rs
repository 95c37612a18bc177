//! The chaos harness: a cluster of real processes (nameservers, two
//! brokers with synchronous flush, producers, transactional producers and
//! orderly push consumers, the clients as `chaos-client` processes) runs a
//! recorded workload while a fault schedule kills, pauses and disturbs it;
//! then everything is healed, drained and checked.
//!
//! Start at [`run`]. The faults ([`Fault`]): `kill -9` and restart a
//! broker; SIGSTOP a broker past every timeout, then SIGCONT; kill a
//! transactional producer inside its local transaction (between prepare
//! and end); kill a consumer; and, through a [`Proxy`](crate::proxy::Proxy)
//! in front of each broker (the address the broker advertises): cut every
//! connection, delay traffic 100 ms ± 50 ms, drop a reply after its
//! request was delivered; and cut a broker's power: its data directory is
//! on a [`LazyFs`] mount (when the schedule has [`Fault::PowerCut`]), so
//! `kill -9` is followed by the loss of everything not fsynced, the last
//! unsynced write torn. The checkers are in [`checker`]; the history
//! format in [`history`].
//!
//! Failover mode ([`ChaosConfig::failover`], see [`failover`]): the
//! nameservers (3) embed the controller, `broker-a` is a group of 3
//! replicas under it (sync replication, min-insync 2; each replica behind
//! its own proxy), `broker-b` stays a single broker. The schedule adds
//! [`Fault::KillMaster`], [`Fault::PartitionMaster`] and
//! [`Fault::KillControllerLeader`]; the other faults pick any of the four
//! broker processes.

pub mod checker;
pub mod client;
pub mod failover;
pub mod history;
pub mod process;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use txmq::{Admin, TxState, PERM_READ_WRITE};

use self::checker::{OpCounts, Verdict};
use self::history::{Kind, Op, Recorder};
use self::process::Process;
use crate::lazyfs::LazyFs;
use crate::proxy::{Proxy, ProxyStats};
use crate::rng::Rng;
use crate::{binary, free_port, BrokerProcess};

/// Topic of the sends of broker-a's sharding keys (it lives on broker-a
/// only, so a key's queue never changes, and neither does its order).
pub const TOPIC_A: &str = "chaos-a";
/// Topic of the sends of broker-b's sharding keys.
pub const TOPIC_B: &str = "chaos-b";
/// Topic of the transactional sends, on both brokers.
pub const TOPIC_TX: &str = "chaos-tx";
const CONSUMER_GROUP: &str = "chaos-cg";
/// The group of the consumer that asks for retries (concurrent, so its
/// handlings are not held to the order and duplicate checkers).
pub const RETRY_GROUP: &str = "chaos-retry";
const PRODUCER_GROUP: &str = "chaos-pg";
const BROKERS: [&str; 2] = ["broker-a", "broker-b"];
/// The replicated group in failover mode.
const GROUP: &str = "broker-a";
/// Its replicas.
const REPLICAS: usize = 3;

/// The settings of a run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// How long the workload runs under faults.
    pub duration: Duration,
    /// Nameserver processes (1 or 2).
    pub nameservers: usize,
    /// Seed of the fault schedule and the workload mix.
    pub seed: u64,
    /// Sends plus transactions per second, over all producers.
    pub rate: f64,
    /// Quiet time between two faults.
    pub quiet: Duration,
    /// How long after a fault's end a repeat still counts as caused by it.
    pub grace: Duration,
    /// Where the history, the logs and the brokers' data go.
    pub out_dir: PathBuf,
    /// The fault schedule, repeated in this order ([`Fault::ALL`] by default).
    pub faults: Vec<Fault>,
    /// Failover mode: the nameservers run the controller and `broker-a`
    /// is a group of 3 replicas it elects the master of.
    pub failover: bool,
    /// Dedup mode: the orderly consumers apply each message's effect
    /// through [`txmq::SqliteDedup`] in one SQLite database
    /// (`effects.sqlite` in `out_dir`), and the `applied-once` checker
    /// holds every acknowledged message to exactly one effect.
    pub dedup: bool,
}

impl ChaosConfig {
    /// A run of `duration` writing into `out_dir`: 2 nameservers, 200
    /// operations per second, a fault every 5 s or so.
    pub fn new(duration: Duration, out_dir: impl Into<PathBuf>) -> ChaosConfig {
        ChaosConfig {
            duration,
            nameservers: 2,
            seed: Rng::from_clock().next_u64() % 1_000_000,
            rate: 200.0,
            quiet: Duration::from_secs(4),
            grace: Duration::from_secs(8),
            out_dir: out_dir.into(),
            faults: Fault::ALL.to_vec(),
            failover: false,
            dedup: false,
        }
    }

    /// A run in failover mode: 3 nameservers with the controller (master
    /// expiry 2 s), `broker-a` a group of 3 replicas under it (sync
    /// replication, min-insync 2), `broker-b` a single broker, and the
    /// [`Fault::FAILOVER`] schedule.
    pub fn failover(duration: Duration, out_dir: impl Into<PathBuf>) -> ChaosConfig {
        ChaosConfig {
            nameservers: 3,
            faults: Fault::FAILOVER.to_vec(),
            failover: true,
            ..ChaosConfig::new(duration, out_dir)
        }
    }
}

/// A fault the schedule injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` a broker, restart it 2 s later on the same data.
    KillBroker,
    /// SIGSTOP a broker for 4 s (past the request timeout of 1 s, the
    /// nameservers' broker expiry and the consumer expiry of 3 s), then SIGCONT.
    PauseBroker,
    /// Close every connection through a broker's proxy.
    CutConnections,
    /// Delay a broker's traffic by 100 ms ± 50 ms each way for 4 s.
    Delay,
    /// Drop the reply to a request the broker got, and the connection.
    DropReply,
    /// Kill a transactional producer between prepare and end, restart it.
    KillTxProducer,
    /// `kill -9` a consumer, restart it 2 s later.
    KillConsumer,
    /// `kill -9` a broker, drop everything its data directory did not
    /// fsync (tearing the last unsynced write of each file), restart it.
    PowerCut,
    /// SIGSTOP a broker for 10 s while the retrying consumer hands messages
    /// back to it (its handler takes a second over a first retry, so some are
    /// handed back during the pause, and fail for longer than a consumer's
    /// local retries last), then SIGCONT.
    PauseWhileRetrying,
    /// Failover mode: `kill -9` the master of `broker-a` (as the controller
    /// names it), restart it 2 s later on its data.
    KillMaster,
    /// Failover mode: cut the master of `broker-a` off the controller and
    /// off its slaves (their fetches) for 6 s, while clients still reach
    /// it; then heal.
    PartitionMaster,
    /// Failover mode: `kill -9` the nameserver whose controller member is
    /// the Raft leader, restart it 2 s later on its data.
    KillControllerLeader,
}

impl Fault {
    /// Every fault, in schedule order.
    pub const ALL: [Fault; 9] = [
        Fault::KillBroker,
        Fault::CutConnections,
        Fault::KillTxProducer,
        Fault::PowerCut,
        Fault::PauseBroker,
        Fault::DropReply,
        Fault::KillConsumer,
        Fault::Delay,
        Fault::PauseWhileRetrying,
    ];

    /// The failover mode's schedule: the failover faults first (a short
    /// run still gets each), then the others, against any replica.
    pub const FAILOVER: [Fault; 12] = [
        Fault::KillMaster,
        Fault::CutConnections,
        Fault::PartitionMaster,
        Fault::KillControllerLeader,
        Fault::KillTxProducer,
        Fault::PauseBroker,
        Fault::KillMaster,
        Fault::PowerCut,
        Fault::DropReply,
        Fault::KillConsumer,
        Fault::KillBroker,
        Fault::Delay,
    ];

    /// The fault's name in the history and the summary.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillBroker => "kill-broker",
            Fault::PauseBroker => "pause-broker",
            Fault::CutConnections => "cut-connections",
            Fault::Delay => "delay",
            Fault::DropReply => "drop-reply",
            Fault::KillTxProducer => "kill-tx-producer",
            Fault::KillConsumer => "kill-consumer",
            Fault::PowerCut => "power-cut",
            Fault::PauseWhileRetrying => "pause-while-retrying",
            Fault::KillMaster => "kill-master",
            Fault::PartitionMaster => "partition-master",
            Fault::KillControllerLeader => "kill-controller-leader",
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct ChaosReport {
    /// The settings.
    pub config: ChaosConfig,
    /// Operations and faults.
    pub counts: OpCounts,
    /// One verdict per checker.
    pub verdicts: Vec<Verdict>,
    /// The merged history (JSON lines).
    pub history: PathBuf,
    /// What each broker's proxy did (and each controller member's, in
    /// failover mode).
    pub proxies: Vec<(String, ProxyStats)>,
    /// Failover mode's figures.
    pub failover: FailoverFigures,
    /// How long the whole run took, set-up and checks included.
    pub elapsed: Duration,
}

/// How fast failovers went (failover mode), in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct FailoverFigures {
    /// Per [`Fault::KillMaster`]: from the kill to the first send to
    /// `broker-a` answered `SEND_OK` (by the new master); `None` when none
    /// came before the run's end.
    pub kill_to_send_ok: Vec<Option<u64>>,
    /// Per fault that replaced the master, as the harness saw it: the
    /// fault, and from its start to the controller naming a new master.
    pub elections: Vec<(String, u64)>,
    /// Per [`Fault::KillControllerLeader`]: from the kill to another
    /// member leading (a higher term).
    pub controller_leader: Vec<u64>,
    /// `broker-a`'s epoch at the end (1 before any failover).
    pub final_epoch: u64,
}

impl ChaosReport {
    /// Whether every checker passed.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.ok)
    }

    /// The summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let mut s = String::new();
        let brokers = if self.config.failover {
            "broker-a a group of 3 replicas under the controller (sync replication, min-insync 2), broker-b single, all sync flush"
        } else {
            "2 brokers (sync flush)"
        };
        let _ = writeln!(
            s,
            "chaos run: {:?} of workload under faults, {} nameserver(s){}, {brokers}, seed {}, {:.0?} in all",
            self.config.duration,
            self.config.nameservers,
            if self.config.failover {
                " with the controller"
            } else {
                ""
            },
            self.config.seed,
            self.elapsed
        );
        let _ = writeln!(
            s,
            "ops: {} ({:.0}/s): sends {} (ok {}, fail {}, info {}), transactions {} (ok {}, fail {}, info {}); {} consumed, {} check-backs answered",
            c.ops(),
            c.ops() as f64 / self.config.duration.as_secs_f64().max(1.0),
            c.sends[0], c.sends[1], c.sends[2], c.sends[3],
            c.txs[0], c.txs[1], c.txs[2], c.txs[3],
            c.consumed, c.checks
        );
        let total: usize = c.faults.values().sum();
        let kinds: Vec<String> = c.faults.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "faults: {total} ({})", kinds.join(", "));
        if self.config.failover {
            let f = &self.failover;
            let ms = |v: &[u64]| match failover::median_max(v) {
                Some((median, max)) => {
                    let all: Vec<String> = v.iter().map(u64::to_string).collect();
                    format!("{} ms: median {median} ms, max {max} ms", all.join(", "))
                }
                None => "none".into(),
            };
            let served: Vec<u64> = f.kill_to_send_ok.iter().flatten().copied().collect();
            let elected: Vec<u64> = f.elections.iter().map(|e| e.1).collect();
            let _ = writeln!(
                s,
                "failovers: {} (broker-a at epoch {} in the end); master kills {}: kill to first SEND_OK on the new master {}{}",
                c.failovers,
                f.final_epoch,
                f.kill_to_send_ok.len(),
                ms(&served),
                match f.kill_to_send_ok.len() - served.len() {
                    0 => String::new(),
                    n => format!(" ({n} without a SEND_OK before the end)"),
                }
            );
            let by_fault: Vec<String> = f
                .elections
                .iter()
                .map(|(fault, ms)| format!("{fault} {ms} ms"))
                .collect();
            let _ = writeln!(
                s,
                "elections seen by the harness: {} ({}); controller leader kills {}: new leader {}",
                ms(&elected),
                by_fault.join(", "),
                f.controller_leader.len(),
                ms(&f.controller_leader)
            );
        }
        for (name, p) in &self.proxies {
            let _ = writeln!(
                s,
                "proxy of {name}: {} connections, {} cut, {} replies dropped",
                p.accepted, p.cut, p.replies_dropped
            );
        }
        for v in &self.verdicts {
            let _ = writeln!(
                s,
                "{:<24} {}  {}",
                v.name,
                if v.ok { "PASS" } else { "FAIL" },
                v.summary
            );
            for e in &v.examples {
                let _ = writeln!(s, "    e.g. {e}");
            }
        }
        let _ = writeln!(s, "history: {}", self.history.display());
        s
    }
}

/// The cluster and the workload's processes.
struct World {
    config: ChaosConfig,
    ns: String,
    ns_addrs: Vec<String>,
    nameservers: Vec<Process>,
    /// Failover mode: the proxy in front of each controller member's
    /// `--controller-listen` port; members and brokers know it by this.
    controller_proxies: Vec<Proxy>,
    /// Failover mode: each controller member's data directory.
    controller_dirs: Vec<PathBuf>,
    /// The broker processes: `broker-a` and `broker-b`, or, in failover
    /// mode, `broker-a`'s 3 replicas and `broker-b`.
    brokers: Vec<BrokerProcess>,
    /// Each broker process's name in the history and the summary.
    labels: Vec<String>,
    /// The brokers' lazy filesystems (with [`Fault::PowerCut`]); fields
    /// drop in order, so the brokers are gone before these unmount.
    filesystems: Vec<LazyFs>,
    /// The proxy in front of each broker process (the address it advertises).
    proxies: Vec<Proxy>,
    producers: Vec<Process>,
    txs: Vec<Process>,
    consumers: Vec<Process>,
    harness: Recorder,
    rng: Rng,
    /// `broker-a`'s master as last seen (failover mode).
    master: Option<(String, u64)>,
    /// When each [`Fault::KillMaster`] killed the master (µs).
    master_kills: Vec<u64>,
    figures: FailoverFigures,
}

/// Runs the workload under the fault schedule for `config.duration`, heals
/// everything, waits for the check-backs and the consumers to finish, and
/// checks the history.
///
/// # Panics
/// When the cluster cannot be set up (a binary does not build or start).
pub async fn run(config: ChaosConfig) -> ChaosReport {
    let started = Instant::now();
    std::fs::create_dir_all(&config.out_dir).expect("create the output directory");
    let mut world = World::start(config.clone()).await;

    let deadline = Instant::now() + config.duration;
    let mut n = 0usize;
    loop {
        let quiet = world.rng.between(config.quiet / 2, config.quiet * 3 / 2);
        if Instant::now() + quiet >= deadline {
            break;
        }
        tokio::time::sleep(quiet).await;
        let Some(&fault) = config.faults.get(n % config.faults.len().max(1)) else {
            continue;
        };
        n += 1;
        world.inject(fault, n).await;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;

    world.wind_down().await;
    let history = config.out_dir.join("history.jsonl");
    let events = history::read_dir_events(&config.out_dir, &history);
    history::write_events(&history, &events).expect("write the history");
    let counts = checker::count(&events);
    let verdicts = checker::check(&events, config.grace.as_micros() as u64);
    let mut figures = world.figures.clone();
    figures.kill_to_send_ok = world
        .master_kills
        .iter()
        .map(|&at| first_send_ok(&events, GROUP, at).map(|t| (t - at) / 1000))
        .collect();
    let mut proxies: Vec<(String, ProxyStats)> = world
        .labels
        .iter()
        .zip(&world.proxies)
        .map(|(b, p)| (b.clone(), p.stats()))
        .collect();
    proxies.extend(
        world
            .controller_proxies
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("controller member {}", i + 1), p.stats())),
    );
    let mut dirs: Vec<PathBuf> = world.brokers.iter().map(|b| b.data_dir.clone()).collect();
    dirs.extend(world.controller_dirs.iter().cloned());
    let report = ChaosReport {
        config,
        counts,
        verdicts,
        history,
        proxies,
        failover: figures,
        elapsed: started.elapsed(),
    };
    drop(world);
    if report.passed() {
        // Keep the history and the logs, not the data (nor the emptied
        // mount points of the lazy filesystems).
        for d in dirs {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
    report
}

/// When (µs) the first send to group `broker` answered `SEND_OK` after `at`.
fn first_send_ok(events: &[history::Event], broker: &str, at: u64) -> Option<u64> {
    events
        .iter()
        .find(|e| {
            e.time_us > at
                && e.f == Op::Send
                && e.kind == Kind::Ok
                && e.status.as_deref() == Some("SEND_OK")
                && e.broker.as_deref() == Some(broker)
        })
        .map(|e| e.time_us)
}

fn wait_for_port(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl World {
    async fn start(config: ChaosConfig) -> World {
        let out = config.out_dir.clone();
        let harness = Recorder::open(&out.join("harness.jsonl"), "harness")
            .expect("open the harness history");
        let members = config.nameservers.max(1);
        let ns_addrs: Vec<String> = (0..members)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        // Failover mode: each nameserver's controller member listens on a
        // port of its own, behind a proxy whose address everyone uses.
        let mut controller_proxies = Vec::new();
        let mut controller_listen = Vec::new();
        let mut controller_dirs = Vec::new();
        if config.failover {
            for i in 0..members {
                let listen = format!("127.0.0.1:{}", free_port());
                let proxy = Proxy::bind().await.expect("proxy binds");
                proxy.set_target(&listen);
                controller_proxies.push(proxy);
                controller_listen.push(listen);
                controller_dirs.push(out.join(format!("controller-{}", i + 1)));
            }
        }
        let controller_addrs: Vec<String> = controller_proxies
            .iter()
            .map(|p| p.addr().to_string())
            .collect();
        let nameservers: Vec<Process> = tokio::task::block_in_place(|| {
            ns_addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| {
                    let mut args = vec![
                        "--listen".to_string(),
                        addr.clone(),
                        "--broker-expiry".into(),
                        "3s".into(),
                    ];
                    if config.failover {
                        args.extend(failover::controller_args(
                            i,
                            &controller_listen[i],
                            &controller_addrs,
                            &controller_dirs[i],
                        ));
                    }
                    let p = Process::start(
                        &format!("nameserver-{i}"),
                        binary("txmq-nameserver"),
                        out.join(format!("nameserver-{i}.log")),
                        move |_| args.clone(),
                    );
                    wait_for_port(addr, "txmq-nameserver");
                    p
                })
                .collect()
        });
        let ns = ns_addrs.join(",");

        // (label, broker name, under the controller)
        let slots: Vec<(String, &str, bool)> = if config.failover {
            (0..REPLICAS)
                .map(|i| (format!("{GROUP}-{i}"), GROUP, true))
                .chain([("broker-b".to_string(), "broker-b", false)])
                .collect()
        } else {
            BROKERS.iter().map(|b| (b.to_string(), *b, false)).collect()
        };
        let mut proxies = Vec::new();
        let mut brokers = Vec::new();
        let mut filesystems = Vec::new();
        let mut labels = Vec::new();
        for (label, name, controlled) in slots {
            let proxy = Proxy::bind().await.expect("proxy binds");
            let advertise = proxy.addr().to_string();
            let data = if config.faults.contains(&Fault::PowerCut) {
                // The mount point is the data directory; the broker's log
                // (`<label>.log` beside it) stays off the mount.
                let mnt = out.join(format!("{label}.fs"));
                std::fs::create_dir_all(&mnt).expect("create the mount point");
                filesystems.push(LazyFs::mount(&mnt).unwrap_or_else(|e| {
                    panic!("cannot mount the lazy filesystem for power cuts: {e}")
                }));
                mnt
            } else {
                out.join(&label)
            };
            let mut args: Vec<String> = [
                "--advertise-addr",
                &advertise,
                "--flush",
                "sync",
                "--transaction-timeout",
                "1s",
                "--transaction-check-interval",
                "500ms",
                "--transaction-check-timeout",
                "1s",
                "--consumer-expiry",
                "3s",
                // Ordered sends never auto-create a topic, but a
                // plain send to broker-b's topic while broker-b is
                // away would create it on broker-a, moving its keys
                // to other queues: as the README advises for order.
                "--auto-create-topics",
                "false",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if controlled {
                args.extend([
                    "--controller".to_string(),
                    controller_addrs.join(","),
                    "--replication".into(),
                    "sync".into(),
                    "--min-insync-replicas".into(),
                    "2".into(),
                    // An answer waits less than a client's request (1 s):
                    // a replica that does not confirm in time makes a
                    // FLUSH_SLAVE_TIMEOUT the client sees.
                    "--replication-timeout".into(),
                    "800ms".into(),
                ]);
            }
            let ns2 = ns.clone();
            let broker = tokio::task::block_in_place(|| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                BrokerProcess::start(&data, &ns2, name, &args)
            });
            proxy.set_target(&broker.addr);
            proxies.push(proxy);
            brokers.push(broker);
            labels.push(label);
        }
        for addr in &ns_addrs {
            for name in BROKERS {
                wait_for_master(addr, name).await;
            }
        }
        let admin = Admin::connect(ns_addrs.iter().map(String::as_str))
            .await
            .expect("admin connects");
        for (topic, broker) in [
            (TOPIC_A, Some("broker-a")),
            (TOPIC_B, Some("broker-b")),
            (TOPIC_TX, None),
        ] {
            admin
                .create_topic(topic, 4, PERM_READ_WRITE, broker)
                .await
                .unwrap_or_else(|e| panic!("create {topic}: {e}"));
        }
        wait_for_routes(&admin).await;
        admin.close().await.ok();

        let mut world = World {
            ns,
            ns_addrs,
            nameservers,
            controller_proxies,
            controller_dirs,
            brokers,
            labels,
            filesystems,
            proxies,
            producers: Vec::new(),
            txs: Vec::new(),
            consumers: Vec::new(),
            harness,
            rng: Rng::new(config.seed),
            master: None,
            master_kills: Vec::new(),
            figures: FailoverFigures::default(),
            config,
        };
        if world.config.failover {
            let v = failover::view(&world.ns_addrs).await;
            world.note_master(&v);
        }
        // Consumers first, so the group exists before the first message.
        let effects = world.effects_db().display().to_string();
        for i in 0..2 {
            let topics = format!("{TOPIC_A},{TOPIC_B},{TOPIC_TX}");
            let mut args = vec!["--topics", &topics, "--group", CONSUMER_GROUP];
            if world.config.dedup {
                args.extend(["--dedup-db", &effects]);
            }
            let p = world.client(&format!("consumer-{i}"), "consumer", &args);
            world.consumers.push(p);
        }
        let p = world.client(
            "retrier",
            "retrier",
            &[
                "--topics",
                &format!("{TOPIC_A},{TOPIC_B},{TOPIC_TX}"),
                "--group",
                RETRY_GROUP,
            ],
        );
        world.consumers.push(p);
        let quarter = format!("{}", world.config.rate / 4.0);
        for i in 0..2 {
            let p = world.client(
                &format!("producer-{i}"),
                "producer",
                &[
                    "--topics",
                    &format!("{TOPIC_A},{TOPIC_B}"),
                    "--concurrency",
                    "8",
                    "--rate",
                    &quarter,
                ],
            );
            world.producers.push(p);
            let p = world.client(
                &format!("tx-{i}"),
                "tx",
                &[
                    "--topics",
                    TOPIC_TX,
                    "--group",
                    PRODUCER_GROUP,
                    "--concurrency",
                    "4",
                    "--rate",
                    &quarter,
                ],
            );
            world.txs.push(p);
        }
        world
    }

    /// A `chaos-client` process named `base.<incarnation>`, recording into
    /// `base.<incarnation>.jsonl`.
    fn client(&mut self, base: &str, role: &str, extra: &[&str]) -> Process {
        let out = self.config.out_dir.clone();
        let (base_s, role_s, ns) = (base.to_string(), role.to_string(), self.ns.clone());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let seed = self.rng.next_u64();
        Process::start(
            base,
            binary("chaos-client"),
            out.join(format!("{base}.log")),
            move |inc| {
                let name = format!("{base_s}.{inc}");
                let mut args = vec![
                    "--role".to_string(),
                    role_s.clone(),
                    "--name".into(),
                    name.clone(),
                    "--nameserver".into(),
                    ns.clone(),
                    "--out".into(),
                    out.join(format!("{name}.jsonl")).display().to_string(),
                    "--seed".into(),
                    (seed + u64::from(inc)).to_string(),
                ];
                args.extend(extra.iter().cloned());
                args
            },
        )
    }

    async fn inject(&mut self, fault: Fault, n: usize) {
        let id = format!("{}#{n}", fault.name());
        let b = self.rng.below(self.brokers.len() as u64) as usize;
        let broker = self.labels[b].clone();
        let mut ev = self.harness.event(Kind::Invoke, Op::Fault, &id);
        ev.broker = Some(broker.clone());
        let started = ev.time_us;
        self.harness.record(&ev);
        let detail = match fault {
            Fault::KillMaster => self.kill_master(&id, started).await,
            Fault::PartitionMaster => self.partition_master(&id, started).await,
            Fault::KillControllerLeader => self.kill_controller_leader(started).await,
            Fault::KillBroker => {
                let p = &mut self.brokers[b];
                tokio::task::block_in_place(|| p.kill9());
                tokio::time::sleep(Duration::from_secs(2)).await;
                tokio::task::block_in_place(|| p.restart());
                format!("{broker} killed, restarted after 2 s")
            }
            Fault::PauseBroker => {
                let p = &self.brokers[b];
                tokio::task::block_in_place(|| p.signal("STOP"));
                tokio::time::sleep(Duration::from_secs(4)).await;
                tokio::task::block_in_place(|| p.signal("CONT"));
                format!("{broker} stopped for 4 s")
            }
            Fault::PauseWhileRetrying => {
                let p = &self.brokers[b];
                tokio::task::block_in_place(|| p.signal("STOP"));
                tokio::time::sleep(Duration::from_secs(10)).await;
                tokio::task::block_in_place(|| p.signal("CONT"));
                format!("{broker} stopped for 10 s while the retrier hands messages back")
            }
            Fault::CutConnections => {
                self.proxies[b].cut();
                format!("connections to {broker} cut")
            }
            Fault::Delay => {
                let p = &self.proxies[b];
                p.set_delay(Some((
                    Duration::from_millis(100),
                    Duration::from_millis(50),
                )));
                tokio::time::sleep(Duration::from_secs(4)).await;
                p.set_delay(None);
                format!("traffic of {broker} delayed 100 ms ± 50 ms for 4 s")
            }
            Fault::DropReply => {
                let p = &self.proxies[b];
                p.drop_next_reply();
                let t = Instant::now();
                while p.drop_pending() && t.elapsed() < Duration::from_secs(3) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let fired = !p.drop_pending();
                p.heal();
                if fired {
                    format!("a reply of {broker} dropped")
                } else {
                    format!("no request to {broker} within 3 s; nothing dropped")
                }
            }
            Fault::KillTxProducer => {
                let t = self.rng.below(self.txs.len() as u64) as usize;
                let out = self.config.out_dir.clone();
                let p = &mut self.txs[t];
                let file = out.join(format!("{}.{}.jsonl", p.name, p.incarnation()));
                p.signal("USR1");
                let since = Instant::now();
                let held = loop {
                    let held = history::read_events(&file)
                        .into_iter()
                        .find(|e| e.f == Op::Hold);
                    if held.is_some() || since.elapsed() > Duration::from_secs(3) {
                        break held;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                tokio::task::block_in_place(|| p.kill9());
                tokio::time::sleep(Duration::from_secs(1)).await;
                p.spawn();
                match held {
                    Some(e) => format!(
                        "{} killed between prepare and end of {} (tx {} on {})",
                        p.name,
                        e.id,
                        e.tx_id.unwrap_or_default(),
                        e.broker.unwrap_or_default()
                    ),
                    None => format!("{} killed (no transaction held within 3 s)", p.name),
                }
            }
            Fault::KillConsumer => {
                let c = self.rng.below(self.consumers.len() as u64) as usize;
                let p = &mut self.consumers[c];
                tokio::task::block_in_place(|| p.kill9());
                tokio::time::sleep(Duration::from_secs(2)).await;
                p.spawn();
                format!("{} killed, restarted after 2 s", p.name)
            }
            Fault::PowerCut => {
                let seed = self.rng.next_u64();
                let p = &mut self.brokers[b];
                let fs = &self.filesystems[b];
                let report = tokio::task::block_in_place(|| {
                    p.kill9();
                    fs.power_cut(Some(seed))
                });
                let report = report.unwrap_or_else(|e| panic!("power cut of {broker}: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| p.restart());
                format!(
                    "{broker} lost its power: {} unsynced bytes dropped, {} writes torn, {} paths lost; restarted after 1 s",
                    report.unsynced_bytes_lost,
                    report.torn.len(),
                    report.lost_paths.len()
                )
            }
        };
        let mut ev = self.harness.event(Kind::Ok, Op::Fault, &id);
        ev.broker = Some(broker);
        ev.detail = Some(detail);
        self.harness.record(&ev);
        if self.config.failover {
            // Any fault may have replaced the master (a paused or killed
            // replica that was the master): note it.
            let v = failover::view(&self.ns_addrs).await;
            if let (Some((_, was)), Some((_, now))) = (&self.master, v.master(GROUP)) {
                if now > *was && !matches!(fault, Fault::KillMaster | Fault::PartitionMaster) {
                    let ms = (history::now_us().saturating_sub(started)) / 1000;
                    self.figures.elections.push((id.clone(), ms));
                }
            }
            self.note_master(&v);
        }
    }

    /// Records `broker-a`'s master in the history when it changed since
    /// last seen.
    fn note_master(&mut self, v: &failover::ControllerView) {
        let Some((addr, epoch)) = v.master(GROUP) else {
            return;
        };
        if self.master.as_ref().is_some_and(|(_, e)| *e >= epoch) {
            return;
        }
        let mut ev = self.harness.event(Kind::Info, Op::Master, GROUP);
        ev.broker = Some(GROUP.to_string());
        ev.detail = Some(addr.clone());
        ev.offset = Some(epoch);
        self.harness.record(&ev);
        self.figures.final_epoch = epoch;
        self.master = Some((addr, epoch));
    }

    /// The slot of `broker-a`'s master (by the address it advertises:
    /// its proxy's), and its epoch, as the controller says now.
    async fn find_master(&mut self) -> Option<(usize, String, u64)> {
        let v = failover::view(&self.ns_addrs).await;
        self.note_master(&v);
        let (addr, epoch) = v.master(GROUP)?;
        let slot = self
            .proxies
            .iter()
            .position(|p| p.addr().to_string() == addr)?;
        Some((slot, addr, epoch))
    }

    /// Waits up to `limit` for the controller to name a master of
    /// `broker-a` newer than `epoch`; records it, and how long after
    /// `started` (µs) it was seen, under fault `id`.
    async fn wait_for_election(
        &mut self,
        id: &str,
        epoch: u64,
        started: u64,
        limit: Duration,
    ) -> Option<(String, u64, u64)> {
        let (v, ok) = failover::wait_for(&self.ns_addrs, limit, |v| {
            v.master(GROUP).is_some_and(|(_, e)| e > epoch)
        })
        .await;
        if !ok {
            return None;
        }
        let ms = history::now_us().saturating_sub(started) / 1000;
        self.note_master(&v);
        self.figures.elections.push((id.to_string(), ms));
        v.master(GROUP).map(|(a, e)| (a, e, ms))
    }

    async fn kill_master(&mut self, id: &str, started: u64) -> String {
        let Some((m, addr, epoch)) = self.find_master().await else {
            return format!("no master of {GROUP} known; nothing killed");
        };
        let label = self.labels[m].clone();
        let p = &mut self.brokers[m];
        tokio::task::block_in_place(|| p.kill9());
        let killed_at = history::now_us();
        self.master_kills.push(killed_at);
        let restart_at = Instant::now() + Duration::from_secs(2);
        let elected = self
            .wait_for_election(id, epoch, started, Duration::from_secs(2))
            .await;
        tokio::time::sleep_until(restart_at.into()).await;
        let p = &mut self.brokers[m];
        tokio::task::block_in_place(|| p.restart());
        let elected = match elected {
            Some(e) => Some(e),
            None => {
                self.wait_for_election(id, epoch, started, Duration::from_secs(10))
                    .await
            }
        };
        match elected {
            Some((new, e, ms)) => format!(
                "master {label} ({addr}, epoch {epoch}) killed; {new} master at epoch {e} after {ms} ms; restarted after 2 s"
            ),
            None => format!(
                "master {label} ({addr}, epoch {epoch}) killed, restarted after 2 s; no new master within 12 s"
            ),
        }
    }

    async fn partition_master(&mut self, id: &str, started: u64) -> String {
        let Some((m, addr, epoch)) = self.find_master().await else {
            return format!("no master of {GROUP} known; nothing cut");
        };
        let label = self.labels[m].clone();
        let heal_at = Instant::now() + Duration::from_secs(6);
        failover::cut_from_controller(&self.controller_proxies, GROUP, &addr);
        // Its slaves' fetches come through its proxy, as clients do: only
        // theirs are swallowed.
        for (s, proxy) in self.proxies.iter().enumerate() {
            if s != m && self.brokers[s].name == GROUP {
                self.proxies[m].black_hole(&format!("{GROUP}@{}", proxy.addr()));
            }
        }
        let elected = self
            .wait_for_election(id, epoch, started, Duration::from_secs(6))
            .await;
        tokio::time::sleep_until(heal_at.into()).await;
        for p in &self.controller_proxies {
            p.heal();
        }
        self.proxies[m].heal();
        match elected {
            Some((new, e, ms)) => format!(
                "master {label} ({addr}, epoch {epoch}) cut from the controller and its slaves for 6 s, clients still reaching it; {new} master at epoch {e} after {ms} ms"
            ),
            None => format!(
                "master {label} ({addr}, epoch {epoch}) cut from the controller and its slaves for 6 s; no new master meanwhile"
            ),
        }
    }

    async fn kill_controller_leader(&mut self, started: u64) -> String {
        let v = failover::view(&self.ns_addrs).await;
        let Some((leader, term)) = v.leader else {
            return "no controller leader known; nothing killed".into();
        };
        let Some(i) = (leader as usize)
            .checked_sub(1)
            .filter(|i| *i < self.nameservers.len())
        else {
            return format!("controller leader {leader} is no member the harness started");
        };
        let addr = self.ns_addrs[i].clone();
        let p = &mut self.nameservers[i];
        tokio::task::block_in_place(|| p.kill9());
        let restart_at = Instant::now() + Duration::from_secs(2);
        let others: Vec<String> = self
            .ns_addrs
            .iter()
            .filter(|a| **a != addr)
            .cloned()
            .collect();
        let new_leader =
            |v: &failover::ControllerView| v.leader.is_some_and(|(id, t)| id != leader && t > term);
        let (mut v, mut ok) = failover::wait_for(&others, Duration::from_secs(2), new_leader).await;
        let mut ms = history::now_us().saturating_sub(started) / 1000;
        tokio::time::sleep_until(restart_at.into()).await;
        let p = &mut self.nameservers[i];
        p.spawn();
        tokio::task::block_in_place(|| wait_for_port(&addr, "txmq-nameserver"));
        if !ok {
            (v, ok) = failover::wait_for(&self.ns_addrs, Duration::from_secs(10), new_leader).await;
            ms = history::now_us().saturating_sub(started) / 1000;
        }
        if !ok {
            return format!(
                "controller leader {leader} (nameserver {addr}, term {term}) killed, restarted after 2 s; no new leader within 12 s"
            );
        }
        self.figures.controller_leader.push(ms);
        let (new, t) = v.leader.unwrap_or_default();
        let master = match v.master(GROUP) {
            Some((m, e)) => format!("{GROUP}'s master {m} at epoch {e}"),
            None => format!("{GROUP} without a master"),
        };
        format!(
            "controller leader {leader} (nameserver {addr}, term {term}) killed; member {new} leads at term {t} after {ms} ms ({master}); restarted after 2 s"
        )
    }

    /// Heals everything, stops the sends, waits until no transaction is
    /// left prepared (a fresh member of the producer group answers the
    /// check-backs) and the consumers have caught up, then stops them.
    async fn wind_down(&mut self) {
        for p in self.proxies.iter().chain(&self.controller_proxies) {
            p.heal();
        }
        let checker = self.client(
            "tx-checker",
            "tx",
            &[
                "--topics",
                TOPIC_TX,
                "--group",
                PRODUCER_GROUP,
                "--concurrency",
                "0",
            ],
        );
        let mut stopping: Vec<Process> =
            self.producers.drain(..).chain(self.txs.drain(..)).collect();
        tokio::task::block_in_place(|| {
            for p in &mut stopping {
                p.terminate(Duration::from_secs(10));
            }
        });
        for c in &mut self.consumers {
            if !c.is_running() {
                c.spawn();
            }
        }
        let mut ev = self
            .harness
            .event(Kind::Info, Op::Fault, "workload-stopped");
        ev.detail = Some("sends stopped, faults healed".into());
        self.harness.record(&ev);

        let admin = Admin::connect(self.ns_addrs.iter().map(String::as_str))
            .await
            .expect("admin connects");
        // Transaction timeout (1 s) plus a few check intervals and check
        // timeouts; generous for a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(30);
        let list = loop {
            let list = admin.list_transactions(None).await;
            let done = list.as_ref().is_ok_and(|l| {
                l.len() == BROKERS.len()
                    && l.iter()
                        .flat_map(|b| &b.transactions)
                        .all(|t| t.state != TxState::Prepared)
            });
            if done || Instant::now() > deadline {
                break list;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match list {
            Ok(lists) => {
                for l in lists {
                    for t in l.transactions {
                        let mut ev =
                            self.harness
                                .event(Kind::Info, Op::Pending, t.tx_id.to_string());
                        ev.tx_id = Some(t.tx_id);
                        ev.broker = Some(l.broker_name.clone());
                        ev.msg_id = t.msg_ids.first().map(ToString::to_string);
                        ev.status = Some(t.state.name().to_string());
                        ev.detail = Some(format!(
                            "checks {}, last error {:?}",
                            t.checks, t.last_error
                        ));
                        self.harness.record(&ev);
                    }
                }
            }
            Err(e) => {
                let mut ev = self
                    .harness
                    .event(Kind::Fail, Op::Pending, "list-transactions");
                ev.status = Some("unknown".into());
                ev.msg_id = Some("unknown".into());
                ev.detail = Some(format!("cannot list transactions: {e}"));
                self.harness.record(&ev);
            }
        }

        // Drained: every queue of each group (its retry topic's too)
        // committed up to its end, and still so 2 s later with nothing
        // stored meanwhile: a message handed back for a retry waits out its
        // delay (500 ms) before it shows in the retry topic.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut drained_at: Option<(Instant, u64)> = None;
        loop {
            let mut stored = 0;
            let mut drained = true;
            for group in [CONSUMER_GROUP, RETRY_GROUP] {
                match admin.group_state(group, None).await {
                    Ok(s) if s.len() == BROKERS.len() => {
                        for q in s.iter().flat_map(|g| &g.queues) {
                            drained &= q.lag == 0;
                            stored += q.max_offset;
                        }
                    }
                    _ => drained = false,
                }
            }
            match drained_at {
                _ if !drained => drained_at = None,
                Some((at, before)) if before == stored => {
                    if at.elapsed() >= Duration::from_secs(2) {
                        break;
                    }
                }
                _ => drained_at = Some((Instant::now(), stored)),
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut last: Vec<Process> = self.consumers.drain(..).collect();
        last.push(checker);
        tokio::task::block_in_place(|| {
            for p in &mut last {
                p.terminate(Duration::from_secs(15));
            }
        });
        for group in [CONSUMER_GROUP, RETRY_GROUP] {
            self.record_group(&admin, group).await;
        }
        self.record_stored(&admin).await;
        admin.close().await.ok();
        if self.config.dedup {
            self.record_effects();
        }
        if self.config.failover {
            let v = failover::view(&self.ns_addrs).await;
            self.note_master(&v);
        }
    }

    /// Dedup mode's database.
    fn effects_db(&self) -> PathBuf {
        self.config.out_dir.join("effects.sqlite")
    }

    /// Records, for the `stored-twice` and `duplicate` checkers, every
    /// message the workload's topics hold at the end, at its position.
    async fn record_stored(&mut self, admin: &Admin) {
        for topic in [TOPIC_A, TOPIC_B, TOPIC_TX] {
            match admin.browse(topic, usize::MAX).await {
                Ok(stored) => {
                    for m in stored {
                        let body = String::from_utf8_lossy(m.body()).into_owned();
                        let mut ev = self.harness.event(Kind::Ok, Op::Stored, body);
                        ev.broker = Some(m.broker_name.clone());
                        ev.topic = Some(topic.to_string());
                        ev.queue = Some(m.queue());
                        ev.offset = Some(m.queue_offset());
                        ev.msg_id = Some(m.msg_id().to_string());
                        self.harness.record(&ev);
                    }
                }
                Err(e) => {
                    let mut ev = self.harness.event(Kind::Fail, Op::Stored, topic);
                    ev.detail = Some(format!("cannot read {topic}: {e}"));
                    self.harness.record(&ev);
                }
            }
        }
    }

    /// Dedup mode: records every row of the consumers' effects table, for
    /// the `applied-once` checker. Run once the consumers are gone.
    fn record_effects(&mut self) {
        let rows = client::open_effects_db(&self.effects_db()).and_then(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT msg_id, body, by FROM {}",
                client::EFFECTS_TABLE
            ))?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        });
        match rows {
            Ok(rows) => {
                let mut ev = self.harness.event(Kind::Info, Op::Effect, "effects-read");
                ev.detail = Some(format!("{} rows", rows.len()));
                self.harness.record(&ev);
                for (msg_id, body, by) in rows {
                    let mut ev = self.harness.event(Kind::Ok, Op::Effect, body);
                    ev.msg_id = Some(msg_id);
                    ev.detail = Some(format!("applied by {by}"));
                    self.harness.record(&ev);
                }
            }
            Err(e) => {
                let mut ev = self.harness.event(Kind::Fail, Op::Effect, "effects-read");
                ev.detail = Some(format!("cannot read the effects table: {e}"));
                self.harness.record(&ev);
            }
        }
    }

    /// Records, for the `unhandled` checker, every message stored below
    /// `group`'s committed offsets (its retry topic included) and every
    /// message in its dead-letter topic. Run once the consumers are gone,
    /// so the offsets are final.
    async fn record_group(&mut self, admin: &Admin, group: &str) {
        let states = match admin.group_state(group, None).await {
            Ok(states) => states,
            Err(e) => {
                let mut ev = self.harness.event(Kind::Fail, Op::Below, group);
                ev.group = Some(group.to_string());
                ev.detail = Some(format!("cannot read the group's offsets: {e}"));
                self.harness.record(&ev);
                return;
            }
        };
        let mut committed: HashMap<(String, String, u32), u64> = HashMap::new();
        for s in &states {
            for q in &s.queues {
                if let Some(c) = q.committed {
                    committed.insert((s.broker_name.clone(), q.topic.clone(), q.queue), c);
                }
            }
        }
        let topics: BTreeSet<&str> = committed.keys().map(|(_, t, _)| t.as_str()).collect();
        for topic in topics {
            let stored = match admin.browse(topic, usize::MAX).await {
                Ok(stored) => stored,
                Err(e) => {
                    let mut ev = self.harness.event(Kind::Fail, Op::Below, topic);
                    ev.group = Some(group.to_string());
                    ev.detail = Some(format!("cannot read {topic}: {e}"));
                    self.harness.record(&ev);
                    continue;
                }
            };
            for m in stored {
                let at = (m.broker_name.clone(), topic.to_string(), m.queue());
                if committed.get(&at).is_some_and(|c| m.queue_offset() < *c) {
                    let mut ev = self.harness.event(
                        Kind::Ok,
                        Op::Below,
                        String::from_utf8_lossy(m.body()).into_owned(),
                    );
                    ev.group = Some(group.to_string());
                    ev.broker = Some(at.0);
                    ev.topic = Some(at.1);
                    ev.queue = Some(at.2);
                    ev.offset = Some(m.queue_offset());
                    ev.msg_id = Some(m.msg_id().to_string());
                    self.harness.record(&ev);
                }
            }
        }
        // No dead letter yet: no such topic.
        let dlq = format!("%DLQ%{group}");
        for m in admin.browse(&dlq, usize::MAX).await.unwrap_or_default() {
            let body = String::from_utf8_lossy(m.body()).into_owned();
            let mut ev = self.harness.event(Kind::Ok, Op::DeadLetter, body);
            ev.group = Some(group.to_string());
            ev.msg_id = Some(m.msg_id().to_string());
            self.harness.record(&ev);
        }
    }
}

/// Waits (up to 20 s: a controller first elects its leader, then the
/// group's master) until the nameserver at `ns` lists a master of `name`.
async fn wait_for_master(ns: &str, name: &str) {
    let admin = Admin::connect([ns.to_string()])
        .await
        .expect("admin connects");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(brokers) = admin.cluster().await {
            if brokers
                .iter()
                .any(|b| b.broker_name == name && b.role == txmq::BrokerRole::Master)
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no master of {name} registered with {ns}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.close().await.ok();
}

async fn wait_for_routes(admin: &Admin) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (topic, want) in [(TOPIC_A, 1), (TOPIC_B, 1), (TOPIC_TX, 2)] {
        loop {
            if admin.route(topic).await.is_ok_and(|r| {
                r.brokers.len() == want && r.brokers.iter().all(|b| !b.addr.is_empty())
            }) {
                break;
            }
            assert!(Instant::now() < deadline, "{topic} never routed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `target/tmp/<name>-<seconds since the epoch>-<pid>-<n>` next to the test
/// binary's target directory, or the system's temporary directory; `n`
/// tells apart the runs of one test process.
pub fn default_out_dir(target_tmp: Option<&Path>, name: &str) -> PathBuf {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = target_tmp.map_or_else(std::env::temp_dir, Path::to_path_buf);
    base.join(format!("{name}-{stamp}-{}-{n}", std::process::id()))
}
