//! The error contract: every error answer, on every route and at every status, is
//! `{"error": "<code>", "message": "…", …details}` with `content-type: application/json`,
//! and `Retry-After` on 429 and 503. The codes are the `ErrorCode` table below and nothing
//! else: an `ApiError` is made from an `ErrorCode`, so the server cannot answer a code the
//! table (and the OpenAPI document's `Error` schema, checked against it) does not list.
//! Internal errors are logged, never shown.
//!
//! One code per kind of mistake, whatever the route: a query parameter and a JSON body
//! field are both a *field*, and a mistake in one names it in `field`. A `hint` says how to
//! fix a common slip (`hint.rs`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tally_engine::EngineError;

/// Declares `ErrorCode` from one table: variant, code, usual status, and what it means
/// (shown in the OpenAPI document and the README).
macro_rules! error_codes {
    ($($variant:ident = $code:literal, $status:ident, $description:literal;)*) => {
        /// Every `error` the API answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order of the table.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it appears in an answer's `error`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The status the code is answered with (`overloaded` is 503, not 429, when
            /// the request bodies in flight fill the server's budget for them).
            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }

            /// What the code means and which details come with it.
            pub fn description(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $description,)*
                }
            }
        }
    };
}

error_codes! {
    MalformedRequest = "malformed_request", BAD_REQUEST,
        "The request line or a header could not be parsed (answered by the connection layer; the connection is closed).";
    MalformedQuery = "malformed_query", BAD_REQUEST,
        "The query string does not decode: a `%` not followed by two hex digits, or bytes that are not UTF-8. `field` names the parameter whose value is at fault, when its name decodes.";
    UnknownField = "unknown_field", BAD_REQUEST,
        "A query parameter or JSON body field the route does not take. `field` names it; the message lists the ones allowed.";
    MissingField = "missing_field", BAD_REQUEST,
        "A required query parameter or JSON body field is absent. `field` names it.";
    DuplicateField = "duplicate_field", BAD_REQUEST,
        "A query parameter or JSON body field is given more than once. `field` names it.";
    InvalidField = "invalid_field", BAD_REQUEST,
        "A query parameter or JSON body field has a value that does not parse or breaks a rule. `field` names it; `index` is the position in an array field; `hint` may say how to fix a common slip (epoch seconds instead of milliseconds, a `+` that arrived as a space).";
    InvalidRange = "invalid_range", BAD_REQUEST,
        "`from` is after `to`, or local days cannot be built over the range. `hint` as for `invalid_field`.";
    MalformedJson = "malformed_json", BAD_REQUEST,
        "The body is not JSON, or not of the shape the route takes (an event object or an array of them; an object for POST /v1/counts). In an NDJSON body, `line` is the 1-based line at fault.";
    InvalidUtf8 = "invalid_utf8", BAD_REQUEST,
        "The body is not UTF-8.";
    InvalidGzip = "invalid_gzip", BAD_REQUEST,
        "A `Content-Encoding: gzip` body does not inflate.";
    BodyUnreadable = "body_unreadable", BAD_REQUEST,
        "The body could not be read from the connection (broken chunked encoding).";
    InvalidEvents = "invalid_events", BAD_REQUEST,
        "Events of a POST /v1/events batch break rules; nothing was counted. `errors` lists each bad field of each bad event as `{index, field, code, reason, hint?}` (`code`: `unknown_field`, `missing_field`, `duplicate_field` or `invalid_field`; at most `field_errors_max` listed), `error_count` counts them all.";
    InvalidIdempotencyKey = "invalid_idempotency_key", BAD_REQUEST,
        "The Idempotency-Key header is empty, longer than 128 bytes, or not visible ASCII.";
    TooManyVideoIds = "too_many_video_ids", BAD_REQUEST,
        "POST /v1/counts asks for more video ids than `counts_video_ids_max`. `field` is `video_ids`, `limit` the maximum.";
    TooManyPoints = "too_many_points", BAD_REQUEST,
        "A series would have more points than `series_points_max`. `limit` is the maximum; `hint` as for `invalid_field`.";
    KeyRequired = "key_required", UNAUTHORIZED,
        "The server requires an API key and none was given (with `WWW-Authenticate: Bearer`).";
    InvalidKey = "invalid_key", UNAUTHORIZED,
        "The API key given is not one the server knows: mistyped or revoked (with `WWW-Authenticate: Bearer`).";
    ScopeMissing = "scope_missing", FORBIDDEN,
        "The API key lacks the scope the route needs.";
    OriginNotAllowed = "origin_not_allowed", FORBIDDEN,
        "The request's `Origin` is not one the API key is bound to, or a preflight's origin may not call the API.";
    VideoNotAllowed = "video_not_allowed", FORBIDDEN,
        "The API key may not write a video id of the batch (it is bound to other prefixes); nothing was counted.";
    NotFound = "not_found", NOT_FOUND,
        "No route has this path.";
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED,
        "The route does not take this method.";
    BodyTimeout = "body_timeout", REQUEST_TIMEOUT,
        "The body did not arrive whole within `body_read_timeout_ms`, or stalled for 5 s.";
    RecomputeRefused = "recompute_refused", CONFLICT,
        "POST /v1/admin/recompute cannot prove the day from the archive: none is configured, the server is a cluster node (not built there), or it may lack events of the day (no file of a partition, archiving began later, files were purged, or a gap). The message says which; nothing was rewritten.";
    BodyTooLarge = "body_too_large", PAYLOAD_TOO_LARGE,
        "The body (declared, sent, or inflated from gzip) is over the limit; nothing was counted. `limit_bytes` is the limit.";
    TooManyEvents = "too_many_events", PAYLOAD_TOO_LARGE,
        "The batch holds more events than `events_per_request_max`; nothing was counted. `limit_events` is the limit.";
    TooManyEventsForKey = "too_many_events_for_key", PAYLOAD_TOO_LARGE,
        "The batch holds more events than the API key's second of burst; nothing was counted. `limit_events` is that burst.";
    RecordTooLarge = "record_too_large", PAYLOAD_TOO_LARGE,
        "In cluster mode, one partition's share of the batch is more than one log message holds; nothing was counted. `limit_bytes` is the limit.";
    UriTooLong = "uri_too_long", URI_TOO_LONG,
        "The request target is too long (answered by the connection layer).";
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE,
        "The body's `Content-Type` is not `application/json`, `application/x-ndjson` or `text/plain`.";
    UnsupportedContentEncoding = "unsupported_content_encoding", UNSUPPORTED_MEDIA_TYPE,
        "The body's `Content-Encoding` is not `gzip` or `identity`.";
    TooManyEventTypes = "too_many_event_types", UNPROCESSABLE_ENTITY,
        "The batch brings an event type past `event_types_max`; nothing was counted. `limit` is the maximum.";
    TooExpensive = "too_expensive", UNPROCESSABLE_ENTITY,
        "The query would read more than the server allows at once (an exact top over too many videos).";
    IdempotencyKeyReused = "idempotency_key_reused", UNPROCESSABLE_ENTITY,
        "The Idempotency-Key was used before with a different body; nothing was counted.";
    HeadersTooLarge = "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE,
        "The request head is over 64 KiB (answered by the connection layer).";
    RateLimited = "rate_limited", TOO_MANY_REQUESTS,
        "The API key's requests or events per second are spent; nothing was counted. `Retry-After` says when to retry.";
    Overloaded = "overloaded", TOO_MANY_REQUESTS,
        "The write queue or dedup memory is full, or a partition is writing a backlog to the store (429); or too many request bodies are in flight (503). Nothing was counted; retry after `Retry-After`.";
    Internal = "internal", INTERNAL_SERVER_ERROR,
        "An unexpected failure of the server; the details are in its log.";
    Recovering = "recovering", SERVICE_UNAVAILABLE,
        "The server is recovering its state after a start; retry after `Retry-After`.";
    Unavailable = "unavailable", SERVICE_UNAVAILABLE,
        "The server is stopping, has failed, or cannot reach its store or log; retry after `Retry-After`.";
    OutcomeUnknown = "outcome_unknown", SERVICE_UNAVAILABLE,
        "The server failed after accepting the request: some events may be counted. Retry with the same Idempotency-Key.";
    PositionNotReached = "position_not_reached", SERVICE_UNAVAILABLE,
        "A query's `after` position was not reached within `wait_ms`; retry.";
    ConnectionsExhausted = "connections_exhausted", SERVICE_UNAVAILABLE,
        "The server is at its connection limit (health checks still answer); retry shortly or reuse a connection.";
    DiskFull = "disk_full", INSUFFICIENT_STORAGE,
        "The disk is too full to take more writes; nothing was counted. Reads go on; retry after `Retry-After`.";
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
    pub retry_after_s: Option<u32>,
}

