//! Conversations with the policy server as Postfix would have them: the server runs on
//! 127.0.0.1 port 0 with a real `Checker` over a real SQLite store on a temp file; the test
//! scripts the MTA side. The store is `store::testing`'s: the directory of its `seed`, and
//! switches that inject faults where a test needs one.

use super::codec::Request;
use super::loadgen::{self, Client, LoadSpec};
use crate::checker::Checker;
use crate::config::{Config, ListenAddr};
use crate::net::Listener;
use crate::store::cache::CachedDirectory;
use crate::store::testing::TestStore;
use crate::telemetry::Metrics;
use std::{sync::Arc, time::Duration};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

// ---- a running server ------------------------------------------------------------------------

struct Server {
    addr: ListenAddr,
    checker: Arc<Checker>,
    store: Arc<TestStore>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Server {
    async fn start(config_toml: &str) -> Server {
        Server::start_on("inet:127.0.0.1:0", config_toml).await
    }

    async fn start_on(listen: &str, config_toml: &str) -> Server {
        let config = Config::from_toml(config_toml).expect("test config is valid");
        let store = TestStore::seeded().await;
        let directory = CachedDirectory::new(
            store.clone(),
            config.store.cache_ttl,
            config.store.cache_size,
            config.store.timeout,
        );
        let checker = Arc::new(Checker::new(config, directory, Arc::new(Metrics::new())));
        let listener = Listener::bind(&listen.parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let serving = tokio::spawn(super::serve(
            listener,
            checker.clone(),
            shutdown.clone(),
            sessions.clone(),
        ));
        Server {
            addr,
            checker,
            store,
            shutdown,
            sessions,
            serving,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.addr).await.unwrap()
    }

    fn metrics(&self) -> String {
        self.checker.metrics.encode()
    }
}

fn rcpt(sender: &str, recipient: &str) -> Request {
    loadgen::rcpt_request(sender, recipient, 0)
}

fn at_state(state: &str, sender: &str, recipient: &str) -> Request {
    Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", state),
        ("queue_id", "8045F2AB23"),
        ("client_address", "192.0.2.10"),
        // Over TLS: R11 (TLS-only submission) has its own tests.
        ("encryption_protocol", "TLSv1.3"),
        ("sender", sender),
        ("recipient", recipient),
    ])
}

/// The reply's code words: `DUNNO`, `550 5.2.1`, …
fn code(action: &str) -> String {
    let words: Vec<&str> = action.split_whitespace().collect();
    match words.first() {
        Some(w) if w.parse::<u16>().is_ok() => words[..2.min(words.len())].join(" "),
        Some(w) => (*w).to_owned(),
        None => String::new(),
    }
}

/// Reads until the server closes, failing the test if that takes longer than 10 s.
async fn assert_closed(c: &mut Client) {
    let closed = tokio::time::timeout(Duration::from_secs(10), c.closed_by_server())
        .await
        .expect("server did not close the connection");
    assert!(closed, "server sent bytes instead of closing");
}

const DEFAULT: &str = "";

/// A RCPT request of an authenticated client (`sasl` may be empty) in message `instance`.
fn submission(sasl: &str, sender: &str, recipient: &str, instance: &str) -> Request {
    Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("instance", instance),
        ("client_address", "192.0.2.10"),
        // A submission over TLS, as R11 requires.
        ("encryption_protocol", "TLSv1.3"),
        ("sasl_username", sasl),
        ("sender", sender),
        ("recipient", recipient),
    ])
}

// ---- the tests -------------------------------------------------------------------------------

#[tokio::test]
async fn many_requests_on_one_connection() {
    let s = Server::start(DEFAULT).await;
    let mut c = s.client().await;
    let ext = "someone@example.org";
    for (recipient, want) in [
        ("champa@mpt.gov.la", "DUNNO"),
        ("somsak@mpt.gov.la", "550 5.2.1"),
        ("gone@mpt.gov.la", "550 5.1.1"),
        ("boss@old.gov.la", "550 5.1.1"),
        ("friend@example.org", "DUNNO"),
        ("unknown@mpt.gov.la", "DUNNO"),
        ("Somsak@MPT.gov.la", "550 5.2.1"),
        ("champa@mpt.gov.la", "DUNNO"),
    ] {
        let action = c.ask(&rcpt(ext, recipient)).await.unwrap();
        assert_eq!(code(&action), want, "{recipient}: {action}");
    }
    // The reply text says what happened, with the address.
    let action = c.ask(&rcpt(ext, "somsak@mpt.gov.la")).await.unwrap();
    assert!(
        action.starts_with("550 5.2.1 Mailbox <somsak@mpt.gov.la> is suspended"),
        "{action}"
    );
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R1",stage="rcpt",outcome="reject",protocol="policy"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"mailwarden_connections_open{protocol="policy"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn sender_rules_r9_and_r2() {
    let s = Server::start(DEFAULT).await;
    let mut c = s.client().await;
    let to = "friend@example.org";
    for (sender, want) in [
        ("nobody@mpt.gov.la", "553 5.7.1"), // R9: not registered
        ("newbie@mpt.gov.la", "553 5.7.1"), // R9: pending
        ("gone@mpt.gov.la", "550 5.7.1"),   // R2: withdrawn
        ("boss@old.gov.la", "550 5.7.1"),   // R2: ceased organisation
        ("champa@mpt.gov.la", "DUNNO"),     // active
        ("somsak@mpt.gov.la", "DUNNO"),     // suspended may still send
        ("stranger@example.org", "DUNNO"),  // not a local domain
        ("", "DUNNO"),                      // null sender
        ("not an address", "DUNNO"),        // unparsable: Postfix's business
    ] {
        let action = c.ask(&rcpt(sender, to)).await.unwrap();
        assert_eq!(code(&action), want, "sender {sender:?}: {action}");
        let action = c.ask(&at_state("MAIL", sender, "")).await.unwrap();
        assert_eq!(
            code(&action),
            want,
            "MAIL state, sender {sender:?}: {action}"
        );
    }
    // The sender is judged before the recipient.
    let action = c
        .ask(&rcpt("nobody@mpt.gov.la", "somsak@mpt.gov.la"))
        .await
        .unwrap();
    assert_eq!(code(&action), "553 5.7.1", "{action}");
}

/// An RCPT request from `client` with the given SASL login and TLS protocol ("" = none).
fn tls_submission(client: &str, sasl: &str, tls: &str, sender: &str) -> Request {
    Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("client_address", client),
        ("sasl_username", sasl),
        ("encryption_protocol", tls),
        ("sender", sender),
        ("recipient", "friend@example.org"),
    ])
}

