//! Per-connection state: the [`Transaction`] the callbacks fill stage by stage.
//!
//! Everything here works on plain values (strings, addresses, a [`MacroSource`]) so it can be
//! tested without a socket; `callbacks.rs` does the indymilter plumbing. No rule logic lives
//! here: the checker decides, this only records what the MTA said.

use crate::dkim::{MessageSigner, SigningKey, signer::append_header};
use crate::engine::rules::spoofing::Source;
use crate::model::{Address, HeaderAddresses, Protocol, Sender, Transaction};
use crate::telemetry::ConnectionGuard;
use std::{ffi::CStr, net::IpAddr, sync::Arc};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Read access to the macros the MTA sent (indymilter's `Macros` in production).
pub trait MacroSource {
    /// The value of macro `name` (`c"i"`, `c"{auth_authen}"`), if the MTA defined it.
    fn macro_value(&self, name: &CStr) -> Option<String>;
}

impl MacroSource for indymilter::Macros {
    fn macro_value(&self, name: &CStr) -> Option<String> {
        self.get(name).map(|v| v.to_string_lossy().into_owned())
    }
}

/// Most recipients kept for one message. Postfix's own `smtpd_recipient_limit` defaults to
/// 1000; this only bounds memory against a misbehaving peer. Past it, recipients are tempfailed.
pub const MAX_RECIPIENTS: usize = 10_000;

/// Largest header section kept for signing. Postfix keeps at most `header_size_limit`
/// (100 KiB by default) of a message's headers; this bounds memory per connection when the
/// MTA is configured otherwise. A message to be signed whose headers exceed it is tempfailed.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// Most `From:` (and, separately, `Sender:`) addresses kept per message (R6 uses the first;
/// R8 wants exactly one).
const MAX_FROM_ADDRESSES: usize = 64;

/// Most forged `Authentication-Results` headers (claiming our authserv-id) remembered for
/// deletion; a message with more is tempfailed rather than delivered with one left in.
pub const MAX_FORGED_AR: usize = 1024;

/// Longest macro or HELO value kept (longer values are cut, never rejected: they are for logs
/// and matching, and the MTA already enforces its own limits).
const MAX_VALUE_LEN: usize = 255;

/// Malformed input from the MTA inside one message. The callback tempfails the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("MAIL command without a sender address")]
    NoSender,
    #[error("RCPT command without a recipient address")]
    NoRecipient,
    #[error("rule evaluation failed unexpectedly: {0}")]
    Internal(String),
}

/// One MTA connection.
pub struct Session {
    pub tx: Transaction,
    /// Held while a message is between MAIL and end of message; shutdown waits for these.
    in_flight: Option<TaskTrackerToken>,
    /// An internal error hit this message: every later stage of it answers tempfail.
    failed: bool,
    /// Header and body bytes seen, when those stages are negotiated.
    measured: u64,
    /// Queue id of the previous message on this connection (see [`Session::refresh`]).
    previous_queue_id: Option<String>,
    /// Headers were negotiated (send-as, R8, or the DKIM signer is on for this connection).
    headers: bool,
    /// Headers and body were negotiated for the DKIM signer or the verifier (R7).
    content: bool,
    /// Headers and body arrive (for `content`, or for R13 to measure the message).
    measures: bool,
    /// The MTA sends header values with the space after the colon (and takes inserted
    /// values as given).
    leading_space: bool,
    /// The protocol options negotiated with the MTA: which stages expect no reply
    /// (`NOREPLY_*`).
    opts: indymilter::ProtoOpts,
    /// `server.milter_envelope = "policy"`: MAIL and RCPT are read, not judged here.
    envelope_by_policy: bool,
    /// A refusal answered at end of message because the stage that found it gets no reply:
    /// end of headers under `NOREPLY_EOH`, or MAIL/RCPT left to the policy service
    /// (shutting down, too many recipients).
    deferred: Option<crate::model::Action>,
    /// The header section in wire form, kept until the end of headers (only with `content`).
    header_block: Vec<u8>,
    /// The header section outgrew [`MAX_HEADER_BLOCK`].
    header_overflow: bool,
    /// Signing in progress: the signing domain and its signer.
    signing: Option<(String, MessageSigner)>,
    /// Our authserv-id when R7 is on for this connection (lowercase).
    authserv_id: Option<String>,
    /// `Authentication-Results` headers seen in this message so far.
    ar_seen: i32,
    /// Their indices (1-based, per RFC/milter `CHGHEADER` counting) of those claiming
    /// our authserv-id.
    forged_ar: Vec<i32>,
    /// More than [`MAX_FORGED_AR`] forged headers.
    forged_overflow: bool,
    /// A `DKIM-Signature` or `ARC-Message-Signature` header was seen: the body is needed.
    has_signatures: bool,
    /// Inbound verification in progress (R7).
    verifying: Option<Verifying>,
    _open: ConnectionGuard,
}

