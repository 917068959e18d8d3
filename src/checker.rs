//! The service both front-ends call: looks up the directory facts a stage needs, asks the
//! pure engine, and records the decision (log + metrics). Protocol code stays free of policy;
//! the engine stays free of I/O.

use crate::activity::Tracker;
use crate::config::Config;
use crate::config::OnError;
use crate::config::in_networks;
use crate::config::{CountOn, MilterEnvelope};
use crate::dkim::SigningKey;
use crate::engine::rules::compromise as r15;
use crate::engine::rules::dkim::{self as r6, NotSigned, SigningPlan};
use crate::engine::rules::limits::{self as r14, Limits};
use crate::engine::rules::quota as r13;
use crate::engine::rules::sendas::{self as r8, Identity};
use crate::engine::rules::spoofing::{self as r7, Source};
use crate::engine::{self, Lookup, Policy, StoreFailure};
use crate::events::{AccountLocked, EventSink};
use crate::model::{Action, Address, Decision, Mode, Protocol, RuleId, Stage, Transaction};
use crate::store::cache::CachedDirectory;
use crate::store::{SendLock, StoreResult, Timestamp, WatchOutcome};
use crate::telemetry::{self, Metrics};
use crate::verify::{Report, Resolver};
use arc_swap::ArcSwap;
use std::{sync::Arc, time::Instant};

pub mod handoff;

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
    /// A pass for a message not signed is not recorded yet: the message's end-of-message
    /// decision is R7's when it is verified, else this one ([`Checker::record_signing`]).
    /// Each message counts one end-of-message decision.
    elapsed: std::time::Duration,
    recorded: bool,
}

impl Signing {
    /// A message not signed that R6 lets go on (the end-of-message decision is still open).
    fn pass_unsigned(&self) -> bool {
        self.keys.is_empty() && self.decision.action == Action::Continue
    }
}

/// An immutable, validated configuration and what is derived from it (the DKIM keys are in
/// `config.dkim.keyring`, loaded with it). Reload swaps the whole snapshot; a session reads
/// it once per stage.
pub struct Snapshot {
    pub config: Config,
    pub policy: Policy,
    /// Inbound verification (R7), when the rule is on.
    pub verification: Option<Verification>,
}

/// R7's settings and resolver, built with the snapshot.
#[derive(Debug, Clone)]
pub struct Verification {
    /// `None` when the resolver could not be set up (logged): every check is then a DNS
    /// failure, and R7's `on_dns_error` decides.
    pub resolver: Option<Resolver>,
    /// Lowercase authserv-id of our `Authentication-Results` header.
    pub authserv_id: String,
    pub on_dns_error: OnError,
    /// Largest message whose body is kept for DKIM/ARC.
    pub max_message_size: u64,
}

/// R7's default `max_message_size`: 25 MiB.
pub const DEFAULT_MAX_VERIFY_SIZE: u64 = 25 * 1024 * 1024;

impl Snapshot {
    pub fn new(config: Config) -> Snapshot {
        let policy = Policy::from_config(&config);
        let verification = (policy.rule(RuleId::R7).mode != Mode::Off).then(|| {
            let table = config.r7();
            let resolver = match Resolver::new(&config.dns) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!("R7: {e}; inbound checks count as DNS failures");
                    None
                }
            };
            Verification {
                resolver,
                authserv_id: table
                    .authserv_id
                    .map(|id| id.to_ascii_lowercase())
                    .unwrap_or_else(crate::verify::host_name),
                on_dns_error: table.on_dns_error.unwrap_or_default(),
                max_message_size: table.max_message_size.unwrap_or(DEFAULT_MAX_VERIFY_SIZE),
            }
        });
        Snapshot {
            config,
            policy,
            verification,
        }
    }
}

pub struct Checker {
    snapshot: ArcSwap<Snapshot>,
    pub directory: CachedDirectory,
    pub metrics: Arc<Metrics>,
    /// Owner alerts (R16): `alerts.sender()` raises them; logins feed new-country detection.
    pub alerts: crate::alerts::Alerts,
    /// Where account events go (R15 locks; R16's alerts subscribe here).
    events: ArcSwap<Vec<Arc<dyn EventSink>>>,
    /// When this daemon last wrote each account's last use (R20).
    activity: Arc<Tracker>,
    /// What the policy service judged and counted, for this daemon's milter (`count_on =
    /// "auto"`).
    handoff: handoff::Handoff,
}

