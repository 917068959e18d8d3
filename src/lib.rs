//! mailwarden: a milter and Postfix policy daemon enforcing the Government Email decision
//! No. 3680/MPT (see `REQUIREMENTS.md` for the rules R1–R25).
//!
//! A map of the crate:
//! - [`model`]: the one transaction model both front-ends produce; [`model::Decision`] and
//!   [`model::Reply`].
//! - [`milter`]: the milter front-end (indymilter): translation only.
//! - [`policy`]: the Postfix policy-delegation front-end: a pure codec and a server.
//! - [`engine`]: pure decisions, one file per rule family; no I/O, no clock.
//! - [`checker`]: looks up facts, runs the engine, records the decision; what front-ends call.
//! - [`store`]: the `Store` trait, the embedded SQLite store, the read-through cache.
//! - [`dkim`]: DKIM signing keys, the streaming per-message signer, key generation (R6).
//! - [`directory`]: registration rules (R3 address structure, R4 first come first served, R5 kinds).
//! - [`config`]: file model, validation (every error by key), reload snapshots.
//! - [`telemetry`]: logging setup, decision events, Prometheus metrics.
//! - [`alerts`]: owner alerts (R16): signed webhook, new-country login detection (GeoIP).
//! - [`admin`]: the admin HTTP API (and `/metrics`), the audit log, and the CLI client.
//! - [`verify`]: inbound verification (R7): SPF, DKIM, DMARC, ARC and the
//!   `Authentication-Results` header, with the configured DNS resolver.
//! - [`daemon`]: binds listeners and runs everything until shutdown; used by `main` and tests.
//! - [`events`]: the hook account events (R15 locks) are raised on, for R16's alerts.
//! - [`activity`]: last authenticated use per account and automatic withdrawal (R20).

#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod alerts;
pub mod checker;
pub mod config;
pub mod daemon;
pub mod directory;
pub mod dkim;
pub mod engine;
pub mod events;
pub mod milter;
pub mod model;
pub mod net;
pub mod policy;
pub mod store;
pub mod telemetry;
pub mod verify;

pub use daemon::{Control, Daemon};
