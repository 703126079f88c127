//! The client subcommands' connection to a server: `tally-client`'s `Api` (timeouts,
//! retries with backoff and full jitter after `Retry-After`, a circuit breaker, https),
//! with the key from `--key` or `TALLY_KEY` and a private CA from `TALLY_CA_FILE`.

use anyhow::Context;
pub use tally_client::Api;
pub use tally_client::ApiConfig;

/// Attempts for a query (`get_json`, `post_json`).
pub const QUERY_ATTEMPTS: u32 = 3;

/// An `Api` for `server` that tries each request up to `attempts` times.
pub fn api(server: &str, key: Option<&str>, attempts: u32) -> anyhow::Result<Api> {
    Ok(Api::new(api_config(server, key, attempts)?)?)
}

/// The settings `api` uses, for a caller that changes some (a longer timeout).
pub fn api_config(server: &str, key: Option<&str>, attempts: u32) -> anyhow::Result<ApiConfig> {
    let mut config = ApiConfig::new(server);
    config.key = key.map(str::to_owned).or_else(|| std::env::var("TALLY_KEY").ok().filter(|key| !key.is_empty()));
    if let Some(path) = std::env::var_os("TALLY_CA_FILE") {
        config.ca_pem = Some(std::fs::read(&path).with_context(|| format!("TALLY_CA_FILE {}", path.display()))?);
    }
    config.retry.attempts = attempts;
    Ok(config)
}

/// Percent-encodes a query parameter value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}
