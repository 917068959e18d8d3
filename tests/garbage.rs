//! Protocol garbage against the daemon process, both front-ends at once: thousands of
//! connections each send a pseudo-random mix of well-formed, out-of-order and malformed
//! milter packets or policy lines (seeded, so a failure names the seed that reproduces it),
//! then close their side. Every one must be answered with well-formed replies only and then
//! be hung up on: none may hang, and the daemon must not panic, die or stop serving good
//! connections, which are checked during and after the storm.
//!
//! The daemon runs with the message-level features on (DKIM signing, R7 verification with
//! a DNS server that never answers, R8 headers, R13 sizes), so that garbage reaches header,
//! body and end-of-message code, not only the envelope.

mod common;

use common::daemon::Mailwarden;
use mailwarden::config::ListenAddr;
use mailwarden::milter::client::{Message, MtaConnection, Status};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Cases per front-end.
const CASES: u64 = 1_500;
/// Connections in flight at once.
const PARALLEL: usize = 16;
/// How long a connection may stay open after the client has sent everything and closed its
/// side; the daemon must have hung up by then.
const HANG_UP: Duration = Duration::from_secs(10);

/// xorshift64*: deterministic, dependency-free pseudo-random numbers from a seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max + 1))
            .map(|_| self.next() as u8)
            .collect()
    }
}

const ADDRESSES: &[&str] = &[
    "<champa@mpt.gov.la>",
    "<somsak@mpt.gov.la>",
    "<>",
    "<friend@example.org>",
    "champa@mpt.gov.la",
    "<\"quoted local\"@mpt.gov.la>",
    "<a@[192.0.2.1]>",
    "<@route:x@mpt.gov.la>",
    "<",
    "",
    "<very-long-local-part-that-goes-on-and-on-and-on@mpt.gov.la>",
    "<ผู้ใช้@mpt.gov.la>",
];

const MACROS: &[&str] = &[
    "{client_addr}",
    "{client_name}",
    "{auth_authen}",
    "{tls_version}",
    "{mail_addr}",
    "{rcpt_addr}",
    "i",
    "j",
    "{daemon_name}",
    "_",
];

const MACRO_VALUES: &[&str] = &[
    "127.0.0.1",
    "IPv6:::1",
    "IPv6:2001:db8::7",
    "192.0.2.9",
    "not-an-address",
    "[198.51.100.7]",
    "champa@mpt.gov.la",
    "champa",
    "TLSv1.3",
    "4Q1Zc81jQrz9",
    "",
];

const HEADERS: &[&str] = &[
    "From",
    "Sender",
    "To",
    "Subject",
    "DKIM-Signature",
    "Authentication-Results",
    "ARC-Seal",
    "Received",
    "Content-Type",
    "",
];

const HEADER_VALUES: &[&str] = &[
    "Champa <champa@mpt.gov.la>",
    "champa@mpt.gov.la, somsak@mpt.gov.la",
    "",
    "mx.mpt.gov.la; dkim=pass",
    "v=1; a=rsa-sha256; d=mpt.gov.la; s=x; b=; bh=",
    "i=1; a=rsa-sha256; cv=none; d=example.org; s=s; b=AAAA",
    "=?utf-8?b?4Lqe4Lqy4LqB?=",
    "multipart/mixed; boundary=\"b\"",
    "\n\tfolded",
];

/// One milter packet: length (command byte included), command, data.
fn packet(command: u8, data: &[u8]) -> Vec<u8> {
    let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(command);
    p.extend_from_slice(data);
    p
}

fn strings(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p);
        out.push(0);
    }
    out
}

