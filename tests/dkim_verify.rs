//! Independent verification of mailwarden's DKIM signatures (R6): messages signed by the
//! streaming signer, fed the way the milter feeds it (header block, then the body in small
//! chunks), verify with dkimpy and with OpenDKIM, for RSA-2048 and Ed25519 keys from
//! `mailwarden dkim keygen` and from OpenSSL. Broken messages must fail in both, which
//! shows the verifiers really check.
//!
//! Needs the Debian packages `python3-dkim`, `python3-nacl` and `opendkim` (`.ci/run`).

mod common;

use common::dkim::{self as verify, Records, assemble};
use mailwarden::config::{Config, DkimAlgorithm};
use mailwarden::dkim::{KeyRing, MessageSigner, signer::append_header};
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

struct Case {
    name: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn h(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

fn basic_headers(subject: &str) -> Vec<(String, String)> {
    vec![
        h("From", " Champa S. <champa@mpt.gov.la>"),
        h("To", " Somsak <somsak@mof.gov.la>"),
        h("Subject", &format!(" {subject}")),
        h("Date", " Mon, 1 Jun 2026 09:00:00 +0700"),
        h("Message-ID", &format!(" <{subject}@mpt.gov.la>")),
    ]
}

fn cases() -> Vec<Case> {
    let mut many = Vec::new();
    for i in 0..40 {
        many.push(h(
            "Received",
            &format!(" from relay{i}.mpt.gov.la (relay{i} [192.0.2.{i}])\n\tby mx.mpt.gov.la; Mon, 1 Jun 2026 09:00:{i:02} +0700"),
        ));
    }
    many.extend(basic_headers("many-headers"));
    for i in 0..200 {
        many.push(h(&format!("X-Custom-{i}"), &format!(" value {i}")));
    }
    let to: Vec<String> = (0..40).map(|i| format!("user{i}@mof.gov.la")).collect();
    many.push(h("Cc", &format!(" {}", to.join(",\n\t"))));
    many.push(h("Subject", "   lots   of \t space   \t"));
    many.push(h("X-Empty", ""));

    let mut eight_bit = basic_headers("eight-bit");
    eight_bit[2] = h("Subject", " ກອງປະຊຸມ ວັນຈັນ — réunion");
    let mut eight_bit_body = "ສະບາຍດີ ທ່ານ\r\nCafé crème\r\n".as_bytes().to_vec();
    eight_bit_body.extend_from_slice(b"latin-1 \xe9\xe8 raw bytes\r\n");

    let long_line = "x".repeat(5000);
    let mut long_headers = basic_headers("long-lines");
    long_headers.push(h(
        "X-Long",
        &format!(" {}\n\t{}", "a".repeat(900), "b".repeat(900)),
    ));

    let multipart = "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n.\r\n..dots\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b1--\r\n";
    let mut mp_headers = basic_headers("multipart");
    mp_headers.push(h("MIME-Version", " 1.0"));
    mp_headers.push(h("Content-Type", " multipart/mixed;\n\tboundary=\"b1\""));

    vec![
        Case {
            name: "plain",
            headers: basic_headers("plain"),
            body: b"Hello,\r\n\r\nThe meeting is at nine.\r\n".to_vec(),
        },
        Case {
            name: "long-lines",
            headers: long_headers,
            body: format!("{long_line}\r\nshort\r\n{long_line} \t \r\n").into_bytes(),
        },
        Case {
            name: "8-bit",
            headers: eight_bit,
            body: eight_bit_body,
        },
        Case {
            name: "many-headers",
            headers: many,
            body: b"body\r\n".to_vec(),
        },
        Case {
            name: "empty-body",
            headers: basic_headers("empty-body"),
            body: Vec::new(),
        },
        Case {
            name: "only-empty-lines",
            headers: basic_headers("only-empty-lines"),
            body: b"\r\n\r\n\r\n".to_vec(),
        },
        Case {
            name: "trailing-whitespace-lines",
            headers: basic_headers("trailing-whitespace-lines"),
            body: b"text  \r\n \r\n\t\r\n   \t \r\n".to_vec(),
        },
        Case {
            name: "multipart",
            headers: mp_headers,
            body: multipart.as_bytes().to_vec(),
        },
    ]
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dkim")
        .join(name)
}

/// Keys to test: keygen's RSA and Ed25519, OpenSSL's PKCS#1 RSA and PKCS#8 v1 Ed25519.
/// Returns the loaded ring and the records verifiers may look up.
fn keys(dir: &Path) -> (Arc<KeyRing>, Records) {
    let mut records = Records::default();
    let mut entries = String::new();
    for (sel, alg) in [
        ("gen-rsa", DkimAlgorithm::RsaSha256),
        ("gen-ed", DkimAlgorithm::Ed25519Sha256),
    ] {
        let g = mailwarden::dkim::keygen::keygen("mpt.gov.la", sel, alg, dir).unwrap();
        // The record exactly as keygen prints it is what the verifiers get.
        records.add_zone_line(&g.dns_record);
        entries.push_str(&g.config_entry);
    }
    for (sel, alg, file) in [
        ("ossl-rsa", "rsa-sha256", "rsa2048-pkcs1.pem"),
        ("ossl-ed", "ed25519-sha256", "ed25519-pkcs8v1.pem"),
    ] {
        entries.push_str(&format!(
            "[[dkim.keys]]\ndomain = \"mpt.gov.la\"\nselector = \"{sel}\"\nalgorithm = \"{alg}\"\nkey_file = \"{}\"\n",
            fixture(file).display()
        ));
    }
    let config = Config::from_toml(&entries).expect("key config loads");
    let ring = config.dkim.keyring.clone();
    for k in ring
        .keys()
        .iter()
        .filter(|k| k.selector.starts_with("ossl"))
    {
        records.add_zone_line(&k.dns_record());
    }
    assert_eq!(ring.keys().len(), 4);
    (ring, records)
}

fn header_block(headers: &[(String, String)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in headers {
        append_header(&mut block, n.as_bytes(), v.as_bytes());
    }
    block
}

/// Signs like the milter: header block first, then the body in 7-byte chunks; returns the
/// message as delivered (signatures on top).
fn sign(ring: &KeyRing, which: &[usize], case: &Case) -> Vec<u8> {
    let keys: Vec<_> = which.iter().map(|&i| ring.keys()[i].clone()).collect();
    let block = header_block(&case.headers);
    let mut signer = MessageSigner::new(&keys, &block);
    for chunk in case.body.chunks(7) {
        signer.body(chunk);
    }
    let inserted: Vec<(String, String)> = signer
        .finish()
        .unwrap()
        .iter()
        .map(|s| {
            (
                "DKIM-Signature".to_owned(),
                format!(" {}", s.milter_value()),
            )
        })
        .collect();
    assemble(&inserted, &block, &case.body)
}

#[test]
fn every_case_and_key_verifies_with_dkimpy_and_opendkim() {
    let dir = tempfile::tempdir().unwrap();
    let (ring, records) = keys(dir.path());
    let cases = cases();
    let mut labels = Vec::new();
    let mut messages = Vec::new();
    for case in &cases {
        for (i, k) in ring.keys().iter().enumerate() {
            labels.push(format!(
                "{} / {} ({})",
                case.name,
                k.selector,
                k.algorithm.as_str()
            ));
            messages.push(sign(&ring, &[i], case));
        }
    }
    let py = verify::dkimpy(&messages, &records);
    let od = verify::opendkim(&messages, &records);
    let mut failures = Vec::new();
    eprintln!("{:<50} {:>7} {:>9}", "message / key", "dkimpy", "opendkim");
    for ((label, py), od) in labels.iter().zip(&py).zip(&od) {
        let py_ok = py == &[true];
        eprintln!("{label:<50} {:>7} {:>9}", ok(py_ok), ok(*od));
        if !py_ok || !od {
            failures.push(label.clone());
        }
    }
    assert!(failures.is_empty(), "not verified: {failures:#?}");
}

fn ok(b: bool) -> &'static str {
    if b { "pass" } else { "FAIL" }
}

#[test]
fn dual_signature_rsa_and_ed25519_both_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ring, records) = keys(dir.path());
    let cases = cases();
    let messages: Vec<Vec<u8>> = cases.iter().map(|c| sign(&ring, &[0, 1], c)).collect();
    let py = verify::dkimpy(&messages, &records);
    for (case, r) in cases.iter().zip(&py) {
        assert_eq!(r, &[true, true], "{}: both signatures verify", case.name);
    }
    // OpenDKIM reports on one signature per message; it must be a pass.
    let od = verify::opendkim(&messages, &records);
    assert!(od.iter().all(|ok| *ok), "{od:?}");
}

#[test]
fn altered_messages_fail_in_both_verifiers() {
    let dir = tempfile::tempdir().unwrap();
    let (ring, records) = keys(dir.path());
    let case = &cases()[0];
    let mut broken = Vec::new();
    for key in [0, 1] {
        let good = String::from_utf8(sign(&ring, &[key], case)).unwrap();
        // Body changed in transit.
        broken.push(good.replace("nine", "ten").into_bytes());
        // A signed header changed.
        broken.push(
            good.replace("Subject: plain", "Subject: p1ain")
                .into_bytes(),
        );
        // A second From added above the signed one: over-signing makes this fail.
        let at = good.find("From:").unwrap();
        let mut forged = good.clone();
        forged.insert_str(at, "From: ceo@mpt.gov.la\r\n");
        broken.push(forged.into_bytes());
    }
    let py = verify::dkimpy(&broken, &records);
    assert!(
        py.iter().all(|r| r == &[false]),
        "dkimpy accepted an altered message: {py:?}"
    );
    let od = verify::opendkim(&broken, &records);
    assert!(
        od.iter().all(|ok| !ok),
        "opendkim accepted an altered message: {od:?}"
    );
}
