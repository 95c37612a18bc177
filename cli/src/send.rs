//! `txmq send`: sends messages with many in flight, printing each
//! acknowledgement the moment it arrives, and saying exactly which input
//! lines were not sent so that a run can be resumed.
//!
//! Up to `--window` sends are in flight at once over one producer (they are
//! pipelined over one connection per broker). Acknowledgements are printed
//! in the order they arrive, which under a window above one is not always the
//! input order; with `--stdin` each carries its input line number.
//!
//! Each message ends in one of three outcomes:
//! - **sent**: a broker stored it (a receipt on stdout);
//! - **not sent**: every attempt was refused or could not reach a broker,
//!   so it is surely not stored (an error on stderr);
//! - **outcome unknown**: an attempt was written but its answer never came
//!   (a timeout, a connection closed), so it may be stored (an `UNKNOWN`
//!   receipt on stdout and an error on stderr).
//!
//! After the first message that is not sent (or whose outcome is unknown),
//! no new message is sent; those in flight are awaited and reported. Every
//! input line not surely sent (not sent, outcome unknown, or not sent at all
//! because sending stopped, up to the end of the input) is then written, as
//! read, to stderr (`unsent line N: ...`) or to the `--unsent` file, so that
//! `txmq send --stdin < FILE` resumes. Ctrl-C or SIGTERM stop reading at
//! once: the messages in flight are awaited, the lines read but not sent are
//! reported, and the command exits 130 (143 for SIGTERM) after saying up to
//! which line the input was read.
//!
//! The producer's own retries are off: this module retries (`--retries`,
//! and while no broker is reachable, for up to `--wait-for-broker`), so
//! that it knows whether any attempt may have stored the message. With
//! idempotence (the default) each retry sends the same message (the same
//! msg id), which the producer resends with its first stamp on its first
//! queue, so a message whose answer was lost is stored once however many
//! times it is retried; then a retry never moves to another broker.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use txmq::{Message, MsgId, Producer, RemotingError, SendReceipt};

use crate::args::GlobalArgs;
use crate::exit;
use crate::output::{
    error_text, sent_json, sent_text, unknown_json, unknown_text, OutputFormat, Printer,
};
use crate::signal::{received, Signal};

/// The status of a message an earlier attempt stored, as the broker says
/// (its answer was lost, and the broker no longer remembers the offset).
const STORED_BEFORE: &str = "STORED_BEFORE";

/// Pause before the n-th retry of a message: n times this.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The first pause while waiting for a broker (`--wait-for-broker`); it
/// doubles up to [`MAX_WAIT_PAUSE`].
const FIRST_WAIT_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between attempts while waiting for a broker.
const MAX_WAIT_PAUSE: Duration = Duration::from_secs(1);
/// Whether the user was told that sends wait for a broker (once a run).
static WAIT_ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// `txmq send TOPIC ...`
#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["body", "stdin"])),
    after_help = "Exit codes: 0 every message sent; 1 none sent (or an error); 2 usage error; \
3 some sent and some not (or with an unknown outcome); 130 stopped by Ctrl-C; \
143 stopped by SIGTERM. Lines not surely sent are written to stderr as \
'unsent line N: LINE', or to the --unsent file as read."
)]
pub struct SendArgs {
    /// The topic to send to.
    pub topic: String,

    /// The message body.
    #[arg(long, env = "TXMQ_BODY")]
    pub body: Option<String>,

    /// Send one message per line of standard input (the line without its
    /// line ending; empty lines are skipped; --count is ignored). Receipts
    /// carry the input line number.
    #[arg(long, env = "TXMQ_STDIN")]
    pub stdin: bool,

    /// The messages' key.
    #[arg(long, env = "TXMQ_KEY")]
    pub key: Option<String>,

    /// The messages' tag.
    #[arg(long, env = "TXMQ_TAG", value_parser = crate::args::parse_tag)]
    pub tag: Option<String>,

    /// Send the --body this many times.
    #[arg(long, env = "TXMQ_COUNT", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Messages in flight at once.
    #[arg(long, env = "TXMQ_WINDOW", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub window: u32,

    /// Extra attempts for a message whose send failed on a retriable error.
    #[arg(long, env = "TXMQ_RETRIES", default_value_t = 2)]
    pub retries: u32,

    /// While no broker can be reached (connection refused, closed or timed
    /// out, no broker or route registered), keep retrying a message with
    /// backoff for up to this long (e.g. 30s, 5m) instead of giving up.
    #[arg(long, env = "TXMQ_WAIT_FOR_BROKER", value_parser = crate::args::parse_duration, value_name = "DURATION")]
    pub wait_for_broker: Option<Duration>,

