//! [`SqliteDedup`]: the applied keys in a table of the caller's SQLite
//! database, recorded inside the caller's own transaction.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::{DedupKey, Deduped, Seen};

/// A deduplicator whose records are rows of a table in the caller's SQLite
/// database (feature `sqlite`). It holds no connection: each call takes the
/// caller's connection or transaction. Cloning is cheap.
///
/// # Guarantee
/// [`SqliteDedup::check_and_record`] inserts the key inside the caller's
/// transaction: the record exists exactly when that transaction commits.
/// Write the effect in the same transaction and the two commit together, or
/// roll back together; a crash at any point leaves both or neither, so the
/// effect happens once per key within the TTL, across crashes and
/// redeliveries. A failed effect rolls the transaction back, record
/// included, so the next delivery applies it again.
///
/// The key is inserted with a unique-key insert, not looked up first: two
/// connections applying the same key at once serialize on SQLite's write
/// lock, and exactly one gets [`Seen::Fresh`]. Begin the transaction
/// `IMMEDIATE` (as [`SqliteDedup::apply`] does), so that a second writer
/// waits for the lock (the connection's `busy_timeout`) rather than failing
/// with `SQLITE_BUSY` half way.
///
/// # Expiry
/// A row older than the TTL counts as absent: checking its key again
/// answers [`Seen::Fresh`] and renews it. Rows are deleted only by
/// [`SqliteDedup::purge_expired`]; call it now and then (at start, or
/// every so many messages). Time is the `now` each call is given
/// (milliseconds since the Unix epoch are stored), so tests can move it.
///
/// ```no_run
/// # fn demo(conn: &mut rusqlite::Connection, m: &txmq::ReceivedMessage) -> rusqlite::Result<()> {
/// use std::time::{Duration, SystemTime};
/// use txmq::{Deduped, SqliteDedup};
///
/// let dedup = SqliteDedup::new("applied_messages", Duration::from_secs(7 * 24 * 3600));
/// dedup.ensure_schema(conn)?;
/// // Applying a message: the business write and the record commit together.
/// let done = dedup.apply(conn, m, SystemTime::now(), |tx| {
///     tx.execute("UPDATE stock SET left = left - 1 WHERE item = ?1", [m.key()])
/// })?;
/// if done.is_duplicate() {
///     println!("{} was applied before", m.msg_id());
/// }
/// // Now and then:
/// dedup.purge_expired(conn, SystemTime::now())?;
/// # Ok(())
/// # }
/// ```
///
/// With a transaction of your own:
///
/// ```no_run
/// # fn demo(conn: &mut rusqlite::Connection, order_id: &str) -> rusqlite::Result<()> {
/// use std::time::{Duration, SystemTime};
/// use rusqlite::TransactionBehavior;
/// use txmq::{Seen, SqliteDedup};
///
/// let dedup = SqliteDedup::new("applied_orders", Duration::from_secs(7 * 24 * 3600));
/// let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
/// // A business key: also catches the same order sent twice under two msg ids.
/// if dedup.check_and_record(&tx, order_id, SystemTime::now())? == Seen::Fresh {
///     tx.execute("INSERT INTO shipments (order_id) VALUES (?1)", [order_id])?;
/// }
/// tx.commit()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteDedup {
    table: String,
    /// `table`, quoted for SQL.
    quoted: String,
    /// The index on the record time, quoted for SQL.
    index: String,
    ttl: Duration,
}

