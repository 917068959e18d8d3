//! Issue 3's memory bound: 100 concurrent 10 MB messages through the milter, every one
//! signed (RSA-2048 and Ed25519, so the body is hashed twice while it streams), against the
//! daemon as its own process; its peak resident set (`VmHWM` from /proc) must stay under
//! 256 MB. It can only do that by streaming: 100 messages held whole would be 1 GB.

mod common;

use common::daemon::Mailwarden;
use mailwarden::config::ListenAddr;
use mailwarden::milter::client::{Message, MtaConnection, Status};
use std::{net::IpAddr, sync::Arc, time::Duration};

const MESSAGES: usize = 100;
const SIZE: usize = 10 * 1024 * 1024;
const LIMIT_KB: u64 = 256 * 1024;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/dkim/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `VmHWM` (peak resident set) or `VmRSS` of a process, in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_10mb_messages_stay_under_256mb() {
    let mw = Mailwarden::start(&format!(
        r#"
# 100 messages of one sender at once would lock it (R15's burst): not what this measures.
[rules.R15]
mode = "off"
[dkim]
internal_networks = ["198.51.100.0/24"]
[[dkim.keys]]
domain = "mpt.gov.la"
selector = "rsa1"
algorithm = "rsa-sha256"
key_file = "{}"
[[dkim.keys]]
domain = "mpt.gov.la"
selector = "ed1"
algorithm = "ed25519-sha256"
key_file = "{}"
"#,
        fixture("rsa2048-pkcs1.pem"),
        fixture("ed25519-pkcs8v1.pem")
    ));
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    mw.cli_ok(
        "user",
        &[
            "add",
            "champa@mpt.gov.la",
            "--kind",
            "person",
            "--status",
            "active",
        ],
    );
    let addr: ListenAddr = mw.bound.milter.parse().unwrap();
    let pid = mw.pid();
    let before = status_kb(pid, "VmHWM:");

    // One shared 10 MB body (78-byte lines): the test process holds it once.
    let line = format!("{}\r\n", "x".repeat(76));
    let body: Arc<Vec<u8>> = Arc::new(line.repeat(SIZE / line.len()).into_bytes());
    let start = Arc::new(tokio::sync::Barrier::new(MESSAGES));
    let mut tasks = Vec::new();
    for i in 0..MESSAGES {
        let (addr, body, start) = (addr.clone(), body.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = MtaConnection::open(&addr, Duration::from_secs(120))
                .await
                .unwrap();
            let ip: IpAddr = "198.51.100.7".parse().unwrap();
            assert_eq!(
                c.connect("relay.mpt.gov.la", ip, &[]).await.unwrap(),
                Status::Continue
            );
            assert_eq!(
                c.helo("relay.mpt.gov.la", &[("{tls_version}", "TLSv1.3")])
                    .await
                    .unwrap(),
                Status::Continue
            );
            start.wait().await;
            let queue_id = format!("QMEM{i:03}");
            let msg = Message {
                sender: "<champa@mpt.gov.la>",
                recipients: vec!["<friend@example.org>"],
                headers: vec![
                    ("From", "Champa <champa@mpt.gov.la>"),
                    ("To", "friend@example.org"),
                    ("Subject", "large report"),
                    ("Date", "Mon, 1 Jun 2026 09:00:00 +0700"),
                ],
                body: &body,
                queue_id: Some(&queue_id),
                ..Message::default()
            };
            let (outcome, actions) = c.transaction_with_actions(&msg).await.unwrap();
            assert!(outcome.delivered(), "{i}: {outcome:?}");
            // Both signatures were inserted: the whole body went through the signer.
            assert_eq!(actions.len(), 2, "{i}: {actions:?}");
            c.close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let peak = status_kb(pid, "VmHWM:");
    let now = status_kb(pid, "VmRSS:");
    eprintln!(
        "milter memory: peak RSS {} MB after {MESSAGES} concurrent {} MB messages \
         (before the load {} MB, after it {} MB)",
        peak / 1024,
        SIZE / (1024 * 1024),
        before / 1024,
        now / 1024
    );
    assert!(
        peak < LIMIT_KB,
        "peak RSS {peak} kB is not under {LIMIT_KB} kB"
    );
}
