//! The service both front-ends call: looks up the directory facts a stage needs, asks the
//! pure engine, and records the decision (log + metrics). Protocol code stays free of policy;
//! the engine stays free of I/O.

use crate::activity::Tracker;
use crate::config::Config;
use crate::config::CountOn;
use crate::config::in_networks;
use crate::dkim::SigningKey;
use crate::engine::rules::compromise as r15;
use crate::engine::rules::dkim::{self as r6, NotSigned, SigningPlan};
use crate::engine::rules::limits::{self as r14, Limits};
use crate::engine::rules::quota as r13;
use crate::engine::{self, Lookup, Policy, StoreFailure};
use crate::events::{AccountLocked, EventSink};
use crate::model::{Action, Address, Decision, Mode, Protocol, RuleId, Stage, Transaction};
use crate::store::cache::CachedDirectory;
use crate::store::{SendLock, StoreResult, Timestamp, WatchOutcome};
use crate::telemetry::{self, Metrics};
use arc_swap::ArcSwap;
use std::{sync::Arc, time::Instant};

/// What the milter does about DKIM for one message (R6), decided once the headers are known.
#[derive(Debug)]
pub struct Signing {
    /// The decision to answer (a tempfail when a local domain has no key).
    pub decision: Decision,
    /// The signing domain and its keys (taken from the snapshot in force now: a reload
    /// during the message does not change them); empty when the message is not signed.
    pub keys: Vec<Arc<SigningKey>>,
    pub domain: Option<String>,
    pub plan: SigningPlan,
}

/// An immutable, validated configuration and what is derived from it (the DKIM keys are in
/// `config.dkim.keyring`, loaded with it). Reload swaps the whole snapshot; a session reads
/// it once per stage.
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
    /// Where account events go (R15 locks; R16's alerts subscribe here).
    events: ArcSwap<Vec<Arc<dyn EventSink>>>,
    /// When this daemon last wrote each account's last use (R20).
    activity: Arc<Tracker>,
}

/// Whether sending is counted on this front-end (sending limits R14 and the sending pattern
/// of R15): one of them active, and counted here (`[rules.R14] count_on`) so that a message
/// seen by both the milter and the policy service is counted once.
fn counts_limits(snap: &Snapshot, protocol: Protocol) -> bool {
    let rule = snap.policy.rule(RuleId::R14);
    if rule.mode == Mode::Off && snap.policy.rule(RuleId::R15).mode == Mode::Off {
        return false;
    }
    let on = match rule.count_on.unwrap_or_default() {
        CountOn::Auto if snap.config.server.policy_listen.is_empty() => Protocol::Milter,
        CountOn::Auto | CountOn::Policy => Protocol::Policy,
        CountOn::Milter => Protocol::Milter,
    };
    on == protocol
}

/// Whose counters a recipient counts against (R14): the SASL login when the client
/// authenticated with an address as login, else the envelope sender. The caller checks
/// that it is local.
fn counted_sender(tx: &Transaction) -> Option<Address> {
    tx.sasl_username
        .as_deref()
        .and_then(|login| Address::parse(login).ok())
        .or_else(|| tx.sender.as_ref().and_then(|s| s.address()).cloned())
}

impl Checker {
    pub fn new(config: Config, directory: CachedDirectory, metrics: Arc<Metrics>) -> Checker {
        let capacity = config.store.cache_size;
        Checker {
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            directory,
            metrics,
            events: ArcSwap::from_pointee(Vec::new()),
            activity: Arc::new(Tracker::new(capacity)),
        }
    }

    /// Adds a receiver of account events (see [`crate::events`]).
    pub fn add_event_sink(&self, sink: Arc<dyn EventSink>) {
        self.events.rcu(|sinks| {
            let mut sinks = Vec::clone(sinks);
            sinks.push(sink.clone());
            sinks
        });
    }

    /// R15 locked `account` just now (found by this daemon's count): log, count, tell the
    /// sinks. Locks made through the admin API are audited and counted there.
    fn account_locked(&self, account: &crate::model::Address, lock: &SendLock) {
        tracing::warn!(
            address = %account,
            cause = lock.cause.kind(),
            "account locked for sending (R15): {}",
            lock.cause
        );
        self.metrics.count_account_lock(lock.cause.kind());
        let event = AccountLocked {
            address: account.clone(),
            lock: lock.clone(),
        };
        for sink in self.events.load().iter() {
            sink.account_locked(&event);
        }
    }

