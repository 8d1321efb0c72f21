//! What the client is built from: credentials, extra CAs, plain-HTTP registries, timeouts.

use std::time::Duration;

use kache_oci::credentials::DockerConfig;

/// How the client reaches upstream registries.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Global per-registry credentials; a request's own credentials take precedence.
    pub credentials: DockerConfig,
    /// Extra CA certificates (PEM), trusted beside the webpki roots.
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Registries (`host` or `host:port`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub connect_timeout: Duration,
    /// Time allowed until response headers, and between two reads of a body; a body as a
    /// whole may take longer.
    pub request_timeout: Duration,
    pub user_agent: String,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            credentials: DockerConfig::default(),
            extra_ca_pem: Vec::new(),
            insecure_registries: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            user_agent: concat!("kache/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}
