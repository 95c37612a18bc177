//! `txmq tx send|listen|list|resolve|show|recheck`: transactional
//! messages from the command line.
//!
//! `send` prepares one message, takes `--local` as the local transaction's
//! result, ends the transaction accordingly and then stays for `--linger`,
//! answering check-backs with `--check` (or not at all without it, so the
//! broker's checks time out). `listen` only answers check-backs, as a
//! member of a producer group that sends nothing. `list` shows pending and
//! parked transactions with each broker's counters (filtered, it exits 1
//! when something matches, for cron and alerting); `resolve` commits or
//! rolls one back by hand, as an operator; `show` prints one transaction's
//! half messages, state and check history (or how it ended); `recheck`
//! un-parks one and has the broker check it back now.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};
use txmq::{
    Admin, BoxError, CheckRequest, Ended, Message, MsgId, SendStatus, TransactionList,
    TransactionListener, TransactionProducer, TransactionState, TxAction, TxContext, TxDetail,
    TxEnd, TxInfo, TxOutcome, TxState,
};

use crate::args::{parse_duration, GlobalArgs};
use crate::exit;
use crate::output::{time_text, OutputFormat, Printer};
use crate::signal::interrupted;

/// `txmq tx ...`
#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// Send a message in a transaction: prepare it, take --local as the
    /// local transaction's result, commit or roll back accordingly (nothing
    /// for unknown), then answer check-backs with --check for --linger.
    Send(TxSendArgs),
    /// Answer check-backs as a member of a producer group, sending nothing.
    Listen(TxListenArgs),
    /// List pending and parked transactions, with each broker's counters
    /// (each broker lists its oldest 1000 that match; a note says when
    /// there are more). With a filter (--state, --group, --older-than) it
    /// lists only the matching ones and exits 1 when any match, 0 when none
    /// do, 3 when none do where brokers answered and some did not.
    List {
        /// Only this broker (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
        /// Only transactions in this state: pending (prepared, being
        /// checked back) or parked (waiting for an operator).
        #[arg(long, value_enum)]
        state: Option<ListState>,
        /// Only transactions of this producer group.
        #[arg(long, value_name = "GROUP", value_parser = crate::args::parse_group)]
        group: Option<String>,
        /// Only transactions prepared longer ago than this (e.g. `30s`, `5m`).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        older_than: Option<Duration>,
    },
    /// Show one transaction: its half messages (bodies and properties),
    /// producer group, age, state and every check-back with its time and
    /// answer or error; for an ended one, how it ended.
    Show {
        /// The transaction id.
        tx_id: u64,
        /// Only this broker (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
    },
    /// Un-park a parked transaction and have the broker check it back now,
    /// with a fresh allowance of checks (once its producer is fixed); a
    /// pending one is checked now.
    Recheck {
        /// The transaction id.
        tx_id: u64,
        /// The broker holding it (a broker name, or its address as `txmq cluster` lists it).
        #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
        broker: Option<String>,
    },
    /// Commit or roll back a transaction by hand, as an operator (also a
    /// parked one).
    Resolve(TxResolveArgs),
}

/// The state `tx list --state` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListState {
    /// Prepared, not parked: the broker checks it back.
    Pending,
    /// Parked after the maximum number of checks.
    Parked,
}

/// `tx list` filters; all `None`: no filter.
#[derive(Debug, Clone, Default)]
struct ListFilter {
    state: Option<ListState>,
    group: Option<String>,
    older_than: Option<Duration>,
}

impl ListFilter {
    fn is_set(&self) -> bool {
        self.state.is_some() || self.group.is_some() || self.older_than.is_some()
    }

    /// The request asking a broker for what the filters keep.
    fn request(&self) -> txmq::ListTransactions {
        txmq::ListTransactions {
            state: self.state.map(|s| match s {
                ListState::Pending => TxState::Prepared,
                ListState::Parked => TxState::Parked,
            }),
            group: self.group.clone(),
            older_than_ms: self
                .older_than
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    fn keeps(&self, t: &TxInfo) -> bool {
        let state = match self.state {
            None => true,
            Some(ListState::Pending) => t.state == TxState::Prepared,
            Some(ListState::Parked) => t.state == TxState::Parked,
        };
        state
            && self.group.as_ref().is_none_or(|g| *g == t.producer_group)
            && self
                .older_than
                .is_none_or(|d| u128::from(t.age_ms) > d.as_millis())
    }
}

/// A transaction's decision, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Decision {
    /// Commit: the message becomes visible.
    Commit,
    /// Roll back: the message is dropped.
    Rollback,
    /// Not decided: the broker checks back later.
    Unknown,
}

impl Decision {
    fn state(self) -> TransactionState {
        match self {
            Decision::Commit => TransactionState::Commit,
            Decision::Rollback => TransactionState::Rollback,
            Decision::Unknown => TransactionState::Unknown,
        }
    }
}

/// `txmq tx send TOPIC --group PG --body TEXT --local ...`
#[derive(Debug, Args)]
pub struct TxSendArgs {
    /// The topic to send to.
    pub topic: String,

    /// The producer group; the brokers check back on its live members.
    #[arg(long, env = "TXMQ_GROUP", value_parser = crate::args::parse_group)]
    pub group: String,

    /// The message body.
    #[arg(long, env = "TXMQ_BODY")]
    pub body: String,

    /// The message's key.
    #[arg(long, env = "TXMQ_KEY")]
    pub key: Option<String>,

    /// The message's tag.
    #[arg(long, env = "TXMQ_TAG", value_parser = crate::args::parse_tag)]
    pub tag: Option<String>,

    /// The local transaction's result: commit and rollback end the
    /// transaction so, unknown leaves it to the broker's check-backs.
    #[arg(long, env = "TXMQ_LOCAL", value_enum)]
    pub local: Decision,

