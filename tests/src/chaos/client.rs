//! The workload's clients, each run as its own `chaos-client` process so
//! the harness can `kill -9` it: a producer of plain ordered sends, a
//! transactional producer, and an orderly push consumer. Each records what
//! it does into its own history file ([`Recorder`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use txmq::{
    handler_fn, BoxError, CheckRequest, ConsumeResult, Deduped, Message, MsgId, Producer,
    PushConsumer, ReceivedMessage, SqliteDedup, TransactionListener, TransactionProducer,
    TransactionState, TxContext,
};

use super::history::{Kind, Op, Recorder};
use crate::rng::Rng;

/// The message property that carries a transaction's truth.
pub const PROP_TRUTH: &str = "chaos.truth";
/// The message property that carries what its local transaction answers.
pub const PROP_LOCAL: &str = "chaos.local";

/// What a client process is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Plain sends with sharding keys.
    Producer,
    /// Transactional sends.
    Tx,
    /// An orderly push consumer.
    Consumer,
    /// A concurrent push consumer that asks for one message in 25 to be
    /// retried at every delivery, until the broker dead-letters it; slowly
    /// the first time (a second, so that a fault lands while it hands them
    /// back).
    Retrier,
}

/// A client process's settings (its command line).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "chaos-client", about = "a txmq chaos-test client")]
pub struct ClientArgs {
    /// What to run.
    #[arg(long, value_enum)]
    pub role: Role,
    /// The process's name in the history; also the prefix of its keys and ids.
    #[arg(long)]
    pub name: String,
    /// Nameserver addresses, comma-separated.
    #[arg(long)]
    pub nameserver: String,
    /// The history file to append to.
    #[arg(long)]
    pub out: PathBuf,
    /// Topics: a producer's keys are spread over them; a consumer subscribes to all.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// The producer or consumer group.
    #[arg(long, default_value = "chaos")]
    pub group: String,
    /// Concurrent senders (one per sharding key for a producer).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Operations per second of the whole process.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// How long one request waits for an answer.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Seed of the workload mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Dedup mode (an orderly consumer): apply each message's effect (a
    /// row of table [`EFFECTS_TABLE`]) in this SQLite database through
    /// [`SqliteDedup`] keyed by msg id, in one transaction with the
    /// dedup record. The group's consumers share the file.
    #[arg(long)]
    pub dedup_db: Option<PathBuf>,
}

/// Dedup mode's effects table: one row per applied message.
pub const EFFECTS_TABLE: &str = "effects";
/// Dedup mode's dedup table.
pub const DEDUP_TABLE: &str = "applied_messages";

/// The dedup helper of dedup mode (a TTL far past any run).
pub fn chaos_dedup() -> SqliteDedup {
    SqliteDedup::new(DEDUP_TABLE, Duration::from_secs(7 * 24 * 3600))
}

/// Opens dedup mode's database (creating its tables), waiting up to 10 s
/// for another process's write lock.
///
/// # Errors
/// SQLite's.
pub fn open_effects_db(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // WAL: the consumers write while the other reads; each commit is
    // durable (synchronous FULL), since a consumer is killed with -9.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    chaos_dedup().ensure_schema(&conn)?;
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {EFFECTS_TABLE} (
             msg_id TEXT NOT NULL,
             body   TEXT NOT NULL,
             by     TEXT NOT NULL
         )"
    ))?;
    Ok(conn)
}

/// Runs `args.role` until `stop` is cancelled; `hold` (transactional
/// producers) makes the next local transaction stop for good, recorded as
/// an [`Op::Hold`] event, so the harness can kill the process between
/// prepare and end.
///
/// # Errors
/// The client cannot start (no nameserver answers, ...).
pub async fn run(
    args: ClientArgs,
    rec: Recorder,
    stop: CancellationToken,
    hold: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    match args.role {
        Role::Producer => run_producer(args, rec, stop).await,
        Role::Tx => run_tx_producer(args, rec, stop, hold).await,
        Role::Consumer => run_consumer(args, rec, stop, false).await,
        Role::Retrier => run_consumer(args, rec, stop, true).await,
    }
}

