//! R15 (Art. 14.3): compromise response. An account whose sending pattern turns abnormal —
//! a burst far above its own baseline, or a high share of refused recipients — is locked
//! for sending until an administrator releases it (`mailwarden user unlock`).
//!
//! The store keeps the pattern and the lock and judges them atomically with R14's counters
//! (see [`crate::store::watch`]); this module turns what it found into replies:
//!
//! - at MAIL, a locked account (the SASL login, else a local envelope sender) gets
//!   `450 4.7.1`;
//! - at RCPT, the combined R14/R15 count answers `Locked` (already locked: `450 4.7.1`),
//!   `Tripped` (this recipient locked it: `450 4.7.1`), or R14's outcome. Through the policy
//!   service (asked at RCPT) when it counts, this is the only lock check: no separate read.
//!
//! 450 rather than 5xx: the lock is temporary by nature and the client's queue keeps the
//! mail, so legitimate mail goes out once the owner has been reached and the lock released.

use crate::config::RuleConfig;
use crate::engine::rules::limits as r14;
use crate::engine::{Policy, StoreFailure, Verdicts};
use crate::model::{Address, Decision, Mode, Reply, RuleId, Stage};
use crate::store::{SendLock, Timestamp, Watch, WatchOutcome};

/// R15's thresholds from `[rules.R15]` (defaults: [`Watch::DEFAULT`]). Locks are stored
/// only in `enforce` mode.
pub fn watch(rule: &RuleConfig) -> Watch {
    let d = Watch::DEFAULT;
    Watch {
        burst_factor: rule.burst_factor.unwrap_or(d.burst_factor),
        burst_floor: rule.burst_floor.unwrap_or(d.burst_floor),
        baseline_hours: rule.baseline_hours.unwrap_or(d.baseline_hours),
        reject_share: rule.reject_share.unwrap_or(d.reject_share),
        reject_min: rule.reject_min.unwrap_or(d.reject_min),
        lock: rule.mode == Mode::Enforce,
    }
}

/// The reply to a locked account. It does not say why: whoever holds the account's
/// password may be the intruder.
fn locked_reply(account: &Address) -> Reply {
    // RFC 3463 X.7.1: delivery not authorized; 450: the mail stays queued (RFC 5321).
    Reply::new(
        450,
        "4.7.1",
        format!(
            "Sending from {account} is locked after unusual activity on the account; \
             contact your mail administrator"
        ),
    )
}

/// MAIL: judges the lock read for the sending account.
pub fn at_mail(
    policy: &Policy,
    account: &Address,
    lock: &Result<Option<SendLock>, StoreFailure>,
) -> Decision {
    let mut v = Verdicts::new(policy, Stage::Mail);
    match lock {
        Ok(None) => {}
        Ok(Some(_)) => v.violation(RuleId::R15, account, locked_reply(account)),
        Err(_) => v.store_failure(&[RuleId::R15], account),
    }
    v.finish()
}

