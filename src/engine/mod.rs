//! Pure decisions: no I/O, no clock. The caller looks up the facts (directory records) and
//! passes them in with the transaction; every rule is testable with a plain `#[test]`.

pub mod rules;

use crate::config::{Config, OnError, RuleConfig};
use crate::model::{Action, Address, Decision, Mode, Outcome, Reply, RuleId, Stage, Transaction};
use crate::store::{Account, Org};
use ipnet::IpNet;
use std::fmt;

/// What the directory says about one address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressFacts {
    /// The organisation owning the address's domain; `None` means the domain is not local.
    pub org: Option<Org>,
    /// The account, when the domain is local and the address is registered.
    pub account: Option<Account>,
}

impl AddressFacts {
    pub fn is_local(&self) -> bool {
        self.org.is_some()
    }
}

/// The result of a directory lookup as the engine sees it: facts, or "the store failed".
pub type Lookup = Result<AddressFacts, StoreFailure>;

/// The store could not answer in time; the detail is for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure(pub String);

/// Per-rule settings the engine needs, extracted from a config snapshot.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<(RuleId, RuleConfig)>,
    /// R10: clients trusted to relay for every local domain (`[rules.R10] trusted_networks`).
    pub relay_trusted_networks: Vec<IpNet>,
    /// R11: clients that may submit without TLS (`[rules.R11] exempt_networks`).
    pub tls_exempt_networks: Vec<IpNet>,
    /// R8: the domain of SASL logins without `@` (`[rules.R8] login_domain`).
    pub login_domain: Option<String>,
}

impl Policy {
    pub fn from_config(config: &Config) -> Policy {
        Policy {
            rules: crate::config::KNOWN_RULES
                .iter()
                .map(|&r| (r, config.rule(r)))
                .collect(),
            relay_trusted_networks: config.relay_trusted_networks(),
            tls_exempt_networks: config.tls_exempt_networks(),
            login_domain: config.login_domain(),
        }
    }

    pub fn rule(&self, id: RuleId) -> RuleConfig {
        self.rules
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }

    /// True when any of `ids` is evaluated at all (not `off`): only then is a lookup needed.
    pub fn any_active(&self, ids: &[RuleId]) -> bool {
        ids.iter().any(|&r| self.rule(r).mode != Mode::Off)
    }
}

/// Rules that judge the envelope sender at MAIL (and need its directory lookup).
pub const SENDER_RULES: [RuleId; 4] = [RuleId::R2, RuleId::R9, RuleId::R10, RuleId::R11];
/// Of those, the rules that judge the sender's own account (the lookup is always needed).
const SENDER_ACCOUNT_RULES: [RuleId; 2] = [RuleId::R2, RuleId::R9];
/// Rules that judge a recipient at RCPT.
pub const RECIPIENT_RULES: [RuleId; 2] = [RuleId::R2, RuleId::R1];

/// Accumulates rule results for one stage into a decision, honouring each rule's mode.
pub(crate) struct Verdicts<'a> {
    policy: &'a Policy,
    stage: Stage,
    decision: Decision,
}

impl<'a> Verdicts<'a> {
    pub(crate) fn new(policy: &'a Policy, stage: Stage) -> Self {
        Verdicts {
            policy,
            stage,
            decision: Decision::pass(),
        }
    }

    /// Records that `rule` objects to `subject` with `reply`. The first enforced objection
    /// sets the action; monitored ones are only recorded as "would_…".
    pub(crate) fn violation(&mut self, rule: RuleId, subject: &dyn fmt::Display, reply: Reply) {
        let mode = self.policy.rule(rule).mode;
        let permanent = reply.is_permanent();
        let kind = match (mode, permanent) {
            (Mode::Off, _) => return,
            (Mode::Monitor, true) => "would_reject",
            (Mode::Monitor, false) => "would_tempfail",
            (Mode::Enforce, true) => "reject",
            (Mode::Enforce, false) => "tempfail",
        };
        if mode == Mode::Enforce && self.decision.action == Action::Continue {
            self.decision.action = Action::from_reply(reply.clone());
        } else if mode == Mode::Enforce {
            // An earlier rule already decided; this one is not reported as acting.
            return;
        }
        self.decision.outcomes.push(Outcome {
            rule,
            stage: self.stage,
            kind,
            reply,
            subject: subject.to_string(),
        });
    }

