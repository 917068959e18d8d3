//! R6 over the milter protocol: a milter on 127.0.0.1:0 with DKIM keys, the MTA side scripted
//! with `mailwarden::milter::client`. The inserted signatures are checked with dkimpy.

mod common;

use common::dkim::{self as verify, Records, assemble};
use common::milter::Milter;
use common::store::seeded_store;
use indymilter::{Actions, ProtoOpts, message::reply::Reply};
use mailwarden::milter::client::{Message, MtaConnection, Outcome, Status};
use std::{net::IpAddr, time::Duration};

const TIMEOUT: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/dkim/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// RSA and Ed25519 keys for `domain`, plus `extra` config.
fn config(domain: &str, extra: &str) -> String {
    format!(
        r#"
[dkim]
internal_networks = ["198.51.100.0/24"]
[[dkim.keys]]
domain = "{domain}"
selector = "rsa1"
algorithm = "rsa-sha256"
key_file = "{}"
[[dkim.keys]]
domain = "{domain}"
selector = "ed1"
algorithm = "ed25519-sha256"
key_file = "{}"
# The SASL logins of these tests are bare names (`champa`): send-as (R8) maps them to
# addresses in mpt.gov.la. Lines of `extra` before any table header belong to [rules.R8].
[rules.R8]
login_domain = "mpt.gov.la"
{extra}
"#,
        fixture("rsa2048-pkcs1.pem"),
        fixture("ed25519-pkcs8v1.pem")
    )
}

async fn open(m: &Milter, client_ip: &str) -> MtaConnection {
    let mut c = MtaConnection::open(&m.addr, TIMEOUT).await.unwrap();
    let ip: IpAddr = client_ip.parse().unwrap();
    assert_eq!(
        c.connect("client.example", ip, &[]).await.unwrap(),
        Status::Continue
    );
    // Over TLS: R11 (TLS-only submission) has its own tests.
    assert_eq!(
        c.helo("client.example", &[("{tls_version}", "TLSv1.3")])
            .await
            .unwrap(),
        Status::Continue
    );
    c
}

const BODY: &[u8] = b"Hello,\r\n\r\nsigned by mailwarden.\r\n \r\n\t\r\n";

fn message<'a>(from_header: &'a str, auth: Option<&'a str>) -> Message<'a> {
    Message {
        sender: "<champa@mpt.gov.la>",
        recipients: vec!["<bounmy@mpt.gov.la>"],
        headers: vec![
            ("From", from_header),
            ("To", "Bounmy <bounmy@mpt.gov.la>"),
            ("Subject", "budget\n\tfolded subject"),
            ("Date", "Mon, 1 Jun 2026 09:00:00 +0700"),
        ],
        body: BODY,
        queue_id: Some("QDKIM1"),
        mail_macros: auth.map(|a| ("{auth_authen}", a)).into_iter().collect(),
        ..Message::default()
    }
}

/// The inserted headers, checked to be `insert_header(0, "DKIM-Signature", ...)`.
fn signatures(actions: &[Reply]) -> Vec<(String, String)> {
    actions
        .iter()
        .map(|a| match a {
            Reply::InsertHeader { index, name, value } => {
                assert_eq!(*index, 0, "inserted at the top");
                (
                    name.to_str().unwrap().to_owned(),
                    value.to_str().unwrap().to_owned(),
                )
            }
            other => panic!("unexpected modification {other:?}"),
        })
        .collect()
}

/// The message as Postfix would deliver it, rebuilt from what the client sent.
fn delivered(msg: &Message<'_>, inserted: &[(String, String)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in &msg.headers {
        block.extend_from_slice(format!("{n}: {}\r\n", v.replace('\n', "\r\n")).as_bytes());
    }
    assemble(inserted, &block, msg.body)
}

fn records(m: &Milter) -> Records {
    let mut r = Records::default();
    for k in m.checker.snapshot().config.dkim.keyring.keys() {
        r.add_zone_line(&k.dns_record());
    }
    r
}

async fn send(c: &mut MtaConnection, msg: &Message<'_>) -> (Outcome, Vec<Reply>) {
    c.transaction_with_actions(msg).await.unwrap()
}

