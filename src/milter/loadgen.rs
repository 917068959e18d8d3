//! A milter load generator: `connections` concurrent MTA connections, each running
//! `transactions` whole messages (MAIL, RCPT…, DATA, headers, body, end of message, ABORT)
//! against a milter, measuring each message's latency as the MTA sees it.
//! Driven by `mailwarden bench milter`.

use super::client::{Message, MtaConnection, Outcome};
use crate::config::ListenAddr;
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: ListenAddr,
    /// Concurrent MTA connections.
    pub connections: usize,
    /// Messages per connection.
    pub transactions: usize,
    /// `MAIL FROM` address (without brackets).
    pub sender: String,
    /// `RCPT TO` addresses (without brackets), all sent with every message.
    pub recipients: Vec<String>,
    /// Body bytes per message (sent only if the milter negotiated the body).
    pub body_size: usize,
    /// Per-command timeout.
    pub timeout: Duration,
}

impl LoadSpec {
    pub fn new(addr: ListenAddr, sender: &str, recipients: &[&str]) -> LoadSpec {
        LoadSpec {
            addr,
            connections: 4,
            transactions: 100,
            sender: sender.to_owned(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            body_size: 2048,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Messages the milter answered completely (whatever the verdict).
    pub transactions: u64,
    /// Of those, messages that reached end of message and were let through.
    pub delivered: u64,
    /// Of those, messages refused at some stage (MAIL, every RCPT, DATA or end of message).
    pub refused: u64,
    /// Connections that failed (I/O or protocol error); their remaining messages were not sent.
    pub failed_connections: u64,
    /// The first connection error seen, for the operator.
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Message latency (MAIL to end-of-message answer), median and 99th percentile.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl LoadReport {
    pub fn per_second(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.transactions as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connections and transactions must be at least 1")]
    Empty,
    #[error("at least one recipient is needed")]
    NoRecipient,
}

struct ConnResult {
    latencies: Vec<Duration>,
    delivered: u64,
    refused: u64,
    error: Option<String>,
}

/// Runs the load and reports. Connection failures are counted, not fatal.
pub async fn run(spec: &LoadSpec) -> Result<LoadReport, LoadError> {
    if spec.connections == 0 || spec.transactions == 0 {
        return Err(LoadError::Empty);
    }
    if spec.recipients.is_empty() {
        return Err(LoadError::NoRecipient);
    }
    let body = synthetic_body(spec.body_size);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for n in 0..spec.connections {
        let spec = spec.clone();
        let body = body.clone();
        set.spawn(async move { one_connection(&spec, n, &body).await });
    }
    let mut latencies = Vec::with_capacity(spec.connections * spec.transactions);
    let (mut delivered, mut refused, mut failed) = (0, 0, 0);
    let mut first_error = None;
    while let Some(res) = set.join_next().await {
        let r = res.unwrap_or_else(|e| ConnResult {
            latencies: Vec::new(),
            delivered: 0,
            refused: 0,
            error: Some(format!("task failed: {e}")),
        });
        latencies.extend(r.latencies);
        delivered += r.delivered;
        refused += r.refused;
        if let Some(e) = r.error {
            failed += 1;
            first_error.get_or_insert(e);
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(LoadReport {
        transactions: latencies.len() as u64,
        delivered,
        refused,
        failed_connections: failed,
        first_error,
        elapsed,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or_default(),
    })
}

async fn one_connection(spec: &LoadSpec, n: usize, body: &[u8]) -> ConnResult {
    let mut r = ConnResult {
        latencies: Vec::with_capacity(spec.transactions),
        delivered: 0,
        refused: 0,
        error: None,
    };
    if let Err(e) = drive(spec, n, body, &mut r).await {
        r.error = Some(format!("connection {n}: {e}"));
    }
    r
}

async fn drive(
    spec: &LoadSpec,
    n: usize,
    body: &[u8],
    r: &mut ConnResult,
) -> Result<(), super::client::ClientError> {
    let mut conn = MtaConnection::open(&spec.addr, spec.timeout).await?;
    // A documentation address per connection (RFC 5737), so logs tell connections apart.
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, (n % 254) as u8 + 1));
    let name = format!("loadgen{n}.example");
    conn.connect(&name, ip, &[]).await?;
    // Over TLS, like a client of a submission service (R11 refuses plain-text submission).
    conn.helo(&name, &[("{tls_version}", "TLSv1.3")]).await?;
    let sender = format!("<{}>", spec.sender);
    let rcpts: Vec<String> = spec.recipients.iter().map(|r| format!("<{r}>")).collect();
    let to = spec.recipients.join(", ");
    for t in 0..spec.transactions {
        let qid = format!("LG{n:04X}{t:06X}");
        let msg = Message {
            sender: &sender,
            recipients: rcpts.iter().map(String::as_str).collect(),
            headers: vec![
                ("From", &spec.sender),
                ("To", &to),
                ("Subject", "mailwarden load test"),
            ],
            body,
            queue_id: Some(&qid),
            ..Message::default()
        };
        let started = Instant::now();
        let out: Outcome = conn.transaction(&msg).await?;
        r.latencies.push(started.elapsed());
        if out.delivered() {
            r.delivered += 1;
        } else {
            r.refused += 1;
        }
    }
    conn.close().await
}

fn synthetic_body(size: usize) -> Vec<u8> {
    let line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n";
    line.iter().copied().cycle().take(size).collect()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&ms, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&ms[..1], 99.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn body_has_the_requested_size() {
        assert_eq!(synthetic_body(1000).len(), 1000);
        assert!(synthetic_body(0).is_empty());
    }
}