/// An inbound message being collected for verification (R7): the header section, the
/// empty line and — only when it carries signatures and stays under the size limit — the
/// body. This is the one copy of the message mailwarden holds.
#[derive(Debug)]
pub struct Verifying {
    pub source: Source,
    /// The message in wire form (CRLF line ends).
    pub message: Vec<u8>,
    /// The body is in `message` (signatures to check, and under `max`).
    pub body_kept: bool,
    /// Length of the header section and the empty line in `message`.
    header_len: usize,
    max: u64,
}

impl Session {
    pub fn new(open: ConnectionGuard) -> Session {
        Session {
            tx: Transaction::new(Protocol::Milter),
            in_flight: None,
            failed: false,
            measured: 0,
            previous_queue_id: None,
            headers: false,
            content: false,
            measures: false,
            leading_space: false,
            opts: indymilter::ProtoOpts::empty(),
            envelope_by_policy: false,
            deferred: None,
            header_block: Vec::new(),
            header_overflow: false,
            signing: None,
            authserv_id: None,
            ar_seen: 0,
            forged_ar: Vec::new(),
            forged_overflow: false,
            has_signatures: false,
            verifying: None,
            _open: open,
        }
    }

    /// Records what was negotiated: whether headers arrive (`headers`), headers and body for
    /// the signer or verifier (`content`), headers and body at all (`measures`: the message
    /// size is known at its end), and the protocol options (`opts`).
    pub fn negotiated(
        &mut self,
        headers: bool,
        content: bool,
        measures: bool,
        opts: indymilter::ProtoOpts,
    ) {
        self.headers = headers;
        self.content = content;
        self.measures = measures || content;
        self.leading_space = opts.contains(indymilter::ProtoOpts::LEADING_SPACE);
        self.opts = opts;
    }

    /// What a stage that lets the message go on answers: no reply at all when the MTA agreed
    /// to wait for none there (`noreply`, one of the `NOREPLY_*` options), else `Continue`.
    pub fn continue_status(&self, noreply: indymilter::ProtoOpts) -> indymilter::Status {
        if self.opts.contains(noreply) {
            indymilter::Status::Noreply
        } else {
            indymilter::Status::Continue
        }
    }

    /// The policy service judges MAIL and RCPT (`server.milter_envelope = "policy"`).
    pub fn envelope_by_policy(&mut self) {
        self.envelope_by_policy = true;
    }

    /// `Some(status)` when MAIL is not judged here: what it answers (`Noreply` when the MTA
    /// agreed to that, else `Continue`).
    pub fn mail_status(&self) -> Option<indymilter::Status> {
        self.envelope_by_policy
            .then(|| self.continue_status(indymilter::ProtoOpts::NOREPLY_MAIL))
    }

    /// `Some(status)` when RCPT is not judged here: what it answers, likewise.
    pub fn rcpt_status(&self) -> Option<indymilter::Status> {
        self.envelope_by_policy
            .then(|| self.continue_status(indymilter::ProtoOpts::NOREPLY_RCPT))
    }

    /// Whether a verdict is already kept for end of message.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// Whether the MTA waits for no reply at end of headers: the verdict found there is
    /// [`deferred`](Self::defer) to end of message. Postfix gives an end-of-headers refusal
    /// after the end of DATA anyway, so the client sees the same reply at the same moment.
    pub fn noreply_eoh(&self) -> bool {
        self.opts.contains(indymilter::ProtoOpts::NOREPLY_EOH)
    }

    /// Keeps a refusal for end of message (see the `deferred` field).
    pub fn defer(&mut self, action: crate::model::Action) {
        self.deferred = Some(action);
    }

    /// The refusal kept for end of message, if any.
    pub fn take_deferred(&mut self) -> Option<crate::model::Action> {
        self.deferred.take()
    }

    /// R7 is on for this connection, with `authserv_id` (forged copies are recognised by it).
    pub fn verify_with(&mut self, authserv_id: Option<String>) {
        self.authserv_id = authserv_id;
    }

    /// Whether R7 verifies inbound mail on this connection.
    pub fn verifies(&self) -> bool {
        self.authserv_id.is_some() && self.content
    }

    /// Our authserv-id, when R7 is on for this connection.
    pub fn authserv_id(&self) -> Option<&str> {
        self.authserv_id.as_deref()
    }

    /// The status for a header callback: no reply at all when the MTA agreed to that.
    pub fn header_status(&self) -> indymilter::Status {
        self.continue_status(indymilter::ProtoOpts::NOREPLY_HEADER)
    }

    /// The status for a body callback, likewise.
    pub fn body_status(&self) -> indymilter::Status {
        self.continue_status(indymilter::ProtoOpts::NOREPLY_BODY)
    }

    /// Whether headers are seen on this connection.
    pub fn sees_headers(&self) -> bool {
        self.headers
    }

    /// Whether headers and body are seen on this connection for the signer or the verifier.
    pub fn sees_content(&self) -> bool {
        self.content
    }

    /// Whether the whole message (headers and body) arrives, so its size is measured.
    pub fn measures_size(&self) -> bool {
        self.measures
    }

