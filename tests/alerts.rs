//! Owner alerts (R16) against a real HTTP receiver on 127.0.0.1:0: signed delivery, retries
//! with backoff, giving up after the last attempt; and Dovecot's auth-policy requests
//! feeding new-country detection through the admin API.

mod common;

use common::{ADMIN, Api, READ, mmdb::Mmdb, webhook::Receiver};
use mailwarden::alerts::Alert;
use mailwarden::config::{Scope, TokenConfig};
use mailwarden::model::Address;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "alert-secret-0123456789";
const DOVECOT: &str = "dovecot-policy-token-0123";

fn champa() -> Address {
    Address::parse("champa@mpt.gov.la").unwrap()
}

/// The admin API with alerts wired to `receiver`, a GeoIP database (192.0.2.0/24: LA,
/// 198.51.100.0/24: TH), a token for Dovecot, and the alert tasks running.
async fn api(receiver: &Receiver, attempts: u32) -> (Api, CancellationToken) {
    let url = receiver.url.clone();
    let api = Api::start_with(move |c, dir| {
        let db = dir.join("country.mmdb");
        Mmdb::new()
            .country("192.0.2.0/24", "LA")
            .country("198.51.100.0/24", "TH")
            .write(&db);
        c.alerts.webhook_url = url;
        c.alerts.webhook_secret = Some(SECRET.into());
        c.alerts.webhook_max_attempts = attempts;
        c.alerts.webhook_backoff = Duration::from_millis(20);
        c.alerts.webhook_backoff_max = Duration::from_millis(50);
        c.alerts.geoip_database = Some(db);
        c.admin.tokens.push(TokenConfig {
            name: "dovecot".into(),
            token: Some(DOVECOT.into()),
            token_file: None,
            scopes: vec![Scope::AuthPolicy],
        });
    })
    .await;
    let stop = CancellationToken::new();
    assert!(api.checker.alerts.start(api.store.clone(), stop.clone()));
    (api, stop)
}

/// Stops the alert tasks and waits for them, so every alert has its final count.
async fn finish(api: &Api, stop: &CancellationToken) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), api.checker.alerts.stopped())
        .await
        .expect("alert tasks stop");
}

fn count(api: &Api, kind: &'static str, outcome: &'static str) -> u64 {
    api.checker.metrics.alerts.alerts(kind, outcome)
}

