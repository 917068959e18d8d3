//! The milter front-end (indymilter): translation only.
//!
//! - `negotiate.rs`: what the milter asks of the MTA (actions, skipped stages, macros),
//!   with the [`Features`] switch a later rule flips (DKIM: headers, body, `ADD_HEADER`).
//! - `callbacks.rs`: thin indymilter callbacks; `session.rs`: the per-connection
//!   [`Transaction`](crate::model::Transaction) they fill.
//! - [`client`]: the MTA side of the protocol, for tests and [`loadgen`].
//!
//! # Shutdown and in-flight messages
//!
//! When `shutdown` is cancelled:
//! 1. the listener is closed at once: no new MTA connection is accepted;
//! 2. a message already past MAIL continues normally (its RCPTs are checked, its end of
//!    message answered); a *new* MAIL on any open connection is answered
//!    `421 4.3.2` (the client retries later), so the drain converges;
//! 3. once no message is in flight, every remaining (idle) connection is closed, and the
//!    task on `sessions` ends. The daemon waits for that within `server.shutdown_grace`.
//!
//! If the grace period runs out first, the process exits with the connection open. The
//! milter never accepts on the MTA's behalf: Postfix owns the message, sees the milter
//! connection fail mid-message, and applies `milter_default_action`, which mailwarden's
//! documentation sets to `tempfail`, so the client retries. No message is accepted and
//! dropped.

mod callbacks;
pub mod client;
pub mod loadgen;
mod negotiate;
mod session;

pub use negotiate::{ACTIONS, Features, Negotiated, Unsupported};
pub use session::MAX_RECIPIENTS;

use crate::checker::Checker;
use crate::net::Listener;
use callbacks::Shared;
use indymilter::{EitherListener, EitherStream, ProtoOpts};
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

/// Serves connections until `shutdown` is cancelled. Each connection runs as a task on
/// `sessions`, which the daemon drains on shutdown.
pub async fn serve(
    listener: Listener,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) -> io::Result<()> {
    serve_with(listener, checker, shutdown, sessions, Features::default()).await
}

/// [`serve`] with an explicit [`Features`] set.
///
/// Returns as soon as `shutdown` is cancelled; the drain described in the module docs goes
/// on in a task on `sessions`. Returns an error if the listener fails before that.
pub async fn serve_with(
    listener: Listener,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
    features: Features,
) -> io::Result<()> {
    let server = checker.snapshot().config.server.clone();
    let config = indymilter::Config {
        max_connections: server.max_connections,
        // Overridden per connection by the negotiate callback.
        actions: negotiate::ACTIONS,
        connection_timeout: server.milter_timeout,
    };
    let messages = TaskTracker::new();
    let callbacks = callbacks::build(Arc::new(Shared {
        checker,
        features,
        shutdown: shutdown.clone(),
        messages: messages.clone(),
    }));
    let stop_sessions = CancellationToken::new();
    let listener = Accepting::new(listener, shutdown.clone());
    let mut milter = sessions.spawn(indymilter::run(
        listener,
        callbacks,
        config,
        stop_sessions.clone().cancelled_owned(),
    ));
    let drain = shutdown.clone();
    sessions.spawn(async move {
        drain.cancelled().await;
        messages.close();
        messages.wait().await;
        tracing::debug!("milter: no message in flight; closing idle MTA connections");
        stop_sessions.cancel();
    });
    tokio::select! {
        res = &mut milter => res.unwrap_or_else(|e| Err(io::Error::other(e))),
        _ = shutdown.cancelled() => Ok(()),
    }
}

type Inner = EitherListener<TcpListener, UnixListener>;

/// The listener handed to indymilter: closed when `shutdown` is cancelled (indymilter itself
/// only drops it together with all sessions); transient accept errors do not end the milter.
struct Accepting {
    inner: Option<Inner>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Accepted TCP connections come with TCP_NODELAY already set (see [`Accepting::new`]).
    nodelay_inherited: bool,
}

