//! What a browser loads: the dashboard (`/`, with uPlot 1.6.32 vendored under
//! `assets/uplot/` with its MIT licence) and the beacon script pages include to count
//! their views. Assets are embedded in the binary (no build step, no CDN), served with an ETag (a repeat load is a 304) and gzipped for
//! clients that accept it.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file, with its gzip form and ETag made once.
struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    gzip: Vec<u8>,
    etag: HeaderValue,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static [u8]) -> Asset {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(body).expect("gzip into memory");
        let gzip = encoder.finish().expect("gzip into memory");
        // SipHash with fixed keys: the same bytes give the same tag in every process.
        let mut hasher = std::hash::DefaultHasher::new();
        body.hash(&mut hasher);
        let etag = HeaderValue::from_str(&format!("\"{:016x}\"", hasher.finish())).expect("hex is a header value");
        Asset { content_type, body, gzip, etag }
    }

    /// 304 when the client holds this version; gzip when it accepts it.
    fn serve(&self, request: &HeaderMap) -> Response {
        let cached = request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|tags| {
            let etag = self.etag.to_str().unwrap_or_default();
            tags.split(',').any(|tag| tag.trim().trim_start_matches("W/") == etag || tag.trim() == "*")
        });
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, self.etag.clone());
        // Five minutes: a new server version reaches pages that soon.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        if cached {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if accepts_gzip(request) {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            return (headers, self.gzip.clone()).into_response();
        }
        (headers, self.body).into_response()
    }
}

/// Whether `Accept-Encoding` lists gzip with a non-zero weight.
fn accepts_gzip(request: &HeaderMap) -> bool {
    let Some(accepted) = request.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()) else { return false };
    accepted.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let refused = parts.any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0));
        (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
    })
}

/// The beacon (`assets/tally.js`): batches a page's events and posts them here with
/// `navigator.sendBeacon`.
static TALLY_JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("text/javascript; charset=utf-8", include_bytes!("../assets/tally.js")));

pub(crate) async fn tally_js(headers: HeaderMap) -> Response {
    TALLY_JS.serve(&headers)
}

/// The dashboard: one page that reads the API with the key typed into it.
static DASHBOARD: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("text/html; charset=utf-8", include_bytes!("../assets/dashboard.html")));
static UPLOT_JS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("text/javascript; charset=utf-8", include_bytes!("../assets/uplot/uPlot.iife.min.js")));
static UPLOT_CSS: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("text/css; charset=utf-8", include_bytes!("../assets/uplot/uPlot.min.css")));

pub(crate) async fn dashboard(headers: HeaderMap) -> Response {
    DASHBOARD.serve(&headers)
}

pub(crate) async fn uplot_js(headers: HeaderMap) -> Response {
    UPLOT_JS.serve(&headers)
}

pub(crate) async fn uplot_css(headers: HeaderMap) -> Response {
    UPLOT_CSS.serve(&headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: header::HeaderName, value: &'static str) -> HeaderMap {
        HeaderMap::from_iter([(name, HeaderValue::from_static(value))])
    }

    #[test]
    fn gzip_is_sent_only_to_clients_that_accept_it() {
        assert!(accepts_gzip(&with(header::ACCEPT_ENCODING, "gzip, deflate, br")));
        assert!(accepts_gzip(&with(header::ACCEPT_ENCODING, "br;q=1.0, GZIP;q=0.5")));
        assert!(!accepts_gzip(&with(header::ACCEPT_ENCODING, "gzip;q=0, br")));
        assert!(!accepts_gzip(&with(header::ACCEPT_ENCODING, "identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn a_client_holding_the_version_gets_304_and_others_the_body() {
        let asset = Asset::new("text/plain", b"hello hello hello hello");
        let etag = asset.etag.to_str().unwrap().to_string();
        let fresh = asset.serve(&HeaderMap::new());
        assert_eq!(fresh.status(), StatusCode::OK);
        assert_eq!(fresh.headers()[header::ETAG], etag.as_str());
        let mut held = HeaderMap::new();
        held.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&format!("\"other\", W/{etag}")).unwrap());
        assert_eq!(asset.serve(&held).status(), StatusCode::NOT_MODIFIED);
        let stale = with(header::IF_NONE_MATCH, "\"0000\"");
        assert_eq!(asset.serve(&stale).status(), StatusCode::OK);
        let zipped = asset.serve(&with(header::ACCEPT_ENCODING, "gzip"));
        assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip");
    }
}
