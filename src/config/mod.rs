//! Configuration: the TOML file model, validation that reports every error by key, and the
//! immutable snapshot that reload swaps in.
//!
//! `Config::load` reads and validates; on success the caller gets a `Config` that is never
//! mutated again. A reload builds a new one and swaps it in only when it has no errors.

mod alerts;
mod dkim;
mod dns;
mod listen;

pub use alerts::AlertsConfig;
pub(crate) use dkim::is_internal as in_networks;
pub use dkim::{
    DEFAULT_OVERSIGN_HEADERS, DEFAULT_SIGN_HEADERS, DkimAlgorithm, DkimConfig, DkimKeyConfig,
};
pub use dns::{DnsConfig, NameServer};
pub use listen::ListenAddr;

use crate::model::{Mode, RuleId};
use ipnet::IpNet;
use serde::Deserialize;
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

/// Exit code for configuration errors (EX_CONFIG from sysexits.h is 78; the brief and
/// linkerd use EX_USAGE-style 64 for "your input is wrong").
pub const EXIT_CONFIG: i32 = 64;

/// One problem in the config file, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// All problems found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} error(s) in configuration",
            self.file.display(),
            self.errors.len()
        )?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The whole configuration. Field docs are the reference; `config/mailwarden.toml` repeats them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub directory: DirectoryConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// DKIM signing (R6): keys, signed headers, internal networks.
    pub dkim: DkimConfig,
    /// Owner alerts (R16): webhook and new-country login detection.
    pub alerts: AlertsConfig,
    /// The DNS resolver of inbound verification (R7) and `mailwarden dkim check`.
    pub dns: DnsConfig,
    /// Per-rule settings, keyed by rule id (`R1`, `R2`, `R6`, `R7`, `R8`, `R9`, `R10`, `R11`,
    /// `R13`, `R14`, `R15`).
    pub rules: BTreeMap<String, RuleTable>,
    /// Activity tracking (R20): how often last use is written, automatic withdrawal.
    pub activity: ActivityConfig,
}

/// `[activity]` (R20).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActivityConfig {
    /// An account's last authenticated use is written to the store at most once per this
    /// interval per daemon (so not once per message); `user list --inactive-for` is exact
    /// to within it.
    #[serde(with = "duration")]
    pub write_interval: Duration,
    /// Withdraw accounts (audited, reason given) whose last use, or creation if never used,
    /// is older than this. Unset (default): never withdraw automatically. At least 30 days.
    #[serde(with = "duration::option")]
    pub auto_withdraw_after: Option<Duration>,
    /// How often the automatic withdrawal looks for such accounts.
    #[serde(with = "duration")]
    pub check_interval: Duration,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        ActivityConfig {
            write_interval: Duration::from_secs(300),
            auto_withdraw_after: None,
            check_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Milter listener in Postfix notation (`inet:127.0.0.1:8891`, `unix:/run/mailwarden/milter.sock`);
    /// empty disables the milter front-end.
    pub milter_listen: String,
    /// Policy delegation listener, same notation; empty disables it.
    pub policy_listen: String,
    /// Connections served at once per front-end; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// How long SIGTERM waits for open sessions to finish before exiting.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Policy connections idle longer than this are closed (Postfix's own
    /// `smtpd_policy_service_max_idle` is 300s; keep ours at or above it).
    #[serde(with = "duration")]
    pub policy_idle_timeout: Duration,
    /// Largest policy request accepted, in bytes; a larger one ends that connection.
    pub policy_max_request_bytes: usize,
    /// Most attributes in one policy request.
    pub policy_max_attributes: usize,
    /// Milter protocol timeout for reads and writes to the MTA.
    #[serde(with = "duration")]
    pub milter_timeout: Duration,
    /// Threads of the async runtime; 0 means half the CPUs, at least one (see
    /// [`ServerConfig::runtime_workers`]). Read at start only.
    pub worker_threads: usize,
    /// Permissions of the Unix-domain sockets this daemon creates (`unix:` listen addresses),
    /// octal like chmod: Postfix's `smtpd` (user `postfix`) must be able to connect, so the
    /// socket needs group write for a shared group (`"0660"`, the default) or world write.
    pub socket_mode: String,
    /// Who answers MAIL and RCPT when Postfix is wired to both front-ends; see
    /// [`MilterEnvelope`].
    pub milter_envelope: MilterEnvelope,
}

