//! `txmq bench tx TOPIC`: transactional sends from `--producers`
//! transaction producers of one group, with RocketMQ's TransactionProducer
//! mix: each local transaction commits, rolls back (`--rollback-ratio`) or
//! stays unknown (`--unknown-ratio`), and each check-back of an unknown one
//! answers rollback (`--check-rollback-ratio`), unknown
//! (`--check-unknown-ratio`) or commit. The choice is deterministic per
//! message (producer index and sequence number) and, for checks, per check.
//!
//! Measured: the whole transactional send (from the intended send time),
//! the prepare (send start to the local transaction starting), the commit
//! (local transaction done to the broker's answer), prepare-to-visible (a
//! consumer of the topic sees the committed message), check-back latency
//! (prepare to the first check), checks per transaction, and checks that
//! should not happen: unexpected (a transaction whose local result was
//! commit or rollback) and duplicated (checked again after a check
//! answered commit or rollback). The consumer also counts committed
//! messages never seen (lost), seen twice (duplicated), and rolled-back
//! ones seen at all.
//!
//! After the last send the producers stay, answering check-backs, until
//! every transaction is resolved and every commit seen, or `--grace` ends.
//! Check-backs start after the broker's `--transaction-timeout` (or
//! `--first-check-delay`) and repeat every `--transaction-check-interval`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use tokio::sync::watch;
use txmq::{
    BoxError, CheckRequest, ConsumeFrom, Message, PullConsumer, TransactionListener,
    TransactionProducer, TransactionState, TxContext, TxEnd,
};

use super::body::{elapsed_ns, new_run_id, producer_id, Clock, Header};
use super::histogram::Latencies;
use super::load::{drive, Plan};
use super::progress::{Counters, Progress};
use super::report::round;
use super::{ensure_topic, secs_between, show_progress, stop_on_interrupt, LoadArgs, Timing};
use crate::args::{parse_duration, GlobalArgs};
use crate::output::{error_text, Printer};

/// Shards of the transaction book, so producers rarely wait on each other.
const SHARDS: usize = 64;
/// The longest single wait for messages, so the stop signal is seen soon.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// Salts that make the local and check choices independent.
const SALT_LOCAL: u64 = 0x6c6f_6361_6c00_0000;
const SALT_CHECK: u64 = 0x6368_6563_6b00_0000;

/// `txmq bench tx TOPIC ...`
#[derive(Debug, Args)]
pub struct TxArgs {
    /// The topic to send to.
    pub topic: String,

    #[command(flatten)]
    pub load: LoadArgs,

    /// Share of local transactions that roll back.
    #[arg(
        long,
        env = "TXMQ_ROLLBACK_RATIO",
        default_value_t = 0.0,
        value_name = "R"
    )]
    pub rollback_ratio: f64,

    /// Share of local transactions that answer unknown (left to check-backs).
    #[arg(
        long,
        env = "TXMQ_UNKNOWN_RATIO",
        default_value_t = 0.0,
        value_name = "U"
    )]
    pub unknown_ratio: f64,

    /// Share of check-backs answered rollback.
    #[arg(
        long,
        env = "TXMQ_CHECK_ROLLBACK_RATIO",
        default_value_t = 0.0,
        value_name = "R2"
    )]
    pub check_rollback_ratio: f64,

    /// Share of check-backs answered unknown (checked again later).
    #[arg(
        long,
        env = "TXMQ_CHECK_UNKNOWN_RATIO",
        default_value_t = 0.0,
        value_name = "U2"
    )]
    pub check_unknown_ratio: f64,

    /// The producer group (default: a new one for this run).
    #[arg(long, env = "TXMQ_GROUP", value_parser = crate::args::parse_group)]
    pub group: Option<String>,

    /// How old a transaction must be before its first check-back (default:
    /// the broker's transaction timeout).
    #[arg(long, env = "TXMQ_FIRST_CHECK_DELAY", value_parser = parse_duration, value_name = "DURATION")]
    pub first_check_delay: Option<Duration>,

    /// After the last send, how long to wait for check-backs and commits
    /// still to be seen.
    #[arg(long, env = "TXMQ_GRACE", value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub grace: Duration,
}

