//! The two Dovecot integrations the README documents, against Debian's real Dovecot (2.3),
//! configured as the README says:
//!
//! - **auth policy (R16)**: IMAP logins reach mailwarden's `/dovecot/auth-policy`; a
//!   successful one from a new country raises `new_country_login` at the webhook, a failed
//!   one records nothing.
//! - **quota_clone (R13)**: a message appended over IMAP makes Dovecot write the user's usage
//!   into the Redis store, where `mailwarden user show` and R13's checks read it.
//!
//! Needs root and the Debian packages `dovecot-core`, `dovecot-imapd`, `redis-server`
//! (`.ci/run` installs them). Client addresses are presented with IMAP `ID
//! ("x-originating-ip" ...)`, which Dovecot believes from its `login_trusted_networks`.

#[allow(dead_code)]
#[path = "../src/store/redis/servers.rs"]
mod servers;

mod common;

use common::daemon::Mailwarden;
use common::dovecot::Dovecot;
use common::postfix::{Postfix, Wiring};
use common::process::wait_for;
use common::smtp::swaks_with;
use common::webhook::Receiver;
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

const CHAMPA: &str = "champa@mpt.gov.la";
const PASSWORD: &str = "imap-pass-0123";
const SECRET: &str = "dovecot-alert-secret-0123456789";
const POLICY_TOKEN: &str = "dovecot-policy-token-0123456789";

fn add_champa(mw: &Mailwarden) {
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    mw.cli_ok(
        "user",
        &["add", CHAMPA, "--kind", "person", "--status", "active"],
    );
}

#[test]
fn dovecot_logins_feed_new_country_detection() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut receiver = rt.block_on(Receiver::start(0));
    let dir = tempfile::tempdir().unwrap();
    let mw = Mailwarden::start(&format!(
        r#"{}
[[admin.tokens]]
name = "dovecot"
token = "{POLICY_TOKEN}"
scopes = ["auth_policy"]
"#,
        receiver.alerts_config(SECRET, dir.path())
    ));
    add_champa(&mw);
    // README, "Owner alerts": the dovecot.conf lines, with this daemon's address and token.
    let dovecot = Dovecot::start(
        &[(CHAMPA, PASSWORD)],
        &format!(
            "auth_policy_server_url = {}/dovecot/auth-policy\n\
             auth_policy_server_api_header = Authorization: Bearer {POLICY_TOKEN}\n\
             auth_policy_hash_nonce = test-nonce-0123\n\
             auth_policy_request_attributes = login=%{{requested_username}} remote=%{{rip}} protocol=%s\n\
             auth_policy_report_after_auth = yes\n\
             auth_policy_reject_on_fail = no\n",
            mw.admin_url()
        ),
    );
    let login = |from: &str, password: &str| -> bool {
        let mut imap = dovecot.imap();
        imap.present_address(from);
        imap.login(CHAMPA, password)
    };
    // Laos: the account's first country, only recorded.
    assert!(login("192.0.2.7", PASSWORD), "{}", dovecot.log());
    // Thailand, with a wrong password: refused by Dovecot, and nothing for mailwarden to learn
    // (else Thailand would be known below, or alerted now).
    assert!(!login("198.51.100.7", "wrong-password"));
    // Vietnam: new.
    assert!(login("203.0.113.9", PASSWORD), "{}", dovecot.log());

    let got = rt.block_on(receiver.next());
    got.assert_signed_with(SECRET.as_bytes());
    let body = got.json();
    assert_eq!(body["kind"], "new_country_login", "{body}");
    assert_eq!(body["account"], CHAMPA);
    assert_eq!(body["country"], "VN", "{body}");
    assert_eq!(
        body["known_countries"],
        serde_json::json!(["LA"]),
        "the failed Thai login must not count: {body}"
    );
    assert_eq!(body["client_address"], "203.0.113.9");
    assert_eq!(body["via"], "imap");
    assert!(receiver.pending().is_empty(), "one alert");
    // Dovecot's requests were authorised by the auth_policy token and answered so that it let
    // the logins through (it would have refused them with the policy's reject).
    assert!(
        dovecot.log().contains("Login: user=<champa@mpt.gov.la>"),
        "{}",
        dovecot.log()
    );
    assert!(
        !mw.log().contains(PASSWORD) && !mw.log().contains("wrong-password"),
        "no credential in mailwarden's log"
    );
}

