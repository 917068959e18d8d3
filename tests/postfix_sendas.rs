//! R8 (send-as, Art. 20.4/20.7) through real Postfix. SASL is simulated with Postfix's
//! XCLIENT (`smtpd_authorized_xclient_hosts = 127.0.0.1`, swaks `--xclient-login`), as a
//! submission server with real SASL would set `sasl_username` / `{auth_authen}`. The client
//! is the loopback address, which R11 exempts from TLS by default.
//!
//! The directory: champa and bounmy (people), cabinet (a unit mailbox) delegated to champa
//! with `mailwarden user delegate` (the CLI, against the running daemon).
//!
//! Needs root and the Debian packages `postfix` and `swaks` (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::postfix::{Postfix, Wiring};
use common::smtp::{Sent, swaks_with};

const CHAMPA: &str = "champa@mpt.gov.la";
const BOUNMY: &str = "bounmy@mpt.gov.la";
const CABINET: &str = "cabinet@mpt.gov.la";
const OUTSIDE: &str = "friend@example.org";
const EXTRA: &str = "smtpd_authorized_xclient_hosts = 127.0.0.1\nrelay_domains = example.org\n";

fn setup(wiring: impl Fn(&Mailwarden) -> Wiring) -> (Mailwarden, Postfix) {
    setup_server("", wiring)
}

/// [`setup`] with extra `[server]` keys.
fn setup_server(server: &str, wiring: impl Fn(&Mailwarden) -> Wiring) -> (Mailwarden, Postfix) {
    let mw = Mailwarden::start_server(server, "", &[]);
    mw.cli_ok(
        "org",
        &[
            "add",
            "mpt",
            "--name",
            "Ministry of Posts and Telecommunications",
        ],
    );
    for (address, kind) in [(CHAMPA, "person"), (BOUNMY, "person"), (CABINET, "unit")] {
        mw.cli_ok(
            "user",
            &["add", address, "--kind", kind, "--status", "active"],
        );
    }
    mw.cli_ok("user", &["delegate", CABINET, "--to", CHAMPA]);
    let pf = Postfix::start_with(wiring(&mw), EXTRA);
    (mw, pf)
}

/// A message with envelope sender `from` (and, unless `extra` says otherwise, `From: from`),
/// logged in as `login`.
fn send_as(pf: &Postfix, login: &str, from: &str, extra: &[&str]) -> Sent {
    let mut args = vec!["--xclient-login", login];
    args.extend_from_slice(extra);
    swaks_with(&pf.server, from, &[OUTSIDE], &args)
}

fn r8(mw: &Mailwarden, stage: &str, protocol: &str) -> f64 {
    mw.sample(
        "mailwarden_verdicts_total",
        &[
            ("rule", "R8"),
            ("stage", stage),
            ("outcome", "reject"),
            ("protocol", protocol),
        ],
    )
}

/// CHAMPA, logged in, sends her own envelope with someone else's `From:`: refused after
/// DATA (the headers are the milter's to judge, whatever answers the envelope).
#[track_caller]
fn forged_from_refused(pf: &Postfix) -> Sent {
    let forged_from = send_as(
        pf,
        CHAMPA,
        CHAMPA,
        &["--header", "From: The Boss <bounmy@mpt.gov.la>"],
    );
    refused_553(
        &forged_from,
        ".",
        "From: address <bounmy@mpt.gov.la> is not yours",
    );
    forged_from
}

#[track_caller]
fn refused_553(sent: &Sent, command: &str, naming: &str) {
    let reply = sent.expect_reply(command);
    assert!(
        reply.starts_with("553 5.7.1 ") && reply.contains(naming),
        "{reply}\n{}",
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);
}

/// Own address and delegated mailbox delivered; another person's address refused at MAIL
/// (the milter answers MAIL itself); someone else's From:, or two From: fields, refused at
/// the end of DATA.
#[test]
fn send_as_through_the_milter() {
    let (mw, pf) = setup(|mw| Wiring::Milter(mw.bound.milter.clone()));

    let own = send_as(&pf, CHAMPA, CHAMPA, &[]);
    assert!(own.queued(), "{}", own.transcript);
    let delegated = send_as(
        &pf,
        CHAMPA,
        CABINET,
        &["--header", "Sender: champa@mpt.gov.la"],
    );
    assert!(delegated.queued(), "{}", delegated.transcript);

    let other = send_as(&pf, CHAMPA, BOUNMY, &[]);
    refused_553(&other, "MAIL FROM", "<bounmy@mpt.gov.la> is not yours");
    // A delegation is to one person: bounmy may not send as cabinet.
    let not_delegated = send_as(&pf, BOUNMY, CABINET, &[]);
    refused_553(
        &not_delegated,
        "MAIL FROM",
        "<cabinet@mpt.gov.la> is not yours",
    );

    let forged_from = forged_from_refused(&pf);
    let two_froms = send_as(
        &pf,
        CHAMPA,
        CHAMPA,
        &["--add-header", "From: champa@mpt.gov.la"],
    );
    refused_553(&two_froms, ".", "The message has 2 From: header fields");

    // What was accepted arrives; the delegated message with its own From: and Sender:.
    pf.wait_delivered(&own.tag);
    let msg = Postfix::message_of(&pf.wait_delivered(&delegated.tag));
    let text = String::from_utf8_lossy(&msg);
    assert!(text.contains("From: cabinet@mpt.gov.la"), "{text}");
    assert_eq!(r8(&mw, "mail", "milter"), 2.0);
    assert_eq!(r8(&mw, "eom", "milter"), 2.0);
    // Refused messages never reached the sink.
    let delivered = pf.deliveries();
    assert_eq!(delivered.len(), 2);
    for refused in [&other, &not_delegated, &forged_from, &two_froms] {
        assert!(
            !delivered.iter().any(|d| d.text.contains(&refused.tag)),
            "{}",
            refused.transcript
        );
    }
}

