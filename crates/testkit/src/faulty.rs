//! An upstream registry that misbehaves on demand: it serves one image over the read side of the
//! OCI Distribution API (GET/HEAD of `/v2/`, manifests by tag or digest, blobs), with
//! distribution's headers, and the test can make any manifest or blob reset the connection
//! mid-body, lie about its digest, drip slowly, or answer 500 or 429.
//!
//! This is the one stand-in for a real registry in the tests: no real registry produces these
//! faults when asked, and a cache has to survive each of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;

use super::background::ServerThread;
use super::image::{Blob, Content, media_type};

/// Upper bound on how long one slow drip may take, so a test cannot hang on it.
const MAX_DRIP: Duration = Duration::from_secs(300);

/// How one manifest or blob misbehaves on GET (and, for the status faults, on HEAD).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Headers as usual, Content-Length of the whole body, then the first `after` bytes, then
    /// the connection is closed: no more bytes, no chunk terminator, nothing to tell the client
    /// but a short body.
    Reset { after: usize },
    /// The right length and headers (Docker-Content-Digest included), but the last byte is
    /// changed: everything looks right until the very end, so only a digest check catches it.
    WrongBytes,
    /// `chunk` bytes, then a pause of `every`, until the body is complete.
    SlowDrip { chunk: usize, every: Duration },
    /// This status with a distribution-style JSON error body (e.g. 500, 503, 404).
    Status(u16),
    /// 429 with `Retry-After: 7` and a TOOMANYREQUESTS error, like Docker Hub's rate limit.
    TooManyRequests,
    /// The right bytes without a Content-Length, in chunked encoding, as registries behind
    /// some proxies and CDNs send them: nobody knows the size before the end.
    Chunked,
    /// Other bytes in place of the body, announced with their own digest and this media type:
    /// an answer honest about itself that a cache must still refuse (a schema1 manifest, one
    /// over the size limit).
    Replace { bytes: Vec<u8>, media_type: String },
    /// No answer at all, as from an upstream behind a black hole (dropped packets, a resolver
    /// that never answers), until the test clears a fault or stops the upstream; then the
    /// usual answer. Only the client's own timeout ends the wait otherwise.
    Silence,
}

impl Fault {
    /// Faults that replace the whole answer, and so apply to HEAD as well.
    fn is_status(&self) -> bool {
        matches!(
            self,
            Fault::Status(_) | Fault::TooManyRequests | Fault::Silence
        )
    }
}

/// One request the upstream saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query, e.g. `/v2/library/app/blobs/sha256:...`.
    pub uri: String,
    /// The status answered.
    pub status: u16,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
}

#[derive(Debug)]
struct ArmedFault {
    fault: Fault,
    /// How many more requests get it; `None` for every request.
    remaining: Option<u32>,
}

#[derive(Debug)]
struct Upstream {
    name: String,
    tag: String,
    top: Blob,
    /// Every blob by digest, manifests included (distribution serves those as blobs too).
    blobs: HashMap<String, Blob>,
    /// Faults by tag or digest.
    faults: Mutex<HashMap<String, ArmedFault>>,
    seen: Mutex<Vec<SeenRequest>>,
    /// Counts the clears: a silenced request waits for the next one.
    cleared: tokio::sync::watch::Sender<u64>,
    /// Requests held by [`Fault::Silence`] right now.
    held: std::sync::atomic::AtomicUsize,
}

/// The misbehaving upstream; stopped when dropped.
#[derive(Debug)]
pub struct FaultyUpstream {
    state: Arc<Upstream>,
    server: ServerThread,
}

