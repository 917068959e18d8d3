//! Who may submit mail of a local domain, and how: R10 (Art. 7, authorised relay networks)
//! and R11 (Art. 12.5, TLS-only submission).
//!
//! Both judge the client, not the account, at MAIL (the policy front-end asks at RCPT, like
//! the other sender rules). "Submission" means: the client authenticated (SASL), or the
//! envelope sender is in a local domain (an organisation domain in the directory).

use super::super::{StoreFailure, Verdicts};
use crate::config::in_networks;
use crate::model::{Address, Reply, RuleId, Transaction};
use crate::store::Org;

/// R10: mail with an envelope sender in a local domain, from a client that did not
/// authenticate, must come from one of that organisation's relay networks or from
/// `[rules.R10] trusted_networks`. An organisation that has declared no relay network is not
/// checked (deploying mailwarden cuts nothing off until the networks are declared).
pub(crate) fn relay(
    v: &mut Verdicts,
    tx: &Transaction,
    sender: &Address,
    sender_org: Result<Option<&Org>, &StoreFailure>,
) {
    if tx.sasl_username.is_some() {
        return;
    }
    if tx
        .client_addr
        .is_some_and(|ip| in_networks(&v.policy.relay_trusted_networks, ip))
    {
        return;
    }
    let org = match sender_org {
        Ok(None) => return,
        Ok(Some(org)) => org,
        Err(_) => {
            v.store_failure(&[RuleId::R10], sender);
            return;
        }
    };
    if org.relay_networks.is_empty()
        || tx
            .client_addr
            .is_some_and(|ip| in_networks(&org.relay_networks, ip))
    {
        return;
    }
    let client = tx
        .client_addr
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unknown".into());
    // RFC 3463 X.7.1 "delivery not authorized, message refused": the sender's organisation
    // has not authorised this client to send its mail (Art. 7).
    v.violation(
        RuleId::R10,
        sender,
        Reply::new(
            550,
            "5.7.1",
            format!(
                "Sender <{sender}>: client {client} is not an authorised relay for {}; \
                 send through your organisation's mail server, or log in (SMTP AUTH)",
                org.domain
            ),
        ),
    );
}

/// R11: a submission without TLS is refused, unless the client is in
/// `[rules.R11] exempt_networks` (loopback by default). `sender_org` is the organisation of
/// the envelope sender's domain (`Ok(None)`: not local, or no sender address), or the store
/// failure that kept us from knowing.
pub(crate) fn tls(
    v: &mut Verdicts,
    tx: &Transaction,
    sender_org: Result<Option<&Org>, &StoreFailure>,
) {
    if tx.tls_version.is_some() {
        return;
    }
    if tx
        .client_addr
        .is_some_and(|ip| in_networks(&v.policy.tls_exempt_networks, ip))
    {
        return;
    }
    let subject = tx
        .client_addr
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unknown client".into());
    if tx.sasl_username.is_none() {
        match sender_org {
            Ok(None) => return,
            Ok(Some(_)) => {}
            Err(_) => {
                // Cannot tell whether the sender is local: the rule's on_store_error decides.
                v.store_failure(&[RuleId::R11], &subject);
                return;
            }
        }
    }
    // RFC 3207 section 4: "530 5.7.0 Must issue a STARTTLS command first" is the reply of a
    // server that requires TLS; RFC 3463 X.7.0 "other or undefined security status".
    v.violation(
        RuleId::R11,
        &subject,
        Reply::new(
            530,
            "5.7.0",
            "Must issue a STARTTLS command first: government mail is only accepted over an \
             encrypted connection; turn on STARTTLS (or SSL/TLS) in your mail program's \
             outgoing server settings",
        ),
    );
}

#[cfg(test)]
mod tests;
