//! Fuzz-style property tests of the frame codec, run by `cargo test` with a
//! bounded number of cases (512 each; `PROPTEST_CASES=100000` in the
//! environment raises them).
//!
//! What a connection reads is arbitrary: whatever bytes arrive, in whatever
//! pieces, the decoder must return frames, "not yet", or an error, never
//! panic or loop, and the pieces must not change the outcome. Valid frames
//! of every request kind must come back as sent. The seed corpus in
//! `tests/corpus/` (valid and broken frames) is replayed by
//! [`the_seed_corpus_decodes_as_labelled`].

use std::collections::BTreeMap;
use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use txmq_protocol::codec::{decode_body, CodecError, Decoded};
use txmq_protocol::*;

/// A small maximum so that arbitrary length prefixes are often in range.
const MAX: usize = 4096;

/// What decoding a byte stream gives, in a comparable form: the frames and
/// malformed frames in order, then how it ended.
#[derive(Debug, PartialEq)]
enum Item {
    Frame(Frame),
    Malformed {
        is_request: bool,
        id: u64,
    },
    /// The decoder refused the stream; the connection would close.
    Error(String),
    /// The stream ended inside a frame (or exactly after the last one when empty).
    Pending(usize),
}

/// Decodes everything in `buf` as one connection would: frames until "not
/// yet" or an error. Checks the decoder's contract on the way: "not yet"
/// leaves the bytes alone, and each item consumes at least its prefix.
fn drain(codec: &mut FrameCodec, buf: &mut BytesMut, out: &mut Vec<Item>) -> bool {
    loop {
        let before = buf.clone();
        match codec.decode(buf) {
            Ok(Some(d)) => {
                assert!(buf.len() + 4 <= before.len(), "a frame consumed its bytes");
                out.push(match d {
                    Decoded::Frame(f) => Item::Frame(f),
                    Decoded::Malformed { is_request, id, .. } => Item::Malformed { is_request, id },
                });
            }
            Ok(None) => {
                assert_eq!(*buf, before, "\"not yet\" consumes nothing");
                return true;
            }
            Err(e) => {
                out.push(Item::Error(error_kind(&e)));
                return false;
            }
        }
    }
}

fn error_kind(e: &CodecError) -> String {
    match e {
        CodecError::FrameTooLarge { len, max, .. } => format!("too large {len} {max}"),
        CodecError::Garbage(_) => "garbage".into(),
        CodecError::Io(_) => "io".into(),
        CodecError::Encode(_) => "encode".into(),
    }
}

/// Decodes `bytes` arriving in pieces cut at `cuts` (positions, any order).
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Item> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut codec = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    for cut in cuts {
        buf.extend_from_slice(&bytes[at..cut]);
        at = cut;
        if !drain(&mut codec, &mut buf, &mut out) {
            return out;
        }
    }
    out.push(Item::Pending(buf.len()));
    out
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
    let mut buf = BytesMut::new();
    for f in frames {
        codec.encode(f, &mut buf).expect("a valid frame encodes");
    }
    buf
}

// ---- strategies: every request kind and the common responses ----

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9_.%-]{0,12}",
        1 => any::<String>(),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<[u8; 16]>(),
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::collection::btree_map(text(), text(), 0..3),
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<u64>(),
    )
        .prop_map(|(id, topic, key, tag, properties, body, born)| Message {
            msg_id: MsgId(id),
            topic,
            key,
            tag,
            properties,
            body: Bytes::from(body),
            born_timestamp: born,
        })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Broker),
        Just(Role::Producer),
        Just(Role::TransactionProducer),
        Just(Role::Consumer),
        Just(Role::Admin),
    ]
}

fn topic_config() -> impl Strategy<Value = TopicConfig> {
    (text(), any::<u32>(), any::<u8>()).prop_map(|(name, queues, perm)| TopicConfig {
        name,
        queues,
        perm,
    })
}

