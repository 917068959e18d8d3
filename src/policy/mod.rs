//! The Postfix policy-delegation front-end (`check_policy_service`): translation only.
//!
//! - [`codec`]: the wire format, pure and incremental (no I/O).
//! - [`request`]: a request's attributes → [`crate::model::Transaction`]; a
//!   [`crate::model::Decision`] → an access(5) action.
//! - [`server`]: the accept loop and one task per MTA connection.
//! - [`loadgen`]: a client that loads a policy server, for `mailwarden bench policy`.
//!
//! No rule logic lives here: every decision comes from [`crate::checker::Checker`].

pub mod codec;
pub mod loadgen;
pub mod request;
mod server;

pub use server::serve;

#[cfg(test)]
mod tests;