#[tokio::test]
async fn authenticated_local_mail_is_dual_signed_and_verifies() {
    let m = Milter::spawn(&config("mpt.gov.la", ""), seeded_store().await).await;
    let mut c = open(&m, "192.0.2.7").await;
    // With keys configured the milter asks for headers and body, with the space after the
    // colon, and may add headers.
    let opts = c.negotiated_opts();
    assert!(!opts.intersects(ProtoOpts::NO_HEADER | ProtoOpts::NO_BODY | ProtoOpts::NO_EOH));
    assert!(opts.contains(ProtoOpts::LEADING_SPACE));
    assert!(
        c.negotiated_actions()
            .contains(indymilter::Actions::ADD_HEADER)
    );

    let msg = message("Champa S. <Champa@MPT.gov.la>", Some("champa"));
    let (out, actions) = send(&mut c, &msg).await;
    assert_eq!(out.eom, Some(Status::Continue));
    let sigs = signatures(&actions);
    assert_eq!(sigs.len(), 2, "one signature per key: {sigs:?}");
    for (name, value) in &sigs {
        assert_eq!(name, "DKIM-Signature");
        assert!(value.starts_with(" v=1; a="), "{value:?}");
        assert!(!value.contains('\r'), "LF-folded for the milter protocol");
    }
    let verdicts = verify::dkimpy(&[delivered(&msg, &sigs)], &records(&m));
    assert_eq!(verdicts, [vec![true, true]]);

    let metrics = m.checker.metrics.encode();
    for (sel, alg) in [("rsa1", "rsa-sha256"), ("ed1", "ed25519-sha256")] {
        assert!(
            metrics.contains(&format!(
                r#"mailwarden_dkim_signed_total{{domain="mpt.gov.la",selector="{sel}",algorithm="{alg}"}} 1"#
            )),
            "{metrics}"
        );
    }
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn local_domain_without_key_is_tempfailed_4_7_5() {
    // Keys only for another organisation: mpt.gov.la has none.
    let m = Milter::spawn(&config("mof.gov.la", ""), seeded_store().await).await;
    let mut c = open(&m, "192.0.2.7").await;
    let (out, actions) = send(&mut c, &message("champa@mpt.gov.la", Some("champa"))).await;
    let Some(Status::Tempfail { reply: Some(reply) }) = &out.eom else {
        panic!("tempfail expected: {out:?}")
    };
    assert!(
        reply.starts_with("451 4.7.5 No DKIM key for mpt.gov.la; message not sent unsigned"),
        "{reply}"
    );
    assert!(actions.is_empty(), "nothing inserted: {actions:?}");
    let metrics = m.checker.metrics.encode();
    assert!(
        metrics.contains(r#"mailwarden_dkim_unsigned_tempfail_total{domain="mpt.gov.la"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"mailwarden_verdicts_total{rule="R6",stage="eom",outcome="tempfail",protocol="milter"} 1"#
        ),
        "{metrics}"
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn monitor_mode_lets_the_unsigned_message_through_and_counts_it() {
    let m = Milter::spawn(
        &config("mof.gov.la", "[rules.R6]\nmode = \"monitor\"\n"),
        seeded_store().await,
    )
    .await;
    let mut c = open(&m, "192.0.2.7").await;
    let (out, actions) = send(&mut c, &message("champa@mpt.gov.la", Some("champa"))).await;
    assert_eq!(out.eom, Some(Status::Continue));
    assert!(actions.is_empty());
    let metrics = m.checker.metrics.encode();
    assert!(
        metrics.contains(
            r#"mailwarden_verdicts_total{rule="R6",stage="eom",outcome="would_tempfail",protocol="milter"} 1"#
        ),
        "{metrics}"
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn unauthenticated_or_foreign_mail_is_not_signed() {
    // R8 in monitor mode: an authenticated user's foreign From: would be refused by send-as
    // otherwise (see tests/postfix_sendas.rs); here it must go out, unsigned.
    let m = Milter::spawn(
        &config("mpt.gov.la", "mode = \"monitor\"\n"),
        seeded_store().await,
    )
    .await;
    // An outside client (not authenticated, not internal) with a local From: not ours to
    // sign (verification, R7, judges it).
    let mut c = open(&m, "192.0.2.7").await;
    let (out, actions) = send(&mut c, &message("champa@mpt.gov.la", None)).await;
    assert_eq!(out.eom, Some(Status::Continue));
    assert!(actions.is_empty(), "{actions:?}");
    // Authenticated, but the From domain is not an organisation domain.
    let (out, actions) = send(&mut c, &message("someone@example.org", Some("champa"))).await;
    assert_eq!(out.eom, Some(Status::Continue));
    assert!(actions.is_empty(), "{actions:?}");
    c.close().await.unwrap();
    assert!(
        !m.checker
            .metrics
            .encode()
            .contains("mailwarden_dkim_signed_total{")
    );
    m.stop().await;
}

#[tokio::test]
async fn internal_network_client_is_signed_without_authentication() {
    let m = Milter::spawn(&config("mpt.gov.la", ""), seeded_store().await).await;
    let mut c = open(&m, "198.51.100.25").await;
    let msg = message("champa@mpt.gov.la", None);
    let (out, actions) = send(&mut c, &msg).await;
    assert_eq!(out.eom, Some(Status::Continue));
    let sigs = signatures(&actions);
    assert_eq!(sigs.len(), 2);
    assert_eq!(
        verify::dkimpy(&[delivered(&msg, &sigs)], &records(&m)),
        [vec![true, true]]
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn an_authorised_relay_of_the_organisation_is_signed_without_authentication() {
    let store = seeded_store().await;
    {
        use mailwarden::store::Store;
        store
            .change_org_relays("mpt", &["203.0.113.0/24".parse().unwrap()], &[])
            .await
            .unwrap();
    }
    let m = Milter::spawn(&config("mpt.gov.la", ""), store.clone()).await;
    let mut c = open(&m, "203.0.113.5").await;
    let msg = message("champa@mpt.gov.la", None);
    let (out, actions) = send(&mut c, &msg).await;
    assert_eq!(out.eom, Some(Status::Continue));
    let sigs = signatures(&actions);
    assert_eq!(sigs.len(), 2);
    assert_eq!(
        verify::dkimpy(&[delivered(&msg, &sigs)], &records(&m)),
        [vec![true, true]]
    );
    c.close().await.unwrap();
    // Outside the relay networks, unauthenticated: not signed (R10 itself refuses it at MAIL
    // when enforced; here it is in monitor mode so the message reaches end of message).
    let m2 = Milter::spawn(
        &config("mpt.gov.la", "[rules.R10]\nmode = \"monitor\"\n"),
        store,
    )
    .await;
    let mut c = open(&m2, "192.0.2.7").await;
    let (out, actions) = send(&mut c, &msg).await;
    assert_eq!(out.eom, Some(Status::Continue));
    assert!(signatures(&actions).is_empty());
    c.close().await.unwrap();
    m2.stop().await;
    m.stop().await;
}

#[tokio::test]
async fn state_is_reset_between_messages_and_after_abort() {
    let m = Milter::spawn(&config("mpt.gov.la", ""), seeded_store().await).await;
    let mut c = open(&m, "192.0.2.7").await;
    // A signed message (the client sends ABORT after end of message, as Postfix does).
    let signed = message("champa@mpt.gov.la", Some("champa"));
    let (_, actions) = send(&mut c, &signed).await;
    assert_eq!(signatures(&actions).len(), 2);
    // The next message on the connection is not authenticated: not signed.
    let (out, actions) = send(&mut c, &message("champa@mpt.gov.la", None)).await;
    assert_eq!(out.eom, Some(Status::Continue));
    assert!(actions.is_empty(), "{actions:?}");

    // A message aborted in the middle of its body...
    assert_eq!(
        c.mail(&["<champa@mpt.gov.la>"], &[("{auth_authen}", "champa")])
            .await
            .unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.rcpt("<bounmy@mpt.gov.la>", &[]).await.unwrap(),
        Status::Continue
    );
    assert_eq!(
        c.content(&[("From", "champa@mpt.gov.la")], b"half a bo", &[])
            .await
            .unwrap(),
        Status::Continue
    );
    c.abort().await.unwrap();
    // ...leaves nothing behind: the next one's signatures cover only its own content.
    let (out, actions) = send(&mut c, &signed).await;
    assert_eq!(out.eom, Some(Status::Continue));
    let sigs = signatures(&actions);
    assert_eq!(
        verify::dkimpy(&[delivered(&signed, &sigs)], &records(&m)),
        [vec![true, true]]
    );
    c.close().await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn without_keys_no_content_is_requested() {
    // Send-as (R8, on by default) needs the headers, never the body (R13's end of message
    // left to the policy service: with "auto" the milter would measure messages).
    let r13 = "[rules.R13]\ncount_on = \"policy\"\n";
    let m = Milter::spawn(r13, seeded_store().await).await;
    let c = MtaConnection::open(&m.addr, TIMEOUT).await.unwrap();
    assert!(c.negotiated_opts().contains(ProtoOpts::NO_BODY));
    assert!(!c.negotiated_opts().contains(ProtoOpts::NO_HEADER));
    c.close().await.unwrap();
    m.stop().await;
    // Without R8 neither is asked.
    let m = Milter::spawn(
        &format!("{r13}[rules.R8]\nmode = \"off\"\n"),
        seeded_store().await,
    )
    .await;
    let c = MtaConnection::open(&m.addr, TIMEOUT).await.unwrap();
    assert!(
        c.negotiated_opts()
            .contains(ProtoOpts::NO_HEADER | ProtoOpts::NO_BODY)
    );
    c.close().await.unwrap();
    m.stop().await;
}

/// Waits (bounded) until `address`'s usage is `want` (delivered sizes are counted after
/// the reply, in the background).
async fn usage_becomes(
    store: &common::store::TestStore,
    address: &str,
    want: impl Fn(Option<u64>) -> bool,
) -> Option<u64> {
    use mailwarden::store::Store;
    let a = address.parse().unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let now = store.usage(&a).await.unwrap();
        if want(now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage of {address} stayed {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A store where bounmy has 10 bytes left of a 10 000-byte quota.
async fn nearly_full_store() -> std::sync::Arc<common::store::TestStore> {
    use mailwarden::store::Store;
    let store = seeded_store().await;
    let bounmy = "bounmy@mpt.gov.la".parse().unwrap();
    store.set_quota(&bounmy, Some(10_000)).await.unwrap();
    store.set_usage(&bounmy, 9_990, 0).await.unwrap();
    store
}

/// With [`nearly_full_store`]: `msg` (no SIZE=) passes RCPT and is tempfailed `452 4.2.2`
/// at end of message, nothing counted; once there is room it is delivered and its measured
/// size counted. Returns the actions of both attempts.
async fn refused_then_counted(
    store: &common::store::TestStore,
    c: &mut MtaConnection,
    msg: &Message<'_>,
) -> (Vec<Reply>, Vec<Reply>) {
    use mailwarden::store::Store;
    let bounmy = "bounmy@mpt.gov.la".parse().unwrap();
    let (o, refused) = send(c, msg).await;
    assert_eq!(o.rcpts, [Status::Continue], "room left, no SIZE=: {o:?}");
    match &o.eom {
        Some(Status::Tempfail { reply: Some(r) }) => {
            assert!(r.starts_with("452 4.2.2"), "{r}");
            assert!(r.contains("bounmy@mpt.gov.la"), "{r}");
        }
        other => panic!("over quota at end of message: {other:?}"),
    }
    // Nothing counted for the refused message.
    assert_eq!(store.usage(&bounmy).await.unwrap(), Some(9_990));

    store.set_usage(&bounmy, 0, 1).await.unwrap();
    let (o, delivered) = send(c, msg).await;
    assert!(o.delivered(), "{o:?}");
    let counted = usage_becomes(store, "bounmy@mpt.gov.la", |u| u.is_some_and(|u| u > 0))
        .await
        .unwrap();
    // Headers and body as the MTA sent them: more than the body alone, far less than 10 000.
    assert!(
        counted > BODY.len() as u64 && counted < 1_000,
        "measured {counted}"
    );
    (refused, delivered)
}

/// R13 at end of message on the milter: with DKIM keys the milter sees headers and body
/// anyway, so it knows the actual size. A message without SIZE= passes RCPT with room
/// left, and is tempfailed at end of message when it does not fit; one that fits is
/// delivered and its measured size is added to the recipient's usage.
#[tokio::test]
async fn quota_is_checked_at_end_of_message_with_the_measured_size() {
    let store = nearly_full_store().await;
    let m = Milter::spawn(
        &config("mpt.gov.la", "[rules.R13]\ncount_on = \"milter\"\n"),
        store.clone(),
    )
    .await;
    let mut c = open(&m, "192.0.2.7").await;
    let msg = message("Champa <champa@mpt.gov.la>", Some("champa@mpt.gov.la"));
    let (refused, delivered) = refused_then_counted(&store, &mut c, &msg).await;
    assert!(refused.is_empty(), "refused before signing: {refused:?}");
    assert_eq!(signatures(&delivered).len(), 2, "still signed");
}

/// Without a content rule the milter asks for headers and body only when R13's end of
/// message may be its own (`count_on` `"milter"`, or `"auto"`, the default: every message
/// the policy service was not asked about at the end of DATA). Then it measures, refuses
/// what does not fit (`452 4.2.2`) and counts what does, with no reply asked per header or
/// body chunk.
#[tokio::test]
async fn the_milter_measures_messages_when_r13_ends_there() {
    for count_on in ["milter", "auto"] {
        measures_messages(count_on).await;
    }
}

async fn measures_messages(count_on: &str) {
    let store = nearly_full_store().await;
    let m = Milter::spawn(
        &format!("[rules.R13]\ncount_on = \"{count_on}\"\n"),
        store.clone(),
    )
    .await;
    let mut c = open(&m, "192.0.2.7").await;
    let opts = c.negotiated_opts();
    assert!(
        !opts.intersects(ProtoOpts::NO_HEADER | ProtoOpts::NO_BODY),
        "{opts:?}"
    );
    assert!(opts.contains(ProtoOpts::NOREPLY_HEADER | ProtoOpts::NOREPLY_BODY));
    assert!(
        (c.negotiated_actions() - Actions::REQUEST_MACROS).is_empty(),
        "measuring changes nothing in the message: {:?}",
        c.negotiated_actions()
    );
    let msg = message("Champa <champa@mpt.gov.la>", Some("champa@mpt.gov.la"));
    refused_then_counted(&store, &mut c, &msg).await;
}

/// When R13's end of message is the policy service's (`count_on = "policy"`) and no content
/// rule is on, the milter does not ask for the body: R13 is judged at RCPT only (usage,
/// SIZE=), and nothing is counted at end of message.
#[tokio::test]
async fn without_a_content_rule_or_r13_the_milter_checks_quota_at_rcpt_only() {
    use mailwarden::store::Store;
    let store = nearly_full_store().await;
    let bounmy = "bounmy@mpt.gov.la".parse().unwrap();
    let m = Milter::spawn("[rules.R13]\ncount_on = \"policy\"\n", store.clone()).await;
    let mut c = open(&m, "192.0.2.7").await;
    assert!(c.negotiated_opts().contains(ProtoOpts::NO_BODY));
    let mut msg = message("Champa <champa@mpt.gov.la>", Some("champa@mpt.gov.la"));
    let (o, _) = send(&mut c, &msg).await;
    assert!(o.delivered(), "no size known at end of message: {o:?}");
    // SIZE= at RCPT covers it.
    msg.mail_params = vec!["SIZE=11"];
    let (o, _) = send(&mut c, &msg).await;
    match &o.rcpts[..] {
        [Status::Tempfail { reply: Some(r) }] => assert!(r.starts_with("452 4.2.2"), "{r}"),
        other => panic!("SIZE= past the quota accepted: {other:?}"),
    }
    assert_eq!(store.usage(&bounmy).await.unwrap(), Some(9_990));
}
