//! The content layer under the registry's handlers: manifests, blobs, tag lists and referrers
//! of a repository, from the store or pulled through from the repository's origin. The
//! handlers keep only HTTP; this is the one place that knows whether a read is a hit or a
//! miss, counts it, starts and joins the fetches (the manifests' and listings' flights here,
//! the blobs' in the store, started from here alone), and where an access rule on a read
//! belongs: every read carries a [`Requester`].
//!
//! A repository without an origin (`team/app`, or any when pull-through is off) is served
//! from the store alone; a cached one (`docker.io/library/nginx`) as the plan says
//! ([`crate::plan`]).

use std::sync::Arc;
use std::time::Duration;

use kache_oci::credentials::Credentials;
use kache_oci::{Descriptor, Digest, Origin, Reference, RepoName};
use kache_store::{FetchFailure, FlightStream, Manifest, Sharing, Storage, StoreError};
use kache_upstream::UpstreamError;
use kache_wire::{CacheOutcome, Visibility};

use crate::error::{Code, Error, Result};
use crate::flights::{Flights, Listings};
use crate::metrics::{CacheLabels, Metrics};
use crate::plan::{Freshness, ManifestPlan, manifest_plan};
use crate::pull::{PullThrough, upstream_error};
use crate::tenancy::{self, AuthResult, Caller, Scoping};

/// Who reads: one value on every read, so that a rule about readers is one check here.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    /// Credentials for the origin, for this read only (a pod's pull secret, through the warm
    /// call); never stored.
    pub credentials: Option<Credentials>,
    /// Why it reads.
    pub purpose: Purpose,
    /// Whom the read is for, as its pull token says.
    pub caller: Caller,
}

/// Why a read is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Purpose {
    /// A client pulls: counted in the cache metrics.
    #[default]
    Pull,
    /// The controller warms the cache: not a client's hit or miss. With `refresh`, a cached
    /// tag is asked upstream whatever its age, and the answer waited for: a NodeImageSet's
    /// refresh wants the tag as the upstream says now, where a pull wants an answer soon.
    Warm { refresh: bool },
}

impl Requester {
    /// A client's pull, anonymous to the origin.
    pub fn client() -> Self {
        Requester::default()
    }

    /// A client's pull, by `caller`.
    pub fn of(caller: Caller) -> Self {
        Requester {
            caller,
            ..Requester::default()
        }
    }
}

/// How much of a blob is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Its size (a HEAD).
    Head,
    /// Its bytes.
    Get,
}

/// A blob, as the store or the origin has it.
#[derive(Debug)]
pub enum Blob {
    /// Only its size (a HEAD).
    Size(u64),
    /// The store's file, and its size.
    File(tokio::fs::File, u64),
    /// Being fetched: the flight's stream, which verifies it before its last byte.
    Fetching(FlightStream),
}

/// What a read answered, and how the cache answered it (`None` for a repository without an
/// origin: no cache decision was made).
#[derive(Debug)]
pub struct Served<T> {
    pub value: T,
    pub outcome: Option<CacheOutcome>,
}

/// The content of the registry's repositories.
#[derive(Debug)]
pub struct Content {
    store: Arc<dyn Storage>,
    pull: Option<PullThrough>,
    freshness: Freshness,
    metrics: Metrics,
    manifests: Flights<Manifest>,
    tags: Listings<Vec<String>>,
    referrers: Listings<Vec<Descriptor>>,
    scoping: Option<Arc<Scoping>>,
}

impl Content {
    /// Content over `store`, pulled through from origins with `pull`, tags re-validated as
    /// `freshness` says.
    pub fn new(
        store: Arc<dyn Storage>,
        pull: Option<PullThrough>,
        freshness: Freshness,
        metrics: Metrics,
    ) -> Self {
        Content {
            store,
            pull,
            freshness,
            metrics,
            manifests: Flights::default(),
            tags: Listings::default(),
            referrers: Listings::default(),
            scoping: None,
        }
    }

