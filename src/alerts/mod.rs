//! Owner alerts (R16): a webhook to an SMS/messaging gateway when an account logs in from a
//! country never seen for it, or is locked (R15).
//!
//! Nothing here ever waits on the mail path or on a login:
//! - [`AlertSender::send`] puts an alert into a bounded queue with `try_send`; a task
//!   delivers it ([`webhook`]: signed POST, retried with exponential backoff). A full queue
//!   drops the alert; every alert ends counted in `mailwarden_alerts_total{kind,outcome}`
//!   (`sent`, `failed`, `dropped`, `disabled`) and logged (metadata only: never the secret,
//!   never the webhook URL, which may carry credentials).
//! - [`Alerts::login`] (called at MAIL for an authenticated client, and by the Dovecot
//!   auth-policy endpoint) puts the login into a second bounded queue; a task locates the
//!   address ([`GeoIp`]), records the country for the account in the store
//!   ([`crate::store::Store::record_login_country`], atomic across instances) and raises
//!   `new_country_login` when the country is new for an account that already had one.
//!   The first located login of an account only records its country.
//!
//! The tasks start with [`Alerts::start`] (the daemon does it); without them the queues
//! only fill up and drop, which never affects mail.

mod geoip;
mod metrics;
pub mod webhook;

pub use geoip::{GeoIp, Located, is_public};
pub use metrics::AlertMetrics;
pub use webhook::{
    BadSignature, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE, backoff,
    signature, verify_signature,
};

use crate::config::{AlertsConfig, Config};
use crate::model::Address;
use crate::store::{Store, Timestamp};
use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Deliveries in progress at once (each may be waiting out a backoff).
const MAX_IN_FLIGHT: usize = 8;
/// (account, country) pairs known to be recorded, remembered to spare the store a write per
/// message; cleared when it grows past this.
const SEEN_CACHE: usize = 100_000;

/// What happened, for whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AlertEvent {
    /// The account was locked for sending (R15).
    AccountLocked {
        /// Why, in plain words (e.g. "sent 500 messages in 10 minutes, baseline 12").
        reason: String,
    },
    /// The account logged in from a country never recorded for it.
    NewCountryLogin {
        /// ISO 3166-1 alpha-2 code of the new country.
        country: String,
        /// The countries recorded before, sorted.
        known_countries: Vec<String>,
        client_address: IpAddr,
        /// Where the login was seen: `smtp`, or Dovecot's protocol (`imap`, `pop3`, ...).
        via: String,
    },
}

/// One owner alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub account: Address,
    pub event: AlertEvent,
    /// When it happened (Unix seconds).
    pub at: Timestamp,
}

impl Alert {
    /// `account_locked`, now.
    pub fn account_locked(account: Address, reason: impl Into<String>) -> Alert {
        Alert {
            account,
            event: AlertEvent::AccountLocked {
                reason: reason.into(),
            },
            at: chrono::Utc::now().timestamp(),
        }
    }

    /// The `kind` field: `account_locked` or `new_country_login`.
    pub fn kind(&self) -> &'static str {
        match self.event {
            AlertEvent::AccountLocked { .. } => "account_locked",
            AlertEvent::NewCountryLogin { .. } => "new_country_login",
        }
    }

    /// The request body: `{"id", "kind", "account", "at" (RFC 3339 UTC), ...the event's
    /// fields}`, e.g.
    ///
    /// ```json
    /// {"id":"5f0c…","account":"champa@mpt.gov.la","at":"2026-12-04T23:59:00Z",
    ///  "kind":"new_country_login","country":"TH","known_countries":["LA"],
    ///  "client_address":"198.51.100.7","via":"smtp"}
    /// ```
    pub fn to_json(&self, id: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            account: String,
            at: String,
            #[serde(flatten)]
            event: &'a AlertEvent,
        }
        let at = chrono::DateTime::from_timestamp(self.at, 0)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| self.at.to_string());
        serde_json::to_vec(&Body {
            id,
            account: self.account.to_string(),
            at,
            event: &self.event,
        })
        .expect("an alert serialises")
    }
}

/// An authenticated login to locate.
#[derive(Debug, Clone)]
struct Login {
    account: Address,
    client: IpAddr,
    via: String,
}

