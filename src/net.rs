//! Binding listeners given in Postfix notation.

use crate::config::ListenAddr;
use std::io;
use tokio::net::{TcpListener, UnixListener};

/// A bound listener, TCP or Unix-domain.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file left by a previous run is replaced.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Inet(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                if p.exists() {
                    // Only remove a socket, never a regular file someone configured by mistake.
                    use std::os::unix::fs::FileTypeExt;
                    if std::fs::metadata(p)?.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    }
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The bound address in Postfix notation (the real port when 0 was asked for).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Inet(l.local_addr()?)),
            Listener::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
        }
    }
}