    /// A store call on the mail path, bounded by `store.timeout`; a failure is counted
    /// under `operation` and logged.
    async fn bounded<T>(
        &self,
        snap: &Snapshot,
        operation: &'static str,
        subject: &Address,
        call: impl std::future::Future<Output = StoreResult<T>>,
    ) -> Result<T, StoreFailure> {
        let r = match tokio::time::timeout(snap.config.store.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreFailure(e.to_string())),
            Err(_) => Err(StoreFailure(format!(
                "no answer within {:?}",
                snap.config.store.timeout
            ))),
        };
        if let Err(e) = &r {
            self.metrics.count_store_error(operation);
            tracing::warn!(operation, address = %subject, "store unavailable: {}", e.0);
        }
        r
    }

    /// R20: notes an authenticated use of the SASL login, written to the store in the
    /// background at most once per `[activity] write_interval`.
    fn note_use(&self, snap: &Snapshot, tx: &Transaction, now: Timestamp) {
        let Some(login) = tx
            .sasl_username
            .as_deref()
            .and_then(|l| Address::parse(l).ok())
        else {
            return;
        };
        if !self
            .activity
            .due(&login, now, snap.config.activity.write_interval)
        {
            return;
        }
        let store = self.directory.store().clone();
        let (metrics, tracker) = (self.metrics.clone(), self.activity.clone());
        let timeout = snap.config.store.timeout;
        // In the background: the stage's answer does not wait for this write.
        tokio::spawn(async move {
            let error = match tokio::time::timeout(timeout, store.touch(&login, now)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            // Try again at the account's next use.
            tracker.forget(&login);
            metrics.count_store_error("touch_last_use");
            tracing::warn!(address = %login, "last use not recorded: {error}");
        });
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
        let mut d = engine::check_sender(&snap.policy, tx, lookup.as_ref());
        let now = chrono::Utc::now().timestamp();
        self.note_use(&snap, tx, now);
        // R15's lock. Not read here when this is the policy service and it counts sending:
        // Postfix asks it at RCPT, and the RCPT count that follows reads the lock in the same
        // store call (one round trip per recipient, as R14 alone). Recipients refused by
        // other rules are refused anyway.
        let policy_counts = tx.protocol == Protocol::Policy && counts_limits(&snap, tx.protocol);
        if d.action == Action::Continue
            && !policy_counts
            && snap.policy.rule(RuleId::R15).mode != Mode::Off
        {
            // The account that would send: the SASL login, else a local envelope sender.
            let account = match counted_sender(tx) {
                Some(a) if tx.sasl_username.is_some() => Some(a),
                Some(a) if matches!(&lookup, Some(Ok(f)) if f.is_local()) => Some(a),
                _ => None,
            };
            if let Some(account) = account {
                let store = self.directory.store();
                let lock = self
                    .bounded(&snap, "read_send_lock", &account, store.send_lock(&account))
                    .await;
                let r15 = r15::at_mail(&snap.policy, &account, &lock);
                d.action = r15.action;
                d.outcomes.extend(r15.outcomes);
            }
        }
        telemetry::record_decision(&self.metrics, tx, Stage::Mail, &d, start.elapsed());
        d
    }

    /// RCPT stage: recipient rules for `rcpt`.
    pub async fn check_rcpt(&self, tx: &Transaction, rcpt: &Address) -> Decision {
        let start = Instant::now();
        let snap = self.snapshot();
        let mut d = if snap.policy.any_active(&engine::RECIPIENT_RULES) {
            let lookup = self.lookup(rcpt, "lookup_recipient").await;
            engine::check_recipient(&snap.policy, tx, rcpt, &lookup)
        } else {
            Decision::pass()
        };
        if d.action == Action::Continue && snap.policy.rule(RuleId::R13).mode != Mode::Off {
            let quota = self.check_quota(&snap, tx, rcpt).await;
            d.action = quota.action;
            d.outcomes.extend(quota.outcomes);
        }
        // A refused recipient is not counted against the sender's limits; a permanently
        // refused one counts in R15's share of refused recipients.
        if d.action == Action::Continue && counts_limits(&snap, tx.protocol) {
            let limits = self.check_limits(&snap, tx).await;
            d.action = limits.action;
            d.outcomes.extend(limits.outcomes);
        } else if matches!(d.action, Action::Reject(_))
            && snap.policy.rule(RuleId::R15).mode != Mode::Off
            && counts_limits(&snap, tx.protocol)
        {
            self.count_refused(&snap, tx).await;
        }
        telemetry::record_decision(&self.metrics, tx, Stage::Rcpt, &d, start.elapsed());
        d
    }

    /// R13 for one recipient: a local account with a quota, against the usage its mailbox
    /// server last reported and the announced size.
    async fn check_quota(&self, snap: &Snapshot, tx: &Transaction, rcpt: &Address) -> Decision {
        let policy = &snap.policy;
        let account = match self.lookup(rcpt, "lookup_recipient").await {
            Ok(facts) => match facts.account {
                Some(a) if a.quota_bytes.is_some() => a,
                _ => return Decision::pass(),
            },
            Err(_) => return r13::store_failure(policy, rcpt),
        };
        let store = self.directory.store();
        let usage = match tokio::time::timeout(snap.config.store.timeout, store.usage(rcpt)).await {
            Ok(Ok(u)) => Ok(u),
            Ok(Err(e)) => Err(StoreFailure(e.to_string())),
            Err(_) => Err(StoreFailure(format!(
                "no answer within {:?}",
                snap.config.store.timeout
            ))),
        };
        if let Err(e) = &usage {
            self.metrics.count_store_error("read_usage");
            tracing::warn!(address = %rcpt, "mailbox usage unavailable: {}", e.0);
        }
        r13::check(policy, rcpt, &account, &usage, tx.size)
    }

    /// R14 and R15 for one recipient about to be accepted: finds the counted sender, checks
    /// the per-message limit (not for bulk accounts), then in one store call takes one
    /// recipient (and, at the message's first accepted recipient, one message) from R14's
    /// counters and counts it in R15's sending pattern, which may lock the account.
    async fn check_limits(&self, snap: &Snapshot, tx: &Transaction) -> Decision {
        let policy = &snap.policy;
        let Some(sender) = counted_sender(tx) else {
            return Decision::pass();
        };
        let now = chrono::Utc::now().timestamp();
        let facts = match self.lookup(&sender, "lookup_limited_sender").await {
            Ok(facts) => facts,
            Err(e) => return r15::decide(policy, &sender, &Err(e), now),
        };
        if !facts.is_local() {
            return Decision::pass();
        }
        let r14_on = policy.rule(RuleId::R14).mode != Mode::Off;
        let r15_rule = policy.rule(RuleId::R15);
        let limited = r14_on && !facts.account.as_ref().is_some_and(|a| a.bulk);
        let takes = if limited {
            let limits = Limits::from_rule(&policy.rule(RuleId::R14));
            if let Some(d) = r14::per_message(policy, &limits, &sender, tx.rcpts_accepted) {
                return d;
            }
            r14::takes(&limits, tx.rcpts_accepted)
        } else {
            Vec::new()
        };
        let store = self.directory.store();
        if r15_rule.mode == Mode::Off {
            if takes.is_empty() {
                return Decision::pass();
            }
            let outcome = self
                .bounded(
                    snap,
                    "take_limits",
                    &sender,
                    store.take(&sender, &takes, now),
                )
                .await;
            return r14::decide(policy, &sender, &outcome, now);
        }
        let watch = r15::watch(&r15_rule);
        let message = tx.rcpts_accepted == 0;
        let outcome = self
            .bounded(
                snap,
                "take_limits",
                &sender,
                store.take_watched(&sender, &takes, &watch, message, now),
            )
            .await;
        if let Ok(WatchOutcome::Tripped(lock)) = &outcome {
            self.tripped(&sender, lock, &watch);
        }
        r15::decide(policy, &sender, &outcome, now)
    }

    /// A recipient was refused permanently: R15 counts it for the counted (local) sender.
    /// The recipient's reply is already decided; only a lock may follow.
    async fn count_refused(&self, snap: &Snapshot, tx: &Transaction) {
        let Some(sender) = counted_sender(tx) else {
            return;
        };
        match self.lookup(&sender, "lookup_limited_sender").await {
            Ok(facts) if facts.is_local() => {}
            _ => return,
        }
        let watch = r15::watch(&snap.policy.rule(RuleId::R15));
        let now = chrono::Utc::now().timestamp();
        let store = self.directory.store();
        let outcome = self
            .bounded(
                snap,
                "count_refused",
                &sender,
                store.count_rejected(&sender, &watch, now),
            )
            .await;
        if let Ok(WatchOutcome::Tripped(lock)) = &outcome {
            self.tripped(&sender, lock, &watch);
        }
    }

    /// R15 found `account`'s pattern abnormal: a lock (enforce) or what would be one.
    fn tripped(&self, account: &Address, lock: &SendLock, watch: &crate::store::Watch) {
        if watch.lock {
            self.account_locked(account, lock);
        } else {
            tracing::warn!(
                address = %account,
                cause = lock.cause.kind(),
                "R15 (monitor): would lock the account for sending: {}",
                lock.cause
            );
        }
    }

    /// End of headers (milter): whether and with which keys to sign (R6). Looks up the
    /// author domain only for signing candidates (authenticated or internal clients).
    pub async fn check_signing(&self, tx: &Transaction) -> Signing {
        let start = Instant::now();
        let snap = self.snapshot();
        let dkim = &snap.config.dkim;
        let ring = &dkim.keyring;
        let mut internal = dkim.is_internal(tx.client_addr);
        // An authorised relay of the author domain's organisation (R10, Art. 7) submits
        // outbound mail of ours too: it is signed like an internal client's.
        if !internal
            && tx.sasl_username.is_none()
            && snap.policy.rule(RuleId::R6).mode != Mode::Off
            && !ring.is_empty()
        {
            if let (Some(ip), Some(domain)) = (tx.client_addr, tx.author_domain()) {
                internal = match self.directory.org_by_domain(domain).await {
                    Ok(org) => org.is_some_and(|o| in_networks(&o.relay_networks, ip)),
                    // Unknown: let R6 decide with its own lookup (and on_store_error).
                    Err(_) => true,
                };
            }
        }
        let (decision, plan, domain) =
            match r6::candidate(&snap.policy, tx, internal, !ring.is_empty()) {
                Err(reason) => (Decision::pass(), SigningPlan::NotSigned(reason), None),
                Ok(domain) => {
                    let local = match self.directory.org_by_domain(domain).await {
                        Ok(org) => Ok(org.is_some()),
                        Err(e) => {
                            self.metrics.count_store_error("lookup_author_domain");
                            tracing::warn!(domain, "directory lookup failed: {}", e.0);
                            Err(e)
                        }
                    };
                    let key_domains: Vec<&str> =
                        ring.keys().iter().map(|k| k.domain.as_str()).collect();
                    let (d, p) = r6::decide(&snap.policy, domain, &local, &key_domains);
                    (d, p, Some(domain.to_owned()))
                }
            };
        let keys = match &plan {
            SigningPlan::Sign { keys, .. } => {
                keys.iter().map(|&i| ring.keys()[i].clone()).collect()
            }
            SigningPlan::NotSigned(_) => Vec::new(),
        };
        if let (Some(d), SigningPlan::NotSigned(NotSigned::Refused), Action::Tempfail(r)) =
            (&domain, &plan, &decision.action)
        {
            if r.enhanced == "4.7.5" {
                self.metrics.count_dkim_unsigned_tempfail(d);
            }
        }
        if let SigningPlan::NotSigned(reason) = &plan {
            tracing::debug!(
                queue_id = tx.queue_id.as_deref().unwrap_or("-"),
                domain = domain.as_deref().unwrap_or("-"),
                ?reason,
                "not DKIM-signed"
            );
        }
        telemetry::record_decision(
            &self.metrics,
            tx,
            Stage::EndOfMessage,
            &decision,
            start.elapsed(),
        );
        Signing {
            decision,
            keys,
            domain,
            plan,
        }
    }

    /// End of message: signing failed for `domain` (or the header could not be kept): R6
    /// refuses the message rather than let it leave unsigned.
    pub fn signing_failed(
        &self,
        tx: &Transaction,
        domain: &str,
        reason: &dyn std::fmt::Display,
    ) -> Decision {
        let snap = self.snapshot();
        let d = r6::failed(&snap.policy, domain);
        tracing::error!(
            queue_id = tx.queue_id.as_deref().unwrap_or("-"),
            domain,
            "DKIM signing failed: {reason}"
        );
        if matches!(d.action, Action::Tempfail(_)) {
            self.metrics.count_dkim_unsigned_tempfail(domain);
        }
        telemetry::record_decision(
            &self.metrics,
            tx,
            Stage::EndOfMessage,
            &d,
            std::time::Duration::ZERO,
        );
        d
    }
}