    /// The answer to every check-back while lingering; without it a
    /// check-back, of this or of any transaction of the group, is not
    /// answered (the broker's check times out), or is answered unknown
    /// when the command ends first: either way the broker counts it.
    #[arg(long, env = "TXMQ_CHECK", value_enum)]
    pub check: Option<Decision>,

    /// How long to stay connected after ending the transaction, answering
    /// check-backs.
    #[arg(long, env = "TXMQ_LINGER", value_parser = parse_duration, default_value = "0s", value_name = "DURATION")]
    pub linger: Duration,

    /// How old the transaction must be before the broker first checks back
    /// (default: the broker's transaction timeout; at most its --max-delay).
    #[arg(long, env = "TXMQ_FIRST_CHECK_DELAY", value_parser = parse_duration, value_name = "DURATION")]
    pub first_check_delay: Option<Duration>,

    /// Extra attempts for a prepare that failed on a retriable error.
    #[arg(long, env = "TXMQ_RETRIES", default_value_t = 2)]
    pub retries: u32,
}

/// `txmq tx listen --group PG --check ...`
#[derive(Debug, Args)]
pub struct TxListenArgs {
    /// The producer group to answer check-backs for.
    #[arg(long, env = "TXMQ_GROUP", value_parser = crate::args::parse_group)]
    pub group: String,

    /// The answer to every check-back.
    #[arg(long, env = "TXMQ_CHECK", value_enum)]
    pub check: Decision,

    /// Stop after this long (default: run until Ctrl-C or SIGTERM).
    #[arg(long, env = "TXMQ_DURATION", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
}

/// `txmq tx resolve TX_ID --commit|--rollback`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["commit", "rollback"])))]
pub struct TxResolveArgs {
    /// The transaction id.
    pub tx_id: u64,

    /// Commit it: its messages become visible. (Typed, never taken from
    /// the environment: the end cannot be undone.)
    #[arg(long)]
    pub commit: bool,

    /// Roll it back: its messages are dropped. (Typed, as --commit.)
    #[arg(long)]
    pub rollback: bool,

    /// The broker holding it (a broker name, or its address as `txmq cluster` lists it); needed when several
    /// brokers hold a pending transaction of this id, and when a broker
    /// does not answer (it might hold one).
    #[arg(long, env = "TXMQ_BROKER", value_name = "NAME")]
    pub broker: Option<String>,
}

/// Runs a `tx` subcommand.
///
/// # Errors
/// When no nameserver or broker answers, a broker refuses (unknown
/// transaction, commit after rollback, ...), or output cannot be written.
pub async fn run(global: &GlobalArgs, cmd: TxCommand) -> Result<()> {
    match cmd {
        TxCommand::Send(args) => send(global, args).await,
        TxCommand::Listen(args) => listen(global, args).await,
        TxCommand::List {
            broker,
            state,
            group,
            older_than,
        } => {
            let filter = ListFilter {
                state,
                group,
                older_than,
            };
            list(global, broker.as_deref(), &filter).await
        }
        TxCommand::Resolve(args) => resolve(global, args).await,
        TxCommand::Show { tx_id, broker } => show(global, tx_id, broker.as_deref()).await,
        TxCommand::Recheck { tx_id, broker } => recheck(global, tx_id, broker.as_deref()).await,
    }
}

/// The command line's listener: fixed answers, each check printed.
struct CliListener {
    local: TransactionState,
    /// `None`: never answer.
    check: Option<TransactionState>,
    printer: Printer,
}

impl TransactionListener for CliListener {
    async fn execute(
        &self,
        _msg: &Message,
        _ctx: &TxContext,
    ) -> Result<TransactionState, BoxError> {
        Ok(self.local)
    }

