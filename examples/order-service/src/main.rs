//! `order-service`: the command line of the txmq order-service example.
//!
//! `place` places orders (crashing between prepare and commit on request),
//! `serve-checks` answers the broker's check-backs for the producer group,
//! `consume` applies committed orders exactly once, `report` compares the
//! two databases. Every flag is also an environment variable
//! (`ORDER_SERVICE_...`, and `TXMQ_NAMESERVER`). See README.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use order_service::report::money;
use order_service::{
    consume_until_idle, place_order, AfterLocalCommit, AppliedDb, CheckAnswer, Handled, OrderDb,
    OrderListener, Report, CRASH_EXIT_CODE,
};
use txmq::config::parse_duration;
use txmq::{ConsumeFrom, PullConsumer, ReceivedMessage, TransactionProducer, TxEnd};

const DEFAULT_DB: &str = "order-service-data/orders.db";
const DEFAULT_CONSUMER_DB: &str = "order-service-data/applied.db";

/// The txmq order-service example: orders and their messages commit together.
#[derive(Debug, Parser)]
#[command(name = "order-service", version)]
struct Cli {
    /// Nameserver address(es), comma-separated.
    #[arg(
        long,
        global = true,
        env = "TXMQ_NAMESERVER",
        default_value = "127.0.0.1:9876"
    )]
    nameserver: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place orders: each one's message is prepared, the order and its
    /// tx_log row are written in one SQLite transaction, and the message is
    /// committed.
    Place(PlaceArgs),
    /// Answer the broker's check-backs for the producer group from tx_log,
    /// printing each answer; places nothing.
    ServeChecks(ServeChecksArgs),
    /// Apply committed orders to the consumer's own database, skipping
    /// messages applied before; stops after --idle-timeout without messages.
    Consume(ConsumeArgs),
    /// Compare the orders placed with the orders applied; exits 1 unless
    /// every placed order was applied exactly once.
    Report(ReportArgs),
}

/// The order service's database.
#[derive(Debug, Args)]
struct OrderDbArg {
    /// The order service's SQLite database (orders, tx_log).
    #[arg(long, env = "ORDER_SERVICE_DB", default_value = DEFAULT_DB)]
    db: PathBuf,
}

/// The consumer's database.
#[derive(Debug, Args)]
struct ConsumerDbArg {
    /// The consumer's SQLite database (applied_orders, applied_message_ids), a
    /// separate file.
    #[arg(long, env = "ORDER_SERVICE_CONSUMER_DB", default_value = DEFAULT_CONSUMER_DB)]
    consumer_db: PathBuf,
}

/// Settings of a member of the producer group.
#[derive(Debug, Args)]
struct ProducerArgs {
    #[command(flatten)]
    db: OrderDbArg,

    /// The producer group; the broker checks back on any live member.
    #[arg(
        long,
        env = "ORDER_SERVICE_PRODUCER_GROUP",
        default_value = "order-producers"
    )]
    group: String,

    /// A check-back for a message with no tx_log row answers Unknown while
    /// the message is younger than this, then writes a rollback fence and
    /// answers Rollback.
    #[arg(long, env = "ORDER_SERVICE_ROLLBACK_AFTER", default_value = "60s", value_parser = parse_duration)]
    rollback_after: Duration,
}

#[derive(Debug, Args)]
struct PlaceArgs {
    #[command(flatten)]
    producer: ProducerArgs,

    /// How many orders to place.
    #[arg(long, env = "ORDER_SERVICE_ORDERS", default_value_t = 3)]
    orders: u64,

    /// The topic the orders are announced on.
    #[arg(long, env = "ORDER_SERVICE_TOPIC", default_value = "orders")]
    topic: String,

    /// Crash on the last order: once its order and tx_log row are committed
    /// in SQLite, exit (status 3) before telling the broker to commit, so
    /// the message stays prepared until a check-back.
    #[arg(long, env = "ORDER_SERVICE_CRASH_AFTER_PREPARE")]
    crash_after_prepare: bool,
}

#[derive(Debug, Args)]
struct ServeChecksArgs {
    #[command(flatten)]
    producer: ProducerArgs,

    /// Stop after this long [default: on Ctrl-C].
    #[arg(long, env = "ORDER_SERVICE_DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
}

#[derive(Debug, Args)]
struct ConsumeArgs {
    #[command(flatten)]
    db: ConsumerDbArg,

    /// The consumer group; its offsets are stored on the brokers.
    #[arg(
        long,
        env = "ORDER_SERVICE_CONSUMER_GROUP",
        default_value = "order-consumers"
    )]
    group: String,

    /// The topic to read.
    #[arg(long, env = "ORDER_SERVICE_TOPIC", default_value = "orders")]
    topic: String,

    /// Stop once no message arrived for this long; `0s`: run until Ctrl-C.
    #[arg(long, env = "ORDER_SERVICE_IDLE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    idle_timeout: Duration,
}

#[derive(Debug, Args)]
struct ReportArgs {
    #[command(flatten)]
    db: OrderDbArg,

