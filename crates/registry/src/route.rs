//! Parses `/v2/...` paths. Repository names contain slashes, so routes are recognised from
//! the end of the path; the name is then validated against the spec's grammar, which refuses
//! `..`, `%` and anything else that could reach the filesystem.

use kache_oci::{Digest, Reference, RepoName};
use uuid::Uuid;

use crate::error::{Code, Error, Result};

/// One endpoint of the Distribution API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Base,
    Tags(RepoName),
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    UploadStart(RepoName),
    Upload(RepoName, Uuid),
    Referrers(RepoName, Digest),
}

impl Route {
    /// A low-cardinality name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }

    /// Parses a raw (not percent-decoded) request path.
    pub fn parse(path: &str) -> Result<Route> {
        let not_found = || {
            Error::new(Code::Unsupported, format!("no such endpoint: {path}"))
                .status(http::StatusCode::NOT_FOUND)
        };
        if path == "/v2" || path == "/v2/" {
            return Ok(Route::Base);
        }
        let rest = path.strip_prefix("/v2").ok_or_else(not_found)?;
        let name =
            |n: &str| -> Result<RepoName> { Ok(n.strip_prefix('/').unwrap_or("/").parse()?) };
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
            let id = last.parse::<Uuid>().map_err(|_| {
                Error::new(
                    Code::BlobUploadUnknown,
                    format!("{last:?} is not an upload id"),
                )
            })?;
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

/// Some clients write the `:` of a digest as `%3A`; nothing else in a last segment may be
/// encoded, and what remains encoded fails validation.
fn decode_segment(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains("%3A") || s.contains("%3a") {
        s.replace("%3A", ":").replace("%3a", ":").into()
    } else {
        s.into()
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
            r(&format!("/v2/x/blobs/uploads/{}", Uuid::nil())),
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
    fn refuses_traversal_and_garbage() {
        for (path, code) in [
            ("/v2/../etc/manifests/latest", Code::NameInvalid),
            ("/v2/a/%2e%2e/manifests/latest", Code::NameInvalid),
            ("/v2/a/..%2f..%2fetc/manifests/latest", Code::NameInvalid),
            ("/v2//abs/manifests/latest", Code::NameInvalid),
            ("/v2/manifests/latest", Code::NameInvalid),
            ("/v2/a/manifests/..", Code::ManifestInvalid),
            ("/v2/a/manifests/sha256:..%2f..", Code::DigestInvalid),
            ("/v2/a/blobs/sha256:../../etc/passwd", Code::Unsupported),
            ("/v2/a/blobs/uploads/not-a-uuid", Code::BlobUploadUnknown),
            ("/v2/a/unknown/thing", Code::Unsupported),
            ("/v3/", Code::Unsupported),
            ("/", Code::Unsupported),
        ] {
            match Route::parse(path) {
                Err(e) => assert_eq!(e.code, code, "{path}: {}", e.message),
                Ok(r) => panic!("{path} parsed as {r:?}"),
            }
        }
    }
}