    async fn check(&self, req: &CheckRequest) -> Result<TransactionState, BoxError> {
        let Some(answer) = self.check else {
            tracing::info!(
                tx_id = req.tx_id(),
                broker = req.broker_name(),
                "check-back left unanswered"
            );
            // Never answer: the broker's check times out (the producer has no
            // check timeout), and the future ends when the process does.
            return std::future::pending().await;
        };
        let printed = match self.printer.format {
            OutputFormat::Text => self.printer.line(&check_text(req, answer)),
            OutputFormat::Json => self.printer.json(&check_json(req, answer)),
        };
        if let Err(e) = printed {
            tracing::warn!(error = %e, "cannot print a check-back");
        }
        Ok(answer)
    }
}

async fn start_producer(
    global: &GlobalArgs,
    group: String,
    listener: CliListener,
    first_check_delay: Option<Duration>,
    retries: u32,
) -> Result<TransactionProducer<CliListener>> {
    let producer = TransactionProducer::builder()
        .config(global.client_config()?)
        .retries(retries)
        .group(group)
        .listener(listener)
        .first_check_delay(first_check_delay)
        .check_timeout(None)
        .start()
        .await?;
    Ok(producer)
}

async fn send(global: &GlobalArgs, args: TxSendArgs) -> Result<()> {
    let listener = CliListener {
        local: args.local.state(),
        check: args.check.map(Decision::state),
        printer: Printer::stdout(global.output),
    };
    let producer = start_producer(
        global,
        args.group.clone(),
        listener,
        args.first_check_delay,
        args.retries,
    )
    .await?;
    // An id of its own, so that a prepare whose answer is lost can be named.
    let msg_id = MsgId::generate();
    let mut message = Message::new(args.topic.clone(), args.body.clone()).with_msg_id(msg_id);
    if let Some(key) = &args.key {
        message = message.with_key(key.clone());
    }
    if let Some(tag) = &args.tag {
        message = message.with_tag(tag.clone());
    }
    let outcome = match producer.send_in_transaction(message).await {
        Ok(outcome) => outcome,
        // Written, not answered: the broker may hold the half message. The
        // local transaction did not run; say which message it is, and
        // that the broker checks it back if it holds it.
        Err(e) if crate::send::maybe_stored(&e) => {
            let error = txmq::error::chain(&e);
            stderr!(
                "warning: the prepare of message {msg_id} was not answered ({error}): the broker may hold it as a half message; if it does, it checks it back with a live producer of group {}{}. The local transaction did not run: a check-back of it should be answered rollback (`txmq tx list` shows it if it is there)",
                args.group,
                if args.check.is_some() && !args.linger.is_zero() {
                    " (this one answers while it lingers)"
                } else {
                    ""
                }
            );
            let printer = Printer::stdout(global.output);
            let printed = match printer.format {
                OutputFormat::Text => printer.line(&format!(
                    "msg_id={msg_id} topic={} prepare=unknown (not answered; local transaction not run)",
                    args.topic
                )),
                OutputFormat::Json => printer.json(&json!({
                    "msg_id": msg_id.to_string(),
                    "topic": args.topic,
                    "prepare_status": Value::Null,
                    "prepare_error": error,
                })),
            };
            linger_and_close(&producer, &args).await;
            printed.context("writing to standard output")?;
            return Err(exit::with_code(
                exit::PARTIAL,
                format!("message {msg_id}: its prepare was not answered: {error}"),
            ));
        }
        Err(e) => {
            producer.close().await.ok();
            return Err(e.into());
        }
    };
    // An end the broker refused is an error: printed on stderr, exit 1,
    // nothing on stdout.
    if let TxEnd::Refused(e) = outcome.end {
        producer.close().await.ok();
        return Err(e.into());
    }
    // One never answered may have been applied, or not (then the broker
    // checks back): the outcome is shown as unknown, the command stays for
    // --linger to answer check-backs, and exits 3. ("cannot commit", exit
    // 1, invited a second send of a message that was committed.)
    let lost = match &outcome.end {
        TxEnd::Lost(e) => {
            let error = txmq::error::chain(e);
            stderr!(
                "warning: the {} of transaction {} was not answered ({error}): the broker may have applied it; if not, it checks back with a live producer of group {}{}",
                outcome.state.name().to_lowercase(),
                outcome.tx_id,
                args.group,
                if args.check.is_some() && !args.linger.is_zero() {
                    " (this one answers while it lingers)"
                } else {
                    ""
                }
            );
            Some(error)
        }
        _ => None,
    };
    let printer = Printer::stdout(global.output);
    let printed = match printer.format {
        OutputFormat::Text => printer.line(&outcome_text(&outcome, &args.topic)),
        OutputFormat::Json => printer.json(&outcome_json(&outcome, &args.topic)),
    };
    if let Err(e) = printed {
        producer.close().await.ok();
        return Err(anyhow::Error::from(e).context("writing to standard output"));
    }
    linger_and_close(&producer, &args).await;
    match lost {
        Some(error) => Err(exit::with_code(
            exit::PARTIAL,
            format!(
                "transaction {} ended unknown: its {} was not answered: {error}",
                outcome.tx_id,
                outcome.state.name().to_lowercase()
            ),
        )),
        None => Ok(()),
    }
}

/// Answers check-backs (with `--check`) for `--linger` or until Ctrl-C,
/// then closes the producer.
async fn linger_and_close<L: TransactionListener>(
    producer: &TransactionProducer<L>,
    args: &TxSendArgs,
) {
    if !args.linger.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(args.linger) => {}
            _ = interrupted() => {}
        }
    }
    producer.close().await.ok();
}

async fn listen(global: &GlobalArgs, args: TxListenArgs) -> Result<()> {
    let listener = CliListener {
        local: TransactionState::Unknown,
        check: Some(args.check.state()),
        printer: Printer::stdout(global.output),
    };
    let producer = start_producer(global, args.group.clone(), listener, None, 0).await?;
    let brokers = producer.connected_brokers();
    stderr!(
        "answering check-backs of group {} with {} on {} broker{}{}",
        args.group,
        args.check.state().name(),
        brokers.len(),
        if brokers.len() == 1 { "" } else { "s" },
        if brokers.is_empty() {
            String::new()
        } else {
            format!(" ({})", brokers.join(", "))
        }
    );
    // A refusal no retry cures (a user without `tx` on the group, whose
    // producer the brokers turn away at its hello) ends the command (exit
    // 1): it would answer no check-back, and exit 0.
    let ended = async {
        match args.duration {
            Some(duration) => tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = interrupted() => {}
            },
            None => interrupted().await,
        }
    };
    let refused = tokio::select! {
        () = ended => None,
        why = crate::refusal::refused() => Some(why),
    };
    producer.close().await.ok();
    match refused {
        Some(why) => Err(anyhow::anyhow!(why).context(format!(
            "answering check-backs of group {}: refused",
            args.group
        ))),
        None => Ok(()),
    }
}

