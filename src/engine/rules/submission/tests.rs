use crate::config::Config;
use crate::engine::{AddressFacts, Lookup, Policy, StoreFailure, check_sender};
use crate::model::{Action, Protocol, Sender, Transaction};
use crate::store::testing::{account, org};

fn policy(toml: &str) -> Policy {
    Policy::from_config(&Config::from_toml(toml).unwrap())
}

/// A transaction from `client` with envelope sender `sender`, not authenticated, no TLS.
fn tx(client: &str, sender: &str) -> Transaction {
    let mut t = Transaction::new(Protocol::Policy);
    t.client_addr = Some(client.parse().unwrap());
    t.sender = Some(Sender::parse(sender));
    t
}

/// The directory's answer for `champa@mpt.gov.la` (a registered, active account).
fn local() -> Lookup {
    Ok(AddressFacts {
        org: Some(org("mpt")),
        account: Some(account("champa@mpt.gov.la", "mpt")),
    })
}

/// The directory's answer for an outside address.
fn outside() -> Lookup {
    Ok(AddressFacts::default())
}

fn codes(action: Action) -> Option<String> {
    match action {
        Action::Continue => None,
        Action::Reject(r) | Action::Tempfail(r) => Some(format!("{} {}", r.code, r.enhanced)),
    }
}

fn reply(p: &Policy, t: &Transaction, lookup: Option<&Lookup>) -> Option<String> {
    codes(check_sender(p, t, lookup).action)
}

#[test]
fn r11_local_sender_without_tls_is_refused_530_5_7_0() {
    let p = policy("");
    let t = tx("192.0.2.10", "champa@mpt.gov.la");
    let d = check_sender(&p, &t, Some(&local()));
    let Action::Reject(r) = &d.action else {
        panic!("expected a reject, got {d:?}")
    };
    assert_eq!((r.code, r.enhanced), (530, "5.7.0"));
    assert!(r.text.starts_with("Must issue a STARTTLS command first"));
    assert!(r.text.contains("STARTTLS"), "{}", r.text);
    assert_eq!(d.outcomes[0].rule.as_str(), "R11");
    assert_eq!(d.outcomes[0].subject, "192.0.2.10");
}

#[test]
fn r11_authenticated_client_without_tls_is_refused_whatever_the_sender() {
    let p = policy("");
    let mut t = tx("192.0.2.10", "someone@example.org");
    t.sasl_username = Some("champa@mpt.gov.la".into());
    assert_eq!(
        reply(&p, &t, Some(&outside())).as_deref(),
        Some("530 5.7.0")
    );
    t.sender = Some(Sender::Null);
    assert_eq!(reply(&p, &t, None).as_deref(), Some("530 5.7.0"));
}

#[test]
fn r11_tls_sessions_pass() {
    let p = policy("");
    let mut t = tx("192.0.2.10", "champa@mpt.gov.la");
    t.tls_version = Some("TLSv1.3".into());
    t.sasl_username = Some("champa@mpt.gov.la".into());
    assert_eq!(reply(&p, &t, Some(&local())), None);
}

#[test]
fn r11_outside_sender_without_authentication_is_not_a_submission() {
    let p = policy("");
    let t = tx("192.0.2.10", "friend@example.org");
    assert_eq!(reply(&p, &t, Some(&outside())), None);
    let bounce = {
        let mut t = tx("192.0.2.10", "<>");
        t.sender = Some(Sender::Null);
        t
    };
    assert_eq!(reply(&p, &bounce, None), None);
}

#[test]
fn r11_loopback_is_exempt_by_default_and_exemptions_are_configurable() {
    let p = policy("");
    for client in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        let t = tx(client, "champa@mpt.gov.la");
        assert_eq!(reply(&p, &t, Some(&local())), None, "{client}");
    }
    let p = policy("[rules.R11]\nexempt_networks = [\"10.1.0.0/16\"]\n");
    assert_eq!(
        reply(&p, &tx("10.1.2.3", "champa@mpt.gov.la"), Some(&local())),
        None
    );
    // The configured list replaces the default: loopback is no longer exempt.
    assert_eq!(
        reply(&p, &tx("127.0.0.1", "champa@mpt.gov.la"), Some(&local())).as_deref(),
        Some("530 5.7.0")
    );
}

#[test]
fn r11_monitor_and_off_let_the_mail_through() {
    let t = tx("192.0.2.10", "champa@mpt.gov.la");
    let p = policy("[rules.R11]\nmode = \"monitor\"\n");
    let d = check_sender(&p, &t, Some(&local()));
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "would_reject");
    let p = policy("[rules.R11]\nmode = \"off\"\n");
    let d = check_sender(&p, &t, Some(&local()));
    assert_eq!(d.action, Action::Continue);
    assert!(d.outcomes.is_empty());
}

#[test]
fn r11_store_failure_follows_on_store_error_only_when_locality_matters() {
    let down: Lookup = Err(StoreFailure("down".into()));
    let only_r11 = "[rules.R2]\nmode = \"off\"\n[rules.R9]\nmode = \"off\"\n\
                    [rules.R10]\nmode = \"off\"\n";
    let p = policy(only_r11);
    let t = tx("192.0.2.10", "champa@mpt.gov.la");
    assert_eq!(reply(&p, &t, Some(&down)).as_deref(), Some("451 4.3.0"));
    // With TLS, the directory is not needed: no tempfail.
    let mut tls = t.clone();
    tls.tls_version = Some("TLSv1.2".into());
    assert_eq!(reply(&p, &tls, Some(&down)), None);
    let p = policy(&format!(
        "{only_r11}[rules.R11]\non_store_error = \"accept\"\n"
    ));
    let d = check_sender(&p, &t, Some(&down));
    assert_eq!(d.action, Action::Continue);
    assert_eq!(d.outcomes[0].kind, "fail_open");
}

