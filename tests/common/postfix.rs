//! A private Postfix instance for one test, relaying everything to an smtp-sink that dumps
//! each delivered message to a file.
//!
//! The instance has its own config directory, queue, data directory, log file and ports, so
//! tests run in parallel and never touch the system Postfix. `postfix -c DIR start` accepts a
//! non-default config directory without `alternate_config_directories` when run by root (the
//! e2e tests need root, as CI has). mailwarden is wired in with the operator snippets from
//! `deploy/postfix/`, read from disk, with only the address substituted.

use super::process::{self, TestDir, find_program, free_port, tail, wait_for};
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// How Postfix is connected to mailwarden.
#[derive(Debug, Clone)]
pub enum Wiring {
    /// No mailwarden at all: proves the harness itself.
    Bare,
    /// `deploy/postfix/main.cf.policy` with the policy listener's address.
    Policy(String),
    /// `deploy/postfix/main.cf.milter` with the milter listener's address.
    Milter(String),
    /// Both snippets: the policy service (first address) and the milter (second).
    Both(String, String),
    /// `deploy/postfix/main.cf.both` (for mailwarden with `server.milter_envelope =
    /// "policy"`): the policy service (first address) at RCPT, the milter (second).
    BothByPolicy(String, String),
}

/// What the sink does with delivered mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkMode {
    /// Dump every message to a file (tests read them back).
    Dump,
    /// Only count deliveries (benchmarks: no file I/O per message).
    Count,
}

/// The address each snippet is written for (mailwarden's defaults); tests replace it.
const POLICY_DEFAULT: &str = "inet:127.0.0.1:10040";
const MILTER_DEFAULT: &str = "inet:127.0.0.1:8891";

/// One message as smtp-sink received it from Postfix.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Envelope sender (without angle brackets).
    pub mail_from: String,
    /// Envelope recipients in RCPT order (without angle brackets).
    pub rcpts: Vec<String>,
    /// The whole dump: smtp-sink's X- lines, then the message.
    pub text: String,
}

pub struct Postfix {
    /// `127.0.0.1:PORT` of the instance's smtpd.
    pub server: String,
    master_pid: u32,
    sink: Sink,
    dir: TestDir,
}

/// The smtp-sink process; killed when dropped (also when Postfix fails to start).
struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn snippet(wiring: &Wiring) -> String {
    let (file, addrs): (&str, Vec<(&str, &String)>) = match wiring {
        Wiring::Bare => return String::new(),
        Wiring::Both(policy, milter) => {
            return snippet(&Wiring::Policy(policy.clone()))
                + &snippet(&Wiring::Milter(milter.clone()));
        }
        Wiring::Policy(a) => ("main.cf.policy", vec![(POLICY_DEFAULT, a)]),
        Wiring::Milter(a) => ("main.cf.milter", vec![(MILTER_DEFAULT, a)]),
        Wiring::BothByPolicy(policy, milter) => (
            "main.cf.both",
            vec![(POLICY_DEFAULT, policy), (MILTER_DEFAULT, milter)],
        ),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/postfix")
        .join(file);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (default, addr) in addrs {
        let live = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains(default))
            .count();
        assert!(
            live >= 1,
            "{} no longer wires {default} in a main.cf line; update the harness",
            path.display()
        );
        text = text.replace(default, addr);
    }
    format!(
        "\n# ---- {} (addresses replaced by the test) ----\n{text}",
        path.display(),
    )
}

fn main_cf(dir: &Path, sink_port: u16, wiring: &Wiring, extra: &str) -> String {
    let d = dir.display();
    format!(
        "# Private test instance: nothing here touches the system Postfix.
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
syslog_name = postfix-e2e
myhostname = mx.e2e.test
mydomain = e2e.test
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# Everything goes to the sink by IP literal: no DNS anywhere.
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
# Delivered-or-not is known quickly.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
{}
{extra}",
        snippet(wiring)
    )
}

