//! Owner alerts (R16) end to end through real Postfix: a client logs in (XCLIENT LOGIN=) as
//! champa from a Lao address, then from a Thai one (XCLIENT ADDR=); the webhook receiver (an
//! HTTP server in this test) gets one signed `new_country_login`. The GeoIP database is
//! written by the test (192.0.2.0/24: LA, 198.51.100.0/24: TH).
//!
//! Needs root and the Debian packages `postfix` and `swaks` (`.ci/run` installs them).

mod common;

use common::daemon::Mailwarden;
use common::postfix::{Postfix, Wiring};
use common::smtp::swaks_with;
use common::webhook::Receiver;

const CHAMPA: &str = "champa@mpt.gov.la";
const OUTSIDE: &str = "friend@example.org";
const SECRET: &str = "e2e-alert-secret-0123456789";
const EXTRA: &str = "smtpd_authorized_xclient_hosts = 127.0.0.1\nrelay_domains = example.org\n";

fn new_country_login_reaches_the_webhook(wiring: impl Fn(&Mailwarden) -> Wiring, via: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut receiver = rt.block_on(Receiver::start(0));
    let dir = tempfile::tempdir().unwrap();
    // The test client has no TLS: its two addresses are exempted from R11 so the mail flows.
    let mw = Mailwarden::start(&format!(
        r#"{}
[rules.R11]
exempt_networks = ["127.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"]
"#,
        receiver.alerts_config(SECRET, dir.path())
    ));
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    mw.cli_ok(
        "user",
        &["add", CHAMPA, "--kind", "person", "--status", "active"],
    );
    let pf = Postfix::start_with(wiring(&mw), EXTRA);

    let send = |client: &str| {
        let sent = swaks_with(
            &pf.server,
            CHAMPA,
            &[OUTSIDE],
            &["--xclient-addr", client, "--xclient-login", CHAMPA],
        );
        assert!(sent.queued(), "{}", sent.transcript);
        pf.wait_delivered(&sent.tag);
    };
    send("192.0.2.7"); // Laos: the first country, only recorded
    send("198.51.100.7"); // Thailand: new

    let got = rt.block_on(receiver.next());
    got.assert_signed_with(SECRET.as_bytes());
    let body = got.json();
    assert_eq!(body["kind"], "new_country_login", "{body}");
    assert_eq!(body["account"], CHAMPA);
    assert_eq!(body["country"], "TH");
    assert_eq!(body["known_countries"], serde_json::json!(["LA"]));
    assert_eq!(body["client_address"], "198.51.100.7");
    assert_eq!(body["via"], "smtp");
    assert!(
        mw.sample("mailwarden_geoip_lookups_total", &[("result", "found")]) >= 2.0,
        "{}",
        mw.metrics()
    );
    assert!(receiver.pending().is_empty(), "one alert ({via})");
}

#[test]
fn r16_new_country_login_through_the_milter_reaches_the_webhook() {
    new_country_login_reaches_the_webhook(|mw| Wiring::Milter(mw.bound.milter.clone()), "milter");
}

#[test]
fn r16_new_country_login_through_policy_reaches_the_webhook() {
    new_country_login_reaches_the_webhook(|mw| Wiring::Policy(mw.bound.policy.clone()), "policy");
}
