//! The referrers of a subject digest, as an OCI index, optionally filtered by `artifactType`.
//! A cached repository's are the upstream's with the cache's own ([`crate::content`]).

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kache_oci::{Digest, RepoName, media_type};
use serde_json::json;

use super::headers::{OCI_FILTERS_APPLIED, Params};
use crate::Registry;
use crate::content::Requester;
use crate::error::Result;

impl Registry {
    pub(super) async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        p: &Params,
        who: &Requester,
    ) -> Result<Response> {
        let filter = p.get("artifactType");
        let mut h = HeaderMap::new();
        let served = self.inner.content.referrers(repo, subject, who).await?;
        Self::cache_header(&served, &mut h);
        let mut manifests = served.value;
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
