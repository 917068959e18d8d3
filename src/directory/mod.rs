//! Registration rules: R3 (address structure, Art. 8–9), R4 (first come, first served, with
//! suggestions, Art. 9.3), R5 (account kinds, Art. 9.2).
//!
//! Pure logic, no I/O: the admin API validates every registration here before it asks the
//! store, and asks the store which of [`Rules::suggestions`] are taken when a name is refused.
//! Every error says, in plain words, which rule was broken and what is allowed.

use crate::config::DirectoryConfig;
use crate::model::Address;
use crate::store::{AccountKind, AccountStatus};

/// A registration input that breaks a rule. The message names the rule and what it allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "organisation code {code:?} is invalid: R3 (Art. 8.2) allows 1 to {max} ASCII letters (a-z); {problem}"
    )]
    OrgCode {
        code: String,
        max: usize,
        problem: String,
    },
    #[error(
        "local part {local:?} is invalid: R3 (Art. 8.3) allows 1 to {max} characters of a-z 0-9 . _ -, starting with a letter, with no leading, trailing or double dot; {problem}"
    )]
    LocalPart {
        local: String,
        max: usize,
        problem: String,
    },
    #[error(
        "domain {domain:?} is invalid: R3 (Art. 8.1) needs a domain name like mpt.gov.la; {problem}"
    )]
    Domain { domain: String, problem: String },
    #[error("address {address:?} is invalid: R3 (Art. 8) needs local-part@domain; {problem}")]
    Address { address: String, problem: String },
    #[error("account kind {kind:?} is invalid: R5 (Art. 9.2) allows unit, position or person")]
    Kind { kind: String },
    #[error("status {status:?} is invalid for a new account: use pending or active")]
    InitialStatus { status: String },
    #[error("{field} is invalid: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

/// Longest free-text field (names, reasons) accepted, in characters.
pub const MAX_TEXT_LEN: usize = 256;

/// The registration rules in force (from `[directory]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub base_domain: String,
    pub org_code_max_len: usize,
    pub local_part_max_len: usize,
    pub suggestions: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::from_config(&DirectoryConfig::default())
    }
}

/// What is known about the holder of a wanted name; used only to make better suggestions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Holder<'a> {
    /// The holder's name ("Champa Souksavanh"); its last word gives an initial.
    pub name: Option<&'a str>,
    pub kind: Option<AccountKind>,
    /// The organisation code ("mpt").
    pub org: Option<&'a str>,
}

impl Rules {
    pub fn from_config(c: &DirectoryConfig) -> Rules {
        Rules {
            base_domain: c.base_domain.to_ascii_lowercase(),
            org_code_max_len: c.org_code_max_len,
            local_part_max_len: c.local_part_max_len,
            suggestions: c.suggestions,
        }
    }

    /// R3, Art. 8.2: an organisation code is 1..=`org_code_max_len` ASCII letters. Returns it
    /// lower-cased.
    pub fn org_code(&self, code: &str) -> Result<String, RegistrationError> {
        let max = self.org_code_max_len;
        let bad = |problem: String| RegistrationError::OrgCode {
            code: code.to_owned(),
            max,
            problem,
        };
        if code.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if let Some(c) = code.chars().find(|c| !c.is_ascii_alphabetic()) {
            return Err(bad(format!("{c:?} is not a letter")));
        }
        if code.len() > max {
            return Err(bad(format!("it has {} letters", code.len())));
        }
        Ok(code.to_ascii_lowercase())
    }

    /// The mail domain of an organisation: `domain` when given (validated, lower-cased), else
    /// `<code>.<base_domain>`. `code` must already be valid.
    pub fn org_domain(
        &self,
        code: &str,
        domain: Option<&str>,
    ) -> Result<String, RegistrationError> {
        match domain.map(str::trim).filter(|d| !d.is_empty()) {
            None => Ok(format!("{code}.{}", self.base_domain)),
            Some(d) => domain_name(d),
        }
    }