    /// Write the input lines not surely sent (not sent, or with an unknown
    /// outcome) to FILE, one per line as read, instead of to stderr:
    /// `txmq send --stdin < FILE` resends them. The file is created (or
    /// emptied) at the start; empty at the end means everything was sent.
    #[arg(long, env = "TXMQ_UNSENT", value_name = "FILE", requires = "stdin")]
    pub unsent: Option<PathBuf>,

    /// Producer group, sent to the brokers.
    #[arg(long, env = "TXMQ_PRODUCER_GROUP", value_parser = crate::args::parse_group)]
    pub producer_group: Option<String>,

    /// Deliver the messages this long after sending (e.g. 30s, 10m; at most
    /// the broker's --max-delay, 7 days by default).
    #[arg(long, env = "TXMQ_DELAY", value_parser = crate::args::parse_duration, value_name = "DURATION", conflicts_with = "deliver_at")]
    pub delay: Option<Duration>,

    /// Deliver the messages at this time, in milliseconds since the Unix epoch.
    #[arg(long, env = "TXMQ_DELIVER_AT", value_name = "MILLIS")]
    pub deliver_at: Option<u64>,

    /// Send to the queue chosen by this key's hash, so that messages with
    /// one key keep their order (sends one at a time).
    #[arg(long, env = "TXMQ_SHARD_KEY", value_name = "KEY")]
    pub shard_key: Option<String>,

    /// Idempotent sends (true or false): a message whose answer was lost
    /// (a timeout, a broker killed or failed over) is retried with the same
    /// sequence number on the same queue, and the broker stores it once.
    /// false: a retry may go to another queue, and may store it twice.
    #[arg(long, env = "TXMQ_IDEMPOTENCE", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub idempotence: bool,
}

/// One body to send: its input line number (with `--stdin`; the message's
/// number with `--body`) and its bytes, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Input {
    line: u64,
    body: Bytes,
}

/// Where the bodies come from.
enum Bodies {
    Repeat { body: Bytes, next: u64, count: u64 },
    Lines(mpsc::Receiver<std::io::Result<Input>>),
}

impl Bodies {
    /// The next body; `None` at the end of the input. Cancel safe.
    async fn next(&mut self) -> Option<std::io::Result<Input>> {
        match self {
            Bodies::Repeat { body, next, count } => {
                if *next > *count {
                    return None;
                }
                *next += 1;
                Some(Ok(Input {
                    line: *next - 1,
                    body: body.clone(),
                }))
            }
            Bodies::Lines(rx) => rx.recv().await,
        }
    }

    /// Stops reading: the lines already read (without waiting for more),
    /// and with `--body` how many messages were still due. A line the
    /// reader holds but has not handed over yet is not among them (the
    /// caller says up to which line the input was read).
    fn stop(&mut self) -> (Vec<Input>, u64) {
        match self {
            Bodies::Repeat { next, count, .. } => {
                let due = (*count + 1).saturating_sub(*next);
                *next = *count + 1;
                (Vec::new(), due)
            }
            Bodies::Lines(rx) => {
                rx.close();
                let mut read = Vec::new();
                while let Ok(item) = rx.try_recv() {
                    if let Ok(input) = item {
                        read.push(input);
                    }
                }
                (read, 0)
            }
        }
    }
}

