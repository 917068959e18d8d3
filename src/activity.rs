//! R20 (Art. 16.6): activity tracking.
//!
//! - **Last use**: when a client authenticates (SASL login seen at MAIL, through either
//!   front-end), the account's last use is written to the store — at most once per
//!   `[activity] write_interval` per account and daemon ([`Tracker`]), so a busy account
//!   costs one store write every few minutes, not one per message.
//! - **Inactive accounts**: [`inactive`] picks the accounts whose last use (or creation, if
//!   never used) is older than a cutoff; the admin API's `GET /v1/users?inactive_for=365d`
//!   and `mailwarden user list --inactive-for 365d` use it.
//! - **Automatic withdrawal** (off unless `[activity] auto_withdraw_after` is set):
//!   [`withdraw_inactive`] withdraws such accounts with a reason; the daemon runs it every
//!   `check_interval` and audits each withdrawal (`user.withdraw` by `mailwarden`). Time is
//!   passed in, so tests drive it with any clock.

use crate::model::Address;
use crate::store::{Account, AccountStatus, StatusChange, Store, StoreResult, Timestamp};
use std::{collections::HashMap, sync::Mutex, time::Duration};

/// Remembers when this daemon last wrote each account's last use.
pub struct Tracker {
    written: Mutex<HashMap<Address, Timestamp>>,
    capacity: usize,
}

