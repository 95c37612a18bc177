//! Decoding and encoding of the two hottest frames without serde: a send
//! request and its successful answer.
//!
//! Every send a broker takes is a `Request::Send` frame, and every answer
//! a producer waits for is a `Response::Send`. Decoded through serde, each
//! MessagePack value goes through rmp-serde's generic dispatch; read here,
//! each is one match on its marker byte. This reader takes only the shape
//! rmp-serde writes for these frames (externally tagged enums as a
//! one-entry map keyed by the variant's name, structs as arrays, ids and
//! bodies as `bin`, unsigned integers in their unsigned encodings), in any
//! width of marker rmp-serde reads, and gives up on anything else (a struct
//! as a map, a variant by its index, a signed integer, ...), which then
//! goes through serde as before: a frame decodes to the same value either
//! way, and errors are always serde's.
//!
//! The writer writes these two frames byte for byte as rmp-serde does
//! (the smallest marker for each length and integer), so a peer cannot
//! tell which wrote a frame; every other frame goes through serde.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use crate::frame::Frame;
use crate::gather::Gather;
use crate::message::{Message, MsgId};
use crate::request::{ProducerStamp, Request, Response, SendRequest, SendResult, SendStatus};

/// A frame of one of the two shapes, decoded; `None` for any other frame
/// or any byte off the shape. `frame`: the buffer `body` is a slice of,
/// when message bodies are to share it (see
/// [`FrameCodec::with_shared_bodies`](crate::FrameCodec::with_shared_bodies));
/// bodies outside it are copied.
pub(crate) fn decode(body: &[u8], frame: Option<&Bytes>) -> Option<Frame> {
    let mut r = Reader { buf: body, frame };
    let decoded = r.frame()?;
    // Trailing bytes: left to serde.
    r.buf.is_empty().then_some(decoded)
}

/// What the start of a frame body says of the request it holds (for a
/// frame too large to read whole).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Envelope {
    /// A request with this id.
    Request(u64),
    /// Not a request, or not in the shape rmp-serde writes.
    Other,
    /// Too few bytes to tell.
    Short,
}

/// Bytes of a body that always tell [`Envelope`]: a one-entry map, the
/// string `Request`, a two-element array and a `u64` take at most 19.
pub(crate) const ENVELOPE_LEN: usize = 19;

/// What the body starting with `prefix` holds ([`Envelope`]). A request is
/// recognised in the one shape rmp-serde writes, `{"Request": [id, ...]}`
/// byte for byte, so that the answer depends only on the bytes there, not
/// on how reads cut them: `Short` while they are a start of that shape,
/// then `Request` or `Other` for good.
pub(crate) fn envelope(prefix: &[u8]) -> Envelope {
    // How a request's body starts.
    const HEAD: &[u8] = b"\x81\xa7Request\x92";
    if prefix.len() < HEAD.len() {
        return if HEAD.starts_with(prefix) {
            Envelope::Short
        } else {
            Envelope::Other
        };
    }
    if !prefix.starts_with(HEAD) {
        return Envelope::Other;
    }
    let mut r = Reader {
        buf: &prefix[HEAD.len()..],
        frame: None,
    };
    match r.u64() {
        Some(id) => Envelope::Request(id),
        // Cut short in the id (a u64 takes at most 9 bytes).
        None if prefix.len() < ENVELOPE_LEN => Envelope::Short,
        None => Envelope::Other,
    }
}

/// Items reserved ahead of reading them, at most.
const MAX_RESERVED: usize = 1024;

