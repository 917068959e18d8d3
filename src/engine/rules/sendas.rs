//! R8 (Art. 20.4, 20.7): send-as. A client that authenticated (SASL) may use only the
//! addresses its account owns, or that it is delegated in the directory, as envelope sender
//! (MAIL, both front-ends) and in the `From:` and `Sender:` header fields (end of headers,
//! milter only); and a message carries exactly one `From:` field with exactly one address.
//!
//! # The login identity
//!
//! The login (`{auth_authen}` / `sasl_username`) names the account:
//! - a login with `@` is that address (compared case-insensitively, like every name);
//! - a login without `@` is `login@DOMAIN` with `[rules.R8] login_domain`; without that key
//!   it is no account;
//! - a login that is no registered account, or whose account may not send (pending approval,
//!   withdrawn), owns nothing: every address it uses is refused. A suspended account still
//!   sends.
//!
//! An account owns its own address, and the addresses of the mailboxes delegated to it
//! (`mailwarden user delegate cabinet@mpt.gov.la --to champa@mpt.gov.la`).
//!
//! Unauthenticated mail is not judged here (R10 and R7 cover it). The null sender `<>` from
//! an authenticated client is accepted at MAIL: mail programs send read receipts (RFC 8098)
//! and other notifications with it, and it claims no address; the header fields of such a
//! message are judged like any other's.
//!
//! Every refusal is `553 5.7.1` (RFC 5321 553 "mailbox name not allowed"; RFC 3463 X.7.1
//! "delivery not authorized, message refused") and names the address.

use super::super::{StoreFailure, Verdicts};
use crate::model::{Address, HeaderAddresses, Reply, RuleId, Sender, Transaction};
use crate::store::{Account, AccountStatus};

/// The account a SASL login names (see the module docs), or `None` when it names none.
pub fn login_address(login: &str, login_domain: Option<&str>) -> Option<Address> {
    let login = login.trim();
    if login.contains('@') {
        return Address::parse(login).ok();
    }
    let domain = login_domain?;
    Address::parse(&format!("{login}@{domain}")).ok()
}

/// Whether a login's account may own addresses: registered and neither pending approval
/// (Art. 20.8) nor withdrawn (Art. 16). A suspended account still sends (Art. 14.1 is about
/// mail to it).
pub fn may_send(account: &Account) -> bool {
    !matches!(
        account.status,
        AccountStatus::Pending | AccountStatus::Withdrawn
    )
}

/// What the directory says about the login and the addresses it uses.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The account the login names ([`login_address`]).
    pub account: Option<Address>,
    /// Whether that account is registered and [`may_send`] (`Ok(false)` also when `account`
    /// is `None`).
    pub registered: Result<bool, StoreFailure>,
    /// For each address used other than the login's own: the accounts delegated to send as
    /// it. Looked up only when the login is a registered account.
    pub delegates: Vec<(Address, Result<Vec<Address>, StoreFailure>)>,
}

