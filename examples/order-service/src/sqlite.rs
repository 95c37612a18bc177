//! One SQLite database file shared by the tasks of a process: opening it
//! (WAL, a busy timeout, the schema) and running jobs on it off the async
//! runtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use crate::error::{blocking, Error, Result};

/// How long a statement waits for another process's write lock (the
/// producer database is shared by `place` and `serve-checks`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A database file and one connection to it. Cloning is cheap; jobs from
/// all clones run one at a time on that connection.
#[derive(Debug, Clone)]
pub(crate) struct SqliteFile {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteFile {
    /// Opens (creating it and its directory if needed) the database at
    /// `path` in WAL mode, so readers in other processes do not block the
    /// writer, and runs `schema` (idempotent `CREATE ... IF NOT EXISTS`).
    ///
    /// # Errors
    /// [`Error::CreateDir`] or [`Error::Sqlite`].
    pub(crate) fn open(path: &Path, schema: &str) -> Result<SqliteFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let sqlite = |doing| {
            let path = path.to_path_buf();
            move |source| Error::Sqlite {
                path,
                doing,
                source,
            }
        };
        let conn = Connection::open(path).map_err(sqlite("opening the database"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sqlite("setting the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite("switching to WAL"))?;
        // In WAL mode NORMAL is durable across process crashes (what the
        // demo kills); only a power cut may lose the last commits.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite("setting synchronous"))?;
        conn.execute_batch(schema)
            .map_err(sqlite("creating the tables"))?;
        Ok(SqliteFile {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `job` on the connection, on the blocking pool.
    ///
    /// # Errors
    /// [`Error::Sqlite`] (saying it was `doing` that) when `job` fails;
    /// [`Error::Task`] when it panicked.
    pub(crate) async fn run<T, F>(&self, doing: &'static str, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let file = self.clone();
        blocking(move || file.run_here(doing, job)).await
    }

    /// As [`SqliteFile::run`], on the calling thread.
    ///
    /// # Errors
    /// As [`SqliteFile::run`], without [`Error::Task`].
    pub(crate) fn run_here<T>(
        &self,
        doing: &'static str,
        job: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        // A job that panicked left no transaction open (rusqlite's
        // `Transaction` rolls back on drop), so a poisoned lock is still
        // a usable connection.
        let mut conn = self.inner.conn.lock().unwrap_or_else(|e| e.into_inner());
        job(&mut conn).map_err(|source| Error::Sqlite {
            path: self.inner.path.clone(),
            doing,
            source,
        })
    }

    /// An [`Error::Corrupt`] about this file.
    pub(crate) fn corrupt(&self, what: String) -> Error {
        Error::Corrupt {
            path: self.inner.path.clone(),
            what,
        }
    }
}
