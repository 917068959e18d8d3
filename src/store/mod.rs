//! Persistent state behind one trait: the directory of organisations and accounts.
//!
//! `sqlite.rs` is the embedded default (`sqlite:PATH`); `redis.rs` implements the same trait
//! on Redis (standalone, TLS, Sentinel, Cluster) for several daemons sharing one directory.
//! `contract.rs` is the one test suite every backend must pass. `cache.rs` wraps any
//! store with the read-through cache the mail path uses.

pub mod cache;
#[cfg(test)]
pub mod contract;
pub mod counters;
pub mod redis;
pub mod sqlite;
pub mod tally;
#[cfg(test)]
pub mod testing;
mod types;
pub mod watch;

pub use counters::*;
pub use types::*;
pub use watch::{LockCause, SendLock, Watch, WatchOutcome, WatchState};

use crate::model::Address;
use async_trait::async_trait;
use std::sync::Arc;

/// Errors a store returns. `Unavailable` is the one the mail path maps to a tempfail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The name (or organisation code/domain) is already registered (R4).
    #[error("{what} {name} is already registered")]
    Conflict { what: &'static str, name: String },
    #[error("{what} {name} does not exist")]
    NotFound { what: &'static str, name: String },
    /// The backend could not answer (I/O error, timeout, server down).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The data in the store is not what this version expects.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The directory store. All names are compared in their normalised (lower-case) form.
///
/// Every write is atomic: `create_*` either inserts or returns `Conflict` even when two
/// registrars race; `create_accounts` inserts all rows or none.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Registers an organisation; `Conflict` when its code or domain is taken.
    async fn create_org(&self, org: &Org) -> StoreResult<()>;
    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>>;
    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>>;
    async fn list_orgs(&self) -> StoreResult<Vec<Org>>;
    /// Changes an organisation's status; returns (before, after). `NotFound` if unknown.
    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)>;
    /// Adds and removes authorised relay networks of an organisation (R10) in one atomic
    /// change (see [`changed_relays`]); the record before and after. `NotFound` if it does not
    /// exist.
    async fn change_org_relays(
        &self,
        code: &str,
        add: &[ipnet::IpNet],
        remove: &[ipnet::IpNet],
    ) -> StoreResult<(Org, Org)>;

    /// Registers one account; `Conflict` when the address is taken, `NotFound` when its
    /// organisation does not exist.
    async fn create_account(&self, account: &Account) -> StoreResult<()>;
    /// Registers many accounts in one transaction: all or none.
    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()>;
    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>>;
    /// Accounts, optionally of one organisation, ordered by address.
    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>>;
    /// Changes an account's status; returns (before, after). `NotFound` if unknown.
    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)>;
    /// Which of `locals` (in `domain`) are already registered; used to suggest free names.
    async fn taken_locals(&self, domain: &str, locals: &[String]) -> StoreResult<Vec<String>>;

    /// Grants (`true`) or withdraws the bulk permission (R14: no sending limits) of an
    /// account; returns (before, after). `NotFound` if unknown.
    async fn set_bulk(&self, address: &Address, bulk: bool) -> StoreResult<(Account, Account)>;

    /// Sets (or with `None` removes) an account's granted storage in bytes (R13); returns
    /// (before, after). `NotFound` if unknown.
    async fn set_quota(
        &self,
        address: &Address,
        quota_bytes: Option<u64>,
    ) -> StoreResult<(Account, Account)>;
    /// Records an account's mailbox usage in bytes, as reported by its mailbox server (R13).
    /// The latest report wins.
    async fn set_usage(&self, address: &Address, bytes: u64, at: Timestamp) -> StoreResult<()>;
    /// The last usage reported for an account; `None` if none was.
    async fn usage(&self, address: &Address) -> StoreResult<Option<u64>>;

    /// Sending limits (R14): adds each take's `n` to its counter (in the window containing
    /// `now`) only if no counter would pass its limit; otherwise changes nothing and names
    /// the first counter in the way. One atomic step, also against other instances sharing
    /// the store. See [`counters`] for the windows.
    async fn take(
        &self,
        account: &Address,
        takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<TakeOutcome>;
    /// The account's counters ([`Counter::ALL`], in that order) in the windows containing
    /// `now`; 0 for a counter never incremented in its window.
    async fn counters(&self, account: &Address, now: Timestamp) -> StoreResult<Vec<CounterValue>>;
    /// Sets the account's counters in the windows containing `now` back to 0.
    async fn reset_counters(&self, account: &Address, now: Timestamp) -> StoreResult<()>;

    /// Cheap liveness check for health metrics.
    async fn ping(&self) -> StoreResult<()>;
    /// A short name for logs and metrics (`sqlite`, `redis`).
    fn kind(&self) -> &'static str;

    /// The feed of changes made through any instance sharing this store (other daemons
    /// included), so the mail path's cache can drop what they changed. `None` (the default):
    /// the backend has no feed, and cached entries simply expire after `store.cache_ttl`.
    /// Call from within the tokio runtime.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<DirectoryChange>> {
        None
    }

    /// Health counters of a networked backend (round trips, failures, latency), which the
    /// daemon exposes on `/metrics`. `None` (the default): the backend keeps none (SQLite is
    /// in-process; its failures show in `store_errors`).
    fn stats(&self) -> Option<StoreStats> {
        None
    }

    /// Owner alerts (R16): records that `account` logged in from `country` (ISO 3166-1
    /// alpha-2, upper case) at `at`, and says whether the country is new for the account and
    /// which ones were recorded before. One atomic step, also against other instances sharing
    /// the store: when several logins from one new country race, exactly one sees `new`.
    async fn record_login_country(
        &self,
        account: &Address,
        country: &str,
        at: Timestamp,
    ) -> StoreResult<LoginCountry>;
    /// The countries recorded for `account` (R16), sorted; empty when none is.
    async fn login_countries(&self, account: &Address) -> StoreResult<Vec<String>>;

    /// Send-as delegation (R8): lets the account `delegate` send as the account `mailbox`
    /// (a shared role mailbox like `cabinet@` delegated to named people). Returns `true` when
    /// the delegation is new, `false` when it already existed (or `delegate` is `mailbox`:
    /// an account always sends as itself). `NotFound` when either account is not registered. Announced on the change feed as a change of `mailbox`.
    async fn add_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool>;
    /// Ends a delegation (R8). Returns `true` when it existed. `NotFound` when `mailbox` is
    /// not a registered account. Announced as a change of `mailbox`.
    async fn remove_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool>;
    /// The accounts that may send as `mailbox` (R8), ordered by address; empty when none
    /// (or when `mailbox` is not registered).
    async fn delegates(&self, mailbox: &Address) -> StoreResult<Vec<Address>>;
    /// The mailboxes `delegate` may send as (R8), ordered by address.
    async fn delegated_to(&self, delegate: &Address) -> StoreResult<Vec<Address>>;

    /// Sets (or with `None` removes) an organisation's default storage quota in bytes (R13:
    /// the quota of its accounts that have none of their own); returns (before, after).
    /// `NotFound` if unknown. Announced on the change feed like other organisation changes.
    async fn set_org_quota(&self, code: &str, quota_bytes: Option<u64>) -> StoreResult<(Org, Org)>;

    /// Adds `bytes` to an account's mailbox usage (R13: mailwarden counting a delivered
    /// message); an account without a reported usage starts from 0. Atomic against other
    /// instances and against the mailbox server's reports ([`Store::set_usage`]: the next
    /// report replaces the sum). Returns the usage after the addition.
    async fn add_usage(&self, address: &Address, bytes: u64) -> StoreResult<u64>;

    /// Sending limits (R14) with per-organisation limits: [`Store::take`] of `takes` on the
    /// account's counters and of `org_takes` on organisation `org`'s counters, all or
    /// nothing (a refusal leaves both unchanged once the call returns). The account's
    /// counters are checked first; `by_org` says whose counter refused. With `org_takes`
    /// empty this is exactly [`Store::take`].
    async fn take_with_org(
        &self,
        account: &Address,
        takes: &[Take],
        org: &str,
        org_takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<JointTakeOutcome>;
    /// Organisation `org`'s counters ([`Counter::ALL`], in that order) in the windows
    /// containing `now`; 0 for a counter never incremented in its window.
    async fn org_counters(&self, org: &str, now: Timestamp) -> StoreResult<Vec<CounterValue>>;

    /// Compromise response (R15): [`Store::take`] and, in the same atomic step, the
    /// account's sending pattern (see [`watch`]). A locked account gets `Locked` and nothing
    /// is counted; a refused take gets `Counted(Refused)` and nothing is counted; otherwise
    /// the takes are added, one accepted recipient (with `message`, also one message) is
    /// counted in the pattern, and when that makes it abnormal the lock is stored (if
    /// `watch.lock`) and returned as `Tripped`. `takes` may be empty (bulk accounts, R14 off).
    async fn take_watched(
        &self,
        account: &Address,
        takes: &[Take],
        watch: &Watch,
        message: bool,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome>;
    /// R15: counts one recipient of the account refused at RCPT; `Tripped` when that makes
    /// the refused share too high (stored if `watch.lock`), `Locked` when it already was
    /// (nothing counted), else `Counted(Taken)`.
    async fn count_rejected(
        &self,
        account: &Address,
        watch: &Watch,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome>;
    /// R15: the account's sending lock, if any.
    async fn send_lock(&self, account: &Address) -> StoreResult<Option<SendLock>>;
    /// R15: stores a lock (an administrator's, or replacing one), or with `None` releases
    /// it and clears the current hour's counts of the pattern (the baseline stays), so the
    /// burst that caused the lock does not lock again at once. Returns the lock before.
    async fn set_send_lock(
        &self,
        account: &Address,
        lock: Option<&SendLock>,
    ) -> StoreResult<Option<SendLock>>;
    /// R15: the account's sending pattern as stored (all 0 when never counted).
    async fn watch_state(&self, account: &Address) -> StoreResult<WatchState>;

    /// Activity (R20): records that the account authenticated at `at`; an earlier time than
    /// the one stored is ignored (instances may write late).
    async fn touch(&self, account: &Address, at: Timestamp) -> StoreResult<()>;
    /// Activity (R20): the last recorded use of each of `accounts`, in the same order;
    /// `None` for an account never seen.
    async fn last_use(&self, accounts: &[Address]) -> StoreResult<Vec<Option<Timestamp>>>;

    /// Writes out whatever the store keeps in memory before writing it (the embedded store's
    /// sending counters, see [`tally`]); called at shutdown. Stores that write through have
    /// nothing to do.
    async fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// Round-trip statistics of a networked store, shared with the metrics registry (the
/// handles are cheap clones of the same atomics).
#[derive(Debug, Clone)]
pub struct StoreStats {
    /// Round trips to the server, retries included.
    pub round_trips: prometheus_client::metrics::counter::Counter,
    /// Round trips that failed (connection, timeout, server error).
    pub failures: prometheus_client::metrics::counter::Counter,
    /// Time per call (one round trip, or two when it was retried), in seconds.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            round_trips: Default::default(),
            failures: Default::default(),
            // 50 µs .. ~1.6 s: loopback Redis answers in tens of microseconds; the upper
            // buckets show timeouts approaching `timeout=`.
            latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16),
            ),
        }
    }
}

