//! The README's backup of the embedded store (section "Storage"): `sqlite3 FILE ".backup
//! COPY"` while the daemon runs. The daemon writes in WAL mode, so its latest changes may
//! still be in the `-wal` file; the copy must hold them all, and a daemon started on the
//! copy must serve the same directory.
//!
//! Needs Debian's `sqlite3` (`.ci/run` installs it).

mod common;

use common::daemon::Mailwarden;
use common::process::find_program;

fn list(mw: &Mailwarden) -> serde_json::Value {
    serde_json::from_str(&mw.cli_ok("user", &["list", "--org", "mpt", "--json"]))
        .expect("user list --json is JSON")
}

#[test]
fn a_backup_taken_while_the_daemon_runs_restores_its_directory() {
    let mw = Mailwarden::start("");
    mw.cli_ok("org", &["add", "mpt", "--name", "Ministry of Posts"]);
    for i in 0..25 {
        mw.cli_ok(
            "user",
            &[
                "add",
                &format!("user{i}@mpt.gov.la"),
                "--kind",
                "person",
                "--status",
                "active",
            ],
        );
    }
    mw.cli_ok(
        "user",
        &["suspend", "user3@mpt.gov.la", "--reason", "on leave"],
    );
    mw.cli_ok("user", &["quota", "user4@mpt.gov.la", "5000000"]);
    let wal = mw.sqlite_file().with_extension("db-wal");
    assert!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0,
        "the latest changes are in the WAL ({}), not only in the main file",
        wal.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("mw-backup.db");
    let out = std::process::Command::new(find_program("sqlite3", &["/usr/bin"]))
        .arg(mw.sqlite_file())
        .arg(format!(".backup {}", copy.display()))
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 .backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let restored = Mailwarden::start_on_store(&format!("sqlite:{}", copy.display()), "");
    let (before, after) = (list(&mw), list(&restored));
    assert_eq!(before, after, "the copy serves the same accounts");
    assert_eq!(after["users"].as_array().map(Vec::len), Some(25), "{after}");
    let shown: serde_json::Value =
        serde_json::from_str(&restored.cli_ok("user", &["show", "user4@mpt.gov.la", "--json"]))
            .unwrap();
    assert_eq!(shown["quota_bytes"], 5_000_000, "{shown}");
    // The daemon that was backed up runs on, unaffected.
    mw.cli_ok(
        "user",
        &[
            "add",
            "late@mpt.gov.la",
            "--kind",
            "person",
            "--status",
            "active",
        ],
    );
}
