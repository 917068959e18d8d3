//! The Postfix policy-delegation front-end (`check_policy_service`): translation only.
//!
//! - [`codec`]: the wire format, pure and incremental (no I/O).
//! - [`request`]: a request's attributes → [`crate::model::Transaction`]; a
//!   [`crate::model::Decision`] → an access(5) action.
//!
//! No rule logic lives here: every decision comes from [`crate::checker::Checker`].

pub mod codec;
pub mod request;

use crate::checker::Checker;
use crate::net::Listener;
use std::sync::Arc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// STUB until the server lands: serves nothing.
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