/// A change announced on a store's [`Store::changes`] feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryChange {
    /// This account was registered or changed.
    Account(Address),
    /// This organisation (code) was registered or changed.
    Org(String),
    /// Anything may have changed: a large import, or the feed was interrupted and
    /// announcements may have been missed.
    All,
}

/// Opens the store named by a URL from the config. Errors never contain a password.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, String> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite(path) => sqlite::SqliteStore::open(&path)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
            .map_err(|e| format!("{url}: {e}")),
        StoreUrl::Redis(parsed) => redis::RedisStore::open_parsed(&parsed)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
            .map_err(|e| e.to_string()),
    }
}

/// `url` with any password replaced by `***`: what logs may show of a `store.url`.
pub fn redact_url(url: &str) -> String {
    redis::redact(url)
}

/// A parsed `store.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:PATH` (relative paths are relative to the working directory), or `sqlite::memory:`.
    Sqlite(String),
    /// `redis://`, `rediss://`, `redis+sentinel://`, `redis+cluster://`; the syntax is
    /// documented in [`redis::RedisUrl`]'s module:
    ///
    /// ```text
    /// redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
    /// rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]        (OPTIONS may add ca=PATH)
    /// redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]
    /// redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][?OPTIONS]
    /// OPTIONS: prefix=NAME (default mw), timeout=DURATION (default 2s),
    ///          sentinel_user=, sentinel_password= (Sentinel only)
    /// ```
    ///
    /// Default ports: 6379, and 26379 for sentinels. User and password are percent-encoded
    /// and authenticate to the data nodes.
    Redis(redis::RedisUrl),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(format!(
                    "{url:?}: sqlite URL needs a path (sqlite:/var/lib/mailwarden/mailwarden.db)"
                ));
            }
            return Ok(StoreUrl::Sqlite(path.to_owned()));
        }
        if redis::url::SCHEMES.iter().any(|s| url.starts_with(s)) {
            return redis::RedisUrl::parse(url).map(StoreUrl::Redis);
        }
        Err(format!(
            "{:?} is not a store URL (sqlite:PATH, redis://, rediss://, redis+sentinel://, redis+cluster://)",
            redact_url(url)
        ))
    }
}
