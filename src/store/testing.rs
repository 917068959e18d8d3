//! Test support for the library's unit tests: directory fixtures, and [`TestStore`], the real
//! SQLite store on a temporary file behind switches that inject faults.
//!
//! Integration tests (`tests/`) cannot see `#[cfg(test)]` code; they have their own wrapper in
//! `tests/common/store.rs`.

use super::sqlite::SqliteStore;
use super::*;
use crate::model::Address;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{Notify, OwnedRwLockWriteGuard, RwLock};

// ---- fixtures ---------------------------------------------------------------------------------

pub fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

/// An active organisation `code`, domain `<code>.gov.la`.
pub fn org(code: &str) -> Org {
    Org {
        code: code.into(),
        name: format!("Organisation {code}"),
        domain: format!("{code}.gov.la"),
        status: OrgStatus::Active,
        status_reason: None,
        created_at: 1_700_000_000,
        status_changed_at: 1_700_000_000,
        relay_networks: Vec::new(),
        default_quota_bytes: None,
    }
}

/// [`org`] with another status.
pub fn org_with(code: &str, status: OrgStatus) -> Org {
    Org {
        status,
        ..org(code)
    }
}

/// An active person account of organisation `org`.
pub fn account(address: &str, org: &str) -> Account {
    Account {
        address: addr(address),
        org: org.into(),
        kind: AccountKind::Person,
        status: AccountStatus::Active,
        status_reason: None,
        display_name: None,
        created_at: 1_700_000_100,
        status_changed_at: 1_700_000_100,
        quota_bytes: None,
        bulk: false,
    }
}

/// An account of the organisation its domain names (`x@mpt.gov.la` belongs to `mpt`), in
/// `status`.
pub fn account_with(address: &str, status: AccountStatus) -> Account {
    let a = addr(address);
    let org = a.domain().split('.').next().unwrap().to_owned();
    Account {
        status,
        ..account(address, &org)
    }
}

/// Registers the directory the mail-path tests use: `mpt.gov.la` (active) with `champa`
/// (active), `somsak` (suspended), `gone` (withdrawn), `newbie` (pending); `old.gov.la`
/// (ceased) with `boss` (active).
pub async fn seed(s: &dyn Store) {
    s.create_org(&org("mpt")).await.unwrap();
    s.create_org(&org_with("old", OrgStatus::Ceased))
        .await
        .unwrap();
    s.create_accounts(&[
        account_with("champa@mpt.gov.la", AccountStatus::Active),
        account_with("somsak@mpt.gov.la", AccountStatus::Suspended),
        account_with("gone@mpt.gov.la", AccountStatus::Withdrawn),
        account_with("newbie@mpt.gov.la", AccountStatus::Pending),
        account_with("boss@old.gov.la", AccountStatus::Active),
    ])
    .await
    .unwrap();
}

// ---- the store --------------------------------------------------------------------------------

/// `SqliteStore` on a temporary file, with two faults a test can switch on:
/// - `down`: every call fails with `Unavailable`, as in an outage;
/// - [`hold`](TestStore::hold): lookups of one name read from the store, then wait until the
///   test lets them go (to catch a request mid-decision, or race a lookup in flight).
pub struct TestStore {
    inner: SqliteStore,
    dir: tempfile::TempDir,
    pub down: AtomicBool,
    /// The name (domain or address) whose lookups are held, and the gate they wait at: a
    /// held lookup takes a read lock, which waits while [`Held`] owns the write lock.
    held: Mutex<Option<String>>,
    gate: Arc<RwLock<()>>,
    reached: Notify,
}

/// Lookups of the held name wait while this lives; dropping it lets them go and stops
/// holding the name.
#[must_use = "the lookups are released when this is dropped"]
pub struct Held<'a> {
    store: &'a TestStore,
    _gate: OwnedRwLockWriteGuard<()>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // The name first, then (as the fields drop) the gate: no lookup is held afterwards.
        *self.store.held.lock().unwrap() = None;
    }
}

