//! The node proxy: what the kubelet talks to on `localhost:7439`.
//!
//! Every pull goes to the kache registry first. When the registry cannot be reached, times out
//! or answers 5xx, the proxy goes straight to the upstream registry the repository names, so a
//! broken cache never stops a pod from starting. A registry 4xx (an image the upstream does
//! not have, a bad request) is the answer and is passed on as it is. Bodies are streamed both
//! ways, never buffered; nothing on the request path calls the Kubernetes API.
//!
//! A proxy in front of a registry that holds a blob (served here on 127.0.0.1):
//!
//! ```
//! use axum::body::Body;
//! use http::Request;
//! use http_body_util::BodyExt;
//! use kache_http::ServerKind;
//! use kache_upstream::{Upstream, UpstreamConfig};
//! use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
//! use tower::ServiceExt;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! # let _ = rustls::crypto::ring::default_provider().install_default();
//! let dir = tempfile::tempdir().unwrap();
//! let mut prom = prometheus_client::registry::Registry::default();
//! let metrics = kache_registry::Metrics::new(&mut prom);
//! let (registry, _) = kache_registry::Registry::open(dir.path(), metrics, None).await.unwrap();
//! let digest = kache_oci::Digest::sha256(b"a layer");
//! let push = Request::post(format!("/v2/docker.io/library/demo/blobs/uploads/?digest={digest}"))
//!     .body(Body::from("a layer"))
//!     .unwrap();
//! registry.router().oneshot(push).await.unwrap();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let url = format!("http://{}", listener.local_addr().unwrap());
//! let app = registry.router();
//! tokio::spawn(kache_registry::serve(app, listener, ServerKind::Kache, std::future::pending()));
//!
//! let proxy = Proxy::new(
//!     ProxyConfig {
//!         registry: url.parse().unwrap(),
//!         registry_timeout: std::time::Duration::from_secs(5),
//!         private_images: false,
//!     },
//!     Upstream::new(UpstreamConfig::default()).unwrap(),
//!     ProxyMetrics::new(&mut prom),
//! );
//! // What the kubelet asks for localhost:7439/docker.io/library/demo: the registry has it.
//! let pull = Request::get(format!("/v2/docker.io/library/demo/blobs/{digest}"))
//!     .body(Body::empty())
//!     .unwrap();
//! let answer = proxy.router().oneshot(pull).await.unwrap();
//! assert_eq!(answer.status(), http::StatusCode::OK);
//! assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), "a layer");
//! # });
//! ```

mod metrics;
#[cfg(target_os = "linux")]
mod splice;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kache_oci::distribution::{ErrorCode, Intent, Route};
use kache_upstream::{Upstream, UpstreamError, UpstreamResponse};
use kache_wire::pull_token::{self, TOKEN_PATH};
use kache_wire::{CACHE_HEADER, CacheOutcome};

pub use metrics::ProxyMetrics;

/// Headers of a registry answer worth passing on (hop-by-hop ones are not).
const PASSED_HEADERS: [&str; 14] = [
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "docker-content-digest",
    "docker-distribution-api-version",
    "etag",
    "retry-after",
    "www-authenticate",
    // A tag list's or catalog's next page, and the referrers API's answers.
    "link",
    "oci-filters-applied",
    "oci-subject",
    CACHE_HEADER,
    kache_wire::FAILURE_HEADER,
];

/// Request headers worth forwarding.
const FORWARDED_HEADERS: [&str; 4] = ["accept", "range", "if-none-match", "user-agent"];

/// hyper's read buffer per registry connection. Its default (~400 KiB) fills up when the registry
/// sends faster than the kubelet reads; at 32 connections that was most of the RSS over the
/// memory budget (BENCHMARKS.md, finding 3). reqwest has no setting for it.
const MAX_BUF: usize = 128 * 1024;

/// How the proxy reaches the registry.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Base URL of the registry Service, e.g. `http://kache-registry.kache:5000`. Plain HTTP:
    /// the registry is in the cluster.
    pub registry: RegistryUrl,
    /// Longest wait for the registry's response headers before falling back upstream.
    pub registry_timeout: Duration,
    /// The registry scopes private images: the `/v2/` ping challenges a client without
    /// credentials (containers/image asks for them only then), and private images that the
    /// registry cannot serve fail closed.
    pub private_images: bool,
}

/// The proxy service; cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ProxyConfig,
    client: Client<HttpConnector, Empty<Bytes>>,
    upstream: Upstream,
    metrics: ProxyMetrics,
    /// The registry for blob bodies spliced by the proxy's own server.
    #[cfg(target_os = "linux")]
    raw: splice::RawRegistry,
}

