//! The Redis flavours of `store.url`.
//!
//! ```text
//! redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
//! rediss://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]
//! redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]
//! redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/][?OPTIONS]
//! ```
//!
//! - `HOST` is a name, an IPv4 address or a bracketed IPv6 address (`[::1]`). `PORT` defaults
//!   to 6379, or 26379 for the sentinels of `redis+sentinel://`.
//! - `USER` and `PASSWORD` (percent-encoded: `%40` for `@`, `%3A` for `:`) authenticate to the
//!   data nodes: the server, the Sentinel-monitored primary, or every Cluster node. A password
//!   alone (`:PASSWORD@`) is Redis' `requirepass`; `USER:PASSWORD@` an ACL user.
//! - `DB` is the logical database number (default 0). Cluster has only database 0.
//! - `SERVICE` is the name the sentinels monitor (`sentinel monitor SERVICE ...`).
//! - `OPTIONS`, `&`-separated:
//!   - `prefix=NAME`: key namespace (default `mw`), so several deployments can share one
//!     Redis. 1–64 characters of `A-Z a-z 0-9 _ . -`.
//!   - `timeout=DURATION`: bound on connecting and on every round trip (default `2s`).
//!   - `ca=PATH` (`rediss://` only): PEM file of the certificate authorities to trust instead
//!     of the system's.
//!   - `sentinel_user=NAME`, `sentinel_password=SECRET` (`redis+sentinel://` only): when the
//!     sentinels themselves require authentication.
//!
//! `rediss://` verifies the server's certificate (name or IP address) with rustls. TLS to
//! Sentinel or Cluster deployments is not supported by this version.

use std::{fmt, path::PathBuf, time::Duration};

