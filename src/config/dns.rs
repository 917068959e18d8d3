//! `[dns]`: the resolver used by inbound verification (R7: SPF, DKIM, DMARC, ARC) and by
//! `mailwarden dkim check`.

use serde::Deserialize;
use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

/// One name server: `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServer(pub SocketAddr);

impl FromStr for NameServer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(NameServer(addr));
        }
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .map(|ip| NameServer(SocketAddr::new(ip, 53)))
            .map_err(|_| format!("{s:?} is not an IP address or IP:PORT"))
    }
}

impl fmt::Display for NameServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Recursive resolvers to ask (`"192.0.2.53"`, `"127.0.0.1:5353"`, `"[2001:db8::53]:53"`),
    /// over UDP with TCP fallback. Empty (default): the system's `/etc/resolv.conf`.
    pub nameservers: Vec<String>,
    /// How long one query waits for an answer before it is retried or given up.
    #[serde(with = "super::duration")]
    pub timeout: Duration,
    /// How many times a query is sent (to each name server in turn) before it fails.
    pub attempts: usize,
    /// Most DNS answers cached (by their TTL); 0 disables the cache.
    pub cache_size: u64,
    /// Upper bound on all DNS work for one message (SPF, DKIM, DMARC, ARC); past it the
    /// results still missing count as a DNS failure (R7's `on_dns_error`). Keep it well below
    /// Postfix's `milter_content_timeout` (300s).
    #[serde(with = "super::duration")]
    pub message_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(3),
            attempts: 2,
            cache_size: 10_000,
            message_timeout: Duration::from_secs(20),
        }
    }
}

impl DnsConfig {
    /// The configured name servers (all valid after `validate`).
    pub fn servers(&self) -> Vec<NameServer> {
        self.nameservers
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    pub(super) fn validate(&self, err: &mut impl FnMut(&str, String)) {
        for (i, s) in self.nameservers.iter().enumerate() {
            if let Err(e) = s.parse::<NameServer>() {
                err(&format!("dns.nameservers[{i}]"), e);
            }
        }
        if self.timeout.is_zero() {
            err("dns.timeout", "must be greater than zero".into());
        }
        if self.attempts == 0 {
            err("dns.attempts", "must be at least 1".into());
        }
        if self.message_timeout.is_zero() {
            err("dns.message_timeout", "must be greater than zero".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_servers_with_and_without_port() {
        assert_eq!(
            "127.0.0.1:5353".parse::<NameServer>().unwrap().0,
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            "192.0.2.53".parse::<NameServer>().unwrap().0,
            "192.0.2.53:53".parse().unwrap()
        );
        assert_eq!(
            "[2001:db8::1]".parse::<NameServer>().unwrap().0,
            "[2001:db8::1]:53".parse().unwrap()
        );
        assert!("ns.example".parse::<NameServer>().is_err());
    }

    #[test]
    fn bad_values_are_named_by_key() {
        let c = DnsConfig {
            nameservers: vec!["127.0.0.1:53".into(), "nope".into()],
            timeout: Duration::ZERO,
            attempts: 0,
            ..DnsConfig::default()
        };
        let mut keys = Vec::new();
        c.validate(&mut |k, _| keys.push(k.to_owned()));
        assert_eq!(keys, ["dns.nameservers[1]", "dns.timeout", "dns.attempts"]);
    }
}
