//! The frame codec: a 4-byte big-endian length, then a MessagePack body.
//!
//! The same framing as `LengthDelimitedCodec` (4-byte big-endian length)
//! with an explicit maximum frame length. A
//! frame whose envelope decodes but whose body does not (an unknown request
//! kind, a wrongly typed field) is handed up as [`Decoded::Malformed`] so the
//! connection can answer it with an error; bytes that are not a frame at all
//! are an `Err` and the connection closes.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{Frame, FrameHeader};

/// Default maximum frame length: 8 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// Errors of the codec; all of them close the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Reading or writing the socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix announces more than the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced or encoded length.
        len: usize,
        /// The configured maximum.
        max: usize,
        /// The id of the request it holds, when the start of its body was
        /// read already and says so: the sender can be told.
        request: Option<u64>,
    },
    /// The body is not a MessagePack frame at all.
    #[error("garbage frame: {0}")]
    Garbage(String),
    /// Encoding a frame failed.
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

/// A decoded frame.
#[derive(Debug)]
pub enum Decoded {
    /// A well-formed frame.
    Frame(Frame),
    /// The envelope was readable but the body was not.
    Malformed {
        /// True when the malformed frame was a request (it should be answered).
        is_request: bool,
        /// The frame's id.
        id: u64,
        /// What failed to decode.
        error: String,
    },
}

/// Length-prefixed MessagePack frames with a maximum length.
#[derive(Debug)]
pub struct FrameCodec {
    max: usize,
    /// Length of the last frame decoded (its body).
    last_len: usize,
    /// Message bodies share the frame's buffer instead of a copy each.
    shared_bodies: bool,
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> FrameCodec {
        FrameCodec {
            max: max_frame_len,
            last_len: 0,
            shared_bodies: false,
        }
    }

    /// The longest frame taken (its body, in bytes).
    pub fn max_frame_len(&self) -> usize {
        self.max
    }

    /// Takes frames up to `max_frame_len` bytes from now on.
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max = max_frame_len;
    }

    /// The body length of the frame decoded last (what a request holds in
    /// memory while it is served).
    pub fn last_frame_len(&self) -> usize {
        self.last_len
    }

    /// Message bodies of the frames decoded share the frame's buffer (a
    /// slice of it) instead of being copied each into an allocation of its
    /// own: what a broker wants, which writes them to its log and drops
    /// them. A body kept keeps its whole frame alive, so a client that
    /// hands messages to application code does not ask for this.
    #[must_use]
    pub fn with_shared_bodies(mut self) -> FrameCodec {
        self.shared_bodies = true;
        self
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
    }
}

/// The deepest nesting of MessagePack arrays and maps a frame body may have.
///
/// The deepest real frame (a transaction list: frame, result, response,
/// list, transaction, message ids) nests about ten levels. Decoding recurses
/// once per level, and rmp-serde's own limit (1024) is deeper than a 2 MiB
/// thread stack lasts in a debug build: a peer could crash the process with
/// a few kilobytes of `[[[[...]]]]`.
pub const MAX_DEPTH: usize = 32;

thread_local! {
    /// The frame being decoded on this thread, when its message bodies are
    /// to share its buffer (see [`FrameCodec::with_shared_bodies`]).
    static FRAME: std::cell::RefCell<Option<bytes::Bytes>> = const { std::cell::RefCell::new(None) };
}

/// `bytes` as a slice of `frame` when they lie in it, else a copy.
pub(crate) fn share_or_copy(frame: Option<&bytes::Bytes>, bytes: &[u8]) -> bytes::Bytes {
    match frame {
        Some(frame)
            if frame.as_ptr_range().contains(&bytes.as_ptr())
                && bytes.as_ptr_range().end <= frame.as_ptr_range().end =>
        {
            frame.slice_ref(bytes)
        }
        _ => bytes::Bytes::copy_from_slice(bytes),
    }
}

