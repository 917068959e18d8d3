//! Real Redis deployments for the tests, from Debian's `redis-server` / `redis-sentinel`:
//! a standalone server, a TLS server, Sentinel (1 primary, 1 replica, 3 sentinels) and
//! Cluster (3 primaries), all on 127.0.0.1, in a temporary directory, without persistence.
//!
//! Redis cannot listen on port 0 and report the port it got, so each server gets a port
//! the OS just handed out (bind 127.0.0.1:0, read it, release it); if another process grabs
//! it in between, the server exits at once and is started again on another port.
//! Readiness is polled (PING, `CLUSTER INFO`, `SENTINEL ...`) against a deadline; every
//! process is killed by its PID when its handle drops, also when a test panics.

use ::redis::{Client, Cmd, FromRedisValue, RedisResult, cmd};
use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Weak},
    time::Duration,
};
use tempfile::TempDir;
use tokio::time::{Instant, sleep};

/// How long a deployment may take to become ready.
const READY: Duration = Duration::from_secs(20);
/// Interval between readiness polls.
const POLL: Duration = Duration::from_millis(20);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// One server process, killed on drop.
pub struct Process {
    child: Option<Child>,
    pub port: u16,
}

impl Process {
    /// Kills the process (SIGKILL: no shutdown, no goodbye to clients) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(program: &str, args: &[String], dir: &Path, log: &str) -> Child {
    let out = File::create(dir.join(log)).expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {program}: {e}; install the Debian packages redis-server, \
                 redis-sentinel and redis-tools (.ci/run does)"
            )
        })
}

/// The common arguments of a data node: loopback only, no persistence, in `dir`.
fn server_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        dir.to_str().expect("UTF-8 temp dir"),
    ]
    .map(String::from)
    .into()
}

pub fn client(port: u16) -> Client {
    Client::open(format!("redis://127.0.0.1:{port}/")).expect("client")
}

/// One command on a fresh connection (setup and inspection only).
pub async fn query<T: FromRedisValue>(port: u16, c: &Cmd) -> RedisResult<T> {
    let mut conn = client(port).get_multiplexed_async_connection().await?;
    c.query_async(&mut conn).await
}

/// How many of `replicas` replicas of the primary on `port` have every write the primary
/// acknowledged so far, waiting up to `timeout_ms`. `WAIT` only waits for the writes of the
/// connection it is sent on (a fresh connection has none, and returns at once), so a marker
/// is written first on the same connection: the replication stream is ordered, and a replica
/// that has the marker has every write before it.
pub async fn replicated(port: u16, replicas: usize, timeout_ms: u64) -> RedisResult<i64> {
    let mut conn = client(port).get_multiplexed_async_connection().await?;
    let _: i64 = cmd("INCR")
        .arg("mw-test:replication-barrier")
        .query_async(&mut conn)
        .await?;
    cmd("WAIT")
        .arg(replicas)
        .arg(timeout_ms)
        .query_async(&mut conn)
        .await
}

/// Polls `probe` until it returns `Some`, the process exits, or the deadline passes.
async fn until<T, F, Fut>(what: &str, proc: &mut Process, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + READY;
    loop {
        if let Some(status) = proc.exited() {
            return Err(format!("{what}: process exited ({status})"));
        }
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            panic!("{what}: not ready within {READY:?}");
        }
        sleep(POLL).await;
    }
}

/// Ready when it answers PING, or refuses it for want of a password (`--requirepass`).
async fn answers_ping(port: u16) -> Option<()> {
    match query::<String>(port, &cmd("PING")).await {
        Ok(pong) => (pong == "PONG").then_some(()),
        Err(e) => (e.code() == Some("NOAUTH")).then_some(()),
    }
}

/// Starts `program` with the arguments `args(port)` on a fresh port until it answers PING
/// (a few attempts, in case another process took the port first).
async fn start(
    program: &str,
    dir: &Path,
    name: &str,
    args: impl Fn(u16) -> Vec<String>,
) -> Process {
    let mut last = String::new();
    for attempt in 0..5 {
        let port = free_port();
        let child = spawn(program, &args(port), dir, &format!("{name}-{attempt}.log"));
        let mut proc = Process {
            child: Some(child),
            port,
        };
        match until(name, &mut proc, || answers_ping(port)).await {
            Ok(()) => return proc,
            Err(e) => last = e,
        }
    }
    panic!("{name}: could not start: {last}");
}

