//! R7 through real Postfix: mailwarden wired as a milter, pointed at a local authoritative
//! DNS server (Debian's `dnsmasq`, on 127.0.0.1 and a free port) that serves the test zones'
//! SPF, DKIM and DMARC records. Inbound mail is signed independently with dkimpy.
//! `mailwarden dkim check` is run against the same kind of server.
//!
//! Needs root and the Debian packages `postfix`, `swaks`, `python3-dkim`, `dnsmasq-base`
//! (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::dns::Dnsmasq;
use common::postfix::{Postfix, Wiring};
use common::process::{TestDir, find_program};
use common::smtp::{END_MARKER, Sent, unique_tag};
use std::{net::UdpSocket, process::Command};

const CHAMPA: &str = "champa@mpt.gov.la";
const AUTHSERV: &str = "mx.e2e.test";
const ZONES: &[&str] = &["example.org", "org", "gov.la", "la", "e2e.test", "test"];

/// `mailwarden dkim keygen DOMAIN SELECTOR --out DIR`: the key file and the TXT text.
fn keygen(dir: &TestDir, domain: &str, selector: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
        .args(["dkim", "keygen", domain, selector, "--out"])
        .arg(dir.path())
        .output()
        .expect("run mailwarden dkim keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `NAME. IN TXT ( "v=DKIM1; k=rsa; " "p=..." )`: the quoted strings, joined.
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let text: String = line.split('"').skip(1).step_by(2).collect();
    assert!(text.starts_with("v=DKIM1;"), "{line}");
    (
        dir.join(&format!("{domain}.{selector}.pem"))
            .display()
            .to_string(),
        text,
    )
}

/// The test zones: example.org may send from 127.0.0.1 (SPF), signs with `s1` and asks
/// for DMARC p=reject; mpt.gov.la sends only from 203.0.113.5 and asks for p=reject.
fn zones(example_key: &str) -> Vec<(String, String)> {
    [
        ("example.org", "v=spf1 ip4:127.0.0.1 -all"),
        ("_dmarc.example.org", "v=DMARC1; p=reject"),
        ("s1._domainkey.example.org", example_key),
        ("mpt.gov.la", "v=spf1 ip4:203.0.113.5 -all"),
        ("_dmarc.mpt.gov.la", "v=DMARC1; p=reject"),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_owned(), t.to_owned()))
    .collect()
}

fn r7_config(nameserver: &str, extra_dns: &str) -> String {
    format!(
        "[dns]\nnameservers = [\"{nameserver}\"]\n{extra_dns}\n\
         [rules.R7]\nmode = \"enforce\"\nauthserv_id = \"{AUTHSERV}\"\n"
    )
}

fn setup(config: &str) -> (Mailwarden, Postfix) {
    let mw = Mailwarden::start(config);
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    mw.cli_ok(
        "user",
        &["add", CHAMPA, "--kind", "person", "--status", "active"],
    );
    let pf = Postfix::start(Wiring::Milter(mw.bound.milter.clone()));
    (mw, pf)
}

/// A message in wire form, with a unique tag header and the sink's end marker.
fn message(from: &str, extra_headers: &str, tag: &str) -> Vec<u8> {
    format!(
        "{extra_headers}From: <{from}>\r\nTo: <{CHAMPA}>\r\nSubject: R7 test\r\n\
         Date: Sat, 05 Dec 2026 00:00:00 +0000\r\nMessage-ID: <{tag}@example.org>\r\n\
         X-E2E-Tag: {tag}\r\n\r\nHello from outside.\r\n{END_MARKER}\r\n"
    )
    .into_bytes()
}

