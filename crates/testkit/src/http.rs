//! A blocking plain-HTTP client that reports exactly what the server answered: every status is a
//! response (not an error), redirects are not followed, and no proxy is used.

use std::sync::OnceLock;
use std::time::Duration;

use ureq::http::Request;

/// What the server answered, with the whole body read.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text (lossy), for messages and JSON.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; fails the test if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }
}

fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .build()
            .into()
    })
}

/// How long one request may take, start to end, unless told otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one request and reads the whole answer. Transport errors (refused connection, timeout)
/// are `Err`, so callers can poll a server that is still starting.
pub fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, ureq::Error> {
    try_request_within(DEFAULT_TIMEOUT, method, url, headers, body)
}

/// [`try_request`] bounded by `timeout` from start to the end of the body.
pub fn try_request_within(
    timeout: Duration,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, ureq::Error> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = agent()
        .configure_request(builder.body(body.to_vec())?)
        .timeout_global(Some(timeout))
        .build();
    let mut response = agent().run(request)?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (n.as_str().to_owned(), value)
        })
        .collect();
    // Layers in tests are a few MiB; the default 10 MB cap would be too tight for later tests.
    let body = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Like [`try_request`], but fails the test on a transport error.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    try_request(method, url, headers, body)
        .unwrap_or_else(|e| panic!("{method} {url} failed to get an answer: {e}"))
}

/// `GET url` with the given headers.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Response {
    request("GET", url, headers, &[])
}

/// `HEAD url` with the given headers.
pub fn head(url: &str, headers: &[(&str, &str)]) -> Response {
    request("HEAD", url, headers, &[])
}

/// What a streamed GET received. The body is hashed as it arrives and never held whole, so
/// many clients can read large blobs at once, and the time of its first byte is known.
#[derive(Debug)]
pub struct Streamed {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body bytes received (until the end, or until `error`).
    pub size: u64,
    /// `sha256:<hex>` of the bytes received.
    pub digest: String,
    /// From sending the request to the first body byte; `None` for an empty body.
    pub first_byte: Option<Duration>,
    /// From sending the request to the end of the body (or the error).
    pub total: Duration,
    /// Why reading the body failed (a connection closed early, a broken chunk), if it did.
    pub error: Option<String>,
}

impl Streamed {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET url`, reading the body in pieces within `timeout` from start to end. `Err` only when
/// no response head arrived; a body that breaks off is `Ok` with [`Streamed::error`] set.
pub fn get_streamed(url: &str, timeout: Duration) -> Result<Streamed, ureq::Error> {
    use sha2::{Digest as _, Sha256};
    use std::io::Read as _;
    use std::time::Instant;

    let request = agent()
        .configure_request(Request::builder().method("GET").uri(url).body(Vec::new())?)
        .timeout_global(Some(timeout))
        .build();
    let started = Instant::now();
    let mut response = agent().run(request)?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (n.as_str().to_owned(), value)
        })
        .collect();
    let mut reader = response.body_mut().as_reader();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let (mut size, mut first_byte, mut error) = (0u64, None, None);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| started.elapsed());
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    Ok(Streamed {
        status,
        headers,
        size,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        first_byte,
        total: started.elapsed(),
        error,
    })
}

/// `POST url` with `body` over a plain socket, announced with Content-Length or in chunked
/// encoding (no length); the status and body of the answer. The server may answer before it has
/// read everything (a refused upload): a write that fails then is not an error.
pub fn post_unread(url: &str, body: &[u8], chunked: bool) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(DEFAULT_TIMEOUT)).expect("timeout");
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", body.len())
    };
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\nConnection: close\r\n\r\n");
    let mut sent = s.write_all(head.as_bytes());
    for chunk in body.chunks(256 * 1024) {
        if sent.is_err() {
            break;
        }
        sent = if chunked {
            s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .and_then(|()| s.write_all(chunk))
                .and_then(|()| s.write_all(b"\r\n"))
        } else {
            s.write_all(chunk)
        };
    }
    if sent.is_ok() && chunked {
        let _ = s.write_all(b"0\r\n\r\n");
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to POST {url}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}
