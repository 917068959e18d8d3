use crate::config::Config;
use crate::engine::{AddressFacts, Policy, StoreFailure, check_recipient, check_sender};
use crate::model::{Action, Address, Protocol, RuleId, Sender, Transaction};
use crate::store::testing::{account_with, org_with};
use crate::store::{AccountStatus, OrgStatus};

/// What a lookup of `champa@mpt.gov.la` finds: `mpt` in `org`, and the account in `account`
/// (`None`: not registered).
fn facts(org: OrgStatus, account: Option<AccountStatus>) -> AddressFacts {
    AddressFacts {
        org: Some(org_with("mpt", org)),
        account: account.map(|s| account_with("champa@mpt.gov.la", s)),
    }
}

/// An account of the active organisation `mpt`, in `status`.
fn local(status: AccountStatus) -> AddressFacts {
    facts(OrgStatus::Active, Some(status))
}

/// An active account of the ceased organisation.
fn ceased() -> AddressFacts {
    facts(OrgStatus::Ceased, Some(AccountStatus::Active))
}

/// A name in the active organisation that is not registered.
fn unknown() -> AddressFacts {
    facts(OrgStatus::Active, None)
}

fn policy(toml: &str) -> Policy {
    Policy::from_config(&Config::from_toml(toml).unwrap())
}

fn tx(sender: &str) -> Transaction {
    let mut t = Transaction::new(Protocol::Policy);
    t.sender = Some(Sender::parse(sender));
    // Over TLS, so that R11 (TLS-only submission) has nothing to say.
    t.tls_version = Some("TLSv1.3".into());
    t
}

/// The reply's codes (`550 5.2.1`), or `None` when the check lets the transaction go on.
fn codes(action: Action) -> Option<String> {
    match action {
        Action::Continue => None,
        Action::Reject(r) | Action::Tempfail(r) => Some(format!("{} {}", r.code, r.enhanced)),
    }
}

fn rcpt_reply(p: &Policy, facts: AddressFacts) -> Option<String> {
    let a: Address = "champa@mpt.gov.la".parse().unwrap();
    codes(check_recipient(p, &tx("x@example.org"), &a, &Ok(facts)).action)
}

fn sender_reply(p: &Policy, facts: AddressFacts) -> Option<String> {
    codes(check_sender(p, &tx("champa@mpt.gov.la"), Some(&Ok(facts))).action)
}

#[test]
fn r1_suspended_recipient_is_refused_550_5_2_1() {
    let p = policy("");
    assert_eq!(
        rcpt_reply(&p, local(AccountStatus::Suspended)).as_deref(),
        Some("550 5.2.1")
    );
    assert_eq!(rcpt_reply(&p, local(AccountStatus::Active)), None);
    assert_eq!(rcpt_reply(&p, local(AccountStatus::Pending)), None);
}

#[test]
fn r2_withdrawn_recipient_and_ceased_org_are_refused_550_5_1_1() {
    let p = policy("");
    assert_eq!(
        rcpt_reply(&p, local(AccountStatus::Withdrawn)).as_deref(),
        Some("550 5.1.1")
    );
    assert_eq!(rcpt_reply(&p, ceased()).as_deref(), Some("550 5.1.1"));
}

#[test]
fn non_local_and_unknown_recipients_pass() {
    let p = policy("");
    assert_eq!(rcpt_reply(&p, AddressFacts::default()), None);
    assert_eq!(rcpt_reply(&p, unknown()), None);
}

#[test]
fn r2_withdrawn_or_ceased_sender_is_refused_550_5_7_1() {
    let p = policy("");
    assert_eq!(
        sender_reply(&p, local(AccountStatus::Withdrawn)).as_deref(),
        Some("550 5.7.1")
    );
    assert_eq!(sender_reply(&p, ceased()).as_deref(), Some("550 5.7.1"));
}

#[test]
fn r9_unknown_or_pending_local_sender_is_refused_553_5_7_1() {
    let p = policy("");
    assert_eq!(
        sender_reply(&p, local(AccountStatus::Pending)).as_deref(),
        Some("553 5.7.1")
    );
    assert_eq!(sender_reply(&p, unknown()).as_deref(), Some("553 5.7.1"));
    assert_eq!(sender_reply(&p, local(AccountStatus::Active)), None);
    // A sender outside the local domains is not R9's business.
    assert_eq!(sender_reply(&p, AddressFacts::default()), None);
}

#[test]
fn null_sender_is_not_judged() {
    let p = policy("");
    let d = check_sender(&p, &tx("<>"), None);
    assert_eq!(d.action, Action::Continue);
    assert!(d.outcomes.is_empty());
}

#[test]
fn monitor_mode_records_would_reject_and_passes() {
    let p = policy("[rules.R1]\nmode = \"monitor\"\n");
    let a: Address = "champa@mpt.gov.la".parse().unwrap();
    let d = check_recipient(
        &p,
        &tx("x@example.org"),
        &a,
        &Ok(local(AccountStatus::Suspended)),
    );
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes.len(), 1);
    assert_eq!(d.outcomes[0].rule, RuleId::R1);
    assert_eq!(d.outcomes[0].kind, "would_reject");
    assert_eq!(d.outcomes[0].reply.enhanced, "5.2.1");
}

#[test]
fn off_mode_skips_the_rule() {
    let p = policy("[rules.R1]\nmode = \"off\"\n");
    assert_eq!(rcpt_reply(&p, local(AccountStatus::Suspended)), None);
    // R2 still applies.
    assert_eq!(
        rcpt_reply(&p, local(AccountStatus::Withdrawn)).as_deref(),
        Some("550 5.1.1")
    );
}

#[test]
fn store_failure_tempfails_451_4_3_0_by_default() {
    let p = policy("");
    let a: Address = "champa@mpt.gov.la".parse().unwrap();
    let d = check_recipient(
        &p,
        &tx("x@example.org"),
        &a,
        &Err(StoreFailure("down".into())),
    );
    match d.action {
        Action::Tempfail(r) => assert_eq!((r.code, r.enhanced), (451, "4.3.0")),
        other => panic!("expected tempfail, got {other:?}"),
    }
}

#[test]
fn store_failure_fails_open_when_configured_and_is_recorded() {
    let p = policy(
        "[rules.R1]\non_store_error = \"accept\"\n[rules.R2]\non_store_error = \"accept\"\n",
    );
    let a: Address = "champa@mpt.gov.la".parse().unwrap();
    let d = check_recipient(
        &p,
        &tx("x@example.org"),
        &a,
        &Err(StoreFailure("down".into())),
    );
    assert_eq!(d.action, Action::Continue);
    let kinds: Vec<_> = d.outcomes.iter().map(|o| (o.rule, o.kind)).collect();
    assert_eq!(
        kinds,
        [(RuleId::R2, "fail_open"), (RuleId::R1, "fail_open")]
    );
}

#[test]
fn store_failure_tempfails_if_any_rule_does_not_fail_open() {
    let p = policy("[rules.R1]\non_store_error = \"accept\"\n");
    let a: Address = "champa@mpt.gov.la".parse().unwrap();
    let d = check_recipient(
        &p,
        &tx("x@example.org"),
        &a,
        &Err(StoreFailure("down".into())),
    );
    assert!(matches!(d.action, Action::Tempfail(_)));
}
