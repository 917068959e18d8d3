//! R7 (Art. 20.4, 10): inbound mail whose header From is a local domain must have come
//! through the government system: from an authorised source (authenticated, an authorised
//! relay of R10, an internal network of R6) or with a DKIM or SPF pass *aligned* with that
//! From domain. Otherwise it is refused `550 5.7.26`.
//!
//! Alignment here is stricter than DMARC's relaxed mode on purpose: every organisation
//! domain sits under the same public suffix (`gov.la`), so an identifier is aligned with a
//! From domain only when it *is* that domain or a subdomain of it — a pass for
//! `mof.gov.la` never vouches for `mpt.gov.la`. It does not depend on the organisation
//! publishing a DMARC record.
//!
//! A DNS failure (timeout, SERVFAIL) that leaves R7 unable to decide — no aligned pass, and
//! an aligned identifier whose check ended in `temperror` — tempfails `451 4.4.3`, or with
//! `on_dns_error = "accept"` lets the message through, counted as `fail_open`.

use super::super::{Policy, StoreFailure, Verdicts};
use crate::config::OnError;
use crate::model::{Decision, Mode, Outcome, Reply, RuleId, Stage};

/// The result of one check, as far as R7 cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Pass,
    /// A transient DNS error kept the check from finishing.
    TempError,
    /// Anything else (fail, softfail, neutral, permerror, none).
    Other,
}

/// What verification found, reduced to identifiers and results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// SPF: the domain checked (MAIL FROM domain, or HELO name for the null sender) and
    /// its result.
    pub spf: Option<(String, Check)>,
    /// DKIM: one entry per signature: its `d=` and result.
    pub dkim: Vec<(String, Check)>,
    /// The DNS work for the message ran out of time: results missing count as `TempError`.
    pub timed_out: bool,
}

/// Where the message came from, as far as R7 cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Authenticated, or from an authorised relay / internal network: R7 does not apply.
    Authorised,
    /// From elsewhere.
    Outside,
    /// The directory could not tell whether the client is one of the author
    /// organisation's relays.
    Unknown(StoreFailure),
}

/// `id` is aligned with `from`: the same domain, or a subdomain of it.
pub fn aligned(id: &str, from: &str) -> bool {
    let id = id.trim_end_matches('.');
    let from = from.trim_end_matches('.');
    id.eq_ignore_ascii_case(from)
        || (id.len() > from.len() + 1
            && id.as_bytes()[id.len() - from.len() - 1] == b'.'
            && id[id.len() - from.len()..].eq_ignore_ascii_case(from))
}

/// The aligned result for `from`: `Pass` if any aligned check passed, else `TempError` if
/// an aligned check could not finish (or DNS ran out of time), else `Other`.
pub fn aligned_result(evidence: &Evidence, from: &str) -> Check {
    let checks = evidence
        .spf
        .iter()
        .chain(evidence.dkim.iter())
        .filter(|(id, _)| aligned(id, from))
        .map(|(_, c)| *c);
    let mut result = if evidence.timed_out {
        Check::TempError
    } else {
        Check::Other
    };
    for c in checks {
        match c {
            Check::Pass => return Check::Pass,
            Check::TempError => result = Check::TempError,
            Check::Other => {}
        }
    }
    result
}

/// Decides R7 at end of message. `from_domains`: each distinct header From domain with the
/// directory's answer "is it local?".
pub fn decide(
    policy: &Policy,
    on_dns_error: OnError,
    source: &Source,
    from_domains: &[(String, Result<bool, StoreFailure>)],
    evidence: &Evidence,
) -> Decision {
    let mut v = Verdicts::new(policy, Stage::EndOfMessage);
    if policy.rule(RuleId::R7).mode == Mode::Off || *source == Source::Authorised {
        return v.finish();
    }
    for (domain, local) in from_domains {
        match local {
            Ok(false) => continue,
            Err(_) => {
                v.store_failure(&[RuleId::R7], domain);
                continue;
            }
            Ok(true) => {}
        }
        match aligned_result(evidence, domain) {
            Check::Pass => continue,
            Check::TempError => dns_failure(&mut v, policy, on_dns_error, domain),
            Check::Other => {
                if let Source::Unknown(_) = source {
                    // It may have come from one of the organisation's relays.
                    v.store_failure(&[RuleId::R7], domain);
                } else {
                    v.violation(RuleId::R7, domain, spoofed(domain));
                }
            }
        }
    }
    v.finish()
}

fn dns_failure(v: &mut Verdicts, policy: &Policy, on_dns_error: OnError, domain: &str) {
    match on_dns_error {
        OnError::Tempfail => v.violation(RuleId::R7, &domain, dns_unavailable(domain)),
        OnError::Accept => {
            if policy.rule(RuleId::R7).mode != Mode::Off {
                v.decision.outcomes.push(Outcome {
                    rule: RuleId::R7,
                    stage: Stage::EndOfMessage,
                    kind: "fail_open",
                    reply: dns_unavailable(domain),
                    subject: domain.to_owned(),
                });
            }
        }
    }
}

/// `550 5.7.26`: RFC 7372 X.7.26 "multiple authentication checks failed" — the reply
/// DMARC-style rejections use.
pub fn spoofed(domain: &str) -> Reply {
    Reply::new(
        550,
        "5.7.26",
        format!(
            "Message claims to be from {domain} but did not come through its mail system \
             (no aligned DKIM or SPF pass); government mail must be sent through the \
             organisation's own servers"
        ),
    )
}

/// `451 4.4.3`: RFC 3463 X.4.3 "directory server failure" — DNS could not be consulted.
pub fn dns_unavailable(domain: &str) -> Reply {
    Reply::new(
        451,
        "4.4.3",
        format!(
            "Cannot verify that this message comes from {domain}: DNS lookup failed; please \
             try again later"
        ),
    )
}

#[cfg(test)]
mod tests;
