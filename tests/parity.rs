//! Protocol parity: the same rule gives the same verdict through both front-ends.
//!
//! Every case of [`CASES`] (a sender and a recipient) is run through the policy server and
//! through the milter, both served in-process on 127.0.0.1:0 over the same seeded store (see
//! `common::store`), each with its own checker and cache as two daemons would have, and with
//! the MTA side scripted (`policy::loadgen::Client`, `milter::client`). Both must give the
//! same reply, to the letter: SMTP code, enhanced status code and text; and both must count
//! the same verdicts in their metrics.
//!
//! **Stage difference.** The milter answers sender rules (R2 for a sender, R9) at MAIL and
//! recipient rules (R1, R2) at RCPT. Postfix asks the policy service at RCPT (the request
//! carries the sender too; with `smtpd_delay_reject = yes`, the default, a refusal of MAIL
//! is given at RCPT anyway), so the policy server judges the sender first, then the
//! recipient, in that one request. A refused sender is therefore compared as the milter's
//! MAIL reply against the policy server's RCPT reply: the client gets the same reply, one
//! command later through policy. The metrics label both with the stage of the rule (`mail`).
//!
//! Only MAIL and RCPT are compared: rules that need the message run on the milter path
//! alone (REQUIREMENTS: "wherever the protocol carries the data"), so each milter
//! transaction is aborted after RCPT.

mod common;

use common::milter::Milter;
use common::store::{TestStore, seeded_store};
use mailwarden::checker::Checker;
use mailwarden::config::{Config, ListenAddr};
use mailwarden::milter::client::{MtaConnection, Status};
use mailwarden::net::Listener;
use mailwarden::policy::codec::Request;
use mailwarden::policy::loadgen::{Client, rcpt_request};
use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One transaction and the verdict the rules call for.
struct Case {
    sender: &'static str,
    recipient: &'static str,
    /// `None`: the transaction goes on. Else the rule, the stage whose rule it is, and the
    /// reply's codes.
    refused: Option<(&'static str, &'static str, &'static str)>,
}

const fn pass(sender: &'static str, recipient: &'static str) -> Case {
    Case {
        sender,
        recipient,
        refused: None,
    }
}

const fn refuse(
    sender: &'static str,
    recipient: &'static str,
    rule: &'static str,
    stage: &'static str,
    codes: &'static str,
) -> Case {
    Case {
        sender,
        recipient,
        refused: Some((rule, stage, codes)),
    }
}

/// The directory (`common::store::seed`): `mpt.gov.la` is active with champa and bounmy
/// (active), somsak (suspended), old (withdrawn), newbie (pending); `xyz.gov.la` has ceased
/// (vilay, active). `example.org` is external; `nobody@mpt.gov.la` is not registered.
const CASES: &[Case] = &[
    // Nothing to object to.
    pass("someone@example.org", "champa@mpt.gov.la"),
    pass("champa@mpt.gov.la", "bounmy@mpt.gov.la"),
    pass("champa@mpt.gov.la", "friend@example.org"),
    pass("someone@example.org", "friend@example.org"),
    pass("", "champa@mpt.gov.la"),
    // A suspended account may still send (R1 is about receiving).
    pass("somsak@mpt.gov.la", "friend@example.org"),
    // Unknown and pending names may receive: R9 is a sender rule.
    pass("someone@example.org", "nobody@mpt.gov.la"),
    pass("someone@example.org", "newbie@mpt.gov.la"),
    // R1: suspended recipient, whoever sends, in any case of letters.
    refuse(
        "someone@example.org",
        "somsak@mpt.gov.la",
        "R1",
        "rcpt",
        "550 5.2.1",
    ),
    refuse(
        "champa@mpt.gov.la",
        "somsak@mpt.gov.la",
        "R1",
        "rcpt",
        "550 5.2.1",
    ),
    refuse("", "somsak@mpt.gov.la", "R1", "rcpt", "550 5.2.1"),
    refuse(
        "someone@example.org",
        "Somsak@MPT.gov.la",
        "R1",
        "rcpt",
        "550 5.2.1",
    ),
    // R2, recipient: withdrawn account, account of a ceased organisation.
    refuse(
        "someone@example.org",
        "old@mpt.gov.la",
        "R2",
        "rcpt",
        "550 5.1.1",
    ),
    refuse(
        "someone@example.org",
        "vilay@xyz.gov.la",
        "R2",
        "rcpt",
        "550 5.1.1",
    ),
    // R2, sender: a withdrawn name, or one of a ceased organisation, cannot send.
    refuse(
        "old@mpt.gov.la",
        "bounmy@mpt.gov.la",
        "R2",
        "mail",
        "550 5.7.1",
    ),
    refuse(
        "old@mpt.gov.la",
        "friend@example.org",
        "R2",
        "mail",
        "550 5.7.1",
    ),
    refuse(
        "vilay@xyz.gov.la",
        "bounmy@mpt.gov.la",
        "R2",
        "mail",
        "550 5.7.1",
    ),
    // R9: a name not registered, or pending, cannot send.
    refuse(
        "nobody@mpt.gov.la",
        "bounmy@mpt.gov.la",
        "R9",
        "mail",
        "553 5.7.1",
    ),
    refuse(
        "newbie@mpt.gov.la",
        "friend@example.org",
        "R9",
        "mail",
        "553 5.7.1",
    ),
    refuse(
        "Nobody@MPT.gov.la",
        "bounmy@mpt.gov.la",
        "R9",
        "mail",
        "553 5.7.1",
    ),
    // The sender is judged before the recipient.
    refuse(
        "nobody@mpt.gov.la",
        "somsak@mpt.gov.la",
        "R9",
        "mail",
        "553 5.7.1",
    ),
    refuse(
        "old@mpt.gov.la",
        "vilay@xyz.gov.la",
        "R2",
        "mail",
        "550 5.7.1",
    ),
];

/// What the MTA is told: go on, or the full reply (`550 5.2.1 Mailbox ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Pass,
    Refused(String),
}