/// Who answers MAIL and RCPT on the milter connection (`server.milter_envelope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MilterEnvelope {
    /// The milter judges the envelope rules at MAIL and RCPT and answers them (needed when
    /// Postfix uses the milter alone).
    #[default]
    Check,
    /// The policy service judges them (Postfix is wired to both, `check_policy_service`
    /// naming this daemon): the milter still reads the envelope (for signing, send-as and
    /// sizes) but asks Postfix for no reply at MAIL and RCPT, two round trips less per
    /// message.
    Policy,
}

impl ServerConfig {
    /// Worker threads of the runtime on a machine with `cpus` CPUs: `worker_threads`, or for
    /// 0 half the CPUs, at least one. mailwarden runs beside the MTA, which needs the other
    /// half; and an idle extra worker costs CPU on every message (a worker that finds work
    /// wakes a parked one to share it: a futex call or two per stage, ~25% of the daemon's
    /// CPU per message on a 2-CPU box, docs/benchmarks.md).
    pub fn runtime_workers(&self, cpus: usize) -> usize {
        match self.worker_threads {
            0 => (cpus / 2).max(1),
            n => n,
        }
    }

    /// `socket_mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let text = self.socket_mode.trim();
        let digits = text.strip_prefix("0o").unwrap_or(text);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
            _ => Err(format!(
                "{text:?} is not an octal permission mode like \"0660\" (at most 0777)"
            )),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            milter_listen: "inet:127.0.0.1:8891".into(),
            policy_listen: "inet:127.0.0.1:10040".into(),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
            policy_idle_timeout: Duration::from_secs(310),
            policy_max_request_bytes: 16 * 1024,
            policy_max_attributes: 64,
            milter_timeout: Duration::from_secs(300),
            worker_threads: 0,
            socket_mode: "0660".into(),
            milter_envelope: MilterEnvelope::Check,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite:PATH` (embedded, default), or Redis shared by several daemons:
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, `rediss://…` (TLS, `?ca=PATH`),
    /// `redis+sentinel://HOST[:PORT],…/SERVICE[/DB]`, `redis+cluster://HOST[:PORT],…`;
    /// options `?prefix=NAME&timeout=2s`. Full syntax: [`crate::store::redis::url`].
    pub url: String,
    /// Upper bound on one store operation on the mail path; past it the rule's
    /// `on_store_error` applies. Keep it well below Postfix's milter/policy timeouts.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// How long a directory lookup (account or organisation status) is cached. Changes made
    /// through this daemon's admin API invalidate the cache at once; with a Redis store, so do
    /// changes made through other daemons sharing it (announced over pub/sub).
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    /// Most cached lookups; the cache is cleared when it grows past this.
    pub cache_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite:/var/lib/mailwarden/mailwarden.db".into(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(60),
            cache_size: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectoryConfig {
    /// Parent domain of organisation domains (Art. 8.1): an organisation `mpt` gets `mpt.gov.la`.
    pub base_domain: String,
    /// Longest organisation code (Art. 8.2: "less than six letters").
    pub org_code_max_len: usize,
    /// Longest local part (Art. 8.3: "less than 15 letters").
    pub local_part_max_len: usize,
    /// How many free alternatives a refused registration suggests (R4).
    pub suggestions: usize,
    /// Postfix's `recipient_delimiter`: characters that start an address extension.
    /// Postfix delivers `cabinet+news@` to `cabinet@` when `cabinet+news@` is not a mailbox
    /// of its own, so the recipient rules (R1, R2, R13) judge that mailbox. Empty: none.
    pub recipient_delimiter: String,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            base_domain: "gov.la".into(),
            org_code_max_len: 5,
            local_part_max_len: 14,
            suggestions: 3,
            recipient_delimiter: "+".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin API and `/metrics` listener (`inet:HOST:PORT`); loopback by default. Empty disables.
    pub listen: String,
    /// PEM certificate chain; with `tls_key`, the admin API speaks HTTPS (rustls).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Append-only JSON-lines audit log of every directory change (R24).
    pub audit_log: PathBuf,
    /// Whether `/metrics` needs a token with the `read` scope (default: open, like most exporters).
    pub metrics_require_token: bool,
    /// Bearer tokens accepted by the admin API.
    pub tokens: Vec<TokenConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "inet:127.0.0.1:8026".into(),
            tls_cert: None,
            tls_key: None,
            audit_log: "/var/lib/mailwarden/audit.jsonl".into(),
            metrics_require_token: false,
            tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who uses the token; written to the audit log as the actor.
    pub name: String,
    /// The secret itself. Prefer `token_file` so the config can be world-readable.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the secret (first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Any of `read`, `write`, `admin`.
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Look at organisations, accounts, metrics.
    Read,
    /// Register, suspend, restore.
    Write,
    /// Destructive changes: withdraw accounts, cease organisations.
    Admin,
    /// Only Dovecot's auth-policy requests (`POST /dovecot/auth-policy`, R16); granted by no
    /// other scope, and grants nothing else.
    AuthPolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter (`mailwarden=debug`).
    /// `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Per-rule switches as the engine reads them (`Config::rule`), taken from the rule's
/// [`RuleTable`]. The limit keys are R14's (`[rules.R14]`) and an error elsewhere; unset
/// ones take the defaults of [`crate::engine::rules::limits::Limits::DEFAULT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleConfig {
    pub mode: Mode,
    /// What to do when the store cannot answer: `tempfail` (451 4.3.0, default) or `accept`
    /// (fail open, logged and counted).
    pub on_store_error: OnError,
    /// R14: most recipients in one message (0: no limit).
    pub recipients_per_message: Option<u64>,
    /// R14: most messages per account per UTC hour (0: no limit).
    pub messages_per_hour: Option<u64>,
    /// R14: most messages per account per UTC day (0: no limit).
    pub messages_per_day: Option<u64>,
    /// R14: most accepted recipients per account per UTC hour (0: no limit).
    pub recipients_per_hour: Option<u64>,
    /// R14: most accepted recipients per account per UTC day (0: no limit).
    pub recipients_per_day: Option<u64>,
    /// R14: most messages per organisation per UTC hour (0 or absent: none, and nothing is
    /// counted per organisation).
    pub org_messages_per_hour: Option<u64>,
    /// R14: most messages per organisation per UTC day (0 or absent: none).
    pub org_messages_per_day: Option<u64>,
    /// R14: most accepted recipients per organisation per UTC hour (0 or absent: none).
    pub org_recipients_per_hour: Option<u64>,
    /// R14: most accepted recipients per organisation per UTC day (0 or absent: none).
    pub org_recipients_per_day: Option<u64>,
    /// R14 (sending counters) and R13 (delivered sizes): which front-end counts (a message
    /// seen by both must be counted once).
    pub count_on: Option<CountOn>,
    /// R13: refuse over-quota recipients with `552 5.2.2` instead of `452 4.2.2`.
    pub permanent: Option<bool>,
    /// R13: add each accepted message's size to the usage of its recipients that have a
    /// quota (default `true`).
    pub count_deliveries: Option<bool>,
    /// R15: the thresholds (see [`crate::store::Watch`]; unset ones take its defaults).
    pub burst_factor: Option<u64>,
    pub burst_floor: Option<u64>,
    pub baseline_hours: Option<u64>,
    pub reject_share: Option<u64>,
    pub reject_min: Option<u64>,
}

/// One `[rules.Rn]` table as written in the file: the common switches plus the few
/// rule-specific keys (each valid only for its rule; `validate` says so by key).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RuleTable {
    pub mode: Mode,
    pub on_store_error: OnError,
    /// R10 only: clients allowed to relay mail of every local domain without SASL (the
    /// MTA's own submission and webmail hosts), besides each organisation's relay networks.
    pub trusted_networks: Option<Vec<IpNet>>,
    /// R11 only: clients that may submit without TLS. Default: loopback.
    pub exempt_networks: Option<Vec<IpNet>>,
    /// R14 only: the sending limits (see [`RuleConfig`]).
    pub recipients_per_message: Option<u64>,
    pub messages_per_hour: Option<u64>,
    pub messages_per_day: Option<u64>,
    pub recipients_per_hour: Option<u64>,
    pub recipients_per_day: Option<u64>,
    pub org_messages_per_hour: Option<u64>,
    pub org_messages_per_day: Option<u64>,
    pub org_recipients_per_hour: Option<u64>,
    pub org_recipients_per_day: Option<u64>,
    /// R14 and R13: which front-end counts.
    pub count_on: Option<CountOn>,
    /// R13 only: permanent over-quota replies.
    pub permanent: Option<bool>,
    /// R8 only: the domain a SASL login without `@` belongs to (`champa` → `champa@DOMAIN`).
    /// Unset: such a login is no account and may send as nobody.
    pub login_domain: Option<String>,
    /// R7 only: the authserv-id of the `Authentication-Results` header mailwarden adds (and
    /// whose forged copies it removes). Default: this host's name.
    pub authserv_id: Option<String>,
    /// R7 only: what to do when a DNS failure (timeout, SERVFAIL) keeps R7 from deciding:
    /// `tempfail` (`451 4.4.3`, default) or `accept` (fail open, logged and counted).
    pub on_dns_error: Option<OnError>,
    /// R7 only: largest message whose body is kept for DKIM/ARC verification, in bytes
    /// (default 26214400 = 25 MiB). A larger one is judged without its DKIM signatures.
    pub max_message_size: Option<u64>,
    /// R13 only: count delivered sizes into the usage.
    pub count_deliveries: Option<bool>,
    /// R15 only: a burst is more than `burst_factor` times the account's baseline of
    /// messages per hour and more than `burst_floor` messages in the hour; the baseline
    /// averages over about `baseline_hours`; `reject_share` percent of refused recipients in
    /// an hour locks once at least `reject_min` were refused.
    pub burst_factor: Option<u64>,
    pub burst_floor: Option<u64>,
    pub baseline_hours: Option<u64>,
    pub reject_share: Option<u64>,
    pub reject_min: Option<u64>,
}

