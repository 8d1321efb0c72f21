//! Pull-through: what the registry does when a repository named `<upstream host>/<path>` asks
//! for something the store lacks, or for a tag older than its TTL.
//!
//! - One upstream request per manifest reference and per blob digest, however many clients
//!   ask at once (manifests here, blobs in the store's flights).
//! - A cached tag older than the TTL is re-validated with a HEAD; when the upstream cannot
//!   answer (down, 5xx, 429, timeout, or the image is gone), the cached manifest is served:
//!   keeping pods starting is the point of the cache.
//! - Nothing is stored that does not verify: manifests by digest are checked by the store,
//!   manifests by tag against the upstream's `Docker-Content-Digest`, blobs by their flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use kache_oci::credentials::Credentials;
use kache_oci::{Descriptor, Digest, Origin, Reference, RepoName, Tag};
use kache_store::{FetchError, FetchFailure, FlightStream, Manifest, Source, Store, StoreError};
use kache_upstream::{Upstream, UpstreamError};

use kache_wire::CacheOutcome;

use crate::Metrics;
use crate::error::{Code, Error};

/// Why a pull-through request failed; cheap to clone for every waiter of a flight.
#[derive(Debug, Clone)]
pub enum PullError {
    Upstream(UpstreamError),
    /// The upstream sent something that is not what was asked for.
    Invalid(String),
    Store(Arc<str>),
}

impl From<StoreError> for PullError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DigestMismatch { .. } => {
                PullError::Invalid(format!("upstream manifest: {e}"))
            }
            e => PullError::Store(e.to_string().into()),
        }
    }
}

impl From<UpstreamError> for PullError {
    fn from(e: UpstreamError) -> Self {
        PullError::Upstream(e)
    }
}