impl FaultyUpstream {
    /// Serves `content` as `<name>:<tag>` on a free port of 127.0.0.1. For an index, the
    /// child manifests are served by digest as well.
    pub fn start(name: &str, tag: &str, content: &dyn Content) -> Self {
        let blobs = content
            .blobs()
            .into_iter()
            .map(|b| (b.digest.clone(), b.clone()))
            .collect();
        let state = Arc::new(Upstream {
            name: name.to_owned(),
            tag: tag.to_owned(),
            top: content.top().clone(),
            blobs,
            faults: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            cleared: tokio::sync::watch::channel(0).0,
            held: std::sync::atomic::AtomicUsize::new(0),
        });
        let server = ServerThread::start("faulty-upstream", router(state.clone()));
        FaultyUpstream { state, server }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// `127.0.0.1:PORT`: the registry host of image references.
    pub fn host(&self) -> String {
        self.addr().to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The repository name it serves.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// `/v2/<name>/manifests/<reference>`.
    pub fn manifest_path(&self, reference: &str) -> String {
        format!("/v2/{}/manifests/{reference}", self.state.name)
    }

    /// `/v2/<name>/blobs/<digest>`.
    pub fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.state.name)
    }

    /// From now on, every request for `target` gets `fault`. The tag targets manifest requests
    /// by tag; a digest targets requests by that digest, manifest and blob endpoints alike.
    /// A new fault for the same target replaces the old one.
    pub fn fail(&self, target: &str, fault: Fault) {
        self.arm(target, fault, None);
    }

    /// The next `times` requests for `target` get `fault`; later ones are served normally.
    /// (HEAD requests use up a count only for the status faults, which they receive.)
    pub fn fail_times(&self, target: &str, fault: Fault, times: u32) {
        self.arm(target, fault, Some(times));
    }

    fn arm(&self, target: &str, fault: Fault, remaining: Option<u32>) {
        assert!(
            target == self.state.tag || self.state.blobs.contains_key(target),
            "{target} is neither the tag {:?} nor a digest this upstream serves",
            self.state.tag
        );
        if let Fault::SlowDrip { chunk, every } = &fault {
            assert!(*chunk > 0, "a slow drip needs a chunk size above 0");
            let size = self
                .state
                .blobs
                .get(target)
                .unwrap_or(&self.state.top)
                .size();
            let total = every.saturating_mul(size.div_ceil(*chunk) as u32);
            assert!(
                total <= MAX_DRIP,
                "a drip of {chunk} bytes every {every:?} takes {total:?} for {target}, \
                 over the {MAX_DRIP:?} bound"
            );
        }
        let armed = ArmedFault { fault, remaining };
        lock(&self.state.faults).insert(target.to_owned(), armed);
    }

    /// Serves `target` normally again (and answers every silenced request).
    pub fn clear(&self, target: &str) {
        lock(&self.state.faults).remove(target);
        self.state.cleared.send_modify(|n| *n += 1);
    }

    pub fn clear_all(&self) {
        lock(&self.state.faults).clear();
        self.state.cleared.send_modify(|n| *n += 1);
    }

