//! mailwarden as a real process: the binary cargo built for this test run, a config in a
//! temp dir, every listener on 127.0.0.1 port 0 (the real ports come from `--ready-file`).

use super::process::{self, Sig, TestDir, tail, wait_for};
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

/// Admin token with every scope (only ever used against a test daemon).
pub const TOKEN: &str = "e2e-admin-token-not-secret";

/// The addresses mailwarden actually bound, as written to the ready file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Bound {
    pub milter: String,
    pub policy: String,
    pub admin: String,
}

pub struct Mailwarden {
    pub bound: Bound,
    /// The store URL when not the private SQLite file.
    store: Option<String>,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    dir: TestDir,
}

fn config_text(dir: &std::path::Path, store: Option<&str>, rules: &str) -> String {
    config_text_on(dir, store, Listen::Tcp, "", rules)
}

/// Where the test daemon's milter and policy services listen.
#[derive(Clone, Copy)]
enum Listen<'a> {
    /// Free ports on 127.0.0.1.
    Tcp,
    /// Unix-domain sockets in the daemon's directory, mode 0666.
    Unix,
    /// These `[server]` lines (`milter_listen`, `policy_listen`, maybe `socket_mode`).
    At(&'a str),
}

/// The test config, listening as `listen` says, on the store at `store` (else an SQLite
/// file in `dir`).
fn config_text_on(
    dir: &std::path::Path,
    store: Option<&str>,
    listen: Listen,
    server: &str,
    rules: &str,
) -> String {
    let d = dir.display();
    let store = store.map_or_else(|| format!("sqlite:{d}/mw.db"), str::to_owned);
    let listen = match listen {
        Listen::Unix => format!(
            "milter_listen = \"unix:{d}/milter.sock\"\npolicy_listen = \"unix:{d}/policy.sock\"\nsocket_mode = \"0666\""
        ),
        Listen::Tcp => {
            "milter_listen = \"inet:127.0.0.1:0\"\npolicy_listen = \"inet:127.0.0.1:0\"".to_owned()
        }
        Listen::At(lines) => lines.to_owned(),
    };
    format!(
        r#"[server]
{listen}
shutdown_grace = "5s"
{server}

[store]
url = "{store}"

[admin]
listen = "inet:127.0.0.1:0"
audit_log = "{d}/audit.jsonl"

[[admin.tokens]]
name = "e2e"
token = "{TOKEN}"
scopes = ["read", "write", "admin"]

[log]
level = "info"

{rules}
"#
    )
}

impl Mailwarden {
    /// Starts the daemon with `rules` appended to the config (e.g. `[rules.R1]\nmode = "monitor"`)
    /// and waits until it has written its ready file.
    pub fn start(rules: &str) -> Mailwarden {
        Mailwarden::start_env(rules, &[])
    }

    /// [`start`](Self::start) with extra environment variables for the daemon (e.g.
    /// `TOKIO_WORKER_THREADS`, which sizes the runtime when `server.worker_threads` is 0).
    pub fn start_env(rules: &str, env: &[(&str, &str)]) -> Mailwarden {
        Mailwarden::start_full(None, Listen::Tcp, "", rules, env)
    }

    /// [`start_env`](Self::start_env) with extra `[server]` keys (e.g.
    /// `milter_envelope = "policy"`).
    #[allow(dead_code)]
    pub fn start_server(server: &str, rules: &str, env: &[(&str, &str)]) -> Mailwarden {
        Mailwarden::start_full(None, Listen::Tcp, server, rules, env)
    }

    /// [`start`](Self::start) running another build of mailwarden (`bin`), e.g. an earlier
    /// commit's, to measure it beside this one in the same benchmark run.
    #[allow(dead_code)]
    pub fn start_binary(bin: &str, rules: &str) -> Mailwarden {
        Mailwarden::start_full(
            None,
            Listen::Tcp,
            "",
            rules,
            &[("MAILWARDEN_TEST_BINARY", bin)],
        )
    }

    /// [`start`](Self::start) on the store at `url` (e.g. a Redis Cluster shared by several
    /// daemons) instead of a private SQLite file.
    pub fn start_on_store(url: &str, rules: &str) -> Mailwarden {
        Mailwarden::start_full(Some(url), Listen::Tcp, "", rules, &[])
    }

    /// [`start`](Self::start) with the milter and policy listeners on Unix-domain sockets
    /// (`unix:` in Postfix notation) in the daemon's directory, made reachable for Postfix.
    pub fn start_unix(rules: &str) -> Mailwarden {
        Mailwarden::start_full(None, Listen::Unix, "", rules, &[])
    }

    /// [`start`](Self::start) with the milter and policy services where `listen` (`[server]`
    /// lines: `milter_listen`, `policy_listen`, maybe `socket_mode`) puts them, e.g. Unix
    /// sockets inside a chrooted Postfix's queue directory.
    #[allow(dead_code)]
    pub fn start_listening(listen: &str, rules: &str) -> Mailwarden {
        Mailwarden::start_full(None, Listen::At(listen), "", rules, &[])
    }

