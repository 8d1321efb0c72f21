//! Blob pushes: in one POST, mounted from another repository, or in an upload session.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use kache_oci::distribution::{Route, UploadId};
use kache_oci::{Digest, RepoName};
use uuid::Uuid;

use super::headers::{DOCKER_CONTENT_DIGEST, DOCKER_UPLOAD_UUID, chunk_start, content_length};
use super::headers::{digest_param, hv, params};
use crate::Registry;
use crate::error::{Code, Error, Result, range_header};

fn blob_location(repo: &RepoName, digest: &Digest) -> HeaderValue {
    hv(Route::Blob(repo.clone(), digest.clone()).path())
}

fn upload_headers(repo: &RepoName, id: &Uuid, offset: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::LOCATION,
        hv(Route::Upload(repo.clone(), UploadId(id.as_u128())).path()),
    );
    h.insert(header::RANGE, hv(range_header(offset)));
    h.insert(DOCKER_UPLOAD_UUID, hv(id.to_string()));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    h
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::LOCATION, blob_location(repo, digest));
    h.insert(DOCKER_CONTENT_DIGEST, hv(digest.to_string()));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    (StatusCode::CREATED, h).into_response()
}

impl Registry {
    /// The request body as a stream of chunks, counted as bytes received.
    fn body_stream(&self, req: Request) -> kache_store::Body {
        let counter = self.inner.metrics.bytes_in.clone();
        Box::pin(
            req.into_body()
                .into_data_stream()
                .inspect_ok(move |b| {
                    counter.inc_by(b.len() as u64);
                })
                .map_err(kache_store::BodyError::from),
        )
    }

    pub(super) async fn start_upload(&self, repo: &RepoName, req: Request) -> Result<Response> {
        let p = params(&req);
        let store = &self.inner.store;
        if let Some(d) = digest_param(&p, "mount")? {
            let from = p.get("from").map(|f| f.parse::<RepoName>()).transpose()?;
            if store.mount_blob(repo, &d, from.as_ref()).await?.is_some() {
                return Ok(blob_created(repo, &d));
            }
            // Nothing to mount: the spec asks for an ordinary upload session instead.
        } else if let Some(d) = digest_param(&p, "digest")? {
            if let Some(len) = content_length(&req) {
                store.check_room(len)?;
            }
            store.put_blob(repo, &d, self.body_stream(req)).await?;
            return Ok(blob_created(repo, &d));
        }
        let s = store.start_upload(repo).await?;
        Ok((StatusCode::ACCEPTED, upload_headers(repo, &s.id, 0)).into_response())
    }

    pub(super) async fn upload_status(&self, repo: &RepoName, id: &Uuid) -> Result<Response> {
        let s = self.inner.store.upload_status(repo, id).await?;
        Ok((StatusCode::NO_CONTENT, upload_headers(repo, id, s.offset)).into_response())
    }

    pub(super) async fn patch_upload(
        &self,
        repo: &RepoName,
        id: &Uuid,
        req: Request,
    ) -> Result<Response> {
        let start = chunk_start(&req)?;
        if let Some(len) = content_length(&req) {
            self.inner.store.check_room(len)?;
        }
        let s = self
            .inner
            .store
            .append_upload(repo, id, start, self.body_stream(req))
            .await?;
        Ok((StatusCode::ACCEPTED, upload_headers(repo, id, s.offset)).into_response())
    }

    pub(super) async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &Uuid,
        req: Request,
    ) -> Result<Response> {
        let d = digest_param(&params(&req), "digest")?.ok_or_else(|| {
            Error::new(
                Code::DigestInvalid,
                "the digest query parameter is required to complete an upload",
            )
        })?;
        let start = chunk_start(&req)?;
        if let Some(len) = content_length(&req) {
            self.inner.store.check_room(len)?;
        }
        self.inner
            .store
            .complete_upload(repo, id, start, &d, self.body_stream(req))
            .await?;
        Ok(blob_created(repo, &d))
    }

    pub(super) async fn cancel_upload(&self, repo: &RepoName, id: &Uuid) -> Result<Response> {
        self.inner.store.cancel_upload(repo, id).await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
}