    /// How many requests [`Fault::Silence`] holds unanswered right now.
    pub fn held(&self) -> usize {
        self.state.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.state.seen).clone()
    }

    /// How many requests with this method had `uri_substring` in their path and query.
    pub fn count_requests(&self, method: &str, uri_substring: &str) -> usize {
        lock(&self.state.seen)
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.uri.contains(uri_substring))
            .count()
    }

    /// Stops serving: connections are dropped and new ones refused, as if the host were down.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Serves again on the same port, with the same content, faults and request record.
    pub fn start_again(&mut self) {
        let addr = self.server.addr();
        self.server.stop();
        self.server = ServerThread::start_on("faulty-upstream", addr, router(self.state.clone()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking handler must not hide the record from the test that reads it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn router(state: Arc<Upstream>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

async fn handle(State(up): State<Arc<Upstream>>, request: Request) -> Response {
    let method = request.method().clone();
    let uri = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let mut cleared = up.cleared.subscribe();
    let (mut response, fault) = answer(&up, &method, request.uri().path(), request.headers());
    if fault == Some(Fault::Silence) {
        use std::sync::atomic::Ordering;
        up.held.fetch_add(1, Ordering::SeqCst);
        // Dropped with the server when it stops; released by the next clear.
        let _ = cleared.changed().await;
        up.held.fetch_sub(1, Ordering::SeqCst);
    }
    set(
        &mut response,
        "docker-distribution-api-version",
        "registry/2.0",
    );
    lock(&up.seen).push(SeenRequest {
        method: method.to_string(),
        uri,
        status: response.status().as_u16(),
        fault,
    });
    response
}

/// What a request for `path` gets, and the fault applied to it.
fn answer(
    up: &Upstream,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> (Response, Option<Fault>) {
    if method != Method::GET && method != Method::HEAD {
        let r = error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read-only");
        return (r, None);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return (error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found"), None);
    };
    if rest.is_empty() {
        let mut r = Response::new(Body::from("{}"));
        set(
            &mut r,
            header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        );
        return (finish(r, method), None);
    }
    let (name, kind, reference) = if let Some((n, r)) = rest.rsplit_once("/manifests/") {
        (n, "manifests", r)
    } else if let Some((n, r)) = rest.rsplit_once("/blobs/") {
        (n, "blobs", r)
    } else if let Some(n) = rest.strip_suffix("/tags/list") {
        (n, "tags", "")
    } else {
        return (error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found"), None);
    };
    if name != up.name {
        let r = error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known",
        );
        return (r, None);
    }
    if kind == "tags" {
        let body = serde_json::json!({ "name": up.name, "tags": [up.tag] }).to_string();
        let mut r = Response::new(Body::from(body));
        set(
            &mut r,
            header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        );
        return (finish(r, method), None);
    }

    let blob = match kind {
        "manifests" if reference == up.tag => Some(&up.top),
        "manifests" => up.blobs.get(reference).filter(|b| is_manifest(b)),
        _ => up.blobs.get(reference),
    };
    let Some(blob) = blob else {
        let r = if kind == "manifests" {
            error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            )
        } else {
            error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            )
        };
        return (r, None);
    };

    let fault = take_fault(up, reference, method == Method::HEAD);
    let mut response = match &fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(*code).expect("a valid status code");
            let code = match *code {
                404 if kind == "manifests" => "MANIFEST_UNKNOWN",
                404 => "BLOB_UNKNOWN",
                401 => "UNAUTHORIZED",
                403 => "DENIED",
                _ => "UNKNOWN",
            };
            error(status, code, "fault injected by the test")
        }
        Some(Fault::TooManyRequests) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "You have reached your pull rate limit.",
            );
            set(&mut r, header::RETRY_AFTER, "7");
            r
        }
        _ => serve_blob(kind, blob, fault.as_ref(), headers),
    };
    if method == Method::HEAD {
        response = finish(response, method);
    }
    (response, fault)
}

/// The fault for `target`, using up one count of a limited one. HEAD requests only take the
/// status faults: they have no body to break.
fn take_fault(up: &Upstream, target: &str, head: bool) -> Option<Fault> {
    let mut faults = lock(&up.faults);
    let armed = faults.get_mut(target)?;
    if head && !armed.fault.is_status() {
        return None;
    }
    let fault = armed.fault.clone();
    match &mut armed.remaining {
        None => {}
        Some(0) => {
            faults.remove(target);
            return None;
        }
        Some(n) => {
            *n -= 1;
            if *n == 0 {
                faults.remove(target);
            }
        }
    }
    Some(fault)
}

fn is_manifest(blob: &Blob) -> bool {
    [
        media_type::OCI_MANIFEST,
        media_type::OCI_INDEX,
        media_type::DOCKER_MANIFEST,
        media_type::DOCKER_MANIFEST_LIST,
    ]
    .contains(&blob.media_type.as_str())
}

