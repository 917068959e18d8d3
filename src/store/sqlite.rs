//! The embedded SQLite store (`sqlite:PATH`): the default backend, no server to run.
//!
//! # Durability (what survives a crash or a power cut)
//!
//! The database runs in WAL mode with `synchronous=NORMAL`. A commit appends to the
//! write-ahead log without waiting for fsync; the log is synced to disk at checkpoints.
//! - **Process crash** (panic, `kill -9`, OOM killer): every committed transaction survives.
//!   The log lives in the OS page cache and is replayed at the next open.
//! - **OS crash or power cut**: the database stays consistent (never half a transaction,
//!   never a broken file), but the last transactions committed before the crash may be lost,
//!   i.e. a registration or status change made in the last moments may have to be redone.
//!   `synchronous=FULL` would close that window at the price of one fsync (~1 ms here) per
//!   commit; directory changes are rare admin actions that are audited and can be replayed, so
//!   the default keeps commits cheap.
//! - **Sending counters and patterns** (R14, R15) are the exception: they are counted in
//!   memory and written every second (see [`super::tally`]), so a process crash loses at most
//!   the last second's counts; a stop writes them all.
//!
//! # Threads and connections
//!
//! rusqlite calls block, so none of them runs on the async workers:
//! - **One writer connection** per process behind an async mutex. SQLite admits one writer
//!   per file anyway, so a second in-process writer would only add `SQLITE_BUSY`. Writers
//!   queue on the mutex without holding a thread; the holder runs its transaction on tokio's
//!   blocking pool (`spawn_blocking`). Every write is a `BEGIN IMMEDIATE` transaction: it takes
//!   the file's write lock up front, so a writer in another process (a second daemon, the
//!   `sqlite3` shell) makes it wait up to [`BUSY_TIMEOUT`] instead of failing on a stale
//!   snapshot.
//! - **Up to [`MAX_READERS`] reader connections** (`query_only`), opened on demand and kept
//!   in a small pool bounded by a semaphore. In WAL mode readers never wait for the writer,
//!   so a long bulk import does not stall lookups on the mail path.
//!
//! `spawn_blocking` rather than a dedicated thread with a channel: no request/reply protocol
//! to maintain, and the number of blocking threads in use is bounded by the mutex and the
//! semaphore, which are acquired *before* spawning. A caller that stops waiting (the mail
//! path's `store.timeout`) does not cancel a transaction already running: it completes or
//! rolls back as a whole.
//!
//! `:memory:` gives a private in-memory database (for tests): one connection serves both
//! reads and writes, since a second connection would see a different database.
//!
//! # Schema
//!
//! [`MIGRATIONS`] is the schema history; `PRAGMA user_version` records how many have been
//! applied. Pending ones run in one transaction at open. A database written by a newer
//! mailwarden (a higher `user_version`) is refused rather than misread.

use super::*;
use crate::model::Address;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, ffi, params,
    types::{FromSql, FromSqlError, FromSqlResult, Type, ValueRef},
};
use std::{fmt::Display, str::FromStr, sync::Mutex, time::Duration};
use tokio::sync::{Mutex as AsyncMutex, Semaphore};

use super::tally::{self, Tally};

/// How long a write waits for another process holding the database's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Reader connections kept per store.
pub const MAX_READERS: usize = 4;