impl Accepting {
    fn new(listener: Listener, shutdown: CancellationToken) -> Accepting {
        let mut nodelay_inherited = false;
        let inner = match listener {
            Listener::Tcp(l) => {
                // Linux copies TCP_NODELAY from the listening socket to each accepted one:
                // set once here, it saves a system call per MTA connection.
                nodelay_inherited = cfg!(target_os = "linux")
                    && socket2::SockRef::from(&l).set_tcp_nodelay(true).is_ok();
                EitherListener::Tcp(l)
            }
            Listener::Unix(l, _) => EitherListener::Unix(l),
        };
        Accepting {
            inner: Some(inner),
            stop: Box::pin(shutdown.cancelled_owned()),
            backoff: None,
            nodelay_inherited,
        }
    }
}

/// A milter connection as indymilter sees it: the socket plus what the milter protocol lets
/// this daemon save per message in system calls and MTA wake-ups.
///
/// **Writes** (TCP and Unix-domain sockets): indymilter writes and flushes every packet on
/// its own, so an end-of-message answer that inserts a header (a DKIM signature, our
/// `Authentication-Results`) would reach the MTA as two or more segments, each a system
/// call here and a wake-up of the MTA, which reads on until the final reply. A message
/// modification (header or recipient changes, never a reply) is therefore held until the
/// next packet that is not one, normally the final reply it belongs to, and both leave in
/// one write. Nothing the MTA waits for is ever held: option negotiation, every reply and
/// progress packet goes out with what was held before it. A modification that is never
/// followed by a reply (the session failed) is dropped with the connection, which the MTA
/// treats as a milter failure for that message, exactly as without the holding.
///
/// **Reads** (TCP only): Postfix writes a stage's macros and the stage's command as two small
/// packets, and waits for no reply to the first. With the receiver's delayed ACK (up to
/// 40 ms on Linux) and the sender's Nagle algorithm, the second packet then waits for that
/// ACK: about 40 ms per message, which caps Postfix at ~20 sessions / 50 ms = ~400
/// messages/s through any TCP milter. Setting `TCP_QUICKACK` sends the pending ACK at once;
/// Linux clears the flag on its own, so it is set again after each read that needs it: one
/// that ends in a packet without reply (macros, abort, and every stage negotiated with its
/// `NOREPLY_*` option, which this wrapper reads from the option-negotiation reply it
/// carries) or inside a packet. A read ending in a command we answer needs none: the answer
/// carries the ACK, and skipping the `setsockopt` there saves a system call per stage; nor
/// one ending in QUIT, after which the MTA sends nothing. Unix-domain sockets never had the
/// stall.
pub struct MtaStream<S> {
    stream: S,
    packets: Packets,
    out: Outgoing,
}

/// The socket kinds a milter connection comes over.
pub trait MtaSocket: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    /// Whether reads must be followed to hurry ACKs (see [`MtaStream`]).
    const DELAYED_ACKS: bool;

    /// Sends the pending ACK now (TCP_QUICKACK).
    fn quickack(&self) {}
}

impl MtaSocket for TcpStream {
    const DELAYED_ACKS: bool = true;

    fn quickack(&self) {
        #[cfg(target_os = "linux")]
        {
            let _ = socket2::SockRef::from(self).set_tcp_quickack(true);
        }
    }
}

impl MtaSocket for UnixStream {
    const DELAYED_ACKS: bool = false;
}

impl<S: MtaSocket> MtaStream<S> {
    fn new(stream: S) -> MtaStream<S> {
        // The MTA's first packet, option negotiation, is answered: no ACK to hurry yet.
        MtaStream {
            stream,
            packets: Packets::default(),
            out: Outgoing::default(),
        }
    }

