//! End to end through real Postfix: each test runs its own mailwarden process and its own
//! private Postfix instance (own config, queue and ports) relaying to smtp-sink. mailwarden is
//! wired in with the operator snippets from `deploy/postfix/`, read from disk, so these tests
//! prove the exact lines an operator pastes.
//!
//! Every rule is checked through both wirings: the policy service (sender rules answer at
//! RCPT, as Postfix asks the policy service there) and the milter (sender rules answer MAIL).
//!
//! Needs root and the Debian packages `postfix` and `swaks` (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::postfix::{Postfix, Wiring};
use common::smtp::{END_MARKER, Session, swaks};

/// The two ways to wire mailwarden into Postfix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Policy,
    Milter,
    /// deploy/postfix/main.cf.both, mailwarden with `server.milter_envelope = "policy"`.
    Both,
    /// main.cf.policy and main.cf.milter together: both front-ends judge the envelope (the
    /// default `milter_envelope = "check"`), and the policy service the end of DATA too.
    BothCheck,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Policy => "policy",
            Path::Milter => "milter",
            Path::Both => "both",
            Path::BothCheck => "both, check",
        }
    }
}

/// Active sender and recipient.
const CHAMPA: &str = "champa@mpt.gov.la";
/// Another active account.
const SOMSAK: &str = "somsak@mpt.gov.la";
/// Suspended (R1).
const CABINET: &str = "cabinet@mpt.gov.la";
/// Withdrawn (R2).
const KHAMLA: &str = "khamla@mpt.gov.la";
/// Active account of an organisation that has ceased (R2).
const MOF_CABINET: &str = "cabinet@mof.gov.la";
/// In a local domain, never registered (R9).
const GHOST: &str = "ghost@mpt.gov.la";
/// Not a local domain: mailwarden has nothing to say about it.
const OUTSIDE: &str = "friend@example.org";

/// mailwarden with `rules` and the test directory, and Postfix wired to it along `path`.
fn setup(path: Path, rules: &str) -> (Mailwarden, Postfix) {
    setup_with(path, rules, "")
}

/// [`setup`] with `extra` main.cf lines.
fn setup_with(path: Path, rules: &str, extra: &str) -> (Mailwarden, Postfix) {
    let mw = match path {
        Path::Both => Mailwarden::start_server("milter_envelope = \"policy\"", rules, &[]),
        Path::Policy | Path::Milter | Path::BothCheck => Mailwarden::start(rules),
    };
    populate(&mw);
    let wiring = match path {
        Path::Policy => Wiring::Policy(mw.bound.policy.clone()),
        Path::Milter => Wiring::Milter(mw.bound.milter.clone()),
        Path::Both => Wiring::BothByPolicy(mw.bound.policy.clone(), mw.bound.milter.clone()),
        Path::BothCheck => Wiring::Both(mw.bound.policy.clone(), mw.bound.milter.clone()),
    };
    (mw, Postfix::start_with(wiring, extra))
}

/// The directory, built through the admin CLI as an operator would.
fn populate(mw: &Mailwarden) {
    mw.cli_ok(
        "org",
        &[
            "add",
            "mpt",
            "--name",
            "Ministry of Posts and Telecommunications",
        ],
    );
    mw.cli_ok("org", &["add", "mof", "--name", "Ministry of Finance"]);
    for (addr, kind) in [
        (CHAMPA, "person"),
        (SOMSAK, "person"),
        (CABINET, "unit"),
        (KHAMLA, "person"),
        (MOF_CABINET, "unit"),
    ] {
        mw.cli_ok("user", &["add", addr, "--kind", kind, "--status", "active"]);
    }
    mw.cli_ok("user", &["suspend", CABINET, "--reason", "on leave"]);
    mw.cli_ok(
        "user",
        &["withdraw", KHAMLA, "--reason", "left the ministry", "--yes"],
    );
    mw.cli_ok(
        "org",
        &["cease", "mof", "--reason", "merged into mpt", "--yes"],
    );
}

