use super::*;
use crate::config::{DkimAlgorithm, DkimConfig, DkimKeyConfig};
use crate::dkim::KeyRing;
use aws_lc_rs::digest;
use base64::Engine as _;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// RFC 8463 Appendix A: the Ed25519 test key (seed and public key).
const RFC8463_SEED: &str = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=";
const RFC8463_PUBLIC: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
/// RFC 8463 Appendix A.3: the body hash of the example message (relaxed/relaxed).
const RFC8463_BH: &str = "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=";
const RFC8463_HEADERS: &str = "From: Joe SixPack <joe@football.example.com>\r\n\
To: Suzie Q <suzie@shopping.example.net>\r\n\
Subject: Is dinner ready?\r\n\
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n\
Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n";
const RFC8463_BODY: &str = "Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n";

/// The RFC 8463 key as a PKCS#8 v1 PEM file (RFC 8410 structure around the seed).
fn rfc8463_key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend(B64.decode(RFC8463_SEED).unwrap());
    let path = dir.join("rfc8463.pem");
    std::fs::write(&path, pem::encode(&pem::Pem::new("PRIVATE KEY", der))).unwrap();
    path
}

fn ring(keys: &[(&str, &str, DkimAlgorithm, std::path::PathBuf)]) -> KeyRing {
    let config = DkimConfig {
        keys: keys
            .iter()
            .map(|(d, s, a, f)| DkimKeyConfig {
                domain: d.to_string(),
                selector: s.to_string(),
                algorithm: *a,
                key_file: f.clone(),
            })
            .collect(),
        ..DkimConfig::default()
    };
    KeyRing::load(&config).unwrap()
}

fn rsa_fixture() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dkim/rsa2048-pkcs1.pem")
}

/// The value of tag `tag` in a DKIM-Signature header, whitespace removed.
fn tag(header: &str, tag: &str) -> String {
    let v = header.split_once(':').unwrap().1;
    v.split(';')
        .map(|t| t.split_whitespace().collect::<String>())
        .find_map(|t| t.strip_prefix(&format!("{tag}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {tag}= in {header}"))
}

fn sign(ring: &KeyRing, headers: &str, body_chunks: &[&[u8]]) -> Vec<Signed> {
    let mut s = MessageSigner::new(ring.keys(), headers.as_bytes());
    for c in body_chunks {
        s.body(c);
    }
    s.finish().unwrap()
}

fn sha256_b64(data: &[u8]) -> String {
    B64.encode(digest::digest(&digest::SHA256, data))
}

#[test]
fn rfc8463_example_body_hash_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ring(&[(
        "football.example.com",
        "brisbane",
        DkimAlgorithm::Ed25519Sha256,
        rfc8463_key_file(dir.path()),
    )]);
    assert_eq!(ring.keys()[0].public_key_b64, RFC8463_PUBLIC);
    let sigs = sign(&ring, RFC8463_HEADERS, &[RFC8463_BODY.as_bytes()]);
    assert_eq!(sigs.len(), 1);
    let h = &sigs[0].header;
    assert!(
        h.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
        "{h}"
    );
    assert_eq!(tag(h, "bh"), RFC8463_BH);
    assert_eq!(tag(h, "d"), "football.example.com");
    assert_eq!(tag(h, "s"), "brisbane");
    assert_eq!(tag(h, "c"), "relaxed/relaxed");
    // Every present header in the list is signed, From once more (over-signed), absent
    // listed ones too, so none can be added later.
    let signed: Vec<String> = tag(h, "h")
        .split(':')
        .map(|s| s.to_ascii_lowercase())
        .collect();
    assert_eq!(
        signed.iter().filter(|s| *s == "from").count(),
        2,
        "{signed:?}"
    );
    for name in ["to", "subject", "date", "message-id"] {
        assert!(
            signed.contains(&name.to_string()),
            "{name} signed: {signed:?}"
        );
    }
    // Ed25519 signatures are 64 bytes.
    assert_eq!(B64.decode(tag(h, "b")).unwrap().len(), 64);
}

#[test]
fn body_hash_is_the_same_at_every_chunk_split() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ring(&[(
        "football.example.com",
        "brisbane",
        DkimAlgorithm::Ed25519Sha256,
        rfc8463_key_file(dir.path()),
    )]);
    let body = RFC8463_BODY.as_bytes();
    for split in 0..=body.len() {
        let (a, b) = body.split_at(split);
        let sigs = sign(&ring, RFC8463_HEADERS, &[a, b]);
        assert_eq!(tag(&sigs[0].header, "bh"), RFC8463_BH, "split at {split}");
    }
}