fn request() -> impl Strategy<Value = Request> {
    let messages = || proptest::collection::vec(message(), 0..3);
    prop_oneof![
        (any::<u32>(), role(), text(), proptest::option::of(text())).prop_map(
            |(version, role, client_id, group)| Request::Hello(Hello {
                version,
                role,
                client_id,
                group
            })
        ),
        Just(Request::Ping(Ping {})),
        (
            text(),
            text(),
            text(),
            proptest::collection::vec(topic_config(), 0..3)
        )
            .prop_map(|(cluster, broker_name, addr, topics)| {
                Request::RegisterBroker(Box::new(RegisterBroker {
                    epoch: Default::default(),
                    cluster,
                    broker_name,
                    addr,
                    topics,
                    role: BrokerRole::Slave,
                }))
            }),
        (text(), text()).prop_map(|(broker_name, addr)| Request::UnregisterBroker(
            UnregisterBroker { broker_name, addr }
        )),
        text().prop_map(|topic| Request::GetRoute(GetRoute { topic })),
        Just(Request::GetCluster(GetCluster {})),
        Just(Request::ListTopics(ListTopics {})),
        topic_config().prop_map(|c| Request::CreateTopic(CreateTopic {
            topic: c.name,
            queues: c.queues,
            perm: c.perm
        })),
        (any::<u32>(), messages(), any::<Option<(u64, u64, u64)>>()).prop_map(
            |(queue, messages, stamp)| Request::Send(SendRequest {
                queue,
                messages,
                producer: stamp.map(|(producer_id, token, sequence)| ProducerStamp {
                    producer_id,
                    token,
                    sequence,
                }),
            })
        ),
        Just(Request::InitProducer(InitProducer {})),
        (
            text(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..3)
        )
            .prop_map(
                |(topic, queue, offset, max_messages, max_wait_ms, tag_filter)| Request::Pull(
                    Box::new(PullRequest {
                        topic,
                        queue,
                        offset,
                        max_messages,
                        max_wait_ms,
                        tag_filter,
                        owner: None,
                        epoch: 0,
                        after: None,
                        browse: false,
                    })
                )
            ),
        (
            text(),
            text(),
            proptest::collection::vec((text(), text()), 0..3),
            any::<bool>(),
            proptest::collection::vec((text(), any::<u32>()), 0..3)
        )
            .prop_map(|(group, client_id, subs, broadcast, held)| {
                Request::Heartbeat(Box::new(Heartbeat {
                    group,
                    client_id,
                    subscriptions: subs
                        .into_iter()
                        .map(|(topic, expression)| Subscription { topic, expression })
                        .collect(),
                    broadcast,
                    held: held
                        .into_iter()
                        .map(|(topic, queue)| QueueRef { topic, queue })
                        .collect(),
                }))
            }),
        (
            text(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(
                |(group, log_offset, delay_ms, max_reconsume_times, dead_letter)| {
                    Request::SendBack(Box::new(SendBack {
                        group,
                        log_offset,
                        delay_ms,
                        max_reconsume_times,
                        dead_letter,
                        msg_id: None,
                        message: None,
                    }))
                }
            ),
        (text(), text(), any::<u64>()).prop_map(|(group, topic, ts)| {
            Request::ResetOffset(ResetOffset {
                group,
                topic,
                to: OffsetTarget::Timestamp(ts),
            })
        }),
        (text(), text(), any::<u32>(), any::<u64>()).prop_map(|(group, topic, queue, offset)| {
            Request::CommitOffset(Box::new(CommitOffset {
                owner: Some(QueueOwner {
                    group: group.clone(),
                    client_id: topic.clone(),
                }),
                group,
                topic,
                queue,
                offset,
                forward_only: queue % 2 == 0,
                topic_generation: (queue % 3 == 0).then_some(offset),
            }))
        }),
        (text(), text(), any::<u32>()).prop_map(|(group, topic, queue)| {
            Request::QueryOffset(QueryOffset {
                group,
                topic,
                queue,
                stored_since_ms: None,
            })
        }),
        (
            text(),
            proptest::collection::vec((any::<u32>(), message()), 0..3),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(producer_group, halves, first_check_delay_ms, attempt)| {
                Request::PrepareTransaction(Box::new(PrepareTransaction {
                    producer: None,
                    offsets: Vec::new(),
                    producer_group,
                    messages: halves
                        .into_iter()
                        .map(|(queue, message)| HalfMessage { queue, message })
                        .collect(),
                    first_check_delay_ms,
                    attempt,
                }))
            }),
        (
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(any::<[u8; 16]>())
        )
            .prop_map(|(tx_id, commit, operator, msg_id)| {
                Request::EndTransaction(EndTransaction {
                    producer: None,
                    tx_id,
                    action: if commit {
                        TxAction::Commit
                    } else {
                        TxAction::Rollback
                    },
                    source: if operator {
                        TxSource::Operator
                    } else {
                        TxSource::Producer
                    },
                    msg_id: msg_id.map(MsgId),
                })
            }),
        (
            any::<u64>(),
            text(),
            text(),
            messages(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(tx_id, broker_name, producer_group, messages, checks, timeout_ms)| {
                    Request::CheckTransaction(Box::new(CheckTransaction {
                        tx_id,
                        broker_name,
                        producer_group,
                        messages,
                        checks,
                        timeout_ms,
                    }))
                }
            ),
        Just(Request::ListTransactions(ListTransactions::default())),
        Just(Request::GetStoreStats(GetStoreStats {})),
        (text(), signature()).prop_map(|(access_key, signature)| Request::Authenticate(
            Authenticate {
                access_key,
                signature
            }
        )),
    ]
}

/// A challenge or a signature: 32 bytes when well formed, any length on
/// the wire.
fn signature() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 32),
        proptest::collection::vec(any::<u8>(), 0..80),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    // Every known number, and numbers a newer peer may send (read as Unknown).
    (0u16..64).prop_map(ErrorCode::from_u16)
}

fn tx_info() -> impl Strategy<Value = TxInfo> {
    (
        any::<u64>(),
        proptest::collection::vec(any::<[u8; 16]>(), 0..3),
        proptest::collection::vec(text(), 0..2),
        text(),
        any::<u64>(),
        any::<u32>(),
        proptest::option::of(prop_oneof![
            Just(TxResolution::Commit),
            Just(TxResolution::Rollback),
            Just(TxResolution::Unknown)
        ]),
        proptest::option::of(text()),
    )
        .prop_map(
            |(tx_id, ids, topics, producer_group, age_ms, checks, last_check, last_error)| TxInfo {
                tx_id,
                msg_ids: ids.into_iter().map(MsgId).collect(),
                topics,
                producer_group,
                age_ms,
                checks,
                last_check,
                last_error,
                state: TxState::Parked,
            },
        )
}

fn response() -> impl Strategy<Value = Result<Response, WireError>> {
    prop_oneof![
        (error_code(), text()).prop_map(|(code, message)| Err(WireError { code, message })),
        Just(Ok(Response::Ping(Pong {}))),
        Just(Ok(Response::CommitOffset(Done {}))),
        (any::<u32>(), text(), proptest::option::of(signature())).prop_map(
            |(version, server, challenge)| Ok(Response::Hello(HelloOk {
                version,
                server,
                challenge
            }))
        ),
        (any::<u32>(), text()).prop_map(|(version, server)| Ok(Response::Authenticate(
            HelloOk::new(version, server)
        ))),
        (
            any::<bool>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<[u8; 16]>(), 0..4)
        )
            .prop_map(|(ok, queue, first_offset, ids)| {
                Ok(Response::Send(SendResult {
                    duplicate: false,
                    status: if ok {
                        SendStatus::SendOk
                    } else {
                        SendStatus::FlushDiskTimeout
                    },
                    queue,
                    first_offset,
                    msg_ids: ids.into_iter().map(MsgId).collect(),
                }))
            }),
        (
            proptest::collection::vec(
                (
                    message(),
                    any::<u32>(),
                    any::<u64>(),
                    any::<u64>(),
                    any::<u64>()
                ),
                0..3
            ),
            any::<u64>()
        )
            .prop_map(|(messages, next_offset)| Ok(Response::Pull(PullResult {
                messages: messages
                    .into_iter()
                    .map(
                        |(message, queue, queue_offset, log_offset, store_timestamp)| {
                            StoredMessage {
                                message,
                                queue,
                                queue_offset,
                                log_offset,
                                store_timestamp,
                            }
                        }
                    )
                    .collect(),
                next_offset,
                min_offset: 0,
                max_offset: next_offset,
                epoch: next_offset,
                topic_generation: next_offset / 2,
            }))),
        (text(), proptest::collection::vec(tx_info(), 0..3)).prop_map(
            |(broker_name, transactions)| Ok(Response::ListTransactions(Box::new(
                TransactionList {
                    broker_name,
                    matching: transactions.len() as u64,
                    transactions,
                    counters: TxCounters::default(),
                }
            )))
        ),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), request()).prop_map(|(id, r)| Frame::Request(id, r)),
        (any::<u64>(), response()).prop_map(|(id, r)| Frame::Response(id, r)),
    ]
}

