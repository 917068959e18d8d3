//! R13 (Art. 16.7): per-account storage quota. Mail for an account over its granted
//! capacity (its own quota, else its organisation's default) is refused:
//!
//! - at RCPT, when the usage already reaches the quota, or when the size the client
//!   announced (`SIZE=`) would take it past;
//! - at end of message, with the actual size, when usage plus that size would pass the
//!   quota of any accepted recipient (the whole message: SMTP has no per-recipient reply
//!   after DATA).
//!
//! The reply is `452 4.2.2` (the sender's MTA retries; the owner may make room), or
//! `552 5.2.2` with `[rules.R13] permanent = true`. The checker reads the usage; this module
//! decides from it.

use crate::engine::{Policy, StoreFailure, Verdicts};
use crate::model::{Address, Decision, Reply, RuleId, Stage};
#[cfg(doc)]
use crate::store::Account;

/// Judges one recipient against its effective quota (`None`: no limit, see
/// [`Account::effective_quota`]) at `stage` (RCPT, or end of message). `usage` is the
/// current usage (`None`: never reported, counted as 0); `size` the announced (RCPT) or
/// actual (end of message) message size.
pub fn check(
    policy: &Policy,
    stage: Stage,
    rcpt: &Address,
    quota: Option<u64>,
    usage: &Result<Option<u64>, StoreFailure>,
    size: Option<u64>,
) -> Decision {
    let mut v = Verdicts::new(policy, stage);
    let Some(quota) = quota else {
        return v.finish();
    };
    let used = match usage {
        Ok(u) => u.unwrap_or(0),
        Err(_) => {
            v.store_failure(&[RuleId::R13], rcpt);
            return v.finish();
        }
    };
    let incoming = size.unwrap_or(0);
    if used >= quota || used.saturating_add(incoming) > quota {
        let permanent = policy.rule(RuleId::R13).permanent.unwrap_or(false);
        // RFC 3463 X.2.2: mailbox full. 452 (RFC 5321: insufficient storage, retry) unless
        // the operator made it permanent (552: exceeded storage allocation).
        let reply = if permanent {
            Reply::new(
                552,
                "5.2.2",
                format!("Mailbox {rcpt} is full: it is over its storage quota"),
            )
        } else {
            Reply::new(
                452,
                "4.2.2",
                format!("Mailbox {rcpt} is full: it is over its storage quota; try again later"),
            )
        };
        v.violation(RuleId::R13, rcpt, reply);
    }
    v.finish()
}