async fn list(global: &GlobalArgs, broker: Option<&str>, filter: &ListFilter) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let answers = admin
        .list_transactions_by_broker(filter.request(), broker)
        .await;
    admin.close().await.ok();
    let (mut lists, missing) = crate::group::split(answers?)?;
    for l in &mut lists {
        // Also kept by brokers older than the filters.
        l.transactions.retain(|t| filter.keeps(t));
    }
    let matching: u64 = lists
        .iter()
        .map(|l| l.matching.max(l.transactions.len() as u64))
        .sum();
    for l in lists
        .iter()
        .filter(|l| l.matching > l.transactions.len() as u64)
    {
        stderr!(
            "note: broker {} lists the oldest {} of the {} transactions that match",
            l.broker_name,
            l.transactions.len(),
            l.matching
        );
    }
    let printer = Printer::stdout(global.output);
    match printer.format {
        OutputFormat::Text => {
            printer.records(&LIST_HEADER, &list_rows(&lists), &[])?;
            for l in &lists {
                printer.line(&counters_text(l))?;
            }
        }
        OutputFormat::Json => {
            for v in list_json(&lists) {
                printer.json(&v)?;
            }
        }
    }
    // Something matches: exit 1 (an alert), also when a broker did not
    // answer; nothing matches where the brokers answered: exit 3 when some
    // did not (nothing can be said of them).
    if filter.is_set() && matching > 0 {
        if let Err(e) = missing.finish(&printer, lists.len(), "list the transactions of") {
            stderr!("warning: {e}");
        }
        return Err(crate::exit::with_code(
            crate::exit::FAILURE,
            format!(
                "{matching} transaction{} match{}",
                if matching == 1 { "" } else { "s" },
                if matching == 1 { "es" } else { "" }
            ),
        ));
    }
    if filter.is_set() && lists.is_empty() && !missing.0.is_empty() {
        // Exit 1 is "something matches" here: no broker answering is
        // "cannot say" (3), as a silent one is.
        if let Err(e) = missing.finish(&printer, 0, "list the transactions of") {
            return Err(crate::exit::with_code(crate::exit::PARTIAL, e.to_string()));
        }
    }
    missing.finish(&printer, lists.len(), "list the transactions of")
}

async fn show(global: &GlobalArgs, tx_id: u64, broker: Option<&str>) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let answers = admin.show_transaction_by_broker(tx_id, broker).await;
    admin.close().await.ok();
    let mut answers = answers?;
    let asked: Vec<String> = answers.iter().map(|a| a.broker_name.clone()).collect();
    // Brokers that do not know the id answered too.
    answers.retain(|a| {
        a.result
            .as_ref()
            .err()
            .is_none_or(|e| e.code() != Some(txmq::ErrorCode::UnknownTransaction))
    });
    if answers.is_empty() {
        return Err(txmq::Error::UnknownTransaction {
            tx_id,
            brokers: asked,
        }
        .into());
    }
    let (shown, missing) = crate::group::split(answers)?;
    let printer = Printer::stdout(global.output);
    let knew_not = asked.len() - shown.len() - missing.0.len();
    if shown.is_empty() {
        stderr!("note: no broker that answered knows transaction {tx_id}");
    }
    for d in &shown {
        match printer.format {
            OutputFormat::Text => {
                for line in detail_text(d, txmq::now_millis()) {
                    printer.line(&line)?;
                }
            }
            OutputFormat::Json => printer.json(&detail_json(d))?,
        }
    }
    // Ids are unique per broker only: one that did not answer may hold
    // another transaction of this id.
    missing.finish(
        &printer,
        shown.len() + knew_not,
        "look for the transaction on",
    )
}

/// A recheck or resolve without `--broker` asks every broker where the id
/// is: one that cannot be asked stops it (it may hold a transaction of the
/// same id), and the error says how to go on.
fn unasked_hint(e: txmq::Error, tx_id: u64, named: bool) -> anyhow::Error {
    // Only a broker that could not be asked: when none is known (no
    // broker registered, no nameserver), `tx show` could not say either.
    let unasked = matches!(e, txmq::Error::Broker { .. });
    if named || !unasked || e.wire_error().is_some() || e.code().is_some() {
        return e.into();
    }
    anyhow::Error::new(e).context(format!(
        "cannot ask every broker for transaction {tx_id}; name the one that holds it with \
         --broker (`txmq tx show {tx_id}` shows where it is)"
    ))
}

async fn recheck(global: &GlobalArgs, tx_id: u64, broker: Option<&str>) -> Result<()> {
    let admin = Admin::with_config(global.client_config()?).await?;
    let done = admin.recheck_transaction(tx_id, broker).await;
    admin.close().await.ok();
    let r = done.map_err(|e| unasked_hint(e, tx_id, broker.is_some()))?;
    let printer = Printer::stdout(global.output);
    let previous = match r.previous {
        TxState::Parked => "was parked; un-parked",
        _ => "was pending (already being checked back)",
    };
    match printer.format {
        OutputFormat::Text => printer.line(&format!(
            "transaction {} on {}: {previous}, checking it back now ({} checks so far)",
            r.tx_id, r.broker_name, r.checks
        )),
        OutputFormat::Json => printer.json(&json!({
            "tx_id": r.tx_id,
            "broker": r.broker_name,
            "previous": r.previous.name(),
            "checks": r.checks,
        })),
    }
    .context("writing to standard output")
}

