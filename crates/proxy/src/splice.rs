//! The registry, reached on plain TCP connections of our own, so that a blob body can move
//! registry socket → pipe → client socket with splice(2) ([`kache_http::Conn::splice_from`]). A
//! user-space relay copies every byte twice (socket → buffer → socket), which was most of the
//! proxy's CPU (BENCHMARKS.md, "Where the time goes", finding 2).

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use axum::body::Body;
use http::header::CONTENT_LENGTH;
use http::{Method, Version};
use kache_http::{Conn, Head, Intercept};

use crate::{Proxy, Pull, RegistryUrl};

/// Idle registry connections kept for the next request.
const POOL_MAX_IDLE: usize = 32;

/// An idle registry connection older than this is closed, not reused.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Longest registry response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A warm blob GET: the registry's body spliced to the client. Anything else the registry
/// answers goes the way the router would send it.
impl Intercept for Proxy {
    async fn intercept(
        &self,
        conn: &mut Conn,
        head: &Head,
        keep: bool,
    ) -> Option<io::Result<bool>> {
        if head.method != Method::GET
            || !head.uri.path().contains("/blobs/")
            || head.headers.contains_key(http::header::RANGE)
        {
            return None;
        }
        let private_images = self.inner.config.private_images;
        let pull = Pull::from_parts(&head.method, &head.uri, &head.headers, private_images).ok()?;
        if !matches!(pull.route, kache_oci::distribution::Route::Blob(..)) {
            return None;
        }
        Some(self.splice_blob(conn, pull, head.version, keep).await)
    }
}

impl Proxy {
    async fn splice_blob(
        &self,
        conn: &mut Conn,
        pull: Pull,
        version: Version,
        keep: bool,
    ) -> io::Result<bool> {
        let m = &self.inner.metrics;
        let answer = match self.inner.raw.get(&pull).await {
            // The upstream failed the registry: its answer is the one to pass on (below).
            Ok(a) if a.status.is_server_error() && crate::upstream_failed(&a.headers) => Some(a),
            Ok(a) if a.status.is_server_error() => {
                tracing::warn!(path = %pull.path, status = a.status.as_u16(), "registry failed; going upstream");
                None
            }
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(path = %pull.path, error = %e, "registry unreachable; going upstream");
                None
            }
        };
        let Some(answer) = answer else {
            let resp = crate::fallback(self, &pull).await;
            return conn.respond(resp, false, version, keep).await;
        };
        let Some(length) = answer.length else {
            // No plain length (chunked, or delimited by the close): rare enough to go the
            // general way, with a connection of the router's client.
            drop(answer);
            let mut req = http::Request::new(Body::empty());
            *req.uri_mut() = pull.pq.parse().unwrap_or_default();
            *req.headers_mut() = pull.headers.clone();
            if let Ok(h) = HeaderValue::from_str(&pull.client_host) {
                req.headers_mut().insert(http::header::HOST, h);
            }
            let resp = conn.route(req).await;
            return conn.respond(resp, false, version, keep).await;
        };
        m.count(&pull.host, crate::cache_result(&answer.headers));
        let mut headers = crate::pass_headers(&answer.headers);
        crate::own_challenge(&mut headers, &pull.client_host);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        let mut out = Vec::with_capacity(512 + answer.early.len());
        kache_http::write_head(&mut out, answer.status, &headers, version, keep);
        let early = &answer.early[..answer.early.len().min(length as usize)];
        out.extend_from_slice(early);
        conn.write_all(&out).await?;
        m.bytes.inc_by(early.len() as u64);
        let rest = length - early.len() as u64;
        if rest > 0
            && let Err(e) = conn
                .splice_from(&answer.tcp, rest, &[&m.bytes, &m.spliced])
                .await
        {
            // The client has fewer bytes than the length it was promised, and the
            // connection closes: a short body, never one that looks complete.
            tracing::warn!(path = %pull.path, error = %e, "blob relay broken");
            return Err(io::Error::other(e.to_string()));
        }
        if answer.reusable {
            self.inner.raw.checkin(answer.tcp);
        }
        Ok(keep)
    }
}

/// Plain HTTP/1.1 connections to the registry, and a small pool of idle ones.
#[derive(Debug)]
pub(crate) struct RawRegistry {
    url: RegistryUrl,
    timeout: Duration,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

/// The registry's answer: its head, parsed, and the connection its body follows on.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The body's length when the answer has one that can be relayed as it is: a
    /// `Content-Length` and no `Transfer-Encoding` (0 for statuses without a body).
    pub(crate) length: Option<u64>,
    /// Body bytes read along with the head.
    pub(crate) early: Bytes,
    /// The connection may serve another request once the body has been read.
    pub(crate) reusable: bool,
    pub(crate) tcp: TcpStream,
}