impl Proxy {
    pub fn new(config: ProxyConfig, upstream: Upstream, metrics: ProxyMetrics) -> Self {
        // No HTTP(S)_PROXY (the registry is in-cluster) and no redirects: a plain connector.
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.registry_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            // Without a timer the idle timeout is never applied.
            .pool_timer(TokioTimer::new())
            .http1_max_buf_size(MAX_BUF)
            .build(connector);
        #[cfg(target_os = "linux")]
        let raw = splice::RawRegistry::new(config.registry.clone(), config.registry_timeout);
        Proxy {
            inner: Arc::new(Inner {
                config,
                client,
                upstream,
                metrics,
                #[cfg(target_os = "linux")]
                raw,
            }),
        }
    }

    /// The proxy as an axum router, for any server (hyper's relays every body through user
    /// space).
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// The proxy role: serves every listener (the node's IPv4 and IPv6 loopback) until
    /// `shutdown`, the answers in progress included.
    pub async fn run(
        self,
        listeners: Vec<tokio::net::TcpListener>,
        kind: kache_http::ServerKind,
        shutdown: kache_http::Shutdown,
    ) -> std::io::Result<()> {
        let mut servers = kache_http::Servers::default();
        for l in listeners {
            servers.spawn(
                "proxy",
                self.clone().serve(l, kind, shutdown.clone().wait()),
            );
        }
        servers.first_end().await
    }

    /// Serves the proxy on `listener` with the server asked for. kache's own (h2c goes to
    /// hyper) splices warm blob bodies from the registry's socket to the client's without
    /// copying them through user space (on Linux). When `shutdown` resolves it stops accepting,
    /// closes idle connections and returns once the requests in progress are answered.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        kind: kache_http::ServerKind,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        // Pulls send no body; containerd's token request (a password grant, POSTed) does, and
        // its connection goes to hyper, which reads it.
        let server = kache_http::Server::new(self.router())
            .kind(kind)
            .bodies(kache_http::Bodies::Hyper);
        #[cfg(target_os = "linux")]
        let server = server.intercept(self.clone());
        server.serve(listener, shutdown).await
    }
}

/// The kache registry's base URL as the proxy reaches it, parsed once:
/// `http://<host>[:<port>][/<base path>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// `host:port` to connect to.
    pub(crate) addr: String,
    /// The authority as written, for the `Host` header.
    pub(crate) host: String,
    /// The path requests go under, without its trailing `/` (usually empty).
    pub(crate) base: String,
}

impl RegistryUrl {
    /// The URL of a request's path and query on the registry.
    pub(crate) fn join(&self, path_and_query: &str) -> String {
        format!("http://{}{}{path_and_query}", self.host, self.base)
    }
}

impl std::str::FromStr for RegistryUrl {
    type Err = BadRegistryUrl;

    fn from_str(url: &str) -> Result<Self, BadRegistryUrl> {
        let bad = || BadRegistryUrl(url.to_owned());
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let authority = uri.authority().filter(|_| uri.scheme_str() == Some("http"));
        let authority = authority.ok_or_else(bad)?;
        if uri.query().is_some() {
            return Err(bad());
        }
        Ok(RegistryUrl {
            addr: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            host: authority.as_str().to_owned(),
            base: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl std::fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.join(""))
    }
}

/// The registry URL is not an `http://` URL with a host (and no query).
#[derive(Debug)]
pub struct BadRegistryUrl(String);

impl std::fmt::Display for BadRegistryUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the registry URL {:?} is not an http:// URL with a host",
            self.0
        )
    }
}

impl std::error::Error for BadRegistryUrl {}

/// An OCI error answer (the one kache's server writes for a bad request head).
pub(crate) use kache_http::oci_error as error;

