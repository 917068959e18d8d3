//! The read-through cache the mail path uses for directory lookups.
//!
//! Account and organisation records, and the send-as delegates of a mailbox (R8), are cached
//! per name for `store.cache_ttl`, including "not found" answers. Writes made through this process (the admin API) invalidate the
//! affected entries at once, so a suspension takes effect for the next RCPT. Each store call
//! is bounded by `store.timeout`; a timeout or error is a `StoreFailure` for the engine.
//!
//! An invalidation also wins over lookups already in flight: each table carries a
//! generation, bumped by every invalidation, and a lookup stores what it read only if the
//! generation did not move while it was reading. Otherwise a lookup that read "active" just
//! before a suspension could put "active" back into the cache for a whole TTL.
//!
//! Times come from `tokio::time`, so tests drive expiry with a paused clock.

use super::{Account, DirectoryChange, Org, Store, StoreError};
use crate::engine::{AddressFacts, Lookup, StoreFailure};
use crate::model::Address;
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{sync::broadcast, time::Instant};

pub struct CachedDirectory {
    store: Arc<dyn Store>,
    ttl: Duration,
    max_entries: usize,
    timeout: Duration,
    orgs: Mutex<Table<String, Option<Org>>>,
    accounts: Mutex<Table<Address, Option<Account>>>,
    /// R8: who may send as a mailbox. A delegation change is announced (and invalidated)
    /// as a change of the mailbox's account.
    delegates: Mutex<Table<Address, Vec<Address>>>,
}