#[tokio::test]
async fn r11_submission_without_tls_is_refused_530_5_7_0() {
    let s = Server::start(DEFAULT).await;
    let mut c = s.client().await;
    let champa = "champa@mpt.gov.la";
    for (client, sasl, tls, sender, want) in [
        ("192.0.2.10", "", "", champa, "530 5.7.0"), // local sender, no TLS
        ("192.0.2.10", champa, "", "x@example.org", "530 5.7.0"), // authenticated, no TLS
        ("192.0.2.10", champa, "TLSv1.3", champa, "DUNNO"),
        ("192.0.2.10", "", "", "x@example.org", "DUNNO"), // inbound from outside
        ("127.0.0.1", "", "", champa, "DUNNO"),           // loopback is exempt
    ] {
        let action = c
            .ask(&tls_submission(client, sasl, tls, sender))
            .await
            .unwrap();
        assert_eq!(code(&action), want, "{client} {sasl:?} {tls:?}: {action}");
        if want == "530 5.7.0" {
            assert!(action.contains("STARTTLS"), "{action}");
        }
    }
}

#[tokio::test]
async fn stages_without_rules_yet_answer_dunno() {
    let s = Server::start(DEFAULT).await;
    let mut c = s.client().await;
    for state in [
        "CONNECT",
        "EHLO",
        "HELO",
        "DATA",
        "END-OF-MESSAGE",
        "VRFY",
        "ETRN",
        "SOMETHING-NEW",
    ] {
        let action = c
            .ask(&at_state(state, "nobody@mpt.gov.la", "somsak@mpt.gov.la"))
            .await
            .unwrap();
        assert_eq!(action, "DUNNO", "{state}");
    }
    // A recipient Postfix accepted but we cannot parse is left to Postfix.
    let action = c
        .ask(&rcpt("champa@mpt.gov.la", "\"odd local\"@mpt.gov.la"))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
}

