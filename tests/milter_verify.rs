//! R7 over the milter protocol, the MTA side scripted with `mailwarden::milter::client`.
//! The resolver points at a loopback UDP socket that never answers: these tests are about
//! what the milter asks and does (negotiation, header deletion and insertion, who is
//! verified at all), not about DNS (see `tests/postfix_verify.rs` and `src/verify/tests.rs`).

mod common;

use common::milter::Milter;
use common::store::seeded_store;
use indymilter::{Actions, ProtoOpts, message::reply::Reply};
use mailwarden::milter::client::{Message, MtaConnection, Status};
use std::{net::UdpSocket, time::Duration};

const TIMEOUT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/dkim/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn config(silent: &UdpSocket, extra: &str) -> String {
    format!(
        r#"
[dns]
nameservers = ["{}"]
timeout = "200ms"
attempts = 1
message_timeout = "3s"
[rules.R7]
authserv_id = "mx.mpt.gov.la"
[[dkim.keys]]
domain = "mpt.gov.la"
selector = "rsa1"
algorithm = "rsa-sha256"
key_file = "{}"
{extra}
"#,
        silent.local_addr().unwrap(),
        fixture("rsa2048-pkcs1.pem"),
    )
}

async fn open(m: &Milter, client_ip: &str) -> MtaConnection {
    let mut c = MtaConnection::open(&m.addr, TIMEOUT).await.unwrap();
    assert_eq!(
        c.connect("client.example", client_ip.parse().unwrap(), &[])
            .await
            .unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.helo("client.example", &[("{tls_version}", "TLSv1.3")])
            .await
            .unwrap(),
        Status::Continue
    );
    c
}

fn message<'a>(
    sender: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    auth: Option<&'a str>,
) -> Message<'a> {
    Message {
        sender,
        recipients: vec!["<bounmy@mpt.gov.la>"],
        headers,
        body: b"Hello.\r\n",
        queue_id: Some("QR7"),
        mail_macros: auth.map(|a| ("{auth_authen}", a)).into_iter().collect(),
        ..Message::default()
    }
}

