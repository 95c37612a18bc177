//! Exit codes, for scripts: 0 when everything was done, 1 when nothing
//! could be done (or a plain error), 2 for usage errors (clap's), 3 when
//! only part was done (some messages sent and some not, some brokers
//! answered and some not), 130 after Ctrl-C, 143 after SIGTERM, and 141
//! (128 + SIGPIPE, what a shell reports for a process its closed pipe
//! ended) when only a closed standard output stopped it (`| head`).

use std::fmt;

/// An error, or nothing could be done.
pub const FAILURE: u8 = 1;
/// A usage error found after parsing (clap's own exit with 2 too).
pub const USAGE: u8 = 2;
/// Part was done: some messages sent and some not (or with an unknown
/// outcome), or some brokers answered and others did not.
pub const PARTIAL: u8 = 3;
/// Stopped by Ctrl-C (128 + SIGINT).
pub const INTERRUPTED: u8 = 130;
/// Stopped by SIGTERM (128 + SIGTERM).
pub const TERMINATED: u8 = 143;
/// Stopped by a closed standard output (128 + SIGPIPE).
pub const CLOSED_OUTPUT: u8 = 141;

/// An error that ends the command with a given exit code; `main` prints
/// it like any error and exits with `code`.
#[derive(Debug)]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    message: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// An error exiting with `code` and saying `message`.
pub fn with_code(code: u8, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Exit {
        code,
        message: message.into(),
    })
}

/// A usage error (exit [`USAGE`]) found after parsing: a flag whose value
/// clap cannot check alone.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    with_code(USAGE, message)
}

/// The exit code for `e`: its [`Exit`] code, else [`FAILURE`].
pub fn code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<Exit>())
        .map_or(FAILURE, |x| x.code)
}

/// True when `e` is a plain failure whose cause is a closed standard
/// output (a broken pipe): the reader stopped reading, which is no error
/// of the command's worth a message, nor exit 1 (which some commands give
/// a meaning of their own). A partial outcome (an [`Exit`] code) keeps its
/// code and message.
pub fn closed_output(e: &anyhow::Error) -> bool {
    code_of(e) == FAILURE
        && e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_error_carries_its_code_through_context() {
        let e = with_code(PARTIAL, "2 of 5 lines not sent");
        assert_eq!(code_of(&e), PARTIAL);
        assert_eq!(e.to_string(), "2 of 5 lines not sent");
        assert_eq!(code_of(&e.context("sending")), PARTIAL);
        assert_eq!(code_of(&anyhow::anyhow!("plain")), FAILURE);
    }

    #[test]
    fn only_a_plain_failure_of_a_closed_output_is_one() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(closed_output(
            &anyhow::Error::from(pipe()).context("writing to standard output")
        ));
        assert!(!closed_output(&anyhow::Error::from(std::io::Error::from(
            std::io::ErrorKind::StorageFull
        ))));
        // Part was done: its code and message stand.
        let partial = with_code(PARTIAL, "2 of 5 lines not sent").context(pipe());
        assert!(!closed_output(&partial));
    }
}