#[tokio::test]
async fn monitor_mode_answers_dunno_and_counts_would_reject() {
    let config = r#"
[rules.R1]
mode = "monitor"
[rules.R9]
mode = "monitor"
"#;
    let s = Server::start(config).await;
    let mut c = s.client().await;
    assert_eq!(
        c.ask(&rcpt("champa@mpt.gov.la", "somsak@mpt.gov.la"))
            .await
            .unwrap(),
        "DUNNO"
    );
    assert_eq!(
        c.ask(&rcpt("nobody@mpt.gov.la", "champa@mpt.gov.la"))
            .await
            .unwrap(),
        "DUNNO"
    );
    // R2 is still enforced.
    assert_eq!(
        code(
            &c.ask(&rcpt("champa@mpt.gov.la", "gone@mpt.gov.la"))
                .await
                .unwrap()
        ),
        "550 5.1.1"
    );
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R1",stage="rcpt",outcome="would_reject",protocol="policy"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R9",stage="mail",outcome="would_reject",protocol="policy"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn store_outage_tempfails() {
    let s = Server::start(DEFAULT).await;
    s.store.set_down(true);
    let mut c = s.client().await;
    let action = c.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap();
    assert_eq!(code(&action), "451 4.3.0", "{action}");
}

#[tokio::test]
async fn garbage_ends_only_that_connection() {
    let s = Server::start(DEFAULT).await;
    let mut good = s.client().await;
    assert_eq!(
        good.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap(),
        "DUNNO"
    );
    let mut bad = s.client().await;
    bad.send_raw(b"GET / HTTP/1.1\r\nHost: policy\r\n\r\n")
        .await
        .unwrap();
    assert_closed(&mut bad).await;
    // The other connection, and new ones, keep working.
    assert_eq!(
        code(&good.ask(&rcpt("", "somsak@mpt.gov.la")).await.unwrap()),
        "550 5.2.1"
    );
    let mut fresh = s.client().await;
    assert_eq!(
        fresh.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap(),
        "DUNNO"
    );
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_protocol_errors_total{protocol="policy"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn wrong_request_type_is_a_protocol_error() {
    let s = Server::start(DEFAULT).await;
    let mut c = s.client().await;
    c.send_raw(b"request=junk\nprotocol_state=RCPT\n\n")
        .await
        .unwrap();
    assert_closed(&mut c).await;
    let mut c = s.client().await;
    c.send_raw(b"protocol_state=RCPT\nrecipient=a@mpt.gov.la\n\n")
        .await
        .unwrap();
    assert_closed(&mut c).await;
    assert!(
        s.metrics()
            .contains(r#"mailwarden_protocol_errors_total{protocol="policy"} 2"#)
    );
}

#[tokio::test]
async fn oversize_request_closes_the_connection() {
    let config = "[server]\npolicy_max_request_bytes = 1024\n";
    let s = Server::start(config).await;
    let mut c = s.client().await;
    // A normal request fits.
    assert_eq!(
        c.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap(),
        "DUNNO"
    );
    let mut big = b"request=smtpd_access_policy\nprotocol_state=RCPT\nccert_subject=".to_vec();
    big.extend(std::iter::repeat_n(b'x', 4000));
    big.extend_from_slice(b"\n\n");
    // The server may close before it has read everything; a failed write is fine.
    let _ = c.send_raw(&big).await;
    assert_closed(&mut c).await;
    assert!(
        s.metrics()
            .contains(r#"mailwarden_protocol_errors_total{protocol="policy"} 1"#)
    );
}

#[tokio::test]
async fn too_many_attributes_close_the_connection() {
    let config = "[server]\npolicy_max_attributes = 10\n";
    let s = Server::start(config).await;
    let mut c = s.client().await;
    // The full Postfix attribute set has 29 attributes.
    let _ = c
        .send_raw(&rcpt("", "champa@mpt.gov.la").encode().unwrap())
        .await;
    assert_closed(&mut c).await;
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_timeout() {
    let config = "[server]\npolicy_idle_timeout = \"300ms\"\n";
    let s = Server::start(config).await;
    let mut c = s.client().await;
    assert_eq!(
        c.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap(),
        "DUNNO"
    );
    let start = std::time::Instant::now();
    assert_closed(&mut c).await;
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "closed after {:?}, before the idle timeout",
        start.elapsed()
    );
    // Idling is not a protocol error.
    assert!(!s.metrics().contains("mailwarden_protocol_errors_total{"));
}

#[tokio::test]
async fn idle_timeout_also_bounds_a_half_sent_request() {
    let config = "[server]\npolicy_idle_timeout = \"300ms\"\n";
    let s = Server::start(config).await;
    let mut c = s.client().await;
    c.send_raw(b"request=smtpd_access_policy\nprotocol_st")
        .await
        .unwrap();
    assert_closed(&mut c).await;
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish() {
    let s = Server::start(DEFAULT).await;
    let held = s.store.hold("somsak@mpt.gov.la").await;
    let mut idle = s.client().await;
    assert_eq!(
        idle.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap(),
        "DUNNO"
    );
    let mut busy = s.client().await;
    busy.send_raw(&rcpt("", "somsak@mpt.gov.la").encode().unwrap())
        .await
        .unwrap();
    // The decision is now waiting on the store.
    s.store.reached().await;
    s.shutdown.cancel();
    // The accept loop stops and the idle connection is closed ...
    s.sessions.close();
    assert_closed(&mut idle).await;
    // ... while the busy one is still being decided; once the store answers, the MTA gets
    // its reply, then the connection closes.
    drop(held);
    let action = busy.read_action().await.unwrap();
    assert_eq!(code(&action), "550 5.2.1", "{action}");
    assert_closed(&mut busy).await;
    tokio::time::timeout(Duration::from_secs(10), s.sessions.wait())
        .await
        .expect("sessions drained");
    let mut s = s;
    tokio::time::timeout(Duration::from_secs(10), &mut s.serving)
        .await
        .expect("serve returned")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn no_new_connections_after_shutdown() {
    let s = Server::start(DEFAULT).await;
    let addr = s.addr.clone();
    s.shutdown.cancel();
    let mut s = s;
    (&mut s.serving).await.unwrap().unwrap();
    assert!(Client::connect(&addr).await.is_err());
}

#[tokio::test]
async fn max_connections_queues_further_clients() {
    let config = "[server]\nmax_connections = 1\n";
    let s = Server::start(config).await;
    let mut first = s.client().await;
    assert_eq!(
        first.ask(&rcpt("", "champa@mpt.gov.la")).await.unwrap(),
        "DUNNO"
    );
    // The second client gets through the TCP handshake (listen backlog) but is not served.
    let mut second = s.client().await;
    second
        .send_raw(&rcpt("", "somsak@mpt.gov.la").encode().unwrap())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), second.read_action())
            .await
            .is_err(),
        "second connection served beyond max_connections"
    );
    // Once the first leaves, the second is served.
    drop(first);
    let action = tokio::time::timeout(Duration::from_secs(10), second.read_action())
        .await
        .expect("second connection served after the first closed")
        .unwrap();
    assert_eq!(code(&action), "550 5.2.1");
}

#[tokio::test]
async fn serves_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", dir.path().join("policy.sock").display());
    let s = Server::start_on(&listen, DEFAULT).await;
    let mut c = s.client().await;
    assert_eq!(
        code(&c.ask(&rcpt("", "gone@mpt.gov.la")).await.unwrap()),
        "550 5.1.1"
    );
}

#[tokio::test]
async fn requests_split_across_writes_and_pipelined() {
    let s = Server::start(DEFAULT).await;
    let mut c = s.client().await;
    let one = rcpt("", "somsak@mpt.gov.la").encode().unwrap();
    let two = rcpt("", "champa@mpt.gov.la").encode().unwrap();
    // Byte by byte.
    for b in &one {
        c.send_raw(std::slice::from_ref(b)).await.unwrap();
    }
    assert_eq!(code(&c.read_action().await.unwrap()), "550 5.2.1");
    // Two requests in one write: two replies, in order.
    c.send_raw(&[two.clone(), one.clone()].concat())
        .await
        .unwrap();
    assert_eq!(c.read_action().await.unwrap(), "DUNNO");
    assert_eq!(code(&c.read_action().await.unwrap()), "550 5.2.1");
}

#[tokio::test]
async fn load_generator_gets_every_request_answered() {
    let s = Server::start(DEFAULT).await;
    let spec = LoadSpec {
        target: s.addr.clone(),
        connections: 4,
        requests_per_connection: 50,
        recipients: vec![
            "champa@mpt.gov.la".into(),
            "somsak@mpt.gov.la".into(),
            "friend@example.org".into(),
            "gone@mpt.gov.la".into(),
        ],
        senders: vec!["someone@example.org".into()],
        timeout: Duration::from_secs(10),
    };
    let report = loadgen::run(&spec).await.unwrap();
    assert_eq!(report.failures, Vec::<String>::new());
    assert_eq!(report.sent, 200);
    assert_eq!(report.answered, 200);
    // Round-robin over four recipients: half pass, half are rejected.
    assert_eq!(report.actions.get("DUNNO"), Some(&100));
    assert_eq!(report.actions.get("550"), Some(&100));
    assert!(report.p50 <= report.p99 && report.p99 <= report.max);
    assert!(report.max > Duration::ZERO && report.rate() > 0.0);
}

#[tokio::test]
async fn load_generator_reports_a_dead_server() {
    // Bind a port, then free it: nothing listens there.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = ListenAddr::Inet(l.local_addr().unwrap());
    drop(l);
    let spec = LoadSpec {
        target: addr,
        connections: 2,
        requests_per_connection: 3,
        recipients: vec!["a@b.la".into()],
        senders: Vec::new(),
        timeout: Duration::from_secs(5),
    };
    let report = loadgen::run(&spec).await.unwrap();
    assert_eq!(report.answered, 0);
    assert_eq!(report.failures.len(), 2);
}

#[tokio::test]
async fn sending_limits_cut_off_at_exactly_the_configured_numbers() {
    use crate::store::{Account, Counter, Store};
    let s = Server::start(
        "[rules.R14]\nrecipients_per_message = 3\nmessages_per_hour = 2\n\
         recipients_per_hour = 5\n",
    )
    .await;
    let mut c = s.client().await;
    let champa = "champa@mpt.gov.la";
    let mut ask = async |sasl: &str, sender: &str, rcpt: &str, instance: &str| {
        let action = c
            .ask(&submission(sasl, sender, rcpt, instance))
            .await
            .unwrap();
        (code(&action), action)
    };
    // Message 1: a refused recipient is not counted; the 4th accepted one is one too many.
    assert_eq!(
        ask(champa, champa, "somsak@mpt.gov.la", "m1").await.0,
        "550 5.2.1"
    );
    for i in 1..=3 {
        let (code, a) = ask(champa, champa, &format!("r{i}@example.org"), "m1").await;
        assert_eq!(code, "DUNNO", "recipient {i}: {a}");
    }
    let (code, a) = ask(champa, champa, "r4@example.org", "m1").await;
    assert_eq!(code, "452 4.5.3", "{a}");
    assert!(a.contains("at most 3 per message"), "{a}");
    // Message 2: the hourly recipient limit (5) leaves room for 2 more.
    for i in 1..=2 {
        let (code, a) = ask(champa, champa, &format!("s{i}@example.org"), "m2").await;
        assert_eq!(code, "DUNNO", "recipient {i}: {a}");
    }
    let (code, a) = ask(champa, champa, "s3@example.org", "m2").await;
    assert_eq!(code, "450 4.7.1", "{a}");
    assert!(a.contains("5 recipients per hour"), "{a}");
    assert!(a.contains("try again after"), "{a}");
    // Message 3: two messages this hour already (it is named first).
    let (code, a) = ask(champa, champa, "t1@example.org", "m3").await;
    assert_eq!(code, "450 4.7.1", "{a}");
    assert!(a.contains("2 messages per hour"), "{a}");
    // The login counts, not the envelope sender; without a login a local sender counts.
    let (code, a) = ask("", champa, "u1@example.org", "m4").await;
    assert_eq!(code, "450 4.7.1", "{a}");
    // External senders without login are not R14's business.
    for i in 0..10 {
        let (code, a) = ask(
            "",
            "stranger@example.org",
            &format!("v{i}@mpt.gov.la"),
            "m5",
        )
        .await;
        assert!(code == "DUNNO", "{a}");
    }
    // A bulk account is exempt.
    let news = Account {
        bulk: true,
        ..crate::store::testing::account("news@mpt.gov.la", "mpt")
    };
    s.store.create_account(&news).await.unwrap();
    for i in 0..10 {
        let (code, a) = ask(
            "news@mpt.gov.la",
            "news@mpt.gov.la",
            &format!("w{i}@example.org"),
            "m6",
        )
        .await;
        assert_eq!(code, "DUNNO", "{a}");
    }
    let now = chrono::Utc::now().timestamp();
    let counts: Vec<(Counter, u64)> = s
        .store
        .counters(&crate::store::testing::addr(champa), now)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.counter, v.count))
        .collect();
    assert_eq!(
        counts.iter().map(|c| c.1).collect::<Vec<_>>(),
        [2, 2, 5, 5],
        "{counts:?}"
    );
    let news_counts = s.store.counters(&news.address, now).await.unwrap();
    assert!(
        news_counts.iter().all(|v| v.count == 0),
        "bulk is not counted"
    );
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R14",stage="rcpt",outcome="tempfail",protocol="policy"} 4"#),
        "{m}"
    );
}