    /// CONNECT: the client's address from the socket information, else `{client_addr}`; its
    /// name from `{client_name}`, else the connect hostname unless it is Postfix's
    /// "unknown" form (`[192.0.2.1]`).
    pub fn connect(&mut self, hostname: &str, socket_ip: Option<IpAddr>, m: &impl MacroSource) {
        self.tx = Transaction::new(Protocol::Milter);
        self.end_message();
        self.tx.client_addr = socket_ip.or_else(|| client_addr(m));
        self.tx.client_name = m
            .macro_value(c"{client_name}")
            .and_then(|n| clean(&n))
            .filter(|n| !is_unknown_name(n))
            .or_else(|| clean(hostname).filter(|n| !is_unknown_name(n)));
    }

    /// HELO/EHLO. Postfix sends it again after STARTTLS, with the TLS macros set.
    pub fn helo(&mut self, name: &str, m: &impl MacroSource) {
        self.tx.helo = clean(name);
        self.tx.tls_version = m.macro_value(c"{tls_version}").and_then(|v| clean(&v));
    }

    /// MAIL: starts a new message. `args[0]` is the address (`<a@b>` or `<>`), the rest are
    /// ESMTP parameters; `{mail_addr}` stands in when the address argument is missing.
    pub fn mail(&mut self, args: &[String], m: &impl MacroSource) -> Result<(), CallbackError> {
        self.end_message();
        self.refresh(m);
        if let Some(user) = m.macro_value(c"{auth_authen}").and_then(|u| clean(&u)) {
            self.tx.sasl_username = Some(user);
        }
        if let Some(v) = m.macro_value(c"{tls_version}").and_then(|v| clean(&v)) {
            self.tx.tls_version = Some(v);
        }
        // Without a CONNECT stage (skipped unless a rule needs it), the client arrives here.
        if self.tx.client_addr.is_none() {
            self.tx.client_addr = client_addr(m);
        }
        if self.tx.client_name.is_none() {
            self.tx.client_name = m
                .macro_value(c"{client_name}")
                .and_then(|n| clean(&n))
                .filter(|n| !is_unknown_name(n));
        }
        let raw = args
            .first()
            .cloned()
            .or_else(|| m.macro_value(c"{mail_addr}"))
            .ok_or(CallbackError::NoSender)?;
        self.tx.sender = Some(Sender::parse(&raw));
        self.tx.size = args.iter().skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE").then(|| v.parse().ok())?
        });
        Ok(())
    }

    /// Marks the message as in flight (after MAIL was accepted) so a shutdown waits for it.
    pub fn message_started(&mut self, token: TaskTrackerToken) {
        self.in_flight = Some(token);
    }

    /// RCPT: the recipient to judge. `Ok(None)` for an address that cannot be a directory
    /// name (`<postmaster>` without a domain): no rule applies to it.
    pub fn rcpt(
        &mut self,
        args: &[String],
        m: &impl MacroSource,
    ) -> Result<Option<Address>, CallbackError> {
        self.refresh(m);
        let raw = args
            .first()
            .cloned()
            .or_else(|| m.macro_value(c"{rcpt_addr}"))
            .ok_or(CallbackError::NoRecipient)?;
        Ok(Sender::parse(&raw).address().cloned())
    }

    /// Records a recipient the checker let through.
    pub fn accept_rcpt(&mut self, rcpt: Address) {
        self.tx.recipients.push(rcpt);
        self.tx.rcpts_accepted += 1;
    }

    /// Whether another recipient may be kept (see [`MAX_RECIPIENTS`]).
    pub fn has_room_for_rcpt(&self) -> bool {
        self.tx.recipients.len() < MAX_RECIPIENTS
    }

    /// Picks up the queue id (`i`) where the MTA sends it; Postfix assigns it at MAIL or
    /// later depending on `smtpd_delay_open_until_valid_rcpt`.
    ///
    /// indymilter (like libmilter) keeps a stage's macros until the MTA sends new ones for
    /// that stage, and Postfix's empty macro list for a stage is not understood as "none".
    /// So at the next MAIL the previous message's `i` can still be visible. A queue id names
    /// one message, so the previous message's id is never taken for the current one.
    pub fn refresh(&mut self, m: &impl MacroSource) {
        if let Some(id) = m.macro_value(c"i").and_then(|i| clean(&i)) {
            if self.previous_queue_id.as_ref() != Some(&id) {
                self.tx.queue_id = Some(id);
            }
        }
    }

    /// One header (only when headers are negotiated): counted for the measured size, its
    /// addresses recorded when it is `From:`, and kept for the signer (bounded).
    pub fn header(&mut self, name: &[u8], value: &[u8]) {
        // "name:" + value + CRLF
        self.measured += (name.len() + 1 + value.len() + 2) as u64;
        if name.eq_ignore_ascii_case(b"From") {
            let mailboxes = header_mailboxes(b"From", value);
            let room = MAX_FROM_ADDRESSES.saturating_sub(self.tx.header_from.len());
            let addrs = mailboxes.iter().filter_map(|m| m.address()).cloned();
            self.tx.header_from.extend(addrs.take(room));
            // A mailbox without a valid address still shows a sender to the reader: what
            // its text claims is R7's to judge.
            if mailboxes.is_empty() || mailboxes.iter().any(|m| m.address().is_none()) {
                for d in claimed_domains(value) {
                    let claims = &mut self.tx.header_from_claims;
                    if claims.len() < MAX_FROM_ADDRESSES && !claims.contains(&d) {
                        claims.push(d);
                    }
                }
            }
            keep(&mut self.tx.from_fields, mailboxes);
        } else if name.eq_ignore_ascii_case(b"Sender") {
            keep(
                &mut self.tx.sender_fields,
                header_mailboxes(b"Sender", value),
            );
        }
        if self.authserv_id.is_some() {
            self.authentication_header(name, value);
        }
        if self.content && !self.header_overflow {
            if self.header_block.len() + name.len() + value.len() + 8 > MAX_HEADER_BLOCK {
                self.header_overflow = true;
                self.header_block = Vec::new();
            } else {
                append_header(&mut self.header_block, name, value);
            }
        }
    }

    /// R7's view of one header: forged `Authentication-Results` and signatures.
    fn authentication_header(&mut self, name: &[u8], value: &[u8]) {
        if name.eq_ignore_ascii_case(b"Authentication-Results") {
            self.ar_seen = self.ar_seen.saturating_add(1);
            let ours = self.authserv_id.as_deref();
            if crate::verify::authserv_id_of(value).as_deref() == ours {
                if self.forged_ar.len() < MAX_FORGED_AR {
                    self.forged_ar.push(self.ar_seen);
                } else {
                    self.forged_overflow = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"DKIM-Signature")
            || name.eq_ignore_ascii_case(b"ARC-Message-Signature")
        {
            self.has_signatures = true;
        }
    }

    /// End of headers, the message is inbound (R7 verifies it): moves the kept header
    /// section into the verification buffer; the body follows when the message carries
    /// signatures and stays under `max` bytes.
    pub fn start_verifying(&mut self, source: Source, max: u64) {
        // A header section larger than MAX_HEADER_BLOCK was not kept: the message is then
        // judged on SPF alone (it cannot be parsed for DKIM or DMARC).
        let header_lost = self.header_overflow;
        let mut message = std::mem::take(&mut self.header_block);
        if !header_lost {
            message.extend_from_slice(b"\r\n");
        }
        self.verifying = Some(Verifying {
            source,
            header_len: message.len(),
            message,
            body_kept: self.has_signatures && !header_lost,
            max,
        });
    }

    /// The verification state, at end of message (`None` when not verified).
    pub fn take_verifying(&mut self) -> Option<Verifying> {
        self.verifying.take()
    }

    /// The forged `Authentication-Results` to delete, highest index first (deleting one
    /// never renumbers those still to delete); `Err` when there were too many to remember.
    pub fn forged_authentication_results(&self) -> Result<Vec<i32>, TooManyForgedHeaders> {
        if self.forged_overflow {
            return Err(TooManyForgedHeaders);
        }
        let mut v = self.forged_ar.clone();
        v.sort_unstable_by(|a, b| b.cmp(a));
        Ok(v)
    }

    /// End of headers, the message is to be signed with `keys` for `domain`: starts the
    /// signer with the headers kept. Errs when they were too large to keep.
    pub fn start_signing(
        &mut self,
        domain: &str,
        keys: &[Arc<SigningKey>],
    ) -> Result<(), HeaderTooLarge> {
        if self.header_overflow {
            return Err(HeaderTooLarge);
        }
        let signer = MessageSigner::new(keys, &self.header_block);
        self.header_block = Vec::new();
        self.signing = Some((domain.to_owned(), signer));
        Ok(())
    }

    /// The signer, at end of message (`None` when the message is not signed).
    pub fn take_signer(&mut self) -> Option<(String, MessageSigner)> {
        self.signing.take()
    }

    /// A header value as the milter inserts it: with the leading space when the MTA does
    /// not add one itself.
    pub fn inserted_value(&self, value: &str) -> String {
        if self.leading_space {
            format!(" {value}")
        } else {
            value.to_owned()
        }
    }

    /// One body chunk (only when the body is negotiated): counted for the measured size,
    /// hashed by the signer when the message is signed (never kept).
    pub fn body(&mut self, chunk: &[u8]) {
        self.measured += chunk.len() as u64;
        if let Some((_, signer)) = self.signing.as_mut() {
            signer.body(chunk);
        }
        if let Some(v) = self.verifying.as_mut().filter(|v| v.body_kept) {
            if (v.message.len() + chunk.len()) as u64 > v.max {
                // Too large to keep: judged without DKIM/ARC; the body copy is dropped.
                v.body_kept = false;
                v.message.truncate(v.header_len);
                v.message.shrink_to_fit();
            } else {
                v.message.extend_from_slice(chunk);
            }
        }
    }

    /// End of message: the measured size replaces the declared one when it was measured.
    pub fn end_of_message(&mut self, m: &impl MacroSource, measured: bool) {
        self.refresh(m);
        if measured {
            self.tx.size = Some(self.measured);
        }
    }

    /// Ends the current message (EOM answered, ABORT, new MAIL): per-message state is cleared,
    /// the connection's (client, HELO, TLS) kept.
    pub fn end_message(&mut self) {
        if let Some(id) = self.tx.queue_id.take() {
            self.previous_queue_id = Some(id);
        }
        self.tx.reset_message();
        self.in_flight = None;
        self.failed = false;
        self.deferred = None;
        self.measured = 0;
        self.header_block = Vec::new();
        self.header_overflow = false;
        self.signing = None;
        self.ar_seen = 0;
        self.forged_ar = Vec::new();
        self.forged_overflow = false;
        self.has_signatures = false;
        self.verifying = None;
    }

    pub fn fail_message(&mut self) {
        self.failed = true;
    }

    pub fn message_failed(&self) -> bool {
        self.failed
    }
}

/// The client's address from the `{client_addr}` macro. Postfix gives an IPv6 client in its
/// RFC 5321 form, `IPv6:2001:db8::1` (Sendmail likewise); an IPv4 one bare.
fn client_addr(m: &impl MacroSource) -> Option<IpAddr> {
    parse_client_addr(&m.macro_value(c"{client_addr}")?)
}

fn parse_client_addr(value: &str) -> Option<IpAddr> {
    let v = value.trim();
    let v = v
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(v);
    let bare = match v.get(..5) {
        Some(p) if p.eq_ignore_ascii_case("ipv6:") => &v[5..],
        _ => v,
    };
    bare.parse().ok()
}

/// The header section is larger than [`MAX_HEADER_BLOCK`]: it was not kept, so it cannot
/// be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("header section larger than {MAX_HEADER_BLOCK} bytes cannot be signed")]
pub struct HeaderTooLarge;

/// More forged `Authentication-Results` headers than [`MAX_FORGED_AR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_FORGED_AR} forged Authentication-Results headers")]
pub struct TooManyForgedHeaders;

/// Counts one more field of a header name and keeps its mailboxes (bounded).
fn keep(h: &mut HeaderAddresses, mailboxes: Vec<Sender>) {
    h.fields = h.fields.saturating_add(1);
    let room = MAX_FROM_ADDRESSES.saturating_sub(h.mailboxes.len());
    h.mailboxes.extend(mailboxes.into_iter().take(room));
}

/// The mailboxes of one `From:` or `Sender:` field value, in order, as R8 judges them:
/// mail-parser reads the RFC 5322 address list (display names, comments, groups, encoded
/// words); each mailbox is its address, `Null` for an empty one (`<>`), or `Unparsed` with
/// the (cleaned, bounded) text of an address that is not valid. Display names are dropped.
pub(crate) fn header_mailboxes(name: &[u8], value: &[u8]) -> Vec<Sender> {
    let mut raw = Vec::with_capacity(name.len() + value.len() + 5);
    raw.extend_from_slice(name);
    raw.push(b':');
    raw.extend_from_slice(value);
    raw.extend_from_slice(b"\r\n\r\n");
    let Some(msg) = mail_parser::MessageParser::new().parse_headers(&raw) else {
        return Vec::new();
    };
    let list = if name.eq_ignore_ascii_case(b"Sender") {
        msg.sender()
    } else {
        msg.from()
    };
    list.map(|list| {
        list.mailboxes()
            .map(|m| match m.address().map(str::trim) {
                None | Some("") => Sender::Null,
                Some(a) => match Address::parse(a) {
                    Ok(a) => Sender::Address(a),
                    Err(_) => Sender::Unparsed(clean(a).unwrap_or_default()),
                },
            })
            .collect()
    })
    .unwrap_or_default()
}

/// The domains a header value names after an `@` (spaces after it skipped, as a reader
/// would), lower-cased, each once: what a `From:` field claims when its mailboxes do not
/// parse. Only names with a dot count.
fn claimed_domains(value: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(value);
    let mut out: Vec<String> = Vec::new();
    for (at, _) in text.match_indices('@') {
        let rest = text[at + 1..].trim_start_matches([' ', '\t', '\r', '\n']);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            .collect();
        let name = name.trim_matches(['.', '-']).to_ascii_lowercase();
        if name.contains('.') && !out.contains(&name) && out.len() < MAX_FROM_ADDRESSES {
            out.push(name);
        }
    }
    out
}

/// Postfix sends `[addr]` (or `unknown`) as the name of a client without reverse DNS.
fn is_unknown_name(n: &str) -> bool {
    n.starts_with('[') || n.eq_ignore_ascii_case("unknown")
}

/// Values go into logs: no control characters, bounded length, empty means absent.
pub(crate) fn clean(s: &str) -> Option<String> {
    let s: String = s
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_VALUE_LEN)
        .collect();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);

    impl MacroSource for Map {
        fn macro_value(&self, name: &CStr) -> Option<String> {
            self.0.get(name.to_str().unwrap()).map(|v| v.to_string())
        }
    }

    fn macros(pairs: &[(&'static str, &'static str)]) -> Map {
        Map(pairs.iter().copied().collect())
    }

    fn session(metrics: &Metrics) -> Session {
        Session::new(metrics.connection(Protocol::Milter))
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn client_addresses_are_read_in_postfix_s_forms() {
        for (value, want) in [
            ("192.0.2.7", Some("192.0.2.7")),
            (" 192.0.2.7 ", Some("192.0.2.7")),
            ("IPv6:2001:db8::7", Some("2001:db8::7")),
            ("ipv6:::1", Some("::1")),
            ("[IPv6:2001:db8::7]", Some("2001:db8::7")),
            ("2001:db8::7", Some("2001:db8::7")),
            ("unknown", None),
            ("IPv6:", None),
            ("", None),
        ] {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(parse_client_addr(value), want, "{value:?}");
        }
        // At MAIL, without a CONNECT stage.
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        let m = macros(&[("{client_addr}", "IPv6:2001:db8::7")]);
        s.mail(&args(&["<champa@mpt.gov.la>"]), &m).unwrap();
        assert_eq!(s.tx.client_addr, Some("2001:db8::7".parse().unwrap()));
    }

    #[test]
    fn connect_prefers_socket_address_and_skips_unknown_names() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        let m = macros(&[("{client_addr}", "198.51.100.9")]);
        s.connect("[192.0.2.1]", Some("192.0.2.1".parse().unwrap()), &m);
        assert_eq!(s.tx.client_addr, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(s.tx.client_name, None);

        // No usable socket (Unix-domain or unknown family): the macro stands in.
        s.connect("mx.example.org", None, &m);
        assert_eq!(s.tx.client_addr, Some("198.51.100.9".parse().unwrap()));
        assert_eq!(s.tx.client_name.as_deref(), Some("mx.example.org"));

        let m = macros(&[("{client_name}", "relay.mpt.gov.la")]);
        s.connect("ignored.example", None, &m);
        assert_eq!(s.tx.client_name.as_deref(), Some("relay.mpt.gov.la"));
        assert_eq!(s.tx.client_addr, None);
    }

    #[test]
    fn mail_captures_sender_auth_tls_queue_id_and_size() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.helo("client.example", &macros(&[("{tls_version}", "TLSv1.3")]));
        let m = macros(&[("i", "4XyZ1"), ("{auth_authen}", "champa")]);
        s.mail(
            &args(&["<Champa@MPT.gov.la>", "SIZE=2048", "BODY=8BITMIME"]),
            &m,
        )
        .unwrap();
        assert_eq!(
            s.tx.sender.as_ref().unwrap().address().unwrap().to_string(),
            "champa@mpt.gov.la"
        );
        assert_eq!(s.tx.queue_id.as_deref(), Some("4XyZ1"));
        assert_eq!(s.tx.sasl_username.as_deref(), Some("champa"));
        assert_eq!(s.tx.tls_version.as_deref(), Some("TLSv1.3"));
        assert_eq!(s.tx.helo.as_deref(), Some("client.example"));
        assert_eq!(s.tx.size, Some(2048));
    }

    #[test]
    fn mail_address_falls_back_to_macro_and_missing_is_an_error() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.mail(&[], &macros(&[("{mail_addr}", "a@mof.gov.la")]))
            .unwrap();
        assert_eq!(
            s.tx.sender.as_ref().unwrap().address().unwrap().to_string(),
            "a@mof.gov.la"
        );
        assert_eq!(s.mail(&[], &macros(&[])), Err(CallbackError::NoSender));
        s.mail(&args(&["<>"]), &macros(&[])).unwrap();
        assert_eq!(s.tx.sender, Some(Sender::Null));
    }

    #[test]
    fn rcpt_refreshes_queue_id_and_parses_address() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.mail(&args(&["<a@mpt.gov.la>"]), &macros(&[])).unwrap();
        assert_eq!(s.tx.queue_id, None);
        let r = s
            .rcpt(&args(&["<B@MPT.gov.la>"]), &macros(&[("i", "Q1")]))
            .unwrap();
        assert_eq!(r.unwrap().to_string(), "b@mpt.gov.la");
        assert_eq!(s.tx.queue_id.as_deref(), Some("Q1"));
        assert_eq!(s.rcpt(&args(&["<postmaster>"]), &macros(&[])), Ok(None));
        assert_eq!(
            s.rcpt(&[], &macros(&[("{rcpt_addr}", "c@mpt.gov.la")]))
                .unwrap()
                .unwrap()
                .to_string(),
            "c@mpt.gov.la"
        );
        assert_eq!(s.rcpt(&[], &macros(&[])), Err(CallbackError::NoRecipient));
    }

    #[test]
    fn end_message_keeps_connection_state() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.connect(
            "mx.example.org",
            Some("192.0.2.7".parse().unwrap()),
            &macros(&[]),
        );
        s.helo("mx.example.org", &macros(&[("{tls_version}", "TLSv1.2")]));
        s.mail(&args(&["<a@mpt.gov.la>"]), &macros(&[("i", "Q1")]))
            .unwrap();
        s.accept_rcpt("b@mpt.gov.la".parse().unwrap());
        s.fail_message();
        s.end_message();
        assert_eq!(s.tx.queue_id, None);
        assert_eq!(s.tx.sender, None);
        assert!(s.tx.recipients.is_empty());
        assert!(!s.message_failed());
        assert_eq!(s.tx.client_addr, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(s.tx.helo.as_deref(), Some("mx.example.org"));
        assert_eq!(s.tx.tls_version.as_deref(), Some("TLSv1.2"));
    }

    #[test]
    fn previous_message_queue_id_is_not_reused() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        let q1 = macros(&[("i", "Q1")]);
        s.mail(&args(&["<a@mpt.gov.la>"]), &q1).unwrap();
        assert_eq!(s.tx.queue_id.as_deref(), Some("Q1"));
        s.end_message();
        s.end_message(); // Postfix's ABORT after end of message
        // Stale MAIL-stage macros still say Q1.
        s.mail(&args(&["<a@mpt.gov.la>"]), &q1).unwrap();
        assert_eq!(s.tx.queue_id, None);
        s.rcpt(&args(&["<b@mpt.gov.la>"]), &macros(&[("i", "Q2")]))
            .unwrap();
        assert_eq!(s.tx.queue_id.as_deref(), Some("Q2"));
    }

    #[test]
    fn measured_size_counts_headers_and_body() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.mail(&args(&["<a@mpt.gov.la>", "SIZE=10"]), &macros(&[]))
            .unwrap();
        s.header(b"From", b" a@mpt.gov.la"); // 4 + 1 + 13 + 2
        s.body(&[b'x'; 100]);
        s.end_of_message(&macros(&[("i", "Q9")]), true);
        assert_eq!(s.tx.size, Some(120));
        assert_eq!(
            s.tx.header_from,
            ["a@mpt.gov.la".parse::<Address>().unwrap()]
        );
        assert_eq!(s.tx.queue_id.as_deref(), Some("Q9"));
    }

    #[test]
    fn a_from_without_a_valid_address_claims_the_domains_it_names() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.mail(&args(&["<bulk@example.org>"]), &macros(&[]))
            .unwrap();
        s.header(b"From", b" ceo @MPT.gov.la, \"x@ mof.gov.la.\"");
        assert!(s.tx.header_from.is_empty());
        assert_eq!(s.tx.header_from_claims, ["mpt.gov.la", "mof.gov.la"]);
        // A From whose every mailbox parses claims nothing beyond its addresses, even with
        // an address in its display name.
        s.end_message();
        s.mail(&args(&["<list@lists.example>"]), &macros(&[]))
            .unwrap();
        s.header(
            b"From",
            b" \"ceo@mpt.gov.la via List\" <list@lists.example>",
        );
        assert_eq!(
            s.tx.header_from,
            ["list@lists.example".parse::<Address>().unwrap()]
        );
        assert!(s.tx.header_from_claims.is_empty());
        assert_eq!(claimed_domains(b"a@localhost, b@x.y, b@X.Y"), ["x.y"]);
    }

    fn mailboxes(name: &str, value: &str) -> Vec<String> {
        header_mailboxes(name.as_bytes(), value.as_bytes())
            .iter()
            .map(|m| match m {
                Sender::Address(a) => a.to_string(),
                Sender::Null => "<>".into(),
                Sender::Unparsed(r) => format!("?{r}"),
            })
            .collect()
    }

    #[test]
    fn header_mailboxes_read_rfc5322_address_lists() {
        assert_eq!(
            mailboxes("From", " champa@mpt.gov.la"),
            ["champa@mpt.gov.la"]
        );
        // Display names (also encoded words), comments and case.
        assert_eq!(
            mailboxes(
                "From",
                " =?UTF-8?B?4LqI4Lqz4Lqb4Lqy?= (MPT) <Champa@MPT.gov.la>",
            ),
            ["champa@mpt.gov.la"]
        );
        assert_eq!(
            mailboxes(
                "From",
                " \"Dara, Cabinet\" <cabinet@mpt.gov.la>, dg@mpt.gov.la"
            ),
            ["cabinet@mpt.gov.la", "dg@mpt.gov.la"]
        );
        // Groups: their members count; an empty group holds none.
        assert_eq!(
            mailboxes("From", " Cabinet: a@mpt.gov.la, b@mpt.gov.la;"),
            ["a@mpt.gov.la", "b@mpt.gov.la"]
        );
        assert!(mailboxes("From", " undisclosed-recipients:;").is_empty());
        // `<>` and a bare word are no address (R8 then finds none, or an invalid one).
        assert!(mailboxes("From", " <>").is_empty());
        assert_eq!(mailboxes("From", " champa"), ["<>"]);
        assert_eq!(mailboxes("From", " Champa <champa>"), ["?champa"]);
        assert_eq!(
            mailboxes("Sender", " Secretary <champa@mpt.gov.la>"),
            ["champa@mpt.gov.la"]
        );
    }

    #[test]
    fn from_and_sender_fields_are_counted_separately() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.mail(&args(&["<a@mpt.gov.la>"]), &macros(&[])).unwrap();
        s.header(b"From", b" a@mpt.gov.la");
        s.header(b"from", b" Boss <dg@mpt.gov.la>");
        s.header(b"Sender", b" a@mpt.gov.la");
        s.header(b"Subject", b" from: x@y.org");
        assert_eq!(s.tx.from_fields.fields, 2);
        assert_eq!(s.tx.from_fields.mailboxes.len(), 2);
        assert_eq!(s.tx.sender_fields.fields, 1);
        assert_eq!(
            s.tx.header_from,
            [
                "a@mpt.gov.la".parse::<Address>().unwrap(),
                "dg@mpt.gov.la".parse().unwrap()
            ]
        );
        // Bounded, whatever the MTA sends.
        for _ in 0..200 {
            s.header(b"From", b" a@mpt.gov.la, b@mpt.gov.la");
        }
        assert_eq!(s.tx.from_fields.fields, 202);
        assert_eq!(s.tx.from_fields.mailboxes.len(), MAX_FROM_ADDRESSES);
        s.end_message();
        assert_eq!(s.tx.from_fields, HeaderAddresses::default());
        assert_eq!(s.tx.sender_fields, HeaderAddresses::default());
    }

    #[test]
    fn forged_authentication_results_are_indexed_per_name_highest_first() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.negotiated(true, true, true, indymilter::ProtoOpts::empty());
        s.verify_with(Some("mx.mpt.gov.la".into()));
        s.mail(&args(&["<a@example.org>"]), &macros(&[])).unwrap();
        s.header(b"Authentication-Results", b" MX.mpt.gov.la; dkim=pass");
        s.header(b"Received", b" from x");
        s.header(b"authentication-results", b" other.example; none");
        s.header(b"Authentication-Results", b" (c) mx.mpt.gov.la 1; spf=pass");
        assert_eq!(s.forged_authentication_results(), Ok(vec![3, 1]));
        s.end_message();
        assert_eq!(s.forged_authentication_results(), Ok(vec![]));
    }

    #[test]
    fn inbound_body_is_kept_once_and_only_up_to_the_limit() {
        let metrics = Metrics::new();
        let mut s = session(&metrics);
        s.negotiated(true, true, true, indymilter::ProtoOpts::empty());
        s.verify_with(Some("mx.mpt.gov.la".into()));
        s.mail(&args(&["<a@example.org>"]), &macros(&[])).unwrap();
        s.header(b"From", b" a@example.org");
        // Without a signature the body is not needed: only the header section is kept.
        s.start_verifying(Source::Outside, 1000);
        s.body(b"hello\r\n");
        let v = s.take_verifying().unwrap();
        assert_eq!(v.message, b"From: a@example.org\r\n\r\n");
        assert!(!v.body_kept);

        s.end_message();
        s.mail(&args(&["<a@example.org>"]), &macros(&[])).unwrap();
        s.header(b"DKIM-Signature", b" v=1; d=example.org");
        s.header(b"From", b" a@example.org");
        let head = b"DKIM-Signature: v=1; d=example.org\r\nFrom: a@example.org\r\n\r\n".len();
        s.start_verifying(Source::Outside, (head + 10) as u64);
        s.body(b"12345");
        s.body(b"67890");
        let v = s.take_verifying().unwrap();
        assert!(v.body_kept);
        assert!(v.message.ends_with(b"\r\n\r\n1234567890"));

        // One byte more than the limit: the body copy is dropped, the headers stay.
        s.end_message();
        s.mail(&args(&["<a@example.org>"]), &macros(&[])).unwrap();
        s.header(b"DKIM-Signature", b" v=1; d=example.org");
        s.header(b"From", b" a@example.org");
        s.start_verifying(Source::Outside, (head + 10) as u64);
        s.body(b"12345");
        s.body(b"678901");
        s.body(b"more");
        let v = s.take_verifying().unwrap();
        assert!(!v.body_kept);
        assert_eq!(v.message.len(), head);
    }

    #[test]
    fn values_are_cleaned_for_logs() {
        assert_eq!(clean("  a\r\nb\u{7}c "), Some("abc".into()));
        assert_eq!(clean("\n"), None);
        assert_eq!(clean(&"x".repeat(1000)).unwrap().len(), MAX_VALUE_LEN);
    }

    #[test]
    fn connection_gauge_follows_session_lifetime() {
        let metrics = Metrics::new();
        let s = session(&metrics);
        assert!(
            metrics
                .encode()
                .contains(r#"mailwarden_connections_open{protocol="milter"} 1"#)
        );
        drop(s);
        assert!(
            metrics
                .encode()
                .contains(r#"mailwarden_connections_open{protocol="milter"} 0"#)
        );
    }
}
