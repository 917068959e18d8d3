//! End-to-end benchmark: Postfix's own `smtp-source` → private Postfix → `smtp-sink`, with
//! mailwarden wired in (policy, milter, both) against bare Postfix and Postfix with postfwd
//! as the policy service, interleaved round by round in the same run.
//!
//! Run as root on a machine with postfix and postfwd installed:
//!
//! ```sh
//! cargo bench --ignore-rust-version --bench postfix -- [policy|dkim] [ROUNDS] [MESSAGES] [SESSIONS] [SIZE]
//! ```
//!
//! `policy` (default): bare Postfix, postfwd, mailwarden on the policy path, the milter path
//! and both (default runtime, two worker threads, Unix-domain sockets instead of TCP, and
//! "both envpol": `milter_envelope = "policy"` with `deploy/postfix/main.cf.both`, the
//! recommended wiring). `dkim`: bare Postfix, OpenDKIM signing RSA-2048 (over TCP and a
//! Unix-domain socket), mailwarden signing RSA-2048, Ed25519 and both (milter path, all its
//! rules on), and RSA-2048 and Ed25519 again over Unix-domain sockets.
//! Defaults 3 rounds, `smtp-source -s 20 -m 2000 -l 4096`. For every run it reports messages
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

/// Every rule on, as in production, but sending limits and R15 thresholds that the
/// benchmark's single sender never reaches: 0 = no limit, still counted in the store on every
/// RCPT (the real cost of R14 and R15's one combined call).
const RULES: &str = "[rules.R14]\nrecipients_per_message = 0\nmessages_per_hour = 0\n\
                     messages_per_day = 0\nrecipients_per_hour = 0\nrecipients_per_day = 0\n\
                     [rules.R15]\nburst_floor = 1000000000\nreject_min = 1000000000\n";
const RECIPIENT: &str = "user1@mpt.gov.la";

/// The rules the daemons run: [`RULES`], or `MAILWARDEN_BENCH_RULES` (a `[rules]` TOML
/// fragment replacing it) to measure what one rule costs, e.g. with `[rules.R8] mode = "off"`.
fn rules() -> String {
    std::env::var("MAILWARDEN_BENCH_RULES").unwrap_or_else(|_| RULES.to_owned())
}

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

impl Setup {
    /// A counting Postfix wired as given; `pid` is the daemon whose CPU is counted.
    fn new(name: &'static str, wiring: Wiring, pid: Option<u32>) -> Setup {
        Setup {
            name,
            postfix: Postfix::start_full(wiring, "", SinkMode::Count),
            daemon: pid.map(|p| (Some(p), "")),
        }
    }

    /// Postfix with `mw` as its milter.
    fn milter(name: &'static str, mw: &Mailwarden) -> Setup {
        Setup::new(
            name,
            Wiring::Milter(mw.bound.milter.clone()),
            Some(mw.pid()),
        )
    }
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
        // MAILWARDEN_BENCH_REUSE=1: each session sends its messages over one connection
        // (`smtp-source -d`), as relays do; by default one message per connection, as
        // submission clients do, which costs a milter connection per message.
        .args(std::env::var_os("MAILWARDEN_BENCH_REUSE").map(|_| "-d"))
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
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // First word picks the suite: `policy` (default) or `dkim`.
    let suite = match args.first().map(String::as_str) {
        Some("dkim") | Some("policy") => args.remove(0),
        _ => "policy".to_owned(),
    };
    let arg = |i: usize, d: u64| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(d);
    let rounds = arg(0, 3) as usize;
    let messages = arg(1, 2000);
    let sessions = arg(2, 20) as u32;
    let size = arg(3, 4096) as u32;
    if suite == "dkim" {
        dkim_suite(rounds, messages, sessions, size);
    } else {
        policy_suite(rounds, messages, sessions, size);
    }
}