#[tokio::test]
async fn sending_limits_count_only_on_the_configured_front_end() {
    // count_on = "milter": the policy service neither counts nor limits.
    let s = Server::start("[rules.R14]\nrecipients_per_message = 1\ncount_on = \"milter\"\n").await;
    let mut c = s.client().await;
    let champa = "champa@mpt.gov.la";
    for i in 0..3 {
        let action = c
            .ask(&submission(
                champa,
                champa,
                &format!("r{i}@example.org"),
                "m1",
            ))
            .await
            .unwrap();
        assert_eq!(code(&action), "DUNNO", "{action}");
    }
    let now = chrono::Utc::now().timestamp();
    let counts =
        crate::store::Store::counters(&*s.store, &crate::store::testing::addr(champa), now)
            .await
            .unwrap();
    assert!(counts.iter().all(|v| v.count == 0), "{counts:?}");
}

/// `count_on = "auto"` with both front-ends in one daemon: a recipient the policy service
/// judged is not counted again by the milter that sees it next; one the policy service was
/// not asked about (Postfix wired to the milter only, for that port) is the milter's to
/// count and limit.
#[tokio::test]
async fn auto_counts_each_recipient_once_on_whichever_front_end_sees_it_first() {
    use crate::model::{Action, Protocol, Sender, Transaction};
    use crate::store::testing::addr;
    let s = Server::start("[rules.R14]\nrecipients_per_hour = 3\n").await;
    let champa = "champa@mpt.gov.la";
    let recipients = |counts: Vec<crate::store::CounterValue>| {
        counts
            .iter()
            .filter(|v| v.counter.measure == crate::store::counters::Measure::Recipients)
            .map(|v| v.count)
            .collect::<Vec<_>>()
    };
    let counted = async || {
        let now = chrono::Utc::now().timestamp();
        recipients(
            crate::store::Store::counters(&*s.store, &addr(champa), now)
                .await
                .unwrap(),
        )
    };
    let mut milter = Transaction::new(Protocol::Milter);
    milter.client_addr = Some("192.0.2.10".parse().unwrap());
    milter.tls_version = Some("TLSv1.3".into());
    milter.sasl_username = Some(champa.into());
    milter.sender = Some(Sender::parse(champa));

    // Postfix asks the policy service, then sends the recipient to the milter.
    let mut c = s.client().await;
    let action = c
        .ask(&submission(champa, champa, "a@example.org", "m1"))
        .await
        .unwrap();
    assert_eq!(code(&action), "DUNNO", "{action}");
    assert_eq!(counted().await, [1, 1]);
    let d = s.checker.check_rcpt(&milter, &addr("a@example.org")).await;
    assert_eq!(d.action, Action::Continue);
    assert_eq!(
        counted().await,
        [1, 1],
        "judged by the policy service: not again"
    );

    // The same recipient again, this time to the milter alone: counted there.
    let d = s.checker.check_rcpt(&milter, &addr("a@example.org")).await;
    assert_eq!(d.action, Action::Continue);
    assert_eq!(counted().await, [2, 2]);
    // Another client's recipient is not covered by the policy service's judgement either.
    c.ask(&submission(champa, champa, "b@example.org", "m2"))
        .await
        .unwrap();
    let mut other = milter.clone();
    other.client_addr = Some("192.0.2.11".parse().unwrap());
    let d = s.checker.check_rcpt(&other, &addr("b@example.org")).await;
    assert!(
        matches!(&d.action, Action::Tempfail(r) if r.to_string().starts_with("450 4.7.1")),
        "the milter applies the limit it counts: {d:?}"
    );
    assert_eq!(counted().await, [3, 3]);
}

