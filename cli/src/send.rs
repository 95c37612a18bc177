//! `txmq send`: sends messages with many in flight, printing each
//! acknowledgement the moment it arrives.
//!
//! Up to `--window` sends are in flight at once over one producer (they are
//! pipelined over one connection per broker). Acknowledgements are printed
//! in the order they arrive, which under a window above one is not always the
//! input order. After the first message that fails (after the producer's
//! retries) no new message is sent; those in flight are awaited and printed,
//! and the command exits non-zero. Ctrl-C or SIGTERM stops it the same way.

use std::io::BufRead;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use clap::Args;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use txmq::{Message, Producer, SendReceipt};

use crate::args::GlobalArgs;
use crate::output::{error_text, sent_json, sent_text, OutputFormat, Printer};
use crate::signal::interrupted;

/// `txmq send TOPIC ...`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["body", "stdin"])))]
pub struct SendArgs {
    /// The topic to send to.
    pub topic: String,

    /// The message body.
    #[arg(long, env = "TXMQ_BODY")]
    pub body: Option<String>,

    /// Send one message per line of standard input (the line without its
    /// line ending; empty lines are skipped; --count is ignored).
    #[arg(long, env = "TXMQ_STDIN")]
    pub stdin: bool,

    /// The messages' key.
    #[arg(long, env = "TXMQ_KEY")]
    pub key: Option<String>,

    /// The messages' tag.
    #[arg(long, env = "TXMQ_TAG")]
    pub tag: Option<String>,

    /// Send the --body this many times.
    #[arg(long, env = "TXMQ_COUNT", default_value_t = 1)]
    pub count: u64,

    /// Messages in flight at once.
    #[arg(long, env = "TXMQ_WINDOW", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub window: u32,

    /// Extra attempts for a message whose send failed on a retriable error.
    #[arg(long, env = "TXMQ_RETRIES", default_value_t = 2)]
    pub retries: u32,

    /// Producer group, sent to the brokers.
    #[arg(long, env = "TXMQ_PRODUCER_GROUP")]
    pub producer_group: Option<String>,

    /// Deliver the messages this long after sending (e.g. 30s, 10m; at most
    /// the broker's --max-delay, 7 days by default).
    #[arg(long, env = "TXMQ_DELAY", value_parser = crate::args::parse_duration, value_name = "DURATION", conflicts_with = "deliver_at")]
    pub delay: Option<std::time::Duration>,

    /// Deliver the messages at this time, in milliseconds since the Unix epoch.
    #[arg(long, env = "TXMQ_DELIVER_AT", value_name = "MILLIS")]
    pub deliver_at: Option<u64>,

    /// Send to the queue chosen by this key's hash, so that messages with
    /// one key keep their order (sends one at a time).
    #[arg(long, env = "TXMQ_SHARD_KEY", value_name = "KEY")]
    pub shard_key: Option<String>,
}

/// Where the bodies come from.
enum Bodies {
    Repeat { body: Bytes, left: u64 },
    Lines(mpsc::Receiver<std::io::Result<Vec<u8>>>),
}

impl Bodies {
    /// The next body; `None` at the end of the input. Cancel safe.
    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        match self {
            Bodies::Repeat { body, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                Some(Ok(body.clone()))
            }
            Bodies::Lines(rx) => rx.recv().await.map(|r| r.map(Bytes::from)),
        }
    }
}