/// What the delivery and login tasks read: the `[alerts]` config in force, with the secret
/// and the HTTP client derived from it.
pub(crate) struct AlertsSettings {
    pub(crate) config: AlertsConfig,
    pub(crate) secret: Option<Vec<u8>>,
    pub(crate) http: Option<reqwest::Client>,
    store_timeout: Duration,
}

impl AlertsSettings {
    fn from_config(config: &Config) -> AlertsSettings {
        let a = &config.alerts;
        let http = if a.webhook_url.is_empty() {
            None
        } else {
            match crate::admin::cli::http_client(
                a.webhook_ca.as_deref(),
                a.webhook_url.starts_with("https:"),
            ) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(key = "alerts.webhook_ca", "webhook client not set up: {e}");
                    None
                }
            }
        };
        AlertsSettings {
            config: a.clone(),
            secret: a.secret().map(String::into_bytes),
            http,
            store_timeout: config.store.timeout,
        }
    }

    /// The webhook's host, what logs show of it.
    fn host(&self) -> String {
        reqwest::Url::parse(&self.config.webhook_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

struct Shared {
    settings: ArcSwap<AlertsSettings>,
    geoip: ArcSwapOption<GeoIp>,
    metrics: AlertMetrics,
    seen: Mutex<HashSet<(Address, String)>>,
}

/// The handle that raises alerts; cheap to clone. Never waits.
#[derive(Clone)]
pub struct AlertSender {
    tx: mpsc::Sender<Alert>,
    shared: Arc<Shared>,
}

/// R15's automatic locks reach the owner (R16): the checker's event hook queues an
/// `account_locked` alert, never waiting.
impl crate::events::EventSink for AlertSender {
    fn account_locked(&self, event: &crate::events::AccountLocked) {
        self.send(Alert::account_locked(
            event.address.clone(),
            event.lock.cause.to_string(),
        ));
    }
}

impl AlertSender {
    /// Queues `alert` for delivery and returns at once. With no webhook configured the alert
    /// is logged and counted as `disabled`; with the queue full it is dropped (counted,
    /// logged).
    pub fn send(&self, alert: Alert) {
        let kind = alert.kind();
        let m = &self.shared.metrics;
        if self.shared.settings.load().config.webhook_url.is_empty() {
            m.count_alert(kind, "disabled");
            tracing::info!(kind, account = %alert.account, "owner alert (no webhook configured: alerts.webhook_url)");
            return;
        }
        match self.tx.try_send(alert) {
            Ok(()) => {}
            Err(e) => {
                let alert = e.into_inner();
                m.count_alert(kind, "dropped");
                tracing::warn!(
                    kind,
                    account = %alert.account,
                    "owner alert dropped: the alert queue is full (alerts.queue_size) or stopped"
                );
            }
        }
        m.set_queue_depth("alerts", self.tx.max_capacity() - self.tx.capacity());
    }
}

/// The alert service of one daemon: the alert sender, the login feed, the GeoIP database.
pub struct Alerts {
    sender: AlertSender,
    logins: mpsc::Sender<Login>,
    shared: Arc<Shared>,
    queues: Mutex<Option<(mpsc::Receiver<Alert>, mpsc::Receiver<Login>)>>,
    tasks: TaskTracker,
}

impl Alerts {
    /// Sets up the queues (sized from `config`, fixed until restart) and opens the GeoIP
    /// database. Nothing runs until [`start`](Self::start).
    pub fn new(config: &Config, metrics: AlertMetrics) -> Alerts {
        let (tx, alerts) = mpsc::channel(config.alerts.queue_size.max(1));
        let (logins, login_rx) = mpsc::channel(config.alerts.login_queue_size.max(1));
        let shared = Arc::new(Shared {
            settings: ArcSwap::from_pointee(AlertsSettings::from_config(config)),
            geoip: ArcSwapOption::empty(),
            metrics,
            seen: Mutex::new(HashSet::new()),
        });
        let a = Alerts {
            sender: AlertSender {
                tx,
                shared: shared.clone(),
            },
            logins,
            shared,
            queues: Mutex::new(Some((alerts, login_rx))),
            tasks: TaskTracker::new(),
        };
        // Closed from the start: `stopped` returns once whatever `start` spawned has ended.
        a.tasks.close();
        a.load_geoip(&config.alerts);
        a
    }

    /// The handle other parts use to raise alerts (R15's lock: `Alert::account_locked`).
    pub fn sender(&self) -> AlertSender {
        self.sender.clone()
    }

    /// Raises `alert` (see [`AlertSender::send`]).
    pub fn send(&self, alert: Alert) {
        self.sender.send(alert)
    }

    /// An authenticated login of `login` from `client`, seen `via` (`smtp`, `imap`, ...):
    /// queued for new-country detection; returns at once. Logins that are not an address,
    /// and any login when no GeoIP database is configured, are ignored.
    pub fn login(&self, login: &str, client: IpAddr, via: &str) {
        let m = &self.shared.metrics;
        if self.shared.geoip.load().is_none() {
            return;
        }
        let Ok(account) = Address::parse(login) else {
            m.count_login("not_an_address");
            return;
        };
        let via: String = via
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(16)
            .collect();
        let login = Login {
            account,
            client,
            via: if via.is_empty() {
                "unknown".into()
            } else {
                via
            },
        };
        if self.logins.try_send(login).is_err() {
            m.count_login("dropped");
        }
        m.set_queue_depth(
            "logins",
            self.logins.max_capacity() - self.logins.capacity(),
        );
    }

    /// Takes a new configuration (SIGHUP): webhook settings at once, the GeoIP database
    /// re-read from its file (also when the path is unchanged: the file may have been
    /// updated). A database that cannot be read keeps the old one, logged by key.
    pub fn reload(&self, config: &Config) {
        let old = self.shared.settings.load();
        for (key, a, b) in [
            (
                "alerts.queue_size",
                old.config.queue_size,
                config.alerts.queue_size,
            ),
            (
                "alerts.login_queue_size",
                old.config.login_queue_size,
                config.alerts.login_queue_size,
            ),
        ] {
            if a != b {
                tracing::warn!(
                    key,
                    old = a,
                    new = b,
                    "changing this key needs a restart; keeping the old value"
                );
            }
        }
        self.shared
            .settings
            .store(Arc::new(AlertsSettings::from_config(config)));
        self.load_geoip(&config.alerts);
    }

    fn load_geoip(&self, config: &AlertsConfig) {
        match &config.geoip_database {
            None => self.shared.geoip.store(None),
            Some(path) => match GeoIp::open(path) {
                Ok(db) => {
                    tracing::info!(database_type = db.database_type(), file = %path.display(), "GeoIP database loaded");
                    self.shared.geoip.store(Some(Arc::new(db)));
                }
                Err(e) => {
                    tracing::error!(
                        key = "alerts.geoip_database",
                        "GeoIP database not (re)loaded: {e}"
                    );
                }
            },
        }
    }

    /// Starts the delivery and login tasks (once; later calls return `false`). They stop when
    /// `shutdown` is cancelled: alerts still queued or waiting for a retry are then counted
    /// as dropped.
    pub fn start(&self, store: Arc<dyn Store>, shutdown: CancellationToken) -> bool {
        let Some((alerts, logins)) = self.queues.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return false;
        };
        self.tasks
            .spawn(deliveries(self.shared.clone(), alerts, shutdown.clone()));
        self.tasks.spawn(locate_logins(
            self.shared.clone(),
            self.sender.clone(),
            logins,
            store,
            shutdown,
        ));
        true
    }

    /// Waits until the tasks started by [`start`](Self::start) have stopped (after
    /// `shutdown`): every alert is then counted with its final outcome.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

/// Takes alerts off the queue and delivers up to [`MAX_IN_FLIGHT`] at once.
async fn deliveries(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Alert>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let alert = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = rx.recv() => match a { Some(a) => a, None => break },
        };
        shared.metrics.set_queue_depth("alerts", rx.len());
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tasks.spawn(async move {
            deliver(&shared, alert, &shutdown).await;
            drop(permit);
        });
    }
    rx.close();
    while let Ok(alert) = rx.try_recv() {
        shared.metrics.count_alert(alert.kind(), "dropped");
        tracing::warn!(kind = alert.kind(), account = %alert.account, "owner alert dropped: shutting down");
    }
    shared.metrics.set_queue_depth("alerts", 0);
    tasks.close();
    tasks.wait().await;
}

