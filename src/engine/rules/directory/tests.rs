use crate::config::Config;
use crate::engine::{AddressFacts, Policy, StoreFailure, check_recipient, check_sender};
use crate::model::{Action, Address, Protocol, RuleId, Sender, Transaction};
use crate::store::{Account, AccountKind, AccountStatus, Org, OrgStatus};

fn org(status: OrgStatus) -> Org {
    Org {
        code: "mpt".into(),
        name: "Ministry of Posts and Telecommunications".into(),
        domain: "mpt.gov.la".into(),
        status,
        status_reason: None,
        created_at: 0,
        status_changed_at: 0,
    }
}

fn account(addr: &str, status: AccountStatus) -> Account {
    Account {
        address: addr.parse().unwrap(),
        org: "mpt".into(),
        kind: AccountKind::Person,
        status,
        status_reason: None,
        display_name: None,
        created_at: 0,
        status_changed_at: 0,
        quota_bytes: None,
    }
}

fn local(status: AccountStatus) -> AddressFacts {
    AddressFacts {
        org: Some(org(OrgStatus::Active)),
        account: Some(account("champa@mpt.gov.la", status)),
    }
}

fn policy(toml: &str) -> Policy {
    Policy::from_config(&Config::from_toml(toml).unwrap())
}

fn tx(sender: &str) -> Transaction {
    let mut t = Transaction::new(Protocol::Policy);
    t.sender = Some(Sender::parse(sender));
    t
}

fn rcpt_reply(p: &Policy, facts: AddressFacts) -> Option<String> {
    let a: Address = "champa@mpt.gov.la".parse().unwrap();
    match check_recipient(p, &tx("x@example.org"), &a, &Ok(facts)).action {
        Action::Continue => None,
        Action::Reject(r) | Action::Tempfail(r) => Some(format!("{} {}", r.code, r.enhanced)),
    }
}

fn sender_reply(p: &Policy, facts: AddressFacts) -> Option<String> {
    match check_sender(p, &tx("champa@mpt.gov.la"), Some(&Ok(facts))).action {
        Action::Continue => None,
        Action::Reject(r) | Action::Tempfail(r) => Some(format!("{} {}", r.code, r.enhanced)),
    }
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
    let ceased = AddressFacts {
        org: Some(org(OrgStatus::Ceased)),
        account: Some(account("champa@mpt.gov.la", AccountStatus::Active)),
    };
    assert_eq!(rcpt_reply(&p, ceased).as_deref(), Some("550 5.1.1"));
}

#[test]
fn non_local_and_unknown_recipients_pass() {
    let p = policy("");
    assert_eq!(rcpt_reply(&p, AddressFacts::default()), None);
    let unknown = AddressFacts {
        org: Some(org(OrgStatus::Active)),
        account: None,
    };
    assert_eq!(rcpt_reply(&p, unknown), None);
}

#[test]
fn r2_withdrawn_or_ceased_sender_is_refused_550_5_7_1() {
    let p = policy("");
    assert_eq!(
        sender_reply(&p, local(AccountStatus::Withdrawn)).as_deref(),
        Some("550 5.7.1")
    );
    let ceased = AddressFacts {
        org: Some(org(OrgStatus::Ceased)),
        account: Some(account("champa@mpt.gov.la", AccountStatus::Active)),
    };
    assert_eq!(sender_reply(&p, ceased).as_deref(), Some("550 5.7.1"));
}

#[test]
fn r9_unknown_or_pending_local_sender_is_refused_553_5_7_1() {
    let p = policy("");
    assert_eq!(
        sender_reply(&p, local(AccountStatus::Pending)).as_deref(),
        Some("553 5.7.1")
    );
    let unknown = AddressFacts {
        org: Some(org(OrgStatus::Active)),
        account: None,
    };
    assert_eq!(sender_reply(&p, unknown).as_deref(), Some("553 5.7.1"));
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