/// The client's error for an upstream failure, marked as the upstream's; `unknown` is the code
/// of a 404.
pub fn upstream_error(e: &UpstreamError, unknown: Code) -> Error {
    let a = e.answer(unknown);
    let status = http::StatusCode::from_u16(a.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    a.headers
        .into_iter()
        .fold(
            Error::new(a.code, a.message).status(status),
            |err, (name, value)| err.header(http::HeaderName::from_static(name), value),
        )
        .of_upstream()
}

impl PullError {
    pub fn into_error(self, unknown: Code) -> Error {
        match self {
            PullError::Upstream(e) => upstream_error(&e, unknown),
            PullError::Invalid(m) => Error::new(Code::Unavailable, m)
                .status(http::StatusCode::BAD_GATEWAY)
                .of_upstream(),
            PullError::Store(m) => Error::internal(m),
        }
    }
}

/// The pull-through side of the registry.
#[derive(Debug)]
pub struct PullThrough {
    upstream: Upstream,
    tag_ttl: Duration,
    /// Manifests being fetched, by reference (and `?revalidate` for a tag's HEAD).
    manifests: Flights<Manifest>,
    /// Tag lists of cached repositories, as the upstream last gave them.
    tags: Listings<Vec<String>>,
    /// Referrers of subjects in cached repositories, as the upstream last gave them.
    referrers: Listings<Vec<Descriptor>>,
    metrics: Metrics,
}

impl PullThrough {
    pub fn new(upstream: Upstream, tag_ttl: Duration, metrics: Metrics) -> Self {
        PullThrough {
            upstream,
            tag_ttl,
            manifests: Flights::default(),
            tags: Listings::default(),
            referrers: Listings::default(),
            metrics,
        }
    }

    /// The upstream's tags of a cached repository: kept for the tag TTL, served stale when the
    /// upstream cannot answer, one upstream listing however many ask.
    pub async fn tags(
        &self,
        repo: &RepoName,
        origin: &Origin,
    ) -> Result<(Arc<Vec<String>>, CacheOutcome), Error> {
        let (up, o) = (self.upstream.clone(), origin.clone());
        let fetch = async move { Ok(up.tags(&o, None).await?) };
        self.tags
            .get(repo.to_string(), self.tag_ttl, fetch, &self.metrics)
            .await
            .map_err(|e| e.into_error(Code::NameUnknown))
    }

    /// The upstream's referrers of `subject` in a cached repository (its referrers API, or the
    /// tag schema's index), kept and served as [`PullThrough::tags`] are.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        origin: &Origin,
        subject: &Digest,
    ) -> Result<(Arc<Vec<Descriptor>>, CacheOutcome), Error> {
        let (up, o, d) = (self.upstream.clone(), origin.clone(), subject.clone());
        let fetch = async move { Ok(up.referrers(&o, &d, None).await?) };
        self.referrers
            .get(
                format!("{repo}@{subject}"),
                self.tag_ttl,
                fetch,
                &self.metrics,
            )
            .await
            .map_err(|e| e.into_error(Code::ManifestUnknown))
    }

    /// The size of a blob the store lacks, as the upstream's HEAD says it: what a HEAD is
    /// answered with, without fetching the body.
    pub async fn blob_size(&self, origin: &Origin, digest: &Digest) -> Result<u64, UpstreamError> {
        let head = self.upstream.blob_head(origin, digest, None).await?;
        head.content_length()
            .ok_or_else(|| UpstreamError::Invalid("the blob's HEAD has no Content-Length".into()))
    }

    /// The upstream of `repo`, if its first component names a registry.
    pub fn origin(&self, repo: &RepoName) -> Option<Origin> {
        Origin::of(repo)
    }

    /// Runs `fut` once for every concurrent request with the same `key`.
    async fn single_flight(
        &self,
        key: String,
        fut: impl Future<Output = Result<Manifest, PullError>> + Send + 'static,
    ) -> Result<Manifest, PullError> {
        self.manifests
            .join(key, fut, &self.metrics.upstream_errors)
            .await
    }

    /// A manifest of a cached repository: from the store when fresh, else from upstream.
    pub async fn manifest(
        &self,
        store: &Arc<Store>,
        repo: &RepoName,
        origin: &Origin,
        reference: &Reference,
        creds: Option<Credentials>,
    ) -> Result<(Manifest, CacheOutcome), Error> {
        // A tag is resolved once: its record says both where it points and how fresh it is
        // (references by digest never need re-validation).
        let (digest, fresh) = match reference {
            Reference::Digest(d) => (Some(d.clone()), false),
            Reference::Tag(t) => match store.tag(repo, t.as_str())? {
                Some(rec) => (
                    Some(rec.digest),
                    now().saturating_sub(rec.updated) < self.tag_ttl.as_secs(),
                ),
                None => (None, false),
            },
        };
        let cached = match digest {
            Some(d) => match store.get_manifest(repo, &Reference::Digest(d)).await {
                Ok(m) => Some(m),
                Err(StoreError::ManifestUnknown) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        match (reference, cached) {
            (Reference::Digest(_), Some(m)) => return Ok((m, CacheOutcome::Hit)),
            (Reference::Tag(_), Some(m)) if fresh => return Ok((m, CacheOutcome::Hit)),
            (Reference::Tag(t), Some(m)) => {
                let key = format!("{repo}:{t}?revalidate");
                let fut = revalidate(
                    store.clone(),
                    self.upstream.clone(),
                    repo.clone(),
                    origin.clone(),
                    t.clone(),
                    m.clone(),
                    creds,
                );
                return match self.single_flight(key, fut).await {
                    Ok(m) => Ok((m, CacheOutcome::Hit)),
                    Err(e) => {
                        tracing::warn!(%repo, tag = %t, error = ?e, "upstream could not re-validate the tag; serving the cached manifest");
                        Ok((m, CacheOutcome::Stale))
                    }
                };
            }
            (_, None) => {}
        }
        let key = format!("{repo}@{reference}");
        let fut = fetch_manifest(
            store.clone(),
            self.upstream.clone(),
            repo.clone(),
            origin.clone(),
            reference.clone(),
            creds,
        );
        self.single_flight(key, fut)
            .await
            .map(|m| (m, CacheOutcome::Miss))
            .map_err(|e| e.into_error(Code::ManifestUnknown))
    }

    /// A blob of a cached repository that the store lacks, streamed while it is fetched.
    pub async fn blob(
        &self,
        store: &Arc<Store>,
        repo: &RepoName,
        origin: &Origin,
        digest: &Digest,
        creds: Option<Credentials>,
    ) -> Result<FlightStream, Error> {
        let (up, origin_c, d) = (self.upstream.clone(), origin.clone(), digest.clone());
        // Called once per flight, and once per reader if the store cannot keep the blob.
        let source = move || {
            let (up, origin_c, d, creds) = (up.clone(), origin_c.clone(), d.clone(), creds.clone());
            async move {
                let r = up
                    .blob(&origin_c, &d, creds.as_ref())
                    .await
                    .map_err(|e| Arc::new(e) as FetchError)?;
                let size = r.content_length();
                let body = r.into_stream().map_err(|e| Arc::new(e) as FetchError);
                Ok(Source {
                    size,
                    body: Box::pin(body),
                })
            }
        };
        match store.fetch_blob(repo, digest, source).await {
            Ok(s) => Ok(s),
            Err(FetchFailure::Source(e)) => {
                self.metrics.upstream_errors.inc();
                Err(match e.downcast_ref::<UpstreamError>() {
                    Some(u) => upstream_error(u, Code::BlobUnknown),
                    None => Error::new(Code::Unavailable, e.to_string())
                        .status(http::StatusCode::BAD_GATEWAY)
                        .of_upstream(),
                })
            }
            Err(FetchFailure::Store(e)) => Err(e.into()),
        }
    }
}

/// The most listings kept (tag lists, referrers); past it the oldest goes.
const MAX_LISTINGS: usize = 10_000;

type Flight<T> = Shared<BoxFuture<'static, Result<T, PullError>>>;

/// What is being fetched upstream, by key: everyone asking for a key while it is joins the one
/// request, which runs as a task of its own (it completes, and fills the cache, when its client
/// leaves).
struct Flights<T> {
    map: Mutex<HashMap<String, Flight<T>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            map: Mutex::default(),
        }
    }
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.lock().map_or(0, |m| m.len());
        f.debug_struct("Flights").field("in_flight", &n).finish()
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    async fn join(
        &self,
        key: String,
        fut: impl Future<Output = Result<T, PullError>> + Send + 'static,
        errors: &prometheus_client::metrics::counter::Counter,
    ) -> Result<T, PullError> {
        let flight = {
            let mut map = self.map.lock().expect("flights poisoned");
            map.entry(key.clone())
                .or_insert_with(|| {
                    let errors = errors.clone();
                    let task = tokio::spawn(async move {
                        let r = fut.await;
                        if r.is_err() {
                            errors.inc();
                        }
                        r
                    });
                    async move {
                        task.await
                            .unwrap_or_else(|e| Err(PullError::Store(e.to_string().into())))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let result = flight.clone().await;
        let mut map = self.map.lock().expect("flights poisoned");
        if map.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            map.remove(&key);
        }
        result
    }
}

/// Lists the upstream gives (tags, referrers) by key: kept for a TTL and served stale when the
/// upstream cannot answer; one upstream request per key however many ask at once.
struct Listings<T> {
    kept: Mutex<HashMap<String, (Instant, Arc<T>)>>,
    flights: Flights<Arc<T>>,
}

impl<T> Default for Listings<T> {
    fn default() -> Self {
        Listings {
            kept: Mutex::default(),
            flights: Flights::default(),
        }
    }
}

impl<T> std::fmt::Debug for Listings<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.kept.lock().map_or(0, |k| k.len());
        f.debug_struct("Listings").field("kept", &kept).finish()
    }
}

impl<T: Send + Sync + 'static> Listings<T> {
    async fn get(
        &self,
        key: String,
        ttl: Duration,
        fetch: impl Future<Output = Result<T, PullError>> + Send + 'static,
        metrics: &Metrics,
    ) -> Result<(Arc<T>, CacheOutcome), PullError> {
        let kept = self
            .kept
            .lock()
            .expect("listings poisoned")
            .get(&key)
            .cloned();
        if let Some((at, v)) = &kept
            && at.elapsed() < ttl
        {
            return Ok((v.clone(), CacheOutcome::Hit));
        }
        let fetch = async move { fetch.await.map(Arc::new) };
        match self
            .flights
            .join(key.clone(), fetch, &metrics.upstream_errors)
            .await
        {
            Ok(v) => {
                let mut kept = self.kept.lock().expect("listings poisoned");
                if kept.len() >= MAX_LISTINGS
                    && !kept.contains_key(&key)
                    && let Some(oldest) = kept
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                {
                    kept.remove(&oldest);
                }
                kept.insert(key, (Instant::now(), v.clone()));
                Ok((v, CacheOutcome::Miss))
            }
            Err(e) => match kept {
                Some((_, v)) => {
                    tracing::warn!(%key, error = ?e, "upstream could not list; serving the kept list");
                    Ok((v, CacheOutcome::Stale))
                }
                None => Err(e),
            },
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// GETs a manifest upstream, checks it (kache-upstream's rules, the same a node proxy holds an
/// upstream to), stores it.
async fn fetch_manifest(
    store: Arc<Store>,
    upstream: Upstream,
    repo: RepoName,
    origin: Origin,
    reference: Reference,
    creds: Option<Credentials>,
) -> Result<Manifest, PullError> {
    let checked = upstream
        .manifest(&origin, &reference, false, creds.as_ref())
        .await?
        .checked_manifest(&reference)
        .await?;
    let digest = store
        .put_pulled_manifest(&repo, &reference, checked.bytes.clone(), &checked.parsed)
        .await?;
    Ok(Manifest {
        digest,
        media_type: checked.parsed.media_type,
        bytes: checked.bytes,
    })
}

/// HEADs a stale tag upstream; refetches only when it moved.
async fn revalidate(
    store: Arc<Store>,
    upstream: Upstream,
    repo: RepoName,
    origin: Origin,
    tag: Tag,
    cached: Manifest,
    creds: Option<Credentials>,
) -> Result<Manifest, PullError> {
    let reference = Reference::Tag(tag);
    let head = upstream
        .manifest(&origin, &reference, true, creds.as_ref())
        .await?;
    if head.digest().as_ref() == Some(&cached.digest) {
        if let Reference::Tag(t) = &reference {
            store.touch_tag(&repo, t.as_str()).await?;
        }
        return Ok(cached);
    }
    fetch_manifest(store, upstream, repo, origin, reference, creds).await
}
