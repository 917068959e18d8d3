//! `[alerts]`: owner alerts (R16) — the webhook sink and new-country login detection.

use serde::Deserialize;
use std::{path::PathBuf, time::Duration};

/// Owner alerts (R16). With no `webhook_url`, alerts are only logged and counted
/// (`mailwarden_alerts_total{outcome="disabled"}`); with no `geoip_database`, logins are not
/// located and no `new_country_login` alert is raised.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Where alerts are POSTed as JSON (`http://` or `https://`), e.g. the SMS/messaging
    /// gateway's endpoint. Empty: no webhook.
    pub webhook_url: String,
    /// The HMAC-SHA256 key that signs each request (at least 16 characters). Prefer
    /// `webhook_secret_file`.
    pub webhook_secret: Option<String>,
    /// File holding the secret (first line).
    pub webhook_secret_file: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for an `https://` webhook; default: the system's roots.
    pub webhook_ca: Option<PathBuf>,
    /// Longest one delivery attempt may take (connect, send, answer).
    #[serde(with = "super::duration")]
    pub webhook_timeout: Duration,
    /// Attempts per alert, the first included; after the last failed one the alert is
    /// counted as `failed` and logged.
    pub webhook_max_attempts: u32,
    /// Wait before the first retry; doubled before each further retry.
    #[serde(with = "super::duration")]
    pub webhook_backoff: Duration,
    /// Longest wait between two attempts.
    #[serde(with = "super::duration")]
    pub webhook_backoff_max: Duration,
    /// Alerts waiting for delivery; when full, a new alert is dropped (counted, logged).
    pub queue_size: usize,
    /// MaxMind-format country database (`GeoLite2-Country.mmdb`, `GeoIP2-Country.mmdb`, or
    /// a City database). Re-read on SIGHUP. Empty: no new-country detection.
    pub geoip_database: Option<PathBuf>,
    /// Logins waiting to be located and recorded; when full, a login is skipped (counted).
    pub login_queue_size: usize,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_url: String::new(),
            webhook_secret: None,
            webhook_secret_file: None,
            webhook_ca: None,
            webhook_timeout: Duration::from_secs(10),
            webhook_max_attempts: 5,
            webhook_backoff: Duration::from_secs(2),
            webhook_backoff_max: Duration::from_secs(300),
            queue_size: 1000,
            geoip_database: None,
            login_queue_size: 10_000,
        }
    }
}

impl AlertsConfig {
    /// The webhook secret, from the config or its file (`None` if neither is readable).
    pub fn secret(&self) -> Option<String> {
        match (&self.webhook_secret, &self.webhook_secret_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .ok()?
                    .lines()
                    .next()?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        }
    }

    pub(super) fn validate(&self, err: &mut impl FnMut(&str, String)) {
        if !self.webhook_url.is_empty() {
            match reqwest::Url::parse(&self.webhook_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                Ok(_) => err(
                    "alerts.webhook_url",
                    "must be an http:// or https:// URL with a host".into(),
                ),
                Err(e) => err("alerts.webhook_url", format!("not a URL: {e}")),
            }
            match (&self.webhook_secret, &self.webhook_secret_file) {
                (Some(_), Some(_)) => err(
                    "alerts.webhook_secret",
                    "set either webhook_secret or webhook_secret_file, not both".into(),
                ),
                (None, None) => err(
                    "alerts.webhook_secret",
                    "a webhook needs a signing secret (webhook_secret or webhook_secret_file)"
                        .into(),
                ),
                (Some(s), None) if s.len() < 16 => err(
                    "alerts.webhook_secret",
                    "must be at least 16 characters".into(),
                ),
                (None, Some(p)) => match std::fs::read_to_string(p) {
                    Ok(s) if s.lines().next().unwrap_or("").trim().len() >= 16 => {}
                    Ok(_) => err(
                        "alerts.webhook_secret_file",
                        "secret must be at least 16 characters".into(),
                    ),
                    Err(e) => err(
                        "alerts.webhook_secret_file",
                        format!("cannot read {}: {e}", p.display()),
                    ),
                },
                _ => {}
            }
        }
        if let Some(p) = &self.webhook_ca {
            if !p.is_file() {
                err(
                    "alerts.webhook_ca",
                    format!("{} is not a readable file", p.display()),
                );
            }
        }
        if self.webhook_timeout.is_zero() {
            err("alerts.webhook_timeout", "must be greater than zero".into());
        }
        if !(1..=20).contains(&self.webhook_max_attempts) {
            err(
                "alerts.webhook_max_attempts",
                "must be between 1 and 20".into(),
            );
        }
        if self.webhook_backoff.is_zero() {
            err("alerts.webhook_backoff", "must be greater than zero".into());
        }
        if self.webhook_backoff_max < self.webhook_backoff {
            err(
                "alerts.webhook_backoff_max",
                "must be at least webhook_backoff".into(),
            );
        }
        if !(1..=1_000_000).contains(&self.queue_size) {
            err("alerts.queue_size", "must be between 1 and 1000000".into());
        }
        if !(1..=1_000_000).contains(&self.login_queue_size) {
            err(
                "alerts.login_queue_size",
                "must be between 1 and 1000000".into(),
            );
        }
        if let Some(p) = &self.geoip_database {
            if let Err(e) = crate::alerts::GeoIp::open(p) {
                err("alerts.geoip_database", e);
            }
        }
    }
}