/// A recipient refused at RCPT with `expected` while a second, active recipient of the same
/// message is delivered: the refused one never reaches the sink.
fn refused_recipient(path: Path, rcpt: &str, expected: &str) {
    refused_recipient_with(path, rcpt, expected, "")
}

/// [`refused_recipient`] with `extra` main.cf lines.
fn refused_recipient_with(path: Path, rcpt: &str, expected: &str, extra: &str) {
    let (_mw, pf) = setup_with(path, "", extra);
    let sent = swaks(&pf.server, CHAMPA, &[rcpt, OUTSIDE]);
    let reply = sent.expect_reply(&format!("RCPT TO:<{rcpt}>"));
    assert!(
        reply.starts_with(expected),
        "RCPT {rcpt} via {}: expected {expected}, got {reply:?}\n{}",
        path.label(),
        sent.transcript
    );
    assert!(
        sent.expect_reply(&format!("RCPT TO:<{OUTSIDE}>"))
            .starts_with("250"),
        "{}",
        sent.transcript
    );
    assert!(sent.queued(), "{}", sent.transcript);
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(
        d.rcpts,
        [OUTSIDE],
        "only the accepted recipient is delivered"
    );
}

/// An active local recipient is accepted and delivered.
fn active_recipient_delivered(path: Path) {
    let (_mw, pf) = setup(path, "");
    let sent = swaks(&pf.server, CHAMPA, &[SOMSAK]);
    assert_eq!(sent.status, Some(0), "{}", sent.transcript);
    assert!(sent.queued(), "{}", sent.transcript);
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(d.mail_from, CHAMPA);
    assert_eq!(d.rcpts, [SOMSAK]);
    assert!(d.text.contains(END_MARKER));
}

/// An unregistered sender in a local domain may not send (R9): 553 5.7.1, at RCPT through
/// the policy service, at MAIL through the milter; nothing is delivered.
fn unregistered_sender_refused(path: Path) {
    let (_mw, pf) = setup(path, "");
    let sent = swaks(&pf.server, GHOST, &[OUTSIDE]);
    let mail = sent.expect_reply("MAIL FROM");
    let rcpt = sent.reply("RCPT TO");
    let refusal = match path {
        Path::Milter => mail.clone(),
        Path::Policy | Path::Both | Path::BothCheck => {
            assert!(mail.starts_with("250"), "{}", sent.transcript);
            rcpt.clone().expect("RCPT sent after MAIL was accepted")
        }
    };
    assert!(
        refusal.starts_with("553 5.7.1"),
        "unregistered sender via {}: {refusal:?}\n{}",
        path.label(),
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);
    // swaks: 23 = MAIL refused, 24 = no recipient accepted.
    let expected_exit = match path {
        Path::Milter => 23,
        Path::Policy | Path::Both | Path::BothCheck => 24,
    };
    assert_eq!(sent.status, Some(expected_exit), "{}", sent.transcript);
    // A registered sender right after goes through: the refusal was about GHOST only.
    let ok = swaks(&pf.server, CHAMPA, &[OUTSIDE]);
    assert!(ok.queued(), "{}", ok.transcript);
    pf.wait_delivered(&ok.tag);
    assert!(
        pf.deliveries().iter().all(|d| d.mail_from != GHOST),
        "nothing from {GHOST} reached the sink"
    );
}

/// With R1 in monitor mode the suspended recipient gets its mail, and /metrics counts what
/// R1 would have done, labelled with the protocol that carried it.
fn monitor_mode_counts_and_delivers(path: Path) {
    let (mw, pf) = setup(path, "[rules.R1]\nmode = \"monitor\"\n");
    let labels = [
        ("rule", "R1"),
        ("stage", "rcpt"),
        ("outcome", "would_reject"),
        ("protocol", path.label()),
    ];
    assert_eq!(mw.sample("mailwarden_verdicts_total", &labels), 0.0);
    let sent = swaks(&pf.server, CHAMPA, &[CABINET]);
    assert!(
        sent.expect_reply(&format!("RCPT TO:<{CABINET}>"))
            .starts_with("250"),
        "{}",
        sent.transcript
    );
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(d.rcpts, [CABINET]);
    assert_eq!(
        mw.sample("mailwarden_verdicts_total", &labels),
        1.0,
        "{}",
        mw.metrics()
    );
    // Monitor mode did not refuse anything.
    let enforced = [
        ("rule", "R1"),
        ("stage", "rcpt"),
        ("outcome", "reject"),
        ("protocol", path.label()),
    ];
    assert_eq!(mw.sample("mailwarden_verdicts_total", &enforced), 0.0);
}

