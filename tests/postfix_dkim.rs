//! R6 through real Postfix: mailwarden wired as a milter (the `deploy/postfix/main.cf.milter`
//! snippet), SASL simulated with Postfix's XCLIENT (`smtpd_authorized_xclient_hosts =
//! 127.0.0.1`, swaks `--xclient-login`), keys made with `mailwarden dkim keygen`. What
//! reaches the sink is checked with dkimpy and OpenDKIM, offline.
//!
//! Needs root and the Debian packages `postfix`, `swaks`, `python3-dkim`, `python3-nacl`,
//! `opendkim` (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::dkim::{self as verify, Records};
use common::postfix::{Postfix, Wiring};
use common::process::TestDir;
use common::smtp::{Sent, swaks, swaks_with};
use std::process::Command;

const CHAMPA: &str = "champa@mpt.gov.la";
const OUTSIDE: &str = "friend@example.org";

/// Lets the test client set the SASL login name (XCLIENT LOGIN=), as a submission server
/// with real SASL would.
const XCLIENT: &str = "smtpd_authorized_xclient_hosts = 127.0.0.1";

/// `mailwarden dkim keygen` (the binary): returns the key file and adds the printed DNS
/// record to `records`.
fn keygen(dir: &TestDir, selector: &str, algorithm: &str, records: &mut Records) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
        .args([
            "dkim",
            "keygen",
            "mpt.gov.la",
            selector,
            "--algorithm",
            algorithm,
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run mailwarden dkim keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    records.add_zone_line(String::from_utf8_lossy(&out.stdout).trim());
    dir.join(&format!("mpt.gov.la.{selector}.pem"))
        .display()
        .to_string()
}

fn key_entry(selector: &str, algorithm: &str, file: &str) -> String {
    format!(
        "[[dkim.keys]]\ndomain = \"mpt.gov.la\"\nselector = \"{selector}\"\nalgorithm = \"{algorithm}\"\nkey_file = \"{file}\"\n"
    )
}

/// The SASL login of these tests is the bare name `champa` (as many SASL back ends use):
/// send-as (R8) maps it to champa@mpt.gov.la.
const LOGIN_DOMAIN: &str = "[rules.R8]\nlogin_domain = \"mpt.gov.la\"\n";

fn setup(dkim: &str) -> (Mailwarden, Postfix) {
    let mw = Mailwarden::start(&format!("{dkim}{LOGIN_DOMAIN}"));
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
    let pf = Postfix::start_with(Wiring::Milter(mw.bound.milter.clone()), XCLIENT);
    (mw, pf)
}

/// A message from champa, logged in as champa.
fn send_authenticated(pf: &Postfix) -> Sent {
    swaks_with(
        &pf.server,
        CHAMPA,
        &[OUTSIDE],
        &[
            "--xclient-login",
            "champa",
            "--header",
            "Subject: budget 2026",
        ],
    )
}

/// The selectors (`s=`) of the DKIM-Signature headers of a delivered message.
fn selectors(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap();
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    unfolded
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .map(|l| {
            l.split(';')
                .find_map(|t| t.trim().strip_prefix("s=").map(str::to_owned))
                .expect("s= tag")
        })
        .collect()
}

#[test]
fn authenticated_local_mail_arrives_signed_and_verifies() {
    let keys = TestDir::new("mw-e2e-keys-");
    let mut records = Records::default();
    let rsa = keygen(&keys, "rsa2026", "rsa", &mut records);
    let ed = keygen(&keys, "ed2026", "ed25519", &mut records);
    let (mw, pf) = setup(&format!(
        "{}{}",
        key_entry("rsa2026", "rsa-sha256", &rsa),
        key_entry("ed2026", "ed25519-sha256", &ed)
    ));

    let sent = send_authenticated(&pf);
    assert!(sent.queued(), "{}", sent.transcript);
    let msg = Postfix::message_of(&pf.wait_delivered(&sent.tag));
    let mut sels = selectors(&msg);
    sels.sort();
    assert_eq!(
        sels,
        ["ed2026", "rsa2026"],
        "{}",
        String::from_utf8_lossy(&msg)
    );
    assert_eq!(
        verify::dkimpy(std::slice::from_ref(&msg), &records),
        [vec![true, true]]
    );
    assert_eq!(verify::opendkim(&[msg], &records), [true]);
    assert_eq!(
        mw.sample(
            "mailwarden_dkim_signed_total",
            &[
                ("domain", "mpt.gov.la"),
                ("selector", "rsa2026"),
                ("algorithm", "rsa-sha256")
            ]
        ),
        1.0
    );

    // The same sender without logging in is not outbound submission: not signed here
    // (inbound verification, R7, judges such mail).
    let plain = swaks(&pf.server, CHAMPA, &[OUTSIDE]);
    assert!(plain.queued(), "{}", plain.transcript);
    let msg = Postfix::message_of(&pf.wait_delivered(&plain.tag));
    assert!(selectors(&msg).is_empty());
}

#[test]
fn missing_key_tempfails_4_7_5_and_nothing_is_delivered() {
    let keys = TestDir::new("mw-e2e-keys-");
    let mut records = Records::default();
    // A key, but for another domain: mpt.gov.la has none.
    let out = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
        .args(["dkim", "keygen", "mof.gov.la", "s1", "--out"])
        .arg(keys.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    records.add_zone_line(String::from_utf8_lossy(&out.stdout).trim());
    let file = keys.join("mof.gov.la.s1.pem").display().to_string();
    let (mw, pf) = setup(&format!(
        "[[dkim.keys]]\ndomain = \"mof.gov.la\"\nselector = \"s1\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"{file}\"\n"
    ));
    let sent = send_authenticated(&pf);
    let reply = sent.expect_reply(".");
    assert!(
        reply.starts_with("451 4.7.5 No DKIM key for mpt.gov.la"),
        "{reply}\n{}",
        sent.transcript
    );
    assert!(!sent.queued());
    assert_eq!(
        mw.sample(
            "mailwarden_dkim_unsigned_tempfail_total",
            &[("domain", "mpt.gov.la")]
        ),
        1.0
    );
    // Something that is delivered afterwards proves the queue was looked at: only it arrives.
    let plain = swaks(&pf.server, CHAMPA, &[OUTSIDE]);
    pf.wait_delivered(&plain.tag);
    assert_eq!(
        pf.deliveries().len(),
        1,
        "the refused message was not delivered"
    );
}

#[test]
fn key_rotation_by_reload_under_load_never_delivers_unsigned() {
    let keys = TestDir::new("mw-e2e-keys-");
    let mut records = Records::default();
    let old = keygen(&keys, "s2025", "rsa", &mut records);
    let new = keygen(&keys, "s2026", "rsa", &mut records);
    let only_old = key_entry("s2025", "rsa-sha256", &old);
    let both = format!("{only_old}{}", key_entry("s2026", "rsa-sha256", &new));
    let only_new = key_entry("s2026", "rsa-sha256", &new);
    let (mw, pf) = setup(&only_old);

    let first = send_authenticated(&pf);
    assert!(first.queued(), "{}", first.transcript);
    let msg = Postfix::message_of(&pf.wait_delivered(&first.tag));
    assert_eq!(selectors(&msg), ["s2025"]);

    // Mail keeps flowing from another thread while the keys are rotated.
    let server = pf.server.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            // At least a dozen, however fast the reloads go; at most 200.
            while (sent.len() < 12 || !stop.load(std::sync::atomic::Ordering::SeqCst))
                && sent.len() < 200
            {
                sent.push(swaks_with(
                    &server,
                    CHAMPA,
                    &[OUTSIDE],
                    &["--xclient-login", "champa"],
                ));
            }
            sent
        })
    };

    // Dual-signing window: publish s2026, sign with both.
    mw.reload(&format!("{both}{LOGIN_DOMAIN}"));
    let during = send_authenticated(&pf);
    let msg = Postfix::message_of(&pf.wait_delivered(&during.tag));
    let mut sels = selectors(&msg);
    sels.sort();
    assert_eq!(sels, ["s2025", "s2026"]);

    // A broken key file in the next config: the reload is refused, the keys in force stay.
    mw.reload_refused(&format!(
        "{both}{}{LOGIN_DOMAIN}",
        key_entry(
            "s2027",
            "rsa-sha256",
            &keys.join("missing.pem").display().to_string()
        )
    ));
    let refused = send_authenticated(&pf);
    let msg = Postfix::message_of(&pf.wait_delivered(&refused.tag));
    assert_eq!(
        selectors(&msg).len(),
        2,
        "still dual-signed after the refused reload"
    );

    // Retire the old selector.
    mw.reload(&format!("{only_new}{LOGIN_DOMAIN}"));
    let after = send_authenticated(&pf);
    let msg = Postfix::message_of(&pf.wait_delivered(&after.tag));
    assert_eq!(selectors(&msg), ["s2026"]);

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let background = load.join().unwrap();
    assert!(!background.is_empty());
    for s in &background {
        assert!(
            s.queued(),
            "every message during the rotation was taken: {}",
            s.transcript
        );
    }
    // Every message delivered in this test carries a signature that verifies.
    let mut all: Vec<Vec<u8>> = Vec::new();
    for s in background.iter().chain([&first, &during, &refused, &after]) {
        all.push(Postfix::message_of(&pf.wait_delivered(&s.tag)));
    }
    let verdicts = verify::dkimpy(&all, &records);
    for (i, v) in verdicts.iter().enumerate() {
        assert!(
            !v.is_empty() && v.iter().all(|ok| *ok),
            "message {i} of {}: {v:?}\n{}",
            all.len(),
            String::from_utf8_lossy(&all[i])
        );
    }
    eprintln!(
        "rotation: {} messages sent during the reloads, all signed and verified",
        background.len()
    );
}
