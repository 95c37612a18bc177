//! `transform-pipeline`: a consume-transform-produce pipeline, exactly once.
//!
//! Reads topic `--input` as consumer group `--group` (a `PullConsumer` that
//! never commits by itself), and for each message sends one transformed
//! message to `--output` (key = the input's message id, body = `out:` and
//! the input's body) in a transaction that also commits the input's offset,
//! expected to move from the input's own offset
//! (`ConsumedOffset::after`). Whatever kills it, the output holds exactly
//! one message per input: a transaction left pending by a crash is
//! committed by its check-back only if its input was not handled again
//! meanwhile (`OFFSET_CONFLICT` otherwise).
//!
//! After a conflict or any failure it reads again from the group's
//! committed offset (a new consumer). Used by `tests/tests/transform.rs`,
//! which `kill -9`s it.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use txmq::{
    BoxError, CheckRequest, ConsumeFrom, ConsumedOffset, ErrorCode, Message, PullConsumer,
    SendStatus, TransactionListener, TransactionProducer, TransactionState, TxContext,
};

#[derive(Parser, Debug)]
struct Args {
    /// Nameserver address.
    #[arg(long)]
    nameserver: String,
    /// The consumer group reading the input.
    #[arg(long, default_value = "transform")]
    group: String,
    /// The transactional producer group.
    #[arg(long, default_value = "transform-producer")]
    producer_group: String,
    /// The input topic.
    #[arg(long, default_value = "in")]
    input: String,
    /// The output topic.
    #[arg(long, default_value = "out")]
    output: String,
}

/// Nothing local to commit: the output and the offset are the whole
/// effect, and with an expected offset a commit can never apply twice, so
/// a check-back is always answered commit.
struct Pipeline;

impl TransactionListener for Pipeline {
    async fn execute(&self, _: &Message, _: &TxContext) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }

    async fn check(&self, _: &CheckRequest) -> Result<TransactionState, BoxError> {
        Ok(TransactionState::Commit)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let producer = match TransactionProducer::builder()
        .nameserver(&args.nameserver)
        .group(&args.producer_group)
        .listener(Pipeline)
        .send_timeout(Duration::from_secs(2))
        .route_refresh_interval(Duration::from_millis(500))
        .start()
        .await
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("transform-pipeline: cannot start the producer: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        if let Err(e) = run(&args, &producer).await {
            eprintln!("transform-pipeline: {e}; reading again from the committed offset");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads from the group's committed offset and handles messages until
/// something fails (the position in memory is then not to be trusted).
async fn run(args: &Args, producer: &TransactionProducer<Pipeline>) -> Result<(), String> {
    let mut consumer = PullConsumer::builder()
        .nameserver(&args.nameserver)
        .group(&args.group)
        .topic(&args.input)
        .from(ConsumeFrom::First)
        .max_wait(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
        .route_refresh_interval(Duration::from_millis(500))
        .build()
        .await
        .map_err(|e| format!("cannot start the consumer: {e}"))?;
    loop {
        let batch = consumer
            .poll(Duration::from_millis(500))
            .await
            .map_err(|e| e.to_string())?;
        for input in batch {
            let out = Message::new(
                args.output.as_str(),
                format!("out:{}", String::from_utf8_lossy(input.body())),
            )
            .with_key(input.msg_id().to_string());
            let offset = ConsumedOffset::after(args.group.as_str(), &input);
            // Dropped, never shut down: the consumer must not commit by itself.
            match producer
                .send_in_transaction_with_offsets(vec![out], vec![offset])
                .await
            {
                Ok(o) if o.prepare_status != SendStatus::SendOk => {
                    return Err(format!(
                        "prepare stored {:?}; rolled back",
                        o.prepare_status
                    ))
                }
                Ok(o) => match o.end_error() {
                    Some(e) if e.code() == Some(ErrorCode::OffsetConflict) => {
                        return Err(format!("offset conflict: {e}"));
                    }
                    Some(e) => return Err(format!("transaction failed: {e}")),
                    None => {}
                },
                Err(e) => return Err(format!("transaction failed: {e}")),
            }
        }
    }
}
