//! Cross-origin requests from web pages (CORS), for the origins `cors_origins` allows
//! (`*`: any). A preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered
//! here, 204 for an allowed origin and 403 otherwise; every other answer to an allowed
//! origin carries `Access-Control-Allow-Origin`, and exposes `Retry-After` so a page can
//! honour it. An origin some API key is bound to (`tally keys create --origin`) is allowed
//! too, so a site's page key needs no server setting. Without either, pages of other
//! origins can still send beacons (`text/plain` needs no preflight) but cannot read the
//! answers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{ApiError, AppState, ErrorCode, auth};

/// How long a browser may cache a preflight answer, seconds.
const PREFLIGHT_MAX_AGE_SECONDS: &str = "600";
const ALLOWED_METHODS: &str = "GET, POST, OPTIONS";
const ALLOWED_HEADERS: &str = "content-type, content-encoding, idempotency-key, authorization";

/// The `Access-Control-Allow-Origin` value for a request's `Origin`, if it is allowed.
fn allowed(state: &AppState, headers: &HeaderMap) -> Option<HeaderValue> {
    let origins = &state.config.cors_origins;
    let origin = headers.get(header::ORIGIN)?;
    if origins.iter().any(|allowed| allowed == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let text = origin.to_str().ok()?;
    (auth::lists_origin(origins, text) || state.keys.bound_to(text)).then(|| origin.clone())
}

pub(crate) async fn cors(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let allow = allowed(&state, request.headers());
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let Some(allow) = allow else {
            return ApiError::new(ErrorCode::OriginNotAllowed, "this origin may not call the API").into_response();
        };
        let mut answer = StatusCode::NO_CONTENT.into_response();
        let headers = answer.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOWED_HEADERS));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECONDS));
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
        return answer;
    }
    let mut answer = next.run(request).await;
    if let Some(allow) = allow {
        let headers = answer.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("retry-after"));
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    answer
}
