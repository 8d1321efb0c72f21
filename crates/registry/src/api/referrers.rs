//! The referrers of a subject digest, as an OCI index, optionally filtered by `artifactType`.
//! A cached repository lists the upstream's referrers (its referrers API, or the tag schema's
//! index) with the cache's own, kept and served stale as tags are.

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kache_oci::{Descriptor, Digest, RepoName, media_type};
use serde_json::json;

use super::headers::{OCI_FILTERS_APPLIED, Params};
use crate::Registry;
use crate::error::Result;

impl Registry {
    pub(super) async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        p: &Params,
    ) -> Result<Response> {
        let filter = p.get("artifactType");
        let mut h = HeaderMap::new();
        let mut manifests: Vec<Descriptor> = self
            .inner
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
        if let Some((pull, origin)) = self.origin(repo) {
            match pull.referrers(repo, &origin, subject).await {
                Ok((upstream, outcome)) => {
                    self.cache_outcome("referrers", outcome, &mut h);
                    for d in upstream.iter() {
                        if !manifests.iter().any(|m| m.digest == d.digest) {
                            manifests.push(d.clone());
                        }
                    }
                }
                // The upstream says nothing and kept nothing: the cache's own referrers.
                Err(e) => {
                    tracing::warn!(%repo, %subject, error = %e.message, "upstream could not list referrers");
                }
            }
        }
        manifests.retain(|r| filter.is_none_or(|f| r.artifact_type.as_ref() == Some(f)));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(media_type::OCI_INDEX),
        );
        if filter.is_some() {
            h.insert(
                OCI_FILTERS_APPLIED,
                HeaderValue::from_static("artifactType"),
            );
        }
        let body = json!({ "schemaVersion": 2, "mediaType": media_type::OCI_INDEX, "manifests": manifests });
        Ok((h, body.to_string()).into_response())
    }
}
