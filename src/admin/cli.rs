//! `mailwarden org …` and `mailwarden user …`: the CLI client of the admin API.
//!
//! Output is a human-readable table or record by default, the API's JSON with `--json`.
//! Exit codes are in [`EXIT_CODES`] (shown by `--help`).

use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// Exit codes of the `org` and `user` commands.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  refused by the server (invalid input, name taken, not found, wrong state)
  2  usage error (bad arguments, missing --yes, unreadable file)
  3  cannot reach the daemon, authentication/authorisation failed, or server error";

pub const EXIT_OK: i32 = 0;
pub const EXIT_REFUSED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;

/// How the CLI reaches the daemon's admin API.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Admin API base URL, e.g. https://mail1.mpt.gov.la:8026 [default: derived from the
    /// config file's admin.listen and admin.tls_cert]. Plain http:// only to loopback.
    #[arg(long, env = "MAILWARDEN_URL", global = true)]
    pub url: Option<String>,
    /// Config file to derive the URL from when --url is not given.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/mailwarden/mailwarden.toml"
    )]
    pub config: PathBuf,
    /// Bearer token. Prefer MAILWARDEN_TOKEN or --token-file: a command line is visible to
    /// other users of the machine.
    #[arg(long, env = "MAILWARDEN_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File whose first line is the bearer token (takes precedence over --token).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the admin API's certificate (default: system roots).
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print the API's JSON answers instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum OrgCommand {
    /// Register an organisation (R3: code of 1–5 letters; domain CODE.gov.la by default).
    #[command(after_help = EXIT_CODES)]
    Add {
        /// Organisation code, the third-level domain label: `mpt`.
        code: String,
        /// Full name: "Ministry of Posts and Telecommunications".
        #[arg(long)]
        name: String,
        /// Mail domain, when it is not CODE.<directory.base_domain>.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Show one organisation.
    #[command(after_help = EXIT_CODES)]
    Show { code: String },
    /// List organisations.
    #[command(after_help = EXIT_CODES)]
    List,
    /// Cease an organisation: no mail to or from any of its accounts (R2). Final.
    #[command(after_help = EXIT_CODES)]
    Cease {
        code: String,
        /// Why (written to the audit log).
        #[arg(long)]
        reason: String,
        /// Confirm: ceasing cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Authorised relay networks (R10): without --add/--remove, list them. Mail of the
    /// organisation's domain from an unauthenticated client outside them is refused once at
    /// least one is declared.
    #[command(after_help = EXIT_CODES)]
    Relays {
        code: String,
        /// Network to add, in CIDR notation (203.0.113.0/24); repeatable.
        #[arg(long, value_name = "CIDR")]
        add: Vec<String>,
        /// Network to remove; repeatable.
        #[arg(long, value_name = "CIDR")]
        remove: Vec<String>,
        /// Why (written to the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show the organisation's sending counters (R14's per-organisation limits: all its
    /// accounts together) in the current hour and day, with the limits in force. Only
    /// counters with a limit are kept (the others show 0).
    #[command(after_help = EXIT_CODES)]
    Limits { code: String },
    /// Set the organisation's default storage quota in bytes (R13), or `none` to remove
    /// it: the quota of its accounts that have none of their own.
    #[command(after_help = EXIT_CODES)]
    Quota {
        code: String,
        /// Bytes (e.g. 5368709120 for 5 GiB), or `none`.
        bytes: String,
        /// Why (written to the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Register an account (R3 name rules, R4 first come first served, R5 kind).
    #[command(after_help = EXIT_CODES)]
    Add {
        /// The address: `champa@mpt.gov.la`.
        address: String,
        /// Account kind (R5, Art. 9.2).
        #[arg(long, value_parser = ["unit", "position", "person"])]
        kind: String,
        /// Holder's name, for reports.
        #[arg(long)]
        name: Option<String>,
        /// Initial status [default: active]; a pending account may not send (R9).
        #[arg(long, value_parser = ["pending", "active"])]
        status: Option<String>,
    },
    /// Show one account.
    #[command(after_help = EXIT_CODES)]
    Show { address: String },
    /// List accounts.
    #[command(after_help = EXIT_CODES)]
    List {
        /// Only accounts of this organisation code.
        #[arg(long)]
        org: Option<String>,
        /// Only accounts with this status.
        #[arg(long, value_parser = ["pending", "active", "suspended", "withdrawn"])]
        status: Option<String>,
        /// Only accounts not used for this long (R20): last authenticated use, or creation
        /// if never used, older than e.g. `365d`; shows the last use. Withdrawn accounts are
        /// left out.
        #[arg(long, value_name = "DURATION")]
        inactive_for: Option<String>,
    },
    /// Suspend an account: it receives no mail until restored (R1).
    #[command(after_help = EXIT_CODES)]
    Suspend {
        address: String,
        #[arg(long)]
        reason: String,
    },
    /// Restore a suspended account to active (a withdrawn account cannot be restored).
    #[command(after_help = EXIT_CODES)]
    Restore {
        address: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Activate a pending account so that it may send (R9).
    #[command(after_help = EXIT_CODES)]
    Activate {
        address: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Withdraw an account: no mail to or from it, and the name stays taken (R2). Final.
    #[command(after_help = EXIT_CODES)]
    Withdraw {
        address: String,
        #[arg(long)]
        reason: String,
        /// Confirm: withdrawal cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Register many accounts from a CSV file with the header `address,kind,name,status`
    /// (name and status may be empty). All or nothing: any bad row (reported by line
    /// number) means nothing is imported.
    #[command(after_help = EXIT_CODES)]
    Import { file: PathBuf },
    /// Grant (`--bulk`) or withdraw (`--no-bulk`) the bulk permission: an account holding
    /// it is exempt from sending limits (R14, Art. 20.3/20.5). Needs an admin token.
    #[command(after_help = EXIT_CODES)]
    Permit {
        address: String,
        #[arg(long, conflicts_with = "no_bulk", required_unless_present = "no_bulk")]
        bulk: bool,
        #[arg(long)]
        no_bulk: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Set an account's storage quota in bytes, or `none` to remove it (R13).
    #[command(after_help = EXIT_CODES)]
    Quota {
        address: String,
        /// Bytes (e.g. 10737418240 for 10 GiB), or `none`.
        bytes: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let another account send as this mailbox (R8, Art. 20.4/20.7): e.g. the role
    /// mailbox `cabinet@mpt.gov.la` delegated to `champa@mpt.gov.la`, who may then use it as
    /// envelope sender, `From:` and `Sender:`. Audited.
    #[command(after_help = EXIT_CODES)]
    Delegate {
        /// The mailbox to be sent as: `cabinet@mpt.gov.la`.
        mailbox: String,
        /// The account that may send as it: `champa@mpt.gov.la`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a delegation made with `user delegate`. Audited.
    #[command(after_help = EXIT_CODES)]
    Undelegate {
        /// The mailbox: `cabinet@mpt.gov.la`.
        mailbox: String,
        /// The account that may no longer send as it.
        #[arg(long)]
        from: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lock an account for sending (R15): its mail is refused with 450 4.7.1 until
    /// `unlock`. Accounts are also locked automatically on a sending burst or many refused
    /// recipients; `show` gives the reason.
    #[command(after_help = EXIT_CODES)]
    Lock {
        address: String,
        /// Why (audit log; shown by `user show`).
        #[arg(long)]
        reason: String,
    },
    /// Release an account's sending lock (R15), automatic or by hand. Audited.
    #[command(after_help = EXIT_CODES)]
    Unlock {
        address: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show an account's sending counters (R14) in the current hour and day, with the
    /// limits in force; `--reset` sets them back to 0 (audited).
    #[command(after_help = EXIT_CODES)]
    Limits {
        address: String,
        #[arg(long)]
        reset: bool,
        /// Why the counters are reset (audit log).
        #[arg(long, requires = "reset")]
        reason: Option<String>,
    },
}

/// A failed command: what to print and the exit code.
#[derive(Debug)]
struct Fail {
    code: i32,
    message: String,
    /// The server's error body, when there was one.
    body: Option<Value>,
}

impl Fail {
    fn new(code: i32, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
            body: None,
        }
    }
}

/// Runs an `org` subcommand; returns the process exit code.
pub async fn org(client: &ClientArgs, cmd: OrgCommand) -> i32 {
    let res = async {
        let api = Api::new(client)?;
        match cmd {
            OrgCommand::Add { code, name, domain } => {
                let body = json!({ "code": code, "name": name, "domain": domain });
                let v = api.call(Method::POST, &["v1", "orgs"], Some(body)).await?;
                Ok((v, Shape::Org))
            }
            OrgCommand::Show { code } => {
                let v = api.call(Method::GET, &["v1", "orgs", &code], None).await?;
                Ok((v, Shape::Org))
            }
            OrgCommand::List => {
                let v = api.call(Method::GET, &["v1", "orgs"], None).await?;
                Ok((v, Shape::Orgs))
            }
            OrgCommand::Limits { code } => {
                let path = ["v1", "orgs", &code, "limits"];
                let v = api.call(Method::GET, &path, None).await?;
                Ok((v, Shape::Limits))
            }
            OrgCommand::Cease { code, reason, yes } => {
                if !yes {
                    return Err(Fail::new(
                        EXIT_USAGE,
                        format!("ceasing organisation {code} is final: add --yes to confirm"),
                    ));
                }
                let body = json!({ "reason": reason, "confirm": code });
                let v = api
                    .call(Method::POST, &["v1", "orgs", &code, "cease"], Some(body))
                    .await?;
                Ok((v, Shape::Org))
            }
            OrgCommand::Relays {
                code,
                add,
                remove,
                reason,
            } => {
                let v = if add.is_empty() && remove.is_empty() {
                    api.call(Method::GET, &["v1", "orgs", &code], None).await?
                } else {
                    let body = json!({ "add": add, "remove": remove, "reason": reason });
                    api.call(Method::POST, &["v1", "orgs", &code, "relays"], Some(body))
                        .await?
                };
                Ok((v, Shape::Relays))
            }
            OrgCommand::Quota {
                code,
                bytes,
                reason,
            } => {
                let body = json!({ "bytes": quota_bytes(&bytes)?, "reason": reason });
                let v = api
                    .call(Method::POST, &["v1", "orgs", &code, "quota"], Some(body))
                    .await?;
                Ok((v, Shape::Org))
            }
        }
    }
    .await;
    finish(client.json, res)
}

/// A quota argument: a number of bytes, or `none`.
fn quota_bytes(arg: &str) -> Result<Option<u64>, Fail> {
    match arg {
        "none" => Ok(None),
        b => b.parse().map(Some).map_err(|_| {
            Fail::new(
                EXIT_USAGE,
                format!("{b:?} is not a number of bytes (or none)"),
            )
        }),
    }
}

/// Runs a `user` subcommand; returns the process exit code.
pub async fn user(client: &ClientArgs, cmd: UserCommand) -> i32 {
    let res = async {
        // Read the import file before anything else: a usage error should not need the daemon.
        let rows = match &cmd {
            UserCommand::Import { file } => Some(read_csv(file)?),
            _ => None,
        };
        let api = Api::new(client)?;
        let change = |address: &str, action: &str, body: Value| {
            let path = ["v1", "users", address, action].map(str::to_owned);
            let api = &api;
            async move {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                api.call(Method::POST, &path, Some(body)).await
            }
        };
        match cmd {
            UserCommand::Add {
                address,
                kind,
                name,
                status,
            } => {
                let body =
                    json!({ "address": address, "kind": kind, "name": name, "status": status });
                let v = api.call(Method::POST, &["v1", "users"], Some(body)).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Show { address } => {
                let v = api
                    .call(Method::GET, &["v1", "users", &address], None)
                    .await?;
                Ok((v, Shape::User))
            }
            UserCommand::List {
                org,
                status,
                inactive_for,
            } => {
                let path = ["v1", "users"];
                let mut query = Vec::new();
                if let Some(o) = &org {
                    query.push(("org", o.as_str()));
                }
                if let Some(s) = &status {
                    query.push(("status", s.as_str()));
                }
                if let Some(d) = &inactive_for {
                    query.push(("inactive_for", d.as_str()));
                }
                let v = api.call_query(Method::GET, &path, &query, None).await?;
                let shape = if inactive_for.is_some() {
                    Shape::Inactive
                } else {
                    Shape::Users
                };
                Ok((v, shape))
            }
            UserCommand::Lock { address, reason } => {
                let v = change(&address, "lock", json!({ "reason": reason })).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Unlock { address, reason } => {
                let v = change(&address, "unlock", json!({ "reason": reason })).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Suspend { address, reason } => {
                let v = change(&address, "suspend", json!({ "reason": reason })).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Restore { address, reason } => {
                let v = change(&address, "restore", json!({ "reason": reason })).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Activate { address, reason } => {
                let v = change(&address, "activate", json!({ "reason": reason })).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Withdraw {
                address,
                reason,
                yes,
            } => {
                if !yes {
                    return Err(Fail::new(
                        EXIT_USAGE,
                        format!("withdrawing {address} is final: add --yes to confirm"),
                    ));
                }
                let body = json!({ "reason": reason, "confirm": address });
                let v = change(&address, "withdraw", body).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Quota {
                address,
                bytes,
                reason,
            } => {
                let body = json!({ "bytes": quota_bytes(&bytes)?, "reason": reason });
                let v = change(&address, "quota", body).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Permit {
                address,
                bulk,
                no_bulk: _,
                reason,
            } => {
                let body = json!({ "bulk": bulk, "reason": reason });
                let v = change(&address, "permissions", body).await?;
                Ok((v, Shape::User))
            }
            UserCommand::Limits {
                address,
                reset: false,
                ..
            } => {
                let v = api
                    .call(Method::GET, &["v1", "users", &address, "limits"], None)
                    .await?;
                Ok((v, Shape::Limits))
            }
            UserCommand::Limits {
                address, reason, ..
            } => {
                let body = json!({ "reason": reason });
                let path = ["v1", "users", &address, "limits", "reset"];
                let v = api.call(Method::POST, &path, Some(body)).await?;
                Ok((v, Shape::Limits))
            }
            UserCommand::Delegate {
                mailbox,
                to,
                reason,
            } => {
                let body = json!({ "delegate": to, "reason": reason });
                let v = change(&mailbox, "delegates", body).await?;
                Ok((v, Shape::Delegation))
            }
            UserCommand::Undelegate {
                mailbox,
                from,
                reason,
            } => {
                let body = json!({ "delegate": from, "reason": reason });
                let path = ["v1", "users", &mailbox, "delegates", "remove"];
                let v = api.call(Method::POST, &path, Some(body)).await?;
                Ok((v, Shape::Delegation))
            }
            UserCommand::Import { .. } => {
                let body = json!({ "rows": rows.unwrap_or_default() });
                let v = api
                    .call(Method::POST, &["v1", "users", "import"], Some(body))
                    .await?;
                Ok((v, Shape::Imported))
            }
        }
    }
    .await;
    finish(client.json, res)
}

/// What a successful answer holds, for the human-readable output.
enum Shape {
    Org,
    Orgs,
    User,
    Users,
    Imported,
    /// An organisation's relay networks, one per line.
    Relays,
    Limits,
    /// A mailbox's delegates after a change (R8).
    Delegation,
    /// Accounts with their last use (R20).
    Inactive,
}

fn finish(json_out: bool, res: Result<(Value, Shape), Fail>) -> i32 {
    match res {
        Ok((v, shape)) => {
            if json_out {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", render(&v, &shape));
            }
            EXIT_OK
        }
        Err(f) => {
            match (&f.body, json_out) {
                (Some(b), true) => {
                    println!("{}", serde_json::to_string_pretty(b).unwrap_or_default())
                }
                _ => eprint!("{}", render_error(&f)),
            }
            f.code
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(" "),
        Some(other) => other.to_string(),
    }
}

const ORG_FIELDS: [&str; 9] = [
    "code",
    "name",
    "domain",
    "status",
    "status_reason",
    "created_at",
    "status_changed_at",
    "relay_networks",
    "default_quota_bytes",
];
const USER_FIELDS: [&str; 14] = [
    "address",
    "org",
    "kind",
    "status",
    "status_reason",
    "name",
    "created_at",
    "status_changed_at",
    "quota_bytes",
    "effective_quota_bytes",
    "usage_bytes",
    "bulk",
    // R8, shown by `user show` when there are any.
    "delegates",
    "may_send_as",
];

fn render(v: &Value, shape: &Shape) -> String {
    match shape {
        Shape::Org => record(v, &ORG_FIELDS),
        Shape::User => {
            let mut out = record(v, &USER_FIELDS);
            // R15 and R20, present in `show` (and after lock/unlock).
            if let Some(lock) = v.get("send_lock") {
                let line = if lock.is_null() {
                    "no".to_owned()
                } else {
                    format!(
                        "LOCKED since {} by {}: {}",
                        s(lock, "locked_at"),
                        s(lock, "by"),
                        s(lock, "reason")
                    )
                };
                out.push_str(&format!("{:<17}  {line}\n", "send_lock"));
            }
            if v.get("last_use").is_some() {
                let used = s(v, "last_use");
                let used = if used.is_empty() {
                    "never".into()
                } else {
                    used
                };
                out.push_str(&format!("{:<17}  {used}\n", "last_use"));
            }
            out
        }
        Shape::Inactive => {
            let mut users = v.get("users").cloned().unwrap_or(Value::Null);
            for u in users.as_array_mut().into_iter().flatten() {
                if u["last_use"].is_null() {
                    u["last_use"] = Value::from("never");
                }
            }
            table(
                Some(&users),
                &["address", "status", "last_use", "created_at", "name"],
                "no inactive accounts",
            )
        }
        Shape::Orgs => table(
            v.get("orgs"),
            &["code", "domain", "status", "name"],
            "no organisations",
        ),
        Shape::Users => table(
            v.get("users"),
            &["address", "kind", "status", "name"],
            "no accounts",
        ),
        Shape::Imported => format!("imported {} account(s)\n", s(v, "imported")),
        Shape::Relays => {
            let nets = s(v, "relay_networks");
            if nets.is_empty() {
                format!(
                    "(no relay networks declared: R10 does not check mail of {})\n",
                    s(v, "domain")
                )
            } else {
                nets.split(' ').map(|n| format!("{n}\n")).collect()
            }
        }
        Shape::Delegation => {
            let verb = match v.get("changed") {
                Some(Value::Bool(false)) => "unchanged",
                _ => "changed",
            };
            let delegates = s(v, "delegates");
            format!(
                "{}: {verb}; may be sent as by: {}\n",
                s(v, "address"),
                if delegates.is_empty() {
                    "(nobody else)".to_owned()
                } else {
                    delegates
                }
            )
        }
        Shape::Limits => {
            let mut out = record(v, &["org", "address", "bulk", "recipients_per_message"]);
            out.push_str(&table(
                v.get("counters"),
                &["counter", "count", "limit", "window_end"],
                "no counters",
            ));
            out
        }
    }
}

fn record(v: &Value, fields: &[&str]) -> String {
    let width = fields.iter().map(|f| f.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in fields {
        let val = s(v, f);
        if !val.is_empty() {
            out.push_str(&format!("{f:<width$}  {val}\n"));
        }
    }
    out
}

fn table(rows: Option<&Value>, cols: &[&str], empty: &str) -> String {
    let rows: Vec<&Value> = rows
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if rows.is_empty() {
        return format!("({empty})\n");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| s(r, c)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        let mut l = String::new();
        for (i, v) in vals.iter().enumerate() {
            if i + 1 == vals.len() {
                l.push_str(v);
            } else {
                let pad = widths[i] - v.chars().count();
                l.push_str(v);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(cols.iter().map(|c| c.to_uppercase()).collect());
    for r in cells {
        out.push_str(&line(r));
    }
    out
}

fn render_error(f: &Fail) -> String {
    let mut out = format!("mailwarden: {}\n", f.message);
    if let Some(b) = &f.body {
        if let Some(sug) = b.get("suggestions").and_then(Value::as_array) {
            let list: Vec<&str> = sug.iter().filter_map(Value::as_str).collect();
            if list.is_empty() {
                out.push_str("  no free alternative found\n");
            } else {
                out.push_str(&format!("  free alternatives: {}\n", list.join(", ")));
            }
        }
        if let Some(rows) = b.get("rows").and_then(Value::as_array) {
            for r in rows {
                out.push_str(&format!("  line {}: {}\n", s(r, "line"), s(r, "error")));
            }
        }
    }
    out
}

/// Reads the import CSV: header `address,kind,name,status` (name and status optional
/// columns), rows sent with their line numbers.
fn read_csv(path: &Path) -> Result<Vec<Value>, Fail> {
    let text = std::fs::read(path)
        .map_err(|e| Fail::new(EXIT_USAGE, format!("cannot read {}: {e}", path.display())))?;
    let mut rdr = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_slice());
    let bad = |m: String| {
        Fail::new(
            EXIT_REFUSED,
            format!("{}: {m}; nothing imported", path.display()),
        )
    };
    let headers = rdr
        .headers()
        .map_err(|e| bad(format!("cannot read the header line: {e}")))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let (Some(address), Some(kind)) = (col("address"), col("kind")) else {
        return Err(bad(
            "the header line must name the columns address,kind,name,status".into(),
        ));
    };
    if let Some(h) = headers
        .iter()
        .find(|h| !["address", "kind", "name", "status"].contains(&h.to_ascii_lowercase().as_str()))
    {
        return Err(bad(format!(
            "unknown column {h:?}: the columns are address,kind,name,status"
        )));
    }
    let (name, status) = (col("name"), col("status"));
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| bad(e.to_string()))?;
        // `Position::line` does not count the blank lines the reader skipped.
        let line = rec
            .position()
            .map(|p| line_of(&text, p.byte()))
            .unwrap_or(0);
        if rec.iter().all(str::is_empty) {
            continue;
        }
        let get = |i: Option<usize>| i.and_then(|i| rec.get(i)).filter(|v| !v.is_empty());
        rows.push(json!({
            "line": line,
            "address": get(Some(address)).unwrap_or(""),
            "kind": get(Some(kind)).unwrap_or(""),
            "name": get(name),
            "status": get(status),
        }));
    }
    if rows.is_empty() {
        return Err(bad("no rows below the header line".into()));
    }
    Ok(rows)
}

/// 1-based line number of byte offset `at` in `text`.
/// The csv reader's record position points before any blank lines it skipped.
fn line_of(text: &[u8], at: u64) -> u64 {
    let mut at = (at as usize).min(text.len());
    while at < text.len() && matches!(text[at], b'\r' | b'\n') {
        at += 1;
    }
    text[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// A connection to the admin API.
struct Api {
    base: Url,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(args: &ClientArgs) -> Result<Api, Fail> {
        let base = match &args.url {
            Some(u) => Url::parse(u)
                .map_err(|e| Fail::new(EXIT_USAGE, format!("--url {u:?} is not a URL: {e}")))?,
            None => url_from_config(&args.config)?,
        };
        match base.scheme() {
            "https" => {}
            "http" if is_loopback(&base) => {}
            "http" => {
                return Err(Fail::new(
                    EXIT_USAGE,
                    format!(
                        "refusing to send the token in clear text to {}: use https:// (admin.tls_cert) or a loopback address",
                        base.host_str().unwrap_or("?")
                    ),
                ));
            }
            other => {
                return Err(Fail::new(
                    EXIT_USAGE,
                    format!("--url: scheme {other:?} is not http or https"),
                ));
            }
        }
        let token = match (&args.token_file, &args.token) {
            (Some(f), _) => std::fs::read_to_string(f)
                .map_err(|e| {
                    Fail::new(
                        EXIT_USAGE,
                        format!("cannot read --token-file {}: {e}", f.display()),
                    )
                })?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
            (None, Some(t)) => t.trim().to_owned(),
            (None, None) => String::new(),
        };
        if token.is_empty() {
            return Err(Fail::new(
                EXIT_USAGE,
                "no token: set MAILWARDEN_TOKEN, or give --token-file FILE",
            ));
        }
        let http = http_client(args.ca_cert.as_deref(), base.scheme() == "https")
            .map_err(|e| Fail::new(EXIT_USAGE, e))?;
        Ok(Api { base, token, http })
    }

    async fn call(
        &self,
        method: Method,
        path: &[&str],
        body: Option<Value>,
    ) -> Result<Value, Fail> {
        self.call_query(method, path, &[], body).await
    }

    async fn call_query(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, Fail> {
        let mut url = self.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| Fail::new(EXIT_USAGE, "--url cannot be a base URL"))?;
            segs.pop_if_empty();
            segs.extend(path);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self
            .http
            .request(method, url.clone())
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            Fail::new(
                EXIT_UNREACHABLE,
                format!("cannot reach the admin API at {}: {}", self.base, chain(&e)),
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            Fail::new(
                EXIT_UNREACHABLE,
                format!("connection to {} broke: {}", self.base, chain(&e)),
            )
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "error": text }));
        if status.is_success() {
            return Ok(v);
        }
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}"));
        let code = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => EXIT_UNREACHABLE,
            s if s.is_server_error() => EXIT_UNREACHABLE,
            _ => EXIT_REFUSED,
        };
        Err(Fail {
            code,
            message,
            body: Some(v),
        })
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The admin URL from the config file's `[admin]` table (`listen`, `tls_cert`). Only that
/// table is read, so the CLI works without read access to token files.
fn url_from_config(path: &Path) -> Result<Url, Fail> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Fail::new(
            EXIT_USAGE,
            format!(
                "no --url (or MAILWARDEN_URL) given and cannot read {} to find admin.listen: {e}",
                path.display()
            ),
        )
    })?;
    let doc: toml::Table = toml::from_str(&text)
        .map_err(|e| Fail::new(EXIT_USAGE, format!("{}: {e}", path.display())))?;
    let admin = doc.get("admin").and_then(|a| a.as_table());
    let listen = admin
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| crate::config::AdminConfig::default().listen);
    let tls = admin.is_some_and(|a| a.contains_key("tls_cert"));
    if listen.is_empty() {
        return Err(Fail::new(
            EXIT_USAGE,
            format!(
                "{}: admin.listen is empty: the admin API is off",
                path.display()
            ),
        ));
    }
    let addr: crate::config::ListenAddr = listen.parse().map_err(|e: String| {
        Fail::new(EXIT_USAGE, format!("{}: admin.listen: {e}", path.display()))
    })?;
    let crate::config::ListenAddr::Inet(sock) = addr else {
        return Err(Fail::new(
            EXIT_USAGE,
            format!(
                "{}: admin.listen is a Unix socket; give --url for a TCP address",
                path.display()
            ),
        ));
    };
    let ip = match sock.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let host = match ip {
        IpAddr::V4(v) => v.to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
    };
    let scheme = if tls { "https" } else { "http" };
    Url::parse(&format!("{scheme}://{host}:{}/", sock.port()))
        .map_err(|e| Fail::new(EXIT_USAGE, format!("admin.listen {listen:?}: {e}")))
}

/// An HTTP client whose TLS uses rustls with the aws-lc-rs provider, trusting `ca_cert`
/// (PEM) when given, else the system's roots (loaded only when `https` is needed).
pub fn http_client(ca_cert: Option<&Path>, https: bool) -> Result<reqwest::Client, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(p) => {
            let pem = std::fs::read(p)
                .map_err(|e| format!("cannot read --ca-cert {}: {e}", p.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--ca-cert {}: {e}", p.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--ca-cert {}: no PEM certificate found",
                    p.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("--ca-cert {}: {e}", p.display()))?;
            }
        }
        None if https => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
        None => {}
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {}", chain(&e)))
}