/// `tx show` as text lines.
fn detail_text(d: &TxDetail, now: u64) -> Vec<String> {
    let mut out = vec![format!(
        "transaction {} on {}: {}",
        d.tx_id,
        d.broker_name,
        d.state.name()
    )];
    if let Some(e) = &d.ended {
        out.push(format!(
            "  ended: {} by {}{}",
            d.state.name(),
            e.by.name(),
            e.at_ms
                .map_or(String::new(), |at| format!(" at {}", time_text(at)))
        ));
    }
    out.push(format!(
        "  producer group: {}",
        d.producer_group.as_deref().unwrap_or("-")
    ));
    if let Some(at) = d.prepared_at_ms {
        out.push(format!(
            "  prepared: {} (age {})",
            time_text(at),
            age(now.saturating_sub(at))
        ));
    }
    let next = d
        .next_check_at_ms
        .map_or(String::new(), |at| format!(", next at {}", time_text(at)));
    out.push(format!("  checks: {}{next}", d.checks));
    for (i, m) in d.messages.iter().enumerate() {
        let props: Vec<String> = m
            .message
            .properties
            .iter()
            .map(|(k, v)| format!("{k}={}", one_line(v)))
            .collect();
        let (field, body) = crate::output::body_field(&m.message.body);
        out.push(format!(
            "  message {}: topic={} queue={} msg_id={} key={} tag={} properties={{{}}} {field}={}",
            i + 1,
            m.message.topic,
            m.queue,
            m.message.msg_id,
            m.message.key.as_deref().unwrap_or("-"),
            m.message.tag.as_deref().unwrap_or("-"),
            props.join(", "),
            one_line(&body)
        ));
    }
    if d.history.is_empty() {
        out.push("  check history: none since the broker started".to_string());
    }
    for c in &d.history {
        let what = match (&c.answer, &c.error) {
            (Some(a), _) => format!("answer={}", a.name()),
            (None, Some(e)) => format!("error={}", one_line(e)),
            (None, None) => "no answer".to_string(),
        };
        let times = if c.times > 1 {
            format!(" (the last of {} in a row)", c.times)
        } else {
            String::new()
        };
        out.push(format!(
            "  check at {}: {} {what}{times}",
            time_text(c.at_ms),
            if c.sent { "sent" } else { "not sent" }
        ));
    }
    out
}

/// `tx show` as one JSON object.
fn detail_json(d: &TxDetail) -> Value {
    let messages: Vec<Value> = d
        .messages
        .iter()
        .map(|m| {
            let (field, body) = crate::output::body_field(&m.message.body);
            let mut o = Map::new();
            o.insert("msg_id".into(), json!(m.message.msg_id.to_string()));
            o.insert("topic".into(), json!(m.message.topic));
            o.insert("queue".into(), json!(m.queue));
            o.insert("key".into(), json!(m.message.key));
            o.insert("tag".into(), json!(m.message.tag));
            o.insert("properties".into(), json!(m.message.properties));
            o.insert(field.into(), json!(body));
            Value::Object(o)
        })
        .collect();
    let history: Vec<Value> = d
        .history
        .iter()
        .map(|c| {
            json!({
                "at_ms": c.at_ms,
                "sent": c.sent,
                "answer": c.answer.map(|a| a.name()),
                "error": c.error,
                "times": c.times,
            })
        })
        .collect();
    json!({
        "tx_id": d.tx_id,
        "broker": d.broker_name,
        "state": d.state.name(),
        "producer_group": d.producer_group,
        "prepared_at_ms": d.prepared_at_ms,
        "age_ms": d.age_ms,
        "checks": d.checks,
        "next_check_at_ms": d.next_check_at_ms,
        "messages": messages,
        "history": history,
        "ended_by": d.ended.as_ref().map(|e| e.by.name()),
        "ended_at_ms": d.ended.as_ref().and_then(|e| e.at_ms),
    })
}

async fn resolve(global: &GlobalArgs, args: TxResolveArgs) -> Result<()> {
    let action = match (args.commit, args.rollback) {
        (true, false) => TxAction::Commit,
        (false, true) => TxAction::Rollback,
        _ => {
            return Err(crate::exit::with_code(
                crate::exit::USAGE,
                "give either --commit or --rollback".to_string(),
            ))
        }
    };
    let admin = Admin::with_config(global.client_config()?).await?;
    let resolved = admin
        .resolve_transaction(args.tx_id, action, args.broker.as_deref())
        .await;
    admin.close().await.ok();
    let (broker, ended) =
        resolved.map_err(|e| unasked_hint(e, args.tx_id, args.broker.is_some()))?;
    let printer = Printer::stdout(global.output);
    match printer.format {
        OutputFormat::Text => printer.line(&resolved_text(args.tx_id, &broker, &ended)),
        OutputFormat::Json => printer.json(&resolved_json(args.tx_id, &broker, &ended)),
    }
    .context("writing to standard output")
}

/// A transactional send's result as JSON: `tx_id`, `msg_id`, `state` (the
/// local result), `broker`, `topic`, `prepare_status` (how the half message
/// was stored; not `SEND_OK`: the local transaction did not run and the
/// transaction was rolled back), and `ended` (the broker's state) with
/// `already` when the transaction was ended.
fn outcome_json(o: &TxOutcome, topic: &str) -> Value {
    let mut m = Map::new();
    m.insert("tx_id".into(), json!(o.tx_id));
    m.insert("msg_id".into(), json!(o.msg_id.to_string()));
    m.insert("state".into(), json!(o.state.name()));
    m.insert("broker".into(), json!(o.broker_name));
    m.insert("topic".into(), json!(topic));
    m.insert("prepare_status".into(), json!(o.prepare_status.name()));
    if let Some(ended) = o.ended() {
        m.insert("ended".into(), json!(ended.state.name()));
        m.insert("already".into(), json!(ended.already));
        // How the end was stored: FLUSH_SLAVE_TIMEOUT, say, under sync replication.
        m.insert("end_status".into(), json!(ended.status.name()));
    }
    if let TxEnd::Lost(e) = &o.end {
        // Sent, not answered: the end may or may not be applied.
        m.insert("ended".into(), Value::Null);
        m.insert("end_error".into(), json!(txmq::error::chain(e)));
    }
    Value::Object(m)
}

