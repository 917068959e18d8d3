//! R11 (TLS-only submission) through real Postfix, through each front-end, and R10
//! (authorised relay networks) through the milter. The private
//! Postfix offers no TLS at all; XCLIENT (`smtpd_authorized_xclient_hosts = 127.0.0.1`, swaks
//! `--xclient-addr` / `--xclient-login`) lets the test client appear from a non-exempt
//! address and as a SASL-authenticated user, as a real submission client would be.
//! `relay_domains = example.org` lets Postfix accept the outside recipient from such an
//! address, so the policy service is asked (Postfix's relay check comes first).
//!
//! Needs root and the Debian packages `postfix` and `swaks` (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::postfix::{Postfix, Wiring};
use common::smtp::{Sent, swaks, swaks_with};

const CHAMPA: &str = "champa@mpt.gov.la";
const OUTSIDE: &str = "friend@example.org";
// inet_protocols = all: Postfix takes IPv6 client addresses in XCLIENT only then (it still
// listens on 127.0.0.1 alone).
const EXTRA: &str = "smtpd_authorized_xclient_hosts = 127.0.0.1\nrelay_domains = example.org\n\
                     inet_protocols = all\n";

fn setup(wiring: impl Fn(&Mailwarden) -> Wiring) -> (Mailwarden, Postfix) {
    setup_with("", wiring)
}

fn setup_with(rules: &str, wiring: impl Fn(&Mailwarden) -> Wiring) -> (Mailwarden, Postfix) {
    let mw = Mailwarden::start(rules);
    mw.cli_ok(
        "org",
        &[
            "add",
            "mpt",
            "--name",
            "Ministry of Posts and Telecommunications",
        ],
    );
    mw.cli_ok(
        "user",
        &["add", CHAMPA, "--kind", "person", "--status", "active"],
    );
    let pf = Postfix::start_with(wiring(&mw), EXTRA);
    (mw, pf)
}

/// `from` sent from the documentation address 192.0.2.7, optionally logged in as `login`.
fn from_outside(pf: &Postfix, from: &str, login: Option<&str>) -> Sent {
    from_addr(pf, "192.0.2.7", from, login)
}

fn from_addr(pf: &Postfix, client: &str, from: &str, login: Option<&str>) -> Sent {
    let mut extra = vec!["--xclient-addr", client];
    if let Some(l) = login {
        extra.extend(["--xclient-login", l]);
    }
    swaks_with(&pf.server, from, &[OUTSIDE], &extra)
}

/// The reply to the command at which the front-end answers sender rules (MAIL for the
/// milter; RCPT for policy, with Postfix's default `smtpd_delay_reject = yes`).
fn check(pf: &Postfix, mw: &Mailwarden, command: &str, protocol: &str) {
    // A local sender from a non-exempt address without TLS.
    let sent = from_outside(pf, CHAMPA, None);
    let reply = sent.expect_reply(command);
    // (Through policy, Postfix puts "<rcpt>: Recipient address rejected:" before our text.)
    assert!(
        reply.starts_with("530 5.7.0 ") && reply.contains("Must issue a STARTTLS command first"),
        "{reply}\n{}",
        sent.transcript
    );
    assert!(!sent.queued());
    // Logged in, any sender: still refused without TLS.
    let sent = from_outside(pf, OUTSIDE, Some("champa@mpt.gov.la"));
    let reply = sent.expect_reply(command);
    assert!(
        reply.starts_with("530 5.7.0 "),
        "{reply}\n{}",
        sent.transcript
    );
    // Inbound mail from outside is not submission: taken.
    let inbound = from_outside(pf, "someone@example.net", None);
    assert!(inbound.queued(), "{}", inbound.transcript);
    // Loopback (the test client's own address) is exempt by default.
    let local = swaks(&pf.server, CHAMPA, &[OUTSIDE]);
    assert!(local.queued(), "{}", local.transcript);
    pf.wait_delivered(&local.tag);
    // IPv6 clients too (Postfix gives the milter `IPv6:2001:db8::7`, the policy service the
    // bare address): ::1 is exempt, a documentation address is not.
    let local6 = from_addr(pf, "IPv6:::1", CHAMPA, None);
    assert!(local6.queued(), "{}", local6.transcript);
    pf.wait_delivered(&local6.tag);
    let outside6 = from_addr(pf, "IPv6:2001:db8::7", CHAMPA, None);
    let reply = outside6.expect_reply(command);
    assert!(
        reply.starts_with("530 5.7.0 "),
        "{reply}\n{}",
        outside6.transcript
    );
    assert_eq!(
        mw.sample(
            "mailwarden_verdicts_total",
            &[
                ("rule", "R11"),
                ("stage", "mail"),
                ("outcome", "reject"),
                ("protocol", protocol)
            ]
        ),
        3.0
    );
}

#[test]
fn r11_submission_without_tls_is_refused_530_5_7_0_through_the_milter() {
    let (mw, pf) = setup(|mw| Wiring::Milter(mw.bound.milter.clone()));
    check(&pf, &mw, "MAIL FROM", "milter");
}

#[test]
fn r11_submission_without_tls_is_refused_530_5_7_0_through_policy() {
    let (mw, pf) = setup(|mw| Wiring::Policy(mw.bound.policy.clone()));
    check(&pf, &mw, "RCPT TO", "policy");
}

#[test]
fn r10_unauthorised_relay_is_refused_550_5_7_1() {
    // 203.0.113.0/24 stands for mpt's servers at the data centre; they have no TLS in this
    // test, so they are exempted from R11 to show R10 alone.
    let (mw, pf) = setup_with(
        "[rules.R11]\nexempt_networks = [\"127.0.0.0/8\", \"203.0.113.0/24\"]\n",
        |mw| Wiring::Milter(mw.bound.milter.clone()),
    );
    // No networks declared yet: R10 does not apply.
    let before = from_addr(&pf, "203.0.113.5", CHAMPA, None);
    assert!(before.queued(), "{}", before.transcript);
    mw.cli_ok("org", &["relays", "mpt", "--add", "203.0.113.0/24"]);

    let refused = from_addr(&pf, "198.51.100.9", CHAMPA, None);
    let reply = refused.expect_reply("MAIL FROM");
    assert!(
        reply.starts_with("550 5.7.1 ")
            && reply.contains("198.51.100.9 is not an authorised relay for mpt.gov.la"),
        "{reply}\n{}",
        refused.transcript
    );
    assert!(!refused.queued());
    // From the declared network: taken.
    let relayed = from_addr(&pf, "203.0.113.5", CHAMPA, None);
    assert!(relayed.queued(), "{}", relayed.transcript);
    pf.wait_delivered(&relayed.tag);
    assert_eq!(
        mw.sample(
            "mailwarden_verdicts_total",
            &[
                ("rule", "R10"),
                ("stage", "mail"),
                ("outcome", "reject"),
                ("protocol", "milter")
            ]
        ),
        1.0
    );
}
