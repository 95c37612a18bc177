//! Criterion micro-benchmarks of the broker's store, on a real temporary
//! directory: appends under async flush (one message, batches, many
//! appenders at once, many idempotent producers' stamped appends at once),
//! the message index's cost to an append (on against
//! off), group commit under sync flush with N concurrent
//! appenders, reads of 32 messages, and recovery of a 64 MiB log.
//!
//! Run with `cargo bench -p txmq-broker --bench store` (`-- --quick` for a
//! short run, or a filter such as `-- group_commit`). Results depend on the
//! disk (fdatasync latency dominates the sync-flush figures) and on the page
//! cache (recovery here reads a log that is still cached); they are for
//! comparing changes on one machine, never for CI to pass or fail on.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use txmq_broker::store::{Store, StoreConfig};
use txmq_broker::FlushMode;
use txmq_protocol::{Message, ProducerStamp};

const TOPIC: &str = "bench";
const QUEUES: u32 = 4;
const BODY_LEN: usize = 1024;

fn runtime() -> Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot start a tokio runtime: {e}"),
    }
}

fn config(dir: &Path, flush: FlushMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.flush = flush;
    c.segment_size = 64 << 20;
    c
}

fn open(dir: &Path, flush: FlushMode) -> Store {
    open_with(config(dir, flush))
}

fn open_with(config: StoreConfig) -> Store {
    let dir = config.dir.clone();
    match Store::open(config, &[(TOPIC.to_string(), QUEUES)]) {
        Ok(store) => store,
        Err(e) => panic!("cannot open the store in {}: {e}", dir.display()),
    }
}

fn tempdir() -> TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot create a temporary directory: {e}"),
    }
}

fn messages(n: usize) -> Vec<Message> {
    let body = Bytes::from(vec![0x5a; BODY_LEN]);
    (0..n)
        .map(|i| Message::new(TOPIC, body.clone()).with_key(format!("k{i}")))
        .collect()
}

/// As `txmq bench produce` sends them: no key.
fn unkeyed(n: usize) -> Vec<Message> {
    let body = Bytes::from(vec![0x5a; BODY_LEN]);
    (0..n).map(|_| Message::new(TOPIC, body.clone())).collect()
}

async fn append(store: &Store, queue: u32, batch: Vec<Message>) {
    if let Err(e) = store.append(TOPIC, queue, batch).await {
        panic!("append failed: {e}");
    }
}

/// Runs `iters` operations spread over `appenders` tasks, all in flight at
/// once (`task(a, n)`: appender `a`'s `n` operations, in order); returns the
/// wall time of the whole.
fn spread<F, Fut>(rt: &Runtime, appenders: u64, iters: u64, task: F) -> Duration
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..appenders)
            .map(|a| {
                // Spread the remainder so exactly `iters` operations are made.
                let n = iters / appenders + u64::from(a < iters % appenders);
                tokio::spawn(task(a, n))
            })
            .collect();
        for t in tasks {
            if let Err(e) = t.await {
                panic!("an appender failed: {e}");
            }
        }
    });
    started.elapsed()
}

/// `iters` single-message appends spread over `appenders` tasks.
fn concurrent_appends(rt: &Runtime, store: &Store, appenders: u64, iters: u64) -> Duration {
    let template = Arc::new(messages(1));
    spread(rt, appenders, iters, |a, n| {
        let (store, template) = (store.clone(), template.clone());
        async move {
            for _ in 0..n {
                append(&store, (a % u64::from(QUEUES)) as u32, template.to_vec()).await;
            }
        }
    })
}

/// `iters` single-message stamped appends (an idempotent producer's
/// sends, unkeyed as `txmq bench produce` sends them) spread over the
/// `producers` (id, token, next sequence), each writing one queue. The
/// sequences carry on across calls.
fn concurrent_stamped(
    rt: &Runtime,
    store: &Store,
    producers: &Arc<Vec<(u64, u64, AtomicU64)>>,
    iters: u64,
) -> Duration {
    let template = Arc::new(unkeyed(1));
    spread(rt, producers.len() as u64, iters, |a, n| {
        let (store, template, producers) = (store.clone(), template.clone(), producers.clone());
        async move {
            let (producer_id, token, next) = &producers[a as usize];
            for _ in 0..n {
                let stamp = ProducerStamp {
                    producer_id: *producer_id,
                    token: *token,
                    sequence: next.fetch_add(1, Ordering::Relaxed),
                };
                let queue = (a % u64::from(QUEUES)) as u32;
                let stored = store
                    .append_stamped(TOPIC, queue, template.to_vec(), Some(stamp), false)
                    .await;
                if let Err(e) = stored {
                    panic!("a stamped append failed: {e}");
                }
            }
        }
    })
}

