//! One client connection on kache's HTTP/1.1 server: reading heads, answering them (with
//! sendfile(2) when the answer carries a [`SendFile`]), keep-alive and pipelining, closing
//! without a reset.

use std::io;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderValue, Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kache_oci::distribution::{ErrorBody, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::SendFile;
use crate::codec::{
    Head, HeadError, MAX_HEAD, parse_head, request_body, wants_keep_alive, write_head,
};
use crate::handoff::{Rewind, drive};
use crate::stop::Stop;

/// What the server does with a request that has a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bodies {
    /// Refused without being read (a server that only serves pulls): a GET or HEAD with a body is
    /// answered 400; anything else is answered by the router, and the connection closes.
    Refuse,
    /// The connection goes to hyper, that request first, for the rest of its life (a registry
    /// takes pushes, a node proxy containerd's token request; pulling clients never send a body,
    /// so they stay here). A GET or HEAD with a body is refused all the same.
    Hyper,
}

/// Answers some requests before the router sees them, on the raw connection (the proxy's
/// spliced blobs).
pub trait Intercept: Clone + Send + Sync + 'static {
    /// `Some(Ok(keep))` when `head` was answered on `conn`, `None` to leave it to the router.
    /// `keep` says whether the client wants the connection kept open.
    fn intercept(
        &self,
        conn: &mut Conn,
        head: &Head,
        keep: bool,
    ) -> impl Future<Output = Option<io::Result<bool>>> + Send;
}

/// Leaves every request to the router.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIntercept;

impl Intercept for NoIntercept {
    fn intercept(
        &self,
        _: &mut Conn,
        _: &Head,
        _: bool,
    ) -> impl Future<Output = Option<io::Result<bool>>> + Send {
        std::future::ready(None)
    }
}

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

enum Next {
    /// A head, and how many buffered bytes it took.
    Request(Box<Head>, usize),
    /// The client speaks HTTP/2 (prior knowledge).
    H2,
    /// Closed, idle for too long, or the server is stopping.
    Done,
    /// A head that cannot be served: answer this and close.
    Bad(Box<Response>),
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    pub(crate) app: Router,
    bodies: Bodies,
    pub(crate) tcp: TcpStream,
    /// Read but not yet parsed: the rest of a head, or the next pipelined request.
    pub(crate) buf: BytesMut,
    #[cfg(target_os = "linux")]
    pipe: Option<crate::splice::Pipe>,
}

impl Conn {
    pub(crate) fn new(app: Router, bodies: Bodies, tcp: TcpStream) -> Conn {
        Conn {
            app,
            bodies,
            tcp,
            buf: BytesMut::new(),
            #[cfg(target_os = "linux")]
            pipe: None,
        }
    }

    pub(crate) async fn run<I: Intercept>(
        mut self,
        intercept: I,
        mut stop: Stop,
    ) -> io::Result<()> {
        let mut first = true;
        loop {
            let next = self.next_head(&mut stop, first).await?;
            first = false;
            let (head, used) = match next {
                Next::Request(head, used) => (*head, used),
                Next::H2 => {
                    let (io, service) = self.into_hyper();
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service);
                    return drive(conn, stop).await;
                }
                Next::Done => return Ok(()),
                Next::Bad(answer) => {
                    self.respond(*answer, false, Version::HTTP_11, false)
                        .await?;
                    return self.close().await;
                }
            };
            let has_body = match request_body(&head.headers) {
                Ok(b) => b,
                Err(e) => {
                    self.respond(*refusal(e), false, head.version, false)
                        .await?;
                    return self.close().await;
                }
            };
            // A GET or HEAD has nothing to send: with a body it is refused in either mode.
            let reads = head.method == http::Method::GET || head.method == http::Method::HEAD;
            if has_body && self.bodies == Bodies::Hyper && !reads {
                // The head is still in the buffer: hyper reads the request from its start.
                let (io, service) = self.into_hyper();
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(crate::MAX_BUF)
                    .serve_connection(io, service);
                return drive(conn, stop).await;
            }
            self.buf.advance(used);
            let keep = self.answer(&intercept, head, has_body).await?;
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
                            return Ok(Next::Bad(refusal(HeadError::TooLarge)));
                        }
                        Ok(Some((head, used))) => {
                            return Ok(Next::Request(Box::new(head), used));
                        }
                        Ok(None) if self.buf.len() >= MAX_HEAD => {
                            return Ok(Next::Bad(refusal(HeadError::TooLarge)));
                        }
                        Ok(None) => {}
                        Err(e) => return Ok(Next::Bad(refusal(e))),
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

