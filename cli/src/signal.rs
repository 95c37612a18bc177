//! Ctrl-C and SIGTERM: long-running commands stop cleanly on either
//! (commit, print a summary) instead of dying mid-line.

use crate::exit;

/// The signal that stopped a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Ctrl-C (SIGINT).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// The exit code of a command it stopped: 128 plus the signal number,
    /// as a shell reports a process the signal killed.
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => exit::INTERRUPTED,
            Signal::Terminate => exit::TERMINATED,
        }
    }
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
pub async fn interrupted() {
    received().await;
}

/// Completes on Ctrl-C or (on Unix) SIGTERM, saying which.
pub async fn received() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c() => Signal::Interrupt,
                    _ = term.recv() => Signal::Terminate,
                }
            }
            Err(_) => {
                ctrl_c().await;
                Signal::Interrupt
            }
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c().await;
        Signal::Interrupt
    }
}

/// Completes on Ctrl-C; never when the handler cannot be installed.
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