/// A send request or its successful answer: the two frames the codec
/// reads without serde.
fn send_or_answer() -> impl Strategy<Value = Frame> {
    let stamp = proptest::option::of((any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(producer_id, token, sequence)| ProducerStamp {
            producer_id,
            token,
            sequence,
        },
    ));
    let status = prop_oneof![
        Just(SendStatus::SendOk),
        Just(SendStatus::FlushDiskTimeout),
        Just(SendStatus::FlushSlaveTimeout),
        Just(SendStatus::SlaveNotAvailable),
    ];
    prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(message(), 0..4),
            stamp
        )
            .prop_map(|(id, queue, messages, producer)| Frame::Request(
                id,
                Request::Send(SendRequest {
                    queue,
                    messages,
                    producer
                })
            )),
        (
            any::<u64>(),
            status,
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<[u8; 16]>(), 0..4),
            any::<bool>()
        )
            .prop_map(|(id, status, queue, first_offset, ids, duplicate)| {
                Frame::Response(
                    id,
                    Ok(Response::Send(SendResult {
                        status,
                        queue,
                        first_offset,
                        msg_ids: ids.into_iter().map(MsgId).collect(),
                        duplicate,
                    })),
                )
            }),
    ]
}

/// A piece of a byte stream: a valid frame, a well-framed random body, or
/// raw bytes (which may announce any length).
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => frame().prop_map(|f| encode_all(&[f]).to_vec()),
        2 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|body| {
            let mut b = (body.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(&body);
            b
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..16),
    ]
}

