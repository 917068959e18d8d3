//! R14 (Art. 20.3, 20.5): sending limits without permission.
//!
//! Limits per account: recipients per message, and messages and recipients per hour and per
//! day (fixed UTC windows, see [`crate::store::counters`]). Accounts with the bulk
//! permission are exempt. Judged at RCPT, for the counted sender:
//!
//! - the authenticated login (`sasl_username`) when there is one (as an address);
//! - else the envelope sender when its domain is local;
//! - nobody else: unauthenticated external senders are not R14's business.
//!
//! Each recipient mailwarden accepts counts one recipient; a message counts once, at its
//! first accepted recipient. Per-organisation limits (`org_*`, none by default) count the
//! same for all accounts of the sender's organisation together, taken in the same atomic
//! step as the account's counters; without them nothing is counted per organisation. The checker does the I/O (directory lookup, the store's atomic
//! [`Store::take`](crate::store::Store::take)); this module decides from what it found.

use crate::config::RuleConfig;
use crate::engine::{Policy, StoreFailure, Verdicts};
use crate::model::{Address, Decision, Reply, RuleId, Stage};
use crate::store::{Counter, JointTakeOutcome, Measure, Take, TakeOutcome, Timestamp, Window};

/// The limits in force (0: no limit), from `[rules.R14]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub recipients_per_message: u64,
    pub messages_per_hour: u64,
    pub messages_per_day: u64,
    pub recipients_per_hour: u64,
    pub recipients_per_day: u64,
    /// Per organisation (0: none, and not counted).
    pub org_messages_per_hour: u64,
    pub org_messages_per_day: u64,
    pub org_recipients_per_hour: u64,
    pub org_recipients_per_day: u64,
}

impl Limits {
    /// Defaults for a government mail service: generous for a person's or a unit's normal
    /// correspondence (a circular to every unit of a ministry fits), far below what a
    /// compromised account sends in a spam run. Larger mailings need the bulk permission.
    pub const DEFAULT: Limits = Limits {
        recipients_per_message: 100,
        messages_per_hour: 100,
        messages_per_day: 500,
        recipients_per_hour: 300,
        recipients_per_day: 1000,
        org_messages_per_hour: 0,
        org_messages_per_day: 0,
        org_recipients_per_hour: 0,
        org_recipients_per_day: 0,
    };

    pub fn from_rule(rule: &RuleConfig) -> Limits {
        let d = Limits::DEFAULT;
        Limits {
            recipients_per_message: rule
                .recipients_per_message
                .unwrap_or(d.recipients_per_message),
            messages_per_hour: rule.messages_per_hour.unwrap_or(d.messages_per_hour),
            messages_per_day: rule.messages_per_day.unwrap_or(d.messages_per_day),
            recipients_per_hour: rule.recipients_per_hour.unwrap_or(d.recipients_per_hour),
            recipients_per_day: rule.recipients_per_day.unwrap_or(d.recipients_per_day),
            org_messages_per_hour: rule.org_messages_per_hour.unwrap_or(0),
            org_messages_per_day: rule.org_messages_per_day.unwrap_or(0),
            org_recipients_per_hour: rule.org_recipients_per_hour.unwrap_or(0),
            org_recipients_per_day: rule.org_recipients_per_day.unwrap_or(0),
        }
    }

    /// The per-organisation limit on `counter`; `None` when there is none.
    pub fn org_limit(&self, counter: Counter) -> Option<u64> {
        let l = match (counter.measure, counter.window) {
            (Measure::Messages, Window::Hour) => self.org_messages_per_hour,
            (Measure::Messages, Window::Day) => self.org_messages_per_day,
            (Measure::Recipients, Window::Hour) => self.org_recipients_per_hour,
            (Measure::Recipients, Window::Day) => self.org_recipients_per_day,
        };
        (l > 0).then_some(l)
    }

    /// The per-account limit on `counter`; `None` when there is none.
    pub fn limit(&self, counter: Counter) -> Option<u64> {
        let l = match (counter.measure, counter.window) {
            (Measure::Messages, Window::Hour) => self.messages_per_hour,
            (Measure::Messages, Window::Day) => self.messages_per_day,
            (Measure::Recipients, Window::Hour) => self.recipients_per_hour,
            (Measure::Recipients, Window::Day) => self.recipients_per_day,
        };
        (l > 0).then_some(l)
    }
}

