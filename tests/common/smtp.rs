//! Talking SMTP to the private Postfix: swaks for whole transactions (its transcript shows
//! every reply), and a minimal line client for a session kept open across a reload.

use super::process::find_program;
use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// Last line of every test message body; a sink dump containing it is complete.
pub const END_MARKER: &str = "mailwarden-e2e-end-of-message";

/// A finished swaks run.
#[derive(Debug)]
pub struct Sent {
    /// swaks' exit code: 0 delivered to the server, 23 MAIL refused, 24 no RCPT accepted,
    /// 2 cannot connect, ...
    pub status: Option<i32>,
    /// stdout + stderr: the SMTP transcript.
    pub transcript: String,
    /// Unique value of the message's `X-E2E-Tag` header (find it at the sink with it).
    pub tag: String,
}

impl Sent {
    /// The server's (first) reply line to the first command starting with `command`
    /// (`"MAIL FROM"`, `"RCPT TO:<a@b>"`, `"."` for end of data), without swaks' prefix.
    pub fn reply(&self, command: &str) -> Option<String> {
        let mut lines = self.transcript.lines();
        lines.find(|l| {
            l.strip_prefix(" -> ")
                .or_else(|| l.strip_prefix("~> "))
                .or_else(|| l.strip_prefix("**> "))
                .is_some_and(|c| c.starts_with(command))
        })?;
        let reply = lines.next()?;
        reply
            .strip_prefix("<-  ")
            .or_else(|| reply.strip_prefix("<** "))
            .or_else(|| reply.strip_prefix("<~  "))
            .or_else(|| reply.strip_prefix("<~* "))
            .map(str::to_owned)
    }

    /// The reply to `command`, asserted present (the transcript is in the panic message).
    pub fn expect_reply(&self, command: &str) -> String {
        self.reply(command).unwrap_or_else(|| {
            panic!(
                "no reply to {command:?} in the transcript:\n{}",
                self.transcript
            )
        })
    }

    /// The server took the message ("250 ... queued as ...").
    pub fn queued(&self) -> bool {
        self.reply(".").is_some_and(|r| r.starts_with("250 "))
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A tag no other message in this test run carries.
pub fn unique_tag() -> String {
    format!(
        "e2e-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sends one message with swaks: one MAIL FROM, one RCPT per recipient, DATA if at least
/// one recipient was accepted.
pub fn swaks(server: &str, from: &str, to: &[&str]) -> Sent {
    swaks_with(server, from, to, &[])
}

/// [`swaks`] with extra swaks arguments (`--xclient-login champa`, `--header From: ...`).
pub fn swaks_with(server: &str, from: &str, to: &[&str], extra: &[&str]) -> Sent {
    let swaks = find_program("swaks", &["/usr/bin"]);
    let tag = unique_tag();
    let out = Command::new(&swaks)
        .args(["--server", server])
        .args(["--helo", "client.e2e.test"])
        .args(["--from", from])
        .args(["--to", &to.join(",")])
        .args(["--timeout", "30"])
        .args(["--add-header", &format!("X-E2E-Tag: {tag}")])
        .args([
            "--body",
            &format!("mailwarden end-to-end test message\n{END_MARKER}\n"),
        ])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", swaks.display()));
    Sent {
        status: out.status.code(),
        transcript: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        tag,
    }
}

/// One SMTP session driven line by line (for tests that need it to stay open).
pub struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Everything said so far, for failure messages.
    pub transcript: String,
}

impl Session {
    /// Connects, reads the banner and says EHLO.
    pub fn open(server: &str) -> Session {
        let stream = TcpStream::connect(server).unwrap_or_else(|e| panic!("connect {server}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut s = Session {
            reader: BufReader::new(stream.try_clone().expect("clone stream")),
            writer: stream,
            transcript: String::new(),
        };
        let banner = s.read_reply();
        assert!(banner.starts_with("220"), "banner: {banner}");
        let ehlo = s.command("EHLO client.e2e.test");
        assert!(ehlo.starts_with("250"), "EHLO: {ehlo}");
        s
    }

    /// Sends one command line; returns the reply's last line.
    pub fn command(&mut self, line: &str) -> String {
        self.transcript.push_str(&format!("C: {line}\n"));
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("send {line:?}: {e}\n{}", self.transcript));
        self.read_reply()
    }

    fn read_reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("read reply: {e}\n{}", self.transcript));
            assert!(n > 0, "server closed the session:\n{}", self.transcript);
            let line = line.trim_end().to_owned();
            self.transcript.push_str(&format!("S: {line}\n"));
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }
}