/// SIGHUP with R1 switched from monitor to enforce applies to the next RCPT of an SMTP
/// session that stays open across the reload (and with it Postfix's connection to
/// mailwarden: a lost milter connection would tempfail the rest of the session).
fn reload_applies_without_dropping_the_session(path: Path) {
    let (mw, pf) = setup(path, "[rules.R1]\nmode = \"monitor\"\n");
    let mut s = Session::open(&pf.server);
    let r = s.command(&format!("MAIL FROM:<{CHAMPA}>"));
    assert!(r.starts_with("250"), "{}", s.transcript);
    let r = s.command(&format!("RCPT TO:<{CABINET}>"));
    assert!(
        r.starts_with("250"),
        "monitor mode accepts: {}",
        s.transcript
    );

    mw.reload("[rules.R1]\nmode = \"enforce\"\n");

    let r = s.command(&format!("RCPT TO:<{CABINET}>"));
    assert!(
        r.starts_with("550 5.2.1"),
        "enforced after reload via {}: {}",
        path.label(),
        s.transcript
    );
    let r = s.command(&format!("RCPT TO:<{OUTSIDE}>"));
    assert!(r.starts_with("250"), "{}", s.transcript);
    let r = s.command("DATA");
    assert!(r.starts_with("354"), "{}", s.transcript);
    let tag = common::smtp::unique_tag();
    let r = s.command(&format!(
        "From: <{CHAMPA}>\r\nSubject: reload\r\nX-E2E-Tag: {tag}\r\n\r\n{END_MARKER}\r\n."
    ));
    assert!(r.starts_with("250"), "{}", s.transcript);
    let r = s.command("QUIT");
    assert!(r.starts_with("221"), "{}", s.transcript);
    let mut rcpts = pf.wait_delivered(&tag).rcpts;
    rcpts.sort();
    // CABINET was accepted before the reload (monitor), OUTSIDE after it.
    assert_eq!(rcpts, [CABINET, OUTSIDE]);
    assert!(
        !pf.maillog().contains("warning: milter")
            && !pf.maillog().contains("problem talking to server"),
        "Postfix lost its connection to mailwarden:\n{}",
        pf.maillog()
    );
}

#[test]
fn bare_postfix_delivers_to_the_sink() {
    // The harness itself: Postfix without mailwarden takes a message and the sink receives
    // it with the envelope intact.
    let pf = Postfix::start(Wiring::Bare);
    let sent = swaks(&pf.server, CHAMPA, &[MOF_CABINET]);
    assert!(sent.queued(), "not queued:\n{}", sent.transcript);
    assert_eq!(sent.status, Some(0), "{}", sent.transcript);
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(d.mail_from, CHAMPA);
    assert_eq!(d.rcpts, [MOF_CABINET]);
}

#[test]
fn policy_r1_suspended_recipient_refused() {
    refused_recipient(Path::Policy, CABINET, "550 5.2.1");
}

#[test]
fn milter_r1_suspended_recipient_refused() {
    refused_recipient(Path::Milter, CABINET, "550 5.2.1");
}

/// `"cabinet"@mpt.gov.la` is the same mailbox as `cabinet@mpt.gov.la` (RFC 5321: quoting a
/// local part that needs none changes nothing; Postfix delivers both to one mailbox): the
/// quotes must not get mail past R1.
const QUOTED_CABINET: &str = "\"cabinet\"@mpt.gov.la";

#[test]
fn policy_r1_quoted_local_part_is_the_same_suspended_mailbox() {
    refused_recipient(Path::Policy, QUOTED_CABINET, "550 5.2.1");
}

