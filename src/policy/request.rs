//! Translation between policy requests and the shared model, both ways. No rule logic.
//!
//! Attribute reference: Postfix `SMTPD_POLICY_README`, "Policy protocol description".

use super::codec::{Action, Request};
use crate::model::{self, Address, Decision, Protocol, Sender, Transaction};

/// The only request type Postfix's SMTP server sends (`request=smtpd_access_policy`).
pub const REQUEST_TYPE: &str = "smtpd_access_policy";

/// A request that decodes but is not an SMTPD access policy request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request has no \"request\" attribute")]
    MissingType,
    #[error("unsupported request type {0:?} (expected smtpd_access_policy)")]
    UnsupportedType(String),
}

/// `protocol_state`: the SMTP command Postfix is evaluating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolState {
    Connect,
    /// `HELO` or `EHLO`.
    Helo,
    Mail,
    Rcpt,
    Data,
    /// `END-OF-MESSAGE` (also after `BDAT LAST`).
    EndOfMessage,
    Vrfy,
    Etrn,
    /// A state this version does not know (kept for the log); answered with `DUNNO`.
    Other(String),
}

impl ProtocolState {
    pub fn parse(s: &str) -> ProtocolState {
        match s.to_ascii_uppercase().as_str() {
            "CONNECT" => ProtocolState::Connect,
            "HELO" | "EHLO" => ProtocolState::Helo,
            "MAIL" => ProtocolState::Mail,
            "RCPT" => ProtocolState::Rcpt,
            "DATA" => ProtocolState::Data,
            "END-OF-MESSAGE" => ProtocolState::EndOfMessage,
            "VRFY" => ProtocolState::Vrfy,
            "ETRN" => ProtocolState::Etrn,
            _ => ProtocolState::Other(s.to_owned()),
        }
    }
}

/// A checked SMTPD access policy request.
#[derive(Debug, Clone)]
pub struct PolicyRequest {
    pub state: ProtocolState,
    /// The transaction as far as this request tells it (protocol `Policy`). For RCPT, the
    /// current recipient is in `recipients` when it parses.
    pub tx: Transaction,
    /// The `recipient` attribute when it parses as an address.
    pub recipient: Option<Address>,
    /// The `recipient` attribute as sent, when it does not parse (for the log; Postfix itself
    /// decides what to do with such a recipient).
    pub unparsed_recipient: Option<String>,
    /// Postfix's `instance` attribute: the same for every request of one message.
    pub instance: Option<String>,
}

impl PolicyRequest {
    /// Checks the request type and translates the attributes. Unknown attributes are ignored.
    pub fn from_request(req: &Request) -> Result<PolicyRequest, RequestError> {
        match req.get("request") {
            None => return Err(RequestError::MissingType),
            Some(REQUEST_TYPE) => {}
            Some(other) => return Err(RequestError::UnsupportedType(other.to_owned())),
        }
        let state = ProtocolState::parse(req.get("protocol_state").unwrap_or(""));
        let mut tx = transaction(req);
        let (recipient, unparsed_recipient) = match req.non_empty("recipient") {
            None => (None, None),
            Some(raw) => match parse_recipient(raw) {
                Some(a) => (Some(a), None),
                None => (None, Some(raw.to_owned())),
            },
        };
        if let Some(r) = &recipient {
            tx.recipients.push(r.clone());
        }
        Ok(PolicyRequest {
            state,
            tx,
            recipient,
            unparsed_recipient,
            instance: req.non_empty("instance").map(str::to_owned),
        })
    }
}

/// Builds the shared transaction model from a request's attributes.
///
/// Empty values mean "not known" (Postfix sends every attribute, empty when it has no data);
/// `client_name=unknown` means the client's name did not resolve; `size=0` means the client
/// announced no `SIZE=`.
pub fn transaction(req: &Request) -> Transaction {
    let mut tx = Transaction::new(Protocol::Policy);
    tx.queue_id = req.non_empty("queue_id").map(str::to_owned);
    tx.client_addr = req.non_empty("client_address").and_then(|a| a.parse().ok());
    tx.client_name = req
        .non_empty("client_name")
        .filter(|n| !n.eq_ignore_ascii_case("unknown"))
        .map(str::to_owned);
    tx.helo = req.non_empty("helo_name").map(str::to_owned);
    tx.sasl_username = req.non_empty("sasl_username").map(str::to_owned);
    tx.tls_version = req.non_empty("encryption_protocol").map(str::to_owned);
    // An empty `sender` is the null sender `<>`; a missing one is "not known".
    tx.sender = req.get("sender").map(Sender::parse);
    tx.size = req
        .non_empty("size")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0);
    tx
}

/// The `recipient` attribute as an address (Postfix sends it without angle brackets; they are
/// tolerated).
fn parse_recipient(raw: &str) -> Option<Address> {
    let s = raw.trim();
    let s = s
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s);
    Address::parse(s).ok()
}

