//! The service both front-ends call: looks up the directory facts a stage needs, asks the
//! pure engine, and records the decision (log + metrics). Protocol code stays free of policy;
//! the engine stays free of I/O.

use crate::config::Config;
use crate::engine::{self, Lookup, Policy};
use crate::model::{Address, Decision, Stage, Transaction};
use crate::store::cache::CachedDirectory;
use crate::telemetry::{self, Metrics};
use arc_swap::ArcSwap;
use std::{sync::Arc, time::Instant};

/// An immutable, validated configuration and what is derived from it. Reload swaps the whole
/// snapshot; a session reads it once per stage.
pub struct Snapshot {
    pub config: Config,
    pub policy: Policy,
}

impl Snapshot {
    pub fn new(config: Config) -> Snapshot {
        let policy = Policy::from_config(&config);
        Snapshot { config, policy }
    }
}

pub struct Checker {
    snapshot: ArcSwap<Snapshot>,
    pub directory: CachedDirectory,
    pub metrics: Arc<Metrics>,
}

impl Checker {
    pub fn new(config: Config, directory: CachedDirectory, metrics: Arc<Metrics>) -> Checker {
        Checker {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            directory,
            metrics,
        }
    }

    /// The configuration in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new validated configuration.
    pub fn replace_config(&self, config: Config) {
        self.snapshot.store(Arc::new(Snapshot::new(config)));
        self.directory.invalidate_all();
    }

    async fn lookup(&self, addr: &Address, operation: &'static str) -> Lookup {
        let r = self.directory.lookup(addr).await;
        if let Err(e) = &r {
            self.metrics.count_store_error(operation);
            tracing::warn!(operation, address = %addr, "directory lookup failed: {}", e.0);
        }
        r
    }

    /// MAIL stage: sender rules.
    pub async fn check_mail(&self, tx: &Transaction) -> Decision {
        let start = Instant::now();
        let snap = self.snapshot();
        let sender = tx.sender.as_ref().and_then(|s| s.address());
        let lookup = match sender {
            Some(a) if snap.policy.any_active(&engine::SENDER_RULES) => {
                Some(self.lookup(a, "lookup_sender").await)
            }
            _ => None,
        };
        let d = engine::check_sender(&snap.policy, tx, lookup.as_ref());
        telemetry::record_decision(&self.metrics, tx, Stage::Mail, &d, start.elapsed());
        d
    }

    /// RCPT stage: recipient rules for `rcpt`.
    pub async fn check_rcpt(&self, tx: &Transaction, rcpt: &Address) -> Decision {
        let start = Instant::now();
        let snap = self.snapshot();
        let d = if snap.policy.any_active(&engine::RECIPIENT_RULES) {
            let lookup = self.lookup(rcpt, "lookup_recipient").await;
            engine::check_recipient(&snap.policy, tx, rcpt, &lookup)
        } else {
            Decision::pass()
        };
        telemetry::record_decision(&self.metrics, tx, Stage::Rcpt, &d, start.elapsed());
        d
    }
}
