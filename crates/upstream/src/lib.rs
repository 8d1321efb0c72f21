//! The client kache fetches manifests and blobs from upstream registries with. The names,
//! references, routes and credentials it speaks are kache-oci's; this crate adds the HTTP.
//!
//! kache has its own thin client over reqwest rather than `oci-client`, because the cache needs
//! what a general-purpose client hides: bodies come back as streams handed straight to the
//! store's single-flight writer (never buffered whole); credentials are given per request (a
//! pod's pull secret) and never stored, only tokens are, keyed by a salted hash of them; and the
//! upstream's status and `Retry-After` reach kache's own clients unchanged. oci-client 0.18 uses
//! the same reqwest 0.13, so the binary would still hold one reqwest and one rustls, but it also
//! brings sha2 0.11 beside the workspace's 0.10, oci-spec, chrono and regex for little of this.
//!
//! Requests go out anonymously (or with Basic for a registry known to want it); a `401` is
//! answered once, with a bearer token from the challenge's realm or with Basic credentials.
//! Tokens are cached per registry, scope and credentials until shortly before they expire, so
//! the next request for the same repository carries one from the start.

mod auth;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt as _};
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, StatusCode};

use auth::{AuthCache, Challenge, DEFAULT_TOKEN_LIFETIME};
use kache_oci::api::{ErrorCode, Route};
use kache_oci::credentials::{self, Credentials, DockerConfig};
use kache_oci::digest::Digest;
use kache_oci::media_type::MANIFEST_TYPES;
use kache_oci::name::{Reference, RepoName};
use kache_oci::reference::{registry_endpoint, valid_registry};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The header registries put a content digest in.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Error and token bodies are read up to this size; anything longer is cut.
const SMALL_BODY_LIMIT: u64 = 1 << 20;

/// Upstream errors quote at most this much of what the upstream said.
const MESSAGE_LIMIT: usize = 512;

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

/// Why an upstream request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream refused the credentials: {0}")]
    Unauthorized(String),
    #[error("upstream denied access: {0}")]
    Denied(String),
    #[error("upstream has no such thing: {0}")]
    NotFound(String),
    #[error("upstream is rate-limiting{}: {message}", retry_after.as_ref().map(|r| format!(" (retry after {r})")).unwrap_or_default())]
    TooManyRequests {
        /// The upstream's `Retry-After`, as it was written.
        retry_after: Option<String>,
        message: String,
    },
    #[error("upstream answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("upstream unreachable: {0}")]
    Transport(String),
    #[error("upstream body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("upstream client configuration: {0}")]
    Config(String),
}

/// A repository path on an upstream, checked: it ends up in a URL, and nothing that could
/// change the URL's meaning may pass.
fn upstream_repository(repository: &str) -> Result<RepoName, UpstreamError> {
    repository
        .parse()
        .map_err(|e| UpstreamError::Config(format!("upstream repository: {e}")))
}

/// What kache answers its own client when an upstream failed it, in the spec's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAnswer {
    pub status: u16,
    pub code: ErrorCode,
    pub message: String,
    /// `WWW-Authenticate` with a 401 (every 401 carries a challenge, RFC 9110; the credentials
    /// that would help are kache's, not the client's) and the upstream's `Retry-After` with a
    /// 429.
    pub headers: Vec<(&'static str, String)>,
}

impl UpstreamError {
    /// The answer to a client for this failure; `unknown` is the code of a 404
    /// (`MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`).
    pub fn answer(&self, unknown: ErrorCode) -> UpstreamAnswer {
        let (status, code) = match self {
            UpstreamError::Unauthorized(_) => (401, ErrorCode::Unauthorized),
            UpstreamError::Denied(_) => (403, ErrorCode::Denied),
            UpstreamError::NotFound(_) => (404, unknown),
            UpstreamError::TooManyRequests { .. } => (429, ErrorCode::TooManyRequests),
            _ => (502, ErrorCode::Unavailable),
        };
        let mut headers = Vec::new();
        match self {
            UpstreamError::Unauthorized(_) => {
                headers.push(("www-authenticate", "Basic realm=\"kache\"".to_owned()));
            }
            UpstreamError::TooManyRequests {
                retry_after: Some(r),
                ..
            } => headers.push(("retry-after", r.clone())),
            _ => {}
        }
        UpstreamAnswer {
            status,
            code,
            message: format!("upstream: {self}"),
            headers,
        }
    }

