use super::*;
use crate::config::Config;
use crate::engine::{Policy, check_headers, check_sender_as};
use crate::model::{Action, Decision, Protocol};

fn policy(toml: &str) -> Policy {
    Policy::from_config(&Config::from_toml(toml).unwrap())
}

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

/// An authenticated submission over TLS from a client exempt from nothing: only R8 can
/// object (the R2/R9/R10 lookups are not given).
fn tx(login: Option<&str>, sender: &str) -> Transaction {
    let mut t = Transaction::new(Protocol::Milter);
    t.client_addr = Some("192.0.2.10".parse().unwrap());
    t.tls_version = Some("TLSv1.3".into());
    t.sasl_username = login.map(str::to_owned);
    t.sender = Some(Sender::parse(sender));
    t
}

/// The login `champa@mpt.gov.la`, registered; `cabinet@` is delegated to it, `dg@` is not.
fn champa() -> Identity {
    Identity {
        account: Some(addr("champa@mpt.gov.la")),
        registered: Ok(true),
        delegates: vec![
            (
                addr("cabinet@mpt.gov.la"),
                Ok(vec![addr("champa@mpt.gov.la"), addr("dara@mpt.gov.la")]),
            ),
            (addr("dg@mpt.gov.la"), Ok(vec![addr("dara@mpt.gov.la")])),
            (addr("noy@mof.gov.la"), Ok(vec![])),
        ],
    }
}

fn mail(p: &Policy, t: &Transaction, id: &Identity) -> Decision {
    check_sender_as(p, t, None, Some(id))
}

#[track_caller]
fn rejected(d: &Decision) -> &Reply {
    match &d.action {
        Action::Reject(r) => r,
        other => panic!("expected a reject, got {other:?} ({d:?})"),
    }
}

#[track_caller]
fn r8_553(d: &Decision, naming: &str) {
    let r = rejected(d);
    assert_eq!((r.code, r.enhanced), (553, "5.7.1"), "{r:?}");
    assert!(r.text.contains(naming), "{naming:?} not in {:?}", r.text);
    assert_eq!(d.outcomes[0].rule, RuleId::R8);
    assert_eq!(d.outcomes[0].kind, "reject");
}

fn headers(from: &[&[&str]], sender: &[&[&str]]) -> (HeaderAddresses, HeaderAddresses) {
    let field = |fields: &[&[&str]]| HeaderAddresses {
        fields: fields.len(),
        mailboxes: fields
            .iter()
            .flat_map(|f| f.iter().map(|m| Sender::parse(m)))
            .collect(),
    };
    (field(from), field(sender))
}

fn with_headers(mut t: Transaction, from: &[&[&str]], sender: &[&[&str]]) -> Transaction {
    (t.from_fields, t.sender_fields) = headers(from, sender);
    t
}

#[test]
fn login_names_an_account() {
    let d = Some("mpt.gov.la");
    assert_eq!(
        login_address("Champa@MPT.gov.la", None),
        Some(addr("champa@mpt.gov.la"))
    );
    assert_eq!(login_address("champa", d), Some(addr("champa@mpt.gov.la")));
    // A full address is taken as it is, whatever the default domain.
    assert_eq!(
        login_address("noy@mof.gov.la", d),
        Some(addr("noy@mof.gov.la"))
    );
    assert_eq!(login_address("champa", None), None);
    assert_eq!(login_address("not an address@", d), None);
}

#[test]
fn own_address_is_accepted_at_mail() {
    let d = mail(
        &policy(""),
        &tx(Some("champa@mpt.gov.la"), "<Champa@mpt.gov.la>"),
        &champa(),
    );
    assert_eq!(d, Decision::pass());
}

#[test]
fn delegated_mailbox_is_accepted_at_mail() {
    let d = mail(
        &policy(""),
        &tx(Some("champa@mpt.gov.la"), "cabinet@mpt.gov.la"),
        &champa(),
    );
    assert_eq!(d, Decision::pass());
}

#[test]
fn someone_elses_address_is_refused_553_naming_it() {
    let p = policy("");
    for other in ["dg@mpt.gov.la", "noy@mof.gov.la", "someone@example.org"] {
        let d = mail(&p, &tx(Some("champa@mpt.gov.la"), other), &champa());
        r8_553(&d, &format!("<{other}> is not yours"));
        assert!(rejected(&d).text.contains("logged in as champa@mpt.gov.la"));
        assert_eq!(d.outcomes[0].subject, other);
    }
}

#[test]
fn unauthenticated_mail_is_not_judged() {
    let p = policy("");
    let t = tx(None, "dg@mpt.gov.la");
    assert_eq!(mail(&p, &t, &champa()), Decision::pass());
    let t = with_headers(
        tx(None, "x@example.org"),
        &[&["dg@mpt.gov.la", "a@b.org"]],
        &[],
    );
    assert_eq!(check_headers(&p, &t, &champa()), Decision::pass());
}

#[test]
fn null_sender_is_accepted_at_mail_but_an_unparsed_one_is_not() {
    let p = policy("");
    let d = mail(&p, &tx(Some("champa@mpt.gov.la"), "<>"), &champa());
    assert_eq!(d, Decision::pass());
    let d = mail(&p, &tx(Some("champa@mpt.gov.la"), "<champa>"), &champa());
    r8_553(&d, "<champa> is not a valid address");
}