/// The recipient's account could not be read: R13 applies its `on_store_error`.
pub fn store_failure(policy: &Policy, stage: Stage, rcpt: &Address) -> Decision {
    let mut v = Verdicts::new(policy, stage);
    v.store_failure(&[RuleId::R13], rcpt);
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::Action;
    use crate::store::testing::{account, org};
    use crate::store::{Account, Org};

    fn policy(toml: &str) -> Policy {
        Policy::from_config(&Config::from_toml(toml).unwrap())
    }

    fn with_quota(q: Option<u64>) -> Account {
        Account {
            quota_bytes: q,
            ..account("champa@mpt.gov.la", "mpt")
        }
    }

    fn code(d: &Decision) -> Option<(u16, &'static str)> {
        match &d.action {
            Action::Continue => None,
            Action::Reject(r) | Action::Tempfail(r) => Some((r.code, r.enhanced)),
        }
    }

    #[test]
    fn usage_plus_announced_size_is_compared_with_the_quota() {
        let p = policy("");
        let a = with_quota(Some(1000));
        let rcpt = a.address.clone();
        assert_eq!(
            code(&check(
                &p,
                Stage::Rcpt,
                &rcpt,
                a.quota_bytes,
                &Ok(Some(900)),
                Some(100)
            )),
            None
        );
        assert_eq!(
            code(&check(
                &p,
                Stage::Rcpt,
                &rcpt,
                a.quota_bytes,
                &Ok(Some(900)),
                Some(101)
            )),
            Some((452, "4.2.2"))
        );
        // Already full: refused even without SIZE=.
        assert_eq!(
            code(&check(
                &p,
                Stage::Rcpt,
                &rcpt,
                a.quota_bytes,
                &Ok(Some(1000)),
                None
            )),
            Some((452, "4.2.2"))
        );
        // Never reported: 0 used.
        assert_eq!(
            code(&check(
                &p,
                Stage::Rcpt,
                &rcpt,
                a.quota_bytes,
                &Ok(None),
                Some(1000)
            )),
            None
        );
        // No quota: no limit.
        let free = with_quota(None);
        assert_eq!(
            code(&check(
                &p,
                Stage::Rcpt,
                &rcpt,
                free.quota_bytes,
                &Ok(Some(u64::MAX)),
                Some(1)
            )),
            None
        );
    }

    #[test]
    fn permanent_makes_it_552_and_store_failures_follow_on_store_error() {
        let p = policy("[rules.R13]\npermanent = true\n");
        let a = with_quota(Some(10));
        let d = check(
            &p,
            Stage::Rcpt,
            &a.address,
            a.quota_bytes,
            &Ok(Some(5)),
            Some(6),
        );
        assert_eq!(code(&d), Some((552, "5.2.2")));
        assert_eq!(d.outcomes[0].rule, RuleId::R13);
        let down = Err(StoreFailure("down".into()));
        assert_eq!(
            code(&check(
                &p,
                Stage::Rcpt,
                &a.address,
                a.quota_bytes,
                &down,
                None
            )),
            Some((451, "4.3.0"))
        );
        let open = policy("[rules.R13]\non_store_error = \"accept\"\n");
        assert_eq!(
            code(&check(
                &open,
                Stage::Rcpt,
                &a.address,
                a.quota_bytes,
                &down,
                None
            )),
            None
        );
    }

    #[test]
    fn the_account_quota_wins_over_the_organisation_default() {
        let with_default = Org {
            default_quota_bytes: Some(1000),
            ..org("mpt")
        };
        assert_eq!(
            with_quota(None).effective_quota(Some(&with_default)),
            Some(1000)
        );
        assert_eq!(
            with_quota(Some(50)).effective_quota(Some(&with_default)),
            Some(50)
        );
        assert_eq!(with_quota(None).effective_quota(Some(&org("mpt"))), None);
        assert_eq!(with_quota(None).effective_quota(None), None);
        assert_eq!(with_quota(Some(0)).effective_quota(None), Some(0));
    }

    #[test]
    fn at_end_of_message_the_actual_size_decides_at_that_stage() {
        let p = policy("");
        let a = with_quota(Some(1000));
        // Usage 600: a 400-byte message fits exactly, a 401-byte one does not.
        let fits = check(
            &p,
            Stage::EndOfMessage,
            &a.address,
            Some(1000),
            &Ok(Some(600)),
            Some(400),
        );
        assert_eq!(code(&fits), None);
        let d = check(
            &p,
            Stage::EndOfMessage,
            &a.address,
            Some(1000),
            &Ok(Some(600)),
            Some(401),
        );
        assert_eq!(code(&d), Some((452, "4.2.2")));
        assert_eq!(d.outcomes[0].stage, Stage::EndOfMessage);
        assert_eq!(d.outcomes[0].subject, "champa@mpt.gov.la");
        let permanent = policy("[rules.R13]\npermanent = true\n");
        let d = check(
            &permanent,
            Stage::EndOfMessage,
            &a.address,
            Some(1000),
            &Ok(None),
            Some(1001),
        );
        assert_eq!(code(&d), Some((552, "5.2.2")));
        let monitor = policy("[rules.R13]\nmode = \"monitor\"\n");
        let d = check(
            &monitor,
            Stage::EndOfMessage,
            &a.address,
            Some(1000),
            &Ok(Some(999)),
            Some(2),
        );
        assert_eq!(d.action, Action::Continue);
        assert_eq!(d.outcomes[0].kind, "would_tempfail");
    }
}
