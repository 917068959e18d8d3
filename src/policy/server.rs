//! Accept loop and one session per MTA connection.
//!
//! A session answers requests one after the other on the same connection, as Postfix expects,
//! until the MTA closes it, it stays idle longer than `server.policy_idle_timeout`, a protocol
//! error occurs (that connection only), or the daemon shuts down. On shutdown a session finishes
//! the request it is reading or deciding, answers it, and closes; Postfix reconnects to another
//! instance or retries.

use super::codec::{Action, CodecError, Decoder, Limits, Request};
use super::request::{PolicyRequest, ProtocolState, RequestError, action_for};
use crate::checker::Checker;
use crate::model::{self, Address, Protocol};
use crate::net::{self, Conn, Listener};
use crate::telemetry;
use futures_util::future::Either;
use std::{
    future::Future,
    io,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

/// Bytes read from the socket at a time. A whole Postfix request (~1 KiB) fits in one read.
const READ_CHUNK: usize = 4096;

/// Serves connections until `shutdown` is cancelled. Each connection runs as a task on
/// `sessions`, which the daemon drains on shutdown. At most `server.max_connections` (read
/// once, at start) are served at once; further clients wait in the listen backlog.
pub async fn serve(
    listener: Listener,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) -> io::Result<()> {
    let max = checker.snapshot().config.server.max_connections;
    net::serve_connections(
        listener,
        "policy",
        max,
        &shutdown,
        &sessions,
        |conn, permit| {
            let (checker, shutdown) = (checker.clone(), shutdown.clone());
            match conn {
                Conn::Tcp(stream, peer) => {
                    let _ = stream.set_nodelay(true);
                    let span = tracing::info_span!("policy", peer = %peer);
                    Either::Left(session(stream, checker, shutdown, permit).instrument(span))
                }
                Conn::Unix(stream) => {
                    let span = tracing::info_span!("policy", peer = "unix");
                    Either::Right(session(stream, checker, shutdown, permit).instrument(span))
                }
            }
        },
    )
    .await;
    Ok(())
}

/// How waiting for the next request ended.
enum Next {
    Request(Request),
    /// The MTA closed the connection between requests.
    Closed,
    /// The MTA closed the connection in the middle of a request.
    Truncated,
    Idle(Duration),
    Shutdown,
    Protocol(ProtocolError),
    Io(io::Error),
}

/// Input that ends the connection: undecodable bytes, or a request that is not an SMTPD
/// access policy request.
#[derive(Debug, thiserror::Error)]
enum ProtocolError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// One MTA connection; runs inside a span carrying the peer address, so every log line of
/// the session (including protocol errors) names it.
async fn session<S>(
    mut stream: S,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let open = checker.metrics.connection(Protocol::Policy);
    tracing::debug!("connection opened");
    let end = converse(&mut stream, &checker, &shutdown).await;
    match end {
        Next::Request(_) | Next::Closed => {
            tracing::debug!("connection closed by the MTA")
        }
        Next::Truncated => {
            tracing::debug!("connection closed by the MTA in the middle of a request")
        }
        Next::Idle(t) => tracing::debug!("connection idle for {t:?}; closing it"),
        Next::Shutdown => tracing::debug!("closing for shutdown"),
        Next::Protocol(e) => {
            telemetry::record_protocol_error(&checker.metrics, Protocol::Policy, &e)
        }
        Next::Io(e) => tracing::debug!("connection failed: {e}"),
    }
    // Count the connection as closed before the MTA can see it closed.
    drop(open);
    drop(permit);
    let _ = stream.shutdown().await;
}

/// Answers requests until the conversation ends; returns why it ended.
async fn converse<S>(stream: &mut S, checker: &Checker, shutdown: &CancellationToken) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = Limits::from_config(&checker.snapshot().config.server);
    let mut decoder = Decoder::new(limits);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut message = MessageRecipients::default();
    loop {
        let idle = checker.snapshot().config.server.policy_idle_timeout;
        let req = match next_request(stream, &mut decoder, &mut buf, idle, shutdown).await {
            Next::Request(r) => r,
            end => return end,
        };
        let action = match PolicyRequest::from_request(&req) {
            Ok(mut req) => {
                let rcpt = req.state == ProtocolState::Rcpt && req.recipient.is_some();
                if rcpt {
                    req.tx.rcpts_accepted = message.before(req.instance.as_deref());
                }
                let accepted = match req.state {
                    ProtocolState::EndOfMessage => message.finish(req.instance.as_deref()),
                    _ => Vec::new(),
                };
                let action = respond(checker, &req, &accepted).await;
                if rcpt && action == Action::dunno() {
                    if let Some(r) = &req.recipient {
                        message.accept(r);
                    }
                }
                action
            }
            Err(e) => return Next::Protocol(e.into()),
        };
        let wire = action.encode();
        match tokio::time::timeout(idle, stream.write_all(&wire)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Next::Io(e),
            Err(_) => return Next::Idle(idle),
        }
    }
}