/// Reads stdin on a plain thread (a blocked read must not keep the runtime
/// from shutting down) and passes the lines on, keeping their bytes as they are.
fn read_lines() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(1024);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    let line = strip_line_ending(line);
                    if !line.is_empty() && tx.blocking_send(Ok(line)).is_err() {
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

/// Sends the messages.
///
/// # Errors
/// When the producer cannot be set up, the input cannot be read, output
/// cannot be written, or any message was not sent.
pub async fn run(global: &GlobalArgs, args: SendArgs) -> Result<()> {
    let mut builder = Producer::builder()
        .config(global.client_config())
        .retries(args.retries);
    if let Some(group) = &args.producer_group {
        builder = builder.group(group.clone());
    }
    let producer = builder.build().await?;
    let mut bodies = match &args.body {
        Some(body) if !args.stdin => Bodies::Repeat {
            body: Bytes::from(body.clone()),
            left: args.count,
        },
        _ => Bodies::Lines(read_lines()),
    };
    let printer = Printer::stdout(global.output);
    // In-order delivery per key needs one send at a time.
    let window = if args.shard_key.is_some() {
        1
    } else {
        args.window as usize
    };
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut input_done = false;
    let mut fatal: Option<anyhow::Error> = None;
    let interrupted = interrupted();
    tokio::pin!(interrupted);
    loop {
        let may_send = !input_done && failed == 0 && fatal.is_none();
        let done = if may_send && inflight.len() < window {
            tokio::select! {
                biased;
                Some(done) = inflight.next(), if !inflight.is_empty() => Some(done),
                _ = &mut interrupted => {
                    fatal = Some(anyhow!("interrupted; stopped sending"));
                    None
                }
                body = bodies.next() => {
                    match body {
                        Some(Ok(body)) => inflight.push(send_one(&producer, message(&args, body), args.shard_key.as_deref())),
                        Some(Err(e)) => fatal = Some(anyhow!(e).context("reading standard input")),
                        None => input_done = true,
                    }
                    None
                }
            }
        } else {
            match inflight.next().await {
                Some(done) => Some(done),
                None => break,
            }
        };
        let Some((message, result)) = done else {
            continue;
        };
        match result {
            Ok(receipt) => {
                sent += 1;
                if let Err(e) = print_receipt(&printer, &receipt, &message) {
                    fatal.get_or_insert(e);
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!(
                    "error: message {} not sent: {}",
                    message.msg_id,
                    error_text(&anyhow::Error::from(e))
                );
            }
        }
    }
    producer.close();
    let secs = started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 { sent as f64 / secs } else { 0.0 };
    let failures = if failed > 0 {
        format!(", {failed} failed")
    } else {
        String::new()
    };
    eprintln!(
        "sent {sent} message{}{failures} in {secs:.3}s ({rate:.0} msg/s)",
        if sent == 1 { "" } else { "s" }
    );
    if let Some(e) = fatal {
        return Err(e);
    }
    if failed > 0 {
        return Err(anyhow!(
            "{failed} message{} not sent; stopped sending",
            if failed == 1 { "" } else { "s" }
        ));
    }
    Ok(())
}

fn message(args: &SendArgs, body: Bytes) -> Message {
    let mut m = Message::new(args.topic.clone(), body);
    m.key = args.key.clone();
    m.tag = args.tag.clone();
    if let Some(delay) = args.delay {
        m = m.with_delay(delay);
    }
    if let Some(at) = args.deliver_at {
        m = m.with_deliver_at(at);
    }
    m
}

async fn send_one(
    producer: &Producer,
    message: Message,
    shard_key: Option<&str>,
) -> (Message, txmq::Result<SendReceipt>) {
    let result = match shard_key {
        Some(key) => producer.send_ordered(message.clone(), key).await,
        None => producer.send(message.clone()).await,
    };
    (message, result)
}

fn print_receipt(printer: &Printer, receipt: &SendReceipt, message: &Message) -> Result<()> {
    match printer.format {
        OutputFormat::Text => printer.line(&sent_text(receipt, message)),
        OutputFormat::Json => printer.json(&sent_json(receipt, message)),
    }
    .context("writing to standard output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_are_stripped_but_other_bytes_kept() {
        assert_eq!(strip_line_ending(b"abc\n".to_vec()), b"abc");
        assert_eq!(strip_line_ending(b"abc\r\n".to_vec()), b"abc");
        assert_eq!(strip_line_ending(b"abc".to_vec()), b"abc");
        assert_eq!(strip_line_ending(b"\xff\r\n".to_vec()), b"\xff");
        assert_eq!(strip_line_ending(b" a \n".to_vec()), b" a ");
    }

    #[tokio::test]
    async fn a_repeated_body_comes_count_times() {
        let mut bodies = Bodies::Repeat {
            body: Bytes::from_static(b"x"),
            left: 3,
        };
        let mut n = 0;
        while let Some(Ok(b)) = bodies.next().await {
            assert_eq!(&b[..], b"x");
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
