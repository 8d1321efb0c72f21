//! Upstream failures: the error, what kache answers its own client then, the upstream's words.

use std::time::Duration;

use kache_oci::distribution::{ErrorBody, ErrorCode};

/// Error and token bodies are read up to this size; anything longer is cut.
pub(crate) const SMALL_BODY_LIMIT: u64 = 1 << 20;

/// Upstream errors quote at most this much of what the upstream said.
const MESSAGE_LIMIT: usize = 512;

/// Why an upstream request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream refused the credentials: {0}")]
    Unauthorized(String),
    #[error("upstream denied access: {0}")]
    Denied(String),
    #[error("upstream has no such thing: {0}")]
    NotFound(String),
    #[error("upstream is rate-limiting{}: {message}", retry_after.as_ref().map(|r| format!(" (retry after {r})")).unwrap_or_default())]
    TooManyRequests {
        /// The upstream's `Retry-After`, as it was written.
        retry_after: Option<String>,
        message: String,
    },
    #[error("upstream answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("upstream unreachable: {0}")]
    Transport(String),
    #[error("upstream body is larger than {0} bytes")]
    TooLarge(u64),
    /// The upstream answered, but with what kache refuses to take: bytes that do not hash to
    /// their digest, or a manifest of no kind kache knows.
    #[error("upstream sent what kache refuses: {0}")]
    Invalid(String),
    #[error("upstream client configuration: {0}")]
    Config(String),
}

/// What kache answers its own client when an upstream failed it, in the spec's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAnswer {
    pub status: u16,
    pub code: ErrorCode,
    pub message: String,
    /// `WWW-Authenticate` with a 401 (every 401 carries a challenge, RFC 9110; the credentials
    /// that would help are kache's, not the client's) and the upstream's `Retry-After` with a
    /// 429.
    pub headers: Vec<(&'static str, String)>,
}

impl UpstreamError {
    /// The answer to a client for this failure; `unknown` is the code of a 404
    /// (`MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`).
    pub fn answer(&self, unknown: ErrorCode) -> UpstreamAnswer {
        let (status, code) = match self {
            UpstreamError::Unauthorized(_) => (401, ErrorCode::Unauthorized),
            UpstreamError::Denied(_) => (403, ErrorCode::Denied),
            UpstreamError::NotFound(_) => (404, unknown),
            UpstreamError::TooManyRequests { .. } => (429, ErrorCode::TooManyRequests),
            _ => (502, ErrorCode::Unavailable),
        };
        let mut headers = Vec::new();
        match self {
            UpstreamError::Unauthorized(_) => {
                headers.push(("www-authenticate", "Basic realm=\"kache\"".to_owned()));
            }
            UpstreamError::TooManyRequests {
                retry_after: Some(r),
                ..
            } => headers.push(("retry-after", r.clone())),
            _ => {}
        }
        UpstreamAnswer {
            status,
            code,
            message: format!("upstream: {self}"),
            headers,
        }
    }

    /// Whether the upstream is down or overloaded rather than saying no: the cases where
    /// serving a cached copy beats passing the error on.
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Transport(_) | UpstreamError::TooManyRequests { .. } => true,
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A `reqwest::Error` in words, its causes included (that is where "connection refused" and
/// certificate errors are), without the URL, which for a redirected blob may carry a
/// pre-signed query.
pub(crate) fn describe(host: &str, e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut msg = format!("{host}: {e}");
    let mut source = std::error::Error::source(&e);
    for _ in 0..8 {
        let Some(s) = source else { break };
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    if timeout && !msg.contains("timed out") {
        msg.push_str(" (timed out)");
    }
    msg
}

/// What an error answer says: the OCI error messages, a token server's `details`, or the start
/// of the text; the status line when there is nothing to read.
pub(crate) async fn error_message(host: &str, mut resp: reqwest::Response) -> String {
    let status = resp.status();
    let mut body = Vec::new();
    let read = async {
        // Bounded by SMALL_BODY_LIMIT; the read timeout bounds each wait.
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() as u64 >= SMALL_BODY_LIMIT {
                break;
            }
        }
    };
    // A slow error body is not worth waiting for: the status says enough.
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let text = summarize(&body);
    if text.is_empty() {
        format!("{host}: {status}")
    } else {
        format!("{host}: {text}")
    }
}

fn summarize(body: &[u8]) -> String {
    /// What registries that do not speak the spec's errors send instead (token servers too).
    #[derive(serde::Deserialize)]
    struct Body {
        details: Option<String>,
        message: Option<String>,
        error: Option<serde_json::Value>,
        error_description: Option<String>,
    }
    let text = match (ErrorBody::parse(body), serde_json::from_slice::<Body>(body)) {
        (Some(errors), _) => errors.summary(),
        (None, Ok(b)) => b
            .details
            .or(b.error_description)
            .or(b.message)
            .or(b.error.map(|e| match e {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            }))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        (None, Err(_)) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(MESSAGE_LIMIT) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_answer_in_the_spec_s_terms() {
        let a = UpstreamError::Unauthorized("no".into()).answer(ErrorCode::BlobUnknown);
        assert_eq!((a.status, a.code), (401, ErrorCode::Unauthorized));
        assert_eq!(
            a.headers,
            [("www-authenticate", "Basic realm=\"kache\"".to_owned())]
        );
        let a = UpstreamError::NotFound("gone".into()).answer(ErrorCode::ManifestUnknown);
        assert_eq!((a.status, a.code), (404, ErrorCode::ManifestUnknown));
        assert_eq!(a.message, "upstream: upstream has no such thing: gone");
        let limited = UpstreamError::TooManyRequests {
            retry_after: Some("30".into()),
            message: "slow".into(),
        };
        let a = limited.answer(ErrorCode::BlobUnknown);
        assert_eq!((a.status, a.code), (429, ErrorCode::TooManyRequests));
        assert_eq!(a.headers, [("retry-after", "30".to_owned())]);
        let a = UpstreamError::Denied("x".into()).answer(ErrorCode::BlobUnknown);
        assert_eq!((a.status, a.code), (403, ErrorCode::Denied));
        for e in [
            UpstreamError::Transport("reset".into()),
            UpstreamError::Status {
                status: 500,
                message: "oops".into(),
            },
            UpstreamError::TooLarge(1),
        ] {
            let a = e.answer(ErrorCode::BlobUnknown);
            assert_eq!((a.status, a.code), (502, ErrorCode::Unavailable), "{e}");
            assert!(a.headers.is_empty());
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            summarize(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#),
            "MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(
            summarize(br#"{"details":"incorrect username or password"}"#),
            "incorrect username or password"
        );
        assert_eq!(
            summarize(b"<html>\n  Bad\n gateway </html>"),
            "<html> Bad gateway </html>"
        );
        assert_eq!(summarize(b""), "");
        assert_eq!(summarize("é".repeat(600).as_bytes()).chars().count(), 515);
    }

    #[test]
    fn unavailable_is_down_or_overloaded() {
        let t = |s| UpstreamError::Status {
            status: s,
            message: String::new(),
        };
        assert!(t(500).is_unavailable() && t(503).is_unavailable());
        assert!(!t(400).is_unavailable());
        assert!(UpstreamError::Transport(String::new()).is_unavailable());
        assert!(
            UpstreamError::TooManyRequests {
                retry_after: None,
                message: String::new()
            }
            .is_unavailable()
        );
        assert!(!UpstreamError::NotFound(String::new()).is_unavailable());
        assert!(!UpstreamError::Unauthorized(String::new()).is_unavailable());
    }
}
