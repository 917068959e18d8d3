//! The real SQLite store, behind a switch that makes every call fail with `Unavailable`
//! (to test how the API answers during a store outage).

use async_trait::async_trait;
use mailwarden::model::Address;
use mailwarden::store::{sqlite::SqliteStore, *};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct FlakyStore {
    inner: SqliteStore,
    pub down: AtomicBool,
}

impl FlakyStore {
    pub async fn open(path: &std::path::Path) -> FlakyStore {
        FlakyStore {
            inner: SqliteStore::open(path.to_str().unwrap()).await.unwrap(),
            down: AtomicBool::new(false),
        }
    }

    fn up(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test store switched off".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for FlakyStore {
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
    async fn ping(&self) -> StoreResult<()> {
        self.up()?;
        self.inner.ping().await
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}