    /// Writes out everything pending; `Ready(Ok)` once the socket has taken it all.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out.sent < self.out.pending.len() {
            let n = ready!(
                Pin::new(&mut self.stream).poll_write(cx, &self.out.pending[self.out.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.sent += n;
        }
        self.out.clear();
        Poll::Ready(Ok(()))
    }
}

/// How one direction of the byte stream stands in milter packets (4-byte length, command
/// byte, data).
#[derive(Debug, Default)]
struct Framing {
    /// Bytes of the current packet's length and command seen so far (0 to 4).
    head: [u8; 5],
    have: usize,
    /// Bytes of the current packet's data still to come.
    rest: usize,
    /// The command byte of the last packet started.
    command: u8,
}

impl Framing {
    /// Follows `bytes`, the next bytes of the stream.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(bytes.len());
                self.rest -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                let len =
                    u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
                self.command = self.head[4];
                self.rest = (len as usize).saturating_sub(1);
                self.have = 0;
            }
        }
    }

    /// Whether the bytes fed so far end inside a packet.
    fn inside(&self) -> bool {
        self.have > 0 || self.rest > 0
    }
}

/// What the MTA sent: where its stream stands and which stages it expects no reply to.
#[derive(Debug, Default)]
struct Packets {
    framing: Framing,
    /// The `NOREPLY_*` options agreed on (read from our option-negotiation reply).
    noreply: ProtoOpts,
    /// Our first write (the option-negotiation reply) has been seen.
    negotiated: bool,
}

impl Packets {
    /// Follows `bytes` just read; whether the MTA now waits for an ACK rather than for a
    /// reply of ours.
    fn needs_ack(&mut self, bytes: &[u8]) -> bool {
        self.framing.feed(bytes);
        // Inside a packet, more is on its way; else it depends on the last command. After
        // QUIT the MTA sends nothing more: no write of its waits for our ACK.
        let command = self.framing.command;
        self.framing.inside() || (command != b'Q' && !answered(command, self.noreply))
    }

    /// Follows what we write: our option-negotiation reply (length, `O`, version, actions,
    /// protocol options), the first thing we write, says which stages the MTA sends without
    /// waiting for a reply. Later writes are not looked at.
    fn wrote(&mut self, bytes: &[u8]) {
        if std::mem::replace(&mut self.negotiated, true) {
            return;
        }
        if bytes.len() >= 17 && bytes[4] == b'O' {
            let opts = u32::from_be_bytes([bytes[13], bytes[14], bytes[15], bytes[16]]);
            self.noreply = ProtoOpts::from_bits_truncate(opts);
        }
    }
}

/// What we write, kept until it may leave (see [`MtaStream`]).
#[derive(Debug, Default)]
struct Outgoing {
    pending: Vec<u8>,
    /// Bytes of `pending` the socket has taken.
    sent: usize,
    /// Where everything written so far stands in packets.
    framing: Framing,
}

/// Beyond this, held modifications are written out anyway (a bound on memory; the headers
/// this daemon adds are a few hundred bytes).
const MAX_HELD: usize = 64 * 1024;

impl Outgoing {
    fn push(&mut self, bytes: &[u8]) {
        self.framing.feed(bytes);
        self.pending.extend_from_slice(bytes);
    }

    /// Whether what is pending may wait for the packet after it: nothing of it has left
    /// yet, and it ends with a complete message modification.
    fn may_hold(&self) -> bool {
        self.sent == 0
            && self.pending.len() <= MAX_HELD
            && !self.framing.inside()
            && is_modification(self.framing.command)
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.sent = 0;
    }
}

/// Message modifications a milter sends at end of message before its final reply
/// (`SMFIR_ADDHEADER`, `INSHEADER`, `CHGHEADER`, `ADDRCPT`, `ADDRCPT_PAR`, `DELRCPT`,
/// `CHGFROM`, `QUARANTINE`). The MTA answers none of them and acts on them only with the
/// final reply. Body replacement is not held (it can be large and is not used here).
fn is_modification(command: u8) -> bool {
    matches!(
        command,
        b'h' | b'i' | b'm' | b'+' | b'2' | b'-' | b'e' | b'q'
    )
}

