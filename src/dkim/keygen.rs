//! `mailwarden dkim keygen`: a new private key file (mode 0600, never overwriting) and the
//! DNS TXT record that publishes its public half.

use super::keys::dns_record;
use crate::config::DkimAlgorithm;
use aws_lc_rs::{
    encoding::{AsDer, Pkcs8V1Der, Pkcs8V2Der, PublicKeyX509Der},
    rsa::KeySize,
    signature::{Ed25519KeyPair, KeyPair as _},
};
use base64::Engine as _;
use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{0:?} is not a domain name")]
    Domain(String),
    #[error("{0:?} is not a selector (letters, digits, '-', '.')")]
    Selector(String),
    #[error(
        "{path} already exists; remove it or choose another selector (keys are never overwritten)"
    )]
    Exists { path: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key generation failed: {0}")]
    Crypto(String),
}

/// A generated key: where it was written and what to publish.
#[derive(Debug)]
pub struct Generated {
    pub key_file: PathBuf,
    /// `SELECTOR._domainkey.DOMAIN. IN TXT ( "v=DKIM1; k=...; p=..." )`
    pub dns_record: String,
    /// The `[[dkim.keys]]` entry for the config file.
    pub config_entry: String,
}

fn label_ok(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// Generates a key for `domain`/`selector` and writes it to `DIR/DOMAIN.SELECTOR.pem`.
/// RSA keys are 2048 bits (PKCS#8); Ed25519 keys are PKCS#8 v2 (with the public key).
pub fn keygen(
    domain: &str,
    selector: &str,
    algorithm: DkimAlgorithm,
    out_dir: &Path,
) -> Result<Generated, KeygenError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        return Err(KeygenError::Domain(domain));
    }
    if !selector.split('.').all(label_ok) {
        return Err(KeygenError::Selector(selector.into()));
    }
    let crypto = |e: aws_lc_rs::error::Unspecified| KeygenError::Crypto(e.to_string());
    let (pkcs8, public): (Vec<u8>, Vec<u8>) = match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).map_err(crypto)?;
            let der: Pkcs8V1Der<'static> = kp.as_der().map_err(crypto)?;
            let spki: PublicKeyX509Der<'static> = kp.public_key().as_der().map_err(crypto)?;
            (der.as_ref().to_vec(), spki.as_ref().to_vec())
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let kp = Ed25519KeyPair::generate().map_err(crypto)?;
            let der: Pkcs8V2Der<'static> = kp.as_der().map_err(crypto)?;
            (der.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
        }
    };
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8));
    let key_file = out_dir.join(format!("{domain}.{selector}.pem"));
    let path = key_file.display().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_file)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeygenError::Exists { path: path.clone() },
            _ => KeygenError::Write {
                path: path.clone(),
                source,
            },
        })?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| KeygenError::Write {
            path: path.clone(),
            source,
        })?;
    let p = base64::engine::general_purpose::STANDARD.encode(public);
    Ok(Generated {
        dns_record: dns_record(selector, &domain, algorithm, &p),
        config_entry: format!(
            "[[dkim.keys]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{}\"\nkey_file = \"{}\"\n",
            algorithm.as_str(),
            key_file.display()
        ),
        key_file,
    })
}