    fn start_full(
        store: Option<&str>,
        listen: Listen,
        server: &str,
        rules: &str,
        env: &[(&str, &str)],
    ) -> Mailwarden {
        let dir = TestDir::new("mw-e2e-daemon-");
        if matches!(listen, Listen::Unix) {
            // Postfix's smtpd (user postfix) must reach the sockets inside.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod the daemon's directory");
        }
        let config = dir.join("mailwarden.toml");
        std::fs::write(
            &config,
            config_text_on(dir.path(), store, listen, server, rules),
        )
        .expect("write config");
        let ready = dir.join("ready.json");
        let log = dir.join("mailwarden.log");
        let log_file = std::fs::File::create(&log).expect("create log");
        let bin = env
            .iter()
            .find(|(k, _)| *k == "MAILWARDEN_TEST_BINARY")
            .map_or(env!("CARGO_BIN_EXE_mailwarden"), |(_, v)| *v);
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn mailwarden");
        // The ready file appears (atomically, by rename) once every listener is bound.
        let bound = wait_for("mailwarden's ready file", Duration::from_secs(30), || {
            if let Some(st) = child.try_wait().expect("try_wait") {
                panic!(
                    "mailwarden exited before it was ready ({st}):\n{}",
                    tail(&log, 8000)
                );
            }
            let text = std::fs::read_to_string(&ready).ok()?;
            Some(serde_json::from_str::<Bound>(&text).expect("ready file is JSON"))
        });
        Mailwarden {
            bound,
            store: store.map(str::to_owned),
            child: Some(child),
            config,
            log,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT` of the admin API.
    pub fn admin_url(&self) -> String {
        format!("http://{}", inet(&self.bound.admin))
    }

    /// Runs `mailwarden <group> --url ... --token ... <args>` (the admin CLI) against this
    /// daemon.
    pub fn cli(&self, group: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_mailwarden"))
            .arg(group)
            .args(["--url", &self.admin_url(), "--token", TOKEN])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run mailwarden CLI")
    }

    /// Like [`cli`](Self::cli), asserting success; returns stdout.
    pub fn cli_ok(&self, group: &str, args: &[&str]) -> String {
        let out = self.cli(group, args);
        assert!(
            out.status.success(),
            "mailwarden {group} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `/metrics` page of the admin listener.
    pub fn metrics(&self) -> String {
        let body = http_get(&inet(&self.bound.admin), "/metrics");
        assert!(
            body.0 == 200,
            "GET /metrics answered {}: {}",
            body.0,
            body.1
        );
        body.1
    }

    /// The value of one sample on `/metrics` (0 when the series does not exist yet).
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.metrics(), name, labels)
    }

    /// Rewrites the config with `rules`, sends SIGHUP and waits until the daemon reports a
    /// successful reload on `/metrics`.
    pub fn reload(&self, rules: &str) {
        let ok = [("result", "ok")];
        let before = self.sample("mailwarden_config_reloads_total", &ok);
        std::fs::write(
            &self.config,
            config_text(self.dir.path(), self.store.as_deref(), rules),
        )
        .expect("write config");
        assert!(process::signal(self.pid(), Sig::HUP), "mailwarden is gone");
        wait_for("the reload to be applied", Duration::from_secs(10), || {
            (self.sample("mailwarden_config_reloads_total", &ok) > before).then_some(())
        });
    }

    /// Rewrites the config with `rules`, sends SIGHUP and waits until the daemon reports a
    /// refused reload (an invalid file) on `/metrics`.
    pub fn reload_refused(&self, rules: &str) {
        let err = [("result", "error")];
        let before = self.sample("mailwarden_config_reloads_total", &err);
        std::fs::write(
            &self.config,
            config_text(self.dir.path(), self.store.as_deref(), rules),
        )
        .expect("write config");
        assert!(process::signal(self.pid(), Sig::HUP), "mailwarden is gone");
        wait_for("the reload to be refused", Duration::from_secs(10), || {
            (self.sample("mailwarden_config_reloads_total", &err) > before).then_some(())
        });
    }

    /// The daemon's process id (signals; CPU accounting in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait for the exit (SIGKILL after the grace period).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Bounded by the pidfd wait; wait() then reaps it.
            process::terminate(child.id(), Duration::from_secs(10));
            let _ = child.wait();
        }
    }

    /// The embedded store's file (only for a daemon on its default SQLite store).
    #[allow(dead_code)]
    pub fn sqlite_file(&self) -> PathBuf {
        assert!(self.store.is_none(), "this daemon runs on {:?}", self.store);
        self.dir.join("mw.db")
    }

    /// The daemon's log (stderr) so far.
    pub fn log(&self) -> String {
        tail(&self.log, 64 * 1024)
    }

    /// The audit log (`admin.audit_log`) so far; empty if not yet written.
    pub fn audit_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Mailwarden {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- mailwarden log ({}) ----\n{}",
                self.dir.path().display(),
                self.log()
            );
        }
        self.stop();
    }
}

/// `inet:127.0.0.1:PORT` → `127.0.0.1:PORT`.
fn inet(addr: &str) -> String {
    addr.strip_prefix("inet:")
        .unwrap_or_else(|| panic!("{addr} is not an inet: address"))
        .to_owned()
}

/// A plain HTTP/1.1 GET; returns status and body.
fn http_get(host_port: &str, path: &str) -> (u16, String) {
    let mut s =
        TcpStream::connect(host_port).unwrap_or_else(|e| panic!("connect {host_port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Finds `name{labels...} value` in Prometheus/OpenMetrics text, labels in any order.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(&str, &str)> = l
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim_matches('"')))
            .collect();
        if have.len() == labels.len() && labels.iter().all(|want| have.contains(want)) {
            return value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample: {line}"));
        }
    }
    0.0
}
