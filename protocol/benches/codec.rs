//! Criterion micro-benchmarks of the frame codec: what one request or
//! response costs to encode and decode, without any I/O.
//!
//! Four shapes that dominate a broker's traffic: a send of one 1 KiB
//! message, a batch send of 64 of them, the answer to a send, and a pull
//! result of 32 stored messages. Run with `cargo bench -p txmq-protocol --bench codec`
//! (`-- --quick` for a short run). Throughput is in bytes of encoded frame.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};
use txmq_protocol::codec::Decoded;
use txmq_protocol::{
    Frame, FrameCodec, Message, MsgId, PullResult, Request, Response, SendRequest, SendResult,
    SendStatus, StoredMessage,
};

const BODY_LEN: usize = 1024;

fn message(body: &Bytes, i: usize) -> Message {
    Message::new("bench-topic", body.clone())
        .with_key(format!("key-{i}"))
        .with_tag("tag-a")
}

fn send_frame(messages: usize) -> Frame {
    let body = Bytes::from(vec![0x5a; BODY_LEN]);
    Frame::Request(
        42,
        Request::Send(SendRequest {
            producer: None,
            queue: 3,
            messages: (0..messages).map(|i| message(&body, i)).collect(),
        }),
    )
}

fn pull_frame(messages: usize) -> Frame {
    let body = Bytes::from(vec![0xa5; BODY_LEN]);
    let stored = (0..messages)
        .map(|i| StoredMessage {
            message: message(&body, i),
            queue: 1,
            queue_offset: 1000 + i as u64,
            log_offset: 1 << 20 | (i as u64 * 1200),
            store_timestamp: 1_700_000_000_000 + i as u64,
        })
        .collect();
    Frame::Response(
        7,
        Ok(Response::Pull(PullResult {
            messages: stored,
            next_offset: 1000 + messages as u64,
            min_offset: 0,
            max_offset: 5000,
            epoch: 0,
            topic_generation: 0,
        })),
    )
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    if let Err(e) = FrameCodec::default().encode(frame, &mut buf) {
        panic!("the benchmark frame encodes: {e}");
    }
    buf
}

fn bench_frame(c: &mut Criterion, name: &str, frame: &Frame) {
    let wire = encoded(frame);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function("encode", |b| {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(wire.len() * 2);
        b.iter(|| {
            buf.clear();
            let r = codec.encode(black_box(frame), &mut buf);
            black_box((r.is_ok(), buf.len()))
        });
    });
    group.bench_function("decode", |b| {
        let mut codec = FrameCodec::default();
        b.iter_batched_ref(
            || wire.clone(),
            |buf| match codec.decode(buf) {
                Ok(Some(Decoded::Frame(f))) => black_box(f),
                other => panic!("the benchmark frame decodes: {other:?}"),
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_frame(c, "send_1x1KiB", &send_frame(1));
    bench_frame(c, "send_batch_64x1KiB", &send_frame(64));
    let answer = Frame::Response(
        42,
        Ok(Response::Send(SendResult {
            status: SendStatus::SendOk,
            queue: 3,
            first_offset: 1 << 30,
            msg_ids: vec![MsgId::generate()],
            duplicate: false,
        })),
    );
    bench_frame(c, "send_result_1", &answer);
    bench_frame(c, "pull_result_32x1KiB", &pull_frame(32));
}

criterion_group!(benches, codec);
criterion_main!(benches);
