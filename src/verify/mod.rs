//! Inbound verification (R7) with mail-auth: SPF (HELO and MAIL FROM, RFC 7208), DKIM
//! (RFC 6376, RFC 8463), ARC (RFC 8617) and DMARC — mail-auth 0.15 implements DMARC as in
//! RFC 9989 (DMARCbis: DNS tree walk instead of the public suffix list), not RFC 7489 — and
//! the `Authentication-Results` header (RFC 8601) that reports them.
//!
//! The DNS resolver ([`Resolver`]) is built from `[dns]`: name servers (with port), query
//! timeout and attempts, cache size (hickory's answer cache). Its results feed the pure R7
//! decision ([`crate::engine::rules::spoofing`]) as an [`Evidence`].

use crate::config::DnsConfig;
use crate::engine::rules::spoofing::{Check, Evidence};
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
    dmarc::verify::DmarcParameters,
    dns::{DnsCache, NoCache, Parameters},
    hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts},
    spf::verify::SpfParameters,
};
use std::{net::IpAddr, time::Duration};

pub mod check;

/// A resolver built from `[dns]`. Cheap to clone (shares the resolver and its cache).
#[derive(Clone)]
pub struct Resolver {
    pub(crate) auth: MessageAuthenticator,
    message_timeout: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("message_timeout", &self.message_timeout)
            .finish()
    }
}

/// The resolver could not be built (bad system configuration).
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct ResolverError(String);

impl Resolver {
    pub fn new(config: &DnsConfig) -> Result<Resolver, ResolverError> {
        let servers = config.servers();
        let (rc, mut opts) = if servers.is_empty() {
            mail_auth::hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| ResolverError(e.to_string()))?
        } else {
            let mut rc = ResolverConfig::from_name_servers(Vec::new());
            for s in servers {
                let mut ns = NameServerConfig::udp_and_tcp(s.0.ip());
                for c in &mut ns.connections {
                    c.port = s.0.port();
                }
                rc.add_name_server(ns);
            }
            (rc, ResolverOpts::default())
        };
        opts.timeout = config.timeout;
        opts.attempts = config.attempts;
        opts.cache_size = config.cache_size;
        let auth = MessageAuthenticator::new(rc, opts).map_err(|e| ResolverError(e.to_string()))?;
        Ok(Resolver {
            auth,
            message_timeout: config.message_timeout,
        })
    }
}

/// What the MTA told us about the message's origin.
#[derive(Debug, Clone, Copy, Default)]
pub struct Envelope<'a> {
    pub client_ip: Option<IpAddr>,
    /// The HELO/EHLO name.
    pub helo: Option<&'a str>,
    /// The MAIL FROM address; `Some("")` for the null sender.
    pub mail_from: Option<&'a str>,
}

/// The outcome of verifying one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The `Authentication-Results` value: `authserv-id; method=result ...`, CRLF-folded.
    pub header: String,
    /// For R7.
    pub evidence: Evidence,
    /// `(method, result)` pairs for the metrics: `spf`, `dkim` (one per signature, `none`
    /// without), `dmarc`, `arc`.
    pub results: Vec<(&'static str, &'static str)>,
}

impl Report {
    /// No resolver: every check counts as a DNS failure.
    pub fn dns_failure(authserv_id: &str) -> Report {
        timed_out(authserv_id)
    }

    /// The header value as the milter protocol carries it: folded with LF, with a leading
    /// space when the MTA does not add one.
    pub fn milter_value(&self) -> String {
        self.header.replace("\r\n", "\n")
    }
}

/// Verifies `message` (header section, the empty line, and the body when `body_kept`).
/// Without the body, DKIM and ARC are not evaluated (reported `none`): the message had no
/// signature, or it was larger than R7's `max_message_size`.
pub async fn verify(
    resolver: &Resolver,
    authserv_id: &str,
    envelope: Envelope<'_>,
    message: &[u8],
    body_kept: bool,
) -> Report {
    verify_with_cache::<NoCache>(resolver, None, authserv_id, envelope, message, body_kept).await
}

/// [`verify`] with a DNS cache supplied per call (tests seed one; no live DNS).
pub async fn verify_with_cache<C: DnsCache>(
    resolver: &Resolver,
    cache: Option<&C>,
    authserv_id: &str,
    envelope: Envelope<'_>,
    message: &[u8],
    body_kept: bool,
) -> Report {
    match tokio::time::timeout(
        resolver.message_timeout,
        run(resolver, cache, authserv_id, envelope, message, body_kept),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => timed_out(authserv_id),
    }
}

fn timed_out(authserv_id: &str) -> Report {
    Report {
        header: format!(
            "{authserv_id};\r\n\tspf=temperror (DNS lookups timed out);\r\n\tdkim=temperror (DNS lookups timed out)"
        ),
        evidence: Evidence {
            timed_out: true,
            ..Evidence::default()
        },
        results: vec![("spf", "temperror"), ("dkim", "temperror")],
    }
}

