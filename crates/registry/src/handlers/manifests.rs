//! Manifests: GET and HEAD (pulled through for a cached repository), PUT and DELETE.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use kache_oci::distribution::Route;
use kache_oci::{ParsedManifest, Reference, RepoName, media_type};
use kache_store::MAX_MANIFEST_SIZE;

use super::headers::{DOCKER_CONTENT_DIGEST, OCI_SUBJECT, content_length, hv};
use crate::Registry;
use crate::content::Requester;
use crate::error::{Code, Error, Result};

impl Registry {
    pub(super) async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        head: bool,
        who: &Requester,
    ) -> Result<Response> {
        let mut h = HeaderMap::new();
        let served = self.inner.content.manifest(repo, reference, who).await?;
        Self::cache_header(&served, &mut h);
        let m = served.value;
        h.insert(header::CONTENT_TYPE, hv(&m.media_type));
        h.insert(DOCKER_CONTENT_DIGEST, hv(m.digest.to_string()));
        h.insert(header::ETAG, hv(format!("\"{}\"", m.digest)));
        h.insert(header::CONTENT_LENGTH, hv(m.bytes.len().to_string()));
        if head {
            return Ok((StatusCode::OK, h).into_response());
        }
        self.inner.metrics.bytes_out.inc_by(m.bytes.len() as u64);
        Ok((StatusCode::OK, h, m.bytes).into_response())
    }

    pub(super) async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        req: Request,
    ) -> Result<Response> {
        if content_length(&req).is_some_and(|l| l > MAX_MANIFEST_SIZE) {
            return Err(too_large());
        }
        let content_type = pushed_type(req.headers())?;
        let bytes = read_manifest(req.into_body()).await?;
        self.inner.metrics.bytes_in.inc_by(bytes.len() as u64);
        let parsed = ParsedManifest::parse(&bytes, Some(&content_type))
            .map_err(|e| Error::new(Code::ManifestInvalid, e.to_string()))?;
        let digest = self
            .inner
            .store
            .put_manifest(repo, reference, bytes, &parsed)
            .await?;
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            hv(Route::Manifest(repo.clone(), Reference::Digest(digest.clone())).path()),
        );
        h.insert(DOCKER_CONTENT_DIGEST, hv(digest.to_string()));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        if let Some(s) = &parsed.subject {
            h.insert(OCI_SUBJECT, hv(s.digest.to_string()));
        }
        Ok((StatusCode::CREATED, h).into_response())
    }

    pub(super) async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Response> {
        self.inner.store.delete_manifest(repo, reference).await?;
        Ok(StatusCode::ACCEPTED.into_response())
    }
}

/// The media type a manifest is pushed as: the spec has the client name it in `Content-Type`,
/// and a registry serves it back with it, so a push without one, or with one that names no
/// manifest kache takes, is refused as distribution refuses it.
fn pushed_type(headers: &HeaderMap) -> Result<String> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(Error::new(
            Code::ManifestInvalid,
            format!(
                "a manifest is pushed with its media type in Content-Type, one of {}",
                media_type::MANIFEST_TYPES.join(", ")
            ),
        ));
    };
    let text = value.to_str().unwrap_or("");
    let essence = media_type::essence(text);
    if !media_type::MANIFEST_TYPES.contains(&essence) {
        return Err(Error::new(
            Code::ManifestInvalid,
            format!(
                "Content-Type {:?} is not a manifest media type kache takes ({})",
                String::from_utf8_lossy(value.as_bytes()),
                media_type::MANIFEST_TYPES.join(", ")
            ),
        ));
    }
    Ok(essence.to_owned())
}

fn too_large() -> Error {
    Error::new(
        Code::ManifestInvalid,
        format!("manifest is larger than {MAX_MANIFEST_SIZE} bytes"),
    )
    .status(StatusCode::PAYLOAD_TOO_LARGE)
}

/// A pushed manifest's bytes, refused past [`MAX_MANIFEST_SIZE`] even when the client sent
/// no `Content-Length` (or a false one).
async fn read_manifest(body: Body) -> Result<Bytes> {
    let body = http_body_util::Limited::new(body, MAX_MANIFEST_SIZE as usize);
    match body.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Error::new(
            Code::ManifestInvalid,
            format!("reading the manifest failed: {e}"),
        )),
    }
}
