//! Test support: an in-memory `Store` (until the SQLite store lands on `main`), a seeded
//! directory, a milter spawned on 127.0.0.1:0, and log capture.

#![allow(dead_code)]

use async_trait::async_trait;
use mailwarden::{
    checker::Checker,
    config::{Config, ListenAddr},
    model::Address,
    net::Listener,
    store::{
        Account, AccountKind, AccountStatus, Org, OrgStatus, StatusChange, Store, StoreError,
        StoreResult, cache::CachedDirectory,
    },
    telemetry::Metrics,
};
use std::{
    collections::BTreeMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A directory held in memory. `fail` makes every lookup fail (store outage);
/// `panic_on` makes the lookup of one address panic (a bug in a lower layer).
#[derive(Default)]
pub struct MemStore {
    orgs: Mutex<BTreeMap<String, Org>>,
    accounts: Mutex<BTreeMap<Address, Account>>,
    pub fail: AtomicBool,
    pub panic_on: Mutex<Option<Address>>,
}

impl MemStore {
    fn check(&self) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test outage".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MemStore {
    async fn create_org(&self, org: &Org) -> StoreResult<()> {
        self.check()?;
        let mut orgs = self.orgs.lock().unwrap();
        if orgs.contains_key(&org.code) || orgs.values().any(|o| o.domain == org.domain) {
            return Err(StoreError::Conflict {
                what: "organisation",
                name: org.code.clone(),
            });
        }
        orgs.insert(org.code.clone(), org.clone());
        Ok(())
    }
    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>> {
        self.check()?;
        Ok(self.orgs.lock().unwrap().get(code).cloned())
    }
    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>> {
        self.check()?;
        Ok(self
            .orgs
            .lock()
            .unwrap()
            .values()
            .find(|o| o.domain == domain)
            .cloned())
    }
    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        self.check()?;
        Ok(self.orgs.lock().unwrap().values().cloned().collect())
    }
    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        self.check()?;
        let mut orgs = self.orgs.lock().unwrap();
        let org = orgs.get_mut(code).ok_or(StoreError::NotFound {
            what: "organisation",
            name: code.into(),
        })?;
        let before = org.clone();
        org.status = change.status;
        org.status_reason = change.reason.clone();
        org.status_changed_at = change.at;
        Ok((before, org.clone()))
    }
    async fn create_account(&self, account: &Account) -> StoreResult<()> {
        self.create_accounts(std::slice::from_ref(account)).await
    }
    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()> {
        self.check()?;
        let mut map = self.accounts.lock().unwrap();
        for a in accounts {
            if map.contains_key(&a.address) {
                return Err(StoreError::Conflict {
                    what: "account",
                    name: a.address.to_string(),
                });
            }
        }
        for a in accounts {
            map.insert(a.address.clone(), a.clone());
        }
        Ok(())
    }
    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>> {
        self.check()?;
        if self.panic_on.lock().unwrap().as_ref() == Some(address) {
            panic!("injected failure looking up {address}");
        }
        Ok(self.accounts.lock().unwrap().get(address).cloned())
    }
    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>> {
        self.check()?;
        Ok(self
            .accounts
            .lock()
            .unwrap()
            .values()
            .filter(|a| org.is_none_or(|o| a.org == o))
            .cloned()
            .collect())
    }
    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        self.check()?;
        let mut map = self.accounts.lock().unwrap();
        let a = map.get_mut(address).ok_or(StoreError::NotFound {
            what: "account",
            name: address.to_string(),
        })?;
        let before = a.clone();
        a.status = change.status;
        a.status_reason = change.reason.clone();
        a.status_changed_at = change.at;
        Ok((before, a.clone()))
    }
    async fn taken_locals(&self, domain: &str, locals: &[String]) -> StoreResult<Vec<String>> {
        self.check()?;
        let map = self.accounts.lock().unwrap();
        Ok(locals
            .iter()
            .filter(|l| {
                map.keys()
                    .any(|a| a.domain() == domain && a.local() == l.as_str())
            })
            .cloned()
            .collect())
    }
    async fn ping(&self) -> StoreResult<()> {
        self.check()
    }
    fn kind(&self) -> &'static str {
        "memory"
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
pub async fn seeded_store() -> Arc<MemStore> {
    let s = Arc::new(MemStore::default());
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
    s
}

pub fn checker(config_toml: &str, store: Arc<MemStore>) -> Arc<Checker> {
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
    pub async fn spawn(config_toml: &str, store: Arc<MemStore>) -> Milter {
        Self::spawn_with(config_toml, store, Default::default()).await
    }

    pub async fn spawn_with(
        config_toml: &str,
        store: Arc<MemStore>,
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