impl Verdict {
    fn codes(&self) -> Option<String> {
        match self {
            Verdict::Pass => None,
            Verdict::Refused(r) => Some(r.split(' ').take(2).collect::<Vec<_>>().join(" ")),
        }
    }
}

// ---- the two front-ends ---------------------------------------------------------------------

/// The policy server on its own listener and checker.
struct Policy {
    addr: ListenAddr,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    serve: JoinHandle<std::io::Result<()>>,
}

impl Policy {
    async fn spawn(config_toml: &str, store: Arc<TestStore>) -> Policy {
        let config = Config::from_toml(config_toml).expect("test config is valid");
        let checker = common::checker(config, store);
        let listener = Listener::bind(&"inet:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, sessions) = (CancellationToken::new(), TaskTracker::new());
        let serve = tokio::spawn(mailwarden::policy::serve(
            listener,
            checker.clone(),
            shutdown.clone(),
            sessions.clone(),
        ));
        Policy {
            addr,
            checker,
            shutdown,
            sessions,
            serve,
        }
    }

    async fn stop(self) {
        common::stop(&self.shutdown, self.serve, &self.sessions).await;
    }
}

/// Both front-ends over `store`, with the same config.
struct Both {
    policy: Policy,
    milter: Milter,
}

impl Both {
    async fn spawn(config_toml: &str, store: Arc<TestStore>) -> Both {
        Both {
            policy: Policy::spawn(config_toml, store.clone()).await,
            milter: Milter::spawn(config_toml, store).await,
        }
    }

    /// Runs every case through both; returns each case's verdict, policy's then milter's.
    async fn run(&self, cases: &[Case]) -> Vec<(Verdict, Verdict)> {
        let mut policy = Client::connect(&self.policy.addr).await.unwrap();
        let mut milter = MtaConnection::open(&self.milter.addr, TIMEOUT)
            .await
            .unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            milter.connect("mx.example.org", ip, &[]).await.unwrap(),
            Status::Continue
        );
        // Over TLS, like the policy requests (`encryption_protocol=TLSv1.3`).
        assert_eq!(
            milter
                .helo("mx.example.org", &[("{tls_version}", "TLSv1.3")])
                .await
                .unwrap(),
            Status::Continue
        );
        let mut verdicts = Vec::new();
        for (n, case) in cases.iter().enumerate() {
            verdicts.push((
                via_policy(&mut policy, case, n).await,
                via_milter(&mut milter, case).await,
            ));
        }
        milter.close().await.unwrap();
        verdicts
    }

