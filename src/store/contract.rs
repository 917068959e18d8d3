//! The store contract: one test suite every backend must pass.
//!
//! Each check is an `async fn(Harness)` below. A backend runs them all with
//!
//! ```ignore
//! async fn harness() -> Harness { /* a fresh, empty store and a peer on the same data */ }
//! crate::store::contract::store_contract_tests!(harness);
//! ```
//!
//! which expands to one `#[tokio::test]` per check, so a failure names the broken rule.
//!
//! Ordering contract: lists are ordered by key as text (`code`; the address as
//! `local@domain`), i.e. byte order of the lower-case strings.

use super::*;
use std::any::Any;
use tokio::sync::Barrier;

/// What a check gets: a fresh, empty store, and a peer instance on the same data.
pub struct Harness {
    pub store: Arc<dyn Store>,
    /// A second, independently opened instance on the same data: what another daemon (or
    /// another node) would have. Used to race two registrars.
    pub peer: Arc<dyn Store>,
    /// Whatever must live as long as the test (a temporary directory, a server).
    _keep: Box<dyn Any + Send>,
}

impl Harness {
    pub fn new(store: Arc<dyn Store>, peer: Arc<dyn Store>, keep: impl Any + Send) -> Harness {
        Harness {
            store,
            peer,
            _keep: Box::new(keep),
        }
    }
}

/// Expands to one `#[tokio::test]` per contract check, each on a fresh harness from
/// `$harness` (an async fn returning [`Harness`]).
macro_rules! store_contract_tests {
    ($harness:path) => {
        $crate::store::contract::store_contract_tests!(@each $harness;
            org_roundtrip,
            org_lookups_ignore_case,
            org_conflicts_on_code_or_domain,
            list_orgs_is_ordered_by_code,
            org_status_change_returns_before_and_after,
            org_status_change_of_unknown_is_not_found,
            org_relays_change_atomically_and_canonically,
            org_relays_of_unknown_is_not_found,
            racing_relay_changes_are_all_kept,
            account_roundtrip,
            account_needs_its_organisation,
            account_names_are_unique_ignoring_case,
            bulk_import_inserts_all,
            bulk_import_with_a_taken_name_inserts_nothing,
            bulk_import_with_an_internal_duplicate_inserts_nothing,
            bulk_import_with_a_missing_organisation_inserts_nothing,
            list_accounts_filters_and_orders,
            account_status_change_returns_before_and_after,
            account_status_change_of_unknown_is_not_found,
            taken_locals_reports_registered_candidates,
            ping_answers,
            peer_sees_committed_writes,
            racing_registrations_of_one_name_have_one_winner,
            two_registrars_racing_have_one_winner,
            two_registrars_racing_for_an_organisation_have_one_winner,
            bulk_import_racing_a_registration_is_all_or_nothing,
            bulk_permission_is_granted_and_withdrawn,
            take_counts_up_to_the_limit,
            take_is_all_or_nothing,
            counters_follow_their_windows,
            counters_are_per_account_and_reset,
            concurrent_takes_from_two_instances_stop_at_exactly_the_limit,
            quota_and_usage_roundtrip,
            login_countries_are_recorded_once_per_account,
            racing_logins_from_a_new_country_see_it_new_once,
            delegations_are_added_listed_and_removed,
            delegation_needs_registered_accounts,
            delegation_is_seen_by_a_peer,
            org_default_quota_roundtrip,
            add_usage_accumulates_and_reports_replace_it,
            concurrent_add_usage_from_two_instances_loses_nothing,
            take_with_org_counts_both_all_or_nothing,
            concurrent_org_takes_from_two_instances_stop_at_exactly_the_org_limit,
            watch_locks_on_a_burst_and_then_counts_nothing,
            watch_baseline_follows_the_shared_arithmetic,
            watch_refused_take_counts_nothing,
            watch_locks_on_refused_recipients,
            watch_in_monitor_mode_stores_no_lock,
            send_lock_is_set_and_released,
            racing_instances_trip_exactly_once,
            last_use_keeps_the_latest_time,
        );
    };
    (@each $harness:path; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                $crate::store::contract::$check($harness().await).await;
            }
        )+
    };
}
pub(crate) use store_contract_tests;

// ---------------------------------------------------------------------------------------
// Fixtures

// Shared with the other unit tests; re-exported here for the backends' contract runs.
pub use super::testing::{account, addr, org};

async fn with_orgs(s: &dyn Store, codes: &[&str]) {
    for code in codes {
        s.create_org(&org(code)).await.unwrap();
    }
}

fn addresses(accounts: &[Account]) -> Vec<String> {
    accounts.iter().map(|a| a.address.to_string()).collect()
}

