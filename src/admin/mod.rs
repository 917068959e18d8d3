//! The admin HTTP API (R24), `/metrics` (R25), the audit log, and the CLI client ([`cli`]).
//!
//! Plain HTTP on loopback by default; HTTPS (rustls, aws-lc-rs) when `admin.tls_cert` and
//! `admin.tls_key` are set. Every `/v1` request needs `Authorization: Bearer <token>`;
//! scopes are ordered `read` < `write` < `admin`.
//!
//! | method & path | scope | body | answer |
//! |---|---|---|---|
//! | `GET /healthz` | none | | 200/503 `{"status","store","store_kind"}` |
//! | `GET /metrics` | none (`read` if `admin.metrics_require_token`) | | OpenMetrics text |
//! | `GET /v1/orgs` | read | | `{"orgs": [Org]}` |
//! | `POST /v1/orgs` | write | `{"code","name","domain"?}` | 201 Org |
//! | `GET /v1/orgs/{code}` | read | | Org |
//! | `POST /v1/orgs/{code}/cease` | admin | `{"reason","confirm": code}` | Org |
//! | `GET /v1/users?org=&status=&inactive_for=` | read | | `{"users": [User]}` (R20: with `last_use`) |
//! | `POST /v1/users` | write | `{"address","kind","name"?,"status"?}` | 201 User; 409 + `suggestions` |
//! | `POST /v1/users/import` | write | `{"rows": [{"line"?,"address","kind","name"?,"status"?}]}` | 201 `{"imported","users"}`; 400 + `rows: [{"line","address","error"}]` |
//! | `GET /v1/users/{address}` | read | | User + `send_lock` (R15), `last_use` (R20) |
//! | `POST /v1/users/{address}/suspend` | write | `{"reason"}` | User |
//! | `POST /v1/users/{address}/restore` | write | `{"reason"?}` | User |
//! | `POST /v1/users/{address}/activate` | write | `{"reason"?}` | User |
//! | `POST /v1/users/{address}/withdraw` | admin | `{"reason","confirm": address}` | User |
//! | `POST /dovecot/auth-policy?command=allow\|report` | auth_policy | Dovecot's auth-policy JSON | `{"status":0,"msg":""}` (R16) |
//! | `POST /v1/users/{address}/delegates` | write | `{"delegate","reason"?}` | `{"address","delegate","changed","delegates"}` (R8) |
//! | `POST /v1/users/{address}/delegates/remove` | write | `{"delegate","reason"?}` | same; 404 when not a delegate |
//! | `POST /v1/users/{address}/lock` | write | `{"reason"}` | User + `send_lock` (R15) |
//! | `POST /v1/users/{address}/unlock` | write | `{"reason"?}` | User + `send_lock` (R15) |
//!
//! Errors are `{"error": "...", ...}` (`rule`, `suggestions`, `missing_scope`, `rows`,
//! `confirm_required` where they apply). Every change appends one JSON line to
//! `admin.audit_log` and invalidates the mail path's directory cache at once.

mod api;
mod audit;
mod auth;
pub mod cli;
mod error;
pub mod system;

pub use api::{MAX_IMPORT_ROWS, OrgView, UserView};
pub use audit::{AuditLog, AuditRecord};

