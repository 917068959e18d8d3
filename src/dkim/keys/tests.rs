use super::*;
use crate::config::{Config, DkimKeyConfig};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dkim")
        .join(name)
}

fn key(domain: &str, selector: &str, algorithm: DkimAlgorithm, file: PathBuf) -> DkimKeyConfig {
    DkimKeyConfig {
        domain: domain.into(),
        selector: selector.into(),
        algorithm,
        key_file: file,
    }
}

fn config(keys: Vec<DkimKeyConfig>) -> DkimConfig {
    DkimConfig {
        keys,
        ..DkimConfig::default()
    }
}

#[test]
fn openssl_pkcs1_rsa_and_pkcs8v1_ed25519_load() {
    let ring = KeyRing::load(&config(vec![
        key(
            "mpt.gov.la",
            "rsa1",
            DkimAlgorithm::RsaSha256,
            fixture("rsa2048-pkcs1.pem"),
        ),
        key(
            "MPT.gov.la",
            "ed1",
            DkimAlgorithm::Ed25519Sha256,
            fixture("ed25519-pkcs8v1.pem"),
        ),
    ]))
    .unwrap();
    let keys = ring.keys();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].bits, 2048);
    assert_eq!(keys[0].algorithm, DkimAlgorithm::RsaSha256);
    assert_eq!(keys[1].domain, "mpt.gov.la", "domains are lower-cased");
    assert_eq!(keys[1].algorithm, DkimAlgorithm::Ed25519Sha256);
    // The DNS record carries the public key: SPKI for RSA (294 bytes for 2048 bits), the
    // raw 32 bytes for Ed25519 (RFC 8463 §4.2).
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(b64.decode(&keys[0].public_key_b64).unwrap().len(), 294);
    assert_eq!(b64.decode(&keys[1].public_key_b64).unwrap().len(), 32);
    assert!(
        keys[1]
            .dns_record()
            .starts_with("ed1._domainkey.mpt.gov.la. IN TXT")
    );
    assert!(keys[1].dns_record().contains("k=ed25519; p="));
    // Debug never shows key material.
    assert!(!format!("{ring:?}").contains(&keys[0].public_key_b64[..20]));
}

#[test]
fn every_bad_key_is_reported_by_its_entry() {
    let errs = KeyRing::load(&config(vec![
        // 0: fine
        key(
            "mpt.gov.la",
            "ok",
            DkimAlgorithm::RsaSha256,
            fixture("rsa2048-pkcs1.pem"),
        ),
        // 1: missing file
        key(
            "mpt.gov.la",
            "gone",
            DkimAlgorithm::RsaSha256,
            fixture("does-not-exist.pem"),
        ),
        // 2: an Ed25519 key declared as RSA
        key(
            "mpt.gov.la",
            "wrong",
            DkimAlgorithm::RsaSha256,
            fixture("ed25519-pkcs8v1.pem"),
        ),
        // 3: RSA-1024
        key(
            "mpt.gov.la",
            "short",
            DkimAlgorithm::RsaSha256,
            fixture("rsa1024-pkcs8.pem"),
        ),
        // 4: an EC key
        key(
            "mpt.gov.la",
            "ec",
            DkimAlgorithm::Ed25519Sha256,
            fixture("ec-p256-sec1.pem"),
        ),
        // 5: not PEM at all
        key(
            "mpt.gov.la",
            "text",
            DkimAlgorithm::Ed25519Sha256,
            fixture("README.md"),
        ),
        // 6: an RSA key declared as Ed25519
        key(
            "mpt.gov.la",
            "wrong2",
            DkimAlgorithm::Ed25519Sha256,
            fixture("rsa2048-pkcs1.pem"),
        ),
    ]))
    .unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "dkim.keys[1].key_file",
            "dkim.keys[2].key_file",
            "dkim.keys[3].key_file",
            "dkim.keys[4].key_file",
            "dkim.keys[5].key_file",
            "dkim.keys[6].key_file",
        ]
    );
    assert!(errs[0].reason.contains("cannot read"), "{}", errs[0].reason);
    assert!(
        errs[0].reason.contains("does-not-exist.pem"),
        "{}",
        errs[0].reason
    );
    assert!(
        errs[1]
            .reason
            .contains("an Ed25519 key, but algorithm is rsa-sha256"),
        "{}",
        errs[1].reason
    );
    assert!(
        errs[2].reason.contains("shorter than 2048 bits"),
        "{}",
        errs[2].reason
    );
    assert!(errs[3].reason.contains("EC (SEC1)"), "{}", errs[3].reason);
    assert!(
        errs[4].reason.contains("no PEM private key"),
        "{}",
        errs[4].reason
    );
    assert!(
        errs[5]
            .reason
            .contains("an RSA key, but algorithm is ed25519-sha256"),
        "{}",
        errs[5].reason
    );
}

#[test]
fn keygen_output_loads_and_matches_its_dns_record() {
    let dir = tempfile::tempdir().unwrap();
    for (alg, sel) in [
        (DkimAlgorithm::RsaSha256, "r2026"),
        (DkimAlgorithm::Ed25519Sha256, "e2026"),
    ] {
        let g = crate::dkim::keygen::keygen("MPT.gov.la", sel, alg, dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&g.key_file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "private key readable by its owner only"
        );
        let ring = KeyRing::load(&config(vec![key(
            "mpt.gov.la",
            sel,
            alg,
            g.key_file.clone(),
        )]))
        .unwrap();
        let k = &ring.keys()[0];
        assert_eq!(g.dns_record, k.dns_record());
        assert!(
            g.dns_record
                .starts_with(&format!("{sel}._domainkey.mpt.gov.la. IN TXT"))
        );
        // The printed config entry is valid config.
        let c = Config::from_toml(&g.config_entry).unwrap();
        assert_eq!(c.dkim.keyring.keys().len(), 1);
        // Never overwrites.
        let again = crate::dkim::keygen::keygen("mpt.gov.la", sel, alg, dir.path());
        assert!(matches!(
            again,
            Err(crate::dkim::keygen::KeygenError::Exists { .. })
        ));
    }
}

#[test]
fn long_records_are_split_into_255_byte_strings() {
    let p = "A".repeat(600);
    let r = dns_record("s", "mpt.gov.la", DkimAlgorithm::RsaSha256, &p);
    let strings: Vec<&str> = r.split('"').skip(1).step_by(2).collect();
    assert_eq!(strings.len(), 3);
    assert!(strings.iter().all(|s| s.len() <= 255));
    assert_eq!(strings.concat(), format!("v=DKIM1; k=rsa; p={p}"));
}