/// Registers the benchmark's organisation and 20 accounts (10 suspended) in `d`; returns the
/// suspended addresses.
fn seed(d: &Mailwarden) -> Vec<String> {
    d.cli_ok(
        "org",
        &[
            "add",
            "mpt",
            "--name",
            "Ministry of Posts and Telecommunications",
        ],
    );
    let mut suspended = Vec::new();
    for i in 0..20 {
        let addr = format!("user{i}@mpt.gov.la");
        d.cli_ok(
            "user",
            &["add", &addr, "--kind", "person", "--status", "active"],
        );
        if i >= 10 {
            d.cli_ok("user", &["suspend", &addr, "--reason", "bench"]);
            suspended.push(addr);
        }
    }
    suspended
}

/// mailwarden (policy, milter, both; default runtime and two worker threads) against bare
/// Postfix and postfwd.
fn policy_suite(rounds: usize, messages: u64, sessions: u32, size: u32) {
    // Two daemons: the default runtime (`server.worker_threads = 0`: half the CPUs, one on a
    // 2-CPU box) and two worker threads (one per CPU there, the default before), to show what
    // the setting does on a small shared box.
    let rules = rules();
    let mw = Mailwarden::start(&rules);
    let mw1 = Mailwarden::start_env(&rules, &[("TOKIO_WORKER_THREADS", "2")]);
    // The same on Unix-domain sockets (no TCP handshake per milter connection).
    let mwu = Mailwarden::start_unix(&rules);
    // Both wired as README recommends: the envelope left to the policy service.
    let envpol = "milter_envelope = \"policy\"";
    let mwp = Mailwarden::start_server(envpol, &rules, &[]);
    let mwp1 = Mailwarden::start_server(envpol, &rules, &[("TOKIO_WORKER_THREADS", "2")]);
    let suspended = seed(&mw);
    for d in [&mw1, &mwu, &mwp, &mwp1] {
        seed(d);
    }
    let postfwd = Postfwd::start(&suspended);
    let both = |d: &Mailwarden| Wiring::Both(d.bound.policy.clone(), d.bound.milter.clone());
    // deploy/postfix/main.cf.both: no policy request at the end of DATA.
    let by_policy =
        |d: &Mailwarden| Wiring::BothByPolicy(d.bound.policy.clone(), d.bound.milter.clone());
    let setups = vec![
        Setup::new("bare Postfix", Wiring::Bare, None),
        Setup {
            name: "postfwd (policy)",
            postfix: Postfix::start_full(Wiring::Policy(postfwd.addr.clone()), "", SinkMode::Count),
            // postfwd2 is a master with preforked children: count them all by name.
            daemon: Some((None, "postfwd")),
        },
        Setup::new(
            "mailwarden policy",
            Wiring::Policy(mw.bound.policy.clone()),
            Some(mw.pid()),
        ),
        Setup::milter("mailwarden milter", &mw),
        Setup::new("mailwarden both", both(&mw), Some(mw.pid())),
        Setup::new("mailwarden both 2thr", both(&mw1), Some(mw1.pid())),
        Setup::milter("mailwarden milter unix", &mwu),
        Setup::new("mailwarden both unix", both(&mwu), Some(mwu.pid())),
        Setup::new("mailwarden both envpol", by_policy(&mwp), Some(mwp.pid())),
        Setup::new(
            "mailwarden both envpol 2thr",
            by_policy(&mwp1),
            Some(mwp1.pid()),
        ),
    ];
    // MAILWARDEN_BENCH_BASELINE=PATH: another build of mailwarden (e.g. an earlier commit's
    // target/release/mailwarden) on the same paths, in the same rounds.
    // Its "both envpol" runs with both snippets (main.cf.both may be newer than that build).
    let base = std::env::var("MAILWARDEN_BENCH_BASELINE").ok().map(|bin| {
        let env = [("MAILWARDEN_TEST_BINARY", bin.as_str())];
        (
            Mailwarden::start_binary(&bin, &rules),
            Mailwarden::start_server(envpol, &rules, &env),
        )
    });
    let mut setups = setups;
    if let Some((b, bp)) = &base {
        seed(b);
        seed(bp);
        setups.push(Setup::new(
            "baseline policy",
            Wiring::Policy(b.bound.policy.clone()),
            Some(b.pid()),
        ));
        setups.push(Setup::milter("baseline milter", b));
        setups.push(Setup::new("baseline both", both(b), Some(b.pid())));
        setups.push(Setup::new("baseline both envpol", both(bp), Some(bp.pid())));
        // The same build with main.cf.both, for builds that have it (from commit 886b018).
        setups.push(Setup::new(
            "baseline both main.cf.both",
            by_policy(bp),
            Some(bp.pid()),
        ));
    }
    let setups = only(setups);
    run_suite(&setups, rounds, messages, sessions, size);
    drop(setups);
    drop(postfwd);
}