#[test]
fn a_login_that_is_no_account_owns_nothing() {
    let p = policy("");
    // A bare login without `login_domain`.
    let bare = Identity {
        account: None,
        registered: Ok(false),
        delegates: vec![],
    };
    let d = mail(&p, &tx(Some("champa"), "champa@mpt.gov.la"), &bare);
    r8_553(&d, "<champa@mpt.gov.la> is not yours");
    let text = &rejected(&d).text;
    assert!(
        text.contains("your login is not a registered address"),
        "{text}"
    );
    assert!(
        !text.contains("\"champa\""),
        "the raw login is not echoed: {text}"
    );
    // A full address that is not registered (even its own address is refused).
    let ghost = Identity {
        account: Some(addr("ghost@mpt.gov.la")),
        registered: Ok(false),
        delegates: vec![],
    };
    let d = mail(
        &p,
        &tx(Some("ghost@mpt.gov.la"), "ghost@mpt.gov.la"),
        &ghost,
    );
    r8_553(
        &d,
        "your login ghost@mpt.gov.la is not a registered account",
    );
}

#[test]
fn store_failures_follow_on_store_error() {
    let failed = |id: &mut Identity| {
        id.delegates[0].1 = Err(StoreFailure("down".into()));
    };
    let mut id = champa();
    failed(&mut id);
    let t = tx(Some("champa@mpt.gov.la"), "cabinet@mpt.gov.la");
    let d = mail(&policy(""), &t, &id);
    let Action::Tempfail(r) = &d.action else {
        panic!("{d:?}")
    };
    assert_eq!((r.code, r.enhanced), (451, "4.3.0"));
    // Failing open: let through, recorded.
    let d = mail(
        &policy("[rules.R8]\non_store_error = \"accept\"\n"),
        &t,
        &id,
    );
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "fail_open");
    // Own address needs no delegate lookup, but the login's own lookup must have worked.
    let id = Identity {
        registered: Err(StoreFailure("down".into())),
        ..champa()
    };
    let t = tx(Some("champa@mpt.gov.la"), "champa@mpt.gov.la");
    assert!(matches!(
        mail(&policy(""), &t, &id).action,
        Action::Tempfail(_)
    ));
}

#[test]
fn monitor_records_and_off_ignores() {
    let t = tx(Some("champa@mpt.gov.la"), "dg@mpt.gov.la");
    let d = mail(&policy("[rules.R8]\nmode = \"monitor\"\n"), &t, &champa());
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "would_reject");
    assert_eq!(d.outcomes[0].rule, RuleId::R8);
    let d = mail(&policy("[rules.R8]\nmode = \"off\"\n"), &t, &champa());
    assert_eq!(d, Decision::pass());
}

#[test]
fn headers_own_or_delegated_from_and_sender_are_accepted() {
    let p = policy("");
    let t = tx(Some("champa@mpt.gov.la"), "champa@mpt.gov.la");
    for (from, sender) in [
        (&["champa@mpt.gov.la"][..], &[][..]),
        (
            &["cabinet@mpt.gov.la"][..],
            &[&["champa@mpt.gov.la"][..]][..],
        ),
        (&["cabinet@mpt.gov.la"][..], &[][..]),
    ] {
        let t = with_headers(t.clone(), &[from], sender);
        assert_eq!(
            check_headers(&p, &t, &champa()),
            Decision::pass(),
            "{from:?}"
        );
    }
}

#[test]
fn someone_elses_from_or_sender_is_refused_naming_it() {
    let p = policy("");
    let t = tx(Some("champa@mpt.gov.la"), "champa@mpt.gov.la");
    let d = check_headers(
        &p,
        &with_headers(t.clone(), &[&["dg@mpt.gov.la"]], &[]),
        &champa(),
    );
    r8_553(&d, "From: address <dg@mpt.gov.la> is not yours");
    assert_eq!(d.outcomes[0].stage, crate::model::Stage::EndOfMessage);
    let d = check_headers(
        &p,
        &with_headers(t, &[&["champa@mpt.gov.la"]], &[&["noy@mof.gov.la"]]),
        &champa(),
    );
    r8_553(&d, "Sender: address <noy@mof.gov.la> is not yours");
}

#[test]
fn exactly_one_from_field_with_exactly_one_address() {
    let p = policy("");
    let t = tx(Some("champa@mpt.gov.la"), "champa@mpt.gov.la");
    let me = &["champa@mpt.gov.la"][..];
    let d = check_headers(&p, &with_headers(t.clone(), &[me, me], &[]), &champa());
    r8_553(&d, "The message has 2 From: header fields");
    let d = check_headers(&p, &with_headers(t.clone(), &[], &[]), &champa());
    r8_553(&d, "The message has 0 From: header fields");
    let two = &["champa@mpt.gov.la", "cabinet@mpt.gov.la"][..];
    let d = check_headers(&p, &with_headers(t.clone(), &[two], &[]), &champa());
    r8_553(
        &d,
        "holds 2 addresses (<champa@mpt.gov.la>, <cabinet@mpt.gov.la>)",
    );
    // A group with no member (`undisclosed:;`) holds no address.
    let d = check_headers(&p, &with_headers(t.clone(), &[&[]], &[]), &champa());
    r8_553(&d, "holds 0 addresses (none)");
    let d = check_headers(&p, &with_headers(t, &[&["<>"]], &[]), &champa());
    r8_553(&d, "From: address <> is empty");
}

#[test]
fn pending_and_withdrawn_logins_may_not_send() {
    use crate::store::testing::account;
    let mut a = account("champa@mpt.gov.la", "mpt");
    for (status, may) in [
        (AccountStatus::Active, true),
        (AccountStatus::Suspended, true),
        (AccountStatus::Pending, false),
        (AccountStatus::Withdrawn, false),
    ] {
        a.status = status;
        assert_eq!(may_send(&a), may, "{status}");
    }
}
