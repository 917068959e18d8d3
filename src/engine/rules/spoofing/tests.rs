use super::*;
use crate::config::Config;
use crate::model::Action;

fn policy(toml: &str) -> Policy {
    Policy::from_config(&Config::from_toml(toml).unwrap())
}

const ON: &str = "[rules.R7]\n";

fn local(domain: &str) -> Vec<(String, Result<bool, StoreFailure>)> {
    vec![(domain.to_owned(), Ok(true))]
}

fn evidence(spf: Option<(&str, Check)>, dkim: &[(&str, Check)]) -> Evidence {
    Evidence {
        spf: spf.map(|(d, c)| (d.to_owned(), c)),
        dkim: dkim.iter().map(|(d, c)| (d.to_string(), *c)).collect(),
        timed_out: false,
    }
}

fn reply(d: &Decision) -> Option<(u16, &'static str)> {
    match &d.action {
        Action::Continue => None,
        Action::Reject(r) | Action::Tempfail(r) => Some((r.code, r.enhanced)),
    }
}

#[test]
fn alignment_is_the_domain_or_a_subdomain_never_a_sibling() {
    assert!(aligned("mpt.gov.la", "mpt.gov.la"));
    assert!(aligned("MPT.gov.la.", "mpt.gov.la"));
    assert!(aligned("mail.mpt.gov.la", "mpt.gov.la"));
    assert!(!aligned("mof.gov.la", "mpt.gov.la"));
    assert!(!aligned("gov.la", "mpt.gov.la"));
    assert!(!aligned("xmpt.gov.la", "mpt.gov.la"));
}

#[test]
fn spoofed_local_from_from_outside_is_refused_5_7_26() {
    let p = policy(ON);
    let e = evidence(
        Some(("evil.example", Check::Pass)),
        &[("evil.example", Check::Pass)],
    );
    let d = decide(
        &p,
        OnError::Tempfail,
        &Source::Outside,
        &local("mpt.gov.la"),
        &e,
    );
    assert_eq!(reply(&d), Some((550, "5.7.26")));
    assert_eq!(d.outcomes[0].rule, RuleId::R7);
    assert_eq!(d.outcomes[0].subject, "mpt.gov.la");
}

#[test]
fn aligned_dkim_or_spf_pass_is_enough() {
    let p = policy(ON);
    for e in [
        evidence(
            Some(("evil.example", Check::Other)),
            &[("mpt.gov.la", Check::Pass)],
        ),
        evidence(Some(("mpt.gov.la", Check::Pass)), &[]),
        evidence(
            Some(("bounces.mpt.gov.la", Check::Pass)),
            &[("mpt.gov.la", Check::Other)],
        ),
    ] {
        let d = decide(
            &p,
            OnError::Tempfail,
            &Source::Outside,
            &local("mpt.gov.la"),
            &e,
        );
        assert_eq!(d, Decision::pass(), "{e:?}");
    }
}

#[test]
fn a_pass_for_another_government_domain_does_not_vouch() {
    let p = policy(ON);
    let e = evidence(
        Some(("mof.gov.la", Check::Pass)),
        &[("mof.gov.la", Check::Pass)],
    );
    let d = decide(
        &p,
        OnError::Tempfail,
        &Source::Outside,
        &local("mpt.gov.la"),
        &e,
    );
    assert_eq!(reply(&d), Some((550, "5.7.26")));
}

#[test]
fn authorised_sources_and_foreign_from_are_not_judged() {
    let p = policy(ON);
    let none = Evidence::default();
    let d = decide(
        &p,
        OnError::Tempfail,
        &Source::Authorised,
        &local("mpt.gov.la"),
        &none,
    );
    assert_eq!(d, Decision::pass());
    let foreign = vec![("example.org".to_owned(), Ok(false))];
    let d = decide(&p, OnError::Tempfail, &Source::Outside, &foreign, &none);
    assert_eq!(d, Decision::pass());
}

#[test]
fn dns_failure_on_an_aligned_identifier_tempfails_4_4_3_or_fails_open() {
    let p = policy(ON);
    let e = evidence(
        Some(("mpt.gov.la", Check::TempError)),
        &[("evil.example", Check::Pass)],
    );
    let from = local("mpt.gov.la");
    let d = decide(&p, OnError::Tempfail, &Source::Outside, &from, &e);
    assert_eq!(reply(&d), Some((451, "4.4.3")));
    let d = decide(&p, OnError::Accept, &Source::Outside, &from, &e);
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "fail_open");

    // The time budget ran out: same as a DNS failure.
    let timed_out = Evidence {
        timed_out: true,
        ..Evidence::default()
    };
    let d = decide(&p, OnError::Tempfail, &Source::Outside, &from, &timed_out);
    assert_eq!(reply(&d), Some((451, "4.4.3")));
    // A temperror for an unrelated identifier does not hold up the refusal.
    let e = evidence(Some(("evil.example", Check::TempError)), &[]);
    let d = decide(&p, OnError::Tempfail, &Source::Outside, &from, &e);
    assert_eq!(reply(&d), Some((550, "5.7.26")));
}

#[test]
fn store_failures_apply_on_store_error() {
    let p = policy(ON);
    let none = Evidence::default();
    let unknown = vec![("mpt.gov.la".to_owned(), Err(StoreFailure("down".into())))];
    let d = decide(&p, OnError::Tempfail, &Source::Outside, &unknown, &none);
    assert_eq!(reply(&d), Some((451, "4.3.0")));
    let relay_unknown = Source::Unknown(StoreFailure("down".into()));
    let d = decide(
        &p,
        OnError::Tempfail,
        &relay_unknown,
        &local("mpt.gov.la"),
        &none,
    );
    assert_eq!(reply(&d), Some((451, "4.3.0")));
    let p = policy("[rules.R7]\non_store_error = \"accept\"\n");
    let d = decide(
        &p,
        OnError::Tempfail,
        &relay_unknown,
        &local("mpt.gov.la"),
        &none,
    );
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "fail_open");
}

#[test]
fn monitor_records_and_off_or_absent_does_nothing() {
    let e = Evidence::default();
    let p = policy("[rules.R7]\nmode = \"monitor\"\n");
    let d = decide(
        &p,
        OnError::Tempfail,
        &Source::Outside,
        &local("mpt.gov.la"),
        &e,
    );
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "would_reject");
    for toml in ["", "[rules.R7]\nmode = \"off\"\n"] {
        let p = policy(toml);
        let d = decide(
            &p,
            OnError::Tempfail,
            &Source::Outside,
            &local("mpt.gov.la"),
            &e,
        );
        assert_eq!(d, Decision::pass(), "{toml:?}");
    }
}
