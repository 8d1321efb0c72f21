//! The client: a request, and the one answer to a `401` it may take.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, StatusCode};
use kache_oci::credentials::{self, Credentials, DockerConfig};
use kache_oci::digest::Digest;
use kache_oci::distribution::Route;
use kache_oci::media_type::{MANIFEST_TYPES, OCI_INDEX};
use kache_oci::name::{Reference, RepoName};
use kache_oci::{Descriptor, MAX_MANIFEST_SIZE, Origin};

use crate::auth::{self, AuthCache, Challenge, TokenKey};
use crate::config::UpstreamConfig;
use crate::error::{UpstreamError, describe};
use crate::response::{UpstreamResponse, check};
use crate::tls::tls_config;

/// Tags asked for per page of a tag list.
pub const TAGS_PAGE: usize = 1000;
/// The most tags read of one repository: a bound on what one listing costs.
pub const MAX_TAGS: usize = 100_000;
/// The largest page of tags read (1000 tags of 128 characters, with room to spare).
const TAGS_PAGE_BYTES: u64 = 4 << 20;

/// A page of a tag list.
#[derive(serde::Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Vec<String>,
}

/// The index a referrers listing (or the tag schema's fallback) answers with.
#[derive(serde::Deserialize)]
struct ReferrerIndex {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// The `last` of a tag list's `Link: <...?n=..&last=..>; rel="next"`: only the position is
/// taken from it, never a URL to follow (the next request is built as the first was, on the
/// same host).
fn next_last(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
            return None;
        }
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let query = target.split_once('?')?.1;
        let raw = query.split('&').find_map(|kv| kv.strip_prefix("last="))?;
        percent_decode(raw)
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// A query value with everything but unreserved characters percent-encoded.
fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

/// Whose credentials a request carries: a caller's own, or else the chart-wide ones of the
/// registry (the client's configuration), or, to learn what anyone may read, none.
#[derive(Clone, Copy)]
enum Creds<'a> {
    Given(&'a Credentials),
    Cluster,
    Anonymous,
}

impl<'a> From<Option<&'a Credentials>> for Creds<'a> {
    fn from(c: Option<&'a Credentials>) -> Self {
        c.map_or(Creds::Cluster, Creds::Given)
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

    /// GET or HEAD of a manifest at `origin`, by tag or digest. Only a 2xx answer is `Ok`.
    pub async fn manifest(
        &self,
        origin: &Origin,
        reference: &Reference,
        head: bool,
        creds: Option<&Credentials>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let method = if head { Method::HEAD } else { Method::GET };
        let accept = MANIFEST_TYPES.join(", ");
        let route = Route::Manifest(origin.path().clone(), reference.clone());
        self.fetch(method, origin, &route, None, Some(&accept), creds.into())
            .await
    }

    /// HEAD of a manifest with no credentials at all: whether anyone may read it.
    pub async fn manifest_anonymous(
        &self,
        origin: &Origin,
        reference: &Reference,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let accept = MANIFEST_TYPES.join(", ");
        let route = Route::Manifest(origin.path().clone(), reference.clone());
        self.fetch(
            Method::HEAD,
            origin,
            &route,
            None,
            Some(&accept),
            Creds::Anonymous,
        )
        .await
    }

    /// Whether the client holds credentials of its own for `origin`'s registry (the chart-wide
    /// ones), which it sends when a request brings none.
    pub fn has_credentials_for(&self, origin: &Origin) -> bool {
        self.inner.credentials.lookup(origin.registry()).is_some()
    }

    /// GET of a blob, following redirects. Only a 2xx answer is `Ok`.
    pub async fn blob(
        &self,
        origin: &Origin,
        digest: &Digest,
        creds: Option<&Credentials>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let route = Route::Blob(origin.path().clone(), digest.clone());
        self.fetch(Method::GET, origin, &route, None, None, creds.into())
            .await
    }

    /// HEAD of a blob: its size (`Content-Length`) without its body. Only a 2xx answer is
    /// `Ok`.
    pub async fn blob_head(
        &self,
        origin: &Origin,
        digest: &Digest,
        creds: Option<&Credentials>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let route = Route::Blob(origin.path().clone(), digest.clone());
        self.fetch(Method::HEAD, origin, &route, None, None, creds.into())
            .await
    }

    /// Every tag of a repository, in the upstream's order: page after page of [`TAGS_PAGE`]
    /// (`n`, then `last` as each page's `Link` says), up to [`MAX_TAGS`].
    pub async fn tags(
        &self,
        origin: &Origin,
        creds: Option<&Credentials>,
    ) -> Result<Vec<String>, UpstreamError> {
        let route = Route::Tags(origin.path().clone());
        let mut tags: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let query = match &last {
                None => format!("n={TAGS_PAGE}"),
                Some(l) => format!("n={TAGS_PAGE}&last={}", encode_query_value(l)),
            };
            let resp = self
                .fetch(
                    Method::GET,
                    origin,
                    &route,
                    Some(&query),
                    None,
                    creds.into(),
                )
                .await?;
            let next = resp
                .headers
                .get(http::header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_last);
            let body = resp.bytes_limited(TAGS_PAGE_BYTES).await?;
            let page: TagList = serde_json::from_slice(&body)
                .map_err(|e| UpstreamError::Invalid(format!("the tag list is not one: {e}")))?;
            let advanced = !page.tags.is_empty();
            tags.extend(page.tags);
            if tags.len() >= MAX_TAGS {
                tags.truncate(MAX_TAGS);
                return Ok(tags);
            }
            match next {
                // A next page that would start where this one did is no next page.
                Some(n) if advanced && last.as_deref() != Some(n.as_str()) => last = Some(n),
                _ => return Ok(tags),
            }
        }
    }