fn period(args: &ClientArgs) -> Duration {
    Duration::from_secs_f64(args.concurrency.max(1) as f64 / args.rate.max(0.001))
}

async fn run_producer(
    args: ClientArgs,
    rec: Recorder,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(!args.topics.is_empty(), "a producer needs --topics");
    let producer = Producer::builder()
        .nameserver(&args.nameserver)
        .send_timeout(args.request_timeout)
        .route_refresh_interval(Duration::from_millis(500))
        .build()
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        let key = format!("{}-k{i}", args.name);
        let topic = args.topics[i % args.topics.len()].clone();
        let (producer, rec, stop) = (producer.clone(), rec.clone(), stop.clone());
        let period = period(&args);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // One send at a time per key: each is sent after the previous
            // one was answered, so acknowledged sends of a key are ordered.
            for seq in 1u64.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let id = format!("{key}:{seq}");
                let msg = Message::new(topic.as_str(), id.clone())
                    .with_key(key.as_str())
                    .with_msg_id(MsgId::generate());
                let mut ev = rec.event(Kind::Invoke, Op::Send, &id);
                ev.key = Some(key.clone());
                ev.msg_id = msg.msg_id().map(|id| id.to_string());
                ev.topic = Some(topic.clone());
                rec.record(&ev);
                let result = producer.send_ordered(msg, &key).await;
                match result {
                    Ok(r) => {
                        ev.kind = Kind::Ok;
                        ev.broker = Some(r.broker_name);
                        ev.queue = Some(r.queue);
                        ev.offset = Some(r.queue_offset);
                        ev.status = Some(r.status.name().to_string());
                    }
                    Err(e) => {
                        ev.kind = outcome_of(&e);
                        ev.detail = Some(txmq::error::chain(&e));
                    }
                }
                ev.time_us = super::history::now_us();
                rec.record(&ev);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    producer.close().await.ok();
    Ok(())
}

/// `fail` for an error that certainly stored nothing (the broker refused,
/// or nothing was sent), `info` when the request may have taken effect: a
/// lost answer, or a refusal that says the record is stored on the master
/// but not on enough replicas (it may survive a failover or not).
fn outcome_of(e: &txmq::Error) -> Kind {
    use txmq::ErrorCode;
    match e {
        txmq::Error::NoRoute { .. } | txmq::Error::NoQueue { .. } | txmq::Error::BadArgument(_) => {
            Kind::Fail
        }
        _ => match e.wire_error().map(|w| w.code) {
            Some(
                ErrorCode::FlushSlaveTimeout | ErrorCode::SlaveNotAvailable | ErrorCode::Timeout,
            ) => Kind::Info,
            Some(_) => Kind::Fail,
            None => Kind::Info,
        },
    }
}

fn state_name(s: TransactionState) -> &'static str {
    match s {
        TransactionState::Commit => "commit",
        TransactionState::Rollback => "rollback",
        TransactionState::Unknown => "unknown",
    }
}

fn state_of(name: Option<&str>) -> TransactionState {
    match name {
        Some("commit") => TransactionState::Commit,
        Some("rollback") => TransactionState::Rollback,
        _ => TransactionState::Unknown,
    }
}

/// Answers local transactions from the message's [`PROP_LOCAL`] and
/// check-backs from its [`PROP_TRUTH`]: the truth a real service would find
/// in its database, recorded in the history when the send was invoked.
struct ChaosListener {
    rec: Recorder,
    hold: Arc<AtomicBool>,
}

impl TransactionListener for ChaosListener {
    async fn execute(&self, msg: &Message, ctx: &TxContext) -> Result<TransactionState, BoxError> {
        if self.hold.swap(false, Ordering::SeqCst) {
            let mut ev = self.rec.event(Kind::Info, Op::Hold, body_of(msg));
            ev.tx_id = Some(ctx.tx_id());
            ev.broker = Some(ctx.broker_name().to_string());
            ev.msg_id = Some(ctx.msg_id().to_string());
            ev.truth = msg.property(PROP_TRUTH).map(str::to_string);
            self.rec.record(&ev);
            // Prepared, never ended: the harness kills the process now.
            std::future::pending::<()>().await;
        }
        Ok(state_of(msg.property(PROP_LOCAL)))
    }

    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        let msg = req.message();
        let answer = state_of(msg.property(PROP_TRUTH));
        let mut ev = self.rec.event(Kind::Ok, Op::Check, body_of(msg));
        ev.tx_id = Some(req.tx_id());
        ev.broker = Some(req.broker_name().to_string());
        ev.msg_id = Some(req.msg_id().to_string());
        ev.answer = Some(state_name(answer).to_string());
        ev.detail = Some(format!("checks before: {}", req.checks()));
        self.rec.record(&ev);
        Ok(answer)
    }
}

