//! `mailwarden dkim check DOMAIN [--selector S]`: is the public key published at
//! `SELECTOR._domainkey.DOMAIN` the one of the configured private key?

use super::Resolver;
use crate::dkim::SigningKey;
use mail_auth::hickory_resolver::proto::rr::{Name, RData};
use std::fmt;

/// The answer for one configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// The published `p=` is the configured key's public key.
    Match,
    /// A record is published, but its `p=` is another key (or empty: revoked).
    Mismatch { published: String },
    /// No TXT record at that name.
    Missing,
    /// The lookup failed (timeout, SERVFAIL, ...): nothing can be said.
    DnsError(String),
}

impl KeyCheck {
    pub fn is_match(&self) -> bool {
        *self == KeyCheck::Match
    }
}

impl fmt::Display for KeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyCheck::Match => f.write_str("match: the published key is the configured key"),
            KeyCheck::Mismatch { published } if published.is_empty() => f.write_str(
                "mismatch: the published record has an empty p= (key revoked); publish the record printed below",
            ),
            KeyCheck::Mismatch { published } => write!(
                f,
                "mismatch: another key is published (p={published}); publish the record printed below (or fix key_file)"
            ),
            KeyCheck::Missing => {
                f.write_str("missing: no TXT record published; publish the record printed below")
            }
            KeyCheck::DnsError(e) => write!(f, "DNS error: {e}"),
        }
    }
}

/// Looks up `key`'s record through `resolver` and compares the keys. Each TXT record at the
/// name is one record (its strings joined); with several, every one must carry the key, since
/// a verifier may pick any of them.
pub async fn check_key(resolver: &Resolver, key: &SigningKey) -> KeyCheck {
    let name = format!("{}._domainkey.{}.", key.selector, key.domain);
    let name = match Name::from_str_relaxed(name.as_str()) {
        Ok(n) => n,
        Err(e) => return KeyCheck::DnsError(format!("{name} is not a DNS name: {e}")),
    };
    match resolver.auth.resolver().txt_lookup(name).await {
        Ok(lookup) => {
            let records: Vec<String> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|c| String::from_utf8_lossy(c).into_owned())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect();
            compare_all(&records, &key.public_key_b64)
        }
        Err(e) if e.is_no_records_found() => KeyCheck::Missing,
        Err(e) => KeyCheck::DnsError(e.to_string()),
    }
}

/// [`compare`] over every record published at the name.
pub fn compare_all(records: &[String], expected: &str) -> KeyCheck {
    if records.is_empty() {
        return KeyCheck::Missing;
    }
    records
        .iter()
        .map(|r| compare(r, expected))
        .find(|c| !c.is_match())
        .unwrap_or(KeyCheck::Match)
}

/// Every configured key of `domain` (only `selector`'s when given), checked through the
/// resolver of `[dns]`. Errs when no such key is configured or the resolver cannot be set up.
pub async fn check_domain(
    config: &crate::config::Config,
    domain: &str,
    selector: Option<&str>,
) -> Result<Vec<(std::sync::Arc<SigningKey>, KeyCheck)>, String> {
    let keys: Vec<_> = config
        .dkim
        .keyring
        .keys()
        .iter()
        .filter(|k| k.domain.eq_ignore_ascii_case(domain))
        .filter(|k| selector.is_none_or(|s| k.selector.eq_ignore_ascii_case(s)))
        .cloned()
        .collect();
    if keys.is_empty() {
        return Err(match selector {
            Some(s) => format!("no [[dkim.keys]] entry for {domain} with selector {s}"),
            None => format!("no [[dkim.keys]] entry for {domain}"),
        });
    }
    let resolver = Resolver::new(&config.dns).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let c = check_key(&resolver, &k).await;
        out.push((k, c));
    }
    Ok(out)
}

/// Compares the `p=` tag of a DKIM key record (RFC 6376 §3.6.1; whitespace inside the
/// base64 ignored) with `expected`.
pub fn compare(record: &str, expected: &str) -> KeyCheck {
    let published = record
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .find(|(name, _)| name.trim() == "p")
        .map(|(_, v)| v.chars().filter(|c| !c.is_whitespace()).collect::<String>());
    match published {
        None => KeyCheck::Mismatch {
            published: String::new(),
        },
        Some(p) if p == expected => KeyCheck::Match,
        Some(p) => KeyCheck::Mismatch { published: p },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_the_p_tag_ignoring_folding_whitespace() {
        assert_eq!(
            compare("v=DKIM1; k=rsa; p=AB CD\t=", "ABCD="),
            KeyCheck::Match
        );
        assert_eq!(
            compare("v=DKIM1; p=XYZ", "ABCD"),
            KeyCheck::Mismatch {
                published: "XYZ".into()
            }
        );
        assert_eq!(
            compare("v=DKIM1; k=rsa; p=", "ABCD"),
            KeyCheck::Mismatch {
                published: String::new()
            }
        );
        // `p` must be the tag name, not a suffix of one.
        assert!(!compare("v=DKIM1; xp=ABCD", "ABCD").is_match());
    }

    #[test]
    fn every_published_record_must_carry_the_key() {
        let good = "v=DKIM1; p=ABCD".to_owned();
        let other = "v=DKIM1; p=WXYZ".to_owned();
        assert_eq!(
            compare_all(std::slice::from_ref(&good), "ABCD"),
            KeyCheck::Match
        );
        assert_eq!(
            compare_all(&[good, other], "ABCD"),
            KeyCheck::Mismatch {
                published: "WXYZ".into()
            }
        );
        assert_eq!(compare_all(&[], "ABCD"), KeyCheck::Missing);
    }
}
