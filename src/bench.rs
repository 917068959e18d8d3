//! `mailwarden bench`: direct protocol load against a freshly started daemon on the embedded
//! store, with the daemon's own CPU time per check read from /proc. Build with `--release`.
//!
//! The daemon runs as a child process (this same binary, `run`), so its CPU time is its own:
//! the load generator's CPU is reported separately.

use mailwarden::config::ListenAddr;
use mailwarden::model::Address;
use mailwarden::policy::loadgen::{self, LoadReport, LoadSpec};
use mailwarden::store::{
    Account, AccountKind, AccountStatus, Org, OrgStatus, Store, sqlite::SqliteStore,
};
use std::{path::Path, process::Stdio, time::Duration};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which front-end to load: policy, milter or both (one after the other).
    #[arg(long, default_value = "both")]
    pub protocol: String,
    /// Accounts registered in the directory (every tenth one suspended).
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Concurrent connections (like Postfix smtpd processes).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Requests (policy) or transactions (milter) per connection.
    #[arg(long, default_value_t = 5_000)]
    pub requests: usize,
    /// Recipients per milter transaction.
    #[arg(long, default_value_t = 1)]
    pub rcpts: usize,
    /// Rounds per protocol (the best and median rounds are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Turn the sending limits (R14) and the compromise response (R15) off. By default they
    /// are on with no limit or threshold reached, so every RCPT also counts in the store (one
    /// combined call), as in production.
    #[arg(long)]
    pub without_limits: bool,
    /// Store URL shared by the daemons (`redis://…`, `redis+cluster://…`). Default: a fresh
    /// SQLite file in a temporary directory. Redis URLs get a `prefix=` of this run unless
    /// they name one, so runs do not collide (the keys are left behind: use a scratch server).
    #[arg(long)]
    pub store: Option<String>,
    /// Daemon instances sharing the store; the connections are spread over them.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// Distinct envelope senders (accounts) the policy load comes from, round-robin; each
    /// has its own sending counters.
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
}

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat(5); index 11 and 12 after the name.
    // /proc reports them in USER_HZ, which is 100 on Linux for every architecture.
    Ok((ticks(11) + ticks(12)) as f64 / 100.0)
}

fn own_cpu() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