/// The schema history: entry `i` upgrades `user_version` `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[&str] = &[
    // 1: organisations and accounts. Names are stored normalised (lower case), so the
    // PRIMARY KEY / UNIQUE constraints give case-insensitive first-come-first-served (R4).
    // Enums are stored as their text; no CHECK on them, so that an unknown value written by
    // a newer version is read as `Corrupt` instead of failing someone else's write.
    r#"
    CREATE TABLE orgs (
        code              TEXT    NOT NULL PRIMARY KEY,
        name              TEXT    NOT NULL,
        domain            TEXT    NOT NULL UNIQUE,
        status            TEXT    NOT NULL,
        status_reason     TEXT,
        created_at        INTEGER NOT NULL,
        status_changed_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE accounts (
        address           TEXT    NOT NULL PRIMARY KEY,
        org               TEXT    NOT NULL REFERENCES orgs(code),
        kind              TEXT    NOT NULL,
        status            TEXT    NOT NULL,
        status_reason     TEXT,
        display_name      TEXT,
        created_at        INTEGER NOT NULL,
        status_changed_at INTEGER NOT NULL,
        quota_bytes       INTEGER CHECK (quota_bytes IS NULL OR quota_bytes >= 0)
    ) STRICT;
    CREATE INDEX accounts_by_org ON accounts(org, address);
    "#,
    // 2: R10's authorised relay networks per organisation: canonical CIDRs separated by
    // spaces, sorted ('' = none declared).
    r#"
    ALTER TABLE orgs ADD COLUMN relay_networks TEXT NOT NULL DEFAULT '';
    "#,
    // 3: sending limits (R14). `bulk`: the permission that exempts an account. One row per
    // account and counter, holding the count of the window starting at `window_start`; a
    // row of an older window counts as 0 and is overwritten by the next take, so the table
    // holds at most four rows per account that ever sent.
    r#"
    ALTER TABLE accounts ADD COLUMN bulk INTEGER NOT NULL DEFAULT 0 CHECK (bulk IN (0, 1));
    CREATE TABLE rate_counters (
        account      TEXT    NOT NULL,
        counter      TEXT    NOT NULL,
        window_start INTEGER NOT NULL,
        count        INTEGER NOT NULL CHECK (count >= 0),
        PRIMARY KEY (account, counter)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 4: storage quotas (R13): the mailbox usage each account's mailbox server last reported.
    r#"
    CREATE TABLE mailbox_usage (
        account    TEXT    NOT NULL PRIMARY KEY,
        bytes      INTEGER NOT NULL CHECK (bytes >= 0),
        updated_at INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    "#,
    // 5: send-as delegation (R8): `delegate` may send as `mailbox`. Both are registered
    // accounts (foreign keys: a delegation to or of an unknown account is refused); one row
    // per pair. The second index serves "which mailboxes may this login send as".
    r#"
    CREATE TABLE delegations (
        mailbox  TEXT NOT NULL REFERENCES accounts(address),
        delegate TEXT NOT NULL REFERENCES accounts(address),
        PRIMARY KEY (mailbox, delegate),
        CHECK (mailbox <> delegate)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX delegations_by_delegate ON delegations(delegate, mailbox);
    "#,
    // 6: compromise response (R15) and activity (R20). `send_watch`: each account's sending
    // pattern (see `store::watch`); `send_locks`: the lock as JSON (a `SendLock`);
    // `last_use`: the last authenticated use.
    r#"
    CREATE TABLE send_watch (
        account        TEXT    NOT NULL PRIMARY KEY,
        hour           INTEGER NOT NULL,
        messages       INTEGER NOT NULL CHECK (messages >= 0),
        baseline_milli INTEGER NOT NULL CHECK (baseline_milli >= 0),
        rej_hour       INTEGER NOT NULL,
        accepted       INTEGER NOT NULL CHECK (accepted >= 0),
        rejected       INTEGER NOT NULL CHECK (rejected >= 0)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE send_locks (
        account TEXT NOT NULL PRIMARY KEY,
        lock    TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE last_use (
        account TEXT    NOT NULL PRIMARY KEY,
        at      INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    "#,
    // 7: owner
    // alerts (R16), the countries each account has logged in from, with the first time.
    r#"
    CREATE TABLE login_countries (
        account    TEXT    NOT NULL,
        country    TEXT    NOT NULL,
        first_seen INTEGER NOT NULL,
        PRIMARY KEY (account, country)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 8: R13's organisation default quota,
    // the quota of the organisation's accounts that have none of their own (NULL: none).
    r#"
    ALTER TABLE orgs ADD COLUMN default_quota_bytes INTEGER
        CHECK (default_quota_bytes IS NULL OR default_quota_bytes >= 0);
    "#,
];

pub struct SqliteStore {
    writer: Arc<AsyncMutex<Connection>>,
    /// `None` for `:memory:`: reads go through the writer connection.
    readers: Option<Arc<ReaderPool>>,
    /// Sending counters and patterns (R14, R15), counted in memory and written every
    /// [`tally::FLUSH_INTERVAL`]; shared by every store open on the same file.
    tally: Arc<Tally>,
    /// The file, for the last flush when the store is dropped (`None` for `:memory:`).
    path: Option<String>,
}

struct ReaderPool {
    path: String,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    fn take(&self) -> StoreResult<Connection> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path`, or a private in-memory one for
    /// `:memory:`, and brings its schema up to date.
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let memory = path == ":memory:";
        let owned = path.to_owned();
        let writer = blocking(move || open_writer(&owned, memory)).await?;
        let tally = if memory {
            Arc::new(Tally::default())
        } else {
            tally::for_path(std::path::Path::new(path))
        };
        let readers = (!memory).then(|| {
            Arc::new(ReaderPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(MAX_READERS)),
            })
        });
        let writer = Arc::new(AsyncMutex::new(writer));
        spawn_flusher(Arc::downgrade(&tally), Arc::downgrade(&writer));
        Ok(SqliteStore {
            writer,
            readers,
            tally,
            path: (!memory).then(|| path.to_owned()),
        })
    }

    /// Loads `key`'s counters, pattern and lock into the tally, unless they are there.
    async fn load(&self, key: &str) -> StoreResult<()> {
        if self.tally.is_loaded(key) {
            return Ok(());
        }
        // Not while a flush or an administrator's change is under way (it could be stale).
        let _gate = self.tally.gate.read().await;
        if self.tally.is_loaded(key) {
            return Ok(());
        }
        let k = key.to_owned();
        let entry = self.read(move |c| load_entry(c, &k)).await?;
        self.tally.insert_loaded(key, entry);
        Ok(())
    }

    /// Runs `f` on the tally once `keys` are loaded. A key forgotten in between (idle keys
    /// are evicted at a flush) is loaded again.
    async fn counted<T>(&self, keys: &[&str], f: impl Fn(&Tally) -> Option<T>) -> StoreResult<T> {
        loop {
            for k in keys {
                self.load(k).await?;
            }
            if let Some(v) = f(&self.tally) {
                return Ok(v);
            }
        }
    }

    /// A count that made a lock: the lock is written to the file before it is announced.
    async fn written(&self, outcome: WatchOutcome, watch: &Watch) -> StoreResult<WatchOutcome> {
        if watch.lock && matches!(outcome, WatchOutcome::Tripped(_)) {
            flush(&self.tally, &self.writer).await?;
        }
        Ok(outcome)
    }

    /// Runs `f` on the writer connection, on the blocking pool.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let mut conn = self.writer.clone().lock_owned().await;
        blocking(move || f(&mut conn)).await
    }

    /// One change to one account: in a single write transaction, read the record, apply
    /// `update` to it, read it again; `NotFound` when there is no such account.
    async fn change_account<F>(
        &self,
        address: &Address,
        update: F,
    ) -> StoreResult<(Account, Account)>
    where
        F: FnOnce(&rusqlite::Transaction<'_>, &str) -> rusqlite::Result<usize> + Send + 'static,
    {
        let address = address.to_string();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = select_account(&tx, &address)? else {
                return Err(StoreError::NotFound {
                    what: "account",
                    name: address,
                });
            };
            update(&tx, &address)?;
            let after = select_account(&tx, &address)?
                .ok_or_else(|| StoreError::Corrupt(format!("account {address} vanished")))?;
            tx.commit()?;
            Ok((before, after))
        })
        .await
    }

    /// Runs `f` on a reader connection, on the blocking pool.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let Some(pool) = &self.readers else {
            return self.write(move |c| f(c)).await;
        };
        let permit = pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("store is closed".into()))?;
        let pool = pool.clone();
        blocking(move || {
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn);
            drop(permit);
            result
        })
        .await
    }
}

/// Writes the tally every [`tally::FLUSH_INTERVAL`] while the store (and its tally) lives.
fn spawn_flusher(tally: std::sync::Weak<Tally>, writer: std::sync::Weak<AsyncMutex<Connection>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(tally::FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let (Some(tally), Some(writer)) = (tally.upgrade(), writer.upgrade()) else {
                return;
            };
            if let Err(e) = flush(&tally, &writer).await {
                tracing::warn!("sending counters not written to the store, retrying: {e}");
            }
            tally.evict_idle(chrono::Utc::now().timestamp());
        }
    });
}

/// Writes what the tally holds unwritten, in one transaction; on failure it stays unwritten.
async fn flush(tally: &Tally, writer: &Arc<AsyncMutex<Connection>>) -> StoreResult<()> {
    let _gate = tally.gate.write().await;
    let pending = tally.begin_flush();
    if pending.is_empty() {
        return Ok(());
    }
    let mut conn = writer.clone().lock_owned().await;
    let (pending, written) = blocking(move || {
        let written = write_pending(&mut conn, &pending);
        Ok((pending, written))
    })
    .await?;
    match written {
        Ok(totals) => {
            tally.end_flush(pending, Some(totals));
            Ok(())
        }
        Err(e) => {
            tally.end_flush(pending, None);
            Err(e)
        }
    }
}

/// One transaction: each counter increment added to the file's count (of the same window;
/// an older window's count is replaced), patterns and locks as they are now. Returns the
/// file's totals, per pending key and increment.
fn write_pending(c: &mut Connection, pending: &[tally::Pending]) -> StoreResult<Vec<Vec<u64>>> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut totals = Vec::with_capacity(pending.len());
    for p in pending {
        let mut mine = Vec::with_capacity(p.increments.len());
        for &(counter, window, n) in &p.increments {
            let n = i64::try_from(n).map_err(|_| {
                StoreError::Corrupt(format!("counter {counter} of {} overflows", p.key))
            })?;
            let total: i64 = tx
                .prepare_cached(
                    "INSERT INTO rate_counters (account, counter, window_start, count) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (account, counter) DO UPDATE SET \
                     count = CASE WHEN window_start = excluded.window_start \
                     THEN count + excluded.count ELSE excluded.count END, \
                     window_start = excluded.window_start RETURNING count",
                )?
                .query_row(params![p.key, counter.name(), window, n], |r| r.get(0))?;
            mine.push(u64::try_from(total).map_err(|_| {
                StoreError::Corrupt(format!("counter {counter} of {} is {total}", p.key))
            })?);
        }
        if let Some(w) = &p.watch {
            store_watch(&tx, &p.key, w)?;
        }
        match &p.lock {
            Some(Some(lock)) => store_lock(&tx, &p.key, lock)?,
            Some(None) => {
                tx.execute("DELETE FROM send_locks WHERE account = ?1", [&p.key])?;
            }
            None => {}
        }
        totals.push(mine);
    }
    tx.commit()?;
    Ok(totals)
}

/// `key`'s counters, pattern and lock as the file has them, in one snapshot.
fn load_entry(c: &Connection, key: &str) -> StoreResult<tally::Entry> {
    let tx = c.unchecked_transaction()?;
    let mut entry = tally::Entry::default();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT counter, window_start, count FROM rate_counters WHERE account = ?1",
        )?;
        let mut rows = stmt.query([key])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            let (window, count): (i64, i64) = (row.get(1)?, row.get(2)?);
            let Some(i) = Counter::ALL.iter().position(|c| c.name() == name) else {
                return Err(StoreError::Corrupt(format!(
                    "unknown counter {name:?} of {key}"
                )));
            };
            let base = u64::try_from(count)
                .map_err(|_| StoreError::Corrupt(format!("counter {name} of {key} is {count}")))?;
            entry.counters[i] = tally::Slot {
                window,
                base,
                unflushed: 0,
            };
        }
    }
    entry.watch = select_watch(&tx, key)?;
    entry.lock = select_lock(&tx, key)?;
    tx.finish()?;
    Ok(entry)
}

impl Drop for SqliteStore {
    /// The last store on a file writes the tally's last counts (a stop loses none).
    fn drop(&mut self) {
        let Some(path) = &self.path else { return };
        // Only the last handle: another store on the file (or its flusher) still writes.
        if Arc::strong_count(&self.tally) > 1 {
            return;
        }
        let pending = self.tally.begin_flush();
        if pending.is_empty() {
            return;
        }
        let written = open_writer(path, false).and_then(|mut c| write_pending(&mut c, &pending));
        if let Err(e) = written {
            tracing::error!("sending counters of the last second not written at close: {e}");
        }
    }
}

async fn blocking<T, F>(f: F) -> StoreResult<T>
where
    F: FnOnce() -> StoreResult<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
}

fn open_writer(path: &str, memory: bool) -> StoreResult<Connection> {
    if !memory {
        // First start: create the data directory (e.g. ./var for the quick start).
        if let Some(dir) = std::path::Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
    }
    let mut conn = Connection::open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {path}: {e}")))?;
    configure(&conn)?;
    if !memory {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "{path}: cannot switch to the WAL journal (journal_mode is {mode})"
            )));
        }
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn open_reader(path: &str) -> StoreResult<Connection> {
    // Read-write flags (without CREATE): read-only WAL connections have extra failure modes
    // (`-shm` permissions); `query_only` keeps this one from writing.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {path}: {e}")))?;
    configure(&conn)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

/// Applies pending migrations in one transaction; refuses a schema newer than this binary.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let latest = MIGRATIONS.len() as i64;
    if version > latest {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this mailwarden supports \
             (version {latest}); run the mailwarden release that wrote it, or restore a backup"
        )));
    }
    if version < 0 {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is not valid"
        )));
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.execute_batch(sql)?;
    }
    if version < latest {
        tx.pragma_update(None, "user_version", latest)?;
        tracing::info!(from = version, to = latest, "store schema migrated");
    }
    tx.commit()?;
    Ok(())
}

/// The countries recorded for `account` (R16), sorted.
fn select_countries(c: &Connection, account: &str) -> StoreResult<Vec<String>> {
    let mut stmt = c.prepare_cached(
        "SELECT country FROM login_countries WHERE account = ?1 ORDER BY country",
    )?;
    let rows = stmt.query_map([account], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::Error as E;
        match &e {
            E::FromSqlConversionFailure(..)
            | E::InvalidColumnType(..)
            | E::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
            E::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    ErrorCode::DatabaseCorrupt
                        | ErrorCode::NotADatabase
                        | ErrorCode::ConstraintViolation
                ) =>
            {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// The extended result code of a constraint violation, if `e` is one.
fn constraint(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            Some(f.extended_code)
        }
        _ => None,
    }
}

/// A column holding the text of a `FromStr` type (enums, addresses).
struct Parsed<T>(T);

impl<T: FromStr> FromSql for Parsed<T>
where
    T::Err: Display,
{
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = v.as_str()?;
        s.parse()
            .map(Parsed)
            .map_err(|e| FromSqlError::Other(format!("{s:?}: {e}").into()))
    }
}

const ORG_COLUMNS: &str = "code, name, domain, status, status_reason, created_at, \
                           status_changed_at, relay_networks, default_quota_bytes";
const ACCOUNT_COLUMNS: &str = "address, org, kind, status, status_reason, display_name, \
                               created_at, status_changed_at, quota_bytes, bulk";

fn org_from_row(r: &Row<'_>) -> rusqlite::Result<Org> {
    Ok(Org {
        code: r.get(0)?,
        name: r.get(1)?,
        domain: r.get(2)?,
        status: r.get::<_, Parsed<OrgStatus>>(3)?.0,
        status_reason: r.get(4)?,
        created_at: r.get(5)?,
        status_changed_at: r.get(6)?,
        relay_networks: parse_networks(&r.get::<_, String>(7)?)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(7, Type::Text, e.into()))?,
        default_quota_bytes: bytes_column(r, 8, "default_quota_bytes")?,
    })
}

/// A nullable byte count (a quota): never negative.
fn bytes_column(r: &Row<'_>, i: usize, name: &str) -> rusqlite::Result<Option<u64>> {
    match r.get::<_, Option<i64>>(i)? {
        None => Ok(None),
        Some(q) => u64::try_from(q).map(Some).map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                Type::Integer,
                format!("{name} {q} is negative").into(),
            )
        }),
    }
}

/// A byte count as SQLite stores it (at most `i64::MAX`).
fn stored_bytes(bytes: u64, what: &dyn Display) -> StoreResult<i64> {
    i64::try_from(bytes).map_err(|_| {
        StoreError::Corrupt(format!(
            "{what} {bytes} is larger than the store can hold ({})",
            i64::MAX
        ))
    })
}

/// The stored form of relay networks: space-separated CIDRs.
fn networks_text(n: &[ipnet::IpNet]) -> String {
    n.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_networks(text: &str) -> Result<Vec<ipnet::IpNet>, String> {
    text.split_whitespace()
        .map(|n| n.parse().map_err(|e| format!("relay_networks {n:?}: {e}")))
        .collect()
}

fn account_from_row(r: &Row<'_>) -> rusqlite::Result<Account> {
    let quota_bytes = match r.get::<_, Option<i64>>(8)? {
        None => None,
        Some(q) => Some(u64::try_from(q).map_err(|_| {
            rusqlite::Error::FromSqlConversionFailure(
                8,
                Type::Integer,
                format!("quota_bytes {q} is negative").into(),
            )
        })?),
    };
    Ok(Account {
        address: r.get::<_, Parsed<Address>>(0)?.0,
        org: r.get(1)?,
        kind: r.get::<_, Parsed<AccountKind>>(2)?.0,
        status: r.get::<_, Parsed<AccountStatus>>(3)?.0,
        status_reason: r.get(4)?,
        display_name: r.get(5)?,
        created_at: r.get(6)?,
        status_changed_at: r.get(7)?,
        quota_bytes,
        bulk: r.get(9)?,
    })
}

/// The `rate_counters.account` of organisation `code`'s counters (R14). An address always
/// has an `@`, so it never collides with an account's.
fn org_counter_key(code: &str) -> String {
    format!("org:{}", norm(code))
}

/// Every counter of `key` in the windows containing `now`, in one snapshot.
fn all_counters(c: &Connection, key: &str, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
    let tx = c.unchecked_transaction()?; // one snapshot for all counters
    let mut out = Vec::with_capacity(Counter::ALL.len());
    for counter in Counter::ALL {
        out.push(CounterValue {
            counter,
            count: current_count(&tx, key, counter, now)?,
            window_start: counter.window.start(now),
            window_end: counter.window.end(now),
        });
    }
    tx.finish()?;
    Ok(out)
}

/// The count of `counter` in the window containing `now` (0 when the row is of an older
/// window, or missing).
fn current_count(
    c: &Connection,
    account: &str,
    counter: Counter,
    now: Timestamp,
) -> StoreResult<u64> {
    let row: Option<(i64, i64)> = c
        .prepare_cached(
            "SELECT window_start, count FROM rate_counters WHERE account = ?1 AND counter = ?2",
        )?
        .query_row(params![account, counter.name()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    match row {
        Some((start, count)) if start == counter.window.start(now) => u64::try_from(count)
            .map_err(|_| StoreError::Corrupt(format!("counter {counter} of {account} is {count}"))),
        _ => Ok(0),
    }
}

fn select_lock(c: &Connection, account: &str) -> StoreResult<Option<SendLock>> {
    let text: Option<String> = c
        .prepare_cached("SELECT lock FROM send_locks WHERE account = ?1")?
        .query_row([account], |r| r.get(0))
        .optional()?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| StoreError::Corrupt(format!("send lock of {account}: {e}")))
    })
    .transpose()
}

fn store_lock(c: &Connection, account: &str, lock: &SendLock) -> StoreResult<()> {
    let text = serde_json::to_string(lock)
        .map_err(|e| StoreError::Corrupt(format!("send lock of {account}: {e}")))?;
    c.prepare_cached(
        "INSERT INTO send_locks (account, lock) VALUES (?1, ?2) \
         ON CONFLICT (account) DO UPDATE SET lock = excluded.lock",
    )?
    .execute(params![account, text])?;
    Ok(())
}

fn select_watch(c: &Connection, account: &str) -> StoreResult<WatchState> {
    let row: Option<[i64; 6]> = c
        .prepare_cached(
            "SELECT hour, messages, baseline_milli, rej_hour, accepted, rejected \
             FROM send_watch WHERE account = ?1",
        )?
        .query_row([account], |r| {
            Ok([
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ])
        })
        .optional()?;
    let Some([hour, m, b, rh, a, rj]) = row else {
        return Ok(WatchState::default());
    };
    let n = |v: i64| {
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("send pattern of {account}")))
    };
    Ok(WatchState {
        hour,
        messages: n(m)?,
        baseline_milli: n(b)?,
        rej_hour: rh,
        accepted: n(a)?,
        rejected: n(rj)?,
    })
}

fn store_watch(c: &Connection, account: &str, s: &WatchState) -> StoreResult<()> {
    let i = |v: u64| {
        i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("send pattern of {account}")))
    };
    c.prepare_cached(
        "INSERT INTO send_watch (account, hour, messages, baseline_milli, rej_hour, accepted, \
         rejected) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (account) DO UPDATE SET \
         hour = excluded.hour, messages = excluded.messages, \
         baseline_milli = excluded.baseline_milli, rej_hour = excluded.rej_hour, \
         accepted = excluded.accepted, rejected = excluded.rejected",
    )?
    .execute(params![
        account,
        s.hour,
        i(s.messages)?,
        i(s.baseline_milli)?,
        s.rej_hour,
        i(s.accepted)?,
        i(s.rejected)?
    ])?;
    Ok(())
}

fn select_org(c: &Connection, column: &str, key: &str) -> StoreResult<Option<Org>> {
    let sql = format!("SELECT {ORG_COLUMNS} FROM orgs WHERE {column} = ?1");
    Ok(c.prepare_cached(&sql)?
        .query_row([key], org_from_row)
        .optional()?)
}

fn select_account(c: &Connection, address: &str) -> StoreResult<Option<Account>> {
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE address = ?1");
    Ok(c.prepare_cached(&sql)?
        .query_row([address], account_from_row)
        .optional()?)
}

/// Organisation codes and domains are compared in lower case (like addresses).
fn norm(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// An account as written: keys normalised, quota checked against SQLite's integer range.
fn account_row(a: &Account) -> StoreResult<Account> {
    if let Some(q) = a.quota_bytes.filter(|&q| i64::try_from(q).is_err()) {
        return Err(StoreError::Corrupt(format!(
            "quota_bytes {q} for {} is larger than the store can hold ({})",
            a.address,
            i64::MAX
        )));
    }
    Ok(Account {
        org: norm(&a.org),
        ..a.clone()
    })
}

fn insert_account(c: &Connection, a: &Account) -> StoreResult<()> {
    let sql = format!(
        "INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    );
    let result = c.prepare_cached(&sql)?.execute(params![
        a.address.to_string(),
        a.org,
        a.kind.as_str(),
        a.status.as_str(),
        a.status_reason,
        a.display_name,
        a.created_at,
        a.status_changed_at,
        a.quota_bytes.map(|q| q as i64), // range checked in `account_row`
        a.bulk,
    ]);
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(match constraint(&e) {
            Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => StoreError::Conflict {
                what: "account",
                name: a.address.to_string(),
            },
            Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => StoreError::NotFound {
                what: "organisation",
                name: a.org.clone(),
            },
            _ => e.into(),
        }),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_org(&self, org: &Org) -> StoreResult<()> {
        let org = Org {
            code: norm(&org.code),
            domain: norm(&org.domain),
            ..org.clone()
        };
        let default_quota = org
            .default_quota_bytes
            .map(|q| stored_bytes(q, &format_args!("default_quota_bytes of {}", org.code)))
            .transpose()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let result = tx.execute(
                &format!(
                    "INSERT INTO orgs ({ORG_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ),
                params![
                    org.code,
                    org.name,
                    org.domain,
                    org.status.as_str(),
                    org.status_reason,
                    org.created_at,
                    org.status_changed_at,
                    networks_text(&changed_relays(&org.relay_networks, &[], &[])),
                    default_quota,
                ],
            );
            if let Err(e) = result {
                return Err(match constraint(&e) {
                    Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => StoreError::Conflict {
                        what: "organisation",
                        name: org.code,
                    },
                    Some(ffi::SQLITE_CONSTRAINT_UNIQUE) => StoreError::Conflict {
                        what: "organisation",
                        name: org.domain,
                    },
                    _ => e.into(),
                });
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>> {
        let code = norm(code);
        self.read(move |c| select_org(c, "code", &code)).await
    }

    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>> {
        let domain = norm(domain);
        self.read(move |c| select_org(c, "domain", &domain)).await
    }

    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached(&format!("SELECT {ORG_COLUMNS} FROM orgs ORDER BY code"))?;
            let rows = stmt.query_map([], org_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        let code = norm(code);
        let change = change.clone();
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = select_org(&tx, "code", &code)? else {
                return Err(StoreError::NotFound {
                    what: "organisation",
                    name: code,
                });
            };
            tx.execute(
                "UPDATE orgs SET status = ?1, status_reason = ?2, status_changed_at = ?3 \
                 WHERE code = ?4",
                params![change.status.as_str(), change.reason, change.at, code],
            )?;
            let after = select_org(&tx, "code", &code)?
                .ok_or_else(|| StoreError::Corrupt(format!("organisation {code} vanished")))?;
            tx.commit()?;
            Ok((before, after))
        })
        .await
    }

    async fn change_org_relays(
        &self,
        code: &str,
        add: &[ipnet::IpNet],
        remove: &[ipnet::IpNet],
    ) -> StoreResult<(Org, Org)> {
        let code = norm(code);
        let (add, remove) = (add.to_vec(), remove.to_vec());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = select_org(&tx, "code", &code)? else {
                return Err(StoreError::NotFound {
                    what: "organisation",
                    name: code,
                });
            };
            let networks = changed_relays(&before.relay_networks, &add, &remove);
            tx.execute(
                "UPDATE orgs SET relay_networks = ?1 WHERE code = ?2",
                params![networks_text(&networks), code],
            )?;
            let after = select_org(&tx, "code", &code)?
                .ok_or_else(|| StoreError::Corrupt(format!("organisation {code} vanished")))?;
            tx.commit()?;
            Ok((before, after))
        })
        .await
    }

    async fn create_account(&self, account: &Account) -> StoreResult<()> {
        let account = account_row(account)?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            insert_account(&tx, &account)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()> {
        let accounts = accounts
            .iter()
            .map(account_row)
            .collect::<StoreResult<Vec<_>>>()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for account in &accounts {
                // On error `tx` is dropped: everything rolls back.
                insert_account(&tx, account)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>> {
        let address = address.to_string();
        self.read(move |c| select_account(c, &address)).await
    }

    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>> {
        let org = org.map(norm);
        self.read(move |c| {
            let accounts = match &org {
                Some(org) => {
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE org = ?1 ORDER BY address"
                    ))?;
                    stmt.query_map([org], account_from_row)?
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => {
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY address"
                    ))?;
                    stmt.query_map([], account_from_row)?
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            Ok(accounts)
        })
        .await
    }

    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        let change = change.clone();
        self.change_account(address, move |tx, address| {
            tx.execute(
                "UPDATE accounts SET status = ?1, status_reason = ?2, status_changed_at = ?3 \
                 WHERE address = ?4",
                params![change.status.as_str(), change.reason, change.at, address],
            )
        })
        .await
    }

    async fn set_bulk(&self, address: &Address, bulk: bool) -> StoreResult<(Account, Account)> {
        self.change_account(address, move |tx, address| {
            tx.execute(
                "UPDATE accounts SET bulk = ?1 WHERE address = ?2",
                params![bulk, address],
            )
        })
        .await
    }

    async fn set_quota(
        &self,
        address: &Address,
        quota_bytes: Option<u64>,
    ) -> StoreResult<(Account, Account)> {
        let quota = match quota_bytes {
            None => None,
            Some(q) => Some(i64::try_from(q).map_err(|_| {
                StoreError::Corrupt(format!(
                    "quota_bytes {q} for {address} is larger than the store can hold ({})",
                    i64::MAX
                ))
            })?),
        };
        self.change_account(address, move |tx, address| {
            tx.execute(
                "UPDATE accounts SET quota_bytes = ?1 WHERE address = ?2",
                params![quota, address],
            )
        })
        .await
    }

    async fn set_usage(&self, address: &Address, bytes: u64, at: Timestamp) -> StoreResult<()> {
        let address = address.to_string();
        let bytes = i64::try_from(bytes)
            .map_err(|_| StoreError::Corrupt(format!("usage {bytes} of {address} is too large")))?;
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO mailbox_usage (account, bytes, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (account) DO UPDATE SET bytes = excluded.bytes, \
                 updated_at = excluded.updated_at",
            )?
            .execute(params![address, bytes, at])?;
            Ok(())
        })
        .await
    }

    async fn usage(&self, address: &Address) -> StoreResult<Option<u64>> {
        let address = address.to_string();
        self.read(move |c| {
            let bytes: Option<i64> = c
                .prepare_cached("SELECT bytes FROM mailbox_usage WHERE account = ?1")?
                .query_row([&address], |r| r.get(0))
                .optional()?;
            bytes
                .map(|b| {
                    u64::try_from(b)
                        .map_err(|_| StoreError::Corrupt(format!("usage of {address} is {b}")))
                })
                .transpose()
        })
        .await
    }

    async fn take(
        &self,
        account: &Address,
        takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<TakeOutcome> {
        // Counted in memory under one mutex: no lost update between racing checks.
        let key = account.to_string();
        self.counted(&[&key], |t| t.take(&key, takes, now)).await
    }

    async fn counters(&self, account: &Address, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
        let account = account.to_string();
        if let Some(v) = self.tally.with(&account, |e| e.values(now)) {
            return Ok(v);
        }
        self.read(move |c| all_counters(c, &account, now)).await
    }

    async fn reset_counters(&self, account: &Address, _now: Timestamp) -> StoreResult<()> {
        let account = account.to_string();
        // No flush in between: it would write back counts of before the reset.
        let _gate = self.tally.gate.write().await;
        self.tally.with(&account, |e| {
            for slot in &mut e.counters {
                slot.base = 0;
                slot.unflushed = 0;
            }
        });
        self.write(move |c| {
            c.execute("DELETE FROM rate_counters WHERE account = ?1", [account])?;
            Ok(())
        })
        .await
    }

    async fn taken_locals(&self, domain: &str, locals: &[String]) -> StoreResult<Vec<String>> {
        // Each candidate is normalised exactly like a registered address; a candidate that
        // is not a valid address cannot be registered, so it is not taken.
        let candidates: Vec<(String, String)> = locals
            .iter()
            .filter_map(|l| {
                Address::parse(&format!("{l}@{domain}"))
                    .ok()
                    .map(|a| (l.clone(), a.to_string()))
            })
            .collect();
        self.read(move |c| {
            let tx = c.unchecked_transaction()?; // one snapshot for all candidates
            let mut stmt = tx.prepare_cached("SELECT 1 FROM accounts WHERE address = ?1")?;
            let mut taken = Vec::new();
            for (local, address) in candidates {
                if stmt.exists([&address])? {
                    taken.push(local);
                }
            }
            drop(stmt);
            tx.finish()?;
            Ok(taken)
        })
        .await
    }

    async fn add_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool> {
        let (mailbox, delegate) = (mailbox.to_string(), delegate.to_string());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for name in [&mailbox, &delegate] {
                if select_account(&tx, name)?.is_none() {
                    return Err(StoreError::NotFound {
                        what: "account",
                        name: name.clone(),
                    });
                }
            }
            if mailbox == delegate {
                // An account always sends as itself; nothing to record.
                return Ok(false);
            }
            let added = tx
                .prepare_cached(
                    "INSERT INTO delegations (mailbox, delegate) VALUES (?1, ?2) \
                     ON CONFLICT (mailbox, delegate) DO NOTHING",
                )?
                .execute(params![mailbox, delegate])?;
            tx.commit()?;
            Ok(added == 1)
        })
        .await
    }

    async fn remove_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool> {
        let (mailbox, delegate) = (mailbox.to_string(), delegate.to_string());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if select_account(&tx, &mailbox)?.is_none() {
                return Err(StoreError::NotFound {
                    what: "account",
                    name: mailbox,
                });
            }
            let removed = tx
                .prepare_cached("DELETE FROM delegations WHERE mailbox = ?1 AND delegate = ?2")?
                .execute(params![mailbox, delegate])?;
            tx.commit()?;
            Ok(removed == 1)
        })
        .await
    }

    async fn delegates(&self, mailbox: &Address) -> StoreResult<Vec<Address>> {
        let mailbox = mailbox.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT delegate FROM delegations WHERE mailbox = ?1 ORDER BY delegate",
            )?;
            let rows = stmt
                .query_map([&mailbox], |r| r.get::<_, Parsed<Address>>(0))?
                .map(|r| r.map(|p| p.0))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn delegated_to(&self, delegate: &Address) -> StoreResult<Vec<Address>> {
        let delegate = delegate.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT mailbox FROM delegations WHERE delegate = ?1 ORDER BY mailbox",
            )?;
            let rows = stmt
                .query_map([&delegate], |r| r.get::<_, Parsed<Address>>(0))?
                .map(|r| r.map(|p| p.0))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|c| {
            c.query_row("SELECT 1 FROM orgs LIMIT 1", [], |_| Ok(()))
                .optional()?;
            Ok(())
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn record_login_country(
        &self,
        account: &Address,
        country: &str,
        at: Timestamp,
    ) -> StoreResult<LoginCountry> {
        let (account, country) = (account.to_string(), country.to_owned());
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let known_before = select_countries(&tx, &account)?;
            let new = tx
                .prepare_cached(
                    "INSERT INTO login_countries (account, country, first_seen) \
                     VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                )?
                .execute(params![account, country, at])?
                == 1;
            tx.commit()?;
            Ok(LoginCountry { new, known_before })
        })
        .await
    }

    async fn set_org_quota(&self, code: &str, quota_bytes: Option<u64>) -> StoreResult<(Org, Org)> {
        let code = norm(code);
        let quota = quota_bytes
            .map(|q| stored_bytes(q, &format_args!("default_quota_bytes of {code}")))
            .transpose()?;
        self.write(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let Some(before) = select_org(&tx, "code", &code)? else {
                return Err(StoreError::NotFound {
                    what: "organisation",
                    name: code,
                });
            };
            tx.execute(
                "UPDATE orgs SET default_quota_bytes = ?1 WHERE code = ?2",
                params![quota, code],
            )?;
            let after = select_org(&tx, "code", &code)?
                .ok_or_else(|| StoreError::Corrupt(format!("organisation {code} vanished")))?;
            tx.commit()?;
            Ok((before, after))
        })
        .await
    }

    async fn login_countries(&self, account: &Address) -> StoreResult<Vec<String>> {
        let account = account.to_string();
        self.read(move |c| select_countries(c, &account)).await
    }

    async fn add_usage(&self, address: &Address, bytes: u64) -> StoreResult<u64> {
        let address = address.to_string();
        let bytes = stored_bytes(bytes, &format_args!("delivered size for {address}"))?;
        let now = chrono::Utc::now().timestamp();
        self.write(move |c| {
            // One statement: atomic against other processes sharing the file. A row the
            // mailbox server wrote keeps its `updated_at` (the time of its last report).
            let after: i64 = c
                .prepare_cached(
                    "INSERT INTO mailbox_usage (account, bytes, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (account) DO UPDATE SET bytes = bytes + excluded.bytes \
                     RETURNING bytes",
                )?
                .query_row(params![address, bytes, now], |r| r.get(0))?;
            u64::try_from(after)
                .map_err(|_| StoreError::Corrupt(format!("usage of {address} is {after}")))
        })
        .await
    }

    async fn take_with_org(
        &self,
        account: &Address,
        takes: &[Take],
        org: &str,
        org_takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<JointTakeOutcome> {
        // Both checked and taken under the tally's one mutex: all or nothing.
        let key = account.to_string();
        let org = org_counter_key(org);
        self.counted(&[&key, &org], |t| {
            t.take_with_org(&key, takes, &org, org_takes, now)
        })
        .await
    }

    async fn take_watched(
        &self,
        account: &Address,
        takes: &[Take],
        watch: &Watch,
        message: bool,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome> {
        let key = account.to_string();
        let outcome = self
            .counted(&[&key], |t| {
                t.take_watched(&key, takes, watch, message, now)
            })
            .await?;
        self.written(outcome, watch).await
    }

    async fn org_counters(&self, org: &str, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
        let org = org_counter_key(org);
        if let Some(v) = self.tally.with(&org, |e| e.values(now)) {
            return Ok(v);
        }
        self.read(move |c| all_counters(c, &org, now)).await
    }

    async fn count_rejected(
        &self,
        account: &Address,
        watch: &Watch,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome> {
        let key = account.to_string();
        let outcome = self
            .counted(&[&key], |t| t.count_rejected(&key, watch, now))
            .await?;
        self.written(outcome, watch).await
    }

    async fn send_lock(&self, account: &Address) -> StoreResult<Option<SendLock>> {
        // Asked at every MAIL of a local sender: from memory once the account is loaded.
        let key = account.to_string();
        self.counted(&[&key], |t| t.with(&key, |e| e.lock.clone()))
            .await
    }

    async fn set_send_lock(
        &self,
        account: &Address,
        lock: Option<&SendLock>,
    ) -> StoreResult<Option<SendLock>> {
        let account = account.to_string();
        let lock = lock.cloned();
        // The file first, then memory, with no flush in between.
        let _gate = self.tally.gate.write().await;
        let (key, new) = (account.clone(), lock.clone());
        let stored = self
            .write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let before = select_lock(&tx, &account)?;
                match &lock {
                    Some(l) => store_lock(&tx, &account, l)?,
                    None => {
                        tx.execute("DELETE FROM send_locks WHERE account = ?1", [&account])?;
                        tx.execute(
                            "UPDATE send_watch SET messages = 0, accepted = 0, rejected = 0 \
                         WHERE account = ?1",
                            [&account],
                        )?;
                    }
                }
                tx.commit()?;
                Ok(before)
            })
            .await?;
        // The same change in memory; a lock made there and not yet written is the one
        // replaced.
        let before = self.tally.with(&key, |e| {
            let before = std::mem::replace(&mut e.lock, new.clone());
            e.lock_dirty = false;
            if new.is_none() {
                e.watch.messages = 0;
                e.watch.accepted = 0;
                e.watch.rejected = 0;
            }
            before
        });
        Ok(before.unwrap_or(stored))
    }

    async fn watch_state(&self, account: &Address) -> StoreResult<WatchState> {
        let account = account.to_string();
        if let Some(w) = self.tally.with(&account, |e| e.watch) {
            return Ok(w);
        }
        self.read(move |c| select_watch(c, &account)).await
    }

    async fn flush(&self) -> StoreResult<()> {
        flush(&self.tally, &self.writer).await
    }

    async fn touch(&self, account: &Address, at: Timestamp) -> StoreResult<()> {
        let account = account.to_string();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO last_use (account, at) VALUES (?1, ?2) ON CONFLICT (account) \
                 DO UPDATE SET at = max(at, excluded.at)",
            )?
            .execute(params![account, at])?;
            Ok(())
        })
        .await
    }

    async fn last_use(&self, accounts: &[Address]) -> StoreResult<Vec<Option<Timestamp>>> {
        let accounts: Vec<String> = accounts.iter().map(|a| a.to_string()).collect();
        self.read(move |c| {
            let tx = c.unchecked_transaction()?; // one snapshot for all
            let mut stmt = tx.prepare_cached("SELECT at FROM last_use WHERE account = ?1")?;
            let mut out = Vec::with_capacity(accounts.len());
            for a in &accounts {
                out.push(stmt.query_row([a], |r| r.get(0)).optional()?);
            }
            drop(stmt);
            tx.finish()?;
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{Harness, account, addr, org, store_contract_tests};
    use tempfile::TempDir;

    fn db_path(dir: &TempDir) -> String {
        dir.path()
            .join("mailwarden.db")
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// A fresh database file, opened twice: the store and a peer (another registrar).
    async fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = SqliteStore::open(&path).await.unwrap();
        let peer = SqliteStore::open(&path).await.unwrap();
        Harness::new(Arc::new(store), Arc::new(peer), dir)
    }

    store_contract_tests!(harness);

    /// The in-memory database passes the contract too (its peer is the same instance: a
    /// second `:memory:` open is a different database).
    mod memory {
        use super::*;

        async fn harness() -> Harness {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:").await.unwrap());
            Harness::new(store.clone(), store, ())
        }

        store_contract_tests!(harness);
    }

    fn raw(path: &str) -> Connection {
        Connection::open(path).unwrap()
    }

    #[tokio::test]
    async fn data_survives_closing_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = SqliteStore::open(&path).await.unwrap();
        store.create_org(&org("mpt")).await.unwrap();
        store
            .create_accounts(&[
                account("champa@mpt.gov.la", "mpt"),
                account("dara@mpt.gov.la", "mpt"),
            ])
            .await
            .unwrap();
        let change = StatusChange {
            status: AccountStatus::Suspended,
            reason: Some("audit".into()),
            at: 99,
        };
        let (_, suspended) = store
            .set_account_status(&addr("dara@mpt.gov.la"), &change)
            .await
            .unwrap();
        store.get_org("mpt").await.unwrap(); // a reader connection is open too
        drop(store);

        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.list_orgs().await.unwrap(), vec![org("mpt")]);
        assert_eq!(
            store.list_accounts(None).await.unwrap(),
            vec![account("champa@mpt.gov.la", "mpt"), suspended]
        );
        // Still the same uniqueness after reopening.
        assert!(matches!(
            store
                .create_account(&account("Champa@mpt.gov.la", "mpt"))
                .await,
            Err(StoreError::Conflict { .. })
        ));
    }

    /// The file's count of `counter` for `account` (any window), as another reader sees it.
    fn counted_in_file(path: &str, account: &str, counter: Counter) -> Option<i64> {
        raw(path)
            .query_row(
                "SELECT count FROM rate_counters WHERE account = ?1 AND counter = ?2",
                params![account, counter.name()],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
    }

    const MSG_HOUR: Counter = Counter::new(Measure::Messages, Window::Hour);

    fn one_message() -> [Take; 1] {
        [Take {
            counter: MSG_HOUR,
            n: 1,
            limit: Some(100),
        }]
    }

    #[tokio::test]
    async fn counts_reach_the_file_within_the_flush_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = SqliteStore::open(&path).await.unwrap();
        let a = addr("champa@mpt.gov.la");
        let now = chrono::Utc::now().timestamp();
        for _ in 0..3 {
            assert_eq!(
                store.take(&a, &one_message(), now).await.unwrap(),
                TakeOutcome::Taken
            );
        }
        let deadline = std::time::Instant::now() + 5 * tally::FLUSH_INTERVAL;
        while counted_in_file(&path, "champa@mpt.gov.la", MSG_HOUR) != Some(3) {
            assert!(
                std::time::Instant::now() < deadline,
                "not written within five flush intervals: {:?}",
                counted_in_file(&path, "champa@mpt.gov.la", MSG_HOUR)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn counts_survive_a_flush_or_closing_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let a = addr("champa@mpt.gov.la");
        let now = 1_796_423_281;
        let store = SqliteStore::open(&path).await.unwrap();
        store.take(&a, &one_message(), now).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(
            counted_in_file(&path, "champa@mpt.gov.la", MSG_HOUR),
            Some(1)
        );
        // Counted, not yet written, then the store is dropped (a stop): written at close.
        store.take(&a, &one_message(), now).await.unwrap();
        drop(store);
        assert_eq!(
            counted_in_file(&path, "champa@mpt.gov.la", MSG_HOUR),
            Some(2)
        );
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.counters(&a, now).await.unwrap()[0].count, 2);
        store.take(&a, &one_message(), now).await.unwrap();
        assert_eq!(store.counters(&a, now).await.unwrap()[0].count, 3);
    }

    #[tokio::test]
    async fn another_process_counts_add_up_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let a = addr("champa@mpt.gov.la");
        let now = 1_796_423_281;
        let store = SqliteStore::open(&path).await.unwrap();
        store.take(&a, &one_message(), now).await.unwrap();
        // Another process (not sharing this one's memory) counted 5 in the same window.
        raw(&path)
            .execute(
                "INSERT INTO rate_counters (account, counter, window_start, count) \
                 VALUES (?1, ?2, ?3, 5)",
                params![
                    "champa@mpt.gov.la",
                    MSG_HOUR.name(),
                    MSG_HOUR.window.start(now)
                ],
            )
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(
            counted_in_file(&path, "champa@mpt.gov.la", MSG_HOUR),
            Some(6)
        );
        assert_eq!(store.counters(&a, now).await.unwrap()[0].count, 6);
    }

    #[tokio::test]
    async fn a_lock_is_in_the_file_before_it_is_announced() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = SqliteStore::open(&path).await.unwrap();
        let a = addr("champa@mpt.gov.la");
        let w = Watch {
            burst_floor: 1,
            ..Watch::DEFAULT
        };
        let now = 1_796_423_281;
        store.take_watched(&a, &[], &w, true, now).await.unwrap();
        let WatchOutcome::Tripped(lock) = store.take_watched(&a, &[], &w, true, now).await.unwrap()
        else {
            panic!("two messages pass a floor of one");
        };
        let stored: String = raw(&path)
            .query_row(
                "SELECT lock FROM send_locks WHERE account = 'champa@mpt.gov.la'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(serde_json::from_str::<SendLock>(&stored).unwrap(), lock);
        // Released by an administrator: gone from the file and from memory at once.
        assert_eq!(store.set_send_lock(&a, None).await.unwrap(), Some(lock));
        let left: i64 = raw(&path)
            .query_row("SELECT count(*) FROM send_locks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(
            store.take_watched(&a, &[], &w, true, now).await.unwrap(),
            WatchOutcome::Counted(TakeOutcome::Taken)
        );
    }

    #[tokio::test]
    async fn empty_file_is_migrated_to_the_latest_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        std::fs::File::create(&path).unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        store.create_org(&org("mpt")).await.unwrap();

        let conn = raw(&path);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // Reopening an up-to-date database changes nothing.
        drop(store);
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.get_org("mpt").await.unwrap(), Some(org("mpt")));
    }

    /// A database written before R10 (schema 1) keeps its organisations, which read with no
    /// relay networks, and takes them afterwards.
    #[tokio::test]
    async fn schema_1_database_is_migrated_keeping_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            let conn = raw(&path);
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO orgs VALUES ('mpt', 'Organisation mpt', 'mpt.gov.la', 'active', \
                 NULL, 1700000000, 1700000000)",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.get_org("mpt").await.unwrap(), Some(org("mpt")));
        let (_, after) = store
            .change_org_relays("mpt", &["10.1.0.0/16".parse().unwrap()], &[])
            .await
            .unwrap();
        assert_eq!(after.relay_networks.len(), 1);
        let version: i64 = raw(&path)
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn missing_file_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = crate::store::open(&format!("sqlite:{path}")).await.unwrap();
        assert_eq!(store.kind(), "sqlite");
        store.ping().await.unwrap();
        assert!(std::path::Path::new(&path).exists());
    }

    #[tokio::test]
    async fn missing_data_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/lib/mailwarden/mw.db");
        let store = crate::store::open(&format!("sqlite:{}", path.display()))
            .await
            .unwrap();
        store.ping().await.unwrap();
        assert!(path.exists());
    }

    #[tokio::test]
    async fn newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let newer = MIGRATIONS.len() as i64 + 1;
        raw(&path)
            .pragma_update(None, "user_version", newer)
            .unwrap();
        match SqliteStore::open(&path).await {
            Err(StoreError::Corrupt(msg)) => {
                assert!(msg.contains(&format!("version {newer} is newer")), "{msg}")
            }
            Err(e) => panic!("expected a schema version error, got {e:?}"),
            Ok(_) => panic!("opened a database from a newer version"),
        }
        let conn = raw(&path);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, newer);
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "no migration may run on a newer database");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        std::fs::write(
            &path,
            b"this is not an SQLite database, just some text......",
        )
        .unwrap();
        let err = SqliteStore::open(&path).await.err().expect("refused");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    #[tokio::test]
    async fn unopenable_path_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the data directory should be: neither creatable nor openable.
        std::fs::write(dir.path().join("not-a-dir"), b"").unwrap();
        let path = dir.path().join("not-a-dir/db").to_str().unwrap().to_owned();
        let err = SqliteStore::open(&path).await.err().expect("refused");
        match err {
            StoreError::Unavailable(msg) => assert!(msg.contains("not-a-dir"), "{msg}"),
            e => panic!("expected Unavailable, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn unknown_stored_values_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = SqliteStore::open(&path).await.unwrap();
        store.create_org(&org("mpt")).await.unwrap();
        store.create_org(&org("mof")).await.unwrap();
        store
            .create_accounts(&[
                account("champa@mpt.gov.la", "mpt"),
                account("dara@mpt.gov.la", "mpt"),
                account("kham@mpt.gov.la", "mpt"),
            ])
            .await
            .unwrap();
        let conn = raw(&path);
        conn.execute_batch(
            "UPDATE accounts SET status = 'frozen' WHERE address = 'champa@mpt.gov.la';
             UPDATE accounts SET kind = 'robot' WHERE address = 'dara@mpt.gov.la';
             UPDATE accounts SET quota_bytes = NULL WHERE address = 'kham@mpt.gov.la';
             UPDATE orgs SET status = 'paused' WHERE code = 'mof';",
        )
        .unwrap();
        let corrupt = |r: StoreResult<_>, what: &str| match r {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("expected Corrupt mentioning {what}, got {other:?}"),
        };
        corrupt(
            store
                .get_account(&addr("champa@mpt.gov.la"))
                .await
                .map(drop),
            "frozen",
        );
        corrupt(
            store.get_account(&addr("dara@mpt.gov.la")).await.map(drop),
            "robot",
        );
        corrupt(store.list_accounts(None).await.map(drop), "frozen");
        corrupt(store.get_org("mof").await.map(drop), "paused");
        corrupt(store.list_orgs().await.map(drop), "paused");
        let change = StatusChange {
            status: OrgStatus::Active,
            reason: None,
            at: 1,
        };
        corrupt(
            store.set_org_status("mof", &change).await.map(drop),
            "paused",
        );
        // Healthy rows still read.
        assert!(
            store
                .get_account(&addr("kham@mpt.gov.la"))
                .await
                .unwrap()
                .is_some()
        );
        assert!(store.get_org("mpt").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn out_of_range_quota_is_refused_not_mangled() {
        let store = SqliteStore::open(":memory:").await.unwrap();
        store.create_org(&org("mpt")).await.unwrap();
        let huge = Account {
            quota_bytes: Some(u64::MAX),
            ..account("champa@mpt.gov.la", "mpt")
        };
        assert!(matches!(
            store.create_account(&huge).await,
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(store.get_account(&huge.address).await.unwrap(), None);
        let max = Account {
            quota_bytes: Some(i64::MAX as u64),
            ..huge
        };
        store.create_account(&max).await.unwrap();
        assert_eq!(store.get_account(&max.address).await.unwrap(), Some(max));
    }

    #[tokio::test]
    async fn memory_databases_are_private() {
        let a = SqliteStore::open(":memory:").await.unwrap();
        let b = SqliteStore::open(":memory:").await.unwrap();
        a.create_org(&org("mpt")).await.unwrap();
        assert_eq!(b.get_org("mpt").await.unwrap(), None);
        b.create_org(&org("mpt")).await.unwrap();
    }

    #[tokio::test]
    async fn missing_tables_make_the_store_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let store = SqliteStore::open(&path).await.unwrap();
        store.ping().await.unwrap();
        raw(&path)
            .execute_batch("DROP TABLE accounts; DROP TABLE orgs;")
            .unwrap();
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.create_org(&org("mpt")).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