#[tokio::test]
async fn sending_limits_tempfail_when_the_store_is_down() {
    // R15 off too: its lock check at MAIL would tempfail first (see the R15 tests).
    let s = Server::start(
        "[rules.R2]\nmode = \"off\"\n[rules.R1]\nmode = \"off\"\n[rules.R9]\nmode = \"off\"\n[rules.R13]\nmode = \"off\"\n[rules.R8]\nmode = \"off\"\n[rules.R15]\nmode = \"off\"\n",
    )
    .await;
    s.store.set_down(true);
    let mut c = s.client().await;
    let action = c
        .ask(&submission(
            "champa@mpt.gov.la",
            "champa@mpt.gov.la",
            "x@example.org",
            "m1",
        ))
        .await
        .unwrap();
    assert!(action.starts_with("451 4.3.0"), "{action}");
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R14",stage="rcpt",outcome="tempfail",protocol="policy"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn quota_refuses_a_full_mailbox_at_rcpt() {
    use crate::store::Store;
    let s = Server::start("").await;
    let champa = crate::store::testing::addr("champa@mpt.gov.la");
    s.store.set_quota(&champa, Some(10_000)).await.unwrap();
    s.store.set_usage(&champa, 9_000, 0).await.unwrap();
    s.checker.directory.invalidate_account(&champa);
    let mut c = s.client().await;
    let with_size = |size: &str| {
        Request::from_attrs([
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("instance", "q1"),
            ("client_address", "192.0.2.10"),
            ("sender", "friend@example.org"),
            ("recipient", "champa@mpt.gov.la"),
            ("size", size),
        ])
    };
    let action = c.ask(&with_size("1000")).await.unwrap();
    assert_eq!(code(&action), "DUNNO", "{action}");
    let action = c.ask(&with_size("1001")).await.unwrap();
    assert_eq!(code(&action), "452 4.2.2", "{action}");
    assert!(action.contains("over its storage quota"), "{action}");
    // Already full: refused without SIZE= too.
    s.store.set_usage(&champa, 10_000, 1).await.unwrap();
    let action = c.ask(&with_size("0")).await.unwrap();
    assert_eq!(code(&action), "452 4.2.2", "{action}");
    // Not a quota account: accepted whatever the size.
    let other = Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("sender", "friend@example.org"),
        ("recipient", "someone@example.org"),
        ("size", "99999999"),
    ]);
    assert_eq!(code(&c.ask(&other).await.unwrap()), "DUNNO");

    let p = Server::start("[rules.R13]\npermanent = true\n").await;
    p.store.set_quota(&champa, Some(10)).await.unwrap();
    p.store.set_usage(&champa, 10, 0).await.unwrap();
    let mut c = p.client().await;
    let action = c.ask(&with_size("0")).await.unwrap();
    assert_eq!(code(&action), "552 5.2.2", "{action}");
}

