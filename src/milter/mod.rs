//! STUB: to be implemented.

use crate::checker::Checker;
use crate::net::Listener;
use std::sync::Arc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Serves connections until `shutdown` is cancelled. Each connection runs as a task on
/// `sessions`, which the daemon drains on shutdown.
pub async fn serve(
    listener: Listener,
    checker: Arc<Checker>,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) -> std::io::Result<()> {
    let _ = (listener, checker, sessions);
    shutdown.cancelled().await;
    Ok(())
}
