//! Small pieces of an encoding gathered on the stack, then put into a
//! [`BytesMut`] at once.
//!
//! A `put` per marker, length or name into a `BytesMut` costs a call, a
//! capacity check and a `memcpy` call each, even for one byte: what
//! encodes a send (the frame on both sides, the broker's commit-log
//! record) writes a dozen such pieces per message. [`Gather`] copies them
//! into a 128-byte array (pieces of up to 16 bytes without a `memcpy`
//! call) and puts the array in when it is full, when a piece comes that
//! does not fit in what is left of it (a body, usually), and at the end.

use bytes::BytesMut;

/// Bytes gathered for `dst`; whatever is still gathered goes into `dst`
/// with [`Gather::flush`] or when the gather is dropped.
pub struct Gather<'a> {
    dst: &'a mut BytesMut,
    buf: [u8; 128],
    len: usize,
}

impl<'a> Gather<'a> {
    /// Gathers for the end of `dst`.
    pub fn new(dst: &'a mut BytesMut) -> Gather<'a> {
        Gather {
            dst,
            buf: [0; 128],
            len: 0,
        }
    }

    /// One byte.
    #[inline]
    pub fn byte(&mut self, b: u8) {
        if self.len == self.buf.len() {
            self.flush();
        }
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// A piece that fits in what is left of the array is gathered; one
    /// that does not (a body, usually) goes straight in, after what was
    /// gathered.
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) {
        if let Some(room) = self.buf.get_mut(self.len..self.len + b.len()) {
            copy_short(room, b);
            self.len += b.len();
        } else {
            self.flush();
            self.dst.extend_from_slice(b);
        }
    }

    /// Puts what is gathered into `dst`.
    pub fn flush(&mut self) {
        if self.len > 0 {
            self.dst.extend_from_slice(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Drop for Gather<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `dst.copy_from_slice(src)` (the two are as long), with pieces of up to
/// 16 bytes copied as two overlapping fixed-size copies, which compile to
/// a few moves, where a copy of a length known only at run time is a
/// `memcpy` call.
#[inline]
fn copy_short(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    match n {
        0 => {}
        1 => dst[0] = src[0],
        2..4 => {
            dst[..2].copy_from_slice(&src[..2]);
            dst[n - 2..].copy_from_slice(&src[n - 2..]);
        }
        4..8 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of every length from 0 to past the array, starting at every
    /// place in the array (after `first` single bytes), come out as they
    /// went in.
    #[test]
    fn pieces_come_out_in_order_whatever_their_lengths() {
        let source: Vec<u8> = (0..=255u8).cycle().take(400).collect();
        for first in 0..=128usize {
            let mut dst = BytesMut::from(&b"head"[..]);
            let mut want = b"head".to_vec();
            {
                let mut g = Gather::new(&mut dst);
                for i in 0..first {
                    g.byte(i as u8);
                    want.push(i as u8);
                }
                let mut at = first;
                for len in (0..=20).chain([127, 128, 129, 300]) {
                    let piece = &source[at % 97..at % 97 + len];
                    g.bytes(piece);
                    want.extend_from_slice(piece);
                    g.byte(len as u8);
                    want.push(len as u8);
                    at += len + 1;
                }
            }
            assert_eq!(&dst[..], &want[..], "starting at {first}");
        }
    }
}