/// Random milter packets as a hostile or broken MTA might send them.
fn milter_random(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    // Usually a valid option negotiation first (protocol 6, everything offered), so that the
    // later packets reach the stages; sometimes a broken or missing one.
    match rng.below(10) {
        0 => {}
        1 => out.extend(packet(b'O', &rng.bytes(20))),
        _ => {
            let mut neg = 6u32.to_be_bytes().to_vec();
            neg.extend(0x1ffu32.to_be_bytes());
            neg.extend(0x001f_ffffu32.to_be_bytes());
            out.extend(packet(b'O', &neg));
        }
    }
    for _ in 0..rng.below(40) {
        let command = *rng.pick(b"OCHMRTLNBEAQDUZ\0\xff");
        let data = match command {
            b'D' => {
                let stage = *rng.pick(b"CHMRTLNE?");
                let mut d = vec![stage];
                for _ in 0..rng.below(4) {
                    d.extend(strings(&[
                        rng.pick(MACROS).as_bytes(),
                        rng.pick(MACRO_VALUES).as_bytes(),
                    ]));
                }
                if rng.chance(20) {
                    d.extend(rng.bytes(30));
                }
                d
            }
            b'C' => {
                let mut d = strings(&[b"mx.example.org"]);
                d.push(*rng.pick(b"46LU?"));
                d.extend(rng.bytes(2));
                d.extend(strings(&[rng.pick(MACRO_VALUES).as_bytes()]));
                d
            }
            b'H' => strings(&[rng.pick(&["mx.example.org", "", "[192.0.2.1]"]).as_bytes()]),
            b'M' | b'R' => {
                let mut parts: Vec<&[u8]> = vec![rng.pick(ADDRESSES).as_bytes()];
                if rng.chance(30) {
                    parts.push(
                        rng.pick(&[
                            "SIZE=4096",
                            "SIZE=-1",
                            "SIZE=99999999999999999999",
                            "BODY=8BITMIME",
                        ])
                        .as_bytes(),
                    );
                }
                strings(&parts)
            }
            b'L' => strings(&[
                rng.pick(HEADERS).as_bytes(),
                rng.pick(HEADER_VALUES).as_bytes(),
            ]),
            b'B' => {
                if rng.chance(50) {
                    b"Hello,\r\n\r\n-- \r\nsig\r\n".to_vec()
                } else {
                    rng.bytes(3000)
                }
            }
            _ => {
                if rng.chance(70) {
                    Vec::new()
                } else {
                    rng.bytes(40)
                }
            }
        };
        // Now and then a packet whose data no longer matches its command's format.
        let data = if rng.chance(5) { rng.bytes(60) } else { data };
        out.extend(packet(command, &data));
    }
    // Now and then a broken frame at the end: a zero or oversized length, a cut-off packet.
    match rng.below(12) {
        0 => out.extend([0, 0, 0, 0]),
        1 => out.extend([0x7f, 0xff, 0xff, 0xff, b'B']),
        2 => out.extend([0, 0, 0, 40, b'L', b'x']),
        _ => {}
    }
    out
}

const POLICY_NAMES: &[&str] = &[
    "request",
    "protocol_state",
    "protocol_name",
    "client_address",
    "client_name",
    "helo_name",
    "sender",
    "recipient",
    "recipient_count",
    "size",
    "sasl_username",
    "sasl_method",
    "encryption_protocol",
    "queue_id",
    "instance",
    "ccert_subject",
    "unknown_attribute",
];

const POLICY_VALUES: &[&str] = &[
    "smtpd_access_policy",
    "junk",
    "RCPT",
    "MAIL",
    "END-OF-MESSAGE",
    "DATA",
    "ESMTP",
    "127.0.0.1",
    "::1",
    "192.0.2.9",
    "999.1.1.1",
    "champa@mpt.gov.la",
    "somsak@mpt.gov.la",
    "friend@example.org",
    "\"quoted local\"@mpt.gov.la",
    "champa",
    "",
    "0",
    "4096",
    "-5",
    "18446744073709551616",
    "TLSv1.3",
    "abc123",
];

/// Random policy lines as a broken client might send them.
fn policy_random(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(6) {
        if rng.chance(80) {
            out.extend(b"request=smtpd_access_policy\n");
        }
        for _ in 0..rng.below(14) {
            match rng.below(20) {
                0 => out.extend(rng.bytes(80)),
                1 => out.extend(b"no equals sign"),
                2 => out.extend(vec![b'a'; 5_000 + rng.below(70_000) as usize]),
                3 => out.extend(b"=value"),
                _ => {
                    out.extend(rng.pick(POLICY_NAMES).as_bytes());
                    out.push(b'=');
                    out.extend(rng.pick(POLICY_VALUES).as_bytes());
                }
            }
            out.extend(if rng.chance(10) {
                &b"\r\n"[..]
            } else {
                &b"\n"[..]
            });
        }
        if rng.chance(85) {
            out.push(b'\n');
        }
    }
    out
}

