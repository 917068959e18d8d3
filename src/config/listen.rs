//! Listen addresses in Postfix's notation, so `main.cf` and our config hold the same string.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `inet:127.0.0.1:8891`, `inet:[::1]:8891`, `inet:localhost:8891`.
    Inet(SocketAddr),
    /// `unix:/run/mailwarden/milter.sock`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: unix socket path must be absolute"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("inet:") else {
            return Err(format!(
                "{s:?} is not in Postfix notation (inet:HOST:PORT or unix:/PATH)"
            ));
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: missing port (inet:HOST:PORT)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: port {port:?} is not a number from 0 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let ip = host
            .parse()
            .map_err(|_| format!("{s:?}: host {host:?} must be an IP address (or localhost)"))?;
        Ok(ListenAddr::Inet(SocketAddr::new(ip, port)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Inet(SocketAddr::V6(a)) => write!(f, "inet:[{}]:{}", a.ip(), a.port()),
            ListenAddr::Inet(a) => write!(f, "inet:{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postfix_notation() {
        assert_eq!(
            "inet:127.0.0.1:8891".parse::<ListenAddr>().unwrap(),
            ListenAddr::Inet("127.0.0.1:8891".parse().unwrap())
        );
        assert_eq!(
            "inet:[::1]:10040"
                .parse::<ListenAddr>()
                .unwrap()
                .to_string(),
            "inet:[::1]:10040"
        );
        assert_eq!(
            "unix:/run/mailwarden/milter.sock"
                .parse::<ListenAddr>()
                .unwrap(),
            ListenAddr::Unix("/run/mailwarden/milter.sock".into())
        );
        assert!("127.0.0.1:8891".parse::<ListenAddr>().is_err());
        assert!("inet:127.0.0.1".parse::<ListenAddr>().is_err());
        assert!("unix:relative".parse::<ListenAddr>().is_err());
        assert!("inet:mail.example:25".parse::<ListenAddr>().is_err());
    }
}