    /// The verdicts each front-end counted: policy's, then milter's.
    fn counted(&self) -> (Counts, Counts) {
        (
            verdict_counts(&self.policy.checker, "policy"),
            verdict_counts(&self.milter.checker, "milter"),
        )
    }

    async fn stop(self) {
        self.policy.stop().await;
        self.milter.stop().await;
    }
}

/// The policy request Postfix sends at RCPT; the answer's action.
async fn via_policy(c: &mut Client, case: &Case, n: usize) -> Verdict {
    let request = rcpt_request(case.sender, case.recipient, n);
    let action = tokio::time::timeout(TIMEOUT, c.ask(&request))
        .await
        .expect("policy server answers")
        .unwrap();
    if action == "DUNNO" {
        return Verdict::Pass;
    }
    assert!(
        action.starts_with(['4', '5']),
        "{} -> {}: policy action {action:?} is neither DUNNO nor a reply",
        case.sender,
        case.recipient
    );
    Verdict::Refused(action)
}

/// MAIL, then RCPT unless MAIL was refused; the first refusal or `Pass`. Then ABORT.
async fn via_milter(c: &mut MtaConnection, case: &Case) -> Verdict {
    let (sender, recipient) = (
        format!("<{}>", case.sender),
        format!("<{}>", case.recipient),
    );
    let mail = c.mail(&[&sender], &[]).await.unwrap();
    let verdict = match milter_verdict(mail) {
        Verdict::Pass => milter_verdict(c.rcpt(&recipient, &[]).await.unwrap()),
        refused => refused,
    };
    c.abort().await.unwrap();
    verdict
}

fn milter_verdict(s: Status) -> Verdict {
    match s {
        Status::Continue => Verdict::Pass,
        Status::Reject { reply: Some(r) } | Status::Tempfail { reply: Some(r) } => {
            Verdict::Refused(r)
        }
        other => panic!("milter answered {other:?}: neither continue nor a refusal with a reply"),
    }
}

/// Verdict counters by labels without `protocol` (`rule="R1",stage="rcpt",outcome="reject"`).
type Counts = BTreeMap<String, u64>;

fn verdict_counts(checker: &Checker, protocol: &str) -> Counts {
    let text = checker.metrics.encode();
    let mut counts = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("mailwarden_verdicts_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").expect("a sample line");
        let mut own = false;
        let others: Vec<&str> = labels
            .split(',')
            .filter(|l| match l.strip_prefix("protocol=") {
                Some(p) => {
                    assert_eq!(p, format!("{protocol:?}"), "{line}");
                    own = true;
                    false
                }
                None => true,
            })
            .collect();
        assert!(own, "no protocol label: {line}");
        counts.insert(others.join(","), value.parse().expect("a count"));
    }
    counts
}

/// What [`CASES`] must have counted when enforced: one refusal per refused case.
fn expected_counts(outcome: &str) -> Counts {
    let mut counts = Counts::new();
    for (rule, stage, _) in CASES.iter().filter_map(|c| c.refused) {
        *counts
            .entry(format!(
                "rule=\"{rule}\",stage=\"{stage}\",outcome=\"{outcome}\""
            ))
            .or_default() += 1;
    }
    counts
}

fn label(case: &Case) -> String {
    format!("{:?} -> {:?}", case.sender, case.recipient)
}

// ---- the tests ------------------------------------------------------------------------------

#[tokio::test]
async fn every_rule_gives_the_same_reply_through_policy_and_milter() {
    let both = Both::spawn("", seeded_store().await).await;
    let verdicts = both.run(CASES).await;
    for (case, (policy, milter)) in CASES.iter().zip(&verdicts) {
        assert_eq!(policy, milter, "{}: policy vs milter", label(case));
        let want = case.refused.map(|(_, _, codes)| codes.to_owned());
        assert_eq!(policy.codes(), want, "{}: {policy:?}", label(case));
        if let (Verdict::Refused(reply), Some((_, stage, _))) = (policy, case.refused) {
            // The text names the address judged (normalised): the sender's for a sender
            // rule, else the recipient's.
            let judged = if stage == "mail" {
                case.sender
            } else {
                case.recipient
            };
            let named = format!("<{}>", judged.to_ascii_lowercase());
            assert!(reply.contains(&named), "{}: {reply}", label(case));
        }
    }
    let (policy, milter) = both.counted();
    assert_eq!(policy, milter, "verdicts counted: policy vs milter");
    assert_eq!(policy, expected_counts("reject"));
    both.stop().await;
}

