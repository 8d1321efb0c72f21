//! The warm call: the controller asks the registry to cache an image for some platforms,
//! optionally with credentials that serve this one fetch and are never stored.

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::BodyExt;
use kache_oci::credentials::Credentials;
use kache_oci::manifest::Platform;
use kache_oci::reference::ImageReference;
use kache_oci::{Digest, ParsedManifest, Reference, RepoName};
use kache_wire::{PlatformResult, PlatformStatus, WarmRequest, WarmResponse};

use crate::Registry;
use crate::content::{Blob, Purpose, Requester, Want};
use crate::error::{Code, Error, Result};
use crate::handlers::unsupported;
use crate::tenancy::Caller;

/// Whether an index entry's platform is the one asked for (`arm64` and `arm64/v8` are one).
fn matches(entry: &Platform, want: &str) -> bool {
    let mut parts = want.split('/');
    let (os, arch, variant) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next(),
    );
    let norm = |arch: &str, v: Option<&str>| match (arch, v) {
        ("arm64", Some("v8")) => None,
        (_, v) => v.map(str::to_owned),
    };
    entry.os == os
        && entry.architecture == arch
        && (variant.is_none() && entry.architecture != "arm"
            || norm(arch, variant) == norm(&entry.architecture, entry.variant.as_deref()))
}

impl Registry {
    /// `POST /kache/v1/warm` with a JSON [`WarmRequest`].
    pub(crate) async fn warm_endpoint(&self, req: Request) -> Result<Response> {
        if req.method() != Method::POST {
            return Err(unsupported(req.method(), "POST"));
        }
        let bad = |m: String| Error::new(Code::Unsupported, m).status(StatusCode::BAD_REQUEST);
        let body = http_body_util::Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| bad(format!("reading the warm request failed: {e}")))?
            .to_bytes();
        let warm: WarmRequest =
            serde_json::from_slice(&body).map_err(|e| bad(format!("not a warm request: {e}")))?;
        Ok(axum::Json(self.warm(warm).await?).into_response())
    }

    pub(crate) async fn warm(&self, req: WarmRequest) -> Result<WarmResponse> {
        let content = &self.inner.content;
        if !content.pulls_through() {
            return Err(Error::new(
                Code::Unsupported,
                "this registry has no upstream access (pull-through is off)",
            ));
        }
        let image: ImageReference = req
            .image
            .parse()
            .map_err(|e| Error::new(Code::NameInvalid, format!("image {:?}: {e}", req.image)))?;
        let repo = image.cache_repository();
        if !content.is_cached(&repo) {
            return Err(Error::new(
                Code::NameInvalid,
                format!("{repo} does not name an upstream registry"),
            ));
        }
        let who = Requester {
            credentials: req.credentials.map(|c| Credentials::Basic {
                username: c.username,
                password: c.password,
            }),
            purpose: Purpose::Warm {
                refresh: req.refresh,
            },
            caller: Caller::Anonymous,
        };
        let top = content
            .manifest(&repo, &image.reference(), &who)
            .await?
            .value;
        let parsed =
            ParsedManifest::parse(&top.bytes, Some(&top.media_type)).map_err(Error::internal)?;
        let mut bytes = top.bytes.len() as u64;
        let mut platforms = Vec::new();
        if parsed.is_index() {
            let wanted = if req.platforms.is_empty() {
                vec!["linux/amd64".to_owned()]
            } else {
                req.platforms
            };
            for want in wanted {
                let Some(child) = parsed
                    .manifests
                    .iter()
                    .find(|m| m.platform.as_ref().is_some_and(|p| matches(p, &want)))
                else {
                    platforms.push(PlatformResult {
                        platform: want,
                        digest: None,
                        bytes: 0,
                        status: PlatformStatus::Absent,
                        message: Some("the index has no manifest for this platform".into()),
                    });
                    continue;
                };
                let r = self.warm_image(&repo, &child.digest, &who).await;
                platforms.push(result(want, child.digest.clone(), r, &mut bytes));
            }
        } else {
            let r = self.warm_blobs(&repo, &parsed, &who).await;
            platforms.push(result(String::new(), top.digest.clone(), r, &mut bytes));
        }
        Ok(WarmResponse {
            image: image.to_string(),
            repository: repo.to_string(),
            digest: top.digest,
            media_type: top.media_type,
            bytes,
            platforms,
        })
    }

    /// One platform: its manifest, then its blobs. Returns bytes of both.
    async fn warm_image(&self, repo: &RepoName, digest: &Digest, who: &Requester) -> Result<u64> {
        let reference = Reference::Digest(digest.clone());
        let m = self
            .inner
            .content
            .manifest(repo, &reference, who)
            .await?
            .value;
        let parsed = ParsedManifest::parse(&m.bytes, Some(&m.media_type))
            .map_err(|e| Error::new(Code::ManifestInvalid, e.to_string()))?;
        Ok(m.bytes.len() as u64 + self.warm_blobs(repo, &parsed, who).await?)
    }

    /// Every blob of an image manifest, a few at a time; drains fetches so they complete.
    async fn warm_blobs(
        &self,
        repo: &RepoName,
        m: &ParsedManifest,
        who: &Requester,
    ) -> Result<u64> {
        let content = &self.inner.content;
        let blobs: Vec<Digest> = m.required_blobs().map(|d| d.digest.clone()).collect();
        let sizes = futures_util::stream::iter(blobs)
            .map(|d| async move {
                match content.blob(repo, &d, Want::Get, who).await?.value {
                    Blob::Size(size) | Blob::File(_, size) => Ok(size),
                    Blob::Fetching(s) => s
                        .body
                        .try_fold(0u64, |n, c| async move { Ok(n + c.len() as u64) })
                        .await
                        .map_err(|e| {
                            Error::new(Code::Unavailable, format!("fetching {d}: {e}"))
                                .status(http::StatusCode::BAD_GATEWAY)
                        }),
                }
            })
            .buffer_unordered(3)
            .try_collect::<Vec<u64>>()
            .await?;
        Ok(sizes.iter().sum())
    }
}

fn result(platform: String, digest: Digest, r: Result<u64>, total: &mut u64) -> PlatformResult {
    match r {
        Ok(n) => {
            *total += n;
            PlatformResult {
                platform,
                digest: Some(digest),
                bytes: n,
                status: PlatformStatus::Cached,
                message: None,
            }
        }
        Err(e) => PlatformResult {
            platform,
            digest: Some(digest),
            bytes: 0,
            status: PlatformStatus::Failed,
            message: Some(e.message),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
            os_version: None,
        }
    }

    #[test]
    fn platform_matching() {
        assert!(matches(&p("linux", "amd64", None), "linux/amd64"));
        assert!(!matches(&p("linux", "amd64", None), "linux/arm64"));
        assert!(matches(&p("linux", "arm64", Some("v8")), "linux/arm64"));
        assert!(matches(&p("linux", "arm64", None), "linux/arm64/v8"));
        assert!(matches(&p("linux", "arm", Some("v7")), "linux/arm/v7"));
        assert!(!matches(&p("linux", "arm", Some("v6")), "linux/arm/v7"));
        assert!(!matches(&p("linux", "arm", Some("v7")), "linux/arm"));
        assert!(!matches(&p("windows", "amd64", None), "linux/amd64"));
    }
}
