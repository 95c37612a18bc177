//! Arbitrary bytes on a connection: the frame codec must return frames,
//! "not yet" or an error, never panic, and cutting the bytes in two must
//! not change what comes out. Every frame it returns must be what serde
//! alone makes of the same body (`decode_body`): the codec reads sends and
//! their answers without serde, and must agree with it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use txmq_protocol::codec::{decode_body, Decoded};
use txmq_protocol::FrameCodec;

/// The body of the whole frame at the front of `buf`, if one is there.
fn next_body(buf: &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    buf.get(4..4 + len).map(<[u8]>::to_vec)
}

fn decode(pieces: &[&[u8]], shared: bool) -> Vec<String> {
    let mut codec = FrameCodec::new(64 * 1024);
    if shared {
        // As a server reads: message bodies are slices of the frame.
        codec = codec.with_shared_bodies();
    }
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let body = next_body(&buf);
            match codec.decode(&mut buf) {
                Ok(Some(Decoded::Frame(f))) => {
                    match body.as_deref().map(decode_body) {
                        Some(Ok(Decoded::Frame(g))) => assert_eq!(f, g, "the codec and serde disagree"),
                        other => panic!("serde does not take a frame the codec took: {other:?}"),
                    }
                    out.push(format!("{f:?}"))
                }
                Ok(Some(Decoded::Malformed { is_request, id, .. })) => {
                    out.push(format!("malformed {is_request} {id}"))
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {}", e.to_string().len().min(1)));
                    return out;
                }
            }
        }
    }
    out.push(format!("pending {}", buf.len()));
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(&[data], false);
    let mid = data.len() / 2;
    let halves = decode(&[&data[..mid], &data[mid..]], false);
    assert_eq!(whole, halves);
    assert_eq!(whole, decode(&[data], true), "shared bodies change what is decoded");
});