#[test]
fn relaxed_body_canonicalisation_cases() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ring(&[(
        "mpt.gov.la",
        "e",
        DkimAlgorithm::Ed25519Sha256,
        rfc8463_key_file(dir.path()),
    )]);
    let headers = "From: a@mpt.gov.la\r\n";
    for (body, canonical) in [
        // RFC 6376 §3.4.6 example: trailing WSP removed, WSP runs reduced, trailing empty
        // lines dropped.
        (&b" C \r\nD \t E\r\n\r\n\r\n"[..], &b" C\r\nD E\r\n"[..]),
        // Empty body: the empty string (relaxed).
        (b"", b""),
        // Whitespace-only lines at the end are empty lines, and go (mail-auth < 0.15 got
        // this wrong).
        (b"text\r\n \r\n\t\r\n  \t \r\n", b"text\r\n"),
        // A body without a final CRLF gets one.
        (b"no newline", b"no newline\r\n"),
        // 8-bit bytes are hashed as they are.
        (
            "Sabaidee ສະບາຍດີ\r\n\u{e9}t\u{e9}\r\n".as_bytes(),
            "Sabaidee ສະບາຍດີ\r\n\u{e9}t\u{e9}\r\n".as_bytes(),
        ),
    ] {
        let sigs = sign(&ring, headers, &[body]);
        assert_eq!(
            tag(&sigs[0].header, "bh"),
            sha256_b64(canonical),
            "body {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn dual_signing_gives_one_signature_per_key_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ring(&[
        (
            "mpt.gov.la",
            "rsa2026",
            DkimAlgorithm::RsaSha256,
            rsa_fixture(),
        ),
        (
            "mpt.gov.la",
            "ed2026",
            DkimAlgorithm::Ed25519Sha256,
            rfc8463_key_file(dir.path()),
        ),
    ]);
    let sigs = sign(
        &ring,
        "From: a@mpt.gov.la\r\nSubject: x\r\n",
        &[b"hello\r\n"],
    );
    assert_eq!(sigs.len(), 2);
    assert_eq!(
        (sigs[0].selector.as_str(), sigs[0].algorithm),
        ("rsa2026", DkimAlgorithm::RsaSha256)
    );
    assert_eq!(
        (sigs[1].selector.as_str(), sigs[1].algorithm),
        ("ed2026", DkimAlgorithm::Ed25519Sha256)
    );
    assert!(sigs[0].header.contains("a=rsa-sha256"));
    assert_eq!(
        B64.decode(tag(&sigs[0].header, "b")).unwrap().len(),
        256,
        "RSA-2048 signature"
    );
    assert_eq!(tag(&sigs[0].header, "bh"), tag(&sigs[1].header, "bh"));
}

#[test]
fn expiration_sets_x_after_t() {
    let dir = tempfile::tempdir().unwrap();
    let config = DkimConfig {
        keys: vec![DkimKeyConfig {
            domain: "mpt.gov.la".into(),
            selector: "e".into(),
            algorithm: DkimAlgorithm::Ed25519Sha256,
            key_file: rfc8463_key_file(dir.path()),
        }],
        expiration: Some(std::time::Duration::from_secs(7 * 86400)),
        ..DkimConfig::default()
    };
    let ring = KeyRing::load(&config).unwrap();
    let sigs = sign(&ring, "From: a@mpt.gov.la\r\n", &[b"x\r\n"]);
    let t: u64 = tag(&sigs[0].header, "t").parse().unwrap();
    let x: u64 = tag(&sigs[0].header, "x").parse().unwrap();
    assert_eq!(x - t, 7 * 86400);
}

#[test]
fn milter_value_is_lf_folded_without_the_name() {
    let s = Signed {
        domain: "d".into(),
        selector: "s".into(),
        algorithm: DkimAlgorithm::RsaSha256,
        header: "DKIM-Signature: v=1; a=rsa-sha256;\r\n\th=from;\r\n\tb=abc;\r\n".into(),
    };
    assert_eq!(s.milter_value(), "v=1; a=rsa-sha256;\n\th=from;\n\tb=abc;");
}

#[test]
fn headers_from_the_milter_become_wire_form() {
    let mut block = Vec::new();
    append_header(&mut block, b"Subject", b" one\n\ttwo");
    append_header(&mut block, b"X-Already-Crlf", b" a\r\n b");
    assert_eq!(
        block,
        b"Subject: one\r\n\ttwo\r\nX-Already-Crlf: a\r\n b\r\n"
    );
}
