use super::*;
use crate::store::testing::{TestStore, addr};

/// The one MMDB writer, shared with the integration tests.
#[path = "../../tests/common/mmdb.rs"]
pub(crate) mod mmdb;

const LAOS: &str = "192.0.2.7";
const THAILAND: &str = "198.51.100.7";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A config with a webhook (never reached: the tasks are not started) and a GeoIP database
/// (192.0.2.0/24: LA, 198.51.100.0/24: TH) in `dir`.
fn config(dir: &std::path::Path, queue_size: usize) -> Config {
    let db = dir.join("country.mmdb");
    mmdb::Mmdb::new()
        .country("192.0.2.0/24", "LA")
        .country("198.51.100.0/24", "TH")
        .write(&db);
    let mut c = Config::default();
    c.alerts.webhook_url = "http://127.0.0.1:9/alerts".into();
    c.alerts.webhook_secret = Some("0123456789abcdef".into());
    c.alerts.geoip_database = Some(db);
    c.alerts.queue_size = queue_size;
    c.alerts.login_queue_size = 2;
    c
}

fn metrics() -> AlertMetrics {
    AlertMetrics::register(&mut prometheus_client::registry::Registry::default())
}

/// The service and its queues' receiving ends (as the tasks would have them).
fn service(
    dir: &std::path::Path,
    queue_size: usize,
) -> (Alerts, mpsc::Receiver<Alert>, mpsc::Receiver<Login>) {
    let a = Alerts::new(&config(dir, queue_size), metrics());
    let (alerts, logins) = a.queues.lock().unwrap().take().unwrap();
    (a, alerts, logins)
}

fn login(account: &str, client: &str) -> Login {
    Login {
        account: addr(account),
        client: ip(client),
        via: "smtp".into(),
    }
}

#[test]
fn a_full_queue_drops_and_counts_the_alert_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut rx, _) = service(dir.path(), 2);
    for _ in 0..5 {
        a.send(Alert::account_locked(addr("champa@mpt.gov.la"), "burst"));
    }
    let m = &a.shared.metrics;
    assert_eq!(m.alerts("account_locked", "dropped"), 3);
    assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
    assert!(rx.try_recv().is_err(), "only queue_size alerts were queued");
}

#[test]
fn without_a_webhook_alerts_are_counted_as_disabled() {
    let mut c = Config::default();
    c.alerts.queue_size = 4;
    let a = Alerts::new(&c, metrics());
    a.sender()
        .send(Alert::account_locked(addr("champa@mpt.gov.la"), "burst"));
    assert_eq!(a.shared.metrics.alerts("account_locked", "disabled"), 1);
    assert_eq!(a.shared.metrics.alerts("account_locked", "dropped"), 0);
}

#[test]
fn logins_are_queued_without_waiting_and_dropped_when_the_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _, mut logins) = service(dir.path(), 4);
    a.login("Champa@MPT.gov.la", ip(LAOS), "imap");
    a.login("champa@mpt.gov.la", ip(LAOS), "smtp");
    a.login("champa@mpt.gov.la", ip(LAOS), "smtp"); // login_queue_size is 2
    a.login("not an address", ip(LAOS), "smtp");
    let first = logins.try_recv().unwrap();
    assert_eq!(first.account, addr("champa@mpt.gov.la"));
    assert_eq!(first.via, "imap");
    assert!(logins.try_recv().is_ok());
    assert!(logins.try_recv().is_err());
    let text = {
        let mut r = prometheus_client::registry::Registry::default();
        let m = AlertMetrics::register(&mut r);
        let b = Alerts::new(&config(dir.path(), 1), m);
        b.login("x@mpt.gov.la", ip(LAOS), "smtp");
        b.login("x@mpt.gov.la", ip(LAOS), "smtp");
        b.login("x@mpt.gov.la", ip(LAOS), "smtp");
        b.login("nobody", ip(LAOS), "smtp");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    };
    assert!(
        text.contains(r#"alert_logins_total{result="dropped"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"alert_logins_total{result="not_an_address"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"alert_queue_depth{queue="logins"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn the_first_country_is_recorded_and_a_new_one_raises_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut rx, _) = service(dir.path(), 8);
    let store = TestStore::new().await;
    let champa = addr("champa@mpt.gov.la");

    // First located login: recorded, no alert.
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", LAOS),
    )
    .await;
    assert_eq!(store.login_countries(&champa).await.unwrap(), ["LA"]);
    assert!(rx.try_recv().is_err(), "the first login only records");
    // Same country again: nothing.
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", "192.0.2.99"),
    )
    .await;
    assert!(rx.try_recv().is_err());
    // A new country: one alert, with what was known before.
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", THAILAND),
    )
    .await;
    let alert = rx.try_recv().expect("new_country_login raised");
    assert_eq!(alert.account, champa);
    assert_eq!(
        alert.event,
        AlertEvent::NewCountryLogin {
            country: "TH".into(),
            known_countries: vec!["LA".into()],
            client_address: ip(THAILAND),
            via: "smtp".into(),
        }
    );
    assert_eq!(store.login_countries(&champa).await.unwrap(), ["LA", "TH"]);
    // And not again.
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", THAILAND),
    )
    .await;
    assert!(rx.try_recv().is_err());
    // Another account's first login from TH is only recorded.
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("kham@mpt.gov.la", THAILAND),
    )
    .await;
    assert!(rx.try_recv().is_err());
    assert_eq!(a.shared.metrics.alerts("new_country_login", "dropped"), 0);
}