/// Most recipients of one message remembered for the end-of-message quota check; the
/// memory bound of a connection, far above any MTA's recipient limit
/// (`smtpd_recipient_limit`, 1000 by default). Recipients past it are counted for R14 but
/// not checked again at end of message.
pub const MAX_REMEMBERED_RECIPIENTS: usize = 10_000;

/// The recipients this connection let through for the current message: R14 counts a
/// message once, at its first accepted recipient, and R13 checks each of them again at
/// END-OF-MESSAGE with the actual size. One smtpd process talks to the policy service over
/// one connection, one SMTP session at a time, so requests of one message arrive in order
/// on one connection; `instance` tells messages apart.
#[derive(Default)]
struct MessageRecipients {
    instance: Option<String>,
    accepted: usize,
    addresses: Vec<Address>,
}

impl MessageRecipients {
    /// Recipients accepted before this request's; a new `instance` starts a new message.
    /// Without an `instance` every request counts as a message of its own.
    fn before(&mut self, instance: Option<&str>) -> usize {
        if instance.is_none() || self.instance.as_deref() != instance {
            self.instance = instance.map(str::to_owned);
            self.accepted = 0;
            self.addresses.clear();
        }
        self.accepted
    }

    /// Records a recipient this service let through (after [`Self::before`]).
    fn accept(&mut self, rcpt: &Address) {
        self.accepted += 1;
        if self.addresses.len() < MAX_REMEMBERED_RECIPIENTS {
            self.addresses.push(rcpt.clone());
        }
    }

    /// END-OF-MESSAGE of `instance`: the recipients accepted for it (none when the
    /// instance is unknown or another message's). The message is over: they are forgotten.
    fn finish(&mut self, instance: Option<&str>) -> Vec<Address> {
        if instance.is_none() || self.instance.as_deref() != instance {
            return Vec::new();
        }
        std::mem::take(&mut self.addresses)
    }
}

/// Reads until one complete request is decoded.
///
/// Between requests, shutdown ends the wait at once (after taking any bytes the MTA has
/// already sent); once a request has begun it is read to its end, bounded by the idle timeout.
async fn next_request<S>(
    stream: &mut S,
    decoder: &mut Decoder,
    buf: &mut [u8],
    idle: Duration,
    shutdown: &CancellationToken,
) -> Next
where
    S: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::from_std(Instant::now() + idle);
    loop {
        match decoder.next_request() {
            Ok(Some(r)) => return Next::Request(r),
            Ok(None) => {}
            Err(e) => return Next::Protocol(e.into()),
        }
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !decoder.in_progress() => {
                // A request the MTA has already sent is in flight: answer it.
                match poll_once(stream.read(buf)).await {
                    Some(r @ Ok(1..)) => r,
                    _ => return Next::Shutdown,
                }
            }
            r = tokio::time::timeout_at(deadline, stream.read(buf)) => match r {
                Ok(r) => r,
                Err(_) => return Next::Idle(idle),
            },
        };
        match read {
            Ok(0) if decoder.in_progress() => return Next::Truncated,
            Ok(0) => return Next::Closed,
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) => return Next::Io(e),
        }
    }
}

/// Polls a future once: its output if it is ready now, else `None` (the future is dropped,
/// which is safe for `read`).
async fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Which checks a request's stage calls for. Rules for other stages come later; until then
/// Postfix is told `DUNNO` and goes on with its own restrictions. `accepted`: at
/// END-OF-MESSAGE, the recipients this service let through for the message.
async fn respond(checker: &Checker, req: &PolicyRequest, accepted: &[Address]) -> Action {
    let action = match req.state {
        ProtocolState::Rcpt => {
            // With Postfix's default `smtpd_delay_reject = yes` the sender is judged at RCPT.
            let mail = checker.check_mail(&req.tx).await;
            if mail.action != model::Action::Continue {
                action_for(&mail)
            } else if let Some(rcpt) = &req.recipient {
                action_for(&checker.check_rcpt(&req.tx, rcpt).await)
            } else {
                // An address we cannot parse is not ours to judge; Postfix's own checks apply.
                Action::dunno()
            }
        }
        ProtocolState::Mail => action_for(&checker.check_mail(&req.tx).await),
        // R13 with the actual size (`size` at END-OF-MESSAGE). Postfix asks here only with
        // `smtpd_end_of_data_restrictions = check_policy_service ...`.
        ProtocolState::EndOfMessage => match req.tx.size {
            Some(size) if !accepted.is_empty() => {
                let eom = checker.check_end_of_message(&req.tx, accepted, size).await;
                let action = action_for(&eom.decision);
                checker.delivered(eom);
                action
            }
            _ => Action::dunno(),
        },
        ProtocolState::Connect
        | ProtocolState::Helo
        | ProtocolState::Data
        | ProtocolState::Vrfy
        | ProtocolState::Etrn
        | ProtocolState::Other(_) => Action::dunno(),
    };
    tracing::debug!(
        protocol = "policy",
        state = ?req.state,
        queue_id = req.tx.queue_id.as_deref().unwrap_or("-"),
        unparsable_recipient = req.unparsed_recipient.is_some(),
        action = %action,
        "answered"
    );
    action
}
