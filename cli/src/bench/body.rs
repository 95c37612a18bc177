//! The body of a benchmark message that a receiver must recognise: an
//! 8-byte producer id, an 8-byte sequence number and an 8-byte timestamp
//! (nanoseconds since the Unix epoch of the intended send time), all
//! big-endian, then padding up to `--size`.
//!
//! The producer id carries the run's random id in its upper 48 bits and the
//! producer's index in the lower 16, so a consumer tells this run's
//! messages from leftovers of another run on the same topic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the header; bodies are at least this long.
pub const HEADER_LEN: usize = 24;

/// The sequence number of a producer's connection-opening message, sent
/// before the run starts; receivers skip it.
pub const CONNECT_SEQ: u64 = u64::MAX;

/// Most producers one run can have (the index has 16 bits).
pub const MAX_PRODUCERS: u32 = 1 << 16;

/// What a benchmark body says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Run id and producer index (see [`producer_id`]).
    pub producer: u64,
    /// The producer's sequence number, from 0.
    pub seq: u64,
    /// Intended send time, ns since the Unix epoch.
    pub timestamp_ns: u64,
}

impl Header {
    /// A body of `size` bytes (at least [`HEADER_LEN`]): the header, then
    /// bytes of `padding` (which should be at least `size` long).
    pub fn encode(&self, size: usize, padding: &[u8]) -> Bytes {
        let size = size.max(HEADER_LEN);
        let mut b = BytesMut::with_capacity(size);
        b.put_u64(self.producer);
        b.put_u64(self.seq);
        b.put_u64(self.timestamp_ns);
        let rest = size - HEADER_LEN;
        b.put_slice(&padding[..rest.min(padding.len())]);
        b.resize(size, 0);
        b.freeze()
    }

    /// The header of a body; `None` when it is too short.
    pub fn decode(body: &[u8]) -> Option<Header> {
        let word = |i: usize| -> Option<u64> {
            let bytes: [u8; 8] = body.get(i * 8..i * 8 + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        };
        Some(Header {
            producer: word(0)?,
            seq: word(1)?,
            timestamp_ns: word(2)?,
        })
    }

    /// The run this message belongs to.
    pub fn run(&self) -> u64 {
        self.producer >> 16
    }

    /// The index of the producer that sent it.
    pub fn producer_index(&self) -> u32 {
        (self.producer & 0xffff) as u32
    }
}

/// The producer id of producer `index` in run `run` (48 bits of it used).
pub fn producer_id(run: u64, index: u32) -> u64 {
    (run & 0xffff_ffff_ffff) << 16 | u64::from(index & 0xffff)
}

/// A random 48-bit run id.
pub fn new_run_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(Clock::new().now_ns().into());
    h.finish() & 0xffff_ffff_ffff
}

/// Converts monotonic instants to ns since the Unix epoch, from one
/// reading of the wall clock, so that timestamps within a process never
/// jump with it; across processes they are as good as the clocks agree.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_ns: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock reading the wall clock now.
    pub fn new() -> Clock {
        let base = Instant::now();
        let base_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Clock { base, base_ns }
    }

    /// `at` in ns since the Unix epoch.
    pub fn ns(&self, at: Instant) -> u64 {
        let since = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        match at.checked_duration_since(self.base) {
            Some(d) => self.base_ns.saturating_add(since(d)),
            None => self.base_ns.saturating_sub(since(self.base - at)),
        }
    }

    /// Now, in ns since the Unix epoch.
    pub fn now_ns(&self) -> u64 {
        self.ns(Instant::now())
    }
}

/// The time from `from_ns` to `to_ns`; zero when `to_ns` is earlier (clock skew).
pub fn elapsed_ns(from_ns: u64, to_ns: u64) -> Duration {
    Duration::from_nanos(to_ns.saturating_sub(from_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_round_trips_at_every_size() {
        let padding = vec![b'x'; 1024];
        let h = Header {
            producer: producer_id(0xabc_def0_1234, 7),
            seq: 42,
            timestamp_ns: 1_700_000_000_123_456_789,
        };
        for size in [0, 1, 23, 24, 25, 100, 1024, 2000] {
            let body = h.encode(size, &padding);
            assert_eq!(body.len(), size.max(HEADER_LEN), "size {size}");
            assert_eq!(Header::decode(&body), Some(h));
        }
        let body = h.encode(30, &padding);
        assert_eq!(&body[24..], b"xxxxxx");
        assert_eq!(h.run(), 0xabc_def0_1234);
        assert_eq!(h.producer_index(), 7);
    }

    #[test]
    fn short_bodies_have_no_header() {
        assert_eq!(Header::decode(b""), None);
        assert_eq!(Header::decode(&[0; 23]), None);
        assert!(Header::decode(&[0; 24]).is_some());
    }

    #[test]
    fn producer_ids_keep_run_and_index_apart() {
        let id = producer_id(u64::MAX, 65_535);
        let h = Header {
            producer: id,
            seq: 0,
            timestamp_ns: 0,
        };
        assert_eq!(h.run(), 0xffff_ffff_ffff);
        assert_eq!(h.producer_index(), 65_535);
        assert_ne!(producer_id(1, 0), producer_id(0, 1));
        assert!(new_run_id() < 1 << 48);
    }

    #[test]
    fn the_clock_is_monotonic_and_near_the_wall_clock() {
        let c = Clock::new();
        let t = Instant::now();
        let later = t + Duration::from_millis(5);
        assert_eq!(c.ns(later) - c.ns(t), 5_000_000);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        assert!(c.now_ns().abs_diff(wall) < 1_000_000_000);
        assert_eq!(elapsed_ns(10, 5), Duration::ZERO);
        assert_eq!(elapsed_ns(5, 10), Duration::from_nanos(5));
    }
}
