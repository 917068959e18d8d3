//! STUB: `mailwarden org …` and `mailwarden user …`: the CLI client of the admin API.

/// How the CLI reaches the daemon's admin API.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Admin API base URL (default: from the config file's `admin.listen`).
    #[arg(long, env = "MAILWARDEN_URL", global = true)]
    pub url: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum OrgCommand {}

#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {}

/// Runs an `org` subcommand; returns the process exit code.
pub async fn org(_client: &ClientArgs, _cmd: OrgCommand) -> i32 {
    2
}

/// Runs a `user` subcommand; returns the process exit code.
pub async fn user(_client: &ClientArgs, _cmd: UserCommand) -> i32 {
    2
}