/// A valid frame's bytes with a few random edits.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(i, x)| Edit::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Edit::Set(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Edit::Insert(i, x)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match *edit {
        Edit::Flip(i, x) => bytes[i % n] ^= x,
        Edit::Set(i, x) => bytes[i % n] = x,
        Edit::Insert(i, x) => bytes.insert(i % (n + 1), x),
        Edit::Remove(i) => {
            bytes.remove(i % n);
        }
        Edit::Truncate(i) => bytes.truncate(i % n),
    }
}

fn config() -> ProptestConfig {
    // PROPTEST_CASES in the environment overrides this default.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(512)
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes: frames, "not yet" or an error, never a panic or a loop.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let out = decode_in_pieces(&bytes, &[]);
        prop_assert!(matches!(out.last(), Some(Item::Error(_) | Item::Pending(_))));
        let _ = decode_body(&bytes);
    }

    /// A stream of valid frames, framed noise and raw bytes decodes the same
    /// whole as cut into arbitrary pieces.
    #[test]
    fn pieces_decode_like_the_whole(
        chunks in proptest::collection::vec(chunk(), 0..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let bytes: Vec<u8> = chunks.concat();
        let whole = decode_in_pieces(&bytes, &[]);
        let pieces = decode_in_pieces(&bytes, &cuts);
        prop_assert_eq!(&whole, &pieces);
        // Byte by byte, the slowest a peer can be.
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        prop_assert_eq!(&whole, &decode_in_pieces(&bytes, &cuts));
    }

    /// Valid frames of every request kind come back exactly as sent, with
    /// nothing left over.
    #[test]
    fn valid_frames_round_trip(frames in proptest::collection::vec(frame(), 1..6)) {
        let bytes = encode_all(&frames);
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = bytes.clone();
        let mut out = Vec::new();
        prop_assert!(drain(&mut codec, &mut buf, &mut out));
        prop_assert!(buf.is_empty());
        let want: Vec<Item> = frames.into_iter().map(Item::Frame).collect();
        prop_assert_eq!(out, want);
    }

    /// A valid frame with random edits (flipped, set, inserted or removed
    /// bytes, a cut) decodes to something or to an error without panicking;
    /// an edit inside the body leaves the framing intact, so exactly one
    /// item (or an error) comes out and every byte is consumed.
    #[test]
    fn mutated_frames_never_panic(
        f in frame(),
        edits in proptest::collection::vec(edit(), 1..6),
        body_edit in (any::<usize>(), 1u8..),
    ) {
        let good = encode_all(std::slice::from_ref(&f)).to_vec();
        let mut bad = good.clone();
        for e in &edits {
            apply(&mut bad, e);
        }
        let _ = decode_in_pieces(&bad, &[]);
        let _ = decode_in_pieces(&bad, &[bad.len() / 2]);

        let mut body_only = good.clone();
        let at = 4 + body_edit.0 % (good.len() - 4);
        body_only[at] ^= body_edit.1;
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::from(&body_only[..]);
        match codec.decode(&mut buf) {
            Ok(Some(_)) => prop_assert!(buf.is_empty()),
            Ok(None) => prop_assert!(false, "a whole frame is never \"not yet\""),
            Err(e) => prop_assert!(matches!(e, CodecError::Garbage(_)), "{}", e),
        }
    }

    /// Sends and their answers, valid or with random edits of their body:
    /// the codec (which reads these two shapes without serde) makes of
    /// each exactly what serde alone makes of it, with bodies shared or
    /// copied.
    #[test]
    fn sends_and_answers_decode_as_serde_alone_decodes_them(
        f in send_or_answer(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..4),
    ) {
        let good = encode_all(std::slice::from_ref(&f)).to_vec();
        let mut body = good[4..].to_vec();
        for &(i, x, how) in &edits {
            let n = body.len();
            match how {
                0 => body[i % n] = x,
                1 => body.insert(i % (n + 1), x),
                _ if n > 1 => { body.remove(i % n); }
                _ => {}
            }
        }
        let serde_alone = match decode_body(&body) {
            Ok(Decoded::Frame(f)) => Item::Frame(f),
            Ok(Decoded::Malformed { is_request, id, .. }) => Item::Malformed { is_request, id },
            Err(e) => Item::Error(error_kind(&e)),
        };
        if edits.is_empty() {
            prop_assert_eq!(&serde_alone, &Item::Frame(f.clone()));
        }
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        for shared in [false, true] {
            let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
            if shared {
                codec = codec.with_shared_bodies();
            }
            let mut buf = BytesMut::from(&framed[..]);
            let mut out = Vec::new();
            drain(&mut codec, &mut buf, &mut out);
            prop_assert_eq!(out.first(), Some(&serde_alone), "shared: {}", shared);
        }
    }

    /// A length prefix over the maximum is refused before the body is
    /// buffered: at once when the first byte after it cannot start a
    /// request; with the prefix alone, nothing is buffered for it (the few
    /// bytes that say whether a request's id follows are waited for, as
    /// they would be had the read cut them, so how reads cut the bytes
    /// never changes the answer).
    #[test]
    fn oversized_prefixes_are_refused_at_once(len in (MAX as u32 + 1)..) {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        prop_assert!(FrameCodec::new(MAX).decode(&mut buf).expect("waits").is_none());
        prop_assert!(buf.capacity() < 64, "{} reserved", buf.capacity());
        buf.put_u8(b'x');
        let err = FrameCodec::new(MAX).decode(&mut buf).expect_err("too large");
        prop_assert!(matches!(err, CodecError::FrameTooLarge { request: None, .. }), "{}", err);
    }

    /// Nested arrays and maps of any depth, behind a valid envelope: no
    /// stack overflow, whatever the depth.
    #[test]
    fn any_nesting_depth_is_safe(depth in 0usize..4000, map in any::<bool>(), id in any::<u64>()) {
        let mut body = rmp_serde::to_vec(&BTreeMap::from([("Request", (id, ()))])).unwrap();
        body.pop(); // the () at the end of [id, nil]
        for _ in 0..depth {
            body.extend_from_slice(if map { &[0x81, 0x00] } else { &[0x91] });
        }
        body.push(0xc0);
        let body = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || { let _ = decode_body(&body); })
            .unwrap()
            .join();
        prop_assert!(body.is_ok());
    }
}