struct Child {
    child: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

async fn seed(url: &str, accounts: usize) -> anyhow::Result<Vec<String>> {
    let store: std::sync::Arc<dyn Store> = match url.strip_prefix("sqlite:") {
        Some(path) => std::sync::Arc::new(SqliteStore::open(path).await?),
        None => mailwarden::store::open(url)
            .await
            .map_err(|e| anyhow::anyhow!("--store: {e}"))?,
    };
    let now = chrono::Utc::now().timestamp();
    store
        .create_org(&Org {
            code: "mpt".into(),
            name: "Ministry of Posts and Telecommunications".into(),
            domain: "mpt.gov.la".into(),
            status: OrgStatus::Active,
            status_reason: None,
            created_at: now,
            status_changed_at: now,
            relay_networks: Vec::new(),
            default_quota_bytes: None,
        })
        .await?;
    let mut rows = Vec::with_capacity(accounts + 1);
    let mut recipients = Vec::with_capacity(accounts + accounts / 4);
    for i in 0..=accounts {
        let address: Address = format!("user{i}@mpt.gov.la").parse()?;
        let status = if i % 10 == 9 {
            AccountStatus::Suspended
        } else {
            AccountStatus::Active
        };
        recipients.push(address.to_string());
        if i % 4 == 0 {
            recipients.push(format!("someone{i}@example.org"));
        }
        rows.push(Account {
            address,
            org: "mpt".into(),
            kind: AccountKind::Person,
            status,
            status_reason: None,
            display_name: None,
            created_at: now,
            status_changed_at: now,
            quota_bytes: None,
            bulk: false,
        });
    }
    store.create_accounts(&rows).await?;
    Ok(recipients)
}

fn start_daemon(
    dir: &Path,
    n: usize,
    store: &str,
    without_limits: bool,
    count_on: &str,
) -> anyhow::Result<(Child, serde_json::Value)> {
    let config = dir.join(format!("bench{n}.toml"));
    // Limits on and never reached: every RCPT counts in the store, as in production.
    let big = 1_000_000_000u64;
    std::fs::write(
        &config,
        format!(
            "[server]\nmilter_listen = \"inet:127.0.0.1:0\"\npolicy_listen = \"inet:127.0.0.1:0\"\n\
             [store]\nurl = \"{store}\"\n\
             [admin]\nlisten = \"inet:127.0.0.1:0\"\naudit_log = \"{audit}\"\n\
             [log]\nlevel = \"warn\"\n\
             [rules.R14]\nmode = \"{r14}\"\nrecipients_per_message = 0\nmessages_per_hour = {big}\n\
             messages_per_day = {big}\nrecipients_per_hour = {big}\nrecipients_per_day = {big}\n\
             count_on = \"{count_on}\"\n\
             [rules.R15]\nmode = \"{r14}\"\nburst_floor = 1000000000\nreject_min = 1000000000\n",
            audit = dir.join(format!("audit{n}.jsonl")).display(),
            r14 = if without_limits { "off" } else { "enforce" },
        ),
    )?;
    let ready = dir.join(format!("ready{n}.json"));
    // A previous daemon's file would be taken for this one's.
    let _ = std::fs::remove_file(&ready);
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["run", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .spawn()?;
    let child = Child { child };
    for _ in 0..500 {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            return Ok((child, serde_json::from_str(&text)?));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("the daemon did not become ready within 10s")
}

struct Round {
    rate: f64,
    p50: Duration,
    p99: Duration,
    daemon_cpu_per_op: f64,
    client_cpu_per_op: f64,
    ops: u64,
    /// Store round trips per check (Redis), from the daemons' metrics.
    round_trips_per_op: Option<f64>,
}

fn print_round(label: &str, r: &Round) {
    let trips = r
        .round_trips_per_op
        .map(|t| format!("  store round trips {t:.3}/op"))
        .unwrap_or_default();
    println!(
        "{label:<8} {:>9.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  daemon CPU {:>7.4} ms/op  loadgen CPU {:>7.4} ms/op  ({} ops){trips}",
        r.rate,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        r.daemon_cpu_per_op * 1e3,
        r.client_cpu_per_op * 1e3,
        r.ops
    );
}

fn summarize(label: &str, mut rounds: Vec<Round>) {
    rounds.sort_by(|a, b| a.daemon_cpu_per_op.total_cmp(&b.daemon_cpu_per_op));
    let median = &rounds[rounds.len() / 2];
    print_round(&format!("{label} median"), median);
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.instances == 0 || args.senders == 0 {
        anyhow::bail!("--instances and --senders must be at least 1");
    }
    let dir = tempfile_dir()?;
    let store = match &args.store {
        None => format!("sqlite:{}", dir.join("bench.db").display()),
        Some(url) if url.starts_with("redis") && !url.contains("prefix=") => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}prefix=mwbench{}", std::process::id())
        }
        Some(url) => url.clone(),
    };
    println!(
        "store {}; {} instance(s); seeding {} accounts; {} connections x {} requests, {} senders, {} round(s)",
        mailwarden::store::redact_url(&store),
        args.instances,
        args.accounts,
        args.connections,
        args.requests,
        args.senders,
        args.rounds
    );
    let recipients = seed(&store, args.accounts).await?;
    let senders: Vec<String> = (0..args.senders)
        .map(|i| format!("user{}@mpt.gov.la", i * 10 % (args.accounts.max(1))))
        .collect();
    let protocols: Vec<&str> = match args.protocol.as_str() {
        "both" => vec!["policy", "milter"],
        "policy" => vec!["policy"],
        "milter" => vec!["milter"],
        other => anyhow::bail!("--protocol {other:?}: expected policy, milter or both"),
    };
    for proto in protocols {
        // Fresh daemons per protocol, counting the sending limits on the protocol loaded
        // (`count_on`), so both protocols pay for the counting as in production.
        let mut daemons = Vec::new();
        for n in 0..args.instances {
            daemons.push(start_daemon(&dir, n, &store, args.without_limits, proto)?);
        }
        let pids: Vec<u32> = daemons.iter().map(|(c, _)| c.child.id()).collect();
        let addr = |n: usize, k: &str| -> anyhow::Result<ListenAddr> {
            daemons[n].1[k]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("daemon has no {k} listener"))?
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))
        };
        let daemons_cpu = || -> anyhow::Result<f64> {
            pids.iter()
                .map(|&p| cpu_seconds(p).map_err(anyhow::Error::from))
                .sum()
        };
        let admins: Vec<ListenAddr> = (0..args.instances)
            .map(|n| addr(n, "admin"))
            .collect::<anyhow::Result<_>>()?;
        let targets: Vec<ListenAddr> = (0..args.instances)
            .map(|n| addr(n, proto))
            .collect::<anyhow::Result<_>>()?;
        let mut rounds = Vec::new();
        // One warm-up round, as long as the measured ones, fills the directory cache with
        // every address the rounds use (and the connection pools), so the rounds measure the
        // steady state: a cold cache costs one store read per address first seen.
        let warm = args.requests;
        for round in 0..=args.rounds {
            let n = if round == 0 { warm } else { args.requests };
            let trips0 = round_trips(&admins).await?;
            let (d0, c0) = (daemons_cpu()?, own_cpu());
            let mut load = tokio::task::JoinSet::new();
            for (i, target) in targets.iter().enumerate() {
                // Spread the connections over the instances (the first ones get the rest).
                let conns = args.connections / args.instances
                    + usize::from(i < args.connections % args.instances);
                if conns == 0 {
                    continue;
                }
                let (target, recipients, senders) =
                    (target.clone(), recipients.clone(), senders.clone());
                let rcpts = args.rcpts;
                let proto = proto.to_owned();
                load.spawn(async move {
                    match proto.as_str() {
                        "policy" => policy_round(&target, &recipients, &senders, conns, n).await,
                        _ => milter_round(&target, &recipients, conns, n, rcpts).await,
                    }
                });
            }
            let mut parts = Vec::new();
            while let Some(r) = load.join_next().await {
                parts.push(r??);
            }
            let report = Report::merge(parts);
            let (d1, c1) = (daemons_cpu()?, own_cpu());
            let trips1 = round_trips(&admins).await?;
            if round == 0 {
                continue;
            }
            let ops = report.answered.max(1);
            let r = Round {
                rate: report.rate(),
                p50: report.p50,
                p99: report.p99,
                daemon_cpu_per_op: (d1 - d0) / ops as f64,
                client_cpu_per_op: (c1 - c0) / ops as f64,
                ops: report.answered,
                round_trips_per_op: trips0.zip(trips1).map(|(a, b)| (b - a) as f64 / ops as f64),
            };
            print_round(&format!("{proto} #{round}"), &r);
            rounds.push(r);
        }
        summarize(proto, rounds);
        drop(daemons);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The store round trips all daemons made so far (their `store_round_trips_total`), or