/// mailwarden signing (RSA-2048, Ed25519, both) with its directory rules, against OpenDKIM
/// signing RSA-2048 with the same messages, and bare Postfix.
fn dkim_suite(rounds: usize, messages: u64, sessions: u32, size: u32) {
    // OpenDKIM refuses keys and configs under a world-writable directory (like /tmp).
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dkim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keygen = |sel: &str, alg: &str| -> std::path::PathBuf {
        let out = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
            .args([
                "dkim",
                "keygen",
                "mpt.gov.la",
                sel,
                "--algorithm",
                alg,
                "--out",
            ])
            .arg(&dir)
            .output()
            .expect("run keygen");
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join(format!("mpt.gov.la.{sel}.pem"))
    };
    let rsa = keygen("rsa", "rsa");
    let ed = keygen("ed", "ed25519");
    let key = |sel: &str, alg: &str, path: &std::path::Path| {
        format!(
            "[[dkim.keys]]\ndomain = \"mpt.gov.la\"\nselector = \"{sel}\"\nalgorithm = \"{alg}\"\nkey_file = \"{}\"\n",
            path.display()
        )
    };
    // Every check of issue 3 on: R7 (inbound verification) too, although these messages,
    // from an internal network, are outbound (signed, not verified): it costs its HELO stage.
    let internal = "[dkim]\ninternal_networks = [\"127.0.0.0/8\"]\n\
                    [rules.R7]\nauthserv_id = \"mx.mpt.gov.la\"\n";
    let rsa_key = key("rsa", "rsa-sha256", &rsa);
    let ed_key = key("ed", "ed25519-sha256", &ed);
    let rules = rules();
    let mw_rsa = Mailwarden::start(&format!("{rules}{internal}{rsa_key}"));
    let mw_ed = Mailwarden::start(&format!("{rules}{internal}{ed_key}"));
    let mw_both = Mailwarden::start(&format!("{rules}{internal}{rsa_key}{ed_key}"));
    // The same two signers on Unix-domain sockets, as OpenDKIM's second setup.
    let mw_rsa_u = Mailwarden::start_unix(&format!("{rules}{internal}{rsa_key}"));
    let mw_ed_u = Mailwarden::start_unix(&format!("{rules}{internal}{ed_key}"));
    for d in [&mw_rsa, &mw_ed, &mw_both, &mw_rsa_u, &mw_ed_u] {
        seed(d);
    }
    let od = OpenDkim::start(&dir, &rsa);
    let odu = OpenDkim::start_on(&dir, &rsa, true);
    let setups = vec![
        Setup::new("bare Postfix", Wiring::Bare, None),
        Setup::new(
            "OpenDKIM RSA-2048",
            Wiring::Milter(od.addr.clone()),
            Some(od.pid()),
        ),
        Setup::new(
            "OpenDKIM RSA-2048 unix",
            Wiring::Milter(odu.addr.clone()),
            Some(odu.pid()),
        ),
        Setup::milter("mailwarden RSA-2048", &mw_rsa),
        Setup::milter("mailwarden Ed25519", &mw_ed),
        Setup::milter("mailwarden RSA+Ed25519", &mw_both),
        Setup::milter("mailwarden RSA-2048 unix", &mw_rsa_u),
        Setup::milter("mailwarden Ed25519 unix", &mw_ed_u),
    ];
    // MAILWARDEN_BENCH_BASELINE=PATH: another build signing with the same keys, same rounds.
    let base = std::env::var("MAILWARDEN_BENCH_BASELINE").ok().map(|bin| {
        let b = [
            Mailwarden::start_binary(&bin, &format!("{rules}{internal}{rsa_key}")),
            Mailwarden::start_binary(&bin, &format!("{rules}{internal}{ed_key}")),
        ];
        for d in &b {
            seed(d);
        }
        b
    });
    let mut setups = setups;
    if let Some([b_rsa, b_ed]) = &base {
        setups.push(Setup::milter("baseline RSA-2048", b_rsa));
        setups.push(Setup::milter("baseline Ed25519", b_ed));
    }
    let setups = only(setups);
    run_suite(&setups, rounds, messages, sessions, size);
    drop(setups);
    drop(od);
    drop(odu);
    let _ = std::fs::remove_dir_all(&dir);
}