/// Reads stdin on a plain thread (a blocked read must not keep the runtime
/// from shutting down) and passes the lines on with their line numbers
/// (counting the empty lines it skips), keeping their bytes as they are.
fn read_lines() -> mpsc::Receiver<std::io::Result<Input>> {
    let (tx, rx) = mpsc::channel(1024);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        let mut number = 0u64;
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    number += 1;
                    let line = strip_line_ending(line);
                    if line.is_empty() {
                        continue;
                    }
                    let item = Input {
                        line: number,
                        body: Bytes::from(line),
                    };
                    if tx.blocking_send(Ok(item)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

fn strip_line_ending(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    line
}

/// How one message's send ended.
#[derive(Debug)]
enum Outcome {
    Sent(SendReceipt),
    /// Stored by an earlier attempt whose answer was lost, as the broker
    /// says (`DUPLICATE_SEQUENCE`: it no longer remembers where): sent,
    /// its queue offset unknown.
    StoredBefore(txmq::Error),
    /// Surely not stored: every attempt was refused or never reached a broker.
    NotSent(txmq::Error),
    /// An attempt may have stored it (the last error is kept).
    Unknown(txmq::Error),
}

/// A message whose send ended.
struct Done {
    input: Input,
    message: Message,
    outcome: Outcome,
}

/// How a message is retried.
#[derive(Debug, Clone, Copy)]
struct Retry {
    retries: u32,
    wait_for_broker: Option<Duration>,
}

/// True when a failed attempt may have stored the message: the request
/// went to a broker (or was about to) and no answer came. A broker's
/// refusal, a connection that could not be opened or whose hello timed
/// out (the send was never written), and a failure to find a route store
/// nothing. (A connection closed during its hello is one that could not be
/// opened: `Connect`.)
pub(crate) fn maybe_stored(e: &txmq::Error) -> bool {
    match e {
        txmq::Error::Broker { source, .. } => match source {
            RemotingError::Timeout { kind, .. } => *kind != "Hello",
            RemotingError::Closed { .. } | RemotingError::UnexpectedResponse { .. } => true,
            RemotingError::Connect { .. }
            | RemotingError::Remote(_)
            | RemotingError::NotSent { .. } => false,
        },
        _ => false,
    }
}

/// True when the failure says no broker can be reached right now: its
/// connection fails, closes or times out, the nameservers cannot be
/// reached, or they know no broker (or no route) for the topic; or its
/// broker group is between masters (a failover: no master yet, or the one
/// tried says it is one no longer).
fn no_broker_reachable(e: &txmq::Error) -> bool {
    if e.is_not_master() {
        return true;
    }
    match e {
        txmq::Error::NoRoute { .. } | txmq::Error::NoBroker | txmq::Error::NoMaster { .. } => true,
        txmq::Error::Broker { source, .. } | txmq::Error::Remoting(source) => matches!(
            source,
            RemotingError::Connect { .. }
                | RemotingError::Closed { .. }
                | RemotingError::Timeout { .. }
        ),
        _ => false,
    }
}

/// The broker a failed send went to, if it got that far.
fn broker_of(e: &txmq::Error) -> Option<&str> {
    match e {
        txmq::Error::Broker { broker, .. } => Some(broker),
        _ => None,
    }
}

/// How long to pause before attempt `attempt + 1` after `error`, or `None`
/// to give up. `waiting_since` and `pause` hold the `--wait-for-broker`
/// state of one message.
fn next_pause(
    error: &txmq::Error,
    attempt: u32,
    retry: Retry,
    waiting_since: &mut Option<Instant>,
    pause: &mut Duration,
) -> Option<Duration> {
    if let Some(wait) = retry.wait_for_broker {
        if no_broker_reachable(error) {
            let since = *waiting_since.get_or_insert_with(Instant::now);
            let left = wait.saturating_sub(since.elapsed());
            if left.is_zero() {
                return None;
            }
            let this = (*pause).min(left);
            *pause = (*pause * 2).min(MAX_WAIT_PAUSE);
            return Some(this);
        }
    }
    *waiting_since = None;
    *pause = FIRST_WAIT_PAUSE;
    (error.is_retriable() && attempt <= retry.retries).then(|| RETRY_PAUSE * attempt)
}

/// Sends one message, retrying as `retry` says, until it is sent, given
/// up, or `stop` turns true (then a message between attempts gives up at
/// once; an attempt on the wire is awaited).
async fn send_one(
    producer: &Producer,
    input: Input,
    message: Message,
    shard_key: Option<&str>,
    retry: Retry,
    mut stop: watch::Receiver<bool>,
) -> Done {
    // A retry prefers another broker. An idempotent send that may have been
    // stored is remembered by the producer, which sends it back to its first
    // queue whatever queue is asked for; one surely not stored (a broker
    // that did not even answer the hello) moves, as a plain send does.
    let mut may_be_stored = false;
    let mut attempt = 0u32;
    let mut waiting_since = None;
    let mut pause = FIRST_WAIT_PAUSE;
    // The broker of the last failed attempt: a retry prefers another one.
    let mut failed_broker: Option<String> = None;
    let error = loop {
        // Each attempt carries the same message id.
        let result = match (shard_key, failed_broker.as_deref()) {
            (Some(key), _) => producer.send_ordered(message.clone(), key).await,
            (None, Some(failed)) => {
                match other_queue(
                    producer,
                    message.topic(),
                    failed,
                    input.line + u64::from(attempt),
                )
                .await
                {
                    Some(q) => {
                        producer
                            .send_to_queue(message.clone(), &q.broker_name, q.queue)
                            .await
                    }
                    None => producer.send(message.clone()).await,
                }
            }
            (None, None) => producer.send(message.clone()).await,
        };
        let e = match result {
            Ok(receipt) => {
                return Done {
                    input,
                    message,
                    outcome: Outcome::Sent(receipt),
                }
            }
            Err(e) => e,
        };
        if e.code() == Some(txmq::ErrorCode::DuplicateSequence) {
            return Done {
                input,
                message,
                outcome: Outcome::StoredBefore(e),
            };
        }
        may_be_stored |= maybe_stored(&e);
        failed_broker = broker_of(&e).map(str::to_string);
        attempt += 1;
        let was_waiting = waiting_since.is_some();
        let Some(wait) = next_pause(&e, attempt, retry, &mut waiting_since, &mut pause) else {
            break e;
        };
        if !was_waiting && waiting_since.is_some() && !WAIT_ANNOUNCED.swap(true, Ordering::Relaxed)
        {
            stderr!(
                "waiting up to {} for a broker (--wait-for-broker): {}",
                humantime::format_duration(retry.wait_for_broker.unwrap_or_default()),
                txmq::error::chain(&e)
            );
        }
        if *stop.borrow() {
            break e;
        }
        tracing::debug!(line = input.line, attempt, error = %txmq::error::chain(&e), "send failed; retrying in {wait:?}");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break e,
        }
    };
    let outcome = if may_be_stored {
        Outcome::Unknown(error)
    } else {
        Outcome::NotSent(error)
    };
    Done {
        input,
        message,
        outcome,
    }
}

/// A writable queue of `topic` on a broker other than `failed`, picked
/// by `turn`; `None` when there is no other broker (or no route).
async fn other_queue(
    producer: &Producer,
    topic: &str,
    failed: &str,
    turn: u64,
) -> Option<txmq::MessageQueue> {
    let queues = producer.writable_queues(topic).await.ok()?;
    let others: Vec<&txmq::MessageQueue> =
        queues.iter().filter(|q| q.broker_name != failed).collect();
    let n = u64::try_from(others.len()).ok().filter(|&n| n > 0)?;
    let pick = usize::try_from(turn % n).ok()?;
    others.get(pick).map(|q| (*q).clone())
}

/// Where the lines not surely sent go.
enum UnsentSink {
    /// `unsent line N: LINE` on stderr.
    Stderr,
    /// The lines as read, one per line.
    File(PathBuf, std::io::BufWriter<std::fs::File>),
}

impl UnsentSink {
    fn open(path: Option<&PathBuf>) -> Result<UnsentSink> {
        Ok(match path {
            None => UnsentSink::Stderr,
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("cannot create --unsent file {}", path.display()))?;
                UnsentSink::File(path.clone(), std::io::BufWriter::new(file))
            }
        })
    }

    fn write(&mut self, input: &Input) -> Result<()> {
        match self {
            UnsentSink::Stderr => {
                let mut err = std::io::stderr().lock();
                write!(err, "unsent line {}: ", input.line)?;
                err.write_all(&input.body)?;
                err.write_all(b"\n")?;
                Ok(())
            }
            UnsentSink::File(path, out) => out
                .write_all(&input.body)
                .and_then(|()| out.write_all(b"\n"))
                .with_context(|| format!("writing the --unsent file {}", path.display())),
        }
    }

    fn finish(&mut self) -> Result<()> {
        match self {
            UnsentSink::Stderr => Ok(()),
            UnsentSink::File(path, out) => out
                .flush()
                .and_then(|()| out.get_ref().sync_all())
                .with_context(|| format!("writing the --unsent file {}", path.display())),
        }
    }

    fn describe(&self) -> String {
        match self {
            UnsentSink::Stderr => "listed above as 'unsent line N: LINE'".into(),
            UnsentSink::File(path, _) => format!("written to {}", path.display()),
        }
    }
}

