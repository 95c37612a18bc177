//! Consumer offsets of a transaction (consume, transform, produce), kept
//! with its half messages until it ends.
//!
//! A prepare's offsets are stored in a property of its first half message
//! ([`PROP_OFFSETS`]): inside the prepare's atomic group and under its
//! record's CRC, replicated with it, carried forward with it past retention,
//! and rebuilt by recovery with the pending transaction, with nothing else
//! to keep in memory. The commit reads them back and appends them, as
//! offset records in the commit's own group (see `store/writer.rs`); a
//! rollback drops them with the half messages.
//!
//! The value is an explicit text layout, one entry per offset, so that any
//! group name (1 to 255 arbitrary bytes) round-trips:
//!
//! ```text
//! <queue> <offset> <expected, or -> <topic length> <group length> <topic><group>\n
//! ```
//!
//! (lengths in bytes, decimal numbers).

use txmq_protocol::TxOffset;

/// The property of the first half message holding the transaction's offsets.
pub(crate) const PROP_OFFSETS: &str = "__txmq.offsets";

/// The property value for `offsets`.
pub(crate) fn encode(offsets: &[TxOffset]) -> String {
    let mut out = String::new();
    for o in offsets {
        let expected = o
            .expected
            .map_or_else(|| "-".to_string(), |e| e.to_string());
        out.push_str(&format!(
            "{} {} {} {} {} {}{}\n",
            o.queue,
            o.offset,
            expected,
            o.topic.len(),
            o.group.len(),
            o.topic,
            o.group
        ));
    }
    out
}

/// The offsets in a property value; `None` when it is not one [`encode`]
/// wrote.
pub(crate) fn decode(value: &str) -> Option<Vec<TxOffset>> {
    let mut offsets = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let mut numbers = [0u64; 5];
        let mut expected = None;
        for (i, slot) in numbers.iter_mut().enumerate() {
            let (field, after) = rest.split_once(' ')?;
            rest = after;
            if i == 2 {
                expected = (field != "-")
                    .then(|| field.parse::<u64>())
                    .transpose()
                    .ok()?;
            } else {
                *slot = field.parse().ok()?;
            }
        }
        let [queue, offset, _, topic_len, group_len] = numbers;
        let topic_len = usize::try_from(topic_len).ok()?;
        let group_end = topic_len.checked_add(usize::try_from(group_len).ok()?)?;
        let topic = rest.get(..topic_len)?;
        let group = rest.get(topic_len..group_end)?;
        rest = rest.get(group_end..)?.strip_prefix('\n')?;
        offsets.push(TxOffset {
            group: group.to_string(),
            topic: topic.to_string(),
            queue: u32::try_from(queue).ok()?,
            offset,
            expected,
        });
    }
    Some(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(group: &str, expected: Option<u64>) -> TxOffset {
        TxOffset {
            group: group.into(),
            topic: "in".into(),
            queue: 3,
            offset: 42,
            expected,
        }
    }

    #[test]
    fn offsets_round_trip_whatever_the_group_name() {
        let offsets = vec![
            offset("plain", Some(41)),
            offset("with spaces\nand a newline 7 8 -", None),
            offset("ünï", Some(0)),
        ];
        assert_eq!(decode(&encode(&offsets)), Some(offsets));
        assert_eq!(decode(""), Some(Vec::new()));
    }

    #[test]
    fn anything_else_does_not_decode() {
        let good = encode(&[offset("g", Some(1))]);
        for cut in 1..good.len() {
            assert_eq!(decode(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode("1 2 x 2 1 ing\n"), None);
        assert_eq!(decode("99999999999 2 - 2 1 ing\n"), None);
    }
}