/// Quotes `name` as an SQL identifier, so any table name is safe.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after).
fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl SqliteDedup {
    /// A deduplicator keeping its records in table `table` (created by
    /// [`SqliteDedup::ensure_schema`]) for `ttl`.
    pub fn new(table: impl Into<String>, ttl: Duration) -> SqliteDedup {
        let table = table.into();
        SqliteDedup {
            quoted: quote(&table),
            index: quote(&format!("{table}_recorded_at")),
            table,
            ttl,
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The TTL of a record.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Creates the table and its index unless they exist.
    ///
    /// # Errors
    /// SQLite's, e.g. a table of that name with other columns.
    pub fn ensure_schema(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                 key            TEXT PRIMARY KEY NOT NULL,
                 recorded_at_ms INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS {i} ON {t} (recorded_at_ms);",
            t = self.quoted,
            i = self.index,
        ))
    }

    /// Records `key` at `now` in `tx` unless it is recorded within the TTL:
    /// [`Seen::Fresh`] means apply the effect (in `tx`), [`Seen::Duplicate`]
    /// means skip it. The record commits or rolls back with `tx`.
    ///
    /// # Errors
    /// SQLite's; roll `tx` back then (drop it).
    pub fn check_and_record(
        &self,
        tx: &Transaction<'_>,
        key: impl Into<DedupKey>,
        now: SystemTime,
    ) -> rusqlite::Result<Seen> {
        let key = key.into();
        let now = millis(now);
        // One statement: insert, or renew an expired row; a live row is
        // left alone and changes nothing.
        let changed = tx.execute(
            &format!(
                "INSERT INTO {t} (key, recorded_at_ms) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET recorded_at_ms = excluded.recorded_at_ms
                 WHERE {t}.recorded_at_ms <= excluded.recorded_at_ms - ?3",
                t = self.quoted
            ),
            params![key.as_str(), now, self.ttl_ms()],
        )?;
        Ok(if changed == 0 {
            Seen::Duplicate
        } else {
            Seen::Fresh
        })
    }

    /// Applies `effect` once per key: in one `IMMEDIATE` transaction on
    /// `conn`, checks and records `key`, runs `effect` on that transaction
    /// if the key is fresh, and commits. A duplicate writes nothing and
    /// does not run `effect`.
    ///
    /// # Errors
    /// SQLite's (converted into `E`), or `effect`'s; the transaction is
    /// rolled back then, record included.
    pub fn apply<T, E>(
        &self,
        conn: &mut Connection,
        key: impl Into<DedupKey>,
        now: SystemTime,
        effect: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<Deduped<T>, E>
    where
        E: From<rusqlite::Error>,
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if self.check_and_record(&tx, key, now)? == Seen::Duplicate {
            // Dropping `tx` rolls back; it wrote nothing anyway.
            return Ok(Deduped::Duplicate);
        }
        let value = effect(&tx)?;
        tx.commit()?;
        Ok(Deduped::Applied(value))
    }

    /// Whether `key` is recorded within the TTL at `now`.
    ///
    /// # Errors
    /// SQLite's.
    pub fn contains(
        &self,
        conn: &Connection,
        key: impl Into<DedupKey>,
        now: SystemTime,
    ) -> rusqlite::Result<bool> {
        let key = key.into();
        conn.query_row(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE key = ?1 AND recorded_at_ms > ?2 - ?3)",
                t = self.quoted
            ),
            params![key.as_str(), millis(now), self.ttl_ms()],
            |r| r.get(0),
        )
    }

    /// Deletes the records older than the TTL at `now`; returns how many.
    ///
    /// # Errors
    /// SQLite's.
    pub fn purge_expired(&self, conn: &Connection, now: SystemTime) -> rusqlite::Result<usize> {
        conn.execute(
            &format!(
                "DELETE FROM {t} WHERE recorded_at_ms <= ?1 - ?2",
                t = self.quoted
            ),
            params![millis(now), self.ttl_ms()],
        )
    }

    /// The number of rows, expired ones not yet purged included.
    ///
    /// # Errors
    /// SQLite's.
    pub fn len(&self, conn: &Connection) -> rusqlite::Result<u64> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {}", self.quoted), [], |r| {
            r.get(0)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// A database with the dedup table and a business table `effects`.
    fn open(path: &std::path::Path, dedup: &SqliteDedup) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        dedup.ensure_schema(&conn).unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL)")
            .unwrap();
        conn
    }

    fn effect(key: &str) -> impl FnOnce(&Transaction<'_>) -> rusqlite::Result<usize> + '_ {
        move |tx| tx.execute("INSERT INTO effects (key) VALUES (?1)", [key])
    }

    fn effects(conn: &Connection) -> u64 {
        conn.query_row("SELECT COUNT(*) FROM effects", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_key_is_applied_once_and_then_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = SqliteDedup::new("dedup", TTL);
        let mut conn = open(&dir.path().join("db"), &dedup);
        assert_eq!(
            dedup.apply(&mut conn, "a", at(0), effect("a")),
            Ok(Deduped::Applied(1))
        );
        assert_eq!(
            dedup.apply(&mut conn, "a", at(1), effect("a")),
            Ok(Deduped::Duplicate)
        );
        assert_eq!(
            dedup.apply(&mut conn, "b", at(1), effect("b")),
            Ok(Deduped::Applied(1))
        );
        assert_eq!(effects(&conn), 2);
        assert!(dedup.contains(&conn, "a", at(2)).unwrap());
        assert!(!dedup.contains(&conn, "c", at(2)).unwrap());
        // The schema is idempotent, and the records survive a reopen.
        drop(conn);
        let mut conn = open(&dir.path().join("db"), &dedup);
        assert_eq!(
            dedup.apply(&mut conn, "b", at(3), effect("b")),
            Ok(Deduped::Duplicate)
        );
        assert_eq!(dedup.len(&conn), Ok(2));
    }

    #[test]
    fn a_record_expires_after_the_ttl_and_is_purged() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = SqliteDedup::new("dedup", TTL);
        let mut conn = open(&dir.path().join("db"), &dedup);
        dedup.apply(&mut conn, "old", at(0), effect("old")).unwrap();
        dedup
            .apply(&mut conn, "young", at(30), effect("young"))
            .unwrap();
        assert_eq!(
            dedup.apply(&mut conn, "old", at(59), effect("old")),
            Ok(Deduped::Duplicate)
        );
        assert!(!dedup.contains(&conn, "old", at(60)).unwrap());
        assert_eq!(dedup.purge_expired(&conn, at(60)), Ok(1));
        assert_eq!(dedup.len(&conn), Ok(1));

        // Expired but not purged: fresh again, and renewed for a full TTL.
        assert_eq!(
            dedup.apply(&mut conn, "young", at(90), effect("young")),
            Ok(Deduped::Applied(1))
        );
        assert!(dedup.contains(&conn, "young", at(149)).unwrap());
        assert_eq!(dedup.purge_expired(&conn, at(149)), Ok(0));
        assert_eq!(effects(&conn), 3);
    }

    #[test]
    fn a_failed_effect_rolls_back_the_record_and_is_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = SqliteDedup::new("dedup", TTL);
        let mut conn = open(&dir.path().join("db"), &dedup);
        let failed: rusqlite::Result<Deduped<()>> = dedup.apply(&mut conn, "k", at(0), |tx| {
            tx.execute("INSERT INTO effects (key) VALUES ('k')", [])?;
            // The business write fails half way (a constraint, a full disk).
            tx.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        });
        assert!(failed.is_err());
        assert_eq!((dedup.len(&conn), effects(&conn)), (Ok(0), 0));
        assert_eq!(
            dedup.apply(&mut conn, "k", at(1), effect("k")),
            Ok(Deduped::Applied(1))
        );
    }

    #[test]
    fn rolling_back_the_business_transaction_rolls_back_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = SqliteDedup::new("weird \"name\"", TTL);
        let mut conn = open(&dir.path().join("db"), &dedup);
        let tx = conn.transaction().unwrap();
        assert_eq!(dedup.check_and_record(&tx, "k", at(0)), Ok(Seen::Fresh));
        tx.execute("INSERT INTO effects (key) VALUES ('k')", [])
            .unwrap();
        assert_eq!(dedup.check_and_record(&tx, "k", at(0)), Ok(Seen::Duplicate));
        tx.rollback().unwrap();
        assert_eq!((dedup.len(&conn), effects(&conn)), (Ok(0), 0));

        let tx = conn.transaction().unwrap();
        assert_eq!(dedup.check_and_record(&tx, "k", at(1)), Ok(Seen::Fresh));
        tx.commit().unwrap();
        assert_eq!(dedup.len(&conn), Ok(1));
    }

    #[test]
    fn concurrent_connections_with_the_same_keys_apply_each_once() {
        const KEYS: u32 = 50;
        const THREADS: usize = 4;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let dedup = SqliteDedup::new("dedup", TTL);
        drop(open(&path, &dedup));
        let start = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (path, dedup, start) = (path.clone(), dedup.clone(), start.clone());
                std::thread::spawn(move || {
                    let mut conn = open(&path, &dedup);
                    start.wait();
                    (0..KEYS)
                        .filter(|k| {
                            let key = format!("k{k}");
                            let done = dedup.apply(&mut conn, key.as_str(), at(0), effect(&key));
                            !done.unwrap().is_duplicate()
                        })
                        .count()
                })
            })
            .collect();
        let applied: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let conn = open(&path, &dedup);
        assert_eq!(applied, KEYS as usize);
        assert_eq!(effects(&conn), u64::from(KEYS));
        let distinct: u64 = conn
            .query_row("SELECT COUNT(DISTINCT key) FROM effects", [], |r| r.get(0))
            .unwrap();
        assert_eq!(distinct, u64::from(KEYS));
    }
}