/// The counters one accepted recipient adds to: every recipient counter, and the message
/// counters when it is the message's first accepted recipient. Counters without a limit
/// are counted too (for `mailwarden user limits`).
pub fn takes(limits: &Limits, accepted_before: usize) -> Vec<Take> {
    Counter::ALL
        .into_iter()
        .filter(|c| c.measure == Measure::Recipients || accepted_before == 0)
        .map(|counter| Take {
            counter,
            n: 1,
            limit: limits.limit(counter),
        })
        .collect()
}

/// The organisation counters one accepted recipient adds to: only those with an
/// organisation limit (none configured: nothing, and the store is asked as before).
pub fn org_takes(limits: &Limits, accepted_before: usize) -> Vec<Take> {
    Counter::ALL
        .into_iter()
        .filter(|c| c.measure == Measure::Recipients || accepted_before == 0)
        .filter_map(|counter| {
            limits.org_limit(counter).map(|limit| Take {
                counter,
                n: 1,
                limit: Some(limit),
            })
        })
        .collect()
}

/// Before the store: the per-message recipient limit. `Some` decision when it is exceeded
/// (the store is then not asked: nothing is counted for a refused recipient).
pub fn per_message(
    policy: &Policy,
    limits: &Limits,
    account: &Address,
    accepted_before: usize,
) -> Option<Decision> {
    let max = limits.recipients_per_message;
    if max == 0 || (accepted_before as u64) < max {
        return None;
    }
    let mut v = Verdicts::new(policy, Stage::Rcpt);
    // RFC 5321 §4.5.3.1.10: 452 for too many recipients; the client sends the rest in
    // another message. RFC 3463 X.5.3: too many recipients.
    v.violation(
        RuleId::R14,
        account,
        Reply::new(
            452,
            "4.5.3",
            format!(
                "Too many recipients: at most {max} per message without the bulk permission; \
                 send the rest in another message"
            ),
        ),
    );
    Some(v.finish())
}

/// After the store: what its answer to the take means.
pub fn decide(
    policy: &Policy,
    account: &Address,
    outcome: &Result<TakeOutcome, StoreFailure>,
    now: Timestamp,
) -> Decision {
    let mut v = Verdicts::new(policy, Stage::Rcpt);
    match outcome {
        Ok(TakeOutcome::Taken) => {}
        Ok(TakeOutcome::Refused { counter, limit, .. }) => {
            let until = counter.window.end(now);
            // RFC 3463 X.7.1: delivery not authorized; 450: try again later (RFC 5321).
            v.violation(
                RuleId::R14,
                account,
                Reply::new(
                    450,
                    "4.7.1",
                    format!(
                        "Sending limit reached: {limit} {} per {} for {account}; try again \
                         after {} UTC, or ask for the bulk permission",
                        counter.measure.as_str(),
                        counter.window.as_str(),
                        clock(until),
                    ),
                ),
            );
        }
        Err(_) => v.store_failure(&[RuleId::R14], account),
    }
    v.finish()
}

/// After the store, with organisation limits: a refusal by the organisation's counters
/// names organisation `org`; anything else is [`decide`]'s.
pub fn decide_joint(
    policy: &Policy,
    account: &Address,
    org: &str,
    outcome: &Result<JointTakeOutcome, StoreFailure>,
    now: Timestamp,
) -> Decision {
    match outcome {
        Ok(JointTakeOutcome {
            outcome: TakeOutcome::Refused { counter, limit, .. },
            by_org: true,
        }) => {
            let mut v = Verdicts::new(policy, Stage::Rcpt);
            v.violation(
                RuleId::R14,
                account,
                Reply::new(
                    450,
                    "4.7.1",
                    format!(
                        "Sending limit reached: {limit} {} per {} for all of organisation \
                         {org}; try again after {} UTC, or ask for the bulk permission",
                        counter.measure.as_str(),
                        counter.window.as_str(),
                        clock(counter.window.end(now)),
                    ),
                ),
            );
            v.finish()
        }
        Ok(j) => decide(policy, account, &Ok(j.outcome), now),
        Err(e) => decide(policy, account, &Err(e.clone()), now),
    }
}

