//! The running daemon: opens the store, binds the listeners, serves until told to stop.
//!
//! `main` drives it from signals (HUP reloads, TERM/INT stop); tests drive it through the
//! same [`Control`] channel, so the whole daemon runs in-process in tests.

use crate::checker::Checker;
use crate::config::{Config, ListenAddr};
use crate::net::Listener;
use crate::store::{self, cache::CachedDirectory};
use crate::telemetry::Metrics;
use anyhow::Context as _;
use std::{path::PathBuf, sync::Arc, time::Duration};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Messages that steer a running daemon.
#[derive(Debug)]
pub enum Control {
    /// Re-read the config file; swap it in if valid (SIGHUP).
    Reload,
    /// Stop accepting, drain open sessions within the grace period, exit (SIGTERM/SIGINT).
    Shutdown,
}

/// Addresses actually bound (useful when the config asked for port 0).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Bound {
    pub milter: Option<String>,
    pub policy: Option<String>,
    pub admin: Option<String>,
}

pub struct Daemon {
    pub checker: Arc<Checker>,
    config_path: Option<PathBuf>,
    milter: Option<Listener>,
    policy: Option<Listener>,
    admin: Option<Listener>,
    bound: Bound,
}

async fn bind(key: &str, addr: &str, mode: u32) -> anyhow::Result<Option<Listener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let a: ListenAddr = addr
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{key}: {e}"))?;
    let l = Listener::bind_with_mode(&a, Some(mode))
        .await
        .with_context(|| format!("{key}: cannot listen on {a}"))?;
    Ok(Some(l))
}

fn describe(l: &Option<Listener>) -> Option<String> {
    l.as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string())
}

impl Daemon {
    /// Opens the store and binds every configured listener. Nothing is served yet.
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Daemon> {
        let store = store::open(&config.store.url)
            .await
            .map_err(|e| anyhow::anyhow!("store.url: {e}"))?;
        let mut metrics = Metrics::new();
        if let Some(stats) = store.stats() {
            metrics.register_store(stats);
        }
        let metrics = Arc::new(metrics);
        let directory = CachedDirectory::new(
            store,
            config.store.cache_ttl,
            config.store.cache_size,
            config.store.timeout,
        );
        // Validated by Config::validate; 0o660 only if called with an unvalidated config.
        let mode = config.server.socket_mode().unwrap_or(0o660);
        let milter = bind("server.milter_listen", &config.server.milter_listen, mode).await?;
        let policy = bind("server.policy_listen", &config.server.policy_listen, mode).await?;
        let admin = bind("admin.listen", &config.admin.listen, mode).await?;
        let bound = Bound {
            milter: describe(&milter),
            policy: describe(&policy),
            admin: describe(&admin),
        };
        let checker = Arc::new(Checker::new(config, directory, metrics));
        Ok(Daemon {
            checker,
            config_path,
            milter,
            policy,
            admin,
            bound,
        })
    }

    pub fn bound(&self) -> &Bound {
        &self.bound
    }

