//! `ApiError` → status + `{"error": {"code", "message"}}`: the one place
//! errors become HTTP.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::domain::Invalid;
use crate::log::{Throttle, skipped_note};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed (allowed: {allow})")]
    MethodNotAllowed { allow: &'static str },
    #[error("{0}")]
    BadRequest(String),
    #[error("a request body needs a Content-Length (or chunked encoding)")]
    LengthRequired,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("the database is unavailable")]
    Unavailable,
    /// A query ran past `database.statement_timeout_ms`: notesd stopped
    /// waiting and closed the connection (PostgreSQL cancels it too).
    #[error("database timed out")]
    DatabaseTimeout,
    /// No room to commit the write (a full disk under SQLite, PostgreSQL's
    /// `disk_full`): nothing was written.
    #[error("storage full")]
    StorageFull,
    #[error("the request took longer than {0} s")]
    Timeout(u64),
    /// Shed before any work (`http.max_queue_ms`): it already waited too long.
    #[error(
        "overloaded: the request waited {waited_ms} ms in the queue (max_queue_ms = {max_ms}); retry"
    )]
    Overloaded { waited_ms: u64, max_ms: u64 },
    /// An `Idempotency-Key` held by a request still running.
    #[error("a request with this Idempotency-Key is still being processed; retry later")]
    KeyInUse,
    /// An `Idempotency-Key` already used for another request.
    #[error("this Idempotency-Key was already used for a different request (method, path or body)")]
    KeyReused,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::LengthRequired => StatusCode::LENGTH_REQUIRED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid(_) | ApiError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::KeyInUse => StatusCode::CONFLICT,
            ApiError::Unavailable
            | ApiError::DatabaseTimeout
            | ApiError::Timeout(_)
            | ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::LengthRequired => "length_required",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Invalid(_) => "validation_failed",
            ApiError::Unavailable => "unavailable",
            ApiError::DatabaseTimeout => "database_timeout",
            ApiError::StorageFull => "storage_full",
            ApiError::Timeout(_) => "timeout",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::KeyInUse => "idempotency_key_in_use",
            ApiError::KeyReused => "idempotency_key_reused",
            ApiError::Internal => "internal",
        }
    }

    /// `{"error": {"code", "message"}}`, encoded.
    pub(crate) fn body(&self) -> Bytes {
        super::json_bytes(&serde_json::json!({
            "error": {"code": self.code(), "message": self.to_string()}
        }))
    }

    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = super::json_response(self.status(), self.body());
        if let ApiError::MethodNotAllowed { allow } = self {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        if let ApiError::Overloaded { .. } | ApiError::KeyInUse = self {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// One line a second per worker for each, however many requests hit it.
static UNAVAILABLE: Throttle = Throttle::new();
static INTERNAL: Throttle = Throttle::new();
static FULL: Throttle = Throttle::new();
static TIMED_OUT: Throttle = Throttle::new();

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let now = crate::clock::now();
        if e.is_storage_full() {
            if let Some(skipped) = FULL.admit(now) {
                tracing::warn!(
                    "storage full: a write was refused (507), nothing committed: {e}{}",
                    skipped_note(skipped)
                );
            }
            ApiError::StorageFull
        } else if e.is_timeout() {
            if let Some(skipped) = TIMED_OUT.admit(now) {
                tracing::warn!("database timed out: {e}{}", skipped_note(skipped));
            }
            ApiError::DatabaseTimeout
        } else if e.is_unavailable() {
            if let Some(skipped) = UNAVAILABLE.admit(now) {
                tracing::warn!("database unavailable: {e}{}", skipped_note(skipped));
            }
            ApiError::Unavailable
        } else {
            if let Some(skipped) = INTERNAL.admit(now) {
                tracing::error!("database error: {e}{}", skipped_note(skipped));
            }
            ApiError::Internal
        }
    }
}