/// Signs `msg` with dkimpy (Debian's python3-dkim): an implementation nobody here wrote.
fn dkimpy_sign(msg: &[u8], key_file: &str, domain: &str) -> Vec<u8> {
    let dir = TestDir::new("mw-e2e-sign-");
    let path = dir.join("msg.eml");
    std::fs::write(&path, msg).unwrap();
    // dkimpy reads PKCS#1 PEM; `mailwarden dkim keygen` writes PKCS#8.
    let pkcs1 = dir.join("key.pem");
    let conv = Command::new(find_program("openssl", &["/usr/bin"]))
        .args(["rsa", "-traditional", "-in", key_file, "-out"])
        .arg(&pkcs1)
        .output()
        .expect("run openssl");
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let key_file = pkcs1.display().to_string();
    let key_file = key_file.as_str();
    let python = find_program("python3", &["/usr/bin"]);
    let out = Command::new(python)
        .args([
            "-c",
            "import dkim, sys\n\
             m = open(sys.argv[1], 'rb').read()\n\
             k = open(sys.argv[2], 'rb').read()\n\
             h = [b'from', b'to', b'subject', b'date', b'message-id']\n\
             sig = dkim.sign(m, b's1', sys.argv[3].encode(), k, include_headers=h, linesep=b'\\r\\n')\n\
             sys.stdout.buffer.write(sig + m)\n",
        ])
        .arg(&path)
        .arg(key_file)
        .arg(domain)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Sends `msg` as is (swaks `--data @FILE`), envelope `mail_from` → champa.
fn send_raw(pf: &Postfix, mail_from: &str, msg: &[u8], tag: &str) -> Sent {
    let dir = TestDir::new("mw-e2e-data-");
    let path = dir.join("data.eml");
    std::fs::write(&path, msg).unwrap();
    let swaks = find_program("swaks", &["/usr/bin"]);
    let out = Command::new(swaks)
        .args(["--server", &pf.server])
        .args(["--helo", "client.e2e.test"])
        .args(["--from", mail_from])
        .args(["--to", CHAMPA])
        .args(["--timeout", "60"])
        .arg("--data")
        .arg(format!("@{}", path.display()))
        .output()
        .expect("run swaks");
    Sent {
        status: out.status.code(),
        transcript: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        tag: tag.to_owned(),
    }
}

/// The `Authentication-Results` headers of a delivered message, unfolded.
fn auth_results(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap();
    head.replace("\r\n\t", " ")
        .replace("\r\n ", " ")
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Authentication-Results:")
                .map(|v| v.trim().to_owned())
        })
        .collect()
}

