//! Test helpers: the admin API served on 127.0.0.1:0 with a real `Checker` over an
//! SQLite store (in a temporary directory), and a client for it.
//!
//! End to end (`tests/postfix_e2e.rs`): [`daemon`] runs mailwarden as a process, [`postfix`]
//! a private Postfix instance wired with the `deploy/postfix/` snippets and an SMTP sink,
//! [`smtp`] sends with swaks; [`process`] has the signal and wait plumbing.
//!
//! Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod daemon;
pub mod dkim;
pub mod flaky;
pub mod milter;
pub mod postfix;
pub mod process;
pub mod smtp;

use flaky::FlakyStore;
use mailwarden::checker::Checker;
use mailwarden::config::{Config, ListenAddr, Scope, TokenConfig};
use mailwarden::net::Listener;
use mailwarden::store::cache::CachedDirectory;
use mailwarden::telemetry::Metrics;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub const READ: &str = "read-token-0123456789";
pub const WRITE: &str = "write-token-0123456789";
pub const ADMIN: &str = "admin-token-0123456789";

fn token(name: &str, secret: &str, scope: Scope) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: Some(secret.into()),
        token_file: None,
        scopes: vec![scope],
    }
}

/// A config with three tokens (`auditor`: read, `registrar`: write, `security`: admin) and
/// the audit log in `dir`.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.admin.audit_log = dir.join("audit.jsonl");
    c.admin.tokens = vec![
        token("auditor", READ, Scope::Read),
        token("registrar", WRITE, Scope::Write),
        token("security", ADMIN, Scope::Admin),
    ];
    // Long enough that only an explicit invalidation can make a change visible in a test.
    c.store.cache_ttl = Duration::from_secs(3600);
    c
}

pub struct Api {
    pub url: String,
    pub checker: Arc<Checker>,
    pub store: Arc<FlakyStore>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    task: JoinHandle<std::io::Result<()>>,
}

impl Api {
    pub async fn start() -> Api {
        Api::start_with(|_, _| {}).await
    }

    /// Starts the API; `tweak` may change the config (and put files in the directory).
    pub async fn start_with(tweak: impl FnOnce(&mut Config, &Path)) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        tweak(&mut cfg, dir.path());
        let tls = cfg.admin.tls_cert.is_some();
        let ca = tls.then(|| dir.path().join("cert.pem"));
        let store = Arc::new(FlakyStore::open(&dir.path().join("mailwarden.db")).await);
        let directory = CachedDirectory::new(
            store.clone(),
            cfg.store.cache_ttl,
            cfg.store.cache_size,
            cfg.store.timeout,
        );
        let checker = Arc::new(Checker::new(cfg, directory, Arc::new(Metrics::new())));
        let listener = Listener::bind(&ListenAddr::Inet("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let ListenAddr::Inet(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let task = tokio::spawn(mailwarden::admin::serve(
            listener,
            checker.clone(),
            shutdown.clone(),
            sessions.clone(),
        ));
        let scheme = if tls { "https" } else { "http" };
        Api {
            url: format!("{scheme}://{addr}"),
            checker,
            store,
            http: mailwarden::admin::cli::http_client(ca.as_deref(), tls).unwrap(),
            dir,
            shutdown,
            sessions,
            task,
        }
    }

    /// Stops the server and checks that it stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let res = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("admin server stops when cancelled");
        res.unwrap().expect("serve returns Ok on shutdown");
        self.sessions.close();
        tokio::time::timeout(Duration::from_secs(10), self.sessions.wait())
            .await
            .expect("connections drain");
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub fn audit_path(&self) -> PathBuf {
        self.checker.snapshot().config.admin.audit_log.clone()
    }

    /// The audit log's records (none when the file does not exist yet).
    pub fn audit(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.audit_path()) {
            Ok(t) => t
                .lines()
                .map(|l| serde_json::from_str(l).expect("each audit line is JSON"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Registers organisation `mpt` (mpt.gov.la).
    pub async fn mpt(&self) {
        let (s, b) = self
            .post(
                "/v1/orgs",
                WRITE,
                serde_json::json!({"code": "mpt", "name": "Ministry of Posts and Telecommunications"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
}
