//! Bearer-token authentication and scope checks (R24).
//!
//! Tokens come from the configuration in force (`admin.tokens`), read on every request, so a
//! reload (or a changed `token_file`) takes effect at once. Secrets are compared in constant
//! time and never logged. Scopes are ordered `read` < `write` < `admin`: a token may do what
//! its highest scope allows.

use super::{AppState, error::ApiError};
use crate::config::Scope;
use axum::{extract::FromRequestParts, http::header, http::request::Parts};
use subtle::ConstantTimeEq;

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name: the actor in the audit log.
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// The rank of an administrative scope; `None` for `auth_policy`, which is outside the
/// order (granted only by itself).
fn level(s: Scope) -> Option<u8> {
    match s {
        Scope::Read => Some(0),
        Scope::Write => Some(1),
        Scope::Admin => Some(2),
        Scope::AuthPolicy => None,
    }
}

pub fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Read => "read",
        Scope::Write => "write",
        Scope::Admin => "admin",
        Scope::AuthPolicy => "auth_policy",
    }
}

impl Caller {
    pub fn allows(&self, need: Scope) -> bool {
        match level(need) {
            None => self.scopes.contains(&need),
            Some(need) => self
                .scopes
                .iter()
                .any(|&s| level(s).is_some_and(|l| l >= need)),
        }
    }

    /// 403 naming the missing scope when the caller may not `what` ("withdraw an account").
    pub fn require(&self, need: Scope, what: &str) -> Result<(), ApiError> {
        if self.allows(need) {
            return Ok(());
        }
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "token {:?} lacks the {:?} scope needed to {what}",
                self.name,
                scope_name(need)
            ),
        )
        .with("missing_scope", scope_name(need)))
    }
}

/// Finds the token `presented` among the configured ones, comparing every secret in
/// constant time (no early exit on a match).
pub fn authenticate(state: &AppState, presented: &str) -> Option<Caller> {
    let mut found = None;
    for (token, secret) in state.checker.snapshot().config.token_secrets() {
        let same: bool = secret.as_bytes().ct_eq(presented.as_bytes()).into();
        if same && found.is_none() {
            found = Some(Caller {
                name: token.name,
                scopes: token.scopes,
            });
        }
    }
    found
}

/// The bearer token of a request, or the 401 that explains what is missing.
pub fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "authentication required: send the header 'Authorization: Bearer <token>' with a token from admin.tokens",
            false,
        ));
    };
    let value = value.to_str().unwrap_or("");
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::unauthorized(
            "the Authorization header must be 'Bearer <token>'",
            false,
        )),
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        authenticate(state, token)
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token", true))
    }
}