impl Tracker {
    /// Remembers at most `capacity` accounts (then forgets them all: the cost is one extra
    /// write per account, never unbounded memory).
    pub fn new(capacity: usize) -> Tracker {
        Tracker {
            written: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Whether `account`'s use at `now` should be written (and if so, notes it as written).
    pub fn due(&self, account: &Address, now: Timestamp, interval: Duration) -> bool {
        let mut map = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let interval = i64::try_from(interval.as_secs()).unwrap_or(i64::MAX);
        if let Some(&at) = map.get(account) {
            if now >= at && now - at < interval {
                return false;
            }
        }
        if map.len() >= self.capacity {
            map.clear();
        }
        map.insert(account.clone(), now);
        true
    }

    /// The write for `account` failed: try again at its next use.
    pub fn forget(&self, account: &Address) {
        let mut map = self.written.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(account);
    }
}

/// When an account was last active: its last use, else its creation.
pub fn last_active(account: &Account, last_use: Option<Timestamp>) -> Timestamp {
    last_use.unwrap_or(account.created_at)
}

/// The accounts (with their last use) not active since `cutoff`, in the given order.
/// Withdrawn accounts are left out: there is nothing left to do about them.
pub fn inactive(
    accounts: Vec<Account>,
    last_uses: Vec<Option<Timestamp>>,
    cutoff: Timestamp,
) -> Vec<(Account, Option<Timestamp>)> {
    accounts
        .into_iter()
        .zip(last_uses)
        .filter(|(a, used)| a.status != AccountStatus::Withdrawn && last_active(a, *used) < cutoff)
        .collect()
}

fn date(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// Withdraws every account not active for `after` before `now`; returns each change
/// (before, after). An account changed meanwhile (e.g. withdrawn by hand) is skipped.
pub async fn withdraw_inactive(
    store: &dyn Store,
    after: Duration,
    now: Timestamp,
) -> StoreResult<Vec<(Account, Account)>> {
    let cutoff = now.saturating_sub(i64::try_from(after.as_secs()).unwrap_or(i64::MAX));
    let accounts = store.list_accounts(None).await?;
    let addresses: Vec<Address> = accounts.iter().map(|a| a.address.clone()).collect();
    let uses = store.last_use(&addresses).await?;
    let mut done = Vec::new();
    for (account, used) in inactive(accounts, uses, cutoff) {
        let since = last_active(&account, used);
        let what = if used.is_some() {
            "last authenticated use"
        } else {
            "never used; registered"
        };
        let change = StatusChange {
            status: AccountStatus::Withdrawn,
            reason: Some(format!(
                "inactive: {what} {} (more than {} days ago; [activity] auto_withdraw_after)",
                date(since),
                after.as_secs() / 86_400
            )),
            at: now,
        };
        let (before, after_change) = store.set_account_status(&account.address, &change).await?;
        if before.status == AccountStatus::Withdrawn {
            continue;
        }
        done.push((before, after_change));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{TestStore, account, addr, org};

    const DAY: i64 = 86_400;
    /// 2026-12-04 22:28:01 UTC
    const NOW: Timestamp = 1_796_423_281;

    #[test]
    fn the_tracker_writes_once_per_interval_and_stays_bounded() {
        let t = Tracker::new(2);
        let a = addr("champa@mpt.gov.la");
        let five = Duration::from_secs(300);
        assert!(t.due(&a, NOW, five));
        assert!(!t.due(&a, NOW + 299, five));
        assert!(t.due(&a, NOW + 300, five));
        t.forget(&a);
        assert!(t.due(&a, NOW + 301, five), "a failed write is retried");
        // Past its capacity it forgets everything rather than grow.
        assert!(t.due(&addr("kham@mpt.gov.la"), NOW, five));
        assert!(t.due(&addr("noy@mpt.gov.la"), NOW, five));
        assert!(t.written.lock().unwrap().len() <= 2);
    }

    #[test]
    fn inactive_uses_last_use_or_creation_and_skips_withdrawn() {
        let used = account("used@mpt.gov.la", "mpt"); // created 1_700_000_100
        let never = account("never@mpt.gov.la", "mpt");
        let gone = Account {
            status: AccountStatus::Withdrawn,
            ..account("gone@mpt.gov.la", "mpt")
        };
        let cutoff = 1_700_000_100 + 10;
        let out = inactive(
            vec![used, never, gone],
            vec![Some(cutoff), None, None],
            cutoff,
        );
        let names: Vec<String> = out.iter().map(|(a, _)| a.address.to_string()).collect();
        assert_eq!(names, ["never@mpt.gov.la"]);
    }

    #[tokio::test]
    async fn withdrawal_takes_only_accounts_idle_past_the_limit() {
        let store = TestStore::new().await;
        store.create_org(&org("mpt")).await.unwrap();
        let created = NOW - 800 * DAY;
        for name in ["old", "recent", "never", "fresh"] {
            let a = Account {
                created_at: if name == "fresh" { NOW - DAY } else { created },
                ..account(&format!("{name}@mpt.gov.la"), "mpt")
            };
            store.create_account(&a).await.unwrap();
        }
        store
            .touch(&addr("old@mpt.gov.la"), NOW - 731 * DAY)
            .await
            .unwrap();
        store
            .touch(&addr("recent@mpt.gov.la"), NOW - 10 * DAY)
            .await
            .unwrap();
        let after = Duration::from_secs(730 * DAY as u64);
        let done = withdraw_inactive(&*store, after, NOW).await.unwrap();
        let names: Vec<String> = done.iter().map(|(b, _)| b.address.to_string()).collect();
        assert_eq!(names, ["never@mpt.gov.la", "old@mpt.gov.la"]);
        let (before, now_) = &done[1];
        assert_eq!(before.status, AccountStatus::Active);
        assert_eq!(now_.status, AccountStatus::Withdrawn);
        assert_eq!(now_.status_changed_at, NOW);
        let reason = now_.status_reason.as_deref().unwrap();
        assert!(
            reason.contains("last authenticated use 2024-12-03"),
            "{reason}"
        );
        let never = &done[0].1;
        assert!(
            never
                .status_reason
                .as_deref()
                .unwrap()
                .contains("never used"),
            "{never:?}"
        );
        // Run again a day later: nothing more to do.
        assert!(
            withdraw_inactive(&*store, after, NOW + DAY)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