impl TestStore {
    /// An empty store.
    pub async fn new() -> Arc<TestStore> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailwarden.db");
        let inner = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        Arc::new(TestStore {
            inner,
            dir,
            down: AtomicBool::new(false),
            held: Mutex::new(None),
            gate: Arc::new(RwLock::new(())),
            reached: Notify::new(),
        })
    }

    /// A store holding the directory of [`seed`].
    pub async fn seeded() -> Arc<TestStore> {
        let s = TestStore::new().await;
        seed(s.as_ref()).await;
        s
    }

    /// The database file, for tests that break it behind the store's back.
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("mailwarden.db")
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Holds every later lookup of `name` (`get_org_by_domain` of a domain, `get_account` of
    /// an address) after it has read, until the returned guard is dropped.
    pub async fn hold(&self, name: &str) -> Held<'_> {
        let gate = self.gate.clone().write_owned().await;
        *self.held.lock().unwrap() = Some(name.to_owned());
        Held {
            store: self,
            _gate: gate,
        }
    }

    /// Waits until a held lookup has read and is waiting (returns at once if one got there
    /// before this was called).
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    fn up(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test store is down".into()));
        }
        Ok(())
    }

    /// Lets a lookup of `name` go on, or makes it wait at the gate if `name` is held.
    async fn gate<T>(&self, name: &str, read: StoreResult<T>) -> StoreResult<T> {
        let held = self.held.lock().unwrap().as_deref() == Some(name);
        if held {
            self.reached.notify_one();
            let _pass = self.gate.read().await;
        }
        read
    }
}