    /// The referrers of `subject` in a repository: from the upstream's referrers API, or where
    /// it has none (404), from the index the tag schema keeps under `sha256-<hex>`; none when
    /// neither holds one.
    pub async fn referrers(
        &self,
        origin: &Origin,
        subject: &Digest,
        creds: Option<&Credentials>,
    ) -> Result<Vec<Descriptor>, UpstreamError> {
        let route = Route::Referrers(origin.path().clone(), subject.clone());
        let api = self
            .fetch(
                Method::GET,
                origin,
                &route,
                None,
                Some(OCI_INDEX),
                creds.into(),
            )
            .await;
        let index = match api {
            Ok(resp) => resp.bytes_limited(MAX_MANIFEST_SIZE).await?,
            Err(UpstreamError::NotFound(_)) => {
                let tag = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
                let reference: Reference = tag
                    .parse()
                    .map_err(|e| UpstreamError::Config(format!("referrers tag {tag:?}: {e}")))?;
                let route = Route::Manifest(origin.path().clone(), reference);
                let accept = MANIFEST_TYPES.join(", ");
                match self
                    .fetch(
                        Method::GET,
                        origin,
                        &route,
                        None,
                        Some(&accept),
                        creds.into(),
                    )
                    .await
                {
                    Ok(resp) => resp.bytes_limited(MAX_MANIFEST_SIZE).await?,
                    Err(UpstreamError::NotFound(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let list: ReferrerIndex = serde_json::from_slice(&index).map_err(|e| {
            UpstreamError::Invalid(format!("the referrers of {subject} are not an index: {e}"))
        })?;
        Ok(list.manifests)
    }

    /// One request, and after a `401` one more with what the challenge asks for.
    async fn fetch(
        &self,
        method: Method,
        origin: &Origin,
        route: &Route,
        query: Option<&str>,
        accept: Option<&str>,
        creds: Creds<'_>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let inner = &*self.inner;
        let repository = route.repo().map_or("", RepoName::as_str);
        let host = origin.endpoint().to_owned();
        let mut url = self.url(origin, route)?;
        url.set_query(query);

        let stored;
        let creds = match creds {
            Creds::Given(c) => Some(c),
            Creds::Anonymous => None,
            Creds::Cluster => {
                stored = inner.credentials.lookup(origin.registry());
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

    /// The URL of `route` at `origin`'s endpoint: plain HTTP for a registry named insecure.
    fn url(&self, origin: &Origin, route: &Route) -> Result<reqwest::Url, UpstreamError> {
        let insecure = &self.inner.insecure;
        let scheme = if insecure.contains(origin.registry()) || insecure.contains(origin.endpoint())
        {
            "http"
        } else {
            "https"
        };
        reqwest::Url::parse(&format!("{scheme}://{}{}", origin.endpoint(), route.path()))
            .map_err(|e| UpstreamError::Config(format!("upstream URL for {origin}: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_of_tags_is_its_position_only() {
        for (link, want) in [
            (r#"</v2/a/tags/list?n=2&last=v2>; rel="next""#, Some("v2")),
            (
                r#"</v2/a/tags/list?last=1.0%2Bbuild&n=2>; rel="next""#,
                Some("1.0+build"),
            ),
            (
                r#"<https://elsewhere.example/v2/a/tags/list?n=2&last=b>; rel=next"#,
                Some("b"),
            ),
            (r#"</v2/a/tags/list?n=2&last=v2>; rel="prev""#, None),
            (r#"</v2/a/tags/list?n=2>; rel="next""#, None),
            ("garbage", None),
            (r#"</v2/a/tags/list?last=%zz>; rel="next""#, None),
        ] {
            assert_eq!(next_last(link).as_deref(), want, "{link}");
        }
        assert_eq!(encode_query_value("1.0+build/x"), "1.0%2Bbuild%2Fx");
        assert_eq!(
            percent_decode(&encode_query_value("a b+c%d")).as_deref(),
            Some("a b+c%d")
        );
    }
}