/// The answer for a manifest or blob, with a body fault applied. Honours a single
/// `Range: bytes=a-b` on blobs, as distribution does (clients resume with it).
fn serve_blob(kind: &str, blob: &Blob, fault: Option<&Fault>, headers: &HeaderMap) -> Response {
    if let Some(Fault::Replace { bytes, media_type }) = fault {
        let replaced = Blob {
            media_type: media_type.clone(),
            digest: super::image::sha256_digest(bytes),
            bytes: bytes.clone(),
        };
        return serve_blob(kind, &replaced, None, headers);
    }
    let mut bytes = blob.bytes.clone();
    if let (Some(Fault::WrongBytes), Some(last)) = (fault, bytes.last_mut()) {
        *last ^= 0xff;
    }
    let full = bytes.len();
    let range = if kind == "blobs" {
        headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_range(v, full))
    } else {
        None
    };
    let (status, bytes) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, bytes[start..=end].to_vec()),
        None => (StatusCode::OK, bytes),
    };
    let length = bytes.len();
    let body = match fault {
        Some(Fault::Reset { after }) => reset_body(bytes, *after),
        Some(Fault::SlowDrip { chunk, every }) => drip_body(bytes, *chunk, *every),
        Some(Fault::Chunked) => {
            let chunks: Vec<Result<Bytes, std::convert::Infallible>> = bytes
                .chunks(256 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Body::from_stream(futures_util::stream::iter(chunks))
        }
        _ => Body::from(bytes),
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    // Distribution serves manifests with their own media type and blobs as octets.
    let content_type = if kind == "manifests" {
        blob.media_type.as_str()
    } else {
        "application/octet-stream"
    };
    set(&mut r, header::CONTENT_TYPE, content_type);
    if fault != Some(&Fault::Chunked) {
        set(&mut r, header::CONTENT_LENGTH, &length.to_string());
    }
    set(&mut r, "docker-content-digest", &blob.digest);
    set(&mut r, header::ETAG, &format!("\"{}\"", blob.digest));
    if kind == "blobs" {
        set(&mut r, header::ACCEPT_RANGES, "bytes");
        set(&mut r, header::CACHE_CONTROL, "max-age=31536000");
    }
    if let Some((start, end)) = range {
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{end}/{full}"),
        );
    }
    r
}

/// `bytes=a-b` or `bytes=a-` within `len`, as an inclusive range; anything else is ignored.
fn parse_range(value: &str, len: usize) -> Option<(usize, usize)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start: usize = start.trim().parse().ok()?;
    let end: usize = match end.trim() {
        "" => len.checked_sub(1)?,
        e => e.parse::<usize>().ok()?.min(len.checked_sub(1)?),
    };
    (start <= end).then_some((start, end))
}

/// The first `after` bytes, then an error, which makes hyper close the connection without
/// finishing the body.
fn reset_body(bytes: Vec<u8>, after: usize) -> Body {
    let bytes = Bytes::from(bytes);
    let head = bytes.slice(..after.min(bytes.len()));
    let stream = futures_util::stream::unfold(0u8, move |step| {
        let head = head.clone();
        async move {
            match step {
                0 => Some((Ok::<Bytes, std::io::Error>(head), 1)),
                // A pause so hyper flushes what was sent before the connection goes.
                1 => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let e = std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "connection reset injected by the test",
                    );
                    Some((Err(e), 2))
                }
                _ => None,
            }
        }
    });
    Body::from_stream(stream)
}

/// `chunk` bytes at a time with a pause of `every` before each.
fn drip_body(bytes: Vec<u8>, chunk: usize, every: Duration) -> Body {
    let bytes = Bytes::from(bytes);
    let stream = futures_util::stream::unfold(0usize, move |offset| {
        let bytes = bytes.clone();
        async move {
            if offset >= bytes.len() {
                return None;
            }
            tokio::time::sleep(every).await;
            let end = (offset + chunk).min(bytes.len());
            Some((Ok::<Bytes, std::io::Error>(bytes.slice(offset..end)), end))
        }
    });
    Body::from_stream(stream)
}

/// A distribution-style JSON error.
fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body =
        serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    let body = body.to_string();
    let length = body.len();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    set(
        &mut r,
        header::CONTENT_TYPE,
        "application/json; charset=utf-8",
    );
    set(&mut r, header::CONTENT_LENGTH, &length.to_string());
    r
}

/// A HEAD answer keeps the headers of the GET (its Content-Length included) and loses its body.
fn finish(mut r: Response, method: &Method) -> Response {
    if method == Method::HEAD {
        let (parts, _) = r.into_parts();
        r = Response::from_parts(parts, Body::empty());
    }
    r
}

fn set(r: &mut Response, name: impl axum::http::header::IntoHeaderName, value: &str) {
    r.headers_mut()
        .insert(name, HeaderValue::from_str(value).expect("header value"));
}
