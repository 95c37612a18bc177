//! `txmq-peers`: `txmq bench produce`'s closed loop against two brokers a
//! reader knows, so that the README can put txmq among them, measured on
//! the same machine in the same window.
//!
//! - `rabbitmq`: a durable quorum queue, persistent messages, publisher
//!   confirms (a message counts once the broker confirmed it).
//! - `nats`: a JetStream stream with file storage (a message counts once
//!   its publish ack arrived).
//!
//! Each producer has its own connection and keeps `--in-flight` messages
//! outstanding; the rate counts the messages confirmed after the warm-up,
//! and the latency of each is from its publish to its confirm.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    broker: Broker,
    /// Producers, one connection each.
    #[arg(long, default_value_t = 1, global = true)]
    producers: usize,
    /// Messages each producer keeps outstanding.
    #[arg(long, default_value_t = 1, global = true)]
    in_flight: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024, global = true)]
    size: usize,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration, global = true)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    warmup: Duration,
}

#[derive(Subcommand, Clone)]
enum Broker {
    /// RabbitMQ: quorum queue `txmq-peers`, publisher confirms.
    Rabbitmq {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        url: String,
    },
    /// NATS JetStream: stream `TXMQPEERS` (subject `txmq-peers`), file storage.
    Nats {
        #[arg(long, default_value = "127.0.0.1:4222")]
        url: String,
    },
}

/// What one producer measured.
struct Measured {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let stop_at = measure_from + args.duration;
    let body = Bytes::from(vec![b'x'; args.size]);
    let mut tasks = Vec::new();
    match &args.broker {
        Broker::Rabbitmq { url } => {
            rabbit::declare(url).await?;
            for _ in 0..args.producers {
                let (url, body, k) = (url.clone(), body.clone(), args.in_flight);
                let channel = rabbit::channel(&url).await?;
                tasks.push(tokio::spawn(async move {
                    rabbit::produce(channel, body, k, measure_from, stop_at).await
                }));
            }
        }
        Broker::Nats { url } => {
            nats::declare(url).await?;
            for _ in 0..args.producers {
                let (url, body, k) = (url.clone(), body.clone(), args.in_flight);
                let js = nats::connect(&url).await?;
                tasks.push(tokio::spawn(async move {
                    nats::produce(js, body, k, measure_from, stop_at).await
                }));
            }
        }
    }
    let mut all = Histogram::<u64>::new(3)?;
    let (mut errors, mut first_error) = (0, None);
    for t in tasks {
        let m = t.await??;
        all.add(&m.hist)?;
        errors += m.errors;
        first_error = first_error.or(m.first_error);
    }
    let secs = args.duration.as_secs_f64();
    let out = serde_json::json!({
        "broker": match args.broker { Broker::Rabbitmq { .. } => "rabbitmq", Broker::Nats { .. } => "nats" },
        "producers": args.producers,
        "in_flight": args.in_flight,
        "message_size": args.size,
        "duration_s": secs,
        "messages": all.len(),
        "publish_rate_msg_s": (all.len() as f64 / secs).round(),
        "errors": errors,
        "first_error": first_error,
        "latency_us": {
            "p50": all.value_at_quantile(0.5),
            "p99": all.value_at_quantile(0.99),
            "p99_9": all.value_at_quantile(0.999),
            "max": all.max(),
        },
    });
    println!("{out}");
    Ok(())
}

/// The closed loop of one producer: `k` publishes outstanding until
/// `stop_at`; those confirmed after `measure_from` are counted.
async fn closed_loop<F, Fut>(k: usize, measure_from: Instant, stop_at: Instant, publish: F) -> Result<Measured>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut m = Measured {
        hist: Histogram::new(3)?,
        errors: 0,
        first_error: None,
    };
    let mut outstanding = FuturesUnordered::new();
    let one = || {
        let sent = Instant::now();
        let f = publish();
        async move { (sent, f.await) }
    };
    for _ in 0..k {
        outstanding.push(one());
    }
    while let Some((sent, result)) = outstanding.next().await {
        let now = Instant::now();
        if sent >= measure_from && now <= stop_at {
            match result {
                Ok(()) => m.hist.record(now.duration_since(sent).as_micros() as u64)?,
                Err(e) => {
                    m.errors += 1;
                    m.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        if now < stop_at {
            outstanding.push(one());
        }
    }
    Ok(m)
}

mod rabbit {
    use super::*;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    pub const QUEUE: &str = "txmq-peers";

    pub async fn channel(url: &str) -> Result<Channel> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to RabbitMQ at {url}"))?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        // The connection lives as long as the process.
        std::mem::forget(conn);
        Ok(ch)
    }

    /// A fresh durable quorum queue.
    pub async fn declare(url: &str) -> Result<()> {
        let ch = channel(url).await?;
        let _ = ch.queue_delete(QUEUE.into(), Default::default()).await;
        let ch = channel(url).await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        ch.queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        Ok(())
    }

    pub async fn produce(ch: Channel, body: Bytes, k: usize, from: Instant, stop: Instant) -> Result<Measured> {
        let props = BasicProperties::default().with_delivery_mode(2);
        closed_loop(k, from, stop, || {
            let (ch, body, props) = (ch.clone(), body.clone(), props.clone());
            async move {
                let confirm = ch
                    .basic_publish("".into(), QUEUE.into(), BasicPublishOptions::default(), &body, props)
                    .await?
                    .await?;
                anyhow::ensure!(confirm.is_ack(), "not confirmed: {confirm:?}");
                Ok(())
            }
        })
        .await
    }
}

mod nats {
    use super::*;
    use async_nats::jetstream::{self, stream};

    pub const STREAM: &str = "TXMQPEERS";
    pub const SUBJECT: &str = "txmq-peers";

    pub async fn connect(url: &str) -> Result<jetstream::Context> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        Ok(jetstream::new(client))
    }

    /// A fresh stream with file storage.
    pub async fn declare(url: &str) -> Result<()> {
        let js = connect(url).await?;
        let _ = js.delete_stream(STREAM).await;
        js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the stream: {e}"))?;
        Ok(())
    }

    pub async fn produce(js: jetstream::Context, body: Bytes, k: usize, from: Instant, stop: Instant) -> Result<Measured> {
        closed_loop(k, from, stop, || {
            let (js, body) = (js.clone(), body.clone());
            async move {
                js.publish(SUBJECT, body)
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?
                    .await
                    .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                Ok(())
            }
        })
        .await
    }
}