#[test]
fn milter_r1_quoted_local_part_is_the_same_suspended_mailbox() {
    refused_recipient(Path::Milter, QUOTED_CABINET, "550 5.2.1");
}

/// An address extension (`recipient_delimiter = +`, as Debian's main.cf sets it) delivers
/// to the same mailbox: it must not get mail past R1 either.
const EXTENDED_CABINET: &str = "cabinet+news@mpt.gov.la";

#[test]
fn policy_r1_address_extension_is_the_same_suspended_mailbox() {
    refused_recipient(Path::Policy, EXTENDED_CABINET, "550 5.2.1");
}

#[test]
fn milter_r1_address_extension_is_the_same_suspended_mailbox() {
    refused_recipient(Path::Milter, EXTENDED_CABINET, "550 5.2.1");
}

/// A source route (RFC 5321 4.1.2, obsolete: Postfix ignores it and delivers to the
/// address after the colon) must not get mail past R1 either.
const ROUTED_CABINET: &str = "@mx.example.org:cabinet@mpt.gov.la";

#[test]
fn policy_r1_source_route_is_the_same_suspended_mailbox() {
    refused_recipient(Path::Policy, ROUTED_CABINET, "550 5.2.1");
}

#[test]
fn milter_r1_source_route_is_the_same_suspended_mailbox() {
    refused_recipient(Path::Milter, ROUTED_CABINET, "550 5.2.1");
}

/// Postfix's `allow_percent_hack` and `swap_bangpath` (both on by default) deliver
/// `cabinet%mpt.gov.la@localhost` and `mpt.gov.la!cabinet@localhost` to cabinet when
/// `localhost` is one of its own destinations (as in most main.cf files): no way past R1.
const LOCAL_DESTINATION: &str = "mydestination = localhost\n";

#[test]
fn policy_r1_percent_hack_is_the_same_suspended_mailbox() {
    for rcpt in [
        "cabinet%mpt.gov.la@localhost",
        "mpt.gov.la!cabinet@localhost",
    ] {
        refused_recipient_with(Path::Policy, rcpt, "550 5.2.1", LOCAL_DESTINATION);
    }
}

#[test]
fn milter_r1_percent_hack_is_the_same_suspended_mailbox() {
    for rcpt in [
        "cabinet%mpt.gov.la@localhost",
        "mpt.gov.la!cabinet@localhost",
    ] {
        refused_recipient_with(Path::Milter, rcpt, "550 5.2.1", LOCAL_DESTINATION);
    }
}

#[test]
fn policy_r2_withdrawn_recipient_refused() {
    refused_recipient(Path::Policy, KHAMLA, "550 5.1.1");
}

#[test]
fn milter_r2_withdrawn_recipient_refused() {
    refused_recipient(Path::Milter, KHAMLA, "550 5.1.1");
}

#[test]
fn policy_r2_ceased_organisation_recipient_refused() {
    refused_recipient(Path::Policy, MOF_CABINET, "550 5.1.1");
}

#[test]
fn milter_r2_ceased_organisation_recipient_refused() {
    refused_recipient(Path::Milter, MOF_CABINET, "550 5.1.1");
}

#[test]
fn policy_active_recipient_delivered() {
    active_recipient_delivered(Path::Policy);
}

#[test]
fn milter_active_recipient_delivered() {
    active_recipient_delivered(Path::Milter);
}

#[test]
fn policy_r9_unregistered_sender_refused() {
    unregistered_sender_refused(Path::Policy);
}

#[test]
fn milter_r9_unregistered_sender_refused() {
    unregistered_sender_refused(Path::Milter);
}

#[test]
fn policy_monitor_mode_delivers_and_counts() {
    monitor_mode_counts_and_delivers(Path::Policy);
}

#[test]
fn milter_monitor_mode_delivers_and_counts() {
    monitor_mode_counts_and_delivers(Path::Milter);
}

#[test]
fn policy_reload_applies_to_an_open_session() {
    reload_applies_without_dropping_the_session(Path::Policy);
}

