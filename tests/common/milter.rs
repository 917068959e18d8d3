//! Test support: the real SQLite store on a temp file (behind a fault-injection wrapper),
//! a seeded directory, a milter spawned on 127.0.0.1:0, and log capture.

#![allow(dead_code)]

use async_trait::async_trait;
use mailwarden::{
    checker::Checker,
    config::{Config, ListenAddr},
    model::Address,
    net::Listener,
    store::{
        Account, AccountKind, AccountStatus, Org, OrgStatus, StatusChange, Store, StoreError,
        StoreResult, cache::CachedDirectory, sqlite::SqliteStore,
    },
    telemetry::Metrics,
};
use std::{
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// `SqliteStore` on a temp file, plus two faults a test can switch on: `fail` makes every
/// call fail as an outage would; `panic_on` makes the lookup of one address panic (a bug
/// in a lower layer).
pub struct TestStore {
    inner: SqliteStore,
    _dir: tempfile::TempDir,
    pub fail: AtomicBool,
    pub panic_on: Mutex<Option<Address>>,
}

impl TestStore {
    pub async fn new() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mailwarden.db");
        let inner = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        TestStore {
            inner,
            _dir: dir,
            fail: AtomicBool::new(false),
            panic_on: Mutex::new(None),
        }
    }

    fn check(&self) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test outage".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for TestStore {
    async fn create_org(&self, org: &Org) -> StoreResult<()> {
        self.check()?;
        self.inner.create_org(org).await
    }
    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>> {
        self.check()?;
        self.inner.get_org(code).await
    }
    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>> {
        self.check()?;
        self.inner.get_org_by_domain(domain).await
    }
    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        self.check()?;
        self.inner.list_orgs().await
    }
    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        self.check()?;
        self.inner.set_org_status(code, change).await
    }
    async fn create_account(&self, account: &Account) -> StoreResult<()> {
        self.check()?;
        self.inner.create_account(account).await
    }
    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()> {
        self.check()?;
        self.inner.create_accounts(accounts).await
    }
    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>> {
        self.check()?;
        if self.panic_on.lock().unwrap().as_ref() == Some(address) {
            panic!("injected failure looking up {address}");
        }
        self.inner.get_account(address).await
    }
    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>> {
        self.check()?;
        self.inner.list_accounts(org).await
    }
    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        self.check()?;
        self.inner.set_account_status(address, change).await
    }
    async fn taken_locals(&self, domain: &str, locals: &[String]) -> StoreResult<Vec<String>> {
        self.check()?;
        self.inner.taken_locals(domain, locals).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.check()?;
        self.inner.ping().await
    }
    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

fn org(code: &str, status: OrgStatus) -> Org {
    Org {
        code: code.into(),
        name: format!("Organisation {code}"),
        domain: format!("{code}.gov.la"),
        status,
        status_reason: None,
        created_at: 0,
        status_changed_at: 0,
    }
}

fn account(addr: &str, status: AccountStatus) -> Account {
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

pub fn checker(config_toml: &str, store: Arc<TestStore>) -> Arc<Checker> {
    let config = Config::from_toml(config_toml).expect("test config is valid");
    let directory = CachedDirectory::new(
        store,
        config.store.cache_ttl,
        config.store.cache_size,
        config.store.timeout,
    );
    Arc::new(Checker::new(config, directory, Arc::new(Metrics::new())))
}

/// A milter served on a fresh listener, stopped like the daemon stops it.
pub struct Milter {
    pub addr: ListenAddr,
    pub checker: Arc<Checker>,
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
    pub serve: JoinHandle<io::Result<()>>,
}

impl Milter {
    pub async fn spawn(config_toml: &str, store: Arc<TestStore>) -> Milter {
        Self::spawn_with(config_toml, store, Default::default()).await
    }

    pub async fn spawn_with(
        config_toml: &str,
        store: Arc<TestStore>,
        features: mailwarden::milter::Features,
    ) -> Milter {
        let listener = Listener::bind(&"inet:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self::serve_on(listener, checker(config_toml, store), features)
    }

    pub fn serve_on(
        listener: Listener,
        checker: Arc<Checker>,
        features: mailwarden::milter::Features,
    ) -> Milter {
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let serve = tokio::spawn(mailwarden::milter::serve_with(
            listener,
            checker.clone(),
            shutdown.clone(),
            sessions.clone(),
            features,
        ));
        Milter {
            addr,
            checker,
            shutdown,
            sessions,
            serve,
        }
    }

    /// Cancels, waits for `serve` to return, then drains `sessions` as the daemon does
    /// (bounded, so a broken drain fails the test instead of hanging it).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.serve.await.unwrap().unwrap();
        self.sessions.close();
        tokio::time::timeout(Duration::from_secs(10), self.sessions.wait())
            .await
            .expect("milter sessions drained");
    }
}

/// Captures log output of the current thread (tests run on a current-thread runtime, so
/// the milter's tasks log here too).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(sub)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Lines mentioning `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}
