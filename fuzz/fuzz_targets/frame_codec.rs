//! Arbitrary bytes on a connection: the frame codec must return frames,
//! "not yet" or an error, never panic, and cutting the bytes in two must
//! not change what comes out.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use txmq_protocol::codec::Decoded;
use txmq_protocol::FrameCodec;

fn decode(pieces: &[&[u8]]) -> Vec<String> {
    let mut codec = FrameCodec::new(64 * 1024);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Decoded::Frame(f))) => out.push(format!("{f:?}")),
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
    let whole = decode(&[data]);
    let mid = data.len() / 2;
    let halves = decode(&[&data[..mid], &data[mid..]]);
    assert_eq!(whole, halves);
});