/// Whether we reply to `command`: always to option negotiation and end of message; to the
/// other stages unless negotiated with their `NOREPLY_*` option. Macros, abort, quit and
/// anything unknown get none.
fn answered(command: u8, noreply: ProtoOpts) -> bool {
    let option = match command {
        b'O' | b'E' => return true,
        b'C' => ProtoOpts::NOREPLY_CONNECT,
        b'H' => ProtoOpts::NOREPLY_HELO,
        b'M' => ProtoOpts::NOREPLY_MAIL,
        b'R' => ProtoOpts::NOREPLY_RCPT,
        b'T' => ProtoOpts::NOREPLY_DATA,
        b'L' => ProtoOpts::NOREPLY_HEADER,
        b'N' => ProtoOpts::NOREPLY_EOH,
        b'B' => ProtoOpts::NOREPLY_BODY,
        b'U' => ProtoOpts::NOREPLY_UNKNOWN,
        _ => return false,
    };
    !noreply.contains(option)
}

impl<S: MtaSocket> tokio::io::AsyncRead for MtaStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if S::DELAYED_ACKS {
            if let Poll::Ready(Ok(())) = r {
                if this.packets.needs_ack(&buf.filled()[before..]) {
                    this.stream.quickack();
                }
            }
        }
        r
    }
}

impl<S: MtaSocket> tokio::io::AsyncWrite for MtaStream<S> {
    /// Takes `buf` whole; it leaves at the next flush that may not hold it.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.pending.len() >= MAX_HELD {
            ready!(this.poll_send(cx))?;
        }
        this.packets.wrote(buf);
        this.out.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.out.may_hold() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    /// Writes out what is pending, and nothing more: indymilter shuts a connection down only
    /// to drop it, and closing the socket sends the FIN anyway (one system call per MTA
    /// connection less).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }
}

