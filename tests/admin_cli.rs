//! `mailwarden org|user`: the built binary against a spawned admin API.

mod common;

use common::{ADMIN, Api, READ, WRITE};
use serde_json::Value;
use std::process::Output;

const BIN: &str = env!("CARGO_BIN_EXE_mailwarden");

async fn run(url: &str, token: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("MAILWARDEN_URL", url)
        .env("MAILWARDEN_TOKEN", token)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("binary runs")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

#[tokio::test]
async fn org_and_user_commands_round_trip() {
    let api = Api::start().await;
    let u = api.url.as_str();

    let o = run(
        u,
        WRITE,
        &["org", "add", "mpt", "--name", "Ministry of Posts"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("mpt.gov.la"), "{}", out(&o));

    let o = run(u, WRITE, &["org", "add", "ministry", "--name", "X"]).await;
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("R3 (Art. 8.2)"), "{}", err(&o));

    let o = run(
        u,
        WRITE,
        &[
            "user",
            "add",
            "Champa@mpt.gov.la",
            "--kind",
            "person",
            "--name",
            "Champa Souksavanh",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("champa@mpt.gov.la"));

    let o = run(
        u,
        WRITE,
        &[
            "user",
            "add",
            "champa@mpt.gov.la",
            "--kind",
            "person",
            "--name",
            "Champa Souksavanh",
        ],
    )
    .await;
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("already registered"), "{}", err(&o));
    assert!(
        err(&o).contains(
            "free alternatives: champa.s@mpt.gov.la, champa_s@mpt.gov.la, champa-s@mpt.gov.la"
        ),
        "{}",
        err(&o)
    );

    let o = run(
        u,
        WRITE,
        &["user", "add", "x..y@mpt.gov.la", "--kind", "unit"],
    )
    .await;
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("R3 (Art. 8.3)"), "{}", err(&o));

    let o = run(u, READ, &["user", "list", "--org", "mpt"]).await;
    assert_eq!(code(&o), 0);
    let text = out(&o);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("ADDRESS"), "{text}");
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("champa@mpt.gov.la  person  active"),
        "{text}"
    );

    let o = run(u, READ, &["user", "show", "champa@mpt.gov.la", "--json"]).await;
    assert_eq!(code(&o), 0);
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["name"], "Champa Souksavanh");

    let o = run(
        u,
        WRITE,
        &[
            "user",
            "suspend",
            "champa@mpt.gov.la",
            "--reason",
            "on leave",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("suspended"));
    let o = run(u, WRITE, &["user", "restore", "champa@mpt.gov.la"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));

    // Withdrawal: --yes is required (usage error), the token needs admin (3).
    let o = run(
        u,
        ADMIN,
        &["user", "withdraw", "champa@mpt.gov.la", "--reason", "left"],
    )
    .await;
    assert_eq!(code(&o), 2);
    assert!(err(&o).contains("--yes"));
    let o = run(
        u,
        WRITE,
        &[
            "user",
            "withdraw",
            "champa@mpt.gov.la",
            "--reason",
            "left",
            "--yes",
        ],
    )
    .await;
    assert_eq!(code(&o), 3);
    assert!(err(&o).contains("admin"), "{}", err(&o));
    let o = run(
        u,
        ADMIN,
        &[
            "user",
            "withdraw",
            "champa@mpt.gov.la",
            "--reason",
            "left",
            "--yes",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let o = run(u, WRITE, &["user", "restore", "champa@mpt.gov.la"]).await;
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("final"));

    let o = run(u, READ, &["org", "list"]).await;
    assert_eq!(code(&o), 0);
    assert!(
        out(&o).contains("mpt   mpt.gov.la  active  Ministry of Posts"),
        "{}",
        out(&o)
    );
    let o = run(u, ADMIN, &["org", "cease", "mpt", "--reason", "merged"]).await;
    assert_eq!(code(&o), 2);
    let o = run(
        u,
        ADMIN,
        &["org", "cease", "mpt", "--reason", "merged", "--yes"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let o = run(u, READ, &["org", "show", "mpt", "--json"]).await;
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["status"], "ceased");

    let o = run(u, READ, &["org", "show", "nope"]).await;
    assert_eq!(code(&o), 1);
    assert_eq!(api.audit().len(), 6);
    api.stop().await;
}

#[tokio::test]
async fn import_reports_bad_lines_and_imports_nothing() {
    let api = Api::start().await;
    api.mpt().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "address,kind,name,status\n\
         one@mpt.gov.la,person,One,\n\
         x..y@mpt.gov.la,person,,\n\
         \n\
         two@mpt.gov.la,boss,Two,active\n",
    )
    .unwrap();
    let o = run(&api.url, WRITE, &["user", "import", bad.to_str().unwrap()]).await;
    assert_eq!(code(&o), 1, "{}", err(&o));
    let e = err(&o);
    assert!(e.contains("nothing was imported"), "{e}");
    assert!(e.contains("line 3: local part \"x..y\" is invalid"), "{e}");
    assert!(
        e.contains("line 5: account kind \"boss\" is invalid"),
        "{e}"
    );
    assert!(!e.contains("line 2:"), "{e}");
    assert!(
        api.get("/v1/users", READ).await.1["users"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let good = dir.path().join("good.csv");
    std::fs::write(
        &good,
        "address,kind,name,status\none@mpt.gov.la,person,\"Souksavanh, One\",pending\ncabinet@mpt.gov.la,unit,,\n",
    )
    .unwrap();
    let o = run(&api.url, WRITE, &["user", "import", good.to_str().unwrap()]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("imported 2 account(s)"));
    let (_, v) = api.get("/v1/users/one@mpt.gov.la", READ).await;
    assert_eq!(v["name"], "Souksavanh, One");
    assert_eq!(v["status"], "pending");

    let wrong = dir.path().join("wrong.csv");
    std::fs::write(&wrong, "mail,type\na@mpt.gov.la,unit\n").unwrap();
    let o = run(
        &api.url,
        WRITE,
        &["user", "import", wrong.to_str().unwrap()],
    )
    .await;
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("address,kind,name,status"));
    let o = run(
        &api.url,
        WRITE,
        &["user", "import", "/nonexistent/file.csv"],
    )
    .await;
    assert_eq!(code(&o), 2);
    api.stop().await;
}

#[tokio::test]
async fn exit_codes_for_usage_unreachable_and_auth() {
    let api = Api::start().await;
    // Bad token: 3.
    let o = run(&api.url, "wrong-token-0000000000", &["org", "list"]).await;
    assert_eq!(code(&o), 3);
    assert!(err(&o).contains("unknown or revoked token"));
    // Clap usage error: 2.
    let o = run(
        &api.url,
        READ,
        &["user", "add", "a@mpt.gov.la", "--kind", "boss"],
    )
    .await;
    assert_eq!(code(&o), 2);
    // Clear-text HTTP to a non-loopback host is refused before connecting: 2.
    let o = run("http://192.0.2.1:8026", READ, &["org", "list"]).await;
    assert_eq!(code(&o), 2);
    assert!(err(&o).contains("clear text"), "{}", err(&o));
    api.stop().await;

    // Nobody listening: 3.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let o = run(&dead, READ, &["org", "list"]).await;
    assert_eq!(code(&o), 3);
    assert!(
        err(&o).contains("cannot reach the admin API"),
        "{}",
        err(&o)
    );

    let o = tokio::process::Command::new(BIN)
        .args(["org", "--help"])
        .output()
        .await
        .unwrap();
    assert!(out(&o).contains("Exit codes:"), "{}", out(&o));
}

#[tokio::test]
async fn url_is_derived_from_the_config_and_token_read_from_a_file() {
    let api = Api::start().await;
    api.mpt().await;
    let port = api.url.rsplit(':').next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mailwarden.toml");
    // 0.0.0.0 means "this host": the CLI talks to loopback.
    std::fs::write(&cfg, format!("[admin]\nlisten = \"inet:0.0.0.0:{port}\"\n")).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{READ}\n")).unwrap();
    let o = tokio::process::Command::new(BIN)
        .args(["org", "list", "--config", cfg.to_str().unwrap()])
        .args(["--token-file", token.to_str().unwrap()])
        .env_remove("MAILWARDEN_URL")
        .env_remove("MAILWARDEN_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("mpt.gov.la"));
    api.stop().await;
}

#[tokio::test]
async fn talks_https_with_a_private_ca() {
    let api = Api::start_tls().await;
    api.mpt().await;
    let ca = api.dir.path().join("cert.pem");
    let o = run(
        &api.url,
        READ,
        &["org", "show", "mpt", "--ca-cert", ca.to_str().unwrap()],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("mpt.gov.la"));
    // Without the CA the certificate is not trusted: cannot reach (3).
    let o = run(&api.url, READ, &["org", "show", "mpt"]).await;
    assert_eq!(code(&o), 3, "{}", err(&o));
    api.stop().await;
}

#[tokio::test]
async fn cli_drives_a_running_daemon_and_the_mail_path_sees_the_change() {
    use mailwarden::daemon::{Control, Daemon};
    use mailwarden::model::{Action, Address, Protocol, Transaction};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.store.url = format!("sqlite:{}", dir.path().join("mailwarden.db").display());
    cfg.server.milter_listen = "inet:127.0.0.1:0".into();
    cfg.server.policy_listen = "inet:127.0.0.1:0".into();
    cfg.admin.listen = "inet:127.0.0.1:0".into();
    let daemon = Daemon::start(cfg, None).await.unwrap();
    let admin = daemon.bound().admin.clone().unwrap();
    let url = format!("http://{}", admin.strip_prefix("inet:").unwrap());
    let checker = daemon.checker.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let serving = tokio::spawn(daemon.serve(rx));

    for args in [
        &["org", "add", "mpt", "--name", "MPT"][..],
        &["user", "add", "dg-cabinet@mpt.gov.la", "--kind", "position"][..],
        &[
            "user",
            "suspend",
            "dg-cabinet@mpt.gov.la",
            "--reason",
            "audit",
        ][..],
    ] {
        let o = run(&url, WRITE, args).await;
        assert_eq!(code(&o), 0, "{args:?}: {}", err(&o));
    }
    let rcpt = Address::parse("dg-cabinet@mpt.gov.la").unwrap();
    let d = checker
        .check_rcpt(&Transaction::new(Protocol::Policy), &rcpt)
        .await;
    assert!(matches!(d.action, Action::Reject(_)), "{d:?}");

    tx.send(Control::Shutdown).await.unwrap();
    serving.await.unwrap().unwrap();
}

#[tokio::test]
async fn org_relays_lists_adds_and_removes() {
    let api = Api::start().await;
    let u = api.url.as_str();
    let o = run(
        u,
        WRITE,
        &["org", "add", "mpt", "--name", "Ministry of Posts"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));

    let o = run(u, READ, &["org", "relays", "mpt"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("no relay networks declared"),
        "{}",
        out(&o)
    );

    let o = run(
        u,
        WRITE,
        &[
            "org",
            "relays",
            "mpt",
            "--add",
            "203.0.113.0/24",
            "--add",
            "2001:db8::/48",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(out(&o), "203.0.113.0/24\n2001:db8::/48\n");

    let o = run(
        u,
        WRITE,
        &["org", "relays", "mpt", "--remove", "203.0.113.0/24"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(out(&o), "2001:db8::/48\n");
    let o = run(u, READ, &["org", "relays", "mpt"]).await;
    assert_eq!(out(&o), "2001:db8::/48\n");
    let o = run(u, READ, &["org", "show", "mpt"]).await;
    assert!(out(&o).contains("relay_networks"), "{}", out(&o));

    // A bad network: a usage error naming it; nothing changed.
    let o = run(u, WRITE, &["org", "relays", "mpt", "--add", "not-a-net"]).await;
    assert_eq!(code(&o), 1, "{}", err(&o));
    assert!(err(&o).contains("not-a-net"), "{}", err(&o));
    // Read scope cannot change them.
    let o = run(u, READ, &["org", "relays", "mpt", "--add", "10.0.0.0/8"]).await;
    assert_ne!(code(&o), 0);
    let o = run(u, READ, &["org", "relays", "mpt"]).await;
    assert_eq!(out(&o), "2001:db8::/48\n");
    api.stop().await;
}

/// One message from `login` (SASL) to two outside recipients, through the mail path.
async fn send_two(api: &Api, login: &str) {
    use mailwarden::model::{Address, Protocol, Transaction};
    let mut tx = Transaction::new(Protocol::Policy);
    tx.sasl_username = Some(login.into());
    for (i, to) in ["a@example.org", "b@example.org"].iter().enumerate() {
        tx.rcpts_accepted = i;
        let d = api
            .checker
            .check_rcpt(&tx, &Address::parse(to).unwrap())
            .await;
        assert_eq!(d.action, mailwarden::model::Action::Continue);
    }
}

/// The cells of the row of the `limits` table that starts with `name`.
fn limits_row(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} row in:\n{text}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `org limits CODE`: the organisation's counters (all its accounts together) with the
/// per-organisation limits in force.
#[tokio::test]
async fn org_limits_show_the_organisation_s_counters() {
    let api = Api::start_with(|c, _| {
        c.rules.insert(
            "R14".into(),
            mailwarden::config::RuleTable {
                org_messages_per_hour: Some(5),
                ..Default::default()
            },
        );
    })
    .await;
    let u = api.url.as_str();
    api.mpt().await;
    for who in ["champa@mpt.gov.la", "bounmy@mpt.gov.la"] {
        let o = run(u, WRITE, &["user", "add", who, "--kind", "person"]).await;
        assert_eq!(code(&o), 0, "{}", err(&o));
        send_two(&api, who).await;
    }
    let o = run(u, READ, &["org", "limits", "mpt"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let text = out(&o);
    assert!(text.starts_with("org"), "{text}");
    let row = |name: &str| limits_row(&text, name);
    assert_eq!(row("messages:hour")[1..3], ["2", "5"], "{text}");
    // Only counters with a limit are kept per organisation (no cost for the others).
    assert_eq!(row("recipients:hour")[1..3], ["0", "0"], "{text}");
    let o = run(u, READ, &["org", "limits", "mpt", "--json"]).await;
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["org"], "mpt", "{v}");
    assert_eq!(v["counters"][0]["count"], 2, "{v}");
    let o = run(u, READ, &["org", "limits", "nope"]).await;
    assert_ne!(code(&o), 0);
    assert!(err(&o).contains("nope"), "{}", err(&o));
    api.stop().await;
}

#[tokio::test]
async fn user_permit_and_limits() {
    let api = Api::start().await;
    let u = api.url.as_str();
    api.mpt().await;
    let o = run(
        u,
        WRITE,
        &["user", "add", "champa@mpt.gov.la", "--kind", "person"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    // One message with two recipients through the mail path.
    send_two(&api, "champa@mpt.gov.la").await;

    let o = run(u, READ, &["user", "limits", "champa@mpt.gov.la"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let text = out(&o);
    let row = |name: &str| limits_row(&text, name);
    assert_eq!(row("messages:hour")[1..3], ["1", "100"], "{text}");
    assert_eq!(row("recipients:day")[1..3], ["2", "1000"], "{text}");

    let o = run(
        u,
        WRITE,
        &["user", "limits", "champa@mpt.gov.la", "--reset"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let o = run(u, READ, &["user", "limits", "champa@mpt.gov.la", "--json"]).await;
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert!(
        v["counters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["count"] == 0),
        "{v}"
    );

    // Neither or both of --bulk/--no-bulk is a usage error; granting needs admin.
    let o = run(u, ADMIN, &["user", "permit", "champa@mpt.gov.la"]).await;
    assert_eq!(code(&o), 2, "{}", err(&o));
    let o = run(u, WRITE, &["user", "permit", "champa@mpt.gov.la", "--bulk"]).await;
    assert_ne!(code(&o), 0);
    let o = run(u, ADMIN, &["user", "permit", "champa@mpt.gov.la", "--bulk"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("bulk") && out(&o).contains("true"),
        "{}",
        out(&o)
    );
    let o = run(
        u,
        ADMIN,
        &["user", "permit", "champa@mpt.gov.la", "--no-bulk"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("false"), "{}", out(&o));
    // R13: the quota in bytes, or none.
    let o = run(u, WRITE, &["user", "quota", "champa@mpt.gov.la", "1048576"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("1048576"), "{}", out(&o));
    let o = run(u, WRITE, &["user", "quota", "champa@mpt.gov.la", "lots"]).await;
    assert_eq!(code(&o), 2, "{}", err(&o));
    let o = run(u, WRITE, &["user", "quota", "champa@mpt.gov.la", "none"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(!out(&o).contains("quota_bytes"), "{}", out(&o));
    let actions: Vec<String> = api
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions[2..],
        [
            "user.limits_reset",
            "user.permit",
            "user.permit",
            "user.quota",
            "user.quota"
        ]
    );
    api.stop().await;
}

#[tokio::test]
async fn user_delegate_undelegate_and_show() {
    let api = Api::start().await;
    let u = api.url.as_str();
    api.mpt().await;
    for (a, kind) in [
        ("cabinet@mpt.gov.la", "unit"),
        ("champa@mpt.gov.la", "person"),
    ] {
        let o = run(u, WRITE, &["user", "add", a, "--kind", kind]).await;
        assert_eq!(code(&o), 0, "{}", err(&o));
    }
    let o = run(
        u,
        WRITE,
        &[
            "user",
            "delegate",
            "cabinet@mpt.gov.la",
            "--to",
            "champa@mpt.gov.la",
            "--reason",
            "secretary",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(
        out(&o),
        "cabinet@mpt.gov.la: changed; may be sent as by: champa@mpt.gov.la\n"
    );
    let o = run(u, READ, &["user", "show", "cabinet@mpt.gov.la"]).await;
    let row = out(&o)
        .lines()
        .find(|l| l.starts_with("delegates"))
        .map(str::to_owned);
    assert_eq!(
        row.as_deref()
            .map(|r| r.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["delegates", "champa@mpt.gov.la"]),
        "{}",
        out(&o)
    );
    let o = run(u, READ, &["user", "show", "champa@mpt.gov.la"]).await;
    assert!(
        out(&o)
            .lines()
            .any(|l| l.starts_with("may_send_as") && l.ends_with("cabinet@mpt.gov.la")),
        "{}",
        out(&o)
    );
    // --to is required; a delegate that is not registered is a clear error.
    let o = run(u, WRITE, &["user", "delegate", "cabinet@mpt.gov.la"]).await;
    assert_eq!(code(&o), 2, "{}", err(&o));
    let o = run(
        u,
        WRITE,
        &[
            "user",
            "delegate",
            "cabinet@mpt.gov.la",
            "--to",
            "nobody@mpt.gov.la",
        ],
    )
    .await;
    assert_ne!(code(&o), 0);
    assert!(
        err(&o).contains("nobody@mpt.gov.la is not registered"),
        "{}",
        err(&o)
    );

    let o = run(
        u,
        WRITE,
        &[
            "user",
            "undelegate",
            "cabinet@mpt.gov.la",
            "--from",
            "champa@mpt.gov.la",
        ],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert_eq!(
        out(&o),
        "cabinet@mpt.gov.la: changed; may be sent as by: (nobody else)\n"
    );
    let o = run(
        u,
        WRITE,
        &[
            "user",
            "undelegate",
            "cabinet@mpt.gov.la",
            "--from",
            "champa@mpt.gov.la",
        ],
    )
    .await;
    assert_ne!(code(&o), 0);
    assert!(err(&o).contains("is not a delegate of"), "{}", err(&o));
    let actions: Vec<String> = api
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .filter(|a| a.contains("delegate"))
        .collect();
    assert_eq!(actions, ["user.delegate", "user.undelegate"]);
    api.stop().await;
}

#[tokio::test]
async fn org_quota_sets_shows_and_removes_the_default() {
    let api = Api::start().await;
    let u = api.url.as_str();
    let o = run(
        u,
        WRITE,
        &["org", "add", "mpt", "--name", "Ministry of Posts"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let o = run(u, WRITE, &["org", "quota", "mpt", "5368709120"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(
        out(&o).contains("default_quota_bytes") && out(&o).contains("5368709120"),
        "{}",
        out(&o)
    );
    let o = run(u, READ, &["org", "show", "mpt"]).await;
    assert!(out(&o).contains("5368709120"), "{}", out(&o));
    let o = run(u, WRITE, &["org", "quota", "mpt", "lots"]).await;
    assert_eq!(code(&o), 2, "{}", err(&o));
    let o = run(u, READ, &["org", "quota", "mpt", "1"]).await;
    assert_ne!(code(&o), 0, "read scope cannot change it");
    let o = run(u, WRITE, &["org", "quota", "mpt", "none"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(!out(&o).contains("default_quota_bytes"), "{}", out(&o));
    let actions: Vec<String> = api
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["org.create", "org.quota", "org.quota"]);
    api.stop().await;
}

/// R15 and R20 commands: `user lock` / `unlock` / `show`, `user list --inactive-for`.
#[tokio::test]
async fn user_lock_unlock_and_inactive_list() {
    let api = Api::start().await;
    let u = api.url.as_str();
    api.mpt().await;
    let o = run(
        u,
        WRITE,
        &["user", "add", "champa@mpt.gov.la", "--kind", "person"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));

    let o = run(u, WRITE, &["user", "lock", "champa@mpt.gov.la"]).await;
    assert_eq!(code(&o), 2, "--reason is required: {}", err(&o));
    let o = run(
        u,
        WRITE,
        &["user", "lock", "champa@mpt.gov.la", "--reason", "phished"],
    )
    .await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let o = run(u, READ, &["user", "show", "champa@mpt.gov.la"]).await;
    let shown = out(&o);
    let lock = shown
        .lines()
        .find(|l| l.starts_with("send_lock "))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        lock.contains("LOCKED since") && lock.contains("by registrar") && lock.contains("phished"),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("last_use ") && l.ends_with("never")),
        "{shown}"
    );
    let o = run(u, WRITE, &["user", "unlock", "champa@mpt.gov.la"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    let o = run(u, WRITE, &["user", "unlock", "champa@mpt.gov.la"]).await;
    assert_ne!(code(&o), 0);
    assert!(err(&o).contains("not locked"), "{}", err(&o));

    // Registered just now: not inactive for a year.
    let o = run(u, READ, &["user", "list", "--inactive-for", "365d"]).await;
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(out(&o).contains("no inactive accounts"), "{}", out(&o));
    // An account registered two years ago and never used.
    {
        use mailwarden::store::{Account, AccountKind, AccountStatus, Store};
        let then = chrono::Utc::now().timestamp() - 2 * 366 * 86_400;
        let old = Account {
            address: mailwarden::model::Address::parse("old@mpt.gov.la").unwrap(),
            org: "mpt".into(),
            kind: AccountKind::Unit,
            status: AccountStatus::Active,
            status_reason: None,
            display_name: None,
            created_at: then,
            status_changed_at: then,
            quota_bytes: None,
            bulk: false,
        };
        api.store.create_account(&old).await.unwrap();
    }
    let o = run(u, READ, &["user", "list", "--inactive-for", "365d"]).await;
    let listed = out(&o);
    assert!(
        listed.contains("LAST_USE")
            && listed.contains("old@mpt.gov.la  active  never")
            && !listed.contains("champa@"),
        "{listed}"
    );
    let o = run(u, READ, &["user", "list", "--inactive-for", "a while"]).await;
    assert_ne!(code(&o), 0);
    assert!(err(&o).contains("inactive_for"), "{}", err(&o));
    api.stop().await;
}
