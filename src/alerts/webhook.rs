//! The webhook sink: signing, the retry schedule, and one delivery attempt.
//!
//! # What the receiver gets
//!
//! `POST <alerts.webhook_url>` with `Content-Type: application/json` and the alert as the
//! body (see [`super::Alert::to_json`]), plus:
//!
//! - `X-Mailwarden-Alert-Id: <32 hex digits>`: the same for every attempt of one alert (and
//!   in the body as `id`), so a receiver can drop a repeat of an alert it already handled;
//! - `X-Mailwarden-Timestamp: <Unix seconds>`: when this attempt was signed;
//! - `X-Mailwarden-Signature: sha256=<64 hex digits>`: HMAC-SHA256 with the shared secret
//!   (`alerts.webhook_secret`) over the bytes `<timestamp>` `.` `<body>`.
//!
//! The receiver verifies: recompute the HMAC over the timestamp header, a dot and the raw
//! body exactly as received; compare with the signature in constant time; refuse when the
//! timestamp is more than 5 minutes from its own clock (a replayed old request), and when
//! it has already seen the alert id within that window. [`verify_signature`] does the first
//! three steps.
//!
//! # Retries
//!
//! A 2xx answer is success. A connection error, a timeout, 408, 429 or any 5xx is retried
//! after [`backoff`]: `webhook_backoff`, doubled after each further failure, at most
//! `webhook_backoff_max`, until `webhook_max_attempts` attempts were made. Any other answer
//! (a 4xx: the request itself is refused, e.g. a bad signature) is not retried.

use super::AlertsSettings;
use aws_lc_rs::hmac;
use std::time::Duration;

pub const ID_HEADER: &str = "X-Mailwarden-Alert-Id";
pub const TIMESTAMP_HEADER: &str = "X-Mailwarden-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Mailwarden-Signature";
/// How far a receiver should accept a timestamp from its own clock.
pub const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(300);

/// `sha256=<hex>`: HMAC-SHA256 over `<timestamp>.<body>` with `secret`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex(ctx.sign().as_ref()))
}

/// Why a signed request was refused by [`verify_signature`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadSignature {
    /// The timestamp header is not a number.
    Timestamp,
    /// The timestamp is further than the tolerance from `now` (replay, or clock skew).
    Stale,
    /// The signature header is not `sha256=<hex>`, or does not match.
    Mismatch,
}

/// The receiver's check: `signature_header` is the HMAC of `timestamp_header` `.` `body`
/// under `secret`, and the timestamp is within `tolerance` of `now` (Unix seconds).
/// Compared in constant time.
pub fn verify_signature(
    secret: &[u8],
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), BadSignature> {
    let ts: i64 = timestamp_header
        .trim()
        .parse()
        .map_err(|_| BadSignature::Timestamp)?;
    if now.abs_diff(ts) > tolerance.as_secs() {
        return Err(BadSignature::Stale);
    }
    let given = signature_header
        .trim()
        .strip_prefix("sha256=")
        .and_then(unhex)
        .ok_or(BadSignature::Mismatch)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut msg = Vec::with_capacity(body.len() + 24);
    msg.extend_from_slice(timestamp_header.trim().as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    hmac::verify(&key, &msg, &given).map_err(|_| BadSignature::Mismatch)
}

/// The wait after failed attempt number `attempt` (1 for the first): `base * 2^(attempt-1)`,
/// at most `max`.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A random alert id: 16 bytes as hex.
pub(super) fn new_id() -> String {
    let mut b = [0u8; 16];
    // The system RNG does not fail on Linux; a zero id would still be a valid (if not
    // unique) id, never a reason to lose an alert.
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex(&b)
}

/// How one attempt ended.
#[derive(Debug)]
pub(super) enum Attempt {
    Delivered(u16),
    /// Worth another try: connection error, timeout, 408, 429, 5xx.
    Retryable(String),
    /// The receiver refused the request itself (another 4xx): retrying cannot help.
    Refused(u16),
}

/// One signed POST of `body`.
pub(super) async fn attempt(s: &AlertsSettings, id: &str, body: &[u8]) -> Attempt {
    let (Some(http), Some(secret)) = (&s.http, &s.secret) else {
        return Attempt::Retryable("the webhook client is not configured".into());
    };
    let ts = chrono::Utc::now().timestamp();
    let sent = http
        .post(&s.config.webhook_url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(ID_HEADER, id)
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, signature(secret, ts, body))
        .timeout(s.config.webhook_timeout)
        .body(body.to_vec())
        .send()
        .await;
    match sent {
        // The URL may carry credentials: never show it.
        Err(e) => Attempt::Retryable(describe(&e.without_url())),
        Ok(r) => {
            let code = r.status().as_u16();
            match code {
                200..=299 => Attempt::Delivered(code),
                408 | 429 | 500..=599 => Attempt::Retryable(format!("HTTP {code}")),
                _ => Attempt::Refused(code),
            }
        }
    }
}

/// An error with its causes, on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-secret";

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        let body = br#"{"kind":"account_locked"}"#;
        let sig = signature(SECRET, 1_796_000_000, body);
        // Independent computation of the documented scheme.
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
        let expected = hmac::sign(&key, b"1796000000.{\"kind\":\"account_locked\"}");
        assert_eq!(sig, format!("sha256={}", hex(expected.as_ref())));
        assert_eq!(sig.len(), "sha256=".len() + 64);
        assert_eq!(
            verify_signature(
                SECRET,
                "1796000000",
                &sig,
                body,
                1_796_000_010,
                TIMESTAMP_TOLERANCE
            ),
            Ok(())
        );
    }

    #[test]
    fn verification_refuses_changed_body_other_secret_and_stale_timestamps() {
        let body = b"{\"a\":1}";
        let sig = signature(SECRET, 1_796_000_000, body);
        let now = 1_796_000_000;
        let check = |secret: &[u8], ts: &str, sig: &str, body: &[u8], now| {
            verify_signature(secret, ts, sig, body, now, TIMESTAMP_TOLERANCE)
        };
        assert_eq!(
            check(SECRET, "1796000000", &sig, b"{\"a\":2}", now),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(
            check(b"another-secret-of-16", "1796000000", &sig, body, now),
            Err(BadSignature::Mismatch)
        );
        // The timestamp is signed: moving it breaks the signature.
        assert_eq!(
            check(SECRET, "1796000001", &sig, body, now),
            Err(BadSignature::Mismatch)
        );
        // Replayed later than the tolerance.
        assert_eq!(
            check(SECRET, "1796000000", &sig, body, now + 301),
            Err(BadSignature::Stale)
        );
        assert_eq!(
            check(SECRET, "soon", &sig, body, now),
            Err(BadSignature::Timestamp)
        );
        assert_eq!(
            check(SECRET, "1796000000", "md5=00", body, now),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(
            check(SECRET, "1796000000", "sha256=zz", body, now),
            Err(BadSignature::Mismatch)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        let schedule: Vec<_> = (1..=8).map(|a| backoff(s(2), s(60), a)).collect();
        assert_eq!(
            schedule,
            [s(2), s(4), s(8), s(16), s(32), s(60), s(60), s(60)]
        );
        assert_eq!(
            backoff(s(1), s(300), 40),
            s(300),
            "no overflow on huge attempt numbers"
        );
        assert_eq!(
            backoff(Duration::from_millis(10), s(1), 1),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