#[tokio::test]
async fn private_unknown_and_failing_store_logins_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut rx, _) = service(dir.path(), 8);
    let store = TestStore::new().await;
    let champa = addr("champa@mpt.gov.la");
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", LAOS),
    )
    .await;
    for client in ["127.0.0.1", "10.0.0.5", "fd00::1", "203.0.113.9"] {
        locate(
            &a.shared,
            &a.sender,
            &*store,
            login("champa@mpt.gov.la", client),
        )
        .await;
    }
    assert_eq!(store.login_countries(&champa).await.unwrap(), ["LA"]);
    assert!(rx.try_recv().is_err());
    // The store is down: nothing recorded, nothing raised, nothing breaks; once it is back
    // the same login is detected.
    store.set_down(true);
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", THAILAND),
    )
    .await;
    assert!(rx.try_recv().is_err());
    store.set_down(false);
    locate(
        &a.shared,
        &a.sender,
        &*store,
        login("champa@mpt.gov.la", THAILAND),
    )
    .await;
    assert!(rx.try_recv().is_ok());
}

#[test]
fn the_alert_body_carries_kind_account_time_and_details() {
    let alert = Alert {
        account: addr("champa@mpt.gov.la"),
        event: AlertEvent::NewCountryLogin {
            country: "TH".into(),
            known_countries: vec!["LA".into()],
            client_address: ip(THAILAND),
            via: "imap".into(),
        },
        at: 1_796_428_800,
    };
    let v: serde_json::Value = serde_json::from_slice(&alert.to_json("abc")).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "id": "abc",
            "kind": "new_country_login",
            "account": "champa@mpt.gov.la",
            "at": "2026-12-05T00:00:00Z",
            "country": "TH",
            "known_countries": ["LA"],
            "client_address": "198.51.100.7",
            "via": "imap",
        })
    );
    let locked = Alert::account_locked(addr("champa@mpt.gov.la"), "burst");
    let v: serde_json::Value = serde_json::from_slice(&locked.to_json("x")).unwrap();
    assert_eq!(v["kind"], "account_locked");
    assert_eq!(v["reason"], "burst");
}

#[test]
fn reload_rereads_the_geoip_file_and_keeps_the_old_one_when_it_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), 4);
    let a = Alerts::new(&c, metrics());
    let located = |a: &Alerts| a.shared.geoip.load_full().unwrap().locate(ip(THAILAND));
    assert_eq!(located(&a), Located::Country("TH".into()));
    let db = c.alerts.geoip_database.clone().unwrap();
    mmdb::Mmdb::new()
        .country("198.51.100.0/24", "VN")
        .write(&db);
    a.reload(&c);
    assert_eq!(located(&a), Located::Country("VN".into()));
    std::fs::write(&db, b"garbage").unwrap();
    a.reload(&c);
    assert_eq!(
        located(&a),
        Located::Country("VN".into()),
        "kept the last good one"
    );
}

#[test]
fn bad_alert_settings_are_reported_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.mmdb");
    std::fs::write(&junk, b"not a database").unwrap();
    let text = format!(
        r#"[alerts]
webhook_url = "ftp://gateway.example/alerts"
webhook_secret = "short"
webhook_max_attempts = 0
webhook_backoff = "0s"
queue_size = 0
geoip_database = "{}"
"#,
        junk.display()
    );
    let errors = Config::from_toml(&text).unwrap_err();
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    for key in [
        "alerts.webhook_url",
        "alerts.webhook_secret",
        "alerts.webhook_max_attempts",
        "alerts.webhook_backoff",
        "alerts.queue_size",
        "alerts.geoip_database",
    ] {
        assert!(keys.contains(&key), "{key} not in {errors:?}");
    }
    let no_secret =
        Config::from_toml("[alerts]\nwebhook_url = \"https://gw.example/a\"\n").unwrap_err();
    assert_eq!(no_secret[0].key, "alerts.webhook_secret");
    let good = config(dir.path(), 10);
    assert!(good.validate().is_empty(), "{:?}", good.validate());
}