#[test]
fn spoofed_local_from_is_refused_and_verified_outside_mail_carries_our_results() {
    let keys = TestDir::new("mw-e2e-keys-");
    let (example_key, example_txt) = keygen(&keys, "example.org", "s1");
    let dns = Dnsmasq::start(ZONES, &zones(&example_txt));
    let (mw, pf) = setup(&r7_config(&dns.addr, ""));

    // 1. From: a government address, sent by an outside client with an outside envelope
    //    (SPF passes for example.org, which is not aligned with mpt.gov.la).
    let tag = unique_tag();
    let spoof = send_raw(&pf, "bulk@example.org", &message(CHAMPA, "", &tag), &tag);
    let reply = spoof.expect_reply(".");
    assert!(
        reply.starts_with("550 5.7.26 Message claims to be from mpt.gov.la"),
        "{reply}\n{}",
        spoof.transcript
    );
    assert!(!spoof.queued());
    assert_eq!(
        mw.sample(
            "mailwarden_verdicts_total",
            &[
                ("rule", "R7"),
                ("stage", "eom"),
                ("outcome", "reject"),
                ("protocol", "milter")
            ]
        ),
        1.0
    );

    // 2. A message of example.org signed by dkimpy: DKIM, SPF and DMARC pass; delivered with
    //    our Authentication-Results saying so.
    let tag = unique_tag();
    let signed = dkimpy_sign(
        &message("news@example.org", "", &tag),
        &example_key,
        "example.org",
    );
    let sent = send_raw(&pf, "news@example.org", &signed, &tag);
    assert!(sent.queued(), "{}", sent.transcript);
    let msg = Postfix::message_of(&pf.wait_delivered(&tag));
    let ar = auth_results(&msg);
    assert_eq!(ar.len(), 1, "{ar:?}");
    let ours = &ar[0];
    assert!(ours.starts_with(&format!("{AUTHSERV};")), "{ours}");
    // dkimpy sets i=@example.org, which mail-auth reports as header.i.
    assert!(
        ours.contains("dkim=pass header.i=@example.org header.s=s1"),
        "{ours}"
    );
    for want in ["spf=pass", "smtp.mailfrom=news@example.org", "dmarc=pass"] {
        assert!(ours.contains(want), "{want} in {ours}");
    }
    for (method, result) in [("dkim", "pass"), ("spf", "pass"), ("dmarc", "pass")] {
        assert!(
            mw.sample(
                "mailwarden_auth_results_total",
                &[("method", method), ("result", result)]
            ) >= 1.0,
            "{method}={result}"
        );
    }

    // 3. Forged Authentication-Results claiming our authserv-id are removed; another
    //    server's stays.
    let tag = unique_tag();
    let forged = format!(
        "Authentication-Results: {AUTHSERV}; dkim=pass header.d=mpt.gov.la\r\n\
         Authentication-Results: other.example; spf=pass smtp.mailfrom=example.org\r\n\
         Authentication-Results: (comment) MX.E2E.TEST;\r\n\tdmarc=pass header.from=mpt.gov.la\r\n"
    );
    let sent = send_raw(
        &pf,
        "news@example.org",
        &message("news@example.org", &forged, &tag),
        &tag,
    );
    assert!(sent.queued(), "{}", sent.transcript);
    let msg = Postfix::message_of(&pf.wait_delivered(&tag));
    let ar = auth_results(&msg);
    let ours: Vec<&String> = ar
        .iter()
        .filter(|v| v.to_ascii_lowercase().contains(AUTHSERV))
        .collect();
    assert_eq!(ours.len(), 1, "only ours is left: {ar:?}");
    assert!(!ours[0].contains("mpt.gov.la"), "{ar:?}");
    assert!(ours[0].contains("spf=pass"), "{ar:?}");
    assert!(
        ours[0].contains("dkim=none") || !ours[0].contains("dkim="),
        "{ar:?}"
    );
    assert!(
        ar.iter().any(|v| v.starts_with("other.example;")),
        "another server's header stays: {ar:?}"
    );
    assert_eq!(ar.len(), 2, "{ar:?}");
}

/// A `From:` whose mailbox is no valid address but still reads as a government sender
/// (`ceo @mpt.gov.la`, a display name alone) is refused like a well-formed spoof; the same
/// malformation naming an outside domain is delivered.
#[test]
fn a_malformed_from_claiming_a_local_domain_is_refused_5_7_26() {
    let keys = TestDir::new("mw-e2e-keys-");
    let (_example_key, example_txt) = keygen(&keys, "example.org", "s1");
    let dns = Dnsmasq::start(ZONES, &zones(&example_txt));
    let (_mw, pf) = setup(&r7_config(&dns.addr, ""));
    let raw = |from: &str, tag: &str| {
        format!(
            "From: {from}\r\nTo: <{CHAMPA}>\r\nSubject: R7 test\r\n\
             Date: Sat, 05 Dec 2026 00:00:00 +0000\r\nMessage-ID: <{tag}@example.org>\r\n\
             X-E2E-Tag: {tag}\r\n\r\nHello from outside.\r\n{END_MARKER}\r\n"
        )
        .into_bytes()
    };
    for from in ["ceo @mpt.gov.la", "\"ceo@mpt.gov.la\""] {
        let tag = unique_tag();
        let sent = send_raw(&pf, "bulk@example.org", &raw(from, &tag), &tag);
        let reply = sent.expect_reply(".");
        assert!(
            reply.starts_with("550 5.7.26 Message claims to be from mpt.gov.la"),
            "{from}: {reply}\n{}",
            sent.transcript
        );
        assert!(!sent.queued());
    }
    let tag = unique_tag();
    let sent = send_raw(
        &pf,
        "bulk@example.org",
        &raw("someone @example.org", &tag),
        &tag,
    );
    assert!(sent.queued(), "{}", sent.transcript);
    pf.wait_delivered(&tag);
}

