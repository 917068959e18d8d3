//! Account events the mail path raises, for services that act on them (the owner alerts of
//! R16, the audit log). The hook is deliberately tiny: the checker calls
//! [`EventSink::account_locked`] on the mail path, so an implementation must return at once
//! — hand the event to a queue (`try_send`) and do the work elsewhere. A full or closed
//! queue drops the event with a warning; mail is never held up by a sink.
//!
//! Wiring: `checker.add_event_sink(Arc::new(sender))` with a
//! `tokio::sync::mpsc::Sender<AccountLocked>` (implemented below), or any type implementing
//! [`EventSink`]. The daemon installs one that writes the audit log (`user.lock`).

use crate::model::Address;
use crate::store::SendLock;
use tokio::sync::mpsc;

/// An account was locked for sending by R15 (automatically; locks set through the admin
/// API are audited there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountLocked {
    pub address: Address,
    pub lock: SendLock,
}

/// Receives account events. Must not block (see the module docs).
pub trait EventSink: Send + Sync + 'static {
    fn account_locked(&self, event: &AccountLocked);
}

impl EventSink for mpsc::Sender<AccountLocked> {
    fn account_locked(&self, event: &AccountLocked) {
        if let Err(e) = self.try_send(event.clone()) {
            tracing::warn!(address = %event.address, "account-lock event dropped: {e}");
        }
    }
}