/// Deserializes a message body: a slice of the frame being decoded when
/// the codec shares bodies and the bytes are the frame's own, else a copy.
pub(crate) fn shared_body<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<bytes::Bytes, D::Error> {
    struct Body;
    impl<'de> serde::de::Visitor<'de> for Body {
        type Value = bytes::Bytes;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_borrowed_bytes<E: serde::de::Error>(
            self,
            v: &'de [u8],
        ) -> Result<bytes::Bytes, E> {
            Ok(FRAME.with(|f| share_or_copy(f.borrow().as_ref(), v)))
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<bytes::Bytes, E> {
            Ok(bytes::Bytes::copy_from_slice(v))
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<bytes::Bytes, E> {
            Ok(bytes::Bytes::from(v))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bytes::Bytes, E> {
            Ok(bytes::Bytes::copy_from_slice(v.as_bytes()))
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<bytes::Bytes, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(bytes::Bytes::from(v))
        }
    }
    d.deserialize_byte_buf(Body)
}

fn from_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes one frame body (without its length prefix).
///
/// # Errors
/// [`CodecError::Garbage`] when not even the envelope (request or response,
/// and its id) can be read, or the body nests deeper than [`MAX_DEPTH`].
pub fn decode_body(body: &[u8]) -> Result<Decoded, CodecError> {
    match from_body::<Frame>(body) {
        Ok(f) => Ok(Decoded::Frame(f)),
        Err(e) => match from_body::<FrameHeader>(body) {
            Ok(FrameHeader::Request(id, _)) => Ok(Decoded::Malformed {
                is_request: true,
                id,
                error: e.to_string(),
            }),
            Ok(FrameHeader::Response(id, _)) => Ok(Decoded::Malformed {
                is_request: false,
                id,
                error: e.to_string(),
            }),
            Err(rmp_serde::decode::Error::DepthLimitExceeded) => Err(CodecError::Garbage(format!(
                "MessagePack nested deeper than {MAX_DEPTH} levels"
            ))),
            Err(_) => Err(CodecError::Garbage(e.to_string())),
        },
    }
}

impl Decoder for FrameCodec {
    type Item = Decoded;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, CodecError> {
        // Stateless: the length prefix stays in `src` until the whole frame
        // is there, so an oversized prefix is refused before buffering it.
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max {
            // The request's id, so that its sender can be told: a few more
            // bytes are waited for when the read so far ends before it.
            let request = match crate::fast::envelope(&src[4..]) {
                crate::fast::Envelope::Request(id) => Some(id),
                crate::fast::Envelope::Short => return Ok(None),
                crate::fast::Envelope::Other => None,
            };
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max,
                request,
            });
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let body = src.split_to(len);
        self.last_len = len;
        if !self.shared_bodies {
            if let Some(frame) = crate::fast::decode(&body, None) {
                return Ok(Some(Decoded::Frame(frame)));
            }
            return decode_body(&body).map(Some);
        }
        let body = body.freeze();
        if let Some(frame) = crate::fast::decode(&body, Some(&body)) {
            return Ok(Some(Decoded::Frame(frame)));
        }
        FRAME.with(|f| *f.borrow_mut() = Some(body.clone()));
        let decoded = decode_body(&body);
        FRAME.with(|f| f.borrow_mut().take());
        decoded.map(Some)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        let dst = if crate::fast::encode(frame, dst) {
            dst
        } else {
            let mut w = dst.writer();
            let written = rmp_serde::encode::write(&mut w, frame);
            let dst = w.into_inner();
            if let Err(e) = written {
                // Nothing of a frame that failed half way stays in the buffer.
                dst.truncate(start);
                return Err(CodecError::Encode(e.to_string()));
            }
            dst
        };
        let len = dst.len() - start - 4;
        if len > self.max {
            dst.truncate(start);
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max,
                request: None,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MsgId};
    use crate::request::{Ping, Request, SendRequest};

    fn encode(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(frame, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_send_round_trips_and_its_body_travels_as_bytes() {
        let msg = Message::new("orders", vec![7u8; 100])
            .with_key("k1")
            .with_tag("t");
        let frame = Frame::Request(
            42,
            Request::Send(SendRequest {
                producer: None,
                queue: 3,
                messages: vec![msg],
            }),
        );
        let mut buf = encode(&frame);
        // A body sent as an array of integers would take about 2 bytes a byte.
        assert!(buf.len() < 100 + 100, "frame is {} bytes", buf.len());
        let got = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        match got {
            Decoded::Frame(f) => assert_eq!(f, frame),
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    /// With shared bodies, each message's body is a slice of the frame's
    /// buffer (no copy), equal to what was sent; without, a copy; and
    /// nothing of the frame stays around for the next decode to see.
    #[test]
    fn shared_bodies_are_slices_of_the_frame_and_equal_to_what_was_sent() {
        let msgs: Vec<Message> = (0..3u8)
            .map(|i| Message::new("orders", vec![i; 300 + usize::from(i)]).with_key("k"))
            .collect();
        let frame = Frame::Request(
            7,
            Request::Send(SendRequest {
                producer: None,
                queue: 0,
                messages: msgs.clone(),
            }),
        );
        for shared in [true, false] {
            let mut buf = encode(&frame);
            let range = buf.as_ptr_range();
            let mut codec = FrameCodec::default();
            if shared {
                codec = codec.with_shared_bodies();
            }
            let Some(Decoded::Frame(got)) = codec.decode(&mut buf).unwrap() else {
                panic!("not a frame");
            };
            assert_eq!(got, frame);
            let Frame::Request(_, Request::Send(send)) = got else {
                panic!("not a send");
            };
            for m in &send.messages {
                assert_eq!(range.contains(&m.body.as_ptr()), shared, "shared: {shared}");
            }
            assert!(FRAME.with(|f| f.borrow().is_none()));
        }
        // A frame decoded after, without sharing, copies.
        let mut buf = encode(&frame);
        let range = buf.as_ptr_range();
        let Some(Decoded::Frame(Frame::Request(_, Request::Send(send)))) =
            FrameCodec::default().decode(&mut buf).unwrap()
        else {
            panic!("not a send");
        };
        assert!(!range.contains(&send.messages[0].body.as_ptr()));
    }

    /// Ids and bodies still read from formats that write bytes as arrays.
    #[test]
    fn ids_and_bodies_read_from_arrays_of_integers() {
        let m = Message::new("t", b"abc".to_vec());
        let json = serde_json::to_string(&m).unwrap();
        let back: Message = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        let id: MsgId = serde_json::from_str(&format!("{:?}", [9u8; 16])).unwrap();
        assert_eq!(id, MsgId([9; 16]));
        assert!(serde_json::from_str::<MsgId>(&format!("{:?}", [9u8; 15])).is_err());
        assert!(serde_json::from_str::<MsgId>(&format!("{:?}", [9u8; 17])).is_err());
    }

    #[test]
    fn a_frame_arriving_in_pieces_decodes_once_whole() {
        let full = encode(&Frame::Request(1, Request::Ping(Ping {})));
        for split in 1..full.len() {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::from(&full[..split]);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            buf.extend_from_slice(&full[split..]);
            assert!(
                matches!(codec.decode(&mut buf).unwrap(), Some(Decoded::Frame(_))),
                "split {split}"
            );
        }
    }

    #[test]
    fn every_truncation_is_not_yet_a_frame() {
        let full = encode(&Frame::Request(1, Request::Ping(Ping {})));
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(FrameCodec::default().decode(&mut part).unwrap().is_none());
        }
    }

    #[test]
    fn an_oversized_request_names_its_id_when_its_start_was_read() {
        let full = encode(&Frame::Request(77, Request::Ping(Ping {})));
        let mut buf = BytesMut::from(&full[..]);
        match FrameCodec::new(1).decode(&mut buf).unwrap_err() {
            CodecError::FrameTooLarge { request, .. } => assert_eq!(request, Some(77)),
            other => panic!("{other}"),
        }
        // Its start cut short: more is waited for, not an unknown request;
        // so is every start of it, down to the length prefix alone, so that
        // how reads cut the bytes never changes the answer (the prefix alone
        // was refused at once, the prefix and one more byte waited for).
        // (The length prefix, `{"Request": [` in 10 bytes, then id 77 in one.)
        for cut in 4..4 + 10 + 1 {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(
                FrameCodec::new(1).decode(&mut buf).unwrap().is_none(),
                "{cut}"
            );
        }
        // Another body is refused as soon as it differs from a request's.
        let mut buf = BytesMut::from(&full[..4]);
        buf.extend_from_slice(&[0x82]);
        match FrameCodec::new(1).decode(&mut buf).unwrap_err() {
            CodecError::FrameTooLarge { request, .. } => assert_eq!(request, None),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn oversized_length_prefix_is_an_error_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        let err = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::FrameTooLarge { .. }), "{err}");
    }

    #[test]
    fn garbage_body_is_an_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xc1, 0xc1, 0xc1]);
        assert!(FrameCodec::default().decode(&mut buf).is_err());
    }

    #[test]
    fn deeply_nested_messagepack_is_refused_without_overflowing_the_stack() {
        // {"Request": [1, [[[[ ... ]]]]]}: a valid envelope around 100,000
        // nested one-element arrays. Decoded on a thread with a small
        // stack, so that recursion per level would overflow it at once.
        let mut body = vec![0x81, 0xa7]; // a map of one entry, a string of 7
        body.extend_from_slice(b"Request");
        body.extend_from_slice(&[0x92, 0x01]); // [1, ...
        body.extend(std::iter::repeat_n(0x91, 100_000));
        body.push(0xc0);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        let got = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || match FrameCodec::default().decode(&mut buf) {
                Err(CodecError::Garbage(error)) => error,
                other => panic!("unexpected {other:?}"),
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(got.contains("nested deeper than 32 levels"), "{got}");
    }

    #[test]
    fn unknown_request_kind_keeps_its_id() {
        #[derive(serde::Serialize)]
        enum Fake {
            Request(u64, Other),
        }
        #[derive(serde::Serialize)]
        enum Other {
            Frobnicate(u32),
        }
        let body = rmp_serde::to_vec(&Fake::Request(9, Other::Frobnicate(1))).unwrap();
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        match FrameCodec::default().decode(&mut buf).unwrap().unwrap() {
            Decoded::Malformed { is_request, id, .. } => {
                assert!(is_request);
                assert_eq!(id, 9);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