use crate::checker::Checker;
use crate::net::{self, Conn, Listener};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{io, net::IpAddr, path::Path, sync::Arc, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt as _;

/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client gets to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a single request may take (reading the body included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Shared state of the API handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    checker: Arc<Checker>,
    audit: Arc<audit::AuditLog>,
    /// Serialises read-check-write status changes made through this process.
    writes: Arc<tokio::sync::Mutex<()>>,
}

/// The client's address, put into each request by the connection task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub Option<IpAddr>);

/// The API as an axum router (without the connection handling of [`serve`]).
fn router(checker: Arc<Checker>) -> Router {
    api::router(AppState {
        checker,
        audit: audit::AuditLog::new(),
        writes: Arc::new(tokio::sync::Mutex::new(())),
    })
}

/// Serves connections until `shutdown` is cancelled. Each connection runs as a task on
/// `sessions`, which the daemon drains on shutdown; open keep-alive connections are closed
/// gracefully (a request in progress finishes).
pub async fn serve(
    listener: Listener,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) -> io::Result<()> {
    let tls = Arc::new(AdminTls::new(&checker)?);
    let app = router(checker.clone());
    net::serve_connections(
        listener,
        "admin",
        MAX_CONNECTIONS,
        &shutdown,
        &sessions,
        |conn, permit| {
            let tls = tls.current(&checker);
            let (app, shutdown) = (app.clone(), shutdown.clone());
            async move {
                let _permit = permit;
                match conn {
                    Conn::Tcp(s, a) => connection(s, Peer(Some(a.ip())), tls, app, shutdown).await,
                    Conn::Unix(s) => connection(s, Peer(None), tls, app, shutdown).await,
                }
            }
        },
    )
    .await;
    Ok(())
}

async fn connection<S>(
    stream: S,
    peer: Peer,
    tls: Option<TlsAcceptor>,
    app: Router,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tls {
        None => http(stream, peer, app, shutdown).await,
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => http(s, peer, app, shutdown).await,
                Ok(Err(e)) => {
                    tracing::debug!(client = ?peer.0, "admin API: TLS handshake failed: {e}")
                }
                Err(_) => tracing::debug!(client = ?peer.0, "admin API: TLS handshake timed out"),
            }
        }
    }
}

async fn http<S>(stream: S, peer: Peer, app: Router, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer);
        let app = app.clone();
        async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, app.oneshot(req)).await {
                Ok(r) => r,
                Err(_) => Ok(error::plain(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    "request took too long",
                )),
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(client = ?peer.0, "admin API connection ended: {e}");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The admin API's TLS acceptor, rebuilt from `admin.tls_cert` / `admin.tls_key` after each
/// configuration reload (SIGHUP), so a renewed certificate is served without a restart: the
/// files are read again even when their paths did not change. The daemon validates them
/// before it accepts a reload (see `daemon.rs`), so a rebuild here fails only if the files
/// changed again in between; the certificate in use is then kept (logged). Whether TLS is on
/// at all is fixed at start (the CLI's scheme follows the config file).
struct AdminTls {
    state: std::sync::Mutex<(Arc<crate::checker::Snapshot>, Option<TlsAcceptor>)>,
}

impl AdminTls {
    fn new(checker: &Checker) -> io::Result<AdminTls> {
        let snap = checker.snapshot();
        let acceptor = match (&snap.config.admin.tls_cert, &snap.config.admin.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsAcceptor::from(Arc::new(tls_server_config(cert, key)?)))
            }
            _ => None,
        };
        Ok(AdminTls {
            state: std::sync::Mutex::new((snap, acceptor)),
        })
    }

    /// The acceptor for a new connection: rebuilt first when the configuration was reloaded.
    fn current(&self, checker: &Checker) -> Option<TlsAcceptor> {
        let snap = checker.snapshot();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&state.0, &snap) {
            if state.1.is_some() {
                if let (Some(cert), Some(key)) =
                    (&snap.config.admin.tls_cert, &snap.config.admin.tls_key)
                {
                    match tls_server_config(cert, key) {
                        Ok(config) => {
                            state.1 = Some(TlsAcceptor::from(Arc::new(config)));
                            tracing::info!(cert = %cert.display(), "admin API: TLS certificate loaded");
                        }
                        Err(e) => {
                            tracing::error!("admin API: keeping the TLS certificate in use: {e}")
                        }
                    }
                }
            }
            state.0 = snap;
        }
        state.1.clone()
    }
}

/// The rustls server configuration for `admin.tls_cert` / `admin.tls_key` (PEM), with the
/// aws-lc-rs provider named explicitly (CRATES.md gotcha 3).
pub fn tls_server_config(cert: &Path, key: &Path) -> io::Result<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let bad = |key: &str, p: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{key}: {}: {e}", p.display()),
        )
    };
    let cert_pem = std::fs::read(cert).map_err(|e| bad("admin.tls_cert", cert, &e))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("admin.tls_cert", cert, &e))?;
    if certs.is_empty() {
        return Err(bad("admin.tls_cert", cert, &"no PEM certificate found"));
    }
    let key_pem = std::fs::read(key).map_err(|e| bad("admin.tls_key", key, &e))?;
    let private =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad("admin.tls_key", key, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certs, private)
    .map_err(|e| bad("admin.tls_key", key, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