#[async_trait]
impl Store for TestStore {
    async fn create_org(&self, org: &Org) -> StoreResult<()> {
        self.up()?;
        self.inner.create_org(org).await
    }
    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>> {
        self.up()?;
        self.inner.get_org(code).await
    }
    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>> {
        self.up()?;
        let read = self.inner.get_org_by_domain(domain).await;
        self.gate(domain, read).await
    }
    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        self.up()?;
        self.inner.list_orgs().await
    }
    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        self.up()?;
        self.inner.set_org_status(code, change).await
    }
    async fn change_org_relays(
        &self,
        code: &str,
        add: &[ipnet::IpNet],
        remove: &[ipnet::IpNet],
    ) -> StoreResult<(Org, Org)> {
        self.up()?;
        self.inner.change_org_relays(code, add, remove).await
    }
    async fn create_account(&self, account: &Account) -> StoreResult<()> {
        self.up()?;
        self.inner.create_account(account).await
    }
    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()> {
        self.up()?;
        self.inner.create_accounts(accounts).await
    }
    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>> {
        self.up()?;
        let read = self.inner.get_account(address).await;
        self.gate(&address.to_string(), read).await
    }
    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>> {
        self.up()?;
        self.inner.list_accounts(org).await
    }
    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        self.up()?;
        self.inner.set_account_status(address, change).await
    }
    async fn taken_locals(&self, domain: &str, locals: &[String]) -> StoreResult<Vec<String>> {
        self.up()?;
        self.inner.taken_locals(domain, locals).await
    }
    async fn set_bulk(&self, address: &Address, bulk: bool) -> StoreResult<(Account, Account)> {
        self.up()?;
        self.inner.set_bulk(address, bulk).await
    }
    async fn take(
        &self,
        account: &Address,
        takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<TakeOutcome> {
        self.up()?;
        self.inner.take(account, takes, now).await
    }
    async fn counters(&self, account: &Address, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
        self.up()?;
        self.inner.counters(account, now).await
    }
    async fn reset_counters(&self, account: &Address, now: Timestamp) -> StoreResult<()> {
        self.up()?;
        self.inner.reset_counters(account, now).await
    }
    async fn set_quota(
        &self,
        address: &Address,
        quota_bytes: Option<u64>,
    ) -> StoreResult<(Account, Account)> {
        self.up()?;
        self.inner.set_quota(address, quota_bytes).await
    }
    async fn set_usage(&self, address: &Address, bytes: u64, at: Timestamp) -> StoreResult<()> {
        self.up()?;
        self.inner.set_usage(address, bytes, at).await
    }
    async fn usage(&self, address: &Address) -> StoreResult<Option<u64>> {
        self.up()?;
        self.inner.usage(address).await
    }
    async fn set_org_quota(&self, code: &str, quota_bytes: Option<u64>) -> StoreResult<(Org, Org)> {
        self.up()?;
        self.inner.set_org_quota(code, quota_bytes).await
    }
    async fn add_usage(&self, address: &Address, bytes: u64) -> StoreResult<u64> {
        self.up()?;
        self.inner.add_usage(address, bytes).await
    }
    async fn take_with_org(
        &self,
        account: &Address,
        takes: &[Take],
        org: &str,
        org_takes: &[Take],
        now: Timestamp,
    ) -> StoreResult<JointTakeOutcome> {
        self.up()?;
        self.inner
            .take_with_org(account, takes, org, org_takes, now)
            .await
    }
    async fn org_counters(&self, org: &str, now: Timestamp) -> StoreResult<Vec<CounterValue>> {
        self.up()?;
        self.inner.org_counters(org, now).await
    }
    async fn take_watched(
        &self,
        account: &Address,
        takes: &[Take],
        watch: &Watch,
        message: bool,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome> {
        self.up()?;
        self.inner
            .take_watched(account, takes, watch, message, now)
            .await
    }
    async fn count_rejected(
        &self,
        account: &Address,
        watch: &Watch,
        now: Timestamp,
    ) -> StoreResult<WatchOutcome> {
        self.up()?;
        self.inner.count_rejected(account, watch, now).await
    }
    async fn send_lock(&self, account: &Address) -> StoreResult<Option<SendLock>> {
        self.up()?;
        self.inner.send_lock(account).await
    }
    async fn set_send_lock(
        &self,
        account: &Address,
        lock: Option<&SendLock>,
    ) -> StoreResult<Option<SendLock>> {
        self.up()?;
        self.inner.set_send_lock(account, lock).await
    }
    async fn watch_state(&self, account: &Address) -> StoreResult<WatchState> {
        self.up()?;
        self.inner.watch_state(account).await
    }
    async fn touch(&self, account: &Address, at: Timestamp) -> StoreResult<()> {
        self.up()?;
        self.inner.touch(account, at).await
    }
    async fn last_use(&self, accounts: &[Address]) -> StoreResult<Vec<Option<Timestamp>>> {
        self.up()?;
        self.inner.last_use(accounts).await
    }
    async fn flush(&self) -> StoreResult<()> {
        self.up()?;
        self.inner.flush().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.up()?;
        self.inner.ping().await
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn record_login_country(
        &self,
        account: &Address,
        country: &str,
        at: Timestamp,
    ) -> StoreResult<LoginCountry> {
        self.up()?;
        self.inner.record_login_country(account, country, at).await
    }
    async fn login_countries(&self, account: &Address) -> StoreResult<Vec<String>> {
        self.up()?;
        self.inner.login_countries(account).await
    }
    async fn add_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool> {
        self.up()?;
        self.inner.add_delegate(mailbox, delegate).await
    }
    async fn remove_delegate(&self, mailbox: &Address, delegate: &Address) -> StoreResult<bool> {
        self.up()?;
        self.inner.remove_delegate(mailbox, delegate).await
    }
    async fn delegates(&self, mailbox: &Address) -> StoreResult<Vec<Address>> {
        self.up()?;
        self.inner.delegates(mailbox).await
    }
    async fn delegated_to(&self, delegate: &Address) -> StoreResult<Vec<Address>> {
        self.up()?;
        self.inner.delegated_to(delegate).await
    }
}
