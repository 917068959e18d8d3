//! The `mailwarden` binary: the daemon (`run`), config validation (`check-config`) and the
//! administration CLI (`org`, `user`) that talks to a running daemon's admin API.

mod bench;

use clap::{Parser, Subcommand};
use mailwarden::{
    admin::cli::{self, ClientArgs, OrgCommand, UserCommand},
    config::{Config, EXIT_CONFIG},
    daemon::{Control, Daemon},
};
use std::{path::PathBuf, process::ExitCode};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "mailwarden",
    version,
    about = "Government email policy daemon (milter + Postfix policy service)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (SIGHUP reloads the config, SIGTERM stops gracefully).
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "/etc/mailwarden/mailwarden.toml")]
        config: PathBuf,
        /// Write the bound addresses as JSON to this file once listening (for scripts and tests
        /// that configure port 0).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration file; prints every error with its key, exits 64 on errors.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/mailwarden/mailwarden.toml")]
        config: PathBuf,
    },
    /// Benchmark the policy and milter front-ends on the embedded store (build with --release):
    /// starts a daemon, loads it, reports rate, p50/p99 latency and the daemon's CPU per check.
    Bench(bench::BenchArgs),
    /// DKIM keys (R6): generate a signing key and the DNS record that publishes it; check the
    /// published record against the configured key.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Manage organisations through the admin API.
    #[command(after_help = cli::EXIT_CODES)]
    Org {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Manage accounts through the admin API.
    #[command(after_help = cli::EXIT_CODES)]
    User {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Write a new private key (mode 0600, never overwriting) to DIR/DOMAIN.SELECTOR.pem and
    /// print the DNS TXT record to publish and the [[dkim.keys]] entry for the config.
    Keygen {
        /// Signing domain (d=), e.g. mpt.gov.la.
        domain: String,
        /// Selector (s=), e.g. 2026a; the record goes to SELECTOR._domainkey.DOMAIN.
        selector: String,
        /// rsa (RSA-2048, verified everywhere) or ed25519 (RFC 8463; sign with both during
        /// the transition: dual signing).
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// Directory for the key file.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Look up the published key record of each configured key of DOMAIN (through the
    /// resolver of [dns]) and compare it with the key: match, mismatch, missing or DNS
    /// error. Exits 0 only when every key checked matches.
    Check {
        /// Signing domain, e.g. mpt.gov.la.
        domain: String,
        /// Check only this selector (default: every configured key of the domain).
        #[arg(long)]
        selector: Option<String>,
        #[arg(long, short, default_value = "/etc/mailwarden/mailwarden.toml")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

async fn dkim(command: DkimCommand) -> i32 {
    match command {
        DkimCommand::Check {
            domain,
            selector,
            config,
        } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return EXIT_CONFIG;
                }
            };
            match mailwarden::verify::check::check_domain(&config, &domain, selector.as_deref())
                .await
            {
                Ok(results) => {
                    let mut all = true;
                    for (key, result) in &results {
                        println!(
                            "{}._domainkey.{} ({}): {result}",
                            key.selector,
                            key.domain,
                            key.algorithm.as_str()
                        );
                        if !result.is_match() {
                            all = false;
                            if !matches!(result, mailwarden::verify::check::KeyCheck::DnsError(_)) {
                                println!("{}", key.dns_record());
                            }
                        }
                    }
                    if all { 0 } else { 1 }
                }
                Err(e) => {
                    eprintln!("mailwarden dkim check: {e}");
                    1
                }
            }
        }
        DkimCommand::Keygen {
            domain,
            selector,
            algorithm,
            out,
        } => {
            let algorithm = match algorithm {
                KeyAlgorithm::Rsa => mailwarden::config::DkimAlgorithm::RsaSha256,
                KeyAlgorithm::Ed25519 => mailwarden::config::DkimAlgorithm::Ed25519Sha256,
            };
            match mailwarden::dkim::keygen::keygen(&domain, &selector, algorithm, &out) {
                Ok(g) => {
                    eprintln!("wrote {} (mode 0600)", g.key_file.display());
                    eprintln!(
                        "publish this DNS record, then add the key to the config and reload:"
                    );
                    println!("{}", g.dns_record);
                    eprintln!("\n{}", g.config_entry);
                    0
                }
                Err(e) => {
                    eprintln!("mailwarden dkim keygen: {e}");
                    1
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon's config is read before the runtime exists: it sizes the runtime.
    let mut loaded = None;
    if let Command::Run { config, .. } = &cli.command {
        match Config::load(config) {
            Ok(c) => loaded = Some(c),
            Err(e) => {
                eprint!("{e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(server) = loaded.as_ref().map(|c| &c.server) {
        // TOKIO_WORKER_THREADS, when set, still sizes an automatic (0) runtime.
        if server.worker_threads > 0 || std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            builder.worker_threads(server.runtime_workers(cpus));
        }
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailwarden: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async move {
        match cli.command {
            Command::Run { config, ready_file } => {
                let loaded = loaded.expect("loaded above for run");
                run(loaded, config, ready_file).await
            }
            Command::CheckConfig { config } => check_config(&config),
            Command::Bench(args) => match bench::run(args).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("mailwarden bench: {e:#}");
                    1
                }
            },
            Command::Dkim { command } => dkim(command).await,
            Command::Org { client, command } => cli::org(&client, command).await,
            Command::User { client, command } => cli::user(&client, command).await,
        }
    });
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn check_config(path: &std::path::Path) -> i32 {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: configuration OK", path.display());
            0
        }
        Err(e) => {
            eprint!("{e}");
            EXIT_CONFIG
        }
    }
}

async fn run(config: Config, path: PathBuf, ready_file: Option<PathBuf>) -> i32 {
    mailwarden::telemetry::init_logging(&config.log);
    let daemon = match Daemon::start(config, Some(path)).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            eprintln!("mailwarden: cannot start: {e:#}");
            return 1;
        }
    };
    if let Some(f) = ready_file {
        let json = serde_json::to_string(daemon.bound()).expect("serialisable");
        let tmp = f.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, &f)) {
            eprintln!("mailwarden: cannot write ready file {}: {e}", f.display());
            return 1;
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            let msg = tokio::select! {
                _ = hup.recv() => Control::Reload,
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
            };
            let stop = matches!(msg, Control::Shutdown);
            if tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
    match daemon.serve(rx).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    }
}
