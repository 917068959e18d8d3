//! A minimal MaxMind DB writer for tests: an IPv6 tree (IPv4 networks under `::/96`, as
//! MaxMind's own databases have them), 24-bit records, and records of the shape
//! `{"country": {"iso_code": "LA"}}` that GeoIP2 Country databases carry.
//!
//! Format (MaxMind DB spec 2.0): the search tree (`node_count` nodes of two 24-bit records,
//! big-endian; a record below `node_count` points to a node, equal to it means "no data",
//! above it points into the data section at `record - node_count - 16`), 16 zero bytes,
//! the data section, then `\xAB\xCD\xEFMaxMind.com` and the metadata map.
//!
//! Also compiled into the library's unit tests (`src/alerts/geoip.rs`) with `#[path]`, so
//! there is one copy.
#![allow(dead_code)]

use std::net::IpAddr;

#[derive(Clone, Copy)]
enum Rec {
    Empty,
    Node(usize),
    Data(usize),
}

#[derive(Default)]
pub struct Mmdb {
    networks: Vec<(u128, u32, String)>,
}

impl Mmdb {
    pub fn new() -> Mmdb {
        Mmdb::default()
    }

    /// Adds `cidr` (`192.0.2.0/24`, `2001:db8::/32`) located in `iso_code`. Networks must
    /// not overlap.
    pub fn country(mut self, cidr: &str, iso_code: &str) -> Mmdb {
        let (addr, len) = cidr.split_once('/').expect("CIDR");
        let len: u32 = len.parse().expect("prefix length");
        let (bits, len) = match addr.parse::<IpAddr>().expect("address") {
            IpAddr::V4(a) => (u32::from(a) as u128, 96 + len),
            IpAddr::V6(a) => (u128::from(a), len),
        };
        assert!((1..=128).contains(&len));
        self.networks.push((bits, len, iso_code.to_owned()));
        self
    }

    /// The database file's bytes.
    pub fn build(&self) -> Vec<u8> {
        // Data section: one record per distinct country.
        let mut data = Vec::new();
        let mut offsets: Vec<(String, usize)> = Vec::new();
        for (_, _, c) in &self.networks {
            if !offsets.iter().any(|(k, _)| k == c) {
                offsets.push((c.clone(), data.len()));
                map_header(&mut data, 1);
                string(&mut data, "country");
                map_header(&mut data, 1);
                string(&mut data, "iso_code");
                string(&mut data, c);
            }
        }
        // Search tree.
        let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty, Rec::Empty]];
        for (bits, len, c) in &self.networks {
            let off = offsets.iter().find(|(k, _)| k == c).unwrap().1;
            let mut node = 0;
            for i in 0..*len {
                let bit = ((bits >> (127 - i)) & 1) as usize;
                if i + 1 == *len {
                    assert!(
                        matches!(nodes[node][bit], Rec::Empty),
                        "overlapping networks"
                    );
                    nodes[node][bit] = Rec::Data(off);
                } else {
                    node = match nodes[node][bit] {
                        Rec::Node(n) => n,
                        Rec::Empty => {
                            nodes.push([Rec::Empty, Rec::Empty]);
                            let n = nodes.len() - 1;
                            nodes[node][bit] = Rec::Node(n);
                            n
                        }
                        Rec::Data(_) => panic!("overlapping networks"),
                    };
                }
            }
        }
        let count = nodes.len();
        let mut out = Vec::new();
        for pair in &nodes {
            for r in pair {
                let v = match *r {
                    Rec::Empty => count,
                    Rec::Node(n) => n,
                    Rec::Data(off) => count + 16 + off,
                };
                assert!(v < 1 << 24, "24-bit record overflow");
                out.extend_from_slice(&(v as u32).to_be_bytes()[1..]);
            }
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&data);
        // Metadata.
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        map_header(&mut out, 9);
        string(&mut out, "binary_format_major_version");
        uint(&mut out, 5, 2);
        string(&mut out, "binary_format_minor_version");
        uint(&mut out, 5, 0);
        string(&mut out, "build_epoch");
        uint(&mut out, 9, 1_796_000_000);
        string(&mut out, "database_type");
        string(&mut out, "mailwarden-Test-Country");
        string(&mut out, "description");
        map_header(&mut out, 1);
        string(&mut out, "en");
        string(&mut out, "test database");
        string(&mut out, "ip_version");
        uint(&mut out, 5, 6);
        string(&mut out, "languages");
        out.extend_from_slice(&[1, 11 - 7]); // extended type 11 (array), 1 element
        string(&mut out, "en");
        string(&mut out, "node_count");
        uint(&mut out, 6, count as u64);
        string(&mut out, "record_size");
        uint(&mut out, 5, 24);
        out
    }

    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.build()).expect("write mmdb");
    }
}

fn map_header(out: &mut Vec<u8>, entries: u8) {
    assert!(entries < 29);
    out.push((7 << 5) | entries);
}

fn string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 29);
    out.push((2 << 5) | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// An unsigned integer of type 5 (uint16), 6 (uint32) or 9 (uint64, extended), in the
/// fewest bytes.
fn uint(out: &mut Vec<u8>, ty: u8, v: u64) {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    let payload = &bytes[skip..];
    let size = payload.len() as u8;
    if ty <= 7 {
        out.push((ty << 5) | size);
    } else {
        out.push(size);
        out.push(ty - 7);
    }
    out.extend_from_slice(payload);
}