impl Identity {
    /// Of the addresses `used` at a stage, those whose delegates must be looked up: every
    /// address other than the login's own `account`, each once.
    pub fn addresses_to_look_up<'a>(
        account: Option<&Address>,
        used: impl IntoIterator<Item = &'a Address>,
    ) -> Vec<Address> {
        let mut out: Vec<Address> = Vec::new();
        for a in used {
            if Some(a) != account && !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    fn owns(&self, addr: &Address) -> Result<bool, &StoreFailure> {
        let Some(account) = &self.account else {
            return Ok(false);
        };
        match &self.registered {
            Err(e) => return Err(e),
            Ok(false) => return Ok(false),
            Ok(true) => {}
        }
        if addr == account {
            return Ok(true);
        }
        match self.delegates.iter().find(|(a, _)| a == addr) {
            Some((_, Ok(delegates))) => Ok(delegates.contains(account)),
            Some((_, Err(e))) => Err(e),
            // Not looked up: nothing says it is delegated.
            None => Ok(false),
        }
    }

    /// Why the login may not use an address, in plain words.
    fn not_yours(&self) -> String {
        match (&self.account, &self.registered) {
            // The raw login is not repeated: it goes to the logs with the reply, and a login
            // field sometimes holds what was meant for the password field.
            (None, _) => "your login is not a registered address, so it may send as nobody; \
                 log in with your full address"
                .to_owned(),
            (Some(a), Ok(false)) => format!(
                "your login {a} is not a registered account allowed to send (it may be pending \
                 or withdrawn), so it may send as nobody; contact your administrator"
            ),
            (Some(a), _) => format!(
                "you are logged in as {a}, which may send only as itself and the mailboxes \
                 delegated to it; use your own address, or ask your administrator to delegate \
                 this mailbox to you"
            ),
        }
    }
}

/// The addresses the envelope stage uses: the envelope sender, when it is an address.
pub fn envelope_addresses(tx: &Transaction) -> Vec<&Address> {
    tx.sender
        .as_ref()
        .and_then(|s| s.address())
        .into_iter()
        .collect()
}

/// The addresses the header stage uses: those of the `From:` and `Sender:` fields.
pub fn header_addresses(tx: &Transaction) -> Vec<&Address> {
    tx.from_fields
        .mailboxes
        .iter()
        .chain(&tx.sender_fields.mailboxes)
        .filter_map(|m| m.address())
        .collect()
}

fn refuse(v: &mut Verdicts, subject: &dyn std::fmt::Display, text: String) {
    v.violation(RuleId::R8, subject, Reply::new(553, "5.7.1", text));
}

/// One used address: refused unless the login owns it (or the store decides).
fn judge(v: &mut Verdicts, id: &Identity, what: &str, mailbox: &Sender) {
    match mailbox {
        Sender::Address(a) => match id.owns(a) {
            Ok(true) => {}
            Ok(false) => refuse(
                v,
                a,
                format!("{what} <{a}> is not yours: {}", id.not_yours()),
            ),
            Err(_) => v.store_failure(&[RuleId::R8], a),
        },
        Sender::Null => refuse(
            v,
            &"<>",
            format!("{what} <> is empty: put your own address there"),
        ),
        Sender::Unparsed(raw) => refuse(
            v,
            raw,
            format!("{what} <{raw}> is not a valid address: put your own address there"),
        ),
    }
}

/// MAIL: the envelope sender of an authenticated client.
pub(crate) fn envelope(v: &mut Verdicts, tx: &Transaction, id: &Identity) {
    if tx.sasl_username.is_none() {
        return;
    }
    match &tx.sender {
        // Notifications (read receipts, vacation replies) claim no address: see module docs.
        None | Some(Sender::Null) => {}
        Some(s) => judge(v, id, "Sender address", s),
    }
}

/// End of headers: the `From:` and `Sender:` fields of an authenticated client's message.
pub(crate) fn headers(v: &mut Verdicts, tx: &Transaction, id: &Identity) {
    if tx.sasl_username.is_none() {
        return;
    }
    let from = &tx.from_fields;
    // RFC 5322 section 3.6: exactly one From field; Art. 20.4: one identifiable author.
    if from.fields != 1 {
        refuse(
            v,
            &format!("{} From fields", from.fields),
            format!(
                "The message has {} From: header fields; exactly one, with your own address, \
                 is required",
                from.fields
            ),
        );
        return;
    }
    if from.mailboxes.len() != 1 {
        let listed = listed(from);
        refuse(
            v,
            &listed,
            format!(
                "The From: header holds {} addresses ({listed}); exactly one, your own, is \
                 required",
                from.mailboxes.len()
            ),
        );
        return;
    }
    judge(v, id, "From: address", &from.mailboxes[0]);
    for m in &tx.sender_fields.mailboxes {
        judge(v, id, "Sender: address", m);
    }
}

fn listed(h: &HeaderAddresses) -> String {
    if h.mailboxes.is_empty() {
        return "none".into();
    }
    h.mailboxes
        .iter()
        .map(|m| match m {
            Sender::Address(a) => format!("<{a}>"),
            Sender::Null => "<>".into(),
            Sender::Unparsed(r) => format!("<{r}>"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
