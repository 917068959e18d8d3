use super::*;
use crate::config::Config;
use crate::model::{Address, Protocol, Sender};

fn policy(toml: &str) -> Policy {
    Policy::from_config(&Config::from_toml(toml).unwrap())
}

fn tx(sender: &str, from: &[&str], sasl: Option<&str>) -> Transaction {
    let mut t = Transaction::new(Protocol::Milter);
    t.sender = Some(Sender::parse(sender));
    t.header_from = from.iter().map(|a| a.parse::<Address>().unwrap()).collect();
    t.sasl_username = sasl.map(str::to_owned);
    t
}

const KEYS: &[&str] = &["mof.gov.la", "mpt.gov.la", "mpt.gov.la"];

#[test]
fn authenticated_local_mail_is_signed_with_every_key_of_its_domain() {
    let p = policy("");
    let t = tx("<a@mpt.gov.la>", &["a@mpt.gov.la"], Some("a"));
    assert_eq!(candidate(&p, &t, false, true), Ok("mpt.gov.la"));
    let (d, plan) = decide(&p, "mpt.gov.la", &Ok(true), KEYS);
    assert_eq!(d, Decision::pass());
    assert_eq!(
        plan,
        SigningPlan::Sign {
            domain: "mpt.gov.la".into(),
            keys: vec![1, 2]
        }
    );
}

#[test]
fn header_from_wins_over_the_envelope_sender_and_the_first_from_counts() {
    let p = policy("");
    let t = tx(
        "<bounce@mof.gov.la>",
        &["a@MPT.gov.la", "b@mof.gov.la"],
        Some("a"),
    );
    assert_eq!(candidate(&p, &t, false, true), Ok("mpt.gov.la"));
    // No header From (not seen yet, or absent): the envelope sender's domain.
    let t = tx("<bounce@mof.gov.la>", &[], Some("a"));
    assert_eq!(candidate(&p, &t, false, true), Ok("mof.gov.la"));
    let t = tx("<>", &[], Some("a"));
    assert_eq!(
        candidate(&p, &t, false, true),
        Err(NotSigned::NoAuthorDomain)
    );
}

#[test]
fn only_authenticated_or_internal_clients_are_signed() {
    let p = policy("");
    let t = tx("<a@mpt.gov.la>", &["a@mpt.gov.la"], None);
    assert_eq!(
        candidate(&p, &t, false, true),
        Err(NotSigned::NotSubmission)
    );
    assert_eq!(candidate(&p, &t, true, true), Ok("mpt.gov.la"));
}

#[test]
fn no_keys_configured_or_rule_off_means_no_signing() {
    let t = tx("<a@mpt.gov.la>", &["a@mpt.gov.la"], Some("a"));
    assert_eq!(
        candidate(&policy(""), &t, false, false),
        Err(NotSigned::Disabled)
    );
    let off = policy("[rules.R6]\nmode = \"off\"\n");
    assert_eq!(candidate(&off, &t, false, true), Err(NotSigned::Disabled));
}

#[test]
fn non_local_domain_is_not_signed() {
    let (d, plan) = decide(&policy(""), "example.org", &Ok(false), KEYS);
    assert_eq!(d, Decision::pass());
    assert_eq!(plan, SigningPlan::NotSigned(NotSigned::NotLocal));
}

#[test]
fn local_domain_without_key_is_tempfailed_4_7_5_never_passed() {
    let (d, plan) = decide(&policy(""), "mict.gov.la", &Ok(true), KEYS);
    let Action::Tempfail(r) = &d.action else {
        panic!("tempfail expected: {d:?}")
    };
    assert_eq!((r.code, r.enhanced), (451, "4.7.5"));
    assert!(r.text.contains("No DKIM key for mict.gov.la"), "{}", r.text);
    assert!(r.text.contains("not sent unsigned"), "{}", r.text);
    assert_eq!(plan, SigningPlan::NotSigned(NotSigned::Refused));
    assert_eq!(d.outcomes.len(), 1);
    assert_eq!(d.outcomes[0].rule, RuleId::R6);
    assert_eq!(d.outcomes[0].kind, "tempfail");
    assert_eq!(d.outcomes[0].stage, Stage::EndOfMessage);
    assert_eq!(d.outcomes[0].subject, "mict.gov.la");
}

#[test]
fn monitor_mode_records_would_tempfail_and_lets_it_through() {
    let (d, plan) = decide(
        &policy("[rules.R6]\nmode = \"monitor\"\n"),
        "mict.gov.la",
        &Ok(true),
        KEYS,
    );
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "would_tempfail");
    assert_eq!(plan, SigningPlan::NotSigned(NotSigned::Monitored));
}

#[test]
fn store_failure_tempfails_or_fails_open_as_configured() {
    let down = Err(StoreFailure("down".into()));
    let (d, plan) = decide(&policy(""), "mpt.gov.la", &down, KEYS);
    assert_eq!(d.action, Action::Tempfail(Reply::store_unavailable()));
    assert_eq!(plan, SigningPlan::NotSigned(NotSigned::Refused));

    let open = policy("[rules.R6]\non_store_error = \"accept\"\n");
    let (d, plan) = decide(&open, "mpt.gov.la", &down, KEYS);
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "fail_open");
    assert_eq!(plan, SigningPlan::NotSigned(NotSigned::FailOpen));
}

#[test]
fn signing_failure_tempfails_4_7_5() {
    let d = failed(&policy(""), "mpt.gov.la");
    let Action::Tempfail(r) = &d.action else {
        panic!("{d:?}")
    };
    assert_eq!((r.code, r.enhanced), (451, "4.7.5"));
    let d = failed(&policy("[rules.R6]\nmode = \"monitor\"\n"), "mpt.gov.la");
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "would_tempfail");
}