/// A transactional send's result as a text line.
fn outcome_text(o: &TxOutcome, topic: &str) -> String {
    let end = match o.ended() {
        Some(e) if e.already => format!("ended={} (already)", e.state.name()),
        Some(e) if e.status != SendStatus::SendOk => {
            format!("ended={} status={}", e.state.name(), e.status.name())
        }
        Some(e) => format!("ended={}", e.state.name()),
        None if matches!(o.end, TxEnd::Lost(_)) => {
            "ended=unknown (not answered); if not applied, the broker will check back".to_string()
        }
        None => "not ended; the broker will check back".to_string(),
    };
    let prepared = if o.prepare_status == SendStatus::SendOk {
        String::new()
    } else {
        format!(
            "prepare={} (local transaction not run) ",
            o.prepare_status.name()
        )
    };
    format!(
        "tx={} broker={} topic={} msg_id={} {}local={} {}",
        o.tx_id,
        o.broker_name,
        topic,
        o.msg_id,
        prepared,
        o.state.name(),
        end
    )
}

/// A check-back answered, as JSON.
fn check_json(req: &CheckRequest, answer: TransactionState) -> Value {
    json!({
        "tx_id": req.tx_id(),
        "msg_id": req.msg_id().to_string(),
        "answer": answer.name(),
        "checks": req.checks(),
        "broker": req.broker_name(),
        "topic": req.message().topic(),
    })
}

/// A check-back answered, as a text line.
fn check_text(req: &CheckRequest, answer: TransactionState) -> String {
    format!(
        "check tx={} broker={} topic={} msg_id={} checks={} answer={}",
        req.tx_id(),
        req.broker_name(),
        req.message().topic(),
        req.msg_id(),
        req.checks(),
        answer.name()
    )
}

const LIST_HEADER: [&str; 10] = [
    "TX ID",
    "BROKER",
    "MSG ID",
    "TOPIC",
    "GROUP",
    "AGE",
    "CHECKS",
    "LAST CHECK",
    "LAST ERROR",
    "STATE",
];

/// One table row per transaction.
fn list_rows(lists: &[TransactionList]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for l in lists {
        for t in &l.transactions {
            let msg_id = match t.msg_ids.as_slice() {
                [] => "-".to_string(),
                [one] => one.to_string(),
                [first, rest @ ..] => format!("{first} (+{})", rest.len()),
            };
            rows.push(vec![
                t.tx_id.to_string(),
                l.broker_name.clone(),
                msg_id,
                t.topics.join(","),
                t.producer_group.clone(),
                age(t.age_ms),
                t.checks.to_string(),
                t.last_check.map_or("-", |c| c.name()).to_string(),
                t.last_error.as_deref().map_or("-".to_string(), one_line),
                t.state.name().to_string(),
            ]);
        }
    }
    rows
}

/// One object per transaction, then one counters object per broker.
fn list_json(lists: &[TransactionList]) -> Vec<Value> {
    let mut out = Vec::new();
    for l in lists {
        for t in &l.transactions {
            let msg_ids: Vec<String> = t.msg_ids.iter().map(ToString::to_string).collect();
            out.push(json!({
                "tx_id": t.tx_id,
                "broker": l.broker_name,
                "msg_id": msg_ids.first(),
                "msg_ids": msg_ids,
                "topic": t.topics.first(),
                "topics": t.topics,
                "producer_group": t.producer_group,
                "age_ms": t.age_ms,
                "checks": t.checks,
                "last_check": t.last_check.map(|c| c.name()),
                "last_error": t.last_error,
                "state": t.state.name(),
            }));
        }
    }
    for l in lists {
        let c = &l.counters;
        out.push(json!({
            "broker": l.broker_name,
            "counters": {
                "prepared": c.prepared,
                "committed": c.committed,
                "rolled_back": c.rolled_back,
                "checks_sent": c.checks_sent,
                "parked": c.parked,
                "pending": c.pending,
            },
        }));
    }
    out
}

/// `broker-a: prepared=3 committed=1 ...`
fn counters_text(l: &TransactionList) -> String {
    let c = &l.counters;
    format!(
        "{}: prepared={} committed={} rolled_back={} checks_sent={} parked={} pending={}",
        l.broker_name, c.prepared, c.committed, c.rolled_back, c.checks_sent, c.parked, c.pending
    )
}

fn resolved_json(tx_id: u64, broker: &str, ended: &Ended) -> Value {
    json!({
        "tx_id": tx_id,
        "broker": broker,
        "state": ended.state.name(),
        "already": ended.already,
    })
}

fn resolved_text(tx_id: u64, broker: &str, ended: &Ended) -> String {
    format!(
        "transaction {tx_id} on {broker}: {}{}",
        ended.state.name(),
        if ended.already { " (already)" } else { "" }
    )
}