/// `None` when the store keeps no count (SQLite).
async fn round_trips(admins: &[ListenAddr]) -> anyhow::Result<Option<u64>> {
    let http = mailwarden::admin::cli::http_client(None, false).map_err(anyhow::Error::msg)?;
    let mut total = None;
    for admin in admins {
        let ListenAddr::Inet(sock) = admin else {
            anyhow::bail!("admin listener {admin} is not TCP");
        };
        let text = http
            .get(format!("http://{sock}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("mailwarden_store_round_trips_total "))
        {
            *total.get_or_insert(0) += v.trim().parse::<f64>()? as u64;
        }
    }
    Ok(total)
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("mailwarden-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

struct Report {
    answered: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Report {
    /// Several instances' loads, run at the same time, as one: the answers add up, the wall
    /// time is the longest, the percentiles are the worst instance's (a conservative bound:
    /// the latencies themselves are not kept).
    fn merge(parts: Vec<Report>) -> Report {
        parts
            .into_iter()
            .reduce(|a, b| Report {
                answered: a.answered + b.answered,
                elapsed: a.elapsed.max(b.elapsed),
                p50: a.p50.max(b.p50),
                p99: a.p99.max(b.p99),
            })
            .unwrap_or(Report {
                answered: 0,
                elapsed: Duration::ZERO,
                p50: Duration::ZERO,
                p99: Duration::ZERO,
            })
    }

    fn rate(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

async fn policy_round(
    target: &ListenAddr,
    recipients: &[String],
    senders: &[String],
    connections: usize,
    requests: usize,
) -> anyhow::Result<Report> {
    let spec = LoadSpec {
        target: target.clone(),
        connections,
        requests_per_connection: requests,
        recipients: recipients.to_vec(),
        senders: senders.to_vec(),
        timeout: Duration::from_secs(5),
    };
    let r: LoadReport = loadgen::run(&spec).await?;
    if !r.failures.is_empty() {
        anyhow::bail!(
            "policy load failed: {:?}",
            &r.failures[..r.failures.len().min(3)]
        );
    }
    Ok(Report {
        answered: r.answered,
        elapsed: r.elapsed,
        p50: r.p50,
        p99: r.p99,
    })
}

async fn milter_round(
    target: &ListenAddr,
    recipients: &[String],
    connections: usize,
    transactions: usize,
    rcpts: usize,
) -> anyhow::Result<Report> {
    use mailwarden::milter::loadgen as mload;
    let rcpt: Vec<&str> = recipients
        .iter()
        .take(rcpts.max(1))
        .map(String::as_str)
        .collect();
    let mut spec = mload::LoadSpec::new(target.clone(), "user0@mpt.gov.la", &rcpt);
    spec.connections = connections;
    spec.transactions = transactions;
    spec.timeout = Duration::from_secs(5);
    let r = mload::run(&spec).await?;
    if r.failed_connections > 0 {
        anyhow::bail!("milter load failed: {:?}", r.first_error);
    }
    Ok(Report {
        answered: r.transactions,
        elapsed: r.elapsed,
        p50: r.p50,
        p99: r.p99,
    })
}