#[tokio::test]
async fn in_monitor_mode_both_pass_and_count_what_they_would_refuse() {
    let monitor = "[rules.R1]\nmode = \"monitor\"\n\
                   [rules.R2]\nmode = \"monitor\"\n\
                   [rules.R9]\nmode = \"monitor\"\n";
    let both = Both::spawn(monitor, seeded_store().await).await;
    let verdicts = both.run(CASES).await;
    for (case, (policy, milter)) in CASES.iter().zip(&verdicts) {
        assert_eq!(policy, &Verdict::Pass, "{}: policy", label(case));
        assert_eq!(milter, &Verdict::Pass, "{}: milter", label(case));
    }
    let (policy, milter) = both.counted();
    assert_eq!(policy, milter, "verdicts counted: policy vs milter");
    // Every refusal of the enforced run is counted as one that would have been made. (More
    // may be: with the sender let through, its recipient is judged as well.)
    for (labels, n) in expected_counts("would_reject") {
        let counted = policy.get(&labels).copied().unwrap_or(0);
        assert!(counted >= n, "{labels}: {counted} counted, {n} expected");
    }
    assert!(
        policy
            .keys()
            .all(|l| l.ends_with("outcome=\"would_reject\"")),
        "{policy:?}"
    );
    both.stop().await;
}

#[tokio::test]
async fn a_store_outage_tempfails_451_4_3_0_through_both() {
    let store = seeded_store().await;
    let both = Both::spawn("", store.clone()).await;
    store.set_down(true);
    let verdicts = both.run(CASES).await;
    for (case, (policy, milter)) in CASES.iter().zip(&verdicts) {
        assert_eq!(policy, milter, "{}: policy vs milter", label(case));
        assert_eq!(
            policy.codes().as_deref(),
            Some("451 4.3.0"),
            "{}: {policy:?}",
            label(case)
        );
    }
    let (policy, milter) = both.counted();
    assert_eq!(policy, milter, "verdicts counted: policy vs milter");
    // One tempfail counted per transaction (under the first rule that needed the store).
    assert!(
        policy.keys().all(|l| l.ends_with("outcome=\"tempfail\"")),
        "{policy:?}"
    );
    assert_eq!(
        policy.values().sum::<u64>(),
        CASES.len() as u64,
        "{policy:?}"
    );
    both.stop().await;
}

/// R11's envelope facts (client, SASL login, TLS) through both: a policy request carrying
/// them, and a milter session whose HELO and MAIL macros carry them.
#[tokio::test]
async fn r11_tls_state_gives_the_same_verdict_through_both() {
    let both = Both::spawn("", seeded_store().await).await;
    let champa = "champa@mpt.gov.la";
    // (client, SASL login, TLS protocol, sender, expected codes)
    let cases: [(&str, &str, &str, &str, Option<&str>); 6] = [
        ("192.0.2.7", "", "", champa, Some("530 5.7.0")),
        ("192.0.2.7", champa, "", "x@example.org", Some("530 5.7.0")),
        ("192.0.2.7", champa, "TLSv1.3", champa, None),
        ("192.0.2.7", "", "", "x@example.org", None),
        ("127.0.0.1", "", "", champa, None),
        ("192.0.2.7", "", "", "nobody@mpt.gov.la", Some("553 5.7.1")), // R9 first
    ];
    run_envelopes(&both, &cases).await;
    let (policy_counts, milter_counts) = both.counted();
    assert_eq!(
        policy_counts, milter_counts,
        "verdicts counted: policy vs milter"
    );
    assert_eq!(
        policy_counts.get(r#"rule="R11",stage="mail",outcome="reject""#),
        Some(&2),
        "{policy_counts:?}"
    );
    both.stop().await;
}

/// (client, SASL login, TLS protocol, sender, expected codes)
type Envelope<'a> = (&'a str, &'a str, &'a str, &'a str, Option<&'a str>);