/// A plausible milter conversation (negotiation, one or two messages, quit) with a few
/// mutations: packets dropped, repeated, swapped, corrupted or inserted. Unmutated, it is a
/// valid message that reaches the end of message (signing, verification).
fn milter_mutated(rng: &mut Rng) -> Vec<u8> {
    let macro_packet = |rng: &mut Rng, stage: u8, names: &[&str]| {
        let mut d = vec![stage];
        for n in names {
            // Half the clients are internal (their local-domain mail is signed), half not
            // (their mail is verified).
            let value = match *n {
                "{client_addr}" if rng.chance(50) => "127.0.0.1",
                _ => rng.pick(MACRO_VALUES),
            };
            d.extend(strings(&[n.as_bytes(), value.as_bytes()]));
        }
        packet(b'D', &d)
    };
    let mut neg = 6u32.to_be_bytes().to_vec();
    neg.extend(0x1ffu32.to_be_bytes());
    neg.extend(0x001f_ffffu32.to_be_bytes());
    let mut packets = vec![packet(b'O', &neg)];
    packets.push(macro_packet(rng, b'H', &["{tls_version}"]));
    packets.push(packet(b'H', &strings(&[b"mx.example.org"])));
    for _ in 0..1 + rng.below(2) {
        packets.push(macro_packet(
            rng,
            b'M',
            &["i", "{client_addr}", "{auth_authen}", "{tls_version}"],
        ));
        packets.push(packet(b'M', &strings(&[rng.pick(ADDRESSES).as_bytes()])));
        for _ in 0..1 + rng.below(3) {
            packets.push(macro_packet(rng, b'R', &["{rcpt_addr}"]));
            packets.push(packet(b'R', &strings(&[rng.pick(ADDRESSES).as_bytes()])));
        }
        packets.push(macro_packet(rng, b'T', &["i"]));
        if rng.chance(60) {
            packets.push(packet(
                b'L',
                &strings(&[b"From", b"Champa <champa@mpt.gov.la>"]),
            ));
        }
        for _ in 0..rng.below(8) {
            packets.push(packet(
                b'L',
                &strings(&[
                    rng.pick(HEADERS).as_bytes(),
                    rng.pick(HEADER_VALUES).as_bytes(),
                ]),
            ));
        }
        packets.push(packet(b'N', &[]));
        for _ in 0..rng.below(3) {
            let chunk = if rng.chance(60) {
                b"Hello,\r\n\r\n-- \r\nsig\r\n".to_vec()
            } else {
                rng.bytes(2000)
            };
            packets.push(packet(b'B', &chunk));
        }
        packets.push(macro_packet(rng, b'E', &["i"]));
        packets.push(packet(b'E', &[]));
        packets.push(packet(b'A', &[]));
    }
    packets.push(packet(b'Q', &[]));
    for _ in 0..rng.below(4) {
        let at = rng.below(packets.len() as u64) as usize;
        match rng.below(5) {
            0 => {
                packets.remove(at);
            }
            1 => packets.insert(at, packets[at].clone()),
            2 if at + 1 < packets.len() => packets.swap(at, at + 1),
            3 => {
                let command = packets[at][4];
                packets[at] = packet(command, &rng.bytes(50));
            }
            _ => packets.insert(at, milter_random(rng)),
        }
        if packets.is_empty() {
            break;
        }
    }
    packets.concat()
}

/// A milter case: mostly mutated conversations, some pure noise.
fn milter_case(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(70) {
        milter_mutated(rng)
    } else {
        milter_random(rng)
    }
}