async fn run<C: DnsCache>(
    resolver: &Resolver,
    cache: Option<&C>,
    authserv_id: &str,
    envelope: Envelope<'_>,
    raw: &[u8],
    body_kept: bool,
) -> Report {
    let auth = &resolver.auth;
    let mut ar = AuthenticationResults::new(authserv_id);
    let mut evidence = Evidence::default();
    let mut results = Vec::new();

    let message = AuthenticatedMessage::parse(raw);
    let from = message
        .as_ref()
        .map(|m| m.first_from_address().to_owned())
        .unwrap_or_default();

    // SPF: HELO identity, then MAIL FROM (RFC 7208 §2.3, §2.4). The checked domain for
    // alignment is the MAIL FROM domain, or the HELO name for the null sender.
    let helo = envelope.helo.filter(|h| !h.is_empty());
    let mut spf_for_dmarc = None;
    if let Some(ip) = envelope.client_ip {
        let helo_name = helo.unwrap_or("unknown");
        let mut helo_out = None;
        if let Some(h) = helo {
            let p = SpfParameters::helo(ip, h, authserv_id);
            let out = auth.check_host(with(cache, p)).await;
            ar.set_spf_result(&out, &p);
            helo_out = Some((h.to_owned(), out));
        }
        match envelope.mail_from.filter(|m| !m.is_empty()) {
            Some(mail_from) => {
                let p = SpfParameters::mail_from(ip, helo_name, authserv_id, mail_from);
                let out = auth.check_host(with(cache, p)).await;
                ar.set_spf_result(&out, &p);
                let domain = mail_from
                    .rsplit_once('@')
                    .map_or(helo_name, |(_, d)| d)
                    .to_ascii_lowercase();
                spf_for_dmarc = Some((domain, out));
            }
            None => spf_for_dmarc = helo_out,
        }
    }
    match &spf_for_dmarc {
        Some((domain, out)) => {
            results.push(("spf", spf_label(out.result())));
            evidence.spf = Some((domain.clone(), spf_check(out.result())));
        }
        None => results.push(("spf", "none")),
    }

    let Some(message) = message else {
        // Not a message mail-auth can parse: nothing more to check.
        results.push(("dkim", "none"));
        return finish(ar, evidence, results);
    };

    // DKIM and ARC need the body; DMARC uses the DKIM results.
    let dkim = if body_kept {
        auth.verify_dkim(with(cache, &message)).await
    } else {
        Vec::new()
    };
    if dkim.is_empty() {
        results.push(("dkim", "none"));
    }
    for out in &dkim {
        results.push(("dkim", dkim_label(out.result())));
        if let Some(sig) = out.signature() {
            evidence
                .dkim
                .push((sig.d.to_ascii_lowercase(), dkim_check(out.result())));
        }
    }
    if !dkim.is_empty() {
        ar.set_dkim_results(&dkim, &from);
    }
    if body_kept && !message.arc_message_signatures().is_empty() {
        let arc = auth.verify_arc(with(cache, &message)).await;
        results.push(("arc", dkim_label(arc.result())));
        if let Some(ip) = envelope.client_ip {
            ar.set_arc_result(&arc, ip);
        }
    } else {
        results.push(("arc", "none"));
    }
    if let Some((domain, spf)) = &spf_for_dmarc {
        let dmarc = auth
            .verify_dmarc(with(
                cache,
                DmarcParameters::new(&message, &dkim, domain, spf),
            ))
            .await;
        results.push(("dmarc", dmarc_label(&dmarc.result())));
        if dmarc.result() != DmarcResult::None {
            ar.set_dmarc_result(&dmarc);
        }
    } else {
        results.push(("dmarc", "none"));
    }
    finish(ar, evidence, results)
}

fn with<'x, P, C: DnsCache>(cache: Option<&'x C>, input: P) -> Parameters<'x, P, C> {
    Parameters { input, cache }
}

fn finish(
    ar: AuthenticationResults<'_>,
    evidence: Evidence,
    results: Vec<(&'static str, &'static str)>,
) -> Report {
    let mut header = ar.to_string();
    if !header.contains(';') {
        // RFC 8601 §2.2: "none" when no method was applied.
        header.push_str("; none");
    }
    Report {
        header,
        evidence,
        results,
    }
}

fn spf_check(r: SpfResult) -> Check {
    match r {
        SpfResult::Pass => Check::Pass,
        SpfResult::TempError => Check::TempError,
        _ => Check::Other,
    }
}

fn dkim_check(r: &DkimResult) -> Check {
    match r {
        DkimResult::Pass => Check::Pass,
        DkimResult::TempError(_) => Check::TempError,
        _ => Check::Other,
    }
}

/// RFC 8601 result names, also the metric labels.
fn spf_label(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_label(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn dmarc_label(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

/// An authserv-id (RFC 8601 §2.5): a host name.
pub fn valid_authserv_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// This host's name, the default authserv-id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| valid_authserv_id(s))
        .unwrap_or_else(|| "localhost".into())
}

/// The authserv-id of an existing `Authentication-Results` value (the first token, before
/// any version number or `;`), lowercased; `None` if there is none.
pub fn authserv_id_of(value: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(value);
    let s = strip_comments(&s);
    let token = s
        .split(|c: char| c == ';' || c.is_whitespace())
        .find(|t| !t.is_empty())?;
    Some(token.to_ascii_lowercase())
}

/// CFWS may precede the authserv-id: drop `( … )` comments (nesting included).
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if depth > 0 => escaped = true,
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests;