/// What the run counted.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    /// Of `sent`: stored by an earlier attempt, offset not known.
    stored_before: u64,
    /// Of `sent`: stored with a status short of `SEND_OK` (not yet fsynced
    /// or not on enough replicas), by status.
    short: std::collections::BTreeMap<&'static str, u64>,
    not_sent: u64,
    unknown: u64,
    /// Read (or, with --body, due) but never sent because sending stopped.
    not_tried: u64,
    /// The highest input line number handed over by the reader.
    last_read: u64,
}

/// Why sending stopped early.
enum Stop {
    /// A message was not sent or has an unknown outcome.
    Failed,
    /// Ctrl-C or SIGTERM.
    Signal,
    /// Input or output failed.
    Fatal(anyhow::Error),
}

/// Sends the messages.
///
/// # Errors
/// When the producer cannot be set up, the input cannot be read, output
/// cannot be written, or any message was not surely sent; the error's
/// [`exit`] code tells which (see the module docs).
pub async fn run(global: &GlobalArgs, args: SendArgs) -> Result<()> {
    // Checked here: clap counts `--stdin`'s env default as present.
    if args.unsent.is_some() && !args.stdin {
        return Err(crate::exit::usage(
            "--unsent lists input lines not sent: it needs --stdin",
        ));
    }
    let mut unsent = UnsentSink::open(args.unsent.as_ref())?;
    // Retries happen here, where it is known whether an attempt may have
    // stored the message (the producer reports only the last attempt).
    let mut builder = Producer::builder()
        .config(global.client_config()?)
        .idempotence(args.idempotence)
        .retries(0);
    if let Some(group) = &args.producer_group {
        builder = builder.group(group.clone());
    }
    let producer = builder.build().await?;
    let from_stdin = args.stdin || args.body.is_none();
    let mut bodies = match &args.body {
        Some(body) if !args.stdin => Bodies::Repeat {
            body: Bytes::from(body.clone()),
            next: 1,
            count: args.count,
        },
        _ => Bodies::Lines(read_lines()),
    };
    let printer = Printer::stdout(global.output);
    let ordered = args.shard_key.is_some();
    // In-order delivery per key needs one send at a time.
    let window = if ordered { 1 } else { args.window as usize };
    let retry = Retry {
        retries: args.retries,
        wait_for_broker: args.wait_for_broker,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut tally = Tally::default();
    let mut failed: Vec<Input> = Vec::new();
    let mut input_done = false;
    let mut stop: Option<Stop> = None;
    let mut signal: Option<Signal> = None;
    let signalled = received();
    tokio::pin!(signalled);
    loop {
        let reading = stop.is_none() && !input_done && inflight.len() < window;
        if !reading && inflight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            s = &mut signalled, if signal.is_none() => {
                signal = Some(s);
                stop = Some(Stop::Signal);
                stop_tx.send_replace(true);
            }
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                let (unsent, printed) = report(&printer, done, from_stdin, ordered, &mut tally);
                if let Some(input) = unsent {
                    stop.get_or_insert(Stop::Failed);
                    failed.push(input);
                }
                if let Err(e) = printed {
                    stop = Some(Stop::Fatal(e));
                }
            }
            body = bodies.next(), if reading => match body {
                Some(Ok(input)) => {
                    tally.last_read = tally.last_read.max(input.line);
                    let message = message(&args, input.body.clone());
                    inflight.push(send_one(&producer, input, message, args.shard_key.as_deref(), retry, stop_rx.clone()));
                }
                Some(Err(e)) => {
                    stop = Some(Stop::Fatal(anyhow!(e).context("reading standard input")));
                }
                None => input_done = true,
            },
        }
    }
    drop(inflight);
    producer.close().await.ok();

    // Report what was not surely sent, in input order: the failed messages
    // first (all read before anything still unread), then the rest.
    failed.sort_by_key(|i| i.line);
    if from_stdin {
        for input in &failed {
            unsent.write(input)?;
        }
    }
    let stopped_early = stop.is_some();
    let mut fatal = match stop {
        Some(Stop::Fatal(e)) => Some(e),
        _ => None,
    };
    // After a failure the rest of the input is reported too, so that the
    // report alone resumes the run; not after a signal, nor from a
    // terminal (there is no end to wait for), and a signal stops it.
    let read_rest = stopped_early
        && signal.is_none()
        && matches!(bodies, Bodies::Lines(_))
        && !std::io::stdin().is_terminal();
    if stopped_early && !read_rest {
        let (read, due) = bodies.stop();
        tally.not_tried += due;
        for input in read {
            not_tried(&mut tally, &mut unsent, &input)?;
        }
    }
    if read_rest {
        loop {
            tokio::select! {
                biased;
                s = &mut signalled, if signal.is_none() => {
                    signal = Some(s);
                    for input in bodies.stop().0 {
                        not_tried(&mut tally, &mut unsent, &input)?;
                    }
                    break;
                }
                next = bodies.next() => match next {
                    Some(Ok(input)) => not_tried(&mut tally, &mut unsent, &input)?,
                    Some(Err(e)) => {
                        fatal.get_or_insert(anyhow!(e).context("reading standard input"));
                        break;
                    }
                    None => {
                        input_done = true;
                        break;
                    }
                },
            }
        }
    }
    unsent.finish()?;
    summarize(&tally, started.elapsed());
    finish(&tally, from_stdin, input_done, signal, fatal, &unsent)
}

