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
        // A quoted local part that needs no quoting names the same mailbox as without them
        // (RFC 5321 4.1.2; Postfix delivers both alike): `"cabinet"@` is `cabinet@`.
        let unquoted = unquote(local);
        let local = unquoted.as_deref().unwrap_or(local);
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

    /// Where Postfix's old routing syntax sends this address when its domain is one of the
    /// MTA's own destinations: `user%domain@host` (`allow_percent_hack`, the last `%`) and
    /// `domain!user@host` (`swap_bangpath`, the first `!`) both mean `user@domain`. `None`
    /// when the local part has neither, or what they name is not an address.
    pub fn routed(&self) -> Option<Address> {
        let (user, domain) = match self.local.split_once('!') {
            Some((domain, user)) => (user, domain),
            None => {
                let (user, domain) = self.local.rsplit_once('%')?;
                (user, domain)
            }
        };
        Address::parse(&format!("{user}@{domain}")).ok()
    }

    /// The address without its extension: the local part cut at the first of `delimiters`
    /// (Postfix's `recipient_delimiter`), e.g. `cabinet+news@mpt.gov.la` gives
    /// `cabinet@mpt.gov.la`. `None` when there is no extension to cut (no delimiter, or one
    /// that starts the local part).
    pub fn without_extension(&self, delimiters: &str) -> Option<Address> {
        let at = self.local.find(|c| delimiters.contains(c))?;
        (at > 0).then(|| Address {
            local: self.local[..at].to_owned(),
            domain: self.domain.clone(),
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }
}

/// The content of a quoted local part (`"..."`, backslash escapes resolved) when it is a
/// dot-atom, i.e. when the quotes change nothing; `None` otherwise (not quoted, or quoting
/// characters a plain local part cannot hold: that is another mailbox name, kept as given).
fn unquote(local: &str) -> Option<String> {
    let inner = local.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !out.is_empty()
        && out
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    dot_atom.then_some(out)
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
    fn needless_quotes_name_the_same_mailbox() {
        let plain = Address::parse("cabinet@mpt.gov.la").unwrap();
        for quoted in [
            "\"cabinet\"@mpt.gov.la",
            "\"Cabinet\"@MPT.gov.la",
            "\"cab\\inet\"@mpt.gov.la",
        ] {
            assert_eq!(Address::parse(quoted).unwrap(), plain, "{quoted}");
        }
        assert_eq!(
            Address::parse("\"dg.cabinet\"@mpt.gov.la").unwrap().local(),
            "dg.cabinet"
        );
        // Quotes that matter keep the name apart (no account can have such a name, R3).
        for kept in ["\"a@b\"@x.la", "\"a..b\"@x.la", "\".a\"@x.la", "\"\"@x.la"] {
            let a = Address::parse(kept).unwrap();
            assert!(a.local().starts_with('"'), "{kept}: {a}");
        }
    }

    #[test]
    fn percent_and_bang_paths_name_the_routed_address() {
        let routed = |s: &str| Address::parse(s).unwrap().routed().map(|a| a.to_string());
        assert_eq!(
            routed("cabinet%mpt.gov.la@localhost").as_deref(),
            Some("cabinet@mpt.gov.la")
        );
        assert_eq!(
            routed("a%b%mpt.gov.la@localhost").as_deref(),
            Some("a%b@mpt.gov.la")
        );
        assert_eq!(
            routed("mpt.gov.la!cabinet@localhost").as_deref(),
            Some("cabinet@mpt.gov.la")
        );
        assert_eq!(routed("cabinet@mpt.gov.la"), None);
        assert_eq!(routed("%x@localhost"), None, "no user");
        assert_eq!(routed("cabinet%@localhost"), None, "no domain");
    }

    #[test]
    fn extensions_are_cut_at_the_first_delimiter() {
        let a = Address::parse("cabinet+news+x@mpt.gov.la").unwrap();
        assert_eq!(
            a.without_extension("+").unwrap().to_string(),
            "cabinet@mpt.gov.la"
        );
        let b = Address::parse("dg-cabinet+news@mpt.gov.la").unwrap();
        assert_eq!(b.without_extension("-+").unwrap().local(), "dg");
        assert_eq!(b.without_extension(""), None);
        assert_eq!(
            Address::parse("cabinet@mpt.gov.la")
                .unwrap()
                .without_extension("+"),
            None
        );
        assert_eq!(
            Address::parse("+x@mpt.gov.la")
                .unwrap()
                .without_extension("+"),
            None
        );
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