fn body_of(msg: &Message) -> String {
    String::from_utf8_lossy(msg.body()).into_owned()
}

async fn run_tx_producer(
    args: ClientArgs,
    rec: Recorder,
    stop: CancellationToken,
    hold: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let topic = args
        .topics
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("a transactional producer needs --topics"))?;
    let producer = TransactionProducer::builder()
        .nameserver(&args.nameserver)
        .group(args.group.as_str())
        .listener(ChaosListener {
            rec: rec.clone(),
            hold,
        })
        .send_timeout(args.request_timeout)
        .route_refresh_interval(Duration::from_millis(500))
        .broker_refresh_interval(Duration::from_millis(200))
        .check_timeout(Some(Duration::from_secs(1)))
        .start()
        .await?;
    let rng = Arc::new(Mutex::new(Rng::new(args.seed)));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..args.concurrency {
        let (producer, rec, stop, rng) = (producer.clone(), rec.clone(), stop.clone(), rng.clone());
        let (name, topic, period) = (args.name.clone(), topic.clone(), period(&args));
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 1u64.. {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                // 60% commit, 40% roll back; the local transaction tells
                // the truth 70% of the time and "unknown" otherwise, when
                // only a check-back can end it.
                let (truth, local) = {
                    let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
                    let truth = if rng.chance(0.6) {
                        "commit"
                    } else {
                        "rollback"
                    };
                    let local = if rng.chance(0.7) { truth } else { "unknown" };
                    (truth, local)
                };
                let id = format!("{name}:tx{task}:{n}");
                let msg = Message::new(topic.as_str(), id.clone())
                    .with_key(id.as_str())
                    .with_property(PROP_TRUTH, truth)
                    .with_property(PROP_LOCAL, local)
                    .with_msg_id(MsgId::generate());
                let mut ev = rec.event(Kind::Invoke, Op::Tx, &id);
                ev.msg_id = msg.msg_id().map(|id| id.to_string());
                ev.truth = Some(truth.to_string());
                ev.answer = Some(local.to_string());
                ev.topic = Some(topic.clone());
                rec.record(&ev);
                let result = producer.send_in_transaction(msg).await;
                match result {
                    Ok(o) => {
                        ev.tx_id = Some(o.tx_id);
                        ev.broker = Some(o.broker_name.clone());
                        if o.prepare_status != txmq::SendStatus::SendOk {
                            // Rolled back by the producer without running
                            // the local transaction.
                            ev.prepare = Some(o.prepare_status.name().to_string());
                        }
                        if let Some(e) = o.end_error() {
                            // Prepared for sure; the end is what failed.
                            ev.kind = Kind::Info;
                            ev.detail = Some(txmq::error::chain(e));
                        } else {
                            ev.kind = Kind::Ok;
                            ev.answer = Some(state_name(o.state).to_string());
                            ev.status =
                                Some(o.ended().map_or("prepared", |e| e.state.name()).to_string());
                        }
                    }
                    Err(e) => {
                        ev.kind = outcome_of(&e);
                        ev.detail = Some(txmq::error::chain(&e));
                    }
                }
                ev.time_us = super::history::now_us();
                rec.record(&ev);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // With no senders (--concurrency 0) this member only answers
    // check-backs, until it is told to stop.
    stop.cancelled().await;
    producer.close().await.ok();
    Ok(())
}

/// Whether a retrier asks for `body` to be retried (at every delivery).
fn asks_retry(body: &str) -> bool {
    // FNV-1a: stable across processes and runs.
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    hash % 25 == 0
}

async fn run_consumer(
    args: ClientArgs,
    rec: Recorder,
    stop: CancellationToken,
    retrier: bool,
) -> anyhow::Result<()> {
    let mut builder = PushConsumer::builder()
        .nameserver(&args.nameserver)
        .group(args.group.as_str())
        .orderly(!retrier)
        // Few attempts, so a paused broker outlasts a retrier's attempts to
        // hand a message back.
        .max_reconsume_times(if retrier { 3 } else { 16 })
        .rebalance_interval(Duration::from_millis(500))
        .commit_interval(Duration::from_millis(200))
        .max_wait(Duration::from_millis(500))
        .route_refresh_interval(Duration::from_millis(500))
        .request_timeout(args.request_timeout);
    for t in &args.topics {
        builder = builder.subscribe(t.as_str(), "*");
    }
    let handler_rec = rec.clone();
    let group = args.group.clone();
    let db = match (&args.dedup_db, retrier) {
        (Some(path), false) => Some(Arc::new(Mutex::new(open_effects_db(path)?))),
        _ => None,
    };
    let name = args.name.clone();
    let consumer = builder
        .start(handler_fn(move |m: &ReceivedMessage| {
            let body = String::from_utf8_lossy(m.body()).into_owned();
            let retry = retrier && asks_retry(&body);
            // A retry asked is not a handling: recorded as `info`.
            let kind = if retry { Kind::Info } else { Kind::Ok };
            let mut ev = handler_rec.event(kind, Op::Consume, body);
            ev.group = Some(group.clone());
            ev.key = m.key().map(str::to_string);
            ev.msg_id = Some(m.msg_id().to_string());
            ev.broker = Some(m.broker_name.clone());
            ev.topic = Some(m.topic().to_string());
            ev.queue = Some(m.queue());
            ev.offset = Some(m.queue_offset());
            if m.reconsume_times() > 0 {
                ev.detail = Some(format!("reconsume {}", m.reconsume_times()));
            }
            // Recorded before the handler returns, so before the offset can
            // be committed.
            handler_rec.record(&ev);
            let first = m.reconsume_times() == 0;
            let apply = db.clone().map(|db| {
                let (msg_id, body, by) = (m.msg_id(), ev.id.clone(), name.clone());
                (db, msg_id, body, by)
            });
            let rec = handler_rec.clone();
            async move {
                if let Some((db, msg_id, body, by)) = apply {
                    // The effect and its dedup record commit together; a
                    // failure rolls both back and the message comes again.
                    let done = tokio::task::spawn_blocking(move || {
                        let mut conn = db.lock().unwrap_or_else(|e| e.into_inner());
                        chaos_dedup().apply(&mut conn, msg_id, std::time::SystemTime::now(), |tx| {
                            tx.execute(
                                &format!(
                                    "INSERT INTO {EFFECTS_TABLE} (msg_id, body, by) VALUES (?1, ?2, ?3)"
                                ),
                                [msg_id.to_string(), body, by],
                            )
                        })
                    })
                    .await;
                    return match done {
                        Ok(Ok(Deduped::Applied(_))) => ConsumeResult::Success,
                        Ok(Ok(Deduped::Duplicate)) => {
                            let mut ev = rec.event(Kind::Info, Op::Effect, "absorbed");
                            ev.msg_id = Some(msg_id.to_string());
                            ev.detail = Some("a redelivery the dedup table absorbed".into());
                            rec.record(&ev);
                            ConsumeResult::Success
                        }
                        Ok(Err(e)) => {
                            let mut ev = rec.event(Kind::Info, Op::Effect, "apply-failed");
                            ev.detail = Some(e.to_string());
                            rec.record(&ev);
                            ConsumeResult::Retry {
                                delay: Some(Duration::from_millis(100)),
                            }
                        }
                        Err(_) => ConsumeResult::Retry {
                            delay: Some(Duration::from_millis(100)),
                        },
                    };
                }
                if retry {
                    let slow = if first { 1000 } else { 100 };
                    tokio::time::sleep(Duration::from_millis(slow)).await;
                    ConsumeResult::Retry {
                        delay: Some(Duration::from_millis(500)),
                    }
                } else {
                    ConsumeResult::Success
                }
            }
        }))
        .await?;
    stop.cancelled().await;
    consumer.shutdown().await?;
    Ok(())
}