/// Plausible policy requests (every attribute from the pools) with a few lines mutated.
fn policy_mutated(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let mut lines: Vec<Vec<u8>> = vec![b"request=smtpd_access_policy".to_vec()];
        let state = *rng.pick(&["RCPT", "MAIL", "END-OF-MESSAGE", "DATA", "VRFY"]);
        lines.push(format!("protocol_state={state}").into_bytes());
        let others = POLICY_NAMES
            .iter()
            .filter(|n| !matches!(**n, "request" | "protocol_state"));
        for name in others {
            if rng.chance(85) {
                lines.push(format!("{name}={}", rng.pick(POLICY_VALUES)).into_bytes());
            }
        }
        for _ in 0..rng.below(3) {
            let at = rng.below(lines.len() as u64) as usize;
            lines[at] = match rng.below(4) {
                0 => rng.bytes(60),
                1 => b"no equals sign".to_vec(),
                2 => vec![b'a'; 5_000 + rng.below(70_000) as usize],
                _ => {
                    let mut l = lines[at].clone();
                    l.extend(rng.bytes(8));
                    l
                }
            };
        }
        for l in lines {
            out.extend(l);
            out.push(b'\n');
        }
        out.push(b'\n');
    }
    out
}

/// A policy case: mostly mutated requests, some pure noise.
fn policy_case(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(70) {
        policy_mutated(rng)
    } else {
        policy_random(rng)
    }
}

/// Sends `bytes`, closes the sending side, and reads until the daemon hangs up. Returns what
/// the daemon wrote, or why the exchange failed.
async fn exchange(addr: &str, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    // Write in a task: the daemon may stop reading (and hang up) before it has read it all.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
        wr
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(HANG_UP, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                // A reset is a hang-up too (the daemon closed with unread input).
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    })
    .await;
    let _ = writer.await;
    match read {
        Ok(Ok(())) => Ok(got),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "still open {HANG_UP:?} after the client closed its side"
        )),
    }
}

/// Milter replies the daemon may send: every packet well framed, a known reply command.
fn check_milter_replies(mut bytes: &[u8]) -> Result<(), String> {
    while !bytes.is_empty() {
        if bytes.len() < 5 {
            return Err(format!("truncated reply packet {bytes:?}"));
        }
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len == 0 || bytes.len() < 4 + len {
            return Err(format!("badly framed reply (length {len})"));
        }
        let command = bytes[4];
        if !b"O+-2abcdefhimpqrstyz".contains(&command) {
            return Err(format!("unknown reply command {:?}", command as char));
        }
        bytes = &bytes[4 + len..];
    }
    Ok(())
}

/// Policy replies: `action=...` lines, each followed by an empty line, nothing else.
fn check_policy_replies(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("reply not UTF-8: {e}"))?;
    let mut rest = text;
    while !rest.is_empty() {
        let Some((line, after)) = rest.split_once('\n') else {
            return Err(format!("unterminated reply {rest:?}"));
        };
        if !line.starts_with("action=") || line.len() > 600 {
            return Err(format!("not an access(5) action: {line:?}"));
        }
        let Some(after) = after.strip_prefix('\n') else {
            return Err(format!("no empty line after {line:?}"));
        };
        rest = after;
    }
    Ok(())
}

fn hex_head(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(200)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("")
}

/// One good milter transaction and one good policy request: the daemon still serves.
async fn still_serving(mw: &Mailwarden) {
    let milter: ListenAddr = mw.bound.milter.parse().unwrap();
    let mut c = MtaConnection::open(&milter, Duration::from_secs(10))
        .await
        .expect("a good milter connection is served");
    let out = c
        .transaction(&Message {
            sender: "<friend@example.org>",
            recipients: vec!["<somsak@mpt.gov.la>", "<champa@mpt.gov.la>"],
            headers: vec![("From", "friend@example.org"), ("Subject", "x")],
            body: b"hello\r\n",
            queue_id: Some("GOOD1"),
            mail_macros: vec![("{client_addr}", "127.0.0.1")],
            ..Message::default()
        })
        .await
        .expect("a good milter transaction completes");
    assert_eq!(out.mail, Status::Continue, "{out:?}");
    // somsak is suspended (R1), champa active.
    assert!(
        matches!(&out.rcpts[0], Status::Reject { reply: Some(r) } if r.starts_with("550 5.2.1")),
        "{out:?}"
    );
    assert_eq!(out.rcpts[1], Status::Continue, "{out:?}");
    assert!(out.delivered(), "{out:?}");
    c.close().await.unwrap();

    let policy = mw.bound.policy.strip_prefix("inet:").unwrap().to_owned();
    let got = exchange(
        &policy,
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=127.0.0.1\n\
          sender=friend@example.org\nrecipient=somsak@mpt.gov.la\ninstance=good.1\n\n"
            .to_vec(),
    )
    .await
    .expect("a good policy request is answered");
    let text = String::from_utf8(got).unwrap();
    assert!(text.starts_with("action=550 5.2.1"), "{text:?}");
}