/// A request of message `instance` at `state` (`recipient` may be empty), with `size`.
fn in_message(state: &str, instance: &str, recipient: &str, size: &str) -> Request {
    Request::from_attrs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", state),
        ("instance", instance),
        ("client_address", "192.0.2.10"),
        ("sender", "friend@example.org"),
        ("recipient", recipient),
        ("size", size),
    ])
}

/// `count_on = "auto"` at the end of DATA: a message the policy service judged (Postfix asks
/// it before the milters' end of message) is neither judged nor counted again by this
/// daemon's milter; a message it was not asked about is the milter's.
#[tokio::test]
async fn auto_judges_each_end_of_message_once() {
    use crate::model::{Action, Protocol, Transaction};
    use crate::store::Store;
    use crate::store::testing::addr;
    let champa = addr("champa@mpt.gov.la");
    let p = Server::start("").await;
    p.store.set_quota(&champa, Some(1_000)).await.unwrap();
    let mut c = p.client().await;
    let asked = |state: &str, size: &str| {
        Request::from_attrs([
            ("request", "smtpd_access_policy"),
            ("protocol_state", state),
            ("instance", "m1"),
            ("queue_id", "4QID1"),
            ("client_address", "192.0.2.10"),
            ("sender", "friend@example.org"),
            (
                "recipient",
                if state == "RCPT" {
                    "champa@mpt.gov.la"
                } else {
                    ""
                },
            ),
            ("size", size),
        ])
    };
    for state in ["RCPT", "END-OF-MESSAGE"] {
        let action = c.ask(&asked(state, "10")).await.unwrap();
        assert_eq!(code(&action), "DUNNO", "{state}: {action}");
    }
    usage_becomes(&p.store, &champa, 10).await;

    let mut tx = Transaction::new(Protocol::Milter);
    tx.queue_id = Some("4QID1".into());
    let eom = p
        .checker
        .check_end_of_message(&tx, std::slice::from_ref(&champa), 10)
        .await;
    assert_eq!(eom.decision.action, Action::Continue);
    assert!(eom.counted().is_empty(), "counted by the policy service");
    // Once only: the same queue id again is the milter's (the mark was taken).
    let eom = p
        .checker
        .check_end_of_message(&tx, std::slice::from_ref(&champa), 10)
        .await;
    assert_eq!(eom.counted(), std::slice::from_ref(&champa));
    // Another message, not seen by the policy service: judged here, over the quota.
    tx.queue_id = Some("4QID2".into());
    let eom = p
        .checker
        .check_end_of_message(&tx, std::slice::from_ref(&champa), 991)
        .await;
    assert!(
        matches!(&eom.decision.action, Action::Tempfail(r) if r.to_string().starts_with("452 4.2.2")),
        "{:?}",
        eom.decision
    );
    assert_eq!(p.store.usage(&champa).await.unwrap(), Some(10));
}