/// `HH:MM` (UTC) of a timestamp.
fn clock(t: Timestamp) -> String {
    let s = t.rem_euclid(86_400);
    format!("{:02}:{:02}", s / 3600, s % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, OnError};
    use crate::model::{Action, Mode};

    fn policy(toml: &str) -> Policy {
        Policy::from_config(&Config::from_toml(toml).unwrap())
    }

    fn champa() -> Address {
        Address::parse("champa@mpt.gov.la").unwrap()
    }

    /// 2026-12-04 22:28:01 UTC
    const NOW: Timestamp = 1_796_423_281;

    #[test]
    fn defaults_apply_where_the_config_is_silent_and_zero_means_no_limit() {
        let p = policy("[rules.R14]\nmessages_per_hour = 0\nrecipients_per_day = 7\n");
        let l = Limits::from_rule(&p.rule(RuleId::R14));
        assert_eq!(l.messages_per_hour, 0);
        assert_eq!(l.recipients_per_day, 7);
        assert_eq!(l.messages_per_day, Limits::DEFAULT.messages_per_day);
        let t = takes(&l, 0);
        let limit = |c| t.iter().find(|t| t.counter == c).unwrap().limit;
        assert_eq!(limit(Counter::ALL[0]), None, "0 = no limit, still counted");
        assert_eq!(limit(Counter::ALL[3]), Some(7));
    }

    #[test]
    fn the_first_recipient_counts_the_message_later_ones_only_recipients() {
        let first = takes(&Limits::DEFAULT, 0);
        assert_eq!(
            first.iter().map(|t| t.counter).collect::<Vec<_>>(),
            Counter::ALL
        );
        assert!(first.iter().all(|t| t.n == 1));
        let later = takes(&Limits::DEFAULT, 3);
        assert_eq!(
            later.iter().map(|t| t.counter.measure).collect::<Vec<_>>(),
            [Measure::Recipients, Measure::Recipients]
        );
    }

    #[test]
    fn per_message_limit_cuts_off_after_exactly_n_recipients() {
        let p = policy("[rules.R14]\nrecipients_per_message = 3\n");
        let l = Limits::from_rule(&p.rule(RuleId::R14));
        for before in 0..3 {
            assert_eq!(per_message(&p, &l, &champa(), before), None);
        }
        let d = per_message(&p, &l, &champa(), 3).unwrap();
        let Action::Tempfail(r) = &d.action else {
            panic!("{d:?}")
        };
        assert_eq!((r.code, r.enhanced), (452, "4.5.3"));
        assert!(r.text.contains("at most 3 per message"), "{}", r.text);
        assert_eq!(d.outcomes[0].rule, RuleId::R14);
        let unlimited = Limits {
            recipients_per_message: 0,
            ..l
        };
        assert_eq!(per_message(&p, &unlimited, &champa(), 10_000), None);
    }

    #[test]
    fn a_refused_take_is_450_saying_when_to_retry() {
        let p = policy("");
        let refused = Ok(TakeOutcome::Refused {
            counter: Counter::new(Measure::Messages, Window::Hour),
            count: 100,
            limit: 100,
        });
        let d = decide(&p, &champa(), &refused, NOW);
        let Action::Tempfail(r) = &d.action else {
            panic!("{d:?}")
        };
        assert_eq!((r.code, r.enhanced), (450, "4.7.1"));
        assert!(r.text.contains("100 messages per hour"), "{}", r.text);
        assert!(r.text.contains("after 23:00 UTC"), "{}", r.text);
        let daily = Ok(TakeOutcome::Refused {
            counter: Counter::new(Measure::Recipients, Window::Day),
            count: 9,
            limit: 10,
        });
        let d = decide(&p, &champa(), &daily, NOW);
        let Action::Tempfail(r) = &d.action else {
            panic!("{d:?}")
        };
        assert!(r.text.contains("10 recipients per day"), "{}", r.text);
        assert!(r.text.contains("after 00:00 UTC"), "{}", r.text);
        assert_eq!(
            decide(&p, &champa(), &Ok(TakeOutcome::Taken), NOW),
            Decision::pass()
        );
    }

    #[test]
    fn monitor_mode_only_records_what_it_would_do() {
        let p = policy("[rules.R14]\nmode = \"monitor\"\n");
        let refused = Ok(TakeOutcome::Refused {
            counter: Counter::new(Measure::Messages, Window::Day),
            count: 500,
            limit: 500,
        });
        let d = decide(&p, &champa(), &refused, NOW);
        assert_eq!(d.action, Action::Continue);
        assert_eq!(d.outcomes[0].kind, "would_tempfail");
        assert_eq!(p.rule(RuleId::R14).mode, Mode::Monitor);
    }

    #[test]
    fn store_failure_follows_on_store_error() {
        let down = Err(StoreFailure("down".into()));
        let d = decide(&policy(""), &champa(), &down, NOW);
        let Action::Tempfail(r) = &d.action else {
            panic!("{d:?}")
        };
        assert_eq!((r.code, r.enhanced), (451, "4.3.0"));
        let open = policy("[rules.R14]\non_store_error = \"accept\"\n");
        assert_eq!(open.rule(RuleId::R14).on_store_error, OnError::Accept);
        let d = decide(&open, &champa(), &down, NOW);
        assert_eq!(d.action, Action::Continue);
        assert_eq!(d.outcomes[0].kind, "fail_open");
    }

    #[test]
    fn organisation_limits_are_off_by_default_and_only_set_ones_are_counted() {
        let none = Limits::from_rule(&policy("").rule(RuleId::R14));
        assert!(
            org_takes(&none, 0).is_empty(),
            "default: nothing per organisation"
        );
        let p = policy(
            "[rules.R14]\norg_messages_per_day = 2000\norg_recipients_per_hour = 0\norg_recipients_per_day = 9000\n",
        );
        let l = Limits::from_rule(&p.rule(RuleId::R14));
        let first = org_takes(&l, 0);
        assert_eq!(
            first
                .iter()
                .map(|t| (t.counter, t.limit))
                .collect::<Vec<_>>(),
            [
                (Counter::new(Measure::Messages, Window::Day), Some(2000)),
                (Counter::new(Measure::Recipients, Window::Day), Some(9000)),
            ]
        );
        let later = org_takes(&l, 1);
        assert_eq!(
            later.iter().map(|t| t.counter).collect::<Vec<_>>(),
            [Counter::new(Measure::Recipients, Window::Day)]
        );
        // The account's own counters are unchanged by organisation limits.
        assert_eq!(takes(&l, 0), takes(&Limits::DEFAULT, 0));
    }

    #[test]
    fn an_organisation_refusal_names_the_organisation() {
        let p = policy("");
        let by_org = Ok(JointTakeOutcome {
            outcome: TakeOutcome::Refused {
                counter: Counter::new(Measure::Recipients, Window::Hour),
                count: 50,
                limit: 50,
            },
            by_org: true,
        });
        let d = decide_joint(&p, &champa(), "mpt", &by_org, NOW);
        let Action::Tempfail(r) = &d.action else {
            panic!("{d:?}")
        };
        assert_eq!((r.code, r.enhanced), (450, "4.7.1"));
        assert!(
            r.text
                .contains("50 recipients per hour for all of organisation mpt"),
            "{}",
            r.text
        );
        assert!(r.text.contains("after 23:00 UTC"), "{}", r.text);
        let by_account = Ok(JointTakeOutcome {
            outcome: TakeOutcome::Refused {
                counter: Counter::new(Measure::Messages, Window::Hour),
                count: 100,
                limit: 100,
            },
            by_org: false,
        });
        let d = decide_joint(&p, &champa(), "mpt", &by_account, NOW);
        let Action::Tempfail(r) = &d.action else {
            panic!("{d:?}")
        };
        assert!(r.text.contains("for champa@mpt.gov.la"), "{}", r.text);
        let taken = Ok(JointTakeOutcome {
            outcome: TakeOutcome::Taken,
            by_org: false,
        });
        assert_eq!(
            decide_joint(&p, &champa(), "mpt", &taken, NOW),
            Decision::pass()
        );
        let down = Err(StoreFailure("down".into()));
        let d = decide_joint(&p, &champa(), "mpt", &down, NOW);
        assert!(matches!(d.action, Action::Tempfail(ref r) if r.code == 451));
    }
}
