//! A local authoritative DNS server for the end-to-end tests: Debian's `dnsmasq` binary
//! (package `dnsmasq-base`: no system service), in the foreground on 127.0.0.1 and a free
//! port, serving the test zones' TXT records and answering NXDOMAIN for every other name
//! under them. Stopped (by its PID) when dropped.

use super::process::{find_program, free_port};
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

pub struct Dnsmasq {
    /// `127.0.0.1:PORT`, as written in `[dns] nameservers`.
    pub addr: String,
    child: Child,
}

/// A TXT value as dnsmasq takes it on its command line: strings of at most 255 bytes,
/// comma-separated (one record of several strings; resolvers join them). dnsmasq keeps
/// quotes given on the command line as part of the text, so none are added; the test
/// records contain no commas.
fn txt_strings(text: &str) -> String {
    assert!(!text.contains(','), "TXT text with a comma: {text}");
    text.as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(",")
}

impl Dnsmasq {
    /// Serves `records` (`(name, TXT text)`), authoritative for `zones` (NXDOMAIN for names
    /// there without data, never forwarded anywhere).
    pub fn start(zones: &[&str], records: &[(String, String)]) -> Dnsmasq {
        let bin = find_program("dnsmasq", &["/usr/sbin"]);
        for _ in 0..20 {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args([
                "--no-daemon",
                "--log-facility=-",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--conf-file=/dev/null",
                "--user=root",
                "--pid-file=",
                "--log-queries",
            ])
            .arg(format!("--port={port}"));
            for z in zones {
                cmd.arg(format!("--local=/{z}/"));
            }
            for (name, text) in records {
                cmd.arg(format!("--txt-record={name},{}", txt_strings(text)));
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
            // dnsmasq logs "started" once its sockets are bound, or an error and exits.
            let stderr = child.stderr.take().expect("stderr");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("started") || line.contains("failed") {
                        let _ = tx.send(line);
                    }
                }
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("started") => {
                    return Dnsmasq {
                        addr: format!("127.0.0.1:{port}"),
                        child,
                    };
                }
                Ok(line) if line.contains("in use") => {
                    let _ = child.kill();
                    let _ = child.wait();
                    continue;
                }
                other => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("dnsmasq did not start: {other:?}");
                }
            }
        }
        panic!("no free port for dnsmasq after 20 tries");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
