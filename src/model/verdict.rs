//! What the engine answers: an action for the MTA plus one typed outcome per rule that fired.

use std::fmt;

/// Rule ids from `REQUIREMENTS.md`; used in config keys, logs and metric labels.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum RuleId {
    R1,
    R2,
    R6,
    /// Inbound mail claiming a local From without coming through the government system.
    R7,
    /// Send-as (Art. 20.4, 20.7): an authenticated sender uses only its own or delegated addresses.
    R8,
    R9,
    R10,
    R11,
    R13,
    R14,
    R15,
    /// Not a policy rule: the store or another service needed by a rule failed.
    Store,
}

impl RuleId {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleId::R1 => "R1",
            RuleId::R2 => "R2",
            RuleId::R6 => "R6",
            RuleId::R7 => "R7",
            RuleId::R8 => "R8",
            RuleId::R9 => "R9",
            RuleId::R10 => "R10",
            RuleId::R11 => "R11",
            RuleId::R13 => "R13",
            RuleId::R14 => "R14",
            RuleId::R15 => "R15",
            RuleId::Store => "store",
        }
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a rule is applied, per rule in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reject or tempfail as the rule says.
    #[default]
    Enforce,
    /// Log and count "would reject", let the mail through.
    Monitor,
    /// Do not evaluate the rule at all.
    Off,
}

/// An SMTP reply: basic code, RFC 3463 enhanced status code and a plain-words text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Reply {
        debug_assert!((400..600).contains(&code));
        debug_assert_eq!(enhanced.as_bytes()[0], b'0' + (code / 100) as u8);
        Reply {
            code,
            enhanced,
            text: sanitize_text(&text.into()),
        }
    }

    /// `451 4.3.0`: a service a rule depends on failed; the MTA should retry later.
    pub fn store_unavailable() -> Reply {
        Reply::new(
            451,
            "4.3.0",
            "Temporary policy service failure, please try again later",
        )
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

/// Reply texts go onto one SMTP line: no CR/LF or other control characters.
fn sanitize_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.enhanced, self.text)
    }
}

/// What the front-end tells the MTA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to object to: carry on (milter `Continue`, policy `DUNNO`).
    Continue,
    /// Permanent refusal (5xx).
    Reject(Reply),
    /// Temporary refusal (4xx): the MTA or client retries.
    Tempfail(Reply),
}

impl Action {
    pub fn from_reply(reply: Reply) -> Action {
        if reply.is_permanent() {
            Action::Reject(reply)
        } else {
            Action::Tempfail(reply)
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Action::Continue => "continue",
            Action::Reject(_) => "reject",
            Action::Tempfail(_) => "tempfail",
        }
    }
}

/// What one rule did, one event per rule that fired; feeds the log line and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub rule: RuleId,
    pub stage: super::Stage,
    /// `reject`, `tempfail`, `would_reject`, `would_tempfail`, `fail_open`.
    pub kind: &'static str,
    pub reply: Reply,
    /// The address or object the rule judged, for the log (never message content).
    pub subject: String,
}

/// The engine's answer for one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub outcomes: Vec<Outcome>,
}

impl Decision {
    pub fn pass() -> Decision {
        Decision {
            action: Action::Continue,
            outcomes: Vec::new(),
        }
    }
}
