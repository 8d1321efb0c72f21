//! The Distribution API's wire vocabulary shared by the registry and the node proxy: the
//! endpoints a `/v2/...` path names and the spec's error codes.
//!
//! Paths are parsed raw (not percent-decoded). Repository names contain slashes, so routes are
//! recognised from the end of the path; the name is then validated against the spec's grammar,
//! which refuses `..`, `%` and anything else that could reach the filesystem.

use std::fmt;

use crate::{Digest, NameError, Reference, RepoName, mirror_repository};

/// An upload session id: a UUID as the registry issues them, kept as its canonical text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UploadId(pub u128);

impl std::str::FromStr for UploadId {
    type Err = ();

    /// Accepts the hyphenated lowercase form only (what the registry hands out).
    fn from_str(s: &str) -> Result<Self, ()> {
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return Err(());
        }
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(());
        }
        u128::from_str_radix(&hex, 16).map(UploadId).map_err(|_| ())
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

/// Why a path names no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0:?} is not an upload id")]
    UploadUnknown(String),
    /// A registry-mirror request whose `ns` names no registry, or no image with the path's
    /// repository.
    #[error("ns={ns:?}: {reason}")]
    Mirror { ns: String, reason: String },
}

impl From<crate::DigestError> for RouteError {
    fn from(e: crate::DigestError) -> Self {
        RouteError::Name(NameError::Digest(e))
    }
}

/// Whether a request reads (GET, HEAD) or writes: a path some reads find nothing at is invalid
/// to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Read,
    Write,
}

impl Intent {
    /// The access of an HTTP method.
    pub fn of(method: &str) -> Intent {
        match method {
            "GET" | "HEAD" => Intent::Read,
            _ => Intent::Write,
        }
    }
}

impl RouteError {
    /// The spec's code for this error (the status is [`RouteError::status`]).
    pub fn code(&self, intent: Intent) -> ErrorCode {
        match self {
            RouteError::NotFound(_) => ErrorCode::Unsupported,
            // A tag that cannot exist names no manifest: a read finds nothing (404, the answer
            // the manifest endpoint documents, as other registries give), a write is invalid.
            RouteError::Name(NameError::InvalidTag(_)) if intent == Intent::Read => {
                ErrorCode::ManifestUnknown
            }
            RouteError::Name(NameError::InvalidTag(_)) => ErrorCode::ManifestInvalid,
            RouteError::Name(NameError::Digest(_)) => ErrorCode::DigestInvalid,
            RouteError::Name(_) | RouteError::Mirror { .. } => ErrorCode::NameInvalid,
            RouteError::UploadUnknown(_) => ErrorCode::BlobUploadUnknown,
        }
    }

    pub fn status(&self, intent: Intent) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            e => e.code(intent).status(),
        }
    }
}

/// One endpoint of the Distribution API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Base,
    /// `/v2/_catalog`: the repositories a registry holds.
    Catalog,
    Tags(RepoName),
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    UploadStart(RepoName),
    Upload(RepoName, UploadId),
    Referrers(RepoName, Digest),
}

impl Route {
    /// A low-cardinality name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }

    /// The repository the route is about, if any.
    pub fn repo(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(r)
            | Route::Manifest(r, _)
            | Route::Blob(r, _)
            | Route::UploadStart(r)
            | Route::Upload(r, _)
            | Route::Referrers(r, _) => Some(r),
        }
    }

    /// The same route for another repository (containerd's `?ns=` mirror requests).
    pub fn map_repo<E>(self, f: impl FnOnce(RepoName) -> Result<RepoName, E>) -> Result<Route, E> {
        Ok(match self {
            Route::Base => Route::Base,
            Route::Catalog => Route::Catalog,
            Route::Tags(r) => Route::Tags(f(r)?),
            Route::Manifest(r, x) => Route::Manifest(f(r)?, x),
            Route::Blob(r, d) => Route::Blob(f(r)?, d),
            Route::UploadStart(r) => Route::UploadStart(f(r)?),
            Route::Upload(r, u) => Route::Upload(f(r)?, u),
            Route::Referrers(r, d) => Route::Referrers(f(r)?, d),
        })
    }

    /// The path of this endpoint, as [`Route::parse`] reads it back: `parse(&r.path()) == Ok(r)`
    /// (a fuzz target holds it to that).
    pub fn path(&self) -> String {
        match self {
            Route::Base => "/v2/".to_owned(),
            Route::Catalog => "/v2/_catalog".to_owned(),
            Route::Tags(r) => format!("/v2/{r}/tags/list"),
            Route::Manifest(r, x) => format!("/v2/{r}/manifests/{x}"),
            Route::Blob(r, d) => format!("/v2/{r}/blobs/{d}"),
            Route::UploadStart(r) => format!("/v2/{r}/blobs/uploads/"),
            Route::Upload(r, id) => format!("/v2/{r}/blobs/uploads/{id}"),
            Route::Referrers(r, d) => format!("/v2/{r}/referrers/{d}"),
        }
    }

    /// Routes a request from its raw path and query. containerd's registry-mirror requests
    /// (`/v2/library/nginx/...?ns=docker.io`, the `ns` percent-encoded: `ns=reg%3A5000`) are
    /// about the cache repository of that registry's image (`docker.io/library/nginx`), the name
    /// the webhook's rewrite uses: the route is that repository's.
    pub fn parse_request(path: &str, query: Option<&str>) -> Result<Route, RouteError> {
        let route = Route::parse(path)?;
        let Some((raw, ns)) = query.and_then(|q| query_param(q, "ns")) else {
            return Ok(route);
        };
        let ns = ns.ok_or_else(|| RouteError::Mirror {
            ns: raw.to_owned(),
            reason: "not percent-encoded UTF-8".to_owned(),
        })?;
        route.map_repo(|repo| {
            mirror_repository(&ns, &repo).map_err(|e| RouteError::Mirror {
                ns: ns.clone(),
                reason: format!("with {repo}: {e}"),
            })
        })
    }

    /// Parses a raw (not percent-decoded) request path.
    pub fn parse(path: &str) -> Result<Route, RouteError> {
        let not_found = || RouteError::NotFound(path.to_owned());
        if path == "/v2" || path == "/v2/" {
            return Ok(Route::Base);
        }
        if path == "/v2/_catalog" {
            return Ok(Route::Catalog);
        }
        let rest = path.strip_prefix("/v2").ok_or_else(not_found)?;
        let name = |n: &str| -> Result<RepoName, RouteError> {
            Ok(n.strip_prefix('/').unwrap_or("/").parse()?)
        };
        if let Some(n) = rest.strip_suffix("/tags/list") {
            return Ok(Route::Tags(name(n)?));
        }
        if let Some(n) = rest
            .strip_suffix("/blobs/uploads/")
            .or_else(|| rest.strip_suffix("/blobs/uploads"))
        {
            return Ok(Route::UploadStart(name(n)?));
        }
        let (head, last) = rest.rsplit_once('/').ok_or_else(not_found)?;
        let last = decode_segment(last);
        if let Some(n) = head.strip_suffix("/blobs/uploads") {
            let repo = name(n)?;
            let id = last
                .parse::<UploadId>()
                .map_err(|_| RouteError::UploadUnknown(last.to_string()))?;
            return Ok(Route::Upload(repo, id));
        }
        if let Some(n) = head.strip_suffix("/manifests") {
            return Ok(Route::Manifest(name(n)?, last.parse()?));
        }
        if let Some(n) = head.strip_suffix("/blobs") {
            return Ok(Route::Blob(name(n)?, last.parse()?));
        }
        if let Some(n) = head.strip_suffix("/referrers") {
            return Ok(Route::Referrers(name(n)?, last.parse()?));
        }
        Err(not_found())
    }
}

/// The first value of `key` in a query string, as written and decoded as a form value (`%XX`,
/// `+` for a space); decoded is `None` when that is not valid percent-encoded UTF-8.
fn query_param<'q>(query: &'q str, key: &str) -> Option<(&'q str, Option<String>)> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?;
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = rest
                    .get(..2)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(byte) = hex else {
                    return Some((raw, None));
                };
                bytes.push(byte);
                rest = &rest[2..];
            }
            b => bytes.push(b),
        }
    }
    Some((raw, String::from_utf8(bytes).ok()))
}

/// Some clients write the `:` of a digest as `%3A`; nothing else in a last segment may be
/// encoded, and what remains encoded fails validation.
fn decode_segment(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains("%3A") || s.contains("%3a") {
        s.replace("%3A", ":").replace("%3a", ":").into()
    } else {
        s.into()
    }
}

/// The body of a Distribution API error answer, written by kache's servers and read from
/// registries: `{"errors":[{"code","message","detail"}]}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub errors: Vec<ErrorEntry>,
}

