//! A test-only in-memory `Store` (the SQLite store lives on another branch until merged).
//! One mutex around everything: every write is atomic, as the trait demands.

use async_trait::async_trait;
use mailwarden::model::Address;
use mailwarden::store::*;
use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

#[derive(Default)]
pub struct MemStore {
    data: Mutex<Data>,
    /// When set, every call fails with `Unavailable`.
    pub down: AtomicBool,
}

#[derive(Default)]
struct Data {
    orgs: Vec<Org>,
    accounts: Vec<Account>,
}

impl MemStore {
    fn up(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test store is down".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for MemStore {
    async fn create_org(&self, org: &Org) -> StoreResult<()> {
        self.up()?;
        let mut d = self.data.lock().unwrap();
        if d.orgs
            .iter()
            .any(|o| o.code == org.code || o.domain == org.domain)
        {
            return Err(StoreError::Conflict {
                what: "organisation",
                name: org.code.clone(),
            });
        }
        d.orgs.push(org.clone());
        Ok(())
    }
    async fn get_org(&self, code: &str) -> StoreResult<Option<Org>> {
        self.up()?;
        Ok(self
            .data
            .lock()
            .unwrap()
            .orgs
            .iter()
            .find(|o| o.code == code)
            .cloned())
    }
    async fn get_org_by_domain(&self, domain: &str) -> StoreResult<Option<Org>> {
        self.up()?;
        Ok(self
            .data
            .lock()
            .unwrap()
            .orgs
            .iter()
            .find(|o| o.domain == domain)
            .cloned())
    }
    async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
        self.up()?;
        let mut v = self.data.lock().unwrap().orgs.clone();
        v.sort_by(|a, b| a.code.cmp(&b.code));
        Ok(v)
    }
    async fn set_org_status(
        &self,
        code: &str,
        change: &StatusChange<OrgStatus>,
    ) -> StoreResult<(Org, Org)> {
        self.up()?;
        let mut d = self.data.lock().unwrap();
        let o = d
            .orgs
            .iter_mut()
            .find(|o| o.code == code)
            .ok_or(StoreError::NotFound {
                what: "organisation",
                name: code.into(),
            })?;
        let before = o.clone();
        o.status = change.status;
        o.status_reason = change.reason.clone();
        o.status_changed_at = change.at;
        Ok((before, o.clone()))
    }
    async fn create_account(&self, account: &Account) -> StoreResult<()> {
        self.create_accounts(std::slice::from_ref(account)).await
    }
    async fn create_accounts(&self, accounts: &[Account]) -> StoreResult<()> {
        self.up()?;
        let mut d = self.data.lock().unwrap();
        for (i, a) in accounts.iter().enumerate() {
            if !d.orgs.iter().any(|o| o.code == a.org) {
                return Err(StoreError::NotFound {
                    what: "organisation",
                    name: a.org.clone(),
                });
            }
            if d.accounts.iter().any(|x| x.address == a.address)
                || accounts[..i].iter().any(|x| x.address == a.address)
            {
                return Err(StoreError::Conflict {
                    what: "address",
                    name: a.address.to_string(),
                });
            }
        }
        d.accounts.extend(accounts.iter().cloned());
        Ok(())
    }
    async fn get_account(&self, address: &Address) -> StoreResult<Option<Account>> {
        self.up()?;
        Ok(self
            .data
            .lock()
            .unwrap()
            .accounts
            .iter()
            .find(|a| &a.address == address)
            .cloned())
    }
    async fn list_accounts(&self, org: Option<&str>) -> StoreResult<Vec<Account>> {
        self.up()?;
        let mut v: Vec<Account> = self
            .data
            .lock()
            .unwrap()
            .accounts
            .iter()
            .filter(|a| org.is_none_or(|o| a.org == o))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(v)
    }
    async fn set_account_status(
        &self,
        address: &Address,
        change: &StatusChange<AccountStatus>,
    ) -> StoreResult<(Account, Account)> {
        self.up()?;
        let mut d = self.data.lock().unwrap();
        let a = d
            .accounts
            .iter_mut()
            .find(|a| &a.address == address)
            .ok_or(StoreError::NotFound {
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
        self.up()?;
        let d = self.data.lock().unwrap();
        Ok(locals
            .iter()
            .filter(|l| {
                d.accounts
                    .iter()
                    .any(|a| a.address.domain() == domain && a.address.local() == l.as_str())
            })
            .cloned()
            .collect())
    }
    async fn ping(&self) -> StoreResult<()> {
        self.up()
    }
    fn kind(&self) -> &'static str {
        "memory"
    }
}