/// Runs each envelope through a policy request carrying its facts and a fresh milter
/// session whose HELO and MAIL macros carry them; both must give the expected verdict.
async fn run_envelopes(both: &Both, cases: &[Envelope<'_>]) {
    let mut policy = Client::connect(&both.policy.addr).await.unwrap();
    for &(client, sasl, tls, sender, want) in cases {
        let request = Request::from_attrs([
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("client_address", client),
            ("sasl_username", sasl),
            ("encryption_protocol", tls),
            ("sender", sender),
            ("recipient", "friend@example.org"),
        ]);
        let action = policy.ask(&request).await.unwrap();
        let by_policy = if action == "DUNNO" {
            Verdict::Pass
        } else {
            Verdict::Refused(action)
        };

        let mut milter = MtaConnection::open(&both.milter.addr, TIMEOUT)
            .await
            .unwrap();
        let ip: IpAddr = client.parse().unwrap();
        milter.connect("client.example", ip, &[]).await.unwrap();
        let helo_macros: Vec<(&str, &str)> = if tls.is_empty() {
            vec![]
        } else {
            vec![("{tls_version}", tls)]
        };
        milter.helo("client.example", &helo_macros).await.unwrap();
        let mail_macros: Vec<(&str, &str)> = if sasl.is_empty() {
            vec![]
        } else {
            vec![("{auth_authen}", sasl)]
        };
        let sender_arg = format!("<{sender}>");
        let by_milter = milter_verdict(milter.mail(&[&sender_arg], &mail_macros).await.unwrap());
        milter.close().await.unwrap();

        let label = format!("{client} sasl={sasl:?} tls={tls:?} {sender}");
        assert_eq!(by_policy, by_milter, "{label}: policy vs milter");
        assert_eq!(by_policy.codes().as_deref(), want, "{label}: {by_policy:?}");
    }
}

/// R10's envelope facts (client address, SASL login) through both, with `mpt` declaring
/// 203.0.113.0/24 as its relay network.
#[tokio::test]
async fn r10_relay_networks_give_the_same_verdict_through_both() {
    let store = seeded_store().await;
    use mailwarden::store::Store;
    store
        .change_org_relays("mpt", &["203.0.113.0/24".parse().unwrap()], &[])
        .await
        .unwrap();
    let both = Both::spawn("", store).await;
    let champa = "champa@mpt.gov.la";
    let cases: [Envelope; 4] = [
        ("192.0.2.7", "", "TLSv1.3", champa, Some("550 5.7.1")),
        ("203.0.113.9", "", "TLSv1.3", champa, None),
        ("192.0.2.7", champa, "TLSv1.3", champa, None), // authenticated
        ("192.0.2.7", "", "TLSv1.3", "x@example.org", None),
    ];
    run_envelopes(&both, &cases).await;
    let (policy_counts, milter_counts) = both.counted();
    assert_eq!(
        policy_counts, milter_counts,
        "verdicts counted: policy vs milter"
    );
    assert_eq!(
        policy_counts.get(r#"rule="R10",stage="mail",outcome="reject""#),
        Some(&1),
        "{policy_counts:?}"
    );
    both.stop().await;
}

/// R8 (send-as) at MAIL through both: the SASL login may use its own address and the
/// mailboxes delegated to it as envelope sender; anything else is `553 5.7.1`, naming the
/// address, to the letter the same through policy and milter.
#[tokio::test]
async fn r8_send_as_gives_the_same_verdict_through_both() {
    use common::store::account;
    use mailwarden::store::{AccountStatus, Store};
    let store = seeded_store().await;
    store
        .create_account(&account("cabinet@mpt.gov.la", AccountStatus::Active))
        .await
        .unwrap();
    let (cabinet, champa) = ("cabinet@mpt.gov.la", "champa@mpt.gov.la");
    for delegate in [champa, "old@mpt.gov.la"] {
        store
            .add_delegate(&cabinet.parse().unwrap(), &delegate.parse().unwrap())
            .await
            .unwrap();
    }
    let both = Both::spawn("[rules.R8]\nlogin_domain = \"mpt.gov.la\"\n", store).await;
    let ip = "192.0.2.7";
    let tls = "TLSv1.3";
    let cases: [Envelope; 12] = [
        (ip, champa, tls, champa, None),
        (ip, "Champa@MPT.gov.la", tls, champa, None),
        (ip, "champa", tls, champa, None),        // login_domain
        (ip, champa, tls, cabinet, None),         // delegated
        (ip, champa, tls, "", None),              // null sender: read receipts
        (ip, "", tls, "bounmy@mpt.gov.la", None), // not authenticated: not R8's
        (ip, champa, tls, "bounmy@mpt.gov.la", Some("553 5.7.1")),
        (ip, "bounmy@mpt.gov.la", tls, cabinet, Some("553 5.7.1")),
        (ip, champa, tls, "someone@example.org", Some("553 5.7.1")),
        (ip, "bounmy", tls, champa, Some("553 5.7.1")),
        // A login that is no registered account owns nothing, not even its own address.
        (ip, "x@example.org", tls, "x@example.org", Some("553 5.7.1")),
        // A withdrawn account keeps no delegation in force (nor does a pending one).
        (ip, "old@mpt.gov.la", tls, cabinet, Some("553 5.7.1")),
    ];
    run_envelopes(&both, &cases).await;
    let (policy_counts, milter_counts) = both.counted();
    assert_eq!(
        policy_counts, milter_counts,
        "verdicts counted: policy vs milter"
    );
    assert_eq!(
        policy_counts.get(r#"rule="R8",stage="mail",outcome="reject""#),
        Some(&6),
        "{policy_counts:?}"
    );
    both.stop().await;
}

/// R15: an account locked for sending gets the same 450 4.7.1 at MAIL through both, whether
/// it authenticates or only appears as the local envelope sender; released, it may send.
#[tokio::test]
async fn r15_a_locked_account_gets_450_4_7_1_through_both() {
    use mailwarden::store::{LockCause, SendLock, Store};
    let store = seeded_store().await;
    let champa_addr = mailwarden::model::Address::parse("champa@mpt.gov.la").unwrap();
    let lock = SendLock {
        at: 1_796_423_281,
        by: "security-desk".into(),
        cause: LockCause::Manual {
            reason: "phished password reported".into(),
        },
    };
    store
        .set_send_lock(&champa_addr, Some(&lock))
        .await
        .unwrap();
    // R8 off: one case sends as another address on purpose, to show the login is locked.
    let both = Both::spawn("[rules.R8]\nmode = \"off\"\n", store.clone()).await;
    let (champa, bounmy) = ("champa@mpt.gov.la", "bounmy@mpt.gov.la");
    let cases: [Envelope; 4] = [
        ("192.0.2.7", champa, "TLSv1.3", champa, Some("450 4.7.1")),
        // The login is what counts, whatever the envelope says.
        ("192.0.2.7", champa, "TLSv1.3", bounmy, Some("450 4.7.1")),
        ("127.0.0.1", "", "", champa, Some("450 4.7.1")),
        ("192.0.2.7", bounmy, "TLSv1.3", bounmy, None),
    ];
    run_envelopes(&both, &cases).await;
    // The same replies (checked above). The stage label differs on purpose: the milter reads
    // the lock at MAIL; the policy service, asked at RCPT, lets its RCPT count read it in the
    // same store call (one round trip per recipient).
    let (policy_counts, milter_counts) = both.counted();
    assert_eq!(
        policy_counts.get(r#"rule="R15",stage="rcpt",outcome="tempfail""#),
        Some(&3),
        "{policy_counts:?}"
    );
    assert_eq!(
        milter_counts.get(r#"rule="R15",stage="mail",outcome="tempfail""#),
        Some(&3),
        "{milter_counts:?}"
    );
    assert_eq!(policy_counts.len(), 1, "{policy_counts:?}");
    assert_eq!(milter_counts.len(), 1, "{milter_counts:?}");
    store.set_send_lock(&champa_addr, None).await.unwrap();
    let released: [Envelope; 1] = [("192.0.2.7", champa, "TLSv1.3", champa, None)];
    run_envelopes(&both, &released).await;
    both.stop().await;
}