    /// Whether the upstream is down or overloaded rather than saying no: the cases where
    /// serving a cached copy beats passing the error on.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Transport(_) | UpstreamError::TooManyRequests { .. } => true,
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A fetcher of manifests and blobs from upstream registries. Cheap to clone; clones share
/// connections and cached tokens.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    credentials: DockerConfig,
    insecure: HashSet<String>,
    request_timeout: Duration,
    auth: AuthCache,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("credentials", &self.inner.credentials)
            .field("insecure", &self.inner.insecure)
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

/// The TLS client configuration of every kache HTTP client: the Mozilla roots compiled in
/// (webpki-roots) plus `extra_ca_pem`, never the system's store, so that kache needs no CA
/// files in its image and trusts the same roots on every node.
pub fn tls_config(extra_ca_pem: &[Vec<u8>]) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for (i, pem) in extra_ca_pem.iter().enumerate() {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| UpstreamError::Config(format!("extra CA #{i} is not PEM: {e}")))?;
            roots.add(cert).map_err(|e| {
                UpstreamError::Config(format!("extra CA #{i} is not a usable certificate: {e}"))
            })?;
            found += 1;
        }
        if found == 0 {
            return Err(UpstreamError::Config(format!(
                "extra CA #{i} holds no PEM CERTIFICATE block"
            )));
        }
    }
    // The binary installs ring as the process default; a library user that did not still gets
    // ring rather than a panic.
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A `reqwest::Error` in words, its causes included (that is where "connection refused" and
/// certificate errors are), without the URL, which for a redirected blob may carry a
/// pre-signed query.
fn describe(host: &str, e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut msg = format!("{host}: {e}");
    let mut source = std::error::Error::source(&e);
    for _ in 0..8 {
        let Some(s) = source else { break };
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    if timeout && !msg.contains("timed out") {
        msg.push_str(" (timed out)");
    }
    msg
}

enum Auth {
    Basic(String, String),
    Bearer(String),
}

impl Upstream {
    /// A client for `cfg`. Fails only on unusable configuration (bad CA PEM).
    pub fn new(cfg: UpstreamConfig) -> Result<Self, UpstreamError> {
        let tls = tls_config(&cfg.extra_ca_pem)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .user_agent(cfg.user_agent)
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.request_timeout)
            // Blobs are commonly redirected to object storage or a CDN. reqwest drops
            // Authorization when a redirect changes scheme, host or port, so registry
            // credentials never reach those.
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| UpstreamError::Config(format!("HTTP client: {e}")))?;
        let insecure = cfg
            .insecure_registries
            .iter()
            .map(|r| credentials::registry_host(r))
            .collect();
        Ok(Upstream {
            inner: Arc::new(Inner {
                client,
                credentials: cfg.credentials,
                insecure,
                request_timeout: cfg.request_timeout,
                auth: AuthCache::default(),
            }),
        })
    }

    /// GET or HEAD of a manifest; `registry` as in references ("docker.io" → registry-1.docker.io).
    /// `reference` is a tag or a digest. Only a 2xx answer is `Ok`.
    pub async fn manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        head: bool,
        creds: Option<&Credentials>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let reference: Reference = reference
            .parse()
            .map_err(|e| UpstreamError::Config(format!("manifest reference: {e}")))?;
        let method = if head { Method::HEAD } else { Method::GET };
        let accept = MANIFEST_TYPES.join(", ");
        let route = Route::Manifest(upstream_repository(repository)?, reference);
        self.fetch(method, registry, &route, Some(&accept), creds)
            .await
    }

    /// GET of a blob, following redirects. Only a 2xx answer is `Ok`.
    pub async fn blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        creds: Option<&Credentials>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let route = Route::Blob(upstream_repository(repository)?, digest.clone());
        self.fetch(Method::GET, registry, &route, None, creds).await
    }

    async fn fetch(
        &self,
        method: Method,
        registry: &str,
        route: &Route,
        accept: Option<&str>,
        creds: Option<&Credentials>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let inner = &*self.inner;
        let repository = route.repo().map_or("", RepoName::as_str);
        // The registry ends up in the URL too: nothing that could change its meaning may pass.
        let registry_key = credentials::registry_host(registry);
        if !valid_registry(&registry_key) {
            return Err(UpstreamError::Config(format!(
                "upstream registry {registry:?} is not host or host:port"
            )));
        }
        let host = registry_endpoint(&registry_key).to_owned();
        let scheme = if inner.insecure.contains(&registry_key) || inner.insecure.contains(&host) {
            "http"
        } else {
            "https"
        };
        let url = reqwest::Url::parse(&format!("{scheme}://{host}{}", route.path()))
            .map_err(|e| UpstreamError::Config(format!("upstream URL for {registry:?}: {e}")))?;

        let stored;
        let creds = match creds {
            Some(c) => Some(c),
            None => {
                stored = inner.credentials.lookup(&registry_key);
                stored.as_ref()
            }
        };
        let scope = format!("repository:{repository}:pull");
        let key = inner.auth.key(&host, &scope, creds);

        let first_auth = match (inner.auth.token(&key), creds) {
            (Some(token), _) => Some(Auth::Bearer(token)),
            (None, Some(Credentials::Basic { username, password }))
                if inner.auth.wants_basic(&host) =>
            {
                Some(Auth::Basic(username.clone(), password.clone()))
            }
            _ => None,
        };
        let tried_basic = matches!(first_auth, Some(Auth::Basic(..)));
        let resp = self
            .send(
                &host,
                method.clone(),
                url.clone(),
                accept,
                first_auth.as_ref(),
            )
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return check(&host, resp).await;
        }

        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_challenges)
            .collect();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm.clone(), service.clone())),
            Challenge::Basic => None,
        });
        let retry_auth = match (bearer, creds) {
            (Some((realm, service)), _) => {
                inner.auth.forget_token(&key);
                let (token, expires_in) = self
                    .fetch_token(&host, &realm, service.as_deref(), &scope, creds)
                    .await?;
                inner.auth.store_token(key, token.clone(), expires_in);
                Auth::Bearer(token)
            }
            (None, Some(Credentials::Basic { username, password }))
                if !tried_basic && challenges.contains(&Challenge::Basic) =>
            {
                inner.auth.remember_basic(&host);
                Auth::Basic(username.clone(), password.clone())
            }
            // Nothing to answer the challenge with: the upstream's own words say why.
            _ => return check(&host, resp).await,
        };
        tracing::debug!(%host, repository, "retrying with credentials after 401");
        let resp = self
            .send(&host, method, url, accept, Some(&retry_auth))
            .await?;
        check(&host, resp).await
    }

    async fn send(
        &self,
        host: &str,
        method: Method,
        url: reqwest::Url,
        accept: Option<&str>,
        auth: Option<&Auth>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self.inner.client.request(method, url);
        if let Some(accept) = accept {
            req = req.header(ACCEPT, accept);
        }
        req = match auth {
            Some(Auth::Basic(u, p)) => req.basic_auth(u, Some(p)),
            Some(Auth::Bearer(t)) => req.bearer_auth(t),
            None => req,
        };
        self.send_request(host, req).await
    }

    async fn send_request(
        &self,
        host: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, req.send()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(UpstreamError::Transport(describe(host, e))),
            Err(_) => Err(UpstreamError::Transport(format!(
                "{host}: no response within {timeout:?}"
            ))),
        }
    }

    /// A bearer token from the challenge's realm, with the credentials if there are any.
    async fn fetch_token(
        &self,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<(String, Duration), UpstreamError> {
        let mut url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| UpstreamError::Status {
                status: 502,
                message: format!("{host}: token realm {realm:?} is not an http(s) URL"),
            })?;
        let realm_host = url.host_str().unwrap_or_default().to_owned();
        let req = match creds {
            Some(Credentials::IdentityToken(refresh)) => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh)
                    .append_pair("client_id", "kache")
                    .append_pair("scope", scope);
                if let Some(service) = service {
                    form.append_pair("service", service);
                }
                self.inner
                    .client
                    .post(url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.finish())
            }
            basic => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(service) = service {
                        q.append_pair("service", service);
                    }
                    q.append_pair("scope", scope);
                }
                let req = self.inner.client.get(url);
                match basic {
                    Some(Credentials::Basic { username, password }) => {
                        req.basic_auth(username, Some(password))
                    }
                    _ => req,
                }
            }
        };
        tracing::debug!(%host, %realm_host, scope, "fetching a registry token");
        let resp = self.send_request(&realm_host, req).await?;
        let body = check(&realm_host, resp)
            .await?
            .bytes_limited(SMALL_BODY_LIMIT)
            .await?;

        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let bad = |why: &str| UpstreamError::Status {
            status: 502,
            message: format!("{realm_host}: token response {why}"),
        };
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| bad(&format!("is not JSON: {e}")))?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| bad("holds no token"))?;
        let expires_in = match parsed.expires_in {
            Some(0) | None => DEFAULT_TOKEN_LIFETIME,
            Some(s) => Duration::from_secs(s),
        };
        Ok((token, expires_in))
    }
}

