//! Handlers of the Distribution API: thin translations between HTTP and the store.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http_body_util::BodyExt;
use kache_http::SendFile;
use kache_oci::api::{Route, UploadId};
use kache_oci::{Descriptor, Digest, ParsedManifest, Reference, RepoName, media_type};
use kache_store::MAX_MANIFEST_SIZE;
use kache_wire::{CACHE_HEADER, CacheOutcome, WarmRequest};
use serde_json::json;
use uuid::Uuid;

use crate::Registry;
use crate::error::{Code, Error, Result, range_header};
use crate::pull::{Origin, PullThrough};

const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";
const OCI_SUBJECT: &str = "oci-subject";
const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";

type Params = HashMap<String, String>;

fn params(req: &Request) -> Params {
    Query::<Params>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default()
}

fn unsupported(method: &Method, allow: &'static str) -> Error {
    Error::new(
        Code::Unsupported,
        format!("method {method} is not supported here"),
    )
    .header(header::ALLOW, allow)
}

fn hv(s: impl AsRef<str>) -> HeaderValue {
    HeaderValue::from_str(s.as_ref()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

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

/// The request's `Content-Length`, when it sends one.
fn content_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

fn digest_param(p: &Params, key: &str) -> Result<Option<Digest>> {
    p.get(key)
        .map(|d| d.parse::<Digest>().map_err(Error::from))
        .transpose()
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

    /// The pull-through side and the upstream of `repo`, when both exist.
    fn origin(&self, repo: &RepoName) -> Option<(&PullThrough, Origin)> {
        let pull = self.inner.pull.as_ref()?;
        Some((pull, pull.origin(repo)?))
    }

    fn count_cache(&self, kind: &'static str, outcome: CacheOutcome) {
        self.inner
            .metrics
            .cache
            .get_or_create(&crate::metrics::CacheLabels {
                kind,
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) async fn dispatch(&self, route: Route, req: Request) -> Result<Response> {
        let method = req.method().clone();
        let store = &self.inner.store;
        match (route, method) {
            (Route::Base, Method::GET | Method::HEAD) => Ok(StatusCode::OK.into_response()),
            (Route::Base, m) => Err(unsupported(&m, "GET, HEAD")),

            (Route::Blob(repo, d), m @ (Method::GET | Method::HEAD)) => {
                self.get_blob(&repo, &d, m == Method::HEAD, req.headers())
                    .await
            }
            (Route::Blob(repo, d), Method::DELETE) => {
                store.delete_blob(&repo, &d).await?;
                Ok(StatusCode::ACCEPTED.into_response())
            }
            (Route::Blob(..), m) => Err(unsupported(&m, "GET, HEAD, DELETE")),

            (Route::Manifest(repo, r), m @ (Method::GET | Method::HEAD)) => {
                self.get_manifest(&repo, &r, m == Method::HEAD).await
            }
            (Route::Manifest(repo, r), Method::PUT) => self.put_manifest(&repo, &r, req).await,
            (Route::Manifest(repo, r), Method::DELETE) => {
                store.delete_manifest(&repo, &r).await?;
                Ok(StatusCode::ACCEPTED.into_response())
            }
            (Route::Manifest(..), m) => Err(unsupported(&m, "GET, HEAD, PUT, DELETE")),

            (Route::UploadStart(repo), Method::POST) => self.start_upload(&repo, req).await,
            (Route::UploadStart(..), m) => Err(unsupported(&m, "POST")),
            (Route::Upload(repo, id), m) => {
                let id = Uuid::from_u128(id.0);
                match m {
                    Method::GET => {
                        let s = store.upload_status(&repo, &id).await?;
                        Ok(
                            (StatusCode::NO_CONTENT, upload_headers(&repo, &id, s.offset))
                                .into_response(),
                        )
                    }
                    Method::PATCH => self.patch_upload(&repo, &id, req).await,
                    Method::PUT => self.finish_upload(&repo, &id, req).await,
                    Method::DELETE => {
                        store.cancel_upload(&repo, &id).await?;
                        Ok(StatusCode::NO_CONTENT.into_response())
                    }
                    m => Err(unsupported(&m, "GET, PATCH, PUT, DELETE")),
                }
            }

            (Route::Tags(repo), Method::GET) => self.list_tags(&repo, &params(&req)),
            (Route::Tags(..), m) => Err(unsupported(&m, "GET")),
            (Route::Referrers(repo, d), Method::GET) => self.referrers(&repo, &d, &params(&req)),
            (Route::Referrers(..), m) => Err(unsupported(&m, "GET")),
        }
    }

    /// The request body as a stream of chunks, counted as bytes received.
    fn body_stream(
        &self,
        req: Request,
    ) -> impl Stream<Item = std::result::Result<Bytes, axum::Error>> + use<> {
        let counter = self.inner.metrics.bytes_in.clone();
        req.into_body().into_data_stream().inspect_ok(move |b| {
            counter.inc_by(b.len() as u64);
        })
    }

    // ---- blobs ----

    async fn get_blob(
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
        let store = &self.inner.store;
        let origin = self.origin(repo);
        // A cached repository may serve a blob another one already fetched (same digest, same
        // bytes): link it rather than download it again.
        if origin.is_some() && store.stat_blob(repo, digest)?.is_none() {
            store.mount_blob(repo, digest, None).await?;
        }
        let blob = if head {
            store.stat_blob(repo, digest)?.map(|size| (None, size))
        } else {
            match store.open_blob(repo, digest).await {
                Ok(b) => Some((Some(b.file), b.size)),
                Err(kache_store::StoreError::BlobUnknown) => None,
                Err(e) => return Err(e.into()),
            }
        };
        let Some((file, size)) = blob else {
            // A HEAD answers from the cache alone: pushing clients ask it before uploading
            // (and must hear 404, not wait for an upstream), while pulls GET.
            let Some((pull, origin)) = origin.filter(|_| !head) else {
                return Err(kache_store::StoreError::BlobUnknown.into());
            };
            // A miss: stream the single flight's file as it grows. Range is ignored on a miss
            // (RFC 9110 allows it).
            let flight = pull.blob(store, repo, &origin, digest, None).await?;
            self.count_cache("blob", CacheOutcome::Miss);
            h.insert(
                CACHE_HEADER,
                HeaderValue::from_static(CacheOutcome::Miss.as_str()),
            );
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
            return Ok(resp);
        };
        if origin.is_some() {
            self.count_cache("blob", CacheOutcome::Hit);
            h.insert(
                CACHE_HEADER,
                HeaderValue::from_static(CacheOutcome::Hit.as_str()),
            );
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let Some(file) = file else {
            h.insert(header::CONTENT_LENGTH, hv(size.to_string()));
            return Ok((StatusCode::OK, h).into_response());
        };
        let (status, start, len) = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            None => (StatusCode::OK, 0, size),
            Some(r) => match parse_range(r, size) {
                RangeSpec::Ignore => (StatusCode::OK, 0, size),
                RangeSpec::Unsatisfiable => {
                    return Err(Error::new(
                        Code::BlobUnknown,
                        format!("range {r:?} is outside the blob of {size} bytes"),
                    )
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}")));
                }
                RangeSpec::Bytes(start, end) => {
                    h.insert(
                        header::CONTENT_RANGE,
                        hv(format!("bytes {start}-{end}/{size}")),
                    );
                    (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
                }
            },
        };
        h.insert(header::CONTENT_LENGTH, hv(len.to_string()));
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
        Ok(resp)
    }

    async fn start_upload(&self, repo: &RepoName, req: Request) -> Result<Response> {
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

    async fn patch_upload(&self, repo: &RepoName, id: &Uuid, req: Request) -> Result<Response> {
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

    async fn finish_upload(&self, repo: &RepoName, id: &Uuid, req: Request) -> Result<Response> {
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

    // ---- manifests ----

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        head: bool,
    ) -> Result<Response> {
        let store = &self.inner.store;
        let mut h = HeaderMap::new();
        let m = match self.origin(repo) {
            Some((pull, origin)) => {
                let (m, outcome) = pull.manifest(store, repo, &origin, reference, None).await?;
                self.count_cache("manifest", outcome);
                h.insert(CACHE_HEADER, HeaderValue::from_static(outcome.as_str()));
                m
            }
            None => store.get_manifest(repo, reference).await?,
        };
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

    async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        req: Request,
    ) -> Result<Response> {
        let too_large = || {
            Error::new(
                Code::ManifestInvalid,
                format!("manifest is larger than {MAX_MANIFEST_SIZE} bytes"),
            )
            .status(StatusCode::PAYLOAD_TOO_LARGE)
        };
        if content_length(&req).is_some_and(|l| l > MAX_MANIFEST_SIZE) {
            return Err(too_large());
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = http_body_util::Limited::new(req.into_body(), MAX_MANIFEST_SIZE as usize);
        let bytes = match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(e) => {
                return Err(Error::new(
                    Code::ManifestInvalid,
                    format!("reading the manifest failed: {e}"),
                ));
            }
        };
        self.inner.metrics.bytes_in.inc_by(bytes.len() as u64);
        let parsed = ParsedManifest::parse(&bytes, content_type.as_deref())
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

    // ---- discovery ----

    fn list_tags(&self, repo: &RepoName, p: &Params) -> Result<Response> {
        let n = match p.get("n") {
            None => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                Error::new(Code::Unsupported, format!("n={n:?} is not a number"))
                    .status(StatusCode::BAD_REQUEST)
            })?),
        };
        let last = p.get("last").map(String::as_str);
        // One more than asked tells whether a next page exists.
        let want = n.map_or(usize::MAX, |n| n.saturating_add(1));
        let mut tags = self.inner.store.list_tags(repo, last, want)?;
        let mut h = HeaderMap::new();
        if let Some(n) = n
            && tags.len() > n
        {
            tags.truncate(n);
            if let Some(l) = tags.last() {
                h.insert(
                    header::LINK,
                    hv(format!(
                        "</v2/{repo}/tags/list?n={n}&last={l}>; rel=\"next\""
                    )),
                );
            }
        }
        Ok((
            h,
            axum::Json(json!({ "name": repo.as_str(), "tags": tags })),
        )
            .into_response())
    }

    fn referrers(&self, repo: &RepoName, subject: &Digest, p: &Params) -> Result<Response> {
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

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Not a single byte range we understand: RFC 9110 says serve the whole representation.
    Ignore,
    Unsatisfiable,
    /// First and last byte, inclusive.
    Bytes(u64, u64),
}

fn parse_range(h: &str, size: u64) -> RangeSpec {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeSpec::Ignore;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) if n > 0 && size > 0 => {
            RangeSpec::Bytes(size.saturating_sub(n), size - 1)
        }
        (true, _, Some(_)) => RangeSpec::Unsatisfiable,
        (false, Some(s), _) if s >= size => RangeSpec::Unsatisfiable,
        (false, Some(s), None) if b.trim().is_empty() => RangeSpec::Bytes(s, size - 1),
        (false, Some(s), Some(e)) if e >= s => RangeSpec::Bytes(s, e.min(size - 1)),
        _ => RangeSpec::Ignore,
    }
}

/// Where a chunk (PATCH, or the closing PUT's last one) says it starts, from its
/// `Content-Range`; the store refuses it unless that is the upload's offset.
fn chunk_start(req: &Request) -> Result<Option<u64>> {
    let Some(v) = req.headers().get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let (start, end) = v
        .to_str()
        .ok()
        .and_then(parse_content_range)
        .ok_or_else(|| {
            Error::new(
                Code::BlobUploadInvalid,
                format!("Content-Range {v:?} is not <start>-<end>"),
            )
        })?;
    if content_length(req).is_some_and(|l| l != end - start + 1) {
        return Err(Error::new(
            Code::BlobUploadInvalid,
            "Content-Range and Content-Length disagree",
        ));
    }
    Ok(Some(start))
}

/// `Content-Range: <start>-<end>` of an upload chunk (also accepts a `bytes ` prefix).
fn parse_content_range(h: &str) -> Option<(u64, u64)> {
    let h = h.trim();
    let h = h.strip_prefix("bytes ").unwrap_or(h);
    let (a, b) = h.split_once('-')?;
    let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
    (b >= a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeSpec::Bytes(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeSpec::Bytes(90, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), RangeSpec::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeSpec::Bytes(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), RangeSpec::Bytes(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=x-1", 100), RangeSpec::Ignore);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199"), Some((100, 199)));
        assert_eq!(parse_content_range("5-2"), None);
        assert_eq!(parse_content_range("0-"), None);
        assert_eq!(parse_content_range("abc"), None);
    }
}