impl RawRegistry {
    pub(crate) fn new(url: RegistryUrl, timeout: Duration) -> RawRegistry {
        RawRegistry {
            url,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle connection that is still open, if any.
    fn checkout(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((tcp, since)) = idle.pop() {
            if since.elapsed() > POOL_IDLE_TIMEOUT {
                continue;
            }
            // An idle connection has nothing to read: anything there (its end, an error, stray
            // bytes) means it cannot carry a request.
            let mut probe = [0u8; 1];
            match tcp.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(tcp),
                _ => continue,
            }
        }
        None
    }

    /// Back into the pool, after a body was read to its end.
    pub(crate) fn checkin(&self, tcp: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|(_, since)| since.elapsed() <= POOL_IDLE_TIMEOUT);
        if idle.len() < POOL_MAX_IDLE {
            idle.push((tcp, Instant::now()));
        }
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let tcp = TcpStream::connect(&self.url.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// Sends `pull` as a GET and reads the answer's head, all within the registry timeout. A
    /// pooled connection that turns out closed before any answer byte is retried once on a
    /// new one (the registry may have closed it while idle).
    pub(crate) async fn get(&self, pull: &Pull) -> Result<Answer, String> {
        let mut request = Vec::with_capacity(256);
        request.extend_from_slice(b"GET ");
        request.extend_from_slice(self.url.base.as_bytes());
        request.extend_from_slice(pull.pq.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        request.extend_from_slice(self.url.host.as_bytes());
        request.extend_from_slice(b"\r\n");
        for (name, value) in &pull.headers {
            request.extend_from_slice(name.as_str().as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let attempt = async {
            if let Some(tcp) = self.checkout() {
                match exchange(tcp, &request).await {
                    Ok(answer) => return Ok(answer),
                    Err(Exchange::Unanswered(e)) => {
                        tracing::debug!(error = %e, "idle registry connection was closed; reconnecting");
                    }
                    Err(Exchange::Failed(e)) => return Err(e),
                }
            }
            let tcp = self
                .connect()
                .await
                .map_err(|e| format!("connecting to {}: {e}", self.url.addr))?;
            match exchange(tcp, &request).await {
                Ok(answer) => Ok(answer),
                Err(Exchange::Unanswered(e) | Exchange::Failed(e)) => Err(e),
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}

enum Exchange {
    /// The connection ended (or failed) before the first byte of an answer.
    Unanswered(String),
    Failed(String),
}

async fn exchange(mut tcp: TcpStream, request: &[u8]) -> Result<Answer, Exchange> {
    if let Err(e) = tcp.write_all(request).await {
        return Err(Exchange::Unanswered(e.to_string()));
    }
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        match tcp.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => {
                return Err(Exchange::Unanswered("closed before answering".into()));
            }
            Ok(0) => {
                return Err(Exchange::Failed(
                    "closed in the middle of its answer".into(),
                ));
            }
            Ok(_) => {}
            Err(e) if buf.is_empty() => return Err(Exchange::Unanswered(e.to_string())),
            Err(e) => return Err(Exchange::Failed(e.to_string())),
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut slots);
        let used = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {
                buf.reserve(8 * 1024);
                continue;
            }
            Ok(httparse::Status::Partial) => {
                return Err(Exchange::Failed("answer head too large".into()));
            }
            Err(e) => return Err(Exchange::Failed(format!("bad answer: {e}"))),
        };
        let status = resp
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| Exchange::Failed("bad status".into()))?;
        let mut headers = HeaderMap::new();
        for h in resp.headers.iter() {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) else {
                return Err(Exchange::Failed(format!("bad header {:?}", h.name)));
            };
            headers.append(name, value);
        }
        let close =
            resp.version == Some(0) || kache_http::has_token(&headers, "connection", "close");
        buf.advance(used);
        let length = body_length(status, &headers);
        let reusable = !close && length.is_some_and(|n| buf.len() as u64 <= n);
        return Ok(Answer {
            status,
            headers,
            length,
            early: buf.freeze(),
            reusable,
            tcp,
        });
    }
}

/// A body length that can be relayed byte for byte.
fn body_length(status: StatusCode, headers: &HeaderMap) -> Option<u64> {
    if status.is_informational() {
        return None;
    }
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Some(0);
    }
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let s = first.to_str().ok()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_plain_length_is_relayed_as_it_is() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let ok = StatusCode::OK;
        assert_eq!(body_length(ok, &h(&[("content-length", "12")])), Some(12));
        assert_eq!(body_length(ok, &h(&[])), None);
        assert_eq!(body_length(ok, &h(&[("content-length", "+12")])), None);
        assert_eq!(
            body_length(ok, &h(&[("content-length", "1"), ("content-length", "1")])),
            None
        );
        assert_eq!(
            body_length(
                ok,
                &h(&[("content-length", "5"), ("transfer-encoding", "chunked")])
            ),
            None
        );
        assert_eq!(
            body_length(StatusCode::NOT_MODIFIED, &h(&[("content-length", "5")])),
            Some(0)
        );
        assert_eq!(body_length(StatusCode::CONTINUE, &h(&[])), None);
    }
}
