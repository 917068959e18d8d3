//! DKIM signing keys: read from PEM files at start and on every reload, checked (algorithm,
//! RSA size), and kept in a [`KeyRing`] that lives in the config snapshot.
//!
//! A key that cannot be used is a configuration error naming its `dkim.keys[N]` entry; a
//! config with such an error is never swapped in, so a failed reload keeps the old keys.

use crate::config::{ConfigError, DkimAlgorithm, DkimConfig};
use aws_lc_rs::{
    encoding::{AsDer, PublicKeyX509Der},
    signature::{Ed25519KeyPair, KeyPair as _},
};
use base64::Engine as _;
use mail_auth::{
    crypto::{DkimKey, Ed25519Key, RsaKey, Sha256},
    dkim::{Canonicalization, DkimSigner},
    signer::Ready,
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use std::{fmt, path::Path, sync::Arc};

/// Smallest RSA modulus accepted (RFC 8301 §3.2 recommends 2048; the decision's key policy
/// asks for RSA-2048 or Ed25519).
pub const MIN_RSA_BITS: usize = 2048;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} holds no PEM private key (expected PKCS#8 \"PRIVATE KEY\" or, for RSA, PKCS#1 \"RSA PRIVATE KEY\")"
    )]
    NotPem { path: String },
    #[error("{path} holds {found}, but algorithm is {expected}")]
    WrongAlgorithm {
        path: String,
        found: String,
        expected: &'static str,
    },
    #[error("{path} holds an RSA key shorter than {MIN_RSA_BITS} bits{bits}; generate a 2048-bit key (mailwarden dkim keygen)", bits = .bits.map(|b| format!(" ({b} bits)")).unwrap_or_default())]
    RsaTooShort { path: String, bits: Option<usize> },
    #[error("{path}: the key cannot be used for signing: {reason}")]
    Unusable { path: String, reason: String },
}

/// What a private key file turned out to hold.
enum Material {
    Rsa {
        der: PrivateKeyDer<'static>,
        bits: usize,
        public_spki: Vec<u8>,
    },
    Ed25519 {
        pkcs8: Vec<u8>,
        public: Vec<u8>,
    },
}

/// Reads and checks one key file for `algorithm`.
fn read_key(path: &Path, algorithm: DkimAlgorithm) -> Result<Material, KeyError> {
    let p = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        path: p.clone(),
        source,
    })?;
    let der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|_| KeyError::NotPem { path: p.clone() })?;
    let material = classify(&p, der)?;
    let found = match &material {
        Material::Rsa { .. } => DkimAlgorithm::RsaSha256,
        Material::Ed25519 { .. } => DkimAlgorithm::Ed25519Sha256,
    };
    if found != algorithm {
        return Err(KeyError::WrongAlgorithm {
            path: p,
            found: found.key_kind().into(),
            expected: algorithm.as_str(),
        });
    }
    Ok(material)
}

fn too_small(e: &aws_lc_rs::error::KeyRejected) -> bool {
    e.to_string().contains("TooSmall")
}

/// Tells RSA from Ed25519 by trying each parser.
fn classify(path: &str, der: PrivateKeyDer<'static>) -> Result<Material, KeyError> {
    let rsa = match &der {
        PrivateKeyDer::Pkcs1(k) => Some(aws_lc_rs::rsa::KeyPair::from_der(k.secret_pkcs1_der())),
        PrivateKeyDer::Pkcs8(k) => {
            match aws_lc_rs::rsa::KeyPair::from_pkcs8(k.secret_pkcs8_der()) {
                Ok(kp) => Some(Ok(kp)),
                Err(e) if too_small(&e) => Some(Err(e)),
                Err(_) => None,
            }
        }
        PrivateKeyDer::Sec1(_) => {
            return Err(KeyError::WrongAlgorithm {
                path: path.into(),
                found: "an EC (SEC1) key, which DKIM does not use".into(),
                expected: "rsa-sha256 or ed25519-sha256",
            });
        }
        _ => None,
    };
    match rsa {
        Some(Ok(kp)) => {
            let bits = kp.public_modulus_len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(KeyError::RsaTooShort {
                    path: path.into(),
                    bits: Some(bits),
                });
            }
            let public_spki = kp
                .public_key()
                .as_der()
                .map(|d: PublicKeyX509Der<'static>| d.as_ref().to_vec())
                .map_err(|e| KeyError::Unusable {
                    path: path.into(),
                    reason: e.to_string(),
                })?;
            return Ok(Material::Rsa {
                der,
                bits,
                public_spki,
            });
        }
        Some(Err(e)) if too_small(&e) => {
            return Err(KeyError::RsaTooShort {
                path: path.into(),
                bits: None,
            });
        }
        Some(Err(e)) => {
            return Err(KeyError::Unusable {
                path: path.into(),
                reason: format!("not a valid RSA private key ({e})"),
            });
        }
        None => {}
    }
    if let PrivateKeyDer::Pkcs8(k) = &der {
        // PKCS#8 v1 (OpenSSL's `genpkey -algorithm ED25519`) carries no public key to
        // cross-check; v2 (what keygen writes) is checked.
        if let Ok(kp) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(k.secret_pkcs8_der()) {
            return Ok(Material::Ed25519 {
                pkcs8: k.secret_pkcs8_der().to_vec(),
                public: kp.public_key().as_ref().to_vec(),
            });
        }
    }
    Err(KeyError::Unusable {
        path: path.into(),
        reason: "neither an RSA nor an Ed25519 private key".into(),
    })
}