    /// Serves until a `Control::Shutdown` arrives (or the channel closes), then drains.
    pub async fn serve(mut self, mut control: mpsc::Receiver<Control>) -> anyhow::Result<()> {
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let mut servers = tokio::task::JoinSet::new();
        let checker = self.checker.clone();

        if let Some(l) = self.milter.take() {
            servers.spawn(crate::milter::serve(
                l,
                checker.clone(),
                shutdown.clone(),
                sessions.clone(),
            ));
        }
        if let Some(l) = self.policy.take() {
            servers.spawn(crate::policy::serve(
                l,
                checker.clone(),
                shutdown.clone(),
                sessions.clone(),
            ));
        }
        if let Some(l) = self.admin.take() {
            servers.spawn(crate::admin::serve(
                l,
                checker.clone(),
                shutdown.clone(),
                sessions.clone(),
            ));
        }
        tracing::info!(
            milter = self.bound.milter.as_deref().unwrap_or("off"),
            policy = self.bound.policy.as_deref().unwrap_or("off"),
            admin = self.bound.admin.as_deref().unwrap_or("off"),
            store = checker.directory.store().kind(),
            "mailwarden serving"
        );

        let health = tokio::spawn(health_loop(checker.clone(), shutdown.clone()));
        // Owner alerts (R16): webhook deliveries and new-country detection, off the mail path.
        checker
            .alerts
            .start(checker.directory.store().clone(), shutdown.clone());
        // R15 locks found on the mail path raise the owner alert (R16) ...
        checker.add_event_sink(Arc::new(checker.alerts.sender()));
        // ... and are audited; R20 withdraws inactive accounts.
        let (locks_tx, locks_rx) = mpsc::channel(1024);
        checker.add_event_sink(Arc::new(locks_tx));
        let system = tokio::spawn(crate::admin::system::run(
            checker.clone(),
            locks_rx,
            shutdown.clone(),
        ));
        // Changes made through other daemons sharing the store (Redis) reach this cache too.
        if let Some(changes) = checker.directory.store().changes() {
            let (checker, shutdown) = (checker.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = checker.directory.follow_changes(changes) => {}
                }
            });
        }

        loop {
            tokio::select! {
                msg = control.recv() => match msg {
                    Some(Control::Reload) => self.reload(),
                    Some(Control::Shutdown) | None => break,
                },
                Some(res) = servers.join_next() => {
                    // A front-end stopped on its own: that is fatal (its listener failed).
                    let err = match res {
                        Ok(Ok(())) => anyhow::anyhow!("a front-end stopped unexpectedly"),
                        Ok(Err(e)) => anyhow::Error::from(e).context("front-end failed"),
                        Err(e) => anyhow::Error::from(e).context("front-end panicked"),
                    };
                    shutdown.cancel();
                    drain(&sessions, &checker).await;
                    return Err(err);
                }
            }
        }

        tracing::info!("shutting down: no new connections, draining open sessions");
        shutdown.cancel();
        health.abort();
        let _ = system.await;
        while servers.join_next().await.is_some() {}
        drain(&sessions, &checker).await;
        // An alert being posted finishes its attempt (bounded by alerts.webhook_timeout);
        // queued ones and those waiting for a retry are counted as dropped.
        let grace = checker.snapshot().config.server.shutdown_grace;
        if tokio::time::timeout(grace, checker.alerts.stopped())
            .await
            .is_err()
        {
            tracing::warn!("owner alert deliveries still running at exit");
        }
        tracing::info!("mailwarden stopped");
        Ok(())
    }

    fn reload(&self) {
        let Some(path) = &self.config_path else {
            tracing::warn!("reload requested but the daemon was started without a config file");
            return;
        };
        match Config::load(path) {
            Ok(new) => {
                let old = self.checker.snapshot();
                for (key, a, b) in [
                    (
                        "server.milter_listen",
                        &old.config.server.milter_listen,
                        &new.server.milter_listen,
                    ),
                    (
                        "server.policy_listen",
                        &old.config.server.policy_listen,
                        &new.server.policy_listen,
                    ),
                    ("admin.listen", &old.config.admin.listen, &new.admin.listen),
                    ("store.url", &old.config.store.url, &new.store.url),
                    (
                        "server.worker_threads",
                        &old.config.server.worker_threads.to_string(),
                        &new.server.worker_threads.to_string(),
                    ),
                ] {
                    if a != b {
                        // store.url may carry a Redis password: never log it.
                        let (a, b) = (store::redact_url(a), store::redact_url(b));
                        tracing::warn!(key, old = %a, new = %b, "changing this key needs a restart; keeping the old value");
                    }
                }
                let mut new = new;
                // The admin API's certificate is read again (renewed in place, or new paths);
                // switching TLS on or off needs a restart (the CLI's scheme follows it).
                if old.config.admin.tls_cert.is_some() != new.admin.tls_cert.is_some() {
                    tracing::warn!(
                        key = "admin.tls_cert",
                        "turning the admin API's TLS on or off needs a restart; keeping the old setting"
                    );
                    new.admin.tls_cert = old.config.admin.tls_cert.clone();
                    new.admin.tls_key = old.config.admin.tls_key.clone();
                } else if let (Some(cert), Some(key)) = (&new.admin.tls_cert, &new.admin.tls_key) {
                    if let Err(e) = crate::admin::tls_server_config(cert, key) {
                        self.checker.metrics.count_reload(false);
                        tracing::error!("configuration not reloaded: {e}");
                        return;
                    }
                }
                new.server.milter_listen = old.config.server.milter_listen.clone();
                new.server.policy_listen = old.config.server.policy_listen.clone();
                new.admin.listen = old.config.admin.listen.clone();
                new.store.url = old.config.store.url.clone();
                self.checker.replace_config(new);
                self.checker.metrics.count_reload(true);
                tracing::info!(file = %path.display(), "configuration reloaded");
            }
            Err(errors) => {
                self.checker.metrics.count_reload(false);
                for e in &errors.errors {
                    tracing::error!(key = %e.key, "configuration not reloaded: {}", e.reason);
                }
            }
        }
    }
}

