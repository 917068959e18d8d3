//! R15 (compromise response) and R20 (last use) through real Postfix, through each
//! front-end. XCLIENT (`smtpd_authorized_xclient_hosts = 127.0.0.1`, swaks `--xclient-login`)
//! makes the test client a SASL-authenticated submission client; it stays on loopback, which
//! R11 exempts from TLS (the private Postfix offers none).
//!
//! With `[rules.R15] burst_floor = 3`, a new account (baseline 0) sends three messages;
//! the fourth trips the burst detector: its recipient gets `450 4.7.1` and the account is
//! locked (audited, counted). The next message is refused `450 4.7.1` at MAIL through the
//! milter (at RCPT through policy, where Postfix asks). `mailwarden user show` gives the
//! lock and its figures; the owner alert (R16) `account_locked` reaches a signed webhook;
//! `mailwarden user unlock` releases it and mail flows again.
//!
//! Needs root and the Debian packages `postfix` and `swaks` (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::postfix::{Postfix, Wiring};
use common::process::wait_for;
use common::smtp::{Sent, swaks_with};
use common::webhook::Receiver;
use std::time::Duration;

const CHAMPA: &str = "champa@mpt.gov.la";
const OUTSIDE: &str = "friend@example.org";
const SECRET: &str = "e2e-lock-alert-secret-0123";
const EXTRA: &str = "smtpd_authorized_xclient_hosts = 127.0.0.1\nrelay_domains = example.org\n";

/// One message from champa, logged in as champa.
fn submit(pf: &Postfix) -> Sent {
    swaks_with(
        &pf.server,
        CHAMPA,
        &[OUTSIDE],
        &["--xclient-addr", "127.0.0.1", "--xclient-login", CHAMPA],
    )
}

fn burst_locks_and_the_cli_releases(milter: bool) {
    let (count_on, protocol) = if milter {
        ("milter", "milter")
    } else {
        ("policy", "policy")
    };
    // The owner alert (R16) of the lock goes to this webhook receiver.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut receiver = rt.block_on(Receiver::start(0));
    let mw = Mailwarden::start(&format!(
        "[rules.R14]\ncount_on = \"{count_on}\"\n[rules.R15]\nburst_floor = 3\n\
         [activity]\nwrite_interval = \"1s\"\n\
         [alerts]\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n",
        receiver.url
    ));
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
    let wiring = if milter {
        Wiring::Milter(mw.bound.milter.clone())
    } else {
        Wiring::Policy(mw.bound.policy.clone())
    };
    let pf = Postfix::start_with(wiring, EXTRA);

    for _ in 0..3 {
        let sent = submit(&pf);
        assert!(sent.queued(), "{}", sent.transcript);
        pf.wait_delivered(&sent.tag);
    }
    // The fourth message in the hour: more than the floor over a zero baseline.
    let sent = submit(&pf);
    let reply = sent.expect_reply(&format!("RCPT TO:<{OUTSIDE}>"));
    assert!(
        reply.starts_with("450 4.7.1") && reply.contains("locked"),
        "via {protocol}: {reply:?}\n{}",
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);
    // Locked: refused from the first command that carries the sender's verdict.
    let sent = submit(&pf);
    let command = if milter { "MAIL FROM" } else { "RCPT TO" };
    let reply = sent.expect_reply(command);
    assert!(
        reply.starts_with("450 4.7.1"),
        "via {protocol}: {reply:?}\n{}",
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);

    // R16: the owner is told, through the signed webhook.
    let got = rt.block_on(receiver.next());
    got.assert_signed_with(SECRET.as_bytes());
    let alert = got.json();
    assert_eq!(alert["kind"], "account_locked", "{alert}");
    assert_eq!(alert["account"], CHAMPA);
    assert!(
        alert["reason"]
            .as_str()
            .is_some_and(|r| r.contains("sending burst")),
        "{alert}"
    );

    let show = mw.cli_ok("user", &["show", CHAMPA]);
    assert!(
        show.contains("LOCKED since") && show.contains("sending burst: 4 messages in one hour"),
        "{show}"
    );
    // R20: the SASL logins were recorded (written in the background, at most every 1s).
    let used = show
        .lines()
        .find(|l| l.starts_with("last_use "))
        .expect("show has last_use");
    assert!(used.trim_end().ends_with('Z'), "a time, not never: {show}");
    let audit = wait_for("the lock's audit record", Duration::from_secs(10), || {
        let log = mw.audit_log();
        log.lines()
            .find(|l| l.contains("\"user.lock\""))
            .map(str::to_owned)
    });
    let record: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(record["actor"], "mailwarden");
    assert_eq!(record["object"], CHAMPA);
    assert_eq!(record["after"]["send_lock"]["cause"], "burst");
    assert_eq!(record["after"]["send_lock"]["messages"], 4);
    assert_eq!(
        mw.sample("mailwarden_account_locks_total", &[("cause", "burst")]),
        1.0
    );
    assert!(
        mw.sample(
            "mailwarden_verdicts_total",
            &[
                ("rule", "R15"),
                // The milter reads the lock at MAIL; policy's RCPT count reads it itself.
                ("stage", if milter { "mail" } else { "rcpt" }),
                ("outcome", "tempfail"),
                ("protocol", protocol)
            ]
        ) >= 1.0
    );

    // Released by the CLI (audited), and mail flows again.
    let out = mw.cli_ok(
        "user",
        &["unlock", CHAMPA, "--reason", "owner reached by phone"],
    );
    let state = out
        .lines()
        .find(|l| l.starts_with("send_lock "))
        .expect("unlock shows the lock state");
    assert!(state.trim_end().ends_with(" no"), "{out}");
    let sent = submit(&pf);
    assert!(sent.queued(), "after unlock: {}", sent.transcript);
    pf.wait_delivered(&sent.tag);
    let audit = mw.audit_log();
    let unlock = audit
        .lines()
        .find(|l| l.contains("\"user.unlock\""))
        .expect("unlock audited");
    assert!(unlock.contains("owner reached by phone"), "{unlock}");
}

#[test]
fn policy_r15_burst_locks_450_4_7_1_and_unlock_releases() {
    burst_locks_and_the_cli_releases(false);
}

#[test]
fn milter_r15_burst_locks_450_4_7_1_and_unlock_releases() {
    burst_locks_and_the_cli_releases(true);
}