/// One error of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorEntry {
    /// One of the spec's codes ([`ErrorCode::as_str`]); other registries may send their own.
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl ErrorBody {
    /// An answer with one error.
    pub fn new(code: ErrorCode, message: impl Into<String>, detail: serde_json::Value) -> Self {
        ErrorBody {
            errors: vec![ErrorEntry {
                code: code.as_str().to_owned(),
                message: message.into(),
                detail,
            }],
        }
    }

    /// The body as sent (`application/json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an error body always serializes")
    }

    /// Reads an answer's body; `None` unless it is one with at least one error.
    pub fn parse(body: &[u8]) -> Option<ErrorBody> {
        serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .filter(|b| !b.errors.is_empty())
    }

    /// Every error on one line: `MANIFEST_UNKNOWN: manifest unknown; ...`.
    pub fn summary(&self) -> String {
        self.errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (true, _) => e.message.clone(),
                (false, true) => e.code.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The error codes of the OCI Distribution Spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Distribution's code for a dependency that cannot answer (here: the upstream).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// The status a code answers with unless a handler says otherwise.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => 404,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            _ => 400,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        Digest::sha256(b"x").to_string()
    }

    #[test]
    fn recognises_every_endpoint_with_nested_names() {
        let r = |s: &str| Route::parse(s).unwrap();
        assert_eq!(r("/v2/"), Route::Base);
        assert_eq!(r("/v2/_catalog"), Route::Catalog);
        // A repository may not be named so: `_catalog` is never a name.
        assert!(Route::parse("/v2/_catalog/tags/list").is_err());
        assert_eq!(r("/v2/docker.io/library/nginx/tags/list").label(), "tags");
        assert!(
            matches!(r(&format!("/v2/a/b/manifests/{}", d())), Route::Manifest(n, Reference::Digest(_)) if n.as_str() == "a/b")
        );
        assert!(matches!(
            r("/v2/a/b/manifests/v1"),
            Route::Manifest(_, Reference::Tag(_))
        ));
        assert!(matches!(
            r(&format!("/v2/a/blobs/{}", d())),
            Route::Blob(..)
        ));
        assert!(matches!(
            r(&format!("/v2/a/blobs/{}", d().replace(':', "%3A"))),
            Route::Blob(..)
        ));
        assert!(matches!(r("/v2/x/blobs/uploads/"), Route::UploadStart(n) if n.as_str() == "x"));
        assert!(matches!(r("/v2/x/blobs/uploads"), Route::UploadStart(_)));
        assert!(matches!(
            r(&format!("/v2/x/blobs/uploads/{}", UploadId(0))),
            Route::Upload(..)
        ));
        assert!(matches!(
            r(&format!("/v2/x/referrers/{}", d())),
            Route::Referrers(..)
        ));
        // A repository may itself be called "blobs".
        assert!(
            matches!(r(&format!("/v2/a/blobs/blobs/{}", d())), Route::Blob(n, _) if n.as_str() == "a/blobs")
        );
    }

    #[test]
    fn upload_ids_round_trip() {
        let s = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert_eq!(s.parse::<UploadId>().unwrap().to_string(), s);
        for bad in [
            "",
            "67e5504410b1426f9247bb680e5fe0c8",
            "67E55044-10b1-426f-9247-bb680e5fe0c8",
            "../../../../../../../../../index.redb",
        ] {
            assert!(bad.parse::<UploadId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_traversal_and_garbage() {
        for (path, code) in [
            ("/v2/../etc/manifests/latest", ErrorCode::NameInvalid),
            ("/v2/a/%2e%2e/manifests/latest", ErrorCode::NameInvalid),
            (
                "/v2/a/..%2f..%2fetc/manifests/latest",
                ErrorCode::NameInvalid,
            ),
            ("/v2//abs/manifests/latest", ErrorCode::NameInvalid),
            ("/v2/manifests/latest", ErrorCode::NameInvalid),
            ("/v2/a/manifests/..", ErrorCode::ManifestInvalid),
            ("/v2/a/manifests/sha256:..%2f..", ErrorCode::DigestInvalid),
            (
                "/v2/a/blobs/sha256:../../etc/passwd",
                ErrorCode::Unsupported,
            ),
            (
                "/v2/a/blobs/uploads/not-a-uuid",
                ErrorCode::BlobUploadUnknown,
            ),
            ("/v2/a/unknown/thing", ErrorCode::Unsupported),
            ("/v3/", ErrorCode::Unsupported),
            ("/", ErrorCode::Unsupported),
        ] {
            match Route::parse(path) {
                Err(e) => assert_eq!(e.code(Intent::Write), code, "{path}: {e}"),
                Ok(r) => panic!("{path} parsed as {r:?}"),
            }
        }
    }

    #[test]
    fn paths_read_back_as_their_routes() {
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        let d = || Digest::sha256(b"x");
        // Repositories named like the API's own segments, where a careless reader goes wrong.
        for name in [
            "a",
            "a/b",
            "a/blobs",
            "a/blobs/uploads",
            "a/tags",
            "x/manifests",
            "r/referrers",
        ] {
            for route in [
                Route::Tags(repo(name)),
                Route::Manifest(repo(name), Reference::Tag("list".parse().unwrap())),
                Route::Manifest(repo(name), Reference::Digest(d())),
                Route::Blob(repo(name), d()),
                Route::UploadStart(repo(name)),
                Route::Upload(repo(name), UploadId(u128::MAX)),
                Route::Referrers(repo(name), d()),
            ] {
                assert_eq!(
                    Route::parse(&route.path()),
                    Ok(route.clone()),
                    "{}",
                    route.path()
                );
            }
        }
        assert_eq!(Route::parse(&Route::Base.path()), Ok(Route::Base));
        assert_eq!(Route::parse(&Route::Catalog.path()), Ok(Route::Catalog));
        assert_eq!(
            Route::Upload(repo("a"), UploadId(1)).path(),
            "/v2/a/blobs/uploads/00000000-0000-0000-0000-000000000001"
        );
    }

    #[test]
    fn error_bodies_read_back_what_they_write() {
        let b = ErrorBody::new(
            ErrorCode::BlobUploadInvalid,
            "out of order",
            serde_json::json!({"expected": 5}),
        );
        assert_eq!(
            b.to_json(),
            r#"{"errors":[{"code":"BLOB_UPLOAD_INVALID","message":"out of order","detail":{"expected":5}}]}"#
        );
        assert_eq!(ErrorBody::parse(b.to_json().as_bytes()), Some(b));
        let plain = ErrorBody::new(
            ErrorCode::NameUnknown,
            "no such repository",
            Default::default(),
        );
        assert!(!plain.to_json().contains("detail"));
        assert_eq!(plain.summary(), "NAME_UNKNOWN: no such repository");
        // What other registries send: partial entries, or no errors at all.
        let partial =
            ErrorBody::parse(br#"{"errors":[{"code":"DENIED"},{"message":"slow down"}]}"#);
        assert_eq!(partial.unwrap().summary(), "DENIED; slow down");
        assert_eq!(ErrorBody::parse(br#"{"errors":[]}"#), None);
        assert_eq!(ErrorBody::parse(b"<html>bad gateway</html>"), None);
    }

    #[test]
    fn mirror_requests_are_about_the_registry_s_cache_repository() {
        let route = |q: &str| Route::parse_request("/v2/library/web/manifests/1.0", Some(q));
        let repo = |r: Route| r.repo().unwrap().to_string();
        assert_eq!(
            repo(route("ns=docker.io").unwrap()),
            "docker.io/library/web"
        );
        assert_eq!(
            repo(route("x=1&ns=registry%3A5000").unwrap()),
            "registry_5000/library/web"
        );
        assert_eq!(
            repo(Route::parse_request("/v2/library/web/tags/list", None).unwrap()),
            "library/web"
        );
        // No ns: the path's own repository, whatever else the query holds.
        assert_eq!(repo(route("digest=sha256%3Aab").unwrap()), "library/web");
        for bad in ["ns=", "ns=%zz", "ns=%FF", "ns=Not_A_Host!"] {
            let e = route(bad).unwrap_err();
            assert!(matches!(e, RouteError::Mirror { .. }), "{bad}: {e}");
            assert_eq!(e.code(Intent::Read), ErrorCode::NameInvalid, "{bad}");
        }
        // The path is checked first: a bad path is that error, ns or not.
        assert_eq!(
            Route::parse_request("/v2/UPPER/manifests/1", Some("ns=docker.io"))
                .unwrap_err()
                .code(Intent::Read),
            ErrorCode::NameInvalid
        );
    }

    #[test]
    fn a_tag_that_cannot_exist_is_unknown_to_a_read_and_invalid_to_a_write() {
        let e = Route::parse("/v2/a/manifests/.INVALID_MANIFEST_NAME").unwrap_err();
        assert_eq!(e.code(Intent::Read), ErrorCode::ManifestUnknown);
        assert_eq!(e.status(Intent::Read), 404);
        assert_eq!(e.code(Intent::Write), ErrorCode::ManifestInvalid);
        assert_eq!(e.status(Intent::Write), 400);
        // Other bad paths answer the same either way.
        let e = Route::parse("/v2/a/manifests/sha256:..%2f..").unwrap_err();
        assert_eq!(e.code(Intent::Read), e.code(Intent::Write));
        assert_eq!(Intent::of("HEAD"), Intent::Read);
        assert_eq!(Intent::of("DELETE"), Intent::Write);
    }
}