/// Delivers one alert: attempts with backoff until success, a refusal, the last attempt, or
/// shutdown. Reads the settings at each attempt, so a reload fixing the URL helps at once.
async fn deliver(shared: &Shared, alert: Alert, shutdown: &CancellationToken) {
    let (kind, m) = (alert.kind(), &shared.metrics);
    let id = webhook::new_id();
    let body = alert.to_json(&id);
    let mut attempt = 1u32;
    loop {
        let s = shared.settings.load_full();
        if s.config.webhook_url.is_empty() {
            m.count_alert(kind, "disabled");
            tracing::info!(kind, account = %alert.account, id, "owner alert not sent: the webhook was removed from the config");
            return;
        }
        let host = s.host();
        match webhook::attempt(&s, &id, &body).await {
            webhook::Attempt::Delivered(status) => {
                m.count_attempt("ok");
                m.count_alert(kind, "sent");
                tracing::info!(kind, account = %alert.account, id, host, status, attempt, "owner alert sent");
                return;
            }
            webhook::Attempt::Refused(status) => {
                m.count_attempt("refused");
                m.count_alert(kind, "failed");
                tracing::error!(kind, account = %alert.account, id, host, status, attempt, "owner alert refused by the webhook (not retried)");
                return;
            }
            webhook::Attempt::Retryable(reason) => {
                m.count_attempt("retryable");
                if attempt >= s.config.webhook_max_attempts {
                    m.count_alert(kind, "failed");
                    tracing::error!(kind, account = %alert.account, id, host, attempt, "owner alert not delivered after the last attempt: {reason}");
                    return;
                }
                let wait = backoff(
                    s.config.webhook_backoff,
                    s.config.webhook_backoff_max,
                    attempt,
                );
                tracing::warn!(kind, account = %alert.account, id, host, attempt, retry_in = ?wait, "owner alert attempt failed: {reason}");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        m.count_alert(kind, "dropped");
                        tracing::warn!(kind, account = %alert.account, id, "owner alert dropped: shutting down before its next attempt");
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                attempt += 1;
            }
        }
    }
}

