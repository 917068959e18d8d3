//! Binding listeners given in Postfix notation, and the accept loop the policy server and
//! the admin API share. (The milter's loop belongs to indymilter, which caps connections
//! itself and takes only a listener from us: see `milter::Accepting`.)

use crate::config::ListenAddr;
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again, so the
/// loop does not spin; the daemon keeps serving the connections it has.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound listener, TCP or Unix-domain.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file left by a previous run is replaced.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        Listener::bind_with_mode(addr, None).await
    }

    /// [`bind`](Self::bind), and for a Unix-domain socket set its permissions to `mode`
    /// (`server.socket_mode`), so the MTA's user can connect whatever the process umask.
    pub async fn bind_with_mode(addr: &ListenAddr, mode: Option<u32>) -> io::Result<Listener> {
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
                let listener = UnixListener::bind(p)?;
                if let Some(mode) = mode {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
                }
                Ok(Listener::Unix(listener, p.clone()))
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

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| Conn::Tcp(s, a)),
            Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }
}

/// An accepted connection; a TCP one with the client's address.
pub enum Conn {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

/// Accepts connections until `shutdown` is cancelled, and runs `handle(conn, permit)` for
/// each as a task on `sessions` (which the daemon drains on shutdown).
///
/// At most `max_connections` are served at once: a permit is taken *before* accepting, so
/// further clients wait in the listen backlog; the handler holds the permit for as long as it
/// serves the connection. A failed accept (a peer that reset first, no file descriptors
/// left) is logged and retried after a short pause: the loop neither stops nor spins.
/// `handle` is called in the loop's context (a span it creates has the caller's as parent).
///
/// On return the listener is dropped, which closes it: no new connections from then on.
pub async fn serve_connections<H, F>(
    listener: Listener,
    protocol: &'static str,
    max_connections: usize,
    shutdown: &CancellationToken,
    sessions: &TaskTracker,
    mut handle: H,
) where
    H: FnMut(Conn, OwnedSemaphorePermit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(conn) => {
                sessions.spawn(handle(conn, permit));
            }
            Err(e) => {
                tracing::warn!(protocol, "accept failed: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    tracing::debug!(protocol, "listener closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn unix_sockets_get_the_configured_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o660, 0o666, 0o600] {
            let path = dir.path().join(format!("s{mode:o}.sock"));
            let addr = ListenAddr::Unix(path.clone());
            let _l = Listener::bind_with_mode(&addr, Some(mode)).await.unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(got, mode, "{}", path.display());
        }
    }
}