#[test]
fn milter_reload_applies_to_an_open_session() {
    reload_applies_without_dropping_the_session(Path::Milter);
}

/// mailwarden down: the policy snippet's default action tempfails the recipient (the client
/// retries later); nothing is accepted unchecked.
#[test]
fn policy_mailwarden_stopped_tempfails() {
    let (mut mw, pf) = setup(Path::Policy, "");
    let before = swaks(&pf.server, CHAMPA, &[CHAMPA]);
    assert!(before.queued(), "{}", before.transcript);
    pf.wait_delivered(&before.tag);

    mw.stop();
    let sent = swaks(&pf.server, CHAMPA, &[CHAMPA]);
    let reply = sent.expect_reply(&format!("RCPT TO:<{CHAMPA}>"));
    assert!(
        reply.starts_with("451 4.3.0"),
        "policy service down: {reply:?}\n{}",
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);
    assert_eq!(
        sent.status,
        Some(24),
        "no recipient accepted:\n{}",
        sent.transcript
    );
    assert_eq!(
        pf.deliveries().len(),
        1,
        "only the message sent while it ran"
    );
}

/// mailwarden down: milter_default_action = tempfail refuses the transaction temporarily.
#[test]
fn milter_mailwarden_stopped_tempfails() {
    let (mut mw, pf) = setup(Path::Milter, "");
    let before = swaks(&pf.server, CHAMPA, &[CHAMPA]);
    assert!(before.queued(), "{}", before.transcript);
    pf.wait_delivered(&before.tag);

    mw.stop();
    let sent = swaks(&pf.server, CHAMPA, &[CHAMPA]);
    let mail = sent.expect_reply("MAIL FROM");
    assert!(
        mail.starts_with("451 4.7.1"),
        "milter down: {mail:?}\n{}",
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);
    assert_eq!(sent.status, Some(23), "MAIL refused:\n{}", sent.transcript);
    assert_eq!(
        pf.deliveries().len(),
        1,
        "only the message sent while it ran"
    );
}

