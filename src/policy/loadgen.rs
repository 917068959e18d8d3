//! A policy-protocol client and a load generator built on it, for `mailwarden bench policy`
//! and for tests that play the MTA.
//!
//! [`run`] opens `connections` connections at once; each sends `requests_per_connection` RCPT
//! requests one after the other (as Postfix does: one outstanding request per connection),
//! recipients taken round-robin from the given list starting at a different offset per
//! connection. Every request's latency (write to complete reply) is recorded.

use super::codec::{CodecError, Decoder, Limits, Request};
use crate::config::ListenAddr;
use std::{
    collections::BTreeMap,
    io,
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Limits for decoding replies (one `action=` line; generous).
const REPLY_LIMITS: Limits = Limits {
    max_request_bytes: 64 * 1024,
    max_attributes: 16,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("malformed reply: {0}")]
    Reply(#[from] CodecError),
    #[error("reply has no action attribute")]
    NoAction,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// One connection to a policy server, speaking as the MTA.
pub struct Client {
    stream: Stream,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to `addr` (`inet:` or `unix:`).
    pub async fn connect(addr: &ListenAddr) -> Result<Client, ClientError> {
        let stream = match addr {
            ListenAddr::Inet(a) => TcpStream::connect(a).await.map(|s| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            ListenAddr::Unix(p) => UnixStream::connect(p).await.map(Stream::Unix),
        }
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Client {
            stream,
            decoder: Decoder::new(REPLY_LIMITS),
            buf: vec![0; 4096],
        })
    }

    /// Sends raw bytes (tests use it for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Unix(s) => s.write_all(bytes).await,
        }
    }

    /// Waits for the next reply and returns its action (`DUNNO`, `550 5.2.1 …`).
    pub async fn read_action(&mut self) -> Result<String, ClientError> {
        loop {
            if let Some(reply) = self.decoder.next_request()? {
                return reply
                    .get("action")
                    .map(str::to_owned)
                    .ok_or(ClientError::NoAction);
            }
            let n = match &mut self.stream {
                Stream::Tcp(s) => s.read(&mut self.buf).await?,
                Stream::Unix(s) => s.read(&mut self.buf).await?,
            };
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }

    /// Sends one request and waits for its action.
    pub async fn ask(&mut self, req: &Request) -> Result<String, ClientError> {
        self.send_raw(&req.encode()?).await?;
        self.read_action().await
    }

    /// True when the server has closed the connection (reads until end of stream; any bytes
    /// before it are a protocol violation by the server and make this false).
    pub async fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let n = match &mut self.stream {
            Stream::Tcp(s) => s.read(&mut byte).await,
            Stream::Unix(s) => s.read(&mut byte).await,
        };
        matches!(n, Ok(0)) || matches!(&n, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: ListenAddr,
    /// Connections open at once (MTA `smtpd` processes with a policy connection).
    pub connections: usize,
    /// RCPT requests sent on each connection, one after the other.
    pub requests_per_connection: usize,
    /// Recipients to draw from (round-robin); must not be empty.
    pub recipients: Vec<String>,
    /// Envelope senders, drawn round-robin like the recipients (request `i` comes from
    /// `senders[i % len]`); none, or an empty string: the null sender.
    pub senders: Vec<String>,
    /// A request without a reply within this time counts as failed and ends its connection.
    pub timeout: Duration,
}

/// What came back.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered.
    pub answered: u64,
    /// Connections that failed (connect error, closed, timeout, bad reply), with the first error.
    pub failures: Vec<String>,
    /// Answers by their first word (`DUNNO`, `550`, `451`, …).
    pub actions: BTreeMap<String, u64>,
    /// Wall time from the first connect to the last answer.
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl LoadReport {
    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.answered as f64 / secs
        } else {
            0.0
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no recipients given")]
    NoRecipients,
    #[error("connections and requests per connection must be at least 1")]
    Empty,
    #[error("recipient or sender cannot be encoded: {0}")]
    Encode(#[from] CodecError),
}

/// Runs the load described by `spec` and reports latencies.
pub async fn run(spec: &LoadSpec) -> Result<LoadReport, LoadError> {
    if spec.recipients.is_empty() {
        return Err(LoadError::NoRecipients);
    }
    if spec.connections == 0 || spec.requests_per_connection == 0 {
        return Err(LoadError::Empty);
    }
    // Encode once: the generator should measure the server, not itself.
    let requests: Vec<Vec<u8>> = spec
        .recipients
        .iter()
        .enumerate()
        .map(|(i, rcpt)| {
            let sender = match spec.senders.len() {
                0 => "",
                n => spec.senders[i % n].as_str(),
            };
            rcpt_request(sender, rcpt, i).encode()
        })
        .collect::<Result<_, _>>()?;
    let requests = std::sync::Arc::new(requests);

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..spec.connections {
        let requests = requests.clone();
        let spec = spec.clone();
        tasks.spawn(async move { one_connection(&spec, &requests, c).await });
    }
    let mut latencies = Vec::with_capacity(spec.connections * spec.requests_per_connection);
    let mut report = LoadReport {
        sent: 0,
        answered: 0,
        failures: Vec::new(),
        actions: BTreeMap::new(),
        elapsed: Duration::ZERO,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
        max: Duration::ZERO,
    };
    while let Some(res) = tasks.join_next().await {
        let conn = res.expect("a load connection task panicked");
        report.sent += conn.sent;
        report.answered += conn.latencies.len() as u64;
        latencies.extend(conn.latencies);
        for (k, v) in conn.actions {
            *report.actions.entry(k).or_default() += v;
        }
        if let Some(e) = conn.failure {
            report.failures.push(e);
        }
    }
    report.elapsed = start.elapsed();
    latencies.sort_unstable();
    report.p50 = percentile(&latencies, 0.50);
    report.p99 = percentile(&latencies, 0.99);
    report.max = latencies.last().copied().unwrap_or_default();
    Ok(report)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct ConnResult {
    sent: u64,
    latencies: Vec<Duration>,
    actions: BTreeMap<String, u64>,
    failure: Option<String>,
}

async fn one_connection(spec: &LoadSpec, requests: &[Vec<u8>], index: usize) -> ConnResult {
    let mut r = ConnResult {
        sent: 0,
        latencies: Vec::with_capacity(spec.requests_per_connection),
        actions: BTreeMap::new(),
        failure: None,
    };
    let mut client = match Client::connect(&spec.target).await {
        Ok(c) => c,
        Err(e) => {
            r.failure = Some(e.to_string());
            return r;
        }
    };
    for i in 0..spec.requests_per_connection {
        let req = &requests[(index + i) % requests.len()];
        let t = Instant::now();
        r.sent += 1;
        let answer = tokio::time::timeout(spec.timeout, async {
            client.send_raw(req).await?;
            client.read_action().await
        })
        .await;
        match answer {
            Ok(Ok(action)) => {
                r.latencies.push(t.elapsed());
                let word = action.split_whitespace().next().unwrap_or("").to_owned();
                *r.actions.entry(word).or_default() += 1;
            }
            Ok(Err(e)) => {
                r.failure = Some(e.to_string());
                break;
            }
            Err(_) => {
                r.failure = Some(ClientError::Timeout(spec.timeout).to_string());
                break;
            }
        }
    }
    r
}

/// A RCPT request shaped like Postfix's (same attribute set and sizes).
pub fn rcpt_request(sender: &str, recipient: &str, n: usize) -> Request {
    let queue_id = format!("{:010X}", 0x8045F2AB23u64 + n as u64);
    // Each request is a message of its own (R14 counts a message per `instance`).
    let instance = format!("1a2b.5f3c1d2e.8a1b.{n}");
    Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("helo_name", "mail.example.org"),
        ("queue_id", queue_id.as_str()),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("client_address", "192.0.2.10"),
        ("client_name", "mail.example.org"),
        ("reverse_client_name", "mail.example.org"),
        ("instance", instance.as_str()),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("size", "4096"),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", "TLSv1.3"),
        ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
        ("encryption_keysize", "256"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("server_address", "192.0.2.1"),
        ("server_port", "25"),
        ("compatibility_level", "3.6"),
        ("mail_version", "3.7.11"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[tokio::test]
    async fn refuses_an_empty_spec() {
        let spec = LoadSpec {
            target: "inet:127.0.0.1:1".parse().unwrap(),
            connections: 1,
            requests_per_connection: 1,
            recipients: vec![],
            senders: Vec::new(),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(run(&spec).await, Err(LoadError::NoRecipients)));
        let spec = LoadSpec {
            recipients: vec!["a@b.la".into()],
            connections: 0,
            ..spec
        };
        assert!(matches!(run(&spec).await, Err(LoadError::Empty)));
    }
}