/// What a corpus file's name says it is.
fn expected(name: &str) -> &'static str {
    for kind in ["frame", "malformed", "garbage", "too-large", "pending"] {
        if name.starts_with(kind) {
            return kind;
        }
    }
    panic!("corpus file {name} does not start with a known label")
}

/// Replays the seed corpus: each file is one connection's bytes, named by
/// what the decoder must make of it (`frame-*`: frames only; `malformed-*`:
/// a frame whose request id is answered; `garbage-*`, `too-large-*`: an
/// error; `pending-*`: not yet a frame). The same files seed a libFuzzer
/// run (see README, "Fuzzing and property tests").
#[test]
fn the_seed_corpus_decodes_as_labelled() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "the corpus has {} files", files.len());
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let out = decode_in_pieces(&bytes, &[]);
        // Cut in pieces, every file gives the same.
        assert_eq!(
            out,
            decode_in_pieces(&bytes, &[1, 5, bytes.len() / 2]),
            "{name}"
        );
        let last = out.last().unwrap();
        let ok = match expected(&name) {
            "frame" => {
                matches!(last, Item::Pending(0))
                    && out[..out.len() - 1]
                        .iter()
                        .all(|i| matches!(i, Item::Frame(_)))
            }
            "malformed" => out.iter().any(|i| matches!(i, Item::Malformed { .. })),
            "garbage" => matches!(last, Item::Error(e) if e == "garbage"),
            "too-large" => matches!(last, Item::Error(e) if e.starts_with("too large")),
            "pending" => matches!(last, Item::Pending(n) if *n > 0),
            _ => unreachable!(),
        };
        assert!(ok, "{name}: {out:?}");
    }
}