/// The client's answer for an upstream failure; `unknown` is the code of a 404.
fn upstream_error(e: &UpstreamError, unknown: ErrorCode) -> Response {
    let a = e.answer(unknown);
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = error(status, a.code, a.message);
    for (name, value) in a.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

/// What a pull asks for, once checked: everything the registry and the fallback need, with
/// nothing of the client's request held across awaits.
#[derive(Debug)]
pub(crate) struct Pull {
    pub(crate) method: Method,
    pub(crate) path: String,
    /// Path and query, as forwarded to the registry.
    pub(crate) pq: String,
    pub(crate) route: Route,
    /// The forwarded request headers.
    pub(crate) headers: HeaderMap,
    /// The upstream registry and path the repository names, if any.
    pub(crate) origin: Option<kache_oci::Origin>,
    /// The upstream label of the metrics.
    pub(crate) host: String,
    /// The address the client used, for the realm of a challenge.
    pub(crate) client_host: String,
}

impl Pull {
    /// Checks a request; Err is the answer when it is not a pull to pass on (other methods,
    /// the `/v2/` ping, bad paths).
    pub(crate) fn from_parts(
        method: &Method,
        uri: &http::Uri,
        from: &HeaderMap,
        private_images: bool,
    ) -> Result<Pull, Box<Response>> {
        let client_host = client_host(from);
        if uri.path() == TOKEN_PATH {
            // Answered by the router, which reads the body of containerd's POST.
            return Err(Box::new(StatusCode::NOT_FOUND.into_response()));
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(Box::new(error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                "the node proxy only serves pulls",
            )));
        }
        let path = uri.path().to_owned();
        if path == "/v2/" || path == "/v2" {
            // The kubelet's ping: answered here, so it never depends on the registry.
            if private_images && !from.contains_key(http::header::AUTHORIZATION) {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "credentials are asked for: a pull token, or the anonymous one",
                );
                set_challenge(r.headers_mut(), &client_host, None);
                return Err(Box::new(r));
            }
            return Err(Box::new(
                (
                    StatusCode::OK,
                    [("docker-distribution-api-version", "registry/2.0")],
                )
                    .into_response(),
            ));
        }
        let route = match Route::parse_request(&path, uri.query()) {
            Ok(r) => r,
            Err(e) => {
                // Only reads get this far.
                return Err(Box::new(error(
                    StatusCode::from_u16(e.status(Intent::Read)).unwrap_or(StatusCode::NOT_FOUND),
                    e.code(Intent::Read),
                    e,
                )));
            }
        };
        let pq = uri
            .path_and_query()
            .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
        let mut headers = HeaderMap::new();
        for name in FORWARDED_HEADERS {
            if let Some(v) = from.get(name) {
                headers.insert(name, v.clone());
            }
        }
        // A pull token goes to the registry, which checks it; nothing else a client sends as
        // credentials leaves the node, and the upstream never sees any of it.
        if let Some(v) = from.get(http::header::AUTHORIZATION)
            && v.to_str()
                .ok()
                .and_then(pull_token::from_authorization)
                .is_some_and(|t| pull_token::Token::parse(&t).is_ok())
        {
            headers.insert(http::header::AUTHORIZATION, v.clone());
        }
        // A mirror request's route is already about the cache repository it names.
        let origin = route.repo().and_then(kache_oci::Origin::of);
        let host = origin
            .as_ref()
            .map_or("none", kache_oci::Origin::registry)
            .to_owned();
        Ok(Pull {
            method: method.clone(),
            path,
            pq,
            route,
            headers,
            origin,
            host,
            client_host,
        })
    }
}

/// The metrics' name for how the registry served an answer, from its [`CACHE_HEADER`]
/// (`registry` when it says nothing: an error, an upload, a plain repository).
pub(crate) fn cache_result(headers: &HeaderMap) -> &'static str {
    headers
        .get(CACHE_HEADER)
        .and_then(|v| CacheOutcome::parse(v.to_str().ok()?))
        .map_or("registry", CacheOutcome::as_str)
}

async fn handle(State(p): State<Proxy>, req: Request) -> Response {
    if req.uri().path() == TOKEN_PATH {
        return token(req).await;
    }
    let private_images = p.inner.config.private_images;
    let pull = match Pull::from_parts(req.method(), req.uri(), req.headers(), private_images) {
        Ok(pull) => pull,
        Err(answer) => return *answer,
    };
    drop(req);
    let m = &p.inner.metrics;
    match forward(&p, pull.method.clone(), &pull.pq, pull.headers.clone()).await {
        Ok(resp) if !resp.status().is_server_error() => {
            m.count(&pull.host, cache_result(resp.headers()));
            return relay(resp, m, &pull.client_host);
        }
        // The registry asked the upstream and it failed, or sent what the registry refused:
        // asking it again from here would fail the same way, or relay those very bytes.
        Ok(resp) if upstream_failed(resp.headers()) => {
            m.count(&pull.host, "error");
            return relay(resp, m, &pull.client_host);
        }
        Ok(resp) => {
            tracing::warn!(path = %pull.path, status = resp.status().as_u16(), "registry failed; going upstream")
        }
        Err(e) => {
            tracing::warn!(path = %pull.path, error = %e, "registry unreachable; going upstream")
        }
    }
    fallback(&p, &pull).await
}

