//! Country of a login's address, from a MaxMind-format database (`maxminddb`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// An opened country database (GeoLite2/GeoIP2 Country or City, or any MMDB whose records
/// carry `country.iso_code` or `registered_country.iso_code`).
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// ISO 3166-1 alpha-2 code, upper case.
    Country(String),
    /// Loopback, private, link-local, shared (CGNAT), multicast or unspecified: no country.
    Private,
    /// Not in the database (or a record without a country).
    Unknown,
}

impl GeoIp {
    /// Reads the whole file into memory and checks that it is a MaxMind DB.
    pub fn open(path: &Path) -> Result<GeoIp, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        GeoIp::from_bytes(bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Result<GeoIp, String> {
        let reader = maxminddb::Reader::from_source(bytes)
            .map_err(|e| format!("not a MaxMind DB file: {e}"))?;
        Ok(GeoIp { reader })
    }

    /// The database's type as its metadata names it (`GeoLite2-Country`, ...).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// The country of `ip`.
    pub fn locate(&self, ip: IpAddr) -> Located {
        let ip = canonical(ip);
        if !is_public(ip) {
            return Located::Private;
        }
        let Ok(found) = self.reader.lookup(ip) else {
            // An IPv6 address in an IPv4-only database, or a damaged tree.
            return Located::Unknown;
        };
        let Ok(Some(record)) = found.decode::<maxminddb::geoip2::Country>() else {
            return Located::Unknown;
        };
        let code = record
            .country
            .iso_code
            .or(record.registered_country.iso_code)
            .unwrap_or("");
        if code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()) {
            Located::Country(code.to_ascii_uppercase())
        } else {
            Located::Unknown
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Whether an address can have a country: not loopback, private, link-local, shared
/// address space (RFC 6598), multicast, broadcast or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_unspecified()
                || in_v4(a, Ipv4Addr::new(100, 64, 0, 0), 10)
                || a.octets()[0] == 0)
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || in_v6(a, Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)
                || in_v6(a, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10))
        }
    }
}

fn in_v4(a: Ipv4Addr, net: Ipv4Addr, len: u32) -> bool {
    let mask = u32::MAX << (32 - len);
    u32::from(a) & mask == u32::from(net) & mask
}

fn in_v6(a: Ipv6Addr, net: Ipv6Addr, len: u32) -> bool {
    let mask = u128::MAX << (128 - len);
    u128::from(a) & mask == u128::from(net) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::alerts::tests::mmdb;

    fn db() -> GeoIp {
        let bytes = mmdb::Mmdb::new()
            .country("192.0.2.0/24", "LA")
            .country("198.51.100.0/25", "th")
            .country("2001:db8:1::/48", "FR")
            .build();
        GeoIp::from_bytes(bytes).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn finds_the_country_of_listed_networks_v4_and_v6() {
        let g = db();
        assert_eq!(g.database_type(), "mailwarden-Test-Country");
        assert_eq!(g.locate(ip("192.0.2.7")), Located::Country("LA".into()));
        assert_eq!(g.locate(ip("192.0.2.255")), Located::Country("LA".into()));
        assert_eq!(g.locate(ip("198.51.100.1")), Located::Country("TH".into()));
        assert_eq!(
            g.locate(ip("::ffff:198.51.100.1")),
            Located::Country("TH".into())
        );
        assert_eq!(
            g.locate(ip("2001:db8:1::25")),
            Located::Country("FR".into())
        );
    }

    #[test]
    fn unlisted_addresses_are_unknown() {
        let g = db();
        assert_eq!(g.locate(ip("198.51.100.200")), Located::Unknown);
        assert_eq!(g.locate(ip("203.0.113.1")), Located::Unknown);
        assert_eq!(g.locate(ip("2001:db8:2::1")), Located::Unknown);
    }

    #[test]
    fn private_and_loopback_addresses_have_no_country() {
        let g = db();
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.0.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(g.locate(ip(a)), Located::Private, "{a}");
        }
    }

    #[test]
    fn garbage_is_not_a_database() {
        let e = GeoIp::from_bytes(b"not an mmdb".to_vec()).err().unwrap();
        assert!(e.contains("not a MaxMind DB"), "{e}");
    }
}
