//! The MTA side of the milter protocol, driven the way Postfix drives it: negotiate, send
//! each stage with its macros, skip the stages the milter declined, ABORT after end of
//! message. Built on `indymilter-test` (by indymilter's author). Used by the tests and by
//! the load generator; never on the mail path.

use crate::config::ListenAddr;
use indymilter_test::{MacroStage, ProtoOpts, TestConnection};
use std::{net::IpAddr, time::Duration};

pub use indymilter_test::{Status, TestError as ClientError};

/// Macros as `(name, value)` pairs, e.g. `("i", "4XyZ1")`.
pub type Macros<'a> = &'a [(&'a str, &'a str)];

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
    /// Queue id sent as macro `i` at every message stage (as Postfix does once it has one).
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
    /// The answer at end of message; `None` when the message never got there (MAIL refused,
    /// no recipient accepted, or refused at DATA).
    pub eom: Option<Status>,
}

impl Outcome {
    /// Whether the milter let the message through to end of message.
    pub fn delivered(&self) -> bool {
        self.eom == Some(Status::Continue) || self.eom == Some(Status::Accept)
    }
}

/// True for the answers after which the MTA goes on with the transaction.
pub fn proceeds(s: &Status) -> bool {
    matches!(s, Status::Continue | Status::Noreply | Status::Skip)
}

/// An open, negotiated milter connection.
pub struct MtaConnection {
    conn: TestConnection,
}

impl MtaConnection {
    /// Connects to `addr` and negotiates, offering what Postfix 3 offers.
    pub async fn open(addr: &ListenAddr, timeout: Duration) -> Result<MtaConnection, ClientError> {
        let b = TestConnection::configure()
            .read_timeout(timeout)
            .write_timeout(timeout);
        let conn = match addr {
            ListenAddr::Inet(a) => b.open_tcp(*a).await?,
            ListenAddr::Unix(p) => b.open_unix(p).await?,
        };
        Ok(MtaConnection { conn })
    }

    pub fn negotiated_opts(&self) -> ProtoOpts {
        self.conn.negotiated_opts()
    }

    pub fn negotiated_actions(&self) -> indymilter_test::Actions {
        self.conn.negotiated_actions()
    }

    pub fn requested_macros(&self) -> &std::collections::HashMap<MacroStage, std::ffi::CString> {
        self.conn.requested_macros()
    }

    fn skips(&self, opt: ProtoOpts) -> bool {
        self.conn.negotiated_opts().contains(opt)
    }

    async fn macros(&mut self, stage: MacroStage, m: Macros<'_>) -> Result<(), ClientError> {
        if m.is_empty() {
            return Ok(());
        }
        self.conn.macros(stage, m.iter().copied()).await
    }

    /// CONNECT with the client's name and address (port 0).
    pub async fn connect(
        &mut self,
        name: &str,
        ip: IpAddr,
        m: Macros<'_>,
    ) -> Result<Status, ClientError> {
        if self.skips(ProtoOpts::NO_CONNECT) {
            return Ok(Status::Continue);
        }
        self.macros(MacroStage::Connect, m).await?;
        self.conn.connect(name, ip).await
    }

    pub async fn helo(&mut self, name: &str, m: Macros<'_>) -> Result<Status, ClientError> {
        if self.skips(ProtoOpts::NO_HELO) {
            return Ok(Status::Continue);
        }
        self.macros(MacroStage::Helo, m).await?;
        self.conn.helo(name).await
    }

    pub async fn mail(&mut self, args: &[&str], m: Macros<'_>) -> Result<Status, ClientError> {
        self.macros(MacroStage::Mail, m).await?;
        self.conn.mail(args.iter().copied()).await
    }

    pub async fn rcpt(&mut self, rcpt: &str, m: Macros<'_>) -> Result<Status, ClientError> {
        self.macros(MacroStage::Rcpt, m).await?;
        self.conn.rcpt([rcpt]).await
    }

    /// DATA, headers, end of headers and body, each only if negotiated; the final status of
    /// this part (the first one that is not "go on").
    pub async fn content(
        &mut self,
        headers: &[(&str, &str)],
        body: &[u8],
        m: Macros<'_>,
    ) -> Result<Status, ClientError> {
        if !self.skips(ProtoOpts::NO_DATA) {
            self.macros(MacroStage::Data, m).await?;
            let s = self.conn.data().await?;
            if !proceeds(&s) {
                return Ok(s);
            }
        }
        if !self.skips(ProtoOpts::NO_HEADER) {
            for (name, value) in headers {
                let s = self.conn.header(*name, *value).await?;
                if !proceeds(&s) {
                    return Ok(s);
                }
            }
        }
        if !self.skips(ProtoOpts::NO_EOH) {
            self.macros(MacroStage::Eoh, m).await?;
            let s = self.conn.eoh().await?;
            if !proceeds(&s) {
                return Ok(s);
            }
        }
        if !self.skips(ProtoOpts::NO_BODY) && !body.is_empty() {
            let s = self.conn.body(body.to_vec()).await?;
            if !proceeds(&s) {
                return Ok(s);
            }
        }
        Ok(Status::Continue)
    }

    /// End of message; modification actions the milter sent are discarded.
    pub async fn eom(&mut self, m: Macros<'_>) -> Result<Status, ClientError> {
        self.macros(MacroStage::Eom, m).await?;
        let (_actions, status) = self.conn.eom().await?;
        Ok(status)
    }

    /// ABORT: ends the current message (Postfix also sends it after each end of message).
    pub async fn abort(&mut self) -> Result<(), ClientError> {
        self.conn.abort().await
    }

    /// One whole message: MAIL, every RCPT, then (if a recipient was accepted) the content
    /// and end of message; ABORT at the end, as Postfix does.
    pub async fn transaction(&mut self, msg: &Message<'_>) -> Result<Outcome, ClientError> {
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
        if proceeds(&out.mail) {
            for r in &msg.recipients {
                out.rcpts.push(self.rcpt(r, &qid).await?);
            }
            if out.rcpts.iter().any(proceeds) {
                let s = self.content(&msg.headers, msg.body, &qid).await?;
                if proceeds(&s) {
                    out.eom = Some(self.eom(&qid).await?);
                }
            }
        }
        self.abort().await?;
        Ok(out)
    }

    /// QUIT and close.
    pub async fn close(self) -> Result<(), ClientError> {
        self.conn.close().await
    }
}