    /// Turns private-image scoping on: private repositories are read only by namespaces with a
    /// grant, and every fetched manifest's repository is classified.
    pub fn set_scoping(&mut self, scoping: Arc<Scoping>) {
        if let Some(pull) = &mut self.pull {
            pull.set_classify(scoping.classify());
        }
        self.scoping = Some(scoping);
    }

    /// The scoping in force, if any.
    pub fn scoping(&self) -> Option<&Arc<Scoping>> {
        self.scoping.as_ref()
    }

    /// The one access rule on reads: a private cached repository is read only by a namespace
    /// whose grant holds (or by the controller's warm calls). Everything else reads freely.
    fn check_read(&self, repo: &RepoName, who: &Requester) -> Result<()> {
        if self.scoping.is_none()
            || matches!(who.purpose, Purpose::Warm { .. })
            || !self.is_cached(repo)
        {
            return Ok(());
        }
        if self.store.visibility(repo)? != Some(Visibility::Private) {
            return Ok(());
        }
        let result = tenancy::check_private(&*self.store, repo, &who.caller, now())?;
        self.metrics
            .auth
            .get_or_create(&crate::metrics::ResultLabel {
                result: result.as_str(),
            })
            .inc();
        match result {
            AuthResult::Granted => Ok(()),
            refused => {
                tracing::debug!(%repo, caller = ?who.caller, result = refused.as_str(), "read of a private repository refused");
                Err(Error::new(
                    Code::Unauthorized,
                    format!(
                        "{repo} is private: pulls need the kache-pull secret of a namespace granted it ({})",
                        refused.as_str()
                    ),
                ))
            }
        }
    }

    /// The repository's origin, when it has one and pull-through is on.
    fn origin(&self, repo: &RepoName) -> Option<(&PullThrough, Origin)> {
        Some((self.pull.as_ref()?, Origin::of(repo)?))
    }

    /// The upstream side, when pull-through is on.
    pub(crate) fn pull(&self) -> Option<&PullThrough> {
        self.pull.as_ref()
    }

    /// Whether what the store lacks is pulled through from origins.
    pub fn pulls_through(&self) -> bool {
        self.pull.is_some()
    }

    /// Whether `repo` is pulled through from an origin.
    pub fn is_cached(&self, repo: &RepoName) -> bool {
        self.origin(repo).is_some()
    }

