//! The referrers of a subject digest, as an OCI index, optionally filtered by `artifactType`.

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kache_oci::{Descriptor, Digest, RepoName, media_type};
use serde_json::json;

use super::headers::{OCI_FILTERS_APPLIED, Params};
use crate::Registry;
use crate::error::Result;

impl Registry {
    pub(super) fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        p: &Params,
    ) -> Result<Response> {
        let filter = p.get("artifactType");
        let manifests: Vec<Descriptor> = self
            .inner
            .store
            .referrers(repo, subject)?
            .into_iter()
            .filter(|r| filter.is_none_or(|f| r.record.artifact_type.as_ref() == Some(f)))
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
        let mut h = HeaderMap::new();
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
