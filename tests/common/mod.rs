//! Test helpers: the admin API served on 127.0.0.1:0 with a real `Checker` over the test
//! store, and a client for it. [`store`] is the one store the in-process tests use (the real
//! SQLite store behind fault switches) and the directory they seed; [`milter`] serves the
//! milter over it.
//!
//! End to end (`tests/postfix_e2e.rs`): [`daemon`] runs mailwarden as a process, [`postfix`]
//! a private Postfix instance wired with the `deploy/postfix/` snippets and an SMTP sink,
//! [`smtp`] sends with swaks; [`process`] has the signal and wait plumbing.
//!
//! Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod daemon;
pub mod dkim;
pub mod dns;
pub mod dovecot;
pub mod milter;
pub mod mmdb;
pub mod postfix;
pub mod process;
pub mod readme;
pub mod smtp;
pub mod store;
pub mod webhook;

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
use store::TestStore;
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

/// A checker over `store` (through the directory cache the daemon uses) with `config`.
pub fn checker(config: Config, store: Arc<TestStore>) -> Arc<Checker> {
    let directory = CachedDirectory::new(
        store,
        config.store.cache_ttl,
        config.store.cache_size,
        config.store.timeout,
    );
    Arc::new(Checker::new(config, directory, Arc::new(Metrics::new())))
}

/// Stops a front-end the way the daemon does: cancels `shutdown`, checks that `serve`
/// returns `Ok`, then drains `sessions`. Each wait is bounded, so a broken shutdown fails the
/// test instead of hanging it.
pub async fn stop(
    shutdown: &CancellationToken,
    serve: JoinHandle<std::io::Result<()>>,
    sessions: &TaskTracker,
) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), serve)
        .await
        .expect("serve returns when cancelled")
        .unwrap()
        .expect("serve returns Ok on shutdown");
    sessions.close();
    tokio::time::timeout(Duration::from_secs(10), sessions.wait())
        .await
        .expect("sessions drain");
}

pub struct Api {
    pub url: String,
    pub checker: Arc<Checker>,
    pub store: Arc<TestStore>,
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
        let store = Arc::new(TestStore::new().await);
        let checker = checker(cfg, store.clone());
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

    /// Starts the API over HTTPS with a fresh self-signed certificate for 127.0.0.1, which
    /// `http` trusts; the certificate is `cert.pem` in `dir`.
    pub async fn start_tls() -> Api {
        Api::start_with(|c, dir| {
            let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
            std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
            std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
            c.admin.tls_cert = Some(dir.join("cert.pem"));
            c.admin.tls_key = Some(dir.join("key.pem"));
        })
        .await
    }

    /// Stops the server and checks that it stopped cleanly.
    pub async fn stop(self) {
        stop(&self.shutdown, self.task, &self.sessions).await;
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
