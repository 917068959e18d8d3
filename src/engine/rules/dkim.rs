//! R6 (Art. 13.2): every message leaving from a local domain carries a DKIM signature of that
//! domain. Sign or tempfail: an outbound message of a local domain without a usable key is
//! refused for now (`451 4.7.5`), never passed unsigned.
//!
//! "Outbound from a local domain" means: the author domain ([`Transaction::author_domain`]:
//! header From, else envelope sender) is an organisation domain in the directory, **and** the
//! client authenticated (SASL) or is in `dkim.internal_networks`. Mail from outside claiming
//! a local From is R7's business (verification), not signed here. A client in the author
//! organisation's relay networks or in `[rules.R10] trusted_networks` counts as internal (the
//! checker decides that).
//!
//! RFC 3463 / RFC 7372: X.7.5 "cryptographic failure" — the system cannot produce the
//! signature the policy requires.

use super::super::{Policy, StoreFailure, Verdicts};
use crate::config::OnError;
use crate::model::{Action, Decision, Mode, Reply, RuleId, Stage, Transaction};

/// What the signer does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningPlan {
    /// Not signed, and why (for the debug log).
    NotSigned(NotSigned),
    /// Sign for `domain` with these keys (indices into the configured keys, in order).
    Sign { domain: String, keys: Vec<usize> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSigned {
    /// R6 is off, or no key is configured at all.
    Disabled,
    /// Neither a header From nor an envelope sender address.
    NoAuthorDomain,
    /// Not authenticated and not from an internal network: not outbound mail of ours.
    NotSubmission,
    /// The author domain is not an organisation domain.
    NotLocal,
    /// R6 in monitor mode would have refused it: delivered unsigned, counted as
    /// `would_tempfail`.
    Monitored,
    /// The directory could not answer and R6 is set to fail open: delivered unsigned, counted.
    FailOpen,
    /// The message is refused (tempfail) anyway.
    Refused,
}

/// The author domain to look up in the directory, when the message is a signing candidate
/// (R6 not off, keys configured, client authenticated or internal); otherwise why not.
pub fn candidate<'t>(
    policy: &Policy,
    tx: &'t Transaction,
    internal_client: bool,
    keys_configured: bool,
) -> Result<&'t str, NotSigned> {
    if policy.rule(RuleId::R6).mode == Mode::Off || !keys_configured {
        return Err(NotSigned::Disabled);
    }
    if tx.sasl_username.is_none() && !internal_client {
        return Err(NotSigned::NotSubmission);
    }
    tx.author_domain().ok_or(NotSigned::NoAuthorDomain)
}

/// Decides for a candidate: `local` is the directory's answer for `domain` (is it an
/// organisation domain?), `key_domains` the domain of each configured key, in order.
pub fn decide(
    policy: &Policy,
    domain: &str,
    local: &Result<bool, StoreFailure>,
    key_domains: &[&str],
) -> (Decision, SigningPlan) {
    let mut v = Verdicts::new(policy, Stage::EndOfMessage);
    let plan = match local {
        Err(_) => {
            v.store_failure(&[RuleId::R6], &domain);
            match policy.rule(RuleId::R6).on_store_error {
                OnError::Accept => SigningPlan::NotSigned(NotSigned::FailOpen),
                OnError::Tempfail => SigningPlan::NotSigned(NotSigned::Refused),
            }
        }
        Ok(false) => SigningPlan::NotSigned(NotSigned::NotLocal),
        Ok(true) => {
            let keys: Vec<usize> = key_domains
                .iter()
                .enumerate()
                .filter(|(_, d)| d.eq_ignore_ascii_case(domain))
                .map(|(i, _)| i)
                .collect();
            if keys.is_empty() {
                v.violation(RuleId::R6, &domain, no_key(domain));
                SigningPlan::NotSigned(NotSigned::Refused)
            } else {
                SigningPlan::Sign {
                    domain: domain.to_ascii_lowercase(),
                    keys,
                }
            }
        }
    };
    let d = v.finish();
    let plan = match plan {
        // Monitor mode: the refusal was only recorded.
        SigningPlan::NotSigned(NotSigned::Refused) if d.action == Action::Continue => {
            SigningPlan::NotSigned(NotSigned::Monitored)
        }
        p => p,
    };
    (d, plan)
}

/// End of message: signing with an existing key failed. Tempfail (or, in monitor mode,
/// recorded and let through unsigned).
pub fn failed(policy: &Policy, domain: &str) -> Decision {
    let mut v = Verdicts::new(policy, Stage::EndOfMessage);
    v.violation(RuleId::R6, &domain, signing_failed(domain));
    v.finish()
}

/// `451 4.7.5`: no key for a local domain.
pub fn no_key(domain: &str) -> Reply {
    Reply::new(
        451,
        "4.7.5",
        format!("No DKIM key for {domain}; message not sent unsigned, please try again later"),
    )
}

/// `451 4.7.5`: a key exists but signing failed (or the header was too large to sign).
pub fn signing_failed(domain: &str) -> Reply {
    Reply::new(
        451,
        "4.7.5",
        format!(
            "DKIM signing for {domain} failed; message not sent unsigned, please try again later"
        ),
    )
}

#[cfg(test)]
mod tests;