    /// R3, Art. 8.3: a local part is 1..=`local_part_max_len` characters of `a-z 0-9 . _ -`,
    /// starts with a letter, and has no leading, trailing or double dot. Input is case-folded;
    /// returns the normalised form.
    pub fn local_part(&self, local: &str) -> Result<String, RegistrationError> {
        let max = self.local_part_max_len;
        let bad = |problem: String| RegistrationError::LocalPart {
            local: local.to_owned(),
            max,
            problem,
        };
        let l = local.to_lowercase();
        if l.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if let Some(c) = l.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        }) {
            return Err(bad(format!("{c:?} is not allowed")));
        }
        let n = l.chars().count();
        if n > max {
            return Err(bad(format!("it has {n} characters")));
        }
        if l.starts_with('.') || l.ends_with('.') {
            return Err(bad("it starts or ends with a dot".into()));
        }
        if l.contains("..") {
            return Err(bad("it has two dots in a row".into()));
        }
        if !l.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(bad("it does not start with a letter".into()));
        }
        Ok(l)
    }

    /// A whole address to register: R3 for the local part, a valid domain. Lower-cased.
    pub fn address(&self, address: &str) -> Result<Address, RegistrationError> {
        let address = address.trim();
        let Some((local, domain)) = address.rsplit_once('@') else {
            return Err(RegistrationError::Address {
                address: address.to_owned(),
                problem: "it has no '@'".into(),
            });
        };
        let local = self.local_part(local)?;
        let domain = domain_name(domain)?;
        Address::parse(&format!("{local}@{domain}")).map_err(|e| RegistrationError::Address {
            address: address.to_owned(),
            problem: e.to_string(),
        })
    }

    /// Free-alternative candidates for a refused local part (R4), best first, each passing R3,
    /// none equal to `wanted`. Deterministic. The caller removes the taken ones and keeps the
    /// first [`Rules::suggestions`].
    ///
    /// Order for persons (and unknown kinds): name-based (`champa.s`, `champa_s`, `champa-s`
    /// from the surname initial of the holder's name), then `champa2`, then the organisation
    /// suffix (`champa-mpt`, `champa.mpt`), then `champa3` … `champa99`. Units and positions
    /// are named after the organisation's structure, so they get the organisation suffix first.
    /// Long names are shortened so that every candidate fits the length limit.
    pub fn suggestions(&self, wanted: &str, holder: &Holder<'_>) -> Vec<String> {
        let wanted = wanted.to_lowercase();
        let initial = holder.name.and_then(|n| {
            n.split_whitespace()
                .last()
                .and_then(|w| w.chars().next())
                .filter(char::is_ascii_alphabetic)
                .map(|c| c.to_ascii_lowercase())
        });
        let org = holder
            .org
            .map(str::to_ascii_lowercase)
            .filter(|o| !o.is_empty() && o.chars().all(|c| c.is_ascii_lowercase()));

        let mut suffixes: Vec<String> = Vec::new();
        let name_based = |s: &mut Vec<String>| {
            if let Some(i) = initial {
                for sep in ['.', '_', '-'] {
                    s.push(format!("{sep}{i}"));
                }
            }
        };
        let org_based = |s: &mut Vec<String>| {
            if let Some(o) = &org {
                s.push(format!("-{o}"));
                s.push(format!(".{o}"));
            }
        };
        match holder.kind {
            // Units and positions are named after the organisation's structure, not a person.
            Some(AccountKind::Unit | AccountKind::Position) => {
                org_based(&mut suffixes);
                suffixes.push("2".into());
                name_based(&mut suffixes);
            }
            _ => {
                name_based(&mut suffixes);
                suffixes.push("2".into());
                org_based(&mut suffixes);
            }
        }
        suffixes.extend((3..=99).map(|n| n.to_string()));

        let mut out: Vec<String> = Vec::new();
        for suffix in suffixes {
            let Some(c) = self.fit(&wanted, &suffix) else {
                continue;
            };
            if c != wanted && !out.contains(&c) && self.local_part(&c).is_ok() {
                out.push(c);
            }
        }
        out
    }

    /// `base + suffix`, shortening `base` (never the suffix) to fit the length limit.
    fn fit(&self, base: &str, suffix: &str) -> Option<String> {
        let room = self
            .local_part_max_len
            .checked_sub(suffix.chars().count())?;
        let mut b: String = base.chars().take(room).collect();
        // A shortened base must not end in a separator ("dg-" + "2").
        while b.ends_with(['.', '_', '-']) {
            b.pop();
        }
        if b.is_empty() {
            return None;
        }
        Some(format!("{b}{suffix}"))
    }
}

/// A domain name, lower-cased; labels of letters, digits and hyphens.
pub fn domain_name(domain: &str) -> Result<String, RegistrationError> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let bad = |problem: String| RegistrationError::Domain {
        domain: domain.to_owned(),
        problem,
    };
    if d.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if d.len() > 253 {
        return Err(bad("it is longer than 253 characters".into()));
    }
    if !d.contains('.') {
        return Err(bad("it has only one label".into()));
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad(format!(
                "label {label:?} is empty or longer than 63 characters"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad(format!("label {label:?} starts or ends with '-'")));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(bad(format!("{c:?} is not allowed in a domain name")));
        }
    }
    Ok(d)
}

/// R5, Art. 9.2: `unit`, `position` or `person` (any case).
pub fn account_kind(kind: &str) -> Result<AccountKind, RegistrationError> {
    kind.trim().parse().map_err(|_| RegistrationError::Kind {
        kind: kind.to_owned(),
    })
}

/// The status a new account may start in: `pending` (may not send until activated, R9) or
/// `active`. `None` means `active`: a registrar with the `write` scope approves by registering.
pub fn initial_status(status: Option<&str>) -> Result<AccountStatus, RegistrationError> {
    match status.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(AccountStatus::Active),
        Some(s) => match s.parse() {
            Ok(st @ (AccountStatus::Pending | AccountStatus::Active)) => Ok(st),
            _ => Err(RegistrationError::InitialStatus { status: s.into() }),
        },
    }
}

/// A free-text field (name, reason): trimmed, at most [`MAX_TEXT_LEN`] characters, no control
/// characters (they would corrupt tables and logs). Empty becomes `None`.
pub fn text(field: &'static str, value: Option<&str>) -> Result<Option<String>, RegistrationError> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if v.chars().count() > MAX_TEXT_LEN {
        return Err(RegistrationError::Field {
            field,
            problem: format!("longer than {MAX_TEXT_LEN} characters"),
        });
    }
    if v.chars().any(char::is_control) {
        return Err(RegistrationError::Field {
            field,
            problem: "contains a control character (newline, tab, …)".into(),
        });
    }
    Ok(Some(v.to_owned()))
}

#[cfg(test)]
mod tests;