    fn served<T>(
        &self,
        kind: &'static str,
        value: T,
        outcome: CacheOutcome,
        who: &Requester,
    ) -> Served<T> {
        if who.purpose == Purpose::Pull {
            self.metrics
                .cache
                .get_or_create(&CacheLabels {
                    kind,
                    outcome: outcome.as_str(),
                })
                .inc();
        }
        Served {
            value,
            outcome: Some(outcome),
        }
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        who: &Requester,
    ) -> Result<Served<Manifest>> {
        self.check_read(repo, who)?;
        let store = &self.store;
        let Some((pull, origin)) = self.origin(repo) else {
            let value = store.get_manifest(repo, reference).await?;
            return Ok(Served {
                value,
                outcome: None,
            });
        };
        let tag = match reference {
            Reference::Digest(_) => None,
            Reference::Tag(t) => store.tag(repo, t.as_str())?,
        };
        let names = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => tag.as_ref().map(|r| r.digest.clone()),
        };
        let cached = match names {
            Some(d) => match store.get_manifest(repo, &Reference::Digest(d)).await {
                Ok(m) => Some(m),
                Err(StoreError::ManifestUnknown) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let refresh = who.purpose == Purpose::Warm { refresh: true };
        let (ttl, wait) = if refresh {
            // The upstream's own timeout bounds the wait.
            (Duration::ZERO, Duration::MAX)
        } else {
            (self.freshness.tag_ttl, self.freshness.revalidate_wait)
        };
        let plan = manifest_plan(reference, tag.as_ref(), cached.is_some(), now(), ttl);
        let errors = &self.metrics.upstream_errors;
        let creds = who.credentials.clone();
        match (plan, cached, reference) {
            (ManifestPlan::Serve, Some(m), _) => {
                Ok(self.served("manifest", m, CacheOutcome::Hit, who))
            }
            (ManifestPlan::Revalidate, Some(m), Reference::Tag(t)) => {
                let fut = pull.revalidate(
                    store.clone(),
                    repo.clone(),
                    origin,
                    t.clone(),
                    m.clone(),
                    creds,
                );
                let flight = self
                    .manifests
                    .join(format!("{repo}:{t}?revalidate"), fut, errors);
                match tokio::time::timeout(wait, flight).await {
                    Ok(Ok(m)) => {
                        self.check_read(repo, who)?;
                        Ok(self.served("manifest", m, CacheOutcome::Hit, who))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%repo, tag = %t, error = ?e, "upstream could not re-validate the tag; serving the cached manifest");
                        Ok(self.served("manifest", m, CacheOutcome::Stale, who))
                    }
                    // The check goes on, and moves the tag if the upstream did.
                    Err(_) => {
                        tracing::warn!(%repo, tag = %t, ?wait, "upstream did not re-validate the tag in time; serving the cached manifest");
                        Ok(self.served("manifest", m, CacheOutcome::Stale, who))
                    }
                }
            }
            _ => {
                let fut = pull.fetch_manifest(
                    store.clone(),
                    repo.clone(),
                    origin,
                    reference.clone(),
                    creds,
                );
                let m = self
                    .manifests
                    .join(format!("{repo}@{reference}"), fut, errors)
                    .await
                    .map_err(|e| e.into_error(Code::ManifestUnknown))?;
                // The fetch may have shown the repository to be private (and this read may
                // have joined another's fetch).
                self.check_read(repo, who)?;
                Ok(self.served("manifest", m, CacheOutcome::Miss, who))
            }
        }
    }

