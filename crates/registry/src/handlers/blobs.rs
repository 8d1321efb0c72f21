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

use crate::content::{Blob, Requester, Want};

use super::headers::{DOCKER_CONTENT_DIGEST, RangeSpec, hv, parse_range};
use crate::Registry;
use crate::error::{Code, Error, Result};

impl Registry {
    pub(super) async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        want: Want,
        headers: &HeaderMap,
        who: &Requester,
    ) -> Result<Response> {
        let mut h = HeaderMap::new();
        h.insert(DOCKER_CONTENT_DIGEST, hv(digest.to_string()));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(header::ETAG, hv(format!("\"{digest}\"")));
        let served = self.inner.content.blob(repo, digest, want, who).await?;
        Self::cache_header(&served, &mut h);
        match served.value {
            Blob::Size(size) => {
                if served.outcome != Some(CacheOutcome::Miss) {
                    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                }
                h.insert(header::CONTENT_LENGTH, hv(size.to_string()));
                Ok((StatusCode::OK, h).into_response())
            }
            // Range is ignored on a miss (RFC 9110 allows it).
            Blob::Fetching(flight) => Ok(self.stream_flight(flight, h)),
            Blob::File(file, size) => {
                h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
                let (status, start, len) = byte_range(headers, size, &mut h)?;
                h.insert(header::CONTENT_LENGTH, hv(len.to_string()));
                Ok(self.send_file(file, status, start, len, h).await)
            }
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