#[test]
fn garbage_on_both_front_ends_never_hangs_crashes_or_stops_the_daemon() {
    let keys = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailwarden"))
        .args([
            "dkim",
            "keygen",
            "mpt.gov.la",
            "ed",
            "--algorithm",
            "ed25519",
            "--out",
        ])
        .arg(keys.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A DNS server that never answers (a bound, silent UDP socket): R7's lookups time out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut mw = Mailwarden::start(&format!(
        r#"[dns]
nameservers = ["{}"]
timeout = "200ms"
attempts = 1

[dkim]
internal_networks = ["127.0.0.0/8"]

[[dkim.keys]]
domain = "mpt.gov.la"
selector = "ed"
algorithm = "ed25519-sha256"
key_file = "{}"

[rules.R7]
authserv_id = "mx.mpt.gov.la"
mode = "enforce"
"#,
        silent.local_addr().unwrap(),
        keys.path().join("mpt.gov.la.ed.pem").display()
    ));
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    for user in ["champa@mpt.gov.la", "somsak@mpt.gov.la"] {
        mw.cli_ok(
            "user",
            &["add", user, "--kind", "person", "--status", "active"],
        );
    }
    mw.cli_ok(
        "user",
        &["suspend", "somsak@mpt.gov.la", "--reason", "on leave"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        still_serving(&mw).await;
        let milter = mw.bound.milter.strip_prefix("inet:").unwrap().to_owned();
        let policy = mw.bound.policy.strip_prefix("inet:").unwrap().to_owned();
        let mut cases = Vec::new();
        for seed in 0..CASES {
            cases.push(("milter", seed));
            cases.push(("policy", seed));
        }
        let mut failures = Vec::new();
        for (n, chunk) in cases.chunks(PARALLEL).enumerate() {
            let mut set = tokio::task::JoinSet::new();
            for &(front, seed) in chunk {
                let addr = if front == "milter" {
                    milter.clone()
                } else {
                    policy.clone()
                };
                set.spawn(async move {
                    let mut rng = Rng::new(seed);
                    let bytes = if front == "milter" {
                        milter_case(&mut rng)
                    } else {
                        policy_case(&mut rng)
                    };
                    let head = hex_head(&bytes);
                    let checked = exchange(&addr, bytes).await.and_then(|got| {
                        if front == "milter" {
                            check_milter_replies(&got)
                        } else {
                            check_policy_replies(&got)
                        }
                    });
                    checked.map_err(|e| format!("{front} seed {seed}: {e}; sent {head}…"))
                });
            }
            while let Some(r) = set.join_next().await {
                if let Err(e) = r.unwrap() {
                    failures.push(e);
                }
            }
            // Good connections keep being served in the middle of the storm.
            if n % 50 == 0 {
                still_serving(&mw).await;
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
        still_serving(&mw).await;
    });
    let log = mw.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    // The storm reached deep: policy garbage counted as protocol errors, and many milter
    // conversations got to the end of message, through signing and verification.
    let metrics = mw.metrics();
    let total = |name: &str, labels: &[&str]| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let errors = total(
        "mailwarden_protocol_errors_total",
        &[r#"protocol="policy""#],
    );
    assert!(
        errors > 0.0,
        "policy garbage counted as protocol errors:\n{metrics}"
    );
    let eoms = total(
        "mailwarden_decisions_total",
        &[r#"stage="eom""#, r#"protocol="milter""#],
    );
    assert!(eoms >= 100.0, "{eoms} end-of-message decisions:\n{metrics}");
    assert!(
        total("mailwarden_dkim_signed_total", &[]) > 0.0,
        "{metrics}"
    );
    assert!(
        total("mailwarden_auth_results_total", &[]) > 0.0,
        "{metrics}"
    );
    // Still running (not a zombie): it never exited on its own.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", mw.pid())).unwrap();
    let state = stat.rsplit_once(") ").unwrap().1.chars().next();
    assert!(
        matches!(state, Some('S' | 'R' | 'D')),
        "daemon state {state:?}"
    );
    mw.stop();
}