/// Waits (bounded) until `address`'s usage is `want`: delivered sizes are counted in the
/// background, after the reply.
async fn usage_becomes(store: &TestStore, address: &crate::model::Address, want: u64) {
    use crate::store::Store;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = store.usage(address).await.unwrap();
        if now == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage of {address} is {now:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// R13 at END-OF-MESSAGE: the recipients accepted at RCPT (without SIZE=, so they passed
/// there) are checked again with the actual size; over quota, the whole message is
/// refused; accepted, its size is added to each quota holder's usage.
#[tokio::test]
async fn quota_is_checked_again_at_end_of_message_with_the_actual_size() {
    use crate::store::Store;
    use crate::store::testing::{account, addr};
    let s = Server::start("").await;
    let champa = addr("champa@mpt.gov.la");
    let dara = addr("dara@mpt.gov.la");
    s.store
        .create_account(&account("dara@mpt.gov.la", "mpt"))
        .await
        .unwrap();
    // champa: 10 000 of her own, 9 000 used; dara: the organisation's default of 5 000.
    s.store.set_quota(&champa, Some(10_000)).await.unwrap();
    s.store.set_usage(&champa, 9_000, 0).await.unwrap();
    s.store.set_org_quota("mpt", Some(5_000)).await.unwrap();
    s.checker.directory.invalidate_all();
    let mut c = s.client().await;

    // Message m1: no SIZE=, both pass at RCPT; 1 001 bytes take champa past her quota.
    for r in [
        "champa@mpt.gov.la",
        "dara@mpt.gov.la",
        "someone@example.org",
    ] {
        let action = c.ask(&in_message("RCPT", "m1", r, "0")).await.unwrap();
        assert_eq!(action, "DUNNO", "{r}");
    }
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m1", "", "1001"))
        .await
        .unwrap();
    assert_eq!(code(&action), "452 4.2.2", "{action}");
    assert!(action.contains("champa@mpt.gov.la"), "{action}");

    // Message m2: 1 000 bytes fit exactly; both usages grow by the size after the reply.
    for r in ["champa@mpt.gov.la", "dara@mpt.gov.la"] {
        c.ask(&in_message("RCPT", "m2", r, "0")).await.unwrap();
    }
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m2", "", "1000"))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
    usage_becomes(&s.store, &champa, 10_000).await;
    usage_becomes(&s.store, &dara, 1_000).await;
    // m1 was refused: nothing of it was counted.
    assert_eq!(s.store.usage(&champa).await.unwrap(), Some(10_000));

    // Message m3: champa is full now and refused at RCPT, so only dara is checked at the
    // end (and counted).
    let action = c
        .ask(&in_message("RCPT", "m3", "champa@mpt.gov.la", "0"))
        .await
        .unwrap();
    assert_eq!(code(&action), "452 4.2.2", "{action}");
    c.ask(&in_message("RCPT", "m3", "dara@mpt.gov.la", "0"))
        .await
        .unwrap();
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m3", "", "500"))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
    usage_becomes(&s.store, &dara, 1_500).await;

    // An END-OF-MESSAGE of a message whose recipients this connection did not see (or
    // without a size) has nothing to check.
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "other", "", "999999"))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
    c.ask(&in_message("RCPT", "m4", "dara@mpt.gov.la", "0"))
        .await
        .unwrap();
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m4", "", ""))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R13",stage="eom",outcome="tempfail",protocol="policy"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn end_of_message_quota_is_552_when_permanent_and_counting_can_be_off() {
    use crate::model::{Action, Protocol, Transaction};
    use crate::store::Store;
    use crate::store::testing::addr;
    let champa = addr("champa@mpt.gov.la");
    let p = Server::start("[rules.R13]\npermanent = true\n").await;
    p.store.set_quota(&champa, Some(100)).await.unwrap();
    let mut c = p.client().await;
    c.ask(&in_message("RCPT", "m1", "champa@mpt.gov.la", "0"))
        .await
        .unwrap();
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m1", "", "101"))
        .await
        .unwrap();
    assert_eq!(code(&action), "552 5.2.2", "{action}");

    // What would be counted, decided before anything is written.
    let tx = Transaction::new(Protocol::Policy);
    let counted = |toml: &'static str| {
        let champa = champa.clone();
        let tx = tx.clone();
        async move {
            let s = Server::start(toml).await;
            s.store.set_quota(&champa, Some(1_000)).await.unwrap();
            let eom = s
                .checker
                .check_end_of_message(&tx, std::slice::from_ref(&champa), 10)
                .await;
            assert_eq!(eom.decision.action, Action::Continue);
            eom.counted().to_vec()
        }
    };
    assert_eq!(counted("").await, vec![champa.clone()]);
    assert!(
        counted("[rules.R13]\ncount_deliveries = false\n")
            .await
            .is_empty()
    );
    // Counted by the milter instead (both wired): the policy service does not count.
    assert!(
        counted("[rules.R13]\ncount_on = \"milter\"\n")
            .await
            .is_empty()
    );
    // `auto`: the policy service counts every end of DATA it is asked about, however the
    // milter is set (it leaves a mark so the milter does not count the message again).
    let envpol = "[server]\nmilter_envelope = \"policy\"\n";
    assert_eq!(counted(envpol).await, vec![champa.clone()]);
    // And the milter measures every message, for those the policy service is not asked
    // about (Postfix without smtpd_end_of_data_restrictions, or wired to the milter only).
    for toml in [envpol, ""] {
        let s = Server::start(toml).await;
        assert!(
            crate::checker::milter_measures_sizes(&s.checker.snapshot()),
            "{toml}"
        );
    }
    let s = Server::start("[rules.R13]\ncount_on = \"policy\"\n").await;
    assert!(!crate::checker::milter_measures_sizes(
        &s.checker.snapshot()
    ));
    assert!(counted("[rules.R13]\nmode = \"off\"\n").await.is_empty());
}

