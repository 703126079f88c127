//! One HTTP request to a tally server, over http or https (rustls), with a deadline, on a
//! pool of keep-alive connections. No retries here: `Api` decides what to try again.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::Error;

/// Idle keep-alive connections kept per server.
const IDLE_CONNECTIONS_MAX: usize = 256;

/// The server's answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value, Error> {
        serde_json::from_slice(&self.body)
            .map_err(|error| Error::Protocol(format!("the server answered {} with invalid JSON: {error}", self.status)))
    }

    /// The server's error, for display: status and body.
    pub fn error_text(&self) -> String {
        match self.json() {
            Ok(value) => format!("{} {}", self.status, value),
            Err(_) => format!("{} {}", self.status, String::from_utf8_lossy(&self.body)),
        }
    }

    /// `Retry-After`, in delta-seconds or as an HTTP date.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self.headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?.trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        let at = httpdate::parse_http_date(value).ok()?;
        Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
    }
}

#[derive(Clone)]
pub(crate) struct Transport {
    base: String,
    inner: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<String>,
    timeout: Duration,
    answer_bytes_max: usize,
}

impl Transport {
    pub(crate) fn new(config: &crate::ApiConfig) -> Result<Transport, Error> {
        let timeout = config.timeout;
        let (server, key, ca_pem) = (config.server.as_str(), config.key.as_deref(), config.ca_pem.as_deref());
        let base = server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Config(format!("server must be an http:// or https:// URL, got {server:?}")));
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(ca_pem)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner =
            HyperClient::builder(TokioExecutor::new()).pool_max_idle_per_host(IDLE_CONNECTIONS_MAX).build(connector);
        let authorization = key.filter(|key| !key.is_empty()).map(|key| format!("Bearer {key}"));
        Ok(Transport { base, inner, authorization, timeout, answer_bytes_max: config.answer_bytes_max })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// One attempt: the answer, whatever its status, or why there was none.
    pub(crate) async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, Error> {
        let mut request = Request::builder().method(method).uri(format!("{}{}", self.base, path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization);
        }
        let request = request.body(Full::new(body)).map_err(|error| Error::Config(error.to_string()))?;
        let exchange = async {
            let response = self.inner.request(request).await.map_err(|error| Error::Connection(error_chain(&error)))?;
            let (parts, body) = response.into_parts();
            let limited = http_body_util::Limited::new(body, self.answer_bytes_max);
            let body = limited.collect().await.map_err(|error| match error.downcast::<LengthLimitError>() {
                Ok(_) => Error::Protocol(format!("the answer is larger than {} bytes", self.answer_bytes_max)),
                Err(error) => Error::Connection(error_chain(&*error)),
            })?;
            let body = body.to_bytes();
            Ok(Answer { status: parts.status, headers: parts.headers, body })
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| Error::Timeout(self.timeout))?
    }
}

/// The system's trusted roots, plus `ca_pem`'s certificates (a private CA) if given.
fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(pem) = ca_pem {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|error| Error::Config(format!("CA certificate file: {error}")))?;
        if certificates.is_empty() {
            return Err(Error::Config("CA certificate file holds no PEM certificate".into()));
        }
        for certificate in certificates {
            roots.add(certificate).map_err(|error| Error::Config(format!("CA certificate: {error}")))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| Error::Config(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// An error with its causes, `a: b: c` (hyper's own message alone says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