/// R11's default exemptions: loopback (local programs submitting through `sendmail` or a
/// webmail on the same host).
pub fn default_tls_exempt_networks() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("valid CIDR"),
        "::1/128".parse().expect("valid CIDR"),
    ]
}

/// Which front-end applies and counts the sending limits (R14, R15) and R13's delivered
/// sizes. When Postfix is wired to both the milter and the policy service, each RCPT and
/// each end of DATA reaches mailwarden twice; only one of them may count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CountOn {
    /// Found per recipient and per message: the policy service whatever it is asked about,
    /// the milter the rest (see `checker::handoff`).
    #[default]
    Auto,
    /// Only the policy service.
    Policy,
    /// Only the milter.
    Milter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Tempfail,
    Accept,
}

/// Rules this build implements; a `[rules.X]` table for anything else is an error.
pub const KNOWN_RULES: [RuleId; 11] = [
    RuleId::R1,
    RuleId::R2,
    RuleId::R6,
    RuleId::R7,
    RuleId::R8,
    RuleId::R9,
    RuleId::R10,
    RuleId::R11,
    RuleId::R13,
    RuleId::R14,
    RuleId::R15,
];

impl Config {
    /// Reads, parses and validates a config file, reporting every error found.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.to_owned(),
            errors: vec![ConfigError {
                key: "(file)".into(),
                reason: format!("cannot read: {e}"),
            }],
        })?;
        Config::from_toml(&text).map_err(|errors| ConfigErrors {
            file: path.to_owned(),
            errors,
        })
    }

    /// Parses and validates TOML text, and loads the DKIM key files it names (relative
    /// paths are relative to the working directory).
    pub fn from_toml(text: &str) -> Result<Config, Vec<ConfigError>> {
        let mut config: Config = toml::from_str(text).map_err(|e| vec![toml_error(&e, text)])?;
        let mut errors = config.validate();
        if let Err(e) = config.dkim.load_keys() {
            errors.extend(e);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Every semantic problem, each naming its key.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut err = |key: &str, reason: String| {
            errs.push(ConfigError {
                key: key.into(),
                reason,
            })
        };
        for (key, value) in [
            ("server.milter_listen", &self.server.milter_listen),
            ("server.policy_listen", &self.server.policy_listen),
            ("admin.listen", &self.admin.listen),
        ] {
            if !value.is_empty() {
                if let Err(e) = value.parse::<ListenAddr>() {
                    err(key, e);
                }
            }
        }
        if self.server.milter_listen.is_empty() && self.server.policy_listen.is_empty() {
            err(
                "server",
                "both milter_listen and policy_listen are empty: nothing would be served".into(),
            );
        }
        if let Err(e) = self.server.socket_mode() {
            err("server.socket_mode", e);
        }
        if self.server.milter_envelope == MilterEnvelope::Policy
            && self.server.policy_listen.is_empty()
        {
            err(
                "server.milter_envelope",
                "\"policy\" leaves MAIL and RCPT to the policy service, but server.policy_listen \
                 is empty: nothing would judge them"
                    .into(),
            );
        }
        if self.server.max_connections == 0 {
            err("server.max_connections", "must be at least 1".into());
        }
        if self.server.policy_max_request_bytes < 512 {
            err(
                "server.policy_max_request_bytes",
                "must be at least 512 (a normal Postfix request is ~1 KiB)".into(),
            );
        }
        if self.server.policy_max_attributes < 8 {
            err("server.policy_max_attributes", "must be at least 8".into());
        }
        if let Err(e) = crate::store::StoreUrl::parse(&self.store.url) {
            err("store.url", e);
        }
        if self.store.timeout.is_zero() {
            err("store.timeout", "must be greater than zero".into());
        }
        if self.store.cache_size == 0 {
            err("store.cache_size", "must be at least 1".into());
        }
        let d = &self.directory;
        if d.base_domain.is_empty()
            || crate::model::Address::parse(&format!("x@a.{}", d.base_domain)).is_err()
        {
            err(
                "directory.base_domain",
                format!("{:?} is not a domain name", d.base_domain),
            );
        }
        if !(1..=63).contains(&d.org_code_max_len) {
            err(
                "directory.org_code_max_len",
                "must be between 1 and 63".into(),
            );
        }
        if !(1..=64).contains(&d.local_part_max_len) {
            err(
                "directory.local_part_max_len",
                "must be between 1 and 64".into(),
            );
        }
        if let Some(c) = d
            .recipient_delimiter
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '@' | '"' | '\\'))
        {
            err(
                "directory.recipient_delimiter",
                format!(
                    "{c:?} cannot start an address extension: give the characters of \
                     Postfix's recipient_delimiter (e.g. \"+\"), or \"\" for none"
                ),
            );
        }
        match (&self.admin.tls_cert, &self.admin.tls_key) {
            (Some(_), None) => err("admin.tls_key", "tls_cert is set but tls_key is not".into()),
            (None, Some(_)) => err(
                "admin.tls_cert",
                "tls_key is set but tls_cert is not".into(),
            ),
            (Some(c), Some(k)) => {
                for (key, p) in [("admin.tls_cert", c), ("admin.tls_key", k)] {
                    if !p.is_file() {
                        err(key, format!("{} is not a readable file", p.display()));
                    }
                }
            }
            _ => {}
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.admin.tokens.iter().enumerate() {
            let key = format!("admin.tokens[{i}]");
            if t.name.is_empty() {
                err(&format!("{key}.name"), "must not be empty".into());
            }
            if !names.insert(t.name.clone()) {
                err(
                    &format!("{key}.name"),
                    format!("duplicate token name {:?}", t.name),
                );
            }
            match (&t.token, &t.token_file) {
                (Some(_), Some(_)) => err(&key, "set either token or token_file, not both".into()),
                (None, None) => err(&key, "one of token or token_file is required".into()),
                (Some(s), None) if s.len() < 16 => err(
                    &format!("{key}.token"),
                    "must be at least 16 characters".into(),
                ),
                (None, Some(p)) => match std::fs::read_to_string(p) {
                    Ok(s) if s.lines().next().unwrap_or("").trim().len() >= 16 => {}
                    Ok(_) => err(
                        &format!("{key}.token_file"),
                        "token must be at least 16 characters".into(),
                    ),
                    Err(e) => err(
                        &format!("{key}.token_file"),
                        format!("cannot read {}: {e}", p.display()),
                    ),
                },
                _ => {}
            }
            if t.scopes.is_empty() {
                err(
                    &format!("{key}.scopes"),
                    "must name at least one of read, write, admin, auth_policy".into(),
                );
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            err(
                "log.format",
                format!("{:?} is not one of text, json", self.log.format),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            err(
                "log.level",
                format!("{:?} is not a valid filter: {e}", self.log.level),
            );
        }
        let a = &self.activity;
        if a.write_interval.is_zero() {
            err(
                "activity.write_interval",
                "must be greater than zero".into(),
            );
        }
        if a.check_interval.is_zero() {
            err(
                "activity.check_interval",
                "must be greater than zero".into(),
            );
        }
        if let Some(after) = a.auto_withdraw_after {
            // A typo like "730s" would withdraw every account at the next check.
            if after < Duration::from_secs(30 * 86_400) {
                err(
                    "activity.auto_withdraw_after",
                    format!(
                        "{} is too short: at least 30 days (e.g. \"730d\")",
                        humantime::format_duration(after)
                    ),
                );
            }
        }
        self.dkim.validate(&mut err);
        self.alerts.validate(&mut err);
        self.dns.validate(&mut err);
        for (name, table) in &self.rules {
            for (key, set, owner) in [
                ("trusted_networks", table.trusted_networks.is_some(), "R10"),
                ("exempt_networks", table.exempt_networks.is_some(), "R11"),
            ] {
                if set && name != owner {
                    err(
                        &format!("rules.{name}.{key}"),
                        format!("only [rules.{owner}] has {key}"),
                    );
                }
            }
            let r14_keys = [
                (
                    "recipients_per_message",
                    table.recipients_per_message.is_some(),
                ),
                ("messages_per_hour", table.messages_per_hour.is_some()),
                ("messages_per_day", table.messages_per_day.is_some()),
                ("recipients_per_hour", table.recipients_per_hour.is_some()),
                ("recipients_per_day", table.recipients_per_day.is_some()),
                (
                    "org_messages_per_hour",
                    table.org_messages_per_hour.is_some(),
                ),
                ("org_messages_per_day", table.org_messages_per_day.is_some()),
                (
                    "org_recipients_per_hour",
                    table.org_recipients_per_hour.is_some(),
                ),
                (
                    "org_recipients_per_day",
                    table.org_recipients_per_day.is_some(),
                ),
            ];
            if name != RuleId::R14.as_str() {
                for (key, set) in r14_keys {
                    if set {
                        err(
                            &format!("rules.{name}.{key}"),
                            "is a sending limit: it belongs in [rules.R14]".into(),
                        );
                    }
                }
            }
            match &table.login_domain {
                Some(_) if name != RuleId::R8.as_str() => err(
                    &format!("rules.{name}.login_domain"),
                    "is the SASL login's domain: it belongs in [rules.R8]".into(),
                ),
                Some(d)
                    if d.is_empty()
                        || d.contains('@')
                        || crate::model::Address::parse(&format!("x@{d}")).is_err() =>
                {
                    err(
                        &format!("rules.{name}.login_domain"),
                        format!("{d:?} is not a domain name (like \"mpt.gov.la\")"),
                    )
                }
                _ => {}
            }
            if name != RuleId::R7.as_str() {
                for (key, set) in [
                    ("authserv_id", table.authserv_id.is_some()),
                    ("on_dns_error", table.on_dns_error.is_some()),
                    ("max_message_size", table.max_message_size.is_some()),
                ] {
                    if set {
                        err(
                            &format!("rules.{name}.{key}"),
                            "is an inbound verification key: it belongs in [rules.R7]".into(),
                        );
                    }
                }
            } else {
                if let Some(id) = &table.authserv_id {
                    if !crate::verify::valid_authserv_id(id) {
                        err(
                            "rules.R7.authserv_id",
                            format!("{id:?} is not a host name (letters, digits, '-', '.')"),
                        );
                    }
                }
                if table.max_message_size == Some(0) {
                    err("rules.R7.max_message_size", "must be at least 1".into());
                }
            }
            if name != RuleId::R13.as_str() && table.permanent.is_some() {
                err(
                    &format!("rules.{name}.permanent"),
                    "is the quota reply's kind: it belongs in [rules.R13]".into(),
                );
            }
            if name != RuleId::R13.as_str() && table.count_deliveries.is_some() {
                err(
                    &format!("rules.{name}.count_deliveries"),
                    "is about mailbox usage: it belongs in [rules.R13]".into(),
                );
            }
            if name != RuleId::R13.as_str()
                && name != RuleId::R14.as_str()
                && table.count_on.is_some()
            {
                err(
                    &format!("rules.{name}.count_on"),
                    "says which front-end counts: only [rules.R13] and [rules.R14] count".into(),
                );
            }
            // Naming a front-end this daemon does not serve: nothing would count.
            let (front_end, listen) = match table.count_on {
                Some(CountOn::Policy) => ("policy", &self.server.policy_listen),
                Some(CountOn::Milter) => ("milter", &self.server.milter_listen),
                _ => ("", &self.server.policy_listen),
            };
            if !front_end.is_empty() && listen.is_empty() {
                err(
                    &format!("rules.{name}.count_on"),
                    format!(
                        "\"{front_end}\" but server.{front_end}_listen is empty: nothing would \
                         apply or count it (\"auto\" counts on whichever front-end sees the mail)"
                    ),
                );
            }
            let r15_keys = [
                ("burst_factor", table.burst_factor),
                ("burst_floor", table.burst_floor),
                ("baseline_hours", table.baseline_hours),
                ("reject_share", table.reject_share),
                ("reject_min", table.reject_min),
            ];
            for (key, value) in r15_keys {
                let Some(v) = value else { continue };
                let key = format!("rules.{name}.{key}");
                if name != RuleId::R15.as_str() {
                    err(
                        &key,
                        "is a compromise-response threshold: it belongs in [rules.R15]".into(),
                    );
                } else if key.ends_with("reject_share") && !(1..=100).contains(&v) {
                    err(&key, format!("{v} is not a percentage between 1 and 100"));
                } else if !key.ends_with("reject_share") && v == 0 {
                    err(&key, "must be at least 1".into());
                }
            }
            if !KNOWN_RULES.iter().any(|r| r.as_str() == name) {
                err(
                    &format!("rules.{name}"),
                    format!(
                        "unknown rule; this version implements {}",
                        KNOWN_RULES.map(|r| r.as_str()).join(", ")
                    ),
                );
            }
        }
        errs
    }

    /// The settings of one rule (defaults when the file does not mention it). R7 is the
    /// exception: it is off until a `[rules.R7]` table exists, since it needs DNS and asks
    /// the MTA for every message's content.
    pub fn rule(&self, id: RuleId) -> RuleConfig {
        if id == RuleId::R7 && !self.rules.contains_key(id.as_str()) {
            return RuleConfig {
                mode: Mode::Off,
                ..RuleConfig::default()
            };
        }
        self.rules
            .get(id.as_str())
            .map(|t| RuleConfig {
                mode: t.mode,
                on_store_error: t.on_store_error,
                recipients_per_message: t.recipients_per_message,
                messages_per_hour: t.messages_per_hour,
                messages_per_day: t.messages_per_day,
                recipients_per_hour: t.recipients_per_hour,
                recipients_per_day: t.recipients_per_day,
                org_messages_per_hour: t.org_messages_per_hour,
                org_messages_per_day: t.org_messages_per_day,
                org_recipients_per_hour: t.org_recipients_per_hour,
                org_recipients_per_day: t.org_recipients_per_day,
                count_on: t.count_on,
                permanent: t.permanent,
                count_deliveries: t.count_deliveries,
                burst_factor: t.burst_factor,
                burst_floor: t.burst_floor,
                baseline_hours: t.baseline_hours,
                reject_share: t.reject_share,
                reject_min: t.reject_min,
            })
            .unwrap_or_default()
    }

    /// R7's table (all defaults when absent; the rule itself is then off).
    pub fn r7(&self) -> RuleTable {
        self.rules
            .get(RuleId::R7.as_str())
            .cloned()
            .unwrap_or_default()
    }

    /// R10's `trusted_networks` (none by default).
    pub fn relay_trusted_networks(&self) -> Vec<IpNet> {
        self.rules
            .get(RuleId::R10.as_str())
            .and_then(|t| t.trusted_networks.clone())
            .unwrap_or_default()
    }

    /// R8's `login_domain`, lower case (none by default).
    pub fn login_domain(&self) -> Option<String> {
        self.rules
            .get(RuleId::R8.as_str())
            .and_then(|t| t.login_domain.as_deref())
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
    }

    /// R11's `exempt_networks` (loopback by default; `[]` exempts nobody).
    pub fn tls_exempt_networks(&self) -> Vec<IpNet> {
        self.rules
            .get(RuleId::R11.as_str())
            .and_then(|t| t.exempt_networks.clone())
            .unwrap_or_else(default_tls_exempt_networks)
    }

    /// The token secrets, read from the config or their files.
    pub fn token_secrets(&self) -> Vec<(TokenConfig, String)> {
        self.admin
            .tokens
            .iter()
            .filter_map(|t| {
                let secret = match (&t.token, &t.token_file) {
                    (Some(s), _) => s.clone(),
                    (None, Some(p)) => std::fs::read_to_string(p)
                        .ok()?
                        .lines()
                        .next()?
                        .trim()
                        .to_owned(),
                    (None, None) => return None,
                };
                Some((t.clone(), secret))
            })
            .collect()
    }
}

/// Turns a toml parse error into a keyed error with its line number.
fn toml_error(e: &toml::de::Error, text: &str) -> ConfigError {
    let msg = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return ConfigError {
            key: "(syntax)".into(),
            reason: msg,
        };
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    ConfigError {
        key: format!("line {line_no}"),
        reason: format!("{msg}: `{line}`"),
    }
}

/// `"30s"`, `"5m"`, `"365d"` durations (humantime), also accepted as an integer of seconds.
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    /// The same for an optional key.
    pub mod option {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(deserialize_with = "super::deserialize")] Duration);
            Ok(Some(Wrap::deserialize(d)?.0))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration like \"30s\" or \"5m\": {e}"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests;