#[test]
fn r11_exempt_networks_belongs_to_r11_and_must_be_cidrs() {
    let errs = Config::from_toml("[rules.R1]\nexempt_networks = []\n").unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["rules.R1.exempt_networks"]);
    assert!(Config::from_toml("[rules.R11]\nexempt_networks = [\"300.0.0.0/8\"]\n").is_err());
}

// ---- R10 ----------------------------------------------------------------------------------

/// `champa@mpt.gov.la`'s lookup, `mpt` having declared `networks` as its relays.
fn local_with_relays(networks: &[&str]) -> Lookup {
    let mut mpt = org("mpt");
    mpt.relay_networks = networks.iter().map(|n| n.parse().unwrap()).collect();
    Ok(AddressFacts {
        org: Some(mpt),
        account: Some(account("champa@mpt.gov.la", "mpt")),
    })
}

/// Over TLS, so that R11 has nothing to say.
fn tls_tx(client: &str, sender: &str) -> Transaction {
    let mut t = tx(client, sender);
    t.tls_version = Some("TLSv1.3".into());
    t
}

#[test]
fn r10_local_sender_from_an_unauthorised_client_is_refused_550_5_7_1() {
    let p = policy("");
    let lookup = local_with_relays(&["203.0.113.0/24"]);
    let d = check_sender(
        &p,
        &tls_tx("192.0.2.10", "champa@mpt.gov.la"),
        Some(&lookup),
    );
    let Action::Reject(r) = &d.action else {
        panic!("expected a reject, got {d:?}")
    };
    assert_eq!((r.code, r.enhanced), (550, "5.7.1"));
    assert!(
        r.text.contains("<champa@mpt.gov.la>")
            && r.text
                .contains("192.0.2.10 is not an authorised relay for mpt.gov.la"),
        "{}",
        r.text
    );
    assert_eq!(d.outcomes[0].rule.as_str(), "R10");
    // R10 is judged before R11: a plain-text session from the wrong place gets R10's reply.
    let plain = tx("192.0.2.10", "champa@mpt.gov.la");
    assert_eq!(
        reply(&p, &plain, Some(&lookup)).as_deref(),
        Some("550 5.7.1")
    );
}

#[test]
fn r10_authorised_networks_trusted_networks_and_authenticated_clients_pass() {
    let lookup = local_with_relays(&["203.0.113.0/24", "2001:db8:7::/48"]);
    let p = policy("");
    for client in ["203.0.113.25", "2001:db8:7::25", "::ffff:203.0.113.25"] {
        let t = tls_tx(client, "champa@mpt.gov.la");
        assert_eq!(reply(&p, &t, Some(&lookup)), None, "{client}");
    }
    let mut authenticated = tls_tx("192.0.2.10", "champa@mpt.gov.la");
    authenticated.sasl_username = Some("champa@mpt.gov.la".into());
    assert_eq!(reply(&p, &authenticated, Some(&lookup)), None);
    let p = policy("[rules.R10]\ntrusted_networks = [\"192.0.2.0/28\"]\n");
    let t = tls_tx("192.0.2.10", "champa@mpt.gov.la");
    assert_eq!(reply(&p, &t, Some(&lookup)), None);
}

#[test]
fn r10_does_not_apply_until_the_organisation_declares_networks() {
    let p = policy("");
    let t = tls_tx("192.0.2.10", "champa@mpt.gov.la");
    assert_eq!(reply(&p, &t, Some(&local_with_relays(&[]))), None);
    // Mail from outside domains is not R10's business.
    assert_eq!(
        reply(&p, &tls_tx("192.0.2.10", "x@example.org"), Some(&outside())),
        None
    );
}

#[test]
fn r10_monitor_mode_and_store_failure() {
    let lookup = local_with_relays(&["203.0.113.0/24"]);
    let t = tls_tx("192.0.2.10", "champa@mpt.gov.la");
    let p = policy("[rules.R10]\nmode = \"monitor\"\n");
    let d = check_sender(&p, &t, Some(&lookup));
    assert_eq!(d.action, Action::Continue);
    assert_eq!(
        (d.outcomes[0].rule.as_str(), d.outcomes[0].kind),
        ("R10", "would_reject")
    );
    let down: Lookup = Err(StoreFailure("down".into()));
    let only_r10 = "[rules.R2]\nmode = \"off\"\n[rules.R9]\nmode = \"off\"\n";
    let p = policy(only_r10);
    let d = check_sender(&p, &t, Some(&down));
    assert_eq!(codes(d.action).as_deref(), Some("451 4.3.0"));
    assert_eq!(d.outcomes[0].rule.as_str(), "R10");
}

#[test]
fn r10_trusted_networks_belongs_to_r10() {
    let errs = Config::from_toml("[rules.R11]\ntrusted_networks = []\n").unwrap_err();
    assert_eq!(errs[0].key, "rules.R11.trusted_networks");
    let c = Config::from_toml("[rules.R10]\ntrusted_networks = [\"10.0.0.0/8\"]\n").unwrap();
    assert_eq!(c.relay_trusted_networks().len(), 1);
}