/// The same envelope verdicts through the policy service (answered at RCPT, Postfix's
/// `smtpd_delay_reject`); headers are the milter's business.
#[test]
fn send_as_through_policy() {
    let (mw, pf) = setup(|mw| Wiring::Policy(mw.bound.policy.clone()));

    let own = send_as(&pf, CHAMPA, CHAMPA, &[]);
    assert!(own.queued(), "{}", own.transcript);
    let delegated = send_as(&pf, CHAMPA, CABINET, &[]);
    assert!(delegated.queued(), "{}", delegated.transcript);
    let other = send_as(&pf, CHAMPA, BOUNMY, &[]);
    refused_553(&other, "RCPT TO", "<bounmy@mpt.gov.la> is not yours");

    pf.wait_delivered(&own.tag);
    pf.wait_delivered(&delegated.tag);
    assert_eq!(r8(&mw, "mail", "policy"), 1.0);

    // Ending the delegation takes effect for the next message.
    mw.cli_ok("user", &["undelegate", CABINET, "--from", CHAMPA]);
    let after = send_as(&pf, CHAMPA, CABINET, &[]);
    refused_553(&after, "RCPT TO", "<cabinet@mpt.gov.la> is not yours");
    assert_eq!(r8(&mw, "mail", "policy"), 2.0);
}

/// Both wired, the envelope left to the policy service (`server.milter_envelope =
/// "policy"`, deploy/postfix/main.cf.both): MAIL and RCPT verdicts come from the policy
/// service at RCPT, the milter answers nothing there (it asked Postfix for no reply) and
/// still judges the headers at the end of DATA. Nothing is judged twice.
#[test]
fn send_as_with_both_wired_and_the_envelope_left_to_the_policy_service() {
    let (mw, pf) = setup_server("milter_envelope = \"policy\"", |mw| {
        Wiring::BothByPolicy(mw.bound.policy.clone(), mw.bound.milter.clone())
    });
    mw.cli_ok(
        "user",
        &[
            "add",
            "khamla@mpt.gov.la",
            "--kind",
            "person",
            "--status",
            "active",
        ],
    );
    mw.cli_ok(
        "user",
        &["suspend", "khamla@mpt.gov.la", "--reason", "leave"],
    );

    let own = send_as(&pf, CHAMPA, CHAMPA, &[]);
    assert!(own.queued(), "{}", own.transcript);
    let other = send_as(&pf, CHAMPA, BOUNMY, &[]);
    refused_553(&other, "RCPT TO", "<bounmy@mpt.gov.la> is not yours");
    let to_suspended = swaks_with(
        &pf.server,
        CHAMPA,
        &["khamla@mpt.gov.la", OUTSIDE],
        &["--xclient-login", CHAMPA],
    );
    let reply = to_suspended.expect_reply("RCPT TO:<khamla@mpt.gov.la>");
    assert!(
        reply.starts_with("550 5.2.1"),
        "{reply}\n{}",
        to_suspended.transcript
    );
    assert!(to_suspended.queued(), "{}", to_suspended.transcript);
    forged_from_refused(&pf);

    pf.wait_delivered(&own.tag);
    assert_eq!(pf.wait_delivered(&to_suspended.tag).rcpts, [OUTSIDE]);
    assert_eq!(r8(&mw, "mail", "policy"), 1.0);
    assert_eq!(r8(&mw, "mail", "milter"), 0.0);
    assert_eq!(r8(&mw, "eom", "milter"), 1.0);
    // The milter judged no MAIL and no RCPT: every envelope verdict is the policy service's.
    let metrics = mw.metrics();
    for stage in ["mail", "rcpt"] {
        assert!(
            !metrics.contains(&format!(
                "stage=\"{stage}\",action=\"continue\",protocol=\"milter\""
            )),
            "{stage}: {metrics}"
        );
    }
    assert!(
        metrics.contains(r#"stage="rcpt",action="continue",protocol="policy""#),
        "{metrics}"
    );
}