#[test]
fn a_dns_server_that_does_not_answer_tempfails_4_4_3() {
    // Bound, never read: every query times out.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let (_mw, pf) = setup(&r7_config(
        &addr,
        "timeout = \"1s\"\nattempts = 1\nmessage_timeout = \"10s\"\n",
    ));
    // The envelope is in mpt.gov.la too: only its SPF record could vouch for the message,
    // and it cannot be read. (With an outside envelope and no signature nothing could: that
    // is refused 550 5.7.26 without waiting for DNS.)
    let tag = unique_tag();
    let sent = send_raw(&pf, CHAMPA, &message(CHAMPA, "", &tag), &tag);
    let reply = sent.expect_reply(".");
    assert!(
        reply.starts_with("451 4.4.3 Cannot verify that this message comes from mpt.gov.la"),
        "{reply}\n{}",
        sent.transcript
    );
    assert!(!sent.queued());
    drop(silent);
}

#[test]
fn dkim_check_compares_the_published_key_with_the_configured_one() {
    let keys = TestDir::new("mw-e2e-keys-");
    let (good_key, good_txt) = keygen(&keys, "mpt.gov.la", "good");
    let (bad_key, _) = keygen(&keys, "mpt.gov.la", "bad");
    let (unpublished_key, _) = keygen(&keys, "mpt.gov.la", "unpublished");
    // "bad" publishes good's key: not the configured one.
    let dns = Dnsmasq::start(
        ZONES,
        &[
            ("good._domainkey.mpt.gov.la".to_owned(), good_txt.clone()),
            ("bad._domainkey.mpt.gov.la".to_owned(), good_txt),
        ],
    );
    let dir = TestDir::new("mw-e2e-check-");
    let config = dir.join("mailwarden.toml");
    let write_config = |dns: &str| {
        let mut text = format!("[dns]\n{dns}\n");
        for (sel, file) in [
            ("good", &good_key),
            ("bad", &bad_key),
            ("unpublished", &unpublished_key),
        ] {
            text.push_str(&format!(
                "[[dkim.keys]]\ndomain = \"mpt.gov.la\"\nselector = \"{sel}\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"{file}\"\n"
            ));
        }
        std::fs::write(&config, text).unwrap();
    };
    write_config(&format!("nameservers = [\"{}\"]", dns.addr));
    let check = |selector: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailwarden"));
        cmd.args(["dkim", "check", "mpt.gov.la", "--config"])
            .arg(&config);
        if let Some(s) = selector {
            cmd.args(["--selector", s]);
        }
        let out = cmd.output().expect("run mailwarden dkim check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, out) = check(Some("good"));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("good._domainkey.mpt.gov.la (rsa-sha256): match"),
        "{out}"
    );

    let (code, out) = check(Some("bad"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("bad._domainkey.mpt.gov.la (rsa-sha256): mismatch"),
        "{out}"
    );
    // The record to publish instead is printed.
    assert!(out.contains("bad._domainkey.mpt.gov.la"), "{out}");
    assert!(out.contains("v=DKIM1"), "{out}");

    let (code, out) = check(None);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("unpublished._domainkey.mpt.gov.la (rsa-sha256): missing"),
        "{out}"
    );
    assert!(
        out.contains("good._domainkey.mpt.gov.la (rsa-sha256): match"),
        "{out}"
    );

    // A DNS server that does not answer: a DNS error, not "missing".
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    write_config(&format!(
        "timeout = \"1s\"\nattempts = 1\nnameservers = [\"{}\"]",
        silent.local_addr().unwrap()
    ));
    let (code, out) = check(Some("good"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("good._domainkey.mpt.gov.la (rsa-sha256): DNS error"),
        "{out}"
    );
}