#[tokio::test]
async fn r7_asks_for_helo_content_and_header_changes() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Milter::spawn(&config(&silent, ""), seeded_store().await).await;
    let c = open(&m, "192.0.2.7").await;
    let opts = c.negotiated_opts();
    assert!(!opts.intersects(
        ProtoOpts::NO_HELO | ProtoOpts::NO_HEADER | ProtoOpts::NO_EOH | ProtoOpts::NO_BODY
    ));
    // The client address and name come as macros at MAIL: no CONNECT stage.
    assert!(opts.contains(ProtoOpts::NO_CONNECT));
    assert!(
        c.negotiated_actions()
            .contains(Actions::ADD_HEADER | Actions::CHANGE_HEADER)
    );
    // HELO is recorded, never judged: the MTA waits for no reply there.
    assert!(opts.contains(ProtoOpts::NOREPLY_HELO));
    c.close().await.unwrap();
    // An MTA without those options gets its replies (a missing one would stall the client
    // until its timeout; a stray one would be read as the next stage's answer); one that
    // cannot skip CONNECT gets an answer there too.
    let offered = ProtoOpts::all()
        - ProtoOpts::NOREPLY_CONNECT
        - ProtoOpts::NOREPLY_HELO
        - ProtoOpts::NO_CONNECT;
    let mut c = MtaConnection::open_offering(&m.addr, TIMEOUT, offered)
        .await
        .unwrap();
    assert!(
        !c.negotiated_opts()
            .intersects(ProtoOpts::NOREPLY_CONNECT | ProtoOpts::NOREPLY_HELO)
    );
    let ip = "192.0.2.7".parse().unwrap();
    assert_eq!(
        c.connect("client.example", ip, &[]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.helo("client.example", &[]).await.unwrap(),
        Status::Continue
    );
    let msg = message(
        "<news@example.org>",
        vec![("From", " news@example.org")],
        None,
    );
    let out = c.transaction(&msg).await.unwrap();
    assert_eq!(out.eom, Some(Status::Continue), "{out:?}");
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn inbound_mail_loses_forged_results_and_gets_ours_at_the_top() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Milter::spawn(&config(&silent, ""), seeded_store().await).await;
    let mut c = open(&m, "192.0.2.7").await;
    let msg = message(
        "<news@example.org>",
        vec![
            ("Authentication-Results", " other.example; spf=pass"),
            (
                "Authentication-Results",
                " mx.mpt.gov.la; dkim=pass header.d=mpt.gov.la",
            ),
            ("From", " news@example.org"),
            (
                "Authentication-Results",
                " (forged)\n\tMX.mpt.gov.la;\n\tdmarc=pass",
            ),
            ("Subject", " hello"),
        ],
        None,
    );
    let (out, actions) = c.transaction_with_actions(&msg).await.unwrap();
    // example.org is not local: R7 lets it through whatever DNS says.
    assert_eq!(out.eom, Some(Status::Continue), "{out:?}");
    let summary: Vec<String> = actions
        .iter()
        .map(|a| match a {
            Reply::ChangeHeader { name, index, value } => format!(
                "change {} {index} {:?}",
                name.to_str().unwrap(),
                value.to_str().unwrap()
            ),
            Reply::InsertHeader { index, name, value } => format!(
                "insert {index} {} {}",
                name.to_str().unwrap(),
                value.to_str().unwrap()
            ),
            other => format!("{other:?}"),
        })
        .collect();
    // The 3rd and the 2nd A-R claim our id: deleted highest first (an empty value deletes),
    // then ours inserted at the top. Not signed: not outbound.
    assert_eq!(summary.len(), 3, "{summary:?}");
    assert_eq!(summary[0], r#"change Authentication-Results 3 """#);
    assert_eq!(summary[1], r#"change Authentication-Results 2 """#);
    assert!(
        summary[2].starts_with("insert 0 Authentication-Results  mx.mpt.gov.la;"),
        "{summary:?}"
    );
    assert!(summary[2].contains("temperror"), "{summary:?}");
    assert!(!summary[2].contains('\r'), "LF-folded");
    let metrics = m.checker.metrics.encode();
    assert!(
        metrics.contains(r#"mailwarden_auth_results_total{method="spf",result="temperror"} 1"#),
        "{metrics}"
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn outbound_mail_is_signed_and_never_verified() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Milter::spawn(
        &config(
            &silent,
            "[rules.R10]\ntrusted_networks = [\"198.51.100.0/24\"]\n",
        ),
        seeded_store().await,
    )
    .await;
    // Authenticated, and from a trusted relay network.
    for (ip, auth) in [
        ("192.0.2.7", Some("champa@mpt.gov.la")),
        ("198.51.100.20", None),
    ] {
        let mut c = open(&m, ip).await;
        let msg = message(
            "<champa@mpt.gov.la>",
            vec![
                ("From", " champa@mpt.gov.la"),
                ("Authentication-Results", " mx.mpt.gov.la; none"),
                ("Subject", " out"),
            ],
            auth,
        );
        let (out, actions) = c.transaction_with_actions(&msg).await.unwrap();
        assert_eq!(out.eom, Some(Status::Continue), "{ip}: {out:?}");
        let names: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Reply::InsertHeader { name, .. } => format!("insert {}", name.to_str().unwrap()),
                Reply::ChangeHeader { name, index, value } => format!(
                    "change {} {index} {:?}",
                    name.to_str().unwrap(),
                    value.to_str().unwrap()
                ),
                other => format!("{other:?}"),
            })
            .collect();
        // Signed, not verified (no Authentication-Results of ours); the forged one that
        // claims our authserv-id is removed all the same.
        assert_eq!(
            names,
            [
                "insert DKIM-Signature",
                r#"change Authentication-Results 1 """#
            ],
            "{ip}"
        );
        c.close().await.unwrap();
    }
    assert!(
        !m.checker
            .metrics
            .encode()
            .contains("mailwarden_auth_results_total{"),
        "no verification result counted"
    );
    m.stop().await;
}

#[tokio::test]
async fn spoofed_local_from_is_refused_at_end_of_message_without_waiting_for_dns_it_cannot_use() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Milter::spawn(&config(&silent, ""), seeded_store().await).await;
    let mut c = open(&m, "192.0.2.7").await;
    // Outside envelope, government From, no signature: nothing could be aligned.
    let msg = message(
        "<bulk@example.org>",
        vec![
            ("From", " Director <champa@mpt.gov.la>"),
            ("Subject", " hi"),
        ],
        None,
    );
    let (out, actions) = c.transaction_with_actions(&msg).await.unwrap();
    let Some(Status::Reject { reply: Some(reply) }) = &out.eom else {
        panic!("reject expected: {out:?}")
    };
    assert!(reply.starts_with("550 5.7.26 "), "{reply}");
    assert!(actions.is_empty(), "{actions:?}");

    // Same with the envelope in mpt.gov.la: its SPF record decides, and DNS is silent.
    let msg = message(
        "<champa@mpt.gov.la>",
        vec![("From", " champa@mpt.gov.la"), ("Subject", " hi")],
        None,
    );
    let (out, _) = c.transaction_with_actions(&msg).await.unwrap();
    let Some(Status::Tempfail { reply: Some(reply) }) = &out.eom else {
        panic!("tempfail expected: {out:?}")
    };
    assert!(reply.starts_with("451 4.4.3 "), "{reply}");
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn on_dns_error_accept_fails_open_and_counts_it() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Milter::spawn(
        &config(&silent, "").replace("[rules.R7]\n", "[rules.R7]\non_dns_error = \"accept\"\n"),
        seeded_store().await,
    )
    .await;
    let mut c = open(&m, "192.0.2.7").await;
    let msg = message(
        "<champa@mpt.gov.la>",
        vec![("From", " champa@mpt.gov.la"), ("Subject", " hi")],
        None,
    );
    let (out, _) = c.transaction_with_actions(&msg).await.unwrap();
    assert_eq!(out.eom, Some(Status::Continue), "{out:?}");
    let metrics = m.checker.metrics.encode();
    assert!(
        metrics.contains(
            r#"mailwarden_verdicts_total{rule="R7",stage="eom",outcome="fail_open",protocol="milter"} 1"#
        ),
        "{metrics}"
    );
    // One message, one end-of-message decision: R7's (R6's pass for a message it does not
    // sign is not counted as a second one).
    assert!(
        metrics.contains(
            r#"mailwarden_decisions_total{stage="eom",action="continue",protocol="milter"} 1"#
        ),
        "{metrics}"
    );
    c.close().await.unwrap();
    m.stop().await;
}

/// A `From:` that names a government domain only in a malformed mailbox (no address a
/// parser accepts, or a display name alone) is still a claim to be that domain: mail
/// readers show it as such. From outside and without an aligned pass it is refused like a
/// well-formed one, while a malformed From naming no local domain is left alone.
#[tokio::test]
async fn a_malformed_from_naming_a_local_domain_is_judged_as_that_domain() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Milter::spawn(&config(&silent, ""), seeded_store().await).await;
    let mut c = open(&m, "192.0.2.7").await;
    for from in [
        " ceo @mpt.gov.la",
        " \"ceo@mpt.gov.la\"",
        " Director <ceo@ mpt.gov.la>",
        " ceo(office)@mpt.gov.la",
        " \"Director\" <ceo@MPT.gov.la.",
    ] {
        let msg = message(
            "<bulk@example.org>",
            vec![("From", from), ("Subject", " hi")],
            None,
        );
        let (out, _) = c.transaction_with_actions(&msg).await.unwrap();
        let Some(Status::Reject { reply: Some(reply) }) = &out.eom else {
            panic!("{from:?}: reject expected: {out:?}")
        };
        assert!(reply.starts_with("550 5.7.26 "), "{from:?}: {reply}");
        assert!(reply.contains("mpt.gov.la"), "{reply}");
    }
    // Malformed, but naming no local domain: R7 has nothing to protect.
    let msg = message(
        "<bulk@example.org>",
        vec![("From", " someone @example.org"), ("Subject", " hi")],
        None,
    );
    let (out, _) = c.transaction_with_actions(&msg).await.unwrap();
    assert!(!matches!(out.eom, Some(Status::Reject { .. })), "{out:?}");
    c.close().await.unwrap();
    m.stop().await;
}