pub const DEFAULT_PORT: u16 = 6379;
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;
pub const DEFAULT_PREFIX: &str = "mw";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed Redis store URL. Its `Debug` never shows the passwords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub topology: Topology,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub db: i64,
    pub prefix: String,
    pub timeout: Duration,
    /// `ca=`: trusted CA certificates (PEM) for `rediss://`.
    pub ca_file: Option<PathBuf>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    Standalone {
        node: Node,
        tls: bool,
    },
    Sentinel {
        sentinels: Vec<Node>,
        service: String,
    },
    Cluster {
        nodes: Vec<Node>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

/// A credential: compared and cloned like a string, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The schemes this module parses.
pub const SCHEMES: [&str; 4] = [
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "redis+cluster://",
];

impl RedisUrl {
    /// Parses a Redis store URL. Errors name the problem and never repeat a password.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let shown = redact(url);
        parse(url).map_err(|e| format!("{shown:?}: {e}"))
    }

    /// The URL with its passwords replaced by `***`, for logs and errors.
    pub fn redacted(&self) -> String {
        let scheme = match &self.topology {
            Topology::Standalone { tls: false, .. } => "redis",
            Topology::Standalone { tls: true, .. } => "rediss",
            Topology::Sentinel { .. } => "redis+sentinel",
            Topology::Cluster { .. } => "redis+cluster",
        };
        let user = match (&self.username, &self.password) {
            (None, None) => String::new(),
            (u, p) => format!(
                "{}{}@",
                u.as_deref().unwrap_or(""),
                if p.is_some() { ":***" } else { "" }
            ),
        };
        let hosts = |nodes: &[Node]| {
            nodes
                .iter()
                .map(Node::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let path = match &self.topology {
            Topology::Standalone { node, .. } => format!("{node}/{}", self.db),
            Topology::Sentinel { sentinels, service } => {
                format!("{}/{service}/{}", hosts(sentinels), self.db)
            }
            Topology::Cluster { nodes } => hosts(nodes),
        };
        format!("{scheme}://{user}{path}?prefix={}", self.prefix)
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn parse(url: &str) -> Result<RedisUrl, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("not a URL (expected SCHEME://...)")?;
    if rest.contains('#') {
        return Err("a fragment (#...) has no meaning here".into());
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    // The user info ends at the last '@' (an unencoded '/' or '@' in a password still
    // parses); the path starts at the first '/' after it.
    let (userinfo, rest) = match rest.rfind('@') {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (hosts, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            let user = decode(user, "user name")?;
            let pass = pass.map(|p| decode(p, "password")).transpose()?;
            (
                (!user.is_empty()).then_some(user),
                pass.filter(|p| !p.is_empty()).map(Secret),
            )
        }
    };
    let segments: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    let db_of = |s: Option<&&str>| -> Result<i64, String> {
        match s {
            None | Some(&"") => Ok(0),
            Some(s) => s
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| format!("database {s:?} is not a number (0, 1, ...)")),
        }
    };
    let topology;
    let mut db = 0;
    match scheme {
        "redis" | "rediss" => {
            let nodes = parse_nodes(hosts, DEFAULT_PORT)?;
            let [node] = <[Node; 1]>::try_from(nodes)
                .map_err(|_| "one host only; use redis+cluster:// for several nodes")?;
            if segments.len() > 1 {
                return Err(format!("path {path:?}: expected /DB"));
            }
            db = db_of(segments.first())?;
            topology = Topology::Standalone {
                node,
                tls: scheme == "rediss",
            };
        }
        "redis+sentinel" => {
            let sentinels = parse_nodes(hosts, DEFAULT_SENTINEL_PORT)?;
            let service = segments.first().copied().unwrap_or("");
            if service.is_empty() {
                return Err("the monitored service name is missing: \
                            redis+sentinel://HOST:PORT,HOST:PORT/SERVICE[/DB]"
                    .into());
            }
            if segments.len() > 2 {
                return Err(format!("path {path:?}: expected /SERVICE[/DB]"));
            }
            db = db_of(segments.get(1))?;
            topology = Topology::Sentinel {
                sentinels,
                service: decode(service, "service name")?,
            };
        }
        "redis+cluster" => {
            let nodes = parse_nodes(hosts, DEFAULT_PORT)?;
            if segments.len() > 1 || db_of(segments.first())? != 0 {
                return Err("Redis Cluster has only database 0; drop the path".into());
            }
            topology = Topology::Cluster { nodes };
        }
        other => {
            return Err(format!(
                "scheme {other:?} is not one of redis, rediss, redis+sentinel, redis+cluster"
            ));
        }
    }

    let mut parsed = RedisUrl {
        topology,
        username,
        password,
        db,
        prefix: DEFAULT_PREFIX.into(),
        timeout: DEFAULT_TIMEOUT,
        ca_file: None,
        sentinel_username: None,
        sentinel_password: None,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("option {pair:?} needs a value (NAME=VALUE)"))?;
        let value = decode(value, key)?;
        let sentinel = matches!(parsed.topology, Topology::Sentinel { .. });
        let tls = matches!(parsed.topology, Topology::Standalone { tls: true, .. });
        match key {
            "prefix" => {
                let ok = (1..=64).contains(&value.len())
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                if !ok {
                    return Err(format!(
                        "prefix {value:?}: use 1-64 characters of A-Z a-z 0-9 _ . -"
                    ));
                }
                parsed.prefix = value;
            }
            "timeout" => {
                let t = humantime::parse_duration(&value)
                    .map_err(|e| format!("timeout {value:?}: {e} (e.g. 2s, 500ms)"))?;
                if t.is_zero() {
                    return Err("timeout must be greater than zero".into());
                }
                parsed.timeout = t;
            }
            "ca" if tls => parsed.ca_file = Some(PathBuf::from(value)),
            "ca" => return Err("option ca= applies to rediss:// only".into()),
            "sentinel_user" if sentinel => parsed.sentinel_username = Some(value),
            "sentinel_password" if sentinel => parsed.sentinel_password = Some(Secret(value)),
            "sentinel_user" | "sentinel_password" => {
                return Err(format!("option {key}= applies to redis+sentinel:// only"));
            }
            other => {
                return Err(format!(
                    "unknown option {other:?} (known: prefix, timeout, ca, sentinel_user, \
                     sentinel_password)"
                ));
            }
        }
    }
    Ok(parsed)
}

fn parse_nodes(hosts: &str, default_port: u16) -> Result<Vec<Node>, String> {
    if hosts.is_empty() {
        return Err("no host".into());
    }
    hosts
        .split(',')
        .map(|h| {
            let (host, port) = if let Some(v6) = h.strip_prefix('[') {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("host {h:?}: missing ']'"))?;
                match after {
                    "" => (host, None),
                    p => (
                        host,
                        Some(
                            p.strip_prefix(':')
                                .ok_or_else(|| format!("host {h:?}: expected :PORT after ']'"))?,
                        ),
                    ),
                }
            } else {
                match h.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (h, None),
                }
            };
            if host.is_empty() {
                return Err(format!("empty host in {hosts:?}"));
            }
            let port = match port {
                None => default_port,
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("host {h:?}: port {p:?} is not 1-65535"))?,
            };
            Ok(Node {
                host: host.to_owned(),
                port,
            })
        })
        .collect()
}

fn decode(s: &str, what: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what} is not UTF-8 after percent-decoding"))
}

