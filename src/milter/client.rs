//! The MTA side of the milter protocol, driven the way Postfix drives it: negotiate, send
//! each stage with its macros, skip the stages the milter declined, ABORT after end of
//! message. Used by the tests and the load generator; never on the mail path.
//!
//! Framing and payloads come from indymilter's public `message` module. The TCP socket has
//! `TCP_NODELAY` set: a macro command and its stage command are two small writes with no
//! reply in between, which Nagle's algorithm would otherwise hold back for a delayed ACK.

use crate::config::ListenAddr;
use indymilter::{
    Actions, EitherStream, MacroStage, ProtoOpts, SocketInfo,
    message::{
        self, Message as Frame, PROTOCOL_VERSION,
        command::{
            Command, ConnInfoPayload, EnvAddrPayload, HeaderPayload, HeloPayload, MacroPayload,
            OptNegPayload,
        },
        reply::Reply,
    },
};
use std::{
    collections::HashMap,
    ffi::CString,
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tokio::{
    io::BufStream,
    net::{TcpStream, UnixStream},
};

/// Macros as `(name, value)` pairs, e.g. `("i", "4XyZ1")`.
pub type Macros<'a> = &'a [(&'a str, &'a str)];

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("no answer from the milter within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from the milter: {0}")]
    Unexpected(String),
}

/// The milter's answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Continue,
    Accept,
    Discard,
    Skip,
    /// `reply` is the SMTP reply the milter chose (`550 5.2.1 ...`), if any.
    Reject {
        reply: Option<String>,
    },
    Tempfail {
        reply: Option<String>,
    },
}

impl Status {
    /// True for the answers after which the MTA goes on with the transaction.
    pub fn proceeds(&self) -> bool {
        matches!(self, Status::Continue | Status::Skip)
    }

    /// The SMTP reply text of a refusal.
    pub fn reply(&self) -> Option<&str> {
        match self {
            Status::Reject { reply } | Status::Tempfail { reply } => reply.as_deref(),
            _ => None,
        }
    }

    fn from_reply(r: Reply) -> Result<Status, ClientError> {
        Ok(match r {
            Reply::Continue => Status::Continue,
            Reply::Accept => Status::Accept,
            Reply::Discard => Status::Discard,
            Reply::Skip => Status::Skip,
            Reply::Reject => Status::Reject { reply: None },
            Reply::Tempfail => Status::Tempfail { reply: None },
            Reply::ReplyCode { reply } => {
                let text = reply.to_string_lossy().into_owned();
                match text.as_bytes().first() {
                    Some(b'4') => Status::Tempfail { reply: Some(text) },
                    Some(b'5') => Status::Reject { reply: Some(text) },
                    _ => return Err(ClientError::Unexpected(format!("reply code {text:?}"))),
                }
            }
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        })
    }
}

/// One message as an SMTP client would send it through the MTA.
#[derive(Debug, Clone, Default)]
pub struct Message<'a> {
    /// `MAIL FROM` argument, with angle brackets (`<a@b>`, `<>`).
    pub sender: &'a str,
    /// ESMTP parameters after the address (`SIZE=1234`).
    pub mail_params: Vec<&'a str>,
    /// `RCPT TO` arguments, with angle brackets.
    pub recipients: Vec<&'a str>,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
    /// Queue id sent as macro `i` at every message stage.
    pub queue_id: Option<&'a str>,
    /// Extra macros sent before MAIL (`{auth_authen}`, `{tls_version}`).
    pub mail_macros: Vec<(&'a str, &'a str)>,
}

/// The milter's answers to one message, stage by stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub mail: Status,
    /// One answer per recipient, in order; empty when MAIL was refused.
    pub rcpts: Vec<Status>,
    /// The answer at end of message, or the refusal given during DATA, headers or body (the
    /// MTA answers the end of DATA with it); `None` when no DATA was sent (MAIL refused, no
    /// recipient accepted).
    pub eom: Option<Status>,
}

impl Outcome {
    /// Whether the milter let the message through end of message.
    pub fn delivered(&self) -> bool {
        matches!(self.eom, Some(Status::Continue | Status::Accept))
    }
}