/// The access(5) action for a decision: `DUNNO` to let Postfix go on, else the numeric reply
/// `<code> <enhanced> <text>` (e.g. `550 5.2.1 Mailbox … is suspended`), which Postfix sends to
/// the client as is.
pub fn action_for(decision: &Decision) -> Action {
    match &decision.action {
        model::Action::Continue => Action::dunno(),
        model::Action::Reject(reply) | model::Action::Tempfail(reply) => {
            Action::new(&reply.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reply;

    fn req(extra: &[(&str, &str)]) -> Request {
        let mut attrs = vec![
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
        ];
        attrs.extend_from_slice(extra);
        Request::from_attrs(attrs.iter().copied())
    }

    #[test]
    fn translates_every_mapped_attribute() {
        let r = PolicyRequest::from_request(&req(&[
            ("queue_id", "8045F2AB23"),
            ("client_address", "2001:db8::25"),
            ("client_name", "mail.mpt.gov.la"),
            ("helo_name", "mail.mpt.gov.la"),
            ("sasl_username", "champa"),
            ("encryption_protocol", "TLSv1.3"),
            ("sender", "Champa@MPT.gov.la"),
            ("recipient", "Somsak@mof.gov.la"),
            ("size", "12345"),
            ("some_future_attribute", "x=y"),
        ]))
        .unwrap();
        assert_eq!(r.state, ProtocolState::Rcpt);
        let tx = &r.tx;
        assert_eq!(tx.protocol, Protocol::Policy);
        assert_eq!(tx.queue_id.as_deref(), Some("8045F2AB23"));
        assert_eq!(tx.client_addr, Some("2001:db8::25".parse().unwrap()));
        assert_eq!(tx.client_name.as_deref(), Some("mail.mpt.gov.la"));
        assert_eq!(tx.helo.as_deref(), Some("mail.mpt.gov.la"));
        assert_eq!(tx.sasl_username.as_deref(), Some("champa"));
        assert_eq!(tx.tls_version.as_deref(), Some("TLSv1.3"));
        assert_eq!(
            tx.sender
                .as_ref()
                .and_then(|s| s.address())
                .map(|a| a.to_string()),
            Some("champa@mpt.gov.la".into())
        );
        let rcpt: Address = "somsak@mof.gov.la".parse().unwrap();
        assert_eq!(r.recipient, Some(rcpt.clone()));
        assert_eq!(tx.recipients, vec![rcpt]);
        assert_eq!(tx.size, Some(12345));
    }

    #[test]
    fn empty_and_placeholder_values_mean_unknown() {
        let r = PolicyRequest::from_request(&req(&[
            ("queue_id", ""),
            ("client_address", "unknown"),
            ("client_name", "unknown"),
            ("helo_name", ""),
            ("sasl_username", ""),
            ("encryption_protocol", ""),
            ("sender", ""),
            ("recipient", ""),
            ("size", "0"),
        ]))
        .unwrap();
        let tx = &r.tx;
        assert_eq!(tx.queue_id, None);
        assert_eq!(tx.client_addr, None);
        assert_eq!(tx.client_name, None);
        assert_eq!(tx.helo, None);
        assert_eq!(tx.sasl_username, None);
        assert_eq!(tx.tls_version, None);
        assert_eq!(tx.sender, Some(Sender::Null), "empty sender is <>");
        assert_eq!(r.recipient, None);
        assert_eq!(r.unparsed_recipient, None);
        assert!(tx.recipients.is_empty());
        assert_eq!(tx.size, None);

        let r = PolicyRequest::from_request(&req(&[])).unwrap();
        assert_eq!(r.tx.sender, None, "no sender attribute: not known");
    }

    #[test]
    fn unparsable_recipient_is_kept_aside() {
        let r = PolicyRequest::from_request(&req(&[("recipient", "\"a b\"@x.la")])).unwrap();
        assert_eq!(r.recipient, None);
        assert_eq!(r.unparsed_recipient.as_deref(), Some("\"a b\"@x.la"));
        assert!(r.tx.recipients.is_empty());
    }

    #[test]
    fn request_type_is_checked() {
        assert_eq!(
            PolicyRequest::from_request(&Request::from_attrs([("protocol_state", "RCPT")]))
                .unwrap_err(),
            RequestError::MissingType
        );
        assert_eq!(
            PolicyRequest::from_request(&Request::from_attrs([("request", "junk")])).unwrap_err(),
            RequestError::UnsupportedType("junk".into())
        );
    }

    #[test]
    fn protocol_states() {
        for (s, want) in [
            ("CONNECT", ProtocolState::Connect),
            ("EHLO", ProtocolState::Helo),
            ("HELO", ProtocolState::Helo),
            ("MAIL", ProtocolState::Mail),
            ("RCPT", ProtocolState::Rcpt),
            ("DATA", ProtocolState::Data),
            ("END-OF-MESSAGE", ProtocolState::EndOfMessage),
            ("VRFY", ProtocolState::Vrfy),
            ("ETRN", ProtocolState::Etrn),
            ("BDAT", ProtocolState::Other("BDAT".into())),
        ] {
            assert_eq!(ProtocolState::parse(s), want, "{s}");
        }
    }

    #[test]
    fn decisions_become_access_actions() {
        assert_eq!(action_for(&Decision::pass()).as_str(), "DUNNO");
        let reject = Decision {
            action: model::Action::Reject(Reply::new(
                550,
                "5.2.1",
                "Mailbox <a@b.la> is suspended",
            )),
            outcomes: vec![],
        };
        assert_eq!(
            action_for(&reject).as_str(),
            "550 5.2.1 Mailbox <a@b.la> is suspended"
        );
        let tempfail = Decision {
            action: model::Action::Tempfail(Reply::store_unavailable()),
            outcomes: vec![],
        };
        assert_eq!(
            action_for(&tempfail).as_str(),
            "451 4.3.0 Temporary policy service failure, please try again later"
        );
    }
}