/// The answer mix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    /// Local transactions rolled back.
    pub rollback: f64,
    /// Local transactions unknown.
    pub unknown: f64,
    /// Checks answered rollback.
    pub check_rollback: f64,
    /// Checks answered unknown.
    pub check_unknown: f64,
}

impl Ratios {
    fn from_args(args: &TxArgs) -> Result<Ratios> {
        let r = Ratios {
            rollback: args.rollback_ratio,
            unknown: args.unknown_ratio,
            check_rollback: args.check_rollback_ratio,
            check_unknown: args.check_unknown_ratio,
        };
        let share = |x: f64| (0.0..=1.0).contains(&x);
        if ![r.rollback, r.unknown, r.check_rollback, r.check_unknown]
            .into_iter()
            .all(share)
        {
            return Err(crate::exit::usage("ratios must be between 0 and 1"));
        }
        if r.rollback + r.unknown > 1.0 + 1e-9 {
            return Err(crate::exit::usage(
                "--rollback-ratio plus --unknown-ratio must not exceed 1",
            ));
        }
        if r.check_rollback + r.check_unknown > 1.0 + 1e-9 {
            return Err(crate::exit::usage(
                "--check-rollback-ratio plus --check-unknown-ratio must not exceed 1",
            ));
        }
        Ok(r)
    }

    /// The local transaction's result for message `key`.
    pub fn local(&self, key: u64) -> TransactionState {
        pick(unit(key, SALT_LOCAL), self.rollback, self.unknown)
    }

    /// The answer to check number `check` (from 1) of message `key`.
    pub fn check(&self, key: u64, check: u32) -> TransactionState {
        let salt = SALT_CHECK ^ u64::from(check).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        pick(unit(key, salt), self.check_rollback, self.check_unknown)
    }
}

/// Rollback below `rollback`, unknown below `rollback + unknown`, else commit.
fn pick(u: f64, rollback: f64, unknown: f64) -> TransactionState {
    if u < rollback {
        TransactionState::Rollback
    } else if u < rollback + unknown {
        TransactionState::Unknown
    } else {
        TransactionState::Commit
    }
}

/// A uniform number in [0, 1) from `key` and `salt` (SplitMix64).
fn unit(key: u64, salt: u64) -> f64 {
    let mut z = key ^ salt;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The message's index in the run: producer index and sequence number
/// (the same for the same flags in every run).
fn tx_key(h: &Header) -> u64 {
    u64::from(h.producer_index()) << 40 | (h.seq & 0xff_ffff_ffff)
}

/// What is known of one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
struct TxEntry {
    /// When the local transaction ran (the prepare was done), ns since epoch.
    prepared_ns: u64,
    /// Its intended send time.
    intended_ns: u64,
    /// The local transaction's result.
    local: Option<TransactionState>,
    /// Commit or rollback, once decided (locally or by a check).
    resolved: Option<TransactionState>,
    /// Check-backs received.
    checks: u32,
    /// Times a consumer saw the message.
    visible: u32,
}

/// What a check-back found.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CheckSeen {
    answer: TransactionState,
    /// Prepare to this check, when it is the first.
    first_after: Option<Duration>,
    /// The local result was already commit or rollback.
    unexpected: bool,
    /// A check already answered commit or rollback.
    duplicated: bool,
    /// No such transaction of this run.
    foreign: bool,
}

/// What a consumer's sight of a message found.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sighting {
    /// First sight: prepare to now.
    first_after: Option<Duration>,
    /// Seen before.
    duplicated: bool,
    /// Not committed (rolled back, or never resolved) or unknown.
    not_committed: bool,
    /// Its intended send time.
    intended_ns: u64,
}

/// Every transaction of the run, shared by the listeners, the producer
/// tasks and the consumer.
#[derive(Debug)]
struct Book {
    shards: Vec<Mutex<HashMap<u64, TxEntry>>>,
    ratios: Ratios,
    /// Transactions whose local transaction ran.
    executed: AtomicU64,
    /// ... that are committed or rolled back.
    resolved: AtomicU64,
    /// ... that are committed.
    committed: AtomicU64,
    /// Committed ones a consumer saw.
    seen_committed: AtomicU64,
}