/// What the end-of-message quota check (R13) found: the decision to answer, and what to
/// count once the message is accepted (hand it to [`Checker::delivered`]).
#[derive(Debug)]
pub struct EndOfMessage {
    pub decision: Decision,
    /// Recipients with a quota whose usage grows by `size` when the message is delivered
    /// (empty when deliveries are not counted on this front-end).
    counted: Vec<Address>,
    size: u64,
}

impl EndOfMessage {
    fn pass() -> EndOfMessage {
        EndOfMessage {
            decision: Decision::pass(),
            counted: Vec::new(),
            size: 0,
        }
    }

    /// The recipients whose usage [`Checker::delivered`] would grow.
    pub fn counted(&self) -> &[Address] {
        &self.counted
    }
}

/// Recipients whose quota is checked at once at end of message (lookups and usage reads).
const EOM_CONCURRENCY: usize = 16;

/// Whether `rule` (R14's sending counters, R13's delivered sizes) counts on this
/// front-end: active, and counted here (`count_on`) so that a message seen by both the
/// milter and the policy service is counted once. With `"auto"` the policy service counts
/// whatever it is asked about, and the milter what the policy service was not asked about
/// (`policy_judged`: see [`handoff`]).
fn counts_here(snap: &Snapshot, id: RuleId, protocol: Protocol, policy_judged: bool) -> bool {
    let rule = snap.policy.rule(id);
    // R15's sending pattern is counted with R14's counters, so R14's counting place
    // applies while either of them is on.
    let r15_on = id == RuleId::R14 && snap.policy.rule(RuleId::R15).mode != Mode::Off;
    if rule.mode == Mode::Off && !r15_on {
        return false;
    }
    match rule.count_on.unwrap_or_default() {
        CountOn::Auto => protocol == Protocol::Policy || !policy_judged,
        CountOn::Policy => protocol == Protocol::Policy,
        CountOn::Milter => protocol == Protocol::Milter,
    }
}

/// Whether `rule` counts with `"auto"` (where the front-ends hand off per recipient and per
/// message).
fn counts_auto(snap: &Snapshot, id: RuleId) -> bool {
    snap.policy.rule(id).count_on.unwrap_or_default() == CountOn::Auto
}

/// Whether the milter measures each message's size (and so needs its headers and body):
/// when R13 is on and may check the end of message there (`count_on` `"milter"`, or
/// `"auto"`: the milter then checks every message whose end of DATA the policy service was
/// not asked about).
pub fn milter_measures_sizes(snap: &Snapshot) -> bool {
    counts_here(snap, RuleId::R13, Protocol::Milter, false)
}

/// Whose counters a recipient counts against (R14, R15): the account the SASL login names
/// (as R8 maps it: an address, or a bare name with `[rules.R8] login_domain`), else the
/// envelope sender. The caller checks that it is local.
fn counted_sender(snap: &Snapshot, tx: &Transaction) -> Option<Address> {
    login_account(snap, tx).or_else(|| tx.sender.as_ref().and_then(|s| s.address()).cloned())
}

/// The account the SASL login names, as R8 maps it; `None` when not authenticated or the
/// login names no address.
fn login_account(snap: &Snapshot, tx: &Transaction) -> Option<Address> {
    let login = tx.sasl_username.as_deref()?;
    engine::rules::sendas::login_address(login, snap.policy.login_domain.as_deref())
}

