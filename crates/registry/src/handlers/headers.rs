//! What handlers read from a request (query, lengths, ranges) and the headers they answer.

use std::collections::HashMap;

use axum::extract::{Query, Request};
use axum::http::{HeaderValue, Method, header};
use kache_oci::Digest;

use crate::error::{Code, Error, Result};

pub(super) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
pub(super) const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";
pub(super) const OCI_SUBJECT: &str = "oci-subject";
pub(super) const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";

pub(super) type Params = HashMap<String, String>;

pub(super) fn params(req: &Request) -> Params {
    Query::<Params>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default()
}

pub(crate) fn unsupported(method: &Method, allow: &'static str) -> Error {
    Error::new(
        Code::Unsupported,
        format!("method {method} is not supported here"),
    )
    .header(header::ALLOW, allow)
}

pub(super) fn hv(s: impl AsRef<str>) -> HeaderValue {
    HeaderValue::from_str(s.as_ref()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The request's `Content-Length`, when it sends one.
pub(super) fn content_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

pub(super) fn digest_param(p: &Params, key: &str) -> Result<Option<Digest>> {
    p.get(key)
        .map(|d| d.parse::<Digest>().map_err(Error::from))
        .transpose()
}

/// What a `Range` header asks of a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RangeSpec {
    /// Not a single byte range we understand: RFC 9110 says serve the whole representation.
    Ignore,
    Unsatisfiable,
    /// First and last byte, inclusive.
    Bytes(u64, u64),
}

pub(super) fn parse_range(h: &str, size: u64) -> RangeSpec {
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
pub(super) fn chunk_start(req: &Request) -> Result<Option<u64>> {
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
    use RangeSpec::{Bytes, Ignore, Unsatisfiable};

    #[test]
    fn ranges() {
        let cases = [
            ("bytes=0-9", 100, Bytes(0, 9)),
            ("bytes=90-", 100, Bytes(90, 99)),
            ("bytes=90-1000", 100, Bytes(90, 99)),
            ("bytes=-10", 100, Bytes(90, 99)),
            ("bytes=-1000", 100, Bytes(0, 99)),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=5-2", 100, Ignore),
            ("bytes=0-1,5-6", 100, Ignore),
            ("items=0-1", 100, Ignore),
            ("bytes=x-1", 100, Ignore),
            // One byte: the first, the last, and the last counted from the end.
            ("bytes=0-0", 100, Bytes(0, 0)),
            ("bytes=99-99", 100, Bytes(99, 99)),
            ("bytes=-1", 100, Bytes(99, 99)),
            ("bytes=0-0", 1, Bytes(0, 0)),
            // A suffix of an empty blob has no byte to give.
            ("bytes=-5", 0, Unsatisfiable),
            // A start past the end wins over an end before it.
            ("bytes=200-100", 100, Unsatisfiable),
            ("bytes=100-100", 100, Unsatisfiable),
            // Spaces around the header and its numbers are tolerated.
            (" bytes=0-9 ", 100, Bytes(0, 9)),
            ("bytes= 10 - 19", 100, Bytes(10, 19)),
            // Not a range: no dash, no numbers, a bad end, an overflowing start.
            ("bytes=", 100, Ignore),
            ("bytes=10", 100, Ignore),
            ("bytes=-", 100, Ignore),
            ("bytes=-x", 100, Ignore),
            ("bytes=1-x", 100, Ignore),
            ("bytes=18446744073709551616-", 100, Ignore),
            ("", 100, Ignore),
        ];
        for (h, size, want) in cases {
            assert_eq!(parse_range(h, size), want, "{h:?} of {size} bytes");
        }
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