impl Book {
    fn new(ratios: Ratios) -> Book {
        Book {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            ratios,
            executed: AtomicU64::new(0),
            resolved: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            seen_committed: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, TxEntry>> {
        let shard = &self.shards[(key % SHARDS as u64) as usize];
        // Nothing panics while holding it; a poisoned one is still consistent.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resolve(&self, e: &mut TxEntry, state: TransactionState) {
        if state != TransactionState::Unknown && e.resolved.is_none() {
            e.resolved = Some(state);
            self.resolved.fetch_add(1, Ordering::Relaxed);
            if state == TransactionState::Commit {
                self.committed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The local transaction of `key` runs now: decides its result.
    fn execute(&self, key: u64, intended_ns: u64, now_ns: u64) -> TransactionState {
        let local = self.ratios.local(key);
        let mut shard = self.shard(key);
        let e = shard.entry(key).or_default();
        if e.local.is_none() {
            self.executed.fetch_add(1, Ordering::Relaxed);
            e.prepared_ns = now_ns;
            e.intended_ns = intended_ns;
            e.local = Some(local);
            self.resolve(e, local);
        }
        local
    }

    /// When the local transaction of `key` ran.
    fn prepared_ns(&self, key: u64) -> Option<u64> {
        self.shard(key).get(&key).map(|e| e.prepared_ns)
    }

    /// A check-back of `key` arrived now.
    fn check(&self, key: u64, now_ns: u64) -> CheckSeen {
        let mut shard = self.shard(key);
        let mut seen = CheckSeen {
            answer: TransactionState::Unknown,
            first_after: None,
            unexpected: false,
            duplicated: false,
            foreign: false,
        };
        let Some(e) = shard.get_mut(&key).filter(|e| e.local.is_some()) else {
            seen.foreign = true;
            return seen;
        };
        e.checks += 1;
        if e.checks == 1 {
            seen.first_after = Some(elapsed_ns(e.prepared_ns, now_ns));
        }
        match (e.local, e.resolved) {
            (Some(TransactionState::Unknown), None) => {
                seen.answer = self.ratios.check(key, e.checks);
                self.resolve(e, seen.answer);
            }
            (Some(TransactionState::Unknown), Some(resolved)) => {
                seen.duplicated = true;
                seen.answer = resolved;
            }
            (local, _) => {
                seen.unexpected = true;
                seen.answer = local.unwrap_or(TransactionState::Unknown);
            }
        }
        seen
    }

    /// A consumer saw `key`'s message now.
    fn seen(&self, key: u64, now_ns: u64) -> Option<Sighting> {
        let mut shard = self.shard(key);
        let e = shard.get_mut(&key)?;
        e.visible += 1;
        let committed = e.resolved == Some(TransactionState::Commit);
        if e.visible == 1 && committed {
            self.seen_committed.fetch_add(1, Ordering::Relaxed);
        }
        Some(Sighting {
            first_after: (e.visible == 1).then(|| elapsed_ns(e.prepared_ns, now_ns)),
            duplicated: e.visible > 1,
            not_committed: !committed,
            intended_ns: e.intended_ns,
        })
    }

    /// Every transaction is resolved and every commit seen.
    fn settled(&self) -> bool {
        let executed = self.executed.load(Ordering::Relaxed);
        self.resolved.load(Ordering::Relaxed) >= executed
            && self.seen_committed.load(Ordering::Relaxed) >= self.committed.load(Ordering::Relaxed)
    }

    /// Totals over every transaction.
    fn totals(&self) -> BookTotals {
        let mut t = BookTotals::default();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for e in shard.values().filter(|e| e.local.is_some()) {
                t.transactions += 1;
                match e.local {
                    Some(TransactionState::Commit) => t.local_commit += 1,
                    Some(TransactionState::Rollback) => t.local_rollback += 1,
                    _ => t.local_unknown += 1,
                }
                let by_check = e.local == Some(TransactionState::Unknown);
                match e.resolved {
                    Some(TransactionState::Commit) => {
                        t.committed += 1;
                        t.committed_by_check += u64::from(by_check);
                        t.lost += u64::from(e.visible == 0);
                    }
                    Some(_) => {
                        t.rolled_back += 1;
                        t.rolled_back_by_check += u64::from(by_check);
                    }
                    None => t.unresolved += 1,
                }
                if e.checks > 0 {
                    t.checked += 1;
                    t.checks += u64::from(e.checks);
                    t.max_checks = t.max_checks.max(e.checks);
                }
            }
        }
        t
    }
}

/// [`Book::totals`].
#[derive(Debug, Default, Clone, PartialEq)]
struct BookTotals {
    transactions: u64,
    local_commit: u64,
    local_rollback: u64,
    local_unknown: u64,
    committed: u64,
    rolled_back: u64,
    committed_by_check: u64,
    rolled_back_by_check: u64,
    unresolved: u64,
    lost: u64,
    checked: u64,
    checks: u64,
    max_checks: u32,
}

/// Counters of the check-backs every producer answered.
#[derive(Debug, Default)]
struct CheckCounters {
    checks: AtomicU64,
    unexpected: AtomicU64,
    duplicated: AtomicU64,
    foreign: AtomicU64,
}

/// The listener every producer of the run shares.
struct BenchListener {
    run_id: u64,
    clock: Clock,
    book: Arc<Book>,
    counters: CheckCounters,
    /// Prepare to first check (checks are rare: one lock is fine).
    check_latency: Mutex<Latencies>,
}

impl BenchListener {
    fn header(&self, body: &[u8]) -> Option<Header> {
        Header::decode(body).filter(|h| h.run() == self.run_id)
    }
}

impl TransactionListener for BenchListener {
    async fn execute(&self, msg: &Message, _ctx: &TxContext) -> Result<TransactionState, BoxError> {
        let now_ns = self.clock.now_ns();
        let h = self
            .header(msg.body())
            .ok_or("not a message of this benchmark run")?;
        Ok(self.book.execute(tx_key(&h), h.timestamp_ns, now_ns))
    }

    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        let now_ns = self.clock.now_ns();
        self.counters.checks.fetch_add(1, Ordering::Relaxed);
        let seen = match self.header(req.message().body()) {
            Some(h) => self.book.check(tx_key(&h), now_ns),
            None => CheckSeen {
                answer: TransactionState::Unknown,
                first_after: None,
                unexpected: false,
                duplicated: false,
                foreign: true,
            },
        };
        let bump = |c: &AtomicU64, yes: bool| {
            if yes {
                c.fetch_add(1, Ordering::Relaxed);
            }
        };
        bump(&self.counters.unexpected, seen.unexpected);
        bump(&self.counters.duplicated, seen.duplicated);
        bump(&self.counters.foreign, seen.foreign);
        if let Some(after) = seen.first_after {
            self.check_latency
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(after);
        }
        Ok(seen.answer)
    }
}

/// What one producer task measured.
#[derive(Debug, Clone, Default)]
struct TxStats {
    /// The whole transactional send, from the intended time.
    latency: Latencies,
    /// Send start to the local transaction starting.
    prepare: Latencies,
    /// Local commit to the broker's answer.
    commit: Latencies,
    transactions: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
    /// Transactions of the open-loop schedule never sent (the deadline
    /// came first).
    unsent: u64,
}

impl TxStats {
    fn merge(&mut self, o: &TxStats) {
        self.latency.merge(&o.latency);
        self.prepare.merge(&o.prepare);
        self.commit.merge(&o.commit);
        self.transactions += o.transactions;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.unsent += o.unsent;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
        self.last_done = match (self.last_done, o.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    fn measured_secs(&self, timing: &Timing) -> f64 {
        self.last_done
            .map_or(0.0, |t| secs_between(timing.measure_from, t))
    }
}

/// Runs the transaction benchmark and prints its report.
///
/// # Errors
/// When the arguments cannot work, the cluster cannot be reached, or no
/// transaction could be sent.
pub async fn run(global: &GlobalArgs, args: TxArgs) -> Result<()> {
    args.load.validate()?;
    let ratios = Ratios::from_args(&args)?;
    ensure_topic(global, &args.topic, args.load.queues).await?;
    let run_id = new_run_id();
    let clock = Clock::new();
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("txmq-bench-tx-{run_id:012x}"));
    let book = Arc::new(Book::new(ratios));
    let listener = Arc::new(BenchListener {
        run_id,
        clock,
        book: book.clone(),
        counters: CheckCounters::default(),
        check_latency: Mutex::new(Latencies::new()),
    });

    let consumer = PullConsumer::builder()
        .config(global.client_config()?)
        .group(format!("{group}-visible"))
        .topic(args.topic.clone())
        .from(ConsumeFrom::Last)
        .build()
        .await?;
    let producers = super::shared_clients(&args.load, || async {
        TransactionProducer::builder()
            .config(global.client_config()?)
            .group(group.clone())
            .listener_arc(listener.clone())
            .first_check_delay(args.first_check_delay)
            .start()
            .await
            .context("starting a transaction producer")
    })
    .await?;

    let counters = Arc::new(Counters::default());
    let (_interrupt_tx, interrupt) = stop_on_interrupt();
    let (consumer_stop_tx, consumer_stop) = watch::channel(false);
    let timing = args.load.timing(Instant::now() + Duration::from_millis(20));
    let measure_from_ns = clock.ns(timing.measure_from);
    let progress = Progress::start(
        show_progress(global),
        counters.clone(),
        timing.extent(1),
        timing.warmup_until(),
    );
    let consumer_task = tokio::spawn(watch_visible(
        consumer,
        run_id,
        clock,
        measure_from_ns,
        book.clone(),
        counters.clone(),
        consumer_stop,
    ));
    let padding = Bytes::from(vec![b'x'; args.load.size]);
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let tasks: Vec<_> = producers
        .iter()
        .enumerate()
        .map(|(i, producer)| {
            tokio::spawn(transact(
                producer.clone(),
                producer_id(run_id, i as u32),
                args.load.plan(&timing, i as u32, 1),
                topic.clone(),
                padding.clone(),
                clock,
                book.clone(),
                counters.clone(),
                interrupt.clone(),
            ))
        })
        .collect();
    let mut stats = TxStats::default();
    for t in tasks {
        stats.merge(&t.await.context("a producer task failed")?);
    }

    // The producers stay to answer check-backs until all is settled.
    let grace_until = Instant::now() + args.grace;
    let mut interrupt_watch = interrupt.clone();
    while !book.settled() && Instant::now() < grace_until && !*interrupt_watch.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            Ok(()) = interrupt_watch.changed() => {}
        }
    }
    let _ = consumer_stop_tx.send(true);
    let visibility = consumer_task.await.context("the consumer task failed")?;
    for p in &producers {
        p.close().await.ok();
    }
    progress.finish();

    let totals = book.totals();
    let check_latency = listener
        .check_latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .summary();
    let c = &listener.counters;
    let secs = stats.measured_secs(&timing);
    let mut report = super::new_report(global, "tx");
    report
        .field("topic", args.topic.as_str())
        .field("group", group.as_str())
        .field("producers", args.load.producers)
        .field("in_flight", args.load.in_flight)
        .field(
            "message_size",
            args.load.size.max(super::body::HEADER_LEN) as u64,
        )
        .field("target_rate", args.load.target_rate())
        .field("rollback_ratio", ratios.rollback)
        .field("unknown_ratio", ratios.unknown)
        .field("check_rollback_ratio", ratios.check_rollback)
        .field("check_unknown_ratio", ratios.check_unknown)
        .field(
            "warmup_s",
            round(secs_between(timing.start, timing.measure_from), 3),
        )
        .field("duration_s", round(secs, 3))
        .field("messages", stats.transactions)
        .rates("publish", stats.transactions, stats.bytes, secs)
        .field("transactions", totals.transactions)
        .field("local_commit", totals.local_commit)
        .field("local_rollback", totals.local_rollback)
        .field("local_unknown", totals.local_unknown)
        .field("committed", totals.committed)
        .field("rolled_back", totals.rolled_back)
        .field("committed_by_check", totals.committed_by_check)
        .field("rolled_back_by_check", totals.rolled_back_by_check)
        .field("unresolved", totals.unresolved)
        .field("errors", stats.errors)
        .field("first_error", stats.first_error.clone())
        .field("unsent", stats.unsent)
        .field("checks", c.checks.load(Ordering::Relaxed))
        .field("checked_transactions", totals.checked)
        .field(
            "checks_per_tx",
            if totals.checked > 0 {
                round(totals.checks as f64 / totals.checked as f64, 3)
            } else {
                0.0
            },
        )
        .field("max_checks_per_tx", totals.max_checks)
        .field("unexpected_checks", c.unexpected.load(Ordering::Relaxed))
        .field("duplicated_checks", c.duplicated.load(Ordering::Relaxed))
        .field("foreign_checks", c.foreign.load(Ordering::Relaxed))
        .field("visible", visibility.visible)
        .field("lost", totals.lost)
        .field("duplicated", visibility.duplicated)
        .field("visible_not_committed", visibility.not_committed)
        .field("grace_s", round(args.grace.as_secs_f64(), 3))
        .latency("latency_us", stats.latency.summary())
        .latency("prepare_latency_us", stats.prepare.summary())
        .latency("commit_latency_us", stats.commit.summary())
        .latency(
            "prepare_to_visible_us",
            visibility.prepare_to_visible.summary(),
        )
        .latency("check_latency_us", check_latency);
    report.print(&Printer::stdout(global.output))?;
    if stats.transactions == 0 && stats.errors > 0 {
        bail!(
            "no transaction was sent: {}",
            stats.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

/// One producer's loop of transactional sends.
#[allow(clippy::too_many_arguments)]
async fn transact(
    producer: TransactionProducer<BenchListener>,
    id: u64,
    plan: Plan,
    topic: Arc<str>,
    padding: Bytes,
    clock: Clock,
    book: Arc<Book>,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> TxStats {
    let mut stats = TxStats::default();
    let size = padding.len();
    let p = &producer;
    let unsent = drive(
        &plan,
        stop,
        |op| {
            let header = Header {
                producer: id,
                seq: op.index,
                timestamp_ns: clock.ns(op.intended),
            };
            let message = Message::new(&*topic, header.encode(size, &padding));
            async move {
                let sent_at = Instant::now();
                // An end refused or lost counts as an error, as it did
                // when the send returned it as one.
                let result = p
                    .send_in_transaction(message)
                    .await
                    .and_then(|o| match o.end {
                        TxEnd::Refused(e) | TxEnd::Lost(e) => Err(e),
                        _ => Ok(o),
                    });
                (op, header, sent_at, Instant::now(), result)
            }
        },
        |(op, header, sent_at, done_at, result)| match result {
            Ok(outcome) => {
                counters.add_sent(1);
                if !op.measured {
                    return;
                }
                stats.transactions += 1;
                stats.bytes += size as u64;
                stats
                    .latency
                    .record(done_at.saturating_duration_since(op.intended));
                if let Some(prepared_ns) = book.prepared_ns(tx_key(&header)) {
                    stats
                        .prepare
                        .record(elapsed_ns(clock.ns(sent_at), prepared_ns));
                    if outcome.state == TransactionState::Commit {
                        stats
                            .commit
                            .record(elapsed_ns(prepared_ns, clock.ns(done_at)));
                    }
                }
                stats.last_done = Some(stats.last_done.map_or(done_at, |t| t.max(done_at)));
            }
            Err(e) => {
                counters.add_errors(1);
                stats.errors += 1;
                if stats.first_error.is_none() {
                    let text = error_text(&anyhow::Error::from(e));
                    tracing::warn!(error = %text, "transactional send failed");
                    stats.first_error = Some(text);
                }
            }
        },
    )
    .await;
    stats.unsent = unsent;
    stats
}

/// What the consumer saw.
#[derive(Debug, Default)]
struct Visibility {
    visible: u64,
    duplicated: u64,
    not_committed: u64,
    prepare_to_visible: Latencies,
}

/// Reads the topic until `stop`, noting when each message became visible.
async fn watch_visible(
    mut consumer: PullConsumer,
    run_id: u64,
    clock: Clock,
    measure_from_ns: u64,
    book: Arc<Book>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Visibility {
    let mut v = Visibility::default();
    loop {
        if *stop.borrow() {
            break;
        }
        let messages = tokio::select! {
            r = consumer.poll_at_most(1024, POLL_SLICE) => r.unwrap_or_default(),
            Ok(()) = stop.changed() => break,
        };
        let now_ns = clock.now_ns();
        let mut ours = 0;
        for m in &messages {
            let Some(h) = Header::decode(m.body()).filter(|h| h.run() == run_id) else {
                continue;
            };
            ours += 1;
            let Some(s) = book.seen(tx_key(&h), now_ns) else {
                // Visible before its local transaction ran: never committed.
                v.not_committed += 1;
                continue;
            };
            v.visible += u64::from(!s.duplicated);
            v.duplicated += u64::from(s.duplicated);
            v.not_committed += u64::from(s.not_committed);
            if let Some(after) = s.first_after.filter(|_| s.intended_ns >= measure_from_ns) {
                v.prepare_to_visible.record(after);
            }
        }
        counters.add_received(ours);
    }
    drop(consumer);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratios(rollback: f64, unknown: f64, check_rollback: f64, check_unknown: f64) -> Ratios {
        Ratios {
            rollback,
            unknown,
            check_rollback,
            check_unknown,
        }
    }

    #[test]
    fn local_results_follow_the_ratios_deterministically() {
        let r = ratios(0.2, 0.3, 0.0, 0.0);
        let n = 100_000u64;
        let mut counts = [0u64; 3];
        for key in 0..n {
            let state = r.local(key);
            assert_eq!(state, r.local(key), "same key, same answer");
            counts[match state {
                TransactionState::Commit => 0,
                TransactionState::Rollback => 1,
                TransactionState::Unknown => 2,
            }] += 1;
        }
        let share = |c: u64| c as f64 / n as f64;
        assert!((share(counts[0]) - 0.5).abs() < 0.01, "{counts:?}");
        assert!((share(counts[1]) - 0.2).abs() < 0.01, "{counts:?}");
        assert!((share(counts[2]) - 0.3).abs() < 0.01, "{counts:?}");
        assert!((0..1000).all(|k| ratios(0.0, 0.0, 0.0, 0.0).local(k) == TransactionState::Commit));
        assert!(
            (0..1000).all(|k| ratios(1.0, 0.0, 0.0, 0.0).local(k) == TransactionState::Rollback)
        );
    }

    #[test]
    fn check_answers_vary_per_check_and_follow_their_own_ratios() {
        let r = ratios(0.0, 1.0, 0.25, 0.5);
        let n = 50_000u64;
        let unknown = (0..n)
            .filter(|k| r.check(*k, 1) == TransactionState::Unknown)
            .count() as f64;
        assert!((unknown / n as f64 - 0.5).abs() < 0.01);
        // An unknown answer is not stuck: later checks decide differently.
        let key = (0..n)
            .find(|k| r.check(*k, 1) == TransactionState::Unknown)
            .unwrap_or(0);
        assert!((2..50).any(|c| r.check(key, c) != TransactionState::Unknown));
        // Independent of the local choice.
        let both = (0..n)
            .filter(|k| {
                ratios(0.5, 0.0, 0.5, 0.0).local(*k) == TransactionState::Rollback
                    && ratios(0.5, 0.0, 0.5, 0.0).check(*k, 1) == TransactionState::Rollback
            })
            .count() as f64;
        assert!((both / n as f64 - 0.25).abs() < 0.01);
    }

    #[test]
    fn keys_are_producer_index_and_sequence() {
        let h = |p: u32, seq: u64| Header {
            producer: producer_id(0xabc, p),
            seq,
            timestamp_ns: 0,
        };
        assert_eq!(tx_key(&h(0, 5)), 5);
        assert_eq!(tx_key(&h(3, 5)), (3 << 40) | 5);
        assert_ne!(tx_key(&h(1, 0)), tx_key(&h(0, 1)));
        // The run id does not matter: the same flags give the same mix.
        let other = Header {
            producer: producer_id(0xdef, 3),
            seq: 5,
            timestamp_ns: 9,
        };
        assert_eq!(tx_key(&other), tx_key(&h(3, 5)));
    }

    #[test]
    fn ratios_are_checked() {
        let args = |r: &[&str]| {
            let mut all = vec!["tx", "t"];
            all.extend_from_slice(r);
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                tx: TxArgs,
            }
            use clap::Parser;
            match Cli::try_parse_from(all) {
                Ok(c) => Ratios::from_args(&c.tx),
                Err(e) => panic!("parses: {e}"),
            }
        };
        assert!(args(&["--rollback-ratio", "0.5", "--unknown-ratio", "0.5"]).is_ok());
        assert!(args(&["--rollback-ratio", "0.6", "--unknown-ratio", "0.5"]).is_err());
        assert!(args(&[
            "--check-rollback-ratio",
            "0.7",
            "--check-unknown-ratio",
            "0.4"
        ])
        .is_err());
        assert!(args(&["--unknown-ratio", "1.5"]).is_err());
        assert!(args(&["--rollback-ratio=-0.1"]).is_err());
    }

    /// A key whose local result under `r` is `want`.
    fn key_with(r: &Ratios, want: TransactionState) -> u64 {
        (0..10_000).find(|k| r.local(*k) == want).unwrap_or(0)
    }

    #[test]
    fn checks_of_decided_transactions_are_unexpected() {
        let r = ratios(0.5, 0.0, 0.0, 0.0);
        let book = Book::new(r);
        let key = key_with(&r, TransactionState::Commit);
        assert_eq!(book.execute(key, 1_000, 2_000), TransactionState::Commit);
        let seen = book.check(key, 5_002_000);
        assert!(seen.unexpected && !seen.duplicated && !seen.foreign);
        assert_eq!(
            seen.answer,
            TransactionState::Commit,
            "the truth is answered"
        );
        assert_eq!(seen.first_after, Some(Duration::from_millis(5)));
        assert!(book.check(key, 6_000_000).first_after.is_none());
        let rb = key_with(&r, TransactionState::Rollback);
        book.execute(rb, 0, 0);
        assert_eq!(book.check(rb, 1).answer, TransactionState::Rollback);
        let t = book.totals();
        assert_eq!(
            (t.transactions, t.committed, t.rolled_back, t.unresolved),
            (2, 1, 1, 0)
        );
        assert_eq!((t.checked, t.checks, t.max_checks), (2, 3, 2));
        assert!(book.check(424_242, 1).foreign);
    }

    #[test]
    fn unknown_transactions_are_resolved_by_checks_and_rechecks_are_duplicates() {
        // Local: always unknown; checks: always commit.
        let book = Book::new(ratios(0.0, 1.0, 0.0, 0.0));
        book.execute(7, 0, 100);
        assert!(!book.settled());
        let first = book.check(7, 200);
        assert_eq!(first.answer, TransactionState::Commit);
        assert!(!first.unexpected && !first.duplicated);
        assert!(!book.settled(), "committed but not seen yet");
        let again = book.check(7, 300);
        assert!(again.duplicated);
        assert_eq!(again.answer, TransactionState::Commit);
        let s = book.seen(7, 1_100);
        assert_eq!(
            s,
            Some(Sighting {
                first_after: Some(Duration::from_nanos(1_000)),
                duplicated: false,
                not_committed: false,
                intended_ns: 0,
            })
        );
        assert!(book.settled());
        let t = book.totals();
        assert_eq!((t.committed_by_check, t.lost, t.checks), (1, 0, 2));
        assert!(book.seen(7, 1_200).is_some_and(|s| s.duplicated));
    }

    #[test]
    fn unanswered_and_invisible_transactions_are_counted() {
        // Checks always answer unknown: never resolved.
        let book = Book::new(ratios(0.0, 1.0, 0.0, 1.0));
        book.execute(1, 0, 0);
        assert_eq!(book.check(1, 1).answer, TransactionState::Unknown);
        assert!(!book.settled());
        // A committed one never seen is lost; a rolled-back one seen is wrong.
        let committing = Book::new(ratios(0.0, 0.0, 0.0, 0.0));
        committing.execute(2, 0, 0);
        let t = committing.totals();
        assert_eq!((t.committed, t.lost), (1, 1));
        let rolling = Book::new(ratios(1.0, 0.0, 0.0, 0.0));
        rolling.execute(3, 0, 0);
        assert!(rolling.seen(3, 1).is_some_and(|s| s.not_committed));
        assert_eq!(book.totals().unresolved, 1);
    }
}