/// `url` with any password (in the user info or a `*password=` option) replaced by `***`.
/// Works on any string, parsable or not, so errors about a broken URL stay safe to log.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let rest = match rest.rfind('@') {
        Some(at) => {
            let (info, hosts) = rest.split_at(at);
            match info.split_once(':') {
                Some((user, _)) => format!("{user}:***{hosts}"),
                None => rest.to_owned(),
            }
        }
        None => rest.to_owned(),
    };
    let mut out = format!("{scheme}://{rest}");
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.contains("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: u16) -> Node {
        Node {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn standalone_with_defaults() {
        let u = RedisUrl::parse("redis://localhost").unwrap();
        assert_eq!(
            u,
            RedisUrl {
                topology: Topology::Standalone {
                    node: node("localhost", 6379),
                    tls: false
                },
                username: None,
                password: None,
                db: 0,
                prefix: "mw".into(),
                timeout: Duration::from_secs(2),
                ca_file: None,
                sentinel_username: None,
                sentinel_password: None,
            }
        );
    }

    #[test]
    fn standalone_with_everything() {
        let u = RedisUrl::parse(
            "rediss://mailwarden:p%40ss%3Aword@[::1]:6380/3?prefix=gov-la&timeout=500ms&ca=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(
            u.topology,
            Topology::Standalone {
                node: node("::1", 6380),
                tls: true
            }
        );
        assert_eq!(u.username.as_deref(), Some("mailwarden"));
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("p@ss:word"));
        assert_eq!(u.db, 3);
        assert_eq!(u.prefix, "gov-la");
        assert_eq!(u.timeout, Duration::from_millis(500));
        assert_eq!(u.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        // Neither Debug nor the redacted form shows the password.
        assert!(!format!("{u:?}").contains("p@ss"));
        assert_eq!(
            u.redacted(),
            "rediss://mailwarden:***@[::1]:6380/3?prefix=gov-la"
        );
    }

    #[test]
    fn password_only() {
        let u = RedisUrl::parse("redis://:secret@10.0.0.5/").unwrap();
        assert_eq!(u.username, None);
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("secret"));
        assert_eq!(u.db, 0);
    }

    #[test]
    fn sentinel() {
        let u = RedisUrl::parse(
            "redis+sentinel://:pw@s1,s2:26380,10.0.0.3:26379/mymaster/2?sentinel_password=spw",
        )
        .unwrap();
        assert_eq!(
            u.topology,
            Topology::Sentinel {
                sentinels: vec![
                    node("s1", 26379),
                    node("s2", 26380),
                    node("10.0.0.3", 26379)
                ],
                service: "mymaster".into()
            }
        );
        assert_eq!(u.db, 2);
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(
            u.sentinel_password.as_ref().map(Secret::expose),
            Some("spw")
        );
        let u = RedisUrl::parse("redis+sentinel://s1/mymaster").unwrap();
        assert_eq!(u.db, 0);
    }

    #[test]
    fn cluster() {
        let u = RedisUrl::parse("redis+cluster://n1:7000,n2:7001?prefix=x").unwrap();
        assert_eq!(
            u.topology,
            Topology::Cluster {
                nodes: vec![node("n1", 7000), node("n2", 7001)]
            }
        );
        assert_eq!(u.prefix, "x");
        RedisUrl::parse("redis+cluster://n1:7000/").unwrap();
        RedisUrl::parse("redis+cluster://n1:7000/0").unwrap();
    }

    #[test]
    fn errors_name_the_problem_without_the_password() {
        for (url, needle) in [
            (
                "redis+sentinel://:hunter2@s1:26379",
                "service name is missing",
            ),
            ("redis+cluster://:hunter2@n1/3", "only database 0"),
            ("redis://:hunter2@a,b", "one host only"),
            ("redis://:hunter2@a/x", "database \"x\""),
            ("redis://:hunter2@a:99999", "port \"99999\""),
            ("redis://:hunter2@a:0", "port \"0\""),
            ("redis://:hunter2@a?prefix=a{b}", "prefix"),
            ("redis://:hunter2@a?timeout=0s", "greater than zero"),
            ("redis://:hunter2@a?timeout=soon", "timeout"),
            ("redis://:hunter2@a?ca=/x.pem", "rediss:// only"),
            (
                "redis://:hunter2@a?sentinel_password=x",
                "redis+sentinel:// only",
            ),
            ("redis://:hunter2@a?db=1", "unknown option \"db\""),
            ("redis://:hunter2@a?prefix", "needs a value"),
            ("redis://:hunter2@a#frag", "fragment"),
            ("redis://:hunter2@/0", "no host"),
            ("redis://:hunter2@[::1/0", "missing ']'"),
            ("redis+unix://:hunter2@/run/redis.sock", "scheme"),
        ] {
            let e = RedisUrl::parse(url).expect_err(url);
            assert!(e.contains(needle), "{url}: {e}");
            assert!(!e.contains("hunter2"), "{url}: {e}");
        }
    }

    #[test]
    fn store_url_dispatches_every_redis_scheme() {
        use crate::store::StoreUrl;
        for url in [
            "redis://h",
            "rediss://h",
            "redis+sentinel://h/m",
            "redis+cluster://h",
        ] {
            assert!(
                matches!(StoreUrl::parse(url), Ok(StoreUrl::Redis(_))),
                "{url}"
            );
        }
        let e = StoreUrl::parse("redis+sentinel://:hunter2@h").unwrap_err();
        assert!(e.contains("service name") && !e.contains("hunter2"), "{e}");
        let e = StoreUrl::parse("valkey://:hunter2@h").unwrap_err();
        assert!(
            e.contains("not a store URL") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn redact_hides_passwords_in_any_string() {
        assert_eq!(
            redact("redis+sentinel://u:pw@s1,s2/m?sentinel_password=spw&prefix=a"),
            "redis+sentinel://u:***@s1,s2/m?sentinel_password=***&prefix=a"
        );
        assert_eq!(redact("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact("redis://user@h"), "redis://user@h");
        assert_eq!(redact("redis://:pa/ss@w@h/1"), "redis://:***@h/1");
        assert_eq!(redact("sqlite:/var/x.db"), "sqlite:/var/x.db");
    }
}
