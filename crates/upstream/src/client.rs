//! The client: a request, and the one answer to a `401` it may take.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, StatusCode};
use kache_oci::api::Route;
use kache_oci::credentials::{self, Credentials, DockerConfig};
use kache_oci::digest::Digest;
use kache_oci::media_type::MANIFEST_TYPES;
use kache_oci::name::{Reference, RepoName};
use kache_oci::reference::{registry_endpoint, valid_registry};

use crate::auth::{self, AuthCache, Challenge, TokenKey};
use crate::config::UpstreamConfig;
use crate::error::{UpstreamError, describe};
use crate::response::{UpstreamResponse, check};
use crate::tls::tls_config;

/// A repository path on an upstream, checked: it ends up in a URL, and nothing that could
/// change the URL's meaning may pass.
fn upstream_repository(repository: &str) -> Result<RepoName, UpstreamError> {
    repository
        .parse()
        .map_err(|e| UpstreamError::Config(format!("upstream repository: {e}")))
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

/// What a request carries in `Authorization`.
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

    /// One request, and after a `401` one more with what the challenge asks for.
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
        let (registry_key, host, url) = self.locate(registry, route)?;

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

        let retry_auth = self
            .answer_challenge(resp.headers(), &host, &scope, key, creds, tried_basic)
            .await?;
        let Some(retry_auth) = retry_auth else {
            // Nothing to answer the challenge with: the upstream's own words say why.
            return check(&host, resp).await;
        };
        tracing::debug!(%host, repository, "retrying with credentials after 401");
        let resp = self
            .send(&host, method, url, accept, Some(&retry_auth))
            .await?;
        check(&host, resp).await
    }

    /// Where `route` is on `registry`: the registry as credentials are keyed (`docker.io`), the
    /// host that serves it (`registry-1.docker.io`) and the URL.
    fn locate(
        &self,
        registry: &str,
        route: &Route,
    ) -> Result<(String, String, reqwest::Url), UpstreamError> {
        // The registry ends up in the URL too: nothing that could change its meaning may pass.
        let registry_key = credentials::registry_host(registry);
        if !valid_registry(&registry_key) {
            return Err(UpstreamError::Config(format!(
                "upstream registry {registry:?} is not host or host:port"
            )));
        }
        let host = registry_endpoint(&registry_key).to_owned();
        let insecure = &self.inner.insecure;
        let scheme = if insecure.contains(&registry_key) || insecure.contains(&host) {
            "http"
        } else {
            "https"
        };
        let url = reqwest::Url::parse(&format!("{scheme}://{host}{}", route.path()))
            .map_err(|e| UpstreamError::Config(format!("upstream URL for {registry:?}: {e}")))?;
        Ok((registry_key, host, url))
    }

    /// What to send again after a `401` with these `WWW-Authenticate` headers: a fresh token
    /// from a Bearer challenge's realm, or Basic credentials the first time a registry asks for
    /// them; `None` when there is nothing to answer with.
    async fn answer_challenge(
        &self,
        headers: &HeaderMap,
        host: &str,
        scope: &str,
        key: TokenKey,
        creds: Option<&Credentials>,
        tried_basic: bool,
    ) -> Result<Option<Auth>, UpstreamError> {
        let auth = &self.inner.auth;
        let challenges: Vec<Challenge> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(auth::parse_challenges)
            .collect();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm.clone(), service.clone())),
            Challenge::Basic => None,
        });
        Ok(match (bearer, creds) {
            (Some((realm, service)), _) => {
                auth.forget_token(&key);
                let (token, expires_in) = self
                    .fetch_token(host, &realm, service.as_deref(), scope, creds)
                    .await?;
                auth.store_token(key, token.clone(), expires_in);
                Some(Auth::Bearer(token))
            }
            (None, Some(Credentials::Basic { username, password }))
                if !tried_basic && challenges.contains(&Challenge::Basic) =>
            {
                auth.remember_basic(host);
                Some(Auth::Basic(username.clone(), password.clone()))
            }
            _ => None,
        })
    }

    /// A request to a registry, with `Accept` and `Authorization` as given.
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

    /// The client's connections, shared with the token requests.
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.client
    }

    /// `req`, sent; no answer within the request timeout is a transport error.
    pub(crate) async fn send_request(
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
}