    /// The lookup the rules need failed: each active rule applies its `on_store_error`.
    pub(crate) fn store_failure(&mut self, rules: &[RuleId], subject: &dyn fmt::Display) {
        for &rule in rules {
            let cfg = self.policy.rule(rule);
            if cfg.mode == Mode::Off {
                continue;
            }
            match cfg.on_store_error {
                OnError::Tempfail => self.violation(rule, subject, Reply::store_unavailable()),
                OnError::Accept => self.decision.outcomes.push(Outcome {
                    rule,
                    stage: self.stage,
                    kind: "fail_open",
                    reply: Reply::store_unavailable(),
                    subject: subject.to_string(),
                }),
            }
        }
    }

    pub(crate) fn finish(self) -> Decision {
        self.decision
    }
}

/// MAIL stage: judges the envelope sender. `lookup` is `None` for the null sender or a sender
/// that does not parse (nothing in the directory to judge). Without send-as facts: see
/// [`check_sender_as`].
pub fn check_sender(policy: &Policy, tx: &Transaction, lookup: Option<&Lookup>) -> Decision {
    check_sender_as(policy, tx, lookup, None)
}

/// MAIL stage, with what the directory says about the SASL login (`identity`, R8; `None`
/// when the client did not authenticate or R8 is off).
pub fn check_sender_as(
    policy: &Policy,
    tx: &Transaction,
    lookup: Option<&Lookup>,
    identity: Option<&rules::sendas::Identity>,
) -> Decision {
    let mut v = Verdicts::new(policy, Stage::Mail);
    let sender = tx.sender.as_ref().and_then(|s| s.address());
    if let (Some(sender), Some(lookup)) = (sender, lookup) {
        match lookup {
            Ok(facts) => rules::directory::sender(&mut v, sender, facts),
            Err(_) => v.store_failure(&SENDER_ACCOUNT_RULES, sender),
        }
    }
    // Is the envelope sender in a local domain? `Ok(None)`: no (or no address at all).
    let sender_org = match (sender, lookup) {
        (Some(_), Some(Ok(facts))) => Ok(facts.org.as_ref()),
        (Some(_), Some(Err(e))) => Err(e),
        _ => Ok(None),
    };
    if let Some(sender) = sender {
        rules::submission::relay(&mut v, tx, sender, sender_org);
    }
    rules::submission::tls(&mut v, tx, sender_org);
    if let Some(id) = identity {
        rules::sendas::envelope(&mut v, tx, id);
    }
    v.finish()
}

/// End of headers (milter): judges the `From:` and `Sender:` fields of an authenticated
/// client's message against its login (R8).
pub fn check_headers(
    policy: &Policy,
    tx: &Transaction,
    identity: &rules::sendas::Identity,
) -> Decision {
    let mut v = Verdicts::new(policy, Stage::EndOfMessage);
    rules::sendas::headers(&mut v, tx, identity);
    v.finish()
}

/// RCPT stage: judges one recipient.
pub fn check_recipient(
    policy: &Policy,
    _tx: &Transaction,
    rcpt: &Address,
    lookup: &Lookup,
) -> Decision {
    let mut v = Verdicts::new(policy, Stage::Rcpt);
    match lookup {
        Ok(facts) => rules::directory::recipient(&mut v, rcpt, facts),
        Err(_) => v.store_failure(&RECIPIENT_RULES, rcpt),
    }
    v.finish()
}
