//! Arbitrary bytes where a commit-log record should be: `check` and both
//! decoders must answer without panicking, and `decode` must agree with
//! `check` followed by `decode_unverified`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use txmq_broker::store::record::{check, decode, decode_unverified, Check};

fuzz_target!(|data: &[u8]| {
    let c = check(data);
    let b = Bytes::copy_from_slice(data);
    for header_only in [false, true] {
        let verified = decode(&b, header_only).is_some();
        let unverified = decode_unverified(&b, header_only).is_some();
        assert_eq!(verified, matches!(c, Check::Valid(_)) && unverified);
    }
});
