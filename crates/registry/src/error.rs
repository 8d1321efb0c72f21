//! OCI error responses: `{"errors":[{"code","message","detail"}]}` with the spec's status codes.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kache_oci::distribution::{ErrorBody, Intent, RouteError};
use kache_oci::{DigestError, NameError};
use kache_store::StoreError;
use serde_json::{Value, json};

pub use kache_oci::distribution::ErrorCode as Code;

/// An error answer. Build it with [`Error::new`] and adjust status, detail or headers.
#[derive(Debug)]
pub struct Error {
    pub code: Code,
    pub status: StatusCode,
    pub message: String,
    pub detail: Value,
    /// Extra headers (`Range`, `Allow`, `Retry-After`...): a list, since most errors have none.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            status: StatusCode::from_u16(code.status()).unwrap_or(StatusCode::BAD_REQUEST),
            message: message.into(),
            detail: Value::Null,
            headers: Vec::new(),
        }
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl TryInto<HeaderValue>) -> Self {
        if let Ok(v) = value.try_into() {
            self.headers.push((name, v));
        }
        self
    }

    /// Marks the answer as the upstream's failure, not this registry's
    /// ([`kache_wire::FAILURE_HEADER`]): a node proxy passes it on rather than asking the
    /// upstream itself.
    pub fn of_upstream(self) -> Self {
        self.header(
            HeaderName::from_static(kache_wire::FAILURE_HEADER),
            kache_wire::UPSTREAM_FAILURE,
        )
    }

    /// A fault of this server, never of the client's input.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Error::new(Code::Unsupported, "internal error").status(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = ErrorBody::new(self.code, self.message, self.detail);
        let mut resp = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_json(),
        )
            .into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::BlobUnknown => Error::new(Code::BlobUnknown, "blob unknown to registry"),
            StoreError::ManifestUnknown => Error::new(Code::ManifestUnknown, "manifest unknown"),
            StoreError::NameUnknown => {
                Error::new(Code::NameUnknown, "repository name not known to registry")
            }
            StoreError::ManifestBlobUnknown(d) => Error::new(Code::ManifestBlobUnknown, msg)
                .detail(json!({ "digest": d.to_string() })),
            StoreError::DigestMismatch { expected, actual } => Error::new(Code::DigestInvalid, msg)
                .detail(json!({ "expected": expected.to_string(), "actual": actual.to_string() })),
            StoreError::UploadUnknown => Error::new(Code::BlobUploadUnknown, msg),
            StoreError::RangeInvalid { expected, .. } => Error::new(Code::BlobUploadInvalid, msg)
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(axum::http::header::RANGE, range_header(expected)),
            StoreError::TooLarge { .. } => {
                Error::new(Code::SizeInvalid, msg).status(StatusCode::PAYLOAD_TOO_LARGE)
            }
            StoreError::SizeMismatch { .. } => Error::new(Code::SizeInvalid, msg),
            StoreError::Body(_) => Error::new(Code::BlobUploadInvalid, msg),
            StoreError::NoSpace(_) => Error::new(
                Code::Unavailable,
                "the registry's storage is full; it is evicting unused images to make room, try again later",
            )
            .status(StatusCode::INSUFFICIENT_STORAGE),
            StoreError::Busy => Error::new(Code::Unavailable, msg).status(StatusCode::CONFLICT),
            StoreError::Io(_) | StoreError::Index(_) => Error::internal(msg),
        }
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        match e {
            NameError::InvalidTag(_) => Error::new(Code::ManifestInvalid, e.to_string()),
            NameError::Digest(d) => d.into(),
            _ => Error::new(Code::NameInvalid, e.to_string()),
        }
    }
}

impl Error {
    /// The answer to a request whose path names no endpoint, for its access.
    pub fn route(e: RouteError, intent: Intent) -> Self {
        Error::new(e.code(intent), e.to_string())
            .status(StatusCode::from_u16(e.status(intent)).unwrap_or(StatusCode::NOT_FOUND))
    }
}

impl From<DigestError> for Error {
    fn from(e: DigestError) -> Self {
        Error::new(Code::DigestInvalid, e.to_string())
    }
}

/// The `Range` header of an upload holding `offset` bytes: `0-<last byte>` (`0-0` when empty,
/// as distribution answers).
pub fn range_header(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