/// Only the services a relay needs, none chrooted; with `chroot`, smtpd and cleanup (the two
/// that talk to milters and policy services) run chrooted in the queue directory as in
/// Debian's default master.cf.
fn master_cf(smtp_port: u16, chroot: bool) -> String {
    let c = if chroot { "y" } else { "n" };
    format!(
        "127.0.0.1:{smtp_port} inet n - {c} - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       {c}       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
    )
}

/// Starts smtp-sink on a free port; retries when another process took the port first.
fn start_sink(dir: &TestDir, mode: SinkMode) -> (Sink, u16) {
    let sink_bin = find_program("smtp-sink", &["/usr/sbin", "/usr/lib/postfix/sbin"]);
    let dump = dir.join("sink");
    std::fs::create_dir_all(&dump).expect("mkdir sink");
    chown_postfix(&dump);
    for _ in 0..10 {
        let port = free_port();
        let log = std::fs::File::create(dir.join("sink.log")).expect("sink log");
        let mut cmd = Command::new(&sink_bin);
        // smtp-sink refuses to run as root without -u; the dump dir belongs to postfix.
        cmd.args(["-u", "postfix"]);
        match mode {
            SinkMode::Dump => cmd.arg("-d").arg(dump.join("msg.")),
            // -c prints "sess=N quit=N mesg=N\r" after every delivery (see sink_count()).
            SinkMode::Count => cmd.arg("-c"),
        };
        let mut sink = Sink(
            cmd.arg(format!("127.0.0.1:{port}"))
                .arg("64")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", sink_bin.display())),
        );
        // smtp-sink has no readiness signal: it is ready once it accepts a connection, and
        // it exits at once if the port was taken.
        let up = wait_for("smtp-sink to listen", Duration::from_secs(10), || {
            if sink.0.try_wait().expect("try_wait").is_some() {
                return Some(false);
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| true)
        });
        if up {
            return (sink, port);
        }
    }
    panic!(
        "smtp-sink did not start: {}",
        tail(&dir.join("sink.log"), 2000)
    );
}

fn chown_postfix(p: &Path) {
    let st = Command::new("chown")
        .arg("postfix")
        .arg(p)
        .status()
        .expect("run chown");
    assert!(st.success(), "chown postfix {}", p.display());
}

impl Postfix {
    /// Starts a private instance wired as asked, with its sink; returns once smtpd listens
    /// (`postfix start` waits for the master's initialisation, which binds the port).
    pub fn start(wiring: Wiring) -> Postfix {
        Postfix::start_with(wiring, "")
    }

    /// [`start`](Self::start) with `extra` lines appended to main.cf (e.g.
    /// `smtpd_authorized_xclient_hosts = 127.0.0.1` so swaks can simulate a SASL login).
    pub fn start_with(wiring: Wiring, extra: &str) -> Postfix {
        Postfix::start_full(wiring, extra, SinkMode::Dump)
    }

    /// The general form: `extra` main.cf lines and what the sink does with mail.
    pub fn start_full(wiring: Wiring, extra: &str, sink_mode: SinkMode) -> Postfix {
        Postfix::start_inner(wiring, extra, sink_mode, false)
    }

    /// [`start_with`](Self::start_with) with smtpd and cleanup chrooted in the queue
    /// directory ([`spool`](Self::spool)), as Debian runs them: a `unix:` path in main.cf is
    /// then resolved inside it.
    pub fn start_chrooted(wiring: Wiring, extra: &str) -> Postfix {
        Postfix::start_inner(wiring, extra, SinkMode::Dump, true)
    }

    /// The queue directory (the chroot of chrooted services).
    pub fn spool(&self) -> std::path::PathBuf {
        self.dir.join("spool")
    }

