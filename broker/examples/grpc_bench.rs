//! Send throughput through txmq's RocketMQ 5 gRPC API (`--grpc-listen`),
//! to set beside `txmq bench produce` in the same window:
//!
//! ```text
//! cargo run --release -p txmq-broker --example grpc_bench -- \
//!     --grpc 127.0.0.1:8081 --topic bench --senders 16 --size 1024 --duration 10s
//! ```
//!
//! Each sender has its own HTTP/2 connection and one SendMessage in
//! flight, as `txmq bench produce --producers 16` has one connection and
//! one send in flight per producer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use txmq_broker::rocketmq_v2 as pb;

#[derive(Parser)]
struct Args {
    /// The broker's --grpc-listen address.
    #[arg(long)]
    grpc: String,
    #[arg(long, default_value = "bench")]
    topic: String,
    #[arg(long, default_value_t = 16)]
    senders: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Sent before counting starts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let body = vec![b'x'; args.size];
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..args.senders {
        let mut client = pb::messaging_service_client::MessagingServiceClient::connect(format!(
            "http://{}",
            args.grpc
        ))
        .await
        .expect("connects");
        let (topic, body, counting, stop) = (
            args.topic.clone(),
            body.clone(),
            counting.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let message = pb::Message {
                    topic: Some(pb::Resource {
                        resource_namespace: String::new(),
                        name: topic.clone(),
                    }),
                    user_properties: Default::default(),
                    system_properties: Some(pb::SystemProperties {
                        message_id: format!("01{:08X}{:024X}", s, n),
                        message_type: pb::MessageType::Normal as i32,
                        body_encoding: pb::Encoding::Identity as i32,
                        ..Default::default()
                    }),
                    body: body.clone(),
                };
                let mut request = tonic::Request::new(pb::SendMessageRequest {
                    messages: vec![message],
                });
                request
                    .metadata_mut()
                    .insert("x-mq-client-id", format!("grpc-bench-{s}").parse().unwrap());
                let started = Instant::now();
                let answer = client.send_message(request).await.expect("send answered");
                let status = answer.into_inner().status.unwrap_or_default();
                assert_eq!(status.code, pb::Code::Ok as i32, "{status:?}");
                if counting.load(Ordering::Relaxed) {
                    n += 1;
                    let _ = latencies.record(started.elapsed().as_micros() as u64);
                }
            }
            (n, latencies)
        }));
    }
    tokio::time::sleep(args.warmup).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut all = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for t in tasks {
        let (n, h) = t.await.expect("sender");
        total += n;
        all.add(h).unwrap();
    }
    println!(
        "grpc send: {} senders, {} B: {:.0} msg/s, p50 {} us, p99 {} us",
        args.senders,
        args.size,
        total as f64 / elapsed.as_secs_f64(),
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99)
    );
}
