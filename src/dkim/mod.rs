//! DKIM signing (R6, Art. 13.2): keys, the per-message streaming signer, key generation.
//!
//! - [`keys`]: PEM key files → [`KeyRing`] (checked: algorithm, RSA ≥ 2048 bits), built at
//!   start and on every reload as part of the config snapshot.
//! - [`signer`]: [`MessageSigner`] hashes a message as the milter receives it — the header
//!   block once, then each body chunk as it arrives (no copy of the body is kept) — and
//!   produces one `DKIM-Signature` per key at end of message (mail-auth `sign_streaming`).
//! - [`keygen`]: `mailwarden dkim keygen`.
//!
//! Whether a message must be signed, and with which keys, is decided by the pure engine
//! (`engine::rules::dkim`); this module only signs.

pub mod keygen;
pub mod keys;
pub mod signer;

pub use keys::{KeyError, KeyRing, MIN_RSA_BITS, SigningKey};
pub use signer::{MessageSigner, SignError, Signed};
