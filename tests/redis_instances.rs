//! Issue 4's exactness across instances: two mailwarden daemons (separate processes) share one
//! Redis Cluster (3 primaries on loopback, from Debian's `redis-server`) and are driven at the
//! same time by the policy load generator, every request a message of its own from one
//! account. The daily message limit must cut off at exactly the configured number across
//! both daemons, and the counter in the Cluster must equal the number of accepted messages.

#[allow(dead_code)]
#[path = "../src/store/redis/servers.rs"]
mod servers;

mod common;

use common::daemon::Mailwarden;
use mailwarden::config::ListenAddr;
use mailwarden::policy::loadgen::{self, LoadSpec};
use std::time::Duration;

const LIMIT: u64 = 300;

#[test]
fn two_daemons_on_one_cluster_cut_off_at_exactly_the_limit() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(servers::Cluster::start());
    let url = format!("redis+cluster://{}?prefix=inst", cluster.hosts());
    // The daily limit (an hourly one could straddle the top of an hour during the run);
    // R15 off: its burst lock would stop the sender before the limit does.
    let rules = format!(
        "[rules.R14]\nmessages_per_hour = 0\nmessages_per_day = {LIMIT}\n\
         recipients_per_hour = 0\nrecipients_per_day = 0\n[rules.R15]\nmode = \"off\"\n"
    );
    let one = Mailwarden::start_on_store(&url, &rules);
    let two = Mailwarden::start_on_store(&url, &rules);
    one.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    one.cli_ok(
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
    let recipients: Vec<String> = (0..500).map(|i| format!("r{i}@example.org")).collect();
    let spec = |d: &Mailwarden| LoadSpec {
        target: d.bound.policy.parse::<ListenAddr>().unwrap(),
        connections: 8,
        requests_per_connection: 100,
        recipients: recipients.clone(),
        senders: vec!["champa@mpt.gov.la".into()],
        timeout: Duration::from_secs(10),
    };
    let (a, b) = (spec(&one), spec(&two));
    let (ra, rb) = rt.block_on(async { tokio::join!(loadgen::run(&a), loadgen::run(&b)) });
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.failures.is_empty() && rb.failures.is_empty(),
        "{ra:?} {rb:?}"
    );
    let accepted = |r: &loadgen::LoadReport| r.actions.get("DUNNO").copied().unwrap_or(0);
    let refused = |r: &loadgen::LoadReport| r.actions.get("450").copied().unwrap_or(0);
    // Both daemons took part, and together they let exactly the limit through.
    assert!(accepted(&ra) > 0 && accepted(&rb) > 0, "{ra:?} {rb:?}");
    assert_eq!(accepted(&ra) + accepted(&rb), LIMIT, "{ra:?} {rb:?}");
    assert_eq!(refused(&ra) + refused(&rb), 1600 - LIMIT, "{ra:?} {rb:?}");
    // The counter in the Cluster equals the accepted messages.
    let counted = rt.block_on(async {
        let store = mailwarden::store::open(&url).await.unwrap();
        let champa = mailwarden::model::Address::parse("champa@mpt.gov.la").unwrap();
        store
            .counters(&champa, chrono::Utc::now().timestamp())
            .await
            .unwrap()
    });
    let day = counted
        .iter()
        .find(|v| {
            v.counter.window == mailwarden::store::counters::Window::Day
                && v.counter.measure == mailwarden::store::counters::Measure::Messages
        })
        .unwrap();
    assert_eq!(day.count, LIMIT);
    eprintln!(
        "two daemons on one cluster: {} + {} accepted = {LIMIT}, {} refused, counter {}",
        accepted(&ra),
        accepted(&rb),
        refused(&ra) + refused(&rb),
        day.count
    );
    drop((one, two));
    drop(cluster);
}
