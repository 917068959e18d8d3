//! Verification with mail-auth's DNS caches seeded: no live DNS. The resolver points at a
//! closed loopback port, so a lookup the seed does not cover fails as a DNS error
//! (`temperror`) instead of leaking out.

use super::*;
use crate::config::{DkimAlgorithm, DkimConfig, DkimKeyConfig};
use crate::dkim::{KeyRing, MessageSigner};
use mail_auth::{
    DnsError, Error, Mx, Negative, RecordSet, ResolverCache, TxtRecord, dkim::DomainKey,
    dmarc::DmarcRecord, dns::TxtRecordParser, hickory_resolver::proto::op::ResponseCode,
    spf::SpfRecord,
};
use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
    sync::Mutex,
    time::Instant,
};

struct Map<K, V>(Mutex<HashMap<K, V>>);

impl<K, V> Default for Map<K, V> {
    fn default() -> Self {
        Map(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Map<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().remove(name)
    }

    fn insert(&self, key: K, value: V, _: Instant) {
        self.0.lock().unwrap().insert(key, value);
    }
}

type Answer<T> = Result<RecordSet<T>, Negative>;

/// A DNS cache seeded by the test.
#[derive(Default)]
struct Seeded {
    txt: Map<Box<str>, TxtRecord>,
    mx: Map<Box<str>, Answer<Mx>>,
    ipv4: Map<Box<str>, Answer<Ipv4Addr>>,
    ipv6: Map<Box<str>, Answer<Ipv6Addr>>,
    ptr: Map<IpAddr, Answer<Box<str>>>,
}

impl DnsCache for Seeded {
    type Txt = Map<Box<str>, TxtRecord>;
    type Mx = Map<Box<str>, Answer<Mx>>;
    type Ipv4 = Map<Box<str>, Answer<Ipv4Addr>>;
    type Ipv6 = Map<Box<str>, Answer<Ipv6Addr>>;
    type Ptr = Map<IpAddr, Answer<Box<str>>>;