/// Whether a registry answer says the upstream failed it ([`kache_wire::FAILURE_HEADER`]).
pub(crate) fn upstream_failed(headers: &HeaderMap) -> bool {
    kache_wire::upstream_failed(
        headers
            .get(kache_wire::FAILURE_HEADER)
            .and_then(|v| v.to_str().ok()),
    )
}

/// The registry could not answer: the upstream the repository names, straight, held to the
/// rules the registry holds it to (kache-upstream's checks): a manifest is answered only once
/// it verified, a blob's last bytes only once the whole of it did.
pub(crate) async fn fallback(p: &Proxy, pull: &Pull) -> Response {
    let m = &p.inner.metrics;
    let host = &pull.host;
    let path = &pull.path;
    let Some(origin) = &pull.origin else {
        m.count(host, "error");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the kache registry is unavailable and this repository names no upstream registry",
        );
    };
    let head = pull.method == Method::HEAD;
    let up = &p.inner.upstream;
    let answer = match &pull.route {
        Route::Manifest(_, reference) => {
            let got = up.manifest(origin, reference, head, None).await;
            match got {
                Ok(resp) if head => head_of_manifest(resp),
                Ok(resp) => manifest_answer(resp, reference).await,
                Err(e) => Err(e),
            }
            .map_err(|e| (e, ErrorCode::ManifestUnknown))
        }
        Route::Blob(_, digest) => up
            .blob(origin, digest, None)
            .await
            .map(|resp| blob_answer(resp, digest, head, m))
            .map_err(|e| (e, ErrorCode::BlobUnknown)),
        _ => {
            m.count(host, "error");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the kache registry is unavailable",
            );
        }
    };
    match answer {
        Ok(resp) => {
            m.count(host, "fallback");
            resp
        }
        Err((e, unknown)) => {
            m.count(host, "error");
            m.upstream_error(host);
            tracing::warn!(%path, upstream = %origin.registry(), error = %e, "upstream failed too");
            let mut resp = upstream_error(&e, unknown);
            // An image the upstream keeps to those with credentials: the client's are kache's,
            // which the upstream must never see; the challenge points back here, and the
            // registry, once back, decides.
            if resp.status() == StatusCode::UNAUTHORIZED {
                let repo = pull.route.repo().map(|r| r.to_string());
                set_challenge(resp.headers_mut(), &pull.client_host, repo.as_deref());
            }
            resp
        }
    }
}

/// A manifest's HEAD from the upstream: its headers, refused when it announces more than any
/// manifest may hold.
fn head_of_manifest(resp: UpstreamResponse) -> Result<Response, UpstreamError> {
    if resp
        .content_length()
        .is_some_and(|l| l > kache_oci::MAX_MANIFEST_SIZE)
    {
        return Err(UpstreamError::Invalid(format!(
            "the manifest is larger than {} bytes",
            kache_oci::MAX_MANIFEST_SIZE
        )));
    }
    Ok((resp.status, pass_headers(&resp.headers)).into_response())
}

/// A manifest from the upstream, read whole and answered only once it passed every check.
async fn manifest_answer(
    resp: UpstreamResponse,
    reference: &kache_oci::Reference,
) -> Result<Response, UpstreamError> {
    let m = resp.checked_manifest(reference).await?;
    let headers = [
        (http::header::CONTENT_TYPE, m.parsed.media_type.clone()),
        (
            http::header::HeaderName::from_static("docker-content-digest"),
            m.digest.to_string(),
        ),
        (http::header::CONTENT_LENGTH, m.bytes.len().to_string()),
    ];
    Ok((StatusCode::OK, headers.map(|(k, v)| (k, v)), m.bytes).into_response())
}

/// A blob from the upstream, streamed with its last bytes held until it verified: a body that
/// does not verify ends short of its length, with an error, so no client holds it whole.
fn blob_answer(
    resp: UpstreamResponse,
    digest: &kache_oci::Digest,
    head: bool,
    m: &ProxyMetrics,
) -> Response {
    let mut headers = pass_headers(&resp.headers);
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(&digest.to_string()).expect("a digest is a header value"),
    );
    let status = resp.status;
    if head {
        return (status, headers).into_response();
    }
    let counter = m.bytes.clone();
    let body = resp.into_verified_stream(digest).inspect_ok(move |b| {
        counter.inc_by(b.len() as u64);
    });
    (status, headers, Body::from_stream(body)).into_response()
}

/// Sends the request to the registry; Ok once its response headers arrived in time.
async fn forward(
    p: &Proxy,
    method: Method,
    pq: &str,
    headers: HeaderMap,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let cfg = &p.inner.config;
    let url = cfg.registry.join(pq);
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    match tokio::time::timeout(cfg.registry_timeout, p.inner.client.request(req)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(with_sources(&e)),
        Err(_) => Err(format!("no answer within {:?}", cfg.registry_timeout)),
    }
}