struct Reader<'a> {
    buf: &'a [u8],
    frame: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn frame(&mut self) -> Option<Frame> {
        self.map1()?;
        match self.str()? {
            "Request" => {
                self.array(2)?;
                let id = self.u64()?;
                self.map1()?;
                self.expect_str("Send")?;
                Some(Frame::Request(id, Request::Send(self.send_request()?)))
            }
            "Response" => {
                self.array(2)?;
                let id = self.u64()?;
                self.map1()?;
                self.expect_str("Ok")?;
                self.map1()?;
                self.expect_str("Send")?;
                Some(Frame::Response(id, Ok(Response::Send(self.send_result()?))))
            }
            _ => None,
        }
    }

    fn send_request(&mut self) -> Option<SendRequest> {
        // `producer` is `#[serde(default)]`: it may be left out.
        let fields = self.array_len()?;
        if !(2..=3).contains(&fields) {
            return None;
        }
        let queue = self.u32()?;
        // A message takes more than 20 bytes.
        let messages = self.list(20, Self::message)?;
        let producer = match fields {
            3 if self.nil() => None,
            3 => {
                self.array(3)?;
                Some(ProducerStamp {
                    producer_id: self.u64()?,
                    token: self.u64()?,
                    sequence: self.u64()?,
                })
            }
            _ => None,
        };
        Some(SendRequest {
            queue,
            messages,
            producer,
        })
    }

    fn message(&mut self) -> Option<Message> {
        self.array(7)?;
        let msg_id = self.msg_id()?;
        let topic = self.str()?.to_string();
        let key = self.opt_string()?;
        let tag = self.opt_string()?;
        let mut properties = BTreeMap::new();
        for _ in 0..self.map_len()? {
            let k = self.str()?.to_string();
            let v = self.str()?.to_string();
            // serde's map visitor keeps the last of a repeated key too.
            properties.insert(k, v);
        }
        let body = self.body()?;
        let born_timestamp = self.u64()?;
        Some(Message {
            msg_id,
            topic,
            key,
            tag,
            properties,
            body,
            born_timestamp,
        })
    }

    fn send_result(&mut self) -> Option<SendResult> {
        // `duplicate` is `#[serde(default)]`: it may be left out.
        let fields = self.array_len()?;
        if !(4..=5).contains(&fields) {
            return None;
        }
        let status = match self.str()? {
            "SendOk" => SendStatus::SendOk,
            "FlushDiskTimeout" => SendStatus::FlushDiskTimeout,
            "FlushSlaveTimeout" => SendStatus::FlushSlaveTimeout,
            "SlaveNotAvailable" => SendStatus::SlaveNotAvailable,
            _ => return None,
        };
        let queue = self.u32()?;
        let first_offset = self.u64()?;
        // An id takes 18 bytes.
        let msg_ids = self.list(18, Self::msg_id)?;
        let duplicate = match fields {
            5 => match self.byte()? {
                0xc2 => false,
                0xc3 => true,
                _ => return None,
            },
            _ => false,
        };
        Some(SendResult {
            status,
            queue,
            first_offset,
            msg_ids,
            duplicate,
        })
    }

    /// An array of items of at least `min_size` bytes each: a count
    /// beyond what the bytes left can hold cannot be real, and must not
    /// size an allocation.
    fn list<T>(
        &mut self,
        min_size: usize,
        mut item: impl FnMut(&mut Self) -> Option<T>,
    ) -> Option<Vec<T>> {
        let n = self.array_len()?;
        if n > self.buf.len() / min_size {
            return None;
        }
        // Reserved for at most what a real batch holds: junk behind a
        // large count fails before it costs more (serde caps it likewise).
        let mut items = Vec::with_capacity(n.min(MAX_RESERVED));
        for _ in 0..n {
            items.push(item(self)?);
        }
        Some(items)
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    /// An unsigned integer (positive fixint, uint 8 to 64).
    fn u64(&mut self) -> Option<u64> {
        match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            _ => None,
        }
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }

    fn nil(&mut self) -> bool {
        if self.buf.first() == Some(&0xc0) {
            self.buf = &self.buf[1..];
            return true;
        }
        false
    }

    /// The length of an array or map: a fix marker (`fix` in the high
    /// nibble, the length in the low one), or the 16-bit marker `wide`
    /// or the 32-bit one after it, followed by the length.
    fn len_of(&mut self, fix: u8, wide: u8) -> Option<usize> {
        match self.byte()? {
            b if b & 0xf0 == fix => Some(usize::from(b & 0x0f)),
            b if b == wide => Some(self.be(2)? as usize),
            b if b == wide + 1 => Some(self.be(4)? as usize),
            _ => None,
        }
    }

    fn array_len(&mut self) -> Option<usize> {
        self.len_of(0x90, 0xdc)
    }

    fn array(&mut self, len: usize) -> Option<()> {
        (self.array_len()? == len).then_some(())
    }

    fn map_len(&mut self) -> Option<usize> {
        self.len_of(0x80, 0xde)
    }

    fn map1(&mut self) -> Option<()> {
        (self.map_len()? == 1).then_some(())
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return None,
        };
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn expect_str(&mut self, want: &str) -> Option<()> {
        (self.str()? == want).then_some(())
    }

    fn opt_string(&mut self) -> Option<Option<String>> {
        if self.nil() {
            return Some(None);
        }
        Some(Some(self.str()?.to_string()))
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            0xc4 => self.be(1)? as usize,
            0xc5 => self.be(2)? as usize,
            0xc6 => self.be(4)? as usize,
            _ => return None,
        };
        self.take(len)
    }

    fn msg_id(&mut self) -> Option<MsgId> {
        self.bin()?.try_into().ok().map(MsgId)
    }

    /// A message body: a slice of the frame when bodies share it, else a
    /// copy (as [`crate::codec::shared_body`] does).
    fn body(&mut self) -> Option<Bytes> {
        let bytes = self.bin()?;
        Some(crate::codec::share_or_copy(self.frame, bytes))
    }
}

