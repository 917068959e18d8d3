//! The README's quick start, as written: `config/quickstart.toml` (its ports moved to free
//! ones, nothing else changed; run from a fresh directory, as its relative `var/` paths
//! expect), then the shell commands of the README's block, the CLI finding the daemon through
//! `MAILWARDEN_URL` and `MAILWARDEN_TOKEN` as the block exports them.

mod common;

use common::daemon::Bound;
use common::process::{TestDir, tail, terminate, wait_for};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_readme_quick_start_works_as_written() {
    let section = common::readme::section("## Quick start");
    // The run command names the shipped quick-start config.
    assert!(
        section.contains("-- run --config config/quickstart.toml"),
        "{section}"
    );
    let dir = TestDir::new("mw-quickstart-");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/quickstart.toml"
    ))
    .unwrap();
    let mut config = shipped.clone();
    for port in ["8891", "10040", "8026"] {
        let fixed = format!("127.0.0.1:{port}\"");
        assert!(config.contains(&fixed), "quickstart.toml listens on {port}");
        config = config.replace(&fixed, "127.0.0.1:0\"");
    }
    let conf = dir.join("quickstart.toml");
    std::fs::write(&conf, &config).unwrap();
    let ready = dir.join("ready.json");
    let log = dir.join("mailwarden.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
        .args(["run", "--config"])
        .arg(&conf)
        .arg("--ready-file")
        .arg(&ready)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let bound: Bound = wait_for("the quick-start daemon", Duration::from_secs(30), || {
        if let Some(st) = daemon.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}):\n{}",
                tail(&dir.join("stderr.log"), 4000)
            );
        }
        serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()
    });
    assert!(
        dir.join("var/mailwarden.db").exists(),
        "the store is created in ./var/"
    );

    // The block's lines: `export ...`, `mw=...`, then `$mw ...` commands.
    let block = section
        .split("```sh\n")
        .nth(2)
        .and_then(|b| b.split("```").next())
        .expect("the second shell block: the CLI commands");
    let export = block
        .lines()
        .find(|l| l.starts_with("export "))
        .expect("an export line");
    let token = export
        .split_whitespace()
        .find_map(|w| w.strip_prefix("MAILWARDEN_TOKEN="))
        .expect("the token exported");
    assert!(
        shipped.contains(&format!("token = \"{token}\"")),
        "the README's token is quickstart.toml's"
    );
    let url = format!("http://{}", bound.admin.strip_prefix("inet:").unwrap());
    let commands: Vec<&str> = block.lines().filter(|l| l.starts_with("$mw ")).collect();
    assert!(commands.len() >= 4, "{block}");
    let mut last = String::new();
    for line in &commands {
        // As a shell would run it, with $mw the binary this test run built.
        let out = Command::new("sh")
            .arg("-c")
            .arg(line.replacen("$mw", "\"$MW\"", 1))
            .env("MW", env!("CARGO_BIN_EXE_mailwarden"))
            .env("MAILWARDEN_URL", &url)
            .env("MAILWARDEN_TOKEN", token)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        last = String::from_utf8_lossy(&out.stdout).into_owned();
    }
    // The last command lists the organisation's accounts, the suspended one as such.
    let cabinet = last
        .lines()
        .find(|l| l.contains("cabinet@mpt.gov.la"))
        .unwrap_or_else(|| panic!("{last}"));
    assert!(cabinet.contains("suspended"), "{last}");
    assert!(last.contains("champa@mpt.gov.la"), "{last}");
    terminate(daemon.id(), Duration::from_secs(10));
    let status = daemon.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the daemon cleanly: {status}"
    );
}