/// A successful upstream answer whose body has not been read yet.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: reqwest::Response,
    host: String,
}

impl UpstreamResponse {
    /// `Content-Type`, as the upstream wrote it (parameters included).
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE)?.to_str().ok()
    }

    /// `Docker-Content-Digest`, if present and valid.
    pub fn digest(&self) -> Option<Digest> {
        self.headers
            .get(DOCKER_CONTENT_DIGEST)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `Content-Length`, if present and valid (also on HEAD answers, which have no body).
    pub fn content_length(&self) -> Option<u64> {
        self.headers
            .get(CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The body as it arrives. A stall longer than the request timeout ends it with an error.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let host = self.host;
        self.body
            .bytes_stream()
            .map_err(move |e| UpstreamError::Transport(describe(&host, e)))
    }

    /// The whole body, refused with [`UpstreamError::TooLarge`] past `limit` bytes, for
    /// manifests and other small documents.
    pub async fn bytes_limited(mut self, limit: u64) -> Result<Bytes, UpstreamError> {
        if self.content_length().is_some_and(|len| len > limit) {
            return Err(UpstreamError::TooLarge(limit));
        }
        let mut buf = BytesMut::with_capacity(self.content_length().unwrap_or(0) as usize);
        // Each pass adds a chunk and the total is capped, so this ends with the body or the cap.
        while let Some(chunk) = self
            .body
            .chunk()
            .await
            .map_err(|e| UpstreamError::Transport(describe(&self.host, e)))?
        {
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(UpstreamError::TooLarge(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

/// `resp` as an [`UpstreamResponse`] when it is a success, else the error it stands for.
async fn check(host: &str, mut resp: reqwest::Response) -> Result<UpstreamResponse, UpstreamError> {
    let status = resp.status();
    if status.is_success() {
        let headers = std::mem::take(resp.headers_mut());
        return Ok(UpstreamResponse {
            status,
            headers,
            body: resp,
            host: host.to_owned(),
        });
    }
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let message = error_message(host, resp).await;
    Err(match status.as_u16() {
        401 => UpstreamError::Unauthorized(message),
        403 => UpstreamError::Denied(message),
        404 => UpstreamError::NotFound(message),
        429 => UpstreamError::TooManyRequests {
            retry_after,
            message,
        },
        s => UpstreamError::Status { status: s, message },
    })
}

/// What an error answer says: the OCI error messages, a token server's `details`, or the start
/// of the text; the status line when there is nothing to read.
async fn error_message(host: &str, mut resp: reqwest::Response) -> String {
    let status = resp.status();
    let mut body = Vec::new();
    let read = async {
        // Bounded by SMALL_BODY_LIMIT; the read timeout bounds each wait.
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() as u64 >= SMALL_BODY_LIMIT {
                break;
            }
        }
    };
    // A slow error body is not worth waiting for: the status says enough.
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let text = summarize(&body);
    if text.is_empty() {
        format!("{host}: {status}")
    } else {
        format!("{host}: {text}")
    }
}

fn summarize(body: &[u8]) -> String {
    /// What registries that do not speak the spec's errors send instead (token servers too).
    #[derive(serde::Deserialize)]
    struct Body {
        details: Option<String>,
        message: Option<String>,
        error: Option<serde_json::Value>,
        error_description: Option<String>,
    }
    let text = match (
        kache_oci::api::ErrorBody::parse(body),
        serde_json::from_slice::<Body>(body),
    ) {
        (Some(errors), _) => errors.summary(),
        (None, Ok(b)) => b
            .details
            .or(b.error_description)
            .or(b.message)
            .or(b.error.map(|e| match e {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            }))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        (None, Err(_)) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(MESSAGE_LIMIT) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_answer_in_the_spec_s_terms() {
        let a = UpstreamError::Unauthorized("no".into()).answer(ErrorCode::BlobUnknown);
        assert_eq!((a.status, a.code), (401, ErrorCode::Unauthorized));
        assert_eq!(
            a.headers,
            [("www-authenticate", "Basic realm=\"kache\"".to_owned())]
        );
        let a = UpstreamError::NotFound("gone".into()).answer(ErrorCode::ManifestUnknown);
        assert_eq!((a.status, a.code), (404, ErrorCode::ManifestUnknown));
        assert_eq!(a.message, "upstream: upstream has no such thing: gone");
        let limited = UpstreamError::TooManyRequests {
            retry_after: Some("30".into()),
            message: "slow".into(),
        };
        let a = limited.answer(ErrorCode::BlobUnknown);
        assert_eq!((a.status, a.code), (429, ErrorCode::TooManyRequests));
        assert_eq!(a.headers, [("retry-after", "30".to_owned())]);
        let a = UpstreamError::Denied("x".into()).answer(ErrorCode::BlobUnknown);
        assert_eq!((a.status, a.code), (403, ErrorCode::Denied));
        for e in [
            UpstreamError::Transport("reset".into()),
            UpstreamError::Status {
                status: 500,
                message: "oops".into(),
            },
            UpstreamError::TooLarge(1),
        ] {
            let a = e.answer(ErrorCode::BlobUnknown);
            assert_eq!((a.status, a.code), (502, ErrorCode::Unavailable), "{e}");
            assert!(a.headers.is_empty());
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            summarize(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#),
            "MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(
            summarize(br#"{"details":"incorrect username or password"}"#),
            "incorrect username or password"
        );
        assert_eq!(
            summarize(b"<html>\n  Bad\n gateway </html>"),
            "<html> Bad gateway </html>"
        );
        assert_eq!(summarize(b""), "");
        assert_eq!(summarize("é".repeat(600).as_bytes()).chars().count(), 515);
    }

    #[test]
    fn unavailable_is_down_or_overloaded() {
        let t = |s| UpstreamError::Status {
            status: s,
            message: String::new(),
        };
        assert!(t(500).is_unavailable() && t(503).is_unavailable());
        assert!(!t(400).is_unavailable());
        assert!(UpstreamError::Transport(String::new()).is_unavailable());
        assert!(
            UpstreamError::TooManyRequests {
                retry_after: None,
                message: String::new()
            }
            .is_unavailable()
        );
        assert!(!UpstreamError::NotFound(String::new()).is_unavailable());
        assert!(!UpstreamError::Unauthorized(String::new()).is_unavailable());
    }

    #[test]
    fn bad_ca_is_a_config_error() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for pem in [
            &b"not pem"[..],
            b"-----BEGIN CERTIFICATE-----\nzz\n-----END CERTIFICATE-----\n",
        ] {
            let err = Upstream::new(UpstreamConfig {
                extra_ca_pem: vec![pem.to_vec()],
                ..Default::default()
            })
            .unwrap_err();
            assert!(matches!(err, UpstreamError::Config(_)), "{err}");
        }
    }
}