/// One cache table: entries with the time they were read, and the invalidation generation.
struct Table<K, V> {
    generation: u64,
    entries: HashMap<K, (Instant, V)>,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            generation: 0,
            entries: HashMap::new(),
        }
    }
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
            orgs: Mutex::new(Table::default()),
            accounts: Mutex::new(Table::default()),
            delegates: Mutex::new(Table::default()),
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

    /// The organisation owning `domain` (lower case), from the cache when fresh.
    pub async fn org_by_domain(&self, domain: &str) -> Result<Option<Org>, StoreFailure> {
        let generation = match fresh(&self.orgs, domain, self.ttl) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let org = self.bounded(self.store.get_org_by_domain(domain)).await?;
        insert(
            &self.orgs,
            domain.to_owned(),
            org.clone(),
            generation,
            self.max_entries,
            self.ttl,
        );
        Ok(org)
    }

    async fn account(&self, addr: &Address) -> Result<Option<Account>, StoreFailure> {
        let generation = match fresh(&self.accounts, addr, self.ttl) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let account = self.bounded(self.store.get_account(addr)).await?;
        insert(
            &self.accounts,
            addr.clone(),
            account.clone(),
            generation,
            self.max_entries,
            self.ttl,
        );
        Ok(account)
    }

    /// The accounts that may send as `mailbox` (R8), from the cache when fresh.
    pub async fn delegates(&self, mailbox: &Address) -> Result<Vec<Address>, StoreFailure> {
        let generation = match fresh(&self.delegates, mailbox, self.ttl) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let delegates = self.bounded(self.store.delegates(mailbox)).await?;
        insert(
            &self.delegates,
            mailbox.clone(),
            delegates.clone(),
            generation,
            self.max_entries,
            self.ttl,
        );
        Ok(delegates)
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

    /// Applies the changes announced on a store's feed (changes made through other daemons
    /// sharing the store) until the feed closes.
    pub async fn follow_changes(&self, mut changes: broadcast::Receiver<DirectoryChange>) {
        loop {
            match changes.recv().await {
                Ok(DirectoryChange::Account(a)) => self.invalidate_account(&a),
                // Organisation records are cached by domain; an organisation change can
                // affect every account lookup: forget everything, as the admin API does.
                Ok(DirectoryChange::Org(_) | DirectoryChange::All)
                | Err(broadcast::error::RecvError::Lagged(_)) => self.invalidate_all(),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Forgets one account (after a change to it, its delegations included).
    pub fn invalidate_account(&self, addr: &Address) {
        for_table(&self.accounts, addr);
        for_table(&self.delegates, addr);
        fn for_table<V>(table: &Mutex<Table<Address, V>>, addr: &Address) {
            let mut table = lock(table);
            table.generation += 1;
            table.entries.remove(addr);
        }
    }

    /// Forgets everything (after an organisation change, or on reload).
    pub fn invalidate_all(&self) {
        for_table(&self.orgs);
        for_table(&self.accounts);
        for_table(&self.delegates);
        fn for_table<K, V>(table: &Mutex<Table<K, V>>) {
            let mut table = lock(table);
            table.generation += 1;
            table.entries.clear();
        }
    }
}

/// The tables hold plain data that is consistent after any panic: poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fresh cached value, or (on a miss) the generation a fill must match.
fn fresh<K, Q, V>(table: &Mutex<Table<K, V>>, key: &Q, ttl: Duration) -> Result<V, u64>
where
    K: std::borrow::Borrow<Q> + Hash + Eq,
    Q: Hash + Eq + ?Sized,
    V: Clone,
{
    let table = lock(table);
    match table.entries.get(key) {
        Some((at, v)) if at.elapsed() < ttl => Ok(v.clone()),
        _ => Err(table.generation),
    }
}

/// Stores what a lookup read, unless an invalidation happened since it started.
fn insert<K: Hash + Eq, V>(
    table: &Mutex<Table<K, V>>,
    key: K,
    v: V,
    generation: u64,
    max: usize,
    ttl: Duration,
) {
    let mut table = lock(table);
    if table.generation != generation {
        return;
    }
    let map = &mut table.entries;
    if map.len() >= max {
        // Bounded memory: drop expired entries, and everything if that is not enough.
        map.retain(|_, (at, _)| at.elapsed() < ttl);
        if map.len() >= max {
            map.clear();
        }
    }
    map.insert(key, (Instant::now(), v));
}

#[cfg(test)]
mod tests {
    //! The cache against the real SQLite store, with tokio's clock paused: expiry is driven by
    //! `tokio::time::advance`, and a store that never answers times out at once (auto-advance).

    use super::*;
    use crate::store::testing::{TestStore, account, addr, org};
    use crate::store::{AccountStatus, OrgStatus, StatusChange};
    use tokio::time::advance;

    const TTL: Duration = Duration::from_secs(60);
    const TIMEOUT: Duration = Duration::from_secs(1);

    /// The real (file-backed SQLite) store with `mpt` and an active `champa@mpt.gov.la`.
    async fn sqlite() -> Arc<TestStore> {
        let store = TestStore::new().await;
        store.create_org(&org("mpt")).await.unwrap();
        store
            .create_account(&account("champa@mpt.gov.la", "mpt"))
            .await
            .unwrap();
        store
    }

    fn cache(store: Arc<dyn Store>) -> CachedDirectory {
        CachedDirectory::new(store, TTL, 1000, TIMEOUT)
    }

    fn suspend(at: i64) -> StatusChange<AccountStatus> {
        StatusChange {
            status: AccountStatus::Suspended,
            reason: None,
            at,
        }
    }

    async fn status(c: &CachedDirectory, a: &str) -> Option<AccountStatus> {
        c.lookup(&addr(a)).await.unwrap().account.map(|a| a.status)
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_behind_the_cache_shows_only_after_the_ttl() {
        let store = sqlite().await;
        let c = cache(store.clone());
        let champa = "champa@mpt.gov.la";
        assert_eq!(status(&c, champa).await, Some(AccountStatus::Active));
        store
            .set_account_status(&addr(champa), &suspend(1))
            .await
            .unwrap();
        assert_eq!(status(&c, champa).await, Some(AccountStatus::Active));
        advance(TTL - Duration::from_secs(1)).await;
        assert_eq!(status(&c, champa).await, Some(AccountStatus::Active));
        advance(Duration::from_secs(1)).await;
        assert_eq!(status(&c, champa).await, Some(AccountStatus::Suspended));
    }

    #[tokio::test(start_paused = true)]
    async fn hits_are_served_without_the_store_and_a_broken_store_is_a_failure() {
        let store = sqlite().await;
        let c = cache(store.clone());
        let champa = addr("champa@mpt.gov.la");
        let cached = c.lookup(&champa).await.unwrap();
        assert!(cached.is_local() && cached.account.is_some());

        // Break the store behind the cache: every query now fails.
        rusqlite::Connection::open(store.path())
            .unwrap()
            .execute_batch("DROP TABLE accounts; DROP TABLE orgs;")
            .unwrap();
        assert_eq!(c.lookup(&champa).await, Ok(cached));
        advance(TTL).await;
        let err = c.lookup(&champa).await.unwrap_err();
        assert!(err.0.contains("store unavailable"), "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_account_shows_a_change_at_once() {
        let store = sqlite().await;
        let c = cache(store.clone());
        let champa = "champa@mpt.gov.la";
        assert_eq!(status(&c, champa).await, Some(AccountStatus::Active));
        store
            .set_account_status(&addr(champa), &suspend(1))
            .await
            .unwrap();
        c.invalidate_account(&addr("Champa@MPT.gov.la"));
        assert_eq!(status(&c, champa).await, Some(AccountStatus::Suspended));
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_cached_until_invalidated() {
        let store = sqlite().await;
        let c = cache(store.clone());
        let dara = "dara@mpt.gov.la";
        assert_eq!(status(&c, dara).await, None);
        store.create_account(&account(dara, "mpt")).await.unwrap();
        assert_eq!(status(&c, dara).await, None);
        c.invalidate_account(&addr(dara));
        assert_eq!(status(&c, dara).await, Some(AccountStatus::Active));
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_all_shows_an_organisation_change() {
        let store = sqlite().await;
        let c = cache(store.clone());
        let champa = addr("champa@mpt.gov.la");
        let before = c.lookup(&champa).await.unwrap();
        assert_eq!(before.org.map(|o| o.status), Some(OrgStatus::Active));
        let cease = StatusChange {
            status: OrgStatus::Ceased,
            reason: None,
            at: 1,
        };
        store.set_org_status("mpt", &cease).await.unwrap();
        let still = c.lookup(&champa).await.unwrap();
        assert_eq!(still.org.map(|o| o.status), Some(OrgStatus::Active));
        c.invalidate_all();
        let after = c.lookup(&champa).await.unwrap();
        assert_eq!(after.org.map(|o| o.status), Some(OrgStatus::Ceased));
    }

    #[tokio::test(start_paused = true)]
    async fn delegates_are_cached_until_the_mailbox_is_invalidated() {
        let store = sqlite().await;
        store
            .create_account(&account("cabinet@mpt.gov.la", "mpt"))
            .await
            .unwrap();
        let c = cache(store.clone());
        let cabinet = addr("cabinet@mpt.gov.la");
        assert_eq!(c.delegates(&cabinet).await, Ok(vec![]));
        store
            .add_delegate(&cabinet, &addr("champa@mpt.gov.la"))
            .await
            .unwrap();
        // Cached (also the empty answer) ...
        assert_eq!(c.delegates(&cabinet).await, Ok(vec![]));
        // ... until the mailbox changes, as the admin API and the change feed announce it.
        c.invalidate_account(&cabinet);
        assert_eq!(
            c.delegates(&cabinet).await,
            Ok(vec![addr("champa@mpt.gov.la")])
        );
        store
            .remove_delegate(&cabinet, &addr("champa@mpt.gov.la"))
            .await
            .unwrap();
        assert_eq!(c.delegates(&cabinet).await.unwrap().len(), 1);
        advance(TTL).await;
        assert_eq!(c.delegates(&cabinet).await, Ok(vec![]));
        // A broken store is a failure, not "no delegates".
        store
            .add_delegate(&cabinet, &addr("champa@mpt.gov.la"))
            .await
            .unwrap();
        c.invalidate_all();
        rusqlite::Connection::open(store.path())
            .unwrap()
            .execute_batch("DROP TABLE delegations;")
            .unwrap();
        assert!(c.delegates(&cabinet).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_foreign_domain_is_not_local() {
        let store = sqlite().await;
        let c = cache(store);
        let facts = c.lookup(&addr("someone@example.com")).await.unwrap();
        assert_eq!(facts, AddressFacts::default());
        assert!(!facts.is_local());
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_does_not_answer_is_a_failure_after_the_timeout() {
        let store = sqlite().await;
        let c = cache(store.clone());
        let closed = store.hold("champa@mpt.gov.la").await;
        let started = Instant::now();
        let err = c.lookup(&addr("champa@mpt.gov.la")).await.unwrap_err();
        assert!(err.0.contains("did not answer within 1s"), "{err:?}");
        assert_eq!(started.elapsed(), TIMEOUT);
        // Nothing was cached from the abandoned lookup.
        drop(closed);
        assert_eq!(
            status(&c, "champa@mpt.gov.la").await,
            Some(AccountStatus::Active)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_wins_over_a_lookup_in_flight() {
        let store = sqlite().await;
        let c = Arc::new(cache(store.clone()));
        let champa = addr("champa@mpt.gov.la");

        // A lookup reads "active" from the store and is held before it can cache it ...
        let closed = store.hold("champa@mpt.gov.la").await;
        let in_flight = tokio::spawn({
            let (c, champa) = (c.clone(), champa.clone());
            async move { c.lookup(&champa).await }
        });
        store.reached().await;
        // ... while the admin suspends the account and invalidates it.
        store
            .set_account_status(&champa, &suspend(1))
            .await
            .unwrap();
        c.invalidate_account(&champa);
        drop(closed);
        let stale = in_flight.await.unwrap().unwrap();
        assert_eq!(stale.account.map(|a| a.status), Some(AccountStatus::Active));

        // The next lookup must see the suspension, not the value read before it.
        assert_eq!(
            status(&c, "champa@mpt.gov.la").await,
            Some(AccountStatus::Suspended)
        );
    }
}
