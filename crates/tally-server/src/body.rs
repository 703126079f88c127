//! Reading a request body under three limits: its size (413 as soon as it is exceeded,
//! whatever was declared), a deadline for the whole body (408), and the server-wide budget
//! of body bytes held at once, charged by bytes actually received (503 once exhausted), so
//! a client that declares a large body and trickles it holds only what it sent.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ApiError;

/// A body read whole, and its share of the in-flight budget (returned when dropped).
pub(crate) struct ReadBody {
    pub(crate) bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body is over the limit of {limit} bytes"),
    )
    .with("limit_bytes", json!(limit))
}

fn over_budget() -> ApiError {
    ApiError::unavailable("overloaded", "too many request bodies in flight".into())
}

/// Reads `body` whole: at most `limit` bytes, within `deadline`, each chunk charged to
/// `budget` as it arrives.
pub(crate) async fn read(
    body: Body,
    limit: usize,
    deadline: Duration,
    budget: &Arc<Semaphore>,
) -> Result<ReadBody, ApiError> {
    let mut body = body;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let mut received = 0usize;
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body was not received within {} ms", deadline.as_millis()),
        )
    };
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => return Err(timed_out()),
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(ApiError::bad_request(
                    "body_unreadable",
                    format!("could not read the request body: {error}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(chunk) = frame.into_data() else { continue };
        if chunk.is_empty() {
            continue;
        }
        received += chunk.len();
        if received > limit {
            return Err(too_large(limit));
        }
        let charge = u32::try_from(chunk.len()).map_err(|_| too_large(limit))?;
        let more = Arc::clone(budget).try_acquire_many_owned(charge).map_err(|_| over_budget())?;
        match &mut permit {
            Some(permit) => permit.merge(more),
            None => permit = Some(more),
        }
        chunks.push(chunk);
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().expect("one chunk"),
        _ => {
            let mut whole = Vec::with_capacity(received);
            for chunk in &chunks {
                whole.extend_from_slice(chunk);
            }
            Bytes::from(whole)
        }
    };
    Ok(ReadBody { bytes, _budget: permit })
}