    #[command(flatten)]
    consumer_db: ConsumerDbArg,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Place(args) => place(&cli.nameserver, args).await,
        Command::ServeChecks(args) => serve_checks(&cli.nameserver, args).await,
        Command::Consume(args) => consume(&cli.nameserver, args).await,
        Command::Report(args) => report(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn start_producer(
    nameserver: &str,
    args: &ProducerArgs,
    listener: OrderListener,
) -> Result<TransactionProducer<OrderListener>> {
    TransactionProducer::builder()
        .nameserver(nameserver)
        .group(&args.group)
        .listener(listener.rollback_after(args.rollback_after))
        .start()
        .await
        .with_context(|| format!("cannot start a transaction producer via {nameserver}"))
}

fn open_order_db(path: &std::path::Path) -> Result<OrderDb> {
    OrderDb::open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn open_applied_db(path: &std::path::Path) -> Result<AppliedDb> {
    AppliedDb::open(path).with_context(|| format!("cannot open {}", path.display()))
}

fn print_check(a: &CheckAnswer) {
    println!(
        "check tx {} on {} (order {}, msg_id={}, earlier checks {}): {} -> {}",
        a.tx_id,
        a.broker_name,
        a.order_id.as_deref().unwrap_or("?"),
        a.msg_id,
        a.checks,
        a.reason,
        a.state.name().to_uppercase()
    );
}

async fn place(nameserver: &str, args: PlaceArgs) -> Result<std::process::ExitCode> {
    let db = open_order_db(&args.producer.db.db)?;
    // This process is a member of the group too, so it may be asked about
    // earlier orders while it runs; it answers like serve-checks.
    let listener = OrderListener::new(db.clone()).on_check(print_check);
    let producer = start_producer(nameserver, &args.producer, listener).await?;
    let orders = db.next_orders(args.orders).await?;
    let last = orders.len().saturating_sub(1);
    for (i, order) in orders.iter().enumerate() {
        if args.crash_after_prepare && i == last {
            producer
                .listener()
                .set_after_local_commit(AfterLocalCommit::Exit(CRASH_EXIT_CODE));
        }
        let outcome = place_order(&producer, &args.topic, order)
            .await
            .with_context(|| format!("placing {}", order.order_id))?;
        let ended = match &outcome.end {
            TxEnd::Ended(e) => e.state.name().to_string(),
            TxEnd::Refused(e) => format!("refused ({})", txmq::error::chain(e)),
            TxEnd::Lost(e) => format!("end lost, it checks back ({})", txmq::error::chain(e)),
            _ => "not ended".to_string(),
        };
        println!(
            "placed {} ({}, {}): tx {} on {}, msg_id={}, local transaction -> {}, broker: {}",
            order.order_id,
            order.item,
            money(order.amount_cents),
            outcome.tx_id,
            outcome.broker_name,
            outcome.msg_id,
            outcome.state.name().to_uppercase(),
            ended
        );
    }
    producer.close().await.ok();
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve_checks(nameserver: &str, args: ServeChecksArgs) -> Result<std::process::ExitCode> {
    let db = open_order_db(&args.producer.db.db)?;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = answered.clone();
    let listener = OrderListener::new(db).on_check(move |a| {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        print_check(a);
    });
    let producer = start_producer(nameserver, &args.producer, listener).await?;
    println!(
        "serving check-backs for group {} from {} (connected to {}){}",
        producer.group(),
        args.producer.db.db.display(),
        producer.connected_brokers().join(", "),
        match args.duration {
            Some(d) => format!(" for {}", humantime::format_duration(d)),
            None => "; Ctrl-C to stop".to_string(),
        }
    );
    match args.duration {
        Some(d) => {
            tokio::select! {
                () = tokio::time::sleep(d) => {}
                () = interrupted() => {}
            }
        }
        None => interrupted().await,
    }
    producer.close().await.ok();
    let n = answered.load(std::sync::atomic::Ordering::Relaxed);
    println!("answered {n} check-back{}", if n == 1 { "" } else { "s" });
    Ok(std::process::ExitCode::SUCCESS)
}

async fn consume(nameserver: &str, args: ConsumeArgs) -> Result<std::process::ExitCode> {
    let db = open_applied_db(&args.db.consumer_db)?;
    let mut consumer = PullConsumer::builder()
        .nameserver(nameserver)
        .group(&args.group)
        .topic(&args.topic)
        .from(ConsumeFrom::First)
        .build()
        .await
        .with_context(|| format!("cannot start a consumer via {nameserver}"))?;
    let idle = Some(args.idle_timeout).filter(|d| !d.is_zero());
    let stats = consume_until_idle(&mut consumer, &db, idle, interrupted(), print_handled).await;
    // Commit what was applied even when applying the last batch failed.
    let shut = consumer.shutdown().await;
    let stats = stats?;
    shut.context("cannot commit the group's offsets")?;
    println!(
        "delivered {}: applied {}, skipped {} already applied, {} not orders",
        stats.delivered(),
        stats.applied,
        stats.skipped,
        stats.invalid
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_handled(m: &ReceivedMessage, handled: &Handled) {
    let at = format!(
        "msg_id={} q={} offset={}",
        m.msg_id(),
        m.queue(),
        m.queue_offset()
    );
    match handled {
        Handled::Applied(o) => println!(
            "applied {} ({}, {}) {at}",
            o.order_id,
            o.item,
            money(o.amount_cents)
        ),
        Handled::Skipped(o) => println!("skipped {} {at}: message applied before", o.order_id),
        Handled::SkippedOrder(o) => println!(
            "skipped {} {at}: order applied before under another message",
            o.order_id
        ),
        Handled::NotAnOrder(e) => println!("ignored {at}: not an order ({e})"),
    }
}

async fn report(args: ReportArgs) -> Result<std::process::ExitCode> {
    let orders = open_order_db(&args.db.db)?;
    let applied = open_applied_db(&args.consumer_db.consumer_db)?;
    let report = Report::build(&orders, &applied).await?;
    println!("{report}");
    Ok(if report.exactly_once() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Completes on Ctrl-C or (on Unix) SIGTERM; never if neither can be watched.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    ctrl_c().await;
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