/// Async flush: acknowledged once in the page cache.
fn append_async(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempdir();
    let store = open(dir.path(), FlushMode::Async);
    let mut group = c.benchmark_group("append_async_1KiB");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 16, 64] {
        let template = messages(batch);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("batch", batch), |b| {
            b.iter(|| rt.block_on(append(&store, 0, template.clone())));
        });
    }
    group.throughput(Throughput::Elements(1));
    for appenders in [16u64, 64] {
        group.bench_function(BenchmarkId::new("concurrent_appenders", appenders), |b| {
            b.iter_custom(|iters| concurrent_appends(&rt, &store, appenders, iters));
        });
    }
    // As idempotent producers send (each its own id): stamped, checked
    // and remembered by the producer table.
    let producers: Vec<(u64, u64, AtomicU64)> = (0..16)
        .map(|_| {
            let (id, token, _) = rt
                .block_on(store.init_producer(0))
                .unwrap_or_else(|e| panic!("no producer id: {e}"));
            (id, token, AtomicU64::new(0))
        })
        .collect();
    let producers = Arc::new(producers);
    group.bench_function(BenchmarkId::new("stamped_appenders", 16), |b| {
        b.iter_custom(|iters| concurrent_stamped(&rt, &store, &producers, iters));
    });
    group.finish();
    rt.block_on(store.shutdown());
}

/// What the message index costs an append of 64 messages (async flush):
/// the same appends with the index on and off, unkeyed (one entry per
/// message, as `txmq bench produce` sends) and keyed (two entries).
fn index_cost(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("index_cost_1KiB_batch_64");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(64));
    for (keys, template) in [("unkeyed", unkeyed(64)), ("keyed", messages(64))] {
        for index in [false, true] {
            let dir = tempdir();
            let mut config = config(dir.path(), FlushMode::Async);
            config.message_index = index;
            let store = open_with(config);
            let name = format!("{keys}/index_{}", if index { "on" } else { "off" });
            group.bench_function(name, |b| {
                b.iter(|| rt.block_on(append(&store, 0, template.clone())));
            });
            rt.block_on(store.shutdown());
        }
    }
    group.finish();
}

/// Sync flush: each append waits for an fdatasync covering it; concurrent
/// appenders share fdatasyncs (group commit), so appends/s grows with N.
fn group_commit(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempdir();
    let store = open(dir.path(), FlushMode::Sync);
    let mut group = c.benchmark_group("group_commit_sync_1KiB");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    for appenders in [1u64, 16, 64] {
        group.bench_function(BenchmarkId::new("appenders", appenders), |b| {
            b.iter_custom(|iters| concurrent_appends(&rt, &store, appenders, iters));
        });
    }
    group.finish();
    rt.block_on(store.shutdown());
}

/// Reads of 32 messages from a queue of 10,000, round the queue.
fn read(c: &mut Criterion) {
    const STORED: u64 = 10_000;
    const PER_READ: usize = 32;
    let rt = runtime();
    let dir = tempdir();
    let store = open(dir.path(), FlushMode::Async);
    rt.block_on(async {
        for _ in 0..STORED / 100 {
            append(&store, 0, messages(100)).await;
        }
    });
    let mut group = c.benchmark_group("read_1KiB");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(PER_READ as u64));
    let mut offset = 0u64;
    group.bench_function(BenchmarkId::new("messages", PER_READ), |b| {
        b.iter(|| {
            let r = match store.read(TOPIC, 0, offset, PER_READ, 1 << 20) {
                Ok(r) => r,
                Err(e) => panic!("read failed: {e}"),
            };
            offset = if r.next_offset + PER_READ as u64 > STORED {
                0
            } else {
                r.next_offset
            };
            black_box(r.messages.len())
        });
    });
    group.finish();
    rt.block_on(store.shutdown());
}

/// Opening a store with 64 MiB of log: after a clean shutdown (the
/// checkpoint covers everything; only its segment is re-verified), and with
/// the checkpoint removed (every record replayed and every queue rebuilt).
fn recovery(c: &mut Criterion) {
    const LOG_BYTES: usize = 64 << 20;
    let rt = runtime();
    let dir = tempdir();
    let mut config = config(dir.path(), FlushMode::Async);
    // Several segments, as a real log has.
    config.segment_size = 16 << 20;
    let topics = [(TOPIC.to_string(), QUEUES)];
    let open = || match Store::open(config.clone(), &topics) {
        Ok(store) => store,
        Err(e) => panic!("cannot open the store: {e}"),
    };
    let store = open();
    rt.block_on(async {
        let batches = LOG_BYTES / (BODY_LEN + 100) / 64;
        for i in 0..batches {
            append(&store, (i % QUEUES as usize) as u32, messages(64)).await;
        }
    });
    let log_bytes = store.log_end();
    rt.block_on(store.shutdown());

    let mut group = c.benchmark_group("recovery_64MiB");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Bytes(log_bytes));
    for (name, replay_all) in [("checkpointed", false), ("full_replay", true)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if replay_all {
                        let _ = std::fs::remove_file(dir.path().join("checkpoint"));
                    }
                    let started = Instant::now();
                    let store = open();
                    total += started.elapsed();
                    black_box(store.log_end());
                    rt.block_on(store.shutdown());
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    append_async,
    index_cost,
    group_commit,
    read,
    recovery
);
criterion_main!(benches);
