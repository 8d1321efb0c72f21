//! A successful upstream answer, its headers read and its body still to come.

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt as _};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use kache_oci::digest::Digest;

use crate::error::{UpstreamError, describe, error_message};

/// The header registries put a content digest in.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// A successful upstream answer whose body has not been read yet.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: reqwest::Response,
    host: String,
}

impl UpstreamResponse {
    /// `Content-Type`, as the upstream wrote it (parameters included).
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE)?.to_str().ok()
    }

    /// `Docker-Content-Digest`, if present and valid.
    pub fn digest(&self) -> Option<Digest> {
        self.headers
            .get(DOCKER_CONTENT_DIGEST)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `Content-Length`, if present and valid (also on HEAD answers, which have no body).
    pub fn content_length(&self) -> Option<u64> {
        self.headers
            .get(CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The body as it arrives. A stall longer than the request timeout ends it with an error.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send + 'static {
        let host = self.host;
        self.body
            .bytes_stream()
            .map_err(move |e| UpstreamError::Transport(describe(&host, e)))
    }

    /// The whole body, refused with [`UpstreamError::TooLarge`] past `limit` bytes, for
    /// manifests and other small documents.
    pub async fn bytes_limited(mut self, limit: u64) -> Result<Bytes, UpstreamError> {
        if self.content_length().is_some_and(|len| len > limit) {
            return Err(UpstreamError::TooLarge(limit));
        }
        let mut buf = BytesMut::with_capacity(self.content_length().unwrap_or(0) as usize);
        // Each pass adds a chunk and the total is capped, so this ends with the body or the cap.
        while let Some(chunk) = self
            .body
            .chunk()
            .await
            .map_err(|e| UpstreamError::Transport(describe(&self.host, e)))?
        {
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(UpstreamError::TooLarge(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

/// `resp` as an [`UpstreamResponse`] when it is a success, else the error it stands for.
pub(crate) async fn check(
    host: &str,
    mut resp: reqwest::Response,
) -> Result<UpstreamResponse, UpstreamError> {
    let status = resp.status();
    if status.is_success() {
        let headers = std::mem::take(resp.headers_mut());
        return Ok(UpstreamResponse {
            status,
            headers,
            body: resp,
            host: host.to_owned(),
        });
    }
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let message = error_message(host, resp).await;
    Err(match status.as_u16() {
        401 => UpstreamError::Unauthorized(message),
        403 => UpstreamError::Denied(message),
        404 => UpstreamError::NotFound(message),
        429 => UpstreamError::TooManyRequests {
            retry_after,
            message,
        },
        s => UpstreamError::Status { status: s, message },
    })
}
