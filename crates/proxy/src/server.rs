//! The proxy's own HTTP/1.1 server, for the subset a node proxy serves: GET and HEAD, keep-alive
//! and pipelining, HTTP/1.0, no request bodies.
//!
//! It exists so that a blob body can go from the registry's socket to the client's with
//! splice(2) (see `splice.rs`), which needs both raw sockets; hyper owns its sockets. Every
//! other request (manifests, HEAD, ranges, the ping, fallbacks, errors) is answered by the same
//! axum router as before and written out here. A connection that opens with the HTTP/2 preface
//! (h2c with prior knowledge) is handed to hyper whole.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kache_oci::api::ErrorCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

use crate::{Proxy, error};

/// Longest request head; a longer one is answered 431 and the connection closed.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Most header lines in a request head (431 beyond).
const MAX_HEADERS: usize = 100;

/// An idle keep-alive connection is closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A request head must be complete this long after its first byte.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// When closing with the client possibly still sending, how long and how much to read away so
/// that the close does not become a reset that destroys the answer in flight.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;

/// A body frame this small goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `proxy` on `listener` until `shutdown` resolves; then stops accepting, closes idle
/// connections, and returns once every open request has been answered.
pub(crate) async fn serve(
    proxy: Proxy,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let app = proxy.router();
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection holds a sender; recv() ends when the last one is gone.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            a = kache_oci::net::accept(&listener) => a,
            () = &mut shutdown => break,
        };
        let conn = Conn {
            proxy: proxy.clone(),
            app: app.clone(),
            tcp,
            buf: BytesMut::new(),
            #[cfg(target_os = "linux")]
            pipe: None,
        };
        let stop = Stop(stop_rx.clone());
        let alive = alive_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.run(stop).await {
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
            drop(alive);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    Ok(())
}