async fn drain(sessions: &TaskTracker, checker: &Checker) {
    sessions.close();
    let grace = checker.snapshot().config.server.shutdown_grace;
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!(
            open = sessions.len(),
            "grace period of {grace:?} over; closing remaining sessions (the MTA will retry them)"
        );
    }
    // What the store counts in memory (the embedded store's sending counters) is written
    // before the process exits: a stop or restart loses no count.
    if let Err(e) = checker.directory.store().flush().await {
        tracing::error!("sending counters not written to the store at shutdown: {e}");
    }
}

/// Pings the store every few seconds for the `store_up` gauge.
async fn health_loop(checker: Arc<Checker>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let timeout = checker.snapshot().config.store.timeout;
        let ok = matches!(
            tokio::time::timeout(timeout, checker.directory.store().ping()).await,
            Ok(Ok(()))
        );
        checker.metrics.set_store_up(ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config on the embedded store in `dir`, the admin API on HTTPS with `cert`/`key`.
    fn config_text(dir: &std::path::Path, cert: &str, key: &str) -> String {
        format!(
            "[server]\nmilter_listen = \"\"\npolicy_listen = \"inet:127.0.0.1:0\"\n\
             [store]\nurl = \"sqlite:{d}/store.db\"\n\
             [admin]\nlisten = \"inet:127.0.0.1:0\"\naudit_log = \"{d}/audit.jsonl\"\n\
             tls_cert = \"{d}/{cert}\"\ntls_key = \"{d}/{key}\"\n",
            d = dir.display()
        )
    }

    /// A reload whose admin certificate does not load is refused as a whole (the key named
    /// in the log, counted), and the configuration in force stays; a good one is taken.
    #[tokio::test]
    async fn a_reload_with_an_unloadable_admin_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
        let path = dir.path().join("mailwarden.toml");
        std::fs::write(&path, config_text(dir.path(), "cert.pem", "key.pem")).unwrap();
        let daemon = Daemon::start(Config::load(&path).unwrap(), Some(path.clone()))
            .await
            .unwrap();
        let reloads = |result: &str| {
            let text = daemon.checker.metrics.encode();
            let needle = format!("mailwarden_config_reloads_total{{result=\"{result}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(needle.as_str()))
                .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
        };

        std::fs::write(&path, config_text(dir.path(), "bad.pem", "key.pem")).unwrap();
        let before = daemon.checker.snapshot();
        daemon.reload();
        assert_eq!(reloads("error"), 1.0);
        assert!(Arc::ptr_eq(&before, &daemon.checker.snapshot()), "kept");

        std::fs::write(&path, config_text(dir.path(), "cert.pem", "key.pem")).unwrap();
        daemon.reload();
        assert_eq!(reloads("ok"), 1.0);
        assert!(
            !Arc::ptr_eq(&before, &daemon.checker.snapshot()),
            "swapped in"
        );
    }
}