#[tokio::test]
async fn an_alert_arrives_signed_with_the_configured_secret() {
    let mut rx = Receiver::start(0).await;
    let (api, stop) = api(&rx, 3).await;
    api.checker
        .alerts
        .sender()
        .send(Alert::account_locked(champa(), "burst of 500 messages"));
    let got = rx.next().await;
    got.assert_signed_with(SECRET.as_bytes());
    assert_eq!(got.header("content-type"), "application/json");
    let body = got.json();
    assert_eq!(body["kind"], "account_locked");
    assert_eq!(body["account"], "champa@mpt.gov.la");
    assert_eq!(body["reason"], "burst of 500 messages");
    assert_eq!(body["id"], got.header("x-mailwarden-alert-id"));
    // mailwarden's own verifier agrees, and refuses the same request with another secret.
    let ts = got.header("x-mailwarden-timestamp");
    let sig = got.header("x-mailwarden-signature");
    let now = chrono::Utc::now().timestamp();
    let tol = mailwarden::alerts::TIMESTAMP_TOLERANCE;
    assert!(
        mailwarden::alerts::verify_signature(SECRET.as_bytes(), ts, sig, &got.body, now, tol)
            .is_ok()
    );
    assert!(
        mailwarden::alerts::verify_signature(b"wrong-secret-0123456", ts, sig, &got.body, now, tol)
            .is_err()
    );
    finish(&api, &stop).await;
    assert_eq!(count(&api, "account_locked", "sent"), 1);
    assert!(rx.pending().is_empty(), "delivered once");
    let text = api.checker.metrics.encode();
    assert!(
        text.contains(r#"mailwarden_alerts_total{kind="account_locked",outcome="sent"} 1"#),
        "{text}"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_alert_again_until_it_accepts() {
    let mut rx = Receiver::start(2).await;
    let (api, stop) = api(&rx, 5).await;
    api.checker
        .alerts
        .send(Alert::account_locked(champa(), "burst"));
    let attempts = [rx.next().await, rx.next().await, rx.next().await];
    assert_eq!(
        attempts.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 503, 200]
    );
    let id = attempts[0].header("x-mailwarden-alert-id").to_owned();
    for a in &attempts {
        a.assert_signed_with(SECRET.as_bytes());
        assert_eq!(a.header("x-mailwarden-alert-id"), id, "one alert, retried");
        assert_eq!(a.body, attempts[0].body);
    }
    finish(&api, &stop).await;
    assert!(rx.pending().is_empty(), "no attempt after success");
    assert_eq!(count(&api, "account_locked", "sent"), 1);
    assert_eq!(count(&api, "account_locked", "failed"), 0);
    let text = api.checker.metrics.encode();
    assert!(
        text.contains(r#"mailwarden_alert_webhook_attempts_total{result="retryable"} 2"#),
        "{text}"
    );
    api.stop().await;
}

#[tokio::test]
async fn after_the_last_attempt_the_alert_is_counted_failed() {
    let mut rx = Receiver::start(usize::MAX).await;
    let (api, stop) = api(&rx, 3).await;
    api.checker
        .alerts
        .send(Alert::account_locked(champa(), "burst"));
    for _ in 0..3 {
        assert_eq!(rx.next().await.status, 503);
    }
    finish(&api, &stop).await;
    assert!(
        rx.pending().is_empty(),
        "exactly webhook_max_attempts attempts"
    );
    assert_eq!(count(&api, "account_locked", "failed"), 1);
    assert_eq!(count(&api, "account_locked", "sent"), 0);
    api.stop().await;
}

async fn policy(api: &Api, command: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
    api.call(
        Method::POST,
        &format!("/dovecot/auth-policy?command={command}"),
        token,
        Some(body),
    )
    .await
}

fn report(login: &str, remote: &str, success: bool) -> Value {
    json!({
        "login": login, "pwhash": "0123abcd", "remote": remote, "device_id": "",
        "protocol": "imap", "session_id": "s1", "success": success,
        "policy_reject": false, "tried_password": true,
    })
}

#[tokio::test]
async fn dovecot_logins_from_a_new_country_raise_new_country_login() {
    let mut rx = Receiver::start(0).await;
    let (api, stop) = api(&rx, 3).await;
    let allow = json!({"login": "champa@mpt.gov.la", "remote": "198.51.100.7", "protocol": "imap"});
    let (s, b) = policy(&api, "allow", Some(DOVECOT), allow).await;
    assert_eq!((s, b), (StatusCode::OK, json!({"status": 0, "msg": ""})));

    // First successful login (Laos): recorded only. A failed one from Thailand: ignored.
    let (s, b) = policy(
        &api,
        "report",
        Some(DOVECOT),
        report("champa@mpt.gov.la", "192.0.2.7", true),
    )
    .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"status": 0, "msg": ""})));
    let (s, _) = policy(
        &api,
        "report",
        Some(DOVECOT),
        report("champa@mpt.gov.la", "198.51.100.7", false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // A successful one from Thailand: alert.
    let (s, b) = policy(
        &api,
        "report",
        Some(DOVECOT),
        report("Champa@mpt.gov.la", "198.51.100.7", true),
    )
    .await;
    assert_eq!((s, b), (StatusCode::OK, json!({"status": 0, "msg": ""})));
    let got = rx.next().await;
    got.assert_signed_with(SECRET.as_bytes());
    let body = got.json();
    assert_eq!(body["kind"], "new_country_login");
    assert_eq!(body["account"], "champa@mpt.gov.la");
    assert_eq!(body["country"], "TH");
    assert_eq!(body["known_countries"], json!(["LA"]));
    assert_eq!(body["client_address"], "198.51.100.7");
    assert_eq!(body["via"], "imap");
    finish(&api, &stop).await;
    assert!(rx.pending().is_empty(), "one alert");
    use mailwarden::store::Store as _;
    assert_eq!(
        api.store.login_countries(&champa()).await.unwrap(),
        ["LA", "TH"]
    );
    api.stop().await;
}

#[tokio::test]
async fn the_auth_policy_endpoint_needs_the_auth_policy_scope() {
    let rx = Receiver::start(0).await;
    let (api, stop) = api(&rx, 3).await;
    let body = report("champa@mpt.gov.la", "192.0.2.7", true);
    let (s, _) = policy(&api, "report", None, body.clone()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // No administrative scope grants it (admin tokens do not belong in dovecot.conf) ...
    for token in [READ, ADMIN] {
        let (s, b) = policy(&api, "report", Some(token), body.clone()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
        assert_eq!(b["missing_scope"], "auth_policy");
    }
    // ... and it grants nothing else.
    let (s, _) = api.get("/v1/users", DOVECOT).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = policy(&api, "delete", Some(DOVECOT), body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("command=report"),
        "{b}"
    );
    finish(&api, &stop).await;
    api.stop().await;
}

/// The receiver's check the README gives in Python, run with python3 against a real alert:
/// it accepts the alert as sent and refuses it with a changed body or another secret.
#[tokio::test]
async fn the_readmes_python_verifier_accepts_a_real_alert() {
    let section = common::readme::section("## Owner alerts");
    let snippet = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has the python verifier");
    assert!(snippet.contains("ok ="), "{snippet}");

    let mut rx = Receiver::start(0).await;
    let (api, stop) = api(&rx, 3).await;
    api.checker
        .alerts
        .send(Alert::account_locked(champa(), "burst"));
    let got = rx.next().await;
    finish(&api, &stop).await;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let run = |secret: &[u8], body: &[u8]| -> String {
        // Inputs as hex in the environment: no quoting of the body in the script.
        let script = format!(
            "import hashlib, hmac, os, time\n\
             secret = bytes.fromhex(os.environ['SECRET'])\n\
             body = bytes.fromhex(os.environ['BODY'])\n\
             ts = os.environ['TS']\n\
             sig = os.environ['SIG']\n\
             {snippet}\n\
             print(ok)\n"
        );
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(&script)
            .env("SECRET", hex(secret))
            .env("BODY", hex(body))
            .env("TS", got.header("x-mailwarden-timestamp"))
            .env("SIG", got.header("x-mailwarden-signature"))
            .output()
            .expect("run python3 (Debian's python3; .ci/run installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(run(SECRET.as_bytes(), &got.body), "True");
    let mut changed = got.body.to_vec();
    changed[10] ^= 1;
    assert_eq!(run(SECRET.as_bytes(), &changed), "False");
    assert_eq!(run(b"another-secret-0123456789", &got.body), "False");
    api.stop().await;
}