impl Checker {
    pub fn new(config: Config, directory: CachedDirectory, metrics: Arc<Metrics>) -> Checker {
        let alerts = crate::alerts::Alerts::new(&config, metrics.alerts.clone());
        let capacity = config.store.cache_size;
        Checker {
            alerts,
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            directory,
            metrics,
            events: ArcSwap::from_pointee(Vec::new()),
            activity: Arc::new(Tracker::new(capacity)),
            handoff: handoff::Handoff::default(),
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
        let Some(login) = login_account(snap, tx) else {
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
        self.alerts.reload(&config);
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

    /// A successful login (SMTP AUTH, or IMAP/webmail reported by Dovecot) for new-country
    /// detection (R16). The login names its account as R8 maps it: an address, or a bare name
    /// with `[rules.R8] login_domain`. Queued, never waited on.
    pub fn login_seen(&self, login: &str, ip: std::net::IpAddr, via: &str) {
        let domain = self.snapshot().policy.login_domain.clone();
        match engine::rules::sendas::login_address(login, domain.as_deref()) {
            Some(account) => self.alerts.login(&account.to_string(), ip, via),
            // Counted by the alert service as not an address.
            None => self.alerts.login(login, ip, via),
        }
    }

    /// MAIL stage: sender rules.
    pub async fn check_mail(&self, tx: &Transaction) -> Decision {
        let start = Instant::now();
        // R16: an authenticated login feeds new-country detection (queued, never waited on).
        if let (Some(login), Some(ip)) = (tx.sasl_username.as_deref(), tx.client_addr) {
            self.login_seen(login, ip, "smtp");
        }
        let snap = self.snapshot();
        let sender = tx.sender.as_ref().and_then(|s| s.address());
        let lookup = match sender {
            Some(a) if snap.policy.any_active(&engine::SENDER_RULES) => {
                Some(self.lookup(a, "lookup_sender").await)
            }
            _ => None,
        };
        let identity = match self.sends_as_judged(&snap, tx) {
            true => Some(self.identity(&snap, tx, r8::envelope_addresses(tx)).await),
            false => None,
        };
        let mut d = engine::check_sender_as(&snap.policy, tx, lookup.as_ref(), identity.as_ref());
        let now = chrono::Utc::now().timestamp();
        self.note_use(&snap, tx, now);
        // R15's lock. Not read here when this is the policy service and it counts sending:
        // Postfix asks it at RCPT, and the RCPT count that follows reads the lock in the same
        // store call (one round trip per recipient, as R14 alone). Recipients refused by
        // other rules are refused anyway.
        let policy_counts =
            tx.protocol == Protocol::Policy && counts_here(&snap, RuleId::R14, tx.protocol, false);
        if d.action == Action::Continue
            && !policy_counts
            && snap.policy.rule(RuleId::R15).mode != Mode::Off
        {
            // The account that would send: the SASL login, else a local envelope sender.
            let account = match counted_sender(&snap, tx) {
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

    /// Whether R8 judges this transaction: on, and the client authenticated.
    fn sends_as_judged(&self, snap: &Snapshot, tx: &Transaction) -> bool {
        tx.sasl_username.is_some() && snap.policy.rule(RuleId::R8).mode != Mode::Off
    }

    /// R8's facts: the account the SASL login names, whether it is registered, and the
    /// delegates of each address in `used` other than its own (all cached lookups).
    async fn identity(&self, snap: &Snapshot, tx: &Transaction, used: Vec<&Address>) -> Identity {
        let login = tx.sasl_username.as_deref().unwrap_or_default();
        let account = r8::login_address(login, snap.policy.login_domain.as_deref());
        let registered = match &account {
            None => Ok(false),
            Some(a) => self
                .lookup(a, "lookup_login")
                .await
                .map(|facts| facts.account.is_some_and(|a| r8::may_send(&a))),
        };
        let mut delegates = Vec::new();
        if registered == Ok(true) {
            for addr in Identity::addresses_to_look_up(account.as_ref(), used) {
                let found = self.directory.delegates(&addr).await;
                if let Err(e) = &found {
                    self.metrics.count_store_error("lookup_delegates");
                    tracing::warn!(address = %addr, "delegates lookup failed: {}", e.0);
                }
                delegates.push((addr, found));
            }
        }
        Identity {
            account,
            registered,
            delegates,
        }
    }

    /// End of headers (milter): R8 on the `From:` and `Sender:` fields of an authenticated
    /// client's message. A pass when R8 is off or the client did not authenticate.
    pub async fn check_headers(&self, tx: &Transaction) -> Decision {
        let start = Instant::now();
        let snap = self.snapshot();
        if !self.sends_as_judged(&snap, tx) {
            return Decision::pass();
        }
        let identity = self.identity(&snap, tx, r8::header_addresses(tx)).await;
        let d = engine::check_headers(&snap.policy, tx, &identity);
        // A pass here is not the message's answer yet (R6 and end of message follow, and
        // record it): only a verdict is recorded, so each message counts one eom decision.
        if d != Decision::pass() {
            telemetry::record_decision(&self.metrics, tx, Stage::EndOfMessage, &d, start.elapsed());
        }
        d
    }

    /// The mailbox a recipient address is delivered to, which the recipient rules judge:
    /// the address itself; what old routing syntax names (`user%domain@host`,
    /// `domain!user@host`); and, when it carries an extension (`[directory]
    /// recipient_delimiter`, e.g. `cabinet+news@`) and is not an account of its own, the
    /// address without it, as Postfix delivers it. A failed lookup also cuts the
    /// extension: the mailbox's own lookup then fails too and its rules apply their
    /// `on_store_error`.
    async fn mailbox(&self, snap: &Snapshot, rcpt: &Address) -> Address {
        // Old routing syntax first (`cabinet%mpt.gov.la@localhost`): Postfix rewrites it
        // before it delivers. No account name can hold `%` or `!` (R3), so what it names is
        // judged even where Postfix would relay it elsewhere (refusing, never passing).
        let routed = rcpt.routed();
        let rcpt = routed.as_ref().unwrap_or(rcpt);
        let Some(base) = rcpt.without_extension(&snap.config.directory.recipient_delimiter) else {
            return rcpt.clone();
        };
        match self.directory.lookup(rcpt).await {
            Ok(facts) if facts.account.is_some() => rcpt.clone(),
            _ => base,
        }
    }

    /// RCPT stage: recipient rules for `rcpt` (for the mailbox it is delivered to, see
    /// [`Checker::mailbox`]).
    pub async fn check_rcpt(&self, tx: &Transaction, rcpt: &Address) -> Decision {
        let start = Instant::now();
        let snap = self.snapshot();
        let rcpt = &self.mailbox(&snap, rcpt).await;
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
        let policy_judged = self.policy_judged_rcpt(&snap, tx, rcpt);
        let counts = counts_here(&snap, RuleId::R14, tx.protocol, policy_judged);
        // A refused recipient is not counted against the sender's limits; a permanently
        // refused one counts in R15's share of refused recipients.
        if d.action == Action::Continue && counts {
            let limits = self.check_limits(&snap, tx).await;
            d.action = limits.action;
            d.outcomes.extend(limits.outcomes);
        } else if matches!(d.action, Action::Reject(_))
            && snap.policy.rule(RuleId::R15).mode != Mode::Off
            && counts
        {
            self.count_refused(&snap, tx).await;
        }
        if d.action == Action::Continue && counts && self.hands_off_envelope(&snap, tx) {
            self.handoff.rcpt_judged(tx, rcpt);
        }
        telemetry::record_decision(&self.metrics, tx, Stage::Rcpt, &d, start.elapsed());
        d
    }

    /// Milter, `count_on = "auto"`: whether the policy service judged (and counted) this
    /// recipient just before; the mark is taken. Never with no policy listener.
    fn policy_judged_rcpt(&self, snap: &Snapshot, tx: &Transaction, rcpt: &Address) -> bool {
        tx.protocol == Protocol::Milter
            && !snap.config.server.policy_listen.is_empty()
            && counts_auto(snap, RuleId::R14)
            && self.handoff.take_rcpt(tx, rcpt)
    }

    /// Policy service, `count_on = "auto"`: whether a milter of this daemon judges the
    /// envelope too, and so must learn what was counted here.
    fn hands_off_envelope(&self, snap: &Snapshot, tx: &Transaction) -> bool {
        let server = &snap.config.server;
        tx.protocol == Protocol::Policy
            && !server.milter_listen.is_empty()
            && server.milter_envelope == MilterEnvelope::Check
            && counts_auto(snap, RuleId::R14)
    }

    /// R13 for one recipient: a local account with a quota (its own, else its
    /// organisation's default), against its current usage and the announced size.
    async fn check_quota(&self, snap: &Snapshot, tx: &Transaction, rcpt: &Address) -> Decision {
        let policy = &snap.policy;
        let quota = match self.quota_of(rcpt).await {
            Ok(Some(q)) => q,
            Ok(None) => return Decision::pass(),
            Err(()) => return r13::store_failure(policy, Stage::Rcpt, rcpt),
        };
        let usage = self.read_usage(snap, rcpt).await;
        r13::check(policy, Stage::Rcpt, rcpt, Some(quota), &usage, tx.size)
    }

    /// The effective quota of `rcpt` (R13): `None` when it is not a local account or has
    /// none; `Err` when the directory could not answer (logged and counted).
    async fn quota_of(&self, rcpt: &Address) -> Result<Option<u64>, ()> {
        match self.lookup(rcpt, "lookup_recipient").await {
            Ok(facts) => Ok(facts
                .account
                .as_ref()
                .and_then(|a| a.effective_quota(facts.org.as_ref()))),
            Err(_) => Err(()),
        }
    }

    /// The current mailbox usage of `rcpt`, bounded by the store timeout (a failure is
    /// counted and logged as `read_usage`).
    async fn read_usage(
        &self,
        snap: &Snapshot,
        rcpt: &Address,
    ) -> Result<Option<u64>, StoreFailure> {
        let store = self.directory.store();
        self.bounded(snap, "read_usage", rcpt, store.usage(rcpt))
            .await
    }

    /// End of message (R13): the message's actual `size` against the quota of each accepted
    /// `recipients` that has one. Usage plus size over any quota refuses the whole message
    /// (`452 4.2.2`, or `552 5.2.2` when permanent): after DATA, SMTP has one reply for all
    /// recipients. When the message is then accepted, pass the result to
    /// [`Checker::delivered`] so the size is counted into those recipients' usage.
    pub async fn check_end_of_message(
        &self,
        tx: &Transaction,
        recipients: &[Address],
        size: u64,
    ) -> EndOfMessage {
        let snap = self.snapshot();
        let rule = snap.policy.rule(RuleId::R13);
        if rule.mode == Mode::Off {
            return EndOfMessage::pass();
        }
        // count_on = "auto": the policy service judges every end of DATA it is asked about
        // (before the milter's end of message, see `handoff`); the milter the others.
        let auto = counts_auto(&snap, RuleId::R13);
        let queue_id = tx.queue_id.as_deref().filter(|q| !q.is_empty());
        let server = &snap.config.server;
        if let (Protocol::Milter, Some(q)) = (tx.protocol, queue_id) {
            if auto && !server.policy_listen.is_empty() && self.handoff.take_message(q) {
                return EndOfMessage::pass();
            }
        }
        if recipients.is_empty() {
            return EndOfMessage::pass();
        }
        // Judged here (the policy service knows the message's recipients): the milter need
        // not judge it again.
        if let (Protocol::Policy, Some(q)) = (tx.protocol, queue_id) {
            if auto && !server.milter_listen.is_empty() {
                self.handoff.message_judged(q);
            }
        }
        let start = Instant::now();
        let mut mailboxes = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            mailboxes.push(self.mailbox(&snap, rcpt).await);
        }
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&Address> = mailboxes.iter().filter(|a| seen.insert(*a)).collect();
        let mut decision = Decision::pass();
        let mut counted = Vec::new();
        for batch in unique.chunks(EOM_CONCURRENCY) {
            let judged = futures_util::future::join_all(
                batch
                    .iter()
                    .map(|rcpt| self.quota_at_eom(&snap, rcpt, size)),
            )
            .await;
            for (rcpt, d) in batch.iter().zip(judged) {
                let Some(d) = d else { continue };
                if decision.action == Action::Continue {
                    decision.action = d.action;
                }
                decision.outcomes.extend(d.outcomes);
                counted.push((*rcpt).clone());
            }
        }
        // Recorded only when some recipient had a quota to check: a message without any
        // is not an end-of-message check (the milter records its signing decision there).
        if !counted.is_empty() {
            telemetry::record_decision(
                &self.metrics,
                tx,
                Stage::EndOfMessage,
                &decision,
                start.elapsed(),
            );
        }
        let count = rule.count_deliveries.unwrap_or(true)
            && counts_here(&snap, RuleId::R13, tx.protocol, false)
            && size > 0;
        if !count {
            counted.clear();
        }
        EndOfMessage {
            decision,
            counted,
            size,
        }
    }

    /// R13 at end of message for one recipient: `None` when it has no quota.
    async fn quota_at_eom(&self, snap: &Snapshot, rcpt: &Address, size: u64) -> Option<Decision> {
        let policy = &snap.policy;
        match self.quota_of(rcpt).await {
            Ok(None) => None,
            Err(()) => Some(r13::store_failure(policy, Stage::EndOfMessage, rcpt)),
            Ok(Some(quota)) => {
                let usage = self.read_usage(snap, rcpt).await;
                Some(r13::check(
                    policy,
                    Stage::EndOfMessage,
                    rcpt,
                    Some(quota),
                    &usage,
                    Some(size),
                ))
            }
        }
    }

    /// The message checked by [`Checker::check_end_of_message`] was accepted: adds its size
    /// to the usage of its recipients with a quota (`[rules.R13] count_deliveries`). Runs
    /// in the background, off the reply path; a failure is logged and counted
    /// (`store_errors{operation="add_usage"}`) and never affects mail: the mailbox server's
    /// next report replaces the value anyway.
    pub fn delivered(&self, eom: EndOfMessage) {
        if eom.counted.is_empty() || eom.decision.action != Action::Continue {
            return;
        }
        let store = self.directory.store().clone();
        let metrics = self.metrics.clone();
        let timeout = self.snapshot().config.store.timeout;
        tokio::spawn(async move {
            for rcpt in eom.counted {
                let added = tokio::time::timeout(timeout, store.add_usage(&rcpt, eom.size)).await;
                let err = match added {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {timeout:?}"),
                };
                metrics.count_store_error("add_usage");
                tracing::warn!(address = %rcpt, "delivered size not counted into the usage: {err}");
            }
        });
    }

    /// R14 and R15 for one recipient about to be accepted: finds the counted sender, checks
    /// the per-message limit (not for bulk accounts), then in one store call takes one
    /// recipient (and, at the message's first accepted recipient, one message) from R14's
    /// counters and counts it in R15's sending pattern, which may lock the account.
    async fn check_limits(&self, snap: &Snapshot, tx: &Transaction) -> Decision {
        let policy = &snap.policy;
        let Some(sender) = counted_sender(snap, tx) else {
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
        let (mut takes, org_takes) = if limited {
            let limits = Limits::from_rule(&policy.rule(RuleId::R14));
            if let Some(d) = r14::per_message(policy, &limits, &sender, tx.rcpts_accepted) {
                return d;
            }
            (
                r14::takes(&limits, tx.rcpts_accepted),
                r14::org_takes(&limits, tx.rcpts_accepted),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let store = self.directory.store();
        // Organisation limits (R14): the account's and the organisation's counters are taken
        // first, all or nothing; R15's pattern is then counted alone (one more round trip,
        // only when organisation limits are configured). A lock found there refuses this
        // recipient although it was counted: the safe side.
        let mut before = Decision::pass();
        if !org_takes.is_empty() {
            let org = facts
                .org
                .as_ref()
                .map(|o| o.code.as_str())
                .unwrap_or_default();
            let joint = self
                .bounded(
                    snap,
                    "take_limits",
                    &sender,
                    store.take_with_org(&sender, &takes, org, &org_takes, now),
                )
                .await;
            let d = r14::decide_joint(policy, &sender, org, &joint, now);
            if d.action != Action::Continue || r15_rule.mode == Mode::Off {
                return d;
            }
            takes.clear();
            before = d;
        }
        if r15_rule.mode == Mode::Off {
            if takes.is_empty() {
                return before;
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
        let mut d = r15::decide(policy, &sender, &outcome, now);
        before.outcomes.append(&mut d.outcomes);
        d.outcomes = before.outcomes;
        d
    }

    /// A recipient was refused permanently: R15 counts it for the counted (local) sender.
    /// The recipient's reply is already decided; only a lock may follow.
    async fn count_refused(&self, snap: &Snapshot, tx: &Transaction) {
        let Some(sender) = counted_sender(snap, tx) else {
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
        // Internal networks, and R10's trusted networks (the MTA's own submission and webmail
        // hosts, allowed to relay for every local domain): their mail is outbound.
        let mut internal = dkim.is_internal(tx.client_addr)
            || tx
                .client_addr
                .is_some_and(|ip| in_networks(&snap.policy.relay_trusted_networks, ip));
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
        let mut signing = Signing {
            decision,
            keys,
            domain,
            plan,
            elapsed: start.elapsed(),
            recorded: false,
        };
        if !signing.pass_unsigned() {
            self.record_signing(tx, &mut signing);
        }
        signing
    }

    /// Records R6's decision as the message's end-of-message decision (see [`Signing`]): by
    /// the milter for a message neither signed nor verified by R7. Nothing when already
    /// recorded.
    pub fn record_signing(&self, tx: &Transaction, signing: &mut Signing) {
        if !std::mem::replace(&mut signing.recorded, true) {
            telemetry::record_decision(
                &self.metrics,
                tx,
                Stage::EndOfMessage,
                &signing.decision,
                signing.elapsed,
            );
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

    /// End of headers (milter), for a message R6 does not sign: where it comes from, for
    /// R7. `None` when R7 is off. Only a message from [`Source::Outside`] (or unknown) is
    /// verified: outbound mail (authenticated, internal networks, R10's trusted networks,
    /// the author organisation's relay networks) never pays for verification.
    pub async fn inbound_source(&self, tx: &Transaction) -> Option<Source> {
        let snap = self.snapshot();
        snap.verification.as_ref()?;
        if tx.sasl_username.is_some() {
            return Some(Source::Authorised);
        }
        let Some(ip) = tx.client_addr else {
            return Some(Source::Outside);
        };
        if snap.config.dkim.is_internal(Some(ip))
            || in_networks(&snap.policy.relay_trusted_networks, ip)
        {
            return Some(Source::Authorised);
        }
        let Some(domain) = tx.author_domain() else {
            return Some(Source::Outside);
        };
        Some(match self.directory.org_by_domain(domain).await {
            Ok(Some(org)) if in_networks(&org.relay_networks, ip) => Source::Authorised,
            Ok(_) => Source::Outside,
            Err(e) => {
                self.metrics.count_store_error("lookup_author_domain");
                tracing::warn!(domain, "directory lookup failed: {}", e.0);
                Source::Unknown(e)
            }
        })
    }

    /// End of message (milter): R7 on a verified inbound message. Counts the verification
    /// results, looks up whether each header From domain is local, and decides.
    pub async fn check_spoofing(
        &self,
        tx: &Transaction,
        source: &Source,
        report: &Report,
    ) -> Decision {
        let start = Instant::now();
        let snap = self.snapshot();
        for (method, result) in &report.results {
            self.metrics.count_auth_result(method, result);
        }
        let on_dns_error = snap
            .verification
            .as_ref()
            .map_or(OnError::Tempfail, |v| v.on_dns_error);
        let mut domains: Vec<String> = Vec::new();
        let claimed = tx.header_from_claims.iter().cloned();
        for d in tx
            .header_from
            .iter()
            .map(|a| a.domain().to_ascii_lowercase())
            .chain(claimed)
        {
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        let mut from_domains = Vec::with_capacity(domains.len());
        for d in domains {
            let local = match self.directory.org_by_domain(&d).await {
                Ok(org) => Ok(org.is_some()),
                Err(e) => {
                    self.metrics.count_store_error("lookup_author_domain");
                    tracing::warn!(domain = d, "directory lookup failed: {}", e.0);
                    Err(e)
                }
            };
            from_domains.push((d, local));
        }
        let d = r7::decide(
            &snap.policy,
            on_dns_error,
            source,
            &from_domains,
            &report.evidence,
        );
        tracing::debug!(
            queue_id = tx.queue_id.as_deref().unwrap_or("-"),
            results = %report.results.iter().map(|(m, r)| format!("{m}={r}")).collect::<Vec<_>>().join(" "),
            "inbound verification"
        );
        telemetry::record_decision(&self.metrics, tx, Stage::EndOfMessage, &d, start.elapsed());
        d
    }
}
