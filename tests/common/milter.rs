//! Test support: a milter spawned on 127.0.0.1:0 over the seeded test store
//! ([`super::store`]), and log capture.

#![allow(dead_code)]

use super::store::TestStore;
use mailwarden::{
    checker::Checker,
    config::{Config, ListenAddr},
    net::Listener,
};
use std::{
    io,
    sync::{Arc, Mutex},
};
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A checker over `store` with the config `config_toml`.
pub fn checker(config_toml: &str, store: Arc<TestStore>) -> Arc<Checker> {
    super::checker(
        Config::from_toml(config_toml).expect("test config is valid"),
        store,
    )
}

/// A milter served on a fresh listener, stopped like the daemon stops it.
pub struct Milter {
    pub addr: ListenAddr,
    pub checker: Arc<Checker>,
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
    pub serve: JoinHandle<io::Result<()>>,
}

impl Milter {
    pub async fn spawn(config_toml: &str, store: Arc<TestStore>) -> Milter {
        Self::spawn_with(config_toml, store, Default::default()).await
    }

    pub async fn spawn_with(
        config_toml: &str,
        store: Arc<TestStore>,
        features: mailwarden::milter::Features,
    ) -> Milter {
        let listener = Listener::bind(&"inet:127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self::serve_on(listener, checker(config_toml, store), features)
    }

    pub fn serve_on(
        listener: Listener,
        checker: Arc<Checker>,
        features: mailwarden::milter::Features,
    ) -> Milter {
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let serve = tokio::spawn(mailwarden::milter::serve_with(
            listener,
            checker.clone(),
            shutdown.clone(),
            sessions.clone(),
            features,
        ));
        Milter {
            addr,
            checker,
            shutdown,
            sessions,
            serve,
        }
    }

    /// Stops the milter as the daemon does ([`super::stop`]).
    pub async fn stop(self) {
        super::stop(&self.shutdown, self.serve, &self.sessions).await;
    }
}

/// Captures log output of the current thread (tests run on a current-thread runtime, so
/// the milter's tasks log here too).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(sub)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Lines mentioning `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}