/// RCPT: judges the combined count of R14 and R15 ([`crate::store::Store::take_watched`]).
pub fn decide(
    policy: &Policy,
    account: &Address,
    outcome: &Result<WatchOutcome, StoreFailure>,
    now: Timestamp,
) -> Decision {
    match outcome {
        Ok(WatchOutcome::Counted(taken)) => r14::decide(policy, account, &Ok(*taken), now),
        Ok(WatchOutcome::Locked(_) | WatchOutcome::Tripped(_)) => {
            let mut v = Verdicts::new(policy, Stage::Rcpt);
            v.violation(RuleId::R15, account, locked_reply(account));
            v.finish()
        }
        Err(_) => {
            let mut v = Verdicts::new(policy, Stage::Rcpt);
            v.store_failure(&[RuleId::R14, RuleId::R15], account);
            v.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Action;
    use crate::store::{Counter, LockCause, Measure, TakeOutcome, Window};

    fn policy(toml: &str) -> Policy {
        Policy::from_config(&Config::from_toml(toml).unwrap())
    }

    fn champa() -> Address {
        Address::parse("champa@mpt.gov.la").unwrap()
    }

    const NOW: Timestamp = 1_796_423_281;

    fn lock() -> SendLock {
        SendLock {
            at: NOW,
            by: "R15".into(),
            cause: LockCause::Burst {
                messages: 61,
                baseline_milli: 0,
                threshold: 60,
            },
        }
    }

    fn code(d: &Decision) -> Option<(u16, &'static str)> {
        match &d.action {
            Action::Continue => None,
            Action::Reject(r) | Action::Tempfail(r) => Some((r.code, r.enhanced)),
        }
    }

    #[test]
    fn thresholds_come_from_rules_r15_and_monitor_stores_no_lock() {
        let p = policy("[rules.R15]\nburst_floor = 5\nreject_share = 80\n");
        let w = watch(&p.rule(RuleId::R15));
        assert_eq!((w.burst_floor, w.reject_share), (5, 80));
        assert_eq!(w.burst_factor, Watch::DEFAULT.burst_factor);
        assert!(w.lock);
        let m = policy("[rules.R15]\nmode = \"monitor\"\n");
        assert!(!watch(&m.rule(RuleId::R15)).lock);
    }

    #[test]
    fn a_locked_account_gets_450_at_mail_and_at_rcpt() {
        let p = policy("");
        let d = at_mail(&p, &champa(), &Ok(Some(lock())));
        assert_eq!(code(&d), Some((450, "4.7.1")));
        assert_eq!(d.outcomes[0].rule, RuleId::R15);
        assert_eq!(d.outcomes[0].stage, Stage::Mail);
        let Action::Tempfail(r) = &d.action else {
            unreachable!()
        };
        assert!(r.text.contains("locked"), "{}", r.text);
        assert!(
            !r.text.contains("61"),
            "figures stay out of the reply: {}",
            r.text
        );
        assert_eq!(code(&at_mail(&p, &champa(), &Ok(None))), None);
        for o in [WatchOutcome::Locked(lock()), WatchOutcome::Tripped(lock())] {
            let d = decide(&p, &champa(), &Ok(o), NOW);
            assert_eq!(code(&d), Some((450, "4.7.1")));
            assert_eq!(d.outcomes[0].rule, RuleId::R15);
            assert_eq!(d.outcomes[0].stage, Stage::Rcpt);
        }
    }

    #[test]
    fn counted_outcomes_are_r14s_to_judge() {
        let p = policy("");
        let ok = Ok(WatchOutcome::Counted(TakeOutcome::Taken));
        assert_eq!(decide(&p, &champa(), &ok, NOW), Decision::pass());
        let refused = Ok(WatchOutcome::Counted(TakeOutcome::Refused {
            counter: Counter::new(Measure::Messages, Window::Hour),
            count: 100,
            limit: 100,
        }));
        let d = decide(&p, &champa(), &refused, NOW);
        assert_eq!(code(&d), Some((450, "4.7.1")));
        assert_eq!(d.outcomes[0].rule, RuleId::R14);
    }

    #[test]
    fn monitor_mode_and_store_failures() {
        let m = policy("[rules.R15]\nmode = \"monitor\"\n");
        let d = decide(&m, &champa(), &Ok(WatchOutcome::Tripped(lock())), NOW);
        assert_eq!(d.action, Action::Continue);
        assert_eq!(d.outcomes[0].kind, "would_tempfail");
        let d = at_mail(&m, &champa(), &Ok(Some(lock())));
        assert_eq!(d.action, Action::Continue);
        assert_eq!(d.outcomes[0].kind, "would_tempfail");

        let down = Err(StoreFailure("down".into()));
        assert_eq!(
            code(&at_mail(&policy(""), &champa(), &down)),
            Some((451, "4.3.0"))
        );
        let open = policy("[rules.R15]\non_store_error = \"accept\"\n");
        let d = at_mail(&open, &champa(), &down);
        assert_eq!(d.action, Action::Continue);
        assert_eq!(d.outcomes[0].kind, "fail_open");
        let down: Result<WatchOutcome, _> = Err(StoreFailure("down".into()));
        let d = decide(&policy(""), &champa(), &down, NOW);
        assert_eq!(code(&d), Some((451, "4.3.0")));
    }
}
