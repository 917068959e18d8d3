//! `[dkim]`: signing keys per domain, headers to sign, expiry, which clients count as
//! internal (R6).

use super::ConfigError;
use crate::dkim::KeyRing;
use ipnet::IpNet;
use serde::Deserialize;
use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

/// Headers signed by default: RFC 6376 §5.4.1's list plus the MIME headers that decide how
/// the body is shown and the message's identity (`Message-ID`).
pub const DEFAULT_SIGN_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
];

/// Headers over-signed by default: a copy added after signing (a second `From:`) breaks the
/// signature instead of being shown to the reader (RFC 6376 §8.15).
pub const DEFAULT_OVERSIGN_HEADERS: &[&str] =
    &["From", "Sender", "Reply-To", "Subject", "Date", "To", "Cc"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

impl DkimAlgorithm {
    /// The `a=` name, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    /// What kind of key file this algorithm needs, in words.
    pub fn key_kind(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "an RSA key",
            DkimAlgorithm::Ed25519Sha256 => "an Ed25519 key",
        }
    }
}

/// One signing key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// Signing domain (`d=`): an organisation domain, e.g. `mpt.gov.la`.
    pub domain: String,
    /// Selector (`s=`): the key is published at `SELECTOR._domainkey.DOMAIN`.
    pub selector: String,
    /// `rsa-sha256` (RSA, at least 2048 bits) or `ed25519-sha256` (RFC 8463).
    pub algorithm: DkimAlgorithm,
    /// PEM private key: PKCS#8 (`PRIVATE KEY`) or, for RSA, PKCS#1 (`RSA PRIVATE KEY`).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Signing keys. Several keys for one domain are all used (dual signing: RSA + Ed25519,
    /// or old + new selector during a rotation). No keys at all: R6 is off.
    pub keys: Vec<DkimKeyConfig>,
    /// Header fields to sign (`h=`); must include `From`.
    pub sign_headers: Vec<String>,
    /// Header fields listed once more than they occur, so none can be added after signing.
    pub oversign_headers: Vec<String>,
    /// Signature lifetime (`x=` = signing time + this); none by default.
    #[serde(with = "optional_duration")]
    pub expiration: Option<Duration>,
    /// Clients whose mail from a local domain is signed without SMTP authentication (the
    /// organisations' own mail servers, webmail hosts). CIDR notation.
    pub internal_networks: Vec<IpNet>,
    /// The loaded keys (filled by `Config::from_toml`; never read from the file).
    #[serde(skip)]
    pub keyring: Arc<KeyRing>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            keys: Vec::new(),
            sign_headers: DEFAULT_SIGN_HEADERS.iter().map(|s| s.to_string()).collect(),
            oversign_headers: DEFAULT_OVERSIGN_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            expiration: None,
            internal_networks: Vec::new(),
            keyring: Arc::default(),
        }
    }
}

impl DkimConfig {
    /// R6 is in force when at least one key is configured.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// `h=` as handed to the signer: each signed header once (the signer signs every
    /// occurrence), then each over-signed one again (never found, so listed once more).
    pub fn signed_header_list(&self) -> Vec<String> {
        let mut list: Vec<String> = Vec::new();
        for h in &self.sign_headers {
            if !list.iter().any(|l| l.eq_ignore_ascii_case(h)) {
                list.push(h.clone());
            }
        }
        for h in &self.oversign_headers {
            list.push(h.clone());
        }
        list
    }

    /// Whether `ip` is in `internal_networks`.
    pub fn is_internal(&self, ip: Option<IpAddr>) -> bool {
        ip.is_some_and(|ip| is_internal(&self.internal_networks, ip))
    }

    /// Loads the key files into [`keyring`](Self::keyring); every failure by key.
    pub fn load_keys(&mut self) -> Result<(), Vec<ConfigError>> {
        self.keyring = Arc::new(KeyRing::load(self)?);
        Ok(())
    }

    pub(super) fn validate(&self, err: &mut impl FnMut(&str, String)) {
        if !self
            .sign_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("From"))
        {
            err(
                "dkim.sign_headers",
                "must include From (RFC 6376 §5.4: the From field must be signed)".into(),
            );
        }
        for (key, list) in [
            ("dkim.sign_headers", &self.sign_headers),
            ("dkim.oversign_headers", &self.oversign_headers),
        ] {
            for h in list {
                if !is_field_name(h) {
                    err(key, format!("{h:?} is not a header field name"));
                } else if h.eq_ignore_ascii_case("DKIM-Signature") {
                    err(key, "DKIM-Signature cannot be signed by itself".into());
                }
            }
        }
        for h in &self.oversign_headers {
            if !self.sign_headers.iter().any(|s| s.eq_ignore_ascii_case(h)) {
                err(
                    "dkim.oversign_headers",
                    format!("{h:?} is over-signed but not in dkim.sign_headers"),
                );
            }
        }
        if self
            .expiration
            .is_some_and(|x| x < Duration::from_secs(3600))
        {
            err(
                "dkim.expiration",
                "must be at least 1h: mail can sit in queues for days; a signature that expires in transit fails".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = format!("dkim.keys[{i}]");
            if !is_domain(&k.domain) {
                err(
                    &format!("{key}.domain"),
                    format!("{:?} is not a domain name", k.domain),
                );
            }
            if !is_selector(&k.selector) {
                err(
                    &format!("{key}.selector"),
                    format!(
                        "{:?} is not a selector (DNS labels of letters, digits and '-', separated by '.')",
                        k.selector
                    ),
                );
            }
            if !seen.insert((
                k.domain.to_ascii_lowercase(),
                k.selector.to_ascii_lowercase(),
            )) {
                err(
                    &format!("{key}.selector"),
                    format!(
                        "selector {:?} is configured twice for {}",
                        k.selector, k.domain
                    ),
                );
            }
        }
    }
}

pub(crate) fn is_internal(networks: &[IpNet], ip: IpAddr) -> bool {
    // An IPv4 client seen through an IPv6 socket (::ffff:a.b.c.d) matches IPv4 networks.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

/// RFC 5322 field name: printable ASCII except ':'.
fn is_field_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

fn is_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

fn is_selector(s: &str) -> bool {
    s.split('.').all(is_label)
}

fn is_domain(s: &str) -> bool {
    s.len() <= 253 && s.contains('.') && s.split('.').all(is_label)
}

/// An optional humantime duration (`"30d"`) or integer seconds.
mod optional_duration {
    use serde::Deserializer;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::super::duration::deserialize(d).map(Some)
    }
}