/// Takes logins off the queue, one at a time.
async fn locate_logins(
    shared: Arc<Shared>,
    alerts: AlertSender,
    mut rx: mpsc::Receiver<Login>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) {
    loop {
        let login = tokio::select! {
            _ = shutdown.cancelled() => return,
            l = rx.recv() => match l { Some(l) => l, None => return },
        };
        shared.metrics.set_queue_depth("logins", rx.len());
        locate(&shared, &alerts, &*store, login).await;
    }
}

/// New-country detection for one login.
async fn locate(shared: &Shared, alerts: &AlertSender, store: &dyn Store, login: Login) {
    let m = &shared.metrics;
    let Some(db) = shared.geoip.load_full() else {
        m.count_geoip("no_database");
        return;
    };
    let country = match db.locate(login.client) {
        Located::Country(c) => {
            m.count_geoip("found");
            c
        }
        Located::Private => {
            m.count_geoip("private");
            m.count_login("not_located");
            return;
        }
        Located::Unknown => {
            m.count_geoip("unknown");
            m.count_login("not_located");
            return;
        }
    };
    let key = (login.account.clone(), country.clone());
    if shared
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key)
    {
        m.count_login("known");
        return;
    }
    let timeout = shared.settings.load().store_timeout;
    let now = chrono::Utc::now().timestamp();
    let recorded = match tokio::time::timeout(
        timeout,
        store.record_login_country(&login.account, &country, now),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            m.count_login("store_error");
            tracing::warn!(account = %login.account, "login country not recorded: {e}");
            return;
        }
        Err(_) => {
            m.count_login("store_error");
            tracing::warn!(account = %login.account, "login country not recorded: no answer within {timeout:?}");
            return;
        }
    };
    {
        let mut seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= SEEN_CACHE {
            seen.clear();
        }
        seen.insert(key);
    }
    if !recorded.new {
        m.count_login("known");
    } else if recorded.known_before.is_empty() {
        m.count_login("first_country");
        tracing::info!(account = %login.account, country, via = login.via, "first login country recorded");
    } else {
        m.count_login("new_country");
        tracing::warn!(account = %login.account, country, known = ?recorded.known_before, via = login.via, "login from a new country");
        alerts.send(Alert {
            account: login.account,
            event: AlertEvent::NewCountryLogin {
                country,
                known_countries: recorded.known_before,
                client_address: login.client,
                via: login.via,
            },
            at: now,
        });
    }
}

#[cfg(test)]
mod tests;
