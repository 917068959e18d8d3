//! DKIM verifiers nobody here wrote, for the signatures mailwarden makes: dkimpy
//! (Debian `python3-dkim`, Ed25519 through `python3-nacl`) and OpenDKIM (Debian `opendkim`,
//! its `-t` test mode). Both get the public keys offline, never from DNS: dkimpy through a
//! `dnsfunc`, OpenDKIM through its `TestPublicKeys` file.
//!
//! OpenDKIM's `opendkim-testmsg` (package `opendkim-tools`) is not used: it has no option to
//! supply a key other than through DNS, and on Debian 12 it fails every message with
//! "dkim_chunk(): Syntax error" before any lookup. `opendkim -t` runs the same library
//! (libopendkim) and reads keys from a file.

use super::process::{TestDir, find_program};
use std::{collections::BTreeMap, process::Command};

/// The DNS names and TXT values verifiers may look up (`sel._domainkey.dom` → `v=DKIM1; ...`).
#[derive(Debug, Clone, Default)]
pub struct Records(pub BTreeMap<String, String>);

impl Records {
    /// Adds a record in the form `mailwarden dkim keygen` prints it:
    /// `NAME. IN TXT ( "part" "part" )`.
    pub fn add_zone_line(&mut self, line: &str) {
        let (name, rest) = line.split_once(" IN TXT ").expect("a TXT record line");
        let value: String = rest.split('"').skip(1).step_by(2).collect();
        self.0
            .insert(name.trim_end_matches('.').to_ascii_lowercase(), value);
    }
}

/// A message as the MTA delivers it after the milter's `insert_header(0, ...)` calls: the
/// last inserted header on top. `inserted` values are as sent over the milter protocol
/// (LF-folded, leading space included when negotiated).
pub fn assemble(inserted: &[(String, String)], header_block: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in inserted.iter().rev() {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(value.replace('\n', "\r\n").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(header_block);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

const DKIMPY: &str = r#"
import json, sys
import dkim

records = json.load(open(sys.argv[1]))

def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    value = records.get(name.rstrip('.').lower())
    return value.encode() if value is not None else None

for path in sys.argv[2:]:
    msg = open(path, 'rb').read()
    d = dkim.DKIM(msg)
    count = sum(1 for (k, v) in d.headers if k.lower() == b'dkim-signature')
    results = []
    for i in range(count):
        try:
            results.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except Exception as e:
            sys.stderr.write("%s signature %d: %r\n" % (path, i, e))
            results.append(False)
    print(json.dumps(results))
"#;

/// dkimpy's verdict on every DKIM-Signature of every message (in header order).
pub fn dkimpy(messages: &[Vec<u8>], records: &Records) -> Vec<Vec<bool>> {
    let dir = TestDir::new("mw-dkimpy-");
    let recs = dir.join("records.json");
    std::fs::write(&recs, serde_json::to_string(&records.0).unwrap()).unwrap();
    let mut paths = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let p = dir.join(&format!("msg{i}.eml"));
        std::fs::write(&p, m).unwrap();
        paths.push(p);
    }
    // Debian's interpreter, where python3-dkim is installed (a python3 earlier on PATH may
    // be another installation without it).
    let python = find_program("python3", &["/usr/bin"]);
    let out = Command::new(python)
        .arg("-c")
        .arg(DKIMPY)
        .arg(&recs)
        .args(&paths)
        .output()
        .expect("run python3 (apt-get install python3-dkim python3-nacl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dkimpy failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Vec<bool>> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON list per message"))
        .collect();
    assert_eq!(results.len(), messages.len(), "{stdout}");
    if results.iter().flatten().any(|ok| !ok) {
        eprintln!("dkimpy: {}", String::from_utf8_lossy(&out.stderr));
    }
    results
}

/// OpenDKIM's verdict on each message (`opendkim -t`, which reports the first signature it
/// evaluates): true when it says "verification ... succeeded".
pub fn opendkim(messages: &[Vec<u8>], records: &Records) -> Vec<bool> {
    let dir = TestDir::new("mw-opendkim-");
    let keys = dir.join("keys.txt");
    let lines: String = records
        .0
        .iter()
        .map(|(name, value)| format!("{name} {value}\n"))
        .collect();
    std::fs::write(&keys, lines).unwrap();
    let conf = dir.join("opendkim.conf");
    std::fs::write(
        &conf,
        format!(
            "Mode v\nSyslog no\nTestPublicKeys {}\nMinimumKeyBits 1024\n",
            keys.display()
        ),
    )
    .unwrap();
    let opendkim = find_program("opendkim", &["/usr/sbin"]);
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let p = dir.join(&format!("msg{i}.eml"));
            std::fs::write(&p, m).unwrap();
            let out = Command::new(&opendkim)
                .arg("-x")
                .arg(&conf)
                .arg("-t")
                .arg(&p)
                .output()
                .expect("run opendkim (apt-get install opendkim)");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let ok = text.contains("verification") && text.contains("succeeded");
            if !ok {
                eprintln!("opendkim on message {i}: {text}");
            }
            ok
        })
        .collect()
}
