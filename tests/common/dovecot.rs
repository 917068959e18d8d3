//! A private Dovecot (Debian's `dovecot-core` and `dovecot-imapd`, 2.3) for the tests: IMAP on
//! a free 127.0.0.1 port, users from a passwd file, maildirs under the test directory, every
//! runtime file (sockets, state, log) in that directory, so it runs beside a system Dovecot.
//! The master runs in the foreground and is stopped by its PID (it stops its children).
//!
//! [`Imap`] is a minimal IMAP client: tagged commands, `ID` (to present a client address,
//! which Dovecot trusts from `login_trusted_networks`), `LOGIN`, `APPEND`.

use super::process::{TestDir, find_program, free_port, tail, terminate, wait_for};
use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

pub struct Dovecot {
    child: Option<Child>,
    /// The IMAP port on 127.0.0.1.
    pub imap: u16,
    conf: PathBuf,
    log: PathBuf,
    pub dir: TestDir,
}

impl Dovecot {
    /// Starts Dovecot with `users` (address, password) and `extra` appended to its config
    /// (plugin settings, auth policy), and waits until it accepts IMAP connections.
    pub fn start(users: &[(&str, &str)], extra: &str) -> Dovecot {
        let bin = find_program("dovecot", &["/usr/sbin"]);
        let dir = TestDir::new("mw-dovecot-");
        let d = dir.path().display().to_string();
        let home = dir.join("home");
        std::fs::create_dir(&home).expect("mkdir home");
        // The mail processes run as nobody (a static userdb): it owns the maildirs.
        let chown = Command::new("chown")
            .args(["nobody:nogroup"])
            .arg(&home)
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown {}", home.display());
        let passwd: String = users
            .iter()
            .map(|(user, pass)| format!("{user}:{{PLAIN}}{pass}\n"))
            .collect();
        std::fs::write(dir.join("passwd"), passwd).expect("write passwd");
        let imap = free_port();
        let log = dir.join("dovecot.log");
        let conf = dir.join("dovecot.conf");
        // instance_name keeps `doveadm instance list` of a system Dovecot out of it; the
        // settings up to `userdb` are what a private instance needs, the rest is the test's.
        let text = format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = mw-test-{imap}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Lu
login_trusted_networks = 127.0.0.0/8
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/home/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{extra}
"#
        );
        std::fs::write(&conf, text).expect("write dovecot.conf");
        let out = std::fs::File::create(dir.join("dovecot.out")).expect("create dovecot.out");
        let err = out.try_clone().expect("dup");
        let child = Command::new(bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn dovecot (apt-get install dovecot-core dovecot-imapd; .ci/run does)");
        let mut dovecot = Dovecot {
            child: Some(child),
            imap,
            conf,
            log,
            dir,
        };
        wait_for("Dovecot's IMAP listener", Duration::from_secs(20), || {
            if let Some(st) = dovecot.child.as_mut()?.try_wait().expect("try_wait") {
                panic!(
                    "dovecot exited at start ({st}):\n{}\n{}",
                    tail(&dovecot.dir.join("dovecot.out"), 4000),
                    tail(&dovecot.log, 4000)
                );
            }
            TcpStream::connect(("127.0.0.1", imap)).ok().map(drop)
        });
        dovecot
    }

    /// `doveadm -c <this instance's config> ARGS`.
    pub fn doveadm(&self, args: &[&str]) -> Output {
        Command::new(find_program("doveadm", &["/usr/bin"]))
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run doveadm")
    }

    /// Dovecot's log so far.
    pub fn log(&self) -> String {
        tail(&self.log, 16_000)
    }

    /// A new IMAP connection, greeting read.
    pub fn imap(&self) -> Imap {
        Imap::connect(self.imap)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(child.id(), Duration::from_secs(10));
            let _ = child.wait();
        }
    }
}

/// One IMAP connection.
pub struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_tag: u32,
}

impl Imap {
    fn connect(port: u16) -> Imap {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to Dovecot's IMAP");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut imap = Imap {
            reader: BufReader::new(stream),
            writer,
            next_tag: 1,
        };
        let greeting = imap.line();
        assert!(greeting.starts_with("* OK"), "greeting: {greeting}");
        imap
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read from Dovecot");
        assert!(!line.is_empty(), "Dovecot closed the IMAP connection");
        line.trim_end().to_owned()
    }

    /// Sends `command` tagged; returns the tagged completion (`OK ...`, `NO ...`, `BAD ...`)
    /// without the tag.
    pub fn command(&mut self, command: &str) -> String {
        let tag = self.tag();
        write!(self.writer, "{tag} {command}\r\n").expect("write to Dovecot");
        self.completion(&tag)
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("t{}", self.next_tag)
    }

    fn completion(&mut self, tag: &str) -> String {
        loop {
            let line = self.line();
            if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
                return rest.to_owned();
            }
        }
    }

    /// Presents `address` as the client's (Dovecot believes it from a trusted network).
    pub fn present_address(&mut self, address: &str) {
        let done = self.command(&format!("ID (\"x-originating-ip\" \"{address}\")"));
        assert!(done.starts_with("OK"), "ID: {done}");
    }

    /// `LOGIN`; whether Dovecot accepted it.
    pub fn login(&mut self, user: &str, password: &str) -> bool {
        self.command(&format!("LOGIN \"{user}\" \"{password}\""))
            .starts_with("OK")
    }

    /// `LOGOUT`, and waits for Dovecot to confirm it.
    pub fn logout(mut self) {
        let done = self.command("LOGOUT");
        assert!(done.starts_with("OK"), "LOGOUT: {done}");
    }

    /// Appends `message` (CRLF line ends) to `mailbox`, asserting success.
    pub fn append(&mut self, mailbox: &str, message: &[u8]) {
        let tag = self.tag();
        // A synchronising literal: wait for the continuation before the bytes.
        write!(
            self.writer,
            "{tag} APPEND {mailbox} {{{}}}\r\n",
            message.len()
        )
        .unwrap();
        let cont = self.line();
        assert!(cont.starts_with('+'), "APPEND continuation: {cont}");
        self.writer.write_all(message).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        let done = self.completion(&tag);
        assert!(done.starts_with("OK"), "APPEND: {done}");
    }
}