    /// Answers one request whose body (if any) is not read; Ok(true) when the connection stays
    /// open for the next one.
    async fn answer<I: Intercept>(
        &mut self,
        intercept: &I,
        head: Head,
        has_body: bool,
    ) -> io::Result<bool> {
        let mut keep = wants_keep_alive(head.version, &head.headers);
        let is_head = head.method == Method::HEAD;
        if has_body {
            // The body is not read: the connection cannot carry another request.
            keep = false;
            if head.method == Method::GET || is_head {
                let answer = oci_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::Unsupported,
                    "a pull carries no request body",
                );
                self.respond(answer, is_head, head.version, false).await?;
                return Ok(false);
            }
        } else if let Some(done) = intercept.intercept(self, &head, keep).await {
            return done;
        }
        let Head {
            method,
            uri,
            version,
            headers,
        } = head;
        let mut req = http::Request::new(Body::empty());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let answer = self.route(req).await;
        self.respond(answer, is_head, version, keep).await
    }

    /// The router's answer to `req`.
    pub async fn route(&self, req: http::Request<Body>) -> Response {
        match self.app.clone().oneshot(req).await {
            Ok(a) => a,
            Err(never) => match never {},
        }
    }

    /// Writes bytes as they are (a head from [`write_head`], a body's first bytes).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tcp.write_all(bytes).await
    }

    /// Moves exactly `len` bytes from `src` to the client with splice(2), counting what the
    /// client gets into each of `sent`. After an error the client has a short body: the caller
    /// must end the connection.
    #[cfg(target_os = "linux")]
    pub async fn splice_from(
        &mut self,
        src: &TcpStream,
        len: u64,
        sent: &[&prometheus_client::metrics::counter::Counter],
    ) -> Result<(), crate::Broken> {
        if self.pipe.is_none() {
            self.pipe = Some(crate::splice::Pipe::new().map_err(crate::Broken::Client)?);
        }
        let Some(pipe) = self.pipe.as_ref() else {
            unreachable!("made above")
        };
        crate::splice::relay(src, &self.tcp, pipe, len, sent).await
    }

    /// Writes `answer`: with sendfile(2) when it carries a [`SendFile`] for its whole body,
    /// with its length when that is known, chunked otherwise (HTTP/1.1), or delimited by
    /// closing the connection (HTTP/1.0). Ok(true) when the connection can stay open.
    pub async fn respond(
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
        let mut pending = Some(out);
        // Body bytes already sent another way, to be skipped in the body's frames.
        let mut skip: u64 = 0;
        #[cfg(target_os = "linux")]
        if let Framing::Length(n) = framing
            && let Some(file) = parts.extensions.get::<SendFile>()
            && file.len() == n
        {
            self.tcp
                .write_all(&pending.take().unwrap_or_default())
                .await?;
            skip = file.send(&self.tcp).await?;
            if skip == n {
                return Ok(keep);
            }
            // A growing file that will not be completed: the body has the rest.
        }
        let mut sent: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| io::Error::other(format!("answer body: {e}")))?;
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if skip > 0 {
                let dropped = skip.min(data.len() as u64);
                skip -= dropped;
                sent += dropped;
                data = data.slice(dropped as usize..);
            }
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

/// An OCI error answer: [`ErrorBody`] with one error.
pub fn oci_error(status: StatusCode, code: ErrorCode, message: impl std::fmt::Display) -> Response {
    let body = ErrorBody::new(code, message.to_string(), serde_json::Value::Null);
    (status, [(CONTENT_TYPE, "application/json")], body.to_json()).into_response()
}

/// The answer to a head that cannot be served (the connection closes after it).
fn refusal(e: HeadError) -> Box<Response> {
    let status = match e {
        HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
    };
    Box::new(oci_error(status, ErrorCode::Unsupported, e))
}

impl Conn {
    /// The connection for hyper: the socket, with what was read from it and not yet used read
    /// again first, and the router as a service.
    pub(crate) fn into_hyper(
        self,
    ) -> (
        TokioIo<Rewind>,
        impl hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + use<>,
    ) {
        let io = Rewind::new(self.buf.freeze(), self.tcp);
        let app = self.app;
        let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
        (TokioIo::new(io), service)
    }
}
