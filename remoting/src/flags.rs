//! Values written on command lines and in config files, parsed one way by
//! every txmq program (the servers here, `txmq` and applications through
//! `txmq::config`), so that a value means the same and a mistake reads the
//! same everywhere.

use std::time::Duration;

/// How durations are written, added to every duration error.
pub const DURATION_HINT: &str = "write durations like 500ms, 6s or 2m";

/// Parses a duration written like `500ms`, `6s`, `2m` or `1h 30m`.
///
/// # Errors
/// A message saying what is wrong and how durations are written: a
/// negative duration says so, where the underlying parser would only say
/// that it expected a number.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!("a duration cannot be negative ({DURATION_HINT})"));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} ({DURATION_HINT})"))
}

/// Parses a duration that must be above zero (a timeout, an interval).
///
/// # Errors
/// As [`parse_duration`], and for a zero duration.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("must be above 0 ({DURATION_HINT})")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_mistakes_say_how_to_write_them() {
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        let negative = parse_duration(" -5s").unwrap_err();
        assert!(
            negative.starts_with("a duration cannot be negative ("),
            "{negative}"
        );
        let word = parse_duration("soon").unwrap_err();
        assert!(word.ends_with(&format!("({DURATION_HINT})")), "{word}");
        assert_eq!(
            parse_positive_duration("0ms"),
            Err(format!("must be above 0 ({DURATION_HINT})"))
        );
        assert_eq!(parse_positive_duration("2m"), Ok(Duration::from_secs(120)));
    }
}