/// One configured key, ready to sign: its signer carries domain, selector, header list,
/// canonicalisation (relaxed/relaxed) and expiry.
pub struct SigningKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// RSA modulus size; 256 for Ed25519 (for logs).
    pub bits: usize,
    /// The `p=` value of the DNS record matching this key.
    pub public_key_b64: String,
    pub(crate) signer: DkimSigner<DkimKey, Ready>,
}

impl SigningKey {
    /// The DNS TXT record that publishes this key.
    pub fn dns_record(&self) -> String {
        dns_record(
            &self.selector,
            &self.domain,
            self.algorithm,
            &self.public_key_b64,
        )
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("SigningKey")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field("bits", &self.bits)
            .finish()
    }
}

/// `SELECTOR._domainkey.DOMAIN IN TXT "v=DKIM1; k=...; p=..."`, split into 255-byte
/// strings as DNS TXT records need.
pub fn dns_record(selector: &str, domain: &str, algorithm: DkimAlgorithm, p: &str) -> String {
    let k = match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed25519",
    };
    let value = format!("v=DKIM1; k={k}; p={p}");
    let parts: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        parts.join(" ")
    )
}

/// Every configured key, loaded. Cheap to share; a reload builds a new one.
#[derive(Default)]
pub struct KeyRing {
    keys: Vec<Arc<SigningKey>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.iter()).finish()
    }
}

impl KeyRing {
    /// Loads every `[[dkim.keys]]` entry; every failure is reported with its key.
    pub fn load(config: &DkimConfig) -> Result<KeyRing, Vec<ConfigError>> {
        let mut keys = Vec::new();
        let mut errors = Vec::new();
        for (i, k) in config.keys.iter().enumerate() {
            match read_key(&k.key_file, k.algorithm) {
                Ok(material) => {
                    match build(config, &k.domain, &k.selector, k.algorithm, material) {
                        Ok(key) => keys.push(Arc::new(key)),
                        Err(e) => errors.push(key_error(i, e)),
                    }
                }
                Err(e) => errors.push(key_error(i, e)),
            }
        }
        if errors.is_empty() {
            Ok(KeyRing { keys })
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[Arc<SigningKey>] {
        &self.keys
    }
}

fn key_error(i: usize, e: KeyError) -> ConfigError {
    ConfigError {
        key: format!("dkim.keys[{i}].key_file"),
        reason: e.to_string(),
    }
}

fn build(
    config: &DkimConfig,
    domain: &str,
    selector: &str,
    algorithm: DkimAlgorithm,
    material: Material,
) -> Result<SigningKey, KeyError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let unusable = |e: mail_auth::Error| KeyError::Unusable {
        path: format!("{selector}._domainkey.{domain}"),
        reason: e.to_string(),
    };
    let (key, bits, public): (DkimKey, usize, Vec<u8>) = match material {
        Material::Rsa {
            der,
            bits,
            public_spki,
        } => (
            RsaKey::<Sha256>::from_key_der(der)
                .map_err(unusable)?
                .into(),
            bits,
            public_spki,
        ),
        Material::Ed25519 { pkcs8, public } => (
            Ed25519Key::from_pkcs8_maybe_unchecked_der(&pkcs8)
                .map_err(unusable)?
                .into(),
            256,
            public,
        ),
    };
    let mut signer = DkimSigner::from_key(key)
        .domain(domain.to_ascii_lowercase())
        .selector(selector)
        .headers(config.signed_header_list())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    if let Some(x) = config.expiration {
        signer = signer.expiration(x);
    }
    Ok(SigningKey {
        domain: domain.to_ascii_lowercase(),
        selector: selector.to_owned(),
        algorithm,
        bits,
        public_key_b64: b64.encode(public),
        signer,
    })
}

#[cfg(test)]
mod tests;