// ---------------------------------------------------------------------------------------

/// A standalone server, optionally with extra arguments.
pub struct Standalone {
    pub server: Process,
    pub dir: TempDir,
}

impl Standalone {
    pub async fn start(extra: &[&str]) -> Standalone {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let server = start("redis-server", &path, "redis", |port| {
            let mut args = server_args(port, &path);
            args.extend(extra.iter().cloned());
            args
        })
        .await;
        Standalone { server, dir }
    }

    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// Starts a server again on the same port and directory (after `server.kill()`).
    pub async fn restart(&mut self) {
        let port = self.server.port;
        let path = self.dir.path().to_owned();
        let child = spawn(
            "redis-server",
            &server_args(port, &path),
            &path,
            "again.log",
        );
        self.server = Process {
            child: Some(child),
            port,
        };
        until("redis again", &mut self.server, || answers_ping(port))
            .await
            .unwrap();
    }
}

/// A server speaking only TLS, with a certificate for 127.0.0.1 from a CA made here.
pub struct Tls {
    pub server: Process,
    pub ca_file: PathBuf,
    _dir: TempDir,
}

impl Tls {
    pub async fn start() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let write = |name: &str, pem: String| {
            let p = path.join(name);
            std::fs::write(&p, pem).unwrap();
            p.to_str().unwrap().to_owned()
        };
        let ca_file = write("ca.pem", ca.pem());
        let cert_file = write("server.pem", cert.pem());
        let key_file = write("server.key", key.serialize_pem());

        let mut last = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let mut args = server_args(0, &path);
            args.extend(
                [
                    "--tls-port",
                    &port.to_string(),
                    "--tls-cert-file",
                    &cert_file,
                    "--tls-key-file",
                    &key_file,
                    "--tls-ca-cert-file",
                    &ca_file,
                    "--tls-auth-clients",
                    "no",
                ]
                .map(String::from),
            );
            let child = spawn("redis-server", &args, &path, &format!("tls-{attempt}.log"));
            let mut proc = Process {
                child: Some(child),
                port,
            };
            // Ready when it accepts TCP connections on the TLS port (the store test itself
            // then proves the handshake and the certificate check).
            let ready = until("redis tls", &mut proc, || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(drop)
            })
            .await;
            match ready {
                Ok(()) => {
                    return Tls {
                        server: proc,
                        ca_file: PathBuf::from(ca_file),
                        _dir: dir,
                    };
                }
                Err(e) => last = e,
            }
        }
        panic!("redis tls: could not start: {last}");
    }
}

// ---------------------------------------------------------------------------------------

pub const SERVICE: &str = "mw-test";

/// One primary, one replica, three sentinels (quorum 2).
pub struct Sentinel {
    pub primary: Process,
    pub replica: Process,
    pub sentinels: Vec<Process>,
    _dir: TempDir,
}

