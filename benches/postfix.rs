//! End-to-end benchmark: Postfix's own `smtp-source` → private Postfix → `smtp-sink`, with
//! mailwarden wired in (policy, milter, both) against bare Postfix and Postfix with postfwd
//! as the policy service, interleaved round by round in the same run.
//!
//! Run as root on a machine with postfix and postfwd installed:
//!
//! ```sh
//! cargo bench --bench postfix -- [ROUNDS] [MESSAGES] [SESSIONS] [SIZE]
//! ```
//!
//! defaults 3 rounds, `smtp-source -s 20 -m 2000 -l 4096`. For every run it reports messages
//! per second to the point where the sink has received them all, and the CPU time per message
//! of the policy/milter daemon (mailwarden or postfwd, all its processes, from /proc).
//! Postfix's own CPU is not included: it is the same program in every configuration.

#[path = "../tests/common/mod.rs"]
mod common;

use common::daemon::Mailwarden;
use common::postfix::{Postfix, SinkMode, Wiring};
use common::process::{find_program, free_port, wait_for};
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const SENDER: &str = "user0@mpt.gov.la";
const RECIPIENT: &str = "user1@mpt.gov.la";

/// CPU seconds used so far by the processes whose command line contains `needle`
/// (or by `pid` alone when given).
fn cpu_seconds(pid: Option<u32>, needle: &str) -> f64 {
    let mut total = 0.0;
    let pids: Vec<u32> = match pid {
        Some(p) => vec![p],
        None => std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|p: &u32| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(needle))
                    .unwrap_or(false)
            })
            .collect(),
    };
    for p in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime + stime (+ cutime + cstime of reaped children), USER_HZ = 100 on Linux.
        total += (t(11) + t(12) + t(13) + t(14)) / 100.0;
    }
    total
}

struct Postfwd {
    pidfile: std::path::PathBuf,
    addr: String,
    _dir: common::process::TestDir,
}