/// Counts and reports a body read (or due) but never sent.
/// Only lines read from stdin come here.
fn not_tried(tally: &mut Tally, unsent: &mut UnsentSink, input: &Input) -> Result<()> {
    tally.not_tried += 1;
    tally.last_read = tally.last_read.max(input.line);
    unsent.write(input)
}

/// Prints the outcome of one message. Returns its input when it was not
/// surely sent, and whether stdout could be written.
/// `ordered`: sent with `--shard-key`.
fn report(
    printer: &Printer,
    done: Done,
    from_stdin: bool,
    ordered: bool,
    tally: &mut Tally,
) -> (Option<Input>, Result<()>) {
    let what = if from_stdin { "line" } else { "message" };
    let Done {
        input,
        message,
        outcome,
    } = done;
    let line = input.line;
    // `message` (below) fixed the id before the first attempt.
    let msg_id = message.msg_id().unwrap_or_default();
    let with_line = |mut text: String| {
        if from_stdin {
            text.push_str(&format!(" line={line}"));
        }
        text
    };
    let with_line_json = |mut v: serde_json::Value| {
        if from_stdin {
            v["line"] = line.into();
        }
        v
    };
    let (unsent, written) = match outcome {
        Outcome::Sent(receipt) => {
            tally.sent += 1;
            if receipt.status != txmq::SendStatus::SendOk {
                *tally.short.entry(receipt.status.name()).or_default() += 1;
            }
            let written = match printer.format {
                OutputFormat::Text => printer.line(&with_line(sent_text(&receipt, &message))),
                OutputFormat::Json => printer.json(&with_line_json(sent_json(&receipt, &message))),
            };
            (None, written)
        }
        Outcome::StoredBefore(e) => {
            tally.sent += 1;
            tally.stored_before += 1;
            let broker = broker_of(&e).unwrap_or("?");
            let written = match printer.format {
                OutputFormat::Text => printer.line(&with_line(format!(
                    "{STORED_BEFORE} {} broker={broker} msg_id={msg_id} (stored by an earlier attempt whose answer was lost; its offset is not known)",
                    message.topic()
                ))),
                OutputFormat::Json => {
                    let mut v = serde_json::json!({
                        "status": STORED_BEFORE,
                        "topic": message.topic(),
                        "broker": broker,
                        "msg_id": msg_id.to_string(),
                        "queue_offset": null,
                    });
                    if let Some(key) = message.key() {
                        v["key"] = key.into();
                    }
                    printer.json(&with_line_json(v))
                }
            };
            (None, written)
        }
        Outcome::Unknown(e) => {
            tally.unknown += 1;
            let broker = broker_of(&e).map(str::to_string);
            let error = error_text(&anyhow::Error::from(e));
            stderr!(
                "error: {what} {line} (msg_id {msg_id}): outcome unknown, it may have been stored: {error}"
            );
            let broker = broker.as_deref();
            let written = match printer.format {
                OutputFormat::Text => printer.line(&with_line(unknown_text(&message, broker))),
                OutputFormat::Json => {
                    printer.json(&with_line_json(unknown_json(&message, broker, &error)))
                }
            };
            (Some(input), written)
        }
        Outcome::NotSent(e) => {
            tally.not_sent += 1;
            let hint = if ordered && matches!(e, txmq::Error::NoRoute { .. }) {
                " (a send with --shard-key picks its queue among the topic's queues, so it \
                 never auto-creates the topic: create it with `txmq topic create`; while the \
                 topic's brokers are away, --wait-for-broker waits for them)"
            } else {
                ""
            };
            let error = error_text(&anyhow::Error::from(e));
            stderr!("error: {what} {line} (msg_id {msg_id}) not sent: {error}{hint}");
            (Some(input), Ok(()))
        }
    };
    (unsent, written.context("writing to standard output"))
}

