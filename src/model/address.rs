//! Mail addresses, normalised for matching against the directory.

use std::fmt;

/// A mailbox address `local@domain`, lower-cased on parse.
///
/// Government names are case-insensitive (Art. 9.3: a name differing only in case is the same
/// name), so the directory, the engine and the stores all compare the normalised form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    local: String,
    domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address has no '@'")]
    MissingAt,
    #[error("address has an empty local part")]
    EmptyLocal,
    #[error("address has an empty domain")]
    EmptyDomain,
    #[error("local part is longer than 64 octets")]
    LocalTooLong,
    #[error("domain is longer than 253 octets")]
    DomainTooLong,
    #[error("address contains whitespace, a control character or angle brackets")]
    BadCharacter,
    #[error("domain label is empty or malformed")]
    BadDomain,
}

impl Address {
    /// Parses `local@domain` (no angle brackets, no display name).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        {
            return Err(AddressError::BadCharacter);
        }
        let (local, domain) = s.rsplit_once('@').ok_or(AddressError::MissingAt)?;
        if local.is_empty() {
            return Err(AddressError::EmptyLocal);
        }
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() {
            return Err(AddressError::EmptyDomain);
        }
        if local.len() > 64 {
            return Err(AddressError::LocalTooLong);
        }
        if domain.len() > 253 {
            return Err(AddressError::DomainTooLong);
        }
        if domain
            .split('.')
            .any(|l| l.is_empty() || l.starts_with('-') || l.ends_with('-'))
        {
            return Err(AddressError::BadDomain);
        }
        Ok(Address {
            local: local.to_lowercase(),
            domain: domain.to_ascii_lowercase(),
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl std::str::FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Address::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercases_and_splits() {
        let a = Address::parse("DG-Cabinet@MPT.Gov.La.").unwrap();
        assert_eq!(a.local(), "dg-cabinet");
        assert_eq!(a.domain(), "mpt.gov.la");
        assert_eq!(a.to_string(), "dg-cabinet@mpt.gov.la");
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Address::parse("nobody"), Err(AddressError::MissingAt));
        assert_eq!(Address::parse("@mpt.gov.la"), Err(AddressError::EmptyLocal));
        assert_eq!(Address::parse("a@"), Err(AddressError::EmptyDomain));
        assert_eq!(Address::parse("a b@x.la"), Err(AddressError::BadCharacter));
        assert_eq!(Address::parse("a@x..la"), Err(AddressError::BadDomain));
        assert_eq!(
            Address::parse(&format!("{}@x.la", "a".repeat(65))),
            Err(AddressError::LocalTooLong)
        );
    }
}