/// Writes the seed corpus. Run by hand after a change of the wire format:
/// `cargo test -p txmq-protocol --test codec_fuzz -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes tests/corpus; run by hand"]
fn write_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    std::fs::create_dir_all(&dir).unwrap();
    let hello = Frame::Request(
        1,
        Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Producer,
            client_id: "seed".into(),
            group: None,
        }),
    );
    let send = Frame::Request(
        2,
        Request::Send(SendRequest {
            producer: None,
            queue: 0,
            messages: vec![Message {
                msg_id: MsgId([7; 16]),
                topic: "orders".into(),
                key: Some("k1".into()),
                tag: Some("t1".into()),
                properties: BTreeMap::from([("a".into(), "b".into())]),
                body: Bytes::from_static(b"hello"),
                born_timestamp: 1_700_000_000_000,
            }],
        }),
    );
    let error = Frame::Response(
        3,
        Err(WireError::new(
            ErrorCode::UnknownTopic,
            "topic 'x' does not exist",
        )),
    );
    let framed = |body: &[u8]| {
        let mut b = (body.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(body);
        b
    };
    let raw_send = encode_all(std::slice::from_ref(&send)).to_vec();
    let mut nested = vec![0x81, 0xa7];
    nested.extend_from_slice(b"Request");
    nested.extend_from_slice(&[0x92, 0x01]);
    nested.extend(std::iter::repeat_n(0x91, 2000));
    nested.push(0xc0);
    let unknown_kind = rmp_serde::to_vec(&BTreeMap::from([(
        "Request",
        (9u64, BTreeMap::from([("Frobnicate", 1u8)])),
    )]))
    .unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "frame-hello.bin",
            encode_all(std::slice::from_ref(&hello)).to_vec(),
        ),
        (
            "frame-hello-send-error.bin",
            encode_all(&[hello.clone(), send.clone(), error]).to_vec(),
        ),
        (
            "frame-send-answer.bin",
            encode_all(&[Frame::Response(
                2,
                Ok(Response::Send(SendResult {
                    status: SendStatus::SendOk,
                    queue: 0,
                    first_offset: 41,
                    msg_ids: vec![MsgId([7; 16])],
                    duplicate: false,
                })),
            )])
            .to_vec(),
        ),
        ("malformed-unknown-kind.bin", framed(&unknown_kind)),
        ("garbage-c1.bin", framed(&[0xc1; 8])),
        ("garbage-empty-body.bin", framed(&[])),
        (
            "too-large-http.bin",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("garbage-deep-nesting.bin", framed(&nested)),
        // The largest prefix and a body that cannot be a request's.
        (
            "too-large-prefix.bin",
            [&u32::MAX.to_be_bytes()[..], b"x"].concat(),
        ),
        (
            "pending-half-send.bin",
            raw_send[..raw_send.len() / 2].to_vec(),
        ),
        ("pending-half-prefix.bin", raw_send[..2].to_vec()),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    write_authentication_seeds(&dir, &hello, &send);
}

