//! The HTTP/1.1 wire format of kache's server, pure: request heads in ([`parse_head`], with
//! httparse), response heads out ([`write_head`]), and what a head says about the body and the
//! connection. No socket and no clock but the `Date` header's; a fuzz target feeds
//! [`parse_head`] arbitrary bytes (fuzz/fuzz_targets/http_head.rs).

use http::header::{CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Longest request head; a longer one is answered 431 and the connection closed.
pub const MAX_HEAD: usize = 64 * 1024;

/// Most header lines in a request head (431 beyond).
pub const MAX_HEADERS: usize = 100;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub method: Method,
    pub uri: http::Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Why a request head cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields: answered 431.
    #[error(
        "the request head is larger than {MAX_HEAD} bytes or has more than {MAX_HEADERS} fields"
    )]
    TooLarge,
    /// Not HTTP/1.x as RFC 9112 writes it: answered 400.
    #[error("{0}")]
    Malformed(String),
}

impl HeadError {
    fn malformed(what: &str) -> HeadError {
        HeadError::Malformed(what.to_owned())
    }
}

/// Parses a request head; Ok(None) while it is incomplete, Err when it cannot be served. A
/// complete head is `buf`'s first `used` bytes, and parses the same alone.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(format!("malformed request: {e}"))),
    };
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or_else(|| HeadError::malformed("malformed method"))?;
    let uri = req
        .path
        .and_then(|p| p.parse::<http::Uri>().ok())
        .ok_or_else(|| HeadError::malformed("malformed request target"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HeadError::malformed("malformed header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| HeadError::malformed("malformed header value"))?;
        headers.append(name, value);
    }
    Ok(Some((
        Head {
            method,
            uri,
            version,
            headers,
        },
        used,
    )))
}

/// Whether the request announces a body; Err for a length that cannot be understood.
pub fn request_body(headers: &HeaderMap) -> Result<bool, HeadError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        return Ok(true);
    }
    let mut any = false;
    for v in headers.get_all(CONTENT_LENGTH) {
        match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(0) => {}
            Some(_) => any = true,
            None => return Err(HeadError::malformed("malformed content-length")),
        }
    }
    Ok(any)
}

/// Whether the connection stays open after the answer, as the client asks.
pub fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    if has_token(headers, "connection", "close") {
        return false;
    }
    version == Version::HTTP_11 || has_token(headers, "connection", "keep-alive")
}

/// Whether a comma-separated header (`Connection`) lists `token`.
pub fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Appends the current time as an HTTP date, formatted once per second and thread.
fn http_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// Writes a response head; `keep` says whether the connection stays open after the answer.
pub fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    version: Version,
    keep: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(DATE) {
        // RFC 9110 §6.6.1: a server with a clock sends one.
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONNECTION;

    #[test]
    fn heads_parse_or_get_a_clear_answer() {
        let (h, used) = parse_head(b"GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET")
            .unwrap()
            .unwrap();
        assert_eq!(used, 45);
        assert_eq!(h.version, Version::HTTP_10);
        assert!(wants_keep_alive(h.version, &h.headers));
        assert!(
            parse_head(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
                .unwrap()
                .is_none()
        );
        let bad = parse_head(b"GET /v2/ HTTP/1.1\r\nBad Header: x\r\n\r\n").unwrap_err();
        assert!(matches!(bad, HeadError::Malformed(_)), "{bad}");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn every_head_has_a_date() {
        let mut out = Vec::new();
        write_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            Version::HTTP_11,
            true,
        );
        let text = String::from_utf8(out).unwrap();
        let date = text
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .expect("a date");
        let when = httpdate::parse_http_date(date).unwrap();
        let age = std::time::SystemTime::now().duration_since(when).unwrap();
        assert!(age.as_secs() < 60, "{date}");
        // One the handler set is kept, and not repeated.
        let mut h = HeaderMap::new();
        h.insert(
            DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        let mut out = Vec::new();
        write_head(&mut out, StatusCode::OK, &h, Version::HTTP_11, true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.contains("date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(CONNECTION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(wants_keep_alive(Version::HTTP_11, &HeaderMap::new()));
        assert!(!wants_keep_alive(Version::HTTP_11, &h("Close")));
        assert!(!wants_keep_alive(Version::HTTP_10, &HeaderMap::new()));
        assert!(wants_keep_alive(Version::HTTP_10, &h("te, Keep-Alive")));
    }
}