type Stream = EitherStream<BufStream<TcpStream>, BufStream<UnixStream>>;

/// An open, negotiated milter connection.
pub struct MtaConnection {
    stream: Stream,
    timeout: Duration,
    actions: Actions,
    opts: ProtoOpts,
    macros: HashMap<MacroStage, CString>,
    /// Connection-level macro values (client, HELO, TLS) that the MTA keeps and sends again
    /// at any later stage whose macro list asks for them, as Postfix does.
    env: HashMap<String, String>,
}

impl MtaConnection {
    /// Connects to `addr` and negotiates, offering everything (as Postfix 3 does).
    pub async fn open(addr: &ListenAddr, timeout: Duration) -> Result<MtaConnection, ClientError> {
        Self::open_offering(addr, timeout, ProtoOpts::all()).await
    }

    /// [`open`](Self::open) offering only the protocol options `offered` (an older MTA).
    pub async fn open_offering(
        addr: &ListenAddr,
        timeout: Duration,
        offered: ProtoOpts,
    ) -> Result<MtaConnection, ClientError> {
        let connect = async {
            Ok::<_, io::Error>(match addr {
                ListenAddr::Inet(a) => {
                    let s = TcpStream::connect(a).await?;
                    s.set_nodelay(true)?;
                    EitherStream::Tcp(BufStream::new(s))
                }
                ListenAddr::Unix(p) => {
                    EitherStream::Unix(BufStream::new(UnixStream::connect(p).await?))
                }
            })
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        let mut c = MtaConnection {
            stream,
            timeout,
            actions: Actions::empty(),
            opts: ProtoOpts::empty(),
            macros: HashMap::new(),
            env: HashMap::new(),
        };
        c.send(Command::OptNeg(OptNegPayload {
            version: PROTOCOL_VERSION,
            actions: Actions::all(),
            opts: offered,
        }))
        .await?;
        match c.read().await? {
            Reply::OptNeg {
                actions,
                opts,
                macros,
                ..
            } => {
                c.actions = actions;
                c.opts = opts;
                c.macros = macros;
                Ok(c)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn negotiated_opts(&self) -> ProtoOpts {
        self.opts
    }

    pub fn negotiated_actions(&self) -> Actions {
        self.actions
    }

    /// Macro names the milter asked for, per stage.
    pub fn requested_macros(&self) -> &HashMap<MacroStage, CString> {
        &self.macros
    }

    async fn send(&mut self, cmd: Command) -> Result<(), ClientError> {
        let t = self.timeout;
        tokio::time::timeout(t, message::write(&mut self.stream, cmd.into_message()))
            .await
            .map_err(|_| ClientError::Timeout(t))??;
        Ok(())
    }

    async fn read(&mut self) -> Result<Reply, ClientError> {
        let t = self.timeout;
        let frame: Frame = tokio::time::timeout(t, message::read(&mut self.stream))
            .await
            .map_err(|_| ClientError::Timeout(t))??;
        Reply::parse_reply(frame).map_err(|e| ClientError::Unexpected(e.to_string()))
    }

    /// Sends a stage command and reads its answer, unless the milter declined the stage
    /// (answered `Continue` without sending) or declared it will not reply.
    async fn stage(
        &mut self,
        skip: ProtoOpts,
        noreply: ProtoOpts,
        macros: Option<(MacroStage, Macros<'_>)>,
        cmd: Command,
    ) -> Result<Status, ClientError> {
        if let Some((MacroStage::Connect | MacroStage::Helo, m)) = &macros {
            for (k, v) in m.iter() {
                self.env.insert(k.to_string(), v.to_string());
            }
        }
        if !skip.is_empty() && self.opts.contains(skip) {
            return Ok(Status::Continue);
        }
        if let Some((stage, m)) = macros {
            // The values given for this stage, plus the connection-level ones the milter
            // asked to see at this stage.
            let mut pairs: Vec<(String, String)> = m
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if let Some(wanted) = self.macros.get(&stage) {
                for name in wanted.to_string_lossy().split(' ') {
                    if let Some(v) = self.env.get(name) {
                        if !pairs.iter().any(|(k, _)| k == name) {
                            pairs.push((name.to_owned(), v.clone()));
                        }
                    }
                }
            }
            if !pairs.is_empty() {
                let macros = pairs
                    .iter()
                    .flat_map(|(k, v)| [cstring(k), cstring(v)])
                    .collect();
                self.send(Command::DefMacros(MacroPayload { stage, macros }))
                    .await?;
            }
        }
        self.send(cmd).await?;
        if !noreply.is_empty() && self.opts.contains(noreply) {
            return Ok(Status::Continue);
        }
        let r = self.read().await?;
        Status::from_reply(r)
    }

    /// CONNECT with the client's name and address (port 0).
    pub async fn connect(
        &mut self,
        name: &str,
        ip: IpAddr,
        m: Macros<'_>,
    ) -> Result<Status, ClientError> {
        let cmd = Command::ConnInfo(ConnInfoPayload {
            hostname: cstring(name),
            socket_info: SocketInfo::Inet(SocketAddr::new(ip, 0)),
        });
        // Postfix knows these from the connection and sends them wherever they are asked,
        // the address in its RFC 5321 form (`IPv6:` before an IPv6 address).
        let addr = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("IPv6:{a}"),
        };
        self.env.insert("{client_addr}".into(), addr);
        self.env.insert("{client_name}".into(), name.to_owned());
        self.stage(
            ProtoOpts::NO_CONNECT,
            ProtoOpts::NOREPLY_CONNECT,
            Some((MacroStage::Connect, m)),
            cmd,
        )
        .await
    }

    pub async fn helo(&mut self, name: &str, m: Macros<'_>) -> Result<Status, ClientError> {
        let cmd = Command::Helo(HeloPayload {
            hostname: cstring(name),
        });
        self.stage(
            ProtoOpts::NO_HELO,
            ProtoOpts::NOREPLY_HELO,
            Some((MacroStage::Helo, m)),
            cmd,
        )
        .await
    }

    /// MAIL with `args[0]` the address and the rest ESMTP parameters.
    pub async fn mail(&mut self, args: &[&str], m: Macros<'_>) -> Result<Status, ClientError> {
        let cmd = Command::Mail(EnvAddrPayload {
            args: args.iter().map(|a| cstring(a)).collect(),
        });
        self.stage(
            ProtoOpts::NO_MAIL,
            ProtoOpts::NOREPLY_MAIL,
            Some((MacroStage::Mail, m)),
            cmd,
        )
        .await
    }

    pub async fn rcpt(&mut self, rcpt: &str, m: Macros<'_>) -> Result<Status, ClientError> {
        let cmd = Command::Rcpt(EnvAddrPayload {
            args: vec![cstring(rcpt)],
        });
        self.stage(
            ProtoOpts::NO_RCPT,
            ProtoOpts::NOREPLY_RCPT,
            Some((MacroStage::Rcpt, m)),
            cmd,
        )
        .await
    }

    /// DATA, headers, end of headers and body, each only if negotiated; the first answer
    /// that stops the message, else `Continue`.
    pub async fn content(
        &mut self,
        headers: &[(&str, &str)],
        body: &[u8],
        m: Macros<'_>,
    ) -> Result<Status, ClientError> {
        let s = self
            .stage(
                ProtoOpts::NO_DATA,
                ProtoOpts::NOREPLY_DATA,
                Some((MacroStage::Data, m)),
                Command::Data,
            )
            .await?;
        if !s.proceeds() {
            return Ok(s);
        }
        // Postfix strips the space after the colon unless the milter asked to keep it.
        let space = if self.opts.contains(ProtoOpts::LEADING_SPACE) {
            " "
        } else {
            ""
        };
        for (name, value) in headers {
            let cmd = Command::Header(HeaderPayload {
                name: cstring(name),
                value: cstring(&format!("{space}{value}")),
            });
            let s = self
                .stage(ProtoOpts::NO_HEADER, ProtoOpts::NOREPLY_HEADER, None, cmd)
                .await?;
            if !s.proceeds() {
                return Ok(s);
            }
        }
        let s = self
            .stage(
                ProtoOpts::NO_EOH,
                ProtoOpts::NOREPLY_EOH,
                Some((MacroStage::Eoh, m)),
                Command::Eoh,
            )
            .await?;
        if !s.proceeds() {
            return Ok(s);
        }
        // Postfix's chunk size.
        for chunk in body.chunks(65535) {
            let cmd = Command::BodyChunk(chunk.to_vec().into());
            let s = self
                .stage(ProtoOpts::NO_BODY, ProtoOpts::NOREPLY_BODY, None, cmd)
                .await?;
            if s == Status::Skip {
                break;
            }
            if !s.proceeds() {
                return Ok(s);
            }
        }
        Ok(Status::Continue)
    }

    /// End of message: the final answer and the modification requests sent before it.
    pub async fn eom_with_actions(
        &mut self,
        m: Macros<'_>,
    ) -> Result<(Status, Vec<Reply>), ClientError> {
        if !m.is_empty() {
            let macros = m
                .iter()
                .flat_map(|(k, v)| [cstring(k), cstring(v)])
                .collect();
            self.send(Command::DefMacros(MacroPayload {
                stage: MacroStage::Eom,
                macros,
            }))
            .await?;
        }
        self.send(Command::BodyEnd(Default::default())).await?;
        let mut actions = Vec::new();
        loop {
            match self.read().await? {
                r @ (Reply::Continue
                | Reply::Accept
                | Reply::Discard
                | Reply::Reject
                | Reply::Tempfail
                | Reply::ReplyCode { .. }) => return Ok((Status::from_reply(r)?, actions)),
                Reply::Progress => {}
                action => actions.push(action),
            }
        }
    }

    /// End of message; modification requests are discarded.
    pub async fn eom(&mut self, m: Macros<'_>) -> Result<Status, ClientError> {
        Ok(self.eom_with_actions(m).await?.0)
    }

    /// ABORT: ends the current message (Postfix also sends it after each end of message).
    pub async fn abort(&mut self) -> Result<(), ClientError> {
        self.send(Command::Abort).await
    }

    /// One whole message: MAIL, every RCPT, then (if a recipient was accepted) the content
    /// and end of message; ABORT at the end, as Postfix does.
    pub async fn transaction(&mut self, msg: &Message<'_>) -> Result<Outcome, ClientError> {
        Ok(self.transaction_with_actions(msg).await?.0)
    }

    /// [`transaction`](Self::transaction), also returning the modification requests sent
    /// before the end-of-message answer (`InsertHeader` for a DKIM signature).
    pub async fn transaction_with_actions(
        &mut self,
        msg: &Message<'_>,
    ) -> Result<(Outcome, Vec<Reply>), ClientError> {
        let qid: Vec<(&str, &str)> = msg.queue_id.map(|q| ("i", q)).into_iter().collect();
        let mut mail_macros = qid.clone();
        mail_macros.extend(msg.mail_macros.iter().copied());
        let mut args = vec![msg.sender];
        args.extend(msg.mail_params.iter().copied());
        let mail = self.mail(&args, &mail_macros).await?;
        let mut out = Outcome {
            mail,
            rcpts: Vec::new(),
            eom: None,
        };
        let mut actions = Vec::new();
        if out.mail.proceeds() {
            for r in &msg.recipients {
                out.rcpts.push(self.rcpt(r, &qid).await?);
            }
            if out.rcpts.iter().any(Status::proceeds) {
                let s = self.content(&msg.headers, msg.body, &qid).await?;
                if s.proceeds() {
                    let (eom, a) = self.eom_with_actions(&qid).await?;
                    out.eom = Some(eom);
                    actions = a;
                } else {
                    // Refused during the content (e.g. at end of headers): the MTA gives
                    // that answer at the end of DATA.
                    out.eom = Some(s);
                }
            }
        }
        self.abort().await?;
        Ok((out, actions))
    }

    /// QUIT, then close the socket.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.send(Command::Quit).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await?;
        Ok(())
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("NUL bytes removed")
}
