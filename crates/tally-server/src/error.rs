//! API errors: `{"error": "<code>", "message": "…", …details}` with the right status, and
//! `Retry-After` on 429 and 503. Internal errors are logged, never shown.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tally_engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
    pub retry_after_s: Option<u32>,
}

/// Seconds a client should wait after an overload answer.
const OVERLOAD_RETRY_AFTER_S: u32 = 1;
/// Seconds a client should wait while the server recovers or stops.
const UNAVAILABLE_RETRY_AFTER_S: u32 = 5;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: Map::new(), retry_after_s: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_parameter` naming the query parameter or body field at fault.
    pub fn invalid_parameter(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::bad_request("invalid_parameter", message).with("field", json!(field))
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /v1/openapi.json")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method; see /v1/openapi.json",
        )
    }

    pub fn unavailable(code: &'static str, message: String) -> ApiError {
        ApiError {
            retry_after_s: Some(UNAVAILABLE_RETRY_AFTER_S),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// A failure of the server itself: logged, shown only as "internal".
    pub fn internal(detail: String) -> ApiError {
        tracing::error!(%detail, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }

    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        self.details.insert(key.into(), value);
        self
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Overloaded { reason } => ApiError {
                retry_after_s: Some(OVERLOAD_RETRY_AFTER_S),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", reason)
            },
            EngineError::Unavailable { reason } => ApiError::unavailable("unavailable", reason),
            EngineError::DiskFull { reason } => ApiError {
                retry_after_s: Some(UNAVAILABLE_RETRY_AFTER_S),
                ..ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", reason)
            },
            EngineError::OutcomeUnknown { reason } => ApiError::unavailable(
                "outcome_unknown",
                format!(
                    "the server failed after accepting the request ({reason}); some events may be counted: retry with the same Idempotency-Key"
                ),
            ),
            EngineError::TooManyTypes { event_type, max } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "too_many_event_types",
                format!(
                    "event type \"{event_type}\" would be new, and this server counts at most {max} event types \
                     (event_types_max); nothing was counted"
                ),
            )
            .with("limit", json!(max)),
            error @ EngineError::RecordTooLarge { max, .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "record_too_large",
                format!("{error}; nothing was counted"),
            )
            .with("limit_bytes", json!(max)),
            EngineError::InvalidPosition { reason } => ApiError::invalid_parameter("after", reason),
            EngineError::TooExpensive { reason } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "too_expensive", reason)
            }
            EngineError::IdempotencyConflict => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            ),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// The JSON body: `{"error", "message", …details}`.
    pub(crate) fn body(&self) -> Value {
        let mut body = json!({ "error": self.code, "message": self.message });
        body.as_object_mut().expect("object").extend(self.details.clone());
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
