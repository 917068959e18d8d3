//! The store every in-process integration test uses: the real `SqliteStore` on a temporary
//! file behind switches that inject faults, and the directory the mail-path tests seed.
//!
//! (The library's unit tests have the same kind of wrapper in `src/store/testing.rs`; test
//! targets cannot share `#[cfg(test)]` code with the library.)

use async_trait::async_trait;
use mailwarden::model::Address;
use mailwarden::store::{
    Account, AccountKind, AccountStatus, CounterValue, JointTakeOutcome, LoginCountry, Org,
    OrgStatus, SendLock, StatusChange, Store, StoreError, StoreResult, Take, TakeOutcome,
    Timestamp, Watch, WatchOutcome, WatchState, sqlite::SqliteStore,
};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

/// `SqliteStore` on a temporary file, plus two faults a test can switch on: `down` makes
/// every call fail as an outage would; `panic_on` makes the lookup of one address panic (a
/// bug in a lower layer).
pub struct TestStore {
    inner: SqliteStore,
    _dir: tempfile::TempDir,
    pub down: AtomicBool,
    pub panic_on: Mutex<Option<Address>>,
}

impl TestStore {
    /// An empty store.
    pub async fn new() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailwarden.db");
        let inner = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        TestStore {
            inner,
            _dir: dir,
            down: AtomicBool::new(false),
            panic_on: Mutex::new(None),
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn up(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test store switched off".into()));
        }
        Ok(())
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
        self.inner.get_org_by_domain(domain).await
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
        if self.panic_on.lock().unwrap().as_ref() == Some(address) {
            panic!("injected failure looking up {address}");
        }
        self.inner.get_account(address).await
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

// ---- the seeded directory ---------------------------------------------------------------------

/// Organisation `code` (domain `<code>.gov.la`) in `status`.
pub fn org(code: &str, status: OrgStatus) -> Org {
    Org {
        code: code.into(),
        name: format!("Organisation {code}"),
        domain: format!("{code}.gov.la"),
        status,
        status_reason: None,
        created_at: 0,
        status_changed_at: 0,
        relay_networks: Vec::new(),
        default_quota_bytes: None,
    }
}

/// A person account of the organisation its domain names (`x@mpt.gov.la` belongs to `mpt`).
pub fn account(addr: &str, status: AccountStatus) -> Account {
    let address: Address = addr.parse().unwrap();
    Account {
        org: address.domain().split('.').next().unwrap().into(),
        address,
        kind: AccountKind::Person,
        status,
        status_reason: None,
        display_name: None,
        created_at: 0,
        status_changed_at: 0,
        quota_bytes: None,
        bulk: false,
    }
}

/// `mpt.gov.la` (active): champa, bounmy (active), somsak (suspended), old (withdrawn),
/// newbie (pending). `xyz.gov.la` (ceased): vilay (active).
pub async fn seeded_store() -> Arc<TestStore> {
    let s = Arc::new(TestStore::new().await);
    seed(s.as_ref()).await;
    s
}

/// Registers the test directory in `store`.
pub async fn seed(s: &dyn Store) {
    s.create_org(&org("mpt", OrgStatus::Active)).await.unwrap();
    s.create_org(&org("xyz", OrgStatus::Ceased)).await.unwrap();
    s.create_accounts(&[
        account("champa@mpt.gov.la", AccountStatus::Active),
        account("bounmy@mpt.gov.la", AccountStatus::Active),
        account("somsak@mpt.gov.la", AccountStatus::Suspended),
        account("old@mpt.gov.la", AccountStatus::Withdrawn),
        account("newbie@mpt.gov.la", AccountStatus::Pending),
        account("vilay@xyz.gov.la", AccountStatus::Active),
    ])
    .await
    .unwrap();
}
