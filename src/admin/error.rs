//! API errors: one JSON shape (`{"error": "...", ...}`) with the right status code.

use crate::directory::RegistrationError;
use crate::store::StoreError;
use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Map<String, Value>,
    /// `WWW-Authenticate` challenge for 401 answers.
    pub challenge: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(message.into()));
        ApiError {
            status,
            body,
            challenge: None,
        }
    }

    /// Adds a field to the JSON body.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.body.insert(key.into(), value.into());
        self
    }

    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, m)
    }
    pub fn unprocessable(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
    pub fn unauthorized(m: impl Into<String>, invalid_token: bool) -> ApiError {
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, m);
        e.challenge = Some(if invalid_token {
            r#"Bearer realm="mailwarden", error="invalid_token""#
        } else {
            r#"Bearer realm="mailwarden""#
        });
        e
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match &e {
            StoreError::Conflict { .. } => ApiError::conflict(e.to_string()).with("rule", "R4"),
            StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
            StoreError::Unavailable(_) => {
                tracing::warn!("admin API: {e}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{e}; nothing was changed, try again"),
                )
            }
            StoreError::Corrupt(_) => {
                tracing::error!("admin API: {e}");
                ApiError::internal(e.to_string())
            }
        }
    }
}

impl From<RegistrationError> for ApiError {
    fn from(e: RegistrationError) -> ApiError {
        let rule = match e {
            RegistrationError::Kind { .. } => Some("R5"),
            RegistrationError::InitialStatus { .. } | RegistrationError::Field { .. } => None,
            _ => Some("R3"),
        };
        let err = ApiError::bad_request(e.to_string());
        match rule {
            Some(r) => err.with("rule", r),
            None => err,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(Value::Object(self.body))).into_response();
        if let Some(c) = self.challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        resp
    }
}

/// `{"error": message}` with a status: for fallbacks.
pub fn plain(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}