/// R15 through policy: Postfix asks at every RCPT; the lock is not read separately but by
/// the RCPT count itself (one store call per recipient, as R14 alone), so a lock set between
/// two recipients of one message stops the second, and the next message.
#[tokio::test]
async fn the_rcpt_count_reads_the_lock_in_the_same_call() {
    use crate::store::{LockCause, SendLock, Store};
    let s = Server::start("").await;
    let champa = "champa@mpt.gov.la";
    let mut c = s.client().await;
    let first = c
        .ask(&submission(champa, champa, "a@example.org", "m1"))
        .await
        .unwrap();
    assert_eq!(code(&first), "DUNNO", "{first}");
    let lock = SendLock {
        at: 1_796_423_281,
        by: "security-desk".into(),
        cause: LockCause::Manual {
            reason: "phished".into(),
        },
    };
    s.store
        .set_send_lock(&crate::store::testing::addr(champa), Some(&lock))
        .await
        .unwrap();
    for (rcpt, instance) in [("b@example.org", "m1"), ("c@example.org", "m2")] {
        let action = c
            .ask(&submission(champa, champa, rcpt, instance))
            .await
            .unwrap();
        assert!(action.starts_with("450 4.7.1"), "{action}");
    }
    // Answered by the RCPT count (no MAIL-stage read); nothing more counted for R14.
    let m = s.metrics();
    assert!(
        m.contains(r#"mailwarden_verdicts_total{rule="R15",stage="rcpt",outcome="tempfail",protocol="policy"} 2"#),
        "{m}"
    );
    assert!(!m.contains(r#"rule="R15",stage="mail""#), "{m}");
    let now = chrono::Utc::now().timestamp();
    let counts = s
        .store
        .counters(&crate::store::testing::addr(champa), now)
        .await
        .unwrap();
    assert_eq!(counts[0].count, 1, "only the first message: {counts:?}");
}

/// R14 counts against the account the login names, mapped as R8 maps it: a bare login with
/// `[rules.R8] login_domain` is that domain's account, also when it sends as a mailbox
/// delegated to it (the mailbox's own counters stay untouched).
#[tokio::test]
async fn limits_count_against_the_login_account_as_r8_maps_it() {
    use crate::store::Store;
    use crate::store::testing::{account, addr};
    let s = Server::start(
        "[rules.R8]\nlogin_domain = \"mpt.gov.la\"\n\
         [rules.R14]\nmessages_per_hour = 1\n[rules.R15]\nmode = \"off\"\n",
    )
    .await;
    let (cabinet, champa) = (addr("cabinet@mpt.gov.la"), addr("champa@mpt.gov.la"));
    s.store
        .create_account(&account("cabinet@mpt.gov.la", "mpt"))
        .await
        .unwrap();
    s.store.add_delegate(&cabinet, &champa).await.unwrap();
    let mut c = s.client().await;
    let first = c
        .ask(&submission(
            "champa",
            "cabinet@mpt.gov.la",
            "a@example.org",
            "m1",
        ))
        .await
        .unwrap();
    assert_eq!(first, "DUNNO");
    let second = c
        .ask(&submission(
            "champa",
            "cabinet@mpt.gov.la",
            "b@example.org",
            "m2",
        ))
        .await
        .unwrap();
    assert_eq!(code(&second), "450 4.7.1", "{second}");
    let now = chrono::Utc::now().timestamp();
    let count = |v: Vec<crate::store::CounterValue>| v[0].count;
    assert_eq!(count(s.store.counters(&champa, now).await.unwrap()), 1);
    assert_eq!(count(s.store.counters(&cabinet, now).await.unwrap()), 0);
}

/// An address extension or needless quotes name the mailbox Postfix delivers to: its
/// quota applies at RCPT and at END-OF-MESSAGE, the delivered size is counted into its
/// usage (Dovecot's key), and with `recipient_delimiter = ""` an extension is an address
/// of its own again.
#[tokio::test]
async fn extensions_and_quotes_are_judged_and_counted_as_the_mailbox() {
    use crate::store::Store;
    use crate::store::testing::addr;
    let s = Server::start("").await;
    let champa = addr("champa@mpt.gov.la");
    s.store.set_quota(&champa, Some(10_000)).await.unwrap();
    s.store.set_usage(&champa, 9_000, 0).await.unwrap();
    s.checker.directory.invalidate_all();
    let mut c = s.client().await;
    for spelling in ["champa+lists@mpt.gov.la", "\"champa\"@mpt.gov.la"] {
        let action = c
            .ask(&in_message("RCPT", "x", spelling, "1001"))
            .await
            .unwrap();
        assert_eq!(code(&action), "452 4.2.2", "{spelling}: {action}");
        assert!(action.contains("champa@mpt.gov.la is full"), "{action}");
    }
    // Within the quota at RCPT (no SIZE=), over it with the actual size at the end.
    c.ask(&in_message("RCPT", "m1", "champa+lists@mpt.gov.la", "0"))
        .await
        .unwrap();
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m1", "", "1001"))
        .await
        .unwrap();
    assert_eq!(code(&action), "452 4.2.2", "{action}");
    // One that fits is counted into champa's usage, once although named twice.
    for r in ["champa+lists@mpt.gov.la", "champa@mpt.gov.la"] {
        c.ask(&in_message("RCPT", "m2", r, "0")).await.unwrap();
    }
    let action = c
        .ask(&in_message("END-OF-MESSAGE", "m2", "", "600"))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
    usage_becomes(&s.store, &champa, 9_600).await;
    assert_eq!(
        s.store
            .usage(&addr("champa+lists@mpt.gov.la"))
            .await
            .unwrap(),
        None,
        "nothing counted under the extension's spelling"
    );

    // Without a delimiter, champa+lists is another (unknown) address: no quota of its own.
    let s = Server::start("[directory]\nrecipient_delimiter = \"\"\n").await;
    s.store.set_quota(&champa, Some(10_000)).await.unwrap();
    s.store.set_usage(&champa, 10_000, 0).await.unwrap();
    s.checker.directory.invalidate_all();
    let mut c = s.client().await;
    let action = c
        .ask(&in_message("RCPT", "y", "champa+lists@mpt.gov.la", "100"))
        .await
        .unwrap();
    assert_eq!(action, "DUNNO");
    let action = c
        .ask(&in_message("RCPT", "y", "champa@mpt.gov.la", "100"))
        .await
        .unwrap();
    assert_eq!(code(&action), "452 4.2.2", "{action}");
}
