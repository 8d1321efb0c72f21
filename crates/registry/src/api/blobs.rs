//! Blobs: GET and HEAD from the cache (a byte range too) or streamed on a miss, and DELETE.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use kache_http::SendFile;
use kache_oci::{Digest, RepoName};
use kache_store::FlightStream;
use kache_wire::CacheOutcome;

use super::headers::{DOCKER_CONTENT_DIGEST, RangeSpec, hv, parse_range};
use crate::Registry;
use crate::error::{Code, Error, Result};

impl Registry {
    pub(super) async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        head: bool,
        headers: &HeaderMap,
    ) -> Result<Response> {
        let mut h = HeaderMap::new();
        h.insert(DOCKER_CONTENT_DIGEST, hv(digest.to_string()));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(header::ETAG, hv(format!("\"{digest}\"")));
        let origin = self.origin(repo);
        let Some((file, size)) = self
            .local_blob(repo, digest, head, origin.is_some())
            .await?
        else {
            let Some((pull, origin)) = origin else {
                return Err(kache_store::StoreError::BlobUnknown.into());
            };
            if head {
                // As the GET would answer, from the upstream's HEAD, without the body. A blob
                // the upstream will not size (absent, refused, unreachable) is unknown here: a
                // client pushing into a cached repository asks before uploading, and hears
                // 404 then.
                return match pull.blob_size(&origin, digest).await {
                    Ok(size) => {
                        self.cache_outcome("blob", CacheOutcome::Miss, &mut h);
                        h.insert(header::CONTENT_LENGTH, hv(size.to_string()));
                        Ok((StatusCode::OK, h).into_response())
                    }
                    Err(e) => Err(Error::new(
                        Code::BlobUnknown,
                        format!("blob unknown to the cache, and upstream: {e}"),
                    )),
                };
            }
            // Range is ignored on a miss (RFC 9110 allows it).
            let flight = pull
                .blob(&self.inner.store, repo, &origin, digest, None)
                .await?;
            self.cache_outcome("blob", CacheOutcome::Miss, &mut h);
            return Ok(self.stream_flight(flight, h));
        };
        if origin.is_some() {
            self.cache_outcome("blob", CacheOutcome::Hit, &mut h);
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let Some(file) = file else {
            h.insert(header::CONTENT_LENGTH, hv(size.to_string()));
            return Ok((StatusCode::OK, h).into_response());
        };
        let (status, start, len) = byte_range(headers, size, &mut h)?;
        h.insert(header::CONTENT_LENGTH, hv(len.to_string()));
        Ok(self.send_file(file, status, start, len, h).await)
    }

    /// The blob as this registry holds it, when it does: its size, and its file unless only
    /// its `head` is asked.
    async fn local_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        head: bool,
        cached: bool,
    ) -> Result<Option<(Option<tokio::fs::File>, u64)>> {
        let store = &self.inner.store;
        // A cached repository may serve a blob another one already fetched (same digest, same
        // bytes): link it rather than download it again.
        if cached && store.stat_blob(repo, digest)?.is_none() {
            store.mount_blob(repo, digest, None).await?;
        }
        if head {
            return Ok(store.stat_blob(repo, digest)?.map(|size| (None, size)));
        }
        match store.open_blob(repo, digest).await {
            Ok(b) => Ok(Some((Some(b.file), b.size))),
            Err(kache_store::StoreError::BlobUnknown) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `len` bytes of a cached blob's `file` from `start`.
    async fn send_file(
        &self,
        file: tokio::fs::File,
        status: StatusCode,
        start: u64,
        len: u64,
        h: HeaderMap,
    ) -> Response {
        let counter = self.inner.metrics.bytes_out.clone();
        let file = Arc::new(file.into_std().await);
        // kache's own server sends the file with sendfile(2) and drops the stream unread;
        // hyper (HTTP/2, or a connection that pushed) streams it.
        let send = SendFile::new(file.clone(), start, len).counting(counter.clone());
        let stream = kache_store::read_range(file, start, len).inspect_ok(move |b| {
            counter.inc_by(b.len() as u64);
        });
        let mut resp = (status, h, Body::from_stream(stream)).into_response();
        resp.extensions_mut().insert(send);
        resp
    }

    /// A miss: the single flight's file, streamed as it grows.
    fn stream_flight(&self, flight: FlightStream, mut h: HeaderMap) -> Response {
        if let Some(size) = flight.size {
            h.insert(header::CONTENT_LENGTH, hv(size.to_string()));
        }
        let counter = self.inner.metrics.bytes_out.clone();
        let body = flight.body.inspect_ok({
            let counter = counter.clone();
            move |b| {
                counter.inc_by(b.len() as u64);
            }
        });
        let mut resp = (StatusCode::OK, h, Body::from_stream(body)).into_response();
        // kache's own server sends the flight's file as it grows with sendfile(2), rather
        // than reading it into user space to write it out again.
        if let (Some(size), Some(follow)) = (flight.size, flight.follow) {
            let file = follow.file.clone();
            let growth: kache_http::Growth = Arc::new(move |sent| {
                let follow = follow.clone();
                Box::pin(async move { follow.ready(sent).await })
            });
            resp.extensions_mut().insert(
                SendFile::new(file, 0, size)
                    .growing(growth)
                    .counting(counter),
            );
        }
        resp
    }

    pub(super) async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Response> {
        self.inner.store.delete_blob(repo, digest).await?;
        Ok(StatusCode::ACCEPTED.into_response())
    }
}

/// The part of a blob of `size` bytes to send, as its status, first byte and length; a
/// partial answer's `Content-Range` goes into `h`.
fn byte_range(headers: &HeaderMap, size: u64, h: &mut HeaderMap) -> Result<(StatusCode, u64, u64)> {
    let Some(r) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok((StatusCode::OK, 0, size));
    };
    match parse_range(r, size) {
        RangeSpec::Ignore => Ok((StatusCode::OK, 0, size)),
        RangeSpec::Unsatisfiable => Err(Error::new(
            Code::BlobUnknown,
            format!("range {r:?} is outside the blob of {size} bytes"),
        )
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(header::CONTENT_RANGE, format!("bytes */{size}"))),
        RangeSpec::Bytes(start, end) => {
            h.insert(
                header::CONTENT_RANGE,
                hv(format!("bytes {start}-{end}/{size}")),
            );
            Ok((StatusCode::PARTIAL_CONTENT, start, end - start + 1))
        }
    }
}