/// The server's stop signal, as seen by a connection.
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&mut self) {
        loop {
            if *self.0.borrow_and_update() {
                return;
            }
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
}

enum Next {
    Request(Box<Head>),
    /// The client speaks HTTP/2 (prior knowledge).
    H2,
    /// Closed, idle for too long, or the server is stopping.
    Done,
    /// A head that cannot be served: answer this and close.
    Bad(Box<Response>),
}

struct Conn {
    proxy: Proxy,
    app: Router,
    tcp: TcpStream,
    /// Read but not yet parsed: the rest of a head, or the next pipelined request.
    buf: BytesMut,
    #[cfg(target_os = "linux")]
    pipe: Option<crate::splice::Pipe>,
}

impl Conn {
    async fn run(mut self, mut stop: Stop) -> io::Result<()> {
        let mut first = true;
        loop {
            let next = self.next_head(&mut stop, first).await?;
            first = false;
            let head = match next {
                Next::Request(head) => *head,
                Next::H2 => return self.serve_h2(stop).await,
                Next::Done => return Ok(()),
                Next::Bad(answer) => {
                    self.write_response(*answer, false, Version::HTTP_11, false)
                        .await?;
                    return self.close().await;
                }
            };
            let keep = self.answer(head).await?;
            if !keep || stop.is_set() {
                return self.close().await;
            }
        }
    }

    /// Reads until a whole request head is buffered, and parses it.
    async fn next_head(&mut self, stop: &mut Stop, first: bool) -> io::Result<Next> {
        let mut deadline = None;
        loop {
            if !self.buf.is_empty() {
                if first
                    && H2_PREFACE.starts_with(&self.buf[..self.buf.len().min(H2_PREFACE.len())])
                {
                    if self.buf.len() >= H2_PREFACE.len() {
                        return Ok(Next::H2);
                    }
                } else {
                    match parse_head(&self.buf) {
                        Ok(Some((_, used))) if used > MAX_HEAD => {
                            return Ok(Next::Bad(too_large()));
                        }
                        Ok(Some((head, used))) => {
                            self.buf.advance(used);
                            return Ok(Next::Request(Box::new(head)));
                        }
                        Ok(None) if self.buf.len() >= MAX_HEAD => {
                            return Ok(Next::Bad(too_large()));
                        }
                        Ok(None) => {}
                        Err(answer) => return Ok(Next::Bad(answer)),
                    }
                }
            }
            if self.buf.is_empty() {
                if stop.is_set() {
                    return Ok(Next::Done);
                }
                deadline = None;
            } else if deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + HEAD_TIMEOUT);
            }
            let until = deadline.unwrap_or_else(|| tokio::time::Instant::now() + IDLE_TIMEOUT);
            self.buf.reserve(8 * 1024);
            let idle = self.buf.is_empty();
            let read = tokio::select! {
                r = tokio::time::timeout_at(until, self.tcp.read_buf(&mut self.buf)) => r,
                () = stop.wait(), if idle => return Ok(Next::Done),
            };
            match read {
                Ok(Ok(0)) | Err(_) => return Ok(Next::Done),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Answers one request; Ok(true) when the connection stays open for the next one.
    async fn answer(&mut self, head: Head) -> io::Result<bool> {
        let Head {
            method,
            uri,
            version,
            headers,
        } = head;
        let mut keep = wants_keep_alive(version, &headers);
        let has_body = match request_body(&headers) {
            Ok(b) => b,
            Err(answer) => {
                self.write_response(*answer, false, version, false).await?;
                return Ok(false);
            }
        };
        let is_head = method == Method::HEAD;
        if has_body {
            // The body is not read: the connection cannot carry another request.
            keep = false;
            if method == Method::GET || is_head {
                let answer = error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unsupported,
                    "a pull carries no request body",
                );
                self.write_response(answer, is_head, version, false).await?;
                return Ok(false);
            }
        }

        #[cfg(target_os = "linux")]
        if method == Method::GET
            && uri.path().contains("/blobs/")
            && !headers.contains_key(http::header::RANGE)
            && let Ok(pull) = crate::Pull::from_parts(&method, &uri, &headers)
            && matches!(pull.route, kache_oci::api::Route::Blob(..))
        {
            return self.splice_blob(pull, version, keep).await;
        }

        let mut req = http::Request::new(Body::empty());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let answer = match self.app.clone().oneshot(req).await {
            Ok(a) => a,
            Err(never) => match never {},
        };
        self.write_response(answer, is_head, version, keep).await
    }

    /// A blob GET: the registry's body spliced to the client; anything else the registry
    /// answers goes the way `handle` would send it.
    #[cfg(target_os = "linux")]
    async fn splice_blob(
        &mut self,
        pull: crate::Pull,
        version: Version,
        keep: bool,
    ) -> io::Result<bool> {
        use crate::splice;

        let p = self.proxy.clone();
        let m = &p.inner.metrics;
        let answer = match p.inner.raw.get(&pull).await {
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
            let resp = crate::fallback(&p, &pull).await;
            return self.write_response(resp, false, version, keep).await;
        };
        let Some(length) = answer.length else {
            // No plain length (chunked, or delimited by the close): rare enough to go the
            // general way, with a connection of the router's client.
            drop(answer);
            let mut req = http::Request::new(Body::empty());
            *req.uri_mut() = pull.pq.parse().unwrap_or_default();
            *req.headers_mut() = pull.headers.clone();
            let resp = match self.app.clone().oneshot(req).await {
                Ok(a) => a,
                Err(never) => match never {},
            };
            return self.write_response(resp, false, version, keep).await;
        };
        m.count(&pull.host, crate::cache_result(&answer.headers));
        let mut headers = crate::pass_headers(&answer.headers);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        let mut out = Vec::with_capacity(512 + answer.early.len());
        write_head(&mut out, answer.status, &headers, version, keep);
        let early = &answer.early[..answer.early.len().min(length as usize)];
        out.extend_from_slice(early);
        self.tcp.write_all(&out).await?;
        m.bytes.inc_by(early.len() as u64);
        let rest = length - early.len() as u64;
        if rest > 0 {
            if self.pipe.is_none() {
                self.pipe = Some(splice::Pipe::new()?);
            }
            let Some(pipe) = self.pipe.as_ref() else {
                unreachable!("made above")
            };
            if let Err(e) =
                splice::relay(&answer.tcp, &self.tcp, pipe, rest, &[&m.bytes, &m.spliced]).await
            {
                // The client has fewer bytes than the length it was promised, and the
                // connection closes: a short body, never one that looks complete.
                tracing::warn!(path = %pull.path, error = %e, "blob relay broken");
                return Err(io::Error::other(e.to_string()));
            }
        }
        if answer.reusable {
            p.inner.raw.checkin(answer.tcp);
        }
        Ok(keep)
    }

    /// Writes `answer`: the length when it is known, chunked otherwise (HTTP/1.1), or delimited
    /// by closing the connection (HTTP/1.0). Ok(true) when the connection can stay open.
    async fn write_response(
        &mut self,
        answer: Response,
        is_head: bool,
        version: Version,
        mut keep: bool,
    ) -> io::Result<bool> {
        let (parts, mut body) = answer.into_parts();
        let status = parts.status;
        let mut headers = parts.headers;
        for hop in [CONNECTION, TRANSFER_ENCODING] {
            headers.remove(hop);
        }
        headers.remove("keep-alive");
        let bodiless = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        enum Framing {
            None,
            Length(u64),
            Chunked,
            Close,
        }
        let framing = if bodiless {
            if declared.is_none()
                && let Some(n) = body.size_hint().exact()
                && !is_head
            {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            }
            Framing::None
        } else if let Some(n) = declared {
            Framing::Length(n)
        } else if let Some(n) = body.size_hint().exact() {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
            Framing::Length(n)
        } else if version == Version::HTTP_11 {
            headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            Framing::Chunked
        } else {
            keep = false;
            Framing::Close
        };
        let mut out = Vec::with_capacity(512);
        write_head(&mut out, status, &headers, version, keep);
        if matches!(framing, Framing::None) || matches!(framing, Framing::Length(0)) {
            self.tcp.write_all(&out).await?;
            return Ok(keep);
        }
        let mut sent: u64 = 0;
        let mut pending = Some(out);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| io::Error::other(format!("answer body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            if let Framing::Length(n) = framing
                && sent > n
            {
                return Err(io::Error::other("answer body longer than its length"));
            }
            let mut buf = pending.take().unwrap_or_default();
            if matches!(framing, Framing::Chunked) {
                buf.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if buf.len() + data.len() <= COALESCE {
                buf.extend_from_slice(&data);
                if matches!(framing, Framing::Chunked) {
                    buf.extend_from_slice(b"\r\n");
                }
                self.tcp.write_all(&buf).await?;
            } else {
                if !buf.is_empty() {
                    self.tcp.write_all(&buf).await?;
                }
                self.tcp.write_all(&data).await?;
                if matches!(framing, Framing::Chunked) {
                    self.tcp.write_all(b"\r\n").await?;
                }
            }
        }
        if let Some(head) = pending {
            self.tcp.write_all(&head).await?;
        }
        match framing {
            Framing::Length(n) if sent != n => {
                // Cut short (an upstream that failed mid-body): closing is how the client
                // learns it.
                Err(io::Error::other(format!(
                    "answer body ended at {sent} of {n} bytes"
                )))
            }
            Framing::Chunked => {
                self.tcp.write_all(b"0\r\n\r\n").await?;
                Ok(keep)
            }
            _ => Ok(keep),
        }
    }

    /// HTTP/2 with prior knowledge: hyper serves the connection, the preface replayed.
    async fn serve_h2(self, mut stop: Stop) -> io::Result<()> {
        let app = self.app;
        let io = Rewind {
            early: self.buf.freeze(),
            io: self.tcp,
        };
        let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let done = tokio::select! {
            r = conn.as_mut() => Some(r),
            () = stop.wait() => None,
        };
        let r = match done {
            Some(r) => r,
            None => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        r.map_err(io::Error::other)
    }

    /// Ends the connection: FIN first, then what the client still sends is read away (for a
    /// while), so the kernel does not answer it with a reset that can destroy our last answer.
    async fn close(mut self) -> io::Result<()> {
        self.tcp.shutdown().await?;
        let drain = async {
            let mut scratch = vec![0u8; 16 * 1024];
            let mut total = 0;
            while total < LINGER_BYTES {
                match self.tcp.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
        Ok(())
    }
}

/// Parses a request head; Ok(None) while it is incomplete, Err with the answer when it cannot
/// be served.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, Box<Response>> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large()),
        Err(e) => return Err(bad_request(format!("malformed request: {e}"))),
    };
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or_else(|| bad_request("malformed method"))?;
    let uri = req
        .path
        .and_then(|p| p.parse::<http::Uri>().ok())
        .ok_or_else(|| bad_request("malformed request target"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad_request("malformed header name"))?;
        let value =
            HeaderValue::from_bytes(h.value).map_err(|_| bad_request("malformed header value"))?;
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
fn request_body(headers: &HeaderMap) -> Result<bool, Box<Response>> {
    if headers.contains_key(TRANSFER_ENCODING) {
        return Ok(true);
    }
    let mut any = false;
    for v in headers.get_all(CONTENT_LENGTH) {
        match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(0) => {}
            Some(_) => any = true,
            None => return Err(bad_request("malformed content-length")),
        }
    }
    Ok(any)
}

fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    if has_token(headers, "connection", "close") {
        return false;
    }
    version == Version::HTTP_11 || has_token(headers, "connection", "keep-alive")
}

/// Whether a comma-separated header (`Connection`) lists `token`.
pub(crate) fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn write_head(
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
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn bad_request(message: impl std::fmt::Display) -> Box<Response> {
    Box::new(error(
        StatusCode::BAD_REQUEST,
        ErrorCode::Unsupported,
        message,
    ))
}

fn too_large() -> Box<Response> {
    Box::new(error(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ErrorCode::Unsupported,
        format!(
            "the request head is larger than {MAX_HEAD} bytes or has more than {MAX_HEADERS} fields"
        ),
    ))
}

/// A socket whose first reads return bytes already read from it.
struct Rewind {
    early: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let bad = parse_head(&many).unwrap_err();
        assert_eq!(bad.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
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