/// `0.4s`, `12.0s`.
fn age(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Keeps a table cell on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;
    use txmq::{MsgId, SendStatus, TxCounters, TxInfo, TxState};

    fn parse(args: &[&str]) -> Option<TxCommand> {
        match Cli::try_parse_from(args) {
            Ok(Cli {
                command: Command::Tx(cmd),
                ..
            }) => Some(cmd),
            _ => None,
        }
    }

    #[test]
    fn tx_send_parses_with_its_defaults() {
        let cmd = parse(&[
            "txmq", "tx", "send", "orders", "--group", "pg", "--body", "hi", "--local", "unknown",
        ]);
        let Some(TxCommand::Send(a)) = cmd else {
            panic!("tx send parses")
        };
        assert_eq!((a.topic.as_str(), a.group.as_str()), ("orders", "pg"));
        assert_eq!(a.local, Decision::Unknown);
        assert_eq!(a.check, None);
        assert_eq!(a.linger, Duration::ZERO);
        assert_eq!(a.first_check_delay, None);

        let cmd = parse(&[
            "txmq",
            "tx",
            "send",
            "orders",
            "--group",
            "pg",
            "--body",
            "hi",
            "--key",
            "k",
            "--tag",
            "t",
            "--local",
            "commit",
            "--check",
            "rollback",
            "--linger",
            "2s",
            "--first-check-delay",
            "500ms",
        ]);
        let Some(TxCommand::Send(a)) = cmd else {
            panic!("tx send with every flag parses")
        };
        assert_eq!(a.check, Some(Decision::Rollback));
        assert_eq!(a.linger, Duration::from_secs(2));
        assert_eq!(a.first_check_delay, Some(Duration::from_millis(500)));
        assert_eq!((a.key.as_deref(), a.tag.as_deref()), (Some("k"), Some("t")));

        // --local is required and takes only the three answers.
        assert!(parse(&["txmq", "tx", "send", "t", "--group", "g", "--body", "x"]).is_none());
        assert!(parse(&[
            "txmq", "tx", "send", "t", "--group", "g", "--body", "x", "--local", "maybe"
        ])
        .is_none());
    }

    #[test]
    fn tx_listen_list_and_resolve_parse() {
        let Some(TxCommand::Listen(l)) = parse(&[
            "txmq",
            "tx",
            "listen",
            "--group",
            "pg",
            "--check",
            "commit",
            "--duration",
            "1m",
        ]) else {
            panic!("tx listen parses")
        };
        assert_eq!(l.check, Decision::Commit);
        assert_eq!(l.duration, Some(Duration::from_secs(60)));
        assert!(
            parse(&["txmq", "tx", "listen", "--group", "pg"]).is_none(),
            "--check is required"
        );

        let Some(TxCommand::List { broker, .. }) = parse(&["txmq", "tx", "list", "--broker", "b"])
        else {
            panic!("tx list parses")
        };
        assert_eq!(broker.as_deref(), Some("b"));

        let Some(TxCommand::Resolve(r)) = parse(&["txmq", "tx", "resolve", "42", "--rollback"])
        else {
            panic!("tx resolve parses")
        };
        assert_eq!((r.tx_id, r.commit, r.rollback), (42, false, true));
        assert!(parse(&["txmq", "tx", "resolve", "42"]).is_none());
        assert!(parse(&["txmq", "tx", "resolve", "42", "--commit", "--rollback"]).is_none());
        assert!(parse(&["txmq", "tx", "resolve", "x", "--commit"]).is_none());
    }

    fn outcome(ended: Option<Ended>, state: TransactionState) -> TxOutcome {
        let end = ended.map_or(TxEnd::NotSent, TxEnd::Ended);
        let outcome = TxOutcome::new(
            17,
            "broker-a",
            vec![MsgId([0xab; 16])],
            state,
            SendStatus::SendOk,
            end,
        );
        outcome.unwrap_or_else(|e| panic!("an outcome with a message: {e}"))
    }

    #[test]
    fn a_send_outcome_names_the_local_result_and_the_brokers_state() {
        let committed = outcome(
            Some(Ended::new(TxState::Committed, false, SendStatus::SendOk)),
            TransactionState::Commit,
        );
        let v = outcome_json(&committed, "orders");
        assert_eq!(v["tx_id"], 17);
        assert_eq!(v["msg_id"], "AB".repeat(16));
        assert_eq!(v["state"], "commit");
        assert_eq!(v["ended"], "committed");
        assert_eq!(v["already"], false);
        assert_eq!(v["broker"], "broker-a");
        assert_eq!(v["topic"], "orders");
        assert_eq!(
            outcome_text(&committed, "orders"),
            format!(
                "tx=17 broker=broker-a topic=orders msg_id={} local=commit ended=committed",
                "AB".repeat(16)
            )
        );

        // Stored on the master only (sync replication short of slaves): said.
        for status in [SendStatus::FlushSlaveTimeout, SendStatus::SlaveNotAvailable] {
            let short = outcome(
                Some(Ended::new(TxState::Committed, false, status)),
                TransactionState::Commit,
            );
            assert_eq!(outcome_json(&short, "orders")["end_status"], status.name());
            assert!(outcome_text(&short, "orders").ends_with(&format!(
                "local=commit ended=committed status={}",
                status.name()
            )));
            let mut prepared_short = outcome(
                Some(Ended::new(TxState::RolledBack, false, SendStatus::SendOk)),
                TransactionState::Rollback,
            );
            prepared_short.prepare_status = status;
            assert_eq!(
                outcome_json(&prepared_short, "orders")["prepare_status"],
                status.name()
            );
            assert!(outcome_text(&prepared_short, "orders").contains(&format!(
                "prepare={} (local transaction not run) local=rollback ended=rolled_back",
                status.name()
            )));
        }

        let unknown = outcome(None, TransactionState::Unknown);
        let v = outcome_json(&unknown, "orders");
        assert_eq!(v["state"], "unknown");
        assert!(v.get("ended").is_none());
        assert!(outcome_text(&unknown, "orders")
            .ends_with("local=unknown not ended; the broker will check back"));

        // A commit sent and never answered: its outcome is unknown, not an
        // error the operator would answer with a second send.
        let lost = TxOutcome::new(
            17,
            "broker-a",
            vec![MsgId([0xab; 16])],
            TransactionState::Commit,
            SendStatus::SendOk,
            TxEnd::Lost(txmq::Error::NoBroker),
        )
        .unwrap_or_else(|e| panic!("an outcome with a message: {e}"));
        let v = outcome_json(&lost, "orders");
        assert_eq!(v["ended"], Value::Null);
        assert!(
            v["end_error"].as_str().is_some_and(|e| !e.is_empty()),
            "{v}"
        );
        assert!(outcome_text(&lost, "orders").ends_with(
            "local=commit ended=unknown (not answered); if not applied, the broker will check back"
        ));
    }

    #[test]
    fn a_check_line_has_the_transaction_and_the_answer() {
        let m = Message::new("orders", "x").with_msg_id(txmq::MsgId::generate());
        let Ok(req) = CheckRequest::new(5, "broker-b", "pg", vec![m.clone()], 2) else {
            panic!("valid request")
        };
        let v = check_json(&req, TransactionState::Rollback);
        assert_eq!(v["tx_id"], 5);
        assert_eq!(v["msg_id"], req.msg_id().to_string());
        assert_eq!(m.msg_id(), Some(req.msg_id()));
        assert_eq!(v["answer"], "rollback");
        assert_eq!(v["checks"], 2);
        assert_eq!(v["broker"], "broker-b");
        assert_eq!(v["topic"], "orders");
        assert_eq!(
            check_text(&req, TransactionState::Commit),
            format!(
                "check tx=5 broker=broker-b topic=orders msg_id={} checks=2 answer=commit",
                req.msg_id()
            )
        );
    }

    fn lists() -> Vec<TransactionList> {
        vec![TransactionList {
            broker_name: "broker-a".into(),
            transactions: vec![
                TxInfo {
                    tx_id: 3,
                    msg_ids: vec![MsgId([1; 16]), MsgId([2; 16])],
                    topics: vec!["orders".into(), "audit".into()],
                    producer_group: "pg".into(),
                    age_ms: 12_345,
                    checks: 5,
                    last_check: None,
                    last_error: Some("check timed out\nafter 3s".into()),
                    state: TxState::Parked,
                },
                TxInfo {
                    tx_id: 4,
                    msg_ids: vec![MsgId([3; 16])],
                    topics: vec!["orders".into()],
                    producer_group: "pg".into(),
                    age_ms: 400,
                    checks: 1,
                    last_check: Some(TransactionState::Unknown),
                    last_error: None,
                    state: TxState::Prepared,
                },
            ],
            counters: TxCounters {
                prepared: 10,
                committed: 6,
                rolled_back: 2,
                checks_sent: 7,
                parked: 1,
                pending: 2,
            },
            matching: 2,
        }]
    }

    #[test]
    fn the_transaction_list_has_one_object_per_transaction_then_counters() {
        let v = list_json(&lists());
        assert_eq!(v.len(), 3);
        assert_eq!(v[0]["tx_id"], 3);
        assert_eq!(v[0]["broker"], "broker-a");
        assert_eq!(v[0]["msg_id"], "01".repeat(16));
        assert_eq!(v[0]["msg_ids"].as_array().map(Vec::len), Some(2));
        assert_eq!(v[0]["topic"], "orders");
        assert_eq!(v[0]["producer_group"], "pg");
        assert_eq!(v[0]["age_ms"], 12_345);
        assert_eq!(v[0]["checks"], 5);
        assert_eq!(v[0]["last_check"], Value::Null);
        assert_eq!(v[0]["state"], "parked");
        assert_eq!(v[1]["last_check"], "unknown");
        assert_eq!(v[1]["last_error"], Value::Null);
        assert_eq!(v[1]["state"], "prepared");
        assert_eq!(v[2]["broker"], "broker-a");
        assert_eq!(v[2]["counters"]["prepared"], 10);
        assert_eq!(v[2]["counters"]["rolled_back"], 2);
        assert_eq!(v[2]["counters"]["checks_sent"], 7);
        assert_eq!(v[2]["counters"]["pending"], 2);
    }

    #[test]
    fn the_transaction_table_is_readable() {
        let rows = list_rows(&lists());
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            [
                "3",
                "broker-a",
                &format!("{} (+1)", "01".repeat(16)),
                "orders,audit",
                "pg",
                "12.3s",
                "5",
                "-",
                "check timed out after 3s",
                "parked"
            ]
        );
        assert_eq!(rows[1][7], "unknown");
        assert_eq!(rows[1][8], "-");
        assert_eq!(
            counters_text(&lists()[0]),
            "broker-a: prepared=10 committed=6 rolled_back=2 checks_sent=7 parked=1 pending=2"
        );
    }

    #[test]
    fn a_resolution_prints_the_resulting_state() {
        let ended = Ended::new(TxState::RolledBack, true, SendStatus::SendOk);
        assert_eq!(
            resolved_text(9, "broker-a", &ended),
            "transaction 9 on broker-a: rolled_back (already)"
        );
        let v = resolved_json(9, "broker-a", &ended);
        assert_eq!(v["state"], "rolled_back");
        assert_eq!(v["already"], true);
        assert_eq!(v["tx_id"], 9);
    }

    #[test]
    fn list_filters_keep_state_group_and_age() {
        let Some(TxCommand::List {
            state,
            group,
            older_than,
            ..
        }) = parse(&[
            "txmq",
            "tx",
            "list",
            "--state",
            "parked",
            "--group",
            "pg",
            "--older-than",
            "30s",
        ])
        else {
            panic!("tx list with filters parses")
        };
        let filter = ListFilter {
            state,
            group,
            older_than,
        };
        assert!(filter.is_set());
        assert!(!ListFilter::default().is_set());
        let t = |state, group: &str, age_ms| TxInfo {
            tx_id: 1,
            msg_ids: Vec::new(),
            topics: Vec::new(),
            producer_group: group.into(),
            age_ms,
            checks: 0,
            last_check: None,
            last_error: None,
            state,
        };
        assert!(filter.keeps(&t(TxState::Parked, "pg", 31_000)));
        assert!(!filter.keeps(&t(TxState::Prepared, "pg", 31_000)));
        assert!(!filter.keeps(&t(TxState::Parked, "other", 31_000)));
        assert!(!filter.keeps(&t(TxState::Parked, "pg", 29_000)));
        assert!(parse(&["txmq", "tx", "list", "--state", "done"]).is_none());
        assert!(parse(&["txmq", "tx", "show", "x"]).is_none());
    }
}
