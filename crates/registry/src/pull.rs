//! Pull-through, the upstream side: what the content layer asks an origin for when the store
//! lacks something (or a tag is due for re-validation). It decides nothing about freshness and
//! keeps nothing in flight itself: [`crate::content`] does both.
//!
//! Nothing is stored that does not verify: manifests are checked by kache-upstream's rules (the
//! digest asked for and the one announced) and again by the store, blobs by their flight.

use std::future::Future;
use std::sync::Arc;

use futures_util::TryStreamExt;
use futures_util::future::FutureExt;
use kache_oci::credentials::Credentials;
use kache_oci::{Descriptor, Digest, Origin, Reference, RepoName, Tag};
use kache_store::{FetchError, Manifest, Source, SourceFn, Storage, StoreError};
use kache_upstream::{Upstream, UpstreamError};

use crate::error::{Code, Error};
use crate::tenancy::{self, Classify};

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

/// The upstream side of the registry: the client, and how each kind of fetch is made.
#[derive(Debug, Clone)]
pub struct PullThrough {
    upstream: Upstream,
    /// With private-image scoping: how a fetched manifest's repository is classified.
    classify: Option<Classify>,
}

impl PullThrough {
    pub fn new(upstream: Upstream) -> Self {
        PullThrough {
            upstream,
            classify: None,
        }
    }

    /// Classifies every repository whose manifest is fetched.
    pub(crate) fn set_classify(&mut self, classify: Classify) {
        self.classify = Some(classify);
    }

    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// GETs a manifest from `origin`, checks it, stores it in `repo`.
    pub(crate) fn fetch_manifest(
        &self,
        store: Arc<dyn Storage>,
        repo: RepoName,
        origin: Origin,
        reference: Reference,
        creds: Option<Credentials>,
    ) -> impl Future<Output = Result<Manifest, PullError>> + Send + 'static {
        let (up, classify) = (self.upstream.clone(), self.classify.clone());
        fetch_manifest(store, up, classify, repo, origin, reference, creds)
    }

    /// HEADs a tag at `origin`: the cached manifest when it still points there, else the one it
    /// points at now, fetched.
    pub(crate) fn revalidate(
        &self,
        store: Arc<dyn Storage>,
        repo: RepoName,
        origin: Origin,
        tag: Tag,
        cached: Manifest,
        creds: Option<Credentials>,
    ) -> impl Future<Output = Result<Manifest, PullError>> + Send + 'static {
        let (up, classify) = (self.upstream.clone(), self.classify.clone());
        revalidate(store, up, classify, repo, origin, tag, cached, creds)
    }

    /// Where the store's flight of a blob reads it from: `origin`'s GET, once per flight (and
    /// once per reader if the store cannot keep the blob).
    pub(crate) fn blob_source(
        &self,
        origin: &Origin,
        digest: &Digest,
        creds: Option<Credentials>,
    ) -> SourceFn {
        let (up, origin, d) = (self.upstream.clone(), origin.clone(), digest.clone());
        Arc::new(move || {
            let (up, origin, d, creds) = (up.clone(), origin.clone(), d.clone(), creds.clone());
            async move {
                let r = up
                    .blob(&origin, &d, creds.as_ref())
                    .await
                    .map_err(|e| Arc::new(e) as FetchError)?;
                let size = r.content_length();
                let body = r.into_stream().map_err(|e| Arc::new(e) as FetchError);
                Ok(Source {
                    size,
                    body: Box::pin(body),
                })
            }
            .boxed()
        })
    }

    /// The size of a blob, as `origin`'s HEAD says it: what a HEAD is answered with, without
    /// fetching the body.
    pub(crate) async fn blob_size(
        &self,
        origin: &Origin,
        digest: &Digest,
        creds: Option<&Credentials>,
    ) -> Result<u64, UpstreamError> {
        let head = self.upstream.blob_head(origin, digest, creds).await?;
        head.content_length()
            .ok_or_else(|| UpstreamError::Invalid("the blob's HEAD has no Content-Length".into()))
    }

    /// Every tag `origin` lists.
    pub(crate) fn tags(
        &self,
        origin: &Origin,
        creds: Option<Credentials>,
    ) -> impl Future<Output = Result<Vec<String>, PullError>> + Send + 'static {
        let (up, o) = (self.upstream.clone(), origin.clone());
        async move { Ok(up.tags(&o, creds.as_ref()).await?) }
    }

    /// The referrers of `subject` at `origin`.
    pub(crate) fn referrers(
        &self,
        origin: &Origin,
        subject: &Digest,
        creds: Option<Credentials>,
    ) -> impl Future<Output = Result<Vec<Descriptor>, PullError>> + Send + 'static {
        let (up, o, d) = (self.upstream.clone(), origin.clone(), subject.clone());
        async move { Ok(up.referrers(&o, &d, creds.as_ref()).await?) }
    }
}

/// GETs a manifest upstream, checks it (kache-upstream's rules, the same a node proxy holds an
/// upstream to), classifies its repository, stores it: classified first, so that a private
/// repository's manifest is never stored where it reads as anyone's.
async fn fetch_manifest(
    store: Arc<dyn Storage>,
    upstream: Upstream,
    classify: Option<Classify>,
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
    classified(
        classify, &*store, &upstream, &repo, &origin, &reference, creds,
    )
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

/// HEADs a stale tag upstream; refetches only when it moved. Either way the repository is
/// classified again (what an image cached before scoping was on waits for).
#[allow(clippy::too_many_arguments)]
async fn revalidate(
    store: Arc<dyn Storage>,
    upstream: Upstream,
    classify: Option<Classify>,
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
        classified(
            classify, &*store, &upstream, &repo, &origin, &reference, creds,
        )
        .await?;
        return Ok(cached);
    }
    fetch_manifest(store, upstream, classify, repo, origin, reference, creds).await
}

/// After a manifest came from the upstream: what the upstream shows its repository to be,
/// recorded (when scoping is on).
async fn classified(
    classify: Option<Classify>,
    store: &dyn Storage,
    upstream: &Upstream,
    repo: &RepoName,
    origin: &Origin,
    reference: &Reference,
    creds: Option<Credentials>,
) -> Result<(), PullError> {
    let Some(c) = classify else {
        return Ok(());
    };
    match c
        .visibility(upstream, origin, reference, creds.as_ref(), true)
        .await
    {
        Some(v) => tenancy::record(store, repo, v).await?,
        // The upstream could not tell: what was recorded stays, and a repository never
        // classified that took a namespace's credentials is private until it can.
        None if creds.is_some() && store.visibility(repo)?.is_none() => {
            tenancy::record(store, repo, kache_wire::Visibility::Private).await?
        }
        None => {}
    }
    Ok(())
}