impl Sentinel {
    /// `down_after`: how long the primary must be unreachable before the sentinels act.
    /// `settled`: also wait until the replica is in sync and every sentinel knows the
    /// replica and the two other sentinels, i.e. a failover can happen.
    pub async fn start(down_after: Duration, settled: bool) -> Sentinel {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        let primary = start("redis-server", &path, "primary", |p| server_args(p, &path)).await;
        let pp = primary.port;
        let replica = start("redis-server", &path, "replica", |p| {
            let mut args = server_args(p, &path);
            args.extend(["--replicaof", "127.0.0.1", &pp.to_string()].map(String::from));
            args
        })
        .await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let path = path.clone();
            let s = start(
                "redis-sentinel",
                &path.clone(),
                &format!("sentinel{i}"),
                |p| {
                    let conf = path.join(format!("sentinel-{i}-{p}.conf"));
                    std::fs::write(
                        &conf,
                        format!(
                            "port {p}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                         sentinel monitor {SERVICE} 127.0.0.1 {pp} 2\n\
                         sentinel down-after-milliseconds {SERVICE} {down}\n\
                         sentinel failover-timeout {SERVICE} 10000\n\
                         sentinel parallel-syncs {SERVICE} 1\n",
                            dir = path.display(),
                            down = down_after.as_millis(),
                        ),
                    )
                    .unwrap();
                    vec![conf.to_str().unwrap().to_owned()]
                },
            )
            .await;
            sentinels.push(s);
        }
        let mut deployment = Sentinel {
            primary,
            replica,
            sentinels,
            _dir: dir,
        };
        for s in &mut deployment.sentinels {
            let port = s.port;
            until("sentinel knows the primary", s, || async move {
                let addr: Option<(String, u16)> = query(
                    port,
                    cmd("SENTINEL").arg("get-master-addr-by-name").arg(SERVICE),
                )
                .await
                .ok()?;
                (addr == Some(("127.0.0.1".into(), pp))).then_some(())
            })
            .await
            .unwrap();
        }
        if settled {
            let rp = deployment.replica.port;
            until("replica in sync", &mut deployment.replica, || async move {
                let info: String = query(rp, cmd("INFO").arg("replication")).await.ok()?;
                info.contains("master_link_status:up").then_some(())
            })
            .await
            .unwrap();
            for s in &mut deployment.sentinels {
                let port = s.port;
                until("sentinel knows its peers", s, || async move {
                    let replicas: Vec<::redis::Value> =
                        query(port, cmd("SENTINEL").arg("replicas").arg(SERVICE))
                            .await
                            .ok()?;
                    let peers: Vec<::redis::Value> =
                        query(port, cmd("SENTINEL").arg("sentinels").arg(SERVICE))
                            .await
                            .ok()?;
                    (replicas.len() == 1 && peers.len() == 2).then_some(())
                })
                .await
                .unwrap();
            }
        }
        deployment
    }

    /// The sentinels part of a `redis+sentinel://` URL.
    pub fn hosts(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The primary's port according to the first sentinel that answers.
    pub async fn primary_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            let addr: RedisResult<Option<(String, u16)>> = query(
                s.port,
                cmd("SENTINEL").arg("get-master-addr-by-name").arg(SERVICE),
            )
            .await;
            if let Ok(Some((_, port))) = addr {
                return Some(port);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------

/// Three primaries sharing the 16384 slots, no replicas.
pub struct Cluster {
    pub nodes: Vec<Process>,
    _dir: TempDir,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        let mut nodes = Vec::new();
        let mut buses = Vec::new();
        for i in 0..3 {
            let bus = std::sync::Mutex::new(0);
            let node = start("redis-server", &path, &format!("node{i}"), |p| {
                let b = free_port();
                *bus.lock().unwrap() = b;
                let mut args = server_args(p, &path);
                args.extend(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("nodes-{p}.conf"),
                        "--cluster-port",
                        &b.to_string(),
                        "--cluster-node-timeout",
                        "5000",
                    ]
                    .map(String::from),
                );
                args
            })
            .await;
            buses.push(bus.into_inner().unwrap());
            nodes.push(node);
        }
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (node, (from, to)) in nodes.iter().zip(ranges) {
            let _: () = query(
                node.port,
                cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(from).arg(to),
            )
            .await
            .expect("CLUSTER ADDSLOTSRANGE");
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            let _: () = query(
                nodes[0].port,
                cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(node.port)
                    .arg(*bus),
            )
            .await
            .expect("CLUSTER MEET");
        }
        for node in &mut nodes {
            let port = node.port;
            until("cluster state ok", node, || async move {
                let info: String = query(port, cmd("CLUSTER").arg("INFO")).await.ok()?;
                (info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3"))
                    .then_some(())
            })
            .await
            .unwrap();
        }
        Cluster { nodes, _dir: dir }
    }

    pub fn hosts(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

// ---------------------------------------------------------------------------------------

/// A deployment shared by the tests running at the same time: started by the first, stopped
/// when the last one drops its handle. Tests keep their data apart with a key prefix.
pub async fn shared<T, F, Fut>(slot: &'static tokio::sync::Mutex<Weak<T>>, start: F) -> Arc<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut weak = slot.lock().await;
    if let Some(live) = weak.upgrade() {
        return live;
    }
    let live = Arc::new(start().await);
    *weak = Arc::downgrade(&live);
    live
}
