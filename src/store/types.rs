//! Directory records as stored.

use crate::model::Address;
use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// Seconds since the Unix epoch (UTC). The engine gets time passed in, never reads a clock.
pub type Timestamp = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrgStatus {
    Active,
    /// The organisation ceased to exist (Art. 16.5): no mail to or from its accounts.
    Ceased,
}

/// Account kinds of Art. 9.2 (R5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    /// An organisational unit: `cabinet@`.
    Unit,
    /// A position: `dg-cabinet@`.
    Position,
    /// A named official: `champa@`.
    Person,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    /// Registered, not yet approved: may not send (Art. 20.8, R9).
    Pending,
    Active,
    /// Temporarily disabled: receives nothing (Art. 14.1, R1).
    Suspended,
    /// Taken away (Art. 16.3–16.6, R2): receives nothing, cannot be used as a sender.
    Withdrawn,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($s => Ok(Self::$v),)+
                    _ => Err(format!("{s:?} is not one of {}", [$($s),+].join(", "))),
                }
            }
        }
    };
}

str_enum!(OrgStatus { Active => "active", Ceased => "ceased" });
str_enum!(AccountKind { Unit => "unit", Position => "position", Person => "person" });
str_enum!(AccountStatus {
    Pending => "pending",
    Active => "active",
    Suspended => "suspended",
    Withdrawn => "withdrawn",
});

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    /// Organisation code, the 3LD: `mpt`. Lower case.
    pub code: String,
    /// Full name: "Ministry of Posts and Telecommunications".
    pub name: String,
    /// Mail domain, `<code>.<base_domain>` unless registered otherwise. Lower case.
    pub domain: String,
    pub status: OrgStatus,
    pub status_reason: Option<String>,
    pub created_at: Timestamp,
    pub status_changed_at: Timestamp,
    /// R10 (Art. 7): the networks the organisation's own mail servers relay from, in
    /// canonical form (host bits cleared), sorted. Empty: not declared (R10 does not apply).
    #[serde(default)]
    pub relay_networks: Vec<ipnet::IpNet>,
    /// R13: the storage quota in bytes of the organisation's accounts that have none of
    /// their own (see [`Account::effective_quota`]). `None`: no default.
    #[serde(default)]
    pub default_quota_bytes: Option<u64>,
}

/// The relay networks `current` with `add` added and `remove` removed: canonical (host bits
/// cleared), sorted, without duplicates. Both store backends apply changes with it.
pub fn changed_relays(
    current: &[ipnet::IpNet],
    add: &[ipnet::IpNet],
    remove: &[ipnet::IpNet],
) -> Vec<ipnet::IpNet> {
    let remove: Vec<ipnet::IpNet> = remove.iter().map(|n| n.trunc()).collect();
    let mut out: Vec<ipnet::IpNet> = current
        .iter()
        .chain(add)
        .map(|n| n.trunc())
        .filter(|n| !remove.contains(n))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub address: Address,
    /// Code of the organisation owning the address's domain.
    pub org: String,
    pub kind: AccountKind,
    pub status: AccountStatus,
    pub status_reason: Option<String>,
    /// Holder's name, for reports (not a credential).
    pub display_name: Option<String>,
    pub created_at: Timestamp,
    pub status_changed_at: Timestamp,
    /// Granted storage in bytes (R13). `None`: the organisation's default applies
    /// ([`Account::effective_quota`]).
    pub quota_bytes: Option<u64>,
    /// The bulk permission (Art. 20.3, 20.5): the account is exempt from sending limits (R14).
    #[serde(default)]
    pub bulk: bool,
}

impl Account {
    /// R13: the quota in force for this account: its own, else its organisation's default
    /// (`org` is the account's organisation, when known). `None`: no limit.
    pub fn effective_quota(&self, org: Option<&Org>) -> Option<u64> {
        self.quota_bytes
            .or_else(|| org.and_then(|o| o.default_quota_bytes))
    }
}

/// A status change request, stored with its reason and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange<S> {
    pub status: S,
    pub reason: Option<String>,
    pub at: Timestamp,
}

/// What recording one login's country found (R16, see [`super::Store::record_login_country`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginCountry {
    /// The country was not recorded for the account before this login.
    pub new: bool,
    /// The countries recorded before this login, sorted (empty at the first recorded login).
    pub known_before: Vec<String>,
}