impl Postfwd {
    /// postfwd2 with one rule doing what R1 does: refuse mail to suspended accounts listed in
    /// a file (the same accounts mailwarden has suspended).
    fn start(suspended: &[String]) -> Postfwd {
        let bin = find_program("postfwd2", &["/usr/sbin"]);
        let dir = common::process::TestDir::new("mw-bench-postfwd-");
        let list = dir.join("suspended");
        std::fs::write(&list, suspended.join("\n") + "\n").unwrap();
        let rules = dir.join("rules.cf");
        std::fs::write(
            &rules,
            format!(
                "id=R1; recipient==file:{}; action=550 5.2.1 Mailbox is suspended\n",
                list.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let pidfile = dir.join("postfwd.pid");
        let st = Command::new(&bin)
            .args(["--daemon", "--nodns", "--noidlestats", "--summary=0"])
            .arg("--file")
            .arg(&rules)
            .args(["--interface", "127.0.0.1", "--port", &port.to_string()])
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["--user", "nobody", "--group", "nogroup"])
            .stdin(Stdio::null())
            .status()
            .expect("run postfwd2");
        assert!(st.success(), "postfwd2 failed to start");
        wait_for("postfwd to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Postfwd {
            pidfile,
            addr: format!("inet:127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Postfwd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
        let _ = Command::new("pkill")
            .args(["-f", &format!("postfwd.*{}", self.pidfile.display())])
            .status();
    }
}

struct Setup {
    name: &'static str,
    postfix: Postfix,
    /// Which daemon's CPU to count: mailwarden's pid, or postfwd processes by name.
    daemon: Option<(Option<u32>, &'static str)>,
}

struct Run {
    accepted_rate: f64,
    delivered_rate: f64,
    daemon_cpu_ms: Option<f64>,
}

fn run_once(setup: &Setup, messages: u64, sessions: u32, size: u32) -> Run {
    let source = find_program("smtp-source", &["/usr/sbin", "/usr/lib/postfix/sbin"]);
    let before_count = setup.postfix.sink_count();
    let cpu0 = setup.daemon.map(|(pid, n)| cpu_seconds(pid, n));
    let start = Instant::now();
    let st = Command::new(&source)
        .args(["-s", &sessions.to_string(), "-m", &messages.to_string()])
        .args(["-l", &size.to_string()])
        .args(["-f", SENDER, "-t", RECIPIENT])
        .arg(&setup.postfix.server)
        .stdin(Stdio::null())
        .status()
        .expect("run smtp-source");
    assert!(st.success(), "smtp-source failed against {}", setup.name);
    let accepted = start.elapsed();
    let target = before_count + messages;
    wait_for(
        &format!("{} to deliver {messages} messages", setup.name),
        Duration::from_secs(600),
        || (setup.postfix.sink_count() >= target).then_some(()),
    );
    let delivered = start.elapsed();
    let cpu1 = setup.daemon.map(|(pid, n)| cpu_seconds(pid, n));
    Run {
        accepted_rate: messages as f64 / accepted.as_secs_f64(),
        delivered_rate: messages as f64 / delivered.as_secs_f64(),
        daemon_cpu_ms: cpu0
            .zip(cpu1)
            .map(|(a, b)| (b - a) * 1000.0 / messages as f64),
    }
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
    let arg = |i: usize, d: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let rounds = arg(0, 3) as usize;
    let messages = arg(1, 2000);
    let sessions = arg(2, 20) as u32;
    let size = arg(3, 4096) as u32;

    // Two daemons: the default runtime (one worker thread per CPU) and one worker thread
    // (`server.worker_threads = 1`), to show what the setting does on a small shared box.
    let mw = Mailwarden::start("");
    let mw1 = Mailwarden::start_env("", &[("TOKIO_WORKER_THREADS", "1")]);
    let mut suspended = Vec::new();
    for d in [&mw, &mw1] {
        d.cli_ok(
            "org",
            &[
                "add",
                "mpt",
                "--name",
                "Ministry of Posts and Telecommunications",
            ],
        );
    }
    for i in 0..20 {
        let addr = format!("user{i}@mpt.gov.la");
        for d in [&mw, &mw1] {
            d.cli_ok(
                "user",
                &["add", &addr, "--kind", "person", "--status", "active"],
            );
            if i >= 10 {
                d.cli_ok("user", &["suspend", &addr, "--reason", "bench"]);
            }
        }
        if i >= 10 {
            suspended.push(addr);
        }
    }
    let postfwd = Postfwd::start(&suspended);
    let mw_pid = Some(mw.pid());
    let mw1_pid = Some(mw1.pid());
    let setups = vec![
        Setup {
            name: "bare Postfix",
            postfix: Postfix::start_full(Wiring::Bare, "", SinkMode::Count),
            daemon: None,
        },
        Setup {
            name: "postfwd (policy)",
            postfix: Postfix::start_full(Wiring::Policy(postfwd.addr.clone()), "", SinkMode::Count),
            daemon: Some((None, "postfwd")),
        },
        Setup {
            name: "mailwarden policy",
            postfix: Postfix::start_full(
                Wiring::Policy(mw.bound.policy.clone()),
                "",
                SinkMode::Count,
            ),
            daemon: Some((mw_pid, "")),
        },
        Setup {
            name: "mailwarden milter",
            postfix: Postfix::start_full(
                Wiring::Milter(mw.bound.milter.clone()),
                "",
                SinkMode::Count,
            ),
            daemon: Some((mw_pid, "")),
        },
        Setup {
            name: "mailwarden both",
            postfix: Postfix::start_full(
                Wiring::Both(mw.bound.policy.clone(), mw.bound.milter.clone()),
                "",
                SinkMode::Count,
            ),
            daemon: Some((mw_pid, "")),
        },
        Setup {
            name: "mailwarden both 1thr",
            postfix: Postfix::start_full(
                Wiring::Both(mw1.bound.policy.clone(), mw1.bound.milter.clone()),
                "",
                SinkMode::Count,
            ),
            daemon: Some((mw1_pid, "")),
        },
    ];
    println!(
        "smtp-source -s {sessions} -m {messages} -l {size}; {rounds} interleaved round(s); \
         rate = messages / time until the sink has them all"
    );
    // Warm-up: one small run each (process pools, caches, connections).
    for s in &setups {
        run_once(s, 100, sessions.min(10), size);
    }
    let mut results: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, s) in setups.iter().enumerate() {
            let r = run_once(s, messages, sessions, size);
            println!(
                "round {round} {:<20} delivered {:>6.1} msg/s  accepted {:>6.1} msg/s  daemon CPU {}",
                s.name,
                r.delivered_rate,
                r.accepted_rate,
                r.daemon_cpu_ms
                    .map(|c| format!("{c:.3} ms/msg"))
                    .unwrap_or_else(|| "-".into())
            );
            results[i].push(r);
        }
    }
    println!("\nmedians over {rounds} round(s):");
    let bare = median(results[0].iter().map(|r| r.delivered_rate).collect());
    let postfwd_rate = median(results[1].iter().map(|r| r.delivered_rate).collect());
    println!(
        "| setup | delivered msg/s | vs bare | vs postfwd | daemon CPU ms/msg |\n|---|---|---|---|---|"
    );
    for (s, rs) in setups.iter().zip(&results) {
        let rate = median(rs.iter().map(|r| r.delivered_rate).collect());
        let cpu = rs
            .iter()
            .filter_map(|r| r.daemon_cpu_ms)
            .collect::<Vec<_>>();
        println!(
            "| {} | {:.1} | {:.2}x | {:.2}x | {} |",
            s.name,
            rate,
            rate / bare,
            rate / postfwd_rate,
            if cpu.is_empty() {
                "-".into()
            } else {
                format!("{:.3}", median(cpu))
            }
        );
    }
    drop(setups);
    drop(postfwd);
}