impl indymilter::Listener for Accepting {
    type Io = EitherStream<MtaStream<TcpStream>, MtaStream<UnixStream>>;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
        if self.inner.is_some() && self.stop.as_mut().poll(cx).is_ready() {
            self.inner = None;
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Pending;
        };
        if let Some(sleep) = self.backoff.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        loop {
            match indymilter::Listener::poll_accept(inner, cx) {
                Poll::Ready(Err(e)) if is_connection_error(&e) => continue,
                Poll::Ready(Err(e)) if is_resource_error(&e) => {
                    tracing::warn!("milter: cannot accept a connection: {e}; retrying shortly");
                    let mut sleep = Box::pin(tokio::time::sleep(Duration::from_millis(250)));
                    // Registers the waker; a fresh sleep is never ready at once.
                    let _ = sleep.as_mut().poll(cx);
                    self.backoff = Some(sleep);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(EitherStream::Tcp(stream))) => {
                    // No Nagle wait for our writes either: an end-of-message answer can be
                    // several packets (header changes, then the reply).
                    if !self.nodelay_inherited {
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!("milter: cannot set TCP_NODELAY: {e}");
                        }
                    }
                    return Poll::Ready(Ok(EitherStream::Tcp(MtaStream::new(stream))));
                }
                Poll::Ready(Ok(EitherStream::Unix(s))) => {
                    return Poll::Ready(Ok(EitherStream::Unix(MtaStream::new(s))));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The peer gave up before we accepted: only that connection is affected.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Out of file descriptors or memory: wait and try again rather than stop serving.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(command: u8, data: &[u8]) -> Vec<u8> {
        let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(command);
        p.extend_from_slice(data);
        p
    }

    /// Our option-negotiation reply agreeing on `noreply`.
    fn negotiated(noreply: ProtoOpts) -> Packets {
        let mut data = 6u32.to_be_bytes().to_vec();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&noreply.bits().to_be_bytes());
        let mut p = Packets::default();
        p.wrote(&packet(b'O', &data));
        assert_eq!(p.noreply, noreply);
        p
    }

    /// Postfix's MAIL stage: macros (no reply), then the command (answered).
    #[test]
    fn an_ack_is_sent_after_macros_and_inside_packets_not_after_a_command() {
        let macros = packet(b'D', b"Mi\0ABC123\0{auth_authen}\0\0");
        let mail = packet(b'M', b"<a@mpt.gov.la>\0");
        let stream = [macros, mail].concat();
        // Both packets in one read: the reply to MAIL carries the ACK.
        assert!(!Packets::default().needs_ack(&stream));
        // Each split point of the two packets, as two reads.
        for cut in 1..stream.len() {
            let mut p = Packets::default();
            // Ends inside the macros, after them (no reply) or inside MAIL: ACK at once.
            assert!(p.needs_ack(&stream[..cut]), "cut at {cut}");
            assert!(
                !p.needs_ack(&stream[cut..]),
                "cut at {cut}: MAIL is answered"
            );
        }
        for command in [b'A', b'D'] {
            assert!(Packets::default().needs_ack(&packet(command, b"x\0")));
        }
        // Postfix's usual last read: abort, abort, quit. Nothing follows QUIT.
        let end = [packet(b'A', b""), packet(b'A', b""), packet(b'Q', b"")].concat();
        assert!(!Packets::default().needs_ack(&end));
        assert!(Packets::default().needs_ack(&end[..end.len() - 5]));
        for command in [
            b'O', b'C', b'H', b'M', b'R', b'T', b'N', b'L', b'B', b'E', b'U',
        ] {
            assert!(!Packets::default().needs_ack(&packet(command, b"")));
        }
    }

    /// Stages negotiated without reply (headers, end of headers, and MAIL and RCPT when the
    /// policy service answers them) are ACKed at once: the MTA goes on without waiting.
    #[test]
    fn stages_negotiated_without_reply_are_acked_at_once() {
        let noreply = ProtoOpts::NOREPLY_HEADER
            | ProtoOpts::NOREPLY_EOH
            | ProtoOpts::NOREPLY_MAIL
            | ProtoOpts::NOREPLY_RCPT;
        let mut p = negotiated(noreply);
        for command in [b'L', b'N', b'M', b'R'] {
            assert!(p.needs_ack(&packet(command, b"x\0")), "{}", command as char);
        }
        for command in [b'B', b'C', b'H', b'E'] {
            assert!(
                !p.needs_ack(&packet(command, b"x\0")),
                "{}",
                command as char
            );
        }
        // Later writes do not change what was agreed, even one that looks like a reply to
        // option negotiation.
        p.wrote(&packet(b'c', b""));
        p.wrote(&packet(b'O', &[0; 12]));
        assert_eq!(p.noreply, noreply);
    }

    /// TCP_NODELAY, set once on the listener, is on for every accepted connection, and the
    /// MTA sees the end of the connection once the milter drops it (shutdown is a no-op).
    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_close_with_a_fin() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = crate::config::ListenAddr::Inet("127.0.0.1:0".parse().unwrap());
        let listener = Listener::bind(&addr).await.unwrap();
        let Ok(crate::config::ListenAddr::Inet(local)) = listener.local_addr() else {
            panic!("a TCP listener");
        };
        let mut accepting = Accepting::new(listener, CancellationToken::new());
        for _ in 0..2 {
            let mut mta = TcpStream::connect(local).await.unwrap();
            let accepted =
                std::future::poll_fn(|cx| indymilter::Listener::poll_accept(&mut accepting, cx))
                    .await
                    .unwrap();
            let EitherStream::Tcp(mut milter) = accepted else {
                panic!("a TCP stream");
            };
            assert!(milter.stream.nodelay().unwrap(), "TCP_NODELAY on");
            milter.write_all(b"\0\0\0\x01c").await.unwrap();
            milter.shutdown().await.unwrap();
            drop(milter);
            let mut got = Vec::new();
            mta.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"\0\0\0\x01c", "the write, then end of stream");
        }
    }

    /// Reads what the peer has written so far, without waiting.
    fn available(peer: &std::os::unix::net::UnixStream) -> Vec<u8> {
        use std::io::Read as _;
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        loop {
            match (&*peer).read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// An end-of-message answer (a header inserted, then the final reply) leaves in one
    /// write; replies, progress and option negotiation are never held.
    /// A milter stream over a Unix socket pair, and the MTA's end (non-blocking).
    fn stream_pair() -> (MtaStream<UnixStream>, std::os::unix::net::UnixStream) {
        let (ours, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        (MtaStream::new(UnixStream::from_std(ours).unwrap()), peer)
    }

    #[tokio::test]
    async fn modifications_leave_with_the_reply_that_follows_them() {
        use tokio::io::AsyncWriteExt as _;
        let (mut milter, peer) = stream_pair();
        let write = async |m: &mut MtaStream<UnixStream>, p: &[u8]| {
            m.write_all(p).await.unwrap();
            m.flush().await.unwrap();
        };
        let optneg = packet(b'O', &[0; 12]);
        write(&mut milter, &optneg).await;
        assert_eq!(available(&peer), optneg, "option negotiation at once");

        let signature = packet(b'i', b"\0\0\0\x01DKIM-Signature\0v=1; a=rsa-sha256\0");
        let results = packet(b'h', b"Authentication-Results\0mx.gov.la; none\0");
        write(&mut milter, &signature).await;
        write(&mut milter, &results).await;
        assert_eq!(available(&peer), b"", "modifications wait for the reply");
        let accept = packet(b'c', b"");
        write(&mut milter, &accept).await;
        assert_eq!(
            available(&peer),
            [signature.clone(), results, accept].concat()
        );

        // A progress packet (the MTA's timeout is reset by it) takes the held part along.
        write(&mut milter, &signature).await;
        let progress = packet(b'p', b"");
        write(&mut milter, &progress).await;
        assert_eq!(available(&peer), [signature.clone(), progress].concat());

        // Replies at other stages leave at once.
        for reply in [packet(b'c', b""), packet(b'y', b"550 5.7.1 No\0")] {
            write(&mut milter, &reply).await;
            assert_eq!(available(&peer), reply);
        }

        // Held at shutdown (a session that failed after a modification): written out.
        write(&mut milter, &signature).await;
        milter.shutdown().await.unwrap();
        assert_eq!(available(&peer), signature);
    }

    /// Holding is bounded: past MAX_HELD bytes, modifications are written out.
    #[tokio::test]
    async fn held_modifications_are_bounded() {
        use tokio::io::AsyncWriteExt as _;
        let (mut milter, peer) = stream_pair();
        let header = packet(b'h', &vec![b'x'; 1000]);
        let mut wrote = 0;
        while wrote <= MAX_HELD {
            milter.write_all(&header).await.unwrap();
            milter.flush().await.unwrap();
            wrote += header.len();
        }
        let got = available(&peer);
        assert!(!got.is_empty() && got.len() <= wrote, "{} bytes", got.len());
        assert!(milter.out.pending.len() < header.len() * 2);
    }

    #[test]
    fn large_packets_are_followed_across_many_reads() {
        let body = packet(b'B', &vec![b'x'; 70_000]);
        let eom = packet(b'E', b"");
        let stream = [body, eom].concat();
        let mut p = Packets::default();
        let mut acks = 0;
        let mut last = false;
        for chunk in stream.chunks(8192) {
            last = p.needs_ack(chunk);
            acks += usize::from(last);
        }
        assert!(!last, "ends with the end of message, which is answered");
        // Every read but the last ends inside the body chunk.
        assert_eq!(acks, stream.len().div_ceil(8192) - 1);
    }
}