    fn start_inner(wiring: Wiring, extra: &str, sink_mode: SinkMode, chroot: bool) -> Postfix {
        assert!(
            rustix::process::geteuid().is_root(),
            "the Postfix end-to-end tests start private Postfix instances and need root; \
             run `bash .ci/run` (or `cargo test`) as root on a machine with postfix and swaks"
        );
        let dir = TestDir::new("mw-e2e-postfix-");
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        chown_postfix(&dir.join("data"));
        let (sink, sink_port) = start_sink(&dir, sink_mode);
        let postfix_bin = find_program("postfix", &["/usr/sbin"]);
        let etc = dir.join("etc");
        std::fs::write(
            etc.join("main.cf"),
            main_cf(dir.path(), sink_port, &wiring, extra),
        )
        .expect("write main.cf");

        for attempt in 1..=5 {
            let smtp_port = free_port();
            std::fs::write(etc.join("master.cf"), master_cf(smtp_port, chroot))
                .expect("write master.cf");
            let out = Command::new(&postfix_bin)
                .arg("-c")
                .arg(&etc)
                .arg("start")
                .stdin(Stdio::null())
                .output()
                .expect("run postfix start");
            if out.status.success() {
                let pid_file = dir.join("spool/pid/master.pid");
                let pid = std::fs::read_to_string(&pid_file)
                    .unwrap_or_else(|e| panic!("read {}: {e}", pid_file.display()));
                let master_pid = pid.trim().parse().expect("master.pid holds a pid");
                return Postfix {
                    server: format!("127.0.0.1:{smtp_port}"),
                    master_pid,
                    sink,
                    dir,
                };
            }
            let log = tail(&dir.join("maillog"), 4000);
            // Another test may have taken the port between free_port() and the bind.
            if attempt < 5 && log.contains("Address already in use") {
                continue;
            }
            panic!(
                "postfix -c {} start failed ({}):\n{}{}\nmaillog:\n{log}",
                etc.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        }
        unreachable!("the loop returns or panics")
    }

    /// Messages the sink has accepted so far (with [`SinkMode::Count`]).
    pub fn sink_count(&self) -> u64 {
        let out = std::fs::read(self.dir.join("sink.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&out);
        text.rsplit("mesg=")
            .next()
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Postfix's own log (smtpd, cleanup, qmgr, smtp lines).
    pub fn maillog(&self) -> String {
        tail(&self.dir.join("maillog"), 64 * 1024)
    }

    /// The message of a delivery without smtp-sink's leading `X-Client-Addr:` ...
    /// `X-Rcpt-Args:` lines (smtp-sink's own `Received:` stays: it is an ordinary trace
    /// header), with CRLF line ends.
    pub fn message_of(d: &Delivery) -> Vec<u8> {
        const SINK: [&str; 5] = [
            "X-Client-Addr: ",
            "X-Client-Proto: ",
            "X-Helo-Args: ",
            "X-Mail-Args: ",
            "X-Rcpt-Args: ",
        ];
        let text = d.text.replace("\r\n", "\n");
        let msg: Vec<&str> = text
            .split('\n')
            .skip_while(|l| SINK.iter().any(|p| l.starts_with(p)))
            .collect();
        msg.join("\r\n").into_bytes()
    }

    /// Every message the sink has received completely so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.join("sink")) else {
            return out;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            // The dump is written while the message arrives; the marker every test message
            // ends with says it is complete.
            if !text.contains(super::smtp::END_MARKER) {
                continue;
            }
            let mut d = Delivery {
                mail_from: String::new(),
                rcpts: Vec::new(),
                text: String::new(),
            };
            for line in text.lines() {
                if line.is_empty() {
                    break;
                }
                let first = |v: &str| {
                    v.split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                };
                if let Some(v) = line.strip_prefix("X-Mail-Args: ") {
                    d.mail_from = first(v);
                } else if let Some(v) = line.strip_prefix("X-Rcpt-Args: ") {
                    d.rcpts.push(first(v));
                }
            }
            d.text = text;
            out.push(d);
        }
        out
    }

    /// Waits until the sink has a message containing `tag` (a unique header value the test
    /// put in) and returns it.
    pub fn wait_delivered(&self, tag: &str) -> Delivery {
        wait_for(
            &format!("delivery of message {tag} to the sink"),
            Duration::from_secs(20),
            || self.deliveries().into_iter().find(|d| d.text.contains(tag)),
        )
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- postfix maillog ({}) ----\n{}",
                self.dir.path().display(),
                self.maillog()
            );
        }
        // SIGTERM makes the master stop its children and exit.
        process::terminate(self.master_pid, Duration::from_secs(10));
        // Then the sink (a field) is killed, then the directory removed.
    }
}