    /// A blob: its size, the store's file, or its flight from the origin.
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        want: Want,
        who: &Requester,
    ) -> Result<Served<Blob>> {
        self.check_read(repo, who)?;
        let store = &self.store;
        let origin = self.origin(repo);
        // A cached repository may serve a blob another one already fetched (same digest, same
        // bytes): link it rather than download it again.
        if origin.is_some() && store.stat_blob(repo, digest)?.is_none() {
            store.mount_blob(repo, digest, None).await?;
        }
        let local = match want {
            Want::Head => store.stat_blob(repo, digest)?.map(Blob::Size),
            Want::Get => match store.open_blob(repo, digest).await {
                Ok(b) => Some(Blob::File(b.file, b.size)),
                Err(StoreError::BlobUnknown) => None,
                Err(e) => return Err(e.into()),
            },
        };
        let Some((pull, origin)) = origin else {
            let value = local.ok_or(StoreError::BlobUnknown)?;
            return Ok(Served {
                value,
                outcome: None,
            });
        };
        if let Some(value) = local {
            return Ok(self.served("blob", value, CacheOutcome::Hit, who));
        }
        if want == Want::Head {
            // As the GET would answer, from the origin's HEAD, without the body. A blob the
            // origin will not size (absent, refused, unreachable) is unknown here: a client
            // pushing into a cached repository asks before uploading, and hears 404 then.
            let size = pull
                .blob_size(&origin, digest, who.credentials.as_ref())
                .await
                .map_err(|e| {
                    Error::new(
                        Code::BlobUnknown,
                        format!("blob unknown to the cache, and upstream: {e}"),
                    )
                })?;
            return Ok(self.served("blob", Blob::Size(size), CacheOutcome::Miss, who));
        }
        let source = pull.blob_source(&origin, digest, who.credentials.clone());
        // Bytes read with a caller's own credentials, or for a private repository, go to that
        // repository's requests only: another's joining the fetch would get them unchecked.
        let sharing =
            if who.credentials.is_some() || store.visibility(repo)? == Some(Visibility::Private) {
                Sharing::Repository
            } else {
                Sharing::Any
            };
        match store
            .clone()
            .fetch_blob(repo.clone(), digest.clone(), sharing, source)
            .await
        {
            Ok(flight) => Ok(self.served("blob", Blob::Fetching(flight), CacheOutcome::Miss, who)),
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

    /// The tags of a repository after `last`, sorted, at most `n`: a cached one's are the
    /// origin's (kept for the tag TTL, stale when it cannot answer) with the store's own.
    pub async fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
        who: &Requester,
    ) -> Result<Served<Vec<String>>> {
        self.check_read(repo, who)?;
        let store = &self.store;
        let Some((pull, origin)) = self.origin(repo) else {
            let value = store.list_tags(repo, last, n)?;
            return Ok(Served {
                value,
                outcome: None,
            });
        };
        let local = match store.list_tags(repo, None, usize::MAX) {
            Ok(t) => Some(t),
            Err(StoreError::NameUnknown) => None,
            Err(e) => return Err(e.into()),
        };
        let fetch = pull.tags(&origin, who.credentials.clone());
        let listed = self
            .tags
            .get(
                repo.to_string(),
                self.freshness,
                fetch,
                &self.metrics.upstream_errors,
            )
            .await;
        let (upstream, outcome) = match listed {
            Ok((tags, outcome)) => (Some(tags), Some(outcome)),
            // The origin says nothing and nothing was kept: the store's own tags.
            Err(e) if local.is_some() => {
                tracing::warn!(%repo, error = ?e, "upstream could not list tags");
                (None, None)
            }
            Err(e) => return Err(e.into_error(Code::NameUnknown)),
        };
        let all: std::collections::BTreeSet<&str> = local
            .iter()
            .flatten()
            .chain(upstream.iter().flat_map(|t| t.iter()))
            .map(String::as_str)
            .collect();
        let value = all
            .into_iter()
            .filter(|t| last.is_none_or(|l| *t > l))
            .take(n)
            .map(str::to_owned)
            .collect();
        Ok(match outcome {
            Some(o) => self.served("tags", value, o, who),
            None => Served {
                value,
                outcome: None,
            },
        })
    }

    /// The referrers of `subject`: the store's, and for a cached repository the origin's
    /// besides (kept and served stale as tag lists are).
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        who: &Requester,
    ) -> Result<Served<Vec<Descriptor>>> {
        self.check_read(repo, who)?;
        let mut value: Vec<Descriptor> = self
            .store
            .referrers(repo, subject)?
            .into_iter()
            .map(|r| Descriptor {
                media_type: r.record.media_type,
                digest: r.digest,
                size: r.record.size,
                artifact_type: r.record.artifact_type,
                annotations: r.record.annotations,
                platform: None,
                urls: Vec::new(),
            })
            .collect();
        let Some((pull, origin)) = self.origin(repo) else {
            return Ok(Served {
                value,
                outcome: None,
            });
        };
        let fetch = pull.referrers(&origin, subject, who.credentials.clone());
        let listed = self
            .referrers
            .get(
                format!("{repo}@{subject}"),
                self.freshness,
                fetch,
                &self.metrics.upstream_errors,
            )
            .await;
        match listed {
            Ok((upstream, outcome)) => {
                for d in upstream.iter() {
                    if !value.iter().any(|m| m.digest == d.digest) {
                        value.push(d.clone());
                    }
                }
                Ok(self.served("referrers", value, outcome, who))
            }
            // The origin says nothing and nothing was kept: the store's own referrers.
            Err(e) => {
                tracing::warn!(%repo, %subject, error = ?e, "upstream could not list referrers");
                Ok(Served {
                    value,
                    outcome: None,
                })
            }
        }
    }
}

/// Unix seconds.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