    fn txt(&self) -> Option<&Self::Txt> {
        Some(&self.txt)
    }
    fn mx(&self) -> Option<&Self::Mx> {
        Some(&self.mx)
    }
    fn ipv4(&self) -> Option<&Self::Ipv4> {
        Some(&self.ipv4)
    }
    fn ipv6(&self) -> Option<&Self::Ipv6> {
        Some(&self.ipv6)
    }
    fn ptr(&self) -> Option<&Self::Ptr> {
        Some(&self.ptr)
    }
}

impl Seeded {
    fn txt(&self, name: &str, record: TxtRecord) {
        let later = Instant::now() + Duration::from_secs(3600);
        self.txt.insert(format!("{name}.").into(), record, later);
    }
    fn spf(&self, name: &str, rec: &str) {
        self.txt(name, SpfRecord::parse(rec.as_bytes()).unwrap().into());
    }
    fn dmarc(&self, domain: &str, rec: &str) {
        self.txt(
            &format!("_dmarc.{domain}"),
            DmarcRecord::parse(rec.as_bytes()).unwrap().into(),
        );
    }
    fn key(&self, name: &str, rec: &str) {
        self.txt(name, DomainKey::parse(rec.as_bytes()).unwrap().into());
    }
    fn nxdomain(&self, name: &str) {
        self.txt(
            name,
            TxtRecord::Error(Error::Dns(DnsError::RecordNotFound(ResponseCode::NXDomain))),
        );
    }
}

const CLIENT: &str = "192.0.2.10";

/// The zones of the tests: example.org (SPF for 192.0.2.10, DMARC p=reject, DKIM key
/// `s1`), mpt.gov.la (SPF for the government relay 203.0.113.5, DMARC p=reject), and
/// negative answers for every other name the checks ask (DMARC tree walk included).
fn zones(key_record: &str) -> Seeded {
    let c = Seeded::default();
    c.spf("example.org", "v=spf1 ip4:192.0.2.10 -all");
    c.dmarc("example.org", "v=DMARC1; p=reject");
    c.key("s1._domainkey.example.org", key_record);
    c.spf("mpt.gov.la", "v=spf1 ip4:203.0.113.5 -all");
    c.dmarc("mpt.gov.la", "v=DMARC1; p=reject");
    for nx in [
        "mx.example.org",
        "_dmarc.org",
        "_dmarc.gov.la",
        "_dmarc.la",
        "_dmarc.mx.example.org",
    ] {
        c.nxdomain(nx);
    }
    c
}

fn resolver() -> Resolver {
    Resolver::new(&DnsConfig {
        nameservers: vec!["127.0.0.1:1".into()],
        timeout: Duration::from_millis(500),
        attempts: 1,
        ..DnsConfig::default()
    })
    .unwrap()
}

fn rsa_key(domain: &str) -> Arc<crate::dkim::SigningKey> {
    let config = DkimConfig {
        keys: vec![DkimKeyConfig {
            domain: domain.into(),
            selector: "s1".into(),
            algorithm: DkimAlgorithm::RsaSha256,
            key_file: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/dkim/rsa2048-pkcs1.pem"),
        }],
        ..DkimConfig::default()
    };
    KeyRing::load(&config).unwrap().keys()[0].clone()
}

use std::sync::Arc;

fn key_record(key: &crate::dkim::SigningKey) -> String {
    format!("v=DKIM1; k=rsa; p={}", key.public_key_b64)
}

/// A message as the milter assembles it, signed with `key` when given.
fn message(from: &str, key: Option<&Arc<crate::dkim::SigningKey>>) -> Vec<u8> {
    let headers = format!(
        "From: Someone <{from}>\r\nTo: champa@mpt.gov.la\r\nSubject: hello\r\n\
         Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
    );
    let body = b"Hello.\r\n\r\nSee you.\r\n";
    let mut out = Vec::new();
    if let Some(k) = key {
        let mut s = MessageSigner::new(std::slice::from_ref(k), headers.as_bytes());
        s.body(body);
        out.extend_from_slice(s.finish().unwrap()[0].header.as_bytes());
    }
    out.extend_from_slice(headers.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

async fn run(cache: &Seeded, env: Envelope<'_>, msg: &[u8]) -> Report {
    verify_with_cache(&resolver(), Some(cache), "mx.mpt.gov.la", env, msg, true).await
}

fn env<'a>(ip: &str, helo: &'a str, mail_from: &'a str) -> Envelope<'a> {
    Envelope {
        client_ip: Some(ip.parse().unwrap()),
        helo: Some(helo),
        mail_from: Some(mail_from),
    }
}

#[tokio::test]
async fn signed_mail_from_an_outside_domain_passes_dkim_spf_and_dmarc() {
    let key = rsa_key("example.org");
    let cache = zones(&key_record(&key));
    let msg = message("news@example.org", Some(&key));
    let r = run(
        &cache,
        env(CLIENT, "mx.example.org", "news@example.org"),
        &msg,
    )
    .await;
    assert_eq!(
        r.evidence.dkim,
        [("example.org".to_owned(), Check::Pass)],
        "{r:?}"
    );
    assert_eq!(
        r.evidence.spf,
        Some(("example.org".to_owned(), Check::Pass))
    );
    for (m, want) in [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ] {
        assert!(
            r.results.contains(&(m, want)),
            "{m}={want} in {:?}",
            r.results
        );
    }
    assert!(r.header.starts_with("mx.mpt.gov.la;"), "{}", r.header);
    assert!(r.header.contains("dkim=pass"), "{}", r.header);
    assert!(r.header.contains("header.d=example.org"), "{}", r.header);
    assert!(r.header.contains("spf=pass"), "{}", r.header);
    assert!(r.header.contains("dmarc=pass"), "{}", r.header);
    assert!(!r.milter_value().contains('\r'));
}

#[tokio::test]
async fn a_spoofed_government_from_has_no_aligned_pass() {
    let key = rsa_key("example.org");
    let cache = zones(&key_record(&key));
    // Signed by example.org and SPF-pass for example.org, but From: mpt.gov.la.
    let msg = message("director@mpt.gov.la", Some(&key));
    let r = run(&cache, env(CLIENT, "mx.example.org", "x@example.org"), &msg).await;
    assert_eq!(
        crate::engine::rules::spoofing::aligned_result(&r.evidence, "mpt.gov.la"),
        Check::Other
    );
    assert!(r.header.contains("dmarc=fail"), "{}", r.header);
    // And with the envelope in mpt.gov.la from a client SPF does not allow:
    let msg = message("director@mpt.gov.la", None);
    let r = run(
        &cache,
        env(CLIENT, "mx.example.org", "director@mpt.gov.la"),
        &msg,
    )
    .await;
    assert_eq!(
        r.evidence.spf,
        Some(("mpt.gov.la".to_owned(), Check::Other))
    );
    assert!(r.results.contains(&("spf", "fail")), "{:?}", r.results);
    assert!(r.results.contains(&("dkim", "none")), "{:?}", r.results);
}

#[tokio::test]
async fn a_broken_signature_fails() {
    let key = rsa_key("example.org");
    let cache = zones(&key_record(&key));
    let mut msg = message("news@example.org", Some(&key));
    let n = msg.len();
    msg[n - 4] = b'X'; // body changed after signing
    let r = run(
        &cache,
        env(CLIENT, "mx.example.org", "news@example.org"),
        &msg,
    )
    .await;
    assert_eq!(r.evidence.dkim.len(), 1);
    assert_ne!(r.evidence.dkim[0].1, Check::Pass);
    assert!(!r.results.contains(&("dkim", "pass")), "{:?}", r.results);
}

#[tokio::test]
async fn unanswered_lookups_are_temperrors() {
    // Nothing seeded: every lookup goes to the dead resolver.
    let cache = Seeded::default();
    let msg = message("director@mpt.gov.la", None);
    let r = run(
        &cache,
        env(CLIENT, "mx.example.org", "director@mpt.gov.la"),
        &msg,
    )
    .await;
    assert_eq!(
        r.evidence.spf,
        Some(("mpt.gov.la".to_owned(), Check::TempError))
    );
    assert_eq!(
        crate::engine::rules::spoofing::aligned_result(&r.evidence, "mpt.gov.la"),
        Check::TempError
    );
    assert!(r.results.contains(&("spf", "temperror")));
}

#[tokio::test]
async fn the_message_time_budget_bounds_all_dns_work() {
    let cache = Seeded::default();
    let mut resolver = resolver();
    resolver.message_timeout = Duration::from_millis(1);
    let msg = message("director@mpt.gov.la", None);
    let r = verify_with_cache(
        &resolver,
        Some(&cache),
        "mx.mpt.gov.la",
        env(CLIENT, "mx.example.org", "director@mpt.gov.la"),
        &msg,
        true,
    )
    .await;
    assert!(r.evidence.timed_out);
    assert!(r.header.starts_with("mx.mpt.gov.la;"));
    assert!(r.header.contains("temperror"));
}

#[tokio::test]
async fn without_the_body_dkim_is_not_evaluated() {
    let key = rsa_key("example.org");
    let cache = zones(&key_record(&key));
    let msg = message("news@example.org", Some(&key));
    let r = verify_with_cache(
        &resolver(),
        Some(&cache),
        "mx.mpt.gov.la",
        env(CLIENT, "mx.example.org", "news@example.org"),
        &msg,
        false,
    )
    .await;
    assert!(r.evidence.dkim.is_empty());
    assert!(r.results.contains(&("dkim", "none")));
    // SPF still decides alignment for example.org.
    assert_eq!(
        r.evidence.spf,
        Some(("example.org".to_owned(), Check::Pass))
    );
}

#[test]
fn authserv_id_of_existing_headers() {
    assert_eq!(
        authserv_id_of(b" mx.mpt.gov.la; dkim=pass header.d=mpt.gov.la"),
        Some("mx.mpt.gov.la".into())
    );
    assert_eq!(
        authserv_id_of(b" (forged) MX.MPT.gov.la 1; spf=pass"),
        Some("mx.mpt.gov.la".into())
    );
    assert_eq!(
        authserv_id_of(b"\n\tmx.mpt.gov.la;\n\tnone"),
        Some("mx.mpt.gov.la".into())
    );
    assert_eq!(authserv_id_of(b"  "), None);
}

#[test]
fn authserv_ids_are_host_names() {
    assert!(valid_authserv_id("mx.mpt.gov.la"));
    assert!(!valid_authserv_id("mx mpt"));
    assert!(!valid_authserv_id(""));
    assert!(!valid_authserv_id("a..b"));
    assert!(valid_authserv_id(&host_name()));
}

/// `message` sealed with one ARC set by `relay.example.org` (selector `arc1`, the fixture
/// RSA key), as a forwarder would.
async fn arc_sealed(message: &[u8]) -> Vec<u8> {
    use mail_auth::{
        arc::ArcSealer,
        crypto::{RsaKey, Sha256},
        headers::HeaderWriter as _,
    };
    use rustls_pki_types::{PrivateKeyDer, pem::PemObject as _};
    let pem = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dkim/rsa2048-pkcs1.pem"),
    )
    .unwrap();
    let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::from_pem_slice(&pem).unwrap()).unwrap();
    let sealer = ArcSealer::from_key(key)
        .domain("relay.example.org")
        .selector("arc1")
        .headers(["From", "To", "Subject", "DKIM-Signature"]);
    let parsed = AuthenticatedMessage::parse(message).unwrap();
    let chain = resolver().auth.verify_arc(&parsed).await;
    let results = AuthenticationResults::new("relay.example.org");
    let set = sealer.seal(&parsed, &results, &chain).unwrap();
    let mut out = set.to_header().into_bytes();
    out.extend_from_slice(message);
    out
}

#[tokio::test]
async fn an_arc_chain_is_verified_and_reported() {
    let key = rsa_key("example.org");
    let cache = zones(&key_record(&key));
    cache.key("arc1._domainkey.relay.example.org", &key_record(&key));
    let msg = arc_sealed(&message("news@example.org", Some(&key))).await;
    let r = run(
        &cache,
        env(CLIENT, "mx.example.org", "news@example.org"),
        &msg,
    )
    .await;
    assert!(r.results.contains(&("arc", "pass")), "{:?}", r.results);
    assert!(r.header.contains("arc=pass"), "{}", r.header);

    // The sealed message altered afterwards: the chain no longer validates.
    let mut broken = msg.clone();
    let n = broken.len();
    broken[n - 4] = b'X';
    let r = run(
        &cache,
        env(CLIENT, "mx.example.org", "news@example.org"),
        &broken,
    )
    .await;
    assert!(!r.results.contains(&("arc", "pass")), "{:?}", r.results);
}