/// R14 through Postfix: with 2 recipients per message and 1 message per hour, the third
/// recipient of a message gets `452 4.5.3` (the first two are delivered), and the next
/// message `450 4.7.1`. The counters (`mailwarden user limits`) say 1 message, 2
/// recipients: the refused ones are not counted, and a message is counted once. With the
/// default `count_on = "auto"` and both listeners configured, however Postfix is wired: the
/// milter counts what the policy service was not asked about.
fn sending_limits(path: Path) {
    let (mw, pf) = setup(
        path,
        "[rules.R14]\nrecipients_per_message = 2\nmessages_per_hour = 1\n",
    );
    let to = ["a@example.org", "b@example.org", "c@example.org"];
    let sent = swaks(&pf.server, CHAMPA, &to);
    for ok in &to[..2] {
        let reply = sent.expect_reply(&format!("RCPT TO:<{ok}>"));
        assert!(reply.starts_with("250"), "{}", sent.transcript);
    }
    let reply = sent.expect_reply("RCPT TO:<c@example.org>");
    assert!(
        reply.starts_with("452 4.5.3") && reply.contains("at most 2 per message"),
        "via {}: {reply:?}\n{}",
        path.label(),
        sent.transcript
    );
    assert!(sent.queued(), "{}", sent.transcript);
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(d.rcpts, to[..2]);

    let sent = swaks(&pf.server, CHAMPA, &["d@example.org"]);
    let reply = sent.expect_reply("RCPT TO:<d@example.org>");
    assert!(
        reply.starts_with("450 4.7.1")
            && reply.contains("1 messages per hour")
            && reply.contains("try again after"),
        "via {}: {reply:?}\n{}",
        path.label(),
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);

    let shown = mw.cli_ok("user", &["limits", CHAMPA, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let counts: Vec<u64> = v["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [1, 1, 2, 2], "{shown}");
}

#[test]
fn policy_r14_sending_limits() {
    sending_limits(Path::Policy);
}

#[test]
fn milter_r14_sending_limits() {
    sending_limits(Path::Milter);
}

/// Postfix wired to both the policy service and the milter, each judging the envelope:
/// every RCPT reaches mailwarden twice, policy service first. With the default `count_on =
/// "auto"` the policy service counts it and the milter, told so, does not: one message of
/// two recipients is counted once, with two recipients.
#[test]
fn both_wirings_count_a_message_once() {
    let mw = Mailwarden::start("[rules.R14]\nmessages_per_hour = 1\n");
    populate(&mw);
    let pf = Postfix::start(Wiring::Both(
        mw.bound.policy.clone(),
        mw.bound.milter.clone(),
    ));
    let sent = swaks(&pf.server, CHAMPA, &["a@example.org", "b@example.org"]);
    assert!(sent.queued(), "{}", sent.transcript);
    pf.wait_delivered(&sent.tag);
    let shown = mw.cli_ok("user", &["limits", CHAMPA, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let counts: Vec<u64> = v["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [1, 1, 2, 2], "{shown}");
    let sent = swaks(&pf.server, CHAMPA, &["c@example.org"]);
    assert!(
        sent.expect_reply("RCPT TO:<c@example.org>")
            .starts_with("450 4.7.1"),
        "{}",
        sent.transcript
    );
}

/// `POST path` with a JSON body to the daemon's admin API (the mailbox server's usage report).
fn admin_post(mw: &Mailwarden, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let host = mw.admin_url().trim_start_matches("http://").to_owned();
    let mut s = std::net::TcpStream::connect(&host).expect("connect to the admin API");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        common::daemon::TOKEN,
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// R13 through Postfix: a recipient whose reported usage reaches its quota gets `452 4.2.2`
/// (the other recipient of the message is delivered), through both wirings.
fn quota(path: Path) {
    let (mw, pf) = setup(path, "");
    mw.cli_ok("user", &["quota", SOMSAK, "1000"]);
    let answer = admin_post(
        &mw,
        &format!("/v1/users/{SOMSAK}/usage"),
        r#"{"bytes":1000}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let sent = swaks(&pf.server, OUTSIDE, &[SOMSAK, CHAMPA]);
    let reply = sent.expect_reply(&format!("RCPT TO:<{SOMSAK}>"));
    assert!(
        reply.starts_with("452 4.2.2") && reply.contains("over its storage quota"),
        "via {}: {reply:?}\n{}",
        path.label(),
        sent.transcript
    );
    assert!(sent.queued(), "{}", sent.transcript);
    assert_eq!(pf.wait_delivered(&sent.tag).rcpts, [CHAMPA]);
}

#[test]
fn policy_r13_quota() {
    quota(Path::Policy);
}

#[test]
fn milter_r13_quota() {
    quota(Path::Milter);
}

/// The account's usage and the quota in force, from `user show`.
fn quota_state(mw: &Mailwarden, address: &str) -> (Option<u64>, Option<u64>) {
    let shown = mw.cli_ok("user", &["show", address, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    (
        v["usage_bytes"].as_u64(),
        v["effective_quota_bytes"].as_u64(),
    )
}

/// R13 at the end of DATA through Postfix: swaks announces no SIZE=, so a recipient with
/// room left passes at RCPT, and the message, larger than that room, is refused after its
/// data with `452 4.2.2`. A message that fits is delivered, and mailwarden adds its size to
/// the recipient's usage, once. Along `path`, with the default `count_on = "auto"`: the
/// policy service's END-OF-MESSAGE request (`smtpd_end_of_data_restrictions` of
/// deploy/postfix/main.cf.policy, alone or with the milter too), or the milter's end of
/// message (it measures the message) when the policy service is not asked there: wired
/// alone, or by deploy/postfix/main.cf.both.
fn r13_quota_at_end_of_data_and_usage_counted(path: Path) {
    let (mw, pf) = setup(path, "");
    // SOMSAK: the organisation's default quota, 1 000 bytes used of 1 200: room for 200,
    // less than any swaks message (headers alone are larger).
    mw.cli_ok("org", &["quota", "mpt", "1200"]);
    let answer = admin_post(
        &mw,
        &format!("/v1/users/{SOMSAK}/usage"),
        r#"{"bytes":1000}"#,
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(quota_state(&mw, SOMSAK), (Some(1000), Some(1200)));
    let sent = swaks(&pf.server, OUTSIDE, &[SOMSAK]);
    assert!(
        sent.expect_reply(&format!("RCPT TO:<{SOMSAK}>"))
            .starts_with("250"),
        "no SIZE=, room left: accepted at RCPT\n{}",
        sent.transcript
    );
    let eod = sent.expect_reply(".");
    assert!(
        eod.starts_with("452 4.2.2") && eod.contains(SOMSAK) && eod.contains("storage quota"),
        "{eod:?}\n{}",
        sent.transcript
    );
    assert!(!sent.queued(), "{}", sent.transcript);

    // CHAMPA: a quota of her own, far from full: delivered, and the size counted.
    mw.cli_ok("user", &["quota", CHAMPA, "10000000"]);
    let sent = swaks(&pf.server, OUTSIDE, &[CHAMPA]);
    assert!(sent.queued(), "{}", sent.transcript);
    let d = pf.wait_delivered(&sent.tag);
    assert_eq!(d.rcpts, [CHAMPA]);
    let usage = common::process::wait_for(
        "the delivered size counted into the usage",
        std::time::Duration::from_secs(10),
        || quota_state(&mw, CHAMPA).0,
    );
    let size = Postfix::message_of(&d).len() as u64;
    // Postfix's `size` at END-OF-MESSAGE is the message as the client sent it; the sink
    // sees it with Postfix's Received: header on top, so a little larger. The milter
    // measures what Postfix hands it (its Received: header included).
    assert!(
        usage > 200 && usage <= size + 64,
        "usage {usage} after one message of {size} bytes at the sink"
    );
    // The refused message was not counted.
    assert_eq!(quota_state(&mw, SOMSAK), (Some(1000), Some(1200)));
    // Judged (and counted) by the front-end at the end of DATA, and only there.
    let judged = |protocol| {
        mw.sample(
            "mailwarden_verdicts_total",
            &[
                ("rule", "R13"),
                ("stage", "eom"),
                ("outcome", "tempfail"),
                ("protocol", protocol),
            ],
        )
    };
    let (here, not) = match path {
        Path::Both | Path::Milter => ("milter", "policy"),
        // Postfix asks the policy service first; the milter, told so, neither judges nor
        // counts the message again.
        Path::Policy | Path::BothCheck => ("policy", "milter"),
    };
    assert_eq!((judged(here), judged(not)), (1.0, 0.0), "{}", path.label());
    // Counted once: a second message adds its size again, no more.
    let sent = swaks(&pf.server, OUTSIDE, &[CHAMPA]);
    assert!(sent.queued(), "{}", sent.transcript);
    pf.wait_delivered(&sent.tag);
    let twice = common::process::wait_for(
        "the second message counted",
        std::time::Duration::from_secs(10),
        || quota_state(&mw, CHAMPA).0.filter(|u| *u > usage),
    );
    assert!(twice <= 2 * usage + 64, "{usage} then {twice}");
}

#[test]
fn policy_r13_quota_at_end_of_data_and_usage_counted() {
    r13_quota_at_end_of_data_and_usage_counted(Path::Policy);
}

#[test]
fn both_wired_r13_quota_at_end_of_data_is_the_milters() {
    r13_quota_at_end_of_data_and_usage_counted(Path::Both);
}

#[test]
fn milter_r13_quota_at_end_of_data_and_usage_counted() {
    r13_quota_at_end_of_data_and_usage_counted(Path::Milter);
}

#[test]
fn both_checking_r13_quota_at_end_of_data_is_the_policy_services_once() {
    r13_quota_at_end_of_data_and_usage_counted(Path::BothCheck);
}

/// R14's organisation limits through Postfix: two accounts of one organisation share its
/// hourly message limit; past it, either one gets `450 4.7.1` naming the organisation.
#[test]
fn policy_r14_organisation_limit() {
    let (_mw, pf) = setup(Path::Policy, "[rules.R14]\norg_messages_per_hour = 2\n");
    for from in [CHAMPA, SOMSAK] {
        let sent = swaks(&pf.server, from, &[OUTSIDE]);
        assert!(sent.queued(), "{}", sent.transcript);
    }
    let sent = swaks(&pf.server, CHAMPA, &[OUTSIDE]);
    let reply = sent.expect_reply(&format!("RCPT TO:<{OUTSIDE}>"));
    assert!(
        reply.starts_with("450 4.7.1")
            && reply.contains("2 messages per hour for all of organisation mpt"),
        "{reply:?}\n{}",
        sent.transcript
    );
}

/// Unix-domain sockets (`unix:` on both sides, `server.socket_mode`): Postfix's smtpd, running
/// as user postfix, reaches mailwarden's root-owned sockets through the configured mode, and
/// the verdicts are the same as over TCP — through the policy service and through the milter.
#[test]
fn unix_sockets_carry_both_protocols() {
    let mw = Mailwarden::start_unix("");
    populate(&mw);
    assert!(mw.bound.milter.starts_with("unix:"), "{}", mw.bound.milter);
    for wiring in [
        Wiring::Policy(mw.bound.policy.clone()),
        Wiring::Milter(mw.bound.milter.clone()),
    ] {
        let pf = Postfix::start(wiring);
        let sent = swaks(&pf.server, CHAMPA, &[CABINET, OUTSIDE]);
        let reply = sent.expect_reply(&format!("RCPT TO:<{CABINET}>"));
        assert!(
            reply.starts_with("550 5.2.1"),
            "{reply:?}\n{}",
            sent.transcript
        );
        assert!(sent.queued(), "{}", sent.transcript);
        assert_eq!(pf.wait_delivered(&sent.tag).rcpts, [OUTSIDE]);
    }
}

/// `deploy/postfix/master.cf`'s recipe for Unix sockets with a chrooted smtpd (Debian's
/// default): the sockets in a setgid directory of group postfix inside the queue directory,
/// mailwarden's default `socket_mode` (0660), and main.cf naming them relative to the chroot
/// (`unix:/mailwarden/...`). Both protocols are reached and judge (the suspended recipient is
/// refused by each), with smtpd and cleanup chrooted.
#[test]
fn chrooted_smtpd_reaches_the_unix_sockets_as_master_cf_says() {
    use std::os::unix::fs::PermissionsExt;
    for (wiring, protocol) in [
        (
            Wiring::Policy("unix:/mailwarden/policy.sock".into()),
            "policy",
        ),
        (
            Wiring::Milter("unix:/mailwarden/milter.sock".into()),
            "milter",
        ),
    ] {
        // Postfix connects to its milters and policy services per session: it may start first.
        let pf = Postfix::start_chrooted(wiring, "");
        let sockets = pf.spool().join("mailwarden");
        // install -d -o mailwarden -g postfix -m 2750 /var/spool/postfix/mailwarden
        // (the daemon runs as root here).
        std::fs::create_dir(&sockets).unwrap();
        let st = std::process::Command::new("chgrp")
            .arg("postfix")
            .arg(&sockets)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o2750)).unwrap();
        let d = sockets.display();
        let mw = Mailwarden::start_listening(
            &format!(
                "milter_listen = \"unix:{d}/milter.sock\"\npolicy_listen = \"unix:{d}/policy.sock\""
            ),
            "",
        );
        populate(&mw);
        let sent = swaks(&pf.server, CHAMPA, &[CABINET, OUTSIDE]);
        let reply = sent.expect_reply(&format!("RCPT TO:<{CABINET}>"));
        assert!(
            reply.starts_with("550 5.2.1"),
            "{protocol}: {reply:?}\n{}\nmaillog:\n{}",
            sent.transcript,
            pf.maillog()
        );
        assert!(sent.queued(), "{}", sent.transcript);
        assert_eq!(pf.wait_delivered(&sent.tag).rcpts, [OUTSIDE]);
    }
}