/// The authentication frames' seeds: a hello answered with a challenge
/// and signed (here, and in the seeds of the `auth_handshake` fuzz target,
/// whose first byte picks how the rest is sent: 0 raw, 1 after a hello,
/// 2 after a hello and an `Authenticate` of key byte, length byte,
/// signature).
fn write_authentication_seeds(dir: &Path, hello: &Frame, send: &Frame) {
    let challenge = Frame::Response(
        1,
        Ok(Response::Hello(HelloOk {
            version: PROTOCOL_VERSION,
            server: "broker-a".into(),
            challenge: Some(vec![0x5a; 32]),
        })),
    );
    let authenticate = Frame::Request(
        2,
        Request::Authenticate(Authenticate {
            access_key: "app".into(),
            signature: vec![0xa5; 32],
        }),
    );
    let welcome = Frame::Response(
        2,
        Ok(Response::Authenticate(HelloOk::new(
            PROTOCOL_VERSION,
            "broker-a",
        ))),
    );
    let refused = Frame::Response(
        2,
        Err(WireError::new(
            ErrorCode::AuthenticationFailed,
            "authentication failed for access key 'app'",
        )),
    );
    let signature_not_bytes = rmp_serde::to_vec(&BTreeMap::from([(
        "Request",
        (2u64, BTreeMap::from([("Authenticate", ("app", 7u8))])),
    )]))
    .unwrap();
    let mut framed = (signature_not_bytes.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&signature_not_bytes);
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "frame-hello-challenge-authenticate.bin",
            encode_all(&[hello.clone(), challenge, authenticate.clone(), welcome]).to_vec(),
        ),
        (
            "frame-authenticate-refused.bin",
            encode_all(&[authenticate.clone(), refused]).to_vec(),
        ),
        ("malformed-authenticate-signature.bin", framed.clone()),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/auth_handshake");
    std::fs::create_dir_all(&fuzz).unwrap();
    let shaped = |shape: u8, parts: &[&[u8]]| {
        let mut b = vec![shape];
        parts.iter().for_each(|p| b.extend_from_slice(p));
        b
    };
    let authenticate = encode_all(std::slice::from_ref(&authenticate)).to_vec();
    let send = encode_all(std::slice::from_ref(send)).to_vec();
    let hello = encode_all(std::slice::from_ref(hello)).to_vec();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("raw-authenticate-first.bin", shaped(0, &[&authenticate])),
        ("raw-send-without-hello.bin", shaped(0, &[&send])),
        ("raw-two-hellos.bin", shaped(0, &[&hello, &hello, &send])),
        ("hello-then-send.bin", shaped(1, &[&send])),
        (
            "hello-then-garbage.bin",
            shaped(1, &[&[0, 0, 0, 8], &[0xc1; 8]]),
        ),
        ("hello-then-bad-signature-type.bin", shaped(1, &[&framed])),
        ("hello-then-hello.bin", shaped(1, &[&hello, &send])),
        (
            "authenticate-app-then-send.bin",
            shaped(2, &[&[0, 32], &[0xa5; 32], &send]),
        ),
        (
            "authenticate-unknown-key.bin",
            shaped(2, &[&[2, 32], &[7; 32]]),
        ),
        ("authenticate-empty.bin", shaped(2, &[&[3, 0]])),
        (
            "authenticate-short-signature-then-garbage.bin",
            shaped(2, &[&[1, 5], &[1, 2, 3, 4, 5], &[0xff; 12]]),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(fuzz.join(name), bytes).unwrap();
    }
}