/// Writes `frame` as rmp-serde does, when it is a send or a send's
/// successful answer; false (nothing written) for any other frame.
pub(crate) fn encode(frame: &Frame, dst: &mut BytesMut) -> bool {
    let dst = &mut Gather::new(dst);
    match frame {
        Frame::Request(id, Request::Send(send)) => {
            map1(dst, "Request");
            array_len(dst, 2);
            uint(dst, *id);
            map1(dst, "Send");
            send_request(dst, send);
        }
        Frame::Response(id, Ok(Response::Send(result))) => {
            map1(dst, "Response");
            array_len(dst, 2);
            uint(dst, *id);
            map1(dst, "Ok");
            map1(dst, "Send");
            send_result(dst, result);
        }
        _ => return false,
    }
    // What is still gathered goes in as `dst` is dropped.
    true
}

// The structs are taken apart field by field, without `..`: a field added
// to one of them does not compile here until it is written too.
fn send_request(dst: &mut Gather<'_>, send: &SendRequest) {
    let SendRequest {
        queue,
        messages,
        producer,
    } = send;
    array_len(dst, 3);
    uint(dst, u64::from(*queue));
    array_len(dst, messages.len());
    for m in messages {
        let Message {
            msg_id,
            topic,
            key,
            tag,
            properties,
            body,
            born_timestamp,
        } = m;
        array_len(dst, 7);
        bin(dst, &msg_id.0);
        str(dst, topic);
        opt_str(dst, key.as_deref());
        opt_str(dst, tag.as_deref());
        len(dst, properties.len(), 0x80, 0xde);
        for (k, v) in properties {
            str(dst, k);
            str(dst, v);
        }
        bin(dst, body);
        uint(dst, *born_timestamp);
    }
    match producer {
        None => dst.byte(0xc0),
        Some(ProducerStamp {
            producer_id,
            token,
            sequence,
        }) => {
            array_len(dst, 3);
            uint(dst, *producer_id);
            uint(dst, *token);
            uint(dst, *sequence);
        }
    }
}

fn send_result(dst: &mut Gather<'_>, result: &SendResult) {
    let SendResult {
        status,
        queue,
        first_offset,
        msg_ids,
        duplicate,
    } = result;
    array_len(dst, 5);
    str(
        dst,
        match status {
            SendStatus::SendOk => "SendOk",
            SendStatus::FlushDiskTimeout => "FlushDiskTimeout",
            SendStatus::FlushSlaveTimeout => "FlushSlaveTimeout",
            SendStatus::SlaveNotAvailable => "SlaveNotAvailable",
        },
    );
    uint(dst, u64::from(*queue));
    uint(dst, *first_offset);
    array_len(dst, msg_ids.len());
    for id in msg_ids {
        bin(dst, &id.0);
    }
    dst.byte(if *duplicate { 0xc3 } else { 0xc2 });
}

/// An externally tagged variant's one-entry map and its name.
fn map1(dst: &mut Gather<'_>, variant: &str) {
    dst.byte(0x81);
    str(dst, variant);
}

