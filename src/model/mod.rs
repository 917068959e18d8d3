//! The one transaction model both front-ends produce, and the verdicts the engine returns.
//!
//! The milter front-end fills a [`Transaction`] stage by stage as callbacks arrive; the policy
//! front-end builds one from each request's attributes. The engine never sees protocol types.

mod address;
mod verdict;

pub use address::{Address, AddressError};
pub use verdict::{Action, Decision, Mode, Outcome, Reply, RuleId};

use std::net::IpAddr;

/// Which MTA protocol a transaction arrived through (a metric and log label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Milter,
    Policy,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Milter => "milter",
            Protocol::Policy => "policy",
        }
    }
}

/// SMTP stages at which a rule can decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    EndOfMessage,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::EndOfMessage => "eom",
        }
    }

    pub const ALL: [Stage; 6] = [
        Stage::Connect,
        Stage::Helo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::EndOfMessage,
    ];
}

/// The envelope sender as given in `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// `MAIL FROM:<>`: bounces and other notifications.
    Null,
    /// A syntactically valid address.
    Address(Address),
    /// Something that does not parse as an address; kept for logging, never matched to accounts.
    Unparsed(String),
}

impl Sender {
    /// Parses the `MAIL FROM` argument (angle brackets optional).
    pub fn parse(raw: &str) -> Sender {
        let s = raw.trim();
        let s = s
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(s);
        if s.is_empty() {
            return Sender::Null;
        }
        // An obsolete source route (`@relay1,@relay2:user@domain`, RFC 5321 4.1.2) is
        // ignored, as Postfix ignores it: the address is what follows the colon.
        let s = match s.strip_prefix('@').and_then(|r| r.split_once(':')) {
            Some((_, address)) => address,
            None => s,
        };
        match Address::parse(s) {
            Ok(a) => Sender::Address(a),
            Err(_) => Sender::Unparsed(s.to_owned()),
        }
    }

    pub fn address(&self) -> Option<&Address> {
        match self {
            Sender::Address(a) => Some(a),
            _ => None,
        }
    }
}

/// Everything known about one SMTP transaction at the moment a rule runs.
///
/// Fields are filled as the MTA reveals them; a rule must treat `None` as "not known".
/// Message bodies and subjects are never part of this model (Art. 19, R23).
#[derive(Debug, Clone)]
pub struct Transaction {
    pub protocol: Protocol,
    /// The MTA's queue id (`i` macro / `queue_id` attribute), for logs only.
    pub queue_id: Option<String>,
    pub client_addr: Option<IpAddr>,
    pub client_name: Option<String>,
    pub helo: Option<String>,
    /// SASL login name when the client authenticated (`{auth_authen}` / `sasl_username`).
    pub sasl_username: Option<String>,
    /// TLS protocol version when the session is encrypted (`{tls_version}` / `encryption_protocol`).
    pub tls_version: Option<String>,
    pub sender: Option<Sender>,
    /// Recipients accepted so far (milter), or the current recipient (policy).
    pub recipients: Vec<Address>,
    /// Recipients of this message accepted before the current one (R14 counts a message at
    /// its first accepted recipient). The milter counts them; the policy server tracks them
    /// per connection by Postfix's `instance` attribute.
    pub rcpts_accepted: usize,
    /// Message size declared with `SIZE=` or measured at end of message.
    pub size: Option<u64>,
    /// Addresses of the `From:` header field(s), in message order (milter only, known from
    /// the end of headers on). Only the addresses: never the display names.
    pub header_from: Vec<Address>,
    /// R7: domains a `From:` field names in a mailbox no parser accepts as an address (or in
    /// a display name standing alone), e.g. `ceo @mpt.gov.la`: a mail reader still shows
    /// that sender, so R7 judges the claim as if it were a From domain (milter only,
    /// lower-cased, from the end of headers on).
    pub header_from_claims: Vec<String>,
    /// R8: the `From:` fields as counted and parsed (milter only, from the end of headers on):
    /// how many fields, and every mailbox in them, including those that do not parse.
    pub from_fields: HeaderAddresses,
    /// R8: the `Sender:` fields, likewise.
    pub sender_fields: HeaderAddresses,
}

/// The address fields of one header name (`From:` or `Sender:`) of a message, as R8 judges
/// them. Only addresses: never display names or comments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderAddresses {
    /// How many fields of this name the message has.
    pub fields: usize,
    /// Their mailboxes in message order (the front-end keeps a bounded number): an
    /// [`Sender::Address`], [`Sender::Null`] for `<>`, or [`Sender::Unparsed`] with the text of
    /// an address that does not parse.
    pub mailboxes: Vec<Sender>,
}

impl Transaction {
    /// The domain a message is sent from, for signing (R6): the first `From:` address's
    /// domain, else the envelope sender's. Several `From:` addresses are R8's business; R6
    /// signs for the first one.
    pub fn author_domain(&self) -> Option<&str> {
        self.header_from
            .first()
            .or_else(|| self.sender.as_ref().and_then(|s| s.address()))
            .map(|a| a.domain())
    }

    pub fn new(protocol: Protocol) -> Self {
        Transaction {
            protocol,
            queue_id: None,
            client_addr: None,
            client_name: None,
            helo: None,
            sasl_username: None,
            tls_version: None,
            sender: None,
            recipients: Vec::new(),
            rcpts_accepted: 0,
            size: None,
            header_from: Vec::new(),
            header_from_claims: Vec::new(),
            from_fields: HeaderAddresses::default(),
            sender_fields: HeaderAddresses::default(),
        }
    }

    /// Clears the per-message fields, keeping the connection's (client, HELO, TLS).
    pub fn reset_message(&mut self) {
        self.queue_id = None;
        self.sender = None;
        self.sasl_username = None;
        self.recipients.clear();
        self.rcpts_accepted = 0;
        self.size = None;
        self.header_from.clear();
        self.header_from_claims.clear();
        self.from_fields = HeaderAddresses::default();
        self.sender_fields = HeaderAddresses::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_parse_null_and_brackets() {
        assert_eq!(Sender::parse("<>"), Sender::Null);
        assert_eq!(Sender::parse(""), Sender::Null);
        let s = Sender::parse("<Champa@MPT.gov.la>");
        assert_eq!(s.address().unwrap().to_string(), "champa@mpt.gov.la");
        assert!(matches!(
            Sender::parse("not an address"),
            Sender::Unparsed(_)
        ));
    }

    #[test]
    fn source_routes_are_ignored() {
        for routed in [
            "<@mx.example.org:cabinet@mpt.gov.la>",
            "<@a.example,@b.example:Cabinet@mpt.gov.la>",
        ] {
            assert_eq!(
                Sender::parse(routed).address().unwrap().to_string(),
                "cabinet@mpt.gov.la",
                "{routed}"
            );
        }
    }
}