fn summarize(tally: &Tally, took: Duration) {
    let secs = took.as_secs_f64();
    let rate = if secs > 0.0 {
        tally.sent as f64 / secs
    } else {
        0.0
    };
    let mut failures = String::new();
    if tally.stored_before > 0 {
        failures.push_str(&format!(
            " ({} of them stored by an earlier attempt, offset not known)",
            tally.stored_before
        ));
    }
    for (status, n) in &tally.short {
        // Stored on the master, but not yet as durable as the broker
        // promises with SEND_OK (see the README's replication section).
        failures.push_str(&format!(", {n} with status {status}"));
    }
    if tally.not_sent > 0 {
        failures.push_str(&format!(", {} not sent", tally.not_sent));
    }
    if tally.unknown > 0 {
        failures.push_str(&format!(", {} outcome unknown", tally.unknown));
    }
    if tally.not_tried > 0 {
        failures.push_str(&format!(", {} not tried", tally.not_tried));
    }
    stderr!(
        "sent {} message{}{failures} in {secs:.3}s ({rate:.0} msg/s)",
        tally.sent,
        if tally.sent == 1 { "" } else { "s" }
    );
}

/// The command's result: `Ok` when everything was sent, else an error
/// whose exit code says how it ended.
fn finish(
    tally: &Tally,
    from_stdin: bool,
    input_done: bool,
    signal: Option<Signal>,
    fatal: Option<anyhow::Error>,
    unsent: &UnsentSink,
) -> Result<()> {
    let unsent_count = tally.not_sent + tally.unknown + tally.not_tried;
    let mut parts = Vec::new();
    if unsent_count > 0 {
        let unknown = if tally.unknown > 0 {
            format!(
                " ({} with an unknown outcome: resending those may store them twice)",
                tally.unknown
            )
        } else {
            String::new()
        };
        if from_stdin {
            parts.push(format!(
                "{unsent_count} input line{} not sent{unknown}; they are {}; resend them with txmq send --stdin",
                plural(unsent_count),
                unsent.describe()
            ));
        } else {
            parts.push(format!(
                "{unsent_count} message{} not sent{unknown}",
                plural(unsent_count)
            ));
        }
    }
    if let Some(s) = signal {
        let what = match s {
            Signal::Interrupt => "interrupted",
            Signal::Terminate => "terminated",
        };
        let read = if from_stdin && !input_done {
            format!(
                "; the input was read up to line {} (later lines were not read)",
                tally.last_read
            )
        } else {
            String::new()
        };
        parts.insert(0, format!("{what}; stopped sending{read}"));
        return Err(exit::with_code(s.exit_code(), parts.join(": ")));
    }
    let code = if tally.sent > 0 {
        exit::PARTIAL
    } else {
        exit::FAILURE
    };
    if let Some(e) = fatal {
        parts.insert(0, format!("stopped sending: {}", error_text(&e)));
        return Err(exit::with_code(code, parts.join("; ")));
    }
    if unsent_count > 0 {
        return Err(exit::with_code(code, parts.join("; ")));
    }
    Ok(())
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The message of one input, its id fixed now: every attempt of the CLI's
/// own retry loop carries it (the broker stores the message once), and a
/// send with an unknown outcome can name it.
fn message(args: &SendArgs, body: Bytes) -> Message {
    let mut m = Message::new(args.topic.clone(), body).with_msg_id(MsgId::generate());
    if let Some(key) = &args.key {
        m = m.with_key(key.clone());
    }
    if let Some(tag) = &args.tag {
        m = m.with_tag(tag.clone());
    }
    // A delivery time that is not ahead is no delay: the message is sent
    // as any other (the broker would store it so), and its receipt has its
    // queue offset.
    if let Some(delay) = args.delay.filter(|d| !d.is_zero()) {
        m = m.with_delay(delay);
    }
    if let Some(at) = args.deliver_at.filter(|at| *at > txmq::now_millis()) {
        m = m.with_deliver_at(at);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use txmq::{ErrorCode, WireError};

    #[derive(Debug, Parser)]
    struct SendOnly {
        #[command(flatten)]
        args: SendArgs,
    }

    #[test]
    fn idempotence_is_on_unless_turned_off_and_takes_a_boolean() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["send", "t", "--body", "x"];
            argv.extend_from_slice(extra);
            SendOnly::try_parse_from(argv).map(|s| s.args.idempotence)
        };
        assert!(matches!(parse(&[]), Ok(true)));
        assert!(matches!(parse(&["--idempotence", "false"]), Ok(false)));
        assert!(matches!(parse(&["--idempotence=true"]), Ok(true)));
        // A bad value is a usage error (exit 2); so is the flag without one.
        for bad in [&["--idempotence", "maybe"][..], &["--idempotence"][..]] {
            match parse(bad) {
                Err(e) => assert_eq!(e.exit_code(), crate::exit::USAGE as i32, "{bad:?}"),
                Ok(v) => panic!("{bad:?} parsed as {v}"),
            }
        }
    }

    #[test]
    fn line_endings_are_stripped_but_other_bytes_kept() {
        assert_eq!(strip_line_ending(b"abc\n".to_vec()), b"abc");
        assert_eq!(strip_line_ending(b"abc\r\n".to_vec()), b"abc");
        assert_eq!(strip_line_ending(b"abc".to_vec()), b"abc");
        assert_eq!(strip_line_ending(b"\xff\r\n".to_vec()), b"\xff");
        assert_eq!(strip_line_ending(b" a \n".to_vec()), b" a ");
    }

    #[tokio::test]
    async fn a_repeated_body_comes_count_times_numbered() {
        let mut bodies = Bodies::Repeat {
            body: Bytes::from_static(b"x"),
            next: 1,
            count: 3,
        };
        let mut lines = Vec::new();
        while let Some(Ok(b)) = bodies.next().await {
            assert_eq!(&b.body[..], b"x");
            lines.push(b.line);
        }
        assert_eq!(lines, [1, 2, 3]);
    }

    #[tokio::test]
    async fn stopping_hands_back_what_was_read_and_not_more() {
        let mut bodies = Bodies::Repeat {
            body: Bytes::from_static(b"x"),
            next: 1,
            count: 4,
        };
        assert!(bodies.next().await.is_some());
        assert_eq!(bodies.stop(), (Vec::new(), 3));
        assert!(bodies.next().await.is_none());
        assert_eq!(bodies.stop(), (Vec::new(), 0));

        let (tx, rx) = mpsc::channel(8);
        for line in [3, 5] {
            let body = Bytes::from(format!("l{line}"));
            tx.send(Ok(Input { line, body })).await.ok();
        }
        let mut bodies = Bodies::Lines(rx);
        let read: Vec<u64> = bodies.stop().0.iter().map(|i| i.line).collect();
        assert_eq!(read, [3, 5]);
        assert!(tx
            .send(Ok(Input {
                line: 6,
                body: Bytes::new()
            }))
            .await
            .is_err());
    }

    fn at_broker(source: RemotingError) -> txmq::Error {
        txmq::Error::Broker {
            broker: "broker-a".into(),
            addr: "127.0.0.1:1".into(),
            source,
        }
    }

    #[test]
    fn only_an_unanswered_request_may_have_stored_the_message() {
        let hello_timeout = at_broker(RemotingError::Timeout {
            kind: "Hello",
            peer: "p".into(),
            after: Duration::from_secs(1),
        });
        assert!(!maybe_stored(&hello_timeout), "the send was never written");
        let timeout = at_broker(RemotingError::Timeout {
            kind: "Send",
            peer: "p".into(),
            after: Duration::from_secs(1),
        });
        let closed = at_broker(RemotingError::Closed { peer: "p".into() });
        let refused = at_broker(RemotingError::Connect {
            addr: "p".into(),
            message: "refused".into(),
        });
        let wire = at_broker(RemotingError::Remote(WireError::new(
            ErrorCode::StoreFull,
            "full",
        )));
        let ns = txmq::Error::Remoting(RemotingError::Connect {
            addr: "ns".into(),
            message: "refused".into(),
        });
        let no_route = txmq::Error::NoRoute { topic: "t".into() };
        assert!(maybe_stored(&timeout) && maybe_stored(&closed));
        assert!(!maybe_stored(&refused) && !maybe_stored(&wire));
        assert!(!maybe_stored(&ns) && !maybe_stored(&no_route));

        // A failover: the broker tried is a master no longer.
        let not_master = at_broker(RemotingError::Remote(WireError::new(
            ErrorCode::NotMaster,
            "a slave",
        )));
        assert!(!maybe_stored(&not_master));
        for e in [&timeout, &closed, &refused, &ns, &no_route, &not_master] {
            assert!(no_broker_reachable(e), "{e:?}");
        }
        assert!(!no_broker_reachable(&wire));
        assert_eq!(broker_of(&closed), Some("broker-a"));
        assert_eq!(broker_of(&ns), None);
    }

    #[test]
    fn waiting_for_a_broker_backs_off_until_the_wait_is_over() {
        let refused = at_broker(RemotingError::Connect {
            addr: "p".into(),
            message: "refused".into(),
        });
        let retry = Retry {
            retries: 0,
            wait_for_broker: Some(Duration::from_secs(60)),
        };
        let (mut since, mut pause) = (None, FIRST_WAIT_PAUSE);
        let pauses: Vec<Option<Duration>> = (1..=6)
            .map(|a| next_pause(&refused, a, retry, &mut since, &mut pause))
            .collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            pauses,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );

        // Past the wait: give up.
        since = Instant::now().checked_sub(Duration::from_secs(61));
        assert_eq!(next_pause(&refused, 7, retry, &mut since, &mut pause), None);

        // Without --wait-for-broker: --retries, then give up.
        let plain = Retry {
            retries: 2,
            wait_for_broker: None,
        };
        let (mut since, mut pause) = (None, FIRST_WAIT_PAUSE);
        let pauses: Vec<Option<Duration>> = (1..=3)
            .map(|a| next_pause(&refused, a, plain, &mut since, &mut pause))
            .collect();
        assert_eq!(pauses, [ms(100), ms(200), None]);

        // A refusal that is no outage is not waited for.
        let bad = at_broker(RemotingError::Remote(WireError::new(
            ErrorCode::BadArgument,
            "bad",
        )));
        let (mut since, mut pause) = (None, FIRST_WAIT_PAUSE);
        assert_eq!(next_pause(&bad, 1, retry, &mut since, &mut pause), None);
    }
}