struct OpenDkim {
    child: std::process::Child,
    addr: String,
}

impl OpenDkim {
    /// OpenDKIM (Debian's `opendkim`) as a signing milter with the same RSA key,
    /// relaxed/relaxed, signing mail from 127.0.0.0/8 like mailwarden's internal_networks.
    fn start(dir: &std::path::Path, key: &std::path::Path) -> OpenDkim {
        Self::start_on(dir, key, false)
    }

    /// `unix`: on a Unix-domain socket in `dir` (mode 0666 through `UMask 000`) instead of
    /// loopback TCP.
    fn start_on(dir: &std::path::Path, key: &std::path::Path, unix: bool) -> OpenDkim {
        let bin = find_program("opendkim", &["/usr/sbin"]);
        let port = free_port();
        let sock = dir.join(format!("opendkim-{port}.sock"));
        let (socket, addr) = if unix {
            (
                format!("local:{}", sock.display()),
                format!("unix:{}", sock.display()),
            )
        } else {
            (
                format!("inet:{port}@127.0.0.1"),
                format!("inet:127.0.0.1:{port}"),
            )
        };
        let conf = dir.join(format!("opendkim-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "Mode s\nSocket {socket}\nUMask 000\nDomain mpt.gov.la\nSelector rsa\nKeyFile {}\n\
                 Canonicalization relaxed/relaxed\nInternalHosts 127.0.0.0/8\nSyslog no\nBackground no\n",
                key.display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .args(["-f", "-x"])
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn opendkim");
        wait_for("opendkim to listen", Duration::from_secs(20), || {
            if unix {
                std::os::unix::net::UnixStream::connect(&sock)
                    .ok()
                    .map(drop)
            } else {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            }
        });
        OpenDkim { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OpenDkim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `MAILWARDEN_BENCH_ONLY=word,word`: keep the two baselines (the first two setups) and the
/// setups whose name contains one of the words (`=name`: exactly that name); for profiling one
/// configuration at a time.
fn only(setups: Vec<Setup>) -> Vec<Setup> {
    let Ok(words) = std::env::var("MAILWARDEN_BENCH_ONLY") else {
        return setups;
    };
    let words: Vec<&str> = words.split(',').filter(|w| !w.is_empty()).collect();
    setups
        .into_iter()
        .enumerate()
        .filter(|(i, s)| {
            *i < 2
                || words.iter().any(|w| match w.strip_prefix('=') {
                    Some(exact) => s.name == exact,
                    None => s.name.contains(w),
                })
        })
        .map(|(_, s)| s)
        .collect()
}

fn run_suite(setups: &[Setup], rounds: usize, messages: u64, sessions: u32, size: u32) {
    println!(
        "smtp-source -s {sessions} -m {messages} -l {size}; {rounds} interleaved round(s); \
         rate = messages / time until the sink has them all"
    );
    // Warm-up: one small run each (process pools, caches, connections).
    for s in setups {
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
    let second_rate = median(results[1].iter().map(|r| r.delivered_rate).collect());
    println!(
        "| setup | delivered msg/s | vs {} | vs {} | daemon CPU ms/msg |\n|---|---|---|---|---|",
        setups[0].name, setups[1].name
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
            rate / second_rate,
            if cpu.is_empty() {
                "-".into()
            } else {
                format!("{:.3}", median(cpu))
            }
        );
    }
}
