//! Fuzz-style property tests of the commit-log record codec
//! (`store::record`): whatever bytes a segment holds, `check` and `decode`
//! answer without panicking, encoded records come back as written, and
//! damage is always caught by the checksum (and so by `decode`). Bounded case counts (512 by
//! default; `PROPTEST_CASES` raises them).

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use txmq_broker::store::record::{
    check, decode, decode_unverified, encode, message_len, Check, RecordHead, RecordKind, Stamp,
    HEADER_LEN,
};
use txmq_protocol::{Message, MsgId};

fn kind() -> impl Strategy<Value = RecordKind> {
    prop_oneof![
        Just(RecordKind::Message),
        Just(RecordKind::OffsetCommit),
        Just(RecordKind::Half),
        Just(RecordKind::TxRollback),
        Just(RecordKind::TxCheck),
        Just(RecordKind::TxPark),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[A-Za-z0-9_.%-]{0,16}", 1 => any::<String>()]
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<[u8; 16]>(),
        text(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::collection::btree_map(text(), text(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..256),
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

fn head() -> impl Strategy<Value = RecordHead> {
    (
        kind(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u16>(),
        any::<Option<(u64, u64)>>(),
    )
        .prop_map(
            |(kind, queue, queue_offset, store_timestamp, aux, flags, stamp)| RecordHead {
                kind,
                queue,
                queue_offset,
                store_timestamp,
                aux,
                flags,
                stamp: stamp.map(|(producer_id, sequence)| Stamp {
                    producer_id,
                    sequence,
                }),
            },
        )
}

fn encoded(head: RecordHead, msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    encode(&mut buf, head, msg);
    buf
}

/// Runs both readers over `bytes` the way recovery and the read path do,
/// checking what they promise about lengths.
fn read_all_ways(bytes: &[u8]) {
    let c = check(bytes);
    if let Check::Valid(len) = c {
        assert!(len <= bytes.len() && len >= HEADER_LEN, "{c:?}");
    }
    let b = Bytes::copy_from_slice(bytes);
    for header_only in [false, true] {
        let verified = decode(&b, header_only);
        assert_eq!(
            verified.is_some(),
            matches!(c, Check::Valid(_)) && decode_unverified(&b, header_only).is_some(),
            "decode is check, then decode_unverified"
        );
        if let Some(rec) = decode_unverified(&b, header_only) {
            let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            assert!(
                rec.message.body.len() <= len,
                "the body lies within the record"
            );
        }
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(512)
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes where a record should be.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        read_all_ways(&bytes);
    }

    /// Bytes that pass the checksum but hold anything after the fixed
    /// header: what a buggy writer (or a CRC collision) would leave. `check`
    /// says valid; `decode` must still not panic or read past the record.
    #[test]
    fn checksummed_garbage_never_panics(
        k in kind(),
        rest in proptest::collection::vec(any::<u8>(), (HEADER_LEN + 14 - 10)..500),
        trailing in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let len = 10 + rest.len();
        let mut bytes = Vec::with_capacity(len + trailing.len());
        bytes.extend_from_slice(&(len as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.push(1);
        bytes.push(k as u8);
        bytes.extend_from_slice(&rest);
        let crc = crc32c::crc32c(&bytes[8..len]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&trailing);
        prop_assert_eq!(check(&bytes), Check::Valid(len));
        read_all_ways(&bytes);
    }

    /// Every record comes back as written, with its head.
    #[test]
    fn records_round_trip(h in head(), msg in message()) {
        let buf = encoded(h, &msg);
        let stamp_len = if h.stamp.is_some() { 16 } else { 0 };
        prop_assert_eq!(buf.len(), message_len(&msg) + stamp_len);
        prop_assert_eq!(check(&buf), Check::Valid(buf.len()));
        let rec = decode(&buf.clone().freeze(), false).expect("decodes");
        prop_assert_eq!(&rec.message, &msg);
        prop_assert_eq!(rec.stamp, h.stamp);
        prop_assert_eq!(
            (rec.kind, rec.queue, rec.queue_offset, rec.store_timestamp, rec.aux, rec.flags),
            (h.kind, h.queue, h.queue_offset, h.store_timestamp, h.aux, h.flags)
        );
    }

    /// Any burst of up to 4 damaged bytes is caught by the checksum (CRC32C
    /// detects every burst of 32 bits or less), and decoding the damaged
    /// record does not panic. Every cut is "truncated" or "corrupt".
    #[test]
    fn damage_and_cuts_are_always_caught(
        h in head(),
        msg in message(),
        at in any::<usize>(),
        burst in proptest::collection::vec(1u8.., 1..=4),
        cut in any::<usize>(),
    ) {
        let good = encoded(h, &msg);
        let mut bad = good.to_vec();
        let at = at % bad.len();
        for (i, x) in burst.iter().enumerate() {
            if let Some(b) = bad.get_mut(at + i) {
                *b ^= x;
            }
        }
        let c = check(&bad);
        prop_assert!(c != Check::Valid(good.len()), "damage at {} not caught: {:?}", at, c);
        read_all_ways(&bad);
        let bad_bytes = Bytes::copy_from_slice(&bad);
        prop_assert!(decode(&bad_bytes, false).is_none() || matches!(c, Check::Valid(_)));

        let cut = cut % good.len();
        let c = check(&good[..cut]);
        prop_assert!(
            matches!(c, Check::Truncated | Check::Corrupt) || (cut < 4 && c == Check::End),
            "cut {}: {:?}", cut, c
        );
        read_all_ways(&good[..cut]);
    }
}

/// A record's strings are arbitrary bytes on disk: invalid UTF-8 reads as
/// replacement characters, never a panic.
#[test]
fn invalid_utf8_in_a_record_reads_lossily() {
    let msg = Message {
        msg_id: MsgId([1; 16]),
        topic: "orders".into(),
        key: Some("kk".into()),
        tag: None,
        properties: BTreeMap::new(),
        body: Bytes::from_static(b"x"),
        born_timestamp: 0,
    };
    let head = RecordHead {
        stamp: None,
        kind: RecordKind::Message,
        queue: 0,
        queue_offset: 0,
        store_timestamp: 0,
        aux: 0,
        flags: 0,
    };
    let mut buf = encoded(head, &msg);
    // The topic's bytes follow its u16 length at HEADER_LEN.
    buf[HEADER_LEN + 2] = 0xff;
    let crc = crc32c::crc32c(&buf[8..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    let rec = decode(&buf.freeze(), false).expect("decodes");
    assert_eq!(rec.message.topic, "\u{fffd}rders");
}

/// Writes the seed corpus of the libFuzzer targets `record_decode` (one
/// record per file) and `recovery` (a segment's first bytes: messages, a
/// transaction's half messages and its commit group, an offset commit).
/// Run by hand after a change of the record layout:
/// `cargo test -p txmq-broker --test record_fuzz -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let msg = |n: u8, topic: &str| Message {
        msg_id: MsgId([n; 16]),
        topic: topic.into(),
        key: Some(format!("k{n}")),
        tag: (n % 2 == 1).then(|| "t".to_string()),
        properties: BTreeMap::from([("p".to_string(), n.to_string())]),
        body: Bytes::from(vec![b'a' + n; usize::from(n) * 3]),
        born_timestamp: u64::from(n),
    };
    let head = |kind, queue, queue_offset, aux, flags| RecordHead {
        stamp: None,
        kind,
        queue,
        queue_offset,
        store_timestamp: 1_700_000_000_000,
        aux,
        flags,
    };
    // A transaction's id is the position of its first half message: after
    // the first two records (91 and 93 bytes).
    const TX: u64 = 184;
    let mut segment = BytesMut::new();
    let records = [
        (head(RecordKind::Message, 0, 0, 0, 0), msg(1, "t")),
        (head(RecordKind::Message, 0, 1, 0, 0), msg(2, "t")),
        (head(RecordKind::Half, 0, 0, TX, 2), msg(3, "t")),
        (head(RecordKind::Half, 0, 0, TX, 2), msg(4, "t")),
        (head(RecordKind::TxCheck, 0, 0, TX, 0), msg(5, "t")),
        (head(RecordKind::Message, 0, 2, TX, 2), msg(3, "t")),
        (head(RecordKind::Message, 0, 3, TX, 2), msg(4, "t")),
        (head(RecordKind::OffsetCommit, 0, 2, 0, 0), msg(6, "t")),
    ];
    std::fs::create_dir_all(root.join("record_decode")).unwrap();
    std::fs::create_dir_all(root.join("recovery")).unwrap();
    for (i, (h, m)) in records.iter().enumerate() {
        let one = encoded(*h, m);
        if i == 2 {
            assert_eq!(segment.len() as u64, TX, "the first half message is at TX");
        }
        std::fs::write(root.join(format!("record_decode/record-{i}.bin")), &one).unwrap();
        segment.extend_from_slice(&one);
    }
    std::fs::write(root.join("recovery/segment-all.bin"), &segment).unwrap();
    std::fs::write(
        root.join("recovery/segment-torn.bin"),
        &segment[..segment.len() - 7],
    )
    .unwrap();
}