#[track_caller]
fn assert_conflict<T: std::fmt::Debug>(r: StoreResult<T>, what: &str, name: &str) {
    match r {
        Err(StoreError::Conflict { what: w, name: n }) if w == what && n == name => {}
        other => panic!("expected Conflict {{ {what}, {name} }}, got {other:?}"),
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(r: StoreResult<T>, what: &str, name: &str) {
    match r {
        Err(StoreError::NotFound { what: w, name: n }) if w == what && n == name => {}
        other => panic!("expected NotFound {{ {what}, {name} }}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Organisations

pub async fn org_roundtrip(h: Harness) {
    let s = &*h.store;
    assert_eq!(s.get_org("mpt").await.unwrap(), None);
    let mpt = Org {
        status: OrgStatus::Ceased,
        status_reason: Some("merged into MTC".into()),
        status_changed_at: 1_700_000_500,
        relay_networks: vec![
            "10.1.0.0/16".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
        ..org("mpt")
    };
    s.create_org(&mpt).await.unwrap();
    assert_eq!(s.get_org("mpt").await.unwrap(), Some(mpt.clone()));
    assert_eq!(
        s.get_org_by_domain("mpt.gov.la").await.unwrap(),
        Some(mpt.clone())
    );
    assert_eq!(s.get_org("mof").await.unwrap(), None);
    assert_eq!(s.get_org_by_domain("mof.gov.la").await.unwrap(), None);
    // The code is not a domain and vice versa.
    assert_eq!(s.get_org_by_domain("mpt").await.unwrap(), None);
    assert_eq!(s.get_org("mpt.gov.la").await.unwrap(), None);
}

pub async fn org_lookups_ignore_case(h: Harness) {
    let s = &*h.store;
    s.create_org(&Org {
        code: "MPT".into(),
        domain: "MPT.Gov.La".into(),
        ..org("mpt")
    })
    .await
    .unwrap();
    let stored = s.get_org("mpt").await.unwrap().expect("stored");
    assert_eq!(
        (stored.code.as_str(), stored.domain.as_str()),
        ("mpt", "mpt.gov.la")
    );
    assert_eq!(s.get_org("Mpt").await.unwrap(), Some(stored.clone()));
    assert_eq!(
        s.get_org_by_domain("mpt.GOV.la").await.unwrap(),
        Some(stored)
    );
}

pub async fn org_conflicts_on_code_or_domain(h: Harness) {
    let s = &*h.store;
    s.create_org(&org("mpt")).await.unwrap();
    let same_code = Org {
        domain: "other.gov.la".into(),
        name: "Impostor".into(),
        ..org("mpt")
    };
    assert_conflict(s.create_org(&same_code).await, "organisation", "mpt");
    let same_code_other_case = Org {
        code: "MPT".into(),
        ..same_code
    };
    assert_conflict(
        s.create_org(&same_code_other_case).await,
        "organisation",
        "mpt",
    );
    let same_domain = Org {
        domain: "MPT.gov.la".into(),
        ..org("xyz")
    };
    assert_conflict(
        s.create_org(&same_domain).await,
        "organisation",
        "mpt.gov.la",
    );
    // Nothing of the refused registrations was stored.
    assert_eq!(s.list_orgs().await.unwrap(), vec![org("mpt")]);
    assert_eq!(s.get_org("xyz").await.unwrap(), None);
    assert_eq!(s.get_org_by_domain("other.gov.la").await.unwrap(), None);
}

pub async fn list_orgs_is_ordered_by_code(h: Harness) {
    let s = &*h.store;
    assert_eq!(s.list_orgs().await.unwrap(), vec![]);
    with_orgs(s, &["mpt", "moh", "mof", "pmo"]).await;
    let codes: Vec<_> = s
        .list_orgs()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.code)
        .collect();
    assert_eq!(codes, ["mof", "moh", "mpt", "pmo"]);
}

pub async fn org_status_change_returns_before_and_after(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt", "mof"]).await;
    let change = StatusChange {
        status: OrgStatus::Ceased,
        reason: Some("dissolved by decree 12".into()),
        at: 1_800_000_000,
    };
    let (before, after) = s.set_org_status("MPT", &change).await.unwrap();
    assert_eq!(before, org("mpt"));
    let expected = Org {
        status: OrgStatus::Ceased,
        status_reason: Some("dissolved by decree 12".into()),
        status_changed_at: 1_800_000_000,
        relay_networks: Vec::new(),
        ..org("mpt")
    };
    assert_eq!(after, expected);
    assert_eq!(s.get_org("mpt").await.unwrap(), Some(expected.clone()));
    assert_eq!(s.get_org("mof").await.unwrap(), Some(org("mof")));

    // Back again: before is the ceased record, the reason is cleared.
    let restore = StatusChange {
        status: OrgStatus::Active,
        reason: None,
        at: 1_800_000_100,
    };
    let (before, after) = s.set_org_status("mpt", &restore).await.unwrap();
    assert_eq!(before, expected);
    assert_eq!(
        after,
        Org {
            status_changed_at: 1_800_000_100,
            relay_networks: Vec::new(),
            ..org("mpt")
        }
    );
}

pub async fn org_status_change_of_unknown_is_not_found(h: Harness) {
    let s = &*h.store;
    let change = StatusChange {
        status: OrgStatus::Ceased,
        reason: None,
        at: 1,
    };
    assert_not_found(
        s.set_org_status("nope", &change).await,
        "organisation",
        "nope",
    );
    assert_eq!(s.list_orgs().await.unwrap(), vec![]);
}

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

pub async fn org_relays_change_atomically_and_canonically(h: Harness) {
    let s = &*h.store;
    s.create_org(&org("mpt")).await.unwrap();
    assert!(
        s.get_org("mpt")
            .await
            .unwrap()
            .unwrap()
            .relay_networks
            .is_empty()
    );
    // Host bits are cleared; duplicates collapse; the list is sorted.
    let (before, after) = s
        .change_org_relays(
            "MPT",
            &nets(&["203.0.113.9/24", "10.1.0.0/16", "10.1.2.3/16"]),
            &[],
        )
        .await
        .unwrap();
    assert!(before.relay_networks.is_empty());
    assert_eq!(
        after.relay_networks,
        nets(&["10.1.0.0/16", "203.0.113.0/24"])
    );
    assert_eq!(s.get_org("mpt").await.unwrap(), Some(after.clone()));
    assert_eq!(
        s.get_org_by_domain("mpt.gov.la")
            .await
            .unwrap()
            .unwrap()
            .relay_networks,
        after.relay_networks
    );
    // Remove (as written, or with host bits) and add in one change.
    let (before, after) = s
        .change_org_relays("mpt", &nets(&["2001:db8::/32"]), &nets(&["10.1.9.9/16"]))
        .await
        .unwrap();
    assert_eq!(
        before.relay_networks,
        nets(&["10.1.0.0/16", "203.0.113.0/24"])
    );
    assert_eq!(
        after.relay_networks,
        nets(&["203.0.113.0/24", "2001:db8::/32"])
    );
    // Removing what is not there changes nothing; the rest of the record is untouched.
    let (_, after2) = s
        .change_org_relays("mpt", &[], &nets(&["192.0.2.0/24"]))
        .await
        .unwrap();
    assert_eq!(after2, after);
    assert_eq!(after2.status, OrgStatus::Active);
    let (_, empty) = s
        .change_org_relays("mpt", &[], &nets(&["203.0.113.0/24", "2001:db8::/32"]))
        .await
        .unwrap();
    assert!(empty.relay_networks.is_empty());
    assert_eq!(h.peer.get_org("mpt").await.unwrap(), Some(empty));
}

pub async fn org_relays_of_unknown_is_not_found(h: Harness) {
    assert_not_found(
        h.store
            .change_org_relays("nope", &nets(&["10.0.0.0/8"]), &[])
            .await,
        "organisation",
        "nope",
    );
}

pub async fn racing_relay_changes_are_all_kept(h: Harness) {
    h.store.create_org(&org("mpt")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let s = if i % 2 == 0 {
            h.store.clone()
        } else {
            h.peer.clone()
        };
        tasks.push(tokio::spawn(async move {
            s.change_org_relays("mpt", &nets(&[&format!("10.{i}.0.0/16")]), &[])
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = h
        .store
        .get_org("mpt")
        .await
        .unwrap()
        .unwrap()
        .relay_networks;
    assert_eq!(got.len(), 8, "{got:?}");
}

// ---------------------------------------------------------------------------------------
// Accounts

pub async fn account_roundtrip(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    let full = Account {
        kind: AccountKind::Position,
        status: AccountStatus::Suspended,
        status_reason: Some("on leave".into()),
        display_name: Some("ຈຳປາ Director General".into()),
        status_changed_at: 1_700_000_200,
        quota_bytes: Some(10 << 30),
        ..account("dg-cabinet@mpt.gov.la", "mpt")
    };
    let bare = Account {
        kind: AccountKind::Unit,
        status: AccountStatus::Pending,
        quota_bytes: Some(0),
        ..account("cabinet@mpt.gov.la", "mpt")
    };
    s.create_account(&full).await.unwrap();
    s.create_account(&bare).await.unwrap();
    assert_eq!(s.get_account(&full.address).await.unwrap(), Some(full));
    assert_eq!(s.get_account(&bare.address).await.unwrap(), Some(bare));
    assert_eq!(
        s.get_account(&addr("nobody@mpt.gov.la")).await.unwrap(),
        None
    );
    // Lookups with any spelling find the record.
    assert!(
        s.get_account(&addr("CABINET@Mpt.Gov.La"))
            .await
            .unwrap()
            .is_some()
    );
}

pub async fn account_needs_its_organisation(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    assert_not_found(
        s.create_account(&account("champa@mof.gov.la", "mof")).await,
        "organisation",
        "mof",
    );
    assert_eq!(s.list_accounts(None).await.unwrap(), vec![]);
}

pub async fn account_names_are_unique_ignoring_case(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    let first = Account {
        display_name: Some("Champa, first".into()),
        ..account("Champa@MPT.gov.la", "mpt")
    };
    s.create_account(&first).await.unwrap();
    let second = Account {
        display_name: Some("Champa, second".into()),
        ..account("champa@mpt.gov.la", "mpt")
    };
    assert_conflict(
        s.create_account(&second).await,
        "account",
        "champa@mpt.gov.la",
    );
    // First come, first served: the first record stands.
    let stored = s.get_account(&addr("CHAMPA@mpt.gov.la")).await.unwrap();
    assert_eq!(stored, Some(first));
    assert_eq!(s.list_accounts(None).await.unwrap().len(), 1);
}

pub async fn bulk_import_inserts_all(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt", "mof"]).await;
    s.create_accounts(&[]).await.unwrap();
    let batch = vec![
        account("champa@mpt.gov.la", "mpt"),
        account("dara@mof.gov.la", "mof"),
        Account {
            kind: AccountKind::Unit,
            ..account("cabinet@mpt.gov.la", "mpt")
        },
    ];
    s.create_accounts(&batch).await.unwrap();
    let mut expected = batch.clone();
    expected.sort_by_key(|a| a.address.to_string());
    assert_eq!(s.list_accounts(None).await.unwrap(), expected);
}

pub async fn bulk_import_with_a_taken_name_inserts_nothing(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    s.create_account(&account("dara@mpt.gov.la", "mpt"))
        .await
        .unwrap();
    let batch = [
        account("anousone@mpt.gov.la", "mpt"),
        account("DARA@mpt.gov.la", "mpt"),
        account("somchai@mpt.gov.la", "mpt"),
    ];
    assert_conflict(
        s.create_accounts(&batch).await,
        "account",
        "dara@mpt.gov.la",
    );
    assert_eq!(
        addresses(&s.list_accounts(None).await.unwrap()),
        ["dara@mpt.gov.la"]
    );
}

pub async fn bulk_import_with_an_internal_duplicate_inserts_nothing(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    let batch = [
        account("anousone@mpt.gov.la", "mpt"),
        account("somchai@mpt.gov.la", "mpt"),
        account("Anousone@MPT.gov.la", "mpt"),
        account("zz@mpt.gov.la", "mpt"),
    ];
    assert_conflict(
        s.create_accounts(&batch).await,
        "account",
        "anousone@mpt.gov.la",
    );
    assert_eq!(s.list_accounts(None).await.unwrap(), vec![]);
}

pub async fn bulk_import_with_a_missing_organisation_inserts_nothing(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    let batch = [
        account("anousone@mpt.gov.la", "mpt"),
        account("dara@mof.gov.la", "mof"),
    ];
    assert_not_found(s.create_accounts(&batch).await, "organisation", "mof");
    assert_eq!(s.list_accounts(None).await.unwrap(), vec![]);
}

pub async fn list_accounts_filters_and_orders(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt", "mof"]).await;
    assert_eq!(s.list_accounts(None).await.unwrap(), vec![]);
    for (a, o) in [
        ("somchai@mpt.gov.la", "mpt"),
        ("dara@mof.gov.la", "mof"),
        ("a.b@mpt.gov.la", "mpt"),
        ("a@mpt.gov.la", "mpt"),
        ("cabinet@mpt.gov.la", "mpt"),
    ] {
        s.create_account(&account(a, o)).await.unwrap();
    }
    assert_eq!(
        addresses(&s.list_accounts(Some("mpt")).await.unwrap()),
        [
            "a.b@mpt.gov.la",
            "a@mpt.gov.la",
            "cabinet@mpt.gov.la",
            "somchai@mpt.gov.la"
        ]
    );
    assert_eq!(
        addresses(&s.list_accounts(Some("MOF")).await.unwrap()),
        ["dara@mof.gov.la"]
    );
    assert_eq!(s.list_accounts(Some("pmo")).await.unwrap(), vec![]);
    assert_eq!(
        addresses(&s.list_accounts(None).await.unwrap()),
        [
            "a.b@mpt.gov.la",
            "a@mpt.gov.la",
            "cabinet@mpt.gov.la",
            "dara@mof.gov.la",
            "somchai@mpt.gov.la"
        ]
    );
}

pub async fn account_status_change_returns_before_and_after(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    let champa = Account {
        display_name: Some("Champa".into()),
        quota_bytes: Some(1 << 30),
        ..account("champa@mpt.gov.la", "mpt")
    };
    s.create_account(&champa).await.unwrap();
    s.create_account(&account("dara@mpt.gov.la", "mpt"))
        .await
        .unwrap();

    let suspend = StatusChange {
        status: AccountStatus::Suspended,
        reason: Some("ticket 42".into()),
        at: 1_800_000_000,
    };
    let (before, after) = s
        .set_account_status(&addr("Champa@mpt.gov.la"), &suspend)
        .await
        .unwrap();
    assert_eq!(before, champa);
    let suspended = Account {
        status: AccountStatus::Suspended,
        status_reason: Some("ticket 42".into()),
        status_changed_at: 1_800_000_000,
        ..champa.clone()
    };
    assert_eq!(after, suspended);
    assert_eq!(
        s.get_account(&champa.address).await.unwrap(),
        Some(suspended.clone())
    );
    // Others untouched.
    assert_eq!(
        s.get_account(&addr("dara@mpt.gov.la")).await.unwrap(),
        Some(account("dara@mpt.gov.la", "mpt"))
    );

    let withdraw = StatusChange {
        status: AccountStatus::Withdrawn,
        reason: None,
        at: 1_800_000_100,
    };
    let (before, after) = s
        .set_account_status(&champa.address, &withdraw)
        .await
        .unwrap();
    assert_eq!(before, suspended);
    assert_eq!(
        after,
        Account {
            status: AccountStatus::Withdrawn,
            status_reason: None,
            status_changed_at: 1_800_000_100,
            ..champa
        }
    );
}

pub async fn account_status_change_of_unknown_is_not_found(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt"]).await;
    let change = StatusChange {
        status: AccountStatus::Suspended,
        reason: None,
        at: 1,
    };
    assert_not_found(
        s.set_account_status(&addr("ghost@mpt.gov.la"), &change)
            .await,
        "account",
        "ghost@mpt.gov.la",
    );
    assert_eq!(s.list_accounts(None).await.unwrap(), vec![]);
}

pub async fn taken_locals_reports_registered_candidates(h: Harness) {
    let s = &*h.store;
    with_orgs(s, &["mpt", "mof"]).await;
    for (a, o) in [
        ("champa@mpt.gov.la", "mpt"),
        ("champa.k@mpt.gov.la", "mpt"),
        ("champa2@mof.gov.la", "mof"),
    ] {
        s.create_account(&account(a, o)).await.unwrap();
    }
    let candidates: Vec<String> = ["Champa", "champa.k", "champa2", "champa.s", "bad local"]
        .map(String::from)
        .into();
    assert_eq!(
        s.taken_locals("mpt.gov.la", &candidates).await.unwrap(),
        ["Champa", "champa.k"]
    );
    assert_eq!(
        s.taken_locals("MOF.gov.la", &candidates).await.unwrap(),
        ["champa2"]
    );
    assert_eq!(
        s.taken_locals("pmo.gov.la", &candidates).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        s.taken_locals("mpt.gov.la", &[]).await.unwrap(),
        Vec::<String>::new()
    );
}

pub async fn ping_answers(h: Harness) {
    h.store.ping().await.unwrap();
    with_orgs(&*h.store, &["mpt"]).await;
    h.store.ping().await.unwrap();
    assert!(!h.store.kind().is_empty());
}

pub async fn peer_sees_committed_writes(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    assert_eq!(h.peer.get_org("mpt").await.unwrap(), Some(org("mpt")));
    h.peer
        .create_account(&account("champa@mpt.gov.la", "mpt"))
        .await
        .unwrap();
    let change = StatusChange {
        status: AccountStatus::Suspended,
        reason: None,
        at: 5,
    };
    h.store
        .set_account_status(&addr("champa@mpt.gov.la"), &change)
        .await
        .unwrap();
    let seen = h
        .peer
        .get_account(&addr("champa@mpt.gov.la"))
        .await
        .unwrap();
    assert_eq!(seen.map(|a| a.status), Some(AccountStatus::Suspended));
}

// ---------------------------------------------------------------------------------------
// Races (R4: first come, first served, atomically)

const RACERS: usize = 16;

/// Spellings of one name that differ only in case.
fn spelling(i: usize) -> String {
    let name: String = "champa@mpt.gov.la"
        .chars()
        .enumerate()
        .map(|(k, c)| {
            if (i >> (k % 4)) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    name
}

/// Runs `RACERS` registrations of the same name (in different case), all released at
/// once; registrar `i` uses `stores[i % stores.len()]`. Returns the index of each winner.
async fn race_for_champa(stores: &[Arc<dyn Store>]) -> Vec<usize> {
    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let barrier = barrier.clone();
            let candidate = Account {
                display_name: Some(format!("registrar {i}")),
                ..account(&spelling(i), "mpt")
            };
            tokio::spawn(async move {
                barrier.wait().await;
                store.create_account(&candidate).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(()) => winners.push(i),
            Err(e) => assert_conflict::<()>(Err(e), "account", "champa@mpt.gov.la"),
        }
    }
    winners
}

pub async fn racing_registrations_of_one_name_have_one_winner(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    let winners = race_for_champa(std::slice::from_ref(&h.store)).await;
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored = h.store.get_account(&addr("champa@mpt.gov.la")).await;
    assert_eq!(
        stored.unwrap().and_then(|a| a.display_name),
        Some(format!("registrar {}", winners[0]))
    );
    assert_eq!(h.store.list_accounts(None).await.unwrap().len(), 1);
}

pub async fn two_registrars_racing_have_one_winner(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    let winners = race_for_champa(&[h.store.clone(), h.peer.clone()]).await;
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let expected = Some(format!("registrar {}", winners[0]));
    for s in [&h.store, &h.peer] {
        let stored = s.get_account(&addr("champa@mpt.gov.la")).await.unwrap();
        assert_eq!(stored.and_then(|a| a.display_name), expected);
        assert_eq!(s.list_accounts(None).await.unwrap().len(), 1);
    }
}

pub async fn two_registrars_racing_for_an_organisation_have_one_winner(h: Harness) {
    let barrier = Arc::new(Barrier::new(RACERS));
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let store = [&h.store, &h.peer][i % 2].clone();
            let barrier = barrier.clone();
            // Half race on the code, half on the domain (with another code).
            let candidate = Org {
                name: format!("registrar {i}"),
                code: if i % 4 < 2 {
                    "mpt".into()
                } else {
                    format!("x{i}")
                },
                domain: "mpt.gov.la".into(),
                ..org("mpt")
            };
            tokio::spawn(async move {
                barrier.wait().await;
                store.create_org(&candidate).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(()) => winners.push(i),
            Err(StoreError::Conflict {
                what: "organisation",
                ..
            }) => {}
            Err(e) => panic!("registrar {i}: expected a conflict, got {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let orgs = h.peer.list_orgs().await.unwrap();
    assert_eq!(orgs.len(), 1);
    assert_eq!(orgs[0].name, format!("registrar {}", winners[0]));
}

pub async fn bulk_import_racing_a_registration_is_all_or_nothing(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    let batch: Vec<Account> = (0..50)
        .map(|i| account(&format!("user{i:02}@mpt.gov.la"), "mpt"))
        .collect();
    let single = Account {
        display_name: Some("single".into()),
        ..account("USER25@mpt.gov.la", "mpt")
    };
    let barrier = Arc::new(Barrier::new(2));
    let bulk = {
        let (store, barrier, batch) = (h.store.clone(), barrier.clone(), batch.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            store.create_accounts(&batch).await
        })
    };
    let one = {
        let (store, barrier) = (h.peer.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            store.create_account(&single).await
        })
    };
    let (bulk, one) = (bulk.await.unwrap(), one.await.unwrap());
    let stored = h.store.list_accounts(None).await.unwrap();
    match (bulk, one) {
        (Ok(()), one) => {
            assert_conflict(one, "account", "user25@mpt.gov.la");
            assert_eq!(stored, batch);
        }
        (bulk, Ok(())) => {
            assert_conflict(bulk, "account", "user25@mpt.gov.la");
            assert_eq!(addresses(&stored), ["user25@mpt.gov.la"]);
            assert_eq!(stored[0].display_name.as_deref(), Some("single"));
        }
        other => panic!("expected exactly one winner, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Sending limits (R14): the bulk permission and the counters

pub async fn bulk_permission_is_granted_and_withdrawn(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    let champa = addr("champa@mpt.gov.la");
    h.store
        .create_accounts(&[
            account("champa@mpt.gov.la", "mpt"),
            Account {
                bulk: true,
                ..account("news@mpt.gov.la", "mpt")
            },
        ])
        .await
        .unwrap();
    let news = h.store.get_account(&addr("news@mpt.gov.la")).await.unwrap();
    assert!(news.unwrap().bulk, "bulk given at registration is kept");
    let (before, after) = h.store.set_bulk(&champa, true).await.unwrap();
    assert!(!before.bulk);
    assert!(after.bulk);
    assert_eq!(
        after,
        Account {
            bulk: true,
            ..before.clone()
        }
    );
    assert!(h.peer.get_account(&champa).await.unwrap().unwrap().bulk);
    let (before, after) = h.store.set_bulk(&champa, false).await.unwrap();
    assert!(before.bulk && !after.bulk);
    assert!(!h.store.get_account(&champa).await.unwrap().unwrap().bulk);
    assert_not_found(
        h.store.set_bulk(&addr("nobody@mpt.gov.la"), true).await,
        "account",
        "nobody@mpt.gov.la",
    );
}

/// 2026-12-04 10:40:00 UTC: well inside an hour and a day.
const NOW: Timestamp = 1_796_379_600 + 1200;
const MSG_HOUR: Counter = Counter::new(Measure::Messages, Window::Hour);
const MSG_DAY: Counter = Counter::new(Measure::Messages, Window::Day);
const RCPT_HOUR: Counter = Counter::new(Measure::Recipients, Window::Hour);
const RCPT_DAY: Counter = Counter::new(Measure::Recipients, Window::Day);

fn take(counter: Counter, n: u64, limit: Option<u64>) -> Take {
    Take { counter, n, limit }
}

async fn counts(s: &dyn Store, account: &Address, now: Timestamp) -> Vec<u64> {
    let values = s.counters(account, now).await.unwrap();
    let order: Vec<Counter> = values.iter().map(|v| v.counter).collect();
    assert_eq!(order, Counter::ALL);
    for v in &values {
        assert_eq!(v.window_start, v.counter.window.start(now));
        assert_eq!(v.window_end, v.counter.window.end(now));
    }
    values.iter().map(|v| v.count).collect()
}

pub async fn take_counts_up_to_the_limit(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    assert_eq!(counts(&*h.store, &a, NOW).await, [0, 0, 0, 0]);
    for _ in 0..3 {
        let r = h.store.take(&a, &[take(RCPT_HOUR, 1, Some(3))], NOW).await;
        assert_eq!(r.unwrap(), TakeOutcome::Taken);
    }
    let r = h.store.take(&a, &[take(RCPT_HOUR, 1, Some(3))], NOW).await;
    assert_eq!(
        r.unwrap(),
        TakeOutcome::Refused {
            counter: RCPT_HOUR,
            count: 3,
            limit: 3
        }
    );
    // More than one at a time: refused when the sum would pass, even if the count does not.
    let r = h.store.take(&a, &[take(RCPT_DAY, 5, Some(4))], NOW).await;
    assert!(matches!(r.unwrap(), TakeOutcome::Refused { count: 0, .. }));
    let r = h.store.take(&a, &[take(RCPT_DAY, 4, Some(4))], NOW).await;
    assert_eq!(r.unwrap(), TakeOutcome::Taken);
    // No limit: only counted.
    let r = h.store.take(&a, &[take(MSG_DAY, 7, None)], NOW).await;
    assert_eq!(r.unwrap(), TakeOutcome::Taken);
    assert_eq!(counts(&*h.store, &a, NOW).await, [0, 7, 3, 4]);
    assert_eq!(counts(&*h.peer, &a, NOW).await, [0, 7, 3, 4]);
}

pub async fn take_is_all_or_nothing(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let all = |msg_day| {
        [
            take(MSG_HOUR, 1, Some(10)),
            take(MSG_DAY, 1, Some(msg_day)),
            take(RCPT_HOUR, 1, Some(10)),
            take(RCPT_DAY, 1, Some(10)),
        ]
    };
    assert_eq!(
        h.store.take(&a, &all(2), NOW).await.unwrap(),
        TakeOutcome::Taken
    );
    assert_eq!(
        h.store.take(&a, &all(2), NOW).await.unwrap(),
        TakeOutcome::Taken
    );
    // The daily message limit is reached: nothing else moves either.
    assert_eq!(
        h.store.take(&a, &all(2), NOW).await.unwrap(),
        TakeOutcome::Refused {
            counter: MSG_DAY,
            count: 2,
            limit: 2
        }
    );
    assert_eq!(counts(&*h.store, &a, NOW).await, [2, 2, 2, 2]);
    // The first counter in the way is named, in the order given.
    let r = h
        .store
        .take(
            &a,
            &[take(RCPT_DAY, 1, Some(2)), take(MSG_DAY, 1, Some(2))],
            NOW,
        )
        .await;
    assert!(matches!(
        r.unwrap(),
        TakeOutcome::Refused {
            counter: RCPT_DAY,
            ..
        }
    ));
}

pub async fn counters_follow_their_windows(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let both = [take(MSG_HOUR, 1, Some(1)), take(MSG_DAY, 1, Some(2))];
    assert_eq!(
        h.store.take(&a, &both, NOW).await.unwrap(),
        TakeOutcome::Taken
    );
    assert!(matches!(
        h.store.take(&a, &both, NOW + 60).await.unwrap(),
        TakeOutcome::Refused {
            counter: MSG_HOUR,
            ..
        }
    ));
    // The next hour (same day): the hourly counter starts again, the daily one goes on.
    let next_hour = Window::Hour.end(NOW) + 5;
    assert_eq!(counts(&*h.store, &a, next_hour).await, [0, 1, 0, 0]);
    assert_eq!(
        h.store.take(&a, &both, next_hour).await.unwrap(),
        TakeOutcome::Taken
    );
    assert_eq!(counts(&*h.store, &a, next_hour).await, [1, 2, 0, 0]);
    assert!(matches!(
        h.store.take(&a, &both, next_hour + 3600).await.unwrap(),
        TakeOutcome::Refused {
            counter: MSG_DAY,
            count: 2,
            ..
        }
    ));
    // The next day: both start again.
    let tomorrow = Window::Day.end(NOW) + 5;
    assert_eq!(counts(&*h.store, &a, tomorrow).await, [0, 0, 0, 0]);
    assert_eq!(
        h.store.take(&a, &both, tomorrow).await.unwrap(),
        TakeOutcome::Taken
    );
}

pub async fn counters_are_per_account_and_reset(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let b = addr("kham@mpt.gov.la");
    let t = [take(MSG_HOUR, 1, Some(1)), take(RCPT_DAY, 3, None)];
    assert_eq!(h.store.take(&a, &t, NOW).await.unwrap(), TakeOutcome::Taken);
    assert_eq!(h.store.take(&b, &t, NOW).await.unwrap(), TakeOutcome::Taken);
    assert!(matches!(
        h.store.take(&a, &t, NOW).await.unwrap(),
        TakeOutcome::Refused { .. }
    ));
    h.peer.reset_counters(&a, NOW).await.unwrap();
    assert_eq!(counts(&*h.store, &a, NOW).await, [0, 0, 0, 0]);
    assert_eq!(counts(&*h.store, &b, NOW).await, [1, 0, 0, 3]);
    assert_eq!(h.store.take(&a, &t, NOW).await.unwrap(), TakeOutcome::Taken);
    // Resetting an account that never sent is not an error.
    h.store
        .reset_counters(&addr("quiet@mpt.gov.la"), NOW)
        .await
        .unwrap();
}

/// Takes racing from two instances: exactly `LIMIT` succeed, the counters say `LIMIT`.
pub async fn concurrent_takes_from_two_instances_stop_at_exactly_the_limit(h: Harness) {
    const TAKERS: usize = 48;
    const LIMIT: u64 = 17;
    let a = addr("champa@mpt.gov.la");
    let barrier = Arc::new(Barrier::new(TAKERS));
    let tasks: Vec<_> = (0..TAKERS)
        .map(|i| {
            let store = if i % 2 == 0 {
                h.store.clone()
            } else {
                h.peer.clone()
            };
            let (barrier, a) = (barrier.clone(), a.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let t = [take(MSG_HOUR, 1, Some(LIMIT)), take(RCPT_HOUR, 2, None)];
                store.take(&a, &t, NOW).await.unwrap()
            })
        })
        .collect();
    let mut taken = 0;
    for task in tasks {
        match task.await.unwrap() {
            TakeOutcome::Taken => taken += 1,
            TakeOutcome::Refused {
                counter,
                count,
                limit,
            } => {
                assert_eq!((counter, count, limit), (MSG_HOUR, LIMIT, LIMIT));
            }
        }
    }
    assert_eq!(taken, LIMIT);
    assert_eq!(counts(&*h.store, &a, NOW).await, [LIMIT, 0, 2 * LIMIT, 0]);
    assert_eq!(counts(&*h.peer, &a, NOW).await, [LIMIT, 0, 2 * LIMIT, 0]);
}

// ---------------------------------------------------------------------------------------
// Storage quotas (R13)

pub async fn quota_and_usage_roundtrip(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    let a = addr("champa@mpt.gov.la");
    h.store
        .create_account(&account("champa@mpt.gov.la", "mpt"))
        .await
        .unwrap();
    let (before, after) = h.store.set_quota(&a, Some(10 << 30)).await.unwrap();
    assert_eq!(
        (before.quota_bytes, after.quota_bytes),
        (None, Some(10 << 30))
    );
    assert_eq!(
        after,
        Account {
            quota_bytes: Some(10 << 30),
            ..before
        }
    );
    let seen = h.peer.get_account(&a).await.unwrap().unwrap();
    assert_eq!(seen.quota_bytes, Some(10 << 30));
    let (_, after) = h.store.set_quota(&a, None).await.unwrap();
    assert_eq!(after.quota_bytes, None);
    assert_not_found(
        h.store.set_quota(&addr("nobody@mpt.gov.la"), Some(1)).await,
        "account",
        "nobody@mpt.gov.la",
    );

    assert_eq!(h.store.usage(&a).await.unwrap(), None);
    h.store.set_usage(&a, 123_456, NOW).await.unwrap();
    assert_eq!(h.peer.usage(&a).await.unwrap(), Some(123_456));
    h.peer.set_usage(&a, 99, NOW + 1).await.unwrap();
    assert_eq!(
        h.store.usage(&a).await.unwrap(),
        Some(99),
        "the latest report wins"
    );
    assert_eq!(h.store.usage(&addr("kham@mpt.gov.la")).await.unwrap(), None);
}

pub async fn login_countries_are_recorded_once_per_account(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    assert!(h.store.login_countries(&a).await.unwrap().is_empty());
    let first = h.store.record_login_country(&a, "LA", NOW).await.unwrap();
    assert_eq!(
        first,
        LoginCountry {
            new: true,
            known_before: vec![]
        }
    );
    let again = h
        .peer
        .record_login_country(&a, "LA", NOW + 1)
        .await
        .unwrap();
    assert_eq!(
        again,
        LoginCountry {
            new: false,
            known_before: vec!["LA".into()]
        }
    );
    let other = h
        .store
        .record_login_country(&a, "TH", NOW + 2)
        .await
        .unwrap();
    assert_eq!(
        other,
        LoginCountry {
            new: true,
            known_before: vec!["LA".into()]
        }
    );
    let third = h
        .store
        .record_login_country(&a, "FR", NOW + 3)
        .await
        .unwrap();
    assert_eq!(third.known_before, vec!["LA".to_owned(), "TH".to_owned()]);
    assert_eq!(
        h.peer.login_countries(&a).await.unwrap(),
        vec!["FR".to_owned(), "LA".to_owned(), "TH".to_owned()]
    );
    // Per account.
    let b = addr("kham@mpt.gov.la");
    assert!(h.store.login_countries(&b).await.unwrap().is_empty());
    assert!(
        h.store
            .record_login_country(&b, "TH", NOW)
            .await
            .unwrap()
            .new
    );
}

pub async fn racing_logins_from_a_new_country_see_it_new_once(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    h.store.record_login_country(&a, "LA", NOW).await.unwrap();
    let barrier = Arc::new(Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 {
            h.store.clone()
        } else {
            h.peer.clone()
        };
        let (a, barrier) = (a.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            s.record_login_country(&a, "TH", NOW + 1).await.unwrap()
        }));
    }
    let mut new = 0;
    for t in tasks {
        let r = t.await.unwrap();
        new += r.new as usize;
        assert!(r.known_before.contains(&"LA".to_owned()));
    }
    assert_eq!(new, 1, "exactly one racing login sees the country as new");
}

// ---------------------------------------------------------------------------------------
// Send-as delegation (R8)

async fn delegation_fixture(s: &dyn Store) {
    with_orgs(s, &["mpt", "mof"]).await;
    s.create_accounts(&[
        account("cabinet@mpt.gov.la", "mpt"),
        account("champa@mpt.gov.la", "mpt"),
        account("dara@mpt.gov.la", "mpt"),
        account("noy@mof.gov.la", "mof"),
    ])
    .await
    .unwrap();
}

fn strings(a: &[Address]) -> Vec<String> {
    a.iter().map(|a| a.to_string()).collect()
}

pub async fn delegations_are_added_listed_and_removed(h: Harness) {
    let s = &*h.store;
    delegation_fixture(s).await;
    let cabinet = addr("cabinet@mpt.gov.la");
    assert!(s.delegates(&cabinet).await.unwrap().is_empty());
    // Names are compared normalised, like every directory name.
    assert!(
        s.add_delegate(&addr("Cabinet@MPT.gov.la"), &addr("Dara@mpt.gov.la"))
            .await
            .unwrap()
    );
    assert!(
        s.add_delegate(&cabinet, &addr("champa@mpt.gov.la"))
            .await
            .unwrap()
    );
    // Again: nothing new.
    assert!(
        !s.add_delegate(&cabinet, &addr("champa@mpt.gov.la"))
            .await
            .unwrap()
    );
    // An account always sends as itself: nothing to record.
    assert!(!s.add_delegate(&cabinet, &cabinet).await.unwrap());
    // Across organisations too (an adviser of another ministry).
    assert!(
        s.add_delegate(&addr("champa@mpt.gov.la"), &addr("noy@mof.gov.la"))
            .await
            .unwrap()
    );
    assert!(
        s.add_delegate(&addr("dara@mpt.gov.la"), &addr("champa@mpt.gov.la"))
            .await
            .unwrap()
    );
    assert_eq!(
        strings(&s.delegates(&cabinet).await.unwrap()),
        ["champa@mpt.gov.la", "dara@mpt.gov.la"]
    );
    assert_eq!(
        strings(&s.delegated_to(&addr("champa@mpt.gov.la")).await.unwrap()),
        ["cabinet@mpt.gov.la", "dara@mpt.gov.la"]
    );
    assert_eq!(
        strings(&s.delegated_to(&addr("noy@mof.gov.la")).await.unwrap()),
        ["champa@mpt.gov.la"]
    );
    assert!(s.delegated_to(&cabinet).await.unwrap().is_empty());

    assert!(
        s.remove_delegate(&cabinet, &addr("DARA@mpt.gov.la"))
            .await
            .unwrap()
    );
    assert!(
        !s.remove_delegate(&cabinet, &addr("dara@mpt.gov.la"))
            .await
            .unwrap(),
        "removing what is not there changes nothing"
    );
    assert!(
        !s.remove_delegate(&cabinet, &addr("nobody@mpt.gov.la"))
            .await
            .unwrap()
    );
    assert_eq!(
        strings(&s.delegates(&cabinet).await.unwrap()),
        ["champa@mpt.gov.la"]
    );
    assert!(
        s.delegated_to(&addr("dara@mpt.gov.la"))
            .await
            .unwrap()
            .is_empty()
    );
    // The account records themselves are untouched.
    assert_eq!(
        s.get_account(&cabinet).await.unwrap().unwrap().status,
        AccountStatus::Active
    );
}

pub async fn delegation_needs_registered_accounts(h: Harness) {
    let s = &*h.store;
    delegation_fixture(s).await;
    assert_not_found(
        s.add_delegate(&addr("cabinet@mpt.gov.la"), &addr("nobody@mpt.gov.la"))
            .await,
        "account",
        "nobody@mpt.gov.la",
    );
    assert_not_found(
        s.add_delegate(&addr("nobody@mpt.gov.la"), &addr("champa@mpt.gov.la"))
            .await,
        "account",
        "nobody@mpt.gov.la",
    );
    assert_not_found(
        s.remove_delegate(&addr("nobody@mpt.gov.la"), &addr("champa@mpt.gov.la"))
            .await,
        "account",
        "nobody@mpt.gov.la",
    );
    // Nothing was written by the refused changes.
    assert!(
        s.delegates(&addr("cabinet@mpt.gov.la"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.delegated_to(&addr("champa@mpt.gov.la"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.delegates(&addr("nobody@mpt.gov.la"))
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn delegation_is_seen_by_a_peer(h: Harness) {
    delegation_fixture(&*h.store).await;
    let cabinet = addr("cabinet@mpt.gov.la");
    let champa = addr("champa@mpt.gov.la");
    h.store.add_delegate(&cabinet, &champa).await.unwrap();
    assert_eq!(
        strings(&h.peer.delegates(&cabinet).await.unwrap()),
        ["champa@mpt.gov.la"]
    );
    assert!(h.peer.remove_delegate(&cabinet, &champa).await.unwrap());
    assert!(h.store.delegates(&cabinet).await.unwrap().is_empty());
    assert!(h.store.delegated_to(&champa).await.unwrap().is_empty());
}

pub async fn org_default_quota_roundtrip(h: Harness) {
    with_orgs(&*h.store, &["mpt"]).await;
    let (before, after) = h.store.set_org_quota("MPT", Some(5 << 30)).await.unwrap();
    assert_eq!(before, org("mpt"));
    assert_eq!(
        after,
        Org {
            default_quota_bytes: Some(5 << 30),
            ..org("mpt")
        }
    );
    assert_eq!(h.peer.get_org("mpt").await.unwrap(), Some(after.clone()));
    assert_eq!(
        h.peer.get_org_by_domain("mpt.gov.la").await.unwrap(),
        Some(after.clone())
    );
    assert_eq!(h.peer.list_orgs().await.unwrap(), vec![after.clone()]);
    // Other changes keep it.
    let change = StatusChange {
        status: OrgStatus::Ceased,
        reason: None,
        at: 5,
    };
    let (_, ceased) = h.store.set_org_status("mpt", &change).await.unwrap();
    assert_eq!(ceased.default_quota_bytes, Some(5 << 30));
    let (before, removed) = h.store.set_org_quota("mpt", None).await.unwrap();
    assert_eq!(before.default_quota_bytes, Some(5 << 30));
    assert_eq!(removed.default_quota_bytes, None);
    assert_eq!(h.peer.get_org("mpt").await.unwrap(), Some(removed));
    assert_not_found(
        h.store.set_org_quota("mof", Some(1)).await,
        "organisation",
        "mof",
    );
    // Registered with a default: stored as given.
    let mof = Org {
        default_quota_bytes: Some(0),
        ..org("mof")
    };
    h.store.create_org(&mof).await.unwrap();
    assert_eq!(h.peer.get_org("mof").await.unwrap(), Some(mof));
}

pub async fn add_usage_accumulates_and_reports_replace_it(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    // Never reported: counting starts from 0.
    assert_eq!(h.store.add_usage(&a, 1000).await.unwrap(), 1000);
    assert_eq!(h.peer.add_usage(&a, 24).await.unwrap(), 1024);
    assert_eq!(h.store.usage(&a).await.unwrap(), Some(1024));
    // The mailbox server's report replaces the sum (deleted mail is corrected for).
    h.peer.set_usage(&a, 100, NOW).await.unwrap();
    assert_eq!(h.store.usage(&a).await.unwrap(), Some(100));
    assert_eq!(h.store.add_usage(&a, 5).await.unwrap(), 105);
    assert_eq!(h.peer.usage(&a).await.unwrap(), Some(105));
    assert_eq!(h.store.usage(&addr("kham@mpt.gov.la")).await.unwrap(), None);
}

pub async fn concurrent_add_usage_from_two_instances_loses_nothing(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let s = if i % 2 == 0 {
            h.store.clone()
        } else {
            h.peer.clone()
        };
        let a = a.clone();
        tasks.push(tokio::spawn(async move { s.add_usage(&a, 10).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(h.store.usage(&a).await.unwrap(), Some(400));
}

// ---------------------------------------------------------------------------------------
// Organisation sending limits (R14)

async fn org_counts(s: &dyn Store, org: &str, now: Timestamp) -> Vec<u64> {
    s.org_counters(org, now)
        .await
        .unwrap()
        .iter()
        .map(|v| v.count)
        .collect()
}

pub async fn take_with_org_counts_both_all_or_nothing(h: Harness) {
    let champa = addr("champa@mpt.gov.la");
    let dara = addr("dara@mpt.gov.la");
    let mine = [take(MSG_HOUR, 1, Some(2)), take(RCPT_HOUR, 1, None)];
    let org = [take(MSG_HOUR, 1, Some(3)), take(RCPT_DAY, 1, None)];
    let joint = |a: &Address| {
        let (a, s) = (a.clone(), h.store.clone());
        async move { s.take_with_org(&a, &mine, "MPT", &org, NOW).await.unwrap() }
    };
    let taken = JointTakeOutcome {
        outcome: TakeOutcome::Taken,
        by_org: false,
    };
    assert_eq!(joint(&champa).await, taken);
    assert_eq!(joint(&champa).await, taken);
    // champa's own limit: refused by the account, the organisation unchanged.
    assert_eq!(
        joint(&champa).await,
        JointTakeOutcome {
            outcome: TakeOutcome::Refused {
                counter: MSG_HOUR,
                count: 2,
                limit: 2
            },
            by_org: false
        }
    );
    assert_eq!(org_counts(&*h.peer, "mpt", NOW).await, [2, 0, 0, 2]);
    assert_eq!(joint(&dara).await, taken);
    // The organisation's limit (3) is reached: refused by it, dara's counters unchanged.
    assert_eq!(
        joint(&dara).await,
        JointTakeOutcome {
            outcome: TakeOutcome::Refused {
                counter: MSG_HOUR,
                count: 3,
                limit: 3
            },
            by_org: true
        }
    );
    assert_eq!(counts(&*h.peer, &dara, NOW).await, [1, 0, 1, 0]);
    assert_eq!(counts(&*h.peer, &champa, NOW).await, [2, 0, 2, 0]);
    assert_eq!(org_counts(&*h.peer, "mpt", NOW).await, [3, 0, 0, 3]);
    // Organisation counters are not an account's, and have their own windows.
    assert_eq!(org_counts(&*h.store, "mof", NOW).await, [0, 0, 0, 0]);
    assert_eq!(org_counts(&*h.store, "mpt", NOW + 3600).await, [0, 0, 0, 3]);
    // Without organisation takes it is a plain take.
    let plain = h
        .store
        .take_with_org(&dara, &[take(MSG_DAY, 1, None)], "mpt", &[], NOW)
        .await
        .unwrap();
    assert_eq!(plain, taken);
    assert_eq!(counts(&*h.store, &dara, NOW).await, [1, 1, 1, 0]);
}

pub async fn concurrent_org_takes_from_two_instances_stop_at_exactly_the_org_limit(h: Harness) {
    const LIMIT: u64 = 12;
    const TASKS: usize = 40;
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let s = if i % 2 == 0 {
            h.store.clone()
        } else {
            h.peer.clone()
        };
        let barrier = barrier.clone();
        // Four accounts of one organisation, each far from its own limit.
        let a = addr(&format!("user{}@mpt.gov.la", i % 4));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            s.take_with_org(
                &a,
                &[take(MSG_HOUR, 1, Some(1000))],
                "mpt",
                &[take(MSG_HOUR, 1, Some(LIMIT))],
                NOW,
            )
            .await
            .unwrap()
        }));
    }
    let mut taken = 0;
    for t in tasks {
        match t.await.unwrap() {
            JointTakeOutcome {
                outcome: TakeOutcome::Taken,
                ..
            } => taken += 1,
            JointTakeOutcome { by_org, .. } => assert!(by_org),
        }
    }
    assert_eq!(taken, LIMIT);
    assert_eq!(org_counts(&*h.store, "mpt", NOW).await[0], LIMIT);
    // Every account's counter holds exactly what it was granted: refusals gave back.
    let mut sum = 0;
    for i in 0..4 {
        sum += counts(&*h.peer, &addr(&format!("user{i}@mpt.gov.la")), NOW).await[0];
    }
    assert_eq!(sum, LIMIT);
}

// ---------------------------------------------------------------------------------------
// Compromise response (R15) and activity (R20)

fn watch(floor: u64) -> Watch {
    Watch {
        burst_factor: 10,
        burst_floor: floor,
        baseline_hours: 10,
        reject_share: 50,
        reject_min: 3,
        lock: true,
    }
}

/// The start of `NOW`'s UTC hour.
const HOUR: Timestamp = NOW - NOW.rem_euclid(3600);

pub async fn watch_locks_on_a_burst_and_then_counts_nothing(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let w = watch(3);
    let t = [take(MSG_HOUR, 1, Some(100))];
    for _ in 0..3 {
        let o = h.store.take_watched(&a, &t, &w, true, NOW).await.unwrap();
        assert_eq!(o, WatchOutcome::Counted(TakeOutcome::Taken));
    }
    // A further recipient of the same message is not a message.
    let o = h.store.take_watched(&a, &[], &w, false, NOW).await.unwrap();
    assert_eq!(o, WatchOutcome::Counted(TakeOutcome::Taken));
    let o = h
        .store
        .take_watched(&a, &t, &w, true, NOW + 1)
        .await
        .unwrap();
    let expected = SendLock {
        at: NOW + 1,
        by: watch::AUTOMATIC.into(),
        cause: LockCause::Burst {
            messages: 4,
            baseline_milli: 0,
            threshold: 3,
        },
    };
    assert_eq!(o, WatchOutcome::Tripped(expected.clone()));
    // Stored, seen by the other instance, and from now on nothing is counted.
    assert_eq!(h.peer.send_lock(&a).await.unwrap(), Some(expected.clone()));
    let o = h
        .peer
        .take_watched(&a, &t, &w, true, NOW + 2)
        .await
        .unwrap();
    assert_eq!(o, WatchOutcome::Locked(expected.clone()));
    let o = h.peer.count_rejected(&a, &w, NOW + 2).await.unwrap();
    assert_eq!(o, WatchOutcome::Locked(expected));
    assert_eq!(counts(&*h.store, &a, NOW).await, [4, 0, 0, 0]);
    let st = h.store.watch_state(&a).await.unwrap();
    assert_eq!(
        (st.hour, st.messages, st.accepted, st.rejected),
        (HOUR, 4, 5, 0)
    );
    // Other accounts are not affected.
    let b = addr("kham@mpt.gov.la");
    assert_eq!(h.store.send_lock(&b).await.unwrap(), None);
    assert_eq!(
        h.store.watch_state(&b).await.unwrap(),
        WatchState::default()
    );
}

pub async fn watch_baseline_follows_the_shared_arithmetic(h: Harness) {
    // The same steps as `store::watch`'s unit test: both backends compute exactly that.
    let a = addr("champa@mpt.gov.la");
    let w = watch(1000);
    for _ in 0..20 {
        h.store
            .take_watched(&a, &[], &w, true, HOUR + 5)
            .await
            .unwrap();
    }
    h.peer
        .take_watched(&a, &[], &w, true, HOUR + 3600)
        .await
        .unwrap();
    let st = h.store.watch_state(&a).await.unwrap();
    assert_eq!(
        (st.hour, st.messages, st.baseline_milli),
        (HOUR + 3600, 1, 2000)
    );
    h.store
        .take_watched(&a, &[], &w, true, HOUR + 3 * 3600)
        .await
        .unwrap();
    let st = h.peer.watch_state(&a).await.unwrap();
    assert_eq!((st.messages, st.baseline_milli), (1, 1710));
    let mut expected = WatchState::default();
    for _ in 0..20 {
        expected.count_accepted(&w, true, HOUR + 5);
    }
    expected.count_accepted(&w, true, HOUR + 3600);
    expected.count_accepted(&w, true, HOUR + 3 * 3600);
    assert_eq!(st, expected);
    // The threshold now is max(floor, 10 x 1.71) = 17 with a floor of 5.
    let low = Watch {
        burst_floor: 5,
        ..w
    };
    let mut last = None;
    for _ in 0..17 {
        last = Some(
            h.store
                .take_watched(&a, &[], &low, true, HOUR + 3 * 3600)
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        last,
        Some(WatchOutcome::Tripped(SendLock {
            at: HOUR + 3 * 3600,
            by: watch::AUTOMATIC.into(),
            cause: LockCause::Burst {
                messages: 18,
                baseline_milli: 1710,
                threshold: 17
            },
        }))
    );
}

pub async fn watch_refused_take_counts_nothing(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let w = watch(1);
    let t = [take(MSG_HOUR, 1, Some(1))];
    let o = h.store.take_watched(&a, &t, &w, true, NOW).await.unwrap();
    assert_eq!(o, WatchOutcome::Counted(TakeOutcome::Taken));
    let o = h.store.take_watched(&a, &t, &w, true, NOW).await.unwrap();
    assert_eq!(
        o,
        WatchOutcome::Counted(TakeOutcome::Refused {
            counter: MSG_HOUR,
            count: 1,
            limit: 1
        })
    );
    assert_eq!(h.store.watch_state(&a).await.unwrap().messages, 1);
    assert_eq!(h.store.send_lock(&a).await.unwrap(), None);
}

pub async fn watch_locks_on_refused_recipients(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let w = watch(1000);
    for _ in 0..2 {
        h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    }
    for _ in 0..2 {
        let o = h.peer.count_rejected(&a, &w, NOW).await.unwrap();
        assert_eq!(o, WatchOutcome::Counted(TakeOutcome::Taken));
    }
    let o = h.store.count_rejected(&a, &w, NOW).await.unwrap();
    let lock = SendLock {
        at: NOW,
        by: watch::AUTOMATIC.into(),
        cause: LockCause::Rejections {
            rejected: 3,
            total: 5,
        },
    };
    assert_eq!(o, WatchOutcome::Tripped(lock.clone()));
    assert_eq!(h.peer.send_lock(&a).await.unwrap(), Some(lock));
    // The next hour starts over.
    let b = addr("kham@mpt.gov.la");
    for _ in 0..2 {
        h.store.count_rejected(&b, &w, NOW).await.unwrap();
    }
    let o = h.store.count_rejected(&b, &w, NOW + 3600).await.unwrap();
    assert_eq!(o, WatchOutcome::Counted(TakeOutcome::Taken));
    let st = h.store.watch_state(&b).await.unwrap();
    assert_eq!((st.rej_hour, st.rejected), (HOUR + 3600, 1));
}

pub async fn watch_in_monitor_mode_stores_no_lock(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let w = Watch {
        lock: false,
        ..watch(1)
    };
    h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    let o = h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    assert!(matches!(o, WatchOutcome::Tripped(_)), "{o:?}");
    assert_eq!(h.store.send_lock(&a).await.unwrap(), None);
    let o = h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    assert!(
        matches!(o, WatchOutcome::Tripped(_)),
        "still counted: {o:?}"
    );
    assert_eq!(h.store.watch_state(&a).await.unwrap().messages, 3);
}

pub async fn send_lock_is_set_and_released(h: Harness) {
    let a = addr("champa@mpt.gov.la");
    let w = watch(2);
    h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    let manual = SendLock {
        at: NOW,
        by: "security-desk".into(),
        cause: LockCause::Manual {
            reason: "phishing \"reply\" seen; ticket 7".into(),
        },
    };
    assert_eq!(
        h.store.set_send_lock(&a, Some(&manual)).await.unwrap(),
        None
    );
    assert_eq!(h.peer.send_lock(&a).await.unwrap(), Some(manual.clone()));
    assert_eq!(
        h.peer.set_send_lock(&a, None).await.unwrap(),
        Some(manual),
        "release returns the lock it removed"
    );
    assert_eq!(h.store.send_lock(&a).await.unwrap(), None);
    assert_eq!(h.store.set_send_lock(&a, None).await.unwrap(), None);
    // The hour's counts start again, so the account may send (up to the floor) at once.
    let st = h.store.watch_state(&a).await.unwrap();
    assert_eq!((st.messages, st.accepted, st.rejected), (0, 0, 0));
    let o = h.store.take_watched(&a, &[], &w, true, NOW).await.unwrap();
    assert_eq!(o, WatchOutcome::Counted(TakeOutcome::Taken));
}

pub async fn racing_instances_trip_exactly_once(h: Harness) {
    const SENDERS: usize = 30;
    const FLOOR: u64 = 10;
    let a = addr("champa@mpt.gov.la");
    let barrier = Arc::new(Barrier::new(SENDERS));
    let tasks: Vec<_> = (0..SENDERS)
        .map(|i| {
            let store = if i % 2 == 0 {
                h.store.clone()
            } else {
                h.peer.clone()
            };
            let (barrier, a) = (barrier.clone(), a.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let t = [take(MSG_HOUR, 1, None)];
                store
                    .take_watched(&a, &t, &watch(FLOOR), true, NOW)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let (mut counted, mut tripped, mut locked) = (0, 0, 0);
    for task in tasks {
        match task.await.unwrap() {
            WatchOutcome::Counted(TakeOutcome::Taken) => counted += 1,
            WatchOutcome::Tripped(_) => tripped += 1,
            WatchOutcome::Locked(_) => locked += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (counted, tripped, locked),
        (FLOOR, 1, SENDERS as u64 - FLOOR - 1)
    );
    assert_eq!(counts(&*h.peer, &a, NOW).await, [FLOOR + 1, 0, 0, 0]);
}

pub async fn last_use_keeps_the_latest_time(h: Harness) {
    let (a, b, c) = (
        addr("champa@mpt.gov.la"),
        addr("kham@mpt.gov.la"),
        addr("noy@mpt.gov.la"),
    );
    assert_eq!(
        h.store.last_use(std::slice::from_ref(&a)).await.unwrap(),
        [None]
    );
    h.store.touch(&a, NOW).await.unwrap();
    h.peer.touch(&b, NOW - 10).await.unwrap();
    h.peer.touch(&a, NOW - 100).await.unwrap(); // a late write from a lagging instance
    assert_eq!(
        h.peer
            .last_use(&[b.clone(), c.clone(), a.clone()])
            .await
            .unwrap(),
        [Some(NOW - 10), None, Some(NOW)]
    );
    h.store.touch(&a, NOW + 60).await.unwrap();
    assert_eq!(h.store.last_use(&[a]).await.unwrap(), [Some(NOW + 60)]);
    assert_eq!(
        h.store.last_use(&[]).await.unwrap(),
        Vec::<Option<Timestamp>>::new()
    );
}