/// An error and its causes on one line: the client's own message is only "client error (Connect)".
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

pub(crate) fn pass_headers(from: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in PASSED_HEADERS {
        if let Some(v) = from.get(name) {
            h.insert(name, v.clone());
        }
    }
    h
}

/// The registry's answer, streamed.
fn relay(
    resp: http::Response<hyper::body::Incoming>,
    m: &ProxyMetrics,
    client_host: &str,
) -> Response {
    let status = resp.status();
    let mut headers = pass_headers(resp.headers());
    own_challenge(&mut headers, client_host);
    let counter = m.bytes.clone();
    let body = resp.into_body().map_frame(move |f| {
        if let Some(b) = f.data_ref() {
            counter.inc_by(b.len() as u64);
        }
        f
    });
    (status, headers, Body::new(body)).into_response()
}

/// The address the client used, for the realm of a challenge.
pub(crate) fn client_host(headers: &HeaderMap) -> String {
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok());
    pull_token::realm_host(host).to_owned()
}

/// Sets kache's Bearer challenge, its realm the token endpoint at `client_host`.
fn set_challenge(headers: &mut HeaderMap, client_host: &str, repo: Option<&str>) {
    if let Ok(v) = HeaderValue::from_str(&pull_token::challenge(client_host, repo)) {
        headers.insert(http::header::WWW_AUTHENTICATE, v);
    }
}

/// The registry's challenge points at its own token endpoint, which the node may not reach:
/// it is kache's, so it is pointed here, where the same endpoint answers.
pub(crate) fn own_challenge(headers: &mut HeaderMap, client_host: &str) {
    let Some(c) = headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    if !c.contains(&format!("service=\"{}\"", pull_token::SERVICE)) {
        return;
    }
    let repo = c
        .split_once("scope=\"repository:")
        .and_then(|(_, rest)| rest.split_once(":pull\""))
        .map(|(r, _)| r.to_owned());
    set_challenge(headers, client_host, repo.as_deref());
}

/// `GET` or `POST` of the token endpoint: stateless (the registry checks the token on every
/// read), so it is answered here and a public pull never waits on the registry for it.
async fn token(req: Request) -> Response {
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let form = if req.method() == Method::POST {
        match http_body_util::Limited::new(req.into_body(), 4096)
            .collect()
            .await
        {
            Ok(b) => Some(b.to_bytes()),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unsupported,
                    "token request body over 4 KiB",
                );
            }
        }
    } else {
        None
    };
    let answer = pull_token::token_answer(authorization.as_deref(), form.as_deref());
    ([(http::header::CONTENT_TYPE, "application/json")], answer).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_are_parsed_once_into_address_host_and_base_path() {
        let parts = |u: &str| {
            let r: RegistryUrl = u.parse().unwrap();
            (
                r.addr.clone(),
                r.host.clone(),
                r.base.clone(),
                r.to_string(),
            )
        };
        assert_eq!(
            parts("http://[::1]:5000/"),
            (
                "[::1]:5000".into(),
                "[::1]:5000".into(),
                "".into(),
                "http://[::1]:5000".into()
            )
        );
        assert_eq!(
            parts("http://kache-registry/base/"),
            (
                "kache-registry:80".into(),
                "kache-registry".into(),
                "/base".into(),
                "http://kache-registry/base".into()
            )
        );
        let r: RegistryUrl = "http://r:5000".parse().unwrap();
        assert_eq!(
            r.join("/v2/a/manifests/1?ns=x"),
            "http://r:5000/v2/a/manifests/1?ns=x"
        );
        for bad in [
            "https://r:5000",
            "r:5000",
            "http://",
            "http://r/?x=1",
            "not a url",
        ] {
            let e = bad.parse::<RegistryUrl>().unwrap_err();
            assert!(
                e.to_string().contains("is not an http:// URL"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_registry_is_reached_over_plain_http_only() {
        for ok in [
            "http://kache-registry:5000",
            "http://10.0.0.1:5000/",
            "http://[::1]:5000",
        ] {
            ok.parse::<RegistryUrl>().unwrap();
        }
        for bad in [
            "https://kache-registry:5000",
            "kache-registry:5000",
            "http://",
            "",
        ] {
            let e = bad.parse::<RegistryUrl>().unwrap_err();
            assert!(e.to_string().contains("http://"), "{e}");
        }
    }
}
