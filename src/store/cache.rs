//! The read-through cache the mail path uses for directory lookups.
//!
//! Account and organisation records are cached per name for `store.cache_ttl`, including
//! "not found" answers. Writes made through this process (the admin API) invalidate the
//! affected entries at once, so a suspension takes effect for the next RCPT. Each store call
//! is bounded by `store.timeout`; a timeout or error is a `StoreFailure` for the engine.

use super::{Account, Org, Store, StoreError};
use crate::engine::{AddressFacts, Lookup, StoreFailure};
use crate::model::Address;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub struct CachedDirectory {
    store: Arc<dyn Store>,
    ttl: Duration,
    max_entries: usize,
    timeout: Duration,
    orgs: Mutex<HashMap<String, (Instant, Option<Org>)>>,
    accounts: Mutex<HashMap<Address, (Instant, Option<Account>)>>,
}

impl CachedDirectory {
    pub fn new(
        store: Arc<dyn Store>,
        ttl: Duration,
        max_entries: usize,
        timeout: Duration,
    ) -> Self {
        CachedDirectory {
            store,
            ttl,
            max_entries,
            timeout,
            orgs: Mutex::new(HashMap::new()),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Org and account for an address: from the cache when fresh, else from the store.
    pub async fn lookup(&self, addr: &Address) -> Lookup {
        let org = self.org_by_domain(addr.domain()).await?;
        if org.is_none() {
            return Ok(AddressFacts::default());
        }
        let account = self.account(addr).await?;
        Ok(AddressFacts { org, account })
    }

    async fn org_by_domain(&self, domain: &str) -> Result<Option<Org>, StoreFailure> {
        if let Some(hit) = fresh(&self.orgs, domain, self.ttl) {
            return Ok(hit);
        }
        let org = self.bounded(self.store.get_org_by_domain(domain)).await?;
        insert(
            &self.orgs,
            domain.to_owned(),
            org.clone(),
            self.max_entries,
            self.ttl,
        );
        Ok(org)
    }

    async fn account(&self, addr: &Address) -> Result<Option<Account>, StoreFailure> {
        if let Some(hit) = fresh(&self.accounts, addr, self.ttl) {
            return Ok(hit);
        }
        let account = self.bounded(self.store.get_account(addr)).await?;
        insert(
            &self.accounts,
            addr.clone(),
            account.clone(),
            self.max_entries,
            self.ttl,
        );
        Ok(account)
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreFailure> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreFailure(e.to_string())),
            Err(_) => Err(StoreFailure(format!(
                "store did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Forgets one account (after a change to it).
    pub fn invalidate_account(&self, addr: &Address) {
        self.accounts.lock().unwrap().remove(addr);
    }

    /// Forgets everything (after an organisation change, or on reload).
    pub fn invalidate_all(&self) {
        self.orgs.lock().unwrap().clear();
        self.accounts.lock().unwrap().clear();
    }
}

fn fresh<K, Q, V>(map: &Mutex<HashMap<K, (Instant, V)>>, key: &Q, ttl: Duration) -> Option<V>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
    V: Clone,
{
    let map = map.lock().unwrap();
    match map.get(key) {
        Some((at, v)) if at.elapsed() < ttl => Some(v.clone()),
        _ => None,
    }
}

fn insert<K: std::hash::Hash + Eq, V>(
    map: &Mutex<HashMap<K, (Instant, V)>>,
    key: K,
    v: V,
    max: usize,
    ttl: Duration,
) {
    let mut map = map.lock().unwrap();
    if map.len() >= max {
        // Bounded memory: drop expired entries, and everything if that is not enough.
        map.retain(|_, (at, _)| at.elapsed() < ttl);
        if map.len() >= max {
            map.clear();
        }
    }
    map.insert(key, (Instant::now(), v));
}