/// `n` after the marker of the smallest width that holds it; `markers`
/// are those of 8, 16, 32 and 64 bits, 0 for a width the type has not.
/// (A length past 32 bits, which rmp-serde writes otherwise, cannot be in
/// a frame: the codec refuses any frame over its maximum, far below.)
fn sized(dst: &mut Gather<'_>, n: u64, markers: [u8; 4]) {
    let [m8, m16, m32, m64] = markers;
    if m8 != 0 && n <= u64::from(u8::MAX) {
        dst.byte(m8);
        dst.byte(n as u8);
    } else if n <= u64::from(u16::MAX) {
        dst.byte(m16);
        dst.bytes(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) || m64 == 0 {
        dst.byte(m32);
        dst.bytes(&(n as u32).to_be_bytes());
    } else {
        dst.byte(m64);
        dst.bytes(&n.to_be_bytes());
    }
}

/// A length: in the marker's low nibble below 16 (`fix`), else after the
/// 16-bit marker `wide` or the 32-bit one after it.
fn len(dst: &mut Gather<'_>, n: usize, fix: u8, wide: u8) {
    match n {
        0..16 => dst.byte(fix | n as u8),
        _ => sized(dst, n as u64, [0, wide, wide + 1, 0]),
    }
}

fn array_len(dst: &mut Gather<'_>, n: usize) {
    len(dst, n, 0x90, 0xdc);
}

fn uint(dst: &mut Gather<'_>, v: u64) {
    match v {
        0..0x80 => dst.byte(v as u8),
        _ => sized(dst, v, [0xcc, 0xcd, 0xce, 0xcf]),
    }
}

fn str(dst: &mut Gather<'_>, s: &str) {
    match s.len() {
        n @ 0..32 => dst.byte(0xa0 | n as u8),
        n => sized(dst, n as u64, [0xd9, 0xda, 0xdb, 0]),
    }
    dst.bytes(s.as_bytes());
}

fn opt_str(dst: &mut Gather<'_>, s: Option<&str>) {
    match s {
        None => dst.byte(0xc0),
        Some(s) => str(dst, s),
    }
}

fn bin(dst: &mut Gather<'_>, b: &[u8]) {
    sized(dst, b.len() as u64, [0xc4, 0xc5, 0xc6, 0]);
    dst.bytes(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoded, FrameCodec};
    use crate::WireError;
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;

    fn body_of(frame: &Frame) -> Bytes {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(frame, &mut buf)
            .expect("encodes");
        Bytes::from(buf).slice(4..)
    }

    fn serde_decode(body: &[u8]) -> Frame {
        match crate::codec::decode_body(body) {
            Ok(Decoded::Frame(f)) => f,
            other => panic!("serde does not decode it: {other:?}"),
        }
    }

    /// Sends and answers of many shapes: the fast reader takes each, and
    /// gets what serde gets, with bodies shared or copied.
    #[test]
    fn every_send_and_answer_decodes_as_serde_decodes_it() {
        let mut frames = Vec::new();
        for n in [0usize, 1, 2, 17] {
            for variant in 0..4u64 {
                let messages: Vec<Message> = (0..n)
                    .map(|i| {
                        let size = [0usize, 1, 31, 300, 70_000][(i + variant as usize) % 5];
                        let mut m = Message::new(
                            ["t", "orders", &"x".repeat(40), &"é".repeat(200)][i % 4],
                            vec![i as u8; size],
                        );
                        if (i + variant as usize).is_multiple_of(2) {
                            m = m.with_key(format!("key-{i}"));
                        }
                        if variant % 2 == 1 {
                            m = m.with_tag("tag-a");
                        }
                        for p in 0..(i % 3) {
                            m = m.with_property(format!("p{p}"), "v".repeat(p * 20));
                        }
                        m.born_timestamp = [0, 127, 128, 65_535, u64::MAX][i % 5];
                        m
                    })
                    .collect();
                let producer = (variant >= 2).then_some(ProducerStamp {
                    producer_id: [1, 300, 1 << 40][n % 3],
                    token: u64::MAX - variant,
                    sequence: variant * 1_000_000,
                });
                frames.push(Frame::Request(
                    variant * 1_000_000_007,
                    Request::Send(SendRequest {
                        queue: [0, 255, 65_536, u32::MAX][variant as usize],
                        messages,
                        producer,
                    }),
                ));
                for status in [
                    SendStatus::SendOk,
                    SendStatus::FlushDiskTimeout,
                    SendStatus::FlushSlaveTimeout,
                    SendStatus::SlaveNotAvailable,
                ] {
                    frames.push(Frame::Response(
                        variant,
                        Ok(Response::Send(SendResult {
                            status,
                            queue: variant as u32,
                            first_offset: variant << 33,
                            msg_ids: (0..n).map(|_| MsgId::generate()).collect(),
                            duplicate: variant % 2 == 1,
                        })),
                    ));
                }
            }
        }
        for frame in &frames {
            let body = body_of(frame);
            assert_eq!(serde_decode(&body), *frame);
            let copied = decode(&body, None).expect("the fast reader takes it");
            assert_eq!(copied, *frame);
            let shared = decode(&body, Some(&body)).expect("the fast reader takes it");
            assert_eq!(shared, *frame);
            if let Frame::Request(_, Request::Send(s)) = &shared {
                let range = body.as_ptr_range();
                for m in s.messages.iter().filter(|m| !m.body.is_empty()) {
                    assert!(range.contains(&m.body.as_ptr()), "a shared body is a copy");
                }
            }
        }
    }

    /// The writer writes sends and their answers byte for byte as
    /// rmp-serde does, at every boundary of a marker's width.
    #[test]
    fn sends_and_answers_are_written_as_rmp_serde_writes_them() {
        const INTS: [u64; 11] = [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX,
        ];
        const LENS: [usize; 8] = [0, 1, 15, 16, 31, 32, 255, 256];
        const WIDE: [usize; 2] = [65_535, 65_536];
        let message = |topic: usize, body: usize, props: usize, stamp: u64| {
            let mut m = Message::new("t".repeat(topic.max(1)), vec![7u8; body]);
            m.born_timestamp = stamp;
            for p in 0..props {
                m = m.with_property(format!("k{p}"), "v".repeat(p % 40));
            }
            m
        };
        let mut frames = Vec::new();
        for (i, &v) in INTS.iter().enumerate() {
            for &n in LENS.iter().chain(&WIDE) {
                let mut m = message(n, n, n % 17, v);
                m.key = (i % 2 == 0).then(|| "k".repeat(n));
                m.tag = (i % 3 == 0).then(|| "é".repeat(n / 2));
                frames.push(Frame::Request(
                    v,
                    Request::Send(SendRequest {
                        queue: u32::try_from(v).unwrap_or(u32::MAX),
                        messages: vec![m],
                        producer: (i % 2 == 1).then_some(ProducerStamp {
                            producer_id: v,
                            token: INTS[(i + 3) % INTS.len()],
                            sequence: INTS[(i + 7) % INTS.len()],
                        }),
                    }),
                ));
            }
            for &n in LENS.iter().chain(&WIDE) {
                frames.push(Frame::Response(
                    v,
                    Ok(Response::Send(SendResult {
                        status: [
                            SendStatus::SendOk,
                            SendStatus::FlushDiskTimeout,
                            SendStatus::FlushSlaveTimeout,
                            SendStatus::SlaveNotAvailable,
                        ][i % 4],
                        queue: u32::try_from(v).unwrap_or(0),
                        first_offset: v,
                        msg_ids: (0..n).map(|_| MsgId::generate()).collect(),
                        duplicate: i % 2 == 0,
                    })),
                ));
            }
        }
        for n in LENS.iter().chain(&WIDE) {
            frames.push(Frame::Request(
                1,
                Request::Send(SendRequest {
                    queue: 3,
                    messages: (0..*n).map(|i| message(1, i % 3, 0, 5)).collect(),
                    producer: None,
                }),
            ));
        }
        for props in [300, 65_536] {
            frames.push(Frame::Request(
                2,
                Request::Send(SendRequest {
                    queue: 0,
                    messages: vec![message(2, 70_000, props, 9)],
                    producer: None,
                }),
            ));
        }
        for frame in &frames {
            let mut fast = BytesMut::new();
            assert!(
                encode(frame, &mut fast),
                "the writer takes every send and answer"
            );
            let serde = rmp_serde::to_vec(frame).expect("encodes");
            if fast[..] != serde[..] {
                let at = fast.iter().zip(&serde).take_while(|(a, b)| a == b).count();
                panic!(
                    "written otherwise than serde writes it, from byte {at}: {:x?} against {:x?}",
                    &fast[at..(at + 8).min(fast.len())],
                    &serde[at..(at + 8).min(serde.len())]
                );
            }
            assert_eq!(body_of(frame), serde, "the codec writes it as serde does");
        }
        // Any other frame is left to serde, and nothing is written.
        for other in [
            Frame::Request(2, Request::Ping(crate::request::Ping {})),
            Frame::Response(3, Err(WireError::new(crate::ErrorCode::Busy, "busy"))),
            Frame::Response(4, Ok(Response::Ping(crate::request::Pong {}))),
        ] {
            let mut buf = BytesMut::new();
            assert!(!encode(&other, &mut buf));
            assert!(buf.is_empty());
        }
    }

    /// Bodies are shared only with the buffer they are in: given another
    /// one, the reader copies them.
    #[test]
    fn bodies_outside_the_given_buffer_are_copied() {
        let send = Frame::Request(
            1,
            Request::Send(SendRequest {
                queue: 1,
                messages: vec![Message::new("t", vec![9u8; 100])],
                producer: None,
            }),
        );
        let body = body_of(&send);
        let elsewhere = Bytes::from(vec![0u8; 10]);
        let got = decode(&body, Some(&elsewhere)).expect("decodes");
        assert_eq!(got, send);
        let Frame::Request(_, Request::Send(s)) = got else {
            panic!("not a send");
        };
        assert!(!body.as_ptr_range().contains(&s.messages[0].body.as_ptr()));
    }

    /// Frames of other kinds, and sends in a shape rmp-serde does not
    /// write, are left to serde: the fast reader takes none of them.
    #[test]
    fn anything_off_the_shape_is_left_to_serde() {
        let send = Frame::Request(
            1,
            Request::Send(SendRequest {
                queue: 1,
                messages: vec![Message::new("t", "b")],
                producer: None,
            }),
        );
        let good = body_of(&send);
        assert!(decode(&good, None).is_some());
        let others = [
            Frame::Request(2, Request::Ping(crate::request::Ping {})),
            Frame::Response(3, Err(WireError::new(crate::ErrorCode::Busy, "busy"))),
            Frame::Response(4, Ok(Response::Ping(crate::request::Pong {}))),
        ];
        for f in &others {
            assert!(decode(&body_of(f), None).is_none(), "{f:?}");
        }
        // The same send in other encodings serde reads: a struct as a
        // map, and the queue as a signed integer.
        let named = rmp_serde::to_vec_named(&send).expect("encodes");
        assert!(decode(&named, None).is_none());
        assert_eq!(serde_decode(&named), send);
        let queue_at = good
            .windows(3)
            .position(|w| w == [0x93, 0x01, 0x91] || w == [0x92, 0x01, 0x91])
            .expect("the send's fields")
            + 1;
        let mut signed = good.to_vec();
        signed.splice(queue_at..=queue_at, [0xd0, 0x01]);
        assert!(decode(&signed, None).is_none());
        assert_eq!(serde_decode(&signed), send);
        // Trailing bytes, and every truncation of a good frame.
        let mut longer = good.to_vec();
        longer.push(0xc0);
        assert!(decode(&longer, None).is_none());
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], None).is_none(), "cut at {cut}");
        }
        // Each single byte changed: whatever the fast reader still takes,
        // serde decodes to the same frame.
        for i in 0..good.len() {
            for b in [0x00, 0x7f, 0x80, 0xa1, 0xc0, 0xc4, 0xcf, 0xd0, 0xdc, 0xff] {
                let mut bad = good.to_vec();
                bad[i] = b;
                if let Some(fast) = decode(&bad, None) {
                    assert_eq!(serde_decode(&bad), fast, "byte {i} set to {b:#x}");
                }
            }
        }
    }
}