/// One policy delegation request (`smtpd_access_policy`, RCPT) for `rcpt` with the announced
/// `size`; the action of the answer.
fn policy_rcpt(addr: &str, rcpt: &str, size: u64) -> String {
    let stream = std::net::TcpStream::connect(addr).expect("connect to the policy service");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    write!(
        w,
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
         client_address=192.0.2.50\nclient_name=mx.example.org\nhelo_name=mx.example.org\n\
         sender=friend@example.org\nrecipient={rcpt}\nsize={size}\n\
         queue_id=\ninstance=dovecot-test.{size}\n\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.trim_end()
        .strip_prefix("action=")
        .unwrap_or_else(|| panic!("not a policy answer: {line:?}"))
        .to_owned()
}

/// A message of exactly `len` bytes, CRLF line ends.
fn message(len: usize) -> Vec<u8> {
    let mut m = b"From: friend@example.org\r\nTo: champa@mpt.gov.la\r\nSubject: q\r\n\r\n".to_vec();
    while m.len() + 2 < len {
        let n = (len - m.len() - 2).min(70);
        m.extend(std::iter::repeat_n(b'x', n));
        m.extend_from_slice(b"\r\n");
    }
    while m.len() < len {
        m.push(b'\n');
    }
    m.truncate(len);
    m
}

/// A mailbox site for R13: a Redis store, mailwarden on it (`rules` added) with champa's
/// quota set to `quota`, and Dovecot reporting usage into it with quota_clone as the README
/// configures it (`extra`: more Dovecot settings). Field order is drop order: Dovecot and
/// the daemon stop before Redis.
struct QuotaSite {
    dovecot: Dovecot,
    mw: Mailwarden,
    _redis: servers::Standalone,
}

impl QuotaSite {
    fn start(prefix: &str, quota: u64, rules: &str, extra: &str) -> QuotaSite {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let redis = rt.block_on(servers::Standalone::start(&[]));
        let mw = Mailwarden::start_on_store(
            &format!("redis://127.0.0.1:{}/0?prefix={prefix}", redis.port()),
            rules,
        );
        add_champa(&mw);
        mw.cli_ok("user", &["quota", CHAMPA, &quota.to_string()]);
        // README, "R13": the plugin settings, with this Redis and the store's prefix.
        let dovecot = Dovecot::start(
            &[(CHAMPA, PASSWORD)],
            &format!(
                "{extra}mail_plugins = $mail_plugins quota quota_clone\n\
                 plugin {{\n  quota = count:User quota\n  quota_vsizes = yes\n  \
                 quota_clone_dict = redis:host=127.0.0.1:port={}:prefix={prefix}.usage.\n}}\n",
                redis.port()
            ),
        );
        QuotaSite {
            dovecot,
            mw,
            _redis: redis,
        }
    }

    /// champa's usage as `mailwarden user show` has it.
    fn usage(&self) -> Option<u64> {
        let shown = self.mw.cli_ok("user", &["show", CHAMPA, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
        v["usage_bytes"].as_u64()
    }
}

#[test]
fn dovecot_quota_clone_usage_is_what_r13_judges() {
    // Only what Dovecot reports counts here.
    let site = QuotaSite::start(
        "mwdove",
        10_000,
        "[rules.R13]\ncount_deliveries = false\n",
        "",
    );
    let (mw, dovecot) = (&site.mw, &site.dovecot);
    let usage = || site.usage();
    assert_eq!(usage(), None, "no report yet");

    // quota_clone writes a change 10 s later, or when the session ends: each append is a
    // session of its own.
    let append = |len: usize| {
        let mut imap = dovecot.imap();
        assert!(imap.login(CHAMPA, PASSWORD), "{}", dovecot.log());
        imap.append("INBOX", &message(len));
        imap.logout();
    };
    append(6_000);
    // The value mailwarden reads is Dovecot's count.
    let first = wait_for(
        "Dovecot's usage report in mailwarden",
        Duration::from_secs(20),
        || usage().filter(|&u| u > 0),
    );
    assert_eq!(first, 6_000, "Dovecot log:\n{}", dovecot.log());
    let quota = dovecot.doveadm(&["quota", "get", "-u", CHAMPA]);
    assert!(
        String::from_utf8_lossy(&quota.stdout).contains("MESSAGE     1"),
        "{}",
        String::from_utf8_lossy(&quota.stdout)
    );

    // R13 at RCPT judges by that usage: 6,000 + 3,000 fits in 10,000, 6,000 + 5,000 does not.
    let policy = &mw.bound.policy;
    let policy = policy.strip_prefix("inet:").unwrap_or(policy);
    assert_eq!(policy_rcpt(policy, CHAMPA, 3_000), "DUNNO");
    let refused = policy_rcpt(policy, CHAMPA, 5_000);
    assert!(refused.starts_with("452 4.2.2"), "{refused}");

    // A second message: Dovecot's next report replaces the value; the mailbox is now full.
    append(4_500);
    wait_for("Dovecot's second report", Duration::from_secs(20), || {
        usage().filter(|&u| u == 10_500)
    });
    let full = policy_rcpt(policy, CHAMPA, 100);
    assert!(full.starts_with("452 4.2.2"), "{full}");
    assert!(!dovecot.log().contains("Error"), "{}", dovecot.log());
}

/// R13's whole chain with the real mailbox server: Postfix (milter wired) delivers over LMTP
/// to Dovecot, Dovecot's quota_clone reports the mailbox's usage to the Redis store at the
/// end of the LMTP session, and R13 refuses the next message that would not fit, at the end
/// of DATA; one that fits is delivered to the mailbox.
#[test]
fn lmtp_deliveries_fill_the_quota_until_r13_refuses() {
    let lmtp = common::process::free_port();
    let site = QuotaSite::start(
        "mwlmtp",
        10_000,
        "",
        &format!(
            "protocols = imap lmtp\n\
             service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {lmtp}\n  }}\n}}\n"
        ),
    );
    let (mw, dovecot) = (&site.mw, &site.dovecot);
    let pf = Postfix::start_with(
        Wiring::Milter(mw.bound.milter.clone()),
        &format!(
            "virtual_mailbox_domains = mpt.gov.la\n\
             virtual_transport = lmtp:inet:127.0.0.1:{lmtp}\n\
             smtpd_reject_unlisted_recipient = no\n"
        ),
    );
    let usage = || site.usage();
    let send = |bytes: usize| {
        let body = "x".repeat(70) + "\n";
        let body = body.repeat(bytes / body.len());
        swaks_with(
            &pf.server,
            "friend@example.org",
            &[CHAMPA],
            &["--body", &body],
        )
    };
    let messages = || -> u64 {
        let out = dovecot.doveadm(&["mailbox", "status", "-u", CHAMPA, "messages", "INBOX"]);
        // "INBOX messages=N"
        String::from_utf8_lossy(&out.stdout)
            .split_once("messages=")
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or(0)
    };

    let first = send(6_000);
    assert!(first.queued(), "{}", first.transcript);
    wait_for(
        "the first message in the mailbox",
        Duration::from_secs(20),
        || (messages() == 1).then_some(()),
    );
    // Dovecot's report (the delivered message with the headers Postfix and Dovecot added)
    // replaces whatever mailwarden counted at the end of DATA.
    let reported = wait_for("Dovecot's usage report", Duration::from_secs(20), || {
        usage().filter(|&u| u > 6_000)
    });
    assert!(reported < 7_000, "{reported}");

    // 5,000 more would pass 10,000: refused after DATA, nothing delivered.
    let second = send(5_000);
    let reply = second.expect_reply(".");
    assert!(
        reply.starts_with("452 4.2.2"),
        "{reply}\n{}",
        second.transcript
    );
    // 1,000 more fit: delivered to the mailbox.
    let third = send(1_000);
    assert!(third.queued(), "{}", third.transcript);
    wait_for(
        "the third message in the mailbox",
        Duration::from_secs(20),
        || (messages() == 2).then_some(()),
    );
    assert!(!dovecot.log().contains("Error"), "{}", dovecot.log());
}
