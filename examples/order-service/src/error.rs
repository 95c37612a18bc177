//! The example's one error type.

use std::path::PathBuf;

/// What can go wrong placing, checking, applying or reporting orders.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory for a database file could not be created.
    #[error("cannot create the directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A SQLite call failed.
    #[error("SQLite failed on {path} while {doing}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What was being done ("recording the local transaction", ...).
        doing: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A value read from a database is not what this example writes there.
    #[error("unexpected value in {path}: {what}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was found.
        what: String,
    },
    /// A blocking database task panicked or was cancelled.
    #[error("a database task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The txmq client failed.
    #[error(transparent)]
    Txmq(#[from] txmq::Error),
}

/// The example's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs `f`, a blocking SQLite job, on tokio's blocking pool, so that a
/// slow disk or a lock wait (`busy_timeout`) never stalls the runtime's
/// worker threads, which also carry the broker connections.
///
/// # Errors
/// What `f` returns, or [`Error::Task`] when it panicked.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(Error::Task)?
}

/// Milliseconds since the Unix epoch, as SQLite stores them (0 when the
/// clock is before 1970).
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
