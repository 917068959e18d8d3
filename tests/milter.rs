//! The milter front-end over the wire: a milter served on 127.0.0.1:0, the MTA side scripted
//! with `mailwarden::milter::client` or raw bytes.

mod common;

use common::milter::{Logs, Milter};
use common::store::seeded_store;
use indymilter::{Actions, MacroStage, ProtoOpts};
use mailwarden::milter::{
    Features,
    client::{Message, MtaConnection, Outcome, Status},
    loadgen::{self, LoadSpec},
};
use std::{net::IpAddr, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_IP: &str = "192.0.2.7";

async fn open(m: &Milter) -> MtaConnection {
    let mut c = MtaConnection::open(&m.addr, TIMEOUT).await.unwrap();
    let ip: IpAddr = CLIENT_IP.parse().unwrap();
    assert_eq!(
        c.connect("mx.example.org", ip, &[]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.helo("mx.example.org", &[("{tls_version}", "TLSv1.3")])
            .await
            .unwrap(),
        Status::Continue
    );
    c
}

fn msg<'a>(sender: &'a str, rcpts: &[&'a str]) -> Message<'a> {
    Message {
        sender,
        recipients: rcpts.to_vec(),
        headers: vec![("From", "x"), ("Subject", "s")],
        body: b"hello\r\n",
        ..Message::default()
    }
}

/// The reply text of a refusal, e.g. "550 5.2.1 Mailbox ...".
fn text(s: &Status) -> String {
    match s.reply() {
        Some(r) => r.to_owned(),
        None => panic!("expected a refusal with a reply, got {s:?}"),
    }
}

fn is_reject(s: &Status) -> bool {
    matches!(s, Status::Reject { .. })
}

fn is_tempfail(s: &Status) -> bool {
    matches!(s, Status::Tempfail { .. })
}

#[tokio::test]
async fn suspended_recipient_is_refused_550_5_2_1_and_the_other_recipient_accepted() {
    let m = Milter::spawn("", seeded_store().await).await;
    let mut c = open(&m).await;
    let out = c
        .transaction(&msg(
            "<champa@mpt.gov.la>",
            &["<somsak@mpt.gov.la>", "<bounmy@mpt.gov.la>"],
        ))
        .await
        .unwrap();
    assert_eq!(out.mail, Status::Continue);
    assert!(is_reject(&out.rcpts[0]));
    assert!(
        text(&out.rcpts[0]).starts_with("550 5.2.1 Mailbox <somsak@mpt.gov.la> is suspended"),
        "{}",
        text(&out.rcpts[0])
    );
    assert_eq!(out.rcpts[1], Status::Continue);
    assert_eq!(
        out.eom,
        Some(Status::Continue),
        "the message goes on for bounmy"
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn withdrawn_and_ceased_recipients_are_refused_550_5_1_1() {
    let m = Milter::spawn("", seeded_store().await).await;
    let mut c = open(&m).await;
    let out = c
        .transaction(&msg(
            "<someone@example.org>",
            &["<old@mpt.gov.la>", "<vilay@xyz.gov.la>"],
        ))
        .await
        .unwrap();
    assert_eq!(
        out.mail,
        Status::Continue,
        "external senders are not judged"
    );
    let withdrawn = text(&out.rcpts[0]);
    assert!(withdrawn.starts_with("550 5.1.1 "), "{withdrawn}");
    assert!(withdrawn.contains("withdrawn"), "{withdrawn}");
    let ceased = text(&out.rcpts[1]);
    assert!(ceased.starts_with("550 5.1.1 "), "{ceased}");
    assert!(ceased.contains("ceased"), "{ceased}");
    assert_eq!(
        out.eom, None,
        "no recipient left: the MTA does not send DATA"
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn unregistered_or_pending_sender_is_refused_553_5_7_1_at_mail() {
    let m = Milter::spawn("", seeded_store().await).await;
    let mut c = open(&m).await;
    for sender in ["<nobody@mpt.gov.la>", "<newbie@mpt.gov.la>"] {
        let out = c
            .transaction(&msg(sender, &["<bounmy@mpt.gov.la>"]))
            .await
            .unwrap();
        assert!(is_reject(&out.mail), "{sender}: {:?}", out.mail);
        assert!(
            text(&out.mail).starts_with("553 5.7.1 "),
            "{}",
            text(&out.mail)
        );
        assert!(out.rcpts.is_empty());
    }
    // A withdrawn name cannot send either (R2).
    let out = c
        .transaction(&msg("<old@mpt.gov.la>", &["<bounmy@mpt.gov.la>"]))
        .await
        .unwrap();
    assert!(
        text(&out.mail).starts_with("550 5.7.1 "),
        "{}",
        text(&out.mail)
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn monitor_mode_continues_and_counts_would_reject() {
    let cfg = "[rules.R1]\nmode = \"monitor\"\n[rules.R9]\nmode = \"monitor\"\n";
    let m = Milter::spawn(cfg, seeded_store().await).await;
    let mut c = open(&m).await;
    let out = c
        .transaction(&msg("<nobody@mpt.gov.la>", &["<somsak@mpt.gov.la>"]))
        .await
        .unwrap();
    assert_eq!(out.mail, Status::Continue);
    assert_eq!(out.rcpts, vec![Status::Continue]);
    assert_eq!(out.eom, Some(Status::Continue));
    let metrics = m.checker.metrics.encode();
    for rule_stage in [r#"rule="R1",stage="rcpt""#, r#"rule="R9",stage="mail""#] {
        assert!(
            metrics.contains(&format!(
                r#"mailwarden_verdicts_total{{{rule_stage},outcome="would_reject",protocol="milter"}} 1"#
            )),
            "{metrics}"
        );
    }
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn store_outage_tempfails_the_recipient_451_4_3_0() {
    let store = seeded_store().await;
    let m = Milter::spawn("", store.clone()).await;
    let mut c = open(&m).await;
    assert_eq!(
        c.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap(),
        Status::Continue
    );
    store.set_down(true);
    m.checker.directory.invalidate_all();
    let r = c.rcpt("<bounmy@mpt.gov.la>", &[]).await.unwrap();
    assert!(is_tempfail(&r), "{r:?}");
    assert!(text(&r).starts_with("451 4.3.0 "), "{}", text(&r));
    c.abort().await.unwrap();
    // MAIL needs a lookup too (is the sender's domain local?): tempfailed as well.
    let out = c
        .transaction(&msg("<someone@example.org>", &["<bounmy@mpt.gov.la>"]))
        .await
        .unwrap();
    assert!(
        text(&out.mail).starts_with("451 4.3.0 "),
        "{}",
        text(&out.mail)
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn macros_reach_the_decision_log_and_messages_on_one_connection_are_separate() {
    let logs = Logs::default();
    let _guard = logs.install();
    // Send-as (R8) is not this test's subject: its envelope-only negotiation is.
    let m = Milter::spawn("[rules.R8]\nmode = \"off\"\n", seeded_store().await).await;
    let mut c = open(&m).await;

    // Message 1: queue id known from RCPT on (Postfix's default), one refused recipient.
    c.mail(&["<champa@mpt.gov.la>"], &[("{auth_authen}", "champa")])
        .await
        .unwrap();
    let r = c
        .rcpt("<somsak@mpt.gov.la>", &[("i", "QID1")])
        .await
        .unwrap();
    assert!(is_reject(&r));
    assert_eq!(
        c.rcpt("<bounmy@mpt.gov.la>", &[("i", "QID1")])
            .await
            .unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.content(&[], b"", &[("i", "QID1")]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(c.eom(&[("i", "QID1")]).await.unwrap(), Status::Continue);
    c.abort().await.unwrap();

    // Message 2 on the same connection: its own queue id.
    let out = c
        .transaction(&Message {
            queue_id: Some("QID2"),
            ..msg("<champa@mpt.gov.la>", &["<old@mpt.gov.la>"])
        })
        .await
        .unwrap();
    assert!(is_reject(&out.rcpts[0]));

    // Message 3: no queue id sent. indymilter (like libmilter) keeps MAIL-stage macros until
    // the MTA sends new ones, so message 2's `i` is still there: it must not be reused.
    let out = c
        .transaction(&msg("<champa@mpt.gov.la>", &["<somsak@mpt.gov.la>"]))
        .await
        .unwrap();
    assert!(is_reject(&out.rcpts[0]));

    let somsak = logs.lines_with("somsak@mpt.gov.la");
    assert_eq!(somsak.len(), 2, "{}", logs.text());
    assert!(somsak[0].contains("QID1"), "{}", somsak[0]);
    assert!(somsak[0].contains(r#"rule="R1""#), "{}", somsak[0]);
    assert!(somsak[0].contains(CLIENT_IP), "{}", somsak[0]);
    assert!(!somsak[1].contains("QID"), "stale queue id: {}", somsak[1]);
    assert!(
        somsak[1].contains(CLIENT_IP),
        "connection state kept: {}",
        somsak[1]
    );
    let old = logs.lines_with("old@mpt.gov.la");
    assert_eq!(old.len(), 1, "{}", logs.text());
    assert!(
        old[0].contains("QID2") && !old[0].contains("QID1"),
        "{}",
        old[0]
    );
    // SASL login names are not logged.
    assert!(!logs.text().contains("{auth_authen}"));

    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn a_panic_below_the_checker_tempfails_that_message_only() {
    let logs = Logs::default();
    let _guard = logs.install();
    let store = seeded_store().await;
    *store.panic_on.lock().unwrap() = Some("bounmy@mpt.gov.la".parse().unwrap());
    // Envelope stages only (R8 off: no header stages).
    let m = Milter::spawn("[rules.R8]\nmode = \"off\"\n", store).await;
    let mut c = open(&m).await;

    c.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap();
    let r = c
        .rcpt("<bounmy@mpt.gov.la>", &[("i", "QIDP")])
        .await
        .unwrap();
    assert!(is_tempfail(&r), "{r:?}");
    assert!(text(&r).starts_with("451 4.3.0 "));
    // The rest of that message is tempfailed too, even a recipient that checks fine.
    let r = c.rcpt("<champa@mpt.gov.la>", &[]).await.unwrap();
    assert!(is_tempfail(&r), "{r:?}");
    // DATA is not a milter stage here (skipped at negotiation); end of message, which the
    // MTA always sends, tempfails the message.
    assert_eq!(c.content(&[], b"", &[]).await.unwrap(), Status::Continue);
    let e = c.eom(&[]).await.unwrap();
    assert!(is_tempfail(&e), "{e:?}");
    c.abort().await.unwrap();
    let failure = logs.lines_with("milter callback failed");
    assert_eq!(failure.len(), 1, "{}", logs.text());
    assert!(failure[0].contains("QIDP"), "{}", failure[0]);

    // The connection survives and the next message is judged normally.
    let out = c
        .transaction(&msg("<champa@mpt.gov.la>", &["<champa@mpt.gov.la>"]))
        .await
        .unwrap();
    assert_eq!(out.rcpts, vec![Status::Continue]);
    assert_eq!(out.eom, Some(Status::Continue));
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn negotiation_skips_unneeded_stages_and_asks_for_the_queue_id() {
    // Every header rule off (R8 is the only one on by default that reads headers), and R13,
    // which measures messages at their end (count_on = "auto").
    let m = Milter::spawn(
        "[rules.R8]\nmode = \"off\"\n[rules.R13]\nmode = \"off\"\n",
        seeded_store().await,
    )
    .await;
    let c = MtaConnection::open(&m.addr, TIMEOUT).await.unwrap();
    let opts = c.negotiated_opts();
    // Only MAIL, RCPT and end of message are stages of their own: every skipped stage is
    // one round trip less per SMTP session.
    assert!(opts.contains(
        ProtoOpts::NO_BODY
            | ProtoOpts::NO_HEADER
            | ProtoOpts::NO_EOH
            | ProtoOpts::NO_CONNECT
            | ProtoOpts::NO_HELO
            | ProtoOpts::NO_DATA
    ));
    assert!(!opts.intersects(ProtoOpts::NO_MAIL | ProtoOpts::NO_RCPT));
    // No message modification yet; only the per-stage macro lists.
    assert_eq!(c.negotiated_actions(), Actions::REQUEST_MACROS);
    for stage in [
        MacroStage::Mail,
        MacroStage::Rcpt,
        MacroStage::Data,
        MacroStage::Eom,
    ] {
        let list = c.requested_macros()[&stage].to_str().unwrap().to_owned();
        assert!(list.split(' ').any(|x| x == "i"), "{stage:?}: {list}");
    }
    c.close().await.unwrap();

    // With the body switch on (what the DKIM signer will need), headers and body flow.
    let m2 = Milter::spawn_with(
        "",
        seeded_store().await,
        Features {
            headers: true,
            body: true,
            ..Features::default()
        },
    )
    .await;
    let mut c = open(&m2).await;
    assert!(!c.negotiated_opts().contains(ProtoOpts::NO_BODY));
    assert!(!c.negotiated_opts().contains(ProtoOpts::NO_HEADER));
    let out = c
        .transaction(&msg("<champa@mpt.gov.la>", &["<bounmy@mpt.gov.la>"]))
        .await
        .unwrap();
    assert_eq!(out.eom, Some(Status::Continue));
    c.close().await.unwrap();
    m.stop().await;
    m2.stop().await;
}

/// Writes raw bytes on a fresh connection and expects the milter to hang up.
async fn garbage_is_hung_up(m: &Milter, bytes: &[u8]) {
    let mailwarden::config::ListenAddr::Inet(addr) = m.addr else {
        unreachable!()
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .expect("milter hangs up instead of waiting")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected end of stream, got {:?}", &buf[..n]);
}

#[tokio::test]
async fn protocol_garbage_ends_only_that_connection() {
    let m = Milter::spawn("", seeded_store().await).await;
    let mut a = open(&m).await;
    assert_eq!(
        a.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap(),
        Status::Continue
    );

    // A 4 GiB length prefix.
    garbage_is_hung_up(&m, &[0xff, 0xff, 0xff, 0xff, b'O']).await;
    // A well-framed unknown command.
    garbage_is_hung_up(&m, &[0, 0, 0, 1, b'Z']).await;
    // A negotiation too short to parse.
    garbage_is_hung_up(&m, &[0, 0, 0, 3, b'O', 0, 6]).await;

    // The connection in the middle of a message carries on.
    assert_eq!(
        a.rcpt("<bounmy@mpt.gov.la>", &[]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(a.content(&[], b"", &[]).await.unwrap(), Status::Continue);
    assert_eq!(a.eom(&[]).await.unwrap(), Status::Continue);
    a.close().await.unwrap();
    // And new connections are served.
    let mut b = open(&m).await;
    let out = b
        .transaction(&msg("<champa@mpt.gov.la>", &["<somsak@mpt.gov.la>"]))
        .await
        .unwrap();
    assert!(is_reject(&out.rcpts[0]));
    b.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_the_message_in_flight_and_refuses_new_ones() {
    let m = Milter::spawn("", seeded_store().await).await;
    let mut busy = open(&m).await;
    let mut idle = open(&m).await;
    assert_eq!(
        busy.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap(),
        Status::Continue
    );
    assert!(
        m.checker
            .metrics
            .encode()
            .contains(r#"mailwarden_connections_open{protocol="milter"} 2"#)
    );

    m.shutdown.cancel();
    m.serve.await.unwrap().unwrap();
    m.sessions.close();

    // A new message on an open connection is refused with a temporary error.
    let out = idle
        .transaction(&msg("<champa@mpt.gov.la>", &["<bounmy@mpt.gov.la>"]))
        .await
        .unwrap();
    assert!(is_tempfail(&out.mail), "{:?}", out.mail);
    assert!(
        text(&out.mail).starts_with("421 4.3.2 "),
        "{}",
        text(&out.mail)
    );

    // The message in flight completes normally, recipient checks included.
    let r = busy.rcpt("<somsak@mpt.gov.la>", &[]).await.unwrap();
    assert!(text(&r).starts_with("550 5.2.1 "));
    // Then every session ends and the drain completes.
    complete_and_drain(&mut busy, &m.sessions).await;
    assert!(
        m.checker
            .metrics
            .encode()
            .contains(r#"mailwarden_connections_open{protocol="milter"} 0"#)
    );
    // The idle connection was closed by the milter.
    assert!(idle.mail(&["<champa@mpt.gov.la>"], &[]).await.is_err());
}

/// A milter with `server.milter_envelope = "policy"` and a connection to it, which agreed to
/// send MAIL and RCPT without waiting for a reply.
async fn envelope_by_policy() -> (Milter, MtaConnection) {
    let m = Milter::spawn(
        "[server]\nmilter_envelope = \"policy\"\n",
        seeded_store().await,
    )
    .await;
    let c = open(&m).await;
    assert!(
        c.negotiated_opts()
            .contains(ProtoOpts::NOREPLY_MAIL | ProtoOpts::NOREPLY_RCPT)
    );
    (m, c)
}

/// Finishes `busy`'s message in flight (a recipient that may receive, content, end of
/// message: all let through) and waits until the drain completes.
async fn complete_and_drain(busy: &mut MtaConnection, sessions: &tokio_util::task::TaskTracker) {
    assert_eq!(
        busy.rcpt("<bounmy@mpt.gov.la>", &[]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(busy.content(&[], b"", &[]).await.unwrap(), Status::Continue);
    assert_eq!(busy.eom(&[]).await.unwrap(), Status::Continue);
    tokio::time::timeout(TIMEOUT, sessions.wait())
        .await
        .expect("drain completes once no message is in flight");
}

/// With the envelope left to the policy service (`milter_envelope = "policy"`), MAIL gets
/// no reply: a message started while shutting down is refused `421 4.3.2` at its end of
/// DATA instead (nothing accepted), and the drain still completes.
#[tokio::test]
async fn shutdown_refuses_new_messages_at_end_of_data_when_mail_gets_no_reply() {
    let (m, mut idle) = envelope_by_policy().await;
    let mut busy = open(&m).await;
    // A message in flight keeps the drain (and so the idle connection) open. MAIL gets no
    // reply to wait for: give the milter a moment to read it.
    assert_eq!(
        busy.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap(),
        Status::Continue
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.shutdown.cancel();
    m.serve.await.unwrap().unwrap();
    m.sessions.close();

    let out = idle
        .transaction(&msg("<champa@mpt.gov.la>", &["<bounmy@mpt.gov.la>"]))
        .await
        .unwrap();
    assert_eq!(out.mail, Status::Continue, "no reply at MAIL");
    assert_eq!(out.rcpts, [Status::Continue], "no reply at RCPT");
    let eom = out.eom.expect("DATA was sent");
    assert!(is_tempfail(&eom), "{eom:?}");
    assert!(text(&eom).starts_with("421 4.3.2 "), "{}", text(&eom));

    // The message in flight is answered normally, and the drain completes.
    complete_and_drain(&mut busy, &m.sessions).await;
    // The idle connection was closed by the milter (MAIL has no reply: the first answer
    // awaited, at end of message, finds the connection gone).
    assert!(
        idle.transaction(&msg("<champa@mpt.gov.la>", &["<bounmy@mpt.gov.la>"]))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn shutdown_with_no_message_in_flight_closes_idle_connections_at_once() {
    let m = Milter::spawn("", seeded_store().await).await;
    let mut idle = open(&m).await;
    let addr = m.addr.clone();
    let sessions = m.sessions.clone();
    m.stop().await;
    assert!(sessions.is_empty());
    assert!(idle.mail(&["<champa@mpt.gov.la>"], &[]).await.is_err());
    assert!(MtaConnection::open(&addr, TIMEOUT).await.is_err());
}

#[tokio::test]
async fn unix_socket_listener_serves() {
    let dir = tempfile::tempdir().unwrap();
    let addr: mailwarden::config::ListenAddr =
        format!("unix:{}", dir.path().join("milter.sock").display())
            .parse()
            .unwrap();
    let listener = mailwarden::net::Listener::bind(&addr).await.unwrap();
    let checker = common::milter::checker("", seeded_store().await);
    let m = Milter::serve_on(listener, checker, Features::default());
    let mut c = open(&m).await;
    let out: Outcome = c
        .transaction(&msg(
            "<champa@mpt.gov.la>",
            &["<somsak@mpt.gov.la>", "<bounmy@mpt.gov.la>"],
        ))
        .await
        .unwrap();
    assert!(text(&out.rcpts[0]).starts_with("550 5.2.1 "));
    assert_eq!(out.eom, Some(Status::Continue));
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn load_generator_runs_full_transactions() {
    // Sending counted by the policy service: 60 messages of one sender in a second would
    // lock it (R15's burst).
    let m = Milter::spawn("[rules.R14]\ncount_on = \"policy\"\n", seeded_store().await).await;
    let mut spec = LoadSpec::new(
        m.addr.clone(),
        "champa@mpt.gov.la",
        &["bounmy@mpt.gov.la", "somsak@mpt.gov.la"],
    );
    spec.connections = 3;
    spec.transactions = 20;
    let report = loadgen::run(&spec).await.unwrap();
    assert_eq!(report.transactions, 60);
    assert_eq!(report.delivered, 60, "{report:?}");
    assert_eq!(report.refused, 0);
    assert_eq!(report.failed_connections, 0, "{:?}", report.first_error);
    assert!(report.p50 <= report.p99 && report.p99 <= report.max);
    assert!(report.max > Duration::ZERO && report.per_second() > 0.0);
    // Each message had one refused recipient: 60 R1 rejections were counted.
    assert!(m.checker.metrics.encode().contains(
        r#"mailwarden_verdicts_total{rule="R1",stage="rcpt",outcome="reject",protocol="milter"} 60"#
    ));

    // An unregistered sender: every message refused at MAIL.
    spec.sender = "nobody@mpt.gov.la".into();
    spec.connections = 2;
    spec.transactions = 5;
    let report = loadgen::run(&spec).await.unwrap();
    assert_eq!((report.transactions, report.refused), (10, 10));

    // Nothing listening: counted as failed connections, not a crash.
    let addr = m.addr.clone();
    m.stop().await;
    spec.addr = addr;
    let report = loadgen::run(&spec).await.unwrap();
    assert_eq!(report.failed_connections, 2);
    assert_eq!(report.transactions, 0);
    assert!(report.first_error.is_some());
}

#[tokio::test]
async fn the_daemon_drains_the_milter_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mailwarden.db");
    let toml = format!(
        "[server]\nmilter_listen = \"inet:127.0.0.1:0\"\npolicy_listen = \"\"\nshutdown_grace = \"10s\"\n\
         [admin]\nlisten = \"\"\n[store]\nurl = \"sqlite:{}\"\n",
        db.display()
    );
    let config = mailwarden::config::Config::from_toml(&toml).unwrap();
    let daemon = mailwarden::Daemon::start(config, None).await.unwrap();
    common::store::seed(daemon.checker.directory.store().as_ref()).await;
    let addr: mailwarden::config::ListenAddr =
        daemon.bound().milter.as_deref().unwrap().parse().unwrap();
    let (control, rx) = tokio::sync::mpsc::channel(1);
    let running = tokio::spawn(daemon.serve(rx));

    let mut idle = MtaConnection::open(&addr, TIMEOUT).await.unwrap();
    let mut c = MtaConnection::open(&addr, TIMEOUT).await.unwrap();
    c.connect("mx.example.org", CLIENT_IP.parse().unwrap(), &[])
        .await
        .unwrap();
    c.helo("mx.example.org", &[("{tls_version}", "TLSv1.3")])
        .await
        .unwrap();
    assert_eq!(
        c.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap(),
        Status::Continue
    );
    control.send(mailwarden::Control::Shutdown).await.unwrap();
    // Draining: a new message is refused...
    let m = idle.mail(&["<champa@mpt.gov.la>"], &[]).await.unwrap();
    assert!(text(&m).starts_with("421 4.3.2 "), "{m:?}");
    // ...while the message in flight is still judged and finished.
    let r = c.rcpt("<somsak@mpt.gov.la>", &[]).await.unwrap();
    assert!(text(&r).starts_with("550 5.2.1 "), "{r:?}");
    assert_eq!(
        c.rcpt("<bounmy@mpt.gov.la>", &[]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(c.content(&[], b"", &[]).await.unwrap(), Status::Continue);
    assert_eq!(c.eom(&[]).await.unwrap(), Status::Continue);
    tokio::time::timeout(TIMEOUT, running)
        .await
        .expect("daemon stops once the message is done")
        .unwrap()
        .unwrap();
}

/// R8 at end of headers: the From: and Sender: fields of an authenticated client's message
/// must be its own or delegated addresses, exactly one From: with one address; refusals are
/// `553 5.7.1` naming the address, given at the end of DATA.
#[tokio::test]
async fn send_as_judges_from_and_sender_headers_at_end_of_headers() {
    use mailwarden::store::{AccountStatus, Store};
    let store = seeded_store().await;
    store
        .create_account(&common::store::account(
            "cabinet@mpt.gov.la",
            AccountStatus::Active,
        ))
        .await
        .unwrap();
    store
        .add_delegate(
            &"cabinet@mpt.gov.la".parse().unwrap(),
            &"champa@mpt.gov.la".parse().unwrap(),
        )
        .await
        .unwrap();
    // R13 counted by the policy service: the milter need not measure messages.
    let m = Milter::spawn("[rules.R13]\ncount_on = \"policy\"\n", store).await;
    let mut c = open(&m).await;
    // Headers are asked for (R8 is on by default), the body is not.
    assert!(!c.negotiated_opts().contains(ProtoOpts::NO_HEADER));
    assert!(c.negotiated_opts().contains(ProtoOpts::NO_BODY));
    let message =
        |headers: Vec<(&'static str, &'static str)>, login: Option<&'static str>| Message {
            sender: "<champa@mpt.gov.la>",
            recipients: vec!["<bounmy@mpt.gov.la>"],
            headers,
            body: b"hello\r\n",
            mail_macros: login.map(|l| ("{auth_authen}", l)).into_iter().collect(),
            ..Message::default()
        };
    let champa = Some("champa@mpt.gov.la");
    for (headers, login) in [
        (vec![("From", "Champa <Champa@MPT.gov.la>")], champa),
        (vec![("From", "Cabinet <cabinet@mpt.gov.la>")], champa),
        (
            vec![
                ("From", "cabinet@mpt.gov.la"),
                ("Sender", "champa@mpt.gov.la"),
            ],
            champa,
        ),
        // Not authenticated: not R8's business (R7 judges inbound mail).
        (vec![("From", "dg@mpt.gov.la"), ("From", "x@y.org")], None),
    ] {
        let out = c
            .transaction(&message(headers.clone(), login))
            .await
            .unwrap();
        assert_eq!(out.eom, Some(Status::Continue), "{headers:?}");
    }
    for (headers, want) in [
        (
            vec![("From", "Boss <bounmy@mpt.gov.la>")],
            "553 5.7.1 From: address <bounmy@mpt.gov.la> is not yours",
        ),
        (
            vec![("From", "champa@mpt.gov.la"), ("From", "champa@mpt.gov.la")],
            "553 5.7.1 The message has 2 From: header fields",
        ),
        (
            vec![("From", "champa@mpt.gov.la, cabinet@mpt.gov.la")],
            "553 5.7.1 The From: header holds 2 addresses",
        ),
        (
            vec![("Subject", "no author")],
            "553 5.7.1 The message has 0 From: header fields",
        ),
        (
            vec![
                ("From", "champa@mpt.gov.la"),
                ("Sender", "bounmy@mpt.gov.la"),
            ],
            "553 5.7.1 Sender: address <bounmy@mpt.gov.la> is not yours",
        ),
    ] {
        let out = c
            .transaction(&message(headers.clone(), champa))
            .await
            .unwrap();
        let eom = out.eom.expect("refused at end of headers");
        assert!(is_reject(&eom), "{headers:?}: {eom:?}");
        assert!(text(&eom).starts_with(want), "{headers:?}: {}", text(&eom));
    }
    let metrics = m.checker.metrics.encode();
    assert!(
        metrics.contains(
            r#"mailwarden_verdicts_total{rule="R8",stage="eom",outcome="reject",protocol="milter"} 5"#
        ),
        "{metrics}"
    );
    // One eom decision per refused message; a pass at end of headers is not an answer yet
    // (without DKIM nothing more is decided for those messages).
    assert!(
        metrics.contains(
            r#"mailwarden_decisions_total{stage="eom",action="reject",protocol="milter"} 5"#
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"mailwarden_decisions_total{stage="eom",action="continue""#),
        "{metrics}"
    );
    c.close().await.unwrap();
    m.stop().await;
}

/// The end-of-headers verdict (R8 here) costs no round trip when the MTA agrees to wait for
/// no reply there (`NOREPLY_EOH`, Postfix 2.6 and later): it comes at end of message, which
/// is when Postfix gives it to the client anyway. An MTA that does not offer the option gets
/// it at end of headers.
#[tokio::test]
async fn the_end_of_headers_verdict_comes_at_end_of_message_without_a_reply_there() {
    let m = Milter::spawn("", seeded_store().await).await;
    let headers = [("From", "Boss <bounmy@mpt.gov.la>")];
    let login = [("{auth_authen}", "champa@mpt.gov.la")];
    let want = "553 5.7.1 From: address <bounmy@mpt.gov.la> is not yours";
    for offered in [ProtoOpts::all(), ProtoOpts::all() - ProtoOpts::NOREPLY_EOH] {
        let mut c = MtaConnection::open_offering(&m.addr, TIMEOUT, offered)
            .await
            .unwrap();
        let ip: IpAddr = CLIENT_IP.parse().unwrap();
        c.connect("mx.example.org", ip, &[]).await.unwrap();
        c.helo("mx.example.org", &[("{tls_version}", "TLSv1.3")])
            .await
            .unwrap();
        let noreply = c.negotiated_opts().contains(ProtoOpts::NOREPLY_EOH);
        assert_eq!(noreply, offered.contains(ProtoOpts::NOREPLY_EOH));
        assert_eq!(
            c.mail(&["<champa@mpt.gov.la>"], &login).await.unwrap(),
            Status::Continue
        );
        assert_eq!(
            c.rcpt("<bounmy@mpt.gov.la>", &[]).await.unwrap(),
            Status::Continue
        );
        let content = c.content(&headers, b"hi\r\n", &[]).await.unwrap();
        let verdict = if noreply {
            assert_eq!(
                content,
                Status::Continue,
                "nothing answered at end of headers"
            );
            c.eom(&[]).await.unwrap()
        } else {
            content
        };
        assert!(is_reject(&verdict), "{offered:?}: {verdict:?}");
        assert!(text(&verdict).starts_with(want), "{}", text(&verdict));
        c.abort().await.unwrap();
        // The next message on the connection starts clean: no verdict left over.
        let out = c
            .transaction(&Message {
                sender: "<champa@mpt.gov.la>",
                recipients: vec!["<bounmy@mpt.gov.la>"],
                headers: vec![("From", "champa@mpt.gov.la")],
                body: b"hi\r\n",
                mail_macros: login.to_vec(),
                ..Message::default()
            })
            .await
            .unwrap();
        assert_eq!(out.eom, Some(Status::Continue));
        c.close().await.unwrap();
    }
    m.stop().await;
}

/// `server.milter_envelope = "policy"`: MAIL and RCPT are read (Postfix was asked for no
/// reply there) and not judged, since the policy service answers them; the headers are
/// still judged here, with the verdict at end of message.
#[tokio::test]
async fn with_the_envelope_left_to_policy_mail_and_rcpt_are_read_not_answered() {
    let (m, mut c) = envelope_by_policy().await;
    // A suspended recipient is the policy service's to refuse (Postfix asks it first and
    // never hands a refused recipient to the milter): nothing is answered here. A stray
    // reply would be read as the next stage's answer and fail the checks below.
    let out = c
        .transaction(&msg(
            "<champa@mpt.gov.la>",
            &["<somsak@mpt.gov.la>", "<bounmy@mpt.gov.la>"],
        ))
        .await
        .unwrap();
    assert_eq!(out.mail, Status::Continue);
    assert_eq!(out.rcpts, [Status::Continue, Status::Continue]);
    assert_eq!(out.eom, Some(Status::Continue));
    let forged = c
        .transaction(&Message {
            sender: "<champa@mpt.gov.la>",
            recipients: vec!["<bounmy@mpt.gov.la>"],
            headers: vec![("From", "Boss <bounmy@mpt.gov.la>")],
            body: b"hi\r\n",
            mail_macros: vec![("{auth_authen}", "champa@mpt.gov.la")],
            ..Message::default()
        })
        .await
        .unwrap();
    let eom = forged.eom.expect("DATA was sent");
    assert!(
        text(&eom).starts_with("553 5.7.1 From: address <bounmy@mpt.gov.la> is not yours"),
        "{eom:?}"
    );
    let metrics = m.checker.metrics.encode();
    for stage in ["mail", "rcpt"] {
        assert!(
            !metrics.contains(&format!("stage=\"{stage}\",action=")),
            "{stage} judged by the milter: {metrics}"
        );
    }
    c.close().await.unwrap();
    m.stop().await;
}
