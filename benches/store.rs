//! Store benchmark (issue 4): policy checks per second with every sending limit on, each
//! RCPT counting in the store, against the embedded SQLite store, a standalone Redis and a
//! 3-primary Redis Cluster, with one and with two daemon instances sharing the store.
//! Configurations are interleaved round by round in the same run, so they share the
//! machine's state; each is a fresh `mailwarden bench --protocol policy --rounds 1` (fresh
//! daemons, a fresh store prefix) driven by the same load generator.
//!
//! ```sh
//! cargo bench --ignore-rust-version --bench store -- [ROUNDS] [REQUESTS] [CONNECTIONS] [SENDERS]
//! ```
//!
//! Defaults: 3 rounds, 5000 requests on each of 16 connections, from 100 sender accounts.
//! Reported per configuration (median round by daemon CPU): checks/s, p50/p99 latency, the
//! daemons' CPU per check (all instances, from /proc), Redis round trips per check (the
//! daemons' own `mailwarden_store_round_trips_total`), and the rate relative to SQLite with
//! one instance. Needs Debian's `redis-server`; servers bind 127.0.0.1 on free ports and are
//! killed when the run ends.

#[allow(dead_code)]
#[path = "../src/store/redis/servers.rs"]
mod servers;

use std::process::Command;

#[derive(Debug, Clone, Default)]
struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
    cpu: f64,
    trips: Option<f64>,
}

/// Parses the `policy median …` line `mailwarden bench` prints.
fn parse(out: &str) -> Option<Figures> {
    let line = out.lines().find(|l| l.starts_with("policy median"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> Option<f64> {
        let i = words.iter().position(|w| *w == key)?;
        words
            .get(i + 1)?
            .trim_end_matches("/s")
            .trim_end_matches("/op")
            .parse()
            .ok()
    };
    Some(Figures {
        rate: words.get(2)?.trim_end_matches("/s").parse().ok()?,
        p50: after("p50")?,
        p99: after("p99")?,
        cpu: after("CPU")?,
        trips: after("trips"),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let (rounds, requests, connections, senders) =
        (arg(0, 3), arg(1, 5000), arg(2, 16), arg(3, 100));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let (standalone, cluster) = rt.block_on(async {
        (
            servers::Standalone::start(&[]).await,
            servers::Cluster::start().await,
        )
    });
    let standalone_url = format!("redis://127.0.0.1:{}", standalone.port());
    let cluster_url = format!("redis+cluster://{}", cluster.hosts());
    let configs: Vec<(&str, Option<&str>, usize)> = vec![
        ("sqlite x1", None, 1),
        ("sqlite x2", None, 2),
        ("redis x1", Some(&standalone_url), 1),
        ("redis x2", Some(&standalone_url), 2),
        ("cluster x1", Some(&cluster_url), 1),
        ("cluster x2", Some(&cluster_url), 2),
    ];
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); configs.len()];
    for round in 1..=rounds {
        for (i, (label, store, instances)) in configs.iter().enumerate() {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailwarden"));
            cmd.args(["bench", "--protocol", "policy", "--rounds", "1"])
                .args(["--requests", &requests.to_string()])
                .args(["--connections", &connections.to_string()])
                .args(["--senders", &senders.to_string()])
                .args(["--instances", &instances.to_string()]);
            if let Some(url) = store {
                cmd.args(["--store", url]);
            }
            let out = cmd.output().expect("run mailwarden bench");
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(f) = parse(&text).filter(|_| out.status.success()) else {
                panic!(
                    "{label}: mailwarden bench failed:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            println!(
                "round {round} {label:<11} {:>8.0}/s  p50 {:.3} ms  p99 {:.3} ms  daemon CPU {:.4} ms/check  round trips {}",
                f.rate,
                f.p50,
                f.p99,
                f.cpu,
                f.trips.map(|t| format!("{t:.3}")).unwrap_or("-".into())
            );
            results[i].push(f);
        }
    }
    println!(
        "\nmedians over {rounds} round(s), {connections} connections x {requests} requests, {senders} senders:"
    );
    let base = median(results[0].iter().map(|f| f.rate).collect());
    for ((label, _, _), r) in configs.iter().zip(&results) {
        let rate = median(r.iter().map(|f| f.rate).collect());
        let trips: Vec<f64> = r.iter().filter_map(|f| f.trips).collect();
        println!(
            "{label:<11} {:>8.0}/s ({:>5.2}x sqlite x1)  p99 {:.3} ms  daemon CPU {:.4} ms/check  round trips/check {}",
            rate,
            rate / base,
            median(r.iter().map(|f| f.p99).collect()),
            median(r.iter().map(|f| f.cpu).collect()),
            if trips.is_empty() {
                "-".into()
            } else {
                format!("{:.3}", median(trips))
            }
        );
    }
    drop((standalone, cluster));
}
