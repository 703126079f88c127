//! Reading a request body under four limits: its size (413 as soon as it is exceeded,
//! whatever was declared), a deadline for the whole body and a shorter one for each chunk
//! (408), and the server-wide budget of body bytes held at once, charged by bytes actually
//! received (503 once exhausted), so a client that declares a large body and trickles it
//! holds only what it sent. Each chunk is copied out of hyper's read buffer at once: a
//! chunk of one byte must not keep a whole buffer alive while the budget counts one byte.
//!
//! A gzip body (`Content-Encoding: gzip`) is read under the same limits, then inflated
//! under them again: at most the body limit decoded (413 past it, so a decompression bomb
//! counts nothing), each piece charged to the budget as it is produced.

use std::sync::Arc;
use std::time::Duration;

use std::io::Read;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{ApiError, ErrorCode};

/// A body read whole, and its share of the in-flight budget (returned when dropped).
pub(crate) struct ReadBody {
    pub(crate) bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Longest wait for the next chunk of a body, so a body sent fast and then stalled does not
/// hold its bytes of the budget for the whole body deadline.
const BODY_STALL_MAX: Duration = Duration::from_secs(5);

pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::BodyTooLarge, format!("request body is over the limit of {limit} bytes"))
        .with("limit_bytes", json!(limit))
}

fn over_budget() -> ApiError {
    ApiError::unavailable(ErrorCode::Overloaded, "too many request bodies in flight".into())
}

/// Adds `bytes` to what `permit` holds of the in-flight budget; 503 once it is spent.
fn charge(permit: &mut Option<OwnedSemaphorePermit>, budget: &Arc<Semaphore>, bytes: u32) -> Result<(), ApiError> {
    let more = Arc::clone(budget).try_acquire_many_owned(bytes).map_err(|_| over_budget())?;
    match permit {
        Some(permit) => permit.merge(more),
        None => *permit = Some(more),
    }
    Ok(())
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
    let mut bytes: Vec<u8> = Vec::new();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let timed_out = |what: &str, after: Duration| {
        ApiError::new(ErrorCode::BodyTimeout, format!("the request body {what} within {} ms", after.as_millis()))
    };
    let until = tokio::time::Instant::now() + deadline;
    let stall = deadline.min(BODY_STALL_MAX);
    loop {
        let next = tokio::time::Instant::now() + stall;
        let frame = match tokio::time::timeout_at(until.min(next), body.frame()).await {
            Err(_) if next < until => return Err(timed_out("made no progress", stall)),
            Err(_) => return Err(timed_out("was not received whole", deadline)),
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(ApiError::new(
                    ErrorCode::BodyUnreadable,
                    format!("could not read the request body: {error}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(chunk) = frame.into_data() else { continue };
        if chunk.is_empty() {
            continue;
        }
        if bytes.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        let bytes_charged = u32::try_from(chunk.len()).map_err(|_| too_large(limit))?;
        charge(&mut permit, budget, bytes_charged)?;
        bytes.extend_from_slice(&chunk);
    }
    let bytes = Bytes::from(bytes);
    Ok(ReadBody { bytes, _budget: permit })
}

/// How a body is encoded on the wire (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
}

/// The body's `Content-Encoding`: none (or `identity`) or `gzip`; anything else is 415.
pub(crate) fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else { return Ok(Encoding::Identity) };
    let text = value.to_str().unwrap_or("(not ASCII)").trim();
    match text.to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        _ => Err(ApiError::new(
            ErrorCode::UnsupportedContentEncoding,
            format!(
                "content encoding {:?} is not supported; use gzip or none",
                text.chars().take(50).collect::<String>()
            ),
        )),
    }
}

/// Bytes inflated between two charges to the budget.
const INFLATE_PIECE_BYTES: usize = 64 << 10;

/// Inflates a gzip body: at most `limit` bytes out (413 past it), each piece charged to
/// `budget`. The compressed bytes are let go once the body is inflated.
pub(crate) fn gunzip(body: ReadBody, limit: usize, budget: &Arc<Semaphore>) -> Result<ReadBody, ApiError> {
    let mut decoder = flate2::read::MultiGzDecoder::new(&body.bytes[..]);
    let mut bytes: Vec<u8> = Vec::new();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let mut piece = vec![0u8; INFLATE_PIECE_BYTES];
    loop {
        let read = decoder.read(&mut piece).map_err(|error| {
            ApiError::new(ErrorCode::InvalidGzip, format!("the gzip request body does not inflate: {error}"))
        })?;
        if read == 0 {
            break;
        }
        if bytes.len() + read > limit {
            return Err(ApiError::new(
                ErrorCode::BodyTooLarge,
                format!("request body inflates past the limit of {limit} bytes"),
            )
            .with("limit_bytes", json!(limit)));
        }
        charge(&mut permit, budget, read as u32)?;
        bytes.extend_from_slice(&piece[..read]);
    }
    Ok(ReadBody { bytes: Bytes::from(bytes), _budget: permit })
}