/// Seconds a client should wait after an overload answer.
const OVERLOAD_RETRY_AFTER_S: u32 = 1;
/// Seconds a client should wait while the server recovers or stops.
const UNAVAILABLE_RETRY_AFTER_S: u32 = 5;
/// Characters of a client's field name repeated in an error.
const FIELD_NAME_SHOWN_MAX: usize = 64;

impl ApiError {
    /// An error answered with its code's status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { status: code.status(), code, message: message.into(), details: Map::new(), retry_after_s: None }
    }

    /// An error of one query parameter or body field, named in `field`.
    pub fn field(code: ErrorCode, field: &str, message: impl Into<String>) -> ApiError {
        let field: String = field.chars().take(FIELD_NAME_SHOWN_MAX).collect();
        ApiError::new(code, message).with("field", json!(field))
    }

    /// 400 `unknown_field`: `what` (parameter, field) `name` is not one of `allowed`.
    pub fn unknown_field(what: &str, name: &str, allowed: &[&str]) -> ApiError {
        let shown: String = name.chars().take(FIELD_NAME_SHOWN_MAX).collect();
        let message = format!("unknown {what} \"{shown}\"; allowed: {}", allowed.join(", "));
        ApiError::field(ErrorCode::UnknownField, name, message)
    }

    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "no such route; see /v1/openapi.json")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take that method; see /v1/openapi.json")
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: ErrorCode, message: String) -> ApiError {
        ApiError::new(code, message).with_status(StatusCode::SERVICE_UNAVAILABLE).retry_after(UNAVAILABLE_RETRY_AFTER_S)
    }

    /// A failure of the server itself: logged, shown only as "internal".
    pub fn internal(detail: String) -> ApiError {
        tracing::error!(%detail, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error; see the server log")
    }

    /// Adds a detail beside `error` and `message` (which it may not replace).
    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        debug_assert!(key != "error" && key != "message", "a detail may not replace {key}");
        self.details.insert(key.into(), value);
        self
    }

    /// Adds a `hint`, if there is one.
    pub fn with_hint(self, hint: Option<String>) -> ApiError {
        match hint {
            Some(hint) => self.with("hint", json!(hint)),
            None => self,
        }
    }

    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after_s = Some(seconds);
        self
    }

    /// Answers with another status than the code's usual one: only `overloaded` (503 for
    /// bodies in flight) and the 503 codes do.
    fn with_status(mut self, status: StatusCode) -> ApiError {
        assert!(
            status == self.code.status()
                || (self.code == ErrorCode::Overloaded && status == StatusCode::SERVICE_UNAVAILABLE),
            "{} is never answered with {status}",
            self.code.as_str()
        );
        self.status = status;
        self
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Overloaded { reason } => {
                ApiError::new(ErrorCode::Overloaded, reason).retry_after(OVERLOAD_RETRY_AFTER_S)
            }
            EngineError::Unavailable { reason } => ApiError::unavailable(ErrorCode::Unavailable, reason),
            EngineError::DiskFull { reason } => {
                ApiError::new(ErrorCode::DiskFull, reason).retry_after(UNAVAILABLE_RETRY_AFTER_S)
            }
            EngineError::OutcomeUnknown { reason } => ApiError::unavailable(
                ErrorCode::OutcomeUnknown,
                format!(
                    "the server failed after accepting the request ({reason}); some events may be counted: retry with the same Idempotency-Key"
                ),
            ),
            EngineError::TooManyTypes { event_type, max } => ApiError::new(
                ErrorCode::TooManyEventTypes,
                format!(
                    "event type \"{event_type}\" would be new, and this server counts at most {max} event types \
                     (event_types_max); nothing was counted"
                ),
            )
            .with("limit", json!(max)),
            error @ EngineError::RecordTooLarge { max, .. } => {
                ApiError::new(ErrorCode::RecordTooLarge, format!("{error}; nothing was counted"))
                    .with("limit_bytes", json!(max))
            }
            EngineError::InvalidPosition { reason } => ApiError::field(ErrorCode::InvalidField, "after", reason),
            EngineError::TooExpensive { reason } => ApiError::new(ErrorCode::TooExpensive, reason),
            EngineError::Recompute { reason } => ApiError::new(ErrorCode::RecomputeRefused, reason),
            EngineError::IdempotencyConflict => ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was already used with a different request body",
            ),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl ApiError {
    /// The JSON body: `{"error", "message", …details}`.
    pub(crate) fn body(&self) -> Value {
        let mut body = json!({ "error": self.code.as_str(), "message": self.message });
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn codes_are_distinct_snake_case_errors_with_a_meaning() {
        let names: BTreeSet<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "a code is listed twice");
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}");
            assert!(code.status().is_client_error() || code.status().is_server_error(), "{name}");
            assert!(code.description().ends_with('.') && code.description().len() > 20, "{name}");
        }
    }

    /// The OpenAPI document's `Error.error` enum is exactly the codes the server can answer
    /// (both ways), each described as the table describes it.
    #[test]
    fn the_openapi_error_enum_is_exactly_the_codes() {
        let spec: Value = serde_json::from_str(crate::monitoring::OPENAPI_JSON).expect("openapi.json parses");
        let error = &spec["components"]["schemas"]["Error"]["properties"]["error"];
        let documented: BTreeSet<&str> =
            error["enum"].as_array().expect("an enum").iter().map(|code| code.as_str().expect("a string")).collect();
        let emitted: BTreeSet<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        let undocumented: Vec<_> = emitted.difference(&documented).collect();
        let never_emitted: Vec<_> = documented.difference(&emitted).collect();
        assert!(undocumented.is_empty(), "codes missing from openapi.json: {undocumented:?}");
        assert!(never_emitted.is_empty(), "openapi.json lists codes the server never answers: {never_emitted:?}");
        let descriptions = error["x-enum-descriptions"].as_object().expect("x-enum-descriptions");
        assert_eq!(descriptions.len(), ErrorCode::ALL.len());
        for code in ErrorCode::ALL {
            assert_eq!(descriptions[code.as_str()], code.description(), "description of {}", code.as_str());
        }
        // The per-event codes of an invalid_events answer are codes too.
        let field_error = &spec["components"]["schemas"]["FieldError"]["properties"]["code"]["enum"];
        for code in field_error.as_array().expect("an enum") {
            assert!(emitted.contains(code.as_str().unwrap()), "{code}");
        }
    }

    /// The README's table of error codes lists every code with its status.
    #[test]
    fn the_readme_lists_every_code_with_its_status() {
        let readme = include_str!("../../../README.md");
        for code in ErrorCode::ALL {
            let row = format!("| `{}` | {} |", code.as_str(), code.status().as_u16());
            assert!(readme.contains(&row), "README.md has no row starting {row}");
        }
    }

    #[tokio::test]
    async fn an_error_answers_json_with_its_code_message_and_details() {
        let error = ApiError::field(ErrorCode::InvalidField, "from", "from is wrong")
            .with_hint(Some("try this".into()))
            .with_hint(None);
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 10).await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            body,
            json!({"error": "invalid_field", "message": "from is wrong", "field": "from", "hint": "try this"})
        );
        let busy = ApiError::unavailable(ErrorCode::Overloaded, "too many bodies".into()).into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "5");
    }

    #[test]
    #[should_panic(expected = "never answered with")]
    fn a_code_keeps_to_its_status() {
        let _ = ApiError::unavailable(ErrorCode::InvalidField, "no".into());
    }
}
