//! STUB: the embedded SQLite store.

use super::*;
use crate::model::Address;

pub struct SqliteStore;

impl SqliteStore {
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let _ = path;
        Err(StoreError::Unavailable("not implemented".into()))
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_org(&self, _org: &Org) -> StoreResult<()> {
        todo!()
    }
    async fn get_org(&self, _code: &str) -> StoreResult<Option<Org>> {
        todo!()
    }
    async fn get_org_by_domain(&self, _domain: &str) -> StoreResult<Option<Org>> {
        todo!()
    }
    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        todo!()
    }
    async fn set_org_status(
        &self,
        _code: &str,
        _c: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        todo!()
    }
    async fn create_account(&self, _a: &Account) -> StoreResult<()> {
        todo!()
    }
    async fn create_accounts(&self, _a: &[Account]) -> StoreResult<()> {
        todo!()
    }
    async fn get_account(&self, _a: &Address) -> StoreResult<Option<Account>> {
        todo!()
    }
    async fn list_accounts(&self, _org: Option<&str>) -> StoreResult<Vec<Account>> {
        todo!()
    }
    async fn set_account_status(
        &self,
        _a: &Address,
        _c: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        todo!()
    }
    async fn taken_locals(&self, _d: &str, _l: &[String]) -> StoreResult<Vec<String>> {
        todo!()
    }
    async fn ping(&self) -> StoreResult<()> {
        todo!()
    }
    fn kind(&self) -> &'static str {
        "sqlite"
    }
}
